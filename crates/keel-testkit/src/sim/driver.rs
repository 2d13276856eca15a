//! One seed's run: the task hub, the workers and their crashes, the clock jumps, and
//! the driver that starts the workload's instances and sends their commands through a
//! client whose store injects faults too. When every instance has finished, every
//! process is killed and the checker reads the task hub.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel::{Client, ClientError, EntityId, StartOptions, Worker, WorkerOptions};
use keel_sqlite::{SqliteOptions, SqliteStore};
use keel_store::Store;

use crate::clock::SimClock;
use crate::faults::{CrashPoint, Defect, FaultCounts, FaultPlan, FaultRates, FaultSwitch, FaultyStore, Life};
use crate::rng::Rng;
use crate::sim::check::{self, Checked, Inputs};
use crate::sim::functions::{self, World, GO, LOG, VALUE};
use crate::sim::workload::{termination_reason, Plan, Planned, Workload};
use crate::sim::{Sabotage, SeedReport, Violation};

/// Every instance must have finished this long (virtual time) after the run began.
const RUN_DEADLINE: Duration = Duration::from_secs(30 * 60);

/// How often the driver tries a client call that failed with a retryable error.
const CLIENT_ATTEMPTS: u32 = 100;

/// Pause between two tries of a client call.
const CLIENT_BACKOFF: Duration = Duration::from_millis(100);

/// Why a seed could not run at all.
#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error("no temporary directory: {0}")]
    TempDir(std::io::Error),
    #[error("the task hub does not open: {0}")]
    Store(keel_store::Error),
}

/// One life of a simulated worker process.
#[derive(Clone, Debug)]
struct Generation {
    /// Virtual time between the previous generation's death (or the run's start) and
    /// this one's start.
    start_after: Duration,
    /// Where it dies; `None` for the last generation, which lives to the end.
    crash: Option<CrashPoint>,
}

/// What the seed does to the processes: faults, workers, crashes, clock jumps.
#[derive(Clone, Debug)]
struct Chaos {
    rates: FaultRates,
    /// One list of generations per worker process running at once.
    slots: Vec<Vec<Generation>>,
    options: WorkerOptions,
    /// `(after, by)`: the clock jumps forward `by` once `after` has passed.
    jumps: Vec<(Duration, Duration)>,
}

impl Chaos {
    fn generate(rng: &mut Rng) -> Chaos {
        let intensity = *rng.pick(&[0.0, 0.01, 0.03, 0.06]);
        let rates = FaultRates {
            error_before_write: intensity,
            error_after_write: intensity,
            read_error: intensity / 2.0,
            delay: 0.02 + intensity,
            max_delay: Duration::from_secs(12),
            lease_cut: intensity,
            short_lease: Duration::from_millis(rng.range(0, 500)),
        };
        let workers = rng.range(1, 3) as usize;
        let mut crashes = rng.range(0, 4);
        let mut slots = Vec::with_capacity(workers);
        for slot in 0..workers {
            let mine = if slot + 1 == workers { crashes } else { rng.range(0, crashes + 1) };
            crashes -= mine;
            let mut generations: Vec<Generation> = (0..mine)
                .map(|_| Generation {
                    start_after: Duration::from_millis(rng.range(0, 3_000)),
                    crash: Some(CrashPoint { at_call: rng.range(5, 300), after_write: rng.chance(0.5) }),
                })
                .collect();
            generations.push(Generation { start_after: Duration::from_millis(rng.range(0, 3_000)), crash: None });
            // The first process of the first slot is there from the start.
            if slot == 0 {
                generations[0].start_after = Duration::ZERO;
            }
            slots.push(generations);
        }
        let options = WorkerOptions {
            max_concurrent_orchestrations: *rng.pick(&[1, 3, 50]),
            max_concurrent_activities: *rng.pick(&[1, 4, 50]),
            orchestration_lease: Duration::from_secs(5),
            activity_lease: Duration::from_secs(5),
            idle_poll: Duration::from_secs(1),
            execution_cache_size: *rng.pick(&[0, 3, 1000]),
            ..WorkerOptions::default()
        };
        let jumps = (0..rng.range(0, 4))
            .map(|_| (Duration::from_millis(rng.range(0, 60_000)), Duration::from_millis(rng.range(100, 90_000))))
            .collect();
        Chaos { rates, slots, options, jumps }
    }
}

/// What the processes of one run share.
struct Hub {
    seed: u64,
    inner: Arc<dyn Store>,
    clock: Arc<SimClock>,
    world: Arc<World>,
    counts: Arc<FaultCounts>,
    switch: FaultSwitch,
    defect: Option<Defect>,
    stopping: AtomicBool,
    lives: Mutex<Vec<Arc<Life>>>,
}

impl Hub {
    fn wrap(&self, stream: u64, rates: FaultRates, crash: Option<CrashPoint>, life: &Arc<Life>) -> Arc<dyn Store> {
        let plan = FaultPlan { seed: self.seed, stream, rates, crash, defect: self.defect };
        Arc::new(FaultyStore::new(self.inner.clone(), plan, self.switch.clone(), self.counts.clone(), life.clone()))
    }

    /// Kills every process: their store calls and activities never return again.
    fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for life in self.lives.lock().expect("lives lock").iter() {
            life.end();
        }
    }
}

/// Runs one worker slot: each generation starts, runs until its crash point kills it,
/// and the next one takes over on the same task hub.
async fn supervise(hub: Arc<Hub>, slot: u64, generations: Vec<Generation>, rates: FaultRates, options: WorkerOptions) {
    // Dead workers' handles are kept: a dropped `WorkerHandle` closes the shutdown
    // channel, and the dispatchers then spin (see RELIABILITY.md, found by seed 3).
    let mut dead = Vec::new();
    for (generation, plan) in generations.into_iter().enumerate() {
        tokio::time::sleep(plan.start_after).await;
        if hub.stopping.load(Ordering::SeqCst) {
            break;
        }
        let life = Arc::new(Life::default());
        hub.lives.lock().expect("lives lock").push(life.clone());
        let store = hub.wrap(slot * 1000 + generation as u64, rates.clone(), plan.crash, &life);
        let builder = Worker::builder(store).clock(hub.clock.clone()).options(options.clone());
        let worker = functions::register(builder, &hub.world, &life).build().start();
        life.ended().await;
        // The dead worker's tasks are stuck in store calls that never return: a
        // killed process, whose leases run out.
        dead.push(worker);
    }
    // Every generation is dead (or the run stopped): hold the handles until the
    // runtime goes.
    std::future::pending::<()>().await;
}

/// Tries a client call again while it fails with a retryable (injected) error; the
/// last result and how many tries were made (more than one: an earlier try may have
/// been written).
async fn persist<T, F, Fut>(mut call: F) -> (Result<T, ClientError>, u32)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        match call().await {
            Err(ClientError::Store(error)) if error.is_retryable() && tries < CLIENT_ATTEMPTS => {
                tokio::time::sleep(CLIENT_BACKOFF).await;
            }
            result => return (result, tries),
        }
    }
}

/// The driver of one run: a client with faults of its own, and where to put what
/// went wrong.
#[derive(Clone)]
struct Driver {
    seed: u64,
    client: Client,
    world: Arc<World>,
    violations: Arc<Mutex<Vec<Violation>>>,
}

impl Driver {
    fn violation(&self, instance: &str, message: String) {
        let violation = Violation { seed: self.seed, instance: Some(instance.to_string()), message };
        self.violations.lock().expect("violations lock").push(violation);
    }

    /// Starts the instance; after an ambiguous failure, looks whether the start was
    /// written before trying again (a retried start of a finished instance would
    /// replace it).
    async fn start(&self, planned: &Planned) -> bool {
        let id = &planned.instance_id;
        let input = planned.plan.input(id).to_string();
        let mut ambiguous = false;
        for _ in 0..CLIENT_ATTEMPTS {
            let options = StartOptions { instance_id: Some(id.clone()), ..StartOptions::default() };
            match self.client.start_raw(planned.plan.orchestration(), Some(input.clone()), options).await {
                Ok(_) => return true,
                Err(ClientError::Store(error)) if error.is_retryable() => {
                    ambiguous = true;
                    tokio::time::sleep(CLIENT_BACKOFF).await;
                    match persist(|| self.client.get_status(id)).await.0 {
                        Ok(Some(_)) => return true, // it was written
                        Ok(None) => {}
                        Err(error) => {
                            self.violation(id, format!("the status after an ambiguous start is unreadable: {error}"));
                            return false;
                        }
                    }
                }
                Err(ClientError::AlreadyExists { .. }) if ambiguous => return true,
                Err(error) => {
                    self.violation(id, format!("the start was refused: {error}"));
                    return false;
                }
            }
        }
        self.violation(id, "the start failed on every try".into());
        false
    }

    /// Sends one command; a refusal after an ambiguous try means the try took effect.
    async fn command<F, Fut>(&self, id: &str, what: &str, call: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), ClientError>>,
    {
        match persist(call).await {
            (Ok(()), _) => {}
            (Err(ClientError::InvalidState { .. }), tries) if tries > 1 => {}
            (Err(error), tries) => self.violation(id, format!("{what} was refused after {tries} tries: {error}")),
        }
    }

    /// Waits until the instance has finished (through the faulty client).
    async fn wait_finished(&self, id: &str) -> Option<keel::InstanceStatus> {
        match persist(|| self.client.wait_for_completion(id, RUN_DEADLINE)).await.0 {
            Ok(status) => Some(status),
            Err(error) => {
                self.violation(id, format!("waiting for the instance to finish failed: {error}"));
                None
            }
        }
    }

    /// Starts one instance and sends it what its plan says.
    async fn drive(self, planned: Planned, mut rng: Rng) {
        tokio::time::sleep(Duration::from_millis(planned.start_after_ms)).await;
        if !self.start(&planned).await {
            return;
        }
        let id = planned.instance_id.as_str();
        let pause = |rng: &mut Rng| Duration::from_millis(rng.range(0, 2_000));
        match &planned.plan {
            Plan::Await { value: Some(value), .. } => {
                self.command(id, "raising Value", || self.client.raise(id, VALUE, value)).await;
            }
            Plan::Gate { cycles, value } => {
                for _ in 0..*cycles {
                    tokio::time::sleep(pause(&mut rng)).await;
                    self.command(id, "suspend", || self.client.suspend(id, Some("sim"))).await;
                    tokio::time::sleep(pause(&mut rng)).await;
                    self.command(id, "resume", || self.client.resume(id, Some("sim"))).await;
                }
                self.command(id, "raising Go", || self.client.raise(id, GO, value)).await;
            }
            Plan::Terminate { suspended } => {
                tokio::time::sleep(pause(&mut rng)).await;
                if *suspended {
                    self.command(id, "suspend", || self.client.suspend(id, Some("sim"))).await;
                    tokio::time::sleep(pause(&mut rng)).await;
                }
                let reason = termination_reason(id);
                self.command(id, "terminate", || self.client.terminate(id, Some(&reason))).await;
            }
            Plan::Rewind { .. } => {
                let Some(failed) = self.wait_finished(id).await else { return };
                let broken = failed.failure.as_ref().is_some_and(|failure| failure.error_type == functions::BROKEN);
                if failed.status != keel::RuntimeStatus::Failed || !broken {
                    self.violation(
                        id,
                        format!("expected to fail with {} before the rewind: {failed:?}", functions::BROKEN),
                    );
                    return;
                }
                self.world.repair(id);
                self.command(id, "rewind", || self.client.rewind(id, Some("repaired"))).await;
            }
            _ => {}
        }
    }

    /// Sends `count` appends to the log entity; how many tries each took.
    async fn signal_log(self, entity: EntityId, count: u32) -> Vec<u32> {
        let mut tries = Vec::with_capacity(count as usize);
        for value in 0..count {
            match persist(|| self.client.signal_entity(&entity, "append", &value)).await {
                (Ok(()), n) => tries.push(n),
                (Err(error), n) => {
                    self.violation(&entity.to_string(), format!("signal {value} was refused after {n} tries: {error}"));
                    tries.push(n);
                }
            }
        }
        tries
    }
}

/// The run of one seed: the workload on a fresh task hub, with the seed's chaos; then
/// the checks. Never panics on a broken promise: it reports it.
pub async fn simulate(seed: u64, sabotage: Option<Sabotage>) -> SeedReport {
    match run(seed, sabotage).await {
        Ok(report) => report,
        Err(error) => SeedReport {
            seed,
            violations: vec![Violation { seed, instance: None, message: format!("the run could not start: {error}") }],
            ..SeedReport::default()
        },
    }
}

async fn run(seed: u64, sabotage: Option<Sabotage>) -> Result<SeedReport, SetupError> {
    let rng = Rng::new(seed);
    let workload = Workload::generate(seed, &mut rng.fork(1));
    let chaos = Chaos::generate(&mut rng.fork(2));
    let dir = tempfile::tempdir().map_err(SetupError::TempDir)?;
    let inner: Arc<dyn Store> =
        Arc::new(SqliteStore::open(dir.path().join("hub.db"), SqliteOptions::default()).map_err(SetupError::Store)?);
    let base = chrono::DateTime::from_timestamp_millis(1_893_456_000_000).expect("2030-01-01 is a time");
    let hub = Arc::new(Hub {
        seed,
        inner: inner.clone(),
        clock: Arc::new(SimClock::new(base)),
        world: Arc::new(World::default()),
        counts: Arc::new(FaultCounts::default()),
        switch: FaultSwitch::default(),
        defect: match sabotage {
            Some(Sabotage::Store(defect)) => Some(defect),
            _ => None,
        },
        stopping: AtomicBool::new(false),
        lives: Mutex::new(Vec::new()),
    });
    let began = tokio::time::Instant::now();

    for (slot, generations) in chaos.slots.iter().enumerate() {
        let hub = hub.clone();
        let (generations, rates, options) = (generations.clone(), chaos.rates.clone(), chaos.options.clone());
        tokio::spawn(supervise(hub, slot as u64, generations, rates, options));
    }
    let jumps_done = Arc::new(AtomicU64::new(0));
    let jumper = {
        let (hub, jumps, done) = (hub.clone(), chaos.jumps.clone(), jumps_done.clone());
        tokio::spawn(async move {
            let mut jumps = jumps;
            jumps.sort();
            for (after, by) in jumps {
                tokio::time::sleep_until(began + after).await;
                hub.clock.jump(by);
                done.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    // The driver's process never dies; its store injects faults of its own.
    let client_life = Arc::new(Life::default());
    let client_store = hub.wrap(999_999, chaos.rates.clone(), None, &client_life);
    let client = functions::register(Worker::builder(client_store).clock(hub.clock.clone()), &hub.world, &client_life)
        .build()
        .client();
    let driver = Driver { seed, client, world: hub.world.clone(), violations: Arc::default() };
    let mut drivers = Vec::new();
    for (index, planned) in workload.instances.iter().enumerate() {
        drivers.push(tokio::spawn(driver.clone().drive(planned.clone(), rng.fork(100 + index as u64))));
    }
    let log = EntityId::new(LOG, &format!("s{seed}")).expect("a valid entity id");
    let log_tries = tokio::spawn(driver.clone().signal_log(log.clone(), workload.log_signals));
    for driving in drivers {
        driving.await.expect("a driver task never panics");
    }
    let log_tries = log_tries.await.expect("the signalling task never panics");

    let observer = Client::new(inner.clone());
    check::settle(&observer, &workload, &log, workload.log_signals, began + RUN_DEADLINE).await;
    hub.stop();
    jumper.abort();

    let verifier = functions::register(Worker::builder(inner.clone()), &hub.world, &client_life).build();
    let Checked { instances, entities, violations: found } = check::check(Inputs {
        seed,
        store: &inner,
        verifier: &verifier,
        world: &hub.world,
        workload: &workload,
        log: &log,
        log_tries: &log_tries,
        wrong_expectation: sabotage == Some(Sabotage::WrongExpectation),
    })
    .await;
    let mut violations = std::mem::take(&mut *driver.violations.lock().expect("violations lock"));
    violations.extend(found);
    drop(dir);
    Ok(SeedReport {
        seed,
        instances,
        entities,
        faults: hub.counts.totals(),
        clock_jumps: jumps_done.load(Ordering::SeqCst),
        activity_reruns: hub.world.reruns(),
        violations,
    })
}
