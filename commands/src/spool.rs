//! Upload bodies on their way in, kept on disk rather than in memory while they
//! arrive: a slow client then holds a file, not a share of the server's memory.
//!
//! Nothing of a record reaches the disk in clear: each piece is sealed with AES-256-GCM
//! under a key made for that one spool and held only in memory, so a spool left behind
//! by a crash cannot be read by anyone (and [`clear_stale`] removes it at the next
//! start). Once the body is whole, [`Spool::into_body`] reads it back into one buffer
//! with room for the record's encryption, and the file is removed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aes_gcm::aead::{AeadInPlace, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use anyhow::Context as _;
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufReader, BufWriter};
use zeroize::Zeroize;

/// Plaintext gathered before a piece is sealed and written.
const PIECE: usize = 64 * 1024;
/// A piece's frame: its sealed length (u32, little-endian), then the sealed bytes.
const FRAME_HEAD: usize = 4;
const TAG_LEN: usize = 16;
/// The folder under the data directory that holds spools.
const FOLDER: &str = "spool";
/// Spool files end so, so that [`clear_stale`] removes nothing else.
const SUFFIX: &str = ".part";

/// An upload body being received (see the module documentation). Dropping it removes
/// its file.
pub struct Spool {
    path: PathBuf,
    file: BufWriter<tokio::fs::File>,
    cipher: Aes256Gcm,
    pending: Vec<u8>,
    pieces: u64,
    len: usize,
}

/// The folder spools are kept in, under `data_dir`.
pub fn folder(data_dir: &Path) -> PathBuf {
    data_dir.join(FOLDER)
}

/// Removes spool files older than `age` (left by a crash: a running upload's file is
/// never that old, since uploads are bounded in time). Returns how many.
pub fn clear_stale(data_dir: &Path, age: Duration) -> anyhow::Result<usize> {
    let dir = folder(data_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(error) => return Err(error).context("listing the upload spool"),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.context("listing the upload spool")?;
        let name = entry.file_name();
        if !name.to_string_lossy().ends_with(SUFFIX) {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok())
            .is_some_and(|elapsed| elapsed >= age);
        if old && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

fn nonce(piece: u64) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&piece.to_be_bytes());
    nonce
}

impl Spool {
    /// A new, empty spool under `data_dir`.
    pub async fn create(data_dir: &Path) -> anyhow::Result<Spool> {
        let dir = folder(data_dir);
        tokio::fs::create_dir_all(&dir)
            .await
            .context("creating the upload spool folder")?;
        let path = dir.join(format!("{}{SUFFIX}", uuid::Uuid::new_v4()));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .open(&path)
            .await
            .context("creating an upload spool file")?;
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key));
        key.zeroize();
        Ok(Spool {
            path,
            file: BufWriter::with_capacity(PIECE + FRAME_HEAD + TAG_LEN, file),
            cipher,
            pending: Vec::with_capacity(PIECE),
            pieces: 0,
            len: 0,
        })
    }

    /// Bytes received so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was received.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `bytes` to the body.
    pub async fn write(&mut self, mut bytes: &[u8]) -> anyhow::Result<()> {
        self.len += bytes.len();
        while !bytes.is_empty() {
            let take = (PIECE - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() == PIECE {
                self.seal_pending().await?;
            }
        }
        Ok(())
    }

    async fn seal_pending(&mut self) -> anyhow::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let nonce = nonce(self.pieces);
        let tag = self
            .cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), b"", &mut self.pending)
            .map_err(|_| anyhow::anyhow!("sealing an upload piece failed"))?;
        let sealed =
            u32::try_from(self.pending.len() + TAG_LEN).context("an upload piece is too large")?;
        self.file.write_all(&sealed.to_le_bytes()).await?;
        self.file.write_all(&self.pending).await?;
        self.file.write_all(&tag).await?;
        self.pending.clear();
        self.pieces += 1;
        Ok(())
    }

    /// The whole body, read back into one buffer with `spare` bytes of room beyond
    /// it; the file is removed.
    pub async fn into_body(mut self, spare: usize) -> anyhow::Result<Vec<u8>> {
        self.seal_pending().await?;
        self.file
            .flush()
            .await
            .context("writing an upload spool file")?;
        let mut body = Vec::with_capacity(self.len + spare);
        let file = self.file.get_mut();
        file.rewind()
            .await
            .context("reading an upload spool file")?;
        let mut reader = BufReader::with_capacity(PIECE + FRAME_HEAD + TAG_LEN, file);
        let mut head = [0u8; FRAME_HEAD];
        for piece in 0..self.pieces {
            reader
                .read_exact(&mut head)
                .await
                .context("reading an upload spool file")?;
            let sealed = u32::from_le_bytes(head) as usize;
            let plain = sealed
                .checked_sub(TAG_LEN)
                .filter(|n| *n <= PIECE)
                .context("an upload spool file is damaged")?;
            let start = body.len();
            body.resize(start + plain, 0);
            reader
                .read_exact(&mut body[start..])
                .await
                .context("reading an upload spool file")?;
            let mut tag = [0u8; TAG_LEN];
            reader
                .read_exact(&mut tag)
                .await
                .context("reading an upload spool file")?;
            self.cipher
                .decrypt_in_place_detached(
                    Nonce::from_slice(&nonce(piece)),
                    b"",
                    &mut body[start..],
                    aes_gcm::Tag::from_slice(&tag),
                )
                .map_err(|_| anyhow::anyhow!("an upload spool file is damaged"))?;
        }
        if body.len() != self.len {
            anyhow::bail!("an upload spool file is damaged");
        }
        Ok(body)
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        // Removing an open file is fine on Unix; the descriptor closes with the file.
        if let Err(error) = std::fs::remove_file(&self.path) {
            if error.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(%error, "could not remove an upload spool file");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("afya-spool-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn files(dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(folder(dir))
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    }

    #[actix_rt::test]
    async fn a_body_written_in_pieces_of_any_size_reads_back_whole_and_leaves_no_file() {
        let dir = scratch();
        let data: Vec<u8> = (0..(3 * PIECE + 1234)).map(|i| (i % 251) as u8).collect();
        let mut spool = Spool::create(&dir).await.unwrap();
        for piece in data.chunks(7_777) {
            spool.write(piece).await.unwrap();
        }
        assert_eq!(spool.len(), data.len());
        assert_eq!(files(&dir).len(), 1);
        let body = spool.into_body(28).await.unwrap();
        assert_eq!(body, data);
        assert!(body.capacity() >= data.len() + 28);
        assert!(files(&dir).is_empty(), "the spool file is removed");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[actix_rt::test]
    async fn nothing_of_the_body_is_on_disk_in_clear_and_a_dropped_spool_leaves_nothing() {
        let dir = scratch();
        let marker = b"HbA1c 7.9% -- Achieng Otieno";
        let data: Vec<u8> = marker.iter().copied().cycle().take(PIECE + 500).collect();
        let mut spool = Spool::create(&dir).await.unwrap();
        spool.write(&data).await.unwrap();
        spool.seal_pending().await.unwrap();
        spool.file.flush().await.unwrap();
        let on_disk = std::fs::read(&files(&dir)[0]).unwrap();
        assert!(on_disk.len() > data.len());
        assert!(!on_disk.windows(8).any(|w| w == &marker[..8]));
        drop(spool);
        assert!(files(&dir).is_empty());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[actix_rt::test]
    async fn a_changed_byte_is_refused_and_only_old_spool_files_are_cleared() {
        let dir = scratch();
        let mut spool = Spool::create(&dir).await.unwrap();
        spool.write(&[1u8; 1000]).await.unwrap();
        spool.seal_pending().await.unwrap();
        spool.file.flush().await.unwrap();
        let path = files(&dir)[0].clone();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[10] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(spool.into_body(0).await.is_err());
        std::fs::write(folder(&dir).join("left.part"), b"x").unwrap();
        std::fs::write(folder(&dir).join("keep.txt"), b"x").unwrap();
        assert_eq!(clear_stale(&dir, Duration::from_secs(3600)).unwrap(), 0);
        assert_eq!(clear_stale(&dir, Duration::ZERO).unwrap(), 1);
        assert_eq!(files(&dir).len(), 1, "only spool files are removed");
        std::fs::remove_dir_all(&dir).ok();
    }
}
