//! A function app of your own on the keel host: one orchestrator, one activity and an
//! HTTP trigger route next to the management API and the dashboard.
//!
//! `cargo run -p keel-http --example greeter_app`, then
//! `curl -si -X POST localhost:7072/api/greet/Ada` (200 with the greeting, or a 202
//! check-status response if it takes longer than five seconds).

use std::time::Duration;

use axum::extract::Path;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use keel::{Activity, ActivityContext, Never, Orchestration, OrchestrationContext, OrchestrationError};
use keel_http::{ApiError, App, DurableClient, HostConfig};

const GREET: Orchestration<String, String> = Orchestration::new("Greet");
const SAY_HELLO: Activity<String, String, Never> = Activity::new("SayHello");

async fn greet(ctx: OrchestrationContext, name: String) -> Result<String, OrchestrationError> {
    Ok(ctx.call(SAY_HELLO, &name).await?)
}

async fn say_hello(_ctx: ActivityContext, name: String) -> Result<String, Never> {
    Ok(format!("Hello {name}!"))
}

/// `POST /api/greet/{name}`: starts `Greet` and answers with its output when it is done
/// within five seconds.
async fn greet_route(durable: DurableClient, Path(name): Path<String>) -> Result<Response, ApiError> {
    let instance = durable.client().start(GREET, &name).await?;
    durable
        .wait_for_completion_or_create_check_status_response(
            instance.id(),
            Duration::from_secs(5),
            Duration::from_secs(1),
        )
        .await
}

#[tokio::main]
async fn main() -> Result<(), keel_http::HostError> {
    let app = App::new()
        .functions(|worker| worker.orchestration(GREET, greet).activity(SAY_HELLO, say_hello))
        .routes(Router::new().route("/api/greet/{name}", post(greet_route)));
    let config = HostConfig {
        address: ([127, 0, 0, 1], 7072).into(),
        store_url: "sqlite://greeter.db".to_string(),
        ..HostConfig::default()
    };
    println!("serving on http://{}", config.address);
    keel_http::serve(app, config).await
}
