//! The entity crash test: a worker process is killed with SIGKILL while signals to
//! many entities are in flight; a new worker on the same SQLite file applies every
//! operation exactly once, in the order it was sent.

mod common;

use std::time::Duration;

use keel::{Client, EntityContext, EntityError, EntityId, WorkerOptions};
use keel_testkit::process::ChildTest;

/// Set in the child process: the path of the task hub to work on.
const CHILD_HUB_ENV: &str = "KEEL_ENTITY_CRASH_TEST_HUB";

const ENTITIES: u32 = 10;
const SIGNALS_PER_ENTITY: u32 = 50;

/// Keeps every `append` input in the order the operations ran; each operation takes a
/// little time so that the kill lands in the middle of the work.
fn log(ctx: &mut EntityContext<Vec<u32>>) -> Result<(), EntityError> {
    let value: u32 = ctx.input()?;
    std::thread::sleep(Duration::from_millis(2));
    ctx.state_mut().push(value);
    Ok(())
}

fn entity_worker(store: std::sync::Arc<dyn keel_store::Store>) -> keel::Worker {
    let options = WorkerOptions { max_concurrent_orchestrations: 4, ..common::test_options() };
    keel::Worker::builder(store).options(options).entity("Log", log).build()
}

/// The child process: runs a worker on the hub until it is killed.
#[test]
#[ignore = "run by entity_operations_survive_a_killed_worker as its child process"]
fn entity_crash_child_worker() {
    let Ok(path) = std::env::var(CHILD_HUB_ENV) else { return };
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async move {
        let store = keel::store::open(&format!("sqlite://{path}")).await.expect("the hub opens");
        let _worker = entity_worker(store).start();
        std::future::pending::<()>().await;
    });
}

fn entity(n: u32) -> EntityId {
    EntityId::new("Log", &format!("e{n}")).unwrap()
}

async fn applied(client: &Client, n: u32) -> Vec<u32> {
    match client.get_entity(&entity(n)).await.unwrap() {
        Some(metadata) if metadata.exists() => metadata.state_as().unwrap(),
        _ => Vec::new(),
    }
}

async fn total_applied(client: &Client) -> usize {
    let mut total = 0;
    for n in 0..ENTITIES {
        total += applied(client, n).await.len();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entity_operations_survive_a_killed_worker() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db").display().to_string();
    let store = keel::store::open(&format!("sqlite://{path}")).await.unwrap();
    let client = Client::new(store.clone());

    let mut child = ChildTest::start("entity_crash_child_worker", &[(CHILD_HUB_ENV, &path)]);
    // Half the signals go out while the child works; it is killed with batches in
    // flight, and the other half is sent while no worker runs.
    let total = (ENTITIES * SIGNALS_PER_ENTITY) as usize;
    let send = |values: std::ops::Range<u32>| {
        let client = client.clone();
        async move {
            for value in values {
                for n in 0..ENTITIES {
                    client.signal_entity(&entity(n), "append", &value).await.unwrap();
                }
            }
        }
    };
    send(0..SIGNALS_PER_ENTITY / 2).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while total_applied(&client).await < 20 {
        assert!(tokio::time::Instant::now() < deadline, "the child worker made no progress");
        assert!(child.is_running(), "the child worker exited early");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill();
    let applied_at_kill = total_applied(&client).await;
    send(SIGNALS_PER_ENTITY / 2..SIGNALS_PER_ENTITY).await;
    assert!(applied_at_kill < total, "the kill came after everything was done; the test proves nothing");

    let worker = entity_worker(store.clone()).start();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while total_applied(&client).await < total {
        assert!(tokio::time::Instant::now() < deadline, "the operations were not all applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for n in 0..ENTITIES {
        let log = applied(&client, n).await;
        assert_eq!(log, (0..SIGNALS_PER_ENTITY).collect::<Vec<_>>(), "entity {n}: each operation once, in order");
    }
    eprintln!("{applied_at_kill} of {total} operations were applied when the worker was killed");
    worker.shutdown(Duration::from_secs(5)).await;
}
