//! The JSON shapes of the Durable Functions HTTP API: the instance status object (with
//! Keel's additions), the history view of `showHistory`, the entity status of entity
//! lists, and the management URLs of a check-status response.

use keel::{EntityMetadata, EventKind, FailureDetails, HistoryEvent, InstanceStatus, RuntimeStatus, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Times in status objects: `yyyy-MM-ddTHH:mm:ssZ`, second precision.
pub(crate) fn status_time(time: Timestamp) -> String {
    time.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Times in history events and entity lists: ISO 8601 with milliseconds.
pub(crate) fn event_time(time: Timestamp) -> String {
    time.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// A stored JSON payload as a JSON value; text that is not JSON stays a string.
pub(crate) fn payload_value(text: Option<&str>) -> Value {
    match text {
        None => Value::Null,
        Some(text) => serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string())),
    }
}

/// Which parts of an instance a status object shows.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StatusView {
    pub show_input: bool,
    pub show_history: bool,
    pub show_history_output: bool,
}

impl Default for StatusView {
    fn default() -> StatusView {
        StatusView { show_input: true, show_history: false, show_history_output: false }
    }
}

/// The status object of an instance, in Durable Functions' field order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StatusObject {
    name: String,
    instance_id: String,
    runtime_status: &'static str,
    input: Value,
    custom_status: Value,
    output: Value,
    created_time: String,
    last_updated_time: String,
    /// Keel addition: the instance's tags (from an SDK's start), when it has any.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    tags: std::collections::BTreeMap<String, String>,
    /// Keel addition: the orchestration version the instance runs, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    history_events: Option<Vec<Value>>,
}

/// The status object of an instance, with its history when the view asks for it.
pub(crate) fn status_object(
    status: &InstanceStatus,
    history: Option<&[HistoryEvent]>,
    view: StatusView,
) -> StatusObject {
    let output = match (&status.failure, status.status) {
        (Some(failure), RuntimeStatus::Failed) => failure_camel_case(failure),
        _ => payload_value(status.output.as_deref()),
    };
    StatusObject {
        name: status.name.clone(),
        instance_id: status.instance_id.clone(),
        runtime_status: status.status.as_str(),
        input: if view.show_input { payload_value(status.input.as_deref()) } else { Value::Null },
        custom_status: payload_value(status.custom_status.as_deref()),
        output,
        created_time: status_time(status.created_at),
        last_updated_time: status_time(status.last_updated_at),
        tags: status.tags.clone(),
        version: status.version.clone(),
        history_events: view
            .show_history
            .then(|| history.map(|history| history_events(history, view)).unwrap_or_default()),
    }
}

/// An entity in a list (`DurableEntityStatus`): its id, the time of its last operation
/// and, when the list fetches states, its state (`null` when it has none).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EntityStatus {
    entity_id: EntityIdObject,
    last_operation_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<Value>,
}

/// `{"name": "counter", "key": "c1"}`: the name as stored (lower case).
#[derive(Serialize)]
struct EntityIdObject {
    name: String,
    key: String,
}

/// The list entry of an entity; the state only with `fetch_state`.
pub(crate) fn entity_status(entity: &EntityMetadata, fetch_state: bool) -> EntityStatus {
    EntityStatus {
        entity_id: EntityIdObject { name: entity.id.name.clone(), key: entity.id.key.clone() },
        last_operation_time: event_time(entity.last_modified),
        state: fetch_state.then(|| payload_value(entity.state.as_deref())),
    }
}

/// Failure details as the `output` of a failed instance shows them (camelCase, like
/// the rest of the status object).
fn failure_camel_case(failure: &FailureDetails) -> Value {
    let mut object = Map::new();
    object.insert("errorType".into(), json!(failure.error_type));
    object.insert("errorMessage".into(), json!(failure.error_message));
    if let Some(stack_trace) = &failure.stack_trace {
        object.insert("stackTrace".into(), json!(stack_trace));
    }
    if let Some(inner) = &failure.inner_failure {
        object.insert("innerFailure".into(), failure_camel_case(inner));
    }
    object.insert("isNonRetriable".into(), json!(failure.is_non_retriable));
    Value::Object(object)
}

/// Failure details inside history events (PascalCase, as DTFx serializes them).
fn failure_pascal_case(failure: &FailureDetails) -> Value {
    let mut object = Map::new();
    object.insert("ErrorType".into(), json!(failure.error_type));
    object.insert("ErrorMessage".into(), json!(failure.error_message));
    object.insert("StackTrace".into(), json!(failure.stack_trace));
    object.insert("InnerFailure".into(), failure.inner_failure.as_deref().map_or(Value::Null, failure_pascal_case));
    object.insert("IsNonRetriable".into(), json!(failure.is_non_retriable));
    Value::Object(object)
}

/// The history as Durable Functions shows it: DTFx events in PascalCase with
/// `EventType` and `Timestamp`; `OrchestratorStarted` removed; each scheduling event
/// that has its outcome merged into the outcome's row (`FunctionName`,
/// `ScheduledTime`, `Input`); results only with `showHistoryOutput`; payload inputs
/// only with `showInput`.
pub(crate) fn history_events(history: &[HistoryEvent], view: StatusView) -> Vec<Value> {
    let outcome_of = |event: &HistoryEvent| match &event.kind {
        EventKind::TaskCompleted { task_scheduled_id, .. }
        | EventKind::TaskFailed { task_scheduled_id, .. }
        | EventKind::SubOrchestrationInstanceCompleted { task_scheduled_id, .. }
        | EventKind::SubOrchestrationInstanceFailed { task_scheduled_id, .. } => Some(*task_scheduled_id),
        _ => None,
    };
    let answered: std::collections::HashSet<i32> = history.iter().filter_map(outcome_of).collect();
    let scheduled = |id: i32| {
        history.iter().find(|event| {
            event.event_id == id
                && matches!(
                    event.kind,
                    EventKind::TaskScheduled { .. } | EventKind::SubOrchestrationInstanceCreated { .. }
                )
        })
    };
    let input = |text: &Option<String>| if view.show_input { payload_value(text.as_deref()) } else { Value::Null };
    let result = |text: &Option<String>| view.show_history_output.then(|| payload_value(text.as_deref()));

    let mut rows = Vec::with_capacity(history.len());
    for event in history {
        let mut row = Map::new();
        row.insert("EventType".into(), json!(event.kind.type_name()));
        match &event.kind {
            EventKind::OrchestratorStarted => continue,
            EventKind::TaskScheduled { .. } | EventKind::SubOrchestrationInstanceCreated { .. }
                if answered.contains(&event.event_id) =>
            {
                continue
            }
            EventKind::ExecutionStarted { name, version: _, input: started_input, scheduled_start, .. } => {
                row.insert("FunctionName".into(), json!(name));
                row.insert("Input".into(), input(started_input));
                if let Some(start) = scheduled_start {
                    row.insert("ScheduledStartTime".into(), json!(event_time(*start)));
                }
            }
            EventKind::ExecutionCompleted { status, result: completed_result, failure } => {
                row.insert("OrchestrationStatus".into(), json!(status.as_str()));
                if let Some(result) = result(completed_result) {
                    row.insert("Result".into(), result);
                }
                if let Some(failure) = failure {
                    row.insert("FailureDetails".into(), failure_pascal_case(failure));
                }
            }
            EventKind::ExecutionTerminated { reason } => {
                row.insert("Input".into(), payload_value(reason.as_deref()));
            }
            EventKind::TaskScheduled { name, input: task_input, .. } => {
                row.insert("Name".into(), json!(name));
                row.insert("Input".into(), input(task_input));
            }
            EventKind::SubOrchestrationInstanceCreated { name, instance_id, input: child_input, .. } => {
                row.insert("Name".into(), json!(name));
                row.insert("InstanceId".into(), json!(instance_id));
                row.insert("Input".into(), input(child_input));
            }
            EventKind::TaskCompleted { task_scheduled_id, result: task_result }
            | EventKind::SubOrchestrationInstanceCompleted { task_scheduled_id, result: task_result } => {
                merge_scheduling(&mut row, scheduled(*task_scheduled_id), view);
                if let Some(result) = result(task_result) {
                    row.insert("Result".into(), result);
                }
            }
            EventKind::TaskFailed { task_scheduled_id, failure }
            | EventKind::SubOrchestrationInstanceFailed { task_scheduled_id, failure } => {
                merge_scheduling(&mut row, scheduled(*task_scheduled_id), view);
                row.insert("Reason".into(), json!(failure.error_message));
                row.insert("Details".into(), json!(failure.to_string()));
                row.insert("FailureDetails".into(), failure_pascal_case(failure));
            }
            EventKind::TimerCreated { fire_at } | EventKind::TimerFired { fire_at, .. } => {
                row.insert("FireAt".into(), json!(event_time(*fire_at)));
            }
            EventKind::EventSent { instance_id, name, input: sent } => {
                row.insert("InstanceId".into(), json!(instance_id));
                row.insert("Name".into(), json!(name));
                row.insert("Input".into(), input(sent));
            }
            EventKind::EventRaised { name, input: raised } => {
                row.insert("Name".into(), json!(name));
                row.insert("Input".into(), input(raised));
            }
            EventKind::ContinueAsNew { input: next } => {
                row.insert("Input".into(), input(next));
            }
            EventKind::ExecutionSuspended { reason }
            | EventKind::ExecutionResumed { reason }
            | EventKind::ExecutionRewound { reason } => {
                row.insert("Reason".into(), json!(reason));
            }
            EventKind::EntityOperationSignaled {
                request_id,
                operation,
                input: sent,
                scheduled_time,
                target_instance_id,
                ..
            } => {
                row.insert("RequestId".into(), json!(request_id));
                row.insert("Operation".into(), json!(operation));
                row.insert("TargetInstanceId".into(), json!(target_instance_id));
                row.insert("Input".into(), input(sent));
                if let Some(at) = scheduled_time {
                    row.insert("ScheduledTime".into(), json!(event_time(*at)));
                }
            }
            EventKind::EntityOperationCalled { request_id, operation, input: sent, target_instance_id, .. } => {
                row.insert("RequestId".into(), json!(request_id));
                row.insert("Operation".into(), json!(operation));
                row.insert("TargetInstanceId".into(), json!(target_instance_id));
                row.insert("Input".into(), input(sent));
            }
            EventKind::EntityOperationCompleted { request_id, output } => {
                row.insert("RequestId".into(), json!(request_id));
                if let Some(result) = result(output) {
                    row.insert("Result".into(), result);
                }
            }
            EventKind::EntityOperationFailed { request_id, failure } => {
                row.insert("RequestId".into(), json!(request_id));
                row.insert("FailureDetails".into(), failure_pascal_case(failure));
            }
            EventKind::EntityLockRequested { critical_section_id, lock_set, .. } => {
                row.insert("CriticalSectionId".into(), json!(critical_section_id));
                row.insert("LockSet".into(), json!(lock_set));
            }
            EventKind::EntityLockGranted { critical_section_id, .. } => {
                row.insert("CriticalSectionId".into(), json!(critical_section_id));
            }
            EventKind::EntityUnlockSent { critical_section_id, target_instance_id, .. } => {
                row.insert("CriticalSectionId".into(), json!(critical_section_id));
                row.insert("TargetInstanceId".into(), json!(target_instance_id));
            }
        }
        row.insert("Timestamp".into(), json!(event_time(event.timestamp)));
        rows.push(Value::Object(row));
    }
    rows
}

/// Adds what the scheduling event of an outcome said: `FunctionName`, `ScheduledTime`
/// and (with `showInput`) `Input`.
fn merge_scheduling(row: &mut Map<String, Value>, scheduling: Option<&HistoryEvent>, view: StatusView) {
    let Some(scheduling) = scheduling else { return };
    let (name, input) = match &scheduling.kind {
        EventKind::TaskScheduled { name, input, .. }
        | EventKind::SubOrchestrationInstanceCreated { name, input, .. } => (name, input),
        _ => return,
    };
    row.insert("FunctionName".into(), json!(name));
    row.insert("ScheduledTime".into(), json!(event_time(scheduling.timestamp)));
    if view.show_input {
        row.insert("Input".into(), payload_value(input.as_deref()));
    }
}

/// The management URLs of one instance, as `CreateCheckStatusResponse` and
/// `CreateHttpManagementPayload` return them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpManagementPayload {
    /// The instance id.
    pub id: String,
    /// `GET`: the instance's status.
    pub status_query_get_uri: String,
    /// `POST` with the event data as body: raises the event `{eventName}`.
    pub send_event_post_uri: String,
    /// `POST`: terminates the instance with the reason `{text}`.
    pub terminate_post_uri: String,
    /// `DELETE`: purges the finished instance and its history.
    pub purge_history_delete_uri: String,
    /// `POST`: starts the instance again with its original input.
    pub restart_post_uri: String,
    /// `POST`: suspends the instance with the reason `{text}`.
    pub suspend_post_uri: String,
    /// `POST`: resumes the suspended instance with the reason `{text}`.
    pub resume_post_uri: String,
    /// `POST`: rewinds the failed instance with the reason `{text}`. Only in the
    /// management payload, not in a check-status response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewind_post_uri: Option<String>,
}

impl HttpManagementPayload {
    /// The URLs of `instance_id` on the API at `base_url` (`http://host:port`); the
    /// query carries the task hub and, when set, the API key. `{eventName}` and
    /// `{text}` are placeholders for the caller to fill in, as in Durable Functions.
    pub fn new(base_url: &str, instance_id: &str, task_hub: &str, api_key: Option<&str>) -> HttpManagementPayload {
        let instance = format!("{base_url}{}/instances/{}", crate::MANAGEMENT_BASE_PATH, percent_encode(instance_id));
        let mut common = format!("taskHub={}&connection=Storage", percent_encode(task_hub));
        if let Some(key) = api_key {
            common.push_str("&code=");
            common.push_str(&percent_encode(key));
        }
        HttpManagementPayload {
            id: instance_id.to_string(),
            status_query_get_uri: format!("{instance}?{common}"),
            send_event_post_uri: format!("{instance}/raiseEvent/{{eventName}}?{common}"),
            terminate_post_uri: format!("{instance}/terminate?reason={{text}}&{common}"),
            purge_history_delete_uri: format!("{instance}?{common}"),
            restart_post_uri: format!("{instance}/restart?{common}"),
            suspend_post_uri: format!("{instance}/suspend?reason={{text}}&{common}"),
            resume_post_uri: format!("{instance}/resume?reason={{text}}&{common}"),
            rewind_post_uri: Some(format!("{instance}/rewind?reason={{text}}&{common}")),
        }
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use chrono::DateTime;

    use super::*;

    fn at(second: i64) -> Timestamp {
        DateTime::from_timestamp(1_700_000_000 + second, 0).unwrap()
    }

    fn chain_history() -> Vec<HistoryEvent> {
        vec![
            HistoryEvent::new(at(0), EventKind::OrchestratorStarted),
            HistoryEvent::new(
                at(0),
                EventKind::ExecutionStarted {
                    trace: None,
                    name: "HelloCities".into(),
                    version: None,
                    input: None,
                    execution_id: "e1".into(),
                    parent: None,
                    scheduled_start: None,
                },
            ),
            HistoryEvent::with_id(
                0,
                at(0),
                EventKind::TaskScheduled {
                    trace: None,
                    name: "SayHello".into(),
                    input: Some("\"Tokyo\"".into()),
                    tags: Default::default(),
                },
            ),
            HistoryEvent::new(at(1), EventKind::OrchestratorStarted),
            HistoryEvent::new(
                at(1),
                EventKind::TaskCompleted { task_scheduled_id: 0, result: Some("\"Hello Tokyo!\"".into()) },
            ),
            HistoryEvent::with_id(
                1,
                at(1),
                EventKind::TaskScheduled {
                    trace: None,
                    name: "SayHello".into(),
                    input: Some("\"Oslo\"".into()),
                    tags: Default::default(),
                },
            ),
        ]
    }

    #[test]
    fn scheduled_tasks_merge_into_their_outcome_and_episode_starts_vanish() {
        let view = StatusView { show_input: true, show_history: true, show_history_output: true };
        let rows = history_events(&chain_history(), view);
        let types: Vec<&str> = rows.iter().map(|row| row["EventType"].as_str().unwrap()).collect();
        assert_eq!(types, ["ExecutionStarted", "TaskCompleted", "TaskScheduled"]);
        assert_eq!(rows[0]["FunctionName"], "HelloCities");
        assert_eq!(rows[1]["FunctionName"], "SayHello");
        assert_eq!(rows[1]["Result"], "Hello Tokyo!");
        assert_eq!(rows[1]["Input"], "Tokyo");
        assert_eq!(rows[1]["ScheduledTime"], "2023-11-14T22:13:20.000Z");
        assert_eq!(rows[1]["Timestamp"], "2023-11-14T22:13:21.000Z");
        assert!(rows[1].get("TaskScheduledId").is_none());
        assert_eq!(rows[2]["Name"], "SayHello", "a task still running keeps its own row");
    }

    #[test]
    fn results_need_show_history_output_and_inputs_show_input() {
        let view = StatusView { show_input: false, show_history: true, show_history_output: false };
        let rows = history_events(&chain_history(), view);
        assert!(rows[1].get("Result").is_none());
        assert!(rows[1].get("Input").is_none());
        assert_eq!(rows[0]["Input"], Value::Null);
    }

    #[test]
    fn management_urls_encode_the_id_and_carry_the_key() {
        let payload = HttpManagementPayload::new("http://localhost:7071", "a b", "keel", Some("k&1"));
        assert_eq!(
            payload.status_query_get_uri,
            "http://localhost:7071/runtime/webhooks/durabletask/instances/a%20b?taskHub=keel&connection=Storage&code=k%261"
        );
        assert_eq!(
            payload.terminate_post_uri,
            "http://localhost:7071/runtime/webhooks/durabletask/instances/a%20b/terminate?reason={text}&taskHub=keel&connection=Storage&code=k%261"
        );
        assert!(payload.send_event_post_uri.contains("/raiseEvent/{eventName}?"));
    }
}
