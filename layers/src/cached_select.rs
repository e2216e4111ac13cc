//! Load-aware node choice over a cached ranking.
//!
//! Use it to pick which node serves a request. Choosing has two parts:
//!
//! - The **ranking** orders the eligible nodes for each model (healthy, not draining, serving it)
//!   by slow signals: the node's time-to-first-byte average divided by its weight, ties kept in
//!   pool order. It is cached and rebuilt only when the pool changes or after a short TTL, and
//!   the request path reads it without locks.
//! - The **pick** weighs speed against live load: the node with the lowest expected time to
//!   first byte, `ttfb × (1 + (in flight + 1) / max concurrency)`, ties to the better rank. A
//!   node twice as quick takes load until it is full before a slow one gets any, which is
//!   what keeps the p95 of a mixed fleet low; a node with room always beats a full one; nodes of equal speed share load in proportion to
//!   their capacity, and with equal load consecutive requests get the same node. A node not
//!   measured yet counts as quickest, so it gets tried. For fleets above [`FULL_SCAN_LIMIT`]
//!   nodes the pick is power of two choices: the best-ranked node against one other, so its
//!   cost stays constant.
//!
//! The choice is attached to the request as a [`SelectedNode`] holding the node's slot (an
//! extension of an `http::Request`, a field of a [`RawRequest`](crate::raw::RawRequest)). If a
//! [`TimeoutWaitLayer`](crate::timeout_wait::TimeoutWaitLayer) before it already holds a slot,
//! the pick moves there only to a node with room, so the wait layer's guarantee holds. Without one,
//! the slot is taken even on a full node (the node queues it). No node for the model answers 404;
//! no node up answers 503. The layer never reads the body and works over any [`Routed`] request
//! (`http::Request<B>` for any body type, or a type of your own).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tower::{Layer, Service};

use crate::FastMap;
use crate::error::{RouterError, retry_delay};
use crate::future::ResponseFuture;
use crate::pool::{
    Eligible, Node, NodePool, PoolSnapshot, SelectedNode, SlotBound, Speed, quickest,
};
use crate::routed::{Routed, RoutedResponse};

/// Fleets up to this size get an exact pick (every node's expected time to first byte);
/// larger ones get power of two choices.
pub const FULL_SCAN_LIMIT: usize = 16;

/// Settings for [`CachedSelectLayer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelectConfig {
    /// How long a ranking is used before it is rebuilt from fresh latency figures. Default 1 s.
    pub ranking_ttl: Duration,
}

impl Default for SelectConfig {
    fn default() -> Self {
        Self {
            ranking_ttl: Duration::from_secs(1),
        }
    }
}

/// Eligible nodes per model, best first.
#[derive(Debug)]
struct Ranking {
    generation: u64,
    built_at: Instant,
    by_model: FastMap<Arc<str>, Ranked>,
    any: Ranked,
    wildcard: Ranked,
}

/// Nodes best first, each with the [`Speed`] it had when the ranking was built.
#[derive(Debug, Default)]
struct Ranked(Vec<(Arc<Node>, Speed)>);

impl Ranked {
    fn entry(&self, i: usize) -> (&Arc<Node>, Speed) {
        let (node, speed) = &self.0[i];
        (node, *speed)
    }

    fn entries(&self) -> impl Iterator<Item = (&Arc<Node>, Speed)> {
        self.0.iter().map(|(node, speed)| (node, *speed))
    }
}

impl Ranking {
    fn build(snapshot: &PoolSnapshot) -> Self {
        let rank = |nodes: &[Arc<Node>]| -> Ranked {
            let mut scored: Vec<(Arc<Node>, Speed)> =
                nodes.iter().map(|n| (n.clone(), Speed::of(n))).collect();
            // Stable: equal speeds keep pool order.
            scored.sort_by(|(_, a), (_, b)| a.ttfb.total_cmp(&b.ttfb));
            Ranked(scored)
        };
        let list = |model: Option<&str>| match snapshot.eligible(model) {
            Eligible::Nodes(nodes) => rank(nodes),
            _ => Ranked::default(),
        };
        let by_model = snapshot
            .models()
            .into_iter()
            .map(|m| {
                let ranked = list(Some(&m));
                (m, ranked)
            })
            .collect();
        let wildcard: Vec<Arc<Node>> = snapshot
            .nodes()
            .iter()
            .filter(|n| n.is_eligible() && n.models().is_empty())
            .cloned()
            .collect();
        Self {
            generation: snapshot.generation(),
            built_at: Instant::now(),
            by_model,
            any: list(None),
            wildcard: rank(&wildcard),
        }
    }

    fn nodes(&self, model: Option<&str>) -> &Ranked {
        match model {
            None => &self.any,
            Some(m) => self.by_model.get(m).unwrap_or(&self.wildcard),
        }
    }
}

/// The ranking cache and the pick; shared by all clones of one layer.
#[derive(Debug)]
pub struct NodeSelector {
    pool: NodePool,
    config: SelectConfig,
    ranking: ArcSwap<Ranking>,
    builds: AtomicU64,
    second_choice: AtomicU64,
}

impl NodeSelector {
    /// A selector over `pool`.
    pub fn new(pool: NodePool, config: SelectConfig) -> Self {
        let ranking = Ranking::build(&pool.snapshot());
        Self {
            pool,
            config,
            ranking: ArcSwap::from_pointee(ranking),
            builds: AtomicU64::new(1),
            second_choice: AtomicU64::new(0),
        }
    }

    /// How many times the ranking was built. For tests and metrics.
    pub fn ranking_builds(&self) -> u64 {
        self.builds.load(Ordering::Relaxed)
    }

    fn ranking(&self) -> arc_swap::Guard<Arc<Ranking>> {
        let ranking = self.ranking.load();
        let generation = self.pool.generation();
        if ranking.generation == generation && ranking.built_at.elapsed() < self.config.ranking_ttl
        {
            return ranking;
        }
        // Concurrent rebuilds are harmless: each builds the same thing from the same snapshot.
        self.ranking
            .store(Arc::new(Ranking::build(&self.pool.snapshot())));
        self.builds.fetch_add(1, Ordering::Relaxed);
        self.ranking.load()
    }

    /// Chooses a node for `model` and takes a slot on it. `held` is a slot an earlier layer
    /// took within capacity; the choice then only moves to a node with room.
    pub fn select(
        &self,
        model: Option<&str>,
        held: Option<SelectedNode>,
    ) -> Result<SelectedNode, RouterError> {
        match held {
            Some(mut held) => self.reselect(model, &mut held).map(|()| held),
            None => self.select_new(model),
        }
    }

    /// [`select`](Self::select) for a slot that stays where it is (a request's extension),
    /// replaced only when the choice moves.
    fn reselect(&self, model: Option<&str>, held: &mut SelectedNode) -> Result<(), RouterError> {
        if !held.within_capacity() {
            held.replace_with(self.select_new(model)?);
            return Ok(());
        }
        let ranking = self.ranking();
        let ranked = ranking.nodes(model);
        if ranked.0.is_empty() {
            return Err(self.nothing_ranked(model));
        }
        let best = self.pick(ranked, SlotBound::WithinCapacity, Some(held));
        if let Some(node) = best
            && !Arc::ptr_eq(node.state(), held.node().state())
            && let Some(moved) = self.pool.acquire(node, SlotBound::WithinCapacity)
        {
            // The old slot is given back as it is replaced, once the new one is ours.
            held.move_to(moved);
        }
        Ok(())
    }

    /// A slot on the best node for `model`, with nothing held.
    fn select_new(&self, model: Option<&str>) -> Result<SelectedNode, RouterError> {
        let ranking = self.ranking();
        let ranked = ranking.nodes(model);
        if ranked.0.is_empty() {
            return Err(self.nothing_ranked(model));
        }
        let node = self
            .pick(ranked, SlotBound::MayExceed, None)
            .ok_or(RouterError::Internal)?;
        self.pool
            .acquire(node, SlotBound::MayExceed)
            .and_then(SelectedNode::new)
            .ok_or(RouterError::Internal)
    }

    /// Why no node could be ranked for `model`. The ranking may be a moment behind; the
    /// snapshot has the final word.
    fn nothing_ranked(&self, model: Option<&str>) -> RouterError {
        match self.pool.snapshot().eligible(model) {
            Eligible::UnknownModel => {
                RouterError::ModelNotFound(model.unwrap_or_default().to_owned())
            }
            _ => RouterError::NoNodeAvailable {
                retry_after: retry_delay(1, 0.0),
            },
        }
    }

    /// Over small fleets, the eligible node expected to answer first: the ranking's cached speed
    /// weighed against each node's live load (full nodes skipped under
    /// [`SlotBound::WithinCapacity`]). Over large ones, the best-ranked node against one rotating
    /// other (plus the node already held, if any).
    fn pick<'a>(
        &self,
        ranked: &'a Ranked,
        bound: SlotBound,
        held: Option<&'a SelectedNode>,
    ) -> Option<&'a Arc<Node>> {
        let held_state = held.map(|h| &**h.node().state());
        if ranked.0.len() <= FULL_SCAN_LIMIT {
            return quickest(ranked.entries(), bound, held_state);
        }
        // A Weyl sequence spreads the second choice evenly without a random number generator.
        let step = self
            .second_choice
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        let other = 1 + (step % (ranked.0.len() as u64 - 1)) as usize;
        let candidates = [
            Some(ranked.entry(0)),
            Some(ranked.entry(other)),
            held.map(|h| (h.node(), Speed::of(h.node()))),
        ];
        quickest(candidates.into_iter().flatten(), bound, held_state)
    }
}

/// Chooses the node for each request; see the module docs.
#[derive(Debug, Clone)]
pub struct CachedSelectLayer {
    selector: Arc<NodeSelector>,
}

impl CachedSelectLayer {
    /// A layer choosing among `pool`'s nodes.
    pub fn new(pool: NodePool, config: SelectConfig) -> Self {
        Self {
            selector: Arc::new(NodeSelector::new(pool, config)),
        }
    }

    /// The selector shared by the services this layer makes.
    pub fn selector(&self) -> &Arc<NodeSelector> {
        &self.selector
    }
}

impl<S> Layer<S> for CachedSelectLayer {
    type Service = CachedSelect<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CachedSelect {
            inner,
            selector: self.selector.clone(),
        }
    }
}

/// The service made by [`CachedSelectLayer`].
#[derive(Debug, Clone)]
pub struct CachedSelect<S> {
    inner: S,
    selector: Arc<NodeSelector>,
}

impl<S, R> Service<R> for CachedSelect<S>
where
    R: Routed,
    S: Service<R>,
    S::Response: RoutedResponse,
{
    type Response = <S::Response as RoutedResponse>::Layered;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: R) -> Self::Future {
        let model = request.model();
        // A slot an earlier layer took is moved or kept where it is: for `http::Request`, taking
        // it out of the extensions and putting it back would cost two map operations and an
        // allocation.
        let chosen = match request.selected_node_mut() {
            Some(held) => self.selector.reselect(model.as_deref(), held),
            None => self
                .selector
                .select_new(model.as_deref())
                .map(|selected| request.insert_selected_node(selected)),
        };
        match chosen {
            Ok(()) => ResponseFuture::called(self.inner.call(request)),
            Err(error) => ResponseFuture::rejected(error, request.error_format()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use http::{Request, Response};

    use crate::pool::NodeSpec;
    use crate::request_info::RequestInfo;

    use super::*;

    fn pool(nodes: &[(&str, usize)]) -> NodePool {
        NodePool::from_specs(nodes.iter().map(|(id, max)| {
            NodeSpec::new(*id, format!("http://127.0.0.1:1/{id}"))
                .models(["m"])
                .max_concurrency(*max)
        }))
        .unwrap()
    }

    fn id(selected: &SelectedNode) -> String {
        selected.node().id().to_owned()
    }

    #[test]
    fn test_cached_node_selection() {
        let pool = pool(&[("a", 4), ("b", 4), ("c", 4)]);
        let selector = NodeSelector::new(pool, SelectConfig::default());
        let first = id(&selector.select(Some("m"), None).unwrap());
        for _ in 0..100 {
            assert_eq!(id(&selector.select(Some("m"), None).unwrap()), first);
        }
        assert_eq!(
            selector.ranking_builds(),
            1,
            "the ranking is cached, not rebuilt per call"
        );
    }

    #[test]
    fn the_ranking_is_rebuilt_when_the_pool_changes_and_follows_latency() {
        let pool = pool(&[("a", 4), ("b", 4)]);
        let selector = NodeSelector::new(pool.clone(), SelectConfig::default());
        assert_eq!(id(&selector.select(Some("m"), None).unwrap()), "a");
        pool.snapshot().nodes()[0]
            .state()
            .record_ttfb(Duration::from_millis(500));
        pool.snapshot().nodes()[1]
            .state()
            .record_ttfb(Duration::from_millis(50));
        // Same generation and inside the TTL: the cached ranking still says a.
        assert_eq!(id(&selector.select(Some("m"), None).unwrap()), "a");
        pool.set_draining("c-does-not-exist", true);
        pool.set_draining("a", false);
        assert_eq!(id(&selector.select(Some("m"), None).unwrap()), "b");
        assert_eq!(selector.ranking_builds(), 2);
    }

    #[test]
    fn a_held_slot_over_capacity_is_replaced_and_given_back_uncounted() {
        let pool = pool(&[("a", 1), ("b", 1)]);
        let a = pool.snapshot().node("a").unwrap().clone();
        let _filling = pool.acquire(&a, SlotBound::WithinCapacity).unwrap();
        let over = SelectedNode::new(pool.acquire(&a, SlotBound::MayExceed).unwrap()).unwrap();
        assert!(!over.within_capacity());
        let selector = NodeSelector::new(pool, SelectConfig::default());
        let selected = selector.select(Some("m"), Some(over)).unwrap();
        assert_eq!(id(&selected), "b");
        assert_eq!(a.state().in_flight(), 1, "the slot over capacity went back");
        assert_eq!(a.state().completed(), 0, "it served no request");
    }

    #[test]
    fn a_quick_node_fills_before_a_slow_one_gets_load() {
        let pool = pool(&[("slow", 4), ("quick", 4)]);
        let nodes = pool.snapshot().nodes().to_vec();
        for _ in 0..20 {
            nodes[0].state().record_ttfb(Duration::from_millis(150));
            nodes[1].state().record_ttfb(Duration::from_millis(40));
        }
        let selector = NodeSelector::new(pool, SelectConfig::default());
        let held: Vec<_> = (0..4)
            .map(|_| selector.select(Some("m"), None).unwrap())
            .collect();
        assert!(
            held.iter().all(|s| id(s) == "quick"),
            "the quick node fills first"
        );
        let next = selector.select(Some("m"), None).unwrap();
        assert_eq!(
            id(&next),
            "slow",
            "a full quick node queues; the slow one has room"
        );
    }

    #[test]
    fn equal_speeds_share_by_load_and_expected_time_grows_past_capacity() {
        let speed = Speed {
            ttfb: 100.0,
            latency: 1000.0,
        };
        assert!(speed.expected(1, 4) < speed.expected(4, 4));
        assert!((speed.expected(4, 4) - 2.0 * 101.0).abs() < 1e-9);
        // Four more requests on a full four-slot node wait one slot-holding time.
        assert!((speed.expected(8, 4) - (2.0 * 101.0 + 1000.0)).abs() < 1e-9);
    }

    #[test]
    fn held_load_spreads_in_proportion_to_capacity() {
        let pool = pool(&[("big", 6), ("small1", 3), ("small2", 3)]);
        let selector = NodeSelector::new(pool, SelectConfig::default());
        let held: Vec<_> = (0..12)
            .map(|_| selector.select(Some("m"), None).unwrap())
            .collect();
        let mut counts: HashMap<String, usize> = HashMap::new();
        for s in &held {
            *counts.entry(id(s)).or_default() += 1;
        }
        assert_eq!(counts["big"], 6);
        assert_eq!(counts["small1"], 3);
        assert_eq!(counts["small2"], 3);
        assert!(held.iter().all(SelectedNode::within_capacity));
        let over = selector.select(Some("m"), None).unwrap();
        assert!(
            !over.within_capacity(),
            "a full fleet still gets a node, marked over capacity"
        );
    }

    #[test]
    fn a_slot_held_within_capacity_only_moves_to_a_node_with_room() {
        let pool = pool(&[("a", 1), ("b", 2)]);
        let selector = NodeSelector::new(pool.clone(), SelectConfig::default());
        let snapshot = pool.snapshot();
        let (a, b) = (&snapshot.nodes()[0], &snapshot.nodes()[1]);
        let on_a = SelectedNode::new(pool.acquire(a, SlotBound::WithinCapacity).unwrap()).unwrap();
        // a is full with our own request; b has room, so the pick moves there and frees a.
        let moved = selector.select(Some("m"), Some(on_a)).unwrap();
        assert_eq!(id(&moved), "b");
        assert_eq!((a.state().in_flight(), b.state().in_flight()), (0, 1));
        // b holds 2/2 now; our slot on a is the only room, so it stays.
        let _fill = pool.acquire(b, SlotBound::WithinCapacity).unwrap();
        drop(moved);
        let _fill2 = pool.acquire(b, SlotBound::WithinCapacity).unwrap();
        let on_a = SelectedNode::new(pool.acquire(a, SlotBound::WithinCapacity).unwrap()).unwrap();
        let kept = selector.select(Some("m"), Some(on_a)).unwrap();
        assert_eq!(id(&kept), "a");
        assert!(b.state().in_flight() <= b.max_concurrency());
    }

    /// Through the service: a slot held in the request's extensions is moved there, and the
    /// inner service sees the one slot it ends up with.
    #[tokio::test]
    async fn the_service_moves_a_held_slot_in_place() {
        let pool = pool(&[("a", 1), ("b", 2)]);
        let snapshot = pool.snapshot();
        let (a, b) = (snapshot.nodes()[0].clone(), snapshot.nodes()[1].clone());
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        let inner = tower::service_fn(move |request: Request<()>| {
            let selected = request.extensions().get::<SelectedNode>().map(id);
            record.lock().unwrap().push(selected);
            std::future::ready(Ok::<_, std::convert::Infallible>(Response::new(())))
        });
        let mut service =
            CachedSelectLayer::new(pool.clone(), SelectConfig::default()).layer(inner);
        let info = RequestInfo {
            model: Some("m".into()),
            stream: false,
        };
        let request = |held: Option<SelectedNode>| {
            let mut request = Request::new(());
            request.extensions_mut().insert(info.clone());
            if let Some(held) = held {
                request.extensions_mut().insert(held);
            }
            request
        };
        // Held on a, which it fills; b has room: moved, and a is free again.
        let on_a = SelectedNode::new(pool.acquire(&a, SlotBound::WithinCapacity).unwrap()).unwrap();
        service.call(request(Some(on_a))).await.unwrap();
        // Nothing held: one is taken.
        service.call(request(None)).await.unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            [Some("b".to_owned()), Some("b".to_owned())]
        );
        assert_eq!((a.state().in_flight(), b.state().in_flight()), (0, 0));
        // An unknown model is refused, and the held slot goes with the request.
        let mut unknown = request(Some(
            SelectedNode::new(pool.acquire(&a, SlotBound::WithinCapacity).unwrap()).unwrap(),
        ));
        unknown.extensions_mut().insert(RequestInfo {
            model: Some("nope".into()),
            stream: false,
        });
        let refused = service.call(unknown).await.unwrap();
        assert_eq!(refused.status(), http::StatusCode::NOT_FOUND);
        assert_eq!(a.state().in_flight(), 0);
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    #[test]
    fn unknown_and_unavailable_models_are_told_apart() {
        let pool = pool(&[("a", 1)]);
        let selector = NodeSelector::new(pool.clone(), SelectConfig::default());
        assert!(matches!(
            selector.select(Some("zzz"), None),
            Err(RouterError::ModelNotFound(_))
        ));
        pool.set_healthy("a", false);
        assert!(matches!(
            selector.select(Some("m"), None),
            Err(RouterError::NoNodeAvailable { .. })
        ));
    }

    #[test]
    fn large_fleets_use_two_choices_and_still_spread() {
        let nodes: Vec<(String, usize)> = (0..40).map(|i| (format!("n{i}"), 2)).collect();
        let refs: Vec<(&str, usize)> = nodes.iter().map(|(n, m)| (n.as_str(), *m)).collect();
        let selector = NodeSelector::new(pool(&refs), SelectConfig::default());
        let held: Vec<_> = (0..40)
            .map(|_| selector.select(Some("m"), None).unwrap())
            .collect();
        let mut counts: HashMap<String, usize> = HashMap::new();
        for s in &held {
            *counts.entry(id(s)).or_default() += 1;
        }
        assert!(counts.values().all(|&c| c <= 2), "{counts:?}");
    }
}
