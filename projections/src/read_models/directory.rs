//! The directory: patients, their wallets, doctors and share codes, by id and by
//! blind index, and the look-ups sign-in and sharing make in it.

use crate::read_models::shared::Schema;
use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use domain::doctor::Doctor;
use domain::patient::Patient;
use eventstore::consumer::ReadModelTx;
use eventstore::{Backend, LogHandler, StoredEvent};
use serde::Serialize;
use sqlx::AnyPool;

use super::shared::{exec, DoctorEvent, Int, PatientEvent, Text, Upcasters};
use crate::codec::time;

/// The tables, from `projections/sql/directory.sql`.
const SCHEMA: Schema = Schema(include_str!("../../sql/directory.sql"));

/// Patients and doctors: ids, the phone blind index (sign-in), licence and verification
/// state. No names or numbers: those stay sealed in the events.
#[derive(Default)]
pub struct Directory {
    upcasters: Upcasters,
}

#[async_trait]
impl LogHandler for Directory {
    fn name(&self) -> &str {
        "directory"
    }

    fn schema(&self, _: Backend) -> Vec<String> {
        SCHEMA.statements()
    }

    fn schema_version(&self) -> u32 {
        SCHEMA.version()
    }

    fn tables(&self) -> Vec<String> {
        vec![
            "rm_patients".into(),
            "rm_patient_wallets".into(),
            "rm_doctors".into(),
            "rm_share_codes".into(),
        ]
    }

    async fn apply(&self, tx: &mut ReadModelTx, event: &StoredEvent) -> anyhow::Result<()> {
        let at = time(&event.recorded_at);
        if event.aggregate_type == Patient::TYPE {
            match event.decode::<PatientEvent>(&self.upcasters.0)? {
                PatientEvent::PatientRegistered {
                    patient_id,
                    phone_index,
                    ..
                } => {
                    exec(
                        tx,
                        "INSERT INTO rm_patients (patient_id, phone_index, registered_at, updated_at) \
                         VALUES ($1, $2, $3, $4)",
                        vec![Text(patient_id.to_string()), Text(phone_index), Text(at.clone()), Text(at)],
                    )
                    .await?;
                }
                PatientEvent::PatientProfileUpdated { patient_id, .. } => {
                    exec(
                        tx,
                        "UPDATE rm_patients SET updated_at = $1 WHERE patient_id = $2",
                        vec![Text(at), Text(patient_id.to_string())],
                    )
                    .await?;
                }
                PatientEvent::WalletRegistered {
                    patient_id,
                    wallet_index,
                    ..
                } => {
                    exec(
                        tx,
                        "INSERT INTO rm_patient_wallets (wallet_index, patient_id) VALUES ($1, $2) \
                         ON CONFLICT (wallet_index) DO NOTHING",
                        vec![Text(wallet_index), Text(patient_id.to_string())],
                    )
                    .await?;
                    exec(
                        tx,
                        "UPDATE rm_patients SET updated_at = $1 WHERE patient_id = $2",
                        vec![Text(at), Text(patient_id.to_string())],
                    )
                    .await?;
                }
                // The chain adapter's bookkeeping: nothing a read model shows.
                PatientEvent::CustodialAddressInUse { .. } => {}
                PatientEvent::ShareCodeIssued {
                    patient_id,
                    code_index,
                    expires_at,
                    ..
                } => {
                    // A new code replaces the patient's earlier one.
                    exec(
                        tx,
                        "DELETE FROM rm_share_codes WHERE patient_id = $1",
                        vec![Text(patient_id.to_string())],
                    )
                    .await?;
                    exec(
                        tx,
                        "INSERT INTO rm_share_codes (code_index, patient_id, expires_at, position) \
                         VALUES ($1, $2, $3, $4)",
                        vec![
                            Text(code_index),
                            Text(patient_id.to_string()),
                            Text(time(&expires_at)),
                            Int(event.position),
                        ],
                    )
                    .await?;
                }
            }
        } else if event.aggregate_type == Doctor::TYPE {
            match event.decode::<DoctorEvent>(&self.upcasters.0)? {
                DoctorEvent::DoctorRegistered {
                    doctor_id,
                    phone_index,
                    licence,
                    ..
                } => {
                    exec(
                        tx,
                        "INSERT INTO rm_doctors (doctor_id, phone_index, licence, status, registered_at, updated_at) \
                         VALUES ($1, $2, $3, 'unverified', $4, $5)",
                        vec![
                            Text(doctor_id.to_string()),
                            Text(phone_index),
                            Text(licence.as_str().to_owned()),
                            Text(at.clone()),
                            Text(at),
                        ],
                    )
                    .await?;
                }
                DoctorEvent::DoctorVerified { doctor_id, .. } => {
                    exec(
                        tx,
                        "UPDATE rm_doctors SET status = 'verified', updated_at = $1 WHERE doctor_id = $2",
                        vec![Text(at), Text(doctor_id.to_string())],
                    )
                    .await?;
                }
                DoctorEvent::DoctorSuspended { doctor_id, .. } => {
                    exec(
                        tx,
                        "UPDATE rm_doctors SET status = 'suspended', updated_at = $1 WHERE doctor_id = $2",
                        vec![Text(at), Text(doctor_id.to_string())],
                    )
                    .await?;
                }
            }
        }
        Ok(())
    }
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
