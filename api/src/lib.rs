//! AfyaChain's HTTP API, its composition root and the `afyachain` command line.

pub mod app;
pub mod cli;
pub mod config;
pub mod consistency;
pub mod expiry;
pub mod extract;
pub mod live;
pub mod metrics;
pub mod openapi;
pub mod problem;
pub mod ratelimit;
pub mod routes;
pub mod server;
pub mod telemetry;
pub mod web;
pub mod webhooks;
