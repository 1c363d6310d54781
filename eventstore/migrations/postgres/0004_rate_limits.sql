-- The API's attempt limits (see eventstore/src/counters.rs); earlier versions created
-- this table on start.
CREATE TABLE IF NOT EXISTS rate_limits (
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    window_start BIGINT NOT NULL,
    hits BIGINT NOT NULL,
    PRIMARY KEY (bucket, key)
);
