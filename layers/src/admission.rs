//! Graded backpressure: accept, accept after a short delay, or reject with 429 and `Retry-After`.
//!
//! Use it outermost, so that an overloaded fleet turns requests away before they queue or take a
//! connection to a node. The decision is a pure function of utilization,
//! `u = (in flight + queued) / capacity` ([`decide`]): below `accept_below` the request goes on,
//! between `accept_below` and `reject_at` it goes on after a delay that grows linearly up to
//! `max_delay` (a timer, never a blocked thread), and at `reject_at` or above it gets 429 with a
//! `Retry-After` derived from how fast slots are being given back.
//!
//! The load comes from a [`LoadSource`]: a [`NodePool`], or any closure returning a [`Load`], so
//! the layer also fits services that are not LLM proxies (a gRPC server, for one). It never reads
//! the request body, and works over any [`Routed`] request: `http::Request<B>` for any body
//! type, or a request type of your own.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::{Layer, Service};

use crate::error::{ErrorFormat, RouterError, retry_delay};
use crate::future::ResponseFuture;
use crate::pool::{Load, NodePool};
use crate::routed::{Routed, RoutedResponse};

/// What admission control does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmissionDecision {
    /// Go on at once.
    Accept,
    /// Go on after this delay.
    AcceptWithDelay(Duration),
    /// Turn it away with 429.
    Reject,
}

/// Thresholds for [`AdmissionLayer`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionConfig {
    /// Utilization below which requests are accepted at once. Default 0.5.
    pub accept_below: f64,
    /// Utilization at or above which requests are rejected. Default 0.8.
    pub reject_at: f64,
    /// The delay just below `reject_at`. Default 100 ms.
    pub max_delay: Duration,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            accept_below: 0.5,
            reject_at: 0.8,
            max_delay: Duration::from_millis(100),
        }
    }
}

/// Why an [`AdmissionConfig`] was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "admission thresholds must satisfy 0 <= accept_below <= reject_at, got {accept_below} and {reject_at}"
)]
pub struct AdmissionConfigError {
    /// The given `accept_below`.
    pub accept_below: f64,
    /// The given `reject_at`.
    pub reject_at: f64,
}

impl AdmissionConfig {
    /// Checks that the thresholds are ordered and finite.
    pub fn validate(&self) -> Result<(), AdmissionConfigError> {
        let ok = self.accept_below.is_finite()
            && self.reject_at.is_finite()
            && 0.0 <= self.accept_below
            && self.accept_below <= self.reject_at;
        if ok {
            Ok(())
        } else {
            Err(AdmissionConfigError {
                accept_below: self.accept_below,
                reject_at: self.reject_at,
            })
        }
    }
}

/// The decision for a utilization `u`. Pure: no clock, no I/O.
pub fn decide(u: f64, config: &AdmissionConfig) -> AdmissionDecision {
    if u < config.accept_below {
        AdmissionDecision::Accept
    } else if u >= config.reject_at || u.is_nan() {
        AdmissionDecision::Reject
    } else {
        let span = config.reject_at - config.accept_below;
        let fraction = if span > 0.0 {
            (u - config.accept_below) / span
        } else {
            1.0
        };
        AdmissionDecision::AcceptWithDelay(config.max_delay.mul_f64(fraction.clamp(0.0, 1.0)))
    }
}

/// Where admission control reads the load from.
pub trait LoadSource: Clone + Send + Sync + 'static {
    /// The load right now.
    fn load(&self) -> Load;
}

impl LoadSource for NodePool {
    fn load(&self) -> Load {
        NodePool::load(self)
    }
}

impl<F> LoadSource for F
where
    F: Fn() -> Load + Clone + Send + Sync + 'static,
{
    fn load(&self) -> Load {
        self()
    }
}

/// How many requests admission control accepted, delayed and rejected. Shared by all clones of
/// one layer; read it for metrics.
#[derive(Debug, Default)]
pub struct AdmissionCounters {
    /// Accepted at once.
    pub accepted: AtomicU64,
    /// Accepted after a delay.
    pub delayed: AtomicU64,
    /// Rejected with 429.
    pub rejected: AtomicU64,
    /// Accepted and waiting out their delay right now. They count as load: without them, every
    /// request arriving in the delay band passes before any of those ahead of it takes a slot,
    /// and a burst overshoots `reject_at` (at 3× capacity with 100 ms delays, by about 25
    /// requests on a 36-slot fleet).
    pub in_delay: AtomicUsize,
}

/// Counts one request in [`AdmissionCounters::in_delay`] until dropped.
#[derive(Debug)]
struct InDelay(Arc<AdmissionCounters>);

impl InDelay {
    fn new(counters: &Arc<AdmissionCounters>) -> Self {
        counters.in_delay.fetch_add(1, Ordering::Relaxed);
        Self(counters.clone())
    }
}

impl Drop for InDelay {
    fn drop(&mut self) {
        self.0.in_delay.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long until utilization drops below `reject_at`, at the observed release rate.
fn retry_after(load: &Load, config: &AdmissionConfig) -> Duration {
    let allowed = (config.reject_at * load.capacity as f64).floor() as usize;
    retry_delay(load.in_use.saturating_sub(allowed) + 1, load.release_rate)
}

/// Graded backpressure; see the module docs.
#[derive(Debug, Clone)]
pub struct AdmissionLayer<L = NodePool> {
    source: L,
    config: AdmissionConfig,
    counters: Arc<AdmissionCounters>,
}

impl<L: LoadSource> AdmissionLayer<L> {
    /// A layer reading load from `source`.
    pub fn new(source: L, config: AdmissionConfig) -> Self {
        Self {
            source,
            config,
            counters: Arc::default(),
        }
    }

    /// Counts decisions into `counters` (for example ones a metrics endpoint reads).
    pub fn with_counters(mut self, counters: Arc<AdmissionCounters>) -> Self {
        self.counters = counters;
        self
    }

    /// The decision counters.
    pub fn counters(&self) -> &Arc<AdmissionCounters> {
        &self.counters
    }
}

impl<S, L: Clone> Layer<S> for AdmissionLayer<L> {
    type Service = Admission<S, L>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            inner,
            source: self.source.clone(),
            config: self.config,
            counters: self.counters.clone(),
        }
    }
}

/// The service made by [`AdmissionLayer`].
#[derive(Debug, Clone)]
pub struct Admission<S, L = NodePool> {
    inner: S,
    source: L,
    config: AdmissionConfig,
    counters: Arc<AdmissionCounters>,
}

impl<S, L, R> Service<R> for Admission<S, L>
where
    R: Routed,
    S: Service<R> + Clone,
    S::Response: RoutedResponse,
    L: LoadSource,
{
    type Response = <S::Response as RoutedResponse>::Layered;
    type Error = S::Error;
    type Future = AdmissionFuture<S, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let mut load = self.source.load();
        load.in_use += self.counters.in_delay.load(Ordering::Relaxed);
        // No capacity at all is not overload: let the inner service say that no node is up.
        let decision = if load.capacity == 0 {
            AdmissionDecision::Accept
        } else {
            decide(load.utilization(), &self.config)
        };
        tracing::trace!(
            ?decision,
            in_use = load.in_use,
            capacity = load.capacity,
            "admission"
        );
        let counter = match decision {
            AdmissionDecision::Accept => &self.counters.accepted,
            AdmissionDecision::AcceptWithDelay(_) => &self.counters.delayed,
            AdmissionDecision::Reject => &self.counters.rejected,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let state = match decision {
            AdmissionDecision::Accept => State::Ready {
                future: ResponseFuture::called(self.inner.call(request)),
            },
            AdmissionDecision::AcceptWithDelay(delay) => {
                let clone = self.inner.clone();
                State::Delaying {
                    sleep: tokio::time::sleep(delay),
                    inner: Some(std::mem::replace(&mut self.inner, clone)),
                    request: Some(request),
                    in_delay: InDelay::new(&self.counters),
                }
            }
            AdmissionDecision::Reject => State::Ready {
                future: ResponseFuture::rejected(
                    RouterError::Overloaded {
                        retry_after: retry_after(&load, &self.config),
                    },
                    request.error_format(),
                ),
            },
        };
        AdmissionFuture { state }
    }
}

pin_project! {
    /// Response future of [`Admission`].
    pub struct AdmissionFuture<S: Service<R>, R> {
        #[pin]
        state: State<S, R>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S: Service<R>, R> {
        Delaying {
            #[pin]
            sleep: Sleep,
            inner: Option<S>,
            request: Option<R>,
            // Given back when the request moves on (the state is replaced) or is dropped.
            in_delay: InDelay,
        },
        Ready {
            #[pin]
            future: ResponseFuture<S::Future>,
        },
    }
}

impl<S, R> Future for AdmissionFuture<S, R>
where
    S: Service<R>,
    S::Response: RoutedResponse,
{
    type Output = Result<<S::Response as RoutedResponse>::Layered, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Delaying {
                    sleep,
                    inner,
                    request,
                    in_delay: _,
                } => {
                    ready!(sleep.poll(cx));
                    let future = match (inner.take(), request.take()) {
                        (Some(mut inner), Some(request)) => {
                            ResponseFuture::called(inner.call(request))
                        }
                        _ => ResponseFuture::rejected(RouterError::Internal, ErrorFormat::OpenAi),
                    };
                    this.state.set(State::Ready { future });
                }
                StateProj::Ready { future } => return future.poll(cx),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http::header::RETRY_AFTER;
    use http::{Request, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use tower::{ServiceExt, service_fn};

    use crate::body::ResponseBody;

    use super::*;

    fn config() -> AdmissionConfig {
        AdmissionConfig::default()
    }

    #[test]
    fn test_admission_control_accept() {
        for u in [0.0, 0.1, 0.49] {
            assert_eq!(decide(u, &config()), AdmissionDecision::Accept, "u = {u}");
        }
    }

    #[test]
    fn test_admission_control_delay() {
        let at = |u| match decide(u, &config()) {
            AdmissionDecision::AcceptWithDelay(d) => d,
            other => panic!("u = {u}: {other:?}"),
        };
        assert_eq!(at(0.5), Duration::ZERO);
        assert!(at(0.6) > at(0.55), "the delay grows with load");
        assert!(at(0.79) <= config().max_delay);
        assert!(at(0.79) > config().max_delay.mul_f64(0.9));
    }

    #[test]
    fn test_admission_control_reject() {
        for u in [0.8, 0.95, 1.0, 7.0, f64::INFINITY, f64::NAN] {
            assert_eq!(decide(u, &config()), AdmissionDecision::Reject, "u = {u}");
        }
    }

    #[test]
    fn config_validation_catches_reversed_thresholds() {
        let bad = AdmissionConfig {
            accept_below: 0.9,
            reject_at: 0.5,
            ..config()
        };
        assert!(bad.validate().is_err());
        assert!(config().validate().is_ok());
    }

    #[test]
    fn retry_after_grows_with_the_excess_and_shrinks_with_the_release_rate() {
        let load = |in_use, rate| Load {
            in_use,
            capacity: 10,
            release_rate: rate,
        };
        assert!(retry_after(&load(20, 5.0), &config()) > retry_after(&load(9, 5.0), &config()));
        assert!(retry_after(&load(20, 50.0), &config()) < retry_after(&load(20, 5.0), &config()));
    }

    async fn call_with(in_use: usize) -> (Response<ResponseBody<Full<Bytes>>>, usize) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let service = service_fn(move |_req: Request<()>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok")))) }
        });
        let source = move || Load {
            in_use,
            capacity: 10,
            release_rate: 4.0,
        };
        let response = AdmissionLayer::new(source, config())
            .layer(service)
            .oneshot(Request::new(()))
            .await
            .unwrap();
        (response, calls.load(Ordering::SeqCst))
    }

    #[tokio::test(start_paused = true)]
    async fn the_service_passes_accepted_requests_and_rejects_with_retry_after() {
        let (ok, calls) = call_with(2).await;
        assert_eq!((ok.status(), calls), (StatusCode::OK, 1));

        let started = tokio::time::Instant::now();
        let (delayed, calls) = call_with(7).await;
        assert_eq!((delayed.status(), calls), (StatusCode::OK, 1));
        assert!(
            started.elapsed() >= Duration::from_millis(50),
            "delayed by a timer"
        );

        let (rejected, calls) = call_with(9).await;
        assert_eq!(
            calls, 0,
            "a rejected request never reaches the inner service"
        );
        assert_eq!(rejected.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(rejected.headers().contains_key(RETRY_AFTER));
        let body = rejected.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["code"], "overloaded");
    }

    #[tokio::test(start_paused = true)]
    async fn requests_waiting_out_their_delay_count_as_load() {
        // 6 of 10 slots in use: in the delay band (0.5 to 0.8) until two more are delayed.
        let source = || Load {
            in_use: 6,
            capacity: 10,
            release_rate: 4.0,
        };
        let ok = service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        });
        let layer = AdmissionLayer::new(source, config());
        let counters = layer.counters().clone();
        let mut service = layer.layer(ok);
        let first = service.call(Request::new(()));
        let second = service.call(Request::new(()));
        assert_eq!(counters.in_delay.load(Ordering::Relaxed), 2);
        let third = service.call(Request::new(())).await.unwrap();
        assert_eq!(
            third.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "6 in use and 2 in their delay reach reject_at"
        );
        // A delayed request that moves on, or whose client leaves, stops counting.
        assert_eq!(first.await.unwrap().status(), StatusCode::OK);
        drop(second);
        assert_eq!(counters.in_delay.load(Ordering::Relaxed), 0);
        let fourth = service.call(Request::new(())).await.unwrap();
        assert_eq!(fourth.status(), StatusCode::OK);
        assert_eq!(counters.delayed.load(Ordering::Relaxed), 3);
        assert_eq!(counters.rejected.load(Ordering::Relaxed), 1);
    }
}
