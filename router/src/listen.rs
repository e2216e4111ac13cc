//! Accepting client connections: HTTP/1.1 and h2c on one port, with the limits that keep slow or
//! greedy clients from tying the router up.
//!
//! - **Header read timeout.** A connection must send its first bytes, and then a whole request
//!   head, within `header_read_timeout` each, or it is closed: a silent client, or headers sent
//!   a trickle at a time (slowloris), do not hold a connection. An HTTP/1 connection idle
//!   between requests is closed after the same time, and a request body must keep coming: no
//!   gap longer than that time, and after it at least 1 KiB/s on average. An HTTP/2 client must
//!   send its whole preface within the time. HTTP/2 connections are pinged
//!   every 30 s and closed when a ping goes unanswered for 10 s.
//! - **Send timeout.** An HTTP/1 client whose socket takes no more of its answer for
//!   `send_timeout` (it stopped reading) is reset and its answer dropped, which lets go of a
//!   streamed answer's node slot. An HTTP/2 stream whose client stopped reading stops for lack
//!   of flow-control window, not on a blocked write: its answer is dropped once it has not been
//!   asked for more for `send_timeout` after giving data ([`crate::stalled`]).
//! - **Header size.** A request head over `max_header_bytes` gets 431, and the connection closes.
//! - **Body size.** An HTTP/1 request body is read whole before the app is called, up to
//!   `max_body_bytes`; a larger one is not read, the app gets a request whose body is
//!   `BodyTooLarge` (the request path answers 413), and the connection closes after the answer.
//! - **Protocols.** HTTP/1 is served by [`layers::serve_raw_connection`], whose requests reach
//!   the app as [`RawRequest`]s (the router keeps inference requests raw down to the node); a
//!   connection that opens with HTTP/2's preface (h2c with prior knowledge) goes to hyper's
//!   HTTP/2 server, whose requests are `http::Request`s.
//! - **Connection limit.** Past `max_connections` open connections, a new one gets a short 503
//!   with `Retry-After` and is closed, so memory stays bounded however many clients connect.
//!   What such a client still sends is read and dropped for up to 2 s (by at most 64 tasks), so
//!   that it reads the answer instead of a reset.
//! - **Graceful shutdown.** When told to stop, no new connection is accepted; open ones finish
//!   their in-flight requests (streams included) and close.
//! - **Connection workers.** Accepted connections are handed to `workers` threads, each running
//!   its own single-threaded runtime and its own copy of the app (made by the app factory, so
//!   each can keep its own upstream connections). A request then runs start to end on one
//!   thread: no work stealing, and no wake-up of another thread to hand a response from an
//!   upstream connection to the client's. Each new connection goes to the worker with the fewest
//!   open connections. On this project's 2-core machine that cut the CPU per proxied request of a
//!   bare hyper proxy from 26 to 22 µs against one multi-threaded runtime.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use std::convert::Infallible;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use futures_util::future::{Either, Ready, ready};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use layers::{RawRequest, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tower::Service;

use crate::stalled::StallGuard;

/// Limits on client connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenConfig {
    /// Longest time to receive a whole request head. Default 10 s.
    pub header_read_timeout: Duration,
    /// Largest request head, in bytes; larger gets 431. Default 64 KiB.
    pub max_header_bytes: usize,
    /// Largest HTTP/1 request body read before the app is called. Default 16 MiB.
    pub max_body_bytes: usize,
    /// Longest an HTTP/1 client's socket may take no more of its answer before the connection
    /// is reset, and an HTTP/2 stream's answer may go unasked for after giving data before it
    /// is dropped; either way a streamed answer lets go of its node slot. Default 60 s.
    pub send_timeout: Duration,
    /// Most open client connections. Default 10,000.
    pub max_connections: usize,
    /// Threads serving client connections, each with its own single-threaded runtime; 0 serves
    /// them on the caller's runtime. Default: one per core.
    pub workers: usize,
}

/// One connection worker per core, or one when the count is unknown.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_body_bytes: ServerConfig::default().max_body_bytes,
            send_timeout: ServerConfig::default().send_timeout,
            max_connections: 10_000,
            workers: default_workers(),
        }
    }
}

/// Connections turned away at the limit, for `/metrics`.
#[derive(Debug, Default)]
pub struct ListenCounters {
    /// Connections refused because `max_connections` were open.
    pub refused: AtomicU64,
}

/// The answer to a connection over the limit (see [`refuse`]).
static OVER_LIMIT: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let body = r#"{"error":{"message":"too many open connections; retry later","type":"service_unavailable","param":null,"code":"too_many_connections"}}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
});

fn http2_builder(config: &ListenConfig) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    // Pings find HTTP/2 clients that vanished without closing.
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10))
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// What can serve client connections: a tower service over HTTP/2 clients' requests (with
/// axum's body) and over HTTP/1 clients' [`RawRequest`]s, as the router's `AppService` is. An
/// app of `http` requests only, such as axum's `Router`, serves both through [`ViaHttp`].
pub trait ConnectionApp: Service<
        Request<Body>,
        Response = Response<Self::ResponseBody>,
        Error = Infallible,
        Future = Self::ResponseFuture,
    > + Service<RawRequest, Response = Self::RawAnswer, Error = Infallible, Future = Self::RawFuture>
    + Clone
    + Send
    + 'static
{
    /// The answer's body.
    type ResponseBody: http_body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + 'static;
    /// The service's future.
    type ResponseFuture: Future<Output = Result<Response<Self::ResponseBody>, Infallible>>
        + Send
        + 'static;
    /// The answer to a [`RawRequest`]: an `http::Response` or a [`layers::RawResponse`].
    type RawAnswer: layers::Answer<Body: Send> + Send + 'static;
    /// The service's future for a [`RawRequest`].
    type RawFuture: Future<Output = Result<Self::RawAnswer, Infallible>> + Send + 'static;
}

impl<S, B, A> ConnectionApp for S
where
    S: Service<Request<Body>, Response = Response<B>, Error = Infallible>
        + Service<RawRequest, Response = A, Error = Infallible>
        + Clone
        + Send
        + 'static,
    <S as Service<Request<Body>>>::Future: Send + 'static,
    <S as Service<RawRequest>>::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    A: layers::Answer<Body: Send> + Send + 'static,
{
    type ResponseBody = B;
    type RawAnswer = A;
    type ResponseFuture = <S as Service<Request<Body>>>::Future;
    type RawFuture = <S as Service<RawRequest>>::Future;
}

/// An app of `http` requests (axum's `Router`, say) as a [`ConnectionApp`]: an HTTP/1 client's
/// [`RawRequest`] becomes an `http::Request` first.
#[derive(Debug, Clone)]
pub struct ViaHttp<S>(pub S);

impl<S> Service<Request<Body>> for ViaHttp<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        self.0.call(request)
    }
}

impl<S> Service<RawRequest> for ViaHttp<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, Ready<Result<Response<Body>, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: RawRequest) -> Self::Future {
        match request.into_http() {
            Ok(request) => Either::Left(self.0.call(request.map(Body::new))),
            Err(error) => Either::Right(ready(Ok(error.into_response()))),
        }
    }
}

/// What a connection needs to be served: its stream, its slot and the shutdown signal.
struct Accepted {
    stream: TcpStream,
    slot: OwnedSemaphorePermit,
    shutdown: watch::Receiver<bool>,
}

/// How every connection is served, wherever it runs.
#[derive(Clone)]
struct ConnectionSettings {
    http2: http2::Builder<TokioExecutor>,
    http1: ServerConfig,
}

/// What an HTTP/2 client sends first.
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether `first` is the start of HTTP/2's preface (or all of it, and more).
fn is_preface_prefix(first: &[u8]) -> bool {
    let known = first.len().min(HTTP2_PREFACE.len());
    first[..known] == HTTP2_PREFACE[..known]
}

/// Whether a connection that began with `first` speaks HTTP/2; `None` until that is known.
fn is_http2(first: &[u8]) -> Option<bool> {
    let known = first.len().min(3);
    if known == 0 {
        return None;
    }
    if first[..known] != HTTP2_PREFACE[..known] {
        Some(false)
    } else if known == 3 {
        // No HTTP/1 method is PRI.
        Some(true)
    } else {
        None
    }
}

impl ConnectionSettings {
    async fn serve<S: ConnectionApp>(self, accepted: Accepted, app: S) {
        let Accepted {
            stream,
            slot,
            mut shutdown,
        } = accepted;
        // The connection's slot, given back when this ends, however it ends.
        let _slot = slot;
        // The header timeout starts once the protocol is known, which takes the first bytes: a
        // client that sends none must not hold a slot either.
        let mut stream = stream;
        let Some(first) = self.first_bytes(&mut stream).await else {
            tracing::debug!("no request within the header read timeout; closing");
            return;
        };
        if is_http2(&first) != Some(true) {
            layers::serve_raw_connection_after(stream, &first, app, self.http1, shutdown).await;
            return;
        }
        let app = tower::util::MapRequest::new(app, |r: Request<Incoming>| r.map(Body::new));
        // Flow control, not a blocked write, stops a stream whose client stopped reading.
        let limit = self.http1.send_timeout;
        let app = tower::util::MapResponse::new(app, move |r: Response<S::ResponseBody>| {
            r.map(|body| StallGuard::new(body, limit))
        });
        let io = Replayed {
            first: Bytes::from(first),
            io: TokioIo::new(stream),
        };
        let connection = self
            .http2
            .serve_connection(io, TowerToHyperService::new(app));
        let mut connection = std::pin::pin!(connection);
        let ended = tokio::select! {
            ended = connection.as_mut() => ended,
            () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(error) = ended {
            tracing::debug!(error = %error, "client connection ended with an error");
        }
    }

    /// The client's first bytes, enough to tell its protocol; `None` if it sent too few within
    /// the header read timeout, or closed.
    async fn first_bytes(&self, stream: &mut TcpStream) -> Option<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + self.http1.header_read_timeout;
        let mut first = Vec::with_capacity(READ_FIRST);
        loop {
            let read = tokio::time::timeout_at(deadline, stream.read_buf(&mut first)).await;
            match read {
                Ok(Ok(n)) if n > 0 => match is_http2(&first) {
                    Some(false) => return Some(first),
                    // The whole preface, under this deadline: hyper's handshake has none.
                    Some(true)
                        if !is_preface_prefix(&first) || first.len() >= HTTP2_PREFACE.len() =>
                    {
                        return Some(first);
                    }
                    // "P" or "PR" so far, or part of the preface: read on (reading, not
                    // peeking, so the wait is a real one).
                    _ => {}
                },
                _ => return None,
            }
        }
    }
}

/// How much of a new connection is read to tell its protocol: most requests whole.
const READ_FIRST: usize = 4096;

/// A connection whose first bytes were read to tell its protocol, given to hyper with those
/// bytes put back in front.
struct Replayed {
    first: Bytes,
    io: TokioIo<TcpStream>,
}

impl hyper::rt::Read for Replayed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.first.is_empty() {
            let n = self.first.len().min(buf.remaining());
            buf.put_slice(&self.first.split_to(n));
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Replayed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// A connection on its way to a worker: counted as the worker's from the moment it is chosen.
type Handoff = (
    std::net::TcpStream,
    OpenConnection,
    OwnedSemaphorePermit,
    watch::Receiver<bool>,
);

/// A connection worker thread, as the accept loop sees it.
struct Worker {
    connections: mpsc::UnboundedSender<Handoff>,
    open: Arc<AtomicUsize>,
    /// Answered once the worker's app is built; dropped unanswered if building it panicked.
    ready: Option<oneshot::Receiver<()>>,
    exited: oneshot::Receiver<()>,
}

/// Counts a worker's open connection until dropped.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self(open.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Starts worker `index`: a thread with a single-threaded runtime that serves the connections
/// sent to it on its own app, until `finished` says the server is done.
fn spawn_worker<F, S>(
    index: usize,
    make_app: Arc<F>,
    settings: ConnectionSettings,
    mut finished: watch::Receiver<bool>,
) -> std::io::Result<Worker>
where
    F: Fn() -> S + Send + Sync + 'static,
    S: ConnectionApp,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (connections, mut incoming) = mpsc::unbounded_channel::<Handoff>();
    let (exit, exited) = oneshot::channel();
    let (built, ready) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("llm-router-worker-{index}"))
        .spawn(move || {
            runtime.block_on(async move {
                let app = make_app();
                let _ = built.send(());
                while let Some((stream, counted, slot, shutdown)) = incoming.recv().await {
                    let stream = match TcpStream::from_std(stream) {
                        Ok(stream) => stream,
                        Err(error) => {
                            tracing::warn!(%error, "cannot take over an accepted connection");
                            continue;
                        }
                    };
                    let accepted = Accepted {
                        stream,
                        slot,
                        shutdown,
                    };
                    let served = settings.clone().serve(accepted, app.clone());
                    tokio::spawn(async move {
                        let _counted = counted;
                        served.await;
                    });
                }
                // No new connections: the open ones finish until the server is done with them.
                let _ = finished.wait_for(|done| *done).await;
            });
            // Closes the connections still open after the grace period. Blocking tasks (a stuck
            // name lookup, say) are not waited for: shutdown must not outlast the grace period.
            runtime.shutdown_background();
            let _ = exit.send(());
        })?;
    Ok(Worker {
        connections,
        open: Arc::default(),
        ready: Some(ready),
        exited,
    })
}

/// Serves the app `make_app` builds on `listener` until `stop` resolves, then lets open
/// connections finish for at most `grace`. With workers, each worker calls `make_app` once, on
/// its own thread; without, it is called once on the caller's runtime.
pub async fn serve<F, S>(
    listener: TcpListener,
    make_app: F,
    config: ListenConfig,
    counters: Arc<ListenCounters>,
    stop: impl Future<Output = ()>,
    grace: Duration,
) where
    F: Fn() -> S + Send + Sync + 'static,
    S: ConnectionApp,
{
    let settings = ConnectionSettings {
        http2: http2_builder(&config),
        http1: ServerConfig {
            header_read_timeout: config.header_read_timeout,
            max_header_bytes: config.max_header_bytes,
            max_body_bytes: config.max_body_bytes,
            send_timeout: config.send_timeout,
        },
    };
    let make_app = Arc::new(make_app);
    let (finish, finished) = watch::channel(false);
    let mut workers = Vec::with_capacity(config.workers);
    for index in 0..config.workers {
        match spawn_worker(index, make_app.clone(), settings.clone(), finished.clone()) {
            Ok(worker) => workers.push(worker),
            Err(error) => {
                tracing::error!(%error, index, "cannot start a connection worker");
            }
        }
    }
    // A worker whose app could not be built (it panicked) takes no connections. Its answer
    // decides, not whether its channel is closed yet: the panic drops the answer first, and
    // the channel may still be open for a moment after.
    let mut started = Vec::with_capacity(workers.len());
    for mut worker in workers {
        let built = match worker.ready.take() {
            Some(ready) => ready.await.is_ok(),
            None => true,
        };
        if built && !worker.connections.is_closed() {
            started.push(worker);
        } else {
            tracing::error!("a connection worker failed to start; serving without it");
        }
    }
    let workers = started;
    // Without workers (none configured, or none could start), connections run here.
    let local_app = workers.is_empty().then(|| make_app());
    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let lingering = Arc::new(Semaphore::new(MAX_LINGERING));
    // Each connection holds a receiver: `closed` resolves once all have ended.
    let (graceful, _) = watch::channel(false);
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of descriptors, most often: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            refuse(stream, &lingering);
            continue;
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY on an accepted connection");
        }
        let shutdown = graceful.subscribe();
        match &local_app {
            Some(app) => {
                let accepted = Accepted {
                    stream,
                    slot,
                    shutdown,
                };
                tokio::spawn(settings.clone().serve(accepted, app.clone()));
            }
            None => hand_over(&workers, stream, slot, shutdown),
        }
    }
    drop(listener);
    tracing::info!(
        grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
        "shutting down: no new connections, finishing in-flight requests"
    );
    let mut exits = Vec::with_capacity(workers.len());
    for worker in workers {
        // Closing the channel ends the worker's accept loop; its open connections go on.
        drop(worker.connections);
        exits.push(worker.exited);
    }
    let _ = graceful.send(true);
    match tokio::time::timeout(grace, graceful.closed()).await {
        Ok(()) => tracing::info!("all connections finished"),
        Err(_) => tracing::warn!("grace period over; closing the remaining connections"),
    }
    let _ = finish.send(true);
    for exited in exits {
        let _ = exited.await;
    }
}

/// Gives a connection to the worker with the fewest open connections.
fn hand_over(
    workers: &[Worker],
    stream: TcpStream,
    slot: OwnedSemaphorePermit,
    shutdown: watch::Receiver<bool>,
) {
    let Some(worker) = workers
        .iter()
        .filter(|w| !w.connections.is_closed())
        .min_by_key(|w| w.open.load(Ordering::Relaxed))
    else {
        return;
    };
    // The worker's runtime registers the socket with its own reactor.
    let stream = match stream.into_std() {
        Ok(stream) => stream,
        Err(error) => {
            tracing::warn!(%error, "cannot hand an accepted connection to a worker");
            return;
        }
    };
    let counted = OpenConnection::new(&worker.open);
    // A failed send drops the handoff, and with it the count and the slot.
    if worker
        .connections
        .send((stream, counted, slot, shutdown))
        .is_err()
    {
        tracing::warn!("a connection worker has stopped; connection dropped");
    }
}

/// Refused connections read out at once; past this many, one is closed right after its answer.
const MAX_LINGERING: usize = 64;

/// How long a refused connection's client may go on sending after the answer.
const LINGER: Duration = Duration::from_secs(2);

/// Answers 503 and closes. Closing a socket with unread bytes sends a reset, and a client still
/// sending its request body then sees the reset instead of the answer; so the answer is followed
/// by a FIN, and what the client still sends is read and dropped for up to [`LINGER`] (nginx's
/// lingering close), by at most [`MAX_LINGERING`] tasks.
fn refuse(stream: TcpStream, lingering: &Arc<Semaphore>) {
    tracing::debug!("connection limit reached; refusing a connection");
    let Ok(permit) = lingering.clone().try_acquire_owned() else {
        let _ = stream.try_write(&OVER_LIMIT);
        return;
    };
    tokio::spawn(async move {
        let _ = tokio::time::timeout(LINGER, answer_and_drain(stream)).await;
        drop(permit);
    });
}

async fn answer_and_drain(mut stream: TcpStream) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(&OVER_LIMIT).await?;
    stream.shutdown().await?;
    let mut sink = [0u8; 4096];
    while stream.read(&mut sink).await? > 0 {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// An app that answers with the name of the thread serving the request.
    fn thread_name_app() -> Router {
        Router::new().route(
            "/",
            get(|| async { std::thread::current().name().unwrap_or("").to_owned() }),
        )
    }

    /// Sends `GET /` on `stream` and returns the body.
    async fn get_body(stream: &mut tokio::net::TcpStream) -> String {
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed mid-answer");
            answer.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&answer);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .unwrap()
                    .parse()
                    .unwrap();
                if body.len() >= length {
                    return body[..length].to_owned();
                }
            }
        }
    }

    /// A server's address, the sender that stops it, and its task.
    type TestServer = (
        std::net::SocketAddr,
        oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    );

    /// Serves `make_app` on `workers` workers; the sender stops it.
    async fn start(workers: usize, make_app: fn() -> Router) -> TestServer {
        start_with(
            ListenConfig {
                workers,
                ..ListenConfig::default()
            },
            make_app,
        )
        .await
    }

    /// Serves `make_app` with `config`; the sender stops it.
    async fn start_with(config: ListenConfig, make_app: fn() -> Router) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            move || ViaHttp(make_app()),
            config,
            Arc::default(),
            async move {
                let _ = stopped.await;
            },
            Duration::from_secs(5),
        ));
        (addr, stop, server)
    }

    #[tokio::test]
    async fn connections_are_spread_over_the_workers_and_stay_on_theirs() {
        let (addr, stop, server) = start(2, thread_name_app).await;
        let mut connections = Vec::new();
        let mut served_by = Vec::new();
        for _ in 0..4 {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let first = get_body(&mut stream).await;
            let second = get_body(&mut stream).await;
            assert_eq!(first, second, "a connection stays on one worker");
            served_by.push(first);
            connections.push(stream);
        }
        served_by.sort();
        assert_eq!(
            served_by,
            [
                "llm-router-worker-0",
                "llm-router-worker-0",
                "llm-router-worker-1",
                "llm-router-worker-1"
            ],
            "each new connection goes to the worker with the fewest open ones"
        );
        drop(connections);
        stop_and_wait(stop, server).await;
    }

    /// A client over the connection limit that is still sending a large body gets the 503 and a
    /// clean end, and its body is read and dropped instead of met with a reset.
    #[tokio::test]
    async fn a_refused_client_sending_a_body_reads_the_503() {
        let config = ListenConfig {
            workers: 1,
            max_connections: 1,
            ..ListenConfig::default()
        };
        let (addr, stop, server) = start_with(config, thread_name_app).await;
        let mut holder = tokio::net::TcpStream::connect(addr).await.unwrap();
        get_body(&mut holder).await;
        for _ in 0..5 {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut read, mut write) = stream.into_split();
            let sender = tokio::spawn(async move {
                let body = vec![b'x'; 4 << 20];
                let head = format!(
                    "POST / HTTP/1.1\r\nhost: test\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                write.write_all(head.as_bytes()).await?;
                write.write_all(&body).await
            });
            let mut answer = Vec::new();
            // A reset here (instead of the answer and then the end) is what this test is about.
            read.read_to_end(&mut answer)
                .await
                .expect("the answer and a clean end, not a reset");
            let answer = String::from_utf8_lossy(&answer);
            assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
            assert!(answer.contains("retry-after: 1"), "{answer}");
            // Read and dropped, not met with a reset: a client that checks its write first
            // still goes on to read the answer.
            let sent = sender.await.unwrap();
            assert!(sent.is_ok(), "the body was taken: {sent:?}");
        }
        drop(holder);
        stop_and_wait(stop, server).await;
    }

    /// Stops the server and checks that it returns, its workers included.
    async fn stop_and_wait(stop: oneshot::Sender<()>, server: tokio::task::JoinHandle<()>) {
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server stops")
            .unwrap();
    }

    #[tokio::test]
    async fn a_worker_that_fails_to_start_takes_no_connections() {
        static BUILDS: AtomicUsize = AtomicUsize::new(0);
        fn first_build_panics() -> Router {
            assert_ne!(
                BUILDS.fetch_add(1, Ordering::SeqCst),
                0,
                "test: first build fails"
            );
            thread_name_app()
        }
        let (addr, stop, server) = start(2, first_build_panics).await;
        let mut served_by = Vec::new();
        for _ in 0..3 {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            served_by.push(get_body(&mut stream).await);
        }
        assert!(
            served_by[0].starts_with("llm-router-worker"),
            "{served_by:?}"
        );
        assert!(
            served_by.iter().all(|w| *w == served_by[0]),
            "{served_by:?}"
        );
        stop_and_wait(stop, server).await;
    }

    /// A request whose first segment is only "P" (POST? or HTTP/2's "PRI"?) waits for more
    /// and is then served as HTTP/1.
    #[tokio::test]
    async fn a_request_split_after_its_first_byte_is_served() {
        let (addr, stop, server) = start(1, thread_name_app).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"P").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        stream
            .write_all(
                b"OST / HTTP/1.1\r\nhost: test\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            )
            .await
            .unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 405"),
            "POST on a GET route: {answer}"
        );
        stop_and_wait(stop, server).await;
    }

    /// A client that starts HTTP/2's preface and stops is closed at the header read timeout
    /// (hyper's handshake has no timeout of its own).
    #[tokio::test]
    async fn a_client_stopping_inside_the_http2_preface_is_closed() {
        let config = ListenConfig {
            workers: 1,
            header_read_timeout: Duration::from_millis(300),
            ..ListenConfig::default()
        };
        let (addr, stop, server) = start_with(config, thread_name_app).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"PRI * HTTP").await.unwrap();
        let mut rest = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut rest)).await;
        assert!(
            matches!(read, Ok(Ok(0))),
            "closed, with nothing sent: {read:?} {rest:?}"
        );
        stop_and_wait(stop, server).await;
    }

    #[tokio::test]
    async fn with_no_workers_connections_run_on_the_callers_runtime() {
        let (addr, stop, server) = start(0, thread_name_app).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = get_body(&mut stream).await;
        assert!(!name.starts_with("llm-router-worker"), "{name}");
        drop(stream);
        stop_and_wait(stop, server).await;
    }

    #[tokio::test]
    async fn a_request_in_flight_at_stop_finishes_on_its_worker() {
        let slow_app = || {
            Router::new().route(
                "/",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "done"
                }),
            )
        };
        let (addr, stop, server) = start(2, slow_app).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = tokio::spawn(async move { get_body(&mut stream).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = stop.send(());
        assert_eq!(request.await.unwrap(), "done");
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server stops once the request is done")
            .unwrap();
    }
}
