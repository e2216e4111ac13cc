//! `llm-router-cli`: placeholder, replaced by the CLI work.
fn main() {}
