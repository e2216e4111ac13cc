//! `llm-router-cli` against a real router with real simulated nodes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use loadtest::{SimConfig, SimNode};
use router::config::{Config, NodeConfig};
use router::server::{StartOptions, start};

fn cli(url: &str, token: &str, args: &[&str]) -> Output {
    let mut output = Command::new(env!("CARGO_BIN_EXE_llm-router-cli"))
        .args(["--url", url, "--token", token])
        .args(args)
        .output()
        .unwrap();
    // Name the command in failure messages.
    output
        .stderr
        .splice(0..0, format!("[{}] ", args.join(" ")).into_bytes());
    output
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn chat(url: &str) -> String {
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_nodes_and_reads_history() {
    let a = SimNode::start(SimConfig::instant(&["m"])).await.unwrap();
    let b = SimNode::start(SimConfig::instant(&["m", "other"]))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    config.history.path = dir.path().join("h.db");
    config.history.flush_interval_ms = 20;
    config.nodes = vec![NodeConfig {
        id: Some("a".into()),
        url: a.url(),
        models: None,
        max_concurrency: 8,
        weight: 1,
        api_key: None,
    }];
    let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
    let options = StartOptions {
        admin_token: Some("admin".into()),
        ..StartOptions::default()
    };
    let router = start(config, listener, options).await.unwrap();
    let url = format!("http://{}", router.addr);

    let list = stdout(&cli(&url, "admin", &["nodes", "list"]));
    assert!(list.starts_with("ID"), "{list}");
    assert!(list.lines().nth(1).unwrap().starts_with("a "), "{list}");
    assert!(list.contains("0/8") && list.contains("config"), "{list}");

    let added = stdout(&cli(
        &url,
        "admin",
        &[
            "nodes",
            "add",
            &b.url(),
            "--id",
            "b",
            "--max-concurrency",
            "4",
        ],
    ));
    assert!(
        added.contains("added node b") && added.contains("token "),
        "{added}"
    );
    let models = stdout(&cli(&url, "admin", &["models"]));
    assert!(
        models
            .lines()
            .any(|l| l.starts_with("m ") && l.contains("a,b") && l.contains("yes")),
        "{models}"
    );
    assert!(models.lines().any(|l| l.starts_with("other ")), "{models}");

    let drained = stdout(&cli(&url, "admin", &["nodes", "drain", "b"]));
    assert!(drained.contains("draining"));
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&cli(&url, "admin", &["--json", "nodes", "list"]))).unwrap();
    assert_eq!(json["nodes"][1]["draining"], true);
    stdout(&cli(&url, "admin", &["nodes", "drain", "b", "--undo"]));
    stdout(&cli(&url, "admin", &["nodes", "remove", "b"]));
    assert!(!stdout(&cli(&url, "admin", &["nodes", "list"])).contains("\nb "));

    let ids = [chat(&url).await, chat(&url).await];
    router.services.history.flush().await;
    let logs = stdout(&cli(
        &url,
        "admin",
        &["logs", "--model", "m", "--status", "2xx"],
    ));
    assert!(logs.starts_with("TIME"), "{logs}");
    assert!(ids.iter().all(|id| logs.contains(id.as_str())), "{logs}");
    let none = stdout(&cli(&url, "admin", &["logs", "--status", "5xx"]));
    assert_eq!(none.lines().count(), 1, "only the header: {none}");
    let stats = stdout(&cli(&url, "admin", &["stats", "--since", "1h"]));
    assert!(stats.contains("requests  2"), "{stats}");

    // Follow: a request made after the CLI started shows up.
    let mut follow = Command::new(env!("CARGO_BIN_EXE_llm-router-cli"))
        .args([
            "--url", &url, "--token", "admin", "--json", "logs", "--follow",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(follow.stdout.take().unwrap());
    let reader = std::thread::spawn(move || {
        lines
            .lines()
            .map_while(Result::ok)
            .take(3)
            .collect::<Vec<String>>()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let new_id = chat(&url).await;
    let got = tokio::task::spawn_blocking(move || reader.join().unwrap());
    let got = tokio::time::timeout(Duration::from_secs(10), got)
        .await
        .unwrap()
        .unwrap();
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(got.iter().any(|l| l.contains(&new_id)), "{got:?}");

    // Errors: the server's message and a hint, exit 1; an unreachable router, exit 2.
    let denied = cli(&url, "wrong", &["nodes", "list"]);
    assert_eq!(denied.status.code(), Some(1));
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(
        err.contains("401 invalid or missing admin token (invalid_admin_token)"),
        "{err}"
    );
    assert!(err.contains("LLM_ROUTER_TOKEN"), "{err}");
    let missing = cli(&url, "admin", &["nodes", "remove", "nope"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404"));
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let down = cli(&format!("http://127.0.0.1:{port}"), "admin", &["models"]);
    assert_eq!(down.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&down.stderr).contains("cannot reach the router"));
    let tls = cli("https://example.invalid", "admin", &["models"]);
    assert_eq!(tls.status.code(), Some(2));
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reloads_the_config_file() {
    let a = SimNode::start(SimConfig::instant(&["m"])).await.unwrap();
    let b = SimNode::start(SimConfig::instant(&["m"])).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("router.toml");
    let file = |nodes: &[(&str, &SimNode)], max_connections: usize| {
        let mut toml = format!(
            "listen = \"127.0.0.1:0\"\n[limits]\nmax_connections = {max_connections}\n[history]\nenabled = false\n"
        );
        for (id, node) in nodes {
            toml.push_str(&format!(
                "[[nodes]]\nid = \"{id}\"\nurl = \"{}\"\nmodels = [\"m\"]\nmax_concurrency = 4\n",
                node.url()
            ));
        }
        toml
    };
    std::fs::write(&path, file(&[("a", &a)], 1000)).unwrap();
    let config = Config::load(&path).unwrap();
    let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
    let options = StartOptions {
        admin_token: Some("admin".into()),
        config_path: Some(path.clone()),
        ..StartOptions::default()
    };
    let router = start(config, listener, options).await.unwrap();
    let url = format!("http://{}", router.addr);

    std::fs::write(&path, file(&[("b", &b)], 500)).unwrap();
    let reloaded = stdout(&cli(&url, "admin", &["reload"]));
    assert!(reloaded.contains("nodes added: b"), "{reloaded}");
    assert!(reloaded.contains("nodes removed: a"), "{reloaded}");
    assert!(
        reloaded.contains("applied at the next restart: limits"),
        "{reloaded}"
    );
    let list = stdout(&cli(&url, "admin", &["nodes", "list"]));
    assert!(list.lines().nth(1).unwrap().starts_with("b "), "{list}");

    let json: serde_json::Value =
        serde_json::from_str(&stdout(&cli(&url, "admin", &["--json", "reload"]))).unwrap();
    assert_eq!(json["nodes"]["added"], serde_json::json!([]));

    std::fs::write(&path, "listen = not toml").unwrap();
    let refused = cli(&url, "admin", &["reload"]);
    assert_eq!(refused.status.code(), Some(1));
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("invalid_config"), "{message}");
    let list = stdout(&cli(&url, "admin", &["nodes", "list"]));
    assert!(
        list.lines().nth(1).unwrap().starts_with("b "),
        "the running config stays: {list}"
    );
}
