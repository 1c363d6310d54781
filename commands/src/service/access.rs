//! Access requests and consent: a doctor asks, the patient decides, a grant expires or
//! is revoked, and the chain adapter records what is on chain.

use anyhow::Context;
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use domain::access::{AccessCommand, AccessError, AccessRequest, AccessStatus};
use domain::actor::Actor;
use domain::error::RuleKind;
use domain::ids::{AccessRequestId, DoctorId, PatientId};
use domain::value::{DurationDays, Note, Purpose, Scope};
use eventstore::{CommandMeta, CommandOutcome};

use super::{id_of, map, CommandError, Commands, Done};

/// What [`Commands::request_access`] asks for.
pub struct RequestAccess<'a> {
    pub doctor_id: DoctorId,
    pub patient_id: PatientId,
    pub scope: Scope,
    pub purpose: &'a Purpose,
    pub duration: DurationDays,
    pub note: Option<&'a Note>,
}

/// What [`Commands::approve_access`] decides: the patient's approval, possibly
/// narrowing the request's expiry or scope.
pub struct ApproveAccess {
    pub request_id: AccessRequestId,
    pub by: Actor,
    pub expires_at: Option<DateTime<Utc>>,
    pub scope: Option<Scope>,
}

impl Commands {
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
    pub async fn request_access(
        &self,
        input: RequestAccess<'_>,
        meta: CommandMeta,
    ) -> Result<Done<AccessRequestId>, CommandError> {
        let RequestAccess {
            doctor_id,
            patient_id,
            scope,
            purpose,
            duration,
            note,
        } = input;
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

    /// The patient approves (possibly narrowing); answers with the approval event,
    /// whose scope is what was granted. Never grants a record that is not the
    /// patient's (see `own_records_only`).
    pub async fn approve_access(
        &self,
        input: ApproveAccess,
        meta: CommandMeta,
    ) -> Result<Decided, CommandError> {
        let ApproveAccess {
            request_id,
            by,
            expires_at,
            scope,
        } = input;
        let scope = self.own_records_only(request_id, by, scope).await?;
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

    /// The scope an approval grants (`scope`, or the request's whole scope if `None`)
    /// without the requested records that are not the request's patient's.
    ///
    /// A request is refused such records when it is made, but one stored before that
    /// check could name another patient's record. It is narrowed away, not refused: the
    /// patient consents to their own records only, and another patient's record was
    /// never theirs to give (a doctor's read of it is refused anyway). A clinician
    /// expects the patient's approval of an otherwise sound request to grant what the
    /// patient can grant; refusing it would leave the patient, who cannot edit the
    /// doctor's request, unable to approve it without listing record ids by hand. The
    /// approval's answer and the doctor's grants show what was granted. Only when
    /// nothing is left to grant is it refused (`records_not_the_patients`, 422 on
    /// `record_ids`): the patient can reject it, and the doctor ask again.
    ///
    /// Records outside the request are left to the aggregate (an approval may only
    /// narrow), and so is a request that is not this patient's or no longer pending.
    async fn own_records_only(
        &self,
        request_id: AccessRequestId,
        by: Actor,
        scope: Option<Scope>,
    ) -> Result<Option<Scope>, CommandError> {
        let Actor::Patient(patient) = by else {
            return Ok(scope);
        };
        let Some(request) = self.access_request(request_id).await? else {
            return Ok(scope);
        };
        if request.patient_id() != Some(patient) || request.status() != AccessStatus::Pending {
            return Ok(scope);
        }
        let mut foreign = Vec::new();
        for id in &request.scope().record_ids {
            let owner = self.record(*id).await?.and_then(|r| r.patient_id());
            if owner != Some(patient) {
                foreign.push(*id);
            }
        }
        if foreign.is_empty() {
            return Ok(scope);
        }
        let mut granted = scope.unwrap_or_else(|| request.scope().clone());
        let before = granted.record_ids.len();
        for id in &foreign {
            granted.record_ids.remove(id);
        }
        if granted.is_empty() {
            return Err(CommandError::Rejected {
                kind: RuleKind::Unprocessable,
                code: "records_not_the_patients",
                message: "none of the records this request names is yours, and it names no \
                          category: there is nothing to approve (reject it instead)"
                    .to_owned(),
            });
        }
        let dropped = before - granted.record_ids.len();
        if dropped > 0 {
            tracing::warn!(request_id = %request_id, dropped, "an access request stored before its records were checked names records that are not its patient's; approved without them");
        }
        Ok(Some(granted))
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
}

/// A decision on an access request: the event it appended (for a repeat, the first
/// decision's event).
#[derive(Clone, Debug)]
pub struct Decided {
    pub outcome: CommandOutcome,
    pub event: <AccessRequest as Aggregate>::Event,
}
