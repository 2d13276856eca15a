//! The scaling scenarios: how Keel behaves as one orchestration grows (a fan-out of
//! 10k, 50k and 100k activities; a chain of 20,000 sequential activities) and what an
//! idle host costs.

use std::time::{Duration, Instant};

use keel::{Orchestration, OrchestrationContext, OrchestrationError, Worker};
use serde_json::json;

use crate::hub::HubSpec;
use crate::{noop, peak_rss_mib, round2, Bench, FAN_OUT, NOOP, WAIT};

/// Sizes of the large fan-out, run one after another on fresh task hubs.
const LARGE_FAN_OUT_SIZES: [u32; 3] = [10_000, 50_000, 100_000];

/// Length of the long-history chain.
const LONG_CHAIN: u32 = 20_000;

/// How many activities each timing window of the long chain covers.
const LONG_CHAIN_WINDOW: u32 = 1_000;

/// How long the idle scenario leaves the host alone.
const IDLE_FOR: Duration = Duration::from_secs(10);

/// `length` activities one after the other; the output is the time at which each window
/// of activities ended.
const TIMED_CHAIN: Orchestration<u32, Vec<i64>> = Orchestration::new("TimedChain");

/// A chain that reports, through custom status, the time at which each window of
/// activities ended (orchestration time: the episode clock, the same on replay).
async fn timed_chain(ctx: OrchestrationContext, length: u32) -> Result<Vec<i64>, OrchestrationError> {
    let mut window_ends = vec![ctx.current_utc_datetime().timestamp_micros()];
    for step in 1..=length {
        ctx.call(NOOP, &step).await?;
        if step % LONG_CHAIN_WINDOW == 0 {
            window_ends.push(ctx.current_utc_datetime().timestamp_micros());
        }
    }
    Ok(window_ends)
}

/// The fan-outs of `sizes` (the standard three unless `--size` names one).
pub(crate) async fn run_large_fanout(
    bench_store: &str,
    hub: &HubSpec,
    size: Option<u32>,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let sizes = size.map_or(LARGE_FAN_OUT_SIZES.to_vec(), |size| vec![size]);
    let mut rows = Vec::new();
    for size in sizes {
        let bench = Bench::new(hub).await?;
        let started = Instant::now();
        let instance = bench.client.start(FAN_OUT, &size).await?;
        let done = bench.client.wait_for_completion(instance.id(), WAIT).await?;
        let wall = started.elapsed().as_secs_f64() * 1000.0;
        anyhow::ensure!(
            done.output.as_deref() == Some(size.to_string().as_str()),
            "fan-out of {size} ended wrong: {done:?}"
        );
        bench.finish().await;
        rows.push(json!({"scenario": "large-fanout", "store": bench_store, "activities": size, "wall_ms": round2(wall),
            "us_per_activity": round2(wall * 1000.0 / f64::from(size)), "activities_per_s": round2(f64::from(size) / (wall / 1000.0)),
            "peak_rss_mib": round2(peak_rss_mib())}));
    }
    Ok(rows)
}

/// A chain of `length` activities (20,000 unless `--size` says otherwise; at least two
/// windows of 1,000).
pub(crate) async fn run_long_history(
    bench_store: &str,
    hub: &HubSpec,
    length: Option<u32>,
) -> anyhow::Result<serde_json::Value> {
    let length = length.unwrap_or(LONG_CHAIN);
    anyhow::ensure!(
        length >= 2 * LONG_CHAIN_WINDOW && length % LONG_CHAIN_WINDOW == 0,
        "long-history takes a multiple of {LONG_CHAIN_WINDOW}, at least {}",
        2 * LONG_CHAIN_WINDOW
    );
    let bench = Bench::with_worker(hub, |store| {
        Worker::builder(store).orchestration(TIMED_CHAIN, timed_chain).activity(NOOP, noop).build().start()
    })
    .await?;
    let started = Instant::now();
    let instance = bench.client.start(TIMED_CHAIN, &length).await?;
    let done = bench.client.wait_for_completion(instance.id(), WAIT).await?;
    let wall = started.elapsed().as_secs_f64() * 1000.0;
    let window_ends: Vec<i64> = done.output_as()?;
    anyhow::ensure!(window_ends.len() == (length / LONG_CHAIN_WINDOW) as usize + 1, "long chain ended wrong: {done:?}");
    let per_activity_ms =
        |window: usize| (window_ends[window + 1] - window_ends[window]) as f64 / 1000.0 / f64::from(LONG_CHAIN_WINDOW);
    let first = per_activity_ms(0);
    let last = per_activity_ms(window_ends.len() - 2);
    bench.finish().await;
    Ok(json!({"scenario": "long-history", "store": bench_store, "activities": length, "wall_ms": round2(wall),
        "first_1000_ms_per_activity": round2(first), "last_1000_ms_per_activity": round2(last),
        "last_over_first": round2(last / first), "peak_rss_mib": round2(peak_rss_mib())}))
}

/// CPU time (user + system) this process has used so far.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which may contain spaces) start after ')'.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |index: usize| fields.get(index).and_then(|field| field.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
    let ticks_per_second = 100; // USER_HZ on Linux
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / ticks_per_second)
}

pub(crate) async fn run_idle(bench_store: &str, hub: &HubSpec) -> anyhow::Result<serde_json::Value> {
    let bench = Bench::new(hub).await?;
    tokio::time::sleep(Duration::from_millis(500)).await; // let start-up settle
    let cpu_before = cpu_time();
    let started = Instant::now();
    tokio::time::sleep(IDLE_FOR).await;
    let cpu = cpu_time().saturating_sub(cpu_before).as_secs_f64();
    let wall = started.elapsed().as_secs_f64();
    bench.finish().await;
    Ok(json!({"scenario": "idle", "store": bench_store, "seconds": round2(wall),
        "cpu_percent_of_one_core": round2(cpu / wall * 100.0), "peak_rss_mib": round2(peak_rss_mib())}))
}
