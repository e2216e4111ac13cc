//! Load-testing tools for llm-router.
//!
//! - [`sim`]: `llm-sim-node`, a simulated OpenAI-compatible inference node, usable as a library
//!   (tests start it in-process) and as a binary.
//! - [`load`]: the load generator of `llm-loadtest` (open and closed loop, streaming or not).
//! - [`report`]: Markdown, JSON and SVG reports.
//! - [`scenario`]: the benchmark scenarios (overhead, streaming, fleet, overload).
#![deny(missing_docs)]

pub mod load;
pub mod report;
pub mod scenario;
pub mod sim;
pub mod soak;

pub use sim::{Overflow, SimConfig, SimNode, SimStats, StatsSnapshot};
