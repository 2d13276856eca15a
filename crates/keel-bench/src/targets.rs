//! `--scenario targets`: every row of issue 15's table, measured in one go against its
//! target. The quick rows run `--runs` times (3 unless told otherwise) and report the
//! median with every run; the long ones (recovery, the 1,000,000-activity history and
//! fan-out) run once. The PostgreSQL rows need `--postgres URL` (a database the bench
//! may create schemas in). Each row is one JSON line: `row`, `target`, `value` (the
//! median), `runs`, `met`, and what else the row's scenario measured.

use serde_json::{json, Value};

use crate::hub::HubSpec;
use crate::{grpc, recovery, round3, scale, Args, Tracing};

/// The long rows' sizes.
const LONG_HISTORY: u32 = 1_000_000;
const LARGE_FAN_OUT: u32 = 1_000_000;

/// How a row compares its value with its target.
#[derive(Clone, Copy)]
enum Goal {
    AtMost(f64),
    AtLeast(f64),
}

impl Goal {
    fn met(self, value: f64) -> bool {
        match self {
            Goal::AtMost(limit) => value <= limit,
            Goal::AtLeast(floor) => value >= floor,
        }
    }

    fn text(self, unit: &str) -> String {
        match self {
            Goal::AtMost(limit) => format!("<= {limit} {unit}"),
            Goal::AtLeast(floor) => format!(">= {floor} {unit}"),
        }
    }
}

/// The median of `values` (the lower middle one of an even count).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[(sorted.len() - 1) / 2]
}

/// One row: the median of `field` over `results` against `goal`.
fn row(name: &str, field: &str, unit: &str, goal: Goal, results: &[Value]) -> anyhow::Result<Value> {
    let runs: Vec<f64> = results
        .iter()
        .map(|result| result[field].as_f64().ok_or_else(|| anyhow::anyhow!("{name}: no {field} in {result}")))
        .collect::<anyhow::Result<_>>()?;
    let value = median(&runs);
    Ok(json!({"row": name, "field": field, "unit": unit, "target": goal.text(unit), "value": round3(value),
        "runs": runs, "met": goal.met(value)}))
}

/// The scenario `run` made `runs` times with `args` but on `hub`.
async fn repeat<F, Fut>(args: &Args, hub: HubSpec, runs: usize, run: F) -> anyhow::Result<Vec<Value>>
where
    F: Fn(Args) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Value>>,
{
    let mut results = Vec::with_capacity(runs);
    for _ in 0..runs {
        let durability = match &hub {
            HubSpec::Sqlite(durability) => *durability,
            HubSpec::Postgres(_) => args.durability,
        };
        let args = Args {
            scenarios: Vec::new(),
            store: hub.label().to_owned(),
            hub: hub.clone(),
            durability,
            workers: 0,
            tracing: Tracing::Off,
            size: None,
            runs,
            postgres: None,
        };
        results.push(run(args).await?);
    }
    Ok(results)
}

pub(crate) async fn run_targets(args: &Args) -> anyhow::Result<Vec<Value>> {
    use keel_sqlite::Durability::{Full, Process};
    let runs = args.runs;
    let mut rows = Vec::new();
    let full = HubSpec::Sqlite(Full);
    let default = HubSpec::Sqlite(Process);

    // First, while the process has run nothing else: these rows measure its CPU.
    let mut grpc_chains = Vec::new();
    let mut grpc_throughputs = Vec::new();
    for _ in 0..runs {
        let [chain, throughput]: [Value; 2] = grpc::run_grpc("sqlite", &default)
            .await?
            .try_into()
            .map_err(|_| anyhow::anyhow!("the gRPC scenario gives a chain and a throughput"))?;
        grpc_chains.push(chain);
        grpc_throughputs.push(throughput);
    }
    rows.push(row(
        "gRPC chain: Keel's CPU per activity step",
        "cpu_ms_per_step_keel",
        "ms",
        Goal::AtMost(0.2),
        &grpc_chains,
    )?);
    rows.push(row("gRPC chain: SQL compiled per step", "sql_compiled_per_step", "", Goal::AtMost(0.0), &grpc_chains)?);
    rows.push(row(
        "gRPC throughput: Keel's CPU per activity step",
        "cpu_ms_per_step_keel",
        "ms",
        Goal::AtMost(0.2),
        &grpc_throughputs,
    )?);

    let chains = repeat(args, full.clone(), runs, |args| async move { crate::run_chain(&args).await }).await?;
    rows.push(row(
        "chain, full: ms per activity over the disk's commit p50",
        "activity_over_disk_commit",
        "x",
        Goal::AtMost(3.0),
        &chains,
    )?);
    let latencies = repeat(args, full.clone(), runs, |args| async move { crate::run_latency(&args).await }).await?;
    rows.push(row("latency p50, full", "p50_ms", "ms", Goal::AtMost(0.5), &latencies)?);
    rows.push(row("latency p99, full", "p99_ms", "ms", Goal::AtMost(1.5), &latencies)?);
    let chains = repeat(args, default.clone(), runs, |args| async move { crate::run_chain(&args).await }).await?;
    rows.push(row("chain, default", "ms_per_activity", "ms", Goal::AtMost(0.1), &chains)?);
    rows.push(row("chain, default: SQL compiled per step", "sql_compiled_per_step", "", Goal::AtMost(0.0), &chains)?);
    let latencies = repeat(args, default.clone(), runs, |args| async move { crate::run_latency(&args).await }).await?;
    rows.push(row("latency p50, default", "p50_ms", "ms", Goal::AtMost(0.25), &latencies)?);
    let throughputs =
        repeat(args, default.clone(), runs, |args| async move { crate::run_throughput(&args).await }).await?;
    rows.push(row("throughput 1000 x 5, default", "activities_per_s", "act/s", Goal::AtLeast(50_000.0), &throughputs)?);
    let throughputs =
        repeat(args, full.clone(), runs, |args| async move { crate::run_throughput(&args).await }).await?;
    rows.push(row("throughput 1000 x 5, full", "activities_per_s", "act/s", Goal::AtLeast(40_000.0), &throughputs)?);

    match &args.postgres {
        Some(url) => {
            let postgres = HubSpec::Postgres(url.clone());
            let chains =
                repeat(args, postgres.clone(), runs, |args| async move { crate::run_chain(&args).await }).await?;
            rows.push(row("PostgreSQL chain", "ms_per_activity", "ms", Goal::AtMost(0.75), &chains)?);
            rows.push(row(
                "PostgreSQL chain: SQL parsed per step",
                "sql_compiled_per_step",
                "",
                Goal::AtMost(0.0),
                &chains,
            )?);
            let latencies =
                repeat(args, postgres.clone(), runs, |args| async move { crate::run_latency(&args).await }).await?;
            rows.push(row("PostgreSQL latency p50", "p50_ms", "ms", Goal::AtMost(1.5), &latencies)?);
            let throughputs =
                repeat(args, postgres, runs, |args| async move { crate::run_throughput(&args).await }).await?;
            rows.push(row(
                "PostgreSQL throughput",
                "activities_per_s",
                "act/s",
                Goal::AtLeast(15_000.0),
                &throughputs,
            )?);
        }
        None => rows.push(json!({"row": "PostgreSQL chain, latency, throughput", "met": null,
            "value": "not run: give --postgres URL"})),
    }

    let recovered = [recovery::run_recovery("sqlite", &default).await?];
    rows.push(row(
        "recovery: first completion after the restart",
        "first_completion_after_restart_ms",
        "ms",
        Goal::AtMost(1000.0),
        &recovered,
    )?);
    // "The rest at normal throughput": the default throughput row's median, 1000 x 5.
    let normal = median(&throughputs_of(&rows, "throughput 1000 x 5, default").unwrap_or_default()) / 5.0;
    let mut rest = row(
        "recovery: the rest, instances per second",
        "rest_per_s",
        "inst/s",
        Goal::AtLeast(round3(normal)),
        &recovered,
    )?;
    rest["note"] = json!("target: the default throughput row's instances per second");
    rows.push(rest);

    let long = [scale::run_long_history("sqlite", &default, Some(LONG_HISTORY)).await?];
    rows.push(row(
        "long history, 1,000,000 activities: last 1,000 over first 1,000",
        "last_over_first",
        "x",
        Goal::AtMost(1.5),
        &long,
    )?);
    rows.push(row("long history, 1,000,000 activities: peak RSS", "peak_rss_mib", "MiB", Goal::AtMost(500.0), &long)?);
    let fan_out = scale::run_large_fanout("sqlite", &default, Some(LARGE_FAN_OUT)).await?;
    rows.push(row(
        "fan-out of 1,000,000 activities joined: peak RSS",
        "peak_rss_mib",
        "MiB",
        Goal::AtMost(1024.0),
        &fan_out,
    )?);
    // It completes with every activity's result counted, or run_large_fanout fails.
    rows.push(json!({"row": "fan-out of 1,000,000 activities joined: completes", "target": "completes",
        "value": fan_out[0]["wall_ms"], "unit": "ms", "met": true}));
    Ok(rows)
}

/// The runs of an earlier row.
fn throughputs_of(rows: &[Value], name: &str) -> Option<Vec<f64>> {
    let row = rows.iter().find(|row| row["row"] == name)?;
    row["runs"].as_array()?.iter().map(Value::as_f64).collect()
}
