//! The worker: the orchestration and activity dispatchers that take work from a task
//! hub, run it and commit the results.
//!
//! The orchestration dispatcher locks a batch of instances, runs one episode for each
//! (on an execution kept in memory from the previous episode when its history has not
//! changed since, else on a fresh replay) and commits the whole batch. The activity
//! dispatcher leases activity items, runs each in its own task under a concurrency
//! limit, and commits results in batches. A heartbeat task renews every lease the
//! worker holds (the batch in progress, the activities until their results are
//! recorded), so leases can be short and a dead worker's work is taken over within
//! one lease. Both dispatchers sleep when idle, woken by the store's notifications, by
//! the next timer due, or by a fallback poll (`idle_poll`) that finds work written by
//! other processes and work whose lease ran out.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use keel_core::failure::Failure;
use keel_core::handle::{Activity, Orchestration};
use keel_core::history::{EventKind, FailureDetails, HistoryEvent};
use keel_core::limits;
use keel_core::replay::Execution;
use keel_store::{
    ActivityCompletion, ActivityItem, ActivityLock, EpisodeCommit, InstanceRecord, Message, OrchestrationItem,
    OrchestrationLock, Store,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::activity::{ActivityContext, ErasedActivity};
use crate::client::Client;
use crate::clock::{Clock, SystemClock};
use crate::entity::{EntityContext, EntityError, ENTITY_NOT_REGISTERED_ERROR_TYPE};
use crate::entity_episode::{prepare_entity, EntityEpisode, EntityIntake};
use crate::episode::{self, Plan, RemoteEpisode, RemoteIntake, Resume};
use crate::metrics::{ActivityOutcome, WorkKind as MetricKind};
use crate::registry::Registry;
use crate::telemetry;
use crate::versioning::{VersionFailure, Versioning, VERSION_MISMATCH_ERROR_TYPE};

mod direct;

/// Workers outside this process (connected over the Durable Task gRPC protocol) that
/// run the orchestrators and activities this worker does not host.
pub trait RemoteWorkers: Send + Sync + 'static {
    /// Hands over an episode; gives it back when no remote worker can take it now.
    fn offer_orchestration(&self, episode: Box<RemoteEpisode>) -> Result<(), Box<RemoteEpisode>>;
    /// Hands over an activity item; gives it back when no remote worker can take it now.
    fn offer_activity(&self, item: Box<ActivityItem>) -> Result<(), Box<ActivityItem>>;
    /// Hands over an entity batch; gives it back when no remote worker can take it now.
    fn offer_entity(&self, episode: Box<EntityEpisode>) -> Result<(), Box<EntityEpisode>>;
    /// How many remote workers are connected now, for the metrics (`None`: unknown,
    /// and the gauge is left out).
    fn connected_workers(&self) -> Option<usize> {
        None
    }
    /// The remote workers connected now, for the hub overview (empty: none, or they do
    /// not say).
    fn workers(&self) -> Vec<crate::metrics::RemoteWorker> {
        Vec::new()
    }
    /// The history of an instance's execution as the remote workers last committed it,
    /// if they kept it and it is still `history_len` events long (then the dispatcher
    /// need not read it from the store); taken, not copied.
    fn take_history(&self, instance_id: &str, execution_id: &str, history_len: u64) -> Option<Vec<HistoryEvent>> {
        let _ = (instance_id, execution_id, history_len);
        None
    }
}

/// How long work for remote workers waits before it is offered again when none is
/// connected.
const REMOTE_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Error type of an activity that is not registered on the worker that took it.
pub const ACTIVITY_NOT_REGISTERED_ERROR_TYPE: &str = "ActivityNotRegistered";

/// Tuning knobs of a worker.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// Most instances processed in one orchestration batch (one commit).
    pub max_concurrent_orchestrations: usize,
    /// Most activities running at once.
    pub max_concurrent_activities: usize,
    /// How long an instance stays locked to this worker per episode; renewed while the
    /// episode's batch is in progress (see [`WorkerOptions::activity_lease`]).
    pub orchestration_lease: Duration,
    /// How long an activity item stays leased. The worker's heartbeat renews the leases
    /// it holds every third of the shorter lease (those held for a sixth of a lease or
    /// more), while the activity runs and until its result is recorded, so the work of
    /// a worker that died is taken over at most one lease after the death. Both leases
    /// are 10 s by default: renewed every 3.3 s.
    pub activity_lease: Duration,
    /// How often an idle dispatcher looks for work that no notification announced
    /// (work written by another process, and work whose lease ran out because its
    /// worker died: failover takes up to a lease plus this). 500 ms by default.
    pub idle_poll: Duration,
    /// Most executions kept in memory between episodes.
    pub execution_cache_size: usize,
    /// Which orchestration versions this worker runs, and the version new instances get.
    pub versioning: Versioning,
}

impl Default for WorkerOptions {
    fn default() -> WorkerOptions {
        WorkerOptions {
            max_concurrent_orchestrations: 500,
            max_concurrent_activities: 500,
            orchestration_lease: Duration::from_secs(10),
            activity_lease: Duration::from_secs(10),
            idle_poll: Duration::from_millis(500),
            execution_cache_size: 10_000,
            versioning: Versioning::default(),
        }
    }
}

/// Builds a [`Worker`]: register functions, set options.
pub struct WorkerBuilder {
    store: Arc<dyn Store>,
    registry: Registry,
    options: WorkerOptions,
    clock: Arc<dyn Clock>,
    remote: Option<Arc<dyn RemoteWorkers>>,
}

impl WorkerBuilder {
    /// Registers the orchestration of `handle`:
    /// `async fn(OrchestrationContext, I) -> Result<O, OrchestrationError>`. The compiler
    /// checks the function against the handle's input and output types.
    pub fn orchestration<I, O, F, Fut>(mut self, handle: Orchestration<I, O>, function: F) -> WorkerBuilder
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + 'static,
        F: Fn(keel_core::OrchestrationContext, I) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<O, keel_core::OrchestrationError>> + Send + 'static,
    {
        self.registry.add_orchestrator(handle.name(), None, keel_core::replay::typed_orchestrator(function));
        self
    }

    /// Registers the code of one version of the orchestration of `handle`: instances
    /// started with (or continued as new to) `version` run it; instances of other
    /// versions run the code registered without a version
    /// ([`WorkerBuilder::orchestration`]). Versions of one name live side by side.
    pub fn orchestration_version<I, O, F, Fut>(
        mut self,
        handle: Orchestration<I, O>,
        version: &str,
        function: F,
    ) -> WorkerBuilder
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + 'static,
        F: Fn(keel_core::OrchestrationContext, I) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<O, keel_core::OrchestrationError>> + Send + 'static,
    {
        self.registry.add_orchestrator(handle.name(), Some(version), keel_core::replay::typed_orchestrator(function));
        self
    }

    /// Registers the activity of `handle`: `async fn(ActivityContext, I) -> Result<O, E>`
    /// with the handle's input, output and failure types.
    pub fn activity<I, O, E, F, Fut>(mut self, handle: Activity<I, O, E>, function: F) -> WorkerBuilder
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize,
        E: Failure,
        F: Fn(ActivityContext, I) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<O, E>> + Send + 'static,
    {
        self.registry.add_activity(handle.name(), crate::activity::activity(function));
        self
    }

    /// Registers an entity: a typed state `S` and a handler
    /// `Fn(&mut EntityContext<S>) -> Result<R, EntityError>` that runs one operation
    /// (see [`crate::entity`]).
    pub fn entity<S, R, F>(mut self, name: &str, handler: F) -> WorkerBuilder
    where
        S: Serialize + DeserializeOwned + Default + 'static,
        R: Serialize,
        F: Fn(&mut EntityContext<S>) -> Result<R, EntityError> + Send + Sync + 'static,
    {
        if let Err(message) = keel_core::entity::EntityId::new(name, "key") {
            panic!("entity name '{name}' cannot be registered: {message}");
        }
        self.registry.add_entity(name, crate::entity::entity(handler));
        self
    }

    /// Replaces the tuning knobs and the version policy (see [`WorkerOptions`]).
    pub fn options(mut self, options: WorkerOptions) -> WorkerBuilder {
        self.options = options;
        self
    }

    /// Replaces the clock the worker and its clients read the time from (the system
    /// clock by default): a test or a simulation drives time with its own.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> WorkerBuilder {
        self.clock = clock;
        self
    }

    /// Hands the orchestrators and activities not registered here to remote workers
    /// instead of failing them.
    pub fn remote_workers(mut self, remote: Arc<dyn RemoteWorkers>) -> WorkerBuilder {
        self.remote = Some(remote);
        self
    }

    /// The configured worker; it takes no work until [`Worker::start`]. Panics if
    /// either concurrency limit or either lease of the options is zero.
    pub fn build(self) -> Worker {
        assert!(self.options.max_concurrent_orchestrations > 0);
        assert!(self.options.max_concurrent_activities > 0);
        assert!(!self.options.orchestration_lease.is_zero() && !self.options.activity_lease.is_zero());
        Worker {
            shared: Arc::new(Shared {
                store: self.store,
                registry: Arc::new(self.registry),
                options: self.options,
                clock: self.clock,
                metrics: Arc::new(crate::metrics::Metrics::new(self.remote.clone())),
                remote: self.remote,
            }),
        }
    }
}

struct Shared {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    options: WorkerOptions,
    clock: Arc<dyn Clock>,
    remote: Option<Arc<dyn RemoteWorkers>>,
    metrics: Arc<crate::metrics::Metrics>,
}

/// A configured worker; [`Worker::start`] runs it.
///
/// Functions are registered through their handles, so a function whose signature does
/// not match its handle does not compile:
///
/// ```
/// use std::time::Duration;
/// use keel::{Activity, ActivityContext, Never, Orchestration, OrchestrationContext, OrchestrationError, Outcome, Worker};
///
/// const GREET: Orchestration<Vec<String>, Vec<String>> = Orchestration::new("Greet");
/// const SAY_HELLO: Activity<String, String, Never> = Activity::new("SayHello");
///
/// async fn greet(ctx: OrchestrationContext, cities: Vec<String>) -> Result<Vec<String>, OrchestrationError> {
///     let calls = cities.iter().map(|city| ctx.call(SAY_HELLO, city));
///     Ok(ctx.try_when_all(calls).await?)
/// }
///
/// async fn say_hello(_ctx: ActivityContext, city: String) -> Result<String, Never> {
///     Ok(format!("Hello {city}!"))
/// }
///
/// # #[tokio::main]
/// # async fn main() -> anyhow::Result<()> {
/// let dir = tempfile::tempdir()?;
/// let store = keel::store::open(&format!("sqlite://{}", dir.path().join("hub.db").display())).await?;
/// let worker = Worker::builder(store)
///     .orchestration(GREET, greet)
///     .activity(SAY_HELLO, say_hello)
///     .build()
///     .start();
///
/// let cities = vec!["Tokyo".to_string(), "Lima".to_string()];
/// let instance = worker.client().start(GREET, &cities).await?;
/// let outcome = instance.wait(Duration::from_secs(30)).await?;
/// assert_eq!(outcome, Outcome::Completed(vec!["Hello Tokyo!".to_string(), "Hello Lima!".to_string()]));
///
/// // Running activities get up to five seconds to finish.
/// worker.shutdown(Duration::from_secs(5)).await;
/// # Ok(())
/// # }
/// ```
pub struct Worker {
    shared: Arc<Shared>,
}

impl Worker {
    /// A builder of a worker on `store`: no functions yet, default options, the
    /// system clock.
    pub fn builder(store: Arc<dyn Store>) -> WorkerBuilder {
        WorkerBuilder {
            store,
            registry: Registry::default(),
            options: WorkerOptions::default(),
            clock: Arc::new(SystemClock),
            remote: None,
        }
    }

    /// A client on the same task hub that knows this worker's functions (so starting
    /// an unknown orchestrator is refused up front).
    pub fn client(&self) -> Client {
        Client::with_registry(
            self.shared.store.clone(),
            self.shared.registry.clone(),
            self.shared.remote.is_some(),
            self.shared.options.versioning.default_version.clone(),
            self.shared.clock.clone(),
            self.shared.metrics.clone(),
        )
    }

    /// This worker's metrics ([`crate::metrics`]).
    pub fn metrics(&self) -> Arc<crate::metrics::Metrics> {
        self.shared.metrics.clone()
    }

    /// Replays the task hub's instances that `filter` selects against this worker's
    /// code, without committing anything (see [`crate::verify`]): a deploy check.
    pub async fn verify(
        &self,
        filter: &crate::verify::VerifyFilter,
    ) -> keel_store::Result<crate::verify::VerifyReport> {
        crate::verify::verify_hub(&self.shared.store, &self.shared.registry, filter).await
    }

    /// Replays an exported history (`keel history ID --json`) against this worker's code.
    pub fn verify_export(&self, export: &crate::testing::HistoryExport) -> crate::verify::InstanceVerdict {
        crate::verify::verify_export(&self.shared.registry, export)
    }

    /// Starts the dispatchers and the heartbeat that renews their leases on the current
    /// tokio runtime.
    pub fn start(self) -> WorkerHandle {
        let (shutdown_sender, shutdown) = watch::channel(false);
        let in_flight = Arc::new(InFlight::default());
        let slots = Arc::new(Semaphore::new(self.shared.options.max_concurrent_activities));
        let (committer, to_commit) = mpsc::unbounded_channel();
        let (direct_results, results) = mpsc::unbounded_channel();
        let (local_items, local) = mpsc::unbounded_channel();
        let direct =
            direct::DirectRoutes { results, local: local_items, committer: committer.clone(), slots: slots.clone() };
        let routes = ActivityRoutes { slots, local, direct: direct_results, committer, to_commit };
        let orchestrations =
            tokio::spawn(run_orchestrations(self.shared.clone(), shutdown.clone(), in_flight.clone(), direct));
        let activities = tokio::spawn(run_activities(self.shared.clone(), shutdown, in_flight.clone(), routes));
        let heartbeat = tokio::spawn(heartbeat(self.shared.clone(), in_flight.clone()));
        WorkerHandle {
            client: self.client(),
            shared: self.shared,
            shutdown: shutdown_sender,
            orchestrations,
            activities,
            heartbeat,
            in_flight,
        }
    }
}

/// A running worker. [`WorkerHandle::shutdown`] stops it; dropping the handle instead
/// detaches it (it runs until the runtime stops).
pub struct WorkerHandle {
    client: Client,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    orchestrations: tokio::task::JoinHandle<()>,
    activities: tokio::task::JoinHandle<()>,
    heartbeat: tokio::task::JoinHandle<()>,
    in_flight: Arc<InFlight>,
}

impl WorkerHandle {
    /// A client on the worker's task hub that knows its functions ([`Worker::client`]).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The worker's metrics ([`crate::metrics`]).
    pub fn metrics(&self) -> Arc<crate::metrics::Metrics> {
        self.shared.metrics.clone()
    }

    /// Stops taking work, lets running activities finish for up to `deadline`, then
    /// gives the unfinished ones back to the task hub so another worker takes them at once.
    pub async fn shutdown(self, deadline: Duration) {
        let _ = self.shutdown.send(true);
        let _ = self.orchestrations.await;
        let drained = tokio::time::timeout(deadline, self.in_flight.drained()).await.is_ok();
        self.activities.abort();
        let _ = self.activities.await;
        if !drained {
            let now = self.shared.clock.now();
            for lock in self.in_flight.take_all() {
                if let Err(error) = self.shared.store.abandon_activity_item(&lock, now).await {
                    tracing::warn!(%error, "could not give back an activity item at shutdown");
                }
            }
        }
        // Kept to the end: activities that run on until the deadline keep their leases.
        self.heartbeat.abort();
    }
}

/// The leases this worker holds, for the [`heartbeat`] to renew: the activity items it
/// runs, until their results are recorded (shutdown gives back those left), and the
/// instances of the orchestration batch in progress, until its commit.
#[derive(Default)]
struct InFlight {
    locks: Mutex<HashMap<i64, Held<ActivityLock>>>,
    batch: Mutex<Vec<Held<OrchestrationLock>>>,
    changed: Notify,
}

/// A lease and when it was taken or last renewed; `None` once it was lost (another
/// worker has the work), so that it is not renewed again.
struct Held<L> {
    lock: L,
    renewed_at: Option<keel_core::Timestamp>,
}

impl<L: Clone> Held<L> {
    /// The lock, if a sixth of `lease` has passed since the lease was taken or renewed.
    fn due(&self, now: keel_core::Timestamp, lease: Duration) -> Option<L> {
        let age = (now - self.renewed_at?).to_std().ok()?;
        (age >= lease / 6).then(|| self.lock.clone())
    }
}

impl InFlight {
    fn add(&self, lock: ActivityLock, leased_at: keel_core::Timestamp) {
        self.locks.lock().expect("in-flight lock").insert(lock.id, Held { lock, renewed_at: Some(leased_at) });
    }

    fn remove(&self, id: i64) {
        self.locks.lock().expect("in-flight lock").remove(&id);
        self.changed.notify_waiters();
    }

    fn take_all(&self) -> Vec<ActivityLock> {
        self.locks.lock().expect("in-flight lock").drain().map(|(_, held)| held.lock).collect()
    }

    /// Holds the instances of a batch leased at `leased_at` until the guard drops.
    fn hold_batch(&self, items: &[OrchestrationItem], leased_at: keel_core::Timestamp) -> HeldBatch<'_> {
        let held = items.iter().map(|item| Held { lock: item.lock.clone(), renewed_at: Some(leased_at) });
        *self.batch.lock().expect("in-flight lock") = held.collect();
        HeldBatch(self)
    }

    /// The activity leases due for renewal at `now`.
    fn due_activities(&self, now: keel_core::Timestamp, lease: Duration) -> Vec<ActivityLock> {
        self.locks.lock().expect("in-flight lock").values().filter_map(|held| held.due(now, lease)).collect()
    }

    /// The instance leases due for renewal at `now`.
    fn due_orchestrations(&self, now: keel_core::Timestamp, lease: Duration) -> Vec<OrchestrationLock> {
        self.batch.lock().expect("in-flight lock").iter().filter_map(|held| held.due(now, lease)).collect()
    }

    /// Records a renewal of an activity lease at `at` (`None`: the lease was lost);
    /// false if the item is no longer held (its result was recorded meanwhile).
    fn activity_renewed(&self, lock: &ActivityLock, at: Option<keel_core::Timestamp>) -> bool {
        let mut locks = self.locks.lock().expect("in-flight lock");
        let held = locks.get_mut(&lock.id);
        held.map(|held| held.renewed_at = at).is_some()
    }

    /// Records a renewal of an instance lease at `at` (`None`: the lease was lost).
    fn orchestration_renewed(&self, lock: &OrchestrationLock, at: Option<keel_core::Timestamp>) {
        let mut batch = self.batch.lock().expect("in-flight lock");
        if let Some(held) = batch.iter_mut().find(|held| held.lock == *lock) {
            held.renewed_at = at;
        }
    }

    async fn drained(&self) {
        loop {
            let changed = self.changed.notified();
            if self.locks.lock().expect("in-flight lock").is_empty() {
                return;
            }
            changed.await;
        }
    }
}

/// The orchestration batch in progress; its instances are no longer held once it drops.
struct HeldBatch<'a>(&'a InFlight);

impl Drop for HeldBatch<'_> {
    fn drop(&mut self) {
        self.0.batch.lock().expect("in-flight lock").clear();
    }
}

/// Most lease renewals the heartbeat has in progress at once.
const RENEWALS_AT_ONCE: usize = 16;

/// Renews the leases the worker holds ([`InFlight`]) until shutdown aborts it: it beats
/// every third of the shorter lease and renews each lease held for a sixth of its
/// length or more. So a lease held for long is renewed every third of a lease, and
/// always has at least half of it left; work shorter than a sixth of a lease costs no
/// renewal. Work that takes longer than a lease (a long activity, a slow batch, an
/// entity operation that blocks, a result waiting for its commit) keeps its lease, and
/// the work of a worker that died is free at most one lease after its last renewal. It
/// runs in a task of its own, so an activity that awaits for long does not delay it.
async fn heartbeat(shared: Arc<Shared>, in_flight: Arc<InFlight>) {
    let (store, options, in_flight) = (shared.store.as_ref(), &shared.options, in_flight.as_ref());
    let beat = (options.orchestration_lease.min(options.activity_lease) / 3).max(Duration::from_millis(1));
    let mut beats = tokio::time::interval(beat);
    beats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        beats.tick().await;
        let now = shared.clock.now();
        let activities = in_flight.due_activities(now, options.activity_lease);
        futures_util::stream::iter(activities)
            .for_each_concurrent(RENEWALS_AT_ONCE, |lock| async move {
                match store.renew_activity_lease(&lock, options.activity_lease, now).await {
                    Ok(()) => {
                        in_flight.activity_renewed(&lock, Some(now));
                    }
                    Err(keel_store::Error::LeaseLost) => {
                        if in_flight.activity_renewed(&lock, None) {
                            tracing::warn!("an activity lost its lease: another worker may run it too");
                        }
                    }
                    Err(error) => tracing::warn!(%error, "renewing an activity lease failed; trying again"),
                }
            })
            .await;
        let orchestrations = in_flight.due_orchestrations(now, options.orchestration_lease);
        futures_util::stream::iter(orchestrations)
            .for_each_concurrent(RENEWALS_AT_ONCE, |lock| async move {
                match store.renew_orchestration_lease(&lock, options.orchestration_lease, now).await {
                    Ok(()) => in_flight.orchestration_renewed(&lock, Some(now)),
                    // Given back, or settled by a remote worker: no longer this batch's.
                    Err(keel_store::Error::LeaseLost) => in_flight.orchestration_renewed(&lock, None),
                    Err(error) => {
                        tracing::warn!(instance_id = %lock.instance_id, %error, "renewing an instance lease failed; trying again");
                    }
                }
            })
            .await;
    }
}

/// Which dispatcher waits for work.
#[derive(Clone, Copy)]
enum WorkKind {
    Orchestrations,
    Activities,
}

/// Sleeps until new work may be there: a notification, the next due time known in
/// this process, the fallback poll, or shutdown. When the fallback poll fires, the
/// store is asked when its next message is due (timers written by other processes).
/// Returns when [`WorkerHandle::shutdown`] is called. A dropped handle detaches the
/// worker: it runs on until the runtime stops, so this never returns then (a closed
/// channel must not wake the dispatchers in a loop).
async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    if shutdown.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn wait_for_work(shared: &Shared, kind: WorkKind, shutdown: &mut watch::Receiver<bool>) {
    let notifications = shared.store.notifications();
    let now = shared.clock.now();
    let mut sleep_for = shared.options.idle_poll;
    let notify = match kind {
        WorkKind::Orchestrations => {
            if let Some(due) = notifications.next_orchestration_due(now) {
                // A little jitter: workers that wait for the same due item do not all
                // wake at the same instant, so the same one does not always win it
                // (a worker that gives back an instance it may not run, say).
                let until_due = (due - now).to_std().unwrap_or(Duration::ZERO) + poll_jitter(shared.options.idle_poll);
                sleep_for = sleep_for.min(until_due);
            }
            notifications.orchestration_work()
        }
        WorkKind::Activities => notifications.activity_work(),
    };
    let timed_out = tokio::select! {
        _ = notify.notified() => false,
        _ = tokio::time::sleep(sleep_for) => sleep_for == shared.options.idle_poll,
        _ = shutdown_requested(shutdown) => false,
    };
    if timed_out {
        let now = shared.clock.now();
        if let Ok(Some(next)) = shared.store.next_wakeup(now).await {
            notifications.orchestration_work_due(next);
        }
    }
}

/// Most jitter a due wake-up gets: timers must stay on time (a 200 ms timer of an SDK
/// worker resumes within 250 ms).
const MAX_DUE_JITTER: Duration = Duration::from_millis(10);

/// A random delay of up to a fifth of `idle_poll`, at most [`MAX_DUE_JITTER`].
fn poll_jitter(idle_poll: Duration) -> Duration {
    let range = u64::try_from((idle_poll / 5).min(MAX_DUE_JITTER).as_micros()).unwrap_or(u64::MAX).max(1);
    let random = uuid::Uuid::new_v4().as_u64_pair().0;
    Duration::from_micros(random % range)
}

/// How long a worker that gave instances back waits before it looks for work again, so
/// that the workers which may run them take them first.
const REJECT_BACKOFF: Duration = Duration::from_millis(250);

/// Pause after a store error before trying again.
const STORE_ERROR_BACKOFF: Duration = Duration::from_millis(200);

/// Executions kept between episodes, valid while the instance's history is exactly
/// what they have seen. Bounded by `capacity`: the entry put longest ago goes first.
struct ExecutionCache<E = Box<Execution>, R = InstanceRecord> {
    /// By instance id: the generation of the put that stored it, and the execution.
    entries: HashMap<String, (u64, CachedExecution<E, R>)>,
    /// Puts in order, as (instance id, generation); a pair whose generation is no longer
    /// the entry's is stale and skipped (compacted once it outnumbers the entries).
    order: VecDeque<(String, u64)>,
    next_generation: u64,
    capacity: usize,
}

/// An execution kept between episodes, with what its next episode starts from.
struct CachedExecution<E = Box<Execution>, R = InstanceRecord> {
    execution: E,
    execution_id: String,
    history_len: u64,
    /// The instance's row as the last commit left it (for a direct episode).
    record: R,
}

impl<E, R> ExecutionCache<E, R> {
    fn new(capacity: usize) -> ExecutionCache<E, R> {
        ExecutionCache { entries: HashMap::new(), order: VecDeque::new(), next_generation: 0, capacity }
    }

    /// The cached execution of an instance, if its history has not changed since.
    fn take(&mut self, instance_id: &str, execution_id: &str, history_len: u64) -> Option<E> {
        let (_, cached) = self.entries.remove(instance_id)?;
        (cached.execution_id == execution_id && cached.history_len == history_len).then_some(cached.execution)
    }

    /// The cached execution of an instance with the row it was left at.
    fn take_entry(&mut self, instance_id: &str) -> Option<CachedExecution<E, R>> {
        self.entries.remove(instance_id).map(|(_, cached)| cached)
    }

    fn put(&mut self, instance_id: String, cached: CachedExecution<E, R>) {
        if self.capacity == 0 {
            return;
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        self.entries.insert(instance_id.clone(), (generation, cached));
        self.order.push_back((instance_id, generation));
        while self.entries.len() > self.capacity {
            let Some((oldest, generation)) = self.order.pop_front() else { break };
            if self.entries.get(&oldest).is_some_and(|(current, _)| *current == generation) {
                self.entries.remove(&oldest);
            }
        }
        // Each take leaves a stale pair behind: compact when they outnumber the entries,
        // so that a put costs O(1) amortised however many episodes an instance runs.
        if self.order.len() > 2 * self.entries.len().max(16) {
            let entries = &self.entries;
            self.order.retain(|(id, generation)| entries.get(id).is_some_and(|(current, _)| current == generation));
        }
        debug_assert!(self.entries.len() <= self.capacity);
    }
}

/// Most activity results of the direct path one orchestration batch takes.
const DIRECT_BATCH: usize = 1000;

/// While the direct path keeps the orchestration dispatcher busy, it still fetches at
/// least this often (and whenever work was added in this process or a timer is due),
/// so that work from elsewhere (other processes, leases that ran out) waits no longer.
const FETCH_AT_LEAST_EVERY: Duration = Duration::from_millis(10);

/// An episode of the batch in progress, besides its commit.
struct Planned {
    instance_id: String,
    /// The execution to keep for the next episode, with the row as the commit leaves it.
    cached: Option<CachedExecution>,
    /// The execution planned, with the history's length after the commit, until the
    /// row is at hand for `cached`.
    execution: Option<(Box<Execution>, u64)>,
    counted: Option<Counted>,
    traced: Option<Traced>,
    /// The activity items the commit creates leased to this worker.
    leased: Vec<direct::LocalActivity>,
    /// For a direct episode: the results it records (delivered as usual if it fails).
    results: Vec<direct::Finished>,
}

impl Planned {
    /// Keeps the planned execution (if any) with `before`, the instance's row, brought
    /// up to date with `commit`.
    fn keep(&mut self, before: InstanceRecord, commit: &EpisodeCommit) {
        if let Some((execution, history_len)) = self.execution.take() {
            let record = direct::record_after(before, commit, history_len);
            self.cached =
                Some(CachedExecution { execution, execution_id: record.execution_id.clone(), history_len, record });
        }
    }

    fn new(instance_id: &str) -> Planned {
        Planned {
            instance_id: instance_id.to_owned(),
            cached: None,
            execution: None,
            counted: None,
            traced: None,
            leased: Vec::new(),
            results: Vec::new(),
        }
    }
}

async fn run_orchestrations(
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    in_flight: Arc<InFlight>,
    mut direct: direct::DirectRoutes,
) {
    let store = shared.store.as_ref();
    let direct_path = store.direct_episodes();
    let mut cache: ExecutionCache = ExecutionCache::new(shared.options.execution_cache_size);
    // Set when this worker gave instances back for workers of another version.
    let mut back_off = false;
    // Results of the direct path waiting for their episode.
    let mut finished: Vec<direct::Finished> = Vec::new();
    let notifications = store.notifications();
    let mut last_fetch = std::time::Instant::now();
    while !*shutdown.borrow() {
        if std::mem::take(&mut back_off) {
            // Give the workers that may run what this one gave back the first go at it.
            tokio::time::sleep(REJECT_BACKOFF + poll_jitter(shared.options.idle_poll)).await;
        }
        while finished.len() < DIRECT_BATCH {
            let Ok(result) = direct.results.try_recv() else { break };
            finished.push(result);
        }
        let fetched_at = shared.clock.now();
        // With results to play, fetching only pays when there may be other work: a
        // fetch is a write transaction even when it finds nothing.
        let may_skip_fetch = !finished.is_empty()
            && last_fetch.elapsed() < FETCH_AT_LEAST_EVERY
            && !notifications.orchestration_due_by(fetched_at)
            && notifications.orchestration_work().notified().now_or_never().is_none();
        let fetch = async {
            if may_skip_fetch {
                return Ok(Vec::new());
            }
            last_fetch = std::time::Instant::now();
            store
                .fetch_orchestration_items(
                    shared.options.max_concurrent_orchestrations,
                    shared.options.orchestration_lease,
                    fetched_at,
                )
                .await
        };
        let items = match fetch.await {
            Ok(items) => items,
            Err(error) => {
                tracing::warn!(%error, "fetching orchestration work failed");
                tokio::time::sleep(STORE_ERROR_BACKOFF).await;
                continue;
            }
        };
        if items.is_empty() && finished.is_empty() {
            tokio::select! {
                _ = wait_for_work(&shared, WorkKind::Orchestrations, &mut shutdown) => {}
                Some(result) = direct.results.recv() => finished.push(result),
            }
            continue;
        }
        let _held = in_flight.hold_batch(&items, fetched_at);
        let now = shared.clock.now().max(fetched_at);
        let mut commits = Vec::with_capacity(items.len());
        let mut planned = Vec::with_capacity(items.len());
        let mut rejected = false;
        // The instances fetched now, which this batch's direct results must not claim;
        // only needed when there are such results.
        let fetched: std::collections::HashSet<String> = if finished.is_empty() {
            std::collections::HashSet::new()
        } else {
            items.iter().map(|item| item.instance.instance_id.clone()).collect()
        };
        for item in items {
            if item.delivery_attempts > 1 {
                shared.metrics.lease_taken_over(MetricKind::Orchestration);
            }
            let first = commits.len();
            // Every log line of an episode names the instance and the orchestrator.
            let span = tracing::info_span!(
                "episode",
                instance_id = %item.instance.instance_id,
                function = %item.instance.name,
                trace_id = tracing::field::Empty
            );
            async {
                if keel_core::entity::is_entity_instance_id(&item.instance.instance_id) {
                    if let Some(commit) = run_entity(&shared, &item, now).await {
                        planned.push(Planned::new(&item.instance.instance_id));
                        commits.push(commit);
                    }
                    return;
                }
                if let Some(remote) =
                    shared.remote.as_ref().filter(|_| !shared.registry.hosts_orchestrator(&item.instance.name))
                {
                    if let Some(commit) = offer_remote(store, remote.as_ref(), &item, now).await {
                        let mut episode = Planned::new(&item.instance.instance_id);
                        episode.counted = Counted::of(&item.instance.name, &commit);
                        planned.push(episode);
                        commits.push(commit);
                    }
                    return;
                }
                // A termination releases the entity locks the history holds: it needs
                // the history, which a cached execution does not give.
                let terminating = item
                    .messages
                    .iter()
                    .any(|message| matches!(message.message.event.kind, EventKind::ExecutionTerminated { .. }));
                let cached = cache
                    .take(&item.instance.instance_id, &item.instance.execution_id, item.instance.history_len)
                    .filter(|_| !terminating);
                let versioning = &shared.options.versioning;
                if !versioning.may_run(item.instance.version.as_deref()) {
                    rejected = true;
                    if let Some(commit) = refuse_version(store, versioning, &item, now).await {
                        let mut episode = Planned::new(&item.instance.instance_id);
                        episode.counted = Counted::of(&item.instance.name, &commit);
                        planned.push(episode);
                        commits.push(commit);
                    }
                    return;
                }
                let resume = match cached {
                    Some(execution) => Resume { execution: Some(execution), past: Vec::new() },
                    None => match read_past(store, &item).await {
                        Ok(past) => Resume { execution: None, past },
                        Err(error) => {
                            tracing::warn!(%error, "reading history failed");
                            abandon(store, &item, now).await;
                            return;
                        }
                    },
                };
                if let Some((commit, episode)) = plan_episode(&shared, &item, resume, now).await {
                    planned.push(episode);
                    commits.push(commit);
                }
            }
            .instrument(span)
            .await;
            // The row as the commit leaves it goes with the execution kept in memory.
            if let (Some(episode), Some(commit)) = (planned.get_mut(first), commits.get(first)) {
                episode.keep(item.instance, commit);
            }
        }
        back_off = rejected;
        for (instance_id, results) in by_instance(std::mem::take(&mut finished)) {
            let cached = (!fetched.contains(&instance_id)).then(|| cache.take_entry(&instance_id)).flatten();
            let Some(cached) = cached else {
                direct.fall_back(results);
                continue;
            };
            let item = direct::direct_item(cached.record, &results);
            let resume = Resume { execution: Some(cached.execution), past: Vec::new() };
            let span = tracing::info_span!(
                "episode",
                instance_id = %item.instance.instance_id,
                function = %item.instance.name,
                trace_id = tracing::field::Empty
            );
            match plan_episode(&shared, &item, resume, now).instrument(span).await {
                Some((mut commit, mut episode)) => {
                    direct::claim(&mut commit, &item.instance, &results);
                    episode.keep(item.instance, &commit);
                    episode.results = results;
                    planned.push(episode);
                    commits.push(commit);
                }
                _ => direct.fall_back(results),
            }
        }
        if commits.is_empty() {
            continue;
        }
        if direct_path {
            for (commit, episode) in commits.iter_mut().zip(&mut planned) {
                episode.leased = direct::lease_local(&shared, &direct.slots, commit, now);
            }
        }
        let due: Vec<keel_core::Timestamp> = commits.iter().flat_map(|commit| commit.due_times(now)).collect();
        let committing = std::time::Instant::now();
        let committed = store.commit_episodes(commits, now).await;
        let succeeded = committed.as_ref().map_or(0, |results| results.iter().filter(|result| result.is_ok()).count());
        shared.metrics.episodes_committed(committing.elapsed(), succeeded);
        match committed {
            Ok(results) => {
                for at in due {
                    store.notifications().orchestration_work_due(at);
                }
                for (result, episode) in results.into_iter().zip(planned) {
                    let Planned { instance_id, cached, counted, traced, leased, results, .. } = episode;
                    match result {
                        Ok(committed) => {
                            if let Some(counted) = counted {
                                counted.record(&shared.metrics);
                            }
                            if let Some(traced) = traced {
                                traced.emit();
                            }
                            for local in direct::leased_items(leased, committed) {
                                // Closed only once the activity dispatcher stopped (a
                                // shutdown): the item goes back for any worker to take.
                                if let Err(unsent) = direct.local.send(local) {
                                    give_back_activity(store, &unsent.0.item.lock, now).await;
                                }
                            }
                            for (completion, _slot) in results {
                                in_flight.remove(completion.lock.id);
                            }
                            if let Some(cached) = cached {
                                cache.put(instance_id, cached);
                            }
                        }
                        Err(error) => {
                            if results.is_empty() {
                                tracing::warn!(%instance_id, %error, "an episode was not committed; it will run again");
                            }
                            // The instance moved on meanwhile: its results go to its inbox.
                            direct.fall_back(results);
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "committing episodes failed; they will run again");
                for episode in planned {
                    direct.fall_back(episode.results);
                }
                tokio::time::sleep(STORE_ERROR_BACKOFF).await;
            }
        }
    }
    // Results still waiting for an episode are delivered as usual.
    direct.results.close();
    while let Ok(result) = direct.results.try_recv() {
        finished.push(result);
    }
    direct.fall_back(finished);
}

/// Results grouped by instance, in the order of each instance's first result.
fn by_instance(results: Vec<direct::Finished>) -> Vec<(String, Vec<direct::Finished>)> {
    let mut groups: Vec<(String, Vec<direct::Finished>)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for result in results {
        let instance_id = &result.0.result.instance_id;
        match index.get(instance_id) {
            Some(&at) => groups[at].1.push(result),
            None => {
                index.insert(instance_id.clone(), groups.len());
                groups.push((instance_id.clone(), vec![result]));
            }
        }
    }
    groups
}

/// Plans one in-process episode of `item`; `None` when it needs no commit now (given
/// back, or it panicked outside orchestrator code). The [`Planned`] keeps the execution
/// with the row as it was (the caller brings it up to date with the commit).
async fn plan_episode(
    shared: &Shared,
    item: &OrchestrationItem,
    resume: Resume,
    now: keel_core::Timestamp,
) -> Option<(EpisodeCommit, Planned)> {
    let planning = std::time::Instant::now();
    let episode_started = std::time::SystemTime::now();
    let planned = std::panic::catch_unwind(AssertUnwindSafe(|| episode::plan(&shared.registry, item, resume, now)));
    shared.metrics.episode_planned(planning.elapsed());
    match planned {
        Ok(Plan::Commit { commit, execution, history_len, spans }) => {
            if let Some(trace) = &spans.execution {
                tracing::Span::current().record("trace_id", trace.trace_id());
            }
            let mut episode = Planned::new(&item.instance.instance_id);
            episode.execution = execution.map(|execution| (execution, history_len));
            episode.counted = Counted::of(&item.instance.name, &commit);
            episode.traced = telemetry::is_enabled().then(|| Traced {
                instance_id: item.instance.instance_id.clone(),
                name: item.instance.name.clone(),
                spans,
                started: episode_started,
            });
            Some((*commit, episode))
        }
        Ok(Plan::Abandon { retry_at }) => {
            if let Err(error) = shared.store.abandon_orchestration_item(&item.lock, retry_at).await {
                tracing::warn!(%error, "giving back work failed");
            }
            None
        }
        Err(_) => {
            // Not given back: the lease runs out and the delivery counts, so an item
            // that keeps doing this is failed as poison.
            tracing::error!("an episode panicked outside orchestrator code");
            None
        }
    }
}

/// The spans of a committed in-process episode (emitted once it is durable).
struct Traced {
    instance_id: String,
    name: String,
    spans: episode::EpisodeSpans,
    started: std::time::SystemTime,
}

impl Traced {
    fn emit(&self) {
        telemetry::emit_episode_spans(&self.instance_id, &self.name, &self.spans, self.started);
    }
}

/// What a committed episode adds to the instance counters.
struct Counted {
    orchestrator: String,
    started: bool,
    status: Option<keel_core::history::RuntimeStatus>,
    poison: bool,
}

impl Counted {
    fn of(orchestrator: &str, commit: &keel_store::EpisodeCommit) -> Option<Counted> {
        let started = commit.history.iter().any(|event| matches!(event.kind, EventKind::ExecutionStarted { .. }));
        let status = commit.state.as_ref().map(|state| state.status).filter(|status| status.is_terminal());
        if !started && status.is_none() {
            return None;
        }
        let poison = commit
            .state
            .as_ref()
            .and_then(|state| state.failure.as_ref())
            .is_some_and(|failure| failure.error_type == episode::POISON_ERROR_TYPE);
        Some(Counted { orchestrator: orchestrator.to_string(), started, status, poison })
    }

    fn record(&self, metrics: &crate::metrics::Metrics) {
        if self.started {
            metrics.instance_started(&self.orchestrator);
        }
        if let Some(status) = self.status {
            metrics.instance_finished(&self.orchestrator, status);
        }
        if self.poison {
            metrics.poison_item(MetricKind::Orchestration);
        }
    }
}

/// Hands an item whose orchestrator is not hosted here to the remote workers; returns
/// a commit when the item was settled without them.
async fn offer_remote(
    store: &dyn Store,
    remote: &dyn RemoteWorkers,
    item: &OrchestrationItem,
    now: keel_core::Timestamp,
) -> Option<keel_store::EpisodeCommit> {
    let instance = &item.instance;
    let kept = remote.take_history(&instance.instance_id, &instance.execution_id, instance.history_len);
    let history = match kept {
        Some(history) => history,
        None => match read_past(store, item).await {
            Ok(history) => history,
            Err(error) => {
                tracing::warn!(instance_id = %item.instance.instance_id, %error, "reading history failed");
                abandon(store, item, now).await;
                return None;
            }
        },
    };
    let retry_at = match episode::prepare_remote(item, history, now) {
        RemoteIntake::Commit(commit) => return Some(*commit),
        RemoteIntake::Abandon { retry_at } => retry_at,
        RemoteIntake::Run(episode) => match remote.offer_orchestration(episode) {
            Ok(()) => return None,
            Err(_) => now + chrono::Duration::from_std(REMOTE_RETRY_DELAY).expect("a small duration"),
        },
    };
    if let Err(error) = store.abandon_orchestration_item(&item.lock, retry_at).await {
        tracing::warn!(instance_id = %item.instance.instance_id, %error, "giving back work failed");
    }
    None
}

/// An instance whose version this worker may not run: given back for another worker
/// (no commit), or failed (the commit).
async fn refuse_version(
    store: &dyn Store,
    versioning: &Versioning,
    item: &OrchestrationItem,
    now: keel_core::Timestamp,
) -> Option<keel_store::EpisodeCommit> {
    let version = item.instance.version.as_deref().unwrap_or("(none)");
    let mine = versioning.version.as_deref().unwrap_or("(none)");
    match versioning.failure_strategy {
        VersionFailure::Reject => {
            tracing::debug!(instance_id = %item.instance.instance_id, version, "left for a worker of another version");
            // Visible again at once, so that the wake-up of the give-back brings the
            // workers that may run it; this one backs off before it looks again.
            let retry_at = now;
            if let Err(error) = store.abandon_orchestration_item(&item.lock, retry_at).await {
                tracing::warn!(instance_id = %item.instance.instance_id, %error, "giving back work failed");
            }
            None
        }
        VersionFailure::Fail => {
            let failure = FailureDetails::new(
                VERSION_MISMATCH_ERROR_TYPE,
                format!(
                    "the instance has version {version}, which this worker (version {mine}, {:?} match) may not run",
                    versioning.match_strategy
                ),
            );
            let history = read_past(store, item).await.ok()?;
            episode::fail_before_running(item, &history, failure, now)
        }
    }
}

/// Runs the batch of an entity item here, hands it to a remote worker, or fails its
/// operations when nobody hosts the entity; returns the commit when there is one now.
async fn run_entity(
    shared: &Shared,
    item: &OrchestrationItem,
    now: keel_core::Timestamp,
) -> Option<keel_store::EpisodeCommit> {
    let episode = match prepare_entity(item, now) {
        EntityIntake::Commit(commit) => return Some(*commit),
        EntityIntake::Run(episode) => episode,
    };
    if let Some(entity) = shared.registry.entity(&episode.id.name) {
        let span = tracing::info_span!("entity batch", entity = %episode.id, operations = episode.operations.len());
        let _entered = span.enter();
        let started = std::time::SystemTime::now();
        let outcome = run_blocking(|| {
            crate::entity::run_batch(entity, &episode.id, episode.state.clone(), &episode.operations, now)
        });
        if telemetry::is_enabled() {
            telemetry::emit_entity_spans(&episode, &outcome, started);
        }
        return Some(episode.complete(outcome, now));
    }
    let Some(remote) = shared.remote.as_ref() else {
        let failure = FailureDetails::new(
            ENTITY_NOT_REGISTERED_ERROR_TYPE,
            format!("no entity named '{}' is registered on this worker", episode.id.name),
        );
        return Some(episode.fail_all(failure, now));
    };
    if remote.offer_entity(episode).is_err() {
        let retry_at = now + chrono::Duration::from_std(REMOTE_RETRY_DELAY).expect("a small duration");
        if let Err(error) = shared.store.abandon_orchestration_item(&item.lock, retry_at).await {
            tracing::warn!(instance_id = %item.instance.instance_id, %error, "giving back work failed");
        }
    }
    None
}

/// Runs synchronous user code that may block its thread for long (an entity batch). On
/// a multi-threaded runtime the thread's other tasks move to another thread meanwhile
/// (`block_in_place`): a task woken just before stays stranded otherwise, and the
/// heartbeat among them would let the worker's leases run out.
fn run_blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|handle| handle.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

async fn read_past(store: &dyn Store, item: &OrchestrationItem) -> keel_store::Result<Vec<HistoryEvent>> {
    if item.instance.history_len == 0 {
        Ok(Vec::new())
    } else {
        store.read_history(&item.instance.instance_id).await
    }
}

async fn abandon(store: &dyn Store, item: &OrchestrationItem, now: keel_core::Timestamp) {
    let retry_at = now + chrono::Duration::from_std(STORE_ERROR_BACKOFF).expect("a small duration");
    if let Err(error) = store.abandon_orchestration_item(&item.lock, retry_at).await {
        tracing::warn!(instance_id = %item.instance.instance_id, %error, "giving back work failed");
    }
}

/// Most activity results committed in one transaction.
const ACTIVITY_COMMIT_BATCH: usize = 1000;

/// The activity dispatcher's ends of the worker's channels.
struct ActivityRoutes {
    /// The worker's activity slots (shared with the direct path).
    slots: Arc<Semaphore>,
    /// Items this worker's own commits created leased to it ([`direct`]).
    local: mpsc::UnboundedReceiver<direct::LocalActivity>,
    /// Their results, for the orchestration dispatcher's next episode.
    direct: mpsc::UnboundedSender<direct::Finished>,
    /// Results to deliver to the inboxes, and the committer's end of that channel.
    committer: mpsc::UnboundedSender<direct::Finished>,
    to_commit: mpsc::UnboundedReceiver<direct::Finished>,
}

async fn run_activities(
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    in_flight: Arc<InFlight>,
    routes: ActivityRoutes,
) {
    let store = shared.store.clone();
    let ActivityRoutes { slots, mut local, direct, committer: done, to_commit: mut results } = routes;
    // A finished activity keeps its slot until its result is recorded: finished but
    // unrecorded results (which run again after a crash) are bounded by the slots.
    let mut running = JoinSet::new();
    let committer = {
        let store = store.clone();
        let in_flight = in_flight.clone();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while results.recv_many(&mut batch, ACTIVITY_COMMIT_BATCH).await > 0 {
                let (completions, slots): (Vec<_>, Vec<_>) = std::mem::take(&mut batch).into_iter().unzip();
                let ids: Vec<i64> = completions.iter().map(|completion| completion.lock.id).collect();
                commit_activity_results(store.as_ref(), completions).await;
                for id in ids {
                    in_flight.remove(id);
                }
                drop(slots);
            }
        })
    };
    let run = |running: &mut JoinSet<()>, item: ActivityItem, slot: OwnedSemaphorePermit, leased_here: bool| {
        let shared = shared.clone();
        let done = done.clone();
        let direct = direct.clone();
        running.spawn(async move {
            let span = tracing::info_span!(
                "activity",
                instance_id = %item.instance_id,
                function = %item.name,
                task_id = item.task_id,
                trace_id = tracing::field::Empty
            );
            if let Some(trace) = &item.trace {
                span.record("trace_id", trace.trace_id());
            }
            let completion = run_activity(&shared, item).instrument(span).await;
            // The result of an item leased by this worker's own commit goes to the next
            // episode directly; once the orchestration dispatcher stopped, to the inbox.
            let finished = if leased_here {
                direct.send((completion, slot)).err().map(|error| error.0)
            } else {
                Some((completion, slot))
            };
            if let Some(finished) = finished {
                let _ = done.send(finished);
            }
        });
    };
    while !*shutdown.borrow() {
        while running.try_join_next().is_some() {}
        while let Ok(direct::LocalActivity { item, slot }) = local.try_recv() {
            in_flight.add(item.lock.clone(), shared.clock.now());
            run(&mut running, item, slot, true);
        }
        let free = slots.available_permits();
        if free == 0 {
            tokio::select! {
                _ = slots.acquire() => {}
                Some(direct::LocalActivity { item, slot }) = local.recv() => {
                    in_flight.add(item.lock.clone(), shared.clock.now());
                    run(&mut running, item, slot, true);
                }
                _ = shutdown_requested(&mut shutdown) => {}
            }
            continue;
        }
        let fetched_at = shared.clock.now();
        let items = match store.fetch_activity_items(free, shared.options.activity_lease, fetched_at).await {
            Ok(items) => items,
            Err(error) => {
                tracing::warn!(%error, "fetching activity work failed");
                tokio::time::sleep(STORE_ERROR_BACKOFF).await;
                continue;
            }
        };
        if items.is_empty() {
            tokio::select! {
                _ = wait_for_work(&shared, WorkKind::Activities, &mut shutdown) => {}
                Some(direct::LocalActivity { item, slot }) = local.recv() => {
                    in_flight.add(item.lock.clone(), shared.clock.now());
                    run(&mut running, item, slot, true);
                }
            }
            continue;
        }
        for item in items {
            if item.delivery_attempts > 1 {
                shared.metrics.lease_taken_over(MetricKind::Activity);
            }
            if let Some(remote) = shared.remote.as_ref().filter(|_| shared.registry.activity(&item.name).is_none()) {
                if let Err(item) = remote.offer_activity(Box::new(item)) {
                    let retry_at =
                        shared.clock.now() + chrono::Duration::from_std(REMOTE_RETRY_DELAY).expect("a small duration");
                    if let Err(error) = store.abandon_activity_item(&item.lock, retry_at).await {
                        tracing::warn!(%error, "giving back an activity item failed");
                    }
                }
                continue;
            }
            // Slots taken by the direct path meanwhile may leave fewer than fetched:
            // wait for one, running the direct path's items meanwhile (they hold slots
            // of their own, and give them back when they finish).
            let slot = loop {
                if let Ok(slot) = slots.clone().try_acquire_owned() {
                    break slot;
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => break slot.expect("the activity slots are never closed"),
                    Some(direct::LocalActivity { item, slot }) = local.recv() => {
                        in_flight.add(item.lock.clone(), shared.clock.now());
                        run(&mut running, item, slot, true);
                    }
                }
            };
            in_flight.add(item.lock.clone(), fetched_at);
            run(&mut running, item, slot, false);
        }
    }
    // Items the direct path leased to this worker that it will not run now (a
    // shutdown) go back for any worker to take, instead of waiting out their leases.
    local.close();
    while let Ok(direct::LocalActivity { item, .. }) = local.try_recv() {
        give_back_activity(store.as_ref(), &item.lock, shared.clock.now()).await;
    }
    // Running activities go on until the handle's deadline; the committer records them.
    while running.join_next().await.is_some() {}
    drop(done);
    drop(direct);
    let _ = committer.await;
}

/// Gives an activity item this worker leased back at once, for any worker to take.
async fn give_back_activity(store: &dyn Store, lock: &ActivityLock, now: keel_core::Timestamp) {
    if let Err(error) = store.abandon_activity_item(lock, now).await {
        tracing::warn!(%error, "giving back an activity item failed");
    }
}

async fn commit_activity_results(store: &dyn Store, batch: Vec<ActivityCompletion>) {
    let mut pending = batch;
    for attempt in 1..=5u32 {
        match store.complete_activities(pending.clone()).await {
            Ok(results) => {
                for (result, completion) in results.into_iter().zip(&pending) {
                    if let Err(error) = result {
                        tracing::warn!(instance_id = %completion.result.instance_id, %error, "an activity result was not recorded");
                    }
                }
                return;
            }
            Err(error) if attempt < 5 => {
                tracing::warn!(%error, attempt, "recording activity results failed; trying again");
                tokio::time::sleep(STORE_ERROR_BACKOFF * attempt).await;
            }
            Err(error) => {
                tracing::error!(%error, "recording activity results failed; the activities will run again after their leases expire");
                pending.clear();
            }
        }
    }
}

/// Runs one activity item to its completion message. Never panics.
async fn run_activity(shared: &Shared, item: ActivityItem) -> ActivityCompletion {
    let context = ActivityContext {
        instance_id: item.instance_id.clone(),
        execution_id: item.execution_id.clone(),
        task_id: item.task_id,
        name: item.name.clone(),
        delivery_attempt: item.delivery_attempts,
    };
    let started = std::time::Instant::now();
    let started_at = std::time::SystemTime::now();
    let mut counted_as = None;
    let outcome = if item.delivery_attempts > limits::MAX_DELIVERY_ATTEMPTS {
        counted_as = Some(ActivityOutcome::Poison);
        shared.metrics.poison_item(MetricKind::Activity);
        Err(FailureDetails::new(
            episode::POISON_ERROR_TYPE,
            format!(
                "activity '{}' was picked up {} times without finishing (its worker crashed or hung each time)",
                item.name,
                item.delivery_attempts - 1
            ),
        ))
    } else {
        match shared.registry.activity(&item.name) {
            None => Err({
                counted_as = Some(ActivityOutcome::NotRegistered);
                FailureDetails::new(
                    ACTIVITY_NOT_REGISTERED_ERROR_TYPE,
                    format!("no activity named '{}' is registered on this worker", item.name),
                )
            }),
            Some(activity) => run_caught(activity, context, item.input.clone()).await,
        }
    };
    let kind = match outcome {
        Ok(result) => match limits::check_payload("the activity result", result.as_deref()) {
            Ok(()) => EventKind::TaskCompleted { task_scheduled_id: item.task_id, result },
            Err(message) => EventKind::TaskFailed {
                task_scheduled_id: item.task_id,
                failure: FailureDetails::new("PayloadTooLarge", message),
            },
        },
        Err(failure) => EventKind::TaskFailed { task_scheduled_id: item.task_id, failure },
    };
    let outcome = counted_as.unwrap_or(match kind {
        EventKind::TaskCompleted { .. } => ActivityOutcome::Completed,
        _ => ActivityOutcome::Failed,
    });
    shared.metrics.activity_executed(&item.name, outcome, started.elapsed());
    if telemetry::is_enabled() {
        let failure = match &kind {
            EventKind::TaskFailed { failure, .. } => Some(failure),
            _ => None,
        };
        telemetry::emit_activity_span(&item, started_at, failure);
    }
    let now = shared.clock.now();
    ActivityCompletion {
        lock: item.lock,
        result: Message {
            instance_id: item.instance_id,
            execution_id: Some(item.execution_id),
            event: HistoryEvent::new(now, kind),
            visible_at: now,
        },
    }
}

/// Runs an activity's code to its outcome, a panic caught as a failure. (Its lease is
/// the [`heartbeat`]'s to renew.)
async fn run_caught(
    activity: &ErasedActivity,
    context: ActivityContext,
    input: Option<String>,
) -> Result<Option<String>, FailureDetails> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| activity(context, input))) {
        Ok(future) => {
            AssertUnwindSafe(future).catch_unwind().await.unwrap_or_else(|panic| Err(panic_failure(panic.as_ref())))
        }
        Err(panic) => Err(panic_failure(panic.as_ref())),
    }
}

fn panic_failure(panic: &(dyn std::any::Any + Send)) -> FailureDetails {
    let message = panic
        .downcast_ref::<&str>()
        .map(|message| message.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string());
    FailureDetails::new(keel_core::replay::PANIC_ERROR_TYPE, format!("the activity panicked: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cached(value: u32, history_len: u64) -> CachedExecution<u32, ()> {
        CachedExecution { execution: value, execution_id: "e".to_string(), history_len, record: () }
    }

    #[test]
    fn an_instance_cached_episode_after_episode_keeps_the_cache_small() {
        let mut cache = ExecutionCache::new(4);
        cache.put("other".to_string(), cached(0, 1));
        for episode in 0..10_000u64 {
            if episode > 0 {
                assert_eq!(cache.take("long", "e", episode), Some(episode as u32 - 1));
            }
            cache.put("long".to_string(), cached(episode as u32, episode + 1));
            assert!(cache.order.len() <= 2 * 16 + 1, "order grew to {}", cache.order.len());
        }
        assert_eq!(cache.take("other", "e", 1), Some(0), "an untouched entry survives the compactions");
    }

    #[test]
    fn the_entry_put_longest_ago_is_evicted_first() {
        let mut cache = ExecutionCache::new(2);
        cache.put("a".to_string(), cached(1, 1));
        cache.put("b".to_string(), cached(2, 1));
        assert_eq!(cache.take("a", "e", 1), Some(1));
        cache.put("a".to_string(), cached(3, 2));
        cache.put("c".to_string(), cached(4, 1));
        assert_eq!(cache.take("b", "e", 1), None, "b was put longest ago");
        assert_eq!(cache.take("a", "e", 2), Some(3));
        assert_eq!(cache.take("c", "e", 1), Some(4));
    }

    #[test]
    fn an_entry_whose_history_moved_on_is_not_given_back() {
        let mut cache = ExecutionCache::new(2);
        cache.put("a".to_string(), cached(1, 5));
        assert_eq!(cache.take("a", "e", 6), None);
        assert_eq!(cache.take("a", "e", 5), None, "a stale entry is dropped, not kept");
    }
}
