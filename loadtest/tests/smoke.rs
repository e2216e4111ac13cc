//! A short run of the `llm-loadtest` binary against a sim node, so the tool cannot rot: it must
//! exit 0 and write a Markdown, JSON and SVG report whose figures match what the node saw.

use std::process::Command;

use loadtest::{SimConfig, SimNode};

#[tokio::test]
async fn llm_loadtest_run_writes_markdown_json_and_svg_that_match_the_node() {
    let node = SimNode::start(SimConfig {
        ttft_ms: 5,
        inter_token_ms: 1,
        tokens: 4,
        max_concurrency: 3,
        ..SimConfig::instant(&["m"])
    })
    .await
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let url = node.url();
    let outdir = out.path().to_owned();
    let status = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_llm-loadtest"))
            .args(["--out", outdir.to_str().unwrap(), "run", "--url", &url])
            .args([
                "--model",
                "m",
                "--stream",
                "--connections",
                "3",
                "--duration",
                "0.5",
            ])
            .args(["--sim-nodes", &url, "--name", "smoke"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("smoke.json")).unwrap())
            .unwrap();
    let run = &json["runs"][0];
    let succeeded = run["result"]["succeeded"].as_u64().unwrap();
    assert!(succeeded > 5, "{run}");
    assert_eq!(
        succeeded,
        node.stats().completed(),
        "every answer counted once"
    );
    assert_eq!(run["result"]["errors"], serde_json::json!({}));
    let ttft = run["result"]["ttft_ms"]["p50"].as_f64().unwrap();
    let e2e = run["result"]["latency_ms"]["p50"].as_f64().unwrap();
    assert!(ttft >= 5.0 && e2e > ttft, "ttft {ttft} e2e {e2e}");
    assert_eq!(run["nodes"][0]["peak_in_flight"], 3);
    assert_eq!(run["nodes"][0]["max_concurrency"], 3);

    let md = std::fs::read_to_string(out.path().join("smoke.md")).unwrap();
    assert!(
        md.contains(&format!("| smoke | closed 3 SSE | {succeeded} |")),
        "{md}"
    );
    let svg = std::fs::read_to_string(out.path().join("smoke.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("<polyline"),
        "{svg}"
    );
}
