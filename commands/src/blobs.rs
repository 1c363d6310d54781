//! Where encrypted record bodies are kept: a content-addressed directory by default,
//! replicated to remote storage by the storage adapter (`chain-adapter`). Only
//! ciphertext is ever written; the name of a blob is the SHA-256 of its bytes, so
//! writing the same blob twice is harmless, and a copy that does not hash to its name
//! is refused rather than returned.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::keys::hex;

/// A copy of a blob that did not hash to its name. It was not returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntegrityFailure {
    /// Where the copy was: `local` or the remote store's backend name.
    pub backend: String,
    pub object_key: String,
    pub expected: String,
    pub actual: String,
}

/// What a blob store found for a hash.
#[derive(Debug, Default)]
pub struct Fetched {
    /// The blob, verified against its hash; `None` when no good copy was found.
    pub bytes: Option<Vec<u8>>,
    /// Copies refused on the way (a corrupt local copy repaired from the remote store
    /// is reported here even though the good bytes are returned).
    pub refused: Vec<IntegrityFailure>,
}

impl Fetched {
    pub fn found(bytes: Vec<u8>) -> Fetched {
        Fetched {
            bytes: Some(bytes),
            refused: Vec::new(),
        }
    }
}

/// The store could not be asked (down, refused the credentials, timed out).
#[derive(Debug, thiserror::Error)]
#[error("blob store unavailable: {0:#}")]
pub struct Unavailable(pub anyhow::Error);

/// A store of encrypted blobs keyed by the SHA-256 of their bytes.
#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Stores `bytes` under `sha256` (which must be their hash); idempotent.
    async fn put(&self, sha256: &str, bytes: &[u8]) -> anyhow::Result<()>;
    /// The blob, verified against its hash, and any copy refused on the way.
    async fn get(&self, sha256: &str) -> Result<Fetched, Unavailable>;
}

/// The SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
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

    /// Deletes the local copy (after it is confirmed elsewhere); absent is fine.
    pub async fn remove(&self, sha256: &str) -> anyhow::Result<()> {
        match tokio::fs::remove_file(self.path(sha256)?).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).context("removing a local blob"),
        }
    }

    /// Writes `bytes` (which must hash to `sha256`) over whatever copy is there, e.g.
    /// a corrupt one.
    pub async fn replace(&self, sha256: &str, bytes: &[u8]) -> anyhow::Result<()> {
        self.remove(sha256).await?;
        self.put(sha256, bytes).await
    }

    /// Whether a local copy exists (not verified).
    pub async fn contains(&self, sha256: &str) -> anyhow::Result<bool> {
        Ok(tokio::fs::try_exists(self.path(sha256)?).await?)
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
        if sha256_hex(bytes) != sha256 {
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
        // Written through a file rather than `tokio::fs::write`, which first copies
        // the whole blob: this holds at most one write buffer (2 MiB) besides it. On
        // disk before it is named, so a recorded upload never points at a torn file.
        let written = async {
            let mut file = tokio::fs::File::create(&tmp).await?;
            file.write_all(bytes).await?;
            file.sync_all().await
        }
        .await;
        if let Err(error) = written {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(anyhow::Error::new(error).context("writing a blob"));
        }
        tokio::fs::rename(&tmp, &path)
            .await
            .context("storing a blob")?;
        Ok(())
    }

    async fn get(&self, sha256: &str) -> Result<Fetched, Unavailable> {
        let path = self.path(sha256).map_err(Unavailable)?;
        match tokio::fs::read(&path).await {
            Ok(bytes) => {
                let actual = sha256_hex(&bytes);
                if actual != sha256 {
                    return Ok(Fetched {
                        bytes: None,
                        refused: vec![IntegrityFailure {
                            backend: "local".to_owned(),
                            object_key: format!("blobs/{}/{sha256}", &sha256[..2]),
                            expected: sha256.to_owned(),
                            actual,
                        }],
                    });
                }
                Ok(Fetched::found(bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Fetched::default()),
            Err(e) => Err(Unavailable(anyhow::Error::new(e).context("reading a blob"))),
        }
    }
}
