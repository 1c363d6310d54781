-- The tables of the `doctor_profiles` projection (projections/src/read_models/doctor_profiles.rs).
-- A change here takes the next version: the projection is then rebuilt from
-- the log on start, instead of the old tables being kept.
-- schema version: 1

CREATE TABLE IF NOT EXISTS rm_doctor_profiles (
    doctor_id TEXT PRIMARY KEY,
    personal_sealed TEXT NOT NULL,
    licence TEXT NOT NULL,
    status TEXT NOT NULL,
    registered_at TEXT NOT NULL,
    position BIGINT NOT NULL
);

CREATE INDEX IF NOT EXISTS rm_doctor_profiles_status ON rm_doctor_profiles (status, position);
