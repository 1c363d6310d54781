//! Doctors' active grants, and the reads of them.

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

use super::shared::{exec, AccessEvent, Int, Text, Upcasters};
use crate::codec::{json, time};

/// The tables, from `projections/sql/doctor_grants.sql`.
const SCHEMA: Schema = Schema(include_str!("../../sql/doctor_grants.sql"));

/// A doctor's active grants: added on approval, removed on revocation or expiry. A
/// grant past its expiry but not yet marked expired is filtered out when read.
#[derive(Default)]
pub struct DoctorGrants {
    upcasters: Upcasters,
}

#[async_trait]
impl LogHandler for DoctorGrants {
    fn name(&self) -> &str {
        "doctor_grants"
    }

    fn schema(&self, _: Backend) -> Vec<String> {
        SCHEMA.statements()
    }

    fn schema_version(&self) -> u32 {
        SCHEMA.version()
    }

    fn tables(&self) -> Vec<String> {
        vec!["rm_doctor_grants".into()]
    }

    async fn apply(&self, tx: &mut ReadModelTx, event: &StoredEvent) -> anyhow::Result<()> {
        if event.aggregate_type != AccessRequest::TYPE {
            return Ok(());
        }
        match event.decode::<AccessEvent>(&self.upcasters.0)? {
            AccessEvent::AccessApproved {
                request_id,
                patient_id,
                doctor_id,
                scope,
                expires_at,
                approved_at,
            } => {
                exec(
                    tx,
                    "INSERT INTO rm_doctor_grants (request_id, doctor_id, patient_id, scope, \
                     approved_at, expires_at, position) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    vec![
                        Text(request_id.to_string()),
                        Text(doctor_id.to_string()),
                        Text(patient_id.to_string()),
                        Text(json(&scope)?),
                        Text(time(&approved_at)),
                        Text(time(&expires_at)),
                        Int(event.position),
                    ],
                )
                .await?;
            }
            AccessEvent::AccessRevoked { request_id, .. }
            | AccessEvent::AccessExpired { request_id, .. } => {
                exec(
                    tx,
                    "DELETE FROM rm_doctor_grants WHERE request_id = $1",
                    vec![Text(request_id.to_string())],
                )
                .await?;
            }
            _ => {}
        }
        Ok(())
    }
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
