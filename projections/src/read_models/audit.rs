//! The audit trail: its projection, auditors' reads of it, and its tamper evidence, a
//! hash chain over the event log.
//!
//! The audit projection ([`crate::AuditTrail`]) gives every event, in log order, the
//! hash `SHA-256(previous hash ‖ event ‖ time)` where the event is encoded field by
//! field, each length-prefixed (its id, position, aggregate, sequence, type, version,
//! payload and metadata as stored), then its recorded time. [`verify`] re-reads the events from the log and
//! checks every link against the hashes recorded: an event modified or deleted after it
//! was recorded breaks its link, and so does a recorded hash rewritten to cover it up
//! (the next link then fails). The same trail's Merkle roots can also be anchored on
//! chain (`afyachain audit verify`), which covers a rewrite of the whole tail.

use crate::read_models::shared::Schema;
use std::collections::HashMap;

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use eventstore::consumer::ReadModelTx;
use eventstore::{Backend, LogHandler, Store, StoredEvent};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::AnyPool;

use super::access_log::AccessLogRow;
use super::shared::{exec, page, Int, OptText, Page, Text};
use crate::codec::time;

/// The tables, from `projections/sql/audit_trail.sql`.
const SCHEMA: Schema = Schema(include_str!("../../sql/audit_trail.sql"));

/// The "previous hash" of the first event.
pub const GENESIS: [u8; 32] = [0; 32];

/// How many rows a verification reads at once.
const BATCH: i64 = 1000;

/// At most this many problems are listed (all are counted).
const MAX_LISTED: usize = 100;

/// The whole event history for auditors, one row per event in log order (`ordinal`,
/// 1-based, the order the log is consumed in, so a cursor never skips an event that
/// committed late), with its metadata lifted into columns to filter on. Payloads are
/// kept as stored: personal fields stay sealed.
///
/// Each row also carries `hash`, SHA-256 over the previous row's hash and the event as
/// stored ([`crate::audit::chain_hash`]): a hash chain that
/// [`crate::audit::verify`] recomputes from the event log, so an event modified or
/// deleted after it was recorded here is detected.
#[derive(Default)]
pub struct AuditTrail;

#[async_trait]
impl LogHandler for AuditTrail {
    fn name(&self) -> &str {
        "audit_trail"
    }

    fn schema(&self, _: Backend) -> Vec<String> {
        SCHEMA.statements()
    }

    fn schema_version(&self) -> u32 {
        SCHEMA.version()
    }

    fn tables(&self) -> Vec<String> {
        vec!["rm_audit_trail".into()]
    }

    async fn apply(&self, tx: &mut ReadModelTx, event: &StoredEvent) -> anyhow::Result<()> {
        let columns = crate::audit::TrailColumns::of(event);
        let last: Option<(i64, String)> = sqlx::query_as(
            "SELECT ordinal, hash FROM rm_audit_trail ORDER BY ordinal DESC LIMIT 1",
        )
        .fetch_optional(&mut **tx)
        .await?;
        let (ordinal, prev) = match last {
            Some((ordinal, hash)) => (ordinal + 1, crate::audit::parse_hash(&hash)?),
            None => (1, crate::audit::GENESIS),
        };
        let hash = crate::audit::chain_hash(&prev, event);
        exec(
            tx,
            "INSERT INTO rm_audit_trail (ordinal, position, event_id, recorded_at, \
             aggregate_type, aggregate_id, sequence, event_type, event_version, actor, \
             correlation_id, causation_id, payload, hash) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
            vec![
                Int(ordinal),
                Int(event.position),
                Text(event.event_id.to_string()),
                Text(columns.recorded_at),
                Text(columns.aggregate_type),
                Text(columns.aggregate_id),
                Int(columns.sequence),
                Text(columns.event_type),
                Text(columns.event_version),
                Text(columns.actor),
                OptText(columns.correlation_id),
                OptText(columns.causation_id),
                Text(columns.payload),
                Text(crate::audit::hex(&hash)),
            ],
        )
        .await
    }
}

/// One event of the audit history.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct AuditEventRow {
    pub ordinal: i64,
    pub position: i64,
    pub event_id: String,
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub event: crate::audit::TrailColumns,
    /// This event's link in the trail's hash chain (hex).
    pub hash: String,
}

/// Filters of the audit history; `None` leaves a field unfiltered.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    pub event_type: Option<String>,
    pub actor: Option<String>,
    pub from_time: Option<DateTime<Utc>>,
    pub to_time: Option<DateTime<Utc>>,
    pub from_position: Option<i64>,
}

/// The events matching `filter` after ordinal `after`, in log order.
pub async fn audit_events(
    pool: &AnyPool,
    filter: &AuditFilter,
    after: i64,
    limit: i64,
) -> anyhow::Result<Page<AuditEventRow>> {
    let text = |v: &Option<String>| v.clone().unwrap_or_default();
    let from_time = filter.from_time.as_ref().map(time).unwrap_or_default();
    let to_time = filter.to_time.as_ref().map(time).unwrap_or_default();
    let rows: Vec<AuditEventRow> = sqlx::query_as(
        "SELECT ordinal, position, event_id, recorded_at, aggregate_type, aggregate_id, \
         sequence, event_type, event_version, actor, correlation_id, causation_id, payload, \
         hash FROM rm_audit_trail WHERE ordinal > $1 \
         AND ($2 = '' OR aggregate_type = $3) AND ($4 = '' OR aggregate_id = $5) \
         AND ($6 = '' OR event_type = $7) AND ($8 = '' OR actor = $9) \
         AND ($10 = '' OR recorded_at >= $11) AND ($12 = '' OR recorded_at < $13) \
         AND position >= $14 ORDER BY ordinal LIMIT $15",
    )
    .bind(after)
    .bind(text(&filter.aggregate_type))
    .bind(text(&filter.aggregate_type))
    .bind(text(&filter.aggregate_id))
    .bind(text(&filter.aggregate_id))
    .bind(text(&filter.event_type))
    .bind(text(&filter.event_type))
    .bind(text(&filter.actor))
    .bind(text(&filter.actor))
    .bind(from_time.clone())
    .bind(from_time)
    .bind(to_time.clone())
    .bind(to_time)
    .bind(filter.from_position.unwrap_or(0))
    .bind(limit + 1)
    .fetch_all(pool)
    .await
    .context("reading the audit history")?;
    Ok(page(rows, limit, |r| r.ordinal))
}

/// The chain link of `event` after `prev`: SHA-256 over `prev`, the event as stored
/// ([`StoredEvent::canonical_bytes`]) and its recorded time, length-prefixed.
pub fn chain_hash(prev: &[u8; 32], event: &StoredEvent) -> [u8; 32] {
    let time = time(&event.recorded_at);
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update(event.canonical_bytes());
    hasher.update((time.len() as u64).to_be_bytes());
    hasher.update(time.as_bytes());
    hasher.finalize().into()
}

/// What the trail keeps of an event besides its place and link: the columns auditors
/// filter on and the payload, as the projection writes them and verification expects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct TrailColumns {
    pub recorded_at: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub actor: String,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub payload: String,
}

impl TrailColumns {
    pub fn of(event: &StoredEvent) -> TrailColumns {
        let meta = |name: &str| event.meta(name).map(str::to_owned);
        TrailColumns {
            recorded_at: time(&event.recorded_at),
            aggregate_type: event.aggregate_type.clone(),
            aggregate_id: event.aggregate_id.clone(),
            sequence: event.sequence,
            event_type: event.event_type.clone(),
            event_version: event.event_version.clone(),
            actor: meta("actor").unwrap_or_default(),
            correlation_id: meta("correlation_id"),
            causation_id: meta("causation_id"),
            payload: event.payload.to_string(),
        }
    }
}

/// Lower-case hex of a hash.
pub fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A recorded hash back as bytes.
pub fn parse_hash(text: &str) -> anyhow::Result<[u8; 32]> {
    let mut out = [0u8; 32];
    if text.len() != 64 || !text.is_ascii() {
        anyhow::bail!("a recorded chain hash is not 64 hex digits");
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
            .context("a recorded chain hash is not hex")?;
    }
    Ok(out)
}

/// What is wrong at one place of the trail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChainProblemKind {
    /// The event no longer hashes to its link: it (or the link) was changed.
    Modified,
    /// The event the trail recorded is no longer in the log.
    Missing,
    /// The log holds another event at that position.
    Replaced,
    /// Ordinals are not contiguous: rows of the trail itself were removed.
    Gap,
    /// The trail's copy of the event (actor, time, type, aggregate, payload) differs
    /// from the log: what auditors filter on was changed.
    Altered,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChainProblem {
    pub ordinal: i64,
    pub position: i64,
    pub event_id: String,
    pub problem: ChainProblemKind,
}

/// The outcome of one verification.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    /// First and last ordinal checked (`to` is 0 when nothing was there to check).
    pub from: i64,
    pub to: i64,
    pub checked: u64,
    /// True when every link in the range holds.
    pub intact: bool,
    pub problems_total: u64,
    /// The first problems found (at most 100), in log order.
    pub problems: Vec<ChainProblem>,
    /// The recorded hash of the last event checked: a value to keep (or compare with an
    /// earlier report) that commits to everything before it.
    pub head: Option<String>,
}

#[derive(sqlx::FromRow)]
struct TrailRow {
    ordinal: i64,
    position: i64,
    event_id: String,
    hash: String,
    #[sqlx(flatten)]
    columns: TrailColumns,
}

/// Rechecks the links of ordinals `from..=to` (`to` `None`: to the end of the trail)
/// against the events in the log.
pub async fn verify(store: &Store, from: i64, to: Option<i64>) -> anyhow::Result<ChainReport> {
    let from = from.max(1);
    let to = to.unwrap_or(i64::MAX);
    let pool = store.any_pool();
    let mut report = ChainReport {
        from,
        to: 0,
        checked: 0,
        intact: true,
        problems_total: 0,
        problems: Vec::new(),
        head: None,
    };
    let mut prev = if from == 1 {
        GENESIS
    } else {
        let hash: Option<String> =
            sqlx::query_scalar("SELECT hash FROM rm_audit_trail WHERE ordinal = $1")
                .bind(from - 1)
                .fetch_optional(pool)
                .await
                .context("reading the audit trail")?;
        match hash {
            Some(hash) => parse_hash(&hash)?,
            None => {
                report.problems_total += 1;
                report.problems.push(ChainProblem {
                    ordinal: from - 1,
                    position: 0,
                    event_id: String::new(),
                    problem: ChainProblemKind::Gap,
                });
                GENESIS
            }
        }
    };
    let mut expected = from;
    let mut after = from - 1;
    loop {
        let rows: Vec<TrailRow> = sqlx::query_as(
            "SELECT ordinal, position, event_id, hash, recorded_at, aggregate_type, \
             aggregate_id, sequence, event_type, event_version, actor, correlation_id, \
             causation_id, payload FROM rm_audit_trail \
             WHERE ordinal > $1 AND ordinal <= $2 ORDER BY ordinal LIMIT $3",
        )
        .bind(after)
        .bind(to)
        .bind(BATCH)
        .fetch_all(pool)
        .await
        .context("reading the audit trail")?;
        let Some(last) = rows.last() else {
            break;
        };
        after = last.ordinal;
        let positions: Vec<i64> = rows.iter().map(|r| r.position).collect();
        let events: HashMap<i64, StoredEvent> = store
            .events_at(&positions)
            .await?
            .into_iter()
            .map(|e| (e.position, e))
            .collect();
        for TrailRow {
            ordinal,
            position,
            event_id,
            hash,
            columns,
        } in rows
        {
            let recorded = parse_hash(&hash)?;
            let mut found = |problem| {
                report.problems_total += 1;
                if report.problems.len() < MAX_LISTED {
                    report.problems.push(ChainProblem {
                        ordinal,
                        position,
                        event_id: event_id.clone(),
                        problem,
                    });
                }
            };
            if ordinal != expected {
                found(ChainProblemKind::Gap);
            }
            match events.get(&position) {
                None => found(ChainProblemKind::Missing),
                Some(event) if event.event_id.to_string() != event_id => {
                    found(ChainProblemKind::Replaced)
                }
                Some(event) if chain_hash(&prev, event) != recorded => {
                    found(ChainProblemKind::Modified)
                }
                Some(event) if TrailColumns::of(event) != columns => {
                    found(ChainProblemKind::Altered)
                }
                Some(_) => {}
            }
            // Each link is checked on its own against the recorded hash before it, so
            // one changed event is reported once, not for the whole tail.
            prev = recorded;
            expected = ordinal + 1;
            report.checked += 1;
            report.to = ordinal;
            report.head = Some(hash);
        }
    }
    report.intact = report.problems_total == 0;
    Ok(report)
}

/// Why a read was not covered by an active grant at the time it was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UncoveredReason {
    /// The read names no access request.
    NoRequest,
    /// The request it names is unknown.
    UnknownRequest,
    /// The request is another doctor's or another patient's.
    OtherParty,
    /// The request was never approved (pending or rejected).
    NotApproved,
    /// Read before the approval.
    BeforeApproval,
    /// Read at or after the grant was revoked.
    AfterRevocation,
    /// Read at or after the grant expired.
    AfterExpiry,
    /// The grant does not cover the record's category or the record.
    OutOfScope,
}

impl UncoveredReason {
    /// A grant was used after it had ended.
    pub fn is_after_end(self) -> bool {
        matches!(
            self,
            UncoveredReason::AfterRevocation | UncoveredReason::AfterExpiry
        )
    }
}

/// A doctor's read of a record that no active grant covered.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UncoveredRead {
    #[serde(flatten)]
    pub read: AccessLogRow,
    pub reason: UncoveredReason,
}

#[derive(sqlx::FromRow)]
struct ReadWithGrant {
    #[sqlx(flatten)]
    read: AccessLogRow,
    grant_patient: Option<String>,
    grant_doctor: Option<String>,
    grant_status: Option<String>,
    grant_scope: Option<String>,
    decided_at: Option<String>,
    expires_at: Option<String>,
    closed_at: Option<String>,
}

impl ReadWithGrant {
    fn uncovered(&self) -> Option<UncoveredReason> {
        use UncoveredReason::*;
        if self.read.request_id.is_none() {
            return Some(NoRequest);
        }
        let (Some(patient), Some(doctor), Some(status)) =
            (&self.grant_patient, &self.grant_doctor, &self.grant_status)
        else {
            return Some(UnknownRequest);
        };
        if Some(doctor.as_str()) != self.read.accessor.strip_prefix("doctor:")
            || *patient != self.read.patient_id
        {
            return Some(OtherParty);
        }
        // `expires_at` is set by the approval only.
        let (Some(approved_at), Some(expires_at)) = (&self.decided_at, &self.expires_at) else {
            return Some(NotApproved);
        };
        if status == "rejected" || status == "pending" {
            return Some(NotApproved);
        }
        // Times are all written in one fixed RFC 3339 form, so they compare as text.
        let at = self.read.accessed_at.as_str();
        if at < approved_at.as_str() {
            return Some(BeforeApproval);
        }
        if let Some(closed_at) = &self.closed_at {
            if at >= closed_at.as_str() {
                return Some(if status == "revoked" {
                    AfterRevocation
                } else {
                    AfterExpiry
                });
            }
        }
        if at >= expires_at.as_str() {
            return Some(AfterExpiry);
        }
        let scope: serde_json::Value = self
            .grant_scope
            .as_deref()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default();
        let lists = |key: &str, wanted: &str| {
            scope
                .get(key)
                .and_then(serde_json::Value::as_array)
                .is_some_and(|items| items.iter().any(|v| v.as_str() == Some(wanted)))
        };
        if !lists("categories", &self.read.category) && !lists("record_ids", &self.read.record_id) {
            return Some(OutOfScope);
        }
        None
    }
}

/// Doctors' reads after log position `after` that no active grant covered at the time
/// (`after_end_only`: only those made under a grant already revoked or expired), at
/// most `limit`, in log order. Both lists must be empty on a sound system.
pub async fn uncovered_reads(
    pool: &sqlx::AnyPool,
    after: i64,
    limit: i64,
    after_end_only: bool,
) -> anyhow::Result<Page<UncoveredRead>> {
    let mut found = Vec::new();
    let mut scanned = after;
    while (found.len() as i64) <= limit {
        let rows: Vec<ReadWithGrant> = sqlx::query_as(
            "SELECT l.position, l.event_id, l.patient_id, l.record_id, l.accessor, \
             l.request_id, l.category, l.accessed_at, r.patient_id AS grant_patient, \
             r.doctor_id AS grant_doctor, r.status AS grant_status, r.scope AS grant_scope, \
             r.decided_at, r.expires_at, r.closed_at \
             FROM rm_access_log l LEFT JOIN rm_access_requests r ON r.request_id = l.request_id \
             WHERE l.position > $1 AND l.accessor LIKE 'doctor:%' ORDER BY l.position LIMIT $2",
        )
        .bind(scanned)
        .bind(BATCH)
        .fetch_all(pool)
        .await
        .context("reading the access log")?;
        let Some(last) = rows.last() else {
            break;
        };
        scanned = last.read.position;
        for row in rows {
            let Some(reason) = row.uncovered() else {
                continue;
            };
            if after_end_only && !reason.is_after_end() {
                continue;
            }
            found.push(UncoveredRead {
                read: row.read,
                reason,
            });
        }
    }
    Ok(page(found, limit, |r| r.read.position))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn event(payload: serde_json::Value) -> StoredEvent {
        StoredEvent {
            position: 7,
            tx: 7,
            event_id: uuid::Uuid::nil(),
            recorded_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            aggregate_type: "session".into(),
            aggregate_id: "a".into(),
            sequence: 1,
            event_type: "SessionEnded".into(),
            event_version: "1.0".into(),
            payload,
            metadata: serde_json::json!({"actor": "system"}),
        }
    }

    #[test]
    fn a_link_depends_on_the_event_and_the_previous_hash() {
        let a = event(serde_json::json!({"x": 1}));
        let b = event(serde_json::json!({"x": 2}));
        let h = chain_hash(&GENESIS, &a);
        assert_eq!(h, chain_hash(&GENESIS, &a));
        assert_ne!(h, chain_hash(&GENESIS, &b));
        assert_ne!(h, chain_hash(&[1; 32], &a));
        assert_eq!(parse_hash(&hex(&h)).unwrap(), h);
        assert!(parse_hash("zz").is_err());
        assert!(parse_hash(&"g".repeat(64)).is_err());
    }
}
