//! Golden histories: histories of the samples, exported as `keel history ID --json`
//! exports them and checked in (`tests/golden/*.json`), replayed against the samples'
//! current code on every run. A change to a sample that would break its running
//! instances fails here, before it ships (the deploy check `keel verify` makes for a
//! whole task hub).
//!
//! `write_golden_histories` (ignored) writes them again; run it by hand only when a
//! sample changes on purpose in a way that old instances may not see:
//! `cargo test -p keel-samples --test golden -- --ignored write_golden_histories`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keel::testing::HistoryExport;
use keel::verify::Verdict;
use keel::{Client, RuntimeStatus};
use keel_samples::bank_transfer::{Transfer, BANK_TRANSFER};
use keel_samples::hello_cities::HELLO_CITIES;
use keel_samples::human_interaction::{ApprovalRequest, APPROVAL_WORKFLOW};
use keel_samples::monitor::{Location, MonitorRequest, WEATHER_MONITOR};
use keel_samples::place_order::{Order, OrderItem, PLACE_ORDER};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

async fn hub() -> (std::sync::Arc<dyn keel_store::Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = keel::store::open(&format!("sqlite://{}", dir.path().join("hub.db").display())).await.unwrap();
    (store, dir)
}

async fn export(client: &Client, instance_id: &str) -> HistoryExport {
    let record = client.get_status(instance_id).await.unwrap().expect("the instance exists");
    HistoryExport {
        instance_id: record.instance_id,
        name: record.name,
        version: record.version,
        execution_id: record.execution_id,
        runtime_status: record.status,
        events: client.get_history(instance_id).await.unwrap(),
    }
}

/// Waits until the instance's history has at least `events` events.
async fn wait_for_events(client: &Client, instance_id: &str, events: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while client.get_history(instance_id).await.unwrap().len() < events {
        assert!(tokio::time::Instant::now() < deadline, "{instance_id} never got {events} events");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
#[ignore = "writes the checked-in golden histories; run by hand when a sample changes on purpose"]
async fn write_golden_histories() {
    let (store, _dir) = hub().await;
    let worker = keel_samples::register(keel::Worker::builder(store)).build().start();
    let client = worker.client();
    let wait = Duration::from_secs(30);
    let order = Order {
        order_id: "o-1".into(),
        customer: Some("declined@example.com".into()),
        items: vec![OrderItem { sku: "A1".into(), quantity: 2 }],
    };
    let mut exports = Vec::new();

    let declined = client.start(PLACE_ORDER, &order).await.unwrap();
    declined.wait(wait).await.unwrap();
    exports.push(("place-order-declined", declined.id().to_string()));
    let hello = client.start(HELLO_CITIES, &()).await.unwrap();
    hello.wait(wait).await.unwrap();
    exports.push(("hello-cities", hello.id().to_string()));
    let request = ApprovalRequest { request: "laptop".into(), approver: None, timeout_seconds: Some(3600.0) };
    let approval = client.start(APPROVAL_WORKFLOW, &request).await.unwrap();
    wait_for_events(&client, approval.id(), 6).await; // waiting for the approval
    exports.push(("approval-waiting", approval.id().to_string()));
    let monitor_request = MonitorRequest {
        location: Some(Location { state: "WA".into(), city: "Seattle".into() }),
        phone: Some("+1-555-0100".into()),
        polling_interval_seconds: Some(3600),
        expiry_seconds: Some(86_400),
    };
    let monitor = client.start(WEATHER_MONITOR, &Some(monitor_request)).await.unwrap();
    wait_for_events(&client, monitor.id(), 6).await; // waiting on its timer
    exports.push(("monitor-waiting", monitor.id().to_string()));
    for (key, balance) in [("alice", 100), ("bob", 5)] {
        let account = keel::EntityId::new("Account", key).unwrap();
        client.signal_entity(&account, "deposit", &balance).await.unwrap();
    }
    let transfer = Transfer { from: "alice".into(), to: "bob".into(), amount: 30 };
    let transfer = client.start(BANK_TRANSFER, &transfer).await.unwrap();
    transfer.wait(wait).await.unwrap();
    exports.push(("bank-transfer", transfer.id().to_string()));

    std::fs::create_dir_all(golden_dir()).unwrap();
    for (name, instance_id) in exports {
        let export = export(&client, &instance_id).await;
        let json = serde_json::to_string_pretty(&export).unwrap();
        std::fs::write(golden_dir().join(format!("{name}.json")), json + "\n").unwrap();
    }
    worker.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn golden_histories_replay_against_the_samples() {
    let (store, _dir) = hub().await;
    let worker = keel_samples::register(keel::Worker::builder(store)).build();
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(golden_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|extension| extension != "json") {
            continue;
        }
        let export: HistoryExport = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let verdict = worker.verify_export(&export);
        assert_eq!(verdict.verdict, Verdict::Ok, "{}: {}", path.display(), verdict.verdict);
        checked.push((export.name, export.runtime_status));
    }
    checked.sort_by(|a, b| a.0.cmp(&b.0));
    let names: Vec<&str> = checked.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["ApprovalWorkflow", "BankTransfer", "HelloCities", "PlaceOrder", "WeatherMonitor"]);
    assert!(checked.iter().any(|(_, status)| *status == RuntimeStatus::Running), "in-flight instances are among them");
}
