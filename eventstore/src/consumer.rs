//! Named consumers of the global log, each with its own checkpoint.
//!
//! A [`LogHandler`] applies events to its read models inside a transaction that also
//! moves its checkpoint, so a crash anywhere leaves effect and checkpoint together. The
//! checkpoint moves only from the value this instance last saw (optimistic), so even if
//! two instances ran at once no event would be applied twice. On PostgreSQL one
//! instance per name is active, holding a session advisory lock; the others wait on
//! standby. A [`Runner`] applies a handler's batches; a [`ConsumerActor`] is the work
//! runtime's driver ([`crate::work`]) over one, which holds the lock, runs it when a
//! commit lands, never polling in a loop (a safety tick every few seconds covers
//! writers that did not notify), backs off after a failure and on a stop waits (up to
//! the runtime's grace) for the batch in flight to commit.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use anyhow::Context as _;
use async_trait::async_trait;
use sqlx::{Any, Transaction};
use tokio::sync::{watch, Mutex};

pub use crate::locks::ConsumerLock;
use crate::log::{LogCursor, StoredEvent};
use crate::store::{Backend, Store};
use crate::work::{
    Outcome, Round, Stop, WakeOn, Worker, WorkerActor, WorkerStatus, HELD_BACK_RETRY,
};

/// The transaction a handler writes its read models in.
pub type ReadModelTx = Transaction<'static, Any>;

/// The two kinds of consumer (docs/architecture.md, "Consumers of the log").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Writes read models in the checkpoint's transaction; rebuildable from the log at
    /// any time, and rebuilt on start when its schema version changes. Read-your-
    /// writes waits for these.
    Projection,
    /// Queues external work in the checkpoint's transaction (an intake), or performs
    /// an external effect itself (a publisher); idempotent by event id. Its tables are
    /// delivery state, which a rebuild keeps; nothing waits for it.
    Reactor,
}

/// What a consumer does with events. Implementations write only through `tx`.
#[async_trait]
pub trait LogHandler: Send + Sync + 'static {
    /// Unique, stable name: the checkpoint and the lock are keyed by it.
    fn name(&self) -> &str;
    /// A projection unless it says otherwise.
    fn kind(&self) -> Kind {
        Kind::Projection
    }
    /// Statements creating the read-model tables if they do not exist.
    fn schema(&self, backend: Backend) -> Vec<String>;
    /// The version of [`LogHandler::schema`] (0: not versioned). When a projection's
    /// version differs from the one the store last built, its tables are dropped and
    /// created anew and it replays the log from the start, instead of `CREATE TABLE
    /// IF NOT EXISTS` silently keeping the old shape.
    fn schema_version(&self) -> u32 {
        0
    }
    /// Tables emptied by a rebuild.
    fn tables(&self) -> Vec<String>;
    /// Applies one event. Events arrive in log order, each exactly once.
    async fn apply(&self, tx: &mut ReadModelTx, event: &StoredEvent) -> anyhow::Result<()>;
    /// Whether `apply` waits on something outside the database and writes nothing in
    /// it (a publisher awaiting a broker's acknowledgement). Such a batch begins an
    /// ordinary transaction, which on SQLite takes the one write lock only for the
    /// checkpoint at its end: were it to take the lock as it begins, as every other
    /// batch does ([`Store::begin_write`]), a broker that stopped answering would
    /// hold every append of the process behind it.
    fn waits_outside(&self) -> bool {
        false
    }
}

/// Result of one catch-up run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CatchUp {
    pub applied: u64,
    /// Committed events exist behind a transaction still running: look again soon.
    pub held_back: bool,
}

/// Drives one handler over the log. Usable directly (CLI, tests), taking the lock
/// itself ([`Runner::try_lock`]), or inside a [`ConsumerActor`], whose driver holds it.
pub struct Runner {
    store: Store,
    handler: Arc<dyn LogHandler>,
    batch_size: i64,
    cursor: LogCursor,
    lock: Option<ConsumerLock>,
    progress: watch::Sender<LogCursor>,
}

impl Runner {
    /// Creates the handler's tables and its checkpoint row, and loads the checkpoint.
    pub async fn new(store: Store, handler: Arc<dyn LogHandler>) -> anyhow::Result<Runner> {
        for statement in handler.schema(store.backend()) {
            sqlx::query(&statement)
                .execute(store.any_pool())
                .await
                .with_context(|| format!("creating the tables of consumer {}", handler.name()))?;
        }
        create_checkpoint(store.any_pool(), handler.name(), LogCursor::START).await?;
        if handler.kind() == Kind::Projection && handler.schema_version() > 0 {
            settle_schema(&store, handler.as_ref()).await?;
        }
        let mut runner = Runner {
            store,
            handler,
            batch_size: 1000,
            cursor: LogCursor::START,
            lock: None,
            progress: watch::channel(LogCursor::START).0,
        };
        runner.reload_checkpoint().await?;
        Ok(runner)
    }

    pub fn with_batch_size(mut self, batch_size: i64) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    pub fn name(&self) -> &str {
        self.handler.name()
    }

    pub fn cursor(&self) -> LogCursor {
        self.cursor
    }

    pub fn is_active(&self) -> bool {
        self.lock.is_some()
    }

    /// Follows the cursor as batches commit.
    pub fn progress(&self) -> watch::Receiver<LogCursor> {
        self.progress.subscribe()
    }

    async fn reload_checkpoint(&mut self) -> anyhow::Result<()> {
        self.cursor = load_checkpoint(self.store.any_pool(), self.handler.name()).await?;
        self.progress.send_replace(self.cursor);
        Ok(())
    }

    /// Takes the consumer's lock if no other instance holds it, or checks this one
    /// still holds it ([`ConsumerLock::is_held`]).
    pub async fn try_lock(&mut self) -> anyhow::Result<bool> {
        if let Some(lock) = self.lock.as_mut() {
            if lock.is_held().await {
                return Ok(true);
            }
            // Its session was lost, and the lock with it: another instance may be
            // active now. Take it again before applying anything.
            tracing::warn!(
                consumer = self.handler.name(),
                "consumer lost its lock; taking it again"
            );
            self.lock = None;
        }
        let Some(lock) = ConsumerLock::try_take(&self.store, self.handler.name()).await? else {
            return Ok(false);
        };
        self.lock = Some(lock);
        // Another instance may have moved the checkpoint while we were on standby.
        self.reload_checkpoint().await?;
        Ok(true)
    }

    /// Releases the lock (standby instances may take over).
    pub async fn unlock(&mut self) {
        if let Some(lock) = self.lock.take() {
            lock.release().await;
        }
    }

    /// Applies one batch; returns how many events it applied. 0: nothing to apply, or
    /// another instance had moved the checkpoint, which is then reloaded (the cursor
    /// moved: there may be more to read from it at once).
    pub async fn step(&mut self) -> anyhow::Result<usize> {
        let events = self.store.read_log(self.cursor, self.batch_size).await?;
        let Some(last) = events.last().map(StoredEvent::cursor) else {
            return Ok(0);
        };
        let tx = if self.handler.waits_outside() {
            self.store.any_pool().begin().await
        } else {
            self.store.begin_write().await
        };
        let mut tx = tx.context("starting a consumer transaction")?;
        for event in &events {
            self.handler.apply(&mut tx, event).await.with_context(|| {
                format!(
                    "consumer {} applying event at position {}",
                    self.handler.name(),
                    event.position
                )
            })?;
        }
        // The checkpoint moves last: a handler that writes nothing (a publisher waiting
        // on acknowledgements) then holds no transaction id while it works, so it never
        // holds back the log horizon every other consumer reads below.
        if !move_checkpoint(&mut tx, self.handler.name(), self.cursor, last).await? {
            tx.rollback().await.ok();
            tracing::warn!(
                consumer = self.handler.name(),
                "checkpoint moved by another instance; continuing from it"
            );
            self.reload_checkpoint().await?;
            return Ok(0);
        }
        tx.commit().await.context("committing a consumer batch")?;
        self.cursor = last;
        self.progress.send_replace(last);
        Ok(events.len())
    }

    /// Applies batches until the readable end of the log.
    pub async fn catch_up(&mut self) -> anyhow::Result<CatchUp> {
        let mut applied = 0u64;
        loop {
            let before = self.cursor;
            let n = self.step().await?;
            applied += n as u64;
            if n == 0 && self.cursor == before {
                break;
            }
        }
        let held_back = self.store.log_held_back(self.cursor).await?;
        Ok(CatchUp { applied, held_back })
    }

    /// Like [`Runner::catch_up`], but also waits out transactions that hold events back,
    /// so that on return everything committed before the call has been applied.
    pub async fn drain(&mut self) -> anyhow::Result<u64> {
        let mut applied = 0;
        loop {
            let done = self.catch_up().await?;
            applied += done.applied;
            if !done.held_back {
                return Ok(applied);
            }
            tokio::time::sleep(HELD_BACK_RETRY).await;
        }
    }

    /// Empties the read models, resets the checkpoint to 0 (one transaction), then
    /// replays the whole log. Needs the lock: a running instance must be stopped first.
    pub async fn rebuild(&mut self) -> anyhow::Result<u64> {
        if !self.try_lock().await? {
            anyhow::bail!(
                "consumer {} is running in another process; stop it before rebuilding",
                self.handler.name()
            );
        }
        let mut tx = self.store.any_pool().begin().await?;
        for table in self.handler.tables() {
            sqlx::query(&format!("DELETE FROM {table}"))
                .execute(&mut *tx)
                .await
                .with_context(|| format!("emptying {table}"))?;
        }
        sqlx::query(
            "UPDATE consumer_checkpoints SET tx = 0, position = 0, updated_at = $1 WHERE name = $2",
        )
        .bind(now_text())
        .bind(self.handler.name().to_owned())
        .execute(&mut *tx)
        .await?;
        tx.commit().await.context("resetting a consumer")?;
        self.reload_checkpoint().await?;
        self.drain().await
    }
}

/// Makes the store hold `handler`'s current schema version: a projection built under
/// another version (or under none, with events applied) has its tables dropped and
/// created anew and its checkpoint reset, in one transaction, so it replays the log.
/// Of several instances starting together, the one that moves the stored version
/// does it; the others find it done.
async fn settle_schema(store: &Store, handler: &dyn LogHandler) -> anyhow::Result<()> {
    let name = handler.name();
    let version = i64::from(handler.schema_version());
    let pool = store.any_pool();
    let stored: Option<i64> =
        sqlx::query_scalar("SELECT version FROM consumer_schemas WHERE name = $1")
            .bind(name.to_owned())
            .fetch_optional(pool)
            .await
            .context("reading a read model's schema version")?;
    if stored == Some(version) {
        return Ok(());
    }
    let fresh = load_checkpoint(pool, name).await? == LogCursor::START;
    let mut tx = store.begin_write().await?;
    let claimed = match stored {
        None => {
            sqlx::query(
                "INSERT INTO consumer_schemas (name, version, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
            )
            .bind(name.to_owned())
            .bind(version)
            .bind(now_text())
            .execute(&mut *tx)
            .await
        }
        Some(old) => {
            sqlx::query(
                "UPDATE consumer_schemas SET version = $1, updated_at = $2 \
             WHERE name = $3 AND version = $4",
            )
            .bind(version)
            .bind(now_text())
            .bind(name.to_owned())
            .bind(old)
            .execute(&mut *tx)
            .await
        }
    }
    .context("recording a read model's schema version")?
    .rows_affected()
        == 1;
    if !claimed {
        tx.rollback().await.ok();
        return Ok(());
    }
    if stored.is_none() && fresh {
        // Nothing was built under another schema: nothing to rebuild.
        tx.commit()
            .await
            .context("recording a read model's schema version")?;
        return Ok(());
    }
    for table in handler.tables() {
        sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
            .execute(&mut *tx)
            .await
            .with_context(|| format!("dropping {table}"))?;
    }
    for statement in handler.schema(store.backend()) {
        sqlx::query(&statement)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("creating the tables of consumer {name}"))?;
    }
    sqlx::query(
        "UPDATE consumer_checkpoints SET tx = 0, position = 0, updated_at = $1 WHERE name = $2",
    )
    .bind(now_text())
    .bind(name.to_owned())
    .execute(&mut *tx)
    .await
    .context("resetting a consumer")?;
    tx.commit()
        .await
        .context("rebuilding a read model's schema")?;
    tracing::info!(
        consumer = name,
        from = stored,
        to = version,
        "read model schema changed; rebuilding it from the log"
    );
    Ok(())
}

/// Moves checkpoint `name` from `from` to `to` inside `tx`, only if it still is at
/// `from` (what this instance last saw). `false`: another instance moved it meanwhile;
/// the caller rolls back and reloads.
pub async fn move_checkpoint(
    tx: &mut ReadModelTx,
    name: &str,
    from: LogCursor,
    to: LogCursor,
) -> anyhow::Result<bool> {
    let moved = sqlx::query(
        "UPDATE consumer_checkpoints SET tx = $1, position = $2, updated_at = $3 \
         WHERE name = $4 AND tx = $5 AND position = $6",
    )
    .bind(to.tx)
    .bind(to.position)
    .bind(now_text())
    .bind(name.to_owned())
    .bind(from.tx)
    .bind(from.position)
    .execute(&mut **tx)
    .await
    .context("moving a consumer checkpoint")?
    .rows_affected();
    Ok(moved == 1)
}

/// Creates consumer `name`'s checkpoint at `start` unless it has one.
pub async fn create_checkpoint(
    pool: &sqlx::AnyPool,
    name: &str,
    start: LogCursor,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO consumer_checkpoints (name, tx, position, updated_at) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING",
    )
    .bind(name.to_owned())
    .bind(start.tx)
    .bind(start.position)
    .bind(now_text())
    .execute(pool)
    .await
    .context("creating a consumer checkpoint")?;
    Ok(())
}

/// Consumer `name`'s checkpoint as stored.
pub async fn load_checkpoint(pool: &sqlx::AnyPool, name: &str) -> anyhow::Result<LogCursor> {
    let (tx, position): (i64, i64) =
        sqlx::query_as("SELECT tx, position FROM consumer_checkpoints WHERE name = $1")
            .bind(name.to_owned())
            .fetch_one(pool)
            .await
            .context("reading a consumer checkpoint")?;
    Ok(LogCursor { tx, position })
}

/// The checkpoint of consumer `name`, if it has one yet.
pub async fn checkpoint_of(pool: &sqlx::AnyPool, name: &str) -> anyhow::Result<Option<LogCursor>> {
    let row: Option<(i64, i64)> =
        sqlx::query_as("SELECT tx, position FROM consumer_checkpoints WHERE name = $1")
            .bind(name.to_owned())
            .fetch_optional(pool)
            .await
            .context("reading a consumer checkpoint")?;
    Ok(row.map(|(tx, position)| LogCursor { tx, position }))
}

/// Every consumer's stored cursor, by name (read-your-writes compares them).
pub async fn cursors(pool: &sqlx::AnyPool) -> anyhow::Result<Vec<(String, LogCursor)>> {
    let rows: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT name, tx, position FROM consumer_checkpoints")
            .fetch_all(pool)
            .await
            .context("reading consumer checkpoints")?;
    Ok(rows
        .into_iter()
        .map(|(name, tx, position)| (name, LogCursor { tx, position }))
        .collect())
}

/// A consumer's stored checkpoint, for operators.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct Checkpoint {
    pub name: String,
    pub position: i64,
    pub updated_at: String,
}

/// Every consumer's checkpoint, by name.
pub async fn checkpoints(pool: &sqlx::AnyPool) -> anyhow::Result<Vec<Checkpoint>> {
    sqlx::query_as("SELECT name, position, updated_at FROM consumer_checkpoints ORDER BY name")
        .fetch_all(pool)
        .await
        .context("reading consumer checkpoints")
}

/// Now, as checkpoint and read-model rows record it.
pub fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// `name` as one safe token (a file name part, a NATS subject token): letters, digits,
/// `_` and `-` are kept, anything else becomes `_`.
pub fn safe_token(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// State of a consumer, for operators and read-your-writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerStatus {
    pub name: String,
    pub active: bool,
    pub cursor: LogCursor,
}

/// The [`Worker`] a [`ConsumerActor`] drives: one [`Runner`], whose lock the driver
/// holds (the runner's own stays untaken).
pub struct Consumer {
    name: String,
    runner: Mutex<Runner>,
}

#[async_trait(?Send)]
impl Worker for Consumer {
    fn name(&self) -> &str {
        &self.name
    }

    /// Another instance may have moved the checkpoint while this one stood by.
    async fn activate(&self) -> anyhow::Result<()> {
        self.runner.lock().await.reload_checkpoint().await
    }

    /// Applies batches up to the readable end of the log. Between batches it looks
    /// whether it is stopping, so a stop lets the batch in flight commit, and
    /// whether the lock is still held.
    async fn round(&self, round: &Round) -> anyhow::Result<Outcome> {
        let mut runner = self.runner.lock().await;
        let mut applied = 0u64;
        let outcome = loop {
            if round.stopping() {
                break Outcome::Idle;
            }
            if !round.holds().await {
                // The driver takes the lock again, or stands by, at once.
                break Outcome::More;
            }
            let before = runner.cursor;
            let n = runner.step().await?;
            if n == 0 && runner.cursor == before {
                break runner.store.end_of_log(runner.cursor).await?;
            }
            applied += n as u64;
        };
        if applied > 0 {
            tracing::debug!(consumer = %self.name, applied, "consumer caught up");
        }
        Ok(outcome)
    }
}

/// The actor running one consumer: the work runtime's driver over a [`Consumer`],
/// woken by commits, with a safety tick for writers that did not notify.
pub type ConsumerActor = WorkerActor<Consumer>;

/// How often a consumer looks at the log without being woken, and how often one on
/// standby tries the lock.
const SAFETY_TICK: Duration = Duration::from_secs(3);

impl WorkerActor<Consumer> {
    /// Prepares `handler` (tables, checkpoint, lock if free) and starts its actor on the
    /// current arbiter.
    pub async fn spawn(
        store: Store,
        handler: Arc<dyn LogHandler>,
    ) -> anyhow::Result<ConsumerHandle> {
        let runner = Runner::new(store.clone(), handler).await?;
        // Take the lock now if it is free, so that once the caller goes on (a server
        // starts listening) this instance is known to be the active one; otherwise it
        // starts on standby and the driver keeps trying.
        let held = ConsumerLock::try_take(&store, runner.name()).await?;
        Ok(Self::launch_runner(store, runner, SAFETY_TICK, held))
    }

    /// Starts an actor over a prepared runner. `safety_tick` is how often it looks at
    /// the log without being woken (a commit signal normally wakes it first).
    pub fn start_runner(store: Store, runner: Runner, safety_tick: Duration) -> ConsumerHandle {
        Self::launch_runner(store, runner, safety_tick, None)
    }

    fn launch_runner(
        store: Store,
        mut runner: Runner,
        safety_tick: Duration,
        held: Option<ConsumerLock>,
    ) -> ConsumerHandle {
        let name = runner.name().to_owned();
        let progress = runner.progress();
        // One lock per consumer: the driver holds the one a runner took itself.
        let held = held.or_else(|| runner.lock.take());
        let consumer = Consumer {
            name: name.clone(),
            runner: Mutex::new(runner),
        };
        let (addr, status) =
            WorkerActor::launch_holding(consumer, store, safety_tick, WakeOn::Commits, held);
        ConsumerHandle {
            name,
            addr,
            progress,
            status,
        }
    }
}

/// A running consumer.
#[derive(Clone)]
pub struct ConsumerHandle {
    name: String,
    addr: Addr<ConsumerActor>,
    progress: watch::Receiver<LogCursor>,
    status: watch::Receiver<WorkerStatus>,
}

impl ConsumerHandle {
    /// How many times in a row its last rounds failed (0: the last one succeeded).
    /// Read at once, without waiting for a batch in flight.
    pub fn failures(&self) -> u32 {
        self.status.borrow().failures
    }

    /// Whether it is the active instance, and its cursor; answered at once, without
    /// waiting for a batch in flight.
    pub async fn status(&self) -> anyhow::Result<ConsumerStatus> {
        Ok(ConsumerStatus {
            name: self.name.clone(),
            active: self.status.borrow().active,
            cursor: self.cursor(),
        })
    }

    /// Follows the cursor as batches commit.
    pub fn subscribe(&self) -> watch::Receiver<LogCursor> {
        self.progress.clone()
    }

    /// The cursor of the last committed batch.
    pub fn cursor(&self) -> LogCursor {
        *self.progress.borrow()
    }

    /// Waits until the consumer has processed the event at `target`, or `timeout`.
    /// Returns whether it did.
    pub async fn wait_for(&self, target: LogCursor, timeout: Duration) -> bool {
        let mut rx = self.progress.clone();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c >= target))
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false)
    }

    /// Lets the batch in flight commit (waiting up to the runtime's stop grace; one cut
    /// off is rolled back with its checkpoint), releases the lock and stops the actor.
    pub async fn stop(&self) {
        let _ = self.addr.send(Stop).await;
    }
}
