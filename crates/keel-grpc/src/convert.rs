//! Between Keel's model and the protocol's messages: history events, failure details,
//! timestamps, statuses, instance states, work items, a worker's orchestrator response
//! turned into a [`RemoteOutcome`] and its entity batch result into a [`BatchOutcome`].
//!
//! The two history models map one to one: event ids (the action sequence numbers) and
//! timestamps pass through unchanged, so what the worker replays is exactly what Keel
//! stored. Payloads are opaque JSON text on both sides. Two translations are not one to
//! one and are made here only: a termination reason stored as plain text by an older
//! Keel is a JSON string on the wire ([`reason_to_wire`]), an empty payload
//! string on the wire means "no payload", and Keel's `EntityLockGranted` carries the
//! lock set, which the wire's does not.

use chrono::DateTime;
use keel::entity::{BatchOutcome, EntityAction};
use keel::entity_episode::EntityEpisode;
use keel::episode::{RemoteEpisode, RemoteOutcome};
use keel::{
    EntityId, EntityMetadata, EventKind, FailureDetails, HistoryEvent, InstanceStatus, RuntimeStatus, Timestamp,
};
use keel_core::history::ParentInstance;
use keel_core::trace::TraceContext;
use keel_core::{limits, Action, Completion};
use keel_store::ActivityItem;

use crate::error::{Error, Result};
use crate::proto;
use crate::proto::history_event::EventType;
use crate::proto::operation_action::OperationActionType;
use crate::proto::operation_result::ResultType;
use crate::proto::orchestrator_action::OrchestratorActionType;
use crate::proto::send_entity_message_action::EntityMessageType;

/// Error type of an orchestration that used a feature this server does not offer yet.
pub const UNSUPPORTED_ERROR_TYPE: &str = "NotSupported";

pub fn timestamp_to_proto(at: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: at.timestamp(), nanos: at.timestamp_subsec_nanos() as i32 }
}

pub fn timestamp_from_proto(at: &prost_types::Timestamp, what: &str) -> Result<Timestamp> {
    u32::try_from(at.nanos)
        .ok()
        .and_then(|nanos| DateTime::from_timestamp(at.seconds, nanos))
        .ok_or_else(|| Error::InvalidArgument(format!("{what} is not a valid timestamp")))
}

fn optional_timestamp(at: Option<&prost_types::Timestamp>, what: &str) -> Result<Option<Timestamp>> {
    at.map(|at| timestamp_from_proto(at, what)).transpose()
}

/// A payload from the wire: an empty string is no payload (it is never valid JSON).
pub fn payload(value: Option<String>) -> Option<String> {
    value.filter(|text| !text.is_empty())
}

/// A termination output as the JSON value the SDKs expect: Keel keeps it as JSON; a
/// plain-text reason an older Keel stored becomes a JSON string.
pub fn reason_to_wire(reason: Option<&str>) -> Option<String> {
    reason.map(|reason| match serde_json::from_str::<serde_json::Value>(reason) {
        Ok(_) => reason.to_string(),
        Err(_) => serde_json::to_string(reason).expect("a string always serializes"),
    })
}

/// A termination output from a worker, kept as the JSON value it is (text that is not
/// JSON becomes a JSON string).
pub fn reason_from_wire(output: Option<String>) -> Option<String> {
    reason_to_wire(payload(output).as_deref())
}

pub fn status_to_proto(status: RuntimeStatus) -> i32 {
    status.code()
}

pub fn status_from_proto(code: i32) -> Result<RuntimeStatus> {
    RuntimeStatus::from_code(code).ok_or_else(|| Error::InvalidArgument(format!("unknown orchestration status {code}")))
}

pub fn failure_to_proto(failure: &FailureDetails) -> proto::TaskFailureDetails {
    proto::TaskFailureDetails {
        error_type: failure.error_type.clone(),
        error_message: failure.error_message.clone(),
        stack_trace: failure.stack_trace.clone(),
        inner_failure: failure.inner_failure.as_deref().map(|inner| Box::new(failure_to_proto(inner))),
        is_non_retriable: failure.is_non_retriable,
        properties: failure.properties.iter().map(|(key, value)| (key.clone(), json_to_proto(value))).collect(),
    }
}

/// A JSON value as a `google.protobuf.Value`.
fn json_to_proto(value: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(flag) => Kind::BoolValue(*flag),
        serde_json::Value::Number(number) => Kind::NumberValue(number.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(text) => Kind::StringValue(text.clone()),
        serde_json::Value::Array(items) => {
            Kind::ListValue(prost_types::ListValue { values: items.iter().map(json_to_proto).collect() })
        }
        serde_json::Value::Object(fields) => Kind::StructValue(prost_types::Struct {
            fields: fields.iter().map(|(key, value)| (key.clone(), json_to_proto(value))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A `google.protobuf.Value` as JSON (a number that JSON cannot hold becomes null).
fn json_from_proto(value: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match &value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(flag)) => serde_json::Value::Bool(*flag),
        // Protobuf numbers are doubles: whole ones come back as the integers they were.
        Some(Kind::NumberValue(number)) if number.fract() == 0.0 && number.abs() < 9_007_199_254_740_992.0 => {
            serde_json::Value::from(*number as i64)
        }
        Some(Kind::NumberValue(number)) => {
            serde_json::Number::from_f64(*number).map_or(serde_json::Value::Null, serde_json::Value::Number)
        }
        Some(Kind::StringValue(text)) => serde_json::Value::String(text.clone()),
        Some(Kind::ListValue(list)) => serde_json::Value::Array(list.values.iter().map(json_from_proto).collect()),
        Some(Kind::StructValue(fields)) => serde_json::Value::Object(
            fields.fields.iter().map(|(key, value)| (key.clone(), json_from_proto(value))).collect(),
        ),
    }
}

pub fn failure_from_proto(failure: &proto::TaskFailureDetails) -> FailureDetails {
    FailureDetails {
        error_type: failure.error_type.clone(),
        error_message: failure.error_message.clone(),
        stack_trace: failure.stack_trace.clone(),
        inner_failure: failure.inner_failure.as_deref().map(|inner| Box::new(failure_from_proto(inner))),
        is_non_retriable: failure.is_non_retriable,
        properties: failure.properties.iter().map(|(key, value)| (key.clone(), json_from_proto(value))).collect(),
    }
}

fn instance_ref(instance_id: &str, execution_id: Option<&str>) -> proto::OrchestrationInstance {
    proto::OrchestrationInstance {
        instance_id: instance_id.to_string(),
        execution_id: execution_id.map(str::to_string),
    }
}

/// A trace context as the protocol has it (the deprecated `spanID` is filled too, for
/// older SDKs).
#[allow(deprecated)] // the SDKs still read spanID alongside traceParent
pub fn trace_to_proto(trace: &TraceContext) -> proto::TraceContext {
    proto::TraceContext {
        trace_parent: trace.trace_parent.clone(),
        span_id: trace.span_id().to_string(),
        trace_state: trace.trace_state.clone(),
    }
}

/// A protocol trace context; `None` when it is missing or not valid W3C trace context
/// (ignored, as W3C says to ignore an invalid `traceparent`: tracing never fails work).
pub fn trace_from_proto(trace: &proto::TraceContext) -> Option<TraceContext> {
    TraceContext::parse(&trace.trace_parent, trace.trace_state.as_deref()).ok()
}

/// A history event as the protocol has it. `instance_id` is the instance the history
/// belongs to (the protocol's `ExecutionStarted` names it, Keel's does not).
pub fn event_to_proto(instance_id: &str, event: &HistoryEvent) -> proto::HistoryEvent {
    let kind = match &event.kind {
        EventKind::ExecutionStarted { name, version, input, execution_id, parent, scheduled_start, trace } => {
            EventType::ExecutionStarted(proto::ExecutionStartedEvent {
                name: name.clone(),
                version: version.clone(),
                input: input.clone(),
                orchestration_instance: Some(instance_ref(instance_id, Some(execution_id))),
                parent_instance: parent.as_ref().map(|parent| proto::ParentInstanceInfo {
                    task_scheduled_id: parent.task_scheduled_id,
                    name: Some(parent.name.clone()),
                    version: None,
                    orchestration_instance: Some(instance_ref(&parent.instance_id, Some(&parent.execution_id))),
                }),
                scheduled_start_timestamp: scheduled_start.map(timestamp_to_proto),
                parent_trace_context: trace.as_ref().map(trace_to_proto),
                orchestration_span_id: trace.as_ref().map(|_| keel_core::trace::orchestration_span_id(execution_id)),
                ..Default::default()
            })
        }
        EventKind::ExecutionCompleted { status, result, failure } => {
            EventType::ExecutionCompleted(proto::ExecutionCompletedEvent {
                orchestration_status: status_to_proto(*status),
                result: result.clone(),
                failure_details: failure.as_ref().map(failure_to_proto),
            })
        }
        EventKind::ExecutionTerminated { reason } => EventType::ExecutionTerminated(proto::ExecutionTerminatedEvent {
            input: reason_to_wire(reason.as_deref()),
            recurse: false,
        }),
        EventKind::TaskScheduled { name, input, tags, trace } => EventType::TaskScheduled(proto::TaskScheduledEvent {
            name: name.clone(),
            input: input.clone(),
            tags: tags.clone().into_iter().collect(),
            parent_trace_context: trace.as_ref().map(trace_to_proto),
            ..Default::default()
        }),
        EventKind::TaskCompleted { task_scheduled_id, result } => EventType::TaskCompleted(proto::TaskCompletedEvent {
            task_scheduled_id: *task_scheduled_id,
            result: result.clone(),
        }),
        EventKind::TaskFailed { task_scheduled_id, failure } => EventType::TaskFailed(proto::TaskFailedEvent {
            task_scheduled_id: *task_scheduled_id,
            failure_details: Some(failure_to_proto(failure)),
        }),
        EventKind::SubOrchestrationInstanceCreated { name, instance_id, input, trace } => {
            EventType::SubOrchestrationInstanceCreated(proto::SubOrchestrationInstanceCreatedEvent {
                instance_id: instance_id.clone(),
                name: name.clone(),
                input: input.clone(),
                parent_trace_context: trace.as_ref().map(trace_to_proto),
                ..Default::default()
            })
        }
        EventKind::SubOrchestrationInstanceCompleted { task_scheduled_id, result } => {
            EventType::SubOrchestrationInstanceCompleted(proto::SubOrchestrationInstanceCompletedEvent {
                task_scheduled_id: *task_scheduled_id,
                result: result.clone(),
            })
        }
        EventKind::SubOrchestrationInstanceFailed { task_scheduled_id, failure } => {
            EventType::SubOrchestrationInstanceFailed(proto::SubOrchestrationInstanceFailedEvent {
                task_scheduled_id: *task_scheduled_id,
                failure_details: Some(failure_to_proto(failure)),
            })
        }
        EventKind::TimerCreated { fire_at } => {
            EventType::TimerCreated(proto::TimerCreatedEvent { fire_at: Some(timestamp_to_proto(*fire_at)) })
        }
        EventKind::TimerFired { timer_id, fire_at } => EventType::TimerFired(proto::TimerFiredEvent {
            fire_at: Some(timestamp_to_proto(*fire_at)),
            timer_id: *timer_id,
        }),
        EventKind::OrchestratorStarted => EventType::OrchestratorStarted(proto::OrchestratorStartedEvent {}),
        EventKind::EventSent { instance_id, name, input } => EventType::EventSent(proto::EventSentEvent {
            instance_id: instance_id.clone(),
            name: name.clone(),
            input: input.clone(),
        }),
        EventKind::EventRaised { name, input } => {
            EventType::EventRaised(proto::EventRaisedEvent { name: name.clone(), input: input.clone() })
        }
        EventKind::ContinueAsNew { input } => {
            EventType::ContinueAsNew(proto::ContinueAsNewEvent { input: input.clone() })
        }
        EventKind::ExecutionSuspended { reason } => {
            EventType::ExecutionSuspended(proto::ExecutionSuspendedEvent { input: reason.clone() })
        }
        EventKind::ExecutionResumed { reason } => {
            EventType::ExecutionResumed(proto::ExecutionResumedEvent { input: reason.clone() })
        }
        EventKind::ExecutionRewound { reason } => {
            EventType::ExecutionRewound(proto::ExecutionRewoundEvent { reason: reason.clone(), ..Default::default() })
        }
        EventKind::EntityOperationSignaled {
            request_id, operation, input, scheduled_time, target_instance_id, ..
        } => EventType::EntityOperationSignaled(proto::EntityOperationSignaledEvent {
            request_id: request_id.clone(),
            operation: operation.clone(),
            scheduled_time: scheduled_time.map(timestamp_to_proto),
            input: input.clone(),
            target_instance_id: Some(target_instance_id.clone()),
        }),
        EventKind::EntityOperationCalled {
            request_id,
            operation,
            input,
            parent_instance_id,
            parent_execution_id,
            target_instance_id,
            ..
        } => EventType::EntityOperationCalled(proto::EntityOperationCalledEvent {
            request_id: request_id.clone(),
            operation: operation.clone(),
            scheduled_time: None,
            input: input.clone(),
            parent_instance_id: Some(parent_instance_id.clone()),
            parent_execution_id: (!parent_execution_id.is_empty()).then(|| parent_execution_id.clone()),
            target_instance_id: Some(target_instance_id.clone()),
        }),
        EventKind::EntityOperationCompleted { request_id, output } => {
            EventType::EntityOperationCompleted(proto::EntityOperationCompletedEvent {
                request_id: request_id.clone(),
                output: output.clone(),
            })
        }
        EventKind::EntityOperationFailed { request_id, failure } => {
            EventType::EntityOperationFailed(proto::EntityOperationFailedEvent {
                request_id: request_id.clone(),
                failure_details: Some(failure_to_proto(failure)),
            })
        }
        EventKind::EntityLockRequested { critical_section_id, lock_set, position, parent_instance_id } => {
            EventType::EntityLockRequested(proto::EntityLockRequestedEvent {
                critical_section_id: critical_section_id.clone(),
                lock_set: lock_set.clone(),
                position: *position,
                parent_instance_id: Some(parent_instance_id.clone()),
            })
        }
        // The lock set is Keel's own addition; the wire's grant names the section only.
        EventKind::EntityLockGranted { critical_section_id, .. } => {
            EventType::EntityLockGranted(proto::EntityLockGrantedEvent {
                critical_section_id: critical_section_id.clone(),
            })
        }
        EventKind::EntityUnlockSent { critical_section_id, parent_instance_id, target_instance_id } => {
            EventType::EntityUnlockSent(proto::EntityUnlockSentEvent {
                critical_section_id: critical_section_id.clone(),
                parent_instance_id: Some(parent_instance_id.clone()),
                target_instance_id: Some(target_instance_id.clone()),
            })
        }
    };
    proto::HistoryEvent {
        event_id: event.event_id,
        timestamp: Some(timestamp_to_proto(event.timestamp)),
        event_type: Some(kind),
    }
}

/// An event from the wire as a Keel event; `now` stands in for a missing timestamp.
/// Event types Keel has no counterpart for (history state, generic, …) are refused.
pub fn event_from_proto(event: &proto::HistoryEvent, now: Timestamp) -> Result<HistoryEvent> {
    let timestamp = optional_timestamp(event.timestamp.as_ref(), "the event timestamp")?.unwrap_or(now);
    let required_time = |at: Option<&prost_types::Timestamp>, what: &str| {
        at.ok_or_else(|| Error::InvalidArgument(format!("{what} is missing")))
            .and_then(|at| timestamp_from_proto(at, what))
    };
    let required_failure = |failure: Option<&proto::TaskFailureDetails>| {
        failure.map(failure_from_proto).ok_or_else(|| Error::InvalidArgument("failure details are missing".into()))
    };
    let kind = match event.event_type.as_ref() {
        None => return Err(Error::InvalidArgument("a history event has no event type".into())),
        Some(EventType::ExecutionStarted(started)) => EventKind::ExecutionStarted {
            name: started.name.clone(),
            version: started.version.clone(),
            input: payload(started.input.clone()),
            execution_id: started
                .orchestration_instance
                .as_ref()
                .and_then(|instance| instance.execution_id.clone())
                .unwrap_or_default(),
            parent: started.parent_instance.as_ref().map(|parent| {
                let instance = parent.orchestration_instance.clone().unwrap_or_default();
                ParentInstance {
                    instance_id: instance.instance_id,
                    execution_id: instance.execution_id.unwrap_or_default(),
                    name: parent.name.clone().unwrap_or_default(),
                    task_scheduled_id: parent.task_scheduled_id,
                }
            }),
            scheduled_start: optional_timestamp(started.scheduled_start_timestamp.as_ref(), "scheduledStartTimestamp")?,
            trace: started.parent_trace_context.as_ref().and_then(trace_from_proto),
        },
        Some(EventType::ExecutionCompleted(completed)) => EventKind::ExecutionCompleted {
            status: status_from_proto(completed.orchestration_status)?,
            result: payload(completed.result.clone()),
            failure: completed.failure_details.as_ref().map(failure_from_proto),
        },
        Some(EventType::ExecutionTerminated(terminated)) => {
            EventKind::ExecutionTerminated { reason: reason_from_wire(terminated.input.clone()) }
        }
        Some(EventType::TaskScheduled(scheduled)) => EventKind::TaskScheduled {
            name: scheduled.name.clone(),
            input: payload(scheduled.input.clone()),
            tags: scheduled.tags.clone().into_iter().collect(),
            trace: scheduled.parent_trace_context.as_ref().and_then(trace_from_proto),
        },
        Some(EventType::TaskCompleted(completed)) => EventKind::TaskCompleted {
            task_scheduled_id: completed.task_scheduled_id,
            result: payload(completed.result.clone()),
        },
        Some(EventType::TaskFailed(failed)) => EventKind::TaskFailed {
            task_scheduled_id: failed.task_scheduled_id,
            failure: required_failure(failed.failure_details.as_ref())?,
        },
        Some(EventType::SubOrchestrationInstanceCreated(created)) => EventKind::SubOrchestrationInstanceCreated {
            name: created.name.clone(),
            instance_id: created.instance_id.clone(),
            input: payload(created.input.clone()),
            trace: created.parent_trace_context.as_ref().and_then(trace_from_proto),
        },
        Some(EventType::SubOrchestrationInstanceCompleted(completed)) => EventKind::SubOrchestrationInstanceCompleted {
            task_scheduled_id: completed.task_scheduled_id,
            result: payload(completed.result.clone()),
        },
        Some(EventType::SubOrchestrationInstanceFailed(failed)) => EventKind::SubOrchestrationInstanceFailed {
            task_scheduled_id: failed.task_scheduled_id,
            failure: required_failure(failed.failure_details.as_ref())?,
        },
        Some(EventType::TimerCreated(created)) => {
            EventKind::TimerCreated { fire_at: required_time(created.fire_at.as_ref(), "the timer's fireAt")? }
        }
        Some(EventType::TimerFired(fired)) => EventKind::TimerFired {
            timer_id: fired.timer_id,
            fire_at: required_time(fired.fire_at.as_ref(), "the timer's fireAt")?,
        },
        Some(EventType::OrchestratorStarted(_)) => EventKind::OrchestratorStarted,
        Some(EventType::EventSent(sent)) => EventKind::EventSent {
            instance_id: sent.instance_id.clone(),
            name: sent.name.clone(),
            input: payload(sent.input.clone()),
        },
        Some(EventType::EventRaised(raised)) => {
            EventKind::EventRaised { name: raised.name.clone(), input: payload(raised.input.clone()) }
        }
        Some(EventType::ContinueAsNew(continued)) => {
            EventKind::ContinueAsNew { input: payload(continued.input.clone()) }
        }
        Some(EventType::ExecutionSuspended(suspended)) => {
            EventKind::ExecutionSuspended { reason: payload(suspended.input.clone()) }
        }
        Some(EventType::ExecutionResumed(resumed)) => {
            EventKind::ExecutionResumed { reason: payload(resumed.input.clone()) }
        }
        Some(EventType::ExecutionRewound(rewound)) => {
            EventKind::ExecutionRewound { reason: payload(rewound.reason.clone()) }
        }
        Some(EventType::EntityOperationSignaled(signaled)) => EventKind::EntityOperationSignaled {
            request_id: signaled.request_id.clone(),
            operation: signaled.operation.clone(),
            input: payload(signaled.input.clone()),
            scheduled_time: optional_timestamp(signaled.scheduled_time.as_ref(), "the signal's scheduledTime")?,
            target_instance_id: signaled.target_instance_id.clone().unwrap_or_default(),
            trace: None,
        },
        Some(EventType::EntityOperationCalled(called)) => EventKind::EntityOperationCalled {
            request_id: called.request_id.clone(),
            operation: called.operation.clone(),
            input: payload(called.input.clone()),
            parent_instance_id: called.parent_instance_id.clone().unwrap_or_default(),
            parent_execution_id: called.parent_execution_id.clone().unwrap_or_default(),
            target_instance_id: called.target_instance_id.clone().unwrap_or_default(),
            trace: None,
        },
        Some(EventType::EntityOperationCompleted(completed)) => EventKind::EntityOperationCompleted {
            request_id: completed.request_id.clone(),
            output: payload(completed.output.clone()),
        },
        Some(EventType::EntityOperationFailed(failed)) => EventKind::EntityOperationFailed {
            request_id: failed.request_id.clone(),
            failure: required_failure(failed.failure_details.as_ref())?,
        },
        Some(EventType::EntityLockRequested(requested)) => EventKind::EntityLockRequested {
            critical_section_id: requested.critical_section_id.clone(),
            lock_set: requested.lock_set.clone(),
            position: requested.position,
            parent_instance_id: requested.parent_instance_id.clone().unwrap_or_default(),
        },
        Some(EventType::EntityLockGranted(granted)) => EventKind::EntityLockGranted {
            critical_section_id: granted.critical_section_id.clone(),
            lock_set: Vec::new(),
        },
        Some(EventType::EntityUnlockSent(unlock)) => EventKind::EntityUnlockSent {
            critical_section_id: unlock.critical_section_id.clone(),
            parent_instance_id: unlock.parent_instance_id.clone().unwrap_or_default(),
            target_instance_id: unlock.target_instance_id.clone().unwrap_or_default(),
        },
        Some(other) => {
            return Err(Error::InvalidArgument(format!(
                "history events of type {} are not supported",
                event_type_name(other)
            )))
        }
    };
    Ok(HistoryEvent { event_id: event.event_id, timestamp, kind })
}

fn event_type_name(kind: &EventType) -> &'static str {
    match kind {
        EventType::GenericEvent(_) => "genericEvent",
        EventType::HistoryState(_) => "historyState",
        EventType::OrchestratorCompleted(_) => "orchestratorCompleted",
        _ => "this",
    }
}

/// True for the events a worker may see. `ContinueAsNew` is Keel's own bookkeeping: the
/// Python worker has no handler for it and would fail the orchestration.
pub fn is_for_workers(event: &HistoryEvent) -> bool {
    !matches!(event.kind, EventKind::ContinueAsNew { .. })
}

/// Puts the instance's tags on the `ExecutionStarted` events among `events` (Keel keeps
/// tags with the instance, the protocol on its start event).
pub fn tag_execution_started(events: &mut [proto::HistoryEvent], tags: &std::collections::BTreeMap<String, String>) {
    if tags.is_empty() {
        return;
    }
    for event in events {
        if let Some(EventType::ExecutionStarted(started)) = &mut event.event_type {
            started.tags = tags.clone().into_iter().collect();
        }
    }
}

/// The work item that hands an episode to a worker.
pub fn orchestrator_request(episode: &RemoteEpisode) -> proto::OrchestratorRequest {
    let instance_id = &episode.instance.instance_id;
    let convert = |events: &[HistoryEvent]| {
        let mut events: Vec<proto::HistoryEvent> = events
            .iter()
            .filter(|event| is_for_workers(event))
            .map(|event| event_to_proto(instance_id, event))
            .collect();
        tag_execution_started(&mut events, &episode.instance.tags);
        events
    };
    // The execution's span: its id derived from the execution id, its start the
    // execution's, so the SDK emits it under the right id whichever episode ends it.
    let started = episode
        .past_events
        .iter()
        .chain(&episode.new_events)
        .find(|event| matches!(event.kind, EventKind::ExecutionStarted { trace: Some(_), .. }));
    let orchestration_trace_context = started.map(|event| proto::OrchestrationTraceContext {
        span_id: Some(keel_core::trace::orchestration_span_id(&episode.instance.execution_id)),
        span_start_time: Some(timestamp_to_proto(event.timestamp)),
    });
    proto::OrchestratorRequest {
        instance_id: instance_id.clone(),
        execution_id: Some(episode.instance.execution_id.clone()),
        past_events: convert(&episode.past_events),
        new_events: convert(&episode.new_events),
        orchestration_trace_context,
        ..Default::default()
    }
}

/// The work item that hands an activity to a worker.
pub fn activity_request(item: &ActivityItem) -> proto::ActivityRequest {
    proto::ActivityRequest {
        name: item.name.clone(),
        input: item.input.clone(),
        orchestration_instance: Some(instance_ref(&item.instance_id, Some(&item.execution_id))),
        task_id: item.task_id,
        parent_trace_context: item.trace.as_ref().map(trace_to_proto),
        ..Default::default()
    }
}

/// The work item that hands an entity batch to a worker: the state before the batch
/// and the operations, as the `EntityOperationSignaled` / `…Called` events they came
/// in (the worker answers calls through them).
pub fn entity_request(episode: &EntityEpisode) -> proto::EntityRequest {
    let instance_id = episode.id.instance_id();
    proto::EntityRequest {
        operation_requests: episode
            .operations
            .iter()
            .map(|operation| event_to_proto(&instance_id, &operation.event))
            .collect(),
        instance_id,
        execution_id: episode.instance.execution_id.clone(),
        entity_state: episode.state.clone(),
    }
}

/// What a worker's `EntityBatchResult` for `episode` did, checked: one result per
/// operation, in order (`success.result` empty: no result), the state after the batch
/// (unset or empty: no state, the entity is deleted) and the signals and starts of the
/// operations that succeeded. A result that fails the whole batch (`failureDetails`)
/// fails every operation and keeps the state as it was. Anything malformed (a result
/// count that differs from the operation count, an invalid signal target, a payload
/// over the limit) is an error: nothing of it may be applied.
pub fn batch_outcome(result: &proto::EntityBatchResult, episode: &EntityEpisode) -> Result<BatchOutcome> {
    if let Some(failure) = &result.failure_details {
        let failure = failure_from_proto(failure);
        return Ok(BatchOutcome {
            state: episode.state.clone(),
            results: episode.operations.iter().map(|_| Err(failure.clone())).collect(),
            actions: Vec::new(),
        });
    }
    if result.results.len() != episode.operations.len() {
        return Err(Error::InvalidArgument(format!(
            "the batch of entity {} had {} operations but the result has {} results",
            episode.id,
            episode.operations.len(),
            result.results.len()
        )));
    }
    let mut results = Vec::with_capacity(result.results.len());
    for (index, operation) in result.results.iter().enumerate() {
        results.push(match &operation.result_type {
            None => {
                return Err(Error::InvalidArgument(format!("operation result #{index} is neither success nor failure")))
            }
            Some(ResultType::Success(success)) => {
                let output = payload(success.result.clone());
                match limits::check_payload("the operation result", output.as_deref()) {
                    Ok(()) => Ok(output),
                    Err(message) => Err(FailureDetails::new("PayloadTooLarge", message)),
                }
            }
            Some(ResultType::Failure(failure)) => Err(failure
                .failure_details
                .as_ref()
                .map(failure_from_proto)
                .unwrap_or_else(|| FailureDetails::new("EntityOperationFailed", "the entity operation failed"))),
        });
    }
    let mut actions = Vec::with_capacity(result.actions.len());
    for action in &result.actions {
        let check_input = |input: Option<String>, what: &str| {
            let input = payload(input);
            limits::check_payload(what, input.as_deref()).map_err(Error::InvalidArgument)?;
            Ok::<_, Error>(input)
        };
        actions.push(match &action.operation_action_type {
            None => return Err(Error::InvalidArgument(format!("entity action {} has no action type", action.id))),
            Some(OperationActionType::SendSignal(signal)) => {
                let target = EntityId::parse(&signal.instance_id).map_err(|message| {
                    Error::InvalidArgument(format!(
                        "entity {} signals '{}', which is not a valid entity id: {message}",
                        episode.id, signal.instance_id
                    ))
                })?;
                limits::check_name("operation", &signal.name).map_err(Error::InvalidArgument)?;
                EntityAction::Signal {
                    target: target.instance_id(),
                    operation: signal.name.clone(),
                    input: check_input(signal.input.clone(), "the signal input")?,
                    scheduled_time: optional_timestamp(signal.scheduled_time.as_ref(), "the signal's scheduledTime")?,
                }
            }
            Some(OperationActionType::StartNewOrchestration(start)) => {
                limits::check_name("orchestrator", &start.name).map_err(Error::InvalidArgument)?;
                let instance_id = if start.instance_id.is_empty() {
                    keel::client::new_instance_id()
                } else {
                    start.instance_id.clone()
                };
                limits::check_instance_id(&instance_id).map_err(Error::InvalidArgument)?;
                // Keel's entity starts carry no version: `version` is not kept.
                EntityAction::StartOrchestration {
                    instance_id,
                    name: start.name.clone(),
                    input: check_input(start.input.clone(), "the orchestration input")?,
                    scheduled_start: optional_timestamp(start.scheduled_time.as_ref(), "the start's scheduledTime")?,
                }
            }
        });
    }
    Ok(BatchOutcome { state: payload(result.entity_state.clone()), results, actions })
}

/// An entity as `GetEntity` and `QueryEntities` report it; the state only when asked for.
pub fn entity_metadata(entity: &EntityMetadata, include_state: bool) -> proto::EntityMetadata {
    proto::EntityMetadata {
        instance_id: entity.id.instance_id(),
        last_modified_time: Some(timestamp_to_proto(entity.last_modified)),
        backlog_queue_size: i32::try_from(entity.backlog).unwrap_or(i32::MAX),
        locked_by: entity.locked_by.clone(),
        serialized_state: if include_state { entity.state.clone() } else { None },
    }
}

/// An instance's state as `GetInstance` and `QueryInstances` report it; inputs and
/// outputs only when asked for.
pub fn orchestration_state(status: &InstanceStatus, with_payloads: bool) -> proto::OrchestrationState {
    proto::OrchestrationState {
        instance_id: status.instance_id.clone(),
        name: status.name.clone(),
        version: status.version.clone(),
        orchestration_status: status_to_proto(status.status),
        scheduled_start_timestamp: status.scheduled_start.map(timestamp_to_proto),
        created_timestamp: Some(timestamp_to_proto(status.created_at)),
        last_updated_timestamp: Some(timestamp_to_proto(status.last_updated_at)),
        input: if with_payloads { status.input.clone() } else { None },
        output: if with_payloads { status.output.clone() } else { None },
        custom_status: status.custom_status.clone(),
        failure_details: status.failure.as_ref().map(failure_to_proto),
        execution_id: Some(status.execution_id.clone()),
        completed_timestamp: status.completed_at.map(timestamp_to_proto),
        parent_instance_id: status.parent.as_ref().map(|parent| parent.instance_id.clone()),
        tags: status.tags.clone().into_iter().collect(),
    }
}

/// A message to another instance that a worker's actions call for, beyond what
/// [`RemoteOutcome`] carries.
#[derive(Clone, Debug, PartialEq)]
pub struct Termination {
    pub instance_id: String,
    pub reason: Option<String>,
}

/// What a worker's `OrchestratorResponse` for the execution `execution_id` of
/// `parent_instance_id` decided, checked. A malformed response is an error (nothing of
/// it is applied); an action Keel does not support (worker-built rewinds), a payload
/// over the limit or an entity id Keel refuses fails the orchestration instead.
pub fn outcome_from_response(
    response: &proto::OrchestratorResponse,
    parent_instance_id: &str,
    execution_id: &str,
    now: Timestamp,
) -> Result<(RemoteOutcome, Vec<Termination>)> {
    let mut actions = Vec::new();
    let mut terminations = Vec::new();
    let mut completion = None;
    let mut refusal: Option<FailureDetails> = None;
    let mut traces = std::collections::BTreeMap::new();
    for action in &response.actions {
        let id = action.id;
        let Some(kind) = action.orchestrator_action_type.as_ref() else {
            return Err(Error::InvalidArgument(format!("action {id} has no action type")));
        };
        match kind {
            OrchestratorActionType::ScheduleTask(task) => {
                limits::check_name("activity", &task.name).map_err(Error::InvalidArgument)?;
                let input = payload(task.input.clone());
                refusal = refusal.or_else(|| payload_failure_of("the activity input", input.as_deref()));
                if let Some(trace) = task.parent_trace_context.as_ref().and_then(trace_from_proto) {
                    traces.insert(id, trace);
                }
                actions.push(Action::ScheduleTask { id, name: task.name.clone(), input });
            }
            OrchestratorActionType::CreateSubOrchestration(sub) => {
                limits::check_name("orchestrator", &sub.name).map_err(Error::InvalidArgument)?;
                // Without an id, the child's is derived from the parent's execution as
                // DurableTask.Core and the JavaScript SDK derive it: stable across replays,
                // unique across continue-as-new, 37 characters at every nesting depth.
                let instance_id = if sub.instance_id.is_empty() {
                    format!("{execution_id}:{id:04x}")
                } else {
                    sub.instance_id.clone()
                };
                limits::check_instance_id(&instance_id).map_err(Error::InvalidArgument)?;
                let input = payload(sub.input.clone());
                refusal = refusal.or_else(|| payload_failure_of("the sub-orchestration input", input.as_deref()));
                if let Some(trace) = sub.parent_trace_context.as_ref().and_then(trace_from_proto) {
                    traces.insert(id, trace);
                }
                actions.push(Action::CreateSubOrchestration { id, name: sub.name.clone(), instance_id, input });
            }
            OrchestratorActionType::CreateTimer(timer) => {
                let fire_at = timer
                    .fire_at
                    .as_ref()
                    .ok_or_else(|| Error::InvalidArgument(format!("timer action {id} has no fireAt")))?;
                actions.push(Action::CreateTimer { id, fire_at: timestamp_from_proto(fire_at, "the timer's fireAt")? });
            }
            OrchestratorActionType::SendEvent(send) => {
                let instance_id =
                    send.instance.as_ref().map(|instance| instance.instance_id.clone()).unwrap_or_default();
                if instance_id.is_empty() {
                    return Err(Error::InvalidArgument(format!("send-event action {id} names no instance")));
                }
                limits::check_name("event", &send.name).map_err(Error::InvalidArgument)?;
                let input = payload(send.data.clone());
                refusal = refusal.or_else(|| payload_failure_of("the event data", input.as_deref()));
                actions.push(Action::SendEvent { id, instance_id, name: send.name.clone(), input });
            }
            OrchestratorActionType::TerminateOrchestration(terminate) => {
                if terminate.instance_id.is_empty() {
                    return Err(Error::InvalidArgument(format!("terminate action {id} names no instance")));
                }
                terminations.push(Termination {
                    instance_id: terminate.instance_id.clone(),
                    reason: reason_from_wire(terminate.reason.clone()),
                });
            }
            OrchestratorActionType::CompleteOrchestration(complete) => {
                if completion.is_some() {
                    return Err(Error::InvalidArgument("the response completes the orchestration twice".into()));
                }
                completion = Some(completion_from_proto(complete, now)?);
            }
            OrchestratorActionType::SendEntityMessage(message) => {
                match entity_action(id, message, parent_instance_id, execution_id)? {
                    Ok(action) => {
                        let input = match &action {
                            Action::SignalEntity { input, .. } | Action::CallEntity { input, .. } => input.as_deref(),
                            _ => None,
                        };
                        refusal = refusal.or_else(|| payload_failure_of("the entity operation input", input));
                        actions.push(action);
                    }
                    Err(failure) => refusal = refusal.or(Some(failure)),
                }
            }
            OrchestratorActionType::RewindOrchestration(_) => {
                refusal = refusal.or_else(|| {
                    Some(FailureDetails::new(
                        UNSUPPORTED_ERROR_TYPE,
                        "rewinds are run by Keel; a worker-built rewind history is not accepted",
                    ))
                });
            }
        }
    }
    let custom_status = payload(response.custom_status.clone());
    refusal = refusal.or_else(|| payload_failure_of("the custom status", custom_status.as_deref()));
    if let Some(failure) = refusal {
        completion = Some(Completion::Failed { failure });
    }
    Ok((RemoteOutcome { actions, completion, custom_status, traces }, terminations))
}

/// Error type of an orchestration that named an entity id Keel does not accept (the
/// SDKs allow a few characters in keys that Keel refuses: `/ \ # ?`, control characters).
pub const INVALID_ENTITY_ID_ERROR_TYPE: &str = "InvalidEntityId";

/// An entity id from an orchestrator action, in Keel's normal form; refused ids fail
/// the orchestration.
fn action_entity_id(id: i32, what: &str, target: &str) -> std::result::Result<String, FailureDetails> {
    EntityId::parse(target).map(|entity| entity.instance_id()).map_err(|message| {
        FailureDetails::new(
            INVALID_ENTITY_ID_ERROR_TYPE,
            format!("{what} (action {id}) names '{target}', which is not a valid entity id: {message}"),
        )
    })
}

/// A `sendEntityMessage` action as a Keel action. `Err` of the outer result: the action
/// is malformed; of the inner one: the orchestration is failed with these details.
fn entity_action(
    id: i32,
    message: &proto::SendEntityMessageAction,
    parent_instance_id: &str,
    execution_id: &str,
) -> Result<std::result::Result<Action, FailureDetails>> {
    let required = |value: &str, what: &str| {
        if value.is_empty() {
            Err(Error::InvalidArgument(format!("entity action {id} has no {what}")))
        } else {
            Ok(())
        }
    };
    let target = |target: &Option<String>, what: &str| {
        let target = target.clone().unwrap_or_default();
        required(&target, "targetInstanceId")?;
        Ok::<_, Error>(action_entity_id(id, what, &target))
    };
    let action = match message.entity_message_type.as_ref() {
        None => return Err(Error::InvalidArgument(format!("entity action {id} has no message type"))),
        Some(EntityMessageType::EntityOperationSignaled(signal)) => {
            required(&signal.request_id, "requestId")?;
            limits::check_name("operation", &signal.operation).map_err(Error::InvalidArgument)?;
            let target = match target(&signal.target_instance_id, "a signal")? {
                Ok(target) => target,
                Err(failure) => return Ok(Err(failure)),
            };
            Action::SignalEntity {
                id,
                request_id: signal.request_id.clone(),
                target,
                operation: signal.operation.clone(),
                input: payload(signal.input.clone()),
                scheduled_time: optional_timestamp(signal.scheduled_time.as_ref(), "the signal's scheduledTime")?,
            }
        }
        Some(EntityMessageType::EntityOperationCalled(call)) => {
            required(&call.request_id, "requestId")?;
            limits::check_name("operation", &call.operation).map_err(Error::InvalidArgument)?;
            let target = match target(&call.target_instance_id, "a call")? {
                Ok(target) => target,
                Err(failure) => return Ok(Err(failure)),
            };
            // The SDKs name the caller but not its execution: answers go to this one.
            Action::CallEntity {
                id,
                request_id: call.request_id.clone(),
                target,
                operation: call.operation.clone(),
                input: payload(call.input.clone()),
                parent_instance_id: parent_instance_id.to_string(),
                parent_execution_id: execution_id.to_string(),
            }
        }
        Some(EntityMessageType::EntityLockRequested(lock)) => {
            required(&lock.critical_section_id, "criticalSectionId")?;
            let mut lock_set = Vec::with_capacity(lock.lock_set.len());
            for target in &lock.lock_set {
                match action_entity_id(id, "a lock request", target) {
                    Ok(target) => lock_set.push(target),
                    Err(failure) => return Ok(Err(failure)),
                }
            }
            // The lock travels along the set in order: sorted and without duplicates,
            // so that two critical sections never wait for each other.
            lock_set.sort();
            lock_set.dedup();
            if lock_set.is_empty() {
                return Err(Error::InvalidArgument(format!("lock request {id} names no entity")));
            }
            Action::LockEntities {
                id,
                critical_section_id: lock.critical_section_id.clone(),
                lock_set,
                parent_instance_id: parent_instance_id.to_string(),
            }
        }
        Some(EntityMessageType::EntityUnlockSent(unlock)) => {
            required(&unlock.critical_section_id, "criticalSectionId")?;
            let target = match target(&unlock.target_instance_id, "an unlock")? {
                Ok(target) => target,
                Err(failure) => return Ok(Err(failure)),
            };
            Action::UnlockEntity {
                id,
                critical_section_id: unlock.critical_section_id.clone(),
                target,
                parent_instance_id: parent_instance_id.to_string(),
            }
        }
    };
    Ok(Ok(action))
}

/// A payload over the limit fails the orchestration (as it does for Rust orchestrators).
fn payload_failure_of(what: &str, text: Option<&str>) -> Option<FailureDetails> {
    limits::check_payload(what, text).err().map(|message| FailureDetails::new("PayloadTooLarge", message))
}

fn completion_from_proto(complete: &proto::CompleteOrchestrationAction, now: Timestamp) -> Result<Completion> {
    let result = payload(complete.result.clone());
    match status_from_proto(complete.orchestration_status)? {
        RuntimeStatus::Completed => Ok(Completion::Completed { output: result }),
        RuntimeStatus::Failed => {
            let failure = complete.failure_details.as_ref().map(failure_from_proto).unwrap_or_else(|| {
                FailureDetails::new(
                    "OrchestrationFailed",
                    payload(complete.details.clone()).unwrap_or_else(|| "the orchestration failed".to_string()),
                )
            });
            Ok(Completion::Failed { failure })
        }
        RuntimeStatus::Terminated => Ok(Completion::Terminated { reason: reason_from_wire(result) }),
        RuntimeStatus::ContinuedAsNew => {
            let carryover_events = complete
                .carryover_events
                .iter()
                .map(|event| event_from_proto(event, now))
                .collect::<Result<Vec<_>>>()?;
            let version = payload(complete.new_version.clone());
            Ok(Completion::ContinuedAsNew { input: result, carryover_events, version })
        }
        other => Err(Error::InvalidArgument(format!("an orchestration cannot complete with status {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::OrchestratorAction;

    fn at(millis: i64) -> Timestamp {
        DateTime::from_timestamp_millis(millis).unwrap()
    }

    /// One event of every Keel kind, with the ids and timestamps a history would hold.
    fn every_kind() -> Vec<HistoryEvent> {
        let failure = FailureDetails {
            error_type: "builtins.ValueError".into(),
            error_message: "kaboom".into(),
            stack_trace: Some("  File x".into()),
            inner_failure: Some(Box::new(FailureDetails::new("Inner", "cause"))),
            is_non_retriable: true,
            properties: [("attempt".to_string(), serde_json::json!(2)), ("tags".to_string(), serde_json::json!(["a"]))]
                .into_iter()
                .collect(),
        };
        let kinds = vec![
            EventKind::OrchestratorStarted,
            EventKind::ExecutionStarted {
                trace: None,
                name: "Orch".into(),
                version: Some("1.0".into()),
                input: Some("\"in\"".into()),
                execution_id: "e1".into(),
                parent: Some(ParentInstance {
                    instance_id: "p".into(),
                    execution_id: "pe".into(),
                    name: "Parent".into(),
                    task_scheduled_id: 3,
                }),
                scheduled_start: Some(at(5_000)),
            },
            EventKind::TaskScheduled {
                trace: None,
                name: "A".into(),
                input: Some("1".into()),
                tags: [("team".to_string(), "payments".to_string())].into(),
            },
            EventKind::TaskCompleted { task_scheduled_id: 1, result: Some("2".into()) },
            EventKind::TaskFailed { task_scheduled_id: 1, failure: failure.clone() },
            EventKind::SubOrchestrationInstanceCreated {
                trace: None,
                name: "S".into(),
                instance_id: "c".into(),
                input: None,
            },
            EventKind::SubOrchestrationInstanceCompleted { task_scheduled_id: 2, result: None },
            EventKind::SubOrchestrationInstanceFailed { task_scheduled_id: 2, failure },
            EventKind::TimerCreated { fire_at: at(9_000) },
            EventKind::TimerFired { timer_id: 4, fire_at: at(9_000) },
            EventKind::EventSent { instance_id: "o".into(), name: "E".into(), input: Some("{}".into()) },
            EventKind::EventRaised { name: "E".into(), input: Some("[1]".into()) },
            EventKind::ExecutionSuspended { reason: Some("pause".into()) },
            EventKind::ExecutionResumed { reason: None },
            EventKind::ExecutionTerminated { reason: Some("\"enough\"".into()) },
            EventKind::ExecutionRewound { reason: Some("again".into()) },
            EventKind::ContinueAsNew { input: Some("7".into()) },
            EventKind::EntityOperationSignaled {
                trace: None,
                request_id: "r1".into(),
                operation: "add".into(),
                input: Some("5".into()),
                scheduled_time: Some(at(7_000)),
                target_instance_id: "@counter@k".into(),
            },
            EventKind::EntityOperationCalled {
                trace: None,
                request_id: "r2".into(),
                operation: "get".into(),
                input: None,
                parent_instance_id: "o".into(),
                parent_execution_id: "oe".into(),
                target_instance_id: "@counter@k".into(),
            },
            EventKind::EntityOperationCompleted { request_id: "r2".into(), output: Some("5".into()) },
            EventKind::EntityOperationFailed { request_id: "r3".into(), failure: FailureDetails::new("E", "no") },
            EventKind::EntityLockRequested {
                critical_section_id: "cs".into(),
                lock_set: vec!["@a@1".into(), "@a@2".into()],
                position: 1,
                parent_instance_id: "o".into(),
            },
            EventKind::EntityLockGranted { critical_section_id: "cs".into(), lock_set: Vec::new() },
            EventKind::EntityUnlockSent {
                critical_section_id: "cs".into(),
                parent_instance_id: "o".into(),
                target_instance_id: "@a@1".into(),
            },
            EventKind::ExecutionCompleted {
                status: RuntimeStatus::Completed,
                result: Some("\"ok\"".into()),
                failure: None,
            },
        ];
        kinds
            .into_iter()
            .enumerate()
            .map(|(i, kind)| HistoryEvent::with_id(i as i32 - 1, at(1_000 + i as i64), kind))
            .collect()
    }

    #[test]
    fn every_event_kind_survives_the_wire_unchanged() {
        for event in every_kind() {
            let wire = event_to_proto("i", &event);
            assert_eq!(wire.event_id, event.event_id);
            let back = event_from_proto(&wire, at(0)).unwrap();
            assert_eq!(back, event, "{}", event.kind.type_name());
        }
    }

    #[test]
    fn execution_started_names_the_instance_and_its_parent() {
        let event = &every_kind()[1];
        let Some(EventType::ExecutionStarted(started)) = event_to_proto("child", event).event_type else { panic!() };
        assert_eq!(started.orchestration_instance.unwrap(), instance_ref("child", Some("e1")));
        let parent = started.parent_instance.unwrap();
        assert_eq!(parent.task_scheduled_id, 3);
        assert_eq!(parent.orchestration_instance.unwrap(), instance_ref("p", Some("pe")));
    }

    #[test]
    fn termination_outputs_are_json_values_kept_unchanged() {
        assert_eq!(reason_to_wire(Some("\"stop now\"")).as_deref(), Some("\"stop now\""));
        assert_eq!(reason_to_wire(Some("stop now")).as_deref(), Some("\"stop now\""), "legacy plain text");
        assert_eq!(reason_from_wire(Some("\"stop now\"".into())).as_deref(), Some("\"stop now\""));
        assert_eq!(reason_from_wire(Some("{\"a\":1}".into())).as_deref(), Some("{\"a\":1}"));
        assert_eq!(reason_from_wire(Some("not json".into())).as_deref(), Some("\"not json\""));
        assert_eq!(reason_from_wire(Some(String::new())), None);
    }

    #[test]
    fn workers_never_see_continue_as_new_events() {
        let episode_events = every_kind();
        assert!(episode_events.iter().any(|event| !is_for_workers(event)));
        assert!(episode_events
            .iter()
            .filter(|event| is_for_workers(event))
            .all(|event| { !matches!(event_to_proto("i", event).event_type, Some(EventType::ContinueAsNew(_))) }));
    }

    fn response(actions: Vec<OrchestratorActionType>) -> proto::OrchestratorResponse {
        proto::OrchestratorResponse {
            instance_id: "i".into(),
            actions: actions
                .into_iter()
                .enumerate()
                .map(|(i, kind)| OrchestratorAction { id: i as i32 + 1, orchestrator_action_type: Some(kind) })
                .collect(),
            custom_status: Some("\"busy\"".into()),
            ..Default::default()
        }
    }

    #[test]
    fn actions_become_keel_actions_with_the_workers_ids() {
        let (outcome, terminations) = outcome_from_response(
            &response(vec![
                OrchestratorActionType::ScheduleTask(proto::ScheduleTaskAction {
                    name: "A".into(),
                    input: Some("1".into()),
                    ..Default::default()
                }),
                OrchestratorActionType::CreateTimer(proto::CreateTimerAction {
                    fire_at: Some(timestamp_to_proto(at(2_000))),
                }),
                OrchestratorActionType::CreateSubOrchestration(proto::CreateSubOrchestrationAction {
                    name: "S".into(),
                    ..Default::default()
                }),
                OrchestratorActionType::SendEvent(proto::SendEventAction {
                    instance: Some(instance_ref("other", None)),
                    name: "E".into(),
                    data: Some(String::new()),
                }),
                OrchestratorActionType::TerminateOrchestration(proto::TerminateOrchestrationAction {
                    instance_id: "victim".into(),
                    reason: Some("\"why\"".into()),
                    recurse: false,
                }),
            ]),
            "i",
            "0123456789abcdef0123456789abcdef",
            at(0),
        )
        .unwrap();
        assert_eq!(
            outcome.actions,
            vec![
                Action::ScheduleTask { id: 1, name: "A".into(), input: Some("1".into()) },
                Action::CreateTimer { id: 2, fire_at: at(2_000) },
                // Without an id, the child's derives from the parent's execution id.
                Action::CreateSubOrchestration {
                    id: 3,
                    name: "S".into(),
                    instance_id: "0123456789abcdef0123456789abcdef:0003".into(),
                    input: None
                },
                Action::SendEvent { id: 4, instance_id: "other".into(), name: "E".into(), input: None },
            ]
        );
        assert_eq!(terminations, vec![Termination { instance_id: "victim".into(), reason: Some("\"why\"".into()) }]);
        assert_eq!(outcome.custom_status.as_deref(), Some("\"busy\""));
        assert_eq!(outcome.completion, None);
    }

    fn entity_message(kind: EntityMessageType) -> OrchestratorActionType {
        OrchestratorActionType::SendEntityMessage(proto::SendEntityMessageAction { entity_message_type: Some(kind) })
    }

    #[test]
    fn entity_messages_become_keel_actions() {
        let (outcome, _) = outcome_from_response(
            &response(vec![
                entity_message(EntityMessageType::EntityOperationSignaled(proto::EntityOperationSignaledEvent {
                    request_id: "r1".into(),
                    operation: "add".into(),
                    scheduled_time: Some(timestamp_to_proto(at(2_000))),
                    input: Some("5".into()),
                    target_instance_id: Some("@Counter@K1".into()),
                })),
                entity_message(EntityMessageType::EntityOperationCalled(proto::EntityOperationCalledEvent {
                    request_id: "r2".into(),
                    operation: "get".into(),
                    input: Some(String::new()),
                    parent_instance_id: Some("i".into()),
                    target_instance_id: Some("@counter@k1".into()),
                    ..Default::default()
                })),
                entity_message(EntityMessageType::EntityLockRequested(proto::EntityLockRequestedEvent {
                    critical_section_id: "cs".into(),
                    lock_set: vec!["@b@1".into(), "@a@2".into(), "@b@1".into()],
                    position: 0,
                    parent_instance_id: Some("i".into()),
                })),
                entity_message(EntityMessageType::EntityUnlockSent(proto::EntityUnlockSentEvent {
                    critical_section_id: "cs".into(),
                    parent_instance_id: Some("i".into()),
                    target_instance_id: Some("@a@2".into()),
                })),
            ]),
            "i",
            "e",
            at(0),
        )
        .unwrap();
        assert_eq!(
            outcome.actions,
            vec![
                Action::SignalEntity {
                    id: 1,
                    request_id: "r1".into(),
                    target: "@counter@K1".into(),
                    operation: "add".into(),
                    input: Some("5".into()),
                    scheduled_time: Some(at(2_000)),
                },
                Action::CallEntity {
                    id: 2,
                    request_id: "r2".into(),
                    target: "@counter@k1".into(),
                    operation: "get".into(),
                    input: None,
                    parent_instance_id: "i".into(),
                    parent_execution_id: "e".into(),
                },
                Action::LockEntities {
                    id: 3,
                    critical_section_id: "cs".into(),
                    lock_set: vec!["@a@2".into(), "@b@1".into()],
                    parent_instance_id: "i".into(),
                },
                Action::UnlockEntity {
                    id: 4,
                    critical_section_id: "cs".into(),
                    target: "@a@2".into(),
                    parent_instance_id: "i".into(),
                },
            ]
        );
        assert_eq!(outcome.completion, None);
        // The echo in history is the action, as the SDK replays it.
        let echo = event_to_proto("i", &outcome.actions[1].to_history_event(at(0), None));
        assert_eq!(echo.event_id, 2);
        let Some(EventType::EntityOperationCalled(called)) = echo.event_type else { panic!() };
        assert_eq!((called.request_id.as_str(), called.parent_execution_id.as_deref()), ("r2", Some("e")));
    }

    #[test]
    fn an_entity_id_keel_refuses_fails_the_orchestration_and_a_malformed_message_is_refused() {
        let signal = |target: &str, request_id: &str| {
            response(vec![entity_message(EntityMessageType::EntityOperationSignaled(
                proto::EntityOperationSignaledEvent {
                    request_id: request_id.into(),
                    operation: "add".into(),
                    target_instance_id: Some(target.into()),
                    ..Default::default()
                },
            ))])
        };
        let (outcome, _) = outcome_from_response(&signal("@counter@a/b", "r"), "i", "e", at(0)).unwrap();
        let Some(Completion::Failed { failure }) = outcome.completion else { panic!("{outcome:?}") };
        assert_eq!(failure.error_type, INVALID_ENTITY_ID_ERROR_TYPE);
        assert!(failure.error_message.contains("@counter@a/b"), "{failure}");
        assert!(matches!(
            outcome_from_response(&signal("@counter@a", ""), "i", "e", at(0)),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(outcome_from_response(&signal("", "r"), "i", "e", at(0)), Err(Error::InvalidArgument(_))));
    }

    fn entity_episode(operations: &[EventKind]) -> Box<EntityEpisode> {
        use keel_store::{InstanceRecord, Message, OrchestrationItem, OrchestrationLock, StoredMessage};
        let instance_id = "@counter@k1";
        let item = OrchestrationItem {
            lock: OrchestrationLock { instance_id: instance_id.into(), token: "l".into() },
            instance: InstanceRecord {
                instance_id: instance_id.into(),
                name: "counter".into(),
                version: None,
                execution_id: "x".into(),
                status: RuntimeStatus::Running,
                input: None,
                output: Some("1".into()),
                custom_status: None,
                failure: None,
                parent: None,
                scheduled_start: None,
                created_at: at(0),
                last_updated_at: at(0),
                completed_at: None,
                history_len: 0,
                tags: Default::default(),
            },
            messages: operations
                .iter()
                .enumerate()
                .map(|(i, kind)| StoredMessage {
                    id: i as i64 + 1,
                    message: Message {
                        instance_id: instance_id.into(),
                        execution_id: None,
                        event: HistoryEvent::new(at(1), kind.clone()),
                        visible_at: at(1),
                    },
                })
                .collect(),
            delivery_attempts: 1,
        };
        match keel::entity_episode::prepare_entity(&item, at(2)) {
            keel::entity_episode::EntityIntake::Run(episode) => episode,
            other => panic!("{other:?}"),
        }
    }

    fn two_operations() -> Box<EntityEpisode> {
        entity_episode(&[
            EventKind::EntityOperationSignaled {
                trace: None,
                request_id: "r1".into(),
                operation: "add".into(),
                input: Some("2".into()),
                scheduled_time: None,
                target_instance_id: "@counter@k1".into(),
            },
            EventKind::EntityOperationCalled {
                trace: None,
                request_id: "r2".into(),
                operation: "get".into(),
                input: None,
                parent_instance_id: "o".into(),
                parent_execution_id: "oe".into(),
                target_instance_id: "@counter@k1".into(),
            },
        ])
    }

    #[test]
    fn entity_batches_travel_as_their_operation_events() {
        let episode = two_operations();
        let request = entity_request(&episode);
        assert_eq!(request.instance_id, "@counter@k1");
        assert_eq!(request.entity_state.as_deref(), Some("1"));
        assert_eq!(request.operation_requests.len(), 2);
        assert!(matches!(request.operation_requests[0].event_type, Some(EventType::EntityOperationSignaled(_))));
        let Some(EventType::EntityOperationCalled(called)) = &request.operation_requests[1].event_type else {
            panic!()
        };
        assert_eq!(called.parent_instance_id.as_deref(), Some("o"));
    }

    fn success(result: &str) -> proto::OperationResult {
        proto::OperationResult {
            result_type: Some(ResultType::Success(proto::OperationResultSuccess {
                result: Some(result.into()),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn entity_batch_results_become_outcomes() {
        let episode = two_operations();
        let failure = proto::OperationResult {
            result_type: Some(ResultType::Failure(proto::OperationResultFailure {
                failure_details: Some(failure_to_proto(&FailureDetails::new("builtins.ValueError", "no"))),
                ..Default::default()
            })),
        };
        let signal = |target: &str| proto::OperationAction {
            id: 0,
            operation_action_type: Some(OperationActionType::SendSignal(proto::SendSignalAction {
                instance_id: target.into(),
                name: "run".into(),
                scheduled_time: Some(timestamp_to_proto(at(9_000))),
                ..Default::default()
            })),
        };
        let start = proto::OperationAction {
            id: 0,
            operation_action_type: Some(OperationActionType::StartNewOrchestration(
                proto::StartNewOrchestrationAction {
                    instance_id: "s1-2026-12-01T07:32:08.663224+00:00".into(),
                    name: "target".into(),
                    input: Some("\"hi\"".into()),
                    ..Default::default()
                },
            )),
        };
        let result = proto::EntityBatchResult {
            results: vec![success(""), failure],
            actions: vec![signal("@Schedule@s1"), start],
            entity_state: Some("3".into()),
            completion_token: "t".into(),
            ..Default::default()
        };
        let outcome = batch_outcome(&result, &episode).unwrap();
        assert_eq!(outcome.state.as_deref(), Some("3"));
        assert_eq!(outcome.results[0], Ok(None), "an empty result is no result");
        assert_eq!(outcome.results[1].as_ref().unwrap_err().error_type, "builtins.ValueError");
        assert_eq!(
            outcome.actions,
            vec![
                EntityAction::Signal {
                    target: "@schedule@s1".into(),
                    operation: "run".into(),
                    input: None,
                    scheduled_time: Some(at(9_000)),
                },
                EntityAction::StartOrchestration {
                    instance_id: "s1-2026-12-01T07:32:08.663224+00:00".into(),
                    name: "target".into(),
                    input: Some("\"hi\"".into()),
                    scheduled_start: None,
                },
            ]
        );
        let deleted = proto::EntityBatchResult { results: vec![success("1"), success("1")], ..Default::default() };
        assert_eq!(batch_outcome(&deleted, &episode).unwrap().state, None, "no entityState: no state");
        let batch_failed = proto::EntityBatchResult {
            failure_details: Some(failure_to_proto(&FailureDetails::new("Crash", "worker"))),
            ..Default::default()
        };
        let outcome = batch_outcome(&batch_failed, &episode).unwrap();
        assert_eq!(outcome.state.as_deref(), Some("1"), "a failed batch keeps the state");
        assert!(outcome.results.iter().all(|result| result.as_ref().unwrap_err().error_type == "Crash"));
    }

    #[test]
    fn malformed_entity_batch_results_are_refused() {
        let episode = two_operations();
        let one_result = proto::EntityBatchResult { results: vec![success("1")], ..Default::default() };
        assert!(matches!(batch_outcome(&one_result, &episode), Err(Error::InvalidArgument(_))));
        let bad_target = proto::EntityBatchResult {
            results: vec![success("1"), success("1")],
            actions: vec![proto::OperationAction {
                id: 0,
                operation_action_type: Some(OperationActionType::SendSignal(proto::SendSignalAction {
                    instance_id: "not-an-entity".into(),
                    name: "run".into(),
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        let Err(Error::InvalidArgument(message)) = batch_outcome(&bad_target, &episode) else { panic!() };
        assert!(message.contains("not-an-entity"), "{message}");
        let no_type = proto::EntityBatchResult {
            results: vec![success("1"), proto::OperationResult::default()],
            ..Default::default()
        };
        assert!(matches!(batch_outcome(&no_type, &episode), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn completions_map_by_status() {
        let complete = |status: i32, result: Option<&str>, failure: Option<proto::TaskFailureDetails>| {
            let response =
                response(vec![OrchestratorActionType::CompleteOrchestration(proto::CompleteOrchestrationAction {
                    orchestration_status: status,
                    result: result.map(str::to_string),
                    failure_details: failure,
                    carryover_events: vec![event_to_proto(
                        "i",
                        &HistoryEvent::new(at(3), EventKind::EventRaised { name: "E".into(), input: None }),
                    )],
                    ..Default::default()
                })]);
            outcome_from_response(&response, "i", "e", at(0)).map(|(outcome, _)| outcome.completion.unwrap())
        };
        assert_eq!(complete(1, Some("5"), None).unwrap(), Completion::Completed { output: Some("5".into()) });
        let failure = FailureDetails::new("builtins.ValueError", "no");
        assert_eq!(complete(3, Some(""), Some(failure_to_proto(&failure))).unwrap(), Completion::Failed { failure });
        assert_eq!(
            complete(5, Some("\"bye\""), None).unwrap(),
            Completion::Terminated { reason: Some("\"bye\"".into()) }
        );
        assert_eq!(
            complete(2, Some("8"), None).unwrap(),
            Completion::ContinuedAsNew {
                input: Some("8".into()),
                carryover_events: vec![HistoryEvent::new(
                    at(3),
                    EventKind::EventRaised { name: "E".into(), input: None }
                )],
                version: None,
            }
        );
        assert!(matches!(complete(0, None, None), Err(Error::InvalidArgument(_))), "RUNNING is no completion");
        assert!(matches!(complete(42, None, None), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn malformed_responses_are_refused_and_unsupported_ones_fail_the_orchestration() {
        let rewind = response(vec![OrchestratorActionType::RewindOrchestration(Default::default())]);
        let (outcome, _) = outcome_from_response(&rewind, "i", "e", at(0)).unwrap();
        let Some(Completion::Failed { failure }) = outcome.completion else { panic!("{outcome:?}") };
        assert_eq!(failure.error_type, UNSUPPORTED_ERROR_TYPE);
        let no_type = proto::OrchestratorResponse {
            actions: vec![OrchestratorAction { id: 1, orchestrator_action_type: None }],
            ..Default::default()
        };
        assert!(matches!(outcome_from_response(&no_type, "i", "e", at(0)), Err(Error::InvalidArgument(_))));
        let no_fire_at =
            response(vec![OrchestratorActionType::CreateTimer(proto::CreateTimerAction { fire_at: None })]);
        assert!(matches!(outcome_from_response(&no_fire_at, "i", "e", at(0)), Err(Error::InvalidArgument(_))));
        let entity = response(vec![OrchestratorActionType::SendEntityMessage(proto::SendEntityMessageAction {
            entity_message_type: None,
        })]);
        assert!(matches!(outcome_from_response(&entity, "i", "e", at(0)), Err(Error::InvalidArgument(_))));
        let big = "1".repeat(limits::MAX_PAYLOAD_BYTES + 1);
        let too_large = response(vec![OrchestratorActionType::ScheduleTask(proto::ScheduleTaskAction {
            name: "A".into(),
            input: Some(big),
            ..Default::default()
        })]);
        let (outcome, _) = outcome_from_response(&too_large, "i", "e", at(0)).unwrap();
        let Some(Completion::Failed { failure }) = outcome.completion else { panic!() };
        assert_eq!(failure.error_type, "PayloadTooLarge");
    }
}
