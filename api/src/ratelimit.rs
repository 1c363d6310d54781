//! Limits on how often something may be tried, kept in the store's database so that
//! every API instance on one PostgreSQL counts the same attempts (an attacker cannot
//! multiply an allowance by spreading requests over instances).
//!
//! A limit is a fixed window per bucket (what is limited: failed sign-ins per phone,
//! payment prompts per doctor, …) and key (whose: a blind index, never a phone number or
//! an address in the clear). An attempt is counted when it starts, in one atomic upsert
//! with the check, so a burst of parallel guesses cannot all pass before any has
//! failed; an [`Attempt`] can be given back when it turns out not to count (a correct
//! password, a client that went away).
//!
//! Failed sign-ins are limited per phone and per client address: past the limit within
//! the window, further attempts get 429 until the window ends, whether or not the
//! password would be right. Sign-ups that hit a registered phone count against the
//! address too, so the phone directory cannot be enumerated quickly.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use commands::Commands;
use eventstore::Store;

use crate::problem::Problem;

/// What one limit allows: `limit` attempts per `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub limit: u32,
    pub window: Duration,
}

/// One limited thing: which bucket, whose key (kept only as a keyed hash), which rule.
#[derive(Clone, Copy, Debug)]
pub struct Limit<'a> {
    pub bucket: &'static str,
    pub key: &'a str,
    pub rule: Rule,
}

/// An attempt counted in one bucket's window.
#[derive(Clone, Debug)]
struct Counted {
    bucket: &'static str,
    key: String,
    window_start: i64,
}

/// The limits, shared by every request of this process and, through the database,
/// with every other instance on the same store.
pub struct Limits {
    store: Store,
    commands: Arc<Commands>,
    /// Takes since the last sweep of finished windows.
    takes: AtomicU32,
}

/// Finished windows are swept once in this many takes.
const SWEEP_EVERY: u32 = 512;

impl Limits {
    pub fn new(store: Store, commands: Arc<Commands>) -> Limits {
        Limits {
            store,
            commands,
            takes: AtomicU32::new(0),
        }
    }

    fn now_ms(&self) -> i64 {
        self.commands.now().timestamp_millis()
    }

    /// The stored key: a keyed hash, so the table holds no phone index or address that
    /// could be matched against anything outside it.
    fn stored_key(&self, bucket: &str, key: &str) -> String {
        let tag = self
            .commands
            .keys()
            .tag("rate limit", format!("{bucket}|{key}").as_bytes());
        commands::keys::hex(&tag)
    }

    /// Counts one attempt against `limit`: `Ok(Some(counted))` when it is allowed,
    /// `Ok(None)` with the seconds to wait when it is over the limit.
    async fn count(&self, limit: &Limit<'_>) -> anyhow::Result<Result<Counted, u64>> {
        let now = self.now_ms();
        let window = i64::try_from(limit.rule.window.as_millis()).unwrap_or(i64::MAX);
        let window = window.max(1);
        let cap = i64::from(limit.rule.limit);
        let key = self.stored_key(limit.bucket, limit.key);
        // A finished window starts again at one; otherwise one more, held at one past
        // the limit so that refused attempts do not pile up behind it.
        let (window_start, hits) =
            eventstore::counters::hit(self.store.any_pool(), limit.bucket, &key, now, window, cap)
                .await?;
        if self.takes.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.sweep(now).await;
        }
        if hits > cap {
            let left_ms = (window_start + window - now).max(0);
            let seconds = u64::try_from((left_ms + 999) / 1000).unwrap_or(1).max(1);
            return Ok(Err(seconds));
        }
        Ok(Ok(Counted {
            bucket: limit.bucket,
            key,
            window_start,
        }))
    }

    /// Forgets windows that ended a day ago or more (no limit here is longer).
    async fn sweep(&self, now: i64) {
        let day = 24 * 3600 * 1000;
        let swept = eventstore::counters::sweep(self.store.any_pool(), now - day).await;
        if let Err(error) = swept {
            tracing::warn!(
                error = format!("{error:#}"),
                "sweeping finished rate limit windows failed"
            );
        }
    }

    /// Starts an attempt under every one of `limits`: a 429 problem (with
    /// `Retry-After`, the longest wait of those that are used up) when any is used up,
    /// and then none of them is counted. Otherwise the attempt counts in each from now
    /// until it is given back.
    pub async fn begin(self: &Arc<Self>, limits: &[Limit<'_>]) -> Result<Attempt, Problem> {
        let mut counted = Vec::with_capacity(limits.len());
        let mut wait = None;
        for limit in limits {
            match self.count(limit).await {
                Ok(Ok(c)) => counted.push(c),
                Ok(Err(seconds)) => wait = wait.max(Some(seconds)),
                Err(error) => {
                    give_back_all(self, &counted).await;
                    return Err(Problem::internal(&error));
                }
            }
        }
        if let Some(seconds) = wait {
            give_back_all(self, &counted).await;
            return Err(too_many(seconds));
        }
        Ok(Attempt {
            limits: self.clone(),
            counted,
            settled: false,
        })
    }

    /// Counts one use under `limit` for good: the 429 problem when it is used up.
    pub async fn take(
        self: &Arc<Self>,
        bucket: &'static str,
        key: &str,
        rule: Rule,
    ) -> Result<(), Problem> {
        self.begin(&[Limit { bucket, key, rule }])
            .await
            .map(Attempt::failed)
    }

    /// Returns one counted attempt to the window it was counted in (not to a later
    /// one).
    async fn give_back(&self, counted: &Counted) -> anyhow::Result<()> {
        eventstore::counters::give_back(
            self.store.any_pool(),
            counted.bucket,
            &counted.key,
            counted.window_start,
        )
        .await
    }

    /// Forgets the window of one bucket and key (a success that clears failures).
    async fn clear(&self, counted: &Counted) -> anyhow::Result<()> {
        eventstore::counters::clear(self.store.any_pool(), counted.bucket, &counted.key).await
    }
}

async fn give_back_all(limits: &Limits, counted: &[Counted]) {
    for c in counted {
        if let Err(error) = limits.give_back(c).await {
            tracing::warn!(
                error = format!("{error:#}"),
                bucket = c.bucket,
                "a rate-limited attempt could not be given back"
            );
        }
    }
}

/// An attempt that counts unless given back (see [`Attempt::keep`]).
pub struct Kept {
    limits: Arc<Limits>,
    counted: Vec<Counted>,
}

impl Kept {
    /// It does not count after all: given back in every window.
    pub async fn give_back(self) {
        give_back_all(&self.limits, &self.counted).await;
    }
}

/// The answer to an attempt over a limit.
pub fn too_many(seconds: u64) -> Problem {
    Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_attempts",
        "too many attempts; wait before trying again",
    )
    .retry_after(seconds)
}

/// An attempt in progress, counted in the windows it started in. Dropped unsettled
/// (an error that was no guess, a client that went away) it is given back.
pub struct Attempt {
    limits: Arc<Limits>,
    counted: Vec<Counted>,
    settled: bool,
}

impl Attempt {
    /// It counts: a wrong guess, or a use that is spent.
    pub fn failed(mut self) {
        self.settled = true;
    }

    /// It counts from now on, whatever becomes of the caller (a request cancelled
    /// while its command runs included), unless [`Kept::give_back`] is called.
    pub fn keep(mut self) -> Kept {
        self.settled = true;
        Kept {
            limits: self.limits.clone(),
            counted: std::mem::take(&mut self.counted),
        }
    }

    /// It does not count: given back in every window. The windows of `clearing`
    /// buckets are forgotten altogether (a correct password clears the phone's
    /// failures).
    pub async fn succeeded(mut self, clearing: &[&str]) {
        self.settled = true;
        for c in &self.counted {
            let done = if clearing.contains(&c.bucket) {
                self.limits.clear(c).await
            } else {
                self.limits.give_back(c).await
            };
            if let Err(error) = done {
                tracing::warn!(
                    error = format!("{error:#}"),
                    bucket = c.bucket,
                    "a rate-limited attempt could not be given back"
                );
            }
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if self.settled || self.counted.is_empty() {
            return;
        }
        let counted = std::mem::take(&mut self.counted);
        let limits = self.limits.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { give_back_all(&limits, &counted).await });
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use eventstore::testing::{fresh_config, BACKENDS};

    /// Drops the test's PostgreSQL database when the test is done with it.
    struct Cleanup(Option<(String, String)>);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Some((admin, name)) = self.0.take() {
                // A runtime of its own: the test's may be shutting down.
                std::thread::spawn(move || {
                    let runtime = tokio::runtime::Runtime::new().unwrap();
                    runtime
                        .block_on(eventstore::testing::drop_database(&admin, &name))
                        .unwrap();
                })
                .join()
                .unwrap();
            }
        }
    }

    async fn limits_on(backend: eventstore::Backend) -> Option<(Arc<Limits>, Store, Cleanup)> {
        let (config, admin, name, _) = fresh_config(backend).await?;
        let cleanup = Cleanup(admin.zip(name));
        let store = Store::open(config).await.unwrap();
        let keys = Arc::new(commands::keys::KeyStore::new(
            commands::keys::SecretKey::generate(),
            store.any_pool().clone(),
        ));
        let commands = Arc::new(Commands::new(
            store.clone(),
            keys,
            Arc::new(commands::blobs::LocalBlobStore::new(&std::env::temp_dir())),
            Arc::new(commands::clock::SystemClock),
        ));
        Some((
            Arc::new(Limits::new(store.clone(), commands)),
            store,
            cleanup,
        ))
    }

    fn rule(limit: u32, window_ms: u64) -> Rule {
        Rule {
            limit,
            window: Duration::from_millis(window_ms),
        }
    }

    fn phone(key: &str, r: Rule) -> Limit<'_> {
        Limit {
            bucket: "sign_in_phone",
            key,
            rule: r,
        }
    }

    fn address(key: &str, r: Rule) -> Limit<'_> {
        Limit {
            bucket: "sign_in_address",
            key,
            rule: r,
        }
    }

    #[tokio::test]
    async fn a_key_is_locked_after_its_limit_and_unlocked_by_clearing_success() {
        for backend in BACKENDS {
            let Some((limits, _store, _cleanup)) = limits_on(backend).await else {
                continue;
            };
            let r = rule(3, 60_000);
            for _ in 0..3 {
                limits.begin(&[phone("p1", r)]).await.unwrap().failed();
            }
            let refused = limits.begin(&[phone("p1", r)]).await.err().unwrap();
            assert_eq!(refused.status, 429);
            // Someone else's success does not unlock this key.
            limits
                .begin(&[phone("p2", r)])
                .await
                .unwrap()
                .succeeded(&["sign_in_phone"])
                .await;
            assert!(limits.begin(&[phone("p1", r)]).await.is_err());
        }
    }

    #[tokio::test]
    async fn a_refused_attempt_counts_in_none_of_its_limits() {
        for backend in BACKENDS {
            let Some((limits, _store, _cleanup)) = limits_on(backend).await else {
                continue;
            };
            let (tight, loose) = (rule(1, 60_000), rule(3, 60_000));
            limits.begin(&[phone("p", tight)]).await.unwrap().failed();
            // The phone is used up: the address is not charged for the refusals.
            for _ in 0..5 {
                assert!(limits
                    .begin(&[phone("p", tight), address("a", loose)])
                    .await
                    .is_err());
            }
            for _ in 0..3 {
                limits.begin(&[address("a", loose)]).await.unwrap().failed();
            }
            assert!(limits.begin(&[address("a", loose)]).await.is_err());
        }
    }

    #[tokio::test]
    async fn attempts_in_flight_count_so_a_parallel_burst_cannot_pass_the_limit() {
        for backend in BACKENDS {
            let Some((limits, _store, _cleanup)) = limits_on(backend).await else {
                continue;
            };
            let r = rule(5, 60_000);
            let tries = (0..40).map(|_| {
                let limits = limits.clone();
                tokio::spawn(async move { limits.begin(&[phone("target", r)]).await.ok() })
            });
            // Every attempt stays in flight until all have started.
            let attempts: Vec<Option<Attempt>> = futures::future::join_all(tries)
                .await
                .into_iter()
                .map(Result::unwrap)
                .collect();
            assert_eq!(attempts.iter().filter(|a| a.is_some()).count(), 5);
        }
    }

    #[tokio::test]
    async fn an_attempt_dropped_unsettled_is_given_back() {
        for backend in BACKENDS {
            let Some((limits, _store, _cleanup)) = limits_on(backend).await else {
                continue;
            };
            let r = rule(2, 60_000);
            for _ in 0..5 {
                drop(limits.begin(&[phone("p", r)]).await.unwrap());
                // The give-back runs on its own task.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            limits.begin(&[phone("p", r)]).await.unwrap().failed();
            limits.begin(&[phone("p", r)]).await.unwrap().failed();
            assert!(limits.begin(&[phone("p", r)]).await.is_err());
        }
    }

    #[tokio::test]
    async fn an_attempt_is_given_back_only_to_the_window_it_was_counted_in() {
        for backend in BACKENDS {
            let Some((limits, _store, _cleanup)) = limits_on(backend).await else {
                continue;
            };
            let r = rule(2, 300);
            let slow = limits.begin(&[address("a", r)]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(350)).await;
            // A new window: two failures lock it; the old attempt must not unlock it.
            limits.begin(&[address("a", r)]).await.unwrap().failed();
            limits.begin(&[address("a", r)]).await.unwrap().failed();
            slow.succeeded(&[]).await;
            assert!(limits.begin(&[address("a", r)]).await.is_err());
            // And the window ends by itself.
            tokio::time::sleep(Duration::from_millis(350)).await;
            assert!(limits.begin(&[address("a", r)]).await.is_ok());
        }
    }

    #[tokio::test]
    async fn the_table_holds_no_key_in_the_clear_and_the_wait_is_the_window_left() {
        for backend in BACKENDS {
            let Some((limits, store, _cleanup)) = limits_on(backend).await else {
                continue;
            };
            let r = rule(1, 120_000);
            limits.take("prompt_doctor", "doctor-42", r).await.unwrap();
            let refused = limits.take("prompt_doctor", "doctor-42", r).await;
            let problem = refused.err().unwrap();
            assert_eq!((problem.status, problem.code), (429, "too_many_attempts"));
            let keys = eventstore::counters::keys(store.any_pool()).await.unwrap();
            assert_eq!(keys.len(), 1);
            assert!(!keys[0].contains("doctor-42"));
        }
    }
}
