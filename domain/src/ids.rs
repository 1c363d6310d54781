//! Identifiers: UUID newtypes, one per kind of thing, so they cannot be mixed up.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A string was not a UUID.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} must be a UUID")]
pub struct IdError {
    pub kind: &'static str,
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A new random id.
            pub fn new() -> Self {
                Self(Uuid::new_v4())
            }
            pub fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }
            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
            pub fn parse(s: &str) -> Result<Self, IdError> {
                Uuid::parse_str(s.trim())
                    .map(Self)
                    .map_err(|_| IdError { kind: $kind })
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self(Uuid::nil())
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
    };
}

id_type!(
    /// A patient.
    PatientId,
    "patient_id"
);
id_type!(
    /// A doctor.
    DoctorId,
    "doctor_id"
);
id_type!(
    /// A registrar or auditor.
    StaffId,
    "staff_id"
);
id_type!(
    /// An integrator (a system that receives events through its API key).
    IntegratorId,
    "integrator_id"
);
id_type!(
    /// One of an integrator's webhooks.
    WebhookId,
    "webhook_id"
);
id_type!(
    /// A medical record.
    RecordId,
    "record_id"
);
id_type!(
    /// An access request (and the grant it becomes once approved).
    AccessRequestId,
    "request_id"
);
id_type!(
    /// A payment by M-Pesa.
    PaymentId,
    "payment_id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_uuids_and_refuse_anything_else() {
        let id = PatientId::new();
        assert_eq!(PatientId::parse(&id.to_string()), Ok(id));
        assert_eq!(
            PatientId::parse("not-a-uuid"),
            Err(IdError { kind: "patient_id" })
        );
    }
}
