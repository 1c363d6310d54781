//! Share codes: a patient gives a doctor a short code instead of a phone number; a
//! verified doctor enters it to find the patient (then asks for access as usual).

use actix_web::web::{Data, Path};
use actix_web::{HttpRequest, HttpResponse};
use domain::ids::PatientId;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::extract::{command_meta, Caller};
use crate::problem::Problem;
use crate::ratelimit::Limit;
use crate::routes::{doctor, own_patient, path_id};
use crate::server::AppState;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ShareCode {
    /// `XXXXX-XXXXX` (Crockford base32; case, dash and spaces do not matter when typed).
    pub code: String,
    pub expires_at: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SharedPatient {
    pub patient_id: Uuid,
    /// When the code stops working.
    pub expires_at: String,
}

fn no_code() -> Problem {
    Problem::not_found(
        "share_code_not_found",
        "no such share code, or it has expired",
    )
}

async fn current(state: &AppState, patient_id: PatientId) -> Result<ShareCode, Problem> {
    let (code, expires_at) = state
        .commands
        .share_code(patient_id)
        .await?
        .ok_or_else(no_code)?;
    Ok(ShareCode {
        code,
        expires_at: expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    })
}

#[utoipa::path(post, path = "/v1/patients/{patient_id}/share-code", tag = "consent",
    params(("patient_id" = Uuid, Path)),
    security(("bearer" = [])),
    responses((status = 201, description = "A new share code, valid 30 days; the earlier one stops working (the patient)", body = ShareCode)))]
#[tracing::instrument(skip_all)]
pub async fn issue(
    req: HttpRequest,
    state: Data<AppState>,
    caller: Caller,
    path: Path<String>,
) -> Result<HttpResponse, Problem> {
    let patient_id: PatientId = path_id(&path, "patient")?;
    own_patient(&caller, patient_id)?;
    let meta = command_meta(&req, Some(caller.actor()), b"")?;
    let outcome = state.commands.issue_share_code(patient_id, meta).await?;
    state.settle.settle(&outcome).await;
    Ok(HttpResponse::Created().json(current(&state, patient_id).await?))
}

#[utoipa::path(get, path = "/v1/patients/{patient_id}/share-code", tag = "consent",
    params(("patient_id" = Uuid, Path)),
    security(("bearer" = [])),
    responses((status = 200, description = "The patient's current share code (the patient)", body = ShareCode)))]
#[tracing::instrument(skip_all)]
pub async fn show(
    state: Data<AppState>,
    caller: Caller,
    path: Path<String>,
) -> Result<HttpResponse, Problem> {
    let patient_id: PatientId = path_id(&path, "patient")?;
    own_patient(&caller, patient_id)?;
    Ok(HttpResponse::Ok().json(current(&state, patient_id).await?))
}

#[utoipa::path(get, path = "/v1/patients/{patient_id}/share-code/qr", tag = "consent",
    params(("patient_id" = Uuid, Path)),
    security(("bearer" = [])),
    responses((status = 200, description = "The current share code as a QR code (SVG) holding the code's text, for a doctor to scan (the patient)", content_type = "image/svg+xml", body = String)))]
#[tracing::instrument(skip_all)]
pub async fn qr(
    state: Data<AppState>,
    caller: Caller,
    path: Path<String>,
) -> Result<HttpResponse, Problem> {
    let patient_id: PatientId = path_id(&path, "patient")?;
    own_patient(&caller, patient_id)?;
    let code = current(&state, patient_id).await?.code;
    let svg = qrcode::QrCode::new(code.as_bytes())
        .map_err(|e| Problem::internal(&anyhow::anyhow!("encoding a QR code: {e}")))?
        .render::<qrcode::render::svg::Color>()
        .min_dimensions(240, 240)
        .build();
    Ok(HttpResponse::Ok()
        .content_type("image/svg+xml")
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-store"))
        .body(svg))
}

#[utoipa::path(get, path = "/v1/share-codes/{code}", tag = "consent",
    params(("code" = String, Path)),
    security(("bearer" = [])),
    responses((status = 200, description = "The patient a valid share code names (verified doctors); unknown, replaced and expired codes are 404", body = SharedPatient)))]
#[tracing::instrument(skip_all)]
pub async fn resolve(
    state: Data<AppState>,
    caller: Caller,
    path: Path<String>,
) -> Result<HttpResponse, Problem> {
    let doctor_id = doctor(&caller)?;
    let pool = state.store.any_pool();
    let verified = projections::queries::doctor(pool, &doctor_id.to_string())
        .await?
        .is_some_and(|d| d.status == "verified");
    if !verified {
        return Err(Problem::forbidden(
            "doctor_not_verified",
            "only a verified doctor may look up a share code",
        ));
    }
    // Codes are short enough to guess at speed: a doctor's misses are limited (in the
    // store, so every instance counts them), a hit gives its attempt back.
    let doctor_key = doctor_id.to_string();
    let attempt = state
        .limits
        .begin(&[Limit {
            bucket: "share_code_miss",
            key: &doctor_key,
            rule: state.config.sign_in_limits.share_code_rule(),
        }])
        .await?;
    let found = match state.commands.share_code_index(&path) {
        Some(index) => {
            projections::queries::patient_by_share_code(pool, &index, state.commands.now()).await?
        }
        None => None,
    };
    let Some((patient_id, expires_at)) = found else {
        attempt.failed();
        return Err(no_code());
    };
    attempt.succeeded(&[]).await;
    Ok(HttpResponse::Ok().json(SharedPatient {
        patient_id: Uuid::parse_str(&patient_id).unwrap_or_default(),
        expires_at,
    }))
}
