//! Bounded resources: uploads arrive into sealed spools on disk, then cost about one
//! body of memory each and wait for a byte budget, bodies sent too slowly are cut with
//! 408, and record content is served so that no browser runs it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventstore::testing::BACKENDS;
use reqwest::Method;

use crate::app::{Party, TestApp};

const MIB: usize = 1024 * 1024;

/// The resident memory of a process, in bytes (`VmRSS` of `/proc/<pid>/status`).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in kB");
    kib * 1024
}

/// `len` bytes that differ for every `seed` (and do not compress to nothing).
fn body(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

async fn patient(app: &TestApp, name: &str) -> Party {
    let phone = app.phone();
    let id = app.sign_up_patient(&phone, name).await;
    let token = app.sign_in(&phone).await;
    Party { id, phone, token }
}

/// The loopback address of the server, for raw connections.
fn address(app: &TestApp) -> String {
    app.server.base.strip_prefix("http://").unwrap().to_owned()
}

/// What a raw client that sent its body in pieces saw.
struct Raw {
    /// Everything the server answered, until it closed the connection or 40 s passed.
    answer: String,
    /// When the first byte of the answer came, after the headers were sent.
    answered_after: Option<Duration>,
    /// Whether the server closed the connection.
    closed: bool,
}

/// Sends `head` at once, then `body` as `pieces` (bytes, pause after), over a raw
/// loopback connection, stopping as soon as the server answers; reads the answer until
/// the server closes the connection (or 40 s pass).
fn raw_exchange(addr: &str, head: String, pieces: Vec<(Vec<u8>, Duration)>) -> Raw {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut reader = stream.try_clone().unwrap();
    reader
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let answered = Arc::new(AtomicBool::new(false));
    let first_byte_ms = Arc::new(AtomicU64::new(u64::MAX));
    let start = Instant::now();
    let reading = {
        let answered = answered.clone();
        let first_byte_ms = first_byte_ms.clone();
        std::thread::spawn(move || {
            let mut answer = Vec::new();
            let mut buf = [0u8; 4096];
            let mut closed = false;
            while start.elapsed() < Duration::from_secs(40) {
                match reader.read(&mut buf) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => {
                        if answer.is_empty() {
                            first_byte_ms
                                .store(start.elapsed().as_millis() as u64, Ordering::SeqCst);
                        }
                        answered.store(true, Ordering::SeqCst);
                        answer.extend_from_slice(&buf[..n]);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    // A reset after the answer: the server dropped the connection.
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
            (String::from_utf8_lossy(&answer).into_owned(), closed)
        })
    };
    if stream.write_all(head.as_bytes()).is_ok() {
        'send: for (bytes, pause) in pieces {
            if answered.load(Ordering::SeqCst) || stream.write_all(&bytes).is_err() {
                break;
            }
            let until = Instant::now() + pause;
            while Instant::now() < until {
                if answered.load(Ordering::SeqCst) || start.elapsed() > Duration::from_secs(40) {
                    break 'send;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let (answer, closed) = reading.join().unwrap();
    let ms = first_byte_ms.load(Ordering::SeqCst);
    Raw {
        answer,
        answered_after: (ms != u64::MAX).then(|| Duration::from_millis(ms)),
        closed,
    }
}

/// The result of a client thread, awaited without blocking the test's runtime (whose
/// pooled connections must see the server close them meanwhile).
async fn joined<T>(thread: std::thread::JoinHandle<T>) -> T {
    while !thread.is_finished() {
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
    thread.join().unwrap()
}

/// One byte a second, `len` times.
fn trickle(len: usize) -> Vec<(Vec<u8>, Duration)> {
    (0..len)
        .map(|_| (b"x".to_vec(), Duration::from_secs(1)))
        .collect()
}

#[track_caller]
fn assert_cut_slow(raw: &Raw, what: &str) {
    let after = raw
        .answered_after
        .unwrap_or_else(|| panic!("{what}: no answer within 40 s"));
    assert!(
        after < Duration::from_secs(30),
        "{what}: answered after {after:?}"
    );
    eprintln!("{what}: answered after {after:?}");
    let status_line = raw.answer.lines().next().unwrap_or_default();
    assert!(
        status_line.starts_with("HTTP/1.1 408"),
        "{what}: {}",
        raw.answer
    );
    let lower = raw.answer.to_ascii_lowercase();
    assert!(
        lower.contains("content-type: application/problem+json"),
        "{what}: {}",
        raw.answer
    );
    assert!(
        lower.contains("connection: close"),
        "{what}: {}",
        raw.answer
    );
    assert!(
        raw.answer.contains("\"body_too_slow\""),
        "{what}: {}",
        raw.answer
    );
    assert!(raw.closed, "{what}: the connection stayed open");
}

/// Each record reads back as exactly the bytes sent.
async fn reads_back(app: &TestApp, p: &Party, stored: &[(&str, &Vec<u8>)]) {
    for (id, sent) in stored {
        let read = app
            .get(&format!("/v1/records/{id}/content"), Some(&p.token))
            .await;
        assert_eq!(read.status, 200, "{id}");
        assert!(read.body == **sent, "the exact bytes of {id}");
    }
}

#[actix_rt::test]
#[ignore = "alone: run by scripts/test in its second pass, one test at a time"]
async fn eight_parallel_max_size_uploads_by_one_patient_grow_memory_by_less_than_100_mb() {
    crate::support::alone();
    for backend in BACKENDS {
        let Some(app) = TestApp::start(backend).await else {
            continue;
        };
        let p = patient(&app, "Achieng Otieno").await;
        let pid = app.server.child.id();
        let path = format!("/v1/patients/{}/records?category=imaging", p.id);
        // Warm up: the first upload's one-time allocations are not what is measured.
        app.upload(
            &p.token,
            &p.id,
            "category=lab",
            "application/pdf",
            b"%PDF-1.4 warm",
        )
        .await
        .ok(201);
        let bodies: Vec<Vec<u8>> = (0..8).map(|i| body(i + 1, 20 * MIB)).collect();
        let before = rss(pid);
        let peak = Arc::new(AtomicU64::new(before));
        let done = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (peak, done) = (peak.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    peak.fetch_max(rss(pid), Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        // Like the web app: each upload with its own Idempotency-Key. A client of its
        // own, since the later uploads wait for the earlier ones: without reqwest's
        // TCP_USER_TIMEOUT (30 s), which aborts a connection whose body the server
        // does not read yet, as browsers do not.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .tcp_user_timeout(None)
            .build()
            .unwrap();
        let started = Instant::now();
        let answers = futures::future::join_all(bodies.iter().enumerate().map(|(i, b)| {
            let request = http
                .request(Method::POST, app.server.url(&path))
                .bearer_auth(&p.token)
                .header("content-type", "application/pdf")
                .header("idempotency-key", format!("parallel-{i}"))
                .body(b.clone());
            async move {
                let response = request
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("upload {i} after {:?}: {e:?}", started.elapsed()));
                let status = response.status().as_u16();
                let body: serde_json::Value = response.json().await.unwrap();
                (status, body)
            }
        }))
        .await;
        let took = started.elapsed();
        actix_rt::time::sleep(Duration::from_millis(300)).await;
        done.store(true, Ordering::SeqCst);
        sampler.join().unwrap();
        let after = rss(pid);
        let peak = peak.load(Ordering::SeqCst);
        let growth = peak.saturating_sub(before);
        eprintln!(
            "{backend:?}: RSS before {} MB, peak {} MB, after {} MB, growth {} MB; 8 x 20 MiB in {took:?}",
            before / 1_000_000,
            peak / 1_000_000,
            after / 1_000_000,
            growth / 1_000_000,
        );
        let mut ids = Vec::new();
        for (status, answer) in &answers {
            assert_eq!(*status, 201, "{backend:?}: {answer}");
            assert_eq!(answer["size"], 20 * MIB, "{backend:?}");
            ids.push(answer["record_id"].as_str().unwrap().to_owned());
        }
        assert!(
            growth < 100_000_000,
            "{backend:?}: RSS grew by {} MB (from {} MB to {} MB) for 8 parallel 20 MiB uploads",
            growth / 1_000_000,
            before / 1_000_000,
            peak / 1_000_000
        );
        let stored: Vec<(&str, &Vec<u8>)> = ids.iter().map(String::as_str).zip(&bodies).collect();
        reads_back(&app, &p, &stored).await;
        app.stop().await;
    }
}

#[actix_rt::test]
#[ignore = "alone: run by scripts/test in its second pass, one test at a time"]
async fn a_json_body_and_an_upload_sent_at_one_byte_a_second_are_cut_with_408() {
    crate::support::alone();
    for backend in BACKENDS {
        // Uploads whole within 20 s (30 min by default).
        let Some(app) = TestApp::start_with(backend, &[("AFYA_UPLOAD_WITHIN_SECS", "20")]).await
        else {
            continue;
        };
        let p = patient(&app, "Baraka Mwangi").await;
        let addr = address(&app);
        let json_len = 200;
        let json = std::thread::spawn({
            let addr = addr.clone();
            move || {
                let head = format!(
                    "POST /v1/patients HTTP/1.1\r\nHost: {addr}\r\n\
                     Content-Type: application/json\r\nContent-Length: {json_len}\r\n\r\n"
                );
                raw_exchange(&addr, head, trickle(json_len))
            }
        });
        let upload_len = 100_000;
        let upload = std::thread::spawn({
            let (addr, id, token) = (addr.clone(), p.id.clone(), p.token.clone());
            move || {
                let head = format!(
                    "POST /v1/patients/{id}/records?category=lab HTTP/1.1\r\nHost: {addr}\r\n\
                     Authorization: Bearer {token}\r\nContent-Type: application/pdf\r\n\
                     Content-Length: {upload_len}\r\n\r\n"
                );
                raw_exchange(&addr, head, trickle(upload_len))
            }
        });
        // Fast enough (80 KiB/s), but 4 MiB of it would take 50 s: cut at the bound.
        let long_len = 4 * MIB;
        let long = std::thread::spawn({
            let (addr, id, token) = (addr.clone(), p.id.clone(), p.token.clone());
            move || {
                let head = format!(
                    "POST /v1/patients/{id}/records?category=lab HTTP/1.1\r\nHost: {addr}\r\n\
                     Authorization: Bearer {token}\r\nContent-Type: application/pdf\r\n\
                     Content-Length: {long_len}\r\n\r\n"
                );
                let pieces = body(9, long_len)
                    .chunks(8 * 1024)
                    .map(|c| (c.to_vec(), Duration::from_millis(100)))
                    .collect();
                raw_exchange(&addr, head, pieces)
            }
        });
        assert_cut_slow(&joined(json).await, "JSON body");
        assert_cut_slow(&joined(upload).await, "upload");
        let long = joined(long).await;
        assert_cut_slow(&long, "long upload");
        assert!(
            long.answered_after
                .is_some_and(|after| after >= Duration::from_secs(19)),
            "the long upload was cut before its bound: {:?}",
            long.answered_after
        );
        // Nothing was stored, and the server still serves.
        let list = app
            .get(&format!("/v1/patients/{}/records", p.id), Some(&p.token))
            .await
            .ok(200);
        assert_eq!(list["items"].as_array().unwrap().len(), 0, "{backend:?}");
        assert!(app.blobs().is_empty(), "{backend:?}");
        app.upload(
            &p.token,
            &p.id,
            "category=lab",
            "application/pdf",
            b"%PDF-1.4 ok",
        )
        .await
        .ok(201);
        app.stop().await;
    }
}

/// The upload spool files of the server (`<data>/spool/<process>/*.part`).
fn spooled(app: &TestApp) -> usize {
    let Ok(processes) = std::fs::read_dir(app.env.data_dir.join("spool")) else {
        return 0;
    };
    processes
        .filter_map(|p| std::fs::read_dir(p.ok()?.path()).ok())
        .flatten()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".part"))
        })
        .count()
}

/// Waits (up to `within`) until `done` holds; whether it did.
async fn eventually(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + within;
    while !done() {
        if Instant::now() > until {
            return false;
        }
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

/// Opens an upload by `p` declaring `len` bytes over a raw connection, sends it as
/// `pieces`, and returns what it saw (on its own thread).
fn raw_upload(
    addr: &str,
    p: &Party,
    len: usize,
    pieces: Vec<(Vec<u8>, Duration)>,
) -> std::thread::JoinHandle<Raw> {
    let (addr, id, token) = (addr.to_owned(), p.id.clone(), p.token.clone());
    std::thread::spawn(move || {
        let head = format!(
            "POST /v1/patients/{id}/records?category=lab HTTP/1.1\r\nHost: {addr}\r\n\
             Authorization: Bearer {token}\r\nContent-Type: application/pdf\r\n\
             Connection: close\r\nContent-Length: {len}\r\n\r\n"
        );
        raw_exchange(&addr, head, pieces)
    })
}

#[actix_rt::test]
#[ignore = "alone: run by scripts/test in its second pass, one test at a time"]
async fn slow_uploads_hold_no_memory_so_other_uploads_are_stored_without_waiting_for_them() {
    crate::support::alone();
    for backend in BACKENDS {
        // Memory for two largest uploads at once, and a short wait for it: before the
        // spool, the four slow uploads below held all of it (their declared length,
        // from the first byte on) and every other upload got 503 `uploads_busy`.
        let Some(app) = TestApp::start_with(
            backend,
            &[
                ("AFYA_MAX_UPLOAD_BYTES", "1048576"),
                ("AFYA_UPLOAD_MEMORY_BYTES", "2097152"),
                ("AFYA_UPLOAD_WAIT_SECS", "5"),
                // The slow senders stop after 12 s and are cut 8 s later.
                ("AFYA_BODY_IDLE_SECS", "8"),
            ],
        )
        .await
        else {
            continue;
        };
        let addr = address(&app);
        // Four accounts send 1 MiB bodies at 2 KiB/s, above the minimum rate (at that
        // pace they would take over eight minutes), for 12 s.
        let mut slow = Vec::new();
        for i in 0..4 {
            let p = patient(&app, &format!("Slow Sender {}", ["A", "B", "C", "D"][i])).await;
            let pieces = body(20 + i as u64, 12 * 2048)
                .chunks(2048)
                .map(|c| (c.to_vec(), Duration::from_secs(1)))
                .collect();
            slow.push(raw_upload(&addr, &p, MIB, pieces));
        }
        // A patient's paced upload: 600 KiB over about 13 s, 40 KiB a second with a 6 s
        // pause in the middle (under the 8 s allowed between pieces).
        let p = patient(&app, "Zawadi Njoroge").await;
        let len = 600 * 1024;
        let paced_body = body(7, len);
        let mut pieces: Vec<(Vec<u8>, Duration)> = paced_body
            .chunks(8 * 1024)
            .map(|c| (c.to_vec(), Duration::from_millis(100)))
            .collect();
        pieces[30].1 = Duration::from_secs(6);
        let paced = raw_upload(&addr, &p, len, pieces);
        assert!(
            eventually(Duration::from_secs(8), || spooled(&app) >= 5).await,
            "{backend:?}: the bodies arrive into spools ({} files)",
            spooled(&app)
        );
        // Meanwhile a largest upload by another patient, and one by the same patient
        // as the paced upload, are stored at once.
        let other = patient(&app, "Baraka Mwangi").await;
        let other_body = body(8, MIB);
        let other_id = app
            .upload(
                &other.token,
                &other.id,
                "category=imaging",
                "application/pdf",
                &other_body,
            )
            .await
            .ok(201)["record_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let quick_body = body(9, len);
        let quick_id = app
            .upload(
                &p.token,
                &p.id,
                "category=imaging",
                "application/pdf",
                &quick_body,
            )
            .await
            .ok(201)["record_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let paced = joined(paced).await;
        assert!(
            paced.answer.starts_with("HTTP/1.1 201"),
            "{backend:?}: {}",
            paced.answer
        );
        let paced_id = paced
            .answer
            .split("\"record_id\":\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap()
            .to_owned();
        reads_back(
            &app,
            &p,
            &[
                (paced_id.as_str(), &paced_body),
                (quick_id.as_str(), &quick_body),
            ],
        )
        .await;
        reads_back(&app, &other, &[(other_id.as_str(), &other_body)]).await;
        // The slow senders stop: they are cut, and their spools go.
        for raw in slow {
            assert_cut_slow(&joined(raw).await, "a slow sender that stopped");
        }
        assert!(
            eventually(Duration::from_secs(10), || spooled(&app) == 0).await,
            "{backend:?}: {} spool files left behind",
            spooled(&app)
        );
        assert_eq!(app.blobs().len(), 3, "{backend:?}");
        app.stop().await;
    }
}

#[actix_rt::test]
async fn record_content_is_always_an_attachment_sandboxed_and_never_served_as_an_active_type() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start(backend).await else {
            continue;
        };
        let p = patient(&app, "Amani Kiptoo").await;
        let html = b"<html><script>alert(document.cookie)</script></html>".to_vec();
        let cases: [(&str, &str, &str); 5] = [
            (
                "category=other&filename=page.html",
                "text/html",
                "application/octet-stream",
            ),
            ("category=other", "text/html", "application/octet-stream"),
            (
                "category=imaging&filename=x.svg",
                "image/svg+xml",
                "application/octet-stream",
            ),
            (
                "category=other&filename=x.xml",
                "application/xhtml+xml",
                "application/octet-stream",
            ),
            (
                "category=lab&filename=r.pdf",
                "application/pdf",
                "application/pdf",
            ),
        ];
        for (query, uploaded_as, served_as) in cases {
            let created = app
                .upload(&p.token, &p.id, query, uploaded_as, &html)
                .await
                .ok(201);
            let id = created["record_id"].as_str().unwrap();
            // The record still says what was uploaded.
            let item = app
                .get(&format!("/v1/records/{id}"), Some(&p.token))
                .await
                .ok(200);
            assert_eq!(item["content_type"], uploaded_as, "{backend:?}");
            let read = app
                .get(&format!("/v1/records/{id}/content"), Some(&p.token))
                .await;
            assert_eq!((read.status, &read.body), (200, &html), "{backend:?}");
            assert_eq!(
                read.header("content-type").as_deref(),
                Some(served_as),
                "{backend:?}: {uploaded_as}"
            );
            assert_eq!(
                read.header("content-security-policy").as_deref(),
                Some("sandbox"),
                "{backend:?}: {uploaded_as}"
            );
            assert_eq!(
                read.header("x-content-type-options").as_deref(),
                Some("nosniff")
            );
            let disposition = read.header("content-disposition").unwrap_or_default();
            assert!(
                disposition.starts_with("attachment"),
                "{backend:?}: {query}: {disposition}"
            );
        }
        app.stop().await;
    }
}
