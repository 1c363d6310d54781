//! Configuration from the environment, with defaults that need nothing set.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use eventstore::StoreConfig;

/// Everything `afyachain` reads from its environment.
#[derive(Clone, Debug)]
pub struct Config {
    /// `AFYA_DATA_DIR`, default `./data`: SQLite store, development keys, lock files.
    pub data_dir: PathBuf,
    /// `AFYA_LISTEN`, default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// `DATABASE_URL` selects PostgreSQL; otherwise SQLite in the data directory.
    pub store: StoreConfig,
}

impl Config {
    pub fn from_env() -> anyhow::Result<Config> {
        let data_dir = std::env::var("AFYA_DATA_DIR")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("data"));
        let listen = std::env::var("AFYA_LISTEN")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| "127.0.0.1:8080".to_owned());
        let listen = listen.parse().with_context(|| {
            format!("AFYA_LISTEN={listen} is not an address like 127.0.0.1:8080")
        })?;
        let store = StoreConfig::from_env(&data_dir);
        Ok(Config {
            data_dir,
            listen,
            store,
        })
    }
}
