//! What an episode decides: the actions an orchestrator took that history does not
//! hold yet, and how an execution ended.
//!
//! The runtime (or the gRPC front end, for remote workers) executes actions; each one
//! becomes one history event whose `event_id` is the action's sequence number.

use crate::history::{EventKind, FailureDetails, HistoryEvent, RuntimeStatus, Timestamp};

/// A decision of the orchestrator that has side effects outside it.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    ScheduleTask { id: i32, name: String, input: Option<String> },
    CreateTimer { id: i32, fire_at: Timestamp },
    CreateSubOrchestration { id: i32, name: String, instance_id: String, input: Option<String> },
    SendEvent { id: i32, instance_id: String, name: String, input: Option<String> },
}

impl Action {
    /// The sequence number of this action.
    pub fn id(&self) -> i32 {
        match self {
            Action::ScheduleTask { id, .. }
            | Action::CreateTimer { id, .. }
            | Action::CreateSubOrchestration { id, .. }
            | Action::SendEvent { id, .. } => *id,
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
