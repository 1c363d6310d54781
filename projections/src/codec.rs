//! Turning domain values into the plain columns of read models.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

/// A timestamp as sortable text (RFC 3339, microseconds, `Z`).
pub fn time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The serialized form of a value type, as JSON text (sets, lists).
pub fn json<T: Serialize>(value: &T) -> anyhow::Result<String> {
    Ok(serde_json::to_string(value)?)
}
