//! The layers work in any order, alone or together.

use std::time::Duration;

use layers::WaitConfig;
use llm_router_tests::*;
use router::{LayerKind, StackConfig};

fn permutations(items: &[LayerKind]) -> Vec<Vec<LayerKind>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut out = Vec::new();
    for (i, first) in items.iter().enumerate() {
        let mut rest = items.to_vec();
        rest.remove(i);
        for mut tail in permutations(&rest) {
            tail.insert(0, *first);
            out.push(tail);
        }
    }
    out
}

fn all_stacks() -> Vec<Vec<LayerKind>> {
    let mut stacks = vec![vec![]];
    for size in 1..=3 {
        for p in permutations(&LayerKind::ALL) {
            let prefix: Vec<LayerKind> = p[..size].to_vec();
            if !stacks.contains(&prefix) {
                stacks.push(prefix);
            }
        }
    }
    stacks
}

/// Every subset of the layers in every order: 12 concurrent requests against two nodes of
/// max concurrency 2 each. Each request gets a 200 or an OpenAI-shaped 429/503, never a
/// router failure, and with `timeout_wait` anywhere in the stack no node exceeds its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_order_of_the_layers_serves_requests() {
    let stacks = all_stacks();
    assert_eq!(stacks.len(), 16, "1 empty + 3 single + 6 pairs + 6 triples");
    for layers in stacks {
        let config = || SimConfig {
            models: vec!["m".into()],
            ttft_ms: 15,
            inter_token_ms: 1,
            tokens: 3,
            ..SimConfig::default()
        };
        let (a, b) = (
            SimNode::start(config()).await.unwrap(),
            SimNode::start(config()).await.unwrap(),
        );
        let router = start_router(
            vec![spec("a", &a, &["m"], 2), spec("b", &b, &["m"], 2)],
            StackConfig {
                layers: layers.clone(),
                wait: WaitConfig {
                    max_waiters: 64,
                    wait_timeout: Duration::from_secs(10),
                },
                ..StackConfig::default()
            },
        )
        .await;
        let client = client();
        let mut tasks = Vec::new();
        for i in 0..12 {
            let (client, url) = (client.clone(), router.url("/v1/chat/completions"));
            tasks.push(tokio::spawn(async move {
                post(&client, &url, chat_body("m", i % 2 == 0)).await
            }));
        }
        let mut ok = 0;
        for task in tasks {
            let reply = within(Duration::from_secs(20), "a request", task)
                .await
                .unwrap();
            match reply.status.as_u16() {
                200 => ok += 1,
                429 | 503 => assert!(
                    reply.json()["error"]["code"].is_string(),
                    "{layers:?}: {}",
                    reply.text()
                ),
                other => panic!("{layers:?}: status {other}: {}", reply.text()),
            }
        }
        assert!(ok > 0, "{layers:?}: nothing got through");
        if layers.contains(&LayerKind::TimeoutWait) {
            let peaks = (a.stats().peak_in_flight(), b.stats().peak_in_flight());
            assert!(
                peaks.0 <= 2 && peaks.1 <= 2,
                "{layers:?}: node peaks {peaks:?}"
            );
        }
        assert!(
            eventually(Duration::from_secs(2), || router.in_flight("a")
                + router.in_flight("b")
                == 0)
            .await,
            "{layers:?}: slots leaked"
        );
    }
}
