//! Accepting client connections: HTTP/1.1 and h2c on one port, with the limits that keep slow or
//! greedy clients from tying the router up.
//!
//! - **Header read timeout.** A connection must send its first bytes, and then a whole request
//!   head, within `header_read_timeout` each, or it is closed: a silent client, or headers sent
//!   a trickle at a time (slowloris), do not hold a connection. HTTP/2 connections are pinged
//!   every 30 s and closed when a ping goes unanswered for 10 s.
//! - **Header size.** A request head over `max_header_bytes` gets 431, and the connection closes.
//! - **Connection limit.** Past `max_connections` open connections, a new one gets a short 503
//!   with `Retry-After` and is closed, so memory stays bounded however many clients connect.
//! - **Graceful shutdown.** When told to stop, no new connection is accepted; open ones finish
//!   their in-flight requests (streams included) and close.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Limits on client connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenConfig {
    /// Longest time to receive a whole request head. Default 10 s.
    pub header_read_timeout: Duration,
    /// Largest request head, in bytes; larger gets 431. Default 64 KiB (at least 8 KiB).
    pub max_header_bytes: usize,
    /// Most open client connections. Default 10,000.
    pub max_connections: usize,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_connections: 10_000,
        }
    }
}

/// hyper's HTTP/1 read buffer cannot be smaller.
const MIN_HEADER_BYTES: usize = 8 * 1024;

/// Connections turned away at the limit, for `/metrics`.
#[derive(Debug, Default)]
pub struct ListenCounters {
    /// Connections refused because `max_connections` were open.
    pub refused: AtomicU64,
}

/// The answer to a connection over the limit. Written best-effort without waiting: a client
/// that does not read it just sees the connection close.
static OVER_LIMIT: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let body = r#"{"error":{"message":"too many open connections; retry later","type":"service_unavailable","param":null,"code":"too_many_connections"}}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
});

fn builder(config: &ListenConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(config.max_header_bytes.max(MIN_HEADER_BYTES));
    // Pings find HTTP/2 clients that vanished without closing.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10))
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// Serves `app` on `listener` until `stop` resolves, then lets open connections finish for at
/// most `grace`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: ListenConfig,
    counters: Arc<ListenCounters>,
    stop: impl Future<Output = ()>,
    grace: Duration,
) {
    let builder = builder(&config);
    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
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
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            refuse(stream);
            continue;
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY on an accepted connection");
        }
        let service = TowerToHyperService::new(app.clone());
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let first_bytes = config.header_read_timeout;
        tokio::spawn(async move {
            // The connection's slot, given back when this task ends, however it ends.
            let _slot = permit;
            // hyper's header timeout starts only once the protocol is known, which takes the
            // first bytes: a client that sends none must not hold a slot either.
            // `peek`, not `readable`: a fresh socket may be reported readable before any byte.
            let mut first = [0u8; 1];
            if tokio::time::timeout(first_bytes, stream.peek(&mut first))
                .await
                .is_err()
            {
                tracing::debug!("no bytes within the header read timeout; closing");
                return;
            }
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(error = %error, "client connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!(
        grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
        "shutting down: no new connections, finishing in-flight requests"
    );
    match tokio::time::timeout(grace, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections finished"),
        Err(_) => tracing::warn!("grace period over; closing the remaining connections"),
    }
}

fn refuse(stream: TcpStream) {
    tracing::debug!("connection limit reached; refusing a connection");
    let _ = stream.try_write(&OVER_LIMIT);
}
