//! Learns which models a node serves from its `GET /v1/models`.

use std::time::Duration;

use serde::Deserialize;

/// Why discovery failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
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
    client: &reqwest::Client,
    base_url: &str,
    api_key: Option<&str>,
    timeout: Duration,
) -> Result<Vec<String>, DiscoveryError> {
    let url = format!("{}/v1/models", base_url.trim_end_matches('/'));
    let mut request = client.get(&url).timeout(timeout);
    if let Some(key) = api_key {
        request = request.bearer_auth(key);
    }
    let response = request
        .send()
        .await
        .map_err(|e| DiscoveryError::Unreachable(e.to_string()))?;
    let status = response.status();
    if !status.is_success() {
        return Err(DiscoveryError::BadAnswer(format!("status {status}")));
    }
    let list: ModelList = response
        .json()
        .await
        .map_err(|e| DiscoveryError::BadAnswer(e.to_string()))?;
    Ok(list.data.into_iter().map(|m| m.id).collect())
}

/// Whether the node answers `GET /health` with a success status within `timeout`.
pub async fn check_health(client: &reqwest::Client, base_url: &str, timeout: Duration) -> bool {
    let url = format!("{}/health", base_url.trim_end_matches('/'));
    matches!(client.get(&url).timeout(timeout).send().await, Ok(r) if r.status().is_success())
}
