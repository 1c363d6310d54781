//! The Staff aggregate: registrars (who verify doctors) and auditors, created by an
//! operator from the command line, never by sign-up.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::error::{Rule, RuleKind};
use crate::ids::StaffId;
use crate::sealed::Sealed;
use crate::value::StaffRole;

#[derive(Clone, Debug, PartialEq)]
pub enum StaffCommand {
    Register {
        staff_id: StaffId,
        role: StaffRole,
        personal: Sealed,
        phone_index: String,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StaffEvent {
    StaffRegistered {
        staff_id: StaffId,
        role: StaffRole,
        personal: Sealed,
        phone_index: String,
    },
}

impl DomainEvent for StaffEvent {
    fn event_type(&self) -> String {
        match self {
            StaffEvent::StaffRegistered { .. } => "StaffRegistered",
        }
        .to_owned()
    }
    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StaffError {
    #[error("the staff member is already registered")]
    AlreadyRegistered,
}

impl Rule for StaffError {
    fn kind(&self) -> RuleKind {
        match self {
            StaffError::AlreadyRegistered => RuleKind::Conflict,
        }
    }
    fn code(&self) -> &'static str {
        match self {
            StaffError::AlreadyRegistered => "staff_already_registered",
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Staff {
    id: Option<StaffId>,
    role: Option<StaffRole>,
}

impl Staff {
    pub fn id(&self) -> Option<StaffId> {
        self.id
    }
    pub fn role(&self) -> Option<StaffRole> {
        self.role
    }
}

impl Aggregate for Staff {
    const TYPE: &'static str = "staff";
    type Command = StaffCommand;
    type Event = StaffEvent;
    type Error = StaffError;
    type Services = ();

    async fn handle(
        &mut self,
        command: StaffCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), StaffError> {
        match command {
            StaffCommand::Register {
                staff_id,
                role,
                personal,
                phone_index,
            } => {
                if self.id.is_some() {
                    return Err(StaffError::AlreadyRegistered);
                }
                let event = StaffEvent::StaffRegistered {
                    staff_id,
                    role,
                    personal,
                    phone_index,
                };
                sink.write(event, self).await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: StaffEvent) {
        match event {
            StaffEvent::StaffRegistered { staff_id, role, .. } => {
                self.id = Some(staff_id);
                self.role = Some(role);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    fn register(id: StaffId) -> StaffCommand {
        StaffCommand::Register {
            staff_id: id,
            role: StaffRole::Registrar,
            personal: Sealed::from_ciphertext("v1.x".into()),
            phone_index: "cd".into(),
        }
    }

    #[test]
    fn an_operator_registers_a_registrar_once() {
        let id = StaffId::new();
        let registered = StaffEvent::StaffRegistered {
            staff_id: id,
            role: StaffRole::Registrar,
            personal: Sealed::from_ciphertext("v1.x".into()),
            phone_index: "cd".into(),
        };
        TestFramework::<Staff>::with(())
            .given_no_previous_events()
            .when(register(id))
            .then_expect_events(vec![registered.clone()]);
        TestFramework::<Staff>::with(())
            .given(vec![registered])
            .when(register(id))
            .then_expect_error(StaffError::AlreadyRegistered);
    }
}
