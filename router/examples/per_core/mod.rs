//! What the byte pump and the raw-head experiment share: reading a message whole, and on each
//! of `WORKERS` threads a single-threaded runtime, a `SO_REUSEPORT` listener and a local task
//! per accepted connection, with state of the worker's own (its idle node connections, say),
//! so that nothing is shared between threads.

use std::future::Future;
use std::net::SocketAddr;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

/// Parses `LISTEN_ADDR NODE_URL[,NODE_URL...] [WORKERS]` and serves until a worker fails: each
/// worker makes its state with `state` from the nodes' addresses, and runs `serve` with a clone
/// of it for every connection it accepts.
pub fn run<S, F>(
    name: &str,
    state: fn(Vec<SocketAddr>) -> S,
    serve: fn(TcpStream, S) -> F,
) -> Result<(), Box<dyn std::error::Error>>
where
    S: Clone + 'static,
    F: Future<Output = ()> + 'static,
{
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(nodes)) = (args.next(), args.next()) else {
        return Err(format!("usage: {name} LISTEN_ADDR NODE_URL[,NODE_URL...] [WORKERS]").into());
    };
    let listen: SocketAddr = listen.parse()?;
    let addrs = nodes
        .split(',')
        .map(|url| url.trim_start_matches("http://").parse())
        .collect::<Result<Vec<SocketAddr>, _>>()?;
    let workers = match args.next() {
        Some(workers) => workers.parse()?,
        None => std::thread::available_parallelism().map_or(1, usize::from),
    };
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let addrs = addrs.clone();
            std::thread::spawn(move || -> std::io::Result<()> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let worker = accept(listen, state(addrs), serve);
                tokio::task::LocalSet::new().block_on(&runtime, worker)
            })
        })
        .collect();
    for thread in threads {
        if let Ok(Err(error)) = thread.join() {
            return Err(error.into());
        }
    }
    Ok(())
}

/// An idle node connection if there is one, else a new one; with `TCP_NODELAY`. `None` when
/// connecting failed.
pub async fn node_connection(idle: Option<TcpStream>, addr: SocketAddr) -> Option<TcpStream> {
    let node = match idle {
        Some(node) => node,
        None => TcpStream::connect(addr).await.ok()?,
    };
    let _ = node.set_nodelay(true);
    Some(node)
}

async fn accept<S, F>(
    listen: SocketAddr,
    state: S,
    serve: fn(TcpStream, S) -> F,
) -> std::io::Result<()>
where
    S: Clone + 'static,
    F: Future<Output = ()> + 'static,
{
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseport(true)?;
    socket.set_reuseaddr(true)?;
    socket.bind(listen)?;
    let listener = socket.listen(4096)?;
    loop {
        let (client, _) = listener.accept().await?;
        tokio::task::spawn_local(serve(client, state.clone()));
    }
}

/// Reads one message into the front of `buf`. `parse` is given what has come so far and
/// answers, once the whole head is there, the head's length and the body's. `Ok(None)` when
/// the peer closed or failed, `Err` when `parse` refused the head.
pub async fn read_message(
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
