//! The actor both adapters' workers run in: a round of work when woken (a consumer's
//! progress), on a poll interval, or at once after a round that left more due; never
//! two rounds at a time; on [`Stop`], the round in flight drops its calls (every step
//! of the adapters is idempotent) and the worker's consumer lock is released.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use async_trait::async_trait;
use eventstore::{ConsumerLock, LogCursor};
use tokio::sync::{watch, Mutex};

/// Work done in rounds.
/// The futures run on the actor's arbiter, so they need not be `Send`.
#[async_trait(?Send)]
pub trait Rounds: Send + Sync + 'static {
    /// For the log: which worker failed.
    fn name(&self) -> &'static str;
    /// One round; `Ok(true)`: more is due at once.
    async fn round(&self) -> anyhow::Result<bool>;
    /// Makes the round in flight give up and releases the consumer lock.
    async fn stop(&self);
}

/// Sets `stop`, waits (a bounded time) for the round in flight to let go of `state`,
/// and releases the lock `lock_of` finds there; if the state stays held, the lock
/// goes with the process.
pub(crate) async fn stop_and_release<S: Send>(
    stop: &watch::Sender<bool>,
    state: &Mutex<S>,
    lock_of: fn(&mut S) -> &mut Option<ConsumerLock>,
) {
    stop.send_replace(true);
    if let Ok(mut state) = tokio::time::timeout(Duration::from_secs(15), state.lock()).await {
        if let Some(lock) = lock_of(&mut state).take() {
            lock.release().await;
        }
    }
}

/// The actor running a [`Rounds`] worker.
pub struct RoundActor<W: Rounds> {
    worker: Arc<W>,
    poll: Duration,
    wake: Option<watch::Receiver<LogCursor>>,
    running: bool,
    again: bool,
    stopping: bool,
}

#[derive(Message)]
#[rtype(result = "()")]
struct Tick;

/// Finish (or drop) the round in flight, release the lock and stop.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stop;

impl<W: Rounds> RoundActor<W> {
    /// Starts `worker` on the current arbiter; `wake` follows the consumer that feeds it.
    pub(crate) fn launch(
        worker: W,
        poll: Duration,
        wake: Option<watch::Receiver<LogCursor>>,
    ) -> Addr<RoundActor<W>> {
        RoundActor {
            worker: Arc::new(worker),
            poll,
            wake,
            running: false,
            again: false,
            stopping: false,
        }
        .start()
    }
}

impl<W: Rounds> Actor for RoundActor<W> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some(wake) = self.wake.take() {
            ctx.add_stream(futures::stream::unfold(wake, |mut rx| async move {
                rx.changed().await.ok()?;
                Some(((), rx))
            }));
        }
        ctx.run_interval(self.poll, |_, ctx| ctx.notify(Tick));
        ctx.notify(Tick);
    }
}

impl<W: Rounds> StreamHandler<()> for RoundActor<W> {
    fn handle(&mut self, _: (), ctx: &mut Self::Context) {
        ctx.notify(Tick);
    }

    fn finished(&mut self, _: &mut Self::Context) {}
}

impl<W: Rounds> Handler<Tick> for RoundActor<W> {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Tick, _: &mut Self::Context) -> Self::Result {
        if self.stopping {
            return Box::pin(fut::ready(()));
        }
        if self.running {
            self.again = true;
            return Box::pin(fut::ready(()));
        }
        self.running = true;
        let worker = self.worker.clone();
        Box::pin(
            async move { (worker.name(), worker.round().await) }
                .into_actor(self)
                .map(|(name, result), actor, ctx| {
                    actor.running = false;
                    let again = std::mem::take(&mut actor.again);
                    match result {
                        Ok(true) => ctx.notify(Tick),
                        Ok(false) if again => ctx.notify(Tick),
                        Ok(false) => {}
                        Err(error) => {
                            tracing::error!(
                                worker = name,
                                error = format!("{error:#}"),
                                "round failed; retrying"
                            );
                        }
                    }
                }),
        )
    }
}

impl<W: Rounds> Handler<Stop> for RoundActor<W> {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Stop, _: &mut Self::Context) -> Self::Result {
        self.stopping = true;
        let worker = self.worker.clone();
        Box::pin(
            async move { worker.stop().await }
                .into_actor(self)
                .map(|(), _, ctx| ctx.stop()),
        )
    }
}
