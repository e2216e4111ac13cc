//! `llm-sim-node`: a simulated OpenAI-compatible inference node. See `loadtest::sim`.

use std::net::SocketAddr;

use clap::Parser;
use loadtest::{SimConfig, SimNode};

/// A simulated OpenAI-compatible inference node, for tests and benchmarks.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8001")]
    listen: SocketAddr,
    #[command(flatten)]
    sim: SimConfig,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let node = SimNode::bind(cli.sim.clone(), cli.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cli.listen))?;
    tracing::info!(addr = %node.addr(), models = ?cli.sim.models, "llm-sim-node listening");
    tokio::select! {
        () = node.wait() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
