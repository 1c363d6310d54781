-- The tables of the `access_requests` projection (projections/src/read_models/access_requests.rs).
-- A change here takes the next version: the projection is then rebuilt from
-- the log on start, instead of the old tables being kept.
-- schema version: 1

CREATE TABLE IF NOT EXISTS rm_access_requests (
    request_id TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL,
    doctor_id TEXT NOT NULL,
    status TEXT NOT NULL,
    scope TEXT NOT NULL,
    purpose_sealed TEXT NOT NULL,
    duration_days BIGINT NOT NULL,
    requested_at TEXT NOT NULL,
    decided_at TEXT,
    expires_at TEXT,
    closed_at TEXT,
    position BIGINT NOT NULL
);

CREATE INDEX IF NOT EXISTS rm_access_requests_patient ON rm_access_requests (patient_id, status, position);

CREATE INDEX IF NOT EXISTS rm_access_requests_doctor ON rm_access_requests (doctor_id, position);
