//! Throughput of the chain writer on anvil: `BENCH_GRANTS` approved access requests
//! (default 1,000), waiting when the writer starts, become grants in the consent
//! registry (up to 32 per `grantBatch` transaction) and `ConsentGrantedOnChain`
//! events. Reports grants/s, transactions/s and transactions per 1,000 grants.
//! `BENCH_LIVE=1` starts the writer before the approvals come in; `BENCH_BATCH=N` sets
//! the grants per transaction (1: one transaction per grant).
//!
//! Run: `eval "$(scripts/tools)"; cargo bench -p tests --bench chain`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::node_bindings::Anvil;
use alloy::primitives::B256;
use alloy::providers::Provider;
use chain_adapter::chain::{Chain, ChainIntake, ChainMode, ChainSettings};
use commands::blobs::LocalBlobStore;
use commands::clock::SystemClock;
use commands::keys::{KeyStore, SecretKey};
use commands::{ApproveAccess, Commands, RegisterDoctor, RegisterPatient, RequestAccess};
use domain::actor::Actor;
use domain::ids::StaffId;
use domain::value::{
    BirthDate, Category, DurationDays, LicenceNumber, Msisdn, Password, PersonName, Purpose, Scope,
};
use eventstore::testing::TestStore;
use eventstore::{Backend, CommandMeta, ConsumerActor};

fn main() {
    let grants: usize = std::env::var("BENCH_GRANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    actix_rt::System::new().block_on(run(grants));
}

async fn run(grants: usize) {
    let path = std::env::var("AFYA_ANVIL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../contracts/node_modules/.bin/anvil")
        });
    let node = Anvil::at(path).spawn();
    let t = TestStore::new(Backend::Sqlite).await.unwrap();
    let dir = std::env::temp_dir().join(format!("afya-bench-{}", uuid::Uuid::new_v4()));
    let keys = Arc::new(KeyStore::new(
        SecretKey::generate(),
        t.store.any_pool().clone(),
    ));
    let commands = Arc::new(Commands::new(
        t.store.clone(),
        keys,
        Arc::new(LocalBlobStore::new(&dir)),
        Arc::new(SystemClock),
    ));
    let mut settings = ChainSettings {
        rpc_url: node.endpoint(),
        chain_id: node.chain_id(),
        private_key: B256::from_slice(&node.keys()[0].to_bytes()).to_string(),
        mode: ChainMode::Evm,
        record_token: None,
        consent_registry: None,
        audit_anchor: None,
        paymaster: None,
        confirmations: 1,
        receipt_timeout: Duration::from_secs(60),
        poll: Duration::from_millis(5),
        anchor_every: 0,
        grants_per_transaction: std::env::var("BENCH_BATCH")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(32),
    };
    let chain = Chain::connect(settings.clone()).await.unwrap();
    for (name, address) in chain.deploy().await.unwrap() {
        match name {
            "AFYA_RECORD_TOKEN_ADDRESS" => settings.record_token = Some(address),
            "AFYA_CONSENT_REGISTRY_ADDRESS" => settings.consent_registry = Some(address),
            _ => {}
        }
    }

    let today = commands.now().date_naive();
    let password = Password::parse("bench password 123").unwrap();
    let patient = commands
        .register_patient(
            RegisterPatient {
                name: &PersonName::parse("Bench Patient").unwrap(),
                phone: &Msisdn::parse("254712345678").unwrap(),
                birth_date: &BirthDate::parse("1990-01-01", today).unwrap(),
                password: &password,
            },
            CommandMeta::new("bench"),
        )
        .await
        .unwrap()
        .id;
    let doctor = commands
        .register_doctor(
            RegisterDoctor {
                name: &PersonName::parse("Bench Doctor").unwrap(),
                phone: &Msisdn::parse("254712345679").unwrap(),
                licence: LicenceNumber::parse("KMPDC-9999").unwrap(),
                password: &password,
            },
            CommandMeta::new("bench"),
        )
        .await
        .unwrap()
        .id;
    commands
        .verify_doctor(doctor, StaffId::new(), CommandMeta::new("bench"))
        .await
        .unwrap();
    let scope = Scope::new([Category::Lab].into(), BTreeSet::new()).unwrap();
    // Live: the writer runs while the approvals come in one by one (small batches);
    // otherwise they are all waiting when it starts (full batches).
    let live = std::env::var("BENCH_LIVE").is_ok_and(|v| v == "1");
    let operator = chain.operator;
    let before = chain
        .provider
        .get_transaction_count(operator)
        .await
        .unwrap();

    let start_writer = || async {
        let settings = settings.clone();
        let intake =
            ConsumerActor::spawn(t.store.clone(), Arc::new(ChainIntake { anchor_every: 0 }))
                .await
                .unwrap();
        let chain = Chain::connect(settings).await.unwrap();
        let writer = chain_adapter::chain::minter::start(
            t.store.clone(),
            commands.clone(),
            chain.clone(),
            Some(intake.subscribe()),
        )
        .unwrap();
        (intake, writer, chain)
    };
    let mut running = None;
    if live {
        running = Some(start_writer().await);
    }
    let mut started = Instant::now();
    for _ in 0..grants {
        let request = commands
            .request_access(
                RequestAccess {
                    doctor_id: doctor,
                    patient_id: patient,
                    scope: scope.clone(),
                    purpose: &Purpose::parse("Follow-up").unwrap(),
                    duration: DurationDays::new(30).unwrap(),
                    note: None,
                },
                CommandMeta::new("bench"),
            )
            .await
            .unwrap()
            .id;
        commands
            .approve_access(
                ApproveAccess {
                    request_id: request,
                    by: Actor::Patient(patient),
                    expires_at: None,
                    scope: None,
                },
                CommandMeta::new("bench"),
            )
            .await
            .unwrap();
    }
    let (intake, writer, chain) = match running {
        Some(running) => running,
        None => {
            started = Instant::now();
            start_writer().await
        }
    };
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE event_type = 'ConsentGrantedOnChain'",
        )
        .fetch_one(t.store.any_pool())
        .await
        .unwrap();
        if done as usize >= grants {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "grants did not finish"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let sent = chain
        .provider
        .get_transaction_count(operator)
        .await
        .unwrap()
        - before;
    let _ = writer.send(chain_adapter::chain::minter::Stop).await;
    intake.stop().await;
    println!(
        "chain writer on anvil (automine, 1 confirmation, {}): {grants} grants in {elapsed:.2} s = {:.1} grants/s; {sent} transactions ({:.1} tx/s) = {:.0} per 1,000 grants",
        if live { "approvals arriving live" } else { "approvals waiting" },
        grants as f64 / elapsed,
        sent as f64 / elapsed,
        sent as f64 * 1000.0 / grants as f64
    );
    t.cleanup().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
