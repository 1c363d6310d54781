//! Who is who, for the pages: the registrar's verification queue with doctors' names,
//! and the access requests seen by the patient (with the asking doctor's name) and by
//! the doctor who made them.

use eventstore::Backend;
use serde_json::Value;

use crate::app::TestApp;

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["doctor_id"].as_str().unwrap().to_owned())
        .collect()
}

#[actix_rt::test]
async fn registrars_see_the_queue_and_both_parties_see_requests_with_names() {
    for backend in eventstore::testing::BACKENDS {
        directory(backend).await;
    }
}

async fn directory(backend: Backend) {
    let Some(app) = TestApp::start(backend).await else {
        return;
    };
    let w = app.world().await;
    let registrar = w.registrar.token.as_str();

    // The queue: the unverified doctor, by name and licence, never a phone number.
    let queue = app
        .get("/v1/doctors?status=unverified", Some(registrar))
        .await
        .ok(200);
    assert_eq!(ids(&queue), std::slice::from_ref(&w.unverified_doctor.id));
    let waiting = &queue["items"][0];
    assert_eq!(waiting["name"], "Dr Otieno");
    assert_eq!(waiting["licence"], "KMPDC-0044");
    assert_eq!(waiting["status"], "unverified");
    assert!(!queue.to_string().contains(&w.unverified_doctor.phone[3..]));
    let verified = app
        .get("/v1/doctors?status=verified", Some(registrar))
        .await
        .ok(200);
    assert_eq!(
        ids(&verified),
        [w.doctor.id.clone(), w.other_doctor.id.clone()]
    );
    // Verified, it leaves the queue.
    app.verify(&w.registrar, &w.unverified_doctor.id)
        .await
        .ok(200);
    let queue = app
        .get("/v1/doctors?status=unverified", Some(registrar))
        .await
        .ok(200);
    assert_eq!(queue["items"], serde_json::json!([]));
    // All of them, a page at a time.
    let first = app
        .get("/v1/doctors?limit=2", Some(registrar))
        .await
        .ok(200);
    assert_eq!(first["items"].as_array().unwrap().len(), 2);
    let cursor = first["next_cursor"].as_i64().unwrap();
    let rest = app
        .get(
            &format!("/v1/doctors?limit=2&cursor={cursor}"),
            Some(registrar),
        )
        .await
        .ok(200);
    assert_eq!(ids(&rest), std::slice::from_ref(&w.unverified_doctor.id));
    assert_eq!(rest["next_cursor"], Value::Null);
    for who in [&w.patient, &w.doctor, &w.auditor] {
        app.get("/v1/doctors", Some(&who.token))
            .await
            .problem(403, "role_forbidden");
    }
    app.get("/v1/doctors?status=retired", Some(registrar))
        .await
        .problem(422, "invalid_request");

    // A request, as the patient sees it (the doctor by name) and as the doctor does.
    let (_, request_id) = app
        .share(&w, "lab", "application/pdf", b"%PDF lipid panel")
        .await;
    app.request_access(&w.doctor, &w.patient.id, &["imaging"])
        .await
        .ok(201);
    let mine = app
        .get(
            &format!("/v1/patients/{}/access-requests", w.patient.id),
            Some(&w.patient.token),
        )
        .await
        .ok(200);
    let items = mine["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert!(items.iter().all(|r| r["doctor_name"] == "Dr Kamau"
        && r["doctor_licence"] == "KMPDC-0042"
        && r["doctor_verified"] == true
        && r["purpose"] == "Diabetes follow-up"));
    let path = format!("/v1/doctors/{}/access-requests", w.doctor.id);
    let theirs = app.get(&path, Some(&w.doctor.token)).await.ok(200);
    let items = theirs["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["request_id"], request_id.as_str());
    assert_eq!(items[0]["status"], "approved");
    assert_eq!(items[0]["patient_id"], w.patient.id.as_str());
    assert_eq!(items[1]["status"], "pending");
    // The purpose is sealed for the patient: the doctor's list leaves it out.
    assert!(items.iter().all(|r| r["purpose"].is_null()));
    let pending = app
        .get(&format!("{path}?status=pending"), Some(&w.doctor.token))
        .await
        .ok(200);
    assert_eq!(pending["items"].as_array().unwrap().len(), 1);
    app.get(&path, Some(&w.other_doctor.token))
        .await
        .problem(403, "not_your_data");
    app.get(&path, Some(&w.patient.token))
        .await
        .problem(403, "role_forbidden");
    app.get(&format!("{path}?status=lost"), Some(&w.doctor.token))
        .await
        .problem(422, "invalid_request");
    app.stop().await;
}

#[actix_rt::test]
async fn patients_share_a_code_that_verified_doctors_resolve() {
    for backend in eventstore::testing::BACKENDS {
        share_codes(backend).await;
    }
}

async fn share_codes(backend: Backend) {
    let Some(app) = TestApp::start(backend).await else {
        return;
    };
    let w = app.world().await;
    let mine = format!("/v1/patients/{}/share-code", w.patient.id);
    app.get(&mine, Some(&w.patient.token))
        .await
        .problem(404, "share_code_not_found");
    let issued = app.post_empty(&mine, Some(&w.patient.token)).await.ok(201);
    let code = issued["code"].as_str().unwrap().to_owned();
    assert_eq!(code.len(), 11, "{code}");
    assert_eq!(&code[5..6], "-");
    let expires =
        chrono::DateTime::parse_from_rfc3339(issued["expires_at"].as_str().unwrap()).unwrap();
    let days = (expires.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_days();
    assert!((29..=30).contains(&days), "{days}");
    assert_eq!(app.get(&mine, Some(&w.patient.token)).await.ok(200), issued);
    let qr = app.get(&format!("{mine}/qr"), Some(&w.patient.token)).await;
    assert_eq!(qr.status, 200);
    assert_eq!(qr.header("content-type").as_deref(), Some("image/svg+xml"));
    assert!(
        qr.text().starts_with("<?xml") && qr.text().contains("<svg"),
        "{}",
        qr.text()
    );
    app.get(&format!("{mine}/qr"), Some(&w.doctor.token))
        .await
        .problem(403, "role_forbidden");

    // A verified doctor finds the patient by the code, however it is typed.
    for typed in [
        code.clone(),
        code.to_lowercase(),
        code.replace('-', ""),
        code.replace('-', " "),
    ] {
        let found = app
            .get(&format!("/v1/share-codes/{typed}"), Some(&w.doctor.token))
            .await
            .ok(200);
        assert_eq!(found["patient_id"], w.patient.id.as_str());
    }
    // ... and asks for access with what it names.
    app.request_access(&w.doctor, &w.patient.id, &["lab"])
        .await
        .ok(201);
    // Only verified doctors; only the patient sees or renews their code.
    app.get(
        &format!("/v1/share-codes/{code}"),
        Some(&w.unverified_doctor.token),
    )
    .await
    .problem(403, "doctor_not_verified");
    for who in [&w.patient, &w.registrar] {
        app.get(&format!("/v1/share-codes/{code}"), Some(&who.token))
            .await
            .problem(403, "role_forbidden");
    }
    app.get(&mine, Some(&w.other_patient.token))
        .await
        .problem(403, "not_your_data");
    app.post_empty(&mine, Some(&w.doctor.token))
        .await
        .problem(403, "role_forbidden");
    for bad in ["ZZZZZ-ZZZZZ", "abc", "UUUUU-UUUUU", "%3Cscript%3E"] {
        app.get(&format!("/v1/share-codes/{bad}"), Some(&w.doctor.token))
            .await
            .problem(404, "share_code_not_found");
    }

    // A new code replaces the old one.
    let renewed = app.post_empty(&mine, Some(&w.patient.token)).await.ok(201);
    let new_code = renewed["code"].as_str().unwrap().to_owned();
    assert_ne!(new_code, code);
    app.get(&format!("/v1/share-codes/{code}"), Some(&w.doctor.token))
        .await
        .problem(404, "share_code_not_found");
    app.get(
        &format!("/v1/share-codes/{new_code}"),
        Some(&w.doctor.token),
    )
    .await
    .ok(200);
    // The code is sealed in the log, never in clear.
    let raw = app.raw_events().await;
    assert!(raw.contains("ShareCodeIssued"));
    for c in [&code, &new_code] {
        assert!(
            !raw.contains(&c.replace('-', "")),
            "a share code in clear in the log"
        );
    }
    app.stop().await;
}
