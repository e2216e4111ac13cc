//! The shared node pool: which nodes exist, what they serve, and how loaded they are.
//!
//! Every layer in this crate reads the same [`NodePool`]. Readers never lock: the set of nodes is an
//! immutable [`PoolSnapshot`] behind an [`ArcSwap`], and writers build a new snapshot and swap it
//! in. Live load lives in a [`NodeState`] per node, shared across snapshots, so that a health flip
//! or a new node never resets in-flight counts.
//!
//! A request that holds a node's slot holds a [`LoadGuard`]. Dropping the guard gives the slot
//! back; when requests are queued for a slot (see [`crate::timeout_wait`]), the slot is handed
//! straight to the oldest waiter that can use it, so no wake-up is lost and no newcomer can barge
//! past the queue.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::HeaderValue;
use http::uri::{Authority, Scheme, Uri};
use tokio::sync::oneshot;

use crate::{FastMap, FastSet};

/// How a node is described to the pool: the static part that comes from config or registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// A stable identifier. It may appear in logs, the history and the admin API, never on `/v1`.
    pub id: String,
    /// Base URL of the node, for example `http://10.0.0.7:8000`. A path prefix is kept.
    pub base_url: String,
    /// Models the node serves. An empty list means the node serves any model.
    pub models: Vec<String>,
    /// How many requests the node takes at once. At least 1.
    pub max_concurrency: usize,
    /// Relative preference among nodes of equal measured latency. At least 1.
    pub weight: u32,
    /// Sent as `Authorization: Bearer <key>` to the node instead of the client's credentials.
    pub api_key: Option<String>,
    /// Whether the node is healthy. Unhealthy nodes get no new requests.
    pub healthy: bool,
    /// Whether the node is draining: it finishes what it has and gets no new requests.
    pub draining: bool,
}

impl NodeSpec {
    /// A healthy node with the given id and base URL, serving any model, with max concurrency 32.
    pub fn new(id: impl Into<String>, base_url: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            base_url: base_url.into(),
            models: Vec::new(),
            max_concurrency: 32,
            weight: 1,
            api_key: None,
            healthy: true,
            draining: false,
        }
    }

    /// Sets the models the node serves.
    pub fn models<I, M>(mut self, models: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: Into<String>,
    {
        self.models = models.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the node's maximum concurrency (at least 1).
    pub fn max_concurrency(mut self, max: usize) -> Self {
        self.max_concurrency = max;
        self
    }

    /// Sets the node's weight (at least 1).
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }
}

/// Why a [`NodeSpec`] was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeSpecError {
    /// The base URL is not an absolute `http://` URL.
    #[error("node {id}: base URL {url:?} is not an absolute http:// URL")]
    BadUrl {
        /// The node's id.
        id: String,
        /// The URL as given.
        url: String,
    },
    /// Max concurrency or weight is zero.
    #[error("node {id}: max_concurrency and weight must be at least 1")]
    ZeroCapacity {
        /// The node's id.
        id: String,
    },
    /// Two nodes share an id.
    #[error("node id {0:?} is used twice")]
    DuplicateId(String),
    /// The API key cannot be sent in a header.
    #[error("node {id}: api_key contains characters not allowed in a header")]
    BadApiKey {
        /// The node's id.
        id: String,
    },
}

/// Live, shared measurements of one node. Kept across snapshots for the same node id.
#[derive(Debug, Default)]
pub struct NodeState {
    in_flight: AtomicUsize,
    latency_ewma_us: AtomicU64,
    ttfb_ewma_us: AtomicU64,
    consecutive_failures: AtomicU32,
    completed: AtomicU64,
}

impl NodeState {
    /// Requests currently holding a slot on this node (including streams not yet finished).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Exponentially weighted mean of whole-request latency, if any request completed.
    pub fn latency_ewma(&self) -> Option<Duration> {
        micros(self.latency_ewma_us.load(Ordering::Relaxed))
    }

    /// Exponentially weighted mean of time to first byte, if any was recorded.
    pub fn ttfb_ewma(&self) -> Option<Duration> {
        micros(self.ttfb_ewma_us.load(Ordering::Relaxed))
    }

    /// Failures in a row, reset by the next success.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Requests that finished on this node (slot released).
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    /// Records the time from sending a request to the node's response headers.
    pub fn record_ttfb(&self, ttfb: Duration) {
        ewma_update(&self.ttfb_ewma_us, ttfb);
    }

    /// Records a successful answer: resets the failure run.
    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Records a failed attempt (connect error, timeout, 5xx) and returns the run length.
    pub fn record_failure(&self) -> u32 {
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1
    }
}

fn micros(us: u64) -> Option<Duration> {
    (us > 0).then(|| Duration::from_micros(us))
}

/// Weight 1/8 for the newest sample: smooth enough to ignore one slow answer, quick enough to
/// follow a node that slows down within a few dozen requests.
fn ewma_update(cell: &AtomicU64, sample: Duration) {
    let sample = u64::try_from(sample.as_micros()).unwrap_or(u64::MAX).max(1);
    let old = cell.load(Ordering::Relaxed);
    let new = if old == 0 {
        sample
    } else {
        // Racing writers may lose a sample; the mean stays a mean.
        old - old / 8 + sample / 8
    };
    cell.store(new.max(1), Ordering::Relaxed);
}

/// One node as seen in a snapshot: its static description plus its shared live state.
pub struct Node {
    id: Arc<str>,
    scheme: Scheme,
    authority: Authority,
    path_prefix: Arc<str>,
    models: Box<[Arc<str>]>,
    max_concurrency: usize,
    weight: u32,
    authorization: Option<HeaderValue>,
    healthy: bool,
    draining: bool,
    state: Arc<NodeState>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Leave out the API key; the address is fine for operators' logs.
        f.debug_struct("Node")
            .field("id", &self.id)
            .field("authority", &self.authority)
            .field("models", &self.models)
            .field("max_concurrency", &self.max_concurrency)
            .field("in_flight", &self.state.in_flight())
            .field("healthy", &self.healthy)
            .field("draining", &self.draining)
            .finish()
    }
}

impl Node {
    /// The node's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The node's id, shared.
    pub fn id_arc(&self) -> &Arc<str> {
        &self.id
    }

    /// The models the node serves; empty means any model.
    pub fn models(&self) -> &[Arc<str>] {
        &self.models
    }

    /// Whether the node serves `model` (`None` asks for any node).
    pub fn serves(&self, model: Option<&str>) -> bool {
        match model {
            None => true,
            Some(m) => self.models.is_empty() || self.models.iter().any(|x| &**x == m),
        }
    }

    /// The node's max concurrency.
    pub fn max_concurrency(&self) -> usize {
        self.max_concurrency
    }

    /// The node's weight.
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// Whether the node is healthy.
    pub fn is_healthy(&self) -> bool {
        self.healthy
    }

    /// Whether the node is draining.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Healthy and not draining: the node may get new requests.
    pub fn is_eligible(&self) -> bool {
        self.healthy && !self.draining
    }

    /// The node's live state.
    pub fn state(&self) -> &Arc<NodeState> {
        &self.state
    }

    /// The `Authorization` value to send to this node, if it has its own key.
    pub fn authorization(&self) -> Option<&HeaderValue> {
        self.authorization.as_ref()
    }

    /// The URI of `path_and_query` on this node.
    pub fn uri_for(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        let mut pq = String::with_capacity(self.path_prefix.len() + path_and_query.len());
        pq.push_str(&self.path_prefix);
        pq.push_str(path_and_query);
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }

    /// The node's host and port. For operators, for scrubbing it from answers, and for the
    /// client.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The path of the node's base URL, without its trailing `/` (empty for most nodes): what
    /// goes before a request's path on this node.
    pub fn path_prefix(&self) -> &str {
        &self.path_prefix
    }

    /// The node's base URL (scheme, host, port and path prefix). For operators only.
    pub fn base_url(&self) -> String {
        format!("{}://{}{}", self.scheme, self.authority, self.path_prefix)
    }

    /// Whether a slot is free right now.
    pub fn has_free_slot(&self) -> bool {
        self.state.in_flight() < self.max_concurrency
    }

    /// Takes a slot if one is free (never exceeds max concurrency).
    fn try_take_slot(&self) -> bool {
        self.state
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_concurrency).then_some(n + 1)
            })
            .is_ok()
    }

    /// Takes a slot regardless of max concurrency (the node may queue it). Returns whether the
    /// slot is within max concurrency.
    fn take_slot_unbounded(&self) -> bool {
        self.state.in_flight.fetch_add(1, Ordering::AcqRel) < self.max_concurrency
    }

    fn from_spec(spec: &NodeSpec, state: Arc<NodeState>) -> Result<Self, NodeSpecError> {
        let bad_url = || NodeSpecError::BadUrl {
            id: spec.id.clone(),
            url: spec.base_url.clone(),
        };
        if spec.max_concurrency == 0 || spec.weight == 0 {
            return Err(NodeSpecError::ZeroCapacity {
                id: spec.id.clone(),
            });
        }
        let uri = Uri::from_str(spec.base_url.trim()).map_err(|_| bad_url())?;
        let scheme = uri.scheme().cloned().ok_or_else(bad_url)?;
        if scheme != Scheme::HTTP {
            return Err(bad_url());
        }
        let authority = uri.authority().cloned().ok_or_else(bad_url)?;
        let path_prefix: Arc<str> = uri.path().trim_end_matches('/').into();
        let authorization = match &spec.api_key {
            None => None,
            Some(key) => Some(
                HeaderValue::from_str(&format!("Bearer {key}"))
                    .map(|mut v| {
                        v.set_sensitive(true);
                        v
                    })
                    .map_err(|_| NodeSpecError::BadApiKey {
                        id: spec.id.clone(),
                    })?,
            ),
        };
        Ok(Self {
            id: spec.id.as_str().into(),
            scheme,
            authority,
            path_prefix,
            models: spec.models.iter().map(|m| Arc::from(m.as_str())).collect(),
            max_concurrency: spec.max_concurrency,
            weight: spec.weight,
            authorization,
            healthy: spec.healthy,
            draining: spec.draining,
            state,
        })
    }

    fn to_spec(&self) -> NodeSpec {
        NodeSpec {
            id: self.id.to_string(),
            base_url: self.base_url(),
            models: self.models.iter().map(|m| m.to_string()).collect(),
            max_concurrency: self.max_concurrency,
            weight: self.weight,
            api_key: None,
            healthy: self.healthy,
            draining: self.draining,
        }
    }
}

/// Which nodes may take a request for a model, right now.
#[derive(Debug)]
pub enum Eligible<'a> {
    /// These nodes may take it (at least one).
    Nodes(&'a [Arc<Node>]),
    /// Some node serves the model, but none is healthy and undrained.
    NoneAvailable,
    /// No node in the pool serves the model.
    UnknownModel,
}

/// An immutable view of the pool. Cheap to load; never changes once built.
#[derive(Debug, Default)]
pub struct PoolSnapshot {
    generation: u64,
    nodes: Box<[Arc<Node>]>,
    eligible_any: Box<[Arc<Node>]>,
    eligible_by_model: FastMap<Arc<str>, Box<[Arc<Node>]>>,
    /// Nodes that serve any model: eligible for models no listed node names.
    eligible_wildcard: Box<[Arc<Node>]>,
    has_wildcard: bool,
    known_models: FastSet<Arc<str>>,
    capacity: usize,
}

impl PoolSnapshot {
    fn build(generation: u64, nodes: Vec<Arc<Node>>) -> Self {
        let eligible_any: Box<[Arc<Node>]> =
            nodes.iter().filter(|n| n.is_eligible()).cloned().collect();
        let has_wildcard = nodes.iter().any(|n| n.models.is_empty());
        let eligible_wildcard = eligible_any
            .iter()
            .filter(|n| n.models.is_empty())
            .cloned()
            .collect();
        let known_models: FastSet<Arc<str>> = nodes
            .iter()
            .flat_map(|n| n.models.iter().cloned())
            .collect();
        let eligible_by_model = known_models
            .iter()
            .map(|m| {
                let list: Box<[Arc<Node>]> = eligible_any
                    .iter()
                    .filter(|n| n.serves(Some(m)))
                    .cloned()
                    .collect();
                (m.clone(), list)
            })
            .collect();
        let capacity = eligible_any.iter().map(|n| n.max_concurrency).sum();
        Self {
            generation,
            nodes: nodes.into_boxed_slice(),
            eligible_any,
            eligible_by_model,
            eligible_wildcard,
            has_wildcard,
            known_models,
            capacity,
        }
    }

    /// Increases by one with every change to the pool.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// All nodes, eligible or not, in the order they were given.
    pub fn nodes(&self) -> &[Arc<Node>] {
        &self.nodes
    }

    /// Nodes that may take a request for `model` (`None`: any model).
    pub fn eligible(&self, model: Option<&str>) -> Eligible<'_> {
        let (list, known) = match model {
            // A request that names no model can never be "unknown": it waits for any node.
            None => (&self.eligible_any, true),
            Some(m) => match self.eligible_by_model.get(m) {
                Some(list) => (list, true),
                None => (&self.eligible_wildcard, self.has_wildcard),
            },
        };
        if !list.is_empty() {
            Eligible::Nodes(list)
        } else if known {
            Eligible::NoneAvailable
        } else {
            Eligible::UnknownModel
        }
    }

    /// The pool's own copy of the name `model`, if some node names it: a label or key that
    /// costs a reference count instead of a copy.
    pub fn known_model(&self, model: &str) -> Option<&Arc<str>> {
        self.known_models.get(model)
    }

    /// Every model some node names, eligible or not, sorted.
    pub fn models(&self) -> Vec<Arc<str>> {
        let mut models: Vec<_> = self.known_models.iter().cloned().collect();
        models.sort();
        models
    }

    /// Sum of max concurrency over healthy, undrained nodes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Requests holding a slot on healthy, undrained nodes.
    pub fn in_flight(&self) -> usize {
        self.eligible_any.iter().map(|n| n.state.in_flight()).sum()
    }

    /// The node with this id.
    pub fn node(&self, id: &str) -> Option<&Arc<Node>> {
        self.nodes.iter().find(|n| &*n.id == id)
    }
}

/// The pool's load, as admission control sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    /// Requests holding a slot plus requests queued for one.
    pub in_use: usize,
    /// Total slots on the nodes that may take requests.
    pub capacity: usize,
    /// How many slots were given back per second, recently (0 when unknown).
    pub release_rate: f64,
}

impl Load {
    /// `in_use / capacity`; infinite when there is no capacity.
    pub fn utilization(&self) -> f64 {
        if self.capacity == 0 {
            f64::INFINITY
        } else {
            self.in_use as f64 / self.capacity as f64
        }
    }
}

/// How the pool chooses among nodes when a layer does not bring its own ranking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotBound {
    /// Only nodes with a free slot; never exceed max concurrency.
    WithinCapacity,
    /// Any eligible node; the least loaded wins even when all are full.
    MayExceed,
}

/// Picks the node with the lowest load after adding one request, `(in_flight + 1) / max`.
/// Ties go to the earlier node in `ranked`, so a ranking decides among equals.
///
/// `already_held` names a node on which the caller holds a slot: its load is counted as is.
pub fn least_loaded<'a>(
    ranked: impl IntoIterator<Item = &'a Arc<Node>>,
    bound: SlotBound,
    already_held: Option<&NodeState>,
) -> Option<&'a Arc<Node>> {
    // With no speeds, the expected time orders nodes by `after / max` alone.
    let unmeasured = ranked.into_iter().map(|n| (n, Speed::UNMEASURED));
    quickest(unmeasured, bound, already_held)
}

/// A node's slow signals, per unit of weight, in microseconds: time to first byte and the time
/// a request holds a slot. Unmeasured ones are 0, so new nodes get tried.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Speed {
    pub(crate) ttfb: f64,
    pub(crate) latency: f64,
}

impl Speed {
    /// No measurement: nodes then order by load alone.
    const UNMEASURED: Self = Self {
        ttfb: 0.0,
        latency: 0.0,
    };

    pub(crate) fn of(node: &Node) -> Self {
        let weight = f64::from(node.weight().max(1));
        let us = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e6) / weight;
        Self {
            ttfb: us(node.state().ttfb_ewma()),
            latency: us(node.state().latency_ewma()),
        }
    }

    /// Expected time to first byte with `after` requests on a node of `max` slots: from one to
    /// two times the node's own while it has room; past that, each further `max` requests add
    /// one slot-holding time, since they queue inside the node.
    pub(crate) fn expected(self, after: usize, max: usize) -> f64 {
        // +1 µs so unmeasured nodes still order by load among themselves.
        let ttfb = self.ttfb + 1.0;
        let (after, max) = (after as f64, max as f64);
        if after <= max {
            ttfb * (max + after) / max
        } else {
            2.0 * ttfb + (after - max) / max * self.latency.max(ttfb)
        }
    }

    /// Orders choices: any node with room before any full one, then by expected time.
    fn cost(self, after: usize, max: usize) -> (bool, f64) {
        (after > max, self.expected(after, max))
    }
}

/// The candidate with room and the lowest [`Speed::expected`] time to first byte once this
/// request is on it, or if none has room the one where it queues least; the first of equals
/// wins. `held` is a slot this request already has (it does not count
/// twice). With [`SlotBound::WithinCapacity`], full nodes are skipped.
pub(crate) fn quickest<'a>(
    candidates: impl IntoIterator<Item = (&'a Arc<Node>, Speed)>,
    bound: SlotBound,
    held: Option<&NodeState>,
) -> Option<&'a Arc<Node>> {
    let mut best: Option<(&Arc<Node>, (bool, f64))> = None;
    for (node, speed) in candidates {
        let state = node.state();
        let is_held = held.is_some_and(|h| std::ptr::eq(h, &**state));
        let after = state.in_flight() + usize::from(!is_held);
        let max = node.max_concurrency().max(1);
        if bound == SlotBound::WithinCapacity && after > max {
            continue;
        }
        let cost = speed.cost(after, max);
        if best.is_none_or(|(_, best_cost)| cost < best_cost) {
            best = Some((node, cost));
        }
    }
    best.map(|(node, _)| node)
}

/// The node with room among `nodes` expected to answer first, by the speeds measured so far
/// ([`quickest`] with [`Speed::of`] and [`SlotBound::WithinCapacity`]). Speeds are read only
/// for nodes with room: a full one is passed over anyway.
fn quickest_free(nodes: &[Arc<Node>]) -> Option<&Arc<Node>> {
    let measured = nodes
        .iter()
        .filter(|n| n.has_free_slot())
        .map(|n| (n, Speed::of(n)));
    quickest(measured, SlotBound::WithinCapacity, None)
}

/// A request's claim on one slot of one node. Dropping it gives the slot back.
///
/// Moving the guard into the response body keeps the node's in-flight count up until the body
/// ends, so a long stream counts as load for its whole length.
pub struct LoadGuard {
    slot: Option<Slot>,
}

impl fmt::Debug for LoadGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadGuard")
            .field("node", &self.slot.as_ref().map(|s| &s.node.id))
            .finish()
    }
}

impl LoadGuard {
    /// The node this slot is on.
    pub fn node(&self) -> Option<&Arc<Node>> {
        self.slot.as_ref().map(|s| &s.node)
    }

    /// When the slot was taken.
    pub fn since(&self) -> Option<Instant> {
        self.slot.as_ref().map(|s| s.since)
    }

    /// Whether the slot was taken within the node's max concurrency.
    pub fn within_capacity(&self) -> bool {
        self.slot.as_ref().is_some_and(|s| s.within_capacity)
    }

    fn into_slot(mut self) -> Option<Slot> {
        self.slot.take()
    }

    /// Gives the slot back without counting it as a finished request.
    fn give_back_unused(self) {
        if let Some(slot) = self.into_slot() {
            slot.give_back();
        }
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            slot.release();
        }
    }
}

/// The node chosen for a request, carried in the request's extensions.
///
/// It owns the request's [`LoadGuard`]; the proxy moves it into the response body, so the slot
/// is held until the last byte. Cloning shares the same guard (extensions must be `Clone`); the
/// slot is given back when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct SelectedNode {
    node: Arc<Node>,
    guard: Arc<LoadGuard>,
    within_capacity: bool,
}

impl SelectedNode {
    /// Wraps a guard; `None` if the guard was already released.
    pub fn new(guard: LoadGuard) -> Option<Self> {
        let node = guard.node()?.clone();
        Some(Self {
            node,
            within_capacity: guard.within_capacity(),
            guard: Arc::new(guard),
        })
    }

    /// Moves to `guard`'s slot, giving the one held back once the new one is in place: as
    /// `*self = SelectedNode::new(guard)`, without a new allocation when no clone shares the
    /// slot. `false` (and nothing changes) if `guard` was already released.
    ///
    /// The slot given back served no request: it counts as no completion, latency or release
    /// (which the admission's release rate reads). One a clone still shares is given back, and
    /// counted, when the clone goes.
    pub(crate) fn move_to(&mut self, guard: LoadGuard) -> bool {
        let Some(node) = guard.node().cloned() else {
            return false;
        };
        self.within_capacity = guard.within_capacity();
        self.node = node;
        match Arc::get_mut(&mut self.guard) {
            Some(held) => std::mem::replace(held, guard).give_back_unused(),
            None => self.guard = Arc::new(guard),
        }
        true
    }

    /// Takes `other`'s place, giving the slot held back as [`move_to`](Self::move_to) does:
    /// counted as no finished request, unless a clone still shares it.
    pub(crate) fn replace_with(&mut self, other: SelectedNode) {
        let replaced = std::mem::replace(self, other);
        if let Ok(guard) = Arc::try_unwrap(replaced.guard) {
            guard.give_back_unused();
        }
    }

    /// The chosen node.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Whether the slot is known to be within the node's max concurrency.
    pub fn within_capacity(&self) -> bool {
        self.within_capacity
    }

    /// When the slot was taken.
    pub fn since(&self) -> Option<Instant> {
        self.guard.since()
    }
}

/// A taken slot without drop glue, so the queue can pass it on while holding its lock.
struct Slot {
    node: Arc<Node>,
    shared: Arc<Shared>,
    since: Instant,
    within_capacity: bool,
}

impl Slot {
    fn into_guard(self) -> LoadGuard {
        LoadGuard { slot: Some(self) }
    }

    /// Gives the slot back at the end of its request, which counts as one finished.
    fn release(self) {
        let state = &self.node.state;
        ewma_update(&state.latency_ewma_us, self.since.elapsed());
        state.completed.fetch_add(1, Ordering::Relaxed);
        self.shared.released.fetch_add(1, Ordering::Relaxed);
        self.give_back();
    }

    /// Gives the slot back, counting nothing.
    fn give_back(self) {
        // Give the slot back first, then look for waiters. A waiter enqueues by counting itself
        // first and then trying for a slot, so with both sides SeqCst one of the two sees the
        // other: the waiter finds this slot free, or this release finds the waiter.
        self.node.state.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.shared.waiting.load(Ordering::SeqCst) > 0 {
            self.shared.dispatch_freed(&self.node);
        }
    }
}

/// A queued request's place in line.
struct Waiter {
    seq: u64,
    tx: oneshot::Sender<LoadGuard>,
}

/// Waiters per model, in arrival order. `seq` orders them across models.
#[derive(Default)]
struct Queue {
    next_seq: u64,
    by_model: FastMap<Option<Arc<str>>, VecDeque<Waiter>>,
    len: usize,
}

struct Shared {
    snapshot: ArcSwap<PoolSnapshot>,
    /// The snapshot's generation, stored after the snapshot: a reader that only needs to know
    /// whether the nodes changed (a cached ranking) reads one atomic instead of the snapshot.
    generation: AtomicU64,
    /// Serializes writers, so that two updates never lose each other's changes.
    write: Mutex<()>,
    queue: Mutex<Queue>,
    waiting: AtomicUsize,
    released: AtomicU64,
    /// The `released` count at the release rate's last measurement; held by whoever measures.
    rate_counted: Mutex<u64>,
    /// The release rate's last value (`f64` bits) and when it was taken (nanoseconds after
    /// `rate_epoch`), read without the lock: every admission decision asks for the rate, and
    /// the lock, shared by all connection workers, would move between their cores each time.
    rate_value: AtomicU64,
    rate_taken_ns: AtomicU64,
    rate_epoch: Instant,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock leaves the queue consistent (every step is a single
        // push or pop), so a poisoned lock is safe to keep using.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot on `node` was just given back while requests wait: hand it to the oldest waiter
    /// that can use it.
    fn dispatch_freed(self: &Arc<Self>, node: &Arc<Node>) {
        let snapshot = self.snapshot.load();
        let Some(current) = snapshot
            .eligible_any
            .iter()
            .find(|n| Arc::ptr_eq(&n.state, &node.state))
        else {
            return; // The node left the pool or stopped taking requests.
        };
        let mut queue = self.queue();
        while let Some(key) = queue.oldest_for(current) {
            if !current.try_take_slot() {
                return; // Someone else took it; the next release will try again.
            }
            let slot = Slot {
                node: current.clone(),
                shared: self.clone(),
                since: Instant::now(),
                within_capacity: true,
            };
            if let Err(slot) = queue.hand_to_oldest(&key, slot, &self.waiting) {
                // That waiter had gone; try the next one with the same slot.
                current.state.in_flight.fetch_sub(1, Ordering::SeqCst);
                drop(slot);
                continue;
            }
            return;
        }
    }

    /// Capacity may have grown (new or recovered node): serve waiters while slots are free.
    fn dispatch_all(self: &Arc<Self>) {
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut queue = self.queue();
        // Read under the queue lock: a line is dropped on what this snapshot says, so it must
        // not be older than a writer that ran before us.
        let snapshot = self.snapshot.load();
        let mut full: Vec<Option<Arc<str>>> = Vec::new();
        loop {
            let Some(key) = queue.oldest_excluding(&full) else {
                return;
            };
            let eligible = match snapshot.eligible(key.as_deref()) {
                Eligible::Nodes(list) => list,
                // No node may take this model's requests now (all down, draining or gone):
                // waiting would only end in a timeout, so its waiters are answered at once.
                Eligible::NoneAvailable | Eligible::UnknownModel => {
                    queue.drop_line(&key, &self.waiting);
                    continue;
                }
            };
            // The rule a request that finds a free slot at once is given (`try_acquire_free`).
            let Some(node) = quickest_free(eligible) else {
                full.push(key);
                continue;
            };
            if !node.try_take_slot() {
                continue;
            }
            let slot = Slot {
                node: node.clone(),
                shared: self.clone(),
                since: Instant::now(),
                within_capacity: true,
            };
            if let Err(slot) = queue.hand_to_oldest(&key, slot, &self.waiting) {
                node.state.in_flight.fetch_sub(1, Ordering::SeqCst);
                drop(slot);
            }
        }
    }
}

impl Queue {
    /// The model key of the oldest live waiter that `node` can serve.
    fn oldest_for(&mut self, node: &Node) -> Option<Option<Arc<str>>> {
        self.prune();
        self.by_model
            .iter()
            .filter(|(k, q)| !q.is_empty() && node.serves(k.as_deref()))
            .min_by_key(|(_, q)| q.front().map_or(u64::MAX, |w| w.seq))
            .map(|(k, _)| k.clone())
    }

    fn oldest_excluding(&mut self, skip: &[Option<Arc<str>>]) -> Option<Option<Arc<str>>> {
        self.prune();
        self.by_model
            .iter()
            .filter(|(k, q)| !q.is_empty() && !skip.contains(k))
            .min_by_key(|(_, q)| q.front().map_or(u64::MAX, |w| w.seq))
            .map(|(k, _)| k.clone())
    }

    /// Drops waiters at the front whose receiver is gone (their entry is removed on drop too;
    /// this only catches the moment between a cancel and its cleanup).
    fn prune(&mut self) {
        self.by_model.retain(|_, q| {
            while q.front().is_some_and(|w| w.tx.is_closed()) {
                q.pop_front();
            }
            !q.is_empty()
        });
    }

    /// Forgets `key`'s line once nobody is in it: model names come from clients (any name a
    /// wildcard node makes eligible), so empty lines must not pile up.
    fn forget_if_empty(&mut self, key: &Option<Arc<str>>) {
        if self.by_model.get(key).is_some_and(VecDeque::is_empty) {
            self.by_model.remove(key);
        }
    }

    fn hand_to_oldest(
        &mut self,
        key: &Option<Arc<str>>,
        slot: Slot,
        waiting: &AtomicUsize,
    ) -> Result<(), Slot> {
        let Some(waiter) = self.by_model.get_mut(key).and_then(VecDeque::pop_front) else {
            return Err(slot);
        };
        self.forget_if_empty(key);
        self.len -= 1;
        waiting.fetch_sub(1, Ordering::SeqCst);
        match waiter.tx.send(slot.into_guard()) {
            Ok(()) => Ok(()),
            // The waiter is gone. Take the slot back without running its release, which would
            // take the queue lock we hold.
            Err(guard) => guard.into_slot().map_or(Ok(()), Err),
        }
    }

    /// Drops every waiter for `key`: each sees its place dropped without a slot.
    fn drop_line(&mut self, key: &Option<Arc<str>>, waiting: &AtomicUsize) {
        if let Some(line) = self.by_model.remove(key) {
            self.len -= line.len();
            waiting.fetch_sub(line.len(), Ordering::SeqCst);
        }
    }

    fn remove(&mut self, key: &Option<Arc<str>>, seq: u64, waiting: &AtomicUsize) {
        if let Some(q) = self.by_model.get_mut(key)
            && let Some(pos) = q.iter().position(|w| w.seq == seq)
        {
            q.remove(pos);
            self.len -= 1;
            waiting.fetch_sub(1, Ordering::SeqCst);
            self.forget_if_empty(key);
        }
    }
}

/// How often the release rate is measured again, so that it reflects a window, not one
/// release.
const RATE_WINDOW: Duration = Duration::from_millis(250);

/// The shared node pool. Cloning is cheap; all clones see the same nodes and load.
#[derive(Clone)]
pub struct NodePool {
    shared: Arc<Shared>,
}

impl fmt::Debug for NodePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodePool")
            .field("snapshot", &self.shared.snapshot.load())
            .field("waiting", &self.waiting())
            .finish()
    }
}

impl Default for NodePool {
    fn default() -> Self {
        let now = Instant::now();
        Self {
            shared: Arc::new(Shared {
                snapshot: ArcSwap::from_pointee(PoolSnapshot::default()),
                generation: AtomicU64::new(0),
                write: Mutex::new(()),
                queue: Mutex::new(Queue::default()),
                waiting: AtomicUsize::new(0),
                released: AtomicU64::new(0),
                rate_counted: Mutex::new(0),
                rate_value: AtomicU64::new(0.0f64.to_bits()),
                rate_taken_ns: AtomicU64::new(0),
                rate_epoch: now,
            }),
        }
    }
}

/// What a waiter got from [`NodePool::enqueue`].
pub(crate) enum Enqueued {
    /// A slot was free after all.
    Ready(LoadGuard),
    /// In line; the guard arrives on the receiver.
    Waiting(QueueEntry),
    /// The line is full.
    Full,
    /// No node may take the model's requests now (down, draining or gone).
    NoneAvailable,
    /// No node serves the model.
    UnknownModel,
}

/// A place in the slot queue. Dropping it leaves the queue.
pub(crate) struct QueueEntry {
    shared: Arc<Shared>,
    key: Option<Arc<str>>,
    seq: u64,
    pub(crate) rx: oneshot::Receiver<LoadGuard>,
}

impl Drop for QueueEntry {
    fn drop(&mut self) {
        self.shared
            .queue()
            .remove(&self.key, self.seq, &self.shared.waiting);
        // A guard already sent to us is dropped with `rx` after the lock is released, which
        // passes the slot on to the next waiter.
    }
}

impl NodePool {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// A pool holding these nodes.
    pub fn from_specs(specs: impl IntoIterator<Item = NodeSpec>) -> Result<Self, NodeSpecError> {
        let pool = Self::new();
        pool.set_nodes(specs)?;
        Ok(pool)
    }

    /// The current snapshot. Lock-free.
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<PoolSnapshot>> {
        self.shared.snapshot.load()
    }

    /// The current snapshot's [`generation`](PoolSnapshot::generation), without loading it. It
    /// may lag a snapshot being stored by a moment, never lead it.
    pub(crate) fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    /// Publishes `snapshot`; the caller holds the write lock.
    fn store(&self, snapshot: PoolSnapshot) {
        let generation = snapshot.generation;
        self.shared.snapshot.store(Arc::new(snapshot));
        self.shared.generation.store(generation, Ordering::Release);
    }

    /// Requests queued for a slot.
    pub fn waiting(&self) -> usize {
        self.shared.waiting.load(Ordering::SeqCst)
    }

    /// Replaces the set of nodes. Nodes whose id stays keep their live state and in-flight count.
    pub fn set_nodes(
        &self,
        specs: impl IntoIterator<Item = NodeSpec>,
    ) -> Result<(), NodeSpecError> {
        let _write = self.shared.write.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.shared.snapshot.load();
        let mut nodes = Vec::new();
        for spec in specs {
            if nodes.iter().any(|n: &Arc<Node>| *n.id == *spec.id) {
                return Err(NodeSpecError::DuplicateId(spec.id));
            }
            let state = old
                .node(&spec.id)
                .map(|n| n.state.clone())
                .unwrap_or_default();
            nodes.push(Arc::new(Node::from_spec(&spec, state)?));
        }
        self.store(PoolSnapshot::build(old.generation + 1, nodes));
        drop(_write);
        self.shared.dispatch_all();
        Ok(())
    }

    /// Changes one node's description (health, draining, models...). Returns false if no node
    /// has that id.
    pub fn update_node(&self, id: &str, change: impl FnOnce(&mut NodeSpec)) -> bool {
        let _write = self.shared.write.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.shared.snapshot.load();
        let mut change = Some(change);
        let mut found = false;
        let mut nodes = Vec::with_capacity(old.nodes.len());
        for n in old.nodes.iter() {
            if &*n.id != id {
                nodes.push(n.clone());
                continue;
            }
            let mut spec = n.to_spec();
            if let Some(change) = change.take() {
                change(&mut spec);
            }
            // The key is not part of `to_spec`; keep the node's own.
            let mut updated = match Node::from_spec(&spec, n.state.clone()) {
                Ok(u) => u,
                Err(_) => return false,
            };
            updated.authorization = n.authorization.clone();
            nodes.push(Arc::new(updated));
            found = true;
        }
        if found {
            self.store(PoolSnapshot::build(old.generation + 1, nodes));
        }
        drop(_write);
        if found {
            self.shared.dispatch_all();
        }
        found
    }

    /// Marks a node healthy or not.
    pub fn set_healthy(&self, id: &str, healthy: bool) -> bool {
        self.update_node(id, |s| s.healthy = healthy)
    }

    /// Marks a node draining or not.
    pub fn set_draining(&self, id: &str, draining: bool) -> bool {
        self.update_node(id, |s| s.draining = draining)
    }

    /// Current load for admission control.
    pub fn load(&self) -> Load {
        let snapshot = self.snapshot();
        Load {
            in_use: snapshot.in_flight() + self.waiting(),
            capacity: snapshot.capacity(),
            release_rate: self.release_rate(),
        }
    }

    /// Slots given back per second, smoothed over the last few seconds: measured at most once
    /// every 250 ms, so that it reflects a window, not one release.
    pub fn release_rate(&self) -> f64 {
        let shared = &*self.shared;
        let now_ns = u64::try_from(
            Instant::now()
                .saturating_duration_since(shared.rate_epoch)
                .as_nanos(),
        )
        .unwrap_or(u64::MAX);
        let window_ns = RATE_WINDOW.as_nanos() as u64;
        // The time first: a value read after it is at least as new as that time.
        let last_measurement = || {
            let taken_ns = shared.rate_taken_ns.load(Ordering::Acquire);
            let value = f64::from_bits(shared.rate_value.load(Ordering::Acquire));
            (taken_ns, value)
        };
        let (taken_ns, last) = last_measurement();
        if now_ns < taken_ns.saturating_add(window_ns) {
            return last;
        }
        let mut counted = match shared.rate_counted.try_lock() {
            Ok(counted) => counted,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            // Another thread is measuring it: its last value, without waiting.
            Err(std::sync::TryLockError::WouldBlock) => return last,
        };
        // Measured by another thread between the check and the lock.
        let (taken_ns, last) = last_measurement();
        if now_ns < taken_ns.saturating_add(window_ns) {
            return last;
        }
        let elapsed = (now_ns - taken_ns) as f64 / 1e9;
        let count = shared.released.load(Ordering::Relaxed);
        let sample = (count - *counted) as f64 / elapsed;
        let per_sec = if last == 0.0 {
            sample
        } else {
            0.5 * last + 0.5 * sample
        };
        *counted = count;
        shared
            .rate_value
            .store(per_sec.to_bits(), Ordering::Release);
        shared.rate_taken_ns.store(now_ns, Ordering::Release);
        per_sec
    }

    /// Takes a slot on `node` (from this pool's snapshot).
    pub fn acquire(&self, node: &Arc<Node>, bound: SlotBound) -> Option<LoadGuard> {
        let within_capacity = match bound {
            SlotBound::WithinCapacity => {
                if !node.try_take_slot() {
                    return None;
                }
                true
            }
            SlotBound::MayExceed => node.take_slot_unbounded(),
        };
        Some(
            Slot {
                node: node.clone(),
                shared: self.shared.clone(),
                since: Instant::now(),
                within_capacity,
            }
            .into_guard(),
        )
    }

    /// Takes a free slot on the node eligible for `model` that is expected to answer first (its
    /// load over its capacity, weighed by its measured time to first byte), if any is free.
    ///
    /// The rule [`CachedSelectLayer`](crate::cached_select::CachedSelectLayer) applies (here
    /// over every eligible node, with their speeds as of now rather than its cached ranking's),
    /// so that a selection after this one mostly keeps the slot rather than taking another and
    /// giving this one back. A node not measured yet counts as quickest, so new nodes get
    /// tried.
    pub fn try_acquire_free(&self, model: Option<&str>) -> Option<LoadGuard> {
        self.try_acquire_free_in(&self.snapshot(), model)
    }

    /// [`try_acquire_free`](Self::try_acquire_free) among `snapshot`'s nodes, for a caller that
    /// has loaded the snapshot already.
    pub(crate) fn try_acquire_free_in(
        &self,
        snapshot: &PoolSnapshot,
        model: Option<&str>,
    ) -> Option<LoadGuard> {
        let Eligible::Nodes(nodes) = snapshot.eligible(model) else {
            return None;
        };
        // Two tries: a node picked as free can fill up before we take it.
        for _ in 0..2 {
            let node = quickest_free(nodes)?;
            if let Some(guard) = self.acquire(node, SlotBound::WithinCapacity) {
                return Some(guard);
            }
        }
        None
    }

    /// Queues for a slot unless one is free now. `max_waiters` bounds the queue.
    pub(crate) fn enqueue(&self, model: Option<&str>, max_waiters: usize) -> Enqueued {
        let key: Option<Arc<str>> = model.map(Arc::from);
        let mut queue = self.shared.queue();
        // Waiters for this model go first; a newcomer only takes a free slot when none wait.
        let line_empty = queue.by_model.get(&key).is_none_or(VecDeque::is_empty);
        // Count ourselves before looking for a slot (see `Slot::release`).
        self.shared.waiting.fetch_add(1, Ordering::SeqCst);
        // And before looking at the nodes: a writer that took the last node away checks for
        // waiters after storing its snapshot, so either it finds us and drops our line, or we
        // see its snapshot here, and do not wait for a slot that cannot come.
        let snapshot = self.snapshot();
        let unavailable = match snapshot.eligible(model) {
            Eligible::Nodes(_) => None,
            Eligible::NoneAvailable => Some(Enqueued::NoneAvailable),
            Eligible::UnknownModel => Some(Enqueued::UnknownModel),
        };
        if let Some(unavailable) = unavailable {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            return unavailable;
        }
        if line_empty && let Some(guard) = self.try_acquire_free_in(&snapshot, model) {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            return Enqueued::Ready(guard);
        }
        if queue.len >= max_waiters {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            return Enqueued::Full;
        }
        let (tx, rx) = oneshot::channel();
        let seq = queue.next_seq;
        queue.next_seq += 1;
        queue
            .by_model
            .entry(key.clone())
            .or_default()
            .push_back(Waiter { seq, tx });
        queue.len += 1;
        Enqueued::Waiting(QueueEntry {
            shared: self.shared.clone(),
            key,
            seq,
            rx,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, models: &[&str], max: usize) -> NodeSpec {
        NodeSpec::new(id, format!("http://127.0.0.1:1/{id}"))
            .models(models.iter().copied())
            .max_concurrency(max)
    }

    #[test]
    fn eligibility_separates_unknown_models_from_unavailable_ones() {
        let pool = NodePool::from_specs([spec("a", &["m1"], 1), spec("b", &["m2"], 1)]).unwrap();
        assert!(matches!(pool.snapshot().eligible(Some("m1")), Eligible::Nodes(n) if n.len() == 1));
        assert!(matches!(
            pool.snapshot().eligible(Some("nope")),
            Eligible::UnknownModel
        ));
        pool.set_healthy("a", false);
        assert!(matches!(
            pool.snapshot().eligible(Some("m1")),
            Eligible::NoneAvailable
        ));
        assert_eq!(pool.snapshot().capacity(), 1);
    }

    #[test]
    fn lines_for_models_no_one_waits_for_are_forgotten() {
        // A node without a model list serves any name a client sends.
        let pool = NodePool::from_specs([spec("any", &[], 1)]).unwrap();
        let _busy = pool.try_acquire_free(Some("x")).unwrap();
        let mut entries = Vec::new();
        for i in 0..50 {
            match pool.enqueue(Some(&format!("model-{i}")), 100) {
                Enqueued::Waiting(entry) => entries.push(entry),
                _ => panic!("the only slot is taken: the request waits"),
            }
        }
        assert_eq!(pool.shared.queue().by_model.len(), 50);
        entries.truncate(10);
        assert_eq!(pool.shared.queue().by_model.len(), 10, "left: lines gone");
        drop(_busy);
        assert_eq!(
            pool.shared.queue().by_model.len(),
            9,
            "served: its line gone"
        );
        drop(entries);
        assert!(pool.shared.queue().by_model.is_empty());
    }

    #[test]
    fn a_selected_node_moves_to_another_slot_and_gives_the_old_one_back() {
        let pool = NodePool::from_specs([spec("a", &["m"], 2), spec("b", &["m"], 2)]).unwrap();
        let snapshot = pool.snapshot();
        let (a, b) = (snapshot.node("a").unwrap(), snapshot.node("b").unwrap());
        let in_flight = || (a.state().in_flight(), b.state().in_flight());
        let mut selected =
            SelectedNode::new(pool.acquire(a, SlotBound::WithinCapacity).unwrap()).unwrap();
        assert!(selected.move_to(pool.acquire(b, SlotBound::WithinCapacity).unwrap()));
        assert_eq!(selected.node().id(), "b");
        assert_eq!(in_flight(), (0, 1), "a's slot given back at once");
        // It served no request.
        assert_eq!(a.state().completed(), 0);
        assert_eq!(a.state().latency_ewma(), None);
        assert_eq!(pool.shared.released.load(Ordering::Relaxed), 0);

        // A clone still shares b's slot: it is given back when the clone goes.
        let clone = selected.clone();
        assert!(selected.move_to(pool.acquire(a, SlotBound::WithinCapacity).unwrap()));
        assert_eq!(selected.node().id(), "a");
        assert_eq!(in_flight(), (1, 1));
        drop(clone);
        assert_eq!(in_flight(), (1, 0));
        drop(selected);
        assert_eq!(in_flight(), (0, 0));
        assert_eq!((a.state().completed(), b.state().completed()), (1, 1));
        assert_eq!(pool.shared.released.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_selected_node_replaced_by_another_gives_its_slot_back_uncounted() {
        let pool = NodePool::from_specs([spec("a", &["m"], 1), spec("b", &["m"], 1)]).unwrap();
        let snapshot = pool.snapshot();
        let (a, b) = (snapshot.node("a").unwrap(), snapshot.node("b").unwrap());
        let select = |node| SelectedNode::new(pool.acquire(node, SlotBound::MayExceed).unwrap());
        let mut selected = select(a).unwrap();
        selected.replace_with(select(b).unwrap());
        assert_eq!(selected.node().id(), "b");
        assert_eq!(a.state().in_flight(), 0);
        assert_eq!(a.state().completed(), 0, "a's slot served no request");
        assert_eq!(pool.shared.released.load(Ordering::Relaxed), 0);

        // Shared with a clone: given back, and counted, when the clone goes.
        let clone = selected.clone();
        selected.replace_with(select(a).unwrap());
        assert_eq!(b.state().in_flight(), 1);
        drop(clone);
        assert_eq!((b.state().in_flight(), b.state().completed()), (0, 1));
    }

    #[test]
    fn a_request_does_not_wait_in_line_for_nodes_that_cannot_take_it() {
        let pool = NodePool::from_specs([spec("a", &["m"], 1)]).unwrap();
        let _busy = pool.try_acquire_free(Some("m")).unwrap();
        assert!(matches!(pool.enqueue(Some("m"), 10), Enqueued::Waiting(_)));
        // The last node goes as a request comes: it is answered at once, not left waiting.
        pool.set_healthy("a", false);
        assert!(matches!(
            pool.enqueue(Some("m"), 10),
            Enqueued::NoneAvailable
        ));
        assert!(matches!(
            pool.enqueue(Some("x"), 10),
            Enqueued::UnknownModel
        ));
        assert_eq!(pool.waiting(), 0, "the ones turned away are not counted");
    }

    #[test]
    fn a_free_slot_is_taken_on_the_node_expected_to_answer_first() {
        let pool =
            NodePool::from_specs([spec("slow", &["m"], 4), spec("fast", &["m"], 4)]).unwrap();
        let snapshot = pool.snapshot();
        let [slow, fast] = [0, 1].map(|i| snapshot.nodes()[i].clone());
        slow.state().record_ttfb(Duration::from_millis(200));
        fast.state().record_ttfb(Duration::from_millis(20));
        let id = |g: &LoadGuard| g.node().unwrap().id().to_owned();
        let held: Vec<_> = (0..4)
            .map(|_| pool.try_acquire_free(Some("m")).unwrap())
            .collect();
        // The fast node, until its load outweighs ten times the speed: a full node of four
        // slots expects 2 × 20 ms, still less than the 250 (5/4 × 200) of an idle slow one.
        assert!(
            held.iter().all(|g| id(g) == "fast"),
            "{:?}",
            held.iter().map(id).collect::<Vec<_>>()
        );
        assert_eq!(
            id(&pool.try_acquire_free(Some("m")).unwrap()),
            "slow",
            "the fast one is full"
        );
    }

    #[test]
    fn a_waiter_given_a_slot_when_capacity_grows_gets_the_quickest_node() {
        let down = |id, max| NodeSpec {
            healthy: false,
            ..spec(id, &["m"], max)
        };
        let pool =
            NodePool::from_specs([spec("busy", &["m"], 1), down("slow", 4), down("fast", 4)])
                .unwrap();
        let snapshot = pool.snapshot();
        snapshot.nodes()[1]
            .state()
            .record_ttfb(Duration::from_millis(200));
        snapshot.nodes()[2]
            .state()
            .record_ttfb(Duration::from_millis(20));
        let _busy = pool.try_acquire_free(Some("m")).unwrap();
        let Enqueued::Waiting(mut entry) = pool.enqueue(Some("m"), 10) else {
            panic!("the only healthy slot is taken: the request waits");
        };
        // Both come back in one change, so one pick decides between them; each keeps its
        // measured speed. "slow" is listed first: by load alone the tie would go to it.
        pool.set_nodes([
            spec("busy", &["m"], 1),
            spec("slow", &["m"], 4),
            spec("fast", &["m"], 4),
        ])
        .unwrap();
        let guard = entry
            .rx
            .try_recv()
            .expect("capacity grew: the waiter has a slot");
        assert_eq!(guard.node().unwrap().id(), "fast");
    }

    #[test]
    fn bounded_acquire_never_exceeds_max_concurrency() {
        let pool = NodePool::from_specs([spec("a", &["m"], 2)]).unwrap();
        let g1 = pool.try_acquire_free(Some("m")).unwrap();
        let _g2 = pool.try_acquire_free(Some("m")).unwrap();
        assert!(pool.try_acquire_free(Some("m")).is_none());
        drop(g1);
        assert!(pool.try_acquire_free(Some("m")).is_some());
    }

    #[test]
    fn the_release_rate_is_measured_once_a_window_and_read_without_the_lock_between() {
        let made = Instant::now();
        let pool = NodePool::from_specs([spec("a", &["m"], 1000)]).unwrap();
        let release = |n| {
            for _ in 0..n {
                drop(pool.try_acquire_free(Some("m")).unwrap());
            }
        };
        let later = || std::thread::sleep(RATE_WINDOW + Duration::from_millis(20));
        // What holds within a window is asserted only when the calls did fall within it, so
        // that a machine that stalls for a window does not fail the test.
        let within = |since: Instant| since.elapsed() < RATE_WINDOW;
        release(100);
        let rate = pool.release_rate();
        if within(made) {
            assert_eq!(rate, 0.0, "nothing is measured in the first window");
        }
        later();
        let measured = Instant::now();
        let first = pool.release_rate();
        // 100 releases since the pool was made, more than a window ago.
        let most = 100.0 / RATE_WINDOW.as_secs_f64();
        assert!(first > 0.0 && first < most, "{first}");
        release(100);
        let rate = pool.release_rate();
        if within(measured) {
            assert_eq!(rate, first, "the window after a measurement reads it");
        }
        // While another thread holds the meter, a caller gets the last value and does not wait.
        let last = f64::from_bits(pool.shared.rate_value.load(Ordering::Acquire));
        let measuring = pool.shared.rate_counted.lock().unwrap();
        later();
        assert_eq!(pool.release_rate(), last);
        drop(measuring);
        let taken = pool.shared.rate_taken_ns.load(Ordering::Acquire);
        let second = pool.release_rate();
        assert!(second > 0.0, "{second}");
        assert!(
            pool.shared.rate_taken_ns.load(Ordering::Acquire) > taken,
            "measured again"
        );
    }

    #[test]
    fn in_flight_survives_a_pool_update() {
        let pool = NodePool::from_specs([spec("a", &["m"], 2)]).unwrap();
        let guard = pool.try_acquire_free(Some("m")).unwrap();
        pool.set_nodes([spec("a", &["m"], 4), spec("b", &["m"], 4)])
            .unwrap();
        assert_eq!(pool.snapshot().node("a").unwrap().state().in_flight(), 1);
        drop(guard);
        assert_eq!(pool.snapshot().node("a").unwrap().state().in_flight(), 0);
    }

    #[test]
    fn least_loaded_weighs_load_by_capacity_and_breaks_ties_by_rank() {
        let pool = NodePool::from_specs([spec("a", &[], 2), spec("b", &[], 8)]).unwrap();
        let snap = pool.snapshot();
        let nodes = snap.nodes();
        // Idle: adding one costs 1/2 on a and 1/8 on b.
        assert_eq!(
            least_loaded(nodes, SlotBound::WithinCapacity, None)
                .unwrap()
                .id(),
            "b"
        );
        let same = NodePool::from_specs([spec("x", &[], 4), spec("y", &[], 4)]).unwrap();
        let snap2 = same.snapshot();
        assert_eq!(
            least_loaded(snap2.nodes(), SlotBound::MayExceed, None)
                .unwrap()
                .id(),
            "x"
        );
    }

    #[test]
    fn rejects_bad_specs() {
        assert!(matches!(
            NodePool::from_specs([NodeSpec::new("a", "ftp://x")]),
            Err(NodeSpecError::BadUrl { .. })
        ));
        assert!(matches!(
            NodePool::from_specs([NodeSpec::new("a", "http://x").max_concurrency(0)]),
            Err(NodeSpecError::ZeroCapacity { .. })
        ));
        assert!(matches!(
            NodePool::from_specs([
                NodeSpec::new("a", "http://x"),
                NodeSpec::new("a", "http://y")
            ]),
            Err(NodeSpecError::DuplicateId(_))
        ));
    }

    #[test]
    fn uri_keeps_the_path_prefix() {
        let pool = NodePool::from_specs([NodeSpec::new("a", "http://h:9/base/")]).unwrap();
        let uri = pool.snapshot().nodes()[0]
            .uri_for("/v1/models?x=1")
            .unwrap();
        assert_eq!(uri.to_string(), "http://h:9/base/v1/models?x=1");
    }
}
