//! Forwards a request to its chosen node over one shared, pooled HTTP client, and streams the
//! answer back.
//!
//! Use it as the innermost service of a stack. It takes the node from the request's
//! [`SelectedNode`] (an extension of an `http::Request`, a field of a [`RawRequest`]; put there
//! by [`CachedSelectLayer`](crate::cached_select) or [`TimeoutWaitLayer`](crate::timeout_wait));
//! on its own it picks the least-loaded eligible node. It forwards either request type
//! ([`ProxiedRequest`]): a raw one's header lines go to the node as the client wrote them.
//!
//! - **One client.** [`HttpClient`] is built once per process
//!   ([`build_client`](crate::build_client)) and cloned into every service: connections to
//!   nodes are kept alive and reused, with TCP no-delay on. It is this crate's own lean HTTP/1.1
//!   client (see [`client`](crate::client) for why), not reqwest: a bare proxy measured in this
//!   project lost about a quarter of its throughput with reqwest (`shared/bench/NOTES.md`).
//! - **Streaming.** The node's body goes back frame by frame as it arrives; nothing is buffered.
//!   The node's slot is held by the response body until its last byte, or until the client goes
//!   away, so a stream counts as load for its whole length.
//! - **Headers.** Hop-by-hop headers are dropped both ways (on the way to the node, by the
//!   client as it writes the head). The client's `Authorization` is
//!   replaced by the node's own key, or removed. Only an allowlist of response headers goes back
//!   (`content-type`, `content-encoding`, `cache-control`, `x-request-id`, `openai-*`,
//!   `x-ratelimit-*`), so no `Server`, `Via` or `Location` can name a node; the answer is framed
//!   anew (its length kept). The client applies the allowlist as it parses the node's head and
//!   copies the kept lines, as the node wrote them, into one buffer: a [`RawRequest`] is
//!   answered with a [`RawResponse`] over them, as the server writes it back; an
//!   `http::Request` gets an `http::Response` whose header values share that buffer.
//! - **Timeouts.** First byte (`first_byte_timeout`, then 504) and the idle gap between chunks
//!   (`idle_timeout`). A stream that breaks after it started ends with an OpenAI-shaped error
//!   event when it is SSE; other bodies end with an error.
//! - **Retries.** A request is sent again (once by default, [`ProxyConfig::retries`]), to
//!   another node with a free slot that it has not failed on, when its node refuses the
//!   connection, fails before answering, or answers 5xx. The other node is picked
//!   the way the first was: the quickest by measured speed (time to first byte against live
//!   load, [`CachedSelectLayer`](crate::cached_select)'s rule) when a layer chose the first,
//!   the least-loaded when the proxy did. A retry always comes before any byte has
//!   reached the client, never after. A first-byte timeout is not retried (the node may still be
//!   working on it, and a second try would double the wait), nor is anything once the body has
//!   started. Retries come out of a [`RetryBudget`] (by default 10 at once, then 20% of
//!   requests), so a failing fleet is not hit by a retry storm. The request body must be `Clone`
//!   for this; [`Full<Bytes>`], which [`RequestInfoLayer`](crate::RequestInfoLayer) yields, is.
//! - **Errors** never name the node's address: a client sees 502 `upstream_unavailable` or 504
//!   `upstream_timeout`, and an error answer from the node itself (any status but 2xx) is read
//!   (up to 64 KiB) with the node's URL, address and host replaced by `[node]`; one that cannot
//!   be scrubbed (compressed, or longer) keeps its status with a plain `upstream_error` message.
//!   The address is logged for operators.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::Service;

use crate::client::{
    ClientError, Forward, HttpClient, ResponseFuture as ClientFuture, UpstreamBody,
};
use crate::error::RouterError;
use crate::pool::{
    Eligible, Node, NodePool, SelectedNode, SlotBound, Speed, least_loaded, quickest,
};
use crate::raw::RawRequest;
use crate::raw_response::RawResponse;
use crate::retry::RetryBudget;
use crate::routed::Routed;

/// A request id for the node, in an `http::Request`'s extensions (on a [`RawRequest`]:
/// [`RawRequest::set_upstream_request_id`]; its extensions are not read for it): the proxy
/// sends it as `x-request-id` in place of any the request carries. Set by whatever makes request ids around the stack
/// (the router's recorder does), so the request's own headers stay as the client sent them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamRequestId(pub HeaderValue);

/// `x-request-id`.
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Which node served a response, in an `http::Response`'s extensions (a [`RawResponse`] has
/// it in [`RawResponse::served_by`]): for history and logs on the router side. Never sent to
/// the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedBy(pub Arc<str>);

/// Set when a proxied body that had started ends early on the node's side, in an
/// `http::Response`'s extensions (the body of a [`RawResponse`] says it itself:
/// [`ProxyBody::upstream_failure`]): for history and logs around the stack, which cannot tell
/// from an SSE stream (it ends with an error event, not an error). Holds the error code the
/// client was given.
#[derive(Debug, Clone, Default)]
pub struct UpstreamFailure(Arc<std::sync::OnceLock<&'static str>>);

impl UpstreamFailure {
    /// The error code, once the body broke: `upstream_unavailable` or `upstream_timeout`.
    pub fn get(&self) -> Option<&'static str> {
        self.0.get().copied()
    }

    fn set(&self, code: &'static str) {
        let _ = self.0.set(code);
    }
}

/// The node's answer as the client reads it, before it is passed on.
type NodeAnswer = RawResponse<UpstreamBody>;

/// The proxy's answer before it takes the request's answer type.
type Proxied = RawResponse<ProxyBody>;

/// Settings for [`PooledProxyService`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Longest wait for the node's response headers. Default 300 s: a busy node may queue a
    /// request for a long time before its first token.
    pub first_byte_timeout: Duration,
    /// Longest gap between two chunks of the node's body. Default 120 s.
    pub idle_timeout: Duration,
    /// How many more nodes a failed request is tried on, before any byte reached the client.
    /// Default 1; 0 turns retries off.
    pub retries: u32,
    /// Retries allowed at once, before the budget needs new requests. Default 10.
    pub retry_reserve: u32,
    /// Retries allowed per 100 requests, on top of the reserve. Default 20.
    pub retry_percent: u32,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            first_byte_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(120),
            retries: 1,
            retry_reserve: 10,
            retry_percent: 20,
        }
    }
}

/// Largest error body read from a node to scrub its address out of it.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Forwards requests to their chosen node; see the module docs.
#[derive(Debug)]
pub struct PooledProxyService<B = Full<Bytes>> {
    shared: Arc<Shared<B>>,
}

impl<B> Clone for PooledProxyService<B> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

/// What every request of one service needs, behind one `Arc`: a retry takes it along.
#[derive(Debug)]
struct Shared<B> {
    client: HttpClient<B>,
    pool: NodePool,
    config: ProxyConfig,
    budget: Arc<RetryBudget>,
}

impl<B> PooledProxyService<B> {
    /// A service sending through `client` to `pool`'s nodes.
    pub fn new(client: HttpClient<B>, pool: NodePool, config: ProxyConfig) -> Self {
        let budget = RetryBudget::new(config.retry_reserve, config.retry_percent);
        Self::with_retry_budget(client, pool, config, Arc::new(budget))
    }

    /// A service like [`new`](Self::new)'s whose retries come out of `budget`, which other
    /// services may share: several services over one pool (one per thread, each with its own
    /// client, say) then keep one budget between them. `config`'s retry reserve and percent are
    /// not used; `budget` has its own.
    pub fn with_retry_budget(
        client: HttpClient<B>,
        pool: NodePool,
        config: ProxyConfig,
        budget: Arc<RetryBudget>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                client,
                pool,
                config,
                budget,
            }),
        }
    }

    /// The shared client.
    pub fn client(&self) -> &HttpClient<B> {
        &self.shared.client
    }

    /// The retry budget shared by this service and its clones.
    pub fn retry_budget(&self) -> &RetryBudget {
        &self.shared.budget
    }
}

fn forwardable_response_header(name: &[u8]) -> bool {
    matches!(
        name,
        b"content-type" | b"content-encoding" | b"cache-control" | b"x-request-id"
    ) || name.starts_with(b"openai-")
        || name.starts_with(b"x-ratelimit-")
}

fn is_event_stream(answer: &NodeAnswer) -> bool {
    answer
        .header("content-type")
        .is_some_and(|v| v.starts_with(b"text/event-stream"))
}

impl<B> PooledProxyService<B> {
    /// The request's node, and how a retry picks another the same way.
    fn choose(&self, request: &mut impl Routed) -> Result<(SelectedNode, Pick), RouterError> {
        if let Some(selected) = request.remove_selected_node() {
            // A layer chose it: CachedSelect and TimeoutWait both pick the quickest.
            return Ok((selected, Pick::Quickest));
        }
        let model = request.model();
        let snapshot = self.shared.pool.snapshot();
        match snapshot.eligible(model.as_deref()) {
            Eligible::Nodes(nodes) => least_loaded(nodes, SlotBound::MayExceed, None)
                .and_then(|node| self.shared.pool.acquire(node, SlotBound::MayExceed))
                .and_then(SelectedNode::new)
                .map(|selected| (selected, Pick::LeastLoaded))
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

impl<B> Shared<B> {
    /// Sends `request` to the selected node, with the node's key (if it has one) in place of
    /// the client's `authorization`, and the [`UpstreamRequestId`] if there is one. The request
    /// stays as it is, to be sent again on a retry: the client writes out its own copy of the
    /// head, and the body is shared.
    fn send<R: ProxiedRequest<B>>(&self, request: &R, selected: &SelectedNode) -> Sent {
        let node = selected.node();
        let key = (&header::AUTHORIZATION, node.authorization());
        let with_id;
        let replaced: &[_] = match request.upstream_request_id() {
            Some(id) => {
                with_id = [key, (&X_REQUEST_ID, Some(id))];
                &with_id
            }
            None => &[key],
        };
        let to = Forward {
            authority: node.authority(),
            path_prefix: node.path_prefix(),
            replaced,
            // Nothing that names the node is even parsed.
            keep_answer_header: forwardable_response_header,
        };
        // One clock read for the deadline and the time to first byte, both on tokio's clock
        // (a test may pause it).
        let sent_at = Instant::now();
        Sent {
            future: request.send_to(&self.client, to, sent_at + self.config.first_byte_timeout),
            sent_at,
        }
    }

    /// A slot on a node with room for `model` that has not failed this request yet, picked
    /// by `pick`.
    fn another_node(
        &self,
        model: Option<&str>,
        tried: &[Arc<str>],
        pick: Pick,
    ) -> Option<SelectedNode> {
        let snapshot = self.pool.snapshot();
        let Eligible::Nodes(nodes) = snapshot.eligible(model) else {
            return None;
        };
        let others = nodes.iter().filter(|n| !tried.contains(n.id_arc()));
        let node = match pick {
            Pick::LeastLoaded => least_loaded(others, SlotBound::WithinCapacity, None),
            Pick::Quickest => {
                let measured = others.map(|n| (n, Speed::of(n)));
                quickest(measured, SlotBound::WithinCapacity, None)
            }
        }?;
        SelectedNode::new(self.pool.acquire(node, SlotBound::WithinCapacity)?)
    }
}

/// A request type [`PooledProxyService`] forwards: an `http::Request<B>` whose body it can
/// send again (such as [`Full<Bytes>`], which [`RequestInfoLayer`](crate::RequestInfoLayer)
/// yields), or a [`RawRequest`], whose header lines go out as they came. Sealed: the proxy
/// needs to know how each is written out.
pub trait ProxiedRequest<B>: Routed + sealed::Sealed<B> {
    /// What the proxy answers it with: a `Response<ProxyBody>` for an `http::Request` (the
    /// node in a [`ServedBy`] extension, an [`UpstreamFailure`] on a streamed answer), a
    /// [`RawResponse<ProxyBody>`] for a [`RawRequest`] (the node in
    /// [`RawResponse::served_by`], a broken stream in [`ProxyBody::upstream_failure`]).
    type Answer: sealed::FromProxied;
}

impl<B> ProxiedRequest<B> for Request<B>
where
    B: Body + Clone + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Answer = Response<ProxyBody>;
}

impl<B> ProxiedRequest<B> for RawRequest {
    type Answer = RawResponse<ProxyBody>;
}

mod sealed {
    use http::{HeaderValue, Request, Response};
    use http_body::Body;
    use tokio::time::Instant;

    use super::{NodeAnswer, Proxied, ProxyBody};
    use crate::client::{Forward, HttpClient, ResponseFuture};
    use crate::proxy::UpstreamRequestId;
    use crate::raw::RawRequest;
    use crate::raw_response::RawResponse;

    /// How a request is sent, and which request id it carries.
    pub trait Sealed<B> {
        fn send_to(
            &self,
            client: &HttpClient<B>,
            to: Forward<'_>,
            head_deadline: Instant,
        ) -> ResponseFuture<NodeAnswer>;
        fn upstream_request_id(&self) -> Option<&HeaderValue>;
    }

    impl<B> Sealed<B> for Request<B>
    where
        B: Body + Clone + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        fn send_to(
            &self,
            client: &HttpClient<B>,
            to: Forward<'_>,
            head_deadline: Instant,
        ) -> ResponseFuture<NodeAnswer> {
            client.request_lines_within(self, to, Some(head_deadline))
        }

        fn upstream_request_id(&self) -> Option<&HeaderValue> {
            self.extensions().get::<UpstreamRequestId>().map(|id| &id.0)
        }
    }

    impl<B> Sealed<B> for RawRequest {
        fn send_to(
            &self,
            client: &HttpClient<B>,
            to: Forward<'_>,
            head_deadline: Instant,
        ) -> ResponseFuture<NodeAnswer> {
            client.request_raw_within(self, to, Some(head_deadline))
        }

        fn upstream_request_id(&self) -> Option<&HeaderValue> {
            RawRequest::upstream_request_id(self).map(|id| &id.0)
        }
    }

    /// The proxy's answer in the request's answer type.
    pub trait FromProxied {
        fn from_proxied(answer: Proxied) -> Self;
    }

    impl FromProxied for RawResponse<ProxyBody> {
        fn from_proxied(answer: Proxied) -> Self {
            answer
        }
    }

    impl FromProxied for Response<ProxyBody> {
        fn from_proxied(mut answer: Proxied) -> Self {
            // Before the body is first polled, so no failure goes unreported.
            let failure = answer.body_mut().share_failure();
            let mut response = answer.into_http();
            if let Some(failure) = failure {
                response.extensions_mut().insert(failure);
            }
            response
        }
    }
}

/// A request on its way to a node.
struct Sent {
    /// With the first-byte deadline: the client keeps a timer per connection for it.
    future: ClientFuture<NodeAnswer>,
    sent_at: Instant,
}

/// How a retry picks its node: as the request's first node was picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pick {
    /// The proxy picked it: the lowest in flight per slot (the proxy on its own is the
    /// least-loaded baseline).
    LeastLoaded,
    /// A layer picked it: the lowest expected time to first byte by measured speed.
    Quickest,
}

/// What a request needs to be sent again.
struct Replay<R> {
    request: R,
    model: Option<Arc<str>>,
    pick: Pick,
    retries_left: u32,
    /// Nodes that failed this request (allocated only on a failure).
    tried: Vec<Arc<str>>,
}

impl<B, R> Service<R> for PooledProxyService<B>
where
    R: ProxiedRequest<B>,
{
    type Response = R::Answer;
    type Error = Infallible;
    type Future = ProxyFuture<B, R>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The client is always ready: each request takes or opens its own connection.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: R) -> Self::Future {
        let (selected, pick) = match self.choose(&mut request) {
            Ok(chosen) => chosen,
            Err(error) => return ProxyFuture::failed(error),
        };
        let shared = &self.shared;
        shared.budget.deposit();
        let sent = shared.send(&request, &selected);
        let replay = (shared.config.retries > 0).then(|| Replay {
            model: request.model(),
            pick,
            request,
            retries_left: shared.config.retries,
            tried: Vec::new(),
        });
        ProxyFuture::sending(shared.clone(), sent, selected, replay)
    }
}

pin_project! {
    /// Response future of [`PooledProxyService`].
    pub struct ProxyFuture<B, R = Request<B>> {
        #[pin]
        state: ProxyState<B, R>,
    }
}

pin_project! {
    #[project = ProxyStateProj]
    enum ProxyState<B, R> {
        Sending {
            future: ClientFuture<NodeAnswer>,
            shared: Arc<Shared<B>>,
            selected: Option<SelectedNode>,
            sent_at: Instant,
            replay: Option<Replay<R>>,
        },
        // The node answered with an error: its body is read to scrub the node's address.
        ReadingError {
            future: Pin<Box<dyn Future<Output = Proxied> + Send>>,
        },
        Failed {
            error: Option<RouterError>,
        },
    }
}

/// How an attempt on one node failed, before anything reached the client.
enum Failure {
    /// The node answered 5xx.
    Status(NodeAnswer),
    /// The node answered 4xx (or 3xx): final, but its body still names no node.
    Refused(NodeAnswer),
    /// The connection was refused or broke before the answer.
    Unreachable,
}

impl<B, R> ProxyFuture<B, R> {
    fn failed(error: RouterError) -> Self {
        Self {
            state: ProxyState::Failed { error: Some(error) },
        }
    }

    fn sending(
        shared: Arc<Shared<B>>,
        sent: Sent,
        selected: SelectedNode,
        replay: Option<Replay<R>>,
    ) -> Self {
        Self {
            state: ProxyState::sending(shared, sent, selected, replay),
        }
    }
}

impl<B, R> ProxyState<B, R> {
    fn sending(
        shared: Arc<Shared<B>>,
        sent: Sent,
        selected: SelectedNode,
        replay: Option<Replay<R>>,
    ) -> Self {
        Self::Sending {
            future: sent.future,
            shared,
            selected: Some(selected),
            sent_at: sent.sent_at,
            replay,
        }
    }
}

impl<B, R> Future for ProxyFuture<B, R>
where
    R: ProxiedRequest<B>,
{
    type Output = Result<R::Answer, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.poll_proxied(cx)
            .map(|answer| Ok(sealed::FromProxied::from_proxied(answer)))
    }
}

impl<B, R> ProxyFuture<B, R>
where
    R: ProxiedRequest<B>,
{
    fn poll_proxied(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Proxied> {
        loop {
            let next = match self.as_mut().project().state.project() {
                ProxyStateProj::Failed { error } => {
                    let error = error.take().unwrap_or(RouterError::Internal);
                    return Poll::Ready(router_answer(error));
                }
                ProxyStateProj::ReadingError { future } => {
                    return future.as_mut().poll(cx);
                }
                ProxyStateProj::Sending {
                    future,
                    shared,
                    selected,
                    sent_at,
                    replay,
                } => {
                    let outcome = ready!(future.poll_within(cx));
                    let Some(selected) = selected.take() else {
                        return Poll::Ready(router_answer(RouterError::Internal));
                    };
                    let node = selected.node().clone();
                    let failure = match outcome {
                        Ok(Ok(response)) if !response.status().is_server_error() => {
                            node.state().record_success();
                            if response.status().is_success() {
                                let idle = shared.config.idle_timeout;
                                let answer = stream_answer(response, selected, idle, *sent_at);
                                return Poll::Ready(answer);
                            }
                            // 4xx: the request itself is at fault, another node would say the
                            // same; 3xx: no retry either. Both are read to be scrubbed.
                            Failure::Refused(response)
                        }
                        Ok(Ok(response)) => {
                            let failures = node.state().record_failure();
                            tracing::warn!(
                                node = node.id(),
                                status = response.status().as_u16(),
                                failures,
                                "upstream answered with a server error"
                            );
                            Failure::Status(response)
                        }
                        Ok(Err(error @ ClientError::RequestBody(_))) => {
                            // The request's own body broke, not the node: no retry, no blame.
                            tracing::error!(node = node.id(), %error, "cannot send the request");
                            let answer = answered_by(RouterError::Internal, &node);
                            return Poll::Ready(answer);
                        }
                        Ok(Err(error @ ClientError::ReusedConnectionLost(_))) => {
                            // The node most likely closed an idle connection as the request went
                            // out: retried elsewhere like any failure, without blaming the node.
                            tracing::info!(node = node.id(), %error, "upstream connection lost");
                            Failure::Unreachable
                        }
                        Ok(Err(error)) => {
                            let failures = node.state().record_failure();
                            tracing::warn!(node = node.id(), %error, failures, "upstream request failed");
                            Failure::Unreachable
                        }
                        Err(_elapsed) => {
                            let failures = node.state().record_failure();
                            tracing::warn!(
                                node = node.id(),
                                failures,
                                "upstream first-byte timeout"
                            );
                            let answer = answered_by(RouterError::UpstreamTimeout, &node);
                            return Poll::Ready(answer);
                        }
                    };
                    let retried = match failure {
                        Failure::Refused(_) => None,
                        _ => retry(shared, replay.take(), &node),
                    };
                    match retried {
                        Some((sent, again, replay)) => {
                            tracing::info!(
                                from = node.id(),
                                to = again.node().id(),
                                "retrying on another node"
                            );
                            drop(selected);
                            ProxyState::sending(shared.clone(), sent, again, replay)
                        }
                        None => match failure {
                            Failure::Status(response) | Failure::Refused(response) => {
                                ProxyState::ReadingError {
                                    future: Box::pin(read_error(
                                        response,
                                        selected,
                                        shared.config.idle_timeout,
                                    )),
                                }
                            }
                            Failure::Unreachable => {
                                let answer = answered_by(RouterError::UpstreamUnavailable, &node);
                                return Poll::Ready(answer);
                            }
                        },
                    }
                }
            };
            self.as_mut().project().state.set(next);
        }
    }
}

/// Sends the request again on another node, if it may be and one has room.
fn retry<B, R: ProxiedRequest<B>>(
    shared: &Arc<Shared<B>>,
    replay: Option<Replay<R>>,
    failed: &Node,
) -> Option<(Sent, SelectedNode, Option<Replay<R>>)> {
    let mut replay = replay.filter(|r| r.retries_left > 0)?;
    replay.tried.push(failed.id_arc().clone());
    // The budget first: a slot taken and given straight back would count as a quick answer.
    if !shared.budget.withdraw() {
        tracing::warn!(node = failed.id(), "retry budget spent; not retrying");
        return None;
    }
    let Some(again) = shared.another_node(replay.model.as_deref(), &replay.tried, replay.pick)
    else {
        shared.budget.refund();
        return None;
    };
    replay.retries_left -= 1;
    let sent = shared.send(&replay.request, &again);
    let replay = (replay.retries_left > 0).then_some(replay);
    Some((sent, again, replay))
}

/// The router's own answer for `error`.
fn router_answer(error: RouterError) -> Proxied {
    RawResponse::from_http(error.into_response())
}

/// The router's own answer for a failure on `node`, noting the node for history and logs.
fn answered_by(error: RouterError, node: &Node) -> Proxied {
    let mut answer = router_answer(error);
    answer.set_served_by(Some(node.id_arc().clone()));
    answer
}

/// A successful answer: streamed back as it comes, holding the slot until its end. (The
/// client kept only the headers that name no node: [`forwardable_response_header`].)
fn stream_answer(
    answer: NodeAnswer,
    selected: SelectedNode,
    idle_timeout: Duration,
    sent_at: Instant,
) -> Proxied {
    let sse = is_event_stream(&answer);
    let node = selected.node().id_arc().clone();
    let mut answer =
        answer.map(|body| ProxyBody::streaming(body, selected, idle_timeout, sse, sent_at));
    answer.set_served_by(Some(node));
    answer
}

/// An error answer from the node: read whole (bounded), with the node's address scrubbed out.
async fn read_error(answer: NodeAnswer, selected: SelectedNode, read_timeout: Duration) -> Proxied {
    let (mut head, node_body) = answer.into_parts();
    let node = selected.node().clone();
    let read = tokio::time::timeout(
        read_timeout,
        Limited::new(node_body, MAX_ERROR_BODY).collect(),
    )
    .await;
    // The slot is held until the node's answer is read, like a streamed body's.
    drop(selected);
    let body = match read {
        Ok(Ok(collected)) => Some(collected.to_bytes()),
        // Too long to scrub: the client still gets the node's status, with a plain message.
        Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => None,
        Ok(Err(error)) => {
            tracing::warn!(node = node.id(), %error, "cannot read the node's error answer");
            return answered_by(RouterError::UpstreamUnavailable, &node);
        }
        Err(_elapsed) => {
            tracing::warn!(node = node.id(), "the node's error answer went idle");
            return answered_by(RouterError::UpstreamTimeout, &node);
        }
    };
    head.set_served_by(Some(node.id_arc().clone()));
    // The body may change length: the server frames it as it is.
    head.set_content_length(None);
    let encoded = head
        .header("content-encoding")
        .is_some_and(|v| v != b"identity");
    head.remove_header(&header::CONTENT_ENCODING);
    let body = match body {
        Some(body) if !encoded => scrub_address(body, &node),
        // Compressed, or over the limit: it cannot be scrubbed, so it is not passed on.
        _ => {
            tracing::warn!(
                node = node.id(),
                status = head.status().as_u16(),
                encoded,
                "an error answer from the node that cannot be scrubbed is replaced"
            );
            // A static value: it cannot be refused.
            let _ = head.insert_header(&header::CONTENT_TYPE, b"application/json");
            RouterError::UpstreamMessageWithheld {
                status: head.status(),
            }
            .json_body()
        }
    };
    head.map(|()| ProxyBody::from(body))
}

/// `body` with the node's URL, host-and-port and host replaced by `[node]`.
fn scrub_address(body: Bytes, node: &Node) -> Bytes {
    let authority = node.authority();
    let url = format!("http://{authority}");
    let mut scrubbed = body;
    for needle in [url.as_str(), authority.as_str(), authority.host()] {
        scrubbed = replace_all(scrubbed, needle.as_bytes(), b"[node]");
    }
    scrubbed
}

fn replace_all(haystack: Bytes, needle: &[u8], with: &[u8]) -> Bytes {
    if needle.is_empty() {
        return haystack;
    }
    let find = |h: &[u8]| h.windows(needle.len()).position(|w| w == needle);
    let Some(first) = find(&haystack) else {
        return haystack;
    };
    let mut out = Vec::with_capacity(haystack.len());
    let mut rest = &haystack[..];
    let mut at = Some(first);
    while let Some(i) = at {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(with);
        rest = &rest[i + needle.len()..];
        at = find(rest);
    }
    out.extend_from_slice(rest);
    Bytes::from(out)
}

/// The body of a proxied response: the node's stream, or a complete error body.
///
/// While the node's stream lasts it holds the node's slot; the slot is given back at the end
/// of the stream, on error, or when the client drops the body.
pub struct ProxyBody {
    upstream: Option<Upstream>,
    full: Option<Bytes>,
    // The error code the client was given when the stream broke.
    failed: Option<&'static str>,
    // Told the same, for an `http::Response`'s extensions.
    failure: Option<UpstreamFailure>,
}

struct Upstream {
    body: UpstreamBody,
    selected: SelectedNode,
    idle_timeout: Duration,
    sse: bool,
    /// When the request went to the node, until its first body byte arrives: a stream's headers
    /// come at once, so only the first byte of the body tells how quick the node is (its time to
    /// first token).
    awaiting_first_byte: Option<Instant>,
    /// Armed at the first wait for the node, not before: an answer that arrives whole never
    /// touches the timer wheel. Boxed: the answer is moved through every layer on its way
    /// out, and a `Sleep` in place would make it 112 bytes larger.
    idle: Option<Pin<Box<Sleep>>>,
    /// A frame came since the idle timer was last set: it is moved on at the next wait. Frames
    /// leave the timer alone, so a stream that keeps coming costs no timer work per frame.
    idle_stale: bool,
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
            upstream: None,
            full: Some(bytes),
            failed: None,
            failure: None,
        }
    }
}

/// Why a proxied body stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ProxyBodyError {
    /// The node's connection broke mid-body.
    #[error("the upstream node's stream broke")]
    Upstream(#[source] ClientError),
    /// The node sent nothing for the idle timeout.
    #[error("the upstream node's stream went idle")]
    Idle,
}

impl ProxyBody {
    fn streaming(
        body: UpstreamBody,
        selected: SelectedNode,
        idle_timeout: Duration,
        sse: bool,
        sent_at: Instant,
    ) -> Self {
        Self {
            upstream: Some(Upstream {
                body,
                selected,
                idle_timeout,
                sse,
                awaiting_first_byte: Some(sent_at),
                idle: None,
                idle_stale: false,
            }),
            full: None,
            failed: None,
            failure: None,
        }
    }

    /// The error code the client was given if the node's stream broke after it started:
    /// `upstream_unavailable` or `upstream_timeout`. For history and logs, which cannot tell
    /// from an SSE stream (it ends with an error event, not an error).
    pub fn upstream_failure(&self) -> Option<&'static str> {
        self.failed
    }

    /// A handle that learns of a broken stream as [`upstream_failure`](Self::upstream_failure)
    /// does, for a body that is boxed away (into an `http::Response`'s extensions): `None` for
    /// a body that does not stream.
    fn share_failure(&mut self) -> Option<UpstreamFailure> {
        self.upstream.as_ref()?;
        Some(
            self.failure
                .get_or_insert_with(UpstreamFailure::default)
                .clone(),
        )
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
        // Nothing in it is pinned: the idle timer is boxed.
        let this = self.get_mut();
        let Some(upstream) = this.upstream.as_mut() else {
            return Poll::Ready(this.full.take().map(|b| Ok(Frame::data(b))));
        };
        let failure = match Pin::new(&mut upstream.body).poll_frame(cx) {
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
                upstream.idle_stale = true;
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
                this.upstream = None;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(error))) => ProxyBodyError::Upstream(error),
            Poll::Pending => {
                // The idle gap counts from the first poll that has to wait after a frame (or,
                // before any frame, from the first such poll after the head).
                let deadline = || Instant::now() + upstream.idle_timeout;
                match &mut upstream.idle {
                    None => upstream.idle = Some(Box::pin(tokio::time::sleep_until(deadline()))),
                    Some(idle) if upstream.idle_stale => idle.as_mut().reset(deadline()),
                    Some(_) => {}
                }
                upstream.idle_stale = false;
                match upstream.idle.as_mut().map(|s| s.as_mut().poll(cx)) {
                    Some(Poll::Ready(())) => ProxyBodyError::Idle,
                    _ => return Poll::Pending,
                }
            }
        };
        let node = upstream.selected.node();
        let failures = node.state().record_failure();
        tracing::warn!(node = node.id(), error = %failure, failures, "upstream stream ended early");
        let sse = upstream.sse;
        let error = match failure {
            ProxyBodyError::Idle => RouterError::UpstreamTimeout,
            ProxyBodyError::Upstream(_) => RouterError::UpstreamUnavailable,
        };
        this.failed = Some(error.code());
        if let Some(failure) = this.failure.as_ref() {
            failure.set(error.code());
        }
        this.upstream = None;
        if sse {
            // The client already has a 200; tell it in-band, in the shape SDKs parse.
            return Poll::Ready(Some(Ok(Frame::data(error.sse_event()))));
        }
        Poll::Ready(Some(Err(failure)))
    }

    fn is_end_stream(&self) -> bool {
        match &self.upstream {
            Some(u) => u.body.is_end_stream(),
            None => self.full.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.upstream {
            Some(u) => u.body.size_hint(),
            None => SizeHint::with_exact(self.full.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
