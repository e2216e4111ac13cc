//! The axum application: OpenAI routes, health.

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::routing::{get, post_service};
use axum::serve::{ListenerExt, TapIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::stack::{StackConfig, request_service};
use crate::state::AppState;

/// The router's HTTP application.
///
/// - POST `/v1/*` (chat completions, completions, embeddings, and any other body with a
///   `model`): through the configured layers to a node.
/// - GET `/v1/models`: the models of the nodes that may take requests, in OpenAI's list shape.
/// - GET `/health`: 200 while the process runs.
pub fn app(state: AppState, config: &StackConfig) -> Router {
    let inference = request_service(&state, config);
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/{*path}", post_service(inference))
        .route("/health", get(|| async { "ok" }))
        .with_state(state)
}

async fn models(State(state): State<AppState>) -> Json<Value> {
    let snapshot = state.pool.snapshot();
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
