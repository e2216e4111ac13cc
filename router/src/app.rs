//! The HTTP application: OpenAI routes, the admin API, health, readiness and metrics.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::future::RouteFuture;
use axum::routing::{get, post_service};
use axum::serve::{ListenerExt, TapIo};
use bytes::Bytes;
use http::{Method, Request};
use pin_project_lite::pin_project;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tower::Layer;
use tower::Service;

use crate::auth::{Credentials, check_api_key, check_api_key_raw, require_api_key};
use crate::config::Config;
use crate::history::History;
use crate::listen::ListenCounters;
use crate::metrics::{Metrics, Sources};
use crate::record::{Recorded, Recorder, RequestIds};
use crate::registry::Registry;
use crate::reload::Reloader;
use crate::stack::{
    SharedService, StackConfig, StackLayers, raw_request_service, request_service, retry_budget,
};
use crate::state::AppState;
use layers::{ProxyBody, RawRequest, RawResponse, RetryBudget};

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
    /// Request ids, shared by every connection worker so that they stay unique.
    pub request_ids: Arc<RequestIds>,
}

impl Services {
    /// Services over `state` with no history, no keys and an empty registry (nodes are whatever
    /// the pool already holds): the layer stack and nothing else. For tests of the layers.
    pub fn bare(state: AppState, stack: StackConfig) -> Self {
        let registry = Arc::new(Registry::new(state.pool.clone(), Default::default()));
        let reloader = Arc::new(Reloader::new(None, Config::default(), registry.clone()));
        Self {
            retry_budget: retry_budget(&stack),
            request_ids: Arc::default(),
            state,
            stack,
            credentials: Arc::default(),
            registry,
            history: History::turned_off(),
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
    let layers = StackLayers::new(&services.state, &services.stack);
    routes(services, inference(services, &layers))
}

/// The `/v1` request path: request id, history and metrics around the configured stack.
fn inference(services: &Services, layers: &StackLayers) -> Inference {
    recorder(services).layer(request_service(
        &services.state,
        &services.stack,
        layers,
        services.retry_budget.clone(),
    ))
}

/// [`inference`] for HTTP/1 clients' requests as they came.
fn raw_inference(services: &Services, layers: &StackLayers) -> RawInference {
    recorder(services).layer(raw_request_service(
        &services.state,
        &services.stack,
        layers,
        services.retry_budget.clone(),
    ))
}

fn recorder(services: &Services) -> Recorder {
    Recorder {
        history: services.history.clone(),
        metrics: services.metrics.clone(),
        pool: services.state.pool.clone(),
        ids: services.request_ids.clone(),
    }
}

type Inference = Recorded<SharedService<Request<Body>, Response<Body>>>;
type RawInference = Recorded<SharedService<RawRequest, RawResponse<ProxyBody>>>;

fn routes(services: &Services, inference: Inference) -> Router {
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

/// The router's HTTP service, as served: [`router`]'s routes, with the inference requests
/// (`POST /v1/*` but `/v1/models`) sent straight to the request path after the API key check.
///
/// It answers exactly as [`router`] does. Going around axum's routing on the hot path saves
/// about a dozen allocations per request: axum boxes a clone of the route's service and of the
/// middleware for every request, and boxes their futures.
///
/// It also takes the [`RawRequest`]s of HTTP/1 clients: inference requests stay raw down to
/// the node (no `HeaderMap` is built for them), the rest become `http::Request`s for axum.
pub fn service(services: &Services) -> AppService {
    // One set of layers for both stacks: one ranking cache.
    let layers = StackLayers::new(&services.state, &services.stack);
    let inference = inference(services, &layers);
    AppService {
        routes: routes(services, inference.clone()),
        inference,
        raw_inference: raw_inference(services, &layers),
        credentials: services.credentials.clone(),
    }
}

/// See [`service`].
#[derive(Debug, Clone)]
pub struct AppService {
    inference: Inference,
    raw_inference: RawInference,
    credentials: Arc<Credentials>,
    routes: Router,
}

/// `POST /v1/{*path}` in axum's terms, less the static `/v1/models` (which is GET only).
fn is_inference(method: &Method, path: &[u8]) -> bool {
    method == Method::POST
        && path.len() > b"/v1/".len()
        && path.starts_with(b"/v1/")
        && path != b"/v1/models"
}

impl<B> Service<Request<B>> for AppService
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = AppFuture<<Inference as Service<Request<Body>>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        ready!(self.inference.poll_ready(cx))?;
        <Router as Service<Request<B>>>::poll_ready(&mut self.routes, cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if !is_inference(request.method(), request.uri().path().as_bytes()) {
            return AppFutureKind::Routes {
                future: Box::pin(self.routes.call(request)),
            }
            .into();
        }
        let mut request = request.map(Body::new);
        match check_api_key(&self.credentials, &mut request) {
            Ok(()) => AppFutureKind::Inference {
                future: self.inference.call(request),
            },
            Err(refused) => AppFutureKind::Answered {
                response: Some(refused),
            },
        }
        .into()
    }
}

/// An HTTP/1 client's request, answered with the header lines the server writes as they are:
/// an inference answer keeps the node's lines, axum's answers are written out into lines.
impl Service<RawRequest> for AppService {
    type Response = RawResponse<Body>;
    type Error = Infallible;
    type Future = AppFuture<<RawInference as Service<RawRequest>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        ready!(Service::<RawRequest>::poll_ready(
            &mut self.raw_inference,
            cx
        ))?;
        <Router as Service<Request<Body>>>::poll_ready(&mut self.routes, cx)
    }

    fn call(&mut self, mut request: RawRequest) -> Self::Future {
        if !is_inference(request.method(), request.path_bytes()) {
            return match request.into_http() {
                Ok(request) => AppFutureKind::Routes {
                    future: Box::pin(self.routes.call(request.map(Body::new))),
                },
                Err(error) => AppFutureKind::Answered {
                    response: Some(Box::new(error.into_response())),
                },
            }
            .into();
        }
        match check_api_key_raw(&self.credentials, &mut request) {
            Ok(()) => AppFutureKind::Inference {
                future: self.raw_inference.call(request),
            },
            Err(refused) => AppFutureKind::Answered {
                response: Some(refused),
            },
        }
        .into()
    }
}

pin_project! {
    /// Response future of [`AppService`], over `F`, the inference path's future: it answers
    /// with axum's `Response<Body>` for an `http::Request`, a [`RawResponse<Body>`] for a
    /// [`RawRequest`].
    pub struct AppFuture<F> {
        #[pin]
        kind: AppFutureKind<F>,
    }
}

pin_project! {
    #[project = AppFutureProj]
    enum AppFutureKind<F> {
        // Through the inference path.
        Inference { #[pin] future: F },
        // Through axum's routes. Boxed, as is a refusal: this future moves into the server's
        // connection loop with every request, and these are the rare ones.
        Routes { future: Pin<Box<RouteFuture<Infallible>>> },
        // Refused before the path.
        Answered { response: Option<Box<Response>> },
    }
}

impl<F> From<AppFutureKind<F>> for AppFuture<F> {
    fn from(kind: AppFutureKind<F>) -> Self {
        Self { kind }
    }
}

/// What [`AppService`] answers with: axum's `Response<Body>`, or a [`RawResponse<Body>`] for
/// an HTTP/1 client's [`RawRequest`], into which axum's answers are written.
pub trait AppAnswer: Sized {
    /// One of axum's answers, as this type.
    fn from_axum(response: Response) -> Self;
}

impl AppAnswer for Response {
    fn from_axum(response: Response) -> Self {
        response
    }
}

impl AppAnswer for RawResponse<Body> {
    fn from_axum(response: Response) -> Self {
        RawResponse::from_http(response)
    }
}

impl<F, A> Future for AppFuture<F>
where
    F: Future<Output = Result<A, Infallible>>,
    A: AppAnswer,
{
    type Output = Result<A, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            AppFutureProj::Inference { future } => future.poll(cx),
            AppFutureProj::Routes { future } => future.as_mut().poll(cx).map_ok(A::from_axum),
            AppFutureProj::Answered { response } => Poll::Ready(Ok(A::from_axum(
                response
                    .take()
                    .map_or_else(|| StatusCode::INTERNAL_SERVER_ERROR.into_response(), |r| *r),
            ))),
        }
    }
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

#[cfg(test)]
mod tests {
    use http::header::AUTHORIZATION;
    use layers::{NodePool, NodeSpec};
    use loadtest::{SimConfig, SimNode};
    use tower::ServiceExt;

    use super::*;
    use crate::config::{ApiKeyConfig, AuthConfig};

    /// The served service and axum's router, over the same services.
    async fn both() -> (AppService, Router, SimNode, Services) {
        let node = SimNode::start(SimConfig::instant(&["m"])).await.unwrap();
        let pool = NodePool::from_specs([NodeSpec::new("a", node.url()).models(["m"])]).unwrap();
        let state = AppState::new(pool, &layers::ClientConfig::default());
        let mut services = Services::bare(state, StackConfig::default());
        let auth = AuthConfig {
            api_keys: vec![ApiKeyConfig {
                id: "team".into(),
                sha256: crate::auth::hash_hex("sk-good"),
            }],
            ..AuthConfig::default()
        };
        services.credentials = Arc::new(Credentials::from_config(&auth, None, None));
        (service(&services), router(&services), node, services)
    }

    async fn answer<S>(app: S, method: Method, path: &str, key: Option<&str>) -> (u16, String)
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(key) = key {
            request = request.header(AUTHORIZATION, format!("Bearer {key}"));
        }
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"input":"hi"}"#;
        let response = app
            .oneshot(request.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        // Ids and timestamps differ between two answers; the error code does not.
        let code = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
            .unwrap_or_default();
        (status, code)
    }

    #[tokio::test]
    async fn the_served_service_answers_as_the_router_does() {
        let (served, routes, node, services) = both().await;
        let cases = [
            (Method::POST, "/v1/chat/completions", Some("sk-good"), 200),
            (Method::POST, "/v1/chat/completions", None, 401),
            (Method::POST, "/v1/chat/completions", Some("sk-bad"), 401),
            (Method::POST, "/v1/embeddings", Some("sk-good"), 200),
            (Method::POST, "/v1/models", Some("sk-good"), 405),
            (Method::GET, "/v1/models", Some("sk-good"), 200),
            (Method::GET, "/v1/models", None, 401),
            (Method::GET, "/v1/chat/completions", Some("sk-good"), 405),
            (Method::POST, "/v1/", Some("sk-good"), 404),
            (Method::POST, "/v2/chat/completions", Some("sk-good"), 404),
            (Method::GET, "/health", None, 200),
        ];
        for (method, path, key, status) in cases {
            let by_service = answer(served.clone(), method.clone(), path, key).await;
            let by_router = answer(routes.clone(), method.clone(), path, key).await;
            assert_eq!(by_service.0, status, "{method} {path} {key:?}");
            assert_eq!(by_service, by_router, "{method} {path} {key:?}");
        }
        assert_eq!(
            node.stats().requests(),
            4,
            "two inference requests each way"
        );
        let admission = &services.state.admission;
        assert_eq!(
            admission
                .accepted
                .load(std::sync::atomic::Ordering::Relaxed),
            4,
            "the stack counts its admission decisions where /metrics reads them"
        );
    }
}
