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
//! - `keel_episodes_committed_total`: orchestration episodes and entity batches this
//!   worker committed (episodes of SDK workers are committed by the gRPC server and not
//!   counted here);
//! - `keel_sdk_workers_connected` (gauge): remote (SDK) workers connected now, read
//!   at scrape time from [`RemoteWorkers::connected_workers`]; absent when the worker
//!   has no remote workers or they do not say.
//!
//! The task hub's gauges are read at scrape time too, from
//! [`Store::hub_stats`](keel_store::Store::hub_stats), which the caller passes to
//! [`Metrics::encode`] (they are left out when it has none, e.g. the store failed):
//! - `keel_backlog_orchestrations`: instances and entities with messages a worker could
//!   fetch now ([`Backlog::ready_orchestrations`]);
//! - `keel_backlog_activities`: activity items a worker could lease now
//!   ([`Backlog::ready_activities`]);
//! - `keel_backlog_timers`: messages due later: timers, scheduled starts, delayed
//!   signals ([`Backlog::pending_timers`]);
//! - `keel_instances{status}`: orchestration instances by status (every status but
//!   `Canceled`, which Keel never sets), and `keel_entities`.
//!
//! [`Metrics::totals`] gives the running totals the hub overview takes its throughput
//! from, and [`Metrics::remote_workers`] the connected SDK workers.

use std::sync::Arc;
use std::time::Duration;

use keel_core::history::{RuntimeStatus, Timestamp};
pub use keel_store::{Backlog, HubStats, InstanceCounts};
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

/// A remote (SDK) worker connected now, as [`RemoteWorkers::workers`] describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteWorker {
    /// Unique among the workers of this process while it runs.
    pub id: String,
    /// The worker's address, when the transport knows it.
    pub peer: Option<std::net::SocketAddr>,
    /// When it connected.
    pub connected_at: Timestamp,
    /// The orchestrators it was given episodes of so far, sorted. The Durable Task
    /// protocol does not announce a worker's functions, so this grows with its work.
    pub orchestrators: Vec<String>,
    /// The activities it was given so far, sorted.
    pub activities: Vec<String>,
    /// The entities (by name) it was given batches of so far, sorted.
    pub entities: Vec<String>,
}

/// Running totals of a worker's counters since it started ([`Metrics::totals`]): the
/// sums over every label of the counters of the same names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// `keel_instances_started_total`.
    pub instances_started: u64,
    /// `keel_instances_{completed,failed,terminated}_total` together.
    pub instances_finished: u64,
    /// `keel_activity_executions_total`, every outcome.
    pub activity_executions: u64,
    /// `keel_episodes_committed_total`.
    pub episodes_committed: u64,
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
    episodes: Counter,
    sdk_workers: Gauge,
    /// Unlabelled sums for [`Metrics::totals`].
    started_total: Counter,
    finished_total: Counter,
    activities_total: Counter,
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
            episodes: Counter::default(),
            sdk_workers: Gauge::default(),
            started_total: Counter::default(),
            finished_total: Counter::default(),
            activities_total: Counter::default(),
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
        registry.register(
            "episodes_committed",
            "Orchestration episodes and entity batches committed",
            metrics.episodes.clone(),
        );
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
    /// Prometheus scrapes, with the task hub's gauges from `hub` (read by the caller
    /// with [`Store::hub_stats`](keel_store::Store::hub_stats) just before; `None`
    /// leaves them out).
    pub fn encode(&self, hub: Option<&HubStats>) -> String {
        use prometheus_client::encoding::text;

        if let Some(connected) = self.remote.as_ref().and_then(|remote| remote.connected_workers()) {
            self.sdk_workers.set(gauge_value(connected as u64));
        }
        let mut out = String::new();
        text::encode_registry(&mut out, &self.registry).expect("writing to a String cannot fail");
        if let Some(hub) = hub {
            text::encode_registry(&mut out, &hub_registry(hub)).expect("writing to a String cannot fail");
        }
        text::encode_eof(&mut out).expect("writing to a String cannot fail");
        out
    }

    /// The running totals since the worker started.
    pub fn totals(&self) -> Totals {
        Totals {
            instances_started: self.started_total.get(),
            instances_finished: self.finished_total.get(),
            activity_executions: self.activities_total.get(),
            episodes_committed: self.episodes.get(),
        }
    }

    /// The remote (SDK) workers connected now ([`RemoteWorkers::workers`]); empty
    /// without remote workers.
    pub fn remote_workers(&self) -> Vec<RemoteWorker> {
        self.remote.as_ref().map(|remote| remote.workers()).unwrap_or_default()
    }

    fn orchestrator(name: &str) -> OrchestratorLabel {
        OrchestratorLabel { orchestrator: name.to_string() }
    }

    /// An instance of `orchestrator` started.
    pub fn instance_started(&self, orchestrator: &str) {
        self.started.get_or_create(&Self::orchestrator(orchestrator)).inc();
        self.started_total.inc();
    }

    /// An instance of `orchestrator` reached `status`; non-terminal statuses are ignored.
    pub fn instance_finished(&self, orchestrator: &str, status: RuntimeStatus) {
        let family = match status {
            RuntimeStatus::Completed => &self.completed,
            RuntimeStatus::Failed => &self.failed,
            RuntimeStatus::Terminated => &self.terminated,
            _ => return,
        };
        family.get_or_create(&Self::orchestrator(orchestrator)).inc();
        self.finished_total.inc();
    }

    /// An execution of `activity` ended with `outcome` after `elapsed`.
    pub fn activity_executed(&self, activity: &str, outcome: ActivityOutcome, elapsed: Duration) {
        let labels = ActivityLabels { activity: activity.to_string(), outcome: outcome.label() };
        self.activity_executions.get_or_create(&labels).inc();
        self.activity_duration.get_or_create(&labels).observe(elapsed.as_secs_f64());
        self.activities_total.inc();
    }

    /// An episode took `elapsed` to plan.
    pub fn episode_planned(&self, elapsed: Duration) {
        self.episode_duration.observe(elapsed.as_secs_f64());
    }

    /// A `commit_episodes` call took `elapsed` and committed `committed` episodes (the
    /// others lost their lease, or the call failed).
    pub fn episodes_committed(&self, elapsed: Duration, committed: usize) {
        self.commit_duration.observe(elapsed.as_secs_f64());
        self.episodes.inc_by(committed as u64);
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

/// A count as a gauge's value.
fn gauge_value(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// The task hub's gauges, set from `hub`, in a registry of their own.
fn hub_registry(hub: &HubStats) -> Registry {
    let mut registry = Registry::with_prefix("keel");
    let Backlog { ready_orchestrations, ready_activities, pending_timers } = hub.backlog;
    for (name, help, value) in [
        (
            "backlog_orchestrations",
            "Instances and entities with messages a worker could fetch now",
            ready_orchestrations,
        ),
        ("backlog_activities", "Activity items a worker could lease now", ready_activities),
        ("backlog_timers", "Messages due later: timers, scheduled starts, delayed signals", pending_timers),
        ("entities", "Entities in the task hub", hub.entities),
    ] {
        let gauge: Gauge = Gauge::default();
        gauge.set(gauge_value(value));
        registry.register(name, help, gauge);
    }
    let instances = Family::<StatusLabel, Gauge>::default();
    // Keel never sets Canceled (a DTFx status kept for the protocol's numbers).
    for (status, count) in hub.instances.iter().filter(|(status, _)| *status != RuntimeStatus::Canceled) {
        instances.get_or_create(&StatusLabel { status: status.as_str() }).set(gauge_value(count));
    }
    registry.register("instances", "Orchestration instances in the task hub by status", instances);
    registry
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
    fn the_hub_gauges_come_from_the_stats_given_and_totals_sum_the_labels() {
        let metrics = Metrics::new(None);
        let mut hub = HubStats::default();
        hub.instances.add(RuntimeStatus::Running, 4);
        hub.entities = 2;
        hub.backlog = Backlog { ready_orchestrations: 3, ready_activities: 5, pending_timers: 7 };
        let text = metrics.encode(Some(&hub));
        for line in [
            "keel_backlog_orchestrations 3",
            "keel_backlog_activities 5",
            "keel_backlog_timers 7",
            "keel_entities 2",
            "keel_instances{status=\"Running\"} 4",
            "keel_instances{status=\"Pending\"} 0",
        ] {
            assert!(text.lines().any(|got| got == line), "{line} in\n{text}");
        }
        assert!(!text.contains("Canceled"), "a status Keel never sets is left out");
        assert_eq!(text.lines().filter(|line| *line == "# EOF").count(), 1, "one end, last");
        assert_eq!(text.lines().last(), Some("# EOF"));
        assert!(!metrics.encode(None).contains("keel_backlog"), "no hub stats, no hub gauges");

        metrics.instance_started("A");
        metrics.instance_started("B");
        metrics.instance_finished("A", RuntimeStatus::Failed);
        metrics.instance_finished("B", RuntimeStatus::Suspended);
        metrics.activity_executed("X", ActivityOutcome::Failed, Duration::ZERO);
        metrics.episodes_committed(Duration::ZERO, 3);
        let totals =
            Totals { instances_started: 2, instances_finished: 1, activity_executions: 1, episodes_committed: 3 };
        assert_eq!(metrics.totals(), totals);
        assert!(metrics.encode(None).lines().any(|line| line == "keel_episodes_committed_total 3"));
        assert!(metrics.remote_workers().is_empty(), "no remote workers");
    }

    #[test]
    fn the_text_has_the_recorded_values_under_keel_names() {
        let metrics = Metrics::new(Some(Arc::new(TwoWorkers)));
        metrics.instance_started("Greet");
        metrics.instance_finished("Greet", RuntimeStatus::Completed);
        metrics.instance_finished("Greet", RuntimeStatus::Running);
        metrics.activity_executed("SayHello", ActivityOutcome::Completed, Duration::from_millis(3));
        metrics.lease_taken_over(WorkKind::Activity);
        let text = metrics.encode(None);
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
        assert!(!Metrics::new(None).encode(None).contains("sdk_workers"), "no gauge without remote workers");
    }
}
