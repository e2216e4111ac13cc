//! The router's TOML configuration.
//!
//! Every field has a default, so an empty file is a valid config. An unknown key is an error that
//! names its line, so a typo never silently falls back to a default. Durations are integers with
//! their unit in the key (`timeout_ms`). `examples/router.toml` is the annotated reference.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use layers::{
    AdmissionConfig, ClientConfig, NodePool, NodeSpec, ProxyConfig, RequestInfoConfig,
    SelectConfig, WaitConfig,
};
use serde::Deserialize;

use crate::listen::ListenConfig;
use crate::stack::{LayerKind, StackConfig};

/// Why a config was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key or a value of the wrong type. The message
    /// names the line and column.
    #[error("{0}")]
    Parse(String),
    /// The values do not make sense together.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Command-line values that replace the file's (`--listen`, `--layers`): applied at start and
/// again to every reload, so a reload compares like with like.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigOverrides {
    /// Replaces `listen`.
    pub listen: Option<SocketAddr>,
    /// Replaces `layers`.
    pub layers: Option<Vec<LayerKind>>,
}

impl ConfigOverrides {
    /// `config` with these values in place of its own, validated again.
    pub fn apply(&self, config: &mut Config) -> Result<(), ConfigError> {
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(layers) = &self.layers {
            config.layers = layers.clone();
            config.validate()?;
        }
        Ok(())
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where clients connect. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// The layers on the request path, outermost first. Default all three:
    /// `["admission", "timeout_wait", "cached_select"]`.
    pub layers: Vec<LayerKind>,
    /// Logging.
    pub log: LogConfig,
    /// Request limits.
    pub limits: LimitsConfig,
    /// `AdmissionLayer` thresholds.
    pub admission: AdmissionSection,
    /// `TimeoutWaitLayer` bounds.
    pub wait: WaitSection,
    /// `CachedSelectLayer` ranking cache.
    pub select: SelectSection,
    /// Upstream connections and timeouts.
    pub proxy: ProxySection,
    /// Health checks, ejection and heartbeats.
    pub health: HealthConfig,
    /// Request history in SQLite.
    pub history: HistorySection,
    /// Client API keys, the admin token, the registration secret.
    pub auth: AuthConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
    /// Static nodes.
    pub nodes: Vec<NodeConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            layers: LayerKind::ALL.to_vec(),
            log: LogConfig::default(),
            limits: LimitsConfig::default(),
            admission: AdmissionSection::default(),
            wait: WaitSection::default(),
            select: SelectSection::default(),
            proxy: ProxySection::default(),
            health: HealthConfig::default(),
            history: HistorySection::default(),
            auth: AuthConfig::default(),
            shutdown: ShutdownConfig::default(),
            nodes: Vec::new(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `pretty` or `json`. Default `pretty`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `llm_router=debug`. Default `info`. The environment
    /// variable `LLM_ROUTER_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            level: "info".into(),
        }
    }
}

/// `[limits]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request body, in bytes. Default 16 MiB.
    pub max_body_bytes: usize,
    /// Largest request head (request line and headers), in bytes; larger gets 431. Default
    /// 65536.
    pub max_header_bytes: usize,
    /// Longest time for a new connection's first bytes, and then for a whole request head, in
    /// milliseconds; also how long an HTTP/1 connection may sit idle between requests, and the
    /// longest gap in a request body (which must also come at 1 KiB/s on average after the
    /// first such time). Default 10000.
    pub header_read_timeout_ms: u64,
    /// Longest an HTTP/1 client's socket may take no more of its answer, or an HTTP/2 stream's
    /// answer may go unasked for after giving data, in milliseconds; past it the connection is
    /// reset (HTTP/1) or the answer dropped (HTTP/2), and a streamed answer stops holding its
    /// node slot. Default 60000 (nginx's `send_timeout`).
    pub send_timeout_ms: u64,
    /// Most open client connections; past it a new one gets 503 and is closed. Default 10000.
    pub max_connections: usize,
    /// Threads serving client connections, each with its own single-threaded runtime and its
    /// own upstream connections. Default: one per core. 0 serves them on the main runtime.
    pub workers: Option<usize>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let listen = ListenConfig::default();
        Self {
            max_body_bytes: RequestInfoConfig::default().max_body_bytes,
            max_header_bytes: listen.max_header_bytes,
            header_read_timeout_ms: listen.header_read_timeout.as_millis() as u64,
            send_timeout_ms: listen.send_timeout.as_millis() as u64,
            max_connections: listen.max_connections,
            workers: None,
        }
    }
}

/// `[admission]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionSection {
    /// Utilization below which requests go on at once. Default 0.5.
    pub accept_below: f64,
    /// Utilization at which requests get 429. Default 0.8.
    pub reject_at: f64,
    /// Delay just below `reject_at`, in milliseconds. Default 100.
    pub max_delay_ms: u64,
}

impl Default for AdmissionSection {
    fn default() -> Self {
        let d = AdmissionConfig::default();
        Self {
            accept_below: d.accept_below,
            reject_at: d.reject_at,
            max_delay_ms: d.max_delay.as_millis() as u64,
        }
    }
}

/// `[wait]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WaitSection {
    /// Most requests waiting for a slot. Default 1024.
    pub max_waiters: usize,
    /// Longest wait, in milliseconds. Default 30000.
    pub timeout_ms: u64,
}

impl Default for WaitSection {
    fn default() -> Self {
        let d = WaitConfig::default();
        Self {
            max_waiters: d.max_waiters,
            timeout_ms: d.wait_timeout.as_millis() as u64,
        }
    }
}

/// `[select]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SelectSection {
    /// How long a node ranking is reused, in milliseconds. Default 1000.
    pub ranking_ttl_ms: u64,
}

impl Default for SelectSection {
    fn default() -> Self {
        Self {
            ranking_ttl_ms: SelectConfig::default().ranking_ttl.as_millis() as u64,
        }
    }
}

/// `[proxy]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    /// TCP connect timeout, in milliseconds. Default 2000.
    pub connect_timeout_ms: u64,
    /// Longest wait for a node's response headers, in milliseconds. Default 300000.
    pub first_byte_timeout_ms: u64,
    /// Longest gap between two chunks of a node's body, in milliseconds. Default 120000.
    pub idle_timeout_ms: u64,
    /// Idle connections kept per node by each connection worker (see `[limits] workers`).
    /// Default 256.
    pub pool_max_idle_per_node: usize,
    /// How long an idle connection to a node is kept for reuse, in milliseconds. Default 4000:
    /// below the 5 s after which uvicorn (vLLM, SGLang) and llama.cpp's server close idle
    /// connections, so a request never goes out on one the node is closing.
    pub pool_idle_timeout_ms: u64,
    /// More nodes a failed request is tried on, before any byte reached the client. Default 1.
    pub retries: u32,
    /// Retries allowed at once before the budget needs new requests. Default 10.
    pub retry_reserve: u32,
    /// Retries allowed per 100 requests, on top of the reserve. Default 20.
    pub retry_percent: u32,
}

impl Default for ProxySection {
    fn default() -> Self {
        let p = ProxyConfig::default();
        let c = ClientConfig::default();
        Self {
            connect_timeout_ms: c.connect_timeout.as_millis() as u64,
            first_byte_timeout_ms: p.first_byte_timeout.as_millis() as u64,
            idle_timeout_ms: p.idle_timeout.as_millis() as u64,
            pool_max_idle_per_node: c.pool_max_idle_per_host,
            pool_idle_timeout_ms: c.pool_idle_timeout.as_millis() as u64,
            retries: p.retries,
            retry_reserve: p.retry_reserve,
            retry_percent: p.retry_percent,
        }
    }
}

/// `[health]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Time between active checks (`GET /health` on each node), in milliseconds. Default 5000.
    pub interval_ms: u64,
    /// Timeout of one check, in milliseconds. Default 2000.
    pub timeout_ms: u64,
    /// Failures in a row (checks, or proxied requests) before a node is ejected. Default 3.
    pub failures_to_eject: u32,
    /// First ejection period, in milliseconds; doubles each time, up to `eject_max_ms`. Default 1000.
    pub eject_base_ms: u64,
    /// Longest ejection period, in milliseconds. Default 30000.
    pub eject_max_ms: u64,
    /// How often registered nodes should send heartbeats, in milliseconds. Default 10000.
    pub heartbeat_interval_ms: u64,
    /// A registered node without a heartbeat for this long goes offline, in milliseconds.
    /// Default 60000.
    pub heartbeat_timeout_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval_ms: 5_000,
            timeout_ms: 2_000,
            failures_to_eject: 3,
            eject_base_ms: 1_000,
            eject_max_ms: 30_000,
            heartbeat_interval_ms: 10_000,
            heartbeat_timeout_ms: 60_000,
        }
    }
}

/// `[history]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistorySection {
    /// Keep a request history. Default true.
    pub enabled: bool,
    /// SQLite file. Default `llm-router.db`.
    pub path: PathBuf,
    /// Rows older than this many days are deleted, checked every minute, up to the last
    /// batch whose rows all are (a row written with newer ones can wait for them); 0 keeps
    /// everything. Default 30.
    pub retention_days: u64,
    /// Rows per write transaction at most. Default 2048.
    pub batch_size: usize,
    /// Longest wait before a partial batch is written, in milliseconds. Default 200.
    pub flush_interval_ms: u64,
    /// Rows waiting to be written at most; past it rows are dropped and counted. Default 65536.
    pub queue_capacity: usize,
}

impl Default for HistorySection {
    fn default() -> Self {
        Self {
            enabled: true,
            path: PathBuf::from("llm-router.db"),
            retention_days: 30,
            batch_size: 2048,
            flush_interval_ms: 200,
            queue_capacity: 65_536,
        }
    }
}

/// One client API key, stored as the SHA-256 of the key (make it with `llm-router hash-key`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// A name for the key, recorded in the history. Never the key itself.
    pub id: String,
    /// Hex SHA-256 of the key.
    pub sha256: String,
}

/// `[auth]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Client keys for `/v1`. Empty: `/v1` is open.
    pub api_keys: Vec<ApiKeyConfig>,
    /// Hex SHA-256 of the admin token for `/api/*`. The environment variable
    /// `LLM_ROUTER_ADMIN_TOKEN` (the token itself) also works. Neither: the admin API answers 401.
    pub admin_token_sha256: Option<String>,
    /// Hex SHA-256 of the secret nodes register with. The environment variable
    /// `LLM_ROUTER_REGISTRATION_SECRET` also works. Neither: only the admin can add nodes.
    pub registration_secret_sha256: Option<String>,
}

/// `[shutdown]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long in-flight requests may run after SIGTERM, in milliseconds. Default 30000.
    pub grace_period_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace_period_ms: 30_000,
        }
    }
}

/// `[[nodes]]`: one static node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// A unique name. Default `node-N` by position.
    #[serde(default)]
    pub id: Option<String>,
    /// Base URL, `http://host:port` (a path prefix is kept).
    pub url: String,
    /// Models it serves. Absent: read from the node's `/v1/models`.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// Requests it takes at once. Default 32.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// Preference among equally fast nodes. Default 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Key sent to the node as `Authorization: Bearer`.
    #[serde(default)]
    pub api_key: Option<String>,
}

fn default_max_concurrency() -> usize {
    32
}

fn default_weight() -> u32 {
    1
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse(m) => ConfigError::Parse(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let mut seen = Vec::new();
        for layer in &self.layers {
            if seen.contains(layer) {
                return invalid(format!("layer {layer} is listed twice in `layers`"));
            }
            seen.push(*layer);
        }
        if let Err(e) = self.stack().admission.validate() {
            return invalid(format!("[admission] {e}"));
        }
        if self.limits.max_body_bytes == 0 {
            return invalid("[limits] max_body_bytes must be at least 1".into());
        }
        if self.limits.header_read_timeout_ms == 0
            || self.limits.send_timeout_ms == 0
            || self.limits.max_connections == 0
        {
            return invalid(
                "[limits] header_read_timeout_ms, send_timeout_ms and max_connections must be at \
                 least 1"
                    .into(),
            );
        }
        if self.health.interval_ms == 0 || self.health.failures_to_eject == 0 {
            return invalid("[health] interval_ms and failures_to_eject must be at least 1".into());
        }
        for (name, value) in [
            ("admin_token_sha256", &self.auth.admin_token_sha256),
            (
                "registration_secret_sha256",
                &self.auth.registration_secret_sha256,
            ),
        ] {
            if let Some(v) = value
                && !is_sha256_hex(v)
            {
                return invalid(format!(
                    "[auth] {name} must be 64 hex characters (a SHA-256)"
                ));
            }
        }
        for key in &self.auth.api_keys {
            if !is_sha256_hex(&key.sha256) {
                return invalid(format!(
                    "[auth] api key {:?}: sha256 must be 64 hex characters (make it with `llm-router hash-key`)",
                    key.id
                ));
            }
            if self.auth.api_keys.iter().filter(|k| k.id == key.id).count() > 1 {
                return invalid(format!("[auth] api key id {:?} is used twice", key.id));
            }
        }
        // The pool checks URLs, ids and capacities the same way it will at run time.
        NodePool::from_specs(self.node_specs())
            .map(drop)
            .map_err(|e| ConfigError::Invalid(format!("[[nodes]] {e}")))
    }

    /// The static nodes as pool specs. Nodes without `models` serve any model until discovery
    /// fills them in.
    pub fn node_specs(&self) -> Vec<NodeSpec> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| NodeSpec {
                id: n.id.clone().unwrap_or_else(|| format!("node-{}", i + 1)),
                base_url: n.url.clone(),
                models: n.models.clone().unwrap_or_default(),
                max_concurrency: n.max_concurrency,
                weight: n.weight,
                api_key: n.api_key.clone(),
                healthy: true,
                draining: false,
            })
            .collect()
    }

    /// The layer stack's settings.
    pub fn stack(&self) -> StackConfig {
        StackConfig {
            layers: self.layers.clone(),
            request_info: RequestInfoConfig {
                max_body_bytes: self.limits.max_body_bytes,
                require_model: true,
            },
            admission: AdmissionConfig {
                accept_below: self.admission.accept_below,
                reject_at: self.admission.reject_at,
                max_delay: ms(self.admission.max_delay_ms),
            },
            wait: WaitConfig {
                max_waiters: self.wait.max_waiters,
                wait_timeout: ms(self.wait.timeout_ms),
            },
            select: SelectConfig {
                ranking_ttl: ms(self.select.ranking_ttl_ms),
            },
            proxy: ProxyConfig {
                first_byte_timeout: ms(self.proxy.first_byte_timeout_ms),
                idle_timeout: ms(self.proxy.idle_timeout_ms),
                retries: self.proxy.retries,
                retry_reserve: self.proxy.retry_reserve,
                retry_percent: self.proxy.retry_percent,
            },
        }
    }

    /// Limits on client connections.
    pub fn listen(&self) -> ListenConfig {
        ListenConfig {
            header_read_timeout: ms(self.limits.header_read_timeout_ms),
            max_header_bytes: self.limits.max_header_bytes,
            max_body_bytes: self.limits.max_body_bytes,
            send_timeout: ms(self.limits.send_timeout_ms),
            max_connections: self.limits.max_connections,
            workers: self
                .limits
                .workers
                .unwrap_or_else(crate::listen::default_workers),
        }
    }

    /// The shared client's settings.
    pub fn client(&self) -> ClientConfig {
        ClientConfig {
            connect_timeout: ms(self.proxy.connect_timeout_ms),
            pool_max_idle_per_host: self.proxy.pool_max_idle_per_node,
            pool_idle_timeout: ms(self.proxy.pool_idle_timeout_ms),
        }
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_all_defaults() {
        let config = Config::parse("").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.layers, LayerKind::ALL.to_vec());
        assert_eq!(config.stack(), StackConfig::default());
    }

    #[test]
    fn an_unknown_key_is_rejected_with_its_line() {
        let text = "listen = \"127.0.0.1:9000\"\n\n[wait]\nmax_waiters = 10\ntimeout_msec = 5\n";
        let error = Config::parse(text).unwrap_err().to_string();
        assert!(error.contains("line 5"), "{error}");
        assert!(error.contains("timeout_msec"), "{error}");
        let error = Config::parse("[[nodes]]\nurl = \"http://a:1\"\nmodel = [\"x\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("line 3") && error.contains("model"),
            "{error}"
        );
    }

    #[test]
    fn wrong_types_and_unknown_layers_name_their_line() {
        let error = Config::parse("layers = [\"admission\", \"turbo\"]")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("line 1") && error.contains("turbo"),
            "{error}"
        );
        let error = Config::parse("[wait]\nmax_waiters = \"many\"")
            .unwrap_err()
            .to_string();
        assert!(error.contains("line 2"), "{error}");
    }

    #[test]
    fn values_are_checked_together() {
        for (text, needle) in [
            ("layers = [\"admission\", \"admission\"]", "twice"),
            (
                "[admission]\naccept_below = 0.9\nreject_at = 0.5",
                "accept_below",
            ),
            ("[auth]\nadmin_token_sha256 = \"abc\"", "64 hex"),
            ("[limits]\nsend_timeout_ms = 0", "send_timeout_ms"),
            ("[[nodes]]\nurl = \"ftp://x\"", "http://"),
            (
                "[[nodes]]\nid = \"a\"\nurl = \"http://x:1\"\n[[nodes]]\nid = \"a\"\nurl = \"http://y:1\"",
                "twice",
            ),
        ] {
            let error = Config::parse(text).unwrap_err().to_string();
            assert!(error.contains(needle), "{text:?}: {error}");
        }
    }

    #[test]
    fn a_full_file_maps_onto_the_layers() {
        let text = r#"
            listen = "0.0.0.0:9000"
            layers = ["cached_select", "timeout_wait"]
            [wait]
            max_waiters = 7
            timeout_ms = 1500
            [[nodes]]
            url = "http://10.0.0.1:8000"
            models = ["llama"]
            max_concurrency = 4
            [[nodes]]
            id = "b"
            url = "http://10.0.0.2:8000"
        "#;
        let config = Config::parse(text).unwrap();
        let stack = config.stack();
        assert_eq!(
            stack.layers,
            vec![LayerKind::CachedSelect, LayerKind::TimeoutWait]
        );
        assert_eq!(stack.wait.max_waiters, 7);
        assert_eq!(stack.wait.wait_timeout, Duration::from_millis(1500));
        let specs = config.node_specs();
        assert_eq!(specs[0].id, "node-1");
        assert_eq!(specs[0].models, vec!["llama"]);
        assert_eq!(specs[1].id, "b");
        assert_eq!(specs[1].max_concurrency, 32);
    }

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/router.toml");
        let config = Config::load(&path).unwrap();
        assert!(!config.nodes.is_empty());
        assert_eq!(
            config.client(),
            ClientConfig::default(),
            "the example shows the defaults"
        );
    }
}
