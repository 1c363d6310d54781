//! Log anchors: the Merkle roots of ranges of the event log the chain adapter put on
//! chain.

use domain::actor::Actor;
use eventstore::{CommandMeta, CommandOutcome};

use super::{map, CommandError, Commands};

impl Commands {
    /// Records that the Merkle root of log ordinals `from..=to` is on chain
    /// (`LogRangeAnchored`). Idempotent. Only the chain adapter calls it.
    pub async fn record_anchor(
        &self,
        from: u64,
        to: u64,
        root: String,
        receipt: domain::access::ChainReceipt,
    ) -> Result<CommandOutcome, CommandError> {
        let id = domain::anchor::LogAnchor::id(from, to);
        let meta = CommandMeta::new(Actor::System.reference());
        self.store
            .execute::<domain::anchor::LogAnchor>(
                &self.anchors,
                &id,
                domain::anchor::AnchorCommand::Record {
                    by: Actor::System,
                    from,
                    to,
                    root,
                    receipt,
                },
                &self.clock,
                &meta,
            )
            .await
            .map_err(map)
    }
}
