//! The node registry: which nodes exist, where they came from, and whether they may take
//! requests.
//!
//! Nodes come from the config, register themselves (`POST /api/nodes` with the registration
//! secret, then heartbeats with the token they got), or are added by an operator. The registry
//! owns their descriptions and publishes them to the [`NodePool`] the layers read; only the
//! registry writes to the pool.
//!
//! A node may take requests when its models are known, it is not ejected, it is not draining,
//! and (for registered nodes) its last heartbeat is recent. Ejection happens after
//! `failures_to_eject` failures in a row, counted from active checks (`GET /health`) and from
//! proxied requests (connect errors, timeouts, 5xx), whichever comes first. An ejected node is
//! probed again after a backoff that doubles on each failed probe, up to `eject_max_ms`, and
//! comes back after one good probe.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use layers::{NodePool, NodeSpec};
use serde::Serialize;

use crate::auth::{Digest32, constant_time_eq, digest};
use crate::config::HealthConfig;
use crate::discovery::{check_health, discover_models};

/// Where a node came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeSource {
    /// The config file (or `--upstream`, or `--demo`).
    Config,
    /// It registered itself with the registration secret.
    Registered,
    /// An operator added it through the admin API.
    Admin,
}

/// What [`Registry::sync_config_nodes`] changed, by node id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NodeChanges {
    /// New nodes.
    pub added: Vec<String>,
    /// Nodes whose URL, models, capacity, weight or key changed.
    pub updated: Vec<String>,
    /// Nodes no longer in the file.
    pub removed: Vec<String>,
}

/// Why a registry change was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    /// No node has this id.
    #[error("no node with id {0:?}")]
    UnknownNode(String),
    /// The id is taken.
    #[error("a node with id {0:?} already exists")]
    Conflict(String),
    /// The description is not valid.
    #[error("{0}")]
    Invalid(String),
    /// The token does not belong to the node.
    #[error("invalid node token")]
    BadToken,
}

/// A node as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    /// Id.
    pub id: String,
    /// Base URL.
    pub url: String,
    /// Models served.
    pub models: Vec<String>,
    /// Slots.
    pub max_concurrency: usize,
    /// Weight.
    pub weight: u32,
    /// May take requests (apart from draining).
    pub healthy: bool,
    /// Finishing its requests, taking no new ones.
    pub draining: bool,
    /// Requests holding a slot now.
    pub in_flight: usize,
    /// Where it came from.
    pub source: NodeSource,
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// Time to first byte average, ms.
    pub ttfb_ewma_ms: Option<f64>,
    /// Whole-request latency average, ms.
    pub latency_ewma_ms: Option<f64>,
    /// Last heartbeat, unix ms.
    pub last_heartbeat_ms: Option<u64>,
}

struct Entry {
    spec: NodeSpec,
    source: NodeSource,
    token: Option<Digest32>,
    models_known: bool,
    last_heartbeat: Option<(Instant, u64)>,
    check_failures: u32,
    ejected_until: Option<Instant>,
    backoff: Duration,
    next_check: Instant,
}

impl Entry {
    fn new(spec: NodeSpec, source: NodeSource, token: Option<Digest32>, now: Instant) -> Self {
        let models_known = !spec.models.is_empty();
        let last_heartbeat = (source == NodeSource::Registered).then(|| (now, unix_ms()));
        Self {
            spec,
            source,
            token,
            models_known,
            last_heartbeat,
            check_failures: 0,
            ejected_until: None,
            backoff: Duration::ZERO,
            next_check: now,
        }
    }

    fn usable(&self, config: &HealthConfig, now: Instant) -> bool {
        let heartbeat_fresh = match (self.source, self.last_heartbeat) {
            (NodeSource::Registered, Some((at, _))) => {
                now.duration_since(at) < Duration::from_millis(config.heartbeat_timeout_ms)
            }
            (NodeSource::Registered, None) => false,
            _ => true,
        };
        self.models_known && self.ejected_until.is_none() && heartbeat_fresh
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The registry; see the module docs.
pub struct Registry {
    pool: NodePool,
    http: reqwest::Client,
    config: HealthConfig,
    entries: Mutex<Vec<Entry>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("pool", &self.pool)
            .finish()
    }
}

impl Registry {
    /// A registry publishing to `pool`.
    pub fn new(pool: NodePool, config: HealthConfig) -> Self {
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .build()
            .unwrap_or_default();
        Self {
            pool,
            http,
            config,
            entries: Mutex::new(Vec::new()),
        }
    }

    /// The pool this registry publishes to.
    pub fn pool(&self) -> &NodePool {
        &self.pool
    }

    /// The health settings.
    pub fn config(&self) -> &HealthConfig {
        &self.config
    }

    fn entries(&self) -> MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes the entries to the pool. Called with the lock held, so publications never
    /// interleave.
    fn publish(&self, entries: &[Entry]) {
        let now = Instant::now();
        let specs = entries.iter().map(|e| NodeSpec {
            healthy: e.usable(&self.config, now),
            ..e.spec.clone()
        });
        if let Err(error) = self.pool.set_nodes(specs) {
            // Specs are validated on the way in, so this means a bug; keep the old pool.
            tracing::error!(%error, "could not publish the node registry");
        }
    }

    /// Adds a node. Without models, they are discovered first; a node whose models cannot be
    /// read is kept but takes no requests until a later check reads them.
    pub async fn add(
        &self,
        mut spec: NodeSpec,
        source: NodeSource,
        token: Option<&str>,
    ) -> Result<(), RegistryError> {
        NodePool::from_specs([spec.clone()]).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        if self.entries().iter().any(|e| e.spec.id == spec.id) {
            return Err(RegistryError::Conflict(spec.id));
        }
        if spec.models.is_empty() {
            self.discover_into(&mut spec).await;
        }
        let mut entries = self.entries();
        if entries.iter().any(|e| e.spec.id == spec.id) {
            return Err(RegistryError::Conflict(spec.id));
        }
        tracing::info!(node = spec.id, ?source, models = ?spec.models, "node added");
        entries.push(Entry::new(spec, source, token.map(digest), Instant::now()));
        self.publish(&entries);
        Ok(())
    }

    /// Fills in `spec`'s models from the node; a node whose models cannot be read keeps none.
    async fn discover_into(&self, spec: &mut NodeSpec) {
        match self.discover(spec).await {
            Ok(models) => spec.models = models,
            Err(error) => tracing::warn!(node = spec.id, %error,
                "could not read the node's models; it takes no requests until they can be read"),
        }
    }

    async fn discover(
        &self,
        spec: &NodeSpec,
    ) -> Result<Vec<String>, crate::discovery::DiscoveryError> {
        let models = discover_models(
            &self.http,
            &spec.base_url,
            spec.api_key.as_deref(),
            Duration::from_millis(self.config.timeout_ms),
        )
        .await?;
        if models.is_empty() {
            return Err(crate::discovery::DiscoveryError::BadAnswer(
                "an empty model list".into(),
            ));
        }
        Ok(models)
    }

    /// Makes the nodes that came from the config file match `specs`, in one step: `previous`
    /// are the ids the file gave before. Nodes that stay keep their load, health and
    /// discovered models (a node moved to another URL starts over on both); nodes from elsewhere
    /// (registered, added by an operator, `--upstream`) are left alone, and a file node may not
    /// take the id of one of them.
    pub async fn sync_config_nodes(
        &self,
        previous: &[String],
        mut specs: Vec<NodeSpec>,
    ) -> Result<NodeChanges, RegistryError> {
        NodePool::from_specs(specs.clone()).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        // Models read from a node stay with its URL: a node that is new, or moved to another
        // URL, has its models read (again) unless the file names them.
        let known: Vec<(String, String)> = self
            .entries()
            .iter()
            .map(|e| (e.spec.id.clone(), e.spec.base_url.clone()))
            .collect();
        // All at once: a reload that names several unreachable nodes waits one timeout.
        let to_discover = specs.iter_mut().filter(|spec| {
            let unmoved = known
                .iter()
                .any(|(id, url)| *id == spec.id && *url == spec.base_url);
            spec.models.is_empty() && !unmoved
        });
        futures_util::future::join_all(to_discover.map(|spec| self.discover_into(spec))).await;
        let mut entries = self.entries();
        let from_file = |e: &Entry| e.source == NodeSource::Config && previous.contains(&e.spec.id);
        if let Some(taken) = specs
            .iter()
            .find(|s| entries.iter().any(|e| e.spec.id == s.id && !from_file(e)))
        {
            return Err(RegistryError::Conflict(taken.id.clone()));
        }
        let mut changes = NodeChanges::default();
        entries.retain(|e| {
            let gone = from_file(e) && !specs.iter().any(|s| s.id == e.spec.id);
            if gone {
                changes.removed.push(e.spec.id.clone());
            }
            !gone
        });
        let now = Instant::now();
        for mut spec in specs {
            match entries.iter_mut().find(|e| e.spec.id == spec.id) {
                Some(entry) => {
                    let moved = spec.base_url != entry.spec.base_url;
                    if spec.models.is_empty() && !moved {
                        spec.models = entry.spec.models.clone();
                    }
                    spec.draining = entry.spec.draining;
                    spec.healthy = entry.spec.healthy;
                    if moved {
                        // What the checks learned was about the old address.
                        entry.check_failures = 0;
                        entry.ejected_until = None;
                        entry.backoff = Duration::ZERO;
                        entry.next_check = now;
                        if let Some(node) = self.pool.snapshot().node(&spec.id) {
                            node.state().record_success();
                        }
                    }
                    if spec != entry.spec {
                        changes.updated.push(spec.id.clone());
                        entry.models_known = !spec.models.is_empty();
                        entry.spec = spec;
                    }
                }
                None => {
                    changes.added.push(spec.id.clone());
                    entries.push(Entry::new(spec, NodeSource::Config, None, now));
                }
            }
        }
        tracing::info!(?changes, "config nodes synced");
        self.publish(&entries);
        Ok(changes)
    }

    /// Removes a node. Its in-flight requests finish; it gets no new ones.
    pub fn remove(&self, id: &str) -> Result<(), RegistryError> {
        let mut entries = self.entries();
        let before = entries.len();
        entries.retain(|e| e.spec.id != id);
        if entries.len() == before {
            return Err(RegistryError::UnknownNode(id.to_owned()));
        }
        tracing::info!(node = id, "node removed");
        self.publish(&entries);
        Ok(())
    }

    /// Starts or stops draining a node.
    pub fn set_draining(&self, id: &str, draining: bool) -> Result<(), RegistryError> {
        let mut entries = self.entries();
        let entry = entries
            .iter_mut()
            .find(|e| e.spec.id == id)
            .ok_or_else(|| RegistryError::UnknownNode(id.to_owned()))?;
        entry.spec.draining = draining;
        tracing::info!(node = id, draining, "node drain changed");
        self.publish(&entries);
        Ok(())
    }

    /// Records a heartbeat from a registered node, checked against its token.
    pub fn heartbeat(&self, id: &str, token: &str) -> Result<(), RegistryError> {
        let mut entries = self.entries();
        let entry = entries
            .iter_mut()
            .find(|e| e.spec.id == id)
            .ok_or_else(|| RegistryError::UnknownNode(id.to_owned()))?;
        let valid = entry
            .token
            .as_ref()
            .is_some_and(|t| constant_time_eq(t, &digest(token)));
        if !valid {
            return Err(RegistryError::BadToken);
        }
        let was_usable = entry.usable(&self.config, Instant::now());
        entry.last_heartbeat = Some((Instant::now(), unix_ms()));
        if !was_usable && entry.usable(&self.config, Instant::now()) {
            self.publish(&entries);
        }
        Ok(())
    }

    /// Whether any node has this id.
    pub fn contains(&self, id: &str) -> bool {
        self.entries().iter().any(|e| e.spec.id == id)
    }

    /// Every node, for the admin API.
    pub fn list(&self) -> Vec<NodeView> {
        let entries = self.entries();
        let snapshot = self.pool.snapshot();
        let now = Instant::now();
        entries
            .iter()
            .map(|e| {
                let state = snapshot.node(&e.spec.id).map(|n| n.state().clone());
                let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
                NodeView {
                    id: e.spec.id.clone(),
                    url: e.spec.base_url.clone(),
                    models: e.spec.models.clone(),
                    max_concurrency: e.spec.max_concurrency,
                    weight: e.spec.weight,
                    healthy: e.usable(&self.config, now),
                    draining: e.spec.draining,
                    in_flight: state.as_ref().map_or(0, |s| s.in_flight()),
                    source: e.source,
                    consecutive_failures: state.as_ref().map_or(0, |s| s.consecutive_failures()),
                    ttfb_ewma_ms: ms(state.as_ref().and_then(|s| s.ttfb_ewma())),
                    latency_ewma_ms: ms(state.as_ref().and_then(|s| s.latency_ewma())),
                    last_heartbeat_ms: e.last_heartbeat.map(|(_, ms)| ms),
                }
            })
            .collect()
    }

    /// One round of health work: passive ejection from request failures, active checks and
    /// discovery for nodes that are due, and heartbeat expiry. Returns when the round is done.
    pub async fn tick(&self) {
        let now = Instant::now();
        let snapshot = self.pool.snapshot();
        // Decide under the lock, probe without it.
        let due: Vec<(String, String, Option<String>, bool)> = {
            let mut entries = self.entries();
            let mut changed = false;
            for entry in entries.iter_mut() {
                let failures = snapshot
                    .node(&entry.spec.id)
                    .map_or(0, |n| n.state().consecutive_failures());
                if entry.ejected_until.is_none() && failures >= self.config.failures_to_eject {
                    self.eject(entry, now, "requests failed");
                    changed = true;
                }
            }
            if changed {
                self.publish(&entries);
            }
            entries
                .iter()
                .filter(|e| e.next_check <= now)
                .map(|e| {
                    (
                        e.spec.id.clone(),
                        e.spec.base_url.clone(),
                        e.spec.api_key.clone(),
                        e.models_known,
                    )
                })
                .collect()
        };
        let timeout = Duration::from_millis(self.config.timeout_ms);
        let probes = due
            .into_iter()
            .map(|(id, url, key, models_known)| async move {
                let healthy = check_health(&self.http, &url, timeout).await;
                let models = if healthy && !models_known {
                    discover_models(&self.http, &url, key.as_deref(), timeout)
                        .await
                        .ok()
                        .filter(|m| !m.is_empty())
                } else {
                    None
                };
                (id, url, healthy, models)
            });
        let results = futures_util::future::join_all(probes).await;
        let mut entries = self.entries();
        let now = Instant::now();
        let mut models_changed = false;
        for (id, url, healthy, models) in results {
            let Some(entry) = entries
                .iter_mut()
                .find(|e| e.spec.id == id && e.spec.base_url == url)
            else {
                continue; // Removed, or moved to another URL, while we probed.
            };
            if let Some(models) = models {
                tracing::info!(node = id, ?models, "node models discovered");
                entry.spec.models = models;
                entry.models_known = true;
                models_changed = true;
            }
            entry.next_check = now + Duration::from_millis(self.config.interval_ms);
            if healthy {
                entry.check_failures = 0;
                if entry.ejected_until.is_some() {
                    tracing::info!(node = id, "node recovered");
                    entry.ejected_until = None;
                    entry.backoff = Duration::ZERO;
                    if let Some(node) = self.pool.snapshot().node(&id) {
                        node.state().record_success();
                    }
                }
            } else {
                entry.check_failures += 1;
                if entry.ejected_until.is_some() {
                    self.eject(entry, now, "probe failed while ejected");
                } else if entry.check_failures >= self.config.failures_to_eject {
                    self.eject(entry, now, "health checks failed");
                }
            }
        }
        // Publish when what the pool shows is out of date: a probe changed something, or a
        // heartbeat expired.
        let snapshot = self.pool.snapshot();
        let stale = entries.iter().any(|e| {
            snapshot.node(&e.spec.id).map(|n| n.is_healthy()) != Some(e.usable(&self.config, now))
        });
        if models_changed || stale {
            self.publish(&entries);
        }
    }

    fn eject(&self, entry: &mut Entry, now: Instant, why: &str) {
        let base = Duration::from_millis(self.config.eject_base_ms);
        let max = Duration::from_millis(self.config.eject_max_ms);
        entry.backoff = if entry.backoff.is_zero() {
            base
        } else {
            (entry.backoff * 2).min(max)
        };
        entry.ejected_until = Some(now + entry.backoff);
        entry.next_check = now + entry.backoff;
        tracing::warn!(
            node = entry.spec.id,
            backoff_ms = entry.backoff.as_millis() as u64,
            why,
            "node ejected"
        );
    }

    /// Runs health rounds until `shutdown` resolves.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        // Passive ejection should react within a fraction of a second; active checks keep
        // their own interval through `next_check`.
        let period = Duration::from_millis(self.config.interval_ms.min(200));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.tick().await,
                () = &mut shutdown => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use loadtest::{SimConfig, SimNode};

    use super::*;

    fn fast_health() -> HealthConfig {
        HealthConfig {
            interval_ms: 50,
            timeout_ms: 500,
            failures_to_eject: 2,
            eject_base_ms: 100,
            eject_max_ms: 400,
            heartbeat_interval_ms: 100,
            heartbeat_timeout_ms: 300,
        }
    }

    fn healthy(registry: &Registry, id: &str) -> bool {
        registry
            .pool()
            .snapshot()
            .node(id)
            .is_some_and(|n| n.is_eligible())
    }

    #[tokio::test]
    async fn models_are_discovered_and_duplicates_refused() {
        let node = SimNode::start(SimConfig::instant(&["x", "y"]))
            .await
            .unwrap();
        let registry = Registry::new(NodePool::new(), fast_health());
        registry
            .add(NodeSpec::new("a", node.url()), NodeSource::Admin, None)
            .await
            .unwrap();
        assert_eq!(registry.list()[0].models, vec!["x", "y"]);
        assert!(healthy(&registry, "a"));
        let again = registry
            .add(NodeSpec::new("a", node.url()), NodeSource::Admin, None)
            .await;
        assert_eq!(again, Err(RegistryError::Conflict("a".into())));
    }

    #[tokio::test]
    async fn a_file_node_moved_to_another_url_serves_that_urls_models() {
        let first = SimNode::start(SimConfig::instant(&["old"])).await.unwrap();
        let second = SimNode::start(SimConfig::instant(&["new"])).await.unwrap();
        let registry = Registry::new(NodePool::new(), fast_health());
        registry
            .sync_config_nodes(&[], vec![NodeSpec::new("n", first.url())])
            .await
            .unwrap();
        assert_eq!(registry.list()[0].models, vec!["old"]);
        let changes = registry
            .sync_config_nodes(&["n".into()], vec![NodeSpec::new("n", second.url())])
            .await
            .unwrap();
        assert_eq!(changes.updated, vec!["n"]);
        assert_eq!(
            registry.list()[0].models,
            vec!["new"],
            "read again at the new URL"
        );

        // A file that names the same URL again keeps what was read there.
        let changes = registry
            .sync_config_nodes(&["n".into()], vec![NodeSpec::new("n", second.url())])
            .await
            .unwrap();
        assert!(changes.updated.is_empty(), "{changes:?}");
        assert_eq!(registry.list()[0].models, vec!["new"]);

        // Ejected at a dead address, then moved to a live one: usable at once.
        let third = SimNode::start(SimConfig::instant(&["new"])).await.unwrap();
        second.stop().await;
        for _ in 0..40 {
            registry.tick().await;
            if !healthy(&registry, "n") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert!(!healthy(&registry, "n"), "ejected at the dead address");
        registry
            .sync_config_nodes(&["n".into()], vec![NodeSpec::new("n", third.url())])
            .await
            .unwrap();
        assert!(
            healthy(&registry, "n"),
            "the old address's ejection is not carried over"
        );

        // A new URL that cannot be read yet: no models (no requests) until discovery succeeds.
        third.stop().await;
        let addr = first.addr();
        first.stop().await;
        registry
            .sync_config_nodes(
                &["n".into()],
                vec![NodeSpec::new("n", format!("http://{addr}"))],
            )
            .await
            .unwrap();
        assert!(
            registry.list()[0].models.is_empty(),
            "not the old URL's models"
        );
    }

    #[tokio::test]
    async fn a_reload_reads_new_nodes_models_at_the_same_time() {
        // Listeners that never accept: every model read waits out the whole timeout.
        let silent: Vec<_> = futures_util::future::join_all(
            (0..3).map(|_| tokio::net::TcpListener::bind("127.0.0.1:0")),
        )
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
        let specs = silent
            .iter()
            .enumerate()
            .map(|(i, l)| {
                NodeSpec::new(
                    format!("s{i}"),
                    format!("http://{}", l.local_addr().unwrap()),
                )
            })
            .collect();
        let config = fast_health();
        let timeout = Duration::from_millis(config.timeout_ms);
        let registry = Registry::new(NodePool::new(), config);
        let started = Instant::now();
        registry.sync_config_nodes(&[], specs).await.unwrap();
        let took = started.elapsed();
        assert!(
            took < timeout * 2,
            "three reads one after another would take three timeouts: {took:?}"
        );
        assert!(registry.list().iter().all(|n| n.models.is_empty()));
    }

    #[tokio::test]
    async fn a_node_whose_models_are_unknown_takes_no_requests_until_they_are_read() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let registry = Registry::new(NodePool::new(), fast_health());
        registry
            .add(
                NodeSpec::new("late", format!("http://{addr}")),
                NodeSource::Config,
                None,
            )
            .await
            .unwrap();
        assert!(!healthy(&registry, "late"));
        let _node = SimNode::bind(SimConfig::instant(&["m"]), addr)
            .await
            .unwrap();
        for _ in 0..40 {
            registry.tick().await;
            if healthy(&registry, "late") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert!(healthy(&registry, "late"));
        assert_eq!(registry.list()[0].models, vec!["m"]);
    }

    #[tokio::test]
    async fn failed_checks_eject_and_a_good_probe_brings_the_node_back() {
        let node = SimNode::start(SimConfig::instant(&["m"])).await.unwrap();
        let addr = node.addr();
        let registry = Registry::new(NodePool::new(), fast_health());
        registry
            .add(NodeSpec::new("a", node.url()), NodeSource::Config, None)
            .await
            .unwrap();
        node.stop().await;
        let mut ejected = false;
        for _ in 0..40 {
            registry.tick().await;
            if !healthy(&registry, "a") {
                ejected = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert!(ejected, "a dead node is ejected");
        let _back = SimNode::bind(SimConfig::instant(&["m"]), addr)
            .await
            .unwrap();
        let mut recovered = false;
        for _ in 0..60 {
            registry.tick().await;
            if healthy(&registry, "a") {
                recovered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert!(recovered, "the node comes back after its backoff");
    }

    #[tokio::test]
    async fn request_failures_eject_without_waiting_for_a_check() {
        let node = SimNode::start(SimConfig::instant(&["m"])).await.unwrap();
        let mut config = fast_health();
        config.interval_ms = 60_000;
        let registry = Registry::new(NodePool::new(), config);
        registry
            .add(NodeSpec::new("a", node.url()), NodeSource::Config, None)
            .await
            .unwrap();
        registry.tick().await;
        let state = registry
            .pool()
            .snapshot()
            .node("a")
            .unwrap()
            .state()
            .clone();
        state.record_failure();
        state.record_failure();
        registry.tick().await;
        assert!(!healthy(&registry, "a"));
    }

    #[tokio::test]
    async fn registered_nodes_need_heartbeats_with_their_token() {
        let node = SimNode::start(SimConfig::instant(&["m"])).await.unwrap();
        let registry = Registry::new(NodePool::new(), fast_health());
        registry
            .add(
                NodeSpec::new("r", node.url()),
                NodeSource::Registered,
                Some("tok"),
            )
            .await
            .unwrap();
        assert!(healthy(&registry, "r"));
        assert_eq!(
            registry.heartbeat("r", "wrong"),
            Err(RegistryError::BadToken)
        );
        tokio::time::sleep(Duration::from_millis(350)).await;
        registry.tick().await;
        assert!(
            !healthy(&registry, "r"),
            "silent past the heartbeat timeout: offline"
        );
        registry.heartbeat("r", "tok").unwrap();
        assert!(healthy(&registry, "r"));
    }

    #[tokio::test]
    async fn drain_and_remove() {
        let node = SimNode::start(SimConfig::instant(&["m"])).await.unwrap();
        let registry = Registry::new(NodePool::new(), fast_health());
        registry
            .add(NodeSpec::new("a", node.url()), NodeSource::Admin, None)
            .await
            .unwrap();
        registry.set_draining("a", true).unwrap();
        assert!(!healthy(&registry, "a"));
        assert!(registry.list()[0].draining);
        registry.remove("a").unwrap();
        assert_eq!(
            registry.remove("a"),
            Err(RegistryError::UnknownNode("a".into()))
        );
        assert!(registry.pool().snapshot().nodes().is_empty());
    }
}
