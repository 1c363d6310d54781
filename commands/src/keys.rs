//! Keys: the master key, per-subject keys, sealing of personal fields, and the
//! encryption of record contents.
//!
//! The master key comes from `AFYA_MASTER_KEY` (base64 of 32 bytes) or, on a first run
//! without it, is generated into `<data dir>/keys/master.key` (mode 0600). Each patient
//! and doctor has a random 256-bit key, stored wrapped by the master key in the
//! `subject_keys` table; deleting that row crypto-shreds everything sealed under it.
//! Ciphertexts are `v1.` + base64(nonce ‖ AES-256-GCM ciphertext ‖ tag), with the
//! subject id as associated data so a ciphertext cannot be moved to another subject.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use aes_gcm::aead::{Aead, AeadInPlace, KeyInit, OsRng, Payload};
use aes_gcm::{AeadCore, Aes256Gcm, Key, Nonce};
use anyhow::{anyhow, bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::AnyPool;
use zeroize::{Zeroize, Zeroizing};

const PREFIX: &str = "v1.";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// How many bytes an encrypted record body is longer than its plaintext (nonce and
/// tag): a buffer with this much spare capacity is encrypted without reallocating.
pub const RECORD_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// 32 secret bytes; never printed.
#[derive(Clone)]
pub struct SecretKey([u8; 32]);

impl SecretKey {
    pub fn generate() -> SecretKey {
        let mut bytes = [0u8; 32];
        OsRng.fill_bytes(&mut bytes);
        SecretKey(bytes)
    }

    fn from_slice(bytes: &[u8]) -> anyhow::Result<SecretKey> {
        let array: [u8; 32] = bytes
            .try_into()
            .map_err(|_| anyhow!("a key must be 32 bytes, got {}", bytes.len()))?;
        Ok(SecretKey(array))
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&self.0))
    }

    /// Encrypts `plaintext` bound to `aad`: nonce ‖ ciphertext ‖ tag.
    fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> anyhow::Result<Vec<u8>> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let mut out = nonce.to_vec();
        let ct = self
            .cipher()
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| anyhow!("encryption failed"))?;
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Turns `buffer` from plaintext into nonce ‖ ciphertext ‖ tag, the layout of
    /// [`SecretKey::encrypt`], in the same allocation when it has
    /// [`RECORD_OVERHEAD`] bytes of spare capacity: a record body is never held twice.
    fn encrypt_in_place(&self, buffer: &mut Vec<u8>, aad: &[u8]) -> anyhow::Result<()> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let tag = self
            .cipher()
            .encrypt_in_place_detached(&nonce, aad, buffer.as_mut_slice())
            .map_err(|_| anyhow!("encryption failed"))?;
        let len = buffer.len();
        buffer.reserve_exact(RECORD_OVERHEAD);
        buffer.extend_from_slice(&tag);
        buffer.extend_from_slice(&[0; NONCE_LEN]);
        buffer.copy_within(0..len + TAG_LEN, NONCE_LEN);
        buffer[..NONCE_LEN].copy_from_slice(&nonce);
        Ok(())
    }

    fn decrypt(&self, data: &[u8], aad: &[u8]) -> anyhow::Result<Vec<u8>> {
        if data.len() < NONCE_LEN + 16 {
            bail!("ciphertext too short");
        }
        let (nonce, ct) = data.split_at(NONCE_LEN);
        self.cipher()
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
            .map_err(|_| anyhow!("ciphertext does not authenticate under this key"))
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// Loads the master key: `AFYA_MASTER_KEY` if set, else `<data_dir>/keys/master.key`,
/// generating that file on first run.
pub fn load_master_key(data_dir: &Path) -> anyhow::Result<SecretKey> {
    if let Ok(encoded) = std::env::var("AFYA_MASTER_KEY") {
        let bytes = Zeroizing::new(
            B64.decode(encoded.trim())
                .context("AFYA_MASTER_KEY is not valid base64")?,
        );
        return SecretKey::from_slice(&bytes).context("AFYA_MASTER_KEY");
    }
    let dir = data_dir.join("keys");
    let path = dir.join("master.key");
    if path.exists() {
        let text = Zeroizing::new(
            std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?,
        );
        let bytes = Zeroizing::new(
            B64.decode(text.trim())
                .with_context(|| format!("{} is not valid base64", path.display()))?,
        );
        return SecretKey::from_slice(&bytes).with_context(|| path.display().to_string());
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = SecretKey::generate();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let encoded = Zeroizing::new(B64.encode(key.0));
    file.write_all(encoded.as_bytes())?;
    file.sync_all()?;
    tracing::info!(path = %path.display(), "generated a development master key");
    Ok(key)
}

/// Per-subject keys and the operations that use them.
pub struct KeyStore {
    master: SecretKey,
    index_key: SecretKey,
    tag_key: SecretKey,
    pool: AnyPool,
    cache: Mutex<HashMap<String, SecretKey>>,
}

/// An encrypted record body and how to find its key again.
pub struct EncryptedBlob {
    pub ciphertext: Vec<u8>,
    /// SHA-256 of `ciphertext`, lowercase hex.
    pub sha256: String,
    /// The record's data key, sealed under the patient's key.
    pub wrapped_key: String,
}

impl KeyStore {
    pub fn new(master: SecretKey, pool: AnyPool) -> KeyStore {
        let index_key = derive(&master, b"afyachain phone index v1");
        let tag_key = derive(&master, b"afyachain tags v1");
        KeyStore {
            master,
            index_key,
            tag_key,
            pool,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The subject's key if it exists (cached after first use).
    async fn stored_key(&self, subject: &str) -> anyhow::Result<Option<SecretKey>> {
        if let Some(key) = self.cache.lock().ok().and_then(|c| c.get(subject).cloned()) {
            return Ok(Some(key));
        }
        let wrapped: Option<String> =
            sqlx::query_scalar("SELECT wrapped_key FROM subject_keys WHERE subject_id = $1")
                .bind(subject.to_owned())
                .fetch_optional(&self.pool)
                .await
                .context("reading a subject key")?;
        let Some(wrapped) = wrapped else {
            return Ok(None);
        };
        let key = self.unwrap_key(subject, &wrapped)?;
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(subject.to_owned(), key.clone());
        }
        Ok(Some(key))
    }

    /// The subject's key, created on first use.
    async fn subject_key(&self, subject: &str) -> anyhow::Result<SecretKey> {
        if let Some(key) = self.stored_key(subject).await? {
            return Ok(key);
        }
        let sealed = self.wrap(subject, &SecretKey::generate())?;
        sqlx::query(
            "INSERT INTO subject_keys (subject_id, wrapped_key, created_at) \
             VALUES ($1, $2, $3) ON CONFLICT (subject_id) DO NOTHING",
        )
        .bind(subject.to_owned())
        .bind(sealed)
        .bind(chrono::Utc::now().to_rfc3339())
        .execute(&self.pool)
        .await
        .context("storing a subject key")?;
        // Another request may have created it first: use whichever won.
        self.stored_key(subject)
            .await?
            .ok_or_else(|| anyhow!("a subject key vanished while being created"))
    }

    /// An existing subject key; an error once shredded.
    async fn existing_subject_key(&self, subject: &str) -> anyhow::Result<SecretKey> {
        self.stored_key(subject)
            .await?
            .ok_or_else(|| anyhow!("no key for this subject (erased?)"))
    }

    fn wrap(&self, subject: &str, key: &SecretKey) -> anyhow::Result<String> {
        let aad = format!("subject-key:{subject}");
        Ok(encode(&self.master.encrypt(&key.0, aad.as_bytes())?))
    }

    fn unwrap_key(&self, subject: &str, wrapped: &str) -> anyhow::Result<SecretKey> {
        let aad = format!("subject-key:{subject}");
        let bytes = Zeroizing::new(self.master.decrypt(&decode(wrapped)?, aad.as_bytes())?);
        SecretKey::from_slice(&bytes)
    }

    /// Encrypts a personal field under the subject's key.
    pub async fn seal(&self, subject: &str, plaintext: &[u8]) -> anyhow::Result<String> {
        let key = self.subject_key(subject).await?;
        Ok(encode(&key.encrypt(plaintext, subject.as_bytes())?))
    }

    /// Decrypts a field sealed under the subject's key.
    pub async fn open(&self, subject: &str, sealed: &str) -> anyhow::Result<Vec<u8>> {
        let key = self.existing_subject_key(subject).await?;
        key.decrypt(&decode(sealed)?, subject.as_bytes())
    }

    /// Destroys the subject's key: everything sealed under it becomes unreadable.
    pub async fn shred(&self, subject: &str) -> anyhow::Result<()> {
        sqlx::query("DELETE FROM subject_keys WHERE subject_id = $1")
            .bind(subject.to_owned())
            .execute(&self.pool)
            .await
            .context("destroying a subject key")?;
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(subject);
        }
        Ok(())
    }

    /// A 32-byte secret of the subject's own, derived from its key: the seed of a
    /// patient's custodial chain address. `None` once the subject is shredded.
    pub async fn custodial_seed(&self, subject: &str) -> anyhow::Result<Option<[u8; 32]>> {
        Ok(self
            .stored_key(subject)
            .await?
            .map(|key| derive(&key, b"afyachain custodial address v1").0))
    }

    /// A keyed hash of a normalised phone number, to find an account by phone without
    /// storing the number.
    pub fn phone_index(&self, msisdn: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.index_key.0)
            .unwrap_or_else(|_| unreachable_hmac());
        mac.update(msisdn.as_bytes());
        hex(&mac.finalize().into_bytes())
    }

    /// An HMAC-SHA256 tag over `data` for one purpose (`domain`), under a key derived
    /// from the master key: session tokens and request fingerprints. Tags made for one
    /// domain never verify for another.
    pub fn tag(&self, domain: &str, data: &[u8]) -> [u8; 32] {
        self.tag_parts(domain, &[data])
    }

    /// [`KeyStore::tag`] of the concatenation of `parts`, without concatenating them:
    /// a request fingerprint covers a whole upload without a copy of it.
    pub fn tag_parts(&self, domain: &str, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = self.tag_mac(domain, b"");
        for part in parts {
            mac.update(part);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(&mac.finalize().into_bytes());
        out
    }

    /// Whether `tag` is [`KeyStore::tag`] of `data` in `domain`, in constant time.
    pub fn verify_tag(&self, domain: &str, data: &[u8], tag: &[u8]) -> bool {
        self.tag_mac(domain, data).verify_slice(tag).is_ok()
    }

    fn tag_mac(&self, domain: &str, data: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.tag_key.0)
            .unwrap_or_else(|_| unreachable_hmac());
        mac.update(domain.as_bytes());
        mac.update(&[0]);
        mac.update(data);
        mac
    }

    /// Encrypts a record body under a fresh data key, sealed under the patient's key.
    /// The body is encrypted in its own buffer (give it [`RECORD_OVERHEAD`] bytes of
    /// spare capacity and it is never copied) and hashed on a blocking thread, so the
    /// server's event loop keeps serving meanwhile.
    pub async fn encrypt_record(
        &self,
        patient: &str,
        record: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<EncryptedBlob> {
        let data_key = SecretKey::generate();
        let key = data_key.clone();
        let aad = record.as_bytes().to_vec();
        let (ciphertext, sha256) = tokio::task::spawn_blocking(move || {
            let mut buffer = body;
            key.encrypt_in_place(&mut buffer, &aad)?;
            let sha256 = hex(&Sha256::digest(&buffer));
            anyhow::Ok((buffer, sha256))
        })
        .await
        .context("encrypting a record")??;
        let wrapped_key = self.seal(patient, &data_key.0).await?;
        Ok(EncryptedBlob {
            ciphertext,
            sha256,
            wrapped_key,
        })
    }

    /// Decrypts a record body.
    pub async fn decrypt_record(
        &self,
        patient: &str,
        record: &str,
        wrapped_key: &str,
        ciphertext: &[u8],
    ) -> anyhow::Result<Vec<u8>> {
        let data_key = Zeroizing::new(self.open(patient, wrapped_key).await?);
        SecretKey::from_slice(&data_key)?.decrypt(ciphertext, record.as_bytes())
    }
}

fn derive(master: &SecretKey, label: &[u8]) -> SecretKey {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(&master.0).unwrap_or_else(|_| unreachable_hmac());
    mac.update(label);
    let mut out = [0u8; 32];
    out.copy_from_slice(&mac.finalize().into_bytes());
    SecretKey(out)
}

// HMAC accepts keys of any length; this cannot happen.
fn unreachable_hmac() -> Hmac<Sha256> {
    unreachable!("HMAC-SHA256 takes keys of any length")
}

fn encode(bytes: &[u8]) -> String {
    format!("{PREFIX}{}", B64.encode(bytes))
}

fn decode(text: &str) -> anyhow::Result<Vec<u8>> {
    let body = text
        .strip_prefix(PREFIX)
        .ok_or_else(|| anyhow!("unknown ciphertext format"))?;
    B64.decode(body).context("ciphertext is not valid base64")
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn encrypting_in_place_gives_the_same_format_in_the_same_allocation() {
        let key = SecretKey::generate();
        let plaintext = b"%PDF-1.4 a record".to_vec();
        let mut buffer = Vec::with_capacity(plaintext.len() + RECORD_OVERHEAD);
        buffer.extend_from_slice(&plaintext);
        let before = buffer.as_ptr();
        key.encrypt_in_place(&mut buffer, b"record-1").unwrap();
        assert_eq!(buffer.as_ptr(), before, "no reallocation");
        assert_eq!(buffer.len(), plaintext.len() + RECORD_OVERHEAD);
        assert_eq!(key.decrypt(&buffer, b"record-1").unwrap(), plaintext);
        assert!(
            key.decrypt(&buffer, b"record-2").is_err(),
            "bound to its record"
        );
        // Without spare room it still works, at the cost of a reallocation.
        let mut tight = plaintext.clone();
        key.encrypt_in_place(&mut tight, b"r").unwrap();
        assert_eq!(key.decrypt(&tight, b"r").unwrap(), plaintext);
    }

    // The lazy pool wants a runtime, though it is never used.
    #[tokio::test]
    async fn a_tag_of_parts_is_the_tag_of_their_concatenation() {
        let store = KeyStore {
            master: SecretKey::generate(),
            index_key: SecretKey::generate(),
            tag_key: SecretKey::generate(),
            pool: lazy_pool(),
            cache: Mutex::new(HashMap::new()),
        };
        let whole = store.tag("request fingerprint", b"POST\n/v1/x\nbody\n");
        let parts: [&[u8]; 4] = [b"POST\n", b"/v1/x\n", b"body", b"\n"];
        assert_eq!(store.tag_parts("request fingerprint", &parts), whole);
        assert_ne!(store.tag_parts("another domain", &parts), whole);
    }

    /// A pool that is never connected: the tags need none.
    fn lazy_pool() -> AnyPool {
        sqlx::any::install_default_drivers();
        sqlx::any::AnyPoolOptions::new()
            .connect_lazy("sqlite::memory:")
            .unwrap()
    }
}
