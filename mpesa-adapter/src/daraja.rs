//! The Daraja client: OAuth (`GET /oauth/v1/generate?grant_type=client_credentials`
//! with Basic auth, the token cached until shortly before its `expires_in`, refreshed
//! once on a 401), STK Push (`POST /mpesa/stkpush/v1/processrequest`) and STK Push
//! Query (`POST /mpesa/stkpushquery/v1/query`).
//!
//! Each call is bounded by a timeout. A connection that could not be made, a 503, a 5xx
//! saying Daraja is busy, or a 429 (too many requests) is retried with a growing pause,
//! and reported as [`DarajaError::Unavailable`] once the attempts are spent: Daraja
//! turned the request away before doing anything with it, and may take it later. So
//! is a 408 (request timeout) to an STK Push Query or the OAuth call, and a 401 to a
//! query again after a fresh token. Any other 4xx is Daraja refusing the request,
//! returned with its error code and message; a 401 to an STK Push again after a fresh
//! token is one too (the push was not processed, so the payment can safely fail). An
//! STK Push whose request may have been processed (it timed out, the connection broke
//! after sending, a 408, or another 5xx came back) is never sent again: the customer
//! could be asked to pay twice. It is reported as [`DarajaError::Unknown`].

use std::fmt;
use std::time::{Duration, Instant};

use base64::Engine;
use chrono::{DateTime, FixedOffset, Utc};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Mutex;

/// Safaricom's public sandbox.
pub const SANDBOX_URL: &str = "https://sandbox.safaricom.co.ke";

/// How long before a token's stated expiry it is no longer used.
const TOKEN_MARGIN: Duration = Duration::from_secs(60);

/// The customer's kind of till.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransactionType {
    /// A paybill number (`CustomerPayBillOnline`).
    PayBill,
    /// A till number (`CustomerBuyGoodsOnline`).
    BuyGoods,
}

impl TransactionType {
    fn as_str(self) -> &'static str {
        match self {
            TransactionType::PayBill => "CustomerPayBillOnline",
            TransactionType::BuyGoods => "CustomerBuyGoodsOnline",
        }
    }
}

/// Where Daraja is and who the platform is there.
#[derive(Clone)]
pub struct DarajaConfig {
    /// Without a trailing slash, e.g. [`SANDBOX_URL`].
    pub base_url: String,
    pub consumer_key: String,
    /// Never logged.
    pub consumer_secret: String,
    pub shortcode: String,
    /// The till number paid into (PartyB) with `BuyGoods`; the shortcode if `None`.
    pub till_number: Option<String>,
    /// Never logged.
    pub passkey: String,
    /// The full public URL Daraja posts STK callbacks to.
    pub callback_url: String,
    pub transaction_type: TransactionType,
    /// Bound on each HTTP call.
    pub timeout: Duration,
    /// Attempts of a call that failed for Daraja's reasons (5xx, no connection).
    pub attempts: u32,
    /// The first pause between attempts; doubled each time.
    pub backoff: Duration,
}

impl fmt::Debug for DarajaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DarajaConfig")
            .field("base_url", &self.base_url)
            .field("consumer_key", &"<redacted>")
            .field("consumer_secret", &"<redacted>")
            .field("shortcode", &self.shortcode)
            .field("passkey", &"<redacted>")
            .field("transaction_type", &self.transaction_type)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The STK Push timestamp: `YYYYMMDDHHmmss` in Africa/Nairobi time (UTC+3 all year).
pub fn timestamp(at: DateTime<Utc>) -> String {
    let nairobi = FixedOffset::east_opt(3 * 3600).unwrap_or_else(|| Utc.fix());
    at.with_timezone(&nairobi)
        .format("%Y%m%d%H%M%S")
        .to_string()
}

use chrono::Offset as _;

/// The STK Push password: base64(shortcode + passkey + timestamp).
pub fn password(shortcode: &str, passkey: &str, timestamp: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{shortcode}{passkey}{timestamp}"))
}

/// Why a Daraja call did not succeed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DarajaError {
    /// Daraja refused the request (a 4xx): its error code and message.
    #[error("Daraja refused the request ({status}): {code} {message}")]
    Rejected {
        status: u16,
        code: String,
        message: String,
    },
    /// Daraja could not be reached or kept failing (5xx) after the retries.
    #[error("Daraja is unavailable: {0}")]
    Unavailable(String),
    /// The request may have reached Daraja but no answer came: not to be repeated.
    #[error("no answer from Daraja to a request that may have reached it: {0}")]
    Unknown(String),
}

/// What the platform asks the customer to pay.
#[derive(Clone)]
pub struct StkPush {
    /// Whole shillings.
    pub amount_kes: u64,
    /// `2547XXXXXXXX` or `2541XXXXXXXX`. Never logged.
    pub phone: String,
    /// Shown to the customer; at most 12 characters.
    pub account_reference: String,
    /// At most 13 characters.
    pub description: String,
}

/// Daraja accepted an STK Push: the customer is being asked on their phone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StkAccepted {
    pub merchant_request_id: String,
    pub checkout_request_id: String,
}

/// What an STK Push Query says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StkStatus {
    /// The customer has not answered yet.
    Pending,
    /// Settled: `ResultCode` (0 is paid) and `ResultDesc`.
    Done {
        result_code: i64,
        result_desc: String,
    },
}

#[derive(Deserialize)]
struct TokenReply {
    access_token: String,
    /// A string in Daraja's reply ("3599"); a number is taken too.
    expires_in: Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ErrorReply {
    #[serde(default)]
    error_code: String,
    #[serde(default)]
    error_message: String,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct PushRequest<'a> {
    business_short_code: &'a str,
    password: String,
    timestamp: String,
    transaction_type: &'static str,
    amount: u64,
    party_a: &'a str,
    party_b: &'a str,
    phone_number: &'a str,
    #[serde(rename = "CallBackURL")]
    callback_url: &'a str,
    account_reference: &'a str,
    transaction_desc: &'a str,
}

#[derive(Deserialize)]
struct PushReply {
    #[serde(rename = "MerchantRequestID")]
    merchant_request_id: String,
    #[serde(rename = "CheckoutRequestID")]
    checkout_request_id: String,
    #[serde(rename = "ResponseCode")]
    response_code: Value,
    #[serde(rename = "ResponseDescription", default)]
    response_description: String,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct QueryRequest<'a> {
    business_short_code: &'a str,
    password: String,
    timestamp: String,
    #[serde(rename = "CheckoutRequestID")]
    checkout_request_id: &'a str,
}

#[derive(Deserialize)]
struct QueryReply {
    #[serde(rename = "ResultCode")]
    result_code: Option<Value>,
    #[serde(rename = "ResultDesc", default)]
    result_desc: String,
}

/// The error code Daraja gives a query whose transaction is still being processed.
const STILL_PROCESSING: &str = "500.001.1001";

/// Error codes with which Daraja turns a request away before processing it ("System is
/// busy"); with a 503, the only 5xx after which an STK Push is sent again.
const BUSY: &[&str] = &["500.003.02", "500.003.03"];

/// A 4xx that says "not now" rather than "never": too many requests, or a request
/// timeout. Answered to the OAuth call it is retried like a 5xx, and never taken for
/// wrong credentials: a payment would otherwise be failed for a moment's rate limit.
fn not_now(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::REQUEST_TIMEOUT
}

/// A Daraja client. Cheap to share (`Arc`); the token is cached inside.
pub struct Daraja {
    config: DarajaConfig,
    http: reqwest::Client,
    token: Mutex<Option<(String, Instant)>>,
}

/// One HTTP exchange's outcome, before retries are decided.
enum Answer {
    Reply(StatusCode, Vec<u8>),
    /// The request was certainly not sent (no connection).
    NotSent(String),
    /// It may have been sent.
    Lost(String),
}

impl Daraja {
    pub fn new(config: DarajaConfig) -> anyhow::Result<Daraja> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            .build()?;
        Ok(Daraja {
            config,
            http,
            token: Mutex::new(None),
        })
    }

    pub fn config(&self) -> &DarajaConfig {
        &self.config
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.config.base_url.trim_end_matches('/'))
    }

    async fn exchange(&self, request: reqwest::RequestBuilder) -> Answer {
        match request.send().await {
            Ok(response) => {
                let status = response.status();
                match response.bytes().await {
                    Ok(body) => Answer::Reply(status, body.to_vec()),
                    Err(e) => Answer::Lost(format!("reading the answer: {e}")),
                }
            }
            Err(e) if e.is_connect() => Answer::NotSent(one_line(&e)),
            Err(e) => Answer::Lost(one_line(&e)),
        }
    }

    fn rejected(status: StatusCode, body: &[u8]) -> DarajaError {
        let reply: Option<ErrorReply> = serde_json::from_slice(body).ok();
        let (code, message) = reply
            .map(|r| (r.error_code, r.error_message))
            .unwrap_or_default();
        DarajaError::Rejected {
            status: status.as_u16(),
            code,
            message,
        }
    }

    /// A fresh OAuth token (`force`: even if one is cached).
    async fn token(&self, force: bool) -> Result<String, DarajaError> {
        let mut cached = self.token.lock().await;
        if !force {
            if let Some((token, until)) = cached.as_ref() {
                if Instant::now() < *until {
                    return Ok(token.clone());
                }
            }
        }
        let mut pause = self.config.backoff;
        for attempt in 1..=self.config.attempts.max(1) {
            let request = self
                .http
                .get(self.url("/oauth/v1/generate"))
                .query(&[("grant_type", "client_credentials")])
                .basic_auth(
                    &self.config.consumer_key,
                    Some(&self.config.consumer_secret),
                );
            let failure = match self.exchange(request).await {
                Answer::Reply(status, body) if status.is_success() => {
                    let reply: TokenReply = serde_json::from_slice(&body).map_err(|_| {
                        DarajaError::Unavailable("the OAuth answer is not a token".into())
                    })?;
                    let seconds = match &reply.expires_in {
                        Value::String(s) => s.trim().parse::<u64>().ok(),
                        Value::Number(n) => n.as_u64(),
                        _ => None,
                    }
                    .unwrap_or(0);
                    let life = Duration::from_secs(seconds).saturating_sub(TOKEN_MARGIN);
                    *cached = Some((reply.access_token.clone(), Instant::now() + life));
                    return Ok(reply.access_token);
                }
                Answer::Reply(status, body) if status.is_client_error() && !not_now(status) => {
                    return Err(Self::rejected(status, &body));
                }
                Answer::Reply(status, _) => format!("OAuth answered {status}"),
                Answer::NotSent(e) | Answer::Lost(e) => e,
            };
            if attempt >= self.config.attempts.max(1) {
                return Err(DarajaError::Unavailable(failure));
            }
            tracing::warn!(attempt, error = %failure, "Daraja OAuth failed; retrying");
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
        Err(DarajaError::Unavailable("no attempt made".into()))
    }

    /// Posts `body` to `path` with the bearer token, retrying what may be retried:
    /// a 401 at once with a new token; a 5xx, a refused connection or a 429 with a
    /// growing pause; a 401 again likewise (with yet another token) only if
    /// `repeatable`, otherwise it is answered as Daraja's refusal; a request that may
    /// have been sent (a 408 included) only if `repeatable`.
    async fn post<T: Serialize>(
        &self,
        path: &str,
        body: &T,
        repeatable: bool,
    ) -> Result<(StatusCode, Vec<u8>), DarajaError> {
        let mut pause = self.config.backoff;
        let mut refreshed = false;
        let mut renew = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let token = self.token(std::mem::take(&mut renew)).await?;
            let request = self.http.post(self.url(path)).bearer_auth(token).json(body);
            let failure = match self.exchange(request).await {
                Answer::Reply(StatusCode::UNAUTHORIZED, _) if !refreshed => {
                    refreshed = true;
                    self.token(true).await?;
                    attempt -= 1;
                    continue;
                }
                // A token Daraja has just issued and refuses all the same: its gateway
                // not yet knowing the token is a known Daraja hiccup, and nothing was
                // processed. A query is tried again after a pause, with yet another
                // token. A push is refused, as any other 4xx to it: the payment fails
                // rather than waiting on credentials that may be wrong, and nobody was
                // asked to pay.
                Answer::Reply(status @ StatusCode::UNAUTHORIZED, body) => {
                    if !repeatable {
                        return Ok((status, body));
                    }
                    renew = true;
                    error_text(status, &body)
                }
                // Turned away before anything was done with it.
                Answer::Reply(status @ StatusCode::TOO_MANY_REQUESTS, body) => {
                    error_text(status, &body)
                }
                Answer::Reply(status @ StatusCode::REQUEST_TIMEOUT, body) => {
                    // Whether the request got through is not certain: a push is never
                    // sent again.
                    if !repeatable {
                        return Err(DarajaError::Unknown(error_text(status, &body)));
                    }
                    error_text(status, &body)
                }
                Answer::Reply(status, body) if !status.is_server_error() => {
                    return Ok((status, body));
                }
                Answer::Reply(status, body) => {
                    let reply: Option<ErrorReply> = serde_json::from_slice(&body).ok();
                    if reply
                        .as_ref()
                        .is_some_and(|r| r.error_code == STILL_PROCESSING)
                    {
                        return Ok((status, body));
                    }
                    let refused_unprocessed = status == StatusCode::SERVICE_UNAVAILABLE
                        || reply
                            .as_ref()
                            .is_some_and(|r| BUSY.contains(&r.error_code.as_str()));
                    let failure = error_text(status, &body);
                    // Any other 5xx to a push may come after Daraja processed it.
                    if !repeatable && !refused_unprocessed {
                        return Err(DarajaError::Unknown(failure));
                    }
                    failure
                }
                Answer::NotSent(e) => e,
                Answer::Lost(e) if repeatable => e,
                Answer::Lost(e) => return Err(DarajaError::Unknown(e)),
            };
            if attempt >= self.config.attempts.max(1) {
                return Err(DarajaError::Unavailable(failure));
            }
            tracing::warn!(attempt, path, error = %failure, "Daraja call failed; retrying");
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
    }

    /// Asks the customer to pay (STK Push).
    pub async fn stk_push(&self, push: &StkPush) -> Result<StkAccepted, DarajaError> {
        let c = &self.config;
        let at = timestamp(Utc::now());
        let request = PushRequest {
            business_short_code: &c.shortcode,
            password: password(&c.shortcode, &c.passkey, &at),
            timestamp: at,
            transaction_type: c.transaction_type.as_str(),
            amount: push.amount_kes,
            party_a: &push.phone,
            party_b: match c.transaction_type {
                TransactionType::BuyGoods => c.till_number.as_deref().unwrap_or(&c.shortcode),
                TransactionType::PayBill => &c.shortcode,
            },
            phone_number: &push.phone,
            callback_url: &c.callback_url,
            account_reference: &push.account_reference,
            transaction_desc: &push.description,
        };
        let (status, body) = self
            .post("/mpesa/stkpush/v1/processrequest", &request, false)
            .await?;
        if !status.is_success() {
            return Err(Self::rejected(status, &body));
        }
        let reply: PushReply = serde_json::from_slice(&body)
            .map_err(|_| DarajaError::Unknown("the STK Push answer is not Daraja's".into()))?;
        if code_text(&reply.response_code) != "0" {
            return Err(DarajaError::Rejected {
                status: status.as_u16(),
                code: code_text(&reply.response_code),
                message: reply.response_description,
            });
        }
        Ok(StkAccepted {
            merchant_request_id: reply.merchant_request_id,
            checkout_request_id: reply.checkout_request_id,
        })
    }

    /// Asks Daraja how an STK Push ended (STK Push Query).
    pub async fn stk_query(&self, checkout_request_id: &str) -> Result<StkStatus, DarajaError> {
        let c = &self.config;
        let at = timestamp(Utc::now());
        let request = QueryRequest {
            business_short_code: &c.shortcode,
            password: password(&c.shortcode, &c.passkey, &at),
            timestamp: at,
            checkout_request_id,
        };
        let (status, body) = self
            .post("/mpesa/stkpushquery/v1/query", &request, true)
            .await?;
        if status.is_server_error() {
            // Only the "still being processed" answer comes back as a 5xx.
            return Ok(StkStatus::Pending);
        }
        if !status.is_success() {
            return Err(Self::rejected(status, &body));
        }
        let reply: QueryReply = serde_json::from_slice(&body)
            .map_err(|_| DarajaError::Unavailable("the STK query answer is not Daraja's".into()))?;
        // ResultCode is a string here ("0", "1032").
        let result_code = reply
            .result_code
            .as_ref()
            .and_then(|v| code_text(v).parse::<i64>().ok())
            .ok_or_else(|| {
                DarajaError::Unavailable("the STK query answer has no ResultCode".into())
            })?;
        Ok(StkStatus::Done {
            result_code,
            result_desc: reply.result_desc,
        })
    }
}

/// A failed answer on one line: its status and Daraja's error message, if any.
fn error_text(status: StatusCode, body: &[u8]) -> String {
    let reply: Option<ErrorReply> = serde_json::from_slice(body).ok();
    format!(
        "{status}: {}",
        reply.map(|r| r.error_message).unwrap_or_default()
    )
}

fn code_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.trim().to_owned(),
        other => other.to_string(),
    }
}

fn one_line(error: &reqwest::Error) -> String {
    // reqwest's errors name the URL, which holds no secret here; keep one line.
    error.to_string().replace('\n', " ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// Safaricom's published STK Push example (Daraja documentation).
    #[test]
    fn the_password_is_safaricoms_published_example() {
        assert_eq!(
            password(
                "174379",
                "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919",
                "20160216165627"
            ),
            "MTc0Mzc5YmZiMjc5ZjlhYTliZGJjZjE1OGU5N2RkNzFhNDY3Y2QyZTBjODkzMDU5YjEwZjc4ZTZiNzJhZGExZWQyYzkxOTIwMTYwMjE2MTY1NjI3"
        );
    }

    #[test]
    fn the_timestamp_is_nairobi_time() {
        let at = Utc.with_ymd_and_hms(2016, 2, 16, 13, 56, 27).unwrap();
        assert_eq!(timestamp(at), "20160216165627");
        // Past midnight in Nairobi while still the day before in UTC.
        let late = Utc.with_ymd_and_hms(2025, 12, 31, 22, 30, 0).unwrap();
        assert_eq!(timestamp(late), "20260101013000");
    }

    #[test]
    fn secrets_are_not_printed() {
        let config = DarajaConfig {
            base_url: SANDBOX_URL.into(),
            consumer_key: "key-123".into(),
            consumer_secret: "secret-456".into(),
            shortcode: "174379".into(),
            till_number: None,
            passkey: "passkey-789".into(),
            callback_url: "https://example.org/cb".into(),
            transaction_type: TransactionType::PayBill,
            timeout: Duration::from_secs(10),
            attempts: 3,
            backoff: Duration::from_millis(200),
        };
        let printed = format!("{config:?}");
        for secret in ["key-123", "secret-456", "passkey-789"] {
            assert!(!printed.contains(secret));
        }
    }
}
