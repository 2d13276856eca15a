//! The simulation behind `keel-sim`: for each seed, a random workload of every
//! pattern on a real SQLite task hub, run by workers that crash and restart, through a
//! store that injects faults, on a clock that jumps; then a check of Keel's promises.
//!
//! A seed fixes the workload (instances, their inputs, the commands the driver sends
//! and when), the workers (how many at once, their options, where each one dies) and
//! the fault schedule (which call of which operation fails, is delayed or gets a short
//! lease). It runs on a single-threaded tokio runtime with paused, virtual time
//! ([`crate::clock::SimClock`]), so leases of seconds and timers of minutes cost no
//! real time. What a seed does not fix is how tokio interleaves the tasks (its
//! `select!` picks branches at random, the worker adds random jitter to its polls), so
//! a rerun of a seed faces the same workload and the same faults, but which episode
//! the n-th commit carries may differ.
//!
//! Parts: `workload` (what runs and what it must end as), `functions` (the
//! orchestrations, activities and entities), `driver` (one seed's run), `check` (the
//! invariants).

mod check;
mod driver;
pub mod functions;
pub mod workload;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::faults::{Defect, FaultTotals};

pub use driver::simulate;

/// A deliberate bug, to prove that the checker finds one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sabotage {
    /// The checker expects a wrong output of the first chain.
    WrongExpectation,
    /// The store lies (see [`Defect`]).
    Store(Defect),
}

/// How to run the simulation.
#[derive(Clone, Debug)]
pub struct Config {
    /// Seeds run at once, each on a thread of its own.
    pub jobs: usize,
    /// A seed that has not finished after this much real time is a violation (a hang).
    pub seed_timeout: Duration,
    /// A deliberate bug, for the checker's own tests.
    pub sabotage: Option<Sabotage>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            jobs: std::thread::available_parallelism().map_or(2, usize::from),
            seed_timeout: Duration::from_secs(120),
            sabotage: None,
        }
    }
}

/// A broken promise, with what reproduces it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// The seed that found it.
    pub seed: u64,
    /// The instance (or entity) concerned, when there is one.
    pub instance: Option<String>,
    /// What was wrong.
    pub message: String,
}

/// What one seed ran and found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SeedReport {
    /// The seed.
    pub seed: u64,
    /// Orchestration instances checked (sub-orchestrations included).
    pub instances: u64,
    /// Entities checked.
    pub entities: u64,
    /// The faults injected.
    pub faults: FaultTotals,
    /// Jumps of the clock.
    pub clock_jumps: u64,
    /// Activity executions beyond the first of their call (at-least-once at work).
    pub activity_reruns: u64,
    /// The broken promises.
    pub violations: Vec<Violation>,
}

/// The whole run: the `keel-sim` JSON line.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// Seeds run.
    pub seeds: u64,
    /// Orchestration instances checked.
    pub instances: u64,
    /// Faults injected, worker crashes included.
    pub faults_injected: u64,
    /// Worker crashes.
    pub crashes: u64,
    /// Broken promises.
    pub violations: u64,
    /// Entities checked.
    pub entities: u64,
    /// Jumps of the clock.
    pub clock_jumps: u64,
    /// Activity executions beyond the first of their call.
    pub activity_reruns: u64,
    /// Real time the run took.
    pub elapsed_ms: u64,
    /// The violations, each with its seed.
    #[serde(skip)]
    pub found: Vec<Violation>,
}

impl Summary {
    fn add(&mut self, report: SeedReport) {
        self.seeds += 1;
        self.instances += report.instances;
        self.entities += report.entities;
        self.faults_injected += report.faults.total();
        self.crashes += report.faults.crashes;
        self.clock_jumps += report.clock_jumps;
        self.activity_reruns += report.activity_reruns;
        self.violations += report.violations.len() as u64;
        self.found.extend(report.violations);
    }
}

/// Runs one seed on a runtime of its own (single-threaded, virtual time).
pub fn run_seed(seed: u64, config: &Config) -> SeedReport {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().expect("a tokio runtime");
    let report = runtime.block_on(simulate(seed, config.sabotage));
    // The dead workers' tasks wait for ever; dropping the runtime ends them.
    runtime.shutdown_background();
    report
}

/// Runs the seeds `from..from + count`, `config.jobs` at a time, and sums them up;
/// `on_report` sees each seed's report as it comes (in the order they finish).
pub fn run(from: u64, count: u64, config: &Config, mut on_report: impl FnMut(&SeedReport)) -> Summary {
    let started = Instant::now();
    let mut summary = Summary::default();
    let (done, finished) = mpsc::channel::<SeedReport>();
    let mut running: Vec<(u64, Instant)> = Vec::new();
    let mut next = from;
    let end = from.saturating_add(count);
    while next < end || !running.is_empty() {
        while next < end && running.len() < config.jobs.max(1) {
            let seed = next;
            next += 1;
            let done = done.clone();
            let config = config.clone();
            std::thread::Builder::new()
                .name(format!("keel-sim-{seed}"))
                .spawn(move || {
                    let _ = done.send(run_seed(seed, &config));
                })
                .expect("a thread for the seed");
            running.push((seed, Instant::now()));
        }
        match finished.recv_timeout(Duration::from_millis(200)) {
            Ok(report) => {
                running.retain(|(seed, _)| *seed != report.seed);
                on_report(&report);
                summary.add(report);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => unreachable!("the sender `done` is held here"),
        }
        // A seed that hangs is reported and left behind (its thread cannot be stopped).
        let hung: Vec<u64> =
            running.iter().filter(|(_, since)| since.elapsed() > config.seed_timeout).map(|(seed, _)| *seed).collect();
        for seed in hung {
            running.retain(|(running, _)| *running != seed);
            let report = SeedReport {
                seed,
                violations: vec![Violation {
                    seed,
                    instance: None,
                    message: format!("the seed did not finish within {:?} of real time (a hang)", config.seed_timeout),
                }],
                ..SeedReport::default()
            };
            on_report(&report);
            summary.add(report);
        }
    }
    summary.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    summary
}
