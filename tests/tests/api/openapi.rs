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
