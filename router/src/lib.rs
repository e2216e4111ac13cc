//! llm-router: an OpenAI-compatible router in front of LLM inference nodes, built from the
//! `layers` crate's tower layers.
//!
//! [`AppState`] holds what every request shares: the node pool and the one HTTP client.
//! [`app()`] builds the axum application; [`stack`] turns a list of layer names into the
//! request path, in the order given.
#![deny(missing_docs)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod config;
pub mod demo;
pub mod discovery;
pub mod history;
pub mod listen;
pub mod metrics;
pub mod record;
pub mod registry;
pub mod reload;
pub mod server;
pub mod stack;
pub mod stalled;
pub mod state;

pub use app::{app, nodelay};
pub use stack::{LayerKind, StackConfig};
pub use state::AppState;
