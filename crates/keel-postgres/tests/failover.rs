//! Failover on PostgreSQL with real processes and the default leases: a worker process
//! killed with SIGKILL while it holds orchestration work and activity work has all of
//! it finished by the other worker within 15 s of the kill.
//!
//! Two worker processes share one task hub, with `WorkerOptions::default()` but for
//! four activity slots each. `Held` orchestrations each run a `Hold` activity, which
//! lasts until the test opens a gate (a file), then a chain of `AddOne` steps; `Steps`
//! orchestrations run only the chain. `w1` starts alone and fills its slots with
//! `Hold`s; then a `Gate` entity operation that blocks its thread until the gate opens
//! and a batch of `Steps` starts become due at one instant, so that `w1` takes them
//! all in one orchestration batch, which the operation blocks; then `w2` starts and
//! takes the other `Hold`s. For longer than a lease nothing `w1` holds moves to `w2`
//! (the heartbeat renews the leases of the running activities and of the blocked
//! batch). Then `w1` is killed and the gate opened: every instance `w1` held (its
//! `Hold`s' orchestrations, the batch's `Steps`, the entity) must complete on `w2`
//! within 15 s of the kill, measured from the kill to the commit time the store
//! recorded for each, and the last one printed. Triggers count the lease renewals
//! while the work is held (the heartbeat's cost, printed too). Skipped without
//! `KEEL_TEST_POSTGRES_URL` (a failure under `CI=true`).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::fleet::{self, ExecutionLog};
use keel::clock::{Clock, SystemClock};
use keel::{
    Activity, ActivityContext, Client, EntityContext, EntityId, EventKind, Never, Orchestration, OrchestrationContext,
    OrchestrationError, RuntimeStatus, StartOptions, Timestamp, WorkerOptions,
};
use keel_testkit::process::ChildTest;

/// Set in a worker process: the task hub's URL.
const HUB_ENV: &str = "KEEL_FAILOVER_HUB";
/// Set in a worker process: the directory of the logs and of the gate.
const DIR_ENV: &str = "KEEL_FAILOVER_DIR";
/// Set in a worker process: its name in the logs.
const NAME_ENV: &str = "KEEL_FAILOVER_WORKER";

/// The file whose existence opens the gate.
const GATE: &str = "gate";
/// The extension of the activity logs (`worker activity instance task` per execution).
const ACTIVITY_LOG: &str = "activities";
/// The extension of the entity logs (`worker key` per operation run).
const ENTITY_LOG: &str = "entities";

/// `Held` orchestrations: more than one worker's activity slots, so both hold some.
const HELD: u32 = 6;
/// Activity slots of each worker.
const SLOTS: usize = 4;
/// `Steps` orchestrations that become due with the entity operation, in `w1`'s batch.
const BATCHED: u32 = 10;
/// `AddOne` steps of each chain.
const STEPS: u32 = 3;
/// How long the work stays held before the kill: longer than a lease.
const HOLD_FOR: Duration = Duration::from_secs(12);
/// The promise: the work of a killed worker finishes on another within this.
const FAILOVER_BOUND: Duration = Duration::from_secs(15);

const HELD_ORCHESTRATION: Orchestration<u32, u32> = Orchestration::new("Held");
const STEPS_ORCHESTRATION: Orchestration<u32, u32> = Orchestration::new("Steps");
const HOLD: Activity<u32, u32, Never> = Activity::new("Hold");
const ADD_ONE: Activity<u32, u32, Never> = Activity::new("AddOne");
const GATE_ENTITY: &str = "Gate";

async fn held(ctx: OrchestrationContext, value: u32) -> Result<u32, OrchestrationError> {
    let value = ctx.call(HOLD, &value).await?;
    steps(ctx, value).await
}

async fn steps(ctx: OrchestrationContext, mut value: u32) -> Result<u32, OrchestrationError> {
    for _ in 0..STEPS {
        value = ctx.call(ADD_ONE, &value).await?;
    }
    Ok(value)
}

/// A worker process of this test (see the module doc).
#[test]
#[ignore = "a worker process started by the failover test"]
fn failover_worker() {
    let (Ok(url), Ok(dir), Ok(name)) = (std::env::var(HUB_ENV), std::env::var(DIR_ENV), std::env::var(NAME_ENV)) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let gate = dir.join(GATE);
    let activity_log = ExecutionLog::open(&name, &log_path(&dir, &name, ACTIVITY_LOG));
    let entity_log = ExecutionLog::open(&name, &log_path(&dir, &name, ENTITY_LOG));
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async move {
        let store = fleet::open_with_retries(&url).await;
        let options = WorkerOptions { max_concurrent_activities: SLOTS, ..WorkerOptions::default() };
        let hold_log = activity_log.clone();
        let _worker = keel::Worker::builder(store)
            .options(options)
            .orchestration(HELD_ORCHESTRATION, held)
            .orchestration(STEPS_ORCHESTRATION, steps)
            .activity(HOLD, move |context: ActivityContext, value: u32| {
                let (log, gate) = (hold_log.clone(), gate.clone());
                async move {
                    log.record(format_args!("Hold {} {}", context.instance_id, context.task_id));
                    // Long-running work: it lasts until the test opens the gate.
                    while !gate.exists() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Ok::<u32, Never>(value)
                }
            })
            .activity(ADD_ONE, move |context: ActivityContext, value: u32| {
                let log = activity_log.clone();
                async move {
                    log.record(format_args!("AddOne {} {}", context.instance_id, context.task_id));
                    Ok::<u32, Never>(value + 1)
                }
            })
            .entity(GATE_ENTITY, move |ctx: &mut EntityContext<u32>| {
                entity_log.record(format_args!("{}", ctx.id().key));
                // Slow synchronous work: it blocks the batch (and its thread) until the
                // gate opens.
                let gate = dir.join(GATE);
                while !gate.exists() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                *ctx.state_mut() += 1;
                Ok(())
            })
            .build()
            .start();
        std::future::pending::<()>().await;
    });
}

fn log_path(dir: &Path, name: &str, kind: &str) -> PathBuf {
    dir.join(format!("{name}.{kind}"))
}

/// The lines of `name`'s log of kind `kind`, split into fields (its name left out).
fn log_of(dir: &Path, name: &str, kind: &str) -> Vec<Vec<String>> {
    std::fs::read_to_string(log_path(dir, name, kind))
        .map(|log| log.lines().map(|line| line.split(' ').skip(1).map(str::to_owned).collect()).collect())
        .unwrap_or_default()
}

/// The `Hold` executions `name` has logged: the instance of each.
fn holds_by(dir: &Path, name: &str) -> Vec<String> {
    log_of(dir, name, ACTIVITY_LOG)
        .into_iter()
        .filter(|fields| fields[0] == "Hold")
        .map(|fields| fields[1].clone())
        .collect()
}

fn held_id(n: u32) -> String {
    format!("held-{n}")
}

fn steps_id(n: u32) -> String {
    format!("steps-{n:02}")
}

fn gate_entity() -> EntityId {
    EntityId::new(GATE_ENTITY, "g").expect("a valid entity id")
}

/// Starts a worker process named `name` on `hub_url`, logging to `dir`.
fn start_worker(hub_url: &str, dir: &Path, name: &str) -> ChildTest {
    let mut command = ChildTest::command("failover_worker");
    command.env(HUB_ENV, hub_url).env(DIR_ENV, dir).env(NAME_ENV, name).stdout(Stdio::null());
    ChildTest::spawn(command)
}

/// Waits until `condition` holds, checking that the workers stay up; panics after `within`.
async fn wait_until(
    what: &str,
    workers: &mut BTreeMap<&str, ChildTest>,
    within: Duration,
    mut condition: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert_running(workers);
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_running(workers: &mut BTreeMap<&str, ChildTest>) {
    for (name, worker) in workers.iter_mut() {
        let status = worker.exit_status();
        assert!(status.is_none(), "worker {name} exited: {status:?}");
    }
}

async fn status_of(client: &Client, instance_id: &str) -> keel::InstanceStatus {
    client.get_status(instance_id).await.expect("get_status").unwrap_or_else(|| panic!("{instance_id} exists"))
}

/// The entity's committed state (0 before its first batch) and when it was written.
async fn entity_state(client: &Client) -> (u32, Option<Timestamp>) {
    match client.get_entity(&gate_entity()).await.expect("get_entity") {
        Some(metadata) if metadata.exists() => (metadata.state_as().expect("a count"), Some(metadata.last_modified)),
        _ => (0, None),
    }
}

/// How long after `killed_at` something recorded at `at` happened.
fn after_kill(killed_at: Timestamp, at: Timestamp) -> Duration {
    (at - killed_at).to_std().unwrap_or(Duration::ZERO)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_work_finishes_on_the_other_within_15_s() {
    let Some(url) = common::postgres_url("a_killed_workers_work_finishes_on_the_other_within_15_s") else { return };
    let schema = common::fresh_schema("keel_failover");
    let hub_url = common::hub_url(&url, &schema);
    let store = fleet::open_with_retries(&hub_url).await;
    let client = Client::new(store.clone());
    let renewals = Renewals::count(&url, &schema).await;
    let temp = tempfile::tempdir().expect("a temp dir");
    let dir = temp.path();
    let mut workers = BTreeMap::new();

    // w1 alone takes the Held orchestrations and fills its slots with their Holds.
    for n in 0..HELD {
        let options = StartOptions { instance_id: Some(held_id(n)), ..StartOptions::default() };
        client.start_with_options(HELD_ORCHESTRATION, &(n * 10), options).await.expect("a start");
    }
    workers.insert("w1", start_worker(&hub_url, dir, "w1"));
    wait_until("w1 runs a Hold in each of its slots", &mut workers, Duration::from_secs(30), || {
        holds_by(dir, "w1").len() == SLOTS
    })
    .await;

    // The blocking entity operation and the Steps starts come due at one instant: w1
    // takes them all in one batch.
    let due = SystemClock.now() + chrono::Duration::seconds(2);
    client.signal_entity_at(&gate_entity(), "hold", &(), due).await.expect("the signal");
    for n in 0..BATCHED {
        let options =
            StartOptions { instance_id: Some(steps_id(n)), scheduled_start: Some(due), ..StartOptions::default() };
        client.start_with_options(STEPS_ORCHESTRATION, &(n * 100), options).await.expect("a start");
    }
    assert!(SystemClock.now() < due, "the starts took longer than planned");
    wait_until("w1 runs the entity operation", &mut workers, Duration::from_secs(30), || {
        log_of(dir, "w1", ENTITY_LOG).len() == 1
    })
    .await;
    let holding_since = Instant::now();

    // w2 takes the Holds left.
    workers.insert("w2", start_worker(&hub_url, dir, "w2"));
    wait_until("w2 runs the Holds left", &mut workers, Duration::from_secs(30), || {
        holds_by(dir, "w2").len() == HELD as usize - SLOTS
    })
    .await;

    // For longer than a lease, nothing w1 holds moves to w2: its Holds run on, its
    // batch stays uncommitted (the Steps are not started), the operation runs once.
    let window_start = Instant::now();
    let renewed_before = renewals.so_far().await;
    while holding_since.elapsed() < HOLD_FOR {
        assert_running(&mut workers);
        assert_eq!(holds_by(dir, "w1").len(), SLOTS, "w1's Holds ran again");
        assert_eq!(holds_by(dir, "w2").len(), HELD as usize - SLOTS, "a Hold moved to w2 while w1 lived");
        assert!(log_of(dir, "w2", ENTITY_LOG).is_empty(), "the entity operation moved to w2 while w1 lived");
        for n in 0..BATCHED {
            let status = status_of(&client, &steps_id(n)).await;
            assert_eq!(
                status.status,
                RuntimeStatus::Pending,
                "{}: w1's batch was taken over while w1 lived",
                steps_id(n)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let renewed = renewals.so_far().await - renewed_before;
    let window = window_start.elapsed().as_secs_f64();
    let w1_holds = holds_by(dir, "w1");
    let killed_at = SystemClock.now();
    workers.remove("w1").expect("w1").kill();
    std::fs::write(dir.join(GATE), "open").expect("the gate opens");

    // Everything finishes, on w2.
    let mut held_by_w1: Vec<String> = w1_holds.clone();
    held_by_w1.extend((0..BATCHED).map(steps_id));
    let all: Vec<String> = (0..HELD).map(held_id).chain((0..BATCHED).map(steps_id)).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut done = 0;
        for id in &all {
            done += usize::from(status_of(&client, id).await.status == RuntimeStatus::Completed);
        }
        if done == all.len() && entity_state(&client).await.0 == 1 {
            break;
        }
        assert_running(&mut workers);
        assert!(Instant::now() < deadline, "only {done} of {} instances completed after the kill", all.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // When each instance w1 held completed, by the commit times the store recorded.
    let mut failover = Duration::ZERO;
    let mut slowest = String::new();
    for id in &held_by_w1 {
        let completed_at = status_of(&client, id).await.completed_at.expect("a completion time");
        let took = after_kill(killed_at, completed_at);
        if took >= failover {
            (failover, slowest) = (took, id.clone());
        }
    }
    let (count, modified) = entity_state(&client).await;
    assert_eq!(count, 1, "the entity operation was applied once");
    let entity_took = after_kill(killed_at, modified.expect("a modification time"));
    if entity_took >= failover {
        (failover, slowest) = (entity_took, gate_entity().to_string());
    }
    let mut own = Duration::ZERO;
    for id in (0..HELD).map(held_id).filter(|id| !w1_holds.contains(id)) {
        own = own.max(after_kill(killed_at, status_of(&client, &id).await.completed_at.expect("a completion time")));
    }
    fleet::report(&format!(
        "failover: w1 killed with SIGKILL holding {} activities (Holds, each running for over {:.1} s, longer than the {:?} lease) \
         and a batch of {} instances (the entity {} blocked in an operation, and {BATCHED} Steps); all of it \
         completed on w2 {:.2} s after the kill (the last: {slowest}; the entity {:.2} s); w2's own held work \
         {:.2} s after it (the gate opened at the kill)",
        w1_holds.len(),
        HOLD_FOR.as_secs_f64(),
        WorkerOptions::default().activity_lease,
        BATCHED + 1,
        gate_entity(),
        failover.as_secs_f64(),
        entity_took.as_secs_f64(),
        own.as_secs_f64(),
    ));
    assert!(failover <= FAILOVER_BOUND, "w1's work finished {failover:?} after the kill (the last: {slowest})");
    // Renewals while held: HELD activities, and w1's batch of BATCHED + 1 instances.
    let held_batch = f64::from(BATCHED + 1);
    fleet::report(&format!(
        "failover renewals over {window:.1} s of holding: {} activity lease renewals ({:.3} per second per running \
         activity), {} instance lease renewals ({:.3} per second per held instance)",
        renewed.activities,
        renewed.activities as f64 / window / f64::from(HELD),
        renewed.instances,
        renewed.instances as f64 / window / held_batch,
    ));
    assert!(renewed.activities >= u64::from(HELD), "the heartbeat renewed each running activity's lease");
    assert!(renewed.instances >= u64::from(BATCHED + 1), "the heartbeat renewed the batch's leases");

    // The right outputs, no decision twice, and w1's work ran again on w2 only.
    for n in 0..HELD {
        verify(&client, &held_id(n), n * 10 + STEPS, STEPS as usize + 1).await;
    }
    for n in 0..BATCHED {
        verify(&client, &steps_id(n), n * 100 + STEPS, STEPS as usize).await;
    }
    let mut w2_holds = holds_by(dir, "w2");
    w2_holds.sort();
    let mut expected_w2_holds: Vec<String> = (0..HELD).map(held_id).collect();
    expected_w2_holds.sort();
    assert_eq!(w2_holds, expected_w2_holds, "w2 ran its own Holds and w1's again, each once");
    let steps_run = |name: &str| log_of(dir, name, ACTIVITY_LOG).iter().filter(|fields| fields[0] == "AddOne").count();
    assert_eq!(steps_run("w1"), 0, "w1 ran no step before the gate opened");
    assert_eq!(steps_run("w2"), ((HELD + BATCHED) * STEPS) as usize, "w2 ran every step once");
    assert_eq!(log_of(dir, "w2", ENTITY_LOG).len(), 1, "w2 ran the entity operation w1 never committed");

    drop(workers);
    drop(client);
    drop(store);
    let store = keel_postgres::PostgresStore::open(common::hub_options(&url, &schema)).await.expect("reopen");
    store.delete_task_hub().await.expect("delete");
}

/// Lease renewals in a task hub, counted as they happen by triggers: updates that move a
/// lease's end under the same token.
struct Renewals {
    client: tokio_postgres::Client,
    schema: String,
}

/// Renewals counted so far.
#[derive(Clone, Copy)]
struct Renewed {
    activities: u64,
    instances: u64,
}

impl std::ops::Sub for Renewed {
    type Output = Renewed;

    fn sub(self, earlier: Renewed) -> Renewed {
        Renewed { activities: self.activities - earlier.activities, instances: self.instances - earlier.instances }
    }
}

impl Renewals {
    /// Starts counting in the hub in `schema` (its tables exist).
    async fn count(url: &str, schema: &str) -> Renewals {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect");
        tokio::spawn(connection);
        client
            .batch_execute(&format!(
                "CREATE TABLE {schema}.renewals (kind TEXT NOT NULL); \
                 CREATE FUNCTION {schema}.count_renewal() RETURNS trigger LANGUAGE plpgsql AS $$ \
                     BEGIN INSERT INTO {schema}.renewals (kind) VALUES (TG_ARGV[0]); RETURN NULL; END $$; \
                 CREATE TRIGGER activity_renewals AFTER UPDATE ON {schema}.activities FOR EACH ROW \
                     WHEN (OLD.lock_token = NEW.lock_token AND OLD.visible_at IS DISTINCT FROM NEW.visible_at) \
                     EXECUTE FUNCTION {schema}.count_renewal('activity'); \
                 CREATE TRIGGER instance_renewals AFTER UPDATE ON {schema}.instances FOR EACH ROW \
                     WHEN (OLD.lock_token = NEW.lock_token AND OLD.locked_until IS DISTINCT FROM NEW.locked_until) \
                     EXECUTE FUNCTION {schema}.count_renewal('instance');"
            ))
            .await
            .expect("the renewal counters");
        Renewals { client, schema: schema.to_owned() }
    }

    async fn so_far(&self) -> Renewed {
        let query = format!(
            "SELECT count(*) FILTER (WHERE kind = 'activity'), count(*) FILTER (WHERE kind = 'instance') \
             FROM {}.renewals",
            self.schema
        );
        let row = self.client.query_one(&query, &[]).await.expect("the renewal count");
        let count = |index: usize| u64::try_from(row.get::<_, i64>(index)).expect("a count");
        Renewed { activities: count(0), instances: count(1) }
    }
}

/// Checks an instance: completed with `output`, `decisions` decisions, none twice.
async fn verify(client: &Client, instance_id: &str, output: u32, decisions: usize) {
    let status = status_of(client, instance_id).await;
    assert_eq!(status.status, RuntimeStatus::Completed, "{instance_id}: {status:?}");
    assert_eq!(status.output_as::<u32>().expect("a number"), output, "{instance_id}: the output");
    let history = client.get_history(instance_id).await.expect("get_history");
    let mut ids = HashSet::new();
    for event in history.iter().filter(|event| event.kind.is_decision()) {
        assert!(ids.insert(event.event_id), "{instance_id}: decision #{} recorded twice: {history:#?}", event.event_id);
    }
    assert_eq!(ids.len(), decisions, "{instance_id}: decisions in {history:#?}");
    let results = history.iter().filter(|event| matches!(event.kind, EventKind::TaskCompleted { .. })).count();
    assert_eq!(results, decisions, "{instance_id}: one result per activity");
}
