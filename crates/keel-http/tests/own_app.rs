//! A user's own app on the host as a library: `Host::start` with an `App` whose routes
//! use the free trigger helpers (`create_check_status_response`,
//! `wait_for_completion_or_create_check_status_response`) on the request they serve.

use std::time::Duration;

use axum::extract::Request;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use keel::{Activity, ActivityContext, Event, Never, Orchestration, OrchestrationContext, OrchestrationError};
use keel_http::{
    create_check_status_response, wait_for_completion_or_create_check_status_response, App, DurableClient, Host,
    HostConfig,
};
use serde_json::Value;

/// The routes start both by the name in their path, with the input 21.
const DOUBLE: Orchestration<u64, u64> = Orchestration::new("Double");
const WAIT: Orchestration<u64, ()> = Orchestration::new("Wait");
const DOUBLE_ACTIVITY: Activity<u64, u64, Never> = Activity::new("Double");
const NEVER_RAISED: Event<()> = Event::new("Never");

async fn double(ctx: OrchestrationContext, n: u64) -> Result<u64, OrchestrationError> {
    Ok(ctx.call(DOUBLE_ACTIVITY, &n).await?)
}

async fn double_activity(_ctx: ActivityContext, n: u64) -> Result<u64, Never> {
    Ok(n * 2)
}

async fn wait_forever(ctx: OrchestrationContext, _input: u64) -> Result<(), OrchestrationError> {
    Ok(ctx.wait(NEVER_RAISED).await?)
}

/// `POST /start/{name}`: starts and answers with the check-status response.
async fn start(durable: DurableClient, request: Request) -> Response {
    let name = request.uri().path().rsplit('/').next().unwrap_or_default().to_string();
    let id = durable.client().start_new(&name, &21u64).await.expect("the start is accepted");
    create_check_status_response(&request, &id)
}

/// `POST /run/{name}`: starts and waits up to a second.
async fn run(durable: DurableClient, request: Request) -> Response {
    let (parts, _body) = request.into_parts();
    let name = parts.uri.path().rsplit('/').next().unwrap_or_default().to_string();
    let id = durable.client().start_new(&name, &21u64).await.expect("the start is accepted");
    wait_for_completion_or_create_check_status_response(&parts, &id, Duration::from_secs(1), Duration::from_millis(100))
        .await
}

#[tokio::test]
async fn an_apps_routes_answer_like_durable_functions() {
    let dir = tempfile::tempdir().unwrap();
    let app = App::new()
        .functions(|worker| {
            worker
                .orchestration(DOUBLE, double)
                .orchestration(WAIT, wait_forever)
                .activity(DOUBLE_ACTIVITY, double_activity)
        })
        .routes(Router::new().route("/start/{name}", post(start)).route("/run/{name}", post(run)));
    let config = HostConfig {
        address: ([127, 0, 0, 1], 0).into(),
        store_url: format!("sqlite://{}", dir.path().join("hub.db").display()),
        ..HostConfig::default()
    };
    let host = Host::start(app, config).await.unwrap();
    let base = format!("http://{}", host.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(host.run_until(async move {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::builder().no_proxy().build().unwrap();

    let response = http.post(format!("{base}/start/Double")).send().await.unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(response.headers()["retry-after"], "10");
    let payload: Value = response.json().await.unwrap();
    let status_uri = payload["statusQueryGetUri"].as_str().unwrap();
    assert!(status_uri.starts_with(&format!("{base}/runtime/webhooks/durabletask/instances/")), "{status_uri}");

    let response = http.post(format!("{base}/run/Double")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap(), 42);

    let response = http.post(format!("{base}/run/Wait")).send().await.unwrap();
    assert_eq!(response.status(), 202, "still running after the timeout");
    assert!(response.headers().contains_key("location"));

    stop.send(()).unwrap();
    served.await.unwrap().unwrap();
}
