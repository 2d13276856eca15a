//! `GET /metrics` on the real `keel serve --samples`: it parses as Prometheus/OpenMetrics
//! text, its counters move by exactly what a known workload does, its task-hub gauges
//! (backlog, instances by status) follow the hub, and it is behind the API key.

mod common;

use std::collections::HashMap;

use common::{http, start_with_key, Server};
use serde_json::{json, Value};

const KEY: &str = "m3trics";

/// Parses the text format: `name{labels} value` lines, `#` comments, `# EOF` last.
/// Returns each series (name with its labels, as written) and its value.
fn parse(text: &str) -> HashMap<String, f64> {
    assert_eq!(text.lines().last(), Some("# EOF"), "OpenMetrics text ends with # EOF:\n{text}");
    let mut series = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            let mut words = line.split_whitespace().skip(1);
            let keyword = words.next().unwrap_or_default();
            assert!(["HELP", "TYPE", "UNIT", "EOF"].contains(&keyword), "a comment line: {line}");
            if keyword != "EOF" {
                assert!(
                    words.next().is_some_and(|name| name.starts_with("keel_")),
                    "metric names start with keel_: {line}"
                );
            }
            continue;
        }
        let (name, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("a sample line: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("a number in {line}"));
        assert!(name.starts_with("keel_"), "{line}");
        if let Some(open) = name.find('{') {
            assert!(name.ends_with('}'), "labels close: {line}");
            for pair in name[open + 1..name.len() - 1].split(',') {
                let (label, quoted) = pair.split_once('=').unwrap_or_else(|| panic!("a label pair in {line}"));
                assert!(!label.is_empty() && quoted.starts_with('"') && quoted.ends_with('"'), "{line}");
            }
        }
        assert!(series.insert(name.to_string(), value).is_none(), "one sample per series: {line}");
    }
    series
}

async fn scrape(server: &Server) -> HashMap<String, f64> {
    let response = http().get(server.url("/metrics")).header("x-functions-key", KEY).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("application/openmetrics-text"), "{content_type}");
    parse(&response.text().await.unwrap())
}

fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, series: &str) -> f64 {
    after.get(series).copied().unwrap_or(0.0) - before.get(series).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_count_a_known_workload_behind_the_api_key() {
    let server = Server::start(&["--api-key", KEY]);

    let anonymous = http().get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401, "the API key applies to /metrics");
    let wrong = http().get(server.url("/metrics")).header("x-functions-key", "guess").send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    let by_query = http().get(server.url(&format!("/metrics?code={KEY}"))).send().await.unwrap();
    assert_eq!(by_query.status(), 200);

    let before = scrape(&server).await;
    for gauge in ["keel_backlog_orchestrations", "keel_backlog_activities", "keel_backlog_timers", "keel_entities"] {
        assert_eq!(before.get(gauge), Some(&0.0), "{gauge} on an empty hub");
    }
    for status in ["Pending", "Running", "Completed", "ContinuedAsNew", "Failed", "Terminated", "Suspended"] {
        assert_eq!(before.get(&format!("keel_instances{{status=\"{status}\"}}")), Some(&0.0), "{status}");
    }
    assert!(!before.keys().any(|series| series.contains("Canceled")), "a status Keel never sets is left out");

    for n in 1..=3 {
        start_with_key(&server, KEY, "HelloCities", &format!("hello-{n}"), None).await;
    }
    let declined =
        json!({"orderId": "o-9", "customer": "declined@example.com", "items": [{"sku": "A1", "quantity": 1}]});
    start_with_key(&server, KEY, "PlaceOrder", "declined", Some(declined)).await;
    start_with_key(&server, KEY, "ApprovalWorkflow", "to-terminate", Some(json!({"request": "yacht"}))).await;

    // Status reads need the key too (the shared helpers send none).
    for id in ["hello-1", "hello-2", "hello-3", "declined"] {
        let done = wait_with_key(&server, id, &["Completed", "Failed"]).await;
        let expected = if id == "declined" { "Failed" } else { "Completed" };
        assert_eq!(done["runtimeStatus"], expected, "{id}: {done}");
    }
    // Waiting for the approval: its timeout is a timer due in an hour.
    let waiting = wait_for_custom_status(&server, "to-terminate", "waiting for approval").await;
    assert_eq!(waiting["runtimeStatus"], "Running");
    let gauges = scrape(&server).await;
    assert_eq!(gauges.get("keel_backlog_timers"), Some(&1.0), "the approval's timeout is pending");
    assert_eq!(gauges.get("keel_instances{status=\"Running\"}"), Some(&1.0));
    let response = http()
        .post(server.api("/instances/to-terminate/terminate?reason=metrics"))
        .header("x-functions-key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    wait_with_key(&server, "to-terminate", &["Terminated"]).await;

    // The counters are recorded after the commit that the status read saw; give the
    // worker a moment to get from the one to the other.
    let mut after = scrape(&server).await;
    for _ in 0..50 {
        if delta(&before, &after, "keel_instances_terminated_total{orchestrator=\"ApprovalWorkflow\"}") >= 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        after = scrape(&server).await;
    }

    // Everything ended: nothing is ready; the terminated approval's timer stays due (in
    // an hour, when it is delivered and dropped).
    for (series, value) in [
        ("keel_backlog_orchestrations", 0.0),
        ("keel_backlog_activities", 0.0),
        ("keel_backlog_timers", 1.0),
        ("keel_instances{status=\"Completed\"}", 3.0),
        ("keel_instances{status=\"Failed\"}", 1.0),
        ("keel_instances{status=\"Terminated\"}", 1.0),
        ("keel_instances{status=\"Running\"}", 0.0),
        ("keel_instances{status=\"Pending\"}", 0.0),
        ("keel_entities", 0.0),
    ] {
        assert_eq!(after.get(series), Some(&value), "{series}");
    }

    let expect = |series: &str, by: f64| {
        assert_eq!(delta(&before, &after, series), by, "{series} moved by {by}");
    };
    expect("keel_instances_started_total{orchestrator=\"HelloCities\"}", 3.0);
    expect("keel_instances_completed_total{orchestrator=\"HelloCities\"}", 3.0);
    expect("keel_instances_started_total{orchestrator=\"PlaceOrder\"}", 1.0);
    expect("keel_instances_failed_total{orchestrator=\"PlaceOrder\"}", 1.0);
    expect("keel_instances_completed_total{orchestrator=\"PlaceOrder\"}", 0.0);
    expect("keel_instances_started_total{orchestrator=\"ApprovalWorkflow\"}", 1.0);
    expect("keel_instances_terminated_total{orchestrator=\"ApprovalWorkflow\"}", 1.0);
    expect("keel_instances_completed_total{orchestrator=\"ApprovalWorkflow\"}", 0.0);

    expect("keel_activity_executions_total{activity=\"SayHello\",outcome=\"completed\"}", 9.0);
    expect("keel_activity_duration_seconds_count{activity=\"SayHello\",outcome=\"completed\"}", 9.0);
    expect("keel_activity_executions_total{activity=\"CheckAndReserveInventory\",outcome=\"completed\"}", 1.0);
    expect("keel_activity_executions_total{activity=\"ProcessPayment\",outcome=\"failed\"}", 1.0);
    expect("keel_activity_executions_total{activity=\"ProcessPayment\",outcome=\"completed\"}", 0.0);
    expect("keel_activity_executions_total{activity=\"ReleaseInventory\",outcome=\"completed\"}", 1.0);
    expect("keel_activity_executions_total{activity=\"RequestApproval\",outcome=\"completed\"}", 1.0);
    expect("keel_activity_executions_total{activity=\"ScheduleShipping\",outcome=\"completed\"}", 0.0);

    // Nothing crashed: no take-overs, no poison.
    assert_eq!(after.keys().filter(|series| series.starts_with("keel_lease_takeovers_total")).count(), 0);
    assert_eq!(after.keys().filter(|series| series.starts_with("keel_poison_items_total")).count(), 0);

    // The gRPC endpoint is up, and no SDK worker is connected to it.
    assert_eq!(after.get("keel_sdk_workers_connected"), Some(&0.0));

    // Every episode and commit was timed: 3 x 4 episodes for HelloCities alone.
    assert!(delta(&before, &after, "keel_episode_duration_seconds_count") >= 12.0);
    assert!(delta(&before, &after, "keel_commit_duration_seconds_count") >= 1.0);
    let sum = after["keel_activity_duration_seconds_sum{activity=\"SayHello\",outcome=\"completed\"}"];
    assert!(sum >= 0.0 && sum.is_finite());
}

async fn wait_for_custom_status(server: &Server, id: &str, custom_status: &str) -> Value {
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let status = wait_with_key(server, id, &["Running"]).await;
        if status["customStatus"] == custom_status {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "{id} never had the custom status {custom_status}: {status}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn wait_with_key(server: &Server, id: &str, statuses: &[&str]) -> Value {
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let response =
            http().get(server.api(&format!("/instances/{id}"))).header("x-functions-key", KEY).send().await.unwrap();
        if response.status().is_success() {
            let status: Value = response.json().await.unwrap();
            if statuses.iter().any(|wanted| status["runtimeStatus"] == *wanted) {
                return status;
            }
        }
        assert!(std::time::Instant::now() < deadline, "{id} did not reach {statuses:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
