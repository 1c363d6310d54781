//! Failures of the ports the aggregates ask.

/// A port (event store lookup, directory) failed; not a business rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ServiceError(pub String);

impl ServiceError {
    pub fn new(message: impl Into<String>) -> Self {
        ServiceError(message.into())
    }
}
