//! Signed webhook deliveries.
//!
//! Each webhook is a checkpointed consumer of the global log named `webhook:<id>`: it
//! POSTs the [`IntegratorEvent`](crate::view::IntegratorEvent) of every event of a
//! subscribed type, in log order, and moves its checkpoint after each one. The effect
//! is outside the database, so delivery is at-least-once (a crash between the POST
//! and the checkpoint delivers again) and receivers deduplicate by the
//! `AfyaChain-Event-Id` header (docs/architecture.md rule 4). An event that still
//! fails after [`DeliverySettings::max_attempts`] is parked in `webhook_failures` so
//! one broken receiver does not stall its own stream forever; an operator replays
//! parked events with [`request_replay`]. Replayed events arrive after newer ones; the
//! body's `position` gives their place in the log.
//!
//! Each deliverer is a [`Worker`] of the work runtime ([`eventstore::work`]): one
//! instance of all those on a store holds the lock `webhook:<id>` and delivers, woken
//! by every commit and on its poll; a stop abandons the attempt in flight (it is
//! delivered again: at-least-once) and the pause before the next one.
//!
//! Deliveries go only where the webhook's [`AddressPolicy`] allows: an IP literal is
//! checked before each attempt, and a name is resolved by the policy's resolver, so
//! the client connects to the addresses that were checked. What the integrator is
//! told of a failed attempt is only [`DeliveryError`]'s text: `unreachable`, `timeout`
//! or `HTTP <status>`, so failures cannot tell a closed port from a refused address.
//!
//! Signature: `AfyaChain-Signature: v1=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>`
//! with `AfyaChain-Timestamp` in Unix seconds; receivers should also reject timestamps
//! far from their clock, against replays.

use std::cell::{Cell, OnceCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use anyhow::Context as _;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use eventstore::consumer::{create_checkpoint, load_checkpoint, now_text};
use eventstore::work::{self, Outcome, Round, WakeOn, Worker, WorkerActor};
use eventstore::{Backend, LogCursor, Store, StoredEvent};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use sqlx::AnyPool;
use tokio::sync::watch;
use uuid::Uuid;

use crate::address::{AddressPolicy, PolicyResolver};
use crate::view::public_view;

/// Header carrying the event id (receivers deduplicate by it).
pub const HEADER_EVENT_ID: &str = "AfyaChain-Event-Id";
/// Header carrying the event type.
pub const HEADER_EVENT_TYPE: &str = "AfyaChain-Event-Type";
/// Header carrying the signing time, Unix seconds.
pub const HEADER_TIMESTAMP: &str = "AfyaChain-Timestamp";
/// Header carrying `v1=<hex signature>`.
pub const HEADER_SIGNATURE: &str = "AfyaChain-Signature";

/// Events read from the log per batch.
const BATCH: i64 = 100;
/// Parked failures replayed per pass.
const REPLAY_BATCH: i64 = 100;
/// Upper bound of the retry backoff.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> Option<HmacSha256> {
    // HMAC takes keys of any length, so this never fails.
    let mut mac = HmacSha256::new_from_slice(secret).ok()?;
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Some(mac)
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    bytes
        .chunks(2)
        .map(|pair| match pair {
            [hi, lo] => Some((digit(*hi)? << 4) | digit(*lo)?),
            _ => None,
        })
        .collect()
}

/// The `AfyaChain-Signature` header value for `body` sent at `timestamp`:
/// `v1=<lowercase hex HMAC-SHA256(secret, "{timestamp}.{body}")>`.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    match mac(secret, timestamp, body) {
        Some(mac) => format!("v1={}", to_hex(&mac.finalize().into_bytes())),
        None => "v1=".to_owned(),
    }
}

/// Whether `signature_header` holds a valid `v1=` signature of `body` at `timestamp`
/// (several comma-separated signatures are accepted, for secret rotation). Compares in
/// constant time. Checking that `timestamp` is recent is the caller's part.
pub fn verify(secret: &[u8], timestamp: i64, body: &[u8], signature_header: &str) -> bool {
    signature_header
        .split(',')
        .filter_map(|part| part.trim().strip_prefix("v1="))
        .filter_map(from_hex)
        .any(|sig| mac(secret, timestamp, body).is_some_and(|m| m.verify_slice(&sig).is_ok()))
}

/// One integrator's webhook: where to POST which event types, and the signing secret.
#[derive(Clone)]
pub struct WebhookSpec {
    /// The webhook's id; its consumer is named `webhook:<id>`.
    pub id: Uuid,
    /// Where events are POSTed.
    pub url: String,
    /// Event types delivered; empty delivers none.
    pub types: Vec<String>,
    /// The HMAC signing secret shared with the receiver.
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for WebhookSpec {
    // The secret never reaches a log; the URL may carry a token, so it stays out too.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSpec")
            .field("id", &self.id)
            .field("url", &"<redacted>")
            .field("types", &self.types)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl WebhookSpec {
    /// Whether events of `event_type` are delivered to this webhook.
    pub fn wants(&self, event_type: &str) -> bool {
        self.types.iter().any(|t| t == event_type)
    }
}

/// How hard to try a delivery.
#[derive(Clone, Debug)]
pub struct DeliverySettings {
    /// Attempts before an event is parked (at least 1).
    pub max_attempts: u32,
    /// Wait before the second attempt; doubles for each further one, at most 60 s.
    pub base_backoff: Duration,
    /// Timeout of one HTTP request.
    pub timeout: Duration,
    /// How often the log and replay requests are looked at without a commit signal
    /// (replay requests made by another process are seen at this pace).
    pub poll_interval: Duration,
    /// Which addresses deliveries may connect to, and how names are resolved.
    pub address: AddressPolicy,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            max_attempts: 5,
            base_backoff: Duration::from_millis(500),
            timeout: Duration::from_secs(10),
            poll_interval: Duration::from_secs(2),
            address: AddressPolicy::default(),
        }
    }
}

impl DeliverySettings {
    /// The wait after failed attempt number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(20);
        self.base_backoff
            .checked_mul(factor)
            .unwrap_or(MAX_BACKOFF)
            .min(MAX_BACKOFF)
    }
}

/// Statements creating the webhook tables; portable across SQLite and PostgreSQL.
pub fn schema(_backend: Backend) -> Vec<String> {
    vec![
        // replay_requested is 0/1: BIGINT reads the same through sqlx's Any driver on
        // both backends, where BOOLEAN does not.
        "CREATE TABLE IF NOT EXISTS webhook_failures (
            webhook_id TEXT NOT NULL,
            position BIGINT NOT NULL,
            event_id TEXT NOT NULL,
            event_type TEXT NOT NULL,
            attempts BIGINT NOT NULL,
            last_error TEXT NOT NULL,
            failed_at TEXT NOT NULL,
            replay_requested BIGINT NOT NULL DEFAULT 0,
            delivered_at TEXT,
            PRIMARY KEY (webhook_id, position)
        )"
        .into(),
    ]
}

/// Creates the webhook tables if they do not exist.
pub async fn create_schema(store: &Store) -> anyhow::Result<()> {
    for statement in schema(store.backend()) {
        sqlx::query(&statement)
            .execute(store.any_pool())
            .await
            .context("creating the webhook tables")?;
    }
    Ok(())
}

/// The consumer (checkpoint and lock) name of webhook `id`.
pub fn consumer_name(id: Uuid) -> String {
    format!("webhook:{id}")
}

/// Creates webhook `id`'s checkpoint at `start` if it has none, and returns its
/// checkpoint. A new webhook normally starts at [`Store::log_end`]: it receives what
/// happens from now on, not the history.
pub async fn ensure_checkpoint(
    store: &Store,
    id: Uuid,
    start: LogCursor,
) -> anyhow::Result<LogCursor> {
    let name = consumer_name(id);
    create_checkpoint(store.any_pool(), &name, start).await?;
    load_checkpoint(store.any_pool(), &name).await
}

/// An event parked after its delivery attempts failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The webhook.
    pub webhook_id: Uuid,
    /// The event's log position.
    pub position: i64,
    /// The event's id.
    pub event_id: Uuid,
    /// The event's type.
    pub event_type: String,
    /// Attempts made so far.
    pub attempts: i64,
    /// What the last attempt got: `unreachable`, `timeout` or `HTTP <status>` (see
    /// [`DeliveryError`]).
    pub last_error: String,
    /// When the last attempt failed.
    pub failed_at: DateTime<Utc>,
    /// Whether a replay was requested and is still to be tried.
    pub replay_requested: bool,
}

type FailureRow = (String, i64, String, String, i64, String, String, i64);

fn failure_from_row(row: FailureRow) -> anyhow::Result<Failure> {
    let (webhook_id, position, event_id, event_type, attempts, last_error, failed_at, replay) = row;
    // Rows parked before the address policy may hold the connect error's own text
    // ("connection failed … 127.0.0.1:PORT …"), which tells a closed port from an open
    // one: anything but the words a delivery records now is shown as `unreachable`.
    let shown = |text: String| {
        let status = text.strip_prefix("HTTP ").map(str::as_bytes);
        let known = text == "unreachable"
            || text == "timeout"
            || status.is_some_and(|s| s.len() == 3 && s.iter().all(u8::is_ascii_digit));
        if known {
            text
        } else {
            DeliveryError::Unreachable.to_string()
        }
    };
    let last_error = shown(last_error);
    Ok(Failure {
        webhook_id: Uuid::parse_str(&webhook_id).context("webhook_failures.webhook_id")?,
        position,
        event_id: Uuid::parse_str(&event_id).context("webhook_failures.event_id")?,
        event_type,
        attempts,
        last_error,
        failed_at: DateTime::parse_from_rfc3339(&failed_at)
            .context("webhook_failures.failed_at")?
            .with_timezone(&Utc),
        replay_requested: replay != 0,
    })
}

/// Parked, not yet delivered failures of `webhook_id` after position `after`, in
/// position order (page on with the last one's position).
pub async fn failures(
    pool: &AnyPool,
    webhook_id: Uuid,
    after: i64,
    limit: i64,
) -> anyhow::Result<Vec<Failure>> {
    let rows: Vec<FailureRow> = sqlx::query_as(
        "SELECT webhook_id, position, event_id, event_type, attempts, last_error, failed_at, \
         replay_requested FROM webhook_failures \
         WHERE webhook_id = $1 AND position > $2 AND delivered_at IS NULL \
         ORDER BY position LIMIT $3",
    )
    .bind(webhook_id.to_string())
    .bind(after)
    .bind(limit.max(0))
    .fetch_all(pool)
    .await
    .context("listing webhook failures")?;
    rows.into_iter().map(failure_from_row).collect()
}

/// Marks every parked failure of `webhook_id` for one more delivery attempt; returns
/// how many. The deliverer tries them before new events, at its next pass.
pub async fn request_replay(pool: &AnyPool, webhook_id: Uuid) -> anyhow::Result<u64> {
    let done = sqlx::query(
        "UPDATE webhook_failures SET replay_requested = 1 \
         WHERE webhook_id = $1 AND delivered_at IS NULL",
    )
    .bind(webhook_id.to_string())
    .execute(pool)
    .await
    .context("requesting a webhook replay")?;
    Ok(done.rows_affected())
}

/// The parked, not yet delivered failures of each webhook that has any (its dead
/// letters).
pub async fn parked_counts(pool: &AnyPool) -> anyhow::Result<HashMap<Uuid, i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT webhook_id, count(*) FROM webhook_failures \
         WHERE delivered_at IS NULL GROUP BY webhook_id",
    )
    .fetch_all(pool)
    .await
    .context("counting parked webhook failures")?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, n)| Uuid::parse_str(&id).ok().map(|id| (id, n)))
        .collect())
}

/// A running deliverer of one webhook.
pub struct DelivererHandle {
    addr: Addr<WorkerActor<Deliverer>>,
    progress: watch::Receiver<LogCursor>,
    failed: Arc<AtomicU32>,
}

/// Asks a running deliverer how it is doing, without waiting on its round (for
/// `/readyz` and `/metrics`); it can be cloned, and holding one keeps nothing running.
#[derive(Clone)]
pub struct DelivererProbe {
    addr: Addr<WorkerActor<Deliverer>>,
    failed: Arc<AtomicU32>,
}

/// How a deliverer is doing in this instance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DelivererStatus {
    /// This instance holds the webhook's lock and delivers it (as of its last round).
    pub active: bool,
    /// Delivery attempts failed in a row while this instance delivers (0 once one
    /// succeeds, or when another instance takes over): its receiver is down or failing.
    pub failed_attempts: u32,
    /// Rounds failed in a row (its own database, or a fault).
    pub failed_rounds: u32,
}

impl DelivererStatus {
    /// Whether its last attempts or rounds failed.
    pub fn failing(&self) -> bool {
        self.failed_attempts > 0 || self.failed_rounds > 0
    }
}

impl DelivererProbe {
    /// The deliverer's status; `None` if it does not answer within `wait` (it has
    /// stopped). The work runtime answers at once, even while a round runs.
    pub async fn status(&self, wait: Duration) -> Option<DelivererStatus> {
        let asked = tokio::time::timeout(wait, self.addr.send(work::Status)).await;
        let worker = asked.ok()?.ok()?;
        // Attempts count only while this instance delivers: one that lost the lock
        // between rounds keeps its last count until it is active again.
        let failed_attempts = if worker.active {
            self.failed.load(Ordering::Relaxed)
        } else {
            0
        };
        Some(DelivererStatus {
            active: worker.active,
            failed_attempts,
            failed_rounds: worker.failures,
        })
    }
}

impl DelivererHandle {
    /// The checkpoint as this instance last moved it.
    pub fn cursor(&self) -> LogCursor {
        *self.progress.borrow()
    }

    /// A way to ask how the deliverer is doing (see [`DelivererProbe`]).
    pub fn probe(&self) -> DelivererProbe {
        DelivererProbe {
            addr: self.addr.clone(),
            failed: self.failed.clone(),
        }
    }

    /// Makes the deliverer look at the log and replay requests now (e.g. after
    /// [`request_replay`] in this process) rather than at its next tick.
    pub fn wake(&self) {
        self.addr.do_send(work::Wake);
    }

    /// Stops the deliverer: an attempt in flight is abandoned (it is delivered again
    /// later: at-least-once), the lock is released, and this returns once it has.
    pub async fn stop(self) {
        // An error means it has stopped already.
        let _ = self.addr.send(work::Stop).await;
    }
}

impl Drop for DelivererHandle {
    /// A deliverer nobody can stop any more stops, without being waited for.
    fn drop(&mut self) {
        self.addr.do_send(work::Stop);
    }
}

/// Starts delivering `spec`'s events on an actor of its own (one per webhook, so a
/// slow receiver delays nobody else), driven by the work runtime: one instance holds
/// the lock `webhook:<id>`, woken by every commit and every
/// [`DeliverySettings::poll_interval`]. Creates the tables and, if missing, a
/// checkpoint at the start of the log (call [`ensure_checkpoint`] first to start
/// elsewhere). Must be called within an actix system (it starts on the current
/// arbiter).
pub fn spawn(store: Store, spec: WebhookSpec, settings: DeliverySettings) -> DelivererHandle {
    let (progress, progress_rx) = watch::channel(LogCursor::START);
    let poll = settings.poll_interval;
    let failed = Arc::new(AtomicU32::new(0));
    let deliverer = Deliverer {
        name: consumer_name(spec.id),
        store: store.clone(),
        spec,
        settings,
        client: OnceCell::new(),
        cursor: Cell::new(LogCursor::START),
        progress,
        failed: failed.clone(),
    };
    DelivererHandle {
        addr: WorkerActor::launch(deliverer, store, poll, WakeOn::Commits),
        progress: progress_rx,
        failed,
    }
}

/// Why a pass ended early.
enum Interrupted {
    Stopped,
    /// Another instance moved the checkpoint: reload it.
    Moved,
}

/// The deliveries of one webhook (see the module documentation), as a [`Worker`].
pub struct Deliverer {
    /// `webhook:<id>`: its checkpoint and its lock.
    name: String,
    store: Store,
    spec: WebhookSpec,
    settings: DeliverySettings,
    /// Built at the first activation.
    client: OnceCell<reqwest::Client>,
    /// The checkpoint as this instance holds it (moved from this value).
    cursor: Cell<LogCursor>,
    progress: watch::Sender<LogCursor>,
    /// Attempts failed in a row while this instance delivers (read by its probes).
    failed: Arc<AtomicU32>,
}

#[async_trait(?Send)]
impl Worker for Deliverer {
    fn name(&self) -> &str {
        &self.name
    }

    /// Setup (once), then the checkpoint as it is now: another instance may have
    /// moved it while this one stood by.
    async fn activate(&self) -> anyhow::Result<()> {
        if self.client.get().is_none() {
            create_schema(&self.store).await?;
            ensure_checkpoint(&self.store, self.spec.id, LogCursor::START).await?;
            let client = reqwest::Client::builder()
                .timeout(self.settings.timeout)
                // A receiver's redirect is a failure, not a way to reach other hosts.
                .redirect(reqwest::redirect::Policy::none())
                // Through a proxy the client would resolve only the proxy's name and
                // the receiver's address would go unchecked.
                .no_proxy()
                .dns_resolver(Arc::new(PolicyResolver(self.settings.address.clone())))
                .build()
                .context("building the webhook HTTP client")?;
            // Only this actor sets it, and it was empty above.
            let _ = self.client.set(client);
        }
        // What another instance's receiver did is not known here.
        self.failed.store(0, Ordering::Relaxed);
        self.reload().await
    }

    /// Replays, then new events up to the readable end.
    async fn round(&self, round: &Round) -> anyhow::Result<Outcome> {
        match self.replay(round).await? {
            Some(Interrupted::Stopped) => return Ok(Outcome::Idle),
            Some(Interrupted::Moved) => self.reload().await?,
            None => {}
        }
        loop {
            let cursor = self.cursor.get();
            let events = self.store.read_log(cursor, BATCH).await?;
            if events.is_empty() {
                return self.store.end_of_log(cursor).await;
            }
            match self.deliver_batch(&events, round).await? {
                Some(Interrupted::Stopped) => return Ok(Outcome::Idle),
                Some(Interrupted::Moved) => self.reload().await?,
                // A round per batch: the driver checks the lock between rounds, so a
                // long run of deliveries never goes on in two instances for long.
                None => return Ok(Outcome::More),
            }
        }
    }
}

impl Deliverer {
    async fn reload(&self) -> anyhow::Result<()> {
        let cursor = load_checkpoint(self.store.any_pool(), &self.name).await?;
        self.cursor.set(cursor);
        self.progress.send_replace(cursor);
        Ok(())
    }

    async fn deliver_batch(
        &self,
        events: &[StoredEvent],
        round: &Round,
    ) -> anyhow::Result<Option<Interrupted>> {
        // Skipped events move the checkpoint together, before the next delivery.
        let mut skipped: Option<LogCursor> = None;
        for event in events {
            if !self.spec.wants(&event.event_type) {
                skipped = Some(event.cursor());
                continue;
            }
            if let Some(cursor) = skipped.take() {
                if !self.advance(cursor, None).await? {
                    return Ok(Some(Interrupted::Moved));
                }
            }
            let mut attempt = 0u32;
            let max = self.settings.max_attempts.max(1);
            let parked = loop {
                attempt += 1;
                // The lock lost (its session gone): another instance may deliver now.
                if !round.holds().await {
                    self.failed.store(0, Ordering::Relaxed);
                    return Ok(Some(Interrupted::Stopped));
                }
                match self.post(event, round).await {
                    Attempt::Delivered => break None,
                    Attempt::Stopped => return Ok(Some(Interrupted::Stopped)),
                    Attempt::Failed(error) => {
                        tracing::warn!(
                            webhook = %self.spec.id,
                            event_id = %event.event_id,
                            position = event.position,
                            attempt,
                            error = %error,
                            "webhook delivery failed"
                        );
                        if attempt >= max {
                            break Some((attempt, error.to_string()));
                        }
                        tokio::select! {
                            () = round.stopped() => return Ok(Some(Interrupted::Stopped)),
                            () = tokio::time::sleep(self.settings.backoff(attempt)) => {}
                        }
                    }
                }
            };
            if let Some((attempts, _)) = &parked {
                tracing::warn!(
                    webhook = %self.spec.id,
                    event_id = %event.event_id,
                    position = event.position,
                    attempts,
                    "webhook delivery parked"
                );
            }
            let park = parked
                .as_ref()
                .map(|(attempts, error)| (event, *attempts, error.as_str()));
            if !self.advance(event.cursor(), park).await? {
                return Ok(Some(Interrupted::Moved));
            }
        }
        if let Some(cursor) = skipped {
            if !self.advance(cursor, None).await? {
                return Ok(Some(Interrupted::Moved));
            }
        }
        Ok(None)
    }

    /// Moves the checkpoint to `to` (from the value this instance holds), parking
    /// `park` in the same transaction. `false`: another instance moved it meanwhile.
    async fn advance(
        &self,
        to: LogCursor,
        park: Option<(&StoredEvent, u32, &str)>,
    ) -> anyhow::Result<bool> {
        let mut tx = self
            .store
            .any_pool()
            .begin()
            .await
            .context("starting a webhook checkpoint transaction")?;
        let moved =
            eventstore::consumer::move_checkpoint(&mut tx, &self.name, self.cursor.get(), to)
                .await?;
        if !moved {
            tx.rollback().await.ok();
            tracing::warn!(webhook = %self.spec.id, "checkpoint moved by another instance; continuing from it");
            return Ok(false);
        }
        if let Some((event, attempts, error)) = park {
            sqlx::query(
                "INSERT INTO webhook_failures (webhook_id, position, event_id, event_type, \
                 attempts, last_error, failed_at, replay_requested, delivered_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 0, NULL) \
                 ON CONFLICT (webhook_id, position) DO UPDATE SET attempts = excluded.attempts, \
                 last_error = excluded.last_error, failed_at = excluded.failed_at, \
                 replay_requested = 0, delivered_at = NULL",
            )
            .bind(self.spec.id.to_string())
            .bind(event.position)
            .bind(event.event_id.to_string())
            .bind(event.event_type.clone())
            .bind(i64::from(attempts))
            .bind(error.to_owned())
            .bind(now_text())
            .execute(&mut *tx)
            .await
            .context("parking a failed webhook delivery")?;
        }
        tx.commit()
            .await
            .context("committing a webhook checkpoint")?;
        self.cursor.set(to);
        self.progress.send_replace(to);
        Ok(true)
    }

    /// One attempt for each parked failure marked for replay, in position order.
    async fn replay(&self, round: &Round) -> anyhow::Result<Option<Interrupted>> {
        let webhook_id = self.spec.id.to_string();
        let mut after = 0i64;
        loop {
            let positions: Vec<(i64,)> = sqlx::query_as(
                "SELECT position FROM webhook_failures \
                 WHERE webhook_id = $1 AND replay_requested = 1 AND delivered_at IS NULL \
                 AND position > $2 ORDER BY position LIMIT $3",
            )
            .bind(webhook_id.clone())
            .bind(after)
            .bind(REPLAY_BATCH)
            .fetch_all(self.store.any_pool())
            .await
            .context("reading webhook replay requests")?;
            let Some(&(last,)) = positions.last() else {
                return Ok(None);
            };
            after = last;
            let wanted: Vec<i64> = positions.iter().map(|(p,)| *p).collect();
            let events = self.store.events_at(&wanted).await?;
            for position in wanted {
                let Some(event) = events.iter().find(|e| e.position == position) else {
                    // Cannot happen with an immutable log; do not retry it forever.
                    tracing::error!(webhook = %self.spec.id, position, "a parked event is not in the log");
                    self.replayed(position, Err(&DeliveryError::Unreachable.to_string()))
                        .await?;
                    continue;
                };
                // As for new events: a lost lock stops replaying at once.
                if !round.holds().await {
                    self.failed.store(0, Ordering::Relaxed);
                    return Ok(Some(Interrupted::Stopped));
                }
                match self.post(event, round).await {
                    Attempt::Stopped => return Ok(Some(Interrupted::Stopped)),
                    Attempt::Delivered => self.replayed(position, Ok(())).await?,
                    Attempt::Failed(error) => {
                        tracing::warn!(
                            webhook = %self.spec.id,
                            event_id = %event.event_id,
                            position,
                            error = %error,
                            "webhook replay failed"
                        );
                        self.replayed(position, Err(&error.to_string())).await?;
                    }
                }
            }
        }
    }

    /// Records the outcome of a replay attempt: delivered, or one more failed attempt
    /// (parked again until the next replay request).
    async fn replayed(&self, position: i64, outcome: Result<(), &str>) -> anyhow::Result<()> {
        let query = match outcome {
            Ok(()) => sqlx::query(
                "UPDATE webhook_failures SET delivered_at = $1, replay_requested = 0 \
                 WHERE webhook_id = $2 AND position = $3",
            )
            .bind(now_text()),
            Err(_) => sqlx::query(
                "UPDATE webhook_failures SET failed_at = $1, attempts = attempts + 1, \
                 replay_requested = 0, last_error = $4 WHERE webhook_id = $2 AND position = $3",
            )
            .bind(now_text()),
        };
        let query = query.bind(self.spec.id.to_string()).bind(position);
        let query = match outcome {
            Ok(()) => query,
            Err(error) => query.bind(error.to_owned()),
        };
        query
            .execute(self.store.any_pool())
            .await
            .context("recording a webhook replay")?;
        Ok(())
    }

    /// One delivery attempt of `event`, counted for [`DelivererStatus::failed_attempts`].
    async fn post(&self, event: &StoredEvent, round: &Round) -> Attempt {
        let attempt = self.send(event, round).await;
        match attempt {
            Attempt::Delivered => self.failed.store(0, Ordering::Relaxed),
            Attempt::Failed(_) => {
                // Saturating: a receiver down for ever does not wrap around to 0.
                let _ = self
                    .failed
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        Some(n.saturating_add(1))
                    });
            }
            Attempt::Stopped => {}
        }
        attempt
    }

    /// One signed POST of `event`'s public view, if the URL's address is allowed.
    async fn send(&self, event: &StoredEvent, round: &Round) -> Attempt {
        let Some(client) = self.client.get() else {
            tracing::error!(webhook = %self.spec.id, "no webhook HTTP client");
            return Attempt::Failed(DeliveryError::Unreachable);
        };
        let url = match reqwest::Url::parse(&self.spec.url) {
            Ok(url) => url,
            Err(_) => return Attempt::Failed(DeliveryError::Unreachable),
        };
        // The client connects to an IP literal without a resolver: check it here.
        if let Err(refusal) = self.settings.address.check_literal(&url) {
            tracing::debug!(webhook = %self.spec.id, %refusal, "webhook address refused");
            return Attempt::Failed(DeliveryError::Unreachable);
        }
        let body = match serde_json::to_vec(&public_view(event)) {
            Ok(body) => body,
            Err(error) => {
                tracing::error!(webhook = %self.spec.id, %error, "could not encode a webhook body");
                return Attempt::Failed(DeliveryError::Unreachable);
            }
        };
        let timestamp = Utc::now().timestamp();
        let signature = sign(&self.spec.secret, timestamp, &body);
        let request = client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(HEADER_EVENT_ID, event.event_id.to_string())
            .header(HEADER_EVENT_TYPE, event.event_type.as_str())
            .header(HEADER_TIMESTAMP, timestamp.to_string())
            .header(HEADER_SIGNATURE, signature)
            .body(body)
            .send();
        if round.stopping() {
            return Attempt::Stopped;
        }
        let result = tokio::select! {
            () = round.stopped() => return Attempt::Stopped,
            result = request => result,
        };
        match result {
            Ok(response) if response.status().is_success() => Attempt::Delivered,
            Ok(response) => Attempt::Failed(DeliveryError::Status(response.status().as_u16())),
            Err(error) => {
                let failure = DeliveryError::from_transport(&error);
                // The cause stays in the operator's log, without the URL (it may
                // carry a token).
                let cause = format!("{:#}", anyhow::Error::from(error.without_url()));
                tracing::debug!(webhook = %self.spec.id, %cause, "webhook request failed");
                Attempt::Failed(failure)
            }
        }
    }
}

/// Why an attempt failed, in the only words an integrator is shown: a refused address,
/// a refused or reset connection, a failed look-up and a TLS failure are all
/// `unreachable`, so the failures of a webhook cannot be used to scan ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryError {
    /// No HTTP answer: the address is refused by the policy, or it could not be
    /// connected to or spoken with.
    Unreachable,
    /// No answer within [`DeliverySettings::timeout`].
    Timeout,
    /// The receiver answered with this non-2xx status (redirects are not followed).
    Status(u16),
}

impl DeliveryError {
    fn from_transport(error: &reqwest::Error) -> DeliveryError {
        if error.is_timeout() {
            DeliveryError::Timeout
        } else if let Some(status) = error.status() {
            DeliveryError::Status(status.as_u16())
        } else {
            DeliveryError::Unreachable
        }
    }
}

impl std::fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeliveryError::Unreachable => f.write_str("unreachable"),
            DeliveryError::Timeout => f.write_str("timeout"),
            DeliveryError::Status(status) => write!(f, "HTTP {status}"),
        }
    }
}

enum Attempt {
    Delivered,
    Failed(DeliveryError),
    Stopped,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body_in_lowercase_hex() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let sig = sign(b"Jefe", 0, b"what do ya want for nothing?");
        // Our data is "0." + body, so recompute the expectation with the raw MAC.
        let mut m = HmacSha256::new_from_slice(b"Jefe").unwrap();
        m.update(b"0.what do ya want for nothing?");
        assert_eq!(sig, format!("v1={}", to_hex(&m.finalize().into_bytes())));
        let mut m = HmacSha256::new_from_slice(b"Jefe").unwrap();
        m.update(b"what do ya want for nothing?");
        assert_eq!(
            to_hex(&m.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn verify_accepts_its_signature_and_rejects_changes() {
        let sig = sign(b"secret", 1_700_000_000, b"{\"a\":1}");
        assert!(verify(b"secret", 1_700_000_000, b"{\"a\":1}", &sig));
        assert!(verify(
            b"secret",
            1_700_000_000,
            b"{\"a\":1}",
            &sig.to_uppercase().replace("V1=", "v1=")
        ));
        assert!(verify(
            b"secret",
            1_700_000_000,
            b"{\"a\":1}",
            &format!("v1=00, {sig}")
        ));
        assert!(!verify(b"secret", 1_700_000_000, b"{\"a\":2}", &sig));
        assert!(!verify(b"secret", 1_700_000_001, b"{\"a\":1}", &sig));
        assert!(!verify(b"other", 1_700_000_000, b"{\"a\":1}", &sig));
        assert!(!verify(b"secret", 1_700_000_000, b"{\"a\":1}", "v1="));
        assert!(!verify(b"secret", 1_700_000_000, b"{\"a\":1}", "v1=zz"));
        assert!(!verify(b"secret", 1_700_000_000, b"{\"a\":1}", ""));
    }

    #[test]
    fn hex_round_trips() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&to_hex(&bytes)).unwrap(), bytes);
        assert!(from_hex("abc").is_none());
    }

    #[test]
    fn backoff_doubles_from_the_base_and_is_capped() {
        let s = DeliverySettings::default();
        assert_eq!(s.backoff(1), Duration::from_millis(500));
        assert_eq!(s.backoff(2), Duration::from_secs(1));
        assert_eq!(s.backoff(3), Duration::from_secs(2));
        assert_eq!(s.backoff(10), Duration::from_secs(60));
        assert_eq!(s.backoff(1000), Duration::from_secs(60));
    }

    #[test]
    fn a_failure_shows_only_unreachable_timeout_or_an_http_status() {
        let row = |last_error: &str| -> FailureRow {
            (
                Uuid::nil().to_string(),
                7,
                Uuid::nil().to_string(),
                "RecordUploaded".into(),
                3,
                last_error.into(),
                "2026-01-01T00:00:00Z".into(),
                0,
            )
        };
        let shown = |last_error: &str| failure_from_row(row(last_error)).unwrap().last_error;
        for kept in ["unreachable", "timeout", "HTTP 404", "HTTP 500", "HTTP 418"] {
            assert_eq!(shown(kept), kept);
        }
        // Words of older versions, and anything else a row may hold.
        for old in [
            "connection failed: error sending request for url (http://127.0.0.1:41234/hook): \
             tcp connect error: Connection refused (os error 111)",
            "connection failed",
            "error sending request for url (http://10.0.0.5:22/)",
            "HTTP 4040",
            "HTTP 40",
            "HTTP abc",
            "HTTP 404 Not Found",
            "http 404",
            " HTTP 404",
            "timeout ",
            "Timeout",
            "unreachable: 127.0.0.1:8080",
            "",
        ] {
            assert_eq!(shown(old), "unreachable", "{old:?}");
        }
        // The rest of the row is read as it is.
        let failure = failure_from_row(row("HTTP 503")).unwrap();
        assert_eq!(failure.position, 7);
        assert_eq!(failure.attempts, 3);
        assert_eq!(failure.event_type, "RecordUploaded");
        assert!(!failure.replay_requested);
    }

    #[test]
    fn debug_of_a_spec_hides_the_secret_and_url() {
        let spec = WebhookSpec {
            id: Uuid::nil(),
            url: "https://example.test/hook?token=abc".into(),
            types: vec!["AccessApproved".into()],
            secret: b"topsecret".to_vec(),
        };
        let text = format!("{spec:?}");
        assert!(!text.contains("topsecret"));
        assert!(!text.contains("token=abc"));
        assert!(text.contains("AccessApproved"));
    }
}
