//! The order workflow of the README: four activities in sequence, on the embedded
//! SQLite task hub `keel.db` in the working directory.
//!
//! `cargo run --release -p keel --example place_order`

use std::time::Duration;

use keel::{ActivityContext, ActivityError, OrchestrationContext, OrchestrationError, Worker};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    order_id: String,
    customer: String,
    items: Vec<Item>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Item {
    sku: String,
    quantity: u32,
}

/// The orchestrator: deterministic code, replayed from its history after a restart.
async fn place_order(ctx: OrchestrationContext) -> Result<String, OrchestrationError> {
    let order: Order = ctx.input()?;
    ctx.call_activity::<bool>("CheckAndReserveInventory", &order).await?;
    ctx.call_activity::<String>("ProcessPayment", &order).await?;
    let tracking: String = ctx.call_activity("ScheduleShipping", &order).await?;
    ctx.call_activity::<()>("EmailCustomer", &tracking).await?;
    Ok(tracking)
}

async fn check_and_reserve_inventory(_ctx: ActivityContext, order: Order) -> Result<bool, ActivityError> {
    Ok(order.items.iter().all(|item| item.quantity > 0))
}

async fn process_payment(_ctx: ActivityContext, order: Order) -> Result<String, ActivityError> {
    Ok(format!("payment-{}", order.order_id))
}

async fn schedule_shipping(_ctx: ActivityContext, order: Order) -> Result<String, ActivityError> {
    Ok(format!("TRACK-{}", order.order_id.to_uppercase()))
}

async fn email_customer(ctx: ActivityContext, tracking: String) -> Result<(), ActivityError> {
    println!("[{}] emailing tracking number {tracking}", ctx.instance_id);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let store = keel::store::open(keel::store::DEFAULT_STORE_URL).await?;
    let worker = Worker::builder(store)
        .orchestrator("PlaceOrder", place_order)
        .activity("CheckAndReserveInventory", check_and_reserve_inventory)
        .activity("ProcessPayment", process_payment)
        .activity("ScheduleShipping", schedule_shipping)
        .activity("EmailCustomer", email_customer)
        .build()
        .start();
    let client = worker.client();

    let order = Order {
        order_id: "o-1".into(),
        customer: "ada@example.com".into(),
        items: vec![Item { sku: "A1".into(), quantity: 2 }],
    };
    let instance_id = client.start_new("PlaceOrder", &order).await?;
    println!("started PlaceOrder as instance {instance_id}");
    let done = client.wait_for_completion(&instance_id, Duration::from_secs(30)).await?;
    println!("{}: {} with output {}", instance_id, done.status, done.output.unwrap_or_default());
    worker.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
