//! RFC 9457 problem details: every error the API answers with, and the one place where
//! errors of the layers below become HTTP statuses.

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use commands::{AuthError, CommandError};
use domain::error::RuleKind;
use domain::value::ValueError;
use serde::Serialize;
use utoipa::ToSchema;

/// How long a client is told to wait before trying again while the store is down.
const STORE_RETRY_AFTER_SECS: u64 = 5;

/// One invalid field of a request.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct FieldError {
    /// The field, as named in the request (`phone`, `categories[1]`, `Idempotency-Key`).
    pub field: String,
    pub detail: String,
}

/// An error answer (`application/problem+json`); boxed, so results stay small.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem(Box<Details>);

impl std::ops::Deref for Problem {
    type Target = Details;
    fn deref(&self) -> &Details {
        &self.0
    }
}

/// The fields of a problem as they are sent.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
#[schema(as = Problem)]
pub struct Details {
    /// Always `about:blank`: `code` says precisely what went wrong.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The HTTP status phrase.
    pub title: String,
    pub status: u16,
    /// A sentence for people.
    pub detail: String,
    /// Stable machine-readable code, e.g. `phone_taken`, `grant_not_active`.
    pub code: &'static str,
    /// The (first) field at fault, when the request itself is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Every field at fault.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    #[serde(skip)]
    retry_after: Option<u64>,
}

impl Problem {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Problem {
        Problem(Box::new(Details {
            kind: "about:blank",
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            code,
            field: None,
            errors: Vec::new(),
            retry_after: None,
        }))
    }

    /// 422 naming every invalid field.
    pub fn invalid(errors: Vec<FieldError>) -> Problem {
        let detail = match errors.as_slice() {
            [one] => format!("{}: {}", one.field, one.detail),
            _ => "several fields are invalid".to_owned(),
        };
        let mut problem = Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", detail);
        problem.0.field = errors.first().map(|e| e.field.clone());
        problem.0.errors = errors;
        problem
    }

    /// 422 for one field.
    pub fn field(field: impl Into<String>, detail: impl Into<String>) -> Problem {
        Problem::invalid(vec![FieldError {
            field: field.into(),
            detail: detail.into(),
        }])
    }

    /// Sets the field at fault of a problem that is not a plain validation failure.
    pub fn at(mut self, field: impl Into<String>) -> Problem {
        self.0.field = Some(field.into());
        self
    }

    pub fn retry_after(mut self, seconds: u64) -> Problem {
        self.0.retry_after = Some(seconds);
        self
    }

    pub fn unauthenticated(code: &'static str, detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::UNAUTHORIZED, code, detail)
    }

    pub fn forbidden(code: &'static str, detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::FORBIDDEN, code, detail)
    }

    /// The event store does not answer (down, restarting, or saturated).
    pub fn store_unavailable() -> Problem {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the service cannot reach its data store right now; try again shortly",
        )
        .retry_after(STORE_RETRY_AFTER_SECS)
    }

    pub fn not_found(code: &'static str, detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, code, detail)
    }

    /// A failure that is not the caller's: logged with its cause chain, answered
    /// without it.
    /// The event store out of reach is not a fault of ours either, but passing: 503
    /// `store_unavailable` with `Retry-After`, so clients try again shortly.
    pub fn internal(error: &anyhow::Error) -> Problem {
        if eventstore::Store::is_unavailable(error) {
            tracing::warn!(error = format!("{error:#}"), "event store unavailable");
            return Problem::store_unavailable();
        }
        tracing::error!(error = format!("{error:#}"), "request failed");
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "something went wrong on our side; try again later",
        )
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.detail)
    }
}

impl ResponseError for Problem {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        response.insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        ));
        if let Some(seconds) = self.retry_after {
            response.insert_header((header::RETRY_AFTER, seconds.to_string()));
        }
        if self.status == 401 {
            response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        response.body(serde_json::to_string(&*self.0).unwrap_or_default())
    }
}

/// The HTTP status of each kind of business-rule refusal.
fn status_of(kind: RuleKind) -> StatusCode {
    match kind {
        RuleKind::NotFound => StatusCode::NOT_FOUND,
        RuleKind::Forbidden => StatusCode::FORBIDDEN,
        RuleKind::Conflict => StatusCode::CONFLICT,
        RuleKind::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
        RuleKind::ServiceFailure => StatusCode::SERVICE_UNAVAILABLE,
    }
}

impl From<CommandError> for Problem {
    fn from(error: CommandError) -> Problem {
        match error {
            CommandError::Rejected {
                kind,
                code,
                message,
            } => {
                if kind == RuleKind::ServiceFailure {
                    tracing::error!(code, detail = %message, "a port failed during a command");
                    return Problem::new(
                        status_of(kind),
                        code,
                        "a service the command needs is unavailable; try again later",
                    );
                }
                Problem::new(status_of(kind), code, message)
            }
            CommandError::Conflict => Problem::new(
                StatusCode::CONFLICT,
                "concurrent_change",
                "the resource was changed at the same time; try again",
            ),
            CommandError::KeyReused => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was already used for a different request",
            )
            .at("Idempotency-Key"),
            CommandError::BadCredentials => {
                Problem::unauthenticated("bad_credentials", "wrong phone number or password")
            }
            CommandError::IntegrityFailed => Problem::new(
                StatusCode::BAD_GATEWAY,
                "integrity_check_failed",
                "the stored copy of this record failed its integrity check and was not served; operators have been alerted",
            ),
            CommandError::ContentUnavailable => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "content_unavailable",
                "the content of this record cannot be fetched right now; try again later",
            )
            .retry_after(30),
            CommandError::Unexpected(error) => Problem::internal(&error),
        }
    }
}

impl From<AuthError> for Problem {
    fn from(error: AuthError) -> Problem {
        match error {
            AuthError::Malformed => Problem::unauthenticated(
                "token_malformed",
                "the bearer token is not an AfyaChain session token",
            ),
            AuthError::Forged => {
                Problem::unauthenticated("token_invalid", "the bearer token was not issued here")
            }
            AuthError::Expired => {
                Problem::unauthenticated("token_expired", "the session has expired; sign in again")
            }
            AuthError::Ended => {
                Problem::unauthenticated("token_revoked", "the session has ended; sign in again")
            }
            AuthError::Withdrawn => {
                Problem::unauthenticated("key_withdrawn", "the API key was withdrawn")
            }
            AuthError::Unexpected(error) => Problem::internal(&error),
        }
    }
}

impl From<ValueError> for Problem {
    fn from(error: ValueError) -> Problem {
        Problem::field(error.field, error.reason)
    }
}

impl From<anyhow::Error> for Problem {
    fn from(error: anyhow::Error) -> Problem {
        Problem::internal(&error)
    }
}

/// Collects the invalid fields of one request, so a client learns of all of them at
/// once; the request is refused if any is invalid.
#[derive(Default)]
pub struct Validation {
    errors: Vec<FieldError>,
}

impl Validation {
    /// The parsed value, or `None` with its error noted.
    pub fn check<T>(&mut self, parsed: Result<T, ValueError>) -> Option<T> {
        match parsed {
            Ok(value) => Some(value),
            Err(e) => {
                self.errors.push(FieldError {
                    field: e.field.to_owned(),
                    detail: e.reason.to_owned(),
                });
                None
            }
        }
    }

    /// Notes an error on a field by name.
    pub fn fail(&mut self, field: impl Into<String>, detail: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.into(),
            detail: detail.into(),
        });
    }

    /// `Err` with every noted error, if any.
    pub fn finish(self) -> Result<(), Problem> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(Problem::invalid(self.errors))
        }
    }
}

/// Unwraps values that [`Validation::finish`] has vouched for.
pub fn checked<T>(value: Option<T>) -> Result<T, Problem> {
    value.ok_or_else(|| Problem::internal(&anyhow::anyhow!("a validated value is missing")))
}
