//! The request history: one SQLite row per `/v1` request.
//!
//! The request path never waits on the database. [`History::record`] puts the row on a bounded
//! queue without awaiting; a background writer takes the rows off it and inserts them in
//! batches, one transaction per batch. When the queue is full, or a batch's transaction fails
//! (database locked, read-only, disk full), the rows are counted in [`History::dropped`] and a
//! warning is logged (at most one per 10 s); the writer keeps going and writing resumes by
//! itself when the fault clears. A short busy timeout keeps a locked database from holding the
//! writer up for long.
//!
//! Queries for the admin API ([`History::logs`], [`History::stats`]) read through a
//! connection pool; SQLite's WAL mode lets them run beside the writer. Only the writer writes:
//! retention too is its work, in chunks between batches.
//!
//! The writer is a thread of its own that calls SQLite through `rusqlite`, binding each value
//! straight into a prepared statement; sqlx (migrations, the pool, the queries) would send each
//! batch to its connection's worker thread as a list of values to bind there, and the writer
//! spent about 8,800 instructions a row that way against 6,100 this way
//! (`docs/experiments/history-insert`).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::TryStreamExt;
use hdrhistogram::Histogram;
use rusqlite::{OpenFlags, params};
use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};
use tokio::sync::oneshot;

/// Settings for [`History::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryConfig {
    /// The SQLite file; created if missing.
    pub path: PathBuf,
    /// Rows older than this are deleted every minute (the first time a minute after opening,
    /// so a process restarted more often than that never deletes any), up to the last batch
    /// whose rows all are (a row written with newer ones can wait for them), with the names no
    /// row left names; `None` keeps all.
    pub retention: Option<Duration>,
    /// Most rows per transaction.
    pub batch_size: usize,
    /// Longest wait before a partial batch is written.
    pub flush_interval: Duration,
    /// Most rows waiting to be written; more are dropped and counted.
    pub queue_capacity: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("llm-router.db"),
            retention: None,
            batch_size: 2048,
            flush_interval: Duration::from_millis(200),
            queue_capacity: 65_536,
        }
    }
}

/// One request, as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestRecord {
    /// When the request arrived, unix ms.
    pub ts_ms: i64,
    /// The request id sent back in `x-request-id`.
    pub request_id: String,
    /// The URL path: the OpenAI routes' own borrowed from static text, so that most rows
    /// allocate none for it.
    pub path: Cow<'static, str>,
    /// The requested model.
    pub model: Option<Arc<str>>,
    /// The node that served it.
    pub node_id: Option<Arc<str>>,
    /// The HTTP status the client got.
    pub status: u16,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Request to last byte, ms.
    pub latency_ms: f64,
    /// Request to response headers, ms.
    pub ttfb_ms: Option<f64>,
    /// Prompt tokens, when the node reported usage.
    pub prompt_tokens: Option<u32>,
    /// Completion tokens, when the node reported usage.
    pub completion_tokens: Option<u32>,
    /// The API key's id.
    pub api_key_id: Option<String>,
    /// Whether the client went away before the end.
    pub client_disconnected: bool,
    /// Why an answer that had started broke on the node's side (`upstream_unavailable`,
    /// `upstream_timeout`); `None` when it ended well.
    pub upstream_error: Option<String>,
}

/// Why the history failed.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The database could not be opened or migrated.
    #[error("cannot open the history database: {0}")]
    Open(String),
    /// A query failed.
    #[error("history database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The writer's work (a retention chunk) failed.
    #[error("history database error: {0}")]
    Write(#[from] rusqlite::Error),
    /// A query parameter is invalid.
    #[error("{0}")]
    BadQuery(String),
    /// There is no database (history disabled or failed to open).
    #[error("the request history is not available")]
    Unavailable,
}

#[derive(Debug)]
enum Message {
    Row(RequestRecord),
    Flush(oneshot::Sender<()>),
    /// Deletes the names no row names any more, once the rows before it are written; answers
    /// how many.
    PruneNames(oneshot::Sender<u64>),
    /// Deletes one chunk of the rows past retention, once the rows before it are written.
    Expire(
        ExpireChunk,
        oneshot::Sender<Result<Expired, rusqlite::Error>>,
    ),
}

/// Where a retention pass stands: the next chunk it asks the writer to delete.
#[derive(Debug, Clone, Copy)]
struct ExpireChunk {
    /// Rows older than this (unix ms) go.
    cutoff: i64,
    /// The chunk starts at the first row above this id.
    after: i64,
    /// The last row of the last batch whose rows are all older than the cutoff, found by the
    /// first chunk; no row above it goes in this pass.
    bound: Option<i64>,
}

/// What one chunk deleted, and the next chunk unless the pass is done.
#[derive(Debug)]
struct Expired {
    deleted: u64,
    next: Option<ExpireChunk>,
}

/// Most row ids one retention chunk spans: rows wait in the queue while the writer deletes a
/// chunk. A million rows in one DELETE by the writer took about 0.35 s in a debug build (a
/// third of a second of rows to queue); 10,000 take a few milliseconds.
const EXPIRE_CHUNK_IDS: i64 = 10_000;

#[derive(Debug, Default)]
struct Counters {
    written: AtomicU64,
    dropped: AtomicU64,
    batches: AtomicU64,
}

/// The rows and requests waiting for the writer, in order, under a lock: a sender pushes one,
/// the writer takes them all at once by swapping the list for an empty one. (tokio's bounded
/// channel cost about 370 instructions a row between sender and writer, a fresh block every
/// 55 rows or so among them.)
struct Queue {
    waiting: Mutex<Waiting>,
    /// Wakes the writer thread: for the first message when it waits for one, for a flush, a
    /// prune or a retention chunk when it sleeps out its interval, and when the queue closes.
    /// Rows pushed while it is busy or sleeping wake nothing.
    wake: Condvar,
    /// Most rows queued or being written.
    capacity: usize,
}

#[derive(Default)]
struct Waiting {
    messages: Vec<Message>,
    /// Rows queued or taken by the writer and not yet written or dropped: the queue's bound
    /// counts both.
    rows: usize,
    /// A flush, a prune or a retention chunk is queued and not yet taken: the writer's
    /// interval is cut short. Set and cleared under the lock, with the push and the take, so
    /// that a request the writer has not taken always leaves it set, and one it has taken
    /// never does.
    asked: bool,
    /// What the writer is waiting for, if it waits: who pushes what wakes it.
    writer: WriterWait,
    /// The history is gone: the writer writes what is left and ends.
    closed: bool,
    /// The history is shutting down: rows are refused, requests still go to the writer.
    refusing_rows: bool,
}

/// What the writer thread is blocked on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum WriterWait {
    /// Nothing: it is writing, or about to look at the queue.
    #[default]
    Busy,
    /// The queue is empty: the first message wakes it.
    Message,
    /// Sleeping out its interval: only a request or a close wakes it.
    Request,
}

impl fmt::Debug for Queue {
    // The counts, not the rows: those hold API key ids.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let waiting = self.lock();
        f.debug_struct("Queue")
            .field("messages", &waiting.messages.len())
            .field("rows", &waiting.rows)
            .field("capacity", &self.capacity)
            .field("closed", &waiting.closed)
            .field("refusing_rows", &waiting.refusing_rows)
            .finish()
    }
}

impl Queue {
    fn new(capacity: usize) -> Self {
        Self {
            waiting: Mutex::default(),
            wake: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Waiting> {
        // Nothing panics while it is held; a poisoned lock still holds whole messages.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a row unless the queue is full; false if it was not queued.
    fn push_row(&self, row: RequestRecord) -> bool {
        let mut waiting = self.lock();
        if waiting.closed || waiting.refusing_rows || waiting.rows >= self.capacity {
            return false;
        }
        waiting.rows += 1;
        // Only the first of a round, and only a writer waiting for it: a busy router pays no
        // cross-thread wake-up per request (there were about 0.6 futex calls and 0.3 eventfd
        // writes per request when the writer woke for each row).
        self.push_locked(waiting, Message::Row(row), |writer| {
            writer == WriterWait::Message
        });
        true
    }

    /// Queues a request to the writer, past the bound (there are few), and cuts its interval
    /// short; false once closed.
    fn push_request(&self, message: Message) -> bool {
        let mut waiting = self.lock();
        if waiting.closed {
            return false;
        }
        waiting.asked = true;
        self.push_locked(waiting, message, |writer| writer != WriterWait::Busy);
        true
    }

    /// Queues `message` and wakes the writer if what it waits for `wakes` it.
    fn push_locked(
        &self,
        mut waiting: MutexGuard<'_, Waiting>,
        message: Message,
        wakes: impl FnOnce(WriterWait) -> bool,
    ) {
        waiting.messages.push(message);
        let wake = wakes(waiting.writer);
        if wake {
            waiting.writer = WriterWait::Busy;
        }
        drop(waiting);
        if wake {
            self.wake.notify_one();
        }
    }

    /// Blocks until something is queued and swaps it into `taken` (empty), in order; false once
    /// the queue is closed and empty.
    fn take(&self, taken: &mut Vec<Message>) -> bool {
        let mut waiting = self.lock();
        loop {
            if !waiting.messages.is_empty() {
                Self::take_locked(&mut waiting, taken);
                return true;
            }
            if waiting.closed {
                return false;
            }
            waiting.writer = WriterWait::Message;
            waiting = self
                .wake
                .wait(waiting)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Blocks for `interval`, or until a flush, a prune or a retention chunk is queued (or one
    /// was queued and not yet taken), or the queue closes; then swaps whatever is queued into
    /// `taken` (empty).
    fn take_after(&self, interval: Duration, taken: &mut Vec<Message>) {
        // No deadline past what an `Instant` can hold: then only a request or a close ends it.
        let deadline = Instant::now().checked_add(interval);
        let mut waiting = self.lock();
        while !waiting.asked && !waiting.closed {
            waiting.writer = WriterWait::Request;
            waiting = match deadline {
                Some(deadline) => {
                    let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                        break;
                    };
                    self.wake
                        .wait_timeout(waiting, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self
                    .wake
                    .wait(waiting)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
        Self::take_locked(&mut waiting, taken);
    }

    /// Swaps what is queued into `taken` (empty): every request asked so far is taken, and the
    /// writer is busy with them.
    fn take_locked(waiting: &mut Waiting, taken: &mut Vec<Message>) {
        std::mem::swap(&mut waiting.messages, taken);
        waiting.asked = false;
        waiting.writer = WriterWait::Busy;
    }

    /// `n` rows taken by the writer were written or dropped: room for as many more.
    fn rows_done(&self, n: usize) {
        let mut waiting = self.lock();
        debug_assert!(waiting.rows >= n, "{} rows done of {}", n, waiting.rows);
        waiting.rows = waiting.rows.saturating_sub(n);
    }

    /// From now on rows are refused; a flush after this leaves none queued.
    fn refuse_rows(&self) {
        self.lock().refusing_rows = true;
    }

    /// The writer writes what is queued, at once (a sleeping writer is woken as a flush would
    /// wake it), and ends.
    fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }

    /// Closes the queue and empties it: the rows left are counted as dropped, and the requests
    /// left get no answer (their senders are dropped), so nothing waits on a writer that is gone.
    fn close_and_clear(&self, counters: &Counters) {
        let left = {
            let mut waiting = self.lock();
            waiting.closed = true;
            waiting.rows = 0;
            std::mem::take(&mut waiting.messages)
        };
        let rows = left.iter().filter(|m| matches!(m, Message::Row(_))).count();
        counters.dropped.fetch_add(rows as u64, Ordering::Relaxed);
        self.wake.notify_all();
    }
}

/// Held by the writer: however it ends (a panic too), its queue is closed and emptied.
struct CloseOnExit {
    queue: Arc<Queue>,
    counters: Arc<Counters>,
}

impl Drop for CloseOnExit {
    fn drop(&mut self) {
        self.queue.close_and_clear(&self.counters);
    }
}

#[derive(Debug)]
struct Inner {
    pool: Option<SqlitePool>,
    queue: Option<Arc<Queue>>,
    counters: Arc<Counters>,
    retention: Option<Duration>,
    /// Whether a row that cannot be kept counts as dropped: not when the history is turned off.
    counts_drops: bool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last `History` is gone: the writer finishes what is queued and ends.
        if let Some(queue) = &self.queue {
            queue.close();
        }
    }
}

/// The request history. Cheap to clone; all clones share the database and counters.
#[derive(Debug, Clone)]
pub struct History {
    inner: Arc<Inner>,
}

impl History {
    /// Opens (or creates) the database, runs the migrations, and starts the writer and the
    /// retention task.
    pub async fn open(config: HistoryConfig) -> Result<History, HistoryError> {
        if let Some(dir) = config.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| HistoryError::Open(format!("{}: {e}", dir.display())))?;
        }
        let options = SqliteConnectOptions::new()
            .filename(&config.path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(1));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .map_err(|e| HistoryError::Open(format!("{}: {e}", config.path.display())))?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|e| HistoryError::Open(format!("{}: {e}", config.path.display())))?;
        let queue = Arc::new(Queue::new(config.queue_capacity));
        let counters = Arc::new(Counters::default());
        let db = WriterConnection {
            path: config.path.clone(),
            connection: None,
        };
        let (batch_size, flush_interval) = (config.batch_size.max(1), config.flush_interval);
        std::thread::Builder::new()
            .name("history-writer".into())
            .spawn({
                let (queue, counters) = (queue.clone(), counters.clone());
                move || writer(db, queue, counters, batch_size, flush_interval)
            })
            .map_err(|e| HistoryError::Open(format!("cannot start the history writer: {e}")))?;
        let inner = Arc::new(Inner {
            pool: Some(pool.clone()),
            queue: Some(queue),
            counters,
            retention: config.retention,
            counts_drops: true,
        });
        let history = History { inner };
        if config.retention.is_some() {
            let weak = Arc::downgrade(&history.inner);
            tokio::spawn(async move {
                // The first pass a period after opening, not at once: a test (or a caller) that
                // runs a pass of its own does not race one it did not ask for.
                let period = Duration::from_secs(60);
                let mut tick =
                    tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                // A pass longer than the period (a large backlog) is followed by one pass, not
                // by one for each tick it missed.
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(inner) = weak.upgrade() else { return };
                    if let Err(error) = (History { inner }).apply_retention().await {
                        tracing::warn!(%error, "history retention failed");
                    }
                }
            });
        }
        Ok(history)
    }

    /// No database although one was asked for (it could not be opened): every row is counted as
    /// dropped, queries answer [`HistoryError::Unavailable`].
    pub fn disabled() -> History {
        Self::without_database(true)
    }

    /// No database because the history is turned off (`[history] enabled = false`): rows are
    /// not kept and not counted as dropped (nothing is lost that was meant to be kept); queries
    /// answer [`HistoryError::Unavailable`].
    pub fn turned_off() -> History {
        Self::without_database(false)
    }

    fn without_database(counts_drops: bool) -> History {
        History {
            inner: Arc::new(Inner {
                pool: None,
                queue: None,
                counters: Arc::default(),
                retention: None,
                counts_drops,
            }),
        }
    }

    /// Queues a row. Never blocks and never awaits; a full queue counts a drop.
    pub fn record(&self, record: RequestRecord) {
        let sent = match &self.inner.queue {
            Some(queue) => queue.push_row(record),
            _ => false,
        };
        if !sent && self.inner.counts_drops {
            self.inner.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Rows committed so far.
    pub fn written(&self) -> u64 {
        self.inner.counters.written.load(Ordering::Relaxed)
    }

    /// Rows lost so far (queue full, or their transaction failed).
    pub fn dropped(&self) -> u64 {
        self.inner.counters.dropped.load(Ordering::Relaxed)
    }

    /// Transactions committed or attempted so far.
    pub fn batches(&self) -> u64 {
        self.inner.counters.batches.load(Ordering::Relaxed)
    }

    /// Returns once every row recorded before the call is committed or counted as dropped.
    pub async fn flush(&self) {
        let _ = self.ask(Message::Flush).await;
    }

    /// Sends the writer `message`, which it answers after the rows queued before it, and waits
    /// for the answer: `None` without a writer, or once it has ended (it closes the queue).
    async fn ask<T>(&self, message: impl FnOnce(oneshot::Sender<T>) -> Message) -> Option<T> {
        let queue = self.inner.queue.as_ref()?;
        let (done, answer) = oneshot::channel();
        if !queue.push_request(message(done)) {
            return None;
        }
        answer.await.ok()
    }

    /// Refuses new rows (they count as dropped), then flushes the rows before them (within
    /// `timeout`). In that order, so that no row is queued behind the flush and left unwritten.
    pub async fn shutdown(&self, timeout: Duration) {
        if let Some(queue) = &self.inner.queue {
            queue.refuse_rows();
        }
        let _ = tokio::time::timeout(timeout, self.flush()).await;
    }

    fn pool(&self) -> Result<&SqlitePool, HistoryError> {
        self.inner.pool.as_ref().ok_or(HistoryError::Unavailable)
    }

    /// Deletes rows older than the retention period, and then the names no row left names.
    ///
    /// The writer deletes them, a chunk of [`EXPIRE_CHUNK_IDS`] ids at a time, each chunk
    /// asked for behind the rows queued meanwhile: batches go in between chunks. (One DELETE
    /// on a pool connection beside the writer held SQLite's write lock for the whole pass, 1.7
    /// s for a million rows in a debug build, and the writer's batches failed once it held it
    /// past their busy timeout; a pool connection opened during a fault also stayed
    /// read-only.)
    pub(crate) async fn apply_retention(&self) -> Result<u64, HistoryError> {
        let Some(retention) = self.inner.retention else {
            return Ok(0);
        };
        let mut chunk = ExpireChunk {
            cutoff: now_ms() - retention.as_millis() as i64,
            after: i64::MIN,
            bound: None,
        };
        let mut deleted = 0;
        let passed = loop {
            let expired = match self.ask(|done| Message::Expire(chunk, done)).await {
                Some(Ok(expired)) => expired,
                Some(Err(error)) => break Err(HistoryError::Write(error)),
                None => break Err(HistoryError::Unavailable),
            };
            deleted += expired.deleted;
            match expired.next {
                Some(next) => chunk = next,
                None => break Ok(deleted),
            }
        };
        // Also after a failed chunk: the names of the rows the chunks before it deleted.
        if deleted > 0 {
            let names = self.prune_names().await;
            tracing::debug!(
                names,
                "history retention deleted names no row names any more"
            );
        }
        passed
    }

    /// Has the writer delete the names no row names any more, after the rows queued before,
    /// and forget their keys: only the writer adds names and binds keys, so it is the one
    /// that can delete them without a key being bound to a deleted name.
    async fn prune_names(&self) -> u64 {
        self.ask(Message::PruneNames).await.unwrap_or(0)
    }

    /// A page of rows; see [`LogQuery`].
    pub async fn logs(&self, query: &LogQuery) -> Result<LogPage, HistoryError> {
        let limit = query.limit.unwrap_or(100).clamp(1, 1000);
        let mut sql = logs_query(query)?;
        let follow = query.after_id.is_some();
        // One more than asked, to know whether another page follows.
        sql.push(" LIMIT ").push_bind(limit as i64 + 1);
        let rows = sql.build().fetch_all(self.pool()?).await?;
        let mut logs: Vec<LogRow> = rows
            .iter()
            .map(LogRow::from_row)
            .collect::<Result<_, _>>()?;
        let more = logs.len() > limit;
        logs.truncate(limit);
        let next_before_id = (!follow && more)
            .then(|| logs.last().map(|r| r.id))
            .flatten();
        Ok(LogPage {
            logs,
            next_before_id,
        })
    }

    /// Counts, error rates and latency percentiles; see [`Stats`].
    pub async fn stats(&self, query: &StatsQuery) -> Result<Stats, HistoryError> {
        let mut sql = QueryBuilder::<Sqlite>::new(
            "SELECT r.model_key, r.model, r.node_key, r.node_id, r.status, r.latency_ms, \
             r.ttfb_ms, r.client_disconnected FROM ",
        );
        push_window_rows(&mut sql, query.since, query.until);
        let mut all = Group::default();
        let mut ttfb = Percentiles::default();
        let mut by_model: BTreeMap<Option<String>, Group> = BTreeMap::new();
        let mut by_node: BTreeMap<Option<String>, Group> = BTreeMap::new();
        // One read transaction, so that the names read first are those of every row read
        // after; the rows' keys are named here rather than by a join per row.
        let mut tx = self.pool()?.begin().await?;
        let names: HashMap<i64, String> =
            sqlx::query_as::<_, (i64, String)>("SELECT id, name FROM request_names")
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
        let name_of = |key: Option<i64>, text: Option<String>| match key {
            Some(key) => names.get(&key).cloned(),
            None => text,
        };
        let query = sql.build();
        // Streamed into histograms, so memory stays bounded however many rows match.
        let mut rows = query.fetch(&mut *tx);
        while let Some(row) = rows.try_next().await? {
            let model = name_of(row.try_get("model_key")?, row.try_get("model")?);
            let node = name_of(row.try_get("node_key")?, row.try_get("node_id")?);
            let status: i64 = row.try_get("status")?;
            let latency: f64 = row.try_get("latency_ms")?;
            let row_ttfb: Option<f64> = row.try_get("ttfb_ms")?;
            let disconnected: bool = row.try_get("client_disconnected")?;
            let error = status >= 500 || disconnected;
            all.add(error, latency);
            if let Some(t) = row_ttfb {
                ttfb.add(t);
            }
            by_model.entry(model).or_default().add(error, latency);
            by_node.entry(node).or_default().add(error, latency);
        }
        Ok(Stats {
            total: all.total,
            errors: all.errors,
            error_rate: all.error_rate(),
            latency_ms: all.latency.summary(),
            ttfb_ms: ttfb.summary(),
            by_model: by_model
                .into_iter()
                .map(|(model, g)| ModelStats {
                    model,
                    total: g.total,
                    errors: g.errors,
                    error_rate: g.error_rate(),
                    latency_ms: g.latency.summary(),
                })
                .collect(),
            by_node: by_node
                .into_iter()
                .map(|(node_id, g)| NodeStats {
                    node_id,
                    total: g.total,
                    errors: g.errors,
                    error_rate: g.error_rate(),
                    latency_ms: g.latency.summary(),
                })
                .collect(),
            history: HistoryCounts {
                written: self.written(),
                dropped: self.dropped(),
            },
        })
    }
}

/// The last row of the last batch whose rows are all older than the cutoff (bound: unix ms),
/// found by its range (`request_keys_ts`), so that expired rows are read by id and not all of
/// them. A batch that also holds newer rows keeps its old ones until the next pass after its
/// newest has expired: a batch's rows arrived within its flush interval and the longest
/// request before it.
const EXPIRED_BOUND: &str = "SELECT coalesce(max(last_id), 0) FROM request_keys \
     WHERE kind = 'batch' AND max_ts < ?1";

/// Deletes the rows older than the cutoff (?1) among ids ?2 to ?3. Rows newer than it stay: a
/// long request's row can be older than the rows of earlier batches.
const DELETE_EXPIRED_CHUNK: &str =
    "DELETE FROM requests WHERE id >= ?2 AND id <= ?3 AND ts_ms < ?1";

/// Deletes the key ranges wholly below the oldest row left: they point at nothing any more.
/// They start below it too, which `request_keys_first` finds without reading the whole table.
/// The oldest row is read in the same statement, so that a batch committed in between (by
/// another router on the file) cannot lose its ranges to an older reading of an empty table.
const DELETE_STALE_KEYS: &str = "DELETE FROM request_keys \
     WHERE first_id < (SELECT coalesce(min(id), 9223372036854775807) FROM requests) \
     AND last_id < (SELECT coalesce(min(id), 9223372036854775807) FROM requests)";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The SELECT for one page of [`History::logs`], up to its LIMIT.
///
/// A model or node filter reads that key's id ranges in `request_keys` (newest first, or
/// oldest first when following), leaving out those outside the time window, and the rows
/// inside each range: the ranges' own order gives the rows' order, so SQLite stops at the
/// page's end without sorting. Without one, a time window reads the batches' ranges the same
/// way; error statuses are found through their partial index, and other rows by id.
fn logs_query(query: &LogQuery) -> Result<QueryBuilder<'static, Sqlite>, HistoryError> {
    let status = query.status_filter()?;
    let lowest_status = match status {
        Some(StatusFilter::Exact(code)) => code,
        Some(StatusFilter::Class(class)) => class * 100,
        None => 0,
    };
    // With a model or node, its ranges even for error statuses: the partial index would give
    // every model's errors in (status, id) order, to be sorted for each page. With a model and
    // a node, the model's ranges are walked and the node checked per row. Without either but
    // with a time window, the batches' ranges, unless only errors are asked for: then their
    // partial index.
    let window = query.since.is_some() || query.until.is_some();
    let key = match (query.model.as_deref(), query.node.as_deref()) {
        (Some(model), _) => Some((KIND_MODEL, model)),
        (None, Some(node)) => Some((KIND_NODE, node)),
        (None, None) if window && lowest_status < 400 => Some((KIND_BATCH, BATCH_KEY)),
        (None, None) => None,
    };
    let mut sql = QueryBuilder::<Sqlite>::new(
        "SELECT r.id, r.ts_ms, r.request_id, coalesce(p.name, r.path) AS path, \
         coalesce(m.name, r.model) AS model, coalesce(n.name, r.node_id) AS node_id, r.status, \
         r.stream, r.latency_ms, r.ttfb_ms, r.prompt_tokens, r.completion_tokens, r.api_key_id, \
         r.client_disconnected, r.upstream_error FROM ",
    );
    if let Some((kind, key)) = key {
        // CROSS JOIN keeps the ranges as the outer loop.
        sql.push(RANGE_ROWS);
        sql.push(NAMES_JOIN);
        sql.push(" WHERE k.kind = ").push_bind(kind);
        sql.push(" AND k.key = ").push_bind(key.to_owned());
        if let Some(after) = query.after_id {
            // A key's ranges do not overlap: those before the one that holds `after` (or the
            // last to start before it) end before it. A bound on `first_id` lets SQLite seek
            // there instead of reading every range from the first.
            sql.push(
                " AND k.first_id >= (SELECT coalesce(max(first_id), 0) FROM request_keys \
                 WHERE kind = ",
            )
            .push_bind(kind)
            .push(" AND key = ")
            .push_bind(key.to_owned())
            .push(" AND first_id <= ")
            .push_bind(after)
            .push(")");
            sql.push(" AND k.last_id > ").push_bind(after);
        } else if let Some(before) = query.before_id {
            sql.push(" AND k.first_id < ").push_bind(before);
        }
        push_range_window(&mut sql, query.since, query.until);
    } else {
        sql.push("requests r").push(NAMES_JOIN).push(" WHERE 1 = 1");
    }
    if let Some(model) = &query.model {
        push_name_filter(&mut sql, NameColumn::Model, model);
    }
    if let Some(node) = &query.node {
        push_name_filter(&mut sql, NameColumn::Node, node);
    }
    match status {
        Some(StatusFilter::Exact(code)) => {
            sql.push(" AND r.status = ").push_bind(i64::from(code));
        }
        Some(StatusFilter::Class(_)) => {
            sql.push(" AND r.status >= ")
                .push_bind(i64::from(lowest_status));
            sql.push(" AND r.status < ")
                .push_bind(i64::from(lowest_status) + 100);
        }
        None => {}
    }
    if lowest_status >= 400 {
        // Written out rather than bound: SQLite picks a partial index only when the query
        // states the index's own condition (see the requests_errors migration).
        sql.push(" AND r.status >= 400");
    }
    push_window(&mut sql, query.since, query.until);
    let order = if let Some(after) = query.after_id {
        sql.push(" AND r.id > ").push_bind(after);
        "ASC"
    } else {
        if let Some(before) = query.before_id {
            sql.push(" AND r.id < ").push_bind(before);
        }
        "DESC"
    };
    sql.push(" ORDER BY ");
    if key.is_some() {
        sql.push("k.first_id ").push(order).push(", ");
    }
    sql.push("r.id ").push(order);
    Ok(sql)
}

/// The key ranges (`k`) and the rows (`r`) each holds.
const RANGE_ROWS: &str =
    "request_keys k CROSS JOIN requests r ON r.id BETWEEN k.first_id AND k.last_id";

/// The names of a row's keys (NULL for rows written before `request_names`: `coalesce` with
/// the text columns, as the `request_log` view in that migration does; keep the two alike).
const NAMES_JOIN: &str = " LEFT JOIN request_names p ON p.id = r.path_key \
     LEFT JOIN request_names m ON m.id = r.model_key LEFT JOIN request_names n ON n.id = r.node_key";

/// Which of a row's names a filter reads: its key column and, for rows written before
/// `request_names`, its text column.
#[derive(Debug, Clone, Copy)]
enum NameColumn {
    Model,
    Node,
}

/// Rows whose model or node is `name`: by key, or by text for rows written before
/// `request_names`.
fn push_name_filter(sql: &mut QueryBuilder<'_, Sqlite>, column: NameColumn, name: &str) {
    let (key, text) = match column {
        NameColumn::Model => ("r.model_key", "r.model"),
        NameColumn::Node => ("r.node_key", "r.node_id"),
    };
    sql.push(" AND (")
        .push(key)
        .push(" = (SELECT id FROM request_names WHERE name = ")
        .push_bind(name.to_owned())
        .push(") OR ")
        .push(text)
        .push(" = ")
        .push_bind(name.to_owned())
        .push(")");
}

/// `FROM` the rows of a time window, `WHERE` and all: the batches whose ranges meet it (by
/// `request_keys_ts` when it has a start), and their rows inside it.
fn push_window_rows(sql: &mut QueryBuilder<'_, Sqlite>, since: Option<i64>, until: Option<i64>) {
    if since.is_none() && until.is_none() {
        sql.push("requests r WHERE 1 = 1");
        return;
    }
    sql.push(RANGE_ROWS);
    sql.push(" WHERE k.kind = 'batch'");
    push_range_window(sql, since, until);
    push_window(sql, since, until);
}

/// The key ranges (`k`) that hold rows of the time window: those whose rows' time range meets
/// it.
fn push_range_window(sql: &mut QueryBuilder<'_, Sqlite>, since: Option<i64>, until: Option<i64>) {
    if let Some(since) = since {
        sql.push(" AND k.max_ts >= ").push_bind(since);
    }
    if let Some(until) = until {
        sql.push(" AND k.min_ts < ").push_bind(until);
    }
}

fn push_window(sql: &mut QueryBuilder<'_, Sqlite>, since: Option<i64>, until: Option<i64>) {
    if let Some(since) = since {
        sql.push(" AND r.ts_ms >= ").push_bind(since);
    }
    if let Some(until) = until {
        sql.push(" AND r.ts_ms < ").push_bind(until);
    }
}

/// The background writer, on a thread of its own: rows are written every `flush_interval`, in
/// transactions of at most `batch_size` rows, on a connection of its own.
///
/// It waits on the queue only while the queue is empty, and sleeps out the interval once a row
/// has come, then takes all that came: only the first row of a round wakes it, so a busy
/// router pays no cross-thread wake-up per request. Under steady load it sleeps out the
/// interval between batches too: taking at once whatever came in while the last batch was
/// written made small transactions, each writing its B-tree pages again (one `pwrite` per
/// request at 37,000 requests a second; 0.37 with a sleep per round). A flush, a prune or a
/// retention chunk skips the sleep (so a retention pass writes small batches between its
/// chunks while it lasts).
///
/// A failed batch, name prune or retention chunk closes the connection, and the next one opens
/// a fresh one ([`WriterConnection`]).
fn writer(
    db: WriterConnection,
    queue: Arc<Queue>,
    counters: Arc<Counters>,
    batch_size: usize,
    flush_interval: Duration,
) {
    let _close_on_exit = CloseOnExit {
        queue: queue.clone(),
        counters: counters.clone(),
    };
    let mut batch = Batch {
        db,
        queue: queue.clone(),
        counters,
        warnings: WarnLimiter::default(),
        names: NameKeys::default(),
        rows: Vec::with_capacity(batch_size.min(4096)),
    };
    let (mut first, mut rest) = (Vec::new(), Vec::new());
    while queue.take(&mut first) {
        // The first messages of a round, then the interval's worth, unless a request (a flush,
        // a prune, a retention chunk) came: the rows before it are written and it is answered
        // at once.
        let asked = first.iter().any(|m| !matches!(m, Message::Row(_)));
        if !asked {
            queue.take_after(flush_interval, &mut rest);
        }
        let round = first.len() + rest.len();
        for message in first.drain(..).chain(rest.drain(..)) {
            match message {
                Message::Row(row) => {
                    batch.rows.push(row);
                    if batch.rows.len() >= batch_size {
                        batch.write();
                    }
                }
                Message::Flush(done) => {
                    batch.write();
                    let _ = done.send(());
                }
                Message::PruneNames(done) => {
                    batch.write();
                    let _ = done.send(batch.prune_names());
                }
                Message::Expire(chunk, done) => {
                    batch.write();
                    let _ = done.send(batch.expire(chunk));
                }
            }
        }
        batch.write();
        // Both lists go back to the senders empty, with room for a round like this one, made
        // here rather than by pushes under the lock, and not much more: a burst's room is let
        // go once the rounds are small again. (A message is about 200 bytes.)
        let room = round.max(LEAST_ROOM);
        for list in [&mut first, &mut rest] {
            if list.capacity() > 2 * room {
                list.shrink_to(room);
            }
            list.reserve(room);
        }
    }
}

/// The least room the writer's lists keep between rounds, in messages.
const LEAST_ROOM: usize = 256;

/// The writer's pending rows and its connection.
struct Batch {
    db: WriterConnection,
    queue: Arc<Queue>,
    counters: Arc<Counters>,
    warnings: WarnLimiter,
    names: NameKeys,
    rows: Vec<RequestRecord>,
}

impl Batch {
    /// Commits the pending rows in one transaction, or counts them as dropped; nothing to do
    /// without rows.
    fn write(&mut self) {
        if self.rows.is_empty() {
            return;
        }
        let n = self.rows.len() as u64;
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        let (names, rows) = (&mut self.names, &self.rows);
        match self.db.run(|conn| insert(conn, names, rows)) {
            Ok(()) => {
                self.counters.written.fetch_add(n, Ordering::Relaxed);
            }
            Err(error) => {
                self.counters.dropped.fetch_add(n, Ordering::Relaxed);
                self.warnings.warn(n, &error);
                // Looked up again from the table: whatever failed may have been about them.
                self.names.forget();
            }
        }
        self.queue.rows_done(self.rows.len());
        self.rows.clear();
    }

    /// Deletes the names whose rows are all gone, and forgets every key (a deleted name's key
    /// can be given to another name). A failure is logged and closes the connection, as a
    /// failed batch does; the names wait for the next retention pass that deletes rows.
    fn prune_names(&mut self) -> u64 {
        let pruned = self.db.run(|conn| conn.execute(DELETE_UNNAMED, []));
        self.names.forget();
        match pruned {
            Ok(pruned) => pruned as u64,
            Err(error) => {
                tracing::warn!(%error, "history names could not be pruned");
                0
            }
        }
    }

    /// Deletes `chunk`'s expired rows. After a failure the next retention pass starts over.
    fn expire(&mut self, chunk: ExpireChunk) -> Result<Expired, rusqlite::Error> {
        self.db.run(|conn| expire_chunk(conn, chunk))
    }
}

/// Why a batch was not written.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// Another router on the file deleted names while this batch marked them, twice.
    #[error("history names were deleted while the batch was written")]
    NamesDeleted,
}

/// The writer's connection: opened when first needed, and closed after any failure, so that
/// the next use opens a fresh one. After a fault SQLite can leave a connection holding a lock,
/// or opened read-only (it falls back to that when the file refuses writes), and neither heals
/// when the fault clears.
struct WriterConnection {
    path: PathBuf,
    connection: Option<rusqlite::Connection>,
}

/// Statements the writer keeps prepared: the nine INSERT sizes and a handful of its own, with
/// room to spare. (rusqlite keeps 16 by default.)
const WRITER_STATEMENTS: usize = 32;

impl WriterConnection {
    /// Runs `work` on the connection, opening it first if need be; closes it if either fails.
    fn run<T, E: From<rusqlite::Error>>(
        &mut self,
        work: impl FnOnce(&mut rusqlite::Connection) -> Result<T, E>,
    ) -> Result<T, E> {
        let conn = match self.connection.take() {
            Some(conn) => conn,
            None => open_writer(&self.path)?,
        };
        let conn = self.connection.insert(conn);
        let done = work(conn);
        if done.is_err() {
            // Dropped, which closes it (and finalizes its statements).
            self.connection = None;
        }
        done
    }
}

/// Opens the writer's connection as the pool opens its own: read-write, created if missing, a
/// `file:` path taken as a URI (the bundled SQLite is built to take them so anyway),
/// `synchronous = NORMAL` (the WAL mode is the file's, set when the pool opened it), and a
/// busy timeout of a second. (The pool also turns foreign keys on, which the bundled SQLite
/// does by default; the schema has none.)
fn open_writer(path: &std::path::Path) -> Result<rusqlite::Connection, rusqlite::Error> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(1))?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.set_prepared_statement_cache_capacity(WRITER_STATEMENTS);
    Ok(conn)
}

/// Deletes the expired rows among the next [`EXPIRE_CHUNK_IDS`] ids from the first row after
/// `chunk.after`, up to its bound; past the bound, the key ranges below the oldest row left.
fn expire_chunk(
    conn: &rusqlite::Connection,
    chunk: ExpireChunk,
) -> Result<Expired, rusqlite::Error> {
    let bound = match chunk.bound {
        Some(bound) => bound,
        None => conn.query_row(EXPIRED_BOUND, [chunk.cutoff], |row| row.get(0))?,
    };
    let first: Option<i64> = conn.query_row(
        "SELECT min(id) FROM requests WHERE id > ?1",
        [chunk.after],
        |row| row.get(0),
    )?;
    let Some(first) = first.filter(|&first| first <= bound) else {
        conn.execute(DELETE_STALE_KEYS, [])?;
        return Ok(Expired {
            deleted: 0,
            next: None,
        });
    };
    let last = bound.min(first.saturating_add(EXPIRE_CHUNK_IDS - 1));
    let deleted = conn.execute(DELETE_EXPIRED_CHUNK, [chunk.cutoff, first, last])? as u64;
    Ok(Expired {
        deleted,
        next: Some(ExpireChunk {
            after: last,
            bound: Some(bound),
            ..chunk
        }),
    })
}

/// Marks the names of `keys` as named by rows up to `last_id`, within `tx`; false when a key
/// does not name the name it was taken for (deleted, or deleted and given to another).
fn mark_names(
    tx: &rusqlite::Connection,
    keys: &[(i64, String)],
    last_id: i64,
) -> Result<bool, rusqlite::Error> {
    let mut mark = tx.prepare_cached(
        "UPDATE request_names SET last_id = max(last_id, ?1) WHERE id = ?2 AND name = ?3",
    )?;
    for (key, name) in keys {
        if mark.execute(params![last_id, key, name])? == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Deletes the names no row names any more: the last row of the newest batch that used them
/// is below the oldest row left. (A name used by a deleted row above a kept one waits.)
const DELETE_UNNAMED: &str = "DELETE FROM request_names \
     WHERE last_id < (SELECT coalesce(min(id), 9223372036854775807) FROM requests)";

/// Most rows per INSERT statement (14 bound values a row).
const ROWS_PER_STATEMENT: usize = 256;

/// Splits `n` rows into statement sizes that are powers of two, largest first.
///
/// The writer keeps each distinct statement prepared on its connection, and a multi-row INSERT
/// is a distinct statement for every row count: batches of any size from 1 to 1,024 rows once
/// held about 45 MiB of prepared statements. Powers of two up to [`ROWS_PER_STATEMENT`] make
/// at most nine shapes.
fn statement_sizes(mut n: usize) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if n == 0 {
            return None;
        }
        let size = ROWS_PER_STATEMENT.min(1 << n.ilog2());
        n -= size;
        Some(size)
    })
}

/// The highest row id `requests` has handed out (AUTOINCREMENT's sequence).
const REQUESTS_SEQUENCE: &str =
    "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'requests'), 0)";

/// Adds or replaces a model's, a node's or the batch's id range.
const INSERT_KEY_RANGE: &str = "INSERT OR REPLACE INTO request_keys (kind, key, first_id, last_id, min_ts, max_ts) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// Writes `rows` in one transaction, with their models' and nodes' id range in `request_keys`
/// and their names as keys into `request_names`.
fn insert(
    conn: &mut rusqlite::Connection,
    names: &mut NameKeys,
    rows: &[RequestRecord],
) -> Result<(), WriteError> {
    let keys = BatchKeys::of(rows);
    let count = rows.len() as i64;
    let tx = conn.transaction()?;
    let mut row_names = names.of_rows(&tx, rows)?;
    // Each name the batch uses is marked with the batch's last row id, before the rows go in:
    // retention keeps it while any of these rows is. AUTOINCREMENT hands out the ids after
    // the table's sequence (see below), so that is the sequence plus the row count.
    let sequence: i64 = tx
        .prepare_cached(REQUESTS_SEQUENCE)?
        .query_row([], |row| row.get(0))?;
    let mut used = names.used_keys();
    if !mark_names(&tx, &used, sequence + count)? {
        // A key the writer held names nothing, or another name: another router on this file
        // deleted the name (and gave its key to another).
        // The names are looked up again, in this transaction.
        names.forget();
        row_names = names.of_rows(&tx, rows)?;
        used = names.used_keys();
        if !mark_names(&tx, &used, sequence + count)? {
            return Err(WriteError::NamesDeleted);
        }
    }
    let mut rows = rows.iter().zip(row_names);
    let mut sizes = statement_sizes(rows.len()).peekable();
    let mut last_id = 0;
    while let Some(size) = sizes.next() {
        // Taken from the cache once for every statement of its size: the cache clears a
        // statement's bindings (all 3,584 of the largest) each time it takes one back.
        let mut statement = tx.prepare_cached(insert_sql(size))?;
        let mut statements = 1;
        while sizes.next_if_eq(&size).is_some() {
            statements += 1;
        }
        for _ in 0..statements {
            let mut first = 1;
            for (row, names) in rows.by_ref().take(size) {
                bind_row(&mut statement, first, row, names)?;
                first += VALUES_PER_ROW;
            }
            statement.raw_execute()?;
        }
        last_id = tx.last_insert_rowid();
    }
    // The transaction holds SQLite's write lock from the first INSERT to the commit, so no other
    // connection or process takes ids in between; AUTOINCREMENT hands them out in the order of
    // the VALUES, and `OR FAIL` never skips a row. So the batch's ids are the `count` up to
    // `last_id`, in the order of its rows. (REPLACE, not a plain INSERT, so that a broken
    // assumption could at worst hide rows from a filter, not lose the batch.)
    if last_id > sequence + count {
        // Not what AUTOINCREMENT does; marked again so that no name is kept too short.
        mark_names(&tx, &used, last_id)?;
    }
    let first_id = last_id - count + 1;
    {
        let mut add_range = tx.prepare_cached(INSERT_KEY_RANGE)?;
        for (kind, key, span) in keys.iter() {
            add_range.execute(params![
                kind,
                key,
                first_id + span.first as i64,
                first_id + span.last as i64,
                span.min_ts,
                span.max_ts
            ])?;
        }
    }
    tx.commit()?;
    names.keep_added();
    Ok(())
}

/// The values [`insert_sql`] binds for each row.
const VALUES_PER_ROW: usize = 14;

/// Binds one row's values to an INSERT's, in [`insert_sql`]'s column order, from parameter
/// `first` (1-based). SQLite copies the text.
fn bind_row(
    statement: &mut rusqlite::Statement<'_>,
    first: usize,
    r: &RequestRecord,
    names: RowNames,
) -> Result<(), rusqlite::Error> {
    statement.raw_bind_parameter(first, r.ts_ms)?;
    statement.raw_bind_parameter(first + 1, r.request_id.as_str())?;
    statement.raw_bind_parameter(first + 2, r.status)?;
    statement.raw_bind_parameter(first + 3, r.stream)?;
    statement.raw_bind_parameter(first + 4, r.latency_ms)?;
    statement.raw_bind_parameter(first + 5, r.ttfb_ms)?;
    statement.raw_bind_parameter(first + 6, r.prompt_tokens)?;
    statement.raw_bind_parameter(first + 7, r.completion_tokens)?;
    statement.raw_bind_parameter(first + 8, r.api_key_id.as_deref())?;
    statement.raw_bind_parameter(first + 9, r.client_disconnected)?;
    statement.raw_bind_parameter(first + 10, r.upstream_error.as_deref())?;
    statement.raw_bind_parameter(first + 11, names.path)?;
    statement.raw_bind_parameter(first + 12, names.model)?;
    statement.raw_bind_parameter(first + 13, names.node)
}

/// A row's path, model and node as keys into `request_names`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RowNames {
    path: i64,
    model: Option<i64>,
    node: Option<i64>,
}

/// The writer's map from names to their keys in `request_names`, so that a batch binds
/// integers, and the table is read only for names the writer has not met.
#[derive(Debug, Default)]
struct NameKeys {
    /// Committed keys, valid until names are deleted (then [`NameKeys::forget`]); a name
    /// deleted and met again gets a new key.
    known: HashMap<String, i64>,
    /// Added or read in the transaction being written; known once it commits. (A key added in
    /// a transaction that is rolled back can be given to another name later.)
    added: HashMap<String, i64>,
    /// The batch's names so far, looked through before the maps: a batch has a handful, and
    /// comparing a few short strings costs less than hashing one (three hashed lookups a row
    /// were about 1,000 instructions).
    recent: Vec<(String, i64)>,
    /// The keys and names the batch used, each once, for [`NameKeys::used_keys`]; a name
    /// found in `recent` is in here already.
    used: BTreeMap<i64, String>,
}

/// Most names [`NameKeys::recent`] holds: past it, a batch's further names are found by hash.
const MOST_RECENT_NAMES: usize = 8;

/// Most names [`NameKeys`] remembers; past it, it starts again from an empty map (each name
/// then costs one more read of the table). Models are named by clients, so they are not
/// bounded by the configuration.
const MOST_NAMES_KNOWN: usize = 4096;

impl NameKeys {
    /// The keys of `rows`' names, in order. A name met for the first time is looked up in
    /// `request_names` within `tx`, and added there if missing.
    fn of_rows(
        &mut self,
        tx: &rusqlite::Connection,
        rows: &[RequestRecord],
    ) -> Result<Vec<RowNames>, rusqlite::Error> {
        // Left from a batch that failed after adding names: their keys may not exist.
        self.added.clear();
        self.recent.clear();
        self.used.clear();
        let mut keys = Vec::with_capacity(rows.len());
        for row in rows {
            let path = self.key(tx, &row.path)?;
            let model = match &row.model {
                Some(model) => Some(self.key(tx, model)?),
                None => None,
            };
            let node = match &row.node_id {
                Some(node) => Some(self.key(tx, node)?),
                None => None,
            };
            keys.push(RowNames { path, model, node });
        }
        Ok(keys)
    }

    fn key(&mut self, tx: &rusqlite::Connection, name: &str) -> Result<i64, rusqlite::Error> {
        if let Some((_, key)) = self.recent.iter().find(|(recent, _)| recent == name) {
            return Ok(*key);
        }
        let key = match self.known.get(name).or_else(|| self.added.get(name)) {
            Some(&key) => key,
            None => self.look_up(tx, name)?,
        };
        if self.recent.len() < MOST_RECENT_NAMES {
            self.recent.push((name.to_owned(), key));
        }
        self.used.entry(key).or_insert_with(|| name.to_owned());
        Ok(key)
    }

    /// A name's key from `request_names`, added there if missing.
    fn look_up(&mut self, tx: &rusqlite::Connection, name: &str) -> Result<i64, rusqlite::Error> {
        tx.prepare_cached("INSERT OR IGNORE INTO request_names (name) VALUES (?1)")?
            .execute([name])?;
        let key = tx
            .prepare_cached("SELECT id FROM request_names WHERE name = ?1")?
            .query_row([name], |row| row.get(0))?;
        self.added.insert(name.to_owned(), key);
        Ok(key)
    }

    /// The keys of the names the batch used, each once, with their names, by key.
    fn used_keys(&mut self) -> Vec<(i64, String)> {
        std::mem::take(&mut self.used).into_iter().collect()
    }

    /// Forgets every key: names were deleted, and a deleted name's key can come back for
    /// another.
    fn forget(&mut self) {
        self.known.clear();
        self.added.clear();
        self.recent.clear();
        self.used.clear();
    }

    /// After a commit: the batch's new names are known.
    fn keep_added(&mut self) {
        if self.known.len() + self.added.len() > MOST_NAMES_KNOWN {
            self.known.clear();
        }
        self.known.extend(self.added.drain());
    }
}

/// Where a model's or a node's rows are in a batch: the first and last by position, and their
/// timestamps' range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KeySpan {
    first: usize,
    last: usize,
    min_ts: i64,
    max_ts: i64,
}

impl KeySpan {
    fn new(position: usize, ts: i64) -> Self {
        Self {
            first: position,
            last: position,
            min_ts: ts,
            max_ts: ts,
        }
    }

    fn add(&mut self, position: usize, ts: i64) {
        self.last = position;
        self.min_ts = self.min_ts.min(ts);
        self.max_ts = self.max_ts.max(ts);
    }
}

/// The distinct models and nodes of a batch, with where their rows are, and the batch's own
/// span: a handful, however many rows.
#[derive(Debug, Default)]
struct BatchKeys {
    batch: Option<KeySpan>,
    models: BTreeMap<String, KeySpan>,
    nodes: BTreeMap<String, KeySpan>,
}

impl BatchKeys {
    fn of(rows: &[RequestRecord]) -> Self {
        let mut keys = Self::default();
        for (position, row) in rows.iter().enumerate() {
            match &mut keys.batch {
                Some(span) => span.add(position, row.ts_ms),
                None => keys.batch = Some(KeySpan::new(position, row.ts_ms)),
            }
            for (spans, key) in [
                (&mut keys.models, &row.model),
                (&mut keys.nodes, &row.node_id),
            ] {
                let Some(key) = key else { continue };
                // Looked up before it is copied: most rows repeat a key already seen.
                match spans.get_mut(&**key) {
                    Some(span) => span.add(position, row.ts_ms),
                    None => {
                        spans.insert(String::from(&**key), KeySpan::new(position, row.ts_ms));
                    }
                }
            }
        }
        keys
    }

    fn iter(&self) -> impl Iterator<Item = (&'static str, &str, KeySpan)> {
        let batch = self.batch.iter().map(|s| (KIND_BATCH, BATCH_KEY, *s));
        let models = self
            .models
            .iter()
            .map(|(m, s)| (KIND_MODEL, m.as_str(), *s));
        let nodes = self.nodes.iter().map(|(n, s)| (KIND_NODE, n.as_str(), *s));
        batch.chain(models).chain(nodes)
    }
}

/// `request_keys.kind` of a model's and of a node's id ranges.
const KIND_MODEL: &str = "model";
const KIND_NODE: &str = "node";
/// `request_keys.kind` and `key` of a batch's id range: every row written in it.
const KIND_BATCH: &str = "batch";
const BATCH_KEY: &str = "";

/// The INSERT text for `rows` rows, a power of two up to [`ROWS_PER_STATEMENT`]: made once per
/// size, since building it per batch cost about a thousand instructions a row.
///
/// `OR FAIL`, because a failing statement need not undo its own rows: the whole transaction is
/// rolled back and its rows counted as dropped. Under the default (`ABORT`) SQLite keeps a
/// statement journal of every page a multi-row INSERT touches, and past 64 KiB it spills that
/// journal to a temporary file: a third of the writer's `pwrite` calls.
fn insert_sql(rows: usize) -> &'static str {
    static BY_POWER: LazyLock<Vec<String>> = LazyLock::new(|| {
        (0..=ROWS_PER_STATEMENT.ilog2())
            .map(|power| {
                let mut sql = String::from(
                    "INSERT OR FAIL INTO requests (ts_ms, request_id, path, status, stream, \
                     latency_ms, ttfb_ms, prompt_tokens, completion_tokens, api_key_id, \
                     client_disconnected, upstream_error, path_key, model_key, node_key) VALUES ",
                );
                for row in 0..1usize << power {
                    if row > 0 {
                        sql.push_str(", ");
                    }
                    // `path` is NOT NULL from the first schema: '' written out, not bound.
                    sql.push_str("(?, ?, '', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
                }
                sql
            })
            .collect()
    });
    debug_assert!(rows.is_power_of_two() && rows <= ROWS_PER_STATEMENT);
    let power = (rows.max(1).ilog2() as usize).min(BY_POWER.len() - 1);
    &BY_POWER[power]
}

/// One warning per 10 s at most, with how many rows were lost since the last one.
#[derive(Default)]
struct WarnLimiter {
    last: Option<Instant>,
    pending: u64,
}

impl WarnLimiter {
    fn warn(&mut self, rows: u64, error: &dyn fmt::Display) {
        self.pending += rows;
        if self
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            tracing::warn!(%error, dropped_rows = self.pending, "request history rows could not be written");
            self.pending = 0;
            self.last = Some(Instant::now());
        }
    }
}

/// Query parameters of `GET /api/logs`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    /// Exact model.
    pub model: Option<String>,
    /// Exact node id.
    pub node: Option<String>,
    /// An exact status (`200`) or a class (`5xx`).
    pub status: Option<String>,
    /// From this unix ms on.
    pub since: Option<i64>,
    /// Before this unix ms.
    pub until: Option<i64>,
    /// Rows per page, default 100, at most 1000.
    pub limit: Option<usize>,
    /// Newest-first paging: rows with smaller ids.
    pub before_id: Option<i64>,
    /// Follow mode: rows with larger ids, oldest first.
    pub after_id: Option<i64>,
}

enum StatusFilter {
    Exact(u16),
    Class(u16),
}

impl LogQuery {
    fn status_filter(&self) -> Result<Option<StatusFilter>, HistoryError> {
        let Some(status) = self.status.as_deref() else {
            return Ok(None);
        };
        let bad = || {
            HistoryError::BadQuery(format!(
                "status must be a code like 200 or a class like 5xx, not {status:?}"
            ))
        };
        let lower = status.to_ascii_lowercase();
        if let Some(class) = lower.strip_suffix("xx") {
            let class = u16::from_str(class).map_err(|_| bad())?;
            return (1..=5)
                .contains(&class)
                .then_some(Some(StatusFilter::Class(class)))
                .ok_or_else(bad);
        }
        let code = u16::from_str(&lower).map_err(|_| bad())?;
        (100..=599)
            .contains(&code)
            .then_some(Some(StatusFilter::Exact(code)))
            .ok_or_else(bad)
    }
}

/// Query parameters of `GET /api/stats`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    /// From this unix ms on.
    pub since: Option<i64>,
    /// Before this unix ms.
    pub until: Option<i64>,
}

/// One stored row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogRow {
    /// Row id, increasing.
    pub id: i64,
    /// The request itself.
    #[serde(flatten)]
    pub record: RequestRecord,
}

impl LogRow {
    fn from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Self, sqlx::Error> {
        let status: i64 = row.try_get("status")?;
        let prompt: Option<i64> = row.try_get("prompt_tokens")?;
        let completion: Option<i64> = row.try_get("completion_tokens")?;
        Ok(Self {
            id: row.try_get("id")?,
            record: RequestRecord {
                ts_ms: row.try_get("ts_ms")?,
                request_id: row.try_get("request_id")?,
                path: Cow::Owned(row.try_get("path")?),
                model: row.try_get::<Option<String>, _>("model")?.map(Arc::from),
                node_id: row.try_get::<Option<String>, _>("node_id")?.map(Arc::from),
                status: u16::try_from(status).unwrap_or(0),
                stream: row.try_get("stream")?,
                latency_ms: row.try_get("latency_ms")?,
                ttfb_ms: row.try_get("ttfb_ms")?,
                prompt_tokens: prompt.and_then(|v| u32::try_from(v).ok()),
                completion_tokens: completion.and_then(|v| u32::try_from(v).ok()),
                api_key_id: row.try_get("api_key_id")?,
                client_disconnected: row.try_get("client_disconnected")?,
                upstream_error: row.try_get("upstream_error")?,
            },
        })
    }
}

/// A page of `GET /api/logs`.
#[derive(Debug, Clone, Serialize)]
pub struct LogPage {
    /// The rows.
    pub logs: Vec<LogRow>,
    /// Pass as `before_id` for the next page; `None` on the last page and in follow mode.
    pub next_before_id: Option<i64>,
}

/// Latency percentiles in ms; `None` without rows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// Median.
    pub p50: Option<f64>,
    /// 95th percentile.
    pub p95: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
}

/// Counts of one model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelStats {
    /// The model (`None`: the request named none).
    pub model: Option<String>,
    /// Requests.
    pub total: u64,
    /// Status >= 500 or client gone.
    pub errors: u64,
    /// errors / total.
    pub error_rate: f64,
    /// Latency percentiles.
    pub latency_ms: Summary,
}

/// Counts of one node.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStats {
    /// The node (`None`: no node served it).
    pub node_id: Option<String>,
    /// Requests.
    pub total: u64,
    /// Status >= 500 or client gone.
    pub errors: u64,
    /// errors / total.
    pub error_rate: f64,
    /// Latency percentiles.
    pub latency_ms: Summary,
}

/// The writer's counters.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct HistoryCounts {
    /// Rows committed.
    pub written: u64,
    /// Rows lost.
    pub dropped: u64,
}

/// `GET /api/stats`.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Requests in the window.
    pub total: u64,
    /// Status >= 500 or client gone.
    pub errors: u64,
    /// errors / total (0 without rows).
    pub error_rate: f64,
    /// Latency percentiles.
    pub latency_ms: Summary,
    /// Time-to-first-byte percentiles.
    pub ttfb_ms: Summary,
    /// Per model.
    pub by_model: Vec<ModelStats>,
    /// Per node.
    pub by_node: Vec<NodeStats>,
    /// Rows written and dropped since start.
    pub history: HistoryCounts,
}

/// Percentiles over microseconds, 3 significant digits.
struct Percentiles(Option<Histogram<u64>>);

impl Default for Percentiles {
    fn default() -> Self {
        Self(Histogram::new(3).ok())
    }
}

impl Percentiles {
    fn add(&mut self, ms: f64) {
        if let Some(h) = &mut self.0 {
            let _ = h.record((ms * 1000.0).max(0.0) as u64);
        }
    }

    fn summary(&self) -> Summary {
        let at = |q: f64| {
            self.0
                .as_ref()
                .filter(|h| !h.is_empty())
                .map(|h| h.value_at_quantile(q) as f64 / 1000.0)
        };
        Summary {
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
        }
    }
}

#[derive(Default)]
struct Group {
    total: u64,
    errors: u64,
    latency: Percentiles,
}

impl Group {
    fn add(&mut self, error: bool, latency_ms: f64) {
        self.total += 1;
        self.errors += u64::from(error);
        self.latency.add(latency_ms);
    }

    fn error_rate(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.errors as f64 / self.total as f64
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn statements_come_in_a_few_power_of_two_sizes() {
        assert_eq!(statement_sizes(0).count(), 0);
        assert_eq!(statement_sizes(1).collect::<Vec<_>>(), [1]);
        assert_eq!(statement_sizes(7).collect::<Vec<_>>(), [4, 2, 1]);
        assert_eq!(
            statement_sizes(600).collect::<Vec<_>>(),
            [256, 256, 64, 16, 8]
        );
        let mut shapes = std::collections::BTreeSet::new();
        for n in 0..3000 {
            let sizes: Vec<usize> = statement_sizes(n).collect();
            assert_eq!(sizes.iter().sum::<usize>(), n);
            shapes.extend(sizes);
        }
        assert_eq!(shapes.len(), 9, "{shapes:?}");
    }

    #[test]
    fn insert_text_has_one_placeholder_per_value() {
        for size in [1, 2, 64, ROWS_PER_STATEMENT] {
            let sql = insert_sql(size);
            assert_eq!(
                sql.matches('?').count(),
                size * VALUES_PER_ROW,
                "{size} rows"
            );
            assert_eq!(sql.matches("), (").count(), size - 1, "{size} rows");
        }
    }

    /// A name as the view reads it back.
    fn name_text(name: &Option<Arc<str>>) -> Option<String> {
        name.as_deref().map(String::from)
    }

    fn record(i: usize) -> RequestRecord {
        RequestRecord {
            ts_ms: 1_700_000_000_000 + i as i64,
            request_id: format!("req-{i}"),
            path: "/v1/chat/completions".into(),
            model: Some(if i.is_multiple_of(2) { "even" } else { "odd" }.into()),
            node_id: Some(format!("n{}", i % 3).into()),
            status: if i % 10 == 9 { 502 } else { 200 },
            stream: i.is_multiple_of(4),
            latency_ms: (i + 1) as f64,
            ttfb_ms: Some(0.5),
            prompt_tokens: Some(i as u32),
            completion_tokens: None,
            api_key_id: Some("k".into()),
            client_disconnected: false,
            upstream_error: None,
        }
    }

    /// Without a retention period: the rows here carry 2023 timestamps, and the retention task
    /// (whose first pass runs a minute after opening) would delete them while a slow test reads.
    async fn open(dir: &tempfile::TempDir, capacity: usize) -> History {
        History::open(HistoryConfig {
            path: dir.path().join("h.db"),
            retention: None,
            batch_size: 64,
            flush_interval: Duration::from_millis(10),
            queue_capacity: capacity,
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn rows_come_back_once_each_with_filters_and_paging() {
        let dir = tempfile::tempdir().unwrap();
        let history = open(&dir, 10_000).await;
        for i in 0..1000 {
            history.record(record(i));
        }
        history.flush().await;
        assert_eq!((history.written(), history.dropped()), (1000, 0));
        assert!(
            history.batches() < 100,
            "batched: {} transactions",
            history.batches()
        );

        let seen = all_pages(
            &history,
            LogQuery {
                limit: Some(300),
                ..LogQuery::default()
            },
        )
        .await;
        assert_eq!(seen.len(), 1000);
        assert_eq!(seen[0], "req-999", "newest first");
        let unique: std::collections::HashSet<_> = seen.iter().collect();
        assert_eq!(unique.len(), 1000, "no repeats");

        let first = history
            .logs(&LogQuery {
                limit: Some(1),
                ..LogQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(first.logs[0].record, record(999), "every field intact");

        let count = |q: LogQuery| {
            let history = history.clone();
            async move {
                history
                    .logs(&LogQuery {
                        limit: Some(1000),
                        ..q
                    })
                    .await
                    .unwrap()
                    .logs
                    .len()
            }
        };
        assert_eq!(
            count(LogQuery {
                model: Some("odd".into()),
                ..LogQuery::default()
            })
            .await,
            500
        );
        assert_eq!(
            count(LogQuery {
                node: Some("n0".into()),
                ..LogQuery::default()
            })
            .await,
            334
        );
        assert_eq!(
            count(LogQuery {
                status: Some("5xx".into()),
                ..LogQuery::default()
            })
            .await,
            100
        );
        assert_eq!(
            count(LogQuery {
                status: Some("200".into()),
                ..LogQuery::default()
            })
            .await,
            900
        );
        assert_eq!(
            count(LogQuery {
                since: Some(1_700_000_000_100),
                until: Some(1_700_000_000_200),
                ..LogQuery::default()
            })
            .await,
            100
        );
        let newer = history
            .logs(&LogQuery {
                after_id: Some(998),
                ..LogQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(newer.logs.len(), 2);
        assert!(
            newer.logs[0].id < newer.logs[1].id,
            "follow mode is oldest first"
        );
        assert!(matches!(
            history
                .logs(&LogQuery {
                    status: Some("2yy".into()),
                    ..LogQuery::default()
                })
                .await,
            Err(HistoryError::BadQuery(_))
        ));
    }

    /// Every page of `query`, followed newest first (or oldest first from `after_id`), as
    /// request ids.
    async fn all_pages(history: &History, query: LogQuery) -> Vec<String> {
        let rows = all_rows(history, query).await;
        rows.into_iter().map(|r| r.request_id).collect()
    }

    async fn all_rows(history: &History, mut query: LogQuery) -> Vec<RequestRecord> {
        let mut seen = Vec::new();
        loop {
            let page = history.logs(&query).await.unwrap();
            let last = page.logs.last().map(|r| r.id);
            seen.extend(page.logs.into_iter().map(|r| r.record));
            match (query.after_id, page.next_before_id, last) {
                (Some(_), _, Some(last)) => query.after_id = Some(last),
                (None, Some(next), _) => query.before_id = Some(next),
                _ => break,
            }
        }
        seen
    }

    /// Records `records` and waits until they are written.
    async fn write_all(history: &History, records: &[RequestRecord]) {
        for r in records {
            history.record(r.clone());
        }
        history.flush().await;
    }

    /// The request ids of the `records` that `keep` keeps, newest first (as pages list them).
    fn newest_first(
        records: &[RequestRecord],
        keep: impl Fn(&RequestRecord) -> bool,
    ) -> Vec<String> {
        records
            .iter()
            .rev()
            .filter(|r| keep(r))
            .map(|r| r.request_id.clone())
            .collect()
    }

    #[tokio::test]
    async fn model_and_node_filters_page_through_many_batches_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let history = open(&dir, 10_000).await;
        // Batches of up to 64 rows, and a rare model in a few of them only.
        let records: Vec<_> = (0..1000)
            .map(|i| {
                let mut r = record(i);
                if i % 97 == 5 {
                    r.model = Some("rare".into());
                }
                r
            })
            .collect();
        write_all(&history, &records).await;
        assert!(history.batches() > 10, "{} batches", history.batches());
        let expect = |keep: &dyn Fn(&RequestRecord) -> bool| newest_first(&records, keep);
        let page = |model: Option<&str>, node: Option<&str>, status: Option<&str>| LogQuery {
            model: model.map(str::to_owned),
            node: node.map(str::to_owned),
            status: status.map(str::to_owned),
            limit: Some(7),
            ..LogQuery::default()
        };
        let is = |field: &Option<Arc<str>>, want: &str| field.as_deref() == Some(want);
        assert_eq!(
            all_pages(&history, page(Some("rare"), None, None)).await,
            expect(&|r| is(&r.model, "rare"))
        );
        assert_eq!(
            all_pages(&history, page(Some("odd"), Some("n1"), Some("200"))).await,
            expect(&|r| is(&r.model, "odd") && is(&r.node_id, "n1") && r.status == 200)
        );
        assert_eq!(
            all_pages(&history, page(None, Some("n2"), Some("5xx"))).await,
            expect(&|r| is(&r.node_id, "n2") && r.status >= 500)
        );
        assert_eq!(
            all_pages(&history, page(Some("nobody"), None, None)).await,
            Vec::<String>::new()
        );
        let in_window =
            |r: &RequestRecord| (1_700_000_000_300..1_700_000_000_700).contains(&r.ts_ms);
        let mut windowed = page(Some("odd"), None, None);
        windowed.since = Some(1_700_000_000_300);
        windowed.until = Some(1_700_000_000_700);
        assert_eq!(
            all_pages(&history, windowed).await,
            expect(&|r| is(&r.model, "odd") && in_window(r))
        );
        // Following from the id of req-499 (ids start at 1): oldest first.
        let mut follow = page(None, Some("n0"), None);
        follow.after_id = Some(500);
        let mut newer = expect(&|r| is(&r.node_id, "n0") && r.ts_ms >= 1_700_000_000_500);
        newer.reverse();
        assert_eq!(all_pages(&history, follow).await, newer);
    }

    #[tokio::test]
    async fn time_windows_find_their_rows_through_batch_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let history = open(&dir, 10_000).await;
        // Some rows arrived long before the rows written around them (long requests), so
        // batches' time ranges overlap.
        let records: Vec<_> = (0..1000)
            .map(|i| {
                let mut r = record(i);
                if i % 13 == 6 {
                    r.ts_ms = 1_700_000_000_000 + (i / 4) as i64;
                }
                r
            })
            .collect();
        write_all(&history, &records).await;
        assert!(history.batches() > 10, "{} batches", history.batches());
        let (since, until) = (1_700_000_000_200, 1_700_000_000_450);
        let in_window = |r: &RequestRecord| (since..until).contains(&r.ts_ms);
        let expect = |keep: &dyn Fn(&RequestRecord) -> bool| {
            newest_first(&records, |r| in_window(r) && keep(r))
        };
        let page = |status: Option<&str>| LogQuery {
            status: status.map(str::to_owned),
            since: Some(since),
            until: Some(until),
            limit: Some(9),
            ..LogQuery::default()
        };
        assert!(
            expect(&|_| true).contains(&"req-812".to_owned()),
            "rows from later batches too"
        );
        assert_eq!(all_pages(&history, page(None)).await, expect(&|_| true));
        assert_eq!(
            all_pages(&history, page(Some("2xx"))).await,
            expect(&|r| r.status < 300)
        );
        assert_eq!(
            all_pages(&history, page(Some("502"))).await,
            expect(&|r| r.status == 502)
        );
        let mut follow = page(None);
        follow.after_id = Some(1);
        let mut oldest_first = expect(&|r| r.request_id != "req-0");
        oldest_first.reverse();
        assert_eq!(all_pages(&history, follow).await, oldest_first);
        let only_since = LogQuery {
            since: Some(since),
            limit: Some(1000),
            ..LogQuery::default()
        };
        assert_eq!(
            history.logs(&only_since).await.unwrap().logs.len(),
            records.iter().filter(|r| r.ts_ms >= since).count()
        );

        let stats = |since: Option<i64>, until: Option<i64>| {
            let history = history.clone();
            async move {
                history
                    .stats(&StatsQuery { since, until })
                    .await
                    .unwrap()
                    .total
            }
        };
        let count =
            |keep: &dyn Fn(i64) -> bool| records.iter().filter(|r| keep(r.ts_ms)).count() as u64;
        assert_eq!(
            stats(Some(since), Some(until)).await,
            count(&|ts| (since..until).contains(&ts))
        );
        assert_eq!(stats(Some(since), None).await, count(&|ts| ts >= since));
        assert_eq!(stats(None, Some(until)).await, count(&|ts| ts < until));
        assert_eq!(stats(None, None).await, 1000);
    }

    #[tokio::test]
    async fn time_windows_and_retention_read_batch_ranges_by_time() {
        let dir = tempfile::tempdir().unwrap();
        let history = open(&dir, 16).await;
        let pool = history.pool().unwrap();
        let plan_of = |sql: String| async move {
            let rows = sqlx::query(&format!("EXPLAIN QUERY PLAN {sql}"))
                .fetch_all(pool)
                .await
                .unwrap();
            rows.iter()
                .map(|row| row.get::<String, _>("detail"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let mut stats = QueryBuilder::<Sqlite>::new("SELECT r.status FROM ");
        push_window_rows(&mut stats, Some(1), Some(2));
        let by_window = plan_of(stats.sql().to_owned()).await;
        assert!(
            by_window.starts_with("SEARCH k USING INDEX request_keys_ts (kind=? AND max_ts>?)"),
            "{by_window}"
        );
        let expiry = plan_of(EXPIRED_BOUND.to_owned()).await;
        assert!(
            expiry.contains("request_keys_ts (kind=? AND max_ts<?)"),
            "{expiry}"
        );
        let chunk = plan_of(DELETE_EXPIRED_CHUNK.to_owned()).await;
        assert!(
            chunk.contains("SEARCH requests USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)"),
            "{chunk}"
        );
        let window = LogQuery {
            since: Some(1),
            until: Some(2),
            ..LogQuery::default()
        };
        let logs = plan(&history, &window).await;
        assert!(
            logs.starts_with("SEARCH k USING PRIMARY KEY (kind=? AND key=?)"),
            "{logs}"
        );
        assert!(!logs.contains("TEMP B-TREE"), "{logs}");
        assert!(
            !index_names(&history)
                .await
                .contains(&"requests_ts".to_owned()),
            "no index entry per row for its time"
        );
    }

    /// What SQLite plans for the page query (bound values left NULL: the plan does not depend
    /// on them).
    async fn plan(history: &History, query: &LogQuery) -> String {
        let sql = format!("EXPLAIN QUERY PLAN {}", logs_query(query).unwrap().sql());
        let rows = sqlx::query(&sql)
            .fetch_all(history.pool().unwrap())
            .await
            .unwrap();
        rows.iter()
            .map(|row| row.get::<String, _>("detail"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    #[tokio::test]
    async fn a_batch_rolled_back_midway_leaves_the_next_batches_ranges_right() {
        let dir = tempfile::tempdir().unwrap();
        let history = open(&dir, 10_000).await;
        // A row that fails its INSERT after the rows before it in the batch went in: the
        // transaction is rolled back and AUTOINCREMENT hands the same ids out again.
        sqlx::query(
            "CREATE TRIGGER poison BEFORE INSERT ON requests WHEN NEW.request_id = 'poison' \
             BEGIN SELECT RAISE(FAIL, 'poisoned row'); END",
        )
        .execute(history.pool().unwrap())
        .await
        .unwrap();
        // The failed batch also adds a name, whose key the rollback takes back.
        for i in 0..40 {
            let mut r = record(i);
            if i == 5 {
                r.model = Some("lost then found".into());
            }
            if i == 30 {
                r.request_id = "poison".into();
            }
            history.record(r);
        }
        history.flush().await;
        assert_eq!((history.written(), history.dropped()), (0, 40));
        // The next batch adds another name first, which may get that key, then the first.
        let later = |i: usize| {
            let mut r = record(i);
            match i {
                100 => r.model = Some("new first".into()),
                102 => r.model = Some("lost then found".into()),
                _ => {}
            }
            r
        };
        for i in 100..300 {
            history.record(later(i));
        }
        history.flush().await;
        assert_eq!(history.written(), 200);
        let oldest = history
            .logs(&LogQuery {
                after_id: Some(0),
                limit: Some(3),
                ..LogQuery::default()
            })
            .await
            .unwrap();
        let models: Vec<_> = oldest.logs.iter().map(|r| r.record.model.clone()).collect();
        assert_eq!(
            models,
            [later(100).model, later(101).model, later(102).model],
            "every name read back as written"
        );
        let expected: Vec<String> = (100..300)
            .rev()
            .filter(|i| i % 2 == 1)
            .map(|i| format!("req-{i}"))
            .collect();
        let by_model = LogQuery {
            model: Some("odd".into()),
            limit: Some(13),
            ..LogQuery::default()
        };
        assert_eq!(all_pages(&history, by_model).await, expected);
    }

    #[tokio::test]
    async fn model_and_node_filters_read_key_ranges_without_sorting() {
        let dir = tempfile::tempdir().unwrap();
        let history = open(&dir, 16).await;
        for query in [
            LogQuery {
                model: Some("m".into()),
                ..LogQuery::default()
            },
            LogQuery {
                node: Some("n".into()),
                before_id: Some(10),
                ..LogQuery::default()
            },
            LogQuery {
                model: Some("m".into()),
                after_id: Some(10),
                ..LogQuery::default()
            },
            LogQuery {
                node: Some("n".into()),
                since: Some(1),
                until: Some(2),
                ..LogQuery::default()
            },
            // Errors of a model too: its ranges, not the partial index sorted for each page.
            LogQuery {
                model: Some("m".into()),
                status: Some("5xx".into()),
                ..LogQuery::default()
            },
            LogQuery {
                model: Some("m".into()),
                status: Some("503".into()),
                ..LogQuery::default()
            },
            LogQuery {
                model: Some("m".into()),
                status: Some("2xx".into()),
                ..LogQuery::default()
            },
        ] {
            let plan = plan(&history, &query).await;
            if query.after_id.is_some() {
                // Sought from the range that holds `after_id`, not read from the first.
                assert!(
                    plan.contains("SEARCH k USING PRIMARY KEY (kind=? AND key=? AND first_id>?)"),
                    "{query:?}: {plan}"
                );
            }
            // `k` is request_keys: its ranges are the outer loop.
            assert!(
                plan.starts_with("SEARCH k USING PRIMARY KEY"),
                "{query:?}: {plan}"
            );
            assert!(!plan.contains("TEMP B-TREE"), "{query:?}: {plan}");
        }
    }

    #[tokio::test]
    async fn retention_finds_stale_key_ranges_by_their_first_id() {
        let dir = tempfile::tempdir().unwrap();
        let history = open(&dir, 16).await;
        let retention = sqlx::query(&format!("EXPLAIN QUERY PLAN {DELETE_STALE_KEYS}"))
            .fetch_all(history.pool().unwrap())
            .await
            .unwrap();
        let retention: Vec<String> = retention.iter().map(|r| r.get("detail")).collect();
        assert!(
            retention.iter().any(|d| d.contains("request_keys_first")),
            "{retention:?}"
        );
    }

    async fn plan_for_status(history: &History, status: &str) -> String {
        let query = LogQuery {
            status: Some(status.into()),
            ..LogQuery::default()
        };
        plan(history, &query).await
    }

    #[tokio::test]
    async fn error_filters_use_the_error_index_and_others_scan() {
        let dir = tempfile::tempdir().unwrap();
        let history = open(&dir, 16).await;
        for status in ["5xx", "503", "4xx", "429"] {
            let plan = plan_for_status(&history, status).await;
            assert!(plan.contains("requests_errors"), "{status}: {plan}");
        }
        for status in ["2xx", "200"] {
            let plan = plan_for_status(&history, status).await;
            assert!(!plan.contains("requests_errors"), "{status}: {plan}");
        }
    }

    #[tokio::test]
    async fn a_batch_of_several_statements_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(HistoryConfig {
            path: dir.path().join("h.db"),
            retention: None,
            batch_size: 4096,
            flush_interval: Duration::from_millis(50),
            queue_capacity: 10_000,
        })
        .await
        .unwrap();
        // 1,000 rows in one batch: statements of 256, 256, 256, 128, 64, 32 and 8 rows.
        for i in 0..1000 {
            history.record(record(i));
        }
        history.flush().await;
        assert_eq!((history.written(), history.dropped()), (1000, 0));
        assert_eq!(history.batches(), 1);
        let page = history
            .logs(&LogQuery {
                limit: Some(1000),
                ..LogQuery::default()
            })
            .await
            .unwrap();
        let mut ids: Vec<_> = page
            .logs
            .iter()
            .map(|r| r.record.request_id.clone())
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 1000);
        assert_eq!(
            page.logs[0].record,
            record(999),
            "every field in the right column"
        );
        assert_eq!(page.logs[999].record, record(0));
    }

    /// Shuts `history` down and opens its database again, running whatever migrations are
    /// not recorded as applied.
    async fn reopen(history: History, dir: &tempfile::TempDir, capacity: usize) -> History {
        history.shutdown(Duration::from_secs(5)).await;
        drop(history);
        open(dir, capacity).await
    }

    async fn index_names(history: &History) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'requests'",
        )
        .fetch_all(history.pool().unwrap())
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_database_from_before_the_error_index_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let history = open(&dir, 16).await;
        // Back to the state before the migration: the full status index, the migration unrun.
        let pool = history.pool().unwrap();
        sqlx::query("DROP INDEX requests_errors")
            .execute(pool)
            .await
            .unwrap();
        sqlx::query("CREATE INDEX requests_status ON requests (status, id)")
            .execute(pool)
            .await
            .unwrap();
        sqlx::query("DELETE FROM _sqlx_migrations WHERE description = 'error index'")
            .execute(pool)
            .await
            .unwrap();
        let history = reopen(history, &dir, 16).await;
        let indexes = index_names(&history).await;
        assert!(
            indexes.contains(&"requests_errors".to_owned()),
            "{indexes:?}"
        );
        assert!(
            !indexes.contains(&"requests_status".to_owned()),
            "{indexes:?}"
        );
    }

    #[tokio::test]
    async fn a_database_from_before_the_key_ranges_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let history = open(&dir, 20_000).await;
        // Over two of the backfill's 4,096-id blocks, and some rows with no model or node.
        let row = |i: usize| {
            let mut r = record(i);
            if i.is_multiple_of(11) {
                r.model = None;
                r.node_id = None;
            }
            r
        };
        for i in 0..9000 {
            history.record(row(i));
        }
        history.flush().await;
        assert_eq!(history.written(), 9000);
        // Back to the state before the migration: rows with their names as text, indexes on
        // model and node, no key ranges.
        let pool = history.pool().unwrap();
        names_to_text(pool).await;
        for sql in [
            "DROP TABLE request_keys",
            "CREATE INDEX requests_model ON requests (model, id)",
            "CREATE INDEX requests_node ON requests (node_id, id)",
            "DELETE FROM _sqlx_migrations \
             WHERE description IN ('request keys', 'request keys first')",
        ] {
            sqlx::query(sql).execute(pool).await.unwrap();
        }
        let history = reopen(history, &dir, 20_000).await;
        let indexes = index_names(&history).await;
        assert!(
            !indexes
                .iter()
                .any(|i| i == "requests_model" || i == "requests_node"),
            "{indexes:?}"
        );
        // Rows written after the upgrade get their ranges from the writer.
        for i in 9000..9500 {
            history.record(row(i));
        }
        history.flush().await;
        let rows: Vec<_> = (0..9500).map(row).collect();
        let newest_first = |keep: &dyn Fn(&RequestRecord) -> bool| newest_first(&rows, keep);
        let page = |model: Option<&str>, node: Option<&str>| LogQuery {
            model: model.map(str::to_owned),
            node: node.map(str::to_owned),
            limit: Some(997),
            ..LogQuery::default()
        };
        assert_eq!(
            all_pages(&history, page(Some("even"), None)).await,
            newest_first(&|r| r.model.as_deref() == Some("even")),
            "rows from before and after the upgrade, in order"
        );
        assert_eq!(
            all_pages(&history, page(None, Some("n1"))).await,
            newest_first(&|r| r.node_id.as_deref() == Some("n1"))
        );
    }

    /// Rewrites every row as a router from before `request_names` wrote it: names as text, no
    /// keys.
    async fn names_to_text(pool: &SqlitePool) {
        sqlx::query(
            "UPDATE requests SET \
             path = coalesce((SELECT name FROM request_names WHERE id = path_key), path), \
             model = coalesce((SELECT name FROM request_names WHERE id = model_key), model), \
             node_id = coalesce((SELECT name FROM request_names WHERE id = node_key), node_id), \
             path_key = NULL, model_key = NULL, node_key = NULL",
        )
        .execute(pool)
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_database_from_before_the_name_keys_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let history = open(&dir, 1000).await;
        let row = |i: usize| {
            let mut r = record(i);
            if i.is_multiple_of(7) {
                r.model = None;
                r.node_id = None;
                r.path = Cow::Owned(format!("/v1/other/{i}"));
            }
            r
        };
        let rows: Vec<_> = (0..600).map(row).collect();
        write_all(&history, &rows[..300]).await;
        // Back to the state before the migration: names as text, no keys, no view.
        let pool = history.pool().unwrap();
        names_to_text(pool).await;
        for sql in [
            "DROP VIEW request_log",
            "DROP TABLE request_names",
            "ALTER TABLE requests DROP COLUMN path_key",
            "ALTER TABLE requests DROP COLUMN model_key",
            "ALTER TABLE requests DROP COLUMN node_key",
            "DELETE FROM _sqlx_migrations WHERE description = 'request names'",
        ] {
            sqlx::query(sql).execute(pool).await.unwrap();
        }
        let history = reopen(history, &dir, 1000).await;
        write_all(&history, &rows[300..]).await;
        assert_eq!(history.dropped(), 0);
        let pool = history.pool().unwrap();
        let (text_rows, keyed_rows): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE path_key IS NULL AND path <> ''), \
             count(*) FILTER (WHERE path_key IS NOT NULL AND path = '' AND model IS NULL \
             AND node_id IS NULL) FROM requests",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(
            (text_rows, keyed_rows),
            (300, 300),
            "both layouts in the table"
        );

        // Every row reads back whole, through the API and through the view.
        let page = all_rows(&history, LogQuery::default()).await;
        assert_eq!(page, rows.iter().rev().cloned().collect::<Vec<_>>());
        let by_view: Vec<(String, Option<String>, Option<String>)> =
            sqlx::query_as("SELECT path, model, node_id FROM request_log ORDER BY id")
                .fetch_all(pool)
                .await
                .unwrap();
        let written: Vec<_> = rows
            .iter()
            .map(|r| {
                (
                    r.path.to_string(),
                    name_text(&r.model),
                    name_text(&r.node_id),
                )
            })
            .collect();
        assert_eq!(by_view, written);

        // Filters find the rows of both layouts.
        let filtered = |model: Option<&str>, node: Option<&str>| LogQuery {
            model: model.map(str::to_owned),
            node: node.map(str::to_owned),
            limit: Some(37),
            ..LogQuery::default()
        };
        let ids = |keep: &dyn Fn(&RequestRecord) -> bool| newest_first(&rows, keep);
        assert_eq!(
            all_pages(&history, filtered(Some("odd"), None)).await,
            ids(&|r| r.model.as_deref() == Some("odd"))
        );
        assert_eq!(
            all_pages(&history, filtered(Some("odd"), Some("n2"))).await,
            ids(&|r| r.model.as_deref() == Some("odd") && r.node_id.as_deref() == Some("n2"))
        );

        // Stats count a model's rows of both layouts as one.
        let stats = history.stats(&StatsQuery::default()).await.unwrap();
        let count = |model: Option<&str>| {
            stats
                .by_model
                .iter()
                .find(|m| m.model.as_deref() == model)
                .map(|m| m.total)
        };
        let expected = |model: Option<&str>| {
            Some(rows.iter().filter(|r| r.model.as_deref() == model).count() as u64)
        };
        assert_eq!(stats.by_model.len(), 3, "even, odd and none");
        for model in [Some("even"), Some("odd"), None] {
            assert_eq!(count(model), expected(model), "{model:?}");
        }
        let n0 = stats
            .by_node
            .iter()
            .find(|n| n.node_id.as_deref() == Some("n0"));
        assert_eq!(
            n0.map(|n| n.total),
            Some(
                rows.iter()
                    .filter(|r| r.node_id.as_deref() == Some("n0"))
                    .count() as u64
            )
        );
    }

    #[tokio::test]
    async fn a_database_from_before_the_batch_ranges_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let history = open(&dir, 10_000).await;
        // Over two of the backfill's 4,096-id blocks.
        for i in 0..5000 {
            history.record(record(i));
        }
        history.flush().await;
        // Back to the state before the migration: an index on ts_ms, no batch ranges.
        let pool = history.pool().unwrap();
        for sql in [
            "DELETE FROM request_keys WHERE kind = 'batch'",
            "DROP INDEX request_keys_ts",
            "CREATE INDEX requests_ts ON requests (ts_ms)",
            "DELETE FROM _sqlx_migrations WHERE description = 'batch ranges'",
        ] {
            sqlx::query(sql).execute(pool).await.unwrap();
        }
        let history = reopen(history, &dir, 10_000).await;
        assert!(
            !index_names(&history)
                .await
                .contains(&"requests_ts".to_owned())
        );
        for i in 5000..5100 {
            history.record(record(i));
        }
        history.flush().await;
        let window = |since: i64, until: i64| LogQuery {
            since: Some(1_700_000_000_000 + since),
            until: Some(1_700_000_000_000 + until),
            limit: Some(1000),
            ..LogQuery::default()
        };
        for (since, until) in [(100, 200), (4090, 4100), (4990, 5010), (5050, 6000)] {
            let rows = history.logs(&window(since, until)).await.unwrap().logs;
            let ids: Vec<_> = rows.iter().map(|r| r.record.request_id.clone()).collect();
            let expected: Vec<_> = (since..until.min(5100))
                .rev()
                .map(|i| format!("req-{i}"))
                .collect();
            assert_eq!(ids, expected, "{since}..{until}");
        }
    }

    async fn names(history: &History) -> Vec<String> {
        sqlx::query_scalar("SELECT name FROM request_names ORDER BY name")
            .fetch_all(history.pool().unwrap())
            .await
            .unwrap()
    }

    /// A history that keeps rows for an hour, with room for `capacity` queued rows. Its first
    /// pass of its own is a minute away: the tests run theirs.
    async fn open_keeping_an_hour(dir: &tempfile::TempDir, capacity: usize) -> History {
        History::open(HistoryConfig {
            path: dir.path().join("h.db"),
            retention: Some(Duration::from_secs(3600)),
            flush_interval: Duration::from_millis(10),
            queue_capacity: capacity,
            ..HistoryConfig::default()
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn retention_deletes_the_names_of_deleted_rows_and_keys_start_over() {
        let dir = tempfile::tempdir().unwrap();
        let history = open_keeping_an_hour(&dir, 10_000).await;
        let named = |i: usize, model: &str, node: &str, path: &str, ts_ms: i64| {
            let mut r = record(i);
            r.model = Some(model.into());
            r.node_id = Some(node.into());
            r.path = Cow::Owned(path.into());
            r.ts_ms = ts_ms;
            r
        };
        let old = 1_700_000_000_000; // 2023: older than an hour
        let extra = |i: usize| format!("extra-{i}");
        // An expired batch: names used again later (the chat path, "kept", "n1", ten extra
        // models), then names no later row uses, added last so that their keys are the top.
        let mut expired = vec![named(0, "kept", "n1", "/v1/chat/completions", old)];
        expired.extend((0..10).map(|i| named(1 + i, &extra(i), "n1", "/v1/chat/completions", old)));
        expired.push(named(11, "gone", "gone-node", "/v1/gone", old));
        write_all(&history, &expired).await;
        // A fresh batch using more names than the writer's per-batch list holds.
        let mut fresh = vec![named(20, "kept", "n1", "/v1/chat/completions", now_ms())];
        fresh.extend(
            (0..10).map(|i| named(21 + i, &extra(i), "n1", "/v1/chat/completions", now_ms())),
        );
        write_all(&history, &fresh).await;
        assert_eq!(names(&history).await.len(), 3 + 10 + 3);
        assert_eq!(history.apply_retention().await.unwrap(), 12);
        let mut kept: Vec<String> = ["/v1/chat/completions", "kept", "n1"]
            .into_iter()
            .map(String::from)
            .chain((0..10).map(extra))
            .collect();
        kept.sort();
        assert_eq!(
            names(&history).await,
            kept,
            "the expired row's own names went"
        );

        // New names take the deleted ones' keys; the names met again get keys of their own.
        let again = [
            named(40, "new", "new-node", "/v1/new", now_ms()),
            named(41, "gone", "gone-node", "/v1/gone", now_ms()),
            named(42, "kept", "n1", "/v1/chat/completions", now_ms()),
        ];
        write_all(&history, &again).await;
        let rows = all_rows(&history, LogQuery::default()).await;
        let expected: Vec<_> = fresh.iter().chain(&again).rev().cloned().collect();
        assert_eq!(rows, expected);
        let by_view: Vec<(Option<String>, Option<String>, String)> =
            sqlx::query_as("SELECT model, node_id, path FROM request_log ORDER BY id")
                .fetch_all(history.pool().unwrap())
                .await
                .unwrap();
        let written: Vec<_> = fresh
            .iter()
            .chain(&again)
            .map(|r| {
                (
                    name_text(&r.model),
                    name_text(&r.node_id),
                    r.path.to_string(),
                )
            })
            .collect();
        assert_eq!(by_view, written);
    }

    #[tokio::test]
    async fn a_name_deleted_by_another_router_is_looked_up_again() {
        let dir = tempfile::tempdir().unwrap();
        let history = open(&dir, 100).await;
        write_all(&history, &[record(1)]).await;
        // Another router on the same file deleted "odd" (its rows gone there) and gave its key
        // to a name of its own, and deleted "n1"; this writer still holds their old keys.
        let pool = history.pool().unwrap();
        for sql in [
            "DELETE FROM requests",
            "UPDATE request_names SET name = 'taken' WHERE name = 'odd'",
            "DELETE FROM request_names WHERE name = 'n1'",
        ] {
            sqlx::query(sql).execute(pool).await.unwrap();
        }
        write_all(&history, &[record(3), record(4)]).await;
        assert_eq!(history.dropped(), 0);
        let rows = all_rows(&history, LogQuery::default()).await;
        assert_eq!(
            rows,
            [record(4), record(3)],
            "named as written, not 'taken' or nothing"
        );
    }

    /// `chattr +i` on the database and its WAL: writes fail with EPERM even through
    /// descriptors already open, root included (see the end-to-end test of a read-only
    /// database). Not on the `-shm` file: SQLite maps it into memory, where a write fault is a
    /// SIGBUS, and with it writable SQLite can still open the database, read-only. Taken off
    /// when dropped, so that a failing test leaves no file that cannot be deleted.
    struct Immutable(Vec<std::path::PathBuf>);

    impl Immutable {
        fn set(dir: &tempfile::TempDir) -> Self {
            let files = ["h.db", "h.db-wal"].map(|name| dir.path().join(name));
            let mut guard = Self(Vec::new());
            for file in files.into_iter().filter(|f| f.exists()) {
                let status = std::process::Command::new("chattr")
                    .arg("+i")
                    .arg(&file)
                    .status()
                    .expect("chattr (e2fsprogs) is installed by scripts/setup.sh");
                assert!(
                    status.success(),
                    "chattr on {} failed: this test needs root and a filesystem with the \
                     immutable attribute (ext4, xfs, btrfs; not tmpfs)",
                    file.display()
                );
                guard.0.push(file);
            }
            assert_eq!(guard.0.len(), 2, "the database and its WAL are there");
            guard
        }
    }

    impl Drop for Immutable {
        fn drop(&mut self) {
            for file in &self.0 {
                let _ = std::process::Command::new("chattr")
                    .arg("-i")
                    .arg(file)
                    .status();
            }
        }
    }

    #[tokio::test]
    async fn a_failed_name_prune_leaves_the_next_batch_a_working_connection() {
        let dir = tempfile::tempdir().unwrap();
        let history = open(&dir, 100).await;
        write_all(&history, &[record(1)]).await;
        // Its rows gone (as another router's retention would), its names are the prune's.
        sqlx::query("DELETE FROM requests")
            .execute(history.pool().unwrap())
            .await
            .unwrap();
        let immutable = Immutable::set(&dir);
        // A batch fails and closes its connection; the prune opens one while the file
        // refuses writes, which SQLite opens read-only.
        write_all(&history, &[record(2)]).await;
        let pruned = history.prune_names().await;
        drop(immutable);
        assert_eq!(history.dropped(), 1, "the batch in the fault failed");
        assert_eq!(pruned, 0, "the prune failed");
        assert_eq!(names(&history).await.len(), 3, "no name was deleted");
        write_all(&history, &[record(3)]).await;
        assert_eq!(
            history.dropped(),
            1,
            "the batch after the failed prune is written"
        );
        assert_eq!(all_rows(&history, LogQuery::default()).await, [record(3)]);
    }

    #[tokio::test]
    async fn retention_that_failed_in_a_fault_deletes_once_the_fault_clears() {
        let dir = tempfile::tempdir().unwrap();
        let history = open(&dir, 100).await;
        write_all(&history, &[record(1), record(2)]).await;
        history.shutdown(Duration::from_secs(5)).await;
        // Holds the WAL, which the last connection to close deletes: the writer thread closes
        // its own soon after the history is dropped (the writer task this test was written for
        // did not run again before the `chattr`), and a connection holds it once it has read.
        let mut keeper = <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!(
            "sqlite://{}",
            dir.path().join("h.db").display()
        ))
        .await
        .unwrap();
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM requests")
            .fetch_one(&mut keeper)
            .await
            .unwrap();
        assert_eq!(rows, 2);
        drop(history);
        // Opened while the file refuses writes, which SQLite opens read-only.
        let immutable = Immutable::set(&dir);
        let history = open_keeping_an_hour(&dir, 10_000).await;
        let failed = history.apply_retention().await;
        assert!(failed.is_err(), "{failed:?}");
        drop(immutable);
        assert_eq!(
            history.apply_retention().await.unwrap(),
            2,
            "the next pass deletes the rows past retention"
        );
        drop(keeper);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retention_of_a_million_rows_drops_no_row_written_meanwhile() {
        const EXPIRED: i64 = 1_000_000;
        let dir = tempfile::tempdir().unwrap();
        // Room for 1,000 rows (a second of them here), so that a slow disk's checkpoint does
        // not overflow it; the old DELETE beside the writer failed its batches whatever the
        // room. `retention_chunks_span_at_most_their_ids_and_skip_gaps` checks the chunking.
        let history = open_keeping_an_hour(&dir, 1000).await;
        let pool = history.pool().unwrap();
        insert_expired(pool, &[(1, EXPIRED)]).await;
        let retention = tokio::spawn({
            let history = history.clone();
            async move { history.apply_retention().await }
        });
        // New rows keep coming while the pass runs, as they would in a router.
        let mut recorded = 0;
        while !retention.is_finished() {
            history.record(RequestRecord {
                ts_ms: now_ms(),
                ..record(recorded)
            });
            recorded += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(retention.await.unwrap().unwrap(), EXPIRED as u64);
        history.flush().await;
        assert!(recorded > 0);
        assert_eq!(history.dropped(), 0, "of {recorded} rows");
        assert_eq!(history.written(), recorded as u64);
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM requests")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(
            left, recorded as i64,
            "only the rows written meanwhile are left"
        );
    }

    /// Rows of 2023 (expired for any retention) at the ids of `ranges`, in order, and one
    /// batch range over them all, which retention finds them by.
    async fn insert_expired(pool: &SqlitePool, ranges: &[(i64, i64)]) {
        for &(first, last) in ranges {
            sqlx::query(
                "WITH RECURSIVE n(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM n WHERE i < ?2) \
                 INSERT INTO requests \
                 (id, ts_ms, request_id, path, status, stream, latency_ms, client_disconnected) \
                 SELECT i, 1700000000000 + i, 'old', '', 200, 0, 1.0, 0 FROM n",
            )
            .bind(first)
            .bind(last)
            .execute(pool)
            .await
            .unwrap();
        }
        let (first, last) = (ranges[0].0, ranges[ranges.len() - 1].1);
        sqlx::query(
            "INSERT INTO request_keys (kind, key, first_id, last_id, min_ts, max_ts) \
             VALUES ('batch', '', ?1, ?2, 1700000000000 + ?1, 1700000000000 + ?2)",
        )
        .bind(first)
        .bind(last)
        .execute(pool)
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn retention_chunks_span_at_most_their_ids_and_skip_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let history = open(&dir, 16).await;
        let pool = history.pool().unwrap();
        // Expired rows at ids 1-25,000 and a million further on.
        insert_expired(pool, &[(1, 25_000), (1_000_001, 1_000_005)]).await;
        let conn = open_writer(&dir.path().join("h.db")).unwrap();
        let mut chunk = ExpireChunk {
            cutoff: now_ms(),
            after: i64::MIN,
            bound: None,
        };
        let mut deleted = Vec::new();
        loop {
            let expired = expire_chunk(&conn, chunk).unwrap();
            deleted.push(expired.deleted);
            match expired.next {
                Some(next) => chunk = next,
                None => break,
            }
        }
        assert_eq!(deleted, [10_000, 10_000, 5_000, 5, 0]);
        let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM request_keys")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(keys, 0, "the range below the oldest row left is gone");
    }

    #[tokio::test]
    async fn more_names_than_the_writer_remembers_read_back_right() {
        let dir = tempfile::tempdir().unwrap();
        let history = open(&dir, 10_000).await;
        let rows: Vec<_> = (0..MOST_NAMES_KNOWN + 300)
            .chain(0..100)
            .enumerate()
            .map(|(i, model)| {
                let mut r = record(i);
                r.model = Some(format!("model-{model}").into());
                r
            })
            .collect();
        write_all(&history, &rows).await;
        assert_eq!(history.dropped(), 0);
        let read: Vec<_> = all_rows(
            &history,
            LogQuery {
                limit: Some(1000),
                ..LogQuery::default()
            },
        )
        .await
        .into_iter()
        .map(|r| r.model)
        .collect();
        let written: Vec<_> = rows.iter().rev().map(|r| r.model.clone()).collect();
        assert_eq!(read, written);
    }

    #[tokio::test]
    async fn stats_count_errors_and_percentiles() {
        let dir = tempfile::tempdir().unwrap();
        let history = open(&dir, 10_000).await;
        for i in 0..100 {
            history.record(record(i));
        }
        history.flush().await;
        let stats = history.stats(&StatsQuery::default()).await.unwrap();
        assert_eq!((stats.total, stats.errors), (100, 10));
        assert!((stats.error_rate - 0.1).abs() < 1e-9);
        // Latencies are 1..=100 ms.
        let p = stats.latency_ms;
        assert!((p.p50.unwrap() - 50.0).abs() < 0.1, "{p:?}");
        assert!((p.p95.unwrap() - 95.0).abs() < 0.1, "{p:?}");
        assert!((p.p99.unwrap() - 99.0).abs() < 0.1, "{p:?}");
        assert_eq!(stats.by_model.len(), 2);
        assert_eq!(stats.by_node.iter().map(|n| n.total).sum::<u64>(), 100);
        let empty = history
            .stats(&StatsQuery {
                since: Some(i64::MAX - 1),
                until: None,
            })
            .await
            .unwrap();
        assert_eq!(empty.total, 0);
        assert_eq!(empty.latency_ms.p50, None);
    }

    #[test]
    fn the_queue_keeps_order_counts_rows_until_written_and_closes() {
        let queue = Queue::new(2);
        let row_id = |m: &Message| match m {
            Message::Row(r) => r.request_id.clone(),
            Message::Flush(_) => "flush".to_owned(),
            Message::PruneNames(_) => "prune".to_owned(),
            Message::Expire(..) => "expire".to_owned(),
        };
        assert!(queue.push_row(record(0)));
        assert!(queue.push_request(Message::Flush(oneshot::channel().0)));
        assert!(queue.push_row(record(1)));
        assert!(!queue.push_row(record(2)), "two rows at most");
        let mut taken = Vec::new();
        assert!(queue.take(&mut taken));
        let order: Vec<_> = taken.iter().map(row_id).collect();
        assert_eq!(order, ["req-0", "flush", "req-1"]);
        assert!(!queue.push_row(record(3)), "taken rows count until written");
        queue.rows_done(2);
        assert!(queue.push_row(record(3)));
        queue.close();
        assert!(!queue.push_row(record(4)), "closed");
        let mut rest = Vec::new();
        assert!(queue.take(&mut rest), "what came before the close");
        assert_eq!(rest.iter().map(row_id).collect::<Vec<_>>(), ["req-3"]);
        assert!(!queue.take(&mut Vec::new()), "then the writer ends");
    }

    #[tokio::test]
    async fn a_writer_that_ends_leaves_no_one_waiting() {
        let queue = Arc::new(Queue::new(10));
        let (ended, waiting) = std::sync::mpsc::channel();
        std::thread::spawn({
            let queue = queue.clone();
            move || ended.send(queue.take(&mut Vec::new()))
        });
        wait_until_the_writer_waits(&queue, WriterWait::Message);
        queue.close();
        let taken = waiting
            .recv_timeout(Duration::from_secs(5))
            .expect("a close wakes the writer");
        assert!(!taken, "closed and empty: the writer ends");

        let queue = Queue::new(10);
        let counters = Counters::default();
        let (done, answer) = oneshot::channel::<()>();
        assert!(queue.push_row(record(0)));
        assert!(queue.push_request(Message::Flush(done)));
        queue.close_and_clear(&counters);
        assert!(answer.await.is_err(), "the flush is not left waiting");
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 1);
        assert!(!queue.push_row(record(1)));
    }

    #[tokio::test]
    async fn written_rows_make_room_in_the_queue_again() {
        let dir = tempfile::tempdir().unwrap();
        let history = open(&dir, 4).await;
        for round in 0..5 {
            for i in 0..4 {
                history.record(record(round * 4 + i));
            }
            history.flush().await;
        }
        assert_eq!((history.written(), history.dropped()), (20, 0));
    }

    /// Until the writer thread blocks on the queue for `what`.
    fn wait_until_the_writer_waits(queue: &Queue, what: WriterWait) {
        let started = Instant::now();
        while queue.lock().writer != what {
            assert!(started.elapsed() < Duration::from_secs(5), "never waited");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_waiting_writer_wakes_for_the_first_row() {
        let queue = Arc::new(Queue::new(10));
        let (taken, waiting) = std::sync::mpsc::channel();
        std::thread::spawn({
            let queue = queue.clone();
            move || {
                let mut messages = Vec::new();
                queue.take(&mut messages);
                taken.send(messages.len())
            }
        });
        wait_until_the_writer_waits(&queue, WriterWait::Message);
        assert!(queue.push_row(record(0)));
        let taken = waiting.recv_timeout(Duration::from_secs(5)).expect("woken");
        assert_eq!(taken, 1);
    }

    #[test]
    fn a_request_already_taken_does_not_cut_the_next_interval_short() {
        let queue = Queue::new(10);
        assert!(queue.push_request(Message::Flush(oneshot::channel().0)));
        assert!(queue.take(&mut Vec::new()));
        assert!(queue.push_row(record(0)));
        let (started, mut taken) = (Instant::now(), Vec::new());
        queue.take_after(Duration::from_millis(100), &mut taken);
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert_eq!(taken.len(), 1);
        // A request queued before the interval starts cuts it short at once, however long.
        assert!(queue.push_request(Message::Flush(oneshot::channel().0)));
        let started = Instant::now();
        queue.take_after(Duration::MAX, &mut Vec::new());
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn a_sleeping_writer_wakes_for_a_request_or_a_close_not_for_rows() {
        for close in [false, true] {
            let queue = Arc::new(Queue::new(10));
            let (slept, waiting) = std::sync::mpsc::channel();
            std::thread::spawn({
                let queue = queue.clone();
                move || {
                    let started = Instant::now();
                    let mut messages = Vec::new();
                    queue.take_after(Duration::from_secs(60), &mut messages);
                    slept.send((started.elapsed(), messages.len()))
                }
            });
            wait_until_the_writer_waits(&queue, WriterWait::Request);
            assert!(queue.push_row(record(0)));
            assert_eq!(
                queue.lock().writer,
                WriterWait::Request,
                "a row does not wake the sleeping writer"
            );
            assert!(
                waiting.recv_timeout(Duration::from_millis(200)).is_err(),
                "a row does not cut the interval short"
            );
            if close {
                queue.close();
            } else {
                assert!(queue.push_request(Message::Flush(oneshot::channel().0)));
            }
            let (slept, taken) = waiting.recv_timeout(Duration::from_secs(5)).expect("woken");
            assert!(slept < Duration::from_secs(30), "{slept:?}");
            assert_eq!(taken, if close { 1 } else { 2 });
            assert!(!queue.lock().asked, "what was asked is taken");
        }
    }

    #[tokio::test]
    async fn a_locked_database_costs_counted_drops_and_writing_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let history = open(&dir, 4).await;
        let url = format!("sqlite://{}", dir.path().join("h.db").display());
        let mut locker = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        sqlx::query("BEGIN EXCLUSIVE")
            .execute(&mut locker)
            .await
            .unwrap();
        let started = Instant::now();
        for i in 0..50 {
            history.record(record(i));
        }
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "record() never waits"
        );
        tokio::time::timeout(Duration::from_secs(10), history.flush())
            .await
            .unwrap();
        assert_eq!(history.written(), 0);
        assert_eq!(
            history.dropped(),
            50,
            "queue-full and failed-batch rows are all counted"
        );
        sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
        history.record(record(1));
        history.flush().await;
        assert_eq!(history.written(), 1);
    }

    async fn open_with_a_minute_interval(dir: &tempfile::TempDir) -> History {
        History::open(HistoryConfig {
            path: dir.path().join("h.db"),
            retention: None,
            flush_interval: Duration::from_secs(60),
            ..HistoryConfig::default()
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_dropped_history_writes_what_it_queued_without_waiting_out_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let history = open_with_a_minute_interval(&dir).await;
        history.record(record(1));
        tokio::time::sleep(Duration::from_millis(50)).await;
        history.record(record(2));
        drop(history);
        let url = format!("sqlite://{}", dir.path().join("h.db").display());
        let mut reader = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        let rows = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM requests")
                    .fetch_one(&mut reader)
                    .await
                    .unwrap();
                if rows == 2 {
                    return rows;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("written at once, not after the 60 s interval");
        assert_eq!(rows, 2);
    }

    #[tokio::test]
    async fn a_flush_does_not_wait_out_the_flush_interval() {
        let dir = tempfile::tempdir().unwrap();
        let history = open_with_a_minute_interval(&dir).await;
        // The first row starts the writer's 60 s interval; the flush comes in the middle of it.
        history.record(record(1));
        tokio::time::sleep(Duration::from_millis(50)).await;
        history.record(record(2));
        tokio::time::timeout(Duration::from_secs(5), history.flush())
            .await
            .expect("the flush cuts the interval short");
        assert_eq!(history.written(), 2);
        // Rows recorded while the writer is busy and a flush behind them: answered too.
        for i in 3..2000 {
            history.record(record(i));
        }
        tokio::time::timeout(Duration::from_secs(10), history.flush())
            .await
            .expect("answered");
        assert_eq!(history.written(), 1999);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_row_recorded_during_shutdown_is_written_or_counted_as_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let history = open(&dir, 2_000).await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let recorder = std::thread::spawn({
            let (history, stop) = (history.clone(), stop.clone());
            move || {
                let mut sent = 0;
                while !stop.load(Ordering::Relaxed) {
                    history.record(record(sent));
                    sent += 1;
                }
                sent as u64
            }
        });
        tokio::time::timeout(Duration::from_secs(30), async {
            while history.written() == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the writer writes while rows come");
        history.shutdown(Duration::from_secs(30)).await;
        // Only what the shutdown left behind is counted here: nothing flushes after it.
        let (written, dropped) = (history.written(), history.dropped());
        stop.store(true, Ordering::Relaxed);
        let sent = recorder.join().unwrap();
        assert_eq!(
            written + history.dropped(),
            sent,
            "every row is written or counted once the shutdown returns ({written} written, {dropped} dropped then)"
        );
    }

    #[tokio::test]
    async fn a_flush_to_an_idle_writer_does_not_cut_the_next_interval_short() {
        let dir = tempfile::tempdir().unwrap();
        let history = open_with_a_minute_interval(&dir).await;
        history.flush().await;
        history.record(record(1));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(history.written(), 0, "the row waits out the interval");
        history.flush().await;
        assert_eq!(history.written(), 1);
    }

    #[tokio::test]
    async fn retention_deletes_old_rows_only() {
        let dir = tempfile::tempdir().unwrap();
        let history = open_keeping_an_hour(&dir, 10_000).await;
        let mut fresh = record(1);
        fresh.ts_ms = now_ms();
        // Three batches: 2023 (older than an hour), now, 2023 again (a long request's row).
        for row in [record(0), fresh.clone(), record(2)] {
            history.record(row);
            history.flush().await;
        }
        // And one batch holding both: its old row waits until the batch has expired whole.
        let mut mixed_fresh = record(4);
        mixed_fresh.ts_ms = now_ms();
        history.record(record(3));
        history.record(mixed_fresh);
        history.flush().await;
        let key_ranges = || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM request_keys")
                .fetch_one(history.pool().unwrap())
                .await
                .unwrap()
        };
        assert_eq!(
            key_ranges().await,
            3 * 3 + 5,
            "a batch, a model and a node range per batch; the last with two models, two nodes"
        );
        assert_eq!(history.apply_retention().await.unwrap(), 2);
        let left = history.logs(&LogQuery::default()).await.unwrap();
        let left: Vec<_> = left
            .logs
            .iter()
            .map(|r| r.record.request_id.as_str())
            .collect();
        assert_eq!(left, ["req-4", "req-3", "req-1"]);
        assert_eq!(
            key_ranges().await,
            3 * 3 + 5 - 3,
            "the first batch's ranges go with it; the third's stay above the oldest row left"
        );
        let by_model = LogQuery {
            model: Some("odd".into()),
            ..LogQuery::default()
        };
        assert_eq!(history.logs(&by_model).await.unwrap().logs.len(), 2);
    }

    #[tokio::test]
    async fn a_history_turned_off_counts_no_drops() {
        let history = History::turned_off();
        history.record(record(0));
        history.flush().await;
        assert_eq!((history.written(), history.dropped()), (0, 0));
        assert!(matches!(
            history.logs(&LogQuery::default()).await,
            Err(HistoryError::Unavailable)
        ));
    }

    #[tokio::test]
    async fn a_disabled_history_counts_drops_and_answers_unavailable() {
        let history = History::disabled();
        history.record(record(0));
        assert_eq!(history.dropped(), 1);
        history.flush().await;
        assert!(matches!(
            history.logs(&LogQuery::default()).await,
            Err(HistoryError::Unavailable)
        ));
        assert!(matches!(
            history.stats(&StatsQuery::default()).await,
            Err(HistoryError::Unavailable)
        ));
    }
}
