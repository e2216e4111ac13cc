//! Forwards a request to its chosen node over one shared, pooled HTTP client, and streams the
//! answer back.
//!
//! Use it as the innermost service of a stack. It takes the node from the request's
//! [`SelectedNode`] extension (put there by [`CachedSelectLayer`](crate::cached_select) or
//! [`TimeoutWaitLayer`](crate::timeout_wait)); on its own it picks the least-loaded eligible node.
//!
//! - **One client.** [`HttpClient`] is built once per process ([`build_client`]) and cloned into
//!   every service: connections to nodes are kept alive and reused, with TCP no-delay on. The
//!   hot path uses hyper-util's pooled client, not reqwest: a bare proxy measured in this project
//!   lost about a quarter of its throughput with reqwest (`shared/bench/NOTES.md`).
//! - **Streaming.** The node's body goes back frame by frame as it arrives; nothing is buffered.
//!   The node's slot is held by the response body until its last byte, or until the client goes
//!   away, so a stream counts as load for its whole length.
//! - **Headers.** Hop-by-hop headers are dropped both ways. The client's `Authorization` is
//!   replaced by the node's own key, or removed. Only an allowlist of response headers goes back
//!   (`content-type`, `content-length`, `content-encoding`, `cache-control`, `x-request-id`,
//!   `openai-*`, `x-ratelimit-*`), so no `Server`, `Via` or `Location` can name a node.
//! - **Timeouts.** First byte (`first_byte_timeout`, then 504) and the idle gap between chunks
//!   (`idle_timeout`). A stream that breaks after it started ends with an OpenAI-shaped error
//!   event when it is SSE; other bodies end with an error.
//! - **Errors** never name the node's address: a client sees 502 `upstream_unavailable` or 504
//!   `upstream_timeout`. The address is logged for operators.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture as ClientFuture};
use hyper_util::rt::TokioExecutor;
use pin_project_lite::pin_project;
use tokio::time::{Sleep, Timeout};
use tower::Service;

use crate::error::RouterError;
use crate::pool::{Eligible, NodePool, SelectedNode, SlotBound, least_loaded};
use crate::request_info::RequestInfo;

/// Which node served a response, in the response's extensions: for history and logs on the
/// router side. Never sent to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedBy(pub Arc<str>);

/// The shared HTTP client type: hyper-util's pooled client over plain TCP.
pub type HttpClient<B = Full<Bytes>> = Client<HttpConnector, B>;

/// Settings for the shared client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientConfig {
    /// Longest TCP connect. Default 2 s.
    pub connect_timeout: Duration,
    /// How long an idle pooled connection is kept. Default 90 s.
    pub pool_idle_timeout: Duration,
    /// Most idle connections kept per node. Default 256.
    pub pool_max_idle_per_host: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 256,
        }
    }
}

/// Builds the process's shared client: keep-alive pooling, TCP no-delay, connect timeout.
pub fn build_client<B>(config: &ClientConfig) -> HttpClient<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
{
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(config.connect_timeout));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(config.pool_idle_timeout)
        .pool_max_idle_per_host(config.pool_max_idle_per_host)
        .build(connector)
}

/// Settings for [`PooledProxyService`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Longest wait for the node's response headers. Default 300 s: a busy node may queue a
    /// request for a long time before its first token.
    pub first_byte_timeout: Duration,
    /// Longest gap between two chunks of the node's body. Default 120 s.
    pub idle_timeout: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            first_byte_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// Forwards requests to their chosen node; see the module docs.
#[derive(Debug, Clone)]
pub struct PooledProxyService<B = Full<Bytes>> {
    client: HttpClient<B>,
    pool: NodePool,
    config: ProxyConfig,
}

impl<B> PooledProxyService<B> {
    /// A service sending through `client` to `pool`'s nodes.
    pub fn new(client: HttpClient<B>, pool: NodePool, config: ProxyConfig) -> Self {
        Self {
            client,
            pool,
            config,
        }
    }

    /// The shared client.
    pub fn client(&self) -> &HttpClient<B> {
        &self.client
    }
}

/// Request headers that belong to one connection and are not forwarded (RFC 9110 7.6.1), plus
/// `host` (set from the node's URI) and `content-length` (set from the body).
const HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HOST,
    header::CONTENT_LENGTH,
];

fn forwardable_response_header(name: &HeaderName) -> bool {
    let name = name.as_str();
    matches!(
        name,
        "content-type" | "content-length" | "content-encoding" | "cache-control" | "x-request-id"
    ) || name.starts_with("openai-")
        || name.starts_with("x-ratelimit-")
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

impl<B> PooledProxyService<B> {
    fn choose(&self, request: &mut Request<B>) -> Result<SelectedNode, RouterError> {
        if let Some(selected) = request.extensions_mut().remove::<SelectedNode>() {
            return Ok(selected);
        }
        let model = request
            .extensions()
            .get::<RequestInfo>()
            .and_then(|i| i.model.clone());
        let snapshot = self.pool.snapshot();
        match snapshot.eligible(model.as_deref()) {
            Eligible::Nodes(nodes) => least_loaded(nodes, SlotBound::MayExceed, None)
                .and_then(|node| self.pool.acquire(node, SlotBound::MayExceed))
                .and_then(SelectedNode::new)
                .ok_or(RouterError::Internal),
            Eligible::NoneAvailable => Err(RouterError::NoNodeAvailable {
                retry_after: crate::error::retry_delay(1, 0.0),
            }),
            Eligible::UnknownModel => Err(RouterError::ModelNotFound(
                model.as_deref().unwrap_or_default().to_owned(),
            )),
        }
    }
}

impl<B> Service<Request<B>> for PooledProxyService<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = ProxyFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The pooled client is always ready; it queues connection set-up itself.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let selected = match self.choose(&mut request) {
            Ok(selected) => selected,
            Err(error) => return ProxyFuture::failed(error),
        };
        let node = selected.node();
        let path_and_query = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
        let uri = match node.uri_for(path_and_query) {
            Ok(uri) => uri,
            Err(error) => {
                tracing::error!(node = node.id(), %error, "cannot build the upstream URI");
                return ProxyFuture::failed(RouterError::Internal);
            }
        };
        *request.uri_mut() = uri;
        *request.version_mut() = http::Version::HTTP_11;
        let headers = request.headers_mut();
        for name in &HOP_BY_HOP {
            headers.remove(name);
        }
        match node.authorization() {
            Some(key) => {
                headers.insert(header::AUTHORIZATION, key.clone());
            }
            None => {
                headers.remove(header::AUTHORIZATION);
            }
        }
        let sent_at = Instant::now();
        ProxyFuture {
            state: ProxyState::Sending {
                future: tokio::time::timeout(
                    self.config.first_byte_timeout,
                    self.client.request(request),
                ),
                selected: Some(selected),
                sent_at,
                idle_timeout: self.config.idle_timeout,
            },
        }
    }
}

pin_project! {
    /// Response future of [`PooledProxyService`].
    pub struct ProxyFuture {
        #[pin]
        state: ProxyState,
    }
}

pin_project! {
    #[project = ProxyStateProj]
    enum ProxyState {
        Sending {
            #[pin]
            future: Timeout<ClientFuture>,
            selected: Option<SelectedNode>,
            sent_at: Instant,
            idle_timeout: Duration,
        },
        Failed {
            error: Option<RouterError>,
        },
    }
}

impl ProxyFuture {
    fn failed(error: RouterError) -> Self {
        Self {
            state: ProxyState::Failed { error: Some(error) },
        }
    }
}

impl Future for ProxyFuture {
    type Output = Result<Response<ProxyBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            ProxyStateProj::Failed { error } => {
                let error = error.take().unwrap_or(RouterError::Internal);
                Poll::Ready(Ok(error.into_response()))
            }
            ProxyStateProj::Sending {
                future,
                selected,
                sent_at,
                idle_timeout,
            } => {
                let outcome = ready!(future.poll(cx));
                let Some(selected) = selected.take() else {
                    return Poll::Ready(Ok(RouterError::Internal.into_response()));
                };
                let node = selected.node();
                let response = match outcome {
                    Ok(Ok(response)) => response,
                    Ok(Err(error)) => {
                        let failures = node.state().record_failure();
                        tracing::warn!(node = node.id(), %error, failures, "upstream request failed");
                        return Poll::Ready(Ok(RouterError::UpstreamUnavailable.into_response()));
                    }
                    Err(_elapsed) => {
                        let failures = node.state().record_failure();
                        tracing::warn!(node = node.id(), failures, "upstream first-byte timeout");
                        return Poll::Ready(Ok(RouterError::UpstreamTimeout.into_response()));
                    }
                };
                if response.status().is_server_error() {
                    node.state().record_failure();
                } else {
                    node.state().record_success();
                }
                let (mut parts, incoming) = response.into_parts();
                let mut headers = HeaderMap::with_capacity(parts.headers.len());
                for (name, value) in parts.headers.drain().filter_map(|(n, v)| Some((n?, v))) {
                    if forwardable_response_header(&name) {
                        headers.append(name, value);
                    }
                }
                let sse = is_event_stream(&headers);
                parts.headers = headers;
                parts.extensions.insert(ServedBy(node.id_arc().clone()));
                let body = ProxyBody::streaming(incoming, selected, *idle_timeout, sse, *sent_at);
                Poll::Ready(Ok(Response::from_parts(parts, body)))
            }
        }
    }
}

pin_project! {
    /// The body of a proxied response: the node's stream, or a complete error body.
    ///
    /// While the node's stream lasts it holds the node's slot; the slot is given back at the end
    /// of the stream, on error, or when the client drops the body.
    pub struct ProxyBody {
        #[pin]
        idle: Option<Sleep>,
        upstream: Option<Upstream>,
        full: Option<Bytes>,
    }
}

struct Upstream {
    incoming: Incoming,
    selected: SelectedNode,
    idle_timeout: Duration,
    sse: bool,
    /// When the request went to the node, until its first body byte arrives: a stream's headers
    /// come at once, so only the first byte of the body tells how quick the node is (its time to
    /// first token).
    awaiting_first_byte: Option<Instant>,
}

impl std::fmt::Debug for ProxyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyBody")
            .field("streaming", &self.upstream.is_some())
            .finish()
    }
}

impl From<Bytes> for ProxyBody {
    fn from(bytes: Bytes) -> Self {
        Self {
            idle: None,
            upstream: None,
            full: Some(bytes),
        }
    }
}

/// Why a proxied body stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ProxyBodyError {
    /// The node's connection broke mid-body.
    #[error("the upstream node's stream broke")]
    Upstream(#[source] hyper::Error),
    /// The node sent nothing for the idle timeout.
    #[error("the upstream node's stream went idle")]
    Idle,
}

impl ProxyBody {
    fn streaming(
        incoming: Incoming,
        selected: SelectedNode,
        idle_timeout: Duration,
        sse: bool,
        sent_at: Instant,
    ) -> Self {
        Self {
            idle: Some(tokio::time::sleep(idle_timeout)),
            upstream: Some(Upstream {
                incoming,
                selected,
                idle_timeout,
                sse,
                awaiting_first_byte: Some(sent_at),
            }),
            full: None,
        }
    }

    /// The node serving this body, while it streams.
    pub fn node(&self) -> Option<&Arc<crate::pool::Node>> {
        self.upstream.as_ref().map(|u| u.selected.node())
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = ProxyBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let Some(upstream) = this.upstream.as_mut() else {
            return Poll::Ready(this.full.take().map(|b| Ok(Frame::data(b))));
        };
        let failure = match Pin::new(&mut upstream.incoming).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if frame.data_ref().is_some_and(|d| !d.is_empty())
                    && let Some(sent_at) = upstream.awaiting_first_byte.take()
                {
                    upstream
                        .selected
                        .node()
                        .state()
                        .record_ttfb(sent_at.elapsed());
                }
                if let Some(idle) = this.idle.as_mut().as_pin_mut() {
                    idle.reset(tokio::time::Instant::now() + upstream.idle_timeout);
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(None) => {
                if let Some(sent_at) = upstream.awaiting_first_byte.take() {
                    upstream
                        .selected
                        .node()
                        .state()
                        .record_ttfb(sent_at.elapsed());
                }
                // The last byte: give the slot back now, not when the body is dropped.
                *this.upstream = None;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(error))) => ProxyBodyError::Upstream(error),
            Poll::Pending => match this.idle.as_mut().as_pin_mut().map(|s| s.poll(cx)) {
                Some(Poll::Ready(())) => ProxyBodyError::Idle,
                _ => return Poll::Pending,
            },
        };
        let node = upstream.selected.node();
        let failures = node.state().record_failure();
        tracing::warn!(node = node.id(), error = %failure, failures, "upstream stream ended early");
        let sse = upstream.sse;
        *this.upstream = None;
        if sse {
            // The client already has a 200; tell it in-band, in the shape SDKs parse.
            let error = match failure {
                ProxyBodyError::Idle => RouterError::UpstreamTimeout,
                ProxyBodyError::Upstream(_) => RouterError::UpstreamUnavailable,
            };
            return Poll::Ready(Some(Ok(Frame::data(error.sse_event()))));
        }
        Poll::Ready(Some(Err(failure)))
    }

    fn is_end_stream(&self) -> bool {
        match &self.upstream {
            Some(u) => u.incoming.is_end_stream(),
            None => self.full.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.upstream {
            Some(u) => u.incoming.size_hint(),
            None => SizeHint::with_exact(self.full.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
