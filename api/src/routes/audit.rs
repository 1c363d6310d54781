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
use crate::routes::{whole, PageQuery};
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
    /// `next_cursor` of the previous page (an ordinal).
    pub cursor: Option<String>,
    /// 1 to 100 (default 50); for the export, any number (default: no limit).
    pub limit: Option<String>,
}

/// One event with its metadata. The payload is as stored: personal fields sealed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditEvent {
    /// Place in log order (1-based): the cursor of this list and of `/v1/audit/verify`.
    pub ordinal: i64,
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
    /// SHA-256 link of the trail's hash chain (hex), over the previous link and this
    /// event as stored.
    pub hash: String,
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
    responses((status = 200, description = "The event history in log order, with who did what and when; personal fields stay sealed (auditors). All actions of one doctor in a period: `actor=doctor:<id>&from_time=…&to_time=…`", body = AuditEventPage)))]
#[tracing::instrument(skip_all)]
pub async fn events(
    state: Data<AppState>,
    caller: Caller,
    query: Query<AuditQuery>,
) -> Result<HttpResponse, Problem> {
    auditor_only(&caller, "only auditors see the event history")?;
    let mut v = Validation::default();
    let filter = filter_of(&query, &mut v);
    let (after, limit) = PageQuery {
        cursor: query.cursor.clone(),
        limit: query.limit.clone(),
    }
    .parse()?;
    v.finish()?;
    let page = queries::audit_events(state.store.any_pool(), &filter, after, limit).await?;
    Ok(HttpResponse::Ok().json(AuditEventPage {
        items: page.items.into_iter().map(AuditEvent::from).collect(),
        next_cursor: page.next_cursor,
    }))
}

fn auditor_only(caller: &Caller, detail: &'static str) -> Result<(), Problem> {
    if matches!(caller.actor(), Actor::Auditor(_)) {
        Ok(())
    } else {
        Err(Problem::forbidden("role_forbidden", detail))
    }
}

/// The filters of `query`, each failure noted in `v`.
fn filter_of(query: &AuditQuery, v: &mut Validation) -> queries::AuditFilter {
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
    let from_position = whole(v, "from_position", query.from_position.as_deref());
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
    let short = |raw: &Option<String>| raw.clone().filter(|s| !s.is_empty());
    queries::AuditFilter {
        aggregate_type: short(&query.aggregate_type),
        aggregate_id: short(&query.aggregate_id),
        event_type: short(&query.event_type),
        actor: short(&query.actor),
        from_time,
        to_time,
        from_position,
    }
}

impl From<queries::AuditEventRow> for AuditEvent {
    fn from(e: queries::AuditEventRow) -> AuditEvent {
        AuditEvent {
            ordinal: e.ordinal,
            position: e.position,
            event_id: e.event_id,
            recorded_at: e.event.recorded_at,
            aggregate_type: e.event.aggregate_type,
            aggregate_id: e.event.aggregate_id,
            sequence: e.event.sequence,
            event_type: e.event.event_type,
            event_version: e.event.event_version,
            actor: e.event.actor,
            correlation_id: e.event.correlation_id,
            causation_id: e.event.causation_id,
            payload: serde_json::from_str(&e.event.payload).unwrap_or(serde_json::Value::Null),
            hash: e.hash,
        }
    }
}

/// Rows fetched per query while exporting.
const EXPORT_BATCH: i64 = 1000;

#[utoipa::path(get, path = "/v1/audit/events/export", tag = "audit",
    params(AuditQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "The filtered event history as NDJSON (`application/x-ndjson`), one event per line in log order, streamed however long the range: `cursor` resumes after an ordinal, `limit` (optional, any size) stops after that many events (auditors)", content_type = "application/x-ndjson", body = AuditEvent)))]
#[tracing::instrument(skip_all)]
pub async fn export(
    state: Data<AppState>,
    caller: Caller,
    query: Query<AuditQuery>,
) -> Result<HttpResponse, Problem> {
    auditor_only(&caller, "only auditors export the event history")?;
    let mut v = Validation::default();
    let filter = filter_of(&query, &mut v);
    let after = whole(&mut v, "cursor", query.cursor.as_deref()).unwrap_or(0);
    let limit = match whole(&mut v, "limit", query.limit.as_deref()) {
        Some(0) => {
            v.fail("limit", "must be 1 or more");
            None
        }
        other => other,
    };
    v.finish()?;
    let pool = state.store.any_pool().clone();
    struct Export {
        after: i64,
        left: Option<i64>,
        rows: std::vec::IntoIter<queries::AuditEventRow>,
        done: bool,
    }
    let start = Export {
        after,
        left: limit,
        rows: Vec::new().into_iter(),
        done: false,
    };
    // Pulled by the connection as it drains: at most one batch is held in memory.
    let lines = futures::stream::unfold(start, move |mut at| {
        let pool = pool.clone();
        let filter = filter.clone();
        async move {
            loop {
                if at.left == Some(0) {
                    return None;
                }
                if let Some(row) = at.rows.next() {
                    at.after = row.ordinal;
                    at.left = at.left.map(|n| n - 1);
                    let mut line = match serde_json::to_vec(&AuditEvent::from(row)) {
                        Ok(line) => line,
                        Err(e) => return Some((Err(export_failed(e.into())), at)),
                    };
                    line.push(b'\n');
                    return Some((Ok(actix_web::web::Bytes::from(line)), at));
                }
                if at.done {
                    return None;
                }
                let want = at.left.map_or(EXPORT_BATCH, |n| n.min(EXPORT_BATCH));
                match queries::audit_events(&pool, &filter, at.after, want).await {
                    Ok(page) => {
                        at.done = page.next_cursor.is_none();
                        at.rows = page.items.into_iter();
                    }
                    Err(e) => {
                        at.done = true;
                        at.left = Some(0);
                        return Some((Err(export_failed(e)), at));
                    }
                }
            }
        }
    });
    Ok(HttpResponse::Ok()
        .content_type("application/x-ndjson")
        .streaming(lines))
}

/// An export that fails part-way ends the stream early (the status is already sent):
/// the client sees a truncated body, and the log says why.
fn export_failed(error: anyhow::Error) -> actix_web::Error {
    tracing::error!(error = format!("{error:#}"), "audit export failed");
    actix_web::error::ErrorInternalServerError("export failed")
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct VerifyQuery {
    /// First ordinal to check (default 1).
    pub from: Option<String>,
    /// Last ordinal to check (default: the end of the trail).
    pub to: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChainProblem {
    pub ordinal: i64,
    pub position: i64,
    pub event_id: String,
    /// `modified` (the event no longer hashes to its link), `missing` (deleted from the
    /// log), `replaced` (another event at its position), `gap` (trail rows removed) or
    /// `altered` (the trail's copy of actor, time, type, aggregate or payload differs
    /// from the log).
    pub problem: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChainReport {
    pub from: i64,
    /// The last ordinal checked (0: nothing to check).
    pub to: i64,
    pub checked: u64,
    /// True when every link holds.
    pub intact: bool,
    pub problems_total: u64,
    /// The first 100 problems, in log order.
    pub problems: Vec<ChainProblem>,
    /// The recorded hash of the last event checked (commits to all before it).
    pub head: Option<String>,
}

#[utoipa::path(get, path = "/v1/audit/verify", tag = "audit",
    params(VerifyQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "Recomputes the audit trail's hash chain over log ordinals `from..=to` from the event log: a modified or deleted event is reported (auditors)", body = ChainReport)))]
#[tracing::instrument(skip_all)]
pub async fn verify(
    state: Data<AppState>,
    caller: Caller,
    query: Query<VerifyQuery>,
) -> Result<HttpResponse, Problem> {
    auditor_only(&caller, "only auditors verify the audit trail")?;
    let mut v = Validation::default();
    let from = whole(&mut v, "from", query.from.as_deref()).unwrap_or(1);
    let to = whole(&mut v, "to", query.to.as_deref());
    if to.is_some_and(|to| to < from) {
        v.fail("to", "must not be before from");
    }
    v.finish()?;
    let report = projections::audit::verify(&state.store, from, to).await?;
    Ok(HttpResponse::Ok().json(ChainReport {
        from: report.from,
        to: report.to,
        checked: report.checked,
        intact: report.intact,
        problems_total: report.problems_total,
        problems: report
            .problems
            .into_iter()
            .map(|p| ChainProblem {
                ordinal: p.ordinal,
                position: p.position,
                event_id: p.event_id,
                problem: serde_json::to_value(&p.problem)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
            })
            .collect(),
        head: report.head,
    }))
}

/// A doctor's read that no active grant covered.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UncoveredRead {
    pub position: i64,
    pub event_id: String,
    pub patient_id: String,
    pub record_id: String,
    /// `doctor:<id>`.
    pub accessor: String,
    pub request_id: Option<String>,
    pub category: String,
    pub accessed_at: String,
    /// `no_request`, `unknown_request`, `other_party`, `not_approved`,
    /// `before_approval`, `after_revocation`, `after_expiry` or `out_of_scope`.
    pub reason: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UncoveredReadPage {
    pub items: Vec<UncoveredRead>,
    pub next_cursor: Option<i64>,
}

#[utoipa::path(get, path = "/v1/audit/findings/uncovered-reads", tag = "audit",
    params(PageQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "Doctors' reads that no active grant covered at the time, with the reason; must be empty (auditors)", body = UncoveredReadPage)))]
#[tracing::instrument(skip_all)]
pub async fn uncovered_reads(
    state: Data<AppState>,
    caller: Caller,
    query: Query<PageQuery>,
) -> Result<HttpResponse, Problem> {
    findings(state, caller, query, false).await
}

#[utoipa::path(get, path = "/v1/audit/findings/reads-after-revocation", tag = "audit",
    params(PageQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "Reads made under a grant already revoked or expired; must be empty (auditors)", body = UncoveredReadPage)))]
#[tracing::instrument(skip_all)]
pub async fn reads_after_revocation(
    state: Data<AppState>,
    caller: Caller,
    query: Query<PageQuery>,
) -> Result<HttpResponse, Problem> {
    findings(state, caller, query, true).await
}

async fn findings(
    state: Data<AppState>,
    caller: Caller,
    query: Query<PageQuery>,
    after_end_only: bool,
) -> Result<HttpResponse, Problem> {
    auditor_only(&caller, "only auditors see audit findings")?;
    let (after, limit) = query.parse()?;
    let page =
        projections::audit::uncovered_reads(state.store.any_pool(), after, limit, after_end_only)
            .await?;
    Ok(HttpResponse::Ok().json(UncoveredReadPage {
        items: page
            .items
            .into_iter()
            .map(|r| UncoveredRead {
                position: r.read.position,
                event_id: r.read.event_id,
                patient_id: r.read.patient_id,
                record_id: r.read.record_id,
                accessor: r.read.accessor,
                request_id: r.read.request_id,
                category: r.read.category,
                accessed_at: r.read.accessed_at,
                reason: serde_json::to_value(r.reason)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
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
    auditor_only(&caller, "only auditors see a patient's disclosures")?;
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
