//! What integrators receive: the public view of events ([`view`]) and signed webhook
//! deliveries ([`webhook`]) to the addresses [`address`] allows.

pub mod address;
pub mod view;
pub mod webhook;

pub use address::AddressPolicy;
pub use view::{event_types, public_view, IntegratorEvent};
pub use webhook::{
    DelivererHandle, DelivererProbe, DelivererStatus, DeliveryError, DeliverySettings, Failure,
    WebhookSpec,
};
