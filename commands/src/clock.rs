//! The system clock, the production implementation of the domain's `Clock` port.

use chrono::{DateTime, Utc};
use domain::clock::Clock;

/// Reads the system time; only the write side uses it, never the domain.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}
