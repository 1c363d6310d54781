//! What handlers take from a request: the caller behind a bearer token, a bounded
//! body parsed as JSON with errors that name the field, and the command metadata
//! (actor, correlation, idempotency key tied to this exact request).

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::http::StatusCode;
use actix_web::web::{Bytes, BytesMut, Data};
use actix_web::{FromRequest, HttpMessage, HttpRequest};
use commands::Authenticated;
use domain::actor::Actor;
use eventstore::CommandMeta;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::problem::Problem;
use crate::server::AppState;

/// JSON bodies are small; anything larger is refused before it is read.
pub const JSON_LIMIT: usize = 64 * 1024;

/// The authenticated caller: a valid bearer token of an active session.
#[derive(Clone, Copy, Debug)]
pub struct Caller(pub Authenticated);

impl Caller {
    pub fn actor(&self) -> Actor {
        self.0.actor
    }
}

impl FromRequest for Caller {
    type Error = Problem;
    type Future = Pin<Box<dyn Future<Output = Result<Caller, Problem>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let state = state(&req)?;
            let value = req
                .headers()
                .get(header::AUTHORIZATION)
                .ok_or_else(|| {
                    Problem::unauthenticated(
                        "unauthenticated",
                        "sign in first: send Authorization: Bearer <token>",
                    )
                })?
                .to_str()
                .map_err(|_| {
                    Problem::unauthenticated(
                        "token_malformed",
                        "the Authorization header is not text",
                    )
                })?;
            let token = match value.split_once(' ') {
                Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
                _ => {
                    return Err(Problem::unauthenticated(
                        "token_malformed",
                        "the Authorization header must be: Bearer <token>",
                    ))
                }
            };
            let authenticated = state.commands.authenticate(token).await?;
            Ok(Caller(authenticated))
        })
    }
}

pub fn state(req: &HttpRequest) -> Result<Data<AppState>, Problem> {
    req.app_data::<Data<AppState>>()
        .cloned()
        .ok_or_else(|| Problem::internal(&anyhow::anyhow!("application state missing")))
}

/// A request body of at most [`JSON_LIMIT`] bytes, read but not yet parsed, so that
/// handlers authorize before they validate.
pub struct Body {
    bytes: Bytes,
    content_type: Option<String>,
}

impl FromRequest for Body {
    type Error = Problem;
    type Future = Pin<Box<dyn Future<Output = Result<Body, Problem>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let req = req.clone();
        let mut payload = payload.take();
        Box::pin(async move {
            let bytes = read_limited(&req, &mut payload, JSON_LIMIT).await?;
            let content_type = req
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            Ok(Body {
                bytes,
                content_type,
            })
        })
    }
}

impl Body {
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The body as `T`: 415 unless it is declared JSON, 400 if it is not JSON, 422
    /// naming the field if it does not fit `T` (wrong type, unknown or missing field).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Problem> {
        let is_json = self.content_type.as_deref().is_some_and(|ct| {
            let essence = ct.split(';').next().unwrap_or("").trim();
            essence.eq_ignore_ascii_case("application/json")
        });
        if !is_json {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with Content-Type: application/json",
            )
            .at("Content-Type"));
        }
        parse_json(&self.bytes)
    }

    /// Like [`Body::json`], but an absent body means `T::default()`.
    pub fn json_or_default<T: DeserializeOwned + Default>(&self) -> Result<T, Problem> {
        if self.bytes.is_empty() {
            Ok(T::default())
        } else {
            self.json()
        }
    }
}

/// Reads a body of at most `limit` bytes: 413 (before reading) when its declared
/// length is larger, and as soon as it grows larger.
pub async fn read_limited<S>(
    req: &HttpRequest,
    payload: &mut S,
    limit: usize,
) -> Result<Bytes, Problem>
where
    S: futures::Stream<Item = Result<Bytes, actix_web::error::PayloadError>> + Unpin,
{
    let too_large = || {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body must be at most {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(0).min(limit as u64) as usize);
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|_| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "body_unreadable",
                "the request body could not be read",
            )
        })?;
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de)
        .map_err(|error| (error.path().to_string(), error.into_inner()))
        .and_then(|v| de.end().map(|()| v).map_err(|e| (String::new(), e)));
    match value {
        Ok(value) => Ok(value),
        Err((path, inner)) => match inner.classify() {
            serde_json::error::Category::Data => {
                let message = strip_position(&inner.to_string());
                Err(Problem::field(field_of(&path, &message), message))
            }
            _ => Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!(
                    "the body is not valid JSON (line {}, column {})",
                    inner.line(),
                    inner.column()
                ),
            )),
        },
    }
}

/// serde_json's messages end with " at line L column C": the field is named instead.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// The field a data error is about: its path, or for unknown and missing fields the
/// name serde quotes, under that path.
fn field_of(path: &str, message: &str) -> String {
    let quoted = ["unknown field `", "missing field `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
        .and_then(|rest| rest.split('`').next());
    // Every request body is an object: a path into a top-level array means the body
    // itself is wrong.
    let root = path.is_empty() || path == "." || path.starts_with('[');
    match (quoted, root) {
        (Some(name), true) => name.to_owned(),
        (Some(name), false) if !path.ends_with(name) => format!("{path}.{name}"),
        (_, true) => "body".to_owned(),
        _ => path.to_owned(),
    }
}

/// The request id the telemetry middleware gave this request.
#[derive(Clone, Copy, Debug)]
pub struct RequestId(pub Uuid);

pub fn request_id(req: &HttpRequest) -> Uuid {
    req.extensions()
        .get::<RequestId>()
        .map(|r| r.0)
        .unwrap_or_else(Uuid::new_v4)
}

/// Metadata for the command this request makes: who (opaque), correlated with the
/// request id, and, for a POST that carries an `Idempotency-Key`, that key scoped to
/// the caller and tied to this exact request.
///
/// Only POSTs are idempotent by key: a read (GET) is checked and recorded every time,
/// whatever headers it carries, so a key can never replay a read past a revocation.
/// Neither the client's key nor the fingerprint is kept in the log in a readable form:
/// the key is stored as an HMAC, and the fingerprint (an HMAC of method, path, query
/// and `fingerprint_body`) goes only to the key table (the append trigger strips it
/// from the event), where it is forgotten after a day. Callers leave secrets such as
/// passwords out of `fingerprint_body`.
pub fn command_meta(
    req: &HttpRequest,
    actor: Option<Actor>,
    fingerprint_body: &[u8],
) -> Result<CommandMeta, Problem> {
    let actor_ref = actor.map_or_else(|| "anonymous".to_owned(), |a| a.reference());
    keyed_meta(req, &actor_ref, &actor_ref, fingerprint_body)
}

/// [`command_meta`] for an anonymous command about one phone (sign-up, sign-in): its
/// key is scoped to that phone, so one client's key can never answer for another
/// phone's request.
pub fn phone_meta(
    req: &HttpRequest,
    phone_index: &str,
    fingerprint_body: &[u8],
) -> Result<CommandMeta, Problem> {
    keyed_meta(
        req,
        "anonymous",
        &format!("phone:{phone_index}"),
        fingerprint_body,
    )
}

fn keyed_meta(
    req: &HttpRequest,
    actor_ref: &str,
    key_scope: &str,
    fingerprint_body: &[u8],
) -> Result<CommandMeta, Problem> {
    let state = state(req)?;
    let request_id = request_id(req);
    let meta = CommandMeta::new(actor_ref).with_correlation(request_id, None);
    if req.method() != actix_web::http::Method::POST {
        return Ok(meta);
    }
    let Some(key) = req.headers().get("idempotency-key") else {
        return Ok(meta);
    };
    let key = key
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            Problem::field(
                "Idempotency-Key",
                "must be 1 to 255 visible ASCII characters",
            )
        })?;
    let keys = state.commands.keys();
    let scoped = keys.tag("idempotency key", format!("{key_scope}|{key}").as_bytes());
    let content_type = req
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    let mut request = Vec::with_capacity(fingerprint_body.len() + 256);
    for part in [
        req.method().as_str().as_bytes(),
        req.path().as_bytes(),
        req.query_string().as_bytes(),
        content_type,
        fingerprint_body,
    ] {
        request.extend_from_slice(part);
        request.push(b'\n');
    }
    let fingerprint = keys.tag("request fingerprint", &request);
    Ok(meta
        .with_idempotency_key(commands::keys::hex(&scoped))
        .with_fingerprint(commands::keys::hex(&fingerprint)))
}

/// A JSON body without its `password` field, canonically serialized: what a sign-up
/// or sign-in is fingerprinted by, so no hash of a password is ever stored.
pub fn without_password(body: &[u8]) -> Vec<u8> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(mut map)) => {
            map.remove("password");
            serde_json::to_vec(&map).unwrap_or_default()
        }
        _ => body.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        phone: String,
        duration_days: u16,
        categories: Vec<String>,
    }

    fn problem(body: &str) -> Problem {
        parse_json::<Sample>(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn json_errors_name_the_field() {
        let p = problem(r#"{"phone":"1","duration_days":"x","categories":[]}"#);
        assert_eq!((p.status, p.field.as_deref()), (422, Some("duration_days")));
        let p = problem(r#"{"phone":"1","duration_days":3,"categories":[1]}"#);
        assert_eq!(p.field.as_deref(), Some("categories[0]"));
        let p = problem(r#"{"phone":"1","duration_days":3,"categories":[],"admin":true}"#);
        assert_eq!(p.field.as_deref(), Some("admin"));
        let p = problem(r#"{"duration_days":3,"categories":[]}"#);
        assert_eq!(p.field.as_deref(), Some("phone"));
        let p = problem(r#"[1]"#);
        assert_eq!(p.field.as_deref(), Some("body"));
        let p = problem(r#"{"phone": "#);
        assert_eq!((p.status, p.code), (400, "malformed_json"));
        let p = problem(r#"{"phone":"1","duration_days":3,"categories":[]} trailing"#);
        assert_eq!(p.status, 400);
        // No position noise in the message.
        assert!(!problem(r#"{"phone":5}"#).detail.contains("line"));
    }
}
