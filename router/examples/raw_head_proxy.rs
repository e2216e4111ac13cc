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
//! [`byte_pump`]: byte_pump.rs
//! [`floor_proxy`]: floor_proxy.rs
//!
//! ```sh
//! cargo build --release -p llm-router --example raw_head_proxy
//! target/release/examples/raw_head_proxy 127.0.0.1:8080 http://127.0.0.1:18001,http://127.0.0.1:18002 [WORKERS]
//! ```

use std::cell::RefCell;
use std::io::Write;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::rc::Rc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

/// Parses the client's head, once all of it is in `buf`, and writes the node's into `out`:
/// the head's length, the body's, and whether the client asked to close after this answer.
fn node_head(
    buf: &[u8],
    node: &str,
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
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(node.as_bytes());
    out.extend_from_slice(b"\r\n");
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
    out.extend_from_slice(b"\r\n");
    let body = content_length(request.headers).ok_or(())?;
    Ok(Some((len, body, close)))
}

/// Parses the node's answer head, once all of it is in `buf`, and writes the client's into
/// `out`: the head's length and the body's.
fn client_head(buf: &[u8], out: &mut Vec<u8>) -> Result<Option<(usize, usize)>, ()> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut answer = httparse::Response::new(&mut fields);
    let len = match answer.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\n",
        answer.code.ok_or(())?,
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

/// Reads one message into the front of `buf`. `parse` is given what has come so far and
/// answers, once the whole head is there, the head's length and the body's. `Ok(None)` when
/// the peer closed or failed, `Err` when `parse` refused the head.
async fn read_message(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    mut parse: impl FnMut(&[u8]) -> Result<Option<(usize, usize)>, ()>,
) -> Result<Option<(usize, usize)>, ()> {
    let mut have = 0;
    loop {
        if have > 0
            && let Some((head, body)) = parse(&buf[..have])?
        {
            let total = head + body;
            if buf.len() < total {
                buf.resize(total, 0);
            }
            while have < total {
                match stream.read(&mut buf[have..total]).await {
                    Ok(0) | Err(_) => return Ok(None),
                    Ok(read) => have += read,
                }
            }
            return Ok(Some((head, body)));
        }
        if have == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match stream.read(&mut buf[have..]).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(read) => have += read,
        }
    }
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

async fn serve_client(mut client: TcpStream, nodes: Rc<RefCell<Nodes>>) {
    let _ = client.set_nodelay(true);
    let mut request = vec![0u8; 4096];
    let mut answer = vec![0u8; 4096];
    let mut out = Vec::with_capacity(1024);
    loop {
        // Round robin needs nothing from the request, so the node is known before its head
        // comes, and the node's head is written as the client's is parsed: one parse a head.
        let (index, id, authorities) = {
            let mut nodes = nodes.borrow_mut();
            let index = nodes.next % nodes.addrs.len();
            nodes.next += 1;
            nodes.requests += 1;
            (index, nodes.requests, nodes.authorities.clone())
        };
        let mut close = false;
        let read = read_message(&mut client, &mut request, |buf| {
            let parsed = node_head(buf, &authorities[index], id, &mut out)?;
            Ok(parsed.map(|(head, body, closing)| {
                close = closing;
                (head, body)
            }))
        })
        .await;
        let (head, body) = match read {
            Ok(Some(lengths)) => lengths,
            Ok(None) => return,
            Err(()) => {
                let _ = client.write_all(BAD_REQUEST).await;
                return;
            }
        };
        let (addr, idle) = {
            let mut nodes = nodes.borrow_mut();
            (nodes.addrs[index], nodes.idle[index].pop())
        };
        let Some(mut node) = per_core::node_connection(idle, addr).await else {
            return;
        };
        out.extend_from_slice(&request[head..head + body]);
        if node.write_all(&out).await.is_err() {
            return;
        }
        let Ok(Some((answer_head, answer_body))) =
            read_message(&mut node, &mut answer, |buf| client_head(buf, &mut out)).await
        else {
            return;
        };
        out.extend_from_slice(&answer[answer_head..answer_head + answer_body]);
        if client.write_all(&out).await.is_err() {
            return;
        }
        nodes.borrow_mut().idle[index].push(node);
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
    per_core::run("raw_head_proxy", nodes, serve_client)
}
