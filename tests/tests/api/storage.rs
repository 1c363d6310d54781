//! The storage adapter against a real S3 server (`s3s-fs`, which checks AWS Signature
//! V4): only ciphertext leaves the machine, once per record whatever happens to the
//! remote store or the adapter, and nothing unverified is ever served.

use std::time::{Duration, Instant};

use eventstore::testing::BACKENDS;
use eventstore::Backend;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::app::{Party, TestApp};
use crate::support::s3::S3Server;

const LAB: &[u8] = b"%PDF-1.4\nHbA1c 9.1% Achieng Otieno, Nairobi\n%%EOF\n";
const MARKER: &[u8] = b"Achieng";

pub(crate) fn refs(vars: &[(String, String)]) -> Vec<(&str, &str)> {
    vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

pub(crate) fn with(
    mut vars: Vec<(String, String)>,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    vars
}

/// Quick retries so outages and dead letters play out in seconds.
pub(crate) const FAST: &[(&str, &str)] = &[
    ("AFYA_STORAGE_RETRY_BASE_MS", "100"),
    ("AFYA_STORAGE_RETRY_MAX_MS", "500"),
    ("AFYA_STORAGE_POLL_MS", "100"),
    ("AFYA_S3_TIMEOUT_SECS", "5"),
];

async fn patient(app: &TestApp) -> Party {
    let phone = app.phone();
    let id = app.sign_up_patient(&phone, "Achieng Otieno").await;
    let token = app.sign_in(&phone).await;
    Party { id, phone, token }
}

async fn upload(app: &TestApp, p: &Party, bytes: &[u8]) -> (String, String) {
    let created = app
        .upload(&p.token, &p.id, "category=lab", "application/pdf", bytes)
        .await
        .ok(201);
    (
        created["record_id"].as_str().unwrap().to_owned(),
        created["sha256"].as_str().unwrap().to_owned(),
    )
}

async fn statuses(app: &TestApp, p: &Party) -> Vec<(String, String)> {
    let page = app
        .get(
            &format!("/v1/patients/{}/records?limit=100", p.id),
            Some(&p.token),
        )
        .await
        .ok(200);
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["record_id"].as_str().unwrap().to_owned(),
                r["storage_status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Waits until every record of `p` is `stored`; panics with the last statuses.
pub(crate) async fn all_stored(app: &TestApp, p: &Party, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let now = statuses(app, p).await;
        if !now.is_empty() && now.iter().all(|(_, s)| s == "stored") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not all stored: {now:?}\n{}",
            app.server.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) async fn stored_events_of(app: &TestApp, record_id: &str) -> i64 {
    app.scalar(&format!(
        "SELECT count(*) FROM events WHERE event_type = 'RecordStored' \
         AND aggregate_id = '{record_id}'"
    ))
    .await
}

async fn readyz(app: &TestApp) -> Value {
    app.get("/readyz", None).await.ok(200)
}

/// Waits until `/readyz` reports the remote store as `state` (it answers from the
/// last known state, refreshed in the background).
async fn remote_becomes(app: &TestApp, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = readyz(app).await;
        if ready["storage"]["remote"] == state {
            return ready;
        }
        assert!(Instant::now() < deadline, "{ready}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_rt::test]
async fn an_upload_is_copied_to_s3_as_ciphertext_only_and_recorded_once() {
    for backend in BACKENDS {
        let s3 = S3Server::start();
        let Some(app) = TestApp::start_with(backend, &refs(&s3.vars())).await else {
            continue;
        };
        let p = patient(&app).await;
        let (record_id, sha) = upload(&app, &p, LAB).await;
        all_stored(&app, &p, Duration::from_secs(30)).await;

        // Exactly one object, under the ciphertext's SHA-256, holding the ciphertext
        // exactly as kept locally, and not one byte of the plaintext.
        let objects = s3.objects();
        assert_eq!(objects.len(), 1, "{backend:?}");
        let (key, bytes) = &objects[0];
        assert_eq!(key, &format!("blobs/{sha}"));
        assert_eq!(hex(&Sha256::digest(bytes)), sha);
        assert_eq!(app.blobs(), vec![bytes.clone()]);
        assert!(!bytes.windows(MARKER.len()).any(|w| w == MARKER));
        assert!(!bytes.windows(5).any(|w| w == b"%PDF-"));

        // One RecordStored naming the backend, the key and the ETag.
        assert_eq!(stored_events_of(&app, &record_id).await, 1);
        let events = app.raw_events().await;
        let stored = events
            .lines()
            .find(|l| l.starts_with("RecordStored"))
            .unwrap();
        assert!(
            stored.contains(&format!("\"s3:{}\"", s3.bucket)),
            "{stored}"
        );
        assert!(stored.contains(&format!("blobs/{sha}")), "{stored}");
        assert!(
            stored.contains("etag") && !stored.replace(' ', "").contains("\"etag\":null"),
            "an ETag: {stored}"
        );
        assert!(!events.contains("Achieng"));

        let ready = readyz(&app).await;
        assert_eq!(ready["storage"]["backend"], format!("s3:{}", s3.bucket));
        assert_eq!(ready["storage"]["remote"], "ok");
        assert_eq!(ready["storage"]["pending"], 0);
        assert_eq!(ready["storage"]["dead_letters"], 0);

        // The patient reads it back.
        let read = app
            .get(&format!("/v1/records/{record_id}/content"), Some(&p.token))
            .await;
        assert_eq!(read.status, 200, "{}", read.text());
        assert_eq!(read.body, LAB);
        app.stop().await;
    }
}

#[actix_rt::test]
async fn with_the_store_down_uploads_are_accepted_and_stored_when_it_returns() {
    let mut s3 = S3Server::start();
    let vars = with(s3.vars(), FAST);
    let app = TestApp::start_with(Backend::Sqlite, &refs(&vars))
        .await
        .unwrap();
    let p = patient(&app).await;
    let (first, _) = upload(&app, &p, LAB).await;
    all_stored(&app, &p, Duration::from_secs(30)).await;

    s3.stop();
    let mut pending = Vec::new();
    for i in 0..3 {
        let body = format!("lab result {i} for Achieng").into_bytes();
        pending.push(upload(&app, &p, &body).await.0);
    }
    // Accepted and readable from the local copy; shown as pending; not recorded.
    remote_becomes(&app, "unreachable").await;
    let now = statuses(&app, &p).await;
    for id in &pending {
        assert!(now.contains(&(id.clone(), "pending".into())), "{now:?}");
        assert_eq!(stored_events_of(&app, id).await, 0);
    }
    assert!(now.contains(&(first.clone(), "stored".into())));
    let read = app
        .get(
            &format!("/v1/records/{}/content", pending[0]),
            Some(&p.token),
        )
        .await;
    assert_eq!(read.status, 200);
    assert_eq!(read.body, b"lab result 0 for Achieng");
    // Ready all the same, saying what is wrong.
    let ready = readyz(&app).await;
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["storage"]["remote"], "unreachable");
    assert!(
        ready["storage"]["pending"].as_i64().unwrap() >= 1,
        "{ready}"
    );

    s3.resume();
    all_stored(&app, &p, Duration::from_secs(30)).await;
    assert_eq!(s3.objects().len(), 4);
    for id in pending.iter().chain([&first]) {
        assert_eq!(stored_events_of(&app, id).await, 1);
    }
    let ready = readyz(&app).await;
    assert_eq!(ready["storage"]["remote"], "ok");
    assert_eq!(ready["storage"]["dead_letters"], 0);
    let logs = app.stop().await;
    assert!(logs.contains("remote blob store unavailable"), "{logs}");
}

#[actix_rt::test]
async fn killed_between_upload_and_confirmation_it_ends_with_one_object_and_one_event() {
    for backend in BACKENDS {
        killed_between_upload_and_confirmation(backend).await;
    }
}

async fn killed_between_upload_and_confirmation(backend: Backend) {
    let s3 = S3Server::start();
    let vars = with(s3.vars(), FAST);
    // Uploads taken while no remote store is configured...
    let Some(mut app) = TestApp::start(backend).await else {
        return;
    };
    let p = patient(&app).await;
    let (copied, copied_sha) = upload(&app, &p, LAB).await;
    let (other, other_sha) = upload(&app, &p, b"second lab result").await;
    assert!(statuses(&app, &p).await.iter().all(|(_, s)| s == "local"));
    // ...and the state a crash leaves after the PUT of the first, before its command:
    // the object is there, `RecordStored` is not.
    let local = app.blobs();
    let ciphertext = local
        .iter()
        .find(|b| hex(&Sha256::digest(b)) == copied_sha)
        .unwrap();
    let object = s3.object_path(&copied_sha);
    std::fs::create_dir_all(object.parent().unwrap()).unwrap();
    std::fs::write(&object, ciphertext).unwrap();
    let placed = std::fs::metadata(&object).unwrap().modified().unwrap();
    // The second's object is there too, but damaged (same size, one byte off).
    let mut damaged = local
        .iter()
        .find(|b| hex(&Sha256::digest(b)) == other_sha)
        .unwrap()
        .clone();
    damaged[3] ^= 0x10;
    std::fs::write(s3.object_path(&other_sha), &damaged).unwrap();

    app.restart("KILL", &vars);
    all_stored(&app, &p, Duration::from_secs(30)).await;
    assert_eq!(s3.objects().len(), 2);
    assert_eq!(stored_events_of(&app, &copied).await, 1);
    assert_eq!(stored_events_of(&app, &other).await, 1);
    // The object found there was verified and adopted, not written again...
    assert_eq!(
        std::fs::metadata(&object).unwrap().modified().unwrap(),
        placed
    );
    // ...and the damaged one was recorded as such and replaced by the good copy.
    let good = std::fs::read(s3.object_path(&other_sha)).unwrap();
    assert_eq!(hex(&Sha256::digest(&good)), other_sha);
    assert_eq!(
        app.scalar(&format!(
            "SELECT count(*) FROM events WHERE event_type = 'RecordIntegrityFailed' \
             AND aggregate_id = '{other}'"
        ))
        .await,
        1
    );

    // Killed again and again while replicating a burst: still one of each.
    let mut burst = Vec::new();
    for round in 0..3 {
        for i in 0..8 {
            let body = format!("burst {round}/{i} Achieng").into_bytes();
            burst.push(upload(&app, &p, &body).await.0);
        }
        app.restart("KILL", &vars);
    }
    all_stored(&app, &p, Duration::from_secs(60)).await;
    assert_eq!(s3.objects().len(), 2 + burst.len());
    for id in &burst {
        assert_eq!(stored_events_of(&app, id).await, 1, "{id}");
    }
    assert_eq!(
        app.scalar("SELECT count(*) FROM events WHERE event_type = 'RecordStored'")
            .await,
        2 + burst.len() as i64
    );
    app.stop().await;
}

#[actix_rt::test]
async fn a_tampered_remote_copy_is_refused_and_the_failure_recorded() {
    let s3 = S3Server::start();
    let vars = with(s3.vars(), &[("AFYA_STORAGE_EVICT_LOCAL", "true")]);
    let app = TestApp::start_with(Backend::Sqlite, &refs(&vars))
        .await
        .unwrap();
    let p = patient(&app).await;
    let (record_id, sha) = upload(&app, &p, LAB).await;
    all_stored(&app, &p, Duration::from_secs(30)).await;
    // Evicted locally once stored: the read comes from S3, verified.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !app.blobs().is_empty() {
        assert!(Instant::now() < deadline, "local copy not evicted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let read = app
        .get(&format!("/v1/records/{record_id}/content"), Some(&p.token))
        .await;
    assert_eq!(read.status, 200, "{}", read.text());
    assert_eq!(read.body, LAB);

    // One bit flipped on the remote store.
    let object = s3.object_path(&sha);
    let mut bytes = std::fs::read(&object).unwrap();
    bytes[20] ^= 0x01;
    std::fs::write(&object, &bytes).unwrap();
    let refused = app
        .get(&format!("/v1/records/{record_id}/content"), Some(&p.token))
        .await;
    let problem = refused.problem(502, "integrity_check_failed");
    assert!(!refused.body.windows(MARKER.len()).any(|w| w == MARKER));
    assert!(problem.get("detail").is_some());
    // Refused again on the next read; the same bad copy is recorded once.
    app.get(&format!("/v1/records/{record_id}/content"), Some(&p.token))
        .await
        .problem(502, "integrity_check_failed");
    let failures = app
        .scalar(&format!(
            "SELECT count(*) FROM events WHERE event_type = 'RecordIntegrityFailed' \
             AND aggregate_id = '{record_id}'"
        ))
        .await;
    assert_eq!(failures, 1);
    let events = app.raw_events().await;
    let failed = events
        .lines()
        .find(|l| l.starts_with("RecordIntegrityFailed"))
        .unwrap();
    assert!(failed.contains(&sha), "{failed}");
    assert!(failed.contains(&hex(&Sha256::digest(&bytes))), "{failed}");
    let logs = app.stop().await;
    assert!(logs.contains("failed its integrity check"), "{logs}");
}

#[actix_rt::test]
async fn wrong_credentials_are_reported_and_nothing_is_marked_stored() {
    let s3 = S3Server::start();
    let vars = with(s3.vars_with_secret("not-the-secret"), FAST);
    let mut app = TestApp::start_with(Backend::Sqlite, &refs(&vars))
        .await
        .unwrap();
    let p = patient(&app).await;
    let (record_id, _) = upload(&app, &p, LAB).await;
    remote_becomes(&app, "unauthorized").await;
    // The replicator has tried and been refused.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, out, err) = app.env.run_with(&["consumers", "status"], &vars);
        assert!(ok, "{err}");
        if out.contains("refused the credentials") {
            break;
        }
        assert!(Instant::now() < deadline, "{out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        statuses(&app, &p).await,
        vec![(record_id.clone(), "pending".to_owned())]
    );
    assert_eq!(stored_events_of(&app, &record_id).await, 0);
    assert!(s3.objects().is_empty());
    // The operator's view says why.
    let (ok, out, err) = app.env.run_with(&["consumers", "status"], &vars);
    assert!(ok, "{err}");
    assert!(out.contains("remote unauthorized"), "{out}");
    assert!(out.contains("refused the credentials"), "{out}");
    assert!(out.contains(&record_id), "{out}");
    assert!(!out.contains("not-the-secret") && !err.contains("not-the-secret"));

    // With the right secret it goes through.
    app.restart("TERM", &with(s3.vars(), FAST));
    all_stored(&app, &p, Duration::from_secs(30)).await;
    assert_eq!(stored_events_of(&app, &record_id).await, 1);
    let logs = app.stop().await;
    assert!(!logs.contains(&s3.secret_key) && !logs.contains("not-the-secret"));
}

#[actix_rt::test]
async fn a_blob_that_keeps_failing_is_dead_lettered_and_can_be_retried() {
    let s3 = S3Server::start();
    let vars = with(
        s3.vars(),
        &[
            ("AFYA_STORAGE_MAX_ATTEMPTS", "2"),
            ("AFYA_STORAGE_RETRY_BASE_MS", "100"),
            ("AFYA_STORAGE_RETRY_MAX_MS", "200"),
            ("AFYA_STORAGE_POLL_MS", "100"),
        ],
    );
    let mut app = TestApp::start(Backend::Sqlite).await.unwrap();
    let p = patient(&app).await;
    let (record_id, sha) = upload(&app, &p, LAB).await;
    // The local copy goes missing before replication starts (a disk swapped, a bad
    // restore): the store is fine, this blob is not.
    let local = app.env.data_dir.join("blobs").join(&sha[..2]).join(&sha);
    let saved = std::fs::read(&local).unwrap();
    std::fs::remove_file(&local).unwrap();
    app.restart("TERM", &vars);

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = readyz(&app).await;
        if ready["storage"]["dead_letters"] == 1 {
            assert_eq!(ready["storage"]["remote"], "ok");
            // The worker's report: up, with a dead letter for an operator.
            let worker = &ready["integrations"]["storage"];
            assert_eq!(
                (&worker["status"], &worker["dead_letters"]),
                (&"degraded".into(), &1.into()),
                "{ready}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{ready}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = app.get("/metrics", None).await.text();
    assert!(
        metrics.contains(&format!(
            "afyachain_storage_jobs{{backend=\"s3:{}\",state=\"dead\"}} 1",
            s3.bucket
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "afyachain_jobs{{worker=\"storage\",kind=\"s3:{}\",state=\"dead\"}} 1",
            s3.bucket
        )),
        "{metrics}"
    );
    let (ok, out, _) = app.env.run_with(&["consumers", "status"], &vars);
    assert!(ok);
    assert!(out.contains("dead"), "{out}");
    assert!(out.contains(&record_id), "{out}");
    assert!(out.contains("no good local copy"), "{out}");
    assert!(out.contains("record_storage"), "{out}");
    assert_eq!(stored_events_of(&app, &record_id).await, 0);

    // Retry refuses nonsense, then requeues once the copy is back.
    let (ok, _, err) = app
        .env
        .run_with(&["consumers", "retry", "storage", "--record", "x"], &vars);
    assert!(!ok && err.contains("not a record id"), "{err}");
    std::fs::write(&local, &saved).unwrap();
    let (ok, out, err) = app.env.run_with(&["consumers", "retry", "storage"], &vars);
    assert!(ok, "{err}");
    assert!(out.contains("requeued 1"), "{out}");
    all_stored(&app, &p, Duration::from_secs(30)).await;
    assert_eq!(stored_events_of(&app, &record_id).await, 1);
    assert_eq!(readyz(&app).await["storage"]["dead_letters"], 0);
    app.stop().await;
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[actix_rt::test]
async fn with_the_local_copy_evicted_and_the_store_down_a_read_is_503_not_500() {
    let mut s3 = S3Server::start();
    let vars = with(
        with(s3.vars(), FAST),
        &[("AFYA_STORAGE_EVICT_LOCAL", "true")],
    );
    let app = TestApp::start_with(Backend::Sqlite, &refs(&vars))
        .await
        .unwrap();
    let p = patient(&app).await;
    let (record_id, _) = upload(&app, &p, LAB).await;
    all_stored(&app, &p, Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !app.blobs().is_empty() {
        assert!(Instant::now() < deadline, "local copy not evicted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s3.stop();
    let refused = app
        .get(&format!("/v1/records/{record_id}/content"), Some(&p.token))
        .await;
    refused.problem(503, "content_unavailable");
    assert!(refused.header("retry-after").is_some());
    s3.resume();
    let read = app
        .get(&format!("/v1/records/{record_id}/content"), Some(&p.token))
        .await;
    assert_eq!(read.status, 200, "{}", read.text());
    assert_eq!(read.body, LAB);
    app.stop().await;
}

#[actix_rt::test]
async fn a_missing_bucket_is_reported_and_bad_storage_settings_stop_the_start() {
    let s3 = S3Server::start();
    let mut vars = s3.vars();
    for (k, v) in vars.iter_mut() {
        if k == "AFYA_S3_BUCKET" {
            *v = "no-such-bucket".into();
        }
    }
    let app = TestApp::start_with(Backend::Sqlite, &refs(&vars))
        .await
        .unwrap();
    let ready = readyz(&app).await;
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["storage"]["remote"], "bucket_missing");
    for (broken, complaint) in [
        (
            vec![("AFYA_BLOB_STORE", "ipfs")],
            "AFYA_BLOB_STORE=ipfs is not local or s3",
        ),
        (
            vec![("AFYA_BLOB_STORE", "s3")],
            "AFYA_S3_ENDPOINT must be set",
        ),
        (
            vec![
                ("AFYA_BLOB_STORE", "s3"),
                ("AFYA_S3_ENDPOINT", "s3.example.com"),
            ],
            "is not an http(s) URL",
        ),
        (
            vec![("AFYA_STORAGE_MAX_ATTEMPTS", "0")],
            "AFYA_STORAGE_MAX_ATTEMPTS must be at least 1",
        ),
        (
            vec![("AFYA_STORAGE_EVICT_LOCAL", "maybe")],
            "is not true or false",
        ),
    ] {
        let broken: Vec<(String, String)> = broken
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let (ok, _, err) = app.env.run_with(&["consumers", "status"], &broken);
        assert!(!ok, "{broken:?}");
        assert!(err.contains(complaint), "{broken:?}: {err}");
    }
    app.stop().await;
}

#[actix_rt::test]
async fn a_corrupt_local_copy_is_reported_and_repaired_from_the_verified_remote_one() {
    let s3 = S3Server::start();
    let app = TestApp::start_with(Backend::Sqlite, &refs(&s3.vars()))
        .await
        .unwrap();
    let p = patient(&app).await;
    let (record_id, sha) = upload(&app, &p, LAB).await;
    all_stored(&app, &p, Duration::from_secs(30)).await;
    let local = app.env.data_dir.join("blobs").join(&sha[..2]).join(&sha);
    let mut bytes = std::fs::read(&local).unwrap();
    bytes[7] ^= 0x80;
    std::fs::write(&local, &bytes).unwrap();

    for _ in 0..2 {
        let read = app
            .get(&format!("/v1/records/{record_id}/content"), Some(&p.token))
            .await;
        assert_eq!(read.status, 200, "{}", read.text());
        assert_eq!(read.body, LAB);
    }
    assert_eq!(hex(&Sha256::digest(std::fs::read(&local).unwrap())), sha);
    let events = app.raw_events().await;
    let failed: Vec<&str> = events
        .lines()
        .filter(|l| l.starts_with("RecordIntegrityFailed"))
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0].contains("\"local\""), "{}", failed[0]);
    assert!(failed[0].contains(&hex(&Sha256::digest(&bytes))));
    app.stop().await;
}

#[actix_rt::test]
#[ignore = "alone: run by scripts/test in its second pass, one test at a time"]
async fn a_store_that_never_answers_holds_up_neither_uploads_nor_readiness_nor_shutdown() {
    crate::support::alone();
    // Accepts connections and never says a word.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    let vars: Vec<(String, String)> = [
        ("AFYA_BLOB_STORE", format!("http://127.0.0.1:{port}")),
        ("AFYA_S3_ENDPOINT", format!("http://127.0.0.1:{port}")),
        ("AFYA_S3_BUCKET", "afya-records".into()),
        ("AFYA_S3_ACCESS_KEY", "AFYATESTACCESSKEY".into()),
        (
            "AFYA_S3_SECRET_KEY",
            uuid::Uuid::new_v4().simple().to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut vars = vars;
    vars[0].1 = "s3".into();
    let app = TestApp::start_with(Backend::Sqlite, &refs(&vars))
        .await
        .unwrap();
    let p = patient(&app).await;
    let started = Instant::now();
    let (record_id, _) = upload(&app, &p, LAB).await;
    assert!(started.elapsed() < Duration::from_secs(5));

    let started = Instant::now();
    let ready = readyz(&app).await;
    assert_eq!(ready["storage"]["remote"], "unreachable", "{ready}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(readyz(&app).await["status"], "ready");
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    assert_eq!(
        statuses(&app, &p).await,
        vec![(record_id.clone(), "pending".to_owned())]
    );
    let read = app
        .get(&format!("/v1/records/{record_id}/content"), Some(&p.token))
        .await;
    assert_eq!(read.status, 200);
    // The replicator is stuck in a call to the store: SIGTERM still stops at once.
    let started = Instant::now();
    app.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[actix_rt::test]
async fn two_instances_on_one_database_replicate_once_and_a_standby_takes_over() {
    let s3 = S3Server::start();
    let vars = with(s3.vars(), FAST);
    // Both instances share PostgreSQL and the data directory (see docs/storage.md, "Several instances").
    let Some(mut app) = TestApp::start_with(Backend::Postgres, &refs(&vars)).await else {
        return;
    };
    let second = app.env.serve_with(&refs(&vars));
    let p = patient(&app).await;
    let mut uploaded = Vec::new();
    for i in 0..6 {
        let base = if i % 2 == 0 {
            &app.server.base
        } else {
            &second.base
        };
        let r = app
            .http
            .post(format!("{base}/v1/patients/{}/records?category=lab", p.id))
            .bearer_auth(&p.token)
            .header("content-type", "application/pdf")
            .body(format!("lab {i} Achieng").into_bytes())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        uploaded.push(
            r.json::<Value>().await.unwrap()["record_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    all_stored(&app, &p, Duration::from_secs(30)).await;
    // The first instance (the active replicator) dies; the standby takes over.
    app.restart("KILL", &[]);
    for i in 0..4 {
        let r = app
            .http
            .post(second.url(&format!("/v1/patients/{}/records?category=lab", p.id)))
            .bearer_auth(&p.token)
            .header("content-type", "application/pdf")
            .body(format!("after failover {i} Achieng").into_bytes())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        uploaded.push(
            r.json::<Value>().await.unwrap()["record_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let page: Value = app
            .http
            .get(second.url(&format!("/v1/patients/{}/records?limit=100", p.id)))
            .bearer_auth(&p.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let items = page["items"].as_array().unwrap();
        if items.len() == 10 && items.iter().all(|r| r["storage_status"] == "stored") {
            break;
        }
        assert!(Instant::now() < deadline, "{page}\n{}", second.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Only the second instance replicates now (the first came back without S3).
    assert!(second.logs().contains("storage replicator active"));
    assert_eq!(s3.objects().len(), 10);
    for id in &uploaded {
        assert_eq!(stored_events_of(&app, id).await, 1, "{id}");
    }
    drop(second);
    app.stop().await;
}
