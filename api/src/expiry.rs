//! Marks approved access as expired once its time has passed. Reads use the clock
//! directly, so an expired grant is refused even before this runs; the sweep records
//! the fact (`AccessExpired`) for the history and the read models. The same sweep
//! expires idempotency keys older than a day.

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use commands::{CommandError, Commands};
use domain::actor::Actor as Party;
use domain::ids::AccessRequestId;
use eventstore::work::{self, Outcome, WorkerActor};
use eventstore::CommandMeta;

const EVERY: Duration = Duration::from_secs(30);

/// How long an idempotency key answers for its first request (see
/// `Store::expire_idempotency_keys`).
const IDEMPOTENCY_KEY_TTL: Duration = Duration::from_secs(24 * 3600);

/// The sweep, run by the work runtime: one active instance (lock `expiry_sweeper`).
pub struct ExpirySweep {
    commands: Arc<Commands>,
}

/// The sweeping actor.
pub type ExpirySweeper = WorkerActor<ExpirySweep>;

pub use eventstore::work::Stop;

/// Starts the sweep on the current arbiter: at once, then every 30 s.
pub fn start(commands: Arc<Commands>) -> Addr<ExpirySweeper> {
    let store = commands.store().clone();
    WorkerActor::launch(ExpirySweep { commands }, store, EVERY, None)
}

#[async_trait::async_trait(?Send)]
impl work::Worker for ExpirySweep {
    fn name(&self) -> &'static str {
        "expiry_sweeper"
    }

    async fn round(&self, _: &work::Round) -> anyhow::Result<Outcome> {
        if let Err(error) = sweep(&self.commands).await {
            tracing::warn!(error = format!("{error:#}"), "expiry sweep failed");
        }
        if let Err(error) = self
            .commands
            .store()
            .expire_idempotency_keys(IDEMPOTENCY_KEY_TTL)
            .await
        {
            tracing::warn!(
                error = format!("{error:#}"),
                "expiring idempotency keys failed"
            );
        }
        Ok(Outcome::Idle)
    }
}

async fn sweep(commands: &Commands) -> anyhow::Result<()> {
    let now = commands.now();
    let due = projections::queries::grants_due_to_expire(commands.store().any_pool(), now).await?;
    for request_id in due {
        let Ok(id) = AccessRequestId::parse(&request_id) else {
            continue;
        };
        let meta = CommandMeta::new(Party::System.reference())
            .with_idempotency_key(format!("system:expire:{id}"));
        match commands.expire_access(id, meta).await {
            Ok(_) => tracing::info!(request_id = %id, "access expired"),
            // Revoked or already expired meanwhile: nothing to do.
            Err(CommandError::Rejected { .. }) => {}
            Err(error) => return Err(anyhow::anyhow!(error)),
        }
    }
    Ok(())
}
