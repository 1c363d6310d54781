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

/// A patient pays for their own account: the prompt goes to their registered phone.
pub(crate) async fn pay(app: &TestApp, who: &Party, amount: u64, key: &str) -> String {
    let created = app
        .post_keyed(
            "/v1/payments",
            Some(&who.token),
            Some(key),
            json!({"purpose": "consultation_fee", "amount_kes": amount}),
        )
        .await
        .ok(202);
    assert_eq!(created["status"], "pending");
    created["payment_id"].as_str().unwrap().to_owned()
}

/// A doctor asks a fee under an approved access request: the prompt goes to the
/// request's patient, on their registered phone.
async fn fee(app: &TestApp, doctor: &Party, request_id: &str, amount: u64, key: &str) -> String {
    let created = app
        .post_keyed(
            "/v1/payments",
            Some(&doctor.token),
            Some(key),
            json!({"purpose": "consultation_fee", "amount_kes": amount,
                   "access_request_id": request_id}),
        )
        .await
        .ok(202);
    assert_eq!(created["status"], "pending");
    created["payment_id"].as_str().unwrap().to_owned()
}

/// A patient of their own, signed up and in, whose phone's prompts end in `outcome`.
async fn patient(app: &TestApp, sb: &Sandbox, outcome: Outcome) -> Party {
    let phone = app.phone();
    sb.set_outcome(&phone, outcome, None);
    let id = app.sign_up_patient(&phone, "Wanjiru Kariuki").await;
    let token = app.sign_in(&phone).await;
    Party { id, phone, token }
}

/// `doctor` asks `patient` for access and the patient approves it (until `expires_at`,
/// or for the requested 30 days): the request's id.
async fn grant(app: &TestApp, doctor: &Party, patient: &Party, expires_at: Option<&str>) -> String {
    let asked = app
        .request_access(doctor, &patient.id, &["lab"])
        .await
        .ok(201);
    let request_id = asked["request_id"].as_str().unwrap().to_owned();
    let body = match expires_at {
        Some(at) => json!({"expires_at": at}),
        None => json!({}),
    };
    app.post(
        &format!("/v1/access-requests/{request_id}/approval"),
        Some(&patient.token),
        body,
    )
    .await
    .ok(200);
    request_id
}

/// The CheckoutRequestID of a payment, once the worker has pushed it.
async fn checkout_of(app: &TestApp, who: &Party, payment_id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let p = app
            .get(&format!("/v1/payments/{payment_id}"), Some(&who.token))
            .await
            .ok(200);
        if let Some(c) = p["checkout_request_id"].as_str() {
            return c.to_owned();
        }
        assert!(Instant::now() < deadline, "{p}\n{}", app.server.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A success callback as Daraja posts it.
fn success(checkout: &str, amount: u64, phone: &str, receipt: &str) -> Value {
    json!({"Body": {"stkCallback": {
        "MerchantRequestID": "1-2-3", "CheckoutRequestID": checkout, "ResultCode": 0,
        "ResultDesc": "The service request is processed successfully.",
        "CallbackMetadata": {"Item": [
            {"Name": "Amount", "Value": amount},
            {"Name": "MpesaReceiptNumber", "Value": receipt},
            {"Name": "TransactionDate", "Value": 20261125101010u64},
            {"Name": "PhoneNumber", "Value": phone.parse::<u64>().unwrap()}]}}}})
}

async fn callback(app: &TestApp, body: Value) -> Value {
    app.post(&format!("/v1/mpesa/callbacks/{TOKEN}/stk"), None, body)
        .await
        .ok(200)
}

/// The patient's listed payments' ids.
async fn listed(app: &TestApp, who: &Party) -> Vec<String> {
    app.get(
        &format!("/v1/patients/{}/payments", who.id),
        Some(&who.token),
    )
    .await
    .ok(200)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["payment_id"].as_str().unwrap().to_owned())
        .collect()
}

async fn wait_log(app: &TestApp, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !app.server.logs().contains(text) {
        assert!(
            Instant::now() < deadline,
            "no {text:?} in\n{}",
            app.server.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) async fn settled(app: &TestApp, who: &Party, payment_id: &str) -> Value {
    // Generous: some payments wait for the reconciler (up to 15 s after the push).
    let deadline = Instant::now() + Duration::from_secs(60);
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
/// both store backends; patients paying their own account and a doctor's fees under
/// approved requests alike, each prompt on the patient's registered phone and in the
/// patient's payments.
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
        (Outcome::Success, "confirmed", Some(0)),
        (Outcome::Cancelled, "cancelled", Some(1032)),
        (Outcome::Timeout, "timed_out", Some(1037)),
        (Outcome::WrongPin, "failed", Some(2001)),
        (Outcome::InsufficientFunds, "failed", Some(1)),
        (Outcome::Duplicate, "confirmed", Some(0)),
    ];
    let mut patients = Vec::new();
    let mut ids = Vec::new();
    for (i, (outcome, _, _)) in cases.iter().enumerate() {
        let patient = patient(&app, &sb, *outcome).await;
        let key = format!("pay-{i}");
        // Even: the patient pays their own account; odd: the doctor asks a fee.
        let id = if i % 2 == 0 {
            let id = pay(&app, &patient, 100 + i as u64, &key).await;
            // A retry with the same key is the same payment.
            assert_eq!(pay(&app, &patient, 100 + i as u64, &key).await, id);
            id
        } else {
            let request = grant(&app, &w.doctor, &patient, None).await;
            let id = fee(&app, &w.doctor, &request, 100 + i as u64, &key).await;
            assert_eq!(
                fee(&app, &w.doctor, &request, 100 + i as u64, &key).await,
                id
            );
            id
        };
        patients.push(patient);
        ids.push(id);
    }
    for (i, (_, status, code)) in cases.iter().enumerate() {
        let p = settled(&app, &patients[i], &ids[i]).await;
        assert_eq!(p["status"], *status, "{p}");
        assert_eq!(p["result_code"].as_i64(), *code, "{p}");
        assert_eq!(p["amount_kes"], 100 + i as i64);
        assert_eq!(p["patient_id"], patients[i].id.as_str(), "{p}");
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
    // One STK Push per payment, whatever the retries, each to the patient's own
    // number; one outcome each, even with the duplicate callback.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut pushed: Vec<String> = sb.pushes().into_iter().map(|p| p.phone).collect();
    let mut registered: Vec<String> = patients.iter().map(|p| p.phone.clone()).collect();
    pushed.sort();
    registered.sort();
    assert_eq!(pushed, registered);
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
    // Lists: each patient sees their prompt, the doctor's fees included; the doctor
    // the fees they asked.
    for (patient, id) in patients.iter().zip(&ids) {
        assert_eq!(listed(&app, patient).await, vec![id.clone()]);
    }
    let theirs = app
        .get(
            &format!("/v1/doctors/{}/payments", w.doctor.id),
            Some(&w.doctor.token),
        )
        .await
        .ok(200);
    assert_eq!(theirs["items"].as_array().unwrap().len(), 3);
    // Others see nothing of them.
    for id in [&ids[0], &ids[1]] {
        app.get(&format!("/v1/payments/{id}"), Some(&w.other_patient.token))
            .await
            .problem(404, "payment_not_found");
        app.get(&format!("/v1/payments/{id}"), Some(&w.other_doctor.token))
            .await
            .problem(404, "payment_not_found");
    }
    app.get(
        &format!("/v1/patients/{}/payments", patients[0].id),
        Some(&w.other_patient.token),
    )
    .await
    .problem(403, "not_your_data");
    // The phone numbers never reach the events or the logs in clear.
    let raw = app.raw_events().await;
    let logs = app.server.logs();
    for patient in &patients {
        assert!(
            !raw.contains(&patient.phone[3..]),
            "a phone number in the events"
        );
        assert!(
            !logs.contains(&patient.phone[3..]),
            "a phone number in the logs"
        );
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
    let cancels = patient(&app, &sb, Outcome::Cancelled).await;
    let id = pay(&app, &cancels, 300, "k1").await;
    let p = settled(&app, &cancels, &id).await;
    assert_eq!(p["status"], "cancelled");
    let checkout = p["checkout_request_id"].as_str().unwrap().to_owned();
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
        success(&checkout, 300, &cancels.phone, "FORGED1234"),
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
    let ack = post(
        path.clone(),
        success(&checkout, 300, &cancels.phone, "FORGED1234"),
    )
    .await
    .ok(200);
    assert_eq!(ack, json!({"ResultCode": 0, "ResultDesc": "Accepted"}));
    assert_eq!(settled(&app, &cancels, &id).await["status"], "cancelled");
    // Unknown CheckoutRequestID, and a pending payment's callback with the wrong
    // amount or phone: kept as rejected, for operators.
    callback(
        &app,
        success(
            "ws_CO_000000000000000000",
            300,
            &cancels.phone,
            "FORGED1234",
        ),
    )
    .await;
    let waits = patient(&app, &sb, Outcome::NoCallback).await;
    let pending = pay(&app, &waits, 400, "k2").await;
    let checkout2 = checkout_of(&app, &waits, &pending).await;
    callback(&app, success(&checkout2, 1, &waits.phone, "FORGED1234")).await;
    callback(&app, success(&checkout2, 400, "254711999999", "FORGED1234")).await;
    assert_eq!(
        app.get(&format!("/v1/payments/{pending}"), Some(&waits.token))
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

/// The path token is the callbacks' only secret: a success callback that has it, names
/// a real CheckoutRequestID and matches the amount and phone is still believed only
/// when Daraja's STK Push Query agrees. Here the customer never paid (the query says
/// 1037): the callback is kept as rejected (`query_disagrees`) and nothing is
/// confirmed. A genuine success, the query agreeing, confirms with the receipt.
#[actix_rt::test]
async fn a_forged_success_callback_that_darajas_query_denies_confirms_nothing() {
    for backend in eventstore::testing::BACKENDS {
        let sb = sandbox(200).await;
        let port = free_port();
        let vars = vars(&sb, port, 120);
        let Some(app) = TestApp::start_with(backend, &refs(&vars)).await else {
            continue;
        };
        let w = app.world().await;
        let request = grant(&app, &w.doctor, &w.patient, None).await;
        sb.set_outcome(&w.patient.phone, Outcome::NoCallback, None);
        let id = fee(&app, &w.doctor, &request, 2500, "k1").await;
        let checkout = checkout_of(&app, &w.patient, &id).await;
        // The sandbox's query knows the outcome once its delay has passed.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let ack = callback(
            &app,
            success(&checkout, 2500, &w.patient.phone, "FORGED0001"),
        )
        .await;
        assert_eq!(ack, json!({"ResultCode": 0, "ResultDesc": "Accepted"}));
        let p = app
            .get(&format!("/v1/payments/{id}"), Some(&w.patient.token))
            .await
            .ok(200);
        assert_eq!(p["status"], "pending", "{p}");
        assert_eq!(p["mpesa_receipt"], Value::Null);
        assert_eq!(count(&app, "PaymentConfirmed", &id).await, 0);
        assert_eq!(count(&app, "PaymasterBudgetCredited", &id).await, 0);
        assert_eq!(
            app.scalar("SELECT count(*) FROM events WHERE event_type = 'MpesaCallbackRejected'")
                .await,
            1
        );
        assert!(app.raw_events().await.contains("query_disagrees"));
        assert!(app
            .server
            .logs()
            .contains("does not confirm; kept as rejected"));
        // The real thing: the customer pays, Daraja's own callback confirms.
        let payer = patient(&app, &sb, Outcome::Success).await;
        let paid = pay(&app, &payer, 700, "k2").await;
        let p = settled(&app, &payer, &paid).await;
        assert_eq!(p["status"], "confirmed", "{p}");
        assert_eq!(p["mpesa_receipt"].as_str().unwrap().len(), 10);
        app.stop().await;
        sb.stop().await;
    }
}

/// A failure callback as Daraja posts it (no `CallbackMetadata`).
fn failure(checkout: &str, result_code: i64, result_desc: &str) -> Value {
    json!({"Body": {"stkCallback": {
        "MerchantRequestID": "1-2-3", "CheckoutRequestID": checkout,
        "ResultCode": result_code, "ResultDesc": result_desc}}})
}

/// Posts a callback, timing Daraja's acknowledgement: it stays fast whatever the
/// STK Push Query behind it does (bounded at 4 s).
async fn acknowledged(app: &TestApp, body: Value) {
    let started = Instant::now();
    let ack = callback(app, body).await;
    assert_eq!(ack, json!({"ResultCode": 0, "ResultDesc": "Accepted"}));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// A failure callback is no more trusted than a success: whoever holds the path token
/// could otherwise fail a payment the customer has made. A forged cancellation of a
/// payment Daraja's STK Push Query says was paid fails nothing: the callback is kept
/// as rejected (`query_disagrees`) and the reconciling query confirms the payment. One
/// posted while Daraja still processes the payment fails nothing either (kept as
/// `unverified`), and Daraja's own success callback confirms it with its receipt. A genuine failure, the query
/// agreeing, still settles the payment as failed, from the callback.
#[actix_rt::test]
#[ignore = "alone: run by scripts/test in its second pass, one test at a time"]
async fn a_forged_failure_callback_for_a_payment_darajas_query_says_was_paid_fails_nothing() {
    crate::support::alone();
    for backend in eventstore::testing::BACKENDS {
        let sb = sandbox(200).await;
        let port = free_port();
        // Reconciled 15 s after the push: well after the forged callbacks below, even
        // on a loaded machine.
        let vars = vars(&sb, port, 15);
        let Some(app) = TestApp::start_with(backend, &refs(&vars)).await else {
            continue;
        };
        let w = app.world().await;
        let rejected =
            || app.scalar("SELECT count(*) FROM events WHERE event_type = 'MpesaCallbackRejected'");
        // Paid, and Daraja's own callback lost: the query says paid (0).
        let request = grant(&app, &w.doctor, &w.patient, None).await;
        sb.set_outcome(&w.patient.phone, Outcome::PaidNoCallback, None);
        let id = fee(&app, &w.doctor, &request, 2500, "k1").await;
        let checkout = checkout_of(&app, &w.patient, &id).await;
        // The sandbox's query knows the outcome once its delay has passed.
        tokio::time::sleep(Duration::from_millis(300)).await;
        acknowledged(&app, failure(&checkout, 1032, "Request cancelled by user.")).await;
        let p = app
            .get(&format!("/v1/payments/{id}"), Some(&w.patient.token))
            .await
            .ok(200);
        assert_eq!(p["status"], "pending", "{p}");
        assert_eq!(count(&app, "PaymentFailed", &id).await, 0);
        assert_eq!(rejected().await, 1);
        assert!(app.raw_events().await.contains("query_disagrees"));
        assert!(app
            .server
            .logs()
            .contains("claims a failure Daraja's query does not confirm"));
        // Left to the reconciler, which settles it as Daraja says.
        let p = settled(&app, &w.patient, &id).await;
        assert_eq!(p["status"], "confirmed", "{p}");
        assert_eq!(count(&app, "PaymentReconciled", &id).await, 1);
        assert_eq!(count(&app, "PaymentConfirmed", &id).await, 1);
        assert_eq!(count(&app, "PaymentFailed", &id).await, 0);

        // Still being processed (the customer has not answered: the sandbox holds the
        // outcome until released, however slow this machine): the forged failure
        // waits, and Daraja's own success callback confirms with its receipt.
        let payer = patient(&app, &sb, Outcome::Success).await;
        sb.hold(&payer.phone);
        let paid = pay(&app, &payer, 700, "k2").await;
        let checkout = checkout_of(&app, &payer, &paid).await;
        acknowledged(&app, failure(&checkout, 1, "The balance is insufficient.")).await;
        wait_log(&app, "claims a failure that Daraja cannot confirm now").await;
        assert_eq!(count(&app, "PaymentFailed", &paid).await, 0);
        assert_eq!(
            app.get(&format!("/v1/payments/{paid}"), Some(&payer.token))
                .await
                .ok(200)["status"],
            "pending"
        );
        // Kept as an unverified callback, changing nothing.
        assert_eq!(rejected().await, 2);
        assert!(app.raw_events().await.contains("unverified"));
        sb.release(&payer.phone);
        let p = settled(&app, &payer, &paid).await;
        assert_eq!(p["status"], "confirmed", "{p}");
        assert_eq!(p["mpesa_receipt"].as_str().unwrap().len(), 10, "{p}");
        assert_eq!(count(&app, "PaymentReconciled", &paid).await, 0);
        assert_eq!(count(&app, "PaymentFailed", &paid).await, 0);
        assert_eq!(rejected().await, 2);

        // The real thing: the customer cancels, Daraja's callback and query agree.
        let cancels = patient(&app, &sb, Outcome::Cancelled).await;
        let cancelled = pay(&app, &cancels, 800, "k3").await;
        let p = settled(&app, &cancels, &cancelled).await;
        assert_eq!(p["status"], "cancelled", "{p}");
        assert_eq!(p["result_code"], 1032, "{p}");
        assert_eq!(count(&app, "PaymentFailed", &cancelled).await, 1);
        assert_eq!(count(&app, "PaymentReconciled", &cancelled).await, 0);
        assert_eq!(rejected().await, 2);
        app.stop().await;
        sb.stop().await;
    }
}

/// When Daraja's STK Push Query agrees with a callback, Daraja's own code and
/// description are recorded, never the callback's: whoever forged it would otherwise
/// choose the words the payer reads. The query cannot check a receipt, so a forged
/// success it confirms, posted before Daraja's own callback, records the forger's
/// receipt (a known limit, in docs/payments.md); a later callback with another receipt
/// is logged as a warning naming the payment only.
#[actix_rt::test]
#[ignore = "alone: run by scripts/test in its second pass, one test at a time"]
async fn a_callback_darajas_query_agrees_with_keeps_darajas_own_words() {
    crate::support::alone();
    for backend in eventstore::testing::BACKENDS {
        let sb = sandbox(200).await;
        let port = free_port();
        let vars = vars(&sb, port, 120);
        let Some(app) = TestApp::start_with(backend, &refs(&vars)).await else {
            continue;
        };
        // Timed out, Daraja's callback lost: a forged callback of the same failure,
        // with words of its own for the payer.
        let silent = patient(&app, &sb, Outcome::NoCallback).await;
        let id = pay(&app, &silent, 500, "k1").await;
        let checkout = checkout_of(&app, &silent, &id).await;
        // The sandbox's query knows the outcome once its delay has passed.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let lure = "Pay KES 500 again to 0799 000 000 for your refund";
        acknowledged(&app, failure(&checkout, 1037, lure)).await;
        let p = settled(&app, &silent, &id).await;
        assert_eq!(p["status"], "timed_out", "{p}");
        assert_eq!(p["result_code"], 1037, "{p}");
        assert_eq!(p["result_desc"], "DS timeout user cannot be reached", "{p}");
        assert_eq!(count(&app, "PaymentReconciled", &id).await, 0);
        assert!(!app.raw_events().await.contains("refund"));

        // Paid, Daraja's callback late: a forged success the query confirms records
        // its receipt; Daraja's own, coming after, is only logged.
        let payer = patient(&app, &sb, Outcome::PaidNoCallback).await;
        let paid = pay(&app, &payer, 700, "k2").await;
        let checkout = checkout_of(&app, &payer, &paid).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        acknowledged(&app, success(&checkout, 700, &payer.phone, "FORGED0003")).await;
        let p = settled(&app, &payer, &paid).await;
        assert_eq!(p["status"], "confirmed", "{p}");
        assert_eq!(p["mpesa_receipt"], "FORGED0003", "{p}");
        let warning = "names another M-Pesa receipt than the one recorded";
        assert!(!app.server.logs().contains(warning));
        // The same receipt again (Daraja's duplicate) is nothing to warn of.
        acknowledged(&app, success(&checkout, 700, &payer.phone, "FORGED0003")).await;
        acknowledged(&app, success(&checkout, 700, &payer.phone, "GENUINE001")).await;
        wait_log(&app, warning).await;
        let logs = app.server.logs();
        assert_eq!(logs.matches(warning).count(), 1, "{logs}");
        for private in ["FORGED0003", "GENUINE001", &payer.phone[3..]] {
            assert!(!logs.contains(private), "{private} in the logs");
        }
        let p = app
            .get(&format!("/v1/payments/{paid}"), Some(&payer.token))
            .await
            .ok(200);
        assert_eq!(p["mpesa_receipt"], "FORGED0003", "{p}");
        assert_eq!(count(&app, "PaymentConfirmed", &paid).await, 1);
        app.stop().await;
        sb.stop().await;
    }
}

/// Daraja rate-limiting the reconciling STK Push Query (429) means "not now", not a
/// refusal: the payment is asked about again after a pause and settled once Daraja
/// answers. A payment Daraja never tells about is never failed nor given up on, however
/// long ago it was asked for (only Daraja can say it was not paid): it stays pending,
/// and is asked about again and again.
#[actix_rt::test]
async fn a_rate_limited_query_is_asked_again_and_a_payment_never_told_of_stays_pending() {
    for backend in eventstore::testing::BACKENDS {
        let sb = sandbox(200).await;
        let port = free_port();
        let vars = vars(&sb, port, 1);
        let Some(app) = TestApp::start_with(backend, &refs(&vars)).await else {
            continue;
        };
        // Daraja's callback lost, and its query rate-limited more times than one
        // call's attempts (three).
        let silent = patient(&app, &sb, Outcome::NoCallback).await;
        sb.fail_next_queries(429, 4);
        let id = pay(&app, &silent, 500, "k1").await;
        let p = settled(&app, &silent, &id).await;
        assert_eq!(p["status"], "timed_out", "{p}");
        assert_eq!(count(&app, "PaymentReconciled", &id).await, 1);
        let logs = app.server.logs();
        assert!(
            logs.contains("STK Push Query failed; asking again later"),
            "{logs}"
        );
        assert!(!logs.contains("Daraja refuses to say"), "{logs}");

        // Daraja never answering, for a payment asked for a day ago (as far as the
        // server can tell): asked about again and again, and pending all along.
        let failed = || {
            app.server
                .logs()
                .matches("STK Push Query failed; asking again later")
                .count()
        };
        let failed_before = failed();
        let untold = patient(&app, &sb, Outcome::NoCallback).await;
        sb.fail_next_queries(429, usize::MAX);
        let id = pay(&app, &untold, 600, "k2").await;
        checkout_of(&app, &untold, &id).await;
        let day_ago = (chrono::Utc::now() - chrono::Duration::hours(25))
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let tampered = app
            .tamper(&format!(
                "UPDATE rm_payments SET requested_at = '{day_ago}' WHERE payment_id = '{id}'"
            ))
            .await;
        assert_eq!(tampered, 1);
        let queried = format!(
            "SELECT COALESCE(MAX(attempts), 0) FROM mpesa_queries WHERE payment_id = '{id}'"
        );
        let queries = || app.scalar(&queried);
        let deadline = Instant::now() + Duration::from_secs(45);
        while queries().await < 3 {
            assert!(Instant::now() < deadline, "{}", app.server.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let p = app
            .get(&format!("/v1/payments/{id}"), Some(&untold.token))
            .await
            .ok(200);
        assert_eq!(p["status"], "pending", "{p}");
        assert_eq!(p["result_code"], Value::Null, "{p}");
        assert_eq!(count(&app, "PaymentFailed", &id).await, 0);
        assert_eq!(count(&app, "PaymentReconciled", &id).await, 0);
        assert!(failed() >= failed_before + 3, "{}", app.server.logs());
        app.stop().await;
        sb.stop().await;
    }
}

/// A callback that never comes: the reconciler asks Daraja (STK Push Query) and settles
/// the payment (`PaymentReconciled`). Tokens that expire are fetched again. A success
/// callback that cannot be checked with Daraja now (the query fails) confirms nothing
/// yet: it is kept as rejected (`unverified`) rather than lost, the payment stays
/// pending, and the reconciler settles it.
#[actix_rt::test]
async fn a_missing_callback_is_reconciled_and_expired_tokens_are_refreshed() {
    let sb = sandbox(300).await;
    let port = free_port();
    let vars = vars(&sb, port, 3);
    let Some(app) = TestApp::start_with(Backend::Sqlite, &refs(&vars)).await else {
        return;
    };
    let silent = patient(&app, &sb, Outcome::NoCallback).await;
    let id = pay(&app, &silent, 500, "k1").await;
    let p = settled(&app, &silent, &id).await;
    assert_eq!(p["status"], "timed_out", "{p}");
    assert_eq!(count(&app, "PaymentReconciled", &id).await, 1);
    // Its callback, late after all: acknowledged, logged, nothing changes.
    let checkout = p["checkout_request_id"].as_str().unwrap();
    callback(&app, success(checkout, 500, &silent.phone, "LATE000001")).await;
    assert_eq!(settled(&app, &silent, &id).await["status"], "timed_out");
    assert_eq!(count(&app, "PaymentConfirmed", &id).await, 0);
    assert!(app
        .server
        .logs()
        .contains("duplicate or late STK callback for a settled payment"));
    // Paid, its callback comes, but Daraja cannot be asked about it right then.
    let unsure = patient(&app, &sb, Outcome::PaidNoCallback).await;
    let id = pay(&app, &unsure, 550, "k3").await;
    let checkout = checkout_of(&app, &unsure, &id).await;
    sb.fail_next(503, 1);
    callback(&app, success(&checkout, 550, &unsure.phone, "UNSURE0001")).await;
    wait_log(
        &app,
        "Daraja cannot confirm now; kept as rejected (unverified), the payment stays pending",
    )
    .await;
    let p = app
        .get(&format!("/v1/payments/{id}"), Some(&unsure.token))
        .await
        .ok(200);
    assert_eq!(p["status"], "pending", "{p}");
    // Kept, not lost: on record as an unverified callback, with its receipt.
    assert_eq!(
        app.scalar("SELECT count(*) FROM events WHERE event_type = 'MpesaCallbackRejected'")
            .await,
        1
    );
    let raw = app.raw_events().await;
    assert!(raw.contains("unverified"));
    assert!(raw.contains("UNSURE0001"));
    assert!(!app.server.logs().contains("UNSURE0001"));
    let p = settled(&app, &unsure, &id).await;
    assert_eq!(p["status"], "confirmed", "{p}");
    assert_eq!(count(&app, "PaymentReconciled", &id).await, 1);
    // Tokens expire: the next push fetches a new one and goes through.
    let tokens = sb.token_requests();
    sb.expire_tokens();
    let fresh = patient(&app, &sb, Outcome::Success).await;
    let id2 = pay(&app, &fresh, 600, "k2").await;
    assert_eq!(settled(&app, &fresh, &id2).await["status"], "confirmed");
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
    let early = pay(&app, &w.patient, 650, "k0").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        app.get(&format!("/v1/payments/{early}"), Some(&w.patient.token))
            .await
            .ok(200)["status"],
        "pending"
    );
    // Ready all the same, with M-Pesa reported down and the push waiting.
    let deadline = Instant::now() + Duration::from_secs(10);
    let down = loop {
        let mpesa = app.get("/readyz", None).await.ok(200)["integrations"]["mpesa"].clone();
        if mpesa["status"] == "down" || Instant::now() > deadline {
            break mpesa;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (&down["status"], &down["lag"]),
        (&"down".into(), &1.into()),
        "{down}"
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
    let id = pay(&app, &w.patient, 700, "k1").await;
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
    let fine = json!({"purpose": "access_fee", "amount_kes": 10});
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
    let id = pay(&app, &w.patient, 800, "k1").await;
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

/// An M-Pesa prompt reaches only the patient's own registered phone, and only from
/// someone the patient deals with: a fee from a verified doctor, for themself, under an
/// approved access request still in force; a patient's payment to a doctor they
/// granted such access, or to their own account. Refusals record nothing and push
/// nothing. (The probe of issue 16: an unverified doctor sent a KES 250,000 "fee" for
/// another doctor to a typed number, and got 202.)
#[actix_rt::test]
async fn prompts_go_only_to_the_patients_own_phone_from_someone_they_granted() {
    for backend in eventstore::testing::BACKENDS {
        prompts_only_to_granting_patients(backend).await;
    }
}

async fn prompts_only_to_granting_patients(backend: Backend) {
    let sb = sandbox(200).await;
    let port = free_port();
    let vars = vars(&sb, port, 120);
    let Some(app) = TestApp::start_with(backend, &refs(&vars)).await else {
        return;
    };
    let w = app.world().await;
    let ask = |who: &Party, key: &str, body: Value| {
        let token = who.token.clone();
        let key = key.to_owned();
        let app = &app;
        async move {
            app.post_keyed("/v1/payments", Some(&token), Some(&key), body)
                .await
        }
    };
    let stranger = format!("0{}", &app.phone()[3..]);
    let approved = grant(&app, &w.doctor, &w.patient, None).await;
    let pending = app
        .request_access(&w.doctor, &w.other_patient.id, &["lab"])
        .await
        .ok(201)["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let revoked = grant(&app, &w.doctor, &w.other_patient, None).await;
    app.post_empty(
        &format!("/v1/access-requests/{revoked}/revocation"),
        Some(&w.other_patient.token),
    )
    .await
    .ok(200);
    let soon = (chrono::Utc::now() + chrono::Duration::seconds(2)).to_rfc3339();
    let expiring = grant(&app, &w.other_doctor, &w.patient, Some(&soon)).await;
    let before = app.event_count().await;

    // The probe itself: an unverified doctor, another doctor's id, a typed number.
    ask(
        &w.unverified_doctor,
        "u1",
        json!({"purpose": "consultation_fee", "amount_kes": 250000,
               "phone": stranger, "doctor_id": w.doctor.id}),
    )
    .await
    .problem(403, "doctor_not_verified");
    // A verified doctor with no request named, or under one that is not approved,
    // revoked, or not theirs.
    ask(
        &w.doctor,
        "d1",
        json!({"purpose": "consultation_fee", "amount_kes": 500, "doctor_id": w.doctor.id}),
    )
    .await
    .problem(403, "no_grant");
    for (key, request) in [("d2", &pending), ("d3", &revoked)] {
        ask(
            &w.doctor,
            key,
            json!({"purpose": "consultation_fee", "amount_kes": 500, "access_request_id": request}),
        )
        .await
        .problem(403, "no_grant");
    }
    let p = ask(
        &w.doctor,
        "d4",
        json!({"purpose": "consultation_fee", "amount_kes": 500, "access_request_id": expiring}),
    )
    .await
    .problem(422, "invalid_request");
    assert_eq!(p["field"], "access_request_id");
    // Under an approved request, but for another doctor, or to a number that is not
    // the patient's.
    ask(
        &w.doctor,
        "d5",
        json!({"purpose": "consultation_fee", "amount_kes": 500,
               "access_request_id": approved, "doctor_id": w.other_doctor.id}),
    )
    .await
    .problem(403, "fee_for_another_doctor");
    // A doctor sends no number at all, neither another nor the patient's own (which
    // would tell the doctor whether a number is the patient's).
    let own = format!("0{}", &w.patient.phone[3..]);
    for (key, phone) in [("d6", &stranger), ("d7", &own)] {
        let p = ask(
            &w.doctor,
            key,
            json!({"purpose": "consultation_fee", "amount_kes": 500,
                   "access_request_id": approved, "phone": phone}),
        )
        .await
        .problem(422, "invalid_request");
        assert_eq!(p["field"], "phone");
    }
    // A patient naming a doctor they granted nothing, or a request not in force, or
    // a number that is not theirs.
    ask(
        &w.other_patient,
        "p1",
        json!({"purpose": "consultation_fee", "amount_kes": 500, "doctor_id": w.other_doctor.id}),
    )
    .await
    .problem(403, "doctor_not_granted");
    for (key, request) in [("p2", &pending), ("p3", &revoked)] {
        ask(
            &w.other_patient,
            key,
            json!({"purpose": "access_fee", "amount_kes": 500, "access_request_id": request}),
        )
        .await
        .problem(403, "doctor_not_granted");
    }
    ask(
        &w.patient,
        "p4",
        json!({"purpose": "consultation_fee", "amount_kes": 500, "phone": stranger}),
    )
    .await
    .problem(422, "phone_not_registered");
    // Approved, then expired (before the expiry sweep has recorded it): no more.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    ask(
        &w.other_doctor,
        "o1",
        json!({"purpose": "consultation_fee", "amount_kes": 500, "access_request_id": expiring}),
    )
    .await
    .problem(403, "no_grant");
    ask(
        &w.patient,
        "p5",
        json!({"purpose": "consultation_fee", "amount_kes": 500, "access_request_id": expiring}),
    )
    .await
    .problem(403, "doctor_not_granted");
    // Nothing recorded (the expiry sweep may have recorded the expiry meanwhile),
    // nothing pushed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        app.scalar("SELECT count(*) FROM events WHERE aggregate_type = 'payment'")
            .await,
        0
    );
    assert_eq!(
        app.event_count().await - before,
        app.scalar("SELECT count(*) FROM events WHERE event_type = 'AccessExpired'")
            .await
    );
    assert!(sb.pushes().is_empty());

    // What is allowed: the doctor's fee under the approved request; the patient paying
    // the doctor they granted (named by id alone, their own number in any spelling);
    // the patient paying their own account.
    let by_doctor = ask(
        &w.doctor,
        "ok1",
        json!({"purpose": "consultation_fee", "amount_kes": 1500,
               "access_request_id": approved, "doctor_id": w.doctor.id}),
    )
    .await
    .ok(202)["payment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let to_doctor = ask(
        &w.patient,
        "ok2",
        json!({"purpose": "consultation_fee", "amount_kes": 1600, "doctor_id": w.doctor.id,
               "phone": own}),
    )
    .await
    .ok(202)["payment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let own_account = pay(&app, &w.patient, 1700, "ok3").await;
    for (id, doctor) in [
        (&by_doctor, Some(&w.doctor.id)),
        (&to_doctor, Some(&w.doctor.id)),
        (&own_account, None),
    ] {
        let p = settled(&app, &w.patient, id).await;
        assert_eq!(p["status"], "confirmed", "{p}");
        assert_eq!(p["patient_id"], w.patient.id.as_str());
        assert_eq!(p["doctor_id"].as_str(), doctor.map(String::as_str), "{p}");
    }
    let p = settled(&app, &w.patient, &by_doctor).await;
    assert_eq!(p["access_request_id"], approved.as_str());
    let p = settled(&app, &w.patient, &to_doctor).await;
    assert_eq!(p["access_request_id"], approved.as_str());
    // Every prompt went to the patient's registered phone, and all three are in the
    // patient's payments; the doctor's list has the two that concern them.
    assert!(sb.pushes().iter().all(|p| p.phone == w.patient.phone));
    assert_eq!(sb.pushes().len(), 3);
    assert_eq!(
        listed(&app, &w.patient).await,
        vec![by_doctor.clone(), to_doctor.clone(), own_account]
    );
    let theirs = app
        .get(
            &format!("/v1/doctors/{}/payments", w.doctor.id),
            Some(&w.doctor.token),
        )
        .await
        .ok(200);
    let theirs: Vec<&str> = theirs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["payment_id"].as_str().unwrap())
        .collect();
    assert_eq!(theirs, vec![by_doctor.as_str(), to_doctor.as_str()]);
    app.stop().await;
    sb.stop().await;
}

/// POSTs a payment to the server at `base` (one of several instances).
async fn ask_at(
    app: &TestApp,
    base: &str,
    who: &Party,
    key: &str,
    body: Value,
) -> (u16, Value, Option<String>) {
    let response = app
        .http
        .post(format!("{base}/v1/payments"))
        .bearer_auth(&who.token)
        .header("idempotency-key", key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status, response.json().await.unwrap(), retry_after)
}

/// Prompts are limited per patient and per doctor (429 with Retry-After), counted in
/// the store: on PostgreSQL two servers on one database share the count. A retry with
/// the same Idempotency-Key, and a refused request, count nothing.
#[actix_rt::test]
async fn prompts_are_limited_per_patient_and_per_doctor_across_instances() {
    for backend in eventstore::testing::BACKENDS {
        prompt_limits(backend).await;
    }
}

async fn prompt_limits(backend: Backend) {
    let sb = sandbox(200).await;
    let port = free_port();
    let mut vars = vars(&sb, port, 120);
    vars.push(("AFYA_PROMPTS_PER_PATIENT".into(), "2".into()));
    vars.push(("AFYA_PROMPTS_PER_DOCTOR".into(), "3".into()));
    let Some(app) = TestApp::start_with(backend, &refs(&vars)).await else {
        return;
    };
    // The other instance: a second server on the same PostgreSQL database (its own
    // address); on SQLite the one server.
    let second = match backend {
        Backend::Postgres => {
            let others: Vec<(String, String)> = vars
                .iter()
                .filter(|(k, _)| k != "AFYA_LISTEN")
                .cloned()
                .collect();
            Some(app.env.serve_with(&refs(&others)))
        }
        Backend::Sqlite => None,
    };
    let one = app.server.base.clone();
    let two = second.as_ref().map_or(one.clone(), |s| s.base.clone());
    let w = app.world().await;
    let own = |amount: u64| json!({"purpose": "consultation_fee", "amount_kes": amount});

    // Per patient: a refused request first (counts nothing), two prompts on two
    // instances, the first one's retry (still 202, the same payment), then 429.
    let stranger = format!("0{}", &app.phone()[3..]);
    let (status, _, _) = ask_at(
        &app,
        &one,
        &w.patient,
        "r0",
        json!({"purpose": "consultation_fee", "amount_kes": 10, "phone": stranger}),
    )
    .await;
    assert_eq!(status, 422);
    let (status, first, _) = ask_at(&app, &one, &w.patient, "r1", own(10)).await;
    assert_eq!(status, 202, "{first}");
    let (status, body, _) = ask_at(&app, &two, &w.patient, "r2", own(11)).await;
    assert_eq!(status, 202, "{body}");
    let (status, again, _) = ask_at(&app, &two, &w.patient, "r1", own(10)).await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(again["payment_id"], first["payment_id"]);
    let (status, body, retry_after) = ask_at(&app, &one, &w.patient, "r3", own(12)).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], "too_many_attempts");
    let wait: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!((1..=3600).contains(&wait), "{wait}");
    // Doctors' fees of this patient count against the patient too.
    let request = grant(&app, &w.doctor, &w.patient, None).await;
    let (status, body, _) = ask_at(
        &app,
        &two,
        &w.doctor,
        "f0",
        json!({"purpose": "consultation_fee", "amount_kes": 13, "access_request_id": request}),
    )
    .await;
    assert_eq!(status, 429, "{body}");

    // Per doctor: fees of three patients (none at their own limit), then the fourth
    // patient's is refused, while that patient may still pay their own account.
    let mut patients = Vec::new();
    for _ in 0..4 {
        let p = patient(&app, &sb, Outcome::Success).await;
        let request = grant(&app, &w.other_doctor, &p, None).await;
        patients.push((p, request));
    }
    for (i, (_, request)) in patients.iter().enumerate() {
        let base = if i % 2 == 0 { &one } else { &two };
        let (status, body, retry_after) = ask_at(
            &app,
            base,
            &w.other_doctor,
            &format!("o{i}"),
            json!({"purpose": "consultation_fee", "amount_kes": 20 + i, "access_request_id": request}),
        )
        .await;
        if i < 3 {
            assert_eq!(status, 202, "{body}");
        } else {
            assert_eq!(status, 429, "{body}");
            assert!(retry_after.is_some());
        }
    }
    let (status, body, _) = ask_at(&app, &two, &patients[3].0, "own", own(30)).await;
    assert_eq!(status, 202, "{body}");
    // Refused prompts were never pushed: 2 + 3 + 1.
    let deadline = Instant::now() + Duration::from_secs(20);
    while sb.pushes().len() < 6 {
        assert!(Instant::now() < deadline, "{}", app.server.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sb.pushes().len(), 6);
    // Stopped by dropping it (a standby instance's graceful stop is not what this
    // test is about).
    drop(second);
    app.stop().await;
    sb.stop().await;
}
