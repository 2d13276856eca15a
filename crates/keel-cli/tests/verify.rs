//! `keel verify` end to end: instances in flight on a real `keel serve --samples` hub
//! (an approval waiting for its event, a monitor waiting on its timer) verify clean
//! against the same build, read straight from the stopped host's task hub and from
//! histories exported with `keel history ID --json`; a history with a changed event is
//! reported as diverged, naming the instance and the sequence number, with exit code 1.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{http, Server, WAIT};
use serde_json::{json, Value};

/// Runs `keel ARGS` (with `stdin` as its standard input when given).
fn keel(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(args)
        .env_remove("KEEL_STORE")
        .env_remove("KEEL_URL")
        .env_remove("KEEL_API_KEY")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("keel runs");
    if let Some(input) = stdin {
        child.stdin.take().expect("stdin is piped").write_all(input).expect("keel reads its input");
    }
    child.wait_with_output().expect("keel finishes")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// `keel ARGS --json`, which must succeed; its JSON.
fn keel_json(args: &[&str]) -> Value {
    let output = keel(&[args, &["--json"]].concat(), None);
    assert!(output.status.success(), "keel {args:?} failed: {}", text(&output));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| panic!("keel {args:?}: no JSON ({error})"))
}

/// The ids and verdicts of a `keel verify --json` report.
fn verdicts(report: &Value) -> Vec<(String, String)> {
    let instances = report["instances"].as_array().expect("a list of instances");
    instances
        .iter()
        .map(|instance| (instance["instanceId"].as_str().unwrap().into(), instance["verdict"].as_str().unwrap().into()))
        .collect()
}

/// Polls an instance until its custom status is `expected`: the episode that set it
/// also committed what the instance now waits for.
async fn wait_for_custom_status(server: &Server, instance_id: &str, expected: Value) {
    let deadline = Instant::now() + WAIT;
    loop {
        let status: Value =
            http().get(server.api(&format!("/instances/{instance_id}"))).send().await.unwrap().json().await.unwrap();
        if status["customStatus"] == expected {
            assert_eq!(status["runtimeStatus"], "Running", "{status}");
            return;
        }
        assert!(Instant::now() < deadline, "{instance_id}: custom status {} after {WAIT:?}", status["customStatus"]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start(server: &Server, name: &str, instance_id: &str, input: Value) {
    let url = server.url(&format!("/api/orchestrators/{name}/{instance_id}"));
    let response = http().post(url).json(&input).send().await.unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
}

/// `keel history ID --json > FILE`; returns the export.
fn export_history(server: &Server, instance_id: &str, file: &Path) -> Value {
    let output = keel(&["history", instance_id, "--json", "--url", &server.base], None);
    assert!(output.status.success(), "{}", text(&output));
    std::fs::write(file, &output.stdout).unwrap();
    serde_json::from_slice(&output.stdout).expect("the export is JSON")
}

#[tokio::test]
async fn in_flight_instances_verify_clean_and_a_changed_history_diverges() {
    let mut server = Server::start(&[]);
    start(&server, "ApprovalWorkflow", "verify-approval", json!({"request": "laptop"})).await;
    let monitor = json!({"location": {"state": "WA", "city": "Seattle"}, "phone": "+1-555-0100"});
    start(&server, "WeatherMonitor", "verify-monitor", monitor).await;
    start(&server, "HelloCities", "verify-done", json!(null)).await;
    wait_for_custom_status(&server, "verify-approval", json!("waiting for approval")).await;
    wait_for_custom_status(&server, "verify-monitor", json!({"checks": 1, "clear": false})).await;
    common::wait_until_finished(&server, "verify-done").await;

    let approval_file = server.dir().join("approval.json");
    let export = export_history(&server, "verify-approval", &approval_file);
    assert_eq!(export["instanceId"], "verify-approval");
    assert_eq!(export["name"], "ApprovalWorkflow");
    assert_eq!(export["runtimeStatus"], "Running");
    assert!(export["executionId"].as_str().is_some_and(|id| !id.is_empty()), "{export}");
    assert!(export.get("version").is_none(), "unversioned: {export}");
    let monitor_file = server.dir().join("monitor.json");
    let monitor_export = export_history(&server, "verify-monitor", &monitor_file);
    assert_eq!(monitor_export["name"], "WeatherMonitor");

    server.stop();
    let store = server.store.clone();

    // The hub itself: both running instances replay; the finished one is not checked.
    let output = keel(&["verify", "--store", &store], None);
    let printed = text(&output);
    assert!(output.status.success(), "{printed}");
    assert!(printed.contains("verify-approval (ApprovalWorkflow, "), "{printed}");
    assert!(printed.contains("verify-monitor (WeatherMonitor, "), "{printed}");
    assert_eq!(printed.lines().filter(|line| line.ends_with("events): ok")).count(), 2, "{printed}");
    assert!(printed.contains("2 instances checked: 2 ok, 0 diverged, 0 not hosted"), "{printed}");
    assert!(!printed.contains("verify-done"), "{printed}");

    let report = keel_json(&["verify", "--store", &store]);
    let expected = [("verify-approval".to_string(), "ok".to_string()), ("verify-monitor".into(), "ok".into())];
    assert_eq!(verdicts(&report), expected);
    assert_eq!(report["instances"][0]["name"], "ApprovalWorkflow");
    assert!(report["instances"][0]["historyLen"].as_u64().unwrap() > 0);

    let filtered = keel_json(&["verify", "--store", &store, "--name", "Weather"]);
    assert_eq!(verdicts(&filtered), [("verify-monitor".to_string(), "ok".to_string())]);
    let finished = keel_json(&["verify", "--store", &store, "--status", "Completed"]);
    assert_eq!(verdicts(&finished), [("verify-done".to_string(), "ok".to_string())]);
    let none = keel_json(&["verify", "--store", &store, "--version", "9.9"]);
    assert!(verdicts(&none).is_empty(), "{none}");

    // The exported histories, from a file and from standard input.
    let output = keel(&["verify", "--history", approval_file.to_str().unwrap()], None);
    let printed = text(&output);
    assert!(output.status.success(), "{printed}");
    assert!(printed.contains("verify-approval (ApprovalWorkflow, ") && printed.contains("events): ok"), "{printed}");
    assert!(printed.contains("1 instance checked: 1 ok, 0 diverged, 0 not hosted"), "{printed}");
    let output = keel(&["verify", "--history", "-", "--json"], Some(&std::fs::read(&monitor_file).unwrap()));
    assert!(output.status.success(), "{}", text(&output));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(verdicts(&report), [("verify-monitor".to_string(), "ok".to_string())]);
    let both = keel_json(&["verify", "--history", monitor_file.to_str().unwrap(), approval_file.to_str().unwrap()]);
    assert_eq!(verdicts(&both), [("verify-monitor".to_string(), "ok".into()), ("verify-approval".into(), "ok".into())]);

    // Rename the scheduled activity in the history: the code no longer matches it.
    let mut changed = export.clone();
    let events = changed["events"].as_array_mut().unwrap();
    let scheduled = events
        .iter_mut()
        .find(|event| event["kind"]["type"] == "TaskScheduled" && event["kind"]["name"] == "RequestApproval")
        .unwrap_or_else(|| panic!("no TaskScheduled RequestApproval in {export}"));
    scheduled["kind"]["name"] = json!("RequestApprovalV0");
    let sequence_number = scheduled["event_id"].as_i64().unwrap_or_else(|| panic!("no event_id in {scheduled}"));
    let changed_file = server.dir().join("changed.json");
    std::fs::write(&changed_file, serde_json::to_vec_pretty(&changed).unwrap()).unwrap();
    let output = keel(&["verify", "--history", changed_file.to_str().unwrap()], None);
    let printed = text(&output);
    assert_eq!(output.status.code(), Some(1), "{printed}");
    assert!(printed.contains("verify-approval (ApprovalWorkflow, "), "{printed}");
    assert!(
        printed.contains(&format!("diverged: non-deterministic orchestration: at sequence number {sequence_number}")),
        "{printed}"
    );
    assert!(printed.contains("RequestApprovalV0"), "the divergence says what the history has: {printed}");
    assert!(printed.contains("1 instance checked: 0 ok, 1 diverged, 0 not hosted"), "{printed}");
    let output = keel(&["verify", "--history", changed_file.to_str().unwrap(), "--json"], None);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(verdicts(&report), [("verify-approval".to_string(), "diverged".to_string())]);
    let divergence = report["instances"][0]["divergence"].as_str().unwrap();
    assert!(divergence.contains(&format!("sequence number {sequence_number}")), "{divergence}");

    // A history of an orchestration this build does not have.
    let mut unknown = export.clone();
    unknown["name"] = json!("NoSuchOrchestration");
    let output = keel(&["verify", "--history", "-"], Some(unknown.to_string().as_bytes()));
    let printed = text(&output);
    assert_eq!(output.status.code(), Some(1), "{printed}");
    assert!(printed.contains("verify-approval (NoSuchOrchestration, ") && printed.contains("not hosted"), "{printed}");
}

#[test]
fn verify_refuses_what_it_cannot_check() {
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("sqlite://{}", dir.path().join("nothing-here.db").display());
    let output = keel(&["verify", "--store", &missing], None);
    assert!(!output.status.success());
    assert!(text(&output).contains("there is no task hub"), "{}", text(&output));
    assert!(!dir.path().join("nothing-here.db").exists(), "verify creates no hub");

    let not_an_export = dir.path().join("list.json");
    std::fs::write(&not_an_export, "[]").unwrap();
    let output = keel(&["verify", "--history", not_an_export.to_str().unwrap()], None);
    assert!(!output.status.success());
    assert!(text(&output).contains("is not a history exported with `keel history ID --json`"), "{}", text(&output));

    let output = keel(&["verify", "--history", "-", "--status", "Running"], Some(b"{}"));
    assert_eq!(output.status.code(), Some(2), "--history takes no filter: {}", text(&output));
}
