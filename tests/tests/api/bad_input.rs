//! Every class of bad input gets a 4xx problem+json answer naming what is wrong, and
//! writes nothing: not an event, not a blob.

use std::sync::Arc;

use eventstore::testing::BACKENDS;
use eventstore::StoreConfig;
use reqwest::Method;
use serde_json::{json, Value};

use crate::app::{password_of, Party, Resp, TestApp};

const PDF: &[u8] = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n";

/// A problem with this status and code, about this field (first of `errors` too).
#[track_caller]
fn at(r: &Resp, status: u16, code: &str, field: &str) -> Value {
    let body = r.problem(status, code);
    assert_eq!(body["field"], field, "{body}");
    if code == "invalid_request" {
        assert_eq!(body["errors"][0]["field"], field, "{body}");
        assert!(body["errors"][0]["detail"]
            .as_str()
            .is_some_and(|d| !d.is_empty()));
    }
    body
}

/// 422 `invalid_request` naming this field.
#[track_caller]
fn invalid(r: &Resp, field: &str) -> Value {
    at(r, 422, "invalid_request", field)
}

/// A POST with this raw body and these headers.
async fn post_raw(
    app: &TestApp,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    app.send(Method::POST, path, token, headers, Some(body.to_vec()))
        .await
}

const JSON: &[(&str, &str)] = &[("content-type", "application/json")];

/// A patient or doctor signed up and in.
async fn patient(app: &TestApp) -> Party {
    let phone = app.phone();
    let id = app.sign_up_patient(&phone, "Achieng Otieno").await;
    let token = app.sign_in(&phone).await;
    Party { id, phone, token }
}

async fn doctor(app: &TestApp) -> Party {
    let phone = app.phone();
    let id = app.sign_up_doctor(&phone, "Dr Kamau", "KMPDC-0042").await;
    let token = app.sign_in(&phone).await;
    Party { id, phone, token }
}

fn access_request(patient_id: &str) -> Value {
    json!({"patient_id": patient_id, "categories": ["lab"],
           "purpose": "Diabetes follow-up", "duration_days": 30})
}

#[actix_rt::test]
async fn json_that_is_malformed_or_does_not_fit_is_refused_naming_the_field() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start(backend).await else {
            continue;
        };
        let patient = patient(&app).await;
        // Body checks come after the role check: an unverified doctor is a doctor.
        let doctor = doctor(&app).await;
        let before = app.event_count().await;

        // Not JSON at all.
        let r = post_raw(&app, "/v1/patients", None, JSON, br#"{"phone": "2547"#).await;
        r.problem(400, "malformed_json");
        let mut trailing =
            serde_json::to_vec(&TestApp::patient_body(&app.phone(), "Achieng Otieno")).unwrap();
        trailing.extend_from_slice(b" trailing");
        let r = post_raw(&app, "/v1/patients", None, JSON, &trailing).await;
        r.problem(400, "malformed_json");

        // An unknown field.
        let mut body = TestApp::patient_body(&app.phone(), "Achieng Otieno");
        body["admin"] = json!(true);
        invalid(&app.post("/v1/patients", None, body).await, "admin");

        // Wrong types.
        let mut body = access_request(&patient.id);
        body["duration_days"] = json!("thirty");
        let r = app
            .post("/v1/access-requests", Some(&doctor.token), body)
            .await;
        invalid(&r, "duration_days");
        let mut body = access_request(&patient.id);
        body["categories"] = json!([1]);
        let r = app
            .post("/v1/access-requests", Some(&doctor.token), body)
            .await;
        invalid(&r, "categories[0]");
        let r = app
            .post("/v1/patients", None, json!([{"phone": app.phone()}]))
            .await;
        invalid(&r, "body");
        let r = app.post("/v1/sessions", None, json!("hello")).await;
        invalid(&r, "body");

        // A missing field.
        let r = app
            .post(
                "/v1/patients",
                None,
                json!({"phone": app.phone(), "name": "Achieng Otieno", "birth_date": "1987-03-14"}),
            )
            .await;
        invalid(&r, "password");

        // An unknown category, and a record id that is not one.
        let mut body = access_request(&patient.id);
        body["categories"] = json!(["lab", "xray"]);
        let r = app
            .post("/v1/access-requests", Some(&doctor.token), body)
            .await;
        invalid(&r, "categories[1]");
        let mut body = access_request(&patient.id);
        body["categories"] = json!(["xray"]);
        let r = app
            .post("/v1/access-requests", Some(&doctor.token), body)
            .await;
        invalid(&r, "categories[0]");
        let mut body = access_request(&patient.id);
        body["record_ids"] = json!(["not-a-uuid"]);
        let r = app
            .post("/v1/access-requests", Some(&doctor.token), body)
            .await;
        invalid(&r, "record_ids[0]");
        let mut body = access_request(&patient.id);
        body["patient_id"] = json!("not-a-uuid");
        let r = app
            .post("/v1/access-requests", Some(&doctor.token), body)
            .await;
        invalid(&r, "patient_id");

        assert_eq!(app.event_count().await, before, "{backend:?}");
        app.stop().await;
    }
}

#[actix_rt::test]
async fn invalid_values_are_refused_naming_every_field() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start(backend).await else {
            continue;
        };
        let before = app.event_count().await;

        // A bad phone, on sign-up (patient and doctor) and on sign-in.
        let mut body = TestApp::patient_body("12345", "Achieng Otieno");
        body["password"] = json!("a long enough secret");
        invalid(&app.post("/v1/patients", None, body).await, "phone");
        let r = app
            .post(
                "/v1/doctors",
                None,
                json!({"phone": "+44 20 7946 0000", "password": "a long enough secret",
                       "name": "Dr Kamau", "license_number": "KMPDC-0042"}),
            )
            .await;
        invalid(&r, "phone");
        let r = app
            .post(
                "/v1/sessions",
                None,
                json!({"phone": "not a phone", "password": "a long enough secret"}),
            )
            .await;
        invalid(&r, "phone");

        // Several bad fields at once: each is named.
        let r = app
            .post(
                "/v1/patients",
                None,
                json!({"phone": "0800", "password": "short", "name": "  ",
                       "birth_date": "1987-13-40"}),
            )
            .await;
        let body = invalid(&r, "phone");
        let fields: Vec<&str> = body["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        assert_eq!(
            fields,
            ["phone", "password", "name", "birth_date"],
            "{backend:?}: {body}"
        );
        for error in body["errors"].as_array().unwrap() {
            assert!(error["detail"].as_str().is_some_and(|d| !d.is_empty()));
        }

        // A birth date in the future.
        let tomorrow = (chrono::Utc::now() + chrono::Duration::days(2)).date_naive();
        let mut body = TestApp::patient_body(&app.phone(), "Achieng Otieno");
        body["birth_date"] = json!(tomorrow.to_string());
        invalid(&app.post("/v1/patients", None, body).await, "birth_date");

        // A bad licence number.
        let r = app
            .post(
                "/v1/doctors",
                None,
                json!({"phone": app.phone(), "password": "a long enough secret",
                       "name": "Dr Kamau", "license_number": "?"}),
            )
            .await;
        invalid(&r, "license_number");

        // An idempotency key longer than 255 characters, on an otherwise valid sign-up.
        let key = "k".repeat(300);
        let r = app
            .post_keyed(
                "/v1/patients",
                None,
                Some(&key),
                TestApp::patient_body(&app.phone(), "Achieng Otieno"),
            )
            .await;
        invalid(&r, "Idempotency-Key");

        assert_eq!(app.event_count().await, before, "{backend:?}");
        app.stop().await;
    }
}

#[actix_rt::test]
async fn approvals_that_cannot_hold_are_refused_naming_the_field() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start(backend).await else {
            continue;
        };
        let world = app.world().await;
        let request = app
            .request_access(&world.doctor, &world.patient.id, &["lab"])
            .await
            .ok(201)["request_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let approval = format!("/v1/access-requests/{request}/approval");
        let token = Some(world.patient.token.as_str());
        let before = app.event_count().await;

        let r = app
            .post(
                &approval,
                token,
                json!({"expires_at": "2020-01-01T00:00:00Z"}),
            )
            .await;
        invalid(&r, "expires_at");
        let r = app
            .post(&approval, token, json!({"expires_at": "next tuesday"}))
            .await;
        invalid(&r, "expires_at");
        // Widening what was asked for.
        let r = app
            .post(&approval, token, json!({"categories": ["lab", "imaging"]}))
            .await;
        at(&r, 422, "scope_not_narrower", "categories");
        // An unknown category.
        let r = app
            .post(&approval, token, json!({"categories": ["xray"]}))
            .await;
        invalid(&r, "categories[0]");
        // A rejection reason of the wrong type.
        let r = app
            .post(
                &format!("/v1/access-requests/{request}/rejection"),
                token,
                json!({"reason": 42}),
            )
            .await;
        invalid(&r, "reason");

        assert_eq!(app.event_count().await, before, "{backend:?}");
        // Still pending: it can be approved as asked.
        let approved = app.post_empty(&approval, token).await.ok(200);
        assert_eq!(approved["categories"], json!(["lab"]));
        app.stop().await;
    }
}

#[actix_rt::test]
async fn uploads_with_a_bad_category_name_type_or_body_are_refused_and_store_nothing() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start(backend).await else {
            continue;
        };
        let patient = patient(&app).await;
        let before = app.event_count().await;
        let upload = |query: &'static str| {
            app.upload(&patient.token, &patient.id, query, "application/pdf", PDF)
        };

        invalid(&upload("category=xray").await, "category");
        invalid(&upload("").await, "category");
        invalid(&upload("filename=scan.pdf").await, "category");
        invalid(
            &upload("category=lab&filename=../etc/passwd").await,
            "filename",
        );
        invalid(
            &upload("category=lab&filename=..%5Cwindows%5Cwin.ini").await,
            "filename",
        );
        let r = app
            .upload(
                &patient.token,
                &patient.id,
                "category=lab",
                "application/pdf",
                b"",
            )
            .await;
        invalid(&r, "body");
        // No media type.
        let r = app
            .send(
                Method::POST,
                &format!("/v1/patients/{}/records?category=lab", patient.id),
                Some(&patient.token),
                &[],
                Some(PDF.to_vec()),
            )
            .await;
        at(&r, 415, "unsupported_media_type", "Content-Type");

        assert_eq!(app.event_count().await, before, "{backend:?}");
        assert!(app.blobs().is_empty(), "{backend:?}: no blob stored");
        app.stop().await;
    }
}

#[actix_rt::test]
async fn json_must_be_declared_as_json() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start(backend).await else {
            continue;
        };
        let before = app.event_count().await;
        let body = serde_json::to_vec(&TestApp::patient_body(&app.phone(), "Achieng")).unwrap();

        let r = post_raw(
            &app,
            "/v1/patients",
            None,
            &[("content-type", "text/plain")],
            &body,
        )
        .await;
        at(&r, 415, "unsupported_media_type", "Content-Type");
        let r = post_raw(&app, "/v1/patients", None, &[], &body).await;
        at(&r, 415, "unsupported_media_type", "Content-Type");
        let r = post_raw(
            &app,
            "/v1/sessions",
            None,
            &[("content-type", "application/x-www-form-urlencoded")],
            b"phone=254712345678&password=whatever12",
        )
        .await;
        at(&r, 415, "unsupported_media_type", "Content-Type");

        assert_eq!(app.event_count().await, before, "{backend:?}");
        // Parameters of the media type are fine.
        let r = post_raw(
            &app,
            "/v1/patients",
            None,
            &[("content-type", "application/json; charset=utf-8")],
            &body,
        )
        .await;
        r.ok(201);
        app.stop().await;
    }
}

#[actix_rt::test]
async fn oversized_bodies_are_refused_before_anything_is_stored() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start_with(backend, &[("AFYA_MAX_UPLOAD_BYTES", "1024")]).await
        else {
            continue;
        };
        let patient = patient(&app).await;
        let before = app.event_count().await;

        // JSON bodies: at most 64 KiB.
        let body = TestApp::patient_body(&app.phone(), &"N".repeat(70_000));
        app.post("/v1/patients", None, body)
            .await
            .problem(413, "body_too_large");

        // Uploads: at most AFYA_MAX_UPLOAD_BYTES.
        let r = app
            .upload(
                &patient.token,
                &patient.id,
                "category=lab",
                "application/pdf",
                &[b'x'; 2048],
            )
            .await;
        r.problem(413, "body_too_large");
        assert_eq!(app.event_count().await, before, "{backend:?}");
        assert!(app.blobs().is_empty(), "{backend:?}: no blob stored");

        // Exactly the limit is fine.
        let r = app
            .upload(
                &patient.token,
                &patient.id,
                "category=lab",
                "application/pdf",
                &[b'x'; 1024],
            )
            .await
            .ok(201);
        assert_eq!(r["size"], 1024);
        assert_eq!(app.blobs().len(), 1, "{backend:?}");
        app.stop().await;
    }
}

/// A token this deployment issued, for a session that ended two days ago (started
/// from the test, against the server's store and master key, with a clock set back).
async fn expired_token(app: &TestApp, phone: &str) -> String {
    let config = match &app.env.database_url {
        Some(url) => StoreConfig::Postgres { url: url.clone() },
        None => StoreConfig::Sqlite {
            path: app.env.data_dir.join("afyachain.db"),
        },
    };
    let store = eventstore::Store::open(config).await.unwrap();
    let master = commands::keys::load_master_key(&app.env.data_dir).unwrap();
    let keys = commands::keys::KeyStore::new(master, store.any_pool().clone());
    let commands = commands::Commands::new(
        store.clone(),
        Arc::new(keys),
        Arc::new(commands::blobs::LocalBlobStore::new(&app.env.data_dir)),
        Arc::new(domain::clock::FixedClock(
            chrono::Utc::now() - chrono::Duration::days(2),
        )),
    );
    let signed_in = commands
        .sign_in(
            &domain::value::Msisdn::parse(phone).unwrap(),
            &domain::value::Password::parse(&password_of(phone)).unwrap(),
            chrono::Duration::hours(8),
            eventstore::CommandMeta::new("test"),
        )
        .await
        .unwrap();
    store.close().await;
    signed_in.token
}

#[actix_rt::test]
async fn tokens_that_are_missing_malformed_forged_foreign_expired_or_revoked_are_refused() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start(backend).await else {
            continue;
        };
        let patient = patient(&app).await;
        let second = app.sign_in(&patient.phone).await;
        let expired = expired_token(&app, &patient.phone).await;
        let signed_out = app.sign_in(&patient.phone).await;
        assert_eq!(
            app.delete("/v1/sessions/current", Some(&signed_out))
                .await
                .status,
            204
        );
        // Another deployment: another store, another master key.
        let foreign = {
            let other = TestApp::start(backend).await.unwrap();
            let phone = other.phone();
            other.sign_up_patient(&phone, "Achieng Otieno").await;
            let token = other.sign_in(&phone).await;
            other.stop().await;
            token
        };

        // Tokens are `afy1.<session id: 32 hex>.<tag>`.
        let parts: Vec<&str> = patient.token.split('.').collect();
        assert_eq!(parts.len(), 3, "{}", patient.token);
        assert_eq!((parts[0], parts[1].len()), ("afy1", 32));
        let mut tag: Vec<char> = parts[2].chars().collect();
        tag[0] = if tag[0] == 'A' { 'B' } else { 'A' };
        let tampered_tag = format!("afy1.{}.{}", parts[1], tag.into_iter().collect::<String>());
        let other_parts: Vec<&str> = second.split('.').collect();
        let swapped = format!("afy1.{}.{}", other_parts[1], parts[2]);

        let path = format!("/v1/patients/{}/records", patient.id);
        let before = app.event_count().await;
        let with = |authorization: String| {
            let path = path.clone();
            let app = &app;
            async move {
                app.send(
                    Method::GET,
                    &path,
                    None,
                    &[("authorization", authorization.as_str())],
                    None,
                )
                .await
            }
        };

        let r = app.get(&path, None).await;
        r.problem(401, "unauthenticated");
        assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"));
        let r = with("Basic abc".to_owned()).await;
        r.problem(401, "token_malformed");
        assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"));
        with("Bearer garbage".to_owned())
            .await
            .problem(401, "token_malformed");
        with("Bearer".to_owned())
            .await
            .problem(401, "token_malformed");
        with(format!("Bearer afy1.{}", parts[1]))
            .await
            .problem(401, "token_malformed");
        for (what, token, code) in [
            ("a tampered tag", tampered_tag.as_str(), "token_invalid"),
            ("another session's tag", swapped.as_str(), "token_invalid"),
            (
                "another deployment's token",
                foreign.as_str(),
                "token_invalid",
            ),
            ("an expired session", expired.as_str(), "token_expired"),
            ("a signed-out session", signed_out.as_str(), "token_revoked"),
        ] {
            let r = app.get(&path, Some(token)).await;
            assert_eq!(
                (r.status, r.json()["code"].as_str()),
                (401, Some(code)),
                "{backend:?}, {what}: {}",
                r.text()
            );
            r.problem(401, code);
            assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"));
        }
        // A refused token cannot write either.
        app.upload(
            &expired,
            &patient.id,
            "category=lab",
            "application/pdf",
            PDF,
        )
        .await
        .problem(401, "token_expired");
        assert_eq!(app.event_count().await, before, "{backend:?}");
        assert!(app.blobs().is_empty());

        // The genuine tokens still work; the scheme is case-insensitive.
        app.get(&path, Some(&patient.token)).await.ok(200);
        with(format!("bearer {second}")).await.ok(200);
        app.stop().await;
    }
}

#[actix_rt::test]
async fn callers_outside_their_role_or_their_data_are_forbidden() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start(backend).await else {
            continue;
        };
        let patient = patient(&app).await;
        let other = self::patient(&app).await;
        let before = app.event_count().await;

        // A patient may not ask for access (a doctor's act), nor verify anyone.
        app.post(
            "/v1/access-requests",
            Some(&patient.token),
            access_request(&other.id),
        )
        .await
        .problem(403, "role_forbidden");
        app.post_empty(
            &format!("/v1/doctors/{}/verification", uuid::Uuid::new_v4()),
            Some(&patient.token),
        )
        .await
        .problem(403, "role_forbidden");
        // Nor read or write another patient's data.
        app.get(
            &format!("/v1/patients/{}/records", other.id),
            Some(&patient.token),
        )
        .await
        .problem(403, "not_your_data");
        app.get(
            &format!("/v1/patients/{}/access-requests", other.id),
            Some(&patient.token),
        )
        .await
        .problem(403, "not_your_data");
        app.upload(
            &patient.token,
            &other.id,
            "category=lab",
            "application/pdf",
            PDF,
        )
        .await
        .problem(403, "not_your_data");

        assert_eq!(app.event_count().await, before, "{backend:?}");
        assert!(app.blobs().is_empty());
        app.stop().await;
    }
}

#[actix_rt::test]
async fn unknown_ids_routes_and_methods_are_not_found_or_not_allowed() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start(backend).await else {
            continue;
        };
        let world = app.world().await;
        let unknown = uuid::Uuid::new_v4();
        let before = app.event_count().await;

        // Ids that are not UUIDs name nothing.
        for (method, path, token) in [
            (
                Method::GET,
                "/v1/records/not-a-uuid/content",
                &world.patient,
            ),
            (
                Method::GET,
                "/v1/patients/not-a-uuid/records",
                &world.patient,
            ),
            (
                Method::POST,
                "/v1/access-requests/42/approval",
                &world.patient,
            ),
            (Method::POST, "/v1/doctors/x/verification", &world.registrar),
            (Method::GET, "/v1/doctors/not-a-uuid/grants", &world.doctor),
        ] {
            let r = app.send(method, path, Some(&token.token), &[], None).await;
            assert_eq!(r.status, 404, "{backend:?} {path}: {}", r.text());
            assert_eq!(
                r.header("content-type").as_deref(),
                Some("application/problem+json")
            );
        }

        // Well-formed ids of nothing.
        app.get(
            &format!("/v1/records/{unknown}/content"),
            Some(&world.patient.token),
        )
        .await
        .problem(404, "record_not_found");
        app.get(
            &format!("/v1/records/{unknown}/content"),
            Some(&world.doctor.token),
        )
        .await
        .problem(404, "record_not_found");
        app.verify(&world.registrar, &unknown.to_string())
            .await
            .problem(404, "doctor_not_found");
        app.post_empty(
            &format!("/v1/access-requests/{unknown}/approval"),
            Some(&world.patient.token),
        )
        .await
        .problem(404, "access_request_not_found");
        app.post_empty(
            &format!("/v1/access-requests/{unknown}/rejection"),
            Some(&world.patient.token),
        )
        .await
        .problem(404, "access_request_not_found");
        app.post_empty(
            &format!("/v1/access-requests/{unknown}/revocation"),
            Some(&world.patient.token),
        )
        .await
        .problem(404, "access_request_not_found");
        app.request_access(&world.doctor, &unknown.to_string(), &["lab"])
            .await
            .problem(404, "patient_not_found");

        // Routes that do not exist, and methods a route does not take.
        app.get("/v1/nothing-here", None)
            .await
            .problem(404, "route_not_found");
        app.get("/v2/patients", Some(&world.patient.token))
            .await
            .problem(404, "route_not_found");
        for (method, path) in [
            (Method::PUT, "/v1/sessions"),
            (Method::GET, "/v1/sessions"),
            (Method::DELETE, "/v1/patients"),
            (Method::PATCH, "/v1/access-requests"),
        ] {
            app.send(method, path, None, &[], None)
                .await
                .problem(405, "method_not_allowed");
        }

        assert_eq!(app.event_count().await, before, "{backend:?}");
        app.stop().await;
    }
}

#[actix_rt::test]
async fn pagination_and_filters_out_of_range_are_refused_naming_the_parameter() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start(backend).await else {
            continue;
        };
        let patient = patient(&app).await;
        let before = app.event_count().await;

        for list in ["records", "access-requests", "access-log"] {
            let path = format!("/v1/patients/{}/{list}", patient.id);
            for (query, field) in [
                ("limit=0", "limit"),
                ("limit=101", "limit"),
                ("limit=x", "limit"),
                ("limit=-1", "limit"),
                ("cursor=abc", "cursor"),
                ("cursor=-5", "cursor"),
            ] {
                let r = app
                    .get(&format!("{path}?{query}"), Some(&patient.token))
                    .await;
                assert_eq!(r.status, 422, "{backend:?} {list}?{query}: {}", r.text());
                invalid(&r, field);
            }
            // The bounds themselves are fine.
            for query in ["limit=1", "limit=100"] {
                app.get(&format!("{path}?{query}"), Some(&patient.token))
                    .await
                    .ok(200);
            }
        }
        let path = format!("/v1/patients/{}/access-requests?status=bogus", patient.id);
        invalid(&app.get(&path, Some(&patient.token)).await, "status");

        assert_eq!(app.event_count().await, before, "{backend:?}");
        app.stop().await;
    }
}

#[actix_rt::test]
async fn a_taken_phone_or_wrong_credentials_are_refused_alike_and_append_nothing() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start(backend).await else {
            continue;
        };
        let patient = patient(&app).await;
        let doctor = doctor(&app).await;
        let before = app.event_count().await;

        // Signing up again with a phone in use, as either kind of account.
        for phone in [&patient.phone, &doctor.phone] {
            app.post(
                "/v1/patients",
                None,
                TestApp::patient_body(phone, "Achieng Otieno"),
            )
            .await
            .problem(409, "phone_taken");
            app.post(
                "/v1/doctors",
                None,
                json!({"phone": phone, "password": password_of(phone),
                       "name": "Dr Kamau", "license_number": "KMPDC-0042"}),
            )
            .await
            .problem(409, "phone_taken");
        }
        // The same number written another way is the same phone.
        let local = format!("0{}", &patient.phone[3..]);
        app.post(
            "/v1/patients",
            None,
            TestApp::patient_body(&local, "Achieng Otieno"),
        )
        .await
        .problem(409, "phone_taken");

        // A wrong password and an unknown phone get the same answer.
        let wrong = app
            .post(
                "/v1/sessions",
                None,
                json!({"phone": patient.phone, "password": "not the password at all"}),
            )
            .await;
        let body_wrong = wrong.problem(401, "bad_credentials");
        let unknown = app
            .post(
                "/v1/sessions",
                None,
                json!({"phone": app.phone(), "password": "not the password at all"}),
            )
            .await;
        let body_unknown = unknown.problem(401, "bad_credentials");
        assert_eq!(body_wrong, body_unknown, "{backend:?}");
        let short = app
            .post(
                "/v1/sessions",
                None,
                json!({"phone": patient.phone, "password": "short"}),
            )
            .await;
        assert_eq!(short.problem(401, "bad_credentials"), body_wrong);

        assert_eq!(app.event_count().await, before, "{backend:?}");
        // The account still signs in with its password.
        app.sign_in(&patient.phone).await;
        app.stop().await;
    }
}

#[actix_rt::test]
async fn a_request_naming_another_patients_record_is_refused_like_an_unknown_one() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start(backend).await else {
            continue;
        };
        let w = app.world().await;
        let record_of = |r: Resp| r.ok(201)["record_id"].as_str().unwrap().to_owned();
        let own = record_of(
            app.upload(
                &w.patient.token,
                &w.patient.id,
                "category=lab",
                "application/pdf",
                PDF,
            )
            .await,
        );
        let foreign = record_of(
            app.upload(
                &w.other_patient.token,
                &w.other_patient.id,
                "category=lab",
                "application/pdf",
                PDF,
            )
            .await,
        );
        let unknown = uuid::Uuid::new_v4().to_string();
        let asking = |record_ids: Value| {
            let mut body = access_request(&w.patient.id);
            body["record_ids"] = record_ids;
            app.post("/v1/access-requests", Some(&w.doctor.token), body)
        };
        let before = app.event_count().await;

        // Another patient's record and a record that does not exist get the same
        // answer, so the doctor learns nothing about the other patient.
        let by_foreign = invalid(&asking(json!([own, foreign])).await, "record_ids[1]");
        let by_unknown = invalid(&asking(json!([own, unknown])).await, "record_ids[1]");
        assert_eq!(by_foreign, by_unknown, "{backend:?}");
        let both = invalid(
            &asking(json!([foreign, own, unknown])).await,
            "record_ids[0]",
        );
        assert_eq!(both["errors"][1]["field"], "record_ids[2]", "{both}");
        assert_eq!(both["errors"].as_array().unwrap().len(), 2, "{both}");
        // Too many to check: refused before any is loaded.
        let many: Vec<String> = (0..101).map(|_| own.clone()).collect();
        invalid(&asking(json!(many)).await, "record_ids");
        assert_eq!(app.event_count().await, before, "{backend:?}");
        let listed = app
            .get(
                &format!("/v1/patients/{}/access-requests", w.patient.id),
                Some(&w.patient.token),
            )
            .await
            .ok(200);
        assert_eq!(listed["items"], json!([]), "{backend:?}");

        // The patient's own record, named twice, is asked for once.
        let asked = asking(json!([own, own])).await.ok(201);
        let listed = app
            .get(
                &format!("/v1/patients/{}/access-requests", w.patient.id),
                Some(&w.patient.token),
            )
            .await
            .ok(200);
        assert_eq!(listed["items"][0]["request_id"], asked["request_id"]);
        assert_eq!(listed["items"][0]["record_ids"], json!([own]));
        app.stop().await;
    }
}

/// An access request stored before requests were checked may name another patient's
/// record. Approving it never grants that record: it is narrowed away (the patient
/// grants what is theirs to give, and the answer and the doctor's grants show it), and
/// a request that would grant nothing else is refused, 422 on `record_ids`, appending
/// nothing; the patient may still reject it.
#[actix_rt::test]
async fn approving_an_old_request_naming_another_patients_record_never_grants_it() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start(backend).await else {
            continue;
        };
        let w = app.world().await;
        let record_of = |r: Resp| r.ok(201)["record_id"].as_str().unwrap().to_owned();
        let own = record_of(
            app.upload(
                &w.patient.token,
                &w.patient.id,
                "category=lab",
                "application/pdf",
                PDF,
            )
            .await,
        );
        let foreign = record_of(
            app.upload(
                &w.other_patient.token,
                &w.other_patient.id,
                "category=imaging",
                "application/pdf",
                PDF,
            )
            .await,
        );
        // Requests as today's server takes them, then stored again under new ids
        // naming the other patient's record, as a server before the check stored them.
        let asked = |doctor: &Party, categories: Value| {
            let mut body = access_request(&w.patient.id);
            body["categories"] = categories;
            body["record_ids"] = json!([own]);
            let token = doctor.token.clone();
            let app = &app;
            async move {
                app.post("/v1/access-requests", Some(&token), body)
                    .await
                    .ok(201)["request_id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            }
        };
        let as_before = |request_id: String, record_ids: Value| {
            let app = &app;
            async move {
                let old = uuid::Uuid::new_v4().to_string();
                let (payload, metadata) = match backend {
                    eventstore::Backend::Postgres => (
                        format!(
                            "jsonb_set(jsonb_set(payload::jsonb, '{{AccessRequested,request_id}}', \
                             '\"{old}\"'), '{{AccessRequested,scope,record_ids}}', \
                             '{record_ids}')::json"
                        ),
                        "(metadata::jsonb - 'idempotency_key')::json",
                    ),
                    eventstore::Backend::Sqlite => (
                        format!(
                            "json_set(payload, '$.AccessRequested.request_id', '{old}', \
                             '$.AccessRequested.scope.record_ids', json('{record_ids}'))"
                        ),
                        "json_remove(metadata, '$.idempotency_key')",
                    ),
                };
                let copied = app
                    .tamper(&format!(
                        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
                         event_version, payload, metadata) SELECT aggregate_type, '{old}', \
                         sequence, event_type, event_version, {payload}, {metadata} \
                         FROM events WHERE aggregate_id = '{request_id}' \
                         AND event_type = 'AccessRequested'"
                    ))
                    .await;
                assert_eq!(copied, 1);
                old
            }
        };
        let with_lab = as_before(
            asked(&w.doctor, json!(["lab"])).await,
            json!([own, foreign]),
        )
        .await;
        let only_foreign =
            as_before(asked(&w.other_doctor, json!([])).await, json!([foreign])).await;
        let approval = |request_id: &str| format!("/v1/access-requests/{request_id}/approval");
        let token = Some(w.patient.token.as_str());

        // Nothing of the patient's to grant but the other patient's record: refused.
        let before = app.event_count().await;
        let r = app.post_empty(&approval(&only_foreign), token).await;
        let problem = at(&r, 422, "records_not_the_patients", "record_ids");
        assert!(!problem.to_string().contains(&foreign), "{problem}");
        assert_eq!(app.event_count().await, before, "{backend:?}");
        app.post_empty(
            &format!("/v1/access-requests/{only_foreign}/rejection"),
            token,
        )
        .await
        .ok(200);

        // Approved as asked, the other patient's record left out; so too when the
        // patient narrows the categories and keeps the records asked for.
        let approved = app.post_empty(&approval(&with_lab), token).await.ok(200);
        assert_eq!(approved["record_ids"], json!([own]), "{approved}");
        assert_eq!(approved["categories"], json!(["lab"]), "{approved}");
        let grants = app
            .get(
                &format!("/v1/doctors/{}/grants", w.doctor.id),
                Some(&w.doctor.token),
            )
            .await
            .ok(200);
        let grant = grants["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["request_id"] == with_lab.as_str())
            .unwrap_or_else(|| panic!("{grants}"));
        assert_eq!(grant["record_ids"], json!([own]), "{grants}");
        let narrowed = as_before(
            asked(&w.doctor, json!(["lab", "imaging"])).await,
            json!([own, foreign]),
        )
        .await;
        let approved = app
            .post(&approval(&narrowed), token, json!({"categories": ["lab"]}))
            .await
            .ok(200);
        assert_eq!(approved["record_ids"], json!([own]), "{approved}");
        assert_eq!(
            app.scalar(&format!(
                "SELECT count(*) FROM events WHERE event_type = 'AccessApproved' \
                 AND CAST(payload AS TEXT) LIKE '%{foreign}%'"
            ))
            .await,
            0,
            "{backend:?}"
        );
        // The doctor still cannot read the other patient's record under it.
        let read = app
            .get(
                &format!("/v1/records/{foreign}/content?request_id={with_lab}"),
                Some(&w.doctor.token),
            )
            .await;
        assert!(matches!(read.status, 403 | 404), "{}", read.text());
        app.stop().await;
    }
}

#[actix_rt::test]
async fn bidirectional_controls_in_free_text_are_refused_naming_the_field() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start(backend).await else {
            continue;
        };
        let w = app.world().await;
        let request = app
            .request_access(&w.doctor, &w.patient.id, &["lab"])
            .await
            .ok(201)["request_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let before = app.event_count().await;
        let rlo = "Achieng\u{202E}onetiO";

        let r = app
            .post(
                "/v1/patients",
                None,
                TestApp::patient_body(&app.phone(), rlo),
            )
            .await;
        invalid(&r, "name");
        let phone = app.phone();
        let r = app
            .post(
                "/v1/doctors",
                None,
                json!({"phone": phone, "password": password_of(&phone),
                       "name": "Dr \u{2067}Kamau\u{2069}", "license_number": "KMPDC-0099"}),
            )
            .await;
        invalid(&r, "name");
        // `cod<U+202E>fdp.exe`, which a download dialogue shows as `codexe.pdf`.
        let r = app
            .upload(
                &w.patient.token,
                &w.patient.id,
                "category=lab&filename=cod%E2%80%AEfdp.exe",
                "application/pdf",
                PDF,
            )
            .await;
        invalid(&r, "filename");
        let mut body = access_request(&w.patient.id);
        body["purpose"] = json!("Diabetes\u{200F} follow-up");
        let r = app
            .post("/v1/access-requests", Some(&w.doctor.token), body)
            .await;
        invalid(&r, "purpose");
        let mut body = access_request(&w.patient.id);
        body["note"] = json!("see \u{061C}me");
        let r = app
            .post("/v1/access-requests", Some(&w.doctor.token), body)
            .await;
        invalid(&r, "note");
        let r = app
            .post(
                &format!("/v1/access-requests/{request}/rejection"),
                Some(&w.patient.token),
                json!({"reason": "\u{202A}not now"}),
            )
            .await;
        invalid(&r, "reason");
        // Staff and integrators are named on the command line, by the same rule.
        let staff_phone = app.phone();
        let (ok, _, _) = app.env.run_with_input(
            &[
                "staff",
                "add",
                "--role",
                "auditor",
                "--phone",
                &staff_phone,
                "--name",
                rlo,
            ],
            &format!("{}\n", password_of(&staff_phone)),
        );
        assert!(!ok, "staff add accepted a bidirectional control");
        assert_eq!(app.event_count().await, before, "{backend:?}");
        app.stop().await;
    }
}
