//! The projections. Each keeps its tables, named `rm_*`, and handles only the events
//! that concern it; every statement is idempotent per event or guarded by the
//! checkpoint transaction, so a rebuild from position 0 yields the live tables.
//!
//! Each lives with its queries in its module of [`crate::read_models`]; this module
//! re-exports them.

pub use crate::read_models::access_log::AccessLog;
pub use crate::read_models::access_requests::AccessRequests;
pub use crate::read_models::audit::AuditTrail;
pub use crate::read_models::directory::Directory;
pub use crate::read_models::doctor_grants::DoctorGrants;
pub use crate::read_models::doctor_profiles::DoctorProfiles;
pub use crate::read_models::log_anchors::LogAnchors;
pub use crate::read_models::patient_records::PatientRecords;
pub use crate::read_models::payments::Payments;
pub use crate::read_models::record_storage::RecordStorage;
pub use crate::read_models::record_tokens::RecordTokens;
pub use crate::read_models::webhooks::Webhooks;
