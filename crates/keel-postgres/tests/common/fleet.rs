//! A fleet of worker processes on one task hub, for the multi-process tests: the
//! functions they host, starting them (the test binary re-executed as a child that
//! runs only the ignored test `fleet_worker`) and killing them, the workload the
//! parent starts, and the checks on what the fleet did.
//!
//! Every worker appends one line per activity execution (`worker instance task`) to
//! its own log file, so that the parent can count executions per activity and tell
//! which worker ran each.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use keel::{
    ActivityContext, ActivityError, Client, EventKind, OrchestrationContext, OrchestrationError, RuntimeStatus,
    StartOptions, WorkerOptions,
};
use keel_store::Store;

/// Set in a worker process: the task hub's URL.
const HUB_ENV: &str = "KEEL_FLEET_HUB";
/// Set in a worker process: the file it logs activity executions to.
const LOG_ENV: &str = "KEEL_FLEET_LOG";
/// Set in a worker process: its name in the logs.
const NAME_ENV: &str = "KEEL_FLEET_WORKER";

/// Activities per chain.
const CHAIN_LENGTH: u32 = 3;
/// Activities per fan-out.
const FAN_OUT_WIDTH: u32 = 4;

/// Short leases, so that the work of a killed worker is taken over quickly.
fn worker_options() -> WorkerOptions {
    WorkerOptions {
        orchestration_lease: Duration::from_secs(4),
        activity_lease: Duration::from_secs(4),
        idle_poll: Duration::from_millis(250),
        ..WorkerOptions::default()
    }
}

async fn chain(ctx: OrchestrationContext) -> Result<u32, OrchestrationError> {
    let mut value: u32 = ctx.input()?;
    for _ in 0..CHAIN_LENGTH {
        value = ctx.call_activity("AddOne", &value).await?;
    }
    Ok(value)
}

async fn fan_out(ctx: OrchestrationContext) -> Result<u32, OrchestrationError> {
    let base: u32 = ctx.input()?;
    let results = ctx.when_all((0..FAN_OUT_WIDTH).map(|i| ctx.call_activity::<u32>("AddOne", &(base + i)))).await;
    let mut sum = 0;
    for result in results {
        sum += result?;
    }
    Ok(sum)
}

/// Runs a chain as a sub-orchestration (instance `<id>-child`), then adds one.
async fn parent(ctx: OrchestrationContext) -> Result<u32, OrchestrationError> {
    let value: u32 = ctx.input()?;
    let child_id = format!("{}-child", ctx.instance_id());
    let chained: u32 = ctx.call_sub_orchestrator_with_id("Chain", Some(&child_id), &value).await?;
    Ok(ctx.call_activity("AddOne", &chained).await?)
}

/// The log of this worker process's activity executions.
struct ExecutionLog {
    worker: String,
    file: std::sync::Mutex<std::fs::File>,
}

impl ExecutionLog {
    /// One line per execution, written with one `write` on a file opened for
    /// appending, so that lines of a killed process are whole or absent.
    fn record(&self, context: &ActivityContext) {
        let line = format!("{} {} {}\n", self.worker, context.instance_id, context.task_id);
        let mut file = self.file.lock().expect("log lock");
        file.write_all(line.as_bytes()).expect("the execution log is writable");
    }
}

fn fleet_worker(store: Arc<dyn Store>, log: Arc<ExecutionLog>) -> keel::Worker {
    keel::Worker::builder(store)
        .options(worker_options())
        .orchestrator("Chain", chain)
        .orchestrator("FanOut", fan_out)
        .orchestrator("Parent", parent)
        .activity("AddOne", move |context: ActivityContext, value: u32| {
            let log = log.clone();
            async move {
                log.record(&context);
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok::<u32, ActivityError>(value + 1)
            }
        })
        .build()
}

/// The body of the ignored test `fleet_worker` that every multi-process test binary
/// defines: in a process started by [`Fleet::start_worker`], runs a worker until the
/// process is killed; anywhere else, does nothing.
pub fn run_worker_process() {
    let (Ok(url), Ok(log_path), Ok(name)) = (std::env::var(HUB_ENV), std::env::var(LOG_ENV), std::env::var(NAME_ENV))
    else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async move {
        let store = open_with_retries(&url).await;
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).expect("the log opens");
        let log = Arc::new(ExecutionLog { worker: name, file: std::sync::Mutex::new(file) });
        let _worker = fleet_worker(store, log).start();
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

/// Worker processes on one hub; all killed when dropped.
pub struct Fleet {
    hub_url: String,
    log_dir: tempfile::TempDir,
    workers: BTreeMap<String, Child>,
}

impl Fleet {
    pub fn new(hub_url: &str) -> Fleet {
        Fleet {
            hub_url: hub_url.to_owned(),
            log_dir: tempfile::tempdir().expect("a temp dir"),
            workers: BTreeMap::new(),
        }
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.log_dir.path().join(format!("{name}.log"))
    }

    /// Starts a worker process named `name`.
    pub fn start_worker(&mut self, name: &str) {
        let child = Command::new(std::env::current_exe().expect("the test binary"))
            .args(["--exact", "fleet_worker", "--ignored", "--nocapture", "--test-threads", "1"])
            .env(HUB_ENV, &self.hub_url)
            .env(LOG_ENV, self.log_path(name))
            .env(NAME_ENV, name)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("the worker process starts");
        self.workers.insert(name.to_owned(), child);
    }

    /// Kills a worker with SIGKILL: no chance to give anything back.
    pub fn kill(&mut self, name: &str) {
        let mut child = self.workers.remove(name).expect("a worker of that name");
        child.kill().expect("SIGKILL"); // Child::kill sends SIGKILL on Unix
        child.wait().expect("the killed worker is reaped");
    }

    /// Panics if a worker process has exited (crashed).
    pub fn assert_all_running(&mut self) {
        for (name, child) in &mut self.workers {
            let status = child.try_wait().expect("try_wait");
            assert!(status.is_none(), "worker {name} exited: {status:?}");
        }
    }

    /// How many activity executions `name` has logged.
    pub fn executions_by(&self, name: &str) -> usize {
        std::fs::read_to_string(self.log_path(name)).map(|log| log.lines().count()).unwrap_or(0)
    }

    /// Every logged execution: which workers ran each (instance, task).
    pub fn executions(&self) -> BTreeMap<(String, i32), Vec<String>> {
        let mut executions: BTreeMap<(String, i32), Vec<String>> = BTreeMap::new();
        for entry in std::fs::read_dir(self.log_dir.path()).expect("the log dir") {
            let log = std::fs::read_to_string(entry.expect("an entry").path()).expect("a log");
            for line in log.lines() {
                let mut fields = line.split(' ');
                let (Some(worker), Some(instance), Some(task)) = (fields.next(), fields.next(), fields.next()) else {
                    panic!("a malformed log line: {line:?}");
                };
                let task: i32 = task.parse().expect("a task id");
                executions.entry((instance.to_owned(), task)).or_default().push(worker.to_owned());
            }
        }
        executions
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for child in self.workers.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
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
        starts.push(("Chain", format!("chain-{n:04}"), n * 10));
        expected.push(Expected {
            instance_id: format!("chain-{n:04}"),
            output: n * 10 + CHAIN_LENGTH,
            decisions: CHAIN_LENGTH as usize,
            activities: CHAIN_LENGTH,
        });
    }
    for n in 0..fan_outs {
        starts.push(("FanOut", format!("fan-{n:04}"), n * 100));
        expected.push(Expected {
            instance_id: format!("fan-{n:04}"),
            output: (0..FAN_OUT_WIDTH).map(|i| n * 100 + i + 1).sum(),
            decisions: FAN_OUT_WIDTH as usize,
            activities: FAN_OUT_WIDTH,
        });
    }
    for n in 0..parents {
        starts.push(("Parent", format!("parent-{n:04}"), n * 7));
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
            .map(|(name, id, input)| {
                let client = client.clone();
                let (name, id, input) = (*name, id.clone(), *input);
                tokio::spawn(async move {
                    let options = StartOptions { instance_id: Some(id), ..StartOptions::default() };
                    client.start_with(name, &input, options).await
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

/// Prints a line past the test harness's capture, so that it shows in CI's log.
pub fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}
