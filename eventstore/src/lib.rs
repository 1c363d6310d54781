//! The event store of AfyaChain and its global log.
//!
//! Appends go through cqrs-es with postgres-es (production) or sqlite-es (embedded
//! default) on their own `events` table, extended with columns that have defaults: a
//! global position, an event id, a recorded-at time and, on PostgreSQL, the writing
//! transaction id. The global log reads those columns in an order that never skips an
//! event committed late (see [`log`]); [`consumer`] runs named, checkpointed consumers
//! over it, on the one runtime of the background workers ([`work`]).

pub mod consumer;
pub mod counters;
pub mod execute;
pub mod jobs;
pub mod locks;
pub mod log;
pub mod notify;
pub mod pg_append;
pub mod store;
pub mod testing;
pub mod work;

pub use consumer::{
    ConsumerActor, ConsumerHandle, ConsumerLock, ConsumerStatus, Kind, LogHandler, Runner,
};
pub use execute::{CommandMeta, CommandOutcome, ExecuteError};
pub use log::{LogCursor, StoredEvent};
pub use store::{AggregateStore, Backend, Store, StoreConfig};
