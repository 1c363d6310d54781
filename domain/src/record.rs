//! The MedicalRecord aggregate: uploaded by its patient; every read by anyone else is
//! checked against the access request it is made under and recorded first.
//!
//! The storage adapter confirms each copy of the encrypted blob on remote storage
//! (`RecordStored`) and reports a copy that failed its integrity check
//! (`RecordIntegrityFailed`). Later issues add chain events as new variants; existing
//! variants never change meaning.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::access::{AccessError, AccessRequest};
use crate::actor::Actor;
use crate::clock::Clock;
use crate::error::{Rule, RuleKind, ServiceError};
use crate::ids::{AccessRequestId, PatientId, RecordId};
use crate::sealed::{Sealed, WrappedKey};
use crate::value::{ByteSize, Category, MediaType, Sha256Hex};

#[derive(Clone, Debug, PartialEq)]
pub enum RecordCommand {
    Upload {
        record_id: RecordId,
        patient_id: PatientId,
        by: Actor,
        category: Category,
        media_type: MediaType,
        size: ByteSize,
        /// SHA-256 of the ciphertext.
        sha256: Sha256Hex,
        wrapped_key: WrappedKey,
        filename: Option<Sealed>,
    },
    /// A read; the patient's own reads record nothing, a doctor's need an active grant.
    Read {
        by: Actor,
        request_id: Option<AccessRequestId>,
    },
    /// The storage adapter copied the ciphertext to a remote store. Only the platform
    /// records this; a repeat for the same backend and key records nothing.
    MarkStored {
        by: Actor,
        backend: String,
        object_key: String,
        etag: Option<String>,
    },
    /// The chain adapter minted the record's token. Only the platform records this; a
    /// record has one token, and a repeat records nothing.
    MarkMinted { by: Actor, token: ChainTx },
    /// A copy of the blob did not hash to the record's SHA-256 and was refused.
    ReportIntegrityFailure {
        by: Actor,
        backend: String,
        object_key: String,
        actual_sha256: Sha256Hex,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RecordEvent {
    RecordUploaded {
        record_id: RecordId,
        patient_id: PatientId,
        category: Category,
        media_type: MediaType,
        size: ByteSize,
        sha256: Sha256Hex,
        wrapped_key: WrappedKey,
        filename: Option<Sealed>,
        uploaded_at: DateTime<Utc>,
    },
    RecordAccessed {
        record_id: RecordId,
        patient_id: PatientId,
        accessor: Actor,
        request_id: Option<AccessRequestId>,
        category: Category,
        accessed_at: DateTime<Utc>,
    },
    /// The ciphertext (never plaintext) is held by `backend` under `object_key`, which
    /// is content-addressed (the ciphertext's SHA-256).
    RecordStored {
        record_id: RecordId,
        backend: String,
        object_key: String,
        etag: Option<String>,
        stored_at: DateTime<Utc>,
    },
    /// The record's token exists on chain (minted to the patient's address).
    RecordTokenMinted {
        record_id: RecordId,
        token: ChainTx,
        minted_at: DateTime<Utc>,
    },
    /// A copy read from `backend` hashed to `actual_sha256` instead of the record's
    /// SHA-256; it was not served.
    RecordIntegrityFailed {
        record_id: RecordId,
        backend: String,
        object_key: String,
        expected_sha256: Sha256Hex,
        actual_sha256: Sha256Hex,
        detected_at: DateTime<Utc>,
    },
}

/// Where an effect landed on chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainTx {
    pub chain_id: u64,
    /// The contract, `0x…`.
    pub contract: String,
    /// The token id, in decimal.
    pub token_id: String,
    /// The transaction that made the effect, `0x…`.
    pub tx_hash: String,
    pub block: u64,
}

impl DomainEvent for RecordEvent {
    fn event_type(&self) -> String {
        match self {
            RecordEvent::RecordUploaded { .. } => "RecordUploaded",
            RecordEvent::RecordAccessed { .. } => "RecordAccessed",
            RecordEvent::RecordStored { .. } => "RecordStored",
            RecordEvent::RecordIntegrityFailed { .. } => "RecordIntegrityFailed",
            RecordEvent::RecordTokenMinted { .. } => "RecordTokenMinted",
        }
        .to_owned()
    }
    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("no such record")]
    NotFound,
    #[error("this record already exists")]
    AlreadyUploaded,
    #[error("only the patient may upload their records")]
    NotThePatient,
    #[error("no access request grants this read")]
    NoGrant,
    #[error("the grant is not active")]
    GrantNotActive,
    #[error("the grant has expired")]
    GrantExpired,
    #[error("the grant does not cover this record")]
    NotCovered,
    #[error("not allowed to read this record")]
    NotAllowed,
    #[error("service failure: {0}")]
    Service(String),
}

impl Rule for RecordError {
    fn kind(&self) -> RuleKind {
        match self {
            RecordError::NotFound => RuleKind::NotFound,
            RecordError::NotThePatient
            | RecordError::NoGrant
            | RecordError::GrantNotActive
            | RecordError::GrantExpired
            | RecordError::NotCovered
            | RecordError::NotAllowed => RuleKind::Forbidden,
            RecordError::AlreadyUploaded => RuleKind::Conflict,
            RecordError::Service(_) => RuleKind::ServiceFailure,
        }
    }
    fn code(&self) -> &'static str {
        match self {
            RecordError::NotFound => "record_not_found",
            RecordError::AlreadyUploaded => "record_already_uploaded",
            RecordError::NotThePatient => "not_the_patient",
            RecordError::NoGrant => "no_grant",
            RecordError::GrantNotActive => "grant_not_active",
            RecordError::GrantExpired => "grant_expired",
            RecordError::NotCovered => "not_covered",
            RecordError::NotAllowed => "not_allowed",
            RecordError::Service(_) => "service_failure",
        }
    }
}

impl From<ServiceError> for RecordError {
    fn from(e: ServiceError) -> Self {
        RecordError::Service(e.0)
    }
}

/// What a record asks while handling a read: the current state of an access request
/// (from the event store, never a read model) and the clock.
#[async_trait]
pub trait RecordServices: Send + Sync {
    async fn access_request(
        &self,
        request: AccessRequestId,
    ) -> Result<Option<AccessRequest>, ServiceError>;
    fn clock(&self) -> &dyn Clock;
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MedicalRecord {
    id: Option<RecordId>,
    patient_id: Option<PatientId>,
    category: Option<Category>,
    media_type: Option<MediaType>,
    size: Option<ByteSize>,
    sha256: Option<Sha256Hex>,
    wrapped_key: Option<WrappedKey>,
    filename: Option<Sealed>,
    /// `(backend, object_key)` of every confirmed remote copy.
    #[serde(default)]
    stored: Vec<(String, String)>,
    /// `(backend, object_key, actual SHA-256)` of every copy reported corrupt.
    #[serde(default)]
    corrupt: Vec<(String, String, String)>,
    #[serde(default)]
    token: Option<ChainTx>,
}

impl MedicalRecord {
    pub fn id(&self) -> Option<RecordId> {
        self.id
    }
    pub fn patient_id(&self) -> Option<PatientId> {
        self.patient_id
    }
    pub fn category(&self) -> Option<Category> {
        self.category
    }
    pub fn media_type(&self) -> Option<&MediaType> {
        self.media_type.as_ref()
    }
    pub fn size(&self) -> Option<ByteSize> {
        self.size
    }
    pub fn sha256(&self) -> Option<&Sha256Hex> {
        self.sha256.as_ref()
    }
    pub fn wrapped_key(&self) -> Option<&WrappedKey> {
        self.wrapped_key.as_ref()
    }
    pub fn filename(&self) -> Option<&Sealed> {
        self.filename.as_ref()
    }
    /// The record's token, once minted.
    pub fn token(&self) -> Option<&ChainTx> {
        self.token.as_ref()
    }
    /// Whether `backend` holds a confirmed copy (`RecordStored`).
    pub fn is_stored_on(&self, backend: &str) -> bool {
        self.stored.iter().any(|(b, _)| b == backend)
    }
}

impl Aggregate for MedicalRecord {
    const TYPE: &'static str = "medical_record";
    type Command = RecordCommand;
    type Event = RecordEvent;
    type Error = RecordError;
    type Services = Arc<dyn RecordServices>;

    async fn handle(
        &mut self,
        command: RecordCommand,
        services: &Arc<dyn RecordServices>,
        sink: &EventSink<Self>,
    ) -> Result<(), RecordError> {
        let now = services.clock().now();
        match command {
            RecordCommand::Upload {
                record_id,
                patient_id,
                by,
                category,
                media_type,
                size,
                sha256,
                wrapped_key,
                filename,
            } => {
                if self.id.is_some() {
                    return Err(RecordError::AlreadyUploaded);
                }
                if by != Actor::Patient(patient_id) {
                    return Err(RecordError::NotThePatient);
                }
                let event = RecordEvent::RecordUploaded {
                    record_id,
                    patient_id,
                    category,
                    media_type,
                    size,
                    sha256,
                    wrapped_key,
                    filename,
                    uploaded_at: now,
                };
                sink.write(event, self).await;
            }
            RecordCommand::Read { by, request_id } => {
                let (Some(record_id), Some(patient_id), Some(category)) =
                    (self.id, self.patient_id, self.category)
                else {
                    return Err(RecordError::NotFound);
                };
                let doctor_id = match by {
                    Actor::Patient(p) if p == patient_id => return Ok(()),
                    Actor::Doctor(d) => d,
                    _ => return Err(RecordError::NotAllowed),
                };
                let request_id = request_id.ok_or(RecordError::NoGrant)?;
                let grant = services
                    .access_request(request_id)
                    .await?
                    .ok_or(RecordError::NoGrant)?;
                if grant.patient_id() != Some(patient_id) {
                    return Err(RecordError::NoGrant);
                }
                grant
                    .grant_for(doctor_id, category, record_id, now)
                    .map_err(|e| match e {
                        AccessError::GrantExpired => RecordError::GrantExpired,
                        AccessError::NotCovered => RecordError::NotCovered,
                        AccessError::GrantNotActive => RecordError::GrantNotActive,
                        _ => RecordError::NoGrant,
                    })?;
                let event = RecordEvent::RecordAccessed {
                    record_id,
                    patient_id,
                    accessor: by,
                    request_id: Some(request_id),
                    category,
                    accessed_at: now,
                };
                sink.write(event, self).await;
            }
            RecordCommand::MarkStored {
                by,
                backend,
                object_key,
                etag,
            } => {
                let record_id = self.id.ok_or(RecordError::NotFound)?;
                if by != Actor::System {
                    return Err(RecordError::NotAllowed);
                }
                if backend.trim().is_empty() || object_key.trim().is_empty() {
                    return Err(RecordError::Service(
                        "a stored copy needs a backend and an object key".into(),
                    ));
                }
                if self
                    .stored
                    .iter()
                    .any(|(b, k)| *b == backend && *k == object_key)
                {
                    return Ok(());
                }
                let event = RecordEvent::RecordStored {
                    record_id,
                    backend,
                    object_key,
                    etag,
                    stored_at: now,
                };
                sink.write(event, self).await;
            }
            RecordCommand::MarkMinted { by, token } => {
                let record_id = self.id.ok_or(RecordError::NotFound)?;
                if by != Actor::System {
                    return Err(RecordError::NotAllowed);
                }
                if self.token.is_some() {
                    return Ok(());
                }
                let event = RecordEvent::RecordTokenMinted {
                    record_id,
                    token,
                    minted_at: now,
                };
                sink.write(event, self).await;
            }
            RecordCommand::ReportIntegrityFailure {
                by,
                backend,
                object_key,
                actual_sha256,
            } => {
                let (Some(record_id), Some(expected)) = (self.id, self.sha256.clone()) else {
                    return Err(RecordError::NotFound);
                };
                if by != Actor::System {
                    return Err(RecordError::NotAllowed);
                }
                if actual_sha256 == expected {
                    return Err(RecordError::Service(
                        "the copy matches the record's hash".into(),
                    ));
                }
                // The same bad copy found again (every read of it) is recorded once.
                if self.corrupt.iter().any(|(b, k, a)| {
                    *b == backend && *k == object_key && a == actual_sha256.as_str()
                }) {
                    return Ok(());
                }
                let event = RecordEvent::RecordIntegrityFailed {
                    record_id,
                    backend,
                    object_key,
                    expected_sha256: expected,
                    actual_sha256,
                    detected_at: now,
                };
                sink.write(event, self).await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: RecordEvent) {
        match event {
            RecordEvent::RecordUploaded {
                record_id,
                patient_id,
                category,
                media_type,
                size,
                sha256,
                wrapped_key,
                filename,
                ..
            } => {
                self.id = Some(record_id);
                self.patient_id = Some(patient_id);
                self.category = Some(category);
                self.media_type = Some(media_type);
                self.size = Some(size);
                self.sha256 = Some(sha256);
                self.wrapped_key = Some(wrapped_key);
                self.filename = filename;
            }
            RecordEvent::RecordAccessed { .. } => {}
            RecordEvent::RecordStored {
                backend,
                object_key,
                ..
            } => self.stored.push((backend, object_key)),
            RecordEvent::RecordIntegrityFailed {
                backend,
                object_key,
                actual_sha256,
                ..
            } => self
                .corrupt
                .push((backend, object_key, actual_sha256.as_str().to_owned())),
            RecordEvent::RecordTokenMinted { token, .. } => self.token = Some(token),
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;
    use cqrs_es::test::TestFramework;

    use super::*;
    use crate::access::tests::{t0, Story};
    use crate::clock::FixedClock;
    use crate::ids::DoctorId;

    struct Fake {
        request: Option<AccessRequest>,
        clock: FixedClock,
    }

    #[async_trait]
    impl RecordServices for Fake {
        async fn access_request(
            &self,
            _: AccessRequestId,
        ) -> Result<Option<AccessRequest>, ServiceError> {
            Ok(self.request.clone())
        }
        fn clock(&self) -> &dyn Clock {
            &self.clock
        }
    }

    fn grant(events: Vec<crate::access::AccessEvent>) -> AccessRequest {
        let mut state = AccessRequest::default();
        for e in events {
            state.apply(e);
        }
        state
    }

    fn services(request: Option<AccessRequest>, now: DateTime<Utc>) -> Arc<dyn RecordServices> {
        Arc::new(Fake {
            request,
            clock: FixedClock(now),
        })
    }

    fn uploaded(record_id: RecordId, patient_id: PatientId, category: Category) -> RecordEvent {
        RecordEvent::RecordUploaded {
            record_id,
            patient_id,
            category,
            media_type: MediaType::parse("application/pdf").unwrap(),
            size: ByteSize::new(10).unwrap(),
            sha256: Sha256Hex::parse(&"a".repeat(64)).unwrap(),
            wrapped_key: WrappedKey::from_ciphertext("v1.k".into()),
            filename: None,
            uploaded_at: t0(),
        }
    }

    fn approved_lab(s: &Story) -> AccessRequest {
        grant(vec![
            s.requested(Story::lab()),
            s.approved(Story::lab(), t0() + Duration::days(30)),
        ])
    }

    fn read(s: &Story) -> RecordCommand {
        RecordCommand::Read {
            by: Actor::Doctor(s.doctor_id),
            request_id: Some(s.request_id),
        }
    }

    #[test]
    fn the_patient_uploads_their_record() {
        let r = RecordId::new();
        let p = PatientId::new();
        TestFramework::<MedicalRecord>::with(services(None, t0()))
            .given_no_previous_events()
            .when(RecordCommand::Upload {
                record_id: r,
                patient_id: p,
                by: Actor::Patient(p),
                category: Category::Lab,
                media_type: MediaType::parse("application/pdf").unwrap(),
                size: ByteSize::new(10).unwrap(),
                sha256: Sha256Hex::parse(&"a".repeat(64)).unwrap(),
                wrapped_key: WrappedKey::from_ciphertext("v1.k".into()),
                filename: None,
            })
            .then_expect_events(vec![uploaded(r, p, Category::Lab)]);
    }

    #[test]
    fn nobody_uploads_for_another_patient() {
        let p = PatientId::new();
        TestFramework::<MedicalRecord>::with(services(None, t0()))
            .given_no_previous_events()
            .when(RecordCommand::Upload {
                record_id: RecordId::new(),
                patient_id: p,
                by: Actor::Doctor(DoctorId::new()),
                category: Category::Lab,
                media_type: MediaType::parse("application/pdf").unwrap(),
                size: ByteSize::new(10).unwrap(),
                sha256: Sha256Hex::parse(&"a".repeat(64)).unwrap(),
                wrapped_key: WrappedKey::from_ciphertext("v1.k".into()),
                filename: None,
            })
            .then_expect_error(RecordError::NotThePatient);
    }

    #[test]
    fn a_doctor_with_an_active_grant_reads_and_the_read_is_recorded() {
        let s = Story::new();
        let r = RecordId::new();
        TestFramework::<MedicalRecord>::with(services(Some(approved_lab(&s)), t0()))
            .given(vec![uploaded(r, s.patient_id, Category::Lab)])
            .when(read(&s))
            .then_expect_events(vec![RecordEvent::RecordAccessed {
                record_id: r,
                patient_id: s.patient_id,
                accessor: Actor::Doctor(s.doctor_id),
                request_id: Some(s.request_id),
                category: Category::Lab,
                accessed_at: t0(),
            }]);
    }

    #[test]
    fn the_patient_reading_their_own_record_records_nothing() {
        let p = PatientId::new();
        let r = RecordId::new();
        TestFramework::<MedicalRecord>::with(services(None, t0()))
            .given(vec![uploaded(r, p, Category::Lab)])
            .when(RecordCommand::Read {
                by: Actor::Patient(p),
                request_id: None,
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn another_patient_or_staff_cannot_read() {
        let p = PatientId::new();
        let r = RecordId::new();
        for by in [
            Actor::Patient(PatientId::new()),
            Actor::Auditor(crate::ids::StaffId::new()),
            Actor::System,
        ] {
            TestFramework::<MedicalRecord>::with(services(None, t0()))
                .given(vec![uploaded(r, p, Category::Lab)])
                .when(RecordCommand::Read {
                    by,
                    request_id: None,
                })
                .then_expect_error(RecordError::NotAllowed);
        }
    }

    #[test]
    fn a_revoked_grant_cannot_be_used_to_read() {
        let s = Story::new();
        let r = RecordId::new();
        let revoked = grant(vec![
            s.requested(Story::lab()),
            s.approved(Story::lab(), t0() + Duration::days(30)),
            s.revoked(),
        ]);
        TestFramework::<MedicalRecord>::with(services(Some(revoked), t0()))
            .given(vec![uploaded(r, s.patient_id, Category::Lab)])
            .when(read(&s))
            .then_expect_error(RecordError::GrantNotActive);
    }

    #[test]
    fn an_expired_grant_cannot_be_used_to_read() {
        let s = Story::new();
        let r = RecordId::new();
        TestFramework::<MedicalRecord>::with(services(
            Some(approved_lab(&s)),
            t0() + Duration::days(30),
        ))
        .given(vec![uploaded(r, s.patient_id, Category::Lab)])
        .when(read(&s))
        .then_expect_error(RecordError::GrantExpired);
    }

    #[test]
    fn a_pending_request_cannot_be_used_to_read() {
        let s = Story::new();
        let r = RecordId::new();
        TestFramework::<MedicalRecord>::with(services(
            Some(grant(vec![s.requested(Story::lab())])),
            t0(),
        ))
        .given(vec![uploaded(r, s.patient_id, Category::Lab)])
        .when(read(&s))
        .then_expect_error(RecordError::GrantNotActive);
    }

    #[test]
    fn a_grant_for_lab_does_not_cover_imaging() {
        let s = Story::new();
        let r = RecordId::new();
        TestFramework::<MedicalRecord>::with(services(Some(approved_lab(&s)), t0()))
            .given(vec![uploaded(r, s.patient_id, Category::Imaging)])
            .when(read(&s))
            .then_expect_error(RecordError::NotCovered);
    }

    #[test]
    fn a_grant_for_another_doctor_cannot_be_used() {
        let s = Story::new();
        let r = RecordId::new();
        TestFramework::<MedicalRecord>::with(services(Some(approved_lab(&s)), t0()))
            .given(vec![uploaded(r, s.patient_id, Category::Lab)])
            .when(RecordCommand::Read {
                by: Actor::Doctor(DoctorId::new()),
                request_id: Some(s.request_id),
            })
            .then_expect_error(RecordError::NoGrant);
    }

    #[test]
    fn a_grant_from_another_patient_cannot_be_used() {
        let s = Story::new();
        let r = RecordId::new();
        TestFramework::<MedicalRecord>::with(services(Some(approved_lab(&s)), t0()))
            .given(vec![uploaded(r, PatientId::new(), Category::Lab)])
            .when(read(&s))
            .then_expect_error(RecordError::NoGrant);
    }

    fn stored(r: RecordId) -> RecordEvent {
        RecordEvent::RecordStored {
            record_id: r,
            backend: "s3:records".into(),
            object_key: "blobs/aa".into(),
            etag: Some("\"e\"".into()),
            stored_at: t0(),
        }
    }

    fn mark_stored(by: Actor) -> RecordCommand {
        RecordCommand::MarkStored {
            by,
            backend: "s3:records".into(),
            object_key: "blobs/aa".into(),
            etag: Some("\"e\"".into()),
        }
    }

    #[test]
    fn the_platform_records_a_stored_copy_once() {
        let p = PatientId::new();
        let r = RecordId::new();
        TestFramework::<MedicalRecord>::with(services(None, t0()))
            .given(vec![uploaded(r, p, Category::Lab)])
            .when(mark_stored(Actor::System))
            .then_expect_events(vec![stored(r)]);
        // A replay, a crash before the confirmation was seen, or a racing instance.
        TestFramework::<MedicalRecord>::with(services(None, t0()))
            .given(vec![uploaded(r, p, Category::Lab), stored(r)])
            .when(mark_stored(Actor::System))
            .then_expect_events(vec![]);
    }

    #[test]
    fn only_the_platform_records_copies_and_only_of_existing_records() {
        let p = PatientId::new();
        let r = RecordId::new();
        TestFramework::<MedicalRecord>::with(services(None, t0()))
            .given(vec![uploaded(r, p, Category::Lab)])
            .when(mark_stored(Actor::Patient(p)))
            .then_expect_error(RecordError::NotAllowed);
        TestFramework::<MedicalRecord>::with(services(None, t0()))
            .given_no_previous_events()
            .when(mark_stored(Actor::System))
            .then_expect_error(RecordError::NotFound);
    }

    #[test]
    fn the_platform_records_the_token_once() {
        let p = PatientId::new();
        let r = RecordId::new();
        let token = ChainTx {
            chain_id: 31337,
            contract: "0x01".into(),
            token_id: "256".into(),
            tx_hash: "0xaa".into(),
            block: 7,
        };
        let minted = RecordEvent::RecordTokenMinted {
            record_id: r,
            token: token.clone(),
            minted_at: t0(),
        };
        TestFramework::<MedicalRecord>::with(services(None, t0()))
            .given(vec![uploaded(r, p, Category::Lab), stored(r)])
            .when(RecordCommand::MarkMinted {
                by: Actor::System,
                token: token.clone(),
            })
            .then_expect_events(vec![minted.clone()]);
        TestFramework::<MedicalRecord>::with(services(None, t0()))
            .given(vec![uploaded(r, p, Category::Lab), stored(r), minted])
            .when(RecordCommand::MarkMinted {
                by: Actor::System,
                token: token.clone(),
            })
            .then_expect_events(vec![]);
        TestFramework::<MedicalRecord>::with(services(None, t0()))
            .given(vec![uploaded(r, p, Category::Lab)])
            .when(RecordCommand::MarkMinted {
                by: Actor::Patient(p),
                token,
            })
            .then_expect_error(RecordError::NotAllowed);
    }

    #[test]
    fn a_copy_that_fails_its_hash_is_reported_with_both_hashes() {
        let p = PatientId::new();
        let r = RecordId::new();
        let bad = Sha256Hex::parse(&"b".repeat(64)).unwrap();
        TestFramework::<MedicalRecord>::with(services(None, t0()))
            .given(vec![uploaded(r, p, Category::Lab), stored(r)])
            .when(RecordCommand::ReportIntegrityFailure {
                by: Actor::System,
                backend: "s3:records".into(),
                object_key: "blobs/aa".into(),
                actual_sha256: bad.clone(),
            })
            .then_expect_events(vec![RecordEvent::RecordIntegrityFailed {
                record_id: r,
                backend: "s3:records".into(),
                object_key: "blobs/aa".into(),
                expected_sha256: Sha256Hex::parse(&"a".repeat(64)).unwrap(),
                actual_sha256: bad,
                detected_at: t0(),
            }]);
        TestFramework::<MedicalRecord>::with(services(None, t0()))
            .given(vec![uploaded(r, p, Category::Lab)])
            .when(RecordCommand::ReportIntegrityFailure {
                by: Actor::System,
                backend: "s3:records".into(),
                object_key: "blobs/aa".into(),
                actual_sha256: Sha256Hex::parse(&"a".repeat(64)).unwrap(),
            })
            .then_expect_error(RecordError::Service(
                "the copy matches the record's hash".into(),
            ));
    }

    #[test]
    fn a_doctor_without_a_request_cannot_read_and_a_missing_record_is_not_found() {
        let s = Story::new();
        let r = RecordId::new();
        TestFramework::<MedicalRecord>::with(services(None, t0()))
            .given(vec![uploaded(r, s.patient_id, Category::Lab)])
            .when(RecordCommand::Read {
                by: Actor::Doctor(s.doctor_id),
                request_id: None,
            })
            .then_expect_error(RecordError::NoGrant);
        TestFramework::<MedicalRecord>::with(services(None, t0()))
            .given_no_previous_events()
            .when(read(&s))
            .then_expect_error(RecordError::NotFound);
    }
}
