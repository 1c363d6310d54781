//! Failed sign-ins are limited per phone (its blind index, never the number) and per
//! client address: past the limit within the window, further attempts are refused with
//! 429 until the window ends, whether or not the password would be right. The counts
//! live in this process; instances behind a load balancer each count their own.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::SignInLimits;

struct Window {
    started: Instant,
    failures: u32,
}

/// Counts of recent failed sign-ins.
pub struct SignInLimiter {
    limits: SignInLimits,
    phones: Mutex<HashMap<String, Window>>,
    addresses: Mutex<HashMap<IpAddr, Window>>,
}

impl SignInLimiter {
    pub fn new(limits: SignInLimits) -> SignInLimiter {
        SignInLimiter {
            limits,
            phones: Mutex::new(HashMap::new()),
            addresses: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(seconds to wait)` when this phone or address is locked out now.
    pub fn check(&self, phone_index: &str, address: Option<IpAddr>) -> Result<(), u64> {
        let now = Instant::now();
        let phone_wait = locked(
            &self.phones,
            phone_index,
            self.limits.per_phone,
            self.limits.window,
            now,
        );
        let address_wait = address.and_then(|a| {
            locked(
                &self.addresses,
                &a,
                self.limits.per_ip,
                self.limits.window,
                now,
            )
        });
        match phone_wait.max(address_wait) {
            Some(wait) => Err(wait.as_secs().max(1)),
            None => Ok(()),
        }
    }

    pub fn failed(&self, phone_index: &str, address: Option<IpAddr>) {
        let now = Instant::now();
        count(
            &self.phones,
            phone_index.to_owned(),
            self.limits.window,
            now,
        );
        if let Some(a) = address {
            count(&self.addresses, a, self.limits.window, now);
        }
    }

    /// A successful sign-in clears the phone's failures (not the address's).
    pub fn succeeded(&self, phone_index: &str) {
        if let Ok(mut phones) = self.phones.lock() {
            phones.remove(phone_index);
        }
    }
}

fn locked<K, Q>(
    map: &Mutex<HashMap<K, Window>>,
    key: &Q,
    limit: u32,
    window: Duration,
    now: Instant,
) -> Option<Duration>
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
{
    let map = map.lock().ok()?;
    let w = map.get(key)?;
    let elapsed = now.duration_since(w.started);
    (w.failures >= limit && elapsed < window).then(|| window - elapsed)
}

fn count<K: std::hash::Hash + Eq>(
    map: &Mutex<HashMap<K, Window>>,
    key: K,
    window: Duration,
    now: Instant,
) {
    let Ok(mut map) = map.lock() else {
        return;
    };
    // Forget finished windows so the map stays as small as the recent failures.
    if map.len() > 10_000 {
        map.retain(|_, w| now.duration_since(w.started) < window);
    }
    let w = map.entry(key).or_insert(Window {
        started: now,
        failures: 0,
    });
    if now.duration_since(w.started) >= window {
        w.started = now;
        w.failures = 0;
    }
    w.failures += 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phone_is_locked_after_its_limit_and_unlocked_by_success() {
        let limiter = SignInLimiter::new(SignInLimits {
            per_phone: 3,
            per_ip: 100,
            window: Duration::from_secs(60),
        });
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..3 {
            assert!(limiter.check("p1", Some(ip)).is_ok());
            limiter.failed("p1", Some(ip));
        }
        let wait = limiter.check("p1", Some(ip)).unwrap_err();
        assert!((1..=60).contains(&wait));
        assert!(
            limiter.check("p2", Some(ip)).is_ok(),
            "other phones unaffected"
        );
        limiter.succeeded("p1");
        assert!(limiter.check("p1", Some(ip)).is_ok());
    }

    #[test]
    fn an_address_is_locked_across_phones() {
        let limiter = SignInLimiter::new(SignInLimits {
            per_phone: 100,
            per_ip: 4,
            window: Duration::from_secs(60),
        });
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        for n in 0..4 {
            limiter.failed(&format!("p{n}"), Some(ip));
        }
        assert!(limiter.check("fresh", Some(ip)).is_err());
        assert!(limiter
            .check("fresh", Some("10.0.0.8".parse().unwrap()))
            .is_ok());
    }
}
