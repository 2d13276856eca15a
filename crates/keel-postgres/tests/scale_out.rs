//! Scale-out on PostgreSQL with real processes: three worker processes share one task
//! hub and drain 2,000 instances (chains, fan-outs, parents with sub-orchestrations);
//! one worker is killed with SIGKILL halfway and another started. Every instance must
//! complete with the right output and no orchestrator decision recorded twice; the
//! activity executions are counted per activity (at least once; more than once only
//! where the killed worker ran it). Skipped without `KEEL_TEST_POSTGRES_URL`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::fleet::{self, Fleet};
use keel::Client;

const CHAINS: u32 = 1_600;
const FAN_OUTS: u32 = 300;
const PARENTS: u32 = 100;

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
    // Kill w1 once about a third of the activities have run and it has run its share.
    let activities: usize = expected.iter().map(|instance| instance.activities as usize).sum();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while fleet.executions().values().map(Vec::len).sum::<usize>() < activities / 3
        || fleet.executions_by("w1") < activities / 20
    {
        fleet.assert_all_running();
        assert!(tokio::time::Instant::now() < deadline, "the workers made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fleet.kill("w1");
    let done_at_kill = fleet::completed_count(store.as_ref()).await;
    let executed_at_kill: usize = fleet.executions().values().map(Vec::len).sum();
    assert!(done_at_kill < expected.len(), "the kill came after everything was done; the test proves nothing");
    fleet.start_worker("w4");

    fleet::wait_for_all(store.as_ref(), &mut fleet, expected.len(), Duration::from_secs(120)).await;
    let drained_in = began.elapsed();
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
    drop(fleet);
    drop(client);
    drop(store);
    let store = keel_postgres::PostgresStore::open(common::hub_options(&url, &schema)).await.expect("reopen");
    store.delete_task_hub().await.expect("delete");
}
