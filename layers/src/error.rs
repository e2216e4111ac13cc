//! Every error a client can get from the layers, and the one place that turns it into an
//! OpenAI-shaped HTTP response.
//!
//! Layers answer with a response, never with a `Service::Error`, so any order of layers composes
//! and the stack mounts in axum without `HandleErrorLayer`. The body follows OpenAI's shape,
//! `{"error": {"message", "type", "param", "code"}}`, so SDKs show the message. Messages never
//! name a node's address.

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};
use serde::Serialize;

/// `retry-after-ms`: the delay in milliseconds, which OpenAI's SDKs honour before `Retry-After`.
pub const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");

/// How a rejection is written: OpenAI JSON for HTTP clients, a gRPC status for gRPC clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ErrorFormat {
    /// An HTTP status with OpenAI's JSON error body.
    #[default]
    OpenAi,
    /// A gRPC trailers-only response: HTTP 200 with `grpc-status` and `grpc-message` headers,
    /// which gRPC clients read as the call's status.
    Grpc,
}

impl ErrorFormat {
    /// The format a request expects, from its `content-type`.
    pub fn of(headers: &HeaderMap) -> Self {
        Self::of_content_type(headers.get(CONTENT_TYPE).map(HeaderValue::as_bytes))
    }

    /// The format a request with this `content-type` value expects.
    pub fn of_content_type(content_type: Option<&[u8]>) -> Self {
        let grpc = content_type.is_some_and(|v| v.starts_with(b"application/grpc"));
        if grpc { Self::Grpc } else { Self::OpenAi }
    }
}

/// An error the router answers a client with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouterError {
    /// The body is not valid JSON, or a field has the wrong type.
    #[error("{0}")]
    InvalidRequest(String),
    /// The body has no `model`.
    #[error("you must provide a model parameter")]
    MissingModel,
    /// No node serves the requested model.
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    /// The body is larger than the configured limit.
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The request head is larger than the server reads, or has too many headers.
    #[error("the request head is larger than {limit} bytes, or has more than 100 headers")]
    HeadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The request body stopped coming, or came too slowly.
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    /// Admission control turned the request away: the fleet is too busy.
    #[error("the router is at capacity; retry after the indicated delay")]
    Overloaded {
        /// When a retry is likely to be accepted.
        retry_after: Duration,
    },
    /// Too many requests are already waiting for a slot.
    #[error("too many requests are waiting for a free node; retry after the indicated delay")]
    QueueFull {
        /// When a retry is likely to find room.
        retry_after: Duration,
    },
    /// No slot came free within the wait timeout.
    #[error("no node became free within {waited:?}; retry after the indicated delay")]
    WaitTimeout {
        /// How long the request waited.
        waited: Duration,
        /// When a retry is likely to find a slot.
        retry_after: Duration,
    },
    /// Nodes serve the model, but none may take requests now (all unhealthy or draining).
    #[error("no node is available for this model right now")]
    NoNodeAvailable {
        /// When to try again.
        retry_after: Duration,
    },
    /// The node could not be reached or broke the connection before answering.
    #[error("the upstream node failed to answer")]
    UpstreamUnavailable,
    /// The node did not send its first byte within the first-byte timeout.
    #[error("the upstream node did not answer in time")]
    UpstreamTimeout,
    /// The node answered with an error whose message cannot be scrubbed of its address
    /// (compressed, or too long), so only its status is passed on.
    #[error(
        "the node answered {status}; its message (compressed, or over 64 KiB) is not passed on"
    )]
    UpstreamMessageWithheld {
        /// The node's status, which the client gets.
        status: StatusCode,
    },
    /// Something inside the router went wrong.
    #[error("internal router error")]
    Internal,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

#[derive(Serialize)]
struct Body<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: &'a str,
}

impl RouterError {
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest(_) | Self::MissingModel => StatusCode::BAD_REQUEST,
            Self::ModelNotFound(_) => StatusCode::NOT_FOUND,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::HeadTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::Overloaded { .. } | Self::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::WaitTimeout { .. } | Self::NoNodeAvailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::UpstreamMessageWithheld { status } => *status,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `type` field.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_)
            | Self::MissingModel
            | Self::ModelNotFound(_)
            | Self::PayloadTooLarge { .. }
            | Self::HeadTooLarge { .. }
            | Self::RequestTimeout => "invalid_request_error",
            Self::Overloaded { .. } | Self::QueueFull { .. } => "rate_limit_error",
            Self::WaitTimeout { .. } | Self::NoNodeAvailable { .. } => "service_unavailable",
            Self::UpstreamUnavailable | Self::UpstreamTimeout | Self::Internal => "server_error",
            Self::UpstreamMessageWithheld { status } if status.is_server_error() => "server_error",
            Self::UpstreamMessageWithheld { .. } => "invalid_request_error",
        }
    }

    /// OpenAI's `code` field: a stable, machine-readable name.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "invalid_request",
            Self::MissingModel => "missing_model",
            Self::ModelNotFound(_) => "model_not_found",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::HeadTooLarge { .. } => "request_header_fields_too_large",
            Self::RequestTimeout => "request_timeout",
            Self::Overloaded { .. } => "overloaded",
            Self::QueueFull { .. } => "queue_full",
            Self::WaitTimeout { .. } => "wait_timeout",
            Self::NoNodeAvailable { .. } => "no_node_available",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::UpstreamMessageWithheld { .. } => "upstream_error",
            Self::Internal => "internal_error",
        }
    }

    /// OpenAI's `param` field: the request field at fault, if one is.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            Self::MissingModel | Self::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }

    /// When the client should try again, for errors where a retry can help.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Overloaded { retry_after }
            | Self::QueueFull { retry_after }
            | Self::WaitTimeout { retry_after, .. }
            | Self::NoNodeAvailable { retry_after } => Some(*retry_after),
            _ => None,
        }
    }

    /// The JSON body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn json_body(&self) -> Bytes {
        let message = self.to_string();
        let envelope = Envelope {
            error: Body {
                message: &message,
                kind: self.kind(),
                param: self.param(),
                code: self.code(),
            },
        };
        // Serializing plain strings cannot fail; the fallback keeps the path panic-free anyway.
        serde_json::to_vec(&envelope)
            .map(Bytes::from)
            .unwrap_or_else(|_| Bytes::from_static(b"{\"error\":{\"message\":\"error\",\"type\":\"server_error\",\"param\":null,\"code\":\"internal_error\"}}"))
    }

    /// The whole response: status, `Retry-After` and `retry-after-ms` where a retry helps, and the
    /// JSON body.
    pub fn into_response<B: From<Bytes>>(self) -> Response<B> {
        let mut response = Response::new(B::from(self.json_body()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        insert_retry_after(headers, self.retry_after());
        response
    }

    /// The gRPC status code for this error.
    pub fn grpc_code(&self) -> u8 {
        match self {
            Self::InvalidRequest(_) | Self::MissingModel => 3, // INVALID_ARGUMENT
            Self::UpstreamTimeout | Self::RequestTimeout => 4, // DEADLINE_EXCEEDED
            Self::ModelNotFound(_) => 5,                       // NOT_FOUND
            Self::PayloadTooLarge { .. }
            | Self::HeadTooLarge { .. }
            | Self::Overloaded { .. }
            | Self::QueueFull { .. } => 8, // RESOURCE_EXHAUSTED
            Self::Internal => 13,                              // INTERNAL
            Self::WaitTimeout { .. }
            | Self::NoNodeAvailable { .. }
            | Self::UpstreamUnavailable
            | Self::UpstreamMessageWithheld { .. } => 14, // UNAVAILABLE
        }
    }

    /// The response in `format`.
    pub fn into_response_as<B: From<Bytes>>(self, format: ErrorFormat) -> Response<B> {
        match format {
            ErrorFormat::OpenAi => self.into_response(),
            ErrorFormat::Grpc => self.into_grpc_response(),
        }
    }

    /// A gRPC trailers-only response with this error's status, message and retry delay.
    pub fn into_grpc_response<B: From<Bytes>>(self) -> Response<B> {
        let mut response = Response::new(B::from(Bytes::new()));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(
            "grpc-status",
            HeaderValue::from(u16::from(self.grpc_code())),
        );
        if let Ok(message) = HeaderValue::from_str(&grpc_percent_encode(&self.to_string())) {
            headers.insert("grpc-message", message);
        }
        insert_retry_after(headers, self.retry_after());
        response
    }

    /// The error as one server-sent event, for a stream that already started.
    pub fn sse_event(&self) -> Bytes {
        let json = self.json_body();
        let mut event = Vec::with_capacity(json.len() + 8);
        event.extend_from_slice(b"data: ");
        event.extend_from_slice(&json);
        event.extend_from_slice(b"\n\n");
        Bytes::from(event)
    }
}

fn insert_retry_after(headers: &mut HeaderMap, delay: Option<Duration>) {
    if let Some(delay) = delay {
        let millis = delay.as_millis().max(1);
        // Retry-After only takes whole seconds; round up so clients never come back early.
        let secs = millis.div_ceil(1000);
        headers.insert(RETRY_AFTER, HeaderValue::from(secs as u64));
        headers.insert(RETRY_AFTER_MS, HeaderValue::from(millis as u64));
    }
}

/// gRPC's `grpc-message` encoding: bytes outside printable ASCII, and `%`, as `%XX`.
fn grpc_percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// How long until `excess` more slots come free at `rate` slots per second, clamped to a range a
/// client can act on (100 ms to 60 s). With no measured rate, one second.
pub fn retry_delay(excess: usize, rate: f64) -> Duration {
    if rate <= 0.0 || !rate.is_finite() {
        return Duration::from_secs(1);
    }
    let secs = excess.max(1) as f64 / rate;
    Duration::from_secs_f64(secs.clamp(0.1, 60.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejection_carries_status_retry_after_and_openai_body() {
        let response: Response<Bytes> = RouterError::Overloaded {
            retry_after: Duration::from_millis(1500),
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[RETRY_AFTER], "2");
        assert_eq!(response.headers()[RETRY_AFTER_MS], "1500");
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(body["error"]["code"], "overloaded");
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("capacity")
        );
        assert!(body["error"]["param"].is_null());
    }

    #[test]
    fn model_errors_name_the_param() {
        let response: Response<Bytes> = RouterError::ModelNotFound("x\"y".into()).into_response();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert!(response.headers().get(RETRY_AFTER).is_none());
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(body["error"]["param"], "model");
        assert_eq!(body["error"]["message"], "the model `x\"y` does not exist");
    }

    #[test]
    fn grpc_clients_get_a_trailers_only_status() {
        let mut request_headers = HeaderMap::new();
        request_headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert_eq!(ErrorFormat::of(&request_headers), ErrorFormat::Grpc);
        assert_eq!(ErrorFormat::of(&HeaderMap::new()), ErrorFormat::OpenAi);
        let response: Response<Bytes> = RouterError::Overloaded {
            retry_after: Duration::from_millis(300),
        }
        .into_response_as(ErrorFormat::Grpc);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "8");
        assert_eq!(response.headers()[RETRY_AFTER_MS], "300");
        assert!(response.body().is_empty());
        assert_eq!(grpc_percent_encode("100% é"), "100%25 %C3%A9");
    }

    #[test]
    fn retry_delay_follows_the_release_rate() {
        assert_eq!(retry_delay(10, 0.0), Duration::from_secs(1));
        assert_eq!(retry_delay(10, 5.0), Duration::from_secs(2));
        assert_eq!(retry_delay(1, 1e9), Duration::from_millis(100));
        assert_eq!(retry_delay(10_000, 1.0), Duration::from_secs(60));
    }
}
