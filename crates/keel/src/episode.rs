//! One orchestration episode: from a locked instance and its new messages to the
//! commit that records everything the orchestrator decided.
//!
//! This is where messages become history events, actions become activity items,
//! timer messages, sub-orchestration instances and events for other instances, and an
//! execution's end becomes the instance's status (and a message to its parent). The
//! store then commits it all in one transaction.

use std::collections::BTreeMap;

use keel_core::history::{EventKind, FailureDetails, HistoryEvent, RuntimeStatus, Timestamp};
use keel_core::limits;
use keel_core::replay::{rewind_history, EpisodeResult, Execution};
use keel_core::trace::TraceContext;
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
    Commit {
        commit: Box<EpisodeCommit>,
        execution: Option<Box<Execution>>,
        history_len: u64,
        /// What the episode's spans need, emitted once the commit is durable.
        spans: EpisodeSpans,
    },
    /// Nothing can run yet (a scheduled start is not due); give it back until then.
    Abandon { retry_at: Timestamp },
}

/// What the spans of a planned episode need: the execution is gone once it ends.
#[derive(Debug, Default)]
pub(crate) struct EpisodeSpans {
    /// The context of the execution's span (the parent of the episode's span).
    pub(crate) execution: Option<TraceContext>,
    /// Executions that ended in this episode (more than one after a continue-as-new).
    pub(crate) ended: Vec<EndedExecution>,
    /// Timers that fired in this episode.
    pub(crate) timers: Vec<keel_core::replay::FiredTimer>,
}

/// An execution that ended: its span runs from its start to now.
#[derive(Debug)]
pub(crate) struct EndedExecution {
    pub(crate) execution_id: String,
    /// The context its `ExecutionStarted` carried: the parent of its span.
    pub(crate) started_trace: Option<TraceContext>,
    pub(crate) started_at: Option<Timestamp>,
    pub(crate) status: RuntimeStatus,
    pub(crate) failure: Option<FailureDetails>,
}

impl EpisodeSpans {
    /// Collects what `execution` did in the episode that just ran on it.
    fn observe(&mut self, execution: &mut Execution) {
        if self.execution.is_none() {
            self.execution = execution.orchestration_trace().cloned();
        }
        self.timers.extend(execution.take_fired_timers());
    }

    /// Records that `execution` (with id `execution_id`) ended with `completion`.
    fn ended(&mut self, execution: &Execution, execution_id: &str, completion: &Completion) {
        let failure = match completion {
            Completion::Failed { failure } => Some(failure.clone()),
            _ => None,
        };
        self.ended.push(EndedExecution {
            execution_id: execution_id.to_string(),
            started_trace: execution.started_trace().cloned(),
            started_at: execution.started_at(),
            status: completion.status(),
            failure,
        });
    }
}

/// The execution to run an episode on, with the history it has not seen yet.
pub(crate) struct Resume {
    pub(crate) execution: Option<Box<Execution>>,
    /// History to replay into `execution` (all of it for a fresh execution).
    pub(crate) past: Vec<HistoryEvent>,
}

/// What an item's messages call for, before any orchestrator code runs.
enum Intake {
    /// Decided without running the orchestrator (dropped messages, poison, termination
    /// before the start, nothing due yet).
    Settled(Plan),
    /// Run an episode with these new events (starting with `OrchestratorStarted`);
    /// `unlocks` release locks granted to critical sections nobody waits for.
    Run { new_events: Vec<HistoryEvent>, unlocks: Vec<Message> },
    /// Rewind the failed instance: replay its history without the failures.
    Rewind { reason: Option<String> },
}

/// A commit for `item` that consumes all its messages and changes nothing else yet.
pub(crate) fn empty_commit(item: &OrchestrationItem) -> EpisodeCommit {
    EpisodeCommit {
        direct: None,
        lock: item.lock.clone(),
        consumed: item.messages.iter().map(|message| message.id).collect(),
        replace_history: None,
        history: Vec::new(),
        state: None,
        activities: Vec::new(),
        messages: Vec::new(),
        new_instances: Vec::new(),
    }
}

/// Sorts an item's messages into the episode's new events, or settles the item.
/// `history` is the instance's current history when the caller has it (it always has
/// it for a termination): with it, entity answers nobody waits for are dropped and lock
/// grants nobody waits for are given back.
fn intake(item: &OrchestrationItem, now: Timestamp, history: Option<&[HistoryEvent]>) -> Intake {
    let instance = &item.instance;
    let mut start = None;
    let mut rewind = None;
    let mut events = Vec::new();
    let mut unlocks = Vec::new();
    let waits = history.map(EntityWaits::of);
    // Suspend and resume take effect in order; one that would change nothing (a resume
    // of a running instance, a second suspend) is dropped, so no worker ever sees it.
    let mut suspended = instance.status == RuntimeStatus::Suspended;
    for stored in &item.messages {
        let message = &stored.message;
        match &message.event.kind {
            EventKind::ExecutionSuspended { .. } | EventKind::ExecutionResumed { .. } => {
                let suspends = matches!(message.event.kind, EventKind::ExecutionSuspended { .. });
                if suspends != suspended {
                    suspended = suspends;
                    events.push((false, message.event.clone()));
                }
            }
            EventKind::ExecutionStarted { execution_id, .. } => {
                if *execution_id == instance.execution_id && instance.history_len == 0 && start.is_none() {
                    start = Some(message.event.clone());
                }
            }
            EventKind::ExecutionRewound { reason } => rewind = Some(reason.clone()),
            EventKind::EntityLockGranted { critical_section_id, lock_set }
                if instance.status.is_terminal()
                    || waits.as_ref().is_some_and(|waits| !waits.sections.contains(critical_section_id)) =>
            {
                // The owner no longer waits for this lock (it ended, or moved on to a
                // new execution): give it back at once.
                unlocks
                    .extend(lock_set.iter().map(|target| unlock_message(instance, critical_section_id, target, now)));
            }
            EventKind::EntityOperationCompleted { request_id, .. }
            | EventKind::EntityOperationFailed { request_id, .. }
                if waits.as_ref().is_some_and(|waits| !waits.calls.contains(request_id)) => {}
            _ => {
                let stale = message.execution_id.as_ref().is_some_and(|id| *id != instance.execution_id);
                if !stale {
                    events.push((message.execution_id.is_some(), message.event.clone()));
                }
            }
        }
    }
    let settle = |commit: EpisodeCommit, history_len: u64| {
        Intake::Settled(Plan::Commit {
            commit: Box::new(commit),
            execution: None,
            history_len,
            spans: EpisodeSpans::default(),
        })
    };

    if let Some(reason) = rewind {
        // The store set a rewound failed instance to Pending; its history still ends
        // with the failure.
        if instance.status == RuntimeStatus::Pending && instance.failure.is_some() && instance.history_len > 0 {
            return Intake::Rewind { reason };
        }
    }
    if instance.status.is_terminal() {
        // Messages for a finished instance are dropped.
        let mut commit = empty_commit(item);
        commit.messages = unlocks;
        return settle(commit, instance.history_len);
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
        let mut commit = empty_commit(item);
        commit.history.push(HistoryEvent::new(now, EventKind::OrchestratorStarted));
        commit.history.extend(start);
        let completion = Completion::Failed { failure };
        commit.history.push(completion.to_history_event(now));
        finish(&mut commit, instance, instance.input.clone(), None, &completion, now);
        let history_len = instance.history_len + commit.history.len() as u64;
        return settle(commit, history_len);
    }
    let termination = events.iter().find_map(|(_, event)| match &event.kind {
        EventKind::ExecutionTerminated { reason } => Some(reason.clone()),
        _ => None,
    });
    if let Some(reason) = termination {
        // Termination needs no orchestrator code: it ends the execution here, whether it
        // has started, is suspended, or runs on a remote worker that is not connected.
        let mut commit = empty_commit(item);
        commit.history.push(HistoryEvent::new(now, EventKind::OrchestratorStarted));
        commit.history.extend(start);
        commit.history.extend(events.into_iter().map(|(_, event)| event));
        // The locks the execution holds or asked for are released: nobody else would.
        let held = keel_core::entity::unreleased_locks(history.unwrap_or_default().iter().chain(&commit.history));
        for (critical_section_id, targets) in held {
            for target in targets {
                let message = unlock_message(instance, &critical_section_id, &target, now);
                commit.history.push(HistoryEvent::new(now, message.event.kind.clone()));
                commit.messages.push(message);
            }
        }
        commit.messages.extend(unlocks);
        let completion = Completion::Terminated { reason };
        commit.history.push(completion.to_history_event(now));
        finish(&mut commit, instance, instance.input.clone(), None, &completion, now);
        let history_len = instance.history_len + commit.history.len() as u64;
        return settle(commit, history_len);
    }
    if instance.history_len == 0 && start.is_none() {
        // Not started yet (a scheduled start): nothing is due before then.
        let retry_at = instance.scheduled_start.filter(|at| *at > now).unwrap_or(now + chrono::Duration::seconds(1));
        return Intake::Settled(Plan::Abandon { retry_at });
    }
    if start.is_some() {
        // The first episode of an execution: the events a remote continue-as-new
        // carried over (sent for this execution) come before the events that arrived
        // while the previous execution's last episode was in flight.
        events.sort_by_key(|(for_this_execution, _)| !for_this_execution);
    }
    let mut new_events = vec![HistoryEvent::new(now, EventKind::OrchestratorStarted)];
    new_events.extend(start);
    new_events.extend(events.into_iter().map(|(_, event)| event));
    Intake::Run { new_events, unlocks }
}

/// The entity answers and lock grants an execution's history waits for.
struct EntityWaits {
    /// Request ids of the entity calls made.
    calls: std::collections::HashSet<String>,
    /// Critical sections requested and not released.
    sections: std::collections::HashSet<String>,
}

impl EntityWaits {
    fn of(history: &[HistoryEvent]) -> EntityWaits {
        let mut waits = EntityWaits { calls: Default::default(), sections: Default::default() };
        for event in history {
            match &event.kind {
                EventKind::EntityOperationCalled { request_id, .. } => {
                    waits.calls.insert(request_id.clone());
                }
                EventKind::EntityLockRequested { critical_section_id, .. } => {
                    waits.sections.insert(critical_section_id.clone());
                }
                EventKind::EntityUnlockSent { critical_section_id, .. } => {
                    waits.sections.remove(critical_section_id);
                }
                _ => {}
            }
        }
        waits
    }
}

/// The message that releases `instance`'s lock on `target` for a critical section.
fn unlock_message(instance: &InstanceRecord, critical_section_id: &str, target: &str, now: Timestamp) -> Message {
    Message {
        instance_id: target.to_string(),
        execution_id: None,
        event: HistoryEvent::new(
            now,
            EventKind::EntityUnlockSent {
                critical_section_id: critical_section_id.to_string(),
                parent_instance_id: instance.instance_id.clone(),
                target_instance_id: target.to_string(),
            },
        ),
        visible_at: now,
    }
}

/// The commit that fails an item's instance with `failure` without running its
/// orchestrator (a version this worker may not run); `None` when the item needs no
/// commit now (nothing due yet).
pub(crate) fn fail_before_running(
    item: &OrchestrationItem,
    history: &[HistoryEvent],
    failure: FailureDetails,
    now: Timestamp,
) -> Option<EpisodeCommit> {
    let instance = &item.instance;
    let (new_events, unlocks) = match intake(item, now, Some(history)) {
        Intake::Settled(Plan::Commit { commit, .. }) => return Some(*commit),
        Intake::Settled(Plan::Abandon { .. }) => return None,
        // A rewind of an instance this worker may not run is left to the failure below.
        Intake::Rewind { .. } => (vec![HistoryEvent::new(now, EventKind::OrchestratorStarted)], Vec::new()),
        Intake::Run { new_events, unlocks } => (new_events, unlocks),
    };
    let mut commit = empty_commit(item);
    commit.messages = unlocks;
    commit.history = new_events;
    let completion = Completion::Failed { failure };
    commit.history.push(completion.to_history_event(now));
    finish(&mut commit, instance, instance.input.clone(), None, &completion, now);
    Some(commit)
}

/// Plans the episode of one item, running its orchestrator in this process.
pub(crate) fn plan(registry: &Registry, item: &OrchestrationItem, resume: Resume, now: Timestamp) -> Plan {
    let instance = &item.instance;
    let history = resume.execution.is_none().then_some(resume.past.as_slice());
    let (new_events, unlocks) = match intake(item, now, history) {
        Intake::Settled(plan) => return plan,
        Intake::Rewind { reason } => return plan_rewind(registry, item, resume.past, reason, now),
        Intake::Run { new_events, unlocks } => (new_events, unlocks),
    };
    let mut commit = empty_commit(item);
    commit.messages = unlocks;
    let Some(orchestrator) = registry.orchestrator(&instance.name, instance.version.as_deref()) else {
        let failure = FailureDetails::new(
            NOT_REGISTERED_ERROR_TYPE,
            format!("no orchestrator named '{}' is registered on this worker", instance.name),
        );
        let completion = Completion::Failed { failure };
        commit.history = new_events;
        commit.history.push(completion.to_history_event(now));
        finish(&mut commit, instance, instance.input.clone(), None, &completion, now);
        let history_len = instance.history_len + commit.history.len() as u64;
        return Plan::Commit { commit: Box::new(commit), execution: None, history_len, spans: EpisodeSpans::default() };
    };
    let mut execution =
        resume.execution.unwrap_or_else(|| Box::new(Execution::new(&instance.instance_id, orchestrator.clone())));
    let result = execution.run_episode(&resume.past, &new_events);
    commit.history = new_events;
    apply_result(registry, commit, instance, execution, result, instance.history_len, now)
}

/// An episode handed to an orchestrator that runs outside this process (a worker
/// connected over the Durable Task gRPC protocol). The remote worker replays
/// `past_events`, applies `new_events` and answers with its actions, which
/// [`RemoteEpisode::complete`] turns into the commit.
#[derive(Clone, Debug)]
pub struct RemoteEpisode {
    /// The instance's row as it was when locked.
    pub instance: InstanceRecord,
    /// The instance's lock; the commit needs it.
    pub lock: keel_store::OrchestrationLock,
    /// The history to replay.
    pub past_events: Vec<HistoryEvent>,
    /// This episode's events, starting with `OrchestratorStarted`.
    pub new_events: Vec<HistoryEvent>,
    /// The commit so far: consumed messages, and for a rewind the rewritten history.
    commit: EpisodeCommit,
}

/// What a remote orchestrator decided in one episode.
#[derive(Clone, Debug, Default)]
pub struct RemoteOutcome {
    /// New actions, with the remote worker's sequence numbers.
    pub actions: Vec<Action>,
    /// Set when the execution ended in this episode.
    pub completion: Option<Completion>,
    /// The custom status after the episode, JSON text.
    pub custom_status: Option<String>,
    /// Trace contexts the worker gave its actions (by action id; the protocol's
    /// `parentTraceContext`); the others hang under the execution's span.
    pub traces: BTreeMap<i32, TraceContext>,
}

/// What to do with an item whose orchestrator runs elsewhere.
#[derive(Debug)]
pub enum RemoteIntake {
    /// Hand this to a remote worker.
    Run(Box<RemoteEpisode>),
    /// Settled without running the orchestrator: commit this.
    Commit(Box<EpisodeCommit>),
    /// Nothing is due yet: give the item back until then.
    Abandon {
        /// When the item is due again.
        retry_at: Timestamp,
    },
}

/// Prepares the episode of an item whose orchestrator runs in a remote worker.
/// `history` is the instance's current history.
pub fn prepare_remote(item: &OrchestrationItem, history: Vec<HistoryEvent>, now: Timestamp) -> RemoteIntake {
    let (past_events, new_events, mut commit) = match intake(item, now, Some(&history)) {
        Intake::Settled(Plan::Commit { commit, .. }) => return RemoteIntake::Commit(commit),
        Intake::Settled(Plan::Abandon { retry_at }) => return RemoteIntake::Abandon { retry_at },
        Intake::Run { new_events, unlocks } => {
            let mut commit = empty_commit(item);
            commit.messages = unlocks;
            (history, new_events, commit)
        }
        Intake::Rewind { reason } => {
            let past = rewind_history(&history);
            let new_events = vec![
                HistoryEvent::new(now, EventKind::OrchestratorStarted),
                HistoryEvent::new(now, EventKind::ExecutionRewound { reason }),
            ];
            let mut commit = empty_commit(item);
            commit.replace_history = Some(item.instance.execution_id.clone());
            commit.history = past.clone();
            (past, new_events, commit)
        }
    };
    commit.history.extend(new_events.iter().cloned());
    RemoteIntake::Run(Box::new(RemoteEpisode {
        instance: item.instance.clone(),
        lock: item.lock.clone(),
        past_events,
        new_events,
        commit,
    }))
}

impl RemoteEpisode {
    /// The commit that records a remote orchestrator's decisions.
    pub fn complete(self, outcome: RemoteOutcome, now: Timestamp) -> EpisodeCommit {
        self.complete_keeping_past(outcome, now).0
    }

    /// [`RemoteEpisode::complete`], giving back the past events too: with the commit's
    /// history they are the instance's history once the commit is durable.
    pub fn complete_keeping_past(self, outcome: RemoteOutcome, now: Timestamp) -> (EpisodeCommit, Vec<HistoryEvent>) {
        let RemoteEpisode { instance, past_events, new_events, mut commit, .. } = self;
        let execution_id = instance.execution_id.clone();
        let RemoteOutcome { mut actions, completion, custom_status, traces } = outcome;
        if completion.is_some() {
            let unlocks = unlocks_at_the_end(&instance.instance_id, &past_events, &new_events, &actions, now);
            actions.extend(unlocks);
        }
        let execution_trace = keel_core::trace::history_trace(past_events.iter().chain(&new_events));
        let action_traces = ActionTraces { execution: execution_trace.as_ref(), given: &traces };
        record_actions(&mut commit, &instance, &execution_id, actions, &action_traces, now);
        match completion {
            None => {
                let suspended =
                    past_events.iter().chain(&new_events).fold(false, |suspended, event| match event.kind {
                        EventKind::ExecutionSuspended { .. } => true,
                        EventKind::ExecutionResumed { .. } => false,
                        _ => suspended,
                    });
                let status = if suspended { RuntimeStatus::Suspended } else { RuntimeStatus::Running };
                commit.state = Some(InstanceUpdate {
                    status,
                    version: instance.version.clone(),
                    input: instance.input.clone(),
                    output: None,
                    failure: None,
                    custom_status,
                });
            }
            Some(Completion::ContinuedAsNew { input, carryover_events, version }) => {
                let version = version.or_else(|| instance.version.clone());
                let next = NextExecution {
                    input,
                    version,
                    carryover_events,
                    trace: keel_core::trace::started_trace(past_events.iter().chain(&new_events)),
                };
                start_next_execution(&mut commit, &instance, next, custom_status, now);
            }
            Some(mut completion) => {
                check_output_size(&mut completion);
                commit.history.push(completion.to_history_event(now));
                finish(&mut commit, &instance, instance.input.clone(), custom_status, &completion, now);
            }
        }
        (commit, past_events)
    }
}

/// What the next execution of a continue-as-new starts with.
struct NextExecution {
    input: Option<String>,
    version: Option<String>,
    /// Events the previous execution carried over (unprocessed external events).
    carryover_events: Vec<HistoryEvent>,
    /// The trace context the previous execution was started under; the next one's span
    /// hangs under it too.
    trace: Option<TraceContext>,
}

/// Ends the execution by continuing as new: a fresh, empty history and a start message
/// for the next execution (of `version`), which starts in its own episode (on a worker
/// that may run that version).
fn start_next_execution(
    commit: &mut EpisodeCommit,
    instance: &InstanceRecord,
    next: NextExecution,
    custom_status: Option<String>,
    now: Timestamp,
) {
    let NextExecution { input, version, carryover_events, trace } = next;
    let next_execution_id = uuid::Uuid::new_v4().simple().to_string();
    commit.replace_history = Some(next_execution_id.clone());
    commit.history = Vec::new();
    let start = HistoryEvent::new(
        now,
        EventKind::ExecutionStarted {
            name: instance.name.clone(),
            version: version.clone(),
            input: input.clone(),
            execution_id: next_execution_id.clone(),
            parent: instance.parent.clone(),
            scheduled_start: None,
            trace,
        },
    );
    for event in std::iter::once(start).chain(carryover_events) {
        commit.messages.push(Message {
            instance_id: instance.instance_id.clone(),
            execution_id: Some(next_execution_id.clone()),
            event,
            visible_at: now,
        });
    }
    commit.state = Some(InstanceUpdate {
        status: RuntimeStatus::Running,
        version,
        input,
        output: None,
        failure: None,
        custom_status,
    });
}

/// Unlocks for the entity locks an ending remote execution still holds or waits for
/// (the server ended it, or the worker did not release them): nobody else would release
/// them. The SDKs release their locks themselves, so this is usually empty; a Rust
/// execution releases its own in keel-core.
fn unlocks_at_the_end(
    instance_id: &str,
    past: &[HistoryEvent],
    new: &[HistoryEvent],
    actions: &[Action],
    now: Timestamp,
) -> Vec<Action> {
    let decided: Vec<HistoryEvent> = actions.iter().map(|action| action.to_history_event(now, None)).collect();
    let held = keel_core::entity::unreleased_locks(past.iter().chain(new).chain(&decided));
    let mut next_id =
        past.iter().chain(new).map(|event| event.event_id).chain(actions.iter().map(Action::id)).max().unwrap_or(0);
    let mut unlocks = Vec::new();
    for (critical_section_id, targets) in held {
        for target in targets {
            next_id += 1;
            unlocks.push(Action::UnlockEntity {
                id: next_id,
                critical_section_id: critical_section_id.clone(),
                target,
                parent_instance_id: instance_id.to_string(),
            });
        }
    }
    unlocks
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
    let mut spans = EpisodeSpans::default();
    for _ in 0..MAX_CONTINUE_AS_NEW_PER_EPISODE {
        spans.observe(&mut execution);
        let action_traces = ActionTraces { execution: execution.orchestration_trace(), given: &NO_GIVEN_TRACES };
        record_actions(&mut commit, instance, &execution_id, std::mem::take(&mut result.actions), &action_traces, now);
        match result.completion.take() {
            None => {
                let history_len = base_len + commit.history.len() as u64;
                let status = if result.suspended { RuntimeStatus::Suspended } else { RuntimeStatus::Running };
                commit.state = Some(InstanceUpdate {
                    status,
                    version: instance.version.clone(),
                    input,
                    output: None,
                    failure: None,
                    custom_status: result.custom_status,
                });
                return Plan::Commit { commit: Box::new(commit), execution: Some(execution), history_len, spans };
            }
            Some(Completion::ContinuedAsNew { input: next_input, carryover_events, version: Some(version) })
                if Some(&version) != instance.version.as_ref() =>
            {
                // Another version's code may have to run elsewhere: the next execution
                // starts in its own episode, like a remote one.
                spans.ended(
                    &execution,
                    &execution_id,
                    &Completion::ContinuedAsNew { input: None, carryover_events: Vec::new(), version: None },
                );
                let next = NextExecution {
                    input: next_input,
                    version: Some(version),
                    carryover_events,
                    trace: execution.started_trace().cloned(),
                };
                start_next_execution(&mut commit, instance, next, result.custom_status, now);
                return Plan::Commit { commit: Box::new(commit), execution: None, history_len: 0, spans };
            }
            Some(Completion::ContinuedAsNew { input: next_input, carryover_events, .. }) => {
                // A new execution with a fresh history starts right away.
                spans.ended(
                    &execution,
                    &execution_id,
                    &Completion::ContinuedAsNew { input: None, carryover_events: Vec::new(), version: None },
                );
                execution_id = uuid::Uuid::new_v4().simple().to_string();
                input = next_input;
                let trace = execution.started_trace().cloned();
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
                            trace,
                        },
                    ),
                ];
                history.extend(carryover_events);
                let orchestrator = registry
                    .orchestrator(&instance.name, instance.version.as_deref())
                    .expect("the orchestrator ran a moment ago")
                    .clone();
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
                spans.ended(&execution, &execution_id, &completion);
                return Plan::Commit { commit: Box::new(commit), execution: None, history_len, spans };
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
    spans.ended(&execution, &execution_id, &completion);
    Plan::Commit { commit: Box::new(commit), execution: None, history_len, spans }
}

/// Turns actions into history events and work: activity items, timer messages,
/// sub-orchestration instances, events for other instances.
fn record_actions(
    commit: &mut EpisodeCommit,
    instance: &InstanceRecord,
    execution_id: &str,
    actions: Vec<Action>,
    traces: &ActionTraces<'_>,
    now: Timestamp,
) {
    for action in actions {
        let trace = traces.of(action.id());
        commit.history.push(action.to_history_event(now, trace));
        // An activity takes its name and input along (a fan-out has a million).
        if let Action::ScheduleTask { id, name, input } = action {
            commit.activities.push(NewActivity {
                lease: None,
                instance_id: instance.instance_id.clone(),
                execution_id: execution_id.to_string(),
                task_id: id,
                name,
                input,
                trace: trace.cloned(),
            });
            continue;
        }
        match &action {
            Action::ScheduleTask { .. } => unreachable!("taken above"),
            Action::CreateTimer { id, fire_at } => commit.messages.push(Message {
                instance_id: instance.instance_id.clone(),
                execution_id: Some(execution_id.to_string()),
                event: HistoryEvent::new(*fire_at, EventKind::TimerFired { timer_id: *id, fire_at: *fire_at }),
                visible_at: *fire_at,
            }),
            Action::CreateSubOrchestration { id, name, instance_id, input } => commit.new_instances.push(NewInstance {
                instance_id: instance_id.clone(),
                execution_id: uuid::Uuid::new_v4().simple().to_string(),
                name: name.clone(),
                // A sub-orchestration runs the parent's version.
                version: instance.version.clone(),
                input: input.clone(),
                parent: Some(keel_core::history::ParentInstance {
                    instance_id: instance.instance_id.clone(),
                    execution_id: execution_id.to_string(),
                    name: instance.name.clone(),
                    task_scheduled_id: *id,
                }),
                scheduled_start: None,
                created_at: now,
                tags: Default::default(),
                trace: trace.cloned(),
            }),
            Action::SendEvent { instance_id, name, input, .. } => commit.messages.push(Message {
                instance_id: instance_id.clone(),
                execution_id: None,
                event: HistoryEvent::new(now, EventKind::EventRaised { name: name.clone(), input: input.clone() }),
                visible_at: now,
            }),
            Action::SignalEntity { target, scheduled_time, .. } => {
                let visible_at = scheduled_time.unwrap_or(now).max(now);
                commit.messages.push(entity_message(target, &action, trace, visible_at, now));
            }
            Action::CallEntity { target, .. } | Action::UnlockEntity { target, .. } => {
                commit.messages.push(entity_message(target, &action, trace, now, now));
            }
            Action::LockEntities { lock_set, .. } => {
                // The request starts at the first entity of the sorted set.
                if let Some(first) = lock_set.first() {
                    commit.messages.push(entity_message(first, &action, trace, now, now));
                }
            }
        }
    }
}

/// The trace contexts an episode's actions hang under: the execution's span, unless a
/// remote worker gave an action a context of its own (an SDK's client span).
struct ActionTraces<'a> {
    execution: Option<&'a TraceContext>,
    given: &'a BTreeMap<i32, TraceContext>,
}

/// No action has a context of its own.
static NO_GIVEN_TRACES: BTreeMap<i32, TraceContext> = BTreeMap::new();

impl ActionTraces<'_> {
    fn of(&self, action_id: i32) -> Option<&TraceContext> {
        self.given.get(&action_id).or(self.execution)
    }
}

/// The message that carries an entity action to its entity: the same event the
/// orchestration's history records.
fn entity_message(
    target: &str,
    action: &Action,
    trace: Option<&TraceContext>,
    visible_at: Timestamp,
    now: Timestamp,
) -> Message {
    let HistoryEvent { kind, .. } = action.to_history_event(now, trace);
    Message { instance_id: target.to_string(), execution_id: None, event: HistoryEvent::new(now, kind), visible_at }
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
        Completion::Terminated { reason } => (reason.as_deref().map(termination_output), None),
        Completion::ContinuedAsNew { .. } => unreachable!("continue-as-new starts a new execution"),
    };
    commit.state = Some(InstanceUpdate {
        status: completion.status(),
        version: instance.version.clone(),
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

/// A termination's output: the JSON value it carries, unchanged. A plain-text reason
/// (written by a Keel before termination outputs were JSON) becomes a JSON string.
fn termination_output(reason: &str) -> String {
    match serde_json::from_str::<serde::de::IgnoredAny>(reason) {
        Ok(_) => reason.to_string(),
        Err(_) => serde_json::to_string(reason).expect("a string always serializes"),
    }
}

/// What the end of `instance`'s execution by a termination tells others, when it ends
/// without an episode (a start that replaces it): a sub-orchestration's parent hears that
/// it was terminated, and the entities whose locks `history` holds are released.
pub(crate) fn termination_notices(instance: &InstanceRecord, history: &[HistoryEvent], now: Timestamp) -> Vec<Message> {
    let mut commit = EpisodeCommit {
        direct: None,
        lock: keel_store::OrchestrationLock { instance_id: instance.instance_id.clone(), token: String::new() },
        consumed: Vec::new(),
        replace_history: None,
        history: Vec::new(),
        state: None,
        activities: Vec::new(),
        messages: Vec::new(),
        new_instances: Vec::new(),
    };
    for (critical_section_id, targets) in keel_core::entity::unreleased_locks(history.iter()) {
        for target in targets {
            commit.messages.push(unlock_message(instance, &critical_section_id, &target, now));
        }
    }
    finish(&mut commit, instance, None, None, &Completion::Terminated { reason: None }, now);
    commit.messages
}

/// Rewinds a failed instance: replays its history without the failures and runs on.
fn plan_rewind(
    registry: &Registry,
    item: &OrchestrationItem,
    history: Vec<HistoryEvent>,
    reason: Option<String>,
    now: Timestamp,
) -> Plan {
    let instance = &item.instance;
    let mut commit = empty_commit(item);
    let Some(orchestrator) = registry.orchestrator(&instance.name, instance.version.as_deref()) else {
        // Nothing to rewind with on this worker: leave the instance as it is.
        return Plan::Commit {
            commit: Box::new(commit),
            execution: None,
            history_len: instance.history_len,
            spans: EpisodeSpans::default(),
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use keel_store::{OrchestrationLock, StoredMessage};

    fn at(millis: i64) -> Timestamp {
        chrono::DateTime::from_timestamp_millis(millis).unwrap()
    }

    fn raised(name: &str) -> HistoryEvent {
        HistoryEvent::new(at(1), EventKind::EventRaised { name: name.into(), input: None })
    }

    #[test]
    fn a_remote_execution_that_ends_holding_locks_releases_them() {
        let history = vec![
            HistoryEvent::new(at(0), EventKind::OrchestratorStarted),
            HistoryEvent::new(
                at(0),
                EventKind::ExecutionStarted {
                    trace: None,
                    name: "O".into(),
                    version: None,
                    input: None,
                    execution_id: "e".into(),
                    parent: None,
                    scheduled_start: None,
                },
            ),
            HistoryEvent::with_id(
                1,
                at(0),
                EventKind::EntityLockRequested {
                    critical_section_id: "cs".into(),
                    lock_set: vec!["@a@1".into(), "@a@2".into()],
                    position: 0,
                    parent_instance_id: "o".into(),
                },
            ),
        ];
        let item = OrchestrationItem {
            lock: OrchestrationLock { instance_id: "o".into(), token: "l".into() },
            instance: InstanceRecord {
                instance_id: "o".into(),
                name: "O".into(),
                version: None,
                execution_id: "e".into(),
                status: RuntimeStatus::Running,
                input: None,
                output: None,
                custom_status: None,
                failure: None,
                parent: None,
                scheduled_start: None,
                created_at: at(0),
                last_updated_at: at(0),
                completed_at: None,
                history_len: history.len() as u64,
                tags: Default::default(),
            },
            messages: vec![StoredMessage {
                id: 1,
                message: Message {
                    instance_id: "o".into(),
                    execution_id: None,
                    event: HistoryEvent::new(at(1), EventKind::EventRaised { name: "go".into(), input: None }),
                    visible_at: at(1),
                },
            }],
            delivery_attempts: 1,
        };
        let RemoteIntake::Run(episode) = prepare_remote(&item, history, at(2)) else { panic!() };
        // The worker released one of the two locks itself, then completed.
        let released = Action::UnlockEntity {
            id: 2,
            critical_section_id: "cs".into(),
            target: "@a@1".into(),
            parent_instance_id: "o".into(),
        };
        let completed = Some(Completion::Completed { output: None });
        let outcome = RemoteOutcome {
            actions: vec![released.clone()],
            completion: completed.clone(),
            custom_status: None,
            traces: Default::default(),
        };
        let commit = episode.clone().complete(outcome, at(2));
        let unlocked: Vec<(&str, i32)> = commit
            .history
            .iter()
            .filter_map(|event| match &event.kind {
                EventKind::EntityUnlockSent { target_instance_id, .. } => {
                    Some((target_instance_id.as_str(), event.event_id))
                }
                _ => None,
            })
            .collect();
        assert_eq!(unlocked, [("@a@1", 2), ("@a@2", 3)], "the lock the worker kept is released under the next id");
        let sent: Vec<&str> = commit.messages.iter().map(|message| message.instance_id.as_str()).collect();
        assert_eq!(sent, ["@a@1", "@a@2"]);
        // A worker that released everything itself gets nothing more.
        let all = vec![
            released,
            Action::UnlockEntity {
                id: 3,
                critical_section_id: "cs".into(),
                target: "@a@2".into(),
                parent_instance_id: "o".into(),
            },
        ];
        let commit = episode.complete(
            RemoteOutcome { actions: all, completion: completed, custom_status: None, traces: Default::default() },
            at(2),
        );
        assert_eq!(commit.messages.len(), 2);
    }

    #[test]
    fn events_carried_over_by_a_remote_continue_as_new_come_before_later_ones() {
        let instance = InstanceRecord {
            instance_id: "i".into(),
            name: "Collect".into(),
            version: None,
            execution_id: "next".into(),
            status: RuntimeStatus::Running,
            input: None,
            output: None,
            custom_status: None,
            failure: None,
            parent: None,
            scheduled_start: None,
            created_at: at(0),
            last_updated_at: at(0),
            completed_at: None,
            history_len: 0,
            tags: Default::default(),
        };
        let start = HistoryEvent::new(
            at(1),
            EventKind::ExecutionStarted {
                trace: None,
                name: "Collect".into(),
                version: None,
                input: None,
                execution_id: "next".into(),
                parent: None,
                scheduled_start: None,
            },
        );
        // Arrival order: an event raised while the last episode of the previous
        // execution was in flight, then what that episode's commit sent.
        let messages = [(None, raised("late")), (Some("next"), start.clone()), (Some("next"), raised("carried"))];
        let item = OrchestrationItem {
            lock: OrchestrationLock { instance_id: "i".into(), token: "t".into() },
            instance,
            messages: messages
                .into_iter()
                .enumerate()
                .map(|(id, (execution_id, event))| StoredMessage {
                    id: id as i64,
                    message: Message {
                        instance_id: "i".into(),
                        execution_id: execution_id.map(str::to_string),
                        event,
                        visible_at: at(1),
                    },
                })
                .collect(),
            delivery_attempts: 1,
        };
        let RemoteIntake::Run(episode) = prepare_remote(&item, Vec::new(), at(2)) else { panic!("the episode runs") };
        let kinds: Vec<&EventKind> = episode.new_events.iter().map(|event| &event.kind).collect();
        assert_eq!(
            kinds,
            vec![&EventKind::OrchestratorStarted, &start.kind, &raised("carried").kind, &raised("late").kind]
        );
    }
}
