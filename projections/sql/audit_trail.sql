-- The tables of the `audit_trail` projection (projections/src/read_models/audit.rs).
-- Not versioned: the trail is never rebuilt on its own, since a rebuild would
-- re-chain a tampered log (`afyachain projections rebuild` checks it first).

CREATE TABLE IF NOT EXISTS rm_audit_trail (
    ordinal BIGINT PRIMARY KEY,
    position BIGINT NOT NULL UNIQUE,
    event_id TEXT NOT NULL,
    recorded_at TEXT NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    sequence BIGINT NOT NULL,
    event_type TEXT NOT NULL,
    event_version TEXT NOT NULL,
    actor TEXT NOT NULL,
    correlation_id TEXT,
    causation_id TEXT,
    payload TEXT NOT NULL,
    hash TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS rm_audit_trail_aggregate ON rm_audit_trail (aggregate_type, aggregate_id, ordinal);

CREATE INDEX IF NOT EXISTS rm_audit_trail_type ON rm_audit_trail (event_type, ordinal);

CREATE INDEX IF NOT EXISTS rm_audit_trail_actor ON rm_audit_trail (actor, ordinal);

CREATE INDEX IF NOT EXISTS rm_audit_trail_time ON rm_audit_trail (recorded_at);
