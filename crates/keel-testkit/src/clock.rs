//! A simulated clock: the runtime's [`keel::clock::Clock`] on tokio's clock, which a
//! simulation pauses, plus a wall-clock offset it can jump forward.
//!
//! On a runtime whose time is paused (`Builder::start_paused(true)`), tokio's clock is
//! virtual: it stands still while tasks run and leaps to the next timer when every task
//! waits. The worker's sleeps (idle polls, back-offs, lease renewals) are tokio sleeps,
//! so they and this clock move together, and a lease of 30 s or a durable timer of an
//! hour costs no real time. [`SimClock::jump`] moves the wall clock alone, as an NTP
//! step would: leases held by other workers look expired, timers come due early,
//! while the sleeps already running keep their monotonic deadlines.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use keel::clock::Clock;
use keel::Timestamp;

/// The simulated clock; share it as `Arc<SimClock>` between the workers and clients
/// of one simulated world.
#[derive(Debug)]
pub struct SimClock {
    base: Timestamp,
    started: tokio::time::Instant,
    offset_ms: AtomicI64,
}

impl SimClock {
    /// A clock that reads `base` now and then moves with tokio's clock. Call it on the
    /// runtime whose clock it follows.
    pub fn new(base: Timestamp) -> SimClock {
        SimClock { base, started: tokio::time::Instant::now(), offset_ms: AtomicI64::new(0) }
    }

    /// Moves the wall clock forward by `by`, at once and for every reader.
    pub fn jump(&self, by: Duration) {
        let millis = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.offset_ms.fetch_add(millis, Ordering::SeqCst);
    }

    /// How far the jumps so far put the wall clock ahead of tokio's clock.
    pub fn offset(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.offset_ms.load(Ordering::SeqCst)).unwrap_or(0))
    }
}

impl Clock for SimClock {
    fn now(&self) -> Timestamp {
        let elapsed = i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.base + chrono::Duration::milliseconds(elapsed.saturating_add(self.offset_ms.load(Ordering::SeqCst)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_clock_follows_paused_tokio_time_and_jumps() {
        let base = chrono::DateTime::from_timestamp_millis(1_000_000).unwrap();
        let clock = SimClock::new(base);
        assert_eq!(clock.now(), base);
        tokio::time::sleep(Duration::from_secs(3600)).await; // virtual: returns at once
        assert_eq!(clock.now(), base + chrono::Duration::hours(1));
        clock.jump(Duration::from_secs(90));
        assert_eq!(clock.now(), base + chrono::Duration::seconds(3690));
        assert_eq!(clock.offset(), Duration::from_secs(90));
    }
}
