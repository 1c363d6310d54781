//! Command services: the only way the system changes. Each method parses nothing (the
//! API has done that into domain types), seals personal fields under the subject's key,
//! and executes one domain command through the event store.
//!
//! One module per aggregate family, each an `impl Commands` block over the shared core
//! here (the service itself, its stores, sealing, and the helpers every family uses):
//! `accounts` (registrations and the accounts they open), `sessions` (sign-in,
//! sign-out, bearer tokens), `integrators` (integrators, their keys and webhooks),
//! `doctors`, `patients` (wallets, share codes), `records`, `access` (access
//! requests and consent), `payments` and `anchors`.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_es::{Aggregate, EventStore};
use domain::access::{AccessRequest, AccessServices};
use domain::account::Account;
use domain::clock::Clock;
use domain::doctor::Doctor;
use domain::error::{Rule, RuleKind, ServiceError};
use domain::ids::{AccessRequestId, DoctorId, PatientId};
use domain::patient::Patient;
use domain::record::{MedicalRecord, RecordServices};
use domain::session::Session;
use domain::staff::Staff;
use domain::value::Sealed;
use eventstore::{AggregateStore, CommandOutcome, ExecuteError, Store};
use serde::{Deserialize, Serialize};

use crate::blobs::BlobStore;
use crate::keys::KeyStore;

mod access;
mod accounts;
mod anchors;
mod doctors;
mod integrators;
mod patients;
mod payments;
mod records;
mod sessions;

pub use access::{ApproveAccess, Decided, RequestAccess};
pub use accounts::{RegisterDoctor, RegisterPatient, RegisterStaff};
pub use integrators::RegisterWebhook;
pub use patients::SHARE_CODE_DAYS;
pub use payments::{PaymentPlan, RequestPayment};
pub use records::{UploadRecord, Uploaded};
pub use sessions::{Authenticated, SignedIn};

/// Why a command service call failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// A business rule refused it; the message is safe to show.
    #[error("{message}")]
    Rejected {
        kind: RuleKind,
        /// The rule's stable machine-readable code.
        code: &'static str,
        message: String,
    },
    /// The aggregate kept changing under us; the client may retry.
    #[error("conflicting concurrent change; try again")]
    Conflict,
    /// The idempotency key was already used for a different request.
    #[error("this Idempotency-Key was already used for a different request")]
    KeyReused,
    /// Sign-in refused: unknown phone or wrong password (deliberately not said which).
    #[error("wrong phone number or password")]
    BadCredentials,
    /// A copy of a record's blob did not match its hash; it was refused, not served,
    /// and `RecordIntegrityFailed` was recorded.
    #[error("the stored copy of this record failed its integrity check")]
    IntegrityFailed,
    /// The record's blob cannot be fetched now (no local copy and the remote store is
    /// unreachable, or no copy anywhere).
    #[error("the content of this record is not available right now")]
    ContentUnavailable,
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl CommandError {
    /// The refusal of a business rule.
    pub fn rule<E: Rule>(error: E) -> CommandError {
        CommandError::Rejected {
            kind: error.kind(),
            code: error.code(),
            message: error.to_string(),
        }
    }
}

fn map<E: Rule>(error: ExecuteError<E>) -> CommandError {
    match error {
        ExecuteError::Rejected(e) => CommandError::rule(e),
        ExecuteError::Conflict => CommandError::Conflict,
        ExecuteError::KeyReused => CommandError::KeyReused,
        ExecuteError::Store(e) => CommandError::Unexpected(e),
    }
}

/// Why a bearer token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the token is not an AfyaChain session token")]
    Malformed,
    /// Well-formed but not made by this deployment (forged, or another deployment's).
    #[error("the token was not issued here")]
    Forged,
    #[error("the session has expired; sign in again")]
    Expired,
    #[error("the session has ended; sign in again")]
    Ended,
    #[error("the API key was withdrawn")]
    Withdrawn,
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// Personal fields of a patient, sealed together.
#[derive(Debug, Serialize, Deserialize)]
pub struct PatientPersonal {
    pub name: String,
    pub phone: String,
    pub birth_date: String,
}

/// Personal fields of a doctor or a staff member, sealed together.
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
    patients: AggregateStore<Patient>,
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

    async fn patient_is_registered(&self, patient: PatientId) -> Result<bool, ServiceError> {
        let context = self
            .patients
            .load_aggregate(&patient.to_string())
            .await
            .map_err(|e| ServiceError::new(format!("loading patient: {e}")))?;
        Ok(context.aggregate.id().is_some())
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
    staff: AggregateStore<Staff>,
    accounts: AggregateStore<Account>,
    sessions: AggregateStore<Session>,
    integrators: AggregateStore<domain::integrator::Integrator>,
    records: AggregateStore<MedicalRecord>,
    access: AggregateStore<AccessRequest>,
    anchors: AggregateStore<domain::anchor::LogAnchor>,
    payments: AggregateStore<domain::payment::Payment>,
    rejected_callbacks: AggregateStore<domain::payment::RejectedCallback>,
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
            patients: store.aggregate_store(domain::upcast::upcasters()),
            doctors: store.aggregate_store(domain::upcast::upcasters()),
            access: store.aggregate_store(domain::upcast::upcasters()),
            clock: clock.clone(),
        });
        Commands {
            patients: store.aggregate_store(domain::upcast::upcasters()),
            doctors: store.aggregate_store(domain::upcast::upcasters()),
            staff: store.aggregate_store(domain::upcast::upcasters()),
            accounts: store.aggregate_store(domain::upcast::upcasters()),
            // A sign-out in another instance must hold here at once: never cached.
            sessions: store
                .aggregate_store(domain::upcast::upcasters())
                .with_cache_limit(0),
            integrators: store.aggregate_store(domain::upcast::upcasters()),
            records: store.aggregate_store(domain::upcast::upcasters()),
            access: store.aggregate_store(domain::upcast::upcasters()),
            anchors: store.aggregate_store(domain::upcast::upcasters()),
            payments: store.aggregate_store(domain::upcast::upcasters()),
            rejected_callbacks: store.aggregate_store(domain::upcast::upcasters()),
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

    async fn seal_optional(
        &self,
        subject: &str,
        text: Option<&str>,
    ) -> anyhow::Result<Option<Sealed>> {
        match text {
            Some(t) => Ok(Some(self.seal_text(subject, t).await?)),
            None => Ok(None),
        }
    }

    /// The events a command appended (for a repeat: those of the first command), so an
    /// answer is built the same way whether the command ran now or earlier.
    async fn appended<A: Aggregate>(
        &self,
        events: &AggregateStore<A>,
        outcome: &CommandOutcome,
    ) -> Result<Vec<A::Event>, CommandError> {
        let Some((first, last)) = outcome.sequences else {
            return Ok(Vec::new());
        };
        let all = events
            .load_events(&outcome.aggregate_id)
            .await
            .map_err(|e| anyhow::anyhow!("loading appended events: {e}"))?;
        Ok(all
            .into_iter()
            .filter(|e| (first..=last).contains(&(e.sequence as i64)))
            .map(|e| e.payload)
            .collect())
    }

    /// Opens a field sealed under a subject's key (a filename, a purpose) for someone
    /// entitled to see it; `None` once the subject's key has been shredded.
    pub async fn open_text(&self, subject: &str, sealed: &str) -> Option<String> {
        let bytes = self.keys.open(subject, sealed).await.ok()?;
        String::from_utf8(bytes).ok()
    }
}

/// The id a command acted on: on an idempotent replay (or when no fresh id is given),
/// the stored aggregate id.
fn id_of<Id: std::str::FromStr + Copy>(
    outcome: &CommandOutcome,
    fresh: Option<Id>,
) -> anyhow::Result<Id> {
    match fresh {
        Some(id) if !outcome.replayed => Ok(id),
        _ => outcome
            .aggregate_id
            .parse()
            .map_err(|_| anyhow::anyhow!("stored aggregate id is not an id")),
    }
}
