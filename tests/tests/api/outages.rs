//! An integration's outage degrades its feature, never the API: commands answer without
//! waiting for a publisher that cannot publish, `/readyz` says which integration is
//! down and stays 200, and the integration catches up by itself when it returns.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use eventstore::Backend;

use crate::app::{password_of, Resp, TestApp};
use crate::support::pg::OwnPostgres;
use crate::support::Env;

/// A NATS server of the test's own (JetStream on, its store in a temporary directory)
/// on a loopback port, which the test can kill and start again on the same port.
struct OwnNats {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl OwnNats {
    /// `AFYA_NATS_SERVER` (set by `scripts/tools`), else `nats-server` on the path.
    fn program() -> String {
        std::env::var("AFYA_NATS_SERVER").unwrap_or_else(|_| "nats-server".to_owned())
    }

    /// `None` when `nats-server` is not installed (outside CI).
    fn start() -> Option<OwnNats> {
        if !crate::support::installed(&Self::program(), "CI installs it") {
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("afya-nats-{}", uuid::Uuid::new_v4()));
        let mut nats = OwnNats {
            port,
            dir,
            child: None,
        };
        nats.up();
        Some(nats)
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    fn up(&mut self) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("nats-server.log"))
            .unwrap();
        let child = Command::new(Self::program())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not start: {}",
                std::fs::read_to_string(self.dir.join("nats-server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server where it stands (an outage, not a shutdown).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Also from `drop`, perhaps while a failed assertion unwinds: no panic here.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `/readyz`'s report of NATS once `done` holds of it (up to `secs`).
async fn nats_report(
    app: &TestApp,
    secs: u64,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let ready = app.get("/readyz", None).await.ok(200);
        let nats = ready["integrations"]["nats"].clone();
        if done(&nats) || Instant::now() > deadline {
            return nats;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_rt::test]
async fn with_nats_down_commands_answer_at_once_and_the_events_follow_when_it_returns() {
    crate::support::alone();
    for backend in eventstore::testing::BACKENDS {
        nats_outage(backend).await;
    }
}

async fn nats_outage(backend: Backend) {
    let Some(mut nats) = OwnNats::start() else {
        return;
    };
    let url = nats.url();
    let stream = format!("AFYA_OUTAGE_{}", uuid::Uuid::new_v4().simple());
    let prefix = format!("afya.outage.{}", uuid::Uuid::new_v4().simple());
    // Were read-your-writes to wait for the publisher, every upload below would take
    // these 20 s.
    let vars = [
        ("AFYA_NATS_URL", url.as_str()),
        ("AFYA_NATS_STREAM", stream.as_str()),
        ("AFYA_NATS_SUBJECT_PREFIX", prefix.as_str()),
        ("AFYA_CONSISTENCY_TIMEOUT_MS", "20000"),
    ];
    let Some(app) = TestApp::start_with(backend, &vars).await else {
        return;
    };
    let w = app.world().await;
    let up = nats_report(&app, 20, |n| n["status"] == "ok" && n["lag"] == 0).await;
    assert_eq!(
        (&up["status"], &up["lag"]),
        (&"ok".into(), &0.into()),
        "{up}"
    );

    nats.kill();
    let mut slowest = Duration::ZERO;
    for i in 0..5 {
        let started = Instant::now();
        let created = app
            .upload(
                &w.patient.token,
                &w.patient.id,
                "category=lab",
                "application/pdf",
                format!("%PDF-1.4 result {i}").as_bytes(),
            )
            .await;
        if created.status != 201 {
            let logs = app.server.logs();
            let tail: Vec<&str> = logs.lines().rev().take(15).collect();
            panic!(
                "upload {i}: {} {}\n{}",
                created.status,
                created.text(),
                tail.join("\n")
            );
        }
        let created = created.ok(201);
        slowest = slowest.max(started.elapsed());
        // What the patient reads back shows it at once (the projections kept up).
        let id = created["record_id"].as_str().unwrap();
        app.get(&format!("/v1/records/{id}"), Some(&w.patient.token))
            .await
            .ok(200);
    }
    println!("{backend:?}: with NATS down, the slowest of 5 uploads answered in {slowest:?}");
    // Not the consistency timeout (20 s), nor a JetStream ack's (5 s) behind the store's
    // write lock.
    assert!(
        slowest < Duration::from_secs(2),
        "an upload waited for the NATS publisher ({slowest:?})"
    );
    // Ready all the same, with NATS reported down and behind.
    let down = nats_report(&app, 30, |n| n["status"] == "down").await;
    assert_eq!(down["status"], "down", "{down}");
    assert!(down["lag"].as_i64().unwrap() > 0, "{down}");

    // Back: the publisher catches up by itself, each event once.
    nats.up();
    let back = nats_report(&app, 90, |n| n["status"] == "ok" && n["lag"] == 0).await;
    assert_eq!(
        (&back["status"], &back["lag"]),
        (&"ok".into(), &0.into()),
        "{back}"
    );
    let total = app.event_count().await as u64;
    let client = async_nats::connect(url.as_str()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut info = js.get_stream(&stream).await.unwrap();
    let messages = info.info().await.unwrap().state.messages;
    assert_eq!(messages, total, "one message per event");
    app.stop().await;
}

/// One request while the store is down: 503 problem+json `store_unavailable` with a
/// `Retry-After`, quickly. Returns how long it took.
async fn unavailable(
    app: &TestApp,
    what: &str,
    request: impl std::future::Future<Output = Resp>,
) -> Duration {
    let started = Instant::now();
    let resp = request.await;
    let took = started.elapsed();
    if resp.status != 503 {
        let logs = app.server.logs();
        let failed: Vec<&str> = logs.lines().rev().take(12).collect();
        panic!(
            "{what}: {} {}\n{}",
            resp.status,
            resp.text(),
            failed.join("\n")
        );
    }
    resp.problem(503, "store_unavailable");
    let retry: u64 = resp
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no Retry-After"));
    assert!((1..=60).contains(&retry), "{what}: Retry-After {retry}");
    took
}

/// PostgreSQL stopped under a running server (its own cluster, cut at once as in a
/// crash): every request that needs the store answers 503 `store_unavailable` with
/// `Retry-After` within 2 s, `/readyz` says so, `/healthz` stays up; started again, the
/// server serves by itself, its consumers resume, and nothing acknowledged was lost.
#[actix_rt::test]
async fn with_postgres_down_requests_answer_503_at_once_and_work_resumes_when_it_returns() {
    crate::support::alone();
    let Some(pg) = OwnPostgres::start() else {
        return;
    };
    let app = TestApp::start_on(Env::on_postgres(pg.url()), &[]);
    let w = app.world().await;
    let before = app
        .upload(
            &w.patient.token,
            &w.patient.id,
            "category=lab",
            "application/pdf",
            b"%PDF-1.4 before the outage",
        )
        .await
        .ok(201);
    let before = before["record_id"].as_str().unwrap().to_owned();
    let list = format!("/v1/patients/{}/records", w.patient.id);

    pg.down();
    let mut slowest = Duration::ZERO;
    for round in 0..3 {
        let took = [
            unavailable(
                &app,
                "upload",
                app.upload(
                    &w.patient.token,
                    &w.patient.id,
                    "category=lab",
                    "application/pdf",
                    format!("%PDF-1.4 during the outage {round}").as_bytes(),
                ),
            )
            .await,
            unavailable(&app, "list", app.get(&list, Some(&w.patient.token))).await,
            unavailable(
                &app,
                "read",
                app.get(&format!("/v1/records/{before}"), Some(&w.patient.token)),
            )
            .await,
            unavailable(
                &app,
                "sign-in",
                app.post(
                    "/v1/sessions",
                    None,
                    serde_json::json!({"phone": w.patient.phone, "password": password_of(&w.patient.phone)}),
                ),
            )
            .await,
            unavailable(&app, "readyz", app.get("/readyz", None)).await,
        ];
        slowest = took.into_iter().fold(slowest, Duration::max);
    }
    println!("with PostgreSQL down, the slowest answer took {slowest:?}");
    assert!(
        slowest < Duration::from_secs(2),
        "slowest answer {slowest:?}"
    );
    app.get("/healthz", None).await.ok(200);

    // Back: the server serves again by itself, and what it acknowledged is there.
    pg.up();
    let started = Instant::now();
    let after = loop {
        let resp = app
            .upload(
                &w.patient.token,
                &w.patient.id,
                "category=lab",
                "application/pdf",
                b"%PDF-1.4 after the outage",
            )
            .await;
        if resp.status == 201 {
            break resp.json();
        }
        assert_eq!(resp.status, 503, "{}", resp.text());
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never recovered"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let after = after["record_id"].as_str().unwrap().to_owned();
    let listed = app.get(&list, Some(&w.patient.token)).await.ok(200);
    let ids: Vec<&str> = listed["items"]
        .as_array()
        .unwrap_or_else(|| panic!("{listed}"))
        .iter()
        .filter_map(|r| r["record_id"].as_str())
        .collect();
    assert!(
        ids.contains(&before.as_str()) && ids.contains(&after.as_str()),
        "{listed}"
    );
    assert_eq!(ids.len(), 2, "nothing refused was written: {listed}");
    app.get("/readyz", None).await.ok(200);
    let logs = app.stop().await;
    assert!(
        !logs.contains("request failed"),
        "an outage was answered as a fault: {}",
        logs.lines()
            .find(|l| l.contains("request failed"))
            .unwrap_or_default()
    );
    drop(pg);
}
