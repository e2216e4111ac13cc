//! The shared client reuses connections to nodes.

use llm_router_tests::*;
use router::LayerKind;

/// N sequential proxied requests reach the node over one TCP connection, counted by the node.
#[tokio::test]
async fn test_http_client_connection_pooling() {
    let node = SimNode::start(SimConfig::instant(&["m"])).await.unwrap();
    let router = start_router(vec![spec("a", &node, &["m"], 8)], stack(&LayerKind::ALL)).await;
    let client = client();
    const N: u64 = 50;
    for _ in 0..N {
        let reply = post(
            &client,
            &router.url("/v1/chat/completions"),
            chat_body("m", false),
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(node.stats().requests(), N);
    assert_eq!(
        node.stats().connections(),
        1,
        "{N} sequential requests should share one pooled connection"
    );
}
