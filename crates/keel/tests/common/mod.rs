//! Shared helpers of the runtime tests: a task hub on a temporary SQLite file and a
//! worker with short timings.

#![allow(dead_code)] // each test binary uses its own subset

use std::sync::Arc;
use std::time::Duration;

use keel::{WorkerBuilder, WorkerOptions};
use keel_store::Store;

/// A fresh task hub in a temporary directory (kept alive by the returned guard).
pub async fn temp_store() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let url = format!("sqlite://{}", dir.path().join("hub.db").display());
    let store = keel::store::open(&url).await.expect("the store opens");
    (store, dir)
}

/// Worker options for tests: short leases so that crash recovery is quick.
pub fn test_options() -> WorkerOptions {
    WorkerOptions {
        orchestration_lease: Duration::from_secs(2),
        activity_lease: Duration::from_secs(2),
        idle_poll: Duration::from_millis(100),
        ..WorkerOptions::default()
    }
}

pub fn worker(store: &Arc<dyn Store>) -> WorkerBuilder {
    keel::Worker::builder(store.clone()).options(test_options())
}

/// Long enough for anything a test waits for; a hang fails instead of blocking CI.
pub const WAIT: Duration = Duration::from_secs(30);

/// Waits (polling, at most [`WAIT`]) until the instance's state satisfies `holds`;
/// returns that state.
pub async fn wait_for_state(
    client: &keel::Client,
    instance_id: &str,
    what: &str,
    holds: impl Fn(&keel::InstanceStatus) -> bool,
) -> keel::InstanceStatus {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let state = client.get_status(instance_id).await.unwrap().expect("the instance exists");
        if holds(&state) {
            return state;
        }
        assert!(tokio::time::Instant::now() < deadline, "{instance_id} never got to {what}: {state:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (polling, at most [`WAIT`]) until the instance's history holds an event that
/// satisfies `holds`.
pub async fn wait_for_history(
    client: &keel::Client,
    instance_id: &str,
    what: &str,
    holds: impl Fn(&keel::EventKind) -> bool,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !client.get_history(instance_id).await.unwrap().iter().any(|event| holds(&event.kind)) {
        assert!(tokio::time::Instant::now() < deadline, "the history of {instance_id} never got {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
