//! Adapters that replay the event log onto the outside world, idempotently.
//!
//! - [`storage`]: encrypted record blobs to S3-compatible decentralized storage.
//! - [`chain`]: record tokens, consent and audit anchors on an EVM chain (zkSync Era).

pub mod chain;
pub mod storage;
