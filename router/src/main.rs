//! `llm-router`: the server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use layers::NodeSpec;
use router::LayerKind;
use router::config::{Config, ConfigOverrides, LogFormat};
use router::server::{StartOptions, start};
use tokio::net::TcpListener;

/// The version with the commit the binary was built from (see build.rs): benchmark scripts
/// check it against the checkout their report is named after.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("LLM_ROUTER_COMMIT"),
    ")"
);

/// An OpenAI-compatible router for LLM inference nodes.
#[derive(Debug, Parser)]
#[command(version = VERSION, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML config file (see examples/router.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on (overrides the config's `listen`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Node base URLs, comma-separated: quick mode, added to the config's nodes.
    #[arg(long, value_delimiter = ',')]
    upstream: Vec<String>,
    /// Start two built-in simulated nodes and route to them.
    #[arg(long)]
    demo: bool,
    /// Layers, outermost first, comma-separated (overrides the config's `layers`).
    #[arg(long, value_delimiter = ',')]
    layers: Option<Vec<LayerKind>>,
    /// Max concurrency of each `--upstream` node.
    #[arg(long, default_value_t = 32)]
    max_concurrency: usize,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a config file and print a summary; exit 1 if it is invalid.
    CheckConfig {
        /// The file.
        file: PathBuf,
    },
    /// Print the SHA-256 to put in the config for an API key, admin token or secret.
    HashKey {
        /// The key; `-` reads it from standard input.
        key: String,
    },
}

fn init_logging(config: &Config) -> Result<(), String> {
    let filter = std::env::var("LLM_ROUTER_LOG").unwrap_or_else(|_| config.log.level.clone());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .map_err(|e| format!("bad log filter {filter:?}: {e}"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match config.log.format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

fn env_secret(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file }) => return check_config(&file),
        Some(Command::HashKey { key }) => return hash_key(&key),
        None => {}
    }
    match serve(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("llm-router: {message}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match Config::load(file) {
        Ok(config) => {
            let layers: Vec<&str> = config.layers.iter().map(|l| l.name()).collect();
            println!(
                "{}: ok (listen {}, {} static node(s), layers [{}], history {})",
                file.display(),
                config.listen,
                config.nodes.len(),
                layers.join(", "),
                if config.history.enabled {
                    config.history.path.display().to_string()
                } else {
                    "off".into()
                },
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}

fn hash_key(key: &str) -> ExitCode {
    let key = if key == "-" {
        let mut line = String::new();
        if std::io::stdin().read_line(&mut line).is_err() {
            eprintln!("cannot read the key from standard input");
            return ExitCode::FAILURE;
        }
        line.trim_end_matches(['\r', '\n']).to_owned()
    } else {
        key.to_owned()
    };
    println!("{}", router::auth::hash_hex(&key));
    ExitCode::SUCCESS
}

async fn serve(cli: Cli) -> Result<(), String> {
    let mut config = match &cli.config {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    let overrides = ConfigOverrides {
        listen: cli.listen,
        layers: cli.layers,
    };
    overrides.apply(&mut config).map_err(|e| e.to_string())?;
    init_logging(&config)?;

    let mut options = StartOptions {
        admin_token: env_secret("LLM_ROUTER_ADMIN_TOKEN"),
        registration_secret: env_secret("LLM_ROUTER_REGISTRATION_SECRET"),
        config_path: cli.config.clone(),
        overrides,
        ..StartOptions::default()
    };
    for (i, url) in cli.upstream.iter().enumerate() {
        options.extra_nodes.push(
            NodeSpec::new(format!("upstream-{}", i + 1), url.trim())
                .max_concurrency(cli.max_concurrency),
        );
    }
    let mut _demo_nodes = Vec::new();
    if cli.demo {
        let (nodes, specs) = router::demo::start_demo_nodes()
            .await
            .map_err(|e| format!("cannot start the demo nodes: {e}"))?;
        _demo_nodes = nodes;
        options.extra_nodes.extend(specs);
        if cli.config.is_none() {
            // The demo keeps no history file in the current directory.
            config.history.enabled = false;
        }
    }
    if config.nodes.is_empty() && options.extra_nodes.is_empty() {
        tracing::warn!(
            "no nodes configured: add [[nodes]], --upstream URL, or register nodes through POST /api/nodes"
        );
    }

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let running = start(config.clone(), listener, options)
        .await
        .map_err(|e| e.to_string())?;
    let addr = running.addr;
    let snapshot = running.services.state.pool.snapshot();
    tracing::info!(%addr, nodes = snapshot.nodes().len(), models = ?snapshot.models(), layers = ?config.layers, "llm-router listening");
    if cli.demo {
        println!("llm-router demo on http://{addr}  (models: demo-small, demo-large)");
        println!(
            "try: curl -s http://{addr}/v1/chat/completions -H 'content-type: application/json' \\\n       -d '{{\"model\":\"demo-small\",\"messages\":[{{\"role\":\"user\",\"content\":\"hello\"}}]}}'"
        );
    }
    reload_on_sighup(running.services.reloader.clone());
    shutdown_signal().await;
    running.shutdown().await;
    Ok(())
}

/// SIGHUP reloads the config file; the outcome is logged (see `router::reload`).
fn reload_on_sighup(reloader: std::sync::Arc<router::reload::Reloader>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("cannot listen for SIGHUP; reload through POST /api/config/reload");
            return;
        };
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the config file");
            let _ = reloader.reload().await;
        }
    });
    #[cfg(not(unix))]
    let _ = reloader;
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
