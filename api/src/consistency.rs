//! Read-your-writes: a command's answer waits (bounded) until every projection has
//! processed the command's events, so the same client's next query shows its effect.
//! Read models are still written only by the projections.
//!
//! Progress is read from the local consumers first; when another instance runs a
//! projection (this one on standby), from the checkpoints in the database.

use std::time::{Duration, Instant};

use eventstore::{CommandOutcome, ConsumerHandle, LogCursor, Store};

/// Waits for projections to pass a command's events.
pub struct ReadYourWrites {
    store: Store,
    consumers: Vec<ConsumerHandle>,
    names: Vec<String>,
    timeout: Duration,
}

impl ReadYourWrites {
    pub fn new(
        store: Store,
        consumers: Vec<ConsumerHandle>,
        names: Vec<String>,
        timeout: Duration,
    ) -> ReadYourWrites {
        ReadYourWrites {
            store,
            consumers,
            names,
            timeout,
        }
    }

    /// Returns once every projection has processed the last event of `outcome` (at
    /// once when it appended nothing), or after the timeout, logged: the command has
    /// happened either way.
    pub async fn settle(&self, outcome: &CommandOutcome) {
        let Some((_, last)) = outcome.sequences else {
            return;
        };
        let target = match self
            .store
            .cursor_of(&outcome.aggregate_type, &outcome.aggregate_id, last)
            .await
        {
            Ok(Some(target)) => target,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "read-your-writes lookup failed"
                );
                return;
            }
        };
        let deadline = Instant::now() + self.timeout;
        loop {
            let Some(lagging) = self.consumers.iter().find(|c| c.cursor() < target) else {
                return;
            };
            if self.checkpoints_reached(target).await {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(
                    aggregate = %outcome.aggregate_type,
                    "read models did not catch up in time; answering anyway"
                );
                return;
            }
            // Woken by local progress; a standby instance re-reads checkpoints.
            let slice = (deadline - now).min(Duration::from_millis(25));
            lagging.wait_for(target, slice).await;
        }
    }

    async fn checkpoints_reached(&self, target: LogCursor) -> bool {
        let Ok(rows) = eventstore::consumer::cursors(self.store.any_pool()).await else {
            return false;
        };
        self.names.iter().all(|name| {
            rows.iter()
                .any(|(n, cursor)| n == name && *cursor >= target)
        })
    }
}
