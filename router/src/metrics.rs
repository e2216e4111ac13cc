//! `/metrics`: Prometheus (OpenMetrics) text.
//!
//! Request counts by model and status, and latency and time-to-first-byte histograms by model,
//! are kept as requests finish. Gauges (in flight per node, node health, queue length) and the
//! counters other parts own (admission decisions, history rows) are read when scraped. Model
//! labels are limited to models the pool knows, so clients cannot grow the label set by sending
//! made-up names.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use layers::{AdmissionCounters, NodePool};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    model: Arc<str>,
    status: u16,
}

/// Labels of the histograms.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: Arc<str>,
}

fn seconds_histogram() -> Histogram {
    // 5 ms to about 80 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

type HistogramFamily = Family<ModelLabels, Histogram, fn() -> Histogram>;

/// The router's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily,
    ttfb: HistogramFamily,
    /// The series each model label and status has counted into, by model label: a family
    /// lookup hashes its labels with SipHash under a lock (three per request, about 1k
    /// instructions); a clone of a series shares it, so the families still expose what these
    /// count. Written once per new label and status; read without a lock.
    series: ArcSwap<SeriesByModel>,
}

type SeriesByModel = HashMap<Arc<str>, Vec<Series>, foldhash::fast::RandomState>;

/// One model's and status's series.
#[derive(Clone)]
struct Series {
    status: u16,
    requests: Counter,
    latency: Histogram,
    /// Made at the first request with a time to first byte, as the family would.
    ttfb: Option<Histogram>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = HistogramFamily::new_with_constructor(seconds_histogram);
        let ttfb = HistogramFamily::new_with_constructor(seconds_histogram);
        registry.register(
            "llm_router_requests",
            "Requests answered, by model and HTTP status",
            requests.clone(),
        );
        registry.register(
            "llm_router_request_duration_seconds",
            "Time from request to the last byte of the answer",
            latency.clone(),
        );
        registry.register(
            "llm_router_time_to_first_byte_seconds",
            "Time from request to the answer's headers",
            ttfb.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            ttfb,
            series: ArcSwap::default(),
        }
    }
}

impl Series {
    fn observe(&self, latency: Duration, ttfb: Option<Duration>) {
        self.requests.inc();
        self.latency.observe(latency.as_secs_f64());
        if let (Some(ttfb), Some(histogram)) = (ttfb, &self.ttfb) {
            histogram.observe(ttfb.as_secs_f64());
        }
    }
}

/// The label for `model`: itself if the pool knows it, `other` if not, `none` if absent. Shared,
/// not copied: labels are made for every request.
pub fn model_label(pool: &NodePool, model: Option<&str>) -> Arc<str> {
    static NONE: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("none"));
    static OTHER: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("other"));
    match model {
        None => NONE.clone(),
        Some(m) => pool
            .snapshot()
            .known_model(m)
            .map_or_else(|| OTHER.clone(), Arc::clone),
    }
}

/// Counters read at scrape time.
pub struct Sources<'a> {
    /// The node pool.
    pub pool: &'a NodePool,
    /// Admission decisions.
    pub admission: &'a AdmissionCounters,
    /// History rows written.
    pub history_written: u64,
    /// History rows dropped.
    pub history_dropped: u64,
    /// Client connections refused at the connection limit.
    pub connections_refused: u64,
}

impl Metrics {
    /// Records one finished request.
    pub fn observe(&self, model: Arc<str>, status: u16, latency: Duration, ttfb: Option<Duration>) {
        let known = self.series.load();
        let found = known
            .get(&*model)
            .and_then(|all| all.iter().find(|s| s.status == status))
            .filter(|s| ttfb.is_none() || s.ttfb.is_some());
        match found {
            Some(series) => series.observe(latency, ttfb),
            None => {
                drop(known);
                self.new_series(model, status, ttfb.is_some())
                    .observe(latency, ttfb);
            }
        }
    }

    /// The series for `model` and `status` from the families, kept for the next request.
    fn new_series(&self, model: Arc<str>, status: u16, with_ttfb: bool) -> Series {
        let labels = ModelLabels {
            model: model.clone(),
        };
        let series = Series {
            status,
            requests: self
                .requests
                .get_or_create(&RequestLabels {
                    model: model.clone(),
                    status,
                })
                .clone(),
            latency: self.latency.get_or_create(&labels).clone(),
            ttfb: with_ttfb.then(|| self.ttfb.get_or_create(&labels).clone()),
        };
        self.series.rcu(|known| {
            let mut known = SeriesByModel::clone(known);
            let all = known.entry(model.clone()).or_default();
            all.retain(|s| s.status != status);
            all.push(series.clone());
            known
        });
        series
    }

    /// The text exposition.
    pub fn render(&self, sources: &Sources<'_>) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        // The encoder ends with `# EOF`; our scrape-time families go before it.
        if out.ends_with("# EOF\n") {
            out.truncate(out.len() - "# EOF\n".len());
        }
        let snapshot = sources.pool.snapshot();
        let _ = writeln!(
            out,
            "# HELP llm_router_node_in_flight Requests holding a slot on the node."
        );
        let _ = writeln!(out, "# TYPE llm_router_node_in_flight gauge");
        for node in snapshot.nodes() {
            let _ = writeln!(
                out,
                "llm_router_node_in_flight{{node=\"{}\"}} {}",
                escape(node.id()),
                node.state().in_flight()
            );
        }
        let _ = writeln!(
            out,
            "# HELP llm_router_node_up Whether the node may take requests (healthy, not draining)."
        );
        let _ = writeln!(out, "# TYPE llm_router_node_up gauge");
        for node in snapshot.nodes() {
            let _ = writeln!(
                out,
                "llm_router_node_up{{node=\"{}\"}} {}",
                escape(node.id()),
                u8::from(node.is_eligible())
            );
        }
        let _ = writeln!(
            out,
            "# HELP llm_router_queue_waiting Requests waiting for a free node slot."
        );
        let _ = writeln!(out, "# TYPE llm_router_queue_waiting gauge");
        let _ = writeln!(out, "llm_router_queue_waiting {}", sources.pool.waiting());
        let _ = writeln!(
            out,
            "# HELP llm_router_admission_decisions Admission decisions."
        );
        let _ = writeln!(out, "# TYPE llm_router_admission_decisions counter");
        for (decision, counter) in [
            ("accept", &sources.admission.accepted),
            ("delay", &sources.admission.delayed),
            ("reject", &sources.admission.rejected),
        ] {
            let _ = writeln!(
                out,
                "llm_router_admission_decisions_total{{decision=\"{decision}\"}} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP llm_router_history_rows Request history rows, written or dropped."
        );
        let _ = writeln!(out, "# TYPE llm_router_history_rows counter");
        let _ = writeln!(
            out,
            "llm_router_history_rows_total{{outcome=\"written\"}} {}",
            sources.history_written
        );
        let _ = writeln!(
            out,
            "llm_router_history_rows_total{{outcome=\"dropped\"}} {}",
            sources.history_dropped
        );
        let _ = writeln!(
            out,
            "# HELP llm_router_connections_refused Client connections refused at the connection limit."
        );
        let _ = writeln!(out, "# TYPE llm_router_connections_refused counter");
        let _ = writeln!(
            out,
            "llm_router_connections_refused_total {}",
            sources.connections_refused
        );
        out.push_str("# EOF\n");
        out
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use layers::NodeSpec;

    use super::*;

    #[test]
    fn series_kept_for_reuse_count_into_the_exposed_families() {
        let pool =
            NodePool::from_specs([NodeSpec::new("a", "http://127.0.0.1:1").models(["m"])]).unwrap();
        let metrics = Metrics::default();
        let m = || model_label(&pool, Some("m"));
        let ms = Duration::from_millis;
        // The first without a first byte: its series has no ttfb histogram yet.
        metrics.observe(m(), 200, ms(10), None);
        metrics.observe(m(), 200, ms(10), Some(ms(2)));
        metrics.observe(m(), 200, ms(10), Some(ms(2)));
        metrics.observe(m(), 503, ms(1), None);
        let text = metrics.render(&Sources {
            pool: &pool,
            admission: &AdmissionCounters::default(),
            history_written: 0,
            history_dropped: 0,
            connections_refused: 0,
        });
        for line in [
            "llm_router_requests_total{model=\"m\",status=\"200\"} 3",
            "llm_router_requests_total{model=\"m\",status=\"503\"} 1",
            "llm_router_request_duration_seconds_count{model=\"m\"} 4",
            "llm_router_time_to_first_byte_seconds_count{model=\"m\"} 2",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        let kept = metrics.series.load();
        let statuses: Vec<u16> = kept["m"].iter().map(|s| s.status).collect();
        assert_eq!(
            statuses,
            [200, 503],
            "one series per status, replaced not repeated"
        );
    }

    #[test]
    fn renders_requests_gauges_and_counters() {
        let pool =
            NodePool::from_specs([NodeSpec::new("a\"b", "http://127.0.0.1:1").models(["m"])])
                .unwrap();
        let metrics = Metrics::default();
        metrics.observe(
            model_label(&pool, Some("m")),
            200,
            Duration::from_millis(30),
            Some(Duration::from_millis(5)),
        );
        metrics.observe(
            model_label(&pool, Some("made-up")),
            404,
            Duration::from_millis(1),
            None,
        );
        let admission = AdmissionCounters::default();
        admission.rejected.fetch_add(3, Ordering::Relaxed);
        let text = metrics.render(&Sources {
            pool: &pool,
            admission: &admission,
            history_written: 2,
            history_dropped: 1,
            connections_refused: 0,
        });
        assert!(
            text.contains("llm_router_requests_total{model=\"m\",status=\"200\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("llm_router_requests_total{model=\"other\",status=\"404\"} 1"),
            "{text}"
        );
        assert!(!text.contains("made-up"));
        assert!(
            text.contains("llm_router_request_duration_seconds_bucket{le=\"0.04\",model=\"m\"} 1")
                || text.contains("llm_router_request_duration_seconds_count{model=\"m\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("llm_router_node_in_flight{node=\"a\\\"b\"} 0"),
            "{text}"
        );
        assert!(text.contains("llm_router_admission_decisions_total{decision=\"reject\"} 3"));
        assert!(text.contains("llm_router_history_rows_total{outcome=\"dropped\"} 1"));
        assert!(text.ends_with("# EOF\n"));
        assert_eq!(text.matches("# EOF").count(), 1);
    }
}
