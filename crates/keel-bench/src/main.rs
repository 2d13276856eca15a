//! keel-bench: measures Keel on a fresh file-backed task hub with no-op activities.
//!
//! Scenarios: `chain` (1 instance, 100 sequential activities), `fanout` (1 instance,
//! 1000 activities joined), `throughput` (1000 instances x 5 sequential activities,
//! started together), `latency` (200 one-activity instances one after another). Each
//! prints one JSON object on stdout.
//!
//! The scaling scenarios (`--scenario scale`, see [`scale`]): `large-fanout`,
//! `long-history` and `idle`.
//!
//! `targets` (see [`targets`]): every row of issue 15's table against its target.
//!
//! `verify` (see [`verify`]): `keel::Worker::verify` over 10,000 in-flight instances of
//! 20 history events each (setting the hub up takes a few seconds, so it is not in
//! `all`).
//!
//! `--store sqlite` (a fresh file per scenario) or `--store postgres://…` (a fresh
//! schema per scenario in that database, see [`hub`]). By default the worker runs in
//! the bench process; `--workers N` runs N worker processes instead (PostgreSQL only)
//! and the bench process only starts instances and waits for them.
//!
//! `cargo run --release --bin keel-bench -- --scenario all --store sqlite`
//! `cargo run --release --bin keel-bench -- --scenario throughput --store postgres://postgres@127.0.0.1/postgres --workers 2`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use keel::{
    Activity, ActivityContext, Client, Never, Orchestration, OrchestrationContext, OrchestrationError, StartOptions,
    Worker,
};
use keel_store::Store;
use serde_json::json;

use crate::hub::{FreshHub, HubSpec, WorkerProcesses};

mod disk;
mod grpc;
mod hub;
mod recovery;
mod scale;
mod targets;
mod tracing_sink;
mod verify;

const WAIT: Duration = Duration::from_secs(600);

struct Args {
    scenarios: Vec<String>,
    /// How results name the store: `sqlite` or `postgres`.
    store: String,
    hub: HubSpec,
    durability: keel_sqlite::Durability,
    /// Worker processes; 0 runs the worker in the bench process.
    workers: usize,
    /// Whether the runtime emits spans while the scenarios run.
    tracing: Tracing,
    /// `--size`: the activities of `long-history` and of the one `large-fanout` run,
    /// instead of their standard sizes.
    size: Option<u32>,
    /// `--runs`: how often `targets` runs each quick row.
    runs: usize,
    /// `--postgres`: the database of `targets`' PostgreSQL rows.
    postgres: Option<String>,
}

/// `--tracing`: the runtime's OpenTelemetry spans during the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tracing {
    /// No spans (the default): what tracing costs when it is off.
    Off,
    /// Every span built and batched by the OpenTelemetry SDK, then dropped by an
    /// exporter that only counts them: the runtime's and the SDK's cost, no network.
    Sink,
    /// Spans exported over OTLP as the OTEL_* environment variables say.
    Otlp,
}

impl Tracing {
    fn label(self) -> &'static str {
        match self {
            Tracing::Off => "off",
            Tracing::Sink => "sink",
            Tracing::Otlp => "otlp",
        }
    }
}

fn parse_args(arguments: Vec<String>) -> anyhow::Result<Args> {
    let mut scenario = "all".to_string();
    let mut store = "sqlite".to_string();
    let mut durability = keel_sqlite::Durability::Process;
    let mut workers = 0;
    let mut tracing = Tracing::Off;
    let mut size = None;
    let mut runs = 3;
    let mut postgres = None;
    let mut args = arguments.into_iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--scenario" => scenario = value()?,
            "--store" => store = value()?,
            "--workers" => {
                workers = value()?.parse().context("--workers takes a number of worker processes")?;
                anyhow::ensure!(workers > 0, "--workers takes at least 1");
            }
            "--durability" => {
                durability = match value()?.as_str() {
                    "process" => keel_sqlite::Durability::Process,
                    "full" => keel_sqlite::Durability::Full,
                    other => bail!("unknown durability '{other}': use process or full"),
                }
            }
            "--size" => {
                let activities: u32 = value()?.parse().context("--size takes a number of activities")?;
                anyhow::ensure!(
                    (1..=keel_core::limits::MAX_ACTIONS_PER_EXECUTION as u32).contains(&activities),
                    "--size takes 1 to {} activities (one execution's limit)",
                    keel_core::limits::MAX_ACTIONS_PER_EXECUTION
                );
                size = Some(activities);
            }
            "--runs" => {
                runs = value()?.parse().context("--runs takes a number of runs")?;
                anyhow::ensure!(runs > 0, "--runs takes at least 1");
            }
            "--postgres" => postgres = Some(value()?),
            "--tracing" => {
                tracing = match value()?.as_str() {
                    "off" => Tracing::Off,
                    "sink" => Tracing::Sink,
                    "otlp" => Tracing::Otlp,
                    other => bail!("unknown tracing '{other}': use off, sink or otlp"),
                }
            }
            "--help" | "-h" => {
                println!(
                    "usage: keel-bench [--scenario chain|fanout|throughput|latency|all|large-fanout|long-history|idle|scale|verify|recovery|grpc|grpc-chain|grpc-throughput|targets] \
                     [--store sqlite|postgres://USER@HOST:PORT/DATABASE] [--durability process|full] [--workers N] [--tracing off|sink|otlp] [--size ACTIVITIES (long-history, large-fanout)] [--runs N] [--postgres URL (targets)]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument '{other}' (see --help)"),
        }
    }
    let all = ["chain", "fanout", "throughput", "latency"];
    let scaling = ["large-fanout", "long-history", "idle"];
    let single = ["verify", "recovery", "grpc", "grpc-chain", "grpc-throughput", "targets"];
    let scenarios = if scenario == "all" {
        all.iter().map(|s| s.to_string()).collect()
    } else if scenario == "scale" {
        scaling.iter().map(|s| s.to_string()).collect()
    } else if [&all[..], &scaling[..], &single[..]].concat().contains(&scenario.as_str()) {
        vec![scenario]
    } else {
        bail!("unknown scenario '{scenario}': use chain, fanout, throughput, latency, all, large-fanout, long-history, idle, scale, verify, recovery, grpc, grpc-chain, grpc-throughput or targets");
    };
    let hub = if store == "sqlite" {
        HubSpec::Sqlite(durability)
    } else if store.starts_with("postgres://") || store.starts_with("postgresql://") {
        HubSpec::Postgres(store)
    } else {
        bail!("unknown store '{store}': use sqlite or a postgres:// URL");
    };
    if workers > 0 {
        anyhow::ensure!(
            matches!(hub, HubSpec::Postgres(_)),
            "--workers needs a store that worker processes share: use --store postgres://…"
        );
        anyhow::ensure!(
            scenarios.iter().all(|scenario| all.contains(&scenario.as_str())),
            "--workers runs the scenarios chain, fanout, throughput and latency"
        );
    }
    Ok(Args { scenarios, store: hub.label().to_owned(), hub, durability, workers, tracing, size, runs, postgres })
}

/// `length` activities one after the other; the output is `length`.
const CHAIN: Orchestration<u32, u32> = Orchestration::new("Chain");
/// `width` activities at once; the output is how many succeeded.
const FAN_OUT: Orchestration<u32, usize> = Orchestration::new("FanOut");
/// Returns its input.
const NOOP: Activity<u32, u32, Never> = Activity::new("Noop");

async fn noop(_ctx: ActivityContext, input: u32) -> Result<u32, Never> {
    Ok(input)
}

async fn chain(ctx: OrchestrationContext, length: u32) -> Result<u32, OrchestrationError> {
    let mut value = 0u32;
    for _ in 0..length {
        value = ctx.call(NOOP, &(value + 1)).await?;
    }
    Ok(value)
}

async fn fan_out(ctx: OrchestrationContext, width: u32) -> Result<usize, OrchestrationError> {
    let results = ctx.when_all((0..width).map(|i| ctx.call(NOOP, &i))).await;
    Ok(results.into_iter().filter(Result::is_ok).count())
}

/// A worker hosting the standard scenarios' functions.
fn standard_worker(store: Arc<dyn Store>) -> Worker {
    Worker::builder(store).orchestration(CHAIN, chain).orchestration(FAN_OUT, fan_out).activity(NOOP, noop).build()
}

/// A fresh task hub with its workers.
struct Bench {
    hub: FreshHub,
    workers: Workers,
    client: Client,
}

enum Workers {
    InProcess(keel::WorkerHandle),
    Processes(WorkerProcesses),
}

impl Bench {
    /// A fresh task hub with a worker hosting the standard scenarios' functions.
    async fn new(hub: &HubSpec) -> anyhow::Result<Bench> {
        Bench::with_worker(hub, |store| standard_worker(store).start()).await
    }

    /// A fresh task hub with the worker `start` makes.
    async fn with_worker(
        hub: &HubSpec,
        start: impl FnOnce(Arc<dyn Store>) -> keel::WorkerHandle,
    ) -> anyhow::Result<Bench> {
        let hub = hub.create().await?;
        let worker = start(hub.store.clone());
        let client = worker.client();
        Ok(Bench { hub, workers: Workers::InProcess(worker), client })
    }

    /// The hub and workers `--store` and `--workers` ask for.
    async fn for_scenario(args: &Args) -> anyhow::Result<Bench> {
        if args.workers == 0 {
            return Bench::new(&args.hub).await;
        }
        let hub = args.hub.create().await?;
        let workers = WorkerProcesses::start(args.workers, &hub.url)?;
        let client = Client::new(hub.store.clone());
        Ok(Bench { hub, workers: Workers::Processes(workers), client })
    }

    /// Stops the workers and deletes the hub; returns the worker processes' largest
    /// peak memory (`None` for a worker in this process).
    async fn finish(self) -> Option<f64> {
        let worker_rss = match self.workers {
            Workers::InProcess(worker) => {
                worker.shutdown(Duration::from_secs(5)).await;
                None
            }
            Workers::Processes(processes) => {
                let rss = processes.peak_rss_mib();
                processes.stop().await;
                Some(round2(rss))
            }
        };
        drop(self.client);
        if let Err(error) = self.hub.delete().await {
            eprintln!("could not delete the bench's task hub: {error:#}");
        }
        worker_rss
    }
}

fn peak_rss_mib() -> f64 {
    peak_rss_mib_of("/proc/self/status")
}

/// The peak resident memory (VmHWM) a `/proc/PID/status` file reports, in MiB.
fn peak_rss_mib_of(status_path: &str) -> f64 {
    let status = std::fs::read_to_string(status_path).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    assert!(!sorted.is_empty());
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// How much SQL the store's connections in this process have compiled (SQLite) or had
/// parsed (PostgreSQL) so far; see `keel_sqlite::statements_compiled`.
fn sql_compiled(hub: &HubSpec) -> u64 {
    match hub {
        HubSpec::Sqlite(_) => keel_sqlite::statements_compiled(),
        HubSpec::Postgres(_) => keel_postgres::statements_parsed(),
    }
}

/// Runs three rounds of 8 short `chain`s at once to their end, so that the measured
/// run finds the statements of every path it takes prepared on every connection (a
/// PostgreSQL store's pool has 8), as on a host that has been running.
async fn warm_up(client: &Client, chain: Orchestration<u32, u32>) -> anyhow::Result<()> {
    for _ in 0..3 {
        let mut instances = Vec::new();
        for _ in 0..8 {
            instances.push(client.start(chain, &3).await?);
        }
        for instance in instances {
            let done = client.wait_for_completion(instance.id(), WAIT).await?;
            anyhow::ensure!(done.output.as_deref() == Some("3"), "a warm-up chain ended wrong: {done:?}");
        }
    }
    Ok(())
}

async fn run_chain(args: &Args) -> anyhow::Result<serde_json::Value> {
    let bench = Bench::for_scenario(args).await?;
    warm_up(&bench.client, CHAIN).await?;
    let compiled_before = sql_compiled(&args.hub);
    let started = Instant::now();
    let instance = bench.client.start(CHAIN, &100).await?;
    let done = bench.client.wait_for_completion(instance.id(), WAIT).await?;
    let wall = started.elapsed().as_secs_f64() * 1000.0;
    let compiled = sql_compiled(&args.hub) - compiled_before;
    anyhow::ensure!(done.output.as_deref() == Some("100"), "chain ended wrong: {done:?}");
    let worker_rss = bench.finish().await;
    let mut result = json!({"scenario": "chain", "store": args.store, "activities": 100, "wall_ms": round2(wall),
        "ms_per_activity": round2(wall / 100.0), "activities_per_s": round2(100.0 / (wall / 1000.0)),
        "peak_rss_mib": round2(peak_rss_mib()), "worker_peak_rss_mib": worker_rss});
    // In this process only: with --workers the workers' statements are not counted here.
    if args.workers == 0 {
        result["sql_compiled_per_step"] = json!(round3(compiled as f64 / 100.0));
    }
    if let HubSpec::Sqlite(durability) = &args.hub {
        let durability = *durability;
        // Issue 15 compares a step with the disk: one commit's p50, measured in this run.
        let disk = disk::single_commit_p50_ms(durability)?;
        result["disk_single_commit_p50_ms"] = json!(round3(disk));
        result["activity_over_disk_commit"] = json!(round2(wall / 100.0 / disk));
    }
    Ok(result)
}

async fn run_fanout(args: &Args) -> anyhow::Result<serde_json::Value> {
    let bench = Bench::for_scenario(args).await?;
    let started = Instant::now();
    let instance = bench.client.start(FAN_OUT, &1000).await?;
    let done = bench.client.wait_for_completion(instance.id(), WAIT).await?;
    let wall = started.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(done.output.as_deref() == Some("1000"), "fan-out ended wrong: {done:?}");
    let worker_rss = bench.finish().await;
    Ok(json!({"scenario": "fanout", "store": args.store, "activities": 1000, "wall_ms": round2(wall),
        "activities_per_s": round2(1000.0 / (wall / 1000.0)), "peak_rss_mib": round2(peak_rss_mib()),
        "worker_peak_rss_mib": worker_rss}))
}

/// Starts `count` instances of `orchestration` with `input` all at once (a task each),
/// with the ids `{prefix}-00000` on; returns their ids in that order.
async fn start_many<I, O>(
    client: &Client,
    orchestration: Orchestration<I, O>,
    input: I,
    count: usize,
    prefix: &str,
) -> anyhow::Result<Vec<String>>
where
    I: serde::Serialize + Clone + Send + Sync + 'static,
    O: 'static,
{
    let mut starts = Vec::with_capacity(count);
    for n in 0..count {
        let (client, input) = (client.clone(), input.clone());
        let instance_id = format!("{prefix}-{n:05}");
        starts.push(tokio::spawn(async move {
            let options = StartOptions { instance_id: Some(instance_id.clone()), ..StartOptions::default() };
            client.start_with_options(orchestration, &input, options).await.map(|_| instance_id)
        }));
    }
    let mut ids = Vec::with_capacity(count);
    for start in starts {
        ids.push(start.await??);
    }
    Ok(ids)
}

async fn run_throughput(args: &Args) -> anyhow::Result<serde_json::Value> {
    const INSTANCES: usize = 1000;
    const LENGTH: u32 = 5;
    let bench = Bench::for_scenario(args).await?;
    let started = Instant::now();
    let ids = start_many(&bench.client, CHAIN, LENGTH, INSTANCES, "t").await?;
    let mut latencies = Vec::with_capacity(INSTANCES);
    for id in &ids {
        let done = bench.client.wait_for_completion(id, WAIT).await?;
        anyhow::ensure!(done.output.as_deref() == Some("5"), "{id} ended wrong: {done:?}");
        let completed = done.completed_at.context("a completion time")?;
        latencies.push((completed - done.created_at).num_milliseconds() as f64);
    }
    let wall = started.elapsed().as_secs_f64() * 1000.0;
    latencies.sort_by(f64::total_cmp);
    let worker_rss = bench.finish().await;
    let activities = INSTANCES as f64 * f64::from(LENGTH);
    Ok(json!({"scenario": "throughput", "store": args.store, "instances": INSTANCES, "activities": activities,
        "wall_ms": round2(wall), "activities_per_s": round2(activities / (wall / 1000.0)),
        "orchestrations_per_s": round2(INSTANCES as f64 / (wall / 1000.0)),
        "p50_ms": percentile(&latencies, 50.0), "p99_ms": percentile(&latencies, 99.0),
        "peak_rss_mib": round2(peak_rss_mib()), "worker_peak_rss_mib": worker_rss}))
}

async fn run_latency(args: &Args) -> anyhow::Result<serde_json::Value> {
    const INSTANCES: usize = 200;
    let bench = Bench::for_scenario(args).await?;
    let mut latencies = Vec::with_capacity(INSTANCES);
    let started = Instant::now();
    for _ in 0..INSTANCES {
        let begin = Instant::now();
        let instance = bench.client.start(CHAIN, &1).await?;
        let done = bench.client.wait_for_completion(instance.id(), WAIT).await?;
        latencies.push(begin.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(done.output.as_deref() == Some("1"), "{} ended wrong: {done:?}", instance.id());
    }
    let wall = started.elapsed().as_secs_f64() * 1000.0;
    latencies.sort_by(f64::total_cmp);
    let worker_rss = bench.finish().await;
    Ok(json!({"scenario": "latency", "store": args.store, "instances": INSTANCES, "wall_ms": round2(wall),
        "p50_ms": round2(percentile(&latencies, 50.0)), "p95_ms": round2(percentile(&latencies, 95.0)),
        "p99_ms": round2(percentile(&latencies, 99.0)), "peak_rss_mib": round2(peak_rss_mib()),
        "worker_peak_rss_mib": worker_rss}))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, store_flag, url] = arguments.as_slice() {
        if flag == "--worker-process" && store_flag == "--store" {
            return hub::serve(url).await;
        }
    }
    let args = parse_args(arguments)?;
    let spans = tracing_sink::install(args.tracing)?;
    let durability = match args.durability {
        keel_sqlite::Durability::Process => "process",
        keel_sqlite::Durability::Full => "full",
    };
    for scenario in &args.scenarios {
        let results = match scenario.as_str() {
            "chain" => vec![run_chain(&args).await?],
            "fanout" => vec![run_fanout(&args).await?],
            "throughput" => vec![run_throughput(&args).await?],
            "latency" => vec![run_latency(&args).await?],
            "large-fanout" => scale::run_large_fanout(&args.store, &args.hub, args.size).await?,
            "long-history" => vec![scale::run_long_history(&args.store, &args.hub, args.size).await?],
            "idle" => vec![scale::run_idle(&args.store, &args.hub).await?],
            "verify" => vec![verify::run_verify(&args.store, &args.hub).await?],
            "recovery" => vec![recovery::run_recovery(&args.store, &args.hub).await?],
            "grpc" => grpc::run_grpc(&args.store, &args.hub).await?,
            "grpc-chain" => vec![grpc::run_chain(&args.store, &args.hub).await?],
            "grpc-throughput" => vec![grpc::run_throughput(&args.store, &args.hub).await?],
            "targets" => targets::run_targets(&args).await?,
            other => unreachable!("scenario {other} was validated"),
        };
        for mut result in results {
            if matches!(args.hub, HubSpec::Sqlite(_)) {
                result["durability"] = json!(durability);
            }
            result["worker_processes"] = json!(args.workers);
            result["tracing"] = json!(args.tracing.label());
            if let Some(spans) = &spans {
                result["spans_so_far"] = json!(spans.count());
            }
            println!("{result}");
        }
    }
    Ok(())
}
