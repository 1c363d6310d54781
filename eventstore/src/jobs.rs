//! The one job queue of every worker: a row per piece of external work still to do
//! (a blob to copy, a transaction to send, a payment to push), in the `jobs` table
//! (migration `0003_jobs.sql`).
//!
//! A job is named by its worker (`storage`, `chain`, `mpesa`), its kind within that
//! worker (a storage backend; `grant`, `mint`, `anchor`…; `push`) and its subject (a
//! record, a request, a payment): queueing it twice keeps one row. Its state is
//! `pending` (due at `next_attempt_at`, Unix milliseconds), `dead` (a dead letter,
//! after too many failures of its own, until an operator requeues it with
//! `afyachain consumers retry WORKER`), or a worker's own state while it is out (the
//! M-Pesa worker's `sending`). It is deleted when done.
//!
//! This is delivery state, like a checkpoint, not a read model: what was done is known
//! from the events the worker records, and a job is queued from the log (or a read
//! model) in the same transaction that moves the queueing consumer's checkpoint.

use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use sqlx::{Any, AnyPool, Executor};

use crate::store::Backend;

/// A job as a worker reads it.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow, Serialize)]
pub struct Job {
    pub worker: String,
    pub kind: String,
    pub subject: String,
    /// The event the job came from, when there is one.
    pub event_id: Option<String>,
    /// What the worker needs besides the subject (JSON text), when anything.
    pub payload: Option<String>,
    /// The log position it came from: due jobs are taken in this order.
    pub position: i64,
    pub state: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub updated_at: String,
}

/// A job to queue.
#[derive(Clone, Debug, Default)]
pub struct NewJob<'a> {
    pub worker: &'a str,
    pub kind: &'a str,
    pub subject: &'a str,
    pub event_id: Option<&'a str>,
    pub payload: Option<&'a str>,
    pub position: i64,
}

const COLUMNS: &str = "worker, kind, subject, event_id, payload, position, state, attempts, \
                       next_attempt_at, last_error, updated_at";

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// `base` doubled for every attempt after the first, at most `max`.
pub fn backoff(base: Duration, max: Duration, attempts: i64) -> Duration {
    let exponent = u32::try_from(attempts.saturating_sub(1).clamp(0, 20)).unwrap_or(20);
    base.saturating_mul(2u32.saturating_pow(exponent)).min(max)
}

/// Milliseconds from now after `pause`, as `next_attempt_at` holds them.
pub fn after(pause: Duration) -> i64 {
    now_ms().saturating_add(i64::try_from(pause.as_millis()).unwrap_or(i64::MAX / 2))
}

/// Queues `job` (pending, due at once) unless it is queued already. `true`: queued now.
pub async fn enqueue<'e, E>(executor: E, job: &NewJob<'_>) -> anyhow::Result<bool>
where
    E: Executor<'e, Database = Any>,
{
    let done = sqlx::query(&format!(
        "INSERT INTO jobs ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, 0, NULL, $7) \
         ON CONFLICT (worker, kind, subject) DO NOTHING"
    ))
    .bind(job.worker.to_owned())
    .bind(job.kind.to_owned())
    .bind(job.subject.to_owned())
    .bind(job.event_id.map(str::to_owned))
    .bind(job.payload.map(str::to_owned))
    .bind(job.position)
    .bind(now_text())
    .execute(executor)
    .await
    .with_context(|| format!("queueing a {} job", job.worker))?;
    Ok(done.rows_affected() == 1)
}

/// Queues the job `event` asks of `worker` (of `kind`, on `subject`), in the
/// transaction that moves the queueing consumer's checkpoint.
pub async fn enqueue_event<'e, E>(
    executor: E,
    worker: &str,
    kind: &str,
    subject: &str,
    event: &crate::log::StoredEvent,
) -> anyhow::Result<bool>
where
    E: Executor<'e, Database = Any>,
{
    let event_id = event.event_id.to_string();
    let job = NewJob {
        worker,
        kind,
        subject,
        event_id: Some(&event_id),
        payload: None,
        position: event.position,
    };
    enqueue(executor, &job).await
}

/// Queues, for `worker` and `kind`, one job per row of `select`, which yields
/// `(subject, event_id, payload, position)` from bound parameters `binds` (numbered
/// from `$1`): an intake from a read model. Returns how many were queued now.
pub async fn enqueue_select(
    pool: &AnyPool,
    worker: &str,
    kind: &str,
    select: &str,
    binds: &[i64],
) -> anyhow::Result<u64> {
    let n = binds.len();
    let sql = format!(
        "INSERT INTO jobs ({COLUMNS}) \
         SELECT ${w}, ${k}, s.subject, s.event_id, s.payload, s.position, 'pending', 0, 0, \
         NULL, ${t} FROM ({select}) s WHERE true ON CONFLICT (worker, kind, subject) DO NOTHING",
        w = n + 1,
        k = n + 2,
        t = n + 3,
    );
    let mut query = sqlx::query(&sql);
    for bind in binds {
        query = query.bind(*bind);
    }
    let done = query
        .bind(worker.to_owned())
        .bind(kind.to_owned())
        .bind(now_text())
        .execute(pool)
        .await
        .with_context(|| format!("queueing {worker} jobs"))?;
    Ok(done.rows_affected())
}

/// `worker`'s pending jobs whose time has come (of `kind` only, if given), in the
/// order they were queued, at most `limit`.
pub async fn due(
    pool: &AnyPool,
    worker: &str,
    kind: Option<&str>,
    limit: i64,
) -> anyhow::Result<Vec<Job>> {
    let of_kind = if kind.is_some() { "AND kind = $4" } else { "" };
    let sql = format!(
        "SELECT {COLUMNS} FROM jobs WHERE worker = $1 {of_kind} \
         AND state = 'pending' AND next_attempt_at <= $2 \
         ORDER BY next_attempt_at, position, LENGTH(subject), subject LIMIT $3"
    );
    let mut query = sqlx::query_as(&sql)
        .bind(worker.to_owned())
        .bind(now_ms())
        .bind(limit);
    if let Some(kind) = kind {
        query = query.bind(kind.to_owned());
    }
    query
        .fetch_all(pool)
        .await
        .with_context(|| format!("reading due {worker} jobs"))
}

/// `worker`'s jobs in `state` (a worker's own state, such as `sending`).
pub async fn in_state(pool: &AnyPool, worker: &str, state: &str) -> anyhow::Result<Vec<Job>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM jobs WHERE worker = $1 AND state = $2 ORDER BY position"
    ))
    .bind(worker.to_owned())
    .bind(state.to_owned())
    .fetch_all(pool)
    .await
    .with_context(|| format!("reading {worker} jobs {state}"))
}

/// Whether a job of `worker`, `kind` and `subject` is pending.
pub async fn is_pending(
    pool: &AnyPool,
    worker: &str,
    kind: &str,
    subject: &str,
) -> anyhow::Result<bool> {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM jobs WHERE worker = $1 AND kind = $2 AND subject = $3 \
         AND state = 'pending'",
    )
    .bind(worker.to_owned())
    .bind(kind.to_owned())
    .bind(subject.to_owned())
    .fetch_one(pool)
    .await
    .with_context(|| format!("looking for a pending {worker} job"))?;
    Ok(n > 0)
}

/// The job is done.
pub async fn finish(pool: &AnyPool, job: &Job) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM jobs WHERE worker = $1 AND kind = $2 AND subject = $3")
        .bind(job.worker.clone())
        .bind(job.kind.clone())
        .bind(job.subject.clone())
        .execute(pool)
        .await
        .with_context(|| format!("finishing a {} job", job.worker))?;
    Ok(())
}

/// What becomes of a job that was not done.
#[derive(Clone, Debug)]
pub struct Outcome<'a> {
    /// `pending`, `dead`, or a worker's own state.
    pub state: &'a str,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub error: &'a str,
}

/// Records `outcome` for `job`, if it is still as it was read. `true`: recorded
/// (another run had not moved it meanwhile).
pub async fn record(pool: &AnyPool, job: &Job, outcome: &Outcome<'_>) -> anyhow::Result<bool> {
    set(
        pool,
        job,
        outcome.state,
        outcome.attempts,
        outcome.next_attempt_at,
        Some(outcome.error),
    )
    .await
}

/// Moves a job from its state to `state` without counting an attempt (the M-Pesa
/// worker's `sending` before a push leaves). `true`: moved.
pub async fn mark(pool: &AnyPool, job: &Job, state: &str) -> anyhow::Result<bool> {
    let error = job.last_error.as_deref();
    set(pool, job, state, job.attempts, job.next_attempt_at, error).await
}

/// Writes a job's state, attempts, next attempt and last error if it is still as it
/// was read: the same state, attempts and next attempt (optimistic: another run may
/// have moved it; many writes leave the state as it was, so the state alone would let
/// an out-of-date copy set the attempts and the due time back).
async fn set(
    pool: &AnyPool,
    job: &Job,
    state: &str,
    attempts: i64,
    next_attempt_at: i64,
    error: Option<&str>,
) -> anyhow::Result<bool> {
    let done = sqlx::query(
        "UPDATE jobs SET state = $1, attempts = $2, next_attempt_at = $3, last_error = $4, \
         updated_at = $5 WHERE worker = $6 AND kind = $7 AND subject = $8 AND state = $9 \
         AND attempts = $10 AND next_attempt_at = $11",
    )
    .bind(state.to_owned())
    .bind(attempts)
    .bind(next_attempt_at)
    .bind(error.map(str::to_owned))
    .bind(now_text())
    .bind(job.worker.clone())
    .bind(job.kind.clone())
    .bind(job.subject.clone())
    .bind(job.state.clone())
    .bind(job.attempts)
    .bind(job.next_attempt_at)
    .execute(pool)
    .await
    .with_context(|| format!("moving a {} job to {state}", job.worker))?;
    Ok(done.rows_affected() == 1)
}

/// How many jobs wait, per worker, kind and state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Count {
    pub worker: String,
    pub kind: String,
    pub state: String,
    pub jobs: i64,
}

pub async fn counts(pool: &AnyPool) -> anyhow::Result<Vec<Count>> {
    sqlx::query_as(
        "SELECT worker, kind, state, COUNT(*) AS jobs FROM jobs \
         GROUP BY worker, kind, state ORDER BY worker, kind, state",
    )
    .fetch_all(pool)
    .await
    .context("counting jobs")
}

/// Dead letters and failing jobs of every worker, dead ones first.
pub async fn troubled(pool: &AnyPool, limit: i64) -> anyhow::Result<Vec<Job>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM jobs WHERE state = 'dead' OR last_error IS NOT NULL \
         ORDER BY worker, state, position LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(pool)
    .await
    .context("listing failing jobs")
}

/// Requeues `worker`'s dead letters (all, or those whose subject is in `subjects`)
/// with a fresh count of attempts. Returns how many.
pub async fn retry(pool: &AnyPool, worker: &str, subjects: &[String]) -> anyhow::Result<u64> {
    let sql = "UPDATE jobs SET state = 'pending', attempts = 0, next_attempt_at = 0, \
               updated_at = $1 WHERE worker = $2 AND state = 'dead'";
    if subjects.is_empty() {
        let done = sqlx::query(sql)
            .bind(now_text())
            .bind(worker.to_owned())
            .execute(pool)
            .await
            .context("requeueing dead letters")?;
        return Ok(done.rows_affected());
    }
    let mut requeued = 0;
    for subject in subjects {
        let done = sqlx::query(&format!("{sql} AND subject = $3"))
            .bind(now_text())
            .bind(worker.to_owned())
            .bind(subject.to_owned())
            .execute(pool)
            .await
            .context("requeueing a dead letter")?;
        requeued += done.rows_affected();
    }
    Ok(requeued)
}

/// Moves the rows of a work list of an earlier version (`table`, created by its worker
/// before this queue existed) into `jobs`, then drops it: an upgrade loses no work.
/// `select` reads `table` as the columns of `jobs`, in their order.
pub async fn adopt(
    pool: &AnyPool,
    backend: Backend,
    table: &str,
    select: &str,
) -> anyhow::Result<u64> {
    if !table_exists(pool, backend, table).await? {
        return Ok(0);
    }
    match move_in(pool, table, select).await {
        Ok(moved) => Ok(moved),
        Err(error) => match table_exists(pool, backend, table).await {
            // Another instance moved it in and dropped it meanwhile.
            Ok(false) => Ok(0),
            _ => Err(error),
        },
    }
}

async fn table_exists(pool: &AnyPool, backend: Backend, table: &str) -> anyhow::Result<bool> {
    Ok(match backend {
        Backend::Postgres => sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL")
            .bind(table.to_owned())
            .fetch_one(pool)
            .await
            .context("looking for an old work list")?,
        Backend::Sqlite => {
            sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = $1",
            )
            .bind(table.to_owned())
            .fetch_one(pool)
            .await
            .context("looking for an old work list")?
                > 0
        }
    })
}

async fn move_in(pool: &AnyPool, table: &str, select: &str) -> anyhow::Result<u64> {
    let mut tx = pool.begin().await?;
    let moved = sqlx::query(&format!(
        "INSERT INTO jobs ({COLUMNS}) SELECT * FROM ({select}) old WHERE true \
         ON CONFLICT (worker, kind, subject) DO NOTHING"
    ))
    .execute(&mut *tx)
    .await
    .with_context(|| format!("moving {table} into the job queue"))?
    .rows_affected();
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&mut *tx)
        .await
        .with_context(|| format!("dropping {table}"))?;
    tx.commit().await?;
    if moved > 0 {
        tracing::info!(table, moved, "moved an old work list into the job queue");
    }
    Ok(moved)
}
