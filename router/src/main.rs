//! `llm-router`: the server.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use layers::{ClientConfig, NodePool, NodeSpec};
use router::discovery::discover_models;
use router::{AppState, LayerKind, StackConfig};
use tokio::net::TcpListener;

/// An OpenAI-compatible router for LLM inference nodes.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Node base URLs, comma-separated (quick mode, no config file).
    #[arg(long, value_delimiter = ',', required_unless_present = "demo")]
    upstream: Vec<String>,
    /// Start two built-in simulated nodes and route to them.
    #[arg(long, conflicts_with = "upstream")]
    demo: bool,
    /// Layers, outermost first, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "admission,timeout_wait,cached_select"
    )]
    layers: Vec<LayerKind>,
    /// Max concurrency per node in quick mode.
    #[arg(long, default_value_t = 32)]
    max_concurrency: usize,
    /// Log filter (tracing's EnvFilter syntax).
    #[arg(long, env = "LLM_ROUTER_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log)?)
        .init();

    let client = ClientConfig::default();
    let pool = NodePool::new();
    let state = AppState::new(pool.clone(), &client);
    let mut _demo_nodes = Vec::new();
    let specs = if cli.demo {
        let (nodes, specs) = router::demo::start_demo_nodes().await?;
        _demo_nodes = nodes;
        specs
    } else {
        let mut specs = Vec::new();
        for (i, url) in cli.upstream.iter().enumerate() {
            let mut spec = NodeSpec::new(format!("node-{}", i + 1), url.trim())
                .max_concurrency(cli.max_concurrency);
            match discover_models(&state.http_client, url, Duration::from_secs(3)).await {
                Ok(models) => spec.models = models,
                Err(error) => tracing::warn!(
                    node = spec.id,
                    %error,
                    "could not list the node's models; it will be offered every model"
                ),
            }
            specs.push(spec);
        }
        specs
    };
    pool.set_nodes(specs)?;

    let config = StackConfig {
        layers: cli.layers,
        ..StackConfig::default()
    };
    let app = router::app(state, &config);
    let listener = TcpListener::bind(cli.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cli.listen))?;
    let addr = listener.local_addr()?;
    let models = pool.snapshot().models();
    tracing::info!(%addr, nodes = pool.snapshot().nodes().len(), ?models, layers = ?config.layers, "llm-router listening");
    if cli.demo {
        println!("llm-router demo on http://{addr}  (models: demo-small, demo-large)");
        println!(
            "try: curl -s http://{addr}/v1/chat/completions -H 'content-type: application/json' \\\n       -d '{{\"model\":\"demo-small\",\"messages\":[{{\"role\":\"user\",\"content\":\"hello\"}}]}}'"
        );
    }
    axum::serve(router::nodelay(listener), app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
