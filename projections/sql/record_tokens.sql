-- The tables of the `record_tokens` projection (projections/src/read_models/record_tokens.rs).
-- A change here takes the next version: the projection is then rebuilt from
-- the log on start, instead of the old tables being kept.
-- schema version: 1

CREATE TABLE IF NOT EXISTS rm_record_tokens (
    record_id TEXT PRIMARY KEY,
    chain_id BIGINT NOT NULL,
    contract TEXT NOT NULL,
    token_id TEXT NOT NULL,
    tx_hash TEXT NOT NULL,
    block BIGINT NOT NULL,
    minted_at TEXT NOT NULL,
    position BIGINT NOT NULL
);
