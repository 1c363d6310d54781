//! Doctors with their sealed personal fields, and the reads of them.

use crate::read_models::shared::Schema;
use anyhow::Context;
use async_trait::async_trait;
use cqrs_es::Aggregate;
use domain::doctor::Doctor;
use eventstore::consumer::ReadModelTx;
use eventstore::{Backend, LogHandler, StoredEvent};
use serde::Serialize;
use sqlx::AnyPool;

use super::shared::{exec, page, DoctorEvent, Int, Page, Text, Upcasters};
use crate::codec::time;

/// The tables, from `projections/sql/doctor_profiles.sql`.
const SCHEMA: Schema = Schema(include_str!("../../sql/doctor_profiles.sql"));

/// Doctors with their sealed personal fields (name and phone, under the doctor's own
/// key), for the registrar's queue and the names patients see. Only the name is ever
/// opened and shown; after the doctor's key is shredded it cannot be.
#[derive(Default)]
pub struct DoctorProfiles {
    upcasters: Upcasters,
}

#[async_trait]
impl LogHandler for DoctorProfiles {
    fn name(&self) -> &str {
        "doctor_profiles"
    }

    fn schema(&self, _: Backend) -> Vec<String> {
        SCHEMA.statements()
    }

    fn schema_version(&self) -> u32 {
        SCHEMA.version()
    }

    fn tables(&self) -> Vec<String> {
        vec!["rm_doctor_profiles".into()]
    }

    async fn apply(&self, tx: &mut ReadModelTx, event: &StoredEvent) -> anyhow::Result<()> {
        if event.aggregate_type != Doctor::TYPE {
            return Ok(());
        }
        let (doctor_id, status) = match event.decode::<DoctorEvent>(&self.upcasters.0)? {
            DoctorEvent::DoctorRegistered {
                doctor_id,
                personal,
                licence,
                ..
            } => {
                return exec(
                    tx,
                    "INSERT INTO rm_doctor_profiles (doctor_id, personal_sealed, licence, status, \
                     registered_at, position) VALUES ($1, $2, $3, 'unverified', $4, $5)",
                    vec![
                        Text(doctor_id.to_string()),
                        Text(personal.as_str().to_owned()),
                        Text(licence.as_str().to_owned()),
                        Text(time(&event.recorded_at)),
                        Int(event.position),
                    ],
                )
                .await;
            }
            DoctorEvent::DoctorVerified { doctor_id, .. } => (doctor_id, "verified"),
            DoctorEvent::DoctorSuspended { doctor_id, .. } => (doctor_id, "suspended"),
        };
        exec(
            tx,
            "UPDATE rm_doctor_profiles SET status = $1 WHERE doctor_id = $2",
            vec![Text(status.to_owned()), Text(doctor_id.to_string())],
        )
        .await
    }
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
