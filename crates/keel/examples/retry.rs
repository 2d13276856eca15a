//! Retry with a typed predicate: a flaky payment gateway is retried with exponential
//! backoff while it is busy, and not at all once it declines the card.
//!
//! `cargo run --release -p keel --example retry`

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use keel::{
    Activity, ActivityContext, Orchestration, OrchestrationContext, OrchestrationError, RetryPolicy, TaskFailure,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
enum GatewayError {
    #[error("the gateway is busy")]
    Busy,
    #[error("the card was declined")]
    Declined,
}
keel::impl_failure!(GatewayError);

const CHARGE: Orchestration<u64, String> = Orchestration::new("Charge");
const CALL_GATEWAY: Activity<u64, String, GatewayError> = Activity::new("CallGateway");

async fn charge(ctx: OrchestrationContext, cents: u64) -> Result<String, OrchestrationError> {
    let policy = RetryPolicy::new(5, Duration::from_millis(100))?.with_backoff_coefficient(2.0)?;
    let busy = |failure: &TaskFailure<GatewayError>| matches!(failure, TaskFailure::Activity(GatewayError::Busy));
    Ok(ctx.call(CALL_GATEWAY, &cents).with_retry(policy).only_if(busy).await?)
}

static CALLS: AtomicU32 = AtomicU32::new(0);

async fn call_gateway(_: ActivityContext, cents: u64) -> Result<String, GatewayError> {
    match CALLS.fetch_add(1, Ordering::SeqCst) {
        0 | 1 => Err(GatewayError::Busy),
        _ if cents > 10_000 => Err(GatewayError::Declined),
        n => Ok(format!("receipt-{n}")),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let store = keel::store::open(keel::store::DEFAULT_STORE_URL).await?;
    let worker =
        keel::Worker::builder(store).orchestration(CHARGE, charge).activity(CALL_GATEWAY, call_gateway).build().start();
    let instance = worker.client().start(CHARGE, &1_500).await?;
    println!("{:?}", instance.wait(Duration::from_secs(30)).await?); // Completed("receipt-2") after two retries
    worker.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
