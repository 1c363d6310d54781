//! M-Pesa payments end to end: the real server, the local Daraja sandbox
//! (`mpesa_adapter::sandbox`, Daraja's endpoints and JSON) delivering real callbacks
//! over HTTP to the server's callback URL.

use std::time::{Duration, Instant};

use eventstore::Backend;
use mpesa_adapter::sandbox::{Outcome, Sandbox, SandboxConfig};
use reqwest::Method;
use serde_json::{json, Value};

use crate::app::{Party, TestApp};

const TOKEN: &str = "cb-9f2c4e7a1b3d5f60";

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The server's M-Pesa settings against `sandbox`, listening on `port`.
pub(crate) fn vars(
    sandbox: &Sandbox,
    port: u16,
    reconcile_after_secs: u64,
) -> Vec<(String, String)> {
    let c = SandboxConfig::public_sandbox();
    [
        ("AFYA_LISTEN", format!("127.0.0.1:{port}")),
        ("MPESA_BASE_URL", sandbox.url.clone()),
        ("MPESA_CONSUMER_KEY", c.consumer_key),
        ("MPESA_CONSUMER_SECRET", c.consumer_secret),
        ("MPESA_SHORTCODE", c.shortcode),
        ("MPESA_PASSKEY", c.passkey),
        (
            "MPESA_CALLBACK_URL",
            format!("http://127.0.0.1:{port}/v1/mpesa/callbacks/{TOKEN}/stk"),
        ),
        ("MPESA_POLL_MS", "100".to_owned()),
        ("MPESA_TIMEOUT_SECS", "5".to_owned()),
        (
            "MPESA_RECONCILE_AFTER_SECS",
            reconcile_after_secs.to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn refs(vars: &[(String, String)]) -> Vec<(&str, &str)> {
    vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

pub(crate) async fn sandbox(delay_ms: u64) -> Sandbox {
    let mut config = SandboxConfig::public_sandbox();
    config.callback_delay = Duration::from_millis(delay_ms);
    Sandbox::start(config).await.unwrap()
}

async fn pay(app: &TestApp, who: &Party, phone: &str, amount: u64, key: &str) -> String {
    let created = app
        .post_keyed(
            "/v1/payments",
            Some(&who.token),
            Some(key),
            json!({"purpose": "consultation_fee", "amount_kes": amount, "phone": phone}),
        )
        .await
        .ok(202);
    assert_eq!(created["status"], "pending");
    created["payment_id"].as_str().unwrap().to_owned()
}

async fn settled(app: &TestApp, who: &Party, payment_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = app
            .get(&format!("/v1/payments/{payment_id}"), Some(&who.token))
            .await
            .ok(200);
        if p["status"] != "pending" {
            return p;
        }
        assert!(Instant::now() < deadline, "{p}\n{}", app.server.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn count(app: &TestApp, event_type: &str, payment_id: &str) -> i64 {
    app.scalar(&format!(
        "SELECT count(*) FROM events WHERE event_type = '{event_type}' AND aggregate_id = '{payment_id}'"
    ))
    .await
}

/// Every outcome the sandbox can give, each payment pushed once and settled once, on
/// both store backends.
#[actix_rt::test]
async fn every_outcome_settles_once_through_the_sandbox() {
    for backend in eventstore::testing::BACKENDS {
        every_outcome(backend).await;
    }
}

async fn every_outcome(backend: Backend) {
    let sb = sandbox(200).await;
    let port = free_port();
    let vars = vars(&sb, port, 120);
    let Some(app) = TestApp::start_with(backend, &refs(&vars)).await else {
        return;
    };
    let w = app.world().await;
    let cases = [
        ("254711000001", Outcome::Success, "confirmed", Some(0)),
        ("254711000002", Outcome::Cancelled, "cancelled", Some(1032)),
        ("254711000003", Outcome::Timeout, "timed_out", Some(1037)),
        ("254711000004", Outcome::WrongPin, "failed", Some(2001)),
        (
            "254711000005",
            Outcome::InsufficientFunds,
            "failed",
            Some(1),
        ),
        ("254711000006", Outcome::Duplicate, "confirmed", Some(0)),
    ];
    let mut ids = Vec::new();
    for (i, (phone, outcome, _, _)) in cases.iter().enumerate() {
        sb.set_outcome(phone, *outcome, None);
        let payer = if i % 2 == 0 { &w.patient } else { &w.doctor };
        let key = format!("pay-{i}");
        let id = pay(&app, payer, phone, 100 + i as u64, &key).await;
        // A retry with the same key is the same payment.
        assert_eq!(pay(&app, payer, phone, 100 + i as u64, &key).await, id);
        ids.push(id);
    }
    for (i, (_, _, status, code)) in cases.iter().enumerate() {
        let payer = if i % 2 == 0 { &w.patient } else { &w.doctor };
        let p = settled(&app, payer, &ids[i]).await;
        assert_eq!(p["status"], *status, "{p}");
        assert_eq!(p["result_code"].as_i64(), *code, "{p}");
        assert_eq!(p["amount_kes"], 100 + i as i64);
        assert!(p["checkout_request_id"]
            .as_str()
            .unwrap()
            .starts_with("ws_CO_"));
        if *status == "confirmed" {
            let receipt = p["mpesa_receipt"].as_str().unwrap();
            assert_eq!(receipt.len(), 10, "{p}");
            assert_eq!(count(&app, "PaymasterBudgetCredited", &ids[i]).await, 1);
        } else {
            assert_eq!(p["mpesa_receipt"], Value::Null);
            assert_eq!(count(&app, "PaymasterBudgetCredited", &ids[i]).await, 0);
        }
    }
    // One STK Push per payment, whatever the retries; one outcome each, even with the
    // duplicate callback.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(sb.pushes().len(), cases.len());
    for id in &ids {
        assert_eq!(
            count(&app, "PaymentConfirmed", id).await + count(&app, "PaymentFailed", id).await,
            1
        );
    }
    assert!(app
        .server
        .logs()
        .contains("duplicate or late STK callback for a settled payment"));
    // Lists: the patient's and the doctor's own payments.
    let mine = app
        .get(
            &format!("/v1/patients/{}/payments", w.patient.id),
            Some(&w.patient.token),
        )
        .await
        .ok(200);
    assert_eq!(mine["items"].as_array().unwrap().len(), 3);
    let theirs = app
        .get(
            &format!("/v1/doctors/{}/payments", w.doctor.id),
            Some(&w.doctor.token),
        )
        .await
        .ok(200);
    assert_eq!(theirs["items"].as_array().unwrap().len(), 3);
    // Others see nothing of them.
    app.get(
        &format!("/v1/payments/{}", ids[0]),
        Some(&w.other_patient.token),
    )
    .await
    .problem(404, "payment_not_found");
    app.get(
        &format!("/v1/patients/{}/payments", w.patient.id),
        Some(&w.other_patient.token),
    )
    .await
    .problem(403, "not_your_data");
    // The phone numbers never reach the events or the logs in clear.
    let raw = app.raw_events().await;
    let logs = app.server.logs();
    for (phone, ..) in &cases {
        assert!(!raw.contains(&phone[3..]), "a phone number in the events");
        assert!(!logs.contains(&phone[3..]), "a phone number in the logs");
    }
    app.stop().await;
    sb.stop().await;
}

/// Callbacks nobody should trust: a wrong path token is a 404 and records nothing; an
/// unknown CheckoutRequestID or a mismatched amount is kept as rejected and changes no
/// payment; a late callback after a settled payment changes nothing.
#[actix_rt::test]
async fn forged_unknown_mismatched_and_late_callbacks_change_nothing() {
    let sb = sandbox(200).await;
    let port = free_port();
    let vars = vars(&sb, port, 120);
    let Some(app) = TestApp::start_with(Backend::Sqlite, &refs(&vars)).await else {
        return;
    };
    let w = app.world().await;
    sb.set_outcome("254711000010", Outcome::Cancelled, None);
    let id = pay(&app, &w.patient, "254711000010", 300, "k1").await;
    let p = settled(&app, &w.patient, &id).await;
    assert_eq!(p["status"], "cancelled");
    let checkout = p["checkout_request_id"].as_str().unwrap().to_owned();
    let success = |checkout: &str, amount: u64, phone: u64| {
        json!({"Body": {"stkCallback": {
            "MerchantRequestID": "1-2-3", "CheckoutRequestID": checkout, "ResultCode": 0,
            "ResultDesc": "The service request is processed successfully.",
            "CallbackMetadata": {"Item": [
                {"Name": "Amount", "Value": amount},
                {"Name": "MpesaReceiptNumber", "Value": "FORGED1234"},
                {"Name": "TransactionDate", "Value": 20261125101010u64},
                {"Name": "PhoneNumber", "Value": phone}]}}}})
    };
    let post = |path: String, body: Value| {
        let app = &app;
        async move {
            app.send(
                Method::POST,
                &path,
                None,
                &[("content-type", "application/json")],
                Some(serde_json::to_vec(&body).unwrap()),
            )
            .await
        }
    };
    let before = app.event_count().await;
    // Wrong path token: 404, nothing recorded.
    post(
        "/v1/mpesa/callbacks/not-the-token-at-all/stk".into(),
        success(&checkout, 300, 254711000010),
    )
    .await
    .problem(404, "route_not_found");
    assert_eq!(app.event_count().await, before);
    let path = format!("/v1/mpesa/callbacks/{TOKEN}/stk");
    // Malformed: 400, nothing recorded.
    post(path.clone(), json!({"Body": {}}))
        .await
        .problem(400, "invalid_callback");
    assert_eq!(app.event_count().await, before);
    // Late success for the cancelled payment: acknowledged, nothing changes.
    let ack = post(path.clone(), success(&checkout, 300, 254711000010))
        .await
        .ok(200);
    assert_eq!(ack, json!({"ResultCode": 0, "ResultDesc": "Accepted"}));
    assert_eq!(settled(&app, &w.patient, &id).await["status"], "cancelled");
    // Unknown CheckoutRequestID, and a pending payment's callback with the wrong
    // amount: kept as rejected, for operators.
    post(
        path.clone(),
        success("ws_CO_000000000000000000", 300, 254711000010),
    )
    .await
    .ok(200);
    sb.set_outcome("254711000011", Outcome::NoCallback, None);
    let pending = pay(&app, &w.patient, "254711000011", 400, "k2").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let checkout2 = loop {
        let p = app
            .get(&format!("/v1/payments/{pending}"), Some(&w.patient.token))
            .await
            .ok(200);
        if let Some(c) = p["checkout_request_id"].as_str() {
            break c.to_owned();
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    post(path.clone(), success(&checkout2, 1, 254711000011))
        .await
        .ok(200);
    post(path.clone(), success(&checkout2, 400, 254711999999))
        .await
        .ok(200);
    assert_eq!(
        app.get(&format!("/v1/payments/{pending}"), Some(&w.patient.token))
            .await
            .ok(200)["status"],
        "pending"
    );
    assert_eq!(
        app.scalar("SELECT count(*) FROM events WHERE event_type = 'MpesaCallbackRejected'")
            .await,
        3
    );
    let raw = app.raw_events().await;
    assert!(raw.contains("unknown_checkout_request_id"));
    assert!(raw.contains("amount_mismatch"));
    assert!(raw.contains("phone_mismatch"));
    // The path token is a secret of the deployment: never in the logs.
    assert!(!app.server.logs().contains(TOKEN));
    app.stop().await;
    sb.stop().await;
}

/// A callback that never comes: the reconciler asks Daraja (STK Push Query) and settles
/// the payment (`PaymentReconciled`). Tokens that expire are fetched again.
#[actix_rt::test]
async fn a_missing_callback_is_reconciled_and_expired_tokens_are_refreshed() {
    let sb = sandbox(300).await;
    let port = free_port();
    let vars = vars(&sb, port, 1);
    let Some(app) = TestApp::start_with(Backend::Sqlite, &refs(&vars)).await else {
        return;
    };
    let w = app.world().await;
    sb.set_outcome("254711000020", Outcome::NoCallback, None);
    let id = pay(&app, &w.patient, "254711000020", 500, "k1").await;
    let p = settled(&app, &w.patient, &id).await;
    assert_eq!(p["status"], "timed_out", "{p}");
    assert_eq!(count(&app, "PaymentReconciled", &id).await, 1);
    // Its callback, late after all: acknowledged, logged, nothing changes.
    let late = json!({"Body": {"stkCallback": {
        "MerchantRequestID": "1-2-3",
        "CheckoutRequestID": p["checkout_request_id"],
        "ResultCode": 0, "ResultDesc": "The service request is processed successfully.",
        "CallbackMetadata": {"Item": [
            {"Name": "Amount", "Value": 500},
            {"Name": "MpesaReceiptNumber", "Value": "LATE000001"},
            {"Name": "TransactionDate", "Value": 20261125101010u64},
            {"Name": "PhoneNumber", "Value": 254711000020u64}]}}}});
    app.post(&format!("/v1/mpesa/callbacks/{TOKEN}/stk"), None, late)
        .await
        .ok(200);
    assert_eq!(settled(&app, &w.patient, &id).await["status"], "timed_out");
    assert_eq!(count(&app, "PaymentConfirmed", &id).await, 0);
    assert!(app
        .server
        .logs()
        .contains("duplicate or late STK callback for a settled payment"));
    // Tokens expire: the next push fetches a new one and goes through.
    let tokens = sb.token_requests();
    sb.expire_tokens();
    let id2 = pay(&app, &w.patient, "254711000021", 600, "k2").await;
    assert_eq!(settled(&app, &w.patient, &id2).await["status"], "confirmed");
    assert!(sb.token_requests() > tokens);
    app.stop().await;
    sb.stop().await;
}

/// Daraja failing at request time: the payment stays pending and is pushed once
/// Daraja answers again, never twice. Killed between the push and its callback, the
/// server settles the payment after restart (by query: the callback found nobody).
#[actix_rt::test]
async fn daraja_down_then_a_kill_between_push_and_callback() {
    let sb = sandbox(2500).await;
    let port = free_port();
    let vars = vars(&sb, port, 1);
    let Some(mut app) = TestApp::start_with(Backend::Sqlite, &refs(&vars)).await else {
        return;
    };
    let w = app.world().await;
    // Daraja not there at all: the payment waits, and goes once it is back.
    let address: std::net::SocketAddr = sb.url.trim_start_matches("http://").parse().unwrap();
    sb.stop().await;
    let early = pay(&app, &w.patient, "254711000031", 650, "k0").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        app.get(&format!("/v1/payments/{early}"), Some(&w.patient.token))
            .await
            .ok(200)["status"],
        "pending"
    );
    let mut config = SandboxConfig::public_sandbox();
    config.callback_delay = Duration::from_millis(2500);
    let sb = Sandbox::start_on(config, address).await.unwrap();
    assert_eq!(
        settled(&app, &w.patient, &early).await["status"],
        "confirmed"
    );
    assert_eq!(sb.pushes().len(), 1);
    // Daraja answering 503: likewise.
    sb.fail_next(503, 4);
    let id = pay(&app, &w.patient, "254711000030", 700, "k1").await;
    let p = app
        .get(&format!("/v1/payments/{id}"), Some(&w.patient.token))
        .await
        .ok(200);
    assert_eq!(p["status"], "pending");
    // Pushed once Daraja is back.
    let deadline = Instant::now() + Duration::from_secs(30);
    while sb.pushes().len() < 2 {
        assert!(Instant::now() < deadline, "{}", app.server.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(app
        .server
        .logs()
        .contains("Daraja unavailable; the payment stays pending"));
    // The acceptance recorded, then killed before the callback (2.5 s after the push).
    let deadline = Instant::now() + Duration::from_secs(10);
    while app
        .get(&format!("/v1/payments/{id}"), Some(&w.patient.token))
        .await
        .ok(200)["checkout_request_id"]
        .is_null()
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.restart("KILL", &[]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    app.restart("TERM", &vars);
    let p = settled(&app, &w.patient, &id).await;
    assert_eq!(p["status"], "confirmed", "{p}\n{}", app.server.logs());
    assert_eq!(count(&app, "PaymentReconciled", &id).await, 1);
    assert_eq!(sb.pushes().len(), 2, "pushed twice");
    app.stop().await;
    sb.stop().await;
}

/// Bad requests for a payment change nothing; without M-Pesa configured the answer
/// says so.
#[actix_rt::test]
async fn bad_payment_requests_are_refused() {
    let Some(app) = TestApp::start(Backend::Sqlite).await else {
        return;
    };
    let w = app.world().await;
    let before = app.event_count().await;
    for (body, field) in [
        (
            json!({"purpose": "tip", "amount_kes": 10, "phone": "254711000001"}),
            "purpose",
        ),
        (
            json!({"purpose": "access_fee", "amount_kes": 0, "phone": "254711000001"}),
            "amount_kes",
        ),
        (
            json!({"purpose": "access_fee", "amount_kes": 250001, "phone": "254711000001"}),
            "amount_kes",
        ),
        (
            json!({"purpose": "access_fee", "amount_kes": 12.5, "phone": "254711000001"}),
            "amount_kes",
        ),
        (
            json!({"purpose": "access_fee", "amount_kes": "10", "phone": "254711000001"}),
            "amount_kes",
        ),
        (
            json!({"purpose": "access_fee", "amount_kes": 10, "phone": "12345"}),
            "phone",
        ),
        (
            json!({"purpose": "access_fee", "amount_kes": 10, "phone": "254711000001", "doctor_id": "x"}),
            "doctor_id",
        ),
    ] {
        let p = app
            .post("/v1/payments", Some(&w.patient.token), body.clone())
            .await
            .problem(422, "invalid_request");
        assert!(p.to_string().contains(field), "{body}: {p}");
    }
    app.post(
        "/v1/payments",
        Some(&w.auditor.token),
        json!({"purpose": "access_fee", "amount_kes": 10, "phone": "254711000001"}),
    )
    .await
    .problem(403, "role_forbidden");
    app.post(
        "/v1/payments",
        None,
        json!({"purpose": "access_fee", "amount_kes": 10, "phone": "254711000001"}),
    )
    .await
    .problem(401, "unauthenticated");
    let fine = json!({"purpose": "access_fee", "amount_kes": 10, "phone": "254711000001"});
    // Without an Idempotency-Key a retry would be a second payment: refused.
    app.post("/v1/payments", Some(&w.patient.token), fine.clone())
        .await
        .problem(400, "idempotency_key_required");
    // References must name what exists, and concern the payer.
    let p = app
        .post_keyed(
            "/v1/payments",
            Some(&w.patient.token),
            Some("k-doctor"),
            json!({"purpose": "consultation_fee", "amount_kes": 10, "phone": "254711000001",
                   "doctor_id": "00000000-0000-4000-8000-000000000000"}),
        )
        .await
        .problem(422, "invalid_request");
    assert!(p.to_string().contains("doctor_id"), "{p}");
    let p = app
        .post_keyed(
            "/v1/payments",
            Some(&w.patient.token),
            Some("k-request"),
            json!({"purpose": "access_fee", "amount_kes": 10, "phone": "254711000001",
                   "access_request_id": "00000000-0000-4000-8000-000000000000"}),
        )
        .await
        .problem(422, "invalid_request");
    assert!(p.to_string().contains("access_request_id"), "{p}");
    app.post_keyed("/v1/payments", Some(&w.patient.token), Some("k-503"), fine)
        .await
        .problem(503, "payments_unavailable");
    // Nobody's callback route without M-Pesa configured.
    app.post(&format!("/v1/mpesa/callbacks/{TOKEN}/stk"), None, json!({}))
        .await
        .problem(404, "route_not_found");
    assert_eq!(app.event_count().await, before);
    app.stop().await;
}

/// Daraja refusing the STK Push (a 4xx: here the server's passkey is wrong, so the
/// Password is): the payment fails with Daraja's error code and message, pushed never.
#[actix_rt::test]
async fn a_refused_stk_push_fails_the_payment_with_darajas_code_and_message() {
    let sb = sandbox(200).await;
    let port = free_port();
    let mut vars = vars(&sb, port, 120);
    for (k, v) in vars.iter_mut() {
        if k == "MPESA_PASSKEY" {
            *v = "not-the-passkey".into();
        }
    }
    let Some(app) = TestApp::start_with(Backend::Sqlite, &refs(&vars)).await else {
        return;
    };
    let w = app.world().await;
    let id = pay(&app, &w.patient, "254711000040", 800, "k1").await;
    let p = settled(&app, &w.patient, &id).await;
    assert_eq!(p["status"], "failed", "{p}");
    let desc = p["result_desc"].as_str().unwrap();
    assert!(
        desc.contains("400.002.02") && desc.contains("Invalid Password"),
        "{p}"
    );
    assert_eq!(p["checkout_request_id"], Value::Null);
    assert!(sb.pushes().is_empty());
    assert!(!app.server.logs().contains("not-the-passkey"));
    app.stop().await;
    sb.stop().await;
}
