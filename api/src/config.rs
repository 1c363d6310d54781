//! Configuration from the environment, with defaults that need nothing set.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use chain_adapter::chain::{ChainAddress, ChainMode, ChainSettings};
use chain_adapter::storage::{ReplicationSettings, S3Settings};
use eventstore::StoreConfig;

/// Everything `afyachain` reads from its environment.
#[derive(Clone, Debug)]
pub struct Config {
    /// `AFYA_DATA_DIR`, default `./data`: SQLite store, development keys, lock files.
    pub data_dir: PathBuf,
    /// `AFYA_LISTEN`, default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// `DATABASE_URL` selects PostgreSQL; otherwise SQLite in the data directory.
    pub store: StoreConfig,
    /// `AFYA_MAX_UPLOAD_BYTES`, default 25 MiB: larger uploads get 413.
    pub max_upload_bytes: usize,
    /// How much memory uploads in flight may hold, and how slowly bodies may arrive.
    pub bodies: BodyLimits,
    /// `AFYA_EXPLORER_TX_URL`, e.g. `https://explorer.zksync.io/tx/`: the web app links
    /// a record's token transaction to this prefix followed by the hash (unset: no link).
    pub explorer_tx_url: Option<String>,
    /// `AFYA_SESSION_TTL_SECS`, default 8 hours: how long a sign-in lasts.
    pub session_lifetime: chrono::Duration,
    /// `AFYA_SIGNIN_MAX_FAILURES_PER_PHONE` (default 5) and `…_PER_IP` (default 20)
    /// failed sign-ins within `AFYA_SIGNIN_WINDOW_SECS` (default 900) lock further
    /// attempts until the window ends (429); so do
    /// `AFYA_SHARE_CODE_MAX_MISSES_PER_DOCTOR` (default 20) share-code look-ups of one
    /// doctor that found no patient. Counted in the store, across instances.
    pub sign_in_limits: SignInLimits,
    /// `AFYA_CONSISTENCY_TIMEOUT_MS`, default 5000: how long a command's answer waits
    /// for the read models to show its effect.
    pub consistency_timeout: Duration,
    /// `AFYA_BLOB_STORE=s3` (default `local`) replicates encrypted blobs to an S3
    /// store: `AFYA_S3_ENDPOINT`, `AFYA_S3_BUCKET`, `AFYA_S3_REGION` (default
    /// `us-east-1`), `AFYA_S3_ACCESS_KEY`, `AFYA_S3_SECRET_KEY` (or
    /// `AFYA_S3_SECRET_KEY_FILE`), `AFYA_S3_TIMEOUT_SECS` (default 30).
    pub s3: Option<S3Settings>,
    /// `AFYA_STORAGE_EVICT_LOCAL` (default false), `AFYA_STORAGE_MAX_ATTEMPTS` (10),
    /// `AFYA_STORAGE_RETRY_BASE_MS` (1000), `AFYA_STORAGE_RETRY_MAX_MS` (300000),
    /// `AFYA_STORAGE_CONCURRENCY` (4), `AFYA_STORAGE_POLL_MS` (1000).
    pub replication: ReplicationSettings,
    /// `AFYA_CHAIN_RPC_URL` turns the chain adapter on: `AFYA_CHAIN_ID`,
    /// `ZKSYNC_PRIVATE_KEY` (or `ZKSYNC_PRIVATE_KEY_FILE`), `AFYA_CHAIN_MODE=evm|zksync`,
    /// the four contract addresses, `AFYA_CHAIN_CONFIRMATIONS` (1),
    /// `AFYA_CHAIN_RECEIPT_TIMEOUT_SECS` (120), `AFYA_CHAIN_POLL_MS` (1000),
    /// `AFYA_CHAIN_ANCHOR_EVERY` (1000 events per audit anchor; 0: none),
    /// `AFYA_CHAIN_BATCH_GRANTS` (32 grants per transaction at most; 1: one each).
    pub chain: Option<ChainSettings>,
    /// `MPESA_CONSUMER_KEY` turns M-Pesa payments on: `MPESA_CONSUMER_SECRET`,
    /// `MPESA_SHORTCODE`, `MPESA_PASSKEY`, `MPESA_CALLBACK_URL` (ending
    /// `/v1/mpesa/callbacks/{path_token}/stk`), `MPESA_BASE_URL` (the sandbox),
    /// `MPESA_TRANSACTION_TYPE` (`paybill` or `buygoods`, with `MPESA_TILL_NUMBER`),
    /// `MPESA_RECONCILE_AFTER_SECS`
    /// (120), `MPESA_TIMEOUT_SECS` (15), `MPESA_POLL_MS` (1000).
    pub mpesa: Option<MpesaSettings>,
    /// Integrators: webhook deliveries and the live stream (see [`IntegrationSettings`]).
    pub integrations: IntegrationSettings,
    /// `AFYA_NATS_URL` turns the JetStream publisher on: `AFYA_NATS_STREAM` (default
    /// `AFYACHAIN_EVENTS`), `AFYA_NATS_SUBJECT_PREFIX` (default `afyachain.events`).
    pub nats: Option<nats_publisher::NatsSettings>,
}

/// What integrators receive and how.
#[derive(Clone, Debug)]
pub struct IntegrationSettings {
    /// `AFYA_WEBHOOK_MAX_ATTEMPTS` (5), `AFYA_WEBHOOK_BACKOFF_MS` (500, doubling up to
    /// a minute), `AFYA_WEBHOOK_TIMEOUT_SECS` (10), and the address policy applied at
    /// registration (422) and at every delivery: `AFYA_WEBHOOK_ALLOW_PRIVATE` (false)
    /// allows loopback, private and other non-public addresses (a development receiver).
    pub delivery: integrations::DeliverySettings,
    /// `AFYA_SSE_HEARTBEAT_SECS` (15): a comment line when nothing else was sent.
    pub heartbeat: Duration,
    /// `AFYA_SSE_BUFFER` (4096): events the shared live tail keeps; a client further
    /// behind than that reads the missed events from the store again.
    pub live_buffer: usize,
    /// `AFYA_SSE_SLOW_CLIENT_SECS` (30): a client that accepts nothing for this long
    /// (its socket buffers full) is disconnected; it resumes with `Last-Event-ID`. So a
    /// slow client never holds others back, and what waits for it is bounded.
    pub slow_client: Duration,
    /// `AFYA_SSE_MAX_STREAMS_PER_KEY` (8): event streams one key may hold open at once
    /// (more: 429), so one integrator cannot tie up the store with catch-ups.
    pub max_streams_per_key: usize,
}

fn integration_settings() -> anyhow::Result<IntegrationSettings> {
    let defaults = integrations::DeliverySettings::default();
    let max_attempts: u32 = number("AFYA_WEBHOOK_MAX_ATTEMPTS", defaults.max_attempts)?;
    if !(1..=50).contains(&max_attempts) {
        anyhow::bail!("AFYA_WEBHOOK_MAX_ATTEMPTS must be between 1 and 50");
    }
    let heartbeat: u64 = number("AFYA_SSE_HEARTBEAT_SECS", 15)?;
    if !(1..=300).contains(&heartbeat) {
        anyhow::bail!("AFYA_SSE_HEARTBEAT_SECS must be between 1 and 300");
    }
    let live_buffer: usize = number("AFYA_SSE_BUFFER", 4096)?;
    if !(16..=1_000_000).contains(&live_buffer) {
        anyhow::bail!("AFYA_SSE_BUFFER must be between 16 and 1000000");
    }
    Ok(IntegrationSettings {
        delivery: integrations::DeliverySettings {
            max_attempts,
            base_backoff: Duration::from_millis(number("AFYA_WEBHOOK_BACKOFF_MS", 500)?.max(1)),
            timeout: Duration::from_secs(number("AFYA_WEBHOOK_TIMEOUT_SECS", 10)?.max(1)),
            address: integrations::AddressPolicy::new(matches!(
                var("AFYA_WEBHOOK_ALLOW_PRIVATE").as_deref().map(str::trim),
                Some("true" | "1" | "yes")
            )),
            ..defaults
        },
        heartbeat: Duration::from_secs(heartbeat),
        live_buffer,
        max_streams_per_key: number::<usize>("AFYA_SSE_MAX_STREAMS_PER_KEY", 8)?.clamp(1, 10_000),
        slow_client: Duration::from_secs(
            number::<u64>("AFYA_SSE_SLOW_CLIENT_SECS", 30)?.clamp(1, 3600),
        ),
    })
}

fn nats_settings() -> Option<nats_publisher::NatsSettings> {
    let url = var("AFYA_NATS_URL")?;
    let mut settings = nats_publisher::NatsSettings::new(url.trim());
    if let Some(stream) = var("AFYA_NATS_STREAM") {
        settings.stream = stream;
    }
    if let Some(prefix) = var("AFYA_NATS_SUBJECT_PREFIX") {
        settings.subject_prefix = prefix;
    }
    Some(settings)
}

/// M-Pesa through Daraja.
#[derive(Clone)]
pub struct MpesaSettings {
    pub daraja: mpesa_adapter::daraja::DarajaConfig,
    /// The unguessable part of the callback path (never logged).
    pub path_token: String,
    pub worker: mpesa_adapter::worker::WorkerSettings,
    /// `AFYA_PROMPTS_PER_DOCTOR` (default 20) prompts a doctor may have pushed, and
    /// `AFYA_PROMPTS_PER_PATIENT` (default 5) prompts one patient's phone may get,
    /// within `AFYA_PROMPT_WINDOW_SECS` (default 3600); more get 429. Counted in the
    /// store, across instances.
    pub prompts_per_doctor: crate::ratelimit::Rule,
    pub prompts_per_patient: crate::ratelimit::Rule,
}

impl std::fmt::Debug for MpesaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpesaSettings")
            .field("daraja", &self.daraja)
            .field("path_token", &"<redacted>")
            .field("worker", &self.worker)
            .finish()
    }
}

fn secret(name: &str) -> anyhow::Result<String> {
    match var(&format!("{name}_FILE")) {
        Some(path) => Ok(std::fs::read_to_string(path.trim())
            .with_context(|| format!("reading {name}_FILE={path}"))?
            .trim()
            .to_owned()),
        None => var(name)
            .map(|v| v.trim().to_owned())
            .with_context(|| format!("{name} must be set with MPESA_CONSUMER_KEY")),
    }
}

fn mpesa_settings() -> anyhow::Result<Option<MpesaSettings>> {
    let Some(consumer_key) = var("MPESA_CONSUMER_KEY") else {
        return Ok(None);
    };
    let callback_url = var("MPESA_CALLBACK_URL")
        .context("MPESA_CALLBACK_URL must be set with MPESA_CONSUMER_KEY")?
        .trim()
        .to_owned();
    let path_token = callback_url
        .strip_suffix("/stk")
        .and_then(|rest| rest.rsplit_once("/v1/mpesa/callbacks/"))
        .map(|(_, token)| token.to_owned())
        .filter(|t| {
            t.len() >= 16 && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .filter(|_| callback_url.starts_with("https://") || callback_url.starts_with("http://"))
        .context(
            "MPESA_CALLBACK_URL must be the full public URL ending /v1/mpesa/callbacks/{path_token}/stk, \
             the token at least 16 letters, digits, - or _",
        )?;
    let transaction_type = match var("MPESA_TRANSACTION_TYPE").as_deref().map(str::trim) {
        None | Some("paybill") => mpesa_adapter::daraja::TransactionType::PayBill,
        Some("buygoods") => mpesa_adapter::daraja::TransactionType::BuyGoods,
        Some(other) => anyhow::bail!("MPESA_TRANSACTION_TYPE={other} is not paybill or buygoods"),
    };
    let shortcode = var("MPESA_SHORTCODE")
        .context("MPESA_SHORTCODE must be set with MPESA_CONSUMER_KEY")?
        .trim()
        .to_owned();
    if shortcode.is_empty() || !shortcode.bytes().all(|b| b.is_ascii_digit()) {
        anyhow::bail!("MPESA_SHORTCODE must be digits");
    }
    // The limiter forgets windows a day old: none may be longer.
    let prompt_window = seconds_in_a_day("AFYA_PROMPT_WINDOW_SECS", 3600)?;
    let prompts = |name: &str, default: u32| -> anyhow::Result<crate::ratelimit::Rule> {
        let limit: u32 = number(name, default)?;
        if limit == 0 {
            anyhow::bail!("{name} must be at least 1");
        }
        Ok(crate::ratelimit::Rule {
            limit,
            window: prompt_window,
        })
    };
    Ok(Some(MpesaSettings {
        daraja: mpesa_adapter::daraja::DarajaConfig {
            base_url: var("MPESA_BASE_URL")
                .map(|u| u.trim().trim_end_matches('/').to_owned())
                .unwrap_or_else(|| mpesa_adapter::daraja::SANDBOX_URL.to_owned()),
            consumer_key: consumer_key.trim().to_owned(),
            consumer_secret: secret("MPESA_CONSUMER_SECRET")?,
            shortcode,
            till_number: var("MPESA_TILL_NUMBER").map(|t| t.trim().to_owned()),
            passkey: secret("MPESA_PASSKEY")?,
            callback_url,
            transaction_type,
            timeout: Duration::from_secs(number("MPESA_TIMEOUT_SECS", 15)?.max(1)),
            attempts: 3,
            backoff: Duration::from_millis(500),
        },
        path_token,
        worker: mpesa_adapter::worker::WorkerSettings {
            poll: Duration::from_millis(number("MPESA_POLL_MS", 1000)?.max(10)),
            reconcile_after: Duration::from_secs(number("MPESA_RECONCILE_AFTER_SECS", 120)?),
        },
        prompts_per_doctor: prompts("AFYA_PROMPTS_PER_DOCTOR", 20)?,
        prompts_per_patient: prompts("AFYA_PROMPTS_PER_PATIENT", 5)?,
    }))
}

/// Limits on failed guesses: sign-ins, and share codes.
#[derive(Clone, Copy, Debug)]
pub struct SignInLimits {
    pub per_phone: u32,
    pub per_ip: u32,
    /// Share-code look-ups per doctor that found nobody.
    pub share_code_misses: u32,
    pub window: Duration,
}

impl SignInLimits {
    fn rule(&self, limit: u32) -> crate::ratelimit::Rule {
        crate::ratelimit::Rule {
            limit,
            window: self.window,
        }
    }

    pub fn phone_rule(&self) -> crate::ratelimit::Rule {
        self.rule(self.per_phone)
    }

    pub fn address_rule(&self) -> crate::ratelimit::Rule {
        self.rule(self.per_ip)
    }

    pub fn share_code_rule(&self) -> crate::ratelimit::Rule {
        self.rule(self.share_code_misses)
    }
}

/// Bounds on request bodies besides their size: the memory uploads may hold, and how
/// slowly a body may arrive before it is cut with 408.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimits {
    /// `AFYA_UPLOAD_MEMORY_BYTES`, default 4 × `AFYA_MAX_UPLOAD_BYTES`: upload bodies
    /// held at once over all accounts (one account: one largest upload's worth).
    pub upload_memory_bytes: usize,
    /// `AFYA_UPLOAD_SPOOL_BYTES`, default 64 × `AFYA_MAX_UPLOAD_BYTES`: the disk that
    /// upload bodies still arriving may fill at once over all accounts (one account:
    /// four largest uploads' worth), charged as bodies arrive. A body is kept there,
    /// sealed under a key held in memory only, until it is whole; only then does it
    /// take its share of the memory.
    pub upload_spool_bytes: usize,
    /// The spool's share of one account: four largest uploads.
    pub upload_spool_account_bytes: usize,
    /// `AFYA_UPLOAD_WAIT_SECS`, default 120: how long an upload waits for its share of
    /// the spool, and then of the memory, before it is answered 503.
    pub upload_wait: Duration,
    /// `AFYA_JSON_BODY_SECS`, default 15: a JSON body must arrive whole within this.
    pub json_within: Duration,
    /// `AFYA_UPLOAD_MIN_BYTES_PER_SEC`, default 1024 (0: no minimum): the slowest
    /// average an upload may arrive at, once `upload_grace` has passed.
    pub upload_min_rate: u64,
    /// `AFYA_UPLOAD_GRACE_SECS`, default 10.
    pub upload_grace: Duration,
    /// `AFYA_UPLOAD_WITHIN_SECS`, default 1800: an upload must arrive whole within
    /// this (a largest one of 25 MiB then at about 14 KiB/s or faster), so that no
    /// upload holds its share of the upload memory for hours at the minimum rate.
    pub upload_within: Duration,
    /// `AFYA_BODY_IDLE_SECS`, default 15: the longest pause between two pieces of any
    /// body.
    pub idle: Duration,
}

fn body_limits(max_upload_bytes: usize) -> anyhow::Result<BodyLimits> {
    let upload_memory_bytes = number(
        "AFYA_UPLOAD_MEMORY_BYTES",
        max_upload_bytes.saturating_mul(4),
    )?;
    if upload_memory_bytes < max_upload_bytes {
        anyhow::bail!("AFYA_UPLOAD_MEMORY_BYTES must be at least AFYA_MAX_UPLOAD_BYTES");
    }
    let upload_spool_bytes = number(
        "AFYA_UPLOAD_SPOOL_BYTES",
        max_upload_bytes.saturating_mul(64),
    )?;
    if upload_spool_bytes < max_upload_bytes {
        anyhow::bail!("AFYA_UPLOAD_SPOOL_BYTES must be at least AFYA_MAX_UPLOAD_BYTES");
    }
    Ok(BodyLimits {
        upload_memory_bytes,
        upload_spool_bytes,
        upload_spool_account_bytes: max_upload_bytes.saturating_mul(4).min(upload_spool_bytes),
        upload_wait: seconds_in_a_day("AFYA_UPLOAD_WAIT_SECS", 120)?,
        json_within: seconds_in_a_day("AFYA_JSON_BODY_SECS", 15)?,
        upload_min_rate: number("AFYA_UPLOAD_MIN_BYTES_PER_SEC", 1024)?,
        upload_grace: seconds_in_a_day("AFYA_UPLOAD_GRACE_SECS", 10)?,
        upload_within: seconds_in_a_day("AFYA_UPLOAD_WITHIN_SECS", 1800)?,
        idle: seconds_in_a_day("AFYA_BODY_IDLE_SECS", 15)?,
    })
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// A number of seconds from 1 to 86,400: the rate limiter forgets windows a day old,
/// so no window may be longer (a lockout would end early), a window or bound under a
/// second means nothing, and a body bound of more than a day would overflow `Instant`.
fn seconds_in_a_day(name: &str, default: u64) -> anyhow::Result<Duration> {
    match number(name, default)? {
        n @ 1..=86_400 => Ok(Duration::from_secs(n)),
        _ => anyhow::bail!("{name} must be between 1 and 86400"),
    }
}

fn number<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match var(name) {
        Some(v) => v
            .trim()
            .parse()
            .ok()
            .with_context(|| format!("{name}={v} is not a whole number")),
        None => Ok(default),
    }
}

fn flag(name: &str, default: bool) -> anyhow::Result<bool> {
    match var(name).map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(default),
        Some(v) if matches!(v.as_str(), "1" | "true" | "yes" | "on") => Ok(true),
        Some(v) if matches!(v.as_str(), "0" | "false" | "no" | "off") => Ok(false),
        Some(v) => anyhow::bail!("{name}={v} is not true or false"),
    }
}

fn required(name: &str) -> anyhow::Result<String> {
    var(name).with_context(|| format!("{name} must be set when AFYA_BLOB_STORE=s3"))
}

fn s3_settings() -> anyhow::Result<Option<S3Settings>> {
    let kind = var("AFYA_BLOB_STORE").unwrap_or_else(|| "local".to_owned());
    match kind.trim() {
        "local" => return Ok(None),
        "s3" => {}
        other => anyhow::bail!("AFYA_BLOB_STORE={other} is not local or s3"),
    }
    let endpoint = required("AFYA_S3_ENDPOINT")?.trim().to_owned();
    if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
        anyhow::bail!("AFYA_S3_ENDPOINT={endpoint} is not an http(s) URL");
    }
    let secret_key = match var("AFYA_S3_SECRET_KEY_FILE") {
        Some(path) => std::fs::read_to_string(path.trim())
            .with_context(|| format!("reading AFYA_S3_SECRET_KEY_FILE={path}"))?
            .trim()
            .to_owned(),
        None => required("AFYA_S3_SECRET_KEY")?.trim().to_owned(),
    };
    let timeout: u64 = number("AFYA_S3_TIMEOUT_SECS", 30)?;
    if !(1..=600).contains(&timeout) {
        anyhow::bail!("AFYA_S3_TIMEOUT_SECS must be between 1 and 600");
    }
    Ok(Some(S3Settings {
        endpoint,
        bucket: required("AFYA_S3_BUCKET")?.trim().to_owned(),
        region: var("AFYA_S3_REGION").unwrap_or_else(|| "us-east-1".to_owned()),
        access_key: required("AFYA_S3_ACCESS_KEY")?.trim().to_owned(),
        secret_key,
        timeout: Duration::from_secs(timeout),
    }))
}

fn replication_settings() -> anyhow::Result<ReplicationSettings> {
    let defaults = ReplicationSettings::default();
    let settings = ReplicationSettings {
        evict_local: flag("AFYA_STORAGE_EVICT_LOCAL", defaults.evict_local)?,
        max_attempts: number("AFYA_STORAGE_MAX_ATTEMPTS", defaults.max_attempts)?,
        retry_base: Duration::from_millis(number("AFYA_STORAGE_RETRY_BASE_MS", 1000)?),
        retry_max: Duration::from_millis(number("AFYA_STORAGE_RETRY_MAX_MS", 300_000)?),
        concurrency: number("AFYA_STORAGE_CONCURRENCY", defaults.concurrency)?,
        poll: Duration::from_millis(number("AFYA_STORAGE_POLL_MS", 1000)?),
    };
    if settings.max_attempts == 0 || !(1..=64).contains(&settings.concurrency) {
        anyhow::bail!(
            "AFYA_STORAGE_MAX_ATTEMPTS must be at least 1 and AFYA_STORAGE_CONCURRENCY 1 to 64"
        );
    }
    if settings.retry_base.is_zero()
        || settings.retry_max < settings.retry_base
        || settings.poll < Duration::from_millis(10)
    {
        anyhow::bail!(
            "AFYA_STORAGE_RETRY_BASE_MS must be positive and at most AFYA_STORAGE_RETRY_MAX_MS, \
             and AFYA_STORAGE_POLL_MS at least 10"
        );
    }
    Ok(settings)
}

fn address(name: &str) -> anyhow::Result<Option<ChainAddress>> {
    match var(name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| anyhow::anyhow!("{name}={v} is not an address (0x and 40 hex digits)")),
    }
}

fn chain_settings() -> anyhow::Result<Option<ChainSettings>> {
    let Some(rpc_url) = var("AFYA_CHAIN_RPC_URL") else {
        return Ok(None);
    };
    let mode = match var("AFYA_CHAIN_MODE").as_deref().map(str::trim) {
        None | Some("evm") => ChainMode::Evm,
        Some("zksync") => ChainMode::Zksync,
        Some(other) => anyhow::bail!("AFYA_CHAIN_MODE={other} is not evm or zksync"),
    };
    let chain_id: u64 = var("AFYA_CHAIN_ID")
        .context("AFYA_CHAIN_ID must be set with AFYA_CHAIN_RPC_URL")?
        .trim()
        .parse()
        .context("AFYA_CHAIN_ID is not a whole number")?;
    let private_key = match var("ZKSYNC_PRIVATE_KEY_FILE") {
        Some(path) => std::fs::read_to_string(path.trim())
            .with_context(|| format!("reading ZKSYNC_PRIVATE_KEY_FILE={path}"))?
            .trim()
            .to_owned(),
        None => var("ZKSYNC_PRIVATE_KEY")
            .context("ZKSYNC_PRIVATE_KEY (the operator key) must be set with AFYA_CHAIN_RPC_URL")?
            .trim()
            .to_owned(),
    };
    let paymaster = address("AFYA_PAYMASTER_ADDRESS")?;
    if mode == ChainMode::Zksync && paymaster.is_none() {
        anyhow::bail!(
            "AFYA_CHAIN_MODE=zksync sends every transaction through the paymaster: set AFYA_PAYMASTER_ADDRESS"
        );
    }
    Ok(Some(ChainSettings {
        rpc_url: rpc_url.trim().to_owned(),
        chain_id,
        private_key,
        mode,
        record_token: address("AFYA_RECORD_TOKEN_ADDRESS")?,
        consent_registry: address("AFYA_CONSENT_REGISTRY_ADDRESS")?,
        audit_anchor: address("AFYA_AUDIT_ANCHOR_ADDRESS")?,
        paymaster,
        confirmations: number("AFYA_CHAIN_CONFIRMATIONS", 1)?,
        receipt_timeout: Duration::from_secs(number("AFYA_CHAIN_RECEIPT_TIMEOUT_SECS", 120)?),
        poll: Duration::from_millis(number("AFYA_CHAIN_POLL_MS", 1000)?.max(10)),
        grants_per_transaction: match number("AFYA_CHAIN_BATCH_GRANTS", 32)? {
            n @ 1..=64 => n,
            _ => anyhow::bail!("AFYA_CHAIN_BATCH_GRANTS must be between 1 and 64"),
        },
        anchor_every: match number("AFYA_CHAIN_ANCHOR_EVERY", 1000)? {
            // Each anchor is itself an event: one per event would never end.
            1 => anyhow::bail!("AFYA_CHAIN_ANCHOR_EVERY must be 0 (no anchors) or at least 2"),
            n => n,
        },
    }))
}

impl Config {
    pub fn from_env() -> anyhow::Result<Config> {
        let data_dir = var("AFYA_DATA_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("data"));
        let listen = var("AFYA_LISTEN").unwrap_or_else(|| "127.0.0.1:8080".to_owned());
        let listen = listen.parse().with_context(|| {
            format!("AFYA_LISTEN={listen} is not an address like 127.0.0.1:8080")
        })?;
        let store = StoreConfig::from_env(&data_dir);
        let session_secs: i64 = number("AFYA_SESSION_TTL_SECS", 8 * 3600)?;
        if !(60..=30 * 86_400).contains(&session_secs) {
            anyhow::bail!("AFYA_SESSION_TTL_SECS must be between 60 and 2592000");
        }
        let max_upload_bytes: usize = number("AFYA_MAX_UPLOAD_BYTES", 25 * 1024 * 1024)?;
        Ok(Config {
            data_dir,
            listen,
            store,
            max_upload_bytes,
            bodies: body_limits(max_upload_bytes)?,
            explorer_tx_url: explorer_tx_url()?,
            session_lifetime: chrono::Duration::seconds(session_secs),
            sign_in_limits: SignInLimits {
                per_phone: number("AFYA_SIGNIN_MAX_FAILURES_PER_PHONE", 5)?,
                per_ip: number("AFYA_SIGNIN_MAX_FAILURES_PER_IP", 20)?,
                share_code_misses: number("AFYA_SHARE_CODE_MAX_MISSES_PER_DOCTOR", 20)?,
                window: seconds_in_a_day("AFYA_SIGNIN_WINDOW_SECS", 900)?,
            },
            consistency_timeout: Duration::from_millis(number(
                "AFYA_CONSISTENCY_TIMEOUT_MS",
                5000,
            )?),
            s3: s3_settings()?,
            replication: replication_settings()?,
            chain: chain_settings()?,
            mpesa: mpesa_settings()?,
            integrations: integration_settings()?,
            nats: nats_settings(),
        })
    }
}

/// `AFYA_EXPLORER_TX_URL` must be an http(s) URL: the web app puts it in links.
fn explorer_tx_url() -> anyhow::Result<Option<String>> {
    let Some(url) = var("AFYA_EXPLORER_TX_URL") else {
        return Ok(None);
    };
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        anyhow::bail!("AFYA_EXPLORER_TX_URL must start with https:// or http://");
    }
    Ok(Some(url))
}
