//! The crash test: a worker process is killed with SIGKILL in the middle of many
//! instances; a new worker on the same SQLite file finishes every one of them, with
//! the right outputs and no orchestrator decision recorded twice. Run with leases of
//! 2 s, and again with leases of 10 minutes: the work the killed process held is taken
//! over when its death is noticed, not when its leases run out.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use keel::{
    Activity, ActivityContext, Client, EventKind, InstanceQuery, Never, Orchestration, OrchestrationContext,
    OrchestrationError, RuntimeStatus, StartOptions, WorkerOptions,
};
use keel_testkit::process::ChildTest;

/// Set in the child process: the path of the task hub to work on.
const CHILD_HUB_ENV: &str = "KEEL_CRASH_TEST_HUB";
/// Set in the child process: its workers' leases, in seconds.
const CHILD_LEASE_ENV: &str = "KEEL_CRASH_TEST_LEASE";

/// Leases no test waits for: work held under them must be released otherwise.
const LONG_LEASE: Duration = Duration::from_secs(600);

const CHAINS: u32 = 60;
const CHAIN_LENGTH: u32 = 6;
const FAN_OUTS: u32 = 10;
const FAN_OUT_WIDTH: u32 = 12;

const CHAIN: Orchestration<u32, u32> = Orchestration::new("Chain");
const FAN_OUT: Orchestration<u32, u32> = Orchestration::new("FanOut");
const ADD_ONE: Activity<u32, u32, Never> = Activity::new("AddOne");

async fn chain(ctx: OrchestrationContext, start: u32) -> Result<u32, OrchestrationError> {
    let mut value = start;
    for _ in 0..CHAIN_LENGTH {
        value = ctx.call(ADD_ONE, &value).await?;
    }
    Ok(value)
}

async fn fan_out(ctx: OrchestrationContext, base: u32) -> Result<u32, OrchestrationError> {
    let results = ctx.when_all((0..FAN_OUT_WIDTH).map(|i| ctx.call(ADD_ONE, &(base + i)))).await;
    let mut sum = 0;
    for result in results {
        sum += result?;
    }
    Ok(sum)
}

async fn add_one(_ctx: ActivityContext, value: u32) -> Result<u32, Never> {
    tokio::time::sleep(Duration::from_millis(25)).await;
    Ok(value + 1)
}

fn crash_worker(store: std::sync::Arc<dyn keel_store::Store>, lease: Duration) -> keel::Worker {
    let options = WorkerOptions {
        max_concurrent_activities: 8,
        orchestration_lease: lease,
        activity_lease: lease,
        ..common::test_options()
    };
    keel::Worker::builder(store)
        .options(options)
        .orchestration(CHAIN, chain)
        .orchestration(FAN_OUT, fan_out)
        .activity(ADD_ONE, add_one)
        .build()
}

/// The child process: runs a worker on the hub until it is killed.
#[test]
#[ignore = "run by the crash tests as their child process"]
fn crash_child_worker() {
    let Ok(path) = std::env::var(CHILD_HUB_ENV) else { return };
    let lease = std::env::var(CHILD_LEASE_ENV).ok().and_then(|seconds| seconds.parse().ok()).unwrap_or(2);
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async move {
        let store = keel::store::open(&format!("sqlite://{path}")).await.expect("the hub opens");
        let _worker = crash_worker(store, Duration::from_secs(lease)).start();
        std::future::pending::<()>().await;
    });
}

async fn completed_count(client: &Client) -> usize {
    let query = InstanceQuery { statuses: vec![RuntimeStatus::Completed], page_size: 1000, ..InstanceQuery::default() };
    client.query(&query).await.expect("query").instances.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_flight_loses_nothing() {
    kill_mid_flight_and_finish(common::test_options().orchestration_lease).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_leases_are_released_when_its_death_is_noticed() {
    let started = std::time::Instant::now();
    kill_mid_flight_and_finish(LONG_LEASE).await;
    assert!(started.elapsed() < Duration::from_secs(60), "the held work waited {:?}", started.elapsed());
}

/// Starts the instances, lets a child worker process with leases of `lease` run
/// them until ten have completed, kills it with SIGKILL, and checks that a worker of
/// this process (with the same leases) finishes every one of them within a minute.
async fn kill_mid_flight_and_finish(lease: Duration) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db").display().to_string();
    let store = keel::store::open(&format!("sqlite://{path}")).await.unwrap();
    let client = Client::new(store.clone());
    let mut expected = Vec::new();
    for n in 0..CHAINS {
        let id = format!("chain-{n}");
        let options = StartOptions { instance_id: Some(id.clone()), ..StartOptions::default() };
        client.start_with_options(CHAIN, &(n * 100), options).await.unwrap();
        expected.push((id, n * 100 + CHAIN_LENGTH, CHAIN_LENGTH));
    }
    for n in 0..FAN_OUTS {
        let id = format!("fan-{n}");
        let options = StartOptions { instance_id: Some(id.clone()), ..StartOptions::default() };
        client.start_with_options(FAN_OUT, &(n * 1000), options).await.unwrap();
        let sum = (0..FAN_OUT_WIDTH).map(|i| n * 1000 + i + 1).sum();
        expected.push((id, sum, FAN_OUT_WIDTH));
    }

    let lease_seconds = lease.as_secs().to_string();
    let mut child =
        ChildTest::start("crash_child_worker", &[(CHILD_HUB_ENV, &path), (CHILD_LEASE_ENV, &lease_seconds)]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while completed_count(&client).await < 10 {
        assert!(tokio::time::Instant::now() < deadline, "the child worker made no progress");
        assert!(child.is_running(), "the child worker exited early");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill();
    let done_at_kill = completed_count(&client).await;
    assert!(done_at_kill < expected.len(), "the kill came after everything was done; the test proves nothing");

    let worker = crash_worker(store.clone(), lease).start();
    for (id, output, activities) in &expected {
        let done = client.wait_for_completion(id, Duration::from_secs(60)).await.unwrap();
        assert_eq!(done.status, RuntimeStatus::Completed, "{id}: {done:?}");
        assert_eq!(done.output_as::<u32>().unwrap(), *output, "{id}");
        let history = client.get_history(id).await.unwrap();
        let mut decisions = HashSet::new();
        for event in history.iter().filter(|event| event.kind.is_decision()) {
            assert!(
                decisions.insert(event.event_id),
                "{id}: decision #{} recorded twice: {history:#?}",
                event.event_id
            );
        }
        assert_eq!(decisions.len(), *activities as usize, "{id}: one TaskScheduled per activity");
        let results: Vec<i32> = history
            .iter()
            .filter_map(|event| match event.kind {
                EventKind::TaskCompleted { task_scheduled_id, .. } => Some(task_scheduled_id),
                _ => None,
            })
            .collect();
        assert_eq!(results.len(), *activities as usize, "{id}: one result per activity");
        assert_eq!(results.iter().collect::<HashSet<_>>().len(), results.len(), "{id}: a result recorded twice");
    }
    eprintln!("{done_at_kill} of {} instances were complete when the worker was killed", expected.len());
    worker.shutdown(Duration::from_secs(5)).await;
}
