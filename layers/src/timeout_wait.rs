//! Waits for a free node slot: FIFO, bounded, with a timeout.
//!
//! Use it when nodes must never be sent more than their `max_concurrency` requests: with this
//! layer on, they are not. A request for which some eligible node has a free slot takes it at
//! once, on the node expected to answer first (as [`NodePool::try_acquire_free`] picks).
//! Otherwise it joins a FIFO line of at most `max_waiters` requests and waits at most
//! `wait_timeout`. A slot given back goes straight to the oldest waiter that can use it, so the
//! line is served in order and no wake-up is lost. When capacity grows (a node added, back up,
//! or given more slots), waiters get slots by the same rule as a request that finds one free;
//! a node not measured yet counts as quickest, so up to its `max_concurrency` of them go there
//! at once.
//!
//! Answers, all OpenAI-shaped JSON:
//! - line full: 429 with `Retry-After`;
//! - timed out: 503 with `Retry-After`;
//! - nodes serve the model but none is up: 503 with `Retry-After`, at once, also for requests
//!   already waiting when the last node goes down;
//! - no node serves the model: 404 `model_not_found`.
//!
//! A waiter whose client goes away (its future is dropped) leaves the line at once and takes no
//! slot. The slot is passed on as the request's [`SelectedNode`] (an extension of an
//! `http::Request`, a field of a [`RawRequest`](crate::raw::RawRequest)); a later
//! [`CachedSelectLayer`](crate::cached_select::CachedSelectLayer) may move it to a better node
//! that also has room. The layer never reads the body and works over any
//! [`Routed`] request (`http::Request<B>` for any body type, or a type of your own).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::{Layer, Service};

use crate::error::{ErrorFormat, RouterError, retry_delay};
use crate::future::ResponseFuture;
use crate::pool::{Eligible, Enqueued, LoadGuard, NodePool, QueueEntry, SelectedNode};
use crate::routed::{Routed, RoutedResponse};

/// The outcome of waiting for a slot.
///
/// The seed plan named `Ready`, `Timeout` and `CapacityExceeded`. `Ready` carries the slot
/// itself, so that nobody can take it between the wake-up and the use; the last two variants are
/// the answers given before any waiting.
#[derive(Debug)]
pub enum WaitResult {
    /// A slot was taken; it is held until the guard is dropped.
    Ready(LoadGuard),
    /// No slot came free in time.
    Timeout,
    /// The line was full.
    CapacityExceeded,
    /// Nodes serve the model, but none may take requests now.
    NoEligibleNode,
    /// No node serves the model.
    ModelNotFound,
}

impl WaitResult {
    /// Whether a slot was taken.
    pub fn is_ready(&self) -> bool {
        matches!(self, Self::Ready(_))
    }
}

/// Settings for [`TimeoutWaitLayer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitConfig {
    /// Most requests waiting at once, over all models. Default 1024.
    pub max_waiters: usize,
    /// Longest wait for a slot. Default 30 s.
    pub wait_timeout: Duration,
}

impl Default for WaitConfig {
    fn default() -> Self {
        Self {
            max_waiters: 1024,
            wait_timeout: Duration::from_secs(30),
        }
    }
}

/// How waiting for `model` starts: at once with a slot, in line, or with an answer.
enum Start {
    Done(WaitResult),
    InLine(QueueEntry),
}

fn start(pool: &NodePool, model: Option<&str>, config: &WaitConfig) -> Start {
    let snapshot = pool.snapshot();
    match snapshot.eligible(model) {
        Eligible::UnknownModel => return Start::Done(WaitResult::ModelNotFound),
        Eligible::NoneAvailable => return Start::Done(WaitResult::NoEligibleNode),
        Eligible::Nodes(_) => {}
    }
    // Fast path without the queue lock: nobody waits, so nobody is passed over.
    if pool.waiting() == 0
        && let Some(guard) = pool.try_acquire_free_in(&snapshot, model)
    {
        return Start::Done(WaitResult::Ready(guard));
    }
    // The queue looks again (at the nodes, and for a free slot) under its lock.
    drop(snapshot);
    match pool.enqueue(model, config.max_waiters) {
        Enqueued::Ready(guard) => Start::Done(WaitResult::Ready(guard)),
        Enqueued::Full => Start::Done(WaitResult::CapacityExceeded),
        Enqueued::NoneAvailable => Start::Done(WaitResult::NoEligibleNode),
        Enqueued::UnknownModel => Start::Done(WaitResult::ModelNotFound),
        Enqueued::Waiting(entry) => Start::InLine(entry),
    }
}

/// Waits for a slot on a node eligible for `model` (`None`: any node).
pub async fn wait_for_ready(
    pool: &NodePool,
    model: Option<&str>,
    config: &WaitConfig,
) -> WaitResult {
    match start(pool, model, config) {
        Start::Done(result) => result,
        Start::InLine(mut entry) => {
            match tokio::time::timeout(config.wait_timeout, &mut entry.rx).await {
                Ok(Ok(guard)) => WaitResult::Ready(guard),
                // The pool dropped our place without a slot: no node may serve the model any
                // more (all went down, or the pool is shutting down).
                Ok(Err(_)) => WaitResult::NoEligibleNode,
                Err(_) => WaitResult::Timeout,
            }
        }
    }
}

/// Waits for a free node slot; see the module docs.
#[derive(Debug, Clone)]
pub struct TimeoutWaitLayer {
    pool: NodePool,
    config: WaitConfig,
}

impl TimeoutWaitLayer {
    /// A layer waiting on `pool`'s slots.
    pub fn new(pool: NodePool, config: WaitConfig) -> Self {
        Self { pool, config }
    }
}

impl<S> Layer<S> for TimeoutWaitLayer {
    type Service = TimeoutWait<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TimeoutWait {
            inner,
            pool: self.pool.clone(),
            config: self.config,
        }
    }
}

/// The service made by [`TimeoutWaitLayer`].
#[derive(Debug, Clone)]
pub struct TimeoutWait<S> {
    inner: S,
    pool: NodePool,
    config: WaitConfig,
}

impl<S> TimeoutWait<S> {
    fn error_for(&self, result: WaitResult, model: Option<&str>) -> RouterError {
        let retry_after = retry_delay(self.pool.waiting() + 1, self.pool.release_rate());
        match result {
            WaitResult::Timeout => RouterError::WaitTimeout {
                waited: self.config.wait_timeout,
                retry_after,
            },
            WaitResult::CapacityExceeded => RouterError::QueueFull { retry_after },
            WaitResult::ModelNotFound => {
                RouterError::ModelNotFound(model.unwrap_or_default().to_owned())
            }
            WaitResult::NoEligibleNode | WaitResult::Ready(_) => RouterError::NoNodeAvailable {
                retry_after: retry_delay(1, 0.0),
            },
        }
    }
}

impl<S, R> Service<R> for TimeoutWait<S>
where
    R: Routed,
    S: Service<R> + Clone,
    S::Response: RoutedResponse,
{
    type Response = <S::Response as RoutedResponse>::Layered;
    type Error = S::Error;
    type Future = TimeoutWaitFuture<S, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: R) -> Self::Future {
        // A node chosen earlier in the stack, within its capacity, already holds a good slot.
        if request
            .selected_node()
            .is_some_and(SelectedNode::within_capacity)
        {
            return TimeoutWaitFuture::ready(ResponseFuture::called(self.inner.call(request)));
        }
        // A choice made beyond capacity is given up; this layer finds a slot within it.
        request.remove_selected_node();
        let model = request.model();
        match start(&self.pool, model.as_deref(), &self.config) {
            Start::Done(WaitResult::Ready(guard)) => {
                attach(&mut request, guard);
                TimeoutWaitFuture::ready(ResponseFuture::called(self.inner.call(request)))
            }
            Start::Done(other) => TimeoutWaitFuture::ready(ResponseFuture::rejected(
                self.error_for(other, model.as_deref()),
                request.error_format(),
            )),
            Start::InLine(entry) => {
                let clone = TimeoutWait {
                    inner: self.inner.clone(),
                    pool: self.pool.clone(),
                    config: self.config,
                };
                TimeoutWaitFuture {
                    state: State::Waiting {
                        sleep: tokio::time::sleep(self.config.wait_timeout),
                        entry: Some(entry),
                        service: Some(std::mem::replace(self, clone)),
                        request: Some(request),
                    },
                }
            }
        }
    }
}

fn attach(request: &mut impl Routed, guard: LoadGuard) {
    if let Some(selected) = SelectedNode::new(guard) {
        request.insert_selected_node(selected);
    }
}

pin_project! {
    /// Response future of [`TimeoutWait`].
    pub struct TimeoutWaitFuture<S: Service<R>, R> {
        #[pin]
        state: State<S, R>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S: Service<R>, R> {
        Waiting {
            #[pin]
            sleep: Sleep,
            entry: Option<QueueEntry>,
            service: Option<TimeoutWait<S>>,
            request: Option<R>,
        },
        Ready {
            #[pin]
            future: ResponseFuture<S::Future>,
        },
    }
}

impl<S: Service<R>, R> TimeoutWaitFuture<S, R> {
    fn ready(future: ResponseFuture<S::Future>) -> Self {
        Self {
            state: State::Ready { future },
        }
    }
}

impl<S, R> Future for TimeoutWaitFuture<S, R>
where
    R: Routed,
    S: Service<R>,
    S::Response: RoutedResponse,
{
    type Output = Result<<S::Response as RoutedResponse>::Layered, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Waiting {
                    sleep,
                    entry,
                    service,
                    request,
                } => {
                    let outcome = match entry.as_mut().map(|e| Pin::new(&mut e.rx).poll(cx)) {
                        Some(Poll::Ready(Ok(guard))) => WaitResult::Ready(guard),
                        Some(Poll::Ready(Err(_))) | None => WaitResult::NoEligibleNode,
                        Some(Poll::Pending) => {
                            ready!(sleep.poll(cx));
                            WaitResult::Timeout
                        }
                    };
                    // Leave the line (a no-op if we were served) before anything else.
                    drop(entry.take());
                    let future = match (service.take(), request.take()) {
                        (Some(mut service), Some(mut request)) => match outcome {
                            WaitResult::Ready(guard) => {
                                attach(&mut request, guard);
                                ResponseFuture::called(service.inner.call(request))
                            }
                            other => ResponseFuture::rejected(
                                service.error_for(other, request.model().as_deref()),
                                request.error_format(),
                            ),
                        },
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
    use std::sync::Arc;

    use crate::pool::NodeSpec;

    use super::*;

    fn pool(max: usize) -> NodePool {
        NodePool::from_specs([NodeSpec::new("a", "http://127.0.0.1:1")
            .models(["m"])
            .max_concurrency(max)])
        .unwrap()
    }

    fn config(max_waiters: usize, ms: u64) -> WaitConfig {
        WaitConfig {
            max_waiters,
            wait_timeout: Duration::from_millis(ms),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn test_wait_for_ready_timeout() {
        let pool = pool(1);
        let _busy = wait_for_ready(&pool, Some("m"), &config(8, 10)).await;
        let started = tokio::time::Instant::now();
        let result = wait_for_ready(&pool, Some("m"), &config(8, 50)).await;
        assert!(matches!(result, WaitResult::Timeout), "{result:?}");
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(pool.waiting(), 0, "a timed-out waiter leaves the line");
    }

    #[tokio::test]
    async fn test_wait_for_ready_ready_immediately() {
        let pool = pool(2);
        let result = wait_for_ready(&pool, Some("m"), &config(8, 1000)).await;
        let WaitResult::Ready(guard) = result else {
            panic!("expected a slot, got {result:?}");
        };
        assert_eq!(guard.node().unwrap().id(), "a");
        assert_eq!(pool.snapshot().nodes()[0].state().in_flight(), 1);
        drop(guard);
        assert_eq!(pool.snapshot().nodes()[0].state().in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn test_wait_for_ready_capacity_exceeded() {
        let pool = pool(1);
        let _busy = wait_for_ready(&pool, Some("m"), &config(1, 10)).await;
        let pool2 = pool.clone();
        let first_waiter =
            tokio::spawn(
                async move { wait_for_ready(&pool2, Some("m"), &config(1, 10_000)).await },
            );
        while pool.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        let result = wait_for_ready(&pool, Some("m"), &config(1, 10_000)).await;
        assert!(matches!(result, WaitResult::CapacityExceeded), "{result:?}");
        first_waiter.abort();
    }

    #[tokio::test]
    async fn unknown_and_unavailable_models_answer_at_once() {
        let pool = pool(1);
        let result = wait_for_ready(&pool, Some("other"), &config(8, 60_000)).await;
        assert!(matches!(result, WaitResult::ModelNotFound));
        pool.set_healthy("a", false);
        let result = wait_for_ready(&pool, Some("m"), &config(8, 60_000)).await;
        assert!(matches!(result, WaitResult::NoEligibleNode));
    }

    #[tokio::test]
    async fn a_released_slot_goes_to_the_oldest_waiter() {
        let pool = pool(1);
        let WaitResult::Ready(held) = wait_for_ready(&pool, Some("m"), &config(8, 10)).await else {
            panic!("no slot");
        };
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..5 {
            let (waiter_pool, order) = (pool.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let result = wait_for_ready(&waiter_pool, Some("m"), &config(8, 60_000)).await;
                order.lock().unwrap().push(i);
                drop(result);
            }));
            // Each waiter is in line before the next one starts.
            while pool.waiting() < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
        assert_eq!(pool.snapshot().nodes()[0].state().in_flight(), 0);
    }

    #[tokio::test]
    async fn waiters_are_answered_at_once_when_the_last_node_goes_down() {
        let pool = pool(1);
        let _held = wait_for_ready(&pool, Some("m"), &config(8, 10)).await;
        let mut waiters = Vec::new();
        for _ in 0..3 {
            let waiter_pool = pool.clone();
            waiters.push(tokio::spawn(async move {
                wait_for_ready(&waiter_pool, Some("m"), &config(8, 60_000)).await
            }));
        }
        while pool.waiting() < 3 {
            tokio::task::yield_now().await;
        }
        pool.set_healthy("a", false);
        for waiter in waiters {
            let result = tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("the waiter was not answered at once")
                .unwrap();
            assert!(matches!(result, WaitResult::NoEligibleNode), "{result:?}");
        }
        assert_eq!(pool.waiting(), 0, "no line is left behind");
    }

    #[tokio::test]
    async fn a_new_node_serves_the_waiters() {
        let pool = pool(1);
        let _held = wait_for_ready(&pool, Some("m"), &config(8, 10)).await;
        let pool2 = pool.clone();
        let waiter =
            tokio::spawn(
                async move { wait_for_ready(&pool2, Some("m"), &config(8, 60_000)).await },
            );
        while pool.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        pool.set_nodes([
            NodeSpec::new("a", "http://127.0.0.1:1")
                .models(["m"])
                .max_concurrency(1),
            NodeSpec::new("b", "http://127.0.0.1:2")
                .models(["m"])
                .max_concurrency(1),
        ])
        .unwrap();
        let WaitResult::Ready(guard) = waiter.await.unwrap() else {
            panic!("the new node should have served the waiter");
        };
        assert_eq!(guard.node().unwrap().id(), "b");
    }
}
