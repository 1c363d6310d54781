//! Access requests with their current status, and the reads of them.

use crate::read_models::shared::Schema;
use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use domain::access::AccessRequest;
use eventstore::consumer::ReadModelTx;
use eventstore::{Backend, LogHandler, StoredEvent};
use serde::Serialize;
use sqlx::AnyPool;

use super::shared::{exec, page, AccessEvent, Int, Page, Text, Upcasters};
use crate::codec::{json, time};

/// The tables, from `projections/sql/access_requests.sql`.
const SCHEMA: Schema = Schema(include_str!("../../sql/access_requests.sql"));

/// Every access request with its current status, for the patient's inbox and history.
#[derive(Default)]
pub struct AccessRequests {
    upcasters: Upcasters,
}

#[async_trait]
impl LogHandler for AccessRequests {
    fn name(&self) -> &str {
        "access_requests"
    }

    fn schema(&self, _: Backend) -> Vec<String> {
        SCHEMA.statements()
    }

    fn schema_version(&self) -> u32 {
        SCHEMA.version()
    }

    fn tables(&self) -> Vec<String> {
        vec!["rm_access_requests".into()]
    }

    async fn apply(&self, tx: &mut ReadModelTx, event: &StoredEvent) -> anyhow::Result<()> {
        if event.aggregate_type != AccessRequest::TYPE {
            return Ok(());
        }
        match event.decode::<AccessEvent>(&self.upcasters.0)? {
            AccessEvent::AccessRequested {
                request_id,
                doctor_id,
                patient_id,
                scope,
                purpose,
                duration,
                requested_at,
                ..
            } => {
                exec(
                    tx,
                    "INSERT INTO rm_access_requests (request_id, patient_id, doctor_id, status, scope, \
                     purpose_sealed, duration_days, requested_at, position) \
                     VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $8)",
                    vec![
                        Text(request_id.to_string()),
                        Text(patient_id.to_string()),
                        Text(doctor_id.to_string()),
                        Text(json(&scope)?),
                        Text(purpose.as_str().to_owned()),
                        Int(i64::from(duration.days())),
                        Text(time(&requested_at)),
                        Int(event.position),
                    ],
                )
                .await?;
            }
            AccessEvent::AccessApproved {
                request_id,
                scope,
                expires_at,
                approved_at,
                ..
            } => {
                exec(
                    tx,
                    "UPDATE rm_access_requests SET status = 'approved', scope = $1, decided_at = $2, \
                     expires_at = $3, position = $4 WHERE request_id = $5",
                    vec![
                        Text(json(&scope)?),
                        Text(time(&approved_at)),
                        Text(time(&expires_at)),
                        Int(event.position),
                        Text(request_id.to_string()),
                    ],
                )
                .await?;
            }
            AccessEvent::AccessRejected {
                request_id,
                rejected_at,
                ..
            } => {
                self.close(
                    tx,
                    "rejected",
                    "decided_at",
                    request_id.to_string(),
                    time(&rejected_at),
                    event.position,
                )
                .await?;
            }
            AccessEvent::AccessRevoked {
                request_id,
                revoked_at,
                ..
            } => {
                self.close(
                    tx,
                    "revoked",
                    "closed_at",
                    request_id.to_string(),
                    time(&revoked_at),
                    event.position,
                )
                .await?;
            }
            AccessEvent::AccessExpired {
                request_id,
                expired_at,
                ..
            } => {
                self.close(
                    tx,
                    "expired",
                    "closed_at",
                    request_id.to_string(),
                    time(&expired_at),
                    event.position,
                )
                .await?;
            }
            AccessEvent::ConsentGrantedOnChain { .. }
            | AccessEvent::ConsentRevokedOnChain { .. } => {}
        }
        Ok(())
    }
}

impl AccessRequests {
    async fn close(
        &self,
        tx: &mut ReadModelTx,
        status: &str,
        column: &str,
        request_id: String,
        at: String,
        position: i64,
    ) -> anyhow::Result<()> {
        exec(
            tx,
            &format!(
                "UPDATE rm_access_requests SET status = $1, {column} = $2, position = $3 \
                 WHERE request_id = $4"
            ),
            vec![
                Text(status.to_owned()),
                Text(at),
                Int(position),
                Text(request_id),
            ],
        )
        .await
    }
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
