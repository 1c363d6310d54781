//! Audit anchors of log ranges, and the reads of them.

use crate::read_models::shared::Schema;
use anyhow::Context;
use async_trait::async_trait;
use cqrs_es::Aggregate;
use eventstore::consumer::ReadModelTx;
use eventstore::{Backend, LogHandler, StoredEvent};
use serde::Serialize;
use sqlx::AnyPool;

use super::shared::{exec, page, Int, Page, Text, Upcasters};
use crate::codec::time;

/// The tables, from `projections/sql/log_anchors.sql`.
const SCHEMA: Schema = Schema(include_str!("../../sql/log_anchors.sql"));

/// Audit anchors of log ranges, as recorded (`LogRangeAnchored`).
#[derive(Default)]
pub struct LogAnchors {
    upcasters: Upcasters,
}

#[async_trait]
impl LogHandler for LogAnchors {
    fn name(&self) -> &str {
        "log_anchors"
    }

    fn schema(&self, _: Backend) -> Vec<String> {
        SCHEMA.statements()
    }

    fn schema_version(&self) -> u32 {
        SCHEMA.version()
    }

    fn tables(&self) -> Vec<String> {
        vec!["rm_log_anchors".into()]
    }

    async fn apply(&self, tx: &mut ReadModelTx, event: &StoredEvent) -> anyhow::Result<()> {
        if event.aggregate_type != domain::anchor::LogAnchor::TYPE {
            return Ok(());
        }
        let domain::anchor::AnchorEvent::LogRangeAnchored {
            from,
            to,
            root,
            receipt,
            anchored_at,
        } = event.decode::<domain::anchor::AnchorEvent>(&self.upcasters.0)?;
        exec(
            tx,
            "INSERT INTO rm_log_anchors (from_ordinal, to_ordinal, root, chain_id, contract, \
             tx_hash, block, anchored_at, position) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            vec![
                Int(i64::try_from(from)?),
                Int(i64::try_from(to)?),
                Text(root),
                Int(i64::try_from(receipt.chain_id)?),
                Text(receipt.contract),
                Text(receipt.tx_hash),
                Int(i64::try_from(receipt.block)?),
                Text(time(&anchored_at)),
                Int(event.position),
            ],
        )
        .await
    }
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
