//! `TestApp`: the real `afyachain` binary serving on a random loopback port over a
//! fresh store, and one helper per endpoint so tests read like a user's script.

#![allow(dead_code)] // each test module uses its part of the support

use std::time::Duration;

use eventstore::Backend;
use reqwest::header::HeaderMap;
use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{Env, Server};

/// Each party's password is this plus its phone number.
pub const PASSWORD: &str = "correct horse ";

pub fn password_of(phone: &str) -> String {
    format!("{PASSWORD}{phone}")
}

/// An answer from the server.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// Asserts a problem+json answer with this status and code; returns its body.
    #[track_caller]
    pub fn problem(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status, status, "{}", self.text());
        assert_eq!(
            self.header("content-type").as_deref(),
            Some("application/problem+json"),
            "{}",
            self.text()
        );
        let body = self.json();
        assert_eq!(body["status"], status, "{body}");
        assert_eq!(body["code"], code, "{body}");
        assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
        body
    }

    #[track_caller]
    pub fn ok(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "{}", self.text());
        if self.body.is_empty() {
            Value::Null
        } else {
            self.json()
        }
    }
}

/// Someone who signed up and in.
#[derive(Clone, Debug)]
pub struct Party {
    pub id: String,
    pub phone: String,
    pub token: String,
}

/// The cast of most tests: two patients, a verified doctor, a second verified doctor,
/// an unverified doctor, a registrar and an auditor, all signed in.
pub struct World {
    pub patient: Party,
    pub other_patient: Party,
    pub doctor: Party,
    pub other_doctor: Party,
    pub unverified_doctor: Party,
    pub registrar: Party,
    pub auditor: Party,
}

pub struct TestApp {
    pub env: Env,
    pub server: Server,
    pub http: reqwest::Client,
    next_phone: std::sync::atomic::AtomicU32,
    /// Logs of servers this app ran before the current one.
    earlier_logs: String,
}

impl TestApp {
    /// `None`: PostgreSQL unreachable outside CI (skip).
    pub async fn start(backend: Backend) -> Option<TestApp> {
        TestApp::start_with(backend, &[]).await
    }

    pub async fn start_with(backend: Backend, vars: &[(&str, &str)]) -> Option<TestApp> {
        let env = Env::new(backend).await?;
        Some(TestApp::start_on(env, vars))
    }

    /// Serves over `env` (a store the test prepared).
    pub fn start_on(env: Env, vars: &[(&str, &str)]) -> TestApp {
        let server = env.serve_with(vars);
        TestApp {
            env,
            server,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            next_phone: std::sync::atomic::AtomicU32::new(0),
            earlier_logs: String::new(),
        }
    }

    /// Stops the server with `signal` (`TERM`: it must exit cleanly; `KILL`: it dies
    /// wherever it is) and starts a new one on the same store with `vars`.
    pub fn restart(&mut self, signal: &str, vars: &[(String, String)]) {
        let pid = self.server.child.id().to_string();
        let sent = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(sent.success());
        let status = self.server.child.wait().unwrap();
        if signal == "TERM" {
            assert!(status.success(), "server did not stop cleanly");
        }
        self.earlier_logs.push_str(&self.server.logs());
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.server = self.env.serve_with(&vars);
    }

    /// Stops the server (it must exit cleanly) and removes the store. Whatever the
    /// test did, the server's logs hold no token, password or phone number it used.
    pub async fn stop(self) -> String {
        let logs = format!("{}{}", self.earlier_logs, self.server.logs());
        assert!(self.server.terminate(), "server did not stop cleanly");
        self.env.cleanup().await;
        assert!(!logs.contains("afy1."), "a token reached the logs");
        assert!(
            !logs.contains(PASSWORD.trim()),
            "a password reached the logs"
        );
        let issued = self.next_phone.load(std::sync::atomic::Ordering::Relaxed);
        let phones: std::collections::HashSet<String> = (0..issued)
            .map(|n| format!("7{:08}", 10_000_000 + n))
            .collect();
        for line in logs.lines() {
            // A number written as 7XXXXXXXX, 07XXXXXXXX or (+)2547XXXXXXXX: a run of
            // digits of its own, not the middle of a longer one (a duration's digits).
            for run in line.split(|c: char| !c.is_ascii_digit()) {
                let national = run
                    .strip_prefix("254")
                    .or_else(|| run.strip_prefix('0'))
                    .filter(|rest| rest.len() == 9)
                    .unwrap_or(run);
                assert!(
                    !phones.contains(national),
                    "a phone number (a test's) reached the logs: {line}"
                );
            }
        }
        logs
    }

    /// A fresh valid phone number, distinct within this app.
    pub fn phone(&self) -> String {
        let n = self
            .next_phone
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("2547{:08}", 10_000_000 + n)
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Resp {
        let mut request = self.http.request(method, self.server.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request.send().await.unwrap();
        Resp {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: response.bytes().await.unwrap().to_vec(),
        }
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Resp {
        self.post_keyed(path, token, None, body).await
    }

    pub async fn post_keyed(
        &self,
        path: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: Value,
    ) -> Resp {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(key) = key {
            headers.push(("idempotency-key", key));
        }
        self.send(
            Method::POST,
            path,
            token,
            &headers,
            Some(serde_json::to_vec(&body).unwrap()),
        )
        .await
    }

    /// A POST without a body.
    pub async fn post_empty(&self, path: &str, token: Option<&str>) -> Resp {
        self.send(Method::POST, path, token, &[], None).await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Resp {
        self.send(Method::GET, path, token, &[], None).await
    }

    pub async fn delete(&self, path: &str, token: Option<&str>) -> Resp {
        self.send(Method::DELETE, path, token, &[], None).await
    }

    pub fn patient_body(phone: &str, name: &str) -> Value {
        json!({"phone": phone, "password": password_of(phone), "name": name, "birth_date": "1987-03-14"})
    }

    pub async fn sign_up_patient(&self, phone: &str, name: &str) -> String {
        let r = self
            .post("/v1/patients", None, TestApp::patient_body(phone, name))
            .await;
        r.ok(201)["patient_id"].as_str().unwrap().to_owned()
    }

    pub async fn sign_up_doctor(&self, phone: &str, name: &str, licence: &str) -> String {
        let r = self
            .post(
                "/v1/doctors",
                None,
                json!({"phone": phone, "password": password_of(phone), "name": name, "license_number": licence}),
            )
            .await;
        let body = r.ok(201);
        assert_eq!(body["status"], "unverified");
        body["doctor_id"].as_str().unwrap().to_owned()
    }

    /// `afyachain staff add`, the password on standard input.
    pub fn add_staff(&self, role: &str, phone: &str, name: &str) -> String {
        let (ok, out, err) = self.env.run_with_input(
            &[
                "staff", "add", "--role", role, "--phone", phone, "--name", name,
            ],
            &format!("{}\n", password_of(phone)),
        );
        assert!(ok, "staff add failed: {err}");
        out.lines().last().unwrap().trim().to_owned()
    }

    pub async fn sign_in(&self, phone: &str) -> String {
        let r = self
            .post(
                "/v1/sessions",
                None,
                json!({"phone": phone, "password": password_of(phone)}),
            )
            .await;
        r.ok(200)["token"].as_str().unwrap().to_owned()
    }

    async fn party(&self, id: String, phone: String) -> Party {
        let token = self.sign_in(&phone).await;
        Party { id, phone, token }
    }

    pub async fn verify(&self, registrar: &Party, doctor_id: &str) -> Resp {
        self.post_empty(
            &format!("/v1/doctors/{doctor_id}/verification"),
            Some(&registrar.token),
        )
        .await
    }

    pub async fn world(&self) -> World {
        let p = self.phone();
        let patient = self
            .party(self.sign_up_patient(&p, "Achieng Otieno").await, p)
            .await;
        let p = self.phone();
        let other_patient = self
            .party(self.sign_up_patient(&p, "Baraka Mwangi").await, p)
            .await;
        let p = self.phone();
        let registrar = self
            .party(self.add_staff("registrar", &p, "Rehema Registrar"), p)
            .await;
        let p = self.phone();
        let auditor = self
            .party(self.add_staff("auditor", &p, "Amani Auditor"), p)
            .await;
        let p = self.phone();
        let doctor = self
            .party(self.sign_up_doctor(&p, "Dr Kamau", "KMPDC-0042").await, p)
            .await;
        self.verify(&registrar, &doctor.id).await.ok(200);
        let p = self.phone();
        let other_doctor = self
            .party(self.sign_up_doctor(&p, "Dr Njeri", "KMPDC-0043").await, p)
            .await;
        self.verify(&registrar, &other_doctor.id).await.ok(200);
        let p = self.phone();
        let unverified_doctor = self
            .party(self.sign_up_doctor(&p, "Dr Otieno", "KMPDC-0044").await, p)
            .await;
        World {
            patient,
            other_patient,
            doctor,
            other_doctor,
            unverified_doctor,
            registrar,
            auditor,
        }
    }

    pub async fn upload(
        &self,
        token: &str,
        patient_id: &str,
        query: &str,
        content_type: &str,
        bytes: &[u8],
    ) -> Resp {
        self.send(
            Method::POST,
            &format!("/v1/patients/{patient_id}/records?{query}"),
            Some(token),
            &[("content-type", content_type)],
            Some(bytes.to_vec()),
        )
        .await
    }

    pub async fn request_access(
        &self,
        doctor: &Party,
        patient_id: &str,
        categories: &[&str],
    ) -> Resp {
        self.post(
            "/v1/access-requests",
            Some(&doctor.token),
            json!({"patient_id": patient_id, "categories": categories,
                   "purpose": "Diabetes follow-up", "duration_days": 30}),
        )
        .await
    }

    /// The world's patient uploads a record of `category` and grants the world's
    /// doctor that category: `(record_id, request_id)`.
    pub async fn share(
        &self,
        w: &World,
        category: &str,
        content_type: &str,
        bytes: &[u8],
    ) -> (String, String) {
        let record = self
            .upload(
                &w.patient.token,
                &w.patient.id,
                &format!("category={category}"),
                content_type,
                bytes,
            )
            .await
            .ok(201);
        let asked = self
            .request_access(&w.doctor, &w.patient.id, &[category])
            .await
            .ok(201);
        let request_id = asked["request_id"].as_str().unwrap().to_owned();
        self.post_empty(
            &format!("/v1/access-requests/{request_id}/approval"),
            Some(&w.patient.token),
        )
        .await
        .ok(200);
        (record["record_id"].as_str().unwrap().to_owned(), request_id)
    }

    /// A lab record shared with `w.doctor`, read once by the doctor, then the access
    /// revoked by the patient: (record id, request id).
    pub async fn share_read_revoke(&self, w: &World, content: &[u8]) -> (String, String) {
        let (record_id, request_id) = self.share(w, "lab", "application/pdf", content).await;
        let read = self
            .get(
                &format!("/v1/records/{record_id}/content?request_id={request_id}"),
                Some(&w.doctor.token),
            )
            .await;
        assert_eq!(read.status, 200);
        self.post_empty(
            &format!("/v1/access-requests/{request_id}/revocation"),
            Some(&w.patient.token),
        )
        .await
        .ok(200);
        (record_id, request_id)
    }

    /// How many events the store holds (read directly, beside the server).
    pub async fn event_count(&self) -> i64 {
        self.scalar("SELECT count(*) FROM events").await
    }

    /// A connection to the store the server uses, beside it (read-only on SQLite).
    async fn store_connection(&self) -> sqlx::AnyConnection {
        self.connect_store("ro").await
    }

    /// Runs `sql` on the store behind the server's back: a tamperer, or a bug that
    /// bypassed the domain. Returns the rows it changed.
    pub async fn tamper(&self, sql: &str) -> u64 {
        let mut conn = self.connect_store("rw").await;
        if self.env.database_url.is_none() {
            // Wait behind the server's writers as long as a test might, not 5 s.
            sqlx::query("PRAGMA busy_timeout = 120000")
                .execute(&mut conn)
                .await
                .unwrap();
        }
        sqlx::query(sql)
            .execute(&mut conn)
            .await
            .unwrap()
            .rows_affected()
    }

    /// `n` sign-outs written straight into the log of a SQLite store (the domain would
    /// take far too long to sign that many people out). With `correlated`, each has its
    /// own correlation id. Returns the rows inserted. Written in chunks, each its own
    /// transaction, so this writer never holds SQLite's lock for longer than the
    /// server's busy timeout (one statement of a million rows takes over 10 s on a slow
    /// machine, and the server's consumers would give up waiting behind it).
    pub async fn insert_sign_outs(&self, n: i64, correlated: bool) -> u64 {
        const CHUNK: i64 = 50_000;
        let correlation = if correlated {
            ", 'correlation_id', printf('00000000-0000-4000-9000-%012d', i)"
        } else {
            ""
        };
        let mut inserted = 0;
        let mut first = 1;
        while first <= n {
            let last = (first + CHUNK - 1).min(n);
            inserted += self
                .tamper(&format!(
                    "WITH RECURSIVE n(i) AS (SELECT {first} UNION ALL SELECT i + 1 FROM n \
                     WHERE i < {last}) \
                     INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
                     event_version, payload, metadata) \
                     SELECT 'session', printf('00000000-0000-4000-8000-%012d', i), 2, \
                     'SessionEnded', '1.0', json_object('SessionEnded', \
                     json_object('session_id', printf('00000000-0000-4000-8000-%012d', i), \
                     'ended_at', '2026-11-25T06:00:00Z')), \
                     json_object('actor', 'system'{correlation}) FROM n"
                ))
                .await;
            first = last + 1;
        }
        inserted
    }

    async fn connect_store(&self, mode: &str) -> sqlx::AnyConnection {
        sqlx::any::install_default_drivers();
        let url = match &self.env.database_url {
            Some(url) => url.clone(),
            None => format!(
                "sqlite://{}?mode={mode}",
                self.env.data_dir.join("afyachain.db").display()
            ),
        };
        <sqlx::AnyConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap()
    }

    /// One integer from the store, read directly.
    pub async fn scalar(&self, sql: &str) -> i64 {
        let mut conn = self.store_connection().await;
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&mut conn)
            .await
            .unwrap()
    }

    /// Every event's type, payload and metadata as text (to scan for plaintext).
    pub async fn raw_events(&self) -> String {
        let sql = match self.env.backend {
            Backend::Postgres => "SELECT event_type || payload::text || metadata::text FROM events",
            Backend::Sqlite => "SELECT event_type || payload || metadata FROM events",
        };
        let mut conn = self.store_connection().await;
        let rows: Vec<String> = sqlx::query_scalar(sql).fetch_all(&mut conn).await.unwrap();
        rows.join("\n")
    }

    /// Every stored blob.
    pub fn blobs(&self) -> Vec<Vec<u8>> {
        let mut blobs = Vec::new();
        let Ok(dirs) = std::fs::read_dir(self.env.data_dir.join("blobs")) else {
            return blobs;
        };
        for dir in dirs {
            for file in std::fs::read_dir(dir.unwrap().path()).unwrap() {
                blobs.push(std::fs::read(file.unwrap().path()).unwrap());
            }
        }
        blobs
    }
}
