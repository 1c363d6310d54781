//! Failed sign-ins are limited per phone (its blind index, never the number) and per
//! client address: past the limit within the window, further attempts are refused with
//! 429 until the window ends, whether or not the password would be right. Sign-ups
//! that hit a registered phone count against the address too, so the phone directory
//! cannot be enumerated quickly.
//!
//! An attempt is counted when it starts (under one lock with the check) and given back
//! if it succeeds, so a burst of parallel guesses cannot all pass the check before any
//! has failed. The counts live in this process; instances behind a load balancer each
//! count their own.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::SignInLimits;

struct Window {
    started: Instant,
    attempts: u32,
}

impl Window {
    fn current(&mut self, now: Instant, length: Duration) -> &mut Self {
        if now.duration_since(self.started) >= length {
            self.started = now;
            self.attempts = 0;
        }
        self
    }

    /// How long until the window ends, if `limit` attempts are used up.
    fn locked(&self, limit: u32, now: Instant, length: Duration) -> Option<Duration> {
        let elapsed = now.duration_since(self.started);
        (self.attempts >= limit && elapsed < length).then(|| length - elapsed)
    }
}

#[derive(Default)]
struct Counts {
    phones: HashMap<String, Window>,
    addresses: HashMap<IpAddr, Window>,
}

/// Counts of recent failed (or still running) attempts.
pub struct SignInLimiter {
    limits: SignInLimits,
    counts: Mutex<Counts>,
}

impl SignInLimiter {
    pub fn new(limits: SignInLimits) -> SignInLimiter {
        SignInLimiter {
            limits,
            counts: Mutex::new(Counts::default()),
        }
    }

    /// Starts an attempt for this phone (if any) from this address (if known):
    /// `Err(seconds to wait)` when either is locked out; otherwise the attempt counts
    /// as failed until [`SignInLimiter::succeeded`] gives it back.
    pub fn begin(&self, phone_index: Option<&str>, address: Option<IpAddr>) -> Result<(), u64> {
        let now = Instant::now();
        let window = self.limits.window;
        let Ok(mut counts) = self.counts.lock() else {
            return Ok(());
        };
        let counts = &mut *counts;
        // Forget finished windows so the maps stay as small as the recent failures.
        if counts.phones.len() + counts.addresses.len() > 10_000 {
            counts
                .phones
                .retain(|_, w| now.duration_since(w.started) < window);
            counts
                .addresses
                .retain(|_, w| now.duration_since(w.started) < window);
        }
        let fresh = || Window {
            started: now,
            attempts: 0,
        };
        let phone = phone_index.map(|p| {
            counts
                .phones
                .entry(p.to_owned())
                .or_insert_with(fresh)
                .current(now, window)
        });
        let phone_wait = phone
            .as_ref()
            .and_then(|w| w.locked(self.limits.per_phone, now, window));
        let address_wait = address.and_then(|a| {
            counts
                .addresses
                .entry(a)
                .or_insert_with(fresh)
                .current(now, window)
                .locked(self.limits.per_ip, now, window)
        });
        if let Some(wait) = phone_wait.max(address_wait) {
            return Err(wait.as_secs().max(1));
        }
        if let Some(w) = phone_index.and_then(|p| counts.phones.get_mut(p)) {
            w.attempts += 1;
        }
        if let Some(w) = address.and_then(|a| counts.addresses.get_mut(&a)) {
            w.attempts += 1;
        }
        Ok(())
    }

    /// The attempt succeeded: the phone's failures are cleared and the address gets
    /// its attempt back.
    pub fn succeeded(&self, phone_index: Option<&str>, address: Option<IpAddr>) {
        let Ok(mut counts) = self.counts.lock() else {
            return;
        };
        if let Some(p) = phone_index {
            counts.phones.remove(p);
        }
        if let Some(w) = address.and_then(|a| counts.addresses.get_mut(&a)) {
            w.attempts = w.attempts.saturating_sub(1);
        }
    }

    /// The attempt was no guess (it failed for another reason): both get it back.
    pub fn release(&self, phone_index: Option<&str>, address: Option<IpAddr>) {
        let Ok(mut counts) = self.counts.lock() else {
            return;
        };
        if let Some(w) = phone_index.and_then(|p| counts.phones.get_mut(p)) {
            w.attempts = w.attempts.saturating_sub(1);
        }
        if let Some(w) = address.and_then(|a| counts.addresses.get_mut(&a)) {
            w.attempts = w.attempts.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_phone: u32, per_ip: u32) -> SignInLimiter {
        SignInLimiter::new(SignInLimits {
            per_phone,
            per_ip,
            window: Duration::from_secs(60),
        })
    }

    #[test]
    fn a_phone_is_locked_after_its_limit_and_unlocked_by_success() {
        let limiter = limiter(3, 100);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..3 {
            assert!(limiter.begin(Some("p1"), Some(ip)).is_ok());
        }
        let wait = limiter.begin(Some("p1"), Some(ip)).unwrap_err();
        assert!((1..=60).contains(&wait));
        assert!(
            limiter.begin(Some("p2"), Some(ip)).is_ok(),
            "other phones unaffected"
        );
        limiter.succeeded(Some("p1"), Some(ip));
        assert!(limiter.begin(Some("p1"), Some(ip)).is_ok());
    }

    #[test]
    fn an_address_is_locked_across_phones_and_successes_give_attempts_back() {
        let limiter = limiter(100, 4);
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        for n in 0..3 {
            limiter.begin(Some(&format!("p{n}")), Some(ip)).unwrap();
        }
        // A success does not use up the address's allowance.
        limiter.begin(Some("ok"), Some(ip)).unwrap();
        limiter.succeeded(Some("ok"), Some(ip));
        limiter.begin(None, Some(ip)).unwrap();
        assert!(limiter.begin(Some("fresh"), Some(ip)).is_err());
        assert!(limiter
            .begin(Some("fresh"), Some("10.0.0.8".parse().unwrap()))
            .is_ok());
    }

    #[test]
    fn attempts_in_flight_count_so_a_parallel_burst_cannot_pass_the_limit() {
        let limiter = std::sync::Arc::new(limiter(5, 1000));
        let passed: usize = (0..40)
            .map(|_| {
                let limiter = limiter.clone();
                std::thread::spawn(move || limiter.begin(Some("target"), None).is_ok())
            })
            .map(|t| usize::from(t.join().unwrap()))
            .sum();
        assert_eq!(passed, 5);
    }

    #[test]
    fn an_attempt_that_was_no_guess_is_given_back_to_both() {
        let limiter = limiter(2, 2);
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        for _ in 0..5 {
            limiter.begin(Some("p"), Some(ip)).unwrap();
            limiter.release(Some("p"), Some(ip));
        }
        limiter.begin(Some("p"), Some(ip)).unwrap();
        limiter.begin(Some("p"), Some(ip)).unwrap();
        assert!(limiter.begin(Some("p"), Some(ip)).is_err());
    }
}
