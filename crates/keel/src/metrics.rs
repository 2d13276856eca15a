//! The worker's metrics, in the Prometheus/OpenMetrics text format.
//!
//! A [`Worker`](crate::Worker) owns one [`Metrics`]; its [`Client`](crate::Client)s
//! reach it with [`Client::metrics`](crate::Client::metrics), and `keel-http` serves it
//! as `GET /metrics`. Recording is an atomic add (plus the label lookup for the
//! function's name); nothing is queried until a scrape.
//!
//! What is counted, and where:
//! - `keel_instances_started_total{orchestrator}`: an instance's first episode (the
//!   committed episode whose new history holds `ExecutionStarted`; a continue-as-new
//!   counts as a new start), so instances started by any client of the hub count once,
//!   on the worker that ran them;
//! - `keel_instances_completed_total`, `_failed_total`, `_terminated_total`
//!   `{orchestrator}`: committed episodes whose new status is that terminal status;
//! - `keel_activity_executions_total{activity, outcome}` and
//!   `keel_activity_duration_seconds{activity, outcome}` (histogram); outcome is
//!   `completed`, `failed`, `poison` or `not_registered`;
//! - `keel_episode_duration_seconds` (planning an episode) and
//!   `keel_commit_duration_seconds` (one `commit_episodes` call), histograms;
//! - `keel_lease_takeovers_total{kind}`: deliveries of orchestration work or activity
//!   items with a delivery count above one (an earlier lease ran out);
//! - `keel_poison_items_total{kind}`: items failed as poison;
//! - `keel_sdk_workers_connected` (gauge): remote (SDK) workers connected now, read
//!   at scrape time from [`RemoteWorkers::connected_workers`]; absent when the worker
//!   has no remote workers or they do not say.
//!
//! The backlog (ready orchestration work, ready activities, pending timers) is not
//! exported yet: the [`Store`](keel_store::Store) has no cheap count of it.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::worker::RemoteWorkers;

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OrchestratorLabel {
    orchestrator: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActivityLabels {
    activity: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// How an activity execution ended, as a label value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivityOutcome {
    /// It returned a result.
    Completed,
    /// It returned an error (or panicked, or its result was too large).
    Failed,
    /// It was failed without running: picked up too many times.
    Poison,
    /// No activity of that name is registered here.
    NotRegistered,
}

impl ActivityOutcome {
    fn label(self) -> &'static str {
        match self {
            ActivityOutcome::Completed => "completed",
            ActivityOutcome::Failed => "failed",
            ActivityOutcome::Poison => "poison",
            ActivityOutcome::NotRegistered => "not_registered",
        }
    }
}

/// Which kind of work item a lease take-over or poison item was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkKind {
    /// Orchestration (or entity) work: an instance's inbox.
    Orchestration,
    /// An activity item.
    Activity,
}

impl WorkKind {
    fn label(self) -> &'static str {
        match self {
            WorkKind::Orchestration => "orchestration",
            WorkKind::Activity => "activity",
        }
    }
}

fn seconds_histogram() -> Histogram {
    // 0.25 ms to about 8 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// The registry of a worker's metrics.
pub struct Metrics {
    registry: Registry,
    started: Family<OrchestratorLabel, Counter>,
    completed: Family<OrchestratorLabel, Counter>,
    failed: Family<OrchestratorLabel, Counter>,
    terminated: Family<OrchestratorLabel, Counter>,
    activity_executions: Family<ActivityLabels, Counter>,
    activity_duration: Family<ActivityLabels, Histogram, fn() -> Histogram>,
    episode_duration: Histogram,
    commit_duration: Histogram,
    lease_takeovers: Family<KindLabel, Counter>,
    poison_items: Family<KindLabel, Counter>,
    sdk_workers: Gauge,
    remote: Option<Arc<dyn RemoteWorkers>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A registry with every metric at zero; the connected-workers gauge reads `remote`.
    pub fn new(remote: Option<Arc<dyn RemoteWorkers>>) -> Metrics {
        let mut registry = Registry::with_prefix("keel");
        let metrics = Metrics {
            registry: Registry::default(),
            started: Family::default(),
            completed: Family::default(),
            failed: Family::default(),
            terminated: Family::default(),
            activity_executions: Family::default(),
            activity_duration: Family::new_with_constructor(seconds_histogram),
            episode_duration: seconds_histogram(),
            commit_duration: seconds_histogram(),
            lease_takeovers: Family::default(),
            poison_items: Family::default(),
            sdk_workers: Gauge::default(),
            remote: None,
        };
        registry.register(
            "instances_started",
            "Instances started (their first episode committed)",
            metrics.started.clone(),
        );
        registry.register("instances_completed", "Instances that completed", metrics.completed.clone());
        registry.register("instances_failed", "Instances that failed", metrics.failed.clone());
        registry.register("instances_terminated", "Instances that were terminated", metrics.terminated.clone());
        registry.register(
            "activity_executions",
            "Activity executions by activity and outcome",
            metrics.activity_executions.clone(),
        );
        registry.register(
            "activity_duration_seconds",
            "Activity execution time by activity and outcome",
            metrics.activity_duration.clone(),
        );
        registry.register(
            "episode_duration_seconds",
            "Time to plan an orchestration episode",
            metrics.episode_duration.clone(),
        );
        registry.register(
            "commit_duration_seconds",
            "Time to commit a batch of episodes",
            metrics.commit_duration.clone(),
        );
        registry.register(
            "lease_takeovers",
            "Deliveries of work whose earlier lease ran out",
            metrics.lease_takeovers.clone(),
        );
        registry.register("poison_items", "Work items failed as poison", metrics.poison_items.clone());
        if remote.as_ref().is_some_and(|remote| remote.connected_workers().is_some()) {
            registry.register(
                "sdk_workers_connected",
                "Remote (SDK) workers connected now",
                metrics.sdk_workers.clone(),
            );
        }
        Metrics { registry, remote, ..metrics }
    }

    /// Every metric in the OpenMetrics text format ([`CONTENT_TYPE`]), which
    /// Prometheus scrapes.
    pub fn encode(&self) -> String {
        if let Some(connected) = self.remote.as_ref().and_then(|remote| remote.connected_workers()) {
            self.sdk_workers.set(i64::try_from(connected).unwrap_or(i64::MAX));
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }

    fn orchestrator(name: &str) -> OrchestratorLabel {
        OrchestratorLabel { orchestrator: name.to_string() }
    }

    /// An instance of `orchestrator` started.
    pub fn instance_started(&self, orchestrator: &str) {
        self.started.get_or_create(&Self::orchestrator(orchestrator)).inc();
    }

    /// An instance of `orchestrator` reached `status`; non-terminal statuses are ignored.
    pub fn instance_finished(&self, orchestrator: &str, status: keel_core::history::RuntimeStatus) {
        use keel_core::history::RuntimeStatus;
        let family = match status {
            RuntimeStatus::Completed => &self.completed,
            RuntimeStatus::Failed => &self.failed,
            RuntimeStatus::Terminated => &self.terminated,
            _ => return,
        };
        family.get_or_create(&Self::orchestrator(orchestrator)).inc();
    }

    /// An execution of `activity` ended with `outcome` after `elapsed`.
    pub fn activity_executed(&self, activity: &str, outcome: ActivityOutcome, elapsed: Duration) {
        let labels = ActivityLabels { activity: activity.to_string(), outcome: outcome.label() };
        self.activity_executions.get_or_create(&labels).inc();
        self.activity_duration.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }

    /// An episode took `elapsed` to plan.
    pub fn episode_planned(&self, elapsed: Duration) {
        self.episode_duration.observe(elapsed.as_secs_f64());
    }

    /// A `commit_episodes` call took `elapsed`.
    pub fn episodes_committed(&self, elapsed: Duration) {
        self.commit_duration.observe(elapsed.as_secs_f64());
    }

    /// Work of `kind` was delivered again after an earlier lease ran out.
    pub fn lease_taken_over(&self, kind: WorkKind) {
        self.lease_takeovers.get_or_create(&KindLabel { kind: kind.label() }).inc();
    }

    /// Work of `kind` was failed as poison.
    pub fn poison_item(&self, kind: WorkKind) {
        self.poison_items.get_or_create(&KindLabel { kind: kind.label() }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entity_episode::EntityEpisode;
    use crate::episode::RemoteEpisode;
    use keel_store::ActivityItem;

    struct TwoWorkers;

    impl RemoteWorkers for TwoWorkers {
        fn offer_orchestration(&self, episode: Box<RemoteEpisode>) -> Result<(), Box<RemoteEpisode>> {
            Err(episode)
        }
        fn offer_activity(&self, item: Box<ActivityItem>) -> Result<(), Box<ActivityItem>> {
            Err(item)
        }
        fn offer_entity(&self, episode: Box<EntityEpisode>) -> Result<(), Box<EntityEpisode>> {
            Err(episode)
        }
        fn connected_workers(&self) -> Option<usize> {
            Some(2)
        }
    }

    #[test]
    fn the_text_has_the_recorded_values_under_keel_names() {
        let metrics = Metrics::new(Some(Arc::new(TwoWorkers)));
        metrics.instance_started("Greet");
        metrics.instance_finished("Greet", keel_core::history::RuntimeStatus::Completed);
        metrics.instance_finished("Greet", keel_core::history::RuntimeStatus::Running);
        metrics.activity_executed("SayHello", ActivityOutcome::Completed, Duration::from_millis(3));
        metrics.lease_taken_over(WorkKind::Activity);
        let text = metrics.encode();
        for line in [
            "keel_instances_started_total{orchestrator=\"Greet\"} 1",
            "keel_instances_completed_total{orchestrator=\"Greet\"} 1",
            "keel_activity_executions_total{activity=\"SayHello\",outcome=\"completed\"} 1",
            "keel_activity_duration_seconds_count{activity=\"SayHello\",outcome=\"completed\"} 1",
            "keel_lease_takeovers_total{kind=\"activity\"} 1",
            "keel_sdk_workers_connected 2",
            "# EOF",
        ] {
            assert!(text.lines().any(|got| got == line), "{line} in\n{text}");
        }
        assert!(!Metrics::new(None).encode().contains("sdk_workers"), "no gauge without remote workers");
    }
}
