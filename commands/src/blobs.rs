//! Where encrypted record bodies are kept: a content-addressed directory by default.
//! Only ciphertext is ever written; the name of a blob is the SHA-256 of its bytes, so
//! writing the same blob twice is harmless.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use async_trait::async_trait;
use sha2::{Digest, Sha256};

use crate::keys::hex;

/// A store of encrypted blobs keyed by the SHA-256 of their bytes.
#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Stores `bytes` under `sha256` (which must be their hash); idempotent.
    async fn put(&self, sha256: &str, bytes: &[u8]) -> anyhow::Result<()>;
    /// The blob, verified against its hash; `None` when absent.
    async fn get(&self, sha256: &str) -> anyhow::Result<Option<Vec<u8>>>;
}

/// Blobs under `<data dir>/blobs/ab/abcdef…`.
pub struct LocalBlobStore {
    dir: PathBuf,
}

impl LocalBlobStore {
    pub fn new(data_dir: &Path) -> LocalBlobStore {
        LocalBlobStore {
            dir: data_dir.join("blobs"),
        }
    }

    fn path(&self, sha256: &str) -> anyhow::Result<PathBuf> {
        if sha256.len() != 64
            || !sha256
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            bail!("not a SHA-256 hex digest");
        }
        Ok(self.dir.join(&sha256[..2]).join(sha256))
    }
}

#[async_trait]
impl BlobStore for LocalBlobStore {
    async fn put(&self, sha256: &str, bytes: &[u8]) -> anyhow::Result<()> {
        if hex(&Sha256::digest(bytes)) != sha256 {
            bail!("blob does not match its hash");
        }
        let path = self.path(sha256)?;
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(());
        }
        let parent = path.parent().context("blob path has no parent")?;
        tokio::fs::create_dir_all(parent)
            .await
            .context("creating the blob directory")?;
        let tmp = parent.join(format!(".{}.tmp", uuid::Uuid::new_v4()));
        tokio::fs::write(&tmp, bytes)
            .await
            .context("writing a blob")?;
        tokio::fs::rename(&tmp, &path)
            .await
            .context("storing a blob")?;
        Ok(())
    }

    async fn get(&self, sha256: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let path = self.path(sha256)?;
        match tokio::fs::read(&path).await {
            Ok(bytes) => {
                if hex(&Sha256::digest(&bytes)) != sha256 {
                    bail!("stored blob {sha256} failed its integrity check");
                }
                Ok(Some(bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).context("reading a blob"),
        }
    }
}
