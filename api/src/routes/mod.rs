//! The REST handlers under `/v1`, grouped by what they serve, and what they share:
//! path ids, pagination and the role checks.

use actix_web::web;
use domain::actor::Actor;
use domain::ids::{DoctorId, PatientId, StaffId};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::extract::Caller;
use crate::problem::{Problem, Validation};

pub mod access;
pub mod accounts;
pub mod audit;
pub mod doctors;
pub mod events;
pub mod ops;
pub mod payments;
pub mod records;
pub mod share;
pub mod webhooks;

/// Every route of the server; the OpenAPI document lists the same ones
/// (`the_openapi_document_lists_exactly_the_served_routes`).
pub fn configure(cfg: &mut web::ServiceConfig) {
    use web::{delete, get, post, put};
    cfg.service(resource("/healthz").route(get().to(ops::healthz)))
        .service(resource("/readyz").route(get().to(ops::readyz)))
        .service(resource("/metrics").route(get().to(ops::metrics)))
        .service(resource("/v1/openapi.json").route(get().to(ops::openapi)))
        .service(resource("/v1/client-config").route(get().to(ops::client_config)))
        .service(resource("/v1/patients").route(post().to(accounts::sign_up_patient)))
        .service(resource("/v1/payments").route(post().to(payments::create)))
        .service(resource("/v1/payments/{payment_id}").route(get().to(payments::get)))
        .service(
            resource("/v1/patients/{patient_id}/payments").route(get().to(payments::of_patient)),
        )
        .service(resource("/v1/doctors/{doctor_id}/payments").route(get().to(payments::of_doctor)))
        .service(
            resource("/v1/mpesa/callbacks/{path_token}/stk")
                .route(post().to(payments::stk_callback)),
        )
        .service(
            resource("/v1/patients/{patient_id}/wallet")
                .route(get().to(accounts::wallet))
                .route(put().to(accounts::register_wallet)),
        )
        .service(
            resource("/v1/doctors")
                .route(post().to(accounts::sign_up_doctor))
                .route(get().to(doctors::list)),
        )
        .service(
            resource("/v1/doctors/{doctor_id}/verification")
                .route(post().to(accounts::verify_doctor)),
        )
        .service(resource("/v1/sessions").route(post().to(accounts::sign_in)))
        .service(
            resource("/v1/sessions/current")
                .route(get().to(accounts::current_session))
                .route(delete().to(accounts::sign_out)),
        )
        .service(
            resource("/v1/patients/{patient_id}/records")
                .route(post().to(records::upload))
                .route(get().to(records::list)),
        )
        .service(resource("/v1/records/{record_id}").route(get().to(records::get)))
        .service(resource("/v1/records/{record_id}/content").route(get().to(records::content)))
        .service(resource("/v1/audit/anchors").route(get().to(audit::anchors)))
        .service(
            resource("/v1/patients/{patient_id}/share-code")
                .route(post().to(share::issue))
                .route(get().to(share::show)),
        )
        .service(resource("/v1/patients/{patient_id}/share-code/qr").route(get().to(share::qr)))
        .service(resource("/v1/share-codes/{code}").route(get().to(share::resolve)))
        .service(resource("/v1/events/stream").route(get().to(events::stream)))
        .service(
            resource("/v1/webhooks")
                .route(post().to(webhooks::register))
                .route(get().to(webhooks::list)),
        )
        .service(resource("/v1/webhooks/{webhook_id}/failures").route(get().to(webhooks::failures)))
        .service(resource("/v1/webhooks/{webhook_id}/replay").route(post().to(webhooks::replay)))
        .service(resource("/v1/audit/events").route(get().to(audit::events)))
        .service(resource("/v1/audit/events/export").route(get().to(audit::export)))
        .service(resource("/v1/audit/verify").route(get().to(audit::verify)))
        .service(
            resource("/v1/audit/findings/uncovered-reads").route(get().to(audit::uncovered_reads)),
        )
        .service(
            resource("/v1/audit/findings/reads-after-revocation")
                .route(get().to(audit::reads_after_revocation)),
        )
        .service(
            resource("/v1/audit/patients/{patient_id}/disclosures")
                .route(get().to(audit::disclosures)),
        )
        .service(resource("/v1/access-requests").route(post().to(access::request)))
        .service(
            resource("/v1/patients/{patient_id}/access-requests")
                .route(get().to(access::list_for_patient)),
        )
        .service(
            resource("/v1/access-requests/{request_id}/approval").route(post().to(access::approve)),
        )
        .service(
            resource("/v1/access-requests/{request_id}/rejection").route(post().to(access::reject)),
        )
        .service(
            resource("/v1/access-requests/{request_id}/revocation")
                .route(post().to(access::revoke)),
        )
        .service(resource("/v1/doctors/{doctor_id}/grants").route(get().to(access::grants)))
        .service(
            resource("/v1/doctors/{doctor_id}/access-requests")
                .route(get().to(access::list_for_doctor)),
        )
        .service(
            resource("/v1/patients/{patient_id}/access-log").route(get().to(access::access_log)),
        );
}

/// A resource that answers other methods with 405 (as problem details).
fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(|| async {
        actix_web::ResponseError::error_response(&Problem::new(
            actix_web::http::StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this resource does not accept that method",
        ))
    }))
}

/// An id in a path: a URL naming something that cannot exist is 404.
pub fn path_id<T: std::str::FromStr>(raw: &str, what: &'static str) -> Result<T, Problem> {
    raw.parse()
        .map_err(|_| Problem::not_found("not_found", format!("no such {what}")))
}

/// `?cursor=&limit=`: the cursor is the `next_cursor` of the previous page.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// `next_cursor` of the previous page (omit for the first page).
    pub cursor: Option<String>,
    /// Items per page, 1 to 100 (default 50).
    pub limit: Option<String>,
}

impl PageQuery {
    /// `(after position, limit)`.
    pub fn parse(&self) -> Result<(i64, i64), Problem> {
        let after = match self.cursor.as_deref() {
            None | Some("") => 0,
            Some(c) => c.parse::<i64>().ok().filter(|c| *c >= 0).ok_or_else(|| {
                Problem::field("cursor", "must be a next_cursor from a previous page")
            })?,
        };
        let limit = match self.limit.as_deref() {
            None | Some("") => 50,
            Some(l) => l
                .parse::<i64>()
                .ok()
                .filter(|l| (1..=100).contains(l))
                .ok_or_else(|| Problem::field("limit", "must be a whole number from 1 to 100"))?,
        };
        Ok((after, limit))
    }
}

fn wrong_role(allowed: &str) -> Problem {
    Problem::forbidden("role_forbidden", format!("only {allowed} may do this"))
}

/// The caller must be this patient.
pub fn own_patient(caller: &Caller, patient_id: PatientId) -> Result<(), Problem> {
    match caller.actor() {
        Actor::Patient(p) if p == patient_id => Ok(()),
        Actor::Patient(_) => Err(Problem::forbidden(
            "not_your_data",
            "a patient may act only on their own data",
        )),
        _ => Err(wrong_role("the patient")),
    }
}

pub fn patient(caller: &Caller) -> Result<PatientId, Problem> {
    match caller.actor() {
        Actor::Patient(p) => Ok(p),
        _ => Err(wrong_role("a patient")),
    }
}

pub fn doctor(caller: &Caller) -> Result<DoctorId, Problem> {
    match caller.actor() {
        Actor::Doctor(d) => Ok(d),
        _ => Err(wrong_role("a doctor")),
    }
}

pub fn registrar(caller: &Caller) -> Result<StaffId, Problem> {
    match caller.actor() {
        Actor::Registrar(s) => Ok(s),
        _ => Err(wrong_role("a registrar")),
    }
}

/// An optional whole number, 0 or more (absent or empty: `None`); anything else fails
/// `field`.
pub(crate) fn whole(v: &mut Validation, field: &str, raw: Option<&str>) -> Option<i64> {
    match raw {
        None | Some("") => None,
        Some(p) => match p.parse::<i64>() {
            Ok(p) if p >= 0 => Some(p),
            _ => {
                v.fail(field, "must be a whole number, 0 or more");
                None
            }
        },
    }
}
