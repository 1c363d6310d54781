//! `Idempotency-Key` on every POST: a retry with the same key answers as the first did
//! and appends nothing; the same key for another request is refused.

use eventstore::testing::BACKENDS;
use reqwest::Method;
use serde_json::json;

use crate::app::{password_of, TestApp};

#[actix_rt::test]
async fn a_retry_with_the_same_key_answers_as_the_first_and_appends_nothing() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start(backend).await else {
            continue;
        };
        let w = app.world().await;

        // Sign-up.
        let phone = app.phone();
        let body = TestApp::patient_body(&phone, "Zawadi Njoroge");
        let first = app
            .post_keyed("/v1/patients", None, Some("signup-1"), body.clone())
            .await;
        let first = first.ok(201);
        let events = app.event_count().await;
        let again = app
            .post_keyed("/v1/patients", None, Some("signup-1"), body)
            .await;
        assert_eq!(again.ok(201), first, "{backend:?}");
        assert_eq!(app.event_count().await, events);
        // The same key for another request about that phone: refused, nothing appended.
        let other = app
            .post_keyed(
                "/v1/patients",
                None,
                Some("signup-1"),
                TestApp::patient_body(&phone, "Someone Else"),
            )
            .await;
        assert_eq!(
            other.problem(422, "idempotency_key_reused")["field"],
            "Idempotency-Key"
        );
        // Same body but another password: the account answers only to its own.
        let mut hijack = TestApp::patient_body(&phone, "Zawadi Njoroge");
        hijack["password"] = json!("somebody else's password");
        app.post_keyed("/v1/patients", None, Some("signup-1"), hijack)
            .await
            .problem(422, "idempotency_key_reused");
        assert_eq!(app.event_count().await, events);
        // Anonymous keys are scoped to the phone: another phone's "signup-1" is its own.
        let elsewhere = app
            .post_keyed(
                "/v1/patients",
                None,
                Some("signup-1"),
                TestApp::patient_body(&app.phone(), "Someone Else"),
            )
            .await
            .ok(201);
        assert_ne!(elsewhere["patient_id"], first["patient_id"]);

        // Sign-in: the same session (one SessionStarted).
        let sign_in = json!({"phone": phone, "password": password_of(&phone)});
        let s1 = app
            .post_keyed("/v1/sessions", None, Some("signin-1"), sign_in.clone())
            .await
            .ok(200);
        let events = app.event_count().await;
        let s2 = app
            .post_keyed("/v1/sessions", None, Some("signin-1"), sign_in)
            .await
            .ok(200);
        assert_eq!(s1, s2);
        assert_eq!(app.event_count().await, events);

        // Upload: one record, one blob.
        let upload = |key: &'static str| {
            let path = format!(
                "/v1/patients/{}/records?category=lab&filename=a.pdf",
                w.patient.id
            );
            let token = w.patient.token.clone();
            let app = &app;
            async move {
                app.send(
                    Method::POST,
                    &path,
                    Some(&token),
                    &[
                        ("content-type", "application/pdf"),
                        ("idempotency-key", key),
                    ],
                    Some(b"%PDF-1.4 once".to_vec()),
                )
                .await
            }
        };
        let u1 = upload("upload-1").await.ok(201);
        let events = app.event_count().await;
        let u2 = upload("upload-1").await.ok(201);
        assert_eq!(u1, u2, "{backend:?}");
        assert_eq!(app.event_count().await, events);
        assert_eq!(app.blobs().len(), 1, "{backend:?}: a repeat stores nothing");
        let list = app
            .get(
                &format!("/v1/patients/{}/records", w.patient.id),
                Some(&w.patient.token),
            )
            .await
            .ok(200);
        assert_eq!(list["items"].as_array().unwrap().len(), 1);

        // Access request and approval.
        let ask = json!({"patient_id": w.patient.id, "categories": ["lab"],
                         "purpose": "Follow-up", "duration_days": 10});
        let r1 = app
            .post_keyed(
                "/v1/access-requests",
                Some(&w.doctor.token),
                Some("ask-1"),
                ask.clone(),
            )
            .await
            .ok(201);
        let r2 = app
            .post_keyed(
                "/v1/access-requests",
                Some(&w.doctor.token),
                Some("ask-1"),
                ask.clone(),
            )
            .await
            .ok(201);
        assert_eq!(r1, r2);
        // Keys are the caller's own: another doctor's "ask-1" is another request.
        let r3 = app
            .post_keyed(
                "/v1/access-requests",
                Some(&w.other_doctor.token),
                Some("ask-1"),
                ask,
            )
            .await
            .ok(201);
        assert_ne!(r1["request_id"], r3["request_id"]);
        let request_id = r1["request_id"].as_str().unwrap();
        let approval = format!("/v1/access-requests/{request_id}/approval");
        let a1 = app
            .post_keyed(
                &approval,
                Some(&w.patient.token),
                Some("approve-1"),
                json!({}),
            )
            .await
            .ok(200);
        let events = app.event_count().await;
        let a2 = app
            .post_keyed(
                &approval,
                Some(&w.patient.token),
                Some("approve-1"),
                json!({}),
            )
            .await
            .ok(200);
        assert_eq!(a1, a2, "{backend:?}: the first answer, expiry included");
        assert_eq!(app.event_count().await, events);
        // Without the key, a second approval is a new command and is refused.
        app.post(&approval, Some(&w.patient.token), json!({}))
            .await
            .problem(409, "request_not_pending");
        app.stop().await;
    }
}

#[actix_rt::test]
async fn one_clients_sign_in_key_never_answers_for_another_phone() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start(backend).await else {
            continue;
        };
        let (alice, mallory) = (app.phone(), app.phone());
        let alice_id = app.sign_up_patient(&alice, "Alice Wanjiku").await;
        let mallory_id = app.sign_up_patient(&mallory, "Mallory Otieno").await;
        let sign_in = |phone: &str, password: String| {
            app.post_keyed(
                "/v1/sessions",
                None,
                Some("login-1"),
                json!({"phone": phone, "password": password}),
            )
        };
        let a = sign_in(&alice, password_of(&alice)).await.ok(200);
        let m = sign_in(&mallory, password_of(&mallory)).await.ok(200);
        assert_eq!(a["subject_id"], alice_id.as_str());
        assert_eq!(m["subject_id"], mallory_id.as_str(), "{backend:?}");
        assert_ne!(a["token"], m["token"]);
        // A repeat must know the password, every time.
        sign_in(&alice, "not alice's password".into())
            .await
            .problem(401, "bad_credentials");
        assert_eq!(sign_in(&alice, password_of(&alice)).await.ok(200), a);
        app.stop().await;
    }
}

#[actix_rt::test]
async fn concurrent_retries_of_one_sign_up_register_once() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start(backend).await else {
            continue;
        };
        let phone = app.phone();
        let body = TestApp::patient_body(&phone, "Imani Wekesa");
        let before = app.event_count().await;
        let attempts =
            (0..6).map(|_| app.post_keyed("/v1/patients", None, Some("retry-storm"), body.clone()));
        let answers = futures::future::join_all(attempts).await;
        let ids: std::collections::BTreeSet<String> = answers
            .iter()
            .map(|r| r.ok(201)["patient_id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids.len(), 1, "{backend:?}: one patient for every retry");
        assert_eq!(
            app.event_count().await,
            before + 2,
            "{backend:?}: one PatientRegistered and one AccountOpened"
        );
        app.sign_in(&phone).await;
        app.stop().await;
    }
}
