-- The tables of the `webhooks` projection (projections/src/read_models/webhooks.rs).
-- A change here takes the next version: the projection is then rebuilt from
-- the log on start, instead of the old tables being kept.
-- schema version: 1

CREATE TABLE IF NOT EXISTS rm_webhooks (
    webhook_id TEXT PRIMARY KEY,
    integrator_id TEXT NOT NULL,
    url_sealed TEXT NOT NULL,
    types TEXT NOT NULL,
    secret_sealed TEXT NOT NULL,
    registered_at TEXT NOT NULL,
    tx BIGINT NOT NULL,
    position BIGINT NOT NULL,
    disabled_at TEXT
);

CREATE INDEX IF NOT EXISTS rm_webhooks_integrator ON rm_webhooks (integrator_id, position);
