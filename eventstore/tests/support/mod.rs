//! The tiny test aggregate (from `eventstore::testing`) and a recording consumer for
//! store tests.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use eventstore::consumer::ReadModelTx;
use eventstore::{Backend, LogHandler, StoredEvent};

pub use eventstore::testing::{Counter, CounterCommand, CounterEvent, Refused};

/// Records every event it sees, in a table (a duplicate would violate its primary key)
/// and in memory.
pub struct Recorder {
    pub name: String,
    pub seen: Arc<Mutex<Vec<StoredEvent>>>,
}

impl Recorder {
    pub fn new(name: &str) -> Arc<Recorder> {
        Arc::new(Recorder {
            name: name.to_owned(),
            seen: Arc::default(),
        })
    }

    pub fn table(&self) -> String {
        format!("seen_{}", self.name)
    }

    pub fn seen(&self) -> Vec<StoredEvent> {
        self.seen.lock().unwrap().clone()
    }
}

#[async_trait]
impl LogHandler for Recorder {
    fn name(&self) -> &str {
        &self.name
    }
    fn schema(&self, _: Backend) -> Vec<String> {
        vec![format!(
            "CREATE TABLE IF NOT EXISTS {} (position BIGINT PRIMARY KEY, aggregate_id TEXT NOT NULL, sequence BIGINT NOT NULL)",
            self.table()
        )]
    }
    fn tables(&self) -> Vec<String> {
        vec![self.table()]
    }
    async fn apply(&self, tx: &mut ReadModelTx, event: &StoredEvent) -> anyhow::Result<()> {
        sqlx::query(&format!(
            "INSERT INTO {} (position, aggregate_id, sequence) VALUES ($1, $2, $3)",
            self.table()
        ))
        .bind(event.position)
        .bind(event.aggregate_id.clone())
        .bind(event.sequence)
        .execute(&mut **tx)
        .await?;
        self.seen.lock().unwrap().push(event.clone());
        Ok(())
    }
}
