-- The tables of the `payments` projection (projections/src/read_models/payments.rs).
-- A change here takes the next version: the projection is then rebuilt from
-- the log on start, instead of the old tables being kept.
-- schema version: 1

CREATE TABLE IF NOT EXISTS rm_payments (
    payment_id TEXT PRIMARY KEY,
    payer TEXT NOT NULL,
    patient_id TEXT,
    doctor_id TEXT,
    access_request_id TEXT,
    purpose TEXT NOT NULL,
    amount_kes BIGINT NOT NULL,
    status TEXT NOT NULL,
    checkout_request_id TEXT,
    merchant_request_id TEXT,
    mpesa_receipt TEXT,
    result_code BIGINT,
    result_desc TEXT,
    requested_at TEXT NOT NULL,
    pushed_at TEXT,
    settled_at TEXT,
    position BIGINT NOT NULL
);

CREATE INDEX IF NOT EXISTS rm_payments_checkout ON rm_payments (checkout_request_id);

CREATE INDEX IF NOT EXISTS rm_payments_patient ON rm_payments (patient_id, position);

CREATE INDEX IF NOT EXISTS rm_payments_doctor ON rm_payments (doctor_id, position);

CREATE TABLE IF NOT EXISTS rm_mpesa_rejected_callbacks (
    position BIGINT PRIMARY KEY,
    checkout_request_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    result_code BIGINT NOT NULL,
    mpesa_receipt TEXT,
    amount_kes BIGINT,
    payment_id TEXT,
    recorded_at TEXT NOT NULL
);
