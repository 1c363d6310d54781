//! The OpenAPI document at `/v1/openapi.json` describes what the server does: the same
//! routes, and answers shaped as documented.

use std::collections::BTreeSet;

use eventstore::Backend;
use reqwest::Method;
use serde_json::{json, Value};

use crate::app::{Resp, TestApp};

/// Whether `value` fits `schema` (as utoipa writes them: `$ref`, objects with
/// `properties`/`required`, arrays, `oneOf` for nullable refs, `type` lists). Objects
/// must not carry undocumented properties.
fn conforms(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference.trim_start_matches("#/components/schemas/");
        return conforms(doc, &doc["components"]["schemas"][name], value, at);
    }
    if let Some(options) = schema["oneOf"].as_array() {
        return if options.iter().any(|o| conforms(doc, o, value, at).is_ok()) {
            Ok(())
        } else {
            Err(format!("{at}: {value} fits no option of {schema}"))
        };
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => return Ok(()),
    };
    let fits = types.iter().any(|t| match (*t, value) {
        ("null", Value::Null) => true,
        ("string", Value::String(_)) | ("boolean", Value::Bool(_)) => true,
        ("integer", Value::Number(n)) => n.is_i64() || n.is_u64(),
        ("number", Value::Number(_)) => true,
        ("array", Value::Array(_)) | ("object", Value::Object(_)) => true,
        _ => false,
    });
    if !fits {
        return Err(format!("{at}: {value} is not {types:?}"));
    }
    match value {
        Value::Object(map) => {
            let properties = schema["properties"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            for key in map.keys() {
                if !properties.contains_key(key) {
                    return Err(format!("{at}: undocumented property {key}"));
                }
            }
            for required in schema["required"].as_array().into_iter().flatten() {
                let name = required.as_str().unwrap_or_default();
                if !map.contains_key(name) {
                    return Err(format!("{at}: missing required property {name}"));
                }
            }
            for (key, v) in map {
                conforms(doc, &properties[key], v, &format!("{at}.{key}"))?;
            }
            Ok(())
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                conforms(doc, &schema["items"], item, &format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Asserts the answer is documented for this operation and fits its schema.
#[track_caller]
fn documented(doc: &Value, method: &str, path: &str, resp: &Resp) {
    let op = &doc["paths"][path][method];
    assert!(op.is_object(), "{method} {path} is not documented");
    let documented = &op["responses"][resp.status.to_string()];
    assert!(
        documented.is_object(),
        "{method} {path}: status {} is not documented: {}",
        resp.status,
        resp.text()
    );
    let Some(content) = documented["content"].as_object() else {
        return;
    };
    let media = resp.header("content-type").unwrap_or_default();
    let media = media.split(';').next().unwrap_or_default();
    if media == "application/json" || media == "application/problem+json" {
        let schema = &content[media]["schema"];
        assert!(
            schema.is_object(),
            "{method} {path}: {media} is not documented"
        );
        if let Err(e) = conforms(doc, schema, &resp.json(), "body") {
            panic!("{method} {path} {}: {e}", resp.status);
        }
    }
}

#[actix_rt::test]
async fn the_openapi_document_describes_exactly_what_the_server_serves() {
    let Some(app) = TestApp::start(Backend::Sqlite).await else {
        return;
    };
    let doc = app.get("/v1/openapi.json", None).await.ok(200);
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    // The check below can fail: an undocumented property, a missing one, a wrong type.
    let created = json!({"$ref": "#/components/schemas/PatientCreated"});
    let id = "00000000-0000-4000-8000-000000000000";
    assert!(conforms(&doc, &created, &json!({"patient_id": id}), "b").is_ok());
    assert!(conforms(&doc, &created, &json!({"patient_id": id, "name": "x"}), "b").is_err());
    assert!(conforms(&doc, &created, &json!({}), "b").is_err());
    assert!(conforms(&doc, &created, &json!({"patient_id": 7}), "b").is_err());

    // Every documented operation is served (a made-up id, no token: whatever the
    // answer, not "no such route" and not "method not allowed"), and is documented
    // with the answer it gave.
    let mut documented_routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        documented_routes.insert(path.clone());
        for method in ["get", "post", "put", "patch", "delete"] {
            if !item[method].is_object() {
                continue;
            }
            assert!(
                item[method]["responses"]["500"].is_object(),
                "{method} {path}"
            );
            let takes_key = item[method]["parameters"].as_array().is_some_and(|ps| {
                ps.iter()
                    .any(|p| p["name"] == "Idempotency-Key" && p["in"] == "header")
            });
            assert_eq!(
                takes_key,
                method == "post",
                "{method} {path}: Idempotency-Key"
            );
            let concrete = path
                .split('/')
                .map(|s| {
                    if s.starts_with('{') {
                        "00000000-0000-4000-8000-000000000000"
                    } else {
                        s
                    }
                })
                .collect::<Vec<_>>()
                .join("/");
            let resp = app
                .send(
                    Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
                    &concrete,
                    None,
                    &[],
                    None,
                )
                .await;
            assert_ne!(resp.status, 405, "{method} {path}");
            // The STK callback answers a wrong path token exactly as a missing route,
            // so that the route cannot be told from nothing.
            if resp.status == 404 && !path.contains("{path_token}") {
                assert_ne!(resp.json()["code"], "route_not_found", "{method} {path}");
            }
            documented(&doc, method, path, &resp);
        }
    }

    // Success answers of the main flow fit their documented schemas.
    let w = app.world().await;
    let phone = app.phone();
    let r = app
        .post(
            "/v1/patients",
            None,
            TestApp::patient_body(&phone, "Pendo Atieno"),
        )
        .await;
    documented(&doc, "post", "/v1/patients", &r);
    let r = app
        .post(
            "/v1/sessions",
            None,
            json!({"phone": phone, "password": crate::app::password_of(&phone)}),
        )
        .await;
    documented(&doc, "post", "/v1/sessions", &r);
    let r = app
        .get("/v1/sessions/current", Some(&w.patient.token))
        .await;
    documented(&doc, "get", "/v1/sessions/current", &r);
    let r = app
        .upload(
            &w.patient.token,
            &w.patient.id,
            "category=lab&filename=x.pdf",
            "application/pdf",
            b"%PDF x",
        )
        .await;
    documented(&doc, "post", "/v1/patients/{patient_id}/records", &r);
    let record_id = r.json()["record_id"].as_str().unwrap().to_owned();
    let r = app.request_access(&w.doctor, &w.patient.id, &["lab"]).await;
    documented(&doc, "post", "/v1/access-requests", &r);
    let request_id = r.json()["request_id"].as_str().unwrap().to_owned();
    let r = app
        .get(
            &format!("/v1/patients/{}/access-requests", w.patient.id),
            Some(&w.patient.token),
        )
        .await;
    documented(&doc, "get", "/v1/patients/{patient_id}/access-requests", &r);
    let r = app
        .post(
            &format!("/v1/access-requests/{request_id}/approval"),
            Some(&w.patient.token),
            json!({"categories": ["lab"]}),
        )
        .await;
    documented(
        &doc,
        "post",
        "/v1/access-requests/{request_id}/approval",
        &r,
    );
    let r = app
        .get(
            &format!("/v1/patients/{}/records", w.patient.id),
            Some(&w.doctor.token),
        )
        .await;
    documented(&doc, "get", "/v1/patients/{patient_id}/records", &r);
    let r = app
        .get(
            &format!("/v1/records/{record_id}/content"),
            Some(&w.doctor.token),
        )
        .await;
    documented(&doc, "get", "/v1/records/{record_id}/content", &r);
    let r = app
        .get(
            &format!("/v1/doctors/{}/grants", w.doctor.id),
            Some(&w.doctor.token),
        )
        .await;
    documented(&doc, "get", "/v1/doctors/{doctor_id}/grants", &r);
    let r = app
        .get(
            &format!("/v1/patients/{}/access-log", w.patient.id),
            Some(&w.auditor.token),
        )
        .await;
    documented(&doc, "get", "/v1/patients/{patient_id}/access-log", &r);
    let r = app
        .post(
            &format!("/v1/access-requests/{request_id}/revocation"),
            Some(&w.patient.token),
            json!({}),
        )
        .await;
    documented(
        &doc,
        "post",
        "/v1/access-requests/{request_id}/revocation",
        &r,
    );
    let r = app
        .get(
            &format!("/v1/records/{record_id}/content"),
            Some(&w.doctor.token),
        )
        .await;
    assert_eq!(r.status, 403);
    documented(&doc, "get", "/v1/records/{record_id}/content", &r);
    let r = app
        .delete("/v1/sessions/current", Some(&w.other_patient.token))
        .await;
    documented(&doc, "delete", "/v1/sessions/current", &r);

    // And every route the server answered on is a documented one (the metrics count
    // requests by route pattern).
    let metrics = app.get("/metrics", None).await;
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    assert!(text.contains("afyachain_consumer_position{consumer=\"directory\"}"));
    let served: BTreeSet<String> = text
        .lines()
        .filter(|l| l.starts_with("afyachain_http_requests_total{"))
        .filter_map(|l| l.split("route=\"").nth(1))
        .filter_map(|rest| rest.split('"').next())
        .filter(|route| *route != "unmatched")
        .map(str::to_owned)
        .collect();
    assert_eq!(served, documented_routes);
    app.stop().await;
}

/// `POST /v1/webhooks` (operation `register`), which the schemathesis test leaves out
/// because a generated URL would send deliveries off this machine: each refusal it can
/// give, and its 201 for a loopback receiver, is an answer its operation documents.
/// Every URL sent leads to loopback, or is no http(s) URL at all.
#[actix_rt::test]
async fn every_answer_of_a_webhook_registration_is_documented() {
    let Some(app) = TestApp::start_with(
        Backend::Sqlite,
        // The receiver below is on loopback.
        &[("AFYA_WEBHOOK_ALLOW_PRIVATE", "true")],
    )
    .await
    else {
        return;
    };
    let doc = app.get("/v1/openapi.json", None).await.ok(200);
    let w = app.world().await;
    let (ok, out, err) = app.env.run(&[
        "integrator",
        "add",
        "--name",
        "Webhook Lab",
        "--events",
        "RecordUploaded,AccessApproved",
    ]);
    assert!(ok, "{err}");
    let key = out.lines().last().unwrap().trim().to_owned();
    // A loopback port nothing listens on: whatever is delivered goes nowhere.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let valid = json!({"url": url, "types": ["RecordUploaded"]});
    let json_type = ("content-type", "application/json");
    let bytes = |v: &Value| serde_json::to_vec(v).unwrap();
    // The refusal expected, and documented: its status.
    let refused = |resp: Resp, status: u16, code: &str, field: Option<&str>| {
        let body = resp.problem(status, code);
        if let Some(field) = field {
            assert_eq!(body["field"], field, "{body}");
        }
        documented(&doc, "post", "/v1/webhooks", &resp);
        resp.status
    };
    let mut seen = BTreeSet::new();

    // 401: no token, or one that is not a token.
    let r = register(&app, None, &[json_type], bytes(&valid)).await;
    seen.insert(refused(r, 401, "unauthenticated", None));
    let r = register(&app, Some("not-a-token"), &[json_type], bytes(&valid)).await;
    seen.insert(refused(r, 401, "token_malformed", None));
    // 403: every role but the integrator's, and types the key does not allow.
    for who in [&w.patient, &w.doctor, &w.registrar, &w.auditor] {
        let r = register(&app, Some(&who.token), &[json_type], bytes(&valid)).await;
        seen.insert(refused(r, 403, "role_forbidden", None));
    }
    let body = json!({"url": url, "types": ["AccessRevoked"]});
    let r = register(&app, Some(&key), &[json_type], bytes(&body)).await;
    seen.insert(refused(r, 403, "event_types_not_allowed", None));
    // 415: not declared JSON.
    let untyped: [&[(&str, &str)]; 2] = [&[], &[("content-type", "text/plain")]];
    for headers in untyped {
        let r = register(&app, Some(&key), headers, bytes(&valid)).await;
        seen.insert(refused(
            r,
            415,
            "unsupported_media_type",
            Some("Content-Type"),
        ));
    }
    // 400: not JSON, or cut off.
    for body in [&b"{\"url\": "[..], b"url=x", b""] {
        let r = register(&app, Some(&key), &[json_type], body.to_vec()).await;
        seen.insert(refused(r, 400, "malformed_json", None));
    }
    // 413: larger than a JSON body may be.
    let large = json!({"url": url, "types": ["RecordUploaded"], "secret": "s".repeat(70_000)});
    let r = register(&app, Some(&key), &[json_type], bytes(&large)).await;
    seen.insert(refused(r, 413, "body_too_large", None));
    // 422: a URL, types or secret that do not fit, an unknown field, a malformed
    // Idempotency-Key, and a key reused for another request.
    let long = format!("http://127.0.0.1:{port}/{}", "x".repeat(2000));
    for (body, field) in [
        (
            json!({"url": format!("ftp://127.0.0.1:{port}/hook"), "types": ["RecordUploaded"]}),
            "url",
        ),
        (
            json!({"url": "not a url", "types": ["RecordUploaded"]}),
            "url",
        ),
        (json!({"url": long, "types": ["RecordUploaded"]}), "url"),
        (json!({"url": 7, "types": ["RecordUploaded"]}), "url"),
        (json!({"types": ["RecordUploaded"]}), "url"),
        (json!({"url": url, "types": []}), "types"),
        (json!({"url": url, "types": ["Nope"]}), "types"),
        (json!({"url": url, "types": "RecordUploaded"}), "types"),
        (
            json!({"url": url, "types": ["RecordUploaded"], "secret": "short"}),
            "secret",
        ),
        (
            json!({"url": url, "types": ["RecordUploaded"], "secret": "sixteen\ncharacters"}),
            "secret",
        ),
        (
            json!({"url": url, "types": ["RecordUploaded"], "extra": 1}),
            "extra",
        ),
    ] {
        let r = register(&app, Some(&key), &[json_type], bytes(&body)).await;
        seen.insert(refused(r, 422, "invalid_request", Some(field)));
    }
    let too_long = "k".repeat(256);
    for bad_key in ["two words", too_long.as_str()] {
        let headers = [json_type, ("idempotency-key", bad_key)];
        let r = register(&app, Some(&key), &headers, bytes(&valid)).await;
        seen.insert(refused(r, 422, "invalid_request", Some("Idempotency-Key")));
    }
    // 201: a loopback receiver (AFYA_WEBHOOK_ALLOW_PRIVATE), once with a key; the key
    // again with the same request is the same webhook, with another request 422.
    let keyed = [json_type, ("idempotency-key", "webhook-1")];
    let first = register(&app, Some(&key), &keyed, bytes(&valid)).await;
    assert_eq!(first.status, 201, "{}", first.text());
    documented(&doc, "post", "/v1/webhooks", &first);
    seen.insert(first.status);
    assert_eq!(first.json()["url"], url.as_str());
    let again = register(&app, Some(&key), &keyed, bytes(&valid)).await;
    assert_eq!(again.status, 201, "{}", again.text());
    assert_eq!(again.json()["webhook_id"], first.json()["webhook_id"]);
    let other = json!({"url": url, "types": ["AccessApproved"]});
    let r = register(&app, Some(&key), &keyed, bytes(&other)).await;
    seen.insert(refused(r, 422, "idempotency_key_reused", None));
    let r = register(&app, Some(&key), &[json_type], bytes(&valid)).await;
    assert_eq!(r.status, 201, "{}", r.text());
    documented(&doc, "post", "/v1/webhooks", &r);
    assert_ne!(r.json()["webhook_id"], first.json()["webhook_id"]);

    // What the operation lists beyond these answers: a body too slow (408, tested in
    // `limits`), a concurrent change (409), and failures of ours or of the store.
    let listed: BTreeSet<u16> = doc["paths"]["/v1/webhooks"]["post"]["responses"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.parse().unwrap())
        .collect();
    assert_eq!(
        listed.difference(&seen).copied().collect::<Vec<_>>(),
        [408, 409, 500, 503]
    );
    app.stop().await;
}

/// `POST /v1/webhooks` with these headers and body.
async fn register(
    app: &TestApp,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Resp {
    app.send(Method::POST, "/v1/webhooks", token, headers, Some(body))
        .await
}
