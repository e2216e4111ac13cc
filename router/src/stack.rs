//! The request path for inference routes: [`RequestInfoLayer`], then the configured layers in
//! the configured order, then [`PooledProxyService`].
//!
//! Each order gives a different concrete type, so each layer's service is type-erased
//! ([`SharedService`]) and the stack is assembled at start-up from [`StackConfig::layers`].
//! A layer left out of the list is not in the path at all. The default order, which most
//! routers run, is also built as one concrete stack, erased once at the top.

use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Request, Response};
use http_body_util::Full;
use layers::admission::Admission;
use layers::cached_select::CachedSelect;
use layers::proxy::ProxiedRequest;
use layers::request_info::RequestInfoService;
use layers::timeout_wait::TimeoutWait;
use layers::{
    AdmissionConfig, AdmissionLayer, CachedSelectLayer, PooledProxyService, ProxyBody, ProxyConfig,
    RawRequest, RawResponse, RequestInfoConfig, RequestInfoLayer, ResponseBody, RetryBudget,
    RoutedResponse, SelectConfig, TimeoutWaitLayer, WaitConfig,
};
use tower::{Layer, ServiceExt};

use crate::state::AppState;

/// One configurable layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum LayerKind {
    /// [`AdmissionLayer`]: graded backpressure.
    Admission,
    /// [`TimeoutWaitLayer`]: FIFO wait for a free slot.
    TimeoutWait,
    /// [`CachedSelectLayer`]: load-aware node choice.
    CachedSelect,
}

impl LayerKind {
    /// The name used in config files and flags.
    pub fn name(self) -> &'static str {
        match self {
            Self::Admission => "admission",
            Self::TimeoutWait => "timeout_wait",
            Self::CachedSelect => "cached_select",
        }
    }

    /// Every layer, in the default order.
    pub const ALL: [LayerKind; 3] = [Self::Admission, Self::TimeoutWait, Self::CachedSelect];
}

impl fmt::Display for LayerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown layer name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown layer {0:?}; known layers: admission, timeout_wait, cached_select")]
pub struct UnknownLayer(pub String);

impl TryFrom<String> for LayerKind {
    type Error = UnknownLayer;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl FromStr for LayerKind {
    type Err = UnknownLayer;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s.trim())
            .ok_or_else(|| UnknownLayer(s.to_owned()))
    }
}

/// Which layers run, in which order, with which settings.
#[derive(Debug, Clone, PartialEq)]
pub struct StackConfig {
    /// Outermost first. Default: admission, timeout_wait, cached_select.
    pub layers: Vec<LayerKind>,
    /// Body limit and model requirement.
    pub request_info: RequestInfoConfig,
    /// Admission thresholds.
    pub admission: AdmissionConfig,
    /// Wait queue bounds.
    pub wait: WaitConfig,
    /// Ranking cache.
    pub select: SelectConfig,
    /// Upstream timeouts.
    pub proxy: ProxyConfig,
}

impl Default for StackConfig {
    fn default() -> Self {
        Self {
            layers: LayerKind::ALL.to_vec(),
            request_info: RequestInfoConfig::default(),
            admission: AdmissionConfig::default(),
            wait: WaitConfig::default(),
            select: SelectConfig::default(),
            proxy: ProxyConfig::default(),
        }
    }
}

/// The type-erased service behind the configured layers, over `R`: the `http::Request` that
/// `RequestInfoLayer` passes on (answered with an `http::Response`), or a [`RawRequest`]
/// (answered with a [`RawResponse`]).
pub type InferenceService<R = Request<Full<Bytes>>, A = Response<Body>> = SharedService<R, A>;

/// What the stack answers with: axum's `Response<Body>` for `http::Request`s, the proxy's
/// [`RawResponse<ProxyBody>`] as it is for [`RawRequest`]s.
pub trait StackAnswer: RoutedResponse + Send + Sized + 'static {
    /// The proxy's answer it is made from.
    type Proxied;
    /// The proxy's answer as this type.
    fn from_proxy(answer: Self::Proxied) -> Self;
    /// A layer's answer (the inner one passed on, or the layer's own) as this type.
    fn settle(layered: Self::Layered) -> Self;
}

impl StackAnswer for Response<Body> {
    type Proxied = Response<ProxyBody>;

    fn from_proxy(answer: Response<ProxyBody>) -> Self {
        answer.map(Body::new)
    }

    fn settle(layered: Response<ResponseBody<Body>>) -> Self {
        layered.map(flatten)
    }
}

/// No wrapper body and no box: the layers pass the proxy's answer on as it is.
impl StackAnswer for RawResponse<ProxyBody> {
    type Proxied = Self;

    fn from_proxy(answer: Self) -> Self {
        answer
    }

    fn settle(layered: Self) -> Self {
        layered
    }
}

/// The retry budget `config` asks for, to share between the stacks of one router.
pub fn retry_budget(config: &StackConfig) -> Arc<RetryBudget> {
    Arc::new(RetryBudget::new(
        config.proxy.retry_reserve,
        config.proxy.retry_percent,
    ))
}

/// The proxy at the bottom of the stack, on the state's client, with retries out of `budget`.
pub fn proxy_service(
    state: &AppState,
    config: &StackConfig,
    budget: Arc<RetryBudget>,
) -> PooledProxyService {
    PooledProxyService::with_retry_budget(
        state.http_client.clone(),
        state.pool.clone(),
        config.proxy,
        budget,
    )
}

/// The configured layers over the proxy.
pub fn inference_service<R, A>(
    state: &AppState,
    config: &StackConfig,
    layers: &StackLayers,
    budget: Arc<RetryBudget>,
) -> InferenceService<R, A>
where
    R: ProxiedRequest<Full<Bytes>, Answer = A::Proxied> + Send + 'static,
    A: StackAnswer,
    A::Layered: Send + 'static,
{
    // The proxy forwards `http::Request`s and `RawRequest`s alike: say which.
    let proxy = ServiceExt::<R>::map_response(proxy_service(state, config, budget), A::from_proxy);
    let mut service = SharedService::new(proxy);
    for kind in config.layers.iter().rev() {
        service = match kind {
            LayerKind::Admission => shared(layers.admission.layer(service)),
            LayerKind::TimeoutWait => shared(layers.wait.layer(service)),
            LayerKind::CachedSelect => shared(layers.select.layer(service)),
        };
    }
    service
}

/// The three configurable layers over the state's pool, with the config's settings. Make them
/// once for an app and build each of its stacks (the `http` one, the raw one) with them: so the
/// stacks share one ranking cache, and the admission counters.
#[derive(Debug, Clone)]
pub struct StackLayers {
    admission: AdmissionLayer,
    wait: TimeoutWaitLayer,
    select: CachedSelectLayer,
}

impl StackLayers {
    /// The layers `config` sets, over `state`'s pool.
    pub fn new(state: &AppState, config: &StackConfig) -> Self {
        Self {
            admission: AdmissionLayer::new(state.pool.clone(), config.admission)
                .with_counters(state.admission.clone()),
            wait: TimeoutWaitLayer::new(state.pool.clone(), config.wait),
            select: CachedSelectLayer::new(state.pool.clone(), config.select),
        }
    }
}

/// The whole path from the client's request: body parsing, then [`inference_service`].
pub fn request_service(
    state: &AppState,
    config: &StackConfig,
    layers: &StackLayers,
    budget: Arc<RetryBudget>,
) -> SharedService<Request<Body>, Response<Body>> {
    if config.layers == LayerKind::ALL {
        let stack = default_stack(state, config, layers, budget);
        return SharedService::new(ServiceExt::<Request<Body>>::map_response(stack, |r| {
            r.map(Body::new)
        }));
    }
    let inner =
        inference_service::<Request<Full<Bytes>>, Response<Body>>(state, config, layers, budget);
    shared(RequestInfoLayer::new(config.request_info).layer(inner))
}

/// [`request_service`] for a [`RawRequest`] (an HTTP/1 client's): the same layers, in the same
/// order, over the request's bytes.
pub fn raw_request_service(
    state: &AppState,
    config: &StackConfig,
    layers: &StackLayers,
    budget: Arc<RetryBudget>,
) -> SharedService<RawRequest, RawResponse<ProxyBody>> {
    if config.layers == LayerKind::ALL {
        return SharedService::new(default_stack(state, config, layers, budget));
    }
    let inner =
        inference_service::<RawRequest, RawResponse<ProxyBody>>(state, config, layers, budget);
    shared(RequestInfoLayer::new(config.request_info).layer(inner))
}

/// The default order's stack, with no type erasure between the layers: one boxed future per
/// request instead of one per layer, and no dynamic calls in between. Any other order or
/// subset takes the erased path, which builds the same services.
type DefaultStack = RequestInfoService<Admission<TimeoutWait<CachedSelect<PooledProxyService>>>>;

fn default_stack(
    state: &AppState,
    config: &StackConfig,
    layers: &StackLayers,
    budget: Arc<RetryBudget>,
) -> DefaultStack {
    tower::ServiceBuilder::new()
        .layer(RequestInfoLayer::new(config.request_info))
        .layer(layers.admission.clone())
        .layer(layers.wait.clone())
        .layer(layers.select.clone())
        .service(proxy_service(state, config, budget))
}

/// A type-erased service that is cheap to clone.
///
/// tower's [`BoxCloneSyncService`](tower::util::BoxCloneSyncService) clones by boxing a copy of
/// the service it holds. Every layer clones its inner service per request (axum clones the
/// route's, and a layer that awaits before calling its inner service must own one), and in a
/// stack of boxed services each of those clones boxes the whole rest of the stack again: about
/// 20 allocations per request with the default stack. Here the service sits behind an `Arc`, a
/// clone is a reference count, and a call clones the concrete service (its fields are `Arc`s
/// and settings) next to the one boxed future it needs anyway.
pub struct SharedService<Req, Res> {
    inner: Arc<dyn CallShared<Req, Res>>,
}

impl<Req, Res> Clone for SharedService<Req, Res> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<Req, Res> fmt::Debug for SharedService<Req, Res> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedService").finish_non_exhaustive()
    }
}

trait CallShared<Req, Res>: Send + Sync {
    fn call(&self, request: Req) -> BoxFuture<'static, Result<Res, Infallible>>;
}

impl<S, Req> CallShared<Req, S::Response> for S
where
    S: tower::Service<Req, Error = Infallible> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    Req: Send + 'static,
{
    fn call(&self, request: Req) -> BoxFuture<'static, Result<S::Response, Infallible>> {
        // `oneshot` polls the copy ready before calling it, as tower requires.
        Box::pin(self.clone().oneshot(request))
    }
}

impl<Req, Res> SharedService<Req, Res> {
    /// Erases `service`'s type.
    pub fn new<S>(service: S) -> Self
    where
        S: tower::Service<Req, Response = Res, Error = Infallible> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        Req: Send + 'static,
    {
        Self {
            inner: Arc::new(service),
        }
    }
}

impl<Req, Res> tower::Service<Req> for SharedService<Req, Res> {
    type Response = Res;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Res, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Readiness is checked on the copy each call makes.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        self.inner.call(request)
    }
}

/// A layer's body as axum's, without boxing the inner body a second time.
fn flatten(body: ResponseBody<Body>) -> Body {
    match body.into_inner() {
        Ok(inner) => inner,
        Err(answer) => Body::from(answer),
    }
}

fn shared<S, Req, A>(service: S) -> SharedService<Req, A>
where
    S: tower::Service<Req, Response = A::Layered, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    Req: Send + 'static,
    A: StackAnswer,
{
    SharedService::new(service.map_response(A::settle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names_round_trip_and_unknown_names_are_refused() {
        for kind in LayerKind::ALL {
            assert_eq!(kind.name().parse::<LayerKind>(), Ok(kind));
        }
        assert_eq!(
            "rate_limit".parse::<LayerKind>(),
            Err(UnknownLayer("rate_limit".into()))
        );
    }
}
