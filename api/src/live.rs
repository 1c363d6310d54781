//! The live tail of the log shared by every Server-Sent-Events client.
//!
//! One task follows the log (woken on commits) and broadcasts each event once into a
//! fixed ring of [`IntegrationSettings::live_buffer`] events. A client catches up from
//! the store on its own, then takes events from the ring; a client that falls further
//! behind than the ring reads what it missed from the store again, so no client holds
//! up another and the ring's size bounds what the tail keeps.
//!
//! [`IntegrationSettings::live_buffer`]: crate::config::IntegrationSettings

use std::sync::Arc;
use std::time::Duration;

use eventstore::{LogCursor, Store, StoredEvent};
use tokio::sync::{broadcast, watch};

/// How often the tail looks at the log without being woken.
const TICK: Duration = Duration::from_secs(1);
/// How soon it looks again when a running transaction holds events back.
const HELD_BACK_RETRY: Duration = Duration::from_millis(5);

/// The shared live tail.
#[derive(Clone)]
pub struct LiveLog {
    events: broadcast::Sender<Arc<StoredEvent>>,
    stop: watch::Sender<bool>,
    stopped: watch::Receiver<bool>,
}

impl LiveLog {
    /// Starts following the log from its current end.
    pub async fn start(store: Store, buffer: usize) -> anyhow::Result<LiveLog> {
        let (events, _) = broadcast::channel(buffer);
        let (stop, stopped) = watch::channel(false);
        let cursor = store.log_end().await?;
        tokio::spawn(follow(store, events.clone(), cursor, stopped.clone()));
        Ok(LiveLog {
            events,
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
        let _ = self.stop.send(true);
    }

    /// Changes to `true` once [`LiveLog::stop`] is called.
    pub fn stopped(&self) -> watch::Receiver<bool> {
        self.stopped.clone()
    }
}

async fn follow(
    store: Store,
    events: broadcast::Sender<Arc<StoredEvent>>,
    mut cursor: LogCursor,
    mut stopped: watch::Receiver<bool>,
) {
    let mut wake = store.notifier().subscribe();
    let mut failures = 0u32;
    loop {
        if *stopped.borrow() {
            return;
        }
        match store.read_log(cursor, 500).await {
            Ok(batch) if !batch.is_empty() => {
                failures = 0;
                for event in batch {
                    cursor = event.cursor();
                    // No receiver is fine: the ring just keeps the newest events.
                    let _ = events.send(Arc::new(event));
                }
                continue;
            }
            Ok(_) => {
                failures = 0;
                if store.log_held_back(cursor).await.unwrap_or(false) {
                    tokio::time::sleep(HELD_BACK_RETRY).await;
                    continue;
                }
                tokio::select! {
                    _ = wake.changed() => {}
                    _ = tokio::time::sleep(TICK) => {}
                    _ = stopped.changed() => return,
                }
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let backoff = eventstore::consumer::failure_backoff(failures);
                tracing::error!(
                    error = format!("{error:#}"),
                    ?backoff,
                    "live tail could not read the log"
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopped.changed() => return,
                }
            }
        }
    }
}
