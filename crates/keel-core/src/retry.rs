//! Retry-policy arithmetic: when the next attempt of a failed activity or
//! sub-orchestration starts, or whether to give up.
//!
//! Same rules as DTFx's retry interceptor: delay = first interval × coefficient^k,
//! capped at the maximum interval; no retry once the attempts or the retry timeout
//! are used up, when the failure is marked non-retriable, or when the policy's
//! predicate rejects the failure.

use std::sync::Arc;
use std::time::Duration;

use crate::history::{FailureDetails, Timestamp};

/// Decides, from a failure, whether to retry at all.
pub type RetryPredicate = Arc<dyn Fn(&FailureDetails) -> bool + Send + Sync>;

/// How a failed activity or sub-orchestration is retried.
#[derive(Clone)]
pub struct RetryPolicy {
    /// Total attempts, the first included. At least 1.
    pub max_attempts: u32,
    /// The delay before the second attempt. More than zero.
    pub first_retry_interval: Duration,
    /// At least 1.0.
    pub backoff_coefficient: f64,
    /// No delay is longer than this. At least `first_retry_interval`.
    pub max_retry_interval: Duration,
    /// No attempt starts later than this after the first one started.
    pub retry_timeout: Option<Duration>,
    /// Retry only failures for which this returns true (default: all).
    pub handle: Option<RetryPredicate>,
}

impl std::fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("first_retry_interval", &self.first_retry_interval)
            .field("backoff_coefficient", &self.backoff_coefficient)
            .field("max_retry_interval", &self.max_retry_interval)
            .field("retry_timeout", &self.retry_timeout)
            .field("handle", &self.handle.as_ref().map(|_| "<predicate>"))
            .finish()
    }
}

/// A retry policy that cannot work: zero attempts, a zero interval, a backoff below 1.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid retry policy: {0}")]
pub struct InvalidRetryPolicy(pub String);

impl From<InvalidRetryPolicy> for crate::context::OrchestrationError {
    fn from(error: InvalidRetryPolicy) -> crate::context::OrchestrationError {
        crate::context::OrchestrationError::new("InvalidRetryPolicy", error.0)
    }
}

impl RetryPolicy {
    /// `max_attempts` attempts in all (at least 1), `first_retry_interval` (more than 0)
    /// apart, no backoff; the maximum interval defaults to one hour (the isolated .NET
    /// SDK's default).
    pub fn new(max_attempts: u32, first_retry_interval: Duration) -> Result<RetryPolicy, InvalidRetryPolicy> {
        if max_attempts == 0 {
            return Err(InvalidRetryPolicy("a retry policy needs at least one attempt".into()));
        }
        if first_retry_interval.is_zero() {
            return Err(InvalidRetryPolicy("the first retry interval must be more than zero".into()));
        }
        Ok(RetryPolicy {
            max_attempts,
            first_retry_interval,
            backoff_coefficient: 1.0,
            max_retry_interval: Duration::from_secs(3600).max(first_retry_interval),
            retry_timeout: None,
            handle: None,
        })
    }

    /// Each delay is the previous one times `coefficient` (at least 1.0).
    pub fn with_backoff_coefficient(mut self, coefficient: f64) -> Result<RetryPolicy, InvalidRetryPolicy> {
        if !(coefficient >= 1.0 && coefficient.is_finite()) {
            return Err(InvalidRetryPolicy(format!("the backoff coefficient must be at least 1.0, not {coefficient}")));
        }
        self.backoff_coefficient = coefficient;
        Ok(self)
    }

    /// No delay is longer than `max` (at least the first interval).
    pub fn with_max_retry_interval(mut self, max: Duration) -> Result<RetryPolicy, InvalidRetryPolicy> {
        if max < self.first_retry_interval {
            return Err(InvalidRetryPolicy(format!(
                "the max interval ({max:?}) must not be shorter than the first ({:?})",
                self.first_retry_interval
            )));
        }
        self.max_retry_interval = max;
        Ok(self)
    }

    /// Gives up once the next attempt would start `timeout` or more after the first
    /// attempt started.
    pub fn with_retry_timeout(mut self, timeout: Duration) -> RetryPolicy {
        self.retry_timeout = Some(timeout);
        self
    }

    /// Retries only the failures for which `handle` returns true. For a predicate over
    /// a call's typed failure, see [`crate::context::Retrying::only_if`].
    pub fn with_handle(mut self, handle: impl Fn(&FailureDetails) -> bool + Send + Sync + 'static) -> RetryPolicy {
        self.handle = Some(Arc::new(handle));
        self
    }

    /// The delay before the next attempt after attempt number `attempt` (1-based)
    /// failed with `failure` at `now`, the first attempt having started at
    /// `first_attempt_at`; `None` means give up.
    pub fn next_delay(
        &self,
        attempt: u32,
        failure: &FailureDetails,
        first_attempt_at: Timestamp,
        now: Timestamp,
    ) -> Option<Duration> {
        assert!(attempt >= 1);
        if attempt >= self.max_attempts || failure.is_non_retriable {
            return None;
        }
        if let Some(handle) = &self.handle {
            if !handle(failure) {
                return None;
            }
        }
        let exponent = i32::try_from(attempt - 1).unwrap_or(i32::MAX);
        let delay_secs = self.first_retry_interval.as_secs_f64() * self.backoff_coefficient.powi(exponent);
        let delay = if delay_secs.is_finite() && delay_secs < self.max_retry_interval.as_secs_f64() {
            Duration::from_secs_f64(delay_secs)
        } else {
            self.max_retry_interval
        };
        if let Some(timeout) = self.retry_timeout {
            let elapsed = (now - first_attempt_at).to_std().unwrap_or(Duration::ZERO);
            if elapsed + delay >= timeout {
                return None;
            }
        }
        Some(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;

    fn at(secs: i64) -> Timestamp {
        DateTime::from_timestamp(secs, 0).unwrap()
    }

    fn failure() -> FailureDetails {
        FailureDetails::new("Boom", "it broke")
    }

    #[test]
    fn exponential_backoff_is_capped() {
        let policy = RetryPolicy::new(10, Duration::from_secs(1))
            .and_then(|policy| policy.with_backoff_coefficient(2.0))
            .and_then(|policy| policy.with_max_retry_interval(Duration::from_secs(5)))
            .unwrap();
        let delays: Vec<_> =
            (1..=5).map(|attempt| policy.next_delay(attempt, &failure(), at(0), at(0)).unwrap().as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 5, 5]);
    }

    #[test]
    fn gives_up_after_the_last_attempt() {
        let policy = RetryPolicy::new(3, Duration::from_secs(1)).unwrap();
        assert!(policy.next_delay(2, &failure(), at(0), at(0)).is_some());
        assert!(policy.next_delay(3, &failure(), at(0), at(0)).is_none());
    }

    #[test]
    fn retry_timeout_counts_from_the_first_attempt() {
        let policy =
            RetryPolicy::new(100, Duration::from_secs(10)).unwrap().with_retry_timeout(Duration::from_secs(30));
        assert!(policy.next_delay(1, &failure(), at(0), at(5)).is_some());
        assert!(policy.next_delay(2, &failure(), at(0), at(25)).is_none());
    }

    #[test]
    fn predicate_and_non_retriable_stop_retries() {
        let policy = RetryPolicy::new(5, Duration::from_secs(1)).unwrap().with_handle(|f| f.error_type != "Fatal");
        assert!(policy.next_delay(1, &FailureDetails::new("Fatal", "x"), at(0), at(0)).is_none());
        let mut non_retriable = failure();
        non_retriable.is_non_retriable = true;
        assert!(policy.next_delay(1, &non_retriable, at(0), at(0)).is_none());
        assert!(policy.next_delay(1, &failure(), at(0), at(0)).is_some());
    }

    #[test]
    fn impossible_policies_are_errors_not_panics() {
        assert!(RetryPolicy::new(0, Duration::from_secs(1)).is_err());
        assert!(RetryPolicy::new(1, Duration::ZERO).is_err());
        let policy = RetryPolicy::new(2, Duration::from_secs(5)).unwrap();
        assert!(policy.clone().with_backoff_coefficient(0.5).is_err());
        assert!(policy.clone().with_backoff_coefficient(f64::NAN).is_err());
        assert!(policy.with_max_retry_interval(Duration::from_secs(1)).is_err());
    }
}
