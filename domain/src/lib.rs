//! The AfyaChain domain: aggregates (Patient, Doctor, MedicalRecord, AccessRequest),
//! their commands and events, value types parsed at the boundary, and the ports the
//! aggregates ask (clock, event-store lookups). No I/O and no framework beyond the
//! cqrs-es traits.
//!
//! Personal data never enters an event in clear: names, phone numbers, birth dates,
//! filenames, purposes and reasons arrive already sealed ([`sealed::Sealed`]).

pub mod access;
pub mod account;
pub mod actor;
pub mod anchor;
pub mod clock;
pub mod doctor;
pub mod error;
pub mod ids;
pub mod integrator;
pub mod patient;
pub mod payment;
pub mod record;
pub mod sealed;
pub mod session;
pub mod staff;
pub mod upcast;
pub mod value;
