//! Append-path benchmark on PostgreSQL.
//!
//! In one run, with `BENCH_WRITERS` concurrent writers (default 32) and the same pool
//! size everywhere (`AFYA_PG_POOL_SIZE`, default 32), it measures commands/s and p50/p99
//! latency of:
//!
//! - (a) our full append path: `Store::execute` (load aggregate, handle, append into the
//!   events table with the global-log columns, metadata, commit notification);
//! - (b) bare postgres-es appending the same events, on a database with only its stock
//!   schema (`CqrsFramework::execute_with_metadata`, same metadata content);
//! - (c) the raw ceiling: one single-row autocommit INSERT of an event-sized row into the
//!   stock events table;
//! - for information: (a+key) (a) with an idempotency key (lookup + trigger);
//!   (c-ours) the raw INSERT into our events table; (c-load) raw SQL doing what any
//!   load-then-append path does (SELECT the aggregate, BEGIN, INSERT, COMMIT).
//!
//! (a) and (b) run `domain::patient::Patient` with `UpdateProfile` commands whose sealed
//! personal field makes an event payload of about 300 bytes. Each writer owns
//! `BENCH_AGGREGATES_PER_WRITER` aggregates (default 16), round-robin, each seeded with
//! `BENCH_SEED_EVENTS` events (default 4) first, so the load cost is real and there are
//! no conflicts. Every case gets a fresh database, dropped afterwards.
//!
//! Then it fills a fresh database with `BENCH_CATCHUP_EVENTS` events (default 1,000,000)
//! and times `eventstore::Runner::drain` over them with a counting handler.
//!
//! Run: `cargo bench -p tests --bench append`. Other knobs: `BENCH_COMMANDS` (measured
//! commands per case, default 20,000), `BENCH_WARMUP` (default 1,000),
//! `BENCH_CATCHUP_BATCH` (default 1,000), `BENCH_SKIP_CATCHUP=1`, `DATABASE_URL`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_trait::async_trait;
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::CqrsFramework;
use domain::ids::PatientId;
use domain::patient::{Patient, PatientCommand, PatientEvent};
use domain::sealed::Sealed;
use eventstore::consumer::ReadModelTx;
use eventstore::testing::{fresh_config, postgres_admin_url, TestStore};
use eventstore::{
    AggregateStore, Backend, CommandMeta, LogHandler, Runner, Store, StoreConfig, StoredEvent,
};
use postgres_es::{PostgresCqrs, PostgresEventRepository};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use uuid::Uuid;

/// postgres-es's stock schema (its db/init.sql, without the example view).
const STOCK_SCHEMA: [&str; 2] = [
    "CREATE TABLE events (
        aggregate_type text NOT NULL,
        aggregate_id text NOT NULL,
        sequence bigint CHECK (sequence >= 0) NOT NULL,
        event_type text NOT NULL,
        event_version text NOT NULL,
        payload json NOT NULL,
        metadata json NOT NULL,
        PRIMARY KEY (aggregate_type, aggregate_id, sequence))",
    "CREATE TABLE snapshots (
        aggregate_type text NOT NULL,
        aggregate_id text NOT NULL,
        last_sequence bigint CHECK (last_sequence >= 0) NOT NULL,
        current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
        payload json NOT NULL,
        PRIMARY KEY (aggregate_type, aggregate_id, last_sequence))",
];

const RAW_INSERT: &str = "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
     event_version, payload, metadata) VALUES ($1, $2, $3, $4, $5, $6, $7)";

/// postgres-es's load query.
const RAW_LOAD: &str = "SELECT aggregate_type, aggregate_id, sequence, event_type, event_version, \
     payload, metadata FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 \
     ORDER BY sequence";

/// Length of the sealed personal field: the whole event payload is then ~300 bytes.
const SEALED_LEN: usize = 232;

#[derive(Clone, Copy, Debug)]
struct Settings {
    writers: usize,
    aggregates_per_writer: usize,
    seed_events: usize,
    warmup: usize,
    commands: usize,
    pool_size: u32,
    catchup_events: u64,
    catchup_batch: i64,
    skip_catchup: bool,
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .replace('_', "")
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v} is not a number")),
        _ => Ok(default),
    }
}

impl Settings {
    fn from_env() -> anyhow::Result<Settings> {
        let s = Settings {
            writers: env_num("BENCH_WRITERS", 32)?,
            aggregates_per_writer: env_num("BENCH_AGGREGATES_PER_WRITER", 16)?,
            seed_events: env_num("BENCH_SEED_EVENTS", 4)?,
            warmup: env_num("BENCH_WARMUP", 1_000)?,
            commands: env_num("BENCH_COMMANDS", 20_000)?,
            pool_size: env_num("AFYA_PG_POOL_SIZE", 32)?,
            catchup_events: env_num("BENCH_CATCHUP_EVENTS", 1_000_000)?,
            catchup_batch: env_num("BENCH_CATCHUP_BATCH", 1_000)?,
            skip_catchup: std::env::var("BENCH_SKIP_CATCHUP").is_ok_and(|v| v == "1"),
        };
        if s.writers == 0 || s.aggregates_per_writer == 0 || s.seed_events == 0 {
            bail!("BENCH_WRITERS, BENCH_AGGREGATES_PER_WRITER and BENCH_SEED_EVENTS must be > 0");
        }
        Ok(s)
    }
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; ignore arguments.
    let settings = Settings::from_env()?;
    // Store::open sizes its pool from this variable; set it before any thread exists so
    // (a), (b) and (c) use the same pool size.
    std::env::set_var("AFYA_PG_POOL_SIZE", settings.pool_size.to_string());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(settings))
}

async fn run(s: Settings) -> anyhow::Result<()> {
    println!(
        "append benchmark: PostgreSQL, {} writers, pool {}, {} aggregates/writer seeded with {} \
         events, {} warm-up + {} measured commands per case, event payload {} bytes",
        s.writers,
        s.pool_size,
        s.aggregates_per_writer,
        s.seed_events,
        s.warmup,
        s.commands,
        serde_json::to_string(&profile_event(PatientId::new()))?.len(),
    );
    let mut results = Vec::new();
    results.push(case_ours(&s, Ours::Warm).await.context("case (a)")?);
    results.push(case_bare(&s).await.context("case (b)")?);
    results.push(case_raw(&s, Raw::Insert).await.context("case (c)")?);
    // For information: where the time of (a) goes.
    results.push(case_ours(&s, Ours::Cold).await.context("case (a-cold)")?);
    results.push(case_ours(&s, Ours::WithKey).await.context("case (a+key)")?);
    results.push(
        case_raw(&s, Raw::InsertOurSchema)
            .await
            .context("case (c-ours)")?,
    );
    results.push(
        case_raw(&s, Raw::LoadAndTransaction)
            .await
            .context("case (c-load)")?,
    );

    println!();
    println!(
        "{:<58} {:>10} {:>9} {:>9}",
        "case", "cmds/s", "p50 ms", "p99 ms"
    );
    for r in &results {
        println!(
            "{:<58} {:>10.0} {:>9.2} {:>9.2}",
            r.name,
            r.per_sec(),
            ms(r.p50),
            ms(r.p99)
        );
    }
    let (a, b, c) = (&results[0], &results[1], &results[2]);
    let ab = a.per_sec() / b.per_sec();
    let ac = a.per_sec() / c.per_sec();
    println!();
    println!("a/b = {ab:.3}  (target >= 0.9) {}", verdict(ab >= 0.9));
    println!("a/c = {ac:.3}  (target >= 0.7) {}", verdict(ac >= 0.7));

    if s.skip_catchup {
        println!("\nconsumer catch-up: skipped (BENCH_SKIP_CATCHUP=1)");
        return Ok(());
    }
    println!();
    let rate = case_catchup(&s).await.context("consumer catch-up")?;
    println!(
        "consumer catch-up: {rate:.0} events/s  (target >= 50000) {}",
        verdict(rate >= 50_000.0)
    );
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "OK"
    } else {
        "BELOW TARGET"
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct CaseResult {
    name: String,
    commands: usize,
    wall: Duration,
    p50: Duration,
    p99: Duration,
}

impl CaseResult {
    fn per_sec(&self) -> f64 {
        self.commands as f64 / self.wall.as_secs_f64()
    }
}

/// A sealed personal field of realistic size (ciphertext-like base64, varies per call).
fn sealed() -> Sealed {
    let mut text = String::with_capacity(SEALED_LEN + 40);
    text.push_str("v1.");
    while text.len() < SEALED_LEN {
        text.push_str(&Uuid::new_v4().simple().to_string());
    }
    text.truncate(SEALED_LEN);
    Sealed::from_ciphertext(text)
}

fn profile_event(patient_id: PatientId) -> PatientEvent {
    PatientEvent::PatientProfileUpdated {
        patient_id,
        personal: sealed(),
    }
}

/// The metadata `CommandMeta::new(actor)` stores, for postgres-es and the raw insert.
fn metadata_map(actor: &str) -> HashMap<String, String> {
    let command_id = Uuid::new_v4().to_string();
    HashMap::from([
        ("actor".to_owned(), actor.to_owned()),
        ("correlation_id".to_owned(), command_id.clone()),
        ("command_id".to_owned(), command_id),
    ])
}

/// One writer's aggregates.
#[derive(Clone)]
struct Writer {
    index: usize,
    patients: Vec<PatientId>,
}

fn writers(s: &Settings) -> Vec<Writer> {
    (0..s.writers)
        .map(|index| Writer {
            index,
            patients: (0..s.aggregates_per_writer)
                .map(|_| PatientId::new())
                .collect(),
        })
        .collect()
}

/// Runs `per_writer(w)` commands on each writer concurrently; `op(writer, n)` performs
/// the writer's n-th command. Returns wall time and every command's latency.
async fn drive<F, Fut>(
    writers: &[Writer],
    total: usize,
    op: F,
) -> anyhow::Result<(Duration, Vec<Duration>)>
where
    F: Fn(Writer, usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let n = writers.len();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for w in writers {
        // Spread `total` over the writers exactly.
        let count = total / n + usize::from(w.index < total % n);
        let writer = w.clone();
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(count);
            for i in 0..count {
                let t = Instant::now();
                op(writer.clone(), i).await?;
                latencies.push(t.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::with_capacity(total);
    for task in tasks {
        all.extend(task.await.context("writer task")??);
    }
    Ok((start.elapsed(), all))
}

fn summarize(name: &str, wall: Duration, mut latencies: Vec<Duration>) -> CaseResult {
    latencies.sort_unstable();
    let pick = |pct: usize| {
        if latencies.is_empty() {
            Duration::ZERO
        } else {
            latencies[(latencies.len() * pct / 100).min(latencies.len() - 1)]
        }
    };
    let r = CaseResult {
        name: name.to_owned(),
        commands: latencies.len(),
        wall,
        p50: pick(50),
        p99: pick(99),
    };
    println!(
        "  {name}: {} commands in {:.2}s = {:.0}/s, p50 {:.2} ms, p99 {:.2} ms",
        r.commands,
        wall.as_secs_f64(),
        r.per_sec(),
        ms(r.p50),
        ms(r.p99)
    );
    r
}

/// Seeds (not timed), warms up, then measures `op`.
async fn seed_and_measure<F, Fut, S, SFut>(
    s: &Settings,
    name: &str,
    ws: &[Writer],
    seed: S,
    op: F,
) -> anyhow::Result<CaseResult>
where
    S: Fn(Writer, usize) -> SFut + Clone + Send + Sync + 'static,
    SFut: Future<Output = anyhow::Result<()>> + Send + 'static,
    F: Fn(Writer, usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let seed_total = ws.len() * s.aggregates_per_writer * s.seed_events;
    let t = Instant::now();
    drive(ws, seed_total, seed).await.context("seeding")?;
    println!(
        "  {name}: seeded {seed_total} events in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    drive(ws, s.warmup, op.clone()).await.context("warm-up")?;
    checkpoint().await?;
    let (wall, latencies) = drive(ws, s.commands, op).await.context("measuring")?;
    Ok(summarize(name, wall, latencies))
}

/// Writer command `n` in seeding order: aggregate `n % k`, registered on its first pass.
fn seed_command(w: &Writer, n: usize) -> (PatientId, PatientCommand) {
    let k = w.patients.len();
    let patient_id = w.patients[n % k];
    let command = if n < k {
        PatientCommand::Register {
            patient_id,
            personal: sealed(),
            phone_index: Uuid::new_v4().simple().to_string(),
        }
    } else {
        PatientCommand::UpdateProfile { personal: sealed() }
    };
    (patient_id, command)
}

fn update_command(w: &Writer, n: usize) -> (PatientId, PatientCommand) {
    let patient_id = w.patients[n % w.patients.len()];
    (
        patient_id,
        PatientCommand::UpdateProfile { personal: sealed() },
    )
}

/// Flushes dirty buffers so one case's checkpoint does not land in the next one.
async fn checkpoint() -> anyhow::Result<()> {
    let mut conn = PgConnection::connect(&postgres_admin_url()).await?;
    sqlx::query("CHECKPOINT").execute(&mut conn).await?;
    conn.close().await?;
    Ok(())
}

/// Variants of our path.
#[derive(Clone, Copy, PartialEq)]
enum Ours {
    /// As the server runs it: the aggregate comes from the process's cache of what it
    /// last wrote (the append still checks the sequence).
    Warm,
    /// Every command loads its aggregate from the database (cache disabled).
    Cold,
    /// Warm, with an idempotency key on every command.
    WithKey,
}

/// (a) and its variants.
async fn case_ours(s: &Settings, variant: Ours) -> anyhow::Result<CaseResult> {
    let with_key = variant == Ours::WithKey;
    let name = match variant {
        Ours::Warm => "(a) ours: Store::execute, global-log columns, metadata",
        Ours::Cold => "(a-cold) ours, aggregate loaded every time (info)",
        Ours::WithKey => "(a+key) ours + idempotency key (info)",
    };
    println!("{name}");
    let Some(test) = TestStore::new(Backend::Postgres).await else {
        bail!("PostgreSQL is unreachable; set DATABASE_URL");
    };
    let store = test.store.clone();
    let result = async {
        let mut events: AggregateStore<Patient> = store.aggregate_store(vec![]);
        if variant == Ours::Cold {
            events = events.with_cache_limit(0);
        }
        let events = Arc::new(events);
        let ws = writers(s);
        let exec = |store: Store, events: Arc<AggregateStore<Patient>>, with_key: bool| {
            move |id: PatientId, command: PatientCommand| {
                let store = store.clone();
                let events = events.clone();
                async move {
                    let mut meta = CommandMeta::new(format!("patient:{id}"));
                    if with_key {
                        meta = meta.with_idempotency_key(format!("bench:{}", Uuid::new_v4()));
                    }
                    store
                        .execute::<Patient>(&events, &id.to_string(), command, &(), &meta)
                        .await
                        .map(|_| ())
                        .map_err(|e| anyhow::anyhow!("{e:#}"))
                }
            }
        };
        let seed_exec = exec(store.clone(), events.clone(), false);
        let run_exec = exec(store.clone(), events.clone(), with_key);
        seed_and_measure(
            s,
            name,
            &ws,
            move |w, n| {
                let (id, command) = seed_command(&w, n);
                seed_exec(id, command)
            },
            move |w, n| {
                let (id, command) = update_command(&w, n);
                run_exec(id, command)
            },
        )
        .await
    }
    .await;
    test.cleanup().await?;
    result
}

/// A fresh database with postgres-es's stock schema and a pool of the same size.
async fn stock_database(s: &Settings) -> anyhow::Result<(PgPool, String, String)> {
    let Some((StoreConfig::Postgres { url }, Some(admin), Some(db), _)) =
        fresh_config(Backend::Postgres).await
    else {
        bail!("PostgreSQL is unreachable; set DATABASE_URL");
    };
    let options: PgConnectOptions = url.parse()?;
    let pool = PgPoolOptions::new()
        .max_connections(s.pool_size)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options.disable_statement_logging())
        .await?;
    for statement in STOCK_SCHEMA {
        sqlx::query(statement).execute(&pool).await?;
    }
    Ok((pool, admin, db))
}

async fn drop_database(pool: PgPool, admin: &str, db: &str) -> anyhow::Result<()> {
    pool.close().await;
    let mut conn = PgConnection::connect(admin).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    Ok(())
}

/// (b) bare postgres-es on its stock schema.
async fn case_bare(s: &Settings) -> anyhow::Result<CaseResult> {
    let name = "(b) bare postgres-es, stock schema";
    println!("{name}");
    let (pool, admin, db) = stock_database(s).await?;
    let result = async {
        let cqrs: Arc<PostgresCqrs<Patient>> = Arc::new(CqrsFramework::new(
            PersistedEventStore::new_event_store(PostgresEventRepository::new(pool.clone())),
            vec![],
            (),
        ));
        let ws = writers(s);
        let exec = move |id: PatientId, command: PatientCommand| {
            let cqrs = cqrs.clone();
            async move {
                cqrs.execute_with_metadata(
                    &id.to_string(),
                    command,
                    metadata_map(&format!("patient:{id}")),
                )
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))
            }
        };
        let seed_exec = exec.clone();
        seed_and_measure(
            s,
            name,
            &ws,
            move |w, n| {
                let (id, command) = seed_command(&w, n);
                seed_exec(id, command)
            },
            move |w, n| {
                let (id, command) = update_command(&w, n);
                exec(id, command)
            },
        )
        .await
    }
    .await;
    drop_database(pool, &admin, &db).await?;
    result
}

/// Which raw-SQL case to run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Raw {
    /// (c): one autocommit single-row INSERT into the stock table.
    Insert,
    /// The same INSERT into our events table (global-log columns, indexes, trigger).
    InsertOurSchema,
    /// What any load-then-append path must do, without a framework: SELECT the
    /// aggregate's events, then BEGIN, INSERT, COMMIT (stock table).
    LoadAndTransaction,
}

/// (c) and its informational variants.
async fn case_raw(s: &Settings, kind: Raw) -> anyhow::Result<CaseResult> {
    let name = match kind {
        Raw::Insert => "(c) raw single-row INSERT + COMMIT",
        Raw::InsertOurSchema => "(c-ours) raw INSERT into our events table (info)",
        Raw::LoadAndTransaction => "(c-load) raw SELECT + BEGIN/INSERT/COMMIT (info)",
    };
    println!("{name}");
    // Our schema comes from Store::open (its pool is AFYA_PG_POOL_SIZE too).
    let (pool, cleanup) = if kind == Raw::InsertOurSchema {
        let Some(test) = TestStore::new(Backend::Postgres).await else {
            bail!("PostgreSQL is unreachable; set DATABASE_URL");
        };
        let pool = test.store.pg_pool().context("not on PostgreSQL")?.clone();
        (pool, Cleanup::Store(test))
    } else {
        let (pool, admin, db) = stock_database(s).await?;
        (pool.clone(), Cleanup::Database(pool, admin, db))
    };
    let result = async {
        let ws = writers(s);
        let p = pool.clone();
        // Every row gets a sequence of its own, so rows never collide on the key.
        let next_sequence = Arc::new(AtomicI64::new(1));
        let insert = move |w: Writer, n: usize| {
            let pool = p.clone();
            let sequence = next_sequence.fetch_add(1, Ordering::Relaxed);
            async move {
                let id = w.patients[n % w.patients.len()];
                let aggregate_id = id.to_string();
                let payload = serde_json::to_value(profile_event(id))?;
                let metadata = serde_json::to_value(metadata_map(&format!("patient:{id}")))?;
                let query = sqlx::query(RAW_INSERT)
                    .bind("patient")
                    .bind(aggregate_id.clone())
                    .bind(sequence)
                    .bind("PatientProfileUpdated")
                    .bind("1.0")
                    .bind(payload)
                    .bind(metadata);
                if kind == Raw::LoadAndTransaction {
                    let loaded = sqlx::query(RAW_LOAD)
                        .bind("patient")
                        .bind(aggregate_id)
                        .fetch_all(&pool)
                        .await?;
                    for row in &loaded {
                        let _: serde_json::Value = sqlx::Row::try_get(row, "payload")?;
                    }
                    let mut tx = pool.begin().await?;
                    query.execute(&mut *tx).await?;
                    tx.commit().await?;
                } else {
                    query.execute(&pool).await?;
                }
                anyhow::Ok(())
            }
        };
        // Seeding does the same inserts (not timed), as (a) and (b) seed their aggregates.
        seed_and_measure(s, name, &ws, insert.clone(), insert).await
    }
    .await;
    match cleanup {
        Cleanup::Store(test) => test.cleanup().await?,
        Cleanup::Database(pool, admin, db) => drop_database(pool, &admin, &db).await?,
    }
    result
}

enum Cleanup {
    Store(TestStore),
    Database(PgPool, String, String),
}

/// Counts events and writes nothing but the runner's checkpoint.
struct Counter {
    seen: AtomicU64,
}

#[async_trait]
impl LogHandler for Counter {
    fn name(&self) -> &str {
        "bench_counter"
    }
    fn schema(&self, _: Backend) -> Vec<String> {
        vec![]
    }
    fn tables(&self) -> Vec<String> {
        vec![]
    }
    async fn apply(&self, _: &mut ReadModelTx, _: &StoredEvent) -> anyhow::Result<()> {
        self.seen.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Events per aggregate in the catch-up fill, and rows per fill transaction.
const FILL_PER_AGGREGATE: u64 = 10;
const FILL_CHUNK: u64 = 200_000;

async fn case_catchup(s: &Settings) -> anyhow::Result<f64> {
    println!(
        "consumer catch-up over {} events, batch size {}",
        s.catchup_events, s.catchup_batch
    );
    let Some(test) = TestStore::new(Backend::Postgres).await else {
        bail!("PostgreSQL is unreachable; set DATABASE_URL");
    };
    let result = catchup_on(s, &test.store).await;
    test.cleanup().await?;
    result
}

async fn catchup_on(s: &Settings, store: &Store) -> anyhow::Result<f64> {
    let pool = store.pg_pool().context("not on PostgreSQL")?;
    // Many aggregates with sequences 1..10, ~300-byte payloads and real metadata,
    // committed in transactions of FILL_CHUNK rows.
    let fill = format!(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
                             payload, metadata) \
         SELECT 'patient', x.id::text, x.seq, x.kind, '1.0', \
                json_build_object(x.kind, json_build_object('patient_id', x.id, \
                    'personal', 'v1.' || repeat(md5(g::text), 7))), \
                json_build_object('actor', 'patient:' || x.id, 'correlation_id', x.c, \
                    'command_id', x.c) \
         FROM generate_series($1::bigint, $2::bigint) AS g, \
         LATERAL (SELECT md5(((g - 1) / {FILL_PER_AGGREGATE})::text)::uuid AS id, \
                         (g - 1) % {FILL_PER_AGGREGATE} + 1 AS seq, \
                         CASE WHEN (g - 1) % {FILL_PER_AGGREGATE} = 0 \
                              THEN 'PatientRegistered' ELSE 'PatientProfileUpdated' END AS kind, \
                         gen_random_uuid() AS c) AS x"
    );
    let t = Instant::now();
    let mut from = 1u64;
    while from <= s.catchup_events {
        let to = (from + FILL_CHUNK - 1).min(s.catchup_events);
        sqlx::query(&fill)
            .bind(i64::try_from(from)?)
            .bind(i64::try_from(to)?)
            .execute(pool)
            .await
            .context("filling the events table")?;
        from = to + 1;
    }
    sqlx::query("VACUUM ANALYZE events").execute(pool).await?;
    let avg_payload: Option<f64> =
        sqlx::query_scalar("SELECT avg(octet_length(payload::text))::float8 FROM events")
            .fetch_one(pool)
            .await?;
    println!(
        "  filled {} events (avg payload {:.0} bytes) in {:.1}s, then VACUUM ANALYZE",
        s.catchup_events,
        avg_payload.unwrap_or(0.0),
        t.elapsed().as_secs_f64()
    );
    checkpoint().await?;

    let counter = Arc::new(Counter {
        seen: AtomicU64::new(0),
    });
    let handler: Arc<dyn LogHandler> = counter.clone();
    let mut runner = Runner::new(store.clone(), handler)
        .await?
        .with_batch_size(s.catchup_batch);
    let t = Instant::now();
    let applied = runner.drain().await?;
    let elapsed = t.elapsed();
    let seen = counter.seen.load(Ordering::Relaxed);
    if applied != s.catchup_events || seen != s.catchup_events {
        bail!(
            "consumer applied {applied} (saw {seen}) of {} events",
            s.catchup_events
        );
    }
    let rate = applied as f64 / elapsed.as_secs_f64();
    println!(
        "  drained {applied} events in {:.2}s = {rate:.0} events/s",
        elapsed.as_secs_f64()
    );
    Ok(rate)
}
