//! M-Pesa payments: who may be prompted and to which number, the request, what the
//! M-Pesa adapter records of it, and callbacks that settled nothing.

use anyhow::Context;
use cqrs_es::EventStore;
use domain::actor::Actor;
use domain::ids::{AccessRequestId, DoctorId, PatientId, PaymentId};
use domain::value::{Msisdn, Sealed};
use eventstore::{CommandMeta, CommandOutcome};

use super::{id_of, map, CommandError, Commands, Done, PatientPersonal};

/// What [`Commands::request_payment`] asks for.
pub struct RequestPayment<'a> {
    pub payer: Actor,
    pub purpose: domain::payment::Purpose,
    pub amount_kes: u64,
    /// What [`Commands::plan_payment`] allowed.
    pub plan: &'a PaymentPlan,
}

impl Commands {
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
        input: RequestPayment<'_>,
        meta: CommandMeta,
    ) -> Result<Done<PaymentId>, CommandError> {
        let RequestPayment {
            payer,
            purpose,
            amount_kes,
            plan,
        } = input;
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
}

/// What [`Commands::plan_payment`] allowed: between whom a payment is, and the
/// patient's registered number its prompt goes to (never a number someone typed).
#[derive(Clone, Debug)]
pub struct PaymentPlan {
    pub parties: domain::payment::PaymentParties,
    pub phone: Msisdn,
}
