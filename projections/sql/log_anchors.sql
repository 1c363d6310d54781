-- The tables of the `log_anchors` projection (projections/src/read_models/log_anchors.rs).
-- A change here takes the next version: the projection is then rebuilt from
-- the log on start, instead of the old tables being kept.
-- schema version: 1

CREATE TABLE IF NOT EXISTS rm_log_anchors (
    from_ordinal BIGINT PRIMARY KEY,
    to_ordinal BIGINT NOT NULL,
    root TEXT NOT NULL,
    chain_id BIGINT NOT NULL,
    contract TEXT NOT NULL,
    tx_hash TEXT NOT NULL,
    block BIGINT NOT NULL,
    anchored_at TEXT NOT NULL,
    position BIGINT NOT NULL
);
