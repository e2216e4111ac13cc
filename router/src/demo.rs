//! `--demo`: two simulated nodes, so a new user gets answers with no setup.

use layers::NodeSpec;
use loadtest::{SimConfig, SimNode};

/// The demo fleet: a fast small model and a slower large one, on ports the OS picks.
pub async fn start_demo_nodes() -> std::io::Result<(Vec<SimNode>, Vec<NodeSpec>)> {
    let fleet = [
        ("demo-fast", "demo-small", 15, 5, 8),
        ("demo-slow", "demo-large", 120, 25, 4),
    ];
    let mut nodes = Vec::new();
    let mut specs = Vec::new();
    for (id, model, ttft_ms, inter_token_ms, max) in fleet {
        let node = SimNode::start(SimConfig {
            models: vec![model.to_owned()],
            ttft_ms,
            inter_token_ms,
            tokens: 24,
            jitter: 0.2,
            max_concurrency: max,
            ..SimConfig::default()
        })
        .await?;
        specs.push(
            NodeSpec::new(id, node.url())
                .models([model])
                .max_concurrency(max),
        );
        nodes.push(node);
    }
    Ok((nodes, specs))
}
