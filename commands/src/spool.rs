//! Upload bodies on their way in, kept on disk rather than in memory while they
//! arrive: a slow client then holds a file, not a share of the server's memory.
//!
//! Nothing of a record reaches the disk in clear: each piece is sealed with AES-256-GCM
//! under a key made for that one spool and held only in memory, so a spool left behind
//! by a crash cannot be read by anyone. Each process keeps its spools in a folder of
//! its own, locked while it runs ([`SpoolDir`]); a process that starts removes the
//! folders whose lock is free (their process is gone). Once the body is whole,
//! [`Spool::into_body`] reads it back into one buffer with room for the record's
//! encryption, and the file is removed.

use std::path::{Path, PathBuf};

use aes_gcm::aead::{AeadInPlace, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use anyhow::Context as _;
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufReader};
use zeroize::Zeroize;

/// Plaintext gathered before a piece is sealed and written.
const PIECE: usize = 64 * 1024;
/// A piece's frame: its sealed length (u32, little-endian), then the sealed bytes.
const FRAME_HEAD: usize = 4;
const TAG_LEN: usize = 16;
/// The folder under the data directory that holds the processes' spool folders.
const FOLDER: &str = "spool";
/// Spool files end so.
const SUFFIX: &str = ".part";
/// The lock file of a process's spool folder, held while the process runs.
const LOCK: &str = ".lock";

/// The spool folder of this process: `<data>/spool/<uuid>/`, its `.lock` file locked
/// for as long as this lives (the operating system frees the lock when the process
/// ends, however it ends). Dropping it removes the folder.
pub struct SpoolDir {
    path: PathBuf,
    _lock: std::fs::File,
}

impl SpoolDir {
    /// Makes this process's folder, and removes the folders of processes that are gone
    /// (their lock is free): what a crash left. Returns it and how many it removed.
    pub fn open(data_dir: &Path) -> anyhow::Result<(SpoolDir, usize)> {
        let root = data_dir.join(FOLDER);
        std::fs::create_dir_all(&root).context("creating the upload spool folder")?;
        let removed = clear_abandoned(&root)?;
        let path = root.join(uuid::Uuid::new_v4().to_string());
        std::fs::create_dir(&path).context("creating this process's upload spool folder")?;
        let lock =
            std::fs::File::create(path.join(LOCK)).context("creating the upload spool lock")?;
        lock.try_lock()
            .map_err(|error| anyhow::anyhow!("locking the upload spool folder: {error}"))?;
        Ok((SpoolDir { path, _lock: lock }, removed))
    }

    /// Where this process's spools are.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SpoolDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Removes every process folder under `root` whose lock nobody holds.
fn clear_abandoned(root: &Path) -> anyhow::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(root).context("listing the upload spool")? {
        let path = entry.context("listing the upload spool")?.path();
        if !path.is_dir() {
            continue;
        }
        let abandoned = match std::fs::File::open(path.join(LOCK)) {
            // Taken, so free: its process is gone (the lock goes as this file closes).
            Ok(lock) => lock.try_lock().is_ok(),
            // A folder without a lock file was cut off while being made.
            Err(error) => error.kind() == std::io::ErrorKind::NotFound,
        };
        if abandoned && std::fs::remove_dir_all(&path).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Whether `error` is the disk or the process running out of room or files: a
/// capacity problem to retry later, not a fault.
pub fn is_out_of_room(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            // ENFILE, EMFILE, ENOSPC, EDQUOT
            .is_some_and(|code| matches!(code, 23 | 24 | 28 | 122))
    })
}

/// An upload body being received (see the module documentation). Dropping it removes
/// its file.
pub struct Spool {
    path: PathBuf,
    file: tokio::fs::File,
    cipher: Aes256Gcm,
    /// The piece being gathered, behind room for its frame's head; sealed in place.
    frame: Vec<u8>,
    /// The most a piece of this spool gathers (the body's length, when shorter).
    piece: usize,
    pieces: u64,
    len: usize,
}

fn nonce(piece: u64) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&piece.to_be_bytes());
    nonce
}

impl Spool {
    /// A new, empty spool in `dir` for a body of about `expected` bytes (its buffer is
    /// no larger than that, and made at the first byte).
    pub async fn create(dir: &SpoolDir, expected: usize) -> anyhow::Result<Spool> {
        let path = dir.path().join(format!("{}{SUFFIX}", uuid::Uuid::new_v4()));
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
            file,
            cipher,
            frame: Vec::new(),
            piece: expected.clamp(1, PIECE),
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
            if self.frame.is_empty() {
                self.frame.reserve_exact(FRAME_HEAD + self.piece + TAG_LEN);
                self.frame.extend_from_slice(&[0; FRAME_HEAD]);
            }
            let gathered = self.frame.len() - FRAME_HEAD;
            let take = (PIECE - gathered).min(bytes.len());
            self.frame.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.frame.len() - FRAME_HEAD == PIECE {
                self.seal_pending().await?;
            }
        }
        Ok(())
    }

    /// Seals the piece gathered, in place, and writes its frame in one write.
    async fn seal_pending(&mut self) -> anyhow::Result<()> {
        if self.frame.len() <= FRAME_HEAD {
            return Ok(());
        }
        let nonce = nonce(self.pieces);
        let tag = self
            .cipher
            .encrypt_in_place_detached(
                Nonce::from_slice(&nonce),
                b"",
                &mut self.frame[FRAME_HEAD..],
            )
            .map_err(|_| anyhow::anyhow!("sealing an upload piece failed"))?;
        let sealed = u32::try_from(self.frame.len() - FRAME_HEAD + TAG_LEN)
            .context("an upload piece is too large")?;
        self.frame[..FRAME_HEAD].copy_from_slice(&sealed.to_le_bytes());
        self.frame.extend_from_slice(&tag);
        self.file
            .write_all(&self.frame)
            .await
            .context("writing an upload spool file")?;
        self.frame.clear();
        self.pieces += 1;
        Ok(())
    }

    /// The whole body, read back into one buffer with `spare` bytes of room beyond
    /// it; the file is removed.
    pub async fn into_body(mut self, spare: usize) -> anyhow::Result<Vec<u8>> {
        self.seal_pending().await?;
        self.frame = Vec::new();
        self.file
            .flush()
            .await
            .context("writing an upload spool file")?;
        let mut body = Vec::with_capacity(self.len + spare);
        let piece = self.piece;
        let file = &mut self.file;
        file.rewind()
            .await
            .context("reading an upload spool file")?;
        let mut reader = BufReader::with_capacity(piece + FRAME_HEAD + TAG_LEN, file);
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

    fn files(dir: &SpoolDir) -> Vec<PathBuf> {
        std::fs::read_dir(dir.path())
            .map(|d| {
                d.map(|e| e.unwrap().path())
                    .filter(|p| p.to_string_lossy().ends_with(SUFFIX))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[actix_rt::test]
    async fn a_body_written_in_pieces_of_any_size_reads_back_whole_and_leaves_no_file() {
        let data_dir = scratch();
        let (dir, _) = SpoolDir::open(&data_dir).unwrap();
        let data: Vec<u8> = (0..(3 * PIECE + 1234)).map(|i| (i % 251) as u8).collect();
        let mut spool = Spool::create(&dir, data.len()).await.unwrap();
        for piece in data.chunks(7_777) {
            spool.write(piece).await.unwrap();
        }
        assert_eq!(spool.len(), data.len());
        assert_eq!(files(&dir).len(), 1);
        let body = spool.into_body(28).await.unwrap();
        assert_eq!(body, data);
        assert!(body.capacity() >= data.len() + 28);
        assert!(files(&dir).is_empty(), "the spool file is removed");
        // A small body, declared as small: one piece of its size.
        let mut spool = Spool::create(&dir, 5).await.unwrap();
        spool.write(b"hello").await.unwrap();
        assert!(spool.frame.capacity() < 64);
        assert_eq!(spool.into_body(0).await.unwrap(), b"hello");
        drop(dir);
        std::fs::remove_dir_all(&data_dir).ok();
    }

    #[actix_rt::test]
    async fn nothing_of_the_body_is_on_disk_in_clear_and_a_dropped_spool_leaves_nothing() {
        let data_dir = scratch();
        let (dir, _) = SpoolDir::open(&data_dir).unwrap();
        let marker = b"HbA1c 7.9% -- Achieng Otieno";
        let data: Vec<u8> = marker.iter().copied().cycle().take(PIECE + 500).collect();
        let mut spool = Spool::create(&dir, data.len()).await.unwrap();
        spool.write(&data).await.unwrap();
        spool.seal_pending().await.unwrap();
        spool.file.flush().await.unwrap();
        let on_disk = std::fs::read(&files(&dir)[0]).unwrap();
        assert!(on_disk.len() > data.len());
        assert!(!on_disk.windows(8).any(|w| w == &marker[..8]));
        drop(spool);
        assert!(files(&dir).is_empty());
        drop(dir);
        std::fs::remove_dir_all(&data_dir).ok();
    }

    #[actix_rt::test]
    async fn a_changed_byte_is_refused() {
        let data_dir = scratch();
        let (dir, _) = SpoolDir::open(&data_dir).unwrap();
        let mut spool = Spool::create(&dir, 1000).await.unwrap();
        spool.write(&[1u8; 1000]).await.unwrap();
        spool.seal_pending().await.unwrap();
        spool.file.flush().await.unwrap();
        let path = files(&dir)[0].clone();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[10] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(spool.into_body(0).await.is_err());
        drop(dir);
        std::fs::remove_dir_all(&data_dir).ok();
    }

    #[test]
    fn only_the_folders_of_processes_that_are_gone_are_cleared() {
        let data_dir = scratch();
        let (running, removed) = SpoolDir::open(&data_dir).unwrap();
        assert_eq!(removed, 0);
        // What a killed process leaves: its folder and file, its lock free.
        let gone = data_dir.join(FOLDER).join("gone");
        std::fs::create_dir_all(&gone).unwrap();
        std::fs::write(gone.join(LOCK), b"").unwrap();
        std::fs::write(gone.join("x.part"), b"sealed").unwrap();
        let (second, removed) = SpoolDir::open(&data_dir).unwrap();
        assert_eq!(removed, 1);
        assert!(!gone.exists());
        assert!(running.path().exists(), "a running process's folder stays");
        let kept = running.path().to_owned();
        drop(running);
        assert!(!kept.exists(), "a process's folder goes with it");
        drop(second);
        std::fs::remove_dir_all(&data_dir).ok();
    }
}
