//! Records the commit the binaries are built from, for `--version`: `LLM_ROUTER_COMMIT` is the
//! commit's short hash, with `, modified` when the files that go into the binaries differ from
//! it, or `unknown` outside a git checkout (a source archive, say).
//!
//! Benchmark scripts read it to refuse a binary built from another commit than the one their
//! report is named after.

use std::path::Path;
use std::process::Command;

/// What the binaries are built from, relative to the workspace: a change to one of them runs
/// this script again, and makes the build `modified` until it is committed. (The benchmark
/// scripts' `router_sources`, in scripts/bench-common.sh, lists the same.)
const SOURCES: [&str; 8] = [
    "Cargo.toml",
    "Cargo.lock",
    "layers/Cargo.toml",
    "layers/src",
    "router/Cargo.toml",
    "router/build.rs",
    "router/migrations",
    "router/src",
];

fn main() {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let workspace = Path::new(&manifest).join("..");
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
    let commit = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(hash) => {
            let mut status = vec!["status", "--porcelain", "--untracked-files=no", "--"];
            status.extend(SOURCES);
            let modified = git(&status).is_some_and(|changes| !changes.is_empty());
            if modified {
                format!("{hash}, modified")
            } else {
                hash
            }
        }
        None => "unknown".to_owned(),
    };
    println!("cargo:rustc-env=LLM_ROUTER_COMMIT={commit}");

    // Run again when HEAD moves (a commit, a checkout, a reset: the reflog grows with each) and
    // when the sources change. Only files that exist: cargo takes a missing one as changed, and
    // would build the router again every time.
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let git_dir = Path::new(&git_dir);
        let mut watched = vec![git_dir.join("HEAD"), git_dir.join("logs/HEAD")];
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watched.push(git_dir.join(branch));
        }
        watched.push(git_dir.join("packed-refs"));
        for file in watched.iter().filter(|file| file.exists()) {
            println!("cargo:rerun-if-changed={}", file.display());
        }
    }
    for source in SOURCES {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(source).display()
        );
    }
}
