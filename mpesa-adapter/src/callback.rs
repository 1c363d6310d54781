//! The STK callback Daraja posts to the CallBackURL once the customer has answered
//! (or not) on their phone:
//!
//! ```json
//! {"Body":{"stkCallback":{"MerchantRequestID":"29115-34620561-1",
//!   "CheckoutRequestID":"ws_CO_191220191020363925","ResultCode":0,
//!   "ResultDesc":"The service request is processed successfully.",
//!   "CallbackMetadata":{"Item":[{"Name":"Amount","Value":1.00},
//!     {"Name":"MpesaReceiptNumber","Value":"NLJ7RT61SV"},{"Name":"Balance"},
//!     {"Name":"TransactionDate","Value":20191219102115},
//!     {"Name":"PhoneNumber","Value":254708374149}]}}}}
//! ```
//!
//! A failure carries no `CallbackMetadata`. Callbacks are not signed: what they say is
//! checked against the payment they name, and then against Daraja's own answer to an
//! STK Push Query ([`verdict`]), before it counts, a failure as much as a success.

use serde::Deserialize;
use serde_json::Value;

use crate::daraja::{DarajaError, StkStatus};

/// What Daraja expects back, whatever the callback said.
pub const ACK: &str = r#"{"ResultCode":0,"ResultDesc":"Accepted"}"#;

/// A parsed STK callback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StkCallback {
    pub merchant_request_id: String,
    pub checkout_request_id: String,
    pub result_code: i64,
    pub result_desc: String,
    /// Present when the payment went through (`ResultCode` 0).
    pub paid: Option<Paid>,
}

/// The metadata of a successful payment.
#[derive(Clone, PartialEq, Eq)]
pub struct Paid {
    /// Whole shillings.
    pub amount_kes: u64,
    pub receipt: String,
    /// `YYYYMMDDHHmmss`, Nairobi time.
    pub transaction_date: String,
    /// `2547XXXXXXXX`.
    pub phone: String,
}

// The phone number is personal data: never printed.
impl std::fmt::Debug for Paid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Paid")
            .field("amount_kes", &self.amount_kes)
            .field("receipt", &self.receipt)
            .field("transaction_date", &self.transaction_date)
            .field("phone", &"<redacted>")
            .finish()
    }
}

/// Why a callback body is not an STK callback.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CallbackError {
    #[error("the body is not JSON")]
    NotJson,
    #[error("the body has no Body.stkCallback with MerchantRequestID, CheckoutRequestID, ResultCode and ResultDesc")]
    NotStkCallback,
    #[error("a successful callback lacks {0} in its CallbackMetadata")]
    MissingItem(&'static str),
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "Body")]
    body: Body,
}

#[derive(Deserialize)]
struct Body {
    #[serde(rename = "stkCallback")]
    stk_callback: Raw,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Raw {
    #[serde(rename = "MerchantRequestID")]
    merchant_request_id: String,
    #[serde(rename = "CheckoutRequestID")]
    checkout_request_id: String,
    result_code: Value,
    result_desc: String,
    callback_metadata: Option<Metadata>,
}

#[derive(Deserialize)]
struct Metadata {
    #[serde(rename = "Item")]
    item: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Value")]
    value: Option<Value>,
}

/// A number Daraja may send as a JSON number (`1`, `1.00`, `254708374149`) or string.
fn digits(value: &Value) -> Option<String> {
    match value {
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                Some(u.to_string())
            } else {
                let f = n.as_f64()?;
                (f.fract() == 0.0 && (0.0..1e15).contains(&f)).then(|| format!("{f:.0}"))
            }
        }
        Value::String(s) => {
            let s = s.trim();
            let whole = s.strip_suffix(".00").unwrap_or(s);
            (!whole.is_empty() && whole.bytes().all(|b| b.is_ascii_digit()))
                .then(|| whole.to_owned())
        }
        _ => None,
    }
}

/// Parses a callback body.
pub fn parse(body: &[u8]) -> Result<StkCallback, CallbackError> {
    let value: Value = serde_json::from_slice(body).map_err(|_| CallbackError::NotJson)?;
    let envelope: Envelope =
        serde_json::from_value(value).map_err(|_| CallbackError::NotStkCallback)?;
    let raw = envelope.body.stk_callback;
    let result_code = match &raw.result_code {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .ok_or(CallbackError::NotStkCallback)?;
    let paid = match (result_code, raw.callback_metadata) {
        (0, Some(metadata)) => {
            let find = |name: &'static str| {
                metadata
                    .item
                    .iter()
                    .find(|i| i.name == name)
                    .and_then(|i| i.value.as_ref())
                    .ok_or(CallbackError::MissingItem(name))
            };
            let amount = digits(find("Amount")?)
                .and_then(|d| d.parse::<u64>().ok())
                .ok_or(CallbackError::MissingItem("Amount"))?;
            let receipt = find("MpesaReceiptNumber")?
                .as_str()
                .filter(|r| {
                    !r.is_empty() && r.len() <= 20 && r.bytes().all(|b| b.is_ascii_alphanumeric())
                })
                .ok_or(CallbackError::MissingItem("MpesaReceiptNumber"))?
                .to_owned();
            let transaction_date = digits(find("TransactionDate")?)
                .filter(|d| d.len() == 14)
                .ok_or(CallbackError::MissingItem("TransactionDate"))?;
            let phone = digits(find("PhoneNumber")?)
                .filter(|d| d.len() == 12)
                .ok_or(CallbackError::MissingItem("PhoneNumber"))?;
            Some(Paid {
                amount_kes: amount,
                receipt,
                transaction_date,
                phone,
            })
        }
        (0, None) => return Err(CallbackError::MissingItem("CallbackMetadata")),
        _ => None,
    };
    Ok(StkCallback {
        merchant_request_id: raw.merchant_request_id,
        checkout_request_id: raw.checkout_request_id,
        result_code,
        result_desc: raw.result_desc,
        paid,
    })
}

/// What an STK Push Query says of what a callback claims. Callbacks are unsigned and
/// their path token is the only secret, so neither a success nor a failure is
/// believed until Daraja, asked directly, says the same: a forged failure could
/// otherwise fail a payment the customer has made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Daraja says the same: paid (ResultCode 0) of a success callback, not paid (a
    /// non-zero ResultCode) of a failure callback. The code and description are the
    /// query's, which may name another failure than the callback: they are the ones to
    /// record, since the callback's `ResultDesc` is whatever its sender wrote.
    Agrees {
        result_code: i64,
        result_desc: String,
    },
    /// Daraja says it ended otherwise: the callback is not to be believed.
    Disagrees { result_code: i64 },
    /// Daraja could not say now (still processing, unreachable, refusing the
    /// question): the callback settles nothing and is kept as rejected (`unverified`)
    /// so it is not lost; the payment stays pending for the reconciling query, which
    /// settles it as Daraja says.
    Unknown(String),
}

/// The verdict of a query's answer on a callback whose `ResultCode` is `claimed`.
pub fn verdict(claimed: i64, answer: &Result<StkStatus, DarajaError>) -> Verdict {
    match answer {
        Ok(StkStatus::Done {
            result_code,
            result_desc,
        }) if (*result_code == 0) == (claimed == 0) => Verdict::Agrees {
            result_code: *result_code,
            result_desc: result_desc.clone(),
        },
        Ok(StkStatus::Done { result_code, .. }) => Verdict::Disagrees {
            result_code: *result_code,
        },
        Ok(StkStatus::Pending) => {
            Verdict::Unknown("Daraja says it is still being processed".into())
        }
        Err(error) => Verdict::Unknown(error.to_string()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn done(result_code: i64) -> Result<StkStatus, DarajaError> {
        Ok(StkStatus::Done {
            result_code,
            result_desc: format!("d{result_code}"),
        })
    }

    fn unsure() -> Vec<Result<StkStatus, DarajaError>> {
        vec![
            Ok(StkStatus::Pending),
            Err(DarajaError::Unavailable("503".into())),
            Err(DarajaError::Unavailable("429 Too Many Requests".into())),
            Err(DarajaError::Unknown("cut".into())),
            Err(DarajaError::Rejected {
                status: 400,
                code: "400.002.02".into(),
                message: "Bad Request".into(),
            }),
        ]
    }

    #[test]
    fn only_darajas_own_success_confirms_a_success_callback() {
        assert_eq!(
            verdict(0, &done(0)),
            Verdict::Agrees {
                result_code: 0,
                result_desc: "d0".into()
            }
        );
        assert_eq!(
            verdict(0, &done(1037)),
            Verdict::Disagrees { result_code: 1037 }
        );
        assert_eq!(
            verdict(0, &done(1032)),
            Verdict::Disagrees { result_code: 1032 }
        );
        for answer in unsure() {
            assert!(matches!(verdict(0, &answer), Verdict::Unknown(_)));
        }
    }

    #[test]
    fn only_darajas_own_failure_fails_on_a_failure_callback() {
        // Daraja's failure, whichever: its own code and description count.
        assert_eq!(
            verdict(1032, &done(1032)),
            Verdict::Agrees {
                result_code: 1032,
                result_desc: "d1032".into()
            }
        );
        assert_eq!(
            verdict(1032, &done(1037)),
            Verdict::Agrees {
                result_code: 1037,
                result_desc: "d1037".into()
            }
        );
        // Daraja says paid: the failure is not to be believed.
        assert_eq!(
            verdict(1032, &done(0)),
            Verdict::Disagrees { result_code: 0 }
        );
        assert_eq!(verdict(1, &done(0)), Verdict::Disagrees { result_code: 0 });
        for answer in unsure() {
            assert!(matches!(verdict(1032, &answer), Verdict::Unknown(_)));
        }
    }

    // Safaricom's documented examples.
    const SUCCESS: &str = r#"{"Body":{"stkCallback":{"MerchantRequestID":"29115-34620561-1","CheckoutRequestID":"ws_CO_191220191020363925","ResultCode":0,"ResultDesc":"The service request is processed successfully.","CallbackMetadata":{"Item":[{"Name":"Amount","Value":1.00},{"Name":"MpesaReceiptNumber","Value":"NLJ7RT61SV"},{"Name":"TransactionDate","Value":20191219102115},{"Name":"PhoneNumber","Value":254708374149}]}}}}"#;
    const CANCELLED: &str = r#"{"Body":{"stkCallback":{"MerchantRequestID":"29115-34620561-1","CheckoutRequestID":"ws_CO_191220191020363925","ResultCode":1032,"ResultDesc":"Request cancelled by user."}}}"#;

    #[test]
    fn a_successful_callback_gives_its_metadata() {
        let c = parse(SUCCESS.as_bytes()).unwrap();
        assert_eq!(c.checkout_request_id, "ws_CO_191220191020363925");
        assert_eq!(c.merchant_request_id, "29115-34620561-1");
        assert_eq!(c.result_code, 0);
        let paid = c.paid.unwrap();
        assert_eq!(paid.amount_kes, 1);
        assert_eq!(paid.receipt, "NLJ7RT61SV");
        assert_eq!(paid.transaction_date, "20191219102115");
        assert_eq!(paid.phone, "254708374149");
        assert!(!format!("{paid:?}").contains("254708374149"));
    }

    #[test]
    fn a_failed_callback_has_no_metadata() {
        let c = parse(CANCELLED.as_bytes()).unwrap();
        assert_eq!(c.result_code, 1032);
        assert_eq!(c.result_desc, "Request cancelled by user.");
        assert!(c.paid.is_none());
    }

    #[test]
    fn what_is_not_an_stk_callback_is_refused() {
        assert_eq!(parse(b"not json"), Err(CallbackError::NotJson));
        assert_eq!(parse(b"{}"), Err(CallbackError::NotStkCallback));
        assert_eq!(
            parse(br#"{"Body":{"stkCallback":{"MerchantRequestID":"a","CheckoutRequestID":"b","ResultCode":"x","ResultDesc":"c"}}}"#),
            Err(CallbackError::NotStkCallback)
        );
        assert_eq!(
            parse(br#"{"Body":{"stkCallback":{"MerchantRequestID":"a","CheckoutRequestID":"b","ResultCode":0,"ResultDesc":"c"}}}"#),
            Err(CallbackError::MissingItem("CallbackMetadata"))
        );
        let no_receipt =
            SUCCESS.replace(r#"{"Name":"MpesaReceiptNumber","Value":"NLJ7RT61SV"},"#, "");
        assert_eq!(
            parse(no_receipt.as_bytes()),
            Err(CallbackError::MissingItem("MpesaReceiptNumber"))
        );
    }
}
