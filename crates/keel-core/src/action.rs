//! What an episode decides: the actions an orchestrator took that history does not
//! hold yet, and how an execution ended.
//!
//! The runtime (or the gRPC front end, for remote workers) executes actions; each one
//! becomes one history event whose `event_id` is the action's sequence number.

use crate::history::{EventKind, FailureDetails, HistoryEvent, RuntimeStatus, Timestamp};

/// A decision of the orchestrator that has side effects outside it.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    ScheduleTask {
        id: i32,
        name: String,
        input: Option<String>,
    },
    CreateTimer {
        id: i32,
        fire_at: Timestamp,
    },
    CreateSubOrchestration {
        id: i32,
        name: String,
        instance_id: String,
        input: Option<String>,
    },
    SendEvent {
        id: i32,
        instance_id: String,
        name: String,
        input: Option<String>,
    },
    /// A one-way operation on the entity with instance id `target`, delivered at
    /// `scheduled_time` (or at once).
    SignalEntity {
        id: i32,
        request_id: String,
        target: String,
        operation: String,
        input: Option<String>,
        scheduled_time: Option<Timestamp>,
    },
    /// A two-way operation: the entity answers the caller (`parent_instance_id`,
    /// `parent_execution_id`) under `request_id`.
    CallEntity {
        id: i32,
        request_id: String,
        target: String,
        operation: String,
        input: Option<String>,
        parent_instance_id: String,
        parent_execution_id: String,
    },
    /// Locks `lock_set` (sorted, distinct entity instance ids) for a critical section.
    LockEntities {
        id: i32,
        critical_section_id: String,
        lock_set: Vec<String>,
        parent_instance_id: String,
    },
    /// Releases a critical section's lock on one entity.
    UnlockEntity {
        id: i32,
        critical_section_id: String,
        target: String,
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

    /// The history event that records this action.
    pub fn to_history_event(&self, now: Timestamp) -> HistoryEvent {
        let kind = match self {
            Action::ScheduleTask { name, input, .. } => {
                EventKind::TaskScheduled { name: name.clone(), input: input.clone() }
            }
            Action::CreateTimer { fire_at, .. } => EventKind::TimerCreated { fire_at: *fire_at },
            Action::CreateSubOrchestration { name, instance_id, input, .. } => {
                EventKind::SubOrchestrationInstanceCreated {
                    name: name.clone(),
                    instance_id: instance_id.clone(),
                    input: input.clone(),
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
    Completed {
        output: Option<String>,
    },
    Failed {
        failure: FailureDetails,
    },
    Terminated {
        reason: Option<String>,
    },
    /// A new execution of the same instance starts with `input`; `carryover_events`
    /// (external events not consumed yet, when asked to preserve them) are delivered to it.
    ContinuedAsNew {
        input: Option<String>,
        carryover_events: Vec<HistoryEvent>,
    },
}

impl Completion {
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
