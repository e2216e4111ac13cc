//! The request history, seen through the admin API: one correct row per request, and requests
//! that keep succeeding while the database fails.

use std::collections::HashMap;
use std::time::Duration;

use http::Method;
use llm_router_tests::*;
use router::server::Running;
use serde_json::Value;
use sqlx::Connection;

async fn router_with_history(
    db: &std::path::Path,
    nodes: &[(&str, &SimNode, &[&str], usize)],
) -> Running {
    start_with_history(db, nodes, |_| {}).await
}

fn metric(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_a_thousand_mixed_requests_leaves_one_correct_row_each() {
    let dir = tempfile::tempdir().unwrap();
    let chat = SimNode::start(quick_node(&["chat"])).await.unwrap();
    let embed = SimNode::start(quick_node(&["embed"])).await.unwrap();
    let router = router_with_history(
        &dir.path().join("h.db"),
        &[("c", &chat, &["chat"], 256), ("e", &embed, &["embed"], 256)],
    )
    .await;
    let base = format!("http://{}", router.addr);
    let client = client();

    const N: usize = 1_000;
    let kinds = ["chat", "chat-stream", "completion", "embedding", "unknown"];
    let mut sent: HashMap<String, (usize, u16)> = HashMap::new();
    let mut tasks = Vec::new();
    for i in 0..N {
        let kind = kinds[i % kinds.len()];
        let (path, body) = match kind {
            "chat" => ("/v1/chat/completions", chat_body("chat", false)),
            "chat-stream" => ("/v1/chat/completions", r#"{"model":"chat","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#.to_owned()),
            "completion" => ("/v1/completions", r#"{"model":"chat","prompt":"hi"}"#.to_owned()),
            "embedding" => ("/v1/embeddings", r#"{"model":"embed","input":"hi"}"#.to_owned()),
            _ => ("/v1/chat/completions", chat_body("nobody-serves-this", false)),
        };
        let (client, url) = (client.clone(), format!("{base}{path}"));
        tasks.push(tokio::spawn(
            async move { (i, post(&client, &url, body).await) },
        ));
        // At most 32 in flight.
        if tasks.len() >= 32 {
            let (i, reply) = tasks.remove(0).await.unwrap();
            let id = reply.headers["x-request-id"].to_str().unwrap().to_owned();
            assert!(
                sent.insert(id, (i, reply.status.as_u16())).is_none(),
                "request ids are unique"
            );
        }
    }
    for task in tasks {
        let (i, reply) = task.await.unwrap();
        let id = reply.headers["x-request-id"].to_str().unwrap().to_owned();
        assert!(sent.insert(id, (i, reply.status.as_u16())).is_none());
    }
    assert_eq!(sent.len(), N);
    router.services.history.flush().await;

    let rows = all_rows(&client, &base).await;
    assert_eq!(rows.len(), N, "exactly one row per request");
    for row in &rows {
        let id = row["request_id"].as_str().unwrap();
        let (i, status) = sent
            .get(id)
            .unwrap_or_else(|| panic!("a row for an unknown request: {row}"));
        assert_eq!(row["status"], *status, "{row}");
        let kind = kinds[i % kinds.len()];
        assert!(row["latency_ms"].as_f64().unwrap() > 0.0);
        assert_eq!(row["client_disconnected"], false);
        match kind {
            "unknown" => {
                assert_eq!(row["status"], 404);
                assert!(row["node_id"].is_null());
            }
            "embedding" => {
                assert_eq!(
                    (row["model"].as_str(), row["node_id"].as_str()),
                    (Some("embed"), Some("e"))
                );
                assert!(row["prompt_tokens"].as_u64().unwrap() > 0, "{row}");
            }
            _ if *status == 200 => {
                assert_eq!(
                    (row["model"].as_str(), row["node_id"].as_str()),
                    (Some("chat"), Some("c")),
                    "{row}"
                );
                assert_eq!(
                    row["completion_tokens"], 3,
                    "tokens, from the JSON or the last SSE chunk: {row}"
                );
                assert_eq!(row["stream"], kind == "chat-stream");
            }
            _ => {}
        }
    }
    let stats = send(
        &client,
        Method::GET,
        &format!("{base}/api/stats"),
        Some("admin"),
        None,
    )
    .await
    .json();
    assert_eq!(stats["total"], N as u64);
    assert_eq!(stats["history"]["dropped"], 0);
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_succeed_while_the_database_is_locked_and_rows_resume_after() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("h.db");
    let url = format!("sqlite://{}", db.display());
    let locker = tokio::sync::Mutex::new(None::<sqlx::SqliteConnection>);
    survive_a_database_fault(
        &db,
        || async {
            // Another process takes the write lock and holds it.
            let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
            sqlx::query("BEGIN EXCLUSIVE")
                .execute(&mut conn)
                .await
                .unwrap();
            *locker.lock().await = Some(conn);
        },
        || async {
            let mut conn = locker.lock().await.take().unwrap();
            sqlx::query("ROLLBACK").execute(&mut conn).await.unwrap();
        },
    )
    .await;
}

/// `chattr +i` makes the files immutable: writes fail with EPERM even through descriptors the
/// writer already holds open, root included, which is what a disk remounted read-only does.
fn set_immutable(files: &[std::path::PathBuf], on: bool) {
    for file in files.iter().filter(|f| f.exists()) {
        let status = std::process::Command::new("chattr")
            .arg(if on { "+i" } else { "-i" })
            .arg(file)
            .status()
            .expect("chattr (e2fsprogs) is installed by scripts/setup.sh");
        assert!(
            status.success(),
            "chattr on {} failed: this test needs root and a filesystem with the immutable \
             attribute (ext4, xfs, btrfs; not tmpfs)",
            file.display()
        );
    }
}

#[tokio::test]
async fn requests_succeed_while_the_database_is_read_only_and_rows_resume_after() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("h.db");
    // Not the `-shm` file: SQLite maps it into memory, and a write fault there is a SIGBUS.
    let files: Vec<_> = ["", "-wal"]
        .iter()
        .map(|suffix| dir.path().join(format!("h.db{suffix}")))
        .collect();
    survive_a_database_fault(
        &db,
        || async { set_immutable(&files, true) },
        || async { set_immutable(&files, false) },
    )
    .await;
}

/// A tmpfs of a fixed size, unmounted when dropped.
struct TinyDisk {
    path: std::path::PathBuf,
}

impl TinyDisk {
    fn mount(path: std::path::PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mounting a tmpfs failed: this test needs root (or CAP_SYS_ADMIN)"
        );
        Self { path }
    }

    /// Writes a file until the disk is full.
    fn fill(&self) {
        use std::io::Write;
        let mut filler = std::fs::File::create(self.path.join("filler")).unwrap();
        let block = vec![0u8; 4096];
        while filler.write_all(&block).is_ok() {}
        let _ = filler.sync_all();
    }

    fn clear(&self) {
        std::fs::remove_file(self.path.join("filler")).unwrap();
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

#[tokio::test]
async fn requests_succeed_while_the_disk_is_full_and_rows_resume_after() {
    let dir = tempfile::tempdir().unwrap();
    let disk = TinyDisk::mount(dir.path().join("tiny"), "2m");
    let db = disk.path.join("h.db");
    survive_a_database_fault(&db, || async { disk.fill() }, || async { disk.clear() }).await;
}

/// One request recorded, then `fault` breaks the database: twenty requests must still succeed
/// quickly and their rows be counted as dropped. After `clear`, rows are written again.
async fn survive_a_database_fault<F, FF, C, CF>(db: &std::path::Path, fault: F, clear: C)
where
    F: FnOnce() -> FF,
    FF: std::future::Future<Output = ()>,
    C: FnOnce() -> CF,
    CF: std::future::Future<Output = ()>,
{
    let chat = SimNode::start(quick_node(&["chat"])).await.unwrap();
    let router = router_with_history(db, &[("c", &chat, &["chat"], 64)]).await;
    let base = format!("http://{}", router.addr);
    let client = client();
    let chat_url = format!("{base}/v1/chat/completions");
    let chat_once = || post(&client, &chat_url, chat_body("chat", false));
    assert_eq!(chat_once().await.status, 200);
    router.services.history.flush().await;
    assert_eq!(router.services.history.written(), 1);

    fault().await;
    let started = std::time::Instant::now();
    for _ in 0..20 {
        assert_eq!(
            chat_once().await.status,
            200,
            "requests never wait on the database"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    router.services.history.flush().await;
    let metrics = send(&client, Method::GET, &format!("{base}/metrics"), None, None)
        .await
        .text();
    let dropped = metric(
        &metrics,
        "llm_router_history_rows_total{outcome=\"dropped\"}",
    );
    assert!(dropped > 0, "drops are counted");
    assert_eq!(
        router.services.history.written() + router.services.history.dropped(),
        21,
        "every row is either written or counted as dropped"
    );
    clear().await;

    let written_before = router.services.history.written();
    for _ in 0..5 {
        assert_eq!(chat_once().await.status, 200);
    }
    assert!(
        eventually(Duration::from_secs(5), || router.services.history.written()
            == written_before + 5)
        .await,
        "writing resumed: {} written, {} dropped",
        router.services.history.written(),
        router.services.history.dropped()
    );
    router.shutdown().await;
}

#[tokio::test]
async fn a_history_that_cannot_open_does_not_stop_the_router() {
    let chat = SimNode::start(quick_node(&["chat"])).await.unwrap();
    // A path no one can create, root included.
    let router = router_with_history(
        std::path::Path::new("/proc/llm-router-test/h.db"),
        &[("c", &chat, &["chat"], 8)],
    )
    .await;
    let base = format!("http://{}", router.addr);
    let client = client();
    for _ in 0..3 {
        assert_eq!(
            post(
                &client,
                &format!("{base}/v1/chat/completions"),
                chat_body("chat", false)
            )
            .await
            .status,
            200
        );
    }
    assert!(
        eventually(Duration::from_secs(2), || router.services.history.dropped()
            == 3)
        .await
    );
    let logs = send(
        &client,
        Method::GET,
        &format!("{base}/api/logs"),
        Some("admin"),
        None,
    )
    .await;
    assert_eq!(logs.status, 503);
    assert_eq!(logs.json()["error"]["code"], "history_unavailable");
    router.shutdown().await;
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_is_marked_in_its_row() {
    let dir = tempfile::tempdir().unwrap();
    let slow = SimNode::start(SimConfig {
        inter_token_ms: 50,
        tokens: 100,
        ..quick_node(&["chat"])
    })
    .await
    .unwrap();
    let router = router_with_history(&dir.path().join("h.db"), &[("c", &slow, &["chat"], 8)]).await;
    let base = format!("http://{}", router.addr);
    let client = client();
    let response = post_streaming(
        &client,
        &format!("{base}/v1/chat/completions"),
        chat_body("chat", true),
    )
    .await;
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut body = response.into_body();
    http_body_util::BodyExt::frame(&mut body)
        .await
        .unwrap()
        .unwrap();
    drop(body);
    assert!(
        eventually(Duration::from_secs(3), || router
            .services
            .state
            .pool
            .snapshot()
            .nodes()[0]
            .state()
            .in_flight()
            == 0)
        .await
    );
    assert!(
        eventually(Duration::from_secs(3), || slow.stats().in_flight() == 0).await,
        "the node's request was cancelled too"
    );
    router.services.history.flush().await;
    let rows = all_rows(&client, &base).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["request_id"], id.as_str());
    assert_eq!(rows[0]["client_disconnected"], true, "{}", rows[0]);
    assert_eq!(rows[0]["status"], 200);
    router.shutdown().await;
}

/// A client that gives up while its request waits for a slot: it leaves the line, nothing
/// reaches the node for it, and its row says 499 with `client_disconnected` and the model.
#[tokio::test]
async fn a_client_that_leaves_while_waiting_for_a_slot_is_marked_in_its_row() {
    let dir = tempfile::tempdir().unwrap();
    let slow = SimNode::start(SimConfig {
        inter_token_ms: 50,
        tokens: 20,
        ..quick_node(&["chat"])
    })
    .await
    .unwrap();
    // Without admission control, which would turn the second request away at once.
    let router = start_with_history(
        &dir.path().join("h.db"),
        &[("c", &slow, &["chat"], 1)],
        |config| {
            config.layers = vec![
                router::LayerKind::TimeoutWait,
                router::LayerKind::CachedSelect,
            ];
        },
    )
    .await;
    let base = format!("http://{}", router.addr);
    let url = format!("{base}/v1/chat/completions");
    let client = client();
    let holder = post_streaming(&client, &url, chat_body("chat", true)).await;
    assert_eq!(holder.status(), 200);
    let pool = router.services.state.pool.clone();
    let waiter = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { post(&client, &url, chat_body("chat", false)).await }
    });
    assert!(
        eventually(Duration::from_secs(3), || pool.waiting() == 1).await,
        "the second request waits for the only slot"
    );
    waiter.abort();
    assert!(
        eventually(Duration::from_secs(3), || pool.waiting() == 0).await,
        "the waiter left the line"
    );
    let body = http_body_util::BodyExt::collect(holder.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("[DONE]"));
    assert_eq!(
        slow.stats().requests(),
        1,
        "nothing reached the node for the waiter"
    );
    assert!(
        eventually(Duration::from_secs(3), || pool.snapshot().nodes()[0]
            .state()
            .in_flight()
            == 0)
        .await
    );

    router.services.history.flush().await;
    let rows = all_rows(&client, &base).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    let left = rows.iter().find(|r| r["status"] == 499).expect("a 499 row");
    assert_eq!(left["client_disconnected"], true);
    assert_eq!(left["node_id"], Value::Null);
    assert_eq!(left["model"], "chat", "the row names what was asked for");
    let served = rows
        .iter()
        .find(|r| r["status"] == 200)
        .expect("the stream's row");
    assert_eq!(served["client_disconnected"], false);
    router.shutdown().await;
}
