//! Golden task hub: a SQLite file written by an earlier Keel (schema version 1) is
//! checked in and opened on every run. A schema or history-format change must keep
//! opening it, replaying its histories and finishing its waiting instance.
//!
//! To write the file again (only when the format changes on purpose, with a migration):
//! `KEEL_WRITE_GOLDEN=1 cargo test -p keel --test golden -- --ignored write_golden_hub`

mod common;

use std::time::Duration;

use common::WAIT;
use keel::{
    Activity, ActivityContext, ActivityError, Event, EventKind, Never, Orchestration, OrchestrationContext,
    OrchestrationError, RuntimeStatus, StartOptions,
};

const GOLDEN_HUB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/hub-v1.db");

const GOLDEN: Orchestration<String, String> = Orchestration::new("Golden");
const CHILD: Orchestration<u32, u32> = Orchestration::new("Child");
const GREET: Activity<String, String, Never> = Activity::new("Greet");
const SHOUT: Activity<String, String> = Activity::new("Shout");
const APPROVAL: Event<bool> = Event::new("Approval");

/// The actions, in this order, are what the checked-in histories recorded: keep them.
async fn golden(ctx: OrchestrationContext, name: String) -> Result<String, OrchestrationError> {
    let greeting = ctx.call(GREET, &name).await?;
    let retry = keel::RetryPolicy::new(2, Duration::from_millis(10))?;
    let shout = ctx.call(SHOUT, &greeting).with_retry(retry).await?;
    let children = ctx.when_all((0..3u32).map(|n| ctx.call(CHILD, &n))).await;
    let total: u32 = children.into_iter().map(|child| child.unwrap_or(0)).sum();
    ctx.set_custom_status(&"waiting for approval");
    let approved = ctx.wait(APPROVAL).await?;
    Ok(format!("{shout} / {total} / {approved}"))
}

async fn child(ctx: OrchestrationContext, n: u32) -> Result<u32, OrchestrationError> {
    ctx.sleep(Duration::from_millis(5)).await;
    Ok(n * 10)
}

fn worker(store: &std::sync::Arc<dyn keel_store::Store>) -> keel::WorkerBuilder {
    common::worker(store)
        .orchestration(GOLDEN, golden)
        .orchestration(CHILD, child)
        .activity(GREET, |_ctx: ActivityContext, name: String| async move { Ok::<_, Never>(format!("hello {name}")) })
        .activity(SHOUT, |ctx: ActivityContext, text: String| async move {
            if ctx.delivery_attempt == 1 && text.is_empty() {
                return Err(ActivityError::msg("nothing to shout"));
            }
            Ok(text.to_uppercase())
        })
}

#[tokio::test]
async fn a_hub_written_by_an_earlier_version_opens_and_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    std::fs::copy(GOLDEN_HUB, &path).expect("the golden hub is checked in");
    let store = keel::store::open(&format!("sqlite://{}", path.display())).await.expect("the golden hub opens");
    let worker = worker(&store).build().start();
    let client = worker.client();

    let done = client.get_status("golden-done").await.unwrap().expect("the finished instance is there");
    assert_eq!(done.status, RuntimeStatus::Completed);
    assert_eq!(done.output.as_deref(), Some("\"HELLO ADA / 30 / true\""));
    let history = client.get_history("golden-done").await.unwrap();
    assert!(history.iter().any(|event| matches!(event.kind, EventKind::SubOrchestrationInstanceCompleted { .. })));

    let waiting = client.get_status("golden-waiting").await.unwrap().expect("the waiting instance is there");
    assert_eq!(waiting.status, RuntimeStatus::Running);
    assert_eq!(waiting.custom_status.as_deref(), Some("\"waiting for approval\""));
    // Replaying its stored history and going on from there.
    client.raise("golden-waiting", APPROVAL, &false).await.unwrap();
    let finished = client.wait_for_completion("golden-waiting", WAIT).await.unwrap();
    assert_eq!(finished.status, RuntimeStatus::Completed, "{finished:?}");
    assert_eq!(finished.output.as_deref(), Some("\"HELLO GRACE / 30 / false\""));
    worker.shutdown(WAIT).await;
}

/// Writes the golden hub (run by hand, see the module doc).
#[tokio::test]
#[ignore = "writes the checked-in golden file; run by hand when the format changes on purpose"]
async fn write_golden_hub() {
    if std::env::var("KEEL_WRITE_GOLDEN").is_err() {
        return;
    }
    let _ = std::fs::remove_file(GOLDEN_HUB);
    let store = keel::store::open(&format!("sqlite://{GOLDEN_HUB}")).await.unwrap();
    let worker = worker(&store).build().start();
    let client = worker.client();
    for (id, name) in [("golden-done", "ada"), ("golden-waiting", "grace")] {
        let options = StartOptions { instance_id: Some(id.into()), ..StartOptions::default() };
        client.start_with_options(GOLDEN, &name.to_string(), options).await.unwrap();
    }
    for id in ["golden-done", "golden-waiting"] {
        common::wait_for_state(&client, id, "a custom status", |state| state.custom_status.is_some()).await;
    }
    client.raise("golden-done", APPROVAL, &true).await.unwrap();
    client.wait_for_completion("golden-done", WAIT).await.unwrap();
    worker.shutdown(WAIT).await;
    drop(client);
    drop(store);
}
