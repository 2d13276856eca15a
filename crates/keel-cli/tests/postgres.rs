//! `keel serve --store postgres://…`: the host on a PostgreSQL task hub, driven over
//! HTTP like the SQLite one. Runs when `KEEL_TEST_POSTGRES_URL` names a server (CI
//! starts one); skipped with a message otherwise.

mod common;

use common::{http, wait_until_finished, Server};
use serde_json::{json, Value};

#[tokio::test]
async fn the_host_runs_the_samples_on_a_postgres_task_hub() {
    let Ok(url) = std::env::var("KEEL_TEST_POSTGRES_URL") else {
        assert!(std::env::var("CI").map_or(true, |ci| ci != "true"), "CI must run the host on PostgreSQL");
        eprintln!("SKIPPED: set KEEL_TEST_POSTGRES_URL to run the host on PostgreSQL");
        return;
    };
    // A schema of its own: one database holds as many task hubs as it has schemas.
    let unique = format!("{}_{}", std::process::id(), chrono::Utc::now().timestamp_micros());
    let separator = if url.contains('?') { '&' } else { '?' };
    let store = format!("{url}{separator}schema=keel_cli_e2e_{unique}");
    let server = Server::start_on(Some(&store), &[]);

    let order = json!({"orderId": "o-1", "customer": "ada@example.com", "items": [{"sku": "A1", "quantity": 2}]});
    let response = http().post(server.url("/api/orchestrators/PlaceOrder")).json(&order).send().await.unwrap();
    assert_eq!(response.status(), 202, "{}", server.log());
    let payload: Value = response.json().await.unwrap();
    let id = payload["id"].as_str().unwrap();
    let done = wait_until_finished(&server, id).await;
    assert_eq!(done["output"], "TRACK-O-1", "{done}");

    let response = http().post(server.url("/api/orchestrators/HelloCities/wait")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()[0], "Hello Tokyo!");
    let listed: Vec<Value> = http().get(server.api("/instances")).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed.len(), 2);
}
