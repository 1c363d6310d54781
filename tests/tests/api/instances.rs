//! Attempt limits are kept in the store, not in a process: on PostgreSQL two servers
//! on one database count the same attempts; on SQLite the count survives a restart.

use eventstore::testing::BACKENDS;
use eventstore::Backend;
use serde_json::json;

use crate::app::{password_of, TestApp};
use crate::support::Server;

const VARS: [(&str, &str); 3] = [
    ("AFYA_SIGNIN_MAX_FAILURES_PER_PHONE", "3"),
    ("AFYA_SIGNIN_MAX_FAILURES_PER_IP", "100"),
    ("AFYA_SHARE_CODE_MAX_MISSES_PER_DOCTOR", "4"),
];

/// The other instance: a second server on the same PostgreSQL database; on SQLite
/// (one process per file) the same server restarted.
fn other_instance(app: &mut TestApp, backend: Backend) -> Option<Server> {
    match backend {
        Backend::Postgres => Some(app.env.serve_with(&VARS)),
        Backend::Sqlite => {
            let vars: Vec<(String, String)> = VARS
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            app.restart("TERM", &vars);
            None
        }
    }
}

async fn sign_in_at(app: &TestApp, base: &str, phone: &str, password: &str) -> (u16, String) {
    let response = app
        .http
        .post(format!("{base}/v1/sessions"))
        .json(&json!({"phone": phone, "password": password}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

async fn look_up_at(app: &TestApp, base: &str, token: &str, code: &str) -> (u16, String) {
    let response = app
        .http
        .get(format!("{base}/v1/share-codes/{code}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

#[actix_rt::test]
async fn sign_in_and_share_code_limits_hold_across_instances_on_one_store() {
    for backend in BACKENDS {
        let Some(mut app) = TestApp::start_with(backend, &VARS).await else {
            continue;
        };
        let w = app.world().await;
        let code = app
            .post_empty(
                &format!("/v1/patients/{}/share-code", w.patient.id),
                Some(&w.patient.token),
            )
            .await
            .ok(201)["code"]
            .as_str()
            .unwrap()
            .to_owned();
        let phone = w.other_patient.phone.clone();
        let first = app.server.base.clone();
        // Two failures and two misses on the first instance.
        for _ in 0..2 {
            let (status, body) = sign_in_at(&app, &first, &phone, "wrong password!").await;
            assert_eq!(status, 401, "{body}");
            let (status, body) = look_up_at(&app, &first, &w.doctor.token, "ZZZZZ-ZZZZZ").await;
            assert_eq!(status, 404, "{body}");
        }
        let second_server = other_instance(&mut app, backend);
        let second = second_server
            .as_ref()
            .map_or_else(|| app.server.base.clone(), |s| s.base.clone());
        // The doctor's session token is honoured by any instance on the store.
        let doctor = w.doctor.token.clone();
        // One more failure and two more misses on the other: the limits are used up.
        let (status, body) = sign_in_at(&app, &second, &phone, "wrong password!").await;
        assert_eq!(status, 401, "{body}");
        for _ in 0..2 {
            let (status, body) = look_up_at(&app, &second, &doctor, "ZZZZZ-ZZZZZ").await;
            assert_eq!(status, 404, "{body}");
        }
        // Now the right password and the right code are refused on every instance.
        let mut bases = vec![second.clone()];
        if backend == Backend::Postgres {
            bases.push(first.clone());
        }
        for base in &bases {
            let (status, body) = sign_in_at(&app, base, &phone, &password_of(&phone)).await;
            assert_eq!(status, 429, "{body}");
            assert!(body.contains("too_many_attempts"), "{body}");
            let (status, body) = look_up_at(&app, base, &doctor, &code).await;
            assert_eq!(status, 429, "{body}");
        }
        // Another doctor's look-ups and another phone's sign-in are untouched.
        let (status, body) = look_up_at(&app, &second, &w.other_doctor.token, &code).await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = sign_in_at(
            &app,
            &second,
            &w.patient.phone,
            &password_of(&w.patient.phone),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        // The table keeps no phone index, id or address in the clear.
        let keys = app.scalar("SELECT COUNT(*) FROM rate_limits").await;
        assert!(keys >= 2, "{keys}");
        let leaked = app
            .scalar(&format!(
                "SELECT COUNT(*) FROM rate_limits WHERE key LIKE '%{}%' OR key LIKE '%127.0.0.1%'",
                w.doctor.id
            ))
            .await;
        assert_eq!(leaked, 0);
        if let Some(server) = second_server {
            assert!(server.terminate(), "the second server did not stop cleanly");
        }
        app.stop().await;
    }
}
