//! Integrators' webhooks: register, list, and see and replay parked deliveries.

use std::collections::BTreeSet;

use actix_web::web::{Data, Path, Query};
use actix_web::{HttpRequest, HttpResponse};
use base64::Engine as _;
use commands::RegisterWebhook;
use domain::ids::{IntegratorId, WebhookId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::extract::{command_meta, Body, Caller};
use crate::problem::{Problem, Validation};
use crate::routes::events::{integrator, narrow};
use crate::routes::PageQuery;
use crate::server::AppState;

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWebhook {
    /// Where deliveries are POSTed: `https://…` (or `http://…`), at most 2000
    /// characters, on a public address: an IP literal, or a name that resolves only
    /// to public addresses (checked again at every delivery).
    #[schema(
        min_length = 8,
        max_length = 2000,
        pattern = "^[Hh][Tt][Tt][Pp][Ss]?://"
    )]
    pub url: String,
    /// Event types to deliver (1 to 100); each must be allowed by the key.
    #[schema(min_items = 1, max_items = 100)]
    pub types: Vec<String>,
    /// The HMAC-SHA256 signing secret, 16 to 200 characters and no control characters;
    /// omit to have one made.
    #[serde(default, skip_serializing)]
    #[schema(
        min_length = 16,
        max_length = 200,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$"
    )]
    pub secret: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Webhook {
    pub webhook_id: Uuid,
    pub url: String,
    pub types: Vec<String>,
    pub registered_at: String,
    /// Only in the answer to the registration: sign checks with it (keep it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WebhookList {
    pub items: Vec<Webhook>,
}

/// The one answer to a host that is, resolves to, or does not resolve to a public
/// internet address.
const NOT_PUBLIC: &str = "must lead to a public internet address: a public IP address, or a host name that resolves only to public ones (AFYA_WEBHOOK_ALLOW_PRIVATE allows others, for development)";

/// Checks a webhook URL with the address policy deliveries use: an `http(s)` URL whose
/// host is an allowed address, or a name that resolves (within a few seconds) only to
/// allowed addresses. A name that does not resolve is refused too: nothing could be
/// delivered to it, and a name registered before it exists could later point anywhere
/// (each delivery checks again). A name that does not resolve and one that resolves to
/// a refused address get the same words, so that registering cannot be used to learn
/// which names the server's internal DNS knows.
async fn check_url(v: &mut Validation, url: &str, policy: &integrations::AddressPolicy) {
    use integrations::address::Refusal;
    let parsed = reqwest::Url::parse(url).ok().filter(|u| {
        url.chars().count() <= 2000
            && matches!(u.scheme(), "http" | "https")
            && u.host_str().is_some_and(|h| !h.is_empty())
    });
    let Some(parsed) = parsed else {
        v.fail("url", "must be an http(s) URL of at most 2000 characters");
        return;
    };
    match policy.check_url(&parsed).await {
        Ok(()) => {}
        Err(Refusal::NotHttp) => v.fail("url", "must be an http(s) URL of at most 2000 characters"),
        // A server that delivers to private addresses too has nothing to hide here.
        Err(Refusal::DoesNotResolve) if policy.allow_private() => {
            v.fail("url", "the host name does not resolve")
        }
        Err(Refusal::NotPublic | Refusal::DoesNotResolve) => v.fail("url", NOT_PUBLIC),
        Err(Refusal::LookupTimedOut) => {
            v.fail("url", "the host name did not resolve in time; try again")
        }
    }
}

#[utoipa::path(post, path = "/v1/webhooks", tag = "integrators",
    request_body = NewWebhook,
    security(("bearer" = [])),
    responses((status = 201, description = "Registered: events of these types are POSTed from now on, signed (`AfyaChain-Signature: v1=<hex HMAC-SHA256 of \"{timestamp}.{body}\">`, with `AfyaChain-Timestamp`, `AfyaChain-Event-Id`, `AfyaChain-Event-Type`), retried with a growing pause, then parked (integrators)", body = Webhook)))]
#[tracing::instrument(skip_all)]
pub async fn register(
    req: HttpRequest,
    state: Data<AppState>,
    caller: Caller,
    body: Body,
) -> Result<HttpResponse, Problem> {
    let (integrator_id, key) = integrator(&state, &caller).await?;
    let allowed = key.event_types();
    let input: NewWebhook = body.json()?;
    let mut v = Validation::default();
    check_url(
        &mut v,
        &input.url,
        &state.config.integrations.delivery.address,
    )
    .await;
    if input.types.is_empty() || input.types.len() > 100 {
        v.fail("types", "name 1 to 100 event types");
    }
    let secret = match &input.secret {
        Some(s) if (16..=200).contains(&s.chars().count()) && !s.chars().any(char::is_control) => {
            s.clone()
        }
        Some(_) => {
            v.fail(
                "secret",
                "must be 16 to 200 characters, none of them control characters",
            );
            String::new()
        }
        None => {
            let bytes: [u8; 32] = rand::random();
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        }
    };
    v.finish()?;
    let types = narrow(Some(&input.types.join(",")), allowed)?;
    // The secret stays out of the request's fingerprint.
    let fingerprint = serde_json::to_vec(&input).unwrap_or_default();
    let meta = command_meta(&req, Some(caller.actor()), &fingerprint)?;
    let outcome = state
        .commands
        .register_webhook(
            RegisterWebhook {
                integrator_id,
                webhook_id: WebhookId::new(),
                url: &input.url,
                types,
                secret: &secret,
            },
            meta,
        )
        .await?;
    state.settle.settle(&outcome).await;
    // Answered from what was stored, so a repeat under the same key gets the same
    // webhook and secret.
    let sequence = outcome
        .sequences
        .map(|(_, last)| last)
        .ok_or_else(|| Problem::internal(&anyhow::anyhow!("the registration appended nothing")))?;
    let webhook = registered(&state, integrator_id, sequence).await?;
    Ok(HttpResponse::Created().json(webhook))
}

async fn registered(
    state: &AppState,
    integrator_id: IntegratorId,
    sequence: i64,
) -> Result<Webhook, Problem> {
    let subject = integrator_id.to_string();
    let event = match state
        .store
        .cursor_of(
            <domain::integrator::Integrator as cqrs_es::Aggregate>::TYPE,
            &subject,
            sequence,
        )
        .await?
    {
        Some(at) => state.store.events_at(&[at.position]).await?.pop(),
        None => None,
    };
    let event = event
        .ok_or_else(|| Problem::internal(&anyhow::anyhow!("the registration is not in the log")))?;
    let domain::integrator::IntegratorEvent::WebhookRegistered {
        webhook_id,
        url,
        types,
        secret,
        registered_at,
        ..
    } = event.decode(&domain::upcast::upcasters())?
    else {
        return Err(Problem::internal(&anyhow::anyhow!(
            "the registration is another event"
        )));
    };
    let commands = &state.commands;
    Ok(Webhook {
        webhook_id: webhook_id.as_uuid(),
        url: commands
            .open_text(&subject, url.as_str())
            .await
            .unwrap_or_default(),
        types: types.into_iter().collect(),
        registered_at: registered_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        secret: commands.open_text(&subject, secret.as_str()).await,
    })
}

#[utoipa::path(get, path = "/v1/webhooks", tag = "integrators",
    security(("bearer" = [])),
    responses((status = 200, description = "The integrator's webhooks (secrets not shown)", body = WebhookList)))]
#[tracing::instrument(skip_all)]
pub async fn list(state: Data<AppState>, caller: Caller) -> Result<HttpResponse, Problem> {
    let (integrator_id, _) = integrator(&state, &caller).await?;
    let subject = integrator_id.to_string();
    let rows = projections::queries::webhooks_of(state.store.any_pool(), &subject).await?;
    let mut items = Vec::with_capacity(rows.len());
    for row in rows {
        let types: BTreeSet<String> = serde_json::from_str(&row.types).unwrap_or_default();
        items.push(Webhook {
            webhook_id: Uuid::parse_str(&row.webhook_id).unwrap_or_default(),
            url: state
                .commands
                .open_text(&subject, &row.url_sealed)
                .await
                .unwrap_or_default(),
            types: types.into_iter().collect(),
            registered_at: row.registered_at,
            secret: None,
        });
    }
    Ok(HttpResponse::Ok().json(WebhookList { items }))
}

/// The caller's webhook named in the path (404 for anyone else's).
async fn own_webhook(state: &AppState, caller: &Caller, raw: &str) -> Result<Uuid, Problem> {
    let (_, key) = integrator(state, caller).await?;
    let id: Uuid = crate::routes::path_id(raw, "webhook")?;
    if key.has_webhook(WebhookId::from_uuid(id)) {
        Ok(id)
    } else {
        Err(Problem::not_found("webhook_not_found", "no such webhook"))
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Failure {
    /// Log position of the event (the cursor of this list).
    pub position: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub attempts: i64,
    /// `unreachable` (no HTTP answer: refused address, closed port, failed look-up),
    /// `timeout`, or `HTTP <status>` of an answered request.
    pub last_error: String,
    pub failed_at: String,
    /// A replay was asked for and has not been tried yet.
    pub replay_requested: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FailurePage {
    pub items: Vec<Failure>,
    pub next_cursor: Option<i64>,
}

#[utoipa::path(get, path = "/v1/webhooks/{webhook_id}/failures", tag = "integrators",
    params(("webhook_id" = Uuid, Path), PageQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "Deliveries parked after every attempt failed, in log order (integrators)", body = FailurePage)))]
#[tracing::instrument(skip_all)]
pub async fn failures(
    state: Data<AppState>,
    caller: Caller,
    path: Path<String>,
    query: Query<PageQuery>,
) -> Result<HttpResponse, Problem> {
    let id = own_webhook(&state, &caller, &path).await?;
    let (after, limit) = query.parse()?;
    let rows =
        integrations::webhook::failures(state.store.any_pool(), id, after, limit + 1).await?;
    let page = projections::queries::page(rows, limit, |f| f.position);
    Ok(HttpResponse::Ok().json(FailurePage {
        items: page
            .items
            .into_iter()
            .map(|f| Failure {
                position: f.position,
                event_id: f.event_id,
                event_type: f.event_type,
                attempts: f.attempts,
                last_error: f.last_error,
                failed_at: f
                    .failed_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                replay_requested: f.replay_requested,
            })
            .collect(),
        next_cursor: page.next_cursor,
    }))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Replay {
    /// Parked deliveries queued to be tried again.
    pub replay_requested: u64,
}

#[utoipa::path(post, path = "/v1/webhooks/{webhook_id}/replay", tag = "integrators",
    params(("webhook_id" = Uuid, Path)),
    security(("bearer" = [])),
    responses((status = 202, description = "Every parked delivery is tried again, once, before newer events; those that fail again stay parked (integrators)", body = Replay)))]
#[tracing::instrument(skip_all)]
pub async fn replay(
    state: Data<AppState>,
    caller: Caller,
    path: Path<String>,
) -> Result<HttpResponse, Problem> {
    let id = own_webhook(&state, &caller, &path).await?;
    let replay_requested =
        integrations::webhook::request_replay(state.store.any_pool(), id).await?;
    state.webhooks.wake(id).await;
    Ok(HttpResponse::Accepted().json(Replay { replay_requested }))
}
