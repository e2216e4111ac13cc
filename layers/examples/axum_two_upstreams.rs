//! A team's own axum service that routes `/v1/*` through the layers to two upstreams, next to
//! its own routes.
//!
//! ```text
//! cargo run -p llm-router-layers --example axum_two_upstreams -- http://127.0.0.1:8001 http://127.0.0.1:8002
//! ```
//!
//! With no arguments it starts two simulated nodes itself. Then:
//!
//! ```text
//! curl -s localhost:3000/v1/chat/completions -H 'content-type: application/json' \
//!      -d '{"model":"sim-model","messages":[{"role":"user","content":"hi"}]}'
//! ```

use std::time::Duration;

use axum::Router;
use axum::routing::{get, post_service};
use layers::{
    AdmissionConfig, AdmissionLayer, CachedSelectLayer, ClientConfig, NodePool, NodeSpec,
    PooledProxyService, ProxyConfig, RequestInfoLayer, SelectConfig, TimeoutWaitLayer, WaitConfig,
    build_client,
};
use loadtest::{SimConfig, SimNode};
use tower::ServiceBuilder;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut upstreams: Vec<String> = std::env::args().skip(1).collect();
    let mut _sim_nodes = Vec::new();
    if upstreams.is_empty() {
        for _ in 0..2 {
            let node = SimNode::start(SimConfig::default()).await?;
            upstreams.push(node.url());
            _sim_nodes.push(node);
        }
    }

    // One pool shared by every layer; one HTTP client for the whole process.
    let pool =
        NodePool::from_specs(upstreams.iter().enumerate().map(|(i, url)| {
            NodeSpec::new(format!("upstream-{i}"), url.as_str()).max_concurrency(8)
        }))?;
    let client = build_client(&ClientConfig::default());

    let llm = ServiceBuilder::new()
        .layer(RequestInfoLayer::default())
        .layer(AdmissionLayer::new(
            pool.clone(),
            AdmissionConfig::default(),
        ))
        .layer(TimeoutWaitLayer::new(
            pool.clone(),
            WaitConfig {
                max_waiters: 512,
                wait_timeout: Duration::from_secs(20),
            },
        ))
        .layer(CachedSelectLayer::new(
            pool.clone(),
            SelectConfig::default(),
        ))
        .service(PooledProxyService::new(
            client,
            pool,
            ProxyConfig::default(),
        ));

    let app = Router::new()
        .route("/v1/{*path}", post_service(llm))
        .route("/hello", get(|| async { "the team's own route\n" }));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!(
        "listening on http://{}, routing to {upstreams:?}",
        listener.local_addr()?
    );
    axum::serve(listener, app).await?;
    Ok(())
}
