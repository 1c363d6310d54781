//! Who read which of a patient's records, and the reads of that log.

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

/// The tables, from `projections/sql/access_log.sql`.
const SCHEMA: Schema = Schema(include_str!("../../sql/access_log.sql"));

/// Who read which of a patient's records, when, under which request.
#[derive(Default)]
pub struct AccessLog {
    upcasters: Upcasters,
}

#[async_trait]
impl LogHandler for AccessLog {
    fn name(&self) -> &str {
        "access_log"
    }

    fn schema(&self, _: Backend) -> Vec<String> {
        SCHEMA.statements()
    }

    fn schema_version(&self) -> u32 {
        SCHEMA.version()
    }

    fn tables(&self) -> Vec<String> {
        vec!["rm_access_log".into()]
    }

    async fn apply(&self, tx: &mut ReadModelTx, event: &StoredEvent) -> anyhow::Result<()> {
        if event.aggregate_type != MedicalRecord::TYPE {
            return Ok(());
        }
        if let RecordEvent::RecordAccessed {
            record_id,
            patient_id,
            accessor,
            request_id,
            category,
            accessed_at,
        } = event.decode::<RecordEvent>(&self.upcasters.0)?
        {
            exec(
                tx,
                "INSERT INTO rm_access_log (position, event_id, patient_id, record_id, accessor, \
                 request_id, category, accessed_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                vec![
                    Int(event.position),
                    Text(event.event_id.to_string()),
                    Text(patient_id.to_string()),
                    Text(record_id.to_string()),
                    Text(accessor.reference()),
                    OptText(request_id.map(|r| r.to_string())),
                    Text(category.as_str().to_owned()),
                    Text(time(&accessed_at)),
                ],
            )
            .await?;
        }
        Ok(())
    }
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
