//! `daraja-sandbox`: a local Daraja (see `mpesa_adapter::sandbox`), configured from the
//! environment, serving until SIGINT or SIGTERM.
//!
//! - `DARAJA_SANDBOX_LISTEN` (127.0.0.1:8090)
//! - `MPESA_CONSUMER_KEY`, `MPESA_CONSUMER_SECRET`, `MPESA_SHORTCODE`, `MPESA_PASSKEY`
//!   (Safaricom's public sandbox shortcode and passkey, `sandbox-key`/`sandbox-secret`)
//! - `DARAJA_SANDBOX_OUTCOME` (success; or 1032, 1037, 2001, 1, no_callback, paid_no_callback, duplicate)
//! - `DARAJA_SANDBOX_CALLBACK_DELAY_MS` (1000), `DARAJA_SANDBOX_TOKEN_TTL_SECS` (3599)

use std::fmt::Display;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use mpesa_adapter::sandbox::{Outcome, Sandbox, SandboxConfig};
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,actix_server=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("daraja-sandbox failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let listen: SocketAddr = parsed("DARAJA_SANDBOX_LISTEN", "127.0.0.1:8090")?;
    let defaults = SandboxConfig::public_sandbox();
    let config = SandboxConfig {
        consumer_key: setting("MPESA_CONSUMER_KEY").unwrap_or(defaults.consumer_key),
        consumer_secret: setting("MPESA_CONSUMER_SECRET").unwrap_or(defaults.consumer_secret),
        shortcode: setting("MPESA_SHORTCODE").unwrap_or(defaults.shortcode),
        passkey: setting("MPESA_PASSKEY").unwrap_or(defaults.passkey),
        token_ttl: Duration::from_secs(parsed("DARAJA_SANDBOX_TOKEN_TTL_SECS", "3599")?),
        callback_delay: Duration::from_millis(parsed("DARAJA_SANDBOX_CALLBACK_DELAY_MS", "1000")?),
        default_outcome: parsed::<Outcome>("DARAJA_SANDBOX_OUTCOME", "success")?,
    };
    // In place before the address is announced: a signal right after must still stop
    // the sandbox cleanly.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let shortcode = config.shortcode.clone();
    let (outcome, delay) = (config.default_outcome, config.callback_delay);
    let sandbox = Sandbox::start_on(config, listen).await?;
    println!("daraja-sandbox listening on {}", sandbox.url);
    tracing::info!(
        %shortcode,
        outcome = outcome.as_str(),
        callback_delay_ms = delay.as_millis() as u64,
        "daraja-sandbox ready"
    );
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    tracing::info!("stop signal received");
    sandbox.stop().await;
    Ok(())
}

/// A variable's value; unset and blank alike mean the default.
fn setting(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn parsed<T>(name: &str, default: &str) -> anyhow::Result<T>
where
    T: FromStr,
    T::Err: Display,
{
    let raw = setting(name).unwrap_or_else(|| default.to_owned());
    raw.trim()
        .parse()
        .map_err(|error| anyhow::anyhow!("{name} is not usable: {error}"))
}
