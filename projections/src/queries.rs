//! Reads of the read models, for the API. Lists are paginated by a cursor: the
//! position of the last item returned.

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{AnyPool, Row};

use crate::codec::time;

/// One page of a list; `next_cursor` is `None` on the last page.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<i64>,
}

/// `items` (fetched with one more than `limit`) as a page: the extra one, if there,
/// only says a next page exists.
pub fn page<T>(mut items: Vec<T>, limit: i64, position: impl Fn(&T) -> i64) -> Page<T> {
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(position)
    } else {
        None
    };
    Page { items, next_cursor }
}

/// A record in a patient's list (its filename stays sealed here).
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct RecordRow {
    pub record_id: String,
    pub patient_id: String,
    pub category: String,
    pub media_type: String,
    pub size: i64,
    pub sha256: String,
    pub wrapped_key: String,
    pub filename_sealed: Option<String>,
    pub uploaded_at: String,
    pub position: i64,
    /// The backend asked about, when it holds a confirmed copy (`RecordStored`).
    pub stored_on: Option<String>,
    /// The record's token and the transaction that minted it, once minted.
    pub token_id: Option<String>,
    pub token_tx_hash: Option<String>,
}

/// A patient's records; `backend` is the remote store whose copies to report
/// (`None`: blobs are kept locally only).
pub async fn records_of_patient(
    pool: &AnyPool,
    patient_id: &str,
    backend: Option<&str>,
    after: i64,
    limit: i64,
) -> anyhow::Result<Page<RecordRow>> {
    let rows: Vec<RecordRow> = sqlx::query_as(
        "SELECT p.record_id, p.patient_id, p.category, p.media_type, p.size, p.sha256, \
         p.wrapped_key, p.filename_sealed, p.uploaded_at, p.position, r.backend AS stored_on, \
         t.token_id, t.tx_hash AS token_tx_hash \
         FROM rm_patient_records p LEFT JOIN rm_record_replicas r \
         ON r.record_id = p.record_id AND r.backend = $4 \
         LEFT JOIN rm_record_tokens t ON t.record_id = p.record_id \
         WHERE p.patient_id = $1 AND p.position > $2 ORDER BY p.position LIMIT $3",
    )
    .bind(patient_id.to_owned())
    .bind(after)
    .bind(limit + 1)
    .bind(backend.unwrap_or_default().to_owned())
    .fetch_all(pool)
    .await
    .context("reading a patient's records")?;
    Ok(page(rows, limit, |r| r.position))
}

pub async fn record(
    pool: &AnyPool,
    record_id: &str,
    backend: Option<&str>,
) -> anyhow::Result<Option<RecordRow>> {
    sqlx::query_as(
        "SELECT p.record_id, p.patient_id, p.category, p.media_type, p.size, p.sha256, \
         p.wrapped_key, p.filename_sealed, p.uploaded_at, p.position, r.backend AS stored_on, \
         t.token_id, t.tx_hash AS token_tx_hash \
         FROM rm_patient_records p LEFT JOIN rm_record_replicas r \
         ON r.record_id = p.record_id AND r.backend = $2 \
         LEFT JOIN rm_record_tokens t ON t.record_id = p.record_id WHERE p.record_id = $1",
    )
    .bind(record_id.to_owned())
    .bind(backend.unwrap_or_default().to_owned())
    .fetch_optional(pool)
    .await
    .context("reading a record")
}

/// An access request as the patient sees it (purpose still sealed).
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct AccessRequestRow {
    pub request_id: String,
    pub patient_id: String,
    pub doctor_id: String,
    pub status: String,
    /// JSON of the domain `Scope`.
    pub scope: String,
    pub purpose_sealed: String,
    pub duration_days: i64,
    pub requested_at: String,
    pub decided_at: Option<String>,
    pub expires_at: Option<String>,
    pub closed_at: Option<String>,
    pub position: i64,
}

const ACCESS_COLUMNS: &str = "request_id, patient_id, doctor_id, status, scope, purpose_sealed, \
     duration_days, requested_at, decided_at, expires_at, closed_at, position";

/// A patient's access requests, optionally of one status. An approved request whose
/// expiry has passed counts as `expired` even before the expiry sweep has recorded it,
/// and its row says so.
pub async fn access_requests_of_patient(
    pool: &AnyPool,
    patient_id: &str,
    status: Option<&str>,
    now: DateTime<Utc>,
    after: i64,
    limit: i64,
) -> anyhow::Result<Page<AccessRequestRow>> {
    access_requests_of(pool, "patient_id", patient_id, status, now, after, limit).await
}

/// A doctor's access requests, like [`access_requests_of_patient`].
pub async fn access_requests_of_doctor(
    pool: &AnyPool,
    doctor_id: &str,
    status: Option<&str>,
    now: DateTime<Utc>,
    after: i64,
    limit: i64,
) -> anyhow::Result<Page<AccessRequestRow>> {
    access_requests_of(pool, "doctor_id", doctor_id, status, now, after, limit).await
}

/// `party` is the column (`patient_id` or `doctor_id`), never input.
async fn access_requests_of(
    pool: &AnyPool,
    party: &'static str,
    party_id: &str,
    status: Option<&str>,
    now: DateTime<Utc>,
    after: i64,
    limit: i64,
) -> anyhow::Result<Page<AccessRequestRow>> {
    let now = time(&now);
    let rows: Vec<AccessRequestRow> = sqlx::query_as(&format!(
        "SELECT {ACCESS_COLUMNS} FROM rm_access_requests \
         WHERE {party} = $1 AND position > $2 AND ( \
           $3 = '' \
           OR ($3 = 'approved' AND status = 'approved' AND expires_at > $4) \
           OR ($3 = 'expired' AND (status = 'expired' OR (status = 'approved' AND expires_at <= $5))) \
           OR ($3 NOT IN ('approved', 'expired') AND status = $6)) \
         ORDER BY position LIMIT $7"
    ))
    .bind(party_id.to_owned())
    .bind(after)
    .bind(status.unwrap_or("").to_owned())
    .bind(now.clone())
    .bind(now.clone())
    .bind(status.unwrap_or("").to_owned())
    .bind(limit + 1)
    .fetch_all(pool)
    .await
    .context("reading access requests")?;
    let rows = rows
        .into_iter()
        .map(|mut r| {
            if r.status == "approved" && r.expires_at.as_deref().is_some_and(|e| e <= now.as_str())
            {
                r.status = "expired".to_owned();
            }
            r
        })
        .collect();
    Ok(page(rows, limit, |r| r.position))
}

/// The requests a doctor made to a patient, newest first (the latest 200: enough to
/// find an active grant among them).
pub async fn requests_between(
    pool: &AnyPool,
    doctor_id: &str,
    patient_id: &str,
) -> anyhow::Result<Vec<AccessRequestRow>> {
    sqlx::query_as(&format!(
        "SELECT {ACCESS_COLUMNS} FROM rm_access_requests \
         WHERE doctor_id = $1 AND patient_id = $2 ORDER BY position DESC LIMIT 200"
    ))
    .bind(doctor_id.to_owned())
    .bind(patient_id.to_owned())
    .fetch_all(pool)
    .await
    .context("reading a doctor's requests to a patient")
}

pub async fn access_request(
    pool: &AnyPool,
    request_id: &str,
) -> anyhow::Result<Option<AccessRequestRow>> {
    sqlx::query_as(&format!(
        "SELECT {ACCESS_COLUMNS} FROM rm_access_requests WHERE request_id = $1"
    ))
    .bind(request_id.to_owned())
    .fetch_optional(pool)
    .await
    .context("reading an access request")
}

/// A grant a doctor holds now.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct GrantRow {
    pub request_id: String,
    pub doctor_id: String,
    pub patient_id: String,
    pub scope: String,
    pub approved_at: String,
    pub expires_at: String,
    pub position: i64,
}

pub async fn active_grants_of_doctor(
    pool: &AnyPool,
    doctor_id: &str,
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<GrantRow>> {
    sqlx::query_as(
        "SELECT request_id, doctor_id, patient_id, scope, approved_at, expires_at, position \
         FROM rm_doctor_grants WHERE doctor_id = $1 AND expires_at > $2 ORDER BY position",
    )
    .bind(doctor_id.to_owned())
    .bind(time(&now))
    .fetch_all(pool)
    .await
    .context("reading a doctor's grants")
}

/// Grants whose expiry has passed but that are not yet marked expired.
pub async fn grants_due_to_expire(
    pool: &AnyPool,
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<String>> {
    sqlx::query_scalar("SELECT request_id FROM rm_doctor_grants WHERE expires_at <= $1 ORDER BY expires_at LIMIT 500")
        .bind(time(&now))
        .fetch_all(pool)
        .await
        .context("finding grants due to expire")
}

/// One read of a patient's record.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct AccessLogRow {
    pub position: i64,
    pub event_id: String,
    pub patient_id: String,
    pub record_id: String,
    /// `kind:id`, e.g. `doctor:<uuid>`.
    pub accessor: String,
    pub request_id: Option<String>,
    pub category: String,
    pub accessed_at: String,
}

pub async fn access_log_of_patient(
    pool: &AnyPool,
    patient_id: &str,
    after: i64,
    limit: i64,
) -> anyhow::Result<Page<AccessLogRow>> {
    let rows: Vec<AccessLogRow> = sqlx::query_as(
        "SELECT position, event_id, patient_id, record_id, accessor, request_id, category, \
         accessed_at FROM rm_access_log WHERE patient_id = $1 AND position > $2 \
         ORDER BY position LIMIT $3",
    )
    .bind(patient_id.to_owned())
    .bind(after)
    .bind(limit + 1)
    .fetch_all(pool)
    .await
    .context("reading a patient's access log")?;
    Ok(page(rows, limit, |r| r.position))
}

/// A registered doctor.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct DoctorRow {
    pub doctor_id: String,
    pub phone_index: String,
    pub licence: String,
    pub status: String,
    pub registered_at: String,
}

pub async fn doctor(pool: &AnyPool, doctor_id: &str) -> anyhow::Result<Option<DoctorRow>> {
    sqlx::query_as(
        "SELECT doctor_id, phone_index, licence, status, registered_at FROM rm_doctors \
         WHERE doctor_id = $1",
    )
    .bind(doctor_id.to_owned())
    .fetch_optional(pool)
    .await
    .context("reading a doctor")
}

/// The patient registered with this phone blind index, if any.
pub async fn patient_by_phone_index(pool: &AnyPool, index: &str) -> anyhow::Result<Option<String>> {
    sqlx::query_scalar("SELECT patient_id FROM rm_patients WHERE phone_index = $1")
        .bind(index.to_owned())
        .fetch_optional(pool)
        .await
        .context("finding a patient by phone")
}

/// The patient who registered the wallet with this index, if any.
pub async fn patient_by_wallet_index(
    pool: &AnyPool,
    index: &str,
) -> anyhow::Result<Option<String>> {
    sqlx::query_scalar("SELECT patient_id FROM rm_patient_wallets WHERE wallet_index = $1")
        .bind(index.to_owned())
        .fetch_optional(pool)
        .await
        .context("finding a patient by wallet")
}

/// Every row of a read-model table, as text, in a stable order (rebuild checks).
pub async fn dump_table(pool: &AnyPool, table: &str) -> anyhow::Result<Vec<Vec<Option<String>>>> {
    let rows = sqlx::query(&format!("SELECT * FROM {table} ORDER BY 1"))
        .fetch_all(pool)
        .await
        .with_context(|| format!("dumping {table}"))?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let mut cells = Vec::new();
        for (i, _) in row.columns().iter().enumerate() {
            let cell = match row.try_get::<Option<String>, _>(i) {
                Ok(v) => v,
                Err(_) => row.try_get::<Option<i64>, _>(i)?.map(|n| n.to_string()),
            };
            cells.push(cell);
        }
        out.push(cells);
    }
    Ok(out)
}

/// An anchored range of the log.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct AnchorRow {
    pub from_ordinal: i64,
    pub to_ordinal: i64,
    pub root: String,
    pub chain_id: i64,
    pub contract: String,
    pub tx_hash: String,
    pub block: i64,
    pub anchored_at: String,
    pub position: i64,
}

/// Anchored ranges, in the order they were recorded.
pub async fn anchors(pool: &AnyPool, after: i64, limit: i64) -> anyhow::Result<Page<AnchorRow>> {
    let rows: Vec<AnchorRow> = sqlx::query_as(
        "SELECT from_ordinal, to_ordinal, root, chain_id, contract, tx_hash, block, \
         anchored_at, position FROM rm_log_anchors WHERE position > $1 ORDER BY position LIMIT $2",
    )
    .bind(after)
    .bind(limit + 1)
    .fetch_all(pool)
    .await
    .context("reading audit anchors")?;
    Ok(page(rows, limit, |r| r.position))
}

/// A payment as its payer sees it.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct PaymentRow {
    pub payment_id: String,
    pub payer: String,
    pub patient_id: Option<String>,
    pub doctor_id: Option<String>,
    pub access_request_id: Option<String>,
    pub purpose: String,
    pub amount_kes: i64,
    pub status: String,
    pub checkout_request_id: Option<String>,
    pub mpesa_receipt: Option<String>,
    pub result_code: Option<i64>,
    pub result_desc: Option<String>,
    pub requested_at: String,
    pub settled_at: Option<String>,
    pub position: i64,
}

const PAYMENT_COLUMNS: &str = "payment_id, payer, patient_id, doctor_id, access_request_id, \
     purpose, amount_kes, status, checkout_request_id, mpesa_receipt, result_code, result_desc, \
     requested_at, settled_at, position";

/// One payment.
pub async fn payment(pool: &AnyPool, payment_id: &str) -> anyhow::Result<Option<PaymentRow>> {
    sqlx::query_as(&format!(
        "SELECT {PAYMENT_COLUMNS} FROM rm_payments WHERE payment_id = $1"
    ))
    .bind(payment_id.to_owned())
    .fetch_optional(pool)
    .await
    .context("reading a payment")
}

/// The payment Daraja knows by this CheckoutRequestID.
pub async fn payment_by_checkout(
    pool: &AnyPool,
    checkout_request_id: &str,
) -> anyhow::Result<Option<PaymentRow>> {
    sqlx::query_as(&format!(
        "SELECT {PAYMENT_COLUMNS} FROM rm_payments WHERE checkout_request_id = $1"
    ))
    .bind(checkout_request_id.to_owned())
    .fetch_optional(pool)
    .await
    .context("finding a payment by CheckoutRequestID")
}

/// The payments of a patient (`patient_id`) or of a doctor (`doctor_id`), oldest first.
pub async fn payments_of(
    pool: &AnyPool,
    column: PaymentParty,
    id: &str,
    after: i64,
    limit: i64,
) -> anyhow::Result<Page<PaymentRow>> {
    // A payment names its payer, and the patient or doctor it concerns.
    let (column, payer) = match column {
        PaymentParty::Patient => ("patient_id", format!("patient:{id}")),
        PaymentParty::Doctor => ("doctor_id", format!("doctor:{id}")),
    };
    let rows: Vec<PaymentRow> = sqlx::query_as(&format!(
        "SELECT {PAYMENT_COLUMNS} FROM rm_payments WHERE ({column} = $1 OR payer = $2) \
         AND position > $3 ORDER BY position LIMIT $4"
    ))
    .bind(id.to_owned())
    .bind(payer)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(pool)
    .await
    .context("reading payments")?;
    Ok(page(rows, limit, |r| r.position))
}

/// Whose payments to list.
#[derive(Clone, Copy, Debug)]
pub enum PaymentParty {
    Patient,
    Doctor,
}

/// Payments pushed but not settled since before `pushed_before` (oldest first): the
/// reconciler's work.
pub async fn unsettled_payments(
    pool: &AnyPool,
    pushed_before: &str,
    limit: i64,
) -> anyhow::Result<Vec<PaymentRow>> {
    sqlx::query_as(&format!(
        "SELECT {PAYMENT_COLUMNS} FROM rm_payments WHERE status = 'pending' \
         AND checkout_request_id IS NOT NULL AND pushed_at < $1 ORDER BY position LIMIT $2"
    ))
    .bind(pushed_before.to_owned())
    .bind(limit)
    .fetch_all(pool)
    .await
    .context("reading unsettled payments")
}

/// One event of the audit history.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct AuditEventRow {
    pub ordinal: i64,
    pub position: i64,
    pub event_id: String,
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub event: crate::audit::TrailColumns,
    /// This event's link in the trail's hash chain (hex).
    pub hash: String,
}

/// Filters of the audit history; `None` leaves a field unfiltered.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    pub event_type: Option<String>,
    pub actor: Option<String>,
    pub from_time: Option<DateTime<Utc>>,
    pub to_time: Option<DateTime<Utc>>,
    pub from_position: Option<i64>,
}

/// The events matching `filter` after ordinal `after`, in log order.
pub async fn audit_events(
    pool: &AnyPool,
    filter: &AuditFilter,
    after: i64,
    limit: i64,
) -> anyhow::Result<Page<AuditEventRow>> {
    let text = |v: &Option<String>| v.clone().unwrap_or_default();
    let from_time = filter.from_time.as_ref().map(time).unwrap_or_default();
    let to_time = filter.to_time.as_ref().map(time).unwrap_or_default();
    let rows: Vec<AuditEventRow> = sqlx::query_as(
        "SELECT ordinal, position, event_id, recorded_at, aggregate_type, aggregate_id, \
         sequence, event_type, event_version, actor, correlation_id, causation_id, payload, \
         hash FROM rm_audit_trail WHERE ordinal > $1 \
         AND ($2 = '' OR aggregate_type = $3) AND ($4 = '' OR aggregate_id = $5) \
         AND ($6 = '' OR event_type = $7) AND ($8 = '' OR actor = $9) \
         AND ($10 = '' OR recorded_at >= $11) AND ($12 = '' OR recorded_at < $13) \
         AND position >= $14 ORDER BY ordinal LIMIT $15",
    )
    .bind(after)
    .bind(text(&filter.aggregate_type))
    .bind(text(&filter.aggregate_type))
    .bind(text(&filter.aggregate_id))
    .bind(text(&filter.aggregate_id))
    .bind(text(&filter.event_type))
    .bind(text(&filter.event_type))
    .bind(text(&filter.actor))
    .bind(text(&filter.actor))
    .bind(from_time.clone())
    .bind(from_time)
    .bind(to_time.clone())
    .bind(to_time)
    .bind(filter.from_position.unwrap_or(0))
    .bind(limit + 1)
    .fetch_all(pool)
    .await
    .context("reading the audit history")?;
    Ok(page(rows, limit, |r| r.ordinal))
}

/// A registered webhook (URL and secret sealed under the integrator's key).
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct WebhookRow {
    pub webhook_id: String,
    pub integrator_id: String,
    pub url_sealed: String,
    /// JSON array of event types.
    pub types: String,
    pub secret_sealed: String,
    pub registered_at: String,
    /// The log place of its registration: deliveries start after it.
    pub tx: i64,
    pub position: i64,
}

const WEBHOOK_COLUMNS: &str =
    "webhook_id, integrator_id, url_sealed, types, secret_sealed, registered_at, tx, position";

/// Every webhook that delivers (its integrator's key not withdrawn), oldest first.
pub async fn webhooks(pool: &AnyPool) -> anyhow::Result<Vec<WebhookRow>> {
    sqlx::query_as(&format!(
        "SELECT {WEBHOOK_COLUMNS} FROM rm_webhooks WHERE disabled_at IS NULL ORDER BY position"
    ))
    .fetch_all(pool)
    .await
    .context("reading webhooks")
}

/// One integrator's webhooks, oldest first.
pub async fn webhooks_of(pool: &AnyPool, integrator_id: &str) -> anyhow::Result<Vec<WebhookRow>> {
    sqlx::query_as(&format!(
        "SELECT {WEBHOOK_COLUMNS} FROM rm_webhooks WHERE integrator_id = $1 ORDER BY position"
    ))
    .bind(integrator_id.to_owned())
    .fetch_all(pool)
    .await
    .context("reading an integrator's webhooks")
}

/// A doctor with sealed personal fields.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct DoctorProfileRow {
    pub doctor_id: String,
    pub personal_sealed: String,
    pub licence: String,
    /// unverified, verified or suspended.
    pub status: String,
    pub registered_at: String,
    pub position: i64,
}

const PROFILE_COLUMNS: &str =
    "doctor_id, personal_sealed, licence, status, registered_at, position";

/// Doctors (of one status, or all) after position `after`, oldest first.
pub async fn doctor_profiles(
    pool: &AnyPool,
    status: Option<&str>,
    after: i64,
    limit: i64,
) -> anyhow::Result<Page<DoctorProfileRow>> {
    let status = status.unwrap_or("").to_owned();
    let rows = sqlx::query_as(&format!(
        "SELECT {PROFILE_COLUMNS} FROM rm_doctor_profiles \
         WHERE position > $1 AND ($2 = '' OR status = $3) ORDER BY position LIMIT $4"
    ))
    .bind(after)
    .bind(status.clone())
    .bind(status)
    .bind(limit + 1)
    .fetch_all(pool)
    .await
    .context("reading doctors")?;
    Ok(page(rows, limit, |r: &DoctorProfileRow| r.position))
}

/// One doctor's profile.
pub async fn doctor_profile(
    pool: &AnyPool,
    doctor_id: &str,
) -> anyhow::Result<Option<DoctorProfileRow>> {
    sqlx::query_as(&format!(
        "SELECT {PROFILE_COLUMNS} FROM rm_doctor_profiles WHERE doctor_id = $1"
    ))
    .bind(doctor_id.to_owned())
    .fetch_optional(pool)
    .await
    .context("reading a doctor's profile")
}

/// The patient a share code's keyed hash names while it is valid at `now`.
pub async fn patient_by_share_code(
    pool: &AnyPool,
    code_index: &str,
    now: DateTime<Utc>,
) -> anyhow::Result<Option<(String, String)>> {
    sqlx::query_as(
        "SELECT patient_id, expires_at FROM rm_share_codes WHERE code_index = $1 AND expires_at > $2",
    )
    .bind(code_index.to_owned())
    .bind(time(&now))
    .fetch_optional(pool)
    .await
    .context("looking up a share code")
}
