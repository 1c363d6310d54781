//! The composition root: the store, the key and blob stores, the command services and
//! the actors (projections, expiry sweep), wired once and shared by the server and the
//! command line.

use std::sync::Arc;

use anyhow::Context;
use chain_adapter::storage::{Replicator, S3Remote, Storage};
use commands::blobs::LocalBlobStore;
use commands::clock::SystemClock;
use commands::keys::{load_master_key, KeyStore};
use commands::Commands;
use eventstore::{ConsumerActor, ConsumerHandle, Store};

use crate::config::Config;

/// A running AfyaChain core.
pub struct App {
    pub config: Config,
    pub store: Store,
    pub commands: Arc<Commands>,
    /// Every log consumer, by name: the projections, then the intakes of the chain
    /// and M-Pesa workers and the NATS publisher when they are configured.
    pub consumers: Vec<(String, ConsumerHandle)>,
    /// The projections alone (the read models), which read-your-writes waits for: an
    /// integration's intake or publisher, stalled by its outage, never holds up an
    /// answer.
    pub projections: Vec<(String, ConsumerHandle)>,
    pub storage: Storage,
    expiry: actix::Addr<crate::expiry::ExpirySweeper>,
    replicator: Option<actix::Addr<Replicator>>,
    chain_writer: Option<actix::Addr<chain_adapter::chain::ChainWriter>>,
    /// The live tail the event streams follow.
    pub live: crate::live::LiveLog,
    /// One deliverer per registered webhook.
    pub webhooks: Arc<crate::webhooks::WebhookSupervisor>,
    /// The M-Pesa worker.
    mpesa: Option<actix::Addr<mpesa_adapter::worker::MpesaWorker>>,
}

/// Where blobs are kept, as configured (nothing is contacted yet).
pub fn storage(config: &Config) -> anyhow::Result<Storage> {
    let remote = match &config.s3 {
        Some(settings) => Some(Arc::new(S3Remote::new(settings)?)),
        None => None,
    };
    Ok(Storage::new(
        Arc::new(LocalBlobStore::new(&config.data_dir)),
        remote,
        config.replication.clone(),
    ))
}

/// Opens the store (creating its schema) and the write side, starting nothing.
pub async fn open(config: &Config) -> anyhow::Result<(Store, Arc<Commands>, Storage)> {
    let storage = storage(config)?;
    let store = Store::open(config.store.clone()).await?;
    let master = load_master_key(&config.data_dir).context("loading the master key")?;
    let keys = Arc::new(KeyStore::new(master, store.any_pool().clone()));
    let commands = Arc::new(Commands::new(
        store.clone(),
        keys,
        storage.blob_store(),
        Arc::new(SystemClock),
    ));
    Ok((store, commands, storage))
}

impl App {
    /// The background workers, by their name in the job queue. The live tail and the
    /// webhook supervisor run on the same runtime but have no jobs, no dead letters and
    /// no outside service of their own to report, so they are not listed.
    pub fn workers(&self) -> Vec<(&'static str, actix::Recipient<eventstore::work::Status>)> {
        let mut workers = Vec::new();
        if let Some(addr) = &self.replicator {
            workers.push((
                chain_adapter::storage::queue::WORKER,
                addr.clone().recipient(),
            ));
        }
        if let Some(addr) = &self.chain_writer {
            workers.push((
                chain_adapter::chain::minter::WORKER,
                addr.clone().recipient(),
            ));
        }
        if let Some(addr) = &self.mpesa {
            workers.push((mpesa_adapter::worker::WORKER, addr.clone().recipient()));
        }
        workers
    }

    /// Opens everything and starts the projection actors, the expiry sweep and, with a
    /// remote blob store, the storage replicator on the current arbiter.
    pub async fn start(config: Config) -> anyhow::Result<App> {
        let (store, commands, storage) = open(&config).await?;
        let mut consumers = Vec::new();
        let mut projections = Vec::new();
        for handler in projections::all() {
            let name = handler.name().to_owned();
            let is_projection = handler.kind() == eventstore::Kind::Projection;
            let handle = ConsumerActor::spawn(store.clone(), handler).await?;
            if is_projection {
                projections.push((name.clone(), handle.clone()));
            }
            consumers.push((name, handle));
        }
        let expiry = crate::expiry::start(commands.clone());
        let wake = consumers
            .iter()
            .find(|(name, _)| name == chain_adapter::storage::queue::SOURCE_PROJECTION)
            .map(|(_, handle)| handle.subscribe());
        let replicator = chain_adapter::storage::replicator::start(
            store.clone(),
            commands.clone(),
            storage.clone(),
            wake,
        )
        .await?;
        if let Some(backend) = storage.backend() {
            tracing::info!(backend, "replicating blobs to remote storage");
        }
        let chain_writer = match &config.chain {
            Some(settings) if settings.record_token.is_some() => {
                let chain = chain_adapter::chain::Chain::connect(settings.clone()).await?;
                let intake: Arc<dyn eventstore::LogHandler> =
                    Arc::new(chain_adapter::chain::ChainIntake {
                        anchor_every: settings.anchor_every,
                    });
                let handle = ConsumerActor::spawn(store.clone(), intake).await?;
                let wake = Some(handle.subscribe());
                consumers.push(("chain_intake".to_owned(), handle));
                tracing::info!(
                    chain_id = settings.chain_id,
                    operator = %chain.operator,
                    "minting record tokens on chain"
                );
                Some(chain_adapter::chain::minter::start(
                    store.clone(),
                    commands.clone(),
                    chain,
                    wake,
                )?)
            }
            Some(_) => {
                tracing::warn!("AFYA_CHAIN_RPC_URL is set but AFYA_RECORD_TOKEN_ADDRESS is not: the chain adapter is off (run `afyachain chain deploy`)");
                None
            }
            None => None,
        };
        let live =
            crate::live::LiveLog::start(store.clone(), config.integrations.live_buffer).await?;
        let webhooks_read = consumers
            .iter()
            .find(|(name, _)| name == "webhooks")
            .map(|(_, handle)| handle.subscribe());
        let webhooks = crate::webhooks::WebhookSupervisor::start(
            store.clone(),
            commands.clone(),
            config.integrations.delivery.clone(),
            webhooks_read,
        )
        .await?;
        if let Some(settings) = &config.nats {
            // Integrators at scale: every event's public view (the same as webhooks and
            // the stream carry) on a subject per type; who may subscribe to what is the
            // NATS operator's to configure.
            let mapper: nats_publisher::Mapper = Arc::new(|event| {
                serde_json::to_vec(&integrations::public_view(event)).unwrap_or_default()
            });
            let publisher =
                nats_publisher::NatsPublisher::connect(settings.clone(), mapper).await?;
            let handle = ConsumerActor::spawn(store.clone(), Arc::new(publisher)).await?;
            consumers.push((nats_publisher::CONSUMER_NAME.to_owned(), handle));
        }
        let mpesa = match &config.mpesa {
            Some(settings) => {
                let daraja = Arc::new(mpesa_adapter::daraja::Daraja::new(settings.daraja.clone())?);
                let intake: Arc<dyn eventstore::LogHandler> =
                    Arc::new(mpesa_adapter::worker::PaymentIntake);
                let handle = ConsumerActor::spawn(store.clone(), intake).await?;
                let wake = Some(handle.subscribe());
                consumers.push(("mpesa_intake".to_owned(), handle));
                let worker = mpesa_adapter::worker::start(
                    store.clone(),
                    commands.clone(),
                    daraja,
                    settings.worker.clone(),
                    wake,
                );
                tracing::info!(base_url = %settings.daraja.base_url, "M-Pesa payments on");
                Some(worker)
            }
            None => None,
        };
        Ok(App {
            config,
            store,
            commands,
            consumers,
            projections,
            storage,
            expiry,
            replicator,
            chain_writer,
            live,
            webhooks,
            mpesa,
        })
    }

    /// Lets every consumer finish its batch and checkpoint, then closes the store.
    pub async fn shutdown(self) {
        let _ = self.expiry.send(crate::expiry::Stop).await;
        self.live.shutdown().await;
        self.webhooks.shutdown().await;
        // The workers stop together, each letting its round in flight finish.
        let mpesa = async {
            if let Some(worker) = &self.mpesa {
                let _ = worker.send(mpesa_adapter::worker::Stop).await;
            }
        };
        let chain = async {
            if let Some(writer) = &self.chain_writer {
                let _ = writer.send(chain_adapter::chain::minter::Stop).await;
            }
        };
        let storage = async {
            if let Some(replicator) = &self.replicator {
                let _ = replicator
                    .send(chain_adapter::storage::replicator::Stop)
                    .await;
            }
        };
        futures::join!(mpesa, chain, storage);
        for (_, consumer) in &self.consumers {
            consumer.stop().await;
        }
        self.store.close().await;
    }
}
