//! AfyaChain's HTTP API, its composition root and the `afyachain` command line.

pub mod app;
pub mod cli;
pub mod config;
pub mod expiry;
pub mod server;
pub mod telemetry;
