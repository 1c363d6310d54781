//! What integrators receive: the public view of events ([`view`]) and signed webhook
//! deliveries ([`webhook`]).

pub mod view;
pub mod webhook;

pub use view::{event_types, public_view, IntegratorEvent};
pub use webhook::{DelivererHandle, DeliverySettings, Failure, WebhookSpec};
