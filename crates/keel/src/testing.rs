//! Testing orchestrations without a store: run an orchestrator against scripted
//! results and look at what it does, or replay a history exported from a task hub
//! against the current code.
//!
//! ```
//! use keel::testing::OrchestrationTest;
//! use keel::{Activity, Never, OrchestrationContext, OrchestrationError, Orchestration, Outcome};
//!
//! const DOUBLE: Orchestration<u32, u32> = Orchestration::new("Double");
//! const ADD: Activity<(u32, u32), u32, Never> = Activity::new("Add");
//!
//! async fn double(ctx: OrchestrationContext, n: u32) -> Result<u32, OrchestrationError> {
//!     Ok(ctx.call(ADD, &(n, n)).await?)
//! }
//!
//! let mut test = OrchestrationTest::start(DOUBLE, double, &21);
//! assert_eq!(test.scheduled(), ["Add"]);
//! test.complete(ADD, &42);
//! assert_eq!(test.outcome(), Some(Outcome::Completed(42)));
//! ```

use std::future::Future;
use std::marker::PhantomData;
use std::time::Duration;

use keel_core::action::{Action, Completion};
use keel_core::failure::Failure;
use keel_core::handle::{Activity, Event, Orchestration};
use keel_core::history::{EventKind, FailureDetails, HistoryEvent, RuntimeStatus, Timestamp};
use keel_core::replay::{Execution, Orchestrator, NON_DETERMINISM_ERROR_TYPE};
use keel_core::OrchestrationContext;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::client::Outcome;

/// A history as `keel history ID --json` exports it (and the HTTP API's
/// `GET …/instances/{id}/history` returns it): the instance and its current
/// execution's events in Keel's own form.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryExport {
    /// The instance's id.
    pub instance_id: String,
    /// The orchestration's name.
    pub name: String,
    /// The orchestration version the instance runs; `None` when unversioned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The execution the events belong to.
    pub execution_id: String,
    /// The instance's status when it was exported.
    pub runtime_status: RuntimeStatus,
    /// The execution's history, in order.
    pub events: Vec<HistoryEvent>,
}

/// Where a replay left its history: the first event that does not match the code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Divergence {
    /// Names the sequence number, what the history has and what the code did.
    pub message: String,
}

/// What the code did past the end of a history that matched it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Replayed {
    /// Actions the code takes that the history does not have yet (an instance that is
    /// still running waits for them).
    pub new_actions: Vec<Action>,
    /// How the execution ended, if it did.
    pub completion: Option<Completion>,
}

/// Replays `history` against `orchestrator` without writing anything: `Ok` with what
/// the code does next, or the first divergence.
pub fn replay(
    orchestrator: &Orchestrator,
    instance_id: &str,
    history: &[HistoryEvent],
) -> Result<Replayed, Divergence> {
    let mut execution = Execution::new(instance_id, orchestrator.clone());
    let result = execution.run_episode(history, &[]);
    match result.completion {
        Some(Completion::Failed { failure }) if failure.error_type == NON_DETERMINISM_ERROR_TYPE => {
            Err(Divergence { message: failure.error_message })
        }
        completion => Ok(Replayed { new_actions: result.actions, completion }),
    }
}

/// Replays an exported history against the orchestrator function of `handle`.
pub fn replay_export<I, O, F, Fut>(
    _handle: Orchestration<I, O>,
    function: F,
    export: &HistoryExport,
) -> Result<Replayed, Divergence>
where
    I: DeserializeOwned + Send + 'static,
    O: Serialize + 'static,
    F: Fn(OrchestrationContext, I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, keel_core::OrchestrationError>> + Send + 'static,
{
    replay(&keel_core::replay::typed_orchestrator(function), &export.instance_id, &export.events)
}

/// An orchestration run by a test: every action it takes waits for the test to answer
/// it ([`OrchestrationTest::complete`], [`OrchestrationTest::fail`],
/// [`OrchestrationTest::raise`], [`OrchestrationTest::advance`]); each answer is one
/// episode, replayed exactly as a worker would.
pub struct OrchestrationTest<O> {
    execution: Execution,
    now: Timestamp,
    /// Actions taken and not answered yet, oldest first.
    open: Vec<Action>,
    /// Every action taken, in order.
    taken: Vec<Action>,
    completion: Option<Completion>,
    _output: PhantomData<fn() -> O>,
}

impl<O> std::fmt::Debug for OrchestrationTest<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrchestrationTest").field("open", &self.open).field("completion", &self.completion).finish()
    }
}

/// The start of time in a test: 2024-01-01T00:00:00Z.
const TEST_EPOCH_MILLIS: i64 = 1_704_067_200_000;

impl<O: DeserializeOwned> OrchestrationTest<O> {
    /// Starts the orchestrator function of `handle` with `input` and runs its first episode.
    pub fn start<I, F, Fut>(_handle: Orchestration<I, O>, function: F, input: &I) -> OrchestrationTest<O>
    where
        I: Serialize + DeserializeOwned + Send + 'static,
        O: Serialize + 'static,
        F: Fn(OrchestrationContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, keel_core::OrchestrationError>> + Send + 'static,
    {
        let now = chrono::DateTime::from_timestamp_millis(TEST_EPOCH_MILLIS).expect("a valid time");
        let mut test = OrchestrationTest {
            execution: Execution::new("test-instance", keel_core::replay::typed_orchestrator(function)),
            now,
            open: Vec::new(),
            taken: Vec::new(),
            completion: None,
            _output: PhantomData,
        };
        let started = EventKind::ExecutionStarted {
            name: "test".into(),
            version: None,
            input: Some(serde_json::to_string(input).expect("the test input serializes")),
            execution_id: "test-execution".into(),
            parent: None,
            scheduled_start: None,
            trace: None,
        };
        test.episode(vec![HistoryEvent::new(now, started)]);
        test
    }

    fn episode(&mut self, events: Vec<HistoryEvent>) {
        let mut new = vec![HistoryEvent::new(self.now, EventKind::OrchestratorStarted)];
        new.extend(events);
        let result = self.execution.run_episode(&[], &new);
        self.taken.extend(result.actions.iter().cloned());
        self.open.extend(result.actions);
        if result.completion.is_some() {
            self.completion = result.completion;
        }
    }

    /// Every action the orchestration took so far, in order.
    pub fn actions(&self) -> &[Action] {
        &self.taken
    }

    /// The names of the activities and sub-orchestrations scheduled and not answered
    /// yet, oldest first.
    pub fn scheduled(&self) -> Vec<&str> {
        self.open
            .iter()
            .filter_map(|action| match action {
                Action::ScheduleTask { name, .. } | Action::CreateSubOrchestration { name, .. } => Some(name.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Takes the oldest open call of the function `name`; panics if there is none
    /// (the test expected a call the orchestration did not make).
    fn take_call(&mut self, name: &str, sub_orchestration: bool) -> i32 {
        let position = self.open.iter().position(|action| match action {
            Action::ScheduleTask { name: called, .. } => !sub_orchestration && called.eq_ignore_ascii_case(name),
            Action::CreateSubOrchestration { name: called, .. } => {
                sub_orchestration && called.eq_ignore_ascii_case(name)
            }
            _ => false,
        });
        let Some(position) = position else {
            panic!("the orchestration has no open call of '{name}'; open actions: {:?}", self.open)
        };
        self.open.remove(position).id()
    }

    /// Answers the oldest open call of `activity` with `output`.
    pub fn complete<I, R: Serialize, E>(&mut self, activity: Activity<I, R, E>, output: &R) {
        let id = self.take_call(activity.name(), false);
        let result = Some(serde_json::to_string(output).expect("the output serializes"));
        self.episode(vec![HistoryEvent::new(self.now, EventKind::TaskCompleted { task_scheduled_id: id, result })]);
    }

    /// Fails the oldest open call of `activity` with its own failure type.
    pub fn fail<I, R, E: Failure>(&mut self, activity: Activity<I, R, E>, failure: &E) {
        self.fail_with_details(activity, failure.to_details());
    }

    /// Fails the oldest open call of `activity` with any failure (a panic, say).
    pub fn fail_with_details<I, R, E>(&mut self, activity: Activity<I, R, E>, failure: FailureDetails) {
        let id = self.take_call(activity.name(), false);
        self.episode(vec![HistoryEvent::new(self.now, EventKind::TaskFailed { task_scheduled_id: id, failure })]);
    }

    /// Answers the oldest open call of the sub-orchestration `orchestration`.
    pub fn complete_sub_orchestration<I, R: Serialize>(&mut self, orchestration: Orchestration<I, R>, output: &R) {
        let id = self.take_call(orchestration.name(), true);
        let result = Some(serde_json::to_string(output).expect("the output serializes"));
        let kind = EventKind::SubOrchestrationInstanceCompleted { task_scheduled_id: id, result };
        self.episode(vec![HistoryEvent::new(self.now, kind)]);
    }

    /// Raises `event` with `data`.
    pub fn raise<T: Serialize>(&mut self, event: Event<T>, data: &T) {
        let input = Some(serde_json::to_string(data).expect("the event data serializes"));
        self.episode(vec![HistoryEvent::new(self.now, EventKind::EventRaised { name: event.name().into(), input })]);
    }

    /// Moves time forward by `by`; timers that are due then fire, in order.
    pub fn advance(&mut self, by: Duration) {
        self.now += chrono::Duration::from_std(by).expect("a test advances time by a sane amount");
        let mut due: Vec<(Timestamp, i32)> = self
            .open
            .iter()
            .filter_map(|action| match action {
                Action::CreateTimer { id, fire_at } if *fire_at <= self.now => Some((*fire_at, *id)),
                _ => None,
            })
            .collect();
        due.sort();
        self.open
            .retain(|action| !matches!(action, Action::CreateTimer { id, .. } if due.iter().any(|(_, due)| due == id)));
        let fired = due
            .into_iter()
            .map(|(fire_at, timer_id)| HistoryEvent::new(fire_at, EventKind::TimerFired { timer_id, fire_at }));
        let fired: Vec<HistoryEvent> = fired.collect();
        self.episode(fired);
    }

    /// How the orchestration ended, once it did.
    pub fn outcome(&self) -> Option<Outcome<O>> {
        Some(match self.completion.as_ref()? {
            Completion::Completed { output } => Outcome::Completed(
                serde_json::from_str(output.as_deref().unwrap_or("null")).expect("the output fits its type"),
            ),
            Completion::Failed { failure } => Outcome::Failed(failure.clone()),
            Completion::Terminated { reason } => Outcome::Terminated(reason.clone()),
            Completion::ContinuedAsNew { .. } => return None,
        })
    }

    /// The input of a continue-as-new, if the orchestration continued as new.
    pub fn continued_as_new(&self) -> Option<&str> {
        match self.completion.as_ref()? {
            Completion::ContinuedAsNew { input, .. } => input.as_deref(),
            _ => None,
        }
    }
}
