//! The OpenAPI document against the server, by an independent tool: schemathesis
//! generates requests from `/v1/openapi.json` (valid ones and ones that break the
//! schema) for every operation, with each role's token, and checks every answer: no
//! 5xx (`not_a_server_error`), no status the document does not list for that
//! operation (`status_code_conformance`), and the documented media type
//! (`content_type_conformance`).
//!
//! Bounded for CI: a few examples per operation and role, a fixed seed (so a run is
//! repeatable; `AFYA_SCHEMATHESIS_SEED` picks another), every role on SQLite and the
//! doctor and the patient on PostgreSQL, about two and a half minutes in all on a
//! 2-core machine. The only target is the test's own server on loopback.
//! schemathesis comes from `scripts/tools` (`AFYA_SCHEMATHESIS`); without it the test
//! skips, except under `CI=true`, where it fails.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use eventstore::testing::{in_ci, BACKENDS};
use eventstore::Backend;
use serde_json::json;

use crate::app::{Party, TestApp};

/// The pinned version `scripts/tools` installs.
const VERSION: &str = "4.32.5";

/// Test cases per operation and phase.
const MAX_EXAMPLES: &str = "8";

/// Operations anyone may call: tested once, in the first run, not again for every role.
const OPEN: &[&str] = &[
    "healthz",
    "readyz",
    "metrics",
    "openapi",
    "client_config",
    "sign_up_patient",
    "sign_up_doctor",
    "sign_in",
    "stk_callback",
];

/// `st`: `AFYA_SCHEMATHESIS`, or where `scripts/tools` installs it.
fn schemathesis() -> Option<PathBuf> {
    let path = match std::env::var("AFYA_SCHEMATHESIS") {
        Ok(path) => PathBuf::from(path),
        Err(_) => std::env::var("AFYA_TOOLS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(std::env::var("HOME").unwrap_or_default())
                    .join(".cache/afyachain/tools")
            })
            .join(format!("schemathesis-{VERSION}/bin/st")),
    };
    if path.exists() {
        return Some(path);
    }
    if in_ci() {
        panic!(
            "CI=true and schemathesis is missing at {}: run scripts/tools",
            path.display()
        );
    }
    eprintln!(
        "SKIPPED: schemathesis missing at {} (AFYA_SCHEMATHESIS); run scripts/tools",
        path.display()
    );
    None
}

/// One run: a role's token and the ids its path parameters take.
struct Run<'a> {
    role: &'a str,
    token: String,
    ids: Vec<(&'a str, String)>,
    /// Only these operations (by id); all but the excluded ones when empty.
    only: &'a [&'a str],
    skip_open: bool,
}

/// What one run found: its output from the failures on, when it failed.
fn run(st: &std::path::Path, app: &TestApp, dir: &std::path::Path, run: &Run) -> Option<String> {
    let config = dir.join(format!("{}.toml", run.role));
    let mut text = String::from("[parameters]\n");
    for (name, value) in &run.ids {
        text.push_str(&format!("\"path.{name}\" = \"{value}\"\n"));
    }
    // The event stream never ends by itself: one event, or a second of heartbeats,
    // is enough of it.
    text.push_str(
        "\n[[operations]]\ninclude-operation-id = \"stream\"\nrequest-timeout = 0.5\nmax-stream-events = 1\n",
    );
    std::fs::write(&config, text).unwrap();
    let seed = std::env::var("AFYA_SCHEMATHESIS_SEED").unwrap_or_else(|_| "1".to_owned());
    let mut cmd = Command::new(st);
    cmd.current_dir(dir)
        .arg("--config-file")
        .arg(&config)
        .arg("--no-color")
        .arg("run")
        .arg(app.server.url("/v1/openapi.json"))
        .args(["--header", &format!("Authorization: Bearer {}", run.token)])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance",
        ])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", MAX_EXAMPLES])
        .args(["--seed", &seed])
        .args(["--generation-database", "none"])
        .args(["--request-timeout", "10"])
        .args(["--workers", "1"]);
    for id in run.only {
        cmd.args(["--include-operation-id", id]);
    }
    if run.only.is_empty() {
        // A sign-out would end the run's own session (it has a run of its own); a
        // webhook of a generated URL would send deliveries off this machine.
        for id in ["sign_out", "register"] {
            cmd.args(["--exclude-operation-id", id]);
        }
        if run.skip_open {
            for id in OPEN {
                cmd.args(["--exclude-operation-id", id]);
            }
        }
    }
    let started = Instant::now();
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('='))
        .unwrap_or_default()
        .to_owned();
    eprintln!(
        "schemathesis as {}: {:.1} s, {summary}",
        run.role,
        started.elapsed().as_secs_f64()
    );
    if out.status.success() {
        return None;
    }
    let found = stdout
        .find("FAILURES")
        .map_or(stdout.as_ref(), |at| &stdout[at..]);
    Some(format!(
        "as {} (exit {:?}):\n{found}\n{}",
        run.role,
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    ))
}

async fn session(app: &TestApp, party: &Party) -> String {
    app.sign_in(&party.phone).await
}

#[actix_rt::test]
async fn schemathesis_finds_no_undocumented_status_and_no_server_error() {
    let Some(st) = schemathesis() else {
        return;
    };
    let mut found = Vec::new();
    for backend in BACKENDS {
        found.extend(probe(&st, backend).await);
    }
    assert!(
        found.is_empty(),
        "schemathesis found answers the document does not describe, or server errors:\n{}",
        found.join("\n")
    );
}

/// Every role's run on `backend` (on PostgreSQL, for time, only the roles that write
/// the most: the doctor and the patient); what they found.
async fn probe(st: &std::path::Path, backend: Backend) -> Vec<String> {
    let Some(app) = TestApp::start_with(
        backend,
        &[
            ("AFYA_SSE_HEARTBEAT_SECS", "1"),
            // The integrator's webhook below goes to a closed loopback port.
            ("AFYA_WEBHOOK_ALLOW_PRIVATE", "true"),
        ],
    )
    .await
    else {
        return Vec::new();
    };
    let w = app.world().await;
    // Something for each role to find: the patient's record, shared with the doctor;
    // a request still pending, from the other doctor; a share code; a webhook.
    let (record_id, granted) = app
        .share(&w, "lab", "application/pdf", b"%PDF-1.4 schemathesis")
        .await;
    let pending = app
        .request_access(&w.other_doctor, &w.patient.id, &["imaging"])
        .await
        .ok(201)["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
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
    let (ok, out, err) = app.env.run(&[
        "integrator",
        "add",
        "--name",
        "Schemathesis Lab",
        "--events",
        "all",
    ]);
    assert!(ok, "{err}");
    let integrator = out.lines().last().unwrap().trim().to_owned();
    let webhook = app
        .post(
            "/v1/webhooks",
            Some(&integrator),
            json!({"url": "http://127.0.0.1:9/hook", "types": ["RecordUploaded"]}),
        )
        .await
        .ok(201)["webhook_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Sessions of their own, taken before the run's failed sign-ins can reach the
    // per-address limit: one for the sign-out run, which ends it.
    let leaving = session(&app, &w.other_patient).await;
    let unknown = "00000000-0000-4000-8000-000000000000".to_owned();
    let common = |patient: &str, doctor: &str, request: &str| {
        vec![
            ("patient_id", patient.to_owned()),
            ("doctor_id", doctor.to_owned()),
            ("record_id", record_id.clone()),
            ("request_id", request.to_owned()),
            ("code", code.clone()),
            ("webhook_id", webhook.clone()),
            ("payment_id", unknown.clone()),
        ]
    };
    let runs = [
        // The doctor first, while the grant it reads under is still approved.
        Run {
            role: "doctor",
            token: w.doctor.token.clone(),
            ids: common(&w.patient.id, &w.doctor.id, &granted),
            only: &[],
            skip_open: false,
        },
        Run {
            role: "registrar",
            token: w.registrar.token.clone(),
            ids: common(&w.patient.id, &w.unverified_doctor.id, &pending),
            only: &[],
            skip_open: true,
        },
        Run {
            role: "auditor",
            token: w.auditor.token.clone(),
            ids: common(&w.patient.id, &w.doctor.id, &granted),
            only: &[],
            skip_open: true,
        },
        Run {
            role: "integrator",
            token: integrator.clone(),
            ids: common(&w.patient.id, &w.doctor.id, &granted),
            only: &[],
            skip_open: true,
        },
        Run {
            role: "patient",
            token: w.patient.token.clone(),
            ids: common(&w.patient.id, &w.doctor.id, &pending),
            only: &[],
            skip_open: true,
        },
        Run {
            role: "patient signing out",
            token: leaving,
            ids: Vec::new(),
            only: &["sign_out"],
            skip_open: false,
        },
    ];
    let dir = std::env::temp_dir().join(format!("afya-schemathesis-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let started = Instant::now();
    let found: Vec<String> = runs
        .iter()
        .filter(|r| {
            backend == Backend::Sqlite
                || r.role.starts_with("doctor")
                || r.role.starts_with("patient")
        })
        .filter_map(|r| run(st, &app, &dir, r).map(|f| format!("on {backend:?} {f}")))
        .collect();
    eprintln!(
        "schemathesis on {backend:?}: {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
    app.stop().await;
    found
}
