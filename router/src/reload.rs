//! Reloading the config file while the router runs (SIGHUP or `POST /api/config/reload`).
//!
//! The file is read and validated first; a file that does not parse or validate changes
//! nothing, and the error (with its line) is logged and returned. A valid file applies its
//! `[[nodes]]` at once: new nodes join, changed ones are updated in place (their load and health
//! are kept), and nodes no longer in the file leave once their requests finish. Every other
//! section takes effect at the next start; the answer names the ones that differ, so an operator
//! knows a restart is due.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::Mutex;

use crate::config::{Config, ConfigOverrides};
use crate::registry::{NodeChanges, Registry};

/// What a successful reload did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReloadReport {
    /// Changes to the file's nodes, applied.
    pub nodes: NodeChanges,
    /// Sections that differ from the running config and wait for a restart.
    pub restart_needed: Vec<&'static str>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The router was started without `--config`.
    #[error("the router was started without --config: there is no file to reload")]
    NoFile,
    /// The file does not parse or validate.
    #[error("{0}")]
    Invalid(String),
    /// The nodes could not be applied (an id taken by a registered node, say).
    #[error("the nodes could not be applied: {0}")]
    Nodes(String),
}

/// Reloads one config file into a running router. Reloads are serialized.
#[derive(Debug)]
pub struct Reloader {
    path: Option<PathBuf>,
    registry: Arc<Registry>,
    running: Mutex<Config>,
    overrides: ConfigOverrides,
}

impl Reloader {
    /// A reloader for the router started from `config`, read from `path` (if any).
    pub fn new(path: Option<PathBuf>, config: Config, registry: Arc<Registry>) -> Self {
        Self {
            path,
            registry,
            running: Mutex::new(config),
            overrides: ConfigOverrides::default(),
        }
    }

    /// The same, applying `overrides` to every file it reads (as they were applied to the
    /// running config at start).
    pub fn with_overrides(mut self, overrides: ConfigOverrides) -> Self {
        self.overrides = overrides;
        self
    }

    /// Reads the file again and applies it; see the module docs.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let result = self.try_reload().await;
        match &result {
            Ok(report) => tracing::info!(
                nodes = ?report.nodes,
                restart_needed = ?report.restart_needed,
                "config reloaded"
            ),
            Err(error) => {
                tracing::error!(%error, "config reload failed; keeping the running config");
            }
        }
        result
    }

    async fn try_reload(&self) -> Result<ReloadReport, ReloadError> {
        let path = self.path.as_ref().ok_or(ReloadError::NoFile)?;
        // Read under the lock, so that of two reloads racing an edit the later read wins.
        let mut running = self.running.lock().await;
        let mut next = Config::load(path).map_err(|e| ReloadError::Invalid(e.to_string()))?;
        self.overrides
            .apply(&mut next)
            .map_err(|e| ReloadError::Invalid(e.to_string()))?;
        let previous: Vec<String> = running.node_specs().into_iter().map(|s| s.id).collect();
        let nodes = self
            .registry
            .sync_config_nodes(&previous, next.node_specs())
            .await
            .map_err(|e| ReloadError::Nodes(e.to_string()))?;
        let restart_needed = differing_sections(&running, &next);
        // What now runs: the new nodes, and the old values of everything else.
        running.nodes = next.nodes;
        Ok(ReloadReport {
            nodes,
            restart_needed,
        })
    }
}

/// The sections, other than `[[nodes]]`, in which `a` and `b` differ.
fn differing_sections(a: &Config, b: &Config) -> Vec<&'static str> {
    let checks: [(&'static str, bool); 12] = [
        ("listen", a.listen != b.listen),
        ("layers", a.layers != b.layers),
        ("log", a.log != b.log),
        ("limits", a.limits != b.limits),
        ("admission", a.admission != b.admission),
        ("wait", a.wait != b.wait),
        ("select", a.select != b.select),
        ("proxy", a.proxy != b.proxy),
        ("health", a.health != b.health),
        ("history", a.history != b.history),
        ("auth", a.auth != b.auth),
        ("shutdown", a.shutdown != b.shutdown),
    ];
    checks
        .into_iter()
        .filter_map(|(name, differs)| differs.then_some(name))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changed_sections_are_named() {
        let a = Config::default();
        let mut b = Config::default();
        assert!(differing_sections(&a, &b).is_empty());
        b.wait.max_waiters = 7;
        b.layers.pop();
        assert_eq!(differing_sections(&a, &b), vec!["layers", "wait"]);
    }

    #[tokio::test]
    async fn command_line_values_are_applied_to_a_reloaded_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("router.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9\"\n[history]\nenabled = false\n",
        )
        .unwrap();
        let overrides = ConfigOverrides {
            listen: Some("127.0.0.1:7".parse().unwrap()),
            layers: Some(Vec::new()),
        };
        let mut running = Config::load(&path).unwrap();
        overrides.apply(&mut running).unwrap();
        let reloader = |overrides: ConfigOverrides| {
            let registry = Arc::new(Registry::new(layers::NodePool::new(), Default::default()));
            Reloader::new(Some(path.clone()), running.clone(), registry).with_overrides(overrides)
        };
        let report = reloader(overrides).reload().await.unwrap();
        assert!(report.restart_needed.is_empty(), "{report:?}");
        // Without them the file's own listen and layers differ from what runs.
        let report = reloader(ConfigOverrides::default()).reload().await.unwrap();
        assert_eq!(report.restart_needed, vec!["listen", "layers"]);
    }
}
