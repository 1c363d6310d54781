//! Executing a command: load the aggregate, handle, append atomically.
//!
//! Conflicts (another command appended to the same aggregate first) are retried a few
//! times against the fresh state and then reported, never lost. A command with an
//! idempotency key appends at most once: the key is taken by a trigger inside the
//! appending transaction, and a repeat answers with the first command's outcome.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, AggregateContext, AggregateError, EventStore};

use serde::{Deserialize, Serialize};
use sqlx::Row;
use uuid::Uuid;

use crate::store::{AggregateStore, Store, Typed};

const MAX_ATTEMPTS: u32 = 5;

/// Who asked for a command and why; stored as each event's metadata.
#[derive(Clone, Debug)]
pub struct CommandMeta {
    /// Opaque actor reference, e.g. `patient:<uuid>`; never a name or phone number.
    pub actor: String,
    pub correlation_id: Uuid,
    pub causation_id: Option<Uuid>,
    pub command_id: Uuid,
    /// Same key twice appends once; the caller should scope keys per client.
    pub idempotency_key: Option<String>,
    /// What request took the key (opaque, e.g. an HMAC of it): a later command with the
    /// same key and another fingerprint is refused ([`ExecuteError::KeyReused`]).
    pub request_fingerprint: Option<String>,
}

impl CommandMeta {
    /// Metadata for a fresh command by `actor`, correlated with itself.
    pub fn new(actor: impl Into<String>) -> Self {
        let command_id = Uuid::new_v4();
        CommandMeta {
            actor: actor.into(),
            correlation_id: command_id,
            causation_id: None,
            command_id,
            idempotency_key: None,
            request_fingerprint: None,
        }
    }

    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Ties the idempotency key to one request: see [`CommandMeta::request_fingerprint`].
    pub fn with_fingerprint(mut self, fingerprint: impl Into<String>) -> Self {
        self.request_fingerprint = Some(fingerprint.into());
        self
    }

    /// The same request under a derived key, for a second command that belongs to it
    /// (`key` + `suffix`); `None` keeps the metadata without a key.
    pub fn derived(&self, suffix: &str) -> CommandMeta {
        let mut meta = self.clone();
        meta.command_id = Uuid::new_v4();
        meta.causation_id = Some(self.command_id);
        meta.idempotency_key = self
            .idempotency_key
            .as_ref()
            .map(|k| format!("{k}{suffix}"));
        meta
    }

    pub fn with_correlation(mut self, correlation_id: Uuid, causation_id: Option<Uuid>) -> Self {
        self.correlation_id = correlation_id;
        self.causation_id = causation_id;
        self
    }

    fn to_metadata(&self) -> HashMap<String, String> {
        let mut m = HashMap::with_capacity(5);
        m.insert("actor".to_owned(), self.actor.clone());
        m.insert("correlation_id".to_owned(), self.correlation_id.to_string());
        if let Some(causation) = self.causation_id {
            m.insert("causation_id".to_owned(), causation.to_string());
        }
        m.insert("command_id".to_owned(), self.command_id.to_string());
        if let Some(key) = &self.idempotency_key {
            m.insert("idempotency_key".to_owned(), key.clone());
            if let Some(fingerprint) = &self.request_fingerprint {
                m.insert("request_fingerprint".to_owned(), fingerprint.clone());
            }
        }
        m
    }
}

/// What a command appended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandOutcome {
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// Sequences of the appended events, `first..=last`; `None` when the command
    /// appended nothing.
    pub sequences: Option<(i64, i64)>,
    /// True when this is the answer of an earlier command with the same idempotency key.
    pub replayed: bool,
}

/// Why a command did not append.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError<E: std::error::Error> {
    /// A business rule refused the command.
    #[error(transparent)]
    Rejected(E),
    /// Other commands kept changing the aggregate; try again.
    #[error("the aggregate was changed concurrently; try again")]
    Conflict,
    /// The idempotency key was taken by a different request.
    #[error("this idempotency key was already used for a different request")]
    KeyReused,
    #[error(transparent)]
    Store(#[from] anyhow::Error),
}

impl Store {
    /// Runs `command` against aggregate `aggregate_id` and appends its events with
    /// `meta`. `commands` must be cloneable so a conflict can be retried on fresh state.
    #[tracing::instrument(skip_all, fields(aggregate = A::TYPE, aggregate_id = %aggregate_id, command_id = %meta.command_id))]
    pub async fn execute<A>(
        &self,
        events: &AggregateStore<A>,
        aggregate_id: &str,
        command: A::Command,
        services: &A::Services,
        meta: &CommandMeta,
    ) -> Result<CommandOutcome, ExecuteError<A::Error>>
    where
        A: Aggregate + Clone,
        A::Command: Clone,
    {
        if let Some(outcome) = self.earlier_outcome(meta).await? {
            return Ok(outcome);
        }
        let metadata = meta.to_metadata();
        let mut attempt = 0;
        loop {
            attempt += 1;
            // First from the cache of our own last write, then fresh after a conflict.
            let (mut context, from_cache) = match events.cached(aggregate_id) {
                Some(context) if attempt == 1 => (context, true),
                _ => (
                    events
                        .load_aggregate(aggregate_id)
                        .await
                        .map_err(store_error)?,
                    false,
                ),
            };
            let sink: EventSink<A> = EventSink::default();
            if let Err(rejection) = context
                .aggregate()
                .handle(command.clone(), services, &sink)
                .await
            {
                events.forget(aggregate_id);
                // Cached state may be stale (another instance wrote since): a refusal
                // counts only when made on fresh state.
                if from_cache {
                    continue;
                }
                // A concurrent twin with the same key may have committed after our
                // first look: its state change is what refused us. Answer with its
                // outcome, as for any repeat.
                if let Some(outcome) = self.earlier_outcome(meta).await? {
                    return Ok(outcome);
                }
                return Err(ExecuteError::Rejected(rejection));
            }
            let new_events = sink.collect().await;
            if new_events.is_empty() {
                if from_cache {
                    // A no-op decided on cached state is confirmed on fresh state.
                    events.forget(aggregate_id);
                    continue;
                }
                return Ok(CommandOutcome {
                    aggregate_type: A::TYPE.to_owned(),
                    aggregate_id: aggregate_id.to_owned(),
                    sequences: None,
                    replayed: false,
                });
            }
            let after = context.aggregate.clone();
            let last = context.current_sequence + new_events.len();
            match events.commit(new_events, context, metadata.clone()).await {
                Ok(committed) => {
                    events.remember(aggregate_id, after, last);
                    self.notifier().committed();
                    let first = committed.first().map(|e| e.sequence as i64).unwrap_or(0);
                    let last = committed.last().map(|e| e.sequence as i64).unwrap_or(0);
                    return Ok(CommandOutcome {
                        aggregate_type: A::TYPE.to_owned(),
                        aggregate_id: aggregate_id.to_owned(),
                        sequences: Some((first, last)),
                        replayed: false,
                    });
                }
                Err(error) => {
                    events.forget(aggregate_id);
                    // A repeat of an idempotent command fails inside the append (the
                    // key is taken); answer with the first command's outcome.
                    if let Some(outcome) = self.earlier_outcome(meta).await? {
                        return Ok(outcome);
                    }
                    match error {
                        AggregateError::AggregateConflict if attempt < MAX_ATTEMPTS => {
                            tracing::debug!(attempt, "append conflict, retrying");
                            if !from_cache {
                                tokio::time::sleep(Duration::from_millis(u64::from(attempt) * 3))
                                    .await;
                            }
                        }
                        AggregateError::AggregateConflict => return Err(ExecuteError::Conflict),
                        other => return Err(store_error(other)),
                    }
                }
            }
        }
    }

    /// The outcome of the command that took `meta`'s idempotency key, if one did (and
    /// `meta` has a key). Refused with [`ExecuteError::KeyReused`] when that command was
    /// made for a request with another fingerprint.
    pub async fn earlier_outcome<E: std::error::Error>(
        &self,
        meta: &CommandMeta,
    ) -> Result<Option<CommandOutcome>, ExecuteError<E>> {
        let Some(key) = &meta.idempotency_key else {
            return Ok(None);
        };
        match self.idempotent_outcome(key).await? {
            Some((outcome, fingerprint)) => {
                if fingerprint.is_some() && fingerprint != meta.request_fingerprint {
                    return Err(ExecuteError::KeyReused);
                }
                Ok(Some(outcome))
            }
            None => Ok(None),
        }
    }

    /// Deletes the idempotency keys taken more than `max_age` ago, with the fingerprints
    /// of their requests: a key used again after that makes a new command. Returns how
    /// many were deleted.
    pub async fn expire_idempotency_keys(&self, max_age: Duration) -> anyhow::Result<u64> {
        let Ok(age) = chrono::Duration::from_std(max_age) else {
            return Ok(0);
        };
        let Some(cutoff) = chrono::Utc::now().checked_sub_signed(age) else {
            return Ok(0);
        };
        let sql = "DELETE FROM command_keys WHERE recorded_at <= $1";
        let done = match &self.typed {
            Typed::Postgres(pool) => sqlx::query(sql)
                .bind(cutoff)
                .execute(pool)
                .await
                .map(|r| r.rows_affected()),
            Typed::Sqlite(pool) => sqlx::query(sql)
                // The text form of `recorded_at` (strftime '%Y-%m-%dT%H:%M:%fZ').
                .bind(cutoff.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
                .execute(pool)
                .await
                .map(|r| r.rows_affected()),
        };
        done.context("expiring idempotency keys")
    }

    /// The outcome of the command that took `key`, if one did, and the fingerprint of
    /// the request it was made for.
    pub async fn idempotent_outcome(
        &self,
        key: &str,
    ) -> anyhow::Result<Option<(CommandOutcome, Option<String>)>> {
        let sql = "SELECT aggregate_type, aggregate_id, first_sequence, last_sequence, \
                   fingerprint FROM command_keys WHERE idempotency_key = $1";
        let row = match &self.typed {
            Typed::Postgres(pool) => sqlx::query(sql)
                .bind(key)
                .fetch_optional(pool)
                .await
                .map(|r| r.map(|r| outcome_from(&r))),
            Typed::Sqlite(pool) => sqlx::query(sql)
                .bind(key)
                .fetch_optional(pool)
                .await
                .map(|r| r.map(|r| outcome_from(&r))),
        }
        .context("looking up an idempotency key")?;
        row.transpose()
    }
}

fn outcome_from<R: Row>(row: &R) -> anyhow::Result<(CommandOutcome, Option<String>)>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    String: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<String>: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let outcome = CommandOutcome {
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequences: Some((
            row.try_get("first_sequence")?,
            row.try_get("last_sequence")?,
        )),
        replayed: true,
    };
    Ok((outcome, row.try_get("fingerprint")?))
}

fn store_error<E: std::error::Error>(error: AggregateError<E>) -> ExecuteError<E> {
    match error {
        AggregateError::UserError(e) => ExecuteError::Rejected(e),
        AggregateError::AggregateConflict => ExecuteError::Conflict,
        AggregateError::DatabaseConnectionError(e) => {
            ExecuteError::Store(boxed(e).context("event store unreachable"))
        }
        AggregateError::DeserializationError(e) => {
            ExecuteError::Store(anyhow::anyhow!(e).context("stored events could not be read"))
        }
        AggregateError::UnexpectedError(e) => {
            ExecuteError::Store(boxed(e).context("appending events failed"))
        }
    }
}

/// A cqrs-es error outside a command (a load) as an `anyhow::Error`, its cause kept.
pub(crate) fn aggregate_error<E: std::error::Error>(error: AggregateError<E>) -> anyhow::Error {
    match store_error(error) {
        ExecuteError::Store(e) => e,
        other => anyhow::anyhow!("{other}"),
    }
}

/// A boxed cause from cqrs-es, kept as its `sqlx::Error` when it is one, so that
/// [`Store::is_unavailable`] can tell an outage from a fault.
fn boxed(error: Box<dyn std::error::Error + Send + Sync>) -> anyhow::Error {
    match error.downcast::<sqlx::Error>() {
        Ok(sqlx) => anyhow::Error::from(*sqlx),
        Err(other) => anyhow::anyhow!(other),
    }
}
