//! The soak: a long mixed load (streamed and not) through the release router, with one sim node
//! killed and brought back on its address every `kill_every`. It checks that no request is lost
//! without an answer, that the history holds one row per answered request (less the counted
//! drops), and that the router's memory is flat after warm-up.

use std::time::{Duration, Instant};

use crate::load::{self, LoadSpec, Pace};
use crate::report::{Report, Run};
use crate::scenario::{RouterProcess, Settings, process_usage};
use crate::sim::{SimConfig, SimNode};

/// Failure kinds in a [`load::LoadResult`] that mean no HTTP answer reached the client.
const UNANSWERED: [&str; 4] = ["connect", "body", "timeout", "request"];

/// Settings of the soak beyond [`Settings`].
#[derive(Debug, Clone, Copy)]
pub struct SoakSettings {
    /// How long the load runs.
    pub duration: Duration,
    /// One node is killed this often, and comes back `down_for` later.
    pub kill_every: Duration,
    /// How long a killed node stays down.
    pub down_for: Duration,
    /// Requests per second, half streamed, half not.
    pub rate: f64,
}

impl Default for SoakSettings {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(600),
            kill_every: Duration::from_secs(60),
            down_for: Duration::from_secs(5),
            rate: 80.0,
        }
    }
}

fn node_config() -> SimConfig {
    SimConfig {
        models: vec!["m".into()],
        ttft_ms: 20,
        inter_token_ms: 10,
        tokens: 20,
        jitter: 0.2,
        max_concurrency: 16,
        ..SimConfig::default()
    }
}

/// Least-squares slope of `points`, in y units per x unit.
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), (x, y)| {
        (
            num + (x - mean_x) * (y - mean_y),
            den + (x - mean_x) * (x - mean_x),
        )
    });
    if den == 0.0 { 0.0 } else { num / den }
}

/// Runs the soak; see the module docs.
pub async fn soak(settings: &Settings, soak: SoakSettings) -> Result<Report, String> {
    let mut report = Report::new(
        "soak",
        "mixed load with a node killed and restarted on a schedule",
    );
    let mut nodes: Vec<Option<SimNode>> = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..3 {
        let node = SimNode::start(node_config())
            .await
            .map_err(|e| format!("cannot start a sim node: {e}"))?;
        addrs.push(node.addr());
        nodes.push(Some(node));
    }
    let nodes_toml: String = addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            format!(
                "[[nodes]]\nid = \"n{i}\"\nurl = \"http://{addr}\"\nmodels = [\"m\"]\nmax_concurrency = 16\n"
            )
        })
        .collect();
    let config = format!(
        "[log]\nlevel = \"warn\"\n[history]\nenabled = true\nflush_interval_ms = 200\n\
         [health]\ninterval_ms = 1000\neject_base_ms = 500\neject_max_ms = 2000\n{nodes_toml}"
    );
    const TOKEN: &str = "soak-admin";
    let dir = settings.out_dir.join("soak-router");
    // The history of an earlier run would be counted with this one's.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.join(format!("llm-router.db{suffix}")));
    }
    let router = RouterProcess::start_with_env(
        &settings.router_bin,
        &config,
        &dir,
        &[("LLM_ROUTER_ADMIN_TOKEN", TOKEN)],
    )
    .await?;
    let pid = router.pid().ok_or("the router has no pid")?;
    let half = Pace::Open {
        rate: (soak.rate / 2.0).max(1.0),
    };
    let streamed = LoadSpec::chat(router.url(), "m", half, soak.duration).streaming(true);
    let plain = LoadSpec::chat(router.url(), "m", half, soak.duration);
    eprintln!(
        "  soak: {:.0} req/s for {} s, a node killed every {} s",
        soak.rate,
        soak.duration.as_secs(),
        soak.kill_every.as_secs_f64()
    );

    let started = Instant::now();
    let load = async { tokio::join!(load::run(streamed), load::run(plain)) };
    let chaos = async {
        let mut kills = 0usize;
        let mut rss: Vec<(f64, f64)> = Vec::new();
        let mut next_kill = started + soak.kill_every;
        let mut back_at: Option<(Instant, usize)> = None;
        while started.elapsed() < soak.duration {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = Instant::now();
            let t = started.elapsed().as_secs_f64();
            if rss.last().is_none_or(|(last, _)| t - last >= 5.0) {
                rss.push((t, process_usage(pid).rss_kib as f64 / 1024.0));
            }
            if back_at.is_none() && now >= next_kill {
                let victim = kills % nodes.len();
                if let Some(node) = nodes[victim].take() {
                    node.stop().await;
                }
                kills += 1;
                back_at = Some((now + soak.down_for, victim));
                next_kill += soak.kill_every;
            }
            if let Some((at, victim)) = back_at
                && now >= at
            {
                match SimNode::bind(node_config(), addrs[victim]).await {
                    Ok(node) => {
                        nodes[victim] = Some(node);
                        back_at = None;
                    }
                    // The port may linger a moment; try again on the next tick.
                    Err(error) => eprintln!("    node {victim} cannot come back yet: {error}"),
                }
            }
        }
        (kills, rss)
    };
    let ((streamed, plain), (kills, rss)) = tokio::join!(load, chaos);
    let (streamed, plain) = (streamed?, plain?);

    // Let the history writer catch up, then compare.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let base = router.url();
    let stats = crate::scenario::get_json(&format!("{base}/api/stats"), Some(TOKEN)).await?;
    let rows = stats["total"].as_u64().unwrap_or(0);
    let metrics = crate::scenario::get_text(&format!("{base}/metrics"), None).await?;
    let dropped = metrics
        .lines()
        .find_map(|l| l.strip_prefix("llm_router_history_rows_total{outcome=\"dropped\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let usage = router.usage();
    router.stop().await;

    let mut sent = 0;
    let mut unanswered = 0;
    let mut answered = 0;
    for result in [&streamed, &plain] {
        sent += result.requests;
        let lost: u64 = UNANSWERED
            .iter()
            .map(|k| result.errors.get(*k).copied().unwrap_or(0))
            .sum();
        unanswered += lost;
        answered += result.requests - lost;
    }
    for (label, result) in [("streamed", streamed), ("not streamed", plain)] {
        report.runs.push(Run {
            label: label.into(),
            result,
            nodes: Vec::new(),
            router: Some(usage),
        });
    }
    let warm = rss
        .iter()
        .copied()
        .filter(|(t, _)| *t >= soak.duration.as_secs_f64() * 0.2)
        .collect::<Vec<_>>();
    let per_min = slope(&warm) * 60.0;
    let span_min = warm
        .last()
        .zip(warm.first())
        .map_or(0.0, |(l, f)| (l.0 - f.0) / 60.0);
    let (low, high) = warm.iter().fold((f64::MAX, 0.0f64), |(lo, hi), (_, y)| {
        (lo.min(*y), hi.max(*y))
    });
    report.findings.push(format!(
        "{sent} requests sent, {answered} answered, {unanswered} lost without an answer; {kills} node kills"
    ));
    report.findings.push(format!(
        "history: {rows} rows, {dropped} counted drops; answered minus drops = {} ({})",
        answered.saturating_sub(dropped),
        if rows + dropped == answered {
            "equal"
        } else {
            "NOT equal"
        }
    ));
    report.findings.push(format!(
        "router RSS after warm-up (from {:.0} s): {low:.1} to {high:.1} MiB, trend {per_min:+.3} MiB/min over {span_min:.1} min",
        soak.duration.as_secs_f64() * 0.2
    ));
    let samples: Vec<String> = rss
        .iter()
        .step_by(6)
        .map(|(t, mib)| format!("{t:.0} s: {mib:.1}"))
        .collect();
    report
        .findings
        .push(format!("RSS samples (MiB): {}", samples.join(", ")));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slope_of_a_line_is_its_gradient() {
        let line: Vec<(f64, f64)> = (0..10).map(|x| (x as f64, 3.0 + 0.5 * x as f64)).collect();
        assert!((slope(&line) - 0.5).abs() < 1e-9);
        assert_eq!(slope(&[(1.0, 2.0)]), 0.0);
        let flat: Vec<(f64, f64)> = (0..10).map(|x| (x as f64, 7.0)).collect();
        assert_eq!(slope(&flat), 0.0);
    }
}
