//! [`RawResponse`]: an answer whose headers are kept as the lines they go out as, for a path
//! that passes most of a node's answer head on.
//!
//! The counterpart of [`RawRequest`](crate::raw::RawRequest).
//! [`PooledProxyService`](crate::proxy::PooledProxyService) answers a `RawRequest` with one:
//! the node's head is parsed once, and the lines the allowlist keeps are copied, as they came,
//! into one buffer. [`serve_raw_connection`](crate::server::serve_raw_connection) (and
//! [`serve_connection`](crate::server::serve_connection)) write that buffer out as it is,
//! followed by the framing headers they write for every answer. No `HeaderMap` is built, and
//! what the router side reads from an answer (the node that served it, what the request asked
//! for) is in typed fields, not in a type map.
//!
//! The routing layers answer through it as they answer through an `http::Response`
//! ([`RoutedResponse`]): a rejection is a `RawResponse` of its own, so no wrapper body is
//! needed. [`RawResponse::from_http`] and [`RawResponse::into_http`] convert at the edges.
//!
//! The lines never hold a framing header (`content-length`, `transfer-encoding`, `connection`,
//! `keep-alive`): the server frames the body itself, from the length the answer declares
//! ([`RawResponse::set_content_length`], as an answer to `HEAD` needs) or else from the body's
//! size hint, and an answer asks for its connection to be closed with
//! [`RawResponse::set_close`].

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Extensions, Response, StatusCode};

use crate::error::{ErrorFormat, RouterError};
use crate::proxy::ServedBy;
use crate::request_info::RequestInfo;
use crate::routed::RoutedResponse;
use crate::wire::{header_name, is_framing_header, lists_token, parse_length};

/// An answer with its headers kept as lines; see the module docs.
pub struct RawResponse<B> {
    status: StatusCode,
    /// `name: value\r\n` lines, no framing header among them.
    lines: Vec<u8>,
    /// A `date` line is among them: the server writes none of its own.
    has_date: bool,
    /// The connection closes after this answer.
    close: bool,
    /// The body's length as the head declares it: written as `content-length` in place of the
    /// body's size hint (an answer to `HEAD` has no body, but says how long it would be).
    content_length: Option<u64>,
    served_by: Option<Arc<str>>,
    request_info: Option<RequestInfo>,
    extensions: Extensions,
    body: B,
}

/// A header value with bytes a header value may not hold (CR, LF, NUL or another control
/// byte but tab), refused by [`RawResponse::insert_header`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a header value may not hold control bytes")]
pub struct InvalidValue;

impl<B> RawResponse<B> {
    /// An answer with `status`, no headers and `body`.
    pub fn new(status: StatusCode, body: B) -> Self {
        Self::from_lines(status, Vec::new(), false, body)
    }

    /// An answer over header lines already written out (`name: value\r\n` each, checked, no
    /// framing header), with whether one of them is `date`.
    pub(crate) fn from_lines(status: StatusCode, lines: Vec<u8>, has_date: bool, body: B) -> Self {
        Self {
            status,
            lines,
            has_date,
            close: false,
            content_length: None,
            served_by: None,
            request_info: None,
            extensions: Extensions::new(),
            body,
        }
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// Changes the status.
    pub fn set_status(&mut self, status: StatusCode) {
        self.status = status;
    }

    /// The header lines, in order, each as its name (as written) and value.
    pub fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        lines(&self.lines).map(|(name, value, _)| (name, value))
    }

    /// The value of the first header called `name`, case aside.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        let name = name.as_bytes();
        self.headers()
            .find(|(found, _)| found.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
    }

    /// The header lines as the server writes them: `name: value\r\n` each.
    pub fn header_lines(&self) -> &[u8] {
        &self.lines
    }

    /// Sets the header `name` to `value`, in place of any lines of that name. A framing header
    /// is not kept as a line: `connection: close` closes the connection after the answer
    /// ([`set_close`](Self::set_close)), a `content-length` sets
    /// [`content_length`](Self::set_content_length) (a value that is not a length is refused),
    /// and the others are ignored, since the server frames the body itself.
    pub fn insert_header(&mut self, name: &HeaderName, value: &[u8]) -> Result<(), InvalidValue> {
        if !value
            .iter()
            .all(|&b| b == b'\t' || (b >= b' ' && b != 0x7f))
        {
            return Err(InvalidValue);
        }
        if name == header::CONTENT_LENGTH {
            self.content_length = Some(parse_length(value).ok_or(InvalidValue)?);
            return Ok(());
        }
        if is_framing(name) {
            self.close |= name == header::CONNECTION && lists_token(value, b"close");
            return Ok(());
        }
        self.remove_lines(name.as_str().as_bytes());
        push_line(&mut self.lines, name.as_str().as_bytes(), value);
        self.has_date |= name == header::DATE;
        Ok(())
    }

    /// Removes the lines called `name`.
    pub fn remove_header(&mut self, name: &HeaderName) {
        self.remove_lines(name.as_str().as_bytes());
    }

    /// Removes the lines called `name` (lower case), case aside. A line is called `name` when it
    /// starts with it and its colon (or its end) comes right after: a line's name runs to its
    /// first colon, and `name`, a header name, has none. Only the line ends are searched for, so
    /// a scan over lines of other names costs one `memchr` each.
    fn remove_lines(&mut self, name: &[u8]) {
        let mut at = 0;
        while at < self.lines.len() {
            let rest = &self.lines[at..];
            let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |i| i + 1);
            let named = matches!(rest.get(name.len()), None | Some(b':' | b'\r' | b'\n'))
                && rest
                    .get(..name.len())
                    .is_some_and(|start| start.eq_ignore_ascii_case(name));
            if named {
                self.lines.drain(at..at + end);
            } else {
                at += end;
            }
        }
        if name == b"date" {
            self.has_date = false;
        }
    }

    /// The body's length as the head declares it, if it does.
    pub fn content_length(&self) -> Option<u64> {
        self.content_length
    }

    /// Declares the body's length: the server writes it as `content-length` (and sends no
    /// more of the body than that) in place of the body's size hint. For an answer to `HEAD`,
    /// whose body is empty; leave it unset (`None`) otherwise, or clear it when the body
    /// changes length.
    pub fn set_content_length(&mut self, length: Option<u64>) {
        self.content_length = length;
    }

    /// Whether the connection closes after this answer.
    pub fn close(&self) -> bool {
        self.close
    }

    /// Closes the connection after this answer (`connection: close`), or not.
    pub fn set_close(&mut self, close: bool) {
        self.close = close;
    }

    /// The node that served the answer, as [`ServedBy`] says on an `http::Response`: for
    /// history and logs. Never sent to the client.
    pub fn served_by(&self) -> Option<&Arc<str>> {
        self.served_by.as_ref()
    }

    /// Notes the node that served the answer.
    pub fn set_served_by(&mut self, node: Option<Arc<str>>) {
        self.served_by = node;
    }

    /// What the request asked for, as [`RequestInfoLayer`](crate::RequestInfoLayer) read it.
    pub fn request_info(&self) -> Option<&RequestInfo> {
        self.request_info.as_ref()
    }

    /// Notes what the request asked for.
    pub fn set_request_info(&mut self, info: RequestInfo) {
        self.request_info = Some(info);
    }

    /// Anything else a service attaches, as on an `http::Response`. Empty, and free, until
    /// used.
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }

    /// The extensions, to attach to.
    pub fn extensions_mut(&mut self) -> &mut Extensions {
        &mut self.extensions
    }

    /// The body.
    pub fn body(&self) -> &B {
        &self.body
    }

    /// The body, to change in place.
    pub fn body_mut(&mut self) -> &mut B {
        &mut self.body
    }

    /// The body, without the rest.
    pub fn into_body(self) -> B {
        self.body
    }

    /// The answer without its body, and the body: `head.map(|()| body)` puts them together
    /// again.
    pub fn into_parts(self) -> (RawResponse<()>, B) {
        self.replace_body(())
    }

    /// The same answer over `f`'s body. A declared [`content_length`](Self::content_length)
    /// stays: clear it if the new body's length differs.
    pub fn map<C>(self, f: impl FnOnce(B) -> C) -> RawResponse<C> {
        let (head, body) = self.into_parts();
        head.replace_body(f(body)).0
    }

    /// The same answer over `body`, and the body it had.
    fn replace_body<C>(self, body: C) -> (RawResponse<C>, B) {
        let answer = RawResponse {
            status: self.status,
            lines: self.lines,
            has_date: self.has_date,
            close: self.close,
            content_length: self.content_length,
            served_by: self.served_by,
            request_info: self.request_info,
            extensions: self.extensions,
            body,
        };
        (answer, self.body)
    }

    /// `response` with its headers written out as lines. A [`ServedBy`] and a [`RequestInfo`]
    /// in its extensions move into their fields; the framing headers go as for
    /// [`insert_header`](Self::insert_header).
    pub fn from_http(response: Response<B>) -> Self {
        let (parts, body) = response.into_parts();
        let mut lines = Vec::with_capacity(parts.headers.len() * 32);
        push_header_lines(&mut lines, &parts.headers);
        let mut answer = Self::from_lines(
            parts.status,
            lines,
            parts.headers.contains_key(header::DATE),
            body,
        );
        answer.close = parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|value| lists_token(value.as_bytes(), b"close"));
        // The first, as the server reads an `http::Response`'s.
        answer.content_length = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|value| parse_length(value.as_bytes()));
        let mut extensions = parts.extensions;
        answer.served_by = extensions.remove::<ServedBy>().map(|by| by.0);
        answer.request_info = extensions.remove::<RequestInfo>();
        answer.extensions = extensions;
        answer
    }

    /// The same answer as an `http::Response`, with the typed fields moved into its extensions
    /// (the node as a [`ServedBy`]) and `connection: close` when it closes the connection.
    pub fn into_http(self) -> Response<B> {
        let mut headers = HeaderMap::with_capacity(8);
        // One buffer, which the values share.
        let block = Bytes::from(self.lines);
        for (name, value, _) in lines(&block) {
            let value = HeaderValue::from_maybe_shared(block.slice_ref(value));
            // The lines were checked as they were written.
            if let (Ok(name), Ok(value)) = (header_name(name), value) {
                headers.append(name, value);
            }
        }
        if self.close {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(length) = self.content_length {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        }
        let mut response = Response::new(self.body);
        *response.status_mut() = self.status;
        *response.headers_mut() = headers;
        let extensions = response.extensions_mut();
        *extensions = self.extensions;
        if let Some(node) = self.served_by {
            extensions.insert(ServedBy(node));
        }
        if let Some(info) = self.request_info {
            extensions.insert(info);
        }
        response
    }

    /// Whether a `date` line is among the headers.
    pub(crate) fn has_date(&self) -> bool {
        self.has_date
    }
}

impl<B> fmt::Debug for RawResponse<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawResponse")
            .field("status", &self.status)
            .field("lines", &String::from_utf8_lossy(&self.lines))
            .field("has_date", &self.has_date)
            .field("close", &self.close)
            .field("content_length", &self.content_length)
            .field("served_by", &self.served_by)
            .field("request_info", &self.request_info)
            .finish_non_exhaustive()
    }
}

/// A layer passes the inner answer on as it is, and rejects with an answer of its own: no
/// wrapper body.
impl<B: From<Bytes>> RoutedResponse for RawResponse<B> {
    type Layered = Self;

    fn pass(self) -> Self {
        self
    }

    fn rejection(error: RouterError, format: ErrorFormat) -> Self {
        Self::from_http(error.into_response_as(format))
    }

    fn pass_with_info(mut self, info: RequestInfo) -> Self {
        self.request_info = Some(info);
        self
    }
}

/// Headers the server writes itself, from the answer's framing.
pub(crate) fn is_framing(name: &HeaderName) -> bool {
    is_framing_header(name.as_str().as_bytes())
}

/// Appends `headers` as lines, but the framing ones, which the server writes itself.
pub(crate) fn push_header_lines(lines: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        if !is_framing(name) {
            push_line(lines, name.as_str().as_bytes(), value.as_bytes());
        }
    }
}

/// Appends `name: value\r\n`.
pub(crate) fn push_line(lines: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    lines.reserve(name.len() + value.len() + 4);
    lines.extend_from_slice(name);
    lines.extend_from_slice(b": ");
    lines.extend_from_slice(value);
    lines.extend_from_slice(b"\r\n");
}

/// The lines of `block`, each as its name, its value, and where the line after it starts.
fn lines(block: &[u8]) -> impl Iterator<Item = (&[u8], &[u8], usize)> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let rest = block.get(at..).filter(|rest| !rest.is_empty())?;
        let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |i| i + 1);
        let line = &rest[..end];
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let colon = memchr::memchr(b':', line).unwrap_or(line.len());
        let value = line.get(colon + 1..).unwrap_or_default().trim_ascii_start();
        let start = at;
        at += end;
        Some((&line[..colon], value, at - start))
    })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    use super::*;

    fn answer() -> RawResponse<Full<Bytes>> {
        let mut lines = Vec::new();
        push_line(&mut lines, b"Content-Type", b"application/json");
        push_line(&mut lines, b"X-Request-Id", b"from-node");
        push_line(&mut lines, b"openai-model", b"m");
        RawResponse::from_lines(StatusCode::OK, lines, false, Full::new(Bytes::from("{}")))
    }

    #[test]
    fn headers_are_read_back_in_order_and_found_case_aside() {
        let answer = answer();
        let headers: Vec<(&[u8], &[u8])> = answer.headers().collect();
        assert_eq!(
            headers,
            [
                (&b"Content-Type"[..], &b"application/json"[..]),
                (b"X-Request-Id", b"from-node"),
                (b"openai-model", b"m"),
            ]
        );
        assert_eq!(
            answer.header("content-type"),
            Some(&b"application/json"[..])
        );
        assert_eq!(answer.header("x-missing"), None);
    }

    #[test]
    fn an_inserted_header_replaces_every_line_of_its_name() {
        let mut answer = answer();
        let id = HeaderName::from_static("x-request-id");
        answer.insert_header(&id, b"router-id").unwrap();
        assert_eq!(
            answer.header_lines(),
            b"Content-Type: application/json\r\nopenai-model: m\r\nx-request-id: router-id\r\n"
        );
        assert_eq!(
            answer.insert_header(&id, b"bad\r\nx-evil: 1"),
            Err(InvalidValue)
        );
        assert_eq!(answer.header("x-request-id"), Some(&b"router-id"[..]));
        assert!(answer.header("x-evil").is_none());
    }

    #[test]
    fn framing_headers_never_become_lines() {
        let mut answer = answer();
        let before = answer.header_lines().to_vec();
        answer
            .insert_header(&header::CONTENT_LENGTH, b"999")
            .unwrap();
        answer
            .insert_header(&header::TRANSFER_ENCODING, b"chunked")
            .unwrap();
        assert_eq!(answer.header_lines(), before);
        assert_eq!(
            answer.content_length(),
            Some(999),
            "declared, for the server"
        );
        assert_eq!(
            answer.insert_header(&header::CONTENT_LENGTH, b"12 apples"),
            Err(InvalidValue)
        );
        assert_eq!(
            answer.content_length(),
            Some(999),
            "a bad length changes nothing"
        );
        assert!(!answer.close());
        answer
            .insert_header(&header::CONNECTION, b"keep-alive, Close")
            .unwrap();
        assert!(answer.close());
        assert_eq!(answer.header_lines(), before);
    }

    #[test]
    fn removed_headers_go_with_every_line_of_their_name_and_date_is_tracked() {
        let mut answer = answer();
        answer
            .insert_header(&header::DATE, b"Mon, 01 Jan 2024 00:00:00 GMT")
            .unwrap();
        assert!(answer.has_date());
        answer.remove_header(&header::DATE);
        assert!(!answer.has_date(), "the server writes its own again");
        answer
            .insert_header(&HeaderName::from_static("x-tag"), b"1")
            .unwrap();
        answer.lines.extend_from_slice(b"X-TAG: 2\r\n");
        assert_eq!(answer.header("x-tag"), Some(&b"1"[..]), "the first of two");
        answer.remove_header(&HeaderName::from_static("x-tag"));
        assert_eq!(
            answer.header_lines(),
            b"Content-Type: application/json\r\nX-Request-Id: from-node\r\nopenai-model: m\r\n"
        );
        answer.remove_header(&header::CONTENT_TYPE);
        answer.remove_header(&HeaderName::from_static("openai-model"));
        answer.remove_header(&HeaderName::from_static("x-request-id"));
        assert!(answer.header_lines().is_empty());
        assert_eq!(answer.headers().count(), 0);
    }

    #[test]
    fn a_removed_name_takes_only_lines_of_exactly_that_name() {
        let mut answer = answer();
        answer
            .lines
            .extend_from_slice(b"X-Tagged: 3\r\nx-tag:4\nx-ta: 5\r\nX-Tag: 6\r\nx-tag");
        answer.remove_header(&HeaderName::from_static("x-tag"));
        assert_eq!(
            answer.header_lines(),
            &b"Content-Type: application/json\r\nX-Request-Id: from-node\r\nopenai-model: m\r\nX-Tagged: 3\r\nx-ta: 5\r\n"[..]
        );
    }

    #[test]
    fn lines_are_read_whatever_their_end() {
        let read = |block: &[u8]| -> Vec<(Vec<u8>, Vec<u8>, usize)> {
            lines(block)
                .map(|(n, v, end)| (n.to_vec(), v.to_vec(), end))
                .collect()
        };
        assert!(read(b"").is_empty());
        assert_eq!(
            read(b"a: 1\r\nb:2\nno colon\r\nc:   3"),
            [
                (b"a".to_vec(), b"1".to_vec(), 6),
                (b"b".to_vec(), b"2".to_vec(), 4),
                (b"no colon".to_vec(), Vec::new(), 10),
                (b"c".to_vec(), b"3".to_vec(), 6),
            ]
        );
    }

    #[test]
    fn control_bytes_are_refused_in_values_but_tab() {
        let mut answer = answer();
        let tag = HeaderName::from_static("x-tag");
        for bad in [&b"a\0b"[..], b"a\x7fb", b"a\rb", b"a\nb"] {
            assert_eq!(
                answer.insert_header(&tag, bad),
                Err(InvalidValue),
                "{bad:?}"
            );
        }
        answer.insert_header(&tag, b"a\tb").unwrap();
        assert_eq!(answer.header("x-tag"), Some(&b"a\tb"[..]));
    }

    #[tokio::test]
    async fn it_converts_to_and_from_an_http_response_keeping_what_it_carries() {
        let mut response = Response::new(Full::new(Bytes::from("hello")));
        *response.status_mut() = StatusCode::CREATED;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        headers.append("x-tag", HeaderValue::from_static("a"));
        headers.append("x-tag", HeaderValue::from_static("b"));
        response
            .extensions_mut()
            .insert(ServedBy(Arc::from("gpu-a")));
        response.extensions_mut().insert(RequestInfo {
            model: Some(Arc::from("m")),
            stream: true,
        });

        let raw = RawResponse::from_http(response);
        assert_eq!(
            raw.request_info().and_then(|i| i.model.as_deref()),
            Some("m")
        );
        assert_eq!(raw.status(), StatusCode::CREATED);
        assert_eq!(
            raw.header_lines(),
            b"content-type: text/plain\r\nx-tag: a\r\nx-tag: b\r\n"
        );
        assert!(raw.close());
        assert_eq!(raw.content_length(), Some(5));
        assert_eq!(raw.served_by().map(|s| &**s), Some("gpu-a"));
        assert!(!raw.has_date());

        let back = raw.into_http();
        assert_eq!(back.status(), StatusCode::CREATED);
        let tags: Vec<_> = back.headers().get_all("x-tag").iter().collect();
        assert_eq!(tags, ["a", "b"]);
        assert_eq!(back.headers()[header::CONNECTION], "close");
        assert_eq!(back.headers()[header::CONTENT_LENGTH], "5");
        assert_eq!(
            back.extensions().get::<ServedBy>(),
            Some(&ServedBy(Arc::from("gpu-a")))
        );
        assert_eq!(
            back.into_body().collect().await.unwrap().to_bytes(),
            "hello"
        );
    }

    #[tokio::test]
    async fn a_layer_passes_it_on_as_it_is_or_rejects_with_one_of_its_own() {
        let passed = answer().pass();
        assert_eq!(passed.header("x-request-id"), Some(&b"from-node"[..]));
        let rejected = <RawResponse<Full<Bytes>>>::rejection(
            RouterError::Overloaded {
                retry_after: std::time::Duration::from_secs(2),
            },
            ErrorFormat::OpenAi,
        );
        assert_eq!(rejected.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(rejected.header("retry-after"), Some(&b"2"[..]));
        assert_eq!(
            rejected.header("content-type"),
            Some(&b"application/json"[..])
        );
        let body = rejected.into_body().collect().await.unwrap().to_bytes();
        assert!(body.starts_with(b"{\"error\""), "{body:?}");
    }
}
