//! End to end for the client subcommands: the real `keel` binary talking to a real
//! `keel serve` on port 0, with `--json` for checking and without it for the tables.

mod common;

use std::process::{Command, Output};

use common::{wait_for_entity, wait_for_status, Server};
use serde_json::{json, Value};

/// Runs `keel ARGS --url BASE [extra]`.
fn keel(server: &Server, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(args)
        .args(["--url", &server.base])
        .env_remove("KEEL_API_KEY")
        .env_remove("KEEL_URL")
        .output()
        .expect("keel runs")
}

/// Runs a command with `--json`, expects success, returns its JSON.
fn keel_json(server: &Server, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let output = keel(server, &args);
    assert!(
        output.status.success(),
        "keel {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!("keel {args:?} printed no JSON ({error}): {}", String::from_utf8_lossy(&output.stdout))
    })
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn start_wait_status_history_and_list() {
    let server = Server::start(&[]);
    let started = keel_json(&server, &["start", "HelloCities", "--id", "cli-hello"]);
    assert_eq!(started["id"], "cli-hello");
    assert!(started["statusQueryGetUri"].as_str().unwrap().contains("/instances/cli-hello"));

    let done = keel_json(&server, &["wait", "cli-hello", "--timeout", "30"]);
    assert_eq!(done["runtimeStatus"], "Completed");
    assert_eq!(done["output"], json!(["Hello Tokyo!", "Hello Seattle!", "Hello London!"]));

    let status = keel_json(&server, &["status", "cli-hello", "--history"]);
    assert_eq!(status["historyEvents"].as_array().unwrap().len(), 5);
    // `keel history --json` prints the host's export of the history, byte for byte.
    let history = keel_json(&server, &["history", "cli-hello"]);
    assert_eq!(history["instanceId"], "cli-hello");
    assert_eq!(history["name"], "HelloCities");
    assert_eq!(history["runtimeStatus"], "Completed");
    let scheduled: Vec<&Value> =
        history["events"].as_array().unwrap().iter().filter(|event| event["kind"]["type"] == "TaskScheduled").collect();
    assert_eq!(scheduled.len(), 3);
    assert_eq!(scheduled[0]["kind"]["name"], "SayHello");
    let exported = keel(&server, &["history", "cli-hello", "--json"]).stdout;
    let served = common::http().get(server.url(&format!("{}/instances/cli-hello/history", common::API))).send();
    let served = served.await.unwrap();
    assert_eq!(String::from_utf8(exported).unwrap().trim_end(), served.text().await.unwrap());

    let order = r#"{"orderId":"o-7","customer":"ada@example.com","items":[{"sku":"A1","quantity":2}]}"#;
    let input_file = server.dir().join("order.json");
    std::fs::write(&input_file, order).unwrap();
    let input_arg = format!("@{}", input_file.display());
    let started = keel_json(&server, &["start", "PlaceOrder", "--id", "cli-order", "--input", &input_arg]);
    assert_eq!(started["id"], "cli-order");
    assert_eq!(keel_json(&server, &["wait", "cli-order"])["output"], "TRACK-O-7");

    let listed = keel_json(&server, &["list", "--prefix", "cli-", "--status", "Completed"]);
    let ids: Vec<&str> =
        listed.as_array().unwrap().iter().map(|status| status["instanceId"].as_str().unwrap()).collect();
    assert_eq!(ids, ["cli-hello", "cli-order"]);
    let paged = keel_json(&server, &["list", "--prefix", "cli-", "--top", "1", "--all"]);
    assert_eq!(paged.as_array().unwrap().len(), 2, "--all follows continuation tokens");
    let named = keel_json(&server, &["list", "--name", "Place", "--from", "2000-01-01T00:00:00Z"]);
    assert_eq!(named.as_array().unwrap().len(), 1);

    // Without --json: tables and labelled lines.
    let table = stdout(&keel(&server, &["list"]));
    assert!(table.starts_with("INSTANCE ID"), "{table}");
    assert!(table.contains("cli-order") && table.contains("Completed"), "{table}");
    let status = stdout(&keel(&server, &["status", "cli-order"]));
    assert!(status.contains("Output:") && status.contains("\"TRACK-O-7\""), "{status}");
    let history = stdout(&keel(&server, &["history", "cli-hello"]));
    assert!(history.contains("TaskCompleted") && history.contains("FunctionName=SayHello"), "{history}");
    let started = stdout(&keel(&server, &["start", "HelloCities"]));
    assert!(started.starts_with("Started HelloCities as instance "), "{started}");
}

#[tokio::test]
async fn start_takes_a_version_and_status_shows_it() {
    let server = Server::start(&[]);
    let started = keel_json(&server, &["start", "HelloCities", "--id", "cli-versioned", "--version", "1.2.3"]);
    assert_eq!(started["id"], "cli-versioned");
    let done = keel_json(&server, &["wait", "cli-versioned"]);
    assert_eq!(done["version"], "1.2.3");
    assert_eq!(keel_json(&server, &["status", "cli-versioned"])["version"], "1.2.3");
    let status = stdout(&keel(&server, &["status", "cli-versioned"]));
    assert!(status.lines().any(|line| line == "Version:       1.2.3"), "{status}");
    assert_eq!(keel_json(&server, &["history", "cli-versioned"])["version"], "1.2.3");

    keel_json(&server, &["start", "HelloCities", "--id", "cli-unversioned"]);
    keel_json(&server, &["wait", "cli-unversioned"]);
    let status = stdout(&keel(&server, &["status", "cli-unversioned"]));
    assert!(status.lines().any(|line| line == "Version:       -"), "{status}");
}

#[tokio::test]
async fn raise_suspend_resume_terminate_restart_rewind_and_purge() {
    let server = Server::start(&[]);
    keel_json(&server, &["start", "ApprovalWorkflow", "--id", "cli-approve", "--input", r#"{"request":"laptop"}"#]);
    wait_for_status(&server, "cli-approve", &["Running"]).await;
    let raised = keel_json(&server, &["raise", "cli-approve", "Approval", "true"]);
    assert_eq!(raised["accepted"], true);
    assert_eq!(keel_json(&server, &["wait", "cli-approve"])["output"], "Approved");

    keel_json(&server, &["start", "ApprovalWorkflow", "--id", "cli-manage", "--input", r#"{"request":"desk"}"#]);
    wait_for_status(&server, "cli-manage", &["Running"]).await;
    keel_json(&server, &["suspend", "cli-manage", "--reason", "lunch"]);
    wait_for_status(&server, "cli-manage", &["Suspended"]).await;
    keel_json(&server, &["resume", "cli-manage"]);
    wait_for_status(&server, "cli-manage", &["Running"]).await;
    keel_json(&server, &["terminate", "cli-manage", "--reason", "cancelled"]);
    let terminated = keel_json(&server, &["wait", "cli-manage"]);
    assert_eq!(terminated["runtimeStatus"], "Terminated");
    assert_eq!(terminated["output"], "cancelled");

    let restarted = keel_json(&server, &["restart", "cli-manage"]);
    assert_ne!(restarted["id"], "cli-manage");
    let same = keel_json(&server, &["restart", "cli-manage", "--same-id"]);
    assert_eq!(same["id"], "cli-manage");

    let declined = r#"{"orderId":"o-8","customer":"declined@example.com","items":[{"sku":"A1","quantity":1}]}"#;
    keel_json(&server, &["start", "PlaceOrder", "--id", "cli-declined", "--input", declined]);
    assert_eq!(keel_json(&server, &["wait", "cli-declined"])["runtimeStatus"], "Failed");
    keel_json(&server, &["rewind", "cli-declined", "--reason", "try again"]);
    assert_eq!(keel_json(&server, &["wait", "cli-declined"])["runtimeStatus"], "Failed");

    assert_eq!(keel_json(&server, &["purge", "cli-approve"]), json!({"instancesDeleted": 1}));
    let purged = keel_json(&server, &["purge", "--from", "2000-01-01T00:00:00Z", "--status", "Failed"]);
    assert_eq!(purged, json!({"instancesDeleted": 1}));
    let nothing = keel_json(&server, &["purge", "--from", "2000-01-01T00:00:00Z", "--status", "Failed"]);
    assert_eq!(nothing, json!({"instancesDeleted": 0}));
}

#[tokio::test]
async fn errors_exit_non_zero_with_the_hosts_message() {
    let server = Server::start(&["--api-key", "k3y"]);
    let refused = keel(&server, &["list"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"), "{refused:?}");

    let listed = keel(&server, &["list", "--api-key", "k3y", "--json"]);
    assert!(listed.status.success(), "{listed:?}");

    let missing = keel(&server, &["status", "nobody", "--api-key", "k3y"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no instance with id 'nobody'"), "{missing:?}");

    let unknown = keel(&server, &["start", "NoSuchOrchestrator", "--api-key", "k3y"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("400"), "{unknown:?}");

    keel(&server, &["start", "ApprovalWorkflow", "--id", "slow", "--input", r#"{"request":"x"}"#, "--api-key", "k3y"]);
    let timed_out = keel(&server, &["wait", "slow", "--timeout", "0.5", "--api-key", "k3y"]);
    assert!(!timed_out.status.success());
    assert!(String::from_utf8_lossy(&timed_out.stderr).contains("did not finish"), "{timed_out:?}");

    let nowhere =
        Command::new(env!("CARGO_BIN_EXE_keel")).args(["list", "--url", "http://127.0.0.1:1"]).output().unwrap();
    assert!(!nowhere.status.success());
    assert!(String::from_utf8_lossy(&nowhere.stderr).contains("could not reach"), "{nowhere:?}");
}

#[tokio::test]
async fn entity_subcommands_signal_get_list_delete_and_clean() {
    let server = Server::start(&[]);
    let signalled = keel_json(&server, &["entity", "signal", "Counter", "cli-1", "add", "5"]);
    assert_eq!(
        signalled,
        json!({"entityId": {"name": "Counter", "key": "cli-1"}, "operation": "add", "accepted": true})
    );
    let negative = stdout(&keel(&server, &["entity", "signal", "Counter", "cli-2", "add", "-3"]));
    assert_eq!(negative.trim(), "Signalled add on Counter/cli-2");
    let input_file = server.dir().join("amount.json");
    std::fs::write(&input_file, "4").unwrap();
    let input_arg = format!("@{}", input_file.display());
    keel_json(&server, &["entity", "signal", "Counter", "cli-2", "add", &input_arg]);
    keel_json(&server, &["entity", "signal", "Account", "cli-acct", "deposit", "12", "--at", "2000-01-01T00:00:00Z"]);
    wait_for_entity(&server, "Counter", "cli-1", Some(json!(5))).await;
    wait_for_entity(&server, "Counter", "cli-2", Some(json!(1))).await;
    wait_for_entity(&server, "Account", "cli-acct", Some(json!(12))).await;

    assert_eq!(keel_json(&server, &["entity", "get", "Counter", "cli-1"]), json!(5));
    assert_eq!(stdout(&keel(&server, &["entity", "get", "counter", "cli-2"])).trim(), "1");

    let listed = keel_json(&server, &["entity", "list"]);
    let ids: Vec<String> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|entity| {
            format!("{}/{}", entity["entityId"]["name"].as_str().unwrap(), entity["entityId"]["key"].as_str().unwrap())
        })
        .collect();
    assert_eq!(ids, ["account/cli-acct", "counter/cli-1", "counter/cli-2"]);
    assert!(listed[0].get("state").is_none());
    let counters = keel_json(&server, &["entity", "list", "--name", "Counter", "--state"]);
    assert_eq!(counters.as_array().unwrap().len(), 2);
    assert_eq!(counters[0]["state"], 5);
    let first = keel(&server, &["entity", "list", "--top", "1", "--json"]);
    assert_eq!(serde_json::from_slice::<Value>(&first.stdout).unwrap().as_array().unwrap().len(), 1);
    let every = keel_json(&server, &["entity", "list", "--top", "1", "--all", "--prefix", "count"]);
    assert_eq!(every.as_array().unwrap().len(), 2, "--all follows continuation tokens");
    let table = stdout(&keel(&server, &["entity", "list", "--state"]));
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("LAST OPERATION") && table.contains("cli-acct") && table.contains("12"), "{table}");
    assert!(table.trim_end().ends_with("3 entities"), "{table}");

    let deleted = stdout(&keel(&server, &["entity", "delete", "Counter", "cli-1"]));
    assert_eq!(deleted.trim(), "Signalled delete on Counter/cli-1");
    wait_for_entity(&server, "Counter", "cli-1", None).await;
    let missing = keel(&server, &["entity", "get", "Counter", "cli-1"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404"), "{missing:?}");
    let transient = keel_json(&server, &["entity", "list", "--transient", "--name", "counter"]);
    assert_eq!(transient.as_array().unwrap().len(), 2);

    assert_eq!(
        keel_json(&server, &["entity", "clean", "--keep-locks"]),
        json!({"emptyEntitiesRemoved": 1, "orphanedLocksReleased": 0})
    );
    let cleaned = stdout(&keel(&server, &["entity", "clean"]));
    assert_eq!(cleaned.trim(), "Removed 0 empty entities; released 0 orphaned locks");

    let unknown = keel(&server, &["entity", "signal", "Nope", "x", "add", "1"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no entity named 'Nope'"), "{unknown:?}");
    let bad = keel(&server, &["entity", "signal", "Counter", "x", "add", "{not json"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("400"), "{bad:?}");
}

#[test]
fn an_empty_api_key_is_refused() {
    let output = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["serve", "--port", "0", "--grpc-port", "0", "--api-key", ""])
        .env_remove("KEEL_API_KEY")
        .output()
        .unwrap();
    assert!(!output.status.success(), "an empty key must not start an open host");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("the API key is empty"), "{stderr}");
}
