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
    /// The patient's own wallet (its address sealed under the patient's key) is to hold
    /// their record tokens. Only before the platform has used their custodial address
    /// on chain, and once.
    RegisterWallet {
        wallet: Sealed,
        /// Keyed hash of the address (opaque), so a wallet is one patient's only.
        wallet_index: String,
    },
    /// The chain adapter is about to use the patient's chain address: without a
    /// registered wallet, the custodial one is from now on theirs for good.
    UseChainAddress,
    /// A share code a doctor enters to find the patient (sealed under the patient's
    /// key; looked up by its keyed hash). It replaces any earlier code.
    IssueShareCode {
        code: Sealed,
        code_index: String,
        expires_at: chrono::DateTime<chrono::Utc>,
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
    WalletRegistered {
        patient_id: PatientId,
        wallet: Sealed,
        wallet_index: String,
    },
    CustodialAddressInUse {
        patient_id: PatientId,
    },
    ShareCodeIssued {
        patient_id: PatientId,
        code: Sealed,
        code_index: String,
        expires_at: chrono::DateTime<chrono::Utc>,
    },
}

impl DomainEvent for PatientEvent {
    fn event_type(&self) -> String {
        match self {
            PatientEvent::PatientRegistered { .. } => "PatientRegistered",
            PatientEvent::PatientProfileUpdated { .. } => "PatientProfileUpdated",
            PatientEvent::WalletRegistered { .. } => "WalletRegistered",
            PatientEvent::CustodialAddressInUse { .. } => "CustodialAddressInUse",
            PatientEvent::ShareCodeIssued { .. } => "ShareCodeIssued",
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
    #[error("a wallet is already registered for this patient")]
    WalletAlreadyRegistered,
    #[error("the patient's records are already held at their custodial address")]
    CustodialAddressInUse,
    #[error("this wallet is registered for another patient")]
    WalletTaken,
}

impl Rule for PatientError {
    fn kind(&self) -> RuleKind {
        match self {
            PatientError::AlreadyRegistered => RuleKind::Conflict,
            PatientError::NotRegistered => RuleKind::NotFound,
            PatientError::WalletAlreadyRegistered
            | PatientError::CustodialAddressInUse
            | PatientError::WalletTaken => RuleKind::Conflict,
        }
    }
    fn code(&self) -> &'static str {
        match self {
            PatientError::AlreadyRegistered => "patient_already_registered",
            PatientError::NotRegistered => "patient_not_found",
            PatientError::WalletAlreadyRegistered => "wallet_already_registered",
            PatientError::CustodialAddressInUse => "custodial_address_in_use",
            PatientError::WalletTaken => "wallet_taken",
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Patient {
    id: Option<PatientId>,
    #[serde(default)]
    wallet: Option<Sealed>,
    #[serde(default)]
    custodial_in_use: bool,
    /// The current share code (sealed) and its expiry.
    #[serde(default)]
    share_code: Option<(Sealed, chrono::DateTime<chrono::Utc>)>,
}

impl Patient {
    pub fn id(&self) -> Option<PatientId> {
        self.id
    }

    /// The registered wallet's address, sealed under the patient's key.
    pub fn wallet(&self) -> Option<&Sealed> {
        self.wallet.as_ref()
    }

    /// The current share code, sealed, and when it expires.
    pub fn share_code(&self) -> Option<&(Sealed, chrono::DateTime<chrono::Utc>)> {
        self.share_code.as_ref()
    }

    /// Whether the custodial address holds (or is about to hold) their tokens.
    pub fn custodial_in_use(&self) -> bool {
        self.custodial_in_use
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
            PatientCommand::RegisterWallet {
                wallet,
                wallet_index,
            } => {
                let patient_id = self.id.ok_or(PatientError::NotRegistered)?;
                if self.wallet.is_some() {
                    return Err(PatientError::WalletAlreadyRegistered);
                }
                if self.custodial_in_use {
                    return Err(PatientError::CustodialAddressInUse);
                }
                let event = PatientEvent::WalletRegistered {
                    patient_id,
                    wallet,
                    wallet_index,
                };
                sink.write(event, self).await;
            }
            PatientCommand::IssueShareCode {
                code,
                code_index,
                expires_at,
            } => {
                let patient_id = self.id.ok_or(PatientError::NotRegistered)?;
                let event = PatientEvent::ShareCodeIssued {
                    patient_id,
                    code,
                    code_index,
                    expires_at,
                };
                sink.write(event, self).await;
            }
            PatientCommand::UseChainAddress => {
                let patient_id = self.id.ok_or(PatientError::NotRegistered)?;
                if self.wallet.is_none() && !self.custodial_in_use {
                    let event = PatientEvent::CustodialAddressInUse { patient_id };
                    sink.write(event, self).await;
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: PatientEvent) {
        match event {
            PatientEvent::PatientRegistered { patient_id, .. } => self.id = Some(patient_id),
            PatientEvent::PatientProfileUpdated { .. } => {}
            PatientEvent::WalletRegistered { wallet, .. } => self.wallet = Some(wallet),
            PatientEvent::CustodialAddressInUse { .. } => self.custodial_in_use = true,
            PatientEvent::ShareCodeIssued {
                code, expires_at, ..
            } => self.share_code = Some((code, expires_at)),
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
    fn a_registered_patient_is_issued_share_codes() {
        let id = PatientId::new();
        let expires_at = chrono::DateTime::from_timestamp(1_766_000_000, 0).unwrap_or_default();
        let issue = || PatientCommand::IssueShareCode {
            code: Sealed::from_ciphertext("v1.code".into()),
            code_index: "cd".into(),
            expires_at,
        };
        TestFramework::<Patient>::with(())
            .given(vec![registered(id)])
            .when(issue())
            .then_expect_events(vec![PatientEvent::ShareCodeIssued {
                patient_id: id,
                code: Sealed::from_ciphertext("v1.code".into()),
                code_index: "cd".into(),
                expires_at,
            }]);
        TestFramework::<Patient>::with(())
            .given_no_previous_events()
            .when(issue())
            .then_expect_error(PatientError::NotRegistered);
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

    fn sealed(text: &str) -> Sealed {
        Sealed::from_ciphertext(text.into())
    }

    #[test]
    fn a_wallet_is_registered_once_and_only_before_the_custodial_address_is_used() {
        let id = PatientId::new();
        TestFramework::<Patient>::with(())
            .given(vec![registered(id)])
            .when(PatientCommand::RegisterWallet {
                wallet: sealed("v1.w"),
                wallet_index: "wi".into(),
            })
            .then_expect_events(vec![PatientEvent::WalletRegistered {
                patient_id: id,
                wallet: sealed("v1.w"),
                wallet_index: "wi".into(),
            }]);
        let with_wallet = vec![
            registered(id),
            PatientEvent::WalletRegistered {
                patient_id: id,
                wallet: sealed("v1.w"),
                wallet_index: "wi".into(),
            },
        ];
        TestFramework::<Patient>::with(())
            .given(with_wallet.clone())
            .when(PatientCommand::RegisterWallet {
                wallet: sealed("v1.v"),
                wallet_index: "wj".into(),
            })
            .then_expect_error(PatientError::WalletAlreadyRegistered);
        // With a wallet, using the chain address changes nothing.
        TestFramework::<Patient>::with(())
            .given(with_wallet)
            .when(PatientCommand::UseChainAddress)
            .then_expect_events(vec![]);
        // Without, the custodial address is in use, once; a wallet comes too late.
        TestFramework::<Patient>::with(())
            .given(vec![registered(id)])
            .when(PatientCommand::UseChainAddress)
            .then_expect_events(vec![PatientEvent::CustodialAddressInUse { patient_id: id }]);
        let in_use = vec![
            registered(id),
            PatientEvent::CustodialAddressInUse { patient_id: id },
        ];
        TestFramework::<Patient>::with(())
            .given(in_use.clone())
            .when(PatientCommand::UseChainAddress)
            .then_expect_events(vec![]);
        TestFramework::<Patient>::with(())
            .given(in_use)
            .when(PatientCommand::RegisterWallet {
                wallet: sealed("v1.w"),
                wallet_index: "wi".into(),
            })
            .then_expect_error(PatientError::CustodialAddressInUse);
        TestFramework::<Patient>::with(())
            .given_no_previous_events()
            .when(PatientCommand::UseChainAddress)
            .then_expect_error(PatientError::NotRegistered);
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
