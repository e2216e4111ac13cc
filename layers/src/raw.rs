//! [`RawRequest`]: a request kept as the bytes it came in, for a path that forwards most of them.
//!
//! [`serve_raw_connection`](crate::server::serve_raw_connection) reads each request as
//! [`serve_connection`](crate::server::serve_connection) does (same parsing, same limits, head
//! and body in one allocation) but hands the service a `RawRequest`: ranges into those bytes for
//! each header, the body as it came, and typed fields for what the routing layers attach (the
//! [`RequestInfo`], the [`SelectedNode`]). No `HeaderMap` is built and no type map allocated
//! unless asked for, which is most of what building an `http::Request` costs a proxy that
//! changes a few headers.
//!
//! It implements [`Routed`], so [`AdmissionLayer`](crate::admission::AdmissionLayer),
//! [`TimeoutWaitLayer`](crate::timeout_wait::TimeoutWaitLayer) and
//! [`CachedSelectLayer`](crate::cached_select::CachedSelectLayer) take it as they take an
//! `http::Request`. Where `http` types are wanted (routes that are not worth the raw path, an
//! axum router), [`RawRequest::into_http`] converts it.
//!
//! Use it when you write the service that reads it; for anything else, `serve_connection` and
//! `http::Request` are the simpler choice.

use std::fmt;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use http::{Extensions, Method, Request, Uri, Version};

use crate::error::{ErrorFormat, RouterError};
use crate::pool::SelectedNode;
use crate::proxy::UpstreamRequestId;
use crate::request_info::{RequestInfo, RequestInfoSlot};
use crate::routed::Routed;
use crate::server::{BodyTooLarge, RequestBody};
use crate::wire::header_name;

/// Where a header's name and value are in a request's bytes: name start and end, value start
/// and end.
pub(crate) type HeaderRange = (u32, u32, u32, u32);

/// A request as it came in, with the routing layers' state in typed fields; see the module
/// docs.
pub struct RawRequest {
    // Boxed: the request moves by value through every layer and sits in their futures (each
    // keeps it while it waits, the proxy keeps it for a retry), so a few hundred bytes inline
    // were copied a dozen times and more per request.
    parts: Box<Parts>,
}

/// What a [`RawRequest`] holds.
struct Parts {
    /// The head's bytes, followed by the body's when it came with a `content-length`.
    message: Bytes,
    head_len: usize,
    method: Method,
    version: Version,
    uri: Uri,
    headers: Box<[HeaderRange]>,
    /// `None`: the body was over the server's limit and was not read.
    body: Option<Bytes>,
    info: Option<RequestInfo>,
    selected: Option<SelectedNode>,
    upstream_request_id: Option<UpstreamRequestId>,
    info_slot: Option<RequestInfoSlot>,
    extensions: Extensions,
}

impl RawRequest {
    /// A request over `message`: `headers` are ranges into it, checked by the parser (names are
    /// tokens, values have no control bytes but tab), and `uri` was made from its target.
    pub(crate) fn new(
        message: Bytes,
        head_len: usize,
        method: Method,
        version: Version,
        uri: Uri,
        headers: Box<[HeaderRange]>,
        body: Option<Bytes>,
    ) -> Self {
        let parts = Parts {
            message,
            head_len,
            method,
            version,
            uri,
            headers,
            body,
            info: None,
            selected: None,
            upstream_request_id: None,
            info_slot: None,
            extensions: Extensions::new(),
        };
        Self {
            parts: Box::new(parts),
        }
    }

    /// How long the head was as it came, blank line included.
    pub fn head_len(&self) -> usize {
        self.parts.head_len
    }

    /// The request method.
    pub fn method(&self) -> &Method {
        &self.parts.method
    }

    /// The HTTP version the client spoke (1.0 or 1.1).
    pub fn version(&self) -> Version {
        self.parts.version
    }

    /// The request target, as `http` parsed it.
    pub fn uri(&self) -> &Uri {
        &self.parts.uri
    }

    /// The headers in the order they came, each as its name (in the client's case) and value.
    pub fn headers(&self) -> impl ExactSizeIterator<Item = (&[u8], &[u8])> + '_ {
        self.parts
            .headers
            .iter()
            .map(|&(name_start, name_end, value_start, value_end)| {
                (
                    &self.parts.message[name_start as usize..name_end as usize],
                    &self.parts.message[value_start as usize..value_end as usize],
                )
            })
    }

    /// The value of the first header called `name`, case aside (as `HeaderMap::get`).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers_named(name).next()
    }

    /// The values of the headers called `name`, case aside, in order.
    fn headers_named<'a, 'n>(&'a self, name: &'n str) -> impl Iterator<Item = &'a [u8]> + 'n
    where
        'a: 'n,
    {
        let name = name.as_bytes();
        self.headers()
            .filter(move |(found, _)| found.len() == name.len() && found.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
    }

    /// How many headers are called `name`, case aside.
    pub fn header_count(&self, name: &str) -> usize {
        self.headers_named(name).count()
    }

    /// The body, whole; [`BodyTooLarge`] when it was over the server's `max_body_bytes` and was
    /// not read.
    pub fn body(&self) -> Result<&Bytes, BodyTooLarge> {
        self.parts.body.as_ref().ok_or(BodyTooLarge)
    }

    /// Attaches what routing needs to know from the body (see
    /// [`RequestInfoConfig::info_of`](crate::request_info::RequestInfoConfig::info_of)).
    pub fn set_request_info(&mut self, info: RequestInfo) {
        self.parts.info = Some(info);
    }

    /// The request id [`PooledProxyService`](crate::proxy::PooledProxyService) sends to the
    /// node, if one was set.
    pub fn upstream_request_id(&self) -> Option<&UpstreamRequestId> {
        self.parts.upstream_request_id.as_ref()
    }

    /// Sets the request id sent to the node as `x-request-id`, in place of the client's.
    pub fn set_upstream_request_id(&mut self, id: UpstreamRequestId) {
        self.parts.upstream_request_id = Some(id);
    }

    /// The slot [`RequestInfoLayer`](crate::request_info::RequestInfoLayer) fills, if one was
    /// set.
    pub fn info_slot(&self) -> Option<&RequestInfoSlot> {
        self.parts.info_slot.as_ref()
    }

    /// Sets a [`RequestInfoSlot`] for the layer to fill, as an `http::Request` carries one in
    /// its extensions: a caller outside the stack keeps a clone.
    pub fn set_info_slot(&mut self, slot: RequestInfoSlot) {
        self.parts.info_slot = Some(slot);
    }

    /// Anything else a service attaches, as on an `http::Request`. Empty, and free, until used.
    /// What the layers read has its own fields, not read from here: the info
    /// ([`set_request_info`](Self::set_request_info)), the slot (through [`Routed`]), the
    /// request id for the node ([`set_upstream_request_id`](Self::set_upstream_request_id)) and
    /// the info slot ([`set_info_slot`](Self::set_info_slot)).
    pub fn extensions(&self) -> &Extensions {
        &self.parts.extensions
    }

    /// The extensions, to attach to.
    pub fn extensions_mut(&mut self) -> &mut Extensions {
        &mut self.parts.extensions
    }

    /// The same request as an `http::Request`, as [`serve_connection`] would have made it, with
    /// the typed fields moved into its extensions. The headers share this request's bytes.
    ///
    /// [`serve_connection`]: crate::server::serve_connection
    pub fn into_http(self) -> Result<Request<RequestBody>, RouterError> {
        let parts = *self.parts;
        let headers = header_map(&parts.message, &parts.headers).map_err(|what| {
            RouterError::InvalidRequest(format!("malformed HTTP request: {what}"))
        })?;
        let mut request = Request::new(RequestBody::read(parts.body));
        *request.method_mut() = parts.method;
        *request.uri_mut() = parts.uri;
        *request.version_mut() = parts.version;
        *request.headers_mut() = headers;
        let extensions = request.extensions_mut();
        *extensions = parts.extensions;
        if let Some(info) = parts.info {
            extensions.insert(info);
        }
        if let Some(selected) = parts.selected {
            extensions.insert(selected);
        }
        if let Some(id) = parts.upstream_request_id {
            extensions.insert(id);
        }
        if let Some(slot) = parts.info_slot {
            extensions.insert(slot);
        }
        Ok(request)
    }
}

/// The headers at `ranges` in `message`, as a map whose values share `message`. `Err` names
/// what was malformed.
pub(crate) fn header_map(
    message: &Bytes,
    ranges: &[HeaderRange],
) -> Result<HeaderMap, &'static str> {
    let mut headers = HeaderMap::with_capacity(ranges.len());
    for &(name_start, name_end, value_start, value_end) in ranges {
        let name = header_name(&message[name_start as usize..name_end as usize])
            .map_err(|_| "header name")?;
        let value =
            HeaderValue::from_maybe_shared(message.slice(value_start as usize..value_end as usize))
                .map_err(|_| "header value")?;
        headers.append(name, value);
    }
    Ok(headers)
}

impl fmt::Debug for RawRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawRequest")
            .field("method", &self.parts.method)
            .field("uri", &self.parts.uri)
            .field("version", &self.parts.version)
            .field("headers", &self.parts.headers.len())
            .field("body", &self.parts.body.as_ref().map(Bytes::len))
            .field("info", &self.parts.info)
            .field(
                "selected",
                &self.parts.selected.as_ref().map(|s| s.node().id()),
            )
            .finish_non_exhaustive()
    }
}

impl Routed for RawRequest {
    fn request_info(&self) -> Option<&RequestInfo> {
        self.parts.info.as_ref()
    }

    fn selected_node(&self) -> Option<&SelectedNode> {
        self.parts.selected.as_ref()
    }

    fn selected_node_mut(&mut self) -> Option<&mut SelectedNode> {
        self.parts.selected.as_mut()
    }

    fn insert_selected_node(&mut self, selected: SelectedNode) {
        self.parts.selected = Some(selected);
    }

    fn remove_selected_node(&mut self) -> Option<SelectedNode> {
        self.parts.selected.take()
    }

    fn error_format(&self) -> ErrorFormat {
        ErrorFormat::of_content_type(self.header(CONTENT_TYPE.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::HeaderName;

    use crate::pool::{NodePool, NodeSpec};
    use crate::server::{ServerConfig, read_raw_request_from};

    use super::*;

    fn read(wire: &[u8]) -> RawRequest {
        read_raw_request_from(wire, &ServerConfig::default())
            .unwrap()
            .unwrap()
            .0
    }

    #[test]
    fn headers_are_read_in_order_as_sent_and_found_case_aside() {
        let request = read(
            b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: r\r\nX-Request-Id: abc\r\n\
              x-dup: 1\r\nX-Dup: 2\r\nContent-Length: 2\r\n\r\n{}",
        );
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.version(), Version::HTTP_11);
        assert_eq!(request.uri().path(), "/v1/chat/completions");
        assert_eq!(request.uri().query(), Some("x=1"));
        let headers: Vec<(&[u8], &[u8])> = request.headers().collect();
        assert_eq!(
            headers,
            [
                (&b"Host"[..], &b"r"[..]),
                (b"X-Request-Id", b"abc"),
                (b"x-dup", b"1"),
                (b"X-Dup", b"2"),
                (b"Content-Length", b"2"),
            ]
        );
        assert_eq!(request.header("x-request-id"), Some(&b"abc"[..]));
        assert_eq!(
            request.header("X-DUP"),
            Some(&b"1"[..]),
            "the first, as HeaderMap::get"
        );
        assert_eq!(request.header("x-request"), None);
        assert_eq!(request.header_count("X-DUP"), 2);
        assert_eq!(request.header_count("x-nothing"), 0);
        assert_eq!(request.body().unwrap().as_ref(), b"{}");
    }

    #[test]
    fn a_body_over_the_limit_is_told_apart_from_an_empty_one() {
        let config = ServerConfig {
            max_body_bytes: 4,
            ..ServerConfig::default()
        };
        let over = b"POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\n";
        let (request, _) = read_raw_request_from(over, &config).unwrap().unwrap();
        assert_eq!(request.body(), Err(BodyTooLarge));
        let empty = read(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(empty.body().map(Bytes::len), Ok(0));
    }

    #[test]
    fn routing_state_lives_in_fields_and_moves_into_extensions_on_conversion() {
        let pool = NodePool::from_specs([NodeSpec::new("a", "http://127.0.0.1:1")
            .models(["m"])
            .max_concurrency(2)])
        .unwrap();
        let mut request = read(
            b"POST /v1/x HTTP/1.1\r\ncontent-type: application/grpc\r\ncontent-length: 2\r\n\r\n{}",
        );
        assert_eq!(request.error_format(), ErrorFormat::Grpc);
        assert_eq!(request.model(), None);
        request.set_request_info(RequestInfo {
            model: Some(Arc::from("m")),
            stream: true,
        });
        assert_eq!(request.model().as_deref(), Some("m"));
        let slot = SelectedNode::new(pool.try_acquire_free(Some("m")).unwrap()).unwrap();
        request.insert_selected_node(slot);
        request.set_upstream_request_id(UpstreamRequestId(HeaderValue::from_static("id-1")));
        request.extensions_mut().insert(7_u32);

        let converted = request.into_http().unwrap();
        assert_eq!(converted.uri(), "/v1/x");
        assert_eq!(converted.headers()[CONTENT_TYPE], "application/grpc");
        assert_eq!(
            converted
                .headers()
                .get(HeaderName::from_static("content-length")),
            Some(&HeaderValue::from_static("2"))
        );
        let extensions = converted.extensions();
        assert!(extensions.get::<RequestInfo>().is_some_and(|i| i.stream));
        assert!(extensions.get::<SelectedNode>().is_some());
        assert_eq!(
            extensions.get::<UpstreamRequestId>().map(|id| &id.0),
            Some(&HeaderValue::from_static("id-1"))
        );
        assert_eq!(extensions.get::<u32>(), Some(&7));
        assert_eq!(pool.load().in_use, 1, "the slot moved, still held");
        drop(converted);
        assert_eq!(pool.load().in_use, 0);
    }

    #[test]
    fn a_request_without_a_grpc_content_type_is_answered_in_openai_json() {
        let request = read(b"GET / HTTP/1.1\r\ncontent-type: application/json\r\n\r\n");
        assert_eq!(request.error_format(), ErrorFormat::OpenAi);
        assert_eq!(
            read(b"GET / HTTP/1.1\r\n\r\n").error_format(),
            ErrorFormat::OpenAi
        );
    }

    #[tokio::test]
    async fn the_routing_layers_route_a_raw_request() {
        use http::{Response, StatusCode};
        use http_body_util::{BodyExt, Full};
        use tower::{ServiceBuilder, ServiceExt};

        use crate::admission::{AdmissionConfig, AdmissionLayer};
        use crate::cached_select::{CachedSelectLayer, SelectConfig};
        use crate::timeout_wait::{TimeoutWaitLayer, WaitConfig};

        let pool = NodePool::from_specs([NodeSpec::new("a", "http://127.0.0.1:1")
            .models(["m"])
            .max_concurrency(2)])
        .unwrap();
        let stack = ServiceBuilder::new()
            .layer(AdmissionLayer::new(
                pool.clone(),
                AdmissionConfig::default(),
            ))
            .layer(TimeoutWaitLayer::new(pool.clone(), WaitConfig::default()))
            .layer(CachedSelectLayer::new(
                pool.clone(),
                SelectConfig::default(),
            ))
            .service_fn(|request: RawRequest| async move {
                let node = request
                    .selected_node()
                    .map(|s| s.node().id().to_owned())
                    .unwrap_or_default();
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(node))))
            });
        let asking = |model: &str| {
            let mut request = read(b"POST /v1/completions HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
            request.set_request_info(RequestInfo {
                model: Some(Arc::from(model)),
                stream: false,
            });
            request
        };

        let served = stack.clone().oneshot(asking("m")).await.unwrap();
        assert_eq!(served.status(), StatusCode::OK);
        let body = served.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "a", "a slot on the node was attached to the request");
        assert_eq!(pool.load().in_use, 0, "and given back with it");

        let refused = stack.oneshot(asking("other")).await.unwrap();
        assert_eq!(refused.status(), StatusCode::NOT_FOUND);
        let body = refused.into_body().collect().await.unwrap().to_bytes();
        assert!(body.starts_with(b"{\"error\""), "{body:?}");
    }
}
