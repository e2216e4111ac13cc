-- Each written batch's id range and time range, as a `request_keys` row of kind 'batch' (key
-- ''), instead of an index entry per row on `ts_ms`: in a loop of rows shaped like the router's
-- (256-row INSERTs, 2,048 rows a transaction, WAL, names as keys), a row cost 1.02 us without
-- that index against 1.21 with it. Time windows (`since`, `until`) in /api/logs and /api/stats
-- and the retention pass find their rows' ids through these ranges.
-- Rows written before, in ranges of 4,096 ids.
INSERT OR IGNORE INTO request_keys (kind, key, first_id, last_id, min_ts, max_ts)
    SELECT 'batch', '', min(id), max(id), min(ts_ms), max(ts_ms) FROM requests
    GROUP BY id / 4096;
-- Batches by their newest row's time: a window's batches are those with `max_ts >= since`, and
-- retention's those with `max_ts` before its cutoff. (Over every kind: a few entries a batch.)
CREATE INDEX IF NOT EXISTS request_keys_ts ON request_keys (kind, max_ts);
DROP INDEX IF EXISTS requests_ts;
