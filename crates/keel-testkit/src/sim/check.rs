//! The invariants a run must keep, read from the task hub once every process is dead:
//! - every instance reaches the outcome its plan computes (status and output);
//! - no timer fires before its time (by the clock of the episode that sees it);
//! - no decision is recorded twice (`TaskScheduled`, `TimerCreated` and the other
//!   decision events have unique event ids in a history), each result is recorded
//!   once and answers a decision of the history;
//! - activities ran at least once for each result recorded (the world's count);
//! - every accepted suspend and resume took effect, in order, and a rewind left its
//!   `ExecutionRewound`;
//! - every history replays cleanly against the code (`Worker::verify`);
//! - entities applied each operation exactly once (a signal whose send failed
//!   ambiguously and was sent again at most as often as it was sent), in order, and no
//!   lock outlived its orchestration;
//! - no instance exists that the workload did not start, except sub-orchestrations,
//!   which all complete.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use keel::verify::VerifyFilter;
use keel::{Client, EntityId, EventKind, HistoryEvent, InstanceQuery, RuntimeStatus, Worker};
use keel_store::{InstanceRecord, Store};
use serde_json::Value;

use crate::sim::functions::{World, COUNTER};
use crate::sim::workload::{counter_key, Expected, Plan, Workload};
use crate::sim::Violation;

/// Waits (virtual time, until `deadline`) for every planned instance to finish, the
/// log entity to hold all `log_signals` values and the critical sections' entities to
/// be unlocked; what did not happen is reported by [`check`].
pub(super) async fn settle(
    observer: &Client,
    workload: &Workload,
    log: &EntityId,
    log_signals: u32,
    deadline: tokio::time::Instant,
) {
    for planned in &workload.instances {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let _ = observer.wait_for_completion(&planned.instance_id, left).await;
    }
    // A critical section's unlocks reach its entities after the orchestration ended.
    let counters: Vec<EntityId> = workload
        .instances
        .iter()
        .filter(|planned| matches!(planned.plan, Plan::Tally { locked: true, .. }))
        .map(|planned| EntityId::new(COUNTER, &counter_key(&planned.instance_id)).expect("a valid entity id"))
        .collect();
    let mut changes = observer.store().notifications().subscribe_instance_changes();
    loop {
        changes.borrow_and_update();
        let values: HashSet<u32> = log_state(observer, log).await.into_iter().collect();
        let mut unlocked = true;
        for counter in &counters {
            unlocked &= !matches!(observer.get_entity(counter).await, Ok(Some(entity)) if entity.locked_by.is_some());
        }
        if (values.len() >= log_signals as usize && unlocked) || tokio::time::Instant::now() >= deadline {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
    }
}

async fn log_state(observer: &Client, log: &EntityId) -> Vec<u32> {
    match observer.get_entity(log).await {
        Ok(Some(entity)) => entity.state_as::<Vec<u32>>().unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// What [`check`] needs.
pub(super) struct Inputs<'a> {
    pub seed: u64,
    pub store: &'a Arc<dyn Store>,
    /// A worker (never started) with the simulation's code, for the replays.
    pub verifier: &'a Worker,
    pub world: &'a World,
    pub workload: &'a Workload,
    pub log: &'a EntityId,
    /// How many times each `append` was sent.
    pub log_tries: &'a [u32],
    /// Sabotage: expect a wrong output of the first chain.
    pub wrong_expectation: bool,
}

/// What [`check`] found.
pub(super) struct Checked {
    pub instances: u64,
    pub entities: u64,
    pub violations: Vec<Violation>,
}

struct Findings {
    seed: u64,
    violations: Vec<Violation>,
}

impl Findings {
    fn add(&mut self, instance: &str, message: impl Into<String>) {
        self.violations.push(Violation {
            seed: self.seed,
            instance: Some(instance.to_string()),
            message: message.into(),
        });
    }
}

/// Checks every invariant; the store must be quiet (every process dead).
pub(super) async fn check(inputs: Inputs<'_>) -> Checked {
    let mut findings = Findings { seed: inputs.seed, violations: Vec::new() };
    let store = inputs.store.as_ref();
    let all = match all_instances(store).await {
        Ok(all) => all,
        Err(error) => {
            findings.add("(task hub)", format!("the instances cannot be listed: {error}"));
            return Checked { instances: 0, entities: 0, violations: findings.violations };
        }
    };
    let planned: HashMap<&str, &Plan> =
        inputs.workload.instances.iter().map(|planned| (planned.instance_id.as_str(), &planned.plan)).collect();
    let first_chain = inputs
        .workload
        .instances
        .iter()
        .find(|planned| matches!(planned.plan, Plan::Chain { .. }))
        .map(|planned| planned.instance_id.as_str());

    for planned_instance in &inputs.workload.instances {
        let id = planned_instance.instance_id.as_str();
        if !all.iter().any(|record| record.instance_id == id) {
            findings.add(id, "the instance does not exist");
        }
    }
    for record in &all {
        let id = record.instance_id.as_str();
        let history = match store.read_history(id).await {
            Ok(history) => history,
            Err(error) => {
                findings.add(id, format!("the history cannot be read: {error}"));
                continue;
            }
        };
        match planned.get(id) {
            Some(plan) => {
                let mut expected = plan.expected(id);
                if inputs.wrong_expectation && Some(id) == first_chain {
                    if let Expected::Completed(Value::Number(number)) = &expected {
                        expected = Expected::Completed(Value::from(number.as_u64().unwrap_or(0) + 1));
                    }
                }
                check_outcome(&mut findings, record, &expected);
                check_commands(&mut findings, record, plan, &history);
            }
            None if record.parent.is_some() => {
                if record.status != RuntimeStatus::Completed {
                    findings.add(id, format!("a sub-orchestration ended {}: {:?}", record.status, record.failure));
                }
            }
            None => findings.add(id, "an instance the workload did not start"),
        }
        check_history(&mut findings, inputs.world, record, &history);
    }

    let statuses = VerifyFilter { statuses: RuntimeStatus::ALL.to_vec(), ..VerifyFilter::default() };
    match inputs.verifier.verify(&statuses).await {
        Ok(report) => {
            for instance in report.diverged() {
                findings.add(&instance.instance_id, format!("the history does not replay: {}", instance.verdict));
            }
        }
        Err(error) => findings.add("(task hub)", format!("the replay check could not run: {error}")),
    }

    let entities = check_entities(&mut findings, &inputs).await;
    Checked { instances: all.len() as u64, entities, violations: findings.violations }
}

async fn all_instances(store: &dyn Store) -> keel_store::Result<Vec<InstanceRecord>> {
    keel_store::query_all_instances(store, InstanceQuery { page_size: 1000, ..InstanceQuery::default() }).await
}

fn output_of(record: &InstanceRecord) -> Option<Value> {
    record.output.as_deref().and_then(|output| serde_json::from_str(output).ok())
}

fn check_outcome(findings: &mut Findings, record: &InstanceRecord, expected: &Expected) {
    let id = &record.instance_id;
    let output = output_of(record);
    let holds = match expected {
        Expected::Completed(value) => record.status == RuntimeStatus::Completed && output.as_ref() == Some(value),
        Expected::Terminated(value) => record.status == RuntimeStatus::Terminated && output.as_ref() == Some(value),
        Expected::Failed(error_type) => {
            record.status == RuntimeStatus::Failed
                && record.failure.as_ref().is_some_and(|failure| failure.error_type == *error_type)
        }
    };
    if !holds {
        findings.add(
            id,
            format!(
                "expected {expected:?}, found {} with output {:?} and failure {:?}",
                record.status, record.output, record.failure
            ),
        );
    }
}

/// The accepted management commands took effect, in order.
fn check_commands(findings: &mut Findings, record: &InstanceRecord, plan: &Plan, history: &[HistoryEvent]) {
    let id = &record.instance_id;
    let suspensions: Vec<&str> = history
        .iter()
        .map(|event| event.kind.type_name())
        .filter(|kind| *kind == "ExecutionSuspended" || *kind == "ExecutionResumed")
        .collect();
    let expected = plan.expected_suspensions();
    if suspensions != expected {
        let kinds: Vec<&str> = history.iter().map(|event| event.kind.type_name()).collect();
        findings.add(
            id,
            format!("suspend/resume took effect as {suspensions:?}, accepted as {expected:?}; history: {kinds:?}"),
        );
    }
    if matches!(plan, Plan::Rewind { .. })
        && !history.iter().any(|event| matches!(event.kind, EventKind::ExecutionRewound { .. }))
    {
        findings.add(id, "the accepted rewind left no ExecutionRewound");
    }
}

/// No decision twice, each result once and for a decision of the history, and every
/// activity result from an execution.
fn check_history(findings: &mut Findings, world: &World, record: &InstanceRecord, history: &[HistoryEvent]) {
    let id = &record.instance_id;
    let mut decisions = HashSet::new();
    for event in history.iter().filter(|event| event.kind.is_decision()) {
        if !decisions.insert(event.event_id) {
            findings.add(id, format!("decision #{} ({}) recorded twice", event.event_id, event.kind.type_name()));
        }
    }
    let scheduled: HashSet<i32> = history
        .iter()
        .filter(|event| matches!(event.kind, EventKind::TaskScheduled { .. }))
        .map(|event| event.event_id)
        .collect();
    let timers: HashSet<i32> = history
        .iter()
        .filter(|event| matches!(event.kind, EventKind::TimerCreated { .. }))
        .map(|event| event.event_id)
        .collect();
    let created: HashMap<i32, keel::Timestamp> = history
        .iter()
        .filter_map(|event| match event.kind {
            EventKind::TimerCreated { fire_at } => Some((event.event_id, fire_at)),
            _ => None,
        })
        .collect();
    let mut episode_started = None;
    let mut results = HashSet::new();
    for event in history {
        if let EventKind::OrchestratorStarted = event.kind {
            episode_started = Some(event.timestamp);
        }
        if let EventKind::TimerFired { timer_id, fire_at } = &event.kind {
            if created.get(timer_id).is_some_and(|set_for| set_for != fire_at) {
                findings.add(id, format!("timer #{timer_id} fired for {fire_at}, not the time it was set for"));
            }
            if episode_started.is_some_and(|started| started < *fire_at) {
                findings.add(
                    id,
                    format!("timer #{timer_id} set for {fire_at} fired early, in an episode of {episode_started:?}"),
                );
            }
        }
        let (kind, decision, known) = match &event.kind {
            EventKind::TaskCompleted { task_scheduled_id, .. } | EventKind::TaskFailed { task_scheduled_id, .. } => {
                let key = (id.clone(), record.execution_id.clone(), *task_scheduled_id);
                if world.executions(&key) == 0 {
                    findings
                        .add(id, format!("a result of task #{task_scheduled_id} that no activity execution produced"));
                }
                ("task", *task_scheduled_id, scheduled.contains(task_scheduled_id))
            }
            EventKind::TimerFired { timer_id, .. } => ("timer", *timer_id, timers.contains(timer_id)),
            EventKind::SubOrchestrationInstanceCompleted { task_scheduled_id, .. }
            | EventKind::SubOrchestrationInstanceFailed { task_scheduled_id, .. } => {
                ("sub-orchestration", *task_scheduled_id, decisions.contains(task_scheduled_id))
            }
            _ => continue,
        };
        if !results.insert((kind, decision)) {
            findings.add(id, format!("the result of {kind} #{decision} recorded twice"));
        }
        if !known {
            findings.add(id, format!("a result of {kind} #{decision}, which the history never decided"));
        }
    }
}

async fn check_entities(findings: &mut Findings, inputs: &Inputs<'_>) -> u64 {
    let client = Client::new(inputs.store.clone());
    let mut checked = 0;
    for planned in &inputs.workload.instances {
        let Plan::Tally { adds, .. } = &planned.plan else { continue };
        let counter = EntityId::new(COUNTER, &counter_key(&planned.instance_id)).expect("a valid entity id");
        checked += 1;
        match client.get_entity(&counter).await {
            Ok(Some(entity)) => {
                let expected: i64 = adds.iter().sum();
                if entity.state_as::<i64>().ok() != Some(expected) {
                    findings.add(&counter.to_string(), format!("state {:?}, expected {expected}", entity.state));
                }
                if entity.locked_by.is_some() || entity.backlog > 0 {
                    findings.add(
                        &counter.to_string(),
                        format!("still locked by {:?} with {} waiting", entity.locked_by, entity.backlog),
                    );
                }
            }
            Ok(None) => findings.add(&counter.to_string(), "the entity does not exist"),
            Err(error) => findings.add(&counter.to_string(), format!("the entity cannot be read: {error}")),
        }
    }
    if !inputs.log_tries.is_empty() {
        checked += 1;
        let log = inputs.log.to_string();
        let state: Vec<u32> = match client.get_entity(inputs.log).await {
            Ok(Some(entity)) => entity.state_as().unwrap_or_default(),
            Ok(None) => Vec::new(),
            Err(error) => {
                findings.add(&log, format!("the entity cannot be read: {error}"));
                return checked;
            }
        };
        let mut counts: HashMap<u32, u32> = HashMap::new();
        let mut first_seen = Vec::new();
        for value in &state {
            let count = counts.entry(*value).or_default();
            if *count == 0 {
                first_seen.push(*value);
            }
            *count += 1;
        }
        for (value, tries) in inputs.log_tries.iter().enumerate() {
            let applied = counts.get(&(value as u32)).copied().unwrap_or(0);
            if applied == 0 || applied > *tries {
                findings.add(&log, format!("append {value} applied {applied} times, sent {tries} times"));
            }
        }
        let in_order: Vec<u32> = (0..inputs.log_tries.len() as u32).collect();
        if first_seen != in_order {
            findings.add(&log, format!("operations applied out of order: {state:?}"));
        }
    }
    checked
}
