//! Sign-up of patients and doctors, verification of doctors by a registrar, sign-in
//! and sign-out.

use actix_web::http::StatusCode;
use actix_web::web::{Data, Path};
use actix_web::{HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use commands::{CommandError, RegisterDoctor, RegisterPatient};
use domain::ids::{DoctorId, PatientId};
use domain::value::{BirthDate, LicenceNumber, Msisdn, Password, PersonName};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::extract::{command_meta, phone_meta, without_password, Body, Caller};
use crate::problem::{checked, Problem, Validation};
use crate::ratelimit::{Attempt, Limit};
use crate::routes::{own_patient, path_id, registrar};
use crate::server::AppState;

// Bodies and answers that hold a password or a token derive no `Debug`: they cannot be
// printed by accident.
//
// The `pattern`s below describe what the domain's parsers accept (`domain::value`), or
// a part of it: a value that fits one is never refused for its form, since schemathesis
// generates valid requests from them. They are written for both the ECMA-262 regular
// expressions of JSON Schema and Python's (which schemathesis generates with): no
// `\d`, `\s` or `\w`, whose meaning differs between the two and from the parsers'.
// - phone (`Msisdn`): 2547…, 2541…, 07…, 01… or +254…, spaces or hyphens between the
//   digits (the parser also takes them elsewhere);
// - name (`PersonName`): no control or bidirectional control character, no blank at
//   either end (the parser trims it), at most 100 characters;
// - password (`Password`): 10 to 128 characters at sign-up.

/// A patient signs up.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatientSignUp {
    /// Kenyan mobile number: 2547XXXXXXXX, 2541XXXXXXXX, 07…, 01… or +254…, spaces or
    /// hyphens between the digits allowed.
    #[schema(
        pattern = r"^\+?(254|0)[ -]?[17]([ -]?[0-9]){8}$",
        example = "254712345678"
    )]
    pub phone: String,
    /// 10 to 128 characters.
    #[schema(min_length = 10, max_length = 128)]
    pub password: String,
    /// 1 to 100 characters, no control or bidirectional control characters.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\x00-\x20\x7f-\xa0\u061c\u1680\u2000-\u200f\u2028-\u202f\u205f\u2066-\u2069\u3000]([^\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]*[^\x00-\x20\x7f-\xa0\u061c\u1680\u2000-\u200f\u2028-\u202f\u205f\u2066-\u2069\u3000])?$",
        example = "Achieng Otieno"
    )]
    pub name: String,
    /// `YYYY-MM-DD`, from 1900-01-01 to today.
    #[schema(format = Date, example = "1987-03-14")]
    pub birth_date: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PatientCreated {
    pub patient_id: Uuid,
}

/// A doctor signs up; unverified until a registrar verifies the licence.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DoctorSignUp {
    /// Kenyan mobile number, as for a patient.
    #[schema(
        pattern = r"^\+?(254|0)[ -]?[17]([ -]?[0-9]){8}$",
        example = "254722000111"
    )]
    pub phone: String,
    /// 10 to 128 characters.
    #[schema(min_length = 10, max_length = 128)]
    pub password: String,
    /// 1 to 100 characters, no control or bidirectional control characters.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\x00-\x20\x7f-\xa0\u061c\u1680\u2000-\u200f\u2028-\u202f\u205f\u2066-\u2069\u3000]([^\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]*[^\x00-\x20\x7f-\xa0\u061c\u1680\u2000-\u200f\u2028-\u202f\u205f\u2066-\u2069\u3000])?$",
        example = "Dr Kamau"
    )]
    pub name: String,
    /// As the registrar issues it: 2 to 32 of A-Z, 0-9, / and - (lowercase letters are
    /// taken as uppercase).
    #[schema(
        min_length = 2,
        max_length = 32,
        pattern = "^[A-Za-z0-9/-]{2,32}$",
        example = "KMPDC-0042"
    )]
    pub license_number: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DoctorState {
    pub doctor_id: Uuid,
    /// `unverified` or `verified`.
    pub status: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignIn {
    /// The account's phone, in any form sign-up takes.
    #[schema(
        pattern = r"^\+?(254|0)[ -]?[17]([ -]?[0-9]){8}$",
        example = "254712345678"
    )]
    pub phone: String,
    /// 1 to 128 characters (one shorter than 10 matches no account: 401).
    #[schema(min_length = 1, max_length = 128)]
    pub password: String,
}

/// A session: send `token` as `Authorization: Bearer <token>` until `expires_at`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct SessionCreated {
    pub token: String,
    /// `patient`, `doctor`, `registrar` or `auditor`.
    pub role: String,
    pub subject_id: Uuid,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CurrentSession {
    pub role: String,
    pub subject_id: Uuid,
    pub expires_at: DateTime<Utc>,
}

fn today(state: &AppState) -> chrono::NaiveDate {
    state.commands.now().date_naive()
}

#[utoipa::path(post, path = "/v1/patients", tag = "accounts",
    request_body = PatientSignUp,
    responses((status = 201, description = "Signed up", body = PatientCreated)))]
#[tracing::instrument(skip_all)]
pub async fn sign_up_patient(
    req: HttpRequest,
    state: Data<AppState>,
    body: Body,
) -> Result<HttpResponse, Problem> {
    let input: PatientSignUp = body.json()?;
    let mut v = Validation::default();
    let phone = v.check(Msisdn::parse(&input.phone));
    let password = v.check(Password::parse(&input.password));
    let name = v.check(PersonName::parse(&input.name));
    let birth_date = v.check(BirthDate::parse(&input.birth_date, today(&state)));
    v.finish()?;
    let phone = checked(phone)?;
    let phone_index = state.commands.keys().phone_index(phone.as_str());
    let meta = phone_meta(&req, &phone_index, &without_password(body.bytes()))?;
    let done = limit_sign_up(&req, &state, async {
        state
            .commands
            .register_patient(
                RegisterPatient {
                    name: &checked(name)?,
                    phone: &phone,
                    birth_date: &checked(birth_date)?,
                    password: &checked(password)?,
                },
                meta,
            )
            .await
            .map_err(Problem::from)
    })
    .await?;
    state.settle.settle(&done.outcome).await;
    Ok(HttpResponse::Created().json(PatientCreated {
        patient_id: done.id.as_uuid(),
    }))
}

#[utoipa::path(post, path = "/v1/doctors", tag = "accounts",
    request_body = DoctorSignUp,
    responses((status = 201, description = "Signed up, awaiting verification", body = DoctorState)))]
#[tracing::instrument(skip_all)]
pub async fn sign_up_doctor(
    req: HttpRequest,
    state: Data<AppState>,
    body: Body,
) -> Result<HttpResponse, Problem> {
    let input: DoctorSignUp = body.json()?;
    let mut v = Validation::default();
    let phone = v.check(Msisdn::parse(&input.phone));
    let password = v.check(Password::parse(&input.password));
    let name = v.check(PersonName::parse(&input.name));
    let licence = v.check(LicenceNumber::parse(&input.license_number));
    v.finish()?;
    let phone = checked(phone)?;
    let phone_index = state.commands.keys().phone_index(phone.as_str());
    let meta = phone_meta(&req, &phone_index, &without_password(body.bytes()))?;
    let done = limit_sign_up(&req, &state, async {
        state
            .commands
            .register_doctor(
                RegisterDoctor {
                    name: &checked(name)?,
                    phone: &phone,
                    licence: checked(licence)?,
                    password: &checked(password)?,
                },
                meta,
            )
            .await
            .map_err(Problem::from)
    })
    .await?;
    state.settle.settle(&done.outcome).await;
    Ok(HttpResponse::Created().json(DoctorState {
        doctor_id: done.id.as_uuid(),
        status: "unverified".to_owned(),
    }))
}

#[utoipa::path(post, path = "/v1/doctors/{doctor_id}/verification", tag = "accounts",
    params(("doctor_id" = Uuid, Path)),
    security(("bearer" = [])),
    responses((status = 200, description = "Verified (registrar)", body = DoctorState)))]
#[tracing::instrument(skip_all)]
pub async fn verify_doctor(
    req: HttpRequest,
    state: Data<AppState>,
    caller: Caller,
    path: Path<String>,
) -> Result<HttpResponse, Problem> {
    let by = registrar(&caller)?;
    let doctor_id: DoctorId = path_id(&path, "doctor")?;
    let meta = command_meta(&req, Some(caller.actor()), b"")?;
    let outcome = state.commands.verify_doctor(doctor_id, by, meta).await?;
    state.settle.settle(&outcome).await;
    Ok(HttpResponse::Ok().json(DoctorState {
        doctor_id: doctor_id.as_uuid(),
        status: "verified".to_owned(),
    }))
}

#[utoipa::path(post, path = "/v1/sessions", tag = "accounts",
    request_body = SignIn,
    responses((status = 200, description = "Signed in", body = SessionCreated)))]
#[tracing::instrument(skip_all)]
pub async fn sign_in(
    req: HttpRequest,
    state: Data<AppState>,
    body: Body,
) -> Result<HttpResponse, Problem> {
    let input: SignIn = body.json()?;
    let mut v = Validation::default();
    let phone = v.check(Msisdn::parse(&input.phone));
    if input.password.is_empty() || input.password.chars().count() > 128 {
        v.fail("password", "must be 1 to 128 characters");
    }
    v.finish()?;
    let phone = checked(phone)?;
    let phone_index = state.commands.keys().phone_index(phone.as_str());
    let attempt = begin_attempt(&req, &state, Some(&phone_index)).await?;
    // A password shorter than any account may have cannot match.
    let result = match Password::parse(&input.password) {
        Ok(password) => {
            let meta = phone_meta(&req, &phone_index, &without_password(body.bytes()))?;
            state
                .commands
                .sign_in(&phone, &password, state.config.session_lifetime, meta)
                .await
        }
        Err(_) => Err(CommandError::BadCredentials),
    };
    match result {
        Ok(session) => {
            attempt.succeeded(&[PHONE_BUCKET]).await;
            Ok(HttpResponse::Ok().json(SessionCreated {
                token: session.token,
                role: session.holder.kind().to_owned(),
                subject_id: subject_uuid(&session.holder),
                expires_at: session.expires_at,
            }))
        }
        Err(CommandError::BadCredentials) => {
            attempt.failed();
            tracing::info!("sign-in refused");
            Err(CommandError::BadCredentials.into())
        }
        // Not a guess that failed: dropping the attempt gives it back.
        Err(other) => Err(other.into()),
    }
}

const PHONE_BUCKET: &str = "sign_in_phone";
const ADDRESS_BUCKET: &str = "sign_in_address";

/// Starts a sign-in (or sign-up) attempt under the limits of its phone, if any, and of
/// the client's address.
async fn begin_attempt(
    req: &HttpRequest,
    state: &AppState,
    phone_index: Option<&str>,
) -> Result<Attempt, Problem> {
    let limits = &state.config.sign_in_limits;
    let address = req.peer_addr().map(|a| a.ip().to_string());
    let mut counted = Vec::with_capacity(2);
    if let Some(phone_index) = phone_index {
        counted.push(Limit {
            bucket: PHONE_BUCKET,
            key: phone_index,
            rule: limits.phone_rule(),
        });
    }
    if let Some(address) = address.as_deref() {
        counted.push(Limit {
            bucket: ADDRESS_BUCKET,
            key: address,
            rule: limits.address_rule(),
        });
    }
    state.limits.begin(&counted).await
}

/// Runs a sign-up under the address's attempt limit: one that finds the phone taken
/// counts as a failed attempt (so registered phones cannot be enumerated quickly).
async fn limit_sign_up<T>(
    req: &HttpRequest,
    state: &AppState,
    sign_up: impl std::future::Future<Output = Result<T, Problem>>,
) -> Result<T, Problem> {
    let attempt = begin_attempt(req, state, None).await?;
    let result = sign_up.await;
    if matches!(&result, Err(problem) if problem.code == "phone_taken") {
        attempt.failed();
    }
    result
}

fn subject_uuid(actor: &domain::actor::Actor) -> Uuid {
    Uuid::parse_str(&actor.id_string()).unwrap_or_default()
}

#[utoipa::path(get, path = "/v1/sessions/current", tag = "accounts",
    security(("bearer" = [])),
    responses((status = 200, description = "Who the token speaks for", body = CurrentSession)))]
pub async fn current_session(caller: Caller) -> HttpResponse {
    HttpResponse::Ok().json(CurrentSession {
        role: caller.actor().kind().to_owned(),
        subject_id: subject_uuid(&caller.actor()),
        expires_at: caller.0.expires_at,
    })
}

#[utoipa::path(delete, path = "/v1/sessions/current", tag = "accounts",
    security(("bearer" = [])),
    responses((status = 204, description = "Signed out: the token is refused from now on")))]
#[tracing::instrument(skip_all)]
pub async fn sign_out(
    req: HttpRequest,
    state: Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, Problem> {
    if matches!(caller.actor(), domain::actor::Actor::Integrator(_)) {
        return Err(Problem::forbidden(
            "api_key_not_a_session",
            "an API key is not a session and cannot be signed out",
        ));
    }
    let meta = command_meta(&req, Some(caller.actor()), b"")?;
    state
        .commands
        .sign_out(caller.0.session_id, caller.actor(), meta)
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

/// A patient's own wallet, to hold their record tokens instead of their custodial
/// address.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WalletRegistration {
    /// The wallet's address, 0x and 40 hex digits (not the zero address).
    #[schema(
        pattern = "^0x[0-9a-fA-F]{40}$",
        example = "0x52908400098527886E0F7030069857D2E4169EE7"
    )]
    pub address: String,
    /// The wallet's EIP-191 `personal_sign` (65 bytes, hex, 0x optional) of the message
    /// `GET` on this resource gives, with `{address}` replaced by the checksummed
    /// address.
    #[schema(pattern = "^(0x)?[0-9a-fA-F]{130}$")]
    pub signature: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WalletState {
    /// The registered wallet (checksummed), or null.
    pub wallet: Option<String>,
    /// Whether the platform already uses the patient's custodial address on chain
    /// (then no wallet can be registered any more).
    pub custodial_in_use: bool,
    /// What to sign to register a wallet, `{address}` standing for its checksummed
    /// address.
    pub message: String,
}

async fn wallet_state(state: &AppState, patient_id: PatientId) -> Result<WalletState, Problem> {
    let patient = state
        .commands
        .patient(patient_id)
        .await
        .map_err(|e| Problem::internal(&e))?
        .ok_or_else(|| Problem::not_found("patient_not_found", "no such patient"))?;
    let wallet = match patient.wallet() {
        Some(sealed) => {
            state
                .commands
                .open_text(&patient_id.to_string(), sealed.as_str())
                .await
        }
        None => None,
    };
    let template = chain_adapter::chain::wallet_message(
        &patient_id.to_string(),
        chain_adapter::chain::ChainAddress::ZERO,
    )
    .replace(
        &chain_adapter::chain::ChainAddress::ZERO.to_checksum(None),
        "{address}",
    );
    Ok(WalletState {
        wallet,
        custodial_in_use: patient.custodial_in_use(),
        message: template,
    })
}

#[utoipa::path(get, path = "/v1/patients/{patient_id}/wallet", tag = "accounts",
    params(("patient_id" = Uuid, Path)),
    security(("bearer" = [])),
    responses((status = 200, description = "The patient's wallet, if any (the patient)", body = WalletState)))]
#[tracing::instrument(skip_all)]
pub async fn wallet(
    state: Data<AppState>,
    caller: Caller,
    path: Path<String>,
) -> Result<HttpResponse, Problem> {
    let patient_id: PatientId = path_id(&path, "patient")?;
    own_patient(&caller, patient_id)?;
    Ok(HttpResponse::Ok().json(wallet_state(&state, patient_id).await?))
}

#[utoipa::path(put, path = "/v1/patients/{patient_id}/wallet", tag = "accounts",
    params(("patient_id" = Uuid, Path)),
    request_body = WalletRegistration,
    security(("bearer" = [])),
    responses((status = 200, description = "Registered: the patient's record tokens go to it (409: a wallet is registered already, or the custodial address is in use on chain; 422: not an address, or the signature does not prove holding it)", body = WalletState)))]
#[tracing::instrument(skip_all)]
pub async fn register_wallet(
    req: HttpRequest,
    state: Data<AppState>,
    caller: Caller,
    path: Path<String>,
    body: Body,
) -> Result<HttpResponse, Problem> {
    let patient_id: PatientId = path_id(&path, "patient")?;
    own_patient(&caller, patient_id)?;
    let input: WalletRegistration = body.json()?;
    let raw = input.address.trim();
    let address: chain_adapter::chain::ChainAddress = Some(raw)
        .filter(|a| a.len() == 42 && a.starts_with("0x"))
        .and_then(|a| a.parse().ok())
        .filter(|a: &chain_adapter::chain::ChainAddress| !a.is_zero())
        .ok_or_else(|| Problem::field("address", "must be an address: 0x and 40 hex digits"))?;
    if !chain_adapter::chain::proves_wallet(&patient_id.to_string(), address, &input.signature) {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "wallet_proof_invalid",
            format!(
                "signature must be this wallet's personal_sign of: {}",
                chain_adapter::chain::wallet_message(&patient_id.to_string(), address)
            ),
        )
        .at("signature"));
    }
    let checksummed = address.to_checksum(None);
    // The same wallet again (a retry): as it is.
    let now = wallet_state(&state, patient_id).await?;
    if now.wallet.as_deref() == Some(checksummed.as_str()) {
        return Ok(HttpResponse::Ok().json(now));
    }
    // One patient's only: a wallet shared by two patients would let a grant of one
    // cover the other's tokens on chain.
    let index = state.commands.wallet_index(&checksummed);
    let holder = projections::queries::patient_by_wallet_index(state.store.any_pool(), &index)
        .await
        .map_err(|e| Problem::internal(&e))?;
    if holder.is_some_and(|h| h != patient_id.to_string()) {
        return Err(CommandError::rule(domain::patient::PatientError::WalletTaken).into());
    }
    let meta = command_meta(&req, Some(caller.actor()), body.bytes())?;
    let outcome = state
        .commands
        .register_wallet(patient_id, &checksummed, meta)
        .await?;
    state.settle.settle(&outcome).await;
    Ok(HttpResponse::Ok().json(wallet_state(&state, patient_id).await?))
}
