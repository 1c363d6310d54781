//! The replicator: copies each uploaded record's ciphertext to the remote store and
//! records `RecordStored` through a command.
//!
//! It follows the `record_storage` projection (itself a checkpointed consumer of the
//! log) through its jobs in the shared job queue (worker `storage`), so the slow, failing outside call never
//! runs inside a read-model transaction. Every step is idempotent: the object key is
//! the ciphertext's SHA-256 (a second PUT writes the same object; an object found
//! already there is verified and adopted instead), and the record aggregate records a
//! second `RecordStored` for the same backend and key as nothing. Killed anywhere, it
//! resumes from its work list: one object, one `RecordStored`.
//!
//! Failures: when the remote store as a whole is down or refuses the credentials (a
//! probe says so), jobs are put off with a growing pause and no attempt is counted;
//! the API keeps accepting uploads. A blob that keeps failing while the store is fine
//! counts attempts, backs off, and after `max_attempts` goes to the dead-letter list.
//! One instance is active per deployment (the consumer lock `storage_replicator`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use commands::blobs::{sha256_hex, BlobStore, IntegrityFailure, LocalBlobStore};
use commands::{CommandError, Commands};
use domain::ids::RecordId;
use eventstore::work::{self, Outcome, WorkerActor};
use eventstore::{LogCursor, Store};
use futures::StreamExt;
use tokio::sync::{watch, Mutex};

use super::queue::{self, Job};
use super::remote::{object_key, one_line, RemoteError, RemoteState, S3Remote};
use super::{ReplicationSettings, Storage};

/// The name of the replicator's consumer lock.
pub const LOCK_NAME: &str = "storage_replicator";

/// Why one blob was not replicated.
enum Failure {
    /// A call to the remote store failed: the store's fault or the blob's, which a
    /// probe tells apart.
    Remote(RemoteError),
    /// This blob cannot be replicated (no good copy, refused by a rule).
    Blob(String),
    /// The remote store has no copy and there is no good local one: lost, or the
    /// bucket is missing, which the probe tells apart.
    NotThere(String),
    /// Our own database failed or a change raced: put off, not counted.
    Local(anyhow::Error),
    /// Not tried: another job of the batch found the remote store failing.
    Skipped,
}

struct WorkerState {
    intake_mark: LogCursor,
    outage_backoff: Duration,
    remote_state: RemoteState,
}

/// The replicator's work (see the module documentation).
pub struct Worker {
    store: Store,
    commands: Arc<Commands>,
    local: Arc<LocalBlobStore>,
    remote: Arc<S3Remote>,
    settings: ReplicationSettings,
    /// Told what the worker learns of the remote store (for `/readyz`).
    storage: Storage,
    state: Mutex<WorkerState>,
}

#[derive(Debug, PartialEq, Eq)]
enum Round {
    /// The remote store is down; no round before this pause is over.
    Paused(Duration),
    /// Nothing more is due now.
    Idle,
    /// More may be due at once (a full batch, or jobs skipped).
    More,
    /// Shutting down.
    Stopped,
}

impl Worker {
    fn backend(&self) -> &str {
        self.remote.backend()
    }

    fn retry_delay(&self, attempts: i64) -> Duration {
        eventstore::jobs::backoff(self.settings.retry_base, self.settings.retry_max, attempts)
    }

    async fn round(&self, round: &work::Round) -> anyhow::Result<Round> {
        let mut state = self.state.lock().await;
        if round.stopping() {
            return Ok(Round::Stopped);
        }
        let pool = self.store.any_pool();
        let upto = queue::source_checkpoint(pool).await?;
        if upto > state.intake_mark {
            let queued = queue::intake(pool, self.backend(), state.intake_mark, upto).await?;
            if queued > 0 {
                tracing::debug!(queued, "uploads queued for replication");
            }
            state.intake_mark = upto;
        }
        let batch = i64::try_from(self.settings.concurrency.max(1) * 8).unwrap_or(32);
        let jobs = queue::due(pool, self.backend(), batch).await?;
        if jobs.is_empty() {
            return Ok(Round::Idle);
        }
        // Once one call to the store fails, the rest of the batch waits for the probe
        // rather than each running into the same timeout.
        let remote_failed = AtomicBool::new(false);
        let work = futures::stream::iter(jobs.iter())
            .map(|job| {
                let remote_failed = &remote_failed;
                async move {
                    if remote_failed.load(Ordering::Relaxed) {
                        return (job, Err(Failure::Skipped));
                    }
                    let result = self.replicate(job).await;
                    if matches!(result, Err(Failure::Remote(_) | Failure::NotThere(_))) {
                        remote_failed.store(true, Ordering::Relaxed);
                    }
                    (job, result)
                }
            })
            .buffer_unordered(self.settings.concurrency.max(1))
            .collect::<Vec<_>>();
        let results: Vec<(&Job, Result<(), Failure>)> = tokio::select! {
            results = work => results,
            _ = round.stopped() => return Ok(Round::Stopped),
        };
        let refused_credentials = results
            .iter()
            .any(|(_, r)| matches!(r, Err(Failure::Remote(RemoteError::Unauthorized(_)))));
        let outage = if refused_credentials {
            // A key that may list but not write passes the probe; no blob is at fault.
            Some(RemoteState::Unauthorized)
        } else if remote_failed.load(Ordering::Relaxed) {
            match self.remote.probe().await {
                RemoteState::Ok => None,
                down => Some(down),
            }
        } else {
            None
        };
        let (mut stored, mut skipped) = (0usize, 0usize);
        for (job, result) in &results {
            match result {
                Ok(()) => stored += 1,
                Err(Failure::Skipped) => skipped += 1,
                Err(Failure::Remote(error)) if outage.is_some() => {
                    let next = eventstore::jobs::after(state.outage_backoff);
                    queue::postpone(pool, job, next, &error.to_string()).await?;
                }
                Err(Failure::NotThere(reason)) if outage.is_some() => {
                    let next = eventstore::jobs::after(state.outage_backoff);
                    queue::postpone(pool, job, next, reason).await?;
                }
                Err(Failure::Remote(error)) => {
                    self.count_failure(job, &error.to_string()).await?;
                }
                Err(Failure::NotThere(reason)) => self.count_failure(job, reason).await?,
                Err(Failure::Blob(reason)) => self.count_failure(job, reason).await?,
                Err(Failure::Local(error)) => {
                    let error = one_line(&format!("{error:#}"));
                    tracing::warn!(record_id = %job.record_id, %error, "storage job put off");
                    let next = eventstore::jobs::after(self.settings.retry_base);
                    queue::postpone(pool, job, next, &error).await?;
                }
            }
        }
        match outage {
            Some(down) => {
                self.storage.note_remote_state(down).await;
                if state.remote_state != down {
                    tracing::error!(
                        backend = self.backend(),
                        state = down.as_str(),
                        "remote blob store unavailable; uploads are kept locally and replicated when it returns"
                    );
                }
                state.remote_state = down;
                let pause = state.outage_backoff;
                state.outage_backoff = (state.outage_backoff * 2).min(self.settings.retry_max);
                Ok(Round::Paused(pause))
            }
            None => {
                if stored > 0 {
                    self.storage.note_remote_state(RemoteState::Ok).await;
                    if state.remote_state != RemoteState::Ok {
                        tracing::info!(backend = self.backend(), "remote blob store is back");
                        state.remote_state = RemoteState::Ok;
                    }
                }
                state.outage_backoff = self.settings.retry_base;
                if jobs.len() as i64 == batch || skipped > 0 {
                    Ok(Round::More)
                } else {
                    Ok(Round::Idle)
                }
            }
        }
    }

    async fn count_failure(&self, job: &Job, reason: &str) -> anyhow::Result<()> {
        let attempts = job.attempts + 1;
        let dead = attempts >= i64::from(self.settings.max_attempts);
        let next = eventstore::jobs::after(self.retry_delay(attempts));
        let reason = one_line(reason);
        if dead {
            tracing::error!(record_id = %job.record_id, attempts, error = %reason, "blob replication failed for good; moved to the dead-letter list");
        } else {
            tracing::warn!(record_id = %job.record_id, attempts, error = %reason, "blob replication failed; will retry");
        }
        queue::fail(self.store.any_pool(), job, attempts, next, &reason, dead).await
    }

    /// Copies one blob and records it.
    async fn replicate(&self, job: &Job) -> Result<(), Failure> {
        let record_id = RecordId::parse(&job.record_id)
            .map_err(|_| Failure::Blob("the job's record id is not valid".into()))?;
        let key = object_key(&job.sha256);
        let local = self
            .local
            .get(&job.sha256)
            .await
            .map_err(|e| Failure::Blob(format!("reading the local copy: {:#}", e.0)))?;
        for failure in &local.refused {
            tracing::error!(
                target: "afyachain::integrity",
                record_id = %job.record_id,
                backend = %failure.backend,
                actual = %failure.actual,
                "the local copy of a blob failed its integrity check"
            );
            self.commands
                .report_integrity_failure(record_id, failure, None)
                .await
                .map_err(|e| Failure::Local(anyhow::anyhow!(e)))?;
        }
        let (etag, verified) = match local.bytes {
            Some(bytes) => self.upload(record_id, &key, &job.sha256, bytes).await?,
            None => {
                let (etag, bytes) = self.adopt(record_id, &key, &job.sha256).await?;
                if !local.refused.is_empty() && !self.settings.evict_local {
                    // The remote copy repairs the corrupt local one; the copy is safe
                    // remotely either way.
                    if let Err(error) = self.local.replace(&job.sha256, &bytes).await {
                        tracing::warn!(record_id = %job.record_id, error = format!("{error:#}"), "could not repair a corrupt local copy");
                    }
                }
                (etag, true)
            }
        };
        if self.settings.evict_local && !verified {
            // The local copy is about to go: the remote one must be whole first.
            self.adopt(record_id, &key, &job.sha256).await?;
        }
        match self
            .commands
            .mark_stored(record_id, self.backend(), &key, etag)
            .await
        {
            Ok(_) => {}
            Err(CommandError::Rejected { message, .. }) => return Err(Failure::Blob(message)),
            Err(error) => return Err(Failure::Local(anyhow::anyhow!(error))),
        }
        if self.settings.evict_local {
            if let Err(error) = self.local.remove(&job.sha256).await {
                // Stored and recorded all the same; the copy merely stays.
                tracing::warn!(record_id = %job.record_id, error = format!("{error:#}"), "could not evict a stored blob");
            }
        }
        queue::finish(self.store.any_pool(), job)
            .await
            .map_err(Failure::Local)?;
        tracing::debug!(record_id = %job.record_id, "blob stored remotely");
        Ok(())
    }

    /// Puts the local copy unless a whole copy is there already; returns the ETag and
    /// whether the remote copy was verified.
    async fn upload(
        &self,
        record_id: RecordId,
        key: &str,
        sha256: &str,
        bytes: Vec<u8>,
    ) -> Result<(Option<String>, bool), Failure> {
        match self.remote.head(key).await {
            Ok(info) if info.size == bytes.len() as u64 => {
                // A replay, a crash before the confirmation, or another instance: adopt
                // the copy if it is whole, replace it if not.
                match self.remote.get(key).await {
                    Ok((existing, etag)) => {
                        let actual = sha256_hex(&existing);
                        if actual == sha256 {
                            return Ok((etag.or(info.etag), true));
                        }
                        self.report_remote_corruption(record_id, key, sha256, actual)
                            .await?;
                    }
                    Err(RemoteError::NotFound) => {}
                    Err(error) => return Err(Failure::Remote(error)),
                }
            }
            Ok(_) | Err(RemoteError::NotFound) => {}
            Err(error) => return Err(Failure::Remote(error)),
        }
        let etag = self.remote.put(key, bytes).await.map_err(Failure::Remote)?;
        Ok((etag, false))
    }

    /// The remote copy, which counts only if it is whole: its ETag and bytes.
    async fn adopt(
        &self,
        record_id: RecordId,
        key: &str,
        sha256: &str,
    ) -> Result<(Option<String>, Vec<u8>), Failure> {
        match self.remote.get(key).await {
            Ok((bytes, etag)) => {
                let actual = sha256_hex(&bytes);
                if actual == sha256 {
                    return Ok((etag, bytes));
                }
                self.report_remote_corruption(record_id, key, sha256, actual)
                    .await?;
                Err(Failure::Blob(
                    "the remote copy fails its integrity check".into(),
                ))
            }
            Err(RemoteError::NotFound) => Err(Failure::NotThere(
                "no good local copy, and the remote store does not have it".into(),
            )),
            Err(error) => Err(Failure::Remote(error)),
        }
    }

    /// Logs and records (`RecordIntegrityFailed`) a remote copy that does not match.
    async fn report_remote_corruption(
        &self,
        record_id: RecordId,
        key: &str,
        expected: &str,
        actual: String,
    ) -> Result<(), Failure> {
        tracing::error!(
            target: "afyachain::integrity",
            record_id = %record_id,
            backend = self.backend(),
            object_key = key,
            %actual,
            "a remote copy of a blob failed its integrity check"
        );
        let failure = IntegrityFailure {
            backend: self.backend().to_owned(),
            object_key: key.to_owned(),
            expected: expected.to_owned(),
            actual,
        };
        self.commands
            .report_integrity_failure(record_id, &failure, None)
            .await
            .map_err(|e| Failure::Local(anyhow::anyhow!(e)))
    }
}

/// The replicator actor.
pub type Replicator = WorkerActor<Worker>;

pub use eventstore::work::Stop;

#[async_trait::async_trait(?Send)]
impl work::Worker for Worker {
    fn name(&self) -> &'static str {
        LOCK_NAME
    }

    /// Another instance may have worked meanwhile: look at everything.
    async fn activate(&self) -> anyhow::Result<()> {
        tracing::info!(backend = self.backend(), "storage replicator active");
        queue::ensure_schema(&self.store).await?;
        self.state.lock().await.intake_mark = LogCursor::START;
        Ok(())
    }

    async fn round(&self, round: &work::Round) -> anyhow::Result<Outcome> {
        Ok(match Worker::round(self, round).await? {
            Round::More => Outcome::More,
            Round::Paused(pause) => Outcome::Pause(pause),
            Round::Idle | Round::Stopped => Outcome::Idle,
        })
    }
}

/// Creates the work list and starts the replicator on the current arbiter; `None` when
/// `storage` has no remote store. `wake` follows the `record_storage` projection, so a
/// new upload is picked up at once.
pub async fn start(
    store: Store,
    commands: Arc<Commands>,
    storage: Storage,
    wake: Option<watch::Receiver<LogCursor>>,
) -> anyhow::Result<Option<Addr<Replicator>>> {
    let Some(remote) = storage.remote.clone() else {
        return Ok(None);
    };
    let settings = storage.replication.clone();
    let local = storage.local.clone();
    let poll = settings.poll;
    let worker = Worker {
        state: Mutex::new(WorkerState {
            intake_mark: LogCursor::START,
            outage_backoff: settings.retry_base,
            remote_state: RemoteState::Ok,
        }),
        store: store.clone(),
        commands,
        local,
        remote,
        settings,
        storage,
    };
    Ok(Some(WorkerActor::launch(worker, store, poll, wake)))
}
