//! What handlers take from a request: the caller behind a bearer token, a bounded
//! body parsed as JSON with errors that name the field, and the command metadata
//! (actor, correlation, idempotency key tied to this exact request).
//!
//! Bodies are bounded in size, in time and, for uploads, in memory: a body must arrive
//! at a minimum pace or is cut with 408 and its connection closed, and an upload takes
//! its size from a byte budget (per account and overall) before it is read, so the
//! memory uploads hold does not grow with their number.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::http::{ConnectionType, StatusCode};
use actix_web::web::{Bytes, Data};
use actix_web::{FromRequest, HttpMessage, HttpRequest, HttpResponse, ResponseError};
use commands::spool::Spool;
use commands::Authenticated;
use domain::actor::Actor;
use eventstore::CommandMeta;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use uuid::Uuid;

use crate::config::BodyLimits;
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
    type Error = BodyRefused;
    type Future = Pin<Box<dyn Future<Output = Result<Body, BodyRefused>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let req = req.clone();
        let mut payload = payload.take();
        Box::pin(async move {
            let pace = Pace::json(&state(&req).map_err(BodyRefused)?.config.bodies);
            let bytes = read_limited(&req, &mut payload, JSON_LIMIT, pace)
                .await
                .map_err(BodyRefused)?;
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

/// A body refused while it was being read (too large, too slow, no memory for it):
/// answered as its problem, and the connection is closed, since the rest of the body
/// may still be on its way.
#[derive(Debug)]
pub struct BodyRefused(pub Problem);

impl std::fmt::Display for BodyRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl ResponseError for BodyRefused {
    fn status_code(&self) -> StatusCode {
        self.0.status_code()
    }

    fn error_response(&self) -> HttpResponse {
        closing(&self.0)
    }
}

/// `problem`'s answer with `Connection: close`.
pub fn closing(problem: &Problem) -> HttpResponse {
    let mut response = problem.error_response();
    response
        .head_mut()
        .set_connection_type(ConnectionType::Close);
    response
}

/// How slowly a body may arrive. A client that sends slower is answered 408
/// `body_too_slow`, so a trickle of bytes cannot hold a request (and its memory) open.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// The whole body within this.
    pub within: Option<Duration>,
    /// At least this many bytes a second on average since reading began, once `grace`
    /// has passed (0: no minimum).
    pub min_rate: u64,
    pub grace: Duration,
    /// At most this long between two pieces.
    pub idle: Duration,
}

impl Pace {
    /// A JSON body: small, so whole within a bound.
    pub fn json(limits: &BodyLimits) -> Pace {
        Pace {
            within: Some(limits.json_within),
            min_rate: 0,
            grace: Duration::ZERO,
            idle: limits.idle,
        }
    }

    /// An upload: as large as a scan, so a minimum average rate that a 2G phone
    /// keeps, after a grace for a slow start, and a bound long enough for the largest
    /// upload over a slow connection.
    pub fn upload(limits: &BodyLimits) -> Pace {
        Pace {
            within: Some(limits.upload_within),
            min_rate: limits.upload_min_rate,
            grace: limits.upload_grace,
            idle: limits.idle,
        }
    }

    /// When the next piece is due, having received `received` bytes since `start`
    /// and the last piece at `last`.
    fn deadline(&self, start: Instant, last: Instant, received: usize) -> Instant {
        let mut due = last + self.idle;
        if let Some(within) = self.within {
            due = due.min(start + within);
        }
        if let Some(seconds) = (received as u64).checked_div(self.min_rate) {
            // The moment the average since `start` would fall below the minimum.
            let behind = Duration::from_secs(seconds);
            if let Some(late) = start.checked_add(self.grace + behind) {
                due = due.min(late);
            }
        }
        due
    }
}

/// The length a request declares for its body: 413 when it is larger than `limit`,
/// before anything is read.
pub fn declared_length(req: &HttpRequest, limit: usize) -> Result<Option<usize>, Problem> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit as u64 => Err(too_large(limit)),
        Some(n) => Ok(Some(n as usize)),
        None => Ok(None),
    }
}

fn too_large(limit: usize) -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("the body must be at most {limit} bytes"),
    )
}

/// Reads a body of at most `limit` bytes at `pace`: 413 (before reading) when its
/// declared length is larger, and as soon as it grows larger; 408 when it comes too
/// slowly.
pub async fn read_limited<S>(
    req: &HttpRequest,
    payload: &mut S,
    limit: usize,
    pace: Pace,
) -> Result<Bytes, Problem>
where
    S: futures::Stream<Item = Result<Bytes, actix_web::error::PayloadError>> + Unpin,
{
    let declared = declared_length(req, limit)?;
    let mut body = Vec::with_capacity(declared.unwrap_or(0));
    read_into(payload, &mut body, declared.unwrap_or(limit), pace).await?;
    Ok(Bytes::from(body))
}

/// Appends the body to `body`, at most `limit` bytes of it, at `pace` (timed from
/// now: time spent waiting for an upload budget does not count): 413 as soon as it
/// grows larger, 408 `body_too_slow` when a piece is late. `body` grows only past its
/// capacity, so a caller that knows the length reads it into one allocation.
pub async fn read_into<S>(
    payload: &mut S,
    body: &mut Vec<u8>,
    limit: usize,
    pace: Pace,
) -> Result<(), Problem>
where
    S: futures::Stream<Item = Result<Bytes, actix_web::error::PayloadError>> + Unpin,
{
    read_paced(payload, Sink::Memory(body), limit, pace).await
}

/// What an upload spool is charged in the spool budget before a byte arrives: its
/// file, and the memory it holds while open (a piece and the file's buffer), so that
/// many tiny uploads cannot hold more than the budget says.
pub const SPOOL_CHARGE: usize = 256 * 1024;
/// How the charge grows as the body arrives: a sender holds only what it has sent.
const SPOOL_STEP: usize = 1024 * 1024;
/// How long a body that is arriving waits for more of the spool budget.
const SPOOL_GROW_WAIT: Duration = Duration::from_secs(10);

/// Like [`read_into`], but into an upload [`Spool`] on disk, so that however slowly the
/// body arrives it holds no more than a piece of memory meanwhile. `permit` holds the
/// spool's share of `budget` (at first [`SPOOL_CHARGE`]) and grows with what arrives.
pub async fn read_to_spool<S>(
    payload: &mut S,
    spool: &mut Spool,
    budget: &UploadBudget,
    permit: &mut UploadPermit,
    limit: usize,
    pace: Pace,
) -> Result<(), Problem>
where
    S: futures::Stream<Item = Result<Bytes, actix_web::error::PayloadError>> + Unpin,
{
    let sink = Sink::Spool {
        spool,
        budget,
        permit,
        charged: SPOOL_CHARGE,
        cap: limit.max(SPOOL_CHARGE),
    };
    read_paced(payload, sink, limit, pace).await
}

/// A spool's error as an answer: a full disk, or a process out of files, is a
/// capacity problem (503, try again later), anything else a fault.
pub fn spool_problem(error: anyhow::Error) -> Problem {
    if commands::spool::is_out_of_room(&error) {
        tracing::warn!(error = format!("{error:#}"), "no room to spool an upload");
        return busy();
    }
    Problem::internal(&error.context("spooling an upload"))
}

fn busy() -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "uploads_busy",
        "too many uploads are in progress; try again shortly",
    )
    .retry_after(10)
}

/// Where a body is read to.
enum Sink<'a> {
    Memory(&'a mut Vec<u8>),
    Spool {
        spool: &'a mut Spool,
        budget: &'a UploadBudget,
        permit: &'a mut UploadPermit,
        /// The bytes `permit` holds.
        charged: usize,
        /// The most it holds: the body's limit (which fits the budget).
        cap: usize,
    },
}

impl Sink<'_> {
    async fn append(&mut self, bytes: &[u8]) -> Result<(), Problem> {
        match self {
            Sink::Memory(body) => {
                body.extend_from_slice(bytes);
                Ok(())
            }
            Sink::Spool {
                spool,
                budget,
                permit,
                charged,
                cap,
            } => {
                let needed = spool.len() + bytes.len();
                if needed > *charged {
                    let more = (needed - *charged)
                        .max(SPOOL_STEP)
                        .min(cap.saturating_sub(*charged));
                    budget.grow(permit, more, SPOOL_GROW_WAIT).await?;
                    *charged += more;
                }
                spool.write(bytes).await.map_err(spool_problem)
            }
        }
    }
}

async fn read_paced<S>(
    payload: &mut S,
    mut sink: Sink<'_>,
    limit: usize,
    pace: Pace,
) -> Result<(), Problem>
where
    S: futures::Stream<Item = Result<Bytes, actix_web::error::PayloadError>> + Unpin,
{
    let start = Instant::now();
    let mut last = start;
    let mut received = 0usize;
    loop {
        let due = pace.deadline(start, last, received);
        let next = tokio::time::timeout_at(due, payload.next())
            .await
            .map_err(|_| {
                Problem::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_too_slow",
                    "the body arrived too slowly; send it again on a faster connection",
                )
            })?;
        let Some(chunk) = next else {
            return Ok(());
        };
        let chunk = chunk.map_err(|_| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "body_unreadable",
                "the request body could not be read",
            )
        })?;
        if received + chunk.len() > limit {
            return Err(too_large(limit));
        }
        sink.append(&chunk).await?;
        received += chunk.len();
        last = Instant::now();
    }
}

/// A byte budget for upload bodies, in units of [`BUDGET_UNIT`] bytes: overall, and per
/// account, so that neither many accounts nor one account's many parallel uploads hold
/// more. Two are kept: the disk their spools may fill while bodies arrive (a share of
/// it taken before a byte is read), and the memory a whole body holds while it is
/// encrypted and stored (taken once it has arrived, one largest upload's worth per
/// account). An upload waits for its share; the waiting is not counted against its
/// pace, but is bounded (503 after that).
pub struct UploadBudget {
    total: Arc<Semaphore>,
    total_units: u32,
    account_units: u32,
    wait: Duration,
    /// One semaphore per account with uploads in flight or waiting; removed when the
    /// last of them ends.
    accounts: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// The granularity of the upload budget.
pub const BUDGET_UNIT: usize = 1024;

fn units(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(BUDGET_UNIT).max(1)).unwrap_or(u32::MAX)
}

impl UploadBudget {
    /// `total_bytes` over all uploads, `account_bytes` for one account's, waiting at
    /// most `wait` for them.
    pub fn new(total_bytes: usize, account_bytes: usize, wait: Duration) -> UploadBudget {
        let total_units = units(total_bytes);
        UploadBudget {
            total: Arc::new(Semaphore::new(total_units as usize)),
            total_units,
            account_units: units(account_bytes).min(total_units),
            wait,
            accounts: Mutex::new(HashMap::new()),
        }
    }

    /// Waits until `bytes` fit in the account's and the overall budget; 503
    /// `uploads_busy` when they do not within the wait. An upload larger than a
    /// budget takes all of it (the size limit refuses those before this).
    pub async fn acquire(
        self: &Arc<Self>,
        account: &str,
        bytes: usize,
    ) -> Result<UploadPermit, Problem> {
        self.acquire_staged(account, bytes, bytes).await
    }

    /// Like [`UploadBudget::acquire`], but taking `account_bytes` of the account's
    /// share and only `first_bytes` of the overall budget, which [`UploadBudget::grow`]
    /// adds to as the body arrives: an account's own uploads queue for its share before
    /// they are read, while slow senders of many accounts hold only what they sent.
    pub async fn acquire_staged(
        self: &Arc<Self>,
        account: &str,
        account_bytes: usize,
        first_bytes: usize,
    ) -> Result<UploadPermit, Problem> {
        let semaphore = {
            let mut accounts = self
                .accounts
                .lock()
                .map_err(|_| Problem::internal(&anyhow::anyhow!("upload budget poisoned")))?;
            accounts
                .entry(account.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.account_units as usize)))
                .clone()
        };
        let mut permit = UploadPermit {
            budget: self.clone(),
            account: account.to_owned(),
            semaphore: semaphore.clone(),
            held: None,
        };
        // The account's share first: one account's uploads queue among themselves
        // without holding the overall budget that other accounts wait for.
        let both = async {
            let own = semaphore
                .acquire_many_owned(units(account_bytes).min(self.account_units))
                .await?;
            let all = self
                .total
                .clone()
                .acquire_many_owned(units(first_bytes).min(self.total_units))
                .await?;
            Ok::<_, tokio::sync::AcquireError>((own, all))
        };
        match tokio::time::timeout(self.wait, both).await {
            Ok(Ok(held)) => {
                permit.held = Some(held);
                Ok(permit)
            }
            Ok(Err(closed)) => Err(Problem::internal(&closed.into())),
            Err(_) => Err(busy()),
        }
    }

    /// Adds `bytes` of the overall budget to what a permit of
    /// [`UploadBudget::acquire_staged`] holds, waiting at most `wait` for them (503
    /// `uploads_busy` then: the upload gives back what it held).
    pub async fn grow(
        &self,
        permit: &mut UploadPermit,
        bytes: usize,
        wait: Duration,
    ) -> Result<(), Problem> {
        let more = self
            .total
            .clone()
            .acquire_many_owned(units(bytes).min(self.total_units));
        match (tokio::time::timeout(wait, more).await, permit.held.as_mut()) {
            (Ok(Ok(more)), Some((_, all))) => {
                all.merge(more);
                Ok(())
            }
            (Ok(Ok(_)), None) => Err(Problem::internal(&anyhow::anyhow!(
                "an upload grew a permit it did not hold"
            ))),
            (Ok(Err(closed)), _) => Err(Problem::internal(&closed.into())),
            (Err(_), _) => Err(busy()),
        }
    }
}

/// An upload's share of the [`UploadBudget`], given back when dropped.
pub struct UploadPermit {
    budget: Arc<UploadBudget>,
    account: String,
    semaphore: Arc<Semaphore>,
    held: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

impl Drop for UploadPermit {
    fn drop(&mut self) {
        self.held = None;
        if let Ok(mut accounts) = self.budget.accounts.lock() {
            // Only the map and this permit still know the account's semaphore: no
            // upload of the account is in flight or waiting (new ones clone it under
            // this lock).
            if Arc::strong_count(&self.semaphore) == 2 {
                accounts.remove(&self.account);
            }
        }
    }
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
    // Each part followed by a newline, fed to the HMAC one by one: the same tag as of
    // their concatenation, without a copy of an upload's body.
    let fingerprint = keys.tag_parts(
        "request fingerprint",
        &[
            req.method().as_str().as_bytes(),
            b"\n",
            req.path().as_bytes(),
            b"\n",
            req.query_string().as_bytes(),
            b"\n",
            content_type,
            b"\n",
            fingerprint_body,
            b"\n",
        ],
    );
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

    #[actix_rt::test]
    async fn uploads_wait_for_their_accounts_share_and_the_overall_budget() {
        let kib = BUDGET_UNIT;
        // 4 KiB overall, 2 KiB per account, waiting at most 200 ms.
        let budget = Arc::new(UploadBudget::new(
            4 * kib,
            2 * kib,
            Duration::from_millis(200),
        ));
        let a1 = budget.acquire("a", 2 * kib).await.unwrap();
        // The same account's next upload waits for the first, then gives up: 503.
        let busy = budget.acquire("a", kib).await.map(|_| ()).unwrap_err();
        assert_eq!((busy.status, busy.code), (503, "uploads_busy"));
        // Another account still has room, up to the overall budget.
        let b1 = budget.acquire("b", 2 * kib).await.unwrap();
        let full = budget.acquire("c", kib).await.map(|_| ()).unwrap_err();
        assert_eq!(full.code, "uploads_busy");
        // A waiting upload goes on as soon as one ends.
        let waiting = {
            let budget = budget.clone();
            actix_rt::spawn(async move { budget.acquire("a", 2 * kib).await.is_ok() })
        };
        actix_rt::time::sleep(Duration::from_millis(50)).await;
        drop(a1);
        assert!(waiting.await.unwrap());
        drop(b1);
        // Nothing in flight: no account is remembered.
        assert!(budget.accounts.lock().unwrap().is_empty());
    }

    #[test]
    fn a_body_is_due_by_its_pause_its_bound_and_its_rate() {
        let start = Instant::now();
        let pace = Pace {
            within: Some(Duration::from_secs(15)),
            min_rate: 1024,
            grace: Duration::from_secs(10),
            idle: Duration::from_secs(60),
        };
        // Nothing yet: due when the grace ends.
        assert_eq!(
            pace.deadline(start, start, 0),
            start + Duration::from_secs(10)
        );
        // 5 KiB buys 5 more seconds, but the whole body is due at 15 s.
        assert_eq!(
            pace.deadline(start, start, 5 * 1024),
            start + Duration::from_secs(15)
        );
        let upload = Pace {
            within: None,
            ..pace
        };
        // 1 MiB received: the rate allows long, the pause after the last piece does not.
        let last = start + Duration::from_secs(20);
        assert_eq!(
            upload.deadline(start, last, 1024 * 1024),
            last + Duration::from_secs(60)
        );
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
