//! One orchestration episode: from a locked instance and its new messages to the
//! commit that records everything the orchestrator decided.
//!
//! This is where messages become history events, actions become activity items,
//! timer messages, sub-orchestration instances and events for other instances, and an
//! execution's end becomes the instance's status (and a message to its parent). The
//! store then commits it all in one transaction.

use keel_core::history::{EventKind, FailureDetails, HistoryEvent, RuntimeStatus, Timestamp};
use keel_core::limits;
use keel_core::replay::{rewind_history, EpisodeResult, Execution};
use keel_core::{Action, Completion};
use keel_store::{EpisodeCommit, InstanceRecord, InstanceUpdate, Message, NewActivity, NewInstance, OrchestrationItem};

use crate::registry::Registry;

/// Error type of an instance whose work item kept crashing its workers.
pub const POISON_ERROR_TYPE: &str = "PoisonMessage";

/// Error type of an instance whose orchestrator is not registered.
pub const NOT_REGISTERED_ERROR_TYPE: &str = "OrchestratorNotRegistered";

/// What to do with a fetched orchestration item.
pub(crate) enum Plan {
    /// Commit this; keep the execution (if any) for the next episode.
    Commit { commit: Box<EpisodeCommit>, execution: Option<Box<Execution>>, history_len: u64 },
    /// Nothing can run yet (a scheduled start is not due); give it back until then.
    Abandon { retry_at: Timestamp },
}

/// The execution to run an episode on, with the history it has not seen yet.
pub(crate) struct Resume {
    pub(crate) execution: Option<Box<Execution>>,
    /// History to replay into `execution` (all of it for a fresh execution).
    pub(crate) past: Vec<HistoryEvent>,
}

/// Plans the episode of one item.
pub(crate) fn plan(registry: &Registry, item: &OrchestrationItem, resume: Resume, now: Timestamp) -> Plan {
    let instance = &item.instance;
    let consumed: Vec<i64> = item.messages.iter().map(|message| message.id).collect();
    let mut commit = EpisodeCommit {
        lock: item.lock.clone(),
        consumed,
        replace_history: None,
        history: Vec::new(),
        state: None,
        activities: Vec::new(),
        messages: Vec::new(),
        new_instances: Vec::new(),
    };

    let mut start = None;
    let mut rewind = None;
    let mut events = Vec::new();
    for stored in &item.messages {
        let message = &stored.message;
        match &message.event.kind {
            EventKind::ExecutionStarted { execution_id, .. } => {
                if *execution_id == instance.execution_id && instance.history_len == 0 && start.is_none() {
                    start = Some(message.event.clone());
                }
            }
            EventKind::ExecutionRewound { reason } => rewind = Some(reason.clone()),
            _ => {
                let stale = message.execution_id.as_ref().is_some_and(|id| *id != instance.execution_id);
                if !stale {
                    events.push(message.event.clone());
                }
            }
        }
    }

    if let Some(reason) = rewind {
        // The store set a rewound failed instance to Pending; its history still ends
        // with the failure.
        let rewindable = instance.status == RuntimeStatus::Pending && instance.failure.is_some();
        if rewindable && instance.history_len > 0 {
            return plan_rewind(registry, instance, commit, resume.past, reason, now);
        }
    }
    if instance.status.is_terminal() {
        // Messages for a finished instance are dropped.
        return Plan::Commit { commit: Box::new(commit), execution: None, history_len: instance.history_len };
    }

    if item.delivery_attempts > limits::MAX_DELIVERY_ATTEMPTS {
        let failure = FailureDetails::new(
            POISON_ERROR_TYPE,
            format!(
                "the orchestration was picked up {} times without finishing an episode (its worker crashed or \
                 hung each time); it was failed to protect the task hub",
                item.delivery_attempts - 1
            ),
        );
        let mut history = vec![HistoryEvent::new(now, EventKind::OrchestratorStarted)];
        history.extend(start);
        let completion = Completion::Failed { failure };
        history.push(completion.to_history_event(now));
        commit.history = history;
        finish(&mut commit, instance, instance.input.clone(), None, &completion, now);
        return Plan::Commit { commit: Box::new(commit), execution: None, history_len: 0 };
    }

    if instance.history_len == 0 && start.is_none() {
        // Not started yet (a scheduled start): only termination can happen now.
        if let Some(reason) = events.iter().find_map(|event| match &event.kind {
            EventKind::ExecutionTerminated { reason } => Some(reason.clone()),
            _ => None,
        }) {
            let completion = Completion::Terminated { reason };
            commit.history = vec![completion.to_history_event(now)];
            finish(&mut commit, instance, instance.input.clone(), None, &completion, now);
            return Plan::Commit { commit: Box::new(commit), execution: None, history_len: 1 };
        }
        let retry_at = instance.scheduled_start.filter(|at| *at > now).unwrap_or(now + chrono::Duration::seconds(1));
        return Plan::Abandon { retry_at };
    }

    let Some(orchestrator) = registry.orchestrator(&instance.name) else {
        let failure = FailureDetails::new(
            NOT_REGISTERED_ERROR_TYPE,
            format!("no orchestrator named '{}' is registered on this worker", instance.name),
        );
        let completion = Completion::Failed { failure };
        let mut history = vec![HistoryEvent::new(now, EventKind::OrchestratorStarted)];
        history.extend(start);
        history.push(completion.to_history_event(now));
        commit.history = history;
        finish(&mut commit, instance, instance.input.clone(), None, &completion, now);
        return Plan::Commit { commit: Box::new(commit), execution: None, history_len: instance.history_len };
    };

    let mut new_events = vec![HistoryEvent::new(now, EventKind::OrchestratorStarted)];
    new_events.extend(start);
    new_events.extend(events);

    let mut execution =
        resume.execution.unwrap_or_else(|| Box::new(Execution::new(&instance.instance_id, orchestrator.clone())));
    let result = execution.run_episode(&resume.past, &new_events);
    commit.history = new_events;
    apply_result(registry, commit, instance, execution, result, instance.history_len, now)
}

/// Most executions one episode may start by continuing as new: an orchestrator that
/// continues as new at once, forever, would otherwise never let its episode end.
const MAX_CONTINUE_AS_NEW_PER_EPISODE: usize = 100;

/// Records an episode's result in the commit; a continue-as-new starts the next
/// execution in the same commit. `base_len` is the history length before `commit.history`.
fn apply_result(
    registry: &Registry,
    mut commit: EpisodeCommit,
    instance: &InstanceRecord,
    mut execution: Box<Execution>,
    mut result: EpisodeResult,
    mut base_len: u64,
    now: Timestamp,
) -> Plan {
    let mut execution_id = instance.execution_id.clone();
    let mut input = instance.input.clone();
    for _ in 0..MAX_CONTINUE_AS_NEW_PER_EPISODE {
        record_actions(&mut commit, instance, &execution_id, &result.actions, now);
        match result.completion.take() {
            None => {
                let history_len = base_len + commit.history.len() as u64;
                let status = if result.suspended { RuntimeStatus::Suspended } else { RuntimeStatus::Running };
                commit.state = Some(InstanceUpdate {
                    status,
                    input,
                    output: None,
                    failure: None,
                    custom_status: result.custom_status,
                });
                return Plan::Commit { commit: Box::new(commit), execution: Some(execution), history_len };
            }
            Some(Completion::ContinuedAsNew { input: next_input, carryover_events }) => {
                // A new execution with a fresh history starts right away.
                execution_id = uuid::Uuid::new_v4().to_string();
                input = next_input;
                let mut history = vec![
                    HistoryEvent::new(now, EventKind::OrchestratorStarted),
                    HistoryEvent::new(
                        now,
                        EventKind::ExecutionStarted {
                            name: instance.name.clone(),
                            version: instance.version.clone(),
                            input: input.clone(),
                            execution_id: execution_id.clone(),
                            parent: instance.parent.clone(),
                            scheduled_start: None,
                        },
                    ),
                ];
                history.extend(carryover_events);
                let orchestrator =
                    registry.orchestrator(&instance.name).expect("the orchestrator ran a moment ago").clone();
                execution = Box::new(Execution::new(&instance.instance_id, orchestrator));
                result = execution.run_episode(&[], &history);
                commit.replace_history = Some(execution_id.clone());
                commit.history = history;
                base_len = 0;
            }
            Some(mut completion) => {
                check_output_size(&mut completion);
                commit.history.push(completion.to_history_event(now));
                let history_len = base_len + commit.history.len() as u64;
                finish(&mut commit, instance, input, result.custom_status, &completion, now);
                return Plan::Commit { commit: Box::new(commit), execution: None, history_len };
            }
        }
    }
    let completion = Completion::Failed {
        failure: FailureDetails::new(
            "ContinueAsNewLoop",
            format!(
                "the orchestrator continued as new {MAX_CONTINUE_AS_NEW_PER_EPISODE} times in one episode without \
                 waiting for anything"
            ),
        ),
    };
    commit.history.push(completion.to_history_event(now));
    let history_len = base_len + commit.history.len() as u64;
    finish(&mut commit, instance, input, None, &completion, now);
    Plan::Commit { commit: Box::new(commit), execution: None, history_len }
}

/// Turns actions into history events and work: activity items, timer messages,
/// sub-orchestration instances, events for other instances.
fn record_actions(
    commit: &mut EpisodeCommit,
    instance: &InstanceRecord,
    execution_id: &str,
    actions: &[Action],
    now: Timestamp,
) {
    for action in actions {
        commit.history.push(action.to_history_event(now));
        match action {
            Action::ScheduleTask { id, name, input } => commit.activities.push(NewActivity {
                instance_id: instance.instance_id.clone(),
                execution_id: execution_id.to_string(),
                task_id: *id,
                name: name.clone(),
                input: input.clone(),
            }),
            Action::CreateTimer { id, fire_at } => commit.messages.push(Message {
                instance_id: instance.instance_id.clone(),
                execution_id: Some(execution_id.to_string()),
                event: HistoryEvent::new(*fire_at, EventKind::TimerFired { timer_id: *id, fire_at: *fire_at }),
                visible_at: *fire_at,
            }),
            Action::CreateSubOrchestration { id, name, instance_id, input } => commit.new_instances.push(NewInstance {
                instance_id: instance_id.clone(),
                execution_id: uuid::Uuid::new_v4().to_string(),
                name: name.clone(),
                version: None,
                input: input.clone(),
                parent: Some(keel_core::history::ParentInstance {
                    instance_id: instance.instance_id.clone(),
                    execution_id: execution_id.to_string(),
                    name: instance.name.clone(),
                    task_scheduled_id: *id,
                }),
                scheduled_start: None,
                created_at: now,
            }),
            Action::SendEvent { instance_id, name, input, .. } => commit.messages.push(Message {
                instance_id: instance_id.clone(),
                execution_id: None,
                event: HistoryEvent::new(now, EventKind::EventRaised { name: name.clone(), input: input.clone() }),
                visible_at: now,
            }),
        }
    }
}

/// An output over the payload limit fails the instance instead.
fn check_output_size(completion: &mut Completion) {
    if let Completion::Completed { output } = completion {
        if let Err(message) = limits::check_payload("the orchestration output", output.as_deref()) {
            *completion = Completion::Failed { failure: FailureDetails::new("PayloadTooLarge", message) };
        }
    }
}

/// Sets the final state of an ended execution and tells the parent, if any.
fn finish(
    commit: &mut EpisodeCommit,
    instance: &InstanceRecord,
    input: Option<String>,
    custom_status: Option<String>,
    completion: &Completion,
    now: Timestamp,
) {
    let (output, failure) = match completion {
        Completion::Completed { output } => (output.clone(), None),
        Completion::Failed { failure } => (None, Some(failure.clone())),
        Completion::Terminated { reason } => (reason.as_ref().map(|reason| json_string(reason)), None),
        Completion::ContinuedAsNew { .. } => unreachable!("continue-as-new starts a new execution"),
    };
    commit.state = Some(InstanceUpdate {
        status: completion.status(),
        input,
        output: output.clone(),
        failure: failure.clone(),
        custom_status: custom_status.or_else(|| instance.custom_status.clone()),
    });
    if let Some(parent) = &instance.parent {
        let kind = match (completion, failure) {
            (Completion::Completed { .. }, _) => EventKind::SubOrchestrationInstanceCompleted {
                task_scheduled_id: parent.task_scheduled_id,
                result: output,
            },
            (_, Some(failure)) => {
                EventKind::SubOrchestrationInstanceFailed { task_scheduled_id: parent.task_scheduled_id, failure }
            }
            _ => EventKind::SubOrchestrationInstanceFailed {
                task_scheduled_id: parent.task_scheduled_id,
                failure: FailureDetails::new(
                    "SubOrchestrationTerminated",
                    format!("sub-orchestration '{}' was terminated", instance.instance_id),
                ),
            },
        };
        commit.messages.push(Message {
            instance_id: parent.instance_id.clone(),
            execution_id: Some(parent.execution_id.clone()),
            event: HistoryEvent::new(now, kind),
            visible_at: now,
        });
    }
}

/// A reason text as the JSON string that the output field holds.
fn json_string(text: &str) -> String {
    serde_json::to_string(text).expect("a string always serializes")
}

/// Rewinds a failed instance: replays its history without the failures and runs on.
fn plan_rewind(
    registry: &Registry,
    instance: &InstanceRecord,
    mut commit: EpisodeCommit,
    history: Vec<HistoryEvent>,
    reason: Option<String>,
    now: Timestamp,
) -> Plan {
    let Some(orchestrator) = registry.orchestrator(&instance.name) else {
        // Nothing to rewind with on this worker: leave the instance as it is.
        return Plan::Commit { commit: Box::new(commit), execution: None, history_len: instance.history_len };
    };
    let past = rewind_history(&history);
    let new_events = vec![
        HistoryEvent::new(now, EventKind::OrchestratorStarted),
        HistoryEvent::new(now, EventKind::ExecutionRewound { reason }),
    ];
    let mut execution = Box::new(Execution::new(&instance.instance_id, orchestrator.clone()));
    let result = execution.run_episode(&past, &new_events);
    commit.replace_history = Some(instance.execution_id.clone());
    commit.history = past;
    commit.history.extend(new_events);
    apply_result(registry, commit, instance, execution, result, 0, now)
}
