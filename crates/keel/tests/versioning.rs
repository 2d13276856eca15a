//! Orchestration versions on a real SQLite task hub: versions side by side, the
//! version a sub-orchestration inherits, continue-as-new to a new version, and the
//! worker version policies (which instance runs on which worker). Version policies
//! decide where orchestration episodes run; activities run on any worker that has them.

mod common;

use std::time::Duration;

use common::{temp_store, test_options, worker, WAIT};
use keel::{
    Orchestration, OrchestrationContext, OrchestrationError, Outcome, StartOptions, VersionFailure, VersionMatch,
    Versioning, WorkerOptions,
};

const FLOW: Orchestration<u32, String> = Orchestration::new("Flow");
const CHILD: Orchestration<(), String> = Orchestration::new("Child");

async fn flow_v1(ctx: OrchestrationContext, n: u32) -> Result<String, OrchestrationError> {
    if n > 0 {
        // The next execution runs version 2's code.
        return ctx.continue_as_new_with_version(&(n - 1), "2");
    }
    Ok(format!("v1 code, version {:?}", ctx.version()))
}

async fn flow_v2(ctx: OrchestrationContext, worker: &str) -> Result<String, OrchestrationError> {
    let child = ctx.call(CHILD, &()).await?;
    Ok(format!("v2 code, version {:?}; child: {child}; ran on {worker}", ctx.version()))
}

async fn child(ctx: OrchestrationContext, _: ()) -> Result<String, OrchestrationError> {
    Ok(format!("child version {:?}", ctx.version()))
}

/// A worker whose version 2 code says which worker ran it.
fn versioned_worker(
    store: &std::sync::Arc<dyn keel_store::Store>,
    name: &'static str,
    versioning: Versioning,
) -> keel::WorkerBuilder {
    worker(store)
        .options(WorkerOptions { versioning, ..test_options() })
        .orchestration_version(FLOW, "1", flow_v1)
        .orchestration_version(FLOW, "2", move |ctx, _: u32| flow_v2(ctx, name))
        .orchestration(CHILD, child)
}

fn version(version: &str) -> StartOptions {
    StartOptions { version: Some(version.into()), ..StartOptions::default() }
}

#[tokio::test]
async fn versions_run_side_by_side_and_move_on_with_continue_as_new() {
    let (store, _dir) = temp_store().await;
    let worker = versioned_worker(&store, "any", Versioning::default()).build().start();
    let client = worker.client();

    let one = client.start_with_options(FLOW, &0, version("1")).await.unwrap();
    assert_eq!(one.wait(WAIT).await.unwrap(), Outcome::Completed("v1 code, version Some(\"1\")".into()));
    let two = client.start_with_options(FLOW, &0, version("2")).await.unwrap();
    assert_eq!(
        two.wait(WAIT).await.unwrap(),
        Outcome::Completed("v2 code, version Some(\"2\"); child: child version Some(\"2\"); ran on any".into()),
        "the sub-orchestration inherits the parent's version"
    );
    let moved = client.start_with_options(FLOW, &1, version("1")).await.unwrap();
    let Outcome::Completed(output) = moved.wait(WAIT).await.unwrap() else { panic!("completes") };
    assert!(output.starts_with("v2 code, version Some(\"2\")"), "{output}");
    let record = client.get_status(moved.id()).await.unwrap().unwrap();
    assert_eq!(record.version.as_deref(), Some("2"), "the instance's version moved to 2");
    worker.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_strict_worker_runs_only_its_version_and_leaves_the_rest_for_others() {
    let (store, _dir) = temp_store().await;
    let strict = |v: &str| Versioning {
        version: Some(v.into()),
        default_version: Some(v.into()),
        match_strategy: VersionMatch::Strict,
        failure_strategy: VersionFailure::Reject,
    };
    let old = versioned_worker(&store, "old", strict("1")).build().start();
    let new = versioned_worker(&store, "new", strict("2")).build().start();
    let mut instances = Vec::new();
    for n in 0..4 {
        let client = if n % 2 == 0 { old.client() } else { new.client() };
        // Each client stamps its worker's default version.
        let started = client.start(FLOW, &0).await.unwrap();
        instances.push((n % 2 == 0, started));
    }
    for (is_old, instance) in &instances {
        let Outcome::Completed(output) = instance.wait(WAIT).await.unwrap() else { panic!("completes") };
        if *is_old {
            assert_eq!(output, "v1 code, version Some(\"1\")");
        } else {
            assert!(output.ends_with("ran on new"), "a version 2 instance ran on the version 2 worker: {output}");
        }
    }
    old.shutdown(Duration::from_secs(5)).await;
    new.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn current_or_older_runs_older_instances_and_fail_fails_the_others() {
    let (store, _dir) = temp_store().await;
    let versioning = Versioning {
        version: Some("1.5".into()),
        default_version: None,
        match_strategy: VersionMatch::CurrentOrOlder,
        failure_strategy: VersionFailure::Fail,
    };
    let worker = versioned_worker(&store, "w", versioning).build().start();
    let client = worker.client();
    let older = client.start_with_options(FLOW, &0, version("1")).await.unwrap();
    assert_eq!(older.wait(WAIT).await.unwrap(), Outcome::Completed("v1 code, version Some(\"1\")".into()));
    let newer = client.start_with_options(FLOW, &0, version("2")).await.unwrap();
    let Outcome::Failed(failure) = newer.wait(WAIT).await.unwrap() else { panic!("a newer instance fails") };
    assert_eq!(failure.error_type, keel::versioning::VERSION_MISMATCH_ERROR_TYPE);
    assert!(failure.error_message.contains("version 2") && failure.error_message.contains("1.5"), "{failure:?}");
    worker.shutdown(Duration::from_secs(5)).await;
}

mod verify {
    use super::*;
    use keel::testing::HistoryExport;
    use keel::verify::{Verdict, VerifyFilter};
    use keel::{Activity, ActivityContext, Event, Never};

    const SHIP: Orchestration<(), String> = Orchestration::new("Ship");
    const PACK: Activity<(), String, Never> = Activity::new("Pack");
    const LABEL: Activity<(), String, Never> = Activity::new("Label");
    const WEIGH: Activity<(), String, Never> = Activity::new("Weigh");
    const GO: Event<()> = Event::new("Go");

    /// Pack, wait a moment, label, then wait for `Go`.
    async fn ship(ctx: OrchestrationContext, _: ()) -> Result<String, OrchestrationError> {
        let packed = ctx.call(PACK, &()).await?;
        ctx.sleep(Duration::from_millis(10)).await;
        let labelled = ctx.call(LABEL, &()).await?;
        ctx.wait(GO).await?;
        Ok(format!("{packed} {labelled}"))
    }

    async fn renamed_activity(ctx: OrchestrationContext, _: ()) -> Result<String, OrchestrationError> {
        let packed = ctx.call(WEIGH, &()).await?;
        ctx.sleep(Duration::from_millis(10)).await;
        Ok(packed)
    }

    async fn added_activity(ctx: OrchestrationContext, _: ()) -> Result<String, OrchestrationError> {
        ctx.call(WEIGH, &()).await?;
        let packed = ctx.call(PACK, &()).await?;
        Ok(packed)
    }

    async fn removed_timer(ctx: OrchestrationContext, _: ()) -> Result<String, OrchestrationError> {
        let packed = ctx.call(PACK, &()).await?;
        let labelled = ctx.call(LABEL, &()).await?;
        Ok(format!("{packed} {labelled}"))
    }

    fn build<F, Fut>(store: &std::sync::Arc<dyn keel_store::Store>, code: F) -> keel::Worker
    where
        F: Fn(OrchestrationContext, ()) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<String, OrchestrationError>> + Send + 'static,
    {
        worker(store)
            .orchestration(SHIP, code)
            .activity(PACK, |_: ActivityContext, ()| async { Ok("packed".to_string()) })
            .activity(LABEL, |_: ActivityContext, ()| async { Ok("labelled".to_string()) })
            .activity(WEIGH, |_: ActivityContext, ()| async { Ok("weighed".to_string()) })
            .build()
    }

    #[tokio::test]
    async fn a_hub_verifies_clean_against_its_code_and_names_each_divergence() {
        let (store, _dir) = temp_store().await;
        let running = build(&store, ship).start();
        let client = running.client();
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(client.start(SHIP, &()).await.unwrap());
        }
        for instance in &ids {
            common::wait_for_history(&client, instance.id(), "its second activity's result", |kind| {
                matches!(kind, keel::EventKind::TaskCompleted { task_scheduled_id: 2, .. })
            })
            .await;
        }
        running.shutdown(Duration::from_secs(5)).await;

        let report = build(&store, ship).verify(&VerifyFilter::default()).await.unwrap();
        assert_eq!(report.instances.len(), 3);
        assert!(report.is_clean(), "{report:?}");

        let cases: [(keel::Worker, &str); 3] = [
            (build(&store, renamed_activity), "at sequence number 0, history has TaskScheduled \"Pack\" but the orchestrator took TaskScheduled \"Weigh\""),
            (build(&store, added_activity), "at sequence number 0, history has TaskScheduled \"Pack\" but the orchestrator took TaskScheduled \"Weigh\""),
            (build(&store, removed_timer), "at sequence number 1, history has TimerCreated but the orchestrator took TaskScheduled \"Label\""),
        ];
        for (changed, expected) in cases {
            let report = changed.verify(&VerifyFilter::default()).await.unwrap();
            assert!(!report.is_clean());
            assert_eq!(report.diverged().count(), 3, "every in-flight instance is named");
            for instance in &report.instances {
                let Verdict::Diverged { divergence } = &instance.verdict else { panic!("{instance:?}") };
                assert!(divergence.contains(expected), "{divergence}");
            }
        }

        // Nothing was written: the instances carry on with the original code.
        let running = build(&store, ship).start();
        for instance in &ids {
            running.client().raise(instance.id(), GO, &()).await.unwrap();
            assert_eq!(instance.wait(WAIT).await.unwrap(), Outcome::Completed("packed labelled".into()));
        }
        // An exported history verifies the same way.
        let record = running.client().get_status(ids[0].id()).await.unwrap().unwrap();
        let export = HistoryExport {
            instance_id: record.instance_id,
            name: record.name,
            version: record.version,
            execution_id: record.execution_id,
            runtime_status: record.status,
            events: running.client().get_history(ids[0].id()).await.unwrap(),
        };
        assert_eq!(build(&store, ship).verify_export(&export).verdict, Verdict::Ok);
        assert!(matches!(build(&store, removed_timer).verify_export(&export).verdict, Verdict::Diverged { .. }));
        let nobody = worker(&store).build().verify_export(&export);
        assert_eq!(nobody.verdict, Verdict::NotHosted);
        running.shutdown(Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn a_changed_orchestrator_fails_at_its_first_mismatching_episode() {
        let (store, _dir) = temp_store().await;
        let running = build(&store, ship).start();
        let instance = running.client().start(SHIP, &()).await.unwrap();
        common::wait_for_history(&running.client(), instance.id(), "the timer", |kind| {
            matches!(kind, keel::EventKind::TimerCreated { .. })
        })
        .await;
        running.shutdown(Duration::from_secs(5)).await;
        let before = running_history_len(&store, instance.id()).await;

        let changed = build(&store, removed_timer).start();
        let Outcome::Failed(failure) = instance.wait(WAIT).await.unwrap() else { panic!("fails") };
        assert_eq!(failure.error_type, keel_core::replay::NON_DETERMINISM_ERROR_TYPE);
        assert!(failure.error_message.contains("at sequence number 1"), "{failure:?}");
        let after = running_history_len(&store, instance.id()).await;
        assert!(after - before <= 4, "one failing episode, no retries: {before} -> {after} events");
        changed.shutdown(Duration::from_secs(5)).await;
    }

    async fn running_history_len(store: &std::sync::Arc<dyn keel_store::Store>, id: &str) -> usize {
        store.read_history(id).await.unwrap().len()
    }
}

#[tokio::test]
async fn a_bad_version_is_refused_before_anything_is_written() {
    let (store, _dir) = temp_store().await;
    let worker = versioned_worker(&store, "any", Versioning::default()).build();
    let client = worker.client();
    let count = || async { client.query(&keel::InstanceQuery::default()).await.unwrap().instances.len() };
    let before = count().await;
    for bad in ["x".repeat(keel_core::limits::MAX_NAME_BYTES + 1), String::new(), "  ".into()] {
        let refused = client.start_with_options(FLOW, &0, version(&bad)).await;
        assert!(matches!(refused, Err(keel::ClientError::Invalid(_))), "{bad:?}: {refused:?}");
    }
    assert_eq!(count().await, before, "nothing was written");
}
