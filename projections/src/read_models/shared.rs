//! What the read models share: decoding events, writing rows, and paging reads.

use anyhow::Context;
use cqrs_es::persist::EventUpcaster;
use cqrs_es::Aggregate;
use domain::access::AccessRequest;
use domain::doctor::Doctor;
use domain::patient::Patient;
use domain::record::MedicalRecord;
use eventstore::consumer::ReadModelTx;
use serde::Serialize;
use sqlx::{AnyPool, Row};

pub(crate) type PatientEvent = <Patient as Aggregate>::Event;
pub(crate) type DoctorEvent = <Doctor as Aggregate>::Event;
pub(crate) type AccessEvent = <AccessRequest as Aggregate>::Event;
pub(crate) type RecordEvent = <MedicalRecord as Aggregate>::Event;

/// The domain's upcasters, applied to every event a projection decodes.
pub(crate) struct Upcasters(pub(crate) Vec<Box<dyn EventUpcaster>>);

impl Default for Upcasters {
    fn default() -> Self {
        Upcasters(domain::upcast::upcasters())
    }
}

pub(crate) async fn exec(tx: &mut ReadModelTx, sql: &str, binds: Vec<Bind>) -> anyhow::Result<()> {
    let mut query = sqlx::query(sql);
    for bind in binds {
        query = match bind {
            Bind::Text(s) => query.bind(s),
            Bind::OptText(s) => query.bind(s),
            Bind::Int(i) => query.bind(i),
        };
    }
    query.execute(&mut **tx).await?;
    Ok(())
}

/// A bound parameter; read models hold only text and integers so one SQL text serves
/// SQLite and PostgreSQL.
pub(crate) enum Bind {
    Text(String),
    OptText(Option<String>),
    Int(i64),
}

pub(crate) use Bind::{Int, OptText, Text};

/// One page of a list; `next_cursor` is `None` on the last page.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<i64>,
}

/// `items` (fetched with one more than `limit`) as a page: the extra one, if there,
/// only says a next page exists.
pub fn page<T>(mut items: Vec<T>, limit: i64, position: impl Fn(&T) -> i64) -> Page<T> {
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(position)
    } else {
        None
    };
    Page { items, next_cursor }
}

/// Every row of a read-model table, as text, in a stable order (rebuild checks).
pub async fn dump_table(pool: &AnyPool, table: &str) -> anyhow::Result<Vec<Vec<Option<String>>>> {
    let rows = sqlx::query(&format!("SELECT * FROM {table} ORDER BY 1"))
        .fetch_all(pool)
        .await
        .with_context(|| format!("dumping {table}"))?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let mut cells = Vec::new();
        for (i, _) in row.columns().iter().enumerate() {
            let cell = match row.try_get::<Option<String>, _>(i) {
                Ok(v) => v,
                Err(_) => row.try_get::<Option<i64>, _>(i)?.map(|n| n.to_string()),
            };
            cells.push(cell);
        }
        out.push(cells);
    }
    Ok(out)
}

/// A read model's DDL, kept in `projections/sql/<name>.sql`: statements ended by `;`,
/// `--` comments, and a header line `-- schema version: N` (none: not versioned, the
/// tables are created if missing and never rebuilt on their own).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Schema(pub &'static str);

impl Schema {
    pub(crate) fn version(self) -> u32 {
        self.0
            .lines()
            .find_map(|line| line.trim().strip_prefix("-- schema version:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    pub(crate) fn statements(self) -> Vec<String> {
        let text: Vec<&str> = self
            .0
            .lines()
            .filter(|line| !line.trim_start().starts_with("--"))
            .collect();
        text.join("\n")
            .split(';')
            .map(str::trim)
            .filter(|statement| !statement.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use eventstore::{Backend, Kind};

    /// Every read model's DDL file parses into CREATE statements, and every projection
    /// but the audit trail (never rebuilt on its own) has a schema version.
    #[test]
    fn every_read_model_has_versioned_ddl() {
        for handler in crate::all() {
            let name = handler.name().to_owned();
            let statements = handler.schema(Backend::Sqlite);
            assert!(!statements.is_empty(), "{name}");
            for statement in &statements {
                assert!(statement.starts_with("CREATE "), "{name}: {statement}");
                assert!(
                    !statement.contains(';') && !statement.contains("--"),
                    "{name}"
                );
            }
            assert_eq!(handler.kind(), Kind::Projection, "{name}");
            match name.as_str() {
                "audit_trail" => assert_eq!(handler.schema_version(), 0),
                _ => assert!(handler.schema_version() >= 1, "{name}"),
            }
        }
    }
}
