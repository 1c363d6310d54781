//! The global log: every event of every aggregate, in one order that consumers can
//! resume from.
//!
//! On SQLite there is a single writer, so the log order is the position order. On
//! PostgreSQL positions come from a sequence and are allocated before commit, so with
//! concurrent writers position 7 may commit after position 8 has been read. The log
//! therefore reads in `(tx_id, position)` order and only rows whose transaction id is
//! below `pg_snapshot_xmin(pg_current_snapshot())`, the oldest transaction still
//! running: every transaction below it has finished, so nothing can appear later
//! behind a cursor. Writers never wait for each other; a consumer waits at most for the
//! slowest transaction in flight.

use anyhow::Context;
use chrono::{DateTime, Utc};
use cqrs_es::persist::{EventUpcaster, SerializedEvent};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::Row;
use uuid::Uuid;

use crate::store::{Store, Typed};

/// A place in the log: after the event `(tx, position)`. `LogCursor::START` is before
/// everything. On SQLite `tx` equals `position`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LogCursor {
    pub tx: i64,
    pub position: i64,
}

impl LogCursor {
    pub const START: LogCursor = LogCursor { tx: 0, position: 0 };
}

/// One event as the log holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub position: i64,
    /// The writing transaction (PostgreSQL); equal to `position` on SQLite.
    pub tx: i64,
    pub event_id: Uuid,
    pub recorded_at: DateTime<Utc>,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: Value,
    pub metadata: Value,
}

impl StoredEvent {
    /// The cursor just after this event.
    pub fn cursor(&self) -> LogCursor {
        LogCursor {
            tx: self.tx,
            position: self.position,
        }
    }

    /// The event as stored, for hashing: its id, position, aggregate type and id,
    /// sequence, type, version, payload and metadata, each prefixed with its length
    /// (8 bytes, big-endian). The audit anchors' Merkle leaves and the audit trail's
    /// hash chain are taken over these bytes.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(256);
        let payload = self.payload.to_string();
        let metadata = self.metadata.to_string();
        for field in [
            self.event_id.as_bytes().as_slice(),
            &self.position.to_be_bytes(),
            self.aggregate_type.as_bytes(),
            self.aggregate_id.as_bytes(),
            &self.sequence.to_be_bytes(),
            self.event_type.as_bytes(),
            self.event_version.as_bytes(),
            payload.as_bytes(),
            metadata.as_bytes(),
        ] {
            bytes.extend_from_slice(&(field.len() as u64).to_be_bytes());
            bytes.extend_from_slice(field);
        }
        bytes
    }

    /// A metadata field (actor, correlation_id, causation_id, command_id, …).
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(Value::as_str)
    }

    /// The payload as a domain event, after applying `upcasters` (docs/architecture.md rule 7).
    pub fn decode<E: DeserializeOwned>(
        &self,
        upcasters: &[Box<dyn EventUpcaster>],
    ) -> anyhow::Result<E> {
        let mut serialized = SerializedEvent::new(
            self.aggregate_id.clone(),
            usize::try_from(self.sequence).unwrap_or(0),
            self.aggregate_type.clone(),
            self.event_type.clone(),
            self.event_version.clone(),
            self.payload.clone(),
            self.metadata.clone(),
        );
        for upcaster in upcasters {
            if upcaster.can_upcast(&serialized.event_type, &serialized.event_version) {
                serialized = upcaster.upcast(serialized);
            }
        }
        serde_json::from_value(serialized.payload).with_context(|| {
            format!(
                "decoding event {} ({} v{}) at position {}",
                self.event_id, self.event_type, self.event_version, self.position
            )
        })
    }
}

const PG_COLUMNS: &str = "position, tx_id::text AS tx, event_id, recorded_at, aggregate_type, \
     aggregate_id, sequence, event_type, event_version, payload, metadata";
const SQLITE_COLUMNS: &str = "position, event_id, recorded_at, aggregate_type, aggregate_id, \
     sequence, event_type, event_version, payload, metadata";

impl Store {
    /// Up to `limit` events after `after`, in log order, never past an event that could
    /// still be preceded by one committing later.
    pub async fn read_log(&self, after: LogCursor, limit: i64) -> anyhow::Result<Vec<StoredEvent>> {
        match &self.typed {
            Typed::Postgres(pool) => {
                let sql = format!(
                    "SELECT {PG_COLUMNS} FROM events \
                     WHERE (tx_id, position) > ($1::text::xid8, $2) \
                       AND tx_id < pg_snapshot_xmin(pg_current_snapshot()) \
                     ORDER BY tx_id, position LIMIT $3"
                );
                let rows = sqlx::query(&sql)
                    .bind(after.tx.to_string())
                    .bind(after.position)
                    .bind(limit)
                    .fetch_all(pool)
                    .await
                    .context("reading the event log")?;
                rows.iter().map(pg_row).collect()
            }
            Typed::Sqlite(pool) => {
                let sql = format!(
                    "SELECT {SQLITE_COLUMNS} FROM events WHERE position > $1 \
                     ORDER BY position LIMIT $2"
                );
                let rows = sqlx::query(&sql)
                    .bind(after.position)
                    .bind(limit)
                    .fetch_all(pool)
                    .await
                    .context("reading the event log")?;
                rows.iter().map(sqlite_row).collect()
            }
        }
    }

    /// Whether committed events exist after `after` (PostgreSQL only; on SQLite the log
    /// holds nothing back). Called when [`Store::read_log`] returned nothing more: a
    /// `true` means events are held back behind a running transaction, so the consumer
    /// should look again shortly rather than wait for the next notification.
    pub async fn log_held_back(&self, after: LogCursor) -> anyhow::Result<bool> {
        match &self.typed {
            Typed::Postgres(pool) => {
                // Any committed event beyond the cursor counts, whatever the horizon
                // is now: comparing with a horizon taken later than the read's would
                // miss an event that became readable in between.
                let row = sqlx::query(
                    "SELECT EXISTS (SELECT 1 FROM events \
                     WHERE (tx_id, position) > ($1::text::xid8, $2))",
                )
                .bind(after.tx.to_string())
                .bind(after.position)
                .fetch_one(pool)
                .await
                .context("checking the log horizon")?;
                Ok(row.try_get::<bool, _>(0)?)
            }
            Typed::Sqlite(_) => Ok(false),
        }
    }

    /// The cursor from which reading yields the event at `position` and everything
    /// after it in log order (`position` 0 or 1: the whole log). When no event has that
    /// position (a rolled-back allocation), the next higher one is used.
    pub async fn cursor_at_position(&self, position: i64) -> anyhow::Result<LogCursor> {
        if position <= 1 {
            return Ok(LogCursor::START);
        }
        match &self.typed {
            Typed::Postgres(pool) => {
                let row = sqlx::query(
                    "SELECT tx_id::text, position FROM events WHERE position >= $1 \
                     ORDER BY position LIMIT 1",
                )
                .bind(position)
                .fetch_optional(pool)
                .await
                .context("looking up a log position")?;
                match row {
                    // Just before that event in (tx_id, position) order.
                    Some(row) => Ok(LogCursor {
                        tx: parse_tx(&row.try_get::<String, _>(0)?)?,
                        position: row.try_get::<i64, _>(1)? - 1,
                    }),
                    None => self.log_end().await,
                }
            }
            Typed::Sqlite(_) => Ok(LogCursor {
                tx: position - 1,
                position: position - 1,
            }),
        }
    }

    /// The cursor just after the event at `position` in log order (resuming after an
    /// event a client last saw), or, when there is no such event, the cursor from which
    /// reading yields the events after `position`.
    pub async fn cursor_after_position(&self, position: i64) -> anyhow::Result<LogCursor> {
        if position <= 0 {
            return Ok(LogCursor::START);
        }
        match &self.typed {
            Typed::Postgres(pool) => {
                let tx: Option<String> =
                    sqlx::query_scalar("SELECT tx_id::text FROM events WHERE position = $1")
                        .bind(position)
                        .fetch_optional(pool)
                        .await
                        .context("looking up a log position")?;
                match tx {
                    Some(tx) => Ok(LogCursor {
                        tx: parse_tx(&tx)?,
                        position,
                    }),
                    None => match position.checked_add(1) {
                        Some(next) => self.cursor_at_position(next).await,
                        None => self.log_end().await,
                    },
                }
            }
            Typed::Sqlite(_) => Ok(LogCursor {
                tx: position,
                position,
            }),
        }
    }

    /// The cursor after the last event currently readable.
    pub async fn log_end(&self) -> anyhow::Result<LogCursor> {
        match &self.typed {
            Typed::Postgres(pool) => {
                let row = sqlx::query(
                    "SELECT tx_id::text, position FROM events \
                     WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot()) \
                     ORDER BY tx_id DESC, position DESC LIMIT 1",
                )
                .fetch_optional(pool)
                .await
                .context("finding the end of the log")?;
                match row {
                    Some(row) => Ok(LogCursor {
                        tx: parse_tx(&row.try_get::<String, _>(0)?)?,
                        position: row.try_get::<i64, _>(1)?,
                    }),
                    None => Ok(LogCursor::START),
                }
            }
            Typed::Sqlite(pool) => {
                let row = sqlx::query("SELECT coalesce(max(position), 0) FROM events")
                    .fetch_one(pool)
                    .await
                    .context("finding the end of the log")?;
                let position: i64 = row.try_get(0)?;
                Ok(LogCursor {
                    tx: position,
                    position,
                })
            }
        }
    }

    /// The committed events at `positions` (any order; absent positions are left out),
    /// for checks that re-read what a read model recorded.
    pub async fn events_at(&self, positions: &[i64]) -> anyhow::Result<Vec<StoredEvent>> {
        if positions.is_empty() {
            return Ok(Vec::new());
        }
        // Integers only, so the list is safe to inline.
        let list = positions
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        match &self.typed {
            Typed::Postgres(pool) => {
                let sql = format!("SELECT {PG_COLUMNS} FROM events WHERE position IN ({list})");
                let rows = sqlx::query(&sql)
                    .fetch_all(pool)
                    .await
                    .context("reading events by position")?;
                rows.iter().map(pg_row).collect()
            }
            Typed::Sqlite(pool) => {
                let sql = format!("SELECT {SQLITE_COLUMNS} FROM events WHERE position IN ({list})");
                let rows = sqlx::query(&sql)
                    .fetch_all(pool)
                    .await
                    .context("reading events by position")?;
                rows.iter().map(sqlite_row).collect()
            }
        }
    }

    /// Where an aggregate's event sits in the log, once committed: a consumer whose
    /// cursor is at or past it has processed it (read-your-writes).
    pub async fn cursor_of(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        sequence: i64,
    ) -> anyhow::Result<Option<LogCursor>> {
        let found = match &self.typed {
            Typed::Postgres(pool) => sqlx::query_as::<_, (String, i64)>(
                "SELECT tx_id::text, position FROM events \
                 WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = $3",
            )
            .bind(aggregate_type)
            .bind(aggregate_id)
            .bind(sequence)
            .fetch_optional(pool)
            .await
            .context("looking up an event's position")?
            .map(|(tx, position)| parse_tx(&tx).map(|tx| LogCursor { tx, position }))
            .transpose()?,
            Typed::Sqlite(pool) => sqlx::query_scalar::<_, i64>(
                "SELECT position FROM events \
                 WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = $3",
            )
            .bind(aggregate_type)
            .bind(aggregate_id)
            .bind(sequence)
            .fetch_optional(pool)
            .await
            .context("looking up an event's position")?
            .map(|position| LogCursor {
                tx: position,
                position,
            }),
        };
        Ok(found)
    }
}

fn parse_tx(text: &str) -> anyhow::Result<i64> {
    text.parse::<i64>()
        .with_context(|| format!("transaction id {text} out of range"))
}

fn pg_row(row: &sqlx::postgres::PgRow) -> anyhow::Result<StoredEvent> {
    Ok(StoredEvent {
        position: row.try_get("position")?,
        tx: parse_tx(&row.try_get::<String, _>("tx")?)?,
        event_id: row.try_get("event_id")?,
        recorded_at: row.try_get("recorded_at")?,
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence: row.try_get("sequence")?,
        event_type: row.try_get("event_type")?,
        event_version: row.try_get("event_version")?,
        payload: row.try_get("payload")?,
        metadata: row.try_get("metadata")?,
    })
}

fn sqlite_row(row: &sqlx::sqlite::SqliteRow) -> anyhow::Result<StoredEvent> {
    let position: i64 = row.try_get("position")?;
    let event_id: String = row.try_get("event_id")?;
    let recorded_at: String = row.try_get("recorded_at")?;
    let payload: String = row.try_get("payload")?;
    let metadata: String = row.try_get("metadata")?;
    Ok(StoredEvent {
        position,
        tx: position,
        event_id: Uuid::parse_str(&event_id).context("stored event id")?,
        recorded_at: DateTime::parse_from_rfc3339(&recorded_at)
            .context("stored event time")?
            .with_timezone(&Utc),
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence: row.try_get("sequence")?,
        event_type: row.try_get("event_type")?,
        event_version: row.try_get("event_version")?,
        payload: serde_json::from_str(&payload).context("stored event payload")?,
        metadata: serde_json::from_str(&metadata).context("stored event metadata")?,
    })
}
