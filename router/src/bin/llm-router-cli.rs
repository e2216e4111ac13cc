//! `llm-router-cli`: the command-line client of the router's admin API
//! (`specs/SPEC-35375000/admin-api.md`).
//!
//! Answers are parsed into typed structs and rendered by pure functions (tested below); the HTTP
//! calls live in one small client. It speaks plain HTTP only (no TLS is built in): put a TLS
//! terminator in front of a remote router, or tunnel.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use serde::Deserialize;
use serde_json::Value;

/// Manage an llm-router: nodes, models, request history and statistics.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    after_help = "The router is reached over plain HTTP (http:// URLs only)."
)]
struct Cli {
    /// The router's base URL.
    #[arg(
        long,
        env = "LLM_ROUTER_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// The admin token (sent as Authorization: Bearer).
    #[arg(long, env = "LLM_ROUTER_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Print the server's JSON instead of a table (JSON Lines with `logs --follow`).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List, add, remove or drain nodes.
    Nodes {
        #[command(subcommand)]
        command: NodesCommand,
    },
    /// The models the nodes serve.
    Models,
    /// The request history, newest last.
    Logs(LogsArgs),
    /// Read the router's config file again: apply its nodes, list what waits for a restart.
    Reload,
    /// Counts, error rates and latency percentiles.
    Stats {
        /// Only requests since this: a duration ago (30s, 10m, 2h, 1d) or unix milliseconds.
        #[arg(long)]
        since: Option<String>,
        /// Only requests before this unix millisecond.
        #[arg(long)]
        until: Option<i64>,
    },
}

#[derive(Debug, Subcommand)]
enum NodesCommand {
    /// List the nodes.
    List,
    /// Add a node; prints its id and its token.
    Add {
        /// The node's base URL, e.g. http://10.0.0.7:8000. (Not named `url`: that is the global
        /// `--url` of the router, and clap would let one overwrite the other.)
        #[arg(value_name = "NODE_URL")]
        node_url: String,
        /// Its id (made up when absent).
        #[arg(long)]
        id: Option<String>,
        /// The models it serves, comma-separated (read from the node when absent).
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        /// Requests it takes at once.
        #[arg(long)]
        max_concurrency: Option<usize>,
        /// Preference among equally fast nodes.
        #[arg(long)]
        weight: Option<u32>,
    },
    /// Remove a node (its in-flight requests finish).
    Remove {
        /// The node's id.
        id: String,
    },
    /// Drain a node: it finishes its requests and takes no new ones.
    Drain {
        /// The node's id.
        id: String,
        /// Undo: let it take requests again.
        #[arg(long)]
        undo: bool,
    },
}

#[derive(Debug, clap::Args)]
struct LogsArgs {
    /// Only this model.
    #[arg(long)]
    model: Option<String>,
    /// Only this node.
    #[arg(long)]
    node: Option<String>,
    /// Only this status (200) or class (5xx).
    #[arg(long)]
    status: Option<String>,
    /// Only requests since this: a duration ago (30s, 10m, 2h, 1d) or unix milliseconds.
    #[arg(long)]
    since: Option<String>,
    /// Only requests before this unix millisecond.
    #[arg(long)]
    until: Option<i64>,
    /// How many rows (at most 1000).
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Keep printing new requests as they arrive, until Ctrl-C.
    #[arg(long)]
    follow: bool,
}

// ---- answers ------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct NodeList {
    nodes: Vec<Node>,
}

#[derive(Debug, Deserialize)]
struct Node {
    id: String,
    url: String,
    models: Vec<String>,
    max_concurrency: usize,
    healthy: bool,
    draining: bool,
    in_flight: usize,
    source: String,
    consecutive_failures: u32,
    ttfb_ewma_ms: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct ReloadReport {
    nodes: NodeChanges,
    restart_needed: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct NodeChanges {
    added: Vec<String>,
    updated: Vec<String>,
    removed: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct ModelList {
    models: Vec<Model>,
}

#[derive(Debug, Deserialize)]
struct Model {
    id: String,
    nodes: Vec<String>,
    available: bool,
}

#[derive(Debug, Deserialize)]
struct LogPage {
    logs: Vec<LogRow>,
}

#[derive(Debug, Deserialize)]
struct LogRow {
    id: i64,
    ts_ms: i64,
    request_id: String,
    model: Option<String>,
    node_id: Option<String>,
    status: u16,
    latency_ms: f64,
    ttfb_ms: Option<f64>,
    prompt_tokens: Option<u32>,
    completion_tokens: Option<u32>,
    api_key_id: Option<String>,
    client_disconnected: bool,
    #[serde(default)]
    upstream_error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Summary {
    p50: Option<f64>,
    p95: Option<f64>,
    p99: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct Group {
    #[serde(alias = "node_id")]
    model: Option<String>,
    total: u64,
    errors: u64,
    error_rate: f64,
    latency_ms: Summary,
}

#[derive(Debug, Deserialize)]
struct HistoryCounts {
    written: u64,
    dropped: u64,
}

#[derive(Debug, Deserialize)]
struct Stats {
    total: u64,
    errors: u64,
    error_rate: f64,
    latency_ms: Summary,
    ttfb_ms: Summary,
    by_model: Vec<Group>,
    by_node: Vec<Group>,
    history: HistoryCounts,
}

// ---- rendering (pure) ---------------------------------------------------------------------

const MAX_CELL: usize = 40;

fn truncate(cell: &str) -> String {
    if cell.chars().count() <= MAX_CELL {
        cell.to_owned()
    } else {
        let mut s: String = cell.chars().take(MAX_CELL - 1).collect();
        s.push('…');
        s
    }
}

/// Aligned columns with a header row; cells longer than 40 characters are cut with `…`.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| truncate(c)).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(cell);
                out.push_str(&" ".repeat(w - cell.chars().count() + 2));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn render_nodes(nodes: &[Node]) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.id.clone(),
                n.url.clone(),
                n.models.join(","),
                if n.healthy { "yes" } else { "no" }.into(),
                if n.draining { "yes" } else { "no" }.into(),
                format!("{}/{}", n.in_flight, n.max_concurrency),
                opt_ms(n.ttfb_ewma_ms),
                n.consecutive_failures.to_string(),
                n.source.clone(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "URL",
            "MODELS",
            "HEALTHY",
            "DRAINING",
            "IN-FLIGHT/MAX",
            "TTFB ms",
            "FAILS",
            "SOURCE",
        ],
        &rows,
    )
}

fn render_reload(report: &ReloadReport) -> String {
    let changes = &report.nodes;
    let mut out = String::from("config reloaded\n");
    for (what, ids) in [
        ("added", &changes.added),
        ("updated", &changes.updated),
        ("removed", &changes.removed),
    ] {
        if !ids.is_empty() {
            out.push_str(&format!("nodes {what}: {}\n", ids.join(", ")));
        }
    }
    if changes.added.is_empty() && changes.updated.is_empty() && changes.removed.is_empty() {
        out.push_str("nodes unchanged\n");
    }
    if !report.restart_needed.is_empty() {
        out.push_str(&format!(
            "changed, applied at the next restart: {}\n",
            report.restart_needed.join(", ")
        ));
    }
    out
}

fn render_models(models: &[Model]) -> String {
    let rows: Vec<Vec<String>> = models
        .iter()
        .map(|m| {
            vec![
                m.id.clone(),
                m.nodes.join(","),
                if m.available { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    table(&["MODEL", "NODES", "AVAILABLE"], &rows)
}

fn log_cells(r: &LogRow) -> Vec<String> {
    let status = match (&r.upstream_error, r.client_disconnected) {
        (Some(error), _) => format!("{} ({error})", r.status),
        (None, true) => format!("{} (gone)", r.status),
        (None, false) => r.status.to_string(),
    };
    vec![
        utc(r.ts_ms),
        status,
        opt(r.model.as_deref()),
        opt(r.node_id.as_deref()),
        format!("{:.1}", r.latency_ms),
        opt_ms(r.ttfb_ms),
        format!("{}/{}", opt(r.prompt_tokens), opt(r.completion_tokens)),
        opt(r.api_key_id.as_deref()),
        r.request_id.clone(),
    ]
}

const LOG_HEADERS: [&str; 9] = [
    "TIME",
    "STATUS",
    "MODEL",
    "NODE",
    "LATENCY ms",
    "TTFB ms",
    "TOKENS in/out",
    "KEY",
    "REQUEST-ID",
];

fn render_logs(rows: &[LogRow]) -> String {
    let cells: Vec<Vec<String>> = rows.iter().map(log_cells).collect();
    table(&LOG_HEADERS, &cells)
}

fn render_stats(stats: &Stats) -> String {
    let p = |s: &Summary| {
        format!(
            "p50 {} / p95 {} / p99 {} ms",
            opt_ms(s.p50),
            opt_ms(s.p95),
            opt_ms(s.p99)
        )
    };
    let mut out = format!(
        "requests  {}\nerrors    {} ({:.2}%)\nlatency   {}\nttfb      {}\nhistory   {} written, {} dropped\n",
        stats.total,
        stats.errors,
        stats.error_rate * 100.0,
        p(&stats.latency_ms),
        p(&stats.ttfb_ms),
        stats.history.written,
        stats.history.dropped,
    );
    for (title, groups) in [("MODEL", &stats.by_model), ("NODE", &stats.by_node)] {
        let rows: Vec<Vec<String>> = groups
            .iter()
            .map(|g| {
                vec![
                    opt(g.model.as_deref()),
                    g.total.to_string(),
                    g.errors.to_string(),
                    format!("{:.2}%", g.error_rate * 100.0),
                    opt_ms(g.latency_ms.p50),
                    opt_ms(g.latency_ms.p95),
                    opt_ms(g.latency_ms.p99),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            &[
                title,
                "REQUESTS",
                "ERRORS",
                "ERROR RATE",
                "p50 ms",
                "p95 ms",
                "p99 ms",
            ],
            &rows,
        ));
    }
    out
}

/// `YYYY-MM-DD HH:MM:SS.mmm` in UTC.
fn utc(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `30s`, `10m`, `2h`, `1d` ago, or plain unix milliseconds.
fn parse_since(value: &str, now_ms: i64) -> Result<i64, String> {
    let value = value.trim();
    if let Ok(ms) = value.parse::<i64>() {
        return Ok(ms);
    }
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: i64 = number.parse().map_err(|_| {
        format!("--since: {value:?} is neither a duration like 10m nor unix milliseconds")
    })?;
    let unit_ms = match unit {
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("--since: unknown unit {unit:?} (use s, m, h or d)")),
    };
    Ok(now_ms - number * unit_ms)
}

/// The message for a non-2xx answer.
fn error_message(status: u16, reason: &str, body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let mut message = match parsed.as_ref().and_then(|v| v.get("error")) {
        Some(error) => format!(
            "error: {status} {} ({})",
            error["message"].as_str().unwrap_or(reason),
            error["code"].as_str().unwrap_or("no code")
        ),
        None => {
            let snippet: String = body.chars().take(200).collect();
            format!("error: {status} {reason}: {snippet}")
        }
    };
    if status == 401 {
        message.push_str("\nhint: check --token or LLM_ROUTER_TOKEN");
    }
    message
}

// ---- HTTP ---------------------------------------------------------------------------------

enum Failure {
    /// The server answered with an error: exit 1.
    Server(String),
    /// The router could not be reached, or the arguments are unusable: exit 2.
    Usage(String),
}

struct Api {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Api {
    fn new(url: &str, token: Option<String>) -> Result<Self, Failure> {
        if !url.starts_with("http://") {
            return Err(Failure::Usage(format!(
                "error: {url} is not an http:// URL (this CLI speaks plain HTTP only)"
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| Failure::Usage(format!("error: {e}")))?;
        Ok(Self {
            http,
            base: url.trim_end_matches('/').to_owned(),
            token,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .query(query);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|e| {
            Failure::Usage(format!(
                "error: cannot reach the router at {}: {e}",
                self.base
            ))
        })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| Failure::Usage(format!("error: reading the answer: {e}")))?;
        if !status.is_success() {
            return Err(Failure::Server(error_message(
                status.as_u16(),
                status.canonical_reason().unwrap_or(""),
                &text,
            )));
        }
        if text.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| {
            Failure::Server(format!(
                "error: the router answered something that is not JSON: {e}"
            ))
        })
    }
}

fn typed<T: for<'de> Deserialize<'de>>(value: Value) -> Result<T, Failure> {
    serde_json::from_value(value)
        .map_err(|e| Failure::Server(format!("error: unexpected answer from the router: {e}")))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn print_value(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let api = Api::new(&cli.url, cli.token.clone())?;
    use reqwest::Method;
    match cli.command {
        Command::Nodes {
            command: NodesCommand::List,
        } => {
            let value = api.call(Method::GET, "/api/nodes", &[], None).await?;
            if cli.json {
                print_value(&value);
            } else {
                print!("{}", render_nodes(&typed::<NodeList>(value)?.nodes));
            }
        }
        Command::Nodes {
            command:
                NodesCommand::Add {
                    node_url,
                    id,
                    models,
                    max_concurrency,
                    weight,
                },
        } => {
            let body = serde_json::json!({"url": node_url, "id": id, "models": models, "max_concurrency": max_concurrency, "weight": weight});
            let value = api
                .call(Method::POST, "/api/nodes", &[], Some(body))
                .await?;
            if cli.json {
                print_value(&value);
            } else {
                println!("added node {}", value["node_id"].as_str().unwrap_or("?"));
                println!(
                    "token {} (shown once; the node sends it with its heartbeats)",
                    value["token"].as_str().unwrap_or("?")
                );
            }
        }
        Command::Nodes {
            command: NodesCommand::Remove { id },
        } => {
            api.call(Method::DELETE, &format!("/api/nodes/{id}"), &[], None)
                .await?;
            if !cli.json {
                println!("removed node {id}");
            }
        }
        Command::Nodes {
            command: NodesCommand::Drain { id, undo },
        } => {
            let action = if undo { "undrain" } else { "drain" };
            let value = api
                .call(
                    Method::POST,
                    &format!("/api/nodes/{id}/{action}"),
                    &[],
                    None,
                )
                .await?;
            if cli.json {
                print_value(&value);
            } else if undo {
                println!("node {id} takes requests again");
            } else {
                println!("node {id} is draining: it finishes its requests and takes no new ones");
            }
        }
        Command::Models => {
            let value = api.call(Method::GET, "/api/models", &[], None).await?;
            if cli.json {
                print_value(&value);
            } else {
                print!("{}", render_models(&typed::<ModelList>(value)?.models));
            }
        }
        Command::Stats { since, until } => {
            let mut query = Vec::new();
            if let Some(since) = since {
                query.push((
                    "since",
                    parse_since(&since, now_ms())
                        .map_err(Failure::Usage)?
                        .to_string(),
                ));
            }
            if let Some(until) = until {
                query.push(("until", until.to_string()));
            }
            let value = api.call(Method::GET, "/api/stats", &query, None).await?;
            if cli.json {
                print_value(&value);
            } else {
                print!("{}", render_stats(&typed::<Stats>(value)?));
            }
        }
        Command::Logs(args) => logs(&api, args, cli.json, None).await?,
        Command::Reload => {
            let value = api
                .call(Method::POST, "/api/config/reload", &[], None)
                .await?;
            if cli.json {
                print_value(&value);
            } else {
                print!("{}", render_reload(&typed::<ReloadReport>(value)?));
            }
        }
    }
    Ok(())
}

/// `logs`, and with `--follow` polling once a second for newer rows; `polls` bounds the polls
/// (tests), `None` polls until Ctrl-C.
async fn logs(api: &Api, args: LogsArgs, json: bool, polls: Option<usize>) -> Result<(), Failure> {
    let mut query: Vec<(&str, String)> = Vec::new();
    for (key, value) in [
        ("model", &args.model),
        ("node", &args.node),
        ("status", &args.status),
    ] {
        if let Some(v) = value {
            query.push((key, v.clone()));
        }
    }
    if let Some(since) = &args.since {
        query.push((
            "since",
            parse_since(since, now_ms())
                .map_err(Failure::Usage)?
                .to_string(),
        ));
    }
    if let Some(until) = args.until {
        query.push(("until", until.to_string()));
    }
    let mut first = query.clone();
    first.push(("limit", args.limit.min(1000).to_string()));
    let value = api
        .call(reqwest::Method::GET, "/api/logs", &first, None)
        .await?;
    let mut page: LogPage = typed(value.clone())?;
    page.logs.reverse(); // oldest first on screen
    let mut last_id = page.logs.last().map_or(0, |r| r.id);
    if json && !args.follow {
        print_value(&value);
        return Ok(());
    }
    let print_rows = |rows: &[LogRow], raw: &[Value], header: bool| {
        if json {
            for row in raw {
                println!("{row}");
            }
        } else if header {
            print!("{}", render_logs(rows));
        } else {
            for row in rows {
                let cells = log_cells(row);
                println!("{}", cells.join("  "));
            }
        }
    };
    let mut raw: Vec<Value> = value["logs"].as_array().cloned().unwrap_or_default();
    raw.reverse();
    print_rows(&page.logs, &raw, true);
    if !args.follow {
        return Ok(());
    }
    let mut done = 0;
    loop {
        if polls.is_some_and(|p| done >= p) {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        done += 1;
        let mut q = query.clone();
        q.push(("after_id", last_id.to_string()));
        q.push(("limit", "1000".into()));
        let value = api
            .call(reqwest::Method::GET, "/api/logs", &q, None)
            .await?;
        let page: LogPage = typed(value.clone())?;
        if let Some(last) = page.logs.last() {
            last_id = last.id;
        }
        let raw: Vec<Value> = value["logs"].as_array().cloned().unwrap_or_default();
        print_rows(&page.logs, &raw, false);
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Server(message)) => {
            eprintln!("{message}");
            ExitCode::from(1)
        }
        Err(Failure::Usage(message)) => {
            eprintln!("{message}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_cut_long_cells() {
        let nodes: NodeList = serde_json::from_value(serde_json::json!({"nodes": [
            {"id": "gpu-a", "url": "http://10.0.0.7:8000", "models": ["llama"], "max_concurrency": 8, "weight": 1,
             "healthy": true, "draining": false, "in_flight": 3, "source": "config", "consecutive_failures": 0,
             "ttfb_ewma_ms": 41.5, "latency_ewma_ms": 812.0, "last_heartbeat_ms": null},
            {"id": "b", "url": "http://a-very-long-host-name.example.internal.cluster:8000", "models": [], "max_concurrency": 4,
             "weight": 1, "healthy": false, "draining": true, "in_flight": 0, "source": "registered",
             "consecutive_failures": 5, "ttfb_ewma_ms": null, "latency_ewma_ms": null, "last_heartbeat_ms": 1}
        ]}))
        .unwrap();
        let text = render_nodes(&nodes.nodes);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID     URL"));
        let url_col = lines[0].find("URL").unwrap();
        assert_eq!(lines[1].find("http://10.0.0.7").unwrap(), url_col, "{text}");
        assert!(lines[1].contains("3/8") && lines[1].contains("41.5"));
        assert!(lines[2].contains("…"), "long cells are cut: {text}");
        assert!(lines[2].contains(" no ") && lines[2].contains(" yes "));
    }

    #[test]
    fn logs_and_stats_render() {
        let page: LogPage = serde_json::from_value(serde_json::json!({"logs": [{
            "id": 1042, "ts_ms": 1764043200123i64, "request_id": "7f3a", "path": "/v1/chat/completions",
            "model": "llama", "node_id": "gpu-a", "status": 200, "stream": true, "latency_ms": 812.4,
            "ttfb_ms": 41.2, "prompt_tokens": 12, "completion_tokens": 180, "api_key_id": "team-a",
            "client_disconnected": true}], "next_before_id": null}))
        .unwrap();
        let text = render_logs(&page.logs);
        assert!(text.contains("2025-11-25 04:00:00.123"), "{text}");
        assert!(text.contains("200 (gone)") && text.contains("12/180") && text.contains("team-a"));
        let stats: Stats = serde_json::from_value(serde_json::json!({
            "total": 10, "errors": 1, "error_rate": 0.1,
            "latency_ms": {"p50": 400.0, "p95": 1200.0, "p99": null},
            "ttfb_ms": {"p50": 38.0, "p95": 95.0, "p99": 160.0},
            "by_model": [{"model": "llama", "total": 10, "errors": 1, "error_rate": 0.1, "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0}}],
            "by_node": [{"node_id": "gpu-a", "total": 10, "errors": 1, "error_rate": 0.1, "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0}}],
            "history": {"written": 10, "dropped": 2}}))
        .unwrap();
        let text = render_stats(&stats);
        assert!(text.contains("errors    1 (10.00%)"), "{text}");
        assert!(text.contains("p99 - ms") && text.contains("2 dropped") && text.contains("gpu-a"));
    }

    #[test]
    fn utc_conversion() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(utc(1_709_164_800_000), "2024-02-29 00:00:00.000");
        assert_eq!(utc(1_795_588_644_321), "2026-11-25 06:37:24.321");
        assert_eq!(utc(-1), "1969-12-31 23:59:59.999");
    }

    #[test]
    fn since_accepts_durations_and_milliseconds() {
        let now = 10_000_000;
        assert_eq!(parse_since("30s", now), Ok(now - 30_000));
        assert_eq!(parse_since("10m", now), Ok(now - 600_000));
        assert_eq!(parse_since("2h", now), Ok(now - 7_200_000));
        assert_eq!(parse_since("1d", now), Ok(now - 86_400_000));
        assert_eq!(parse_since("1764043200123", now), Ok(1_764_043_200_123));
        assert!(parse_since("10x", now).is_err());
        assert!(parse_since("soon", now).is_err());
    }

    #[test]
    fn server_errors_are_shown_clearly() {
        let body = r#"{"error":{"message":"invalid or missing admin token","type":"invalid_request_error","param":null,"code":"invalid_admin_token"}}"#;
        assert_eq!(
            error_message(401, "Unauthorized", body),
            "error: 401 invalid or missing admin token (invalid_admin_token)\nhint: check --token or LLM_ROUTER_TOKEN"
        );
        let message = error_message(502, "Bad Gateway", &"<html>".repeat(100));
        assert!(message.starts_with("error: 502 Bad Gateway: <html>"));
        assert!(message.len() < 240);
    }
}
