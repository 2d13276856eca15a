//! Orchestration versions and the worker's version policy, as the Durable Task
//! Scheduler defines them for SDK workers.
//!
//! Every instance carries a version, stamped when it starts (the start option, else the
//! worker's default version; a sub-orchestration gets its parent's) and changed only by
//! a continue-as-new that asks for another. A worker declares the version of its build
//! and which instances it may run ([`VersionMatch`]); an instance it may not run is left
//! for another worker or failed ([`VersionFailure`]). Several versions of one
//! orchestrator can be registered side by side
//! ([`crate::WorkerBuilder::orchestration_version`]).

use std::cmp::Ordering;

/// Which instances a worker may run, by their version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VersionMatch {
    /// Any instance, whatever its version.
    #[default]
    Any,
    /// Only instances of exactly the worker's version.
    Strict,
    /// Instances of the worker's version or older (an unversioned instance is the
    /// oldest); never newer ones.
    CurrentOrOlder,
}

/// What a worker does with an instance its [`VersionMatch`] does not allow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VersionFailure {
    /// Leave it for another worker (it is given back, which does not count toward
    /// poison).
    #[default]
    Reject,
    /// Fail the instance (error type [`VERSION_MISMATCH_ERROR_TYPE`]).
    Fail,
}

/// Error type of an instance failed because its version does not match the worker's.
pub const VERSION_MISMATCH_ERROR_TYPE: &str = "VersionMismatch";

/// A worker's version policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Versioning {
    /// The version of this worker's code.
    pub version: Option<String>,
    /// The version stamped on instances started without one (by this worker's client).
    pub default_version: Option<String>,
    /// Which instances this worker may run, by their version.
    pub match_strategy: VersionMatch,
    /// What it does with the instances it may not run.
    pub failure_strategy: VersionFailure,
}

impl Versioning {
    /// Whether this worker may run an instance of `instance_version`.
    pub fn may_run(&self, instance_version: Option<&str>) -> bool {
        match self.match_strategy {
            VersionMatch::Any => true,
            VersionMatch::Strict => instance_version == self.version.as_deref(),
            VersionMatch::CurrentOrOlder => {
                compare_versions(instance_version, self.version.as_deref()) != Ordering::Greater
            }
        }
    }
}

/// Orders versions: dot-separated parts compare as numbers when both are numbers, else
/// as text (`1.9 < 1.10`, `2 < 2.1`); no version is older than every version.
pub fn compare_versions(a: Option<&str>, b: Option<&str>) -> Ordering {
    match (a, b) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Less,
        (Some(_), None) => Ordering::Greater,
        (Some(a), Some(b)) => {
            let mut left = a.split('.');
            let mut right = b.split('.');
            loop {
                match (left.next(), right.next()) {
                    (None, None) => return Ordering::Equal,
                    (None, Some(_)) => return Ordering::Less,
                    (Some(_), None) => return Ordering::Greater,
                    (Some(x), Some(y)) => {
                        let order = match (x.parse::<u64>(), y.parse::<u64>()) {
                            (Ok(x), Ok(y)) => x.cmp(&y),
                            _ => x.cmp(y),
                        };
                        if order != Ordering::Equal {
                            return order;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_by_their_numeric_parts() {
        assert_eq!(compare_versions(Some("1.9"), Some("1.10")), Ordering::Less);
        assert_eq!(compare_versions(Some("2"), Some("2.1")), Ordering::Less);
        assert_eq!(compare_versions(Some("2.0"), Some("2.0")), Ordering::Equal);
        assert_eq!(compare_versions(None, Some("0")), Ordering::Less);
        assert_eq!(compare_versions(Some("beta"), Some("alpha")), Ordering::Greater);
    }

    #[test]
    fn match_strategies_decide_which_instances_a_worker_runs() {
        let worker =
            |match_strategy| Versioning { version: Some("2.0".into()), match_strategy, ..Versioning::default() };
        assert!(worker(VersionMatch::Any).may_run(Some("9")));
        assert!(worker(VersionMatch::Strict).may_run(Some("2.0")));
        assert!(!worker(VersionMatch::Strict).may_run(Some("1.0")));
        assert!(!worker(VersionMatch::Strict).may_run(None));
        assert!(worker(VersionMatch::CurrentOrOlder).may_run(Some("1.5")));
        assert!(worker(VersionMatch::CurrentOrOlder).may_run(None));
        assert!(!worker(VersionMatch::CurrentOrOlder).may_run(Some("2.1")));
    }
}
