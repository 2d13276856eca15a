//! Worker version policies on PostgreSQL with real processes: two builds share one task
//! hub, `a1` of version 1 with the Strict match and `b1` of version 2 with
//! CurrentOrOlder, both leaving what they may not run for another worker (Reject), and
//! both with the code of versions 1, 2 and 3 registered (see `common::versioned`), so
//! that only their policies keep them from running an instance.
//!
//! The hub gets version 1 and version 2 instances, version 1 instances that continue
//! as new on version 2 (an upgrade), and version 3 instances, which no worker may run.
//! `b1`, the only worker that may run version 2, is killed with SIGKILL while it runs
//! version 2 instances. `a1` alone finishes the version 1 instances and the version 1
//! part of the upgrades and leaves every version 2 instance alone; then `b2`, a
//! replacement of `b1`'s build, finishes the rest. Last, `a1` is killed too and new
//! version 1 instances complete on `b2` (current-or-older runs older instances).
//!
//! Checked: every instance completes with the output of its version's code and on the
//! right version (sub-orchestrations inherit version 2, upgrades end on version 2),
//! nothing is failed, the version 3 instances never ran and are still pending, and,
//! from every worker's log of its orchestration code runs (replays and uncommitted
//! episodes included): each run was the code of the instance's version, and no worker
//! ever ran an instance of a version its policy forbids. Skipped without
//! `KEEL_TEST_POSTGRES_URL`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::fleet::{self, Fleet};
use common::versioned::{self, FlowInput, CURRENT_OR_OLDER_2, FLOW, ORCHESTRATION_LOG, STRICT_1};
use keel::{Client, InstanceQuery, InstanceStatus, RuntimeStatus, StartOptions};
use keel_store::Store;

/// Instances of each of versions 1 and 2.
const PER_VERSION: u32 = 24;
/// Version 1 instances that continue as new on version 2.
const UPGRADES: u32 = 8;
/// Version 3 instances: nobody may run them.
const NEWER: u32 = 3;
/// Version 1 instances started after `a1` is gone.
const LATE: u32 = 6;

/// b1 is killed once it has run this many version 2 instances past their activity.
const KILL_AFTER: usize = 3;

/// How long each phase may take.
const PHASE: Duration = Duration::from_secs(30);

/// A worker process of this binary's tests (see `common::fleet`).
#[test]
#[ignore = "a worker process started by the multi-process tests"]
fn fleet_worker() {
    fleet::run_worker_process();
}

/// The build each worker name runs.
fn build_of(worker: &str) -> &'static str {
    match worker {
        "a1" => STRICT_1,
        "b1" | "b2" => CURRENT_OR_OLDER_2,
        other => panic!("an unknown worker {other} logged"),
    }
}

/// An instance the test started and what it is started with.
struct Started {
    id: String,
    version: &'static str,
    input: FlowInput,
}

async fn start(client: &Client, id: String, version: &'static str, input: FlowInput) -> Started {
    let options =
        StartOptions { instance_id: Some(id.clone()), version: Some(version.to_owned()), ..StartOptions::default() };
    client.start_with_options(FLOW, &input, options).await.expect("the instance starts");
    Started { id, version, input }
}

/// Every instance of the hub by id.
async fn instances(store: &dyn Store) -> BTreeMap<String, InstanceStatus> {
    let query = InstanceQuery { page_size: 100_000, ..InstanceQuery::default() };
    let page = store.query_instances(&query).await.expect("query");
    page.instances.into_iter().map(|instance| (instance.instance_id.clone(), instance)).collect()
}

/// One line of an orchestration log.
#[derive(Debug)]
struct CodeRun {
    worker: String,
    instance: String,
    code: String,
    version: String,
    step: String,
    replay: bool,
}

fn code_runs(fleet: &Fleet) -> Vec<CodeRun> {
    fleet
        .lines(ORCHESTRATION_LOG)
        .into_iter()
        .map(|fields| {
            let [worker, instance, code, version, step, replay] = &fields[..] else {
                panic!("a malformed log line: {fields:?}")
            };
            CodeRun {
                worker: worker.clone(),
                instance: instance.clone(),
                code: code.clone(),
                version: version.clone(),
                step: step.clone(),
                replay: replay == "replay",
            }
        })
        .collect()
}

/// Panics if any logged code run broke a rule: the code of another version than the
/// instance's, or an instance of a version the worker's build may not run.
fn check_code_runs(runs: &[CodeRun]) {
    for run in runs {
        assert_eq!(run.code, run.version, "{run:?}: an instance ran the code of another version");
        assert!(
            versioned::may_run(build_of(&run.worker), &run.version),
            "{run:?}: worker {} ({}) ran a version {} instance",
            run.worker,
            build_of(&run.worker),
            run.version
        );
    }
}

/// Waits until `$ready` (an expression that may `.await`) holds, checking that the
/// workers stay up; panics after `$within`, naming `$what`.
macro_rules! wait_until {
    ($fleet:expr, $within:expr, $what:expr, $ready:expr) => {{
        let deadline = tokio::time::Instant::now() + $within;
        loop {
            if $ready {
                break;
            }
            $fleet.assert_all_running();
            assert!(tokio::time::Instant::now() < deadline, "not within {:?}: {}", $within, $what);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_instance_runs_only_on_workers_its_version_allows() {
    let Some(url) = common::postgres_url("each_instance_runs_only_on_workers_its_version_allows") else { return };
    let began = Instant::now();
    let schema = common::fresh_schema("keel_versions");
    let hub_url = common::hub_url(&url, &schema);
    let store = fleet::open_with_retries(&hub_url).await;
    let client = Client::new(store.clone());

    let mut fleet = Fleet::new(&hub_url);
    fleet.start_worker_of_build("a1", STRICT_1);
    fleet.start_worker_of_build("b1", CURRENT_OR_OLDER_2);
    let mut started = Vec::new();
    for n in 0..PER_VERSION {
        started.push(start(&client, format!("v1-{n:02}"), "1", FlowInput { start: n * 10, upgrade: false }).await);
        started.push(start(&client, format!("v2-{n:02}"), "2", FlowInput { start: n * 10, upgrade: false }).await);
    }
    for n in 0..UPGRADES {
        started.push(start(&client, format!("up-{n:02}"), "1", FlowInput { start: n * 10, upgrade: true }).await);
    }
    let mut newer = Vec::new();
    for n in 0..NEWER {
        newer.push(start(&client, format!("v3-{n:02}"), "3", FlowInput { start: n, upgrade: false }).await);
    }
    let all_started_in = began.elapsed();

    // Kill b1 with SIGKILL as it runs version 2 instances: once it has run version 2
    // code past an activity for a few of them.
    wait_until!(fleet, PHASE, "b1 runs version 2 instances", {
        let runs = code_runs(&fleet);
        let mid_run: BTreeSet<&str> = runs
            .iter()
            .filter(|run| run.worker == "b1" && run.version == "2" && run.step == "middle")
            .map(|run| run.instance.as_str())
            .collect();
        mid_run.len() >= KILL_AFTER
    });
    fleet.kill("b1");
    let killed_in = began.elapsed();
    check_code_runs(&code_runs(&fleet));
    let at_kill = instances(store.as_ref()).await;
    let v2_left = started
        .iter()
        .filter(|instance| {
            let (_, final_version) = versioned::expected_output(instance.version, instance.input);
            final_version == "2" && at_kill[&instance.id].status != RuntimeStatus::Completed
        })
        .count();
    assert!(v2_left > 0, "b1 finished every version 2 instance before the kill; the test proves nothing");

    // a1 alone: it finishes every version 1 instance and the version 1 part of each
    // upgrade (b1's leases run out), and leaves the version 2 instances alone.
    wait_until!(fleet, PHASE, "a1 alone finishes the version 1 work", {
        let now = instances(store.as_ref()).await;
        started.iter().all(|instance| {
            let record = &now[&instance.id];
            match (instance.version, instance.input.upgrade) {
                ("1", false) => record.status == RuntimeStatus::Completed,
                ("1", true) => record.version.as_deref() == Some("2"),
                _ => true,
            }
        })
    });
    let without_b = instances(store.as_ref()).await;
    let failed: Vec<&InstanceStatus> =
        without_b.values().filter(|record| record.status == RuntimeStatus::Failed).collect();
    assert!(failed.is_empty(), "instances failed while only a1 ran: {failed:#?}");
    let v2_waiting = without_b
        .values()
        .filter(|record| record.version.as_deref() == Some("2") && record.status != RuntimeStatus::Completed)
        .count();
    assert!(v2_waiting >= UPGRADES as usize, "every upgraded instance waits for a version 2 worker");
    check_code_runs(&code_runs(&fleet));
    let a1_alone_in = began.elapsed();

    // b2, a replacement of b1's build, finishes the rest.
    fleet.start_worker_of_build("b2", CURRENT_OR_OLDER_2);
    let children: Vec<String> = started
        .iter()
        .filter(|instance| versioned::expected_output(instance.version, instance.input).1 == "2")
        .map(|instance| format!("{}-child", instance.id))
        .collect();
    wait_until!(fleet, PHASE, "every instance but the version 3 ones completes", {
        let now = instances(store.as_ref()).await;
        started
            .iter()
            .map(|instance| &instance.id)
            .chain(&children)
            .all(|id| now.get(id).is_some_and(|record| record.status == RuntimeStatus::Completed))
    });

    let rest_in = began.elapsed();

    // a1 goes too; version 1 instances started now run on b2.
    fleet.kill("a1");
    let mut late = Vec::new();
    for n in 0..LATE {
        let input = FlowInput { start: 1000 + n, upgrade: false };
        late.push(start(&client, format!("late-{n:02}"), "1", input).await);
    }
    wait_until!(fleet, PHASE, "the late version 1 instances complete on b2", {
        let now = instances(store.as_ref()).await;
        late.iter().all(|instance| now[&instance.id].status == RuntimeStatus::Completed)
    });
    let done_in = began.elapsed();

    // Outputs and versions.
    let end = instances(store.as_ref()).await;
    for instance in started.iter().chain(&late) {
        let record = &end[&instance.id];
        let (output, final_version) = versioned::expected_output(instance.version, instance.input);
        assert_eq!(record.status, RuntimeStatus::Completed, "{}: {record:?}", instance.id);
        assert_eq!(record.output_as::<String>().expect("a string"), output, "{}: the output", instance.id);
        assert_eq!(record.version.as_deref(), Some(final_version), "{}: the version it ends on", instance.id);
    }
    for id in &children {
        let record = &end[id];
        assert_eq!(record.status, RuntimeStatus::Completed, "{id}: {record:?}");
        assert_eq!(record.version.as_deref(), Some("2"), "{id}: a sub-orchestration inherits its parent's version");
    }
    for instance in &newer {
        let record = &end[&instance.id];
        assert_eq!(record.status, RuntimeStatus::Pending, "{}: nobody may run version 3: {record:?}", instance.id);
        assert_eq!(record.history_len, 0, "{}: it never ran", instance.id);
    }
    let failed: Vec<&InstanceStatus> = end.values().filter(|record| record.status == RuntimeStatus::Failed).collect();
    assert!(failed.is_empty(), "failed instances: {failed:#?}");

    // Who ran what.
    let runs = code_runs(&fleet);
    check_code_runs(&runs);
    assert!(runs.iter().all(|run| run.version != "3"), "version 3 code ran");
    for instance in &late {
        let workers: BTreeSet<&str> =
            runs.iter().filter(|run| run.instance == instance.id).map(|run| run.worker.as_str()).collect();
        assert_eq!(workers, BTreeSet::from(["b2"]), "{}: a late version 1 instance ran on b2 only", instance.id);
    }
    let mut per_worker: BTreeMap<(&str, &str), (BTreeSet<&str>, usize)> = BTreeMap::new();
    for run in &runs {
        let entry = per_worker.entry((run.worker.as_str(), run.version.as_str())).or_default();
        entry.0.insert(run.instance.as_str());
        entry.1 += usize::from(run.replay);
    }
    let summary: Vec<String> = per_worker
        .iter()
        .map(|((worker, version), (instances, replays))| {
            format!("{worker} ran version {version} code for {} instances ({replays} replayed steps)", instances.len())
        })
        .collect();
    fleet::report(&format!(
        "versioning: {} instances ({PER_VERSION} v1 + {PER_VERSION} v2, {UPGRADES} v1→v2 upgrades, {} v2 children, {LATE} \
         late v1, {NEWER} v3 left pending); b1 (v2, current-or-older) killed with SIGKILL with {v2_left} v2-bound \
         instances unfinished; a1 (v1, strict) alone finished the v1 work and failed nothing; b2 finished the rest; a1 \
         killed, the late v1 instances ran on b2. Times from the start: all started {:.1} s, b1 killed \
         {:.1} s, a1 done alone {:.1} s, the rest done on b2 {:.1} s, the late instances done {:.1} s. {}",
        started.len() + children.len() + late.len() + newer.len(),
        children.len(),
        all_started_in.as_secs_f64(),
        killed_in.as_secs_f64(),
        a1_alone_in.as_secs_f64(),
        rest_in.as_secs_f64(),
        done_in.as_secs_f64(),
        summary.join("; ")
    ));

    drop(fleet);
    drop(client);
    drop(store);
    let store = keel_postgres::PostgresStore::open(common::hub_options(&url, &schema)).await.expect("reopen");
    store.delete_task_hub().await.expect("delete");
}
