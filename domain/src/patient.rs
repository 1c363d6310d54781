//! The Patient aggregate: registration and profile, personal fields sealed.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::error::{Rule, RuleKind};
use crate::ids::PatientId;
use crate::sealed::Sealed;

#[derive(Clone, Debug, PartialEq)]
pub enum PatientCommand {
    Register {
        patient_id: PatientId,
        personal: Sealed,
        /// Keyed hash of the phone number (opaque), for sign-in lookups.
        phone_index: String,
    },
    UpdateProfile {
        personal: Sealed,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PatientEvent {
    PatientRegistered {
        patient_id: PatientId,
        personal: Sealed,
        phone_index: String,
    },
    PatientProfileUpdated {
        patient_id: PatientId,
        personal: Sealed,
    },
}

impl DomainEvent for PatientEvent {
    fn event_type(&self) -> String {
        match self {
            PatientEvent::PatientRegistered { .. } => "PatientRegistered",
            PatientEvent::PatientProfileUpdated { .. } => "PatientProfileUpdated",
        }
        .to_owned()
    }
    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PatientError {
    #[error("the patient is already registered")]
    AlreadyRegistered,
    #[error("no such patient")]
    NotRegistered,
}

impl Rule for PatientError {
    fn kind(&self) -> RuleKind {
        match self {
            PatientError::AlreadyRegistered => RuleKind::Conflict,
            PatientError::NotRegistered => RuleKind::NotFound,
        }
    }
    fn code(&self) -> &'static str {
        match self {
            PatientError::AlreadyRegistered => "patient_already_registered",
            PatientError::NotRegistered => "patient_not_found",
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Patient {
    id: Option<PatientId>,
}

impl Patient {
    pub fn id(&self) -> Option<PatientId> {
        self.id
    }
}

impl Aggregate for Patient {
    const TYPE: &'static str = "patient";
    type Command = PatientCommand;
    type Event = PatientEvent;
    type Error = PatientError;
    type Services = ();

    async fn handle(
        &mut self,
        command: PatientCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), PatientError> {
        match command {
            PatientCommand::Register {
                patient_id,
                personal,
                phone_index,
            } => {
                if self.id.is_some() {
                    return Err(PatientError::AlreadyRegistered);
                }
                let event = PatientEvent::PatientRegistered {
                    patient_id,
                    personal,
                    phone_index,
                };
                sink.write(event, self).await;
            }
            PatientCommand::UpdateProfile { personal } => {
                let patient_id = self.id.ok_or(PatientError::NotRegistered)?;
                let event = PatientEvent::PatientProfileUpdated {
                    patient_id,
                    personal,
                };
                sink.write(event, self).await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: PatientEvent) {
        if let PatientEvent::PatientRegistered { patient_id, .. } = event {
            self.id = Some(patient_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    fn registered(id: PatientId) -> PatientEvent {
        PatientEvent::PatientRegistered {
            patient_id: id,
            personal: Sealed::from_ciphertext("v1.x".into()),
            phone_index: "ab".into(),
        }
    }

    #[test]
    fn a_patient_registers_once() {
        let id = PatientId::new();
        TestFramework::<Patient>::with(())
            .given_no_previous_events()
            .when(PatientCommand::Register {
                patient_id: id,
                personal: Sealed::from_ciphertext("v1.x".into()),
                phone_index: "ab".into(),
            })
            .then_expect_events(vec![registered(id)]);
        TestFramework::<Patient>::with(())
            .given(vec![registered(id)])
            .when(PatientCommand::Register {
                patient_id: id,
                personal: Sealed::from_ciphertext("v1.x".into()),
                phone_index: "ab".into(),
            })
            .then_expect_error(PatientError::AlreadyRegistered);
    }

    #[test]
    fn an_unregistered_patient_cannot_update_a_profile() {
        TestFramework::<Patient>::with(())
            .given_no_previous_events()
            .when(PatientCommand::UpdateProfile {
                personal: Sealed::from_ciphertext("v1.y".into()),
            })
            .then_expect_error(PatientError::NotRegistered);
    }
}
