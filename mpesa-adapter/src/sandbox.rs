//! A local stand-in for Safaricom's Daraja: OAuth, STK Push and STK Push Query on the
//! same paths, with the same status codes and JSON, and the STK callback delivered to
//! the `CallBackURL` after a delay with a chosen outcome. Control endpoints under
//! `/sandbox/` (and the same calls on [`Sandbox`]) choose outcomes, hold them until
//! released, expire tokens and inject failures. Logs carry only opaque ids: never a credential, token, password or
//! phone number.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{ServerHandle, ServiceRequest, ServiceResponse};
use actix_web::http::{header, StatusCode};
use actix_web::middleware::{from_fn, Next};
use actix_web::web::{self, Data};
use actix_web::{HttpRequest, HttpResponse, HttpServer, ResponseError};
use anyhow::Context;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand::distributions::Alphanumeric;
use rand::Rng;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

/// Largest request body accepted.
const BODY_LIMIT: usize = 64 * 1024;
/// Bound on one callback POST, as Daraja gives the receiver.
const CALLBACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Gap between the two deliveries of [`Outcome::Duplicate`].
const DUPLICATE_GAP: Duration = Duration::from_millis(200);
/// Africa/Nairobi is UTC+3 all year (no daylight saving).
const NAIROBI_OFFSET_SECS: i64 = 3 * 3600;
const RECEIPT_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

/// The sandbox's credentials, shortcode and behaviour.
#[derive(Clone)]
pub struct SandboxConfig {
    pub consumer_key: String,
    pub consumer_secret: String,
    pub shortcode: String,
    pub passkey: String,
    /// Lifetime of an access token; `expires_in` answers its whole seconds.
    pub token_ttl: Duration,
    /// Time from an accepted STK push to its callback (unless a scenario says otherwise).
    pub callback_delay: Duration,
    /// Outcome of pushes to a phone with no scenario.
    pub default_outcome: Outcome,
}

impl SandboxConfig {
    /// Safaricom's public sandbox shortcode and passkey, placeholder consumer key and
    /// secret, a one-second callback delay, tokens for 3599 s, every push succeeding.
    pub fn public_sandbox() -> SandboxConfig {
        SandboxConfig {
            consumer_key: "sandbox-key".to_owned(),
            consumer_secret: "sandbox-secret".to_owned(),
            shortcode: "174379".to_owned(),
            passkey: "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919".to_owned(),
            token_ttl: Duration::from_secs(3599),
            callback_delay: Duration::from_secs(1),
            default_outcome: Outcome::Success,
        }
    }
}

impl fmt::Debug for SandboxConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxConfig")
            .field("consumer_key", &"<set>")
            .field("consumer_secret", &"<redacted>")
            .field("shortcode", &self.shortcode)
            .field("passkey", &"<redacted>")
            .field("token_ttl", &self.token_ttl)
            .field("callback_delay", &self.callback_delay)
            .field("default_outcome", &self.default_outcome)
            .finish()
    }
}

/// How an STK push ends: the callback's `ResultCode`, or no callback at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// ResultCode 0, with the receipt in `CallbackMetadata`.
    Success,
    /// 1032: the customer cancelled the prompt.
    Cancelled,
    /// 1037: the phone could not be reached.
    Timeout,
    /// 2001: wrong M-Pesa PIN.
    WrongPin,
    /// 1: not enough money.
    InsufficientFunds,
    /// No callback is ever delivered; a query finds 1037 after the delay.
    NoCallback,
    /// Paid, but the callback is lost on the way: none is delivered, and a query
    /// finds it paid (0) after the delay. (A client may post the callback itself.)
    PaidNoCallback,
    /// The success callback, delivered twice with the same receipt.
    Duplicate,
}

impl Outcome {
    /// The name [`FromStr`] reads.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Cancelled => "1032",
            Outcome::Timeout => "1037",
            Outcome::WrongPin => "2001",
            Outcome::InsufficientFunds => "1",
            Outcome::NoCallback => "no_callback",
            Outcome::PaidNoCallback => "paid_no_callback",
            Outcome::Duplicate => "duplicate",
        }
    }

    /// The final `ResultCode` and `ResultDesc`, as the callback and a query give them.
    pub fn result(self) -> (u32, &'static str) {
        match self {
            Outcome::Success | Outcome::Duplicate | Outcome::PaidNoCallback => {
                (0, "The service request is processed successfully.")
            }
            Outcome::Cancelled => (1032, "Request cancelled by user"),
            Outcome::Timeout | Outcome::NoCallback => (1037, "DS timeout user cannot be reached"),
            Outcome::WrongPin => (2001, "The initiator information is invalid."),
            Outcome::InsufficientFunds => (1, "The balance is insufficient for the transaction."),
        }
    }
}

/// An outcome name that is none of those [`Outcome::from_str`] knows.
#[derive(Debug, thiserror::Error)]
#[error("unknown outcome {0:?}: expected success, 1032, 1037, 2001, 1, no_callback, paid_no_callback or duplicate")]
pub struct UnknownOutcome(String);

impl FromStr for Outcome {
    type Err = UnknownOutcome;

    fn from_str(s: &str) -> Result<Outcome, UnknownOutcome> {
        match s.trim() {
            "success" | "0" => Ok(Outcome::Success),
            "1032" | "cancelled" => Ok(Outcome::Cancelled),
            "1037" | "timeout" => Ok(Outcome::Timeout),
            "2001" | "wrong_pin" => Ok(Outcome::WrongPin),
            "1" | "insufficient_funds" => Ok(Outcome::InsufficientFunds),
            "no_callback" => Ok(Outcome::NoCallback),
            "paid_no_callback" => Ok(Outcome::PaidNoCallback),
            "duplicate" => Ok(Outcome::Duplicate),
            other => Err(UnknownOutcome(other.to_owned())),
        }
    }
}

/// An accepted STK push.
#[derive(Clone, Debug, Serialize)]
pub struct Push {
    pub merchant_request_id: String,
    pub checkout_request_id: String,
    pub amount: u64,
    /// `PhoneNumber`, the phone prompted.
    pub phone: String,
    pub account_reference: String,
    pub callback_url: String,
    pub transaction_type: String,
}

/// A running sandbox; [`Sandbox::stop`] it, or it stops when dropped.
pub struct Sandbox {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub url: String,
    shared: Arc<Shared>,
    handle: ServerHandle,
    server: JoinHandle<std::io::Result<()>>,
    dispatcher: JoinHandle<()>,
}

impl Sandbox {
    /// Starts on a free port of 127.0.0.1.
    pub async fn start(config: SandboxConfig) -> anyhow::Result<Sandbox> {
        Sandbox::start_on(config, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts on `addr`; callbacks are delivered from the caller's Tokio runtime.
    pub async fn start_on(config: SandboxConfig, addr: SocketAddr) -> anyhow::Result<Sandbox> {
        let listener = TcpListener::bind(addr)
            .with_context(|| format!("binding the Daraja sandbox to {addr}"))?;
        let local = listener
            .local_addr()
            .context("reading the sandbox's address")?;
        let client = reqwest::Client::builder()
            .timeout(CALLBACK_TIMEOUT)
            .build()
            .context("building the callback client")?;
        let (deliveries, queue) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            config,
            state: Mutex::default(),
            deliveries,
        });
        let data = Data::from(shared.clone());
        let server = HttpServer::new(move || {
            actix_web::App::new()
                .app_data(data.clone())
                .route("/oauth/v1/generate", web::get().to(oauth))
                .route("/mpesa/stkpush/v1/processrequest", web::post().to(stk_push))
                .route("/mpesa/stkpushquery/v1/query", web::post().to(stk_query))
                .route("/sandbox/scenarios", web::post().to(set_scenario))
                .route("/sandbox/pushes", web::get().to(list_pushes))
                .route("/sandbox/expire-tokens", web::post().to(expire_tokens))
                .route("/sandbox/fail-next", web::post().to(fail_next))
                .route(
                    "/sandbox/fail-next-queries",
                    web::post().to(fail_next_queries),
                )
                .route("/sandbox/hold", web::post().to(hold))
                .route("/sandbox/release", web::post().to(release))
                .default_service(web::to(|| async { DarajaError::NotFound.error_response() }))
                .wrap(from_fn(log_request))
        })
        .workers(2)
        .disable_signals()
        .shutdown_timeout(2)
        .listen(listener)
        .context("starting the sandbox's HTTP server")?
        .run();
        let handle = server.handle();
        Ok(Sandbox {
            url: format!("http://{local}"),
            shared,
            handle,
            server: tokio::spawn(server),
            dispatcher: tokio::spawn(dispatch(client, queue)),
        })
    }

    /// Stops accepting, lets requests in flight finish; callbacks not yet delivered
    /// are dropped.
    pub async fn stop(mut self) {
        self.handle.stop(true).await;
        if let Ok(Err(error)) = (&mut self.server).await {
            tracing::warn!(%error, "the sandbox's HTTP server stopped with an error");
        }
    }

    /// Every accepted STK push, in order.
    pub fn pushes(&self) -> Vec<Push> {
        self.shared.state().pushes.clone()
    }

    /// Pushes to `phone` (2547XXXXXXXX) from now on end in `outcome`, after `delay`
    /// (or the configured delay).
    pub fn set_outcome(&self, phone: &str, outcome: Outcome, delay: Option<Duration>) {
        self.shared.set_outcome(phone, outcome, delay);
    }

    /// Pushes to `phone` from now on stay in process until [`Sandbox::release`]: the
    /// query answers that the transaction is being processed, and no callback is sent,
    /// however long it takes (their delay counts from the release).
    pub fn hold(&self, phone: &str) {
        self.shared.state().held.insert(phone.to_owned());
    }

    /// Ends the hold on `phone`: the pushes held end now in their outcomes (the query
    /// gives the result), their callbacks delivered after their delay.
    pub fn release(&self, phone: &str) {
        self.shared.release(phone);
    }

    /// Every token issued so far becomes invalid (401 on use).
    pub fn expire_tokens(&self) {
        self.shared.state().tokens.clear();
    }

    /// The next `count` calls to STK Push or STK Push Query answer `status` (a 4xx or
    /// 5xx; anything else means 500) with Daraja's error JSON. Checked after the token.
    pub fn fail_next(&self, status: u16, count: usize) {
        self.shared.fail_next(status, count);
    }

    /// The next `count` STK Push Queries answer `status` (a 4xx or 5xx; anything else
    /// means 500) with Daraja's error JSON, as [`Sandbox::fail_next`] does, while STK
    /// Pushes go through. A 429 is Daraja's rate limit.
    pub fn fail_next_queries(&self, status: u16, count: usize) {
        self.shared.fail_next_queries(status, count);
    }

    /// How many access tokens were issued.
    pub fn token_requests(&self) -> usize {
        self.shared.state().token_requests
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // The command is sent on the call; nothing to wait for here.
        drop(self.handle.stop(false));
        self.dispatcher.abort();
    }
}

struct Shared {
    config: SandboxConfig,
    state: Mutex<State>,
    deliveries: mpsc::UnboundedSender<Delivery>,
}

#[derive(Default)]
struct State {
    /// Token → when it was issued.
    tokens: HashMap<String, Instant>,
    token_requests: usize,
    pushes: Vec<Push>,
    /// Phone → outcome and, if not the configured one, the delay.
    scenarios: HashMap<String, (Outcome, Option<Duration>)>,
    fail_status: u16,
    fail_count: usize,
    /// Failures injected into STK Push Queries only.
    query_fail_status: u16,
    query_fail_count: usize,
    /// Phones whose pushes are held in process until released.
    held: HashSet<String>,
    checkouts: HashMap<String, Checkout>,
}

/// What STK Push Query knows of a push.
struct Checkout {
    merchant_request_id: String,
    outcome: Outcome,
    accepted: Instant,
    /// The result is known once this much time has passed since `accepted`.
    delay: Duration,
    /// Held in process (see [`Sandbox::hold`]): no result yet, whatever the time.
    held: bool,
}

/// A callback to deliver.
struct Delivery {
    push: Push,
    outcome: Outcome,
    delay: Duration,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic in another handler: no update
        // spans two statements that could be separated by one.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_outcome(&self, phone: &str, outcome: Outcome, delay: Option<Duration>) {
        self.state()
            .scenarios
            .insert(phone.to_owned(), (outcome, delay));
    }

    fn fail_next(&self, status: u16, count: usize) {
        let mut state = self.state();
        state.fail_status = failure_status(status);
        state.fail_count = count;
    }

    fn fail_next_queries(&self, status: u16, count: usize) {
        let mut state = self.state();
        state.query_fail_status = failure_status(status);
        state.query_fail_count = count;
    }

    /// Ends the hold on `phone` (see [`Sandbox::release`]).
    fn release(&self, phone: &str) {
        let mut state = self.state();
        state.held.remove(phone);
        let State {
            pushes, checkouts, ..
        } = &mut *state;
        let mut released = Vec::new();
        for push in pushes.iter().filter(|p| p.phone == phone) {
            if let Some(checkout) = checkouts.get_mut(&push.checkout_request_id) {
                if checkout.held {
                    checkout.held = false;
                    let delay = checkout.delay;
                    // Known once the delay has passed from now.
                    checkout.delay = checkout.accepted.elapsed() + delay;
                    released.push((push.clone(), checkout.outcome, delay));
                }
            }
        }
        drop(state);
        for (push, outcome, delay) in released {
            tracing::info!(checkout_request_id = %push.checkout_request_id, "STK push released");
            self.schedule(push, outcome, delay);
        }
    }

    /// The bearer token is one issued, not expired and not revoked.
    fn authorize(&self, req: &HttpRequest) -> Result<(), DarajaError> {
        let token = credentials(req, "Bearer").ok_or(DarajaError::InvalidAccessToken)?;
        match self.state().tokens.get(token) {
            Some(issued) if issued.elapsed() < self.config.token_ttl => Ok(()),
            _ => Err(DarajaError::InvalidAccessToken),
        }
    }

    /// Consumes one injected failure, if any are left.
    fn injected_failure(&self) -> Result<(), DarajaError> {
        let mut state = self.state();
        if state.fail_count == 0 {
            return Ok(());
        }
        state.fail_count -= 1;
        Err(DarajaError::injected(state.fail_status))
    }

    /// Consumes one failure injected into STK Push Queries, if any are left.
    fn injected_query_failure(&self) -> Result<(), DarajaError> {
        let mut state = self.state();
        if state.query_fail_count == 0 {
            return Ok(());
        }
        state.query_fail_count -= 1;
        Err(DarajaError::injected(state.query_fail_status))
    }

    /// Delivers the callback of `push`, ending in `outcome`, after `delay` (none for
    /// the outcomes without one).
    fn schedule(&self, push: Push, outcome: Outcome, delay: Duration) {
        if !matches!(outcome, Outcome::NoCallback | Outcome::PaidNoCallback) {
            // Fails only once the sandbox is stopping; the callback is dropped then.
            let _ = self.deliveries.send(Delivery {
                push,
                outcome,
                delay,
            });
        }
    }

    /// Records the push and schedules its callback.
    fn accept(&self, request: PushRequest) -> Push {
        let mut state = self.state();
        let (outcome, delay) = match state.scenarios.get(&request.phone) {
            Some((outcome, delay)) => (*outcome, delay.unwrap_or(self.config.callback_delay)),
            None => (self.config.default_outcome, self.config.callback_delay),
        };
        let checkout_request_id = loop {
            let id = format!(
                "ws_CO_{}{}",
                nairobi_now().format("%d%m%Y%H%M%S"),
                random_from(b"0123456789", 6)
            );
            if !state.checkouts.contains_key(&id) {
                break id;
            }
        };
        let held = state.held.contains(&request.phone);
        let push = Push {
            merchant_request_id: numeric_id(),
            checkout_request_id,
            amount: request.amount,
            phone: request.phone,
            account_reference: request.account_reference,
            callback_url: request.callback_url,
            transaction_type: request.transaction_type,
        };
        state.checkouts.insert(
            push.checkout_request_id.clone(),
            Checkout {
                merchant_request_id: push.merchant_request_id.clone(),
                outcome,
                accepted: Instant::now(),
                delay,
                held,
            },
        );
        state.pushes.push(push.clone());
        drop(state);
        tracing::info!(
            checkout_request_id = %push.checkout_request_id,
            outcome = outcome.as_str(),
            delay_ms = delay.as_millis() as u64,
            held,
            "STK push accepted"
        );
        if !held {
            self.schedule(push.clone(), outcome, delay);
        }
        push
    }
}

/// An error answered the way Daraja answers it.
#[derive(Debug, thiserror::Error)]
enum DarajaError {
    #[error("Invalid Authentication passed")]
    InvalidAuthentication,
    #[error("Invalid grant type passed")]
    InvalidGrantType,
    #[error("Invalid Access Token")]
    InvalidAccessToken,
    /// A field (or the body, as "JSON") that Daraja would refuse.
    #[error("Bad Request - Invalid {0}")]
    Invalid(&'static str),
    #[error("The transaction is being processed")]
    Processing,
    /// An injected failure with this status.
    #[error("System is busy. Please try again in few minutes.")]
    Busy(u16),
    /// An injected 429: Daraja's rate limit, in its usual error JSON.
    #[error("Rate limit exceeded")]
    RateLimited,
    #[error("Request entity too large")]
    TooLarge,
    #[error("Resource not found")]
    NotFound,
}

impl DarajaError {
    /// An injected failure answering `status`.
    fn injected(status: u16) -> DarajaError {
        match status {
            429 => DarajaError::RateLimited,
            other => DarajaError::Busy(other),
        }
    }

    /// The HTTP status and Daraja's `errorCode`.
    fn parts(&self) -> (StatusCode, String) {
        let (status, code) = match self {
            DarajaError::InvalidAuthentication => (StatusCode::BAD_REQUEST, "400.008.01"),
            DarajaError::InvalidGrantType => (StatusCode::BAD_REQUEST, "400.008.02"),
            DarajaError::InvalidAccessToken => (StatusCode::UNAUTHORIZED, "404.001.03"),
            DarajaError::Invalid(_) => (StatusCode::BAD_REQUEST, "400.002.02"),
            DarajaError::Processing => (StatusCode::INTERNAL_SERVER_ERROR, "500.001.1001"),
            DarajaError::Busy(500) => (StatusCode::INTERNAL_SERVER_ERROR, "500.003.02"),
            DarajaError::Busy(status) => {
                let code = StatusCode::from_u16(*status);
                return (
                    code.unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    format!("{status}.003.01"),
                );
            }
            DarajaError::RateLimited => (StatusCode::TOO_MANY_REQUESTS, "429.001.01"),
            DarajaError::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "413.001.01"),
            DarajaError::NotFound => (StatusCode::NOT_FOUND, "404.001.01"),
        };
        (status, code.to_owned())
    }
}

impl ResponseError for DarajaError {
    fn status_code(&self) -> StatusCode {
        self.parts().0
    }

    fn error_response(&self) -> HttpResponse {
        let (status, code) = self.parts();
        HttpResponse::build(status).json(json!({
            "requestId": numeric_id(),
            "errorCode": code,
            "errorMessage": self.to_string(),
        }))
    }
}

/// `GET /oauth/v1/generate?grant_type=client_credentials` with Basic credentials.
async fn oauth(shared: Data<Shared>, req: HttpRequest) -> Result<HttpResponse, DarajaError> {
    let config = &shared.config;
    let presented = credentials(&req, "Basic")
        .and_then(|encoded| STANDARD.decode(encoded).ok())
        .and_then(|decoded| String::from_utf8(decoded).ok());
    let expected = format!("{}:{}", config.consumer_key, config.consumer_secret);
    if presented.as_deref() != Some(expected.as_str()) {
        return Err(DarajaError::InvalidAuthentication);
    }
    let grant = web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .ok()
        .and_then(|query| query.get("grant_type").cloned());
    if grant.as_deref() != Some("client_credentials") {
        return Err(DarajaError::InvalidGrantType);
    }
    let token: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    {
        let mut state = shared.state();
        let ttl = config.token_ttl;
        state.tokens.retain(|_, issued| issued.elapsed() < ttl);
        state.tokens.insert(token.clone(), Instant::now());
        state.token_requests += 1;
    }
    tracing::info!("access token issued");
    Ok(HttpResponse::Ok().json(json!({
        "access_token": token,
        "expires_in": config.token_ttl.as_secs().to_string(),
    })))
}

/// The fields both APIs authenticate with: `Password` is
/// `base64(BusinessShortCode + passkey + Timestamp)`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawPassword {
    business_short_code: Option<Value>,
    password: Option<Value>,
    timestamp: Option<Value>,
}

/// The STK Push body as sent: numbers may be JSON strings or numbers.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawPush {
    #[serde(flatten)]
    password: RawPassword,
    transaction_type: Option<Value>,
    amount: Option<Value>,
    party_a: Option<Value>,
    party_b: Option<Value>,
    phone_number: Option<Value>,
    #[serde(rename = "CallBackURL")]
    callback_url: Option<Value>,
    account_reference: Option<Value>,
    transaction_desc: Option<Value>,
}

/// An STK push Daraja would accept.
struct PushRequest {
    amount: u64,
    phone: String,
    account_reference: String,
    callback_url: String,
    transaction_type: String,
}

impl PushRequest {
    /// Checks the fields in the order of the body, answering the first bad one.
    fn parse(raw: &RawPush, config: &SandboxConfig) -> Result<PushRequest, DarajaError> {
        check_password(config, &raw.password)?;
        let transaction_type = text(raw.transaction_type.as_ref())
            .filter(|t| matches!(*t, "CustomerPayBillOnline" | "CustomerBuyGoodsOnline"))
            .ok_or(DarajaError::Invalid("TransactionType"))?;
        let amount = whole_amount(raw.amount.as_ref()).ok_or(DarajaError::Invalid("Amount"))?;
        msisdn(raw.party_a.as_ref()).ok_or(DarajaError::Invalid("PartyA"))?;
        // A paybill or till number; the shortcode only for paybills.
        digits(raw.party_b.as_ref()).ok_or(DarajaError::Invalid("PartyB"))?;
        let phone = msisdn(raw.phone_number.as_ref()).ok_or(DarajaError::Invalid("PhoneNumber"))?;
        let callback_url = text(raw.callback_url.as_ref())
            .filter(|url| is_http_url(url))
            .ok_or(DarajaError::Invalid("CallBackURL"))?;
        let account_reference = bounded_text(raw.account_reference.as_ref(), 12)
            .ok_or(DarajaError::Invalid("AccountReference"))?;
        bounded_text(raw.transaction_desc.as_ref(), 13)
            .ok_or(DarajaError::Invalid("TransactionDesc"))?;
        Ok(PushRequest {
            amount,
            phone,
            account_reference: account_reference.to_owned(),
            callback_url: callback_url.to_owned(),
            transaction_type: transaction_type.to_owned(),
        })
    }
}

/// `POST /mpesa/stkpush/v1/processrequest`.
async fn stk_push(
    shared: Data<Shared>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, DarajaError> {
    shared.authorize(&req)?;
    shared.injected_failure()?;
    let raw: RawPush = read_json(payload).await?;
    let push = shared.accept(PushRequest::parse(&raw, &shared.config)?);
    Ok(HttpResponse::Ok().json(json!({
        "MerchantRequestID": push.merchant_request_id,
        "CheckoutRequestID": push.checkout_request_id,
        "ResponseCode": "0",
        "ResponseDescription": "Success. Request accepted for processing",
        "CustomerMessage": "Success. Request accepted for processing",
    })))
}

#[derive(Deserialize)]
struct RawQuery {
    #[serde(flatten)]
    password: RawPassword,
    #[serde(rename = "CheckoutRequestID")]
    checkout_request_id: Option<Value>,
}

/// `POST /mpesa/stkpushquery/v1/query`.
async fn stk_query(
    shared: Data<Shared>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, DarajaError> {
    shared.authorize(&req)?;
    shared.injected_failure()?;
    shared.injected_query_failure()?;
    let raw: RawQuery = read_json(payload).await?;
    check_password(&shared.config, &raw.password)?;
    let state = shared.state();
    let (id, checkout) = text(raw.checkout_request_id.as_ref())
        .and_then(|id| Some((id, state.checkouts.get(id)?)))
        .ok_or(DarajaError::Invalid("CheckoutRequestID"))?;
    if checkout.held || checkout.accepted.elapsed() < checkout.delay {
        return Err(DarajaError::Processing);
    }
    let (code, description) = checkout.outcome.result();
    Ok(HttpResponse::Ok().json(json!({
        "ResponseCode": "0",
        // Daraja's own spelling.
        "ResponseDescription": "The service request has been accepted successsfully",
        "MerchantRequestID": checkout.merchant_request_id,
        "CheckoutRequestID": id,
        "ResultCode": code.to_string(),
        "ResultDesc": description,
    })))
}

#[derive(Deserialize)]
struct ScenarioBody {
    phone: String,
    outcome: String,
    delay_ms: Option<u64>,
}

/// `POST /sandbox/scenarios` {"phone","outcome","delay_ms"?}.
async fn set_scenario(
    shared: Data<Shared>,
    payload: web::Payload,
) -> Result<HttpResponse, DarajaError> {
    let body: ScenarioBody = read_json(payload).await?;
    let phone = msisdn(Some(&Value::String(body.phone))).ok_or(DarajaError::Invalid("phone"))?;
    let outcome = body
        .outcome
        .parse()
        .map_err(|_| DarajaError::Invalid("outcome"))?;
    shared.set_outcome(&phone, outcome, body.delay_ms.map(Duration::from_millis));
    Ok(HttpResponse::NoContent().finish())
}

/// `GET /sandbox/pushes`.
async fn list_pushes(shared: Data<Shared>) -> HttpResponse {
    HttpResponse::Ok().json(&shared.state().pushes)
}

/// `POST /sandbox/expire-tokens`.
async fn expire_tokens(shared: Data<Shared>) -> HttpResponse {
    shared.state().tokens.clear();
    HttpResponse::NoContent().finish()
}

#[derive(Deserialize)]
struct FailNextBody {
    status: u16,
    count: usize,
}

/// The `{"status","count"}` body of the failure knobs: an HTTP error status (400 to
/// 599) and how many calls get it.
async fn read_failures(payload: web::Payload) -> Result<(u16, usize), DarajaError> {
    let body: FailNextBody = read_json(payload).await?;
    if !(400..=599).contains(&body.status) {
        return Err(DarajaError::Invalid("status"));
    }
    Ok((body.status, body.count))
}

/// `POST /sandbox/fail-next` {"status","count"}.
async fn fail_next(
    shared: Data<Shared>,
    payload: web::Payload,
) -> Result<HttpResponse, DarajaError> {
    let (status, count) = read_failures(payload).await?;
    shared.fail_next(status, count);
    Ok(HttpResponse::NoContent().finish())
}

/// `POST /sandbox/fail-next-queries` {"status","count"}.
async fn fail_next_queries(
    shared: Data<Shared>,
    payload: web::Payload,
) -> Result<HttpResponse, DarajaError> {
    let (status, count) = read_failures(payload).await?;
    shared.fail_next_queries(status, count);
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Deserialize)]
struct PhoneBody {
    phone: String,
}

/// `POST /sandbox/hold` {"phone"}.
async fn hold(shared: Data<Shared>, payload: web::Payload) -> Result<HttpResponse, DarajaError> {
    let body: PhoneBody = read_json(payload).await?;
    let phone = msisdn(Some(&Value::String(body.phone))).ok_or(DarajaError::Invalid("phone"))?;
    shared.state().held.insert(phone);
    Ok(HttpResponse::NoContent().finish())
}

/// `POST /sandbox/release` {"phone"}.
async fn release(shared: Data<Shared>, payload: web::Payload) -> Result<HttpResponse, DarajaError> {
    let body: PhoneBody = read_json(payload).await?;
    let phone = msisdn(Some(&Value::String(body.phone))).ok_or(DarajaError::Invalid("phone"))?;
    shared.release(&phone);
    Ok(HttpResponse::NoContent().finish())
}

/// An injected failure's status: a 4xx or 5xx, else 500.
fn failure_status(status: u16) -> u16 {
    if (400..=599).contains(&status) {
        status
    } else {
        500
    }
}

/// One log line per request: method, route pattern (no query string), status.
async fn log_request(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let method = req.method().clone();
    let res = next.call(req).await?;
    let route = res
        .request()
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_owned());
    tracing::info!(%method, %route, status = res.status().as_u16(), "request");
    Ok(res)
}

/// Runs the callbacks, each in its own task; dropping the dispatcher drops them all.
async fn dispatch(client: reqwest::Client, mut queue: mpsc::UnboundedReceiver<Delivery>) {
    let mut pending = JoinSet::new();
    while let Some(delivery) = queue.recv().await {
        while pending.try_join_next().is_some() {}
        pending.spawn(deliver(client.clone(), delivery));
    }
}

/// Waits out the delay, then POSTs the callback (twice for a duplicate). The
/// receiver's answer is only logged: Daraja does not retry.
async fn deliver(client: reqwest::Client, delivery: Delivery) {
    tokio::time::sleep(delivery.delay).await;
    let body = callback_body(&delivery.push, delivery.outcome);
    let times = if delivery.outcome == Outcome::Duplicate {
        2
    } else {
        1
    };
    let id = &delivery.push.checkout_request_id;
    for time in 0..times {
        if time > 0 {
            tokio::time::sleep(DUPLICATE_GAP).await;
        }
        match client
            .post(&delivery.push.callback_url)
            .json(&body)
            .send()
            .await
        {
            Ok(answer) => {
                tracing::info!(checkout_request_id = %id, status = answer.status().as_u16(), "STK callback delivered");
            }
            // Without the URL: a callback URL may carry the receiver's secret.
            Err(error) => {
                let error = causes(&error.without_url());
                tracing::warn!(checkout_request_id = %id, %error, "STK callback not delivered");
            }
        }
    }
}

/// An error and its causes on one line ("error sending request: connection refused").
fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The STK callback Daraja posts for `push` ending in `outcome`.
fn callback_body(push: &Push, outcome: Outcome) -> Value {
    let (code, description) = outcome.result();
    let mut callback = json!({
        "MerchantRequestID": push.merchant_request_id,
        "CheckoutRequestID": push.checkout_request_id,
        "ResultCode": code,
        "ResultDesc": description,
    });
    if code == 0 {
        let date = nairobi_now().format("%Y%m%d%H%M%S").to_string();
        callback["CallbackMetadata"] = json!({ "Item": [
            { "Name": "Amount", "Value": push.amount },
            { "Name": "MpesaReceiptNumber", "Value": random_from(RECEIPT_ALPHABET, 10) },
            { "Name": "Balance" },
            { "Name": "TransactionDate", "Value": as_number(&date) },
            { "Name": "PhoneNumber", "Value": as_number(&push.phone) },
        ]});
    }
    json!({ "Body": { "stkCallback": callback } })
}

/// Shortcode, timestamp and password as configured, in that order.
fn check_password(config: &SandboxConfig, raw: &RawPassword) -> Result<(), DarajaError> {
    if digits(raw.business_short_code.as_ref()).as_deref() != Some(config.shortcode.as_str()) {
        return Err(DarajaError::Invalid("BusinessShortCode"));
    }
    let timestamp = text(raw.timestamp.as_ref())
        .filter(|t| {
            t.len() == 14
                && t.bytes().all(|b| b.is_ascii_digit())
                && chrono::NaiveDateTime::parse_from_str(t, "%Y%m%d%H%M%S").is_ok()
        })
        .ok_or(DarajaError::Invalid("Timestamp"))?;
    let expected = STANDARD.encode(format!("{}{}{timestamp}", config.shortcode, config.passkey));
    if text(raw.password.as_ref()) != Some(expected.as_str()) {
        return Err(DarajaError::Invalid("Password"));
    }
    Ok(())
}

/// The body, at most [`BODY_LIMIT`] bytes, as JSON.
async fn read_json<T: DeserializeOwned>(payload: web::Payload) -> Result<T, DarajaError> {
    let bytes = match payload.to_bytes_limited(BODY_LIMIT).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => return Err(DarajaError::Invalid("JSON")),
        Err(_) => return Err(DarajaError::TooLarge),
    };
    serde_json::from_slice(&bytes).map_err(|_| DarajaError::Invalid("JSON"))
}

/// The credentials of an `Authorization: <scheme> <credentials>` header.
fn credentials<'a>(req: &'a HttpRequest, scheme: &str) -> Option<&'a str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (given, credentials) = value.split_once(' ')?;
    given
        .eq_ignore_ascii_case(scheme)
        .then(|| credentials.trim())
        .filter(|c| !c.is_empty())
}

fn text(value: Option<&Value>) -> Option<&str> {
    value?.as_str()
}

/// Non-empty text of at most `max` characters.
fn bounded_text(value: Option<&Value>, max: usize) -> Option<&str> {
    text(value).filter(|t| !t.trim().is_empty() && t.chars().count() <= max)
}

/// A field Daraja takes as a JSON string or number, as its digits.
fn digits(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            Some(s.clone())
        }
        Value::Number(n) => n.as_u64().map(|n| n.to_string()),
        _ => None,
    }
}

/// A Kenyan mobile number in the form Daraja takes: 2547XXXXXXXX or 2541XXXXXXXX.
fn msisdn(value: Option<&Value>) -> Option<String> {
    digits(value).filter(|d| d.len() == 12 && (d.starts_with("2547") || d.starts_with("2541")))
}

/// A whole number of shillings, at least 1 (`10`, `"10"` and `10.0` alike).
fn whole_amount(value: Option<&Value>) -> Option<u64> {
    let number = match value? {
        Value::Number(n) => match n.as_u64() {
            Some(whole) => return Some(whole).filter(|w| *w >= 1),
            None => n.as_f64()?,
        },
        Value::String(s) => match s.trim().parse::<u64>() {
            Ok(whole) => return Some(whole).filter(|w| *w >= 1),
            Err(_) => s.trim().parse::<f64>().ok()?,
        },
        _ => return None,
    };
    // Beyond 2^53 a float no longer holds whole numbers exactly.
    (number >= 1.0 && number.fract() == 0.0 && number < 9_007_199_254_740_992.0)
        .then_some(number as u64)
}

fn is_http_url(url: &str) -> bool {
    reqwest::Url::parse(url)
        .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
}

/// Digits as a JSON number, the way the callback carries dates and phone numbers.
fn as_number(digits: &str) -> Value {
    digits.parse::<u64>().map_or(Value::Null, Value::from)
}

fn nairobi_now() -> chrono::NaiveDateTime {
    chrono::Utc::now().naive_utc() + chrono::TimeDelta::seconds(NAIROBI_OFFSET_SECS)
}

/// An id shaped like Daraja's `MerchantRequestID` and `requestId`: `29115-34620561-1`.
fn numeric_id() -> String {
    let mut rng = rand::thread_rng();
    format!(
        "{}-{}-{}",
        rng.gen_range(10_000..100_000),
        rng.gen_range(10_000_000..100_000_000),
        rng.gen_range(1..10)
    )
}

fn random_from(alphabet: &[u8], len: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| char::from(alphabet[rng.gen_range(0..alphabet.len())]))
        .collect()
}
