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

/// The error statuses of an operation that its shape does not tell (see
/// [`by_rule`], which adds the rest): limits on attempts, conflicts of a read that
/// appends, wrong credentials, the 404 of an id in a body, a body the document does
/// not describe.
pub const ERRORS: &[(&str, &str, &[u16])] = &[
    ("/v1/patients", "post", &[429]),
    ("/v1/doctors", "post", &[429]),
    ("/v1/sessions", "post", &[401, 429]),
    ("/v1/share-codes/{code}", "get", &[429]),
    ("/v1/events/stream", "get", &[429]),
    ("/v1/payments", "post", &[404, 429]),
    ("/v1/access-requests", "post", &[404]),
    // Daraja's callback is read as raw JSON of Daraja's making: not described.
    (
        "/v1/mpesa/callbacks/{path_token}/stk",
        "post",
        &[400, 408, 413, 415],
    ),
    // A doctor's read appends `RecordAccessed` before a byte is served.
    ("/v1/records/{record_id}/content", "get", &[409, 502]),
];

/// Signed-in operations open to every role: they never answer 403.
const ANY_ROLE: &[(&str, &str)] = &[("/v1/sessions/current", "get")];

/// The error statuses an operation can answer by what it is, whatever it does:
/// - 500 (a failure of ours) and 503 (the store, or a service a command needs, is
///   unavailable) everywhere;
/// - a body: 400 (not JSON, or cut off), 408 (too slow), 413 (too large), 415 (not of
///   the documented type) and 422 (does not fit);
/// - a POST: 422 (a malformed `Idempotency-Key`, or the key reused for another request);
/// - a command (any method but GET): 409 (`concurrent_change`, or a state that does
///   not allow it);
/// - a query: 422 (a parameter out of range, or the query string malformed);
/// - path ids: 404 (no such thing, malformed, or not to be revealed);
/// - a bearer token: 401 (missing, malformed, forged, expired, revoked) and, unless in
///   [`ANY_ROLE`], 403 (the caller's role or ownership does not allow it).
pub fn by_rule(
    path: &str,
    method: &str,
    op: &utoipa::openapi::path::Operation,
) -> std::collections::BTreeSet<u16> {
    let mut statuses = std::collections::BTreeSet::from([500, 503]);
    let has = |place: ParameterIn| {
        op.parameters
            .iter()
            .flatten()
            .any(|p| p.parameter_in == place)
    };
    if op.request_body.is_some() {
        statuses.extend([400, 408, 413, 415, 422]);
    }
    if method == "post" {
        statuses.insert(422);
    }
    if method != "get" {
        statuses.insert(409);
    }
    if has(ParameterIn::Query) {
        statuses.insert(422);
    }
    if has(ParameterIn::Path) {
        statuses.insert(404);
    }
    if op.security.as_ref().is_some_and(|s| !s.is_empty()) {
        statuses.insert(401);
        if !ANY_ROLE.contains(&(path, method)) {
            statuses.insert(403);
        }
    }
    let listed = ERRORS
        .iter()
        .filter(|(p, m, _)| *p == path && *m == method)
        .flat_map(|(_, _, s)| s.iter().copied());
    statuses.extend(listed);
    statuses
}

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

/// Every method an operation of the document can have.
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn operation<'a>(
    item: &'a mut PathItem,
    method: &str,
) -> Option<&'a mut utoipa::openapi::path::Operation> {
    match method {
        "get" => item.get.as_mut(),
        "post" => item.post.as_mut(),
        "put" => item.put.as_mut(),
        "patch" => item.patch.as_mut(),
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

/// The header every POST accepts: what the server takes (`extract::keyed_meta`; it
/// trims blanks around the key first).
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
                .max_length(Some(255))
                .pattern(Some("^[!-~]+$")),
        ))
        .build()
}

fn describe(status: u16) -> &'static str {
    match status {
        400 => "The body is not valid JSON (`malformed_json`), or could not be read",
        401 => "Missing, malformed, forged, expired or revoked bearer token; or wrong credentials",
        403 => "The caller's role or ownership does not allow this",
        404 => "No such resource (or not to be revealed)",
        408 => "The body arrived too slowly (`body_too_slow`); the connection is closed",
        409 => "The resource's state does not allow this (already done, no longer pending), or it changed at the same time (`concurrent_change`: retry)",
        413 => "The body is too large",
        415 => "Missing or unsupported Content-Type",
        422 => "Invalid input (body, query or `Idempotency-Key`); `field` names it",
        429 => "Too many attempts (or open streams); see Retry-After",
        502 => "The stored copy failed its integrity check (`integrity_check_failed`): it was not served, and the failure is recorded",
        503 => "The store or a service the request needs is unavailable (`store_unavailable`: the event store cannot be reached now; `content_unavailable`: the record's content cannot be fetched now; `payments_unavailable`: M-Pesa is not configured); try again later, see Retry-After",
        _ => "Unexpected failure",
    }
}

impl Modify for Errors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let mut ids = std::collections::BTreeMap::<String, usize>::new();
        for item in openapi.paths.paths.values_mut() {
            for method in METHODS {
                if let Some(id) = operation(item, method).and_then(|op| op.operation_id.clone()) {
                    *ids.entry(id).or_default() += 1;
                }
            }
        }
        for (path, item) in openapi.paths.paths.iter_mut() {
            for method in METHODS {
                let Some(op) = operation(item, method) else {
                    continue;
                };
                if method == "post" {
                    let parameters = op.parameters.get_or_insert_with(Vec::new);
                    let declared = parameters.iter_mut().find(|p| {
                        p.parameter_in == ParameterIn::Header
                            && p.name.eq_ignore_ascii_case("Idempotency-Key")
                    });
                    match declared {
                        // The operation says what the key means to it, and whether it is
                        // required; what a key is, is said here.
                        Some(declared) => declared.schema = idempotency_key().schema,
                        None => parameters.push(idempotency_key()),
                    }
                }
                // Handlers of different modules share names (`list`, `get`), and an
                // operation id must be unique in the document: those take the method
                // and path instead, which are.
                let shared = op
                    .operation_id
                    .as_ref()
                    .is_some_and(|id| ids.get(id).is_some_and(|n| *n > 1));
                if shared {
                    op.operation_id = Some(format!("{method}_{}", slug(path)));
                }
                for status in by_rule(path, method, op) {
                    op.responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| problem_response(describe(status)).into());
                }
            }
        }
    }
}

/// A path as an identifier: `/v1/patients/{patient_id}/records` → `patients_patient_id_records`.
fn slug(path: &str) -> String {
    path.trim_start_matches("/v1")
        .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("_")
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

    fn statuses(doc: &utoipa::openapi::OpenApi, path: &str, method: &str) -> Vec<u16> {
        let mut item = doc.paths.paths.get(path).cloned().unwrap();
        let op = operation(&mut item, method).unwrap();
        op.responses
            .responses
            .keys()
            .map(|k| k.parse().unwrap())
            .collect()
    }

    /// The document as JSON, and the properties of one of its schemas.
    fn properties(doc: &serde_json::Value, schema: &str) -> serde_json::Value {
        doc["components"]["schemas"][schema]["properties"].clone()
    }

    #[test]
    fn a_payment_is_documented_as_it_is_validated() {
        use domain::payment::{Purpose, MAX_AMOUNT_KES};
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let new = properties(&doc, "NewPayment");
        assert_eq!(new["amount_kes"]["minimum"], 1, "{new}");
        assert_eq!(new["amount_kes"]["maximum"], MAX_AMOUNT_KES, "{new}");
        // Every purpose, each accepted: a new one fails to compile here until it is
        // listed, and the test until it is documented.
        let all = [Purpose::ConsultationFee, Purpose::AccessFee];
        for p in all {
            match p {
                Purpose::ConsultationFee | Purpose::AccessFee => {}
            }
            assert_eq!(Purpose::parse(p.as_str()), Some(p));
        }
        let accepted: Vec<&str> = all.iter().map(|p| p.as_str()).collect();
        for (schema, field) in [("NewPayment", "purpose"), ("PaymentView", "purpose")] {
            assert_eq!(
                properties(&doc, schema)[field]["$ref"],
                "#/components/schemas/PaymentPurpose",
                "{schema}.{field}"
            );
        }
        let documented = &doc["components"]["schemas"]["PaymentPurpose"]["enum"];
        assert_eq!(*documented, serde_json::json!(accepted));
        for id in ["doctor_id", "access_request_id"] {
            assert_eq!(new[id]["format"], "uuid", "{new}");
        }
    }

    /// What a pattern of the document stands for, and values that fit it (written
    /// out here, the crate has no regular expressions): the parser must take each.
    const PHONE: &str = r"^\+?(254|0)[ -]?[17]([ -]?[0-9]){8}$";
    const PHONES: &[&str] = &[
        "254712345678",
        "254112345678",
        "0712345678",
        "0112345678",
        "+254712345678",
        "+0712345678",
        "254 712 345 678",
        "0712-345-678",
        "+254-7-1-2-3-4-5-6-7-8",
        "0 7 1 2 3 4 5 6 7 8",
        "254799999999",
        "254100000000",
    ];
    const NAMES: &[&str] = &[
        "A",
        "Achieng Otieno",
        "أمينة حسن",
        "Dr\u{200D}Kamau",
        "N\u{a0}M",
        "O'Brien-Wanjiru",
        "\u{ff21}",
    ];

    #[test]
    fn sign_up_and_sign_in_are_documented_as_the_parsers_validate() {
        use domain::value::{LicenceNumber, Msisdn, Password, PersonName};
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        for schema in ["PatientSignUp", "DoctorSignUp", "SignIn", "NewPayment"] {
            let phone = &properties(&doc, schema)["phone"];
            assert_eq!(phone["pattern"], PHONE, "{schema}");
        }
        for phone in PHONES {
            assert!(Msisdn::parse(phone).is_ok(), "{phone}");
        }
        for schema in ["PatientSignUp", "DoctorSignUp"] {
            let p = properties(&doc, schema);
            assert_eq!(
                (&p["password"]["minLength"], &p["password"]["maxLength"]),
                (&serde_json::json!(10), &serde_json::json!(128)),
                "{schema}"
            );
            assert_eq!(p["name"]["maxLength"], 100, "{schema}");
            assert_eq!(
                p["name"]["pattern"],
                properties(&doc, "PatientSignUp")["name"]["pattern"]
            );
        }
        assert!(Password::parse(&"p".repeat(10)).is_ok());
        assert!(Password::parse(&"p".repeat(128)).is_ok());
        assert!(Password::parse(&"\u{10348}".repeat(128)).is_ok());
        for name in NAMES {
            assert!(PersonName::parse(name).is_ok(), "{name}");
        }
        assert!(PersonName::parse(&"\u{10348}".repeat(100)).is_ok());
        let sign_in = properties(&doc, "SignIn");
        assert_eq!(sign_in["password"]["minLength"], 1);
        assert_eq!(sign_in["password"]["maxLength"], 128);
        let licence = &properties(&doc, "DoctorSignUp")["license_number"];
        assert_eq!(licence["pattern"], "^[A-Za-z0-9/-]{2,32}$");
        for licence in ["AB", "kmpdc/12-34", "--", "//", &"Z9".repeat(16)] {
            assert!(LicenceNumber::parse(licence).is_ok(), "{licence}");
        }
    }

    #[test]
    fn every_operation_lists_the_errors_its_shape_allows() {
        let doc = ApiDoc::openapi();
        // Once missed: PUT was not given its errors, nor a bodiless POST its 422.
        assert_eq!(
            statuses(&doc, "/v1/patients/{patient_id}/wallet", "put"),
            [200, 400, 401, 403, 404, 408, 409, 413, 415, 422, 500, 503]
        );
        assert_eq!(
            statuses(&doc, "/v1/patients/{patient_id}/share-code", "post"),
            [201, 401, 403, 404, 409, 422, 500, 503]
        );
        assert_eq!(
            statuses(&doc, "/v1/sessions/current", "get"),
            [200, 401, 500, 503]
        );
        assert_eq!(statuses(&doc, "/healthz", "get"), [200, 500, 503]);
        // A payment without a key is refused (400 `idempotency_key_required`).
        let mut payments = doc.paths.paths.get("/v1/payments").cloned().unwrap();
        let create = operation(&mut payments, "post").unwrap();
        let key = create
            .parameters
            .iter()
            .flatten()
            .find(|p| p.name == "Idempotency-Key")
            .unwrap();
        assert!(matches!(key.required, Required::True));
        assert_eq!(
            serde_json::to_value(&key.schema).unwrap(),
            serde_json::to_value(idempotency_key().schema).unwrap()
        );
        let mut ids = std::collections::BTreeSet::new();
        for (path, item) in &doc.paths.paths {
            for method in METHODS {
                let mut item = item.clone();
                let Some(op) = operation(&mut item, method) else {
                    continue;
                };
                let id = op.operation_id.clone().unwrap();
                assert!(ids.insert(id.clone()), "{id} is not unique");
                let keys = op
                    .parameters
                    .iter()
                    .flatten()
                    .filter(|p| p.name == "Idempotency-Key")
                    .count();
                assert_eq!(keys, usize::from(method == "post"), "{method} {path}");
            }
        }
    }
}
