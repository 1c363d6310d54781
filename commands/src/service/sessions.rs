//! Sessions: sign-in with a phone and password, sign-out, and the bearer tokens that
//! stand for a session (or, for an integrator, its API key).

use anyhow::Context;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use chrono::{DateTime, Utc};
use domain::actor::Actor;
use domain::session::{Session, SessionCommand, SessionError};
use domain::value::{Msisdn, Password};
use eventstore::{CommandMeta, CommandOutcome};
use uuid::Uuid;

use super::integrators::KEY_PREFIX;
use super::{id_of, map, AuthError, CommandError, Commands};
use crate::credentials::{verify_nothing, verify_password};

/// A started session and the bearer token that stands for it.
#[derive(Clone)]
pub struct SignedIn {
    pub session_id: Uuid,
    /// Secret: never logged.
    pub token: String,
    pub holder: Actor,
    pub expires_at: DateTime<Utc>,
}

impl std::fmt::Debug for SignedIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedIn")
            .field("session_id", &self.session_id)
            .field("holder", &self.holder)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Who a valid bearer token speaks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Authenticated {
    pub session_id: Uuid,
    pub actor: Actor,
    pub expires_at: DateTime<Utc>,
}

/// Session tokens: `afy1.<session id>.<tag>`, the tag an HMAC of the session id under a
/// key derived from the master key. A token is checked without the database first (a
/// forged or foreign token is refused at once), then against its session.
const TOKEN_PREFIX: &str = "afy1.";
const TOKEN_TAG: &str = "session token";

impl Commands {
    /// Checks a phone and password against the phone's account and starts a session.
    /// Unknown phones and wrong passwords are refused alike, in the same time. The
    /// password is checked first, every time: a repeat under the same idempotency key
    /// then answers with the session the first attempt started.
    pub async fn sign_in(
        &self,
        phone: &Msisdn,
        password: &Password,
        lifetime: chrono::Duration,
        meta: CommandMeta,
    ) -> Result<SignedIn, CommandError> {
        let Some(holder) = self
            .holder_if_password(&self.keys.phone_index(phone.as_str()), password)
            .await?
        else {
            return Err(CommandError::BadCredentials);
        };
        if let Some(outcome) = self
            .store
            .earlier_outcome::<SessionError>(&meta)
            .await
            .map_err(map)?
        {
            let earlier = self.signed_in(id_of(&outcome, None)?).await?;
            // Keys are scoped to the phone; a session is only ever its holder's.
            if earlier.holder != holder {
                return Err(CommandError::KeyReused);
            }
            return Ok(earlier);
        }
        let session_id = Uuid::new_v4();
        let mut meta = meta;
        meta.actor = holder.reference();
        self.store
            .execute::<Session>(
                &self.sessions,
                &session_id.to_string(),
                SessionCommand::Start {
                    session_id,
                    holder,
                    lifetime,
                },
                &self.clock,
                &meta,
            )
            .await
            .map_err(map)?;
        self.signed_in(session_id).await
    }

    /// Who holds the phone's account, if `password` is its password. Unknown phones,
    /// erased holders and wrong passwords all take one Argon2 verification's time.
    pub(super) async fn holder_if_password(
        &self,
        phone_index: &str,
        password: &Password,
    ) -> Result<Option<Actor>, CommandError> {
        let account = self
            .accounts
            .load(phone_index)
            .await
            .context("loading an account")?
            .aggregate;
        let (Some(holder), Some(credential)) = (account.holder(), account.credential()) else {
            verify_nothing(password).await;
            return Ok(None);
        };
        // A shredded subject has no key left: it can no longer sign in.
        let Ok(phc) = self
            .keys
            .open(&holder.id_string(), credential.as_str())
            .await
        else {
            verify_nothing(password).await;
            return Ok(None);
        };
        let phc = String::from_utf8(phc).context("stored credential is not text")?;
        Ok(verify_password(phc, password).await.then_some(holder))
    }

    async fn signed_in(&self, session_id: Uuid) -> Result<SignedIn, CommandError> {
        let session = self.session(session_id).await?;
        let (Ok(holder), Some(expires_at)) =
            (session.active_holder(self.now()), session.expires_at())
        else {
            return Err(CommandError::rule(SessionError::Ended));
        };
        Ok(SignedIn {
            session_id,
            token: self.token_for(session_id),
            holder,
            expires_at,
        })
    }

    async fn session(&self, session_id: Uuid) -> anyhow::Result<Session> {
        Ok(self
            .sessions
            .load(&session_id.to_string())
            .await
            .context("loading a session")?
            .aggregate)
    }

    fn token_for(&self, session_id: Uuid) -> String {
        let id = session_id.simple().to_string();
        let tag = self.keys.tag(TOKEN_TAG, id.as_bytes());
        format!("{TOKEN_PREFIX}{id}.{}", B64URL.encode(tag))
    }

    /// Who a bearer token speaks for: its tag must verify (no database needed to refuse
    /// a forged or foreign token), then its session must be active now.
    pub async fn authenticate(&self, token: &str) -> Result<Authenticated, AuthError> {
        if let Some(key) = token.strip_prefix(KEY_PREFIX) {
            return self.authenticate_key(key).await;
        }
        let (id, tag) = token
            .strip_prefix(TOKEN_PREFIX)
            .and_then(|rest| rest.split_once('.'))
            .ok_or(AuthError::Malformed)?;
        let session_id = Uuid::try_parse(id).map_err(|_| AuthError::Malformed)?;
        let tag = B64URL.decode(tag).map_err(|_| AuthError::Malformed)?;
        if id.len() != 32 || !self.keys.verify_tag(TOKEN_TAG, id.as_bytes(), &tag) {
            return Err(AuthError::Forged);
        }
        let session = self.session(session_id).await?;
        match session.active_holder(self.now()) {
            Ok(actor) => Ok(Authenticated {
                session_id,
                actor,
                expires_at: session.expires_at().unwrap_or_else(|| self.now()),
            }),
            Err(SessionError::Expired) => Err(AuthError::Expired),
            Err(SessionError::Ended) => Err(AuthError::Ended),
            // A tag that verifies names a session this deployment started.
            Err(_) => Err(AuthError::Forged),
        }
    }

    /// Ends a session (sign-out): its token is refused from then on, by every instance.
    pub async fn sign_out(
        &self,
        session_id: Uuid,
        by: Actor,
        meta: CommandMeta,
    ) -> Result<CommandOutcome, CommandError> {
        self.store
            .execute::<Session>(
                &self.sessions,
                &session_id.to_string(),
                SessionCommand::End { by },
                &self.clock,
                &meta,
            )
            .await
            .map_err(map)
    }
}
