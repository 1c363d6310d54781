//! Test support: a fresh database per test on either backend, and a tiny aggregate.
#![allow(clippy::panic)] // test support: a failed setup must fail the test loudly
//!
//! PostgreSQL tests use `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`)
//! to create a database of their own. When PostgreSQL is unreachable they are skipped
//! with a message, except under `CI=true`, where they fail.

use std::path::PathBuf;

use anyhow::Context;
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgConnection};

use crate::store::{Backend, Store, StoreConfig};

const DEFAULT_TEST_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A fresh, empty store that removes itself on [`TestStore::cleanup`].
pub struct TestStore {
    pub store: Store,
    pub config: StoreConfig,
    admin_url: Option<String>,
    db_name: Option<String>,
    dir: Option<PathBuf>,
}

/// The base PostgreSQL URL tests connect to.
pub fn postgres_admin_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_TEST_URL.to_owned())
}

/// Whether this is a CI run (`CI=true` or `1`): tests that would skip for want of a
/// service fail instead.
pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// A new empty database's config for `backend`, or `None` when PostgreSQL is not
/// reachable outside CI (the caller skips). Panics in CI when it is unreachable.
pub async fn fresh_config(
    backend: Backend,
) -> Option<(StoreConfig, Option<String>, Option<String>, Option<PathBuf>)> {
    match backend {
        Backend::Sqlite => {
            let dir = std::env::temp_dir().join(format!("afya-test-{}", uuid::Uuid::new_v4()));
            Some((
                StoreConfig::Sqlite {
                    path: dir.join("afyachain.db"),
                },
                None,
                None,
                Some(dir),
            ))
        }
        Backend::Postgres => {
            let admin = postgres_admin_url();
            let mut conn = connect_admin(&admin, in_ci()).await?;
            drop_stale_databases(&mut conn).await;
            let name = format!(
                "afya_test_{}_{}",
                chrono::Utc::now().timestamp(),
                uuid::Uuid::new_v4().simple()
            );
            if let Err(error) = sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await
            {
                panic!("could not create test database: {error}");
            }
            let _ = conn.close().await;
            let url = replace_db(&admin, &name);
            Some((StoreConfig::Postgres { url }, Some(admin), Some(name), None))
        }
    }
}

/// Connects to the PostgreSQL that tests use. Unreachable: `None` (skip, with a
/// message) outside CI; a panic under CI, where skipping would hide the tests.
pub async fn connect_admin(url: &str, ci: bool) -> Option<PgConnection> {
    match PgConnection::connect(url).await {
        Ok(conn) => Some(conn),
        Err(error) => {
            if ci {
                panic!("CI=true and PostgreSQL is unreachable at DATABASE_URL: {error}");
            }
            eprintln!("SKIPPED: PostgreSQL unreachable ({error}); set DATABASE_URL");
            None
        }
    }
}

/// Test databases are dropped by their test; one whose test panicked is left behind.
/// Those older than two hours (the creation time is in the name) are dropped here.
async fn drop_stale_databases(conn: &mut PgConnection) {
    let Ok(names) = sqlx::query_scalar::<_, String>(
        "SELECT datname FROM pg_database WHERE datname LIKE 'afya\\_test\\_%'",
    )
    .fetch_all(&mut *conn)
    .await
    else {
        return;
    };
    let cutoff = chrono::Utc::now().timestamp() - 2 * 3600;
    for name in names {
        let created = name
            .strip_prefix("afya_test_")
            .and_then(|rest| rest.split('_').next())
            .and_then(|secs| secs.parse::<i64>().ok());
        // Names without a time (older test runs) count as stale too.
        if created.is_none_or(|secs| secs < cutoff) {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .execute(&mut *conn)
                .await;
        }
    }
}

/// Replaces the database name of a PostgreSQL URL.
pub fn replace_db(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    // postgres://user@host:port/dbname: the path is after the third slash.
    let prefix = match base.match_indices('/').nth(2) {
        Some((i, _)) => &base[..i],
        None => base,
    };
    match query {
        Some(q) => format!("{prefix}/{db}?{q}"),
        None => format!("{prefix}/{db}"),
    }
}

impl TestStore {
    /// Opens a fresh store on `backend`; `None` means skip (PostgreSQL unreachable,
    /// outside CI).
    pub async fn new(backend: Backend) -> Option<TestStore> {
        let (config, admin_url, db_name, dir) = fresh_config(backend).await?;
        let store = match Store::open(config.clone()).await {
            Ok(store) => store,
            Err(error) => panic!("opening test store: {error:#}"),
        };
        Some(TestStore {
            store,
            config,
            admin_url,
            db_name,
            dir,
        })
    }

    /// Closes the store and drops its database or directory.
    pub async fn cleanup(self) -> anyhow::Result<()> {
        self.store.close().await;
        if let (Some(admin), Some(name)) = (self.admin_url, self.db_name) {
            drop_database(&admin, &name).await?;
        }
        if let Some(dir) = self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        Ok(())
    }
}

/// Drops a test database created by [`fresh_config`].
pub async fn drop_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect(admin_url).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(&mut conn)
        .await
        .context("dropping test database")?;
    Ok(())
}

/// Both backends, for running one test suite on each.
pub const BACKENDS: [Backend; 2] = [Backend::Sqlite, Backend::Postgres];

// --- a tiny aggregate for tests of the store and its consumers ----------------------

/// A counter: `Added` events (most commands) and `Reset`, two event types for tests
/// that route by type.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Counter {
    pub value: u64,
}

#[derive(Clone, Debug)]
pub enum CounterCommand {
    Add {
        n: u64,
    },
    AddTwice {
        n: u64,
    },
    /// Refused unless the value is below `limit`.
    AddIfBelow {
        n: u64,
        limit: u64,
    },
    Set {
        total: u64,
    },
    Reset,
    Refuse,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CounterEvent {
    Added { n: u64, total: u64 },
    Reset,
}

impl DomainEvent for CounterEvent {
    fn event_type(&self) -> String {
        match self {
            CounterEvent::Added { .. } => "Added".into(),
            CounterEvent::Reset => "Reset".into(),
        }
    }
    fn event_version(&self) -> String {
        "1.0".into()
    }
}

#[derive(Debug, PartialEq, thiserror::Error)]
#[error("refused")]
pub struct Refused;

impl Aggregate for Counter {
    const TYPE: &'static str = "counter";
    type Command = CounterCommand;
    type Event = CounterEvent;
    type Error = Refused;
    type Services = ();

    async fn handle(
        &mut self,
        command: CounterCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), Refused> {
        match command {
            CounterCommand::Add { n } => {
                let total = self.value + n;
                sink.write(CounterEvent::Added { n, total }, self).await;
            }
            CounterCommand::AddTwice { n } => {
                for _ in 0..2 {
                    let total = self.value + n;
                    sink.write(CounterEvent::Added { n, total }, self).await;
                }
            }
            CounterCommand::AddIfBelow { n, limit } => {
                if self.value >= limit {
                    return Err(Refused);
                }
                let total = self.value + n;
                sink.write(CounterEvent::Added { n, total }, self).await;
            }
            CounterCommand::Set { total } => {
                sink.write(CounterEvent::Added { n: 0, total }, self).await;
            }
            CounterCommand::Reset => sink.write(CounterEvent::Reset, self).await,
            CounterCommand::Refuse => return Err(Refused),
        }
        Ok(())
    }

    fn apply(&mut self, event: CounterEvent) {
        match event {
            CounterEvent::Added { total, .. } => self.value = total,
            CounterEvent::Reset => self.value = 0,
        }
    }
}
