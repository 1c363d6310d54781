#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code
//! The address policy at delivery, on both backends, against real loopback listeners:
//! a name that resolves to loopback is refused at every attempt (nothing connects),
//! an IP literal is checked before the request, and what an integrator reads of a
//! failure is only `unreachable`, `timeout` or `HTTP <status>`, the same for a closed
//! port as for a refused address.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use commands::blobs::LocalBlobStore;
use commands::keys::{KeyStore, SecretKey};
use commands::{Commands, RegisterPatient};
use domain::clock::FixedClock;
use domain::value::{BirthDate, Msisdn, Password, PersonName};
use eventstore::testing::{TestStore, BACKENDS};
use eventstore::{CommandMeta, LogCursor, Store};
use integrations::address::{AddressPolicy, StaticLookup};
use integrations::webhook::{self, DelivererHandle, DeliverySettings, WebhookSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

/// What a listener does with a connection.
#[derive(Clone, Copy)]
enum Answer {
    /// Reads the request and answers with this status.
    Status(u16),
    /// Accepts and never answers.
    Silent,
}

/// A TCP listener on a random loopback port that counts the connections it accepts.
struct Listener {
    port: u16,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    async fn start(answer: Answer) -> Listener {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                match answer {
                    Answer::Silent => held.push(stream),
                    Answer::Status(status) => {
                        tokio::spawn(respond(stream, status));
                    }
                }
            }
        });
        Listener {
            port,
            connections,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request (headers, then `Content-Length` bytes) and answers `status`.
async fn respond(mut stream: TcpStream, status: u16) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Ok(n) = stream.read(&mut chunk).await else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                break;
            }
        }
    }
    let answer =
        format!("HTTP/1.1 {status} Whatever\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    stream.write_all(answer.as_bytes()).await.ok();
    stream.shutdown().await.ok();
}

/// A port with nothing listening on it (bound, then closed).
async fn closed_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    listener.local_addr().unwrap().port()
}

fn settings(address: AddressPolicy) -> DeliverySettings {
    DeliverySettings {
        max_attempts: 2,
        base_backoff: Duration::from_millis(10),
        timeout: Duration::from_millis(700),
        poll_interval: Duration::from_millis(100),
        address,
    }
}

/// `receiver.example` is this machine, as a hosts file or a rebinding DNS server
/// could make any name.
fn to_loopback(allow_private: bool) -> AddressPolicy {
    AddressPolicy::new(allow_private).with_lookup(Arc::new(StaticLookup::new([(
        "receiver.example",
        [IpAddr::V4(Ipv4Addr::LOCALHOST)],
    )])))
}

fn spec(url: String) -> WebhookSpec {
    WebhookSpec {
        id: Uuid::new_v4(),
        url,
        types: vec!["PatientRegistered".into()],
        secret: b"whsec-policy-test-secret".to_vec(),
    }
}

fn commands(store: &Store) -> Commands {
    let blobs = std::env::temp_dir().join(format!("afya-policy-blobs-{}", Uuid::new_v4()));
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

/// Appends one `PatientRegistered` (and the events that come with it).
async fn register_patient(cmds: &Commands) {
    let digits: String = Uuid::new_v4()
        .as_bytes()
        .iter()
        .take(8)
        .map(|b| char::from(b'0' + b % 10))
        .collect();
    cmds.register_patient(
        RegisterPatient {
            name: &PersonName::parse("Achieng Otieno").unwrap(),
            phone: &Msisdn::parse(&format!("07{digits}")).unwrap(),
            birth_date: &BirthDate::parse("1987-03-14", Utc::now().date_naive()).unwrap(),
            password: &Password::parse("patient password 1").unwrap(),
        },
        CommandMeta::new("test"),
    )
    .await
    .unwrap();
}

/// The parked failure texts of webhook `id`, once `count` are parked.
async fn parked(store: &Store, id: Uuid, count: usize) -> Vec<(String, i64)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let failures = webhook::failures(store.any_pool(), id, 0, 100)
            .await
            .unwrap();
        if failures.len() >= count {
            return failures
                .into_iter()
                .map(|f| (f.last_error, f.attempts))
                .collect();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing parked for {id}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start(store: &Store, spec: WebhookSpec, address: AddressPolicy) -> DelivererHandle {
    webhook::ensure_checkpoint(store, spec.id, LogCursor::START)
        .await
        .unwrap();
    webhook::spawn(store.clone(), spec, settings(address))
}

#[actix_rt::test]
async fn a_name_that_resolves_to_loopback_is_refused_at_every_delivery() {
    for backend in BACKENDS {
        let Some(t) = TestStore::new(backend).await else {
            continue;
        };
        let receiver = Listener::start(Answer::Status(204)).await;
        let url = format!("http://receiver.example:{}/hook", receiver.port);
        let refused = spec(url.clone());
        let refused_id = refused.id;
        let handle = start(&t.store, refused, to_loopback(false)).await;
        register_patient(&commands(&t.store)).await;

        assert_eq!(
            parked(&t.store, refused_id, 1).await,
            vec![("unreachable".to_owned(), 2)],
            "{backend:?}"
        );
        // A replay is refused the same way.
        webhook::request_replay(t.store.any_pool(), refused_id)
            .await
            .unwrap();
        handle.wake();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while parked(&t.store, refused_id, 1).await != vec![("unreachable".to_owned(), 3)] {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{backend:?}: replay"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            receiver.connections(),
            0,
            "{backend:?}: the refused name reached the listener"
        );

        // The same name and resolver with private addresses allowed does reach the
        // listener: only the policy kept the first webhook from it.
        let allowed = spec(url);
        let allowed_id = allowed.id;
        let control = start(&t.store, allowed, to_loopback(true)).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while receiver.connections() == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{backend:?}: control"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let end = t.store.log_end().await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while control.cursor() < end {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{backend:?}: control"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(webhook::failures(t.store.any_pool(), allowed_id, 0, 100)
            .await
            .unwrap()
            .is_empty());

        handle.stop().await;
        control.stop().await;
        t.cleanup().await.unwrap();
    }
}

#[actix_rt::test]
async fn failures_tell_a_closed_port_from_neither_a_refused_address_nor_an_open_one() {
    for backend in BACKENDS {
        let Some(t) = TestStore::new(backend).await else {
            continue;
        };
        let open = Listener::start(Answer::Status(404)).await;
        let silent = Listener::start(Answer::Silent).await;
        let closed = closed_port().await;
        let public_only = AddressPolicy::new(false);
        let any = AddressPolicy::new(true);
        let cases = [
            // Refused by the policy before any connection, in two spellings.
            (format!("http://127.0.0.1:{}/hook", open.port), &public_only),
            (
                format!("http://[::ffff:127.0.0.1]:{}/hook", open.port),
                &public_only,
            ),
            // Allowed, and nothing listens.
            (format!("http://127.0.0.1:{closed}/hook"), &any),
            // Allowed, and the listener never answers.
            (format!("http://127.0.0.1:{}/hook", silent.port), &any),
            // Allowed, and delivered: the receiver's own status.
            (format!("http://127.0.0.1:{}/hook", open.port), &any),
        ];
        let mut running = Vec::new();
        for (url, policy) in cases {
            let spec = spec(url);
            let id = spec.id;
            running.push((id, start(&t.store, spec, policy.clone()).await));
        }
        register_patient(&commands(&t.store)).await;
        let mut texts = Vec::new();
        for (id, _) in &running {
            texts.push(parked(&t.store, *id, 1).await[0].0.clone());
        }
        assert_eq!(
            texts,
            [
                "unreachable",
                "unreachable",
                "unreachable",
                "timeout",
                "HTTP 404"
            ],
            "{backend:?}"
        );
        // Only the allowed webhook's two attempts reached the open listener.
        assert_eq!(open.connections(), 2, "{backend:?}");
        for (_, handle) in running {
            handle.stop().await;
        }
        t.cleanup().await.unwrap();
    }
}

#[actix_rt::test]
async fn a_stop_ends_the_attempt_in_flight_and_the_pause_before_the_next_at_once() {
    for backend in BACKENDS {
        let Some(t) = TestStore::new(backend).await else {
            continue;
        };
        let cmds = commands(&t.store);
        // One receiver never answers (within a 30 s timeout), the other refuses with
        // a 30 s pause before the next attempt.
        let silent = Listener::start(Answer::Silent).await;
        let refusing = Listener::start(Answer::Status(500)).await;
        let mut handles = Vec::new();
        for port in [silent.port, refusing.port] {
            let hook = spec(format!("http://127.0.0.1:{port}/hook"));
            webhook::ensure_checkpoint(&t.store, hook.id, LogCursor::START)
                .await
                .unwrap();
            let slow = DeliverySettings {
                max_attempts: 5,
                base_backoff: Duration::from_secs(30),
                timeout: Duration::from_secs(30),
                poll_interval: Duration::from_millis(100),
                address: AddressPolicy::new(true),
            };
            handles.push((hook.id, webhook::spawn(t.store.clone(), hook, slow)));
        }
        register_patient(&cmds).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while silent.connections() == 0 || refusing.connections() == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{backend:?}: no attempt"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (id, handle) in handles {
            let started = tokio::time::Instant::now();
            handle.stop().await;
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{backend:?}: the stop took {:?}",
                started.elapsed()
            );
            // Abandoned, not parked: it is delivered again by the next run.
            assert!(webhook::failures(t.store.any_pool(), id, 0, 100)
                .await
                .unwrap()
                .is_empty());
        }
        assert_eq!(refusing.connections(), 1, "{backend:?}");
        t.cleanup().await.unwrap();
    }
}
