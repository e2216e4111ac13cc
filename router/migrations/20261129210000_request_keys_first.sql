-- Retention deletes the ranges below the oldest row left; by `first_id` it finds them without
-- reading the whole table (one row per batch and key: millions over weeks).
CREATE INDEX IF NOT EXISTS request_keys_first ON request_keys (first_id);
