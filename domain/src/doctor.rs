//! The Doctor aggregate: registration with a licence, verification by a registrar,
//! suspension.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::error::{Rule, RuleKind};
use crate::ids::{DoctorId, StaffId};
use crate::sealed::Sealed;
use crate::value::LicenceNumber;

#[derive(Clone, Debug, PartialEq)]
pub enum DoctorCommand {
    Register {
        doctor_id: DoctorId,
        personal: Sealed,
        phone_index: String,
        licence: LicenceNumber,
    },
    Verify {
        by: StaffId,
    },
    Suspend {
        by: StaffId,
        reason: Option<Sealed>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DoctorEvent {
    DoctorRegistered {
        doctor_id: DoctorId,
        personal: Sealed,
        phone_index: String,
        licence: LicenceNumber,
    },
    DoctorVerified {
        doctor_id: DoctorId,
        by: StaffId,
    },
    DoctorSuspended {
        doctor_id: DoctorId,
        by: StaffId,
        reason: Option<Sealed>,
    },
}

impl DomainEvent for DoctorEvent {
    fn event_type(&self) -> String {
        match self {
            DoctorEvent::DoctorRegistered { .. } => "DoctorRegistered",
            DoctorEvent::DoctorVerified { .. } => "DoctorVerified",
            DoctorEvent::DoctorSuspended { .. } => "DoctorSuspended",
        }
        .to_owned()
    }
    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DoctorError {
    #[error("the doctor is already registered")]
    AlreadyRegistered,
    #[error("no such doctor")]
    NotRegistered,
    #[error("the doctor is already verified")]
    AlreadyVerified,
    /// Suspension is final here; reinstatement would be its own command.
    #[error("the doctor is suspended")]
    Suspended,
}

impl Rule for DoctorError {
    fn kind(&self) -> RuleKind {
        match self {
            DoctorError::AlreadyRegistered
            | DoctorError::AlreadyVerified
            | DoctorError::Suspended => RuleKind::Conflict,
            DoctorError::NotRegistered => RuleKind::NotFound,
        }
    }
    fn code(&self) -> &'static str {
        match self {
            DoctorError::AlreadyRegistered => "doctor_already_registered",
            DoctorError::NotRegistered => "doctor_not_found",
            DoctorError::AlreadyVerified => "doctor_already_verified",
            DoctorError::Suspended => "doctor_suspended",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DoctorStatus {
    #[default]
    Unverified,
    Verified,
    Suspended,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Doctor {
    id: Option<DoctorId>,
    status: DoctorStatus,
}

impl Doctor {
    pub fn id(&self) -> Option<DoctorId> {
        self.id
    }

    pub fn status(&self) -> DoctorStatus {
        self.status
    }

    /// Registered, verified and not suspended: may request access.
    pub fn is_verified(&self) -> bool {
        self.id.is_some() && self.status == DoctorStatus::Verified
    }
}

impl Aggregate for Doctor {
    const TYPE: &'static str = "doctor";
    type Command = DoctorCommand;
    type Event = DoctorEvent;
    type Error = DoctorError;
    type Services = ();

    async fn handle(
        &mut self,
        command: DoctorCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), DoctorError> {
        match command {
            DoctorCommand::Register {
                doctor_id,
                personal,
                phone_index,
                licence,
            } => {
                if self.id.is_some() {
                    return Err(DoctorError::AlreadyRegistered);
                }
                let event = DoctorEvent::DoctorRegistered {
                    doctor_id,
                    personal,
                    phone_index,
                    licence,
                };
                sink.write(event, self).await;
            }
            DoctorCommand::Verify { by } => {
                let doctor_id = self.id.ok_or(DoctorError::NotRegistered)?;
                match self.status {
                    DoctorStatus::Verified => return Err(DoctorError::AlreadyVerified),
                    DoctorStatus::Suspended => return Err(DoctorError::Suspended),
                    DoctorStatus::Unverified => {}
                }
                sink.write(DoctorEvent::DoctorVerified { doctor_id, by }, self)
                    .await;
            }
            DoctorCommand::Suspend { by, reason } => {
                let doctor_id = self.id.ok_or(DoctorError::NotRegistered)?;
                if self.status == DoctorStatus::Suspended {
                    return Err(DoctorError::Suspended);
                }
                let event = DoctorEvent::DoctorSuspended {
                    doctor_id,
                    by,
                    reason,
                };
                sink.write(event, self).await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: DoctorEvent) {
        match event {
            DoctorEvent::DoctorRegistered { doctor_id, .. } => {
                self.id = Some(doctor_id);
                self.status = DoctorStatus::Unverified;
            }
            DoctorEvent::DoctorVerified { .. } => self.status = DoctorStatus::Verified,
            DoctorEvent::DoctorSuspended { .. } => self.status = DoctorStatus::Suspended,
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    fn registered(id: DoctorId) -> DoctorEvent {
        DoctorEvent::DoctorRegistered {
            doctor_id: id,
            personal: Sealed::from_ciphertext("v1.x".into()),
            phone_index: "ab".into(),
            licence: LicenceNumber::parse("KMPDC-1234").unwrap(),
        }
    }

    #[test]
    fn a_registrar_verifies_a_registered_doctor() {
        let id = DoctorId::new();
        let by = StaffId::new();
        TestFramework::<Doctor>::with(())
            .given(vec![registered(id)])
            .when(DoctorCommand::Verify { by })
            .then_expect_events(vec![DoctorEvent::DoctorVerified { doctor_id: id, by }]);
    }

    #[test]
    fn an_unregistered_doctor_cannot_be_verified() {
        TestFramework::<Doctor>::with(())
            .given_no_previous_events()
            .when(DoctorCommand::Verify { by: StaffId::new() })
            .then_expect_error(DoctorError::NotRegistered);
    }

    #[test]
    fn a_suspended_doctor_cannot_be_verified_again() {
        let id = DoctorId::new();
        let by = StaffId::new();
        TestFramework::<Doctor>::with(())
            .given(vec![
                registered(id),
                DoctorEvent::DoctorVerified { doctor_id: id, by },
                DoctorEvent::DoctorSuspended {
                    doctor_id: id,
                    by,
                    reason: None,
                },
            ])
            .when(DoctorCommand::Verify { by })
            .then_expect_error(DoctorError::Suspended);
    }

    #[test]
    fn a_doctor_is_verified_once() {
        let id = DoctorId::new();
        let by = StaffId::new();
        TestFramework::<Doctor>::with(())
            .given(vec![
                registered(id),
                DoctorEvent::DoctorVerified { doctor_id: id, by },
            ])
            .when(DoctorCommand::Verify { by })
            .then_expect_error(DoctorError::AlreadyVerified);
    }
}
