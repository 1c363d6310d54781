//! The blob store the write side and the reads use when a remote store is configured:
//! uploads land in the local directory (so the API keeps accepting them while the
//! remote is down) and are copied by the [`Replicator`](super::Replicator); reads come
//! from the local copy when present, otherwise from the remote store, verified.

use std::sync::Arc;

use async_trait::async_trait;
use commands::blobs::{sha256_hex, BlobError, BlobStore, LocalBlobStore};

use super::remote::{object_key, RemoteError, S3Remote};

pub struct ReplicatedBlobs {
    local: Arc<LocalBlobStore>,
    remote: Arc<S3Remote>,
    /// Keep a verified remote copy locally after fetching it (off when the node evicts
    /// stored blobs, which would only fetch them again).
    cache_fetched: bool,
}

impl ReplicatedBlobs {
    pub fn new(
        local: Arc<LocalBlobStore>,
        remote: Arc<S3Remote>,
        cache_fetched: bool,
    ) -> ReplicatedBlobs {
        ReplicatedBlobs {
            local,
            remote,
            cache_fetched,
        }
    }
}

#[async_trait]
impl BlobStore for ReplicatedBlobs {
    async fn put(&self, sha256: &str, bytes: &[u8]) -> anyhow::Result<()> {
        self.local.put(sha256, bytes).await
    }

    async fn get(&self, sha256: &str) -> Result<Option<Vec<u8>>, BlobError> {
        if let Some(bytes) = self.local.get(sha256).await? {
            return Ok(Some(bytes));
        }
        let key = object_key(sha256);
        let bytes = match self.remote.get(&key).await {
            Ok((bytes, _)) => bytes,
            Err(RemoteError::NotFound) => return Ok(None),
            Err(error) => return Err(BlobError::Unavailable(error.into())),
        };
        let actual = sha256_hex(&bytes);
        if actual != sha256 {
            return Err(BlobError::Integrity {
                backend: self.remote.backend().to_owned(),
                object_key: key,
                expected: sha256.to_owned(),
                actual,
            });
        }
        if self.cache_fetched {
            if let Err(error) = self.local.put(sha256, &bytes).await {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "could not keep a fetched blob locally"
                );
            }
        }
        Ok(Some(bytes))
    }
}
