//! `--scenario recovery` (issue 15): a worker process killed with `kill -9` while
//! 10,000 instances are in flight, then a fresh worker process on the same SQLite file.
//!
//! The bench process creates a fresh SQLite task hub and starts 10,000 instances of
//! `Chain` (5 no-op activities each; the output is `5`). It then starts a worker
//! process (this program again, with the hidden `--worker-process` flag, default
//! worker options: 10 s leases), waits until [`KILL_AT`] instances have completed,
//! kills the worker with SIGKILL and starts a fresh worker process on the same file.
//!
//! Measured from the restart (the second worker process's spawn), from the
//! instances' completion times: the first completion after the restart; how long the
//! completions go on without a pause (the work that was not leased at the kill: ready
//! messages); the longest pause after that (work the killed process held stays leased
//! until its lease runs out) and when completions resume after it; when the last
//! instance completes; and completions per second over the whole rest. Every instance
//! is checked to have completed with the output `5`.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use keel::{Client, RuntimeStatus};
use keel_store::{InstanceQuery, InstanceRecord};
use serde_json::json;

use crate::hub::HubSpec;
use crate::{round2, CHAIN};

const INSTANCES: usize = 10_000;
const LENGTH: u32 = 5;
/// How many instances have completed when the worker process is killed.
const KILL_AT: u64 = 2_000;
/// How long the whole scenario may take.
const DEADLINE: Duration = Duration::from_secs(300);
/// A pause in the completions after the restart longer than this is taken to be the
/// wait for the killed process's leases.
const PAUSE: Duration = Duration::from_millis(1_000);

/// A worker process serving `url` (the standard scenarios' functions).
fn spawn_worker(url: &str) -> anyhow::Result<Child> {
    let program = std::env::current_exe().context("the path of this program")?;
    Command::new(program)
        .args(["--worker-process", "--store", url])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("starting a worker process")
}

async fn completed(client: &Client) -> anyhow::Result<u64> {
    let stats = client.store().hub_stats(chrono_now()).await?;
    Ok(stats.instances.get(RuntimeStatus::Completed))
}

fn chrono_now() -> keel::Timestamp {
    keel::Timestamp::from(SystemTime::now())
}

/// Every instance record in the hub.
async fn all_records(client: &Client) -> anyhow::Result<Vec<InstanceRecord>> {
    let query = InstanceQuery { page_size: 2_000, ..InstanceQuery::default() };
    Ok(keel_store::query_all_instances(client.store().as_ref(), query).await?)
}

/// Milliseconds from `from` to `to` (wall clock, both on this machine).
fn millis_between(from: keel::Timestamp, to: keel::Timestamp) -> f64 {
    (to - from).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0
}

pub(crate) async fn run_recovery(store_label: &str, hub: &HubSpec) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(
        matches!(hub, HubSpec::Sqlite(_)),
        "the recovery scenario runs on a SQLite file its worker processes share: use --store sqlite"
    );
    let fresh = hub.create().await?;
    let client = Client::new(fresh.store.clone());
    let deadline = Instant::now() + DEADLINE;

    // All instances first, so that the worker process finds them all waiting.
    crate::start_many(&client, CHAIN, LENGTH, INSTANCES, "r").await?;

    let first_spawn = Instant::now();
    let mut first = spawn_worker(&fresh.url)?;
    while completed(&client).await? < KILL_AT {
        anyhow::ensure!(Instant::now() < deadline, "the first worker process did not complete {KILL_AT} instances");
        if let Some(status) = first.try_wait()? {
            anyhow::bail!("the first worker process ended early: {status}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.kill().context("kill -9 the worker process")?; // SIGKILL on Unix
    first.wait()?;
    let killed_at = chrono_now();
    let first_ran_ms = first_spawn.elapsed().as_secs_f64() * 1000.0;
    let at_kill = client.store().hub_stats(killed_at).await?;
    let completed_at_kill = at_kill.instances.get(RuntimeStatus::Completed);
    let done_before: HashSet<String> = all_records(&client)
        .await?
        .into_iter()
        .filter(|record| record.status == RuntimeStatus::Completed)
        .map(|record| record.instance_id)
        .collect();

    let restart_wall = chrono_now();
    let restart = Instant::now();
    let mut second = spawn_worker(&fresh.url)?;
    while completed(&client).await? < INSTANCES as u64 {
        anyhow::ensure!(Instant::now() < deadline, "the instances did not all complete after the restart");
        if let Some(status) = second.try_wait()? {
            anyhow::bail!("the second worker process ended early: {status}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let observed_all_ms = restart.elapsed().as_secs_f64() * 1000.0;
    let worker_rss = crate::peak_rss_mib_of(&format!("/proc/{}/status", second.id()));
    drop(second.stdin.take());
    let stop = Instant::now() + Duration::from_secs(10);
    while second.try_wait()?.is_none() && Instant::now() < stop {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if second.try_wait()?.is_none() {
        let _ = second.kill();
    }
    let _ = second.wait();

    let records = all_records(&client).await?;
    anyhow::ensure!(records.len() == INSTANCES, "{} instances in the hub, not {INSTANCES}", records.len());
    let mut wrong = 0usize;
    let mut after: Vec<f64> = Vec::with_capacity(INSTANCES);
    for record in &records {
        if record.status != RuntimeStatus::Completed || record.output.as_deref() != Some("5") {
            wrong += 1;
            continue;
        }
        if !done_before.contains(&record.instance_id) {
            let completed_at = record.completed_at.context("a completed instance's completion time")?;
            after.push(millis_between(restart_wall, completed_at));
        }
    }
    anyhow::ensure!(wrong == 0, "{wrong} instances did not complete with the output 5");
    anyhow::ensure!(!after.is_empty(), "no instance was left to complete after the kill");
    after.sort_by(f64::total_cmp);

    let first_ms = after[0];
    let last_ms = after[after.len() - 1];
    // The longest pause between completions after the restart (the leases' wait).
    let (pause_index, pause_ms) = after
        .windows(2)
        .enumerate()
        .map(|(index, pair)| (index + 1, pair[1] - pair[0]))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((after.len(), 0.0));
    let paused = pause_ms > PAUSE.as_secs_f64() * 1000.0;
    let (before_pause, leased_back_ms) =
        if paused { (pause_index, Some(after[pause_index])) } else { (after.len(), None) };
    let ready_span_ms = after[before_pause - 1] - first_ms;
    let rest = after.len();

    drop(client);
    fresh.delete().await?;
    Ok(json!({
        "scenario": "recovery", "store": store_label, "instances": INSTANCES, "activities_per_instance": LENGTH,
        "completed_at_kill": completed_at_kill,
        "in_flight_at_kill": INSTANCES as u64 - completed_at_kill,
        "ready_orchestrations_at_kill": at_kill.backlog.ready_orchestrations,
        "ready_activities_at_kill": at_kill.backlog.ready_activities,
        "first_worker_ran_ms": round2(first_ran_ms),
        "before_kill_per_s": round2(completed_at_kill as f64 / (first_ran_ms / 1000.0)),
        "first_completion_after_restart_ms": round2(first_ms),
        "first_completion_target_ms": 1000,
        "first_completion_within_target": first_ms <= 1000.0,
        "completed_before_pause": before_pause,
        "ready_work_done_ms": round2(after[before_pause - 1]),
        "ready_per_s": if ready_span_ms > 0.0 { json!(round2(before_pause as f64 / (ready_span_ms / 1000.0))) } else { json!(null) },
        "longest_pause_ms": round2(pause_ms),
        "leased_work_back_ms": leased_back_ms.map(round2),
        "completed_after_pause": rest - before_pause,
        "all_completed_after_restart_ms": round2(last_ms),
        "observed_all_completed_ms": round2(observed_all_ms),
        "rest": rest,
        "rest_per_s": round2(rest as f64 / (last_ms / 1000.0)),
        "all_completed": true,
        "worker_peak_rss_mib": round2(worker_rss),
    }))
}
