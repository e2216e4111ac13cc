//! The floor for the shared bench: a proxy with this router's accept loop, connection workers
//! and upstream client, but no routing logic at all (no layers, history, metrics, keys or
//! request parsing; round robin over the nodes). Whatever the router costs above this is its
//! own work; whatever this costs above nginx is the HTTP stack's (`layers::serve_connection`,
//! tokio, the kernel).
//!
//! ```sh
//! cargo build --release -p llm-router --example floor_proxy
//! OURS_VERSION=floor OURS_CMD="$PWD/target/release/examples/floor_proxy 127.0.0.1:{PORT} {NODES}" \
//!     ../shared/bench/run.sh direct nginx ours
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use layers::{ClientConfig, HttpClient, build_client};
use router::listen::{ListenConfig, ViaHttp, serve};

#[derive(Clone)]
struct Floor {
    client: HttpClient,
    nodes: Arc<[String]>,
    next: Arc<AtomicUsize>,
}

async fn forward(State(floor): State<Floor>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(body) = body.collect().await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let node = &floor.nodes[floor.next.fetch_add(1, Ordering::Relaxed) % floor.nodes.len()];
    let mut upstream = http::Request::builder()
        .method(parts.method)
        .uri(format!("{node}{}", parts.uri.path()));
    for (name, value) in &parts.headers {
        if name != http::header::HOST {
            upstream = upstream.header(name, value);
        }
    }
    let Ok(upstream) = upstream.body(Full::new(body.to_bytes())) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    match floor.client.request(upstream).await {
        Ok(response) => response.map(Body::new),
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(nodes)) = (args.next(), args.next()) else {
        return Err("usage: floor_proxy LISTEN_ADDR NODE_URL[,NODE_URL...] [WORKERS]".into());
    };
    let mut listen_config = ListenConfig::default();
    if let Some(workers) = args.next() {
        listen_config.workers = workers.parse()?;
    }
    let nodes: Arc<[String]> = nodes.split(',').map(str::to_owned).collect();
    let next = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    let make_app = move || {
        // Each worker its own client, as the router does.
        let floor = Floor {
            client: build_client(&ClientConfig::default()),
            nodes: nodes.clone(),
            next: next.clone(),
        };
        // HTTP/1 requests reach it as `http::Request`s, converted from the server's raw ones.
        ViaHttp(Router::new().fallback(forward).with_state(floor))
    };
    serve(
        listener,
        make_app,
        listen_config,
        Arc::default(),
        std::future::pending(),
        Duration::from_secs(1),
    )
    .await;
    Ok(())
}
