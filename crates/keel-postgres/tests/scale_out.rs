//! Scale-out on PostgreSQL with real processes: three worker processes share one task
//! hub and drain 2,000 instances (chains, fan-outs, parents with sub-orchestrations)
//! while 20 `Log` entities get 50 `append` signals each, in rounds (one value to every
//! entity, one entity after the other) sent as the work goes on; one worker is killed
//! with SIGKILL once a third of the activities have run, just as it runs an entity
//! operation, and another started; the rounds left are sent after the kill.
//!
//! Every instance must complete with the right output and no orchestrator decision
//! recorded twice; the activity executions are counted per activity (at least once;
//! more than once only where the killed worker ran it). Every entity must end with the
//! state `[0, 1, …, 49]`: each operation applied exactly once, in the order sent. The
//! runs of entity operations are logged too, committed or not: every run must have
//! found the state holding exactly the operations before it (one batch of an entity at
//! a time, across processes, in order), and an operation may have run more than once
//! only where the killed worker ran it. Skipped without `KEEL_TEST_POSTGRES_URL`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fleet::{self, Fleet};
use keel::Client;

const CHAINS: u32 = 1_600;
const FAN_OUTS: u32 = 300;
const PARENTS: u32 = 100;

/// Entities of the entity workload.
const ENTITIES: u32 = 20;
/// Operations (rounds of signals) per entity.
const OPERATIONS: u32 = 50;
/// The pause between two rounds of entity signals.
const ROUND_INTERVAL: Duration = Duration::from_millis(20);
/// Most rounds sent before the kill; the others are sent after it.
const MOST_ROUNDS_BEFORE_KILL: u32 = 40;

/// A worker process of this binary's tests (see `common::fleet`).
#[test]
#[ignore = "a worker process started by the multi-process tests"]
fn fleet_worker() {
    fleet::run_worker_process();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_drain_a_hub_and_survive_a_kill() {
    let Some(url) = common::postgres_url("three_workers_drain_a_hub_and_survive_a_kill") else { return };
    let schema = common::fresh_schema("keel_scale");
    let hub_url = common::hub_url(&url, &schema);
    let store = fleet::open_with_retries(&hub_url).await;
    let client = Client::new(store.clone());
    let began = Instant::now();
    let expected = fleet::start_workload(&client, CHAINS, FAN_OUTS, PARENTS).await;
    let started_in = began.elapsed();

    let mut fleet = Fleet::new(&hub_url);
    for name in ["w1", "w2", "w3"] {
        fleet.start_worker(name);
    }
    // Rounds of entity signals go out all along, from a task of their own, until the
    // kill (or until all but the last few are sent).
    let stop_sending = Arc::new(AtomicBool::new(false));
    let sender = tokio::spawn({
        let (client, stop_sending) = (client.clone(), stop_sending.clone());
        async move {
            let mut rounds = 0;
            while rounds < MOST_ROUNDS_BEFORE_KILL && !stop_sending.load(Ordering::SeqCst) {
                fleet::signal_round(&client, ENTITIES, rounds).await;
                rounds += 1;
                tokio::time::sleep(ROUND_INTERVAL).await;
            }
            rounds
        }
    });
    // Kill w1 once about a third of the activities have run and it has run its share...
    let activities: usize = expected.iter().map(|instance| instance.activities as usize).sum();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while fleet.executions().values().map(Vec::len).sum::<usize>() < activities / 3
        || fleet.executions_by("w1") < activities / 20
    {
        fleet.assert_all_running();
        assert!(tokio::time::Instant::now() < deadline, "the workers made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... just as it runs an entity operation: as soon as it logs one more (the line is
    // written before the operation's work and the batch's commit). Should it run none
    // for a second, it is killed all the same (the report says so).
    let w1_operations = fleet.operations_by("w1").len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut killed_in_an_operation = false;
    while tokio::time::Instant::now() < deadline {
        if fleet.operations_by("w1").len() > w1_operations {
            killed_in_an_operation = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    fleet.kill("w1");
    stop_sending.store(true, Ordering::SeqCst);
    let rounds_before_kill = sender.await.expect("the sender");
    let done_at_kill = fleet::completed_count(store.as_ref()).await;
    let executed_at_kill: usize = fleet.executions().values().map(Vec::len).sum();
    let applied_at_kill = fleet::operations_applied(&client, ENTITIES).await;
    let w1_operations = fleet.operations_by("w1").len();
    assert!(done_at_kill < expected.len(), "the kill came after everything was done; the test proves nothing");
    assert!(w1_operations > 0, "w1 ran no entity operation before the kill; the test proves nothing for entities");
    fleet.start_worker("w4");
    // The other rounds, a little apart, so that the survivors run them in several batches.
    for value in rounds_before_kill..OPERATIONS {
        fleet::signal_round(&client, ENTITIES, value).await;
        tokio::time::sleep(ROUND_INTERVAL).await;
    }

    let operations = (ENTITIES * OPERATIONS) as usize;
    fleet::wait_for_all(store.as_ref(), &mut fleet, expected.len(), Duration::from_secs(120)).await;
    let drained_in = began.elapsed();
    fleet::wait_for_operations(&client, &mut fleet, ENTITIES, operations, Duration::from_secs(60)).await;
    let entities_done_in = began.elapsed();
    assert_eq!(fleet::verify(&client, &expected).await, activities);

    // Activity executions: every activity at least once; more than once only where the
    // killed worker ran it (it may have died before its result was recorded).
    let executions = fleet.executions();
    let mut tasks_run: BTreeMap<&str, usize> = BTreeMap::new();
    let mut repeated = 0;
    let mut most_runs = 1;
    let mut instances_with_repeats = BTreeSet::new();
    for ((instance_id, task), workers) in &executions {
        *tasks_run.entry(instance_id.as_str()).or_default() += 1;
        if workers.len() > 1 {
            assert!(
                workers.iter().any(|worker| worker == "w1"),
                "{instance_id} task {task} ran {} times, by {workers:?}: only the killed worker's activities may \
                 run again",
                workers.len()
            );
            repeated += 1;
            most_runs = most_runs.max(workers.len());
            instances_with_repeats.insert(instance_id.as_str());
        }
    }
    for instance in &expected {
        let run = tasks_run.remove(instance.instance_id.as_str()).unwrap_or(0);
        assert_eq!(run, instance.activities as usize, "{}: activities that ran", instance.instance_id);
    }
    assert!(tasks_run.is_empty(), "activities ran for instances nobody started: {tasks_run:?}");
    let executed: usize = executions.values().map(Vec::len).sum();
    let entity_report = verify_entities(&client, &fleet).await;
    let repeats = if repeated == 0 {
        "no activity ran more than once (the killed worker's results were all recorded)".to_owned()
    } else {
        format!(
            "{} instances had an activity run again ({repeated} activities, at most {most_runs} runs of one), \
             each one the killed worker had run",
            instances_with_repeats.len()
        )
    };
    fleet::report(&format!(
        "scale-out: {} instances ({} started, {} of them parents with a child), {activities} activities; started in \
         {:.1} s, all completed {:.1} s after the start; w1 killed with SIGKILL after {executed_at_kill} activity \
         executions ({done_at_kill} instances complete), w4 started. Activity executions: {executed} for \
         {activities} activities; {} instances ran each activity exactly once; {repeats}. Executions per worker: \
         w1 {}, w2 {}, w3 {}, w4 {}",
        expected.len(),
        CHAINS + FAN_OUTS + PARENTS,
        PARENTS,
        started_in.as_secs_f64(),
        drained_in.as_secs_f64(),
        expected.len() - instances_with_repeats.len(),
        fleet.executions_by("w1"),
        fleet.executions_by("w2"),
        fleet.executions_by("w3"),
        fleet.executions_by("w4"),
    ));
    fleet::report(&format!(
        "scale-out entities: {ENTITIES} entities x {OPERATIONS} operations; {} sent until the kill (w1 killed {}, after \
         running {w1_operations}), {applied_at_kill} of them applied then, the rest sent after; all \
         applied {:.1} s after the start, every state exactly [0..{OPERATIONS}). {entity_report}. Operation runs \
         per worker: w1 {}, w2 {}, w3 {}, w4 {}",
        rounds_before_kill * ENTITIES,
        if killed_in_an_operation { "as it ran an operation" } else { "running no operation" },
        entities_done_in.as_secs_f64(),
        fleet.operations_by("w1").len(),
        fleet.operations_by("w2").len(),
        fleet.operations_by("w3").len(),
        fleet.operations_by("w4").len(),
    ));
    drop(fleet);
    drop(client);
    drop(store);
    let store = keel_postgres::PostgresStore::open(common::hub_options(&url, &schema)).await.expect("reopen");
    store.delete_task_hub().await.expect("delete");
}

/// Checks the entity workload: every entity's state is exactly `[0..OPERATIONS)`, every
/// logged run of an operation (committed or not) found the state holding exactly the
/// operations before it, and only operations the killed worker ran ran more than once.
/// Returns what the runs were, for the report.
async fn verify_entities(client: &Client, fleet: &Fleet) -> String {
    let in_order: Vec<u32> = (0..OPERATIONS).collect();
    for (n, state) in fleet::entity_states(client, ENTITIES).await.into_iter().enumerate() {
        assert_eq!(state, in_order, "entity {}: each operation applied once, in order", fleet::entity_key(n as u32));
    }
    let mut runs = fleet.operation_runs();
    let (mut total, mut repeated, mut most_runs) = (0, 0, 1);
    let mut entities_with_repeats = BTreeSet::new();
    for n in 0..ENTITIES {
        let key = fleet::entity_key(n);
        for value in 0..OPERATIONS {
            let operation_runs = runs.remove(&(key.clone(), value)).unwrap_or_default();
            assert!(!operation_runs.is_empty(), "{key}: operation {value} never ran");
            for run in &operation_runs {
                assert_eq!(
                    run.position, value as usize,
                    "{key}: operation {value} ran on a state of {} values ({run:?}, all runs {operation_runs:?})",
                    run.position
                );
            }
            if operation_runs.len() > 1 {
                assert!(
                    operation_runs.iter().any(|run| run.worker == "w1"),
                    "{key}: operation {value} ran {} times ({operation_runs:?}): only the killed worker's operations \
                     may run again",
                    operation_runs.len()
                );
                repeated += 1;
                most_runs = most_runs.max(operation_runs.len());
                entities_with_repeats.insert(key.clone());
            }
            total += operation_runs.len();
        }
    }
    assert!(runs.is_empty(), "operations ran that nobody sent: {runs:?}");
    let repeats = if repeated == 0 {
        "no operation ran again (the killed worker's batches were all committed)".to_owned()
    } else {
        format!(
            "{repeated} operations of {} entities ran again (at most {most_runs} runs of one), each one the killed \
             worker had run uncommitted",
            entities_with_repeats.len()
        )
    };
    format!(
        "Operation runs: {total} for {} operations, each on the state of exactly the operations before it; {repeats}",
        ENTITIES * OPERATIONS
    )
}
