//! Records the commit the binaries are built from, for `--version`: `LLM_ROUTER_COMMIT` is the
//! commit's short hash, with `, modified` when the files they are built from
//! (build-sources.txt) differ from it or `git status` cannot tell, or `unknown` outside a git
//! checkout of this workspace (a source archive, say). A profile-guided build adds `, PGO`
//! (`, PGO training` for the instrumented one that records the profile), read from the
//! compiler flags cargo passes (`-Cprofile-use`, `-Cprofile-generate`).
//!
//! Benchmark scripts read it to refuse a binary built from other sources than the checkout
//! their report is named after. Since the hash changes with HEAD, a commit makes cargo build
//! the router package again, docs-only commits too.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let workspace = Path::new(&manifest).join("..");
    let sources: Vec<&str> = include_str!("build-sources.txt")
        .lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    let git = |args: &[&str]| -> Option<String> {
        // No optional locks: `status` would otherwise refresh the index file as it reads it.
        let out = Command::new("git")
            .arg("--no-optional-locks")
            .args(args)
            .current_dir(&workspace)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    // Only a checkout whose top is this workspace: a copy inside another repository (vendored,
    // or cargo's package directory) would otherwise take that repository's HEAD.
    let ours = git(&["rev-parse", "--show-toplevel"])
        .and_then(|top| std::fs::canonicalize(top).ok())
        .zip(std::fs::canonicalize(&workspace).ok())
        .is_some_and(|(top, workspace)| top == workspace);
    let head = ours
        .then(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .flatten();
    let commit = match &head {
        Some(hash) => {
            let mut status = vec!["status", "--porcelain", "--untracked-files=all", "--"];
            status.extend(&sources);
            match git(&status) {
                Some(changes) if changes.is_empty() => hash.clone(),
                _ => format!("{hash}, modified"),
            }
        }
        None => "unknown".to_owned(),
    };
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let commit = match profile_guided(&flags) {
        Some(kind) => format!("{commit}, {kind}"),
        None => commit,
    };
    println!("cargo:rustc-env=LLM_ROUTER_COMMIT={commit}");

    // Run again when HEAD moves (a commit, a checkout, a reset) and when the sources change.
    // Only paths that exist: cargo takes a missing one as changed, and would build the router
    // again every time.
    let mut watched: Vec<PathBuf> = sources.iter().map(|s| workspace.join(s)).collect();
    if head.is_some() {
        let mut refs = vec!["HEAD".to_owned(), "logs/HEAD".to_owned()];
        refs.extend(git(&["symbolic-ref", "-q", "HEAD"]));
        for name in refs {
            // `--git-path`: in a linked worktree HEAD is the worktree's, refs the repository's.
            if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
                watched.push(workspace.join(path));
            }
        }
    }
    for path in watched.iter().filter(|path| path.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    // And when the flags that say PGO change: cargo compares these in its own environment.
    // Flags from a config file (`build.rustflags`, `--config`) are not tracked this way; with
    // `--target` a change to them can leave the label stale (scripts/build-pgo.sh uses
    // RUSTFLAGS and a target directory of its own).
    println!("cargo:rerun-if-env-changed=RUSTFLAGS");
    println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    println!("cargo:rerun-if-env-changed=CARGO_BUILD_RUSTFLAGS");
    if let Ok(target) = std::env::var("TARGET") {
        let triple = target.to_uppercase().replace(['-', '.'], "_");
        println!("cargo:rerun-if-env-changed=CARGO_TARGET_{triple}_RUSTFLAGS");
    }
}

// The flag parsing, shared with its test (router/tests/build_flags.rs).
include!("build_flags.rs");
