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

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::action::Action;
use crate::entity::EntityId;
use crate::history::{EventKind, FailureDetails, HistoryEvent, ParentInstance, Timestamp};
use crate::limits;
use crate::retry::RetryPolicy;

/// A failed activity, sub-orchestration or wait, as the orchestrator sees it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{task} failed: {details}")]
pub struct TaskError {
    /// What failed, e.g. `activity 'ProcessPayment' (#1)`.
    pub task: String,
    pub details: FailureDetails,
}

impl TaskError {
    pub fn error_type(&self) -> &str {
        &self.details.error_type
    }

    pub fn message(&self) -> &str {
        &self.details.error_message
    }

    /// True when this is the timeout of [`OrchestrationContext::wait_for_external_event_with_timeout`].
    pub fn is_timeout(&self) -> bool {
        self.details.error_type == TIMEOUT_ERROR_TYPE
    }
}

/// Error type of a wait that timed out.
pub const TIMEOUT_ERROR_TYPE: &str = "TimeoutError";

/// Why an orchestration failed; becomes the instance's failure details.
#[derive(Clone, Debug, PartialEq)]
pub struct OrchestrationError(pub FailureDetails);

impl OrchestrationError {
    pub fn new(error_type: impl Into<String>, message: impl Into<String>) -> OrchestrationError {
        OrchestrationError(FailureDetails::new(error_type, message))
    }

    /// A failure with error type `OrchestrationError`.
    pub fn msg(message: impl Into<String>) -> OrchestrationError {
        OrchestrationError::new("OrchestrationError", message)
    }
}

impl std::fmt::Display for OrchestrationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// An uncaught task failure fails the orchestration with the task's failure details.
impl From<TaskError> for OrchestrationError {
    fn from(error: TaskError) -> OrchestrationError {
        OrchestrationError(error.details)
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
    Failed(FailureDetails),
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

    pub fn instance_id(&self) -> String {
        self.lock().instance_id.clone()
    }

    /// The orchestrator's name as the instance was started with.
    pub fn name(&self) -> String {
        self.lock().name.clone()
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
        serde_json::from_str(input.as_deref().unwrap_or("null")).map_err(|error| {
            OrchestrationError::new("InvalidInput", format!("the orchestration input does not fit: {error}"))
        })
    }

    /// The input as raw JSON text.
    pub fn raw_input(&self) -> Option<String> {
        self.lock().input.clone()
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

    /// Sets the custom status that queries show, as JSON.
    pub fn set_custom_status<T: Serialize>(&self, status: &T) {
        let json = serde_json::to_string(status).ok();
        self.lock().custom_status = json;
    }

    /// Clears the custom status.
    pub fn clear_custom_status(&self) {
        self.lock().custom_status = None;
    }

    /// Schedules an activity and returns a future for its result.
    pub fn call_activity<T: DeserializeOwned>(&self, name: &str, input: &impl Serialize) -> TaskFuture<T> {
        match serialize_input(input) {
            Ok(input) => self.schedule_activity(name, input),
            Err(details) => TaskFuture::failed(self.clone(), format!("activity '{name}'"), details),
        }
    }

    fn schedule_activity<T>(&self, name: &str, input: Option<String>) -> TaskFuture<T> {
        let mut state = self.lock();
        let id = state.take_action(|id| Action::ScheduleTask { id, name: name.to_string(), input });
        state.open_tasks.insert(id, TaskSlot::default());
        drop(state);
        TaskFuture::new(self.clone(), id, format!("activity '{name}' (#{id})"))
    }

    /// Calls an activity, retrying failures per `policy` with durable timers between attempts.
    pub fn call_activity_with_retry<T: DeserializeOwned + Send + 'static>(
        &self,
        name: &str,
        input: &impl Serialize,
        policy: &RetryPolicy,
    ) -> impl Future<Output = Result<T, TaskError>> + Send + 'static {
        let context = self.clone();
        let name = name.to_string();
        let input = serialize_input(input);
        let policy = policy.clone();
        async move {
            let input = input.map_err(|details| TaskError { task: format!("activity '{name}'"), details })?;
            context.retry(&policy, || context.schedule_activity::<T>(&name, input.clone())).await
        }
    }

    async fn retry<T, F>(&self, policy: &RetryPolicy, mut attempt_once: impl FnMut() -> F) -> Result<T, TaskError>
    where
        F: Future<Output = Result<T, TaskError>>,
    {
        let first_attempt_at = self.current_utc_datetime();
        let mut attempt = 1;
        loop {
            let error = match attempt_once().await {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            let now = self.current_utc_datetime();
            match policy.next_delay(attempt, &error.details, first_attempt_at, now) {
                Some(delay) => {
                    self.create_timer(now + chrono_duration(delay)).await;
                    attempt += 1;
                }
                None => return Err(error),
            }
        }
    }

    /// Starts a sub-orchestration with the id `"{instance_id}:{sequence}"` and returns a
    /// future for its output.
    pub fn call_sub_orchestrator<T: DeserializeOwned>(&self, name: &str, input: &impl Serialize) -> TaskFuture<T> {
        self.call_sub_orchestrator_with_id(name, None, input)
    }

    /// Starts a sub-orchestration, with the given instance id if any.
    pub fn call_sub_orchestrator_with_id<T: DeserializeOwned>(
        &self,
        name: &str,
        instance_id: Option<&str>,
        input: &impl Serialize,
    ) -> TaskFuture<T> {
        match serialize_input(input) {
            Ok(input) => self.schedule_sub_orchestration(name, instance_id.map(str::to_string), input),
            Err(details) => TaskFuture::failed(self.clone(), format!("sub-orchestration '{name}'"), details),
        }
    }

    fn schedule_sub_orchestration<T>(
        &self,
        name: &str,
        instance_id: Option<String>,
        input: Option<String>,
    ) -> TaskFuture<T> {
        let mut state = self.lock();
        if state.critical_section.as_ref().is_some_and(|section| section.granted) {
            drop(state);
            return TaskFuture::failed(
                self.clone(),
                format!("sub-orchestration '{name}'"),
                locking_rules_violation("a critical section cannot start sub-orchestrations"),
            );
        }
        let parent_id = state.instance_id.clone();
        let id = state.take_action(|id| Action::CreateSubOrchestration {
            id,
            name: name.to_string(),
            instance_id: instance_id.unwrap_or_else(|| format!("{parent_id}:{id}")),
            input,
        });
        state.open_tasks.insert(id, TaskSlot::default());
        drop(state);
        TaskFuture::new(self.clone(), id, format!("sub-orchestration '{name}' (#{id})"))
    }

    /// Calls a sub-orchestration with retries. Every attempt uses the same child
    /// instance id (given, or `"{instance_id}:{sequence of the first attempt}"`).
    pub fn call_sub_orchestrator_with_retry<T: DeserializeOwned + Send + 'static>(
        &self,
        name: &str,
        instance_id: Option<&str>,
        input: &impl Serialize,
        policy: &RetryPolicy,
    ) -> impl Future<Output = Result<T, TaskError>> + Send + 'static {
        let context = self.clone();
        let name = name.to_string();
        let input = serialize_input(input);
        let policy = policy.clone();
        let child_id = instance_id.map(str::to_string).unwrap_or_else(|| {
            let state = self.lock();
            format!("{}:{}", state.instance_id, state.next_sequence)
        });
        async move {
            let input = input.map_err(|details| TaskError { task: format!("sub-orchestration '{name}'"), details })?;
            context
                .retry(&policy, || {
                    context.schedule_sub_orchestration::<T>(&name, Some(child_id.clone()), input.clone())
                })
                .await
        }
    }

    /// A durable timer that fires at `fire_at`. Dropping the future cancels it.
    pub fn create_timer(&self, fire_at: Timestamp) -> TimerFuture {
        let mut state = self.lock();
        let id = state.take_action(|id| Action::CreateTimer { id, fire_at });
        state.open_tasks.insert(id, TaskSlot::default());
        drop(state);
        TimerFuture { inner: TaskFuture::new(self.clone(), id, format!("timer (#{id})")) }
    }

    /// A durable timer that fires `delay` after the current time.
    pub fn sleep(&self, delay: Duration) -> TimerFuture {
        self.create_timer(self.current_utc_datetime() + chrono_duration(delay))
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

    /// Waits for an external event at most `timeout` (a durable timer); on timeout the
    /// result is a [`TaskError`] for which [`TaskError::is_timeout`] is true.
    pub fn wait_for_external_event_with_timeout<T: DeserializeOwned + Send + 'static>(
        &self,
        name: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<T, TaskError>> + Send + 'static {
        let event = self.wait_for_external_event::<T>(name);
        let timer = self.sleep(timeout);
        let name = name.to_string();
        async move {
            match futures_util::future::select(event, timer).await {
                futures_util::future::Either::Left((result, _timer)) => result,
                futures_util::future::Either::Right(((), _event)) => Err(TaskError {
                    task: format!("wait for event '{name}'"),
                    details: FailureDetails::new(
                        TIMEOUT_ERROR_TYPE,
                        format!("event '{name}' was not received within {timeout:?}"),
                    ),
                }),
            }
        }
    }

    /// Sends an event to another instance (fire and forget). Events to instances that
    /// do not exist are dropped.
    pub fn send_event(&self, instance_id: &str, event_name: &str, data: &impl Serialize) {
        let input = serialize_input(data).unwrap_or(None);
        let mut state = self.lock();
        state.take_action(|id| Action::SendEvent {
            id,
            instance_id: instance_id.to_string(),
            name: event_name.to_string(),
            input,
        });
    }

    /// Ends this execution when the orchestrator returns and starts a new one with
    /// `input` and a fresh history. Unconsumed external events are dropped.
    pub fn continue_as_new(&self, input: &impl Serialize) {
        self.request_continue_as_new(input, false);
    }

    /// Like [`OrchestrationContext::continue_as_new`], but external events that were
    /// received and not consumed are delivered to the new execution.
    pub fn continue_as_new_preserving_events(&self, input: &impl Serialize) {
        self.request_continue_as_new(input, true);
    }

    fn request_continue_as_new(&self, input: &impl Serialize, preserve_unprocessed_events: bool) {
        let input = serialize_input(input).unwrap_or(None);
        self.lock().continue_as_new = Some(ContinueAsNewRequest { input, preserve_unprocessed_events });
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

    /// Waits for the first of the futures; returns its output and index.
    pub fn when_any<F: Future + Unpin>(&self, futures: impl IntoIterator<Item = F>) -> WhenAny<F> {
        let futures: Vec<F> = futures.into_iter().collect();
        assert!(!futures.is_empty(), "when_any needs at least one future");
        WhenAny { futures }
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
            (TaskOutcome::Failed(details), _) => Err(TaskError { task: this.inner.task.clone(), details }),
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
    serde_json::from_str(output.as_deref().unwrap_or("null")).map_err(|error| TaskError {
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
    early_failure: Option<FailureDetails>,
    _output: PhantomData<fn() -> T>,
}

impl<T> TaskFuture<T> {
    fn new(context: OrchestrationContext, id: i32, task: String) -> TaskFuture<T> {
        TaskFuture { context, id: Some(id), task, early_failure: None, _output: PhantomData }
    }

    fn failed(context: OrchestrationContext, task: String, details: FailureDetails) -> TaskFuture<T> {
        TaskFuture { context, id: None, task, early_failure: Some(details), _output: PhantomData }
    }

    /// The sequence number of this task (`None` if it could not be scheduled).
    pub fn sequence_number(&self) -> Option<i32> {
        self.id
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
            TaskOutcome::Failed(details) => Err(TaskError { task: this.task.clone(), details }),
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
                Poll::Ready(Err(TaskError { task: format!("event '{}'", this.name), details }))
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
    futures: Vec<F>,
}

impl<F: Future + Unpin> Future for WhenAny<F> {
    /// The first output and the index of its future.
    type Output = (F::Output, usize);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        for (index, future) in this.futures.iter_mut().enumerate() {
            if let Poll::Ready(output) = Pin::new(future).poll(cx) {
                return Poll::Ready((output, index));
            }
        }
        Poll::Pending
    }
}
