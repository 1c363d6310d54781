#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code
//! The REST API, black-box: the real binary on a random loopback port, on both store
//! backends. One test binary for all API tests.

#[path = "../support/mod.rs"]
mod support;

mod accounts;
mod app;
mod audit;
mod bad_input;
mod browser;
mod chain;
mod directory;
mod idempotency;
mod instances;
mod integrators;
mod limits;
mod matrix;
mod openapi;
mod outages;
mod pages;
mod payments;
mod schemathesis;
mod storage;
mod story;
mod web;
