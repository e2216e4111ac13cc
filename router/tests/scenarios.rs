//! Every `llm-loadtest` scenario, cut short, against this build's router binary: the scenario
//! code stays runnable, and each report carries the figures the README's Performance section
//! is built from. The real runs (`scripts/bench.sh`) are not part of the test command.

use std::time::Duration;

use loadtest::scenario::{self, Settings};

fn settings(out: &std::path::Path) -> Settings {
    Settings {
        router_bin: env!("CARGO_BIN_EXE_llm-router").into(),
        out_dir: out.to_owned(),
        duration: Duration::from_millis(600),
        overload_duration: Duration::from_millis(600),
        streams: 50,
        streams_over_h2: true,
    }
}

#[tokio::test]
async fn every_scenario_runs_short_and_writes_its_report() {
    let out = tempfile::tempdir().unwrap();
    let settings = settings(out.path());

    let overhead = scenario::overhead(&settings).await.unwrap();
    assert_eq!(overhead.runs.len(), 4);
    for run in &overhead.runs {
        assert!(
            run.result.succeeded > 0,
            "{}: {:?}",
            run.label,
            run.result.errors
        );
        assert!(
            run.result.errors.is_empty(),
            "{}: {:?}",
            run.label,
            run.result.errors
        );
    }
    assert!(overhead.runs[1].router.unwrap().peak_rss_kib > 0);

    let streaming = scenario::streaming(&settings).await.unwrap();
    assert_eq!(
        streaming.runs[0].result.succeeded, 50,
        "{:?}",
        streaming.runs[0].result.errors
    );
    assert!(
        streaming.findings[0].starts_with("50 of 50 streams open"),
        "{:?}",
        streaming.findings
    );

    let fleet = scenario::fleet(&settings).await.unwrap();
    let labels: Vec<&str> = fleet.runs.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(labels, ["round robin", "least-loaded", "default stack"]);

    let overload = scenario::overload(&settings).await.unwrap();
    assert_eq!(overload.runs.len(), 3);
    assert!(
        overload
            .findings
            .iter()
            .any(|f| f == "no node ever held more than its max concurrency"),
        "{:?}",
        overload.findings
    );

    for name in ["overhead", "streaming", "fleet", "overload"] {
        let report = match name {
            "overhead" => &overhead,
            "streaming" => &streaming,
            "fleet" => &fleet,
            _ => &overload,
        };
        let md = report.write(out.path()).unwrap();
        assert!(
            std::fs::read_to_string(md)
                .unwrap()
                .contains("| run | load |")
        );
        assert!(out.path().join(format!("{name}.svg")).exists());
        assert!(out.path().join(format!("{name}.json")).exists());
    }
}

/// The soak, cut to seconds: a node is killed twice, yet every request gets an answer and the
/// history holds one row per answer.
#[tokio::test]
async fn the_soak_runs_short_and_loses_nothing() {
    let out = tempfile::tempdir().unwrap();
    let settings = settings(out.path());
    let soak = loadtest::soak::SoakSettings {
        duration: Duration::from_secs(7),
        kill_every: Duration::from_secs(2),
        down_for: Duration::from_secs(1),
        rate: 40.0,
    };
    let report = loadtest::soak::soak(&settings, soak).await.unwrap();
    assert!(
        report.findings[0].contains(" 0 lost without an answer"),
        "{:?}",
        report.findings
    );
    assert!(
        !report.findings[0].contains("; 0 node kills"),
        "{:?}",
        report.findings
    );
    assert!(
        report.findings[1].contains("(equal)"),
        "{:?}",
        report.findings
    );
    report.write(out.path()).unwrap();
}
