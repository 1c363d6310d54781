//! Who performs a command.

use serde::{Deserialize, Serialize};

use crate::ids::{DoctorId, IntegratorId, PatientId, StaffId};

/// The authenticated party behind a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum Actor {
    Patient(PatientId),
    Doctor(DoctorId),
    Registrar(StaffId),
    Auditor(StaffId),
    /// A system receiving events through an API key (never acts on records).
    Integrator(IntegratorId),
    /// The platform itself (expiry sweeps, adapters).
    System,
}

impl Actor {
    pub fn kind(&self) -> &'static str {
        match self {
            Actor::Patient(_) => "patient",
            Actor::Doctor(_) => "doctor",
            Actor::Registrar(_) => "registrar",
            Actor::Auditor(_) => "auditor",
            Actor::Integrator(_) => "integrator",
            Actor::System => "system",
        }
    }

    pub fn id_string(&self) -> String {
        match self {
            Actor::Patient(id) => id.to_string(),
            Actor::Doctor(id) => id.to_string(),
            Actor::Registrar(id) | Actor::Auditor(id) => id.to_string(),
            Actor::Integrator(id) => id.to_string(),
            Actor::System => "system".to_owned(),
        }
    }

    /// `kind:id`, the opaque form stored in event metadata.
    pub fn reference(&self) -> String {
        format!("{}:{}", self.kind(), self.id_string())
    }
}
