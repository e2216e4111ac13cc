//! The real `llm-router` binary: config file, JSON logs, SIGTERM with streams in flight.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use loadtest::{SimConfig, SimNode};

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

async fn wait_healthy(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the router did not start listening on {port}");
}

#[test]
fn version_names_the_commit_the_binary_was_built_from() {
    let out = Command::new(env!("CARGO_BIN_EXE_llm-router"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let version = String::from_utf8(out.stdout).unwrap();
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned());
    let expected = match head {
        // With ", modified" after it in a tree with uncommitted changes.
        Some(head) => format!("llm-router {} (commit {head}", env!("CARGO_PKG_VERSION")),
        None => format!("llm-router {} (commit unknown)", env!("CARGO_PKG_VERSION")),
    };
    assert!(
        version.starts_with(&expected),
        "{version:?}, expected {expected:?}"
    );
}

/// The router binary running with a config file, its output lines (stdout and stderr) collected
/// as they come. Killed when dropped.
struct RouterChild {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl RouterChild {
    fn spawn(config_path: &std::path::Path, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_llm-router"))
            .arg("--config")
            .arg(config_path)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().unwrap());
        let stderr: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().unwrap());
        let readers = [stdout, stderr]
            .into_iter()
            .map(|pipe| {
                let lines = lines.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                        lines.lock().unwrap().push(line);
                    }
                })
            })
            .collect();
        Self {
            child,
            lines,
            readers,
        }
    }

    fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`TERM`, `HUP`) with kill(1).
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// The output so far.
    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits at most `limit` for the process to exit, then returns its status and whole output.
    async fn exit_within(mut self, limit: Duration) -> (std::process::ExitStatus, Vec<String>) {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(started.elapsed() < limit, "the router did not exit");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        for reader in std::mem::take(&mut self.readers) {
            reader.join().unwrap();
        }
        (status, self.lines())
    }
}

impl Drop for RouterChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_streams_finish_flushes_history_and_exits_zero() {
    let node = SimNode::start(SimConfig {
        models: vec!["m".into()],
        ttft_ms: 50,
        inter_token_ms: 40,
        tokens: 20,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("history.db");
    let port = free_port();
    let config = format!(
        r#"
listen = "127.0.0.1:{port}"
[log]
format = "json"
level = "info"
[history]
path = "{}"
flush_interval_ms = 50
[auth]
api_keys = [{{ id = "team", sha256 = "{}" }}]
[shutdown]
grace_period_ms = 10000
[[nodes]]
id = "a"
url = "{}"
models = ["m"]
max_concurrency = 128
"#,
        db.display(),
        router::auth::hash_hex("sk-secret-key"),
        node.url()
    );
    let config_path = dir.path().join("router.toml");
    std::fs::write(&config_path, config).unwrap();

    let check = Command::new(env!("CARGO_BIN_EXE_llm-router"))
        .args(["check-config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let router = RouterChild::spawn(&config_path, &[]);
    wait_healthy(port).await;

    // 100 streams of about 0.8 s each.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let mut streams = Vec::new();
    for _ in 0..100 {
        let request = http::Request::post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("authorization", "Bearer sk-secret-key")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
            )))
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        streams.push(tokio::spawn(async move {
            let body = response.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8_lossy(&body).into_owned()
        }));
    }
    // Every stream is under way; now SIGTERM.
    router.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "no new connection is accepted after SIGTERM"
    );
    for stream in streams {
        let text = stream.await.unwrap();
        assert!(
            text.trim_end().ends_with("data: [DONE]"),
            "a stream was cut: {text:?}"
        );
    }
    let (exit, logs) = router.exit_within(Duration::from_secs(15)).await;
    assert!(exit.success(), "exit status {exit:?}");
    let all = logs.join("\n");
    assert!(!all.contains("sk-secret-key"), "a key reached the logs");
    let finished: Vec<serde_json::Value> = logs
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "request finished")
        .collect();
    assert_eq!(finished.len(), 100, "one JSON log line per request");
    assert!(
        finished.iter().all(|v| v["span"]["request_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty())),
        "each carries its request id: {}",
        finished[0]
    );

    // The history was flushed before exit: one row per stream.
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let (rows,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM requests")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 100);
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Lets this process (and the router it starts) open as many descriptors as the hard limit.
fn raise_fd_limit(needed: u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    setrlimit(Resource::Nofile, limit).unwrap();
    let have = limit.current.unwrap_or(u64::MAX);
    assert!(
        have >= needed,
        "this test needs {needed} file descriptors; the hard limit is {have}"
    );
}

/// 10,000 idle client connections against a limit of 1,000: the ones over the limit get 503
/// and are closed, the router's memory stays bounded, and it serves again once they go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_stay_under_the_connection_limit() {
    raise_fd_limit(12_000);
    let node = SimNode::start(SimConfig::instant(&["m"])).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = format!(
        r#"
listen = "127.0.0.1:{port}"
[log]
level = "warn"
[history]
enabled = false
[limits]
max_connections = 1000
header_read_timeout_ms = 120000
[[nodes]]
id = "a"
url = "{}"
models = ["m"]
"#,
        node.url()
    );
    let config_path = dir.path().join("router.toml");
    std::fs::write(&config_path, config).unwrap();
    let router = RouterChild::spawn(&config_path, &[]);
    wait_healthy(port).await;
    let base = format!("http://127.0.0.1:{port}");
    let chat = || async {
        let client = reqwest::Client::new();
        client
            .post(format!("{base}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#)
            .send()
            .await
            .map(|r| r.status().as_u16())
    };
    assert_eq!(chat().await.unwrap(), 200);
    let before = rss_kib(router.id());

    let mut idle = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    // A connection over the limit is told so, then closed.
    let mut answer = Vec::new();
    let last = idle.last_mut().unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(last, &mut answer),
    )
    .await
    .expect("a connection over the limit is closed")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("too_many_connections"),
        "{answer}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = rss_kib(router.id());
    let grown_mib = during.saturating_sub(before) as f64 / 1024.0;
    eprintln!("router RSS {before} KiB before, {during} KiB with 10,000 connections open");
    assert!(
        grown_mib < 32.0,
        "10,000 connection attempts grew the router by {grown_mib:.1} MiB"
    );

    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(10);
    while chat().await.ok() != Some(200) {
        assert!(Instant::now() < deadline, "the router did not serve again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("llm_router_connections_refused_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(
        (8_900..=9_100).contains(&refused),
        "{refused} connections refused"
    );
}

/// A reload with a broken file changes nothing and says why (in the log for SIGHUP, in the
/// answer for the admin API); a good file applies its nodes and names what needs a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_an_invalid_file_keeps_the_running_config_and_says_why() {
    let a = SimNode::start(SimConfig::instant(&["m"])).await.unwrap();
    let b = SimNode::start(SimConfig::instant(&["m"])).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let head = format!(
        "listen = \"127.0.0.1:{port}\"\n[log]\nformat = \"json\"\nlevel = \"info\"\n[history]\nenabled = false\n"
    );
    let node = |id: &str, n: &SimNode| {
        format!(
            "[[nodes]]\nid = \"{id}\"\nurl = \"{}\"\nmodels = [\"m\"]\n",
            n.url()
        )
    };
    let config_path = dir.path().join("router.toml");
    std::fs::write(&config_path, format!("{head}{}", node("a", &a))).unwrap();
    let router = RouterChild::spawn(&config_path, &[("LLM_ROUTER_ADMIN_TOKEN", "admin")]);
    wait_healthy(port).await;
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let chat = || async {
        http.post(format!("{base}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    let node_ids = || async {
        let nodes: serde_json::Value = http
            .get(format!("{base}/api/nodes"))
            .bearer_auth("admin")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut ids: Vec<String> = nodes["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    };
    let reload = |token: &'static str| {
        let request = http
            .post(format!("{base}/api/config/reload"))
            .bearer_auth(token);
        async move { request.send().await.unwrap() }
    };
    assert_eq!(chat().await, 200);

    // A typo in a key: SIGHUP logs why, and nothing changes.
    std::fs::write(
        &config_path,
        format!("{head}{}[limits]\nmax_body_bytez = 5\n", node("b", &b)),
    )
    .unwrap();
    router.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let failed = router
            .lines()
            .into_iter()
            .find(|l| l.contains("config reload failed"));
        if let Some(line) = failed {
            assert!(line.contains("max_body_bytez"), "the log says why: {line}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no log line for the failed reload"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(node_ids().await, vec!["a"]);
    assert_eq!(chat().await, 200);
    assert_eq!(
        a.stats().requests(),
        2,
        "still served by the old config's node"
    );

    // The same through the admin API: 400 naming the key; and 401 without the token.
    assert_eq!(reload("wrong").await.status(), 401);
    let answer = reload("admin").await;
    assert_eq!(answer.status(), 400);
    let error: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_config");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_body_bytez"),
        "{error}"
    );
    assert_eq!(node_ids().await, vec!["a"]);

    // A good file: the new node joins at once; the changed [wait] waits for a restart.
    std::fs::write(
        &config_path,
        format!(
            "{head}[wait]\nmax_waiters = 7\n{}{}",
            node("a", &a),
            node("b", &b)
        ),
    )
    .unwrap();
    let answer = reload("admin").await;
    assert_eq!(answer.status(), 200);
    let report: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(
        report["nodes"]["added"],
        serde_json::json!(["b"]),
        "{report}"
    );
    assert_eq!(
        report["restart_needed"],
        serde_json::json!(["wait"]),
        "{report}"
    );
    assert_eq!(node_ids().await, vec!["a", "b"]);

    // Node a leaves the file: after a reload it gets nothing more.
    std::fs::write(&config_path, format!("{head}{}", node("b", &b))).unwrap();
    let answer = reload("admin").await;
    let report: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(
        report["nodes"]["removed"],
        serde_json::json!(["a"]),
        "{report}"
    );
    assert_eq!(node_ids().await, vec!["b"]);
    let served_by_a = a.stats().requests();
    for _ in 0..3 {
        assert_eq!(chat().await, 200);
    }
    assert_eq!(a.stats().requests(), served_by_a);
}

/// Even at `trace`, no key, token, secret or prompt reaches the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_prompt_reaches_the_log_even_at_trace() {
    let node = SimNode::start(SimConfig::instant(&["m"])).await.unwrap();
    let joining = SimNode::start(SimConfig::instant(&["m"])).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = format!(
        r#"
listen = "127.0.0.1:{port}"
[log]
format = "json"
level = "trace"
[history]
enabled = false
[auth]
api_keys = [{{ id = "team", sha256 = "{}" }}]
[[nodes]]
id = "a"
url = "{}"
models = ["m"]
"#,
        router::auth::hash_hex("sk-client-key-4242"),
        node.url()
    );
    let config_path = dir.path().join("router.toml");
    std::fs::write(&config_path, config).unwrap();
    let router = RouterChild::spawn(
        &config_path,
        &[
            ("LLM_ROUTER_ADMIN_TOKEN", "admin-token-4242"),
            ("LLM_ROUTER_REGISTRATION_SECRET", "join-secret-4242"),
        ],
    );
    wait_healthy(port).await;
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    for stream in [false, true] {
        let reply = http
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth("sk-client-key-4242")
            .header("content-type", "application/json")
            .body(format!(
                r#"{{"model":"m","stream":{stream},"messages":[{{"role":"user","content":"prompt-marker-4242"}}]}}"#
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 200);
        let _ = reply.text().await.unwrap();
    }
    let wrong = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth("sk-wrong-key-4242")
        .body(r#"{"model":"m"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let joined: serde_json::Value = http
        .post(format!("{base}/api/nodes"))
        .bearer_auth("join-secret-4242")
        .json(&serde_json::json!({"url": joining.url(), "id": "j", "models": ["m"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let node_token = joined["token"].as_str().unwrap().to_owned();
    let beat = http
        .post(format!("{base}/api/nodes/j/heartbeat"))
        .bearer_auth(&node_token)
        .send()
        .await
        .unwrap();
    assert_eq!(beat.status(), 204);
    let listed = http
        .get(format!("{base}/api/nodes"))
        .bearer_auth("admin-token-4242")
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);
    let denied = http
        .get(format!("{base}/api/nodes"))
        .bearer_auth(&node_token)
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 401, "a node token is not an admin token");

    router.signal("TERM");
    let (_, lines) = router.exit_within(Duration::from_secs(15)).await;
    let logs = lines.join("\n");
    assert!(
        logs.lines().count() > 20,
        "trace logging is on: {} lines",
        logs.lines().count()
    );
    for secret in [
        "sk-client-key-4242",
        "sk-wrong-key-4242",
        "admin-token-4242",
        "join-secret-4242",
        node_token.as_str(),
        "prompt-marker-4242",
    ] {
        let line = logs.lines().find(|l| l.contains(secret));
        assert!(
            line.is_none(),
            "{secret} reached the log: {}",
            line.unwrap_or_default()
        );
    }
}
