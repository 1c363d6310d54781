//! M-Pesa payments: asked for by a patient or doctor, pushed to the phone by the M-Pesa
//! worker, settled by Daraja's callback (or a reconciling query), and listed.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::web::{Data, Path, Query};
use actix_web::{HttpRequest, HttpResponse};
use commands::RequestPayment;
use domain::actor::Actor;
use domain::ids::{AccessRequestId, DoctorId, PatientId, PaymentId};
use domain::payment::{PaymentCommand, Purpose, Receipt, RejectedCallbackCommand, SettledBy};
use domain::value::Msisdn;
use mpesa_adapter::callback::Verdict;
use mpesa_adapter::daraja::Daraja;
use projections::queries::{self, PaymentParty, PaymentRow};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::config::Config;
use crate::extract::{command_meta, Body, Caller};
use crate::problem::{checked, Problem, Validation};
use crate::ratelimit::Limit;
use crate::routes::{own_patient, path_id, PageQuery};
use crate::server::AppState;

/// A payment asked for. Its prompt goes to the patient's own registered phone: a
/// doctor asks a fee of a patient under an approved access request (still in force),
/// for themself; a patient pays a doctor they granted such access, or their own
/// account.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"purpose": "consultation_fee", "amount_kes": 500}))]
pub struct NewPayment {
    #[schema(value_type = PaymentPurpose)]
    pub purpose: String,
    /// Whole shillings, 1 to 250000 (`domain::payment::MAX_AMOUNT_KES`).
    #[schema(minimum = 1, maximum = 250000, example = 500)]
    pub amount_kes: u64,
    /// A patient only, and optional: their own registered number (2547XXXXXXXX,
    /// 2541XXXXXXXX, 07…, 01… or +254…, spaces or hyphens between the digits allowed);
    /// the prompt goes there whatever is sent, and any other number is refused (422
    /// `phone_not_registered`). A doctor sends none (422 naming `phone`): a fee's prompt
    /// goes to its patient's registered phone, which the doctor never learns.
    #[schema(
        pattern = r"^\+?(254|0)[ -]?[17]([ -]?[0-9]){8}$",
        example = "254712345678"
    )]
    pub phone: Option<String>,
    /// A patient: the doctor paid (one they granted access still in force). A doctor:
    /// themself, if given (another doctor's id is 403 `fee_for_another_doctor`).
    #[schema(value_type = Option<Uuid>)]
    pub doctor_id: Option<String>,
    /// The access request the payment is under: a doctor's fee must name it (approved
    /// and not expired, else 403 `no_grant`); the fee is asked of its patient.
    #[schema(value_type = Option<Uuid>)]
    pub access_request_id: Option<String>,
}

/// What a payment is for, as the document names it (the domain's closed list,
/// `domain::payment::Purpose`: a test keeps the two the same).
#[derive(Debug, ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // only described, never built: requests carry the names as text
pub enum PaymentPurpose {
    ConsultationFee,
    AccessFee,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PaymentCreated {
    pub payment_id: Uuid,
    /// `pending`.
    pub status: String,
}

/// A payment as its parties see it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PaymentView {
    pub payment_id: Uuid,
    #[schema(value_type = PaymentPurpose)]
    pub purpose: String,
    pub amount_kes: i64,
    /// `pending`, `confirmed`, `failed`, `cancelled` or `timed_out`.
    pub status: String,
    pub checkout_request_id: Option<String>,
    pub mpesa_receipt: Option<String>,
    pub result_code: Option<i64>,
    pub result_desc: Option<String>,
    pub patient_id: Option<Uuid>,
    pub doctor_id: Option<Uuid>,
    pub access_request_id: Option<Uuid>,
    pub requested_at: String,
    pub settled_at: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PaymentPage {
    pub items: Vec<PaymentView>,
    pub next_cursor: Option<i64>,
}

fn view(row: PaymentRow) -> PaymentView {
    let uuid = |s: Option<String>| s.and_then(|s| Uuid::parse_str(&s).ok());
    PaymentView {
        payment_id: Uuid::parse_str(&row.payment_id).unwrap_or_default(),
        purpose: row.purpose,
        amount_kes: row.amount_kes,
        status: row.status,
        checkout_request_id: row.checkout_request_id,
        mpesa_receipt: row.mpesa_receipt,
        result_code: row.result_code,
        result_desc: row.result_desc,
        patient_id: uuid(row.patient_id),
        doctor_id: uuid(row.doctor_id),
        access_request_id: uuid(row.access_request_id),
        requested_at: row.requested_at,
        settled_at: row.settled_at,
    }
}

fn unavailable() -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "payments_unavailable",
        "M-Pesa payments are not configured on this server",
    )
}

/// Whose prompts are counted, and how many each may have within a window.
const PER_DOCTOR: &str = "prompts_per_doctor";
const PER_PATIENT: &str = "prompts_per_patient";

#[utoipa::path(post, path = "/v1/payments", tag = "payments",
    request_body = NewPayment,
    params(("Idempotency-Key" = String, Header, description = "Required (400 `idempotency_key_required` without it): retries with the same key return the same payment and never push twice")),
    security(("bearer" = [])),
    responses((status = 202, description = "Asked for: the STK Push goes to the patient's registered phone (patients, and verified doctors under an access request in force). Refused: 403 `doctor_not_verified`, `no_grant`, `doctor_not_granted`, `fee_for_another_doctor`; 422 `phone_not_registered` (a patient's number that is not theirs), 422 naming `phone` (a doctor sending any number); 429 past `AFYA_PROMPTS_PER_DOCTOR` or `AFYA_PROMPTS_PER_PATIENT`", body = PaymentCreated)))]
#[tracing::instrument(skip_all)]
pub async fn create(
    req: HttpRequest,
    state: Data<AppState>,
    caller: Caller,
    body: Body,
) -> Result<HttpResponse, Problem> {
    let payer = caller.actor();
    if !matches!(payer, Actor::Patient(_) | Actor::Doctor(_)) {
        return Err(Problem::forbidden(
            "role_forbidden",
            "only patients and doctors may ask for a payment",
        ));
    }
    let input: NewPayment = body.json()?;
    let mut v = Validation::default();
    let purpose = Purpose::parse(&input.purpose);
    if purpose.is_none() {
        v.fail("purpose", "must be consultation_fee or access_fee");
    }
    if !(1..=domain::payment::MAX_AMOUNT_KES).contains(&input.amount_kes) {
        v.fail(
            "amount_kes",
            "must be a whole number of shillings, 1 to 250000",
        );
    }
    let phone = match payer {
        // Refused below, once the doctor is known to be allowed to ask at all.
        Actor::Doctor(_) => None,
        _ => input.phone.as_deref().map(|p| v.check(Msisdn::parse(p))),
    };
    let doctor_id = match input.doctor_id.as_deref().map(DoctorId::parse) {
        None => None,
        Some(Ok(d)) => Some(d),
        Some(Err(_)) => {
            v.fail("doctor_id", "must be a UUID");
            None
        }
    };
    let access_request_id = match input
        .access_request_id
        .as_deref()
        .map(AccessRequestId::parse)
    {
        None => None,
        Some(Ok(a)) => Some(a),
        Some(Err(_)) => {
            v.fail("access_request_id", "must be a UUID");
            None
        }
    };
    v.finish()?;
    // A retry without the key would be a second payment, and a second push.
    if req.headers().get("idempotency-key").is_none() {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "idempotency_key_required",
            "send an Idempotency-Key header: a retry with the same key is the same payment",
        )
        .at("Idempotency-Key"));
    }
    let meta = command_meta(&req, Some(payer), body.bytes())?;
    // A retry is answered with the payment it made, counted against no limit again.
    if let Some(done) = state.commands.earlier_payment(&meta).await? {
        return Ok(created(done.id));
    }
    let requests = match (access_request_id, doctor_id, payer) {
        (Some(request_id), _, _) => {
            let request = state
                .commands
                .access_request(request_id)
                .await
                .map_err(|e| Problem::internal(&e))?;
            let involves_payer = request.as_ref().is_some_and(|r| match payer {
                Actor::Patient(p) => r.patient_id() == Some(p),
                Actor::Doctor(d) => r.doctor_id() == Some(d),
                _ => false,
            });
            if !involves_payer {
                return Err(Problem::field(
                    "access_request_id",
                    "no such access request of yours",
                ));
            }
            vec![request_id]
        }
        // A patient naming only a doctor: the grants between them, checked again
        // against the event store when the payment is planned.
        (None, Some(doctor_id), Actor::Patient(patient_id)) => {
            let pool = state.store.any_pool();
            if queries::doctor(pool, &doctor_id.to_string())
                .await?
                .is_none()
            {
                return Err(Problem::field("doctor_id", "no such doctor"));
            }
            queries::requests_between(pool, &doctor_id.to_string(), &patient_id.to_string())
                .await?
                .into_iter()
                .filter(|r| r.status == "approved")
                .filter_map(|r| AccessRequestId::parse(&r.request_id).ok())
                .collect()
        }
        _ => Vec::new(),
    };
    let plan = state
        .commands
        .plan_payment(payer, doctor_id, &requests)
        .await?;
    // A doctor who could send a number would learn, from 202 or 422, whether it is
    // the patient's: any number is refused.
    if matches!(payer, Actor::Doctor(_)) && input.phone.is_some() {
        return Err(Problem::field(
            "phone",
            "leave phone out: a fee's prompt goes to the patient's registered phone",
        ));
    }
    if let Some(Some(typed)) = phone {
        if typed != plan.phone {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "phone_not_registered",
                "the prompt goes only to the patient's registered phone number: leave phone out",
            )
            .at("phone"));
        }
    }
    let Some(settings) = state.config.mpesa.as_ref() else {
        return Err(unavailable());
    };
    // Counted only now that the prompt will really be asked for; given back if the
    // command fails after all.
    let patient = plan.parties.patient_id.to_string();
    let doctor = match payer {
        Actor::Doctor(d) => Some(d.to_string()),
        _ => None,
    };
    let mut limits = vec![Limit {
        bucket: PER_PATIENT,
        key: &patient,
        rule: settings.prompts_per_patient,
    }];
    if let Some(doctor) = doctor.as_deref() {
        limits.push(Limit {
            bucket: PER_DOCTOR,
            key: doctor,
            rule: settings.prompts_per_doctor,
        });
    }
    // Kept counted from here even if the request is cancelled (the client went away)
    // while the command runs, since the payment may be appended and its prompt sent
    // all the same; given back only when the command is refused.
    let purpose = checked(purpose)?;
    let counted = state.limits.begin(&limits).await?.keep();
    let done = match state
        .commands
        .request_payment(
            RequestPayment {
                payer,
                purpose,
                amount_kes: input.amount_kes,
                plan: &plan,
            },
            meta,
        )
        .await
    {
        Ok(done) => done,
        Err(refused) => {
            counted.give_back().await;
            return Err(refused.into());
        }
    };
    state.settle.settle(&done.outcome).await;
    Ok(created(done.id))
}

fn created(payment_id: PaymentId) -> HttpResponse {
    HttpResponse::Accepted().json(PaymentCreated {
        payment_id: payment_id.as_uuid(),
        status: "pending".to_owned(),
    })
}

#[utoipa::path(get, path = "/v1/payments/{payment_id}", tag = "payments",
    params(("payment_id" = Uuid, Path)),
    security(("bearer" = [])),
    responses((status = 200, description = "A payment (its payer, or the patient or doctor it names)", body = PaymentView)))]
#[tracing::instrument(skip_all)]
pub async fn get(
    state: Data<AppState>,
    caller: Caller,
    path: Path<String>,
) -> Result<HttpResponse, Problem> {
    let payment_id: PaymentId = path_id(&path, "payment")?;
    let not_found = || Problem::not_found("payment_not_found", "no such payment");
    let row = queries::payment(state.store.any_pool(), &payment_id.to_string())
        .await?
        .ok_or_else(not_found)?;
    let allowed = match caller.actor() {
        Actor::Patient(p) => {
            row.payer == Actor::Patient(p).reference()
                || row.patient_id.as_deref() == Some(&p.to_string())
        }
        Actor::Doctor(d) => {
            row.payer == Actor::Doctor(d).reference()
                || row.doctor_id.as_deref() == Some(&d.to_string())
        }
        _ => false,
    };
    if !allowed {
        return Err(not_found());
    }
    Ok(HttpResponse::Ok().json(view(row)))
}

async fn list(
    state: &AppState,
    party: PaymentParty,
    id: &str,
    query: &PageQuery,
) -> Result<HttpResponse, Problem> {
    let (after, limit) = query.parse()?;
    let page = queries::payments_of(state.store.any_pool(), party, id, after, limit).await?;
    Ok(HttpResponse::Ok().json(PaymentPage {
        items: page.items.into_iter().map(view).collect(),
        next_cursor: page.next_cursor,
    }))
}

#[utoipa::path(get, path = "/v1/patients/{patient_id}/payments", tag = "payments",
    params(("patient_id" = Uuid, Path), PageQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "The patient's payments (the patient)", body = PaymentPage)))]
#[tracing::instrument(skip_all)]
pub async fn of_patient(
    state: Data<AppState>,
    caller: Caller,
    path: Path<String>,
    query: Query<PageQuery>,
) -> Result<HttpResponse, Problem> {
    let patient_id: PatientId = path_id(&path, "patient")?;
    own_patient(&caller, patient_id)?;
    list(
        &state,
        PaymentParty::Patient,
        &patient_id.to_string(),
        &query,
    )
    .await
}

#[utoipa::path(get, path = "/v1/doctors/{doctor_id}/payments", tag = "payments",
    params(("doctor_id" = Uuid, Path), PageQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "The doctor's payments: asked by them or paid to them (the doctor)", body = PaymentPage)))]
#[tracing::instrument(skip_all)]
pub async fn of_doctor(
    state: Data<AppState>,
    caller: Caller,
    path: Path<String>,
    query: Query<PageQuery>,
) -> Result<HttpResponse, Problem> {
    let doctor_id: DoctorId = path_id(&path, "doctor")?;
    match caller.actor() {
        Actor::Doctor(d) if d == doctor_id => {}
        Actor::Doctor(_) => {
            return Err(Problem::forbidden(
                "not_your_data",
                "a doctor may see only their own payments",
            ))
        }
        _ => {
            return Err(Problem::forbidden(
                "role_forbidden",
                "only the doctor may do this",
            ))
        }
    }
    list(&state, PaymentParty::Doctor, &doctor_id.to_string(), &query).await
}

/// Bound on the STK Push Query a callback waits for (the token and the query
/// together), so that Daraja's acknowledgement stays fast.
const CALLBACK_QUERY_BOUND: Duration = Duration::from_secs(4);

/// The Daraja client callbacks (successes and failures alike) are checked with: one
/// attempt per call, each within [`CALLBACK_QUERY_BOUND`] (what it cannot answer now
/// the reconciler asks later). `None` without M-Pesa.
pub fn callback_client(config: &Config) -> Option<Arc<Daraja>> {
    let mut daraja = config.mpesa.as_ref()?.daraja.clone();
    daraja.timeout = daraja.timeout.min(CALLBACK_QUERY_BOUND);
    daraja.attempts = 1;
    match Daraja::new(daraja) {
        Ok(client) => Some(Arc::new(client)),
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "building the Daraja client for callbacks failed; callbacks wait for reconciliation");
            None
        }
    }
}

/// What Daraja itself says of a callback's payment, asked within
/// [`CALLBACK_QUERY_BOUND`], against the callback's `ResultCode` `claimed`.
async fn ask_daraja(state: &AppState, checkout_request_id: &str, claimed: i64) -> Verdict {
    let Some(daraja) = state.daraja.as_ref() else {
        return Verdict::Unknown("no Daraja client".into());
    };
    match tokio::time::timeout(CALLBACK_QUERY_BOUND, daraja.stk_query(checkout_request_id)).await {
        Ok(answer) => mpesa_adapter::callback::verdict(claimed, &answer),
        Err(_) => Verdict::Unknown(format!(
            "no answer to the STK Push Query within {} s",
            CALLBACK_QUERY_BOUND.as_secs()
        )),
    }
}

/// Warns when a callback for a settled payment names another M-Pesa receipt than the
/// one recorded. The STK Push Query cannot check a receipt, so a forged success the
/// query confirmed, posted before Daraja's own callback, records the forger's receipt;
/// Daraja's callback coming later is the sign of it. Neither receipt is logged: the
/// payment id is enough for an operator to look, and nothing in the log is personal.
/// Read from the read model, so a callback right behind the first may find nothing to
/// compare with yet.
async fn warn_if_another_receipt(state: &AppState, payment_id: PaymentId, receipt: &str) {
    match queries::payment(state.store.any_pool(), &payment_id.to_string()).await {
        Ok(Some(row)) => {
            if row
                .mpesa_receipt
                .as_deref()
                .is_some_and(|kept| kept != receipt)
            {
                tracing::warn!(payment_id = %payment_id, "STK callback for a confirmed payment names another M-Pesa receipt than the one recorded; one of the two callbacks was not Daraja's");
            }
        }
        Ok(None) => {}
        Err(error) => {
            tracing::warn!(payment_id = %payment_id, error = format!("{error:#}"), "reading a settled payment's receipt failed; not compared with its callback's");
        }
    }
}

fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn ack() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(mpesa_adapter::callback::ACK)
}

#[utoipa::path(post, path = "/v1/mpesa/callbacks/{path_token}/stk", tag = "payments",
    params(("path_token" = String, Path, description = "The unguessable token of MPESA_CALLBACK_URL")),
    responses((status = 200, description = "Daraja's acknowledgement `{\"ResultCode\":0,\"ResultDesc\":\"Accepted\"}`, whatever the callback settled. A success counts only once an STK Push Query agrees")))]
#[tracing::instrument(skip_all)]
pub async fn stk_callback(
    state: Data<AppState>,
    path: Path<String>,
    body: Body,
) -> Result<HttpResponse, Problem> {
    let Some(settings) = state.config.mpesa.as_ref() else {
        return Err(Problem::not_found("route_not_found", "no such route"));
    };
    if !same(&path, &settings.path_token) {
        return Err(Problem::not_found("route_not_found", "no such route"));
    }
    let callback = mpesa_adapter::callback::parse(body.bytes())
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid_callback", e.to_string()))?;
    let pool = state.store.any_pool();
    // The M-Pesa worker keeps each CheckoutRequestID before it records the acceptance,
    // so the payment is found here even before the read models have caught up.
    let kept = mpesa_adapter::worker::checkout_payment(pool, &callback.checkout_request_id)
        .await
        .map_err(|e| Problem::internal(&e))?;
    let row = match kept {
        Some(payment_id) => Some(payment_id),
        None => queries::payment_by_checkout(pool, &callback.checkout_request_id)
            .await?
            .map(|r| r.payment_id),
    };
    let reject = |reason: &str, payment_id: Option<PaymentId>| RejectedCallbackCommand::Record {
        by: Actor::System,
        reason: reason.to_owned(),
        checkout_request_id: callback.checkout_request_id.clone(),
        result_code: callback.result_code,
        mpesa_receipt: callback.paid.as_ref().map(|p| p.receipt.clone()),
        amount_kes: callback.paid.as_ref().map(|p| p.amount_kes),
        payment_id,
    };
    let Some(row) = row else {
        tracing::warn!(
            result_code = callback.result_code,
            "STK callback for an unknown CheckoutRequestID; kept as rejected"
        );
        state
            .commands
            .reject_callback(reject("unknown_checkout_request_id", None))
            .await?;
        return Ok(ack());
    };
    let payment_id: PaymentId = PaymentId::parse(&row)
        .map_err(|_| Problem::internal(&anyhow::anyhow!("a stored payment id is not an id")))?;
    let payment = state
        .commands
        .payment(payment_id)
        .await
        .map_err(|e| Problem::internal(&e))?
        .ok_or_else(|| Problem::internal(&anyhow::anyhow!("a listed payment is missing")))?;
    if let Some(paid) = &callback.paid {
        let phone_index = state.commands.keys().phone_index(&paid.phone);
        let reason = if paid.amount_kes != payment.amount_kes() {
            Some("amount_mismatch")
        } else if phone_index != payment.phone_index() {
            Some("phone_mismatch")
        } else {
            None
        };
        if let Some(reason) = reason {
            tracing::warn!(payment_id = %payment_id, reason, "STK callback does not match its payment; kept as rejected");
            state
                .commands
                .reject_callback(reject(reason, Some(payment_id)))
                .await?;
            return Ok(ack());
        }
    }
    // Settled already: nothing to ask Daraja about.
    if payment.status() != domain::payment::PaymentStatus::Pending {
        tracing::info!(payment_id = %payment_id, result_code = callback.result_code, "duplicate or late STK callback for a settled payment; nothing changed");
        if let Some(paid) = &callback.paid {
            warn_if_another_receipt(&state, payment_id, &paid.receipt).await;
        }
        return Ok(ack());
    }
    // The path token is the only secret, so a failure is checked like a success:
    // believed as is, a forged failure would fail a payment the customer has made.
    let claims = if callback.paid.is_some() {
        "a payment"
    } else {
        "a failure"
    };
    let verdict = ask_daraja(&state, &callback.checkout_request_id, callback.result_code).await;
    let (result_code, result_desc) = match verdict {
        // Daraja's own code and description, never the callback's: whoever forged a
        // callback the query happens to agree with would otherwise choose the words
        // the payer reads (`result_desc`).
        Verdict::Agrees {
            result_code,
            result_desc,
        } => {
            if result_code != callback.result_code {
                // Both failures, told apart (1032 cancelled, 1037 timed out…).
                tracing::warn!(payment_id = %payment_id, result_code = callback.result_code, query_result_code = result_code, "STK callback names another failure than Daraja's query; settled as the query says");
            }
            (result_code, result_desc)
        }
        Verdict::Disagrees { result_code } => {
            if callback.paid.is_some() {
                tracing::warn!(payment_id = %payment_id, query_result_code = result_code, "STK callback claims a payment Daraja's query does not confirm; kept as rejected");
            } else {
                // Not settled from the query here either: the reconciling query
                // settles it as Daraja says, as for a callback that never came.
                tracing::warn!(payment_id = %payment_id, result_code = callback.result_code, query_result_code = result_code, "STK callback claims a failure Daraja's query does not confirm (it says paid); kept as rejected, the payment stays pending until the reconciling query settles it");
            }
            state
                .commands
                .reject_callback(reject("query_disagrees", Some(payment_id)))
                .await?;
            return Ok(ack());
        }
        Verdict::Unknown(_) => {
            // Kept, not dropped: a genuine callback (Daraja's own, of a payment made)
            // is on record for operators, while the payment waits for the reconciling
            // query, the only thing that settles it from here. Nothing is failed for
            // want of an answer.
            tracing::warn!(payment_id = %payment_id, "STK callback claims {claims} that Daraja cannot confirm now; kept as rejected (unverified), the payment stays pending until the reconciling query settles it");
            state
                .commands
                .reject_callback(reject("unverified", Some(payment_id)))
                .await?;
            return Ok(ack());
        }
    };
    let receipt = match &callback.paid {
        Some(paid) => Some(Receipt {
            receipt: paid.receipt.clone(),
            amount_kes: paid.amount_kes,
            transaction_date: paid.transaction_date.clone(),
            phone: state
                .commands
                .seal_for(&payment.phone_subject(), &paid.phone)
                .await
                .map_err(|e| Problem::internal(&e))?,
        }),
        None => None,
    };
    let settle = || {
        state.commands.payment_command(
            payment_id,
            PaymentCommand::Settle {
                by: Actor::System,
                result_code,
                result_desc: result_desc.clone(),
                receipt: receipt.clone(),
                settled_by: SettledBy::Callback,
            },
        )
    };
    let mut settled = settle().await;
    // Kept, but the acceptance not recorded yet: a moment's grace.
    for _ in 0..20 {
        if !matches!(
            settled,
            Err(commands::CommandError::Rejected {
                code: "payment_not_pushed",
                ..
            })
        ) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        settled = settle().await;
    }
    // Daraja is answered at once: read models catch up on their own.
    match settled {
        Ok(_) => {
            tracing::info!(payment_id = %payment_id, result_code, "payment settled by callback");
        }
        Err(commands::CommandError::Rejected {
            code: "payment_already_settled",
            ..
        }) => {
            tracing::info!(payment_id = %payment_id, result_code = callback.result_code, "duplicate or late STK callback for a settled payment; nothing changed");
        }
        Err(other) => return Err(other.into()),
    }
    Ok(ack())
}
