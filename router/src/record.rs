//! Around the whole `/v1` request path: a request id, a tracing span, and when the answer is
//! over, one history row and the request metrics.
//!
//! The request id is the client's `x-request-id` when it sends a sane one, otherwise a new one;
//! it goes to the node and back to the client. The row is written when the response body ends,
//! fails, or is dropped because the client went away (then `client_disconnected` is set), so a
//! stream's latency is its whole length. Token counts come from the `usage` object the node
//! sends, in a JSON answer or in the last SSE chunk, found by a byte scan rather than by parsing
//! the body.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use bytes::Bytes;

use http::{HeaderValue, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use layers::{
    NodePool, ProxyBody, RawRequest, RawResponse, RequestInfoSlot, ServedBy, UpstreamFailure,
    UpstreamRequestId,
};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::auth::ApiKeyId;
use crate::history::{History, RequestRecord};
use crate::metrics::{Metrics, model_label};

/// `x-request-id`.
pub const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// Makes request ids: a random prefix per process and a counter, so ids are unique without a
/// random draw per request.
#[derive(Debug)]
pub struct RequestIds {
    /// The random prefix, already in hex: 16 digits.
    prefix: Box<str>,
    next: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        let mut seed = [0u8; 8];
        // Without OS randomness the ids are still unique among the users of this instance.
        let _ = getrandom::fill(&mut seed);
        let mut prefix = String::with_capacity(16);
        push_hex(&mut prefix, u64::from_le_bytes(seed), 16);
        Self {
            prefix: prefix.into_boxed_str(),
            next: AtomicU64::new(1),
        }
    }
}

impl RequestIds {
    fn next(&self) -> String {
        // By hand: `format!` costs about 1,500 instructions here, a tenth of the router's own
        // work per request.
        let mut id = String::with_capacity(24);
        id.push_str(&self.prefix);
        push_hex(&mut id, self.next.fetch_add(1, Ordering::Relaxed), 8);
        id
    }
}

/// Appends `value` in lowercase hex, zero-padded to at least `min_digits`: `{:0min_digits$x}`.
fn push_hex(out: &mut String, value: u64, min_digits: usize) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let significant = (64 - value.leading_zeros() as usize).div_ceil(4).max(1);
    for i in (0..significant.max(min_digits)).rev() {
        let nibble = if i < 16 { (value >> (i * 4)) & 0xf } else { 0 };
        out.push(char::from(DIGITS[nibble as usize]));
    }
}

/// The path for a request's row: one of the OpenAI routes as static text, which most rows are.
fn row_path(path: &[u8]) -> Cow<'static, str> {
    const ROUTES: [&str; 4] = [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
    ];
    match ROUTES.iter().find(|route| route.as_bytes() == path) {
        Some(route) => Cow::Borrowed(route),
        None => Cow::Owned(String::from_utf8_lossy(path).into_owned()),
    }
}

/// A client's id is kept if it is short and plain.
fn sane_request_id(value: &[u8]) -> Option<&str> {
    let plain = !value.is_empty() && value.len() <= 128 && value.iter().all(u8::is_ascii_graphic);
    plain.then(|| std::str::from_utf8(value).ok()).flatten()
}

/// What the recorder reads from a request and puts on it: an `http::Request` (extensions and
/// its header map) or a [`RawRequest`] (typed fields and its header lines).
pub trait RecordedRequest: Send + 'static {
    /// The first `x-request-id`'s value, and whether another follows.
    fn request_id_header(&self) -> (Option<&[u8]>, bool);
    /// The id the node gets in place of the client's.
    fn set_upstream_request_id(&mut self, id: UpstreamRequestId);
    /// The id of the API key the request used, once checked.
    fn api_key_id(&self) -> Option<&ApiKeyId>;
    /// The request's path.
    fn path(&self) -> &[u8];
    /// Where `RequestInfoLayer` puts what it parsed.
    fn set_info_slot(&mut self, slot: RequestInfoSlot);
}

impl RecordedRequest for Request<Body> {
    fn request_id_header(&self) -> (Option<&[u8]>, bool) {
        let mut all = self.headers().get_all(&REQUEST_ID).iter();
        (all.next().map(HeaderValue::as_bytes), all.next().is_some())
    }

    fn set_upstream_request_id(&mut self, id: UpstreamRequestId) {
        self.extensions_mut().insert(id);
    }

    fn api_key_id(&self) -> Option<&ApiKeyId> {
        self.extensions().get()
    }

    fn path(&self) -> &[u8] {
        self.uri().path().as_bytes()
    }

    fn set_info_slot(&mut self, slot: RequestInfoSlot) {
        self.extensions_mut().insert(slot);
    }
}

impl RecordedRequest for RawRequest {
    fn request_id_header(&self) -> (Option<&[u8]>, bool) {
        let first = self.header(REQUEST_ID.as_str());
        let repeated = first.is_some() && self.header_count(REQUEST_ID.as_str()) > 1;
        (first, repeated)
    }

    fn set_upstream_request_id(&mut self, id: UpstreamRequestId) {
        RawRequest::set_upstream_request_id(self, id);
    }

    fn api_key_id(&self) -> Option<&ApiKeyId> {
        self.extensions().get()
    }

    fn path(&self) -> &[u8] {
        self.path_bytes()
    }

    fn set_info_slot(&mut self, slot: RequestInfoSlot) {
        RawRequest::set_info_slot(self, slot);
    }
}

/// What the recorder reads from an answer and does to it: an `http::Response` (its extensions
/// and header map; the body boxed as axum's) or the proxy's [`RawResponse`] (typed fields and
/// header lines).
pub trait RecordedAnswer: Send + 'static {
    /// The answer with its body watched by the recorder.
    type Recorded: Send + 'static;
    /// The status code.
    fn status(&self) -> u16;
    /// The node that served it, if one did.
    fn served_by(&self) -> Option<&Arc<str>>;
    /// Tells the client the request's id (`x-request-id`), in place of any the node sent.
    fn set_request_id(&mut self, id: &str);
    /// Where a stream that breaks after it started is reported, when the body cannot say.
    fn upstream_failure(&self) -> Option<UpstreamFailure>;
    /// The answer with its body watched: the row is written when the body ends.
    fn watch(self, pending: Pending) -> Self::Recorded;
}

impl RecordedAnswer for Response<Body> {
    type Recorded = Response<Body>;

    fn status(&self) -> u16 {
        self.status().as_u16()
    }

    fn served_by(&self) -> Option<&Arc<str>> {
        self.extensions().get::<ServedBy>().map(|s| &s.0)
    }

    fn set_request_id(&mut self, id: &str) {
        if let Ok(value) = HeaderValue::from_str(id) {
            self.headers_mut().insert(REQUEST_ID, value);
        }
    }

    fn upstream_failure(&self) -> Option<UpstreamFailure> {
        self.extensions().get::<UpstreamFailure>().cloned()
    }

    fn watch(self, pending: Pending) -> Response<Body> {
        self.map(|body| Body::new(RecordedBody::new(body, pending)))
    }
}

impl RecordedAnswer for RawResponse<ProxyBody> {
    type Recorded = RawResponse<Body>;

    fn status(&self) -> u16 {
        self.status().as_u16()
    }

    fn served_by(&self) -> Option<&Arc<str>> {
        RawResponse::served_by(self)
    }

    fn set_request_id(&mut self, id: &str) {
        // Ids are checked to be plain (`sane_request_id`) or made here.
        let _ = self.insert_header(&REQUEST_ID, id.as_bytes());
    }

    fn upstream_failure(&self) -> Option<UpstreamFailure> {
        // The body says (`ProxyBody::upstream_failure`).
        None
    }

    fn watch(self, pending: Pending) -> RawResponse<Body> {
        self.map(|body| Body::new(RecordedBody::new(body, pending)))
    }
}

/// A body that can say whether the node's stream broke after it started.
pub trait ReportsFailure {
    /// The error code the client was given, once the stream broke.
    fn upstream_failure(&self) -> Option<&'static str>;
}

impl ReportsFailure for Body {
    fn upstream_failure(&self) -> Option<&'static str> {
        // Boxed away: the answer's `UpstreamFailure` tells.
        None
    }
}

impl ReportsFailure for ProxyBody {
    fn upstream_failure(&self) -> Option<&'static str> {
        ProxyBody::upstream_failure(self)
    }
}

/// What the recorder shares.
#[derive(Debug, Clone)]
pub struct Recorder {
    /// Where rows go.
    pub history: History,
    /// Request metrics.
    pub metrics: Arc<Metrics>,
    /// For model labels.
    pub pool: NodePool,
    /// Request ids.
    pub ids: Arc<RequestIds>,
}

impl<S> Layer<S> for Recorder {
    type Service = Recorded<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Recorded {
            inner,
            recorder: Arc::new(self.clone()),
        }
    }
}

/// The service made by [`Recorder`].
#[derive(Debug, Clone)]
pub struct Recorded<S> {
    inner: S,
    // One reference count per request instead of one per shared part.
    recorder: Arc<Recorder>,
}

impl<S, R> Service<R> for Recorded<S>
where
    R: RecordedRequest,
    S: Service<R, Error = Infallible> + Send + 'static,
    S::Response: RecordedAnswer,
    S::Future: Send + 'static,
{
    type Response = <S::Response as RecordedAnswer>::Recorded;
    type Error = Infallible;
    type Future = RecordedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: R) -> Self::Future {
        let started = Instant::now();
        let ts_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let (first, repeated) = request.request_id_header();
        let client_id = first.and_then(sane_request_id).map(str::to_owned);
        let from_client = client_id.is_some();
        let request_id = client_id.unwrap_or_else(|| self.recorder.ids.next());
        // The node gets exactly the id the client is told. The client's own goes as it came
        // when it is the only one; otherwise the proxy sends this one in place of the client's
        // (missing, unusable or repeated) headers. An insert into the request's header map
        // would cost more: it is sized to the headers that came, so one more grows it (and
        // sizing it one larger from the start cost the bench's requests 600 instructions more
        // than this entry, tried 2026-11-29). A copy, even of the client's own value: one
        // sharing the request's bytes would keep its whole allocation, body included, for as
        // long as the request lives.
        if (!from_client || repeated)
            && let Ok(value) = HeaderValue::from_str(&request_id)
        {
            request.set_upstream_request_id(UpstreamRequestId(value));
        }
        let api_key_id = request.api_key_id().map(|k| String::from(&*k.0));
        let path = row_path(request.path());
        // Filled by `RequestInfoLayer` inside the stack, so that a row without an answer (499)
        // still names the model.
        let info = RequestInfoSlot::new();
        request.set_info_slot(info.clone());
        let span = tracing::info_span!(
            "request",
            request_id = %request_id,
            model = tracing::field::Empty,
            node = tracing::field::Empty,
            status = tracing::field::Empty,
        );
        RecordedFuture {
            inner: self.inner.call(request),
            waiting: Unanswered(Some(RowStart {
                recorder: self.recorder.clone(),
                started,
                ts_ms,
                request_id,
                path,
                api_key_id,
                info,
            })),
            span,
        }
    }
}

pin_project! {
    /// Response future of [`Recorded`]: the inner service's answer, its body watched.
    pub struct RecordedFuture<F> {
        #[pin]
        inner: F,
        waiting: Unanswered,
        // Entered while the inner service works, so that what it logs names the request.
        span: tracing::Span,
    }

    impl<F> PinnedDrop for RecordedFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // A request dropped before its answer gets its 499 row, logged in its span.
            let _entered = this.span.enter();
            drop(Unanswered(this.waiting.0.take()));
        }
    }
}

impl<F, A> Future for RecordedFuture<F>
where
    F: Future<Output = Result<A, Infallible>>,
    A: RecordedAnswer,
{
    type Output = Result<A::Recorded, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let Ok(mut response) = ready!(this.inner.poll(cx));
        let Some(start) = this.waiting.0.take() else {
            return Poll::Ready(Ok(response.watch(Pending::unwatched())));
        };
        let ttfb = start.started.elapsed();
        // The pool's own name, shared: a copy would be allocated here and freed on the
        // history's thread, which glibc's allocator serves by its slow path.
        let node_id = response.served_by().cloned();
        let status = response.status();
        let span = this.span.clone();
        if let Some(model) = start.info.get().and_then(|i| i.model.as_deref()) {
            span.record("model", model);
        }
        if let Some(node) = &node_id {
            span.record("node", &**node);
        }
        span.record("status", status);
        response.set_request_id(&start.request_id);
        let (recorder, started, mut record) = start.into_record(status);
        record.node_id = node_id;
        record.ttfb_ms = Some(ms(ttfb));
        let pending = Pending(Some(Row {
            recorder,
            started,
            record,
            upstream_failure: response.upstream_failure(),
            ttfb,
            span,
        }));
        Poll::Ready(Ok(response.watch(pending)))
    }
}

/// What a row needs from the request, held while the answer is awaited.
struct RowStart {
    recorder: Arc<Recorder>,
    started: Instant,
    ts_ms: i64,
    request_id: String,
    path: Cow<'static, str>,
    api_key_id: Option<String>,
    info: RequestInfoSlot,
}

impl RowStart {
    /// The row so far, with `status`; the answer fills in the rest.
    fn into_record(self, status: u16) -> (Arc<Recorder>, Instant, RequestRecord) {
        let info = self.info.get();
        let record = RequestRecord {
            ts_ms: self.ts_ms,
            request_id: self.request_id,
            path: self.path,
            // Shared, not copied: a copy would be freed on the history's thread.
            model: info.and_then(|i| i.model.clone()),
            node_id: None,
            status,
            stream: info.is_some_and(|i| i.stream),
            latency_ms: 0.0,
            ttfb_ms: None,
            prompt_tokens: None,
            completion_tokens: None,
            api_key_id: self.api_key_id,
            client_disconnected: false,
            upstream_error: None,
        };
        (self.recorder, self.started, record)
    }
}

impl Recorder {
    /// Counts a finished request in the metrics and queues its row.
    fn finish(&self, mut record: RequestRecord, latency: Duration, ttfb: Option<Duration>) {
        let label = model_label(&self.pool, record.model.as_deref());
        if record.model.as_deref() == Some(&*label) {
            // A model named as its metrics label (one the pool knows): the row takes the
            // label's `Arc`, so that the request's own is dropped on a connection worker, not
            // freed on the history's thread.
            record.model = Some(label.clone());
        }
        self.metrics.observe(label, record.status, latency, ttfb);
        self.history.record(record);
    }
}

/// A request whose client goes away before any answer (while it waits for a slot, say) is
/// dropped here with its `RowStart` still in place: it gets a row with status 499 (the client
/// closed the request) and `client_disconnected` set.
struct Unanswered(Option<RowStart>);

/// nginx's "client closed request", which operators know from their access logs.
const CLIENT_CLOSED_REQUEST: u16 = 499;

impl Drop for Unanswered {
    fn drop(&mut self) {
        let Some(start) = self.0.take() else {
            return;
        };
        let (recorder, started, mut record) = start.into_record(CLIENT_CLOSED_REQUEST);
        let latency = started.elapsed();
        record.latency_ms = ms(latency);
        record.client_disconnected = true;
        tracing::info!(
            request_id = %record.request_id,
            latency_ms = record.latency_ms,
            "client left before an answer"
        );
        recorder.finish(record, latency, None);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A row waiting for the answer's body to end; see [`RecordedAnswer::watch`].
pub struct Pending(Option<Row>);

impl Pending {
    /// Nothing to write: the row was written already.
    fn unwatched() -> Self {
        Self(None)
    }
}

struct Row {
    recorder: Arc<Recorder>,
    started: Instant,
    record: RequestRecord,
    ttfb: Duration,
    span: tracing::Span,
    upstream_failure: Option<UpstreamFailure>,
}

impl Row {
    fn finish(mut self, usage: &UsageScanner, disconnected: bool, failed: Option<&'static str>) {
        let latency = self.started.elapsed();
        self.record.latency_ms = ms(latency);
        self.record.prompt_tokens = usage.prompt_tokens;
        self.record.completion_tokens = usage.completion_tokens;
        self.record.client_disconnected = disconnected;
        self.record.upstream_error = failed
            .or_else(|| {
                self.upstream_failure
                    .as_ref()
                    .and_then(UpstreamFailure::get)
            })
            .map(str::to_owned);
        self.span.in_scope(|| {
            tracing::info!(
                status = self.record.status,
                latency_ms = self.record.latency_ms,
                prompt_tokens = self.record.prompt_tokens,
                completion_tokens = self.record.completion_tokens,
                disconnected,
                upstream_error = self.record.upstream_error,
                "request finished"
            );
        });
        self.recorder.finish(self.record, latency, Some(self.ttfb));
    }
}

pin_project! {
    /// The answer's body, watched: usage is scanned, and the row is written at the end, or
    /// when the body is dropped before it (the client went away).
    pub struct RecordedBody<B> {
        #[pin]
        inner: B,
        pending: Pending,
        usage: UsageScanner,
        // The body is over: it was empty from the start, or it has ended since.
        ended: bool,
        // What the body said of a broken node stream when last polled.
        failed: Option<&'static str>,
    }

    impl<B> PinnedDrop for RecordedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // An empty body may be dropped unpolled: that is no disconnect.
            if let Some(row) = this.pending.0.take() {
                row.finish(this.usage, !*this.ended, *this.failed);
            }
        }
    }
}

impl<B: HttpBody> RecordedBody<B> {
    fn new(inner: B, pending: Pending) -> Self {
        Self {
            ended: inner.is_end_stream(),
            inner,
            pending,
            usage: UsageScanner::default(),
            failed: None,
        }
    }
}

impl<B> HttpBody for RecordedBody<B>
where
    B: HttpBody<Data = Bytes> + ReportsFailure,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        let ended = match &polled {
            Poll::Pending => return polled,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.usage.scan(data);
                }
                // hyper stops polling once the body says it is done, so this may be the end.
                this.inner.is_end_stream()
            }
            Poll::Ready(None | Some(Err(_))) => true,
        };
        *this.failed = this.inner.upstream_failure();
        if ended {
            *this.ended = true;
            if let Some(row) = this.pending.0.take() {
                row.finish(this.usage, false, *this.failed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Finds `"prompt_tokens": N` and `"completion_tokens": N` in a byte stream split into chunks
/// at arbitrary places. The last value seen wins (usage comes last in a stream).
#[derive(Debug)]
struct UsageScanner {
    prompt_tokens: Option<u32>,
    completion_tokens: Option<u32>,
    /// The end of the previous chunk (its first `carry_len` bytes), so a key split across
    /// chunks is still found. In place rather than a `Vec`: no allocation per answer.
    carry: [u8; CARRY],
    carry_len: usize,
}

/// Longest `"completion_tokens" : 1234567890` worth carrying over a chunk boundary.
const CARRY: usize = 40;

/// `_tokens"`, the end of both keys: one pass finds both, and the word before tells which.
const TOKENS_KEY: &[u8] = b"_tokens\"";

impl Default for UsageScanner {
    fn default() -> Self {
        Self {
            prompt_tokens: None,
            completion_tokens: None,
            carry: [0; CARRY],
            carry_len: 0,
        }
    }
}

impl UsageScanner {
    fn scan(&mut self, chunk: &[u8]) {
        // A key that straddles the boundary is in the carry plus the head of this chunk. Only
        // that small seam is copied; the chunk itself is searched in place.
        if self.carry_len > 0 {
            let head = &chunk[..chunk.len().min(CARRY)];
            let mut seam = [0u8; 2 * CARRY];
            seam[..self.carry_len].copy_from_slice(&self.carry[..self.carry_len]);
            seam[self.carry_len..self.carry_len + head.len()].copy_from_slice(head);
            let seam = &seam[..self.carry_len + head.len()];
            self.scan_window(seam);
            if chunk.len() < CARRY {
                self.carry_tail_of(seam);
                return;
            }
        }
        self.scan_window(chunk);
        self.carry_tail_of(chunk);
    }

    /// Keeps the last `CARRY` bytes of `bytes` (all of them, if fewer) for the next scan.
    fn carry_tail_of(&mut self, bytes: &[u8]) {
        let tail = &bytes[bytes.len().saturating_sub(CARRY)..];
        self.carry[..tail.len()].copy_from_slice(tail);
        self.carry_len = tail.len();
    }

    /// The last count of each key in `window` wins, so the window is read from its end, at
    /// each `_` (a JSON answer has a few), until both are found: usage comes last in an
    /// answer. A search for the whole key (memmem) from the start cost about 160 instructions
    /// a call, four calls for one answer's usage.
    fn scan_window(&mut self, window: &[u8]) {
        let (mut prompt, mut completion) = (None, None);
        for pos in memchr::memrchr_iter(b'_', window) {
            if prompt.is_some() && completion.is_some() {
                break;
            }
            if !window[pos..].starts_with(TOKENS_KEY) {
                continue;
            }
            let before = &window[..pos];
            let count = if before.ends_with(b"\"prompt") {
                &mut prompt
            } else if before.ends_with(b"\"completion") {
                &mut completion
            } else {
                continue;
            };
            // A count cut off at the window's end is `None`: an earlier one in the window
            // stands until the next scan reads the whole of it.
            if count.is_none() {
                *count = number_after(window, pos + TOKENS_KEY.len());
            }
        }
        if prompt.is_some() {
            self.prompt_tokens = prompt;
        }
        if completion.is_some() {
            self.completion_tokens = completion;
        }
    }
}

/// The number in `: N` from index `i` of `window` on. A number that runs to the end of the
/// window may be cut off, so it is left for the next scan (the key is then in the carry).
fn number_after(window: &[u8], mut i: usize) -> Option<u32> {
    while window.get(i).is_some_and(|b| b.is_ascii_whitespace()) {
        i += 1;
    }
    if window.get(i) != Some(&b':') {
        return None;
    }
    i += 1;
    while window.get(i).is_some_and(|b| b.is_ascii_whitespace()) {
        i += 1;
    }
    let digits_start = i;
    while window.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    if i == digits_start || i >= window.len() {
        return None;
    }
    // As `str::parse::<u32>` reads digits: `None` past `u32::MAX`.
    window[digits_start..i].iter().try_fold(0u32, |n, &digit| {
        n.checked_mul(10)?.checked_add(u32::from(digit - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Log lines, as the router writes them, into a buffer.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_request_dropped_before_its_answer_is_logged_in_its_span() {
        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        let recorder = Recorder {
            history: History::turned_off(),
            metrics: Arc::default(),
            pool: NodePool::from_specs(Vec::<layers::NodeSpec>::new()).unwrap(),
            ids: Arc::default(),
        };
        let never = tower::service_fn(|_: RawRequest| {
            std::future::pending::<Result<RawResponse<ProxyBody>, Infallible>>()
        });
        let mut service = recorder.layer(never);
        let wire = b"POST /v1/chat/completions HTTP/1.1\r\nx-request-id: req-7\r\n\r\n";
        let (request, _) = layers::server::read_raw_request_from(wire, &Default::default())
            .unwrap()
            .unwrap();
        let waiting = tokio::time::timeout(Duration::from_millis(10), service.call(request)).await;
        assert!(waiting.is_err(), "no answer comes");
        let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        let line = logs
            .lines()
            .find(|line| line.contains("client left before an answer"))
            .unwrap_or_else(|| panic!("no 499 line in {logs:?}"));
        assert!(line.contains("request{request_id=req-7}"), "{line}");
    }

    #[test]
    fn rows_borrow_the_openai_routes_paths_and_copy_the_rest() {
        for route in ["/v1/chat/completions", "/v1/embeddings"] {
            assert!(matches!(row_path(route.as_bytes()), Cow::Borrowed(p) if p == route));
        }
        assert!(matches!(row_path(b"/v1/other"), Cow::Owned(p) if p == "/v1/other"));
    }

    #[test]
    fn the_client_is_told_the_request_id_once_whatever_the_node_said() {
        let node = http::Response::builder()
            .header("content-type", "application/json")
            .header("x-request-id", "node-1")
            .header("x-request-id", "node-2")
            .body(ProxyBody::from(Bytes::from_static(b"{}")))
            .unwrap();
        let mut answer = RawResponse::from_http(node);
        RecordedAnswer::set_request_id(&mut answer, "router-id");
        let ids: Vec<&[u8]> = answer
            .headers()
            .filter(|(name, _)| name.eq_ignore_ascii_case(b"x-request-id"))
            .map(|(_, value)| value)
            .collect();
        assert_eq!(ids, [&b"router-id"[..]]);

        let mut answer = Response::new(Body::empty());
        answer
            .headers_mut()
            .append(REQUEST_ID, HeaderValue::from_static("node-1"));
        RecordedAnswer::set_request_id(&mut answer, "router-id");
        let ids: Vec<_> = answer.headers().get_all(REQUEST_ID).iter().collect();
        assert_eq!(ids, ["router-id"]);
    }

    #[test]
    fn hex_ids_match_the_format_they_replace() {
        for value in [0, 1, 0xf, 0x10, 0xdead_beef, 0x1_0000_0000, u64::MAX] {
            for width in [0, 8, 16] {
                let mut out = String::new();
                push_hex(&mut out, value, width);
                assert_eq!(out, format!("{value:0width$x}"), "{value} {width}");
            }
        }
        let ids = RequestIds::default();
        let (a, b) = (ids.next(), ids.next());
        assert_eq!(a.len(), 24);
        assert_ne!(a, b);
        assert_eq!(a[..16], b[..16], "one prefix per process");
    }

    #[test]
    fn usage_is_found_whole_or_split_across_chunks() {
        let body = br#"{"id":"x","usage":{"prompt_tokens": 12,"completion_tokens":345,"total_tokens":357}}"#;
        let mut whole = UsageScanner::default();
        whole.scan(body);
        assert_eq!(
            (whole.prompt_tokens, whole.completion_tokens),
            (Some(12), Some(345))
        );
        for split in 1..body.len() {
            let mut parts = UsageScanner::default();
            parts.scan(&body[..split]);
            parts.scan(&body[split..]);
            assert_eq!(
                (parts.prompt_tokens, parts.completion_tokens),
                (Some(12), Some(345)),
                "split at {split}"
            );
        }
        let mut bytewise = UsageScanner::default();
        for byte in body.chunks(1) {
            bytewise.scan(byte);
        }
        assert_eq!(
            (bytewise.prompt_tokens, bytewise.completion_tokens),
            (Some(12), Some(345))
        );
        for size in [3, 7, 13, 39, 40, 41] {
            let mut chunked = UsageScanner::default();
            for chunk in body.chunks(size) {
                chunked.scan(chunk);
            }
            assert_eq!(
                (chunked.prompt_tokens, chunked.completion_tokens),
                (Some(12), Some(345)),
                "chunks of {size}"
            );
        }
    }

    #[test]
    fn other_token_counts_are_not_taken_for_these() {
        let body = br#"{"usage":{"prompt_tokens" : 7,"completion_tokens":9,"total_tokens":16,"prompt_tokens_details":{"cached_tokens":3},"completion_tokens_details":{"reasoning_tokens":2}}}"#;
        for size in [1, 5, 40, body.len()] {
            let mut scanner = UsageScanner::default();
            for chunk in body.chunks(size) {
                scanner.scan(chunk);
            }
            assert_eq!(
                (scanner.prompt_tokens, scanner.completion_tokens),
                (Some(7), Some(9)),
                "chunks of {size}"
            );
        }
    }

    #[test]
    fn usage_is_read_among_other_keys_and_a_count_past_u32_is_none() {
        let mut s = UsageScanner::default();
        s.scan(
            br#"{"system_fingerprint":"fp_x","choices":[{"finish_reason":"stop"}],"usage":{"prompt_tokens":007,"completion_tokens":4294967296,"total_tokens":1,"x_tokens":5}}"#,
        );
        assert_eq!((s.prompt_tokens, s.completion_tokens), (Some(7), None));
        let mut max = UsageScanner::default();
        max.scan(br#"{"completion_tokens": 4294967295 }"#);
        assert_eq!(max.completion_tokens, Some(u32::MAX));
        // The last count in a window wins; one cut off at its end waits for the next scan,
        // and the one before it stands meanwhile.
        let mut last = UsageScanner::default();
        last.scan(
            br#"{"prompt_tokens":1} {"prompt_tokens":2,"completion_tokens":3} {"prompt_tokens":4"#,
        );
        assert_eq!(
            (last.prompt_tokens, last.completion_tokens),
            (Some(2), Some(3))
        );
        last.scan(b"5}");
        assert_eq!(
            (last.prompt_tokens, last.completion_tokens),
            (Some(45), Some(3))
        );
    }

    #[test]
    fn the_last_usage_in_a_stream_wins() {
        let mut s = UsageScanner::default();
        s.scan(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n");
        assert_eq!(s.prompt_tokens, None);
        s.scan(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":3}}\n\ndata: [DONE]\n\n");
        assert_eq!((s.prompt_tokens, s.completion_tokens), (Some(9), Some(3)));
    }

    #[test]
    fn request_ids_are_unique_and_client_ids_are_kept_when_sane() {
        let ids = RequestIds::default();
        let (first, second) = (ids.next(), ids.next());
        assert_ne!(first, second);
        assert_eq!(first.len(), 24, "{first}");
        assert_eq!(first[..16], second[..16], "one prefix per process");
        assert!(first.bytes().all(|b| b.is_ascii_hexdigit()), "{first}");
        assert!(second.ends_with("00000002"), "{second}");
        assert_eq!(sane_request_id(b"abc-123"), Some("abc-123"));
        assert_eq!(sane_request_id(b"has space"), None);
        assert_eq!(sane_request_id("x".repeat(200).as_bytes()), None);
    }
}
