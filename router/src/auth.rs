//! Credentials: client API keys for `/v1`, the admin token, the registration secret and node
//! tokens.
//!
//! Secrets are kept only as SHA-256 digests, and a presented secret is hashed and compared in
//! constant time against every stored digest, so neither the stored form nor the timing of a
//! comparison gives a secret away. Nothing here logs a secret.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::HeaderMap;
use http::header::AUTHORIZATION;
use layers::{RawRequest, RouterError};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::config::AuthConfig;

/// A SHA-256 digest.
pub type Digest32 = [u8; 32];

/// SHA-256 of a secret.
pub fn digest(secret: &str) -> Digest32 {
    Sha256::digest(secret.as_bytes()).into()
}

/// Hex form of SHA-256, as stored in config files.
pub fn hash_hex(secret: &str) -> String {
    digest(secret).iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex(hex: &str) -> Option<Digest32> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Equal, in time that does not depend on where the inputs differ.
pub fn constant_time_eq(a: &Digest32, b: &Digest32) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A random token, 32 bytes from the operating system, hex-encoded.
pub fn new_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The bearer token of a request, if it has one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    bearer_in(headers.get(AUTHORIZATION)?.as_bytes())
}

/// The bearer token in an `authorization` value: visible ASCII (as `HeaderValue::to_str`
/// asks), the scheme `Bearer` in any case, then the token.
fn bearer_in(value: &[u8]) -> Option<&str> {
    if !value.iter().all(|&b| b == b'\t' || (32..127).contains(&b)) {
        return None;
    }
    let value = std::str::from_utf8(value).ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The id of the API key a `/v1` request used, in its extensions (for the history).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyId(pub Arc<str>);

/// Every credential the router checks.
#[derive(Debug, Default)]
pub struct Credentials {
    api_keys: Vec<(Arc<str>, Digest32)>,
    admin: Option<Digest32>,
    registration: Option<Digest32>,
}

impl Credentials {
    /// From the config, with the plain admin token and registration secret from the environment
    /// (`LLM_ROUTER_ADMIN_TOKEN`, `LLM_ROUTER_REGISTRATION_SECRET`) when given.
    pub fn from_config(
        config: &AuthConfig,
        admin_token: Option<&str>,
        registration_secret: Option<&str>,
    ) -> Self {
        Self {
            api_keys: config
                .api_keys
                .iter()
                .filter_map(|k| Some((Arc::from(k.id.as_str()), parse_hex(&k.sha256)?)))
                .collect(),
            admin: admin_token
                .filter(|t| !t.is_empty())
                .map(digest)
                .or_else(|| config.admin_token_sha256.as_deref().and_then(parse_hex)),
            registration: registration_secret
                .filter(|t| !t.is_empty())
                .map(digest)
                .or_else(|| {
                    config
                        .registration_secret_sha256
                        .as_deref()
                        .and_then(parse_hex)
                }),
        }
    }

    /// Whether `/v1` needs a key.
    pub fn keys_required(&self) -> bool {
        !self.api_keys.is_empty()
    }

    /// The id of the key `presented` matches. Every stored key is compared, match or not.
    pub fn api_key_id(&self, presented: &str) -> Option<Arc<str>> {
        let presented = digest(presented);
        let mut found = None;
        for (id, stored) in &self.api_keys {
            if constant_time_eq(&presented, stored) && found.is_none() {
                found = Some(id.clone());
            }
        }
        found
    }

    /// Whether the request carries the admin token.
    pub fn is_admin(&self, headers: &HeaderMap) -> bool {
        matches_digest(self.admin.as_ref(), bearer(headers))
    }

    /// Whether the request carries the registration secret.
    pub fn is_registration(&self, headers: &HeaderMap) -> bool {
        matches_digest(self.registration.as_ref(), bearer(headers))
    }

    /// Whether an admin token is configured at all.
    pub fn admin_configured(&self) -> bool {
        self.admin.is_some()
    }
}

fn matches_digest(stored: Option<&Digest32>, presented: Option<&str>) -> bool {
    match (stored, presented) {
        (Some(stored), Some(presented)) => constant_time_eq(stored, &digest(presented)),
        _ => false,
    }
}

/// An OpenAI-shaped 401.
pub fn unauthorized(message: &str, code: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": code}});
    let mut response = (http::StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
    response.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Bearer"),
    );
    response
}

/// Middleware for `/v1`: with keys configured, a request needs a valid `Authorization: Bearer`
/// key; its id goes into the request's extensions. The key itself is removed before the request
/// goes on (the proxy sends the node's own key, if any).
pub async fn require_api_key(
    State(credentials): State<Arc<Credentials>>,
    mut request: Request,
    next: Next,
) -> Response {
    match check_api_key(&credentials, &mut request) {
        Ok(()) => next.run(request).await,
        Err(refused) => *refused,
    }
}

/// The check [`require_api_key`] makes, for a caller outside axum's middleware: `Err(401)`
/// without a valid key; with one, its id goes into the extensions and the key is removed.
pub fn check_api_key<B>(
    credentials: &Credentials,
    request: &mut http::Request<B>,
) -> Result<(), Box<Response>> {
    if !credentials.keys_required() {
        return Ok(());
    }
    let Some(id) = bearer(request.headers()).and_then(|k| credentials.api_key_id(k)) else {
        return Err(Box::new(unauthorized(
            "invalid or missing API key: send Authorization: Bearer <key>",
            "invalid_api_key",
        )));
    };
    request.headers_mut().remove(AUTHORIZATION);
    request.extensions_mut().insert(ApiKeyId(id));
    Ok(())
}

/// [`check_api_key`] for a [`RawRequest`]. The key is not removed: the proxy never sends the
/// client's `authorization` on (it sends the node's own key, or none).
pub fn check_api_key_raw(
    credentials: &Credentials,
    request: &mut RawRequest,
) -> Result<(), Box<Response>> {
    if !credentials.keys_required() {
        return Ok(());
    }
    let presented = request.header(AUTHORIZATION.as_str()).and_then(bearer_in);
    let Some(id) = presented.and_then(|k| credentials.api_key_id(k)) else {
        return Err(Box::new(unauthorized(
            "invalid or missing API key: send Authorization: Bearer <key>",
            "invalid_api_key",
        )));
    };
    request.extensions_mut().insert(ApiKeyId(id));
    Ok(())
}

/// The admin check for handlers: `Some(401 response)` unless the request carries the admin token.
pub fn deny_unless_admin(credentials: &Credentials, headers: &HeaderMap) -> Option<Response> {
    if credentials.is_admin(headers) {
        return None;
    }
    let message = if credentials.admin_configured() {
        "invalid or missing admin token"
    } else {
        "the admin API is disabled: set auth.admin_token_sha256 or LLM_ROUTER_ADMIN_TOKEN"
    };
    Some(unauthorized(message, "invalid_admin_token"))
}

/// A `RouterError` as an axum response.
pub fn error_response(error: RouterError) -> Response {
    error.into_response::<axum::body::Body>()
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;
    use crate::config::ApiKeyConfig;

    fn headers(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        h
    }

    #[test]
    fn keys_are_matched_by_hash_only() {
        let config = AuthConfig {
            api_keys: vec![
                ApiKeyConfig {
                    id: "a".into(),
                    sha256: hash_hex("key-a"),
                },
                ApiKeyConfig {
                    id: "b".into(),
                    sha256: hash_hex("key-b"),
                },
            ],
            admin_token_sha256: Some(hash_hex("root")),
            registration_secret_sha256: None,
        };
        let creds = Credentials::from_config(&config, None, Some("reg"));
        assert_eq!(creds.api_key_id("key-b").as_deref(), Some("b"));
        assert_eq!(creds.api_key_id("key-c"), None);
        assert_eq!(
            creds.api_key_id(&hash_hex("key-a")),
            None,
            "the hash is not the key"
        );
        assert!(creds.is_admin(&headers("root")));
        assert!(!creds.is_admin(&headers("key-a")));
        assert!(creds.is_registration(&headers("reg")));
        assert!(!creds.is_registration(&headers("root")));
        assert!(!creds.is_admin(&HeaderMap::new()));
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer(&headers("abc")), Some("abc"));
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        h.insert(AUTHORIZATION, HeaderValue::from_static("bearer  xyz "));
        assert_eq!(bearer(&h), Some("xyz"));
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(&digest("x"), &digest("x")));
        assert!(!constant_time_eq(&digest("x"), &digest("y")));
        assert_eq!(
            hash_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(new_token().unwrap().len(), 64);
    }
}
