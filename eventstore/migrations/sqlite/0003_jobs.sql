-- The one job queue of every worker (see eventstore/src/jobs.rs).
CREATE TABLE IF NOT EXISTS jobs (
    worker TEXT NOT NULL,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    event_id TEXT,
    payload TEXT,
    position BIGINT NOT NULL,
    state TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    next_attempt_at BIGINT NOT NULL,
    last_error TEXT,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (worker, kind, subject)
);

CREATE INDEX IF NOT EXISTS jobs_due ON jobs (worker, state, next_attempt_at);
