//! Starting and stopping a whole router from a [`Config`].
//!
//! [`start`] builds the node registry (discovering models), opens the history, and serves on
//! the given listener. [`Running::shutdown`] is what SIGTERM does: stop accepting connections,
//! let in-flight requests and streams finish within the grace period, then flush the history.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use layers::{NodePool, NodeSpec, build_client};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::app::{Services, service};
use crate::auth::Credentials;
use crate::config::Config;
use crate::history::{History, HistoryConfig};
use crate::registry::{NodeSource, Registry, RegistryError};
use crate::reload::Reloader;
use crate::state::AppState;

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A node from the config or the command line was refused.
    #[error("node {id}: {source}")]
    Node {
        /// The node.
        id: String,
        /// Why.
        source: RegistryError,
    },
    /// The listener has no address.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// What the command line adds to the config.
#[derive(Debug, Default, Clone)]
pub struct StartOptions {
    /// Nodes beyond the config's (`--upstream`, `--demo`).
    pub extra_nodes: Vec<NodeSpec>,
    /// The admin token itself (`LLM_ROUTER_ADMIN_TOKEN`).
    pub admin_token: Option<String>,
    /// The registration secret itself (`LLM_ROUTER_REGISTRATION_SECRET`).
    pub registration_secret: Option<String>,
    /// The config file, for reloads; `None` when there is none.
    pub config_path: Option<std::path::PathBuf>,
    /// Command-line values applied over the file; reloads apply them too.
    pub overrides: crate::config::ConfigOverrides,
}

/// A running router.
#[derive(Debug)]
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its shared services (pool, registry, history...).
    pub services: Services,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish within the grace period, flushes the
    /// history, and returns when all of that is done.
    pub async fn shutdown(self) {
        self.services.shutting_down.store(true, Ordering::Relaxed);
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Waits until the server stops by itself (it does not, unless it fails).
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Starts a router from `config` on `listener`.
pub async fn start(
    config: Config,
    listener: TcpListener,
    options: StartOptions,
) -> Result<Running, StartError> {
    let pool = NodePool::new();
    let state = AppState::new(pool.clone(), &config.client());
    let registry = Arc::new(Registry::new(pool.clone(), config.health.clone()));
    for spec in config.node_specs().into_iter().chain(options.extra_nodes) {
        let id = spec.id.clone();
        registry
            .add(spec, NodeSource::Config, None)
            .await
            .map_err(|source| StartError::Node { id, source })?;
    }
    let history = if config.history.enabled {
        let history_config = HistoryConfig {
            path: config.history.path.clone(),
            retention: (config.history.retention_days > 0)
                .then(|| Duration::from_secs(config.history.retention_days * 86_400)),
            batch_size: config.history.batch_size,
            flush_interval: Duration::from_millis(config.history.flush_interval_ms),
            queue_capacity: config.history.queue_capacity,
        };
        match History::open(history_config).await {
            Ok(history) => history,
            Err(error) => {
                // Serving matters more than the history: run on, count every row as dropped.
                tracing::error!(path = %config.history.path.display(), %error,
                    "cannot open the request history; serving without it");
                History::disabled()
            }
        }
    } else {
        History::turned_off()
    };
    let credentials = Credentials::from_config(
        &config.auth,
        options.admin_token.as_deref(),
        options.registration_secret.as_deref(),
    );
    let stack = config.stack();
    let services = Services {
        state,
        retry_budget: crate::stack::retry_budget(&stack),
        request_ids: Arc::default(),
        stack,
        credentials: Arc::new(credentials),
        registry: registry.clone(),
        history: history.clone(),
        metrics: Arc::default(),
        shutting_down: Arc::default(),
        connections: Arc::default(),
        reloader: Arc::new(
            Reloader::new(
                options.config_path.clone(),
                config.clone(),
                registry.clone(),
            )
            .with_overrides(options.overrides.clone()),
        ),
    };
    // Each connection worker keeps its own upstream connections, so that a request and its
    // node's connection live on one thread (see `listen`).
    let client_config = config.client();
    let worker_services = services.clone();
    let make_app = move || {
        let mut services = worker_services.clone();
        services.state.http_client = build_client(&client_config);
        service(&services)
    };
    let addr = listener.local_addr()?;
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(registry.run(stopped(stop_rx.clone())));
    let grace = Duration::from_millis(config.shutdown.grace_period_ms);
    let listen = config.listen();
    let counters = services.connections.clone();
    let task = tokio::spawn(async move {
        crate::listen::serve(
            listener,
            make_app,
            listen,
            counters,
            stopped(stop_rx),
            grace,
        )
        .await;
        history.shutdown(Duration::from_secs(5)).await;
        tracing::info!(
            written = history.written(),
            dropped = history.dropped(),
            "history flushed"
        );
    });
    Ok(Running {
        addr,
        services,
        stop,
        task,
    })
}
