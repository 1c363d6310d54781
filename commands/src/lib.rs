//! The write side of AfyaChain: command services over the event store, the key store,
//! the blob store and the encryption of personal fields and uploads.

pub mod blobs;
pub mod clock;
pub mod credentials;
pub mod keys;
pub mod service;
pub mod spool;

pub use service::{
    ApproveAccess, AuthError, Authenticated, CommandError, Commands, Decided, Done, RegisterDoctor,
    RegisterPatient, RegisterStaff, RegisterWebhook, RequestAccess, RequestPayment, SignedIn,
    UploadRecord, Uploaded,
};
