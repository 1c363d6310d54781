//! Runs one deliverer per registered webhook (see [`integrations::webhook`]), starting
//! each as its registration reaches the `webhooks` read model. A webhook's deliveries
//! start right after the event that registered it, whichever instance sees it first.
//!
//! Following the registrations is a worker of the work runtime ([`eventstore::work`])
//! that every instance runs for itself (it takes no lock): each instance starts a
//! deliverer per webhook, and the deliverers of one webhook compete for its lock.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use anyhow::Context as _;
use commands::Commands;
use eventstore::work::{self, Outcome, WorkerActor};
use eventstore::{LogCursor, Store};
use integrations::{DelivererHandle, DeliverySettings, WebhookSpec};
use tokio::sync::{watch, Mutex};
use uuid::Uuid;

/// How often the registrations are looked at without being woken.
const TICK: Duration = Duration::from_secs(2);

/// The deliverers this process runs, by webhook.
type Running = Arc<Mutex<HashMap<Uuid, DelivererHandle>>>;

/// The running deliverers of this process and the worker that starts them.
pub struct WebhookSupervisor {
    registrations: Addr<WorkerActor<Registrations>>,
    running: Running,
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
            registrations: WorkerActor::launch(registrations, store, TICK, wake),
            running,
        }))
    }

    /// Makes a webhook's deliverer look again now (after a replay request).
    pub async fn wake(&self, id: Uuid) {
        if let Some(handle) = self.running.lock().await.get(&id) {
            handle.wake();
        }
    }

    /// Stops following registrations, then every deliverer (an attempt in flight is
    /// delivered again later).
    pub async fn shutdown(&self) {
        // An error means it has stopped already.
        let _ = self.registrations.send(work::Stop).await;
        let handles: Vec<DelivererHandle> =
            self.running.lock().await.drain().map(|(_, h)| h).collect();
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
        let mut running = self.running.lock().await;
        // Webhooks no longer listed (their integrator's key withdrawn) stop.
        let listed: HashSet<&str> = rows.iter().map(|r| r.webhook_id.as_str()).collect();
        let gone: Vec<Uuid> = running
            .keys()
            .filter(|id| !listed.contains(id.to_string().as_str()))
            .copied()
            .collect();
        let stopping: Vec<(Uuid, DelivererHandle)> = gone
            .into_iter()
            .filter_map(|id| running.remove(&id).map(|handle| (id, handle)))
            .collect();
        // Stopped together, without the map held (a replay's wake waits for it).
        drop(running);
        futures::future::join_all(stopping.into_iter().map(|(id, handle)| async move {
            handle.stop().await;
            tracing::info!(webhook_id = %id, "webhook stopped: its key was withdrawn");
        }))
        .await;
        let mut running = self.running.lock().await;
        for row in rows {
            if round.stopping() {
                break;
            }
            let Ok(id) = Uuid::parse_str(&row.webhook_id) else {
                continue;
            };
            if running.contains_key(&id) || self.unopened.borrow().contains(&id) {
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
            running.insert(
                id,
                integrations::webhook::spawn(self.store.clone(), spec, self.settings.clone()),
            );
            tracing::info!(webhook_id = %id, "delivering a webhook");
        }
        Ok(())
    }
}
