//! Bad input from clients: malformed bodies, oversized bodies and headers, invalid UTF-8,
//! smuggling attempts and slowloris. Each gets a clear answer (or a closed connection), the
//! history records what reached the router, and the router keeps serving.

use std::time::{Duration, Instant};

use http::Method;
use llm_router_tests::*;
use router::config::Config;
use router::server::Running;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A router with history over one instant node `a` serving `m`, with `tweak` applied.
async fn start(node: &SimNode, tweak: impl FnOnce(&mut Config)) -> (Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let router =
        start_with_history(&dir.path().join("h.db"), &[("a", node, &["m"], 8)], tweak).await;
    (router, dir)
}

fn node() -> SimConfig {
    SimConfig::instant(&["m"])
}

async fn still_serves(router: &Running) {
    let reply = post(
        &client(),
        &format!("http://{}/v1/chat/completions", router.addr),
        chat_body("m", false),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// Writes `bytes` on a fresh connection and reads until the router closes it (or 3 s pass).
async fn raw_exchange(router: &Running, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(router.addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

fn statuses(answer: &str) -> Vec<u16> {
    answer
        .match_indices("HTTP/1.1 ")
        .filter_map(|(at, _)| answer.get(at + 9..at + 12)?.parse().ok())
        .collect()
}

/// Broken bodies get 400/404/413 in OpenAI's shape, a huge head gets 431; each body that
/// reached the router has its row, and the router serves on.
#[tokio::test]
async fn malformed_bodies_and_oversized_requests_get_clear_errors() {
    let sim = SimNode::start(node()).await.unwrap();
    let (router, _dir) = start(&sim, |config| {
        config.limits.max_body_bytes = 4096;
        config.limits.max_header_bytes = 16 * 1024;
    })
    .await;
    let url = format!("http://{}/v1/chat/completions", router.addr);
    let client = client();
    let mut invalid_utf8 = br#"{"model": "m", "messages": [{"role": "user", "content": ""#.to_vec();
    invalid_utf8.extend_from_slice(&[0xff, 0xfe, 0xfd]);
    invalid_utf8.extend_from_slice(br#""}]}"#);
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{\"model\": \"m\", ".to_vec(), 400, "invalid_request"),
        (b"[1, 2, 3]".to_vec(), 400, "invalid_request"),
        // Fields in order, as serde would fill a struct from an array: not a request for "m".
        (br#"["m", false]"#.to_vec(), 400, "invalid_request"),
        (br#"{"model": 42}"#.to_vec(), 400, "invalid_request"),
        (
            br#"{"model": "m", "stream": "yes"}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (br#"{"messages": []}"#.to_vec(), 400, "missing_model"),
        (
            chat_body("nope", false).into_bytes(),
            404,
            "model_not_found",
        ),
        (invalid_utf8, 400, "invalid_request"),
        (
            format!(r#"{{"model": "m", "prompt": "{}"}}"#, "x".repeat(8192)).into_bytes(),
            413,
            "payload_too_large",
        ),
    ];
    for (body, status, code) in &cases {
        let request = http::Request::post(&url)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body.clone())))
            .unwrap();
        let response = client.request(request).await.unwrap();
        let got = response.status().as_u16();
        let body_text = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        let json: Value = serde_json::from_slice(&body_text).unwrap();
        assert_eq!(got, *status, "{}: {json}", String::from_utf8_lossy(body));
        assert_eq!(json["error"]["code"], *code, "{json}");
        assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }

    let huge_header = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: r\r\nx-padding: {}\r\ncontent-length: 2\r\n\r\n{{}}",
        "a".repeat(32 * 1024)
    );
    let answer = raw_exchange(&router, huge_header.as_bytes()).await;
    assert_eq!(statuses(&answer), vec![431], "{answer}");

    still_serves(&router).await;
    let rows = flushed_rows(&router).await;
    let mut recorded: Vec<u16> = rows
        .iter()
        .map(|r| r["status"].as_u64().unwrap() as u16)
        .collect();
    recorded.sort_unstable();
    let mut expected: Vec<u16> = cases.iter().map(|(_, s, _)| *s).chain([200]).collect();
    expected.sort_unstable();
    assert_eq!(
        recorded, expected,
        "one row per body that reached the router"
    );
    assert_eq!(
        sim.stats().requests(),
        1,
        "only the good request reached the node"
    );
    router.shutdown().await;
}

/// A request with both `Content-Length` and `Transfer-Encoding`, hiding a second request in its
/// body, and one with two different lengths: the node never sees the hidden request.
#[tokio::test]
async fn request_smuggling_attempts_never_reach_the_node() {
    let sim = SimNode::start(node()).await.unwrap();
    let (router, _dir) = start(&sim, |_| {}).await;
    let hidden = chat_body("m", false);
    let inner = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: r\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{hidden}",
        hidden.len()
    );
    let smuggle = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: r\r\ncontent-type: application/json\r\ncontent-length: {}\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n{inner}",
        5 + inner.len()
    );
    let answer = raw_exchange(&router, smuggle.as_bytes()).await;
    let seen = statuses(&answer);
    assert!(!seen.is_empty(), "no answer at all: {answer:?}");
    assert_ne!(
        seen[0], 200,
        "the outer request has no valid body: {answer}"
    );
    // Either the connection is refused outright (400) or, with chunked framing winning, the
    // inner bytes are a second, separate request; they are never part of the outer one.
    assert!(sim.stats().requests() <= 1);
    assert_eq!(
        sim.stats().requests() as usize,
        seen.iter().filter(|s| **s == 200).count(),
        "every request the node saw was answered on its own: {answer}"
    );

    let double_length = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: r\r\ncontent-type: application/json\r\ncontent-length: 5\r\ncontent-length: {}\r\n\r\n{hidden}",
        hidden.len()
    );
    let before = sim.stats().requests();
    let answer = raw_exchange(&router, double_length.as_bytes()).await;
    assert_eq!(statuses(&answer), vec![400], "{answer}");
    assert_eq!(sim.stats().requests(), before, "the node saw nothing");

    still_serves(&router).await;
    router.shutdown().await;
}

/// Headers sent one line at a time, forever: the connection is closed at the header timeout,
/// nothing is recorded, and other clients are served meanwhile.
#[tokio::test]
async fn slowloris_is_cut_off_at_the_header_timeout() {
    let sim = SimNode::start(node()).await.unwrap();
    let (router, _dir) = start(&sim, |config| {
        config.limits.header_read_timeout_ms = 500;
    })
    .await;
    // A client that connects and sends nothing at all is closed as well.
    let mut silent = TcpStream::connect(router.addr).await.unwrap();
    let mut stream = TcpStream::connect(router.addr).await.unwrap();
    stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: r\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut line = 0;
    let closed_after = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        line += 1;
        let written = stream
            .write_all(format!("x-slow-{line}: a\r\n").as_bytes())
            .await;
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(1), stream.read(&mut byte)).await;
        if written.is_err() || matches!(read, Ok(Ok(0)) | Ok(Err(_))) {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a trickle of headers held the connection for 5 s"
        );
        if line == 3 {
            still_serves(&router).await;
        }
    };
    assert!(
        closed_after >= Duration::from_millis(300),
        "closed too early: {closed_after:?}"
    );
    let mut byte = [0u8; 1];
    let silent_read = tokio::time::timeout(Duration::from_secs(2), silent.read(&mut byte)).await;
    assert!(
        matches!(silent_read, Ok(Ok(0)) | Ok(Err(_))),
        "a connection that sent nothing is still open: {silent_read:?}"
    );
    still_serves(&router).await;
    let rows = flushed_rows(&router).await;
    assert_eq!(rows.len(), 2, "only the two good requests are recorded");
    let reply = send(
        &client(),
        Method::GET,
        &format!("http://{}/health", router.addr),
        None,
        None,
    )
    .await;
    assert_eq!(reply.status, 200);
    router.shutdown().await;
}

/// A router with history over node `a` (one slot) whose streams run to some 50 MB (500,000
/// events of about 100 bytes), far more than loopback sockets buffer, with a 300 ms send
/// timeout.
async fn start_with_long_streams() -> (SimNode, Running, tempfile::TempDir) {
    let sim = SimNode::start(SimConfig {
        tokens: 500_000,
        ..node()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let router = start_with_history(&dir.path().join("h.db"), &[("a", &sim, &["m"], 1)], |c| {
        c.limits.send_timeout_ms = 300;
    })
    .await;
    (sim, router, dir)
}

/// With a stream asked for by a `client` that then reads nothing: the node's slot is let go
/// (the node sees its stream end), the router serves on, and the row says the client went
/// away.
async fn assert_the_stalled_stream_is_let_go(sim: &SimNode, router: &Running, client: &str) {
    assert!(
        eventually(Duration::from_secs(5), || sim.stats().in_flight() == 1).await,
        "the stream never started"
    );
    assert!(
        eventually(Duration::from_secs(10), || sim.stats().in_flight() == 0).await,
        "{client} that reads nothing still holds the node's slot after 10 s"
    );
    still_serves(router).await;
    let rows = flushed_rows(router).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    let stalled = rows
        .iter()
        .find(|row| row["stream"] == true)
        .expect("the stalled stream has its row");
    assert_eq!(stalled["client_disconnected"], true, "{stalled}");
}

/// A client that asks for a long stream and then reads nothing, keeping its connection open:
/// once the sockets' buffers are full and its socket has taken no more for `send_timeout_ms`,
/// the router resets the connection and lets go of the answer.
#[tokio::test]
async fn a_client_that_stops_reading_a_stream_lets_go_of_the_node_slot() {
    let (sim, router, _dir) = start_with_long_streams().await;
    let body = chat_body("m", true);
    let mut stream = TcpStream::connect(router.addr).await.unwrap();
    stream
        .write_all(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: r\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    assert_the_stalled_stream_is_let_go(&sim, &router, "an HTTP/1 client").await;
    drop(stream);
    router.shutdown().await;
}

/// The same over HTTP/2: a client that stops reading a stream (and keeps its connection, which
/// answers pings) stops it for lack of flow-control window, not on a blocked write. Once the
/// answer has gone `send_timeout_ms` without being asked for more, the router drops it.
#[tokio::test]
async fn an_http2_client_that_stops_reading_a_stream_lets_go_of_the_node_slot() {
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;

    let (sim, router, _dir) = start_with_long_streams().await;
    let h2: Client<HttpConnector, http_body_util::Full<bytes::Bytes>> =
        Client::builder(TokioExecutor::new())
            .http2_only(true)
            // HTTP/2's own default window, not hyper's 2 MiB: the stall comes sooner.
            .http2_initial_stream_window_size(65_535)
            .build(HttpConnector::new());
    let request = http::Request::post(format!("http://{}/v1/chat/completions", router.addr))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(chat_body(
            "m", true,
        ))))
        .unwrap();
    let answer = h2.request(request).await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.version(), http::Version::HTTP_2);
    // The answer's body is never read.
    assert_the_stalled_stream_is_let_go(&sim, &router, "an HTTP/2 client").await;
    drop(answer);
    router.shutdown().await;
}
