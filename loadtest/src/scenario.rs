//! The benchmark scenarios of `llm-loadtest scenario`: each starts its sim nodes in-process, the
//! router as a child process (the release binary, so its CPU and memory are its own), runs its
//! loads and writes a [`Report`].
//!
//! - `overhead`: two instant nodes, direct against through the router; closed loop of 64
//!   connections and a fixed 1,000 req/s.
//! - `streaming`: thousands of concurrent, slow SSE streams through one router; its RSS and CPU
//!   per stream.
//! - `fleet`: four nodes of different speeds and limits; round robin, least-loaded and the
//!   default stack on p95 time to first token and end-to-end latency.
//! - `overload`: 70% load, then 3× the fleet's capacity, then 70% again; accepted p95, 429s with
//!   Retry-After, node peaks against their limits.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::process::{Child, Command};

use crate::load::{self, LoadResult, LoadSpec, Pace};
use crate::report::{NodePeak, ProcessUsage, Report, Run};
use crate::sim::{SimConfig, SimNode};

/// Settings shared by every scenario.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The `llm-router` binary to run.
    pub router_bin: PathBuf,
    /// Where reports go.
    pub out_dir: PathBuf,
    /// Length of each measured load. Scenario `overload` uses it for each of its phases but the
    /// 3× one, which is `overload_duration`.
    pub duration: Duration,
    /// The 3× phase of `overload`.
    pub overload_duration: Duration,
    /// Concurrent streams in `streaming`.
    pub streams: usize,
    /// `streaming` sends its streams over HTTP/2 (a few connections) instead of one HTTP/1.1
    /// connection each.
    pub streams_over_h2: bool,
}

/// A sim node started for a scenario, with its name and limit.
struct FleetNode {
    name: String,
    max_concurrency: usize,
    node: SimNode,
}

impl FleetNode {
    async fn start(name: &str, config: SimConfig) -> Result<Self, String> {
        let max_concurrency = config.max_concurrency;
        let node = SimNode::start(config)
            .await
            .map_err(|e| format!("cannot start sim node {name}: {e}"))?;
        Ok(Self {
            name: name.into(),
            max_concurrency,
            node,
        })
    }
}

fn peaks(nodes: &[FleetNode], before: &[(usize, u64)]) -> Vec<NodePeak> {
    nodes
        .iter()
        .zip(before)
        .map(|(n, (_, requests_before))| NodePeak {
            node: n.name.clone(),
            max_concurrency: n.max_concurrency,
            peak_in_flight: n.node.stats().peak_in_flight(),
            requests: n.node.stats().requests() - requests_before,
        })
        .collect()
}

/// Each node's request count, with its peak reset so the next run's peak is its own.
fn counters(nodes: &[FleetNode]) -> Vec<(usize, u64)> {
    for n in nodes {
        n.node.stats().reset_peak();
    }
    nodes
        .iter()
        .map(|n| (n.node.stats().peak_in_flight(), n.node.stats().requests()))
        .collect()
}

/// A router child process.
pub struct RouterProcess {
    child: Child,
    addr: SocketAddr,
    _dir: PathBuf,
}

impl RouterProcess {
    /// Starts `bin --config <file>` with `config` (TOML without `listen`, which is added) and
    /// waits until `/ready` answers 200.
    pub async fn start(bin: &Path, config: &str, dir: &Path) -> Result<Self, String> {
        Self::start_with_env(bin, config, dir, &[]).await
    }

    /// [`RouterProcess::start`] with extra environment variables (an admin token, say).
    pub async fn start_with_env(
        bin: &Path,
        config: &str,
        dir: &Path,
        env: &[(&str, &str)],
    ) -> Result<Self, String> {
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // The child runs in `dir`, so a relative path (from `--out`) would point elsewhere.
        let dir = &std::fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join("router.toml");
        std::fs::write(&path, format!("listen = \"{addr}\"\n{config}"))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let child = Command::new(bin)
            .arg("--config")
            .arg(&path)
            .current_dir(dir)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot run {}: {e} (build it: cargo build --release -p llm-router)",
                    bin.display()
                )
            })?;
        let router = Self {
            child,
            addr,
            _dir: dir.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if get_status(&format!("http://{addr}/ready")).await == Some(200) {
                return Ok(router);
            }
            if Instant::now() > deadline {
                return Err(format!("router on {addr} not ready within 20 s"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Its memory now and CPU time so far.
    pub fn usage(&self) -> ProcessUsage {
        self.child.id().map(process_usage).unwrap_or_default()
    }

    /// Stops it.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// RSS, peak RSS and CPU time (ms) of a process, from `/proc`.
pub fn process_usage(pid: u32) -> ProcessUsage {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here; in clock ticks of
    // 100 Hz (USER_HZ on Linux).
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    ProcessUsage {
        rss_kib: kib("VmRSS:"),
        peak_rss_kib: kib("VmHWM:"),
        cpu_ms: ticks as f64 * 10.0,
    }
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

async fn get_status(url: &str) -> Option<u16> {
    let client = load::client();
    let request = http::Request::get(url).body(Full::new(Bytes::new())).ok()?;
    let response = tokio::time::timeout(Duration::from_secs(2), client.request(request))
        .await
        .ok()?
        .ok()?;
    Some(response.status().as_u16())
}

/// The body of a GET, with an optional bearer token.
pub async fn get_text(url: &str, token: Option<&str>) -> Result<String, String> {
    let client = load::client();
    let mut request = http::Request::get(url);
    if let Some(token) = token {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .map_err(|_| format!("{url}: no answer within 10 s"))?
        .map_err(|e| format!("{url}: {e}"))?;
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{url}: {e}"))?
        .to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// A GET's body as JSON, with an optional bearer token.
pub async fn get_json(url: &str, token: Option<&str>) -> Result<serde_json::Value, String> {
    let text = get_text(url, token).await?;
    serde_json::from_str(&text).map_err(|e| format!("{url}: not JSON: {e}: {text}"))
}

/// `[[nodes]]` entries for a router config.
fn nodes_toml(
    nodes: &[FleetNode],
    model: &str,
    max_concurrency: impl Fn(&FleetNode) -> usize,
) -> String {
    nodes
        .iter()
        .map(|n| {
            format!(
                "[[nodes]]\nid = \"{}\"\nurl = \"{}\"\nmodels = [\"{model}\"]\nmax_concurrency = {}\n",
                n.name,
                n.node.url(),
                max_concurrency(n)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

const QUIET: &str = "[log]\nlevel = \"warn\"\n";

/// One measured load through `router` (or straight at `url` when there is none).
async fn measure(
    label: &str,
    spec: LoadSpec,
    nodes: &[FleetNode],
    router: Option<&RouterProcess>,
) -> Result<Run, String> {
    let before = counters(nodes);
    let usage_before = router.map(RouterProcess::usage);
    eprintln!(
        "  {label}: {:?}, {} s",
        spec.pace,
        spec.duration.as_secs_f64()
    );
    let result = load::run(spec).await?;
    let router_usage = router.map(|r| {
        let after = r.usage();
        ProcessUsage {
            cpu_ms: after.cpu_ms - usage_before.map_or(0.0, |u| u.cpu_ms),
            ..after
        }
    });
    eprintln!(
        "    {:.0} req/s ok, p50 {:.2} ms, p99 {:.2} ms, errors {:?}",
        result.throughput, result.latency_ms.p50, result.latency_ms.p99, result.errors
    );
    Ok(Run {
        label: label.into(),
        result,
        nodes: peaks(nodes, &before),
        router: router_usage,
    })
}

/// Scenario a.
pub async fn overhead(settings: &Settings) -> Result<Report, String> {
    let mut report = Report::new("overhead", "router against direct, two instant nodes");
    let nodes = vec![
        FleetNode::start("node-1", SimConfig::instant(&["m"])).await?,
        FleetNode::start("node-2", SimConfig::instant(&["m"])).await?,
    ];
    let config = format!(
        "{QUIET}[history]\nenabled = true\n\n{}",
        nodes_toml(&nodes, "m", |_| 1024)
    );
    let router = RouterProcess::start(
        &settings.router_bin,
        &config,
        &settings.out_dir.join("overhead-router"),
    )
    .await?;
    let closed = Pace::Closed { connections: 64 };
    let fixed = Pace::Open { rate: 1000.0 };
    let spec = |url: String, pace| LoadSpec::chat(url, "m", pace, settings.duration);
    // Warm both paths up: connections, caches, the router's rankings.
    load::run(spec(router.url(), closed).lasting(Duration::from_secs(2))).await?;
    report
        .runs
        .push(measure("direct", spec(nodes[0].node.url(), closed), &nodes, None).await?);
    report
        .runs
        .push(measure("router", spec(router.url(), closed), &nodes, Some(&router)).await?);
    report
        .runs
        .push(measure("direct", spec(nodes[0].node.url(), fixed), &nodes, None).await?);
    report
        .runs
        .push(measure("router", spec(router.url(), fixed), &nodes, Some(&router)).await?);
    let (direct, routed) = (&report.runs[0].result, &report.runs[1].result);
    report.findings.push(format!(
        "closed loop: the router does {:.2} of direct's throughput ({:.0} against {:.0} req/s); sim nodes and load generator share the router's two cores",
        routed.throughput / direct.throughput.max(1e-9),
        routed.throughput,
        direct.throughput
    ));
    let (direct, routed) = (&report.runs[2].result, &report.runs[3].result);
    report.findings.push(format!(
        "1,000 req/s: p99 {:.3} ms through the router against {:.3} ms direct (+{:.3} ms)",
        routed.latency_ms.p99,
        direct.latency_ms.p99,
        routed.latency_ms.p99 - direct.latency_ms.p99
    ));
    let usage = router.usage();
    report.findings.push(format!(
        "router peak RSS {:.1} MiB",
        usage.peak_rss_kib as f64 / 1024.0
    ));
    router.stop().await;
    Ok(report)
}

/// Scenario b.
pub async fn streaming(settings: &Settings) -> Result<Report, String> {
    let streams = settings.streams;
    let mut report = Report::new(
        "streaming",
        "concurrent idle SSE streams through one router",
    );
    // Long, slow streams: the first token at once, then one every `gap` (2 s in a full run), so
    // they sit idle while they are counted: first `settle`, then a CPU `window`.
    let gap = (settings.duration / 5).clamp(Duration::from_millis(100), Duration::from_secs(2));
    let settle = (settings.duration / 4).min(Duration::from_secs(3));
    let window = (settings.duration / 2).min(Duration::from_secs(5));
    // they are counted.
    let tokens = ((settle + window).as_millis() / gap.as_millis()) as usize + 10;
    let nodes = vec![
        FleetNode::start(
            "node-1",
            SimConfig {
                ttft_ms: 10,
                inter_token_ms: gap.as_millis() as u64,
                tokens,
                ..SimConfig::instant(&["m"])
            },
        )
        .await?,
    ];
    let config = format!(
        "{QUIET}[history]\nenabled = true\n[admission]\naccept_below = 0.9\nreject_at = 0.99\n\n{}",
        nodes_toml(&nodes, "m", |_| streams * 2)
    );
    let router = RouterProcess::start(
        &settings.router_bin,
        &config,
        &settings.out_dir.join("streaming-router"),
    )
    .await?;
    // Warm-up: the allocator and the pools reach their resting size.
    load::run(LoadSpec::chat(
        router.url(),
        "m",
        Pace::Closed { connections: 16 },
        Duration::from_secs(1),
    ))
    .await?;
    let idle = router.usage();
    let mut spec = LoadSpec::chat(
        router.url(),
        "m",
        Pace::Closed {
            connections: streams,
        },
        Duration::from_millis(1),
    )
    .streaming(true);
    spec.request_timeout = Duration::from_secs(tokens as u64 * 3 + 60);
    spec.http2 = settings.streams_over_h2;
    let started = Instant::now();
    let load = tokio::spawn(load::run(spec));
    // Wait until every stream is open at the node, then sample while they sit idle.
    let node = &nodes[0].node;
    let open_deadline = Instant::now() + Duration::from_secs(120);
    while node.stats().in_flight() < streams
        && Instant::now() < open_deadline
        && !load.is_finished()
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let opened = node.stats().in_flight();
    let open_after = started.elapsed();
    tokio::time::sleep(settle).await;
    let held = router.usage();
    let held_idle_cpu = {
        let before = router.usage();
        tokio::time::sleep(window).await;
        router.usage().cpu_ms - before.cpu_ms
    };
    let result: LoadResult = load.await.map_err(|e| e.to_string())??;
    let end = router.usage();
    let per_stream_kib = (held.rss_kib.saturating_sub(idle.rss_kib)) as f64 / opened.max(1) as f64;
    report.findings.push(format!(
        "{opened} of {streams} streams open at the node after {:.1} s ({})",
        open_after.as_secs_f64(),
        if settings.streams_over_h2 {
            "clients over HTTP/2"
        } else {
            "one HTTP/1.1 connection per client stream"
        }
    ));
    report.findings.push(format!(
        "router RSS {:.1} MiB before, {:.1} MiB with the streams open: {per_stream_kib:.1} KiB per idle stream",
        idle.rss_kib as f64 / 1024.0,
        held.rss_kib as f64 / 1024.0
    ));
    report.findings.push(format!(
        "router CPU: {:.0} ms over {:.1} s with every stream open (one token per stream every {:.1} s, {:.0} tokens/s); {:.2} ms per stream over the whole run ({:.0} ms)",
        held_idle_cpu,
        window.as_secs_f64(),
        gap.as_secs_f64(),
        opened as f64 / gap.as_secs_f64(),
        (end.cpu_ms - idle.cpu_ms) / result.succeeded.max(1) as f64,
        end.cpu_ms - idle.cpu_ms
    ));
    report.runs.push(Run {
        label: "router".into(),
        nodes: peaks(&nodes, &[(0, 0)]),
        router: Some(ProcessUsage {
            cpu_ms: end.cpu_ms - idle.cpu_ms,
            ..end
        }),
        result,
    });
    router.stop().await;
    Ok(report)
}

/// The heterogeneous fleet of scenarios c and d: time to first token and token rate like a
/// small, a mid and a large GPU, with the node's own queue past its max concurrency.
async fn heterogeneous_fleet(overflow_reject: bool) -> Result<Vec<FleetNode>, String> {
    let node = |ttft_ms, inter_token_ms, max_concurrency| SimConfig {
        models: vec!["m".into()],
        ttft_ms,
        inter_token_ms,
        tokens: 32,
        jitter: 0.2,
        max_concurrency,
        overflow: if overflow_reject {
            crate::Overflow::Reject
        } else {
            crate::Overflow::Queue
        },
        ..SimConfig::default()
    };
    Ok(vec![
        FleetNode::start("fast-16", node(40, 8, 16)).await?,
        FleetNode::start("fast-4", node(40, 8, 4)).await?,
        FleetNode::start("mid-8", node(80, 15, 8)).await?,
        FleetNode::start("slow-8", node(150, 30, 8)).await?,
    ])
}

/// Requests per second the fleet can finish: each node's max concurrency over its service time.
fn fleet_capacity() -> f64 {
    let service = |ttft: f64, itl: f64| ttft / 1000.0 + 32.0 * itl / 1000.0;
    16.0 / service(40.0, 8.0)
        + 4.0 / service(40.0, 8.0)
        + 8.0 / service(80.0, 15.0)
        + 8.0 / service(150.0, 30.0)
}

/// Scenario c.
pub async fn fleet(settings: &Settings) -> Result<Report, String> {
    let mut report = Report::new(
        "fleet",
        "heterogeneous fleet: round robin, least-loaded and the default stack",
    );
    let nodes = heterogeneous_fleet(false).await?;
    let rate = (fleet_capacity() * 0.7).round();
    report.findings.push(format!(
        "fleet capacity {:.0} req/s (max concurrency over service time); offered {rate} req/s, streamed, 32 tokens, ±20% jitter",
        fleet_capacity()
    ));
    let spec = |url: String| {
        LoadSpec::chat(url, "m", Pace::Open { rate }, settings.duration).streaming(true)
    };
    let proxy = RoundRobinProxy::start(nodes.iter().map(|n| n.node.url()).collect()).await?;
    report
        .runs
        .push(measure("round robin", spec(proxy.url()), &nodes, None).await?);
    proxy.stop();
    for (label, layers) in [("least-loaded", "layers = []\n"), ("default stack", "")] {
        let config = format!(
            "{layers}{QUIET}[history]\nenabled = true\n\n{}",
            nodes_toml(&nodes, "m", |n| n.max_concurrency)
        );
        let dir = settings
            .out_dir
            .join(format!("fleet-{}", label.replace(' ', "-")));
        let router = RouterProcess::start(&settings.router_bin, &config, &dir).await?;
        report
            .runs
            .push(measure(label, spec(router.url()), &nodes, Some(&router)).await?);
        router.stop().await;
        // Let the nodes drain before the next run.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let p95 = |label: &str| {
        report
            .run(label)
            .map_or(f64::NAN, |r| r.result.latency_ms.p95)
    };
    let ttft95 = |label: &str| report.run(label).map_or(f64::NAN, |r| r.result.ttft_ms.p95);
    let latency = format!(
        "p95 end to end: default stack {:.0} ms, least-loaded {:.0} ms, round robin {:.0} ms: {:.0}% lower than round robin, {:.0}% lower than least-loaded",
        p95("default stack"),
        p95("least-loaded"),
        p95("round robin"),
        (1.0 - p95("default stack") / p95("round robin")) * 100.0,
        (1.0 - p95("default stack") / p95("least-loaded")) * 100.0,
    );
    let first_token = format!(
        "p95 time to first token: default stack {:.0} ms, least-loaded {:.0} ms, round robin {:.0} ms",
        ttft95("default stack"),
        ttft95("least-loaded"),
        ttft95("round robin"),
    );
    report.findings.extend([latency, first_token]);
    Ok(report)
}

/// Scenario d.
pub async fn overload(settings: &Settings) -> Result<Report, String> {
    let mut report = Report::new(
        "overload",
        "3× the fleet's capacity, between two phases at 70%",
    );
    let nodes = heterogeneous_fleet(false).await?;
    let capacity = fleet_capacity();
    let config = format!(
        "{QUIET}[history]\nenabled = true\n\n{}",
        nodes_toml(&nodes, "m", |n| n.max_concurrency)
    );
    let router = RouterProcess::start(
        &settings.router_bin,
        &config,
        &settings.out_dir.join("overload-router"),
    )
    .await?;
    let phase = |rate: f64, duration| {
        LoadSpec::chat(
            router.url(),
            "m",
            Pace::Open { rate: rate.round() },
            duration,
        )
        .streaming(true)
    };
    let phases = [
        ("70% load", 0.7, settings.duration),
        ("300% load", 3.0, settings.overload_duration),
        ("70% load, after", 0.7, settings.duration),
    ];
    for (label, share, duration) in phases {
        let run = measure(
            label,
            phase(capacity * share, duration),
            &nodes,
            Some(&router),
        )
        .await?;
        report.runs.push(run);
    }
    let (before, over, after) = (
        &report.runs[0].result,
        &report.runs[1].result,
        &report.runs[2].result,
    );
    report.findings.push(format!(
        "fleet capacity {capacity:.0} req/s; phases offered {:.0}, {:.0} and {:.0} req/s",
        (capacity * 0.7).round(),
        (capacity * 3.0).round(),
        (capacity * 0.7).round()
    ));
    report.findings.push(format!(
        "accepted p95 at 3×: {:.0} ms against {:.0} ms at 70% ({:.2}×); {} accepted, {} rejected, {} of them with Retry-After",
        over.latency_ms.p95,
        before.latency_ms.p95,
        over.latency_ms.p95 / before.latency_ms.p95.max(1e-9),
        over.succeeded,
        over.errors.values().sum::<u64>(),
        over.with_retry_after
    ));
    let above: Vec<String> = nodes
        .iter()
        .enumerate()
        .filter_map(|(i, n)| {
            let peak = report
                .runs
                .iter()
                .filter_map(|r| r.nodes.get(i))
                .map(|p| p.peak_in_flight)
                .max()?;
            (peak > n.max_concurrency)
                .then(|| format!("{} ({peak} > {})", n.name, n.max_concurrency))
        })
        .collect();
    report.findings.push(if above.is_empty() {
        "no node ever held more than its max concurrency".into()
    } else {
        format!("nodes above their max concurrency: {}", above.join(", "))
    });
    let five_xx: u64 = report
        .runs
        .iter()
        .flat_map(|r| r.result.errors.iter())
        .filter(|(k, _)| k.starts_with('5'))
        .map(|(_, v)| v)
        .sum();
    report
        .findings
        .push(format!("5xx answers in all phases: {five_xx}"));
    report.findings.push(format!(
        "recovery: at 70% after the overload p95 is {:.0} ms ({:.2}× the first phase), {} errors",
        after.latency_ms.p95,
        after.latency_ms.p95 / before.latency_ms.p95.max(1e-9),
        after.errors.values().sum::<u64>()
    ));
    router.stop().await;
    Ok(report)
}

/// A minimal round-robin reverse proxy: the baseline of scenario c, as nginx's default
/// upstream policy would do it.
struct RoundRobinProxy {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl RoundRobinProxy {
    async fn start(upstreams: Vec<String>) -> Result<Self, String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let upstreams: std::sync::Arc<[String]> = upstreams.into();
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let client = load::client();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (upstreams, next, client) = (upstreams.clone(), next.clone(), client.clone());
                let service = hyper::service::service_fn(
                    move |request: http::Request<hyper::body::Incoming>| {
                        let (upstreams, next, client) =
                            (upstreams.clone(), next.clone(), client.clone());
                        async move {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                                % upstreams.len();
                            let (mut parts, body) = request.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                            parts.uri = format!("{}{path}", upstreams[i])
                                .parse()
                                .unwrap_or_default();
                            let response = client
                                .request(http::Request::from_parts(parts, Full::new(body)))
                                .await;
                            Ok::<_, std::convert::Infallible>(match response {
                                Ok(r) => r.map(|b| b.boxed()),
                                Err(_) => http::Response::builder()
                                    .status(502)
                                    .body(
                                        Full::new(Bytes::new())
                                            .map_err(|never| match never {})
                                            .boxed(),
                                    )
                                    .unwrap_or_default(),
                            })
                        }
                    },
                );
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { addr, task })
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn stop(self) {
        self.task.abort();
    }
}
