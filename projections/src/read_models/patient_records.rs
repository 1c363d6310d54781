//! A patient's records: the projection of uploads and the record reads, joined with
//! where each blob is stored and its token.

use crate::read_models::shared::Schema;
use anyhow::Context;
use async_trait::async_trait;
use cqrs_es::Aggregate;
use domain::record::MedicalRecord;
use eventstore::consumer::ReadModelTx;
use eventstore::{Backend, LogHandler, StoredEvent};
use serde::Serialize;
use sqlx::AnyPool;

use super::shared::{exec, page, Int, OptText, Page, RecordEvent, Text, Upcasters};
use crate::codec::time;

/// The tables, from `projections/sql/patient_records.sql`.
const SCHEMA: Schema = Schema(include_str!("../../sql/patient_records.sql"));

/// A patient's records.
#[derive(Default)]
pub struct PatientRecords {
    upcasters: Upcasters,
}

#[async_trait]
impl LogHandler for PatientRecords {
    fn name(&self) -> &str {
        "patient_records"
    }

    fn schema(&self, _: Backend) -> Vec<String> {
        SCHEMA.statements()
    }

    fn schema_version(&self) -> u32 {
        SCHEMA.version()
    }

    fn tables(&self) -> Vec<String> {
        vec!["rm_patient_records".into()]
    }

    async fn apply(&self, tx: &mut ReadModelTx, event: &StoredEvent) -> anyhow::Result<()> {
        if event.aggregate_type != MedicalRecord::TYPE {
            return Ok(());
        }
        if let RecordEvent::RecordUploaded {
            record_id,
            patient_id,
            category,
            media_type,
            size,
            sha256,
            wrapped_key,
            filename,
            uploaded_at,
        } = event.decode::<RecordEvent>(&self.upcasters.0)?
        {
            exec(
                tx,
                "INSERT INTO rm_patient_records (record_id, patient_id, category, media_type, size, \
                 sha256, wrapped_key, filename_sealed, uploaded_at, position) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                vec![
                    Text(record_id.to_string()),
                    Text(patient_id.to_string()),
                    Text(category.as_str().to_owned()),
                    Text(media_type.as_str().to_owned()),
                    Int(i64::try_from(size.get())?),
                    Text(sha256.as_str().to_owned()),
                    Text(wrapped_key.as_str().to_owned()),
                    OptText(filename.map(|f| f.as_str().to_owned())),
                    Text(time(&uploaded_at)),
                    Int(event.position),
                ],
            )
            .await?;
        }
        Ok(())
    }
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
