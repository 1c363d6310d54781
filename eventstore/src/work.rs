//! The one runtime of the background workers (the log's consumers, the storage
//! replicator, the chain writer, the M-Pesa worker, the webhook deliverers and their
//! supervisor, the live tail of the event streams, the expiry sweep): a [`Worker`]
//! says what one round of its work is; the [`WorkerActor`] drives it.
//!
//! The driver makes an exclusive worker the one active instance of its name (it takes
//! the worker's [`ConsumerLock`], checks it is still held between rounds, and stands
//! by while another instance holds it); a worker every instance runs for itself (a
//! live tail) takes no lock. It runs a round when woken (the progress of the log
//! consumer that feeds the worker, or every commit to the log), when asked
//! ([`Wake`]), on a poll interval, or at once when the last round left more due, never
//! two at a time; after a failed round it backs off, and on [`Stop`] it tells the
//! round in flight to let go (every step of a worker is idempotent), waits for it a
//! bounded time and releases the lock.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use async_trait::async_trait;
use tokio::sync::{watch, Mutex};

use crate::locks::ConsumerLock;
use crate::log::LogCursor;
use crate::store::Store;

/// How long a lock operation may take before it counts as failed.
const LOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Stop`] waits for the round in flight.
const STOP_WAIT: Duration = Duration::from_secs(15);
/// How soon a reader of the log looks again when committed events are held back
/// behind a running transaction (see [`Store::end_of_log`]).
pub const HELD_BACK_RETRY: Duration = Duration::from_millis(5);

/// What a round found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing more is due now: wait to be woken or for the poll.
    Idle,
    /// More is due at once (a full batch).
    More,
    /// Look again after this long (work held back behind a running transaction),
    /// or sooner when woken.
    After(Duration),
    /// An outside service is down: no round before this long, however often woken.
    Pause(Duration),
}

/// What a round can ask of the driver.
pub struct Round {
    stop: watch::Receiver<bool>,
    lock: Arc<Mutex<Option<ConsumerLock>>>,
    exclusive: bool,
}

impl Round {
    /// Whether the worker is stopping: a round looks between steps.
    pub fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Resolves when the worker is told to stop (to `select!` a long call against).
    pub async fn stopped(&self) {
        let mut stop = self.stop.clone();
        let _ = stop.wait_for(|s| *s).await;
    }

    /// Whether this instance still holds the worker's lock as far as is known without
    /// asking its session (the session's epoch): cheap enough before every step.
    pub async fn holds(&self) -> bool {
        !self.exclusive
            || self
                .lock
                .lock()
                .await
                .as_ref()
                .is_some_and(ConsumerLock::is_current)
    }

    /// Whether this instance still holds the worker's lock, asked before a step that
    /// must never run in two instances at once (a chain transaction and its nonce).
    pub async fn still_active(&self) -> bool {
        if !self.exclusive {
            return !self.stopping();
        }
        let mut lock = self.lock.lock().await;
        match lock.as_mut() {
            Some(held) => held.confirm().await,
            None => false,
        }
    }
}

impl Store {
    /// The outcome of a round of a reader of the log whose read after `cursor` found
    /// nothing: look again shortly when committed events are held back behind a
    /// running transaction ([`Store::log_held_back`]), or wait to be woken.
    pub async fn end_of_log(&self, cursor: LogCursor) -> anyhow::Result<Outcome> {
        Ok(if self.log_held_back(cursor).await? {
            Outcome::After(HELD_BACK_RETRY)
        } else {
            Outcome::Idle
        })
    }
}

/// Background work done in rounds by one active instance per name.
/// The futures run on the actor's arbiter, so they need not be `Send`.
#[async_trait(?Send)]
pub trait Worker: 'static {
    /// For the log, and the name of the lock that makes one instance active.
    fn name(&self) -> &str;
    /// Whether one instance of all those on a store does this work (holding the lock
    /// named [`Worker::name`]), or every instance its own (a live tail of its clients).
    fn exclusive(&self) -> bool {
        true
    }
    /// This instance has just become the active one (another may have worked
    /// meanwhile): recover what a killed run left, forget what was cached.
    async fn activate(&self) -> anyhow::Result<()> {
        Ok(())
    }
    /// One round of work.
    async fn round(&self, round: &Round) -> anyhow::Result<Outcome>;
    /// How long [`Stop`] waits for the round in flight before it is dropped: longer
    /// than any one step the worker must not be cut off in (an M-Pesa push).
    fn stop_grace(&self) -> Duration {
        STOP_WAIT
    }
}

/// What wakes a worker for a round, besides its poll and [`Wake`].
pub enum WakeOn {
    /// Nothing else.
    Nothing,
    /// The progress of the log consumer that feeds it.
    Progress(watch::Receiver<LogCursor>),
    /// Every commit to the log (by this process, or seen by its notifier).
    Commits,
}

impl From<Option<watch::Receiver<LogCursor>>> for WakeOn {
    fn from(progress: Option<watch::Receiver<LogCursor>>) -> WakeOn {
        progress.map_or(WakeOn::Nothing, WakeOn::Progress)
    }
}

/// Drives one [`Worker`] (see the module documentation).
pub struct WorkerActor<W: Worker> {
    worker: Rc<W>,
    store: Store,
    poll: Duration,
    wake: Option<WakeOn>,
    lock: Arc<Mutex<Option<ConsumerLock>>>,
    /// Held by the round in flight, so that [`Stop`] can wait for it.
    busy: Arc<Mutex<()>>,
    stop: watch::Sender<bool>,
    running: bool,
    again: bool,
    stopping: bool,
    paused_until: Option<Instant>,
    /// How it is doing, readable without a message ([`WorkerActor::launch_holding`]).
    status: watch::Sender<WorkerStatus>,
    /// Whether a commit or progress woke it during the round.
    woken: bool,
    /// Whether the lock was handed in by the launcher and the worker is still to be
    /// activated under it.
    handed_in: bool,
}

/// How a worker is doing, for `/readyz` and `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct WorkerStatus {
    /// This instance is the active one (another holds the lock otherwise): it took
    /// the lock, and held it after its last round.
    pub active: bool,
    /// The outside service it works against is down: its last round paused for it.
    pub outage: bool,
    /// Rounds failed in a row (its own database or a fault).
    pub failures: u32,
}

/// Asks a worker's driver for its [`WorkerStatus`] (answered at once, even while a
/// round runs).
#[derive(Message)]
#[rtype(result = "WorkerStatus")]
pub struct Status;

#[derive(Message)]
#[rtype(result = "()")]
struct Tick;

/// Let go of the round in flight, release the lock and stop.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stop;

/// Run a round now (after the round in flight, if any): there is work the worker's
/// wake-ups do not announce (an operator's replay request).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Wake;

impl<W: Worker> WorkerActor<W> {
    /// Starts `worker` on the current arbiter; a round runs when `wake` says, and
    /// every `poll`.
    pub fn launch(
        worker: W,
        store: Store,
        poll: Duration,
        wake: impl Into<WakeOn>,
    ) -> Addr<WorkerActor<W>> {
        Self::launch_holding(worker, store, poll, wake, None).0
    }

    /// Like [`WorkerActor::launch`], for a launcher that has taken the worker's lock
    /// already (`held`: the worker is active from the start, and activated in its
    /// first round) and that reads the driver's [`WorkerStatus`] without a message.
    pub fn launch_holding(
        worker: W,
        store: Store,
        poll: Duration,
        wake: impl Into<WakeOn>,
        held: Option<ConsumerLock>,
    ) -> (Addr<WorkerActor<W>>, watch::Receiver<WorkerStatus>) {
        let handed_in = held.is_some();
        let status = watch::channel(WorkerStatus {
            active: handed_in,
            ..WorkerStatus::default()
        })
        .0;
        let watched = status.subscribe();
        let addr = WorkerActor {
            worker: Rc::new(worker),
            store,
            poll,
            wake: Some(wake.into()),
            lock: Arc::new(Mutex::new(held)),
            busy: Arc::new(Mutex::new(())),
            stop: watch::channel(false).0,
            running: false,
            again: false,
            stopping: false,
            paused_until: None,
            status,
            woken: false,
            handed_in,
        }
        .start();
        (addr, watched)
    }
}

/// The pause after the `failures`-th failed round in a row: doubling from 200 ms, at
/// most 25.6 s (from the eighth on).
fn failure_backoff(failures: u32) -> Duration {
    Duration::from_millis((100u64 << failures.min(8)).min(30_000))
}

/// Takes the lock if this instance does not hold it, or checks it still holds
/// ([`ConsumerLock::is_held`]). `Ok(true)`: active, and just became so; `Ok(false)`:
/// active already, or standby (the lock is then `None`).
async fn hold(
    store: &Store,
    name: &str,
    lock: &Mutex<Option<ConsumerLock>>,
) -> anyhow::Result<bool> {
    let mut lock = lock.lock().await;
    if let Some(held) = lock.as_mut() {
        if held.is_held().await {
            return Ok(false);
        }
        tracing::warn!(worker = name, "lost the worker lock; standing by");
        *lock = None;
    }
    let taken = tokio::time::timeout(LOCK_TIMEOUT, ConsumerLock::try_take(store, name))
        .await
        .map_err(|_| anyhow::anyhow!("taking the {name} lock timed out"))??;
    let active = taken.is_some();
    *lock = taken;
    Ok(active)
}

impl<W: Worker> Actor for WorkerActor<W> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        match self.wake.take() {
            Some(WakeOn::Progress(progress)) => {
                ctx.add_stream(futures::stream::unfold(progress, |mut rx| async move {
                    rx.changed().await.ok()?;
                    Some(((), rx))
                }));
            }
            Some(WakeOn::Commits) => {
                let commits = self.store.notifier().subscribe();
                ctx.add_stream(futures::stream::unfold(commits, |mut rx| async move {
                    rx.changed().await.ok()?;
                    Some(((), rx))
                }));
            }
            Some(WakeOn::Nothing) | None => {}
        }
        ctx.run_interval(self.poll, |_, ctx| ctx.notify(Tick));
        ctx.notify(Tick);
    }
}

impl<W: Worker> StreamHandler<()> for WorkerActor<W> {
    fn handle(&mut self, _: (), ctx: &mut Self::Context) {
        // On standby, the lock is tried again on the poll, not on every commit (each
        // try is a statement on the lock session). During a round (the one that takes
        // the lock among them), the wake-up is kept for after it.
        if self.running {
            self.woken = true;
        } else if self.status.borrow().active || !self.worker.exclusive() {
            ctx.notify(Tick);
        }
    }

    fn finished(&mut self, _: &mut Self::Context) {}
}

impl<W: Worker> Handler<Wake> for WorkerActor<W> {
    type Result = ();

    fn handle(&mut self, _: Wake, ctx: &mut Self::Context) {
        // A pause for an outage or a back-off stands: the worker is woken after it.
        ctx.notify(Tick);
    }
}

impl<W: Worker> Handler<Tick> for WorkerActor<W> {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Tick, _: &mut Self::Context) -> Self::Result {
        if self.stopping
            || self
                .paused_until
                .is_some_and(|until| Instant::now() < until)
        {
            return Box::pin(fut::ready(()));
        }
        if self.running {
            self.again = true;
            return Box::pin(fut::ready(()));
        }
        self.running = true;
        self.paused_until = None;
        let worker = self.worker.clone();
        let store = self.store.clone();
        let lock = self.lock.clone();
        let busy = self.busy.clone();
        let exclusive = self.worker.exclusive();
        let round = Round {
            stop: self.stop.subscribe(),
            lock: lock.clone(),
            exclusive,
        };
        let handed_in = std::mem::take(&mut self.handed_in);
        let status = self.status.clone();
        Box::pin(
            async move {
                let _busy = busy.lock().await;
                if round.stopping() {
                    return Ok((Outcome::Idle, false));
                }
                if !exclusive {
                    let outcome = worker.round(&round).await?;
                    return Ok((outcome, true));
                }
                let name = worker.name();
                let taken = hold(&store, name, &lock).await?;
                if lock.lock().await.is_none() {
                    return Ok((Outcome::Idle, false));
                }
                if taken || handed_in {
                    if let Err(error) = worker.activate().await {
                        // Not active until activated: the lock goes, and is taken
                        // (and the activation tried) again after the back-off.
                        if let Some(held) = lock.lock().await.take() {
                            held.release().await;
                        }
                        return Err(error.context(format!("activating {name}")));
                    }
                    status.send_modify(|s| s.active = true);
                }
                let outcome = worker.round(&round).await?;
                let active = lock
                    .lock()
                    .await
                    .as_ref()
                    .is_some_and(ConsumerLock::is_current);
                Ok((outcome, active))
            }
            .into_actor(self)
            .map(|result: anyhow::Result<(Outcome, bool)>, actor, ctx| {
                actor.running = false;
                let mut again = std::mem::take(&mut actor.again);
                let woken = std::mem::take(&mut actor.woken);
                let name = actor.worker.name();
                match result {
                    Ok((outcome, active)) => {
                        actor.status.send_replace(WorkerStatus {
                            active,
                            outage: matches!(outcome, Outcome::Pause(_)),
                            failures: 0,
                        });
                        // A commit during the round counts only for an active worker:
                        // a standby one tries the lock on its poll.
                        again |= woken && (active || !actor.worker.exclusive());
                        match outcome {
                            Outcome::More => ctx.notify(Tick),
                            Outcome::Idle if again => ctx.notify(Tick),
                            Outcome::Idle => {}
                            Outcome::After(_) if again => ctx.notify(Tick),
                            Outcome::After(after) => {
                                ctx.notify_later(Tick, after);
                            }
                            Outcome::Pause(pause) => {
                                actor.paused_until = Some(Instant::now() + pause);
                                ctx.notify_later(Tick, pause);
                            }
                        }
                    }
                    Err(error) => {
                        // The round may have lost the lock, or failed to take it.
                        let active = actor.lock.try_lock().ok().map(|held| {
                            held.as_ref().is_some_and(ConsumerLock::is_current)
                                || !actor.worker.exclusive()
                        });
                        let mut failures = 0;
                        actor.status.send_modify(|s| {
                            s.active = active.unwrap_or(s.active);
                            s.failures = s.failures.saturating_add(1);
                            failures = s.failures;
                        });
                        let backoff = failure_backoff(failures);
                        if Store::is_unavailable(&error) {
                            tracing::warn!(
                                worker = name,
                                error = format!("{error:#}"),
                                ?backoff,
                                "event store unavailable; worker retrying"
                            );
                        } else {
                            tracing::error!(
                                worker = name,
                                error = format!("{error:#}"),
                                ?backoff,
                                "round failed; retrying"
                            );
                        }
                        actor.paused_until = Some(Instant::now() + backoff);
                        ctx.notify_later(Tick, backoff);
                    }
                }
            }),
        )
    }
}

impl<W: Worker> Handler<Status> for WorkerActor<W> {
    type Result = MessageResult<Status>;

    fn handle(&mut self, _: Status, _: &mut Self::Context) -> Self::Result {
        MessageResult(*self.status.borrow())
    }
}

impl<W: Worker> Handler<Stop> for WorkerActor<W> {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Stop, _: &mut Self::Context) -> Self::Result {
        self.stopping = true;
        self.stop.send_replace(true);
        let (lock, busy) = (self.lock.clone(), self.busy.clone());
        let grace = self.worker.stop_grace();
        Box::pin(
            async move {
                // The round in flight sees `stop` and returns; if it does not in time,
                // the lock is left held, and goes when the actor is dropped (with the
                // process at the latest).
                if let Ok(_idle) = tokio::time::timeout(grace, busy.lock()).await {
                    if let Some(held) = lock.lock().await.take() {
                        held.release().await;
                    }
                }
            }
            .into_actor(self)
            .map(|(), actor, ctx| {
                actor.status.send_modify(|s| s.active = false);
                ctx.stop();
            }),
        )
    }
}
