//! The live tail of the log shared by every Server-Sent-Events client.
//!
//! One worker follows the log and broadcasts each event once into a fixed ring of
//! [`IntegrationSettings::live_buffer`] events. A client catches up from the store on
//! its own, then takes events from the ring; a client that falls further behind than
//! the ring reads what it missed from the store again, so no client holds up another
//! and the ring's size bounds what the tail keeps.
//!
//! The tail is a worker of the work runtime ([`eventstore::work`]) that every instance
//! runs for its own clients (it takes no lock), woken by every commit to the log.
//!
//! [`IntegrationSettings::live_buffer`]: crate::config::IntegrationSettings

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use anyhow::Context as _;
use eventstore::work::{self, Outcome, WakeOn, WorkerActor};
use eventstore::{LogCursor, Store, StoredEvent};
use tokio::sync::{broadcast, watch};

/// How often the tail looks at the log without being woken.
const TICK: Duration = Duration::from_secs(1);
/// Events read from the log at a time.
const BATCH: i64 = 500;

/// The shared live tail.
#[derive(Clone)]
pub struct LiveLog {
    events: broadcast::Sender<Arc<StoredEvent>>,
    tail: Addr<WorkerActor<Tail>>,
    stop: watch::Sender<bool>,
    stopped: watch::Receiver<bool>,
}

impl LiveLog {
    /// Starts following the log from its current end, on the current arbiter.
    pub async fn start(store: Store, buffer: usize) -> anyhow::Result<LiveLog> {
        let (events, _) = broadcast::channel(buffer);
        let (stop, stopped) = watch::channel(false);
        let tail = Tail {
            cursor: Cell::new(store.log_end().await?),
            store: store.clone(),
            events: events.clone(),
        };
        Ok(LiveLog {
            events,
            tail: WorkerActor::launch(tail, store, TICK, WakeOn::Commits),
            stop,
            stopped,
        })
    }

    /// Events broadcast from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<StoredEvent>> {
        self.events.subscribe()
    }

    /// Clients currently following the live tail.
    pub fn clients(&self) -> usize {
        self.events.receiver_count()
    }

    /// Stops the tail and ends every client's stream (the server is stopping: open
    /// streams would otherwise hold its graceful shutdown until the timeout).
    pub fn stop(&self) {
        self.stop.send_replace(true);
        self.tail.do_send(work::Stop);
    }

    /// [`LiveLog::stop`], returning once the tail has stopped.
    pub async fn shutdown(&self) {
        self.stop.send_replace(true);
        // An error means it has stopped already.
        let _ = self.tail.send(work::Stop).await;
    }

    /// Changes to `true` once [`LiveLog::stop`] is called.
    pub fn stopped(&self) -> watch::Receiver<bool> {
        self.stopped.clone()
    }
}

/// Follows the log for [`LiveLog`].
pub struct Tail {
    store: Store,
    events: broadcast::Sender<Arc<StoredEvent>>,
    /// The last event broadcast.
    cursor: Cell<LogCursor>,
}

#[async_trait::async_trait(?Send)]
impl work::Worker for Tail {
    fn name(&self) -> &'static str {
        "live_tail"
    }

    /// Every instance serves its own clients.
    fn exclusive(&self) -> bool {
        false
    }

    async fn round(&self, _: &work::Round) -> anyhow::Result<Outcome> {
        let cursor = self.cursor.get();
        let batch = self
            .store
            .read_log(cursor, BATCH)
            .await
            .context("the live tail could not read the log")?;
        if let Some(last) = batch.last() {
            self.cursor.set(last.cursor());
            for event in batch {
                // No receiver is fine: the ring just keeps the newest events.
                let _ = self.events.send(Arc::new(event));
            }
            return Ok(Outcome::More);
        }
        self.store.end_of_log(cursor).await
    }
}
