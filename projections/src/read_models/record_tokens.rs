//! Each record's token on chain (joined into the record reads).

use crate::read_models::shared::Schema;
use async_trait::async_trait;
use cqrs_es::Aggregate;
use domain::record::MedicalRecord;
use eventstore::consumer::ReadModelTx;
use eventstore::{Backend, LogHandler, StoredEvent};

use super::shared::{exec, Int, RecordEvent, Text, Upcasters};
use crate::codec::time;

/// The tables, from `projections/sql/record_tokens.sql`.
const SCHEMA: Schema = Schema(include_str!("../../sql/record_tokens.sql"));

/// Each record's token on chain, once minted.
#[derive(Default)]
pub struct RecordTokens {
    upcasters: Upcasters,
}

#[async_trait]
impl LogHandler for RecordTokens {
    fn name(&self) -> &str {
        "record_tokens"
    }

    fn schema(&self, _: Backend) -> Vec<String> {
        SCHEMA.statements()
    }

    fn schema_version(&self) -> u32 {
        SCHEMA.version()
    }

    fn tables(&self) -> Vec<String> {
        vec!["rm_record_tokens".into()]
    }

    async fn apply(&self, tx: &mut ReadModelTx, event: &StoredEvent) -> anyhow::Result<()> {
        if event.aggregate_type != MedicalRecord::TYPE || event.event_type != "RecordTokenMinted" {
            return Ok(());
        }
        if let RecordEvent::RecordTokenMinted {
            record_id,
            token,
            minted_at,
        } = event.decode::<RecordEvent>(&self.upcasters.0)?
        {
            exec(
                tx,
                "INSERT INTO rm_record_tokens (record_id, chain_id, contract, token_id, tx_hash, \
                 block, minted_at, position) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                vec![
                    Text(record_id.to_string()),
                    Int(i64::try_from(token.chain_id)?),
                    Text(token.contract),
                    Text(token.token_id),
                    Text(token.tx_hash),
                    Int(i64::try_from(token.block)?),
                    Text(time(&minted_at)),
                    Int(event.position),
                ],
            )
            .await?;
        }
        Ok(())
    }
}
