//! The replay state machine: history in, actions and outcome out.
//!
//! An [`Execution`] owns one run of an orchestrator function. It applies history
//! events one at a time, in order, and polls the orchestrator after each event that
//! can unblock it, exactly as the first run did; so the orchestrator takes the same
//! actions again. Action-born events in history (`TaskScheduled`, `TimerCreated`, …)
//! are matched against the actions the code takes: a mismatch is non-determinism and
//! fails the execution with a message naming the sequence number, what history holds
//! and what the code did. Actions left unmatched are new: the caller executes and
//! records them.
//!
//! An execution can be kept between episodes (the worker's cache): feeding it only the
//! new events gives the same result as replaying the whole history into a fresh one.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::FutureExt;
use serde::Serialize;

use crate::action::{Action, Completion};
use crate::context::{lock, Ending, OrchestrationContext, OrchestrationError, State, TaskOutcome};
use crate::history::{EventKind, FailureDetails, HistoryEvent, Timestamp};

/// The boxed future of a running orchestrator: its output is JSON text.
pub type OrchestratorFuture = Pin<Box<dyn Future<Output = Result<Option<String>, OrchestrationError>> + Send>>;

/// An orchestrator function with its types erased.
pub type Orchestrator = Arc<dyn Fn(OrchestrationContext) -> OrchestratorFuture + Send + Sync>;

/// Wraps a typed orchestrator function (`async fn(OrchestrationContext) -> Result<R, OrchestrationError>`).
pub fn orchestrator<F, Fut, R>(function: F) -> Orchestrator
where
    F: Fn(OrchestrationContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, OrchestrationError>> + Send + 'static,
    R: Serialize,
{
    Arc::new(move |context| {
        let future = function(context);
        Box::pin(async move {
            let output = future.await?;
            Ok(Some(serde_json::to_string(&output)?))
        })
    })
}

/// Wraps an orchestrator function that takes its input as a parameter
/// (`async fn(OrchestrationContext, I) -> Result<O, OrchestrationError>`); an input that
/// does not fit `I` fails the instance (`InvalidInput`).
pub fn typed_orchestrator<I, O, F, Fut>(function: F) -> Orchestrator
where
    I: serde::de::DeserializeOwned + Send + 'static,
    O: Serialize + 'static,
    F: Fn(OrchestrationContext, I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, OrchestrationError>> + Send + 'static,
{
    let function = Arc::new(function);
    orchestrator(move |context: OrchestrationContext| {
        let function = function.clone();
        async move {
            let input: I = context.input()?;
            function(context, input).await
        }
    })
}

/// Error type of a history that does not match what the orchestrator does.
pub const NON_DETERMINISM_ERROR_TYPE: &str = "NonDeterministicOrchestration";

/// Error type of a panic in orchestrator code.
pub const PANIC_ERROR_TYPE: &str = "Panic";

/// What one episode produced.
#[derive(Debug, Default, PartialEq)]
pub struct EpisodeResult {
    /// New actions, in sequence order: they are not in history yet.
    pub actions: Vec<Action>,
    /// Set when the execution ended in this episode.
    pub completion: Option<Completion>,
    /// The custom status after this episode, JSON text; `None` when none is set.
    pub custom_status: Option<String>,
    /// True when the instance is suspended after this episode.
    pub suspended: bool,
}

/// Sets a flag when the orchestrator's future is woken.
struct WakeFlag(AtomicBool);

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }
}

/// One run of an orchestrator over its history.
pub struct Execution {
    orchestrator: Orchestrator,
    state: Arc<Mutex<State>>,
    future: Option<OrchestratorFuture>,
    completion: Option<Completion>,
    wake_flag: Arc<WakeFlag>,
    waker: Waker,
    suspended: bool,
    /// Events that arrived while suspended, applied on resume.
    held_while_suspended: Vec<HistoryEvent>,
    /// Number of history events applied so far.
    events_applied: u64,
    /// The completion was returned by an episode already.
    completion_reported: bool,
    /// The trace context of the `ExecutionStarted` event (the parent of the execution's span).
    started_trace: Option<crate::trace::TraceContext>,
    /// The context of the execution's own span, which its work hangs under.
    orchestration_trace: Option<crate::trace::TraceContext>,
    /// When the `ExecutionStarted` event was recorded.
    started_at: Option<Timestamp>,
    /// When each timer that has not fired yet was created, by timer id.
    timers_created_at: std::collections::BTreeMap<i32, Timestamp>,
    /// Timers that fired in new (not replayed) events, for the runtime's timer spans.
    timers_fired: Vec<FiredTimer>,
}

/// A timer that fired in an episode's new events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FiredTimer {
    /// The timer's id (its `TimerCreated` event id).
    pub id: i32,
    /// When it was created, if this execution saw it created.
    pub created_at: Option<Timestamp>,
    /// When it was set to fire.
    pub fire_at: Timestamp,
}

impl std::fmt::Debug for Execution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Execution")
            .field("instance_id", &lock(&self.state).instance_id)
            .field("completion", &self.completion)
            .field("events_applied", &self.events_applied)
            .finish()
    }
}

impl Execution {
    /// A fresh execution of `orchestrator` for the instance `instance_id`. The function
    /// starts when an episode applies its `ExecutionStarted` event.
    pub fn new(instance_id: &str, orchestrator: Orchestrator) -> Execution {
        let wake_flag = Arc::new(WakeFlag(AtomicBool::new(false)));
        Execution {
            orchestrator,
            state: Arc::new(Mutex::new(State::new(instance_id))),
            future: None,
            completion: None,
            waker: Waker::from(wake_flag.clone()),
            wake_flag,
            suspended: false,
            held_while_suspended: Vec::new(),
            events_applied: 0,
            completion_reported: false,
            started_trace: None,
            orchestration_trace: None,
            started_at: None,
            timers_created_at: std::collections::BTreeMap::new(),
            timers_fired: Vec::new(),
        }
    }

    /// When this execution's `ExecutionStarted` event was recorded.
    pub fn started_at(&self) -> Option<Timestamp> {
        self.started_at
    }

    /// The timers that fired in the new events of the episodes since the last call.
    pub fn take_fired_timers(&mut self) -> Vec<FiredTimer> {
        std::mem::take(&mut self.timers_fired)
    }

    /// The trace context this execution was started under (its `ExecutionStarted`'s).
    pub fn started_trace(&self) -> Option<&crate::trace::TraceContext> {
        self.started_trace.as_ref()
    }

    /// The context of this execution's span (see [`crate::trace::orchestration_trace`]):
    /// what its activities, timers, sub-orchestrations and entity operations hang under.
    pub fn orchestration_trace(&self) -> Option<&crate::trace::TraceContext> {
        self.orchestration_trace.as_ref()
    }

    /// How many history events this execution has applied (past and new).
    pub fn events_applied(&self) -> u64 {
        self.events_applied
    }

    /// The execution ended (its result was returned by an episode).
    pub fn is_completed(&self) -> bool {
        self.completion_reported
    }

    /// Replays `past` (events already in history), then applies `new` (events this
    /// episode adds) and returns the actions not in history and the outcome. Actions
    /// returned here count as recorded: a later episode on this execution gets only
    /// events that came after them.
    pub fn run_episode(&mut self, past: &[HistoryEvent], new: &[HistoryEvent]) -> EpisodeResult {
        let was_completed = self.completion_reported;
        lock(&self.state).is_replaying = true;
        for event in past {
            self.apply(event);
        }
        lock(&self.state).is_replaying = false;
        for event in new {
            self.apply(event);
        }
        let mut state = lock(&self.state);
        let pending = std::mem::take(&mut state.pending_actions).into_values();
        // A finished execution still sends what it decided (activities, events,
        // sub-orchestrations); its timers can no longer matter. A failed or terminated
        // one takes no further action but the release of its entity locks.
        let actions: Vec<Action> = match &self.completion {
            None => pending.collect(),
            Some(Completion::Completed { .. } | Completion::ContinuedAsNew { .. }) => {
                pending.filter(|action| !matches!(action, Action::CreateTimer { .. })).collect()
            }
            Some(Completion::Failed { .. } | Completion::Terminated { .. }) => {
                pending.filter(|action| matches!(action, Action::UnlockEntity { .. })).collect()
            }
        };
        self.completion_reported = self.completion.is_some();
        for action in &actions {
            if let Action::CreateTimer { id, .. } = action {
                self.timers_created_at.insert(*id, state.current_time);
            }
        }
        EpisodeResult {
            actions,
            completion: if was_completed { None } else { self.completion.clone() },
            custom_status: state.custom_status.clone(),
            suspended: self.suspended && self.completion.is_none(),
        }
    }

    fn apply(&mut self, event: &HistoryEvent) {
        self.events_applied += 1;
        if self.completion.is_some() {
            // Decisions recorded after the end must still be ones the code took.
            if event.kind.is_decision() && !self.completion_reported {
                self.match_decision(event);
            }
            return;
        }
        if self.suspended
            && !matches!(
                event.kind,
                EventKind::ExecutionResumed { .. }
                    | EventKind::ExecutionTerminated { .. }
                    | EventKind::OrchestratorStarted
                    | EventKind::TaskScheduled { .. }
                    | EventKind::TimerCreated { .. }
                    | EventKind::SubOrchestrationInstanceCreated { .. }
                    | EventKind::EventSent { .. }
                    | EventKind::EntityOperationSignaled { .. }
                    | EventKind::EntityOperationCalled { .. }
                    | EventKind::EntityLockRequested { .. }
                    | EventKind::EntityUnlockSent { .. }
                    | EventKind::ExecutionSuspended { .. }
            )
        {
            self.held_while_suspended.push(event.clone());
            return;
        }
        match &event.kind {
            EventKind::OrchestratorStarted => {
                lock(&self.state).current_time = event.timestamp;
            }
            EventKind::ExecutionStarted { name, version, input, execution_id, parent, trace, .. } => {
                if self.future.is_some() {
                    return; // a duplicate start message: the execution is already running
                }
                self.started_trace.clone_from(trace);
                self.started_at = Some(event.timestamp);
                self.orchestration_trace = crate::trace::orchestration_trace(&event.kind);
                {
                    let mut state = lock(&self.state);
                    state.name = name.clone();
                    state.version.clone_from(version);
                    state.input = input.clone();
                    state.execution_id = execution_id.clone();
                    state.parent = parent.clone();
                }
                let context = OrchestrationContext::new(self.state.clone());
                self.future = Some((self.orchestrator)(context));
                self.poll();
            }
            EventKind::TimerCreated { .. } => {
                self.timers_created_at.insert(event.event_id, event.timestamp);
                self.match_decision(event);
            }
            EventKind::TaskScheduled { .. }
            | EventKind::SubOrchestrationInstanceCreated { .. }
            | EventKind::EventSent { .. }
            | EventKind::EntityOperationSignaled { .. }
            | EventKind::EntityOperationCalled { .. }
            | EventKind::EntityLockRequested { .. }
            | EventKind::EntityUnlockSent { .. } => self.match_decision(event),
            EventKind::EntityOperationCompleted { request_id, output } => {
                let id = lock(&self.state).entity_calls.remove(request_id);
                if let Some(id) = id {
                    self.resolve(id, TaskOutcome::Completed(output.clone()));
                }
            }
            EventKind::EntityOperationFailed { request_id, failure } => {
                let id = lock(&self.state).entity_calls.remove(request_id);
                if let Some(id) = id {
                    self.resolve(id, TaskOutcome::Failed(Box::new(failure.clone())));
                }
            }
            EventKind::EntityLockGranted { critical_section_id, lock_set } => {
                let mut state = lock(&self.state);
                let waiting =
                    state.lock_requests.remove(critical_section_id).filter(|id| state.open_tasks.contains_key(id));
                match waiting {
                    Some(id) => {
                        drop(state);
                        self.resolve(id, TaskOutcome::Completed(None));
                    }
                    // Nobody waits for this lock any more: give it back at once.
                    None => state.unlock_all(critical_section_id, lock_set),
                }
            }
            EventKind::TaskCompleted { task_scheduled_id, result }
            | EventKind::SubOrchestrationInstanceCompleted { task_scheduled_id, result } => {
                self.resolve(*task_scheduled_id, TaskOutcome::Completed(result.clone()));
            }
            EventKind::TaskFailed { task_scheduled_id, failure }
            | EventKind::SubOrchestrationInstanceFailed { task_scheduled_id, failure } => {
                self.resolve(*task_scheduled_id, TaskOutcome::Failed(Box::new(failure.clone())));
            }
            EventKind::TimerFired { timer_id, fire_at } => {
                let created_at = self.timers_created_at.remove(timer_id);
                if !lock(&self.state).is_replaying {
                    self.timers_fired.push(FiredTimer { id: *timer_id, created_at, fire_at: *fire_at });
                }
                self.resolve(*timer_id, TaskOutcome::Completed(None));
            }
            EventKind::EventRaised { name, input } => {
                lock(&self.state).deliver_event(name, input.clone());
                self.poll();
            }
            EventKind::ExecutionSuspended { .. } => {
                self.suspended = true;
            }
            EventKind::ExecutionResumed { .. } => {
                if self.suspended {
                    self.suspended = false;
                    for held in std::mem::take(&mut self.held_while_suspended) {
                        self.events_applied -= 1; // counted when it was held
                        self.apply(&held);
                    }
                }
            }
            EventKind::ExecutionTerminated { reason } => {
                self.finish(Completion::Terminated { reason: reason.clone() });
            }
            EventKind::ExecutionCompleted { .. }
            | EventKind::ContinueAsNew { .. }
            | EventKind::ExecutionRewound { .. } => {}
        }
    }

    /// Matches an action-born history event with the action the code took under the
    /// same sequence number.
    fn match_decision(&mut self, event: &HistoryEvent) {
        let taken = lock(&self.state).pending_actions.remove(&event.event_id);
        let fits = |action: &Action| match (&event.kind, action) {
            (EventKind::TaskScheduled { name, .. }, Action::ScheduleTask { name: taken, .. })
            | (
                EventKind::SubOrchestrationInstanceCreated { name, .. },
                Action::CreateSubOrchestration { name: taken, .. },
            )
            | (EventKind::EventSent { name, .. }, Action::SendEvent { name: taken, .. }) => {
                name.eq_ignore_ascii_case(taken)
            }
            (EventKind::TimerCreated { .. }, Action::CreateTimer { .. }) => true,
            (
                EventKind::EntityOperationSignaled { operation, target_instance_id, .. },
                Action::SignalEntity { operation: taken, target, .. },
            )
            | (
                EventKind::EntityOperationCalled { operation, target_instance_id, .. },
                Action::CallEntity { operation: taken, target, .. },
            ) => operation == taken && target_instance_id == target,
            (EventKind::EntityLockRequested { lock_set, .. }, Action::LockEntities { lock_set: taken, .. }) => {
                lock_set == taken
            }
            (EventKind::EntityUnlockSent { target_instance_id, .. }, Action::UnlockEntity { target, .. }) => {
                target_instance_id == target
            }
            _ => false,
        };
        match taken {
            Some(action) if fits(&action) => {}
            Some(action) => self.fail_non_deterministic(event, &format!("the orchestrator took {}", action.describe())),
            None => self.fail_non_deterministic(event, "the orchestrator took no action with that sequence number"),
        }
    }

    fn fail_non_deterministic(&mut self, event: &HistoryEvent, found: &str) {
        let expected = match &event.kind {
            EventKind::TaskScheduled { name, .. }
            | EventKind::SubOrchestrationInstanceCreated { name, .. }
            | EventKind::EventSent { name, .. } => format!("{} \"{name}\"", event.kind.type_name()),
            EventKind::EntityOperationSignaled { operation, target_instance_id, .. }
            | EventKind::EntityOperationCalled { operation, target_instance_id, .. } => {
                format!("{} \"{operation}\" on {target_instance_id}", event.kind.type_name())
            }
            EventKind::EntityLockRequested { lock_set, .. } => {
                format!("EntityLockRequested on {}", lock_set.join(", "))
            }
            EventKind::EntityUnlockSent { target_instance_id, .. } => {
                format!("EntityUnlockSent to {target_instance_id}")
            }
            other => other.type_name().to_string(),
        };
        let message = format!(
            "non-deterministic orchestration: at sequence number {}, history has {expected} but {found}",
            event.event_id
        );
        // The first divergence is the one to report.
        if matches!(&self.completion, Some(Completion::Failed { failure }) if failure.error_type == NON_DETERMINISM_ERROR_TYPE)
        {
            return;
        }
        // Non-determinism overrides an outcome not reported yet: it was computed by code
        // that does not match its history.
        self.completion = None;
        self.finish(Completion::Failed { failure: FailureDetails::new(NON_DETERMINISM_ERROR_TYPE, message) });
    }

    fn resolve(&mut self, id: i32, outcome: TaskOutcome) {
        let mut state = lock(&self.state);
        // A result for a task the orchestrator stopped waiting for is ignored.
        let Some(slot) = state.open_tasks.get_mut(&id) else {
            return;
        };
        slot.resolve(outcome);
        drop(state);
        self.poll();
    }

    /// Polls the orchestrator while it keeps being woken.
    fn poll(&mut self) {
        self.wake_flag.0.store(true, Ordering::Release);
        while self.wake_flag.0.swap(false, Ordering::AcqRel) {
            let Some(future) = self.future.as_mut() else {
                return;
            };
            let mut context = Context::from_waker(&self.waker);
            let polled = AssertUnwindSafe(future.as_mut()).catch_unwind().poll_unpin(&mut context);
            let outcome = match polled {
                Poll::Pending => {
                    let fatal = lock(&self.state).fatal.clone();
                    if let Some(failure) = fatal {
                        self.finish(Completion::Failed { failure });
                        return;
                    }
                    continue;
                }
                Poll::Ready(Ok(result)) => result,
                Poll::Ready(Err(panic)) => {
                    let message = panic_message(panic.as_ref());
                    self.finish(Completion::Failed {
                        failure: FailureDetails::new(PANIC_ERROR_TYPE, format!("the orchestrator panicked: {message}")),
                    });
                    return;
                }
            };
            let fatal = lock(&self.state).fatal.clone();
            let completion = match (fatal, outcome) {
                (Some(failure), _) => Completion::Failed { failure },
                (None, Err(OrchestrationError(Ending::Failed(failure)))) => Completion::Failed { failure },
                // The output, or the continue-as-new the orchestrator asked for.
                (None, result) => {
                    let output = result.ok().flatten();
                    let state = lock(&self.state);
                    match &state.continue_as_new {
                        Some(request) => Completion::ContinuedAsNew {
                            input: request.input.clone(),
                            version: request.version.clone(),
                            carryover_events: if request.preserve_unprocessed_events {
                                state.unprocessed_events()
                            } else {
                                Vec::new()
                            },
                        },
                        None => Completion::Completed { output },
                    }
                }
            };
            self.finish(completion);
            return;
        }
    }

    fn finish(&mut self, completion: Completion) {
        if self.completion.is_none() {
            self.completion = Some(completion);
            // Dropping the future cancels every open task.
            self.future = None;
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        message.to_string()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "(no message)".to_string()
    }
}

/// The history a rewound execution replays: the failures that ended the execution
/// (those of its last episode) are taken out together with the scheduling of the tasks
/// that failed, and so is the end of the execution. Replayed, the orchestrator
/// schedules those activities and sub-orchestrations again and carries on from there;
/// failures it had caught and handled in earlier episodes stay as they were.
pub fn rewind_history(history: &[HistoryEvent]) -> Vec<HistoryEvent> {
    let last_episode = history.iter().rposition(|event| event.kind == EventKind::OrchestratorStarted).unwrap_or(0);
    let failed: std::collections::HashSet<i32> = history[last_episode..]
        .iter()
        .filter_map(|event| match &event.kind {
            EventKind::TaskFailed { task_scheduled_id, .. }
            | EventKind::SubOrchestrationInstanceFailed { task_scheduled_id, .. } => Some(*task_scheduled_id),
            _ => None,
        })
        .collect();
    history
        .iter()
        .enumerate()
        .filter(|(index, event)| match &event.kind {
            EventKind::ExecutionCompleted { .. } => false,
            EventKind::TaskFailed { task_scheduled_id, .. }
            | EventKind::SubOrchestrationInstanceFailed { task_scheduled_id, .. } => {
                *index < last_episode || !failed.contains(task_scheduled_id)
            }
            EventKind::TaskScheduled { .. } | EventKind::SubOrchestrationInstanceCreated { .. } => {
                !failed.contains(&event.event_id)
            }
            _ => true,
        })
        .map(|(_, event)| event.clone())
        .collect()
}
