//! The blob store the write side and the reads use when a remote store is configured:
//! uploads land in the local directory (so the API keeps accepting them while the
//! remote is down) and are copied by the [`Replicator`](super::Replicator); reads come
//! from the local copy when present, otherwise from the remote store, verified.

use std::sync::Arc;

use async_trait::async_trait;
use commands::blobs::{
    sha256_hex, BlobStore, Fetched, IntegrityFailure, LocalBlobStore, Unavailable,
};

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

    async fn get(&self, sha256: &str) -> Result<Fetched, Unavailable> {
        let local = self.local.get(sha256).await?;
        if local.bytes.is_some() {
            return Ok(local);
        }
        let local_corrupt = !local.refused.is_empty();
        let mut refused = local.refused;
        let key = object_key(sha256);
        let bytes = match self.remote.get(&key).await {
            Ok((bytes, _)) => bytes,
            Err(RemoteError::NotFound) => {
                return Ok(Fetched {
                    bytes: None,
                    refused,
                })
            }
            // A corrupt local copy is reason enough to refuse, whatever the remote.
            Err(_) if local_corrupt => {
                return Ok(Fetched {
                    bytes: None,
                    refused,
                })
            }
            Err(error) => return Err(Unavailable(error.into())),
        };
        let actual = sha256_hex(&bytes);
        if actual != sha256 {
            refused.push(IntegrityFailure {
                backend: self.remote.backend().to_owned(),
                object_key: key,
                expected: sha256.to_owned(),
                actual,
            });
            return Ok(Fetched {
                bytes: None,
                refused,
            });
        }
        // A verified copy is kept (replacing a corrupt local one) unless the node evicts
        // stored blobs, which then only drops the corrupt one.
        let kept = if self.cache_fetched {
            self.local.replace(sha256, &bytes).await
        } else if local_corrupt {
            self.local.remove(sha256).await
        } else {
            Ok(())
        };
        if let Err(error) = kept {
            tracing::warn!(
                error = format!("{error:#}"),
                "could not update the local copy of a fetched blob"
            );
        }
        Ok(Fetched {
            bytes: Some(bytes),
            refused,
        })
    }
}
