//! Configuration from the environment, with defaults that need nothing set.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// `AFYA_MAX_UPLOAD_BYTES`, default 25 MiB: larger uploads get 413.
    pub max_upload_bytes: usize,
    /// `AFYA_SESSION_TTL_SECS`, default 8 hours: how long a sign-in lasts.
    pub session_lifetime: chrono::Duration,
    /// `AFYA_SIGNIN_MAX_FAILURES_PER_PHONE` (default 5) and `…_PER_IP` (default 20)
    /// failed sign-ins within `AFYA_SIGNIN_WINDOW_SECS` (default 900) lock further
    /// attempts until the window ends (429).
    pub sign_in_limits: SignInLimits,
    /// `AFYA_CONSISTENCY_TIMEOUT_MS`, default 5000: how long a command's answer waits
    /// for the read models to show its effect.
    pub consistency_timeout: Duration,
}

/// Limits on failed sign-ins.
#[derive(Clone, Copy, Debug)]
pub struct SignInLimits {
    pub per_phone: u32,
    pub per_ip: u32,
    pub window: Duration,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn number<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match var(name) {
        Some(v) => v
            .trim()
            .parse()
            .ok()
            .with_context(|| format!("{name}={v} is not a whole number")),
        None => Ok(default),
    }
}

impl Config {
    pub fn from_env() -> anyhow::Result<Config> {
        let data_dir = var("AFYA_DATA_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("data"));
        let listen = var("AFYA_LISTEN").unwrap_or_else(|| "127.0.0.1:8080".to_owned());
        let listen = listen.parse().with_context(|| {
            format!("AFYA_LISTEN={listen} is not an address like 127.0.0.1:8080")
        })?;
        let store = StoreConfig::from_env(&data_dir);
        let session_secs: i64 = number("AFYA_SESSION_TTL_SECS", 8 * 3600)?;
        if !(60..=30 * 86_400).contains(&session_secs) {
            anyhow::bail!("AFYA_SESSION_TTL_SECS must be between 60 and 2592000");
        }
        Ok(Config {
            data_dir,
            listen,
            store,
            max_upload_bytes: number("AFYA_MAX_UPLOAD_BYTES", 25 * 1024 * 1024)?,
            session_lifetime: chrono::Duration::seconds(session_secs),
            sign_in_limits: SignInLimits {
                per_phone: number("AFYA_SIGNIN_MAX_FAILURES_PER_PHONE", 5)?,
                per_ip: number("AFYA_SIGNIN_MAX_FAILURES_PER_IP", 20)?,
                window: Duration::from_secs(number("AFYA_SIGNIN_WINDOW_SECS", 900)?),
            },
            consistency_timeout: Duration::from_millis(number(
                "AFYA_CONSISTENCY_TIMEOUT_MS",
                5000,
            )?),
        })
    }
}
