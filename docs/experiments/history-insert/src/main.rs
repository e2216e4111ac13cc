// Instructions a row for the router's history INSERT shape: sqlx (one SqliteArguments per
// 256-row statement) against rusqlite (a cached 256-row statement, values bound directly).
use sqlx::sqlite::{SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Arguments, Connection};

const SCHEMA: &str = "CREATE TABLE requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts_ms INTEGER NOT NULL, request_id TEXT NOT NULL,
    path TEXT NOT NULL, model TEXT, node_id TEXT, status INTEGER NOT NULL, stream INTEGER NOT NULL,
    latency_ms REAL NOT NULL, ttfb_ms REAL, prompt_tokens INTEGER, completion_tokens INTEGER,
    api_key_id TEXT, client_disconnected INTEGER NOT NULL, upstream_error TEXT,
    path_key INTEGER, model_key INTEGER, node_key INTEGER);
CREATE INDEX requests_errors ON requests (status, id) WHERE status >= 400;";

const ROWS: usize = 256;
const BATCHES_PER_TX: usize = 8;

fn sql() -> String {
    let mut sql = String::from(
        "INSERT OR FAIL INTO requests (ts_ms, request_id, path, status, stream, latency_ms, ttfb_ms, \
         prompt_tokens, completion_tokens, api_key_id, client_disconnected, upstream_error, \
         path_key, model_key, node_key) VALUES ",
    );
    for r in 0..ROWS {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push_str("(?, ?, '', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
    }
    sql
}

fn id(i: usize) -> String {
    format!("rtr-0123456789ab-{i:08x}")
}

async fn with_sqlx(path: &str, txs: usize) {
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal);
    let mut conn = sqlx::SqliteConnection::connect_with(&opts).await.unwrap();
    sqlx::raw_sql(SCHEMA).execute(&mut conn).await.unwrap();
    let sql = sql();
    let mut n = 0;
    for _ in 0..txs {
        let mut tx = conn.begin().await.unwrap();
        for _ in 0..BATCHES_PER_TX {
            let mut v = SqliteArguments::default();
            v.reserve(ROWS * 14, 0);
            for _ in 0..ROWS {
                n += 1;
                v.add(n as i64).unwrap();
                v.add(id(n)).unwrap();
                v.add(200i64).unwrap();
                v.add(false).unwrap();
                v.add(1.25f64).unwrap();
                v.add(Some(0.5f64)).unwrap();
                v.add(Some(12i64)).unwrap();
                v.add(Some(34i64)).unwrap();
                v.add(None::<String>).unwrap();
                v.add(false).unwrap();
                v.add(None::<String>).unwrap();
                v.add(1i64).unwrap();
                v.add(Some(2i64)).unwrap();
                v.add(Some(3i64)).unwrap();
            }
            sqlx::query_with(&sql, v).execute(&mut *tx).await.unwrap();
        }
        tx.commit().await.unwrap();
    }
}

fn with_rusqlite(path: &str, txs: usize) {
    let mut conn = rusqlite::Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", "wal").unwrap();
    conn.pragma_update(None, "synchronous", "normal").unwrap();
    conn.execute_batch(SCHEMA).unwrap();
    let sql = sql();
    let mut n = 0;
    for _ in 0..txs {
        let tx = conn.transaction().unwrap();
        {
            let mut st = tx.prepare_cached(&sql).unwrap();
            for _ in 0..BATCHES_PER_TX {
                let mut p = 1;
                for _ in 0..ROWS {
                    n += 1;
                    st.raw_bind_parameter(p, n as i64).unwrap();
                    st.raw_bind_parameter(p + 1, id(n)).unwrap();
                    st.raw_bind_parameter(p + 2, 200i64).unwrap();
                    st.raw_bind_parameter(p + 3, false).unwrap();
                    st.raw_bind_parameter(p + 4, 1.25f64).unwrap();
                    st.raw_bind_parameter(p + 5, Some(0.5f64)).unwrap();
                    st.raw_bind_parameter(p + 6, Some(12i64)).unwrap();
                    st.raw_bind_parameter(p + 7, Some(34i64)).unwrap();
                    st.raw_bind_parameter(p + 8, None::<String>).unwrap();
                    st.raw_bind_parameter(p + 9, false).unwrap();
                    st.raw_bind_parameter(p + 10, None::<String>).unwrap();
                    st.raw_bind_parameter(p + 11, 1i64).unwrap();
                    st.raw_bind_parameter(p + 12, Some(2i64)).unwrap();
                    st.raw_bind_parameter(p + 13, Some(3i64)).unwrap();
                    p += 14;
                }
                st.raw_execute().unwrap();
            }
        }
        tx.commit().unwrap();
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let txs: usize = args[3].parse().unwrap();
    match args[1].as_str() {
        "sqlx" => with_sqlx(&args[2], txs).await,
        _ => with_rusqlite(&args[2], txs),
    }
}
