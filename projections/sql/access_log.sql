-- The tables of the `access_log` projection (projections/src/read_models/access_log.rs).
-- A change here takes the next version: the projection is then rebuilt from
-- the log on start, instead of the old tables being kept.
-- schema version: 1

CREATE TABLE IF NOT EXISTS rm_access_log (
    position BIGINT PRIMARY KEY,
    event_id TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    record_id TEXT NOT NULL,
    accessor TEXT NOT NULL,
    request_id TEXT,
    category TEXT NOT NULL,
    accessed_at TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS rm_access_log_patient ON rm_access_log (patient_id, position);
