//! `keel verify`: a deploy check. Replays the running instances of a task hub, or
//! histories exported with `keel history ID --json`, against the code this build hosts
//! with `keel serve --samples` (the sample app), writing nothing. Prints one line per
//! instance — `ok`, or the first divergence (sequence number, what the history has,
//! what the code did) — and a summary, or with `--json` the report; the exit code is 1
//! when any instance diverged or has no code in this build.
//!
//! A user's own build checks its own orchestrators the same way with
//! `keel::Worker::verify` and `keel::Worker::verify_export` (see `keel::verify`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use keel::testing::HistoryExport;
use keel::verify::{Verdict, VerifyFilter, VerifyReport};
use keel::{RuntimeStatus, Worker};

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The task hub whose instances to replay: sqlite://PATH or postgres://USER@HOST:PORT/DATABASE[?schema=HUB]
    /// (not read with --history).
    #[arg(long, env = "KEEL_STORE", default_value = keel::store::DEFAULT_STORE_URL)]
    store: String,
    /// Replay these exported histories (`keel history ID --json > FILE`) instead of a task hub's
    /// instances; `-` reads one from standard input.
    #[arg(long, value_name = "FILE", num_args = 1.., conflicts_with_all = ["name", "version", "status"])]
    history: Vec<PathBuf>,
    /// Only orchestrations whose name starts with this.
    #[arg(long, value_name = "PREFIX")]
    name: Option<String>,
    /// Only instances of this orchestration version.
    #[arg(long)]
    version: Option<String>,
    /// Only instances with these statuses (repeat or separate with commas; default: Pending, Running and
    /// Suspended, the instances that may still run).
    #[arg(long, value_delimiter = ',')]
    status: Vec<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let report = match args.history.is_empty() {
        true => verify_hub(&args).await?,
        false => verify_exports(&args.history).await?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(if report.is_clean() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The instances of the hub that the filter selects, replayed.
async fn verify_hub(args: &VerifyArgs) -> anyhow::Result<VerifyReport> {
    let mut filter =
        VerifyFilter { name_prefix: args.name.clone(), version: args.version.clone(), ..VerifyFilter::default() };
    if !args.status.is_empty() {
        filter.statuses = Vec::new();
        for status in args.status.iter().map(|status| status.trim()).filter(|status| !status.is_empty()) {
            let status = status.parse::<RuntimeStatus>().map_err(|error| anyhow::anyhow!("--status: {error}"))?;
            if !filter.statuses.contains(&status) {
                filter.statuses.push(status);
            }
        }
    }
    refuse_missing_sqlite_file(&args.store)?;
    let store = keel::store::open(&args.store)
        .await
        .with_context(|| format!("could not open the task hub '{}'", args.store))?;
    // Built, never started: it takes no work, it only lends its registry to the replays.
    let worker = keel_samples::register(Worker::builder(store)).build();
    worker.verify(&filter).await.with_context(|| format!("could not read the task hub '{}'", args.store))
}

/// Opening a SQLite hub creates it; checking one that does not exist would report a
/// clean empty hub, so a missing file is an error instead.
fn refuse_missing_sqlite_file(url: &str) -> anyhow::Result<()> {
    let Some(path) = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")) else { return Ok(()) };
    if !path.is_empty() && !Path::new(path).exists() {
        bail!("there is no task hub at '{url}': the file {path} does not exist");
    }
    Ok(())
}

/// Exported histories, replayed in the order given.
async fn verify_exports(paths: &[PathBuf]) -> anyhow::Result<VerifyReport> {
    let exports = paths.iter().map(|path| read_export(path)).collect::<anyhow::Result<Vec<_>>>()?;
    // `Worker::verify_export` reads no store, but a worker needs one: a scratch hub.
    let scratch = tempfile::tempdir().context("could not create a temporary directory")?;
    let store = keel::store::open(&format!("sqlite://{}", scratch.path().join("scratch.db").display())).await?;
    let worker = keel_samples::register(Worker::builder(store)).build();
    Ok(VerifyReport { instances: exports.iter().map(|export| worker.verify_export(export)).collect() })
}

/// An exported history from a file, or from standard input for `-`.
fn read_export(path: &Path) -> anyhow::Result<HistoryExport> {
    let (text, source) = if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("could not read the history from standard input")?;
        (text, "standard input".to_string())
    } else {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("could not read the history {}", path.display()))?;
        (text, path.display().to_string())
    };
    serde_json::from_str(&text)
        .with_context(|| format!("{source} is not a history exported with `keel history ID --json`"))
}

/// `ID (NAME [version V], N events): VERDICT` per instance, then a count of each verdict.
fn print_report(report: &VerifyReport) {
    for instance in &report.instances {
        let version = instance.version.as_deref().map(|version| format!(" version {version}")).unwrap_or_default();
        println!(
            "{} ({}{version}, {} events): {}",
            instance.instance_id, instance.name, instance.history_len, instance.verdict
        );
    }
    let count = |wanted: fn(&Verdict) -> bool| report.instances.iter().filter(|i| wanted(&i.verdict)).count();
    let ok = count(|verdict| *verdict == Verdict::Ok);
    let diverged = count(|verdict| matches!(verdict, Verdict::Diverged { .. }));
    let not_hosted = count(|verdict| *verdict == Verdict::NotHosted);
    let total = report.instances.len();
    println!(
        "{total} instance{} checked: {ok} ok, {diverged} diverged, {not_hosted} not hosted",
        if total == 1 { "" } else { "s" }
    );
}
