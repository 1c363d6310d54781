//! Doctors after registration: a registrar verifies or suspends them; their names.

use domain::doctor::{Doctor, DoctorCommand};
use domain::ids::{DoctorId, StaffId};
use eventstore::{CommandMeta, CommandOutcome};

use super::{map, CommandError, Commands, DoctorPersonal};

impl Commands {
    pub async fn verify_doctor(
        &self,
        doctor_id: DoctorId,
        by: StaffId,
        meta: CommandMeta,
    ) -> Result<CommandOutcome, CommandError> {
        self.store
            .execute::<Doctor>(
                &self.doctors,
                &doctor_id.to_string(),
                DoctorCommand::Verify { by },
                &(),
                &meta,
            )
            .await
            .map_err(map)
    }

    pub async fn suspend_doctor(
        &self,
        doctor_id: DoctorId,
        by: StaffId,
        reason: Option<&str>,
        meta: CommandMeta,
    ) -> Result<CommandOutcome, CommandError> {
        let reason = self.seal_optional(&doctor_id.to_string(), reason).await?;
        self.store
            .execute::<Doctor>(
                &self.doctors,
                &doctor_id.to_string(),
                DoctorCommand::Suspend { by, reason },
                &(),
                &meta,
            )
            .await
            .map_err(map)
    }

    /// A doctor's name, opened from their sealed personal fields (never the phone).
    pub async fn doctor_name(&self, doctor_id: &str, personal_sealed: &str) -> Option<String> {
        let text = self.open_text(doctor_id, personal_sealed).await?;
        serde_json::from_str::<DoctorPersonal>(&text)
            .ok()
            .map(|p| p.name)
    }
}
