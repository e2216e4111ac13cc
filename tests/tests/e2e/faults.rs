//! Node faults: killed mid-stream, silent, stalled, failing, refusing, all down. Each test checks
//! what the client got, what the history recorded, and the router's state afterwards.

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use llm_router_tests::*;
use router::server::{Running, StartOptions};
use serde_json::Value;

fn base(router: &Running) -> String {
    format!("http://{}", router.addr)
}

/// What `read` gives of the router's node `id`, as the pool has it now.
fn read_node<T>(router: &Running, id: &str, read: impl FnOnce(&layers::Node) -> T) -> T {
    let snapshot = router.services.state.pool.snapshot();
    read(snapshot.node(id).expect("node in the pool"))
}

fn node_state(router: &Running, id: &str) -> (usize, bool) {
    read_node(router, id, |node| {
        (node.state().in_flight(), node.is_healthy())
    })
}

fn consecutive_failures(router: &Running, id: &str) -> u32 {
    read_node(router, id, |node| node.state().consecutive_failures())
}

/// The `error` object of the last SSE event, if the stream ended with one.
fn error_event(events: &[(Duration, String)]) -> Option<Value> {
    let (_, last) = events.last()?;
    let value: Value = serde_json::from_str(last).ok()?;
    value.get("error").cloned()
}

/// A node dies while it streams: the client's stream ends with an error event, the row says
/// so, the node is ejected with its slot given back, and the other node serves what follows.
#[tokio::test]
async fn a_node_killed_mid_stream_ends_the_stream_with_an_error_event() {
    let dir = tempfile::tempdir().unwrap();
    let slow = SimConfig {
        inter_token_ms: 50,
        tokens: 100,
        ..quick_node(&["m"])
    };
    let first = SimNode::start(slow.clone()).await.unwrap();
    let second = SimNode::start(slow).await.unwrap();
    let router = start_with_history(
        &dir.path().join("h.db"),
        &[("first", &first, &["m"], 4), ("second", &second, &["m"], 4)],
        |_| {},
    )
    .await;
    let url = format!("{}/v1/chat/completions", base(&router));
    let client = client();
    let started = Instant::now();
    let response = post_streaming(&client, &url, chat_body("m", true)).await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();
    let (doomed, doomed_id, survivor, survivor_id) = if first.stats().in_flight() == 1 {
        (first, "first", second, "second")
    } else {
        (second, "second", first, "first")
    };
    let survivor_requests = survivor.stats().requests();
    doomed.stop().await;

    let events = within(
        Duration::from_secs(5),
        "the broken stream ends",
        read_events(&mut body, started),
    )
    .await;
    let error = error_event(&events).expect("the stream ends with an error event");
    assert_eq!(error["code"], "upstream_unavailable", "{error}");
    assert_eq!(
        survivor.stats().requests(),
        survivor_requests,
        "nothing is retried once bytes reached the client"
    );

    assert!(
        eventually(Duration::from_secs(5), || node_state(&router, doomed_id)
            == (0, false))
        .await,
        "the dead node is ejected and its slot given back: {:?}",
        node_state(&router, doomed_id)
    );
    for _ in 0..5 {
        let reply = post(&client, &url, chat_body("m", false)).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }

    let rows = flushed_rows(&router).await;
    assert_eq!(rows.len(), 6);
    assert_eq!(rows[0]["node_id"], doomed_id);
    assert_eq!(rows[0]["status"], 200);
    assert_eq!(
        rows[0]["upstream_error"], "upstream_unavailable",
        "{}",
        rows[0]
    );
    for row in &rows[1..] {
        assert_eq!(row["node_id"], survivor_id, "{row}");
        assert_eq!(row["status"], 200);
        assert_eq!(row["upstream_error"], Value::Null);
    }
    router.shutdown().await;
}

/// One node accepts and never answers, another stalls mid-stream: the first-byte timeout gives
/// a 504, the idle timeout an error event, and both slots come back.
#[tokio::test]
async fn a_silent_node_and_a_stalled_stream_time_out_and_give_their_slots_back() {
    let dir = tempfile::tempdir().unwrap();
    let silent = SimNode::start(SimConfig {
        hang_rate: 1.0,
        ..quick_node(&["quiet"])
    })
    .await
    .unwrap();
    let stalling = SimNode::start(SimConfig {
        tokens: 10,
        stall_after: 2,
        ..quick_node(&["stall"])
    })
    .await
    .unwrap();
    let router = start_with_history(
        &dir.path().join("h.db"),
        &[
            ("silent", &silent, &["quiet"], 2),
            ("stalling", &stalling, &["stall"], 2),
        ],
        |config| {
            config.proxy.first_byte_timeout_ms = 300;
            config.proxy.idle_timeout_ms = 300;
            // Timeouts must be seen as such, not ejections, for the whole test.
            config.health.failures_to_eject = 100;
        },
    )
    .await;
    let url = format!("{}/v1/chat/completions", base(&router));
    let client = client();

    let started = Instant::now();
    let reply = post(&client, &url, chat_body("quiet", false)).await;
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "upstream_timeout");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(silent.stats().requests(), 1, "a timeout is not retried");

    let started = Instant::now();
    let response = post_streaming(&client, &url, chat_body("stall", true)).await;
    assert_eq!(response.status(), 200);
    let events = within(
        Duration::from_secs(3),
        "the stalled stream ends",
        read_events(&mut response.into_body(), started),
    )
    .await;
    assert_eq!(events.len(), 3, "two tokens, then the error: {events:?}");
    let error = error_event(&events).expect("the stream ends with an error event");
    assert_eq!(error["code"], "upstream_timeout", "{error}");

    assert_eq!(node_state(&router, "silent").0, 0);
    assert_eq!(node_state(&router, "stalling").0, 0);
    let rows = flushed_rows(&router).await;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["node_id"], "silent");
    assert_eq!(rows[0]["status"], 504);
    assert_eq!(rows[1]["node_id"], "stalling");
    assert_eq!(rows[1]["status"], 200);
    assert_eq!(rows[1]["upstream_error"], "upstream_timeout", "{}", rows[1]);
    router.shutdown().await;
}

/// A node that answers 500 is passed over for another one before anything reaches the client.
#[tokio::test]
async fn a_node_answering_5xx_is_retried_once_on_another_node() {
    let dir = tempfile::tempdir().unwrap();
    let broken = SimNode::start(SimConfig {
        failure_rate: 1.0,
        ..quick_node(&["m"])
    })
    .await
    .unwrap();
    let good = SimNode::start(quick_node(&["m"])).await.unwrap();
    let router = start_with_history(
        &dir.path().join("h.db"),
        &[("broken", &broken, &["m"], 4), ("good", &good, &["m"], 4)],
        |config| {
            // Keep sending to the broken node, so that every request may need its retry.
            config.health.failures_to_eject = 1_000;
            config.proxy.retry_reserve = 100;
        },
    )
    .await;
    let url = format!("{}/v1/chat/completions", base(&router));
    let client = client();
    for i in 0..20 {
        let reply = post(&client, &url, chat_body("m", i % 2 == 0)).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert!(
        broken.stats().requests() >= 5,
        "the broken node was tried {} times",
        broken.stats().requests()
    );
    assert_eq!(
        good.stats().requests(),
        20,
        "every request ended on the good node"
    );

    let rows = flushed_rows(&router).await;
    assert_eq!(rows.len(), 20);
    assert!(
        rows.iter()
            .all(|r| r["status"] == 200 && r["node_id"] == "good"),
        "{rows:?}"
    );
    assert_eq!(node_state(&router, "broken").0, 0);
    assert_eq!(node_state(&router, "good").0, 0);
    router.shutdown().await;
}

/// A node that refuses connections is passed over, the same way.
#[tokio::test]
async fn a_refused_connection_is_retried_on_another_node() {
    let dir = tempfile::tempdir().unwrap();
    let good = SimNode::start(quick_node(&["m"])).await.unwrap();
    let doomed = SimNode::start(quick_node(&["m"])).await.unwrap();
    let router = start_with_history(
        &dir.path().join("h.db"),
        // First in the pool: with no speeds measured yet, it is the first choice.
        &[("gone", &doomed, &["m"], 4), ("good", &good, &["m"], 4)],
        |config| {
            // Neither health checks nor failures eject it during the test: every request may
            // meet the refusal.
            config.health.failures_to_eject = 1_000;
            config.health.interval_ms = 60_000;
        },
    )
    .await;
    // Its port is closed now: connecting to it is refused.
    doomed.stop().await;
    let url = format!("{}/v1/chat/completions", base(&router));
    let client = client();
    for _ in 0..10 {
        let reply = post(&client, &url, chat_body("m", false)).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let failures = consecutive_failures(&router, "gone");
    assert!(failures >= 1, "the refusing node was tried");
    assert_eq!(good.stats().requests(), 10);
    let rows = flushed_rows(&router).await;
    assert_eq!(rows.len(), 10);
    assert!(rows.iter().all(|r| r["node_id"] == "good"), "{rows:?}");
    assert_eq!(node_state(&router, "gone").0, 0);
    router.shutdown().await;
}

/// Behind the default stack a retry goes to the quickest node left by measured speed, as the
/// request's first node was chosen, not to the least-loaded one.
#[tokio::test]
async fn a_retry_behind_the_default_stack_goes_to_the_quickest_node_left() {
    let dir = tempfile::tempdir().unwrap();
    let node = |ttft_ms| SimConfig {
        ttft_ms,
        ..quick_node(&["m"])
    };
    let doomed = SimNode::start(node(0)).await.unwrap();
    let slow = SimNode::start(node(300)).await.unwrap();
    let fast = SimNode::start(node(60)).await.unwrap();
    let router = start_with_history(
        &dir.path().join("h.db"),
        // "slow" before "fast": by load alone, between two idle nodes, it would be the pick.
        &[
            ("gone", &doomed, &["m"], 4),
            ("slow", &slow, &["m"], 4),
            ("fast", &fast, &["m"], 4),
        ],
        |config| {
            config.health.failures_to_eject = 1_000;
            config.health.interval_ms = 60_000;
            config.proxy.retry_reserve = 100;
            // Each pick reads the nodes' speeds as they are then.
            config.select.ranking_ttl_ms = 1;
        },
    )
    .await;
    // The speeds the pool would have measured: "gone" quickest, then "fast", then "slow". Set
    // rather than measured, so that a stall on a busy machine cannot reorder them; a failed
    // request records none.
    for (id, ms) in [("gone", 1), ("fast", 60), ("slow", 300)] {
        read_node(&router, id, |node| {
            node.state().record_ttfb(Duration::from_millis(ms));
        });
    }
    // Its port is closed before it ever served: every request meets a refused connection.
    doomed.stop().await;
    let url = format!("{}/v1/chat/completions", base(&router));
    let client = client();
    for _ in 0..6 {
        let reply = post(&client, &url, chat_body("m", false)).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let failures = consecutive_failures(&router, "gone");
    assert_eq!(failures, 6, "each request went to the quickest node first");
    assert_eq!(slow.stats().requests(), 0, "no retry went to the slow node");
    assert_eq!(fast.stats().requests(), 6);
    router.shutdown().await;
}

/// When every node fails, retries stop at the budget, and the node's own error reaches the
/// client without the node's address in it.
#[tokio::test]
async fn the_retry_budget_stops_a_retry_storm_and_node_errors_name_no_node() {
    let dir = tempfile::tempdir().unwrap();
    let failing = || SimConfig {
        failure_rate: 1.0,
        ..quick_node(&["m"])
    };
    let a = SimNode::start(failing()).await.unwrap();
    let b = SimNode::start(failing()).await.unwrap();
    let router = start_with_history(
        &dir.path().join("h.db"),
        &[("a", &a, &["m"], 4), ("b", &b, &["m"], 4)],
        |config| {
            config.health.failures_to_eject = 1_000;
            config.proxy.retry_reserve = 3;
            config.proxy.retry_percent = 10;
        },
    )
    .await;
    let url = format!("{}/v1/chat/completions", base(&router));
    let client = client();
    let addresses = [a.addr().to_string(), b.addr().to_string()];
    for _ in 0..30 {
        let reply = post(&client, &url, chat_body("m", false)).await;
        assert_eq!(reply.status, 500, "{}", reply.text());
        let text = reply.text();
        assert!(
            !addresses.iter().any(|addr| text.contains(addr.as_str()))
                && !text.contains("127.0.0.1"),
            "a node address reached the client: {text}"
        );
        assert_eq!(
            reply.json()["error"]["message"],
            "simulated failure at [node]/v1"
        );
    }
    // 3 retries up front, then one per 10 requests: 30 requests earn 3 more.
    let attempts = a.stats().requests() + b.stats().requests();
    assert!(
        (33..=36).contains(&attempts),
        "30 requests made {attempts} attempts"
    );
    let rows = flushed_rows(&router).await;
    assert_eq!(rows.len(), 30);
    assert!(rows.iter().all(|r| r["status"] == 500), "{rows:?}");
    assert_eq!(node_state(&router, "a").0 + node_state(&router, "b").0, 0);
    router.shutdown().await;
}

/// Every node goes down: clients get 503 with Retry-After at once and nothing queues; a node
/// coming back on its address serves again.
#[tokio::test]
async fn all_nodes_down_answers_503_at_once_and_serving_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let a = SimNode::start(quick_node(&["m"])).await.unwrap();
    let b = SimNode::start(quick_node(&["m"])).await.unwrap();
    let a_addr = a.addr();
    let router = start_with_history(
        &dir.path().join("h.db"),
        &[("a", &a, &["m"], 2), ("b", &b, &["m"], 2)],
        |_| {},
    )
    .await;
    let url = format!("{}/v1/chat/completions", base(&router));
    let client = client();
    assert_eq!(post(&client, &url, chat_body("m", false)).await.status, 200);
    a.stop().await;
    b.stop().await;

    // The first requests may still reach a dead node (502) until health checks eject both.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut quick_503s = 0;
    while quick_503s < 20 {
        assert!(Instant::now() < deadline, "no run of 503s within 5 s");
        let started = Instant::now();
        let reply = post(&client, &url, chat_body("m", false)).await;
        let took = started.elapsed();
        match reply.status.as_u16() {
            503 => {
                assert!(reply.headers.contains_key("retry-after"));
                assert_eq!(reply.json()["error"]["code"], "no_node_available");
                assert!(took < Duration::from_millis(500), "a 503 took {took:?}");
                quick_503s += 1;
            }
            502 => quick_503s = 0,
            other => panic!("unexpected {other}: {}", reply.text()),
        }
    }
    assert_eq!(router.services.state.pool.waiting(), 0, "nothing queues");
    assert_eq!(node_state(&router, "a"), (0, false));
    assert_eq!(node_state(&router, "b"), (0, false));

    let _back = SimNode::bind(quick_node(&["m"]), a_addr).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = post(&client, &url, chat_body("m", false)).await;
        if reply.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "serving did not resume");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let rows = flushed_rows(&router).await;
    let unavailable: Vec<&Value> = rows.iter().filter(|r| r["status"] == 503).collect();
    assert!(unavailable.len() >= 20);
    assert!(unavailable.iter().all(|r| r["node_id"] == Value::Null));
    assert_eq!(rows.last().unwrap()["status"], 200);
    assert_eq!(rows.last().unwrap()["node_id"], "a");
    router.shutdown().await;
}

/// A node that names itself everywhere it can: `Server`, `Via`, `Location` and other headers, and
/// the message of its 400. None of it reaches the client.
#[tokio::test]
async fn a_node_naming_itself_in_headers_and_errors_is_never_revealed() {
    use axum::http::{HeaderMap, HeaderValue, StatusCode};
    use axum::response::IntoResponse;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let me = format!("http://{addr}");
    let chat = {
        let me = me.clone();
        move |body: String| async move {
            let mut headers = HeaderMap::new();
            for (name, value) in [
                ("server", format!("vllm at {me}")),
                ("via", format!("1.1 {addr}")),
                ("location", format!("{me}/v1/elsewhere")),
                ("x-upstream", me.clone()),
                ("content-location", format!("{me}/v1/chat/completions")),
            ] {
                headers.insert(name, HeaderValue::from_str(&value).unwrap());
            }
            if body.contains("\"moved\"") {
                let text = format!("moved to {me}/v1/other");
                return (StatusCode::FOUND, headers, text).into_response();
            }
            if body.contains("\"gz\"") {
                // Not real gzip: bytes the router cannot read, with the address inside.
                headers.insert("content-encoding", HeaderValue::from_static("gzip"));
                let text = format!("\x1f\u{8b}{me}");
                return (StatusCode::INTERNAL_SERVER_ERROR, headers, text).into_response();
            }
            if body.contains("\"huge\"") {
                let text = format!("{me} ").repeat(10_000);
                return (StatusCode::SERVICE_UNAVAILABLE, headers, text).into_response();
            }
            if body.contains("\"bad\"") {
                let error = serde_json::json!({"error": {
                    "message": format!("model bad is not on {me} (host 127.0.0.1, {addr})"),
                    "type": "invalid_request_error", "param": "model", "code": "model_not_found"}});
                return (StatusCode::BAD_REQUEST, headers, error.to_string()).into_response();
            }
            let answer = serde_json::json!({"id": "x", "object": "chat.completion", "model": "ok",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]});
            (StatusCode::OK, headers, answer.to_string()).into_response()
        }
    };
    let app = axum::Router::new()
        .route("/health", axum::routing::get(|| async { "ok" }))
        .route("/v1/chat/completions", axum::routing::post(chat));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let mut config = quick_config(&[]);
    config.nodes.push(node_at(
        "talkative",
        &me,
        &["ok", "bad", "moved", "gz", "huge"],
        None,
    ));
    let router = start_full(config, StartOptions::default()).await;
    let url = format!("http://{}/v1/chat/completions", router.addr);
    let client = client();
    for (model, status) in [
        ("ok", 200),
        ("bad", 400),
        ("moved", 302),
        ("gz", 500),
        ("huge", 503),
    ] {
        let reply = post(&client, &url, chat_body(model, false)).await;
        assert_eq!(reply.status, status, "{}", reply.text());
        for name in [
            "server",
            "via",
            "location",
            "x-upstream",
            "content-location",
        ] {
            assert!(!reply.headers.contains_key(name), "{name} was passed on");
        }
        let everything = format!("{:?} {}", reply.headers, reply.text());
        assert!(
            !everything.contains(&addr.to_string()) && !everything.contains("127.0.0.1"),
            "the node's address reached the client: {everything}"
        );
        match status {
            400 => assert_eq!(
                reply.json()["error"]["message"],
                "model bad is not on [node] (host [node], [node])"
            ),
            302 => assert_eq!(reply.text(), "moved to [node]/v1/other"),
            500 | 503 => {
                assert!(!reply.headers.contains_key("content-encoding"));
                assert_eq!(reply.json()["error"]["code"], "upstream_error");
            }
            _ => {}
        }
    }
    server.abort();
    router.shutdown().await;
}

/// Streams one chat from a router over `node` (model `m`) with an idle timeout of `idle_ms`:
/// the events, how long the stream took, and the slots the node holds after it.
async fn stream_with_idle_timeout(
    node: SimConfig,
    idle_ms: u64,
) -> (Vec<(Duration, String)>, Duration, usize) {
    let node = SimNode::start(node).await.unwrap();
    let mut config = quick_config(&[("only", &node, &["m"], 2)]);
    config.proxy.idle_timeout_ms = idle_ms;
    config.health.failures_to_eject = 100;
    let router = start_full(config, StartOptions::default()).await;
    let url = format!("{}/v1/chat/completions", base(&router));
    let started = Instant::now();
    let response = post_streaming(&client(), &url, chat_body("m", true)).await;
    assert_eq!(response.status(), 200);
    let events = within(
        Duration::from_secs(5),
        "the stream ends",
        read_events(&mut response.into_body(), started),
    )
    .await;
    let elapsed = started.elapsed();
    let held = node_state(&router, "only").0;
    router.shutdown().await;
    (events, elapsed, held)
}

/// The idle timeout is a gap between tokens, not a limit on the stream: a stream whose tokens
/// keep coming runs to its end, however much longer than the timeout it lasts.
#[tokio::test]
async fn a_steady_stream_outlasts_the_idle_timeout() {
    let steady = SimConfig {
        tokens: 12,
        ttft_ms: 60,
        inter_token_ms: 60,
        ..quick_node(&["m"])
    };
    let (events, elapsed, held) = stream_with_idle_timeout(steady, 200).await;
    assert!(
        elapsed > Duration::from_millis(600),
        "the stream was meant to outlast the timeout: {elapsed:?}"
    );
    assert!(error_event(&events).is_none(), "{events:?}");
    assert!(events.len() >= 12, "{events:?}");
    assert_eq!(held, 0);
}

/// A stream whose node sends its head and then nothing times out after the idle timeout, with
/// no frame to start the clock: it runs from the first wait.
#[tokio::test]
async fn a_stream_silent_after_its_head_times_out() {
    let silent = SimConfig {
        ttft_ms: 5_000,
        ..quick_node(&["m"])
    };
    let (events, elapsed, held) = stream_with_idle_timeout(silent, 300).await;
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    assert_eq!(events.len(), 1, "only the error: {events:?}");
    let error = error_event(&events).expect("the stream ends with an error event");
    assert_eq!(error["code"], "upstream_timeout", "{error}");
    assert_eq!(held, 0);
}

/// A request retried on another node reaches it as the first node got it: the same path under
/// that node's base URL, the same headers and body, and each node's own key in place of the
/// client's; headers meant for one connection or for a proxy reach neither.
#[tokio::test]
async fn a_retried_request_reaches_the_next_node_as_the_first_got_it() {
    let (failing_url, failing_seen) = recording_node("a", 500).await;
    let (good_url, good_seen) = recording_node("b", 200).await;
    let mut config = quick_config(&[]);
    config.health.failures_to_eject = 1_000;
    config.proxy.retry_reserve = 100;
    for (id, url, key) in [
        ("failing", &failing_url, Some("key-a")),
        ("good", &good_url, None),
    ] {
        config.nodes.push(node_at(id, url, &["m"], key));
    }
    let router = start_full(config, StartOptions::default()).await;
    let url = format!("{}/v1/chat/completions", base(&router));
    let client = client();
    for i in 0..20 {
        let request = http::Request::post(&url)
            .header("content-type", "application/json")
            .header("authorization", "Bearer client-secret")
            .header("proxy-authorization", "Basic cHJveHk=")
            .header("te", "trailers")
            .header("x-request-id", format!("req-{i}"))
            .header("x-tag", "kept")
            .body(http_body_util::Full::new(bytes::Bytes::from(chat_body(
                "m", false,
            ))))
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), 200);
    }
    let failing = failing_seen.lock().unwrap().clone();
    let good = good_seen.lock().unwrap().clone();
    assert!(!failing.is_empty(), "the failing node was never tried");
    assert_eq!(good.len(), 20);
    for (path, headers, body) in &failing {
        let id = &headers["x-request-id"];
        let (good_path, good_headers, good_body) = good
            .iter()
            .find(|(_, h, _)| h["x-request-id"] == id)
            .unwrap_or_else(|| panic!("{id:?} failed and was not retried"));
        assert_eq!(path, "/a/v1/chat/completions");
        assert_eq!(good_path, "/b/v1/chat/completions");
        assert_eq!(body, good_body);
        assert_eq!(body, &chat_body("m", false));
        assert_eq!(headers["authorization"], "Bearer key-a");
        assert!(
            !good_headers.contains_key("authorization"),
            "{good_headers:?}"
        );
        for seen in [headers, good_headers] {
            assert_eq!(seen["x-tag"], "kept");
            assert_eq!(seen["content-type"], "application/json");
            for gone in ["proxy-authorization", "te"] {
                assert!(!seen.contains_key(gone), "{gone} reached a node: {seen:?}");
            }
        }
    }
    router.shutdown().await;
}
