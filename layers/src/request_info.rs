//! Reads a request body up to a limit and pulls out the two fields routing needs: `model` and
//! `stream`.
//!
//! Use it in front of the other layers on OpenAI-style POST routes. It answers 413 for a body over
//! the limit, and 400 for a body that is not a JSON object, has wrong types, or (unless
//! configured otherwise) names no model. Everything else in the body is skipped, not built into
//! values. The request goes on with its body buffered as [`Full<Bytes>`] and a [`RequestInfo`]
//! in its extensions; the response carries the same [`RequestInfo`] back out in its extensions,
//! for logging and history around the stack. A layer outside that must know the request even
//! when no response comes (the client left while the request waited) puts a [`RequestInfoSlot`]
//! in the request's extensions: the layer fills it once the body is parsed.
//!
//! It also takes a [`RawRequest`], whose body the server read whole: the same checks and
//! answers, made in `call`, with the info and slot in the request's typed fields. Its answer
//! can be any [`RoutedResponse`]: a [`RawResponse`](crate::RawResponse) carries the info in
//! [`RawResponse::request_info`](crate::RawResponse::request_info).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{Full, Limited};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::body::{CollectBytes, ResponseBody};
use crate::error::{ErrorFormat, RouterError};
use crate::json_probe;
use crate::raw::RawRequest;
use crate::routed::RoutedResponse;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What routing needs to know about a request, parsed once from its body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestInfo {
    /// The requested model, if the body names one.
    pub model: Option<Arc<str>>,
    /// Whether the client asked for a stream (`"stream": true`).
    pub stream: bool,
}

impl RequestInfo {
    /// Parses `model` and `stream` from a JSON body, checking and skipping every other field.
    pub fn parse(body: &[u8]) -> Result<Self, RouterError> {
        // JSON is UTF-8 (RFC 8259): the whole body is checked here, so no node gets bytes it
        // cannot decode, and the probe reads text.
        let text = std::str::from_utf8(body).map_err(|e| {
            RouterError::InvalidRequest(format!(
                "the body is not valid UTF-8 (at byte {})",
                e.valid_up_to()
            ))
        })?;
        let probe = json_probe::probe(text)
            .map_err(|e| RouterError::InvalidRequest(format!("invalid JSON body: {e}")))?;
        Ok(Self {
            model: probe.model.map(|m| Arc::from(m.as_ref())),
            stream: probe.stream.unwrap_or(false),
        })
    }
}

/// A place for the [`RequestInfo`] that outlives the request: put a clone in the request's
/// extensions before the stack and keep one; the clones share one cell, which
/// [`RequestInfoLayer`] fills once it has parsed the body. The response carries the same info,
/// but a request that ends without one (its client went away while it waited for a slot) can
/// still be told apart by model.
#[derive(Debug, Clone, Default)]
pub struct RequestInfoSlot(Arc<OnceLock<RequestInfo>>);

impl RequestInfoSlot {
    /// An empty slot.
    pub fn new() -> Self {
        Self::default()
    }

    /// What the layer parsed, once it has.
    pub fn get(&self) -> Option<&RequestInfo> {
        self.0.get()
    }

    fn fill(&self, info: &RequestInfo) {
        // A slot is filled once; a second layer in the same stack parses the same body.
        let _ = self.0.set(info.clone());
    }
}

/// Settings for [`RequestInfoLayer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestInfoConfig {
    /// Largest body accepted, in bytes. Default 16 MiB.
    pub max_body_bytes: usize,
    /// Answer 400 when the body names no model. Default true.
    pub require_model: bool,
}

impl RequestInfoConfig {
    /// The [`RequestInfo`] of a whole body, checked as the layer checks it: an error for a body
    /// that is not a JSON object or has wrong types, and (with `require_model`) for one that
    /// names no model. For a server that already holds the body, with no layer in between.
    /// The size limit is the reader's to apply.
    pub fn info_of(&self, body: &[u8]) -> Result<RequestInfo, RouterError> {
        let info = RequestInfo::parse(body)?;
        if info.model.is_none() && self.require_model {
            return Err(RouterError::MissingModel);
        }
        Ok(info)
    }
}

impl Default for RequestInfoConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 * 1024 * 1024,
            require_model: true,
        }
    }
}

/// Buffers the body (bounded) and attaches a [`RequestInfo`]. See the module docs.
#[derive(Debug, Clone, Default)]
pub struct RequestInfoLayer {
    config: RequestInfoConfig,
}

impl RequestInfoLayer {
    /// A layer with these settings.
    pub fn new(config: RequestInfoConfig) -> Self {
        Self { config }
    }
}

impl<S> Layer<S> for RequestInfoLayer {
    type Service = RequestInfoService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestInfoService {
            inner,
            config: self.config,
        }
    }
}

/// The service made by [`RequestInfoLayer`].
#[derive(Debug, Clone)]
pub struct RequestInfoService<S> {
    inner: S,
    config: RequestInfoConfig,
}

impl<S, B, ResB> Service<Request<B>> for RequestInfoService<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResB>> + Clone,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = RequestInfoFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The inner service is called after the body arrives: keep the instance that was made
        // ready, leave a fresh clone in its place.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let (parts, body) = request.into_parts();
        RequestInfoFuture {
            state: State::Reading {
                collect: CollectBytes::new(Limited::new(body, self.config.max_body_bytes)),
                parts: Some(parts),
                inner: Some(inner),
                config: self.config,
            },
        }
    }
}

/// Over a [`RawRequest`] the body is whole already: it is checked and parsed in `call`, with
/// the same limit and answers as over an `http::Request`.
impl<S> Service<RawRequest> for RequestInfoService<S>
where
    S: Service<RawRequest>,
    S::Response: RoutedResponse,
{
    type Response = <S::Response as RoutedResponse>::Layered;
    type Error = S::Error;
    type Future = RawInfoFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: RawRequest) -> Self::Future {
        let parsed = match request.body_slice() {
            Ok(body) if body.len() <= self.config.max_body_bytes => self.config.info_of(body),
            _ => Err(RouterError::PayloadTooLarge {
                limit: self.config.max_body_bytes,
            }),
        };
        let info = match parsed {
            Ok(info) => info,
            Err(error) => {
                return RawInfoFuture {
                    kind: RawInfoKind::Rejected { error: Some(error) },
                };
            }
        };
        if let Some(slot) = request.info_slot() {
            slot.fill(&info);
        }
        request.set_request_info(info.clone());
        RawInfoFuture {
            kind: RawInfoKind::Called {
                future: self.inner.call(request),
                info: Some(info),
            },
        }
    }
}

pin_project! {
    /// Response future of [`RequestInfoService`] over a [`RawRequest`].
    pub struct RawInfoFuture<F> {
        #[pin]
        kind: RawInfoKind<F>,
    }
}

pin_project! {
    #[project = RawInfoProj]
    enum RawInfoKind<F> {
        Called { #[pin] future: F, info: Option<RequestInfo> },
        Rejected { error: Option<RouterError> },
    }
}

impl<F, A, E> Future for RawInfoFuture<F>
where
    F: Future<Output = Result<A, E>>,
    A: RoutedResponse,
{
    type Output = Result<A::Layered, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            RawInfoProj::Called { future, info } => {
                let answer = ready!(future.poll(cx))?;
                Poll::Ready(Ok(pass_on(answer, info.take())))
            }
            RawInfoProj::Rejected { error } => Poll::Ready(Ok(A::rejection(
                error.take().unwrap_or(RouterError::Internal),
                ErrorFormat::OpenAi,
            ))),
        }
    }
}

pin_project! {
    /// Response future of [`RequestInfoService`].
    pub struct RequestInfoFuture<S, B>
    where
        S: Service<Request<Full<Bytes>>>,
        B: Body,
        B::Error: Into<BoxError>,
    {
        #[pin]
        state: State<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<Full<Bytes>>>,
        B: Body,
        B::Error: Into<BoxError>,
    {
        Reading {
            #[pin]
            collect: CollectBytes<Limited<B>>,
            parts: Option<http::request::Parts>,
            inner: Option<S>,
            config: RequestInfoConfig,
        },
        Calling {
            #[pin]
            future: S::Future,
            info: Option<RequestInfo>,
        },
    }
}

impl<S, B, ResB> Future for RequestInfoFuture<S, B>
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResB>>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<ResB>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Reading {
                    collect,
                    parts,
                    inner,
                    config,
                } => {
                    let collected = ready!(collect.poll(cx));
                    let (Some(mut parts), Some(mut inner)) = (parts.take(), inner.take()) else {
                        return Poll::Ready(Ok(RouterError::Internal.into_response()));
                    };
                    let bytes = match collected {
                        Ok(bytes) => bytes,
                        Err(e) => {
                            let error = if over_limit(&*e) {
                                RouterError::PayloadTooLarge {
                                    limit: config.max_body_bytes,
                                }
                            } else {
                                RouterError::InvalidRequest(
                                    "could not read the request body".into(),
                                )
                            };
                            return Poll::Ready(Ok(error.into_response()));
                        }
                    };
                    let info = match config.info_of(&bytes) {
                        Ok(info) => info,
                        Err(error) => return Poll::Ready(Ok(error.into_response())),
                    };
                    if let Some(slot) = parts.extensions.get::<RequestInfoSlot>() {
                        slot.fill(&info);
                    }
                    parts.extensions.insert(info.clone());
                    let future = inner.call(Request::from_parts(parts, Full::new(bytes)));
                    this.state.set(State::Calling {
                        future,
                        info: Some(info),
                    });
                }
                StateProj::Calling { future, info } => {
                    let response = ready!(future.poll(cx))?;
                    // Outer layers (logging, history) see what was asked for.
                    return Poll::Ready(Ok(pass_on(response, info.take())));
                }
            }
        }
    }
}

/// Whether a body failed for being too large: over this layer's limit, or over the server's
/// (a [`crate::BodyTooLarge`] from [`crate::serve_connection`], wrapped or not).
fn over_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |e| e.source())
        .any(|e| e.is::<http_body_util::LengthLimitError>() || e.is::<crate::BodyTooLarge>())
}

/// The inner service's answer passed on with the parsed info attached, while the future still
/// holds it (it does, unless polled again after it answered).
fn pass_on<A: RoutedResponse>(answer: A, info: Option<RequestInfo>) -> A::Layered {
    match info {
        Some(info) => answer.pass_with_info(info),
        None => answer.pass(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn the_slot_is_filled_even_when_no_answer_comes() {
        let never = tower::service_fn(|_: Request<Full<Bytes>>| {
            std::future::pending::<Result<Response<Full<Bytes>>, std::convert::Infallible>>()
        });
        let mut service = RequestInfoLayer::default().layer(never);
        let slot = RequestInfoSlot::new();
        let mut request = Request::new(Full::new(Bytes::from_static(
            br#"{"model":"llama","stream":true}"#,
        )));
        request.extensions_mut().insert(slot.clone());
        let waiting = tokio::time::timeout(Duration::from_millis(20), service.call(request)).await;
        assert!(waiting.is_err(), "the inner service never answers");
        let info = slot.get().expect("filled once the body was parsed");
        assert_eq!(info.model.as_deref(), Some("llama"));
        assert!(info.stream);
    }

    #[test]
    fn parses_model_and_stream_and_skips_the_rest() {
        let info = RequestInfo::parse(
            br#"{"messages":[{"role":"user","content":"hi \"there\""}],"model":"llama","stream":true,"n":{"deep":[1,2]}}"#,
        )
        .unwrap();
        assert_eq!(info.model.as_deref(), Some("llama"));
        assert!(info.stream);
    }

    #[test]
    fn escaped_model_names_are_decoded() {
        let info = RequestInfo::parse(br#"{"model":"a\u002fb"}"#).unwrap();
        assert_eq!(info.model.as_deref(), Some("a/b"));
        assert!(!info.stream);
    }

    #[test]
    fn wrong_types_and_bad_json_are_invalid_requests() {
        for body in [
            &br#"{"model":5}"#[..],
            br#"{"model":"m","stream":"yes"}"#,
            br#"[1,2]"#,
            // A request is an object: `["m", true]` must not read as a model.
            br#"["m",true]"#,
            br#"[]"#,
            br#""m""#,
            br#"{"model":"m""#,
            b"\xff\xfe",
            // Invalid UTF-8 in a field that is skipped, not read.
            b"{\"model\":\"m\",\"messages\":[{\"content\":\"\xff\xfe\"}]}",
        ] {
            assert!(
                matches!(
                    RequestInfo::parse(body),
                    Err(RouterError::InvalidRequest(_))
                ),
                "{body:?}"
            );
        }
    }

    #[test]
    fn a_whole_body_is_checked_as_the_layer_checks_it() {
        let required = RequestInfoConfig::default();
        let optional = RequestInfoConfig {
            require_model: false,
            ..required
        };
        let named = required.info_of(br#"{"model":"m","stream":true}"#).unwrap();
        assert_eq!((named.model.as_deref(), named.stream), (Some("m"), true));
        assert!(matches!(
            required.info_of(b"{}"),
            Err(RouterError::MissingModel)
        ));
        assert_eq!(optional.info_of(b"{}").unwrap(), RequestInfo::default());
        assert!(matches!(
            optional.info_of(br#"{"model":5}"#),
            Err(RouterError::InvalidRequest(_))
        ));
    }

    #[tokio::test]
    async fn a_raw_request_is_checked_and_parsed_as_an_http_one() {
        use http::StatusCode;
        use tower::ServiceExt;

        use crate::routed::Routed;
        use crate::server::{ServerConfig, read_raw_request_from};

        let raw = |body: &str| {
            let wire = format!(
                "POST /v1/x HTTP/1.1\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            read_raw_request_from(wire.as_bytes(), &ServerConfig::default())
                .unwrap()
                .unwrap()
                .0
        };
        let layer = RequestInfoLayer::new(RequestInfoConfig {
            max_body_bytes: 32,
            require_model: true,
        });
        let inner = tower::service_fn(|request: RawRequest| async move {
            let model = request.model().map(|m| m.to_string()).unwrap_or_default();
            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(model))))
        });
        let service = layer.layer(inner);

        let slot = RequestInfoSlot::new();
        let mut request = raw(r#"{"model":"m","stream":true}"#);
        request.set_info_slot(slot.clone());
        let answer = service.clone().oneshot(request).await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        assert!(
            answer
                .extensions()
                .get::<RequestInfo>()
                .is_some_and(|i| i.stream)
        );
        assert_eq!(slot.get().and_then(|i| i.model.as_deref()), Some("m"));
        let body = http_body_util::BodyExt::collect(answer.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(body, "m", "the inner service saw the model");

        for (body, status) in [
            (r#"{"stream":true}"#, StatusCode::BAD_REQUEST),
            (r#"["m"]"#, StatusCode::BAD_REQUEST),
            (
                r#"{"model":"m","prompt":"longer than the limit"}"#,
                StatusCode::PAYLOAD_TOO_LARGE,
            ),
        ] {
            let answer = service.clone().oneshot(raw(body)).await.unwrap();
            assert_eq!(answer.status(), status, "{body}");
        }

        // Answered with a `RawResponse`: the info in its field, rejections of its own type.
        let inner = tower::service_fn(|_: RawRequest| async move {
            let answer = crate::RawResponse::new(StatusCode::OK, Full::new(Bytes::new()));
            Ok::<_, std::convert::Infallible>(answer)
        });
        let service = layer.layer(inner);
        let answer = service
            .clone()
            .oneshot(raw(r#"{"model":"m","stream":true}"#))
            .await
            .unwrap();
        let info = answer.request_info().expect("passed on with the info");
        assert_eq!((info.model.as_deref(), info.stream), (Some("m"), true));
        let refused = service.oneshot(raw(r#"{"stream":true}"#)).await.unwrap();
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            refused.header("content-type"),
            Some(&b"application/json"[..])
        );
        assert!(refused.request_info().is_none());
    }
}
