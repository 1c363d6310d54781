//! The Integrator aggregate: a system that receives events (an EHR, a claims
//! processor), added by an operator from the command line with the event types its
//! key may receive, and the webhooks it registers.
//!
//! A webhook's URL (it may carry a token) and its signing secret are sealed like
//! personal data; the event types are public names.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::error::{Rule, RuleKind};
use crate::ids::{IntegratorId, WebhookId};
use crate::sealed::Sealed;

/// Webhooks one integrator may hold.
pub const MAX_WEBHOOKS: usize = 20;

#[derive(Clone, Debug, PartialEq)]
pub enum IntegratorCommand {
    Add {
        integrator_id: IntegratorId,
        name: String,
        event_types: BTreeSet<String>,
        at: DateTime<Utc>,
    },
    RegisterWebhook {
        webhook_id: WebhookId,
        url: Sealed,
        types: BTreeSet<String>,
        secret: Sealed,
        at: DateTime<Utc>,
    },
    /// Withdraws the key for good: it is refused from then on, and the integrator's
    /// webhooks stop.
    Disable { at: DateTime<Utc> },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum IntegratorEvent {
    IntegratorAdded {
        integrator_id: IntegratorId,
        name: String,
        event_types: BTreeSet<String>,
        added_at: DateTime<Utc>,
    },
    WebhookRegistered {
        integrator_id: IntegratorId,
        webhook_id: WebhookId,
        url: Sealed,
        types: BTreeSet<String>,
        secret: Sealed,
        registered_at: DateTime<Utc>,
    },
    IntegratorDisabled {
        integrator_id: IntegratorId,
        disabled_at: DateTime<Utc>,
    },
}

impl DomainEvent for IntegratorEvent {
    fn event_type(&self) -> String {
        match self {
            IntegratorEvent::IntegratorAdded { .. } => "IntegratorAdded",
            IntegratorEvent::WebhookRegistered { .. } => "WebhookRegistered",
            IntegratorEvent::IntegratorDisabled { .. } => "IntegratorDisabled",
        }
        .to_owned()
    }
    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IntegratorError {
    #[error("the integrator is already added")]
    AlreadyAdded,
    #[error("no such integrator")]
    NotFound,
    #[error("the integrator's key does not allow these event types")]
    TypesNotAllowed,
    #[error("name at least one event type")]
    NoTypes,
    #[error("the webhook is already registered")]
    WebhookExists,
    #[error("an integrator holds at most 20 webhooks")]
    TooManyWebhooks,
    #[error("the integrator's key is withdrawn")]
    Disabled,
}

impl Rule for IntegratorError {
    fn kind(&self) -> RuleKind {
        match self {
            IntegratorError::AlreadyAdded
            | IntegratorError::WebhookExists
            | IntegratorError::TooManyWebhooks
            | IntegratorError::Disabled => RuleKind::Conflict,
            IntegratorError::NotFound => RuleKind::NotFound,
            IntegratorError::TypesNotAllowed => RuleKind::Forbidden,
            IntegratorError::NoTypes => RuleKind::Unprocessable,
        }
    }
    fn code(&self) -> &'static str {
        match self {
            IntegratorError::AlreadyAdded => "integrator_already_added",
            IntegratorError::NotFound => "integrator_not_found",
            IntegratorError::TypesNotAllowed => "event_types_not_allowed",
            IntegratorError::NoTypes => "event_types_missing",
            IntegratorError::WebhookExists => "webhook_exists",
            IntegratorError::TooManyWebhooks => "too_many_webhooks",
            IntegratorError::Disabled => "integrator_disabled",
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Integrator {
    id: Option<IntegratorId>,
    event_types: BTreeSet<String>,
    webhooks: BTreeSet<WebhookId>,
    #[serde(default)]
    disabled: bool,
}

impl Integrator {
    /// The key was withdrawn.
    pub fn is_disabled(&self) -> bool {
        self.disabled
    }
    pub fn id(&self) -> Option<IntegratorId> {
        self.id
    }
    /// The event types the integrator's key may receive.
    pub fn event_types(&self) -> &BTreeSet<String> {
        &self.event_types
    }
    pub fn has_webhook(&self, webhook_id: WebhookId) -> bool {
        self.webhooks.contains(&webhook_id)
    }
}

impl Aggregate for Integrator {
    const TYPE: &'static str = "integrator";
    type Command = IntegratorCommand;
    type Event = IntegratorEvent;
    type Error = IntegratorError;
    type Services = ();

    async fn handle(
        &mut self,
        command: IntegratorCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), IntegratorError> {
        let event = match command {
            IntegratorCommand::Add {
                integrator_id,
                name,
                event_types,
                at,
            } => {
                if self.id.is_some() {
                    return Err(IntegratorError::AlreadyAdded);
                }
                if event_types.is_empty() {
                    return Err(IntegratorError::NoTypes);
                }
                IntegratorEvent::IntegratorAdded {
                    integrator_id,
                    name,
                    event_types,
                    added_at: at,
                }
            }
            IntegratorCommand::RegisterWebhook {
                webhook_id,
                url,
                types,
                secret,
                at,
            } => {
                let Some(integrator_id) = self.id else {
                    return Err(IntegratorError::NotFound);
                };
                if self.disabled {
                    return Err(IntegratorError::Disabled);
                }
                if types.is_empty() {
                    return Err(IntegratorError::NoTypes);
                }
                if !types.is_subset(&self.event_types) {
                    return Err(IntegratorError::TypesNotAllowed);
                }
                if self.webhooks.contains(&webhook_id) {
                    return Err(IntegratorError::WebhookExists);
                }
                if self.webhooks.len() >= MAX_WEBHOOKS {
                    return Err(IntegratorError::TooManyWebhooks);
                }
                IntegratorEvent::WebhookRegistered {
                    integrator_id,
                    webhook_id,
                    url,
                    types,
                    secret,
                    registered_at: at,
                }
            }
            IntegratorCommand::Disable { at } => {
                let Some(integrator_id) = self.id else {
                    return Err(IntegratorError::NotFound);
                };
                if self.disabled {
                    return Err(IntegratorError::Disabled);
                }
                IntegratorEvent::IntegratorDisabled {
                    integrator_id,
                    disabled_at: at,
                }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: IntegratorEvent) {
        match event {
            IntegratorEvent::IntegratorAdded {
                integrator_id,
                event_types,
                ..
            } => {
                self.id = Some(integrator_id);
                self.event_types = event_types;
            }
            IntegratorEvent::WebhookRegistered { webhook_id, .. } => {
                self.webhooks.insert(webhook_id);
            }
            IntegratorEvent::IntegratorDisabled { .. } => self.disabled = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    fn at() -> DateTime<Utc> {
        DateTime::from_timestamp(1_764_000_000, 0).unwrap_or_default()
    }

    fn types(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    fn added(id: IntegratorId) -> IntegratorEvent {
        IntegratorEvent::IntegratorAdded {
            integrator_id: id,
            name: "Claims Co".into(),
            event_types: types(&["RecordUploaded", "AccessApproved"]),
            added_at: at(),
        }
    }

    fn webhook(id: WebhookId, names: &[&str]) -> IntegratorCommand {
        IntegratorCommand::RegisterWebhook {
            webhook_id: id,
            url: Sealed::from_ciphertext("v1.url".into()),
            types: types(names),
            secret: Sealed::from_ciphertext("v1.secret".into()),
            at: at(),
        }
    }

    #[test]
    fn an_operator_adds_an_integrator_once_with_some_types() {
        let id = IntegratorId::new();
        TestFramework::<Integrator>::with(())
            .given_no_previous_events()
            .when(IntegratorCommand::Add {
                integrator_id: id,
                name: "Claims Co".into(),
                event_types: types(&["RecordUploaded", "AccessApproved"]),
                at: at(),
            })
            .then_expect_events(vec![added(id)]);
        TestFramework::<Integrator>::with(())
            .given(vec![added(id)])
            .when(IntegratorCommand::Add {
                integrator_id: id,
                name: "Again".into(),
                event_types: types(&["RecordUploaded"]),
                at: at(),
            })
            .then_expect_error(IntegratorError::AlreadyAdded);
        TestFramework::<Integrator>::with(())
            .given_no_previous_events()
            .when(IntegratorCommand::Add {
                integrator_id: id,
                name: "None".into(),
                event_types: BTreeSet::new(),
                at: at(),
            })
            .then_expect_error(IntegratorError::NoTypes);
    }

    #[test]
    fn a_withdrawn_key_registers_nothing_more_and_is_withdrawn_once() {
        let id = IntegratorId::new();
        let disabled = IntegratorEvent::IntegratorDisabled {
            integrator_id: id,
            disabled_at: at(),
        };
        TestFramework::<Integrator>::with(())
            .given(vec![added(id)])
            .when(IntegratorCommand::Disable { at: at() })
            .then_expect_events(vec![disabled.clone()]);
        TestFramework::<Integrator>::with(())
            .given(vec![added(id), disabled.clone()])
            .when(IntegratorCommand::Disable { at: at() })
            .then_expect_error(IntegratorError::Disabled);
        TestFramework::<Integrator>::with(())
            .given(vec![added(id), disabled])
            .when(webhook(WebhookId::new(), &["RecordUploaded"]))
            .then_expect_error(IntegratorError::Disabled);
    }

    #[test]
    fn a_webhook_receives_only_types_the_key_allows() {
        let id = IntegratorId::new();
        let hook = WebhookId::new();
        TestFramework::<Integrator>::with(())
            .given(vec![added(id)])
            .when(webhook(hook, &["RecordUploaded"]))
            .then_expect_events(vec![IntegratorEvent::WebhookRegistered {
                integrator_id: id,
                webhook_id: hook,
                url: Sealed::from_ciphertext("v1.url".into()),
                types: types(&["RecordUploaded"]),
                secret: Sealed::from_ciphertext("v1.secret".into()),
                registered_at: at(),
            }]);
        TestFramework::<Integrator>::with(())
            .given(vec![added(id)])
            .when(webhook(hook, &["RecordUploaded", "RecordAccessed"]))
            .then_expect_error(IntegratorError::TypesNotAllowed);
        TestFramework::<Integrator>::with(())
            .given(vec![added(id)])
            .when(webhook(hook, &[]))
            .then_expect_error(IntegratorError::NoTypes);
        TestFramework::<Integrator>::with(())
            .given_no_previous_events()
            .when(webhook(hook, &["RecordUploaded"]))
            .then_expect_error(IntegratorError::NotFound);
    }
}
