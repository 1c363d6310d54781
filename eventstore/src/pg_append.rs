//! The PostgreSQL event repository: postgres-es for every read, and one statement per
//! append.
//!
//! postgres-es appends with `BEGIN`, one `INSERT` per event and `COMMIT`: three round
//! trips or more for one command. A single multi-row `INSERT` in autocommit is just as
//! atomic (one statement, one transaction) and takes one round trip; the primary key
//! `(aggregate_type, aggregate_id, sequence)` still rejects a concurrent append with
//! `unique_violation`, which cqrs-es sees as an optimistic-lock conflict. Reads,
//! replays and snapshots stay postgres-es's own.

use cqrs_es::persist::{
    PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot,
};
use cqrs_es::Aggregate;
use postgres_es::PostgresEventRepository;
use serde_json::Value;
use sqlx::{PgPool, Postgres, QueryBuilder};

/// postgres-es for reads, a single statement for appends.
pub struct PgEventRepository {
    reads: PostgresEventRepository,
    pool: PgPool,
}

impl PgEventRepository {
    pub fn new(pool: PgPool) -> Self {
        PgEventRepository {
            reads: PostgresEventRepository::new(pool.clone()),
            pool,
        }
    }

    async fn append(&self, events: &[SerializedEvent]) -> Result<(), PersistenceError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut insert: QueryBuilder<'_, Postgres> = QueryBuilder::new(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
             event_version, payload, metadata) ",
        );
        insert.push_values(events, |mut row, event| {
            row.push_bind(&event.aggregate_type)
                .push_bind(&event.aggregate_id)
                .push_bind(event.sequence as i64)
                .push_bind(&event.event_type)
                .push_bind(&event.event_version)
                .push_bind(&event.payload)
                .push_bind(&event.metadata);
        });
        insert
            .build()
            .persistent(true)
            .execute(&self.pool)
            .await
            .map_err(persistence_error)?;
        Ok(())
    }
}

fn persistence_error(error: sqlx::Error) -> PersistenceError {
    match &error {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
            PersistenceError::OptimisticLockError
        }
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut => {
            PersistenceError::ConnectionError(Box::new(error))
        }
        _ => PersistenceError::UnknownError(Box::new(error)),
    }
}

impl PersistedEventRepository for PgEventRepository {
    async fn get_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.reads.get_events::<A>(aggregate_id).await
    }

    async fn get_last_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.reads
            .get_last_events::<A>(aggregate_id, last_sequence)
            .await
    }

    async fn get_snapshot<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Option<SerializedSnapshot>, PersistenceError> {
        self.reads.get_snapshot::<A>(aggregate_id).await
    }

    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        snapshot_update: Option<(String, Value, usize)>,
    ) -> Result<(), PersistenceError> {
        match snapshot_update {
            None => self.append(events).await,
            // Snapshot stores are postgres-es's (we use none today).
            Some(update) => self.reads.persist::<A>(events, Some(update)).await,
        }
    }

    async fn stream_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<ReplayStream, PersistenceError> {
        self.reads.stream_events::<A>(aggregate_id).await
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        self.reads.stream_all_events::<A>().await
    }
}
