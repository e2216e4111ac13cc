//! Helpers for the end-to-end tests: start real routers and real simulated nodes on loopback, on
//! ports the OS picks, and talk to them over real HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use layers::{ClientConfig, NodePool, NodeSpec};
use router::{AppState, StackConfig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use loadtest::{Overflow, SimConfig, SimNode};

/// A router serving on 127.0.0.1, stopped when dropped.
pub struct TestRouter {
    pub addr: SocketAddr,
    pub state: AppState,
    task: JoinHandle<()>,
}

impl TestRouter {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pool(&self) -> &NodePool {
        &self.state.pool
    }

    /// In-flight count the router holds for the node with this id.
    pub fn in_flight(&self, node_id: &str) -> usize {
        self.pool()
            .snapshot()
            .node(node_id)
            .map_or(0, |n| n.state().in_flight())
    }
}

impl Drop for TestRouter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a router over `specs` with `config`, served as the router serves its clients: its
/// own HTTP/1 server, with inference requests on the raw path (HTTP/2 on hyper's).
pub async fn start_router(specs: Vec<NodeSpec>, config: StackConfig) -> TestRouter {
    let pool = NodePool::from_specs(specs).unwrap();
    let state = AppState::new(pool, &ClientConfig::default());
    let services = router::app::Services::bare(state.clone(), config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let listen = router::listen::ListenConfig {
        // On the test's runtime.
        workers: 0,
        ..router::listen::ListenConfig::default()
    };
    let task = tokio::spawn(router::listen::serve(
        listener,
        move || router::app::service(&services),
        listen,
        std::sync::Arc::default(),
        std::future::pending(),
        Duration::from_secs(1),
    ));
    TestRouter { addr, state, task }
}

/// [`start_router`] with the stack mounted in axum and served by `axum::serve`, as a team
/// composing the layers into its own axum app would: the `http::Request` path throughout.
pub async fn start_router_in_axum(specs: Vec<NodeSpec>, config: StackConfig) -> TestRouter {
    let pool = NodePool::from_specs(specs).unwrap();
    let state = AppState::new(pool, &ClientConfig::default());
    let app = router::app(state.clone(), &config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(router::nodelay(listener), app).await.unwrap();
    });
    TestRouter { addr, state, task }
}

/// A node spec for a running sim node.
pub fn spec(id: &str, node: &SimNode, models: &[&str], max_concurrency: usize) -> NodeSpec {
    NodeSpec::new(id, node.url())
        .models(models.iter().copied())
        .max_concurrency(max_concurrency)
}

/// A stack with only these layers, default settings otherwise.
pub fn stack(layers: &[router::LayerKind]) -> StackConfig {
    StackConfig {
        layers: layers.to_vec(),
        ..StackConfig::default()
    }
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

/// A plain HTTP client for the tests (its own pool, separate from the router's).
pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(usize::MAX)
        .build_http()
}

/// A chat request body.
pub fn chat_body(model: &str, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": "Say hello."}],
    })
    .to_string()
}

/// A chat request body carrying a tag in the `user` field.
pub fn tagged_chat_body(model: &str, tag: &str) -> String {
    serde_json::json!({
        "model": model,
        "user": tag,
        "messages": [{"role": "user", "content": "Say hello."}],
    })
    .to_string()
}

/// A whole answer.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends a POST with a JSON body and starts reading the answer.
pub async fn post_streaming(
    client: &TestClient,
    url: &str,
    body: String,
) -> http::Response<Incoming> {
    let request = Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    client.request(request).await.unwrap()
}

/// Sends a POST with a JSON body and reads the whole answer.
pub async fn post(client: &TestClient, url: &str, body: String) -> Reply {
    let response = post_streaming(client, url, body).await;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Polls `condition` until it holds or `timeout` passes; returns whether it held.
pub async fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs `f` with a deadline, failing the test with `what` if it passes.
pub async fn within<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {limit:?}"))
}

/// Reads an SSE body frame by frame, noting when each `data:` event arrived.
pub async fn read_events(body: &mut Incoming, started: Instant) -> Vec<(Duration, String)> {
    let mut events = Vec::new();
    let mut buffer = String::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        let Some(data) = frame.data_ref() else {
            continue;
        };
        buffer.push_str(&String::from_utf8_lossy(data));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            if let Some(payload) = event.trim().strip_prefix("data: ") {
                events.push((started.elapsed(), payload.to_owned()));
            }
        }
    }
    events
}

/// A whole router (registry, history, auth, admin API) from `config`, on 127.0.0.1 port 0.
pub async fn start_full(
    mut config: router::config::Config,
    options: router::server::StartOptions,
) -> router::server::Running {
    config.listen = "127.0.0.1:0".parse().unwrap();
    let listener = TcpListener::bind(config.listen).await.unwrap();
    router::server::start(config, listener, options)
        .await
        .unwrap()
}

/// A config with fast health checks, no history, and these static nodes.
pub fn quick_config(nodes: &[(&str, &SimNode, &[&str], usize)]) -> router::config::Config {
    let mut config = router::config::Config::default();
    config.history.enabled = false;
    config.health.interval_ms = 100;
    config.health.timeout_ms = 500;
    config.health.eject_base_ms = 200;
    config.health.eject_max_ms = 800;
    config.nodes = nodes
        .iter()
        .map(|(id, node, models, max)| router::config::NodeConfig {
            id: Some((*id).to_owned()),
            url: node.url(),
            models: Some(models.iter().map(|m| (*m).to_owned()).collect()),
            max_concurrency: *max,
            weight: 1,
            api_key: None,
        })
        .collect();
    config
}

/// A config node at `url` serving `models`, 4 slots, with the node's own `api_key` if any.
pub fn node_at(
    id: &str,
    url: &str,
    models: &[&str],
    api_key: Option<&str>,
) -> router::config::NodeConfig {
    router::config::NodeConfig {
        id: Some(id.to_owned()),
        url: url.to_owned(),
        models: Some(models.iter().map(|m| (*m).to_owned()).collect()),
        max_concurrency: 4,
        weight: 1,
        api_key: api_key.map(str::to_owned),
    }
}

/// Sends a request with a method, optional bearer token and optional JSON body.
pub async fn send(
    client: &TestClient,
    method: http::Method,
    url: &str,
    token: Option<&str>,
    body: Option<String>,
) -> Reply {
    let mut builder = Request::builder().method(method).uri(url);
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    if body.is_some() {
        builder = builder.header("content-type", "application/json");
    }
    let request = builder
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// A node that answers quickly: 3 tokens, 2 ms to the first and 1 ms between.
pub fn quick_node(models: &[&str]) -> SimConfig {
    SimConfig {
        models: models.iter().map(|m| (*m).to_owned()).collect(),
        ttft_ms: 2,
        inter_token_ms: 1,
        tokens: 3,
        ..SimConfig::default()
    }
}

/// A whole router with history at `db` (flushed every 20 ms) and the admin token `admin`, over
/// `nodes`, with `tweak` applied to its config last.
pub async fn start_with_history(
    db: &std::path::Path,
    nodes: &[(&str, &SimNode, &[&str], usize)],
    tweak: impl FnOnce(&mut router::config::Config),
) -> router::server::Running {
    let mut config = quick_config(nodes);
    config.history.enabled = true;
    config.history.path = db.to_owned();
    config.history.flush_interval_ms = 20;
    tweak(&mut config);
    start_full(
        config,
        router::server::StartOptions {
            admin_token: Some("admin".into()),
            ..router::server::StartOptions::default()
        },
    )
    .await
}

/// Every history row, oldest first, paging through `GET /api/logs` with the token `admin`.
pub async fn all_rows(client: &TestClient, base: &str) -> Vec<serde_json::Value> {
    let mut rows = Vec::new();
    let mut before: Option<i64> = None;
    loop {
        let mut url = format!("{base}/api/logs?limit=1000");
        if let Some(b) = before {
            url.push_str(&format!("&before_id={b}"));
        }
        let page = send(client, http::Method::GET, &url, Some("admin"), None).await;
        assert_eq!(page.status, 200, "{}", page.text());
        let page = page.json();
        rows.extend(page["logs"].as_array().unwrap().iter().cloned());
        match page["next_before_id"].as_i64() {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    rows.reverse();
    rows
}

/// The router's history rows after a flush, oldest first.
pub async fn flushed_rows(router: &router::server::Running) -> Vec<serde_json::Value> {
    router.services.history.flush().await;
    all_rows(&client(), &format!("http://{}", router.addr)).await
}

/// What a recording node saw of one POST: path, headers, body.
pub type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, http::HeaderMap, String)>>>;

/// A node under `/{prefix}` that records every POST and answers it with `status`; anything
/// else (its health checks) gets 200.
pub async fn recording_node(prefix: &str, status: u16) -> (String, Seen) {
    use axum::response::IntoResponse;
    let seen = Seen::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/{prefix}", listener.local_addr().unwrap());
    let record = seen.clone();
    let app = axum::Router::new().fallback(
        move |method: http::Method, uri: http::Uri, headers: http::HeaderMap, body: String| {
            let record = record.clone();
            async move {
                if method != http::Method::POST {
                    return "ok".into_response();
                }
                record
                    .lock()
                    .unwrap()
                    .push((uri.path().to_owned(), headers, body));
                let answer = serde_json::json!({"id": "x", "object": "chat.completion",
                    "model": "m", "choices": [{"index": 0, "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "hi"}}]});
                let status = http::StatusCode::from_u16(status).unwrap();
                (status, answer.to_string()).into_response()
            }
        },
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}
