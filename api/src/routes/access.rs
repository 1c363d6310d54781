//! The consent flow: a verified doctor requests access, the patient approves (possibly
//! narrowing), rejects or revokes; the doctor's grants; the patient's access log.

use std::collections::BTreeSet;

use actix_web::web::{Data, Path, Query};
use actix_web::{HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use commands::{ApproveAccess, Decided, RequestAccess};
use domain::access::{AccessEvent, AccessStatus};
use domain::actor::Actor;
use domain::ids::{AccessRequestId, DoctorId, PatientId, RecordId};
use domain::value::{Category, DurationDays, Note, Purpose, Scope};
use projections::queries;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::extract::{command_meta, Body, Caller};
use crate::problem::{checked, Problem, Validation};
use crate::routes::{doctor, own_patient, path_id, patient, PageQuery};
use crate::server::AppState;

/// A doctor asks a patient for access.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAccessRequest {
    #[schema(value_type = Uuid)]
    pub patient_id: String,
    /// Whole categories asked for.
    #[serde(default)]
    #[schema(value_type = Vec<CategoryName>, example = json!(["lab"]))]
    pub categories: Vec<String>,
    /// Individual records asked for (besides or instead of categories): at most 100,
    /// each one of this patient's records.
    #[serde(default)]
    #[schema(value_type = Vec<Uuid>, max_items = 100)]
    pub record_ids: Vec<String>,
    /// Why (1 to 500 characters; only the patient can read it).
    #[schema(min_length = 1, max_length = 500)]
    pub purpose: String,
    /// 1 to 365.
    #[schema(minimum = 1, maximum = 365)]
    pub duration_days: i64,
    /// A note to the patient (optional, at most 1000 characters).
    #[schema(min_length = 1, max_length = 1000)]
    pub note: Option<String>,
}

/// A category of records, as the document names them (the domain's closed list:
/// a test keeps the two the same).
#[derive(Debug, ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // only described, never built: requests carry the names as text
pub enum CategoryName {
    Lab,
    Imaging,
    Prescription,
    Diagnosis,
    Immunization,
    ClinicalNote,
    Other,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RequestState {
    pub request_id: Uuid,
    /// pending, approved, rejected, revoked or expired.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub categories: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record_ids: Option<Vec<Uuid>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

/// The patient's approval; both fields may only narrow what was requested.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    /// Default: now plus the requested duration; must be in the future and not later.
    #[schema(value_type = Option<DateTime<Utc>>)]
    pub expires_at: Option<String>,
    /// A subset of the requested categories.
    #[schema(value_type = Option<Vec<CategoryName>>)]
    pub categories: Option<Vec<String>>,
    /// A subset of the requested records. Whatever is asked, a record that is not the
    /// patient's is never granted: a request stored before requests were checked may
    /// name one, and it is left out of the grant (422 `records_not_the_patients` on
    /// `record_ids` if nothing else would be granted).
    #[schema(value_type = Option<Vec<Uuid>>)]
    pub record_ids: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rejection {
    /// Optional, at most 1000 characters; only the patient can read it.
    #[schema(min_length = 1, max_length = 1000)]
    pub reason: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatusQuery {
    /// pending, approved, rejected, revoked or expired.
    #[param(pattern = "^(pending|approved|rejected|revoked|expired)?$")]
    pub status: Option<String>,
    pub cursor: Option<String>,
    pub limit: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AccessRequestItem {
    pub request_id: Uuid,
    pub doctor_id: Uuid,
    pub patient_id: Uuid,
    /// The doctor's name as registered (`null` once their key is erased).
    pub doctor_name: Option<String>,
    pub doctor_licence: Option<String>,
    pub doctor_verified: bool,
    pub status: String,
    pub categories: Vec<String>,
    pub record_ids: Vec<Uuid>,
    pub purpose: Option<String>,
    pub duration_days: i64,
    pub requested_at: String,
    pub decided_at: Option<String>,
    pub expires_at: Option<String>,
    pub closed_at: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AccessRequestPage {
    pub items: Vec<AccessRequestItem>,
    pub next_cursor: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GrantItem {
    pub request_id: Uuid,
    pub patient_id: Uuid,
    pub categories: Vec<String>,
    pub record_ids: Vec<Uuid>,
    pub approved_at: String,
    pub expires_at: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GrantList {
    pub items: Vec<GrantItem>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AccessLogItem {
    pub doctor_id: Option<Uuid>,
    /// The reading doctor's name (opened from the doctor's seal; absent once erased).
    pub doctor_name: Option<String>,
    pub record_id: Uuid,
    pub request_id: Option<Uuid>,
    pub category: String,
    pub at: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AccessLogPage {
    pub items: Vec<AccessLogItem>,
    pub next_cursor: Option<i64>,
}

fn categories_of(v: &mut Validation, raw: &[String]) -> BTreeSet<Category> {
    let mut out = BTreeSet::new();
    for (i, c) in raw.iter().enumerate() {
        match Category::parse(c) {
            Ok(c) => {
                out.insert(c);
            }
            Err(e) => v.fail(format!("categories[{i}]"), e.reason),
        }
    }
    out
}

fn record_ids_of(v: &mut Validation, raw: &[String]) -> BTreeSet<RecordId> {
    let mut out = BTreeSet::new();
    for (i, r) in raw.iter().enumerate() {
        match RecordId::parse(r) {
            Ok(id) => {
                out.insert(id);
            }
            Err(_) => v.fail(format!("record_ids[{i}]"), "must be a UUID"),
        }
    }
    out
}

/// The most records one request may name: each is loaded to check whose it is.
const MAX_REQUESTED_RECORDS: usize = 100;

/// Notes every entry of `raw` that is not one of `patient`'s records. A record of
/// another patient gets the same answer as one that does not exist, so a doctor cannot
/// learn from it that a record id is real.
async fn check_records_of(
    state: &AppState,
    v: &mut Validation,
    patient: PatientId,
    raw: &[String],
) -> Result<(), Problem> {
    let mut checked_ids = BTreeSet::new();
    for (i, r) in raw.iter().enumerate() {
        let Ok(id) = RecordId::parse(r) else {
            continue;
        };
        if !checked_ids.insert(id) {
            continue;
        }
        let owner = state
            .commands
            .record(id)
            .await?
            .and_then(|r| r.patient_id());
        if owner != Some(patient) {
            v.fail(
                format!("record_ids[{i}]"),
                "is not one of this patient's records",
            );
        }
    }
    Ok(())
}

fn scope_lists(scope: &Scope) -> (Vec<String>, Vec<Uuid>) {
    (
        scope
            .categories
            .iter()
            .map(|c| c.as_str().to_owned())
            .collect(),
        scope.record_ids.iter().map(|r| r.as_uuid()).collect(),
    )
}

/// How a decision's refusal is answered: one about the body names its field, and a
/// patient deciding on someone else's request learns nothing about it (404, as for a
/// request that does not exist).
fn decision_refused(problem: Problem) -> Problem {
    let field = match problem.code {
        "expiry_in_past" | "expiry_beyond_requested" => "expires_at",
        "scope_not_narrower" | "empty_scope" => "categories",
        "records_not_the_patients" => "record_ids",
        "not_the_patient" => return not_found(),
        _ => return problem,
    };
    problem.at(field)
}

fn not_found() -> Problem {
    Problem::not_found("access_request_not_found", "no such access request")
}

#[utoipa::path(post, path = "/v1/access-requests", tag = "consent",
    request_body = NewAccessRequest,
    security(("bearer" = [])),
    responses((status = 201, description = "Requested (verified doctors)", body = RequestState)))]
#[tracing::instrument(skip_all)]
pub async fn request(
    req: HttpRequest,
    state: Data<AppState>,
    caller: Caller,
    body: Body,
) -> Result<HttpResponse, Problem> {
    let doctor_id = doctor(&caller)?;
    let input: NewAccessRequest = body.json()?;
    let mut v = Validation::default();
    let patient_id = match PatientId::parse(&input.patient_id) {
        Ok(p) => Some(p),
        Err(_) => {
            v.fail("patient_id", "must be a UUID");
            None
        }
    };
    let categories = categories_of(&mut v, &input.categories);
    let record_ids = record_ids_of(&mut v, &input.record_ids);
    if input.record_ids.len() > MAX_REQUESTED_RECORDS {
        v.fail(
            "record_ids",
            format!("must list at most {MAX_REQUESTED_RECORDS} records"),
        );
    } else if let Some(patient) = patient_id {
        check_records_of(&state, &mut v, patient, &input.record_ids).await?;
    }
    let scope = v.check(Scope::new(categories, record_ids));
    let purpose = v.check(Purpose::parse(&input.purpose));
    let duration = v.check(DurationDays::new(input.duration_days));
    let note = input
        .note
        .as_deref()
        .and_then(|n| v.check(Note::parse("note", n)));
    v.finish()?;
    let meta = command_meta(&req, Some(caller.actor()), body.bytes())?;
    let done = state
        .commands
        .request_access(
            RequestAccess {
                doctor_id,
                patient_id: checked(patient_id)?,
                scope: checked(scope)?,
                purpose: &checked(purpose)?,
                duration: checked(duration)?,
                note: note.as_ref(),
            },
            meta,
        )
        .await?;
    state.settle.settle(&done.outcome).await;
    Ok(HttpResponse::Created().json(RequestState {
        request_id: done.id.as_uuid(),
        status: "pending".to_owned(),
        categories: None,
        record_ids: None,
        expires_at: None,
    }))
}

#[utoipa::path(get, path = "/v1/patients/{patient_id}/access-requests", tag = "consent",
    params(("patient_id" = Uuid, Path), StatusQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "The patient's access requests", body = AccessRequestPage)))]
#[tracing::instrument(skip_all)]
pub async fn list_for_patient(
    state: Data<AppState>,
    caller: Caller,
    path: Path<String>,
    query: Query<StatusQuery>,
) -> Result<HttpResponse, Problem> {
    let patient_id: PatientId = path_id(&path, "patient")?;
    own_patient(&caller, patient_id)?;
    let (status, after, limit) = query.parse()?;
    let page = queries::access_requests_of_patient(
        state.store.any_pool(),
        &patient_id.to_string(),
        status,
        state.commands.now(),
        after,
        limit,
    )
    .await?;
    Ok(HttpResponse::Ok().json(AccessRequestPage {
        items: request_items(&state, page.items, true).await?,
        next_cursor: page.next_cursor,
    }))
}

#[utoipa::path(get, path = "/v1/doctors/{doctor_id}/access-requests", tag = "consent",
    params(("doctor_id" = Uuid, Path), StatusQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "The doctor's own access requests and their status (the purpose, sealed for the patient, is not shown)", body = AccessRequestPage)))]
#[tracing::instrument(skip_all)]
pub async fn list_for_doctor(
    state: Data<AppState>,
    caller: Caller,
    path: Path<String>,
    query: Query<StatusQuery>,
) -> Result<HttpResponse, Problem> {
    let doctor_id: DoctorId = path_id(&path, "doctor")?;
    if doctor(&caller)? != doctor_id {
        return Err(Problem::forbidden(
            "not_your_data",
            "a doctor sees only their own requests",
        ));
    }
    let (status, after, limit) = query.parse()?;
    let page = queries::access_requests_of_doctor(
        state.store.any_pool(),
        &doctor_id.to_string(),
        status,
        state.commands.now(),
        after,
        limit,
    )
    .await?;
    Ok(HttpResponse::Ok().json(AccessRequestPage {
        items: request_items(&state, page.items, false).await?,
        next_cursor: page.next_cursor,
    }))
}

impl StatusQuery {
    /// The status filter and the page.
    fn parse(&self) -> Result<(Option<&'static str>, i64, i64), Problem> {
        let status = match self.status.as_deref() {
            None | Some("") => None,
            Some(s) => Some(
                AccessStatus::parse(s)
                    .ok_or_else(|| {
                        Problem::field(
                            "status",
                            "must be pending, approved, rejected, revoked or expired",
                        )
                    })?
                    .as_str(),
            ),
        };
        let (after, limit) = PageQuery {
            cursor: self.cursor.clone(),
            limit: self.limit.clone(),
        }
        .parse()?;
        Ok((status, after, limit))
    }
}

/// Doctors' profiles with their names opened, each looked up once per answer.
#[derive(Default)]
struct Doctors(
    std::collections::HashMap<String, Option<(queries::DoctorProfileRow, Option<String>)>>,
);

impl Doctors {
    async fn get(
        &mut self,
        state: &AppState,
        doctor_id: &str,
    ) -> Result<Option<(queries::DoctorProfileRow, Option<String>)>, Problem> {
        if !self.0.contains_key(doctor_id) {
            let found = match queries::doctor_profile(state.store.any_pool(), doctor_id).await? {
                Some(p) => {
                    let name = state
                        .commands
                        .doctor_name(&p.doctor_id, &p.personal_sealed)
                        .await;
                    Some((p, name))
                }
                None => None,
            };
            self.0.insert(doctor_id.to_owned(), found);
        }
        Ok(self.0.get(doctor_id).cloned().flatten())
    }
}

/// The rows as the API shows them, with the doctor's name, licence and status (each
/// doctor looked up once per page) and, for the patient, the purpose opened.
async fn request_items(
    state: &AppState,
    rows: Vec<queries::AccessRequestRow>,
    with_purpose: bool,
) -> Result<Vec<AccessRequestItem>, Problem> {
    let mut items = Vec::with_capacity(rows.len());
    let mut doctors = Doctors::default();
    for row in rows {
        let doctor = doctors.get(state, &row.doctor_id).await?;
        let scope: Scope = serde_json::from_str(&row.scope).unwrap_or_default();
        let (categories, record_ids) = scope_lists(&scope);
        let purpose = if with_purpose {
            state
                .commands
                .open_text(&row.patient_id, &row.purpose_sealed)
                .await
        } else {
            None
        };
        items.push(AccessRequestItem {
            request_id: Uuid::parse_str(&row.request_id).unwrap_or_default(),
            doctor_id: Uuid::parse_str(&row.doctor_id).unwrap_or_default(),
            patient_id: Uuid::parse_str(&row.patient_id).unwrap_or_default(),
            doctor_name: doctor.as_ref().and_then(|(_, name)| name.clone()),
            doctor_licence: doctor.as_ref().map(|(p, _)| p.licence.clone()),
            doctor_verified: doctor.as_ref().is_some_and(|(p, _)| p.status == "verified"),
            status: row.status,
            categories,
            record_ids,
            purpose,
            duration_days: row.duration_days,
            requested_at: row.requested_at,
            decided_at: row.decided_at,
            expires_at: row.expires_at,
            closed_at: row.closed_at,
        });
    }
    Ok(items)
}

#[utoipa::path(post, path = "/v1/access-requests/{request_id}/approval", tag = "consent",
    params(("request_id" = Uuid, Path)),
    request_body(content = Approval, description = "Optional: an empty body approves what was requested"),
    security(("bearer" = [])),
    responses((status = 200, description = "Approved (the patient)", body = RequestState)))]
#[tracing::instrument(skip_all)]
pub async fn approve(
    req: HttpRequest,
    state: Data<AppState>,
    caller: Caller,
    path: Path<String>,
    body: Body,
) -> Result<HttpResponse, Problem> {
    let by = patient(&caller)?;
    let request_id: AccessRequestId = path_id(&path, "access request")?;
    let input: Approval = body.json_or_default()?;
    let mut v = Validation::default();
    let expires_at = match input.expires_at.as_deref() {
        Some(raw) => match DateTime::parse_from_rfc3339(raw) {
            Ok(at) if at.with_timezone(&Utc) > state.commands.now() => Some(at.with_timezone(&Utc)),
            Ok(_) => {
                v.fail("expires_at", "must be in the future");
                None
            }
            Err(_) => {
                v.fail("expires_at", "must be a time like 2026-12-31T12:00:00Z");
                None
            }
        },
        None => None,
    };
    let categories = input.categories.as_ref().map(|c| categories_of(&mut v, c));
    let record_ids = input.record_ids.as_ref().map(|r| record_ids_of(&mut v, r));
    v.finish()?;
    // A narrower scope keeps whatever part of the request it does not mention.
    let scope = if categories.is_some() || record_ids.is_some() {
        let requested = state
            .commands
            .access_request(request_id)
            .await?
            .filter(|r| r.patient_id() == Some(by))
            .ok_or_else(not_found)?;
        Some(Scope {
            categories: categories.unwrap_or_else(|| requested.scope().categories.clone()),
            record_ids: record_ids.unwrap_or_else(|| requested.scope().record_ids.clone()),
        })
    } else {
        None
    };
    let meta = command_meta(&req, Some(caller.actor()), body.bytes())?;
    let decided = state
        .commands
        .approve_access(
            ApproveAccess {
                request_id,
                by: caller.actor(),
                expires_at,
                scope,
            },
            meta,
        )
        .await
        .map_err(|e| decision_refused(e.into()))?;
    answer(&state, decided).await
}

#[utoipa::path(post, path = "/v1/access-requests/{request_id}/rejection", tag = "consent",
    params(("request_id" = Uuid, Path)),
    request_body(content = Rejection, description = "Optional"),
    security(("bearer" = [])),
    responses((status = 200, description = "Rejected (the patient)", body = RequestState)))]
#[tracing::instrument(skip_all)]
pub async fn reject(
    req: HttpRequest,
    state: Data<AppState>,
    caller: Caller,
    path: Path<String>,
    body: Body,
) -> Result<HttpResponse, Problem> {
    patient(&caller)?;
    let request_id: AccessRequestId = path_id(&path, "access request")?;
    let input: Rejection = body.json_or_default()?;
    let mut v = Validation::default();
    let reason = input
        .reason
        .as_deref()
        .and_then(|r| v.check(Note::parse("reason", r)));
    v.finish()?;
    let meta = command_meta(&req, Some(caller.actor()), body.bytes())?;
    let decided = state
        .commands
        .reject_access(request_id, caller.actor(), reason.as_ref(), meta)
        .await
        .map_err(|e| decision_refused(e.into()))?;
    answer(&state, decided).await
}

#[utoipa::path(post, path = "/v1/access-requests/{request_id}/revocation", tag = "consent",
    params(("request_id" = Uuid, Path)),
    security(("bearer" = [])),
    responses((status = 200, description = "Revoked (the patient): the doctor's reads are refused from now on", body = RequestState)))]
#[tracing::instrument(skip_all)]
pub async fn revoke(
    req: HttpRequest,
    state: Data<AppState>,
    caller: Caller,
    path: Path<String>,
) -> Result<HttpResponse, Problem> {
    patient(&caller)?;
    let request_id: AccessRequestId = path_id(&path, "access request")?;
    let meta = command_meta(&req, Some(caller.actor()), b"")?;
    let decided = state
        .commands
        .revoke_access(request_id, caller.actor(), meta)
        .await
        .map_err(|e| decision_refused(e.into()))?;
    answer(&state, decided).await
}

/// The answer to a decision, built from the event it appended (so a repeat under the
/// same idempotency key answers the same).
async fn answer(state: &AppState, decided: Decided) -> Result<HttpResponse, Problem> {
    state.settle.settle(&decided.outcome).await;
    let body = match decided.event {
        AccessEvent::AccessApproved {
            request_id,
            scope,
            expires_at,
            ..
        } => {
            let (categories, record_ids) = scope_lists(&scope);
            RequestState {
                request_id: request_id.as_uuid(),
                status: "approved".to_owned(),
                categories: Some(categories),
                record_ids: Some(record_ids),
                expires_at: Some(expires_at),
            }
        }
        AccessEvent::AccessRejected { request_id, .. } => decision(request_id, "rejected"),
        AccessEvent::AccessRevoked { request_id, .. } => decision(request_id, "revoked"),
        AccessEvent::AccessExpired { request_id, .. } => decision(request_id, "expired"),
        AccessEvent::AccessRequested { request_id, .. } => decision(request_id, "pending"),
        // Recorded by the chain adapter, never the answer to a decision.
        AccessEvent::ConsentGrantedOnChain { .. } | AccessEvent::ConsentRevokedOnChain { .. } => {
            return Err(Problem::internal(&anyhow::anyhow!(
                "a decision answered with a chain event"
            )))
        }
    };
    Ok(HttpResponse::Ok().json(body))
}

fn decision(request_id: AccessRequestId, status: &str) -> RequestState {
    RequestState {
        request_id: request_id.as_uuid(),
        status: status.to_owned(),
        categories: None,
        record_ids: None,
        expires_at: None,
    }
}

#[utoipa::path(get, path = "/v1/doctors/{doctor_id}/grants", tag = "consent",
    params(("doctor_id" = Uuid, Path)),
    security(("bearer" = [])),
    responses((status = 200, description = "The doctor's active grants", body = GrantList)))]
#[tracing::instrument(skip_all)]
pub async fn grants(
    state: Data<AppState>,
    caller: Caller,
    path: Path<String>,
) -> Result<HttpResponse, Problem> {
    let doctor_id: DoctorId = path_id(&path, "doctor")?;
    if doctor(&caller)? != doctor_id {
        return Err(Problem::forbidden(
            "not_your_data",
            "a doctor may see only their own grants",
        ));
    }
    let rows = queries::active_grants_of_doctor(
        state.store.any_pool(),
        &doctor_id.to_string(),
        state.commands.now(),
    )
    .await?;
    let items = rows
        .into_iter()
        .map(|g| {
            let scope: Scope = serde_json::from_str(&g.scope).unwrap_or_default();
            let (categories, record_ids) = scope_lists(&scope);
            GrantItem {
                request_id: Uuid::parse_str(&g.request_id).unwrap_or_default(),
                patient_id: Uuid::parse_str(&g.patient_id).unwrap_or_default(),
                categories,
                record_ids,
                approved_at: g.approved_at,
                expires_at: g.expires_at,
            }
        })
        .collect();
    Ok(HttpResponse::Ok().json(GrantList { items }))
}

#[utoipa::path(get, path = "/v1/patients/{patient_id}/access-log", tag = "consent",
    params(("patient_id" = Uuid, Path), PageQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "Who read which of the patient's records, when, under which request (the patient, or an auditor)", body = AccessLogPage)))]
#[tracing::instrument(skip_all)]
pub async fn access_log(
    state: Data<AppState>,
    caller: Caller,
    path: Path<String>,
    query: Query<PageQuery>,
) -> Result<HttpResponse, Problem> {
    let patient_id: PatientId = path_id(&path, "patient")?;
    if !matches!(caller.actor(), Actor::Auditor(_)) {
        own_patient(&caller, patient_id)?;
    }
    let (after, limit) = query.parse()?;
    let page = queries::access_log_of_patient(
        state.store.any_pool(),
        &patient_id.to_string(),
        after,
        limit,
    )
    .await?;
    let mut doctors = Doctors::default();
    let mut items = Vec::with_capacity(page.items.len());
    for row in page.items {
        let doctor = row.accessor.strip_prefix("doctor:").map(str::to_owned);
        let doctor_name = match &doctor {
            Some(d) => doctors.get(&state, d).await?.and_then(|(_, name)| name),
            None => None,
        };
        items.push(AccessLogItem {
            doctor_id: doctor.and_then(|d| Uuid::parse_str(&d).ok()),
            doctor_name,
            record_id: Uuid::parse_str(&row.record_id).unwrap_or_default(),
            request_id: row.request_id.and_then(|r| Uuid::parse_str(&r).ok()),
            category: row.category,
            at: row.accessed_at,
        });
    }
    Ok(HttpResponse::Ok().json(AccessLogPage {
        items,
        next_cursor: page.next_cursor,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_documented_categories_are_the_domains() {
        let schema =
            serde_json::to_value(<CategoryName as utoipa::PartialSchema>::schema()).unwrap();
        let documented: Vec<&str> = schema["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let domain: Vec<&str> = Category::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(documented, domain);
    }
}
