-- Why an answer that had started ended early on the node's side: upstream_unavailable (the
-- node's connection broke) or upstream_timeout (the node went idle). NULL when it ended well.
ALTER TABLE requests ADD COLUMN upstream_error TEXT;
