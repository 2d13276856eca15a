//! A fleet of worker processes on one task hub, for the multi-process tests: the
//! functions and the entity they host, starting them (the test binary re-executed as a
//! child that runs only the ignored test `fleet_worker`) and killing them, the workload
//! the parent starts, and the checks on what the fleet did.
//!
//! Every worker appends one line per activity execution (`worker instance task`) to
//! its own activity log, and one line per entity operation it runs
//! (`worker key value position`: the operation's input and how many values the state
//! held when it ran) to its own entity log, so that the parent can count executions per
//! activity and per operation, tell which worker ran each, and see what state each
//! operation ran on, whether or not its batch was committed.
//!
//! A worker process may run another build instead of the fleet's functions: one of the
//! versioned builds of [`super::versioned`] ([`Fleet::start_worker_of_build`]), which
//! logs its orchestration code runs instead.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use keel::{
    Activity, ActivityContext, Client, EntityContext, EntityId, EventKind, Never, Orchestration, OrchestrationContext,
    OrchestrationError, RuntimeStatus, StartOptions, WorkerOptions,
};
use keel_store::Store;
use keel_testkit::process::ChildTest;

/// Set in a worker process: the task hub's URL.
const HUB_ENV: &str = "KEEL_FLEET_HUB";
/// Set in a worker process: the directory of the logs (see [`log_path`]).
const LOG_DIR_ENV: &str = "KEEL_FLEET_LOG_DIR";
/// Set in a worker process: its name in the logs.
const NAME_ENV: &str = "KEEL_FLEET_WORKER";
/// Set in a worker process that runs a versioned build: the build's name.
const BUILD_ENV: &str = "KEEL_FLEET_BUILD";

/// Activities per chain.
const CHAIN_LENGTH: u32 = 3;
/// Activities per fan-out.
const FAN_OUT_WIDTH: u32 = 4;

/// The entity every worker hosts: its operation `append` pushes its input to the state.
const LOG_ENTITY: &str = "Log";
/// The extension of the activity logs.
const ACTIVITY_LOG: &str = "activities";
/// The extension of the entity logs.
const ENTITY_LOG: &str = "entities";

/// Short leases, so that the work of a killed worker is taken over quickly.
fn worker_options() -> WorkerOptions {
    WorkerOptions {
        orchestration_lease: Duration::from_secs(4),
        activity_lease: Duration::from_secs(4),
        idle_poll: Duration::from_millis(250),
        ..WorkerOptions::default()
    }
}

const CHAIN: Orchestration<u32, u32> = Orchestration::new("Chain");
const FAN_OUT: Orchestration<u32, u32> = Orchestration::new("FanOut");
const PARENT: Orchestration<u32, u32> = Orchestration::new("Parent");
const ADD_ONE: Activity<u32, u32, Never> = Activity::new("AddOne");

async fn chain(ctx: OrchestrationContext, start: u32) -> Result<u32, OrchestrationError> {
    let mut value = start;
    for _ in 0..CHAIN_LENGTH {
        value = ctx.call(ADD_ONE, &value).await?;
    }
    Ok(value)
}

async fn fan_out(ctx: OrchestrationContext, base: u32) -> Result<u32, OrchestrationError> {
    let results = ctx.when_all((0..FAN_OUT_WIDTH).map(|i| ctx.call(ADD_ONE, &(base + i)))).await;
    let mut sum = 0;
    for result in results {
        sum += result?;
    }
    Ok(sum)
}

/// Runs a chain as a sub-orchestration (instance `<id>-child`), then adds one.
async fn parent(ctx: OrchestrationContext, value: u32) -> Result<u32, OrchestrationError> {
    let child_id = format!("{}-child", ctx.instance_id());
    let chained = ctx.call_with_instance_id(CHAIN, &child_id, &value).await?;
    Ok(ctx.call(ADD_ONE, &chained).await?)
}

/// A log of this worker process: its activity executions or its entity operations.
pub struct ExecutionLog {
    worker: String,
    file: std::sync::Mutex<std::fs::File>,
}

impl ExecutionLog {
    /// The log at `path` of the worker named `worker`, appended to.
    pub fn open(worker: &str, path: &std::path::Path) -> Arc<ExecutionLog> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("the log opens");
        Arc::new(ExecutionLog { worker: worker.to_owned(), file: std::sync::Mutex::new(file) })
    }

    /// One line per execution (the worker's name, then `fields`), written with one
    /// `write` on a file opened for appending, so that lines of a killed process are
    /// whole or absent.
    pub fn record(&self, fields: std::fmt::Arguments<'_>) {
        let line = format!("{} {fields}\n", self.worker);
        let mut file = self.file.lock().expect("log lock");
        file.write_all(line.as_bytes()).expect("the execution log is writable");
    }
}

fn fleet_worker(store: Arc<dyn Store>, activity_log: Arc<ExecutionLog>, entity_log: Arc<ExecutionLog>) -> keel::Worker {
    keel::Worker::builder(store)
        .options(worker_options())
        .orchestration(CHAIN, chain)
        .orchestration(FAN_OUT, fan_out)
        .orchestration(PARENT, parent)
        .activity(ADD_ONE, move |context: ActivityContext, value: u32| {
            let log = activity_log.clone();
            async move {
                log.record(format_args!("{} {}", context.instance_id, context.task_id));
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok::<u32, Never>(value + 1)
            }
        })
        .entity(LOG_ENTITY, move |ctx: &mut EntityContext<Vec<u32>>| {
            if ctx.operation() != "append" {
                return Err(ctx.unknown_operation());
            }
            let value: u32 = ctx.input()?;
            let position = ctx.state().map_or(0, Vec::len);
            entity_log.record(format_args!("{} {value} {position}", ctx.id().key));
            // A little work, so that a kill can land while a batch runs.
            std::thread::sleep(Duration::from_millis(2));
            ctx.state_mut().push(value);
            Ok(())
        })
        .build()
}

/// The body of the ignored test `fleet_worker` that every multi-process test binary
/// defines: in a process started by [`Fleet::start_worker`], runs a worker until the
/// process is killed; anywhere else, does nothing.
pub fn run_worker_process() {
    let (Ok(url), Ok(log_dir), Ok(name)) =
        (std::env::var(HUB_ENV), std::env::var(LOG_DIR_ENV), std::env::var(NAME_ENV))
    else {
        return;
    };
    let build = std::env::var(BUILD_ENV).ok();
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async move {
        let store = open_with_retries(&url).await;
        let log_dir = std::path::Path::new(&log_dir);
        let worker = match build {
            Some(build) => {
                let log = ExecutionLog::open(&name, &log_path(log_dir, &name, super::versioned::ORCHESTRATION_LOG));
                super::versioned::worker(store, &build, log)
            }
            None => {
                let activity_log = ExecutionLog::open(&name, &log_path(log_dir, &name, ACTIVITY_LOG));
                let entity_log = ExecutionLog::open(&name, &log_path(log_dir, &name, ENTITY_LOG));
                fleet_worker(store, activity_log, entity_log)
            }
        };
        let _worker = worker.start();
        std::future::pending::<()>().await;
    });
}

/// Opens the hub, trying again while the database is unavailable (restarting).
pub async fn open_with_retries(url: &str) -> Arc<dyn Store> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match keel::store::open(url).await {
            Ok(store) => return store,
            Err(error) if error.is_retryable() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => panic!("the hub does not open: {error}"),
        }
    }
}

/// The log of worker `name` of kind `kind` ([`ACTIVITY_LOG`] or [`ENTITY_LOG`]).
fn log_path(dir: &std::path::Path, name: &str, kind: &str) -> PathBuf {
    dir.join(format!("{name}.{kind}"))
}

/// Every line of the logs of kind `kind`, split into fields (the worker's name first).
fn log_lines(dir: &std::path::Path, kind: &str) -> Vec<Vec<String>> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(dir).expect("the log dir") {
        let path = entry.expect("an entry").path();
        if path.extension().and_then(|extension| extension.to_str()) != Some(kind) {
            continue;
        }
        let log = std::fs::read_to_string(path).expect("a log");
        lines.extend(log.lines().map(|line| line.split(' ').map(str::to_owned).collect()));
    }
    lines
}

/// One run of an entity operation, committed or not.
#[derive(Clone, Debug)]
pub struct OperationRun {
    pub worker: String,
    /// How many values the state held when the operation ran.
    pub position: usize,
}

/// Worker processes on one hub; all killed when dropped.
pub struct Fleet {
    hub_url: String,
    log_dir: tempfile::TempDir,
    workers: BTreeMap<String, ChildTest>,
}

impl Fleet {
    pub fn new(hub_url: &str) -> Fleet {
        Fleet {
            hub_url: hub_url.to_owned(),
            log_dir: tempfile::tempdir().expect("a temp dir"),
            workers: BTreeMap::new(),
        }
    }

    /// Starts a worker process named `name`.
    pub fn start_worker(&mut self, name: &str) {
        self.spawn_worker(name, None);
    }

    /// Starts a worker process named `name` that runs the versioned build `build` (see
    /// [`super::versioned`]).
    pub fn start_worker_of_build(&mut self, name: &str, build: &str) {
        self.spawn_worker(name, Some(build));
    }

    fn spawn_worker(&mut self, name: &str, build: Option<&str>) {
        let mut command = ChildTest::command("fleet_worker");
        command
            .env(HUB_ENV, &self.hub_url)
            .env(LOG_DIR_ENV, self.log_dir.path())
            .env(NAME_ENV, name)
            .stdout(Stdio::null());
        match build {
            Some(build) => command.env(BUILD_ENV, build),
            None => command.env_remove(BUILD_ENV),
        };
        self.workers.insert(name.to_owned(), ChildTest::spawn(command));
    }

    /// Kills a worker with SIGKILL: no chance to give anything back.
    pub fn kill(&mut self, name: &str) {
        self.workers.remove(name).expect("a worker of that name").kill();
    }

    /// Panics if a worker process has exited (crashed).
    pub fn assert_all_running(&mut self) {
        for (name, child) in &mut self.workers {
            let status = child.exit_status();
            assert!(status.is_none(), "worker {name} exited: {status:?}");
        }
    }

    /// How many activity executions `name` has logged.
    pub fn executions_by(&self, name: &str) -> usize {
        self.lines_by(name, ACTIVITY_LOG).len()
    }

    /// Every logged activity execution: which workers ran each (instance, task).
    pub fn executions(&self) -> BTreeMap<(String, i32), Vec<String>> {
        let mut executions: BTreeMap<(String, i32), Vec<String>> = BTreeMap::new();
        for fields in log_lines(self.log_dir.path(), ACTIVITY_LOG) {
            let [worker, instance, task] = &fields[..] else { panic!("a malformed log line: {fields:?}") };
            let task: i32 = task.parse().expect("a task id");
            executions.entry((instance.clone(), task)).or_default().push(worker.clone());
        }
        executions
    }

    /// The inputs of the entity operations `name` has logged (runs, committed or not).
    pub fn operations_by(&self, name: &str) -> Vec<u32> {
        self.lines_by(name, ENTITY_LOG)
            .iter()
            .map(|fields| fields.get(2).and_then(|value| value.parse().ok()).expect("a value"))
            .collect()
    }

    /// Every logged entity operation run: the runs of each (entity key, value).
    pub fn operation_runs(&self) -> BTreeMap<(String, u32), Vec<OperationRun>> {
        let mut runs: BTreeMap<(String, u32), Vec<OperationRun>> = BTreeMap::new();
        for fields in log_lines(self.log_dir.path(), ENTITY_LOG) {
            let [worker, key, value, position] = &fields[..] else { panic!("a malformed log line: {fields:?}") };
            let value: u32 = value.parse().expect("a value");
            let position: usize = position.parse().expect("a position");
            runs.entry((key.clone(), value)).or_default().push(OperationRun { worker: worker.clone(), position });
        }
        runs
    }

    /// Every line of the logs of kind `kind`, split into fields (the worker's name first).
    pub fn lines(&self, kind: &str) -> Vec<Vec<String>> {
        log_lines(self.log_dir.path(), kind)
    }

    fn lines_by(&self, name: &str, kind: &str) -> Vec<Vec<String>> {
        std::fs::read_to_string(log_path(self.log_dir.path(), name, kind))
            .map(|log| log.lines().map(|line| line.split(' ').map(str::to_owned).collect()).collect())
            .unwrap_or_default()
    }
}

/// An instance the parent started (or that one of them starts), and what it must end with.
pub struct Expected {
    pub instance_id: String,
    pub output: u32,
    /// Decisions recorded in its history: activities and sub-orchestrations scheduled.
    pub decisions: usize,
    /// Activities it runs itself (a parent's child runs its own).
    pub activities: u32,
}

/// Starts `chains` chains, `fan_outs` fan-outs and `parents` parents (each with a
/// child chain); returns what every instance, children included, must end with.
pub async fn start_workload(client: &Client, chains: u32, fan_outs: u32, parents: u32) -> Vec<Expected> {
    let mut expected = Vec::new();
    let mut starts = Vec::new();
    for n in 0..chains {
        starts.push((CHAIN, format!("chain-{n:04}"), n * 10));
        expected.push(Expected {
            instance_id: format!("chain-{n:04}"),
            output: n * 10 + CHAIN_LENGTH,
            decisions: CHAIN_LENGTH as usize,
            activities: CHAIN_LENGTH,
        });
    }
    for n in 0..fan_outs {
        starts.push((FAN_OUT, format!("fan-{n:04}"), n * 100));
        expected.push(Expected {
            instance_id: format!("fan-{n:04}"),
            output: (0..FAN_OUT_WIDTH).map(|i| n * 100 + i + 1).sum(),
            decisions: FAN_OUT_WIDTH as usize,
            activities: FAN_OUT_WIDTH,
        });
    }
    for n in 0..parents {
        starts.push((PARENT, format!("parent-{n:04}"), n * 7));
        expected.push(Expected {
            instance_id: format!("parent-{n:04}"),
            output: n * 7 + CHAIN_LENGTH + 1,
            decisions: 2,
            activities: 1,
        });
        expected.push(Expected {
            instance_id: format!("parent-{n:04}-child"),
            output: n * 7 + CHAIN_LENGTH,
            decisions: CHAIN_LENGTH as usize,
            activities: CHAIN_LENGTH,
        });
    }
    for chunk in starts.chunks(100) {
        let started: Vec<_> = chunk
            .iter()
            .map(|(handle, id, input)| {
                let client = client.clone();
                let (handle, id, input) = (*handle, id.clone(), *input);
                tokio::spawn(async move {
                    let options = StartOptions { instance_id: Some(id), ..StartOptions::default() };
                    client.start_with_options(handle, &input, options).await
                })
            })
            .collect();
        for start in started {
            start.await.expect("start task").expect("the instance starts");
        }
    }
    expected
}

/// How many instances of the hub are completed, asked with retries while the
/// database is unavailable.
pub async fn completed_count(store: &dyn Store) -> usize {
    let query = keel::InstanceQuery {
        statuses: vec![RuntimeStatus::Completed],
        page_size: 100_000,
        ..keel::InstanceQuery::default()
    };
    loop {
        match store.query_instances(&query).await {
            Ok(page) => return page.instances.len(),
            Err(error) if error.is_retryable() => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(error) => panic!("query: {error}"),
        }
    }
}

/// Waits until `total` instances are completed, checking that the workers stay up.
pub async fn wait_for_all(store: &dyn Store, fleet: &mut Fleet, total: usize, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let done = completed_count(store).await;
        if done >= total {
            return;
        }
        fleet.assert_all_running();
        assert!(tokio::time::Instant::now() < deadline, "only {done} of {total} instances completed within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Checks every instance: completed with the right output, no decision recorded twice,
/// one result per activity. Returns how many activities the workload has.
pub async fn verify(client: &Client, expected: &[Expected]) -> usize {
    let mut activities = 0;
    for instance in expected {
        let id = &instance.instance_id;
        let status = client.get_status(id).await.expect("get_status").unwrap_or_else(|| panic!("{id} exists"));
        assert_eq!(status.status, RuntimeStatus::Completed, "{id}: {status:?}");
        assert_eq!(status.output_as::<u32>().expect("a number"), instance.output, "{id}: the output");
        let history = client.get_history(id).await.expect("get_history");
        let mut decisions = HashSet::new();
        for event in history.iter().filter(|event| event.kind.is_decision()) {
            assert!(
                decisions.insert(event.event_id),
                "{id}: decision #{} recorded twice: {history:#?}",
                event.event_id
            );
        }
        assert_eq!(decisions.len(), instance.decisions, "{id}: decisions in {history:#?}");
        let results: Vec<i32> = history
            .iter()
            .filter_map(|event| match event.kind {
                EventKind::TaskCompleted { task_scheduled_id, .. } => Some(task_scheduled_id),
                _ => None,
            })
            .collect();
        let distinct: HashSet<&i32> = results.iter().collect();
        assert_eq!(distinct.len(), results.len(), "{id}: an activity result recorded twice");
        assert_eq!(results.len(), instance.activities as usize, "{id}: one result per activity");
        activities += instance.activities as usize;
    }
    activities
}

/// The key of the `n`th entity of the entity workload.
pub fn entity_key(n: u32) -> String {
    format!("log-{n:02}")
}

fn log_entity(n: u32) -> EntityId {
    EntityId::new(LOG_ENTITY, &entity_key(n)).expect("a valid entity id")
}

/// Signals `append(value)` to each of the first `entities` entities, one after the
/// other, so that the entities become ready at different moments and different workers
/// take them (each entity gets its values in order when the rounds are sent one after
/// the other).
pub async fn signal_round(client: &Client, entities: u32, value: u32) {
    for n in 0..entities {
        client.signal_entity(&log_entity(n), "append", &value).await.expect("the signal is sent");
    }
}

/// The committed state of each of the first `entities` entities (empty before its
/// first batch).
pub async fn entity_states(client: &Client, entities: u32) -> Vec<Vec<u32>> {
    let mut states = Vec::new();
    for n in 0..entities {
        let state = match client.get_entity(&log_entity(n)).await.expect("get_entity") {
            Some(metadata) if metadata.exists() => metadata.state_as().expect("a list of values"),
            _ => Vec::new(),
        };
        states.push(state);
    }
    states
}

/// How many operations are committed, over the first `entities` entities.
pub async fn operations_applied(client: &Client, entities: u32) -> usize {
    entity_states(client, entities).await.iter().map(Vec::len).sum()
}

/// Waits until the first `entities` entities hold `total` operations in all, checking
/// that the workers stay up.
pub async fn wait_for_operations(client: &Client, fleet: &mut Fleet, entities: u32, total: usize, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let applied = operations_applied(client, entities).await;
        if applied >= total {
            return;
        }
        fleet.assert_all_running();
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {applied} of {total} entity operations were applied within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Prints a line past the test harness's capture, so that it shows in CI's log.
pub fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}
