//! The replicator's work list, `storage_jobs`: one row per record still to copy to a
//! backend, with its attempts, when to try next and its last error. A row is created
//! from the `record_storage` read model (intake), deleted once `RecordStored` is
//! recorded, and marked `dead` after too many failures of that blob alone; operators
//! see dead letters with `afyachain consumers status` and requeue them with
//! `afyachain consumers retry storage`.
//!
//! This is the adapter's delivery state, like a checkpoint, not a read model: what was
//! stored is known only from `RecordStored` events.

use anyhow::Context;
use eventstore::LogCursor;
use serde::Serialize;
use sqlx::AnyPool;

/// The projection whose checkpoint bounds the intake.
pub const SOURCE_PROJECTION: &str = "record_storage";

pub fn schema() -> [&'static str; 2] {
    [
        "CREATE TABLE IF NOT EXISTS storage_jobs (
            record_id TEXT NOT NULL,
            backend TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            size BIGINT NOT NULL,
            position BIGINT NOT NULL,
            state TEXT NOT NULL,
            attempts BIGINT NOT NULL,
            next_attempt_at BIGINT NOT NULL,
            last_error TEXT,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (record_id, backend)
        )",
        "CREATE INDEX IF NOT EXISTS storage_jobs_due \
         ON storage_jobs (backend, state, next_attempt_at)",
    ]
}

pub async fn ensure_schema(pool: &AnyPool) -> anyhow::Result<()> {
    for statement in schema() {
        sqlx::query(statement)
            .execute(pool)
            .await
            .context("creating the storage job table")?;
    }
    Ok(())
}

fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// The checkpoint of the `record_storage` projection: every upload up to it is in
/// `rm_record_blobs` (the rows and the checkpoint commit together).
pub async fn source_checkpoint(pool: &AnyPool) -> anyhow::Result<LogCursor> {
    let row: Option<(i64, i64)> =
        sqlx::query_as("SELECT tx, position FROM consumer_checkpoints WHERE name = $1")
            .bind(SOURCE_PROJECTION)
            .fetch_optional(pool)
            .await
            .context("reading the record_storage checkpoint")?;
    Ok(row
        .map(|(tx, position)| LogCursor { tx, position })
        .unwrap_or(LogCursor::START))
}

/// Queues every upload in `(after, upto]` (log order) that `backend` does not hold.
/// Idempotent: a record already queued keeps its row.
pub async fn intake(
    pool: &AnyPool,
    backend: &str,
    after: LogCursor,
    upto: LogCursor,
) -> anyhow::Result<u64> {
    let done = sqlx::query(
        "INSERT INTO storage_jobs (record_id, backend, sha256, size, position, state, attempts, \
         next_attempt_at, last_error, updated_at) \
         SELECT b.record_id, $1, b.sha256, b.size, b.position, 'pending', 0, 0, NULL, $6 \
         FROM rm_record_blobs b LEFT JOIN rm_record_replicas r \
         ON r.record_id = b.record_id AND r.backend = $1 \
         WHERE r.record_id IS NULL \
         AND (b.log_tx > $2 OR (b.log_tx = $2 AND b.position > $3)) \
         AND (b.log_tx < $4 OR (b.log_tx = $4 AND b.position <= $5)) \
         ON CONFLICT (record_id, backend) DO NOTHING",
    )
    .bind(backend.to_owned())
    .bind(after.tx)
    .bind(after.position)
    .bind(upto.tx)
    .bind(upto.position)
    .bind(now_text())
    .execute(pool)
    .await
    .context("queueing uploads for replication")?;
    Ok(done.rows_affected())
}

/// A blob to copy.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct Job {
    pub record_id: String,
    pub sha256: String,
    pub size: i64,
    pub attempts: i64,
}

/// Pending jobs whose time has come, oldest first.
pub async fn due(
    pool: &AnyPool,
    backend: &str,
    now_ms: i64,
    limit: i64,
) -> anyhow::Result<Vec<Job>> {
    sqlx::query_as(
        "SELECT record_id, sha256, size, attempts FROM storage_jobs \
         WHERE backend = $1 AND state = 'pending' AND next_attempt_at <= $2 \
         ORDER BY next_attempt_at, position LIMIT $3",
    )
    .bind(backend.to_owned())
    .bind(now_ms)
    .bind(limit)
    .fetch_all(pool)
    .await
    .context("reading due storage jobs")
}

/// The blob is stored and `RecordStored` recorded: the job is over.
pub async fn finish(pool: &AnyPool, backend: &str, record_id: &str) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM storage_jobs WHERE record_id = $1 AND backend = $2")
        .bind(record_id.to_owned())
        .bind(backend.to_owned())
        .execute(pool)
        .await
        .context("finishing a storage job")?;
    Ok(())
}

/// Records a failed attempt; `dead` moves the job to the dead-letter list.
pub async fn fail(
    pool: &AnyPool,
    backend: &str,
    record_id: &str,
    attempts: i64,
    next_attempt_at: i64,
    error: &str,
    dead: bool,
) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE storage_jobs SET attempts = $1, next_attempt_at = $2, last_error = $3, \
         state = $4, updated_at = $5 WHERE record_id = $6 AND backend = $7",
    )
    .bind(attempts)
    .bind(next_attempt_at)
    .bind(error.to_owned())
    .bind(if dead { "dead" } else { "pending" })
    .bind(now_text())
    .bind(record_id.to_owned())
    .bind(backend.to_owned())
    .execute(pool)
    .await
    .context("recording a failed storage attempt")?;
    Ok(())
}

/// Puts a job off without counting an attempt: the remote store as a whole is down,
/// which is no fault of this blob.
pub async fn postpone(
    pool: &AnyPool,
    backend: &str,
    record_id: &str,
    next_attempt_at: i64,
    error: &str,
) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE storage_jobs SET next_attempt_at = $1, last_error = $2, updated_at = $3 \
         WHERE record_id = $4 AND backend = $5 AND state = 'pending'",
    )
    .bind(next_attempt_at)
    .bind(error.to_owned())
    .bind(now_text())
    .bind(record_id.to_owned())
    .bind(backend.to_owned())
    .execute(pool)
    .await
    .context("postponing a storage job")?;
    Ok(())
}

/// How many jobs wait, per backend and state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Count {
    pub backend: String,
    pub state: String,
    pub jobs: i64,
}

pub async fn counts(pool: &AnyPool) -> anyhow::Result<Vec<Count>> {
    sqlx::query_as(
        "SELECT backend, state, COUNT(*) AS jobs FROM storage_jobs \
         GROUP BY backend, state ORDER BY backend, state",
    )
    .fetch_all(pool)
    .await
    .context("counting storage jobs")
}

/// A job in the dead-letter list, or a pending one that has failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Troubled {
    pub record_id: String,
    pub backend: String,
    pub sha256: String,
    pub state: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub updated_at: String,
}

/// Dead letters and failing pending jobs, dead ones first.
pub async fn troubled(pool: &AnyPool, limit: i64) -> anyhow::Result<Vec<Troubled>> {
    sqlx::query_as(
        "SELECT record_id, backend, sha256, state, attempts, last_error, updated_at \
         FROM storage_jobs WHERE state = 'dead' OR last_error IS NOT NULL \
         ORDER BY state, position LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await
    .context("listing failing storage jobs")
}

/// Requeues dead letters (all of them, or those of `record_ids`) with a fresh count of
/// attempts. Returns how many were requeued.
pub async fn retry(pool: &AnyPool, record_ids: &[String]) -> anyhow::Result<u64> {
    let sql = "UPDATE storage_jobs SET state = 'pending', attempts = 0, next_attempt_at = 0, \
               updated_at = $1 WHERE state = 'dead'";
    if record_ids.is_empty() {
        let done = sqlx::query(sql)
            .bind(now_text())
            .execute(pool)
            .await
            .context("requeueing dead letters")?;
        return Ok(done.rows_affected());
    }
    let mut requeued = 0;
    for id in record_ids {
        let done = sqlx::query(&format!("{sql} AND record_id = $2"))
            .bind(now_text())
            .bind(id.to_owned())
            .execute(pool)
            .await
            .context("requeueing a dead letter")?;
        requeued += done.rows_affected();
    }
    Ok(requeued)
}
