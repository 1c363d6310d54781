//! Integrators (operators add and disable them), their API keys, and their webhooks.

use anyhow::Context;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use domain::actor::Actor;
use domain::ids::{IntegratorId, WebhookId};
use eventstore::{CommandMeta, CommandOutcome};
use uuid::Uuid;

use super::{map, AuthError, Authenticated, CommandError, Commands};

/// Integrators' API keys: `afyk1.<integrator id>.<tag>`.
pub(super) const KEY_PREFIX: &str = "afyk1.";
const KEY_TAG: &str = "integrator key";

/// What [`Commands::register_webhook`] registers.
pub struct RegisterWebhook<'a> {
    pub integrator_id: IntegratorId,
    pub webhook_id: WebhookId,
    /// Sealed under the integrator's key.
    pub url: &'a str,
    pub types: std::collections::BTreeSet<String>,
    /// Sealed under the integrator's key.
    pub secret: &'a str,
}

impl Commands {
    /// An integrator's API key: its tag must verify, then the integrator must exist.
    /// A key does not expire; `expires_at` is a year ahead, for clients that ask.
    pub(super) async fn authenticate_key(&self, key: &str) -> Result<Authenticated, AuthError> {
        let (id, tag) = key.split_once('.').ok_or(AuthError::Malformed)?;
        let integrator_id = Uuid::try_parse(id).map_err(|_| AuthError::Malformed)?;
        let tag = B64URL.decode(tag).map_err(|_| AuthError::Malformed)?;
        if id.len() != 32 || !self.keys.verify_tag(KEY_TAG, id.as_bytes(), &tag) {
            return Err(AuthError::Forged);
        }
        let integrator = self
            .integrator(IntegratorId::from_uuid(integrator_id))
            .await?;
        match integrator.id() {
            Some(_) if integrator.is_disabled() => Err(AuthError::Withdrawn),
            Some(id) => Ok(Authenticated {
                session_id: integrator_id,
                actor: Actor::Integrator(id),
                expires_at: self.now() + chrono::Duration::days(365),
            }),
            None => Err(AuthError::Forged),
        }
    }

    fn key_for(&self, integrator_id: IntegratorId) -> String {
        let id = integrator_id.as_uuid().simple().to_string();
        let tag = self.keys.tag(KEY_TAG, id.as_bytes());
        format!("{KEY_PREFIX}{id}.{}", B64URL.encode(tag))
    }

    /// An integrator as the event store holds it (an empty one when unknown).
    pub async fn integrator(
        &self,
        integrator_id: IntegratorId,
    ) -> anyhow::Result<domain::integrator::Integrator> {
        Ok(self
            .integrators
            .load(&integrator_id.to_string())
            .await
            .context("loading an integrator")?
            .aggregate)
    }

    /// Adds an integrator whose key may receive `event_types` (operators only, from
    /// the command line). Returns its id and its API key, which is shown once.
    pub async fn add_integrator(
        &self,
        name: &str,
        event_types: std::collections::BTreeSet<String>,
        meta: CommandMeta,
    ) -> Result<(IntegratorId, String), CommandError> {
        let integrator_id = IntegratorId::new();
        self.store
            .execute::<domain::integrator::Integrator>(
                &self.integrators,
                &integrator_id.to_string(),
                domain::integrator::IntegratorCommand::Add {
                    integrator_id,
                    name: name.to_owned(),
                    event_types,
                    at: self.now(),
                },
                &(),
                &meta,
            )
            .await
            .map_err(map)?;
        Ok((integrator_id, self.key_for(integrator_id)))
    }

    /// Withdraws an integrator's key (operators only, from the command line).
    pub async fn disable_integrator(
        &self,
        integrator_id: IntegratorId,
        meta: CommandMeta,
    ) -> Result<CommandOutcome, CommandError> {
        self.store
            .execute::<domain::integrator::Integrator>(
                &self.integrators,
                &integrator_id.to_string(),
                domain::integrator::IntegratorCommand::Disable { at: self.now() },
                &(),
                &meta,
            )
            .await
            .map_err(map)
    }

    /// Registers a webhook of an integrator; its URL and secret are sealed under the
    /// integrator's key.
    pub async fn register_webhook(
        &self,
        input: RegisterWebhook<'_>,
        meta: CommandMeta,
    ) -> Result<CommandOutcome, CommandError> {
        let RegisterWebhook {
            integrator_id,
            webhook_id,
            url,
            types,
            secret,
        } = input;
        let subject = integrator_id.to_string();
        let command = domain::integrator::IntegratorCommand::RegisterWebhook {
            webhook_id,
            url: self.seal_text(&subject, url).await?,
            types,
            secret: self.seal_text(&subject, secret).await?,
            at: self.now(),
        };
        self.store
            .execute::<domain::integrator::Integrator>(
                &self.integrators,
                &subject,
                command,
                &(),
                &meta,
            )
            .await
            .map_err(map)
    }
}
