//! Learns which models a node serves from its `GET /v1/models`.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use layers::HttpClient;
use serde::Deserialize;

/// Why discovery failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The URL could not be built.
    #[error("bad node URL {0}")]
    BadUrl(String),
    /// The node did not answer in time or the connection failed.
    #[error("node did not answer: {0}")]
    Unreachable(String),
    /// The node answered something other than an OpenAI model list.
    #[error("node answered {0}, not a model list")]
    BadAnswer(String),
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelEntry>,
}

#[derive(Deserialize)]
struct ModelEntry {
    id: String,
}

/// Asks the node at `base_url` for its models.
pub async fn discover_models(
    client: &HttpClient,
    base_url: &str,
    timeout: Duration,
) -> Result<Vec<String>, DiscoveryError> {
    let url = format!("{}/v1/models", base_url.trim_end_matches('/'));
    let request = Request::get(&url)
        .body(Full::new(Bytes::new()))
        .map_err(|_| DiscoveryError::BadUrl(base_url.to_owned()))?;
    let fetch = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| DiscoveryError::Unreachable(e.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| DiscoveryError::Unreachable(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            return Err(DiscoveryError::BadAnswer(format!("status {status}")));
        }
        let list: ModelList =
            serde_json::from_slice(&body).map_err(|e| DiscoveryError::BadAnswer(e.to_string()))?;
        Ok(list.data.into_iter().map(|m| m.id).collect())
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| DiscoveryError::Unreachable("timed out".into()))?
}
