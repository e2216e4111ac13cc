//! The lower bound for the shared bench: what tokio and the kernel cost per proxied request on
//! this machine, with no HTTP library at all. Each worker thread has its own single-threaded
//! runtime, its own `SO_REUSEPORT` listener and its own idle node connections; a request is
//! forwarded byte for byte as it came (framed by `content-length` only, no headers rewritten)
//! and the node's answer likewise. It is not a proxy anyone should run: no chunked bodies, no
//! pipelining (bytes past a message are dropped), no `connection: close` from a node obeyed,
//! no timeouts, no errors answered. The shared bench's mock nodes need none of these. [`floor_proxy`](floor_proxy.rs) adds the router's HTTP stack
//! to this; the router adds its layers, history and metrics to that.
//!
//! ```sh
//! cargo build --release -p llm-router --example byte_pump
//! target/release/examples/byte_pump 127.0.0.1:8080 http://127.0.0.1:18001,http://127.0.0.1:18002 [WORKERS]
//! ```

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

mod per_core;

/// Where the head ends (after its blank line), once it has.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4)
}

/// The `content-length` of a head, 0 without one.
fn content_length(head: &[u8]) -> usize {
    const NAME: &[u8] = b"content-length:";
    head.split(|&b| b == b'\n')
        .find(|line| line.len() > NAME.len() && line[..NAME.len()].eq_ignore_ascii_case(NAME))
        .and_then(|line| std::str::from_utf8(&line[NAME.len()..]).ok())
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

/// Where a message's head ends and how long its body is, once the whole head is in `buf`.
fn framing(buf: &[u8]) -> Result<Option<(usize, usize)>, ()> {
    Ok(head_end(buf).map(|end| (end, content_length(&buf[..end]))))
}

/// One worker's idle node connections, and its round robin.
struct Nodes {
    addrs: Vec<SocketAddr>,
    idle: Vec<Vec<TcpStream>>,
    next: usize,
}

async fn serve_client(mut client: TcpStream, nodes: Rc<RefCell<Nodes>>) {
    let _ = client.set_nodelay(true);
    let mut request = vec![0u8; 4096];
    let mut answer = vec![0u8; 4096];
    while let Ok(Some((head, body))) =
        per_core::read_message(&mut client, &mut request, framing).await
    {
        let len = head + body;
        let (index, addr, idle) = {
            let mut nodes = nodes.borrow_mut();
            let index = nodes.next % nodes.addrs.len();
            nodes.next += 1;
            (index, nodes.addrs[index], nodes.idle[index].pop())
        };
        let Some(mut node) = per_core::node_connection(idle, addr).await else {
            return;
        };
        if node.write_all(&request[..len]).await.is_err() {
            return;
        }
        let Ok(Some((head, body))) = per_core::read_message(&mut node, &mut answer, framing).await
        else {
            return;
        };
        if client.write_all(&answer[..head + body]).await.is_err() {
            return;
        }
        nodes.borrow_mut().idle[index].push(node);
    }
}

/// A worker's nodes: their addresses, no idle connections yet.
fn nodes(addrs: Vec<SocketAddr>) -> Rc<RefCell<Nodes>> {
    let idle = addrs.iter().map(|_| Vec::new()).collect();
    Rc::new(RefCell::new(Nodes {
        addrs,
        idle,
        next: 0,
    }))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    per_core::run("byte_pump", nodes, serve_client)
}
