//! The event history for auditors: filters, pagination, metadata, roles, and no
//! personal data in clear.

use std::collections::BTreeSet;

use eventstore::Backend;
use serde_json::Value;

use crate::app::TestApp;

async fn all_pages(app: &TestApp, token: &str, query: &str, limit: usize) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<i64> = None;
    loop {
        let mut path = format!("/v1/audit/events?limit={limit}&{query}");
        if let Some(c) = cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = app.get(&path, Some(token)).await.ok(200);
        let got = page["items"].as_array().unwrap();
        assert!(got.len() <= limit);
        items.extend(got.iter().cloned());
        match page["next_cursor"].as_i64() {
            Some(c) => cursor = Some(c),
            None => return items,
        }
    }
}

#[actix_rt::test]
async fn auditors_query_the_event_history_by_filter_and_page() {
    for backend in eventstore::testing::BACKENDS {
        history(backend).await;
    }
}

async fn history(backend: Backend) {
    let Some(app) = TestApp::start(backend).await else {
        return;
    };
    let w = app.world().await;
    let (record_id, request_id) = app
        .share(&w, "lab", "application/pdf", b"%PDF HbA1c Achieng")
        .await;
    let read = app
        .get(
            &format!("/v1/records/{record_id}/content?request_id={request_id}"),
            Some(&w.doctor.token),
        )
        .await;
    assert_eq!(read.status, 200);
    app.post_empty(
        &format!("/v1/access-requests/{request_id}/revocation"),
        Some(&w.patient.token),
    )
    .await
    .ok(200);
    let auditor = w.auditor.token.clone();

    // Everything, in log order, with its metadata; pages add up to the whole.
    let total = app.event_count().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let whole = loop {
        // The history is a read model: it may trail the last command by a moment.
        let whole = all_pages(&app, &auditor, "", 100).await;
        if whole.len() as i64 >= total || std::time::Instant::now() > deadline {
            break whole;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(whole.len() as i64, total);
    let positions: Vec<i64> = whole
        .iter()
        .map(|e| e["position"].as_i64().unwrap())
        .collect();
    assert!(positions.windows(2).all(|p| p[0] < p[1]), "{positions:?}");
    for e in &whole {
        assert_eq!(e["event_id"].as_str().unwrap().len(), 36);
        assert!(e["correlation_id"].is_string());
        assert!(!e["actor"].as_str().unwrap().is_empty());
        assert!(e["recorded_at"].as_str().unwrap().ends_with('Z'));
    }
    let paged = all_pages(&app, &auditor, "", 3).await;
    assert_eq!(paged, whole, "pages of 3 are the whole, once each");
    let ids: BTreeSet<&str> = paged
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), whole.len());

    // Filters.
    let request = all_pages(
        &app,
        &auditor,
        &format!("aggregate_type=access_request&aggregate_id={request_id}"),
        100,
    )
    .await;
    let types: Vec<&str> = request
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["AccessRequested", "AccessApproved", "AccessRevoked"]
    );
    let reads = all_pages(&app, &auditor, "event_type=RecordAccessed", 100).await;
    assert_eq!(reads.len(), 1);
    assert_eq!(reads[0]["actor"], format!("doctor:{}", w.doctor.id));
    assert_eq!(
        reads[0]["payload"]["RecordAccessed"]["record_id"],
        record_id.as_str()
    );
    let by_patient = all_pages(
        &app,
        &auditor,
        &format!("actor=patient:{}", w.patient.id),
        100,
    )
    .await;
    assert!(!by_patient.is_empty());
    assert!(by_patient
        .iter()
        .all(|e| e["actor"] == format!("patient:{}", w.patient.id)));
    let middle = positions[positions.len() / 2];
    let later = all_pages(&app, &auditor, &format!("from_position={middle}"), 100).await;
    assert_eq!(
        later.len(),
        positions.iter().filter(|p| **p >= middle).count()
    );
    let none = all_pages(&app, &auditor, "from_time=2999-01-01T00:00:00Z", 100).await;
    assert!(none.is_empty());
    let all_time = all_pages(
        &app,
        &auditor,
        "from_time=2000-01-01T00:00:00Z&to_time=2999-01-01T00:00:00Z",
        100,
    )
    .await;
    assert_eq!(all_time.len(), whole.len());

    // Who did what, not the medical content or personal data.
    let text = serde_json::to_string(&whole).unwrap();
    for secret in [
        "Achieng",
        "Baraka",
        "Dr Kamau",
        "HbA1c",
        &w.patient.phone[3..],
    ] {
        assert!(!text.contains(secret), "{secret} in the audit history");
    }

    // The patient's disclosures: the doctor's read, with licence, request and purpose.
    let disclosures = app
        .get(
            &format!("/v1/audit/patients/{}/disclosures", w.patient.id),
            Some(&auditor),
        )
        .await
        .ok(200);
    let items = disclosures["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{disclosures}");
    let d = &items[0];
    assert_eq!(d["doctor_id"], w.doctor.id.as_str());
    assert_eq!(d["doctor_licence"], "KMPDC-0042");
    assert_eq!(d["record_id"], record_id.as_str());
    assert_eq!(d["category"], "lab");
    assert_eq!(d["request_id"], request_id.as_str());
    assert_eq!(d["purpose"], "Diabetes follow-up");
    assert_eq!(d["position"], reads[0]["position"]);
    // Nobody else's: another patient has none; only auditors may ask.
    let other = app
        .get(
            &format!("/v1/audit/patients/{}/disclosures", w.other_patient.id),
            Some(&auditor),
        )
        .await
        .ok(200);
    assert_eq!(other["items"].as_array().unwrap().len(), 0);
    for who in [&w.patient, &w.doctor, &w.registrar] {
        app.get(
            &format!("/v1/audit/patients/{}/disclosures", w.patient.id),
            Some(&who.token),
        )
        .await
        .problem(403, "role_forbidden");
    }

    // Only auditors; bad filters are refused.
    for who in [&w.patient, &w.doctor, &w.registrar] {
        app.get("/v1/audit/events", Some(&who.token))
            .await
            .problem(403, "role_forbidden");
    }
    app.get("/v1/audit/events", None)
        .await
        .problem(401, "unauthenticated");
    for bad in [
        "from_time=yesterday",
        "to_time=2026-13-01",
        "from_position=-1",
        "limit=0",
        "cursor=x",
    ] {
        app.get(&format!("/v1/audit/events?{bad}"), Some(&auditor))
            .await
            .problem(422, "invalid_request");
    }
    app.stop().await;
}
