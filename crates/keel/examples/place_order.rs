//! The order workflow: reserve stock, take the payment, ship, email. A declined
//! payment — a typed failure the orchestrator matches on — is compensated by releasing
//! the reservation. On the embedded SQLite task hub `keel.db` in the working directory.
//!
//! `cargo run --release -p keel --example place_order`

use std::time::Duration;

use keel::{Activity, ActivityContext, Never, Orchestration, OrchestrationContext, OrchestrationError, Outcome};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Order {
    id: String,
    customer: String,
    quantity: u32,
}

#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
enum PaymentError {
    #[error("the card of {0} was declined")]
    Declined(String),
}
keel::impl_failure!(PaymentError);

const PLACE_ORDER: Orchestration<Order, String> = Orchestration::new("PlaceOrder");
const RESERVE: Activity<Order, bool, Never> = Activity::new("CheckAndReserveInventory");
const PAY: Activity<Order, String, PaymentError> = Activity::new("ProcessPayment");
const RELEASE: Activity<Order, (), Never> = Activity::new("ReleaseInventory");
const SHIP: Activity<Order, String, Never> = Activity::new("ScheduleShipping");
const EMAIL: Activity<String, (), Never> = Activity::new("EmailCustomer");

async fn place_order(ctx: OrchestrationContext, order: Order) -> Result<String, OrchestrationError> {
    if !ctx.call(RESERVE, &order).await? {
        return Err(OrchestrationError::new("OutOfStock", format!("order {} cannot be served", order.id)));
    }
    if let Err(failure) = ctx.call(PAY, &order).await {
        ctx.call(RELEASE, &order).await?; // compensate, then fail with the payment's failure
        return Err(failure.into());
    }
    let tracking = ctx.call(SHIP, &order).await?;
    ctx.call(EMAIL, &tracking).await?;
    Ok(tracking)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let store = keel::store::open(keel::store::DEFAULT_STORE_URL).await?;
    let worker = keel::Worker::builder(store)
        .orchestration(PLACE_ORDER, place_order)
        .activity(RESERVE, |_: ActivityContext, order: Order| async move { Ok(order.quantity <= 100) })
        .activity(PAY, |_: ActivityContext, order: Order| async move {
            match order.customer.starts_with("declined") {
                true => Err(PaymentError::Declined(order.customer)),
                false => Ok(format!("PAY-{}", order.id)),
            }
        })
        .activity(RELEASE, |_: ActivityContext, _: Order| async { Ok(()) })
        .activity(SHIP, |_: ActivityContext, order: Order| async move { Ok(format!("TRACK-{}", order.id)) })
        .activity(EMAIL, |ctx: ActivityContext, tracking: String| async move {
            println!("[{}] emailing tracking number {tracking}", ctx.instance_id);
            Ok(())
        })
        .build()
        .start();
    for customer in ["ada@example.com", "declined@example.com"] {
        let order = Order { id: format!("o-{}", &customer[..3]), customer: customer.into(), quantity: 2 };
        let instance = worker.client().start(PLACE_ORDER, &order).await?;
        match instance.wait(Duration::from_secs(30)).await? {
            Outcome::Completed(tracking) => println!("{}: shipped as {tracking}", order.id),
            Outcome::Failed(failure) => println!("{}: failed: {}", order.id, failure.error_message),
            other => println!("{}: {other:?}", order.id),
        }
    }
    worker.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
