//! Scenario reports: Markdown for people, JSON for tools, and an SVG latency plot.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::load::LoadResult;

/// The highest in-flight count one sim node saw, against its limit.
#[derive(Debug, Clone, Serialize)]
pub struct NodePeak {
    /// Node name in the scenario.
    pub node: String,
    /// Its max concurrency (0: none).
    pub max_concurrency: usize,
    /// The most requests it held at once, queued ones included.
    pub peak_in_flight: usize,
    /// Requests it received.
    pub requests: u64,
}

/// CPU and memory of the router process during one run.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcessUsage {
    /// Resident memory at the end of the run, KiB.
    pub rss_kib: u64,
    /// Peak resident memory since the process started (VmHWM), KiB.
    pub peak_rss_kib: u64,
    /// CPU time (user + system) spent during the run, ms.
    pub cpu_ms: f64,
}

/// One measured run in a scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// What it is, e.g. `direct`, `router`, `round robin`.
    pub label: String,
    /// The load's figures.
    pub result: LoadResult,
    /// Each sim node's peak.
    pub nodes: Vec<NodePeak>,
    /// The router process, when one was measured.
    pub router: Option<ProcessUsage>,
}

impl Run {
    /// CPU microseconds of the router per successful request.
    pub fn cpu_us_per_request(&self) -> Option<f64> {
        let usage = self.router?;
        (self.result.succeeded > 0).then(|| usage.cpu_ms * 1000.0 / self.result.succeeded as f64)
    }
}

/// Everything one scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name, e.g. `overhead`.
    pub scenario: String,
    /// One-line description.
    pub title: String,
    /// UTC time of the run, RFC 3339.
    pub date: String,
    /// CPU count, kernel and architecture.
    pub machine: String,
    /// The command that reproduces it.
    pub command: String,
    /// Measured runs, in order.
    pub runs: Vec<Run>,
    /// Findings and derived figures, one line each.
    pub findings: Vec<String>,
}

impl Report {
    /// A report for `scenario`, stamped with the time and machine.
    pub fn new(scenario: &str, title: &str) -> Self {
        Self {
            scenario: scenario.into(),
            title: title.into(),
            date: utc_now(),
            machine: machine(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            runs: Vec::new(),
            findings: Vec::new(),
        }
    }

    /// The run labelled `label`.
    pub fn run(&self, label: &str) -> Option<&Run> {
        self.runs.iter().find(|r| r.label == label)
    }

    /// The report as Markdown.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# {}: {}\n", self.scenario, self.title);
        let _ = writeln!(
            md,
            "- date: {}\n- machine: {}\n- command: `{}`\n",
            self.date, self.machine, self.command
        );
        md.push_str(
            "| run | load | ok | req/s | p50 ms | p95 ms | p99 ms | TTFT p50 | TTFT p95 | TTFT p99 | errors | Retry-After | router RSS MiB | CPU µs/req | node peaks (max) |\n",
        );
        md.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|\n");
        for run in &self.runs {
            let r = &run.result;
            let load = match r.spec.pace {
                crate::load::Pace::Closed { connections } => format!("closed {connections}"),
                crate::load::Pace::Open { rate } => format!("{rate:.0}/s"),
            };
            let load = if r.spec.stream {
                format!("{load} SSE")
            } else {
                load
            };
            let errors = if r.errors.is_empty() {
                "0".to_owned()
            } else {
                r.errors
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let rss = run.router.map_or("–".to_owned(), |u| {
                format!("{:.1}", u.peak_rss_kib as f64 / 1024.0)
            });
            let cpu = run
                .cpu_us_per_request()
                .map_or("–".to_owned(), |c| format!("{c:.0}"));
            let peaks = run
                .nodes
                .iter()
                .map(|n| {
                    if n.max_concurrency > 0 {
                        format!("{} ({})", n.peak_in_flight, n.max_concurrency)
                    } else {
                        n.peak_in_flight.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} |",
                run.label,
                load,
                r.succeeded,
                r.throughput,
                r.latency_ms.p50,
                r.latency_ms.p95,
                r.latency_ms.p99,
                r.ttft_ms.p50,
                r.ttft_ms.p95,
                r.ttft_ms.p99,
                errors,
                r.with_retry_after,
                rss,
                cpu,
                if peaks.is_empty() {
                    "–".into()
                } else {
                    peaks
                },
            );
        }
        if !self.findings.is_empty() {
            md.push_str("\n## Findings\n\n");
            for finding in &self.findings {
                let _ = writeln!(md, "- {finding}");
            }
        }
        let _ = writeln!(md, "\n![latency]({}.svg)", self.scenario);
        md
    }

    /// A plot of each run's latency by percentile (solid) and, for streams, its time to first
    /// token (dashed).
    pub fn svg(&self) -> String {
        let (width, height, left, right, top, bottom) = (900.0, 500.0, 70.0, 220.0, 40.0, 50.0);
        let plot_w = width - left - right;
        let plot_h = height - top - bottom;
        // The y axis stops at the highest p99.9, so one outlier does not flatten the curves.
        let y_max = self
            .runs
            .iter()
            .flat_map(|r| r.result.latency_curve.iter().chain(&r.result.ttft_curve))
            .filter(|(p, _)| *p <= 99.9)
            .map(|(_, ms)| *ms)
            .fold(0.0f64, f64::max)
            .max(0.001)
            * 1.05;
        let x = |p: f64| left + p / 100.0 * plot_w;
        let y = |ms: f64| top + plot_h - (ms.min(y_max) / y_max) * plot_h;
        let colors = [
            "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
        ];
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            svg,
            r#"<text x="{left}" y="24" font-size="15">{}: latency by percentile (ms)</text>"#,
            escape(&self.scenario)
        );
        for i in 0..=5 {
            let ms = y_max * f64::from(i) / 5.0;
            let _ = writeln!(
                svg,
                r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                left + plot_w,
                left - 6.0,
                y(ms) + 4.0,
                format_ms(ms),
                y = y(ms)
            );
        }
        for p in [0.0, 25.0, 50.0, 75.0, 90.0, 99.0] {
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">p{p}</text>"#,
                x(p),
                top + plot_h + 18.0
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">percentile</text>"#,
            left + plot_w / 2.0,
            height - 10.0
        );
        for (i, run) in self.runs.iter().enumerate() {
            let color = colors[i % colors.len()];
            let mut line = |curve: &[(f64, f64)], dash: &str| {
                if curve.is_empty() {
                    return;
                }
                let points: Vec<String> = curve
                    .iter()
                    .filter(|(p, _)| *p <= 99.9)
                    .map(|(p, ms)| format!("{:.1},{:.1}", x(*p), y(*ms)))
                    .collect();
                let _ = writeln!(
                    svg,
                    r#"<polyline fill="none" stroke="{color}" stroke-width="2" {dash} points="{}"/>"#,
                    points.join(" ")
                );
            };
            line(&run.result.latency_curve, "");
            if run.result.spec.stream {
                line(&run.result.ttft_curve, r#"stroke-dasharray="6 4""#);
            }
            let ly = top + 16.0 * i as f64 + 10.0;
            let _ = writeln!(
                svg,
                r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
                width - right + 10.0,
                width - right + 30.0,
                width - right + 36.0,
                ly + 4.0,
                escape(&run.label)
            );
        }
        if self.runs.iter().any(|r| r.result.spec.stream) {
            let ly = top + 16.0 * self.runs.len() as f64 + 14.0;
            let _ = writeln!(
                svg,
                r#"<text x="{}" y="{ly}">solid: end to end; dashed: first token</text>"#,
                width - right + 10.0
            );
        }
        svg.push_str("</svg>\n");
        svg
    }

    /// Writes `<scenario>.md`, `<scenario>.json` and `<scenario>.svg` into `dir`, and returns
    /// the Markdown file's path.
    pub fn write(&self, dir: &Path) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.join(format!("{}.json", self.scenario)), json)?;
        std::fs::write(dir.join(format!("{}.svg", self.scenario)), self.svg())?;
        let md = dir.join(format!("{}.md", self.scenario));
        std::fs::write(&md, self.markdown())?;
        Ok(md)
    }
}

fn format_ms(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.0}")
    } else if ms >= 1.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The time now in UTC, `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_from_unix(secs)
}

/// `secs` after 1970-01-01 UTC as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc_from_unix(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// CPU count, model, kernel and architecture of this machine.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpus} CPUs ({model}), Linux {}, {}",
        kernel.trim(),
        std::env::consts::ARCH
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates_are_civil_dates() {
        assert_eq!(utc_from_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_from_unix(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_from_unix(1_795_597_254), "2026-11-25T09:00:54Z");
        assert_eq!(utc_now().len(), 20);
    }
}
