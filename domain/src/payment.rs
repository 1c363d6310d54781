//! Payments by M-Pesa (STK Push): a patient or doctor asks for one, the M-Pesa adapter
//! pushes it to the customer's phone at most once, and Daraja's callback (or, when that
//! is late or never comes, an STK Push Query) settles it once. A confirmed payment also
//! credits the platform's paymaster budget.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use chrono::{DateTime, Utc};

use crate::access::{AccessRequest, AccessStatus};
use crate::actor::Actor;
use crate::error::{Rule, RuleKind};
use crate::ids::{AccessRequestId, DoctorId, PatientId, PaymentId};
use crate::sealed::Sealed;

/// What a payment is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    ConsultationFee,
    AccessFee,
}

impl Purpose {
    pub fn parse(text: &str) -> Option<Purpose> {
        match text {
            "consultation_fee" => Some(Purpose::ConsultationFee),
            "access_fee" => Some(Purpose::AccessFee),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::ConsultationFee => "consultation_fee",
            Purpose::AccessFee => "access_fee",
        }
    }
}

/// Where a payment stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    #[default]
    Pending,
    Confirmed,
    Failed,
    Cancelled,
    TimedOut,
}

impl PaymentStatus {
    /// The status a Daraja `ResultCode` settles a payment in.
    pub fn of_result(code: i64) -> PaymentStatus {
        match code {
            0 => PaymentStatus::Confirmed,
            1032 => PaymentStatus::Cancelled,
            1037 => PaymentStatus::TimedOut,
            _ => PaymentStatus::Failed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Pending => "pending",
            PaymentStatus::Confirmed => "confirmed",
            PaymentStatus::Failed => "failed",
            PaymentStatus::Cancelled => "cancelled",
            PaymentStatus::TimedOut => "timed_out",
        }
    }
}

/// How a payment was settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SettledBy {
    Callback,
    Query,
}

/// What a successful payment's callback says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// M-Pesa's receipt number.
    pub receipt: String,
    pub amount_kes: u64,
    /// `YYYYMMDDHHmmss`, Nairobi time.
    pub transaction_date: String,
    /// The paying number, sealed under the payer's key.
    pub phone: Sealed,
}

#[derive(Clone, Debug, PartialEq)]
pub enum PaymentCommand {
    Request {
        payment_id: PaymentId,
        payer: Actor,
        purpose: Purpose,
        /// Whole shillings, 1..=250,000.
        amount_kes: u64,
        /// The patient's registered number, sealed under the patient's key.
        phone: Sealed,
        /// Keyed hash of the number (opaque), to match the callback's.
        phone_index: String,
        /// The doctor paid, or (for a doctor payer) the doctor asking: themself.
        doctor_id: Option<DoctorId>,
        access_request_id: Option<AccessRequestId>,
        /// The patient a doctor's fee is asked of (the patient of the access request);
        /// required of a doctor, ignored when the payer is a patient, who is then the
        /// patient.
        patient_id: Option<PatientId>,
    },
    /// Daraja accepted the STK Push (the M-Pesa adapter only).
    AcceptPush {
        by: Actor,
        merchant_request_id: String,
        checkout_request_id: String,
    },
    /// The STK Push could not be made: Daraja refused it, or its fate is unknown.
    FailPush {
        by: Actor,
        error_code: String,
        error_message: String,
    },
    /// Daraja's answer: a callback, or an STK Push Query.
    Settle {
        by: Actor,
        result_code: i64,
        result_desc: String,
        receipt: Option<Receipt>,
        settled_by: SettledBy,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PaymentEvent {
    PaymentRequested {
        payment_id: PaymentId,
        /// `patient:<id>` or `doctor:<id>`.
        payer: String,
        purpose: Purpose,
        amount_kes: u64,
        phone: Sealed,
        phone_index: String,
        doctor_id: Option<DoctorId>,
        access_request_id: Option<AccessRequestId>,
        /// The patient the payment concerns: the payer if a patient, else the patient
        /// of the doctor's access request. Absent in events from before it was added.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        patient_id: Option<PatientId>,
        /// Whether `phone` is sealed under the patient's key (the patient's own
        /// number, erased with them). Absent (false) in events from before it was
        /// added, whose phone is sealed under the payer's key.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        phone_sealed_for_patient: bool,
    },
    StkPushAccepted {
        payment_id: PaymentId,
        merchant_request_id: String,
        checkout_request_id: String,
    },
    StkPushFailed {
        payment_id: PaymentId,
        error_code: String,
        error_message: String,
    },
    PaymentConfirmed {
        payment_id: PaymentId,
        receipt: Option<Receipt>,
        amount_kes: u64,
        settled_by: SettledBy,
    },
    PaymentFailed {
        payment_id: PaymentId,
        result_code: i64,
        result_desc: String,
        status: PaymentStatus,
        settled_by: SettledBy,
    },
    /// Settled by an STK Push Query, the callback being late or lost.
    PaymentReconciled {
        payment_id: PaymentId,
        result_code: i64,
    },
    /// A confirmed payment funds the platform's gas sponsorship.
    PaymasterBudgetCredited {
        payment_id: PaymentId,
        amount_kes: u64,
    },
}

impl DomainEvent for PaymentEvent {
    fn event_type(&self) -> String {
        match self {
            PaymentEvent::PaymentRequested { .. } => "PaymentRequested",
            PaymentEvent::StkPushAccepted { .. } => "StkPushAccepted",
            PaymentEvent::StkPushFailed { .. } => "StkPushFailed",
            PaymentEvent::PaymentConfirmed { .. } => "PaymentConfirmed",
            PaymentEvent::PaymentFailed { .. } => "PaymentFailed",
            PaymentEvent::PaymentReconciled { .. } => "PaymentReconciled",
            PaymentEvent::PaymasterBudgetCredited { .. } => "PaymasterBudgetCredited",
        }
        .to_owned()
    }
    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    #[error("the payment already exists")]
    AlreadyRequested,
    #[error("no such payment")]
    NotFound,
    #[error("only patients and doctors pay")]
    NotAPayer,
    #[error("the amount must be 1 to 250000 whole shillings")]
    InvalidAmount,
    #[error("only the platform records M-Pesa's answers")]
    OnlyThePlatform,
    #[error("the payment was already pushed")]
    AlreadyPushed,
    #[error("the payment was not pushed")]
    NotPushed,
    #[error("the payment is already settled")]
    AlreadySettled,
    #[error("only a verified doctor may ask for a fee")]
    DoctorNotVerified,
    #[error("a doctor may ask a fee only for themself")]
    NotYourFee,
    #[error("a fee may be asked only of a patient who has given you access that is still active")]
    NoGrant,
    #[error("you may pay only a doctor you have given access that is still active")]
    DoctorNotGranted,
    #[error("a doctor's fee names the patient it is asked of")]
    PatientRequired,
    #[error("the patient's registered phone number cannot be read")]
    PhoneUnavailable,
}

impl Rule for PaymentError {
    fn kind(&self) -> RuleKind {
        match self {
            PaymentError::AlreadyRequested
            | PaymentError::AlreadyPushed
            | PaymentError::NotPushed
            | PaymentError::AlreadySettled => RuleKind::Conflict,
            PaymentError::NotFound => RuleKind::NotFound,
            PaymentError::NotAPayer
            | PaymentError::OnlyThePlatform
            | PaymentError::DoctorNotVerified
            | PaymentError::NotYourFee
            | PaymentError::NoGrant
            | PaymentError::DoctorNotGranted => RuleKind::Forbidden,
            PaymentError::InvalidAmount | PaymentError::PatientRequired => RuleKind::Unprocessable,
            PaymentError::PhoneUnavailable => RuleKind::Conflict,
        }
    }
    fn code(&self) -> &'static str {
        match self {
            PaymentError::AlreadyRequested => "payment_exists",
            PaymentError::NotFound => "payment_not_found",
            PaymentError::NotAPayer => "role_forbidden",
            PaymentError::InvalidAmount => "invalid_amount",
            PaymentError::OnlyThePlatform => "only_the_platform",
            PaymentError::AlreadyPushed => "payment_already_pushed",
            PaymentError::NotPushed => "payment_not_pushed",
            PaymentError::AlreadySettled => "payment_already_settled",
            PaymentError::DoctorNotVerified => "doctor_not_verified",
            PaymentError::NotYourFee => "fee_for_another_doctor",
            PaymentError::NoGrant => "no_grant",
            PaymentError::DoctorNotGranted => "doctor_not_granted",
            PaymentError::PatientRequired => "patient_required",
            PaymentError::PhoneUnavailable => "patient_phone_unavailable",
        }
    }
}

/// Whether an access request is a grant in force at `now`: approved, and its expiry
/// still ahead.
pub fn grant_in_force(request: &AccessRequest, now: DateTime<Utc>) -> bool {
    request.id().is_some()
        && request.status() == AccessStatus::Approved
        && request.expires_at().is_some_and(|at| at > now)
}

/// Who a payment asked for is between, as the event store holds them when it is asked.
#[derive(Clone, Copy, Debug)]
pub struct Asked<'a> {
    pub payer: Actor,
    /// Whether the payer, if a doctor, is verified now.
    pub payer_verified: bool,
    /// The doctor the request names, if it names one.
    pub doctor_id: Option<DoctorId>,
    /// The access request it is under: the one it names, or (a patient naming only a
    /// doctor) a grant in force between the two if there is one.
    pub grant: Option<&'a AccessRequest>,
    pub now: DateTime<Utc>,
}

/// Whom a payment prompt may go to, and for whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PaymentParties {
    /// The patient prompted, on their own registered number.
    pub patient_id: PatientId,
    pub doctor_id: Option<DoctorId>,
    pub access_request_id: Option<AccessRequestId>,
}

/// Decides whether a payment may be asked for, and of whom, so that nobody pushes an
/// M-Pesa prompt to a stranger: a doctor asks only a patient who granted them access
/// still in force, only once verified, and only for themself; a patient pays a doctor
/// they granted such access, or their own account. The prompt always goes to the
/// patient, whose payments then list it.
pub fn payment_parties(asked: Asked<'_>) -> Result<PaymentParties, PaymentError> {
    let grant = asked.grant.filter(|g| grant_in_force(g, asked.now));
    match asked.payer {
        Actor::Doctor(doctor) => {
            if !asked.payer_verified {
                return Err(PaymentError::DoctorNotVerified);
            }
            if asked.doctor_id.is_some_and(|named| named != doctor) {
                return Err(PaymentError::NotYourFee);
            }
            let grant = grant
                .filter(|g| g.doctor_id() == Some(doctor))
                .ok_or(PaymentError::NoGrant)?;
            Ok(PaymentParties {
                patient_id: grant.patient_id().ok_or(PaymentError::NoGrant)?,
                doctor_id: Some(doctor),
                access_request_id: grant.id(),
            })
        }
        Actor::Patient(patient) => {
            let Some(grant) = grant.filter(|g| g.patient_id() == Some(patient)) else {
                // Naming a doctor, or a request, that no grant in force covers.
                if asked.doctor_id.is_some() || asked.grant.is_some() {
                    return Err(PaymentError::DoctorNotGranted);
                }
                return Ok(PaymentParties {
                    patient_id: patient,
                    doctor_id: None,
                    access_request_id: None,
                });
            };
            if asked
                .doctor_id
                .is_some_and(|named| Some(named) != grant.doctor_id())
            {
                return Err(PaymentError::DoctorNotGranted);
            }
            Ok(PaymentParties {
                patient_id: patient,
                doctor_id: grant.doctor_id(),
                access_request_id: grant.id(),
            })
        }
        _ => Err(PaymentError::NotAPayer),
    }
}

/// The largest STK Push amount, in shillings.
pub const MAX_AMOUNT_KES: u64 = 250_000;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Payment {
    id: Option<PaymentId>,
    payer: String,
    amount_kes: u64,
    phone_index: String,
    #[serde(default)]
    phone: Option<Sealed>,
    #[serde(default)]
    patient_id: Option<PatientId>,
    #[serde(default)]
    phone_sealed_for_patient: bool,
    checkout_request_id: Option<String>,
    push_failed: bool,
    status: PaymentStatus,
}

impl Payment {
    pub fn id(&self) -> Option<PaymentId> {
        self.id
    }
    pub fn payer(&self) -> &str {
        &self.payer
    }
    pub fn amount_kes(&self) -> u64 {
        self.amount_kes
    }
    pub fn phone_index(&self) -> &str {
        &self.phone_index
    }
    /// The number to push to, sealed under [`Payment::phone_subject`]'s key.
    pub fn phone(&self) -> Option<&Sealed> {
        self.phone.as_ref()
    }
    /// The payer's subject id.
    pub fn payer_subject(&self) -> &str {
        self.payer.split_once(':').map_or("", |(_, id)| id)
    }
    /// The patient the payment concerns (always set since prompts go to patients
    /// only; absent in a doctor's payment from before).
    pub fn patient_id(&self) -> Option<PatientId> {
        self.patient_id
    }
    /// Whose key seals the phone numbers of this payment: the patient's (their own
    /// number), or for payments from before that rule, the payer's.
    pub fn phone_subject(&self) -> String {
        match self.patient_id {
            Some(patient) if self.phone_sealed_for_patient => patient.to_string(),
            _ => self.payer_subject().to_owned(),
        }
    }
    pub fn checkout_request_id(&self) -> Option<&str> {
        self.checkout_request_id.as_deref()
    }
    pub fn status(&self) -> PaymentStatus {
        self.status
    }
    /// Whether the STK Push is decided (accepted or failed).
    pub fn pushed(&self) -> bool {
        self.checkout_request_id.is_some() || self.push_failed
    }
}

impl Aggregate for Payment {
    const TYPE: &'static str = "payment";
    type Command = PaymentCommand;
    type Event = PaymentEvent;
    type Error = PaymentError;
    type Services = ();

    async fn handle(
        &mut self,
        command: PaymentCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), PaymentError> {
        match command {
            PaymentCommand::Request {
                payment_id,
                payer,
                purpose,
                amount_kes,
                phone,
                phone_index,
                doctor_id,
                access_request_id,
                patient_id,
            } => {
                if self.id.is_some() {
                    return Err(PaymentError::AlreadyRequested);
                }
                if !matches!(payer, Actor::Patient(_) | Actor::Doctor(_)) {
                    return Err(PaymentError::NotAPayer);
                }
                if !(1..=MAX_AMOUNT_KES).contains(&amount_kes) {
                    return Err(PaymentError::InvalidAmount);
                }
                let patient_id = match payer {
                    Actor::Patient(p) => p,
                    Actor::Doctor(d) => {
                        if doctor_id.is_some_and(|named| named != d) {
                            return Err(PaymentError::NotYourFee);
                        }
                        patient_id.ok_or(PaymentError::PatientRequired)?
                    }
                    _ => return Err(PaymentError::NotAPayer),
                };
                let event = PaymentEvent::PaymentRequested {
                    payment_id,
                    payer: payer.reference(),
                    purpose,
                    amount_kes,
                    phone,
                    phone_index,
                    doctor_id,
                    access_request_id,
                    patient_id: Some(patient_id),
                    phone_sealed_for_patient: true,
                };
                sink.write(event, self).await;
            }
            PaymentCommand::AcceptPush {
                by,
                merchant_request_id,
                checkout_request_id,
            } => {
                let payment_id = self.platform(by)?;
                if self.pushed() {
                    return Err(PaymentError::AlreadyPushed);
                }
                let event = PaymentEvent::StkPushAccepted {
                    payment_id,
                    merchant_request_id,
                    checkout_request_id,
                };
                sink.write(event, self).await;
            }
            PaymentCommand::FailPush {
                by,
                error_code,
                error_message,
            } => {
                let payment_id = self.platform(by)?;
                if self.pushed() {
                    return Err(PaymentError::AlreadyPushed);
                }
                let event = PaymentEvent::StkPushFailed {
                    payment_id,
                    error_code,
                    error_message,
                };
                sink.write(event, self).await;
            }
            PaymentCommand::Settle {
                by,
                result_code,
                result_desc,
                receipt,
                settled_by,
            } => {
                let payment_id = self.platform(by)?;
                if self.checkout_request_id.is_none() {
                    return Err(PaymentError::NotPushed);
                }
                if self.status != PaymentStatus::Pending {
                    return Err(PaymentError::AlreadySettled);
                }
                let status = PaymentStatus::of_result(result_code);
                if status == PaymentStatus::Confirmed {
                    let amount_kes = receipt.as_ref().map_or(self.amount_kes, |r| r.amount_kes);
                    sink.write(
                        PaymentEvent::PaymentConfirmed {
                            payment_id,
                            receipt,
                            amount_kes,
                            settled_by,
                        },
                        self,
                    )
                    .await;
                    sink.write(
                        PaymentEvent::PaymasterBudgetCredited {
                            payment_id,
                            amount_kes,
                        },
                        self,
                    )
                    .await;
                } else {
                    sink.write(
                        PaymentEvent::PaymentFailed {
                            payment_id,
                            result_code,
                            result_desc,
                            status,
                            settled_by,
                        },
                        self,
                    )
                    .await;
                }
                if settled_by == SettledBy::Query {
                    sink.write(
                        PaymentEvent::PaymentReconciled {
                            payment_id,
                            result_code,
                        },
                        self,
                    )
                    .await;
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: PaymentEvent) {
        match event {
            PaymentEvent::PaymentRequested {
                payment_id,
                payer,
                amount_kes,
                phone,
                phone_index,
                patient_id,
                phone_sealed_for_patient,
                ..
            } => {
                self.id = Some(payment_id);
                self.payer = payer;
                self.amount_kes = amount_kes;
                self.phone = Some(phone);
                self.phone_index = phone_index;
                self.patient_id = patient_id;
                self.phone_sealed_for_patient = phone_sealed_for_patient;
            }
            PaymentEvent::StkPushAccepted {
                checkout_request_id,
                ..
            } => self.checkout_request_id = Some(checkout_request_id),
            PaymentEvent::StkPushFailed { .. } => {
                self.push_failed = true;
                self.status = PaymentStatus::Failed;
            }
            PaymentEvent::PaymentConfirmed { .. } => self.status = PaymentStatus::Confirmed,
            PaymentEvent::PaymentFailed { status, .. } => self.status = status,
            PaymentEvent::PaymentReconciled { .. }
            | PaymentEvent::PaymasterBudgetCredited { .. } => {}
        }
    }
}

impl Payment {
    fn platform(&self, by: Actor) -> Result<PaymentId, PaymentError> {
        let id = self.id.ok_or(PaymentError::NotFound)?;
        if by != Actor::System {
            return Err(PaymentError::OnlyThePlatform);
        }
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    fn requested(id: PaymentId, payer: Actor) -> PaymentEvent {
        PaymentEvent::PaymentRequested {
            payment_id: id,
            payer: payer.reference(),
            purpose: Purpose::ConsultationFee,
            amount_kes: 500,
            phone: Sealed::from_ciphertext("v1.p".into()),
            phone_index: "pi".into(),
            doctor_id: None,
            access_request_id: None,
            patient_id: match payer {
                Actor::Patient(p) => Some(p),
                _ => None,
            },
            phone_sealed_for_patient: true,
        }
    }

    fn accepted(id: PaymentId) -> PaymentEvent {
        PaymentEvent::StkPushAccepted {
            payment_id: id,
            merchant_request_id: "m".into(),
            checkout_request_id: "ws_CO_1".into(),
        }
    }

    fn settle(code: i64, by: SettledBy) -> PaymentCommand {
        PaymentCommand::Settle {
            by: Actor::System,
            result_code: code,
            result_desc: "d".into(),
            receipt: None,
            settled_by: by,
        }
    }

    #[test]
    fn a_payment_is_requested_by_a_patient_or_doctor_for_1_to_250000_shillings() {
        let id = PaymentId::new();
        let patient = Actor::Patient(PatientId::new());
        let request = |payer: Actor, amount_kes: u64| PaymentCommand::Request {
            payment_id: id,
            payer,
            purpose: Purpose::ConsultationFee,
            amount_kes,
            phone: Sealed::from_ciphertext("v1.p".into()),
            phone_index: "pi".into(),
            doctor_id: None,
            access_request_id: None,
            patient_id: None,
        };
        TestFramework::<Payment>::with(())
            .given_no_previous_events()
            .when(request(patient, 500))
            .then_expect_events(vec![requested(id, patient)]);
        for amount in [0, 250_001] {
            TestFramework::<Payment>::with(())
                .given_no_previous_events()
                .when(request(patient, amount))
                .then_expect_error(PaymentError::InvalidAmount);
        }
        TestFramework::<Payment>::with(())
            .given_no_previous_events()
            .when(request(Actor::System, 500))
            .then_expect_error(PaymentError::NotAPayer);
        TestFramework::<Payment>::with(())
            .given(vec![requested(id, patient)])
            .when(request(patient, 500))
            .then_expect_error(PaymentError::AlreadyRequested);
    }

    #[test]
    fn one_push_then_one_outcome() {
        let id = PaymentId::new();
        let patient = Actor::Patient(PatientId::new());
        TestFramework::<Payment>::with(())
            .given(vec![requested(id, patient), accepted(id)])
            .when(PaymentCommand::AcceptPush {
                by: Actor::System,
                merchant_request_id: "m".into(),
                checkout_request_id: "ws_CO_2".into(),
            })
            .then_expect_error(PaymentError::AlreadyPushed);
        TestFramework::<Payment>::with(())
            .given(vec![requested(id, patient)])
            .when(settle(0, SettledBy::Callback))
            .then_expect_error(PaymentError::NotPushed);
        TestFramework::<Payment>::with(())
            .given(vec![requested(id, patient), accepted(id)])
            .when(settle(0, SettledBy::Callback))
            .then_expect_events(vec![
                PaymentEvent::PaymentConfirmed {
                    payment_id: id,
                    receipt: None,
                    amount_kes: 500,
                    settled_by: SettledBy::Callback,
                },
                PaymentEvent::PaymasterBudgetCredited {
                    payment_id: id,
                    amount_kes: 500,
                },
            ]);
        TestFramework::<Payment>::with(())
            .given(vec![requested(id, patient), accepted(id)])
            .when(settle(1032, SettledBy::Query))
            .then_expect_events(vec![
                PaymentEvent::PaymentFailed {
                    payment_id: id,
                    result_code: 1032,
                    result_desc: "d".into(),
                    status: PaymentStatus::Cancelled,
                    settled_by: SettledBy::Query,
                },
                PaymentEvent::PaymentReconciled {
                    payment_id: id,
                    result_code: 1032,
                },
            ]);
        let settled = vec![
            requested(id, patient),
            accepted(id),
            PaymentEvent::PaymentFailed {
                payment_id: id,
                result_code: 1037,
                result_desc: "d".into(),
                status: PaymentStatus::TimedOut,
                settled_by: SettledBy::Query,
            },
        ];
        TestFramework::<Payment>::with(())
            .given(settled)
            .when(settle(0, SettledBy::Callback))
            .then_expect_error(PaymentError::AlreadySettled);
        TestFramework::<Payment>::with(())
            .given(vec![requested(id, patient), accepted(id)])
            .when(PaymentCommand::Settle {
                by: patient,
                result_code: 0,
                result_desc: "d".into(),
                receipt: None,
                settled_by: SettledBy::Callback,
            })
            .then_expect_error(PaymentError::OnlyThePlatform);
    }

    #[test]
    fn a_doctors_fee_names_its_patient_and_only_the_doctor_themself() {
        let id = PaymentId::new();
        let doctor = DoctorId::new();
        let patient = PatientId::new();
        let request =
            |doctor_id: Option<DoctorId>, patient_id: Option<PatientId>| PaymentCommand::Request {
                payment_id: id,
                payer: Actor::Doctor(doctor),
                purpose: Purpose::ConsultationFee,
                amount_kes: 500,
                phone: Sealed::from_ciphertext("v1.p".into()),
                phone_index: "pi".into(),
                doctor_id,
                access_request_id: None,
                patient_id,
            };
        TestFramework::<Payment>::with(())
            .given_no_previous_events()
            .when(request(Some(doctor), Some(patient)))
            .then_expect_events(vec![PaymentEvent::PaymentRequested {
                payment_id: id,
                payer: Actor::Doctor(doctor).reference(),
                purpose: Purpose::ConsultationFee,
                amount_kes: 500,
                phone: Sealed::from_ciphertext("v1.p".into()),
                phone_index: "pi".into(),
                doctor_id: Some(doctor),
                access_request_id: None,
                patient_id: Some(patient),
                phone_sealed_for_patient: true,
            }]);
        TestFramework::<Payment>::with(())
            .given_no_previous_events()
            .when(request(Some(DoctorId::new()), Some(patient)))
            .then_expect_error(PaymentError::NotYourFee);
        TestFramework::<Payment>::with(())
            .given_no_previous_events()
            .when(request(Some(doctor), None))
            .then_expect_error(PaymentError::PatientRequired);
    }

    #[test]
    fn the_phone_of_an_older_payment_stays_under_the_payers_key() {
        let doctor = DoctorId::new();
        let patient = PatientId::new();
        let mut payment = Payment::default();
        let mut old = requested(PaymentId::new(), Actor::Doctor(doctor));
        if let PaymentEvent::PaymentRequested {
            patient_id,
            phone_sealed_for_patient,
            ..
        } = &mut old
        {
            *patient_id = Some(patient);
            *phone_sealed_for_patient = false;
        }
        // Stored before the field existed: it reads as false.
        let stored = serde_json::to_value(&old).unwrap();
        assert!(stored["PaymentRequested"]
            .get("phone_sealed_for_patient")
            .is_none());
        payment.apply(serde_json::from_value(stored).unwrap());
        assert_eq!(payment.phone_subject(), doctor.to_string());
        let mut new = Payment::default();
        new.apply(PaymentEvent::PaymentRequested {
            payment_id: PaymentId::new(),
            payer: Actor::Doctor(doctor).reference(),
            purpose: Purpose::ConsultationFee,
            amount_kes: 500,
            phone: Sealed::from_ciphertext("v1.p".into()),
            phone_index: "pi".into(),
            doctor_id: Some(doctor),
            access_request_id: None,
            patient_id: Some(patient),
            phone_sealed_for_patient: true,
        });
        assert_eq!(new.phone_subject(), patient.to_string());
    }

    fn now() -> DateTime<Utc> {
        chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 11, 25, 10, 0, 0).unwrap()
    }

    /// An access request of `doctor` to `patient`, approved until `until` (or only
    /// asked, or revoked after approval).
    fn grant(
        doctor: DoctorId,
        patient: PatientId,
        until: Option<i64>,
        revoked: bool,
    ) -> AccessRequest {
        use crate::access::AccessEvent;
        use crate::value::{DurationDays, Scope};
        let request_id = AccessRequestId::new();
        let mut request = AccessRequest::default();
        request.apply(AccessEvent::AccessRequested {
            request_id,
            doctor_id: doctor,
            patient_id: patient,
            scope: Scope::default(),
            purpose: Sealed::from_ciphertext("v1.p".into()),
            duration: DurationDays::new(30).unwrap(),
            note: None,
            requested_at: now() - chrono::Duration::days(2),
        });
        if let Some(hours) = until {
            request.apply(AccessEvent::AccessApproved {
                request_id,
                patient_id: patient,
                doctor_id: doctor,
                scope: Scope::default(),
                expires_at: now() + chrono::Duration::hours(hours),
                approved_at: now() - chrono::Duration::days(1),
            });
        }
        if revoked {
            request.apply(AccessEvent::AccessRevoked {
                request_id,
                patient_id: patient,
                doctor_id: doctor,
                revoked_at: now(),
            });
        }
        request
    }

    #[test]
    fn a_doctor_asks_a_fee_only_verified_only_for_themself_and_only_under_a_grant_in_force() {
        let doctor = DoctorId::new();
        let patient = PatientId::new();
        let active = grant(doctor, patient, Some(24), false);
        let asked = |verified: bool, named: Option<DoctorId>, grant: Option<&AccessRequest>| {
            payment_parties(Asked {
                payer: Actor::Doctor(doctor),
                payer_verified: verified,
                doctor_id: named,
                grant,
                now: now(),
            })
        };
        assert_eq!(
            asked(true, Some(doctor), Some(&active)),
            Ok(PaymentParties {
                patient_id: patient,
                doctor_id: Some(doctor),
                access_request_id: active.id(),
            })
        );
        assert_eq!(
            asked(true, None, Some(&active)).map(|p| p.doctor_id),
            Ok(Some(doctor))
        );
        assert_eq!(
            asked(false, None, Some(&active)),
            Err(PaymentError::DoctorNotVerified)
        );
        assert_eq!(
            asked(true, Some(DoctorId::new()), Some(&active)),
            Err(PaymentError::NotYourFee)
        );
        assert_eq!(asked(true, None, None), Err(PaymentError::NoGrant));
        for not_in_force in [
            grant(doctor, patient, None, false),
            grant(doctor, patient, Some(-1), false),
            grant(doctor, patient, Some(24), true),
            grant(DoctorId::new(), patient, Some(24), false),
        ] {
            assert_eq!(
                asked(true, None, Some(&not_in_force)),
                Err(PaymentError::NoGrant)
            );
        }
    }

    #[test]
    fn a_patient_pays_a_doctor_they_granted_or_their_own_account() {
        let doctor = DoctorId::new();
        let patient = PatientId::new();
        let active = grant(doctor, patient, Some(24), false);
        let asked = |named: Option<DoctorId>, grant: Option<&AccessRequest>| {
            payment_parties(Asked {
                payer: Actor::Patient(patient),
                payer_verified: false,
                doctor_id: named,
                grant,
                now: now(),
            })
        };
        assert_eq!(
            asked(None, None),
            Ok(PaymentParties {
                patient_id: patient,
                doctor_id: None,
                access_request_id: None,
            })
        );
        assert_eq!(
            asked(Some(doctor), Some(&active)),
            Ok(PaymentParties {
                patient_id: patient,
                doctor_id: Some(doctor),
                access_request_id: active.id(),
            })
        );
        assert_eq!(
            asked(None, Some(&active)).map(|p| p.doctor_id),
            Ok(Some(doctor))
        );
        assert_eq!(
            asked(Some(doctor), None),
            Err(PaymentError::DoctorNotGranted)
        );
        assert_eq!(
            asked(Some(DoctorId::new()), Some(&active)),
            Err(PaymentError::DoctorNotGranted)
        );
        let expired = grant(doctor, patient, Some(-1), false);
        assert_eq!(
            asked(Some(doctor), Some(&expired)),
            Err(PaymentError::DoctorNotGranted)
        );
        let someone_elses = grant(doctor, PatientId::new(), Some(24), false);
        assert_eq!(
            asked(None, Some(&someone_elses)),
            Err(PaymentError::DoctorNotGranted)
        );
        assert_eq!(
            payment_parties(Asked {
                payer: Actor::System,
                payer_verified: true,
                doctor_id: None,
                grant: None,
                now: now(),
            }),
            Err(PaymentError::NotAPayer)
        );
    }

    #[test]
    fn result_codes_name_statuses() {
        assert_eq!(PaymentStatus::of_result(0), PaymentStatus::Confirmed);
        assert_eq!(PaymentStatus::of_result(1032), PaymentStatus::Cancelled);
        assert_eq!(PaymentStatus::of_result(1037), PaymentStatus::TimedOut);
        assert_eq!(PaymentStatus::of_result(2001), PaymentStatus::Failed);
        assert_eq!(PaymentStatus::of_result(1), PaymentStatus::Failed);
    }
}

/// A callback that settled nothing, kept for operators: its CheckoutRequestID is
/// unknown, or its amount or phone does not match the payment it names. One aggregate
/// per rejected callback (a fresh id); its phone number is never kept.
#[derive(Clone, Debug, PartialEq)]
pub enum RejectedCallbackCommand {
    Record {
        by: Actor,
        reason: String,
        checkout_request_id: String,
        result_code: i64,
        mpesa_receipt: Option<String>,
        amount_kes: Option<u64>,
        payment_id: Option<PaymentId>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RejectedCallbackEvent {
    MpesaCallbackRejected {
        reason: String,
        checkout_request_id: String,
        result_code: i64,
        mpesa_receipt: Option<String>,
        amount_kes: Option<u64>,
        payment_id: Option<PaymentId>,
    },
}

impl DomainEvent for RejectedCallbackEvent {
    fn event_type(&self) -> String {
        "MpesaCallbackRejected".to_owned()
    }
    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RejectedCallback {
    recorded: bool,
}

impl Aggregate for RejectedCallback {
    const TYPE: &'static str = "mpesa_callback";
    type Command = RejectedCallbackCommand;
    type Event = RejectedCallbackEvent;
    type Error = PaymentError;
    type Services = ();

    async fn handle(
        &mut self,
        command: RejectedCallbackCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), PaymentError> {
        let RejectedCallbackCommand::Record {
            by,
            reason,
            checkout_request_id,
            result_code,
            mpesa_receipt,
            amount_kes,
            payment_id,
        } = command;
        if by != Actor::System {
            return Err(PaymentError::OnlyThePlatform);
        }
        if self.recorded {
            return Err(PaymentError::AlreadyRequested);
        }
        sink.write(
            RejectedCallbackEvent::MpesaCallbackRejected {
                reason,
                checkout_request_id,
                result_code,
                mpesa_receipt,
                amount_kes,
                payment_id,
            },
            self,
        )
        .await;
        Ok(())
    }

    fn apply(&mut self, _: RejectedCallbackEvent) {
        self.recorded = true;
    }
}
