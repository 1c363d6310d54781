//! The Daraja sandbox over real HTTP: a sandbox and a callback receiver per test, each
//! on a free port of 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, HttpResponse, HttpServer};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use mpesa_adapter::daraja::{
    Daraja, DarajaConfig, DarajaError, StkPush, StkStatus, TransactionType,
};
use mpesa_adapter::sandbox::{Outcome, Sandbox, SandboxConfig};
use serde_json::{json, Value};

/// Safaricom's published example: shortcode 174379, the sandbox passkey, this timestamp.
const EXAMPLE_TIMESTAMP: &str = "20160216165627";
const EXAMPLE_PASSWORD: &str = "MTc0Mzc5YmZiMjc5ZjlhYTliZGJjZjE1OGU5N2RkNzFhNDY3Y2QyZTBjODkzMDU5YjEwZjc4ZTZiNzJhZGExZWQyYzkxOTIwMTYwMjE2MTY1NjI3";
const PHONE: &str = "254708374149";
const DELAY: Duration = Duration::from_millis(100);

struct TestApp {
    sandbox: Sandbox,
    receiver: Receiver,
    http: reqwest::Client,
}

impl TestApp {
    async fn spawn() -> TestApp {
        TestApp::spawn_with(SandboxConfig {
            callback_delay: DELAY,
            ..SandboxConfig::public_sandbox()
        })
        .await
    }

    async fn spawn_with(config: SandboxConfig) -> TestApp {
        TestApp {
            sandbox: Sandbox::start(config).await.unwrap(),
            receiver: Receiver::start(),
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.sandbox.url)
    }

    async fn oauth(&self, credentials: Option<(&str, &str)>, query: &str) -> reqwest::Response {
        let mut request = self
            .http
            .get(self.url(&format!("/oauth/v1/generate{query}")));
        if let Some((key, secret)) = credentials {
            request = request.basic_auth(key, Some(secret));
        }
        request.send().await.unwrap()
    }

    async fn token(&self) -> String {
        let answer = self
            .oauth(
                Some(("sandbox-key", "sandbox-secret")),
                "?grant_type=client_credentials",
            )
            .await;
        assert_eq!(answer.status(), 200);
        let body: Value = answer.json().await.unwrap();
        body["access_token"].as_str().unwrap().to_owned()
    }

    async fn post(&self, path: &str, token: &str, body: &Value) -> (u16, Value) {
        let answer = self
            .http
            .post(self.url(path))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap();
        (answer.status().as_u16(), answer.json().await.unwrap())
    }

    async fn push(&self, token: &str, body: &Value) -> (u16, Value) {
        self.post("/mpesa/stkpush/v1/processrequest", token, body)
            .await
    }

    async fn query(&self, token: &str, checkout_request_id: &str) -> (u16, Value) {
        let body = json!({
            "BusinessShortCode": "174379",
            "Password": EXAMPLE_PASSWORD,
            "Timestamp": EXAMPLE_TIMESTAMP,
            "CheckoutRequestID": checkout_request_id,
        });
        self.post("/mpesa/stkpushquery/v1/query", token, &body)
            .await
    }

    /// A push to `phone` that Daraja accepts, its callback to the receiver.
    fn push_body(&self, phone: &str) -> Value {
        json!({
            "BusinessShortCode": 174379,
            "Password": EXAMPLE_PASSWORD,
            "Timestamp": EXAMPLE_TIMESTAMP,
            "TransactionType": "CustomerPayBillOnline",
            "Amount": 150,
            "PartyA": phone,
            "PartyB": 174379,
            "PhoneNumber": phone,
            "CallBackURL": self.receiver.url,
            "AccountReference": "INV-0042",
            "TransactionDesc": "Consultation",
        })
    }

    /// The platform's Daraja client against this sandbox: three attempts per call, a
    /// short pause between them.
    fn client(&self) -> Daraja {
        let c = SandboxConfig::public_sandbox();
        Daraja::new(DarajaConfig {
            base_url: self.sandbox.url.clone(),
            consumer_key: c.consumer_key,
            consumer_secret: c.consumer_secret,
            shortcode: c.shortcode,
            till_number: None,
            passkey: c.passkey,
            callback_url: self.receiver.url.clone(),
            transaction_type: TransactionType::PayBill,
            timeout: Duration::from_secs(5),
            attempts: 3,
            backoff: Duration::from_millis(20),
        })
        .unwrap()
    }

    /// Pushes to `phone` and answers the CheckoutRequestID.
    async fn accepted_push(&self, token: &str, phone: &str) -> String {
        let (status, body) = self.push(token, &self.push_body(phone)).await;
        assert_eq!(status, 200, "{body}");
        body["CheckoutRequestID"].as_str().unwrap().to_owned()
    }
}

/// What the receiver got: the Content-Type and the body, as sent.
type Posts = Arc<Mutex<Vec<(String, web::Bytes)>>>;

/// An actix-web server that keeps every body posted to it and answers as an
/// integrator would.
struct Receiver {
    url: String,
    posts: Posts,
}

impl Receiver {
    fn start() -> Receiver {
        let posts = Posts::default();
        let sink = web::Data::new(posts.clone());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/mpesa/callback", listener.local_addr().unwrap());
        let server = HttpServer::new(move || {
            actix_web::App::new().app_data(sink.clone()).route(
                "/mpesa/callback",
                web::post().to(
                    |sink: web::Data<Posts>, req: actix_web::HttpRequest, body: web::Bytes| async move {
                        let content_type = req
                            .headers()
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        sink.lock().unwrap().push((content_type, body));
                        HttpResponse::Ok().json(json!({"ResultCode": 0, "ResultDesc": "Accepted"}))
                    },
                ),
            )
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        tokio::spawn(server);
        Receiver { url, posts }
    }

    /// The callbacks so far, each checked to be JSON sent as JSON.
    fn received(&self) -> Vec<Value> {
        let posts = self.posts.lock().unwrap().clone();
        posts
            .iter()
            .map(|(content_type, body)| {
                assert_eq!(content_type, "application/json");
                serde_json::from_slice(body).unwrap()
            })
            .collect()
    }

    /// The callbacks once there are `count` of them (failing after two seconds).
    async fn wait_for(&self, count: usize) -> Vec<Value> {
        for _ in 0..100 {
            let received = self.received();
            if received.len() >= count {
                return received;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{} callbacks, expected {count}", self.received().len());
    }
}

fn item<'a>(callback: &'a Value, name: &str) -> &'a Value {
    callback["Body"]["stkCallback"]["CallbackMetadata"]["Item"]
        .as_array()
        .unwrap()
        .iter()
        .find(|item| item["Name"] == name)
        .unwrap_or_else(|| panic!("no {name} item in {callback}"))
}

fn is_daraja_error(body: &Value, code: &str, message: &str) -> bool {
    body["errorCode"] == code
        && body["errorMessage"] == message
        && body["requestId"].as_str().is_some_and(|id| !id.is_empty())
}

#[test]
fn the_published_example_password_is_base64_of_shortcode_passkey_and_timestamp() {
    let config = SandboxConfig::public_sandbox();
    let encoded = STANDARD.encode(format!(
        "{}{}{EXAMPLE_TIMESTAMP}",
        config.shortcode, config.passkey
    ));
    assert_eq!(encoded, EXAMPLE_PASSWORD);
}

#[test]
fn outcomes_parse_from_their_names() {
    let names = [
        ("success", Outcome::Success),
        ("1032", Outcome::Cancelled),
        ("1037", Outcome::Timeout),
        ("2001", Outcome::WrongPin),
        ("1", Outcome::InsufficientFunds),
        ("no_callback", Outcome::NoCallback),
        ("duplicate", Outcome::Duplicate),
    ];
    for (name, outcome) in names {
        assert_eq!(name.parse::<Outcome>().unwrap(), outcome);
        assert_eq!(outcome.as_str(), name);
    }
    assert!("1033".parse::<Outcome>().is_err());
}

#[tokio::test]
async fn oauth_issues_a_token_whose_expires_in_is_a_string() {
    let app = TestApp::spawn().await;
    let answer = app
        .oauth(
            Some(("sandbox-key", "sandbox-secret")),
            "?grant_type=client_credentials",
        )
        .await;
    assert_eq!(answer.status(), 200);
    let body: Value = answer.json().await.unwrap();
    assert!(body["access_token"].as_str().unwrap().len() >= 28);
    assert_eq!(body["expires_in"], "3599");
    assert_eq!(app.sandbox.token_requests(), 1);
}

#[tokio::test]
async fn oauth_refuses_wrong_credentials_and_a_wrong_grant_type() {
    let app = TestApp::spawn().await;
    let grant = "?grant_type=client_credentials";
    for credentials in [
        None,
        Some(("sandbox-key", "wrong")),
        Some(("other", "sandbox-secret")),
    ] {
        let answer = app.oauth(credentials, grant).await;
        assert_eq!(answer.status(), 400);
        let body: Value = answer.json().await.unwrap();
        assert!(
            is_daraja_error(&body, "400.008.01", "Invalid Authentication passed"),
            "{body}"
        );
    }
    for query in ["", "?grant_type=password"] {
        let answer = app
            .oauth(Some(("sandbox-key", "sandbox-secret")), query)
            .await;
        assert_eq!(answer.status(), 400);
        let body: Value = answer.json().await.unwrap();
        assert!(
            is_daraja_error(&body, "400.008.02", "Invalid grant type passed"),
            "{body}"
        );
    }
    assert_eq!(app.sandbox.token_requests(), 0);
}

#[tokio::test]
async fn a_push_without_a_valid_token_is_refused_with_401() {
    let app = TestApp::spawn().await;
    let body = app.push_body(PHONE);
    let answer = app
        .http
        .post(app.url("/mpesa/stkpush/v1/processrequest"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 401);
    let (status, answer) = app.push("not-a-token", &body).await;
    assert_eq!(status, 401);
    assert!(
        is_daraja_error(&answer, "404.001.03", "Invalid Access Token"),
        "{answer}"
    );

    let token = app.token().await;
    app.sandbox.expire_tokens();
    let (status, answer) = app.push(&token, &body).await;
    assert_eq!(status, 401);
    assert!(
        is_daraja_error(&answer, "404.001.03", "Invalid Access Token"),
        "{answer}"
    );
    // A fresh token works again.
    let token = app.token().await;
    assert_eq!(app.push(&token, &body).await.0, 200);
}

#[tokio::test]
async fn a_token_stops_working_after_its_ttl() {
    let app = TestApp::spawn_with(SandboxConfig {
        token_ttl: Duration::from_millis(300),
        ..SandboxConfig::public_sandbox()
    })
    .await;
    let token = app.token().await;
    let (status, _) = app.query(&token, "ws_CO_unknown").await;
    assert_eq!(status, 400);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, body) = app.query(&token, "ws_CO_unknown").await;
    assert_eq!(status, 401, "{body}");
}

#[tokio::test]
async fn the_published_example_push_is_accepted_and_recorded() {
    let app = TestApp::spawn().await;
    let token = app.token().await;
    let (status, body) = app.push(&token, &app.push_body(PHONE)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ResponseCode"], "0");
    assert_eq!(
        body["ResponseDescription"],
        "Success. Request accepted for processing"
    );
    assert_eq!(
        body["CustomerMessage"],
        "Success. Request accepted for processing"
    );
    let merchant = body["MerchantRequestID"].as_str().unwrap();
    let parts: Vec<&str> = merchant.split('-').collect();
    assert_eq!(parts.len(), 3, "{merchant}");
    assert!(parts
        .iter()
        .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())));
    let checkout = body["CheckoutRequestID"].as_str().unwrap();
    let digits = checkout.strip_prefix("ws_CO_").unwrap();
    assert!(digits.len() > 14 && digits.bytes().all(|b| b.is_ascii_digit()));

    let pushes = app.sandbox.pushes();
    assert_eq!(pushes.len(), 1);
    let push = &pushes[0];
    assert_eq!(push.checkout_request_id, checkout);
    assert_eq!(push.merchant_request_id, merchant);
    assert_eq!(push.amount, 150);
    assert_eq!(push.phone, PHONE);
    assert_eq!(push.account_reference, "INV-0042");
    assert_eq!(push.callback_url, app.receiver.url);
    assert_eq!(push.transaction_type, "CustomerPayBillOnline");
}

#[tokio::test]
async fn numbers_are_accepted_as_strings_too() {
    let app = TestApp::spawn().await;
    let token = app.token().await;
    let mut body = app.push_body(PHONE);
    body["BusinessShortCode"] = json!("174379");
    body["Amount"] = json!("1");
    body["PartyB"] = json!("174379");
    body["PartyA"] = json!(254_708_374_149_u64);
    body["PhoneNumber"] = json!(254_708_374_149_u64);
    body["TransactionType"] = json!("CustomerBuyGoodsOnline");
    let (status, answer) = app.push(&token, &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(app.sandbox.pushes()[0].amount, 1);
}

#[tokio::test]
async fn each_invalid_field_is_refused_by_name() {
    let app = TestApp::spawn().await;
    let token = app.token().await;
    let other_password = STANDARD.encode("174379wrongpasskey20160216165627");
    let cases: Vec<(&str, Value, &str)> = vec![
        ("BusinessShortCode", json!("600000"), "BusinessShortCode"),
        ("Timestamp", json!("2016021616562"), "Timestamp"),
        ("Timestamp", json!("20161316165627"), "Timestamp"),
        ("Password", json!(other_password), "Password"),
        ("Password", json!(""), "Password"),
        (
            "TransactionType",
            json!("BusinessPayment"),
            "TransactionType",
        ),
        ("Amount", json!(0), "Amount"),
        ("Amount", json!(1.5), "Amount"),
        ("Amount", json!("ten"), "Amount"),
        ("PartyA", json!("0708374149"), "PartyA"),
        ("PhoneNumber", json!("254808374149"), "PhoneNumber"),
        ("PhoneNumber", json!("2547083741490"), "PhoneNumber"),
        ("CallBackURL", json!("ftp://example.com/cb"), "CallBackURL"),
        ("CallBackURL", json!("not a url"), "CallBackURL"),
        ("AccountReference", json!(""), "AccountReference"),
        (
            "AccountReference",
            json!("ABCDEFGHIJKLM"),
            "AccountReference",
        ),
        (
            "TransactionDesc",
            json!("ABCDEFGHIJKLMN"),
            "TransactionDesc",
        ),
    ];
    for (field, value, named) in cases {
        let mut body = app.push_body(PHONE);
        body[field] = value.clone();
        let (status, answer) = app.push(&token, &body).await;
        assert_eq!(status, 400, "{field} = {value}: {answer}");
        assert!(
            is_daraja_error(
                &answer,
                "400.002.02",
                &format!("Bad Request - Invalid {named}")
            ),
            "{field} = {value}: {answer}"
        );
    }
    let answer = app
        .http
        .post(app.url("/mpesa/stkpush/v1/processrequest"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{\"BusinessShortCode\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 400);
    let answer: Value = answer.json().await.unwrap();
    assert!(
        is_daraja_error(&answer, "400.002.02", "Bad Request - Invalid JSON"),
        "{answer}"
    );
    // Limits are inclusive.
    let mut body = app.push_body(PHONE);
    body["AccountReference"] = json!("ABCDEFGHIJKL");
    body["TransactionDesc"] = json!("ABCDEFGHIJKLM");
    assert_eq!(app.push(&token, &body).await.0, 200);
    assert_eq!(app.sandbox.pushes().len(), 1);
}

#[tokio::test]
async fn a_body_over_64_kib_is_refused() {
    let app = TestApp::spawn().await;
    let token = app.token().await;
    let mut body = app.push_body(PHONE);
    body["Padding"] = json!("x".repeat(70 * 1024));
    let (status, _) = app.push(&token, &body).await;
    assert_eq!(status, 413);
    assert!(app.sandbox.pushes().is_empty());
}

#[tokio::test]
async fn a_successful_push_delivers_the_success_callback() {
    let app = TestApp::spawn().await;
    let token = app.token().await;
    let checkout = app.accepted_push(&token, PHONE).await;
    let received = app.receiver.wait_for(1).await;
    let callback = &received[0];
    let stk = &callback["Body"]["stkCallback"];
    assert_eq!(stk["CheckoutRequestID"], checkout.as_str());
    assert_eq!(
        stk["MerchantRequestID"],
        app.sandbox.pushes()[0].merchant_request_id.as_str()
    );
    assert_eq!(stk["ResultCode"], json!(0));
    assert_eq!(
        stk["ResultDesc"],
        "The service request is processed successfully."
    );
    assert_eq!(item(callback, "Amount")["Value"], json!(150));
    let receipt = item(callback, "MpesaReceiptNumber")["Value"]
        .as_str()
        .unwrap();
    assert_eq!(receipt.len(), 10);
    assert!(receipt
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()));
    assert!(item(callback, "Balance").get("Value").is_none());
    let date = item(callback, "TransactionDate")["Value"].as_u64().unwrap();
    let date = chrono::NaiveDateTime::parse_from_str(&date.to_string(), "%Y%m%d%H%M%S").unwrap();
    let nairobi = chrono::Utc::now().naive_utc() + chrono::TimeDelta::hours(3);
    let skew = (nairobi - date).num_seconds().abs();
    assert!(skew < 60, "TransactionDate is {skew} s from Nairobi time");
    assert_eq!(
        item(callback, "PhoneNumber")["Value"],
        json!(254_708_374_149_u64)
    );
}

#[tokio::test]
async fn each_failure_outcome_delivers_its_result_code_without_metadata() {
    let app = TestApp::spawn().await;
    let token = app.token().await;
    let failures = [
        (
            "254700000001",
            Outcome::Cancelled,
            1032,
            "Request cancelled by user",
        ),
        (
            "254700000002",
            Outcome::Timeout,
            1037,
            "DS timeout user cannot be reached",
        ),
        (
            "254700000003",
            Outcome::WrongPin,
            2001,
            "The initiator information is invalid.",
        ),
        (
            "254100000004",
            Outcome::InsufficientFunds,
            1,
            "The balance is insufficient for the transaction.",
        ),
    ];
    for (phone, outcome, _, _) in failures {
        app.sandbox.set_outcome(phone, outcome, None);
        app.accepted_push(&token, phone).await;
    }
    let received = app.receiver.wait_for(failures.len()).await;
    for (index, (_, _, code, description)) in failures.iter().enumerate() {
        let checkout = &app.sandbox.pushes()[index].checkout_request_id;
        let stk = received
            .iter()
            .map(|c| &c["Body"]["stkCallback"])
            .find(|stk| stk["CheckoutRequestID"] == checkout.as_str())
            .unwrap();
        assert_eq!(stk["ResultCode"], json!(code));
        assert_eq!(stk["ResultDesc"], *description);
        assert!(stk.get("CallbackMetadata").is_none(), "{stk}");
    }
}

#[tokio::test]
async fn a_duplicate_outcome_delivers_the_same_success_twice() {
    let app = TestApp::spawn().await;
    let token = app.token().await;
    app.sandbox.set_outcome(PHONE, Outcome::Duplicate, None);
    app.accepted_push(&token, PHONE).await;
    let received = app.receiver.wait_for(2).await;
    assert_eq!(received[0], received[1]);
    assert_eq!(received[0]["Body"]["stkCallback"]["ResultCode"], json!(0));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(app.receiver.received().len(), 2);
}

#[tokio::test]
async fn no_callback_delivers_nothing_and_queries_as_a_timeout() {
    let app = TestApp::spawn().await;
    let token = app.token().await;
    app.sandbox
        .set_outcome(PHONE, Outcome::NoCallback, Some(Duration::from_millis(200)));
    let checkout = app.accepted_push(&token, PHONE).await;
    let (status, body) = app.query(&token, &checkout).await;
    assert_eq!(status, 500);
    assert!(
        is_daraja_error(&body, "500.001.1001", "The transaction is being processed"),
        "{body}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(app.receiver.received().is_empty());
    let (status, body) = app.query(&token, &checkout).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ResultCode"], "1037");
}

#[tokio::test]
async fn a_query_answers_processing_then_the_result_as_a_string() {
    let app = TestApp::spawn().await;
    let token = app.token().await;
    app.sandbox
        .set_outcome(PHONE, Outcome::Success, Some(Duration::from_millis(300)));
    app.sandbox
        .set_outcome("254711111111", Outcome::Cancelled, None);
    let paid = app.accepted_push(&token, PHONE).await;
    let cancelled = app.accepted_push(&token, "254711111111").await;
    let (status, body) = app.query(&token, &paid).await;
    assert_eq!(status, 500);
    assert_eq!(body["errorCode"], "500.001.1001");

    app.receiver.wait_for(2).await;
    let (status, body) = app.query(&token, &paid).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ResponseCode"], "0");
    assert_eq!(
        body["ResponseDescription"],
        "The service request has been accepted successsfully"
    );
    assert_eq!(body["CheckoutRequestID"], paid.as_str());
    assert_eq!(
        body["MerchantRequestID"],
        app.sandbox.pushes()[0].merchant_request_id.as_str()
    );
    assert_eq!(body["ResultCode"], "0");
    assert_eq!(
        body["ResultDesc"],
        "The service request is processed successfully."
    );
    let (_, body) = app.query(&token, &cancelled).await;
    assert_eq!(body["ResultCode"], "1032");
    assert_eq!(body["ResultDesc"], "Request cancelled by user");

    let (status, body) = app.query(&token, "ws_CO_000000000000000000").await;
    assert_eq!(status, 400);
    assert!(
        is_daraja_error(
            &body,
            "400.002.02",
            "Bad Request - Invalid CheckoutRequestID"
        ),
        "{body}"
    );
    let wrong = json!({
        "BusinessShortCode": "174379",
        "Password": STANDARD.encode("nope"),
        "Timestamp": EXAMPLE_TIMESTAMP,
        "CheckoutRequestID": paid,
    });
    let (status, body) = app
        .post("/mpesa/stkpushquery/v1/query", &token, &wrong)
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["errorMessage"], "Bad Request - Invalid Password");
}

#[tokio::test]
async fn fail_next_answers_the_status_for_that_many_calls() {
    let app = TestApp::spawn().await;
    let token = app.token().await;
    app.sandbox.fail_next(503, 2);
    let body = app.push_body(PHONE);
    let (status, answer) = app.push(&token, &body).await;
    assert_eq!(status, 503);
    assert!(answer["errorCode"].as_str().unwrap().starts_with("503."));
    let (status, _) = app.query(&token, "ws_CO_000000000000000000").await;
    assert_eq!(status, 503);
    assert_eq!(app.push(&token, &body).await.0, 200);

    app.sandbox.fail_next(500, 1);
    let (status, answer) = app.push(&token, &body).await;
    assert_eq!(status, 500);
    assert!(
        is_daraja_error(
            &answer,
            "500.003.02",
            "System is busy. Please try again in few minutes."
        ),
        "{answer}"
    );
    assert_eq!(app.push(&token, &body).await.0, 200);
    assert_eq!(app.sandbox.pushes().len(), 2);
}

#[tokio::test]
async fn the_control_endpoints_drive_the_sandbox_over_http() {
    let app = TestApp::spawn().await;
    let token = app.token().await;
    let control = |path: &str, body: Value| {
        let request = app.http.post(app.url(path)).json(&body);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let scenario = json!({"phone": PHONE, "outcome": "2001", "delay_ms": 50});
    assert_eq!(control("/sandbox/scenarios", scenario).await, 204);
    let bad = json!({"phone": PHONE, "outcome": "maybe"});
    assert_eq!(control("/sandbox/scenarios", bad).await, 400);
    let checkout = app.accepted_push(&token, PHONE).await;
    let received = app.receiver.wait_for(1).await;
    assert_eq!(
        received[0]["Body"]["stkCallback"]["ResultCode"],
        json!(2001)
    );

    let pushes: Value = app
        .http
        .get(app.url("/sandbox/pushes"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(pushes[0]["checkout_request_id"], checkout.as_str());
    assert_eq!(pushes[0]["amount"], json!(150));

    let fail = json!({"status": 500, "count": 1});
    assert_eq!(control("/sandbox/fail-next", fail).await, 204);
    assert_eq!(app.query(&token, &checkout).await.0, 500);
    assert_eq!(app.query(&token, &checkout).await.0, 200);

    assert_eq!(control("/sandbox/expire-tokens", json!({})).await, 204);
    assert_eq!(app.query(&token, &checkout).await.0, 401);
}

#[tokio::test]
async fn an_unknown_path_answers_daraja_404_json() {
    let app = TestApp::spawn().await;
    let answer = app
        .http
        .get(app.url("/mpesa/b2c/v1/paymentrequest"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 404);
    let body: Value = answer.json().await.unwrap();
    assert!(
        is_daraja_error(&body, "404.001.01", "Resource not found"),
        "{body}"
    );
}

#[tokio::test]
async fn stop_releases_the_port() {
    let app = TestApp::spawn().await;
    let url = app.sandbox.url.clone();
    app.sandbox.stop().await;
    let answer = reqwest::Client::new()
        .get(format!("{url}/oauth/v1/generate"))
        .send()
        .await;
    assert!(answer.is_err());
}

#[tokio::test]
async fn fail_next_queries_fails_only_queries_and_a_429_is_darajas_rate_limit() {
    let app = TestApp::spawn().await;
    let token = app.token().await;
    app.sandbox.fail_next_queries(429, 2);
    // Pushes go through meanwhile.
    let checkout = app.accepted_push(&token, PHONE).await;
    let (status, body) = app.query(&token, &checkout).await;
    assert_eq!(status, 429);
    assert!(
        is_daraja_error(&body, "429.001.01", "Rate limit exceeded"),
        "{body}"
    );
    assert_eq!(app.query(&token, &checkout).await.0, 429);
    app.receiver.wait_for(1).await;
    assert_eq!(app.query(&token, &checkout).await.0, 200);
    // And over HTTP.
    let fail = json!({"status": 408, "count": 1});
    let answer = app
        .http
        .post(app.url("/sandbox/fail-next-queries"))
        .json(&fail)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 204);
    assert_eq!(app.query(&token, &checkout).await.0, 408);
    assert_eq!(app.query(&token, &checkout).await.0, 200);
}

/// Both failure knobs read the same body: an error status and a count, or 400 and
/// nothing changed.
#[tokio::test]
async fn the_failure_knobs_refuse_a_body_that_is_not_an_error_status_and_a_count() {
    let app = TestApp::spawn().await;
    let token = app.token().await;
    let checkout = app.accepted_push(&token, PHONE).await;
    // Settled, so that a query answers 200 unless told to fail.
    app.receiver.wait_for(1).await;
    for path in ["/sandbox/fail-next", "/sandbox/fail-next-queries"] {
        for bad in [
            json!({"status": 200, "count": 1}),
            json!({"status": 600, "count": 1}),
            json!({"status": 500}),
            json!({"count": 1}),
            json!({"status": 500, "count": -1}),
        ] {
            let answer = app
                .http
                .post(app.url(path))
                .json(&bad)
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 400, "{path} {bad}");
        }
        assert_eq!(app.query(&token, &checkout).await.0, 200, "{path}");
    }
}

#[tokio::test]
async fn a_held_push_stays_in_process_until_released() {
    let app = TestApp::spawn().await;
    let token = app.token().await;
    app.sandbox.hold(PHONE);
    let checkout = app.accepted_push(&token, PHONE).await;
    // Long past its delay: still being processed, and no callback.
    tokio::time::sleep(DELAY * 4).await;
    let (status, body) = app.query(&token, &checkout).await;
    assert_eq!(status, 500);
    assert_eq!(body["errorCode"], "500.001.1001");
    assert!(app.receiver.received().is_empty());
    // Other phones are not held.
    app.accepted_push(&token, "254711111111").await;
    app.receiver.wait_for(1).await;
    app.sandbox.release(PHONE);
    let received = app.receiver.wait_for(2).await;
    assert!(received
        .iter()
        .any(|c| c["Body"]["stkCallback"]["CheckoutRequestID"] == checkout.as_str()));
    let (status, body) = app.query(&token, &checkout).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ResultCode"], "0");
    // Pushes after the release are not held; holding again over HTTP holds the next.
    let control = |path: &str| {
        let request = app.http.post(app.url(path)).json(&json!({"phone": PHONE}));
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(control("/sandbox/hold").await, 204);
    let held = app.accepted_push(&token, PHONE).await;
    tokio::time::sleep(DELAY * 4).await;
    assert_eq!(app.query(&token, &held).await.0, 500);
    assert_eq!(app.receiver.received().len(), 2);
    assert_eq!(control("/sandbox/release").await, 204);
    app.receiver.wait_for(3).await;
}

/// The client takes a 429, a 408 or a 401 after a fresh token to a query for "not
/// now": retried with a pause, then Daraja unavailable, never Daraja refusing the
/// question (the reconciler would wait an hour to ask again). A 400 is a refusal.
#[tokio::test]
async fn the_client_retries_a_rate_limited_or_timed_out_query_and_never_calls_it_refused() {
    let app = TestApp::spawn().await;
    let daraja = app.client();
    let checkout = app.accepted_push(&app.token().await, PHONE).await;
    app.receiver.wait_for(1).await;
    let paid = StkStatus::Done {
        result_code: 0,
        result_desc: "The service request is processed successfully.".into(),
    };
    for status in [429, 408] {
        // Two refusals, then the answer, within the three attempts.
        app.sandbox.fail_next_queries(status, 2);
        assert_eq!(daraja.stk_query(&checkout).await, Ok(paid.clone()));
        // More than the attempts: unavailable, to be asked again later.
        app.sandbox.fail_next_queries(status, 3);
        let answer = daraja.stk_query(&checkout).await;
        assert!(
            matches!(&answer, Err(DarajaError::Unavailable(e)) if e.contains(&status.to_string())),
            "{status}: {answer:?}"
        );
        assert_eq!(daraja.stk_query(&checkout).await, Ok(paid.clone()));
    }
    // A 401, a new token, a 401 again: tried again with yet another token.
    let tokens = app.sandbox.token_requests();
    app.sandbox.fail_next_queries(401, 2);
    assert_eq!(daraja.stk_query(&checkout).await, Ok(paid.clone()));
    assert_eq!(app.sandbox.token_requests(), tokens + 2);
    app.sandbox.fail_next_queries(401, 4);
    let answer = daraja.stk_query(&checkout).await;
    assert!(
        matches!(&answer, Err(DarajaError::Unavailable(e)) if e.contains("401")),
        "{answer:?}"
    );
    // A plain refusal is one.
    app.sandbox.fail_next_queries(400, 1);
    let answer = daraja.stk_query(&checkout).await;
    assert!(
        matches!(&answer, Err(DarajaError::Rejected { status: 400, .. })),
        "{answer:?}"
    );
}

/// A 429 to an STK Push is retried (Daraja turned it away unprocessed); a 408 never
/// is (the push may have got through), and its outcome is unknown.
#[tokio::test]
async fn a_rate_limited_push_is_sent_again_and_a_timed_out_one_never() {
    let app = TestApp::spawn().await;
    let daraja = app.client();
    let push = StkPush {
        amount_kes: 150,
        phone: PHONE.into(),
        account_reference: "INV-0042".into(),
        description: "Consultation".into(),
    };
    app.sandbox.fail_next(429, 2);
    daraja.stk_push(&push).await.unwrap();
    assert_eq!(app.sandbox.pushes().len(), 1);
    app.sandbox.fail_next(429, 3);
    let answer = daraja.stk_push(&push).await;
    assert!(
        matches!(&answer, Err(DarajaError::Unavailable(_))),
        "{answer:?}"
    );
    app.sandbox.fail_next(408, 1);
    let answer = daraja.stk_push(&push).await;
    assert!(
        matches!(&answer, Err(DarajaError::Unknown(_))),
        "{answer:?}"
    );
    assert_eq!(app.sandbox.pushes().len(), 1);
}

/// A single 401 to an STK Push is a stale token: a new one is fetched and the push goes
/// through. A 401 again with the fresh token is Daraja refusing the push, as before the
/// client took repeated 401s to queries for "not now": it was not processed, so its
/// payment may fail (nobody was asked to pay), and it is not sent again and again on
/// credentials that may be wrong.
#[tokio::test]
async fn a_push_refused_again_with_a_fresh_token_is_a_refusal() {
    let app = TestApp::spawn().await;
    let daraja = app.client();
    let push = StkPush {
        amount_kes: 150,
        phone: PHONE.into(),
        account_reference: "INV-0042".into(),
        description: "Consultation".into(),
    };
    daraja.stk_push(&push).await.unwrap();
    let tokens = app.sandbox.token_requests();
    app.sandbox.fail_next(401, 1);
    daraja.stk_push(&push).await.unwrap();
    assert_eq!(app.sandbox.token_requests(), tokens + 1);
    assert_eq!(app.sandbox.pushes().len(), 2);
    app.sandbox.fail_next(401, 2);
    let answer = daraja.stk_push(&push).await;
    assert!(
        matches!(&answer, Err(DarajaError::Rejected { status: 401, .. })),
        "{answer:?}"
    );
    // One fresh token, one attempt with it: no retries with a pause.
    assert_eq!(app.sandbox.token_requests(), tokens + 2);
    assert_eq!(app.sandbox.pushes().len(), 2);
    // The next push, the 401s spent, goes through.
    daraja.stk_push(&push).await.unwrap();
    assert_eq!(app.sandbox.pushes().len(), 3);
}
