//! The admin API, `/api/*`: nodes, models, history. The contract, with its JSON shapes, is
//! `specs/SPEC-35375000/admin-api.md`.
//!
//! Every endpoint needs the admin token, except node registration (the registration secret also
//! works) and heartbeats (the node's own token). Errors are OpenAI-shaped.

use std::collections::BTreeMap;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use layers::NodeSpec;
use serde::Deserialize;
use serde_json::json;

use crate::app::Services;
use crate::auth::{bearer, deny_unless_admin, new_token, unauthorized};
use crate::history::{HistoryError, LogQuery, StatsQuery};
use crate::registry::{NodeSource, RegistryError};
use crate::reload::ReloadError;

/// The `/api` routes.
pub fn routes(services: Services) -> Router<Services> {
    Router::new()
        .route("/api/nodes", get(list_nodes).post(add_node))
        .route("/api/nodes/{id}", axum::routing::delete(remove_node))
        .route("/api/nodes/{id}/drain", post(drain))
        .route("/api/nodes/{id}/undrain", post(undrain))
        .route("/api/nodes/{id}/heartbeat", post(heartbeat))
        .route("/api/models", get(models))
        .route("/api/logs", get(logs))
        .route("/api/stats", get(stats))
        .route("/api/config/reload", post(reload))
        .with_state(services)
}

/// An OpenAI-shaped error.
fn api_error(status: StatusCode, message: impl std::fmt::Display, code: &str) -> Response {
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    let body = json!({"error": {"message": message.to_string(), "type": kind, "param": null, "code": code}});
    (status, Json(body)).into_response()
}

/// POST `/api/config/reload`: 200 with what changed, or 400 naming what is wrong with the file
/// (the running config stays).
async fn reload(State(s): State<Services>, headers: HeaderMap) -> Response {
    if let Some(denied) = deny_unless_admin(&s.credentials, &headers) {
        return denied;
    }
    match s.reloader.reload().await {
        Ok(report) => Json(report).into_response(),
        Err(error @ ReloadError::NoFile) => {
            api_error(StatusCode::CONFLICT, error, "no_config_file")
        }
        Err(error @ ReloadError::Invalid(_)) => {
            api_error(StatusCode::BAD_REQUEST, error, "invalid_config")
        }
        Err(error @ ReloadError::Nodes(_)) => {
            api_error(StatusCode::CONFLICT, error, "invalid_config")
        }
    }
}

fn registry_error(error: RegistryError) -> Response {
    let (status, code) = match &error {
        RegistryError::UnknownNode(_) => (StatusCode::NOT_FOUND, "node_not_found"),
        RegistryError::Conflict(_) => (StatusCode::CONFLICT, "node_exists"),
        RegistryError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_node"),
        RegistryError::BadToken => (StatusCode::UNAUTHORIZED, "invalid_node_token"),
    };
    api_error(status, error, code)
}

fn history_error(error: HistoryError) -> Response {
    match error {
        HistoryError::BadQuery(message) => {
            api_error(StatusCode::BAD_REQUEST, message, "invalid_query")
        }
        HistoryError::Unavailable => api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the request history is not available",
            "history_unavailable",
        ),
        other => {
            tracing::warn!(error = %other, "history query failed");
            api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the request history query failed",
                "history_unavailable",
            )
        }
    }
}

async fn list_nodes(State(s): State<Services>, headers: HeaderMap) -> Response {
    if let Some(denied) = deny_unless_admin(&s.credentials, &headers) {
        return denied;
    }
    Json(json!({"nodes": s.registry.list()})).into_response()
}

/// Body of `POST /api/nodes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewNode {
    url: String,
    id: Option<String>,
    models: Option<Vec<String>>,
    max_concurrency: Option<usize>,
    weight: Option<u32>,
    api_key: Option<String>,
}

async fn add_node(
    State(s): State<Services>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let source = if s.credentials.is_admin(&headers) {
        NodeSource::Admin
    } else if s.credentials.is_registration(&headers) {
        NodeSource::Registered
    } else {
        return unauthorized(
            "registering a node needs the registration secret or the admin token",
            "invalid_registration_secret",
        );
    };
    let new: NewNode = match serde_json::from_slice(&body) {
        Ok(n) => n,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                format!("invalid node: {e}"),
                "invalid_node",
            );
        }
    };
    let token = match new_token() {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "no randomness for a node token");
            return api_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot make a node token",
                "internal_error",
            );
        }
    };
    let id = new.id.unwrap_or_else(|| format!("node-{}", &token[..8]));
    let mut spec = NodeSpec::new(id.clone(), new.url);
    spec.models = new.models.unwrap_or_default();
    spec.max_concurrency = new.max_concurrency.unwrap_or(spec.max_concurrency);
    spec.weight = new.weight.unwrap_or(spec.weight);
    spec.api_key = new.api_key;
    if let Err(e) = s.registry.add(spec, source, Some(&token)).await {
        return registry_error(e);
    }
    let body = json!({"node_id": id, "token": token, "heartbeat_interval_ms": s.registry.config().heartbeat_interval_ms});
    (StatusCode::CREATED, Json(body)).into_response()
}

async fn remove_node(
    State(s): State<Services>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(denied) = deny_unless_admin(&s.credentials, &headers) {
        return denied;
    }
    match s.registry.remove(&id) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => registry_error(e),
    }
}

async fn set_draining(s: Services, headers: HeaderMap, id: String, draining: bool) -> Response {
    if let Some(denied) = deny_unless_admin(&s.credentials, &headers) {
        return denied;
    }
    match s.registry.set_draining(&id, draining) {
        Ok(()) => Json(json!({"node_id": id, "draining": draining})).into_response(),
        Err(e) => registry_error(e),
    }
}

async fn drain(State(s): State<Services>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    set_draining(s, headers, id, true).await
}

async fn undrain(
    State(s): State<Services>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    set_draining(s, headers, id, false).await
}

async fn heartbeat(
    State(s): State<Services>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let Some(token) = bearer(&headers) else {
        return unauthorized("a heartbeat needs the node's token", "invalid_node_token");
    };
    match s.registry.heartbeat(&id, token) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        // An unknown id and a wrong token answer alike, so ids cannot be probed with a token.
        Err(RegistryError::UnknownNode(_) | RegistryError::BadToken) => {
            unauthorized("invalid node token", "invalid_node_token")
        }
        Err(e) => registry_error(e),
    }
}

async fn models(State(s): State<Services>, headers: HeaderMap) -> Response {
    if let Some(denied) = deny_unless_admin(&s.credentials, &headers) {
        return denied;
    }
    let mut by_model: BTreeMap<String, (Vec<String>, bool)> = BTreeMap::new();
    for node in s.state.pool.snapshot().nodes() {
        for model in node.models() {
            let entry = by_model.entry(model.to_string()).or_default();
            entry.0.push(node.id().to_owned());
            entry.1 |= node.is_eligible();
        }
    }
    let models: Vec<_> = by_model
        .into_iter()
        .map(|(id, (nodes, available))| json!({"id": id, "nodes": nodes, "available": available}))
        .collect();
    Json(json!({"models": models})).into_response()
}

async fn logs(
    State(s): State<Services>,
    headers: HeaderMap,
    query: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Some(denied) = deny_unless_admin(&s.credentials, &headers) {
        return denied;
    }
    let Query(query) = match query {
        Ok(q) => q,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, e.body_text(), "invalid_query"),
    };
    match s.history.logs(&query).await {
        Ok(page) => Json(page).into_response(),
        Err(e) => history_error(e),
    }
}

async fn stats(
    State(s): State<Services>,
    headers: HeaderMap,
    query: Result<Query<StatsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Some(denied) = deny_unless_admin(&s.credentials, &headers) {
        return denied;
    }
    let Query(query) = match query {
        Ok(q) => q,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, e.body_text(), "invalid_query"),
    };
    match s.history.stats(&query).await {
        Ok(stats) => Json(stats).into_response(),
        Err(e) => history_error(e),
    }
}
