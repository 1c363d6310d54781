//! The remote blob store: any S3-compatible service (the API ChainSafe Storage spoke;
//! Filebase, Storj, 4EVERLAND or a self-hosted S3 server today), addressed path-style
//! and signed with AWS Signature V4 by `object_store`.

use std::fmt;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, PutPayload, RetryConfig};

/// Where and how to reach the S3 service.
#[derive(Clone)]
pub struct S3Settings {
    /// Base URL, e.g. `https://s3.filebase.com` or `http://127.0.0.1:9000`.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    /// Bound on one request, including its own quick retries; a PUT or GET of a
    /// large blob gets more (see [`S3Remote::put`]).
    pub timeout: Duration,
}

/// A transfer slower than this (bytes/s) is given up as failed.
const SLOWEST_RATE: u64 = 256 * 1024;

/// Bound on a probe: readiness answers quickly even when the store hangs.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

impl fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("access_key", &"<set>")
            .field("secret_key", &"<redacted>")
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Why a call to the remote store failed, in the terms an operator acts on.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("no such object")]
    NotFound,
    /// 401/403: wrong access key or secret, or no permission on the bucket.
    #[error("the S3 store refused the credentials or the permission ({0})")]
    Unauthorized(String),
    /// The service answered something else, or could not be reached at all.
    #[error("the S3 store failed or could not be reached ({0})")]
    Unavailable(String),
}

/// What a probe of the remote store found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteState {
    Ok,
    /// Wrong access key or secret key, or no permission on the bucket.
    Unauthorized,
    /// The bucket does not exist (it is not created automatically).
    BucketMissing,
    /// Down, refusing connections, timing out or answering with server errors.
    Unreachable,
}

impl RemoteState {
    pub fn as_str(self) -> &'static str {
        match self {
            RemoteState::Ok => "ok",
            RemoteState::Unauthorized => "unauthorized",
            RemoteState::BucketMissing => "bucket_missing",
            RemoteState::Unreachable => "unreachable",
        }
    }
}

/// A stored object's identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    pub etag: Option<String>,
}

/// The S3 client, one per process.
pub struct S3Remote {
    store: AmazonS3,
    backend: String,
    timeout: Duration,
}

/// The object key of a blob: content-addressed by the SHA-256 of its ciphertext.
pub fn object_key(sha256: &str) -> String {
    format!("blobs/{sha256}")
}

impl S3Remote {
    /// Builds the client; nothing is sent until it is used.
    pub fn new(settings: &S3Settings) -> anyhow::Result<S3Remote> {
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            // Quick retries for a dropped connection; the replicator's own backoff
            // handles anything longer.
            max_retries: 2,
            retry_timeout: settings.timeout,
        };
        let store = AmazonS3Builder::new()
            .with_endpoint(settings.endpoint.trim_end_matches('/'))
            .with_bucket_name(&settings.bucket)
            .with_region(&settings.region)
            .with_access_key_id(&settings.access_key)
            .with_secret_access_key(&settings.secret_key)
            .with_virtual_hosted_style_request(false)
            .with_retry(retry)
            // Plain HTTP only when the endpoint says so (a loopback or private server).
            // Each call is bounded below, by the size it moves; this only catches a
            // request that would outlive any of those bounds.
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(settings.endpoint.starts_with("http://"))
                    .with_timeout(Duration::from_secs(3600))
                    .with_connect_timeout(Duration::from_secs(5).min(settings.timeout)),
            )
            .build()
            .map_err(|e| anyhow::anyhow!("the S3 settings are not usable: {e}"))?;
        Ok(S3Remote {
            store,
            backend: format!("s3:{}", settings.bucket),
            timeout: settings.timeout,
        })
    }

    /// The backend's name in `RecordStored` and the read models: `s3:<bucket>`.
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// The bound on a call that moves `bytes`: the base timeout plus the time the
    /// bytes take at the slowest acceptable rate.
    fn limit(&self, bytes: u64) -> Duration {
        self.timeout + Duration::from_secs(bytes / SLOWEST_RATE)
    }

    pub async fn head(&self, key: &str) -> Result<ObjectInfo, RemoteError> {
        let meta = self
            .bounded(self.timeout, self.store.head(&Path::from(key)))
            .await?;
        Ok(ObjectInfo {
            size: meta.size,
            etag: meta.e_tag,
        })
    }

    /// Stores `bytes` under `key` (overwriting); returns the ETag.
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<Option<String>, RemoteError> {
        let limit = self.limit(bytes.len() as u64);
        let payload = PutPayload::from(bytes::Bytes::from(bytes));
        let done = self
            .bounded(limit, self.store.put(&Path::from(key), payload))
            .await?;
        Ok(done.e_tag)
    }

    /// The object's bytes and ETag.
    pub async fn get(&self, key: &str) -> Result<(Vec<u8>, Option<String>), RemoteError> {
        let result = self
            .bounded(self.timeout, self.store.get(&Path::from(key)))
            .await?;
        let etag = result.meta.e_tag.clone();
        let limit = self.limit(result.meta.size);
        let bytes = self.bounded(limit, result.bytes()).await?;
        Ok((bytes.to_vec(), etag))
    }

    /// Lists an empty prefix: proves the endpoint answers, accepts the credentials and
    /// has the bucket, without writing anything.
    pub async fn probe(&self) -> RemoteState {
        let prefix = Path::from("afyachain-probe");
        match self
            .bounded(
                PROBE_TIMEOUT.min(self.timeout),
                self.store.list_with_delimiter(Some(&prefix)),
            )
            .await
        {
            Ok(_) => RemoteState::Ok,
            Err(error) => {
                tracing::warn!(backend = %self.backend, %error, "remote blob store probe failed");
                match error {
                    RemoteError::NotFound => RemoteState::BucketMissing,
                    RemoteError::Unauthorized(_) => RemoteState::Unauthorized,
                    RemoteError::Unavailable(_) => RemoteState::Unreachable,
                }
            }
        }
    }

    async fn bounded<T>(
        &self,
        limit: Duration,
        call: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<T, RemoteError> {
        match tokio::time::timeout(limit, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(classify(error)),
            Err(_) => Err(RemoteError::Unavailable(format!(
                "no answer within {} s",
                limit.as_secs_f32()
            ))),
        }
    }
}

fn classify(error: object_store::Error) -> RemoteError {
    match error {
        object_store::Error::NotFound { .. } => RemoteError::NotFound,
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => {
            RemoteError::Unauthorized(one_line(&error.to_string()))
        }
        other => {
            // Some calls (a listing) come back as `Generic`, the HTTP status only in the
            // message of an error type object_store does not export.
            let text = one_line(&other.to_string());
            if text.contains("status code: 401") || text.contains("status code: 403") {
                RemoteError::Unauthorized(text)
            } else if text.contains("status code: 404") {
                RemoteError::NotFound
            } else {
                RemoteError::Unavailable(text)
            }
        }
    }
}

/// An error for a log line or a status column: one line, bounded.
pub fn one_line(text: &str) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let flat = flat.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(400) {
        Some((end, _)) => format!("{}…", &flat[..end]),
        None => flat,
    }
}
