//! Reusable tower layers for routing OpenAI-compatible LLM traffic.
//!
//! Each optimization is a standalone [`tower::Layer`]; stack them with
//! [`tower::ServiceBuilder`] in any order, in front of [`PooledProxyService`] or your own
//! service:
//!
//! | layer | what it does |
//! |---|---|
//! | [`RequestInfoLayer`] | reads the body (bounded), parses only `model` and `stream` |
//! | [`AdmissionLayer`] | graded backpressure: accept, accept after a delay, or 429 + `Retry-After` |
//! | [`TimeoutWaitLayer`] | waits FIFO, bounded and with a timeout, for a free node slot |
//! | [`CachedSelectLayer`] | load-aware node choice over a cached ranking |
//! | [`PooledProxyService`] | one shared pooled client; streams the answer; holds load until the body ends |
//!
//! Two building blocks go with them: [`HttpClient`], the pooled HTTP/1.1 client the proxy
//! sends with, and [`serve_connection`], an HTTP/1.1 server for one client connection in front
//! of any tower service, which reads whole request bodies before calling it.
//! [`serve_raw_connection`] is the same server handing the service a [`RawRequest`] (the
//! request's bytes, a range pair per header, typed fields for the layers' state) instead of an
//! `http::Request`; the layers and [`PooledProxyService`] take either. The proxy answers a
//! `RawRequest` with a [`RawResponse`] (the node's kept header lines as it wrote them, typed
//! fields for the node that served and the request's info), which the server writes back as it
//! is; either server writes an `http::Response` or a `RawResponse` ([`Answer`]).
//!
//! All layers share one [`NodePool`]: a lock-free snapshot of the nodes plus live load per node.
//! A request's slot on a node is a [`LoadGuard`] that travels in a [`SelectedNode`] request
//! extension and then in the response body, so a stream counts as load until its last byte.
//!
//! Layers answer rejections themselves, with an HTTP response carrying OpenAI's error shape
//! (see [`RouterError`]), never with a `Service::Error`: the stack's error type is the inner
//! service's (`Infallible` for the proxy), so it mounts in axum without `HandleErrorLayer`.
//! Layers that never read the body ([`AdmissionLayer`], [`TimeoutWaitLayer`],
//! [`CachedSelectLayer`]) are generic over request and response bodies and also fit tonic or
//! plain hyper services. They reach the request only through the [`Routed`] trait (its
//! [`RequestInfo`], its [`SelectedNode`], the [`ErrorFormat`] of a rejection) and the answer
//! through [`RoutedResponse`], so a request type of your own that implements those can go
//! through them too.
//!
//! # Example
//!
//! A stack in front of two nodes, mounted in an axum router:
//!
//! ```
//! use std::time::Duration;
//!
//! use axum::Router;
//! use layers::{
//!     AdmissionConfig, AdmissionLayer, CachedSelectLayer, ClientConfig, NodePool, NodeSpec,
//!     PooledProxyService, ProxyConfig, RequestInfoLayer, SelectConfig, TimeoutWaitLayer,
//!     WaitConfig, build_client,
//! };
//! use tower::ServiceBuilder;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = NodePool::from_specs([
//!     NodeSpec::new("gpu-a", "http://127.0.0.1:8001").models(["llama"]).max_concurrency(8),
//!     NodeSpec::new("gpu-b", "http://127.0.0.1:8002").models(["llama"]).max_concurrency(4),
//! ])?;
//! let client = build_client(&ClientConfig::default());
//!
//! let stack = ServiceBuilder::new()
//!     .layer(RequestInfoLayer::default())
//!     .layer(AdmissionLayer::new(pool.clone(), AdmissionConfig::default()))
//!     .layer(TimeoutWaitLayer::new(
//!         pool.clone(),
//!         WaitConfig { max_waiters: 256, wait_timeout: Duration::from_secs(10) },
//!     ))
//!     .layer(CachedSelectLayer::new(pool.clone(), SelectConfig::default()))
//!     .service(PooledProxyService::new(client, pool, ProxyConfig::default()));
//!
//! let app: Router = Router::new()
//!     .route_service("/v1/chat/completions", stack.clone())
//!     .route_service("/v1/completions", stack);
//! # let _ = app;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
#![warn(unreachable_pub)]

pub mod admission;
pub mod body;
pub mod cached_select;
pub mod client;
pub mod error;
pub mod future;
mod json_probe;
pub mod pool;
pub mod proxy;
pub mod raw;
pub mod raw_response;
pub mod request_info;
pub mod retry;
pub mod routed;
pub mod server;
pub mod timeout_wait;
mod wire;

/// The maps looked up on every request (models, nodes, idle connections): foldhash, seeded per
/// map, hashes a short key in a fraction of the time of std's SipHash. Its resistance to
/// chosen collisions is weaker; the keys come from the configuration and node discovery, except
/// the slot queue's lines, which hold at most `max_waiters` clients' model names (a line is
/// forgotten when it empties).
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A set with [`FastMap`]'s hasher.
pub(crate) type FastSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;

pub use admission::{
    AdmissionConfig, AdmissionCounters, AdmissionDecision, AdmissionLayer, LoadSource, decide,
};
pub use body::ResponseBody;
pub use cached_select::{CachedSelectLayer, NodeSelector, SelectConfig};
pub use client::{ClientConfig, ClientError, Forward, HttpClient, UpstreamBody, build_client};
pub use error::{ErrorFormat, RouterError};
pub use pool::{Load, LoadGuard, Node, NodePool, NodeSpec, NodeSpecError, NodeState, SelectedNode};
pub use proxy::{
    PooledProxyService, ProxyBody, ProxyConfig, ServedBy, UpstreamFailure, UpstreamRequestId,
};
pub use raw::RawRequest;
pub use raw_response::RawResponse;
pub use request_info::{RequestInfo, RequestInfoConfig, RequestInfoLayer, RequestInfoSlot};
pub use retry::RetryBudget;
pub use routed::{Routed, RoutedResponse};
pub use server::{
    Answer, BodyTooLarge, RequestBody, ServerConfig, serve_connection, serve_connection_after,
    serve_raw_connection, serve_raw_connection_after,
};
pub use timeout_wait::{TimeoutWaitLayer, WaitConfig, WaitResult, wait_for_ready};
