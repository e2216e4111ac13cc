//! [`AppState`]: what all requests share.

use std::sync::Arc;

use layers::{AdmissionCounters, ClientConfig, HttpClient, NodePool, build_client};

/// Shared by every request: the node pool and the process's one pooled HTTP client.
///
/// Cloning is cheap and shares both: the pool is an `Arc` inside, and the client's connection
/// pool is shared by all its clones.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The nodes and their live load.
    pub pool: NodePool,
    /// The one HTTP client used to reach nodes; its connections are pooled and reused.
    pub http_client: HttpClient,
    /// Admission decisions, for metrics.
    pub admission: Arc<AdmissionCounters>,
}

impl AppState {
    /// State over `pool` with a new shared client.
    pub fn new(pool: NodePool, client: &ClientConfig) -> Self {
        Self {
            pool,
            http_client: build_client(client),
            admission: Arc::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use http::Request;
    use layers::NodeSpec;
    use loadtest::{SimConfig, SimNode};
    use tower::ServiceExt;

    use super::*;
    use crate::stack::StackConfig;

    /// The state holds one client, and every route built from it sends through that client: a
    /// chat request and an embeddings request, on different routes, share one TCP connection.
    /// Were each route given its own client, the node would count two.
    #[tokio::test]
    async fn test_app_state_has_shared_http_client() {
        let node = SimNode::start(SimConfig::instant(&["m"])).await.unwrap();
        let pool = NodePool::from_specs([NodeSpec::new("a", node.url()).models(["m"])]).unwrap();
        let state = AppState::new(pool, &ClientConfig::default());
        let app = crate::app(state.clone(), &StackConfig::default());
        for path in [
            "/v1/chat/completions",
            "/v1/embeddings",
            "/v1/chat/completions",
        ] {
            let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"input":"hi"}"#;
            let request = Request::post(path)
                .header("content-type", "application/json")
                .body(Body::from(body))
                .unwrap();
            let response = app.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status(), 200, "{path}");
            // Read to the end so the connection goes back to the pool.
            axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
        }
        assert_eq!(node.stats().requests(), 3);
        assert_eq!(
            node.stats().connections(),
            1,
            "all routes share the state's pooled client"
        );
    }
}
