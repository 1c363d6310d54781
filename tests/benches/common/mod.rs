//! What the benches that drive the real server share: stopping it however the bench
//! ends, waiting for it, and a signed-in patient.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A server process killed when dropped, a failed assertion included.
pub struct Stopped(pub std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits up to 30 s for `/healthz` to answer.
pub async fn wait_healthy(http: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "the server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Signs a patient with `phone` up and in: (the sign-in answer, the sign-up answer).
pub async fn patient_session(http: &reqwest::Client, base: &str, phone: &str) -> (Value, Value) {
    let created = post_json(
        http,
        &format!("{base}/v1/patients"),
        json!({"phone": phone, "password": "bench password 123", "name": "Bench Patient", "birth_date": "1990-01-01"}),
    )
    .await;
    let session = post_json(
        http,
        &format!("{base}/v1/sessions"),
        json!({"phone": phone, "password": "bench password 123"}),
    )
    .await;
    (session, created)
}

async fn post_json(http: &reqwest::Client, url: &str, body: Value) -> Value {
    http.post(url)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}
