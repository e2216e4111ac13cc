//! TimeoutWaitLayer over real HTTP: caps, FIFO and cancelled waiters.

use std::time::Duration;

use layers::WaitConfig;
use llm_router_tests::*;
use router::{LayerKind, StackConfig};

fn slow_node() -> SimConfig {
    SimConfig {
        models: vec!["m".into()],
        ttft_ms: 10,
        inter_token_ms: 0,
        tokens: 2,
        // No limit on the node itself: it must see any overload the router lets through.
        max_concurrency: 0,
        ..SimConfig::default()
    }
}

fn waiting_stack(max_waiters: usize, wait_timeout: Duration) -> StackConfig {
    StackConfig {
        layers: vec![LayerKind::TimeoutWait, LayerKind::CachedSelect],
        wait: WaitConfig {
            max_waiters,
            wait_timeout,
        },
        ..StackConfig::default()
    }
}

/// 1,000 concurrent requests, two nodes with max concurrency 4: no node ever holds more than 4,
/// every request completes, and waiters are served in the order they queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_waiters_never_overload_a_node_and_are_served_fifo() {
    let (a, b) = (
        SimNode::start(slow_node()).await.unwrap(),
        SimNode::start(slow_node()).await.unwrap(),
    );
    let router = start_router(
        vec![spec("a", &a, &["m"], 4), spec("b", &b, &["m"], 4)],
        waiting_stack(2_000, Duration::from_secs(120)),
    )
    .await;
    // Hold all 8 slots, so that every request queues, in the order we send them.
    let blockers: Vec<_> = (0..8)
        .map(|_| router.pool().try_acquire_free(Some("m")).unwrap())
        .collect();
    let client = client();
    const N: usize = 1_000;
    let mut tasks = Vec::with_capacity(N);
    for i in 0..N {
        let (client, url) = (client.clone(), router.url("/v1/chat/completions"));
        tasks.push(tokio::spawn(async move {
            post(&client, &url, tagged_chat_body("m", &i.to_string())).await
        }));
        let queued = eventually(Duration::from_secs(10), || router.pool().waiting() == i + 1).await;
        assert!(queued, "request {i} did not queue");
    }
    drop(blockers);
    for task in tasks {
        let reply = within(Duration::from_secs(60), "a queued request", task)
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let (sa, sb) = (a.stats().snapshot(), b.stats().snapshot());
    assert_eq!(
        sa.completed + sb.completed,
        N as u64,
        "every request completed"
    );
    assert!(
        sa.peak_in_flight <= 4 && sb.peak_in_flight <= 4,
        "{sa:?} {sb:?}"
    );
    assert_eq!(
        sa.peak_in_flight.max(sb.peak_in_flight),
        4,
        "the nodes were saturated"
    );

    // Merge the two nodes' arrival logs by dispatch order: slots are handed out one release at
    // a time, so a request can arrive at most a few places away from its queue position (two
    // releases on two nodes may race on the wire). Anything else is not FIFO.
    let mut order: Vec<usize> = Vec::with_capacity(N);
    let (la, lb) = (a.stats().arrivals(), b.stats().arrivals());
    order.extend(la.iter().map(|t| t.parse::<usize>().unwrap()));
    order.extend(lb.iter().map(|t| t.parse::<usize>().unwrap()));
    assert_eq!(order.len(), N);
    for log in [&la, &lb] {
        let ids: Vec<usize> = log.iter().map(|t| t.parse().unwrap()).collect();
        let inversions = ids.windows(2).filter(|w| w[0] > w[1]).count();
        let worst = ids
            .windows(2)
            .map(|w| w[0].saturating_sub(w[1]))
            .max()
            .unwrap_or(0);
        assert!(
            worst <= 8,
            "a request overtook {worst} earlier ones on one node ({inversions} inversions): not FIFO"
        );
    }
}

/// A waiter whose client goes away leaves the line and never takes a slot.
#[tokio::test]
async fn a_waiter_whose_client_leaves_takes_no_slot() {
    let node = SimNode::start(slow_node()).await.unwrap();
    let router = start_router(
        vec![spec("a", &node, &["m"], 1)],
        waiting_stack(16, Duration::from_secs(60)),
    )
    .await;
    let blocker = router.pool().try_acquire_free(Some("m")).unwrap();
    let client = client();
    let url = router.url("/v1/chat/completions");
    let waiter = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { post(&client, &url, chat_body("m", false)).await }
    });
    assert!(eventually(Duration::from_secs(5), || router.pool().waiting() == 1).await);
    waiter.abort(); // The client gives up: its connection closes.
    assert!(
        eventually(Duration::from_secs(5), || router.pool().waiting() == 0).await,
        "the gone waiter left the line"
    );
    drop(blocker);
    assert_eq!(router.in_flight("a"), 0, "the freed slot went to nobody");
    assert_eq!(
        node.stats().requests(),
        0,
        "the gone waiter never reached the node"
    );
    let reply = post(&client, &url, chat_body("m", false)).await;
    assert_eq!(reply.status, 200, "the next request gets the slot");
}
