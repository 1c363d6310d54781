//! Marks approved access as expired once its time has passed. Reads use the clock
//! directly, so an expired grant is refused even before this runs; the sweep records
//! the fact (`AccessExpired`) for the history and the read models. The same sweep
//! expires idempotency keys older than a day.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use commands::{CommandError, Commands};
use domain::actor::Actor as Party;
use domain::ids::AccessRequestId;
use eventstore::CommandMeta;

const EVERY: Duration = Duration::from_secs(30);

/// How long an idempotency key answers for its first request (see
/// `Store::expire_idempotency_keys`).
const IDEMPOTENCY_KEY_TTL: Duration = Duration::from_secs(24 * 3600);

/// The sweeping actor.
pub struct ExpirySweeper {
    commands: Arc<Commands>,
    running: bool,
}

#[derive(Message)]
#[rtype(result = "()")]
struct Sweep;

/// Stops the sweep after the one in flight.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

impl ExpirySweeper {
    pub fn start(commands: Arc<Commands>) -> Addr<ExpirySweeper> {
        ExpirySweeper {
            commands,
            running: false,
        }
        .start()
    }
}

impl Actor for ExpirySweeper {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.notify(Sweep);
        ctx.run_interval(EVERY, |_, ctx| ctx.notify(Sweep));
    }
}

impl Handler<Sweep> for ExpirySweeper {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Sweep, _: &mut Self::Context) -> Self::Result {
        if self.running {
            return Box::pin(fut::ready(()));
        }
        self.running = true;
        let commands = self.commands.clone();
        Box::pin(
            async move {
                if let Err(error) = sweep(&commands).await {
                    tracing::warn!(error = format!("{error:#}"), "expiry sweep failed");
                }
                if let Err(error) = commands
                    .store()
                    .expire_idempotency_keys(IDEMPOTENCY_KEY_TTL)
                    .await
                {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "expiring idempotency keys failed"
                    );
                }
            }
            .into_actor(self)
            .map(|(), actor, _| actor.running = false),
        )
    }
}

impl Handler<Shutdown> for ExpirySweeper {
    type Result = ();

    fn handle(&mut self, _: Shutdown, ctx: &mut Self::Context) {
        ctx.stop();
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
