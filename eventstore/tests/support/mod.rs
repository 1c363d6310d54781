//! A tiny aggregate and a recording consumer for store tests.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use eventstore::consumer::ReadModelTx;
use eventstore::{Backend, LogHandler, StoredEvent};
use serde::{Deserialize, Serialize};

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
    Refuse,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CounterEvent {
    Added { n: u64, total: u64 },
}

impl DomainEvent for CounterEvent {
    fn event_type(&self) -> String {
        "Added".into()
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
            CounterCommand::Refuse => return Err(Refused),
        }
        Ok(())
    }

    fn apply(&mut self, event: CounterEvent) {
        match event {
            CounterEvent::Added { total, .. } => self.value = total,
        }
    }
}

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
