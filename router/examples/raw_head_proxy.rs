//! What the raw-head request path (plan.md, "Next for issue 5") could reach, measured before it
//! is built: the byte pump's threads, listeners and idle node connections ([`byte_pump`]), plus
//! the HTTP a proxy must do, over the bytes as they came and with no `http::Request`,
//! `Response` or header map. Compare it with [`floor_proxy`] (the router's HTTP stack with no
//! routing logic) and the pump (no HTTP at all): what separates it from the floor is what
//! building and dropping `http`'s types costs on the router's path.
//!
//! Per request it does what the floor does with its bytes: parse the client's head with
//! httparse, read a `content-length` body, pick a node by round robin, write the node's head
//! from the client's lines without the hop-by-hop ones and with its own `host` and an
//! `x-request-id`, parse the node's answer head, and write the client's from the status line
//! and the answer's lines the router's allowlist keeps (`content-type`, `content-length`,
//! `content-encoding`, `cache-control`, `x-request-id`, `openai-*`, `x-ratelimit-*`). The
//! buffers are reused, so a request allocates nothing. It is an experiment, not a proxy: no
//! chunked bodies, pipelining, timeouts, or errors answered beyond a 400 for a head it cannot
//! parse. The shared bench's mock nodes need none of these.
//!
//! With `RAW_HEAD_WORK=PATH` it also does the router's own work for each request, with the
//! router's own parts: the JSON probe (`RequestInfo::parse`), a slot on the least-loaded node
//! of a `NodePool` (256 a node, the pool's load read as admission reads it), the metrics
//! (`router::metrics::Metrics`), a scan of the answer for token usage, and a history row
//! (`router::history::History`, SQLite at `PATH`), under the router's timers: one a connection
//! for request heads, set again for each, and a timeout around each request to a node. That
//! is a lower bound for the router on the raw-head path, layers' own bookkeeping aside.
//!
//! [`byte_pump`]: byte_pump.rs
//! [`floor_proxy`]: floor_proxy.rs
//!
//! ```sh
//! cargo build --release -p llm-router --example raw_head_proxy
//! target/release/examples/raw_head_proxy 127.0.0.1:8080 http://127.0.0.1:18001,http://127.0.0.1:18002 [WORKERS]
//! RAW_HEAD_WORK=/tmp/history.db target/release/examples/raw_head_proxy 127.0.0.1:8080 http://127.0.0.1:18001,http://127.0.0.1:18002
//! ```

use std::cell::RefCell;
use std::io::Write;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use layers::{NodePool, NodeSpec, RequestInfo, SelectedNode};
use router::history::{History, HistoryConfig, RequestRecord};
use router::metrics::{Metrics, model_label};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

mod per_core;

const MAX_HEADERS: usize = 64;

/// Hop-by-hop headers (RFC 9110 7.6.1), and `host`, which the node gets its own of.
fn is_hop_by_hop(name: &[u8]) -> bool {
    [
        &b"connection"[..],
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
    ]
    .iter()
    .any(|hop| name.eq_ignore_ascii_case(hop))
}

/// Whether an answer header goes back to the client: the router's allowlist.
fn is_forwarded(name: &[u8]) -> bool {
    let starts = |prefix: &[u8]| {
        name.len() >= prefix.len() && name[..prefix.len()].eq_ignore_ascii_case(prefix)
    };
    [
        &b"content-type"[..],
        b"content-length",
        b"content-encoding",
        b"cache-control",
        b"x-request-id",
    ]
    .iter()
    .any(|kept| name.eq_ignore_ascii_case(kept))
        || starts(b"openai-")
        || starts(b"x-ratelimit-")
}

/// The value of a `content-length` line, 0 without one; `None` if it is not a number.
fn content_length(headers: &[httparse::Header<'_>]) -> Option<usize> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map_or(Some(0), |h| {
            std::str::from_utf8(h.value).ok()?.trim().parse().ok()
        })
}

fn copy_line(header: &httparse::Header<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(header.name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(header.value);
    out.extend_from_slice(b"\r\n");
}

/// Parses the client's head, once all of it is in `buf`, and writes the node's into `out`,
/// but for its `host` line and the blank line, which come once the node is chosen: the head's
/// length, the body's, and whether the client asked to close after this answer.
fn node_head(
    buf: &[u8],
    request_id: u64,
    out: &mut Vec<u8>,
) -> Result<Option<(usize, usize, bool)>, ()> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let len = match request.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    out.clear();
    out.extend_from_slice(request.method.ok_or(())?.as_bytes());
    out.push(b' ');
    out.extend_from_slice(request.path.ok_or(())?.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut close = request.version == Some(0);
    let mut has_id = false;
    for header in request.headers.iter() {
        let name = header.name.as_bytes();
        if name.eq_ignore_ascii_case(b"connection") {
            close = header.value.eq_ignore_ascii_case(b"close");
        }
        if is_hop_by_hop(name) {
            continue;
        }
        has_id |= name.eq_ignore_ascii_case(b"x-request-id");
        copy_line(header, out);
    }
    if !has_id {
        let _ = write!(out, "x-request-id: raw-{request_id:016x}\r\n");
    }
    let body = content_length(request.headers).ok_or(())?;
    Ok(Some((len, body, close)))
}

/// Parses the node's answer head, once all of it is in `buf`, and writes the client's into
/// `out`: the head's length and the body's. `status` gets the answer's status code.
fn client_head(
    buf: &[u8],
    out: &mut Vec<u8>,
    status: &mut u16,
) -> Result<Option<(usize, usize)>, ()> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut answer = httparse::Response::new(&mut fields);
    let len = match answer.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    out.clear();
    *status = answer.code.ok_or(())?;
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\n",
        status,
        answer.reason.unwrap_or("")
    );
    for header in answer.headers.iter() {
        if is_forwarded(header.name.as_bytes()) {
            copy_line(header, out);
        }
    }
    out.extend_from_slice(b"\r\n");
    let body = content_length(answer.headers).ok_or(())?;
    Ok(Some((len, body)))
}

/// One worker's idle node connections, its round robin and its request counter.
struct Nodes {
    addrs: Vec<SocketAddr>,
    authorities: Rc<[String]>,
    idle: Vec<Vec<TcpStream>>,
    next: usize,
    requests: u64,
}

const BAD_REQUEST: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

const NO_NODE: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// The router's own work (`RAW_HEAD_WORK`), shared by the workers as the router's is.
struct Work {
    pool: NodePool,
    history: History,
    metrics: Metrics,
}

static WORK: OnceLock<Work> = OnceLock::new();

/// With the work on, a request head must come within this (the router's default), and a
/// node's answer head within [`ANSWER_TIMEOUT`].
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);

/// What a request holds while it is served with `RAW_HEAD_WORK`.
struct Served {
    started: Instant,
    ts_ms: i64,
    info: RequestInfo,
    selected: SelectedNode,
}

impl Work {
    /// Probes the body, reads the load and takes a slot on the least-loaded eligible node:
    /// the node's index in `authorities`, or the answer to give instead.
    fn choose(
        &self,
        body: &[u8],
        authorities: &[String],
    ) -> Result<(usize, Served), &'static [u8]> {
        let started = Instant::now();
        let ts_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let info = RequestInfo::parse(body).map_err(|_| BAD_REQUEST)?;
        std::hint::black_box(self.pool.load());
        let guard = self
            .pool
            .try_acquire_free(info.model.as_deref())
            .ok_or(NO_NODE)?;
        let selected = SelectedNode::new(guard).ok_or(NO_NODE)?;
        let id = selected.node().id();
        let index = authorities.iter().position(|a| a == id).ok_or(NO_NODE)?;
        Ok((
            index,
            Served {
                started,
                ts_ms,
                info,
                selected,
            },
        ))
    }

    /// Gives the slot back and counts the request in the metrics and the history.
    fn finish(&self, served: Served, request_id: u64, status: u16, answer_body: &[u8]) {
        let Served {
            started,
            ts_ms,
            info,
            selected,
        } = served;
        let node_id = selected.node().id().to_owned();
        drop(selected);
        let latency = started.elapsed();
        let model = info.model.as_deref();
        self.metrics.observe(
            model_label(&self.pool, model),
            status,
            latency,
            Some(latency),
        );
        let mut tokens = [None, None];
        for at in memchr::memmem::find_iter(answer_body, b"_tokens\":") {
            let digits = answer_body[at + 9..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .fold(0u32, |n, &b| n * 10 + u32::from(b - b'0'));
            if answer_body[..at].ends_with(b"prompt") {
                tokens[0] = Some(digits);
            } else if answer_body[..at].ends_with(b"completion") {
                tokens[1] = Some(digits);
            }
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        self.history.record(RequestRecord {
            ts_ms,
            request_id: format!("raw-{request_id:016x}"),
            path: "/v1/chat/completions".into(),
            model: model.map(std::sync::Arc::from),
            node_id: Some(node_id.into()),
            status,
            stream: info.stream,
            latency_ms: ms(latency),
            ttfb_ms: Some(ms(latency)),
            prompt_tokens: tokens[0],
            completion_tokens: tokens[1],
            api_key_id: None,
            client_disconnected: false,
            upstream_error: None,
        });
    }
}

async fn serve_client(mut client: TcpStream, nodes: Rc<RefCell<Nodes>>) {
    let _ = client.set_nodelay(true);
    let mut request = vec![0u8; 4096];
    let mut answer = vec![0u8; 4096];
    let mut out = Vec::with_capacity(1024);
    let work = WORK.get();
    let mut header_timer = Box::pin(tokio::time::sleep(HEADER_READ_TIMEOUT));
    loop {
        let (id, authorities) = {
            let mut nodes = nodes.borrow_mut();
            nodes.requests += 1;
            (nodes.requests, nodes.authorities.clone())
        };
        let mut close = false;
        // The node's head is written as the client's is parsed: one parse a head.
        let reading = per_core::read_message(&mut client, &mut request, |buf| {
            let parsed = node_head(buf, id, &mut out)?;
            Ok(parsed.map(|(head, body, closing)| {
                close = closing;
                (head, body)
            }))
        });
        let read = if work.is_some() {
            // The router's server: one timer a connection, set again for every request head.
            header_timer
                .as_mut()
                .reset(tokio::time::Instant::now() + HEADER_READ_TIMEOUT);
            tokio::select! {
                read = reading => read,
                () = header_timer.as_mut() => return,
            }
        } else {
            reading.await
        };
        let (head, body) = match read {
            Ok(Some(lengths)) => lengths,
            Ok(None) => return,
            Err(()) => {
                let _ = client.write_all(BAD_REQUEST).await;
                return;
            }
        };
        let body = &request[head..head + body];
        let (index, served) = match work {
            Some(work) => match work.choose(body, &authorities) {
                Ok((index, served)) => (index, Some(served)),
                Err(refusal) => {
                    let _ = client.write_all(refusal).await;
                    return;
                }
            },
            None => {
                let mut nodes = nodes.borrow_mut();
                let index = nodes.next % nodes.addrs.len();
                nodes.next += 1;
                (index, None)
            }
        };
        let (addr, idle) = {
            let mut nodes = nodes.borrow_mut();
            (nodes.addrs[index], nodes.idle[index].pop())
        };
        let Some(mut node) = per_core::node_connection(idle, addr).await else {
            return;
        };
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(authorities[index].as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(body);
        if node.write_all(&out).await.is_err() {
            return;
        }
        let mut status = 0;
        let answering = per_core::read_message(&mut node, &mut answer, |buf| {
            client_head(buf, &mut out, &mut status)
        });
        let answered = if work.is_some() {
            // The router's proxy: a timeout around each request sent to a node.
            tokio::time::timeout(ANSWER_TIMEOUT, answering).await
        } else {
            Ok(answering.await)
        };
        let Ok(Ok(Some((answer_head, answer_body)))) = answered else {
            return;
        };
        let answer_body = &answer[answer_head..answer_head + answer_body];
        out.extend_from_slice(answer_body);
        if client.write_all(&out).await.is_err() {
            return;
        }
        nodes.borrow_mut().idle[index].push(node);
        if let (Some(work), Some(served)) = (work, served) {
            work.finish(served, id, status, answer_body);
        }
        if close {
            return;
        }
    }
}

/// A worker's nodes: their addresses, no idle connections yet.
fn nodes(addrs: Vec<SocketAddr>) -> Rc<RefCell<Nodes>> {
    let idle = addrs.iter().map(|_| Vec::new()).collect();
    let authorities = addrs.iter().map(SocketAddr::to_string).collect();
    Rc::new(RefCell::new(Nodes {
        addrs,
        authorities,
        idle,
        next: 0,
        requests: 0,
    }))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The history's writer runs on a runtime of its own, as the router's does on its main one.
    let runtime = tokio::runtime::Runtime::new()?;
    if let Some(path) = std::env::var_os("RAW_HEAD_WORK") {
        let history = runtime.block_on(History::open(HistoryConfig {
            path: path.into(),
            ..HistoryConfig::default()
        }))?;
        let specs = std::env::args()
            .nth(2)
            .unwrap_or_default()
            .split(',')
            .map(|url| {
                let id = url.trim_start_matches("http://");
                NodeSpec::new(id, url).models(["mock"]).max_concurrency(256)
            })
            .collect::<Vec<_>>();
        let pool = NodePool::from_specs(specs)?;
        let work = Work {
            pool,
            history,
            metrics: Metrics::default(),
        };
        if WORK.set(work).is_err() {
            return Err("the work was set twice".into());
        }
    }
    per_core::run("raw_head_proxy", nodes, serve_client)
}
