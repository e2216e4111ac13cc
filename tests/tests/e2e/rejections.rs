//! Every rejection carries its status, `Retry-After` where a retry helps, and OpenAI's error
//! shape.

use std::time::Duration;

use layers::{AdmissionConfig, WaitConfig};
use llm_router_tests::*;
use router::{LayerKind, StackConfig};

fn assert_openai_error(reply: &Reply, status: u16, code: &str, retry_after: bool) {
    assert_eq!(reply.status, status, "{}", reply.text());
    assert_eq!(reply.headers["content-type"], "application/json");
    let json = reply.json();
    let error = &json["error"];
    assert_eq!(error["code"], code, "{json}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{json}"
    );
    assert!(error["type"].as_str().is_some(), "{json}");
    assert!(error.get("param").is_some(), "{json}");
    if retry_after {
        let secs: u64 = reply.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&secs), "Retry-After {secs}");
        let ms: u64 = reply.headers["retry-after-ms"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(ms > 0 && ms <= secs * 1000, "retry-after-ms {ms}");
    } else {
        assert!(reply.headers.get("retry-after").is_none());
    }
}

#[tokio::test]
async fn every_rejection_has_status_retry_after_and_an_openai_body() {
    let node = SimNode::start(SimConfig::instant(&["m"])).await.unwrap();
    let config = StackConfig {
        layers: LayerKind::ALL.to_vec(),
        admission: AdmissionConfig {
            accept_below: 0.5,
            reject_at: 0.8,
            max_delay: Duration::from_millis(10),
        },
        wait: WaitConfig {
            max_waiters: 1,
            wait_timeout: Duration::from_millis(100),
        },
        ..StackConfig::default()
    };
    let router = start_router(vec![spec("a", &node, &["m"], 10)], config).await;
    let client = client();
    let url = router.url("/v1/chat/completions");

    // Admission: 8 of 10 slots busy is utilization 0.8.
    let busy: Vec<_> = (0..8)
        .map(|_| router.pool().try_acquire_free(Some("m")).unwrap())
        .collect();
    let reply = post(&client, &url, chat_body("m", false)).await;
    assert_openai_error(&reply, 429, "overloaded", true);
    drop(busy);

    // Unknown model, missing model, bad JSON, body too large: no retry will help.
    assert_openai_error(
        &post(&client, &url, chat_body("nope", false)).await,
        404,
        "model_not_found",
        false,
    );
    assert_openai_error(
        &post(&client, &url, r#"{"messages":[]}"#.into()).await,
        400,
        "missing_model",
        false,
    );
    assert_openai_error(
        &post(&client, &url, r#"{"model": "#.into()).await,
        400,
        "invalid_request",
        false,
    );
    assert_openai_error(
        &post(&client, &url, r#"{"model": 7}"#.into()).await,
        400,
        "invalid_request",
        false,
    );
    let huge = format!(
        r#"{{"model":"m","pad":"{}"}}"#,
        "x".repeat(17 * 1024 * 1024)
    );
    assert_openai_error(
        &post(&client, &url, huge).await,
        413,
        "payload_too_large",
        false,
    );

    // Only the wait layer and the proxy from here, so admission does not answer first.
    let router = start_router(
        vec![spec("a", &node, &["m"], 1)],
        StackConfig {
            layers: vec![LayerKind::TimeoutWait],
            wait: WaitConfig {
                max_waiters: 1,
                wait_timeout: Duration::from_millis(100),
            },
            ..StackConfig::default()
        },
    )
    .await;
    let url = router.url("/v1/chat/completions");
    let busy = router.pool().try_acquire_free(Some("m")).unwrap();
    // Wait timeout: the only slot stays busy for longer than the wait.
    let reply = post(&client, &url, chat_body("m", false)).await;
    assert_openai_error(&reply, 503, "wait_timeout", true);
    // Queue full: one waiter is in line, the next is turned away.
    let first = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { post(&client, &url, chat_body("m", false)).await }
    });
    assert!(eventually(Duration::from_secs(2), || router.pool().waiting() == 1).await);
    assert_openai_error(
        &post(&client, &url, chat_body("m", false)).await,
        429,
        "queue_full",
        true,
    );
    assert_openai_error(&first.await.unwrap(), 503, "wait_timeout", true);
    drop(busy);

    // No node up for the model: 503 at once.
    router.pool().set_healthy("a", false);
    let reply = within(
        Duration::from_millis(90),
        "an answer with no node up",
        post(&client, &url, chat_body("m", false)),
    )
    .await;
    assert_openai_error(&reply, 503, "no_node_available", true);
}
