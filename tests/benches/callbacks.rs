//! STK callbacks handled by the running server: the real `afyachain` binary (SQLite)
//! with M-Pesa pointed at the local Daraja sandbox, where every prompt is paid but its
//! callback lost (`paid_no_callback`: the sandbox's STK Push Query says paid);
//! `BENCH_PAYMENTS` payments (default 1,000) are requested over the API by one patient
//! and pushed by the worker, then their success callbacks are posted to the callback
//! URL by `BENCH_CONCURRENCY` clients (default 32). Each callback is confirmed by an
//! STK Push Query to the sandbox before it settles its payment, as in production.
//! Reports callbacks/s and the latency percentiles, and checks every payment ended
//! confirmed.
//!
//! Run: `cargo bench -p tests --bench callbacks`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mpesa_adapter::sandbox::{Outcome, Sandbox, SandboxConfig};
use serde_json::{json, Value};

mod common;
use common::{patient_session, wait_healthy, Stopped};

const TOKEN: &str = "bench-callback-token-0001";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    actix_rt::System::new().block_on(run());
}

async fn run() {
    let payments = env_or("BENCH_PAYMENTS", 1000);
    let concurrency = env_or("BENCH_CONCURRENCY", 32);
    let mut config = SandboxConfig::public_sandbox();
    config.default_outcome = Outcome::PaidNoCallback;
    // The query says paid at once; the reconciler (an hour away) never runs.
    config.callback_delay = Duration::ZERO;
    let sandbox = Sandbox::start(config.clone()).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("afya-bench-{}", uuid::Uuid::new_v4()));
    let callback_url = format!("http://127.0.0.1:{port}/v1/mpesa/callbacks/{TOKEN}/stk");
    let server = Command::new(env!("CARGO_BIN_EXE_afyachain-under-test"))
        .arg("serve")
        .env("AFYA_DATA_DIR", &dir)
        .env("AFYA_LISTEN", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .env("MPESA_BASE_URL", &sandbox.url)
        .env("MPESA_CONSUMER_KEY", &config.consumer_key)
        .env("MPESA_CONSUMER_SECRET", &config.consumer_secret)
        .env("MPESA_SHORTCODE", &config.shortcode)
        .env("MPESA_PASSKEY", &config.passkey)
        .env("MPESA_CALLBACK_URL", &callback_url)
        .env("MPESA_POLL_MS", "20")
        .env("MPESA_RECONCILE_AFTER_SECS", "3600")
        // One patient asks for every payment of the bench.
        .env("AFYA_PROMPTS_PER_PATIENT", (payments + 1).to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Stopped however the bench ends, a failed assertion included.
    let _server = Stopped(server);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&http, &base).await;
    let phone = "254712345678";
    let (session, _) = patient_session(&http, &base, phone).await;
    let token = session["token"].as_str().unwrap().to_owned();
    for i in 0..payments {
        let reply = http
            .post(format!("{base}/v1/payments"))
            .bearer_auth(&token)
            .header("Idempotency-Key", format!("bench-{i}"))
            .json(&json!({"purpose": "consultation_fee", "amount_kes": 100}))
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 202);
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while sandbox.pushes().len() < payments {
        assert!(Instant::now() < deadline, "pushes did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the worker record the last acceptances.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let bodies: Vec<Vec<u8>> = sandbox
        .pushes()
        .iter()
        .enumerate()
        .map(|(i, p)| {
            serde_json::to_vec(&json!({"Body": {"stkCallback": {
                "MerchantRequestID": p.merchant_request_id,
                "CheckoutRequestID": p.checkout_request_id,
                "ResultCode": 0,
                "ResultDesc": "The service request is processed successfully.",
                "CallbackMetadata": {"Item": [
                    {"Name": "Amount", "Value": 100},
                    {"Name": "MpesaReceiptNumber", "Value": format!("BENCH{i:05}")},
                    {"Name": "TransactionDate", "Value": 20261125101010u64},
                    {"Name": "PhoneNumber", "Value": 254712345678u64}]}}}}))
            .unwrap()
        })
        .collect();
    let queue = std::sync::Arc::new(std::sync::Mutex::new(bodies));
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..concurrency {
        let queue = queue.clone();
        let http = http.clone();
        let url = callback_url.clone();
        clients.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let Some(body) = queue.lock().unwrap().pop() else {
                    break;
                };
                let sent = Instant::now();
                let reply = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(reply.status(), 200);
                let _ = reply.bytes().await;
                latencies.push(sent.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for client in clients {
        latencies.extend(client.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1000.0
    };
    // Every payment confirmed (the read model catches up just after the answers).
    let subject = session["subject_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    let confirmed = loop {
        let confirmed = count_confirmed(&http, &base, &subject, &token).await;
        if confirmed == payments || Instant::now() > deadline {
            break confirmed;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "STK callbacks on the running server (SQLite, {concurrency} clients): {} callbacks in {elapsed:.2} s = {:.0} callbacks/s; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {confirmed}/{payments} payments confirmed",
        latencies.len(),
        latencies.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        pct(1.0),
    );
    assert_eq!(confirmed, payments);
    sandbox.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn count_confirmed(http: &reqwest::Client, base: &str, subject: &str, token: &str) -> usize {
    let mut confirmed = 0;
    let mut cursor: Option<i64> = None;
    loop {
        let mut url = format!("{base}/v1/patients/{subject}/payments?limit=100");
        if let Some(c) = cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: Value = http
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        confirmed += page["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["status"] == "confirmed")
            .count();
        match page["next_cursor"].as_i64() {
            Some(c) => cursor = Some(c),
            None => return confirmed,
        }
    }
}
