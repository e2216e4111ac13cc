//! CachedSelectLayer under concurrent load.

use std::time::Duration;

use llm_router_tests::*;
use router::LayerKind;

fn node() -> SimConfig {
    SimConfig {
        models: vec!["m".into()],
        ttft_ms: 20,
        inter_token_ms: 2,
        tokens: 4,
        ..SimConfig::default()
    }
}

/// Capacities 8, 4 and 4, 16 clients in a closed loop: requests spread in proportion to
/// capacity and no node gets piled on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_spreads_in_proportion_to_capacity() {
    let (big, small1, small2) = (
        SimNode::start(node()).await.unwrap(),
        SimNode::start(node()).await.unwrap(),
        SimNode::start(node()).await.unwrap(),
    );
    let router = start_router(
        vec![
            spec("big", &big, &["m"], 8),
            spec("small1", &small1, &["m"], 4),
            spec("small2", &small2, &["m"], 4),
        ],
        stack(&[LayerKind::CachedSelect]),
    )
    .await;
    let client = client();
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (client, url) = (client.clone(), router.url("/v1/chat/completions"));
        workers.push(tokio::spawn(async move {
            for _ in 0..15 {
                let reply = post(&client, &url, chat_body("m", false)).await;
                assert_eq!(reply.status, 200);
            }
        }));
    }
    for w in workers {
        within(Duration::from_secs(30), "closed loop", w)
            .await
            .unwrap();
    }
    let counts = [
        big.stats().requests(),
        small1.stats().requests(),
        small2.stats().requests(),
    ];
    let total: u64 = counts.iter().sum();
    assert_eq!(total, 16 * 15);
    let big_share = counts[0] as f64 / total as f64;
    assert!(
        (0.38..=0.62).contains(&big_share),
        "the node with half the capacity got {big_share:.2} of requests ({counts:?})"
    );
    for (name, n) in [("small1", &small1), ("small2", &small2)] {
        assert!(
            n.stats().peak_in_flight() <= 5,
            "{name} peaked at {} with capacity 4",
            n.stats().peak_in_flight()
        );
    }
    assert!(
        big.stats().peak_in_flight() <= 9,
        "big peaked at {}",
        big.stats().peak_in_flight()
    );
}
