//! `GET …/overview` (a Keel addition, under the management API's base paths and behind
//! the API key): the task hub at a glance, for the dashboard.
//!
//! ```text
//! { "instances": {"Pending":0,"Running":0,"Completed":0,"ContinuedAsNew":0,"Failed":0,"Terminated":0,"Suspended":0},
//!   "entities": 0,
//!   "backlog": {"orchestrations":0,"activities":0,"timers":0},
//!   "throughput": {"intervalSeconds":10, "points":[{"time":"2026-12-01T10:00:00.000Z","instancesStarted":0,
//!                  "instancesFinished":0,"activitiesCompleted":0,"episodes":0,"backlogOrchestrations":0,
//!                  "backlogActivities":0,"backlogTimers":0}]},
//!   "workers": [{"id":"1","peer":"127.0.0.1:50123","connectedAt":"2026-12-01T10:00:00.000Z",
//!                "orchestrators":["A"],"activities":["B"],"entities":["counter"]}] }
//! ```
//!
//! - `instances`, `entities`, `backlog`: the store's `hub_stats` read for the
//!   request (`Canceled`, a status Keel never sets, is not listed; `backlog` as
//!   [`Backlog`] defines it: `orchestrations` ready instances and entities,
//!   `activities` ready activity items, `timers` messages due later).
//! - `throughput`: what [`Throughput::sample`] recorded, one point per interval, oldest
//!   first, over the last [`Throughput::WINDOW`] (at most [`Throughput::MAX_POINTS`]
//!   points). `intervalSeconds` is the interval in seconds: a whole number unless the
//!   host was given a sub-second interval (then a fraction, e.g. `0.25`). A point's
//!   counts are the increments over its interval of the worker's counters
//!   ([`keel::metrics::Totals`]: `instancesStarted`, `instancesFinished` (completed,
//!   failed or terminated), `activitiesCompleted` (activity executions that ended,
//!   whatever their outcome), `episodes` (episodes and entity batches committed)); its
//!   backlog numbers were read at its `time`, the end of the interval (`null` when the
//!   store could not be read then). Work that SDK workers do is committed by the gRPC
//!   server and is not in the worker's counters.
//! - `workers`: the SDK workers connected over gRPC now
//!   ([`keel::metrics::Metrics::remote_workers`]; `[]` without a gRPC endpoint): an
//!   id, the peer address (`null` when unknown), the connection time and the names of
//!   the functions it was given work of so far (the protocol does not have a worker
//!   announce its functions).
//!
//! Times are ISO 8601 UTC with milliseconds.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::routing::get;
use axum::{Json, Router};
use keel::metrics::{Backlog, RemoteWorker, Totals};
use keel::{RuntimeStatus, Timestamp};
use serde_json::{json, Value};

use crate::error::ApiResult;
use crate::payload::event_time;

/// The route, relative to the management API's base path.
pub(crate) fn routes() -> Router {
    Router::new().route("/overview", get(overview))
}

/// One interval of the throughput history.
#[derive(Clone, Debug)]
struct Point {
    /// The end of the interval.
    time: Timestamp,
    /// The counters' increments over the interval.
    counted: Totals,
    /// The backlog read at `time`; `None` when the store failed.
    backlog: Option<Backlog>,
}

/// The throughput history of a host: a bounded ring buffer of points, filled by
/// [`Throughput::sample`], which the host runs as a task of its own. Clones share the
/// buffer.
#[derive(Clone, Debug)]
pub struct Throughput {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    interval: Duration,
    capacity: usize,
    points: Mutex<VecDeque<Point>>,
}

impl Throughput {
    /// How far back the points reach.
    pub const WINDOW: Duration = Duration::from_secs(600);
    /// The most points kept, whatever the interval (an interval shorter than 600 ms
    /// covers less than [`Throughput::WINDOW`]).
    pub const MAX_POINTS: usize = 1_000;
    /// The shortest interval; shorter ones are taken as this.
    pub const MIN_INTERVAL: Duration = Duration::from_millis(1);

    /// An empty history whose points are `interval` apart.
    pub fn new(interval: Duration) -> Throughput {
        let interval = interval.max(Throughput::MIN_INTERVAL);
        let per_window = Throughput::WINDOW.as_nanos().div_ceil(interval.as_nanos());
        let capacity = usize::try_from(per_window).unwrap_or(usize::MAX).clamp(1, Throughput::MAX_POINTS);
        let points = Mutex::new(VecDeque::with_capacity(capacity));
        Throughput { inner: Arc::new(Inner { interval, capacity, points }) }
    }

    /// The time between two points.
    pub fn interval(&self) -> Duration {
        self.inner.interval
    }

    /// Adds a point at the end of every interval, forever: the increments of the
    /// client's worker counters ([`keel::Client::metrics`]; zeros for a client without
    /// a worker) and the backlog read from its store then. Dropping the future stops it.
    pub async fn sample(self, client: keel::Client) {
        let interval = self.inner.interval;
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let totals = |client: &keel::Client| client.metrics().map(|metrics| metrics.totals()).unwrap_or_default();
        let mut previous = totals(&client);
        loop {
            ticks.tick().await;
            let time = chrono::Utc::now();
            let now = totals(&client);
            let backlog = match client.store().hub_stats(time).await {
                Ok(stats) => Some(stats.backlog),
                Err(error) => {
                    tracing::warn!(%error, "reading the backlog for the overview failed");
                    None
                }
            };
            self.push(Point { time, counted: increments(previous, now), backlog });
            previous = now;
        }
    }

    fn push(&self, point: Point) {
        let mut points = self.inner.points.lock().unwrap_or_else(PoisonError::into_inner);
        if points.len() == self.inner.capacity {
            points.pop_front();
        }
        points.push_back(point);
    }

    fn points(&self) -> Vec<Point> {
        self.inner.points.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned().collect()
    }

    /// The `throughput` object.
    fn to_json(&self) -> Value {
        let points: Vec<Value> = self.points().iter().map(point_json).collect();
        json!({ "intervalSeconds": seconds(self.inner.interval), "points": points })
    }
}

/// What the counters went up by from `before` to `after`.
fn increments(before: Totals, after: Totals) -> Totals {
    Totals {
        instances_started: after.instances_started.saturating_sub(before.instances_started),
        instances_finished: after.instances_finished.saturating_sub(before.instances_finished),
        activity_executions: after.activity_executions.saturating_sub(before.activity_executions),
        episodes_committed: after.episodes_committed.saturating_sub(before.episodes_committed),
    }
}

/// A duration in seconds: a whole number when it is one, else a fraction.
fn seconds(duration: Duration) -> Value {
    match duration.subsec_nanos() {
        0 => json!(duration.as_secs()),
        _ => json!(duration.as_secs_f64()),
    }
}

fn point_json(point: &Point) -> Value {
    let backlog = point.backlog.as_ref();
    json!({
        "time": event_time(point.time),
        "instancesStarted": point.counted.instances_started,
        "instancesFinished": point.counted.instances_finished,
        "activitiesCompleted": point.counted.activity_executions,
        "episodes": point.counted.episodes_committed,
        "backlogOrchestrations": backlog.map(|backlog| backlog.ready_orchestrations),
        "backlogActivities": backlog.map(|backlog| backlog.ready_activities),
        "backlogTimers": backlog.map(|backlog| backlog.pending_timers),
    })
}

fn worker_json(worker: &RemoteWorker) -> Value {
    json!({
        "id": worker.id,
        "peer": worker.peer.map(|peer| peer.to_string()),
        "connectedAt": event_time(worker.connected_at),
        "orchestrators": worker.orchestrators,
        "activities": worker.activities,
        "entities": worker.entities,
    })
}

/// `GET …/overview`: see the module's documentation.
async fn overview(axum::Extension(context): axum::Extension<crate::HostContext>) -> ApiResult<Json<Value>> {
    let client = &context.client;
    let stats = client.store().hub_stats(chrono::Utc::now()).await.map_err(keel::ClientError::Store)?;
    let instances: serde_json::Map<String, Value> = stats
        .instances
        .iter()
        // Keel never sets Canceled (a DTFx status kept for the protocol's numbers).
        .filter(|(status, _)| *status != RuntimeStatus::Canceled)
        .map(|(status, count)| (status.as_str().to_string(), json!(count)))
        .collect();
    let workers: Vec<Value> =
        client.metrics().map(|metrics| metrics.remote_workers()).unwrap_or_default().iter().map(worker_json).collect();
    Ok(Json(json!({
        "instances": instances,
        "entities": stats.entities,
        "backlog": {
            "orchestrations": stats.backlog.ready_orchestrations,
            "activities": stats.backlog.ready_activities,
            "timers": stats.backlog.pending_timers,
        },
        "throughput": context.throughput.to_json(),
        "workers": workers,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(second: i64, started: u64) -> Point {
        Point {
            time: chrono::DateTime::from_timestamp(1_800_000_000 + second, 0).unwrap(),
            counted: Totals { instances_started: started, ..Totals::default() },
            backlog: (second % 2 == 0).then(Backlog::default),
        }
    }

    #[test]
    fn the_ring_keeps_the_last_window_of_points_oldest_first() {
        let throughput = Throughput::new(Duration::from_secs(10));
        assert_eq!(throughput.inner.capacity, 60, "10 minutes of 10 s intervals");
        for second in 0..70 {
            throughput.push(point(second, second as u64));
        }
        let json = throughput.to_json();
        assert_eq!(json["intervalSeconds"], json!(10));
        let points = json["points"].as_array().unwrap();
        assert_eq!(points.len(), 60);
        assert_eq!(points[0]["instancesStarted"], 10, "the oldest ten went");
        assert_eq!(points[59]["instancesStarted"], 69);
        assert_eq!(points[0]["backlogTimers"], 0);
        assert_eq!(points[1]["backlogTimers"], Value::Null, "no backlog read: null");
        assert!(points[0]["time"].as_str().unwrap().ends_with(".000Z"));

        let fast = Throughput::new(Duration::from_millis(250));
        assert_eq!(fast.to_json()["intervalSeconds"], json!(0.25));
        assert_eq!(fast.inner.capacity, Throughput::MAX_POINTS, "bounded");
        assert_eq!(Throughput::new(Duration::ZERO).interval(), Throughput::MIN_INTERVAL);
    }

    #[test]
    fn increments_are_differences_that_never_go_below_zero() {
        let before =
            Totals { instances_started: 3, instances_finished: 1, activity_executions: 9, episodes_committed: 4 };
        let after =
            Totals { instances_started: 5, instances_finished: 1, activity_executions: 12, episodes_committed: 9 };
        let moved =
            Totals { instances_started: 2, instances_finished: 0, activity_executions: 3, episodes_committed: 5 };
        assert_eq!(increments(before, after), moved);
        assert_eq!(increments(after, before), Totals::default());
    }
}
