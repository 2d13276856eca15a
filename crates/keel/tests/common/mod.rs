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
