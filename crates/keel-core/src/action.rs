//! What an episode decides: the actions an orchestrator took that history does not
//! hold yet, and how an execution ended.
//!
//! The runtime (or the gRPC front end, for remote workers) executes actions; each one
//! becomes one history event whose `event_id` is the action's sequence number.

use crate::history::{EventKind, FailureDetails, HistoryEvent, RuntimeStatus, Timestamp};
use crate::trace::TraceContext;

/// A decision of the orchestrator that has side effects outside it.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Runs an activity (`TaskScheduled`); its result comes back as `TaskCompleted` or
    /// `TaskFailed` under `id`.
    ScheduleTask {
        /// The action's sequence number.
        id: i32,
        /// The activity to run, as registered.
        name: String,
        /// The activity's input, JSON text; `None` reads as `null`.
        input: Option<String>,
    },
    /// A durable timer (`TimerCreated`): a `TimerFired` message under `id` that becomes
    /// visible at `fire_at`.
    CreateTimer {
        /// The action's sequence number.
        id: i32,
        /// When the timer fires.
        fire_at: Timestamp,
    },
    /// Starts a sub-orchestration (`SubOrchestrationInstanceCreated`); its end comes
    /// back as `SubOrchestrationInstanceCompleted` or `…Failed` under `id`.
    CreateSubOrchestration {
        /// The action's sequence number.
        id: i32,
        /// The orchestration to start, as registered.
        name: String,
        /// The child instance's id.
        instance_id: String,
        /// The child's input, JSON text; `None` reads as `null`.
        input: Option<String>,
    },
    /// Raises an event on another instance (`EventSent`), fire and forget: an event to
    /// an instance that does not exist is dropped.
    SendEvent {
        /// The action's sequence number.
        id: i32,
        /// The instance that receives the event.
        instance_id: String,
        /// The event's name (matched case-insensitively by the receiver).
        name: String,
        /// The event's data, JSON text.
        input: Option<String>,
    },
    /// A one-way operation on the entity with instance id `target`, delivered at
    /// `scheduled_time` (or at once).
    SignalEntity {
        /// The action's sequence number.
        id: i32,
        /// A GUID that identifies this request (deterministic: from the context).
        request_id: String,
        /// The entity's instance id, `@{name}@{key}`.
        target: String,
        /// The operation the entity runs.
        operation: String,
        /// The operation's input, JSON text.
        input: Option<String>,
        /// When the entity receives the signal; `None` for at once.
        scheduled_time: Option<Timestamp>,
    },
    /// A two-way operation: the entity answers the caller (`parent_instance_id`,
    /// `parent_execution_id`) under `request_id`.
    CallEntity {
        /// The action's sequence number.
        id: i32,
        /// A GUID that identifies this request; the answer carries it back.
        request_id: String,
        /// The entity's instance id, `@{name}@{key}`.
        target: String,
        /// The operation the entity runs.
        operation: String,
        /// The operation's input, JSON text.
        input: Option<String>,
        /// The calling orchestration's instance id: where the answer goes.
        parent_instance_id: String,
        /// The calling execution: the answer is dropped if the caller has moved on to
        /// another one.
        parent_execution_id: String,
    },
    /// Locks `lock_set` (sorted, distinct entity instance ids) for a critical section.
    LockEntities {
        /// The action's sequence number.
        id: i32,
        /// A GUID that identifies the critical section.
        critical_section_id: String,
        /// The entities to lock: sorted, distinct instance ids, at least one.
        lock_set: Vec<String>,
        /// The orchestration that owns the critical section; the grant goes to it.
        parent_instance_id: String,
    },
    /// Releases a critical section's lock on one entity.
    UnlockEntity {
        /// The action's sequence number.
        id: i32,
        /// The critical section that holds the lock.
        critical_section_id: String,
        /// The entity to unlock, by instance id.
        target: String,
        /// The orchestration that owns the critical section.
        parent_instance_id: String,
    },
}

impl Action {
    /// The sequence number of this action.
    pub fn id(&self) -> i32 {
        match self {
            Action::ScheduleTask { id, .. }
            | Action::CreateTimer { id, .. }
            | Action::CreateSubOrchestration { id, .. }
            | Action::SendEvent { id, .. }
            | Action::SignalEntity { id, .. }
            | Action::CallEntity { id, .. }
            | Action::LockEntities { id, .. }
            | Action::UnlockEntity { id, .. } => *id,
        }
    }

    /// The history event that records this action. `trace` is the context the action's
    /// spans hang under (the orchestration execution's span, see
    /// [`crate::trace::orchestration_trace`]); it is kept on the events that start
    /// work elsewhere: activities, sub-orchestrations and entity operations.
    pub fn to_history_event(&self, now: Timestamp, trace: Option<&TraceContext>) -> HistoryEvent {
        let trace = trace.cloned();
        let kind = match self {
            Action::ScheduleTask { name, input, .. } => {
                EventKind::TaskScheduled { name: name.clone(), input: input.clone(), tags: Default::default(), trace }
            }
            Action::CreateTimer { fire_at, .. } => EventKind::TimerCreated { fire_at: *fire_at },
            Action::CreateSubOrchestration { name, instance_id, input, .. } => {
                EventKind::SubOrchestrationInstanceCreated {
                    name: name.clone(),
                    instance_id: instance_id.clone(),
                    input: input.clone(),
                    trace,
                }
            }
            Action::SendEvent { instance_id, name, input, .. } => {
                EventKind::EventSent { instance_id: instance_id.clone(), name: name.clone(), input: input.clone() }
            }
            Action::SignalEntity { request_id, target, operation, input, scheduled_time, .. } => {
                EventKind::EntityOperationSignaled {
                    request_id: request_id.clone(),
                    operation: operation.clone(),
                    input: input.clone(),
                    scheduled_time: *scheduled_time,
                    target_instance_id: target.clone(),
                    trace,
                }
            }
            Action::CallEntity {
                request_id,
                target,
                operation,
                input,
                parent_instance_id,
                parent_execution_id,
                ..
            } => EventKind::EntityOperationCalled {
                request_id: request_id.clone(),
                operation: operation.clone(),
                input: input.clone(),
                parent_instance_id: parent_instance_id.clone(),
                parent_execution_id: parent_execution_id.clone(),
                target_instance_id: target.clone(),
                trace,
            },
            Action::LockEntities { critical_section_id, lock_set, parent_instance_id, .. } => {
                EventKind::EntityLockRequested {
                    critical_section_id: critical_section_id.clone(),
                    lock_set: lock_set.clone(),
                    position: 0,
                    parent_instance_id: parent_instance_id.clone(),
                }
            }
            Action::UnlockEntity { critical_section_id, target, parent_instance_id, .. } => {
                EventKind::EntityUnlockSent {
                    critical_section_id: critical_section_id.clone(),
                    parent_instance_id: parent_instance_id.clone(),
                    target_instance_id: target.clone(),
                }
            }
        };
        HistoryEvent::with_id(self.id(), now, kind)
    }

    /// A short description for error messages: `TaskScheduled "Name"`.
    pub fn describe(&self) -> String {
        match self {
            Action::ScheduleTask { name, .. } => format!("TaskScheduled \"{name}\""),
            Action::CreateTimer { .. } => "TimerCreated".to_string(),
            Action::CreateSubOrchestration { name, .. } => {
                format!("SubOrchestrationInstanceCreated \"{name}\"")
            }
            Action::SendEvent { name, .. } => format!("EventSent \"{name}\""),
            Action::SignalEntity { target, operation, .. } => {
                format!("EntityOperationSignaled \"{operation}\" on {target}")
            }
            Action::CallEntity { target, operation, .. } => {
                format!("EntityOperationCalled \"{operation}\" on {target}")
            }
            Action::LockEntities { lock_set, .. } => format!("EntityLockRequested on {}", lock_set.join(", ")),
            Action::UnlockEntity { target, .. } => format!("EntityUnlockSent to {target}"),
        }
    }
}

/// How an execution ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Completion {
    /// The orchestrator returned its output.
    Completed {
        /// The output, JSON text.
        output: Option<String>,
    },
    /// The orchestrator failed (an error it returned, a panic, non-determinism, a
    /// broken limit).
    Failed {
        /// What went wrong; it becomes the instance's failure details.
        failure: FailureDetails,
    },
    /// A client terminated the instance.
    Terminated {
        /// The termination's output, JSON text; it becomes the instance's output.
        reason: Option<String>,
    },
    /// A new execution of the same instance starts with `input`; `carryover_events`
    /// (external events not consumed yet, when asked to preserve them) are delivered to it.
    /// `version` moves the instance to another orchestration version (`None`: keeps it).
    ContinuedAsNew {
        /// The new execution's input, JSON text.
        input: Option<String>,
        /// `EventRaised` events for the new execution, in arrival order.
        carryover_events: Vec<HistoryEvent>,
        /// The orchestration version the new execution runs; `None` keeps the current one.
        version: Option<String>,
    },
}

impl Completion {
    /// The runtime status the instance takes.
    pub fn status(&self) -> RuntimeStatus {
        match self {
            Completion::Completed { .. } => RuntimeStatus::Completed,
            Completion::Failed { .. } => RuntimeStatus::Failed,
            Completion::Terminated { .. } => RuntimeStatus::Terminated,
            Completion::ContinuedAsNew { .. } => RuntimeStatus::ContinuedAsNew,
        }
    }

    /// The history event that closes the execution.
    pub fn to_history_event(&self, now: Timestamp) -> HistoryEvent {
        let kind = match self {
            Completion::Completed { output } => EventKind::ExecutionCompleted {
                status: RuntimeStatus::Completed,
                result: output.clone(),
                failure: None,
            },
            Completion::Failed { failure } => EventKind::ExecutionCompleted {
                status: RuntimeStatus::Failed,
                result: None,
                failure: Some(failure.clone()),
            },
            Completion::Terminated { reason } => EventKind::ExecutionCompleted {
                status: RuntimeStatus::Terminated,
                result: reason.clone(),
                failure: None,
            },
            Completion::ContinuedAsNew { input, .. } => EventKind::ContinueAsNew { input: input.clone() },
        };
        HistoryEvent::new(now, kind)
    }
}
