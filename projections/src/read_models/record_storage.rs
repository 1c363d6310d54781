//! Where each record's encrypted blob is kept (read by the storage adapter's queue and
//! joined into the record reads).

use crate::read_models::shared::Schema;
use async_trait::async_trait;
use cqrs_es::Aggregate;
use domain::record::MedicalRecord;
use eventstore::consumer::ReadModelTx;
use eventstore::{Backend, LogHandler, StoredEvent};

use super::shared::{exec, Int, OptText, RecordEvent, Text, Upcasters};
use crate::codec::time;

/// The tables, from `projections/sql/record_storage.sql`.
const SCHEMA: Schema = Schema(include_str!("../../sql/record_storage.sql"));

/// Where each record's encrypted blob is kept: every upload (the storage adapter's
/// intake, in log order: `log_tx`, `position`) and every confirmed remote copy
/// (`RecordStored`), per backend.
#[derive(Default)]
pub struct RecordStorage {
    upcasters: Upcasters,
}

#[async_trait]
impl LogHandler for RecordStorage {
    fn name(&self) -> &str {
        "record_storage"
    }

    fn schema(&self, _: Backend) -> Vec<String> {
        SCHEMA.statements()
    }

    fn schema_version(&self) -> u32 {
        SCHEMA.version()
    }

    fn tables(&self) -> Vec<String> {
        vec!["rm_record_blobs".into(), "rm_record_replicas".into()]
    }

    async fn apply(&self, tx: &mut ReadModelTx, event: &StoredEvent) -> anyhow::Result<()> {
        if event.aggregate_type != MedicalRecord::TYPE {
            return Ok(());
        }
        match event.decode::<RecordEvent>(&self.upcasters.0)? {
            RecordEvent::RecordUploaded {
                record_id,
                size,
                sha256,
                ..
            } => {
                exec(
                    tx,
                    "INSERT INTO rm_record_blobs (record_id, sha256, size, log_tx, position) \
                     VALUES ($1, $2, $3, $4, $5)",
                    vec![
                        Text(record_id.to_string()),
                        Text(sha256.as_str().to_owned()),
                        Int(i64::try_from(size.get())?),
                        Int(event.tx),
                        Int(event.position),
                    ],
                )
                .await?;
            }
            RecordEvent::RecordStored {
                record_id,
                backend,
                object_key,
                etag,
                stored_at,
            } => {
                // One per backend: the aggregate records a repeat as nothing, and a
                // copy moved to another key on the same backend replaces the row.
                exec(
                    tx,
                    "DELETE FROM rm_record_replicas WHERE record_id = $1 AND backend = $2",
                    vec![Text(record_id.to_string()), Text(backend.clone())],
                )
                .await?;
                exec(
                    tx,
                    "INSERT INTO rm_record_replicas (record_id, backend, object_key, etag, \
                     stored_at, position) VALUES ($1, $2, $3, $4, $5, $6)",
                    vec![
                        Text(record_id.to_string()),
                        Text(backend),
                        Text(object_key),
                        OptText(etag),
                        Text(time(&stored_at)),
                        Int(event.position),
                    ],
                )
                .await?;
            }
            RecordEvent::RecordAccessed { .. }
            | RecordEvent::RecordIntegrityFailed { .. }
            | RecordEvent::RecordTokenMinted { .. } => {}
        }
        Ok(())
    }
}
