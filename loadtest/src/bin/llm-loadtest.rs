//! `llm-loadtest`: load against any OpenAI-compatible endpoint (`run`), or one of the benchmark
//! scenarios with its own sim nodes and router (`scenario`). See `loadtest::load` and
//! `loadtest::scenario`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use loadtest::load::{self, LoadSpec, Pace};
use loadtest::report::{NodePeak, Report, Run};
use loadtest::scenario::{self, Settings};

/// Load tests for llm-router and other OpenAI-compatible endpoints.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Directory for the reports (`<name>.md`, `.json`, `.svg`).
    #[arg(long, global = true, default_value = "loadtest/results")]
    out: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One load against a running endpoint.
    Run(RunArgs),
    /// A benchmark scenario: starts its own sim nodes and router.
    Scenario(ScenarioArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Base URL, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    url: String,
    /// Model to ask for.
    #[arg(long, default_value = "sim-model")]
    model: String,
    /// Stream the answers (SSE).
    #[arg(long)]
    stream: bool,
    /// Closed loop: this many requests in flight.
    #[arg(long, conflicts_with = "rate")]
    connections: Option<usize>,
    /// Open loop: this many requests started per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds of load.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds a request may take to its last byte.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// `max_tokens` of each request.
    #[arg(long)]
    max_tokens: Option<u32>,
    /// API key, sent as a bearer token.
    #[arg(long, env = "LLM_LOADTEST_API_KEY")]
    api_key: Option<String>,
    /// Speak HTTP/2 (prior knowledge), many requests per connection.
    #[arg(long)]
    http2: bool,
    /// Sim nodes to read the peak in-flight count from (`GET <url>/sim/stats`), comma-separated.
    #[arg(long, value_delimiter = ',')]
    sim_nodes: Vec<String>,
    /// Report name.
    #[arg(long, default_value = "run")]
    name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Overhead,
    Streaming,
    Fleet,
    Overload,
    /// The reliability soak (not part of `all`): mixed load, a node killed on a schedule.
    Soak,
    All,
}

#[derive(Debug, clap::Args)]
struct ScenarioArgs {
    /// Which scenario.
    #[arg(value_enum)]
    scenario: Scenario,
    /// The llm-router binary; default: beside this one.
    #[arg(long)]
    router: Option<PathBuf>,
    /// Seconds per measured load.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of the 3× phase of `overload`.
    #[arg(long, default_value_t = 60.0)]
    overload_duration: f64,
    /// Concurrent streams in `streaming`.
    #[arg(long, default_value_t = 10_000)]
    streams: usize,
    /// In `streaming`, send the streams over HTTP/1.1, one connection each (needs about two file
    /// descriptors per stream in the router).
    #[arg(long)]
    streams_over_http1: bool,
    /// Seconds the `soak` runs.
    #[arg(long, default_value_t = 600.0)]
    soak_duration: f64,
    /// In `soak`, kill a node every this many seconds (it comes back 5 s later).
    #[arg(long, default_value_t = 60.0)]
    kill_every: f64,
    /// Requests per second in `soak`, half streamed.
    #[arg(long, default_value_t = 80.0)]
    soak_rate: f64,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Run(args) => run(args, &cli.out).await,
        Command::Scenario(args) => scenarios(args, &cli.out).await,
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("llm-loadtest: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: RunArgs, out: &std::path::Path) -> Result<(), String> {
    let pace = match (args.connections, args.rate) {
        (_, Some(rate)) => Pace::Open { rate },
        (Some(connections), None) => Pace::Closed { connections },
        (None, None) => Pace::Closed { connections: 64 },
    };
    let mut spec = LoadSpec::chat(
        &args.url,
        &args.model,
        pace,
        Duration::from_secs_f64(args.duration),
    )
    .streaming(args.stream);
    spec.request_timeout = Duration::from_secs_f64(args.timeout);
    spec.max_tokens = args.max_tokens;
    spec.api_key = args.api_key;
    spec.http2 = args.http2;
    let result = load::run(spec).await?;
    let mut nodes = Vec::new();
    for url in &args.sim_nodes {
        nodes.push(sim_peak(url).await?);
    }
    let mut report = Report::new(&args.name, &format!("{} at {}", describe(pace), args.url));
    report.runs.push(Run {
        label: args.name.clone(),
        result,
        nodes,
        router: None,
    });
    let md = report
        .write(out)
        .map_err(|e| format!("cannot write the report: {e}"))?;
    print!("{}", report.markdown());
    eprintln!("report: {}", md.display());
    Ok(())
}

fn describe(pace: Pace) -> String {
    match pace {
        Pace::Closed { connections } => format!("closed loop of {connections}"),
        Pace::Open { rate } => format!("{rate} req/s"),
    }
}

async fn sim_peak(url: &str) -> Result<NodePeak, String> {
    let stats: serde_json::Value =
        scenario::get_json(&format!("{}/sim/stats", url.trim_end_matches('/')), None).await?;
    Ok(NodePeak {
        node: url.to_owned(),
        max_concurrency: stats["config"]["max_concurrency"].as_u64().unwrap_or(0) as usize,
        peak_in_flight: stats["peak_in_flight"].as_u64().unwrap_or(0) as usize,
        requests: stats["requests"].as_u64().unwrap_or(0),
    })
}

async fn scenarios(args: ScenarioArgs, out: &std::path::Path) -> Result<(), String> {
    let router_bin = match args.router {
        Some(path) => path,
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("llm-router"),
    };
    let settings = Settings {
        router_bin,
        out_dir: out.to_owned(),
        duration: Duration::from_secs_f64(args.duration),
        overload_duration: Duration::from_secs_f64(args.overload_duration),
        streams: args.streams,
        streams_over_h2: !args.streams_over_http1,
    };
    let which: &[Scenario] = match args.scenario {
        Scenario::All => &[
            Scenario::Overhead,
            Scenario::Streaming,
            Scenario::Fleet,
            Scenario::Overload,
        ],
        ref one => std::slice::from_ref(one),
    };
    for scenario in which {
        eprintln!("scenario {scenario:?}");
        let report = match scenario {
            Scenario::Overhead => scenario::overhead(&settings).await?,
            Scenario::Streaming => scenario::streaming(&settings).await?,
            Scenario::Fleet => scenario::fleet(&settings).await?,
            Scenario::Overload => scenario::overload(&settings).await?,
            Scenario::Soak => {
                let soak = loadtest::soak::SoakSettings {
                    duration: Duration::from_secs_f64(args.soak_duration),
                    kill_every: Duration::from_secs_f64(args.kill_every),
                    rate: args.soak_rate,
                    ..Default::default()
                };
                loadtest::soak::soak(&settings, soak).await?
            }
            Scenario::All => unreachable!("expanded above"),
        };
        let md = report
            .write(out)
            .map_err(|e| format!("cannot write the report: {e}"))?;
        for finding in &report.findings {
            eprintln!("  - {finding}");
        }
        eprintln!("report: {}", md.display());
    }
    Ok(())
}
