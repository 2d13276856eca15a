//! End to end over HTTP: the real `keel serve` binary on port 0, driven with reqwest
//! through every management endpoint (entities included), the starter, the app route
//! and each sample pattern, including the 4xx paths and the API key.

mod common;

use std::time::Duration;

use common::{entity_state, http, wait_for_entity, wait_for_status, wait_until_finished, Server, API};
use serde_json::{json, Value};

const ORDER: &str = r#"{"orderId":"o-1","customer":"ada@example.com","items":[{"sku":"A1","quantity":2}]}"#;

const CHECK_STATUS_FIELDS: [&str; 8] = [
    "id",
    "statusQueryGetUri",
    "sendEventPostUri",
    "terminatePostUri",
    "purgeHistoryDeleteUri",
    "restartPostUri",
    "suspendPostUri",
    "resumePostUri",
];

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|value| value.to_str().ok())
}

/// Starts an orchestration through the management API; returns the instance id.
async fn start(server: &Server, name: &str, instance_id: Option<&str>, input: Option<Value>) -> String {
    let path = match instance_id {
        Some(id) => format!("/orchestrators/{name}/{id}"),
        None => format!("/orchestrators/{name}"),
    };
    let mut request = http().post(server.api(&path));
    if let Some(input) = input {
        request = request.json(&input);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    let payload: Value = response.json().await.unwrap();
    payload["id"].as_str().unwrap().to_string()
}

async fn status_of(server: &Server, instance_id: &str, query: &str) -> (u16, Value) {
    let response = http().get(server.api(&format!("/instances/{instance_id}{query}"))).send().await.unwrap();
    let code = response.status().as_u16();
    (code, response.json().await.unwrap())
}

async fn instance_count(server: &Server) -> usize {
    let list: Vec<Value> = http().get(server.api("/instances?top=1000")).send().await.unwrap().json().await.unwrap();
    list.len()
}

#[tokio::test]
async fn the_readme_flow_starts_an_order_and_polls_it_to_its_tracking_number() {
    let server = Server::start(&[]);
    let response = http().post(server.url("/api/orchestrators/PlaceOrder")).body(ORDER).send().await.unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(header(&response, "retry-after"), Some("10"));
    let location = header(&response, "location").unwrap().to_string();
    let payload: Value = response.json().await.unwrap();
    for field in CHECK_STATUS_FIELDS {
        assert!(payload[field].is_string(), "{field} missing in {payload}");
    }
    assert!(payload.get("rewindPostUri").is_none(), "a check-status response has no rewind URI");
    let id = payload["id"].as_str().unwrap();
    assert_eq!(payload.as_object().unwrap().len(), CHECK_STATUS_FIELDS.len());
    let status_uri = payload["statusQueryGetUri"].as_str().unwrap();
    assert_eq!(location, status_uri);
    assert!(status_uri.starts_with(&format!("{}{API}/instances/{id}?", server.base)), "{status_uri}");
    assert!(payload["sendEventPostUri"]
        .as_str()
        .unwrap()
        .contains(&format!("/instances/{id}/raiseEvent/{{eventName}}")));
    assert!(payload["terminatePostUri"].as_str().unwrap().contains("/terminate?reason={text}"));

    let deadline = std::time::Instant::now() + common::WAIT;
    let done = loop {
        let response = http().get(status_uri).send().await.unwrap();
        match response.status().as_u16() {
            202 => {
                assert_eq!(header(&response, "retry-after"), Some("5"));
                assert!(header(&response, "location").is_some());
            }
            200 => break response.json::<Value>().await.unwrap(),
            other => panic!("unexpected status {other}"),
        }
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(done["runtimeStatus"], "Completed");
    assert_eq!(done["output"], "TRACK-O-1");
    assert_eq!(done["name"], "PlaceOrder");
    assert_eq!(done["instanceId"], id);
    assert_eq!(done["input"]["orderId"], "o-1");
    assert_eq!(done["customStatus"], "shipped");
    let created = done["createdTime"].as_str().unwrap();
    assert_eq!(created.len(), "2024-01-01T00:00:00Z".len(), "second precision: {created}");
    assert!(created.ends_with('Z'));
    assert!(done.get("historyEvents").is_none(), "history only with showHistory");
}

#[tokio::test]
async fn a_declined_payment_is_compensated_and_reported_as_failed() {
    let server = Server::start(&[]);
    let order = json!({"orderId": "o-2", "customer": "declined@example.com", "items": [{"sku": "A1", "quantity": 1}]});
    let id = start(&server, "PlaceOrder", Some("declined-order"), Some(order)).await;
    let done = wait_until_finished(&server, &id).await;
    assert_eq!(done["runtimeStatus"], "Failed");
    assert_eq!(done["output"]["errorType"], "PaymentDeclined");

    let (code, _) = status_of(&server, &id, "").await;
    assert_eq!(code, 200, "a failed instance is 200 by default");
    let (code, body) = status_of(&server, &id, "?returnInternalServerErrorOnFailure=true").await;
    assert_eq!(code, 500);
    assert_eq!(body["runtimeStatus"], "Failed");

    let (_, with_history) = status_of(&server, &id, "?showHistory=true").await;
    let events = with_history["historyEvents"].as_array().unwrap();
    let failed = events.iter().find(|event| event["EventType"] == "TaskFailed").expect("a TaskFailed row");
    assert_eq!(failed["FunctionName"], "ProcessPayment");
    let activity_error_type = failed["FailureDetails"]["ErrorType"].as_str().unwrap_or_default();
    assert!(activity_error_type.ends_with("::PaymentError"), "the typed failure's type path: {activity_error_type}");
    assert!(failed["ScheduledTime"].is_string());
    let released =
        events.iter().any(|event| event["EventType"] == "TaskCompleted" && event["FunctionName"] == "ReleaseInventory");
    assert!(released, "the reservation was released: {events:?}");

    // Rewinding runs the failed payment again (the double declines again).
    let response = http().post(server.api(&format!("/instances/{id}/rewind?reason=retry"))).send().await.unwrap();
    assert_eq!(response.status(), 202);
    let again = wait_until_finished(&server, &id).await;
    assert_eq!(again["runtimeStatus"], "Failed");
}

#[tokio::test]
async fn hello_cities_waits_for_its_output_and_shows_the_contract_history() {
    let server = Server::start(&[]);
    let response = http()
        .post(server.api("/orchestrators/HelloCities/hello-1?timeout=20&pollingInterval=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "waited for the output");
    let output: Value = response.json().await.unwrap();
    assert_eq!(output, json!(["Hello Tokyo!", "Hello Seattle!", "Hello London!"]));

    let (code, status) = status_of(&server, "hello-1", "?showHistory=true&showHistoryOutput=true").await;
    assert_eq!(code, 200);
    let events = status["historyEvents"].as_array().unwrap();
    let types: Vec<&str> = events.iter().map(|event| event["EventType"].as_str().unwrap()).collect();
    assert_eq!(types, ["ExecutionStarted", "TaskCompleted", "TaskCompleted", "TaskCompleted", "ExecutionCompleted"]);
    assert_eq!(events[0]["FunctionName"], "HelloCities");
    assert_eq!(events[1]["FunctionName"], "SayHello");
    assert_eq!(events[1]["Result"], "Hello Tokyo!");
    assert!(events[1]["ScheduledTime"].is_string());
    assert!(events[1]["Timestamp"].is_string());
    assert!(events[1].get("TaskScheduledId").is_none());
    assert!(events[1].get("EventId").is_none());
    assert_eq!(events[4]["OrchestrationStatus"], "Completed");

    let (_, without_output) = status_of(&server, "hello-1", "?showHistory=true").await;
    let events = without_output["historyEvents"].as_array().unwrap();
    assert!(events.iter().all(|event| event.get("Result").is_none()), "results only with showHistoryOutput");

    let (_, without_input) = status_of(&server, "hello-1", "?showInput=false").await;
    assert_eq!(without_input["input"], Value::Null);
}

#[tokio::test]
async fn fan_out_fan_in_adds_up_the_sizes_of_every_file() {
    let server = Server::start(&[]);
    let site = server.dir().join("site");
    std::fs::create_dir_all(site.join("images")).unwrap();
    let sizes = [10usize, 200, 3000, 1, 0];
    for (index, size) in sizes.iter().enumerate() {
        let folder = if index % 2 == 0 { site.clone() } else { site.join("images") };
        std::fs::write(folder.join(format!("file-{index}.bin")), vec![7u8; *size]).unwrap();
    }
    let id = start(&server, "BackupSiteContent", None, Some(json!(site.display().to_string()))).await;
    let done = wait_until_finished(&server, &id).await;
    assert_eq!(done["runtimeStatus"], "Completed", "{done}");
    assert_eq!(done["output"], sizes.iter().sum::<usize>());
    let (_, status) = status_of(&server, &id, "?showHistory=true").await;
    let copies = status["historyEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|event| event["FunctionName"] == "CopyFileToBlob")
        .count();
    assert_eq!(copies, sizes.len());

    let empty = server.dir().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let id = start(&server, "BackupSiteContent", None, Some(json!(empty.display().to_string()))).await;
    assert_eq!(wait_until_finished(&server, &id).await["output"], 0);
}

#[tokio::test]
async fn the_monitor_checks_on_a_timer_until_the_sky_clears_or_it_expires() {
    let server = Server::start(&[]);
    let clears = json!({"location": {"state": "WA", "city": "Redmond"}, "phone": "+1-555-0100", "pollingIntervalSeconds": 1, "expirySeconds": 60});
    let id = start(&server, "WeatherMonitor", None, Some(clears)).await;
    let done = wait_until_finished(&server, &id).await;
    assert_eq!(done["output"], json!({"checks": 3, "alertSent": true}), "{done}");
    let (_, status) = status_of(&server, &id, "?showHistory=true").await;
    let timers =
        status["historyEvents"].as_array().unwrap().iter().filter(|event| event["EventType"] == "TimerFired").count();
    assert_eq!(timers, 2);

    let rains = json!({"location": {"state": "WA", "city": "Seattle"}, "phone": "+1-555-0100", "pollingIntervalSeconds": 1, "expirySeconds": 2});
    let id = start(&server, "WeatherMonitor", None, Some(rains)).await;
    let done = wait_until_finished(&server, &id).await;
    assert_eq!(done["output"]["alertSent"], false);
    assert!(done["output"]["checks"].as_u64().unwrap() >= 2);

    let id =
        start(&server, "WeatherMonitor", None, Some(json!({"location": {"state": "WA", "city": "Redmond"}}))).await;
    let done = wait_until_finished(&server, &id).await;
    assert_eq!(done["runtimeStatus"], "Failed");
    assert_eq!(done["output"]["errorType"], "InvalidInput");
}

#[tokio::test]
async fn human_interaction_is_approved_rejected_or_escalated() {
    let server = Server::start(&[]);
    let id = start(&server, "ApprovalWorkflow", Some("approve-me"), Some(json!({"request": "laptop"}))).await;
    let waiting = wait_for_status(&server, &id, &["Running"]).await;
    let response = http().get(server.api(&format!("/instances/{id}"))).send().await.unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(header(&response, "retry-after"), Some("5"));
    assert_eq!(header(&response, "location"), Some(server.api(&format!("/instances/{id}")).as_str()));
    assert_eq!(waiting["runtimeStatus"], "Running");
    let response =
        http().post(server.api(&format!("/instances/{id}/raiseEvent/Approval"))).json(&true).send().await.unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(wait_until_finished(&server, &id).await["output"], "Approved");

    let id = start(&server, "ApprovalWorkflow", None, Some(json!({"request": "yacht"}))).await;
    wait_for_status(&server, &id, &["Running"]).await;
    http().post(server.api(&format!("/instances/{id}/raiseEvent/Approval"))).json(&false).send().await.unwrap();
    assert_eq!(wait_until_finished(&server, &id).await["output"], "Rejected");

    let id = start(&server, "ApprovalWorkflow", None, Some(json!({"request": "coffee", "timeoutSeconds": 0.5}))).await;
    assert_eq!(wait_until_finished(&server, &id).await["output"], "Escalated");
}

#[tokio::test]
async fn suspend_resume_terminate_restart_and_purge_one_instance() {
    let host = Server::start(&[]);
    let server = &host;
    let input = json!({"request": "desk"});
    let id = start(server, "ApprovalWorkflow", Some("lifecycle"), Some(input.clone())).await;
    wait_for_status(server, &id, &["Running"]).await;

    let post = |path: String| async move { http().post(server.api(&path)).send().await.unwrap().status().as_u16() };
    assert_eq!(post(format!("/instances/{id}/suspend?reason=lunch")).await, 202);
    wait_for_status(server, &id, &["Suspended"]).await;
    let (code, _) = status_of(server, &id, "").await;
    assert_eq!(code, 202, "a suspended instance is not finished");
    assert_eq!(post(format!("/instances/{id}/resume?reason=back")).await, 202);
    wait_for_status(server, &id, &["Running"]).await;
    assert_eq!(post(format!("/instances/{id}/rewind")).await, 410, "only failed instances rewind");

    // A second start with the id of a running instance is refused.
    let response =
        http().post(server.api(&format!("/orchestrators/ApprovalWorkflow/{id}"))).json(&input).send().await.unwrap();
    assert_eq!(response.status(), 409);
    // Purging a running instance deletes nothing.
    let response = http().delete(server.api(&format!("/instances/{id}"))).send().await.unwrap();
    assert_eq!(response.status(), 404);

    assert_eq!(post(format!("/instances/{id}/terminate?reason=no%20longer%20needed")).await, 202);
    let terminated = wait_until_finished(server, &id).await;
    assert_eq!(terminated["runtimeStatus"], "Terminated");
    assert_eq!(terminated["output"], "no longer needed");
    let (code, _) = status_of(server, &id, "").await;
    assert_eq!(code, 200);

    // Everything that needs a running instance is now 410 Gone.
    assert_eq!(post(format!("/instances/{id}/terminate")).await, 410);
    assert_eq!(post(format!("/instances/{id}/suspend")).await, 410);
    assert_eq!(post(format!("/instances/{id}/resume")).await, 410);
    let response =
        http().post(server.api(&format!("/instances/{id}/raiseEvent/Approval"))).json(&true).send().await.unwrap();
    assert_eq!(response.status(), 410);
    let error: Value = response.json().await.unwrap();
    assert!(error["message"].as_str().unwrap().contains("Terminated"), "{error}");

    // Restart under a new id, then under the same id.
    let response = http().post(server.api(&format!("/instances/{id}/restart"))).send().await.unwrap();
    assert_eq!(response.status(), 202);
    let restarted: Value = response.json().await.unwrap();
    let new_id = restarted["id"].as_str().unwrap();
    assert_ne!(new_id, id);
    assert_eq!(wait_for_status(server, new_id, &["Running"]).await["input"], input);
    let response = http()
        .post(server.api(&format!("/instances/{id}/restart?restartWithNewInstanceId=false")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(response.json::<Value>().await.unwrap()["id"], id);
    wait_for_status(server, &id, &["Running"]).await;
    assert_eq!(post(format!("/instances/{id}/terminate")).await, 202);
    wait_until_finished(server, &id).await;

    let response = http().delete(server.api(&format!("/instances/{id}"))).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap(), json!({"instancesDeleted": 1}));
    let response = http().delete(server.api(&format!("/instances/{id}"))).send().await.unwrap();
    assert_eq!(response.status(), 404);
    let (code, _) = status_of(server, &id, "").await;
    assert_eq!(code, 404);
    let response = http().post(server.api("/instances/nobody/restart")).send().await.unwrap();
    assert_eq!(response.status(), 400, "restarting an unknown id is a bad request");
}

#[tokio::test]
async fn lists_filter_and_page_with_continuation_tokens() {
    let server = Server::start(&[]);
    for n in 0..5 {
        start(&server, "HelloCities", Some(&format!("page-{n}")), None).await;
    }
    start(&server, "ApprovalWorkflow", Some("other-1"), Some(json!({"request": "x"}))).await;
    for n in 0..5 {
        wait_until_finished(&server, &format!("page-{n}")).await;
    }
    wait_for_status(&server, "other-1", &["Running"]).await;

    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut request = http().get(server.api("/instances?instanceIdPrefix=page-&top=2"));
        if let Some(token) = &token {
            request = request.header("x-ms-continuation-token", token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        token = header(&response, "x-ms-continuation-token").map(str::to_string);
        let page: Vec<Value> = response.json().await.unwrap();
        assert!(page.len() <= 2);
        seen.extend(page.iter().map(|status| status["instanceId"].as_str().unwrap().to_string()));
        pages += 1;
        if token.is_none() {
            break;
        }
        assert!(pages < 10);
    }
    assert_eq!(seen, ["page-0", "page-1", "page-2", "page-3", "page-4"]);

    let running: Vec<Value> =
        http().get(server.api("/instances?runtimeStatus=Running,Pending")).send().await.unwrap().json().await.unwrap();
    assert_eq!(running.len(), 1);
    assert_eq!(running[0]["instanceId"], "other-1");
    assert_eq!(running[0]["input"], json!({"request": "x"}), "lists show inputs unless showInput=false");
    let without_input: Vec<Value> = http()
        .get(server.api("/instances?runtimeStatus=Running&runtimeStatus=Suspended&showInput=false"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(without_input.len(), 1);
    assert_eq!(without_input[0]["input"], Value::Null);
    let future: Vec<Value> = http()
        .get(server.api("/instances?createdTimeFrom=2999-01-01T00:00:00Z"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(future.is_empty());
    let past: Vec<Value> = http()
        .get(server.api("/instances?createdTimeFrom=2000-01-01&createdTimeTo=2999-01-01T00:00:00Z"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(past.len(), 6);
    let by_name: Vec<Value> =
        http().get(server.api("/instances?namePrefix=Approval")).send().await.unwrap().json().await.unwrap();
    assert_eq!(by_name.len(), 1);
}

#[tokio::test]
async fn purge_by_filter_needs_a_start_time_and_deletes_finished_instances() {
    let server = Server::start(&[]);
    for n in 0..3 {
        start(&server, "HelloCities", Some(&format!("old-{n}")), None).await;
    }
    start(&server, "ApprovalWorkflow", Some("still-running"), Some(json!({"request": "x"}))).await;
    for n in 0..3 {
        wait_until_finished(&server, &format!("old-{n}")).await;
    }
    let response = http().delete(server.api("/instances")).send().await.unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["message"], "Please provide value for 'createdTimeFrom' parameter.");

    let response = http()
        .delete(server.api("/instances?createdTimeFrom=2000-01-01T00:00:00Z&runtimeStatus=Failed"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404, "nothing matched");
    let response = http().delete(server.api("/instances?createdTimeFrom=2000-01-01T00:00:00Z")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap(), json!({"instancesDeleted": 3}));
    assert_eq!(instance_count(&server).await, 1, "the running instance stays");
}

#[tokio::test]
async fn trailing_slashes_list_and_purge_like_the_plain_routes() {
    let server = Server::start(&[]);
    for n in 0..3 {
        start(&server, "HelloCities", Some(&format!("slash-{n}")), None).await;
    }
    for n in 0..3 {
        wait_until_finished(&server, &format!("slash-{n}")).await;
    }
    signal(&server, "Counter", "s1", "add", Some(json!(2))).await;
    wait_for_entity(&server, "Counter", "s1", Some(json!(2))).await;
    let list = |path: &'static str| {
        let url = server.api(path);
        async move {
            let response = http().get(url).send().await.unwrap();
            assert_eq!(response.status(), 200, "{path}");
            response.json::<Vec<Value>>().await.unwrap()
        }
    };
    let ids = |list: &[Value]| list.iter().map(|status| status["instanceId"].clone()).collect::<Vec<_>>();
    assert_eq!(list("/instances/").await, list("/instances").await);
    assert_eq!(ids(&list("/instances/?instanceIdPrefix=slash-&top=2").await), ["slash-0", "slash-1"]);
    assert_eq!(list("/entities/").await.len(), 1);
    assert_eq!(list("/entities/Counter/").await, list("/entities/Counter").await);

    let response = http().delete(server.api("/instances/")).send().await.unwrap();
    assert_eq!(response.status(), 400, "purge by filter needs createdTimeFrom, slash or not");
    let response =
        http().delete(server.api("/instances/?createdTimeFrom=2000-01-01T00:00:00.000000Z")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap(), json!({"instancesDeleted": 3}));
    assert_eq!(instance_count(&server).await, 0);
}

#[tokio::test]
async fn the_rpc_base_url_path_is_an_alias_of_the_management_api() {
    let server = Server::start(&[]);
    let rpc = |path: &str| server.url(&format!("/durabletask{path}"));
    let response = http()
        .post(rpc("/orchestrators/ApprovalWorkflow/via-rpc"))
        .json(&json!({"request": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let payload: Value = response.json().await.unwrap();
    assert_eq!(payload["id"], "via-rpc");
    assert!(
        payload["statusQueryGetUri"].as_str().unwrap().starts_with(&server.api("/instances/via-rpc?")),
        "management URLs stay the webhook URLs, as a Functions host's do: {payload}"
    );
    wait_for_status(&server, "via-rpc", &["Running"]).await;
    let response = http().get(rpc("/instances/via-rpc")).send().await.unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(header(&response, "location"), Some(rpc("/instances/via-rpc").as_str()), "Location = the request URL");
    let listed: Vec<Value> =
        http().get(rpc("/instances/?runtimeStatus=Running")).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["input"], json!({"request": "x"}));
    let response = http().post(rpc("/instances/via-rpc/raiseEvent/Approval")).json(&true).send().await.unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(wait_until_finished(&server, "via-rpc").await["output"], "Approved");
    let response = http().post(rpc("/entities/Counter/r1?op=add")).json(&5).send().await.unwrap();
    assert_eq!(response.status(), 202);
    wait_for_entity(&server, "Counter", "r1", Some(json!(5))).await;
    let response = http().get(rpc("/entities/Counter/r1")).send().await.unwrap();
    assert_eq!(response.json::<Value>().await.unwrap(), 5);
    let response = http().delete(rpc("/instances/via-rpc")).send().await.unwrap();
    assert_eq!(response.json::<Value>().await.unwrap(), json!({"instancesDeleted": 1}));

    let response = http().post(rpc("/orchestrators/NoSuchThing")).send().await.unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert!(error["ExceptionMessage"].as_str().unwrap().contains("NoSuchThing"), "{error}");
    let response = http().get(rpc("/no/such/route")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(response.json::<Value>().await.unwrap()["error"], "NotFound");
}

#[tokio::test]
async fn instance_ids_that_are_not_ascii_page_with_opaque_tokens() {
    let server = Server::start(&[]);
    let ids = ["заказ-1", "заказ-2", "注文-3", "a b"];
    for id in ids {
        start(&server, "HelloCities", Some(&keel_http::percent_encode(id)), None).await;
    }
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    for _ in 0..10 {
        let mut request = http().get(server.api("/instances?top=1&showInput=false"));
        if let Some(token) = &token {
            request = request.header("x-ms-continuation-token", token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        token = header(&response, "x-ms-continuation-token").map(str::to_string);
        let page: Vec<Value> = response.json().await.unwrap();
        seen.extend(page.iter().map(|status| status["instanceId"].as_str().unwrap().to_string()));
        match &token {
            Some(token) => assert!(
                token.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_'),
                "{token}"
            ),
            None => break,
        }
    }
    let mut expected: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    expected.sort();
    assert_eq!(seen, expected, "every page, in id order");

    let response = http().get(server.api("/instances")).header("x-ms-continuation-token", "not a token!").send().await;
    let response = response.unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(response.json::<Value>().await.unwrap()["error"], "BadRequest");
}

#[tokio::test]
async fn without_samples_the_host_runs_no_functions_of_its_own() {
    let server = Server::start_without_samples(&[]);
    let names: Vec<String> = http().get(server.api("/orchestrators")).send().await.unwrap().json().await.unwrap();
    assert!(names.is_empty(), "{names:?}");
    let response = http().post(server.url("/api/orders/o-1")).json(&json!({})).send().await.unwrap();
    assert_eq!(response.status(), 404, "the sample app's route is not there");
    // Any name starts, and waits for an SDK worker that hosts it; so does a signal to
    // `Counter`: no Rust orchestrator or counter answers.
    let id = start(&server, "HelloCities", Some("for-an-sdk-worker"), None).await;
    signal(&server, "Counter", "c1", "add", Some(json!(1))).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(status_of(&server, &id, "").await.1["runtimeStatus"], "Pending");
    assert_eq!(entity_state(&server, "Counter", "c1").await, None);
}

#[tokio::test]
async fn bad_requests_get_a_json_4xx_and_write_nothing() {
    let server = Server::start(&["--max-body-bytes", "2048"]);
    let id = start(&server, "ApprovalWorkflow", Some("target"), Some(json!({"request": "x"}))).await;
    wait_for_status(&server, &id, &["Running"]).await;
    let before = instance_count(&server).await;

    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (http().post(server.url("/api/orchestrators/PlaceOrder")).body("{not json"), 400, "malformed JSON"),
        (http().post(server.api("/orchestrators/NoSuchThing")).body("{}"), 400, "unknown function"),
        (http().post(server.api("/orchestrators/HelloCities/bad%23id")), 400, "invalid id character"),
        (http().post(server.api("/orchestrators/HelloCities/bad%5Cid")), 400, "invalid id character"),
        (http().post(server.api("/orchestrators/HelloCities/bad%FFid")), 400, "an id that is not UTF-8"),
        (http().get(server.api("/instances/bad%FFid")), 400, "an id that is not UTF-8"),
        (
            http().post(server.api("/orchestrators/HelloCities")).body(format!("\"{}\"", "x".repeat(4096))),
            413,
            "oversized body",
        ),
        (http().get(server.api("/instances/nobody")), 404, "unknown instance"),
        (http().post(server.api("/instances/nobody/terminate")), 404, "unknown instance"),
        (http().post(server.api("/instances/nobody/raiseEvent/Approval")).json(&true), 404, "unknown instance"),
        (
            http().post(server.api(&format!("/instances/{id}/raiseEvent/Approval"))).body("true"),
            400,
            "no JSON content type",
        ),
        (
            http()
                .post(server.api(&format!("/instances/{id}/raiseEvent/Approval")))
                .header("content-type", "application/json")
                .body("{oops"),
            400,
            "malformed event JSON",
        ),
        (http().get(server.api("/instances?runtimeStatus=Sleeping")), 400, "unknown status"),
        (http().get(server.api("/instances?createdTimeFrom=yesterday")), 400, "bad time"),
        (http().get(server.api(&format!("/instances/{id}?showHistory=maybe"))), 400, "bad boolean"),
        (http().get(server.api("/orchestrators/HelloCities")), 404, "start takes POST only"),
        (http().get(server.url("/no/such/route")), 404, "unknown route"),
    ];
    for (request, expected, what) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), expected, "{what}");
        assert_eq!(header(&response, "content-type"), Some("application/json"), "{what}");
        let body: Value = response.json().await.unwrap();
        assert!(body["message"].is_string() && body["error"].is_string(), "{what}: {body}");
        // The fields of the Functions host's error bodies, beside Keel's.
        assert_eq!(body["Message"], body["message"], "{what}: {body}");
        assert_eq!(body["ExceptionMessage"], body["message"], "{what}: {body}");
        assert_eq!(body["ExceptionType"], body["error"], "{what}: {body}");
    }
    assert_eq!(instance_count(&server).await, before, "nothing was written");
    let (_, status) = status_of(&server, &id, "?showHistory=true").await;
    let raised = status["historyEvents"].as_array().unwrap().iter().any(|event| event["EventType"] == "EventRaised");
    assert!(!raised, "no event reached the instance");
}

#[tokio::test]
async fn with_an_api_key_every_api_and_trigger_request_must_carry_it() {
    let server = Server::start(&["--api-key", "s3cret"]);
    let response = http().post(server.url("/api/orchestrators/HelloCities")).send().await.unwrap();
    assert_eq!(response.status(), 401);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"], "Unauthorized");
    for url in [
        server.api("/instances"),
        server.api("/instances/x"),
        server.url("/api/orders/o-1"),
        server.api("/entities"),
        server.api("/entities/Counter/c1"),
        server.url("/durabletask/instances"),
        server.url("/durabletask/instances/x"),
    ] {
        assert_eq!(http().get(&url).send().await.unwrap().status(), 401, "{url}");
    }
    let signal = http().post(server.api("/entities/Counter/c1?op=add")).json(&1).send().await.unwrap();
    assert_eq!(signal.status(), 401);
    let signal = http().post(server.api("/entities/Counter/c1?op=add&code=s3cret")).json(&1).send().await.unwrap();
    assert_eq!(signal.status(), 202);
    let wrong = http().get(server.api("/instances")).header("x-functions-key", "guess").send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    let wrong = http().get(server.api("/instances?code=s3cre")).send().await.unwrap();
    assert_eq!(wrong.status(), 401);

    let response = http()
        .post(server.url("/api/orchestrators/HelloCities"))
        .header("x-functions-key", "s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let payload: Value = response.json().await.unwrap();
    let status_uri = payload["statusQueryGetUri"].as_str().unwrap();
    assert!(status_uri.contains("code=s3cret"), "management URLs carry the key: {status_uri}");
    let response = http().get(status_uri).send().await.unwrap();
    assert!(response.status() == 200 || response.status() == 202);
    let listed = http().get(server.api("/instances?code=s3cret")).send().await.unwrap();
    assert_eq!(listed.status(), 200);

    // The dashboard's page holds no data and loads without the key.
    let page = http().get(server.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
}

#[tokio::test]
async fn the_starter_waits_and_refuses_running_duplicates() {
    let server = Server::start(&[]);
    let response = http().post(server.url("/api/orchestrators/HelloCities/wait")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()[2], "Hello London!");

    let response = http()
        .post(server.url("/api/orchestrators/ApprovalWorkflow/wait?timeout=0.5&retryInterval=0.1"))
        .json(&json!({"request": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "still waiting for approval");
    assert!(header(&response, "location").is_some());

    let response =
        http().post(server.url("/api/orchestrators/HelloCities/wait?timeout=1&retryInterval=5")).send().await.unwrap();
    assert_eq!(response.status(), 400, "retry interval longer than the timeout");

    let response = http()
        .post(server.url("/api/orchestrators/ApprovalWorkflow/singleton"))
        .json(&json!({"request": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let response = http()
        .post(server.url("/api/orchestrators/ApprovalWorkflow/singleton"))
        .json(&json!({"request": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
}

#[tokio::test]
async fn an_app_route_uses_the_trigger_helpers() {
    let server = Server::start(&[]);
    let order = json!({"customer": "ada@example.com", "items": [{"sku": "A1", "quantity": 1}]});
    let response = http().post(server.url("/api/orders/o-9")).json(&order).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap(), "TRACK-O-9");
    let (_, status) = status_of(&server, "order-o-9", "").await;
    assert_eq!(status["runtimeStatus"], "Completed");

    let declined = json!({"customer": "declined@example.com", "items": [{"sku": "A1", "quantity": 1}]});
    let response = http().post(server.url("/api/orders/o-10")).json(&declined).send().await.unwrap();
    assert_eq!(response.status(), 200, "a failed order answers with its status");
    let status: Value = response.json().await.unwrap();
    assert_eq!(status["runtimeStatus"], "Failed");

    let response = http().post(server.url("/api/orders/o-11?timeout=0")).json(&order).send().await.unwrap();
    assert!(response.status() == 202 || response.status() == 200);
    let response = http().post(server.url("/api/orders/o-12")).body("[]").send().await.unwrap();
    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn logs_name_the_instance_and_function_and_can_be_json() {
    let server = Server::start(&["--log-format", "json"]);
    // Started with a traceparent: the activity's log lines carry its trace id.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = http()
        .post(server.url("/api/orchestrators/HelloCities/logged"))
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    wait_until_finished(&server, "logged").await;
    // The host writes its log as it goes: wait for the activity's line to be there.
    let deadline = std::time::Instant::now() + common::WAIT;
    let hello = loop {
        let log = server.log();
        let lines: Vec<Value> =
            log.lines().map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"))).collect();
        if let Some(hello) = lines.into_iter().find(|line| line["function"] == "SayHello") {
            break hello;
        }
        assert!(std::time::Instant::now() < deadline, "no activity line in {log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(hello["instance_id"], "logged");
    assert_eq!(hello["span"]["trace_id"], trace_id, "the line names its trace: {hello}");
}

/// Signals an entity operation over HTTP with a JSON body; expects 202.
async fn signal(server: &Server, name: &str, key: &str, operation: &str, input: Option<Value>) {
    let mut request = http().post(server.api(&format!("/entities/{name}/{key}?op={operation}")));
    if let Some(input) = input {
        request = request.json(&input);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
}

/// Every page of an entity list, following continuation tokens; checks that each token
/// is ASCII-safe (base64url).
async fn entity_pages(server: &Server, path_and_query: &str) -> (Vec<Value>, usize) {
    let mut entities = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut request = http().get(server.api(path_and_query));
        if let Some(token) = &token {
            request = request.header("x-ms-continuation-token", token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        token = header(&response, "x-ms-continuation-token").map(str::to_string);
        if let Some(token) = &token {
            assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{token}");
        }
        let page: Vec<Value> = response.json().await.unwrap();
        entities.extend(page);
        pages += 1;
        assert!(pages < 20, "the pages never end");
        if token.is_none() {
            return (entities, pages);
        }
    }
}

fn entity_ids(entities: &[Value]) -> Vec<String> {
    entities
        .iter()
        .map(|entity| {
            format!("{}/{}", entity["entityId"]["name"].as_str().unwrap(), entity["entityId"]["key"].as_str().unwrap())
        })
        .collect()
}

#[tokio::test]
async fn concurrent_signals_to_a_counter_all_count_and_delete_removes_its_state() {
    let server = Server::start(&[]);
    let signals = (0..50).map(|_| {
        let url = server.api("/entities/Counter/c1?op=add");
        async move { http().post(url).json(&2).send().await.unwrap().status().as_u16() }
    });
    let statuses = futures_util::future::join_all(signals).await;
    assert!(statuses.iter().all(|status| *status == 202), "{statuses:?}");
    wait_for_entity(&server, "Counter", "c1", Some(json!(100))).await;

    // Names are case-insensitive; the body of the GET is the state itself.
    let response = http().get(server.api("/entities/counter/c1")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "content-type"), Some("application/json"));
    assert_eq!(response.text().await.unwrap(), "100");

    let response = http().get(server.api("/entities/Counter/never-signalled")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(response.json::<Value>().await.unwrap()["error"], "NotFound");

    // A signal delivered later: applied no earlier than its scheduled time.
    let at = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let scheduled = at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
    let response = http()
        .post(server.api(&format!("/entities/Counter/later?op=add&scheduledTime={scheduled}")))
        .json(&7)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    wait_for_entity(&server, "Counter", "later", Some(json!(7))).await;
    let listed: Vec<Value> = http().get(server.api("/entities/Counter")).send().await.unwrap().json().await.unwrap();
    let later = listed.iter().find(|entity| entity["entityId"]["key"] == "later").expect("listed");
    assert!(later["lastOperationTime"].as_str().unwrap() >= scheduled.as_str(), "{later} before {scheduled}");

    let response = http().delete(server.api("/entities/Counter/c1")).send().await.unwrap();
    assert_eq!(response.status(), 202);
    wait_for_entity(&server, "Counter", "c1", None).await;
    let listed: Vec<Value> = http().get(server.api("/entities")).send().await.unwrap().json().await.unwrap();
    assert_eq!(entity_ids(&listed), ["counter/later"], "a deleted entity is not listed");
    let transient: Vec<Value> = http()
        .get(server.api("/entities?includeTransient=true&fetchState=true"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(entity_ids(&transient), ["counter/c1", "counter/later"]);
    assert_eq!(transient[0]["state"], Value::Null);

    // Cleaning removes the empty entity, once.
    let response = http().post(server.api("/entities/clean")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap(), json!({"emptyEntitiesRemoved": 1, "orphanedLocksReleased": 0}));
    let transient: Vec<Value> =
        http().get(server.api("/entities?includeTransient=true")).send().await.unwrap().json().await.unwrap();
    assert_eq!(entity_ids(&transient), ["counter/later"]);
    let response = http()
        .post(server.api("/entities/clean?removeEmptyEntities=true&releaseOrphanedLocks=false"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.json::<Value>().await.unwrap(), json!({"emptyEntitiesRemoved": 0, "orphanedLocksReleased": 0}));
    // A deleted entity starts again from nothing.
    signal(&server, "Counter", "c1", "add", Some(json!(3))).await;
    wait_for_entity(&server, "Counter", "c1", Some(json!(3))).await;
}

#[tokio::test]
async fn entity_lists_filter_by_name_and_time_and_page_with_opaque_tokens() {
    let server = Server::start(&[]);
    let keys = ["c-0", "c-1", "c-2", "ключ", "c 4"];
    for key in keys {
        signal(&server, "Counter", key, "add", Some(json!(1))).await;
    }
    signal(&server, "Account", "alice", "deposit", Some(json!(10))).await;
    for key in keys {
        wait_for_entity(&server, "Counter", key, Some(json!(1))).await;
    }
    wait_for_entity(&server, "Account", "alice", Some(json!(10))).await;

    let (all, pages) = entity_pages(&server, "/entities?top=2").await;
    assert_eq!(
        entity_ids(&all),
        ["account/alice", "counter/c 4", "counter/c-0", "counter/c-1", "counter/c-2", "counter/ключ"]
    );
    assert!(pages >= 3, "{pages} pages");
    assert!(all.iter().all(|entity| entity.get("state").is_none()), "no state without fetchState");
    let time = all[0]["lastOperationTime"].as_str().unwrap();
    assert!(time.ends_with('Z') && time.len() == "2024-01-01T00:00:00.000Z".len(), "{time}");

    // One entity a page: the key that is not ASCII makes a token too.
    let (counters, pages) = entity_pages(&server, "/entities/COUNTER?top=1&fetchState=true").await;
    assert_eq!(counters.len(), 5);
    assert!(pages >= 5);
    assert!(counters.iter().all(|entity| entity["entityId"]["name"] == "counter" && entity["state"] == 1));

    let by_prefix: Vec<Value> =
        http().get(server.api("/entities?namePrefix=Acc&fetchState=true")).send().await.unwrap().json().await.unwrap();
    assert_eq!(entity_ids(&by_prefix), ["account/alice"]);
    assert_eq!(by_prefix[0]["state"], 10);
    let future: Vec<Value> = http()
        .get(server.api("/entities?lastOperationTimeFrom=2999-01-01T00:00:00Z"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(future.is_empty());
    let past: Vec<Value> =
        http().get(server.api("/entities?lastOperationTimeTo=2000-01-01")).send().await.unwrap().json().await.unwrap();
    assert!(past.is_empty());
    let between: Vec<Value> = http()
        .get(server.api("/entities/Account?lastOperationTimeFrom=2000-01-01&lastOperationTimeTo=2999-01-01T00:00:00Z"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(between.len(), 1);
    let none: Vec<Value> = http().get(server.api("/entities/clean")).send().await.unwrap().json().await.unwrap();
    assert!(none.is_empty(), "GET /entities/clean lists the entities named clean");
    // Entities are not instances.
    let instances: Vec<Value> = http().get(server.api("/instances")).send().await.unwrap().json().await.unwrap();
    assert!(instances.is_empty(), "{instances:?}");
}

#[tokio::test]
async fn bad_entity_requests_get_a_json_4xx_and_write_nothing() {
    let server = Server::start(&["--max-body-bytes", "2048"]);
    let long_key = "k".repeat(300);
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (http().post(server.api("/entities/Nope/x?op=add")).json(&1), 404, "unknown entity name"),
        (http().delete(server.api("/entities/Nope/x")), 404, "unknown entity name"),
        (http().post(server.api("/entities/Counter/a%23b?op=add")).json(&1), 400, "'#' in the key"),
        (http().post(server.api("/entities/Counter/a%40b?op=add")).json(&1), 400, "'@' in the key"),
        (http().post(server.api("/entities/Counter/a%5Cb?op=add")).json(&1), 400, "'\\' in the key"),
        (http().post(server.api("/entities/Counter/a%2Fb?op=add")).json(&1), 400, "'/' in the key"),
        (http().post(server.api("/entities/Counter/a%0Ab?op=add")).json(&1), 400, "a control character in the key"),
        (http().post(server.api("/entities/Counter/a%FFb?op=add")).json(&1), 400, "a key that is not UTF-8"),
        (http().post(server.api("/entities/Counter/%24?op=add")).json(&1), 400, "the empty key '$'"),
        (http().get(server.api("/entities/Counter/$")), 400, "the empty key '$'"),
        (http().delete(server.api("/entities/Counter/$")), 400, "the empty key '$'"),
        (http().post(server.api(&format!("/entities/Counter/{long_key}?op=add"))).json(&1), 400, "an over-long key"),
        (http().post(server.api("/entities/Counter/x")).json(&1), 400, "no operation"),
        (http().post(server.api("/entities/Counter/x?op=")).json(&1), 400, "an empty operation"),
        (
            http().post(server.api(&format!("/entities/Counter/x?op={}", "o".repeat(300)))).json(&1),
            400,
            "an over-long operation",
        ),
        (
            http()
                .post(server.api("/entities/Counter/x?op=add"))
                .header("content-type", "application/json")
                .body("{oops"),
            400,
            "malformed JSON",
        ),
        (http().post(server.api("/entities/Counter/x?op=add")).json(&"x".repeat(4096)), 413, "an oversized body"),
        (http().post(server.api("/entities/Counter/x?op=add&scheduledTime=soon")).json(&1), 400, "a bad time"),
        (http().post(server.api("/entities/Counter")).json(&1), 400, "a signal without a key"),
        (http().put(server.api("/entities/Counter/x")).json(&1), 404, "an unknown method"),
        (http().get(server.api("/entities/a%40b")), 400, "'@' in a listed name"),
        (http().get(server.api("/entities?namePrefix=a@b")), 400, "'@' in a name prefix"),
        (http().get(server.api("/entities?fetchState=maybe")), 400, "a bad boolean"),
        (http().get(server.api("/entities?top=many")), 400, "a bad page size"),
        (http().get(server.api("/entities?lastOperationTimeFrom=yesterday")), 400, "a bad time"),
        (http().get(server.api("/entities")).header("x-ms-continuation-token", "not a token!"), 400, "a bad token"),
        (http().post(server.api("/entities/clean?removeEmptyEntities=perhaps")), 400, "a bad boolean"),
        (http().get(server.api("/entities/Nope/x")), 404, "unknown entity name"),
    ];
    for (request, expected, what) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), expected, "{what}");
        assert_eq!(header(&response, "content-type"), Some("application/json"), "{what}");
        let body: Value = response.json().await.unwrap();
        assert!(body["message"].is_string() && body["error"].is_string(), "{what}: {body}");
    }
    let response = http().post(server.api("/entities/Nope/x?op=add")).json(&1).send().await.unwrap();
    assert_eq!(response.json::<Value>().await.unwrap()["error"], "UnknownEntity");

    // Nothing was written, not even an entity without state.
    let listed: Vec<Value> =
        http().get(server.api("/entities?includeTransient=true")).send().await.unwrap().json().await.unwrap();
    assert!(listed.is_empty(), "{listed:?}");
    let named: Vec<Value> = http().get(server.api("/entities/Nope")).send().await.unwrap().json().await.unwrap();
    assert!(named.is_empty());
    assert_eq!(instance_count(&server).await, 0);

    // The body of a signal without a JSON content type is text: a JSON string. Typed
    // decoding reads a string that holds JSON as that JSON (the Durable Functions Python
    // client encodes inputs twice), so "2" adds 2, and `add` refuses "two".
    for text in ["2", "two"] {
        let response = http().post(server.api("/entities/Counter/typed?op=add")).body(text).send().await.unwrap();
        assert_eq!(response.status(), 202);
    }
    signal(&server, "Counter", "typed", "add", Some(json!(5))).await;
    wait_for_entity(&server, "Counter", "typed", Some(json!(7))).await;
}

#[tokio::test]
async fn a_bank_transfer_started_over_http_moves_money_inside_a_critical_section() {
    let server = Server::start(&[]);
    signal(&server, "Account", "alice", "deposit", Some(json!(100))).await;
    signal(&server, "Account", "bob", "deposit", Some(json!(5))).await;
    wait_for_entity(&server, "Account", "alice", Some(json!(100))).await;
    wait_for_entity(&server, "Account", "bob", Some(json!(5))).await;

    let id =
        start(&server, "BankTransfer", Some("transfer-1"), Some(json!({"from": "alice", "to": "bob", "amount": 30})))
            .await;
    let done = wait_until_finished(&server, &id).await;
    assert_eq!(done["runtimeStatus"], "Completed", "{done}");
    assert_eq!(done["output"], json!({"transferred": true, "fromBalance": 70, "toBalance": 35}));
    assert_eq!(entity_state(&server, "Account", "alice").await, Some(json!(70)));
    assert_eq!(entity_state(&server, "Account", "bob").await, Some(json!(35)));

    let id = start(&server, "BankTransfer", None, Some(json!({"from": "bob", "to": "alice", "amount": 500}))).await;
    let done = wait_until_finished(&server, &id).await;
    assert_eq!(done["output"], json!({"transferred": false, "fromBalance": 35, "toBalance": 70}));

    // Transfers both ways at once: each one sees both accounts alone, money is kept.
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(
            start(
                &server,
                "BankTransfer",
                Some(&format!("a-to-b-{n}")),
                Some(json!({"from": "alice", "to": "bob", "amount": 10})),
            )
            .await,
        );
        ids.push(
            start(
                &server,
                "BankTransfer",
                Some(&format!("b-to-a-{n}")),
                Some(json!({"from": "bob", "to": "alice", "amount": 3})),
            )
            .await,
        );
    }
    for id in &ids {
        let done = wait_until_finished(&server, id).await;
        assert_eq!(done["runtimeStatus"], "Completed", "{done}");
        assert_eq!(done["output"]["transferred"], true, "{done}");
        let total = done["output"]["fromBalance"].as_i64().unwrap() + done["output"]["toBalance"].as_i64().unwrap();
        assert_eq!(total, 105, "{id} saw money created or lost: {done}");
    }
    assert_eq!(entity_state(&server, "Account", "alice").await, Some(json!(70 - 40 + 12)));
    assert_eq!(entity_state(&server, "Account", "bob").await, Some(json!(35 + 40 - 12)));
}

#[tokio::test]
async fn versions_given_at_start_show_in_status_lists_and_restarts() {
    let server = Server::start(&[]);
    let starts = [
        (server.url("/api/orchestrators/HelloCities/ver-starter?version=2.1"), "ver-starter", "2.1"),
        (server.api("/orchestrators/HelloCities/ver-management?version=3.0.1"), "ver-management", "3.0.1"),
        (server.url("/durabletask/orchestrators/HelloCities/ver-alias?version=v4"), "ver-alias", "v4"),
    ];
    for (url, id, version) in &starts {
        let response = http().post(url).send().await.unwrap();
        assert_eq!(response.status(), 202, "{url}");
        let done = wait_until_finished(&server, id).await;
        assert_eq!(done["runtimeStatus"], "Completed", "{done}");
        assert_eq!(done["version"], *version, "{done}");
    }
    let response = http().post(server.url("/api/orchestrators/HelloCities/wait?version=5")).send().await.unwrap();
    assert_eq!(response.status(), 200, "the waiting starter takes a version too");
    start(&server, "HelloCities", Some("ver-none"), None).await;
    let done = wait_until_finished(&server, "ver-none").await;
    assert!(done.get("version").is_none(), "no version, no field: {done}");

    let listed: Vec<Value> = http().get(server.api("/instances?top=100")).send().await.unwrap().json().await.unwrap();
    let versions: Vec<(&str, Option<&str>)> = listed
        .iter()
        .map(|status| (status["name"].as_str().unwrap(), status.get("version").and_then(Value::as_str)))
        .collect();
    for version in ["2.1", "3.0.1", "v4", "5"] {
        assert!(versions.contains(&("HelloCities", Some(version))), "{version} in {versions:?}");
    }
    assert!(versions.contains(&("HelloCities", None)), "{versions:?}");

    // A restart runs the same version.
    let response = http().post(server.api("/instances/ver-starter/restart")).send().await.unwrap();
    assert_eq!(response.status(), 202);
    let restarted = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    assert_eq!(wait_until_finished(&server, &restarted).await["version"], "2.1");

    // A version too long is refused before anything is written.
    let before = instance_count(&server).await;
    let long = "v".repeat(300);
    let response = http()
        .post(server.url(&format!("/api/orchestrators/HelloCities/ver-long?version={long}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert!(error["message"].as_str().unwrap().contains("'version'"), "{error}");
    assert_eq!(status_of(&server, "ver-long", "").await.0, 404);
    assert_eq!(instance_count(&server).await, before);
}

#[tokio::test]
async fn the_history_route_exports_the_current_execution() {
    let server = Server::start(&[]);
    let url = server.api("/orchestrators/HelloCities/export-1?timeout=20&pollingInterval=1&version=1.0");
    let response = http().post(url).send().await.unwrap();
    assert_eq!(response.status(), 200);

    let response = http().get(server.api("/instances/export-1/history")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "content-type"), Some("application/json"));
    let export: Value = response.json().await.unwrap();
    assert_eq!(export["instanceId"], "export-1");
    assert_eq!(export["name"], "HelloCities");
    assert_eq!(export["version"], "1.0");
    assert_eq!(export["runtimeStatus"], "Completed");
    let events = export["events"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|event| event["kind"]["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.iter().filter(|kind| **kind == "TaskScheduled").count(), 3, "{kinds:?}");
    assert_eq!(kinds.iter().filter(|kind| **kind == "TaskCompleted").count(), 3, "{kinds:?}");
    assert!(kinds.contains(&"ExecutionStarted") && kinds.last() == Some(&"ExecutionCompleted"), "{kinds:?}");
    let started = events.iter().find(|event| event["kind"]["type"] == "ExecutionStarted").unwrap();
    assert_eq!(started["kind"]["execution_id"], export["executionId"], "{started}");
    assert_eq!(started["kind"]["version"], "1.0", "{started}");

    let alias: Value =
        http().get(server.url("/durabletask/instances/export-1/history")).send().await.unwrap().json().await.unwrap();
    assert_eq!(alias, export);

    let response = http().get(server.api("/instances/nobody/history")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"], "NotFound");
}

#[tokio::test]
async fn waits_out_of_range_are_refused_before_anything_is_written() {
    let server = Server::start(&[]);
    start(&server, "HelloCities", Some("wait-done"), None).await;
    wait_until_finished(&server, "wait-done").await;
    let export = |server: &Server| {
        let url = server.api("/instances/wait-done/history");
        async move { http().get(url).send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let done_before = export(&server).await;
    let before = instance_count(&server).await;

    // The regression: a timeout too long for the clock is a 400, not a panic or a hang.
    let response =
        http().post(server.url("/api/orchestrators/HelloCities/wait-huge?timeout=1e19&pollingInterval=1")).send();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(header(&response, "content-type"), Some("application/json"));
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"], "BadRequest");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("'timeout'") && message.contains("1e19"), "{message}");
    assert_eq!(status_of(&server, "wait-huge", "").await.0, 404, "no instance was created");

    // An interval longer than the timeout: refused before the start too.
    let response =
        http().post(server.url("/api/orchestrators/HelloCities/wait-interval?timeout=1&pollingInterval=5")).send();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert!(error["message"].as_str().unwrap().contains("must not be longer than the timeout"), "{error}");
    assert_eq!(status_of(&server, "wait-interval", "").await.0, 404, "no instance was created");

    for value in ["1e19", "-1", "NaN", "inf", "-inf", "1e400", "86401"] {
        let urls = [
            server.url(&format!("/api/orchestrators/HelloCities/w?timeout={value}&pollingInterval=1")),
            server.url(&format!("/api/orchestrators/HelloCities/w?timeout=10&pollingInterval={value}")),
            server.url(&format!("/api/orchestrators/HelloCities?timeout={value}&pollingInterval=0")),
            server.api(&format!("/orchestrators/HelloCities/w?timeout={value}&pollingInterval=1")),
            server.url(&format!("/durabletask/orchestrators/HelloCities/w?timeout={value}&pollingInterval=1")),
            server.url(&format!("/api/orchestrators/HelloCities/wait?timeout={value}")),
            server.url(&format!("/api/orchestrators/HelloCities/wait?retryInterval={value}")),
            server.url(&format!("/api/orchestrators/HelloCities/wait?timeout=5&pollingInterval={value}")),
            server.api(&format!("/instances/wait-done/restart?timeout={value}&pollingInterval=1")),
            server.api(&format!(
                "/instances/wait-done/restart?restartWithNewInstanceId=false&timeout=10&pollingInterval={value}"
            )),
            // Only one of the pair: no wait, but a bad value is still refused.
            server.url(&format!("/api/orchestrators/HelloCities/w?timeout={value}")),
        ];
        for url in urls {
            let response = http().post(&url).send().await.unwrap();
            assert_eq!(response.status(), 400, "{url}");
            let error: Value = response.json().await.unwrap();
            assert!(error["message"].as_str().unwrap().contains("from 0 to 86400"), "{url}: {error}");
        }
    }
    let response = http()
        .post(server.api("/instances/wait-done/restart?restartWithNewInstanceId=false&timeout=1&pollingInterval=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400, "a restart's interval longer than its timeout");
    assert_eq!(instance_count(&server).await, before, "nothing was written");
    assert_eq!(status_of(&server, "w", "").await.0, 404);
    assert_eq!(export(&server).await, done_before, "the finished instance was not restarted in place");

    // The helpers an app's route calls refuse such a wait as well (400, not a hang).
    let order = json!({"customer": "ada@example.com", "items": [{"sku": "A1", "quantity": 1}]});
    let response = http().post(server.url("/api/orders/o-huge?timeout=1e19")).json(&order).send().await.unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert!(error["message"].as_str().unwrap().contains("longer than the limit"), "{error}");
}
