//! Streams pass through unbuffered, and hold their node's slot until they end.

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use llm_router_tests::*;
use router::LayerKind;

fn paced(tokens: usize, gap_ms: u64) -> SimConfig {
    SimConfig {
        models: vec!["m".into()],
        ttft_ms: gap_ms,
        inter_token_ms: gap_ms,
        tokens,
        ..SimConfig::default()
    }
}

/// The node sends an event every 50 ms; the client sees the first one long before the end.
#[tokio::test]
async fn sse_passes_through_unbuffered() {
    sse_passes_through_unbuffered_when(false).await;
}

/// The same through the stack mounted in axum: the `http::Request` path.
#[tokio::test]
async fn sse_passes_through_unbuffered_in_an_axum_app() {
    sse_passes_through_unbuffered_when(true).await;
}

async fn sse_passes_through_unbuffered_when(in_axum: bool) {
    let node = SimNode::start(paced(8, 50)).await.unwrap();
    let specs = vec![spec("a", &node, &["m"], 4)];
    let router = if in_axum {
        start_router_in_axum(specs, stack(&LayerKind::ALL)).await
    } else {
        start_router(specs, stack(&LayerKind::ALL)).await
    };
    let started = Instant::now();
    let response = post_streaming(
        &client(),
        &router.url("/v1/chat/completions"),
        chat_body("m", true),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let events = read_events(&mut body, started).await;
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let first = events.first().unwrap().0;
    let last = events.last().unwrap().0;
    // 8 tokens 50 ms apart: the stream lasts about 400 ms.
    assert!(
        last >= Duration::from_millis(380),
        "stream ended after {last:?}"
    );
    assert!(
        first + Duration::from_millis(250) < last,
        "first event at {first:?}, last at {last:?}: the stream was buffered"
    );
    // Each token arrived on its own, not in one lump at the end.
    let token_times: Vec<Duration> = events.iter().take(8).map(|(t, _)| *t).collect();
    let spread = token_times[7] - token_times[0];
    assert!(
        spread >= Duration::from_millis(300),
        "tokens arrived within {spread:?}"
    );
}

/// Starts a node with `config` behind a router with every layer, opens a stream and reads its
/// first frame.
async fn open_stream(config: SimConfig) -> (SimNode, TestRouter, hyper::body::Incoming) {
    let node = SimNode::start(config).await.unwrap();
    let router = start_router(vec![spec("a", &node, &["m"], 4)], stack(&LayerKind::ALL)).await;
    let response = post_streaming(
        &client(),
        &router.url("/v1/chat/completions"),
        chat_body("m", true),
    )
    .await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();
    (node, router, body)
}

/// A stream counts as load on its node until the last byte, then gives the slot back.
#[tokio::test]
async fn a_stream_holds_its_slot_until_the_last_byte() {
    // Headers and the first event are here; the node is still generating.
    let (_node, router, mut body) = open_stream(paced(6, 60)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        router.in_flight("a"),
        1,
        "the stream's slot is held after the headers"
    );
    while let Some(frame) = body.frame().await {
        frame.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(1), || router.in_flight("a") == 0).await,
        "the slot is given back once the stream ends"
    );
}

/// A client that goes away mid-stream releases the slot, and the node's request is cancelled.
#[tokio::test]
async fn a_client_disconnect_mid_stream_releases_the_slot() {
    let (node, router, body) = open_stream(paced(100, 50)).await;
    assert_eq!(router.in_flight("a"), 1);
    assert_eq!(node.stats().in_flight(), 1);
    drop(body); // The client closes the connection, about 4.9 s before the stream would end.
    assert!(
        eventually(Duration::from_secs(2), || router.in_flight("a") == 0).await,
        "the router gives the slot back when the client leaves"
    );
    assert!(
        eventually(Duration::from_secs(2), || node.stats().in_flight() == 0).await,
        "the upstream request is cancelled too"
    );
    assert_eq!(node.stats().completed(), 0);
}
