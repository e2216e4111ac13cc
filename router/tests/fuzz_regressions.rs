//! Every fuzz seed and every input a fuzzer once crashed on (`fuzz/seeds`, `fuzz/regressions`)
//! goes through the parsers here, in the default test command: they answer, never panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use http_body::Body;
use layers::server::{compare_readings, read_request_from};
use layers::{RequestInfo, RouterError, ServerConfig};
use router::config::Config;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut found = Vec::new();
    for kind in ["seeds", "regressions"] {
        let dir = root.join(kind).join(target);
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.file_name().is_some_and(|n| n != ".keep") {
                found.push((path.display().to_string(), std::fs::read(&path).unwrap()));
            }
        }
    }
    found
}

#[test]
fn request_parsing_answers_every_saved_input() {
    let inputs = inputs("request_info");
    assert!(inputs.len() >= 3, "the seeds are there");
    for (name, bytes) in inputs {
        match RequestInfo::parse(&bytes) {
            Ok(_) | Err(RouterError::InvalidRequest(_)) => {}
            Err(other) => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn config_parsing_answers_every_saved_input() {
    let inputs = inputs("config");
    assert!(inputs.len() >= 2, "the seeds are there");
    for (name, bytes) in inputs {
        let Ok(text) = String::from_utf8(bytes) else {
            continue;
        };
        match Config::parse(&text) {
            Ok(config) => {
                let _ = (config.stack(), config.listen(), config.node_specs());
            }
            // The seeds are valid configs (the annotated reference among them).
            Err(error) => assert!(!name.contains("/seeds/"), "{name}: {error}"),
        }
    }
}

#[test]
fn http1_request_reading_answers_every_saved_input() {
    let inputs = inputs("http1_request");
    assert!(inputs.len() >= 4, "the seeds are there");
    let config = ServerConfig {
        max_header_bytes: 4096,
        max_body_bytes: 1024,
        ..ServerConfig::default()
    };
    for (name, bytes) in inputs {
        match read_request_from(&bytes, &config) {
            Ok(Some((request, used))) => {
                assert!(used <= bytes.len(), "{name}");
                let length = request.body().size_hint().exact();
                assert!(length.is_none_or(|n| n <= 1024), "{name}");
            }
            Ok(None) => {}
            Err(error) => assert!(
                matches!(error.status().as_u16(), 400 | 431),
                "{name}: {error:?}"
            ),
        }
        if let Err(difference) = compare_readings(&bytes, &config) {
            panic!("{name}: the raw reader differs: {difference}");
        }
    }
}
