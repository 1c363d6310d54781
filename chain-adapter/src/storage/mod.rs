//! Decentralized storage for encrypted record blobs, spoken as S3 (what ChainSafe
//! Storage offered, and what Filebase, Storj, 4EVERLAND and any S3 server offer).
//!
//! - [`remote`]: the S3 client (path-style, AWS Signature V4 by `object_store`).
//! - [`blobs`]: the blob store of the API when a remote store is configured: local
//!   first, remote fallback, every copy verified against its SHA-256.
//! - [`queue`]: the replicator's work list and dead letters.
//! - [`replicator`]: the actor that copies blobs and records `RecordStored`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use commands::blobs::{BlobStore, LocalBlobStore};

pub mod blobs;
pub mod queue;
pub mod remote;
pub mod replicator;

pub use blobs::ReplicatedBlobs;
pub use remote::{object_key, RemoteState, S3Remote, S3Settings};
pub use replicator::Replicator;

/// How the replicator works.
#[derive(Clone, Debug)]
pub struct ReplicationSettings {
    /// Delete the local copy once `RecordStored` is recorded; reads then fetch from the
    /// remote store (and verify).
    pub evict_local: bool,
    /// Failures of one blob (while the store itself is fine) before it is dead-lettered.
    pub max_attempts: u32,
    /// First retry delay; it doubles per failure up to `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// Blobs copied at once.
    pub concurrency: usize,
    /// How often it looks for work without being woken.
    pub poll: Duration,
}

impl Default for ReplicationSettings {
    fn default() -> Self {
        ReplicationSettings {
            evict_local: false,
            max_attempts: 10,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            concurrency: 4,
            poll: Duration::from_secs(1),
        }
    }
}

/// Where blobs are kept, as configured: always locally, and on a remote store if one
/// is set.
#[derive(Clone)]
pub struct Storage {
    pub local: Arc<LocalBlobStore>,
    pub remote: Option<Arc<S3Remote>>,
    pub replication: ReplicationSettings,
    health: Arc<Mutex<Health>>,
}

/// Clears `probing` when the probe that set it ends, however it ends.
struct Probing(Arc<Mutex<Health>>);

impl Drop for Probing {
    fn drop(&mut self) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .probing = false;
    }
}

/// The last known state of the remote store.
#[derive(Default)]
struct Health {
    known: Option<(Instant, RemoteState)>,
    probing: bool,
}

/// How long a probe of the remote store answers `/readyz`.
const HEALTH_TTL: Duration = Duration::from_secs(3);

impl Storage {
    pub fn new(
        local: Arc<LocalBlobStore>,
        remote: Option<Arc<S3Remote>>,
        replication: ReplicationSettings,
    ) -> Storage {
        Storage {
            local,
            remote,
            replication,
            health: Arc::new(Mutex::new(Health::default())),
        }
    }

    /// The blob store the command services use.
    pub fn blob_store(&self) -> Arc<dyn BlobStore> {
        match &self.remote {
            Some(remote) => Arc::new(ReplicatedBlobs::new(
                self.local.clone(),
                remote.clone(),
                !self.replication.evict_local,
            )),
            None => self.local.clone(),
        }
    }

    /// The remote backend's name (`s3:<bucket>`), if there is one.
    pub fn backend(&self) -> Option<&str> {
        self.remote.as_deref().map(S3Remote::backend)
    }

    /// Records what the replicator learnt of the remote store (fresher than a probe).
    pub async fn note_remote_state(&self, state: RemoteState) {
        let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        health.known = Some((Instant::now(), state));
    }

    /// The remote store's state; `None` without a remote store, or while the first
    /// probe is still out. Answers at once from the last known state and refreshes it
    /// in the background when it is a few seconds old, so a hanging store never holds
    /// up `/readyz`; only the very first call waits for its (bounded) probe.
    pub async fn remote_state(&self) -> Option<RemoteState> {
        let remote = self.remote.clone()?;
        let (known, start_probe) = {
            let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
            let stale = health
                .known
                .is_none_or(|(at, _)| at.elapsed() >= HEALTH_TTL);
            let start = stale && !health.probing;
            if start {
                health.probing = true;
            }
            (health.known.map(|(_, state)| state), start)
        };
        if !start_probe {
            return known;
        }
        // Whatever becomes of the probe (done, dropped, panicked), the guard lets the
        // next caller start another.
        let guard = Probing(self.health.clone());
        let probe = tokio::spawn(async move {
            let state = remote.probe().await;
            guard.0.lock().unwrap_or_else(PoisonError::into_inner).known =
                Some((Instant::now(), state));
            drop(guard);
            state
        });
        match known {
            Some(state) => Some(state),
            None => probe.await.ok(),
        }
    }
}
