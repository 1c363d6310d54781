-- The schema version each projection's read models were last built under (see
-- LogHandler::schema_version in eventstore/src/consumer.rs).
CREATE TABLE IF NOT EXISTS consumer_schemas (
    name TEXT PRIMARY KEY,
    version BIGINT NOT NULL,
    updated_at TEXT NOT NULL
);
