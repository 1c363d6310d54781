//! Runs one deliverer per registered webhook (see [`integrations::webhook`]), starting
//! each as its registration reaches the `webhooks` read model. A webhook's deliveries
//! start right after the event that registered it, whichever instance sees it first.
//!
//! Following the registrations is a worker of the work runtime ([`eventstore::work`])
//! that every instance runs for itself (it takes no lock): each instance starts a
//! deliverer per webhook, and the deliverers of one webhook compete for its lock.
//!
//! [`WebhookSupervisor::report`] tells `/readyz` and `/metrics` how delivery is doing,
//! without waiting on any deliverer's round (a receiver that hangs holds its round for
//! up to the request timeout, times the attempts).

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use actix::Addr;
use anyhow::Context as _;
use commands::Commands;
use eventstore::work::{self, Outcome, WorkerActor};
use eventstore::{LogCursor, Store};
use integrations::{
    DelivererHandle, DelivererProbe, DelivererStatus, DeliverySettings, WebhookSpec,
};
use tokio::sync::watch;
use uuid::Uuid;

/// How often the registrations are looked at without being woken.
const TICK: Duration = Duration::from_secs(2);
/// How long a deliverer may take to say how it is doing (it answers at once unless
/// it has stopped).
const STATUS_WAIT: Duration = Duration::from_secs(1);

/// The deliverers this process runs, by webhook. Never held across an await: a report
/// reads it while the supervisor's round opens a webhook's URL.
#[derive(Clone, Default)]
struct Running(Arc<Mutex<HashMap<Uuid, DelivererHandle>>>);

impl Running {
    fn lock(&self) -> MutexGuard<'_, HashMap<Uuid, DelivererHandle>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The running deliverers of this process and the worker that starts them.
pub struct WebhookSupervisor {
    registrations: Addr<WorkerActor<Registrations>>,
    running: Running,
    store: Store,
}

/// How webhook delivery is doing, as `/readyz` (`integrations.webhooks`) and `/metrics`
/// (`afyachain_webhooks_*`) report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhooksReport {
    /// `down` while every webhook this instance delivers is failing; `degraded` while
    /// some are, or dead letters wait for a replay; else `ok`.
    pub status: &'static str,
    /// Webhooks this instance runs a deliverer for (every registered one whose URL
    /// and secret open; every instance runs one for each).
    pub webhooks: usize,
    /// Those this instance delivers (holding their locks; the others stand by). A
    /// deliverer that does not answer counts here, and as failing.
    pub active: usize,
    /// Those whose last delivery attempts failed here (or whose deliverer does not
    /// answer): their receivers are down or failing.
    pub failing: usize,
    /// The most log positions any webhook's stored checkpoint is behind the log's end
    /// (0 once all are caught up; `None` if it could not be read).
    pub lag: Option<i64>,
    /// Events parked after their attempts failed, waiting for a replay, over all
    /// registered webhooks.
    pub dead_letters: i64,
}

impl WebhooksReport {
    /// The report of deliverers in these states (`None`: it did not answer), behind
    /// the log by `lag` at most, with `dead_letters` parked.
    pub fn of(
        statuses: &[Option<DelivererStatus>],
        lag: Option<i64>,
        dead_letters: i64,
    ) -> WebhooksReport {
        let (mut active, mut failing) = (0, 0);
        for status in statuses {
            // One that does not answer counts as failing, as a stalled worker does.
            let fails = status.is_none_or(|s| s.failing());
            if fails || status.is_some_and(|s| s.active) {
                active += 1;
            }
            if fails {
                failing += 1;
            }
        }
        let status = if failing > 0 && failing == active {
            "down"
        } else if failing > 0 || dead_letters > 0 {
            "degraded"
        } else {
            "ok"
        };
        WebhooksReport {
            status,
            webhooks: statuses.len(),
            active,
            failing,
            lag,
            dead_letters,
        }
    }
}

impl WebhookSupervisor {
    /// Creates the delivery tables and starts following registrations on the current
    /// arbiter; `wake` is the `webhooks` projection's progress.
    pub async fn start(
        store: Store,
        commands: Arc<Commands>,
        settings: DeliverySettings,
        wake: Option<watch::Receiver<LogCursor>>,
    ) -> anyhow::Result<Arc<WebhookSupervisor>> {
        integrations::webhook::create_schema(&store).await?;
        let running = Running::default();
        let registrations = Registrations {
            store: store.clone(),
            commands,
            settings,
            running: running.clone(),
            unopened: RefCell::default(),
        };
        Ok(Arc::new(WebhookSupervisor {
            registrations: WorkerActor::launch(registrations, store.clone(), TICK, wake),
            running,
            store,
        }))
    }

    /// Makes a webhook's deliverer look again now (after a replay request).
    pub async fn wake(&self, id: Uuid) {
        if let Some(handle) = self.running.lock().get(&id) {
            handle.wake();
        }
    }

    /// How delivery is doing: each deliverer is asked without waiting on its round,
    /// the checkpoints and dead letters are read from the store. What cannot be read
    /// is logged and left out (`lag` `None`, no dead letters): a report never fails.
    pub async fn report(&self) -> WebhooksReport {
        let probes: Vec<(Uuid, DelivererProbe)> = self
            .running
            .lock()
            .iter()
            .map(|(id, handle)| (*id, handle.probe()))
            .collect();
        let statuses =
            futures::future::join_all(probes.iter().map(|(_, p)| p.status(STATUS_WAIT))).await;
        let pool = self.store.any_pool();
        let lag = match (
            eventstore::consumer::cursors(pool).await,
            self.store.log_end().await,
        ) {
            (Ok(cursors), Ok(end)) => {
                let done: HashMap<String, LogCursor> = cursors.into_iter().collect();
                // A webhook without a checkpoint yet starts at its registration, near
                // the end: not counted.
                Some(
                    probes
                        .iter()
                        .filter_map(|(id, _)| done.get(&integrations::webhook::consumer_name(*id)))
                        .map(|cursor| (end.position - cursor.position).max(0))
                        .max()
                        .unwrap_or(0),
                )
            }
            (Err(error), _) | (_, Err(error)) => {
                tracing::warn!(error = format!("{error:#}"), "reading the webhooks' lag");
                None
            }
        };
        // Only the registered webhooks': a withdrawn key's parked events can never be
        // replayed, and must not keep delivery degraded for ever.
        let dead_letters = match integrations::webhook::parked_counts(pool).await {
            Ok(counts) => probes.iter().filter_map(|(id, _)| counts.get(id)).sum(),
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "counting webhook dead letters"
                );
                0
            }
        };
        WebhooksReport::of(&statuses, lag, dead_letters)
    }

    /// Stops following registrations, then every deliverer (an attempt in flight is
    /// delivered again later).
    pub async fn shutdown(&self) {
        // An error means it has stopped already.
        let _ = self.registrations.send(work::Stop).await;
        let handles: Vec<DelivererHandle> = self.running.lock().drain().map(|(_, h)| h).collect();
        for handle in handles {
            handle.stop().await;
        }
    }
}

/// Starts and stops this process's deliverers as webhooks are registered and withdrawn.
pub struct Registrations {
    store: Store,
    commands: Arc<Commands>,
    settings: DeliverySettings,
    running: Running,
    /// Webhooks whose URL or secret cannot be opened (their integrator's key erased):
    /// warned about once.
    unopened: RefCell<HashSet<Uuid>>,
}

#[async_trait::async_trait(?Send)]
impl work::Worker for Registrations {
    fn name(&self) -> &'static str {
        "webhook_supervisor"
    }

    /// Every instance delivers through its own deliverers, which take the locks.
    fn exclusive(&self) -> bool {
        false
    }

    async fn round(&self, round: &work::Round) -> anyhow::Result<Outcome> {
        self.sync(round)
            .await
            .context("could not start webhook deliverers")?;
        Ok(Outcome::Idle)
    }
}

impl Registrations {
    /// Starts a deliverer for every registered webhook not yet running here.
    async fn sync(&self, round: &work::Round) -> anyhow::Result<()> {
        let rows = projections::queries::webhooks(self.store.any_pool()).await?;
        // Webhooks no longer listed (their integrator's key withdrawn) stop.
        let listed: HashSet<&str> = rows.iter().map(|r| r.webhook_id.as_str()).collect();
        let stopping: Vec<(Uuid, DelivererHandle)> = {
            let mut running = self.running.lock();
            let gone: Vec<Uuid> = running
                .keys()
                .filter(|id| !listed.contains(id.to_string().as_str()))
                .copied()
                .collect();
            gone.into_iter()
                .filter_map(|id| running.remove(&id).map(|handle| (id, handle)))
                .collect()
        };
        // Stopped together, without the map held.
        futures::future::join_all(stopping.into_iter().map(|(id, handle)| async move {
            handle.stop().await;
            tracing::info!(webhook_id = %id, "webhook stopped: its key was withdrawn");
        }))
        .await;
        for row in rows {
            if round.stopping() {
                break;
            }
            let Ok(id) = Uuid::parse_str(&row.webhook_id) else {
                continue;
            };
            // Only this round adds deliverers, so none is added between this look and
            // the insert below.
            if self.running.lock().contains_key(&id) || self.unopened.borrow().contains(&id) {
                continue;
            }
            let url = self
                .commands
                .open_text(&row.integrator_id, &row.url_sealed)
                .await;
            let secret = self
                .commands
                .open_text(&row.integrator_id, &row.secret_sealed)
                .await;
            let (Some(url), Some(secret)) = (url, secret) else {
                tracing::warn!(webhook_id = %id, "a webhook's URL or secret cannot be opened; not delivering");
                self.unopened.borrow_mut().insert(id);
                continue;
            };
            let types: BTreeSet<String> = serde_json::from_str(&row.types).unwrap_or_default();
            let registered = LogCursor {
                tx: row.tx,
                position: row.position,
            };
            integrations::webhook::ensure_checkpoint(&self.store, id, registered).await?;
            let spec = WebhookSpec {
                id,
                url,
                types: types.into_iter().collect(),
                secret: secret.into_bytes(),
            };
            let handle =
                integrations::webhook::spawn(self.store.clone(), spec, self.settings.clone());
            self.running.lock().insert(id, handle);
            tracing::info!(webhook_id = %id, "delivering a webhook");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: Option<DelivererStatus> = Some(DelivererStatus {
        active: true,
        failed_attempts: 0,
        failed_rounds: 0,
    });
    const STANDBY: Option<DelivererStatus> = Some(DelivererStatus {
        active: false,
        failed_attempts: 0,
        failed_rounds: 0,
    });
    const FAILING: Option<DelivererStatus> = Some(DelivererStatus {
        active: true,
        failed_attempts: 3,
        failed_rounds: 0,
    });

    #[test]
    fn no_webhooks_is_ok_with_nothing_behind() {
        let report = WebhooksReport::of(&[], Some(0), 0);
        assert_eq!(
            report,
            WebhooksReport {
                status: "ok",
                webhooks: 0,
                active: 0,
                failing: 0,
                lag: Some(0),
                dead_letters: 0,
            }
        );
    }

    #[test]
    fn delivery_is_down_only_when_every_webhook_delivered_here_is_failing() {
        let down = WebhooksReport::of(&[FAILING, STANDBY], Some(4), 0);
        assert_eq!((down.status, down.active, down.failing), ("down", 1, 1));
        let some = WebhooksReport::of(&[FAILING, OK], Some(4), 0);
        assert_eq!((some.status, some.active, some.failing), ("degraded", 2, 1));
        // A deliverer that does not answer, or whose rounds fail, is failing.
        let silent = WebhooksReport::of(&[None], None, 0);
        assert_eq!(
            (silent.status, silent.active, silent.failing),
            ("down", 1, 1)
        );
        let rounds = Some(DelivererStatus {
            active: false,
            failed_attempts: 0,
            failed_rounds: 2,
        });
        assert_eq!(
            WebhooksReport::of(&[rounds, OK], None, 0).status,
            "degraded"
        );
    }

    #[test]
    fn dead_letters_degrade_delivery_that_otherwise_works() {
        let report = WebhooksReport::of(&[OK, STANDBY], Some(0), 2);
        assert_eq!((report.status, report.dead_letters), ("degraded", 2));
        // A standby instance sees the dead letters too.
        assert_eq!(
            WebhooksReport::of(&[STANDBY], Some(0), 1).status,
            "degraded"
        );
        assert_eq!(WebhooksReport::of(&[STANDBY, OK], Some(0), 0).status, "ok");
    }
}
