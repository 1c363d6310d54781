//! The OpenAPI 3.1 document, generated from the handlers' annotations. The error
//! answers each operation can give are listed once here, in [`ERRORS`], and added to
//! the document as `application/problem+json` responses.

use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, ObjectBuilder, PathItem, Ref, Required, ResponseBuilder, Type,
};
use utoipa::{Modify, OpenApi};

use crate::problem::{Details, FieldError};
use crate::routes::{
    access, accounts, audit, doctors, events, ops, payments, records, share, webhooks,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "AfyaChain API",
        version = "1",
        description = "Patient-controlled medical records. Errors are RFC 9457 problem details \
            (`application/problem+json`) with a stable `code` and, for invalid input, the \
            `field`. Every POST accepts an `Idempotency-Key` header: a retry with the same key \
            and the same request answers as the first and changes nothing; the same key with \
            a different request is refused (422). Other methods ignore it: every read is \
            checked and recorded anew."
    ),
    paths(
        ops::healthz, ops::readyz, ops::metrics, ops::openapi, ops::client_config,
        accounts::sign_up_patient, accounts::sign_up_doctor, accounts::verify_doctor,
        accounts::sign_in, accounts::current_session, accounts::sign_out,
        accounts::wallet, accounts::register_wallet,
        payments::create, payments::get, payments::of_patient, payments::of_doctor,
        payments::stk_callback,
        records::upload, records::list, records::get, records::content,
        access::request, access::list_for_patient, access::approve, access::reject,
        access::revoke, access::grants, access::access_log, access::list_for_doctor,
        doctors::list, share::issue, share::show, share::qr, share::resolve,
        audit::anchors, audit::events, audit::disclosures, audit::export, audit::verify,
        audit::uncovered_reads, audit::reads_after_revocation,
        events::stream, webhooks::register, webhooks::list, webhooks::failures, webhooks::replay,
    ),
    components(schemas(Details, FieldError)),
    modifiers(&Security, &Errors),
    tags(
        (name = "accounts", description = "Sign-up, verification, sessions"),
        (name = "records", description = "Encrypted medical records"),
        (name = "consent", description = "Access requests, grants and the access log"),
        (name = "audit", description = "The audit trail: event history, export, hash-chain verification, findings and chain anchors"),
        (name = "integrators", description = "Event stream and signed webhooks for integrators' API keys"),
        (name = "payments", description = "M-Pesa payments (STK Push) and Daraja's callbacks"),
        (name = "operations", description = "Health, readiness, metrics"),
    )
)]
pub struct ApiDoc;

/// The error statuses of each operation (besides 500 and 503, which any may answer: 503
/// when a service a command needs is down).
pub const ERRORS: &[(&str, &str, &[u16])] = &[
    ("/v1/patients", "post", &[400, 409, 413, 415, 422, 429]),
    ("/v1/doctors", "post", &[400, 409, 413, 415, 422, 429]),
    ("/v1/doctors", "get", &[401, 403, 422]),
    (
        "/v1/patients/{patient_id}/share-code",
        "post",
        &[401, 403, 404],
    ),
    (
        "/v1/patients/{patient_id}/share-code",
        "get",
        &[401, 403, 404],
    ),
    (
        "/v1/patients/{patient_id}/share-code/qr",
        "get",
        &[401, 403, 404],
    ),
    ("/v1/share-codes/{code}", "get", &[401, 403, 404]),
    (
        "/v1/doctors/{doctor_id}/access-requests",
        "get",
        &[401, 403, 404, 422],
    ),
    (
        "/v1/doctors/{doctor_id}/verification",
        "post",
        &[401, 403, 404, 409, 422],
    ),
    ("/v1/sessions", "post", &[400, 401, 409, 413, 415, 422, 429]),
    ("/v1/patients/{patient_id}/wallet", "get", &[401, 403, 404]),
    (
        "/v1/patients/{patient_id}/wallet",
        "put",
        &[400, 401, 403, 404, 409, 413, 415, 422],
    ),
    (
        "/v1/payments",
        "post",
        &[400, 401, 403, 409, 413, 415, 422, 503],
    ),
    ("/v1/payments/{payment_id}", "get", &[401, 404]),
    (
        "/v1/patients/{patient_id}/payments",
        "get",
        &[401, 403, 404, 422],
    ),
    (
        "/v1/doctors/{doctor_id}/payments",
        "get",
        &[401, 403, 404, 422],
    ),
    (
        "/v1/mpesa/callbacks/{path_token}/stk",
        "post",
        &[400, 404, 413, 415],
    ),
    ("/v1/sessions/current", "get", &[401]),
    ("/v1/sessions/current", "delete", &[401, 403, 409]),
    (
        "/v1/patients/{patient_id}/records",
        "post",
        &[401, 403, 404, 409, 413, 415, 422],
    ),
    (
        "/v1/patients/{patient_id}/records",
        "get",
        &[401, 403, 404, 422],
    ),
    ("/v1/records/{record_id}", "get", &[401, 403, 404]),
    ("/v1/audit/anchors", "get", &[401, 403, 422]),
    ("/v1/audit/events", "get", &[401, 403, 422]),
    ("/v1/audit/events/export", "get", &[401, 403, 422]),
    ("/v1/events/stream", "get", &[401, 403, 422, 429]),
    ("/v1/webhooks", "post", &[400, 401, 403, 409, 413, 415, 422]),
    ("/v1/webhooks", "get", &[401, 403]),
    (
        "/v1/webhooks/{webhook_id}/failures",
        "get",
        &[401, 403, 404, 422],
    ),
    ("/v1/webhooks/{webhook_id}/replay", "post", &[401, 403, 404]),
    ("/v1/audit/verify", "get", &[401, 403, 422]),
    (
        "/v1/audit/findings/uncovered-reads",
        "get",
        &[401, 403, 422],
    ),
    (
        "/v1/audit/findings/reads-after-revocation",
        "get",
        &[401, 403, 422],
    ),
    (
        "/v1/audit/patients/{patient_id}/disclosures",
        "get",
        &[401, 403, 404, 422],
    ),
    (
        "/v1/records/{record_id}/content",
        "get",
        &[401, 403, 404, 409, 422, 502],
    ),
    (
        "/v1/access-requests",
        "post",
        &[400, 401, 403, 404, 409, 413, 415, 422],
    ),
    (
        "/v1/patients/{patient_id}/access-requests",
        "get",
        &[401, 403, 404, 422],
    ),
    (
        "/v1/access-requests/{request_id}/approval",
        "post",
        &[400, 401, 403, 404, 409, 413, 415, 422],
    ),
    (
        "/v1/access-requests/{request_id}/rejection",
        "post",
        &[400, 401, 403, 404, 409, 413, 415, 422],
    ),
    (
        "/v1/access-requests/{request_id}/revocation",
        "post",
        &[401, 403, 404, 409, 422],
    ),
    ("/v1/doctors/{doctor_id}/grants", "get", &[401, 403, 404]),
    (
        "/v1/patients/{patient_id}/access-log",
        "get",
        &[401, 403, 404, 422],
    ),
];

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

struct Errors;

fn operation<'a>(
    item: &'a mut PathItem,
    method: &str,
) -> Option<&'a mut utoipa::openapi::path::Operation> {
    match method {
        "get" => item.get.as_mut(),
        "post" => item.post.as_mut(),
        "put" => item.put.as_mut(),
        "delete" => item.delete.as_mut(),
        _ => None,
    }
}

fn problem_response(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/problem+json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build(),
        )
        .build()
}

/// The header every POST accepts.
fn idempotency_key() -> utoipa::openapi::path::Parameter {
    ParameterBuilder::new()
        .name("Idempotency-Key")
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .description(Some(
            "1 to 255 visible ASCII characters, unique per request: a retry with the same key \
             and request answers as the first and changes nothing; the same key with another \
             request is refused (422 idempotency_key_reused)",
        ))
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(255)),
        ))
        .build()
}

fn describe(status: u16) -> &'static str {
    match status {
        400 => "The body is not valid JSON",
        401 => "Missing, malformed, forged, expired or revoked bearer token; or wrong credentials",
        403 => "The caller's role or ownership does not allow this",
        404 => "No such resource (or not to be revealed)",
        409 => "The resource's state does not allow this (already done, no longer pending), or it changed at the same time (`concurrent_change`: retry)",
        413 => "The body is too large",
        415 => "Missing or unsupported Content-Type",
        422 => "Invalid input; `field` names it",
        429 => "Too many failed attempts; see Retry-After",
        502 => "The stored copy failed its integrity check (`integrity_check_failed`): it was not served, and the failure is recorded",
        503 => "A service the command needs is unavailable (`content_unavailable`: the record's content cannot be fetched now); try again later, see Retry-After",
        _ => "Unexpected failure",
    }
}

impl Modify for Errors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            for method in ["get", "post", "delete"] {
                let listed = ERRORS
                    .iter()
                    .find(|(p, m, _)| p == path && *m == method)
                    .map(|(_, _, statuses)| *statuses)
                    .unwrap_or(&[]);
                if let Some(op) = operation(item, method) {
                    if method == "post" {
                        op.parameters
                            .get_or_insert_with(Vec::new)
                            .push(idempotency_key());
                    }
                    for status in listed.iter().chain(&[500, 503]) {
                        op.responses
                            .responses
                            .entry(status.to_string())
                            .or_insert_with(|| problem_response(describe(*status)).into());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_error_belongs_to_a_documented_operation() {
        let doc = ApiDoc::openapi();
        assert!(matches!(
            doc.openapi,
            utoipa::openapi::OpenApiVersion::Version31
        ));
        for (path, method, _) in ERRORS {
            let mut item = doc
                .paths
                .paths
                .get(*path)
                .cloned()
                .unwrap_or_else(|| panic!("{path}"));
            assert!(operation(&mut item, method).is_some(), "{method} {path}");
        }
    }
}
