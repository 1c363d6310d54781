//! The read models, one module each: its projection (a [`LogHandler`](eventstore::LogHandler)
//! with its schema, tables and apply) and the queries that read it.
//!
//! Each projection keeps its tables, named `rm_*`, and handles only the events that
//! concern it; every statement is idempotent per event or guarded by the checkpoint
//! transaction, so a rebuild from position 0 yields the live tables. Lists are
//! paginated by a cursor: the position of the last item returned.

pub mod access_log;
pub mod access_requests;
pub mod audit;
pub mod directory;
pub mod doctor_grants;
pub mod doctor_profiles;
pub mod log_anchors;
pub mod patient_records;
pub mod payments;
pub mod record_storage;
pub mod record_tokens;
pub(crate) mod shared;
pub mod webhooks;
