//! The AccessRequest aggregate: a doctor asks, the patient approves (possibly
//! narrowing), rejects or revokes; approved access expires by the clock.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::actor::Actor;
use crate::clock::Clock;
use crate::error::{Rule, RuleKind, ServiceError};
use crate::ids::{AccessRequestId, DoctorId, PatientId, RecordId};
use crate::sealed::Sealed;
use crate::value::{Category, DurationDays, Scope};

/// Where a request stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessStatus {
    #[default]
    Pending,
    Approved,
    Rejected,
    Revoked,
    Expired,
}

impl AccessStatus {
    pub const ALL: [AccessStatus; 5] = [
        AccessStatus::Pending,
        AccessStatus::Approved,
        AccessStatus::Rejected,
        AccessStatus::Revoked,
        AccessStatus::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AccessStatus::Pending => "pending",
            AccessStatus::Approved => "approved",
            AccessStatus::Rejected => "rejected",
            AccessStatus::Revoked => "revoked",
            AccessStatus::Expired => "expired",
        }
    }

    pub fn parse(raw: &str) -> Option<AccessStatus> {
        AccessStatus::ALL.into_iter().find(|s| s.as_str() == raw)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum AccessCommand {
    Request {
        request_id: AccessRequestId,
        doctor_id: DoctorId,
        patient_id: PatientId,
        scope: Scope,
        purpose: Sealed,
        duration: DurationDays,
        note: Option<Sealed>,
    },
    /// By the patient; `expires_at` defaults to now + the requested duration; `scope`
    /// may only narrow what was requested.
    Approve {
        by: Actor,
        expires_at: Option<DateTime<Utc>>,
        scope: Option<Scope>,
    },
    Reject {
        by: Actor,
        reason: Option<Sealed>,
    },
    Revoke {
        by: Actor,
    },
    /// By the system once the clock has passed the expiry.
    Expire {},
    /// The chain adapter put the grant on chain (consent registry). Once per request.
    MarkGrantedOnChain {
        by: Actor,
        receipt: ChainReceipt,
    },
    /// The chain adapter ended the grant on chain (after a revocation or expiry).
    MarkRevokedOnChain {
        by: Actor,
        receipt: ChainReceipt,
    },
}

/// Where an effect landed on chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainReceipt {
    pub chain_id: u64,
    /// The contract, `0x…`.
    pub contract: String,
    /// The transaction, `0x…`.
    pub tx_hash: String,
    pub block: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AccessEvent {
    AccessRequested {
        request_id: AccessRequestId,
        doctor_id: DoctorId,
        patient_id: PatientId,
        scope: Scope,
        purpose: Sealed,
        duration: DurationDays,
        note: Option<Sealed>,
        requested_at: DateTime<Utc>,
    },
    AccessApproved {
        request_id: AccessRequestId,
        patient_id: PatientId,
        doctor_id: DoctorId,
        scope: Scope,
        expires_at: DateTime<Utc>,
        approved_at: DateTime<Utc>,
    },
    AccessRejected {
        request_id: AccessRequestId,
        patient_id: PatientId,
        doctor_id: DoctorId,
        reason: Option<Sealed>,
        rejected_at: DateTime<Utc>,
    },
    AccessRevoked {
        request_id: AccessRequestId,
        patient_id: PatientId,
        doctor_id: DoctorId,
        revoked_at: DateTime<Utc>,
    },
    AccessExpired {
        request_id: AccessRequestId,
        patient_id: PatientId,
        doctor_id: DoctorId,
        expired_at: DateTime<Utc>,
    },
    ConsentGrantedOnChain {
        request_id: AccessRequestId,
        receipt: ChainReceipt,
        at: DateTime<Utc>,
    },
    ConsentRevokedOnChain {
        request_id: AccessRequestId,
        receipt: ChainReceipt,
        at: DateTime<Utc>,
    },
}

impl DomainEvent for AccessEvent {
    fn event_type(&self) -> String {
        match self {
            AccessEvent::AccessRequested { .. } => "AccessRequested",
            AccessEvent::AccessApproved { .. } => "AccessApproved",
            AccessEvent::AccessRejected { .. } => "AccessRejected",
            AccessEvent::AccessRevoked { .. } => "AccessRevoked",
            AccessEvent::AccessExpired { .. } => "AccessExpired",
            AccessEvent::ConsentGrantedOnChain { .. } => "ConsentGrantedOnChain",
            AccessEvent::ConsentRevokedOnChain { .. } => "ConsentRevokedOnChain",
        }
        .to_owned()
    }
    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error("no such access request")]
    NotFound,
    #[error("this access request already exists")]
    AlreadyRequested,
    #[error("only a verified doctor may request access")]
    DoctorNotVerified,
    #[error("no such patient")]
    PatientNotFound,
    #[error("only the patient may decide on this request")]
    NotThePatient,
    #[error("the request is no longer pending")]
    NotPending,
    #[error("the access is not approved")]
    NotApproved,
    #[error("only the platform records effects on chain")]
    OnlyThePlatform,
    #[error("the scope must name at least one category or record")]
    EmptyScope,
    #[error("an approval may only narrow the requested scope")]
    ScopeNotNarrower,
    #[error("the expiry must be in the future")]
    ExpiryInPast,
    #[error("the expiry must not be later than the requested duration allows")]
    ExpiryBeyondRequested,
    #[error("the access has expired")]
    AlreadyExpired,
    #[error("the access has not expired yet")]
    NotYetExpired,
    #[error("this grant belongs to another doctor")]
    NotTheGrantee,
    #[error("the grant is not active")]
    GrantNotActive,
    #[error("the grant has expired")]
    GrantExpired,
    #[error("the grant does not cover this record")]
    NotCovered,
    #[error("service failure: {0}")]
    Service(String),
}

impl Rule for AccessError {
    fn kind(&self) -> RuleKind {
        match self {
            AccessError::NotFound | AccessError::PatientNotFound => RuleKind::NotFound,
            AccessError::DoctorNotVerified
            | AccessError::NotThePatient
            | AccessError::OnlyThePlatform
            | AccessError::NotTheGrantee => RuleKind::Forbidden,
            AccessError::AlreadyRequested
            | AccessError::NotPending
            | AccessError::NotApproved
            | AccessError::AlreadyExpired
            | AccessError::NotYetExpired
            | AccessError::GrantNotActive
            | AccessError::GrantExpired => RuleKind::Conflict,
            AccessError::EmptyScope
            | AccessError::ScopeNotNarrower
            | AccessError::ExpiryInPast
            | AccessError::ExpiryBeyondRequested
            | AccessError::NotCovered => RuleKind::Unprocessable,
            AccessError::Service(_) => RuleKind::ServiceFailure,
        }
    }
    fn code(&self) -> &'static str {
        match self {
            AccessError::NotFound => "access_request_not_found",
            AccessError::AlreadyRequested => "access_already_requested",
            AccessError::DoctorNotVerified => "doctor_not_verified",
            AccessError::PatientNotFound => "patient_not_found",
            AccessError::NotThePatient => "not_the_patient",
            AccessError::NotPending => "request_not_pending",
            AccessError::NotApproved => "access_not_approved",
            AccessError::OnlyThePlatform => "only_the_platform",
            AccessError::EmptyScope => "empty_scope",
            AccessError::ScopeNotNarrower => "scope_not_narrower",
            AccessError::ExpiryInPast => "expiry_in_past",
            AccessError::ExpiryBeyondRequested => "expiry_beyond_requested",
            AccessError::AlreadyExpired => "access_expired",
            AccessError::NotYetExpired => "access_not_yet_expired",
            AccessError::NotTheGrantee => "not_the_grantee",
            AccessError::GrantNotActive => "grant_not_active",
            AccessError::GrantExpired => "grant_expired",
            AccessError::NotCovered => "not_covered",
            AccessError::Service(_) => "service_failure",
        }
    }
}

impl From<ServiceError> for AccessError {
    fn from(e: ServiceError) -> Self {
        AccessError::Service(e.0)
    }
}

/// What an access request asks of the outside world while handling a command.
#[async_trait]
pub trait AccessServices: Send + Sync {
    /// Whether the doctor is registered, verified and not suspended, now.
    async fn doctor_is_verified(&self, doctor: DoctorId) -> Result<bool, ServiceError>;
    /// Whether the patient is registered.
    async fn patient_is_registered(&self, patient: PatientId) -> Result<bool, ServiceError>;
    fn clock(&self) -> &dyn Clock;
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AccessRequest {
    id: Option<AccessRequestId>,
    doctor_id: Option<DoctorId>,
    patient_id: Option<PatientId>,
    scope: Scope,
    duration: Option<DurationDays>,
    status: AccessStatus,
    expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    granted_on_chain: Option<ChainReceipt>,
    #[serde(default)]
    revoked_on_chain: Option<ChainReceipt>,
}

impl AccessRequest {
    /// The grant's transaction on chain, once there.
    pub fn granted_on_chain(&self) -> Option<&ChainReceipt> {
        self.granted_on_chain.as_ref()
    }
    /// The revocation's transaction on chain, once there.
    pub fn revoked_on_chain(&self) -> Option<&ChainReceipt> {
        self.revoked_on_chain.as_ref()
    }
    pub fn id(&self) -> Option<AccessRequestId> {
        self.id
    }
    pub fn status(&self) -> AccessStatus {
        self.status
    }
    pub fn patient_id(&self) -> Option<PatientId> {
        self.patient_id
    }
    pub fn doctor_id(&self) -> Option<DoctorId> {
        self.doctor_id
    }
    pub fn scope(&self) -> &Scope {
        &self.scope
    }
    pub fn expires_at(&self) -> Option<DateTime<Utc>> {
        self.expires_at
    }

    /// Whether `doctor` may read `record_id` (of `category`) under this grant at `now`.
    pub fn grant_for(
        &self,
        doctor: DoctorId,
        category: Category,
        record_id: RecordId,
        now: DateTime<Utc>,
    ) -> Result<(), AccessError> {
        if self.id.is_none() {
            return Err(AccessError::NotFound);
        }
        if self.doctor_id != Some(doctor) {
            return Err(AccessError::NotTheGrantee);
        }
        match self.status {
            AccessStatus::Approved => {}
            AccessStatus::Expired => return Err(AccessError::GrantExpired),
            _ => return Err(AccessError::GrantNotActive),
        }
        if self.expires_at.is_none_or(|at| at <= now) {
            return Err(AccessError::GrantExpired);
        }
        if !self.scope.covers(category, record_id) {
            return Err(AccessError::NotCovered);
        }
        Ok(())
    }

    fn ids(&self) -> Result<(AccessRequestId, PatientId, DoctorId), AccessError> {
        match (self.id, self.patient_id, self.doctor_id) {
            (Some(r), Some(p), Some(d)) => Ok((r, p, d)),
            _ => Err(AccessError::NotFound),
        }
    }

    fn must_be_patient(&self, by: Actor) -> Result<(), AccessError> {
        match by {
            Actor::Patient(p) if Some(p) == self.patient_id => Ok(()),
            _ => Err(AccessError::NotThePatient),
        }
    }
}

impl Aggregate for AccessRequest {
    const TYPE: &'static str = "access_request";
    type Command = AccessCommand;
    type Event = AccessEvent;
    type Error = AccessError;
    type Services = Arc<dyn AccessServices>;

    async fn handle(
        &mut self,
        command: AccessCommand,
        services: &Arc<dyn AccessServices>,
        sink: &EventSink<Self>,
    ) -> Result<(), AccessError> {
        let now = services.clock().now();
        match command {
            AccessCommand::Request {
                request_id,
                doctor_id,
                patient_id,
                scope,
                purpose,
                duration,
                note,
            } => {
                if self.id.is_some() {
                    return Err(AccessError::AlreadyRequested);
                }
                if scope.is_empty() {
                    return Err(AccessError::EmptyScope);
                }
                if !services.doctor_is_verified(doctor_id).await? {
                    return Err(AccessError::DoctorNotVerified);
                }
                if !services.patient_is_registered(patient_id).await? {
                    return Err(AccessError::PatientNotFound);
                }
                let event = AccessEvent::AccessRequested {
                    request_id,
                    doctor_id,
                    patient_id,
                    scope,
                    purpose,
                    duration,
                    note,
                    requested_at: now,
                };
                sink.write(event, self).await;
            }
            AccessCommand::Approve {
                by,
                expires_at,
                scope,
            } => {
                let (request_id, patient_id, doctor_id) = self.ids()?;
                self.must_be_patient(by)?;
                if self.status != AccessStatus::Pending {
                    return Err(AccessError::NotPending);
                }
                let latest = now
                    + self
                        .duration
                        .map(DurationDays::as_duration)
                        .unwrap_or_default();
                let expires_at = expires_at.unwrap_or(latest);
                if expires_at <= now {
                    return Err(AccessError::ExpiryInPast);
                }
                if expires_at > latest {
                    return Err(AccessError::ExpiryBeyondRequested);
                }
                let scope = scope.unwrap_or_else(|| self.scope.clone());
                if scope.is_empty() {
                    return Err(AccessError::EmptyScope);
                }
                if !scope.is_subset_of(&self.scope) {
                    return Err(AccessError::ScopeNotNarrower);
                }
                let event = AccessEvent::AccessApproved {
                    request_id,
                    patient_id,
                    doctor_id,
                    scope,
                    expires_at,
                    approved_at: now,
                };
                sink.write(event, self).await;
            }
            AccessCommand::Reject { by, reason } => {
                let (request_id, patient_id, doctor_id) = self.ids()?;
                self.must_be_patient(by)?;
                if self.status != AccessStatus::Pending {
                    return Err(AccessError::NotPending);
                }
                let event = AccessEvent::AccessRejected {
                    request_id,
                    patient_id,
                    doctor_id,
                    reason,
                    rejected_at: now,
                };
                sink.write(event, self).await;
            }
            AccessCommand::Revoke { by } => {
                let (request_id, patient_id, doctor_id) = self.ids()?;
                self.must_be_patient(by)?;
                match self.status {
                    AccessStatus::Approved => {}
                    AccessStatus::Expired => return Err(AccessError::AlreadyExpired),
                    _ => return Err(AccessError::NotApproved),
                }
                if self.expires_at.is_none_or(|at| at <= now) {
                    return Err(AccessError::AlreadyExpired);
                }
                let event = AccessEvent::AccessRevoked {
                    request_id,
                    patient_id,
                    doctor_id,
                    revoked_at: now,
                };
                sink.write(event, self).await;
            }
            AccessCommand::Expire {} => {
                let (request_id, patient_id, doctor_id) = self.ids()?;
                if self.status != AccessStatus::Approved {
                    return Err(AccessError::NotApproved);
                }
                if self.expires_at.is_some_and(|at| at > now) {
                    return Err(AccessError::NotYetExpired);
                }
                let event = AccessEvent::AccessExpired {
                    request_id,
                    patient_id,
                    doctor_id,
                    expired_at: now,
                };
                sink.write(event, self).await;
            }
            AccessCommand::MarkGrantedOnChain { by, receipt } => {
                let (request_id, _, _) = self.ids()?;
                if by != Actor::System {
                    return Err(AccessError::OnlyThePlatform);
                }
                if self.expires_at.is_none() {
                    return Err(AccessError::NotApproved);
                }
                if self.granted_on_chain.is_some() {
                    return Ok(());
                }
                let event = AccessEvent::ConsentGrantedOnChain {
                    request_id,
                    receipt,
                    at: now,
                };
                sink.write(event, self).await;
            }
            AccessCommand::MarkRevokedOnChain { by, receipt } => {
                let (request_id, _, _) = self.ids()?;
                if by != Actor::System {
                    return Err(AccessError::OnlyThePlatform);
                }
                if self.granted_on_chain.is_none() {
                    return Err(AccessError::NotApproved);
                }
                if self.revoked_on_chain.is_some() {
                    return Ok(());
                }
                let event = AccessEvent::ConsentRevokedOnChain {
                    request_id,
                    receipt,
                    at: now,
                };
                sink.write(event, self).await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: AccessEvent) {
        match event {
            AccessEvent::AccessRequested {
                request_id,
                doctor_id,
                patient_id,
                scope,
                duration,
                ..
            } => {
                self.id = Some(request_id);
                self.doctor_id = Some(doctor_id);
                self.patient_id = Some(patient_id);
                self.scope = scope;
                self.duration = Some(duration);
                self.status = AccessStatus::Pending;
            }
            AccessEvent::AccessApproved {
                scope, expires_at, ..
            } => {
                self.scope = scope;
                self.expires_at = Some(expires_at);
                self.status = AccessStatus::Approved;
            }
            AccessEvent::AccessRejected { .. } => self.status = AccessStatus::Rejected,
            AccessEvent::AccessRevoked { .. } => self.status = AccessStatus::Revoked,
            AccessEvent::AccessExpired { .. } => self.status = AccessStatus::Expired,
            AccessEvent::ConsentGrantedOnChain { receipt, .. } => {
                self.granted_on_chain = Some(receipt)
            }
            AccessEvent::ConsentRevokedOnChain { receipt, .. } => {
                self.revoked_on_chain = Some(receipt)
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeSet;

    use chrono::{Duration, TimeZone};
    use cqrs_es::test::TestFramework;

    use super::*;
    use crate::clock::FixedClock;

    pub(crate) struct Fake {
        pub verified: bool,
        pub patient_exists: bool,
        pub clock: FixedClock,
    }

    #[async_trait]
    impl AccessServices for Fake {
        async fn doctor_is_verified(&self, _: DoctorId) -> Result<bool, ServiceError> {
            Ok(self.verified)
        }
        async fn patient_is_registered(&self, _: PatientId) -> Result<bool, ServiceError> {
            Ok(self.patient_exists)
        }
        fn clock(&self) -> &dyn Clock {
            &self.clock
        }
    }

    pub(crate) fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 24, 9, 0, 0).unwrap()
    }

    fn services(verified: bool, now: DateTime<Utc>) -> Arc<dyn AccessServices> {
        Arc::new(Fake {
            verified,
            patient_exists: true,
            clock: FixedClock(now),
        })
    }

    pub(crate) struct Story {
        pub request_id: AccessRequestId,
        pub doctor_id: DoctorId,
        pub patient_id: PatientId,
    }

    impl Story {
        pub(crate) fn new() -> Story {
            Story {
                request_id: AccessRequestId::new(),
                doctor_id: DoctorId::new(),
                patient_id: PatientId::new(),
            }
        }
        pub(crate) fn lab() -> Scope {
            Scope::new([Category::Lab].into(), BTreeSet::new()).unwrap()
        }
        fn request_command(&self, scope: Scope) -> AccessCommand {
            AccessCommand::Request {
                request_id: self.request_id,
                doctor_id: self.doctor_id,
                patient_id: self.patient_id,
                scope,
                purpose: Sealed::from_ciphertext("v1.p".into()),
                duration: DurationDays::new(30).unwrap(),
                note: None,
            }
        }
        pub(crate) fn requested(&self, scope: Scope) -> AccessEvent {
            AccessEvent::AccessRequested {
                request_id: self.request_id,
                doctor_id: self.doctor_id,
                patient_id: self.patient_id,
                scope,
                purpose: Sealed::from_ciphertext("v1.p".into()),
                duration: DurationDays::new(30).unwrap(),
                note: None,
                requested_at: t0(),
            }
        }
        pub(crate) fn approved(&self, scope: Scope, expires_at: DateTime<Utc>) -> AccessEvent {
            AccessEvent::AccessApproved {
                request_id: self.request_id,
                patient_id: self.patient_id,
                doctor_id: self.doctor_id,
                scope,
                expires_at,
                approved_at: t0(),
            }
        }
        pub(crate) fn revoked(&self) -> AccessEvent {
            AccessEvent::AccessRevoked {
                request_id: self.request_id,
                patient_id: self.patient_id,
                doctor_id: self.doctor_id,
                revoked_at: t0(),
            }
        }
        fn patient(&self) -> Actor {
            Actor::Patient(self.patient_id)
        }
    }

    #[test]
    fn a_verified_doctor_requests_access() {
        let s = Story::new();
        TestFramework::<AccessRequest>::with(services(true, t0()))
            .given_no_previous_events()
            .when(s.request_command(Story::lab()))
            .then_expect_events(vec![s.requested(Story::lab())]);
    }

    #[test]
    fn an_unverified_doctor_cannot_request_access() {
        let s = Story::new();
        TestFramework::<AccessRequest>::with(services(false, t0()))
            .given_no_previous_events()
            .when(s.request_command(Story::lab()))
            .then_expect_error(AccessError::DoctorNotVerified);
    }

    #[test]
    fn access_to_an_unknown_patient_cannot_be_requested() {
        let s = Story::new();
        TestFramework::<AccessRequest>::with(Arc::new(Fake {
            verified: true,
            patient_exists: false,
            clock: FixedClock(t0()),
        }) as Arc<dyn AccessServices>)
        .given_no_previous_events()
        .when(s.request_command(Story::lab()))
        .then_expect_error(AccessError::PatientNotFound);
    }

    #[test]
    fn a_request_must_cover_something() {
        let s = Story::new();
        TestFramework::<AccessRequest>::with(services(true, t0()))
            .given_no_previous_events()
            .when(s.request_command(Scope::default()))
            .then_expect_error(AccessError::EmptyScope);
    }

    #[test]
    fn the_patient_approves_with_the_requested_duration_by_default() {
        let s = Story::new();
        TestFramework::<AccessRequest>::with(services(true, t0()))
            .given(vec![s.requested(Story::lab())])
            .when(AccessCommand::Approve {
                by: s.patient(),
                expires_at: None,
                scope: None,
            })
            .then_expect_events(vec![s.approved(Story::lab(), t0() + Duration::days(30))]);
    }

    #[test]
    fn a_doctor_cannot_approve_a_request() {
        let s = Story::new();
        TestFramework::<AccessRequest>::with(services(true, t0()))
            .given(vec![s.requested(Story::lab())])
            .when(AccessCommand::Approve {
                by: Actor::Doctor(s.doctor_id),
                expires_at: None,
                scope: None,
            })
            .then_expect_error(AccessError::NotThePatient);
    }

    #[test]
    fn another_patient_cannot_approve_a_request() {
        let s = Story::new();
        TestFramework::<AccessRequest>::with(services(true, t0()))
            .given(vec![s.requested(Story::lab())])
            .when(AccessCommand::Approve {
                by: Actor::Patient(PatientId::new()),
                expires_at: None,
                scope: None,
            })
            .then_expect_error(AccessError::NotThePatient);
    }

    #[test]
    fn a_rejected_request_cannot_be_approved() {
        let s = Story::new();
        TestFramework::<AccessRequest>::with(services(true, t0()))
            .given(vec![
                s.requested(Story::lab()),
                AccessEvent::AccessRejected {
                    request_id: s.request_id,
                    patient_id: s.patient_id,
                    doctor_id: s.doctor_id,
                    reason: None,
                    rejected_at: t0(),
                },
            ])
            .when(AccessCommand::Approve {
                by: s.patient(),
                expires_at: None,
                scope: None,
            })
            .then_expect_error(AccessError::NotPending);
    }

    #[test]
    fn approval_may_only_narrow_the_scope() {
        let s = Story::new();
        let wider = Scope::new([Category::Lab, Category::Imaging].into(), BTreeSet::new()).unwrap();
        TestFramework::<AccessRequest>::with(services(true, t0()))
            .given(vec![s.requested(Story::lab())])
            .when(AccessCommand::Approve {
                by: s.patient(),
                expires_at: None,
                scope: Some(wider.clone()),
            })
            .then_expect_error(AccessError::ScopeNotNarrower);
        TestFramework::<AccessRequest>::with(services(true, t0()))
            .given(vec![s.requested(wider)])
            .when(AccessCommand::Approve {
                by: s.patient(),
                expires_at: Some(t0() + Duration::days(7)),
                scope: Some(Story::lab()),
            })
            .then_expect_events(vec![s.approved(Story::lab(), t0() + Duration::days(7))]);
    }

    #[test]
    fn approval_with_past_expiry_is_refused() {
        let s = Story::new();
        TestFramework::<AccessRequest>::with(services(true, t0()))
            .given(vec![s.requested(Story::lab())])
            .when(AccessCommand::Approve {
                by: s.patient(),
                expires_at: Some(t0() - Duration::minutes(1)),
                scope: None,
            })
            .then_expect_error(AccessError::ExpiryInPast);
    }

    #[test]
    fn approval_beyond_the_requested_duration_is_refused() {
        let s = Story::new();
        TestFramework::<AccessRequest>::with(services(true, t0()))
            .given(vec![s.requested(Story::lab())])
            .when(AccessCommand::Approve {
                by: s.patient(),
                expires_at: Some(t0() + Duration::days(31)),
                scope: None,
            })
            .then_expect_error(AccessError::ExpiryBeyondRequested);
    }

    #[test]
    fn the_patient_rejects_a_pending_request() {
        let s = Story::new();
        let reason = Some(Sealed::from_ciphertext("v1.r".into()));
        TestFramework::<AccessRequest>::with(services(true, t0()))
            .given(vec![s.requested(Story::lab())])
            .when(AccessCommand::Reject {
                by: s.patient(),
                reason: reason.clone(),
            })
            .then_expect_events(vec![AccessEvent::AccessRejected {
                request_id: s.request_id,
                patient_id: s.patient_id,
                doctor_id: s.doctor_id,
                reason,
                rejected_at: t0(),
            }]);
    }

    #[test]
    fn the_patient_revokes_an_approved_grant() {
        let s = Story::new();
        TestFramework::<AccessRequest>::with(services(true, t0()))
            .given(vec![
                s.requested(Story::lab()),
                s.approved(Story::lab(), t0() + Duration::days(30)),
            ])
            .when(AccessCommand::Revoke { by: s.patient() })
            .then_expect_events(vec![s.revoked()]);
    }

    #[test]
    fn a_doctor_cannot_revoke_and_a_pending_request_cannot_be_revoked() {
        let s = Story::new();
        TestFramework::<AccessRequest>::with(services(true, t0()))
            .given(vec![
                s.requested(Story::lab()),
                s.approved(Story::lab(), t0() + Duration::days(30)),
            ])
            .when(AccessCommand::Revoke {
                by: Actor::Doctor(s.doctor_id),
            })
            .then_expect_error(AccessError::NotThePatient);
        TestFramework::<AccessRequest>::with(services(true, t0()))
            .given(vec![s.requested(Story::lab())])
            .when(AccessCommand::Revoke { by: s.patient() })
            .then_expect_error(AccessError::NotApproved);
    }

    #[test]
    fn a_grant_expires_only_once_the_clock_passes_its_expiry() {
        let s = Story::new();
        let expiry = t0() + Duration::days(1);
        let given = vec![s.requested(Story::lab()), s.approved(Story::lab(), expiry)];
        TestFramework::<AccessRequest>::with(services(true, expiry - Duration::seconds(1)))
            .given(given.clone())
            .when(AccessCommand::Expire {})
            .then_expect_error(AccessError::NotYetExpired);
        TestFramework::<AccessRequest>::with(services(true, expiry))
            .given(given)
            .when(AccessCommand::Expire {})
            .then_expect_events(vec![AccessEvent::AccessExpired {
                request_id: s.request_id,
                patient_id: s.patient_id,
                doctor_id: s.doctor_id,
                expired_at: expiry,
            }]);
    }

    #[test]
    fn grant_for_checks_grantee_status_expiry_and_scope() {
        let s = Story::new();
        let mut state = AccessRequest::default();
        state.apply(s.requested(Story::lab()));
        let r = RecordId::new();
        assert_eq!(
            state.grant_for(s.doctor_id, Category::Lab, r, t0()),
            Err(AccessError::GrantNotActive)
        );
        state.apply(s.approved(Story::lab(), t0() + Duration::days(1)));
        assert_eq!(state.grant_for(s.doctor_id, Category::Lab, r, t0()), Ok(()));
        assert_eq!(
            state.grant_for(DoctorId::new(), Category::Lab, r, t0()),
            Err(AccessError::NotTheGrantee)
        );
        assert_eq!(
            state.grant_for(s.doctor_id, Category::Imaging, r, t0()),
            Err(AccessError::NotCovered)
        );
        assert_eq!(
            state.grant_for(s.doctor_id, Category::Lab, r, t0() + Duration::days(1)),
            Err(AccessError::GrantExpired)
        );
        state.apply(s.revoked());
        assert_eq!(
            state.grant_for(s.doctor_id, Category::Lab, r, t0()),
            Err(AccessError::GrantNotActive)
        );
    }

    fn on_chain() -> ChainReceipt {
        ChainReceipt {
            chain_id: 31337,
            contract: "0x02".into(),
            tx_hash: "0xbb".into(),
            block: 4,
        }
    }

    #[test]
    fn consent_on_chain_is_recorded_once_and_only_after_an_approval() {
        let s = Story::new();
        let approved = vec![
            s.requested(Story::lab()),
            s.approved(Story::lab(), t0() + Duration::days(30)),
        ];
        let granted = AccessEvent::ConsentGrantedOnChain {
            request_id: s.request_id,
            receipt: on_chain(),
            at: t0(),
        };
        let mark = |by| AccessCommand::MarkGrantedOnChain {
            by,
            receipt: on_chain(),
        };
        TestFramework::<AccessRequest>::with(services(true, t0()))
            .given(approved.clone())
            .when(mark(Actor::System))
            .then_expect_events(vec![granted.clone()]);
        let mut with_grant = approved.clone();
        with_grant.push(granted.clone());
        TestFramework::<AccessRequest>::with(services(true, t0()))
            .given(with_grant.clone())
            .when(mark(Actor::System))
            .then_expect_events(vec![]);
        TestFramework::<AccessRequest>::with(services(true, t0()))
            .given(vec![s.requested(Story::lab())])
            .when(mark(Actor::System))
            .then_expect_error(AccessError::NotApproved);
        TestFramework::<AccessRequest>::with(services(true, t0()))
            .given(approved.clone())
            .when(mark(Actor::Patient(s.patient_id)))
            .then_expect_error(AccessError::OnlyThePlatform);
        // A revoke on chain needs the grant there first, and is recorded once.
        let revoke = AccessCommand::MarkRevokedOnChain {
            by: Actor::System,
            receipt: on_chain(),
        };
        TestFramework::<AccessRequest>::with(services(true, t0()))
            .given(approved)
            .when(revoke.clone())
            .then_expect_error(AccessError::NotApproved);
        let revoked = AccessEvent::ConsentRevokedOnChain {
            request_id: s.request_id,
            receipt: on_chain(),
            at: t0(),
        };
        with_grant.push(s.revoked());
        TestFramework::<AccessRequest>::with(services(true, t0()))
            .given(with_grant.clone())
            .when(revoke.clone())
            .then_expect_events(vec![revoked.clone()]);
        with_grant.push(revoked);
        TestFramework::<AccessRequest>::with(services(true, t0()))
            .given(with_grant)
            .when(revoke)
            .then_expect_events(vec![]);
    }
}
