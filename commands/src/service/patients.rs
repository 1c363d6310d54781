//! Patients after registration: their own wallet, the address their record tokens are
//! held at, and their share codes.

use anyhow::Context;
use chrono::{DateTime, Utc};
use domain::actor::Actor;
use domain::ids::PatientId;
use domain::patient::{Patient, PatientCommand, PatientError};
use eventstore::{CommandMeta, CommandOutcome};

use super::{map, CommandError, Commands};

/// Crockford's base32 alphabet (no I, L, O, U), for share codes.
const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const SHARE_CODE_TAG: &str = "share code";
/// How long a share code is valid.
pub const SHARE_CODE_DAYS: i64 = 30;

impl Commands {
    /// The opaque index of a wallet address (a keyed hash of its checksummed form), to
    /// find who registered it without keeping it in clear.
    pub fn wallet_index(&self, address: &str) -> String {
        crate::keys::hex(&self.keys.tag("wallet-index", address.as_bytes()))
    }

    /// The patient's own wallet is to hold their record tokens (`WalletRegistered`,
    /// the address sealed under their key). The caller has checked the patient's proof
    /// of holding it, and that no other patient registered it. Refused once the
    /// custodial address is in use on chain.
    pub async fn register_wallet(
        &self,
        patient_id: PatientId,
        address: &str,
        meta: CommandMeta,
    ) -> Result<CommandOutcome, CommandError> {
        let wallet = self.seal_text(&patient_id.to_string(), address).await?;
        let wallet_index = self.wallet_index(address);
        self.store
            .execute::<Patient>(
                &self.patients,
                &patient_id.to_string(),
                PatientCommand::RegisterWallet {
                    wallet,
                    wallet_index,
                },
                &(),
                &meta,
            )
            .await
            .map_err(map)
    }

    /// A patient as the event store holds it now (`None`: no such patient).
    pub async fn patient(&self, patient_id: PatientId) -> anyhow::Result<Option<Patient>> {
        let patient = self
            .patients
            .load(&patient_id.to_string())
            .await
            .context("loading a patient")?
            .aggregate;
        Ok(patient.id().map(|_| patient))
    }

    /// Where the patient's record tokens are held: their registered wallet's address,
    /// or `None` for their custodial address, which from this call on is theirs for
    /// good (`CustodialAddressInUse`, once). Only the chain adapter calls it, before it
    /// puts the patient's address on chain.
    pub async fn patient_chain_wallet(
        &self,
        patient_id: PatientId,
    ) -> Result<Option<String>, CommandError> {
        let meta = CommandMeta::new(Actor::System.reference());
        self.store
            .execute::<Patient>(
                &self.patients,
                &patient_id.to_string(),
                PatientCommand::UseChainAddress,
                &(),
                &meta,
            )
            .await
            .map_err(map)?;
        let patient = self
            .patient(patient_id)
            .await?
            .ok_or_else(|| CommandError::rule(PatientError::NotRegistered))?;
        match patient.wallet() {
            None => Ok(None),
            Some(sealed) => self
                .open_text(&patient_id.to_string(), sealed.as_str())
                .await
                .map(Some)
                .ok_or_else(|| {
                    CommandError::from(anyhow::anyhow!(
                        "the patient's wallet cannot be opened (erased?)"
                    ))
                }),
        }
    }

    /// Issues the patient a new share code (replacing any earlier one), valid for
    /// [`SHARE_CODE_DAYS`] days: 10 characters of Crockford's base32 (50 random bits),
    /// sealed under the patient's key in `ShareCodeIssued`, looked up by a keyed hash.
    pub async fn issue_share_code(
        &self,
        patient_id: PatientId,
        meta: CommandMeta,
    ) -> Result<CommandOutcome, CommandError> {
        let bits = rand::random::<u64>() & ((1u64 << 50) - 1);
        let code: String = (0..10)
            .rev()
            .map(|i| char::from(CROCKFORD[((bits >> (5 * i)) & 31) as usize]))
            .collect();
        let subject = patient_id.to_string();
        let command = PatientCommand::IssueShareCode {
            code: self.seal_text(&subject, &code).await?,
            code_index: self.share_code_index(&code).unwrap_or_default(),
            expires_at: self.now() + chrono::Duration::days(SHARE_CODE_DAYS),
        };
        self.store
            .execute::<Patient>(&self.patients, &subject, command, &(), &meta)
            .await
            .map_err(map)
    }

    /// The patient's current share code (`XXXXX-XXXXX`) and its expiry, if any.
    pub async fn share_code(
        &self,
        patient_id: PatientId,
    ) -> anyhow::Result<Option<(String, DateTime<Utc>)>> {
        let Some(patient) = self.patient(patient_id).await? else {
            return Ok(None);
        };
        let Some((sealed, expires_at)) = patient.share_code() else {
            return Ok(None);
        };
        let code = self
            .open_text(&patient_id.to_string(), sealed.as_str())
            .await
            .ok_or_else(|| anyhow::anyhow!("a share code cannot be opened"))?;
        let head: String = code.chars().take(5).collect();
        let tail: String = code.chars().skip(5).collect();
        Ok(Some((format!("{head}-{tail}"), *expires_at)))
    }

    /// The keyed hash a share code is looked up by, after reading it as people type
    /// it (any case, with or without the dash or spaces; O read as 0, I and L as 1).
    /// `None`: not a share code.
    pub fn share_code_index(&self, typed: &str) -> Option<String> {
        let code: String = typed
            .chars()
            .filter(|c| !matches!(c, '-' | ' '))
            .map(|c| match c.to_ascii_uppercase() {
                'O' => '0',
                'I' | 'L' => '1',
                other => other,
            })
            .collect();
        if code.len() != 10 || !code.bytes().all(|b| CROCKFORD.contains(&b)) {
            return None;
        }
        Some(crate::keys::hex(
            &self.keys.tag(SHARE_CODE_TAG, code.as_bytes()),
        ))
    }
}
