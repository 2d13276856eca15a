//! The orchestrator's view of the world: [`OrchestrationContext`] and the futures it
//! hands out (activities, timers, sub-orchestrations, external events).
//!
//! Every method is deterministic: it reads only what history provides (input, current
//! time, results) and records what the orchestrator decides as an [`Action`] with the
//! next sequence number. The futures complete when [`crate::replay::Execution`]
//! applies the matching history event; nothing here sleeps or does I/O.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

pub use futures_util::future::Either;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::action::Action;
use crate::entity::EntityId;
use crate::failure::{ActivityError, Failure, Never, TaskFailure};
use crate::handle::{Callable, Event, Orchestration, Target};
use crate::history::{EventKind, FailureDetails, HistoryEvent, ParentInstance, Timestamp};
use crate::limits;
use crate::retry::RetryPolicy;

/// A failed activity, sub-orchestration or wait, as the orchestrator sees it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{task} failed: {details}")]
pub struct TaskError {
    /// What failed, e.g. `activity 'ProcessPayment' (#1)`.
    pub task: String,
    /// The failure as history records it.
    pub details: FailureDetails,
}

impl TaskError {
    /// The failure's error type ([`FailureDetails::error_type`]).
    pub fn error_type(&self) -> &str {
        &self.details.error_type
    }

    /// The failure's message ([`FailureDetails::error_message`]).
    pub fn message(&self) -> &str {
        &self.details.error_message
    }

    /// True when the error type is [`TIMEOUT_ERROR_TYPE`]. Keel's own waits do not fail
    /// on a timeout: [`EventFuture::timeout`] yields `None`.
    pub fn is_timeout(&self) -> bool {
        self.details.error_type == TIMEOUT_ERROR_TYPE
    }
}

/// Error type of a wait that timed out.
pub const TIMEOUT_ERROR_TYPE: &str = "TimeoutError";

/// Error type of a timer whose fire time cannot be represented.
pub const INVALID_TIMER_ERROR_TYPE: &str = "InvalidTimer";

/// How an orchestrator ends other than by returning its output: a failure (which
/// becomes the instance's failure details) or, from [`OrchestrationContext::continue_as_new`],
/// a new execution.
#[derive(Clone, Debug, PartialEq)]
pub struct OrchestrationError(pub(crate) Ending);

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Ending {
    Failed(FailureDetails),
    ContinueAsNew,
}

impl OrchestrationError {
    /// A failure with this error type and message.
    pub fn new(error_type: impl Into<String>, message: impl Into<String>) -> OrchestrationError {
        OrchestrationError::failed(FailureDetails::new(error_type, message))
    }

    /// A failure with error type `OrchestrationError`.
    pub fn msg(message: impl Into<String>) -> OrchestrationError {
        OrchestrationError::new("OrchestrationError", message)
    }

    /// A failure with these details.
    pub fn failed(details: FailureDetails) -> OrchestrationError {
        OrchestrationError(Ending::Failed(details))
    }

    /// A failure made from any error (its full type path becomes the error type).
    pub fn from_error<E: std::error::Error>(error: &E) -> OrchestrationError {
        OrchestrationError::new(std::any::type_name::<E>(), error.to_string())
    }

    /// The failure's details; `None` for a continue-as-new.
    pub fn details(&self) -> Option<&FailureDetails> {
        match &self.0 {
            Ending::Failed(details) => Some(details),
            Ending::ContinueAsNew => None,
        }
    }
}

impl std::fmt::Display for OrchestrationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Ending::Failed(details) => details.fmt(f),
            Ending::ContinueAsNew => f.write_str("the orchestration continues as new"),
        }
    }
}

/// An uncaught task failure fails the orchestration with the task's failure details.
impl From<TaskError> for OrchestrationError {
    fn from(error: TaskError) -> OrchestrationError {
        OrchestrationError::failed(error.details)
    }
}

/// An uncaught typed failure fails the orchestration with its details.
impl<E: Failure> From<TaskFailure<E>> for OrchestrationError {
    fn from(failure: TaskFailure<E>) -> OrchestrationError {
        OrchestrationError::failed(failure.details())
    }
}

impl From<serde_json::Error> for OrchestrationError {
    fn from(error: serde_json::Error) -> OrchestrationError {
        OrchestrationError::new("SerializationError", error.to_string())
    }
}

/// What a task slot was resolved with.
#[derive(Debug)]
pub(crate) enum TaskOutcome {
    Completed(Option<String>),
    /// Boxed: every open task of a fan-out has a slot for its outcome.
    Failed(Box<FailureDetails>),
}

#[derive(Debug, Default)]
pub(crate) struct TaskSlot {
    pub(crate) outcome: Option<TaskOutcome>,
    pub(crate) waker: Option<Waker>,
}

impl TaskSlot {
    pub(crate) fn resolve(&mut self, outcome: TaskOutcome) {
        self.outcome = Some(outcome);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

/// A request to continue as new, made by the orchestrator before it returns.
#[derive(Clone, Debug)]
pub(crate) struct ContinueAsNewRequest {
    pub(crate) input: Option<String>,
    /// The version the next execution runs (`None`: the current one).
    pub(crate) version: Option<String>,
    pub(crate) preserve_unprocessed_events: bool,
}

/// An external event that arrived with nobody waiting for it.
#[derive(Clone, Debug)]
pub(crate) struct BufferedEvent {
    pub(crate) name: String,
    pub(crate) input: Option<String>,
    pub(crate) arrival: u64,
}

/// The mutable state shared by the context, its futures and the execution.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) instance_id: String,
    pub(crate) name: String,
    pub(crate) version: Option<String>,
    pub(crate) execution_id: String,
    pub(crate) input: Option<String>,
    pub(crate) parent: Option<ParentInstance>,
    pub(crate) current_time: Timestamp,
    pub(crate) is_replaying: bool,
    pub(crate) next_sequence: i32,
    /// Actions taken that history does not hold yet, by sequence number.
    pub(crate) pending_actions: BTreeMap<i32, Action>,
    /// Tasks the orchestrator may still await, by sequence number.
    pub(crate) open_tasks: HashMap<i32, TaskSlot>,
    /// Waiters for external events, by lower-cased name, oldest first.
    pub(crate) event_waiters: HashMap<String, VecDeque<u64>>,
    pub(crate) event_slots: HashMap<u64, TaskSlot>,
    pub(crate) next_waiter_id: u64,
    /// Events nobody waited for yet, by lower-cased name, in arrival order.
    pub(crate) buffered_events: HashMap<String, VecDeque<BufferedEvent>>,
    pub(crate) next_arrival: u64,
    pub(crate) custom_status: Option<String>,
    pub(crate) continue_as_new: Option<ContinueAsNewRequest>,
    pub(crate) guid_counter: u64,
    pub(crate) actions_taken: usize,
    /// A failure raised by a context method (e.g. too many actions); fails the execution.
    pub(crate) fatal: Option<FailureDetails>,
    /// Entity calls waiting for their answer: request id → sequence number.
    pub(crate) entity_calls: HashMap<String, i32>,
    /// Lock requests waiting for their grant: critical section id → sequence number.
    pub(crate) lock_requests: HashMap<String, i32>,
    /// The critical section the orchestrator is in or waits for.
    pub(crate) critical_section: Option<OpenSection>,
}

/// A critical section of the orchestration: requested, and possibly granted.
#[derive(Clone, Debug)]
pub(crate) struct OpenSection {
    pub(crate) id: String,
    pub(crate) lock_set: Vec<String>,
    pub(crate) granted: bool,
}

impl State {
    pub(crate) fn new(instance_id: &str) -> State {
        State {
            instance_id: instance_id.to_string(),
            name: String::new(),
            version: None,
            execution_id: String::new(),
            input: None,
            parent: None,
            current_time: Timestamp::MIN_UTC,
            is_replaying: false,
            next_sequence: 0,
            pending_actions: BTreeMap::new(),
            open_tasks: HashMap::new(),
            event_waiters: HashMap::new(),
            event_slots: HashMap::new(),
            next_waiter_id: 0,
            buffered_events: HashMap::new(),
            next_arrival: 0,
            custom_status: None,
            continue_as_new: None,
            guid_counter: 0,
            actions_taken: 0,
            fatal: None,
            entity_calls: HashMap::new(),
            lock_requests: HashMap::new(),
            critical_section: None,
        }
    }

    /// Releases the lock of a critical section on every entity of `lock_set`.
    pub(crate) fn unlock_all(&mut self, critical_section_id: &str, lock_set: &[String]) {
        let parent_instance_id = self.instance_id.clone();
        for target in lock_set {
            self.take_action(|id| Action::UnlockEntity {
                id,
                critical_section_id: critical_section_id.to_string(),
                target: target.clone(),
                parent_instance_id: parent_instance_id.clone(),
            });
        }
    }

    /// Records an action under the next sequence number and returns that number.
    fn take_action(&mut self, make: impl FnOnce(i32) -> Action) -> i32 {
        let id = self.next_sequence;
        self.next_sequence += 1;
        self.actions_taken += 1;
        if self.actions_taken > limits::MAX_ACTIONS_PER_EXECUTION && self.fatal.is_none() {
            self.fatal = Some(FailureDetails::new(
                "TooManyActions",
                format!(
                    "the orchestration took more than {} actions in one execution; use continue_as_new",
                    limits::MAX_ACTIONS_PER_EXECUTION
                ),
            ));
        }
        self.pending_actions.insert(id, make(id));
        id
    }

    /// Delivers an external event to the oldest waiter for its name, or buffers it.
    pub(crate) fn deliver_event(&mut self, name: &str, input: Option<String>) {
        let key = name.to_lowercase();
        if let Some(waiter) = self.event_waiters.get_mut(&key).and_then(VecDeque::pop_front) {
            if let Some(slot) = self.event_slots.get_mut(&waiter) {
                slot.resolve(TaskOutcome::Completed(input));
                return;
            }
        }
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        self.buffered_events.entry(key).or_default().push_back(BufferedEvent {
            name: name.to_string(),
            input,
            arrival,
        });
    }

    /// The buffered events in arrival order, as `EventRaised` history events.
    pub(crate) fn unprocessed_events(&self) -> Vec<HistoryEvent> {
        let mut events: Vec<&BufferedEvent> = self.buffered_events.values().flatten().collect();
        events.sort_by_key(|event| event.arrival);
        events
            .into_iter()
            .map(|event| {
                HistoryEvent::new(
                    self.current_time,
                    EventKind::EventRaised { name: event.name.clone(), input: event.input.clone() },
                )
            })
            .collect()
    }
}

/// Locks shared state; a panic in user code never happens while it is held, so a
/// poisoned lock still holds consistent state.
pub(crate) fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The handle an orchestrator uses to do everything durable. Cheap to clone.
///
/// Calls go through handles ([`OrchestrationContext::call`]); a wait for an event can
/// give up after a while ([`OrchestrationContext::wait`], [`EventFuture::timeout`]);
/// [`OrchestrationContext::race`] takes whichever of two futures finishes first. Each
/// call records an action; the runtime carries it out and feeds the result back as a
/// history event, here done by hand with an [`Execution`](crate::Execution):
///
/// ```
/// use std::time::Duration;
/// use chrono::DateTime;
/// use keel_core::handle::{Activity, Event, Orchestration};
/// use keel_core::context::Either;
/// use keel_core::{orchestrator, Action, Completion, EventKind, Execution, HistoryEvent};
/// use keel_core::{OrchestrationContext, OrchestrationError};
///
/// const PLACE_ORDER: Orchestration<u64, String> = Orchestration::new("PlaceOrder");
/// const CHARGE: Activity<u64, String> = Activity::new("Charge");
/// const APPROVAL: Event<bool> = Event::new("Approval");
///
/// async fn place_order(ctx: OrchestrationContext) -> Result<String, OrchestrationError> {
///     let amount: u64 = ctx.input()?;
///     if amount > 1_000 {
///         // A manager has a day to answer; `None` when nobody did.
///         match ctx.wait(APPROVAL).timeout(Duration::from_secs(86_400)).await? {
///             Some(true) => {}
///             Some(false) => return Err(OrchestrationError::msg("rejected")),
///             None => return Err(OrchestrationError::msg("nobody approved the order")),
///         }
///     }
///     // The payment, unless it takes more than a minute.
///     match ctx.race(ctx.call(CHARGE, &amount), ctx.sleep(Duration::from_secs(60))).await {
///         Either::Left(receipt) => Ok(receipt?),
///         Either::Right(()) => Err(OrchestrationError::msg("the payment took too long")),
///     }
/// }
///
/// let t0 = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
/// let start = [
///     HistoryEvent::new(t0, EventKind::OrchestratorStarted),
///     HistoryEvent::new(
///         t0,
///         EventKind::ExecutionStarted {
///             name: PLACE_ORDER.name().into(),
///             version: None,
///             input: Some("250".into()),
///             execution_id: "e1".into(),
///             parent: None,
///             scheduled_start: None,
///             trace: None,
///         },
///     ),
/// ];
/// let mut execution = Execution::new("order-17", orchestrator(place_order));
///
/// // First episode: no approval needed; the charge (#0) and its one-minute timer (#1).
/// let episode = execution.run_episode(&[], &start);
/// assert!(matches!(&episode.actions[..],
///     [Action::ScheduleTask { id: 0, name, .. }, Action::CreateTimer { id: 1, .. }] if name == "Charge"));
///
/// // The charge returns before the timer fires: the orchestration completes.
/// let charged = HistoryEvent::new(
///     t0,
///     EventKind::TaskCompleted { task_scheduled_id: 0, result: Some(r#""receipt-1""#.into()) },
/// );
/// let episode = execution.run_episode(&[], &[HistoryEvent::new(t0, EventKind::OrchestratorStarted), charged]);
/// assert_eq!(episode.completion, Some(Completion::Completed { output: Some(r#""receipt-1""#.into()) }));
/// ```
#[derive(Clone, Debug)]
pub struct OrchestrationContext {
    pub(crate) state: Arc<Mutex<State>>,
}

impl OrchestrationContext {
    pub(crate) fn new(state: Arc<Mutex<State>>) -> OrchestrationContext {
        OrchestrationContext { state }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The instance's id; the same for all its executions.
    pub fn instance_id(&self) -> String {
        self.lock().instance_id.clone()
    }

    /// The orchestrator's name as the instance was started with.
    pub fn name(&self) -> String {
        self.lock().name.clone()
    }

    /// The orchestration version the instance was started with (see the worker's
    /// versioning options); `None` for an unversioned instance.
    pub fn version(&self) -> Option<String> {
        self.lock().version.clone()
    }

    /// The current execution (a new one starts with each continue-as-new).
    pub fn execution_id(&self) -> String {
        self.lock().execution_id.clone()
    }

    /// The parent orchestration, when this is a sub-orchestration.
    pub fn parent(&self) -> Option<ParentInstance> {
        self.lock().parent.clone()
    }

    /// The input, deserialized. A missing input reads as JSON `null`.
    pub fn input<T: DeserializeOwned>(&self) -> Result<T, OrchestrationError> {
        let input = self.lock().input.clone();
        crate::history::decode_payload(input.as_deref().unwrap_or("null")).map_err(|error| {
            OrchestrationError::new("InvalidInput", format!("the orchestration input does not fit: {error}"))
        })
    }

    /// The time of the current episode, from history: the same on every replay.
    pub fn current_utc_datetime(&self) -> Timestamp {
        self.lock().current_time
    }

    /// True while the orchestrator re-runs events it has seen before. Guard side
    /// effects such as logging with it (or use [`OrchestrationContext::log`]).
    pub fn is_replaying(&self) -> bool {
        self.lock().is_replaying
    }

    /// A replay-safe log line: emitted once, not again on every replay.
    pub fn log(&self, level: tracing::Level, message: impl std::fmt::Display) {
        let state = self.lock();
        if state.is_replaying {
            return;
        }
        let instance_id = state.instance_id.as_str();
        let function = state.name.as_str();
        match level {
            tracing::Level::ERROR => tracing::error!(instance_id, function, "{message}"),
            tracing::Level::WARN => tracing::warn!(instance_id, function, "{message}"),
            tracing::Level::INFO => tracing::info!(instance_id, function, "{message}"),
            tracing::Level::DEBUG => tracing::debug!(instance_id, function, "{message}"),
            tracing::Level::TRACE => tracing::trace!(instance_id, function, "{message}"),
        }
    }

    /// A new UUID, the same on every replay (name-based, from the instance id, the
    /// episode time and a counter).
    pub fn new_guid(&self) -> uuid::Uuid {
        const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x9e95_2958_5e33_4daf_827f_2fa1_2937_b875);
        let mut state = self.lock();
        let counter = state.guid_counter;
        state.guid_counter += 1;
        let name = format!("{}_{}_{}", state.instance_id, state.current_time.to_rfc3339(), counter);
        uuid::Uuid::new_v5(&NAMESPACE, name.as_bytes())
    }

    /// Sets the custom status that queries show, as JSON. A status that does not
    /// serialize or is over the payload limit fails the orchestration.
    pub fn set_custom_status<T: Serialize>(&self, status: &T) {
        match serialize_input(status) {
            Ok(json) => self.lock().custom_status = json,
            Err(details) => self.fail(details),
        }
    }

    /// Fails the execution at its next step (a context method's misuse).
    fn fail(&self, details: FailureDetails) {
        let mut state = self.lock();
        if state.fatal.is_none() {
            state.fatal = Some(details);
        }
    }

    /// Clears the custom status.
    pub fn clear_custom_status(&self) {
        self.lock().custom_status = None;
    }

    /// Calls an activity by name: the escape hatch for activities hosted elsewhere (an
    /// SDK worker), whose types the compiler cannot know. Rust activities are called
    /// through their handle ([`OrchestrationContext::call`]).
    pub fn call_activity<T: DeserializeOwned>(&self, name: &str, input: &impl Serialize) -> Call<T, ActivityError> {
        self.start_call(CallTarget::activity(name), None, input)
    }

    /// Calls a sub-orchestration by name (the escape hatch, see
    /// [`OrchestrationContext::call_activity`]); `instance_id` defaults to
    /// `"{instance_id}:{sequence}"`.
    pub fn call_sub_orchestrator<T: DeserializeOwned>(
        &self,
        name: &str,
        instance_id: Option<&str>,
        input: &impl Serialize,
    ) -> Call<T, ActivityError> {
        self.start_call(CallTarget::sub_orchestration(name), instance_id.map(str::to_string), input)
    }

    fn schedule_activity<T>(&self, name: &str, input: Option<String>) -> TaskFuture<T> {
        let mut state = self.lock();
        let id = state.take_action(|id| Action::ScheduleTask { id, name: name.to_string(), input });
        state.open_tasks.insert(id, TaskSlot::default());
        drop(state);
        TaskFuture::new(self.clone(), id, format!("activity '{name}' (#{id})"))
    }

    fn schedule_sub_orchestration<T>(&self, name: &str, instance_id: String, input: Option<String>) -> TaskFuture<T> {
        let mut state = self.lock();
        if state.critical_section.as_ref().is_some_and(|section| section.granted) {
            drop(state);
            return TaskFuture::failed(
                self.clone(),
                format!("sub-orchestration '{name}'"),
                locking_rules_violation("a critical section cannot start sub-orchestrations"),
            );
        }
        let id =
            state.take_action(|id| Action::CreateSubOrchestration { id, name: name.to_string(), instance_id, input });
        state.open_tasks.insert(id, TaskSlot::default());
        drop(state);
        TaskFuture::new(self.clone(), id, format!("sub-orchestration '{name}' (#{id})"))
    }

    /// A durable timer that fires at `fire_at`. Dropping the future cancels it.
    pub fn create_timer(&self, fire_at: Timestamp) -> TimerFuture {
        let mut state = self.lock();
        let id = state.take_action(|id| Action::CreateTimer { id, fire_at });
        state.open_tasks.insert(id, TaskSlot::default());
        drop(state);
        TimerFuture { inner: TaskFuture::new(self.clone(), id, format!("timer (#{id})")) }
    }

    /// A durable timer that fires `delay` after the current time. A delay past the
    /// end of time fails the orchestration (`InvalidTimer`).
    pub fn sleep(&self, delay: Duration) -> TimerFuture {
        let now = self.current_utc_datetime();
        let fire_at = chrono::Duration::from_std(delay).ok().and_then(|delay| now.checked_add_signed(delay));
        match fire_at {
            Some(fire_at) => self.create_timer(fire_at),
            None => {
                self.fail(FailureDetails::new(
                    INVALID_TIMER_ERROR_TYPE,
                    format!("a timer of {delay:?} from {now} ends after the last representable time"),
                ));
                self.create_timer(Timestamp::MAX_UTC)
            }
        }
    }

    /// Waits for the event `event` (see [`OrchestrationContext::wait_for_external_event`]);
    /// `.timeout(d)` on the result gives up after `d`.
    pub fn wait<T: DeserializeOwned>(&self, event: Event<T>) -> EventFuture<T> {
        self.wait_for_external_event(event.name())
    }

    /// Calls an activity or a sub-orchestration through its handle and returns a future
    /// for its typed result. The call is scheduled now; `.with_retry(policy)` retries it.
    /// A sub-orchestration gets the instance id `"{instance_id}:{sequence}"`.
    pub fn call<H: Callable>(&self, handle: H, input: &H::Input) -> Call<H::Output, H::Failure> {
        let target = match handle.target() {
            Target::Activity(name) => CallTarget::activity(name),
            Target::SubOrchestration(name) => CallTarget::sub_orchestration(name),
        };
        self.start_call(target, None, input)
    }

    /// Calls a sub-orchestration under the given instance id.
    pub fn call_with_instance_id<I: Serialize, O: DeserializeOwned>(
        &self,
        orchestration: Orchestration<I, O>,
        instance_id: &str,
        input: &I,
    ) -> Call<O, Never> {
        self.start_call(CallTarget::sub_orchestration(orchestration.name()), Some(instance_id.to_string()), input)
    }

    /// Schedules the first attempt of a call. A sub-orchestration's instance id is fixed
    /// here, so every attempt (and every call of a fan-out) has its own; an id given
    /// that [`limits::check_instance_id`] refuses fails the call (`InvalidInput`) and
    /// creates nothing.
    fn start_call<O, E>(
        &self,
        mut target: CallTarget,
        instance_id: Option<String>,
        input: &impl Serialize,
    ) -> Call<O, E> {
        // Boxed: a fan-out holds a call per task, and a failure is rare.
        let mut input = serialize_input(input).map_err(Box::new);
        if target.sub_orchestration {
            if let Some(Err(message)) = instance_id.as_deref().map(limits::check_instance_id) {
                input =
                    Err(Box::new(FailureDetails::new("InvalidInput", format!("the sub-orchestration's {message}"))));
            }
            target.instance_id = Some(instance_id.unwrap_or_else(|| {
                let state = self.lock();
                format!("{}:{}", state.instance_id, state.next_sequence)
            }));
        }
        let attempt = self.attempt(&target, &input);
        Call { context: self.clone(), target, input, attempt, _failure: PhantomData }
    }

    /// Schedules one attempt of a call.
    fn attempt<O>(&self, target: &CallTarget, input: &Result<Option<String>, Box<FailureDetails>>) -> TaskFuture<O> {
        let kind = if target.sub_orchestration { "sub-orchestration" } else { "activity" };
        match (input, &target.instance_id) {
            (Err(details), _) => {
                TaskFuture::failed(self.clone(), format!("{kind} '{}'", target.name), (**details).clone())
            }
            (Ok(input), Some(instance_id)) => {
                self.schedule_sub_orchestration(&target.name, instance_id.clone(), input.clone())
            }
            (Ok(input), None) => self.schedule_activity(&target.name, input.clone()),
        }
    }

    /// Waits for the first of two futures of any types; the other is dropped (a timer
    /// is cancelled, a wait given up).
    pub fn race<A: Future, B: Future>(&self, a: A, b: B) -> Race<A, B> {
        Race { a: Box::pin(a), b: Box::pin(b) }
    }

    /// Waits for all futures; the results in the order given, or the first failure in
    /// that order.
    pub fn try_when_all<T, E, F: Future<Output = Result<T, E>>>(
        &self,
        futures: impl IntoIterator<Item = F>,
    ) -> impl Future<Output = Result<Vec<T>, E>> {
        // Collected now, so every call in `futures` is scheduled now.
        let all = futures_util::future::join_all(futures);
        async move { all.await.into_iter().collect() }
    }

    /// Waits for an external event (names are case-insensitive). Events raised before
    /// the wait are buffered and handed out in arrival order; several waiters for one
    /// name get events in the order they started waiting.
    pub fn wait_for_external_event<T: DeserializeOwned>(&self, name: &str) -> EventFuture<T> {
        let key = name.to_lowercase();
        let mut state = self.lock();
        let waiter = state.next_waiter_id;
        state.next_waiter_id += 1;
        let mut slot = TaskSlot::default();
        let buffered = state.buffered_events.get_mut(&key).and_then(VecDeque::pop_front);
        match buffered {
            Some(event) => slot.outcome = Some(TaskOutcome::Completed(event.input)),
            None => state.event_waiters.entry(key.clone()).or_default().push_back(waiter),
        }
        state.event_slots.insert(waiter, slot);
        drop(state);
        EventFuture { context: self.clone(), waiter, key, name: name.to_string(), _output: PhantomData }
    }

    /// Sends an event to another instance (fire and forget). Events to instances that
    /// do not exist are dropped.
    /// Data that does not serialize or is over the payload limit fails the orchestration.
    pub fn send_event(&self, instance_id: &str, event_name: &str, data: &impl Serialize) {
        let input = match serialize_input(data) {
            Ok(input) => input,
            Err(details) => return self.fail(details),
        };
        let mut state = self.lock();
        state.take_action(|id| Action::SendEvent {
            id,
            instance_id: instance_id.to_string(),
            name: event_name.to_string(),
            input,
        });
    }

    /// Ends this execution and starts a new one with `input` and a fresh history:
    /// `return ctx.continue_as_new(&next);`. Unconsumed external events are dropped. An
    /// input that does not serialize or is over the payload limit fails the orchestration.
    pub fn continue_as_new<T>(&self, input: &impl Serialize) -> Result<T, OrchestrationError> {
        self.request_continue_as_new(input, false)
    }

    /// Like [`OrchestrationContext::continue_as_new`], but external events that were
    /// received and not consumed are delivered to the new execution.
    pub fn continue_as_new_preserving_events<T>(&self, input: &impl Serialize) -> Result<T, OrchestrationError> {
        self.request_continue_as_new(input, true)
    }

    fn request_continue_as_new<T>(
        &self,
        input: &impl Serialize,
        preserve_unprocessed_events: bool,
    ) -> Result<T, OrchestrationError> {
        let input = serialize_input(input).map_err(OrchestrationError::failed)?;
        let mut state = self.lock();
        let version = state.continue_as_new.take().and_then(|request| request.version);
        state.continue_as_new = Some(ContinueAsNewRequest { input, version, preserve_unprocessed_events });
        Err(OrchestrationError(Ending::ContinueAsNew))
    }

    /// Continues as new (see [`OrchestrationContext::continue_as_new`]) on another
    /// version of the orchestration: the next execution runs that version's code.
    pub fn continue_as_new_with_version<T>(
        &self,
        input: &impl Serialize,
        version: &str,
    ) -> Result<T, OrchestrationError> {
        if let Err(message) = limits::check_name("version", version) {
            return Err(OrchestrationError::new("InvalidInput", message));
        }
        let input = serialize_input(input).map_err(OrchestrationError::failed)?;
        self.lock().continue_as_new = Some(ContinueAsNewRequest {
            input,
            version: Some(version.to_string()),
            preserve_unprocessed_events: false,
        });
        Err(OrchestrationError(Ending::ContinueAsNew))
    }

    /// Sends a one-way operation to an entity (created on its first operation). The
    /// entity runs it in its turn; the orchestration does not wait for it.
    pub fn signal_entity(&self, entity: &EntityId, operation: &str, input: &impl Serialize) -> Result<(), TaskError> {
        self.send_signal(entity, operation, input, None)
    }

    /// Like [`OrchestrationContext::signal_entity`], delivered at `at`.
    pub fn signal_entity_at(
        &self,
        entity: &EntityId,
        operation: &str,
        input: &impl Serialize,
        at: Timestamp,
    ) -> Result<(), TaskError> {
        self.send_signal(entity, operation, input, Some(at))
    }

    fn send_signal(
        &self,
        entity: &EntityId,
        operation: &str,
        input: &impl Serialize,
        scheduled_time: Option<Timestamp>,
    ) -> Result<(), TaskError> {
        let task = || format!("signal '{operation}' to entity {entity}");
        let input = serialize_input(input).map_err(|details| TaskError { task: task(), details })?;
        limits::check_name("operation", operation)
            .map_err(|message| TaskError { task: task(), details: FailureDetails::new("InvalidInput", message) })?;
        let request_id = self.new_guid().to_string();
        self.lock().take_action(|id| Action::SignalEntity {
            id,
            request_id,
            target: entity.instance_id(),
            operation: operation.to_string(),
            input,
            scheduled_time,
        });
        Ok(())
    }

    /// Calls an operation on an entity and returns a future for its result; a failed
    /// operation (an error or a panic in it) fails the future with its details. Inside
    /// a critical section only the locked entities may be called.
    pub fn call_entity<T: DeserializeOwned>(
        &self,
        entity: &EntityId,
        operation: &str,
        input: &impl Serialize,
    ) -> TaskFuture<T> {
        let task = format!("entity operation '{operation}' on {entity}");
        let input = match serialize_input(input) {
            Ok(input) => input,
            Err(details) => return TaskFuture::failed(self.clone(), task, details),
        };
        if let Err(message) = limits::check_name("operation", operation) {
            return TaskFuture::failed(self.clone(), task, FailureDetails::new("InvalidInput", message));
        }
        let target = entity.instance_id();
        let request_id = self.new_guid().to_string();
        let mut state = self.lock();
        if let Some(section) = state.critical_section.as_ref().filter(|section| section.granted) {
            if !section.lock_set.contains(&target) {
                drop(state);
                return TaskFuture::failed(
                    self.clone(),
                    task,
                    locking_rules_violation(&format!(
                        "a critical section may only call the entities it locked; {entity} is not one of them"
                    )),
                );
            }
        }
        let parent_instance_id = state.instance_id.clone();
        let parent_execution_id = state.execution_id.clone();
        let id = state.take_action(|id| Action::CallEntity {
            id,
            request_id: request_id.clone(),
            target,
            operation: operation.to_string(),
            input,
            parent_instance_id,
            parent_execution_id,
        });
        state.open_tasks.insert(id, TaskSlot::default());
        state.entity_calls.insert(request_id, id);
        drop(state);
        TaskFuture::new(self.clone(), id, format!("{task} (#{id})"))
    }

    /// Enters a critical section: locks every entity of `entities` (in a global order,
    /// so critical sections never deadlock) and resolves to a guard once all are held.
    /// While it is held, other callers' operations on those entities wait; the
    /// orchestration may call only them and start no sub-orchestration. Dropping the
    /// guard (or the end of the orchestration) releases the locks. Critical sections do
    /// not nest.
    pub fn lock_entities<'a>(&self, entities: impl IntoIterator<Item = &'a EntityId>) -> LockFuture {
        let lock_set: Vec<String> = entities
            .into_iter()
            .map(EntityId::instance_id)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let task = format!("lock of {}", lock_set.join(", "));
        if lock_set.is_empty() {
            return LockFuture::failed(self.clone(), task, locking_rules_violation("a lock needs at least one entity"));
        }
        if self.lock().critical_section.is_some() {
            return LockFuture::failed(
                self.clone(),
                task,
                locking_rules_violation("critical sections do not nest: release the current one first"),
            );
        }
        let critical_section_id = self.new_guid().to_string();
        let mut state = self.lock();
        let parent_instance_id = state.instance_id.clone();
        let id = state.take_action(|id| Action::LockEntities {
            id,
            critical_section_id: critical_section_id.clone(),
            lock_set: lock_set.clone(),
            parent_instance_id,
        });
        state.open_tasks.insert(id, TaskSlot::default());
        state.lock_requests.insert(critical_section_id.clone(), id);
        state.critical_section =
            Some(OpenSection { id: critical_section_id.clone(), lock_set: lock_set.clone(), granted: false });
        drop(state);
        LockFuture {
            inner: TaskFuture::new(self.clone(), id, format!("{task} (#{id})")),
            section: Some((critical_section_id, lock_set)),
        }
    }

    /// Waits for all futures; results in the order given.
    pub fn when_all<F: Future>(&self, futures: impl IntoIterator<Item = F>) -> futures_util::future::JoinAll<F> {
        futures_util::future::join_all(futures)
    }

    /// Waits for the first of the futures (of one type; see
    /// [`OrchestrationContext::race`] for two of different types); returns its output and
    /// index. The others are dropped. Never completes when `futures` is empty.
    pub fn when_any<F: Future>(&self, futures: impl IntoIterator<Item = F>) -> WhenAny<F> {
        WhenAny { futures: futures.into_iter().map(Box::pin).collect() }
    }
}

/// Error type of a broken critical-section rule (nesting, calling an entity that is
/// not locked, starting a sub-orchestration inside one).
pub const LOCKING_RULES_VIOLATION_ERROR_TYPE: &str = "LockingRulesViolation";

fn locking_rules_violation(message: &str) -> FailureDetails {
    let mut details = FailureDetails::new(LOCKING_RULES_VIOLATION_ERROR_TYPE, message);
    details.is_non_retriable = true;
    details
}

/// The future of [`OrchestrationContext::lock_entities`]: the guard of the critical
/// section once every lock is held. Dropping it before then gives the locks up as soon
/// as they are granted.
#[must_use = "futures do nothing unless awaited"]
pub struct LockFuture {
    inner: TaskFuture<()>,
    /// The critical section id and lock set; `None` for a request that was refused.
    section: Option<(String, Vec<String>)>,
}

impl LockFuture {
    fn failed(context: OrchestrationContext, task: String, details: FailureDetails) -> LockFuture {
        LockFuture { inner: TaskFuture::failed(context, task, details), section: None }
    }
}

impl Future for LockFuture {
    type Output = Result<CriticalSection, TaskError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let outcome = std::task::ready!(this.inner.poll_outcome(cx));
        Poll::Ready(match (outcome, this.section.take()) {
            (TaskOutcome::Completed(_), Some((id, lock_set))) => {
                let mut state = lock(&this.inner.context.state);
                if let Some(section) = state.critical_section.as_mut().filter(|section| section.id == id) {
                    section.granted = true;
                }
                drop(state);
                Ok(CriticalSection { context: this.inner.context.clone(), id, lock_set, released: false })
            }
            (TaskOutcome::Completed(_), None) => unreachable!("a refused lock request never completes"),
            (TaskOutcome::Failed(details), _) => Err(TaskError { task: this.inner.task.clone(), details: *details }),
        })
    }
}

impl Drop for LockFuture {
    fn drop(&mut self) {
        if let Some((id, _)) = self.section.take() {
            // Not granted yet: the grant, when it comes, is answered with unlocks.
            let mut state = lock(&self.inner.context.state);
            if state.critical_section.as_ref().is_some_and(|section| section.id == id) {
                state.critical_section = None;
            }
        }
    }
}

/// A held critical section. Dropping it (or [`CriticalSection::release`]) unlocks its
/// entities.
#[must_use = "the locks are released when the critical section is dropped"]
pub struct CriticalSection {
    context: OrchestrationContext,
    id: String,
    lock_set: Vec<String>,
    released: bool,
}

impl std::fmt::Debug for CriticalSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CriticalSection").field("id", &self.id).field("lock_set", &self.lock_set).finish()
    }
}

impl CriticalSection {
    /// The instance ids of the locked entities, sorted.
    pub fn lock_set(&self) -> &[String] {
        &self.lock_set
    }

    /// Leaves the critical section: every entity is unlocked.
    pub fn release(mut self) {
        self.unlock();
    }

    fn unlock(&mut self) {
        if std::mem::replace(&mut self.released, true) {
            return;
        }
        let mut state = lock(&self.context.state);
        if state.critical_section.as_ref().is_some_and(|section| section.id == self.id) {
            state.critical_section = None;
        }
        state.unlock_all(&self.id, &self.lock_set);
    }
}

impl Drop for CriticalSection {
    fn drop(&mut self) {
        self.unlock();
    }
}

/// Converts a std duration to a chrono one, saturating.
fn chrono_duration(duration: Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}

fn serialize_input(input: &impl Serialize) -> Result<Option<String>, FailureDetails> {
    let json =
        serde_json::to_string(input).map_err(|error| FailureDetails::new("SerializationError", error.to_string()))?;
    limits::check_payload("input", Some(&json)).map_err(|message| FailureDetails::new("PayloadTooLarge", message))?;
    Ok(Some(json))
}

fn deserialize_output<T: DeserializeOwned>(task: &str, output: Option<String>) -> Result<T, TaskError> {
    crate::history::decode_payload(output.as_deref().unwrap_or("null")).map_err(|error| TaskError {
        task: task.to_string(),
        details: FailureDetails::new("DeserializationError", format!("the result does not fit: {error}")),
    })
}

/// The result of an activity or sub-orchestration. Dropping it before it completes
/// means the result is ignored when it arrives.
#[must_use = "futures do nothing unless awaited"]
pub struct TaskFuture<T> {
    context: OrchestrationContext,
    /// `None` for a task that failed before it could be scheduled.
    id: Option<i32>,
    task: String,
    /// Boxed: a fan-out holds a future per task, and a failure is rare.
    early_failure: Option<Box<FailureDetails>>,
    _output: PhantomData<fn() -> T>,
}

impl<T> TaskFuture<T> {
    fn new(context: OrchestrationContext, id: i32, task: String) -> TaskFuture<T> {
        TaskFuture { context, id: Some(id), task, early_failure: None, _output: PhantomData }
    }

    fn failed(context: OrchestrationContext, task: String, details: FailureDetails) -> TaskFuture<T> {
        TaskFuture { context, id: None, task, early_failure: Some(Box::new(details)), _output: PhantomData }
    }

    fn poll_outcome(&mut self, cx: &mut Context<'_>) -> Poll<TaskOutcome> {
        let Some(id) = self.id else {
            let details = self.early_failure.take().expect("a task future was polled after it completed");
            return Poll::Ready(TaskOutcome::Failed(details));
        };
        let mut state = lock(&self.context.state);
        let slot = state.open_tasks.get_mut(&id).expect("a task future was polled after it completed");
        match slot.outcome.take() {
            Some(outcome) => {
                state.open_tasks.remove(&id);
                drop(state);
                self.id = None;
                Poll::Ready(outcome)
            }
            None => {
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl<T: DeserializeOwned> Future for TaskFuture<T> {
    type Output = Result<T, TaskError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        this.poll_outcome(cx).map(|outcome| match outcome {
            TaskOutcome::Completed(output) => deserialize_output(&this.task, output),
            TaskOutcome::Failed(details) => Err(TaskError { task: this.task.clone(), details: *details }),
        })
    }
}

impl<T> Drop for TaskFuture<T> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            lock(&self.context.state).open_tasks.remove(&id);
        }
    }
}

/// A durable timer. Dropping it before it fires cancels it.
#[must_use = "futures do nothing unless awaited"]
pub struct TimerFuture {
    inner: TaskFuture<()>,
}

impl TimerFuture {
    /// Cancels the timer: it will never complete (the same as dropping it).
    pub fn cancel(self) {}
}

impl Future for TimerFuture {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.get_mut().inner.poll_outcome(cx).map(|_| ())
    }
}

/// An external event. Dropping it before the event arrives stops waiting: a later
/// event with that name is buffered for the next waiter.
#[must_use = "futures do nothing unless awaited"]
pub struct EventFuture<T> {
    context: OrchestrationContext,
    waiter: u64,
    key: String,
    name: String,
    _output: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> Future for EventFuture<T> {
    type Output = Result<T, TaskError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut state = lock(&this.context.state);
        let slot = state.event_slots.get_mut(&this.waiter).expect("an event future was polled after it completed");
        match slot.outcome.take() {
            Some(TaskOutcome::Completed(input)) => {
                state.event_slots.remove(&this.waiter);
                drop(state);
                Poll::Ready(deserialize_output(&format!("event '{}'", this.name), input))
            }
            Some(TaskOutcome::Failed(details)) => {
                state.event_slots.remove(&this.waiter);
                Poll::Ready(Err(TaskError { task: format!("event '{}'", this.name), details: *details }))
            }
            None => {
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl<T> Drop for EventFuture<T> {
    fn drop(&mut self) {
        let mut state = lock(&self.context.state);
        if state.event_slots.remove(&self.waiter).is_some() {
            if let Some(waiters) = state.event_waiters.get_mut(&self.key) {
                waiters.retain(|waiter| *waiter != self.waiter);
            }
        }
    }
}

/// The future of [`OrchestrationContext::when_any`].
#[must_use = "futures do nothing unless awaited"]
pub struct WhenAny<F> {
    futures: Vec<Pin<Box<F>>>,
}

impl<F: Future> Future for WhenAny<F> {
    /// The first output and the index of its future.
    type Output = (F::Output, usize);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        for (index, future) in this.futures.iter_mut().enumerate() {
            if let Poll::Ready(output) = future.as_mut().poll(cx) {
                return Poll::Ready((output, index));
            }
        }
        Poll::Pending
    }
}

/// The future of [`OrchestrationContext::race`]: `Left` if the first future finished
/// first, `Right` if the second did.
#[must_use = "futures do nothing unless awaited"]
pub struct Race<A, B> {
    a: Pin<Box<A>>,
    b: Pin<Box<B>>,
}

impl<A: Future, B: Future> Future for Race<A, B> {
    type Output = Either<A::Output, B::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(output) = self.a.as_mut().poll(cx) {
            return Poll::Ready(Either::Left(output));
        }
        self.b.as_mut().poll(cx).map(Either::Right)
    }
}

/// A typed call of an activity or sub-orchestration ([`OrchestrationContext::call`]):
/// the output, or a [`TaskFailure`] that holds the activity's own failure type.
#[must_use = "futures do nothing unless awaited"]
pub struct Call<O, E> {
    context: OrchestrationContext,
    target: CallTarget,
    input: Result<Option<String>, Box<FailureDetails>>,
    attempt: TaskFuture<O>,
    _failure: PhantomData<fn() -> E>,
}

impl<O: DeserializeOwned, E: Failure> Future for Call<O, E> {
    type Output = Result<O, TaskFailure<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        Pin::new(&mut this.attempt).poll(cx).map(|result| result.map_err(TaskFailure::from_task_error))
    }
}

/// What a [`Call`] runs: an activity, or a sub-orchestration with the instance id
/// every attempt uses.
#[derive(Clone, Debug)]
struct CallTarget {
    name: String,
    sub_orchestration: bool,
    instance_id: Option<String>,
}

impl CallTarget {
    fn activity(name: &str) -> CallTarget {
        CallTarget { name: name.to_string(), sub_orchestration: false, instance_id: None }
    }

    fn sub_orchestration(name: &str) -> CallTarget {
        CallTarget { name: name.to_string(), sub_orchestration: true, instance_id: None }
    }
}

/// A typed predicate of [`Retrying::only_if`].
type FailurePredicate<E> = Arc<dyn Fn(&TaskFailure<E>) -> bool + Send + Sync>;

impl<O: DeserializeOwned + Send + 'static, E: Failure> Call<O, E> {
    /// Retries the call per `policy`, with durable timers between attempts. The first
    /// attempt is the one already scheduled.
    pub fn with_retry(self, policy: RetryPolicy) -> Retrying<O, E> {
        Retrying { call: Some(self), policy, predicate: None, running: None }
    }
}

/// A call with retries ([`Call::with_retry`]).
#[must_use = "futures do nothing unless awaited"]
pub struct Retrying<O, E> {
    call: Option<Call<O, E>>,
    policy: RetryPolicy,
    predicate: Option<FailurePredicate<E>>,
    running: Option<CallAttempts<O, E>>,
}

/// The boxed loop of a retried call's attempts.
type CallAttempts<O, E> = Pin<Box<dyn Future<Output = Result<O, TaskFailure<E>>> + Send>>;

impl<O: DeserializeOwned + Send + 'static, E: Failure> Retrying<O, E> {
    /// Retries only the failures for which `retry` returns true (it sees the typed
    /// failure); the policy's own rules (attempts, timeout) still apply.
    pub fn only_if(mut self, retry: impl Fn(&TaskFailure<E>) -> bool + Send + Sync + 'static) -> Retrying<O, E> {
        self.predicate = Some(Arc::new(retry));
        self
    }

    fn start(&mut self) -> CallAttempts<O, E> {
        let Call { context, target, input, attempt, .. } = self.call.take().expect("a retrying call starts once");
        let policy = self.policy.clone();
        let predicate = self.predicate.take();
        Box::pin(async move {
            let first_attempt_at = context.current_utc_datetime();
            let mut attempt = attempt;
            let mut number = 1;
            loop {
                let error = match attempt.await {
                    Ok(output) => return Ok(output),
                    Err(error) => error,
                };
                let failure = TaskFailure::from_task_error(error);
                if predicate.as_ref().is_some_and(|retry| !retry(&failure)) {
                    return Err(failure);
                }
                let now = context.current_utc_datetime();
                match policy.next_delay(number, &failure.details(), first_attempt_at, now) {
                    Some(delay) => {
                        context.create_timer(now + chrono_duration(delay)).await;
                        number += 1;
                        attempt = context.attempt(&target, &input);
                    }
                    None => return Err(failure),
                }
            }
        })
    }
}

impl<O: DeserializeOwned + Send + 'static, E: Failure> Future for Retrying<O, E> {
    type Output = Result<O, TaskFailure<E>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.running.is_none() {
            let running = self.start();
            self.running = Some(running);
        }
        self.running.as_mut().expect("started above").as_mut().poll(cx)
    }
}

/// A wait for an event that gives up after a while ([`EventFuture::timeout`]): the
/// event's data, or `None` when the time ran out first.
#[must_use = "futures do nothing unless awaited"]
pub struct EventTimeout<T> {
    event: EventFuture<T>,
    timer: TimerFuture,
}

impl<T: DeserializeOwned> Future for EventTimeout<T> {
    type Output = Result<Option<T>, TaskError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Poll::Ready(result) = Pin::new(&mut this.event).poll(cx) {
            return Poll::Ready(result.map(Some));
        }
        Pin::new(&mut this.timer).poll(cx).map(|()| Ok(None))
    }
}

impl<T> EventFuture<T> {
    /// Gives up waiting after `timeout` (a durable timer, started now).
    pub fn timeout(self, timeout: Duration) -> EventTimeout<T> {
        let timer = self.context.sleep(timeout);
        EventTimeout { event: self, timer }
    }
}
