-- The tables of the `patient_records` projection (projections/src/read_models/patient_records.rs).
-- A change here takes the next version: the projection is then rebuilt from
-- the log on start, instead of the old tables being kept.
-- schema version: 1

CREATE TABLE IF NOT EXISTS rm_patient_records (
    record_id TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL,
    category TEXT NOT NULL,
    media_type TEXT NOT NULL,
    size BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    wrapped_key TEXT NOT NULL,
    filename_sealed TEXT,
    uploaded_at TEXT NOT NULL,
    position BIGINT NOT NULL
);

CREATE INDEX IF NOT EXISTS rm_patient_records_patient ON rm_patient_records (patient_id, position);
