//! Who may call what: every endpoint against every kind of caller, as one table. A
//! refusal names its reason, and appends nothing.

use eventstore::testing::BACKENDS;
use reqwest::Method;
use serde_json::{json, Value};

use crate::app::{Party, TestApp, World};

const PDF: &[u8] = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\nHbA1c 9.1%\n%%EOF\n";

/// The columns of every row, in this order.
const CALLERS: [&str; 8] = [
    "anonymous",
    "patient (owner)",
    "other_patient",
    "doctor (with a grant)",
    "other_doctor",
    "unverified_doctor",
    "registrar",
    "auditor",
];

/// What one caller gets from one endpoint.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Allowed: exactly this status.
    Allow(u16),
    /// Allowed: 200, and the session speaks for this role.
    Role(&'static str),
    /// Refused: this status and code (problem+json), and nothing appended.
    Deny(u16, &'static str),
}

use Expect::{Allow, Deny, Role};

const ANON: Expect = Deny(401, "unauthenticated");
const ROLE: Expect = Deny(403, "role_forbidden");
const NOT_YOURS: Expect = Deny(403, "not_your_data");
/// Another patient's access request: as if it did not exist.
const NOT_THE_PATIENT: Expect = Deny(404, "access_request_not_found");
const NO_GRANT: Expect = Deny(403, "no_grant");
const UNVERIFIED: Expect = Deny(403, "doctor_not_verified");
/// Whoever may not read a record does not learn it exists.
const HIDDEN: Expect = Deny(404, "record_not_found");

enum Payload {
    None,
    Json(Value),
    Pdf,
}

/// One endpoint and what each caller (in [`CALLERS`] order) gets from it.
struct Row {
    method: Method,
    path: String,
    payload: Payload,
    /// Each caller signs in afresh for this call (it ends the session it is made in).
    fresh_session: bool,
    expect: [Expect; 8],
}

fn row(method: Method, path: String, payload: Payload, expect: [Expect; 8]) -> Row {
    Row {
        method,
        path,
        payload,
        fresh_session: false,
        expect,
    }
}

/// Each caller signs in afresh for this row.
fn fresh_sessions(row: Row) -> Row {
    Row {
        fresh_session: true,
        ..row
    }
}

async fn call(app: &TestApp, row: &Row, token: Option<&str>) -> crate::app::Resp {
    let (headers, body): (&[(&str, &str)], _) = match &row.payload {
        Payload::None => (&[], None),
        Payload::Json(value) => (
            &[("content-type", "application/json")],
            Some(serde_json::to_vec(value).unwrap()),
        ),
        Payload::Pdf => (&[("content-type", "application/pdf")], Some(PDF.to_vec())),
    };
    app.send(row.method.clone(), &row.path, token, headers, body)
        .await
}

/// Runs one row: the refusals first (asserting they append nothing), then the allowed
/// calls.
async fn check(app: &TestApp, world: &World, row: &Row) {
    let parties: [Option<&Party>; 8] = [
        None,
        Some(&world.patient),
        Some(&world.other_patient),
        Some(&world.doctor),
        Some(&world.other_doctor),
        Some(&world.unverified_doctor),
        Some(&world.registrar),
        Some(&world.auditor),
    ];
    let mut tokens: Vec<Option<String>> = Vec::with_capacity(8);
    for party in parties {
        tokens.push(match party {
            None => None,
            Some(p) if row.fresh_session => Some(app.sign_in(&p.phone).await),
            Some(p) => Some(p.token.clone()),
        });
    }
    let endpoint = format!("{} {}", row.method, row.path);

    let before = app.event_count().await;
    for (i, expect) in row.expect.iter().enumerate() {
        let Deny(status, code) = *expect else {
            continue;
        };
        let r = call(app, row, tokens[i].as_deref()).await;
        assert_eq!(
            (r.status, r.json()["code"].as_str()),
            (status, Some(code)),
            "{endpoint} as {}: {}",
            CALLERS[i],
            r.text()
        );
        r.problem(status, code);
    }
    assert_eq!(
        app.event_count().await,
        before,
        "{endpoint}: refusals append nothing"
    );

    for (i, expect) in row.expect.iter().enumerate() {
        let r = match *expect {
            Deny(..) => continue,
            Allow(_) | Role(_) => call(app, row, tokens[i].as_deref()).await,
        };
        let who = CALLERS[i];
        match *expect {
            Allow(status) => assert_eq!(r.status, status, "{endpoint} as {who}: {}", r.text()),
            Role(role) => {
                assert_eq!(r.status, 200, "{endpoint} as {who}: {}", r.text());
                let body = r.json();
                assert_eq!(body["role"], role, "{endpoint} as {who}: {body}");
                let id = parties[i].map(|p| p.id.as_str());
                assert_eq!(body["subject_id"].as_str(), id, "{endpoint} as {who}");
            }
            Deny(..) => {}
        }
    }
}

/// A doctor's request for the patient's lab results; approved if `approve`.
async fn lab_request(app: &TestApp, world: &World, approve: bool) -> String {
    let request = app
        .request_access(&world.doctor, &world.patient.id, &["lab"])
        .await
        .ok(201);
    let id = request["request_id"].as_str().unwrap().to_owned();
    if approve {
        app.post_empty(
            &format!("/v1/access-requests/{id}/approval"),
            Some(&world.patient.token),
        )
        .await
        .ok(200);
    }
    id
}

#[actix_rt::test]
async fn every_endpoint_enforces_role_and_ownership() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start(backend).await else {
            continue;
        };
        let world = app.world().await;
        let patient = world.patient.id.clone();

        // The patient has a lab result and has granted `doctor` access to lab results;
        // `other_doctor` never dealt with the patient.
        let record = app
            .upload(
                &world.patient.token,
                &patient,
                "category=lab",
                "application/pdf",
                PDF,
            )
            .await
            .ok(201)["record_id"]
            .as_str()
            .unwrap()
            .to_owned();
        lab_request(&app, &world, true).await;
        // One request for each decision the patient takes in the table.
        let to_approve = lab_request(&app, &world, false).await;
        let to_reject = lab_request(&app, &world, false).await;
        let to_revoke = lab_request(&app, &world, true).await;

        let new_request = json!({"patient_id": patient, "categories": ["lab"],
                                 "purpose": "Diabetes follow-up", "duration_days": 30});
        let (get, post, delete) = (Method::GET, Method::POST, Method::DELETE);
        let doctor = &world.doctor.id;
        let unverified = &world.unverified_doctor.id;
        // The order matters where a call changes what the next rows see: `other_doctor`
        // asks for access only after the record's existence was hidden from them, and
        // the unverified doctor is verified last.
        #[rustfmt::skip]
        let rows = [
              // anon  owner              other patient      doctor             other doctor       unverified doctor  registrar          auditor
            row(get.clone(), "/v1/sessions/current".to_owned(), Payload::None,
                [ANON, Role("patient"),   Role("patient"),   Role("doctor"),    Role("doctor"),    Role("doctor"),    Role("registrar"), Role("auditor")]),
            row(post.clone(), format!("/v1/patients/{patient}/records?category=lab"), Payload::Pdf,
                [ANON, Allow(201),        NOT_YOURS,         ROLE,              ROLE,              ROLE,              ROLE,              ROLE]),
            row(get.clone(), format!("/v1/patients/{patient}/records"), Payload::None,
                [ANON, Allow(200),        NOT_YOURS,         Allow(200),        NO_GRANT,          NO_GRANT,          ROLE,              ROLE]),
            row(get.clone(), format!("/v1/records/{record}/content"), Payload::None,
                [ANON, Allow(200),        HIDDEN,            Allow(200),        HIDDEN,            HIDDEN,            ROLE,              ROLE]),
            row(get.clone(), format!("/v1/patients/{patient}/access-requests"), Payload::None,
                [ANON, Allow(200),        NOT_YOURS,         ROLE,              ROLE,              ROLE,              ROLE,              ROLE]),
            row(post.clone(), "/v1/access-requests".to_owned(), Payload::Json(new_request),
                [ANON, ROLE,              ROLE,              Allow(201),        Allow(201),        UNVERIFIED,        ROLE,              ROLE]),
            row(post.clone(), format!("/v1/access-requests/{to_approve}/approval"), Payload::None,
                [ANON, Allow(200),        NOT_THE_PATIENT,   ROLE,              ROLE,              ROLE,              ROLE,              ROLE]),
            row(post.clone(), format!("/v1/access-requests/{to_reject}/rejection"), Payload::None,
                [ANON, Allow(200),        NOT_THE_PATIENT,   ROLE,              ROLE,              ROLE,              ROLE,              ROLE]),
            row(post.clone(), format!("/v1/access-requests/{to_revoke}/revocation"), Payload::None,
                [ANON, Allow(200),        NOT_THE_PATIENT,   ROLE,              ROLE,              ROLE,              ROLE,              ROLE]),
            row(get.clone(), format!("/v1/doctors/{doctor}/grants"), Payload::None,
                [ANON, ROLE,              ROLE,              Allow(200),        NOT_YOURS,         NOT_YOURS,         ROLE,              ROLE]),
            row(get.clone(), format!("/v1/patients/{patient}/access-log"), Payload::None,
                [ANON, Allow(200),        NOT_YOURS,         ROLE,              ROLE,              ROLE,              ROLE,              Allow(200)]),
            fresh_sessions(row(delete, "/v1/sessions/current".to_owned(), Payload::None,
                [ANON, Allow(204),        Allow(204),        Allow(204),        Allow(204),        Allow(204),        Allow(204),        Allow(204)])),
            row(post.clone(), format!("/v1/doctors/{unverified}/verification"), Payload::None,
                [ANON, ROLE,              ROLE,              ROLE,              ROLE,              ROLE,              Allow(200),        ROLE]),
        ];
        for row in &rows {
            check(&app, &world, row).await;
        }

        // The world's own tokens outlived the throwaway sessions ended above.
        for party in [&world.patient, &world.doctor, &world.registrar] {
            app.get("/v1/sessions/current", Some(&party.token))
                .await
                .ok(200);
        }

        // What anybody may call.
        let phone = app.phone();
        let open = [
            app.post(
                "/v1/patients",
                None,
                TestApp::patient_body(&phone, "Wanjiru Kariuki"),
            )
            .await,
            app.post(
                "/v1/doctors",
                None,
                json!({"phone": app.phone(), "password": "a long enough secret",
                       "name": "Dr Wafula", "license_number": "KMPDC-0099"}),
            )
            .await,
            app.post(
                "/v1/sessions",
                None,
                json!({"phone": phone, "password": crate::app::password_of(&phone)}),
            )
            .await,
            app.get("/healthz", None).await,
            app.get("/readyz", None).await,
            app.get("/metrics", None).await,
            app.get("/v1/openapi.json", None).await,
        ];
        let paths = [
            "POST /v1/patients",
            "POST /v1/doctors",
            "POST /v1/sessions",
            "GET /healthz",
            "GET /readyz",
            "GET /metrics",
            "GET /v1/openapi.json",
        ];
        for (r, path) in open.iter().zip(paths) {
            assert_ne!(r.status, 401, "{backend:?} {path}: {}", r.text());
            assert!(
                (200..300).contains(&r.status),
                "{backend:?} {path}: {} {}",
                r.status,
                r.text()
            );
        }

        app.stop().await;
    }
}
