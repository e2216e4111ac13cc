//! `llm-sim-node`: a simulated OpenAI-compatible inference node.
//!
//! It answers `/v1/chat/completions` (streaming and not, with `usage` and
//! `stream_options.include_usage`), `/v1/completions`, `/v1/embeddings`, `/v1/models` and
//! `/health` with the timing of a real node: time to first token, a gap between tokens, jitter,
//! a concurrency limit that queues or answers 503 past it, and chosen rates of failures (500) and
//! hangs (accepts and never answers).
//!
//! It counts the TCP connections it accepts, the requests it receives, and the peak number it
//! held at once (counting queued ones), in [`SimStats`] and at `GET /sim/stats`. Tests start it
//! in-process with [`SimNode::start`] on a port the OS picks, and stop it with [`SimNode::stop`],
//! which closes every connection at once, like a crash.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use futures_util::stream;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

/// What a node does with requests past its max concurrency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    /// Hold them until a slot frees (like vLLM's scheduler).
    #[default]
    Queue,
    /// Answer 503 at once.
    Reject,
}

/// How a simulated node behaves.
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize)]
pub struct SimConfig {
    /// Models the node serves.
    #[arg(long, value_delimiter = ',', default_value = "sim-model")]
    pub models: Vec<String>,
    /// Time to first token, in milliseconds.
    #[arg(long = "ttft-ms", default_value_t = 20)]
    pub ttft_ms: u64,
    /// Time between tokens, in milliseconds.
    #[arg(long = "itl-ms", default_value_t = 5)]
    pub inter_token_ms: u64,
    /// Tokens per answer (unless the request's `max_tokens` is lower).
    #[arg(long, default_value_t = 16)]
    pub tokens: usize,
    /// Random spread of every delay, as a fraction (0.2 = plus or minus 20%).
    #[arg(long, default_value_t = 0.0)]
    pub jitter: f64,
    /// Requests handled at once; 0 means no limit.
    #[arg(long, default_value_t = 0)]
    pub max_concurrency: usize,
    /// What happens past max concurrency.
    #[arg(long, value_enum, default_value_t = Overflow::Queue)]
    pub overflow: Overflow,
    /// Fraction of requests answered with 500.
    #[arg(long, default_value_t = 0.0)]
    pub failure_rate: f64,
    /// Fraction of requests that are never answered.
    #[arg(long, default_value_t = 0.0)]
    pub hang_rate: f64,
    /// Length of embedding vectors.
    #[arg(long, default_value_t = 8)]
    pub embedding_dim: usize,
    /// A stream sends this many tokens and then nothing more, without closing; 0 never stalls.
    #[arg(long, default_value_t = 0)]
    pub stall_after: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            models: vec!["sim-model".into()],
            ttft_ms: 20,
            inter_token_ms: 5,
            tokens: 16,
            jitter: 0.0,
            max_concurrency: 0,
            overflow: Overflow::Queue,
            failure_rate: 0.0,
            hang_rate: 0.0,
            embedding_dim: 8,
            stall_after: 0,
        }
    }
}

impl SimConfig {
    /// A node serving `models` that answers at once (no delays).
    pub fn instant(models: &[&str]) -> Self {
        Self {
            models: models.iter().map(|m| m.to_string()).collect(),
            ttft_ms: 0,
            inter_token_ms: 0,
            tokens: 4,
            ..Self::default()
        }
    }
}

/// What a node has seen. All counters only grow, except `in_flight`.
#[derive(Debug, Default)]
pub struct SimStats {
    connections: AtomicU64,
    requests: AtomicU64,
    in_flight: AtomicUsize,
    peak_in_flight: AtomicUsize,
    completed: AtomicU64,
    arrivals: Mutex<Vec<String>>,
}

/// Most `user` tags kept in the arrival log, so a long benchmark cannot grow it without bound.
const MAX_ARRIVALS: usize = 100_000;

/// A copy of [`SimStats`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// TCP connections accepted.
    pub connections: u64,
    /// Inference requests received (chat, completions, embeddings).
    pub requests: u64,
    /// Inference requests being handled or queued now.
    pub in_flight: usize,
    /// The most inference requests held at once, queued ones included.
    pub peak_in_flight: usize,
    /// Inference requests answered to the end.
    pub completed: u64,
}

impl SimStats {
    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            connections: self.connections.load(Ordering::SeqCst),
            requests: self.requests.load(Ordering::SeqCst),
            in_flight: self.in_flight.load(Ordering::SeqCst),
            peak_in_flight: self.peak_in_flight.load(Ordering::SeqCst),
            completed: self.completed.load(Ordering::SeqCst),
        }
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// The most requests held at once so far.
    pub fn peak_in_flight(&self) -> usize {
        self.peak_in_flight.load(Ordering::SeqCst)
    }

    /// Starts a new peak: from now on [`peak_in_flight`](Self::peak_in_flight) counts from the
    /// requests held now.
    pub fn reset_peak(&self) {
        self.peak_in_flight
            .store(self.in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// Requests being handled now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Requests answered to the end so far.
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::SeqCst)
    }

    /// The `user` field of each inference request that had one, in the order they arrived
    /// (the first 100,000).
    pub fn arrivals(&self) -> Vec<String> {
        self.arrivals.lock().map(|a| a.clone()).unwrap_or_default()
    }

    fn note_arrival(&self, body: &Value) {
        if let Some(tag) = body.get("user").and_then(Value::as_str)
            && let Ok(mut arrivals) = self.arrivals.lock()
            && arrivals.len() < MAX_ARRIVALS
        {
            arrivals.push(tag.to_owned());
        }
    }
}

/// Counts one request as held until dropped (at the end of its body, or when the client goes).
struct Held {
    stats: Arc<SimStats>,
    _permit: Option<OwnedSemaphorePermit>,
    finished: bool,
}

impl Held {
    fn new(stats: Arc<SimStats>) -> Self {
        stats.requests.fetch_add(1, Ordering::SeqCst);
        let now = stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        stats.peak_in_flight.fetch_max(now, Ordering::SeqCst);
        Self {
            stats,
            _permit: None,
            finished: false,
        }
    }

    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.finished {
            self.stats.completed.fetch_add(1, Ordering::SeqCst);
        }
    }
}

struct Sim {
    config: SimConfig,
    addr: SocketAddr,
    stats: Arc<SimStats>,
    gate: Option<Arc<Semaphore>>,
    next_id: AtomicU64,
}

type SharedSim = Arc<Sim>;

/// A running simulated node.
pub struct SimNode {
    addr: SocketAddr,
    stats: Arc<SimStats>,
    server: JoinHandle<()>,
}

impl std::fmt::Debug for SimNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNode").field("addr", &self.addr).finish()
    }
}

impl SimNode {
    /// Starts a node on 127.0.0.1, on a port the OS picks.
    pub async fn start(config: SimConfig) -> std::io::Result<Self> {
        Self::bind(config, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts a node on `addr`.
    ///
    /// The accept queue holds 4,096 connections (tokio's `bind` gives 1,024): a router opening
    /// thousands of streams at once must not find the sim node's queue full, or its connects
    /// wait on SYN retransmits and time out, and the test measures the sim node, not the router.
    pub async fn bind(config: SimConfig, addr: SocketAddr) -> std::io::Result<Self> {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(4096)?;
        Ok(Self::serve(config, listener))
    }

    /// Serves on an already bound listener.
    pub fn serve(config: SimConfig, listener: TcpListener) -> Self {
        let stats = Arc::new(SimStats::default());
        let gate =
            (config.max_concurrency > 0).then(|| Arc::new(Semaphore::new(config.max_concurrency)));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let sim = Arc::new(Sim {
            config,
            addr,
            stats: stats.clone(),
            gate,
            next_id: AtomicU64::new(1),
        });
        let server = tokio::spawn(accept_loop(listener, app(sim), stats.clone()));
        Self {
            addr,
            stats,
            server,
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its counters.
    pub fn stats(&self) -> &Arc<SimStats> {
        &self.stats
    }

    /// Stops at once: the listener and every open connection close, mid-stream or not.
    pub async fn stop(self) {
        self.server.abort();
        let _ = self.server.await;
    }

    /// Runs until the task ends (for the binary).
    pub async fn wait(self) {
        let _ = self.server.await;
    }
}

async fn accept_loop(listener: TcpListener, app: Router, stats: Arc<SimStats>) {
    // Connection tasks live in this set: dropping it (when this task is aborted) aborts them.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                stats.connections.fetch_add(1, Ordering::SeqCst);
                let _ = stream.set_nodelay(true);
                let service = TowerToHyperService::new(app.clone());
                connections.spawn(async move {
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

fn app(sim: SharedSim) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .route("/sim/stats", get(stats))
        .with_state(sim)
}

fn openai_error(status: StatusCode, message: &str, code: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": code}});
    (status, Json(body)).into_response()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Sim {
    fn jittered(&self, ms: u64) -> Duration {
        let base = Duration::from_millis(ms);
        if self.config.jitter <= 0.0 || ms == 0 {
            return base;
        }
        let factor = 1.0 + self.config.jitter * (2.0 * fastrand::f64() - 1.0);
        base.mul_f64(factor.max(0.0))
    }

    /// Checks the model and applies failures, hangs and the concurrency gate. On success the
    /// request is held until the returned guard drops.
    async fn admit(self: &Arc<Self>, body: &Value) -> Result<Held, Response> {
        let mut held = Held::new(self.stats.clone());
        self.stats.note_arrival(body);
        let Some(model) = body.get("model").and_then(Value::as_str) else {
            return Err(openai_error(
                StatusCode::BAD_REQUEST,
                "missing model",
                "missing_model",
            ));
        };
        if !self.config.models.iter().any(|m| m == model) {
            return Err(openai_error(
                StatusCode::NOT_FOUND,
                &format!("model {model} is not served here"),
                "model_not_found",
            ));
        }
        if let Some(gate) = &self.gate {
            let permit = match self.config.overflow {
                Overflow::Queue => gate.clone().acquire_owned().await.ok(),
                Overflow::Reject => gate.clone().try_acquire_owned().ok(),
            };
            match permit {
                Some(p) => held._permit = Some(p),
                None => {
                    return Err(openai_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "node at max concurrency",
                        "overloaded",
                    ));
                }
            }
        }
        if self.config.hang_rate > 0.0 && fastrand::f64() < self.config.hang_rate {
            std::future::pending::<()>().await;
        }
        if self.config.failure_rate > 0.0 && fastrand::f64() < self.config.failure_rate {
            // Real servers often name themselves in errors; a router must not pass that on.
            return Err(openai_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("simulated failure at http://{}/v1", self.addr),
                "simulated_failure",
            ));
        }
        Ok(held)
    }

    /// Parses the JSON body, then [`Sim::admit`]s the request.
    async fn parse_and_admit(self: &Arc<Self>, raw: &[u8]) -> Result<(Value, Held), Response> {
        let body: Value = serde_json::from_slice(raw)
            .map_err(|e| openai_error(StatusCode::BAD_REQUEST, &e.to_string(), "invalid_json"))?;
        let held = self.admit(&body).await?;
        Ok((body, held))
    }

    fn answer_tokens(&self, body: &Value) -> usize {
        let cap = body
            .get("max_tokens")
            .or_else(|| body.get("max_completion_tokens"))
            .and_then(Value::as_u64)
            .map_or(usize::MAX, |n| n as usize);
        self.config.tokens.min(cap).max(1)
    }

    fn id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }
}

fn prompt_tokens(body: &Value) -> usize {
    // About four bytes a token, like common tokenizers on English.
    let text_len = match (body.get("messages"), body.get("prompt"), body.get("input")) {
        (Some(messages), _, _) => messages.to_string().len(),
        (_, Some(prompt), _) => prompt.to_string().len(),
        (_, _, Some(input)) => input.to_string().len(),
        _ => 0,
    };
    text_len / 4 + 1
}

fn token_text(i: usize) -> String {
    format!("tok{i} ")
}

fn include_usage(body: &Value) -> bool {
    body.pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

async fn chat(State(sim): State<SharedSim>, body: Bytes) -> Response {
    generate(sim, body, Kind::Chat).await
}

async fn completions(State(sim): State<SharedSim>, body: Bytes) -> Response {
    generate(sim, body, Kind::Completion).await
}

async fn generate(sim: SharedSim, raw: Bytes, kind: Kind) -> Response {
    let (body, held) = match sim.parse_and_admit(&raw).await {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let tokens = sim.answer_tokens(&body);
    let prompt = prompt_tokens(&body);
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if stream {
        return stream_answer(sim, held, kind, model, tokens, prompt, include_usage(&body));
    }
    let mut wait = sim.jittered(sim.config.ttft_ms);
    for _ in 1..tokens {
        wait += sim.jittered(sim.config.inter_token_ms);
    }
    tokio::time::sleep(wait).await;
    let text: String = (0..tokens).map(token_text).collect();
    let usage = json!({"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens});
    let answer = match kind {
        Kind::Chat => json!({
            "id": sim.id("chatcmpl"), "object": "chat.completion", "created": unix_now(), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": "stop"}],
            "usage": usage,
        }),
        Kind::Completion => json!({
            "id": sim.id("cmpl"), "object": "text_completion", "created": unix_now(), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": "stop"}],
            "usage": usage,
        }),
    };
    held.finish();
    Json(answer).into_response()
}

struct StreamState {
    sim: SharedSim,
    held: Option<Held>,
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    tokens: usize,
    prompt: usize,
    usage: bool,
    next: usize,
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

impl StreamState {
    fn chunk(&self, delta_text: Option<String>, finish: Option<&str>) -> Value {
        match self.kind {
            Kind::Chat => {
                let delta = match (&delta_text, self.next) {
                    (Some(t), 0) => json!({"role": "assistant", "content": t}),
                    (Some(t), _) => json!({"content": t}),
                    (None, _) => json!({}),
                };
                json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                       "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
            }
            Kind::Completion => {
                json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                       "choices": [{"index": 0, "text": delta_text.unwrap_or_default(), "logprobs": null, "finish_reason": finish}]})
            }
        }
    }
}

fn stream_answer(
    sim: SharedSim,
    held: Held,
    kind: Kind,
    model: String,
    tokens: usize,
    prompt: usize,
    usage: bool,
) -> Response {
    let id = sim.id(if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    });
    let state = StreamState {
        sim,
        held: Some(held),
        kind,
        id,
        model,
        created: unix_now(),
        tokens,
        prompt,
        usage,
        next: 0,
    };
    let events = stream::unfold(state, |mut st| async move {
        let held = st.held.take()?;
        if st.sim.config.stall_after > 0 && st.next == st.sim.config.stall_after {
            std::future::pending::<()>().await;
        }
        let event = if st.next < st.tokens {
            let ms = if st.next == 0 {
                st.sim.config.ttft_ms
            } else {
                st.sim.config.inter_token_ms
            };
            // No pause between tokens means none: a zero sleep still waits for the timer's
            // next millisecond, which would cap a stream at 1,000 tokens a second.
            if st.next == 0 || ms > 0 {
                tokio::time::sleep(st.sim.jittered(ms)).await;
            }
            let value = st.chunk(Some(token_text(st.next)), None);
            st.next += 1;
            st.held = Some(held);
            sse(&value)
        } else if st.next == st.tokens {
            st.next += 1;
            let mut tail = sse(&st.chunk(None, Some("stop"))).to_vec();
            if st.usage {
                let object = if st.kind == Kind::Chat {
                    "chat.completion.chunk"
                } else {
                    "text_completion"
                };
                let usage = json!({"id": st.id, "object": object, "created": st.created, "model": st.model, "choices": [],
                    "usage": {"prompt_tokens": st.prompt, "completion_tokens": st.tokens, "total_tokens": st.prompt + st.tokens}});
                tail.extend_from_slice(&sse(&usage));
            }
            tail.extend_from_slice(b"data: [DONE]\n\n");
            held.finish();
            Bytes::from(tail)
        } else {
            return None;
        };
        Some((Ok::<_, Infallible>(event), st))
    });
    let mut response = Body::from_stream(events).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn embeddings(State(sim): State<SharedSim>, raw: Bytes) -> Response {
    let (body, held) = match sim.parse_and_admit(&raw).await {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let inputs: Vec<String> = match body.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items.iter().map(|v| v.to_string()).collect(),
        _ => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                "input must be a string or an array",
                "invalid_input",
            );
        }
    };
    tokio::time::sleep(sim.jittered(sim.config.ttft_ms)).await;
    let dim = sim.config.embedding_dim.max(1);
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            // Deterministic per input, so tests can compare.
            let seed = text
                .bytes()
                .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
            let vector: Vec<f64> = (0..dim)
                .map(|d| ((seed.wrapping_add(d as u64 * 2654435761) % 2000) as f64 / 1000.0) - 1.0)
                .collect();
            json!({"object": "embedding", "index": i, "embedding": vector})
        })
        .collect();
    let prompt = prompt_tokens(&body);
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let answer = json!({"object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt}});
    held.finish();
    Json(answer).into_response()
}

async fn models(State(sim): State<SharedSim>) -> Response {
    let data: Vec<Value> = sim
        .config
        .models
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 1_700_000_000u64, "owned_by": "llm-sim-node"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn stats(State(sim): State<SharedSim>) -> Response {
    let mut stats = serde_json::to_value(sim.stats.snapshot()).unwrap_or_default();
    stats["config"] = serde_json::to_value(&sim.config).unwrap_or_default();
    Json(stats).into_response()
}
