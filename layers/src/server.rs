//! An HTTP/1.1 server for one client connection, in front of any tower service.
//!
//! [`serve_connection`] reads requests off a TCP connection, calls the service with each and
//! writes the answers back, one request at a time (pipelined requests wait their turn). The
//! router serves its HTTP/1 clients with it; HTTP/2 stays with hyper.
//!
//! Use it for a service that reads whole request bodies anyway, as one that parses JSON does.
//! Against hyper's server it does less per request:
//!
//! - **Whole bodies.** A request's body is read before the service is called, so the service
//!   gets it in one piece ([`RequestBody`]). A body over `max_body_bytes` (by its
//!   `content-length`, or once its chunks pass the limit) is not read: the service gets a body
//!   that fails with [`BodyTooLarge`], so it answers as it does for any body over its limit
//!   (413), and the connection closes after the answer.
//! - **One allocation per request.** Head and body are read through the stack and kept in one
//!   allocation of their exact size, which the header values and the body share. Between
//!   requests, and while an answer streams, the connection holds no read buffer.
//! - **Few writes.** An answer whose length is known goes out with its head in one write. A
//!   streamed one is written as its frames come (chunked), each at once.
//!
//! Limits, as in hyper's server:
//!
//! - a request head must arrive whole within `header_read_timeout` of the connection being
//!   ready for it, so a connection idle between requests is closed after that time too; a
//!   request body may not pause for longer, and after that time must have come at 1 KiB/s on
//!   average, or it gets 408;
//! - a head over `max_header_bytes`, or with more than 100 headers, gets 431; a malformed one,
//!   or one with both `content-length` and `transfer-encoding` (or two different lengths), gets
//!   400; the connection then closes;
//! - a client that closes its connection while its answer is pending or streaming (it cannot
//!   read the answer any more) has the service's future, or the answer's body, dropped at once;
//!   one that stops reading has them dropped, and its connection reset, once its socket has
//!   not been ready to take more of the answer for `send_timeout` (its buffers full), so that
//!   it cannot hold a streamed answer, and whatever the answer holds upstream, for ever.
//!
//! When `shutdown` turns true, an idle connection closes, and a busy one closes after its
//! answer.
//!
//! [`serve_raw_connection`] is the same server for a service that takes a
//! [`RawRequest`]: the request's bytes with ranges for its headers,
//! instead of an `http::Request` with a `HeaderMap`. Parsing and limits are shared; a test runs
//! every connection test against both, and the fuzz target checks they read any bytes alike.
//!
//! Either serves a service answering with an `http::Response` or with a
//! [`RawResponse`] (its header lines written out as they are): see [`Answer`]. The server
//! writes the framing headers itself (`content-length`, from the length the answer declares
//! or else its body's size hint, or `transfer-encoding: chunked`; `connection`), and `date`
//! unless the answer has one.

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::io;
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tower::Service;

use crate::RouterError;
use crate::raw::{HeaderRange, MessageBody, RawRequest, Target, header_map};
use crate::raw_response::RawResponse;
use crate::wire::{
    LANDING_SIZE, last_coding_is_chunked, line_end, parse_chunk_size, parse_length,
    poll_read_landing, push_decimal,
};

/// Limits for [`serve_connection`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConfig {
    /// Longest wait for a whole request head, from when the connection is ready for one.
    /// Default 10 s.
    pub header_read_timeout: Duration,
    /// Largest request head in bytes; larger gets 431. Default 64 KiB.
    pub max_header_bytes: usize,
    /// Largest request body read; a larger one reaches the service as [`BodyTooLarge`].
    /// Default 16 MiB.
    pub max_body_bytes: usize,
    /// Longest wait for a client's socket to be ready to take more of an answer; past it the
    /// connection is reset and the answer's body dropped. Default 60 s (nginx's
    /// `send_timeout`).
    pub send_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_body_bytes: 16 * 1024 * 1024,
            send_timeout: Duration::from_secs(60),
        }
    }
}

pin_project_lite::pin_project! {
    /// Resolves once shutdown is signalled (or its sender is gone). `signal` is polled the first
    /// time, which leaves the connection's task registered with the channel, and after that
    /// only once the channel has changed: an idle connection waits for its next request with
    /// this future among others, and a poll of `watch::Receiver::wait_for` cost some 120
    /// instructions a request. Polled by one task only (the connection's), whose waker the
    /// first poll left with the channel: see [`stop_signal`].
    struct Stop<F> {
        #[pin]
        signal: F,
        registered: bool,
        changes: watch::Receiver<bool>,
    }
}

/// The [`Stop`] for `shutdown`.
fn stop_signal(shutdown: watch::Receiver<bool>) -> Stop<impl Future<Output = ()>> {
    let changes = shutdown.clone();
    Stop {
        // Unconstrained: with the task's budget spent, `wait_for` returns `Pending` without
        // registering the task, and a `Stop` that counts that first poll as registered would
        // sleep through the shutdown (a connection whose first wait comes after a burst of
        // pipelined requests).
        signal: tokio::task::coop::unconstrained(async move {
            let mut shutdown = shutdown;
            let _ = shutdown.wait_for(|stop| *stop).await;
        }),
        registered: false,
        changes,
    }
}

impl<F> Stop<F> {
    /// Whether shutdown may have been signalled (the channel changed, or its sender is gone):
    /// checked without a poll, as before keeping a connection open for another request.
    fn signalled(&self) -> bool {
        self.changes.has_changed().unwrap_or(true)
    }
}

impl<F: Future<Output = ()>> Future for Stop<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.registered && !self.signalled() {
            return Poll::Pending;
        }
        let this = self.project();
        *this.registered = true;
        this.signal.poll(cx)
    }
}

/// Most headers in a request head.
const MAX_HEADERS: usize = 100;

/// Size of a read through the stack.
const READ_SIZE: usize = LANDING_SIZE;

/// After the header read timeout, a body must have come at this many bytes a second on average.
const BODY_MIN_BYTES_PER_SECOND: u64 = 1024;

/// How a request body is coming: its next bytes are due within the header read timeout of the
/// last ones and, after the first such time, at [`BODY_MIN_BYTES_PER_SECOND`] on average, so
/// that neither a silent client nor a trickle holds the connection.
#[derive(Debug, Clone, Copy)]
struct BodyPace {
    /// When the body was first waited for. Most bodies come with their head and are never
    /// waited for, and a clock read costs some 50 instructions.
    started: Option<Instant>,
    timeout: Duration,
    received: usize,
    /// The client waits for `100 Continue`, not yet sent.
    expects_continue: bool,
}

impl BodyPace {
    fn new(timeout: Duration, expects_continue: bool) -> Self {
        Self {
            started: None,
            timeout,
            received: 0,
            expects_continue,
        }
    }

    fn deadline(&mut self) -> Instant {
        let now = Instant::now();
        let started = *self.started.get_or_insert(now);
        let earned = Duration::from_secs(self.received as u64 / BODY_MIN_BYTES_PER_SECOND);
        (now + self.timeout).min(started + self.timeout + earned)
    }
}

/// Data frames up to this size are copied next to their chunk framing (one write); larger ones
/// are written on their own.
const COPY_LIMIT: usize = 16 * 1024;

/// Room for an answer's head but its own lines: the status line, `date` and the framing (and
/// an `http::Response`'s lines, which are not measured first).
const HEAD_ROOM: usize = 256;

/// The body of a request from [`serve_connection`]: all of it, or an error when it was larger
/// than `max_body_bytes`.
#[derive(Debug)]
pub struct RequestBody {
    state: BodyState,
}

#[derive(Debug)]
enum BodyState {
    Whole(Bytes),
    TooLarge,
    Done,
}

impl RequestBody {
    /// The body read, or `None` for one over the limit and not read.
    pub(crate) fn read(body: Option<Bytes>) -> Self {
        let state = match body {
            None => BodyState::TooLarge,
            Some(bytes) if bytes.is_empty() => BodyState::Done,
            Some(bytes) => BodyState::Whole(bytes),
        };
        Self { state }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyTooLarge;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyTooLarge>>> {
        Poll::Ready(match std::mem::replace(&mut self.state, BodyState::Done) {
            BodyState::Whole(bytes) => Some(Ok(Frame::data(bytes))),
            BodyState::TooLarge => Some(Err(BodyTooLarge)),
            BodyState::Done => None,
        })
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            BodyState::Whole(bytes) => SizeHint::with_exact(bytes.len() as u64),
            BodyState::TooLarge => SizeHint::default(),
            BodyState::Done => SizeHint::with_exact(0),
        }
    }
}

/// A request body was larger than the server's `max_body_bytes`, and was not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the request body is larger than the server reads")]
pub struct BodyTooLarge;

/// Why a connection is answered with an error and closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    HeadTooLarge,
    Malformed(&'static str),
    /// The body stopped coming, or came too slowly.
    BodyTimeout,
}

impl Refusal {
    fn answer(self, max_header_bytes: usize) -> RouterError {
        match self {
            Refusal::HeadTooLarge => RouterError::HeadTooLarge {
                limit: max_header_bytes,
            },
            Refusal::Malformed(what) => {
                RouterError::InvalidRequest(format!("malformed HTTP request: {what}"))
            }
            Refusal::BodyTimeout => RouterError::RequestTimeout,
        }
    }
}

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
}

/// What the head says beyond the request itself.
#[derive(Debug, Clone, Copy)]
struct HeadFacts {
    framing: Framing,
    keep_alive: bool,
    expects_continue: bool,
}

/// A request head as parsed, by offsets into the bytes it was parsed from, so that the request
/// can be built from a frozen copy of those bytes without parsing again.
struct ParsedHead {
    len: usize,
    method: Method,
    target: (usize, usize),
    version: Version,
    /// Boxed at its length: a fixed array of `MAX_HEADERS` was 1.6 KiB to copy with every
    /// move of the head, and a `RawRequest` takes this box as it is.
    headers: Box<[HeaderRange]>,
    facts: HeadFacts,
}

/// A request type the server reads into: `http::Request<RequestBody>`, or [`RawRequest`].
trait FromHead: Sized {
    /// The request `head` describes, over `message` (from which it was parsed), with `body`.
    fn from_head(message: Bytes, head: ParsedHead, body: MessageBody) -> Result<Self, Refusal>;
}

impl FromHead for Request<RequestBody> {
    fn from_head(message: Bytes, head: ParsedHead, body: MessageBody) -> Result<Self, Refusal> {
        let body = match body {
            MessageBody::Follows => Some(message.slice(head.len..)),
            MessageBody::Apart(body) => Some(body),
            MessageBody::NotRead => None,
        };
        build_request(&message, &head, RequestBody::read(body))
    }
}

impl FromHead for RawRequest {
    fn from_head(message: Bytes, head: ParsedHead, body: MessageBody) -> Result<Self, Refusal> {
        let (start, end) = head.target;
        let target = Target::parse(&message, start, end)
            .map_err(|()| Refusal::Malformed("request target"))?;
        // httparse has checked names and values as `HeaderName` and `HeaderValue` would, but
        // for a name's length.
        if head
            .headers
            .iter()
            .any(|&(start, end, _, _)| (end - start) as usize > MAX_HEADER_NAME_LEN)
        {
            return Err(Refusal::Malformed("header name"));
        }
        Ok(RawRequest::new(
            message,
            head.len,
            head.method,
            head.version,
            target,
            head.headers,
            body,
        ))
    }
}

/// The longest header name `http` takes.
const MAX_HEADER_NAME_LEN: usize = (1 << 16) - 1;

/// A request read off the connection, with what its answer needs to know.
struct Incoming<R> {
    request: R,
    version: Version,
    keep_alive: bool,
    head_only: bool,
    /// The body was not read: the connection cannot take another request.
    body_left: bool,
}

/// Serves HTTP/1.1 (and 1.0) requests on `stream` with `service` until the client closes the
/// connection, a request is refused, or `shutdown` turns true (see the module docs).
pub async fn serve_connection<S>(
    stream: TcpStream,
    service: S,
    config: ServerConfig,
    shutdown: watch::Receiver<bool>,
) where
    S: Service<Request<RequestBody>, Error = Infallible>,
    S::Response: Answer,
{
    serve_connection_after(stream, &[], service, config, shutdown).await;
}

/// [`serve_connection`] for a connection whose first bytes were already read off it (to tell
/// the protocol, say): `read` is served as if it came first.
pub async fn serve_connection_after<S>(
    stream: TcpStream,
    read: &[u8],
    service: S,
    config: ServerConfig,
    shutdown: watch::Receiver<bool>,
) where
    S: Service<Request<RequestBody>, Error = Infallible>,
    S::Response: Answer,
{
    serve(stream, read, service, config, shutdown).await;
}

/// [`serve_connection`] for a service that takes [`RawRequest`]s: the same reading, limits and
/// answers, without building an `http::Request` for each request.
pub async fn serve_raw_connection<S>(
    stream: TcpStream,
    service: S,
    config: ServerConfig,
    shutdown: watch::Receiver<bool>,
) where
    S: Service<RawRequest, Error = Infallible>,
    S::Response: Answer,
{
    serve(stream, &[], service, config, shutdown).await;
}

/// [`serve_raw_connection`] for a connection whose first bytes were already read off it, as
/// [`serve_connection_after`].
pub async fn serve_raw_connection_after<S>(
    stream: TcpStream,
    read: &[u8],
    service: S,
    config: ServerConfig,
    shutdown: watch::Receiver<bool>,
) where
    S: Service<RawRequest, Error = Infallible>,
    S::Response: Answer,
{
    serve(stream, read, service, config, shutdown).await;
}

async fn serve<R, S>(
    stream: TcpStream,
    read: &[u8],
    mut service: S,
    config: ServerConfig,
    shutdown: watch::Receiver<bool>,
) where
    R: FromHead,
    S: Service<R, Error = Infallible>,
    S::Response: Answer,
{
    let mut connection = Connection {
        stream,
        pending: BytesMut::from(read),
        config,
        timer: None,
    };
    let mut stop = pin!(stop_signal(shutdown));
    loop {
        let incoming = match connection.next_request(stop.as_mut()).await {
            Ok(Some(incoming)) => incoming,
            Ok(None) => return,
            Err(refusal) => {
                let answer = refusal
                    .answer(config.max_header_bytes)
                    .into_response::<Whole>();
                let _ = connection
                    .write_answer(answer, Version::HTTP_11, false, true)
                    .await;
                connection.linger().await;
                return;
            }
        };
        let Incoming {
            request,
            version,
            keep_alive,
            head_only,
            body_left,
        } = incoming;
        if poll_fn(|cx| service.poll_ready(cx)).await.is_err() {
            return;
        }
        let answer = match connection.unless_gone(service.call(request)).await {
            Some(Ok(answer)) => answer,
            Some(Err(never)) => match never {},
            None => return,
        };
        let close = !keep_alive || body_left || stop.signalled();
        let reusable = connection
            .write_answer(answer, version, head_only, close)
            .await;
        match reusable {
            Ok(true) => {}
            // The client may still be sending (a body left unread, pipelined requests): it
            // must read the answer, not a reset.
            Ok(false) if body_left || !connection.pending.is_empty() => {
                connection.linger().await;
                return;
            }
            Ok(false) => {
                let _ = connection.stream.shutdown().await;
                return;
            }
            Err(error) => {
                // The kernel would otherwise keep the unsent answer, up to a few MiB, and
                // probe a client that takes nothing for minutes after the close.
                if error.kind() == io::ErrorKind::TimedOut {
                    let _ = connection.stream.set_zero_linger();
                }
                return;
            }
        }
    }
}

/// Reads one request from the front of `bytes` as [`serve_connection`] does when they are all
/// the client sent: `Ok(None)` while it is incomplete, else the request and how many bytes it
/// took; `Err` is the 400 or 431 the connection would get. For the fuzz target
/// (`fuzz/fuzz_targets/http1_request.rs`) and its saved inputs, which need no socket.
#[doc(hidden)]
pub fn read_request_from(
    bytes: &[u8],
    config: &ServerConfig,
) -> Result<Option<(Request<RequestBody>, usize)>, RouterError> {
    read_from(bytes, config)
}

/// [`read_request_from`] for [`serve_raw_connection`]: the same answers, the request as a
/// [`RawRequest`].
#[doc(hidden)]
pub fn read_raw_request_from(
    bytes: &[u8],
    config: &ServerConfig,
) -> Result<Option<(RawRequest, usize)>, RouterError> {
    read_from(bytes, config)
}

/// Reads `bytes` as [`read_request_from`] and [`read_raw_request_from`] do and says how the
/// two differ, if they do: in the answer, the bytes taken, or the request (method, target,
/// the raw one's path and path-and-query as read without a `Uri`, version, headers, body, and
/// whether the raw one converts). For the fuzz target and its saved inputs.
#[doc(hidden)]
pub fn compare_readings(bytes: &[u8], config: &ServerConfig) -> Result<(), String> {
    let body_of = |body: &RequestBody| match &body.state {
        BodyState::Whole(bytes) => Ok(bytes.clone()),
        BodyState::Done => Ok(Bytes::new()),
        BodyState::TooLarge => Err(BodyTooLarge),
    };
    match (
        read_request_from(bytes, config),
        read_raw_request_from(bytes, config),
    ) {
        (Ok(None), Ok(None)) => Ok(()),
        (Err(http), Err(raw)) if http.to_string() == raw.to_string() => Ok(()),
        (Ok(Some((http, http_used))), Ok(Some((raw, raw_used)))) => {
            // Read before `into_http`, which makes the `Uri` they would then read.
            let same_target = raw.path_bytes() == http.uri().path().as_bytes()
                && raw.path_and_query_bytes() == crate::client::origin_form(http.uri()).as_bytes();
            let raw_body = raw.body().cloned();
            let converted = raw
                .into_http()
                .map_err(|e| format!("the raw request does not convert: {e}"))?;
            let same = http_used == raw_used
                && same_target
                && http.method() == converted.method()
                && http.uri() == converted.uri()
                && http.version() == converted.version()
                && http.headers() == converted.headers()
                && body_of(http.body()) == raw_body
                && body_of(converted.body()) == raw_body;
            if same {
                Ok(())
            } else {
                Err(format!(
                    "http read {http:?} taking {http_used} bytes, raw read {converted:?} taking {raw_used}"
                ))
            }
        }
        (http, raw) => Err(format!("http read {http:?}, raw read {raw:?}")),
    }
}

fn read_from<R: FromHead>(
    bytes: &[u8],
    config: &ServerConfig,
) -> Result<Option<(R, usize)>, RouterError> {
    let refused = |refusal: Refusal| refusal.answer(config.max_header_bytes);
    let Some(head) = parse_head(bytes, config.max_header_bytes).map_err(refused)? else {
        return Ok(None);
    };
    let limit = config.max_body_bytes as u64;
    let mut rest = BytesMut::from(bytes);
    // As the server reads them: a body of a known length follows its head in one message.
    let (message, body, used) = match head.facts.framing {
        Framing::Length(length) if length > limit => (
            rest.split_to(head.len).freeze(),
            MessageBody::NotRead,
            head.len,
        ),
        Framing::Length(length) => {
            let Some(total) = usize::try_from(length)
                .ok()
                .map(|n| head.len + n)
                .filter(|&total| total <= rest.len())
            else {
                return Ok(None);
            };
            (rest.split_to(total).freeze(), MessageBody::Follows, total)
        }
        Framing::Chunked => {
            let message = rest.split_to(head.len).freeze();
            let before = rest.len();
            let mut dechunker = Dechunker::default();
            let body = match dechunker.advance(&mut rest, limit).map_err(refused)? {
                Dechunked::NeedMore => return Ok(None),
                Dechunked::TooLarge => MessageBody::NotRead,
                Dechunked::Done => MessageBody::Apart(dechunker.finish()),
            };
            (message, body, head.len + before - rest.len())
        }
    };
    let request = R::from_head(message, head, body).map_err(refused)?;
    Ok(Some((request, used)))
}

/// The body of the server's own error answers.
type Whole = http_body_util::Full<Bytes>;

/// How long, and how much, a client's unread bytes are read and dropped before its connection
/// closes, so that it reads the answer rather than a reset.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;

struct Connection {
    stream: TcpStream,
    /// Bytes read and not used yet: part of a request, or pipelined ones.
    pending: BytesMut,
    config: ServerConfig,
    /// The header read timeout, made at the first wait.
    timer: Option<Pin<Box<Sleep>>>,
}

impl Connection {
    /// The next request: `Ok(None)` when the client closed the connection or went silent, or
    /// `stop` came while the connection was idle.
    async fn next_request<R: FromHead, F: Future<Output = ()>>(
        &mut self,
        mut stop: Pin<&mut F>,
    ) -> Result<Option<Incoming<R>>, Refusal> {
        let deadline = Instant::now() + self.config.header_read_timeout;
        let head = loop {
            if !self.pending.is_empty()
                && let Some(head) = parse_head(&self.pending, self.config.max_header_bytes)?
            {
                break head;
            }
            let idle = self.pending.is_empty();
            match self
                .read_before(deadline, idle.then_some(stop.as_mut()))
                .await
            {
                Some(Ok(read)) if read > 0 => {}
                _ => return Ok(None),
            }
        };
        let limit = self.config.max_body_bytes as u64;
        let mut pace = BodyPace::new(self.config.header_read_timeout, head.facts.expects_continue);
        let (message, body) = match head.facts.framing {
            Framing::Length(length) if length > limit => {
                (self.take(head.len), MessageBody::NotRead)
            }
            Framing::Length(length) => {
                let total = head.len + length as usize;
                while self.pending.len() < total {
                    if !self
                        .more_body(total - self.pending.len(), &mut pace)
                        .await?
                    {
                        return Ok(None);
                    }
                }
                (self.take(total), MessageBody::Follows)
            }
            Framing::Chunked => {
                // The head goes first; the chunks are decoded as they come, so the buffer never
                // holds more than a read's worth of their framing.
                let message = self.take(head.len);
                let mut dechunker = Dechunker::default();
                let body = loop {
                    match dechunker.advance(&mut self.pending, limit)? {
                        Dechunked::Done => break MessageBody::Apart(dechunker.finish()),
                        Dechunked::TooLarge => break MessageBody::NotRead,
                        Dechunked::NeedMore => {
                            if !self.more_body(READ_SIZE, &mut pace).await? {
                                return Ok(None);
                            }
                        }
                    }
                };
                (message, body)
            }
        };
        let body_left = matches!(body, MessageBody::NotRead);
        let (version, keep_alive) = (head.version, head.facts.keep_alive);
        let head_only = head.method == Method::HEAD;
        let request = R::from_head(message, head, body)?;
        Ok(Some(Incoming {
            request,
            version,
            keep_alive,
            head_only,
            body_left,
        }))
    }

    /// The first `n` bytes read, as one frozen piece.
    fn take(&mut self, n: usize) -> Bytes {
        if n == self.pending.len() {
            // All of it: the allocation goes with the message as it is (a split would make it
            // shared first, an allocation of its own).
            return std::mem::take(&mut self.pending).freeze();
        }
        let message = self.pending.split_to(n).freeze();
        // Pipelined bytes: keep them in memory of their own, not in the message's.
        self.pending = BytesMut::from(&self.pending[..]);
        message
    }

    /// Reads more of a body, room made for up to `wanted` bytes: `Ok(false)` when the client
    /// closed or failed. A client waiting for it (`expect: 100-continue`) is first told to go
    /// on, once.
    async fn more_body(&mut self, wanted: usize, pace: &mut BodyPace) -> Result<bool, Refusal> {
        if pace.expects_continue {
            pace.expects_continue = false;
            let _ = self.send(b"HTTP/1.1 100 Continue\r\n\r\n").await;
        }
        self.pending.reserve(wanted.min(1024 * 1024));
        let deadline = pace.deadline();
        match self
            .read_before(deadline, None::<Pin<&mut std::future::Pending<()>>>)
            .await
        {
            Some(Ok(read)) if read > 0 => {
                pace.received += read;
                Ok(true)
            }
            Some(_) => Ok(false),
            None => Err(Refusal::BodyTimeout),
        }
    }

    /// Reads what the client sends next; `None` if `deadline` passes or `stop` resolves
    /// first.
    async fn read_before<F: Future<Output = ()>>(
        &mut self,
        deadline: Instant,
        mut stop: Option<Pin<&mut F>>,
    ) -> Option<io::Result<usize>> {
        let Connection {
            stream,
            pending,
            timer,
            ..
        } = self;
        let mut armed = false;
        poll_fn(|cx| {
            if let Poll::Ready(read) = poll_read_into(stream, cx, pending) {
                return Poll::Ready(Some(read));
            }
            if let Some(stop) = stop.as_mut()
                && stop.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(None);
            }
            let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if !armed {
                timer.as_mut().reset(deadline);
                armed = true;
            }
            match timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Runs `future` to its end, unless the client closes the connection first (`None`).
    async fn unless_gone<F: Future>(&mut self, future: F) -> Option<F::Output> {
        let mut future = pin!(future);
        let mut watching = true;
        poll_fn(|cx| {
            if let Poll::Ready(output) = future.as_mut().poll(cx) {
                return Poll::Ready(Some(output));
            }
            if watching {
                match self.poll_gone(cx) {
                    Poll::Ready(true) => return Poll::Ready(None),
                    Poll::Ready(false) => watching = false,
                    Poll::Pending => {}
                }
            }
            Poll::Pending
        })
        .await
    }

    /// `Ready(true)` once the client has closed the connection (or it failed); `Ready(false)`
    /// when it has sent so much ahead that it is no longer read until its answer is out.
    fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        loop {
            if self.pending.len() >= self.config.max_header_bytes + READ_SIZE {
                return Poll::Ready(false);
            }
            match poll_read_into(&mut self.stream, cx, &mut self.pending) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(true),
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    /// Writes `answer`: `Ok(true)` when it went out whole and the connection may take another
    /// request. The body is dropped if the client goes away while it streams.
    async fn write_answer<A: Answer>(
        &mut self,
        answer: A,
        version: Version,
        head_only: bool,
        mut close: bool,
    ) -> io::Result<bool> {
        let status = answer.status();
        // Room for the head and, when it is short and its length known, the body: it goes out
        // in the same write, and the buffer must not grow (a copy of the head) to take it.
        let exact_length = answer.body_size_hint().exact();
        let short_body = exact_length
            .and_then(|length| usize::try_from(length).ok())
            .filter(|&length| length <= COPY_LIMIT);
        let mut out =
            Vec::with_capacity(HEAD_ROOM + answer.lines_len_hint() + short_body.unwrap_or(0));
        push_status_line(&mut out, status);
        let lines = answer.write_lines(&mut out);
        let mut body = pin!(Answer::into_body(answer));
        // An app that closes the connection is obeyed; an interim (1xx) answer taken as the
        // final one ends it too, since nothing here switches protocols.
        close |= status.is_informational() || lines.close;
        let framing = if status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Out::Bodiless
        } else if let Some(length) = lines.declared {
            Out::Length(length)
        } else if let Some(length) = exact_length {
            Out::Length(length)
        } else if version == Version::HTTP_11 {
            Out::Chunked
        } else {
            close = true;
            Out::Close
        };
        finish_head(&mut out, lines.has_date, framing, version, close);
        if head_only || matches!(framing, Out::Bodiless) {
            self.send(&out).await?;
            return Ok(!close);
        }
        let mut left = match framing {
            Out::Length(length) => length,
            _ => u64::MAX,
        };
        loop {
            // A body's error is of no use here, and need not be `Send` across the writes.
            let polled = poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx)))
                .await
                .map(|frame| frame.map(|frame| frame.map_err(drop)));
            let frame = match polled {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    // Nothing more yet: what is ready goes out before the wait.
                    if !out.is_empty() {
                        self.send(&out).await?;
                        out.clear();
                    }
                    let next = poll_fn(|cx| {
                        body.as_mut()
                            .poll_frame(cx)
                            .map(|frame| frame.map(|frame| frame.map_err(drop)))
                    });
                    match self.unless_gone(next).await {
                        Some(frame) => frame,
                        None => return Ok(false),
                    }
                }
            };
            let data = match frame {
                None => {
                    let whole = match framing {
                        Out::Chunked => {
                            out.extend_from_slice(b"0\r\n\r\n");
                            true
                        }
                        Out::Length(_) => left == 0,
                        Out::Close | Out::Bodiless => false,
                    };
                    self.send(&out).await?;
                    return Ok(whole && !close);
                }
                Some(Err(_)) => {
                    // The client gets a body cut short: no chunked end, or fewer bytes than
                    // announced, then the connection closes.
                    self.send(&out).await?;
                    return Ok(false);
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => data,
                    _ => continue,
                },
            };
            let data = match framing {
                Out::Length(_) if data.len() as u64 > left => {
                    // More than announced: the excess is not sent, and the connection closes.
                    out.extend_from_slice(&data[..left as usize]);
                    self.send(&out).await?;
                    return Ok(false);
                }
                Out::Length(_) => {
                    left -= data.len() as u64;
                    data
                }
                Out::Chunked => {
                    push_hex(&mut out, data.len());
                    out.extend_from_slice(b"\r\n");
                    data
                }
                Out::Close | Out::Bodiless => data,
            };
            if data.len() > COPY_LIMIT {
                self.send(&out).await?;
                out.clear();
                self.send(&data).await?;
            } else {
                out.extend_from_slice(&data);
            }
            if matches!(framing, Out::Chunked) {
                out.extend_from_slice(b"\r\n");
            }
            // A body with many frames ready at once goes out in pieces, not all held here.
            if out.len() >= COPY_LIMIT {
                self.send(&out).await?;
                out.clear();
            }
        }
    }

    /// Writes all of `bytes`, or fails with `TimedOut` once the client's socket has taken no
    /// more of them for `send_timeout`. Each write is tried first without a timer: most go
    /// straight through, and the timer is made only when one has to wait.
    async fn send(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        let stream = &mut self.stream;
        let limit = self.config.send_timeout;
        while !bytes.is_empty() {
            let attempt =
                poll_fn(|cx| Poll::Ready(Pin::new(&mut *stream).poll_write(cx, bytes))).await;
            let written = match attempt {
                Poll::Ready(written) => written?,
                Poll::Pending => tokio::time::timeout(
                    limit,
                    poll_fn(|cx| Pin::new(&mut *stream).poll_write(cx, bytes)),
                )
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??,
            };
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            bytes = &bytes[written..];
        }
        Ok(())
    }

    /// Closes the sending side, then reads and drops what the client still sends, for a
    /// while, so that it reads the answer instead of a reset.
    async fn linger(&mut self) {
        let _ = self.stream.shutdown().await;
        let mut dropped = 0;
        let _ = tokio::time::timeout(LINGER_TIME, async {
            while dropped < LINGER_BYTES {
                self.pending.clear();
                match poll_fn(|cx| poll_read_into(&mut self.stream, cx, &mut self.pending)).await {
                    Ok(read) if read > 0 => dropped += read,
                    _ => break,
                }
            }
        })
        .await;
    }
}

/// How an answer's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    /// None may be sent (1xx, 204, 304).
    Bodiless,
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, length unknown).
    Close,
}

/// Reads what the socket has: straight into `pending` when room was made there for a body,
/// else through the stack ([`poll_read_landing`]).
fn poll_read_into(
    stream: &mut TcpStream,
    cx: &mut Context<'_>,
    pending: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    if pending.capacity() - pending.len() >= READ_SIZE {
        return tokio_util::io::poll_read_buf(Pin::new(stream), cx, pending);
    }
    poll_read_landing(stream, cx, pending)
}

/// Parses a request head at the front of `buf`: `Ok(None)` while it is incomplete, and
/// [`Refusal::HeadTooLarge`] once it is, or would be, longer than `max_len`.
fn parse_head(buf: &[u8], max_len: usize) -> Result<Option<ParsedHead>, Refusal> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let len = match request.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) if len > max_len => return Err(Refusal::HeadTooLarge),
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= max_len => {
            return Err(Refusal::HeadTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeadTooLarge),
        Err(_) => return Err(Refusal::Malformed("request head")),
    };
    let method = Method::from_bytes(request.method.unwrap_or_default().as_bytes())
        .map_err(|_| Refusal::Malformed("method"))?;
    let version = match request.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let offset = |part: &[u8]| part.as_ptr() as usize - buf.as_ptr() as usize;
    let path = request.path.unwrap_or_default().as_bytes();
    let target = (offset(path), offset(path) + path.len());
    let mut head = ParsedHead {
        len,
        method,
        target,
        version,
        headers: Box::default(),
        facts: HeadFacts {
            framing: Framing::Length(0),
            keep_alive: version == Version::HTTP_11,
            expects_continue: false,
        },
    };
    let mut length: Option<u64> = None;
    let mut chunked = None;
    let mut headers = Vec::with_capacity(request.headers.len());
    for found in request.headers.iter() {
        let (name, value) = (found.name.as_bytes(), found.value);
        // Heads are far smaller than 4 GiB; one that is not is refused, not cut.
        let range = |part: &[u8]| {
            let start = offset(part);
            u32::try_from(start)
                .ok()
                .zip(u32::try_from(start + part.len()).ok())
                .ok_or(Refusal::HeadTooLarge)
        };
        let ((name_start, name_end), (value_start, value_end)) = (range(name)?, range(value)?);
        headers.push((name_start, name_end, value_start, value_end));
        if name.eq_ignore_ascii_case(b"content-length") {
            for part in value.split(|&b| b == b',') {
                let n =
                    parse_length(part.trim_ascii()).ok_or(Refusal::Malformed("content-length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(Refusal::Malformed("conflicting content-length"));
                }
                length = Some(n);
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // The last coding must be chunked: a request body cannot be framed by the close.
            chunked = Some(last_coding_is_chunked(value));
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    head.facts.keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && version == Version::HTTP_10 {
                    head.facts.keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case(b"expect") {
            head.facts.expects_continue = version == Version::HTTP_11
                && value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        }
    }
    head.headers = headers.into_boxed_slice();
    head.facts.framing = match (chunked, length) {
        (Some(_), Some(_)) => {
            return Err(Refusal::Malformed(
                "both content-length and transfer-encoding",
            ));
        }
        (Some(_), None) if version == Version::HTTP_10 => {
            return Err(Refusal::Malformed("transfer-encoding in HTTP/1.0"));
        }
        (Some(true), None) => Framing::Chunked,
        (Some(false), None) => return Err(Refusal::Malformed("transfer-encoding")),
        (None, length) => Framing::Length(length.unwrap_or(0)),
    };
    Ok(Some(head))
}

/// The request `head` describes, its parts shared with `message` (from which it was parsed).
fn build_request(
    message: &Bytes,
    head: &ParsedHead,
    body: RequestBody,
) -> Result<Request<RequestBody>, Refusal> {
    let uri = target_uri(message, head)?;
    let headers = header_map(message, &head.headers).map_err(Refusal::Malformed)?;
    let mut request = Request::new(body);
    *request.method_mut() = head.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = head.version;
    *request.headers_mut() = headers;
    Ok(request)
}

/// The request target of `head`, sharing `message`.
fn target_uri(message: &Bytes, head: &ParsedHead) -> Result<Uri, Refusal> {
    Uri::from_maybe_shared(message.slice(head.target.0..head.target.1))
        .map_err(|_| Refusal::Malformed("request target"))
}

/// Where a chunked body's decoding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum ChunkStage {
    /// At a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk's data, with this much left.
    Data(u64),
    /// At the CR LF after a chunk's data.
    DataEnd,
    /// Among the trailer lines, this many bytes of them so far.
    Trailers(usize),
}

/// What [`Dechunker::advance`] got to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dechunked {
    Done,
    NeedMore,
    /// The data passed the limit.
    TooLarge,
}

/// Decodes a chunked body as it arrives, taking what it uses off the front of the buffer.
#[derive(Debug, Default)]
struct Dechunker {
    stage: ChunkStage,
    data: BytesMut,
    /// Bytes of framing (size lines, extensions, line ends, trailers) so far.
    framing: usize,
}

/// Longest chunk-size line, extensions included, and longest trailer section.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

/// Most framing bytes for a chunked body: a quarter of the data limit, plus 64 KiB.
fn framing_allowance(limit: u64) -> usize {
    usize::try_from(limit / 4)
        .unwrap_or(usize::MAX)
        .saturating_add(64 * 1024)
}

impl Dechunker {
    /// The decoded body, in memory of its size (the buffer grew by doubling).
    fn finish(self) -> Bytes {
        if self.data.capacity() > self.data.len() + self.data.len() / 4 {
            return Bytes::copy_from_slice(&self.data);
        }
        self.data.freeze()
    }

    fn advance(&mut self, buf: &mut BytesMut, limit: u64) -> Result<Dechunked, Refusal> {
        loop {
            if self.framing > framing_allowance(limit) {
                // Chunks far smaller than any client sends: refused, whatever the data's size.
                return Err(Refusal::Malformed(
                    "chunk framing out of proportion to the data",
                ));
            }
            match self.stage {
                ChunkStage::Size => {
                    let Some(end) = line_end(buf) else {
                        return if buf.len() > MAX_CHUNK_LINE {
                            Err(Refusal::Malformed("chunk size line"))
                        } else {
                            Ok(Dechunked::NeedMore)
                        };
                    };
                    if end > MAX_CHUNK_LINE {
                        return Err(Refusal::Malformed("chunk size line"));
                    }
                    let size =
                        parse_chunk_size(&buf[..end]).ok_or(Refusal::Malformed("chunk size"))?;
                    buf.advance(end + 2);
                    self.framing += end + 2;
                    if size == 0 {
                        self.stage = ChunkStage::Trailers(0);
                    } else if self.data.len() as u64 + size > limit {
                        return Ok(Dechunked::TooLarge);
                    } else {
                        self.stage = ChunkStage::Data(size);
                    }
                }
                ChunkStage::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Dechunked::NeedMore);
                    }
                    let taken = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    self.data.extend_from_slice(&buf[..taken]);
                    buf.advance(taken);
                    let left = left - taken as u64;
                    self.stage = if left == 0 {
                        ChunkStage::DataEnd
                    } else {
                        ChunkStage::Data(left)
                    };
                }
                ChunkStage::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Dechunked::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Refusal::Malformed("chunk data"));
                    }
                    buf.advance(2);
                    self.framing += 2;
                    self.stage = ChunkStage::Size;
                }
                ChunkStage::Trailers(seen) => {
                    let Some(end) = line_end(buf) else {
                        return if seen + buf.len() > MAX_TRAILERS {
                            Err(Refusal::Malformed("trailers"))
                        } else {
                            Ok(Dechunked::NeedMore)
                        };
                    };
                    let line = &buf[..end];
                    // A field line, with no bare CR or LF that another parser might take for
                    // a line end (and so for the start of another request).
                    if end > 0
                        && (line.iter().any(|&b| b == b'\r' || b == b'\n') || !line.contains(&b':'))
                    {
                        return Err(Refusal::Malformed("trailer line"));
                    }
                    buf.advance(end + 2);
                    self.framing += end + 2;
                    if end == 0 {
                        return Ok(Dechunked::Done);
                    }
                    if seen + end + 2 > MAX_TRAILERS {
                        return Err(Refusal::Malformed("trailers"));
                    }
                    self.stage = ChunkStage::Trailers(seen + end + 2);
                }
            }
        }
    }
}

/// Appends the status line.
fn push_status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends what follows the answer's own header lines: `date` unless it has one, the framing
/// headers, `connection`, and the blank line.
fn finish_head(out: &mut Vec<u8>, has_date: bool, framing: Out, version: Version, close: bool) {
    if !has_date {
        push_date(out);
    }
    match framing {
        Out::Length(length) => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, usize::try_from(length).unwrap_or(usize::MAX));
            out.extend_from_slice(b"\r\n");
        }
        Out::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// An answer the server writes: an `http::Response` or a [`RawResponse`], over any body of
/// [`Bytes`]. Sealed: the server needs to know how each writes its header lines.
pub trait Answer: sealed::WriteLines {
    /// The answer's body, which the server writes after the head.
    type Body: Body<Data = Bytes>;

    /// The body, without the rest.
    fn into_body(self) -> Self::Body;
}

impl<B: Body<Data = Bytes>> Answer for Response<B> {
    type Body = B;

    fn into_body(self) -> B {
        Response::into_body(self)
    }
}

impl<B: Body<Data = Bytes>> Answer for RawResponse<B> {
    type Body = B;

    fn into_body(self) -> B {
        RawResponse::into_body(self)
    }
}

mod sealed {
    use bytes::Bytes;
    use http::{Response, StatusCode, header};
    use http_body::{Body, SizeHint};

    use crate::raw_response::{RawResponse, push_header_lines};
    use crate::wire::{has_token, parse_length};

    /// What an answer's own header lines said about its framing.
    pub struct LineFacts {
        /// The `content-length` it declared.
        pub declared: Option<u64>,
        /// It asked for the connection to close.
        pub close: bool,
        /// One of them is `date`.
        pub has_date: bool,
    }

    /// How an answer's head is written.
    pub trait WriteLines {
        fn status(&self) -> StatusCode;
        fn body_size_hint(&self) -> SizeHint;
        /// How long the header lines are, if known before they are written.
        fn lines_len_hint(&self) -> usize {
            0
        }
        /// Appends the header lines but the framing ones, which the server writes itself.
        fn write_lines(&self, out: &mut Vec<u8>) -> LineFacts;
    }

    impl<B: Body<Data = Bytes>> WriteLines for Response<B> {
        fn status(&self) -> StatusCode {
            self.status()
        }

        fn body_size_hint(&self) -> SizeHint {
            self.body().size_hint()
        }

        fn write_lines(&self, out: &mut Vec<u8>) -> LineFacts {
            let headers = self.headers();
            push_header_lines(out, headers);
            LineFacts {
                declared: headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|value| parse_length(value.as_bytes())),
                close: has_token(headers, header::CONNECTION, "close"),
                has_date: headers.contains_key(header::DATE),
            }
        }
    }

    impl<B: Body<Data = Bytes>> WriteLines for RawResponse<B> {
        fn status(&self) -> StatusCode {
            self.status()
        }

        fn body_size_hint(&self) -> SizeHint {
            self.body().size_hint()
        }

        fn lines_len_hint(&self) -> usize {
            self.header_lines().len()
        }

        fn write_lines(&self, out: &mut Vec<u8>) -> LineFacts {
            out.extend_from_slice(self.header_lines());
            LineFacts {
                declared: self.content_length(),
                close: self.close(),
                has_date: self.has_date(),
            }
        }
    }
}

fn push_hex(out: &mut Vec<u8>, n: usize) {
    let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1);
    for shift in (0..digits).rev() {
        out.push(b"0123456789abcdef"[(n >> (shift * 4)) & 0xf]);
    }
}

/// Appends a `date` header, formatted once a second per thread.
fn push_date(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, String)> = const {
            std::cell::RefCell::new((u64::MAX, String::new()))
        };
    }
    let now = std::time::SystemTime::now();
    let second = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != second {
            *at = second;
            *text = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use http::header;
    use http_body_util::{BodyExt, Full};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    type Answer = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

    /// Answers with the method, the path, the `x-test` header and the body, as text.
    async fn echo(request: Request<RequestBody>) -> Result<Response<Answer>, Infallible> {
        let (parts, body) = request.into_parts();
        let body = match body.collect().await {
            Ok(collected) => String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
            Err(BodyTooLarge) => "too large".to_owned(),
        };
        let test = parts
            .headers
            .get("x-test")
            .map(|v| v.to_str().unwrap_or("?").to_owned())
            .unwrap_or_default();
        let text = format!("{} {} {test} {body}", parts.method, parts.uri);
        Ok(Response::new(Full::new(Bytes::from(text)).boxed_unsync()))
    }

    /// Which entry point a test serves with: each test runs with both.
    #[derive(Debug, Clone, Copy)]
    enum Mode {
        /// [`serve_connection`], the service taking `http::Request`s.
        Http,
        /// [`serve_raw_connection`], each [`RawRequest`] turned into the `http::Request` the
        /// test's service takes: the two must read the same requests.
        Raw,
    }

    /// Serves `service` on a loopback port; the sender starts a shutdown.
    async fn serve<S, F>(
        mode: Mode,
        config: ServerConfig,
        service: S,
    ) -> (std::net::SocketAddr, watch::Sender<bool>)
    where
        S: Fn(Request<RequestBody>) -> F + Clone + Send + 'static,
        F: Future<Output = Result<Response<Answer>, Infallible>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, shutdown) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = service.clone();
                let shutdown = shutdown.clone();
                match mode {
                    Mode::Http => {
                        let service = tower::service_fn(service);
                        tokio::spawn(serve_connection(stream, service, config, shutdown));
                    }
                    Mode::Raw => {
                        let service = tower::service_fn(move |raw: RawRequest| {
                            let request = raw
                                .into_http()
                                .expect("a request the raw server read converts");
                            service(request)
                        });
                        tokio::spawn(serve_raw_connection(stream, service, config, shutdown));
                    }
                }
            }
        });
        (addr, stop)
    }

    /// The default config with one change.
    fn config_with(change: impl FnOnce(&mut ServerConfig)) -> ServerConfig {
        let mut config = ServerConfig::default();
        change(&mut config);
        config
    }

    /// Sends `raw` and reads until the server closes the connection (or 5 s pass).
    async fn exchange(addr: std::net::SocketAddr, raw: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(raw).await.unwrap();
        read_to_close(&mut stream).await
    }

    async fn read_to_close(stream: &mut TcpStream) -> String {
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    fn statuses(answer: &str) -> Vec<&str> {
        answer
            .match_indices("HTTP/1.1 ")
            .map(|(at, _)| &answer[at + 9..at + 12])
            .collect()
    }

    async fn requests_on_one_connection_are_answered_in_order_with_their_bodies(mode: Mode) {
        let (addr, _stop) = serve(mode, ServerConfig::default(), echo).await;
        // Three requests in one write (pipelined), the last asking to close.
        let answer = exchange(
            addr,
            b"POST /a?q=1 HTTP/1.1\r\nhost: t\r\nx-test: one\r\ncontent-length: 5\r\n\r\nhello\
              GET /b HTTP/1.1\r\nhost: t\r\n\r\n\
              POST /c HTTP/1.1\r\nhost: t\r\nX-Test: three\r\nconnection: close\r\ncontent-length: 2\r\n\r\nhi",
        )
        .await;
        let bodies: Vec<&str> = answer
            .split("HTTP/1.1 200 OK\r\n")
            .skip(1)
            .map(|a| a.split_once("\r\n\r\n").unwrap().1)
            .collect();
        assert_eq!(
            bodies,
            ["POST /a?q=1 one hello", "GET /b  ", "POST /c three hi"],
            "{answer}"
        );
        assert!(answer.contains("content-length: 21\r\n"), "{answer}");
        assert!(answer.contains("date: "), "{answer}");
        assert!(
            answer.ends_with("connection: close\r\n\r\nPOST /c three hi"),
            "{answer}"
        );
    }

    async fn a_body_in_many_reads_and_chunks_arrives_whole(mode: Mode) {
        let (addr, _stop) = serve(mode, ServerConfig::default(), echo).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let parts: [&[u8]; 5] = [
            b"POST /chunked HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n",
            b"5;ext=1\r\nhel",
            b"lo\r\n6\r\n world\r\n",
            b"0\r\ntrailer: x\r\n",
            b"\r\nGET /next HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
        ];
        for part in parts {
            stream.write_all(part).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let answer = read_to_close(&mut stream).await;
        assert!(
            answer.contains("\r\n\r\nPOST /chunked  hello world"),
            "{answer}"
        );
        assert!(answer.ends_with("GET /next  "), "{answer}");
    }

    async fn a_client_expecting_100_continue_is_told_to_send_its_body(mode: Mode) {
        let (addr, _stop) = serve(mode, ServerConfig::default(), echo).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"POST /e HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\nconnection: close\r\ncontent-length: 4\r\n\r\n")
            .await
            .unwrap();
        let mut interim = [0u8; 25];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut interim))
            .await
            .expect("100 Continue before the body")
            .unwrap();
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        stream.write_all(b"body").await.unwrap();
        let answer = read_to_close(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.ends_with("POST /e  body"), "{answer}");
    }

    async fn a_body_over_the_limit_is_not_read_and_the_client_still_reads_the_answer(mode: Mode) {
        let config = config_with(|c| c.max_body_bytes = 1024);
        let (addr, _stop) = serve(mode, config, echo).await;
        for raw in [
            format!(
                "POST /big HTTP/1.1\r\nhost: t\r\ncontent-length: {}\r\n\r\n{}",
                1 << 20,
                "x".repeat(1 << 20)
            ),
            format!(
                "POST /big HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n800\r\n{}\r\n0\r\n\r\n",
                "x".repeat(2048)
            ),
        ] {
            let answer = exchange(addr, raw.as_bytes()).await;
            assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
            assert!(answer.contains("connection: close\r\n"), "{answer}");
            assert!(answer.ends_with("POST /big  too large"), "{answer}");
        }
        // Exactly at the limit is fine.
        let raw = format!(
            "POST /ok HTTP/1.1\r\nhost: t\r\nconnection: close\r\ncontent-length: 1024\r\n\r\n{}",
            "y".repeat(1024)
        );
        assert!(
            exchange(addr, raw.as_bytes())
                .await
                .ends_with(&"y".repeat(1024))
        );
    }

    async fn broken_or_oversized_heads_are_refused_and_the_connection_closes(mode: Mode) {
        let config = config_with(|c| c.max_header_bytes = 1024);
        let (addr, _stop) = serve(mode, config, echo).await;
        let long = format!("GET / HTTP/1.1\r\nx-long: {}\r\n\r\n", "a".repeat(2000));
        let many: String = (0..101).map(|i| format!("x-{i}: v\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        let cases: [(&[u8], &str); 8] = [
            (long.as_bytes(), "431"),
            (many.as_bytes(), "431"),
            (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", "400"),
            (b"POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n", "400"),
            (b"POST / HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd", "400"),
            (b"POST / HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\nabcd", "400"),
            (b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", "400"),
            (b"POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n", "400"),
        ];
        for (raw, status) in cases {
            let answer = exchange(addr, raw).await;
            assert_eq!(statuses(&answer), [status], "{answer}");
            assert!(answer.contains("\"error\""), "OpenAI's shape: {answer}");
        }
    }

    async fn http_1_0_clients_keep_the_connection_only_when_they_ask(mode: Mode) {
        let (addr, _stop) = serve(mode, ServerConfig::default(), echo).await;
        let answer = exchange(addr, b"GET /one HTTP/1.0\r\n\r\n").await;
        assert!(answer.contains("connection: close\r\n"), "{answer}");
        let answer = exchange(
            addr,
            b"GET /a HTTP/1.0\r\nconnection: keep-alive\r\n\r\nGET /b HTTP/1.0\r\n\r\n",
        )
        .await;
        assert_eq!(statuses(&answer), ["200", "200"], "{answer}");
        assert!(answer.contains("connection: keep-alive\r\n"), "{answer}");
        // A HEAD answer has the length but no body.
        let answer = exchange(addr, b"HEAD /h HTTP/1.1\r\nconnection: close\r\n\r\n").await;
        assert!(
            answer.ends_with("content-length: 9\r\nconnection: close\r\n\r\n"),
            "{answer}"
        );
    }

    /// A body fed through a channel.
    struct Fed(tokio::sync::mpsc::Receiver<Bytes>);

    impl Body for Fed {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.0
                .poll_recv(cx)
                .map(|part| part.map(|data| Ok(Frame::data(data))))
        }
    }

    /// An answer whose body comes in two parts, `gap` apart.
    fn streamed(gap: Duration) -> Answer {
        let (sender, receiver) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            for part in ["one", "two"] {
                let _ = sender.send(Bytes::from(part)).await;
                tokio::time::sleep(gap).await;
            }
        });
        Fed(receiver).boxed_unsync()
    }

    async fn a_streamed_answer_goes_out_chunked_as_each_part_comes(mode: Mode) {
        let (addr, _stop) = serve(mode, ServerConfig::default(), |_| async {
            Ok(Response::new(streamed(Duration::from_millis(300))))
        })
        .await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut first = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut first))
            .await
            .expect("the first part does not wait for the second")
            .unwrap();
        let first = String::from_utf8_lossy(&first[..n]).into_owned();
        assert!(first.contains("transfer-encoding: chunked\r\n"), "{first}");
        assert!(first.ends_with("\r\n\r\n3\r\none\r\n"), "{first}");
        let rest = read_to_close(&mut stream).await;
        assert_eq!(rest, "3\r\ntwo\r\n0\r\n\r\n");
    }

    /// Sets its flag when dropped.
    struct Dropped(Arc<AtomicBool>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    async fn a_client_that_goes_away_has_its_pending_answer_dropped(mode: Mode) {
        let dropped = Arc::new(AtomicBool::new(false));
        let seen = dropped.clone();
        let (addr, _stop) = serve(mode, ServerConfig::default(), move |_| {
            let guard = Dropped(seen.clone());
            async move {
                let _guard = guard;
                std::future::pending::<()>().await;
                Ok(Response::new(Full::new(Bytes::new()).boxed_unsync()))
            }
        })
        .await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!dropped.load(Ordering::SeqCst), "still waited for");
        drop(stream);
        assert!(
            eventually(&dropped, Duration::from_secs(1)).await,
            "the answer of a client that left was not dropped"
        );
    }

    /// An app answering `/<status>/<declared length>/<body>`: that status, that
    /// `content-length` (unless `-`), that body (streamed when the path ends in `~`).
    async fn framed(request: Request<RequestBody>) -> Result<Response<Answer>, Infallible> {
        let path = request.uri().path().to_owned();
        let mut parts = path.trim_start_matches('/').splitn(3, '/');
        let status = parts.next().unwrap_or("200").parse().unwrap_or(200);
        let declared = parts.next().unwrap_or("-").to_owned();
        let body = parts.next().unwrap_or("").to_owned();
        let mut answer = match body.strip_suffix('~') {
            Some(text) => {
                let (sender, receiver) = tokio::sync::mpsc::channel(1);
                let text = Bytes::from(text.to_owned());
                tokio::spawn(async move { sender.send(text).await });
                Response::new(Fed(receiver).boxed_unsync())
            }
            None => Response::new(Full::new(Bytes::from(body)).boxed_unsync()),
        };
        *answer.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
        if declared != "-" {
            answer
                .headers_mut()
                .insert(header::CONTENT_LENGTH, declared.parse().unwrap());
        }
        if request.headers().contains_key("x-close") {
            answer.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        }
        Ok(answer)
    }

    async fn answers_are_framed_as_declared_and_a_wrong_length_ends_the_connection(mode: Mode) {
        let (addr, _stop) = serve(mode, ServerConfig::default(), framed).await;
        // Longer than declared: cut at the length, then closed (a second request gets nothing).
        let answer = exchange(
            addr,
            b"GET /200/3/abcde HTTP/1.1\r\n\r\nGET /200/-/x HTTP/1.1\r\n\r\n",
        )
        .await;
        assert!(answer.ends_with("content-length: 3\r\n\r\nabc"), "{answer}");
        assert_eq!(statuses(&answer), ["200"], "{answer}");
        // Shorter than declared: what there is, then closed.
        let answer = exchange(
            addr,
            b"GET /200/10/abc HTTP/1.1\r\n\r\nGET /200/-/x HTTP/1.1\r\n\r\n",
        )
        .await;
        assert!(
            answer.ends_with("content-length: 10\r\n\r\nabc"),
            "{answer}"
        );
        // No body with 204 or 304, whatever the app gave; the connection goes on.
        let answer = exchange(
            addr,
            b"GET /204/-/abc HTTP/1.1\r\n\r\nGET /304/3/abc HTTP/1.1\r\n\r\nGET /200/-/end HTTP/1.1\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(statuses(&answer), ["204", "304", "200"], "{answer}");
        assert!(!answer.contains("abc"), "{answer}");
        let not_modified = answer
            .split("HTTP/1.1 ")
            .find(|part| part.starts_with("304"))
            .unwrap_or_default();
        assert!(
            !not_modified.contains("content-length"),
            "304 has no length of its own: {answer}"
        );
        assert!(answer.ends_with("\r\n\r\nend"), "{answer}");
        // Streamed to HTTP/1.0: no chunked framing, ended by the close.
        let answer = exchange(
            addr,
            b"GET /200/-/stream~ HTTP/1.0\r\nconnection: keep-alive\r\n\r\n",
        )
        .await;
        assert!(!answer.contains("transfer-encoding"), "{answer}");
        assert!(
            answer.ends_with("connection: close\r\n\r\nstream"),
            "{answer}"
        );
        // Streamed to HTTP/1.1: chunked.
        let answer = exchange(
            addr,
            b"GET /200/-/stream~ HTTP/1.1\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(
            answer.ends_with("\r\n\r\n6\r\nstream\r\n0\r\n\r\n"),
            "{answer}"
        );
        // The app closing the connection is obeyed.
        let answer = exchange(
            addr,
            b"GET /200/-/a HTTP/1.1\r\nx-close: 1\r\n\r\nGET /200/-/b HTTP/1.1\r\n\r\n",
        )
        .await;
        assert_eq!(statuses(&answer), ["200"], "{answer}");
        assert!(answer.contains("connection: close\r\n"), "{answer}");
    }

    async fn a_client_leaving_mid_stream_has_the_answer_body_dropped(mode: Mode) {
        struct Guarded(Fed, #[allow(dead_code)] Dropped);
        impl Body for Guarded {
            type Data = Bytes;
            type Error = Infallible;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
                Pin::new(&mut self.0).poll_frame(cx)
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let seen = dropped.clone();
        let (addr, _stop) = serve(mode, ServerConfig::default(), move |_| {
            let guard = Dropped(seen.clone());
            async move {
                let (sender, receiver) = tokio::sync::mpsc::channel(1);
                tokio::spawn(async move {
                    let _ = sender.send(Bytes::from_static(b"first")).await;
                    // Never a second part, never an end: only the client can end this.
                    sender.closed().await;
                });
                Ok(Response::new(Guarded(Fed(receiver), guard).boxed_unsync()))
            }
        })
        .await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut head = [0u8; 64];
        let n = stream.read(&mut head).await.unwrap();
        assert!(n > 0);
        assert!(!dropped.load(Ordering::SeqCst), "the stream is still on");
        drop(stream);
        assert!(
            eventually(&dropped, Duration::from_secs(1)).await,
            "the body of a client that left was not dropped"
        );
    }

    async fn a_client_that_stops_reading_has_the_answer_body_dropped_after_the_send_timeout(
        mode: Mode,
    ) {
        /// Data for ever, as fast as it is taken.
        struct Endless(#[allow(dead_code)] Dropped);
        impl Body for Endless {
            type Data = Bytes;
            type Error = Infallible;
            fn poll_frame(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
                static PART: [u8; 64 * 1024] = [b'x'; 64 * 1024];
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&PART)))))
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let seen = dropped.clone();
        let config = config_with(|c| c.send_timeout = Duration::from_millis(200));
        let (addr, _stop) = serve(mode, config, move |_| {
            let body = Endless(Dropped(seen.clone()));
            async move { Ok(Response::new(body.boxed_unsync())) }
        })
        .await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        // The client keeps its connection open and reads nothing: once the socket's buffers
        // are full, no byte of the answer moves.
        assert!(
            eventually(&dropped, Duration::from_secs(10)).await,
            "the answer of a client that reads nothing was still held after 10 s"
        );
        drop(stream);
    }

    /// Whether `flag` turns true within `limit`.
    async fn eventually(flag: &AtomicBool, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !flag.load(Ordering::SeqCst) {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    async fn an_answer_in_flight_at_shutdown_says_the_connection_closes(mode: Mode) {
        let (addr, stop) = serve(mode, ServerConfig::default(), |request| async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            echo(request).await
        })
        .await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /slow HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.send(true).unwrap();
        let answer = read_to_close(&mut stream).await;
        assert_eq!(statuses(&answer), ["200"], "{answer}");
        assert!(answer.contains("connection: close\r\n"), "{answer}");
        assert!(answer.ends_with("GET /slow  "), "{answer}");
    }

    async fn a_refused_client_still_sending_reads_the_refusal_not_a_reset(mode: Mode) {
        let config = config_with(|c| c.max_header_bytes = 1024);
        let (addr, _stop) = serve(mode, config, echo).await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut read, mut write) = stream.into_split();
        let sender = tokio::spawn(async move {
            write
                .write_all(format!("GET / HTTP/1.1\r\nx-long: {}", "a".repeat(4096)).as_bytes())
                .await?;
            // Goes on sending after the server has answered.
            tokio::time::sleep(Duration::from_millis(100)).await;
            write.write_all(&vec![b'a'; 64 * 1024]).await?;
            write.write_all(b"\r\n\r\n").await
        });
        let mut answer = Vec::new();
        read.read_to_end(&mut answer)
            .await
            .expect("the answer and a clean end, not a reset");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
        assert!(
            sender.await.unwrap().is_ok(),
            "what it sent after was read and dropped"
        );
    }

    async fn a_body_that_stops_or_trickles_is_cut_off(mode: Mode) {
        let config = config_with(|c| c.header_read_timeout = Duration::from_millis(300));
        let (addr, _stop) = serve(mode, config, echo).await;
        for trickle in [false, true] {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(b"POST / HTTP/1.1\r\ncontent-length: 100000\r\n\r\nstart")
                .await
                .unwrap();
            let started = std::time::Instant::now();
            let mut answer = Vec::new();
            let closed = async {
                let mut chunk = [0u8; 1024];
                loop {
                    if trickle {
                        // A byte every 100 ms: never a pause of 300 ms, but far below 1 KiB/s.
                        let _ = stream.write_all(b"x").await;
                    }
                    match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut chunk))
                        .await
                    {
                        Ok(Ok(0) | Err(_)) => break,
                        Ok(Ok(n)) => answer.extend_from_slice(&chunk[..n]),
                        Err(_) => {}
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(5), closed)
                .await
                .expect("the connection is closed");
            let waited = started.elapsed();
            assert!(
                waited >= Duration::from_millis(250) && waited < Duration::from_secs(1),
                "trickle {trickle}: closed after {waited:?}"
            );
            let answer = String::from_utf8_lossy(&answer);
            assert_eq!(statuses(&answer), ["408"], "trickle {trickle}: {answer}");
            assert!(answer.contains("request_timeout"), "{answer}");
        }
    }

    async fn idle_connections_close_at_the_header_timeout_and_at_shutdown(mode: Mode) {
        let config = config_with(|c| c.header_read_timeout = Duration::from_millis(300));
        let (addr, stop) = serve(mode, config, echo).await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let started = std::time::Instant::now();
        let answer = read_to_close(&mut idle).await;
        assert_eq!(statuses(&answer), ["200"], "{answer}");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
            "closed after {waited:?}"
        );

        let config = ServerConfig::default();
        let (addr, stop_second) = serve(mode, config, echo).await;
        drop(stop);
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut head = [0u8; 12];
        idle.read_exact(&mut head).await.unwrap();
        stop_second.send(true).unwrap();
        let rest = read_to_close(&mut idle).await;
        assert!(rest.ends_with("GET /  "), "answered, then closed: {rest}");
    }

    /// The shutdown signal is polled only once it changed, after a first poll that registers
    /// the connection: a connection that waited idle several times before must still see it.
    async fn a_connection_idle_after_several_requests_closes_at_shutdown(mode: Mode) {
        let (addr, stop) = serve(mode, ServerConfig::default(), echo).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        for _ in 0..3 {
            client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            let mut answer = vec![0u8; 256];
            let n = client.read(&mut answer).await.unwrap();
            assert!(
                answer[..n].starts_with(b"HTTP/1.1 200"),
                "{:?}",
                &answer[..n]
            );
            // Idle long enough for the server to wait for the next request.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let started = std::time::Instant::now();
        stop.send(true).unwrap();
        let rest = tokio::time::timeout(Duration::from_secs(5), read_to_close(&mut client))
            .await
            .expect("closed at shutdown, long before the 10 s header timeout");
        assert_eq!(rest, "", "nothing more was sent");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn shutdown_reaches_a_wait_first_polled_with_the_task_budget_spent() {
        let (send, shutdown) = watch::channel(false);
        let mut stop = pin!(stop_signal(shutdown));
        let (fill, mut items) = tokio::sync::mpsc::channel(1024);
        for i in 0..1024 {
            fill.try_send(i).unwrap();
        }
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = send.send(true);
            // Kept: a sender gone would end the wait by itself.
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let started = std::time::Instant::now();
        let mut spent = false;
        let waited = poll_fn(|cx| {
            if !spent {
                // Receives until tokio's budget for this poll runs out, then polls the signal
                // for the first time.
                while items.poll_recv(cx).is_ready() {}
                spent = true;
            }
            stop.as_mut().poll(cx)
        });
        // The timeout's own wake-up would find the signal changed: the time tells.
        let _ = tokio::time::timeout(Duration::from_secs(3), waited).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "not woken by the shutdown (sent at 100 ms): done after {:?}",
            started.elapsed()
        );
    }

    /// Feeds `wire` to a dechunker `step` bytes at a time.
    fn dechunk(
        wire: &[u8],
        step: usize,
        limit: u64,
    ) -> (Result<Dechunked, Refusal>, Dechunker, BytesMut) {
        let mut dechunker = Dechunker::default();
        let mut buf = BytesMut::new();
        let mut outcome = Ok(Dechunked::NeedMore);
        for part in wire.chunks(step) {
            buf.extend_from_slice(part);
            outcome = dechunker.advance(&mut buf, limit);
            if outcome != Ok(Dechunked::NeedMore) {
                break;
            }
        }
        (outcome, dechunker, buf)
    }

    #[test]
    fn chunked_bodies_are_decoded_as_they_come_whatever_the_reads() {
        let wire = b"4\r\nwiki\r\n5;x=y\r\npedia\r\n0\r\nt: 1\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, wire.len()] {
            let (outcome, dechunker, rest) = dechunk(wire, step, 100);
            assert_eq!(outcome, Ok(Dechunked::Done), "{step}");
            assert_eq!(&dechunker.data[..], b"wikipedia", "{step}");
            if step == wire.len() {
                assert_eq!(
                    &rest[..],
                    b"NEXT",
                    "what follows stays for the next request"
                );
            }
        }
        assert_eq!(dechunk(wire, wire.len(), 8).0, Ok(Dechunked::TooLarge));
        assert_eq!(dechunk(&wire[..20], 1, 100).0, Ok(Dechunked::NeedMore));
        for bad in [
            &b"4\r\nwikiXX"[..],
            b"zz\r\n",
            b"0\r\n\nGET /x HTTP/1.1\r\n\r\n",
            b"0\r\nno colon\r\n\r\n",
        ] {
            assert!(
                dechunk(bad, bad.len(), 100).0.is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(dechunk(&[b'1'; MAX_CHUNK_LINE + 1], 64, 100).0.is_err());
        let trailers: Vec<u8> = b"0\r\n"
            .iter()
            .chain(&b"t: v\r\n".repeat(MAX_TRAILERS / 6 + 1))
            .copied()
            .collect();
        assert!(
            dechunk(&trailers, 512, 100).0.is_err(),
            "trailers past their limit"
        );
        // Framing out of all proportion to the data (one-byte chunks with long extensions).
        let chunk = format!("1;{}\r\nx\r\n", "e".repeat(1000));
        let wire = chunk.repeat(100);
        assert!(
            dechunk(wire.as_bytes(), 4096, 1000).0.is_err(),
            "refused as malformed"
        );
    }

    #[test]
    fn a_request_is_read_from_bytes_as_from_a_connection() {
        let config = ServerConfig::default();
        let wire = b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        let (request, used) = read_request_from(wire, &config).unwrap().unwrap();
        assert_eq!(&wire[used..], b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(request.uri(), "/c");
        assert_eq!(request.body().size_hint().exact(), Some(4));
        assert!(read_request_from(&wire[..40], &config).unwrap().is_none());
        let both = b"POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n";
        let refused = read_request_from(both, &config).unwrap_err();
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
        let over = b"POST / HTTP/1.1\r\ncontent-length: 99999999999\r\n\r\n";
        let (request, used) = read_request_from(over, &config).unwrap().unwrap();
        assert_eq!(used, over.len(), "the head only: the body is not read");
        assert!(!request.body().is_end_stream());
    }

    #[test]
    fn the_raw_reader_reads_what_the_http_reader_reads() {
        let config = ServerConfig {
            max_header_bytes: 4096,
            max_body_bytes: 1024,
            ..ServerConfig::default()
        };
        let long_name = format!("GET / HTTP/1.1\r\n{}: v\r\n\r\n", "n".repeat(70_000));
        let cases: [&[u8]; 14] = [
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\nContent-Length: 2\r\n\r\n{}",
            b"GET /a?b=c HTTP/1.0\r\nX-Dup: 1\r\nx-dup: 2\r\n\r\n",
            b"GET http://host:1/p?q HTTP/1.1\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n\r\n",
            b"CONNECT host:443 HTTP/1.1\r\n\r\n",
            b"GET //x HTTP/1.1\r\n\r\n",
            b"GET /%zz HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nx: caf\xc3\xa9 \x80\tend\r\n\r\n",
            b"GET / HTTP/1.1\r\nx: a\x01b\r\n\r\n",
            b"GET / HTTP/1.1\r\nx y: a\r\n\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 2000\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 4\r\n\r\nab",
            b"FOO\x7f / HTTP/1.1\r\n\r\n",
        ];
        for case in cases {
            assert_eq!(
                compare_readings(case, &config),
                Ok(()),
                "{}",
                String::from_utf8_lossy(case)
            );
        }
        // A name longer than `http` takes, in a head the limits allow.
        let roomy = ServerConfig {
            max_header_bytes: 128 * 1024,
            ..config
        };
        assert_eq!(compare_readings(long_name.as_bytes(), &roomy), Ok(()));
        assert!(read_raw_request_from(long_name.as_bytes(), &roomy).is_err());
    }

    #[test]
    fn chunk_sizes_are_written_in_lowercase_hex() {
        for n in [0, 9, 10, 255, 4096, 0x1_0000_0001] {
            let mut out = Vec::new();
            push_hex(&mut out, n);
            assert_eq!(out, format!("{n:x}").into_bytes());
        }
    }

    #[test]
    fn heads_say_how_the_body_is_framed_and_whether_to_keep_the_connection() {
        let facts = |raw: &[u8]| parse_head(raw, 64 * 1024).unwrap().unwrap().facts;
        let f = facts(b"POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n");
        assert_eq!((f.framing, f.keep_alive), (Framing::Length(12), true));
        let f = facts(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\nConnection: Close\r\n\r\n",
        );
        assert_eq!((f.framing, f.keep_alive), (Framing::Chunked, false));
        // An empty list element is skipped, not taken for the last coding.
        let f = facts(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, \r\n\r\n");
        assert_eq!(f.framing, Framing::Chunked);
        assert_eq!(
            parse_head(
                b"POST / HTTP/1.1\r\nTransfer-Encoding: ,\r\n\r\n",
                64 * 1024
            )
            .err(),
            Some(Refusal::Malformed("transfer-encoding"))
        );
        let f = facts(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert_eq!((f.framing, f.keep_alive), (Framing::Length(0), true));
        assert!(facts(b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n").expects_continue);
        assert!(!facts(b"PUT / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n").expects_continue);
        assert!(
            parse_head(b"GET / HTTP/1.1\r\nhost: a", 64 * 1024)
                .unwrap()
                .is_none()
        );
        assert_eq!(
            parse_head(
                b"POST / HTTP/1.1\r\ncontent-length: 1, 2\r\n\r\n",
                64 * 1024
            )
            .err(),
            Some(Refusal::Malformed("conflicting content-length"))
        );
    }

    #[tokio::test]
    async fn a_raw_answer_goes_out_with_its_lines_as_they_are() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_stop, shutdown) = watch::channel(false);
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let service = tower::service_fn(|request: RawRequest| async move {
                let streamed = request.uri().path() == "/stream";
                let body = if streamed {
                    let (sender, receiver) = tokio::sync::mpsc::channel(1);
                    tokio::spawn(async move { sender.send(Bytes::from("parts")).await });
                    Fed(receiver).boxed_unsync()
                } else {
                    Full::new(Bytes::from("hello")).boxed_unsync()
                };
                let mut answer = RawResponse::new(StatusCode::CREATED, body);
                answer
                    .insert_header(&header::HeaderName::from_static("x-tag"), b"Kept As Given")
                    .unwrap();
                answer
                    .insert_header(&header::DATE, b"Mon, 01 Jan 2024 00:00:00 GMT")
                    .unwrap();
                // Framing is the server's: a coding the answer claims is not written.
                answer
                    .insert_header(&header::TRANSFER_ENCODING, b"gzip, chunked")
                    .unwrap();
                if request.method() == Method::HEAD {
                    answer.set_content_length(Some(11));
                }
                answer.set_close(request.header("x-close").is_some());
                Ok::<_, Infallible>(answer)
            });
            serve_raw_connection(stream, service, ServerConfig::default(), shutdown).await;
        });
        let answer = exchange(
            addr,
            b"GET /whole HTTP/1.1\r\n\r\nGET /stream HTTP/1.1\r\n\r\nHEAD /whole HTTP/1.1\r\n\r\n\
              GET /whole HTTP/1.1\r\nx-close: 1\r\n\r\nGET /never HTTP/1.1\r\n\r\n",
        )
        .await;
        let whole = "HTTP/1.1 201 Created\r\nx-tag: Kept As Given\r\n\
                     date: Mon, 01 Jan 2024 00:00:00 GMT\r\ncontent-length: 5\r\n\r\nhello";
        let streamed = "HTTP/1.1 201 Created\r\nx-tag: Kept As Given\r\n\
                        date: Mon, 01 Jan 2024 00:00:00 GMT\r\ntransfer-encoding: chunked\r\n\r\n\
                        5\r\nparts\r\n0\r\n\r\n";
        let closing = "HTTP/1.1 201 Created\r\nx-tag: Kept As Given\r\n\
                       date: Mon, 01 Jan 2024 00:00:00 GMT\r\ncontent-length: 5\r\n\
                       connection: close\r\n\r\nhello";
        // An answer to HEAD says the length it declares, and sends no body.
        let head = "HTTP/1.1 201 Created\r\nx-tag: Kept As Given\r\n\
                    date: Mon, 01 Jan 2024 00:00:00 GMT\r\ncontent-length: 11\r\n\r\n";
        assert_eq!(answer, format!("{whole}{streamed}{head}{closing}"));
    }

    /// Each server test, once for each [`Mode`].
    macro_rules! in_both_modes {
        ($($name:ident),* $(,)?) => {
            mod http_mode {
                $(#[tokio::test]
                async fn $name() {
                    super::$name(super::Mode::Http).await;
                })*
            }
            mod raw_mode {
                $(#[tokio::test]
                async fn $name() {
                    super::$name(super::Mode::Raw).await;
                })*
            }
        };
    }

    in_both_modes!(
        requests_on_one_connection_are_answered_in_order_with_their_bodies,
        a_body_in_many_reads_and_chunks_arrives_whole,
        a_client_expecting_100_continue_is_told_to_send_its_body,
        a_body_over_the_limit_is_not_read_and_the_client_still_reads_the_answer,
        broken_or_oversized_heads_are_refused_and_the_connection_closes,
        http_1_0_clients_keep_the_connection_only_when_they_ask,
        a_streamed_answer_goes_out_chunked_as_each_part_comes,
        a_client_that_goes_away_has_its_pending_answer_dropped,
        answers_are_framed_as_declared_and_a_wrong_length_ends_the_connection,
        a_client_leaving_mid_stream_has_the_answer_body_dropped,
        a_client_that_stops_reading_has_the_answer_body_dropped_after_the_send_timeout,
        an_answer_in_flight_at_shutdown_says_the_connection_closes,
        a_refused_client_still_sending_reads_the_refusal_not_a_reset,
        a_body_that_stops_or_trickles_is_cut_off,
        idle_connections_close_at_the_header_timeout_and_at_shutdown,
        a_connection_idle_after_several_requests_closes_at_shutdown,
    );
}
