//! Lets go of an HTTP/2 answer whose client stopped taking it.
//!
//! hyper polls a stream's body only while the client's flow-control window has room, so a
//! client that stops reading a stream (and keeps answering pings) stops the polling: the body,
//! and the node slot and node connection a streamed answer holds, would live as long as the
//! connection. [`StallGuard`] wraps such a body. Once it has handed out data and then gone
//! `limit` without being polled again, a watchdog task drops the body it wraps; the stream
//! then ends with an error if hyper ever polls it (until then it stays open, with what hyper
//! buffered for it, and counts against the connection's streams). A body waiting for its own
//! data (a slow node) is not stalled: it has said it is pending, and wakes hyper itself. The
//! limit is on the time between reads, not on progress: a client that needs longer than
//! `limit` to take one frame (and its window) is cut off too; the router's frames are small.
//!
//! HTTP/1 clients need none of this: there a client that stops reading blocks the server's
//! write, which `send_timeout` bounds (`layers::server`).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, TryLockError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;
use tokio::time::Instant;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body dropped by its [`StallGuard`]'s watchdog, should hyper poll it again.
#[derive(Debug, thiserror::Error)]
#[error("the client took none of this answer for {0:?}; it was let go")]
pub struct Stalled(Duration);

/// An answer's body, dropped once its client has stopped taking it for `limit`.
pub struct StallGuard<B> {
    shared: Arc<Shared<B>>,
    /// Dropped with the guard, which ends its watchdog at once: every HTTP/2 answer has one,
    /// and under load thousands end each second.
    _alive: oneshot::Sender<()>,
}

struct Shared<B> {
    body: Mutex<Option<Pin<Box<B>>>>,
    /// Milliseconds since `epoch` at which the body last handed out data that has not been
    /// followed by another poll; 0 while it is not waiting on the client.
    waiting_since_ms: AtomicU64,
    epoch: Instant,
    limit: Duration,
}

impl<B> StallGuard<B>
where
    B: Body<Data = Bytes> + Send + 'static,
{
    /// Wraps `body`, and starts its watchdog on the current tokio runtime.
    pub fn new(body: B, limit: Duration) -> Self {
        let shared = Arc::new(Shared {
            body: Mutex::new(Some(Box::pin(body))),
            waiting_since_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            limit,
        });
        let (alive, ended) = oneshot::channel();
        tokio::spawn(watch(Arc::downgrade(&shared), limit, ended));
        Self {
            shared,
            _alive: alive,
        }
    }
}

impl<B> Shared<B> {
    fn now_ms(&self) -> u64 {
        // At least 1, since 0 means "not waiting".
        u64::try_from(self.epoch.elapsed().as_millis()).map_or(u64::MAX, |ms| ms.max(1))
    }
}

/// Drops the body once it has waited on its client for `limit`: it looks again when a wait
/// that has begun would reach the limit, or after half the limit when none has. Ends when the
/// guard is dropped (`ended` resolves), or once it has dropped the body.
async fn watch<B>(shared: Weak<Shared<B>>, limit: Duration, mut ended: oneshot::Receiver<()>) {
    let limit_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
    let mut next = limit / 2;
    loop {
        tokio::select! {
            _ = &mut ended => return,
            () = tokio::time::sleep(next.max(Duration::from_millis(1))) => {}
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        // A body being read is not stalled; and a body's wait is read again under the lock,
        // so that a client that took a frame since is not cut off.
        let mut body = match shared.body.try_lock() {
            Ok(body) => body,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                next = limit / 2;
                continue;
            }
        };
        let since = shared.waiting_since_ms.load(Ordering::Relaxed);
        let waited = if since == 0 {
            None
        } else {
            Some(shared.now_ms().saturating_sub(since))
        };
        match waited {
            Some(waited) if waited >= limit_ms => {
                if body.take().is_some() {
                    tracing::info!(
                        limit_ms,
                        "an HTTP/2 client stopped taking its answer; letting it go"
                    );
                }
                return;
            }
            Some(waited) => next = Duration::from_millis(limit_ms - waited),
            None => next = limit / 2,
        }
    }
}

impl<B> Body for StallGuard<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let shared = &self.shared;
        let mut body = shared.body.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(inner) = body.as_mut() else {
            return Poll::Ready(Some(Err(Stalled(shared.limit).into())));
        };
        let polled = inner.as_mut().poll_frame(cx);
        let waiting_since = match &polled {
            Poll::Ready(Some(Ok(frame))) if frame.is_data() => shared.now_ms(),
            _ => 0,
        };
        shared
            .waiting_since_ms
            .store(waiting_since, Ordering::Relaxed);
        polled.map(|frame| frame.map(|frame| frame.map_err(Into::into)))
    }

    /// A body let go is not at its end: hyper then polls it and ends the stream with an error,
    /// so the client cannot take a cut-off answer for a whole one.
    fn is_end_stream(&self) -> bool {
        self.shared
            .body
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|body| body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.shared
            .body
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map_or_else(SizeHint::default, |body| body.size_hint())
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::AtomicBool;

    use http_body_util::BodyExt;

    use super::*;

    /// Data whenever polled, or pending for ever once `pending` is set; notes its drop.
    struct Source {
        pending: bool,
        dropped: Arc<AtomicBool>,
    }

    impl Body for Source {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            if self.pending {
                Poll::Pending
            } else {
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"token")))))
            }
        }
    }

    impl Drop for Source {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    fn source(pending: bool) -> (Source, Arc<AtomicBool>) {
        let dropped = Arc::new(AtomicBool::new(false));
        let source = Source {
            pending,
            dropped: dropped.clone(),
        };
        (source, dropped)
    }

    const LIMIT: Duration = Duration::from_millis(100);

    #[tokio::test(start_paused = true)]
    async fn a_body_not_polled_after_giving_data_is_dropped_after_the_limit() {
        let (body, dropped) = source(false);
        let mut guarded = StallGuard::new(body, LIMIT);
        let first = guarded.frame().await;
        assert!(first.is_some_and(|f| f.is_ok()));
        tokio::time::sleep(LIMIT - Duration::from_millis(10)).await;
        assert!(!dropped.load(Ordering::SeqCst), "dropped before the limit");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(dropped.load(Ordering::SeqCst), "still held past the limit");
        assert!(
            !guarded.is_end_stream(),
            "a body let go is not a finished one"
        );
        let after = guarded.frame().await;
        assert!(
            matches!(after, Some(Err(_))),
            "the stream ends with an error"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_polled_on_time_or_waiting_for_its_own_data_is_kept() {
        let (body, dropped) = source(false);
        let mut guarded = StallGuard::new(body, LIMIT);
        for _ in 0..10 {
            assert!(guarded.frame().await.is_some_and(|f| f.is_ok()));
            tokio::time::sleep(LIMIT / 2).await;
        }
        assert!(
            !dropped.load(Ordering::SeqCst),
            "a client taking data in time"
        );
        drop(guarded);

        let (body, dropped) = source(true);
        let guarded = StallGuard::new(body, LIMIT);
        let mut guarded = std::pin::pin!(guarded);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(guarded.as_mut().poll_frame(&mut cx).is_pending());
        tokio::time::sleep(LIMIT * 5).await;
        assert!(
            !dropped.load(Ordering::SeqCst),
            "a body waiting on its node"
        );
    }

    #[tokio::test]
    async fn the_watchdog_ends_with_the_body_at_once() {
        let alive = || {
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
        };
        let before = alive();
        let (body, dropped) = source(false);
        // A limit far beyond the test: the watchdog must not wait out its period to end.
        let guarded = StallGuard::new(body, Duration::from_secs(3600));
        assert_eq!(alive(), before + 1, "one watchdog a body");
        drop(guarded);
        assert!(dropped.load(Ordering::SeqCst));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(alive(), before, "the watchdog outlived its body");
    }
}
