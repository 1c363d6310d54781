//! The Account aggregate: one per phone number, keyed by the phone's blind index (a
//! keyed hash, never the number). It ties a phone to the one subject that signs in
//! with it and holds that subject's password hash, sealed under the subject's key.
//! Because the aggregate's id is the phone index, its sequence makes "one account per
//! phone" hold on the write side, whatever the read models say.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::actor::Actor;
use crate::error::{Rule, RuleKind};
use crate::sealed::Sealed;

#[derive(Clone, Debug, PartialEq)]
pub enum AccountCommand {
    Open {
        phone_index: String,
        /// The patient, doctor or staff member who signs in with this phone.
        holder: Actor,
        /// An Argon2id PHC string, sealed under the holder's key.
        credential: Sealed,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AccountEvent {
    AccountOpened {
        phone_index: String,
        holder: Actor,
        credential: Sealed,
    },
}

impl DomainEvent for AccountEvent {
    fn event_type(&self) -> String {
        match self {
            AccountEvent::AccountOpened { .. } => "AccountOpened",
        }
        .to_owned()
    }
    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    #[error("an account with this phone number already exists")]
    PhoneTaken,
    #[error("the platform itself has no account")]
    SystemHolder,
}

impl Rule for AccountError {
    fn kind(&self) -> RuleKind {
        match self {
            AccountError::PhoneTaken => RuleKind::Conflict,
            AccountError::SystemHolder => RuleKind::Unprocessable,
        }
    }
    fn code(&self) -> &'static str {
        match self {
            AccountError::PhoneTaken => "phone_taken",
            AccountError::SystemHolder => "system_holder",
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Account {
    holder: Option<Actor>,
    credential: Option<Sealed>,
}

impl Account {
    /// Who signs in with this phone, once the account is open.
    pub fn holder(&self) -> Option<Actor> {
        self.holder
    }
    /// The sealed password hash.
    pub fn credential(&self) -> Option<&Sealed> {
        self.credential.as_ref()
    }
}

impl Aggregate for Account {
    const TYPE: &'static str = "account";
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = AccountError;
    type Services = ();

    async fn handle(
        &mut self,
        command: AccountCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), AccountError> {
        match command {
            AccountCommand::Open {
                phone_index,
                holder,
                credential,
            } => {
                if self.holder.is_some() {
                    return Err(AccountError::PhoneTaken);
                }
                if holder == Actor::System {
                    return Err(AccountError::SystemHolder);
                }
                let event = AccountEvent::AccountOpened {
                    phone_index,
                    holder,
                    credential,
                };
                sink.write(event, self).await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: AccountEvent) {
        match event {
            AccountEvent::AccountOpened {
                holder, credential, ..
            } => {
                self.holder = Some(holder);
                self.credential = Some(credential);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;
    use crate::ids::{DoctorId, PatientId};

    fn open(holder: Actor) -> AccountCommand {
        AccountCommand::Open {
            phone_index: "ab12".into(),
            holder,
            credential: Sealed::from_ciphertext("v1.h".into()),
        }
    }

    fn opened(holder: Actor) -> AccountEvent {
        AccountEvent::AccountOpened {
            phone_index: "ab12".into(),
            holder,
            credential: Sealed::from_ciphertext("v1.h".into()),
        }
    }

    #[test]
    fn a_phone_opens_one_account() {
        let patient = Actor::Patient(PatientId::new());
        TestFramework::<Account>::with(())
            .given_no_previous_events()
            .when(open(patient))
            .then_expect_events(vec![opened(patient)]);
    }

    #[test]
    fn a_second_account_on_the_same_phone_is_refused_whatever_the_role() {
        TestFramework::<Account>::with(())
            .given(vec![opened(Actor::Patient(PatientId::new()))])
            .when(open(Actor::Doctor(DoctorId::new())))
            .then_expect_error(AccountError::PhoneTaken);
    }

    #[test]
    fn the_platform_has_no_account() {
        TestFramework::<Account>::with(())
            .given_no_previous_events()
            .when(open(Actor::System))
            .then_expect_error(AccountError::SystemHolder);
    }
}
