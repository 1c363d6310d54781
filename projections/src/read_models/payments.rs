//! Payments and rejected M-Pesa callbacks, and the reads of payments.

use crate::read_models::shared::Schema;
use anyhow::Context;
use async_trait::async_trait;
use cqrs_es::Aggregate;
use eventstore::consumer::ReadModelTx;
use eventstore::{Backend, LogHandler, StoredEvent};
use serde::Serialize;
use sqlx::AnyPool;

use super::shared::{exec, page, Int, OptText, Page, Text, Upcasters};
use crate::codec::time;

/// The tables, from `projections/sql/payments.sql`.
const SCHEMA: Schema = Schema(include_str!("../../sql/payments.sql"));

type PaymentEvent = <domain::payment::Payment as Aggregate>::Event;

/// Payments with their status, for the payer's lists and the callback's lookup by
/// CheckoutRequestID; and callbacks that settled nothing, for operators. No phone
/// numbers: those stay sealed in the events.
#[derive(Default)]
pub struct Payments {
    upcasters: Upcasters,
}

#[async_trait]
impl LogHandler for Payments {
    fn name(&self) -> &str {
        "payments"
    }

    fn schema(&self, _: Backend) -> Vec<String> {
        SCHEMA.statements()
    }

    fn schema_version(&self) -> u32 {
        SCHEMA.version()
    }

    fn tables(&self) -> Vec<String> {
        vec!["rm_payments".into(), "rm_mpesa_rejected_callbacks".into()]
    }

    async fn apply(&self, tx: &mut ReadModelTx, event: &StoredEvent) -> anyhow::Result<()> {
        let at = time(&event.recorded_at);
        if event.aggregate_type == domain::payment::RejectedCallback::TYPE {
            let domain::payment::RejectedCallbackEvent::MpesaCallbackRejected {
                reason,
                checkout_request_id,
                result_code,
                mpesa_receipt,
                amount_kes,
                payment_id,
            } = event.decode::<domain::payment::RejectedCallbackEvent>(&self.upcasters.0)?;
            let amount = amount_kes.map(i64::try_from).transpose()?;
            let mut query = sqlx::query(
                "INSERT INTO rm_mpesa_rejected_callbacks (position, checkout_request_id, reason, \
                 result_code, mpesa_receipt, amount_kes, payment_id, recorded_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            );
            query = query
                .bind(event.position)
                .bind(checkout_request_id)
                .bind(reason)
                .bind(result_code)
                .bind(mpesa_receipt)
                .bind(amount)
                .bind(payment_id.map(|p| p.to_string()))
                .bind(at);
            query.execute(&mut **tx).await?;
            return Ok(());
        }
        if event.aggregate_type != domain::payment::Payment::TYPE {
            return Ok(());
        }
        match event.decode::<PaymentEvent>(&self.upcasters.0)? {
            PaymentEvent::PaymentRequested {
                payment_id,
                payer,
                purpose,
                amount_kes,
                doctor_id,
                access_request_id,
                patient_id,
                ..
            } => {
                let patient_id = patient_id
                    .map(|p| p.to_string())
                    .or_else(|| payer.strip_prefix("patient:").map(str::to_owned));
                let doctor_id = doctor_id
                    .map(|d| d.to_string())
                    .or_else(|| payer.strip_prefix("doctor:").map(str::to_owned));
                exec(
                    tx,
                    "INSERT INTO rm_payments (payment_id, payer, patient_id, doctor_id, \
                     access_request_id, purpose, amount_kes, status, requested_at, position) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', $8, $9)",
                    vec![
                        Text(payment_id.to_string()),
                        Text(payer),
                        OptText(patient_id),
                        OptText(doctor_id),
                        OptText(access_request_id.map(|a| a.to_string())),
                        Text(purpose.as_str().to_owned()),
                        Int(i64::try_from(amount_kes)?),
                        Text(at),
                        Int(event.position),
                    ],
                )
                .await?;
            }
            PaymentEvent::StkPushAccepted {
                payment_id,
                merchant_request_id,
                checkout_request_id,
            } => {
                exec(
                    tx,
                    "UPDATE rm_payments SET checkout_request_id = $1, merchant_request_id = $2, \
                     pushed_at = $3 WHERE payment_id = $4",
                    vec![
                        Text(checkout_request_id),
                        Text(merchant_request_id),
                        Text(at),
                        Text(payment_id.to_string()),
                    ],
                )
                .await?;
            }
            PaymentEvent::StkPushFailed {
                payment_id,
                error_code,
                error_message,
            } => {
                exec(
                    tx,
                    "UPDATE rm_payments SET status = 'failed', result_desc = $1, settled_at = $2 \
                     WHERE payment_id = $3",
                    vec![
                        Text(format!("STK Push failed: {error_code} {error_message}")),
                        Text(at),
                        Text(payment_id.to_string()),
                    ],
                )
                .await?;
            }
            PaymentEvent::PaymentConfirmed {
                payment_id,
                receipt,
                ..
            } => {
                exec(
                    tx,
                    "UPDATE rm_payments SET status = 'confirmed', result_code = 0, \
                     mpesa_receipt = $1, settled_at = $2 WHERE payment_id = $3",
                    vec![
                        OptText(receipt.map(|r| r.receipt)),
                        Text(at),
                        Text(payment_id.to_string()),
                    ],
                )
                .await?;
            }
            PaymentEvent::PaymentFailed {
                payment_id,
                result_code,
                result_desc,
                status,
                ..
            } => {
                exec(
                    tx,
                    "UPDATE rm_payments SET status = $1, result_code = $2, result_desc = $3, \
                     settled_at = $4 WHERE payment_id = $5",
                    vec![
                        Text(status.as_str().to_owned()),
                        Int(result_code),
                        Text(result_desc),
                        Text(at),
                        Text(payment_id.to_string()),
                    ],
                )
                .await?;
            }
            PaymentEvent::PaymentReconciled { .. }
            | PaymentEvent::PaymasterBudgetCredited { .. } => {}
        }
        Ok(())
    }
}

/// A payment as its payer sees it.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct PaymentRow {
    pub payment_id: String,
    pub payer: String,
    pub patient_id: Option<String>,
    pub doctor_id: Option<String>,
    pub access_request_id: Option<String>,
    pub purpose: String,
    pub amount_kes: i64,
    pub status: String,
    pub checkout_request_id: Option<String>,
    pub mpesa_receipt: Option<String>,
    pub result_code: Option<i64>,
    pub result_desc: Option<String>,
    pub requested_at: String,
    pub settled_at: Option<String>,
    pub position: i64,
}

const PAYMENT_COLUMNS: &str = "payment_id, payer, patient_id, doctor_id, access_request_id, \
     purpose, amount_kes, status, checkout_request_id, mpesa_receipt, result_code, result_desc, \
     requested_at, settled_at, position";

/// One payment.
pub async fn payment(pool: &AnyPool, payment_id: &str) -> anyhow::Result<Option<PaymentRow>> {
    sqlx::query_as(&format!(
        "SELECT {PAYMENT_COLUMNS} FROM rm_payments WHERE payment_id = $1"
    ))
    .bind(payment_id.to_owned())
    .fetch_optional(pool)
    .await
    .context("reading a payment")
}

/// The payment Daraja knows by this CheckoutRequestID.
pub async fn payment_by_checkout(
    pool: &AnyPool,
    checkout_request_id: &str,
) -> anyhow::Result<Option<PaymentRow>> {
    sqlx::query_as(&format!(
        "SELECT {PAYMENT_COLUMNS} FROM rm_payments WHERE checkout_request_id = $1"
    ))
    .bind(checkout_request_id.to_owned())
    .fetch_optional(pool)
    .await
    .context("finding a payment by CheckoutRequestID")
}

/// The payments of a patient (`patient_id`) or of a doctor (`doctor_id`), oldest first.
pub async fn payments_of(
    pool: &AnyPool,
    column: PaymentParty,
    id: &str,
    after: i64,
    limit: i64,
) -> anyhow::Result<Page<PaymentRow>> {
    // A payment names its payer, and the patient or doctor it concerns.
    let (column, payer) = match column {
        PaymentParty::Patient => ("patient_id", format!("patient:{id}")),
        PaymentParty::Doctor => ("doctor_id", format!("doctor:{id}")),
    };
    let rows: Vec<PaymentRow> = sqlx::query_as(&format!(
        "SELECT {PAYMENT_COLUMNS} FROM rm_payments WHERE ({column} = $1 OR payer = $2) \
         AND position > $3 ORDER BY position LIMIT $4"
    ))
    .bind(id.to_owned())
    .bind(payer)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(pool)
    .await
    .context("reading payments")?;
    Ok(page(rows, limit, |r| r.position))
}

/// Whose payments to list.
#[derive(Clone, Copy, Debug)]
pub enum PaymentParty {
    Patient,
    Doctor,
}

/// Payments pushed but not settled since before `pushed_before` (oldest first): the
/// reconciler's work.
pub async fn unsettled_payments(
    pool: &AnyPool,
    pushed_before: &str,
    after_position: i64,
    limit: i64,
) -> anyhow::Result<Vec<PaymentRow>> {
    sqlx::query_as(&format!(
        "SELECT {PAYMENT_COLUMNS} FROM rm_payments WHERE status = 'pending' \
         AND checkout_request_id IS NOT NULL AND pushed_at < $1 AND position > $2 \
         ORDER BY position LIMIT $3"
    ))
    .bind(pushed_before.to_owned())
    .bind(after_position)
    .bind(limit)
    .fetch_all(pool)
    .await
    .context("reading unsettled payments")
}
