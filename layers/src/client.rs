//! A lean HTTP/1.1 client for the proxy: plain TCP to each node, keep-alive connections pooled
//! per node, and each answer read straight off its socket by the body that streams it.
//!
//! Use it through [`PooledProxyService`](crate::PooledProxyService) to talk to inference nodes
//! over `http://`. It is not a general-purpose client: no TLS, no HTTP/2, no proxies, no
//! redirects, and a request body is read whole before it is sent (the proxy's bodies are in
//! memory already, to be sent again on a retry).
//!
//! Why not hyper-util's pooled client, which this replaced: it runs a task per connection and
//! hands every request and answer to that task through channels. Per open stream that held
//! about 28 KiB of heap (an 8 KiB read buffer, an 8 KiB write buffer, a 9 KiB channel block),
//! and every request paid the hand-offs between the tasks. Here the request future writes the
//! request and parses the answer's head, and the [`UpstreamBody`] reads the rest from the same
//! socket. The read buffer is let go whenever it runs empty, so a stream waiting for its next
//! token holds its socket and a few hundred bytes of state.
//!
//! - **Pooling.** A connection goes back to its node's idle list once its answer was read to
//!   the end and both sides allow keep-alive. Connections idle for longer than
//!   `pool_idle_timeout`, or closed by the node meanwhile, are dropped when next looked at. A
//!   body dropped before its end closes its connection, so the node sees the client go.
//!   A background task (started with the first request) drops expired and closed idle
//!   connections every `pool_idle_timeout / 2` (at most 30 s), so none waits in `CLOSE_WAIT`
//!   for traffic to come.
//! - **Stale connections.** A request on a reused connection is sent once more, on a new
//!   connection, when writing it failed, or when nothing came back and it may be repeated
//!   (an idempotent method, or an `Idempotency-Key`): the node may have closed the connection
//!   while it was idle. Other requests are not repeated behind the caller's back (RFC 9112
//!   9.3.1): they fail with [`ClientError::ReusedConnectionLost`], and the caller's own retry
//!   policy decides.
//! - **Framing.** `Content-Length`, `chunked` (trailers are read and dropped; a
//!   `Content-Length` next to it is removed) or close-delimited answers; up to 8 interim (1xx)
//!   answers are skipped; answers to `HEAD`, 204 and 304 have no body. A malformed answer is an
//!   error, and its connection is closed. A [`RawResponse`] (from
//!   [`HttpClient::request_raw_to`]) keeps no framing header among its lines; an answer to
//!   `HEAD` declares its length in [`RawResponse::content_length`].
//! - **Request body.** Written whole, before the answer is read: a node that answers early (a
//!   413, say) and stops reading is waited for until the caller's timeout.
//! - **Headers.** The request goes out with `host` from its URI (or from
//!   [`Forward::authority`]) and `content-length` from its body; the caller's `host`, framing
//!   and hop-by-hop headers, the headers its `connection` names (RFC 9110 7.6.1),
//!   `proxy-authorization` and `proxy-authenticate`, and `expect` (the body is sent at once)
//!   are not sent.
//! - **Sending without giving up the request.** [`HttpClient::request_to`] writes out the head
//!   of a borrowed request, so a caller that may send it again elsewhere keeps it as it is,
//!   with no copy of its headers.

use std::future::Future;
use std::io::{self, IoSlice};
use std::marker::PhantomData;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use pin_project_lite::pin_project;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::FastMap;
use crate::body::CollectBytes;
use crate::raw::RawRequest;
use crate::raw_response::{RawResponse, push_line};
use crate::wire::{
    LANDING_SIZE, header_name, is_framing_header, last_coding_is_chunked, line_end, lists_token,
    parse_chunk_size, parse_length, poll_read_landing, push_decimal,
};
use sealed::Received;

/// Settings for the shared client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientConfig {
    /// Longest TCP connect. Default 2 s.
    pub connect_timeout: Duration,
    /// How long an idle pooled connection is kept. Default 4 s: below the 5 s after which
    /// uvicorn (vLLM, SGLang) and llama.cpp's server close idle connections, so a request
    /// never goes out on a connection the node is closing at that moment.
    pub pool_idle_timeout: Duration,
    /// Most idle connections kept per node. Default 256.
    pub pool_max_idle_per_host: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            pool_idle_timeout: Duration::from_secs(4),
            pool_max_idle_per_host: 256,
        }
    }
}

/// Builds a client: keep-alive pooling, TCP no-delay, connect timeout. Build one per process
/// (or one per runtime, when each thread runs its own) and clone it: clones share the pool.
pub fn build_client<B>(config: &ClientConfig) -> HttpClient<B> {
    HttpClient::new(*config)
}

/// Why a request to a node failed, or its answer's body broke off.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The request's URI cannot be sent: not `http://`, or no host.
    #[error("unsupported upstream URI: {0}")]
    Uri(&'static str),
    /// The TCP connection could not be made.
    #[error("cannot connect: {0}")]
    Connect(#[source] io::Error),
    /// The TCP connection took longer than the connect timeout.
    #[error("connect timed out")]
    ConnectTimeout,
    /// The request's own body failed while it was read.
    #[error("cannot read the request body: {0}")]
    RequestBody(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Reading or writing the connection failed.
    #[error("connection failed: {0}")]
    Io(#[source] io::Error),
    /// The node closed the connection before its answer was complete.
    #[error("connection closed before the answer was complete")]
    Closed,
    /// A reused connection failed after the request went out and before any of the answer came:
    /// most likely the node closed it while idle just as the request was sent, so the node is
    /// not at fault, but it may have read the request. Not sent again (see the module docs).
    #[error("a reused connection was lost before the answer: {0}")]
    ReusedConnectionLost(#[source] Box<ClientError>),
    /// The answer's head is not valid HTTP/1.
    #[error("malformed answer head: {0}")]
    Parse(#[from] httparse::Error),
    /// The answer is not valid HTTP/1 otherwise (framing, sizes).
    #[error("malformed answer: {0}")]
    Malformed(&'static str),
}

/// A pooled HTTP/1.1 client over plain TCP; see the module docs. Cheap to clone; clones share
/// the pool.
///
/// `B` is the request body type it is used with (any [`Body`]; it is read whole before
/// sending).
pub struct HttpClient<B = Full<Bytes>> {
    shared: Arc<ClientShared>,
    _body: PhantomData<fn(B)>,
}

impl<B> Clone for HttpClient<B> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            _body: PhantomData,
        }
    }
}

impl<B> std::fmt::Debug for HttpClient<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<B> HttpClient<B> {
    /// A client with an empty pool.
    pub fn new(config: ClientConfig) -> Self {
        Self {
            shared: Arc::new(ClientShared {
                config,
                idle: Mutex::new(FastMap::default()),
                sweeping: AtomicBool::new(false),
            }),
            _body: PhantomData,
        }
    }

    /// Idle connections in the pool, over all nodes.
    pub fn idle_connections(&self) -> usize {
        self.shared.lock().values().map(Vec::len).sum()
    }

    /// Idle connections in the pool that keep a head timer.
    #[cfg(test)]
    fn idle_head_timers(&self) -> usize {
        let idle = self.shared.lock();
        idle.values()
            .flatten()
            .filter(|idle| idle.connection.head_timer.is_some())
            .count()
    }

    /// Sends `request` (an absolute `http://` URI) and resolves to the answer's head; the
    /// answer's body streams from the connection.
    pub fn request(&self, request: Request<B>) -> ResponseFuture
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = request.into_parts();
        if parts.uri.scheme_str() != Some("http") {
            return ResponseFuture::failed(ClientError::Uri("only http:// is supported"));
        }
        let Some(authority) = parts.uri.authority() else {
            return ResponseFuture::failed(ClientError::Uri("no host"));
        };
        let outgoing = Outgoing::new(
            &parts.method,
            &parts.uri,
            &parts.headers,
            Forward::plain(authority),
        );
        self.start(outgoing, body)
    }

    /// Sends a copy of `request` to a node, as [`Forward`] says, leaving the request with the
    /// caller: the head is written out at once, and the body is cloned (for an in-memory body,
    /// a reference count). For a caller that may send the same request to another node after
    /// a failure, without copying its headers.
    pub fn request_to(&self, request: &Request<B>, to: Forward<'_>) -> ResponseFuture
    where
        B: Body + Clone + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let outgoing = Outgoing::new(request.method(), request.uri(), request.headers(), to);
        self.start(outgoing, request.body().clone())
    }

    /// [`request_to`](Self::request_to) for a [`RawRequest`]: its header lines are copied as
    /// they came, and its body (already whole) is shared, not copied. The answer is a
    /// [`RawResponse`]: the kept header lines copied as the node wrote them, into one buffer,
    /// without the framing ones.
    pub fn request_raw_to(
        &self,
        request: &RawRequest,
        to: Forward<'_>,
    ) -> ResponseFuture<RawResponse<UpstreamBody>> {
        self.request_raw_within(request, to, None)
    }

    /// [`request_raw_to`](Self::request_raw_to), giving up on the answer's head at
    /// `head_deadline` ([`ResponseFuture::poll_within`]).
    pub(crate) fn request_raw_within(
        &self,
        request: &RawRequest,
        to: Forward<'_>,
        head_deadline: Option<tokio::time::Instant>,
    ) -> ResponseFuture<RawResponse<UpstreamBody>> {
        let body = match request.body_slice() {
            Ok(body) => body,
            Err(too_large) => {
                return ResponseFuture::failed(ClientError::RequestBody(Box::new(too_large)));
            }
        };
        let mut outgoing = Outgoing::raw(request, to).answered_as_lines(head_deadline);
        // A small body goes into the head here, from the request's bytes: as `Bytes` of its
        // own it would first make them shared (an allocation, and a count on each drop).
        let body = if body.len() <= INLINE_BODY {
            outgoing.end_head_with(body);
            Bytes::new()
        } else {
            request.body().cloned().unwrap_or_default()
        };
        ResponseFuture::new(send(self.shared.clone(), outgoing, Full::new(body)))
    }

    /// [`request_to`](Self::request_to), answered as a [`RawResponse`] as
    /// [`request_raw_to`](Self::request_raw_to) is, giving up on the answer's head at
    /// `head_deadline`.
    pub(crate) fn request_lines_within(
        &self,
        request: &Request<B>,
        to: Forward<'_>,
        head_deadline: Option<tokio::time::Instant>,
    ) -> ResponseFuture<RawResponse<UpstreamBody>>
    where
        B: Body + Clone + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let outgoing = Outgoing::new(request.method(), request.uri(), request.headers(), to);
        self.start(
            outgoing.answered_as_lines(head_deadline),
            request.body().clone(),
        )
    }

    fn start<A>(&self, outgoing: Outgoing, body: B) -> ResponseFuture<A>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        ResponseFuture::new(send(self.shared.clone(), outgoing, body))
    }
}

/// Where and how [`HttpClient::request_to`] sends a borrowed request, and what it keeps of
/// the answer's head.
#[derive(Debug, Clone, Copy)]
pub struct Forward<'a> {
    /// The node's host and port: the request goes to `http://{authority}`.
    pub authority: &'a Authority,
    /// Goes before the request's path and query (a node's base path; usually empty).
    pub path_prefix: &'a str,
    /// The request's own headers of these names are not sent; where a value is given, it is
    /// sent in their place, unless the name is one the client never sends as given (`host`,
    /// framing, hop-by-hop). So a caller sets or removes a header per node without touching
    /// the request (and without an insert that may have to grow its header map).
    pub replaced: &'a [(&'a HeaderName, Option<&'a HeaderValue>)],
    /// The answer headers to hand back, by name in lower case (ASCII: httparse has checked it is
    /// a token). The others are skipped as the head
    /// is parsed, before a `HeaderName` is made of them (for a name `http` does not know, an
    /// allocation): what the framing ones (`content-length`, `transfer-encoding`, `connection`)
    /// say is noted on the way, and none of them goes into the map, so a caller that passes on
    /// only some does not build a second header map.
    pub keep_answer_header: fn(&[u8]) -> bool,
}

impl<'a> Forward<'a> {
    /// To `authority` as the request is: no path prefix, no header replaced, every answer
    /// header kept.
    fn plain(authority: &'a Authority) -> Self {
        Self {
            authority,
            path_prefix: "",
            replaced: &[],
            keep_answer_header: keep_every_header,
        }
    }
}

/// Every answer header.
fn keep_every_header(_: &[u8]) -> bool {
    true
}

/// The answer to [`HttpClient::request`]: its head, with the body still on the connection. An
/// `http::Response`, or a [`RawResponse`] for [`HttpClient::request_raw_to`].
pub struct ResponseFuture<A = Response<UpstreamBody>> {
    inner: Pin<Box<dyn Future<Output = Result<Received, Unanswered>> + Send>>,
    _answer: PhantomData<fn() -> A>,
}

impl<A> std::fmt::Debug for ResponseFuture<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<A> ResponseFuture<A> {
    fn new(inner: impl Future<Output = Result<Received, Unanswered>> + Send + 'static) -> Self {
        Self {
            inner: Box::pin(inner),
            _answer: PhantomData,
        }
    }

    fn failed(error: ClientError) -> Self {
        Self::new(std::future::ready(Err(Unanswered::Failed(error))))
    }
}

impl<A: sealed::FromReceived> ResponseFuture<A> {
    /// The answer, or the client's error, or [`HeadTimedOut`] once the deadline the request
    /// was sent with passed.
    pub(crate) fn poll_within(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Result<A, ClientError>, HeadTimedOut>> {
        self.inner.as_mut().poll(cx).map(|received| match received {
            Ok(received) => Ok(Ok(A::from_received(received))),
            Err(Unanswered::Failed(error)) => Ok(Err(error)),
            Err(Unanswered::TimedOut) => Err(HeadTimedOut),
        })
    }
}

/// The deadline for an answer's head passed.
#[derive(Debug)]
pub(crate) struct HeadTimedOut;

impl<A: sealed::FromReceived> Future for ResponseFuture<A> {
    type Output = Result<A, ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The public requests set no deadline; were one to pass, it is a timed-out read.
        self.poll_within(cx).map(|answer| {
            answer
                .unwrap_or_else(|HeadTimedOut| Err(ClientError::Io(io::ErrorKind::TimedOut.into())))
        })
    }
}

mod sealed {
    use http::{Response, StatusCode};

    use super::{AnswerHead, AnswerHeaders, UpstreamBody};
    use crate::raw_response::RawResponse;

    /// A node's answer head and body as `send` reads them, before they take the caller's type.
    pub struct Received {
        pub(super) head: AnswerHead,
        pub(super) body: UpstreamBody,
    }

    /// What the client answers with: an `http::Response` or a [`RawResponse`].
    pub trait FromReceived {
        fn from_received(received: Received) -> Self;
    }

    impl FromReceived for Response<UpstreamBody> {
        fn from_received(received: Received) -> Self {
            let Received { head, body } = received;
            let mut response = match head.headers {
                AnswerHeaders::Map(headers) => {
                    let mut response = Response::new(body);
                    *response.headers_mut() = headers;
                    response
                }
                lines => raw(head.status, lines, body).into_http(),
            };
            *response.status_mut() = head.status;
            *response.version_mut() = head.version;
            response
        }
    }

    impl FromReceived for RawResponse<UpstreamBody> {
        fn from_received(received: Received) -> Self {
            raw(received.head.status, received.head.headers, received.body)
        }
    }

    /// A [`RawResponse`] over `headers`, lines or not.
    fn raw(
        status: StatusCode,
        headers: AnswerHeaders,
        body: UpstreamBody,
    ) -> RawResponse<UpstreamBody> {
        match headers {
            AnswerHeaders::Lines {
                lines,
                has_date,
                content_length,
            } => {
                let mut raw = RawResponse::from_lines(status, lines, has_date, body);
                raw.set_content_length(content_length);
                raw
            }
            AnswerHeaders::Map(headers) => {
                let mut response = Response::new(body);
                *response.status_mut() = status;
                *response.headers_mut() = headers;
                RawResponse::from_http(response)
            }
        }
    }
}

/// The pool: idle connections per node authority, oldest first.
struct ClientShared {
    config: ClientConfig,
    idle: Mutex<FastMap<Box<str>, Vec<IdleConnection>>>,
    /// Whether the sweeper task runs (it starts with the first request, inside a runtime).
    sweeping: AtomicBool,
}

struct IdleConnection {
    connection: Box<Connection>,
    since: Instant,
}

impl ClientShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, FastMap<Box<str>, Vec<IdleConnection>>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The newest idle connection to `key` that is still open.
    fn checkout(&self, key: &str) -> Option<Box<Connection>> {
        let mut unusable = Vec::new();
        let found = {
            let mut idle = self.lock();
            let connections = idle.get_mut(key)?;
            let now = Instant::now();
            let mut found = None;
            while let Some(idle) = connections.pop() {
                if self.usable(&idle, now) {
                    found = Some(idle.connection);
                    break;
                }
                unusable.push(idle);
            }
            found
        };
        // Closed outside the lock.
        drop(unusable);
        found
    }

    /// Puts a connection whose answer was read to the end back into the pool, as a new one:
    /// no read buffer, reads starting small.
    fn check_in(&self, key: &str, mut connection: Box<Connection>) {
        connection.buf = BytesMut::new();
        connection.read_size = READ_MIN;
        let mut idle = self.lock();
        let connections = match idle.get_mut(key) {
            Some(connections) => connections,
            None => idle.entry(key.into()).or_default(),
        };
        if connections.len() < self.config.pool_max_idle_per_host {
            connections.push(IdleConnection {
                connection,
                since: Instant::now(),
            });
            return;
        }
        drop(idle);
        drop(connection);
    }

    fn usable(&self, idle: &IdleConnection, now: Instant) -> bool {
        now.duration_since(idle.since) <= self.config.pool_idle_timeout
            && still_open(&idle.connection.stream)
    }

    /// Drops expired and closed idle connections, and the entries of nodes left with none.
    fn sweep(&self) {
        let mut unusable = Vec::new();
        {
            let mut idle = self.lock();
            let now = Instant::now();
            for connections in idle.values_mut() {
                let (keep, gone): (Vec<_>, Vec<_>) = std::mem::take(connections)
                    .into_iter()
                    .partition(|c| self.usable(c, now));
                *connections = keep;
                unusable.extend(gone);
            }
            idle.retain(|_, connections| !connections.is_empty());
        }
        drop(unusable);
    }

    /// Starts the sweeper once; it ends when the client is gone.
    fn start_sweeping(self: &Arc<Self>) {
        if self.sweeping.load(Ordering::Relaxed) || self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let every = (self.config.pool_idle_timeout / 2)
            .clamp(Duration::from_millis(100), Duration::from_secs(30));
        let shared: Weak<ClientShared> = Arc::downgrade(self);
        let running = SweeperRunning(shared.clone());
        tokio::spawn(async move {
            let _running = running;
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                shared.sweep();
            }
        });
    }
}

/// Held by the sweeper task: when the task goes (its runtime shut down, say), the next request
/// starts a new one.
struct SweeperRunning(Weak<ClientShared>);

impl Drop for SweeperRunning {
    fn drop(&mut self) {
        if let Some(shared) = self.0.upgrade() {
            shared.sweeping.store(false, Ordering::Relaxed);
        }
    }
}

/// Whether an idle connection is still usable: nothing to read, not closed by the node. Costs
/// no system call unless the socket became readable while idle.
fn still_open(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

async fn send<B>(
    shared: Arc<ClientShared>,
    outgoing: Outgoing,
    body: B,
) -> Result<Received, Unanswered>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Outgoing {
        authority,
        mut head,
        head_ended,
        no_body,
        repeatable,
        body_expected,
        keep_answer_header,
        lines,
        head_deadline,
    } = outgoing;
    let body = within(head_deadline, &mut None, CollectBytes::new(body))
        .await?
        .map_err(|e| ClientError::RequestBody(e.into()))?;
    if !head_ended {
        end_head(&mut head, body.len(), body_expected);
    }
    let body: &[u8] = if body.len() <= INLINE_BODY {
        head.extend_from_slice(&body);
        &[]
    } else {
        &body
    };
    shared.start_sweeping();
    let mut pooled = shared.checkout(authority.as_str());
    loop {
        let reused = pooled.is_some();
        let mut connection = match pooled.take() {
            Some(connection) => connection,
            None => {
                let mut head_timer = None;
                let connect = connect(&shared.config, &authority);
                let stream = within(head_deadline, &mut head_timer, connect).await??;
                Box::new(Connection::new(stream, head_timer))
            }
        };
        let mut head_timer = connection.head_timer.take();
        let exchange = exchange(&mut connection, &head, body, keep_answer_header, lines);
        let exchanged = within(head_deadline, &mut head_timer, exchange).await?;
        connection.head_timer = head_timer;
        match exchanged {
            Ok(mut head) => {
                let (framing, keep_alive) = framing(&head, no_body)?;
                match &mut head.headers {
                    AnswerHeaders::Map(headers) if head.facts.transfer_encoding.is_some() => {
                        // Ignored for framing (RFC 9112 6.3), so not passed on either.
                        headers.remove(header::CONTENT_LENGTH);
                    }
                    AnswerHeaders::Lines { content_length, .. } if no_body => {
                        // The one length the lines do not carry that a client still reads.
                        if let (None, Length::Is(length)) =
                            (head.facts.transfer_encoding, head.facts.length)
                        {
                            *content_length = Some(length);
                        }
                    }
                    _ => {}
                }
                let body = UpstreamBody::new(
                    connection,
                    framing,
                    keep_alive.then(|| (shared.clone(), authority.clone())),
                );
                return Ok(Received { head, body });
            }
            // The node closed the idle connection as the request went out: once more, anew,
            // if the node cannot have acted on it or acting twice does no harm.
            Err(Failed::NotSent(_)) if reused => continue,
            Err(Failed::NoAnswer(_)) if reused && repeatable => continue,
            Err(Failed::NoAnswer(error)) if reused => {
                let lost = ClientError::ReusedConnectionLost(Box::new(error));
                return Err(Unanswered::Failed(lost));
            }
            Err(Failed::NotSent(error) | Failed::NoAnswer(error) | Failed::Answering(error)) => {
                return Err(Unanswered::Failed(error));
            }
        }
    }
}

/// Why [`send`] has no answer head for its caller.
enum Unanswered {
    Failed(ClientError),
    /// The caller's deadline for the head passed.
    TimedOut,
}

impl From<ClientError> for Unanswered {
    fn from(error: ClientError) -> Self {
        Self::Failed(error)
    }
}

/// The timer for a deadline on an answer's head, kept with its connection, and the runtime
/// whose timer wheel it is in. Each request on the connection moves it on with `Sleep::reset`,
/// an atomic update in tokio while deadlines only grow (the wheel sees the new one when the old
/// one comes). A new timer for each request (a `tokio::time::timeout`) put an entry into the
/// wheel and took it out again under its lock; the proxy's request path went from 29,023 to
/// 28,803 instructions (callgrind).
///
/// A client may be shared by several runtimes, so a connection may be used on another runtime
/// than its timer's, which may be idle or gone (a timer of a runtime that shut down panics when
/// polled): there a new timer is made.
type HeadTimer = Option<(Pin<Box<Sleep>>, tokio::runtime::Id)>;

/// Runs `future` until `deadline` (if there is one) on `timer`: a timer set before on this
/// runtime is moved on, and one is made only when `future` has to wait.
///
/// The timer stays set after the head came, while the body streams and while the connection
/// is idle in the pool. So it keeps the waker of the task that last waited on it until the
/// deadline passes (one spurious wake-up, for a stream longer than the deadline), the
/// connection's next request or its close (the sweeper closes it once idle for
/// `pool_idle_timeout`): an idle connection may keep a finished task's memory until then.
/// Letting go of the waker at once (a poll with a no-op waker) cost some 100 instructions a
/// request.
fn within<F: Future>(
    deadline: Option<tokio::time::Instant>,
    timer: &mut HeadTimer,
    future: F,
) -> Within<'_, F> {
    Within {
        future,
        deadline,
        timer,
        set: false,
    }
}

pin_project! {
    /// The future of [`within`]; a struct rather than an `async fn`, which would keep `future`
    /// twice in its state (as the argument and pinned), and the state of `send` grows with it.
    struct Within<'t, F> {
        #[pin]
        future: F,
        deadline: Option<tokio::time::Instant>,
        timer: &'t mut HeadTimer,
        set: bool,
    }
}

/// Whether the current runtime is `runtime`.
fn on_runtime(runtime: tokio::runtime::Id) -> bool {
    tokio::runtime::Handle::try_current().is_ok_and(|current| current.id() == runtime)
}

impl<F: Future> Future for Within<'_, F> {
    type Output = Result<F::Output, Unanswered>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(value) = this.future.poll(cx) {
            return Poll::Ready(Ok(value));
        }
        let Some(deadline) = *this.deadline else {
            return Poll::Pending;
        };
        let timer = match this.timer {
            Some((timer, _)) if *this.set => timer,
            Some((timer, runtime)) if on_runtime(*runtime) => {
                timer.as_mut().reset(deadline);
                timer
            }
            _ => {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    let error = io::Error::other("no tokio runtime to time the answer's head");
                    return Poll::Ready(Err(Unanswered::Failed(ClientError::Io(error))));
                };
                let timer = Box::pin(tokio::time::sleep_until(deadline));
                &mut this.timer.insert((timer, runtime.id())).0
            }
        };
        *this.set = true;
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Err(Unanswered::TimedOut))
    }
}

/// How a request failed on one connection.
enum Failed {
    /// Writing the request failed: the node has no complete request.
    NotSent(ClientError),
    /// The request went out and nothing of an answer came back.
    NoAnswer(ClientError),
    /// Part of an answer came back.
    Answering(ClientError),
}

/// Writes the request and reads the answer's head.
async fn exchange(
    connection: &mut Connection,
    head: &[u8],
    body: &[u8],
    keep_header: fn(&[u8]) -> bool,
    lines: bool,
) -> Result<AnswerHead, Failed> {
    write_request(&mut connection.stream, head, body)
        .await
        .map_err(|e| Failed::NotSent(ClientError::Io(e)))?;
    let mut received = false;
    let mut interim = 0;
    // Where the search for the head's end resumes: a head that trickles in is not parsed again
    // from its start on every read.
    let mut searched: usize = 0;
    loop {
        // Two bytes back, so that a blank line split across reads is found.
        if holds_blank_line(&connection.buf[searched.saturating_sub(2)..])
            && let Some(answer) = parse_head(&mut connection.buf, &mut interim, keep_header, lines)
                .map_err(Failed::Answering)?
        {
            return Ok(answer);
        }
        searched = connection.buf.len();
        if connection.buf.len() > MAX_HEAD {
            return Err(Failed::Answering(ClientError::Malformed(
                "answer head too long",
            )));
        }
        let read = std::future::poll_fn(|cx| connection.poll_fill(cx)).await;
        match read {
            Ok(0) if received || !connection.buf.is_empty() => {
                return Err(Failed::Answering(ClientError::Closed));
            }
            Ok(0) => return Err(Failed::NoAnswer(ClientError::Closed)),
            Ok(_) => received = true,
            Err(error) if received => return Err(Failed::Answering(ClientError::Io(error))),
            Err(error) => return Err(Failed::NoAnswer(ClientError::Io(error))),
        }
    }
}

/// Whether `buf` holds a blank line, which ends a head: CR LF CR LF, or the bare LF forms
/// httparse also accepts (LF LF, LF CR LF). Only the line ends are looked at.
fn holds_blank_line(buf: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', buf).any(|at| match buf.get(at + 1) {
        Some(b'\n') => true,
        Some(b'\r') => buf.get(at + 2) == Some(&b'\n'),
        _ => false,
    })
}

async fn connect(config: &ClientConfig, authority: &Authority) -> Result<TcpStream, ClientError> {
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port = authority.port_u16().unwrap_or(80);
    let deadline = tokio::time::Instant::now() + config.connect_timeout;
    let addresses: Vec<_> =
        tokio::time::timeout_at(deadline, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_elapsed| ClientError::ConnectTimeout)?
            .map_err(ClientError::Connect)?
            .collect();
    // Each address gets an even share of the time left, so one that never answers (an IPv6
    // address without a route, say) does not use up the whole timeout.
    let mut last = None;
    let mut connected = None;
    for (tried, address) in addresses.iter().enumerate() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let share = left / u32::try_from(addresses.len() - tried).unwrap_or(u32::MAX);
        match tokio::time::timeout(share, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => {
                connected = Some(stream);
                break;
            }
            Ok(Err(error)) => last = Some(ClientError::Connect(error)),
            Err(_elapsed) => last = Some(ClientError::ConnectTimeout),
        }
    }
    let stream = connected.ok_or_else(|| {
        last.unwrap_or_else(|| {
            ClientError::Connect(io::Error::new(
                io::ErrorKind::NotFound,
                "the host has no address",
            ))
        })
    })?;
    stream.set_nodelay(true).map_err(ClientError::Connect)?;
    // Finds a node that vanished without closing (power loss, a dropped route) within minutes.
    let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
    if let Err(error) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(%error, "cannot set TCP keep-alive");
    }
    Ok(stream)
}

/// Request headers not sent as given: the client sets `host` and the framing itself, the
/// rest belong to one connection (RFC 9110 7.6.1), ask for an interim answer, or are meant for
/// a proxy (this client talks to its nodes directly).
fn sent_as_given(name: &HeaderName) -> bool {
    sent_as_given_lowercase(name.as_str().as_bytes())
}

/// [`sent_as_given`] for a name as a client wrote it, in any case.
fn sent_as_given_raw(name: &[u8]) -> bool {
    // The longest name not sent is 19 bytes; a longer one is sent.
    lowercase(name, &mut [0u8; 19]).is_none_or(sent_as_given_lowercase)
}

// Bytes, not `str`: a `str::from_utf8` of a short name cost about 90 instructions, once per
// header.
fn sent_as_given_lowercase(name: &[u8]) -> bool {
    !matches!(
        name,
        b"host"
            | b"content-length"
            | b"transfer-encoding"
            | b"connection"
            | b"keep-alive"
            | b"proxy-connection"
            | b"proxy-authorization"
            | b"proxy-authenticate"
            | b"te"
            | b"trailer"
            | b"upgrade"
            | b"expect"
    )
}

/// A request on its way out: its head up to the framing, and what the exchange needs to know.
struct Outgoing {
    authority: Authority,
    /// The request line and headers; `end_head` adds the framing and the blank line.
    head: Vec<u8>,
    /// Whether `head` is whole, body included ([`Outgoing::end_head_with`]): the body to
    /// send is then empty.
    head_ended: bool,
    /// An answer to `HEAD` has no body.
    no_body: bool,
    /// Whether it may be sent twice (RFC 9110 9.2.2, or an `Idempotency-Key`).
    repeatable: bool,
    /// Whether the method has a body, so `content-length: 0` is sent for an empty one.
    body_expected: bool,
    /// Which answer headers to hand back.
    keep_answer_header: fn(&[u8]) -> bool,
    /// Whether they are handed back as lines (for a [`RawResponse`]) rather than a map.
    lines: bool,
    /// When the caller stops waiting for the answer's head: the body's collection, the
    /// connect and the exchange all count.
    head_deadline: Option<tokio::time::Instant>,
}

impl Outgoing {
    /// The head of a request with `method`, `uri`'s path and query and `headers`, sent as `to`
    /// says.
    fn new(method: &Method, uri: &http::Uri, headers: &HeaderMap, to: Forward<'_>) -> Self {
        let mut head = request_line(method, origin_form(uri).as_bytes(), &to, 256);
        let lines = || {
            headers
                .iter()
                .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes(), None))
        };
        let idempotency_key = copy_lines(&mut head, &[], lines, &to);
        Self::finish(head, method, idempotency_key, to)
    }

    /// [`Outgoing::new`] for a [`RawRequest`]: its header lines copied as the client wrote
    /// them, names in their case.
    fn raw(request: &RawRequest, to: Forward<'_>) -> Self {
        let method = request.method();
        // Room for the head as it came, a body sent with it, and what is set for the node.
        let body = request.body_slice().map_or(0, <[u8]>::len);
        let room = request.head_len() + if body <= INLINE_BODY { body } else { 0 } + 128;
        let mut head = request_line(method, request.path_and_query_bytes(), &to, room);
        let lines = || request.header_lines();
        let idempotency_key = copy_lines(&mut head, request.message(), lines, &to);
        Self::finish(head, method, idempotency_key, to)
    }

    /// Adds the replacing headers to `head` and says what the exchange needs to know.
    fn finish(mut head: Vec<u8>, method: &Method, idempotency_key: bool, to: Forward<'_>) -> Self {
        for (name, value) in to.replaced {
            if let Some(value) = value
                && sent_as_given(name)
            {
                push_line(&mut head, name.as_str().as_bytes(), value.as_bytes());
            }
        }
        Self {
            authority: to.authority.clone(),
            head,
            head_ended: false,
            no_body: method == Method::HEAD,
            repeatable: method.is_idempotent() || idempotency_key,
            body_expected: matches!(*method, Method::POST | Method::PUT | Method::PATCH),
            keep_answer_header: to.keep_answer_header,
            lines: false,
            head_deadline: None,
        }
    }

    /// Ends the head with `body` in it, which is then all there is to send.
    fn end_head_with(&mut self, body: &[u8]) {
        end_head(&mut self.head, body.len(), self.body_expected);
        self.head.extend_from_slice(body);
        self.head_ended = true;
    }

    /// The same request, its answer's headers kept as lines, and its head awaited until
    /// `head_deadline`.
    fn answered_as_lines(self, head_deadline: Option<tokio::time::Instant>) -> Self {
        Self {
            lines: true,
            head_deadline,
            ..self
        }
    }
}

/// A request header to copy: its name, its value, and where its line is in the request's
/// bytes, when it can go out as it came (`None`: it is written anew).
pub(crate) type HeaderLine<'a> = (&'a [u8], &'a [u8], Option<Range<usize>>);

/// Appends the request's header lines (from `lines`, names in any case) the node gets: all
/// but the ones never sent as given, the ones `to` replaces, and the ones a `connection` value
/// names (RFC 9110 7.6.1: for this hop only). Lines that stand next to each other in `source`,
/// the request's bytes, go out in one copy. Says whether the request has an `idempotency-key`
/// (found on the way: a lookup of its own was a second pass over the headers).
fn copy_lines<'a, I>(
    head: &mut Vec<u8>,
    source: &[u8],
    lines: impl Fn() -> I,
    to: &Forward<'_>,
) -> bool
where
    I: Iterator<Item = HeaderLine<'a>>,
{
    let start = head.len();
    let flush = |head: &mut Vec<u8>, run: Option<Range<usize>>| {
        if let Some(run) = run {
            head.extend_from_slice(source.get(run).unwrap_or_default());
        }
    };
    // Copies the lines `dropped` does not name; says whether `connection` names any, and
    // whether there is an `idempotency-key`.
    let copy = |head: &mut Vec<u8>, dropped: &[&[u8]]| {
        let (mut options, mut idempotency_key) = (false, false);
        let mut run: Option<Range<usize>> = None;
        for (name, value, as_it_came) in lines() {
            idempotency_key |= name.len() == IDEMPOTENCY_KEY.len()
                && name.eq_ignore_ascii_case(IDEMPOTENCY_KEY.as_bytes());
            if !sent_as_given_raw(name) {
                options |= is_connection(name) && connection_options(value).next().is_some();
                continue;
            }
            let replaced = to
                .replaced
                .iter()
                .any(|(r, _)| name.eq_ignore_ascii_case(r.as_str().as_bytes()));
            let listed = dropped.iter().any(|d| name.eq_ignore_ascii_case(d));
            if replaced || listed {
                continue;
            }
            match (as_it_came, &mut run) {
                (Some(line), Some(run)) if run.end == line.start => run.end = line.end,
                (Some(line), _) => flush(head, run.replace(line)),
                (None, _) => {
                    flush(head, run.take());
                    push_line(head, name, value);
                }
            }
        }
        flush(head, run);
        (options, idempotency_key)
    };
    let (options, idempotency_key) = copy(head, &[]);
    if options {
        // Rare: written again without the headers `connection` names.
        head.truncate(start);
        let dropped: Vec<&[u8]> = lines()
            .filter(|(name, _, _)| is_connection(name))
            .flat_map(|(_, value, _)| connection_options(value))
            .collect();
        copy(head, &dropped);
    }
    idempotency_key
}

/// Makes a request that is not idempotent by its method safe to send twice (see
/// [`Outgoing::repeatable`]).
const IDEMPOTENCY_KEY: &str = "idempotency-key";

fn is_connection(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"connection")
}

/// The header names a `connection` value lists, not `close` or `keep-alive`.
fn connection_options(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| {
            !t.is_empty()
                && !t.eq_ignore_ascii_case(b"close")
                && !t.eq_ignore_ascii_case(b"keep-alive")
        })
}

/// `uri`'s path and query as a request line's target: `/` for a `uri` without a path.
pub(crate) fn origin_form(uri: &http::Uri) -> &str {
    match uri.path_and_query().map(|pq| pq.as_str()) {
        Some(target) if !target.is_empty() => target,
        _ => "/",
    }
}

/// The request line and `host`, for `target` (path and query) sent as `to` says.
fn request_line(method: &Method, target: &[u8], to: &Forward<'_>, room: usize) -> Vec<u8> {
    let mut head = Vec::with_capacity(room);
    head.extend_from_slice(method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(to.path_prefix.as_bytes());
    head.extend_from_slice(target);
    head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    let host = to.authority.as_str();
    head.extend_from_slice(host.rsplit_once('@').map_or(host, |(_, h)| h).as_bytes());
    head.extend_from_slice(b"\r\n");
    head
}

/// Ends the head with the body's length (when there is a body, or the method expects one)
/// and the blank line.
fn end_head(head: &mut Vec<u8>, body_len: usize, body_expected: bool) {
    if body_len > 0 || body_expected {
        head.extend_from_slice(b"content-length: ");
        push_decimal(head, body_len);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
}

/// Bodies up to this size are sent in the head's buffer, with one `send`: for the kernel a
/// `writev` of head and body costs more than copying a few KiB here (`perf record` of the
/// floor proxy: `vfs_writev` and its file lookups, some 0.3 µs a request).
const INLINE_BODY: usize = 4 * 1024;

/// Head and body in as few writes as the socket allows: usually one.
async fn write_request(stream: &mut TcpStream, head: &[u8], body: &[u8]) -> io::Result<()> {
    if body.is_empty() {
        return stream.write_all(head).await;
    }
    let (mut head, mut body) = (head, body);
    while !head.is_empty() {
        let written = stream
            .write_vectored(&[IoSlice::new(head), IoSlice::new(body)])
            .await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if written < head.len() {
            head = &head[written..];
        } else {
            body = &body[written - head.len()..];
            head = &[];
        }
    }
    stream.write_all(body).await
}

/// Longest answer head read.
const MAX_HEAD: usize = 64 * 1024;
/// Most interim (1xx) answers before the final one.
const MAX_INTERIM: u32 = 8;
/// Most header fields in an answer head.
const MAX_HEADERS: usize = 128;
/// Longest chunk-size or trailer line.
const MAX_LINE: usize = 4 * 1024;
/// Smallest and largest read: reads grow while they fill the buffer.
const READ_MIN: usize = LANDING_SIZE;
const READ_MAX: usize = 128 * 1024;

/// A parsed answer head.
#[derive(Debug)]
struct AnswerHead {
    status: StatusCode,
    version: Version,
    /// The headers the caller keeps.
    headers: AnswerHeaders,
    /// What all of them said about the framing, kept or not.
    facts: FramingFacts,
}

/// The headers of an answer the caller keeps, as it asked for them.
#[derive(Debug)]
enum AnswerHeaders {
    /// In a map, whose values share one copy of the head.
    Map(HeaderMap),
    /// As `name: value\r\n` lines, names as the node wrote them, no framing header among them.
    Lines {
        lines: Vec<u8>,
        has_date: bool,
        /// The length an answer to `HEAD` declares (its body is empty).
        content_length: Option<u64>,
    },
}

/// What an answer's headers say about how its body is framed and whether its connection is
/// kept, gathered as its head is parsed: the framing headers a caller does not pass on are
/// never put in a map.
#[derive(Debug, Default, Clone, Copy)]
struct FramingFacts {
    /// A `connection` header says `close`.
    close: bool,
    /// The last `transfer-encoding` header, if any: whether its last coding is `chunked`.
    transfer_encoding: Option<bool>,
    /// What the `content-length` headers say.
    length: Length,
}

/// The `content-length` headers of an answer: none, one length (repeated alike, maybe), or
/// the first thing wrong with them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Length {
    #[default]
    Absent,
    Is(u64),
    Bad(&'static str),
}

impl FramingFacts {
    /// Notes the header `name` (lower case) with `value`, if it frames the answer.
    fn add(&mut self, name: &[u8], value: &[u8]) {
        match name {
            b"connection" => self.close |= lists_token(value, b"close"),
            b"transfer-encoding" => self.transfer_encoding = Some(last_coding_is_chunked(value)),
            b"content-length" => {
                for part in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    self.length = match (self.length, parse_length(part)) {
                        (Length::Bad(why), _) => Length::Bad(why),
                        (_, None) => Length::Bad("content-length"),
                        (Length::Is(l), Some(n)) if l != n => {
                            Length::Bad("conflicting content-length")
                        }
                        (_, Some(n)) => Length::Is(n),
                    };
                }
            }
            _ => {}
        }
    }
}

/// Parses a final answer head off the front of `buf`, skipping interim (1xx) answers and
/// counting them in `interim`; `None` until the head is complete. Only the headers `keep`
/// accepts are read into the map; the framing headers, kept or not, into its `FramingFacts`.
fn parse_head(
    buf: &mut BytesMut,
    interim: &mut u32,
    keep: fn(&[u8]) -> bool,
    as_lines: bool,
) -> Result<Option<AnswerHead>, ClientError> {
    loop {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut fields);
        let httparse::Status::Complete(length) = parsed.parse(buf)? else {
            return Ok(None);
        };
        if length > MAX_HEAD {
            return Err(ClientError::Malformed("answer head too long"));
        }
        let code = parsed.code.unwrap_or_default();
        if (100..200).contains(&code) && code != 101 {
            *interim += 1;
            if *interim > MAX_INTERIM {
                return Err(ClientError::Malformed("too many interim answers"));
            }
            buf.advance(length);
            continue;
        }
        let status =
            StatusCode::from_u16(code).map_err(|_| ClientError::Malformed("status code"))?;
        let version = match parsed.version {
            Some(1) => Version::HTTP_11,
            _ => Version::HTTP_10,
        };
        let mut facts = FramingFacts::default();
        let mut lower = [0u8; SHORT_NAME];
        let headers = if as_lines {
            // Room for the kept lines of most answers, and for a line the caller adds (a
            // request id) without growing.
            let mut lines = Vec::with_capacity(192);
            let mut has_date = false;
            for field in parsed.headers.iter() {
                let kept = with_lowercase(field.name.as_bytes(), &mut lower, |name| {
                    facts.add(name, field.value);
                    let kept = keep(name) && !is_framing_header(name);
                    has_date |= kept && name == b"date";
                    kept
                });
                if kept {
                    push_line(&mut lines, field.name.as_bytes(), field.value);
                }
            }
            AnswerHeaders::Lines {
                lines,
                has_date,
                content_length: None,
            }
        } else {
            // One copy of the head, which the values then share: a copy per value was an
            // allocation each, and slicing the read buffer itself would keep all of it alive
            // for as long as any forwarded header lives.
            let head = Bytes::copy_from_slice(&buf[..length]);
            let mut headers = HeaderMap::with_capacity(parsed.headers.len());
            for field in parsed.headers.iter() {
                let kept = with_lowercase(field.name.as_bytes(), &mut lower, |name| {
                    facts.add(name, field.value);
                    keep(name)
                });
                if !kept {
                    continue;
                }
                let name = header_name(field.name.as_bytes())
                    .map_err(|_| ClientError::Malformed("header name"))?;
                let value =
                    HeaderValue::from_maybe_shared(slice_of(&head, &buf[..length], field.value))
                        .map_err(|_| ClientError::Malformed("header value"))?;
                headers.append(name, value);
            }
            AnswerHeaders::Map(headers)
        };
        buf.advance(length);
        return Ok(Some(AnswerHead {
            status,
            version,
            headers,
            facts,
        }));
    }
}

/// Header names up to this long are lower-cased on the stack.
const SHORT_NAME: usize = 64;

/// Calls `f` with `name` in lower case, using `buf` when it fits.
fn with_lowercase<R>(name: &[u8], buf: &mut [u8; SHORT_NAME], f: impl FnOnce(&[u8]) -> R) -> R {
    match lowercase(name, buf) {
        Some(lower) => f(lower),
        None => f(&name.to_ascii_lowercase()),
    }
}

/// `name` in lower case in `buf`, if it fits.
fn lowercase<'b>(name: &[u8], buf: &'b mut [u8]) -> Option<&'b [u8]> {
    let lower = buf.get_mut(..name.len())?;
    for (to, from) in lower.iter_mut().zip(name) {
        *to = from.to_ascii_lowercase();
    }
    Some(lower)
}

/// `part` of `original` (a slice of it), as the same bytes of `copy`, its copy.
fn slice_of(copy: &Bytes, original: &[u8], part: &[u8]) -> Bytes {
    let start = (part.as_ptr() as usize).wrapping_sub(original.as_ptr() as usize);
    match start.checked_add(part.len()) {
        Some(end) if end <= original.len() => copy.slice(start..end),
        _ => Bytes::copy_from_slice(part),
    }
}

/// How the answer's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// After this many more bytes.
    Length(u64),
    /// With a zero-size chunk.
    Chunked(Chunk),
    /// When the node closes the connection.
    Close,
}

/// Where a chunked body's reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes from its end.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk, in the trailer section.
    Trailers,
}

/// How the body of `answer` ends (RFC 9112 6.3), and whether its connection may be reused.
fn framing(answer: &AnswerHead, no_body: bool) -> Result<(Framing, bool), ClientError> {
    let facts = &answer.facts;
    let keep_alive = answer.version == Version::HTTP_11
        && !facts.close
        && answer.status != StatusCode::SWITCHING_PROTOCOLS;
    if no_body
        || answer.status.is_informational()
        || answer.status == StatusCode::NO_CONTENT
        || answer.status == StatusCode::NOT_MODIFIED
    {
        return Ok((Framing::Length(0), keep_alive));
    }
    if let Some(chunked) = facts.transfer_encoding {
        if answer.version == Version::HTTP_10 {
            return Err(ClientError::Malformed(
                "transfer-encoding in an HTTP/1.0 answer",
            ));
        }
        // With both, the length is ignored and the connection must not be reused.
        let keep_alive = keep_alive && facts.length == Length::Absent;
        return Ok(if chunked {
            (Framing::Chunked(Chunk::Size), keep_alive)
        } else {
            (Framing::Close, false)
        });
    }
    match facts.length {
        Length::Is(n) => Ok((Framing::Length(n), keep_alive)),
        Length::Absent => Ok((Framing::Close, false)),
        Length::Bad(why) => Err(ClientError::Malformed(why)),
    }
}

/// A connection with what has been read from it and not used yet. Boxed once, when it is
/// opened, and moved between the pool and the requests as a pointer: an answer's body holds
/// it, and the answer is moved through every layer of the proxy's stack on its way out.
struct Connection {
    stream: TcpStream,
    buf: BytesMut,
    read_size: usize,
    /// Kept for the connection's next request (see [`HeadTimer`]).
    head_timer: HeadTimer,
}

impl Connection {
    fn new(stream: TcpStream, head_timer: HeadTimer) -> Self {
        Self {
            stream,
            buf: BytesMut::new(),
            read_size: READ_MIN,
            head_timer,
        }
    }

    /// Reads more into the buffer; `Ok(0)` when the node has closed the connection.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        // Wait before taking memory: a stream waiting for its next token holds no buffer.
        self.release_if_empty();
        if self.buf.capacity() == 0 && self.read_size == READ_MIN {
            return self.poll_fill_exact(cx);
        }
        ready!(self.stream.poll_read_ready(cx))?;
        if self.buf.capacity() - self.buf.len() < self.read_size / 2 {
            self.buf.reserve(self.read_size);
        }
        let room = self.buf.capacity() - self.buf.len();
        let stream = Pin::new(&mut self.stream);
        let read = match tokio_util::io::poll_read_buf(stream, cx, &mut self.buf) {
            Poll::Ready(read) => read?,
            Poll::Pending => {
                // The readiness was stale; the wait goes on without the buffer.
                self.release_if_empty();
                return Poll::Pending;
            }
        };
        // Reads grow while they fill their room, and shrink back while they leave most of it.
        if read == room {
            self.read_size = (self.read_size * 2).min(READ_MAX);
        } else if read < room / 4 {
            self.read_size = (self.read_size / 2).max(READ_MIN);
        }
        Poll::Ready(Ok(read))
    }

    /// Reads into an empty buffer through the stack, keeping exactly what came
    /// ([`poll_read_landing`]).
    fn poll_fill_exact(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let read = ready!(poll_read_landing(&mut self.stream, cx, &mut self.buf))?;
        if read == READ_MIN {
            self.read_size = (READ_MIN * 2).min(READ_MAX);
        }
        Poll::Ready(Ok(read))
    }

    /// The next `n` bytes of the buffer.
    fn take(&mut self, n: usize) -> Bytes {
        if n == self.buf.len() {
            // All of it: the buffer's allocation becomes the frame's as it is (a split would
            // first make it shared, an allocation of its own).
            return std::mem::take(&mut self.buf).freeze();
        }
        let data = self.buf.split_to(n).freeze();
        // The emptied buffer still shares the frame's allocation: let go of it, so the
        // allocation goes with the frame.
        self.release_if_empty();
        data
    }

    /// Lets go of an empty buffer's memory.
    fn release_if_empty(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }
}

/// The body of an answer from [`HttpClient`], read from its connection as it is polled. The
/// connection goes back to the pool at the body's end, and is closed if the body is dropped
/// before it.
pub struct UpstreamBody {
    connection: Option<Box<Connection>>,
    framing: Framing,
    /// Where the connection goes back to, when it may.
    pool: Option<(Arc<ClientShared>, Authority)>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("framing", &self.framing)
            .field("open", &self.connection.is_some())
            .finish()
    }
}

#[cfg(test)]
impl UpstreamBody {
    /// Bytes of read buffer the body holds.
    fn buffer_capacity(&self) -> usize {
        self.connection.as_ref().map_or(0, |c| c.buf.capacity())
    }
}

impl UpstreamBody {
    fn new(
        connection: Box<Connection>,
        framing: Framing,
        pool: Option<(Arc<ClientShared>, Authority)>,
    ) -> Self {
        let mut body = Self {
            connection: Some(connection),
            framing,
            pool,
        };
        if framing == Framing::Length(0) {
            body.finish();
        }
        body
    }

    /// The body has ended: the connection goes back to the pool if nothing else is on it.
    fn finish(&mut self) {
        self.framing = Framing::Length(0);
        if let (Some(connection), Some((shared, key))) = (self.connection.take(), self.pool.take())
            && connection.buf.is_empty()
        {
            shared.check_in(key.as_str(), connection);
        }
    }

    /// The body broke: the connection is closed.
    fn fail(&mut self, error: ClientError) -> Poll<Option<Result<Frame<Bytes>, ClientError>>> {
        self.framing = Framing::Length(0);
        self.connection = None;
        Poll::Ready(Some(Err(error)))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = ClientError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientError>>> {
        let this = &mut *self;
        loop {
            let Some(connection) = this.connection.as_mut() else {
                return Poll::Ready(None);
            };
            // Whatever the framing, an empty buffer is filled first, except at the very end.
            let needs_bytes = match this.framing {
                Framing::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(_) | Framing::Close | Framing::Chunked(Chunk::Data(_)) => {
                    connection.buf.is_empty()
                }
                Framing::Chunked(Chunk::DataEnd) => connection.buf.len() < 2,
                Framing::Chunked(Chunk::Size | Chunk::Trailers) => {
                    match line_end(&connection.buf) {
                        Some(_) => false,
                        None if connection.buf.len() > MAX_LINE => {
                            return this.fail(ClientError::Malformed("chunk line too long"));
                        }
                        None => true,
                    }
                }
            };
            if needs_bytes {
                match ready!(connection.poll_fill(cx)) {
                    Ok(0) if this.framing == Framing::Close => {
                        // The end of a close-delimited body; the connection goes with it.
                        this.pool = None;
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(0) => return this.fail(ClientError::Closed),
                    Ok(_) => continue,
                    Err(error) => return this.fail(ClientError::Io(error)),
                }
            }
            match this.framing {
                Framing::Length(remaining) => {
                    let n = remaining.min(connection.buf.len() as u64);
                    let data = connection.take(n as usize);
                    this.framing = Framing::Length(remaining - n);
                    if remaining == n {
                        // Done now: a reader that trusts `is_end_stream` won't poll again.
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Close => {
                    let n = connection.buf.len();
                    return Poll::Ready(Some(Ok(Frame::data(connection.take(n)))));
                }
                Framing::Chunked(Chunk::Data(remaining)) => {
                    let n = remaining.min(connection.buf.len() as u64);
                    this.framing = Framing::Chunked(match remaining - n {
                        0 => Chunk::DataEnd,
                        left => Chunk::Data(left),
                    });
                    return Poll::Ready(Some(Ok(Frame::data(connection.take(n as usize)))));
                }
                Framing::Chunked(Chunk::DataEnd) => {
                    if &connection.buf[..2] != b"\r\n" {
                        return this
                            .fail(ClientError::Malformed("chunk data not followed by CRLF"));
                    }
                    connection.buf.advance(2);
                    this.framing = Framing::Chunked(Chunk::Size);
                }
                Framing::Chunked(Chunk::Size) => {
                    let end = line_end(&connection.buf).unwrap_or_default();
                    let Some(size) = parse_chunk_size(&connection.buf[..end]) else {
                        return this.fail(ClientError::Malformed("chunk size"));
                    };
                    connection.buf.advance(end + 2);
                    this.framing = Framing::Chunked(match size {
                        0 => Chunk::Trailers,
                        size => Chunk::Data(size),
                    });
                }
                Framing::Chunked(Chunk::Trailers) => {
                    let end = line_end(&connection.buf).unwrap_or_default();
                    if connection.buf[..end]
                        .iter()
                        .any(|&b| b == b'\n' || b == b'\r')
                    {
                        return this.fail(ClientError::Malformed("bare CR or LF in a trailer"));
                    }
                    connection.buf.advance(end + 2);
                    if end == 0 {
                        this.finish();
                        return Poll::Ready(None);
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.connection.is_none() || self.framing == Framing::Length(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::LazyLock;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn raw_names_are_held_back_as_their_header_names_are_in_any_case() {
        for name in [
            "host",
            "content-length",
            "transfer-encoding",
            "connection",
            "keep-alive",
            "proxy-connection",
            "proxy-authorization",
            "proxy-authenticate",
            "te",
            "trailer",
            "upgrade",
            "expect",
            "authorization",
            "x-request-id",
            "tee",
            "proxy-authorization-x",
            "a-rather-long-header-name-of-no-meaning",
        ] {
            let held = !sent_as_given(&HeaderName::from_static(name));
            let mixed: String = name
                .chars()
                .enumerate()
                .map(|(i, c)| {
                    if i % 2 == 0 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect();
            for raw in [name.to_owned(), name.to_ascii_uppercase(), mixed] {
                assert_eq!(!sent_as_given_raw(raw.as_bytes()), held, "{raw}");
            }
        }
    }

    #[test]
    fn raw_lines_go_out_as_they_came_in_runs_or_written_anew_where_they_must() {
        let wire = b"POST /v1/chat HTTP/1.1\r\n\
            Host: r\r\n\
            Content-Type:application/json\r\n\
            X-A: 1\r\n\
            Connection: keep-alive, X-Drop\r\n\
            X-Drop: gone\r\n\
            Authorization: Bearer client\r\n\
            X-B: 2   \r\n\
            X-C: 3\n\
            X-D: 4\r\n\
            x-e:\t5\r\n\
            Content-Length: 2\r\n\r\n{}";
        let (request, _) = crate::server::read_raw_request_from(wire, &Default::default())
            .unwrap()
            .unwrap();
        let authority: Authority = "node:1".parse().unwrap();
        let key = HeaderValue::from_static("Bearer node");
        let replaced = [(&header::AUTHORIZATION, Some(&key))];
        let to = Forward {
            replaced: &replaced,
            ..Forward::plain(&authority)
        };
        let head = String::from_utf8(Outgoing::raw(&request, to).head).unwrap();
        assert_eq!(
            head,
            "POST /v1/chat HTTP/1.1\r\nhost: node:1\r\n\
             Content-Type:application/json\r\nX-A: 1\r\n\
             X-B: 2\r\nX-C: 3\r\nX-D: 4\r\nx-e:\t5\r\n\
             authorization: Bearer node\r\n",
            "lines kept as they came where they end in CR LF right after their value; the \
             rest written anew, in order; hop-by-hop, named by `connection` and replaced \
             ones left out"
        );
    }

    #[test]
    fn a_blank_line_is_found_in_every_form_httparse_ends_a_head_with() {
        // Every position of every line-end form, against a byte-by-byte reading of the rule.
        let by_bytes = |buf: &[u8]| {
            (0..buf.len()).any(|i| buf[i..].starts_with(b"\n\n") || buf[i..].starts_with(b"\n\r\n"))
        };
        let pieces: [&[u8]; 5] = [b"\r\n", b"\n", b"\r", b"a", b": "];
        let mut cases: Vec<Vec<u8>> = vec![Vec::new()];
        for _ in 0..5 {
            let longer: Vec<Vec<u8>> = cases
                .iter()
                .flat_map(|case| pieces.iter().map(move |piece| [case, *piece].concat()))
                .collect();
            cases.extend(longer);
            cases.sort();
            cases.dedup();
        }
        for case in &cases {
            assert_eq!(holds_blank_line(case), by_bytes(case), "{case:?}");
        }
        assert!(holds_blank_line(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody"));
        assert!(!holds_blank_line(b"HTTP/1.1 200 OK\r\nA: b\r\n\r"));
    }

    #[test]
    fn answer_headers_kept_as_lines_are_copied_as_written_without_framing() {
        let text = "HTTP/1.1 201 Created\r\nContent-Type: text/plain\r\nX-Extra: a b\r\n\
                    Content-Length: 2\r\nConnection: keep-alive\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n\r\nok";
        let mut buf = BytesMut::from(text);
        let head = parse_head(&mut buf, &mut 0, keep_every_header, true)
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..], b"ok", "the body stays in the read buffer");
        assert_eq!(head.facts.length, Length::Is(2), "framing is still read");
        let AnswerHeaders::Lines {
            lines, has_date, ..
        } = head.headers
        else {
            panic!("asked for lines");
        };
        assert_eq!(
            String::from_utf8(lines).unwrap(),
            "Content-Type: text/plain\r\nX-Extra: a b\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
        );
        assert!(has_date);

        let mut buf = BytesMut::from(text);
        let head = parse_head(&mut buf, &mut 0, content_type_only, true)
            .unwrap()
            .unwrap();
        let AnswerHeaders::Lines {
            lines, has_date, ..
        } = head.headers
        else {
            panic!("asked for lines");
        };
        assert_eq!(lines, b"Content-Type: text/plain\r\n");
        assert!(!has_date, "a date not kept is not there");
    }

    #[test]
    fn answer_header_values_share_one_copy_of_the_head() {
        let text = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Extra: a b\r\nContent-Length: 2\r\n\r\nok";
        let mut buf = BytesMut::from(text);
        let head = parse_head(&mut buf, &mut 0, keep_every_header, false)
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..], b"ok", "the body stays in the read buffer");
        let AnswerHeaders::Map(headers) = head.headers else {
            panic!("asked for a map");
        };
        let value = |name: &str| headers.get(name).unwrap().as_bytes().as_ptr() as usize;
        let apart = text.find("2\r\n\r\n").unwrap() - text.find("text/plain").unwrap();
        assert_eq!(
            value("content-length") - value("content-type"),
            apart,
            "values lie where they were in the head"
        );
        assert_eq!(headers["x-extra"], "a b");

        let original = b"abc".to_vec();
        let copy = Bytes::copy_from_slice(&original);
        let part = slice_of(&copy, &original, &original[1..]);
        assert_eq!(part, "bc");
        assert_eq!(part.as_ptr(), copy[1..].as_ptr(), "a slice of the copy");
        let elsewhere = b"zz".to_vec();
        let copied = slice_of(&copy, &original, &elsewhere);
        assert_eq!(copied, "zz", "not a part: copied");
        assert_ne!(copied.as_ptr(), elsewhere.as_ptr());
    }

    /// What a scripted node does with a request.
    enum Reply {
        Send(&'static [u8]),
        /// Sends the bytes one at a time, so every parser state sees a partial buffer.
        Trickle(&'static [u8]),
        SendAndClose(&'static [u8]),
        /// Starts a header field in an answer head and never ends it.
        EndlessHead,
        /// Closes the connection without answering.
        Close,
        /// Sends the bytes after [`LATE`].
        Late(&'static [u8]),
        /// Keeps the connection open and never answers.
        Silent,
    }

    const LATE: Duration = Duration::from_millis(150);

    struct ScriptedNode {
        authority: String,
        connections: Arc<AtomicUsize>,
        requests: Arc<Mutex<Vec<String>>>,
    }

    impl ScriptedNode {
        fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.authority)
        }

        fn connections(&self) -> usize {
            self.connections.load(Ordering::SeqCst)
        }

        fn get(&self) -> Request<Full<Bytes>> {
            get(&self.url("/"))
        }
    }

    /// A scripted node and a client with the default settings.
    async fn node_and_client(script: fn(usize, usize) -> Reply) -> (ScriptedNode, HttpClient) {
        (node(script).await, HttpClient::new(ClientConfig::default()))
    }

    /// The node's answer to a GET of `/`, which must come.
    async fn fetch(client: &HttpClient, node: &ScriptedNode) -> Response<UpstreamBody> {
        client.request(node.get()).await.unwrap()
    }

    /// The body of that answer, which must come whole.
    async fn fetch_text(client: &HttpClient, node: &ScriptedNode) -> String {
        text(fetch(client, node).await).await.unwrap()
    }

    /// A node on loopback that answers request `n` of connection `c` with `script(c, n)`.
    async fn node(script: fn(usize, usize) -> Reply) -> ScriptedNode {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (count, log) = (connections.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let c = count.fetch_add(1, Ordering::SeqCst);
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for n in 0.. {
                        let Some(request) = read_request(&mut stream, &mut buf).await else {
                            return;
                        };
                        log.lock().unwrap().push(request);
                        match script(c, n) {
                            Reply::Send(bytes) => stream.write_all(bytes).await.unwrap(),
                            Reply::Trickle(bytes) => {
                                for byte in bytes {
                                    stream.write_all(&[*byte]).await.unwrap();
                                    tokio::time::sleep(Duration::from_millis(1)).await;
                                }
                            }
                            Reply::SendAndClose(bytes) => {
                                stream.write_all(bytes).await.unwrap();
                                return;
                            }
                            Reply::EndlessHead => {
                                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nx-pad: ").await;
                                while stream.write_all(&[b'a'; 1024]).await.is_ok() {}
                                return;
                            }
                            Reply::Close => return,
                            Reply::Late(bytes) => {
                                tokio::time::sleep(LATE).await;
                                stream.write_all(bytes).await.unwrap();
                            }
                            Reply::Silent => std::future::pending().await,
                        }
                    }
                });
            }
        });
        ScriptedNode {
            authority,
            connections,
            requests,
        }
    }

    /// One request (head and content-length body) off `stream`; `None` once it closes.
    async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.parse().unwrap());
                if buf.len() >= end + 4 + length {
                    let request = String::from_utf8_lossy(&buf[..end + 4 + length]).into_owned();
                    buf.drain(..end + 4 + length);
                    return Some(request);
                }
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn get(url: &str) -> Request<Full<Bytes>> {
        Request::get(url).body(Full::default()).unwrap()
    }

    async fn text(response: Response<UpstreamBody>) -> Result<String, ClientError> {
        body_text(response.into_body()).await
    }

    async fn body_text(body: UpstreamBody) -> Result<String, ClientError> {
        let bytes = body.collect().await?.to_bytes();
        Ok(String::from_utf8(bytes.to_vec()).unwrap())
    }

    const HELLO: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        let (node, client) = node_and_client(|_, _| Reply::Send(HELLO)).await;
        for _ in 0..3 {
            let response = fetch(&client, &node).await;
            assert_eq!(response.status(), 200);
            assert_eq!(text(response).await.unwrap(), "hello");
        }
        assert_eq!(node.connections(), 1);
        assert_eq!(client.idle_connections(), 1);
    }

    /// `request`, whose answer's head must come by `within` from now.
    async fn send_within<B>(
        client: &HttpClient<B>,
        request: &Request<B>,
        within: Duration,
    ) -> Result<Result<RawResponse<UpstreamBody>, ClientError>, HeadTimedOut>
    where
        B: Body + Clone + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let to = Forward::plain(request.uri().authority().unwrap());
        let deadline = tokio::time::Instant::now() + within;
        let mut answer = client.request_lines_within(request, to, Some(deadline));
        std::future::poll_fn(|cx| answer.poll_within(cx)).await
    }

    /// A GET of `/` on `node`, whose head must come by `within` from now.
    async fn fetch_within(
        client: &HttpClient,
        node: &ScriptedNode,
        within: Duration,
    ) -> Result<Result<RawResponse<UpstreamBody>, ClientError>, HeadTimedOut> {
        send_within(client, &node.get(), within).await
    }

    /// The body of an answer that came, read to its end.
    async fn raw_text(answer: RawResponse<UpstreamBody>) -> String {
        body_text(answer.into_body()).await.unwrap()
    }

    #[tokio::test]
    async fn a_head_not_in_by_its_deadline_times_out_and_its_connection_is_closed() {
        let (node, client) = node_and_client(|c, n| match (c, n) {
            (0, 0) => Reply::Send(HELLO),
            (0, _) => Reply::Silent,
            _ => Reply::Send(HELLO),
        })
        .await;
        let within = Duration::from_millis(200);
        let answer = fetch_within(&client, &node, within).await.unwrap().unwrap();
        assert_eq!(raw_text(answer).await, "hello");
        assert_eq!(client.idle_connections(), 1);

        let started = std::time::Instant::now();
        let timed_out = fetch_within(&client, &node, within).await;
        assert!(timed_out.is_err(), "the silent node's head never came");
        let waited = started.elapsed();
        assert!(
            waited >= within && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        assert_eq!(
            client.idle_connections(),
            0,
            "a connection mid-request is closed"
        );

        let answer = fetch_within(&client, &node, within).await.unwrap().unwrap();
        assert_eq!(raw_text(answer).await, "hello");
        assert_eq!(node.connections(), 2);
    }

    #[tokio::test]
    async fn a_pooled_connection_keeps_its_timer_and_each_request_gets_its_own_deadline() {
        let (node, client) = node_and_client(|_, n| match n {
            0 => Reply::Send(HELLO),
            _ => Reply::Late(HELLO),
        })
        .await;
        let within = Duration::from_millis(300);
        let answer = fetch_within(&client, &node, within).await.unwrap().unwrap();
        assert_eq!(raw_text(answer).await, "hello");
        assert_eq!(
            client.idle_head_timers(),
            1,
            "the timer went back with its connection"
        );

        // The first deadline passes while the connection is idle: the next request, answered
        // after `LATE`, is not timed out by it.
        tokio::time::sleep(within + Duration::from_millis(100)).await;
        let answer = fetch_within(&client, &node, within).await.unwrap().unwrap();
        assert_eq!(raw_text(answer).await, "hello");
        // Moved on from a deadline that has not passed.
        let answer = fetch_within(&client, &node, within).await.unwrap().unwrap();
        assert_eq!(raw_text(answer).await, "hello");
        assert_eq!(node.connections(), 1);
        assert_eq!(client.idle_head_timers(), 1);

        // A deadline earlier than the one the timer holds.
        let started = std::time::Instant::now();
        let early = Duration::from_millis(50);
        let timed_out = fetch_within(&client, &node, early).await;
        assert!(
            timed_out.is_err(),
            "answered after {LATE:?}, past {early:?}"
        );
        assert!(started.elapsed() < LATE, "{:?}", started.elapsed());
    }

    /// A request body whose end never comes.
    #[derive(Clone)]
    struct EndlessBody;

    impl Body for EndlessBody {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn the_head_deadline_covers_a_body_still_coming_and_a_retry_on_a_new_connection() {
        let within = Duration::from_millis(200);
        let in_time = |started: std::time::Instant| {
            let waited = started.elapsed();
            assert!(
                waited >= within && waited < Duration::from_secs(2),
                "{waited:?}"
            );
        };
        let node = node(|c, n| match (c, n) {
            (0, 0) => Reply::Send(HELLO),
            (0, _) => Reply::Close,
            _ => Reply::Silent,
        })
        .await;

        let client: HttpClient<EndlessBody> = HttpClient::new(ClientConfig::default());
        let request = Request::post(node.url("/")).body(EndlessBody).unwrap();
        let started = std::time::Instant::now();
        let timed_out = send_within(&client, &request, within).await;
        assert!(timed_out.is_err(), "the body never ended");
        in_time(started);
        assert_eq!(node.connections(), 0, "nothing was sent");

        // The pooled connection is closed as the request goes out; the GET goes again, anew, to
        // a node that does not answer: the retry is bounded by the same deadline.
        let client = HttpClient::new(ClientConfig::default());
        let answer = fetch_within(&client, &node, within).await.unwrap().unwrap();
        assert_eq!(raw_text(answer).await, "hello");
        let started = std::time::Instant::now();
        assert!(fetch_within(&client, &node, within).await.is_err());
        in_time(started);
        assert_eq!(node.connections(), 2);
    }

    /// A chunked answer larger than the first reads, so that they grow, and whose end is
    /// read past in the buffer (a length-framed body hands its buffer over whole).
    static LARGE: LazyLock<Vec<u8>> = LazyLock::new(|| {
        let body = "x".repeat(4 * READ_MIN);
        format!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        )
        .into_bytes()
    });

    #[tokio::test]
    async fn a_connection_goes_back_to_the_pool_as_a_new_one() {
        let (node, client) = node_and_client(|_, _| Reply::Send(&LARGE)).await;
        let answer = fetch_within(&client, &node, Duration::from_secs(5)).await;
        assert_eq!(raw_text(answer.unwrap().unwrap()).await.len(), 4 * READ_MIN);
        let idle = client.shared.lock();
        let connection = &idle.values().flatten().next().unwrap().connection;
        assert_eq!(
            (connection.buf.capacity(), connection.read_size),
            (0, READ_MIN),
            "no buffer kept, and reads start small again"
        );
    }

    #[test]
    fn a_timer_of_a_runtime_gone_is_not_used() {
        // The node and the connection's socket live on a runtime that stays; the timer is made
        // on another, which then shuts down.
        let lasting = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let brief = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // The second answer comes late, so that the request waits and makes a timer.
        let node = lasting.block_on(node(|_, n| match n {
            0 => Reply::Send(HELLO),
            1 => Reply::Late(HELLO),
            _ => Reply::Silent,
        }));
        let client = HttpClient::new(ClientConfig::default());
        lasting.block_on(async { assert_eq!(fetch_text(&client, &node).await, "hello") });
        let within = LATE * 2;
        brief.block_on(async {
            let answer = fetch_within(&client, &node, within).await.unwrap().unwrap();
            assert_eq!(raw_text(answer).await, "hello");
        });
        drop(brief);
        assert_eq!(client.idle_head_timers(), 1);
        lasting.block_on(async {
            let started = std::time::Instant::now();
            assert!(fetch_within(&client, &node, within).await.is_err());
            assert!(started.elapsed() >= within, "{:?}", started.elapsed());
        });
        assert_eq!(node.connections(), 1);
    }

    #[tokio::test]
    async fn a_chunked_body_is_decoded_across_partial_reads() {
        const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\nB\r\n big world!\r\n0\r\nx-trailer: t\r\n\r\n";
        let (node, client) = node_and_client(|_, _| Reply::Trickle(CHUNKED)).await;
        for _ in 0..2 {
            assert_eq!(fetch_text(&client, &node).await, "hello big world!");
        }
        assert_eq!(
            node.connections(),
            1,
            "a chunked body read to its end frees the connection"
        );
    }

    #[tokio::test]
    async fn a_close_delimited_body_ends_with_its_connection() {
        let (node, client) =
            node_and_client(|_, _| Reply::SendAndClose(b"HTTP/1.1 200 OK\r\n\r\nuntil the end"))
                .await;
        for _ in 0..2 {
            assert_eq!(fetch_text(&client, &node).await, "until the end");
        }
        assert_eq!(node.connections(), 2);
        assert_eq!(client.idle_connections(), 0);
    }

    #[tokio::test]
    async fn interim_answers_are_skipped() {
        let (node, client) = node_and_client(|_, _| {
            Reply::Send(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
            )
        })
        .await;
        let response = fetch(&client, &node).await;
        assert_eq!(response.status(), 201);
        assert_eq!(text(response).await.unwrap(), "ok");
    }

    /// A node whose first connection takes one request, then closes when the second arrives;
    /// its later connections answer every request.
    async fn node_dropping_its_first_connection() -> (ScriptedNode, HttpClient) {
        node_and_client(|c, n| match (c, n) {
            (0, 0) => Reply::Send(HELLO),
            (0, _) => Reply::Close,
            _ => Reply::Send(HELLO),
        })
        .await
    }

    #[tokio::test]
    async fn a_reused_connection_closed_by_the_node_is_retried_on_a_new_one() {
        let (node, client) = node_dropping_its_first_connection().await;
        for _ in 0..2 {
            assert_eq!(fetch_text(&client, &node).await, "hello");
        }
        assert_eq!(node.connections(), 2);
        assert_eq!(
            node.requests.lock().unwrap().len(),
            3,
            "sent twice, answered once"
        );
    }

    #[tokio::test]
    async fn a_post_the_node_may_have_read_is_not_sent_again() {
        let (node, client) = node_dropping_its_first_connection().await;
        assert_eq!(fetch_text(&client, &node).await, "hello");
        let post = Request::post(node.url("/v1/chat/completions"))
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let error = client.request(post).await.unwrap_err();
        assert!(
            matches!(&error, ClientError::ReusedConnectionLost(inner) if matches!(**inner, ClientError::Closed)),
            "{error}"
        );
        assert_eq!(
            node.requests.lock().unwrap().len(),
            2,
            "the POST went out once"
        );
        assert_eq!(node.connections(), 1);
    }

    #[tokio::test]
    async fn a_post_with_an_idempotency_key_is_sent_again_on_a_new_connection() {
        for raw in [false, true] {
            let (node, client) = node_dropping_its_first_connection().await;
            assert_eq!(fetch_text(&client, &node).await, "hello");
            let answer = if raw {
                let wire = b"POST /v1/chat/completions HTTP/1.1\r\nIdempotency-KEY: k1\r\n\
                    Content-Length: 2\r\n\r\n{}";
                let (request, _) = crate::server::read_raw_request_from(wire, &Default::default())
                    .unwrap()
                    .unwrap();
                let authority: Authority = node.authority.parse().unwrap();
                let answer = client
                    .request_raw_to(&request, Forward::plain(&authority))
                    .await
                    .unwrap();
                raw_text(answer).await
            } else {
                let post = Request::post(node.url("/v1/chat/completions"))
                    .header("idempotency-key", "k1")
                    .body(Full::new(Bytes::from_static(b"{}")))
                    .unwrap();
                text(client.request(post).await.unwrap()).await.unwrap()
            };
            assert_eq!(answer, "hello", "raw: {raw}");
            let sent = node.requests.lock().unwrap().len();
            assert_eq!(sent, 3, "raw: {raw}: the POST went out twice");
            assert_eq!(node.connections(), 2, "raw: {raw}");
        }
    }

    #[tokio::test]
    async fn an_idle_body_holds_no_read_buffer() {
        // Headers and a first event, then silence: a stream waiting for its next token.
        let (node, client) = node_and_client(|_, _| {
            Reply::Send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\ndata: \r\n")
        })
        .await;
        let mut body = client.request(node.get()).await.unwrap().into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"data: ");
        let waited = tokio::time::timeout(Duration::from_millis(50), body.frame()).await;
        assert!(waited.is_err(), "the node sent nothing more");
        assert_eq!(body.buffer_capacity(), 0);
    }

    #[tokio::test]
    async fn bodiless_answers_leave_the_connection_ready_for_the_next() {
        let (node, client) = node_and_client(|_, n| match n {
            0 => Reply::Send(b"HTTP/1.1 204 No Content\r\n\r\n"),
            1 => Reply::Send(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            2 => Reply::Send(b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n"),
            _ => Reply::Send(HELLO),
        })
        .await;
        let response = fetch(&client, &node).await;
        assert_eq!(response.status(), 204);
        assert_eq!(text(response).await.unwrap(), "");
        let head = Request::head(node.url("/")).body(Full::default()).unwrap();
        let response = client.request(head).await.unwrap();
        assert!(response.body().is_end_stream());
        assert_eq!(text(response).await.unwrap(), "");
        let response = fetch(&client, &node).await;
        assert_eq!(response.status(), 304);
        assert_eq!(text(response).await.unwrap(), "");
        assert_eq!(fetch_text(&client, &node).await, "hello");
        assert_eq!(node.connections(), 1);
    }

    #[tokio::test]
    async fn bytes_after_an_answer_keep_its_connection_out_of_the_pool() {
        let (node, client) = node_and_client(|c, _| match c {
            0 => Reply::Send(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhelloXX"),
            _ => Reply::Send(HELLO),
        })
        .await;
        for _ in 0..2 {
            assert_eq!(fetch_text(&client, &node).await, "hello");
        }
        assert_eq!(node.connections(), 2);
    }

    #[tokio::test]
    async fn idle_connections_expire_and_are_capped() {
        let node = node(|_, _| Reply::Send(HELLO)).await;
        let config = ClientConfig {
            pool_idle_timeout: Duration::from_millis(50),
            pool_max_idle_per_host: 1,
            ..ClientConfig::default()
        };
        let client = HttpClient::new(config);
        let (a, b) = tokio::join!(client.request(node.get()), client.request(node.get()));
        assert_eq!(text(a.unwrap()).await.unwrap(), "hello");
        assert_eq!(text(b.unwrap()).await.unwrap(), "hello");
        assert_eq!(node.connections(), 2);
        assert_eq!(client.idle_connections(), 1, "one kept, one closed");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            client.idle_connections(),
            0,
            "the sweeper dropped the expired one"
        );
        assert_eq!(fetch_text(&client, &node).await, "hello");
        assert_eq!(node.connections(), 3);
    }

    #[tokio::test]
    async fn the_sweeper_drops_connections_the_node_closed() {
        let node = node(|_, _| Reply::SendAndClose(HELLO)).await;
        let config = ClientConfig {
            pool_idle_timeout: Duration::from_millis(300),
            ..ClientConfig::default()
        };
        let client = HttpClient::new(config);
        assert_eq!(fetch_text(&client, &node).await, "hello");
        assert_eq!(client.idle_connections(), 1);
        // Well before the idle timeout, the sweep (every 150 ms) finds it closed.
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(client.idle_connections(), 0);
    }

    #[tokio::test]
    async fn a_length_next_to_chunked_is_dropped_with_the_connection() {
        let (node, client) = node_and_client(|_, _| {
            Reply::Send(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 99\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            )
        }).await;
        let response = fetch(&client, &node).await;
        assert!(!response.headers().contains_key(header::CONTENT_LENGTH));
        assert_eq!(text(response).await.unwrap(), "ok");
        assert_eq!(client.idle_connections(), 0);
    }

    #[tokio::test]
    async fn an_idle_connection_the_node_closed_is_not_used() {
        let (node, client) = node_and_client(|_, _| Reply::SendAndClose(HELLO)).await;
        for _ in 0..2 {
            assert_eq!(fetch_text(&client, &node).await, "hello");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(node.connections(), 2);
    }

    #[tokio::test]
    async fn a_new_connection_closed_before_the_answer_is_an_error() {
        let (node, client) = node_and_client(|_, _| Reply::Close).await;
        let error = client.request(node.get()).await.unwrap_err();
        assert!(matches!(error, ClientError::Closed), "{error}");
        assert_eq!(
            node.connections(),
            1,
            "not retried: the node may have seen it"
        );
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error() {
        let node =
            node(|_, _| Reply::SendAndClose(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nhalf"))
                .await;
        let client = HttpClient::new(ClientConfig::default());
        let response = fetch(&client, &node).await;
        assert!(matches!(text(response).await, Err(ClientError::Closed)));
        assert_eq!(client.idle_connections(), 0);
    }

    #[tokio::test]
    async fn a_body_dropped_early_closes_its_connection() {
        let (node, client) = node_and_client(|c, _| match c {
            0 => Reply::Send(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nhalf"),
            _ => Reply::Send(HELLO),
        })
        .await;
        let mut body = client.request(node.get()).await.unwrap().into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"half");
        drop(body);
        assert_eq!(fetch_text(&client, &node).await, "hello");
        assert_eq!(node.connections(), 2);
    }

    #[tokio::test]
    async fn malformed_answers_are_errors() {
        let (node, client) = node_and_client(|c, _| match c {
            0 => Reply::Send(
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
            ),
            1 => Reply::Send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"),
            _ => Reply::EndlessHead,
        })
        .await;
        let error = client.request(node.get()).await.unwrap_err();
        assert!(
            matches!(error, ClientError::Malformed("conflicting content-length")),
            "{error}"
        );
        let response = fetch(&client, &node).await;
        assert!(matches!(
            text(response).await,
            Err(ClientError::Malformed("chunk size"))
        ));
        let error = client.request(node.get()).await.unwrap_err();
        assert!(
            matches!(error, ClientError::Malformed("answer head too long")),
            "{error}"
        );
        assert_eq!(client.idle_connections(), 0);
        assert_eq!(
            node.connections(),
            3,
            "no connection with a bad answer is reused"
        );
    }

    #[tokio::test]
    async fn the_request_names_the_node_and_frames_its_own_body() {
        let (node, client) = node_and_client(|_, _| Reply::Send(HELLO)).await;
        let request = Request::post(node.url("/v1/chat?x=1"))
            .header("host", "client.example")
            .header("x-hop", "this hop only")
            .header("connection", "keep-alive, X-Hop")
            .header("expect", "100-continue")
            .header("transfer-encoding", "chunked")
            .header("proxy-authorization", "Basic cHJveHk=")
            .header("x-request-id", "abc")
            .body(Full::new(Bytes::from_static(b"{\"a\":1}")))
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(text(response).await.unwrap(), "hello");
        let sent = node.requests.lock().unwrap()[0].clone();
        let expected_start = format!("POST /v1/chat?x=1 HTTP/1.1\r\nhost: {}\r\n", node.authority);
        assert!(sent.starts_with(&expected_start), "{sent}");
        assert!(sent.contains("\r\nx-request-id: abc\r\n"), "{sent}");
        assert!(
            sent.ends_with("\r\ncontent-length: 7\r\n\r\n{\"a\":1}"),
            "{sent}"
        );
        for gone in [
            "client.example",
            "connection:",
            "expect:",
            "transfer-encoding:",
            "proxy-authorization:",
            "x-hop",
        ] {
            assert!(!sent.contains(gone), "{gone} was sent: {sent}");
        }
    }

    #[tokio::test]
    async fn a_borrowed_request_goes_under_the_path_prefix_and_stays_as_it_was() {
        let (node, client) = node_and_client(|_, _| Reply::Send(HELLO)).await;
        let authority: Authority = node.authority.parse().unwrap();
        // The request's own URI names some other host: only its path and query are used.
        let request = Request::post("http://client.example/v1/chat?x=1")
            .header("x-request-id", "abc")
            .header("connection", "close")
            .header("authorization", "Bearer client-key")
            .header("x-gone", "1")
            .body(Full::new(Bytes::from_static(b"{\"a\":1}")))
            .unwrap();
        for _ in 0..2 {
            let key = HeaderValue::from_static("Bearer node-key");
            let replaced = [
                (&header::AUTHORIZATION, Some(&key)),
                (&HeaderName::from_static("x-gone"), None),
            ];
            let to = Forward {
                authority: &authority,
                path_prefix: "/base",
                replaced: &replaced,
                keep_answer_header: keep_every_header,
            };
            let response = client.request_to(&request, to).await.unwrap();
            assert_eq!(text(response).await.unwrap(), "hello");
        }
        let sent = node.requests.lock().unwrap().clone();
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[0], sent[1], "the second sending differs");
        let expected_start = format!(
            "POST /base/v1/chat?x=1 HTTP/1.1\r\nhost: {}\r\n",
            node.authority
        );
        assert!(sent[0].starts_with(&expected_start), "{}", sent[0]);
        assert!(sent[0].contains("\r\nx-request-id: abc\r\n"), "{}", sent[0]);
        assert!(
            sent[0].contains("\r\nauthorization: Bearer node-key\r\n"),
            "{}",
            sent[0]
        );
        for gone in ["connection:", "client-key", "x-gone"] {
            assert!(!sent[0].contains(gone), "{gone} was sent: {}", sent[0]);
        }
        assert!(
            sent[0].ends_with("\r\ncontent-length: 7\r\n\r\n{\"a\":1}"),
            "{}",
            sent[0]
        );
        // Untouched: the caller can send it again, to another node.
        assert_eq!(request.uri(), "http://client.example/v1/chat?x=1");
        assert_eq!(request.headers().len(), 4);
        assert_eq!(request.headers()["authorization"], "Bearer client-key");
        assert_eq!(request.body().size_hint().exact(), Some(7));
    }

    #[tokio::test]
    async fn bodies_on_either_side_of_the_inline_limit_arrive_whole_after_their_head() {
        let (node, client) = node_and_client(|_, _| Reply::Send(HELLO)).await;
        let sizes = [0, 1, INLINE_BODY - 1, INLINE_BODY, INLINE_BODY + 1, 200_000];
        // The last request the node read: its head, then exactly `body`.
        let sent_whole = |size: usize, body: &str| {
            let sent = node.requests.lock().unwrap().last().cloned().unwrap();
            // Nothing of an earlier request (a body sent twice) runs into this one.
            assert!(
                sent.starts_with("POST /v1/chat HTTP/1.1\r\n"),
                "{size} bytes"
            );
            let expected_end = format!("\r\ncontent-length: {size}\r\n\r\n{body}");
            assert!(
                sent.ends_with(&expected_end),
                "{size} bytes: {:?}",
                &sent[..200.min(sent.len())]
            );
        };
        for size in sizes {
            let body = "b".repeat(size);
            let request = Request::post(node.url("/v1/chat"))
                .body(Full::new(Bytes::from(body.clone())))
                .unwrap();
            let response = client.request(request).await.unwrap();
            assert_eq!(text(response).await.unwrap(), "hello");
            sent_whole(size, &body);
        }
        // The same over the raw path, whose body follows its head in the request's bytes.
        let authority: Authority = node.authority.parse().unwrap();
        for size in sizes {
            let body = "b".repeat(size);
            let wire = format!("POST /v1/chat HTTP/1.1\r\nContent-Length: {size}\r\n\r\n{body}");
            let config = crate::server::ServerConfig {
                max_body_bytes: 1 << 20,
                ..Default::default()
            };
            let (request, _) = crate::server::read_raw_request_from(wire.as_bytes(), &config)
                .unwrap()
                .unwrap();
            let raw = client
                .request_raw_to(&request, Forward::plain(&authority))
                .await
                .unwrap();
            let answer = raw.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(answer, "hello");
            sent_whole(size, &body);
        }
        assert_eq!(node.requests.lock().unwrap().len(), 2 * sizes.len());
        assert_eq!(node.connections(), 1, "the connection was kept");
    }

    /// An answer whose head alone (a 9,000-byte header) and whose body are each larger than
    /// one read: the first read fills its 8 KiB and the rest go through the growing buffer.
    static LARGE_ANSWER: LazyLock<Vec<u8>> = LazyLock::new(|| {
        let pad = "p".repeat(9_000);
        let body = "x".repeat(20_000);
        format!(
            "HTTP/1.1 200 OK\r\nX-Pad: {pad}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    });

    #[tokio::test]
    async fn a_head_and_body_larger_than_a_read_arrive_whole() {
        let (node, client) = node_and_client(|_, _| Reply::Send(LARGE_ANSWER.as_slice())).await;
        for _ in 0..2 {
            let response = fetch(&client, &node).await;
            assert_eq!(response.headers()["x-pad"].len(), 9_000);
            assert_eq!(text(response).await.unwrap(), "x".repeat(20_000));
        }
        assert_eq!(node.connections(), 1, "the connection was kept");
    }

    /// Keeps `content-type` and nothing else.
    #[test]
    fn names_are_judged_in_lower_case_however_long() {
        let mut buf = [0u8; SHORT_NAME];
        let long = format!("OpenAI-{}", "X".repeat(80));
        for (name, lower) in [
            ("Content-Type".to_owned(), "content-type".to_owned()),
            (long.clone(), long.to_ascii_lowercase()),
        ] {
            let seen = with_lowercase(name.as_bytes(), &mut buf, <[u8]>::to_vec);
            assert_eq!(seen, lower.as_bytes());
        }
    }

    fn content_type_only(name: &[u8]) -> bool {
        name == b"content-type"
    }

    #[tokio::test]
    async fn an_answer_to_head_keeps_its_length_and_has_no_body() {
        const HEAD: &[u8] =
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 42\r\n\r\n";
        const GET: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let (node, client) =
            node_and_client(|_, n| Reply::Send(if n % 2 == 0 { HEAD } else { GET })).await;
        let authority: Authority = node.authority.parse().unwrap();
        let to = Forward::plain(&authority);
        let wire = b"HEAD /x HTTP/1.1\r\nHost: r\r\n\r\n";
        let (head, _) = crate::server::read_raw_request_from(wire, &Default::default())
            .unwrap()
            .unwrap();
        let raw = client.request_raw_to(&head, to).await.unwrap();
        assert_eq!(raw.content_length(), Some(42));
        assert_eq!(raw.header_lines(), b"Content-Type: text/plain\r\n");
        assert!(raw.body().is_end_stream());
        drop(raw);
        // The same connection goes on: no body was waited for.
        let get = client.request(node.get()).await.unwrap();
        assert_eq!(text(get).await.unwrap(), "ok");
        let mut request = node.get();
        *request.method_mut() = Method::HEAD;
        let answer = client.request(request).await.unwrap();
        assert_eq!(answer.headers()[header::CONTENT_LENGTH], "42");
        assert!(answer.body().is_end_stream());
        assert_eq!(node.connections(), 1);
    }

    #[tokio::test]
    async fn answer_headers_not_asked_for_are_skipped_but_still_frame_the_body() {
        const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\nServer: node-7\r\nX-Node: 10.0.0.7\r\n\
            Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n\
            5\r\nhello\r\n0\r\n\r\n";
        const CLOSING: &[u8] =
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
        let (node, client) =
            node_and_client(|_, n| Reply::Send(if n == 1 { CLOSING } else { CHUNKED })).await;
        let authority: Authority = node.authority.parse().unwrap();
        let to = Forward {
            authority: &authority,
            path_prefix: "",
            replaced: &[],
            keep_answer_header: content_type_only,
        };
        let request = node.get();
        let first = client.request_to(&request, to).await.unwrap();
        let names: Vec<_> = first.headers().keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-type"]);
        assert_eq!(
            text(first).await.unwrap(),
            "hello",
            "chunked, though not kept"
        );
        // Kept alive: the second request goes on the same connection. It says close, unseen by
        // the caller, and so the third needs a new one.
        let second = client.request_to(&request, to).await.unwrap();
        assert!(second.headers().is_empty(), "{:?}", second.headers());
        assert_eq!(text(second).await.unwrap(), "ok");
        assert_eq!(node.connections(), 1);
        assert_eq!(fetch_text(&client, &node).await, "hello");
        assert_eq!(node.connections(), 2);
    }

    #[tokio::test]
    async fn only_http_uris_are_sent() {
        let client: HttpClient = HttpClient::new(ClientConfig::default());
        let error = client
            .request(get("https://127.0.0.1:1/"))
            .await
            .unwrap_err();
        assert!(matches!(error, ClientError::Uri(_)), "{error}");
    }

    #[tokio::test]
    async fn a_host_name_is_resolved_and_its_addresses_tried_in_turn() {
        // `localhost` may resolve to ::1 first, where nothing listens; 127.0.0.1 answers.
        let (node, client) = node_and_client(|_, _| Reply::Send(HELLO)).await;
        let port = node.authority.rsplit_once(':').unwrap().1;
        let url = format!("http://localhost:{port}/");
        let response = client.request(get(&url)).await.unwrap();
        assert_eq!(text(response).await.unwrap(), "hello");
        let sent = node.requests.lock().unwrap()[0].clone();
        assert!(
            sent.contains(&format!("\r\nhost: localhost:{port}\r\n")),
            "{sent}"
        );
    }

    #[tokio::test]
    async fn heads_with_bare_lf_line_ends_are_read() {
        let (node, client) = node_and_client(|_, n| match n {
            0 => Reply::Trickle(b"HTTP/1.1 200 OK\ncontent-length: 2\n\nok"),
            _ => Reply::Trickle(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\nok"),
        })
        .await;
        for _ in 0..2 {
            assert_eq!(fetch_text(&client, &node).await, "ok");
        }
    }

    #[tokio::test]
    async fn a_length_next_to_another_coding_is_dropped() {
        let (node, client) = node_and_client(|_, _| {
            Reply::SendAndClose(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ncontent-length: 3\r\n\r\nabcdef",
            )
        })
        .await;
        let response = fetch(&client, &node).await;
        assert!(!response.headers().contains_key(header::CONTENT_LENGTH));
        assert_eq!(text(response).await.unwrap(), "abcdef");
    }

    #[test]
    fn a_sweeper_gone_with_its_runtime_is_started_again() {
        let client: HttpClient = HttpClient::new(ClientConfig::default());
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let sweeping = |client: &HttpClient| client.shared.sweeping.load(Ordering::Relaxed);
        let first = runtime();
        first.block_on(async {
            let node = node(|_, _| Reply::Send(HELLO)).await;
            assert_eq!(text(fetch(&client, &node).await).await.unwrap(), "hello");
        });
        assert!(sweeping(&client));
        drop(first);
        assert!(!sweeping(&client), "the next request starts a sweeper");
        runtime().block_on(async {
            let node = node(|_, _| Reply::Send(HELLO)).await;
            assert_eq!(text(fetch(&client, &node).await).await.unwrap(), "hello");
            assert!(sweeping(&client));
        });
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let client: HttpClient = HttpClient::new(ClientConfig::default());
        let error = client
            .request(get(&format!("http://127.0.0.1:{port}/")))
            .await
            .unwrap_err();
        assert!(matches!(error, ClientError::Connect(_)), "{error}");
    }

    fn head(version: Version, status: u16, headers: &[(&str, &str)]) -> AnswerHead {
        let mut map = HeaderMap::new();
        let mut facts = FramingFacts::default();
        for (name, value) in headers {
            facts.add(name.as_bytes(), value.as_bytes());
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        AnswerHead {
            status: StatusCode::from_u16(status).unwrap(),
            version,
            headers: AnswerHeaders::Map(map),
            facts,
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        use Version as V;
        let cases: &[(AnswerHead, bool, Framing, bool)] = &[
            (
                head(V::HTTP_11, 200, &[("content-length", "12")]),
                false,
                Framing::Length(12),
                true,
            ),
            (
                head(V::HTTP_11, 200, &[("content-length", "12")]),
                true,
                Framing::Length(0),
                true,
            ),
            (head(V::HTTP_11, 204, &[]), false, Framing::Length(0), true),
            (
                head(V::HTTP_11, 304, &[("content-length", "5")]),
                false,
                Framing::Length(0),
                true,
            ),
            (
                head(V::HTTP_11, 200, &[("transfer-encoding", "gzip, chunked")]),
                false,
                Framing::Chunked(Chunk::Size),
                true,
            ),
            (
                head(
                    V::HTTP_11,
                    200,
                    &[("transfer-encoding", "chunked"), ("content-length", "3")],
                ),
                false,
                Framing::Chunked(Chunk::Size),
                false,
            ),
            (
                head(V::HTTP_11, 200, &[("transfer-encoding", "gzip, chunked,")]),
                false,
                Framing::Chunked(Chunk::Size),
                true,
            ),
            (
                head(V::HTTP_11, 200, &[("transfer-encoding", "gzip")]),
                false,
                Framing::Close,
                false,
            ),
            (head(V::HTTP_11, 200, &[]), false, Framing::Close, false),
            (
                head(
                    V::HTTP_11,
                    200,
                    &[("content-length", "3"), ("connection", "close")],
                ),
                false,
                Framing::Length(3),
                false,
            ),
            (
                head(V::HTTP_10, 200, &[("content-length", "3")]),
                false,
                Framing::Length(3),
                false,
            ),
            (
                head(V::HTTP_11, 200, &[("content-length", "4, 4")]),
                false,
                Framing::Length(4),
                true,
            ),
        ];
        for (answer, no_body, expected, keep_alive) in cases {
            let got = framing(answer, *no_body).unwrap();
            assert_eq!(got, (*expected, *keep_alive), "{answer:?}");
        }
        let old_chunked = head(V::HTTP_10, 200, &[("transfer-encoding", "chunked")]);
        assert!(framing(&old_chunked, false).is_err());
        for bad in ["+5", "-1", "", "1 2", "99999999999999999999"] {
            let answer = head(V::HTTP_11, 200, &[("content-length", bad)]);
            assert!(framing(&answer, false).is_err(), "{bad:?}");
        }
    }
}
