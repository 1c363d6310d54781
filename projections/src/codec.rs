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

/// A value type that serializes as a string (ids, categories, hashes, …).
pub fn text<T: Serialize>(value: &T) -> anyhow::Result<String> {
    match serde_json::to_value(value)? {
        serde_json::Value::String(s) => Ok(s),
        other => Ok(other.to_string()),
    }
}

/// A value type that serializes as an integer (sizes, durations).
pub fn int<T: Serialize>(value: &T) -> anyhow::Result<i64> {
    serde_json::to_value(value)?
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("expected an integer value"))
}
