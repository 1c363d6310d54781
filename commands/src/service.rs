//! Command services: the only way the system changes. Each method parses nothing (the
//! API has done that into domain types), seals personal fields under the subject's key,
//! and executes one domain command through the event store.

use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use chrono::{DateTime, Utc};
use cqrs_es::{Aggregate, EventStore};
use domain::access::{AccessCommand, AccessError, AccessRequest, AccessServices};
use domain::account::{Account, AccountCommand, AccountError};
use domain::actor::Actor;
use domain::clock::Clock;
use domain::doctor::{Doctor, DoctorCommand};
use domain::error::{Rule, RuleKind, ServiceError};
use domain::ids::{
    AccessRequestId, DoctorId, IntegratorId, PatientId, PaymentId, RecordId, StaffId, WebhookId,
};
use domain::patient::{Patient, PatientCommand, PatientError};
use domain::record::{MedicalRecord, RecordCommand, RecordServices};
use domain::session::{Session, SessionCommand, SessionError};
use domain::staff::{Staff, StaffCommand};
use domain::value::{
    BirthDate, ByteSize, Category, DurationDays, Filename, LicenceNumber, MediaType, Msisdn, Note,
    Password, PersonName, Purpose, Scope, Sealed, Sha256Hex, StaffRole, WrappedKey,
};
use eventstore::{AggregateStore, CommandMeta, CommandOutcome, ExecuteError, Store};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::blobs::{BlobStore, IntegrityFailure};
use crate::credentials::{hash_password, verify_nothing, verify_password};
use crate::keys::KeyStore;

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

/// A started session and the bearer token that stands for it.
#[derive(Clone)]
pub struct SignedIn {
    pub session_id: Uuid,
    /// Secret: never logged.
    pub token: String,
    pub holder: Actor,
    pub expires_at: DateTime<Utc>,
}

impl std::fmt::Debug for SignedIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedIn")
            .field("session_id", &self.session_id)
            .field("holder", &self.holder)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Who a valid bearer token speaks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Authenticated {
    pub session_id: Uuid,
    pub actor: Actor,
    pub expires_at: DateTime<Utc>,
}

/// A stored upload: what the API answers with, also on an idempotent repeat.
#[derive(Clone, Debug)]
pub struct Uploaded {
    pub record_id: RecordId,
    /// SHA-256 of the encrypted blob (its content address).
    pub sha256: String,
    /// Size of the original bytes.
    pub size: u64,
    pub outcome: CommandOutcome,
}

/// Session tokens: `afy1.<session id>.<tag>`, the tag an HMAC of the session id under a
/// key derived from the master key. A token is checked without the database first (a
/// forged or foreign token is refused at once), then against its session.
const TOKEN_PREFIX: &str = "afy1.";
const TOKEN_TAG: &str = "session token";
/// Crockford's base32 alphabet (no I, L, O, U), for share codes.
const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const SHARE_CODE_TAG: &str = "share code";
/// How long a share code is valid.
pub const SHARE_CODE_DAYS: i64 = 30;
/// Integrators' API keys: `afyk1.<integrator id>.<tag>`.
const KEY_PREFIX: &str = "afyk1.";
const KEY_TAG: &str = "integrator key";

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

    /// Refuses a registration whose phone already has an account, before anything is
    /// written. (The account itself is the guard: see [`Commands::open_account`].)
    async fn ensure_phone_free(&self, phone_index: &str) -> Result<(), CommandError> {
        let account = self
            .accounts
            .load(phone_index)
            .await
            .context("loading an account")?
            .aggregate;
        match account.holder() {
            Some(_) => Err(CommandError::rule(AccountError::PhoneTaken)),
            None => Ok(()),
        }
    }

    /// Opens the account that lets `holder` sign in with this phone and password. Under
    /// an idempotency key it runs at most once per request, and a retry after a crash
    /// between registration and account completes the account. A registration that
    /// loses a race for the phone to another one is erased (its key is shredded).
    async fn open_account(
        &self,
        phone_index: String,
        holder: Actor,
        password: &Password,
        meta: &CommandMeta,
    ) -> Result<CommandOutcome, CommandError> {
        // Clients' keys have no spaces, so a derived key never collides with one.
        let mut meta = meta.derived(" account");
        meta.actor = holder.reference();
        if let Some(outcome) = self
            .store
            .earlier_outcome::<AccountError>(&meta)
            .await
            .map_err(map)?
        {
            // The account this key opened answers only to its own password.
            return match self.holder_if_password(&phone_index, password).await? {
                Some(h) if h == holder => Ok(outcome),
                _ => Err(CommandError::KeyReused),
            };
        }
        let subject = holder.id_string();
        let phc = hash_password(password).await?;
        let command = AccountCommand::Open {
            phone_index: phone_index.clone(),
            holder,
            credential: self.seal_text(&subject, &phc).await?,
        };
        match self
            .store
            .execute::<Account>(&self.accounts, &phone_index, command, &(), &meta)
            .await
        {
            Ok(outcome) => Ok(outcome),
            Err(ExecuteError::Rejected(AccountError::PhoneTaken)) => {
                self.keys.shred(&subject).await?;
                tracing::warn!(subject = %holder.reference(), "registration lost a race for its phone; its personal data was erased");
                Err(CommandError::rule(AccountError::PhoneTaken))
            }
            Err(other) => Err(map(other)),
        }
    }

    /// The start of every registration: the id an earlier registration under `meta`'s
    /// key created (a retry), or `None` once the phone is known to be free.
    async fn begin_registration<Id: std::str::FromStr + Copy, E: Rule>(
        &self,
        phone_index: &str,
        meta: &CommandMeta,
    ) -> Result<Option<Id>, CommandError> {
        match self.store.earlier_outcome::<E>(meta).await.map_err(map)? {
            Some(outcome) => Ok(Some(id_of(&outcome, None)?)),
            None => {
                self.ensure_phone_free(phone_index).await?;
                Ok(None)
            }
        }
    }

    /// Appends a registration as its new subject `id` (the actor of its own sign-up).
    /// Answers with the subject's id: `id`, or, when a concurrent twin under the same
    /// key won, the twin's.
    async fn register<A, Id>(
        &self,
        events: &AggregateStore<A>,
        id: Id,
        holder: Actor,
        command: A::Command,
        meta: &CommandMeta,
    ) -> Result<Id, CommandError>
    where
        A: Aggregate<Services = ()> + Clone,
        A::Command: Clone,
        A::Error: Rule,
        Id: std::str::FromStr + Copy,
    {
        let mut meta = meta.clone();
        meta.actor = holder.reference();
        let outcome = self
            .store
            .execute::<A>(events, &holder.id_string(), command, &(), &meta)
            .await
            .map_err(map)?;
        Ok(id_of(&outcome, Some(id))?)
    }

    /// The end of every registration: the account that lets the subject sign in.
    async fn finish_registration<Id>(
        &self,
        id: Id,
        holder: Actor,
        phone_index: String,
        password: &Password,
        meta: &CommandMeta,
    ) -> Result<Done<Id>, CommandError> {
        let outcome = self
            .open_account(phone_index, holder, password, meta)
            .await?;
        Ok(Done { id, outcome })
    }

    /// Registers a patient and opens their account; personal fields are sealed under
    /// their new key. A phone that already has an account is refused (409).
    pub async fn register_patient(
        &self,
        name: &PersonName,
        phone: &Msisdn,
        birth_date: &BirthDate,
        password: &Password,
        meta: CommandMeta,
    ) -> Result<Done<PatientId>, CommandError> {
        let phone_index = self.keys.phone_index(phone.as_str());
        let patient_id = match self
            .begin_registration::<PatientId, domain::patient::PatientError>(&phone_index, &meta)
            .await?
        {
            Some(id) => id,
            None => {
                let patient_id = PatientId::new();
                let personal = PatientPersonal {
                    name: name.as_str().to_owned(),
                    phone: phone.as_str().to_owned(),
                    birth_date: birth_date.to_string(),
                };
                let command = PatientCommand::Register {
                    patient_id,
                    personal: self.seal_json(&patient_id.to_string(), &personal).await?,
                    phone_index: phone_index.clone(),
                };
                self.register(
                    &self.patients,
                    patient_id,
                    Actor::Patient(patient_id),
                    command,
                    &meta,
                )
                .await?
            }
        };
        self.finish_registration(
            patient_id,
            Actor::Patient(patient_id),
            phone_index,
            password,
            &meta,
        )
        .await
    }

    /// Registers a doctor, unverified until a registrar verifies them, and opens their
    /// account.
    pub async fn register_doctor(
        &self,
        name: &PersonName,
        phone: &Msisdn,
        licence: LicenceNumber,
        password: &Password,
        meta: CommandMeta,
    ) -> Result<Done<DoctorId>, CommandError> {
        let phone_index = self.keys.phone_index(phone.as_str());
        let doctor_id = match self
            .begin_registration::<DoctorId, domain::doctor::DoctorError>(&phone_index, &meta)
            .await?
        {
            Some(id) => id,
            None => {
                let doctor_id = DoctorId::new();
                let personal = DoctorPersonal {
                    name: name.as_str().to_owned(),
                    phone: phone.as_str().to_owned(),
                };
                let command = DoctorCommand::Register {
                    doctor_id,
                    personal: self.seal_json(&doctor_id.to_string(), &personal).await?,
                    phone_index: phone_index.clone(),
                    licence,
                };
                self.register(
                    &self.doctors,
                    doctor_id,
                    Actor::Doctor(doctor_id),
                    command,
                    &meta,
                )
                .await?
            }
        };
        self.finish_registration(
            doctor_id,
            Actor::Doctor(doctor_id),
            phone_index,
            password,
            &meta,
        )
        .await
    }

    /// Registers a registrar or an auditor (operators only, from the command line) and
    /// opens their account.
    pub async fn register_staff(
        &self,
        role: StaffRole,
        name: &PersonName,
        phone: &Msisdn,
        password: &Password,
        meta: CommandMeta,
    ) -> Result<Done<StaffId>, CommandError> {
        let phone_index = self.keys.phone_index(phone.as_str());
        let staff_id = match self
            .begin_registration::<StaffId, domain::staff::StaffError>(&phone_index, &meta)
            .await?
        {
            Some(id) => id,
            None => {
                let staff_id = StaffId::new();
                let personal = DoctorPersonal {
                    name: name.as_str().to_owned(),
                    phone: phone.as_str().to_owned(),
                };
                let command = StaffCommand::Register {
                    staff_id,
                    role,
                    personal: self.seal_json(&staff_id.to_string(), &personal).await?,
                    phone_index: phone_index.clone(),
                };
                let holder = staff_actor(role, staff_id);
                self.register(&self.staff, staff_id, holder, command, &meta)
                    .await?
            }
        };
        self.finish_registration(
            staff_id,
            staff_actor(role, staff_id),
            phone_index,
            password,
            &meta,
        )
        .await
    }

    /// Checks a phone and password against the phone's account and starts a session.
    /// Unknown phones and wrong passwords are refused alike, in the same time. The
    /// password is checked first, every time: a repeat under the same idempotency key
    /// then answers with the session the first attempt started.
    pub async fn sign_in(
        &self,
        phone: &Msisdn,
        password: &Password,
        lifetime: chrono::Duration,
        meta: CommandMeta,
    ) -> Result<SignedIn, CommandError> {
        let Some(holder) = self
            .holder_if_password(&self.keys.phone_index(phone.as_str()), password)
            .await?
        else {
            return Err(CommandError::BadCredentials);
        };
        if let Some(outcome) = self
            .store
            .earlier_outcome::<SessionError>(&meta)
            .await
            .map_err(map)?
        {
            let earlier = self.signed_in(id_of(&outcome, None)?).await?;
            // Keys are scoped to the phone; a session is only ever its holder's.
            if earlier.holder != holder {
                return Err(CommandError::KeyReused);
            }
            return Ok(earlier);
        }
        let session_id = Uuid::new_v4();
        let mut meta = meta;
        meta.actor = holder.reference();
        self.store
            .execute::<Session>(
                &self.sessions,
                &session_id.to_string(),
                SessionCommand::Start {
                    session_id,
                    holder,
                    lifetime,
                },
                &self.clock,
                &meta,
            )
            .await
            .map_err(map)?;
        self.signed_in(session_id).await
    }

    /// Who holds the phone's account, if `password` is its password. Unknown phones,
    /// erased holders and wrong passwords all take one Argon2 verification's time.
    async fn holder_if_password(
        &self,
        phone_index: &str,
        password: &Password,
    ) -> Result<Option<Actor>, CommandError> {
        let account = self
            .accounts
            .load(phone_index)
            .await
            .context("loading an account")?
            .aggregate;
        let (Some(holder), Some(credential)) = (account.holder(), account.credential()) else {
            verify_nothing(password).await;
            return Ok(None);
        };
        // A shredded subject has no key left: it can no longer sign in.
        let Ok(phc) = self
            .keys
            .open(&holder.id_string(), credential.as_str())
            .await
        else {
            verify_nothing(password).await;
            return Ok(None);
        };
        let phc = String::from_utf8(phc).context("stored credential is not text")?;
        Ok(verify_password(phc, password).await.then_some(holder))
    }

    async fn signed_in(&self, session_id: Uuid) -> Result<SignedIn, CommandError> {
        let session = self.session(session_id).await?;
        let (Ok(holder), Some(expires_at)) =
            (session.active_holder(self.now()), session.expires_at())
        else {
            return Err(CommandError::rule(SessionError::Ended));
        };
        Ok(SignedIn {
            session_id,
            token: self.token_for(session_id),
            holder,
            expires_at,
        })
    }

    async fn session(&self, session_id: Uuid) -> anyhow::Result<Session> {
        Ok(self
            .sessions
            .load(&session_id.to_string())
            .await
            .context("loading a session")?
            .aggregate)
    }

    fn token_for(&self, session_id: Uuid) -> String {
        let id = session_id.simple().to_string();
        let tag = self.keys.tag(TOKEN_TAG, id.as_bytes());
        format!("{TOKEN_PREFIX}{id}.{}", B64URL.encode(tag))
    }

    /// Who a bearer token speaks for: its tag must verify (no database needed to refuse
    /// a forged or foreign token), then its session must be active now.
    pub async fn authenticate(&self, token: &str) -> Result<Authenticated, AuthError> {
        if let Some(key) = token.strip_prefix(KEY_PREFIX) {
            return self.authenticate_key(key).await;
        }
        let (id, tag) = token
            .strip_prefix(TOKEN_PREFIX)
            .and_then(|rest| rest.split_once('.'))
            .ok_or(AuthError::Malformed)?;
        let session_id = Uuid::try_parse(id).map_err(|_| AuthError::Malformed)?;
        let tag = B64URL.decode(tag).map_err(|_| AuthError::Malformed)?;
        if id.len() != 32 || !self.keys.verify_tag(TOKEN_TAG, id.as_bytes(), &tag) {
            return Err(AuthError::Forged);
        }
        let session = self.session(session_id).await?;
        match session.active_holder(self.now()) {
            Ok(actor) => Ok(Authenticated {
                session_id,
                actor,
                expires_at: session.expires_at().unwrap_or_else(|| self.now()),
            }),
            Err(SessionError::Expired) => Err(AuthError::Expired),
            Err(SessionError::Ended) => Err(AuthError::Ended),
            // A tag that verifies names a session this deployment started.
            Err(_) => Err(AuthError::Forged),
        }
    }

    /// An integrator's API key: its tag must verify, then the integrator must exist.
    /// A key does not expire; `expires_at` is a year ahead, for clients that ask.
    async fn authenticate_key(&self, key: &str) -> Result<Authenticated, AuthError> {
        let (id, tag) = key.split_once('.').ok_or(AuthError::Malformed)?;
        let integrator_id = Uuid::try_parse(id).map_err(|_| AuthError::Malformed)?;
        let tag = B64URL.decode(tag).map_err(|_| AuthError::Malformed)?;
        if id.len() != 32 || !self.keys.verify_tag(KEY_TAG, id.as_bytes(), &tag) {
            return Err(AuthError::Forged);
        }
        let integrator = self
            .integrator(IntegratorId::from_uuid(integrator_id))
            .await?;
        match integrator.id() {
            Some(_) if integrator.is_disabled() => Err(AuthError::Withdrawn),
            Some(id) => Ok(Authenticated {
                session_id: integrator_id,
                actor: Actor::Integrator(id),
                expires_at: self.now() + chrono::Duration::days(365),
            }),
            None => Err(AuthError::Forged),
        }
    }

    fn key_for(&self, integrator_id: IntegratorId) -> String {
        let id = integrator_id.as_uuid().simple().to_string();
        let tag = self.keys.tag(KEY_TAG, id.as_bytes());
        format!("{KEY_PREFIX}{id}.{}", B64URL.encode(tag))
    }

    /// An integrator as the event store holds it (an empty one when unknown).
    pub async fn integrator(
        &self,
        integrator_id: IntegratorId,
    ) -> anyhow::Result<domain::integrator::Integrator> {
        Ok(self
            .integrators
            .load(&integrator_id.to_string())
            .await
            .context("loading an integrator")?
            .aggregate)
    }

    /// Adds an integrator whose key may receive `event_types` (operators only, from
    /// the command line). Returns its id and its API key, which is shown once.
    pub async fn add_integrator(
        &self,
        name: &str,
        event_types: std::collections::BTreeSet<String>,
        meta: CommandMeta,
    ) -> Result<(IntegratorId, String), CommandError> {
        let integrator_id = IntegratorId::new();
        self.store
            .execute::<domain::integrator::Integrator>(
                &self.integrators,
                &integrator_id.to_string(),
                domain::integrator::IntegratorCommand::Add {
                    integrator_id,
                    name: name.to_owned(),
                    event_types,
                    at: self.now(),
                },
                &(),
                &meta,
            )
            .await
            .map_err(map)?;
        Ok((integrator_id, self.key_for(integrator_id)))
    }

    /// Withdraws an integrator's key (operators only, from the command line).
    pub async fn disable_integrator(
        &self,
        integrator_id: IntegratorId,
        meta: CommandMeta,
    ) -> Result<CommandOutcome, CommandError> {
        self.store
            .execute::<domain::integrator::Integrator>(
                &self.integrators,
                &integrator_id.to_string(),
                domain::integrator::IntegratorCommand::Disable { at: self.now() },
                &(),
                &meta,
            )
            .await
            .map_err(map)
    }

    /// Registers a webhook of an integrator; its URL and secret are sealed under the
    /// integrator's key.
    pub async fn register_webhook(
        &self,
        integrator_id: IntegratorId,
        webhook_id: WebhookId,
        url: &str,
        types: std::collections::BTreeSet<String>,
        secret: &str,
        meta: CommandMeta,
    ) -> Result<CommandOutcome, CommandError> {
        let subject = integrator_id.to_string();
        let command = domain::integrator::IntegratorCommand::RegisterWebhook {
            webhook_id,
            url: self.seal_text(&subject, url).await?,
            types,
            secret: self.seal_text(&subject, secret).await?,
            at: self.now(),
        };
        self.store
            .execute::<domain::integrator::Integrator>(
                &self.integrators,
                &subject,
                command,
                &(),
                &meta,
            )
            .await
            .map_err(map)
    }

    /// Ends a session (sign-out): its token is refused from then on, by every instance.
    pub async fn sign_out(
        &self,
        session_id: Uuid,
        by: Actor,
        meta: CommandMeta,
    ) -> Result<CommandOutcome, CommandError> {
        self.store
            .execute::<Session>(
                &self.sessions,
                &session_id.to_string(),
                SessionCommand::End { by },
                &self.clock,
                &meta,
            )
            .await
            .map_err(map)
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
        let reason = self.seal_optional(&doctor_id.to_string(), reason).await?;
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
    /// upload. The filename is sealed under the patient's key. A repeat under the same
    /// idempotency key encrypts and stores nothing and answers as the first did.
    #[allow(clippy::too_many_arguments)]
    pub async fn upload_record(
        &self,
        by: Actor,
        patient_id: PatientId,
        category: Category,
        media_type: MediaType,
        filename: Option<&Filename>,
        body: &[u8],
        meta: CommandMeta,
    ) -> Result<Uploaded, CommandError> {
        let mut owned = Vec::with_capacity(body.len() + crate::keys::RECORD_OVERHEAD);
        owned.extend_from_slice(body);
        self.upload_record_body(by, patient_id, category, media_type, filename, owned, meta)
            .await
    }

    /// [`Commands::upload_record`] of a body the caller gives up: it is encrypted in
    /// its own buffer, so an upload in flight holds its body once (give the buffer
    /// [`crate::keys::RECORD_OVERHEAD`] bytes of spare capacity, and no reallocation
    /// copies it either).
    #[allow(clippy::too_many_arguments)]
    pub async fn upload_record_body(
        &self,
        by: Actor,
        patient_id: PatientId,
        category: Category,
        media_type: MediaType,
        filename: Option<&Filename>,
        body: Vec<u8>,
        meta: CommandMeta,
    ) -> Result<Uploaded, CommandError> {
        if let Some(outcome) = self
            .store
            .earlier_outcome::<domain::record::RecordError>(&meta)
            .await
            .map_err(map)?
        {
            return self.uploaded(outcome).await;
        }
        let size = ByteSize::new(body.len() as u64).map_err(|e| CommandError::Rejected {
            kind: RuleKind::Unprocessable,
            code: "empty_body",
            message: e.to_string(),
        })?;
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
        let crate::keys::EncryptedBlob {
            ciphertext,
            sha256,
            wrapped_key,
        } = blob;
        // Stored: the ciphertext is not needed while the upload is recorded.
        drop(ciphertext);
        let filename = self
            .seal_optional(&patient, filename.map(Filename::as_str))
            .await?;
        let command = RecordCommand::Upload {
            record_id,
            patient_id,
            by,
            category,
            media_type,
            size,
            sha256: Sha256Hex::parse(&sha256)
                .map_err(|e| CommandError::Unexpected(anyhow::anyhow!("{e}")))?,
            wrapped_key: WrappedKey::from_ciphertext(wrapped_key),
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
        self.uploaded(outcome).await
    }

    async fn uploaded(&self, outcome: CommandOutcome) -> Result<Uploaded, CommandError> {
        let record_id: RecordId = id_of(&outcome, None)?;
        let record = self
            .record(record_id)
            .await?
            .context("an uploaded record is missing")?;
        let (Some(sha256), Some(size)) = (record.sha256(), record.size()) else {
            return Err(anyhow::anyhow!("an uploaded record has no content").into());
        };
        Ok(Uploaded {
            record_id,
            sha256: sha256.as_str().to_owned(),
            size: size.get(),
            outcome,
        })
    }

    /// A record as the event store holds it now (`None`: no such record).
    pub async fn record(&self, record_id: RecordId) -> anyhow::Result<Option<MedicalRecord>> {
        let record = self
            .records
            .load(&record_id.to_string())
            .await
            .context("loading record")?
            .aggregate;
        Ok(record.id().map(|_| record))
    }

    /// Checks the reader's right and records the read (`RecordAccessed`) before any
    /// byte is returned. No event, no bytes: the content comes only from here.
    ///
    /// `record` is the record as the caller loaded it (see [`Commands::record`]); the
    /// command decides on the event store's state, and the content is decrypted from
    /// `record`, whose content fields are written once, at upload.
    pub async fn read_record(
        &self,
        record: &MedicalRecord,
        by: Actor,
        request_id: Option<AccessRequestId>,
        meta: CommandMeta,
    ) -> Result<(CommandOutcome, Vec<u8>), CommandError> {
        let record_id = record
            .id()
            .ok_or_else(|| CommandError::rule(domain::record::RecordError::NotFound))?;
        // A read is checked and recorded every time: never answered from an earlier one.
        let mut meta = meta;
        meta.idempotency_key = None;
        meta.request_fingerprint = None;
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
        let content = self.content(record, &meta).await?;
        Ok((outcome, content))
    }

    /// The decrypted content of a record. A copy that fails its hash is reported
    /// (`RecordIntegrityFailed`, correlated with the read) and never served.
    async fn content(
        &self,
        record: &MedicalRecord,
        read: &CommandMeta,
    ) -> Result<Vec<u8>, CommandError> {
        let (Some(record_id), Some(patient_id), Some(sha256), Some(wrapped_key)) = (
            record.id(),
            record.patient_id(),
            record.sha256(),
            record.wrapped_key(),
        ) else {
            return Err(anyhow::anyhow!("the record has no content").into());
        };
        let fetched = match self.blobs.get(sha256.as_str()).await {
            Ok(fetched) => fetched,
            Err(error) => {
                tracing::warn!(record_id = %record_id, error = format!("{error:#}"), "blob store unavailable");
                return Err(CommandError::ContentUnavailable);
            }
        };
        for failure in &fetched.refused {
            tracing::error!(
                target: "afyachain::integrity",
                record_id = %record_id,
                backend = %failure.backend,
                object_key = %failure.object_key,
                expected = %failure.expected,
                actual = %failure.actual,
                "a copy of a record's blob failed its integrity check; refused"
            );
            // Recorded for the auditors; a failure to record it must not turn the
            // refusal into another answer.
            if let Err(error) = self
                .report_integrity_failure(record_id, failure, Some(read))
                .await
            {
                tracing::error!(record_id = %record_id, error = %error, "could not record an integrity failure");
            }
        }
        let Some(ciphertext) = fetched.bytes else {
            if !fetched.refused.is_empty() {
                return Err(CommandError::IntegrityFailed);
            }
            tracing::error!(record_id = %record_id, "no copy of the record's blob is left");
            return Err(CommandError::ContentUnavailable);
        };
        Ok(self
            .keys
            .decrypt_record(
                &patient_id.to_string(),
                &record_id.to_string(),
                wrapped_key.as_str(),
                &ciphertext,
            )
            .await?)
    }

    /// Records that a copy of the record's blob failed its integrity check
    /// (`RecordIntegrityFailed`, once per copy and bad hash), correlated with the read
    /// that found it, if any.
    pub async fn report_integrity_failure(
        &self,
        record_id: RecordId,
        failure: &IntegrityFailure,
        read: Option<&CommandMeta>,
    ) -> Result<(), CommandError> {
        let actual_sha256 = Sha256Hex::parse(&failure.actual)
            .map_err(|e| CommandError::Unexpected(anyhow::anyhow!("{e}")))?;
        let (backend, object_key) = (failure.backend.clone(), failure.object_key.clone());
        let mut meta = CommandMeta::new(Actor::System.reference());
        if let Some(read) = read {
            meta.correlation_id = read.correlation_id;
            meta.causation_id = Some(read.command_id);
        }
        self.store
            .execute::<MedicalRecord>(
                &self.records,
                &record_id.to_string(),
                RecordCommand::ReportIntegrityFailure {
                    by: Actor::System,
                    backend,
                    object_key,
                    actual_sha256,
                },
                &self.record_services,
                &meta,
            )
            .await
            .map_err(map)?;
        Ok(())
    }

    /// Records that the grant of an access request is on chain
    /// (`ConsentGrantedOnChain`), or with `revoked` that it was ended there
    /// (`ConsentRevokedOnChain`). Idempotent. Only the chain adapter calls it.
    pub async fn mark_consent_on_chain(
        &self,
        request_id: AccessRequestId,
        revoked: bool,
        receipt: domain::access::ChainReceipt,
    ) -> Result<CommandOutcome, CommandError> {
        let what = if revoked { "revoke" } else { "grant" };
        let meta = CommandMeta::new(Actor::System.reference())
            .with_idempotency_key(format!("chain:{what}:{request_id}"))
            .with_fingerprint(format!("{}:{}", receipt.chain_id, receipt.contract));
        let command = if revoked {
            AccessCommand::MarkRevokedOnChain {
                by: Actor::System,
                receipt,
            }
        } else {
            AccessCommand::MarkGrantedOnChain {
                by: Actor::System,
                receipt,
            }
        };
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

    /// Records that the Merkle root of log ordinals `from..=to` is on chain
    /// (`LogRangeAnchored`). Idempotent. Only the chain adapter calls it.
    pub async fn record_anchor(
        &self,
        from: u64,
        to: u64,
        root: String,
        receipt: domain::access::ChainReceipt,
    ) -> Result<CommandOutcome, CommandError> {
        let id = domain::anchor::LogAnchor::id(from, to);
        let meta = CommandMeta::new(Actor::System.reference());
        self.store
            .execute::<domain::anchor::LogAnchor>(
                &self.anchors,
                &id,
                domain::anchor::AnchorCommand::Record {
                    by: Actor::System,
                    from,
                    to,
                    root,
                    receipt,
                },
                &self.clock,
                &meta,
            )
            .await
            .map_err(map)
    }

    /// The opaque index of a wallet address (a keyed hash of its checksummed form), to
    /// find who registered it without keeping it in clear.
    pub fn wallet_index(&self, address: &str) -> String {
        crate::keys::hex(&self.keys.tag("wallet-index", address.as_bytes()))
    }

    /// The patient's own wallet is to hold their record tokens (`WalletRegistered`,
    /// the address sealed under their key). The caller has checked the patient's proof
    /// of holding it, and that no other patient registered it. Refused once the
    /// custodial address is in use on chain.
    pub async fn register_wallet(
        &self,
        patient_id: PatientId,
        address: &str,
        meta: CommandMeta,
    ) -> Result<CommandOutcome, CommandError> {
        let wallet = self.seal_text(&patient_id.to_string(), address).await?;
        let wallet_index = self.wallet_index(address);
        self.store
            .execute::<Patient>(
                &self.patients,
                &patient_id.to_string(),
                PatientCommand::RegisterWallet {
                    wallet,
                    wallet_index,
                },
                &(),
                &meta,
            )
            .await
            .map_err(map)
    }

    /// A patient as the event store holds it now (`None`: no such patient).
    pub async fn patient(&self, patient_id: PatientId) -> anyhow::Result<Option<Patient>> {
        let patient = self
            .patients
            .load(&patient_id.to_string())
            .await
            .context("loading a patient")?
            .aggregate;
        Ok(patient.id().map(|_| patient))
    }

    /// Where the patient's record tokens are held: their registered wallet's address,
    /// or `None` for their custodial address, which from this call on is theirs for
    /// good (`CustodialAddressInUse`, once). Only the chain adapter calls it, before it
    /// puts the patient's address on chain.
    pub async fn patient_chain_wallet(
        &self,
        patient_id: PatientId,
    ) -> Result<Option<String>, CommandError> {
        let meta = CommandMeta::new(Actor::System.reference());
        self.store
            .execute::<Patient>(
                &self.patients,
                &patient_id.to_string(),
                PatientCommand::UseChainAddress,
                &(),
                &meta,
            )
            .await
            .map_err(map)?;
        let patient = self
            .patient(patient_id)
            .await?
            .ok_or_else(|| CommandError::rule(PatientError::NotRegistered))?;
        match patient.wallet() {
            None => Ok(None),
            Some(sealed) => self
                .open_text(&patient_id.to_string(), sealed.as_str())
                .await
                .map(Some)
                .ok_or_else(|| {
                    CommandError::from(anyhow::anyhow!(
                        "the patient's wallet cannot be opened (erased?)"
                    ))
                }),
        }
    }

    /// Decides whether `payer` may have an M-Pesa prompt pushed, and to whom, from what
    /// the event store holds now (see [`domain::payment::payment_parties`]): the
    /// doctor's verification, and the first of `requests` that is a grant in force (or
    /// the first, to say why not). Answers with the patient's registered number, the
    /// only one a prompt may go to.
    pub async fn plan_payment(
        &self,
        payer: Actor,
        doctor_id: Option<DoctorId>,
        requests: &[AccessRequestId],
    ) -> Result<PaymentPlan, CommandError> {
        let now = self.clock.now();
        let payer_verified = match payer {
            Actor::Doctor(d) => self
                .doctors
                .load(&d.to_string())
                .await
                .context("loading a doctor")?
                .aggregate
                .is_verified(),
            _ => false,
        };
        let mut loaded = Vec::with_capacity(requests.len());
        for id in requests {
            if let Some(request) = self.access_request(*id).await? {
                loaded.push(request);
            }
        }
        let grant = loaded
            .iter()
            .find(|r| domain::payment::grant_in_force(r, now))
            .or(loaded.first());
        let parties = domain::payment::payment_parties(domain::payment::Asked {
            payer,
            payer_verified,
            doctor_id,
            grant,
            now,
        })
        .map_err(CommandError::rule)?;
        let phone = self
            .patient_phone(parties.patient_id)
            .await?
            .ok_or_else(|| CommandError::rule(domain::payment::PaymentError::PhoneUnavailable))?;
        Ok(PaymentPlan { parties, phone })
    }

    /// The patient's registered phone number, opened from their sealed personal fields
    /// (`None`: no such patient, or their key is shredded).
    async fn patient_phone(&self, patient_id: PatientId) -> anyhow::Result<Option<Msisdn>> {
        let subject = patient_id.to_string();
        let events = self
            .patients
            .load_events(&subject)
            .await
            .map_err(|e| anyhow::anyhow!("loading a patient's events: {e}"))?;
        let personal = events.into_iter().rev().find_map(|e| match e.payload {
            domain::patient::PatientEvent::PatientRegistered { personal, .. }
            | domain::patient::PatientEvent::PatientProfileUpdated { personal, .. } => {
                Some(personal)
            }
            _ => None,
        });
        let Some(personal) = personal else {
            return Ok(None);
        };
        let Some(text) = self.open_text(&subject, personal.as_str()).await else {
            return Ok(None);
        };
        let personal: PatientPersonal =
            serde_json::from_str(&text).context("reading a patient's sealed personal fields")?;
        Ok(Msisdn::parse(&personal.phone).ok())
    }

    /// The payment an earlier request with the same Idempotency-Key (and body) made,
    /// if any: a retry is answered with it, and counts against no limit.
    pub async fn earlier_payment(
        &self,
        meta: &CommandMeta,
    ) -> Result<Option<Done<PaymentId>>, CommandError> {
        match self
            .store
            .earlier_outcome::<domain::payment::PaymentError>(meta)
            .await
            .map_err(map)?
        {
            Some(outcome) => Ok(Some(Done {
                id: id_of(&outcome, None)?,
                outcome,
            })),
            None => Ok(None),
        }
    }

    /// A patient or doctor asks for an M-Pesa payment (`PaymentRequested`) as
    /// [`Commands::plan_payment`] allowed it: to the patient's registered number,
    /// sealed under the patient's key, with its keyed hash to match the callback's.
    pub async fn request_payment(
        &self,
        payer: Actor,
        purpose: domain::payment::Purpose,
        amount_kes: u64,
        plan: &PaymentPlan,
        meta: CommandMeta,
    ) -> Result<Done<PaymentId>, CommandError> {
        if let Some(done) = self.earlier_payment(&meta).await? {
            return Ok(done);
        }
        let payment_id = PaymentId::new();
        let patient = plan.parties.patient_id;
        let command = domain::payment::PaymentCommand::Request {
            payment_id,
            payer,
            purpose,
            amount_kes,
            phone: self
                .seal_text(&patient.to_string(), plan.phone.as_str())
                .await?,
            phone_index: self.keys.phone_index(plan.phone.as_str()),
            doctor_id: plan.parties.doctor_id,
            access_request_id: plan.parties.access_request_id,
            patient_id: Some(patient),
        };
        let outcome = self
            .store
            .execute::<domain::payment::Payment>(
                &self.payments,
                &payment_id.to_string(),
                command,
                &(),
                &meta,
            )
            .await
            .map_err(map)?;
        Ok(Done {
            id: id_of(&outcome, Some(payment_id))?,
            outcome,
        })
    }

    /// A payment as the event store holds it now (`None`: no such payment).
    pub async fn payment(
        &self,
        payment_id: PaymentId,
    ) -> anyhow::Result<Option<domain::payment::Payment>> {
        let payment = self
            .payments
            .load(&payment_id.to_string())
            .await
            .context("loading a payment")?
            .aggregate;
        Ok(payment.id().map(|_| payment))
    }

    /// Seals a personal field under a subject's key (for the callback's paying number).
    pub async fn seal_for(&self, subject: &str, text: &str) -> anyhow::Result<Sealed> {
        self.seal_text(subject, text).await
    }

    /// The number a payment is pushed to (opened from its seal: the patient's key, or
    /// the payer's for payments from before).
    pub async fn payment_phone(&self, payment_id: PaymentId) -> anyhow::Result<String> {
        let payment = self
            .payment(payment_id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no such payment"))?;
        let sealed = payment
            .phone()
            .ok_or_else(|| anyhow::anyhow!("the payment has no phone"))?;
        self.open_text(&payment.phone_subject(), sealed.as_str())
            .await
            .ok_or_else(|| anyhow::anyhow!("the payment's phone cannot be opened (erased?)"))
    }

    /// The M-Pesa adapter's record of a payment's STK Push or its outcome. Only the
    /// adapter and the callback handler call it (as the platform).
    pub async fn payment_command(
        &self,
        payment_id: PaymentId,
        command: domain::payment::PaymentCommand,
    ) -> Result<CommandOutcome, CommandError> {
        let meta = CommandMeta::new(Actor::System.reference());
        self.store
            .execute::<domain::payment::Payment>(
                &self.payments,
                &payment_id.to_string(),
                command,
                &(),
                &meta,
            )
            .await
            .map_err(map)
    }

    /// Keeps a callback that settled nothing for operators (`MpesaCallbackRejected`).
    pub async fn reject_callback(
        &self,
        command: domain::payment::RejectedCallbackCommand,
    ) -> Result<CommandOutcome, CommandError> {
        let meta = CommandMeta::new(Actor::System.reference());
        self.store
            .execute::<domain::payment::RejectedCallback>(
                &self.rejected_callbacks,
                &uuid::Uuid::new_v4().to_string(),
                command,
                &(),
                &meta,
            )
            .await
            .map_err(map)
    }

    /// Records the record's token on chain (`RecordTokenMinted`). Idempotent: a record
    /// has one token, and a repeat records nothing. Only the chain adapter calls it.
    pub async fn mark_minted(
        &self,
        record_id: RecordId,
        token: domain::record::ChainTx,
    ) -> Result<CommandOutcome, CommandError> {
        let meta = CommandMeta::new(Actor::System.reference())
            .with_idempotency_key(format!("chain:mint:{record_id}"))
            .with_fingerprint(format!("{}:{}", token.chain_id, token.contract));
        self.store
            .execute::<MedicalRecord>(
                &self.records,
                &record_id.to_string(),
                RecordCommand::MarkMinted {
                    by: Actor::System,
                    token,
                },
                &self.record_services,
                &meta,
            )
            .await
            .map_err(map)
    }

    /// Records that `backend` holds the record's ciphertext under `object_key`
    /// (`RecordStored`). Idempotent: a repeat, from a replay or a racing instance,
    /// records nothing. Only the storage adapter calls it.
    pub async fn mark_stored(
        &self,
        record_id: RecordId,
        backend: &str,
        object_key: &str,
        etag: Option<String>,
    ) -> Result<CommandOutcome, CommandError> {
        let meta = CommandMeta::new(Actor::System.reference())
            .with_idempotency_key(format!("storage:{backend}:{record_id}"))
            .with_fingerprint(object_key.to_owned());
        self.store
            .execute::<MedicalRecord>(
                &self.records,
                &record_id.to_string(),
                RecordCommand::MarkStored {
                    by: Actor::System,
                    backend: backend.to_owned(),
                    object_key: object_key.to_owned(),
                    etag,
                },
                &self.record_services,
                &meta,
            )
            .await
            .map_err(map)
    }

    /// Issues the patient a new share code (replacing any earlier one), valid for
    /// [`SHARE_CODE_DAYS`] days: 10 characters of Crockford's base32 (50 random bits),
    /// sealed under the patient's key in `ShareCodeIssued`, looked up by a keyed hash.
    pub async fn issue_share_code(
        &self,
        patient_id: PatientId,
        meta: CommandMeta,
    ) -> Result<CommandOutcome, CommandError> {
        let bits = rand::random::<u64>() & ((1u64 << 50) - 1);
        let code: String = (0..10)
            .rev()
            .map(|i| char::from(CROCKFORD[((bits >> (5 * i)) & 31) as usize]))
            .collect();
        let subject = patient_id.to_string();
        let command = PatientCommand::IssueShareCode {
            code: self.seal_text(&subject, &code).await?,
            code_index: self.share_code_index(&code).unwrap_or_default(),
            expires_at: self.now() + chrono::Duration::days(SHARE_CODE_DAYS),
        };
        self.store
            .execute::<Patient>(&self.patients, &subject, command, &(), &meta)
            .await
            .map_err(map)
    }

    /// The patient's current share code (`XXXXX-XXXXX`) and its expiry, if any.
    pub async fn share_code(
        &self,
        patient_id: PatientId,
    ) -> anyhow::Result<Option<(String, DateTime<Utc>)>> {
        let Some(patient) = self.patient(patient_id).await? else {
            return Ok(None);
        };
        let Some((sealed, expires_at)) = patient.share_code() else {
            return Ok(None);
        };
        let code = self
            .open_text(&patient_id.to_string(), sealed.as_str())
            .await
            .ok_or_else(|| anyhow::anyhow!("a share code cannot be opened"))?;
        let head: String = code.chars().take(5).collect();
        let tail: String = code.chars().skip(5).collect();
        Ok(Some((format!("{head}-{tail}"), *expires_at)))
    }

    /// The keyed hash a share code is looked up by, after reading it as people type
    /// it (any case, with or without the dash or spaces; O read as 0, I and L as 1).
    /// `None`: not a share code.
    pub fn share_code_index(&self, typed: &str) -> Option<String> {
        let code: String = typed
            .chars()
            .filter(|c| !matches!(c, '-' | ' '))
            .map(|c| match c.to_ascii_uppercase() {
                'O' => '0',
                'I' | 'L' => '1',
                other => other,
            })
            .collect();
        if code.len() != 10 || !code.bytes().all(|b| CROCKFORD.contains(&b)) {
            return None;
        }
        Some(crate::keys::hex(
            &self.keys.tag(SHARE_CODE_TAG, code.as_bytes()),
        ))
    }

    /// A doctor's name, opened from their sealed personal fields (never the phone).
    pub async fn doctor_name(&self, doctor_id: &str, personal_sealed: &str) -> Option<String> {
        let text = self.open_text(doctor_id, personal_sealed).await?;
        serde_json::from_str::<DoctorPersonal>(&text)
            .ok()
            .map(|p| p.name)
    }

    /// Opens a field sealed under a subject's key (a filename, a purpose) for someone
    /// entitled to see it; `None` once the subject's key has been shredded.
    pub async fn open_text(&self, subject: &str, sealed: &str) -> Option<String> {
        let bytes = self.keys.open(subject, sealed).await.ok()?;
        String::from_utf8(bytes).ok()
    }

    /// An access request as the event store holds it now (`None`: no such request).
    pub async fn access_request(
        &self,
        request_id: AccessRequestId,
    ) -> anyhow::Result<Option<AccessRequest>> {
        let request = self
            .access
            .load(&request_id.to_string())
            .await
            .context("loading an access request")?
            .aggregate;
        Ok(request.id().map(|_| request))
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
        note: Option<&Note>,
        meta: CommandMeta,
    ) -> Result<Done<AccessRequestId>, CommandError> {
        if let Some(outcome) = self
            .store
            .earlier_outcome::<AccessError>(&meta)
            .await
            .map_err(map)?
        {
            return Ok(Done {
                id: id_of(&outcome, None)?,
                outcome,
            });
        }
        let request_id = AccessRequestId::new();
        let patient = patient_id.to_string();
        let note = self.seal_optional(&patient, note.map(Note::as_str)).await?;
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
            id: id_of(&outcome, Some(request_id))?,
            outcome,
        })
    }

    /// The patient approves (possibly narrowing); answers with the approval event.
    pub async fn approve_access(
        &self,
        request_id: AccessRequestId,
        by: Actor,
        expires_at: Option<DateTime<Utc>>,
        scope: Option<Scope>,
        meta: CommandMeta,
    ) -> Result<Decided, CommandError> {
        let outcome = self
            .access_command(
                request_id,
                AccessCommand::Approve {
                    by,
                    expires_at,
                    scope,
                },
                meta,
            )
            .await?;
        self.decided(outcome).await
    }

    pub async fn reject_access(
        &self,
        request_id: AccessRequestId,
        by: Actor,
        reason: Option<&Note>,
        meta: CommandMeta,
    ) -> Result<Decided, CommandError> {
        // The reason is sealed under the patient's key: only a patient decides.
        let reason = match by {
            Actor::Patient(p) => {
                self.seal_optional(&p.to_string(), reason.map(Note::as_str))
                    .await?
            }
            _ => None,
        };
        let outcome = self
            .access_command(request_id, AccessCommand::Reject { by, reason }, meta)
            .await?;
        self.decided(outcome).await
    }

    pub async fn revoke_access(
        &self,
        request_id: AccessRequestId,
        by: Actor,
        meta: CommandMeta,
    ) -> Result<Decided, CommandError> {
        let outcome = self
            .access_command(request_id, AccessCommand::Revoke { by }, meta)
            .await?;
        self.decided(outcome).await
    }

    async fn decided(&self, outcome: CommandOutcome) -> Result<Decided, CommandError> {
        let event = self
            .appended(&self.access, &outcome)
            .await?
            .into_iter()
            .next()
            .context("a decision appended no event")?;
        Ok(Decided { outcome, event })
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

/// What [`Commands::plan_payment`] allowed: between whom a payment is, and the
/// patient's registered number its prompt goes to (never a number someone typed).
#[derive(Clone, Debug)]
pub struct PaymentPlan {
    pub parties: domain::payment::PaymentParties,
    pub phone: Msisdn,
}

/// A decision on an access request: the event it appended (for a repeat, the first
/// decision's event).
#[derive(Clone, Debug)]
pub struct Decided {
    pub outcome: CommandOutcome,
    pub event: <AccessRequest as Aggregate>::Event,
}

fn staff_actor(role: StaffRole, id: StaffId) -> Actor {
    match role {
        StaffRole::Registrar => Actor::Registrar(id),
        StaffRole::Auditor => Actor::Auditor(id),
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
