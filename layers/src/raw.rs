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
use std::sync::OnceLock;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use http::{Extensions, Method, Request, Uri, Version};

use crate::client::{HeaderLine, origin_form};
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
///
/// The proxy's path slices `message` only for a target that is not a plain path or a body over
/// 4 KiB: its first slice makes it shared, an allocation of its own, and every slice a count
/// to keep. So the target and a body that follows the head are ranges, and the `Uri` and the
/// body's `Bytes` are made only for whoever asks for them.
struct Parts {
    /// The head's bytes, followed by the body's when it came with a `content-length`.
    message: Bytes,
    head_len: usize,
    method: Method,
    version: Version,
    target: Target,
    headers: Box<[HeaderRange]>,
    body: MessageBody,
    /// The body as `Bytes`, once asked for, when it follows the head in `message`.
    body_bytes: OnceLock<Bytes>,
    info: Option<RequestInfo>,
    selected: Option<SelectedNode>,
    upstream_request_id: Option<UpstreamRequestId>,
    info_slot: Option<RequestInfoSlot>,
    extensions: Extensions,
}

/// Where a request's body is.
#[derive(Debug)]
pub(crate) enum MessageBody {
    /// In the message, after the head.
    Follows,
    /// Apart from the message (decoded from chunks).
    Apart(Bytes),
    /// Over the server's limit: not read.
    NotRead,
}

/// A request's target: a range of its message, and its `Uri`.
#[derive(Debug)]
pub(crate) struct Target {
    start: u32,
    /// Where the path ends: at the `?`, or at the end.
    path_end: u32,
    end: u32,
    /// Made at once for a target that is not a [plain path](plain_path_end), else when first
    /// asked for.
    uri: OnceLock<Uri>,
}

impl Target {
    /// The target at `start..end` of `message`; `Err` when `http` does not take it as a `Uri`.
    pub(crate) fn parse(message: &Bytes, start: usize, end: usize) -> Result<Self, ()> {
        let target = message.get(start..end).ok_or(())?;
        let uri = OnceLock::new();
        let path_end = match plain_path_end(target) {
            Some(path_end) => start + path_end,
            None => {
                let parsed = Uri::from_maybe_shared(message.slice(start..end)).map_err(|_| ())?;
                let _ = uri.set(parsed);
                end
            }
        };
        // Within `u32`: the target comes before the headers, whose ranges the parser refuses
        // past it (and heads are bounded by `max_header_bytes`). Were one not, a plain
        // target's path would read as empty: never a panic.
        let at = |i: usize| u32::try_from(i).unwrap_or(u32::MAX);
        Ok(Self {
            start: at(start),
            path_end: at(path_end),
            end: at(end),
            uri,
        })
    }
}

/// The longest target `http`'s `Uri` takes.
const MAX_URI_LEN: usize = u16::MAX as usize - 1;

/// Where the path ends (at the `?`, or at the end) when `target` is an origin-form path and
/// query of RFC 3986's characters without a fragment: what `http`'s `Uri` takes as it is, with
/// that path and query. `None` for anything else, which is parsed as a `Uri` at once.
fn plain_path_end(target: &[u8]) -> Option<usize> {
    /// `pchar` (unreserved, sub-delims, `:`, `@`, and `%` for percent-encoding) and `/`.
    const fn path_bytes() -> [bool; 256] {
        let mut allowed = [false; 256];
        let mut b = 0;
        while b < 256 {
            let c = b as u8;
            allowed[b] = c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                        | b':'
                        | b'@'
                        | b'%'
                        | b'/'
                );
            b += 1;
        }
        allowed
    }
    static PATH: [bool; 256] = path_bytes();
    if target.first() != Some(&b'/') || target.len() > MAX_URI_LEN {
        return None;
    }
    let path_end = target
        .iter()
        .position(|&b| !PATH[usize::from(b)])
        .unwrap_or(target.len());
    match target.get(path_end..) {
        Some([]) => Some(path_end),
        // The query takes `?` as well.
        Some([b'?', query @ ..]) => query
            .iter()
            .all(|&b| b == b'?' || PATH[usize::from(b)])
            .then_some(path_end),
        _ => None,
    }
}

impl RawRequest {
    /// A request over `message`: `headers` are ranges into it, checked by the parser (names are
    /// tokens, values have no control bytes but tab), and `target` was read from it.
    pub(crate) fn new(
        message: Bytes,
        head_len: usize,
        method: Method,
        version: Version,
        target: Target,
        headers: Box<[HeaderRange]>,
        body: MessageBody,
    ) -> Self {
        let parts = Parts {
            message,
            head_len,
            method,
            version,
            target,
            headers,
            body,
            body_bytes: OnceLock::new(),
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

    /// The request target, as `http` parses it. Made when first asked for, if the target is a
    /// plain path: [`path_bytes`](Self::path_bytes) and
    /// [`path_and_query_bytes`](Self::path_and_query_bytes) read it without.
    pub fn uri(&self) -> &Uri {
        let Target {
            start, end, uri, ..
        } = &self.parts.target;
        uri.get_or_init(|| {
            let target = self.parts.message.slice(*start as usize..*end as usize);
            // Cannot fail: `plain_path_end` takes only what `Uri` takes (a test checks every
            // byte in the path and in the query).
            Uri::from_maybe_shared(target).unwrap_or_else(|_| Uri::from_static("/"))
        })
    }

    /// The target's path, as [`Uri::path`] gives it, without a UTF-8 check (a plain target is
    /// ASCII).
    pub fn path_bytes(&self) -> &[u8] {
        match self.plain(self.parts.target.path_end) {
            Some(path) => path,
            None => self.uri().path().as_bytes(),
        }
    }

    /// The target's path and query as sent on to a node (`/` for a target without a path),
    /// without a UTF-8 check.
    pub fn path_and_query_bytes(&self) -> &[u8] {
        match self.plain(self.parts.target.end) {
            Some(target) => target,
            None => origin_form(self.uri()).as_bytes(),
        }
    }

    /// The plain target from its start to `end`, unless the target is not plain.
    fn plain(&self, end: u32) -> Option<&[u8]> {
        let target = &self.parts.target;
        if target.uri.get().is_some() {
            // Parsed at once (not plain), or asked for since: either way `Uri` says.
            return None;
        }
        self.parts.message.get(target.start as usize..end as usize)
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

    /// The request's bytes as they came.
    pub(crate) fn message(&self) -> &[u8] {
        &self.parts.message
    }

    /// The header lines in [`message`](Self::message): each line's name, value, and the range
    /// of the whole line (its CR LF included) when it ends right after its value.
    pub(crate) fn header_lines(&self) -> impl Iterator<Item = HeaderLine<'_>> + '_ {
        let message = self.message();
        self.parts
            .headers
            .iter()
            .map(move |&(name_start, name_end, value_start, value_end)| {
                let (name_start, value_end) = (name_start as usize, value_end as usize);
                let line_end = value_end + 2;
                let whole = message.get(value_end..line_end) == Some(&b"\r\n"[..]);
                (
                    message
                        .get(name_start..name_end as usize)
                        .unwrap_or_default(),
                    message
                        .get(value_start as usize..value_end)
                        .unwrap_or_default(),
                    whole.then_some(name_start..line_end),
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
        let parts = &*self.parts;
        match &parts.body {
            MessageBody::Follows => Ok(parts
                .body_bytes
                .get_or_init(|| parts.message.slice(parts.head_len..))),
            MessageBody::Apart(body) => Ok(body),
            MessageBody::NotRead => Err(BodyTooLarge),
        }
    }

    /// [`body`](Self::body) as a slice, without making it `Bytes` of its own.
    pub(crate) fn body_slice(&self) -> Result<&[u8], BodyTooLarge> {
        let parts = &*self.parts;
        match &parts.body {
            MessageBody::Follows => Ok(parts.message.get(parts.head_len..).unwrap_or_default()),
            MessageBody::Apart(body) => Ok(body),
            MessageBody::NotRead => Err(BodyTooLarge),
        }
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
        let uri = self.uri().clone();
        let body = self.body().ok().cloned();
        let parts = *self.parts;
        let headers = header_map(&parts.message, &parts.headers).map_err(|what| {
            RouterError::InvalidRequest(format!("malformed HTTP request: {what}"))
        })?;
        let mut request = Request::new(RequestBody::read(body));
        *request.method_mut() = parts.method;
        *request.uri_mut() = uri;
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
            .field(
                "target",
                &String::from_utf8_lossy(self.path_and_query_bytes()),
            )
            .field("version", &self.parts.version)
            .field("headers", &self.parts.headers.len())
            .field("body", &self.body_slice().map(<[u8]>::len).ok())
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
    fn a_plain_target_is_one_uri_takes_as_it_is_with_the_same_path_and_query() {
        let mut plain = 0;
        for b in 0..=255u8 {
            // Each byte in a path, in a query, and both.
            let shapes: [&[u8]; 3] = [&[b'/', b'a', b], &[b'/', b'?', b], &[b'/', b, b'?', b]];
            for target in shapes {
                let Some(path_end) = plain_path_end(target) else {
                    continue;
                };
                plain += 1;
                let uri = Uri::try_from(target).expect("Uri takes every plain target");
                let text = std::str::from_utf8(target).unwrap();
                assert_eq!(uri.path_and_query().map(|pq| pq.as_str()), Some(text));
                assert_eq!(uri.path(), &text[..path_end]);
            }
        }
        assert!(plain > 3 * 70, "the RFC 3986 characters are plain: {plain}");
        assert_eq!(plain_path_end(b"/v1/chat/completions"), Some(20));
        assert_eq!(plain_path_end(b"/v1/x?a=1&b=/c?d"), Some(5));
        for not_plain in [
            &b"*"[..],
            b"http://h/x",
            b"/x#f",
            b"/x?y#z",
            b"/{\"a\":1}",
            b"/x|y",
            b"",
        ] {
            assert_eq!(plain_path_end(not_plain), None, "{not_plain:?}");
        }
        assert_eq!(plain_path_end(&[b'/'; MAX_URI_LEN]), Some(MAX_URI_LEN));
        assert_eq!(plain_path_end(&[b'/'; MAX_URI_LEN + 1]), None);
    }

    #[test]
    fn path_and_query_read_the_target_as_its_uri_does() {
        for (target, path, sent) in [
            (
                "/v1/chat/completions",
                "/v1/chat/completions",
                "/v1/chat/completions",
            ),
            ("/v1/x?a=1", "/v1/x", "/v1/x?a=1"),
            // Not plain: read from the `Uri`, made at once.
            ("/v1/{x}?q=|", "/v1/{x}", "/v1/{x}?q=|"),
            ("/v1/x#frag", "/v1/x", "/v1/x"),
            ("http://h.example/v1/x?y", "/v1/x", "/v1/x?y"),
            ("http://h.example", "/", "/"),
        ] {
            let request = read(format!("GET {target} HTTP/1.1\r\nHost: r\r\n\r\n").as_bytes());
            let plain = plain_path_end(target.as_bytes()).is_some();
            assert_eq!(request.path_bytes(), path.as_bytes(), "{target}");
            assert_eq!(request.path_and_query_bytes(), sent.as_bytes(), "{target}");
            assert_eq!(
                request.parts.target.uri.get().is_some(),
                !plain,
                "{target}: a plain target's Uri waits until asked for"
            );
            assert_eq!(request.uri().path(), path, "{target}");
            assert_eq!(
                request.path_bytes(),
                path.as_bytes(),
                "{target}, its Uri made"
            );
            assert_eq!(
                request.path_and_query_bytes(),
                sent.as_bytes(),
                "{target}, its Uri made"
            );
        }
        let refused = read_raw_request_from(
            b"GET /a<b HTTP/1.1\r\nHost: r\r\n\r\n",
            &ServerConfig::default(),
        );
        assert!(
            refused.is_err(),
            "a target Uri refuses is refused: {refused:?}"
        );
    }

    #[test]
    fn a_body_after_its_head_is_read_in_place_and_as_bytes() {
        let request = read(b"POST /v1/x HTTP/1.1\r\nContent-Length: 7\r\n\r\n{\"a\":1}");
        assert!(matches!(request.parts.body, MessageBody::Follows));
        assert_eq!(request.body_slice(), Ok(&b"{\"a\":1}"[..]));
        assert!(
            request.parts.body_bytes.get().is_none(),
            "no Bytes made for a slice"
        );
        assert_eq!(request.body().unwrap().as_ref(), b"{\"a\":1}");
        let chunked =
            read(b"POST /v1/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n");
        assert_eq!(chunked.body_slice(), Ok(&b"ok"[..]));
        assert_eq!(chunked.body().unwrap().as_ref(), b"ok");
        let converted = read(b"POST /v1/x HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
            .into_http()
            .unwrap();
        assert_eq!(
            http_body::Body::size_hint(converted.body()).exact(),
            Some(2)
        );
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
