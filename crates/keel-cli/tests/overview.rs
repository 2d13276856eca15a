//! `GET …/overview` on the real `keel serve`: its counts match a known workload and the
//! instance and entity lists, its throughput points catch up with the worker's counters
//! (sampled every 200 ms here), it is behind the API key under both base paths, and it
//! lists a connected SDK worker (the generated gRPC client standing in for one) with
//! the functions it was given.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{http, start_with_key, Server, WAIT};
use keel_grpc::proto::orchestrator_action::OrchestratorActionType;
use keel_grpc::proto::task_hub_sidecar_service_client::TaskHubSidecarServiceClient;
use keel_grpc::proto::work_item::Request;
use keel_grpc::proto::{self, WorkItem};
use serde_json::{json, Value};

const KEY: &str = "0verview";

const STATUSES: [&str; 7] = ["Pending", "Running", "Completed", "ContinuedAsNew", "Failed", "Terminated", "Suspended"];

async fn get_json(server: &Server, path: &str) -> Value {
    let response = http().get(server.url(path)).header("x-functions-key", KEY).send().await.unwrap();
    assert_eq!(response.status(), 200, "GET {path}");
    response.json().await.unwrap()
}

async fn overview(server: &Server) -> Value {
    get_json(server, &format!("{}/overview", common::API)).await
}

/// Polls the overview until `done` holds; returns it.
async fn overview_until(server: &Server, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let overview = overview(server).await;
        if done(&overview) {
            return overview;
        }
        assert!(Instant::now() < deadline, "the overview never showed {what}: {overview:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn keys(value: &Value) -> BTreeSet<&str> {
    value.as_object().expect("an object").keys().map(String::as_str).collect()
}

/// The samples of a `/metrics` text: each series (name with labels) and its value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .map(|(series, value)| (series.to_string(), value.parse().expect("a number")))
        .collect()
}

/// The sum of every series of `metric` (all its labels).
fn metric_sum(samples: &BTreeMap<String, f64>, metric: &str) -> u64 {
    samples
        .iter()
        .filter(|(series, _)| {
            *series == metric || series.strip_prefix(metric).is_some_and(|rest| rest.starts_with('{'))
        })
        .map(|(_, value)| *value as u64)
        .sum()
}

/// The sums of a throughput field over every point.
fn throughput_sum(overview: &Value, field: &str) -> u64 {
    overview["throughput"]["points"].as_array().unwrap().iter().map(|point| point[field].as_u64().unwrap()).sum()
}

async fn signal(server: &Server, path: &str) {
    let response = http()
        .post(server.api(path))
        .header("x-functions-key", KEY)
        .header("content-type", "application/json")
        .body("5")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
}

/// How many instances `GET /instances` lists in `status` (all of them for `None`).
async fn listed(server: &Server, status: Option<&str>) -> usize {
    let filter = status.map(|status| format!("&runtimeStatus={status}")).unwrap_or_default();
    let list = get_json(server, &format!("{}/instances?top=1000{filter}", common::API)).await;
    list.as_array().unwrap().len()
}

#[tokio::test]
async fn the_overview_counts_a_known_workload_and_its_throughput_catches_up() {
    let server = Server::start(&["--api-key", KEY, "--overview-interval-ms", "200"]);
    for path in [format!("{}/overview", common::API), "/durabletask/overview".to_string()] {
        let anonymous = http().get(server.url(&path)).send().await.unwrap();
        assert_eq!(anonymous.status(), 401, "{path} is behind the API key");
    }

    let empty = overview(&server).await;
    assert_eq!(keys(&empty), BTreeSet::from(["instances", "entities", "backlog", "throughput", "workers"]));
    assert_eq!(keys(&empty["instances"]), BTreeSet::from(STATUSES));
    assert!(STATUSES.iter().all(|status| empty["instances"][status] == 0), "{empty}");
    assert_eq!(empty["entities"], 0);
    assert_eq!(empty["backlog"], json!({"orchestrations": 0, "activities": 0, "timers": 0}));
    assert_eq!(empty["throughput"]["intervalSeconds"], json!(0.2), "the interval, in seconds");
    assert_eq!(empty["workers"], json!([]), "no SDK worker is connected");
    assert_eq!(get_json(&server, "/durabletask/overview").await["entities"], 0, "the alias serves it too");

    // 3 completed, 1 failed, 1 waiting for an approval (with its 1-hour timer), an
    // entity with state and one whose only signal is due in an hour.
    for n in 1..=3 {
        start_with_key(&server, KEY, "HelloCities", &format!("hello-{n}"), None).await;
    }
    let declined =
        json!({"orderId": "o-9", "customer": "declined@example.com", "items": [{"sku": "A1", "quantity": 1}]});
    start_with_key(&server, KEY, "PlaceOrder", "declined", Some(declined)).await;
    start_with_key(&server, KEY, "ApprovalWorkflow", "waiting", Some(json!({"request": "yacht"}))).await;
    signal(&server, "/entities/Counter/now?op=add").await;
    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    signal(&server, &format!("/entities/Counter/later?op=add&scheduledTime={later}")).await;

    let expected = json!({"Pending": 0, "Running": 1, "Completed": 3, "ContinuedAsNew": 0, "Failed": 1,
                          "Terminated": 0, "Suspended": 0});
    let settled = overview_until(&server, "the workload settled", |overview| {
        overview["instances"] == expected
            && overview["backlog"] == json!({"orchestrations": 0, "activities": 0, "timers": 2})
    })
    .await;
    assert_eq!(settled["entities"], 2, "both entities have rows, the one with only a scheduled signal too");
    for status in STATUSES {
        let count = settled["instances"][status].as_u64().unwrap() as usize;
        assert_eq!(listed(&server, Some(status)).await, count, "{status}: as many as the list shows");
    }
    assert_eq!(listed(&server, None).await, 5, "the list holds every instance and no entity");
    let entities = get_json(&server, &format!("{}/entities?includeTransient=true", common::API)).await;
    assert_eq!(entities.as_array().unwrap().len(), 2);

    // The throughput points catch up with the counters: every start, end, activity and
    // episode of the workload lands in exactly one point. (A counter moves just after
    // its commit, so the counters are read on both sides of the overview, until they
    // hold still.)
    let metrics = || async {
        let response = http().get(server.url("/metrics")).header("x-functions-key", KEY).send().await.unwrap();
        samples(&response.text().await.unwrap())
    };
    let finished = |text: &BTreeMap<String, f64>| {
        ["completed", "failed", "terminated"]
            .iter()
            .map(|end| metric_sum(text, &format!("keel_instances_{end}_total")))
            .sum()
    };
    let deadline = Instant::now() + WAIT;
    let (caught_up, text) = loop {
        let before = metrics().await;
        let overview = overview(&server).await;
        let after = metrics().await;
        let points = |field| throughput_sum(&overview, field);
        if before == after
            && (metric_sum(&before, "keel_instances_started_total"), points("instancesStarted")) == (5, 5)
            && (finished(&before), points("instancesFinished")) == (4, 4)
            && metric_sum(&before, "keel_activity_executions_total") == points("activitiesCompleted")
            && metric_sum(&before, "keel_episodes_committed_total") == points("episodes")
        {
            break (overview, before);
        }
        assert!(Instant::now() < deadline, "the points never caught up with\n{after:#?}\n{overview:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        throughput_sum(&caught_up, "activitiesCompleted"),
        9 + 3 + 1,
        "SayHello 9 times; the declined order's reservation, payment and release; the approval request"
    );
    assert!(throughput_sum(&caught_up, "episodes") >= 3 * 4, "HelloCities alone takes four episodes each");
    assert_eq!(metric_sum(&text, "keel_backlog_timers"), 2, "the gauges agree with the overview");
    assert_eq!(metric_sum(&text, "keel_instances{status=\"Running\"}"), 1);
    let points = caught_up["throughput"]["points"].as_array().unwrap();
    let fields = ["time", "instancesStarted", "instancesFinished", "activitiesCompleted", "episodes"];
    let backlog_fields = ["backlogOrchestrations", "backlogActivities", "backlogTimers"];
    for point in points {
        assert_eq!(keys(point), fields.iter().chain(&backlog_fields).copied().collect(), "{point}");
    }
    let times: Vec<chrono::DateTime<chrono::Utc>> =
        points.iter().map(|point| point["time"].as_str().unwrap().parse().expect("an ISO 8601 time")).collect();
    assert!(times.windows(2).all(|pair| pair[0] < pair[1]), "oldest first: {times:?}");
    let last = points.last().unwrap();
    assert_eq!((last["backlogOrchestrations"].clone(), last["backlogActivities"].clone()), (json!(0), json!(0)));
}

/// The next work item on a `GetWorkItems` stream that is not a health ping.
async fn next_work<E: std::fmt::Debug>(
    stream: &mut (impl futures_util::Stream<Item = Result<WorkItem, E>> + Unpin),
) -> WorkItem {
    use futures_util::StreamExt;
    loop {
        let item = tokio::time::timeout(WAIT, stream.next()).await.expect("a work item in time");
        let item = item.expect("the stream stays open").expect("a work item");
        if !matches!(item.request, Some(Request::HealthPing(_))) {
            return item;
        }
    }
}

async fn overview_without_key(server: &Server) -> Value {
    let response = http().get(server.api("/overview")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// Polls the overview (of a host without an API key) until its workers are `expected`
/// in everything but their id, peer and connection time; returns them.
async fn workers_until(server: &Server, what: &str, expected: &[Value]) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let workers = overview_without_key(server).await["workers"].as_array().unwrap().clone();
        let functions: Vec<Value> = workers
            .iter()
            .map(|worker| {
                json!({"orchestrators": worker["orchestrators"], "activities": worker["activities"],
                       "entities": worker["entities"]})
            })
            .collect();
        if functions == expected {
            return workers;
        }
        assert!(Instant::now() < deadline, "the workers never showed {what}: {workers:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn action(id: i32, kind: OrchestratorActionType) -> proto::OrchestratorAction {
    proto::OrchestratorAction { id, orchestrator_action_type: Some(kind) }
}

#[tokio::test]
async fn a_connected_sdk_worker_is_listed_with_the_functions_it_was_given() {
    // Without the sample app every function goes to the SDK workers; the generated
    // client is the worker.
    let server = Server::start_without_samples(&[]);
    assert_eq!(overview_without_key(&server).await["workers"], json!([]), "none yet");
    let mut sidecar = TaskHubSidecarServiceClient::connect(server.grpc.clone()).await.unwrap();
    let request = proto::GetWorkItemsRequest {
        max_concurrent_orchestration_work_items: 10,
        max_concurrent_activity_work_items: 10,
        ..Default::default()
    };
    let connecting = Instant::now();
    let mut stream = sidecar.get_work_items(request).await.unwrap().into_inner();
    let nothing_yet = json!({"orchestrators": [], "activities": [], "entities": []});
    let workers = workers_until(&server, "the connected worker", &[nothing_yet]).await;
    let worker = &workers[0];
    assert_eq!(keys(worker), BTreeSet::from(["id", "peer", "connectedAt", "orchestrators", "activities", "entities"]));
    assert!(!worker["id"].as_str().unwrap().is_empty());
    let peer: std::net::SocketAddr = worker["peer"].as_str().unwrap().parse().expect("the peer's address");
    assert!(peer.ip().is_loopback(), "{peer}");
    let connected_at: chrono::DateTime<chrono::Utc> = worker["connectedAt"].as_str().unwrap().parse().unwrap();
    let age = (chrono::Utc::now() - connected_at).num_milliseconds().unsigned_abs();
    assert!(age <= connecting.elapsed().as_millis() as u64 + 1000, "connected at {connected_at}, {age} ms ago");

    // An orchestration with an activity, and an entity signal.
    let response = http().post(server.api("/orchestrators/SdkGreeting/sdk-1")).json(&"Ada").send().await.unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    let item = next_work(&mut stream).await;
    let Some(Request::OrchestratorRequest(episode)) = &item.request else { panic!("an episode: {item:?}") };
    assert_eq!(episode.instance_id, "sdk-1");
    let schedule = OrchestratorActionType::ScheduleTask(proto::ScheduleTaskAction {
        name: "SdkGreet".into(),
        input: Some("\"Ada\"".into()),
        ..Default::default()
    });
    sidecar
        .complete_orchestrator_task(proto::OrchestratorResponse {
            instance_id: "sdk-1".into(),
            actions: vec![action(1, schedule)],
            completion_token: item.completion_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let item = next_work(&mut stream).await;
    let Some(Request::ActivityRequest(activity)) = &item.request else { panic!("the activity: {item:?}") };
    assert_eq!(activity.name, "SdkGreet");
    sidecar
        .complete_activity_task(proto::ActivityResponse {
            instance_id: "sdk-1".into(),
            task_id: activity.task_id,
            result: Some("\"Hello Ada\"".into()),
            completion_token: item.completion_token.clone(),
            failure_details: None,
        })
        .await
        .unwrap();
    let item = next_work(&mut stream).await;
    let Some(Request::OrchestratorRequest(_)) = &item.request else { panic!("the second episode: {item:?}") };
    let complete = OrchestratorActionType::CompleteOrchestration(proto::CompleteOrchestrationAction {
        orchestration_status: proto::OrchestrationStatus::Completed as i32,
        result: Some("\"Hello Ada\"".into()),
        ..Default::default()
    });
    sidecar
        .complete_orchestrator_task(proto::OrchestratorResponse {
            instance_id: "sdk-1".into(),
            actions: vec![action(2, complete)],
            completion_token: item.completion_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(common::wait_until_finished(&server, "sdk-1").await["output"], "Hello Ada");

    let response = http().post(server.api("/entities/sdkcounter/k?op=add")).json(&1).send().await.unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    let item = next_work(&mut stream).await;
    assert!(matches!(item.request, Some(Request::EntityRequestV2(_))), "the entity batch: {item:?}");

    let given = json!({"orchestrators": ["SdkGreeting"], "activities": ["SdkGreet"], "entities": ["sdkcounter"]});
    let workers = workers_until(&server, "the functions it was given", &[given]).await;
    assert_eq!(workers[0]["id"], worker["id"], "the same worker");
    assert_eq!(workers[0]["connectedAt"], worker["connectedAt"]);

    drop(stream);
    workers_until(&server, "no worker once the stream is gone", &[]).await;
}
