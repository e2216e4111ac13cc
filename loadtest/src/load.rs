//! The load generator behind `llm-loadtest`: closed or open loop, streaming or not, over HTTP/1.1
//! with pooled keep-alive connections.
//!
//! A **closed loop** keeps `connections` requests in flight: each worker sends its next request
//! when the previous answer has ended. It measures throughput. An **open loop** starts requests
//! at a fixed rate whatever the answers do; latency is counted from the moment a request was
//! due, not from when it was sent, so a stalled generator cannot hide queueing (coordinated
//! omission), beyond the first millisecond, which is the timer's resolution. It measures latency
//! at a given load.
//!
//! For each request it records the end-to-end latency (until the last body byte) and the time to
//! first token: the first non-empty body frame of a stream, or the whole answer when not
//! streaming. Answers are grouped by status; transport failures by kind.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

/// How requests are paced.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Pace {
    /// This many requests in flight at all times.
    Closed {
        /// Concurrent connections.
        connections: usize,
    },
    /// This many requests started per second.
    Open {
        /// Requests per second.
        rate: f64,
    },
}

/// One load run.
#[derive(Debug, Clone, Serialize)]
pub struct LoadSpec {
    /// Base URL of the router or node, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    /// Path to POST to.
    pub path: String,
    /// The `model` of every request.
    pub model: String,
    /// Ask for a streamed (SSE) answer.
    pub stream: bool,
    /// `max_tokens` of every request, if set.
    pub max_tokens: Option<u32>,
    /// Pacing.
    pub pace: Pace,
    /// How long requests are started for. Requests in flight at the end are awaited.
    pub duration: Duration,
    /// A request not answered to its last byte within this counts as a `timeout` error.
    pub request_timeout: Duration,
    /// Sent as `Authorization: Bearer`, if set.
    #[serde(skip)]
    pub api_key: Option<String>,
    /// Use HTTP/2 (prior knowledge), with at most [`H2_STREAMS_PER_CONNECTION`] requests on
    /// each connection, instead of one HTTP/1.1 connection per request in flight.
    pub http2: bool,
}

/// Requests in flight on one HTTP/2 connection of the load generator (below the 200 that
/// servers commonly allow).
pub const H2_STREAMS_PER_CONNECTION: usize = 100;

impl LoadSpec {
    /// A non-streaming chat load of `model` at `url`, for `duration`.
    pub fn chat(
        url: impl Into<String>,
        model: impl Into<String>,
        pace: Pace,
        duration: Duration,
    ) -> Self {
        Self {
            url: url.into(),
            path: "/v1/chat/completions".into(),
            model: model.into(),
            stream: false,
            max_tokens: None,
            pace,
            duration,
            request_timeout: Duration::from_secs(30),
            api_key: None,
            http2: false,
        }
    }

    /// The same load for another duration.
    pub fn lasting(mut self, duration: Duration) -> Self {
        self.duration = duration;
        self
    }

    /// The same load, streamed or not.
    pub fn streaming(mut self, stream: bool) -> Self {
        self.stream = stream;
        self
    }

    fn body(&self) -> Bytes {
        let mut body = serde_json::json!({
            "model": self.model,
            "messages": [{"role": "user", "content": "Say something about routers."}],
            "stream": self.stream,
        });
        if let Some(max) = self.max_tokens {
            body["max_tokens"] = max.into();
        }
        Bytes::from(body.to_string())
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Percentiles {
    fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            p50: ms(histogram.value_at_quantile(0.50)),
            p95: ms(histogram.value_at_quantile(0.95)),
            p99: ms(histogram.value_at_quantile(0.99)),
            max: ms(histogram.max()),
            mean: histogram.mean() / 1000.0,
        }
    }
}

/// What one load run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    /// What was run.
    pub spec: LoadSpec,
    /// Requests started.
    pub requests: u64,
    /// Requests answered 2xx to the last byte.
    pub succeeded: u64,
    /// Wall time from the first request to the last answer, in seconds.
    pub elapsed_s: f64,
    /// Successful requests per second of `elapsed_s`.
    pub throughput: f64,
    /// End-to-end latency of successful requests.
    pub latency_ms: Percentiles,
    /// Time to first token of successful requests.
    pub ttft_ms: Percentiles,
    /// Failures: HTTP status codes (`"429"`), `stream_error` (an SSE stream that ended with an
    /// error event), or `connect`, `timeout`, `body` (no whole answer).
    pub errors: BTreeMap<String, u64>,
    /// 429 and 503 answers that carried `Retry-After`.
    pub with_retry_after: u64,
    /// End-to-end latency at each percentile 0, 1, ... 99, 99.9, 100, in ms (for the plot).
    pub latency_curve: Vec<(f64, f64)>,
    /// Time to first token at the same percentiles.
    pub ttft_curve: Vec<(f64, f64)>,
}

#[derive(Debug)]
struct Tally {
    latency: Histogram<u64>,
    ttft: Histogram<u64>,
    succeeded: u64,
    errors: BTreeMap<String, u64>,
    with_retry_after: u64,
}

impl Tally {
    fn new() -> Self {
        #[allow(clippy::expect_used)]
        let histogram = || {
            Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("1 µs to 1 hour at three significant digits are valid bounds")
        };
        Self {
            latency: histogram(),
            ttft: histogram(),
            succeeded: 0,
            errors: BTreeMap::new(),
            with_retry_after: 0,
        }
    }

    fn add(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Ok { latency, ttft } => {
                self.succeeded += 1;
                let _ = self.latency.record(latency.as_micros().max(1) as u64);
                let _ = self.ttft.record(ttft.as_micros().max(1) as u64);
            }
            Outcome::Failed { kind, retry_after } => {
                *self.errors.entry(kind).or_default() += 1;
                self.with_retry_after += u64::from(retry_after);
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        let _ = self.latency.add(&other.latency);
        let _ = self.ttft.add(&other.ttft);
        self.succeeded += other.succeeded;
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
        self.with_retry_after += other.with_retry_after;
    }
}

enum Outcome {
    Ok { latency: Duration, ttft: Duration },
    Failed { kind: String, retry_after: bool },
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// How an OpenAI-shaped error event starts in an SSE stream.
const ERROR_EVENT: &[u8] = b"data: {\"error\":";

/// A client for load: keep-alive, no idle limit, TCP no-delay.
pub fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(usize::MAX)
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// An HTTP/2-only client: one connection, many streams.
fn h2_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(connector)
}

/// The clients the workers of `spec` share: `base` for HTTP/1.1, or enough HTTP/2 clients (one
/// connection each) for the requests in flight.
fn clients_for(base: &HttpClient, spec: &LoadSpec, in_flight: usize) -> Vec<HttpClient> {
    if spec.http2 {
        (0..in_flight.div_ceil(H2_STREAMS_PER_CONNECTION).max(1))
            .map(|_| h2_client())
            .collect()
    } else {
        vec![base.clone()]
    }
}

/// One request, timed from `due`.
async fn one(
    client: &HttpClient,
    uri: &http::Uri,
    spec: &LoadSpec,
    body: Bytes,
    due: Instant,
) -> Outcome {
    let exchange = async {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(uri.clone())
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(key) = &spec.api_key {
            request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let request = match request.body(Full::new(body)) {
            Ok(r) => r,
            Err(_) => {
                return Outcome::Failed {
                    kind: "request".into(),
                    retry_after: false,
                };
            }
        };
        let response = match client.request(request).await {
            Ok(r) => r,
            Err(_) => {
                return Outcome::Failed {
                    kind: "connect".into(),
                    retry_after: false,
                };
            }
        };
        let status = response.status();
        let retry_after = response.headers().contains_key(header::RETRY_AFTER);
        let mut body = response.into_body();
        let mut first: Option<Duration> = None;
        let mut error_event = false;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if first.is_none() && frame.data_ref().is_some_and(|d| !d.is_empty()) {
                        first = Some(due.elapsed());
                    }
                    if spec.stream
                        && frame
                            .data_ref()
                            .is_some_and(|d| d.windows(ERROR_EVENT.len()).any(|w| w == ERROR_EVENT))
                    {
                        error_event = true;
                    }
                }
                Err(_) => {
                    return Outcome::Failed {
                        kind: "body".into(),
                        retry_after: false,
                    };
                }
            }
        }
        let latency = due.elapsed();
        if error_event {
            // Answered, but the stream ended with an error event instead of its end.
            return Outcome::Failed {
                kind: "stream_error".into(),
                retry_after: false,
            };
        }
        if status.is_success() {
            let ttft = if spec.stream {
                first.unwrap_or(latency)
            } else {
                latency
            };
            Outcome::Ok { latency, ttft }
        } else {
            Outcome::Failed {
                kind: status_kind(status),
                retry_after: retry_after
                    && matches!(
                        status,
                        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
                    ),
            }
        }
    };
    match tokio::time::timeout(spec.request_timeout, exchange).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::Failed {
            kind: "timeout".into(),
            retry_after: false,
        },
    }
}

fn status_kind(status: StatusCode) -> String {
    status.as_u16().to_string()
}

/// Runs one load and returns what it measured.
pub async fn run(spec: LoadSpec) -> Result<LoadResult, String> {
    run_with(&client(), spec).await
}

/// Runs one load on `client` (so several phases can share warm connections).
pub async fn run_with(client: &HttpClient, spec: LoadSpec) -> Result<LoadResult, String> {
    let uri: http::Uri = format!("{}{}", spec.url.trim_end_matches('/'), spec.path)
        .parse()
        .map_err(|e| format!("bad URL {}: {e}", spec.url))?;
    let body = spec.body();
    let started = Instant::now();
    let stop_at = started + spec.duration;
    let shared = Arc::new(Mutex::new(Tally::new()));
    let mut requests = 0u64;
    match spec.pace {
        Pace::Closed { connections } => {
            let clients = clients_for(client, &spec, connections);
            let mut workers = tokio::task::JoinSet::new();
            for i in 0..connections.max(1) {
                let (client, uri, spec, body, shared) = (
                    clients[i % clients.len()].clone(),
                    uri.clone(),
                    spec.clone(),
                    body.clone(),
                    shared.clone(),
                );
                workers.spawn(async move {
                    let mut tally = Tally::new();
                    let mut sent = 0u64;
                    // Every worker sends at least one request, so a very short duration
                    // still opens `connections` requests at once.
                    loop {
                        sent += 1;
                        tally.add(one(&client, &uri, &spec, body.clone(), Instant::now()).await);
                        if Instant::now() >= stop_at {
                            break;
                        }
                    }
                    if let Ok(mut total) = shared.lock() {
                        total.merge(tally);
                    }
                    sent
                });
            }
            while let Some(sent) = workers.join_next().await {
                requests += sent.unwrap_or(0);
            }
        }
        Pace::Open { rate } => {
            if rate.is_nan() || rate <= 0.0 {
                return Err(format!("rate must be above 0, not {rate}"));
            }
            let interval = Duration::from_secs_f64(1.0 / rate);
            // In-flight requests are not known ahead; a second's worth is a fair guess.
            let clients = clients_for(client, &spec, rate.ceil() as usize);
            let mut inflight = tokio::task::JoinSet::new();
            let mut due = started;
            while due < stop_at {
                tokio::time::sleep_until(due.into()).await;
                // Start every request that is due by now: a late tick does not lose requests.
                while due <= Instant::now() && due < stop_at {
                    let (client, uri, spec, body, shared) = (
                        clients[requests as usize % clients.len()].clone(),
                        uri.clone(),
                        spec.clone(),
                        body.clone(),
                        shared.clone(),
                    );
                    let at = due;
                    inflight.spawn(async move {
                        let outcome = one(&client, &uri, &spec, body, at).await;
                        if let Ok(mut total) = shared.lock() {
                            total.add(outcome);
                        }
                    });
                    requests += 1;
                    due += interval;
                }
                while inflight.try_join_next().is_some() {}
            }
            while inflight.join_next().await.is_some() {}
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let tally = std::mem::replace(
        &mut *shared
            .lock()
            .map_err(|_| "a load task panicked".to_owned())?,
        Tally::new(),
    );
    Ok(LoadResult {
        requests,
        succeeded: tally.succeeded,
        elapsed_s: elapsed,
        throughput: tally.succeeded as f64 / elapsed.max(1e-9),
        latency_ms: Percentiles::of(&tally.latency),
        ttft_ms: Percentiles::of(&tally.ttft),
        errors: tally.errors,
        with_retry_after: tally.with_retry_after,
        latency_curve: curve(&tally.latency),
        ttft_curve: curve(&tally.ttft),
        spec,
    })
}

fn curve(histogram: &Histogram<u64>) -> Vec<(f64, f64)> {
    if histogram.is_empty() {
        return Vec::new();
    }
    let mut points: Vec<f64> = (0..100).map(f64::from).collect();
    points.extend([99.5, 99.9, 100.0]);
    points
        .into_iter()
        .map(|p| (p, histogram.value_at_quantile(p / 100.0) as f64 / 1000.0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SimConfig, SimNode};

    #[tokio::test]
    async fn a_closed_loop_against_a_sim_node_counts_every_answer() {
        let node = SimNode::start(SimConfig::instant(&["m"])).await.unwrap();
        let spec = LoadSpec::chat(
            node.url(),
            "m",
            Pace::Closed { connections: 4 },
            Duration::from_millis(300),
        );
        let result = run(spec).await.unwrap();
        assert!(result.succeeded > 10, "{result:?}");
        assert_eq!(result.succeeded, result.requests, "{result:?}");
        assert_eq!(node.stats().requests(), result.requests);
        assert!(node.stats().peak_in_flight() <= 4);
        assert!(result.latency_ms.p50 > 0.0 && result.latency_ms.p50 <= result.latency_ms.p99);
        assert_eq!(result.latency_curve.len(), 103);
    }

    #[tokio::test]
    async fn an_open_loop_starts_requests_at_its_rate_and_times_streams_first_token() {
        let node = SimNode::start(SimConfig {
            ttft_ms: 30,
            inter_token_ms: 10,
            tokens: 5,
            ..SimConfig::instant(&["m"])
        })
        .await
        .unwrap();
        let spec = LoadSpec::chat(
            node.url(),
            "m",
            Pace::Open { rate: 50.0 },
            Duration::from_millis(400),
        )
        .streaming(true);
        let result = run(spec).await.unwrap();
        assert_eq!(result.requests, 20, "{result:?}");
        assert_eq!(result.succeeded, 20, "{result:?}");
        assert!(result.ttft_ms.p50 >= 30.0, "{result:?}");
        assert!(
            result.latency_ms.p50 >= result.ttft_ms.p50 + 30.0,
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn failures_are_grouped_by_status_and_transport_errors_by_kind() {
        let node = SimNode::start(SimConfig {
            failure_rate: 1.0,
            ..SimConfig::instant(&["m"])
        })
        .await
        .unwrap();
        let spec = LoadSpec::chat(
            node.url(),
            "m",
            Pace::Closed { connections: 2 },
            Duration::from_millis(100),
        );
        let result = run(spec).await.unwrap();
        assert_eq!(result.succeeded, 0);
        assert_eq!(
            result.errors.get("500").copied(),
            Some(result.requests),
            "{result:?}"
        );
        let unknown = run(LoadSpec::chat(
            "http://127.0.0.1:1",
            "m",
            Pace::Closed { connections: 1 },
            Duration::from_millis(50),
        ))
        .await
        .unwrap();
        assert!(unknown.errors.contains_key("connect"), "{unknown:?}");
    }
}
