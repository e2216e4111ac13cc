//! Load-testing tools for llm-router.
//!
//! - [`sim`]: `llm-sim-node`, a simulated OpenAI-compatible inference node, usable as a library
//!   (tests start it in-process) and as a binary.
#![deny(missing_docs)]

pub mod sim;

pub use sim::{Overflow, SimConfig, SimNode, SimStats, StatsSnapshot};
