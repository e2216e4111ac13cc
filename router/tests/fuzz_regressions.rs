//! Every fuzz seed and every input a fuzzer once crashed on (`fuzz/seeds`, `fuzz/regressions`)
//! goes through the parsers here, in the default test command: they answer, never panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use layers::{RequestInfo, RouterError};
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
