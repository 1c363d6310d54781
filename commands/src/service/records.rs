//! Medical records: uploads (encrypted, stored, then recorded), reads (checked and
//! recorded before any byte is returned), integrity failures, and what the chain and
//! storage adapters record of a record.

use anyhow::Context;
use domain::actor::Actor;
use domain::error::RuleKind;
use domain::ids::{AccessRequestId, PatientId, RecordId};
use domain::record::{MedicalRecord, RecordCommand};
use domain::value::{ByteSize, Category, Filename, MediaType, Sha256Hex, WrappedKey};
use eventstore::{CommandMeta, CommandOutcome};

use super::{id_of, map, CommandError, Commands};
use crate::blobs::IntegrityFailure;

/// A stored upload: what the API answers with, also on an idempotent repeat.
#[derive(Clone, Debug)]
pub struct Uploaded {
    pub record_id: RecordId,
    /// SHA-256 of the encrypted blob (its content address).
    pub sha256: String,
    /// Size of the original bytes.
    pub size: u64,
    pub outcome: CommandOutcome,
}

/// What [`Commands::upload_record`] records of an upload, besides its body.
pub struct UploadRecord<'a> {
    pub by: Actor,
    pub patient_id: PatientId,
    pub category: Category,
    pub media_type: MediaType,
    /// Sealed under the patient's key.
    pub filename: Option<&'a Filename>,
}

impl Commands {
    /// Encrypts `body` under a fresh data key, stores the ciphertext, and records the
    /// upload. The filename is sealed under the patient's key. A repeat under the same
    /// idempotency key encrypts and stores nothing and answers as the first did.
    pub async fn upload_record(
        &self,
        input: UploadRecord<'_>,
        body: &[u8],
        meta: CommandMeta,
    ) -> Result<Uploaded, CommandError> {
        let mut owned = Vec::with_capacity(body.len() + crate::keys::RECORD_OVERHEAD);
        owned.extend_from_slice(body);
        self.upload_record_body(input, owned, meta).await
    }

    /// [`Commands::upload_record`] of a body the caller gives up: it is encrypted in
    /// its own buffer, so an upload in flight holds its body once (give the buffer
    /// [`crate::keys::RECORD_OVERHEAD`] bytes of spare capacity, and no reallocation
    /// copies it either).
    pub async fn upload_record_body(
        &self,
        input: UploadRecord<'_>,
        body: Vec<u8>,
        meta: CommandMeta,
    ) -> Result<Uploaded, CommandError> {
        let UploadRecord {
            by,
            patient_id,
            category,
            media_type,
            filename,
        } = input;
        if let Some(outcome) = self
            .store
            .earlier_outcome::<domain::record::RecordError>(&meta)
            .await
            .map_err(map)?
        {
            return self.uploaded(outcome).await;
        }
        let size = ByteSize::new(body.len() as u64).map_err(|e| CommandError::Rejected {
            kind: RuleKind::Unprocessable,
            code: "empty_body",
            message: e.to_string(),
        })?;
        let record_id = RecordId::new();
        let patient = patient_id.to_string();
        let blob = self
            .keys
            .encrypt_record(&patient, &record_id.to_string(), body)
            .await?;
        self.blobs
            .put(&blob.sha256, &blob.ciphertext)
            .await
            .context("storing the encrypted record")?;
        let crate::keys::EncryptedBlob {
            ciphertext,
            sha256,
            wrapped_key,
        } = blob;
        // Stored: the ciphertext is not needed while the upload is recorded.
        drop(ciphertext);
        let filename = self
            .seal_optional(&patient, filename.map(Filename::as_str))
            .await?;
        let command = RecordCommand::Upload {
            record_id,
            patient_id,
            by,
            category,
            media_type,
            size,
            sha256: Sha256Hex::parse(&sha256)
                .map_err(|e| CommandError::Unexpected(anyhow::anyhow!("{e}")))?,
            wrapped_key: WrappedKey::from_ciphertext(wrapped_key),
            filename,
        };
        let outcome = self
            .store
            .execute::<MedicalRecord>(
                &self.records,
                &record_id.to_string(),
                command,
                &self.record_services,
                &meta,
            )
            .await
            .map_err(map)?;
        self.uploaded(outcome).await
    }

    async fn uploaded(&self, outcome: CommandOutcome) -> Result<Uploaded, CommandError> {
        let record_id: RecordId = id_of(&outcome, None)?;
        let record = self
            .record(record_id)
            .await?
            .context("an uploaded record is missing")?;
        let (Some(sha256), Some(size)) = (record.sha256(), record.size()) else {
            return Err(anyhow::anyhow!("an uploaded record has no content").into());
        };
        Ok(Uploaded {
            record_id,
            sha256: sha256.as_str().to_owned(),
            size: size.get(),
            outcome,
        })
    }

    /// A record as the event store holds it now (`None`: no such record).
    pub async fn record(&self, record_id: RecordId) -> anyhow::Result<Option<MedicalRecord>> {
        let record = self
            .records
            .load(&record_id.to_string())
            .await
            .context("loading record")?
            .aggregate;
        Ok(record.id().map(|_| record))
    }

    /// Checks the reader's right and records the read (`RecordAccessed`) before any
    /// byte is returned. No event, no bytes: the content comes only from here.
    ///
    /// `record` is the record as the caller loaded it (see [`Commands::record`]); the
    /// command decides on the event store's state, and the content is decrypted from
    /// `record`, whose content fields are written once, at upload.
    pub async fn read_record(
        &self,
        record: &MedicalRecord,
        by: Actor,
        request_id: Option<AccessRequestId>,
        meta: CommandMeta,
    ) -> Result<(CommandOutcome, Vec<u8>), CommandError> {
        let record_id = record
            .id()
            .ok_or_else(|| CommandError::rule(domain::record::RecordError::NotFound))?;
        // A read is checked and recorded every time: never answered from an earlier one.
        let mut meta = meta;
        meta.idempotency_key = None;
        meta.request_fingerprint = None;
        let outcome = self
            .store
            .execute::<MedicalRecord>(
                &self.records,
                &record_id.to_string(),
                RecordCommand::Read { by, request_id },
                &self.record_services,
                &meta,
            )
            .await
            .map_err(map)?;
        let content = self.content(record, &meta).await?;
        Ok((outcome, content))
    }

    /// The decrypted content of a record. A copy that fails its hash is reported
    /// (`RecordIntegrityFailed`, correlated with the read) and never served.
    async fn content(
        &self,
        record: &MedicalRecord,
        read: &CommandMeta,
    ) -> Result<Vec<u8>, CommandError> {
        let (Some(record_id), Some(patient_id), Some(sha256), Some(wrapped_key)) = (
            record.id(),
            record.patient_id(),
            record.sha256(),
            record.wrapped_key(),
        ) else {
            return Err(anyhow::anyhow!("the record has no content").into());
        };
        let fetched = match self.blobs.get(sha256.as_str()).await {
            Ok(fetched) => fetched,
            Err(error) => {
                tracing::warn!(record_id = %record_id, error = format!("{error:#}"), "blob store unavailable");
                return Err(CommandError::ContentUnavailable);
            }
        };
        for failure in &fetched.refused {
            tracing::error!(
                target: "afyachain::integrity",
                record_id = %record_id,
                backend = %failure.backend,
                object_key = %failure.object_key,
                expected = %failure.expected,
                actual = %failure.actual,
                "a copy of a record's blob failed its integrity check; refused"
            );
            // Recorded for the auditors; a failure to record it must not turn the
            // refusal into another answer.
            if let Err(error) = self
                .report_integrity_failure(record_id, failure, Some(read))
                .await
            {
                tracing::error!(record_id = %record_id, error = %error, "could not record an integrity failure");
            }
        }
        let Some(ciphertext) = fetched.bytes else {
            if !fetched.refused.is_empty() {
                return Err(CommandError::IntegrityFailed);
            }
            tracing::error!(record_id = %record_id, "no copy of the record's blob is left");
            return Err(CommandError::ContentUnavailable);
        };
        Ok(self
            .keys
            .decrypt_record(
                &patient_id.to_string(),
                &record_id.to_string(),
                wrapped_key.as_str(),
                &ciphertext,
            )
            .await?)
    }

    /// Records that a copy of the record's blob failed its integrity check
    /// (`RecordIntegrityFailed`, once per copy and bad hash), correlated with the read
    /// that found it, if any.
    pub async fn report_integrity_failure(
        &self,
        record_id: RecordId,
        failure: &IntegrityFailure,
        read: Option<&CommandMeta>,
    ) -> Result<(), CommandError> {
        let actual_sha256 = Sha256Hex::parse(&failure.actual)
            .map_err(|e| CommandError::Unexpected(anyhow::anyhow!("{e}")))?;
        let (backend, object_key) = (failure.backend.clone(), failure.object_key.clone());
        let mut meta = CommandMeta::new(Actor::System.reference());
        if let Some(read) = read {
            meta.correlation_id = read.correlation_id;
            meta.causation_id = Some(read.command_id);
        }
        self.store
            .execute::<MedicalRecord>(
                &self.records,
                &record_id.to_string(),
                RecordCommand::ReportIntegrityFailure {
                    by: Actor::System,
                    backend,
                    object_key,
                    actual_sha256,
                },
                &self.record_services,
                &meta,
            )
            .await
            .map_err(map)?;
        Ok(())
    }

    /// Records the record's token on chain (`RecordTokenMinted`). Idempotent: a record
    /// has one token, and a repeat records nothing. Only the chain adapter calls it.
    pub async fn mark_minted(
        &self,
        record_id: RecordId,
        token: domain::record::ChainTx,
    ) -> Result<CommandOutcome, CommandError> {
        let meta = CommandMeta::new(Actor::System.reference())
            .with_idempotency_key(format!("chain:mint:{record_id}"))
            .with_fingerprint(format!("{}:{}", token.chain_id, token.contract));
        self.store
            .execute::<MedicalRecord>(
                &self.records,
                &record_id.to_string(),
                RecordCommand::MarkMinted {
                    by: Actor::System,
                    token,
                },
                &self.record_services,
                &meta,
            )
            .await
            .map_err(map)
    }

    /// Records that `backend` holds the record's ciphertext under `object_key`
    /// (`RecordStored`). Idempotent: a repeat, from a replay or a racing instance,
    /// records nothing. Only the storage adapter calls it.
    pub async fn mark_stored(
        &self,
        record_id: RecordId,
        backend: &str,
        object_key: &str,
        etag: Option<String>,
    ) -> Result<CommandOutcome, CommandError> {
        let meta = CommandMeta::new(Actor::System.reference())
            .with_idempotency_key(format!("storage:{backend}:{record_id}"))
            .with_fingerprint(object_key.to_owned());
        self.store
            .execute::<MedicalRecord>(
                &self.records,
                &record_id.to_string(),
                RecordCommand::MarkStored {
                    by: Actor::System,
                    backend: backend.to_owned(),
                    object_key: object_key.to_owned(),
                    etag,
                },
                &self.record_services,
                &meta,
            )
            .await
            .map_err(map)
    }
}
