//! The live event stream under load: the real `afyachain` binary (SQLite) with
//! `BENCH_SSE_CLIENTS` concurrent Server-Sent-Events clients (a comma-separated list
//! of counts, default `1,100,1000,4000`). For each count the clients connect, the
//! server's resident memory is read idle, then a patient uploads `BENCH_SSE_EVENTS`
//! small records (default 200, at `BENCH_SSE_RATE` per second, default 50) and every
//! client must receive every `RecordUploaded`. Reports the delivery latency (the
//! event's recorded time, taken in the writing transaction before its commit, to
//! arrival at the client: an upper bound of commit → client) at p50/p99/max over all
//! clients, and the server's memory with the clients connected and after the burst.
//!
//! Run: `cargo bench -p tests --bench sse`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{patient_session, wait_healthy, Stopped};

fn main() {
    actix_rt::System::new().block_on(run());
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024.0
}

async fn run() {
    let counts: Vec<usize> = std::env::var("BENCH_SSE_CLIENTS")
        .unwrap_or_else(|_| "1,100,1000,4000".to_owned())
        .split(',')
        .map(|c| c.trim().parse().unwrap())
        .collect();
    let events: usize = std::env::var("BENCH_SSE_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let rate: f64 = std::env::var("BENCH_SSE_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50.0);
    let bin = env!("CARGO_BIN_EXE_afyachain-under-test");
    let dir = std::env::temp_dir().join(format!("afya-bench-{}", uuid::Uuid::new_v4()));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = Command::new(bin)
        .arg("serve")
        .env("AFYA_DATA_DIR", &dir)
        .env("AFYA_LISTEN", format!("127.0.0.1:{port}"))
        // Every client streams with the one integrator key: the bench measures the
        // broadcast, not the per-key limit (8 streams by default).
        .env("AFYA_SSE_MAX_STREAMS_PER_KEY", "10000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = server.id();
    let _server = Stopped(server);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    wait_healthy(&http, &base).await;
    let added = Command::new(bin)
        .args([
            "integrator",
            "add",
            "--name",
            "Bench",
            "--events",
            "RecordUploaded",
        ])
        .env("AFYA_DATA_DIR", &dir)
        .output()
        .unwrap();
    assert!(added.status.success());
    let key = String::from_utf8(added.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_owned();
    let (session, created) = patient_session(&http, &base, "254712345678").await;
    let patient = created["patient_id"].as_str().unwrap().to_owned();
    let token = session["token"].as_str().unwrap().to_owned();
    println!("server RSS before any client: {:.1} MiB", rss_mib(pid));

    for clients in counts {
        // Connect every client (each its own connection), reading on its own task.
        let (arrivals_tx, mut arrivals) = tokio::sync::mpsc::unbounded_channel::<f64>();
        let ready = Arc::new(tokio::sync::Semaphore::new(0));
        let mut tasks = Vec::with_capacity(clients);
        for _ in 0..clients {
            let client = reqwest::Client::new();
            let url = format!("{base}/v1/events/stream?types=RecordUploaded");
            let key = key.clone();
            let arrivals = arrivals_tx.clone();
            let ready = ready.clone();
            tasks.push(tokio::spawn(async move {
                let mut resp = client.get(url).bearer_auth(key).send().await.unwrap();
                assert_eq!(resp.status(), 200);
                ready.add_permits(1);
                let mut buf = String::new();
                let mut seen = 0;
                while seen < events {
                    let Some(chunk) = resp.chunk().await.unwrap() else {
                        panic!("stream ended after {seen} events");
                    };
                    let now = chrono::Utc::now();
                    buf.push_str(std::str::from_utf8(&chunk).unwrap());
                    while let Some(end) = buf.find("\n\n") {
                        let frame: String = buf.drain(..end + 2).collect();
                        let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: "))
                        else {
                            continue;
                        };
                        let event: Value = serde_json::from_str(data).unwrap();
                        let at = chrono::DateTime::parse_from_rfc3339(
                            event["recorded_at"].as_str().unwrap(),
                        )
                        .unwrap();
                        let ms = (now - at.with_timezone(&chrono::Utc))
                            .num_microseconds()
                            .unwrap() as f64
                            / 1000.0;
                        let _ = arrivals.send(ms);
                        seen += 1;
                    }
                }
            }));
        }
        drop(arrivals_tx);
        let _ = ready.acquire_many(clients as u32).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = rss_mib(pid);
        let started = Instant::now();
        let gap = Duration::from_secs_f64(1.0 / rate);
        for i in 0..events {
            let due = started + gap * i as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
            let reply = http
                .post(format!("{base}/v1/patients/{patient}/records?category=lab"))
                .bearer_auth(&token)
                .header("content-type", "application/pdf")
                .body(format!("%PDF bench {clients} {i}"))
                .send()
                .await
                .unwrap();
            assert_eq!(reply.status(), 201, "{}", reply.text().await.unwrap());
        }
        let mut latencies = Vec::with_capacity(clients * events);
        let deadline = Instant::now() + Duration::from_secs(300);
        while latencies.len() < clients * events {
            match tokio::time::timeout_at(deadline.into(), arrivals.recv()).await {
                Ok(Some(ms)) => latencies.push(ms),
                _ => break,
            }
        }
        let peak = rss_mib(pid);
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(
            latencies.len(),
            clients * events,
            "an event did not reach a client"
        );
        latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let pct = |p: f64| {
            let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
            latencies[i]
        };
        println!(
            "{clients} SSE clients, {events} events at {rate}/s: {} deliveries; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; server RSS {:.1} MiB with clients connected, {:.1} MiB after the burst",
            latencies.len(),
            pct(0.50),
            pct(0.99),
            pct(1.0),
            idle,
            peak,
        );
        // Let the server notice the closed connections before the next round.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
