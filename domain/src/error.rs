//! Failures of the ports the aggregates ask, and the kinds of business-rule refusals.

/// A port (event store lookup, directory) failed; not a business rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ServiceError(pub String);

impl ServiceError {
    pub fn new(message: impl Into<String>) -> Self {
        ServiceError(message.into())
    }
}

/// What kind of refusal a business-rule error is. The API maps each kind to one HTTP
/// status in one place; the domain stays free of HTTP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleKind {
    /// The thing acted on does not exist (or must not be revealed to exist).
    NotFound,
    /// The actor may not do this.
    Forbidden,
    /// The thing's current state does not allow it (already done, no longer pending).
    Conflict,
    /// The request itself is not acceptable (empty scope, expiry in the past).
    Unprocessable,
    /// A port failed: not the caller's fault.
    ServiceFailure,
}

/// A business-rule error: its kind and a stable machine-readable code. Each error enum
/// implements it with an exhaustive match, so a new variant must be classified.
pub trait Rule: std::error::Error {
    fn kind(&self) -> RuleKind;
    /// snake_case, stable across releases (clients may branch on it).
    fn code(&self) -> &'static str;
}
