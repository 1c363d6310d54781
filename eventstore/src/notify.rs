//! Waking consumers when events are committed.
//!
//! In-process, every commit bumps a watch counter, so a consumer that was busy when the
//! commit happened still sees the change when it next looks (no lost wake-ups). On
//! PostgreSQL, commits of other processes arrive through `LISTEN afya_events`; our own
//! commits are announced with `NOTIFY`, coalesced so that a burst of commits costs one
//! notification rather than one per commit (NOTIFY takes a global lock at commit).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

const CHANNEL: &str = "afya_events";

/// Commit signal shared by the write side and every consumer of one store.
#[derive(Clone)]
pub struct Notifier {
    inner: Arc<Inner>,
}

struct Inner {
    /// Bumped for any commit, local or (on PostgreSQL) from another process.
    any: watch::Sender<u64>,
    /// Bumped for commits made by this process only; drives the NOTIFY sender.
    local: watch::Sender<u64>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Notifier {
    pub(crate) fn local() -> Notifier {
        Notifier {
            inner: Arc::new(Inner {
                any: watch::channel(0).0,
                local: watch::channel(0).0,
                tasks: Mutex::new(Vec::new()),
            }),
        }
    }

    pub(crate) async fn postgres(pool: PgPool) -> anyhow::Result<Notifier> {
        let notifier = Notifier::local();
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(CHANNEL).await?;
        let any = notifier.inner.any.clone();
        let listen_task = tokio::spawn(async move {
            loop {
                match listener.recv().await {
                    Ok(_) => {
                        any.send_modify(|n| *n = n.wrapping_add(1));
                    }
                    Err(error) => {
                        // PgListener reconnects on the next recv; wake consumers so they
                        // re-read anything committed while the connection was down.
                        tracing::warn!(%error, "event notification listener lost its connection");
                        any.send_modify(|n| *n = n.wrapping_add(1));
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        let mut local_rx = notifier.inner.local.subscribe();
        let notify_task = tokio::spawn(async move {
            while local_rx.changed().await.is_ok() {
                local_rx.mark_unchanged();
                if let Err(error) = sqlx::query("SELECT pg_notify($1, '')")
                    .bind(CHANNEL)
                    .execute(&pool)
                    .await
                {
                    tracing::warn!(%error, "could not announce committed events");
                }
                // Coalesce: commits during this pause are announced by one NOTIFY.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        if let Ok(mut tasks) = notifier.inner.tasks.lock() {
            tasks.push(listen_task);
            tasks.push(notify_task);
        }
        Ok(notifier)
    }

    /// Called after every successful append by this process.
    pub fn committed(&self) {
        self.inner.local.send_modify(|n| *n = n.wrapping_add(1));
        self.inner.any.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that changes whenever events may have been committed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.any.subscribe()
    }

    pub(crate) fn shutdown(&self) {
        if let Ok(mut tasks) = self.inner.tasks.lock() {
            for task in tasks.drain(..) {
                task.abort();
            }
        }
    }
}
