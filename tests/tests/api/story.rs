//! The whole consent story as a user script, on both backends.

use eventstore::testing::BACKENDS;
use serde_json::json;

use crate::app::{password_of, TestApp};

const PDF: &[u8] =
    b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\nHbA1c 9.1% Achieng Otieno\n%%EOF\n";

#[actix_rt::test]
async fn a_patient_shares_a_lab_result_with_a_doctor_and_takes_it_back() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start(backend).await else {
            continue;
        };
        // A patient and a doctor sign up; a registrar (made by an operator) verifies.
        let patient_phone = app.phone();
        let patient_id = app.sign_up_patient(&patient_phone, "Achieng Otieno").await;
        let doctor_phone = app.phone();
        let doctor_id = app
            .sign_up_doctor(&doctor_phone, "Dr Kamau", "KMPDC-0042")
            .await;
        let registrar_phone = app.phone();
        app.add_staff("registrar", &registrar_phone, "Rehema Registrar");
        let registrar = app.sign_in(&registrar_phone).await;
        let verified = app
            .post_empty(
                &format!("/v1/doctors/{doctor_id}/verification"),
                Some(&registrar),
            )
            .await
            .ok(200);
        assert_eq!(
            verified,
            json!({"doctor_id": doctor_id, "status": "verified"})
        );

        let session = app
            .post(
                "/v1/sessions",
                None,
                json!({"phone": patient_phone, "password": password_of(&patient_phone)}),
            )
            .await
            .ok(200);
        assert_eq!(session["role"], "patient");
        assert_eq!(session["subject_id"], patient_id.as_str());
        assert!(session["expires_at"].as_str().unwrap() > "2026");
        let patient = session["token"].as_str().unwrap().to_owned();
        let doctor = app.sign_in(&doctor_phone).await;

        // The patient uploads a PDF; their next query shows it (read-your-writes).
        let uploaded = app
            .upload(
                &patient,
                &patient_id,
                "category=lab&filename=hba1c-results.pdf",
                "application/pdf",
                PDF,
            )
            .await
            .ok(201);
        let record_id = uploaded["record_id"].as_str().unwrap().to_owned();
        assert_eq!(uploaded["size"], PDF.len());
        let sha256 = uploaded["sha256"].as_str().unwrap().to_owned();
        assert_eq!(sha256.len(), 64);
        let list = app
            .get(
                &format!("/v1/patients/{patient_id}/records"),
                Some(&patient),
            )
            .await
            .ok(200);
        assert_eq!(list["next_cursor"], json!(null));
        let item = &list["items"][0];
        assert_eq!(
            (item["record_id"].as_str(), item["category"].as_str()),
            (Some(record_id.as_str()), Some("lab"))
        );
        assert_eq!(item["content_type"], "application/pdf");
        assert_eq!(item["filename"], "hba1c-results.pdf");
        assert_eq!(
            (item["size"].as_u64(), item["sha256"].as_str()),
            (Some(PDF.len() as u64), Some(sha256.as_str()))
        );
        assert!(item["uploaded_at"].is_string());

        // The doctor asks for lab results; the patient sees the request at once.
        let request = app
            .request_access(
                &crate::app::Party {
                    id: doctor_id.clone(),
                    phone: doctor_phone.clone(),
                    token: doctor.clone(),
                },
                &patient_id,
                &["lab"],
            )
            .await
            .ok(201);
        assert_eq!(request["status"], "pending");
        let request_id = request["request_id"].as_str().unwrap().to_owned();
        let pending = app
            .get(
                &format!("/v1/patients/{patient_id}/access-requests?status=pending"),
                Some(&patient),
            )
            .await
            .ok(200);
        let asked = &pending["items"][0];
        assert_eq!(asked["request_id"], request_id.as_str());
        assert_eq!(asked["doctor_id"], doctor_id.as_str());
        assert_eq!(asked["doctor_licence"], "KMPDC-0042");
        assert_eq!(asked["doctor_verified"], true);
        assert_eq!(asked["categories"], json!(["lab"]));
        assert_eq!(asked["purpose"], "Diabetes follow-up");
        assert_eq!(asked["duration_days"], 30);

        // The patient approves; the doctor's grants show it at once.
        let approved = app
            .post_empty(
                &format!("/v1/access-requests/{request_id}/approval"),
                Some(&patient),
            )
            .await
            .ok(200);
        assert_eq!(approved["status"], "approved");
        assert_eq!(approved["categories"], json!(["lab"]));
        let grants = app
            .get(&format!("/v1/doctors/{doctor_id}/grants"), Some(&doctor))
            .await
            .ok(200);
        assert_eq!(grants["items"][0]["request_id"], request_id.as_str());
        assert_eq!(grants["items"][0]["patient_id"], patient_id.as_str());
        let approved_list = app
            .get(
                &format!("/v1/patients/{patient_id}/access-requests?status=approved"),
                Some(&patient),
            )
            .await
            .ok(200);
        assert_eq!(approved_list["items"].as_array().unwrap().len(), 1);

        // The doctor sees the covered record and downloads the exact bytes.
        let doctors_view = app
            .get(&format!("/v1/patients/{patient_id}/records"), Some(&doctor))
            .await
            .ok(200);
        assert_eq!(doctors_view["items"][0]["record_id"], record_id.as_str());
        let before = app.event_count().await;
        let download = app
            .get(&format!("/v1/records/{record_id}/content"), Some(&doctor))
            .await;
        assert_eq!(download.status, 200, "{}", download.text());
        assert_eq!(download.body, PDF, "{backend:?}: the exact bytes");
        assert_eq!(
            download.header("content-type").as_deref(),
            Some("application/pdf")
        );
        assert_eq!(
            download.header("cache-control").as_deref(),
            Some("no-store")
        );
        let disposition = download.header("content-disposition").unwrap_or_default();
        assert!(
            disposition.contains("filename=\"hba1c-results.pdf\""),
            "{disposition}"
        );
        assert_eq!(app.event_count().await, before + 1, "the read was recorded");

        // The patient's own read records nothing.
        let own = app
            .get(&format!("/v1/records/{record_id}/content"), Some(&patient))
            .await;
        assert_eq!((own.status, own.body.as_slice()), (200, PDF));
        assert_eq!(app.event_count().await, before + 1);

        // The patient sees the doctor's read in the access log.
        let log = app
            .get(
                &format!("/v1/patients/{patient_id}/access-log"),
                Some(&patient),
            )
            .await
            .ok(200);
        let items = log["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "{backend:?}: {log}");
        assert_eq!(items[0]["doctor_id"], doctor_id.as_str());
        assert_eq!(items[0]["record_id"], record_id.as_str());
        assert_eq!(items[0]["request_id"], request_id.as_str());
        assert!(items[0]["at"].is_string());

        // The patient revokes: the doctor's next read is refused and appends nothing.
        let revoked = app
            .post_empty(
                &format!("/v1/access-requests/{request_id}/revocation"),
                Some(&patient),
            )
            .await
            .ok(200);
        assert_eq!(revoked["status"], "revoked");
        let before = app.event_count().await;
        app.get(&format!("/v1/records/{record_id}/content"), Some(&doctor))
            .await
            .problem(403, "grant_not_active");
        assert_eq!(
            app.event_count().await,
            before,
            "{backend:?}: a refused read appends nothing"
        );
        let grants = app
            .get(&format!("/v1/doctors/{doctor_id}/grants"), Some(&doctor))
            .await
            .ok(200);
        assert_eq!(grants["items"], json!([]));
        let log = app
            .get(
                &format!("/v1/patients/{patient_id}/access-log"),
                Some(&patient),
            )
            .await
            .ok(200);
        assert_eq!(log["items"].as_array().unwrap().len(), 1);

        // Sign-out: the token is refused from then on.
        let out = app.delete("/v1/sessions/current", Some(&patient)).await;
        assert_eq!(out.status, 204);
        app.get(
            &format!("/v1/patients/{patient_id}/records"),
            Some(&patient),
        )
        .await
        .problem(401, "token_revoked");

        // Neither the blobs nor the event store hold the file, the name, the phone,
        // the filename, the purpose or a password.
        let blobs = app.blobs();
        assert_eq!(blobs.len(), 1, "{backend:?}");
        assert!(!blobs[0].windows(5).any(|w| w == b"HbA1c" || w == b"%PDF-"));
        assert!(!blobs[0].windows(PDF.len()).any(|w| w == PDF));
        let raw = app.raw_events().await;
        assert!(raw.contains("RecordAccessed") && raw.contains("AccountOpened"));
        for plain in [
            "Achieng",
            "Otieno",
            "Dr Kamau",
            "Rehema",
            patient_phone.as_str(),
            doctor_phone.as_str(),
            "1987-03-14",
            "hba1c-results",
            "Diabetes follow-up",
            "HbA1c",
            "%PDF",
            "correct horse",
            "$argon2id",
            "afy1.",
        ] {
            assert!(
                !raw.contains(plain),
                "{backend:?}: the event store holds {plain:?}"
            );
        }

        // Nor do the logs: request ids and opaque ids only.
        let logs = app.stop().await;
        assert!(logs.contains("request_id="), "{logs}");
        for secret in [
            "Achieng",
            "Kamau",
            patient_phone.as_str(),
            &patient_phone[3..],
            doctor_phone.as_str(),
            "correct horse",
            "hba1c",
            "HbA1c",
            "Diabetes",
            patient.as_str(),
            doctor.as_str(),
            registrar.as_str(),
            "afy1.",
        ] {
            assert!(
                !logs.contains(secret),
                "{backend:?}: the logs hold {secret:?}"
            );
        }
    }
}

#[actix_rt::test]
async fn a_doctor_may_name_the_grant_and_a_stranger_naming_it_learns_nothing() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start(backend).await else {
            continue;
        };
        let w = app.world().await;
        let (record_id, request_id) = app.share(&w, "imaging", "image/png", b"\x89PNG scan").await;
        let content = format!("/v1/records/{record_id}/content?request_id={request_id}");
        let read = app.get(&content, Some(&w.doctor.token)).await;
        assert_eq!(
            (read.status, read.body.as_slice()),
            (200, b"\x89PNG scan".as_slice())
        );
        assert_eq!(read.header("content-type").as_deref(), Some("image/png"));
        let log = app
            .get(
                &format!("/v1/patients/{}/access-log", w.patient.id),
                Some(&w.patient.token),
            )
            .await
            .ok(200);
        assert_eq!(log["items"][0]["request_id"], request_id);

        // Another doctor naming that grant: as if the record did not exist.
        let before = app.event_count().await;
        app.get(&content, Some(&w.other_doctor.token))
            .await
            .problem(404, "record_not_found");
        app.get(
            &format!("/v1/records/{record_id}/content?request_id=nope"),
            Some(&w.doctor.token),
        )
        .await
        .problem(422, "invalid_request");
        assert_eq!(app.event_count().await, before, "{backend:?}");
        app.stop().await;
    }
}

#[actix_rt::test]
async fn an_idempotency_key_never_replays_a_read_past_a_revocation() {
    for backend in BACKENDS {
        let Some(app) = TestApp::start(backend).await else {
            continue;
        };
        let w = app.world().await;
        let (record_id, request_id) = app.share(&w, "lab", "application/pdf", PDF).await;
        let content = format!("/v1/records/{record_id}/content");
        let read = || {
            app.send(
                reqwest::Method::GET,
                &content,
                Some(&w.doctor.token),
                &[("idempotency-key", "read-1")],
                None,
            )
        };
        // Each read under the same key is checked and recorded anew.
        let before = app.event_count().await;
        assert_eq!(read().await.status, 200);
        assert_eq!(read().await.status, 200);
        assert_eq!(
            app.event_count().await,
            before + 2,
            "{backend:?}: two reads, two records"
        );
        app.post_empty(
            &format!("/v1/access-requests/{request_id}/revocation"),
            Some(&w.patient.token),
        )
        .await
        .ok(200);
        let after = app.event_count().await;
        read().await.problem(403, "grant_not_active");
        assert_eq!(app.event_count().await, after);
        let log = app
            .get(
                &format!("/v1/patients/{}/access-log", w.patient.id),
                Some(&w.patient.token),
            )
            .await
            .ok(200);
        assert_eq!(log["items"].as_array().unwrap().len(), 2);
        app.stop().await;
    }
}
