-- A row's path, model and node as integer keys into `request_names` instead of text: SQLite
-- copies every text value it is bound (and sqlx copies it once more on its way there), and the
-- three names were most of a row's text. In a loop of rows shaped like the router's (256-row
-- INSERTs, 2,048 rows a transaction, WAL), a row cost 1.22 us against 1.41 with the names as text.
-- Rows written before keep their names as text (`path`, `model`, `node_id`, their keys NULL);
-- rows written after have `path` '' and `model`, `node_id` NULL. Read both through
-- `request_log`, or as its queries in the router do: `coalesce(name, text)`.
-- A name is kept while a row names it: `last_id` is the last row of the newest batch that
-- used it, and retention deletes the names whose `last_id` is below the oldest row left
-- (clients choose models and paths, so names must not outlive the rows they came with).
CREATE TABLE IF NOT EXISTS request_names (
    id      INTEGER PRIMARY KEY,
    name    TEXT NOT NULL UNIQUE,
    last_id INTEGER NOT NULL DEFAULT 0
);
ALTER TABLE requests ADD COLUMN path_key INTEGER;
ALTER TABLE requests ADD COLUMN model_key INTEGER;
ALTER TABLE requests ADD COLUMN node_key INTEGER;
-- Every row with its names, however it was written: for reading the history by hand.
CREATE VIEW IF NOT EXISTS request_log AS
SELECT r.id, r.ts_ms, r.request_id,
       coalesce(p.name, r.path) AS path,
       coalesce(m.name, r.model) AS model,
       coalesce(n.name, r.node_id) AS node_id,
       r.status, r.stream, r.latency_ms, r.ttfb_ms, r.prompt_tokens, r.completion_tokens,
       r.api_key_id, r.client_disconnected, r.upstream_error
FROM requests r
LEFT JOIN request_names p ON p.id = r.path_key
LEFT JOIN request_names m ON m.id = r.model_key
LEFT JOIN request_names n ON n.id = r.node_key;
