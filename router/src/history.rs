//! PLACEHOLDER for the request history (being written; replaced wholesale). It implements the
//! contract's types with a history that stores nothing, so the crate builds meanwhile.
#![allow(missing_docs, dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone)]
pub struct HistoryConfig {
    pub path: PathBuf,
    pub retention: Option<Duration>,
    pub batch_size: usize,
    pub flush_interval: Duration,
    pub queue_capacity: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestRecord {
    pub ts_ms: i64,
    pub request_id: String,
    pub path: String,
    pub model: Option<String>,
    pub node_id: Option<String>,
    pub status: u16,
    pub stream: bool,
    pub latency_ms: f64,
    pub ttfb_ms: Option<f64>,
    pub prompt_tokens: Option<u32>,
    pub completion_tokens: Option<u32>,
    pub api_key_id: Option<String>,
    pub client_disconnected: bool,
}

#[derive(Debug, Clone, Default)]
pub struct History {
    dropped: Arc<AtomicU64>,
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("open: {0}")]
    Open(String),
    #[error("database: {0}")]
    Database(String),
    #[error("bad query: {0}")]
    BadQuery(String),
    #[error("history unavailable")]
    Unavailable,
}

#[derive(Debug, Default, Deserialize)]
pub struct LogQuery {}
#[derive(Debug, Default, Deserialize)]
pub struct StatsQuery {}
#[derive(Debug, Serialize)]
pub struct LogPage {}
#[derive(Debug, Serialize)]
pub struct Stats {}

impl History {
    pub async fn open(_config: HistoryConfig) -> Result<History, HistoryError> {
        Err(HistoryError::Unavailable)
    }
    pub fn disabled() -> History {
        History::default()
    }
    pub fn record(&self, _record: RequestRecord) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }
    pub fn written(&self) -> u64 {
        0
    }
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
    pub async fn flush(&self) {}
    pub async fn shutdown(&self, _timeout: Duration) {}
    pub async fn logs(&self, _query: &LogQuery) -> Result<LogPage, HistoryError> {
        Err(HistoryError::Unavailable)
    }
    pub async fn stats(&self, _query: &StatsQuery) -> Result<Stats, HistoryError> {
        Err(HistoryError::Unavailable)
    }
}
