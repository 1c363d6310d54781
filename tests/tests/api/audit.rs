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
    let (record_id, request_id) = app.share_read_revoke(&w, b"%PDF HbA1c Achieng").await;
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

/// Waits until the audit trail holds everything in the log (up to 20 s).
async fn settled(app: &TestApp) -> i64 {
    settled_within(app, 20, 50).await
}

/// Waits up to `secs`, looking every `poll_ms`, until the audit trail holds everything
/// in the log; returns the number of events.
async fn settled_within(app: &TestApp, secs: u64, poll_ms: u64) -> i64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let total = app.event_count().await;
        let trail = app.scalar("SELECT count(*) FROM rm_audit_trail").await;
        if trail == total {
            return total;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the audit trail stays at {trail} of {total} events"
        );
        tokio::time::sleep(std::time::Duration::from_millis(poll_ms)).await;
    }
}

async fn export_lines(app: &TestApp, token: &str, query: &str) -> Vec<Value> {
    let resp = app
        .get(&format!("/v1/audit/events/export?{query}"), Some(token))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        resp.header("content-type").as_deref(),
        Some("application/x-ndjson")
    );
    resp.text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[actix_rt::test]
async fn the_trail_detects_tampering_exports_and_answers_the_auditors_questions() {
    for backend in eventstore::testing::BACKENDS {
        tamper_evidence(backend).await;
    }
}

async fn tamper_evidence(backend: Backend) {
    let Some(app) = TestApp::start(backend).await else {
        return;
    };
    let w = app.world().await;
    let (record_id, request_id) = app.share_read_revoke(&w, b"%PDF lipid panel").await;
    // After the revocation the domain refuses the read; nothing is logged.
    let refused = app
        .get(
            &format!("/v1/records/{record_id}/content?request_id={request_id}"),
            Some(&w.doctor.token),
        )
        .await;
    assert_eq!(refused.status, 403, "{}", refused.text());
    let auditor = w.auditor.token.clone();
    let total = settled(&app).await;

    // A sound history: the chain holds and the auditor's questions find nothing.
    let report = app.get("/v1/audit/verify", Some(&auditor)).await.ok(200);
    assert_eq!(report["intact"], true, "{report}");
    assert_eq!(report["checked"], total);
    assert_eq!(report["from"], 1);
    assert_eq!(report["to"], total);
    for path in [
        "/v1/audit/findings/uncovered-reads",
        "/v1/audit/findings/reads-after-revocation",
    ] {
        let found = app.get(path, Some(&auditor)).await.ok(200);
        assert_eq!(found["items"], serde_json::json!([]), "{path}: {found}");
    }

    // The export is the history, one event per line; a filter, a cursor and a limit
    // narrow it.
    let whole = all_pages(&app, &auditor, "", 100).await;
    let exported = export_lines(&app, &auditor, "").await;
    assert_eq!(exported, whole);
    assert_eq!(whole.last().unwrap()["hash"], report["head"]);
    let reads = export_lines(&app, &auditor, "event_type=RecordAccessed").await;
    assert_eq!(reads.len(), 1);
    let read_position = reads[0]["position"].as_i64().unwrap();
    let tail = export_lines(&app, &auditor, "cursor=3&limit=4").await;
    assert_eq!(tail, whole[3..7].to_vec());
    // All actions of one doctor in a period: the history filtered by actor and time.
    let doctor = export_lines(
        &app,
        &auditor,
        &format!(
            "actor=doctor:{}&from_time=2000-01-01T00:00:00Z&to_time=2999-01-01T00:00:00Z",
            w.doctor.id
        ),
    )
    .await;
    let types: BTreeSet<&str> = doctor
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert!(
        types.contains("AccessRequested") && types.contains("RecordAccessed"),
        "{types:?}"
    );
    assert!(doctor
        .iter()
        .all(|e| e["actor"] == format!("doctor:{}", w.doctor.id)));

    // Reads that bypassed the domain (written straight into the log): one after the
    // revocation, one naming no request. The questions find exactly those.
    let (after_revocation, no_request) = match backend {
        Backend::Postgres => (
            "jsonb_set(payload::jsonb, '{RecordAccessed,accessed_at}', '\"2999-01-01T00:00:00.000000Z\"')::json",
            "(payload::jsonb #- '{RecordAccessed,request_id}')::json",
        ),
        Backend::Sqlite => (
            "json_set(payload, '$.RecordAccessed.accessed_at', '2999-01-01T00:00:00.000000Z')",
            "json_remove(payload, '$.RecordAccessed.request_id')",
        ),
    };
    let strip_key = match backend {
        Backend::Postgres => "(metadata::jsonb - 'idempotency_key')::json",
        Backend::Sqlite => "json_remove(metadata, '$.idempotency_key')",
    };
    for (offset, payload) in [(100, after_revocation), (101, no_request)] {
        let forged = app
            .tamper(&format!(
                "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
                 event_version, payload, metadata) SELECT aggregate_type, aggregate_id, \
                 sequence + {offset}, event_type, event_version, {payload}, {strip_key} \
                 FROM events WHERE position = {read_position}"
            ))
            .await;
        assert_eq!(forged, 1);
    }
    let total = settled(&app).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let uncovered = loop {
        let found = app
            .get("/v1/audit/findings/uncovered-reads", Some(&auditor))
            .await
            .ok(200);
        if found["items"].as_array().unwrap().len() >= 2 || std::time::Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let reasons: Vec<&str> = uncovered["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["after_revocation", "no_request"], "{uncovered}");
    assert_eq!(uncovered["items"][0]["request_id"], request_id.as_str());
    assert_eq!(
        uncovered["items"][0]["accessor"],
        format!("doctor:{}", w.doctor.id)
    );
    let after_end = app
        .get("/v1/audit/findings/reads-after-revocation", Some(&auditor))
        .await
        .ok(200);
    assert_eq!(
        after_end["items"].as_array().unwrap().len(),
        1,
        "{after_end}"
    );
    assert_eq!(after_end["items"][0]["reason"], "after_revocation");
    let page = app
        .get("/v1/audit/findings/uncovered-reads?limit=1", Some(&auditor))
        .await
        .ok(200);
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let next = page["next_cursor"].as_i64().unwrap();
    let rest = app
        .get(
            &format!("/v1/audit/findings/uncovered-reads?limit=1&cursor={next}"),
            Some(&auditor),
        )
        .await
        .ok(200);
    assert_eq!(rest["items"][0]["reason"], "no_request");
    assert_eq!(rest["next_cursor"], Value::Null);

    // Inserted events are chained like any other: still intact.
    let report = app.get("/v1/audit/verify", Some(&auditor)).await.ok(200);
    assert_eq!(report["intact"], true, "{report}");
    assert_eq!(report["checked"], total);

    // Tampering: one event's payload edited, another deleted. Each is reported at its
    // place, and only there; a range that excludes both still verifies.
    let whole = all_pages(&app, &auditor, "", 100).await;
    let edited = &whole[4];
    let deleted = &whole[6];
    let edit = match backend {
        Backend::Postgres => "(payload::jsonb || '{\"tampered\": true}'::jsonb)::json",
        Backend::Sqlite => "json_set(payload, '$.tampered', json('true'))",
    };
    let changed = app
        .tamper(&format!(
            "UPDATE events SET payload = {edit} WHERE position = {}",
            edited["position"]
        ))
        .await;
    assert_eq!(changed, 1);
    let removed = app
        .tamper(&format!(
            "DELETE FROM events WHERE position = {}",
            deleted["position"]
        ))
        .await;
    assert_eq!(removed, 1);
    let report = app.get("/v1/audit/verify", Some(&auditor)).await.ok(200);
    assert_eq!(report["intact"], false, "{report}");
    assert_eq!(report["problems_total"], 2, "{report}");
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems[0]["problem"], "modified");
    assert_eq!(problems[0]["ordinal"], edited["ordinal"]);
    assert_eq!(problems[0]["event_id"], edited["event_id"]);
    assert_eq!(problems[1]["problem"], "missing");
    assert_eq!(problems[1]["position"], deleted["position"]);
    let range = app
        .get("/v1/audit/verify?from=1&to=4", Some(&auditor))
        .await
        .ok(200);
    assert_eq!(range["intact"], true, "{range}");
    assert_eq!(range["checked"], 4);
    let later = app
        .get("/v1/audit/verify?from=8", Some(&auditor))
        .await
        .ok(200);
    assert_eq!(later["intact"], true, "{later}");
    // Rewriting the recorded link to cover the edit breaks the next link instead.
    let recomputed = app
        .tamper(&format!(
            "UPDATE rm_audit_trail SET hash = '{}' WHERE ordinal = {}",
            "0".repeat(64),
            edited["ordinal"]
        ))
        .await;
    assert_eq!(recomputed, 1);
    let report = app
        .get("/v1/audit/verify?from=1&to=6", Some(&auditor))
        .await
        .ok(200);
    let at: Vec<i64> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["ordinal"].as_i64().unwrap())
        .collect();
    let o = edited["ordinal"].as_i64().unwrap();
    assert_eq!(at, [o, o + 1], "{report}");

    // Rewriting who did something in the trail (to hide it from the actor filter) is
    // caught too: the trail's copy no longer matches the log.
    let hidden = app
        .tamper("UPDATE rm_audit_trail SET actor = 'system' WHERE ordinal = 2")
        .await;
    assert_eq!(hidden, 1);
    let report = app
        .get("/v1/audit/verify?from=1&to=3", Some(&auditor))
        .await
        .ok(200);
    assert_eq!(report["problems"][0]["problem"], "altered", "{report}");
    assert_eq!(report["problems"][0]["ordinal"], 2);
    assert_eq!(report["problems_total"], 1, "{report}");

    // A rebuild would re-chain the tampered log: refused while the trail shows it.
    let (ok, _, err) = app.env.run(&["projections", "rebuild", "audit_trail"]);
    assert!(!ok && err.contains("does not verify"), "{err}");

    // Only auditors; bad ranges and limits are refused.
    for path in [
        "/v1/audit/verify",
        "/v1/audit/events/export",
        "/v1/audit/findings/uncovered-reads",
        "/v1/audit/findings/reads-after-revocation",
    ] {
        for who in [&w.patient, &w.doctor, &w.registrar] {
            app.get(path, Some(&who.token))
                .await
                .problem(403, "role_forbidden");
        }
        app.get(path, None).await.problem(401, "unauthenticated");
    }
    for bad in [
        "/v1/audit/verify?from=-1",
        "/v1/audit/verify?from=5&to=2",
        "/v1/audit/verify?to=x",
        "/v1/audit/events/export?limit=0",
        "/v1/audit/events/export?cursor=-3",
        "/v1/audit/events/export?from_time=noon",
        "/v1/audit/findings/uncovered-reads?limit=1000",
    ] {
        app.get(bad, Some(&auditor))
            .await
            .problem(422, "invalid_request");
    }
    app.stop().await;
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// A million events exported through one request: every line arrives, in order, and
/// the server's memory stays flat (the export holds one batch at a time, however
/// long the range). On the embedded default; the query is the same on PostgreSQL.
#[actix_rt::test]
async fn a_million_events_export_with_flat_memory() {
    // Not alone: it keeps one core busy for minutes but asserts no timings, so the
    // shared tests run beside it (scripts/test's first pass).
    const EVENTS: i64 = 1_000_000;
    let Some(app) = TestApp::start(Backend::Sqlite).await else {
        return;
    };
    let w = app.world().await;
    // A million sign-outs, written straight into the log (the domain would take an
    // hour to sign that many people out; the export does not care how they came).
    let inserted = app.insert_sign_outs(EVENTS, true).await;
    assert_eq!(inserted as i64, EVENTS);
    let total = settled_within(&app, 1200, 500).await;
    let pid = app.server.child.id();
    let before = rss_kib(pid);
    let mut resp = app
        .http
        .get(app.server.url("/v1/audit/events/export"))
        .bearer_auth(&w.auditor.token)
        .timeout(std::time::Duration::from_secs(1200))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (mut lines, mut bytes, mut peak) = (0i64, 0u64, before);
    let mut last_position = 0i64;
    let mut partial: Vec<u8> = Vec::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        bytes += chunk.len() as u64;
        partial.extend_from_slice(&chunk);
        while let Some(end) = partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = partial.drain(..=end).collect();
            lines += 1;
            if lines % 50_000 == 0 || lines == total {
                let event: Value = serde_json::from_slice(&line).unwrap();
                let position = event["position"].as_i64().unwrap();
                assert!(position > last_position);
                last_position = position;
                peak = peak.max(rss_kib(pid));
            }
        }
    }
    assert!(partial.is_empty());
    assert_eq!(lines, total);
    let growth = peak.saturating_sub(before);
    println!(
        "exported {lines} events, {} MiB; server RSS {} MiB before, peak {} MiB (+{} MiB)",
        bytes >> 20,
        before >> 10,
        peak >> 10,
        growth >> 10
    );
    assert!(
        bytes > 300 << 20,
        "the export is larger than the memory bound it is held to"
    );
    assert!(
        growth < 64 << 10,
        "the server grew by {growth} KiB while exporting"
    );
    // A dozen projections took the burst together on SQLite's one writer, each batch
    // waiting its turn: none failed for a lock and fell behind.
    let logs = app.stop().await;
    assert!(
        !logs.contains("database is locked"),
        "a projection's batch failed on SQLite's lock: {}",
        logs.lines()
            .find(|l| l.contains("database is locked"))
            .unwrap_or_default()
    );
}
