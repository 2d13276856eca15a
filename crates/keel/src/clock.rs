//! Where the runtime gets the time from. Core code never reads a clock; the runtime
//! reads this one, and tests can replace it.

use keel_core::Timestamp;

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    /// The current time, at millisecond precision (what stores keep).
    fn now(&self) -> Timestamp;
}

/// The system's wall clock, truncated to milliseconds (what stores keep).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let now = chrono::Utc::now();
        chrono::DateTime::from_timestamp_millis(now.timestamp_millis()).expect("the current time is representable")
    }
}
