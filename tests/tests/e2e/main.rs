//! End-to-end tests: real routers and real `llm-sim-node`s on loopback, over real HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bad_input;
mod faults;
mod grpc;
mod history;
mod ordering;
mod pooling;
mod rejections;
mod router_api;
mod selection;
mod streaming;
mod waiting;
