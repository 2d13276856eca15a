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
    ActivityContext, ActivityError, EventKind, OrchestrationContext, OrchestrationError, RuntimeStatus, StartOptions,
};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/hub-v1.db");

async fn golden(ctx: OrchestrationContext) -> Result<String, OrchestrationError> {
    let name: String = ctx.input()?;
    let greeting: String = ctx.call_activity("Greet", &name).await?;
    let retry = keel::RetryPolicy::new(2, Duration::from_millis(10));
    let shout: String = ctx.call_activity_with_retry("Shout", &greeting, &retry).await?;
    let children = ctx.when_all((0..3u32).map(|n| ctx.call_sub_orchestrator::<u32>("Child", &n))).await;
    let total: u32 = children.into_iter().map(|child| child.unwrap_or(0)).sum();
    ctx.set_custom_status(&"waiting for approval");
    let approved: bool = ctx.wait_for_external_event("Approval").await?;
    Ok(format!("{shout} / {total} / {approved}"))
}

async fn child(ctx: OrchestrationContext) -> Result<u32, OrchestrationError> {
    let n: u32 = ctx.input()?;
    ctx.sleep(Duration::from_millis(5)).await;
    Ok(n * 10)
}

fn worker(store: &std::sync::Arc<dyn keel_store::Store>) -> keel::WorkerBuilder {
    common::worker(store)
        .orchestrator("Golden", golden)
        .orchestrator("Child", child)
        .activity("Greet", |_ctx: ActivityContext, name: String| async move {
            Ok::<_, ActivityError>(format!("hello {name}"))
        })
        .activity("Shout", |ctx: ActivityContext, text: String| async move {
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
    std::fs::copy(GOLDEN, &path).expect("the golden hub is checked in");
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
    client.raise_event("golden-waiting", "Approval", &false).await.unwrap();
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
    let _ = std::fs::remove_file(GOLDEN);
    let store = keel::store::open(&format!("sqlite://{GOLDEN}")).await.unwrap();
    let worker = worker(&store).build().start();
    let client = worker.client();
    for (id, name) in [("golden-done", "ada"), ("golden-waiting", "grace")] {
        let options = StartOptions { instance_id: Some(id.into()), ..StartOptions::default() };
        client.start_with("Golden", &name, options).await.unwrap();
    }
    for id in ["golden-done", "golden-waiting"] {
        common::wait_for_state(&client, id, "a custom status", |state| state.custom_status.is_some()).await;
    }
    client.raise_event("golden-done", "Approval", &true).await.unwrap();
    client.wait_for_completion("golden-done", WAIT).await.unwrap();
    worker.shutdown(WAIT).await;
    drop(client);
    drop(store);
}
