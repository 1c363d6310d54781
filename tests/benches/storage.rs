//! Throughput of the storage replicator against a real local S3 server (`s3s-fs`).
//!
//! For each concurrency in `BENCH_CONCURRENCY` (default `1,4,8`): a fresh store and a
//! fresh bucket; `BENCH_RECORDS` records (default 200) of `BENCH_RECORD_BYTES` random
//! bytes (default 1 MiB) are uploaded through the command service (encrypted, kept
//! locally) and projected; then the replicator is started and timed until the last
//! `RecordStored` is in the log. Each record costs a local read and hash check, a HEAD
//! and a PUT of the ciphertext, the `MarkStored` command and the work-list update.
//!
//! Run: `eval "$(scripts/tools)"; cargo bench -p tests --bench storage`.
//! `BENCH_BACKEND=postgres` uses PostgreSQL (`DATABASE_URL`) instead of SQLite;
//! `BENCH_EVICT=true` evicts local copies (each PUT is then read back and verified).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code

#[path = "../tests/support/s3.rs"]
#[allow(dead_code)] // the tests use the rest
mod s3;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chain_adapter::storage::{ReplicationSettings, S3Remote, S3Settings, Storage};
use commands::blobs::LocalBlobStore;
use commands::clock::SystemClock;
use commands::keys::{KeyStore, SecretKey};
use commands::{Commands, RegisterPatient, UploadRecord};
use domain::actor::Actor;
use domain::value::{BirthDate, Category, MediaType, Msisdn, Password, PersonName};
use eventstore::testing::TestStore;
use eventstore::{Backend, CommandMeta, Runner};
use rand::RngCore;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let records: usize = env("BENCH_RECORDS", 200);
    let size: usize = env("BENCH_RECORD_BYTES", 1024 * 1024);
    let concurrency: Vec<usize> = std::env::var("BENCH_CONCURRENCY")
        .unwrap_or_else(|_| "1,4,8".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    let backend = match std::env::var("BENCH_BACKEND").as_deref() {
        Ok("postgres") => Backend::Postgres,
        _ => Backend::Sqlite,
    };
    println!(
        "storage replicator: {records} records of {size} bytes, {} store, s3s-fs on loopback",
        backend.as_str()
    );
    actix_rt::System::new().block_on(async move {
        for c in concurrency {
            run(backend, records, size, c).await;
        }
    });
}

async fn run(backend: Backend, records: usize, size: usize, concurrency: usize) {
    let s3 = s3::S3Server::start();
    let t = TestStore::new(backend)
        .await
        .expect("PostgreSQL is not reachable");
    let dir = std::env::temp_dir().join(format!("afya-bench-{}", uuid::Uuid::new_v4()));
    let remote = Arc::new(
        S3Remote::new(&S3Settings {
            endpoint: s3.endpoint(),
            bucket: s3.bucket.clone(),
            region: "us-east-1".into(),
            access_key: s3::ACCESS_KEY.into(),
            secret_key: s3.secret_key.clone(),
            timeout: Duration::from_secs(60),
        })
        .unwrap(),
    );
    let storage = Storage::new(
        Arc::new(LocalBlobStore::new(&dir)),
        Some(remote),
        ReplicationSettings {
            concurrency,
            evict_local: env("BENCH_EVICT", false),
            poll: Duration::from_millis(5),
            ..ReplicationSettings::default()
        },
    );
    let keys = Arc::new(KeyStore::new(
        SecretKey::generate(),
        t.store.any_pool().clone(),
    ));
    let commands = Arc::new(Commands::new(
        t.store.clone(),
        keys,
        storage.blob_store(),
        Arc::new(SystemClock),
    ));
    let today = commands.now().date_naive();
    let patient = commands
        .register_patient(
            RegisterPatient {
                name: &PersonName::parse("Bench Patient").unwrap(),
                phone: &Msisdn::parse("254712345678").unwrap(),
                birth_date: &BirthDate::parse("1990-01-01", today).unwrap(),
                password: &Password::parse("bench password 123").unwrap(),
            },
            CommandMeta::new("bench"),
        )
        .await
        .unwrap()
        .id;
    let mut body = vec![0u8; size];
    for _ in 0..records {
        rand::thread_rng().fill_bytes(&mut body);
        commands
            .upload_record(
                UploadRecord {
                    by: Actor::Patient(patient),
                    patient_id: patient,
                    category: Category::Lab,
                    media_type: MediaType::parse("application/pdf").unwrap(),
                    filename: None,
                },
                &body,
                CommandMeta::new("bench"),
            )
            .await
            .unwrap();
    }
    let mut projection = Runner::new(
        t.store.clone(),
        Arc::new(projections::RecordStorage::default()),
    )
    .await
    .unwrap();
    projection.drain().await.unwrap();

    let started = Instant::now();
    let replicator =
        chain_adapter::storage::replicator::start(t.store.clone(), commands.clone(), storage, None)
            .await
            .unwrap()
            .unwrap();
    loop {
        let stored: i64 =
            sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'RecordStored'")
                .fetch_one(t.store.any_pool())
                .await
                .unwrap();
        if stored as usize >= records {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "replication did not finish"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = replicator
        .send(chain_adapter::storage::replicator::Stop)
        .await;
    assert_eq!(s3.objects().len(), records);
    let mib = (records * size) as f64 / (1024.0 * 1024.0);
    println!(
        "  concurrency {concurrency:>2}: {records} records in {elapsed:.2} s = {:.1} records/s, {:.1} MiB/s",
        records as f64 / elapsed,
        mib / elapsed
    );
    t.cleanup().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
