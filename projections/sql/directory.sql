-- The tables of the `directory` projection (projections/src/read_models/directory.rs).
-- A change here takes the next version: the projection is then rebuilt from
-- the log on start, instead of the old tables being kept.
-- schema version: 1

CREATE TABLE IF NOT EXISTS rm_patients (
    patient_id TEXT PRIMARY KEY,
    phone_index TEXT NOT NULL,
    registered_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS rm_patients_phone ON rm_patients (phone_index);

CREATE TABLE IF NOT EXISTS rm_patient_wallets (
    wallet_index TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS rm_doctors (
    doctor_id TEXT PRIMARY KEY,
    phone_index TEXT NOT NULL,
    licence TEXT NOT NULL,
    status TEXT NOT NULL,
    registered_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS rm_doctors_phone ON rm_doctors (phone_index);

-- A patient's current share code, by its keyed hash (never the code).
CREATE TABLE IF NOT EXISTS rm_share_codes (
    code_index TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL UNIQUE,
    expires_at TEXT NOT NULL,
    position BIGINT NOT NULL
);
