//! The `verify` scenario: how fast `keel::Worker::verify` replays a task hub's running
//! instances against a build's code (the deploy check of `keel verify`).
//!
//! The hub holds [`INSTANCES`] in-flight instances of [`STEPS`], each stopped at the same
//! point: six sequential activities done, waiting for an event. Each history then has
//! [`EVENTS_PER_HISTORY`] events: `OrchestratorStarted` + `ExecutionStarted`, then six
//! times `TaskScheduled`, `OrchestratorStarted`, `TaskCompleted`. A worker runs them to
//! that point and is shut down; a worker that is never started then verifies the hub,
//! and only that call is timed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel::verify::{Verdict, VerifyFilter};
use keel::{Event, Orchestration, OrchestrationContext, OrchestrationError, RuntimeStatus, Worker};
use keel_store::{InstanceQuery, Store};
use serde_json::json;

use crate::hub::HubSpec;
use crate::{noop, peak_rss_mib, round2, NOOP};

/// In-flight instances the hub holds.
const INSTANCES: usize = 10_000;

/// Sequential activities each instance has done when it waits.
const STEPS_DONE: u32 = 6;

/// Events in each in-flight history.
const EVENTS_PER_HISTORY: u64 = 2 + 3 * STEPS_DONE as u64;

/// How long the instances may take to reach their waiting point.
const SETUP_DEADLINE: Duration = Duration::from_secs(300);

/// [`STEPS_DONE`] activities one after the other, then a wait for [`RELEASE`].
const STEPS: Orchestration<u32, u32> = Orchestration::new("VerifySteps");

/// Never raised in the bench: the instances stay in flight.
const RELEASE: Event<()> = Event::new("Release");

async fn steps(ctx: OrchestrationContext, length: u32) -> Result<u32, OrchestrationError> {
    let mut value = 0u32;
    for _ in 0..length {
        value = ctx.call(NOOP, &(value + 1)).await?;
    }
    ctx.wait(RELEASE).await?;
    Ok(value)
}

fn steps_worker(store: Arc<dyn Store>) -> Worker {
    Worker::builder(store).orchestration(STEPS, steps).activity(NOOP, noop).build()
}

/// How many running instances have reached their waiting point.
async fn waiting(store: &Arc<dyn Store>) -> anyhow::Result<usize> {
    let query = InstanceQuery { statuses: vec![RuntimeStatus::Running], page_size: 1000, ..InstanceQuery::default() };
    let running = keel_store::query_all_instances(store.as_ref(), query).await?;
    Ok(running.iter().filter(|instance| instance.history_len == EVENTS_PER_HISTORY).count())
}

pub(crate) async fn run_verify(bench_store: &str, hub: &HubSpec) -> anyhow::Result<serde_json::Value> {
    let hub = hub.create().await?;

    // The hub: every instance run to its waiting point, then the worker stopped.
    let setup_started = Instant::now();
    let worker = steps_worker(hub.store.clone()).start();
    let client = worker.client();
    crate::start_many(&client, STEPS, STEPS_DONE, INSTANCES, "v").await?;
    let deadline = Instant::now() + SETUP_DEADLINE;
    loop {
        let count = waiting(&hub.store).await?;
        if count == INSTANCES {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {count} of {INSTANCES} instances reached their waiting point in {SETUP_DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worker.shutdown(Duration::from_secs(10)).await;
    drop(client);
    let setup_ms = setup_started.elapsed().as_secs_f64() * 1000.0;

    // The timed part: a build that is never started verifies the hub.
    let verifier = steps_worker(hub.store.clone());
    let started = Instant::now();
    let report = verifier.verify(&VerifyFilter::default()).await?;
    let wall = started.elapsed().as_secs_f64();

    anyhow::ensure!(report.instances.len() == INSTANCES, "verified {} instances", report.instances.len());
    if let Some(bad) = report.instances.iter().find(|instance| instance.verdict != Verdict::Ok) {
        anyhow::bail!("{} did not verify clean: {}", bad.instance_id, bad.verdict);
    }
    let events: usize = report.instances.iter().map(|instance| instance.history_len).sum();
    anyhow::ensure!(
        events as u64 == INSTANCES as u64 * EVENTS_PER_HISTORY,
        "the histories hold {events} events, not {EVENTS_PER_HISTORY} each"
    );
    drop(verifier);
    if let Err(error) = hub.delete().await {
        eprintln!("could not delete the bench's task hub: {error:#}");
    }
    Ok(json!({"scenario": "verify", "store": bench_store, "instances": report.instances.len(),
        "events_per_history": EVENTS_PER_HISTORY, "events": events, "setup_ms": round2(setup_ms),
        "wall_ms": round2(wall * 1000.0), "histories_per_s": round2(report.instances.len() as f64 / wall),
        "events_per_s": round2(events as f64 / wall), "peak_rss_mib": round2(peak_rss_mib())}))
}
