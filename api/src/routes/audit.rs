//! The audit trail for auditors: the event history, and the log ranges anchored on
//! chain.

use actix_web::web::{Data, Query};
use actix_web::HttpResponse;
use domain::actor::Actor;
use projections::queries;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::extract::Caller;
use crate::problem::{Problem, Validation};
use crate::routes::PageQuery;
use crate::server::AppState;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AnchorItem {
    /// First and last log ordinal of the range (1-based, in log order).
    pub from: i64,
    pub to: i64,
    /// Merkle root of the range's events (keccak-256), `0x…`.
    pub root: String,
    pub chain_id: i64,
    /// The audit anchor contract.
    pub contract: String,
    pub tx_hash: String,
    pub block: i64,
    pub anchored_at: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AnchorPage {
    pub items: Vec<AnchorItem>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<i64>,
}

#[utoipa::path(get, path = "/v1/audit/anchors", tag = "audit",
    params(PageQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "Log ranges whose Merkle roots are anchored on chain (auditors and registrars); `afyachain audit verify` recomputes them", body = AnchorPage)))]
#[tracing::instrument(skip_all)]
pub async fn anchors(
    state: Data<AppState>,
    caller: Caller,
    query: Query<PageQuery>,
) -> Result<HttpResponse, Problem> {
    if !matches!(caller.actor(), Actor::Auditor(_) | Actor::Registrar(_)) {
        return Err(Problem::forbidden(
            "role_forbidden",
            "only auditors and registrars see the audit anchors",
        ));
    }
    let (after, limit) = query.parse()?;
    let page = queries::anchors(state.store.any_pool(), after, limit).await?;
    Ok(HttpResponse::Ok().json(AnchorPage {
        items: page
            .items
            .into_iter()
            .map(|a| AnchorItem {
                from: a.from_ordinal,
                to: a.to_ordinal,
                root: a.root,
                chain_id: a.chain_id,
                contract: a.contract,
                tx_hash: a.tx_hash,
                block: a.block,
                anchored_at: a.anchored_at,
            })
            .collect(),
        next_cursor: page.next_cursor,
    }))
}

/// Filters of the event history (all optional).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// e.g. `access_request`, `medical_record`, `payment`.
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    /// e.g. `RecordAccessed`.
    pub event_type: Option<String>,
    /// `patient:<id>`, `doctor:<id>`, `registrar:<id>`, `auditor:<id>` or `system`.
    pub actor: Option<String>,
    /// RFC 3339; events recorded at or after it.
    pub from_time: Option<String>,
    /// RFC 3339; events recorded before it.
    pub to_time: Option<String>,
    /// Events at or after this log position.
    pub from_position: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// 1 to 100 (default 50).
    pub limit: Option<String>,
}

/// One event with its metadata. The payload is as stored: personal fields sealed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditEvent {
    pub position: i64,
    pub event_id: String,
    pub recorded_at: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub actor: String,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditEventPage {
    pub items: Vec<AuditEvent>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<i64>,
}

#[utoipa::path(get, path = "/v1/audit/events", tag = "audit",
    params(AuditQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "The event history in log order, with who did what and when; personal fields stay sealed (auditors)", body = AuditEventPage)))]
#[tracing::instrument(skip_all)]
pub async fn events(
    state: Data<AppState>,
    caller: Caller,
    query: Query<AuditQuery>,
) -> Result<HttpResponse, Problem> {
    if !matches!(caller.actor(), Actor::Auditor(_)) {
        return Err(Problem::forbidden(
            "role_forbidden",
            "only auditors see the event history",
        ));
    }
    let mut v = Validation::default();
    let mut at = |field: &str, raw: &Option<String>| match raw.as_deref() {
        None | Some("") => None,
        Some(t) => match chrono::DateTime::parse_from_rfc3339(t) {
            Ok(t) => Some(t.with_timezone(&chrono::Utc)),
            Err(_) => {
                v.fail(field, "must be an RFC 3339 time, e.g. 2026-11-25T08:00:00Z");
                None
            }
        },
    };
    let from_time = at("from_time", &query.from_time);
    let to_time = at("to_time", &query.to_time);
    let from_position = match query.from_position.as_deref() {
        None | Some("") => None,
        Some(p) => match p.parse::<i64>() {
            Ok(p) if p >= 0 => Some(p),
            _ => {
                v.fail("from_position", "must be a whole number, 0 or more");
                None
            }
        },
    };
    let short = |raw: &Option<String>| raw.clone().filter(|s| !s.is_empty());
    for (name, value) in [
        ("aggregate_type", &query.aggregate_type),
        ("aggregate_id", &query.aggregate_id),
        ("event_type", &query.event_type),
        ("actor", &query.actor),
    ] {
        if value.as_deref().is_some_and(|s| s.len() > 200) {
            v.fail(name, "must be at most 200 characters");
        }
    }
    let (after, limit) = PageQuery {
        cursor: query.cursor.clone(),
        limit: query.limit.clone(),
    }
    .parse()?;
    v.finish()?;
    let filter = queries::AuditFilter {
        aggregate_type: short(&query.aggregate_type),
        aggregate_id: short(&query.aggregate_id),
        event_type: short(&query.event_type),
        actor: short(&query.actor),
        from_time,
        to_time,
        from_position,
    };
    let page = queries::audit_events(state.store.any_pool(), &filter, after, limit).await?;
    Ok(HttpResponse::Ok().json(AuditEventPage {
        items: page
            .items
            .into_iter()
            .map(|e| AuditEvent {
                position: e.position,
                event_id: e.event_id,
                recorded_at: e.recorded_at,
                aggregate_type: e.aggregate_type,
                aggregate_id: e.aggregate_id,
                sequence: e.sequence,
                event_type: e.event_type,
                event_version: e.event_version,
                actor: e.actor,
                correlation_id: e.correlation_id,
                causation_id: e.causation_id,
                payload: serde_json::from_str(&e.payload).unwrap_or(serde_json::Value::Null),
            })
            .collect(),
        next_cursor: page.next_cursor,
    }))
}

/// One disclosure: a read of the patient's record by someone else.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Disclosure {
    pub doctor_id: Option<String>,
    /// The doctor's licence number, as registered.
    pub doctor_licence: Option<String>,
    pub record_id: String,
    pub category: String,
    /// The access request (grant) the read was made under.
    pub request_id: Option<String>,
    /// The purpose the doctor gave for that request.
    pub purpose: Option<String>,
    pub at: String,
    /// Log position of the `RecordAccessed` event.
    pub position: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DisclosurePage {
    pub items: Vec<Disclosure>,
    pub next_cursor: Option<i64>,
}

#[utoipa::path(get, path = "/v1/audit/patients/{patient_id}/disclosures", tag = "audit",
    params(("patient_id" = uuid::Uuid, Path), PageQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "Every read of the patient's records by others: doctor, licence, record, category, request, purpose, time (auditors)", body = DisclosurePage)))]
#[tracing::instrument(skip_all)]
pub async fn disclosures(
    state: Data<AppState>,
    caller: Caller,
    path: actix_web::web::Path<String>,
    query: Query<PageQuery>,
) -> Result<HttpResponse, Problem> {
    if !matches!(caller.actor(), Actor::Auditor(_)) {
        return Err(Problem::forbidden(
            "role_forbidden",
            "only auditors see a patient's disclosures",
        ));
    }
    let patient_id: domain::ids::PatientId = crate::routes::path_id(&path, "patient")?;
    let (after, limit) = query.parse()?;
    let pool = state.store.any_pool();
    let page = queries::access_log_of_patient(pool, &patient_id.to_string(), after, limit).await?;
    let mut items = Vec::with_capacity(page.items.len());
    for row in page.items {
        let doctor_id = row.accessor.strip_prefix("doctor:").map(str::to_owned);
        let doctor_licence = match &doctor_id {
            Some(d) => queries::doctor(pool, d).await?.map(|d| d.licence),
            None => None,
        };
        let purpose = match &row.request_id {
            Some(r) => match queries::access_request(pool, r).await? {
                Some(request) => {
                    state
                        .commands
                        .open_text(&request.patient_id, &request.purpose_sealed)
                        .await
                }
                None => None,
            },
            None => None,
        };
        items.push(Disclosure {
            doctor_id,
            doctor_licence,
            record_id: row.record_id,
            category: row.category,
            request_id: row.request_id,
            purpose,
            at: row.accessed_at,
            position: row.position,
        });
    }
    Ok(HttpResponse::Ok().json(DisclosurePage {
        items,
        next_cursor: page.next_cursor,
    }))
}
