//! The raw path end to end over loopback: `serve_raw_connection`, the routing layers and
//! `PooledProxyService` over `RawRequest`, a node, and back to the client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use layers::server::read_raw_request_from;
use layers::{
    CachedSelectLayer, ClientConfig, NodePool, NodeSpec, PooledProxyService, ProxyBody,
    ProxyConfig, RawRequest, RawResponse, RequestBody, RequestInfoConfig, RouterError,
    SelectConfig, ServedBy, ServerConfig, TimeoutWaitLayer, UpstreamFailure, UpstreamRequestId,
    WaitConfig, build_client, serve_connection, serve_raw_connection,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower::{ServiceBuilder, ServiceExt, service_fn};

/// What a node saw of one request: target, headers (lower-case names, in order), body.
type Seen = Arc<Mutex<Vec<(String, Vec<(String, String)>, Bytes)>>>;

/// A node that records each request and answers with headers a client must not see next to
/// ones it must.
async fn start_node(seen: Seen) -> (SocketAddr, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            let service = service_fn(move |request: Request<RequestBody>| {
                let seen = seen.clone();
                async move {
                    let (parts, body) = request.into_parts();
                    let body = body.collect().await.unwrap().to_bytes();
                    let headers = parts
                        .headers
                        .iter()
                        .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
                        .collect();
                    seen.lock()
                        .unwrap()
                        .push((parts.uri.to_string(), headers, body));
                    let answer = Response::builder()
                        .header("content-type", "application/json")
                        .header("server", "secret-node/1.0")
                        .header("location", "http://10.1.2.3:8000/internal")
                        .header("openai-processing-ms", "7")
                        .body(Full::new(Bytes::from_static(b"{\"id\":\"cmpl-1\"}")))
                        .unwrap();
                    Ok::<_, Infallible>(answer)
                }
            });
            tokio::spawn(serve_connection(
                stream,
                service,
                ServerConfig::default(),
                shutdown.clone(),
            ));
        }
    });
    (addr, stop)
}

/// A router on the raw path: the body's info parsed as `RequestInfoLayer` would, a request
/// id set for the node, then waiting, selection and the proxy.
async fn start_router(pool: NodePool) -> (SocketAddr, watch::Sender<bool>) {
    let proxy: PooledProxyService = PooledProxyService::new(
        build_client(&ClientConfig::default()),
        pool.clone(),
        ProxyConfig::default(),
    );
    let stack = ServiceBuilder::new()
        .layer(TimeoutWaitLayer::new(pool.clone(), WaitConfig::default()))
        .layer(CachedSelectLayer::new(pool, SelectConfig::default()))
        .service(proxy);
    let info = RequestInfoConfig::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let stack = stack.clone();
            let service = service_fn(move |mut request: RawRequest| {
                let stack = stack.clone();
                async move {
                    let parsed = request
                        .body()
                        .map_err(|_| RouterError::PayloadTooLarge { limit: 0 })
                        .and_then(|body| info.info_of(body));
                    match parsed {
                        Ok(parsed) => request.set_request_info(parsed),
                        Err(error) => return Ok(RawResponse::from_http(error.into_response())),
                    }
                    request.set_upstream_request_id(UpstreamRequestId(HeaderValue::from_static(
                        "router-id-1",
                    )));
                    stack.oneshot(request).await
                }
            });
            tokio::spawn(serve_raw_connection(
                stream,
                service,
                ServerConfig::default(),
                shutdown.clone(),
            ));
        }
    });
    (addr, stop)
}

fn post(model: &str, close: bool) -> Vec<u8> {
    let body = format!(r#"{{"model":"{model}","messages":[]}}"#);
    // A header the connection names is for this hop only (RFC 9110 7.6.1).
    let connection = if close { "close" } else { "keep-alive, X-Hop" };
    format!(
        "POST /v1/chat/completions?trace=1 HTTP/1.1\r\nHost: router.example\r\n\
         Content-Type: application/json\r\nAuthorization: Bearer client-secret\r\n\
         Proxy-Authorization: Basic cHJveHk=\r\nTE: trailers\r\nConnection: {connection}\r\n\
         X-Hop: this hop only\r\nX-Tag: Kept As Sent\r\nX-Request-Id: client-id\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test]
async fn a_raw_request_is_forwarded_with_its_lines_and_answered_through_the_allowlist() {
    let seen = Seen::default();
    let (node, _node_stop) = start_node(seen.clone()).await;
    let pool = NodePool::from_specs([NodeSpec::new("a", format!("http://{node}"))
        .models(["m"])
        .max_concurrency(4)])
    .unwrap();
    let (router, _router_stop) = start_router(pool.clone()).await;

    let mut stream = TcpStream::connect(router).await.unwrap();
    let mut wire = post("m", false);
    wire.extend_from_slice(&post("unknown", true));
    stream.write_all(&wire).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8(answer).unwrap();

    let (first, second) = answer
        .split_once("HTTP/1.1 404")
        .expect("two answers, the second a 404");
    assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    let first_lower = first.to_ascii_lowercase();
    assert!(
        first_lower.contains("content-type: application/json\r\n"),
        "{first}"
    );
    assert!(
        first_lower.contains("openai-processing-ms: 7\r\n"),
        "{first}"
    );
    for hidden in ["server:", "location:", "10.1.2.3", "secret-node"] {
        assert!(
            !first_lower.contains(hidden),
            "{hidden} reached the client: {first}"
        );
    }
    assert!(first.ends_with("{\"id\":\"cmpl-1\"}"), "{first}");
    assert!(second.contains("model_not_found"), "{second}");

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "the unknown model never reached the node");
    let (target, headers, body) = &seen[0];
    assert_eq!(target, "/v1/chat/completions?trace=1");
    let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
    let value = |name: &str| {
        let values: Vec<&str> = headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect();
        values
    };
    assert_eq!(value("host"), [node.to_string()]);
    assert_eq!(value("x-tag"), ["Kept As Sent"]);
    assert_eq!(value("content-type"), ["application/json"]);
    assert_eq!(value("x-request-id"), ["router-id-1"], "replaced, once");
    assert_eq!(value("content-length"), [body.len().to_string()]);
    for gone in [
        "authorization",
        "proxy-authorization",
        "te",
        "connection",
        "x-hop",
    ] {
        assert!(!names.contains(&gone), "{gone} reached the node: {names:?}");
    }
    assert_eq!(&body[..], br#"{"model":"m","messages":[]}"#);
    assert_eq!(pool.snapshot().in_flight(), 0, "the slot was given back");
}

/// A node that answers every request with the head of an SSE stream and one event, then
/// closes its connection mid-stream.
async fn start_breaking_node() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).await.unwrap_or(0) == 1
                {
                    head.push(byte[0]);
                }
                let answer = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                              Server: secret-node\r\nTransfer-Encoding: chunked\r\n\r\n\
                              d\r\ndata: {}\n\n\r\n";
                let _ = stream.write_all(answer.as_bytes()).await;
                // Gone before the last chunk.
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_stream_that_breaks_is_reported_on_either_answer_type() {
    let node = start_breaking_node().await;
    let pool = NodePool::from_specs([NodeSpec::new("gpu-a", format!("http://{node}"))
        .models(["m"])
        .max_concurrency(4)])
    .unwrap();
    let config = ProxyConfig {
        retries: 0,
        ..ProxyConfig::default()
    };
    let proxy: PooledProxyService =
        PooledProxyService::new(build_client(&ClientConfig::default()), pool.clone(), config);
    let body = Bytes::from_static(br#"{"model":"m","stream":true}"#);

    // An `http::Request`: the node and the failure in the answer's extensions.
    let request = Request::post("/v1/chat/completions")
        .body(Full::new(body.clone()))
        .unwrap();
    let answer = ServiceExt::<Request<Full<Bytes>>>::oneshot(proxy.clone(), request)
        .await
        .unwrap();
    assert_eq!(
        answer.extensions().get::<ServedBy>(),
        Some(&ServedBy("gpu-a".into()))
    );
    assert!(answer.headers().get("server").is_none());
    let failure = answer
        .extensions()
        .get::<UpstreamFailure>()
        .cloned()
        .unwrap();
    assert_eq!(failure.get(), None, "not broken yet");
    let text = answer.into_body().collect().await.unwrap().to_bytes();
    assert!(text.starts_with(b"data: {}\n\n"), "{text:?}");
    assert!(
        text.ends_with(b"\"code\":\"upstream_unavailable\"}}\n\n"),
        "{text:?}"
    );
    assert_eq!(failure.get(), Some("upstream_unavailable"));

    // A `RawRequest`: the node in a field, the failure on the body.
    let wire = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut wire = wire.into_bytes();
    wire.extend_from_slice(&body);
    let (mut request, _) = read_raw_request_from(&wire, &ServerConfig::default())
        .unwrap()
        .unwrap();
    request.set_request_info(RequestInfoConfig::default().info_of(&body).unwrap());
    let answer: RawResponse<ProxyBody> = ServiceExt::<RawRequest>::oneshot(proxy, request)
        .await
        .unwrap();
    assert_eq!(answer.served_by().map(|s| &**s), Some("gpu-a"));
    assert_eq!(
        answer.header_lines(),
        b"Content-Type: text/event-stream\r\n"
    );
    let mut body = std::pin::pin!(answer.into_body());
    assert_eq!(body.upstream_failure(), None, "not broken yet");
    let mut text = Vec::new();
    while let Some(frame) = body.as_mut().frame().await {
        text.extend_from_slice(&frame.unwrap().into_data().unwrap());
    }
    assert!(text.ends_with(b"\"code\":\"upstream_unavailable\"}}\n\n"));
    assert_eq!(body.upstream_failure(), Some("upstream_unavailable"));
    assert_eq!(pool.snapshot().in_flight(), 0, "the slots were given back");
}
