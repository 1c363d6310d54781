//! Command services: the only way the system changes. Each method parses nothing (the
//! API has done that into domain types), seals personal fields under the subject's key,
//! and executes one domain command through the event store.

use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_es::{Aggregate, EventStore};
use domain::access::{AccessCommand, AccessRequest, AccessServices};
use domain::actor::Actor;
use domain::clock::Clock;
use domain::doctor::{Doctor, DoctorCommand};
use domain::error::ServiceError;
use domain::ids::{AccessRequestId, DoctorId, PatientId, RecordId, StaffId};
use domain::patient::{Patient, PatientCommand};
use domain::record::{MedicalRecord, RecordCommand, RecordServices};
use domain::value::{
    BirthDate, ByteSize, Category, DurationDays, LicenceNumber, MediaType, Msisdn, PersonName,
    Purpose, Scope, Sealed, Sha256Hex, WrappedKey,
};
use eventstore::{AggregateStore, CommandMeta, CommandOutcome, ExecuteError, Store};
use serde::{Deserialize, Serialize};

use crate::blobs::BlobStore;
use crate::keys::KeyStore;

/// Why a command service call failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// A business rule refused it; the message is safe to show.
    #[error("{0}")]
    Rejected(String),
    /// The aggregate kept changing under us; the client may retry.
    #[error("conflicting concurrent change; try again")]
    Conflict,
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

fn map<E: std::error::Error>(error: ExecuteError<E>) -> CommandError {
    match error {
        ExecuteError::Rejected(e) => CommandError::Rejected(e.to_string()),
        ExecuteError::Conflict => CommandError::Conflict,
        ExecuteError::Store(e) => CommandError::Unexpected(e),
    }
}

/// Personal fields of a patient, sealed together.
#[derive(Debug, Serialize, Deserialize)]
pub struct PatientPersonal {
    pub name: String,
    pub phone: String,
    pub birth_date: String,
}

/// Personal fields of a doctor, sealed together.
#[derive(Debug, Serialize, Deserialize)]
pub struct DoctorPersonal {
    pub name: String,
    pub phone: String,
}

/// The result of a command: the id it acted on and where its events are.
#[derive(Clone, Debug)]
pub struct Done<Id> {
    pub id: Id,
    pub outcome: CommandOutcome,
}

/// The ports the aggregates ask during command handling: the event store itself
/// (strongly consistent, never a read model) and the clock.
pub struct DomainPorts {
    doctors: AggregateStore<Doctor>,
    access: AggregateStore<AccessRequest>,
    clock: Arc<dyn Clock>,
}

#[async_trait]
impl AccessServices for DomainPorts {
    async fn doctor_is_verified(&self, doctor: DoctorId) -> Result<bool, ServiceError> {
        let context = self
            .doctors
            .load_aggregate(&doctor.to_string())
            .await
            .map_err(|e| ServiceError::new(format!("loading doctor: {e}")))?;
        Ok(context.aggregate.is_verified())
    }

    fn clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }
}

#[async_trait]
impl RecordServices for DomainPorts {
    async fn access_request(
        &self,
        request: AccessRequestId,
    ) -> Result<Option<AccessRequest>, ServiceError> {
        let events = self
            .access
            .load_events(&request.to_string())
            .await
            .map_err(|e| ServiceError::new(format!("loading access request: {e}")))?;
        if events.is_empty() {
            return Ok(None);
        }
        let mut state = AccessRequest::default();
        for envelope in events {
            state.apply(envelope.payload);
        }
        Ok(Some(state))
    }

    fn clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }
}

/// Every command of the system.
pub struct Commands {
    store: Store,
    keys: Arc<KeyStore>,
    blobs: Arc<dyn BlobStore>,
    clock: Arc<dyn Clock>,
    patients: AggregateStore<Patient>,
    doctors: AggregateStore<Doctor>,
    records: AggregateStore<MedicalRecord>,
    access: AggregateStore<AccessRequest>,
    access_services: <AccessRequest as Aggregate>::Services,
    record_services: <MedicalRecord as Aggregate>::Services,
}

impl Commands {
    pub fn new(
        store: Store,
        keys: Arc<KeyStore>,
        blobs: Arc<dyn BlobStore>,
        clock: Arc<dyn Clock>,
    ) -> Commands {
        // One set of ports serves both aggregates that ask for them.
        let ports = Arc::new(DomainPorts {
            doctors: store.aggregate_store(domain::upcast::upcasters()),
            access: store.aggregate_store(domain::upcast::upcasters()),
            clock: clock.clone(),
        });
        Commands {
            patients: store.aggregate_store(domain::upcast::upcasters()),
            doctors: store.aggregate_store(domain::upcast::upcasters()),
            records: store.aggregate_store(domain::upcast::upcasters()),
            access: store.aggregate_store(domain::upcast::upcasters()),
            access_services: ports.clone(),
            record_services: ports,
            store,
            keys,
            blobs,
            clock,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn keys(&self) -> &KeyStore {
        &self.keys
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    async fn seal_json<T: Serialize>(&self, subject: &str, value: &T) -> anyhow::Result<Sealed> {
        let bytes = serde_json::to_vec(value)?;
        Ok(Sealed::from_ciphertext(
            self.keys.seal(subject, &bytes).await?,
        ))
    }

    async fn seal_text(&self, subject: &str, text: &str) -> anyhow::Result<Sealed> {
        Ok(Sealed::from_ciphertext(
            self.keys.seal(subject, text.as_bytes()).await?,
        ))
    }

    /// Registers a patient; their personal fields are sealed under their new key.
    pub async fn register_patient(
        &self,
        name: &PersonName,
        phone: &Msisdn,
        birth_date: &BirthDate,
        meta: CommandMeta,
    ) -> Result<Done<PatientId>, CommandError> {
        let patient_id = PatientId::new();
        let subject = patient_id.to_string();
        let personal = PatientPersonal {
            name: name.as_str().to_owned(),
            phone: phone.as_str().to_owned(),
            birth_date: birth_date.to_string(),
        };
        let command = PatientCommand::Register {
            patient_id,
            personal: self.seal_json(&subject, &personal).await?,
            phone_index: self.keys.phone_index(phone.as_str()),
        };
        let outcome = self
            .store
            .execute::<Patient>(&self.patients, &subject, command, &(), &meta)
            .await
            .map_err(map)?;
        Ok(Done {
            id: id_of(&outcome, patient_id)?,
            outcome,
        })
    }

    /// Registers a doctor, unverified until a registrar verifies them.
    pub async fn register_doctor(
        &self,
        name: &PersonName,
        phone: &Msisdn,
        licence: LicenceNumber,
        meta: CommandMeta,
    ) -> Result<Done<DoctorId>, CommandError> {
        let doctor_id = DoctorId::new();
        let subject = doctor_id.to_string();
        let personal = DoctorPersonal {
            name: name.as_str().to_owned(),
            phone: phone.as_str().to_owned(),
        };
        let command = DoctorCommand::Register {
            doctor_id,
            personal: self.seal_json(&subject, &personal).await?,
            phone_index: self.keys.phone_index(phone.as_str()),
            licence,
        };
        let outcome = self
            .store
            .execute::<Doctor>(&self.doctors, &subject, command, &(), &meta)
            .await
            .map_err(map)?;
        Ok(Done {
            id: id_of(&outcome, doctor_id)?,
            outcome,
        })
    }

    pub async fn verify_doctor(
        &self,
        doctor_id: DoctorId,
        by: StaffId,
        meta: CommandMeta,
    ) -> Result<CommandOutcome, CommandError> {
        self.store
            .execute::<Doctor>(
                &self.doctors,
                &doctor_id.to_string(),
                DoctorCommand::Verify { by },
                &(),
                &meta,
            )
            .await
            .map_err(map)
    }

    pub async fn suspend_doctor(
        &self,
        doctor_id: DoctorId,
        by: StaffId,
        reason: Option<&str>,
        meta: CommandMeta,
    ) -> Result<CommandOutcome, CommandError> {
        let reason = match reason {
            Some(r) => Some(self.seal_text(&doctor_id.to_string(), r).await?),
            None => None,
        };
        self.store
            .execute::<Doctor>(
                &self.doctors,
                &doctor_id.to_string(),
                DoctorCommand::Suspend { by, reason },
                &(),
                &meta,
            )
            .await
            .map_err(map)
    }

    /// Encrypts `body` under a fresh data key, stores the ciphertext, and records the
    /// upload. The filename is sealed under the patient's key.
    #[allow(clippy::too_many_arguments)]
    pub async fn upload_record(
        &self,
        by: Actor,
        patient_id: PatientId,
        category: Category,
        media_type: MediaType,
        filename: Option<&str>,
        body: &[u8],
        meta: CommandMeta,
    ) -> Result<Done<RecordId>, CommandError> {
        let record_id = RecordId::new();
        let patient = patient_id.to_string();
        let blob = self
            .keys
            .encrypt_record(&patient, &record_id.to_string(), body)
            .await?;
        self.blobs
            .put(&blob.sha256, &blob.ciphertext)
            .await
            .context("storing the encrypted record")?;
        let filename = match filename {
            Some(f) => Some(self.seal_text(&patient, f).await?),
            None => None,
        };
        let size =
            ByteSize::new(body.len() as u64).map_err(|e| CommandError::Rejected(e.to_string()))?;
        let command = RecordCommand::Upload {
            record_id,
            patient_id,
            by,
            category,
            media_type,
            size,
            sha256: Sha256Hex::parse(&blob.sha256)
                .map_err(|e| CommandError::Unexpected(anyhow::anyhow!("{e}")))?,
            wrapped_key: WrappedKey::from_ciphertext(blob.wrapped_key),
            filename,
        };
        let outcome = self
            .store
            .execute::<MedicalRecord>(
                &self.records,
                &record_id.to_string(),
                command,
                &self.record_services,
                &meta,
            )
            .await
            .map_err(map)?;
        Ok(Done {
            id: id_of(&outcome, record_id)?,
            outcome,
        })
    }

    /// Checks the reader's right and records the read (`RecordAccessed`) before any
    /// byte is returned. No event, no bytes.
    pub async fn read_record(
        &self,
        record_id: RecordId,
        by: Actor,
        request_id: Option<AccessRequestId>,
        meta: CommandMeta,
    ) -> Result<(CommandOutcome, MedicalRecord), CommandError> {
        let outcome = self
            .store
            .execute::<MedicalRecord>(
                &self.records,
                &record_id.to_string(),
                RecordCommand::Read { by, request_id },
                &self.record_services,
                &meta,
            )
            .await
            .map_err(map)?;
        let record = self
            .records
            .load_aggregate(&record_id.to_string())
            .await
            .map_err(|e| CommandError::Unexpected(anyhow::anyhow!("loading record: {e}")))?
            .aggregate;
        Ok((outcome, record))
    }

    /// A doctor asks a patient for access.
    #[allow(clippy::too_many_arguments)]
    pub async fn request_access(
        &self,
        doctor_id: DoctorId,
        patient_id: PatientId,
        scope: Scope,
        purpose: &Purpose,
        duration: DurationDays,
        note: Option<&str>,
        meta: CommandMeta,
    ) -> Result<Done<AccessRequestId>, CommandError> {
        let request_id = AccessRequestId::new();
        let patient = patient_id.to_string();
        let note = match note {
            Some(n) => Some(self.seal_text(&patient, n).await?),
            None => None,
        };
        let command = AccessCommand::Request {
            request_id,
            doctor_id,
            patient_id,
            scope,
            purpose: self.seal_text(&patient, purpose.as_str()).await?,
            duration,
            note,
        };
        let outcome = self.access_command(request_id, command, meta).await?;
        Ok(Done {
            id: id_of(&outcome, request_id)?,
            outcome,
        })
    }

    pub async fn approve_access(
        &self,
        request_id: AccessRequestId,
        by: Actor,
        expires_at: Option<DateTime<Utc>>,
        scope: Option<Scope>,
        meta: CommandMeta,
    ) -> Result<CommandOutcome, CommandError> {
        self.access_command(
            request_id,
            AccessCommand::Approve {
                by,
                expires_at,
                scope,
            },
            meta,
        )
        .await
    }

    pub async fn reject_access(
        &self,
        request_id: AccessRequestId,
        patient_id: PatientId,
        by: Actor,
        reason: Option<&str>,
        meta: CommandMeta,
    ) -> Result<CommandOutcome, CommandError> {
        let reason = match reason {
            Some(r) => Some(self.seal_text(&patient_id.to_string(), r).await?),
            None => None,
        };
        self.access_command(request_id, AccessCommand::Reject { by, reason }, meta)
            .await
    }

    pub async fn revoke_access(
        &self,
        request_id: AccessRequestId,
        by: Actor,
        meta: CommandMeta,
    ) -> Result<CommandOutcome, CommandError> {
        self.access_command(request_id, AccessCommand::Revoke { by }, meta)
            .await
    }

    /// Marks an approved request expired once its expiry has passed (system).
    pub async fn expire_access(
        &self,
        request_id: AccessRequestId,
        meta: CommandMeta,
    ) -> Result<CommandOutcome, CommandError> {
        self.access_command(request_id, AccessCommand::Expire {}, meta)
            .await
    }

    async fn access_command(
        &self,
        request_id: AccessRequestId,
        command: <AccessRequest as Aggregate>::Command,
        meta: CommandMeta,
    ) -> Result<CommandOutcome, CommandError> {
        self.store
            .execute::<AccessRequest>(
                &self.access,
                &request_id.to_string(),
                command,
                &self.access_services,
                &meta,
            )
            .await
            .map_err(map)
    }
}

/// The id a command acted on; on an idempotent replay, the first command's id.
fn id_of<Id: std::str::FromStr + Copy>(outcome: &CommandOutcome, fresh: Id) -> anyhow::Result<Id> {
    if outcome.replayed {
        outcome
            .aggregate_id
            .parse()
            .map_err(|_| anyhow::anyhow!("stored aggregate id is not an id"))
    } else {
        Ok(fresh)
    }
}
