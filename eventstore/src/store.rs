//! Connecting to a backend, creating its schema, and cqrs-es event stores over it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use cqrs_es::persist::{EventStoreAggregateContext, EventUpcaster, PersistedEventStore};
use cqrs_es::{Aggregate, AggregateError, EventEnvelope, EventStore};
use sqlite_es::SqliteEventRepository;
use sqlx::any::AnyPoolOptions;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AnyPool, ConnectOptions, PgPool, SqlitePool};

use crate::locks::PgLocks;
use crate::notify::Notifier;
use crate::pg_append::PgEventRepository;

/// Where the events live.
#[derive(Clone, Debug)]
pub enum StoreConfig {
    /// Embedded default: one SQLite file.
    Sqlite { path: PathBuf },
    /// Production: a PostgreSQL database URL (never logged: it may hold a password).
    Postgres { url: String },
}

impl StoreConfig {
    /// `DATABASE_URL` when set, otherwise `<data_dir>/afyachain.db`.
    pub fn from_env(data_dir: &std::path::Path) -> Self {
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.trim().is_empty() => StoreConfig::Postgres { url },
            _ => StoreConfig::Sqlite {
                path: data_dir.join("afyachain.db"),
            },
        }
    }
}

/// Which kind of database a [`Store`] is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

#[derive(Clone)]
pub(crate) enum Typed {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// A connected event store: the typed pool that cqrs-es appends through, an `Any` pool
/// that read models and checkpoints are written through (one SQL text for both
/// backends), and the notifier that wakes consumers.
#[derive(Clone)]
pub struct Store {
    pub(crate) typed: Typed,
    any: AnyPool,
    notifier: Notifier,
    /// The one session this process holds its consumer locks on (PostgreSQL).
    locks: Option<Arc<PgLocks>>,
    config: StoreConfig,
}

static MIGRATE_PG: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
static MIGRATE_SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

impl Store {
    /// Connects, creates or upgrades the schema, and starts the notifier.
    pub async fn open(config: StoreConfig) -> anyhow::Result<Store> {
        sqlx::any::install_default_drivers();
        match &config {
            StoreConfig::Sqlite { path } => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating data directory {}", dir.display()))?;
                }
                let options = SqliteConnectOptions::new()
                    .filename(path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(10))
                    .foreign_keys(true)
                    .disable_statement_logging();
                let pool = SqlitePoolOptions::new()
                    .max_connections(8)
                    .connect_with(options)
                    .await
                    .context("opening the SQLite event store")?;
                MIGRATE_SQLITE
                    .run(&pool)
                    .await
                    .context("creating the SQLite schema")?;
                let any_url = format!("sqlite://{}", path.display());
                let any = AnyPoolOptions::new()
                    .max_connections(4)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            sqlx::query("PRAGMA busy_timeout = 10000")
                                .execute(&mut *conn)
                                .await?;
                            sqlx::query("PRAGMA synchronous = NORMAL")
                                .execute(&mut *conn)
                                .await?;
                            Ok(())
                        })
                    })
                    .connect(&any_url)
                    .await
                    .context("opening the SQLite read-model pool")?;
                let notifier = Notifier::local();
                Ok(Store {
                    typed: Typed::Sqlite(pool),
                    any,
                    notifier,
                    locks: None,
                    config,
                })
            }
            StoreConfig::Postgres { url } => {
                let options = PgConnectOptions::from_str(url)
                    .context("DATABASE_URL is not a valid PostgreSQL URL")?
                    .disable_statement_logging();
                let pool = PgPoolOptions::new()
                    .max_connections(pg_pool_size())
                    .acquire_timeout(pg_acquire_timeout())
                    .connect_with(options)
                    .await
                    .context("connecting to PostgreSQL (DATABASE_URL)")?;
                // Two processes starting together must not both create the schema.
                MIGRATE_PG
                    .run(&pool)
                    .await
                    .context("creating the PostgreSQL schema")?;
                let any = AnyPoolOptions::new()
                    .max_connections(pg_read_pool_size())
                    .acquire_timeout(pg_acquire_timeout())
                    .connect(url)
                    .await
                    .context("connecting the read-model pool to PostgreSQL")?;
                let notifier = Notifier::postgres(pool.clone()).await?;
                Ok(Store {
                    typed: Typed::Postgres(pool),
                    any,
                    notifier,
                    locks: Some(PgLocks::new(url.clone())),
                    config,
                })
            }
        }
    }

    pub fn backend(&self) -> Backend {
        match self.typed {
            Typed::Sqlite(_) => Backend::Sqlite,
            Typed::Postgres(_) => Backend::Postgres,
        }
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    pub(crate) fn locks(&self) -> Option<&Arc<PgLocks>> {
        self.locks.as_ref()
    }

    /// The pool read models and checkpoints are written through.
    pub fn any_pool(&self) -> &AnyPool {
        &self.any
    }

    /// A transaction on [`Store::any_pool`] that is going to write. On SQLite it takes
    /// the write lock as it begins (`BEGIN IMMEDIATE`, waiting up to the busy timeout
    /// for the writer before it). A deferred transaction that reads before it writes
    /// (the audit trail reads its last link first) cannot wait instead: once another
    /// writer has committed since its read, its write fails at once with "database is
    /// locked", and the whole batch is retried after a back-off, so under load such a
    /// consumer falls ever further behind.
    pub async fn begin_write(&self) -> sqlx::Result<sqlx::Transaction<'static, sqlx::Any>> {
        match self.typed {
            Typed::Sqlite(_) => self.any.begin_with("BEGIN IMMEDIATE").await,
            Typed::Postgres(_) => self.any.begin().await,
        }
    }

    /// The PostgreSQL pool, when on PostgreSQL (benchmarks and tests use it).
    pub fn pg_pool(&self) -> Option<&PgPool> {
        match &self.typed {
            Typed::Postgres(pool) => Some(pool),
            Typed::Sqlite(_) => None,
        }
    }

    /// The SQLite pool, when on SQLite.
    pub fn sqlite_pool(&self) -> Option<&SqlitePool> {
        match &self.typed {
            Typed::Sqlite(pool) => Some(pool),
            Typed::Postgres(_) => None,
        }
    }

    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// A cqrs-es event store for aggregate `A`, with the given upcasters applied on load.
    pub fn aggregate_store<A: Aggregate>(
        &self,
        upcasters: Vec<Box<dyn EventUpcaster>>,
    ) -> AggregateStore<A> {
        match &self.typed {
            Typed::Sqlite(pool) => AggregateStore::new(Backing::Sqlite(
                PersistedEventStore::new_event_store(SqliteEventRepository::new(pool.clone()))
                    .with_upcasters(upcasters),
            )),
            Typed::Postgres(pool) => AggregateStore::new(Backing::Postgres(
                PersistedEventStore::new_event_store(PgEventRepository::new(pool.clone()))
                    .with_upcasters(upcasters),
            )),
        }
    }

    /// Whether `error` is the store being out of reach (down, restarting, refusing
    /// connections, or every connection busy past the acquire timeout) rather than a
    /// fault of the request: the caller answers 503 and the client tries again.
    pub fn is_unavailable(error: &anyhow::Error) -> bool {
        error
            .chain()
            .filter_map(|cause| cause.downcast_ref::<sqlx::Error>())
            .any(sqlx_unavailable)
    }

    /// Whether the database answers (readiness).
    pub async fn ping(&self) -> anyhow::Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.any)
            .await
            .context("event store did not answer")?;
        Ok(())
    }

    pub async fn close(&self) {
        self.notifier.shutdown();
        match &self.typed {
            Typed::Sqlite(pool) => pool.close().await,
            Typed::Postgres(pool) => pool.close().await,
        }
        self.any.close().await;
    }
}

/// See [`Store::is_unavailable`].
pub(crate) fn sqlx_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        // Connection exceptions (class 08), the server shutting down or starting
        // (57P01–57P03), too many connections (53300).
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

/// How long a request waits for a PostgreSQL connection before the store counts as
/// unavailable (`AFYA_PG_ACQUIRE_TIMEOUT_MS`, default 1 s): a stopped database then
/// answers 503 within 2 s instead of a pool retrying its connects for 10 s.
fn pg_acquire_timeout() -> Duration {
    let ms = std::env::var("AFYA_PG_ACQUIRE_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| (1..=60_000).contains(ms))
        .unwrap_or(1_000);
    Duration::from_millis(ms)
}

/// PostgreSQL connections for read models, checkpoints and queries
/// (`AFYA_PG_READ_POOL_SIZE`, default 12): every consumer's batch, worker round and
/// API read shares them.
fn pg_read_pool_size() -> u32 {
    std::env::var("AFYA_PG_READ_POOL_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(12)
}

fn pg_pool_size() -> u32 {
    std::env::var("AFYA_PG_POOL_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(16)
}

/// A cqrs-es event store over either backend (both use cqrs-es's persisted store and so
/// share its aggregate context), with a cache of the aggregates this process last wrote.
///
/// The cache saves the load before a command: the state after our own last append is
/// known. It is safe with other writers because the append is still guarded by the
/// aggregate's sequence: a stale entry makes the append conflict, and the command is
/// then retried on freshly loaded state (see [`Store::execute`]).
pub struct AggregateStore<A: Aggregate> {
    backing: Backing<A>,
    cache: Mutex<HashMap<String, (A, usize)>>,
    cache_limit: usize,
}

enum Backing<A: Aggregate> {
    Sqlite(PersistedEventStore<SqliteEventRepository, A>),
    Postgres(PersistedEventStore<PgEventRepository, A>),
}

/// Entries kept per aggregate type before the cache starts over.
const DEFAULT_CACHE_LIMIT: usize = 10_000;

impl<A: Aggregate> AggregateStore<A> {
    fn new(backing: Backing<A>) -> Self {
        AggregateStore {
            backing,
            cache: Mutex::new(HashMap::new()),
            cache_limit: DEFAULT_CACHE_LIMIT,
        }
    }

    /// How many aggregates to keep cached (0: none, every command loads).
    pub fn with_cache_limit(mut self, limit: usize) -> Self {
        self.cache_limit = limit;
        self
    }

    /// The aggregate as this process last wrote it, with its sequence.
    pub(crate) fn cached(&self, aggregate_id: &str) -> Option<EventStoreAggregateContext<A>>
    where
        A: Clone,
    {
        let cache = self.cache.lock().ok()?;
        let (aggregate, sequence) = cache.get(aggregate_id)?;
        Some(EventStoreAggregateContext {
            aggregate_id: aggregate_id.to_owned(),
            aggregate: aggregate.clone(),
            current_sequence: *sequence,
            current_snapshot: None,
        })
    }

    pub(crate) fn remember(&self, aggregate_id: &str, aggregate: A, sequence: usize) {
        if self.cache_limit == 0 {
            return;
        }
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= self.cache_limit && !cache.contains_key(aggregate_id) {
                cache.clear();
            }
            cache.insert(aggregate_id.to_owned(), (aggregate, sequence));
        }
    }

    /// Loads the aggregate from its events. An error keeps its `sqlx::Error`, so that
    /// an unreachable store shows as one ([`Store::is_unavailable`]).
    pub async fn load(&self, aggregate_id: &str) -> anyhow::Result<EventStoreAggregateContext<A>> {
        self.load_aggregate(aggregate_id)
            .await
            .map_err(crate::execute::aggregate_error)
    }

    pub(crate) fn forget(&self, aggregate_id: &str) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(aggregate_id);
        }
    }
}

impl<A: Aggregate> EventStore<A> for AggregateStore<A> {
    type AC = EventStoreAggregateContext<A>;

    async fn load_events(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        match &self.backing {
            Backing::Sqlite(s) => s.load_events(aggregate_id).await,
            Backing::Postgres(s) => s.load_events(aggregate_id).await,
        }
    }

    async fn load_aggregate(
        &self,
        aggregate_id: &str,
    ) -> Result<Self::AC, AggregateError<A::Error>> {
        match &self.backing {
            Backing::Sqlite(s) => s.load_aggregate(aggregate_id).await,
            Backing::Postgres(s) => s.load_aggregate(aggregate_id).await,
        }
    }

    async fn commit(
        &self,
        events: Vec<A::Event>,
        context: Self::AC,
        metadata: HashMap<String, String>,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        match &self.backing {
            Backing::Sqlite(s) => s.commit(events, context, metadata).await,
            Backing::Postgres(s) => s.commit(events, context, metadata).await,
        }
    }
}
