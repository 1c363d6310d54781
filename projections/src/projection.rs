//! The projections. Each keeps its tables, named `rm_*`, and handles only the events
//! that concern it; every statement is idempotent per event or guarded by the
//! checkpoint transaction, so a rebuild from position 0 yields the live tables.

use async_trait::async_trait;
use cqrs_es::persist::EventUpcaster;
use cqrs_es::Aggregate;
use domain::access::AccessRequest;
use domain::doctor::Doctor;
use domain::patient::Patient;
use domain::record::MedicalRecord;
use eventstore::consumer::ReadModelTx;
use eventstore::{Backend, LogHandler, StoredEvent};

use crate::codec::{json, time};

type PatientEvent = <Patient as Aggregate>::Event;
type DoctorEvent = <Doctor as Aggregate>::Event;
type AccessEvent = <AccessRequest as Aggregate>::Event;
type RecordEvent = <MedicalRecord as Aggregate>::Event;

/// The domain's upcasters, applied to every event a projection decodes.
struct Upcasters(Vec<Box<dyn EventUpcaster>>);

impl Default for Upcasters {
    fn default() -> Self {
        Upcasters(domain::upcast::upcasters())
    }
}

async fn exec(tx: &mut ReadModelTx, sql: &str, binds: Vec<Bind>) -> anyhow::Result<()> {
    let mut query = sqlx::query(sql);
    for bind in binds {
        query = match bind {
            Bind::Text(s) => query.bind(s),
            Bind::OptText(s) => query.bind(s),
            Bind::Int(i) => query.bind(i),
        };
    }
    query.execute(&mut **tx).await?;
    Ok(())
}

/// A bound parameter; read models hold only text and integers so one SQL text serves
/// SQLite and PostgreSQL.
enum Bind {
    Text(String),
    OptText(Option<String>),
    Int(i64),
}

use Bind::{Int, OptText, Text};

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
        vec![
            "CREATE TABLE IF NOT EXISTS rm_patients (
                patient_id TEXT PRIMARY KEY,
                phone_index TEXT NOT NULL,
                registered_at TEXT NOT NULL,
                updated_at TEXT NOT NULL
            )"
            .into(),
            "CREATE INDEX IF NOT EXISTS rm_patients_phone ON rm_patients (phone_index)".into(),
            "CREATE TABLE IF NOT EXISTS rm_patient_wallets (
                wallet_index TEXT PRIMARY KEY,
                patient_id TEXT NOT NULL
            )"
            .into(),
            "CREATE TABLE IF NOT EXISTS rm_doctors (
                doctor_id TEXT PRIMARY KEY,
                phone_index TEXT NOT NULL,
                licence TEXT NOT NULL,
                status TEXT NOT NULL,
                registered_at TEXT NOT NULL,
                updated_at TEXT NOT NULL
            )"
            .into(),
            "CREATE INDEX IF NOT EXISTS rm_doctors_phone ON rm_doctors (phone_index)".into(),
            // A patient's current share code, by its keyed hash (never the code).
            "CREATE TABLE IF NOT EXISTS rm_share_codes (
                code_index TEXT PRIMARY KEY,
                patient_id TEXT NOT NULL UNIQUE,
                expires_at TEXT NOT NULL,
                position BIGINT NOT NULL
            )"
            .into(),
        ]
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
        vec![
            "CREATE TABLE IF NOT EXISTS rm_patient_records (
                record_id TEXT PRIMARY KEY,
                patient_id TEXT NOT NULL,
                category TEXT NOT NULL,
                media_type TEXT NOT NULL,
                size BIGINT NOT NULL,
                sha256 TEXT NOT NULL,
                wrapped_key TEXT NOT NULL,
                filename_sealed TEXT,
                uploaded_at TEXT NOT NULL,
                position BIGINT NOT NULL
            )"
            .into(),
            "CREATE INDEX IF NOT EXISTS rm_patient_records_patient \
             ON rm_patient_records (patient_id, position)"
                .into(),
        ]
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
        vec![
            "CREATE TABLE IF NOT EXISTS rm_record_blobs (
                record_id TEXT PRIMARY KEY,
                sha256 TEXT NOT NULL,
                size BIGINT NOT NULL,
                log_tx BIGINT NOT NULL,
                position BIGINT NOT NULL
            )"
            .into(),
            "CREATE INDEX IF NOT EXISTS rm_record_blobs_log ON rm_record_blobs (log_tx, position)"
                .into(),
            "CREATE TABLE IF NOT EXISTS rm_record_replicas (
                record_id TEXT NOT NULL,
                backend TEXT NOT NULL,
                object_key TEXT NOT NULL,
                etag TEXT,
                stored_at TEXT NOT NULL,
                position BIGINT NOT NULL,
                PRIMARY KEY (record_id, backend)
            )"
            .into(),
        ]
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
        vec!["CREATE TABLE IF NOT EXISTS rm_record_tokens (
                record_id TEXT PRIMARY KEY,
                chain_id BIGINT NOT NULL,
                contract TEXT NOT NULL,
                token_id TEXT NOT NULL,
                tx_hash TEXT NOT NULL,
                block BIGINT NOT NULL,
                minted_at TEXT NOT NULL,
                position BIGINT NOT NULL
            )"
        .into()]
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

/// Every access request with its current status, for the patient's inbox and history.
#[derive(Default)]
pub struct AccessRequests {
    upcasters: Upcasters,
}

#[async_trait]
impl LogHandler for AccessRequests {
    fn name(&self) -> &str {
        "access_requests"
    }

    fn schema(&self, _: Backend) -> Vec<String> {
        vec![
            "CREATE TABLE IF NOT EXISTS rm_access_requests (
                request_id TEXT PRIMARY KEY,
                patient_id TEXT NOT NULL,
                doctor_id TEXT NOT NULL,
                status TEXT NOT NULL,
                scope TEXT NOT NULL,
                purpose_sealed TEXT NOT NULL,
                duration_days BIGINT NOT NULL,
                requested_at TEXT NOT NULL,
                decided_at TEXT,
                expires_at TEXT,
                closed_at TEXT,
                position BIGINT NOT NULL
            )"
            .into(),
            "CREATE INDEX IF NOT EXISTS rm_access_requests_patient \
             ON rm_access_requests (patient_id, status, position)"
                .into(),
            "CREATE INDEX IF NOT EXISTS rm_access_requests_doctor \
             ON rm_access_requests (doctor_id, position)"
                .into(),
        ]
    }

    fn tables(&self) -> Vec<String> {
        vec!["rm_access_requests".into()]
    }

    async fn apply(&self, tx: &mut ReadModelTx, event: &StoredEvent) -> anyhow::Result<()> {
        if event.aggregate_type != AccessRequest::TYPE {
            return Ok(());
        }
        match event.decode::<AccessEvent>(&self.upcasters.0)? {
            AccessEvent::AccessRequested {
                request_id,
                doctor_id,
                patient_id,
                scope,
                purpose,
                duration,
                requested_at,
                ..
            } => {
                exec(
                    tx,
                    "INSERT INTO rm_access_requests (request_id, patient_id, doctor_id, status, scope, \
                     purpose_sealed, duration_days, requested_at, position) \
                     VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $8)",
                    vec![
                        Text(request_id.to_string()),
                        Text(patient_id.to_string()),
                        Text(doctor_id.to_string()),
                        Text(json(&scope)?),
                        Text(purpose.as_str().to_owned()),
                        Int(i64::from(duration.days())),
                        Text(time(&requested_at)),
                        Int(event.position),
                    ],
                )
                .await?;
            }
            AccessEvent::AccessApproved {
                request_id,
                scope,
                expires_at,
                approved_at,
                ..
            } => {
                exec(
                    tx,
                    "UPDATE rm_access_requests SET status = 'approved', scope = $1, decided_at = $2, \
                     expires_at = $3, position = $4 WHERE request_id = $5",
                    vec![
                        Text(json(&scope)?),
                        Text(time(&approved_at)),
                        Text(time(&expires_at)),
                        Int(event.position),
                        Text(request_id.to_string()),
                    ],
                )
                .await?;
            }
            AccessEvent::AccessRejected {
                request_id,
                rejected_at,
                ..
            } => {
                self.close(
                    tx,
                    "rejected",
                    "decided_at",
                    request_id.to_string(),
                    time(&rejected_at),
                    event.position,
                )
                .await?;
            }
            AccessEvent::AccessRevoked {
                request_id,
                revoked_at,
                ..
            } => {
                self.close(
                    tx,
                    "revoked",
                    "closed_at",
                    request_id.to_string(),
                    time(&revoked_at),
                    event.position,
                )
                .await?;
            }
            AccessEvent::AccessExpired {
                request_id,
                expired_at,
                ..
            } => {
                self.close(
                    tx,
                    "expired",
                    "closed_at",
                    request_id.to_string(),
                    time(&expired_at),
                    event.position,
                )
                .await?;
            }
            AccessEvent::ConsentGrantedOnChain { .. }
            | AccessEvent::ConsentRevokedOnChain { .. } => {}
        }
        Ok(())
    }
}

impl AccessRequests {
    async fn close(
        &self,
        tx: &mut ReadModelTx,
        status: &str,
        column: &str,
        request_id: String,
        at: String,
        position: i64,
    ) -> anyhow::Result<()> {
        exec(
            tx,
            &format!(
                "UPDATE rm_access_requests SET status = $1, {column} = $2, position = $3 \
                 WHERE request_id = $4"
            ),
            vec![
                Text(status.to_owned()),
                Text(at),
                Int(position),
                Text(request_id),
            ],
        )
        .await
    }
}

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
        vec![
            "CREATE TABLE IF NOT EXISTS rm_doctor_grants (
                request_id TEXT PRIMARY KEY,
                doctor_id TEXT NOT NULL,
                patient_id TEXT NOT NULL,
                scope TEXT NOT NULL,
                approved_at TEXT NOT NULL,
                expires_at TEXT NOT NULL,
                position BIGINT NOT NULL
            )"
            .into(),
            "CREATE INDEX IF NOT EXISTS rm_doctor_grants_doctor \
             ON rm_doctor_grants (doctor_id, position)"
                .into(),
        ]
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
        vec![
            "CREATE TABLE IF NOT EXISTS rm_access_log (
                position BIGINT PRIMARY KEY,
                event_id TEXT NOT NULL,
                patient_id TEXT NOT NULL,
                record_id TEXT NOT NULL,
                accessor TEXT NOT NULL,
                request_id TEXT,
                category TEXT NOT NULL,
                accessed_at TEXT NOT NULL
            )"
            .into(),
            "CREATE INDEX IF NOT EXISTS rm_access_log_patient ON rm_access_log (patient_id, position)"
                .into(),
        ]
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
        vec!["CREATE TABLE IF NOT EXISTS rm_log_anchors (
                from_ordinal BIGINT PRIMARY KEY,
                to_ordinal BIGINT NOT NULL,
                root TEXT NOT NULL,
                chain_id BIGINT NOT NULL,
                contract TEXT NOT NULL,
                tx_hash TEXT NOT NULL,
                block BIGINT NOT NULL,
                anchored_at TEXT NOT NULL,
                position BIGINT NOT NULL
            )"
        .into()]
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
        vec![
            "CREATE TABLE IF NOT EXISTS rm_payments (
                payment_id TEXT PRIMARY KEY,
                payer TEXT NOT NULL,
                patient_id TEXT,
                doctor_id TEXT,
                access_request_id TEXT,
                purpose TEXT NOT NULL,
                amount_kes BIGINT NOT NULL,
                status TEXT NOT NULL,
                checkout_request_id TEXT,
                merchant_request_id TEXT,
                mpesa_receipt TEXT,
                result_code BIGINT,
                result_desc TEXT,
                requested_at TEXT NOT NULL,
                pushed_at TEXT,
                settled_at TEXT,
                position BIGINT NOT NULL
            )"
            .into(),
            "CREATE INDEX IF NOT EXISTS rm_payments_checkout ON rm_payments (checkout_request_id)"
                .into(),
            "CREATE INDEX IF NOT EXISTS rm_payments_patient ON rm_payments (patient_id, position)"
                .into(),
            "CREATE INDEX IF NOT EXISTS rm_payments_doctor ON rm_payments (doctor_id, position)"
                .into(),
            "CREATE TABLE IF NOT EXISTS rm_mpesa_rejected_callbacks (
                position BIGINT PRIMARY KEY,
                checkout_request_id TEXT NOT NULL,
                reason TEXT NOT NULL,
                result_code BIGINT NOT NULL,
                mpesa_receipt TEXT,
                amount_kes BIGINT,
                payment_id TEXT,
                recorded_at TEXT NOT NULL
            )"
            .into(),
        ]
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

/// The whole event history for auditors, one row per event in log order (`ordinal`,
/// 1-based, the order the log is consumed in, so a cursor never skips an event that
/// committed late), with its metadata lifted into columns to filter on. Payloads are
/// kept as stored: personal fields stay sealed.
///
/// Each row also carries `hash`, SHA-256 over the previous row's hash and the event as
/// stored ([`crate::audit::chain_hash`]): a hash chain that
/// [`crate::audit::verify`] recomputes from the event log, so an event modified or
/// deleted after it was recorded here is detected.
#[derive(Default)]
pub struct AuditTrail;

#[async_trait]
impl LogHandler for AuditTrail {
    fn name(&self) -> &str {
        "audit_trail"
    }

    fn schema(&self, _: Backend) -> Vec<String> {
        vec![
            "CREATE TABLE IF NOT EXISTS rm_audit_trail (
                ordinal BIGINT PRIMARY KEY,
                position BIGINT NOT NULL UNIQUE,
                event_id TEXT NOT NULL,
                recorded_at TEXT NOT NULL,
                aggregate_type TEXT NOT NULL,
                aggregate_id TEXT NOT NULL,
                sequence BIGINT NOT NULL,
                event_type TEXT NOT NULL,
                event_version TEXT NOT NULL,
                actor TEXT NOT NULL,
                correlation_id TEXT,
                causation_id TEXT,
                payload TEXT NOT NULL,
                hash TEXT NOT NULL
            )"
            .into(),
            "CREATE INDEX IF NOT EXISTS rm_audit_trail_aggregate ON rm_audit_trail \
             (aggregate_type, aggregate_id, ordinal)"
                .into(),
            "CREATE INDEX IF NOT EXISTS rm_audit_trail_type ON rm_audit_trail (event_type, ordinal)"
                .into(),
            "CREATE INDEX IF NOT EXISTS rm_audit_trail_actor ON rm_audit_trail (actor, ordinal)"
                .into(),
            "CREATE INDEX IF NOT EXISTS rm_audit_trail_time ON rm_audit_trail (recorded_at)"
                .into(),
        ]
    }

    fn tables(&self) -> Vec<String> {
        vec!["rm_audit_trail".into()]
    }

    async fn apply(&self, tx: &mut ReadModelTx, event: &StoredEvent) -> anyhow::Result<()> {
        let columns = crate::audit::TrailColumns::of(event);
        let last: Option<(i64, String)> = sqlx::query_as(
            "SELECT ordinal, hash FROM rm_audit_trail ORDER BY ordinal DESC LIMIT 1",
        )
        .fetch_optional(&mut **tx)
        .await?;
        let (ordinal, prev) = match last {
            Some((ordinal, hash)) => (ordinal + 1, crate::audit::parse_hash(&hash)?),
            None => (1, crate::audit::GENESIS),
        };
        let hash = crate::audit::chain_hash(&prev, event);
        exec(
            tx,
            "INSERT INTO rm_audit_trail (ordinal, position, event_id, recorded_at, \
             aggregate_type, aggregate_id, sequence, event_type, event_version, actor, \
             correlation_id, causation_id, payload, hash) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
            vec![
                Int(ordinal),
                Int(event.position),
                Text(event.event_id.to_string()),
                Text(columns.recorded_at),
                Text(columns.aggregate_type),
                Text(columns.aggregate_id),
                Int(columns.sequence),
                Text(columns.event_type),
                Text(columns.event_version),
                Text(columns.actor),
                OptText(columns.correlation_id),
                OptText(columns.causation_id),
                Text(columns.payload),
                Text(crate::audit::hex(&hash)),
            ],
        )
        .await
    }
}

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
        vec![
            "CREATE TABLE IF NOT EXISTS rm_webhooks (
                webhook_id TEXT PRIMARY KEY,
                integrator_id TEXT NOT NULL,
                url_sealed TEXT NOT NULL,
                types TEXT NOT NULL,
                secret_sealed TEXT NOT NULL,
                registered_at TEXT NOT NULL,
                tx BIGINT NOT NULL,
                position BIGINT NOT NULL,
                disabled_at TEXT
            )"
            .into(),
            "CREATE INDEX IF NOT EXISTS rm_webhooks_integrator ON rm_webhooks (integrator_id, position)"
                .into(),
        ]
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
        vec![
            "CREATE TABLE IF NOT EXISTS rm_doctor_profiles (
                doctor_id TEXT PRIMARY KEY,
                personal_sealed TEXT NOT NULL,
                licence TEXT NOT NULL,
                status TEXT NOT NULL,
                registered_at TEXT NOT NULL,
                position BIGINT NOT NULL
            )"
            .into(),
            "CREATE INDEX IF NOT EXISTS rm_doctor_profiles_status ON rm_doctor_profiles (status, position)"
                .into(),
        ]
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
