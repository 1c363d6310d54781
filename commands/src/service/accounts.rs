//! Registrations of patients, doctors and staff, and the accounts they open (the
//! phone and password a holder signs in with).

use anyhow::Context;
use cqrs_es::Aggregate;
use domain::account::{Account, AccountCommand, AccountError};
use domain::actor::Actor;
use domain::doctor::DoctorCommand;
use domain::error::Rule;
use domain::ids::{DoctorId, PatientId, StaffId};
use domain::patient::PatientCommand;
use domain::staff::StaffCommand;
use domain::value::{BirthDate, LicenceNumber, Msisdn, Password, PersonName, StaffRole};
use eventstore::{AggregateStore, CommandMeta, CommandOutcome, ExecuteError};

use super::{id_of, map, CommandError, Commands, DoctorPersonal, Done, PatientPersonal};
use crate::credentials::hash_password;

/// What [`Commands::register_patient`] registers.
pub struct RegisterPatient<'a> {
    pub name: &'a PersonName,
    pub phone: &'a Msisdn,
    pub birth_date: &'a BirthDate,
    pub password: &'a Password,
}

/// What [`Commands::register_doctor`] registers.
pub struct RegisterDoctor<'a> {
    pub name: &'a PersonName,
    pub phone: &'a Msisdn,
    pub licence: LicenceNumber,
    pub password: &'a Password,
}

/// What [`Commands::register_staff`] registers.
pub struct RegisterStaff<'a> {
    pub role: StaffRole,
    pub name: &'a PersonName,
    pub phone: &'a Msisdn,
    pub password: &'a Password,
}

impl Commands {
    /// Refuses a registration whose phone already has an account, before anything is
    /// written. (The account itself is the guard: see [`Commands::open_account`].)
    async fn ensure_phone_free(&self, phone_index: &str) -> Result<(), CommandError> {
        let account = self
            .accounts
            .load(phone_index)
            .await
            .context("loading an account")?
            .aggregate;
        match account.holder() {
            Some(_) => Err(CommandError::rule(AccountError::PhoneTaken)),
            None => Ok(()),
        }
    }

    /// Opens the account that lets `holder` sign in with this phone and password. Under
    /// an idempotency key it runs at most once per request, and a retry after a crash
    /// between registration and account completes the account. A registration that
    /// loses a race for the phone to another one is erased (its key is shredded).
    async fn open_account(
        &self,
        phone_index: String,
        holder: Actor,
        password: &Password,
        meta: &CommandMeta,
    ) -> Result<CommandOutcome, CommandError> {
        // Clients' keys have no spaces, so a derived key never collides with one.
        let mut meta = meta.derived(" account");
        meta.actor = holder.reference();
        if let Some(outcome) = self
            .store
            .earlier_outcome::<AccountError>(&meta)
            .await
            .map_err(map)?
        {
            // The account this key opened answers only to its own password.
            return match self.holder_if_password(&phone_index, password).await? {
                Some(h) if h == holder => Ok(outcome),
                _ => Err(CommandError::KeyReused),
            };
        }
        let subject = holder.id_string();
        let phc = hash_password(password).await?;
        let command = AccountCommand::Open {
            phone_index: phone_index.clone(),
            holder,
            credential: self.seal_text(&subject, &phc).await?,
        };
        match self
            .store
            .execute::<Account>(&self.accounts, &phone_index, command, &(), &meta)
            .await
        {
            Ok(outcome) => Ok(outcome),
            Err(ExecuteError::Rejected(AccountError::PhoneTaken)) => {
                self.keys.shred(&subject).await?;
                tracing::warn!(subject = %holder.reference(), "registration lost a race for its phone; its personal data was erased");
                Err(CommandError::rule(AccountError::PhoneTaken))
            }
            Err(other) => Err(map(other)),
        }
    }

    /// The start of every registration: the id an earlier registration under `meta`'s
    /// key created (a retry), or `None` once the phone is known to be free.
    async fn begin_registration<Id: std::str::FromStr + Copy, E: Rule>(
        &self,
        phone_index: &str,
        meta: &CommandMeta,
    ) -> Result<Option<Id>, CommandError> {
        match self.store.earlier_outcome::<E>(meta).await.map_err(map)? {
            Some(outcome) => Ok(Some(id_of(&outcome, None)?)),
            None => {
                self.ensure_phone_free(phone_index).await?;
                Ok(None)
            }
        }
    }

    /// Appends a registration as its new subject `id` (the actor of its own sign-up).
    /// Answers with the subject's id: `id`, or, when a concurrent twin under the same
    /// key won, the twin's.
    async fn register<A, Id>(
        &self,
        events: &AggregateStore<A>,
        id: Id,
        holder: Actor,
        command: A::Command,
        meta: &CommandMeta,
    ) -> Result<Id, CommandError>
    where
        A: Aggregate<Services = ()> + Clone,
        A::Command: Clone,
        A::Error: Rule,
        Id: std::str::FromStr + Copy,
    {
        let mut meta = meta.clone();
        meta.actor = holder.reference();
        let outcome = self
            .store
            .execute::<A>(events, &holder.id_string(), command, &(), &meta)
            .await
            .map_err(map)?;
        Ok(id_of(&outcome, Some(id))?)
    }

    /// The end of every registration: the account that lets the subject sign in.
    async fn finish_registration<Id>(
        &self,
        id: Id,
        holder: Actor,
        phone_index: String,
        password: &Password,
        meta: &CommandMeta,
    ) -> Result<Done<Id>, CommandError> {
        let outcome = self
            .open_account(phone_index, holder, password, meta)
            .await?;
        Ok(Done { id, outcome })
    }

    /// Registers a patient and opens their account; personal fields are sealed under
    /// their new key. A phone that already has an account is refused (409).
    pub async fn register_patient(
        &self,
        input: RegisterPatient<'_>,
        meta: CommandMeta,
    ) -> Result<Done<PatientId>, CommandError> {
        let RegisterPatient {
            name,
            phone,
            birth_date,
            password,
        } = input;
        let phone_index = self.keys.phone_index(phone.as_str());
        let patient_id = match self
            .begin_registration::<PatientId, domain::patient::PatientError>(&phone_index, &meta)
            .await?
        {
            Some(id) => id,
            None => {
                let patient_id = PatientId::new();
                let personal = PatientPersonal {
                    name: name.as_str().to_owned(),
                    phone: phone.as_str().to_owned(),
                    birth_date: birth_date.to_string(),
                };
                let command = PatientCommand::Register {
                    patient_id,
                    personal: self.seal_json(&patient_id.to_string(), &personal).await?,
                    phone_index: phone_index.clone(),
                };
                self.register(
                    &self.patients,
                    patient_id,
                    Actor::Patient(patient_id),
                    command,
                    &meta,
                )
                .await?
            }
        };
        self.finish_registration(
            patient_id,
            Actor::Patient(patient_id),
            phone_index,
            password,
            &meta,
        )
        .await
    }

    /// Registers a doctor, unverified until a registrar verifies them, and opens their
    /// account.
    pub async fn register_doctor(
        &self,
        input: RegisterDoctor<'_>,
        meta: CommandMeta,
    ) -> Result<Done<DoctorId>, CommandError> {
        let RegisterDoctor {
            name,
            phone,
            licence,
            password,
        } = input;
        let phone_index = self.keys.phone_index(phone.as_str());
        let doctor_id = match self
            .begin_registration::<DoctorId, domain::doctor::DoctorError>(&phone_index, &meta)
            .await?
        {
            Some(id) => id,
            None => {
                let doctor_id = DoctorId::new();
                let personal = DoctorPersonal {
                    name: name.as_str().to_owned(),
                    phone: phone.as_str().to_owned(),
                };
                let command = DoctorCommand::Register {
                    doctor_id,
                    personal: self.seal_json(&doctor_id.to_string(), &personal).await?,
                    phone_index: phone_index.clone(),
                    licence,
                };
                self.register(
                    &self.doctors,
                    doctor_id,
                    Actor::Doctor(doctor_id),
                    command,
                    &meta,
                )
                .await?
            }
        };
        self.finish_registration(
            doctor_id,
            Actor::Doctor(doctor_id),
            phone_index,
            password,
            &meta,
        )
        .await
    }

    /// Registers a registrar or an auditor (operators only, from the command line) and
    /// opens their account.
    pub async fn register_staff(
        &self,
        input: RegisterStaff<'_>,
        meta: CommandMeta,
    ) -> Result<Done<StaffId>, CommandError> {
        let RegisterStaff {
            role,
            name,
            phone,
            password,
        } = input;
        let phone_index = self.keys.phone_index(phone.as_str());
        let staff_id = match self
            .begin_registration::<StaffId, domain::staff::StaffError>(&phone_index, &meta)
            .await?
        {
            Some(id) => id,
            None => {
                let staff_id = StaffId::new();
                let personal = DoctorPersonal {
                    name: name.as_str().to_owned(),
                    phone: phone.as_str().to_owned(),
                };
                let command = StaffCommand::Register {
                    staff_id,
                    role,
                    personal: self.seal_json(&staff_id.to_string(), &personal).await?,
                    phone_index: phone_index.clone(),
                };
                let holder = staff_actor(role, staff_id);
                self.register(&self.staff, staff_id, holder, command, &meta)
                    .await?
            }
        };
        self.finish_registration(
            staff_id,
            staff_actor(role, staff_id),
            phone_index,
            password,
            &meta,
        )
        .await
    }
}

fn staff_actor(role: StaffRole, id: StaffId) -> Actor {
    match role {
        StaffRole::Registrar => Actor::Registrar(id),
        StaffRole::Auditor => Actor::Auditor(id),
    }
}
