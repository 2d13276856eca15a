//! `keel-sim`: runs the simulation for a range of seeds and reports what it found.
//!
//! ```text
//! keel-sim --seeds 200 --json            # seeds 0..200, one JSON line
//! keel-sim --from 4711 --seeds 1         # rerun one seed
//! ```
//!
//! Exits 1 when a promise was broken; each violation names the seed (and instance)
//! that reproduces it.

use std::io::Write;
use std::time::Duration;

use clap::Parser;
use keel_testkit::sim::{self, Config};

/// Simulates Keel under crashes, store faults and clock jumps, and checks its promises.
#[derive(Parser, Debug)]
#[command(name = "keel-sim", version)]
struct Args {
    /// How many seeds to run.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Seeds run at once (default: one per core).
    #[arg(long)]
    jobs: Option<usize>,
    /// Seconds of real time after which a seed counts as hung.
    #[arg(long, default_value_t = 120)]
    seed_timeout: u64,
    /// Print JSON lines: one per violation, then the summary.
    #[arg(long)]
    json: bool,
    /// Print a line for every seed as it finishes (on stderr).
    #[arg(long)]
    progress: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // RUST_LOG=keel=debug shows what the workers did (best with `--seeds 1`).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    let mut config = Config { seed_timeout: Duration::from_secs(args.seed_timeout), ..Config::default() };
    if let Some(jobs) = args.jobs {
        config.jobs = jobs.max(1);
    }
    let summary = sim::run(args.from, args.seeds, &config, |report| {
        if args.progress {
            eprintln!(
                "seed {}: {} instances, {} faults, {} crashes, {} violations",
                report.seed,
                report.instances,
                report.faults.total(),
                report.faults.crashes,
                report.violations.len()
            );
        }
    });
    let mut out = std::io::stdout().lock();
    let mut found = summary.found.clone();
    found.sort_by(|a, b| (a.seed, &a.instance).cmp(&(b.seed, &b.instance)));
    for violation in &found {
        let rerun = format!("keel-sim --from {} --seeds 1", violation.seed);
        if args.json {
            let line = serde_json::json!({
                "seed": violation.seed,
                "instance": violation.instance,
                "violation": violation.message,
                "rerun": rerun,
            });
            writeln!(out, "{line}")?;
        } else {
            let instance = violation.instance.as_deref().unwrap_or("-");
            writeln!(
                out,
                "VIOLATION seed {} instance {instance}: {} (rerun: {rerun})",
                violation.seed, violation.message
            )?;
        }
    }
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&summary)?)?;
    } else {
        writeln!(
            out,
            "{} seeds, {} instances, {} entities, {} faults injected, {} crashes, {} clock jumps, {} activity re-runs, {} violations in {:.1} s",
            summary.seeds,
            summary.instances,
            summary.entities,
            summary.faults_injected,
            summary.crashes,
            summary.clock_jumps,
            summary.activity_reruns,
            summary.violations,
            summary.elapsed_ms as f64 / 1000.0
        )?;
    }
    out.flush()?;
    if summary.violations > 0 {
        std::process::exit(1);
    }
    Ok(())
}
