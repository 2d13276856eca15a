//! Every accepted management command takes effect, in the order it was accepted,
//! whatever state the instance was in when it was accepted (issue 14, defect 1: a resume
//! accepted before an earlier suspend was applied used to be dropped).

mod common;

use std::time::Duration;

use common::{temp_store, wait_for_state, worker, WAIT};
use keel::{Never, Orchestration, OrchestrationContext, OrchestrationError, Outcome, RuntimeStatus, StartOptions};

const QUICK: Orchestration<(), String> = Orchestration::new("Quick");
const STEP: keel::Activity<(), (), Never> = keel::Activity::new("Step");

async fn quick(ctx: OrchestrationContext, _: ()) -> Result<String, OrchestrationError> {
    ctx.call(STEP, &()).await?;
    Ok("done".into())
}

fn later(millis: i64) -> StartOptions {
    StartOptions {
        scheduled_start: Some(chrono::Utc::now() + chrono::Duration::milliseconds(millis)),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_resume_accepted_before_its_suspend_was_applied_still_takes_effect() {
    let (store, _dir) = temp_store().await;
    let worker = worker(&store)
        .orchestration(QUICK, quick)
        .activity(STEP, |_: keel::ActivityContext, ()| async { Ok(()) })
        .build()
        .start();
    let client = worker.client();
    let instance = client.start_with_options(QUICK, &(), later(500)).await.unwrap();
    client.suspend(instance.id(), Some("hold")).await.unwrap();
    client.resume(instance.id(), Some("go")).await.unwrap();
    assert_eq!(client.get_status(instance.id()).await.unwrap().unwrap().status, RuntimeStatus::Pending);
    assert_eq!(instance.wait(WAIT).await.unwrap(), Outcome::Completed("done".into()), "the resume was not lost");

    // Suspend, resume, suspend before the start: the last one wins, then a resume.
    let held = client.start_with_options(QUICK, &(), later(300)).await.unwrap();
    for command in ["suspend", "resume", "suspend"] {
        match command {
            "suspend" => client.suspend(held.id(), None).await.unwrap(),
            _ => client.resume(held.id(), None).await.unwrap(),
        }
    }
    wait_for_state(&client, held.id(), "suspended", |state| state.status == RuntimeStatus::Suspended).await;
    let history = client.get_history(held.id()).await.unwrap();
    let kinds: Vec<&str> = history.iter().map(|event| event.kind.type_name()).collect();
    assert_eq!(
        kinds
            .iter()
            .filter(|kind| kind.starts_with("ExecutionSuspended") || kind.starts_with("ExecutionResumed"))
            .count(),
        3,
        "each command took effect in order: {kinds:?}"
    );
    client.resume(held.id(), None).await.unwrap();
    client.resume(held.id(), None).await.unwrap(); // a second resume changes nothing
    assert_eq!(held.wait(WAIT).await.unwrap(), Outcome::Completed("done".into()));
    let history = client.get_history(held.id()).await.unwrap();
    let resumes = history.iter().filter(|event| event.kind.type_name() == "ExecutionResumed").count();
    assert_eq!(resumes, 2, "the redundant resume left no trace");
    worker.shutdown(Duration::from_secs(5)).await;
}

const SLOW_FAN_OUT: keel::Orchestration<u32, u32> = keel::Orchestration::new("SlowFanOut");
const NAP: keel::Activity<u32, u32, keel::Never> = keel::Activity::new("Nap");

/// A dropped handle detaches the worker: it goes on running its instances (here with
/// every activity slot taken, where the dispatcher waits for a slot or for shutdown —
/// the closed shutdown channel of a dropped handle must not end or busy-wake it).
#[tokio::test(flavor = "current_thread")]
async fn a_worker_whose_handle_was_dropped_keeps_working() {
    let (store, _dir) = common::temp_store().await;
    let worker = common::worker(&store)
        .options(keel::WorkerOptions { max_concurrent_activities: 1, ..common::test_options() })
        .orchestration(SLOW_FAN_OUT, |ctx: keel::OrchestrationContext, n: u32| async move {
            let naps: Vec<_> = (0..n).map(|i| ctx.call(NAP, &i)).collect();
            let slept = futures_util::future::try_join_all(naps).await?;
            Ok(slept.into_iter().sum::<u32>())
        })
        .activity(NAP, |_ctx: keel::ActivityContext, i: u32| async move {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            Ok(i)
        })
        .build();
    let client = worker.client();
    drop(worker.start());
    let instance = client.start(SLOW_FAN_OUT, &4).await.expect("start");
    let outcome = tokio::time::timeout(common::WAIT, instance.wait(common::WAIT)).await;
    let outcome = outcome.expect("the detached worker finished the instance").expect("wait");
    assert_eq!(outcome, keel::Outcome::Completed(6));
}
