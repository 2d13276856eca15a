//! A fault-injecting wrapper around any [`Store`], seeded (FoundationDB's BUGGIFY, in
//! the store's seam).
//!
//! Per call, by seed, a [`FaultyStore`] may
//! - fail a write before it reaches the store (nothing was written),
//! - fail a write *after* the store committed it: the caller sees an error for
//!   something that happened, and must not assume it failed,
//! - fail a read,
//! - delay the call (long delays let leases run out mid-episode),
//! - take a lease that is shorter than the caller asked for, so that other workers
//!   see it expired while its holder still works on the item,
//! - kill its user: at a chosen call (before or after the write), the wrapper's
//!   [`Life`] ends and every call from then on never returns, as if the process had
//!   died there. Nothing that process does reaches the store any more.
//!
//! Injected errors are the store's retryable error ([`Error::Backend`] with
//! `retryable: true`). Each decision is a pure function of the seed, the wrapper's
//! stream, the operation and how many calls of that operation came before, so a seed
//! gives the same schedule every time; which episode the n-th commit carries depends
//! on how tokio interleaved the tasks. [`FaultCounts`] counts what was injected.
//!
//! A [`Defect`] makes the wrapper lie (a deliberate bug), to prove that a checker
//! notices what a broken store would do.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keel_core::history::{EventKind, HistoryEvent, RuntimeStatus, Timestamp};
use keel_store::{
    ActivityCompletion, ActivityItem, ActivityLock, Committed, EntityQuery, EpisodeCommit, Error, HubStats,
    InstancePage, InstanceQuery, InstanceRecord, Message, NewInstance, Notifications, OrchestrationItem,
    OrchestrationLock, PurgeFilter, Result, Store,
};
use tokio::sync::watch;

use crate::rng;

/// How likely each fault is, per call (each a probability in `0.0..=1.0`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultRates {
    /// A write fails before it reaches the store.
    pub error_before_write: f64,
    /// A write that the store committed reports an error.
    pub error_after_write: f64,
    /// A read fails.
    pub read_error: f64,
    /// The call is delayed (up to [`FaultRates::max_delay`]).
    pub delay: f64,
    /// The longest delay.
    pub max_delay: Duration,
    /// A fetch takes its leases for at most [`FaultRates::short_lease`] instead of
    /// what the caller asked for.
    pub lease_cut: f64,
    /// The lease a cut fetch takes.
    pub short_lease: Duration,
}

/// Where a [`FaultyStore`]'s user dies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrashPoint {
    /// The call (counting every call through this wrapper from 0) at which it dies.
    pub at_call: u64,
    /// For a write: die after the store committed it (else before it was written).
    pub after_write: bool,
}

/// A deliberate defect: the wrapper lies the way a broken store would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Defect {
    /// External events are acknowledged and never written.
    DropRaisedEvents,
    /// Every `TaskScheduled` an episode commits is written twice.
    DuplicateDecisions,
}

/// What a [`FaultyStore`] does: its seed and stream, the rates, where its user dies.
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    /// The simulation's seed.
    pub seed: u64,
    /// Tells apart the wrappers of one seed (one per simulated process).
    pub stream: u64,
    /// How likely each fault is.
    pub rates: FaultRates,
    /// Where the user of the wrapper dies, if it does.
    pub crash: Option<CrashPoint>,
    /// A lie the wrapper tells, if any.
    pub defect: Option<Defect>,
}

/// Counts of the faults injected, shared by the wrappers of one simulation.
#[derive(Debug, Default)]
pub struct FaultCounts {
    errors_before_write: AtomicU64,
    errors_after_write: AtomicU64,
    read_errors: AtomicU64,
    delays: AtomicU64,
    lease_cuts: AtomicU64,
    crashes: AtomicU64,
}

/// A snapshot of [`FaultCounts`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FaultTotals {
    /// Writes failed before they were written.
    pub errors_before_write: u64,
    /// Writes that were committed and reported as failed.
    pub errors_after_write: u64,
    /// Reads failed.
    pub read_errors: u64,
    /// Calls delayed.
    pub delays: u64,
    /// Fetches whose leases were cut short.
    pub lease_cuts: u64,
    /// Users killed at a call.
    pub crashes: u64,
}

impl FaultTotals {
    /// Every fault injected, crashes included.
    pub fn total(&self) -> u64 {
        self.errors_before_write
            + self.errors_after_write
            + self.read_errors
            + self.delays
            + self.lease_cuts
            + self.crashes
    }
}

impl FaultCounts {
    /// What was injected so far.
    pub fn totals(&self) -> FaultTotals {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        FaultTotals {
            errors_before_write: read(&self.errors_before_write),
            errors_after_write: read(&self.errors_after_write),
            read_errors: read(&self.read_errors),
            delays: read(&self.delays),
            lease_cuts: read(&self.lease_cuts),
            crashes: read(&self.crashes),
        }
    }
}

/// The life of a simulated process: it ends once, and then its store calls (and the
/// activities that check it) never return.
#[derive(Debug)]
pub struct Life {
    ended: watch::Sender<bool>,
}

impl Default for Life {
    fn default() -> Life {
        Life { ended: watch::channel(false).0 }
    }
}

impl Life {
    /// Ends the life (idempotent).
    pub fn end(&self) {
        self.ended.send_replace(true);
    }

    /// Whether the life has ended.
    pub fn has_ended(&self) -> bool {
        *self.ended.borrow()
    }

    /// Returns once the life has ended.
    pub async fn ended(&self) {
        let mut ended = self.ended.subscribe();
        let _ = ended.wait_for(|ended| *ended).await;
    }

    /// Returns at once while alive; never returns once the life has ended.
    pub async fn alive(&self) {
        if self.has_ended() {
            std::future::pending::<()>().await;
        }
    }
}

/// A switch that turns the faults of many wrappers off at once (a calm phase at the
/// end of a simulation); crashes and defects stay as planned.
#[derive(Clone, Debug)]
pub struct FaultSwitch(Arc<AtomicBool>);

impl Default for FaultSwitch {
    fn default() -> FaultSwitch {
        FaultSwitch(Arc::new(AtomicBool::new(true)))
    }
}

impl FaultSwitch {
    /// Stops injecting errors, delays and lease cuts.
    pub fn turn_off(&self) {
        self.0.store(false, Ordering::SeqCst);
    }

    fn is_on(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The store operations, numbered for the fault draws.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    CreateInstance,
    ReplaceInstance,
    EnqueueMessage,
    GetInstance,
    ReadHistory,
    QueryInstances,
    QueryEntities,
    RemoveEmptyEntity,
    PurgeInstance,
    PurgeInstances,
    PurgeAll,
    FetchOrchestrations,
    CommitEpisodes,
    AbandonOrchestration,
    RenewOrchestration,
    FetchActivities,
    CompleteActivities,
    RenewActivity,
    AbandonActivity,
    NextWakeup,
    HubStats,
}

const OPS: usize = Op::HubStats as usize + 1;

impl Op {
    fn writes(self) -> bool {
        !matches!(
            self,
            Op::GetInstance | Op::ReadHistory | Op::QueryInstances | Op::QueryEntities | Op::NextWakeup | Op::HubStats
        )
    }
}

/// What a draw decides.
#[derive(Clone, Copy)]
enum Purpose {
    Delay = 1,
    DelayLength,
    ErrorBefore,
    ErrorAfter,
    LeaseCut,
}

/// A [`Store`] that injects the faults of its [`FaultPlan`] into the calls it passes to
/// the store it wraps.
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    plan: FaultPlan,
    switch: FaultSwitch,
    counts: Arc<FaultCounts>,
    life: Arc<Life>,
    calls: AtomicU64,
    calls_per_op: [AtomicU64; OPS],
}

impl FaultyStore {
    /// Wraps `inner`. `counts` and `switch` may be shared with other wrappers; `life`
    /// is the life of the wrapper's user, which the plan's crash point ends.
    pub fn new(
        inner: Arc<dyn Store>,
        plan: FaultPlan,
        switch: FaultSwitch,
        counts: Arc<FaultCounts>,
        life: Arc<Life>,
    ) -> FaultyStore {
        FaultyStore {
            inner,
            plan,
            switch,
            counts,
            life,
            calls: AtomicU64::new(0),
            calls_per_op: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// The life of the wrapper's user.
    pub fn life(&self) -> &Arc<Life> {
        &self.life
    }

    fn draw(&self, op: Op, call: u64, purpose: Purpose) -> f64 {
        rng::unit(&[self.plan.seed, self.plan.stream, op as u64, call, purpose as u64])
    }

    fn injected(message: &str) -> Error {
        Error::Backend { message: format!("injected fault: {message}"), retryable: true }
    }

    /// Dies here: the life ends and the call never returns.
    async fn die(&self) -> ! {
        if !self.life.has_ended() {
            self.counts.crashes.fetch_add(1, Ordering::Relaxed);
        }
        self.life.end();
        std::future::pending::<()>().await;
        unreachable!("a pending future never completes")
    }

    /// Runs one call of `op` with the faults the plan draws for it.
    async fn call<T>(&self, op: Op, inner: impl Future<Output = Result<T>>) -> Result<T> {
        self.life.alive().await;
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let op_call = self.calls_per_op[op as usize].fetch_add(1, Ordering::SeqCst);
        let crash = self.plan.crash.filter(|crash| crash.at_call == call);
        if crash.is_some_and(|crash| !crash.after_write || !op.writes()) {
            self.die().await;
        }
        let faults = self.switch.is_on();
        let rates = &self.plan.rates;
        if faults && self.draw(op, op_call, Purpose::Delay) < rates.delay {
            self.counts.delays.fetch_add(1, Ordering::Relaxed);
            let length = self.draw(op, op_call, Purpose::DelayLength);
            // Mostly short; one delay in eight is long enough to outlast a lease.
            let delay =
                if length < 0.875 { rates.max_delay.mul_f64(length / 8.0) } else { rates.max_delay.mul_f64(length) };
            tokio::time::sleep(delay).await;
            self.life.alive().await;
        }
        if faults
            && self.draw(op, op_call, Purpose::ErrorBefore)
                < if op.writes() { rates.error_before_write } else { rates.read_error }
        {
            let counter = if op.writes() { &self.counts.errors_before_write } else { &self.counts.read_errors };
            counter.fetch_add(1, Ordering::Relaxed);
            return Err(FaultyStore::injected(if op.writes() { "the write failed" } else { "the read failed" }));
        }
        let result = inner.await;
        if crash.is_some() {
            self.die().await;
        }
        self.life.alive().await;
        if faults
            && op.writes()
            && result.is_ok()
            && self.draw(op, op_call, Purpose::ErrorAfter) < rates.error_after_write
        {
            self.counts.errors_after_write.fetch_add(1, Ordering::Relaxed);
            return Err(FaultyStore::injected("the write was committed, then its answer was lost"));
        }
        result
    }

    /// The lease a fetch asks the store for: sometimes cut short.
    fn lease(&self, op: Op, lease: Duration) -> Duration {
        let next = self.calls_per_op[op as usize].load(Ordering::SeqCst);
        if self.switch.is_on() && self.draw(op, next, Purpose::LeaseCut) < self.plan.rates.lease_cut {
            self.counts.lease_cuts.fetch_add(1, Ordering::Relaxed);
            return lease.min(self.plan.rates.short_lease);
        }
        lease
    }

    fn with_defect(&self, mut commits: Vec<EpisodeCommit>) -> Vec<EpisodeCommit> {
        if self.plan.defect == Some(Defect::DuplicateDecisions) {
            for commit in &mut commits {
                let doubled: Vec<HistoryEvent> = commit
                    .history
                    .iter()
                    .flat_map(|event| {
                        let copies = if matches!(event.kind, EventKind::TaskScheduled { .. }) { 2 } else { 1 };
                        std::iter::repeat_n(event.clone(), copies)
                    })
                    .collect();
                commit.history = doubled;
            }
        }
        commits
    }
}

impl std::fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyStore").field("plan", &self.plan).finish_non_exhaustive()
    }
}

#[async_trait]
impl Store for FaultyStore {
    fn notifications(&self) -> &Notifications {
        self.inner.notifications()
    }

    async fn create_instance(&self, instance: NewInstance) -> Result<()> {
        self.call(Op::CreateInstance, self.inner.create_instance(instance)).await
    }

    async fn replace_instance(
        &self,
        instance: NewInstance,
        replaced: &InstanceRecord,
        messages: Vec<Message>,
    ) -> Result<()> {
        self.call(Op::ReplaceInstance, self.inner.replace_instance(instance, replaced, messages)).await
    }

    async fn enqueue_message(&self, message: Message, accept_terminal: bool) -> Result<RuntimeStatus> {
        if self.plan.defect == Some(Defect::DropRaisedEvents)
            && matches!(message.event.kind, EventKind::EventRaised { .. })
        {
            let instance = self.inner.get_instance(&message.instance_id).await?;
            return instance.map(|instance| instance.status).ok_or(Error::NotFound(message.instance_id));
        }
        self.call(Op::EnqueueMessage, self.inner.enqueue_message(message, accept_terminal)).await
    }

    async fn get_instance(&self, instance_id: &str) -> Result<Option<InstanceRecord>> {
        self.call(Op::GetInstance, self.inner.get_instance(instance_id)).await
    }

    async fn read_history(&self, instance_id: &str) -> Result<Vec<HistoryEvent>> {
        self.call(Op::ReadHistory, self.inner.read_history(instance_id)).await
    }

    async fn query_instances(&self, query: &InstanceQuery) -> Result<InstancePage> {
        self.call(Op::QueryInstances, self.inner.query_instances(query)).await
    }

    async fn query_entities(&self, query: &EntityQuery) -> Result<InstancePage> {
        self.call(Op::QueryEntities, self.inner.query_entities(query)).await
    }

    async fn remove_empty_entity(&self, instance_id: &str, now: Timestamp) -> Result<bool> {
        self.call(Op::RemoveEmptyEntity, self.inner.remove_empty_entity(instance_id, now)).await
    }

    async fn purge_instance(&self, instance_id: &str) -> Result<bool> {
        self.call(Op::PurgeInstance, self.inner.purge_instance(instance_id)).await
    }

    async fn purge_instances(&self, filter: &PurgeFilter) -> Result<u64> {
        self.call(Op::PurgeInstances, self.inner.purge_instances(filter)).await
    }

    async fn purge_all(&self) -> Result<u64> {
        self.call(Op::PurgeAll, self.inner.purge_all()).await
    }

    async fn fetch_orchestration_items(
        &self,
        max: usize,
        lease: Duration,
        now: Timestamp,
    ) -> Result<Vec<OrchestrationItem>> {
        let lease = self.lease(Op::FetchOrchestrations, lease);
        self.call(Op::FetchOrchestrations, self.inner.fetch_orchestration_items(max, lease, now)).await
    }

    async fn commit_episodes(&self, commits: Vec<EpisodeCommit>, now: Timestamp) -> Result<Vec<Result<Committed>>> {
        let commits = self.with_defect(commits);
        self.call(Op::CommitEpisodes, self.inner.commit_episodes(commits, now)).await
    }

    fn direct_episodes(&self) -> bool {
        self.inner.direct_episodes()
    }

    async fn abandon_orchestration_item(&self, lock: &OrchestrationLock, retry_at: Timestamp) -> Result<()> {
        self.call(Op::AbandonOrchestration, self.inner.abandon_orchestration_item(lock, retry_at)).await
    }

    async fn renew_orchestration_lease(&self, lock: &OrchestrationLock, lease: Duration, now: Timestamp) -> Result<()> {
        self.call(Op::RenewOrchestration, self.inner.renew_orchestration_lease(lock, lease, now)).await
    }

    async fn fetch_activity_items(&self, max: usize, lease: Duration, now: Timestamp) -> Result<Vec<ActivityItem>> {
        let lease = self.lease(Op::FetchActivities, lease);
        self.call(Op::FetchActivities, self.inner.fetch_activity_items(max, lease, now)).await
    }

    async fn complete_activities(&self, completions: Vec<ActivityCompletion>) -> Result<Vec<Result<()>>> {
        self.call(Op::CompleteActivities, self.inner.complete_activities(completions)).await
    }

    async fn renew_activity_lease(&self, lock: &ActivityLock, lease: Duration, now: Timestamp) -> Result<()> {
        self.call(Op::RenewActivity, self.inner.renew_activity_lease(lock, lease, now)).await
    }

    async fn abandon_activity_item(&self, lock: &ActivityLock, retry_at: Timestamp) -> Result<()> {
        self.call(Op::AbandonActivity, self.inner.abandon_activity_item(lock, retry_at)).await
    }

    async fn next_wakeup(&self, now: Timestamp) -> Result<Option<Timestamp>> {
        self.call(Op::NextWakeup, self.inner.next_wakeup(now)).await
    }

    async fn hub_stats(&self, now: Timestamp) -> Result<HubStats> {
        self.call(Op::HubStats, self.inner.hub_stats(now)).await
    }
}
