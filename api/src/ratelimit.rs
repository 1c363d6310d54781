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
    /// `Err(seconds to wait)` when either is locked out. Otherwise the attempt counts
    /// from now; the returned [`Attempt`] says how it ended, and one dropped unsettled
    /// (an error that was no guess, a client that went away) is given back.
    pub fn begin(
        &self,
        phone_index: Option<&str>,
        address: Option<IpAddr>,
    ) -> Result<Attempt<'_>, u64> {
        let now = Instant::now();
        let window = self.limits.window;
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
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
            let w = counts
                .phones
                .entry(p.to_owned())
                .or_insert_with(fresh)
                .current(now, window);
            (w.locked(self.limits.per_phone, now, window), w.started)
        });
        let address_window = address.map(|a| {
            let w = counts
                .addresses
                .entry(a)
                .or_insert_with(fresh)
                .current(now, window);
            (w.locked(self.limits.per_ip, now, window), w.started)
        });
        let phone_wait = phone.and_then(|(wait, _)| wait);
        let address_wait = address_window.and_then(|(wait, _)| wait);
        if let Some(wait) = phone_wait.max(address_wait) {
            return Err(wait.as_secs().max(1));
        }
        if let Some(w) = phone_index.and_then(|p| counts.phones.get_mut(p)) {
            w.attempts += 1;
        }
        if let Some(w) = address.and_then(|a| counts.addresses.get_mut(&a)) {
            w.attempts += 1;
        }
        Ok(Attempt {
            limiter: self,
            phone: phone_index
                .zip(phone)
                .map(|(p, (_, started))| (p.to_owned(), started)),
            address: address
                .zip(address_window)
                .map(|(a, (_, started))| (a, started)),
            settled: false,
        })
    }
}

/// An attempt in progress, counted in the windows it started in.
pub struct Attempt<'a> {
    limiter: &'a SignInLimiter,
    phone: Option<(String, Instant)>,
    address: Option<(IpAddr, Instant)>,
    settled: bool,
}

impl Attempt<'_> {
    /// A wrong guess: it stays counted.
    pub fn failed(mut self) {
        self.settled = true;
    }

    /// A success: the phone's failures are cleared and the address gets its attempt
    /// back.
    pub fn succeeded(mut self) {
        self.settled = true;
        let mut counts = self
            .limiter
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((p, _)) = &self.phone {
            counts.phones.remove(p);
        }
        if let Some((a, started)) = &self.address {
            give_back(counts.addresses.get_mut(a), *started);
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let mut counts = self
            .limiter
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((p, started)) = &self.phone {
            give_back(counts.phones.get_mut(p), *started);
        }
        if let Some((a, started)) = &self.address {
            give_back(counts.addresses.get_mut(a), *started);
        }
    }
}

/// Returns an attempt to the window it was counted in (not to a later one).
fn give_back(window: Option<&mut Window>, started: Instant) {
    if let Some(w) = window.filter(|w| w.started == started) {
        w.attempts = w.attempts.saturating_sub(1);
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
            limiter.begin(Some("p1"), Some(ip)).unwrap().failed();
        }
        let wait = limiter.begin(Some("p1"), Some(ip)).err().unwrap();
        assert!((1..=60).contains(&wait));
        let other = limiter.begin(Some("p2"), Some(ip)).ok().unwrap();
        other.succeeded();
        // Someone else's success does not unlock this phone.
        assert!(limiter.begin(Some("p1"), Some(ip)).is_err());
    }

    #[test]
    fn an_address_is_locked_across_phones_and_successes_give_attempts_back() {
        let limiter = limiter(100, 4);
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        for n in 0..3 {
            limiter
                .begin(Some(&format!("p{n}")), Some(ip))
                .unwrap()
                .failed();
        }
        // A success does not use up the address's allowance.
        limiter.begin(Some("ok"), Some(ip)).unwrap().succeeded();
        limiter.begin(None, Some(ip)).unwrap().failed();
        assert!(limiter.begin(Some("fresh"), Some(ip)).is_err());
        assert!(limiter
            .begin(Some("fresh"), Some("10.0.0.8".parse().unwrap()))
            .is_ok());
    }

    #[test]
    fn attempts_in_flight_count_so_a_parallel_burst_cannot_pass_the_limit() {
        let limiter = std::sync::Arc::new(limiter(5, 1000));
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(40));
        // All threads are started before any is joined, so the attempts overlap.
        let threads: Vec<_> = (0..40)
            .map(|_| {
                let (limiter, barrier) = (limiter.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let attempt = limiter.begin(Some("target"), None);
                    let passed = attempt.is_ok();
                    // Every attempt is still in flight while the others start.
                    barrier.wait();
                    if let Ok(attempt) = attempt {
                        attempt.failed();
                    }
                    passed
                })
            })
            .collect();
        let passed: usize = threads
            .into_iter()
            .map(|t| usize::from(t.join().unwrap()))
            .sum();
        assert_eq!(passed, 5);
    }

    #[test]
    fn an_attempt_dropped_unsettled_is_given_back_to_both() {
        let limiter = limiter(2, 2);
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        for _ in 0..5 {
            drop(limiter.begin(Some("p"), Some(ip)).unwrap());
        }
        limiter.begin(Some("p"), Some(ip)).unwrap().failed();
        limiter.begin(Some("p"), Some(ip)).unwrap().failed();
        assert!(limiter.begin(Some("p"), Some(ip)).is_err());
    }

    #[test]
    fn an_attempt_is_given_back_only_to_the_window_it_was_counted_in() {
        let limiter = SignInLimiter::new(SignInLimits {
            per_phone: 100,
            per_ip: 2,
            window: Duration::from_millis(50),
        });
        let ip: IpAddr = "10.0.0.6".parse().unwrap();
        let slow = limiter.begin(None, Some(ip)).unwrap();
        std::thread::sleep(Duration::from_millis(60));
        // A new window: two failures lock it; the old attempt must not unlock it.
        limiter.begin(None, Some(ip)).unwrap().failed();
        limiter.begin(None, Some(ip)).unwrap().failed();
        drop(slow);
        assert!(limiter.begin(None, Some(ip)).is_err());
    }
}
