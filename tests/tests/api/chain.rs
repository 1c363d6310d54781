//! The chain adapter on a real local node (`anvil`, installed by `scripts/tools`):
//! stored records become tokens held by the patient, once each, whatever happens.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use alloy::node_bindings::{Anvil, AnvilInstance};
use alloy::primitives::{Address, B256, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use chain_adapter::chain::RecordToken;
use eventstore::Backend;
use serde_json::Value;

use crate::app::{Party, TestApp};
use crate::support::s3::S3Server;
use crate::support::Env;

fn anvil() -> AnvilInstance {
    let path = std::env::var("AFYA_ANVIL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../contracts/node_modules/.bin/anvil")
        });
    assert!(
        path.exists(),
        "anvil missing at {}: run scripts/tools",
        path.display()
    );
    Anvil::at(path).spawn()
}

fn chain_vars(node: &AnvilInstance) -> Vec<(String, String)> {
    let key = B256::from_slice(&node.keys()[0].to_bytes());
    vec![
        ("AFYA_CHAIN_RPC_URL".into(), node.endpoint()),
        ("AFYA_CHAIN_ID".into(), node.chain_id().to_string()),
        ("ZKSYNC_PRIVATE_KEY".into(), key.to_string()),
        ("AFYA_CHAIN_POLL_MS".into(), "100".into()),
    ]
}

/// `afyachain chain deploy`: the four addresses as variables.
async fn deploy(node: &AnvilInstance) -> Vec<(String, String)> {
    let env = Env::new(Backend::Sqlite).await.unwrap();
    let (ok, out, err) = env.run_with(&["chain", "deploy"], &chain_vars(node));
    assert!(ok, "{err}");
    let vars: Vec<(String, String)> = out
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let names: Vec<&str> = vars.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "AFYA_RECORD_TOKEN_ADDRESS",
            "AFYA_CONSENT_REGISTRY_ADDRESS",
            "AFYA_AUDIT_ANCHOR_ADDRESS",
            "AFYA_PAYMASTER_ADDRESS"
        ]
    );
    assert!(!out.contains(&chain_vars(node)[2].1), "the key was printed");
    env.cleanup().await;
    vars
}

fn refs(vars: &[(String, String)]) -> Vec<(&str, &str)> {
    vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

async fn patient(app: &TestApp) -> Party {
    let phone = app.phone();
    let id = app.sign_up_patient(&phone, "Achieng Otieno").await;
    let token = app.sign_in(&phone).await;
    Party { id, phone, token }
}

async fn records(app: &TestApp, p: &Party) -> Vec<Value> {
    app.get(
        &format!("/v1/patients/{}/records?limit=100", p.id),
        Some(&p.token),
    )
    .await
    .ok(200)["items"]
        .as_array()
        .unwrap()
        .clone()
}

async fn all_minted(app: &TestApp, p: &Party, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let items = records(app, p).await;
        if items.len() == n && items.iter().all(|r| r["token_id"].is_string()) {
            return items;
        }
        assert!(
            Instant::now() < deadline,
            "{items:?}\n{}",
            app.server.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn reader(node: &AnvilInstance) -> DynProvider {
    ProviderBuilder::new()
        .connect_http(node.endpoint_url())
        .erased()
}

fn address_of(vars: &[(String, String)], name: &str) -> Address {
    vars.iter()
        .find(|(k, _)| k == name)
        .unwrap()
        .1
        .parse()
        .unwrap()
}

async fn minted_on_chain(node: &AnvilInstance, token: Address) -> usize {
    RecordToken::new(token, reader(node))
        .RecordMinted_filter()
        .from_block(0)
        .query()
        .await
        .unwrap()
        .len()
}

/// Moves the `chain_intake` consumer back to position 0 (the server stopped).
async fn reset_intake(app: &TestApp) {
    use sqlx::Connection;
    let db = app.env.data_dir.join("afyachain.db");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("UPDATE consumer_checkpoints SET tx = 0, position = 0 WHERE name = 'chain_intake'")
        .execute(&mut conn)
        .await
        .unwrap();
}

#[actix_rt::test]
async fn stored_records_become_tokens_once_through_replays_and_kills() {
    let node = anvil();
    let s3 = S3Server::start();
    let deployed = deploy(&node).await;
    let token_address = address_of(&deployed, "AFYA_RECORD_TOKEN_ADDRESS");
    let mut vars = s3.vars();
    vars.extend(chain_vars(&node));
    vars.extend(deployed.clone());
    vars.push(("AFYA_STORAGE_POLL_MS".into(), "100".into()));
    let mut app = TestApp::start_with(Backend::Sqlite, &refs(&vars))
        .await
        .unwrap();
    let p = patient(&app).await;
    for i in 0..3 {
        app.upload(
            &p.token,
            &p.id,
            "category=lab",
            "application/pdf",
            format!("lab {i} Achieng").as_bytes(),
        )
        .await
        .ok(201);
    }
    let items = all_minted(&app, &p, 3).await;
    let contract = RecordToken::new(token_address, reader(&node));
    let mut holders = Vec::new();
    for item in &items {
        let token: U256 = item["token_id"].as_str().unwrap().parse().unwrap();
        // The token carries the record's id and category (lab: bit 0).
        let record = uuid::Uuid::parse_str(item["record_id"].as_str().unwrap()).unwrap();
        assert_eq!(token, U256::from(record.as_u128()) << 8);
        let sha: B256 = format!("0x{}", item["sha256"].as_str().unwrap())
            .parse()
            .unwrap();
        assert_eq!(contract.contentHash(token).call().await.unwrap(), sha);
        holders.push(contract.ownerOf(token).call().await.unwrap());
        let tx: B256 = item["token_tx_hash"].as_str().unwrap().parse().unwrap();
        let receipt = reader(&node)
            .get_transaction_receipt(tx)
            .await
            .unwrap()
            .unwrap();
        assert!(receipt.status());
    }
    // One custodial address per patient, not the operator's.
    assert!(holders.iter().all(|h| *h == holders[0]));
    assert_ne!(holders[0], node.addresses()[0]);
    assert_eq!(minted_on_chain(&node, token_address).await, 3);
    assert_eq!(
        app.scalar("SELECT count(*) FROM events WHERE event_type = 'RecordTokenMinted'")
            .await,
        3
    );

    // Replayed from position 0: nothing new is sent.
    let operator = node.addresses()[0];
    let sent = reader(&node).get_transaction_count(operator).await.unwrap();
    app.restart("TERM", &[]);
    reset_intake(&app).await;
    app.restart("TERM", &vars);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = app.server.logs();
        let queued = app
            .scalar("SELECT count(*) FROM jobs WHERE worker = 'chain'")
            .await;
        if queued == 0 && logs.contains("chain writer active") {
            break;
        }
        assert!(Instant::now() < deadline, "{logs}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        reader(&node).get_transaction_count(operator).await.unwrap(),
        sent,
        "a replay sent transactions"
    );
    assert_eq!(minted_on_chain(&node, token_address).await, 3);

    // Killed again and again while minting a burst: one token per record.
    for round in 0..2 {
        for i in 0..4 {
            app.upload(
                &p.token,
                &p.id,
                "category=imaging",
                "application/pdf",
                format!("scan {round}/{i} Achieng").as_bytes(),
            )
            .await
            .ok(201);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        app.restart("KILL", &vars);
    }
    let items = all_minted(&app, &p, 11).await;
    assert_eq!(minted_on_chain(&node, token_address).await, 11);
    assert_eq!(
        app.scalar("SELECT count(*) FROM events WHERE event_type = 'RecordTokenMinted'")
            .await,
        11
    );
    for item in items.iter().filter(|i| i["category"] == "imaging") {
        let token: U256 = item["token_id"].as_str().unwrap().parse().unwrap();
        assert_eq!(token & U256::from(0xff), U256::from(1), "imaging: bit 1");
    }
    let logs = app.stop().await;
    assert!(
        !logs.contains(&chain_vars(&node)[2].1[2..]),
        "the operator key reached the logs"
    );
}

#[actix_rt::test]
async fn a_mint_already_on_chain_is_recorded_not_sent_again() {
    let node = anvil();
    let s3 = S3Server::start();
    let deployed = deploy(&node).await;
    let token_address = address_of(&deployed, "AFYA_RECORD_TOKEN_ADDRESS");
    // Stored with the chain adapter off...
    let mut app = TestApp::start_with(Backend::Sqlite, &refs(&s3.vars()))
        .await
        .unwrap();
    let p = patient(&app).await;
    let created = app
        .upload(
            &p.token,
            &p.id,
            "category=lab",
            "application/pdf",
            b"lab Achieng",
        )
        .await
        .ok(201);
    let record_id = created["record_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    while records(&app, &p).await[0]["storage_status"] != "stored" {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...and the mint already done on chain by an earlier run that died before
    // recording it: same event id, same token.
    let mut conn = {
        use sqlx::Connection;
        let db = app.env.data_dir.join("afyachain.db");
        sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=ro", db.display()))
            .await
            .unwrap()
    };
    let origin: String = sqlx::query_scalar(
        "SELECT event_id FROM events WHERE event_type = 'RecordStored' AND aggregate_id = $1",
    )
    .bind(&record_id)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let origin = uuid::Uuid::parse_str(&origin).unwrap();
    let record = uuid::Uuid::parse_str(&record_id).unwrap();
    let token = U256::from(record.as_u128()) << 8;
    let sha: B256 = format!("0x{}", created["sha256"].as_str().unwrap())
        .parse()
        .unwrap();
    let operator = ProviderBuilder::new()
        .wallet(alloy::network::EthereumWallet::from(
            alloy::signers::local::PrivateKeySigner::from(node.keys()[0].clone()),
        ))
        .connect_http(node.endpoint_url())
        .erased();
    let earlier = RecordToken::new(token_address, &operator)
        .mint(
            Address::repeat_byte(0x77),
            token,
            sha,
            chain_adapter::chain::event_id(origin),
        )
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    let sent = reader(&node)
        .get_transaction_count(node.addresses()[0])
        .await
        .unwrap();

    let mut vars = s3.vars();
    vars.extend(chain_vars(&node));
    vars.extend(deployed);
    app.restart("TERM", &vars);
    let items = all_minted(&app, &p, 1).await;
    assert_eq!(
        items[0]["token_tx_hash"].as_str().unwrap(),
        earlier.transaction_hash.to_string()
    );
    assert_eq!(items[0]["token_id"].as_str().unwrap(), token.to_string());
    assert_eq!(
        reader(&node)
            .get_transaction_count(node.addresses()[0])
            .await
            .unwrap(),
        sent
    );
    assert_eq!(minted_on_chain(&node, token_address).await, 1);
    app.stop().await;
}

async fn wait_events(app: &TestApp, event_type: &str, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let count = app
            .scalar(&format!(
                "SELECT count(*) FROM events WHERE event_type = '{event_type}'"
            ))
            .await;
        if count >= n {
            assert_eq!(count, n, "{event_type}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{event_type}: {count}\n{}",
            app.server.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_rt::test]
async fn the_consent_story_ends_on_chain_granted_then_revoked() {
    for backend in eventstore::testing::BACKENDS {
        consent_story_on_chain(backend).await;
    }
}

async fn consent_story_on_chain(backend: Backend) {
    let node = anvil();
    let s3 = S3Server::start();
    let deployed = deploy(&node).await;
    let token_address = address_of(&deployed, "AFYA_RECORD_TOKEN_ADDRESS");
    let registry_address = address_of(&deployed, "AFYA_CONSENT_REGISTRY_ADDRESS");
    let mut vars = s3.vars();
    vars.extend(chain_vars(&node));
    vars.extend(deployed);
    vars.push(("AFYA_STORAGE_POLL_MS".into(), "100".into()));
    let Some(app) = TestApp::start_with(backend, &refs(&vars)).await else {
        return;
    };
    let w = app.world().await;
    let (record_id, request_id) = app
        .share(&w, "lab", "application/pdf", b"%PDF HbA1c Achieng")
        .await;
    let items = all_minted(&app, &w.patient, 1).await;
    let token: U256 = items[0]["token_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(items[0]["record_id"], record_id.as_str());
    // One record, as its patient and the granted doctor see it; hidden from others.
    for who in [&w.patient, &w.doctor] {
        let one = app
            .get(&format!("/v1/records/{record_id}"), Some(&who.token))
            .await
            .ok(200);
        assert_eq!(one, items[0]);
    }
    for who in [&w.other_patient, &w.other_doctor] {
        app.get(&format!("/v1/records/{record_id}"), Some(&who.token))
            .await
            .problem(404, "record_not_found");
    }
    app.get(&format!("/v1/records/{record_id}"), Some(&w.auditor.token))
        .await
        .problem(403, "role_forbidden");
    wait_events(&app, "ConsentGrantedOnChain", 1).await;

    let registry = chain_adapter::chain::ConsentRegistry::new(registry_address, reader(&node));
    let granted = registry
        .ConsentGranted_filter()
        .from_block(0)
        .query()
        .await
        .unwrap();
    assert_eq!(granted.len(), 1);
    let (event, _) = &granted[0];
    let request = uuid::Uuid::parse_str(&request_id).unwrap();
    assert_eq!(event.grantId, chain_adapter::chain::event_id(request));
    assert_eq!(event.categories, 1, "lab");
    let holder = RecordToken::new(token_address, reader(&node))
        .ownerOf(token)
        .call()
        .await
        .unwrap();
    assert_eq!(event.patient, holder);
    let doctor = event.grantee;
    assert_ne!(doctor, holder);
    let now = u64::try_from(chrono::Utc::now().timestamp()).unwrap();
    assert!(registry.hasAccess(doctor, token, now).call().await.unwrap());
    assert!(!registry
        .hasAccess(Address::repeat_byte(5), token, now)
        .call()
        .await
        .unwrap());
    assert!(!registry
        .hasAccess(doctor, token, event.expiry)
        .call()
        .await
        .unwrap());

    // The patient revokes: the chain follows.
    app.post_empty(
        &format!("/v1/access-requests/{request_id}/revocation"),
        Some(&w.patient.token),
    )
    .await
    .ok(200);
    wait_events(&app, "ConsentRevokedOnChain", 1).await;
    assert!(!registry.hasAccess(doctor, token, now).call().await.unwrap());
    assert_eq!(
        registry
            .ConsentRevoked_filter()
            .from_block(0)
            .query()
            .await
            .unwrap()
            .len(),
        1
    );
    app.stop().await;
}

#[actix_rt::test]
async fn log_ranges_are_anchored_and_audit_verify_catches_a_tampered_event() {
    let node = anvil();
    let deployed = deploy(&node).await;
    let mut vars = chain_vars(&node);
    vars.extend(deployed.clone());
    vars.push(("AFYA_CHAIN_ANCHOR_EVERY".into(), "4".into()));
    let app = TestApp::start_with(Backend::Sqlite, &refs(&vars))
        .await
        .unwrap();
    // Sign-ups, verification, sign-ins: well over eight events.
    let _w = app.world().await;
    wait_until_anchored(&app, 2).await;
    // Auditors (and registrars) list the anchored ranges; others may not.
    let listed = app
        .get("/v1/audit/anchors?limit=1", Some(&_w.auditor.token))
        .await
        .ok(200);
    assert_eq!(listed["items"][0]["from"], 1);
    assert_eq!(listed["items"][0]["to"], 4);
    assert!(listed["items"][0]["tx_hash"]
        .as_str()
        .unwrap()
        .starts_with("0x"));
    let cursor = listed["next_cursor"].as_i64().unwrap();
    let rest = app
        .get(
            &format!("/v1/audit/anchors?cursor={cursor}"),
            Some(&_w.registrar.token),
        )
        .await
        .ok(200);
    assert_eq!(rest["items"][0]["from"], 5);
    app.get("/v1/audit/anchors", Some(&_w.patient.token))
        .await
        .problem(403, "role_forbidden");
    app.get("/v1/audit/anchors", None)
        .await
        .problem(401, "unauthenticated");
    let anchor = chain_adapter::chain::AuditAnchor::new(
        address_of(&deployed, "AFYA_AUDIT_ANCHOR_ADDRESS"),
        reader(&node),
    );
    let first = anchor.anchorAt(U256::ZERO).call().await.unwrap();
    assert_eq!((first.fromPosition, first.toPosition), (1, 4));

    let (ok, out, err) = app
        .env
        .run_with(&["audit", "verify", "--from", "1", "--to", "8"], &vars);
    assert!(ok, "{out}{err}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok")).count(),
        2,
        "{out}"
    );

    // Someone edits a stored event: the anchored root no longer matches.
    {
        use sqlx::Connection;
        let db = app.env.data_dir.join("afyachain.db");
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        sqlx::query(
            "UPDATE events SET metadata = '{\"actor\":\"system:forged\"}' WHERE position = \
             (SELECT position FROM events ORDER BY position LIMIT 1 OFFSET 2)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let (ok, out, err) = app
        .env
        .run_with(&["audit", "verify", "--from", "1", "--to", "8"], &vars);
    assert!(!ok, "{out}");
    assert!(out.contains("MISMATCH  1..=4"), "{out}");
    assert!(out.contains("ok        5..=8"), "{out}");
    assert!(err.contains("do not match the local log"), "{err}");
    // Nothing anchored there: refused, not passed.
    let (ok, _, err) = app.env.run_with(
        &["audit", "verify", "--from", "1000", "--to", "2000"],
        &vars,
    );
    assert!(!ok && err.contains("no anchored range"), "{err}");
    app.stop().await;
}

async fn wait_until_anchored(app: &TestApp, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let count = app
            .scalar("SELECT count(*) FROM events WHERE event_type = 'LogRangeAnchored'")
            .await;
        if count >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{}", app.server.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_rt::test]
#[ignore = "alone: run by scripts/test in its second pass, one test at a time"]
async fn with_the_node_down_the_api_goes_on_and_the_chain_catches_up() {
    crate::support::alone();
    let state = std::env::temp_dir().join(format!("afya-anvil-{}.json", uuid::Uuid::new_v4()));
    let path = std::env::var("AFYA_ANVIL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../contracts/node_modules/.bin/anvil")
        });
    let start = |port: Option<u16>| {
        let mut anvil =
            Anvil::at(&path).args(["--state", state.to_str().unwrap(), "--state-interval", "1"]);
        if let Some(port) = port {
            anvil = anvil.port(port);
        }
        anvil.spawn()
    };
    let node = start(None);
    let port = node.port();
    let s3 = S3Server::start();
    let deployed = deploy(&node).await;
    let token_address = address_of(&deployed, "AFYA_RECORD_TOKEN_ADDRESS");
    let mut vars = s3.vars();
    vars.extend(chain_vars(&node));
    vars.extend(deployed);
    vars.push(("AFYA_STORAGE_POLL_MS".into(), "100".into()));
    let app = TestApp::start_with(Backend::Sqlite, &refs(&vars))
        .await
        .unwrap();
    let p = patient(&app).await;
    app.upload(
        &p.token,
        &p.id,
        "category=lab",
        "application/pdf",
        b"lab one Achieng",
    )
    .await
    .ok(201);
    all_minted(&app, &p, 1).await;
    // Let the node write its state, then take it away.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    drop(node);

    let started = Instant::now();
    let created = app
        .upload(
            &p.token,
            &p.id,
            "category=lab",
            "application/pdf",
            b"lab two Achieng",
        )
        .await
        .ok(201);
    // The upload does not wait for the chain.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "an upload waited {took:?}");
    let second = created["record_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let items = records(&app, &p).await;
        let it = items
            .iter()
            .find(|i| i["record_id"] == second.as_str())
            .unwrap();
        if it["storage_status"] == "stored" {
            assert!(it["token_id"].is_null(), "minted with the node down?");
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(app.server.logs().contains("chain node unavailable"));
    // Ready all the same, with the chain reported down and its mint waiting.
    let down = chain_report(&app, |c| c["status"] == "down").await;
    assert_eq!(
        (&down["status"], &down["active"]),
        (&"down".into(), &true.into()),
        "{down}"
    );
    assert!(down["lag"].as_i64().unwrap() >= 1, "the mint waits: {down}");
    let metrics = app.get("/metrics", None).await.text();
    assert!(
        metrics.contains("afyachain_worker_up{worker=\"chain\"} 0"),
        "{metrics}"
    );

    // The node comes back with its state: the work left waiting goes through.
    let node = start(Some(port));
    all_minted(&app, &p, 2).await;
    assert_eq!(minted_on_chain(&node, token_address).await, 2);
    let back = chain_report(&app, |c| c["status"] == "ok" && c["lag"] == 0).await;
    assert_eq!(
        (&back["status"], &back["lag"]),
        (&"ok".into(), &0.into()),
        "{back}"
    );
    app.stop().await;
    let _ = std::fs::remove_file(&state);
}

/// `/readyz`'s report of the chain writer once `done` holds of it (or after 30 s).
async fn chain_report(app: &TestApp, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = app.get("/readyz", None).await.ok(200);
        let chain = ready["integrations"]["chain"].clone();
        if done(&chain) || Instant::now() > deadline {
            return chain;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[actix_rt::test]
async fn a_transaction_not_mined_in_time_is_replaced_with_higher_fees_and_lands_once() {
    use alloy::providers::ext::AnvilApi;
    let node = anvil();
    let deployed = deploy(&node).await;
    let mut vars = chain_vars(&node);
    vars.extend(deployed.clone());
    vars.push(("AFYA_CHAIN_ANCHOR_EVERY".into(), "4".into()));
    vars.push(("AFYA_CHAIN_RECEIPT_TIMEOUT_SECS".into(), "1".into()));
    let chain = reader(&node);
    let operator = node.addresses()[0];
    let nonce_before = chain.get_transaction_count(operator).await.unwrap();
    // The node stops mining: the first anchor sits in its pool.
    chain.anvil_set_auto_mine(false).await.unwrap();
    let app = TestApp::start_with(Backend::Sqlite, &refs(&vars))
        .await
        .unwrap();
    let _w = app.world().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    // Every replacement spent, and some time more: still no second transaction under a
    // new nonce.
    while !app.server.logs().contains("bump=3") {
        assert!(Instant::now() < deadline, "{}", app.server.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    chain.anvil_set_auto_mine(true).await.unwrap();
    chain.anvil_mine(Some(1), None).await.unwrap();
    wait_until_anchored(&app, 2).await;
    // Replacements share their nonce: one transaction per anchor reached the chain
    // (read when no anchor is in flight: the nonce the same before and after).
    let anchor = chain_adapter::chain::AuditAnchor::new(
        address_of(&deployed, "AFYA_AUDIT_ANCHOR_ADDRESS"),
        chain.clone(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let on_chain = loop {
        let before = chain.get_transaction_count(operator).await.unwrap();
        let on_chain = anchor
            .LogRangeAnchored_filter()
            .from_block(0)
            .query()
            .await
            .unwrap();
        let after = chain.get_transaction_count(operator).await.unwrap();
        let pending = app
            .scalar("SELECT count(*) FROM jobs WHERE worker = 'chain'")
            .await;
        if before == after && pending == 0 {
            assert_eq!(
                after - nonce_before,
                on_chain.len() as u64,
                "one mined transaction per anchor"
            );
            break on_chain;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let recorded = app
        .scalar("SELECT count(*) FROM events WHERE event_type = 'LogRangeAnchored'")
        .await;
    assert!(recorded >= 2 && on_chain.len() as i64 >= recorded);
    // The first anchor landed through a replacement that pays more than the original.
    let (_, first_log) = &on_chain[0];
    let tx = chain
        .get_transaction_by_hash(first_log.transaction_hash.unwrap())
        .await
        .unwrap()
        .unwrap();
    let fees = chain.estimate_eip1559_fees().await.unwrap();
    use alloy::consensus::Transaction as _;
    assert!(tx.max_fee_per_gas() > fees.max_fee_per_gas, "{tx:?}");
    app.stop().await;
}

#[actix_rt::test]
async fn a_grant_sent_by_a_run_that_died_is_still_revoked() {
    let node = anvil();
    let deployed = deploy(&node).await;
    let registry_address = address_of(&deployed, "AFYA_CONSENT_REGISTRY_ADDRESS");
    // Approved, then revoked, while the chain adapter is off...
    let mut app = TestApp::start(Backend::Sqlite).await.unwrap();
    let w = app.world().await;
    let asked = app
        .request_access(&w.doctor, &w.patient.id, &["lab"])
        .await
        .ok(201);
    let request_id = asked["request_id"].as_str().unwrap().to_owned();
    app.post_empty(
        &format!("/v1/access-requests/{request_id}/approval"),
        Some(&w.patient.token),
    )
    .await
    .ok(200);
    // ...but the grant reached the chain: an earlier run sent it and died before
    // recording it (same grant id, same originating event).
    let approved: String = {
        use sqlx::Connection;
        let db = app.env.data_dir.join("afyachain.db");
        let mut conn =
            sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=ro", db.display()))
                .await
                .unwrap();
        sqlx::query_scalar(
            "SELECT event_id FROM events WHERE event_type = 'AccessApproved' AND aggregate_id = $1",
        )
        .bind(&request_id)
        .fetch_one(&mut conn)
        .await
        .unwrap()
    };
    let operator = ProviderBuilder::new()
        .wallet(alloy::network::EthereumWallet::from(
            alloy::signers::local::PrivateKeySigner::from(node.keys()[0].clone()),
        ))
        .connect_http(node.endpoint_url())
        .erased();
    let request = uuid::Uuid::parse_str(&request_id).unwrap();
    let grant_id = chain_adapter::chain::event_id(request);
    let doctor = Address::repeat_byte(0x44);
    let patient = Address::repeat_byte(0x55);
    chain_adapter::chain::ConsentRegistry::new(registry_address, &operator)
        .grant(
            grant_id,
            patient,
            doctor,
            1,
            vec![],
            u64::MAX / 2,
            chain_adapter::chain::event_id(uuid::Uuid::parse_str(&approved).unwrap()),
        )
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    app.post_empty(
        &format!("/v1/access-requests/{request_id}/revocation"),
        Some(&w.patient.token),
    )
    .await
    .ok(200);

    let mut vars = chain_vars(&node);
    vars.extend(deployed);
    app.restart("TERM", &vars);
    wait_events(&app, "ConsentRevokedOnChain", 1).await;
    assert_eq!(
        app.scalar("SELECT count(*) FROM events WHERE event_type = 'ConsentGrantedOnChain'")
            .await,
        1
    );
    let registry = chain_adapter::chain::ConsentRegistry::new(registry_address, reader(&node));
    assert!(registry.grants(grant_id).call().await.unwrap().revoked);
    app.stop().await;
}

/// `AFYA_CHAIN_MODE=zksync`: the same story through a zkSync endpoint (see
/// `support::zksync`): every transaction is a 0x71 signed by the operator with the
/// platform's paymaster in the general flow, and the real paymaster contract validated
/// and paid for each one.
#[actix_rt::test]
async fn in_zksync_mode_every_transaction_is_a_0x71_the_paymaster_pays_for() {
    use alloy::network::EthereumWallet;
    use alloy::signers::local::PrivateKeySigner;
    use chain_adapter::chain::{zksync, Paymaster};

    let node = anvil();
    let s3 = S3Server::start();
    let deployed = deploy(&node).await;
    let paymaster_address = address_of(&deployed, "AFYA_PAYMASTER_ADDRESS");
    let registry_address = address_of(&deployed, "AFYA_CONSENT_REGISTRY_ADDRESS");
    // The owner funds the paymaster and sets its cap (as M-Pesa payments will).
    let owner_key: PrivateKeySigner = chain_vars(&node)[2].1.parse().unwrap();
    let operator = owner_key.address();
    let owner = ProviderBuilder::new()
        .wallet(EthereumWallet::from(owner_key))
        .connect_http(node.endpoint_url());
    let cap = U256::from(10u64.pow(17));
    Paymaster::new(paymaster_address, &owner)
        .setSpendingCap(cap)
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    use alloy::providers::ext::AnvilApi;
    owner
        .anvil_set_balance(paymaster_address, U256::from(10u64.pow(18)))
        .await
        .unwrap();

    let zk = crate::support::zksync::ZksyncNode::start(&node.endpoint(), node.chain_id()).await;
    let mut vars = s3.vars();
    vars.extend(chain_vars(&node));
    for (k, v) in vars.iter_mut() {
        if k == "AFYA_CHAIN_RPC_URL" {
            *v = zk.url.clone();
        }
    }
    vars.push(("AFYA_CHAIN_MODE".into(), "zksync".into()));
    vars.extend(deployed);
    vars.push(("AFYA_STORAGE_POLL_MS".into(), "100".into()));
    let Some(app) = TestApp::start_with(Backend::Sqlite, &refs(&vars)).await else {
        return;
    };
    let w = app.world().await;
    let (_, request_id) = app
        .share(&w, "imaging", "image/png", b"\x89PNG chest x-ray Achieng")
        .await;
    let items = all_minted(&app, &w.patient, 1).await;
    wait_events(&app, "ConsentGrantedOnChain", 1).await;
    let token: U256 = items[0]["token_id"].as_str().unwrap().parse().unwrap();
    let registry = chain_adapter::chain::ConsentRegistry::new(registry_address, reader(&node));
    let granted = registry
        .ConsentGranted_filter()
        .from_block(0)
        .query()
        .await
        .unwrap();
    assert_eq!(granted.len(), 1);
    let doctor = granted[0].0.grantee;
    let now = u64::try_from(chrono::Utc::now().timestamp()).unwrap();
    assert!(registry.hasAccess(doctor, token, now).call().await.unwrap());
    app.post_empty(
        &format!("/v1/access-requests/{request_id}/revocation"),
        Some(&w.patient.token),
    )
    .await
    .ok(200);
    wait_events(&app, "ConsentRevokedOnChain", 1).await;
    assert!(!registry.hasAccess(doctor, token, now).call().await.unwrap());

    // Mint, grant, revoke: three 0x71 transactions, nothing refused.
    assert_eq!(zk.refused(), Vec::<String>::new());
    let accepted = zk.accepted();
    assert_eq!(accepted.len(), 3, "{}", app.server.logs());
    for (i, tx) in accepted.iter().enumerate() {
        assert_eq!(tx.from, operator);
        assert_eq!(tx.chain_id, node.chain_id());
        assert_eq!(tx.paymaster, paymaster_address);
        assert_eq!(tx.paymaster_input, zksync::general_flow_input());
        // As zks_estimateFee answered (not the default the request carried).
        assert_eq!(tx.gas_per_pubdata, U256::from(800));
        assert!(tx.max_fee_per_gas > 0 && tx.gas_limit > 21_000);
        if i > 0 {
            assert_eq!(tx.nonce, accepted[i - 1].nonce + 1);
        }
    }
    // The record shows the 0x71 transaction's own hash.
    assert_eq!(
        items[0]["token_tx_hash"].as_str().unwrap(),
        accepted[0].hash().to_string()
    );
    // The paymaster paid for each: one GasSponsored per transaction, `spent` their sum.
    let paymaster = Paymaster::new(paymaster_address, reader(&node));
    let sponsored = paymaster
        .GasSponsored_filter()
        .from_block(0)
        .query()
        .await
        .unwrap();
    assert_eq!(sponsored.len(), 3);
    let expected: U256 = accepted
        .iter()
        .map(|t| U256::from(t.gas_limit) * U256::from(t.max_fee_per_gas))
        .sum();
    assert_eq!(paymaster.spent().call().await.unwrap(), expected);
    // The adapter named each transaction as the node did.
    assert!(!app
        .server
        .logs()
        .contains("the node names the transaction differently"));
    app.stop().await;
    zk.stop().await;
}

/// `n` approvals made while the chain adapter is off.
async fn approvals_while_off(n: usize) -> (TestApp, Vec<String>) {
    let app = TestApp::start(Backend::Sqlite).await.unwrap();
    let w = app.world().await;
    let mut requests = Vec::new();
    for i in 0..n {
        let (_, request_id) = app
            .share(
                &w,
                "lab",
                "application/pdf",
                format!("lab {i} Achieng").as_bytes(),
            )
            .await;
        requests.push(request_id);
    }
    (app, requests)
}

/// Approvals waiting for the chain go out together: one `grantBatch` transaction for
/// many grants, each recorded with that transaction.
#[actix_rt::test]
async fn waiting_approvals_are_granted_together_in_one_transaction() {
    let node = anvil();
    let deployed = deploy(&node).await;
    let registry_address = address_of(&deployed, "AFYA_CONSENT_REGISTRY_ADDRESS");
    // Approvals made while the chain adapter is off reach it together once it is on.
    let (mut app, requests) = approvals_while_off(6).await;
    let mut vars = chain_vars(&node);
    vars.extend(deployed);
    app.restart("TERM", &vars);
    wait_events(&app, "ConsentGrantedOnChain", 6).await;

    let registry = chain_adapter::chain::ConsentRegistry::new(registry_address, reader(&node));
    let granted = registry
        .ConsentGranted_filter()
        .from_block(0)
        .query()
        .await
        .unwrap();
    assert_eq!(granted.len(), 6, "one grant per approval");
    let mut ids: Vec<B256> = granted.iter().map(|(e, _)| e.grantId).collect();
    ids.sort();
    let mut expected: Vec<B256> = requests
        .iter()
        .map(|r| chain_adapter::chain::event_id(uuid::Uuid::parse_str(r).unwrap()))
        .collect();
    expected.sort();
    assert_eq!(ids, expected);
    let mut transactions: Vec<B256> = granted
        .iter()
        .map(|(_, log)| log.transaction_hash.unwrap())
        .collect();
    transactions.dedup();
    assert!(
        transactions.len() < granted.len(),
        "{} transactions for {} grants",
        transactions.len(),
        granted.len()
    );
    // Each approval records the transaction that carried it.
    let events = app.raw_events().await;
    let recorded: Vec<&str> = events
        .lines()
        .filter(|l| l.starts_with("ConsentGrantedOnChain"))
        .collect();
    assert_eq!(recorded.len(), 6);
    for payload in recorded {
        let tx = transactions
            .iter()
            .find(|t| payload.contains(&t.to_string()));
        assert!(tx.is_some(), "{payload}");
    }
    app.stop().await;
}

/// Anchoring turned on after the log has grown, then its range size changed: the
/// ranges on chain still start at 1 and follow each other without gap or overlap, and
/// `audit verify` finds every one matching the local log.
#[actix_rt::test]
async fn anchor_ranges_stay_contiguous_when_anchoring_starts_late_or_changes_size() {
    let node = anvil();
    let deployed = deploy(&node).await;
    let anchor_address = address_of(&deployed, "AFYA_AUDIT_ANCHOR_ADDRESS");
    let with = |every: &str| {
        let mut vars = chain_vars(&node);
        vars.extend(deployed.clone());
        vars.push(("AFYA_CHAIN_ANCHOR_EVERY".into(), every.into()));
        vars
    };
    let mut app = TestApp::start_with(Backend::Sqlite, &refs(&with("0")))
        .await
        .unwrap();
    let _w = app.world().await;
    let before = app.event_count().await;
    assert!(before > 8);
    app.restart("TERM", &with("4"));
    patient(&app).await;
    wait_until_anchored(&app, before / 4).await;
    app.restart("TERM", &with("3"));
    let anchored = app
        .scalar("SELECT count(*) FROM events WHERE event_type = 'LogRangeAnchored'")
        .await;
    patient(&app).await;
    patient(&app).await;
    wait_until_anchored(&app, anchored + 2).await;

    let anchor = chain_adapter::chain::AuditAnchor::new(anchor_address, reader(&node));
    let count: u64 = anchor.anchorCount().call().await.unwrap().to();
    let mut next = 1;
    let mut sizes = Vec::new();
    for i in 0..count {
        let a = anchor.anchorAt(U256::from(i)).call().await.unwrap();
        assert_eq!(
            a.fromPosition, next,
            "range {i} does not follow the one before"
        );
        sizes.push(a.toPosition - a.fromPosition + 1);
        next = a.toPosition + 1;
    }
    assert!(sizes.contains(&4) && sizes.contains(&3), "{sizes:?}");
    assert!(sizes.iter().all(|s| *s == 4 || *s == 3), "{sizes:?}");
    let (ok, out, err) = app.env.run_with(
        &[
            "audit",
            "verify",
            "--from",
            "1",
            "--to",
            &(next - 1).to_string(),
        ],
        &with("3"),
    );
    assert!(ok, "{out}{err}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok")).count() as u64,
        count,
        "{out}"
    );
    app.stop().await;
}

/// A record stored for a patient who is erased before the chain adapter reaches it:
/// no token is minted (no address of theirs is left), and the work is done, not
/// retried into the dead letters.
#[actix_rt::test]
async fn no_token_is_minted_for_a_patient_erased_before_the_mint() {
    let node = anvil();
    let s3 = S3Server::start();
    let deployed = deploy(&node).await;
    let token_address = address_of(&deployed, "AFYA_RECORD_TOKEN_ADDRESS");
    let mut vars = s3.vars();
    vars.push(("AFYA_STORAGE_POLL_MS".into(), "100".into()));
    let mut app = TestApp::start_with(Backend::Sqlite, &refs(&vars))
        .await
        .unwrap();
    let p = patient(&app).await;
    app.upload(
        &p.token,
        &p.id,
        "category=lab",
        "application/pdf",
        b"lab Achieng",
    )
    .await
    .ok(201);
    let deadline = Instant::now() + Duration::from_secs(30);
    while records(&app, &p).await[0]["storage_status"] != "stored" {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Erased (crypto-shredded) under a fresh server that never read the key, then the
    // chain adapter starts.
    app.restart("TERM", &[]);
    {
        use sqlx::Connection;
        let db = app.env.data_dir.join("afyachain.db");
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        let gone = sqlx::query("DELETE FROM subject_keys WHERE subject_id = $1")
            .bind(&p.id)
            .execute(&mut conn)
            .await
            .unwrap();
        assert_eq!(gone.rows_affected(), 1);
    }
    vars.extend(chain_vars(&node));
    vars.extend(deployed);
    app.restart("TERM", &vars);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !app
        .server
        .logs()
        .contains("the patient was erased; no token minted")
    {
        assert!(Instant::now() < deadline, "{}", app.server.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        app.scalar("SELECT count(*) FROM jobs WHERE worker = 'chain'")
            .await,
        0
    );
    assert_eq!(minted_on_chain(&node, token_address).await, 0);
    assert_eq!(
        app.scalar("SELECT count(*) FROM events WHERE event_type = 'RecordTokenMinted'")
            .await,
        0
    );
    app.stop().await;
}

/// A batch holding a grant that cannot be made (its id is taken on chain by another
/// event) would revert: the grants go one at a time instead, and only that one fails.
#[actix_rt::test]
async fn a_batch_with_a_grant_that_cannot_be_made_goes_one_grant_at_a_time() {
    use alloy::network::EthereumWallet;
    use alloy::signers::local::PrivateKeySigner;
    let node = anvil();
    let deployed = deploy(&node).await;
    let registry_address = address_of(&deployed, "AFYA_CONSENT_REGISTRY_ADDRESS");
    let (mut app, requests) = approvals_while_off(4).await;
    // Someone with the operator key took the first request's grant id.
    let operator: PrivateKeySigner = chain_vars(&node)[2].1.parse().unwrap();
    let as_operator = ProviderBuilder::new()
        .wallet(EthereumWallet::from(operator))
        .connect_http(node.endpoint_url());
    let taken = chain_adapter::chain::event_id(uuid::Uuid::parse_str(&requests[0]).unwrap());
    chain_adapter::chain::ConsentRegistry::new(registry_address, &as_operator)
        .grant(
            taken,
            Address::repeat_byte(1),
            Address::repeat_byte(2),
            1,
            vec![],
            2_000_000_000,
            B256::repeat_byte(9),
        )
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    let mut vars = chain_vars(&node);
    vars.extend(deployed);
    app.restart("TERM", &vars);
    wait_events(&app, "ConsentGrantedOnChain", 3).await;
    let registry = chain_adapter::chain::ConsentRegistry::new(registry_address, reader(&node));
    let granted = registry
        .ConsentGranted_filter()
        .from_block(0)
        .query()
        .await
        .unwrap();
    assert_eq!(
        granted.len(),
        4,
        "the one taken before, and three of the four"
    );
    let logs = app.server.logs();
    assert!(
        logs.contains("a batch of grants failed; sending them one at a time"),
        "{logs}"
    );
    // The one that cannot be made is retried on its own, counted, not granted.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempts = app
            .scalar(&format!(
                "SELECT COALESCE(MAX(attempts), 0) FROM jobs \
                 WHERE worker = 'chain' AND kind = 'grant' AND subject = '{}'",
                requests[0]
            ))
            .await;
        if attempts >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{}", app.server.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        app.scalar("SELECT count(*) FROM events WHERE event_type = 'ConsentGrantedOnChain'")
            .await,
        3
    );
    app.stop().await;
}

/// A patient's own wallet holds their tokens and is the patient in their grants, once
/// they prove they hold it; a patient whose custodial address is in use cannot switch.
#[actix_rt::test]
async fn a_registered_wallet_holds_the_patients_tokens() {
    use alloy::signers::local::PrivateKeySigner;
    use alloy::signers::SignerSync;
    use chain_adapter::chain::wallet_message;
    use reqwest::Method;

    let node = anvil();
    let s3 = S3Server::start();
    let deployed = deploy(&node).await;
    let token_address = address_of(&deployed, "AFYA_RECORD_TOKEN_ADDRESS");
    let registry_address = address_of(&deployed, "AFYA_CONSENT_REGISTRY_ADDRESS");
    let mut vars = s3.vars();
    vars.extend(chain_vars(&node));
    vars.extend(deployed);
    vars.push(("AFYA_STORAGE_POLL_MS".into(), "100".into()));
    let app = TestApp::start_with(Backend::Sqlite, &refs(&vars))
        .await
        .unwrap();
    let w = app.world().await;
    let path = format!("/v1/patients/{}/wallet", w.patient.id);
    let put = |token: &str, body: Value| {
        let app = &app;
        let path = path.clone();
        let token = token.to_owned();
        async move {
            app.send(
                Method::PUT,
                &path,
                Some(&token),
                &[("content-type", "application/json")],
                Some(serde_json::to_vec(&body).unwrap()),
            )
            .await
        }
    };
    let before = app.get(&path, Some(&w.patient.token)).await.ok(200);
    assert_eq!(before["wallet"], Value::Null);
    assert_eq!(before["custodial_in_use"], false);
    let template = before["message"].as_str().unwrap().to_owned();
    assert!(template.contains("{address}") && template.contains(&w.patient.id));

    let wallet = PrivateKeySigner::random();
    let address = wallet.address();
    let message = template.replace("{address}", &address.to_checksum(None));
    assert_eq!(message, wallet_message(&w.patient.id, address));
    let signature = wallet.sign_message_sync(message.as_bytes()).unwrap();
    let proof =
        serde_json::json!({"address": address.to_string(), "signature": signature.to_string()});
    // Refused: not an address, a signature by another key, one for another patient,
    // another patient or a doctor asking.
    put(
        &w.patient.token,
        serde_json::json!({"address": "0x12", "signature": signature.to_string()}),
    )
    .await
    .problem(422, "invalid_request");
    let stranger = PrivateKeySigner::random()
        .sign_message_sync(message.as_bytes())
        .unwrap();
    put(
        &w.patient.token,
        serde_json::json!({"address": address.to_string(), "signature": stranger.to_string()}),
    )
    .await
    .problem(422, "wallet_proof_invalid");
    let for_other = wallet
        .sign_message_sync(wallet_message(&w.other_patient.id, address).as_bytes())
        .unwrap();
    put(
        &w.patient.token,
        serde_json::json!({"address": address.to_string(), "signature": for_other.to_string()}),
    )
    .await
    .problem(422, "wallet_proof_invalid");
    put(&w.other_patient.token, proof.clone())
        .await
        .problem(403, "not_your_data");
    put(&w.doctor.token, proof.clone())
        .await
        .problem(403, "role_forbidden");
    assert_eq!(
        app.get(&path, Some(&w.patient.token)).await.ok(200)["wallet"],
        Value::Null
    );
    put(
        &w.patient.token,
        serde_json::json!({"address": format!("{address:x}")[2..].to_owned(), "signature": signature.to_string()}),
    )
    .await
    .problem(422, "invalid_request");
    // Registered; the same again is a retry; another wallet is refused.
    let registered = put(&w.patient.token, proof.clone()).await.ok(200);
    assert_eq!(registered["wallet"], address.to_checksum(None));
    let again = put(&w.patient.token, proof).await.ok(200);
    assert_eq!(again, registered);
    let second = PrivateKeySigner::random();
    let second_proof = second
        .sign_message_sync(wallet_message(&w.patient.id, second.address()).as_bytes())
        .unwrap();
    put(
        &w.patient.token,
        serde_json::json!({"address": second.address().to_string(), "signature": second_proof.to_string()}),
    )
    .await
    .problem(409, "wallet_already_registered");
    // One patient's only: another patient may not register the same wallet (a grant
    // of one would cover the other's tokens on chain).
    let shared = wallet
        .sign_message_sync(wallet_message(&w.other_patient.id, address).as_bytes())
        .unwrap();
    app.send(
        Method::PUT,
        &format!("/v1/patients/{}/wallet", w.other_patient.id),
        Some(&w.other_patient.token),
        &[("content-type", "application/json")],
        Some(
            serde_json::to_vec(&serde_json::json!({
                "address": address.to_string(),
                "signature": shared.to_string()
            }))
            .unwrap(),
        ),
    )
    .await
    .problem(409, "wallet_taken");
    // The address is sealed in the log, like other personal data.
    let raw = app.raw_events().await.to_lowercase();
    assert!(raw.contains("walletregistered"));
    assert!(
        !raw.contains(&format!("{address:x}")[2..]),
        "the wallet address is in the log in clear"
    );

    // The patient's token goes to the wallet, and the grant names it.
    let (_, _) = app
        .share(&w, "lab", "application/pdf", b"%PDF lab Achieng")
        .await;
    let items = all_minted(&app, &w.patient, 1).await;
    let token: U256 = items[0]["token_id"].as_str().unwrap().parse().unwrap();
    let holder = RecordToken::new(token_address, reader(&node))
        .ownerOf(token)
        .call()
        .await
        .unwrap();
    assert_eq!(holder, address);
    wait_events(&app, "ConsentGrantedOnChain", 1).await;
    let registry = chain_adapter::chain::ConsentRegistry::new(registry_address, reader(&node));
    let granted = registry
        .ConsentGranted_filter()
        .from_block(0)
        .query()
        .await
        .unwrap();
    assert_eq!(granted[0].0.patient, address);
    let now = u64::try_from(chrono::Utc::now().timestamp()).unwrap();
    assert!(registry
        .hasAccess(granted[0].0.grantee, token, now)
        .call()
        .await
        .unwrap());

    // The other patient's token went to their custodial address: too late to switch.
    app.upload(
        &w.other_patient.token,
        &w.other_patient.id,
        "category=lab",
        "application/pdf",
        b"lab Wanjiru",
    )
    .await
    .ok(201);
    all_minted(&app, &w.other_patient, 1).await;
    let other_path = format!("/v1/patients/{}/wallet", w.other_patient.id);
    let state = app
        .get(&other_path, Some(&w.other_patient.token))
        .await
        .ok(200);
    assert_eq!(state["custodial_in_use"], true);
    let late = PrivateKeySigner::random();
    let signature = late
        .sign_message_sync(wallet_message(&w.other_patient.id, late.address()).as_bytes())
        .unwrap();
    app.send(
        Method::PUT,
        &other_path,
        Some(&w.other_patient.token),
        &[("content-type", "application/json")],
        Some(
            serde_json::to_vec(&serde_json::json!({
                "address": late.address().to_string(),
                "signature": signature.to_string()
            }))
            .unwrap(),
        ),
    )
    .await
    .problem(409, "custodial_address_in_use");
    app.stop().await;
}

/// A chain job that fails is counted and put off: its attempts grow with each failure
/// and it is not due again at once (after ten it would be a dead letter).
#[actix_rt::test]
async fn a_failing_chain_job_is_counted_and_put_off() {
    let node = anvil();
    let deployed = deploy(&node).await;
    for backend in eventstore::testing::BACKENDS {
        let mut vars = chain_vars(&node);
        vars.extend(deployed.clone());
        let Some(app) = TestApp::start_with(backend, &refs(&vars)).await else {
            continue;
        };
        // A job no run can do: its subject is not a record id.
        app.tamper(
            "INSERT INTO jobs (worker, kind, subject, event_id, payload, position, state, \
             attempts, next_attempt_at, last_error, updated_at) VALUES ('chain', 'mint', \
             'not-a-record', NULL, NULL, 0, 'pending', 0, 0, NULL, '2026-12-07T00:00:00Z')",
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(30);
        let attempts = loop {
            let attempts = app
                .scalar(
                    "SELECT attempts FROM jobs WHERE worker = 'chain' AND subject = 'not-a-record'",
                )
                .await;
            if attempts >= 2 || Instant::now() > deadline {
                break attempts;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(
            attempts >= 2,
            "{backend:?}: attempts {attempts}\n{}",
            app.server.logs()
        );
        let now_ms = chrono::Utc::now().timestamp_millis();
        let put_off = app
            .scalar(&format!(
                "SELECT count(*) FROM jobs WHERE worker = 'chain' AND subject = 'not-a-record' \
                 AND state = 'pending' AND next_attempt_at > {now_ms} \
                 AND last_error = 'the job''s record id is not valid'"
            ))
            .await;
        assert_eq!(put_off, 1, "{backend:?}");
        app.stop().await;
    }
}
