//! The composition root: the store, the key and blob stores, the command services and
//! the actors (projections, expiry sweep), wired once and shared by the server and the
//! command line.

use std::sync::Arc;

use anyhow::Context;
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
    /// The projections, by name.
    pub consumers: Vec<(String, ConsumerHandle)>,
    expiry: actix::Addr<crate::expiry::ExpirySweeper>,
}

/// Opens the store (creating its schema) and the write side, starting nothing.
pub async fn open(config: &Config) -> anyhow::Result<(Store, Arc<Commands>)> {
    let store = Store::open(config.store.clone()).await?;
    let master = load_master_key(&config.data_dir).context("loading the master key")?;
    let keys = Arc::new(KeyStore::new(master, store.any_pool().clone()));
    let commands = Arc::new(Commands::new(
        store.clone(),
        keys,
        Arc::new(LocalBlobStore::new(&config.data_dir)),
        Arc::new(SystemClock),
    ));
    Ok((store, commands))
}

impl App {
    /// Opens everything and starts the projection actors and the expiry sweep on the
    /// current arbiter.
    pub async fn start(config: Config) -> anyhow::Result<App> {
        let (store, commands) = open(&config).await?;
        let mut consumers = Vec::new();
        for projection in projections::all() {
            let name = projection.name().to_owned();
            consumers.push((name, ConsumerActor::spawn(store.clone(), projection).await?));
        }
        let expiry = crate::expiry::ExpirySweeper::start(commands.clone());
        Ok(App {
            config,
            store,
            commands,
            consumers,
            expiry,
        })
    }

    /// Lets every consumer finish its batch and checkpoint, then closes the store.
    pub async fn shutdown(self) {
        let _ = self.expiry.send(crate::expiry::Shutdown).await;
        for (_, consumer) in &self.consumers {
            consumer.stop().await;
        }
        self.store.close().await;
    }
}
