//! The request path for inference routes: [`RequestInfoLayer`], then the configured layers in
//! the configured order, then [`PooledProxyService`].
//!
//! Each order gives a different concrete type, so each layer's service is boxed
//! ([`BoxCloneSyncService`]) and the stack is assembled at start-up from [`StackConfig::layers`].
//! A layer left out of the list is not in the path at all.

use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use layers::{
    AdmissionConfig, AdmissionLayer, CachedSelectLayer, PooledProxyService, ProxyConfig,
    RequestInfoConfig, RequestInfoLayer, RetryBudget, SelectConfig, TimeoutWaitLayer, WaitConfig,
};
use tower::util::BoxCloneSyncService;
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

/// The type-erased service behind the configured layers.
pub type InferenceService = BoxCloneSyncService<Request<Full<Bytes>>, Response<Body>, Infallible>;

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
pub fn inference_service(
    state: &AppState,
    config: &StackConfig,
    budget: Arc<RetryBudget>,
) -> InferenceService {
    let proxy = proxy_service(state, config, budget).map_response(|r| r.map(Body::new));
    let mut service = BoxCloneSyncService::new(proxy);
    for kind in config.layers.iter().rev() {
        service = match kind {
            LayerKind::Admission => {
                boxed(AdmissionLayer::new(state.pool.clone(), config.admission).layer(service))
            }
            LayerKind::TimeoutWait => {
                boxed(TimeoutWaitLayer::new(state.pool.clone(), config.wait).layer(service))
            }
            LayerKind::CachedSelect => {
                boxed(CachedSelectLayer::new(state.pool.clone(), config.select).layer(service))
            }
        };
    }
    service
}

/// The whole path from the client's request: body parsing, then [`inference_service`].
pub fn request_service(
    state: &AppState,
    config: &StackConfig,
    budget: Arc<RetryBudget>,
) -> BoxCloneSyncService<Request<Body>, Response<Body>, Infallible> {
    let inner = inference_service(state, config, budget);
    boxed(RequestInfoLayer::new(config.request_info).layer(inner))
}

fn boxed<S, Req, B>(service: S) -> BoxCloneSyncService<Req, Response<Body>, Infallible>
where
    S: tower::Service<Req, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    Req: 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    BoxCloneSyncService::new(service.map_response(|r| r.map(Body::new)))
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
