//! Integrators' webhooks, and the reads of them.

use crate::read_models::shared::Schema;
use anyhow::Context;
use async_trait::async_trait;
use cqrs_es::Aggregate;
use eventstore::consumer::ReadModelTx;
use eventstore::{Backend, LogHandler, StoredEvent};
use serde::Serialize;
use sqlx::AnyPool;

use super::shared::{exec, Int, Text, Upcasters};
use crate::codec::{json, time};

/// The tables, from `projections/sql/webhooks.sql`.
const SCHEMA: Schema = Schema(include_str!("../../sql/webhooks.sql"));

/// Integrators' webhooks as registered, with where in the log each was registered
/// (its deliveries start after that event). URLs and secrets stay sealed.
#[derive(Default)]
pub struct Webhooks {
    upcasters: Upcasters,
}

#[async_trait]
impl LogHandler for Webhooks {
    fn name(&self) -> &str {
        "webhooks"
    }

    fn schema(&self, _: Backend) -> Vec<String> {
        SCHEMA.statements()
    }

    fn schema_version(&self) -> u32 {
        SCHEMA.version()
    }

    fn tables(&self) -> Vec<String> {
        vec!["rm_webhooks".into()]
    }

    async fn apply(&self, tx: &mut ReadModelTx, event: &StoredEvent) -> anyhow::Result<()> {
        if event.aggregate_type != domain::integrator::Integrator::TYPE {
            return Ok(());
        }
        match event.decode(&self.upcasters.0)? {
            domain::integrator::IntegratorEvent::WebhookRegistered {
                integrator_id,
                webhook_id,
                url,
                types,
                secret,
                registered_at,
            } => {
                exec(
                    tx,
                    "INSERT INTO rm_webhooks (webhook_id, integrator_id, url_sealed, types, \
                     secret_sealed, registered_at, tx, position) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    vec![
                        Text(webhook_id.to_string()),
                        Text(integrator_id.to_string()),
                        Text(url.as_str().to_owned()),
                        Text(json(&types)?),
                        Text(secret.as_str().to_owned()),
                        Text(time(&registered_at)),
                        Int(event.tx),
                        Int(event.position),
                    ],
                )
                .await?;
            }
            domain::integrator::IntegratorEvent::IntegratorDisabled {
                integrator_id,
                disabled_at,
            } => {
                exec(
                    tx,
                    "UPDATE rm_webhooks SET disabled_at = $1 WHERE integrator_id = $2",
                    vec![Text(time(&disabled_at)), Text(integrator_id.to_string())],
                )
                .await?;
            }
            domain::integrator::IntegratorEvent::IntegratorAdded { .. } => {}
        }
        Ok(())
    }
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
