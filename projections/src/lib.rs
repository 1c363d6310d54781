//! Read models of AfyaChain, each maintained by a projection: a [`LogHandler`] run by
//! a consumer actor over the global log, writing its rows and its checkpoint in one
//! transaction. Read models are written only here (docs/architecture.md rule 1); [`queries`] reads
//! them for the API.

use std::sync::Arc;

use eventstore::LogHandler;

mod codec;
pub mod projection;
pub mod queries;
pub mod read_models;

pub use read_models::audit;

pub use projection::{
    AccessLog, AccessRequests, AuditTrail, Directory, DoctorGrants, DoctorProfiles, LogAnchors,
    PatientRecords, Payments, RecordStorage, RecordTokens, Webhooks,
};

/// Every projection the server runs, in a stable order.
pub fn all() -> Vec<Arc<dyn LogHandler>> {
    vec![
        Arc::new(Directory::default()),
        Arc::new(PatientRecords::default()),
        Arc::new(AccessRequests::default()),
        Arc::new(DoctorGrants::default()),
        Arc::new(AccessLog::default()),
        Arc::new(RecordStorage::default()),
        Arc::new(RecordTokens::default()),
        Arc::new(LogAnchors::default()),
        Arc::new(Payments::default()),
        Arc::new(Webhooks::default()),
        Arc::new(DoctorProfiles::default()),
        Arc::new(AuditTrail),
    ]
}
