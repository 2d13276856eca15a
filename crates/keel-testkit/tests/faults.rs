//! The fault-injecting store does what it says: an error after a write hides a write
//! that happened, an error before one writes nothing, a seed always draws the same
//! faults, a cut lease lets another worker take the item, and a crash point kills its
//! user at the call it names.

use std::sync::Arc;
use std::time::Duration;

use keel::{Client, StartOptions};
use keel_sqlite::{SqliteOptions, SqliteStore};
use keel_store::Store;
use keel_testkit::faults::{CrashPoint, FaultCounts, FaultPlan, FaultRates, FaultSwitch, FaultyStore, Life};

fn hub() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = SqliteStore::open(dir.path().join("hub.db"), SqliteOptions::default()).expect("the hub opens");
    (Arc::new(store), dir)
}

fn faulty(inner: &Arc<dyn Store>, plan: FaultPlan, counts: &Arc<FaultCounts>) -> Arc<FaultyStore> {
    Arc::new(FaultyStore::new(inner.clone(), plan, FaultSwitch::default(), counts.clone(), Arc::new(Life::default())))
}

fn plan(rates: FaultRates) -> FaultPlan {
    FaultPlan { seed: 42, rates, ..FaultPlan::default() }
}

async fn start(store: Arc<dyn Store>, id: &str) -> Result<String, keel::ClientError> {
    let options = StartOptions { instance_id: Some(id.to_string()), ..StartOptions::default() };
    Client::new(store).start_raw("Anything", Some("1".into()), options).await
}

#[tokio::test]
async fn an_error_after_a_write_hides_a_write_that_happened() {
    let (inner, _dir) = hub();
    let counts = Arc::new(FaultCounts::default());
    let store = faulty(&inner, plan(FaultRates { error_after_write: 1.0, ..FaultRates::default() }), &counts);
    match start(store.clone(), "after").await {
        Err(keel::ClientError::Store(error)) => assert!(error.is_retryable(), "{error}"),
        other => panic!("expected an injected store error, got {other:?}"),
    }
    assert!(inner.get_instance("after").await.unwrap().is_some(), "the write happened all the same");
    assert_eq!(counts.totals().errors_after_write, 1);
    // Reads pass: only writes get errors after the fact.
    assert!(store.get_instance("after").await.unwrap().is_some());
}

#[tokio::test]
async fn an_error_before_a_write_writes_nothing() {
    let (inner, _dir) = hub();
    let counts = Arc::new(FaultCounts::default());
    let store = faulty(&inner, plan(FaultRates { error_before_write: 1.0, ..FaultRates::default() }), &counts);
    assert!(start(store, "before").await.is_err());
    assert!(inner.get_instance("before").await.unwrap().is_none(), "nothing was written");
    assert_eq!(counts.totals().errors_before_write, 1);
}

#[tokio::test]
async fn a_seed_always_draws_the_same_faults() {
    let (inner, _dir) = hub();
    let pattern = |seed: u64| {
        let inner = inner.clone();
        async move {
            let counts = Arc::new(FaultCounts::default());
            let rates = FaultRates { read_error: 0.3, ..FaultRates::default() };
            let store = faulty(&inner, FaultPlan { seed, rates, ..FaultPlan::default() }, &counts);
            let mut failed = Vec::new();
            for _ in 0..200 {
                failed.push(store.get_instance("x").await.is_err());
            }
            (failed, counts.totals().read_errors)
        }
    };
    let (first, errors) = pattern(7).await;
    assert_eq!(pattern(7).await.0, first, "the same seed fails the same calls");
    assert_ne!(pattern(8).await.0, first, "another seed fails other calls");
    assert!((30..90).contains(&errors), "{errors} of 200 reads failed at a rate of 0.3");
}

#[tokio::test]
async fn a_cut_lease_lets_another_worker_take_the_item_mid_episode() {
    let (inner, _dir) = hub();
    let counts = Arc::new(FaultCounts::default());
    start(inner.clone(), "leased").await.unwrap();
    let rates = FaultRates { lease_cut: 1.0, short_lease: Duration::ZERO, ..FaultRates::default() };
    let store = faulty(&inner, plan(rates), &counts);
    let now = chrono::Utc::now();
    let first = store.fetch_orchestration_items(10, Duration::from_secs(30), now).await.unwrap();
    assert_eq!(first.len(), 1);
    // Asked for 30 s, the holder got none: another worker takes the item at once.
    let second = inner.fetch_orchestration_items(10, Duration::from_secs(30), now).await.unwrap();
    assert_eq!(second.len(), 1, "the lease looked expired to the other worker");
    assert_ne!(first[0].lock.token, second[0].lock.token);
    assert_eq!(counts.totals().lease_cuts, 1);
}

#[tokio::test(start_paused = true)]
async fn a_crash_point_kills_its_user_after_the_write() {
    let (inner, _dir) = hub();
    let counts = Arc::new(FaultCounts::default());
    let crash = Some(CrashPoint { at_call: 1, after_write: true });
    let store = faulty(&inner, FaultPlan { seed: 1, crash, ..FaultPlan::default() }, &counts);
    assert!(store.get_instance("dies").await.unwrap().is_none(), "call 0 passes");
    let dying = tokio::spawn(start(store.clone(), "dies"));
    store.life().ended().await;
    assert!(inner.get_instance("dies").await.unwrap().is_some(), "the write of the fatal call was committed");
    assert!(!dying.is_finished(), "the fatal call never returns");
    let later = tokio::time::timeout(Duration::from_secs(3600), store.get_instance("dies")).await;
    assert!(later.is_err(), "no call of a dead process returns");
    assert_eq!(counts.totals().crashes, 1);
}
