//! The Session aggregate: a sign-in that a bearer token stands for. It starts with an
//! expiry and ends at sign-out; a token is valid only while its session is active.
//! Sessions live in the event store so that sign-ins and sign-outs are part of the
//! audited history and a sign-out holds across every API instance at once.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::actor::Actor;
use crate::clock::Clock;
use crate::error::{Rule, RuleKind};

#[derive(Clone, Debug, PartialEq)]
pub enum SessionCommand {
    Start {
        session_id: Uuid,
        holder: Actor,
        lifetime: Duration,
    },
    End {
        by: Actor,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SessionEvent {
    SessionStarted {
        session_id: Uuid,
        holder: Actor,
        started_at: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    },
    SessionEnded {
        session_id: Uuid,
        ended_at: DateTime<Utc>,
    },
}

impl DomainEvent for SessionEvent {
    fn event_type(&self) -> String {
        match self {
            SessionEvent::SessionStarted { .. } => "SessionStarted",
            SessionEvent::SessionEnded { .. } => "SessionEnded",
        }
        .to_owned()
    }
    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("this session already exists")]
    AlreadyStarted,
    #[error("no such session")]
    NotFound,
    #[error("the session has ended")]
    Ended,
    #[error("the session has expired")]
    Expired,
    #[error("only its holder may end a session")]
    NotTheHolder,
    #[error("a session must last between one minute and thirty days")]
    BadLifetime,
}

impl Rule for SessionError {
    fn kind(&self) -> RuleKind {
        match self {
            SessionError::NotFound => RuleKind::NotFound,
            SessionError::AlreadyStarted | SessionError::Ended | SessionError::Expired => {
                RuleKind::Conflict
            }
            SessionError::NotTheHolder => RuleKind::Forbidden,
            SessionError::BadLifetime => RuleKind::Unprocessable,
        }
    }
    fn code(&self) -> &'static str {
        match self {
            SessionError::AlreadyStarted => "session_already_started",
            SessionError::NotFound => "session_not_found",
            SessionError::Ended => "session_ended",
            SessionError::Expired => "session_expired",
            SessionError::NotTheHolder => "not_the_holder",
            SessionError::BadLifetime => "bad_session_lifetime",
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Session {
    id: Option<Uuid>,
    holder: Option<Actor>,
    expires_at: Option<DateTime<Utc>>,
    ended: bool,
}

impl Session {
    pub fn expires_at(&self) -> Option<DateTime<Utc>> {
        self.expires_at
    }

    /// The holder, if the session is active at `now`.
    pub fn active_holder(&self, now: DateTime<Utc>) -> Result<Actor, SessionError> {
        let (Some(holder), Some(expires_at)) = (self.holder, self.expires_at) else {
            return Err(SessionError::NotFound);
        };
        if self.ended {
            return Err(SessionError::Ended);
        }
        if expires_at <= now {
            return Err(SessionError::Expired);
        }
        Ok(holder)
    }
}

impl Aggregate for Session {
    const TYPE: &'static str = "session";
    type Command = SessionCommand;
    type Event = SessionEvent;
    type Error = SessionError;
    type Services = Arc<dyn Clock>;

    async fn handle(
        &mut self,
        command: SessionCommand,
        clock: &Arc<dyn Clock>,
        sink: &EventSink<Self>,
    ) -> Result<(), SessionError> {
        let now = clock.now();
        match command {
            SessionCommand::Start {
                session_id,
                holder,
                lifetime,
            } => {
                if self.id.is_some() {
                    return Err(SessionError::AlreadyStarted);
                }
                if lifetime < Duration::minutes(1) || lifetime > Duration::days(30) {
                    return Err(SessionError::BadLifetime);
                }
                let event = SessionEvent::SessionStarted {
                    session_id,
                    holder,
                    started_at: now,
                    expires_at: now + lifetime,
                };
                sink.write(event, self).await;
            }
            SessionCommand::End { by } => {
                let holder = self.active_holder(now)?;
                if holder != by {
                    return Err(SessionError::NotTheHolder);
                }
                let session_id = self.id.ok_or(SessionError::NotFound)?;
                let event = SessionEvent::SessionEnded {
                    session_id,
                    ended_at: now,
                };
                sink.write(event, self).await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: SessionEvent) {
        match event {
            SessionEvent::SessionStarted {
                session_id,
                holder,
                expires_at,
                ..
            } => {
                self.id = Some(session_id);
                self.holder = Some(holder);
                self.expires_at = Some(expires_at);
            }
            SessionEvent::SessionEnded { .. } => self.ended = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use cqrs_es::test::TestFramework;

    use super::*;
    use crate::clock::FixedClock;
    use crate::ids::PatientId;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 24, 9, 0, 0).unwrap()
    }

    fn clock(at: DateTime<Utc>) -> Arc<dyn Clock> {
        Arc::new(FixedClock(at))
    }

    fn started(id: Uuid, holder: Actor) -> SessionEvent {
        SessionEvent::SessionStarted {
            session_id: id,
            holder,
            started_at: t0(),
            expires_at: t0() + Duration::hours(8),
        }
    }

    #[test]
    fn a_sign_in_starts_a_session_that_expires() {
        let id = Uuid::new_v4();
        let holder = Actor::Patient(PatientId::new());
        TestFramework::<Session>::with(clock(t0()))
            .given_no_previous_events()
            .when(SessionCommand::Start {
                session_id: id,
                holder,
                lifetime: Duration::hours(8),
            })
            .then_expect_events(vec![started(id, holder)]);
    }

    #[test]
    fn a_session_lifetime_is_bounded() {
        TestFramework::<Session>::with(clock(t0()))
            .given_no_previous_events()
            .when(SessionCommand::Start {
                session_id: Uuid::new_v4(),
                holder: Actor::Patient(PatientId::new()),
                lifetime: Duration::days(31),
            })
            .then_expect_error(SessionError::BadLifetime);
    }

    #[test]
    fn the_holder_signs_out_once_and_nobody_else_can() {
        let id = Uuid::new_v4();
        let holder = Actor::Patient(PatientId::new());
        TestFramework::<Session>::with(clock(t0()))
            .given(vec![started(id, holder)])
            .when(SessionCommand::End { by: holder })
            .then_expect_events(vec![SessionEvent::SessionEnded {
                session_id: id,
                ended_at: t0(),
            }]);
        TestFramework::<Session>::with(clock(t0()))
            .given(vec![started(id, holder)])
            .when(SessionCommand::End {
                by: Actor::Patient(PatientId::new()),
            })
            .then_expect_error(SessionError::NotTheHolder);
        TestFramework::<Session>::with(clock(t0()))
            .given(vec![
                started(id, holder),
                SessionEvent::SessionEnded {
                    session_id: id,
                    ended_at: t0(),
                },
            ])
            .when(SessionCommand::End { by: holder })
            .then_expect_error(SessionError::Ended);
    }

    #[test]
    fn a_session_is_active_only_until_it_expires_or_ends() {
        let id = Uuid::new_v4();
        let holder = Actor::Patient(PatientId::new());
        let mut session = Session::default();
        assert_eq!(session.active_holder(t0()), Err(SessionError::NotFound));
        session.apply(started(id, holder));
        assert_eq!(session.active_holder(t0()), Ok(holder));
        assert_eq!(
            session.active_holder(t0() + Duration::hours(8)),
            Err(SessionError::Expired)
        );
        session.apply(SessionEvent::SessionEnded {
            session_id: id,
            ended_at: t0(),
        });
        assert_eq!(session.active_holder(t0()), Err(SessionError::Ended));
    }
}
