//! Payments from the log to the customer's phone, and back.
//!
//! [`PaymentIntake`] (log consumer `mpesa_intake`) lists every `PaymentRequested` in
//! the job queue (worker `mpesa`), in the transaction that moves its checkpoint. The [`Worker`] (one
//! active instance, lock `mpesa_worker`) pushes each listed payment at most once:
//!
//! 1. the job is marked `sending` before the STK Push leaves, so a run killed while it
//!    is out never sends it again;
//! 2. Daraja's acceptance is recorded (`StkPushAccepted`), or its refusal
//!    (`StkPushFailed` with Daraja's code and message);
//! 3. Daraja down (no connection, a 5xx): the job waits with a growing pause and the
//!    payment stays pending; nothing was pushed;
//! 4. no answer to a push that may have reached Daraja, or a job found `sending` after
//!    a restart: recorded as failed (`unknown_outcome`) and never sent again, so nobody
//!    is asked to pay twice; a callback for it is kept as a rejected callback.
//!
//! The same worker reconciles: a payment pushed longer than `reconcile_after` ago and
//! still pending is asked about (STK Push Query) and settled from the answer
//! (`PaymentReconciled`), since callbacks can be late or never come. Only Daraja's
//! own answer settles it: while Daraja cannot say (down, rate-limiting, refusing the
//! question, still processing), the payment stays pending and is asked about again
//! after a pause that grows to about an hour, for as long as it takes. It is never
//! failed for want of an answer, since the customer may have paid.

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use anyhow::Context as _;
use async_trait::async_trait;
use commands::Commands;
use domain::actor::Actor;
use domain::ids::PaymentId;
use domain::payment::{PaymentCommand, SettledBy};
use eventstore::consumer::ReadModelTx;
use eventstore::jobs::{self, Job};
use eventstore::work::{self, Outcome, WorkerActor};
use eventstore::{Backend, LogHandler, Store, StoredEvent};
use tokio::sync::watch;

use crate::daraja::{Daraja, DarajaError, StkPush, StkStatus};

/// The worker's consumer lock.
pub const LOCK_NAME: &str = "mpesa_worker";

/// The worker's name in the job queue.
pub const WORKER: &str = "mpesa";

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The payment whose accepted push Daraja gave `checkout_request_id`, as the worker
/// kept it before recording the acceptance (so a callback finds its payment even
/// before the read models have caught up).
pub async fn checkout_payment(
    pool: &sqlx::AnyPool,
    checkout_request_id: &str,
) -> anyhow::Result<Option<String>> {
    sqlx::query_scalar("SELECT payment_id FROM mpesa_checkouts WHERE checkout_request_id = $1")
        .bind(checkout_request_id.to_owned())
        .fetch_optional(pool)
        .await
        .context("looking up a kept CheckoutRequestID")
}

/// The worker actor.
pub type MpesaWorker = WorkerActor<Worker>;

pub use eventstore::work::Stop;

#[async_trait(?Send)]
impl work::Worker for Worker {
    fn name(&self) -> &'static str {
        LOCK_NAME
    }

    async fn activate(&self) -> anyhow::Result<()> {
        tracing::info!("M-Pesa worker active");
        adopt_old_jobs(&self.store).await?;
        self.recover().await
    }

    /// A push in flight is never cut off by a shutdown: longer than its calls (a
    /// token, a second one after a 401, the push), each with all its attempts and the
    /// pauses between them, may take.
    fn stop_grace(&self) -> Duration {
        let config = self.daraja.config();
        let attempts = config.attempts.max(1);
        let pauses = config
            .backoff
            .saturating_mul(2u32.saturating_pow(attempts).saturating_sub(1));
        let call = config
            .timeout
            .saturating_mul(attempts)
            .saturating_add(pauses);
        call.saturating_mul(3)
            .saturating_add(Duration::from_secs(5))
    }

    /// Not cancelled mid-push: a push cut short would leave its fate unknown. The
    /// round looks at `stop` between payments.
    async fn round(&self, round: &work::Round) -> anyhow::Result<Outcome> {
        if self.push_round(round).await? {
            Ok(Outcome::Idle)
        } else {
            // Daraja is down: look again at the next poll.
            Ok(Outcome::Pause(self.settings.poll))
        }
    }
}

/// Starts the worker on the current arbiter; `wake` (the intake's progress) starts a
/// round at once, and one runs every `settings.poll`.
pub fn start(
    store: Store,
    commands: Arc<Commands>,
    daraja: Arc<Daraja>,
    settings: WorkerSettings,
    wake: Option<watch::Receiver<eventstore::LogCursor>>,
) -> Addr<MpesaWorker> {
    let poll = settings.poll;
    let worker = Worker::new(store.clone(), commands, daraja, settings);
    WorkerActor::launch(worker, store, poll, wake)
}

/// Moves the work list of versions before the shared job queue (`mpesa_jobs`) into it.
async fn adopt_old_jobs(store: &Store) -> anyhow::Result<u64> {
    jobs::adopt(
        store.any_pool(),
        store.backend(),
        "mpesa_jobs",
        "SELECT 'mpesa', 'push', payment_id, NULL, NULL, position, state, attempts, \
         next_attempt_at, last_error, '' FROM mpesa_jobs",
    )
    .await
}

/// Lists requested payments for the worker.
pub struct PaymentIntake;

#[async_trait]
impl LogHandler for PaymentIntake {
    fn name(&self) -> &str {
        "mpesa_intake"
    }

    /// An intake: it queues work, which a rebuild keeps.
    fn kind(&self) -> eventstore::Kind {
        eventstore::Kind::Reactor
    }

    fn schema(&self, _: Backend) -> Vec<String> {
        vec![
            // Daraja's CheckoutRequestID of each accepted push, written before the
            // acceptance is recorded: the callback finds its payment here at once, and a
            // run that died before recording the acceptance records it after.
            "CREATE TABLE IF NOT EXISTS mpesa_checkouts (
                checkout_request_id TEXT PRIMARY KEY,
                merchant_request_id TEXT NOT NULL,
                payment_id TEXT NOT NULL UNIQUE
            )"
            .into(),
            // When each overdue payment may be asked about again (STK Push Query).
            "CREATE TABLE IF NOT EXISTS mpesa_queries (
                payment_id TEXT PRIMARY KEY,
                attempts BIGINT NOT NULL,
                next_query_at BIGINT NOT NULL
            )"
            .into(),
        ]
    }

    /// The work list is delivery state: a rebuild keeps it.
    fn tables(&self) -> Vec<String> {
        Vec::new()
    }

    async fn apply(&self, tx: &mut ReadModelTx, event: &StoredEvent) -> anyhow::Result<()> {
        if event.aggregate_type != "payment" || event.event_type != "PaymentRequested" {
            return Ok(());
        }
        jobs::enqueue_event(&mut **tx, WORKER, "push", &event.aggregate_id, event)
            .await
            .context("listing a payment to push")?;
        Ok(())
    }
}

/// How the worker runs.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    /// How often it looks for work without being woken.
    pub poll: Duration,
    /// Pending payments pushed longer ago than this are asked about.
    pub reconcile_after: Duration,
}

/// Pushes listed payments and reconciles late ones (see the module documentation).
pub struct Worker {
    store: Store,
    commands: Arc<Commands>,
    daraja: Arc<Daraja>,
    settings: WorkerSettings,
}

const MIN_PAUSE: Duration = Duration::from_secs(1);
const MAX_PAUSE: Duration = Duration::from_secs(60);

/// The longest pause between two STK Push Queries about one payment Daraja has not
/// told about yet (still processing, down, rate-limiting or timing out): it is asked
/// about again at least this often, for as long as it stays pending.
const MAX_QUERY_PAUSE: Duration = Duration::from_secs(3600);

/// The pause before a payment is asked about again after Daraja refused the question
/// (a 4xx that is not a 429 or 408): an operator may be fixing the cause (a passkey,
/// the app's products), but Daraja is not asked over and over meanwhile.
const REFUSED_PAUSE: Duration = Duration::from_secs(3600);

impl Worker {
    pub fn new(
        store: Store,
        commands: Arc<Commands>,
        daraja: Arc<Daraja>,
        settings: WorkerSettings,
    ) -> Worker {
        Worker {
            store,
            commands,
            daraja,
            settings,
        }
    }

    /// Jobs a killed run left `sending`: the push may have reached Daraja, so it is
    /// never sent again; the payment is recorded as failed with an unknown outcome.
    async fn recover(&self) -> anyhow::Result<()> {
        let stuck = jobs::in_state(self.store.any_pool(), WORKER, "sending").await?;
        for job in stuck {
            if self.record_known_checkout(&job).await? {
                continue;
            }
            tracing::warn!(payment_id = %job.subject, "an STK Push was out when the last run stopped; not sending it again");
            self.fail_unknown(&job, "the last run stopped while the STK Push was out")
                .await?;
        }
        Ok(())
    }

    /// One round; `false` when Daraja was found unavailable.
    async fn push_round(&self, round: &work::Round) -> anyhow::Result<bool> {
        let pool = self.store.any_pool();
        // Acceptances a failed write left unrecorded.
        for job in jobs::in_state(pool, WORKER, "sending").await? {
            self.record_known_checkout(&job).await?;
        }
        let due = jobs::due(pool, WORKER, None, 32).await?;
        for job in due {
            // Never two instances pushing: a standby that took over would find this
            // push `sending` and call its outcome unknown.
            if !round.still_active().await || round.stopping() {
                return Ok(true);
            }
            match self.push(&job).await {
                Ok(true) => {}
                // Daraja is down: the rest waits too.
                Ok(false) => return Ok(false),
                Err(error) => {
                    // One payment's trouble holds up no other: it waits a while.
                    let error = format!("{error:#}");
                    tracing::warn!(payment_id = %job.subject, error = %error, "pushing a payment failed; it waits");
                    self.put_off(&job, &error, "pending").await?;
                }
            }
        }
        if round.stopping() {
            return Ok(true);
        }
        self.reconcile().await?;
        Ok(true)
    }

    /// Puts a job in state `from` back to `pending`, due after a pause that grows with
    /// its attempts; returns the pause. A job in another state is left alone.
    async fn put_off(&self, job: &Job, error: &str, from: &str) -> anyhow::Result<Duration> {
        let attempts = job.attempts + 1;
        let pause = MIN_PAUSE
            .saturating_mul(1 << attempts.clamp(0, 6) as u32)
            .min(MAX_PAUSE);
        let mut held = job.clone();
        held.state = from.to_owned();
        let outcome = jobs::Outcome {
            state: "pending",
            attempts,
            next_attempt_at: jobs::after(pause),
            error,
        };
        if !jobs::record(self.store.any_pool(), &held, &outcome).await? {
            // Out of the door already (`sending`): whether Daraja took it is settled
            // by the query, never by a second push.
            tracing::debug!(payment_id = %job.subject, from, "the job is no longer {from}; left as it is");
        }
        Ok(pause)
    }

    /// Records the acceptance of a push whose CheckoutRequestID was kept but not
    /// recorded; `false` if none was kept.
    async fn record_known_checkout(&self, job: &Job) -> anyhow::Result<bool> {
        let kept: Option<(String, String)> = sqlx::query_as(
            "SELECT checkout_request_id, merchant_request_id FROM mpesa_checkouts \
             WHERE payment_id = $1",
        )
        .bind(job.subject.clone())
        .fetch_optional(self.store.any_pool())
        .await
        .context("reading a kept CheckoutRequestID")?;
        let Some((checkout_request_id, merchant_request_id)) = kept else {
            return Ok(false);
        };
        let payment_id = PaymentId::parse(&job.subject)
            .map_err(|_| anyhow::anyhow!("a listed payment id is not an id"))?;
        self.accept(payment_id, merchant_request_id, checkout_request_id)
            .await?;
        self.finish(job).await?;
        Ok(true)
    }

    async fn accept(
        &self,
        payment_id: PaymentId,
        merchant_request_id: String,
        checkout_request_id: String,
    ) -> anyhow::Result<()> {
        let accepted = PaymentCommand::AcceptPush {
            by: Actor::System,
            merchant_request_id,
            checkout_request_id,
        };
        self.record_push(payment_id, accepted).await
    }

    /// Pushes one payment; `false` when Daraja is unavailable.
    async fn push(&self, job: &Job) -> anyhow::Result<bool> {
        let pool = self.store.any_pool();
        let payment_id = PaymentId::parse(&job.subject)
            .map_err(|_| anyhow::anyhow!("a listed payment id is not an id"))?;
        let Some(payment) = self.commands.payment(payment_id).await? else {
            self.finish(job).await?;
            return Ok(true);
        };
        if payment.pushed() {
            self.finish(job).await?;
            return Ok(true);
        }
        let Ok(phone) = self.commands.payment_phone(payment_id).await else {
            // The payer was erased: there is no number to ask any more.
            self.fail_push(
                payment_id,
                "phone_unavailable".into(),
                "the payer's number can no longer be read".into(),
            )
            .await?;
            self.finish(job).await?;
            return Ok(true);
        };
        // Out of the door: from here on, never again.
        if !jobs::mark(pool, job, "sending").await? {
            return Ok(true);
        }
        let reference = job.subject.replace('-', "");
        let push = StkPush {
            amount_kes: payment.amount_kes(),
            phone,
            account_reference: reference.chars().take(12).collect(),
            description: "AfyaChain fee".into(),
        };
        match self.daraja.stk_push(&push).await {
            Ok(accepted) => {
                // Kept first: if recording the acceptance fails, the next round (or
                // run) records it from here rather than calling the push unknown.
                sqlx::query(
                    "INSERT INTO mpesa_checkouts (checkout_request_id, merchant_request_id, \
                     payment_id) VALUES ($1, $2, $3) ON CONFLICT (checkout_request_id) DO NOTHING",
                )
                .bind(accepted.checkout_request_id.clone())
                .bind(accepted.merchant_request_id.clone())
                .bind(job.subject.clone())
                .execute(pool)
                .await
                .context("keeping a CheckoutRequestID")?;
                self.accept(
                    payment_id,
                    accepted.merchant_request_id,
                    accepted.checkout_request_id,
                )
                .await?;
                tracing::info!(payment_id = %payment_id, "STK Push accepted");
                self.finish(job).await?;
                Ok(true)
            }
            Err(DarajaError::Rejected {
                status,
                code,
                message,
            }) => {
                tracing::warn!(payment_id = %payment_id, status, code = %code, message = %message, "Daraja refused the STK Push");
                let code = if code.is_empty() {
                    status.to_string()
                } else {
                    code
                };
                self.fail_push(payment_id, code, message).await?;
                self.finish(job).await?;
                Ok(true)
            }
            Err(DarajaError::Unavailable(error)) => {
                // Nothing was pushed: the job goes back from `sending` to wait.
                let pause = self.put_off(job, &error, "sending").await?;
                tracing::warn!(payment_id = %payment_id, attempts = job.attempts + 1, error = %error, ?pause, "Daraja unavailable; the payment stays pending");
                Ok(false)
            }
            Err(DarajaError::Unknown(error)) => {
                tracing::warn!(payment_id = %payment_id, error = %error, "no answer to an STK Push that may have gone out; not sending it again");
                self.fail_unknown(job, &error).await?;
                Ok(true)
            }
        }
    }

    async fn fail_unknown(&self, job: &Job, why: &str) -> anyhow::Result<()> {
        let payment_id = PaymentId::parse(&job.subject)
            .map_err(|_| anyhow::anyhow!("a listed payment id is not an id"))?;
        self.fail_push(payment_id, "unknown_outcome".into(), why.to_owned())
            .await?;
        self.finish(job).await
    }

    /// Records that the STK Push could not be made (`StkPushFailed`).
    async fn fail_push(
        &self,
        payment_id: PaymentId,
        error_code: String,
        error_message: String,
    ) -> anyhow::Result<()> {
        let failed = PaymentCommand::FailPush {
            by: Actor::System,
            error_code,
            error_message,
        };
        self.record_push(payment_id, failed).await
    }

    /// Records what became of a push; one recorded already (accepted or failed, by an
    /// earlier run) is left as it is.
    async fn record_push(
        &self,
        payment_id: PaymentId,
        outcome: PaymentCommand,
    ) -> anyhow::Result<()> {
        match self.commands.payment_command(payment_id, outcome).await {
            Ok(_)
            | Err(commands::CommandError::Rejected {
                code: "payment_already_pushed",
                ..
            }) => Ok(()),
            Err(other) => Err(anyhow::anyhow!(other)),
        }
    }

    async fn finish(&self, job: &Job) -> anyhow::Result<()> {
        jobs::finish(self.store.any_pool(), job)
            .await
            .context("finishing a payment job")
    }

    /// Asks Daraja about payments whose callback is overdue, and settles them as Daraja
    /// says. Each is asked again only after a pause growing to [`MAX_QUERY_PAUSE`]
    /// (still processing, Daraja down, rate-limiting or timing out), or
    /// [`REFUSED_PAUSE`] after Daraja refused the question (another 4xx), so a few old
    /// payments neither crowd out newer ones nor flood Daraja. None is ever given up
    /// on or failed without Daraja's answer: a payment whose callback was lost or
    /// forged may have been paid, and stays pending (visible as such) until Daraja
    /// says how it ended.
    async fn reconcile(&self) -> anyhow::Result<()> {
        let pool = self.store.any_pool();
        let before = chrono::Utc::now()
            - chrono::Duration::from_std(self.settings.reconcile_after)
                .unwrap_or_else(|_| chrono::Duration::seconds(120));
        let before = before.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let mut asked = 0;
        // Page on through the pending payments until 16 were asked: payments still not
        // due (many, if Daraja keeps refusing to say) never hide newer ones that are.
        let mut after = 0i64;
        'pages: loop {
            let overdue =
                projections::queries::unsettled_payments(pool, &before, after, 256).await?;
            let Some(last) = overdue.last().map(|row| row.position) else {
                break;
            };
            after = last;
            for row in overdue {
                if asked >= 16 {
                    break 'pages;
                }
                let (Ok(payment_id), Some(checkout)) = (
                    PaymentId::parse(&row.payment_id),
                    row.checkout_request_id.as_deref(),
                ) else {
                    continue;
                };
                let last: Option<(i64, i64)> = sqlx::query_as(
                    "SELECT attempts, next_query_at FROM mpesa_queries WHERE payment_id = $1",
                )
                .bind(row.payment_id.clone())
                .fetch_optional(pool)
                .await
                .context("reading when a payment was last asked about")?;
                let attempts = last.map_or(0, |(a, _)| a);
                let now = now_ms();
                // Not due yet, unless noted further ahead than this version ever puts a
                // query off: versions before it never asked again after a 4xx
                // (`next_query_at` far ahead), and no payment is left unasked for good.
                let latest = now.saturating_add(millis(MAX_QUERY_PAUSE.max(REFUSED_PAUSE)));
                if last.is_some_and(|(_, next)| next > now && next <= latest) {
                    continue;
                }
                asked += 1;
                let again = |attempts: i64| {
                    now_ms().saturating_add(millis(query_pause(self.settings.poll, attempts)))
                };
                let next = match self.daraja.stk_query(checkout).await {
                    Ok(StkStatus::Done {
                        result_code,
                        result_desc,
                    }) => {
                        self.settle_by_query(payment_id, result_code, result_desc)
                            .await?;
                        self.forget_queries(&row.payment_id).await?;
                        continue;
                    }
                    Ok(StkStatus::Pending) => again(attempts),
                    Err(DarajaError::Rejected {
                        status,
                        code,
                        message,
                    }) => {
                        tracing::error!(payment_id = %payment_id, status, code = %code, message = %message, "Daraja refuses to say how this payment ended; it stays pending, asking again in an hour");
                        now_ms().saturating_add(millis(REFUSED_PAUSE))
                    }
                    Err(error) => {
                        tracing::warn!(payment_id = %payment_id, error = %error, "STK Push Query failed; asking again later");
                        again(attempts)
                    }
                };
                sqlx::query(
                "INSERT INTO mpesa_queries (payment_id, attempts, next_query_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (payment_id) DO UPDATE SET attempts = $4, next_query_at = $5",
            )
            .bind(row.payment_id.clone())
            .bind(attempts + 1)
            .bind(next)
            .bind(attempts + 1)
            .bind(next)
            .execute(pool)
            .await
            .context("noting when to ask about a payment again")?;
            }
        }
        Ok(())
    }

    /// Settles a payment as the reconciling query found it (`PaymentReconciled`); one
    /// settled meanwhile (its callback came) is left as it is.
    async fn settle_by_query(
        &self,
        payment_id: PaymentId,
        result_code: i64,
        result_desc: String,
    ) -> anyhow::Result<()> {
        match self
            .commands
            .payment_command(
                payment_id,
                PaymentCommand::Settle {
                    by: Actor::System,
                    result_code,
                    result_desc,
                    receipt: None,
                    settled_by: SettledBy::Query,
                },
            )
            .await
        {
            Ok(_) => {
                tracing::info!(payment_id = %payment_id, result_code, "payment reconciled by STK Push Query");
                Ok(())
            }
            Err(commands::CommandError::Rejected {
                code: "payment_already_settled",
                ..
            }) => Ok(()),
            Err(other) => Err(anyhow::anyhow!(other)),
        }
    }

    async fn forget_queries(&self, payment_id: &str) -> anyhow::Result<()> {
        sqlx::query("DELETE FROM mpesa_queries WHERE payment_id = $1")
            .bind(payment_id.to_owned())
            .execute(self.store.any_pool())
            .await
            .context("forgetting a settled payment's queries")?;
        Ok(())
    }
}

/// The pause before a payment Daraja has not told about yet is asked about again,
/// after `attempts` queries: the poll interval (at least [`MIN_PAUSE`]) doubled with
/// each attempt, up to [`MAX_QUERY_PAUSE`].
fn query_pause(poll: Duration, attempts: i64) -> Duration {
    poll.max(MIN_PAUSE)
        .saturating_mul(1 << attempts.clamp(0, 12) as u32)
        .min(MAX_QUERY_PAUSE)
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_untold_payment_is_asked_about_again_after_a_pause_growing_to_an_hour() {
        let poll = Duration::from_millis(100);
        assert_eq!(query_pause(poll, 0), MIN_PAUSE);
        assert_eq!(query_pause(poll, 1), 2 * MIN_PAUSE);
        let pauses: Vec<Duration> = (0..40).map(|a| query_pause(poll, a)).collect();
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]), "{pauses:?}");
        // Capped at an hour, however many times it was asked: asked again, never
        // given up on.
        assert_eq!(MAX_QUERY_PAUSE, Duration::from_secs(3600));
        assert_eq!(query_pause(poll, 12), MAX_QUERY_PAUSE);
        assert_eq!(query_pause(poll, i64::MAX), MAX_QUERY_PAUSE);
        assert_eq!(
            query_pause(Duration::from_secs(30), 2),
            Duration::from_secs(120)
        );
    }
}
