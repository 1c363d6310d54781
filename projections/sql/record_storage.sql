-- The tables of the `record_storage` projection (projections/src/read_models/record_storage.rs).
-- A change here takes the next version: the projection is then rebuilt from
-- the log on start, instead of the old tables being kept.
-- schema version: 1

CREATE TABLE IF NOT EXISTS rm_record_blobs (
    record_id TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    log_tx BIGINT NOT NULL,
    position BIGINT NOT NULL
);

CREATE INDEX IF NOT EXISTS rm_record_blobs_log ON rm_record_blobs (log_tx, position);

CREATE TABLE IF NOT EXISTS rm_record_replicas (
    record_id TEXT NOT NULL,
    backend TEXT NOT NULL,
    object_key TEXT NOT NULL,
    etag TEXT,
    stored_at TEXT NOT NULL,
    position BIGINT NOT NULL,
    PRIMARY KEY (record_id, backend)
);
