//! The history model: the events an instance's history is made of, and the
//! runtime status of an instance.
//!
//! Event types and their fields follow the Durable Task Framework, so that the
//! Durable Functions HTTP API and the Durable Task gRPC protocol map onto them
//! one to one. Payloads (inputs, outputs, event data) are kept as opaque JSON
//! text: the engine never parses what user code serialized.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A point in time as history records it (UTC, millisecond precision is what stores keep).
pub type Timestamp = DateTime<Utc>;

/// One entry of an instance's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryEvent {
    /// For events born from an orchestrator action (`TaskScheduled`, `TimerCreated`,
    /// `SubOrchestrationInstanceCreated`, `EventSent`) the action's sequence number;
    /// `-1` for every other event.
    pub event_id: i32,
    /// When the event was recorded.
    pub timestamp: Timestamp,
    /// What happened, with the fields of that kind of event.
    pub kind: EventKind,
}

impl HistoryEvent {
    /// An event that no orchestrator action produced (`event_id` = -1).
    pub fn new(timestamp: Timestamp, kind: EventKind) -> HistoryEvent {
        HistoryEvent { event_id: -1, timestamp, kind }
    }

    /// An event born from the orchestrator action with sequence number `event_id`.
    pub fn with_id(event_id: i32, timestamp: Timestamp, kind: EventKind) -> HistoryEvent {
        HistoryEvent { event_id, timestamp, kind }
    }
}

/// The parent of a sub-orchestration, recorded in its `ExecutionStarted` event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentInstance {
    /// The parent's instance id: where the result goes.
    pub instance_id: String,
    /// The parent's execution that started this one; a result for an execution that
    /// has ended is dropped.
    pub execution_id: String,
    /// The parent's orchestrator name.
    pub name: String,
    /// The parent's sequence number for the `SubOrchestrationInstanceCreated` action:
    /// the result is reported back under this id.
    pub task_scheduled_id: i32,
}

/// What went wrong in an activity, a sub-orchestration or an orchestration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureDetails {
    /// What kind of failure it is, for callers to match on: a Rust type path
    /// (`std::io::error::Error`), a name of Keel's (`TimeoutError`, `Panic`) or an
    /// SDK's exception type.
    pub error_type: String,
    /// What went wrong, for people to read.
    pub error_message: String,
    /// Where it went wrong, when the failing code reported it (SDK workers do).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack_trace: Option<String>,
    /// The failure that caused this one, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inner_failure: Option<Box<FailureDetails>>,
    /// When true, retry policies give up at once.
    #[serde(default)]
    pub is_non_retriable: bool,
    /// Structured facts about the failure (the protocol's `properties`); a typed failure
    /// keeps its value here (see [`crate::failure::Failure`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, serde_json::Value>,
}

impl FailureDetails {
    /// Details with this error type and message and nothing else: no stack trace, no
    /// inner failure, retriable, no properties.
    pub fn new(error_type: impl Into<String>, error_message: impl Into<String>) -> FailureDetails {
        FailureDetails {
            error_type: error_type.into(),
            error_message: error_message.into(),
            stack_trace: None,
            inner_failure: None,
            is_non_retriable: false,
            properties: BTreeMap::new(),
        }
    }
}

impl std::fmt::Display for FailureDetails {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error_type, self.error_message)
    }
}

/// Decodes a payload (JSON text) into `T`. Compatibility rule: when that fails and the
/// payload is a JSON string whose text is itself JSON, that inner text is decoded
/// instead — the Durable Functions Python client encodes inputs and event data twice
/// (`"{\"a\":1}"`), and a typed Rust orchestrator should read them as it would from any
/// other client. A payload that decodes into `T` as it is is never unwrapped.
pub fn decode_payload<T: serde::de::DeserializeOwned>(payload: &str) -> serde_json::Result<T> {
    serde_json::from_str(payload).or_else(|error| match serde_json::from_str::<String>(payload) {
        Ok(inner) => serde_json::from_str(&inner).map_err(|_| error),
        Err(_) => Err(error),
    })
}

/// The kinds of history events, with their fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum EventKind {
    /// First event of an execution (preceded only by its episode's `OrchestratorStarted`).
    ExecutionStarted {
        /// The orchestrator to run, as registered.
        name: String,
        /// The orchestration version the execution runs; `None` when unversioned.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
        /// The orchestrator's input, JSON text.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        input: Option<String>,
        /// The execution this event starts.
        execution_id: String,
        /// The parent orchestration, when this is a sub-orchestration.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent: Option<ParentInstance>,
        /// The execution does not start before this time.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scheduled_start: Option<Timestamp>,
        /// The trace context the execution's span hangs under (the starting request's, or the parent orchestration's) (W3C `traceparent`), when there is one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trace: Option<crate::trace::TraceContext>,
    },
    /// Last event of an execution that completed, failed or was terminated.
    ExecutionCompleted {
        /// `Completed`, `Failed` or `Terminated`.
        status: RuntimeStatus,
        /// The output, JSON text: the orchestrator's (`Completed`) or the
        /// termination's (`Terminated`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<String>,
        /// What went wrong; set when `status` is `Failed`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        failure: Option<FailureDetails>,
    },
    /// A client's request to terminate the instance; the execution then ends with
    /// `ExecutionCompleted` (status `Terminated`) without running orchestrator code.
    ExecutionTerminated {
        /// The termination's output, JSON text (a text reason is a JSON string); it
        /// becomes the instance's output unchanged.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// The orchestrator scheduled an activity ([`crate::Action::ScheduleTask`]).
    TaskScheduled {
        /// The activity, as registered.
        name: String,
        /// The activity's input, JSON text.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        input: Option<String>,
        /// Tags an SDK orchestration gave the task (the protocol's `ScheduleTask.tags`).
        #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        tags: std::collections::BTreeMap<String, String>,
        /// The trace context the activity's spans hang under (W3C `traceparent`), when there is one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trace: Option<crate::trace::TraceContext>,
    },
    /// An activity returned.
    TaskCompleted {
        /// The `event_id` of the activity's `TaskScheduled`.
        task_scheduled_id: i32,
        /// The activity's output, JSON text.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<String>,
    },
    /// An activity failed: it returned an error, panicked, or could not run.
    TaskFailed {
        /// The `event_id` of the activity's `TaskScheduled`.
        task_scheduled_id: i32,
        /// What went wrong.
        failure: FailureDetails,
    },
    /// The orchestrator started a sub-orchestration
    /// ([`crate::Action::CreateSubOrchestration`]).
    SubOrchestrationInstanceCreated {
        /// The child orchestration, as registered.
        name: String,
        /// The child's instance id.
        instance_id: String,
        /// The child's input, JSON text.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        input: Option<String>,
        /// The trace context the child's span hangs under (W3C `traceparent`), when there is one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trace: Option<crate::trace::TraceContext>,
    },
    /// A sub-orchestration completed.
    SubOrchestrationInstanceCompleted {
        /// The `event_id` of its `SubOrchestrationInstanceCreated`.
        task_scheduled_id: i32,
        /// The child's output, JSON text.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<String>,
    },
    /// A sub-orchestration failed, was terminated, or could not be created.
    SubOrchestrationInstanceFailed {
        /// The `event_id` of its `SubOrchestrationInstanceCreated`.
        task_scheduled_id: i32,
        /// What went wrong.
        failure: FailureDetails,
    },
    /// The orchestrator created a durable timer ([`crate::Action::CreateTimer`]).
    TimerCreated {
        /// When the timer fires.
        fire_at: Timestamp,
    },
    /// A timer fired.
    TimerFired {
        /// The `event_id` of the timer's `TimerCreated`.
        timer_id: i32,
        /// The time the timer was set for.
        fire_at: Timestamp,
    },
    /// Start of an episode; its timestamp is the orchestrator's current time.
    OrchestratorStarted,
    /// The orchestrator raised an event on another instance
    /// ([`crate::Action::SendEvent`]).
    EventSent {
        /// The instance that receives the event.
        instance_id: String,
        /// The event's name.
        name: String,
        /// The event's data, JSON text.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        input: Option<String>,
    },
    /// An external event arrived (from a client or another instance).
    EventRaised {
        /// The event's name as the sender gave it; waits match it case-insensitively.
        name: String,
        /// The event's data, JSON text.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        input: Option<String>,
    },
    /// The execution ended by continuing as new; the next execution starts with `input`.
    ContinueAsNew {
        /// The next execution's input, JSON text.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        input: Option<String>,
    },
    /// A client suspended the instance: its other messages wait until it is resumed.
    ExecutionSuspended {
        /// Why, as the client gave it (plain text).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A client resumed a suspended instance.
    ExecutionResumed {
        /// Why, as the client gave it (plain text).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A failed instance was rewound: its failed tasks are run again.
    ExecutionRewound {
        /// Why, as the client gave it (plain text).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A one-way operation on an entity: in the sender's history (an orchestration's
    /// decision) and as a message in the entity's inbox.
    EntityOperationSignaled {
        /// A GUID that identifies the request.
        request_id: String,
        /// The operation the entity runs.
        operation: String,
        /// The operation's input, JSON text.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        input: Option<String>,
        /// When the entity receives the signal; `None` for at once.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scheduled_time: Option<Timestamp>,
        /// The entity's instance id, `@{name}@{key}`.
        target_instance_id: String,
        /// The trace context the operation's span hangs under (W3C `traceparent`), when there is one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trace: Option<crate::trace::TraceContext>,
    },
    /// A two-way operation on an entity from an orchestration, which waits for the
    /// `EntityOperationCompleted` or `EntityOperationFailed` with the same request id.
    EntityOperationCalled {
        /// A GUID that identifies the request; the answer carries it back.
        request_id: String,
        /// The operation the entity runs.
        operation: String,
        /// The operation's input, JSON text.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        input: Option<String>,
        /// The calling orchestration's instance id: where the answer goes.
        parent_instance_id: String,
        /// The calling execution; an answer for an execution that has ended is dropped.
        parent_execution_id: String,
        /// The entity's instance id, `@{name}@{key}`.
        target_instance_id: String,
        /// The trace context the operation's span hangs under (W3C `traceparent`), when there is one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trace: Option<crate::trace::TraceContext>,
    },
    /// An entity's answer to a call: the operation returned.
    EntityOperationCompleted {
        /// The request id of the `EntityOperationCalled` it answers.
        request_id: String,
        /// The operation's result, JSON text.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<String>,
    },
    /// An entity's answer to a call: the operation failed (an error or a panic).
    EntityOperationFailed {
        /// The request id of the `EntityOperationCalled` it answers.
        request_id: String,
        /// What went wrong.
        failure: FailureDetails,
    },
    /// A request to lock `lock_set` (sorted entity instance ids) for a critical section.
    /// It travels from entity to entity: each locks itself and passes it on to the one
    /// at `position + 1`; the last one grants the lock to the orchestration.
    EntityLockRequested {
        /// A GUID that identifies the critical section.
        critical_section_id: String,
        /// The entities to lock: sorted, distinct instance ids.
        lock_set: Vec<String>,
        /// The index in `lock_set` of the entity this message is for (0 for the first).
        position: i32,
        /// The orchestration that owns the critical section; the grant goes to it.
        parent_instance_id: String,
    },
    /// Every entity of the critical section is locked. `lock_set` lets an owner that
    /// no longer waits for the lock (it ended meanwhile) release it at once.
    EntityLockGranted {
        /// The critical section now holding every lock.
        critical_section_id: String,
        /// The locked entities' instance ids; empty when the grant came over the gRPC
        /// protocol, whose grant does not carry them.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        lock_set: Vec<String>,
    },
    /// Releases the lock a critical section holds on one entity.
    EntityUnlockSent {
        /// The critical section that held the lock.
        critical_section_id: String,
        /// The orchestration that owns the critical section.
        parent_instance_id: String,
        /// The entity to unlock, by instance id.
        target_instance_id: String,
    },
}

impl EventKind {
    /// The DTFx name of this event type (`"TaskScheduled"`, …).
    pub fn type_name(&self) -> &'static str {
        match self {
            EventKind::ExecutionStarted { .. } => "ExecutionStarted",
            EventKind::ExecutionCompleted { .. } => "ExecutionCompleted",
            EventKind::ExecutionTerminated { .. } => "ExecutionTerminated",
            EventKind::TaskScheduled { .. } => "TaskScheduled",
            EventKind::TaskCompleted { .. } => "TaskCompleted",
            EventKind::TaskFailed { .. } => "TaskFailed",
            EventKind::SubOrchestrationInstanceCreated { .. } => "SubOrchestrationInstanceCreated",
            EventKind::SubOrchestrationInstanceCompleted { .. } => "SubOrchestrationInstanceCompleted",
            EventKind::SubOrchestrationInstanceFailed { .. } => "SubOrchestrationInstanceFailed",
            EventKind::TimerCreated { .. } => "TimerCreated",
            EventKind::TimerFired { .. } => "TimerFired",
            EventKind::OrchestratorStarted => "OrchestratorStarted",
            EventKind::EventSent { .. } => "EventSent",
            EventKind::EventRaised { .. } => "EventRaised",
            EventKind::ContinueAsNew { .. } => "ContinueAsNew",
            EventKind::ExecutionSuspended { .. } => "ExecutionSuspended",
            EventKind::ExecutionResumed { .. } => "ExecutionResumed",
            EventKind::ExecutionRewound { .. } => "ExecutionRewound",
            EventKind::EntityOperationSignaled { .. } => "EntityOperationSignaled",
            EventKind::EntityOperationCalled { .. } => "EntityOperationCalled",
            EventKind::EntityOperationCompleted { .. } => "EntityOperationCompleted",
            EventKind::EntityOperationFailed { .. } => "EntityOperationFailed",
            EventKind::EntityLockRequested { .. } => "EntityLockRequested",
            EventKind::EntityLockGranted { .. } => "EntityLockGranted",
            EventKind::EntityUnlockSent { .. } => "EntityUnlockSent",
        }
    }

    /// The user payload the event carries (input, result or reason): the part that
    /// [`crate::limits::check_payload`] limits.
    pub fn payload(&self) -> Option<&str> {
        match self {
            EventKind::ExecutionStarted { input, .. }
            | EventKind::TaskScheduled { input, .. }
            | EventKind::SubOrchestrationInstanceCreated { input, .. }
            | EventKind::EventSent { input, .. }
            | EventKind::EventRaised { input, .. }
            | EventKind::ContinueAsNew { input }
            | EventKind::EntityOperationSignaled { input, .. }
            | EventKind::EntityOperationCalled { input, .. } => input.as_deref(),
            EventKind::EntityOperationCompleted { output, .. } => output.as_deref(),
            EventKind::ExecutionCompleted { result, .. }
            | EventKind::TaskCompleted { result, .. }
            | EventKind::SubOrchestrationInstanceCompleted { result, .. } => result.as_deref(),
            EventKind::ExecutionTerminated { reason }
            | EventKind::ExecutionSuspended { reason }
            | EventKind::ExecutionResumed { reason }
            | EventKind::ExecutionRewound { reason } => reason.as_deref(),
            EventKind::TaskFailed { .. }
            | EventKind::SubOrchestrationInstanceFailed { .. }
            | EventKind::TimerCreated { .. }
            | EventKind::TimerFired { .. }
            | EventKind::OrchestratorStarted
            | EventKind::EntityOperationFailed { .. }
            | EventKind::EntityLockRequested { .. }
            | EventKind::EntityLockGranted { .. }
            | EventKind::EntityUnlockSent { .. } => None,
        }
    }

    /// True for the events that record a decision of the orchestrator (an action it took).
    pub fn is_decision(&self) -> bool {
        matches!(
            self,
            EventKind::TaskScheduled { .. }
                | EventKind::TimerCreated { .. }
                | EventKind::SubOrchestrationInstanceCreated { .. }
                | EventKind::EventSent { .. }
                | EventKind::EntityOperationSignaled { .. }
                | EventKind::EntityOperationCalled { .. }
                | EventKind::EntityLockRequested { .. }
                | EventKind::EntityUnlockSent { .. }
        )
    }
}

/// The runtime status of an instance (numbers as in DTFx and the gRPC protocol, where
/// they are not the same the names are).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RuntimeStatus {
    /// Started and not finished: running or waiting for messages.
    Running,
    /// The orchestrator returned its output.
    Completed,
    /// The execution ended by continuing as new. Not seen in practice: the new execution
    /// starts (`Running`) in the same commit.
    ContinuedAsNew,
    /// The orchestration ended with a failure; its failure details say why.
    Failed,
    /// A DTFx status Keel never sets; kept so that every protocol number maps.
    Canceled,
    /// A client terminated the instance.
    Terminated,
    /// Created and not started yet: its start waits for its scheduled time or for a
    /// worker that hosts it. A rewound instance is `Pending` until the rewind runs.
    Pending,
    /// A client suspended the instance; it processes no messages until resumed.
    Suspended,
}

impl RuntimeStatus {
    /// Every status, in the order of their numbers ([`RuntimeStatus::code`]).
    pub const ALL: [RuntimeStatus; 8] = [
        RuntimeStatus::Running,
        RuntimeStatus::Completed,
        RuntimeStatus::ContinuedAsNew,
        RuntimeStatus::Failed,
        RuntimeStatus::Canceled,
        RuntimeStatus::Terminated,
        RuntimeStatus::Pending,
        RuntimeStatus::Suspended,
    ];

    /// Completed, Failed, Terminated and Canceled: the instance will not run again unless
    /// it is restarted, rewound or replaced.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RuntimeStatus::Completed | RuntimeStatus::Failed | RuntimeStatus::Terminated | RuntimeStatus::Canceled
        )
    }

    /// The status's name as DTFx and the HTTP API spell it (`"Running"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeStatus::Running => "Running",
            RuntimeStatus::Completed => "Completed",
            RuntimeStatus::ContinuedAsNew => "ContinuedAsNew",
            RuntimeStatus::Failed => "Failed",
            RuntimeStatus::Canceled => "Canceled",
            RuntimeStatus::Terminated => "Terminated",
            RuntimeStatus::Pending => "Pending",
            RuntimeStatus::Suspended => "Suspended",
        }
    }

    /// The DTFx / gRPC number of this status.
    pub fn code(self) -> i32 {
        match self {
            RuntimeStatus::Running => 0,
            RuntimeStatus::Completed => 1,
            RuntimeStatus::ContinuedAsNew => 2,
            RuntimeStatus::Failed => 3,
            RuntimeStatus::Canceled => 4,
            RuntimeStatus::Terminated => 5,
            RuntimeStatus::Pending => 6,
            RuntimeStatus::Suspended => 7,
        }
    }

    /// The status with this DTFx / gRPC number; `None` for a number no status has.
    pub fn from_code(code: i32) -> Option<RuntimeStatus> {
        RuntimeStatus::ALL.into_iter().find(|s| s.code() == code)
    }
}

impl std::fmt::Display for RuntimeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RuntimeStatus {
    type Err = String;
    /// Parses a status name case-insensitively (`"running"`, `"Completed"`, …).
    fn from_str(s: &str) -> Result<RuntimeStatus, String> {
        RuntimeStatus::ALL
            .into_iter()
            .find(|status| status.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("unknown runtime status '{s}'"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_encoded_twice_are_read_like_any_other() {
        #[derive(Debug, PartialEq, Deserialize)]
        struct Order {
            id: u32,
        }
        assert_eq!(decode_payload::<Order>(r#"{"id":1}"#).unwrap(), Order { id: 1 });
        assert_eq!(decode_payload::<Order>(r#""{\"id\":2}""#).unwrap(), Order { id: 2 }, "JSON in a JSON string");
        assert!(decode_payload::<bool>(r#""true""#).unwrap());
        assert_eq!(decode_payload::<String>(r#""{\"id\":2}""#).unwrap(), r#"{"id":2}"#, "a string stays a string");
        assert!(decode_payload::<Order>(r#""not json""#).is_err());
    }

    #[test]
    fn status_codes_round_trip_and_match_dtfx() {
        for status in RuntimeStatus::ALL {
            assert_eq!(RuntimeStatus::from_code(status.code()), Some(status));
            assert_eq!(status.as_str().parse::<RuntimeStatus>(), Ok(status));
        }
        assert_eq!(RuntimeStatus::Running.code(), 0);
        assert_eq!(RuntimeStatus::Pending.code(), 6);
        assert!("nonsense".parse::<RuntimeStatus>().is_err());
    }

    #[test]
    fn payloads_are_the_user_data_an_event_carries() {
        let raised = EventKind::EventRaised { name: "Approve".into(), input: Some("true".into()) };
        assert_eq!(raised.payload(), Some("true"));
        let completed = EventKind::TaskCompleted { task_scheduled_id: 1, result: Some("\"ok\"".into()) };
        assert_eq!(completed.payload(), Some("\"ok\""));
        let terminated = EventKind::ExecutionTerminated { reason: Some("stop".into()) };
        assert_eq!(terminated.payload(), Some("stop"));
        assert_eq!(EventKind::OrchestratorStarted.payload(), None);
    }

    #[test]
    fn events_serialize_with_their_type_name() {
        let event = HistoryEvent::with_id(
            3,
            DateTime::from_timestamp_millis(0).unwrap(),
            EventKind::TaskScheduled {
                trace: None,
                name: "Say".into(),
                input: Some("\"x\"".into()),
                tags: Default::default(),
            },
        );
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["kind"]["type"], "TaskScheduled");
        let back: HistoryEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, event);
        assert_eq!(event.kind.type_name(), "TaskScheduled");
    }
}
