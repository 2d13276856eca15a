//! PostgreSQL restarts under a running fleet: two worker processes drain a task hub
//! while the database server is restarted; they reconnect by themselves and every
//! instance completes with the right output and no decision recorded twice.
//!
//! Needs `KEEL_TEST_POSTGRES_URL` and `KEEL_TEST_POSTGRES_RESTART`, a shell command that
//! restarts that server and returns once it accepts connections again (.ci/run sets
//! both); skipped, with a line saying so, without them.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::fleet::{self, Fleet};
use keel::Client;

/// The variable holding the command that restarts the test server.
const RESTART_ENV: &str = "KEEL_TEST_POSTGRES_RESTART";

const CHAINS: u32 = 500;
const FAN_OUTS: u32 = 100;
const PARENTS: u32 = 50;

/// A worker process of this binary's tests (see `common::fleet`).
#[test]
#[ignore = "a worker process started by the multi-process tests"]
fn fleet_worker() {
    fleet::run_worker_process();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_ride_out_a_database_restart() {
    let Some(url) = common::postgres_url("workers_ride_out_a_database_restart") else { return };
    let Ok(restart) = std::env::var(RESTART_ENV) else {
        let _ = writeln!(
            std::io::stderr(),
            "skipped workers_ride_out_a_database_restart: set {RESTART_ENV} to a shell command that restarts the \
             server of {} and waits for it (.ci/run sets it)",
            common::URL_ENV
        );
        return;
    };
    let schema = common::fresh_schema("keel_restart");
    let hub_url = common::hub_url(&url, &schema);
    let store = fleet::open_with_retries(&hub_url).await;
    let client = Client::new(store.clone());
    let expected = fleet::start_workload(&client, CHAINS, FAN_OUTS, PARENTS).await;
    let activities: usize = expected.iter().map(|instance| instance.activities as usize).sum();

    let mut fleet = Fleet::new(&hub_url);
    fleet.start_worker("w1");
    fleet.start_worker("w2");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while fleet.executions().values().map(Vec::len).sum::<usize>() < activities / 4 {
        fleet.assert_all_running();
        assert!(tokio::time::Instant::now() < deadline, "the workers made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let restarting = Instant::now();
    let restarted = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh")
            .args(["-c", &restart])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status()
            .expect("the restart command runs")
    })
    .await
    .expect("the restart task");
    assert!(restarted.success(), "the restart command failed: {restarted}");
    let restart_took = restarting.elapsed();
    let done_at_restart = fleet::completed_count(store.as_ref()).await;

    fleet::wait_for_all(store.as_ref(), &mut fleet, expected.len(), Duration::from_secs(120)).await;
    let drained_after_restart = restarting.elapsed();
    fleet.assert_all_running();
    assert_eq!(fleet::verify(&client, &expected).await, activities);
    let executed: usize = fleet.executions().values().map(Vec::len).sum();
    fleet::report(&format!(
        "restart: {} instances, {activities} activities; the server restart took {:.1} s ({done_at_restart} \
         instances were complete just after it); all done {:.1} s after the restart began, with the same 2 worker \
         processes; {executed} activity executions",
        expected.len(),
        restart_took.as_secs_f64(),
        drained_after_restart.as_secs_f64(),
    ));
    drop(fleet);
    drop(client);
    drop(store);
    let store = keel_postgres::PostgresStore::open(common::hub_options(&url, &schema)).await.expect("reopen");
    store.delete_task_hub().await.expect("delete");
}
