//! Runs one deliverer per registered webhook (see [`integrations::webhook`]), starting
//! each as its registration reaches the `webhooks` read model. A webhook's deliveries
//! start right after the event that registered it, whichever instance sees it first.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use commands::Commands;
use eventstore::{LogCursor, Store};
use integrations::{DelivererHandle, DeliverySettings, WebhookSpec};
use tokio::sync::{watch, Mutex};
use uuid::Uuid;

/// How often the registrations are looked at without being woken.
const TICK: Duration = Duration::from_secs(2);

/// The running deliverers of this process.
pub struct WebhookSupervisor {
    store: Store,
    commands: Arc<Commands>,
    settings: DeliverySettings,
    running: Mutex<HashMap<Uuid, DelivererHandle>>,
    /// Webhooks whose URL or secret cannot be opened (their integrator's key erased):
    /// warned about once.
    unopened: Mutex<std::collections::HashSet<Uuid>>,
    stop: watch::Sender<bool>,
}

impl WebhookSupervisor {
    /// Creates the delivery tables and starts following registrations; `wake` is the
    /// `webhooks` projection's progress.
    pub async fn start(
        store: Store,
        commands: Arc<Commands>,
        settings: DeliverySettings,
        wake: Option<watch::Receiver<LogCursor>>,
    ) -> anyhow::Result<Arc<WebhookSupervisor>> {
        integrations::webhook::create_schema(&store).await?;
        let (stop, stopped) = watch::channel(false);
        let supervisor = Arc::new(WebhookSupervisor {
            store,
            commands,
            settings,
            running: Mutex::new(HashMap::new()),
            unopened: Mutex::new(std::collections::HashSet::new()),
            stop,
        });
        tokio::spawn(supervisor.clone().run(wake, stopped));
        Ok(supervisor)
    }

    async fn run(
        self: Arc<Self>,
        mut wake: Option<watch::Receiver<LogCursor>>,
        mut stopped: watch::Receiver<bool>,
    ) {
        loop {
            if *stopped.borrow() {
                return;
            }
            if let Err(error) = self.sync().await {
                tracing::error!(
                    error = format!("{error:#}"),
                    "could not start webhook deliverers"
                );
            }
            let woken = async {
                match wake.as_mut() {
                    Some(rx) => {
                        if rx.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = woken => {}
                _ = tokio::time::sleep(TICK) => {}
                _ = stopped.changed() => return,
            }
        }
    }

    /// Starts a deliverer for every registered webhook not yet running here.
    async fn sync(&self) -> anyhow::Result<()> {
        let rows = projections::queries::webhooks(self.store.any_pool()).await?;
        let mut running = self.running.lock().await;
        // Webhooks no longer listed (their integrator's key withdrawn) stop.
        let listed: std::collections::HashSet<&str> =
            rows.iter().map(|r| r.webhook_id.as_str()).collect();
        let gone: Vec<Uuid> = running
            .keys()
            .filter(|id| !listed.contains(id.to_string().as_str()))
            .copied()
            .collect();
        for id in gone {
            if let Some(handle) = running.remove(&id) {
                handle.stop().await;
                tracing::info!(webhook_id = %id, "webhook stopped: its key was withdrawn");
            }
        }
        for row in rows {
            let Ok(id) = Uuid::parse_str(&row.webhook_id) else {
                continue;
            };
            if running.contains_key(&id) || self.unopened.lock().await.contains(&id) {
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
                self.unopened.lock().await.insert(id);
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

    /// Makes a webhook's deliverer look again now (after a replay request).
    pub async fn wake(&self, id: Uuid) {
        if let Some(handle) = self.running.lock().await.get(&id) {
            handle.wake();
        }
    }

    /// Stops every deliverer (an attempt in flight is delivered again later).
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let handles: Vec<DelivererHandle> =
            self.running.lock().await.drain().map(|(_, h)| h).collect();
        for handle in handles {
            handle.stop().await;
        }
    }
}
