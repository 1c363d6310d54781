//! Audit anchors: the Merkle root of a range of the event log, published on chain.
//! One aggregate per range (`<from>-<to>`, ordinals in log order, 1-based), recorded
//! once by the chain adapter.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::access::ChainReceipt;
use crate::actor::Actor;
use crate::clock::Clock;
use crate::error::{Rule, RuleKind};

#[derive(Clone, Debug, PartialEq)]
pub enum AnchorCommand {
    Record {
        by: Actor,
        from: u64,
        to: u64,
        /// `0x…`, 32 bytes.
        root: String,
        receipt: ChainReceipt,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AnchorEvent {
    LogRangeAnchored {
        from: u64,
        to: u64,
        root: String,
        receipt: ChainReceipt,
        anchored_at: DateTime<Utc>,
    },
}

impl DomainEvent for AnchorEvent {
    fn event_type(&self) -> String {
        match self {
            AnchorEvent::LogRangeAnchored { .. } => "LogRangeAnchored".to_owned(),
        }
    }
    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AnchorError {
    #[error("only the platform records anchors")]
    NotAllowed,
    #[error("this range was anchored with another root")]
    RootMismatch,
}

impl Rule for AnchorError {
    fn kind(&self) -> RuleKind {
        match self {
            AnchorError::NotAllowed => RuleKind::Forbidden,
            AnchorError::RootMismatch => RuleKind::Conflict,
        }
    }
    fn code(&self) -> &'static str {
        match self {
            AnchorError::NotAllowed => "not_allowed",
            AnchorError::RootMismatch => "anchor_root_mismatch",
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LogAnchor {
    root: Option<String>,
}

impl LogAnchor {
    /// The aggregate id of a range.
    pub fn id(from: u64, to: u64) -> String {
        format!("{from}-{to}")
    }
}

impl Aggregate for LogAnchor {
    const TYPE: &'static str = "log_anchor";
    type Command = AnchorCommand;
    type Event = AnchorEvent;
    type Error = AnchorError;
    type Services = Arc<dyn Clock>;

    async fn handle(
        &mut self,
        command: AnchorCommand,
        clock: &Arc<dyn Clock>,
        sink: &EventSink<Self>,
    ) -> Result<(), AnchorError> {
        match command {
            AnchorCommand::Record {
                by,
                from,
                to,
                root,
                receipt,
            } => {
                if by != Actor::System {
                    return Err(AnchorError::NotAllowed);
                }
                match &self.root {
                    Some(existing) if *existing == root => return Ok(()),
                    Some(_) => return Err(AnchorError::RootMismatch),
                    None => {}
                }
                let event = AnchorEvent::LogRangeAnchored {
                    from,
                    to,
                    root,
                    receipt,
                    anchored_at: clock.now(),
                };
                sink.write(event, self).await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: AnchorEvent) {
        match event {
            AnchorEvent::LogRangeAnchored { root, .. } => self.root = Some(root),
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;
    use crate::access::tests::t0;
    use crate::clock::FixedClock;

    fn receipt() -> ChainReceipt {
        ChainReceipt {
            chain_id: 31337,
            contract: "0x01".into(),
            tx_hash: "0xaa".into(),
            block: 9,
        }
    }

    fn record(by: Actor, root: &str) -> AnchorCommand {
        AnchorCommand::Record {
            by,
            from: 1,
            to: 100,
            root: root.into(),
            receipt: receipt(),
        }
    }

    fn clock() -> Arc<dyn Clock> {
        Arc::new(FixedClock(t0()))
    }

    #[test]
    fn an_anchor_is_recorded_once_and_never_with_another_root() {
        let anchored = AnchorEvent::LogRangeAnchored {
            from: 1,
            to: 100,
            root: "0x11".into(),
            receipt: receipt(),
            anchored_at: t0(),
        };
        TestFramework::<LogAnchor>::with(clock())
            .given_no_previous_events()
            .when(record(Actor::System, "0x11"))
            .then_expect_events(vec![anchored.clone()]);
        TestFramework::<LogAnchor>::with(clock())
            .given(vec![anchored.clone()])
            .when(record(Actor::System, "0x11"))
            .then_expect_events(vec![]);
        TestFramework::<LogAnchor>::with(clock())
            .given(vec![anchored])
            .when(record(Actor::System, "0x22"))
            .then_expect_error(AnchorError::RootMismatch);
        TestFramework::<LogAnchor>::with(clock())
            .given_no_previous_events()
            .when(record(Actor::Auditor(crate::ids::StaffId::new()), "0x11"))
            .then_expect_error(AnchorError::NotAllowed);
    }
}
