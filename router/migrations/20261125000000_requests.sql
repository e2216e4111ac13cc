-- One row per /v1 request.
CREATE TABLE IF NOT EXISTS requests (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_ms               INTEGER NOT NULL,
    request_id          TEXT    NOT NULL,
    path                TEXT    NOT NULL,
    model               TEXT,
    node_id             TEXT,
    status              INTEGER NOT NULL,
    stream              INTEGER NOT NULL,
    latency_ms          REAL    NOT NULL,
    ttfb_ms             REAL,
    prompt_tokens       INTEGER,
    completion_tokens   INTEGER,
    api_key_id          TEXT,
    client_disconnected INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts_ms);
CREATE INDEX IF NOT EXISTS requests_model ON requests (model, id);
CREATE INDEX IF NOT EXISTS requests_node ON requests (node_id, id);
CREATE INDEX IF NOT EXISTS requests_status ON requests (status, id);
