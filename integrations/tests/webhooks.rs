#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code
//! Webhook deliveries against a real HTTP receiver, on both backends: retries, log
//! order, type filtering, signatures, parking and replay, and resuming from the
//! checkpoint.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use chrono::Utc;
use commands::blobs::LocalBlobStore;
use commands::keys::{KeyStore, SecretKey};
use commands::{ApproveAccess, Commands, RegisterDoctor, RegisterPatient, RequestAccess};
use domain::actor::Actor;
use domain::clock::FixedClock;
use domain::ids::StaffId;
use domain::value::{
    Category, DurationDays, LicenceNumber, Msisdn, Password, PersonName, Purpose, Scope,
};
use eventstore::testing::{TestStore, BACKENDS};
use eventstore::{CommandMeta, LogCursor, Store};
use integrations::view::IntegratorEvent;
use integrations::webhook::{self, DeliverySettings, WebhookSpec};
use uuid::Uuid;

const SECRET: &[u8] = b"whsec-test-shared-secret";
const TYPES: [&str; 3] = ["DoctorVerified", "AccessRequested", "AccessApproved"];

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Received {
    event_id: String,
    event_type: String,
    timestamp: i64,
    signature: String,
    body: Vec<u8>,
    accepted: bool,
}

#[derive(Default)]
struct ReceiverState {
    /// Answer 500 to this many more requests.
    fail_next: u32,
    /// Answer 500 to everything.
    fail_always: bool,
    requests: Vec<Received>,
}

/// A webhook receiver on a random loopback port.
struct Receiver {
    url: String,
    state: Arc<Mutex<ReceiverState>>,
    server: actix_web::dev::ServerHandle,
}

async fn receive(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<Arc<Mutex<ReceiverState>>>,
) -> HttpResponse {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(header("content-type"), "application/json");
    let mut state = state.lock().unwrap();
    let accepted = if state.fail_always {
        false
    } else if state.fail_next > 0 {
        state.fail_next -= 1;
        false
    } else {
        true
    };
    state.requests.push(Received {
        event_id: header(webhook::HEADER_EVENT_ID),
        event_type: header(webhook::HEADER_EVENT_TYPE),
        timestamp: header(webhook::HEADER_TIMESTAMP).parse().unwrap_or(-1),
        signature: header(webhook::HEADER_SIGNATURE),
        body: body.to_vec(),
        accepted,
    });
    if accepted {
        HttpResponse::NoContent().finish()
    } else {
        HttpResponse::InternalServerError().finish()
    }
}

impl Receiver {
    async fn start(fail_next: u32, fail_always: bool) -> Receiver {
        let state = Arc::new(Mutex::new(ReceiverState {
            fail_next,
            fail_always,
            requests: Vec::new(),
        }));
        let data = web::Data::new(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .route("/hook", web::post().to(receive))
        })
        .workers(1)
        .disable_signals()
        .bind(("127.0.0.1", 0))
        .unwrap();
        let addr = server.addrs()[0];
        let server = server.run();
        let handle = server.handle();
        actix_rt::spawn(server);
        Receiver {
            url: format!("http://{addr}/hook"),
            state,
            server: handle,
        }
    }

    fn requests(&self) -> Vec<Received> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Event ids accepted, first acceptance of each, in arrival order.
    fn delivered(&self) -> Vec<String> {
        let mut seen = BTreeSet::new();
        self.requests()
            .into_iter()
            .filter(|r| r.accepted && seen.insert(r.event_id.clone()))
            .map(|r| r.event_id)
            .collect()
    }

    fn set_fail_always(&self, fail: bool) {
        self.state.lock().unwrap().fail_always = fail;
    }

    async fn stop(self) {
        self.server.stop(false).await;
    }
}

fn new_spec(url: &str) -> WebhookSpec {
    WebhookSpec {
        id: Uuid::new_v4(),
        url: url.to_owned(),
        types: TYPES.iter().map(|t| (*t).to_owned()).collect(),
        secret: SECRET.to_vec(),
    }
}

fn fast(max_attempts: u32) -> DeliverySettings {
    DeliverySettings {
        max_attempts,
        base_backoff: Duration::from_millis(10),
        timeout: Duration::from_secs(2),
        poll_interval: Duration::from_millis(200),
        // The receivers run on loopback.
        address: integrations::AddressPolicy::new(true),
    }
}

fn commands(store: &Store) -> Commands {
    let blobs = std::env::temp_dir().join(format!("afya-webhook-blobs-{}", Uuid::new_v4()));
    Commands::new(
        store.clone(),
        Arc::new(KeyStore::new(
            SecretKey::generate(),
            store.any_pool().clone(),
        )),
        Arc::new(LocalBlobStore::new(&blobs)),
        Arc::new(FixedClock(Utc::now())),
    )
}

fn random_phone() -> Msisdn {
    let digits: String = Uuid::new_v4()
        .as_bytes()
        .iter()
        .take(8)
        .map(|b| char::from(b'0' + b % 10))
        .collect();
    Msisdn::parse(&format!("07{digits}")).unwrap()
}

/// A consent story: a doctor registered and verified, a patient registered, two access
/// requests, one approved. Subscribed: verified, requested ×2, approved; the
/// registrations and accounts are not.
async fn story(cmds: &Commands) {
    let meta = || CommandMeta::new("test");
    let doctor = cmds
        .register_doctor(
            RegisterDoctor {
                name: &PersonName::parse("Dr Wanjiru Kamau").unwrap(),
                phone: &random_phone(),
                licence: LicenceNumber::parse("KMPDC-0042").unwrap(),
                password: &Password::parse("doctor password 1").unwrap(),
            },
            meta(),
        )
        .await
        .unwrap()
        .id;
    cmds.verify_doctor(doctor, StaffId::new(), meta())
        .await
        .unwrap();
    let patient = cmds
        .register_patient(
            RegisterPatient {
                name: &PersonName::parse("Achieng Otieno").unwrap(),
                phone: &random_phone(),
                birth_date: &domain::value::BirthDate::parse("1987-03-14", Utc::now().date_naive())
                    .unwrap(),
                password: &Password::parse("patient password 1").unwrap(),
            },
            meta(),
        )
        .await
        .unwrap()
        .id;
    let scope = Scope::new([Category::Lab].into(), BTreeSet::new()).unwrap();
    let purpose = Purpose::parse("Diabetes follow-up for Achieng").unwrap();
    let days = DurationDays::new(30).unwrap();
    let first = cmds
        .request_access(
            RequestAccess {
                doctor_id: doctor,
                patient_id: patient,
                scope: scope.clone(),
                purpose: &purpose,
                duration: days,
                note: None,
            },
            meta(),
        )
        .await
        .unwrap()
        .id;
    cmds.approve_access(
        ApproveAccess {
            request_id: first,
            by: Actor::Patient(patient),
            expires_at: None,
            scope: None,
        },
        meta(),
    )
    .await
    .unwrap();
    cmds.request_access(
        RequestAccess {
            doctor_id: doctor,
            patient_id: patient,
            scope,
            purpose: &purpose,
            duration: days,
            note: None,
        },
        meta(),
    )
    .await
    .unwrap();
}

/// Ids of the subscribed events now in the log, in log order; asserts that unsubscribed
/// ones exist too.
async fn expected(store: &Store, after: LogCursor) -> Vec<String> {
    // On PostgreSQL the readable end trails transactions still running anywhere on
    // the server (other tests too): wait until everything committed is readable.
    let mut events = store.read_log(after, 10_000).await.unwrap();
    loop {
        let cursor = events.last().map_or(after, |e| e.cursor());
        if !store.log_held_back(cursor).await.unwrap() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        events.extend(store.read_log(cursor, 10_000).await.unwrap());
    }
    assert!(
        events
            .iter()
            .any(|e| !TYPES.contains(&e.event_type.as_str())),
        "the story should also produce unsubscribed events"
    );
    events
        .iter()
        .filter(|e| TYPES.contains(&e.event_type.as_str()))
        .map(|e| e.event_id.to_string())
        .collect()
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_only_subscribed(receiver: &Receiver) {
    for r in receiver.requests() {
        assert!(
            TYPES.contains(&r.event_type.as_str()),
            "unsubscribed {} arrived",
            r.event_type
        );
    }
}

#[actix_rt::test]
async fn every_subscribed_event_arrives_once_in_log_order_despite_failures_and_is_signed() {
    for backend in BACKENDS {
        let Some(t) = TestStore::new(backend).await else {
            continue;
        };
        let receiver = Receiver::start(3, false).await;
        let cmds = commands(&t.store);
        let handle = webhook::spawn(t.store.clone(), new_spec(&receiver.url), fast(5));
        story(&cmds).await;
        let want = expected(&t.store, LogCursor::START).await;
        assert_eq!(want.len(), 4, "{backend:?}");
        eventually("all events delivered", || {
            receiver.delivered().len() >= want.len()
        })
        .await;
        assert_eq!(receiver.delivered(), want, "{backend:?}: order or content");
        let requests = receiver.requests();
        assert_eq!(requests.iter().filter(|r| !r.accepted).count(), 3);
        assert_only_subscribed(&receiver);

        // Signatures hold over the exact bytes, and only over them.
        for r in &requests {
            assert!((Utc::now().timestamp() - r.timestamp).abs() < 120);
            assert!(
                webhook::verify(SECRET, r.timestamp, &r.body, &r.signature),
                "{backend:?}: signature of {}",
                r.event_id
            );
            assert!(!webhook::verify(
                b"another secret",
                r.timestamp,
                &r.body,
                &r.signature
            ));
            let mut tampered = r.body.clone();
            tampered.extend_from_slice(b" ");
            assert!(!webhook::verify(
                SECRET,
                r.timestamp,
                &tampered,
                &r.signature
            ));
            let mut event: IntegratorEvent = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(event.event_id.to_string(), r.event_id);
            assert_eq!(event.event_type, r.event_type);
            event.position += 1;
            let forged = serde_json::to_vec(&event).unwrap();
            assert!(!webhook::verify(SECRET, r.timestamp, &forged, &r.signature));
            assert!(!webhook::verify(
                SECRET,
                r.timestamp + 1,
                &r.body,
                &r.signature
            ));
            // The body is the public view: no ciphertext, no purpose, no names.
            let text = String::from_utf8(r.body.clone()).unwrap();
            assert!(!text.contains("v1."), "{text}");
            assert!(
                !text.contains("purpose") && !text.contains("Achieng"),
                "{text}"
            );
        }

        handle.stop().await;
        receiver.stop().await;
        t.cleanup().await.unwrap();
    }
}

#[actix_rt::test]
async fn events_failing_every_attempt_are_parked_and_delivered_on_replay() {
    for backend in BACKENDS {
        let Some(t) = TestStore::new(backend).await else {
            continue;
        };
        let receiver = Receiver::start(0, true).await;
        let cmds = commands(&t.store);
        let spec = new_spec(&receiver.url);
        let id = spec.id;
        let handle = webhook::spawn(t.store.clone(), spec, fast(2));
        story(&cmds).await;
        let want = expected(&t.store, LogCursor::START).await;
        let pool = t.store.any_pool().clone();

        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let parked = loop {
            let parked = webhook::failures(&pool, id, 0, 100).await.unwrap();
            if parked.len() == want.len() {
                break parked;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{backend:?}: not parked"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let parked_ids: Vec<String> = parked.iter().map(|f| f.event_id.to_string()).collect();
        assert_eq!(parked_ids, want, "{backend:?}");
        for f in &parked {
            assert_eq!(f.attempts, 2);
            assert_eq!(f.last_error, "HTTP 500");
            assert!(!f.replay_requested);
            assert_eq!(f.webhook_id, id);
        }
        // Exactly max_attempts tries per event, then it moved on.
        assert_eq!(receiver.requests().len(), 2 * want.len());
        // Paging by position.
        let page = webhook::failures(&pool, id, parked[1].position, 100)
            .await
            .unwrap();
        assert_eq!(page, parked[2..].to_vec());
        assert!(webhook::failures(&pool, Uuid::new_v4(), 0, 100)
            .await
            .unwrap()
            .is_empty());
        // A row parked by a version before the address policy holds the connect
        // error's own words, which told a closed port from an open one: shown only
        // as `unreachable`.
        let old = "connection failed: error sending request for url \
                   (http://127.0.0.1:9/hook): tcp connect error: Connection refused";
        let changed = sqlx::query(
            "UPDATE webhook_failures SET last_error = $1 WHERE webhook_id = $2 AND position = $3",
        )
        .bind(old)
        .bind(id.to_string())
        .bind(parked[0].position)
        .execute(&pool)
        .await
        .unwrap();
        assert_eq!(changed.rows_affected(), 1);
        let shown = webhook::failures(&pool, id, 0, 100).await.unwrap();
        assert_eq!(shown[0].last_error, "unreachable", "{backend:?}");
        assert!(shown[1..].iter().all(|f| f.last_error == "HTTP 500"));

        // A replay that fails again stays parked, one attempt more, not re-requested.
        assert_eq!(
            webhook::request_replay(&pool, id).await.unwrap(),
            want.len() as u64
        );
        handle.wake();
        eventually("replay attempted", || {
            receiver.requests().len() == 3 * want.len()
        })
        .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let parked = webhook::failures(&pool, id, 0, 100).await.unwrap();
            if parked
                .iter()
                .all(|f| f.attempts == 3 && !f.replay_requested)
            {
                assert_eq!(parked.len(), want.len());
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{backend:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Fixed receiver: the replay delivers everything, in position order.
        receiver.set_fail_always(false);
        assert_eq!(
            webhook::request_replay(&pool, id).await.unwrap(),
            want.len() as u64
        );
        handle.wake();
        eventually("replay delivered", || {
            receiver.delivered().len() == want.len()
        })
        .await;
        assert_eq!(receiver.delivered(), want, "{backend:?}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while !webhook::failures(&pool, id, 0, 100)
            .await
            .unwrap()
            .is_empty()
        {
            assert!(tokio::time::Instant::now() < deadline, "{backend:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(webhook::request_replay(&pool, id).await.unwrap(), 0);
        assert_only_subscribed(&receiver);

        handle.stop().await;
        receiver.stop().await;
        t.cleanup().await.unwrap();
    }
}

#[actix_rt::test]
async fn a_respawned_deliverer_resumes_from_its_checkpoint_and_a_new_webhook_starts_at_the_end() {
    for backend in BACKENDS {
        let Some(t) = TestStore::new(backend).await else {
            continue;
        };
        let receiver = Receiver::start(0, false).await;
        let cmds = commands(&t.store);
        let spec = new_spec(&receiver.url);

        // Two instances of one webhook: the lock lets only one deliver.
        let first = webhook::spawn(t.store.clone(), spec.clone(), fast(5));
        let twin = webhook::spawn(t.store.clone(), spec.clone(), fast(5));
        story(&cmds).await;
        let before = expected(&t.store, LogCursor::START).await;
        eventually("first story delivered", || {
            receiver.delivered().len() == before.len()
        })
        .await;
        let end = t.store.log_end().await.unwrap();
        eventually("checkpoint at the end", || {
            first.cursor() >= end || twin.cursor() >= end
        })
        .await;
        first.stop().await;
        twin.stop().await;

        // While nobody delivers, more happens; a new webhook created now starts at the
        // end of the log and sees none of the history.
        let late = Receiver::start(0, false).await;
        let late_spec = new_spec(&late.url);
        let start = t.store.log_end().await.unwrap();
        assert_eq!(
            webhook::ensure_checkpoint(&t.store, late_spec.id, start)
                .await
                .unwrap(),
            start
        );
        // Idempotent: an existing checkpoint is kept.
        assert_eq!(
            webhook::ensure_checkpoint(&t.store, late_spec.id, LogCursor::START)
                .await
                .unwrap(),
            start
        );
        story(&cmds).await;
        let all = expected(&t.store, LogCursor::START).await;
        let after: Vec<String> = all[before.len()..].to_vec();
        assert_eq!(after.len(), 4);

        let again = webhook::spawn(t.store.clone(), spec, fast(5));
        let late_handle = webhook::spawn(t.store.clone(), late_spec, fast(5));
        eventually("second story delivered", || {
            receiver.delivered().len() == all.len() && late.delivered().len() == after.len()
        })
        .await;
        assert_eq!(receiver.delivered(), all, "{backend:?}");
        assert_eq!(late.delivered(), after, "{backend:?}");
        // Nothing was delivered twice, even with two instances running.
        assert_eq!(receiver.requests().len(), all.len(), "{backend:?}");
        assert_only_subscribed(&receiver);

        again.stop().await;
        late_handle.stop().await;
        receiver.stop().await;
        late.stop().await;
        t.cleanup().await.unwrap();
    }
}
