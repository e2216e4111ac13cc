//! The HTTP application: OpenAI routes, the admin API, health, readiness and metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post_service};
use axum::serve::{ListenerExt, TapIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tower::Layer;

use crate::auth::{Credentials, require_api_key};
use crate::config::Config;
use crate::history::History;
use crate::listen::ListenCounters;
use crate::metrics::{Metrics, Sources};
use crate::record::{Recorder, RequestIds};
use crate::registry::Registry;
use crate::reload::Reloader;
use crate::stack::{StackConfig, request_service, retry_budget};
use crate::state::AppState;
use layers::RetryBudget;

/// Everything the routes share.
#[derive(Debug, Clone)]
pub struct Services {
    /// The pool and the shared client.
    pub state: AppState,
    /// The layer stack's settings.
    pub stack: StackConfig,
    /// Keys and tokens.
    pub credentials: Arc<Credentials>,
    /// The node registry.
    pub registry: Arc<Registry>,
    /// The request history.
    pub history: History,
    /// Request metrics.
    pub metrics: Arc<Metrics>,
    /// Set once shutdown starts: `/ready` answers 503.
    pub shutting_down: Arc<AtomicBool>,
    /// Client connection counters.
    pub connections: Arc<ListenCounters>,
    /// Config reloads.
    pub reloader: Arc<Reloader>,
    /// Retries, shared by the stacks of every connection worker.
    pub retry_budget: Arc<RetryBudget>,
}

impl Services {
    /// Services over `state` with no history, no keys and an empty registry (nodes are whatever
    /// the pool already holds): the layer stack and nothing else. For tests of the layers.
    pub fn bare(state: AppState, stack: StackConfig) -> Self {
        let registry = Arc::new(Registry::new(state.pool.clone(), Default::default()));
        let reloader = Arc::new(Reloader::new(None, Config::default(), registry.clone()));
        Self {
            retry_budget: retry_budget(&stack),
            state,
            stack,
            credentials: Arc::default(),
            registry,
            history: History::disabled(),
            metrics: Arc::default(),
            connections: Arc::default(),
            reloader,
            shutting_down: Arc::default(),
        }
    }
}

/// The inference routes over `state` with the given stack and nothing else.
pub fn app(state: AppState, stack: &StackConfig) -> Router {
    router(&Services::bare(state, stack.clone()))
}

/// The router's HTTP application.
///
/// - POST `/v1/*` (chat completions, completions, embeddings, and any other body with a
///   `model`): API key check, request id and history, then the configured layers to a node.
/// - GET `/v1/models`: the models of the nodes that may take requests, in OpenAI's list shape.
/// - `/api/*`: the admin API (see `specs/SPEC-35375000/admin-api.md`).
/// - GET `/health` (the process is up), `/ready` (a node can take requests), `/metrics`.
pub fn router(services: &Services) -> Router {
    let recorder = Recorder {
        history: services.history.clone(),
        metrics: services.metrics.clone(),
        pool: services.state.pool.clone(),
        ids: Arc::new(RequestIds::default()),
    };
    let inference = recorder.layer(request_service(
        &services.state,
        &services.stack,
        services.retry_budget.clone(),
    ));
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/{*path}", post_service(inference))
        .layer(from_fn_with_state(
            services.credentials.clone(),
            require_api_key,
        ))
        .with_state(services.clone());
    Router::new()
        .merge(v1)
        .merge(crate::admin::routes(services.clone()))
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(services.clone())
}

async fn models(State(services): State<Services>) -> Json<Value> {
    let snapshot = services.state.pool.snapshot();
    let mut ids: Vec<&str> = snapshot
        .nodes()
        .iter()
        .filter(|n| n.is_eligible())
        .flat_map(|n| n.models().iter().map(|m| &**m))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let data: Vec<Value> = ids
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "llm-router"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn ready(State(services): State<Services>) -> Response {
    let shutting_down = services.shutting_down.load(Ordering::Relaxed);
    let nodes_up = services
        .state
        .pool
        .snapshot()
        .nodes()
        .iter()
        .filter(|n| n.is_eligible())
        .count();
    let status = if shutting_down || nodes_up == 0 {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let body = json!({"ready": status == StatusCode::OK, "nodes_up": nodes_up, "shutting_down": shutting_down});
    (status, Json(body)).into_response()
}

async fn metrics(State(services): State<Services>) -> Response {
    let text = services.metrics.render(&Sources {
        pool: &services.state.pool,
        admission: &services.state.admission,
        history_written: services.history.written(),
        history_dropped: services.history.dropped(),
        connections_refused: services.connections.refused.load(Ordering::Relaxed),
    });
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The listener with TCP no-delay on every accepted connection. Off by default in axum; small
/// SSE events would otherwise wait on Nagle's algorithm and delayed ACKs.
pub fn nodelay(listener: TcpListener) -> TapIo<TcpListener, fn(&mut tokio::net::TcpStream)> {
    fn set(stream: &mut tokio::net::TcpStream) {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY on an accepted connection");
        }
    }
    listener.tap_io(set as fn(&mut tokio::net::TcpStream))
}
