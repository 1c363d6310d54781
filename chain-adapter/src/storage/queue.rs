//! The replicator's work: one job per record still to copy to a backend, in the job
//! queue every worker shares ([`eventstore::jobs`], worker `storage`, kind the backend,
//! subject the record). A job is queued from the `record_storage` read model (intake),
//! deleted once `RecordStored` is recorded, and made a dead letter after too many
//! failures of that blob alone; operators see dead letters with `afyachain consumers
//! status` and requeue them with `afyachain consumers retry storage`.
//!
//! This is the adapter's delivery state, like a checkpoint, not a read model: what was
//! stored is known only from `RecordStored` events.

use anyhow::Context;
use eventstore::jobs::{self, Outcome};
use eventstore::{LogCursor, Store};
use serde::Serialize;
use sqlx::AnyPool;

/// The projection whose checkpoint bounds the intake.
pub const SOURCE_PROJECTION: &str = "record_storage";

/// The replicator's name in the job queue.
pub const WORKER: &str = "storage";

/// Moves the work list of versions before the shared queue (`storage_jobs`) into it.
pub async fn ensure_schema(store: &Store) -> anyhow::Result<()> {
    jobs::adopt(
        store.any_pool(),
        store.backend(),
        "storage_jobs",
        "SELECT 'storage', backend, record_id, NULL, \
         '{\"sha256\":\"' || sha256 || '\",\"size\":' || CAST(size AS TEXT) || '}', \
         position, state, attempts, next_attempt_at, last_error, updated_at FROM storage_jobs",
    )
    .await?;
    Ok(())
}

/// The checkpoint of the `record_storage` projection: every upload up to it is in
/// `rm_record_blobs` (the rows and the checkpoint commit together).
pub async fn source_checkpoint(pool: &AnyPool) -> anyhow::Result<LogCursor> {
    Ok(eventstore::consumer::checkpoint_of(pool, SOURCE_PROJECTION)
        .await
        .context("reading the record_storage checkpoint")?
        .unwrap_or(LogCursor::START))
}

/// Queues every upload in `(after, upto]` (log order) that `backend` does not hold.
/// Idempotent: a record already queued keeps its job.
pub async fn intake(
    pool: &AnyPool,
    backend: &str,
    after: LogCursor,
    upto: LogCursor,
) -> anyhow::Result<u64> {
    // $1–$4 the range; $6 is the job's kind, the backend.
    jobs::enqueue_select(
        pool,
        WORKER,
        backend,
        "SELECT b.record_id AS subject, NULL AS event_id, \
         '{\"sha256\":\"' || b.sha256 || '\",\"size\":' || CAST(b.size AS TEXT) || '}' \
         AS payload, b.position AS position \
         FROM rm_record_blobs b LEFT JOIN rm_record_replicas r \
         ON r.record_id = b.record_id AND r.backend = $6 \
         WHERE r.record_id IS NULL \
         AND (b.log_tx > $1 OR (b.log_tx = $1 AND b.position > $2)) \
         AND (b.log_tx < $3 OR (b.log_tx = $3 AND b.position <= $4))",
        &[after.tx, after.position, upto.tx, upto.position],
    )
    .await
    .context("queueing uploads for replication")
}

/// A blob to copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub record_id: String,
    pub sha256: String,
    pub size: i64,
    pub attempts: i64,
    job: jobs::Job,
}

#[derive(serde::Deserialize)]
struct Payload {
    sha256: String,
    size: i64,
}

impl TryFrom<jobs::Job> for Job {
    type Error = anyhow::Error;

    fn try_from(job: jobs::Job) -> anyhow::Result<Job> {
        let payload: Payload = serde_json::from_str(job.payload.as_deref().unwrap_or_default())
            .with_context(|| format!("the storage job of record {} is unreadable", job.subject))?;
        Ok(Job {
            record_id: job.subject.clone(),
            sha256: payload.sha256,
            size: payload.size,
            attempts: job.attempts,
            job,
        })
    }
}

/// Pending jobs of `backend` whose time has come, oldest first.
pub async fn due(pool: &AnyPool, backend: &str, limit: i64) -> anyhow::Result<Vec<Job>> {
    jobs::due(pool, WORKER, Some(backend), limit)
        .await?
        .into_iter()
        .map(Job::try_from)
        .collect()
}

/// The blob is stored and `RecordStored` recorded: the job is over.
pub async fn finish(pool: &AnyPool, job: &Job) -> anyhow::Result<()> {
    jobs::finish(pool, &job.job).await
}

/// Records a failed attempt; `dead` moves the job to the dead-letter list.
pub async fn fail(
    pool: &AnyPool,
    job: &Job,
    attempts: i64,
    next_attempt_at: i64,
    error: &str,
    dead: bool,
) -> anyhow::Result<()> {
    let state = if dead { "dead" } else { "pending" };
    let outcome = Outcome {
        state,
        attempts,
        next_attempt_at,
        error,
    };
    jobs::record(pool, &job.job, &outcome).await?;
    Ok(())
}

/// Puts a job off without counting an attempt: the remote store as a whole is down,
/// which is no fault of this blob.
pub async fn postpone(
    pool: &AnyPool,
    job: &Job,
    next_attempt_at: i64,
    error: &str,
) -> anyhow::Result<()> {
    let outcome = Outcome {
        state: "pending",
        attempts: job.attempts,
        next_attempt_at,
        error,
    };
    jobs::record(pool, &job.job, &outcome).await?;
    Ok(())
}

/// How many jobs wait, per backend and state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Count {
    pub backend: String,
    pub state: String,
    pub jobs: i64,
}

pub async fn counts(pool: &AnyPool) -> anyhow::Result<Vec<Count>> {
    Ok(jobs::counts(pool)
        .await?
        .into_iter()
        .filter(|c| c.worker == WORKER)
        .map(|c| Count {
            backend: c.kind,
            state: c.state,
            jobs: c.jobs,
        })
        .collect())
}
