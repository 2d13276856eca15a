//! `PlaceOrder`: reserve stock, take the payment, schedule shipping, email the
//! customer; the output is the tracking number. A declined payment is compensated:
//! the reservation is released and the order fails with the payment's error.
//!
//! Input: `{"orderId":"o-1","customer":"ada@example.com","items":[{"sku":"A1","quantity":2}]}`
//! (`customer` is optional: without it nobody is emailed). The payment service double
//! declines customers whose address starts with `declined`.

use keel::{ActivityContext, ActivityError, OrchestrationContext, OrchestrationError, WorkerBuilder};
use serde::{Deserialize, Serialize};

/// An order as the orchestration takes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    pub order_id: String,
    /// The customer's email address; without one nobody is emailed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    pub items: Vec<OrderItem>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderItem {
    pub sku: String,
    pub quantity: u32,
}

/// What the customer is emailed.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShippingNotice {
    pub customer: String,
    pub tracking_number: String,
}

/// Registers `PlaceOrder` and its activities.
pub fn register(worker: WorkerBuilder) -> WorkerBuilder {
    worker
        .orchestrator("PlaceOrder", place_order)
        .activity("CheckAndReserveInventory", check_and_reserve_inventory)
        .activity("ProcessPayment", process_payment)
        .activity("ReleaseInventory", release_inventory)
        .activity("ScheduleShipping", schedule_shipping)
        .activity("EmailCustomer", email_customer)
}

/// The orchestrator.
pub async fn place_order(ctx: OrchestrationContext) -> Result<String, OrchestrationError> {
    let order: Order = ctx.input()?;
    if order.items.is_empty() {
        return Err(OrchestrationError::new("InvalidOrder", format!("order '{}' has no items", order.order_id)));
    }
    ctx.set_custom_status(&"reserving inventory");
    let reserved: bool = ctx.call_activity("CheckAndReserveInventory", &order).await?;
    if !reserved {
        return Err(OrchestrationError::new(
            "OutOfStock",
            format!("order '{}' cannot be served from stock", order.order_id),
        ));
    }
    ctx.set_custom_status(&"processing payment");
    if let Err(payment_failure) = ctx.call_activity::<String>("ProcessPayment", &order).await {
        ctx.log(tracing::Level::WARN, format!("payment failed ({payment_failure}); releasing the reservation"));
        ctx.set_custom_status(&"payment failed; reservation released");
        ctx.call_activity::<()>("ReleaseInventory", &order).await?;
        return Err(payment_failure.into());
    }
    ctx.set_custom_status(&"shipping");
    let tracking_number: String = ctx.call_activity("ScheduleShipping", &order).await?;
    if let Some(customer) = order.customer.clone() {
        let notice = ShippingNotice { customer, tracking_number: tracking_number.clone() };
        ctx.call_activity::<()>("EmailCustomer", &notice).await?;
    }
    ctx.set_custom_status(&"shipped");
    Ok(tracking_number)
}

async fn check_and_reserve_inventory(ctx: ActivityContext, order: Order) -> Result<bool, ActivityError> {
    let available = order.items.iter().all(|item| item.quantity > 0 && item.quantity <= 100);
    tracing::info!(instance_id = %ctx.instance_id, function = %ctx.name, order_id = %order.order_id, available, "inventory checked");
    Ok(available)
}

async fn process_payment(ctx: ActivityContext, order: Order) -> Result<String, ActivityError> {
    if let Some(customer) = order.customer.as_deref().filter(|customer| customer.starts_with("declined")) {
        tracing::info!(instance_id = %ctx.instance_id, function = %ctx.name, order_id = %order.order_id, "payment declined");
        return Err(ActivityError::new("PaymentDeclined", format!("the card of {customer} was declined")));
    }
    tracing::info!(instance_id = %ctx.instance_id, function = %ctx.name, order_id = %order.order_id, "payment taken");
    Ok(format!("PAY-{}", order.order_id.to_uppercase()))
}

async fn release_inventory(ctx: ActivityContext, order: Order) -> Result<(), ActivityError> {
    tracing::info!(instance_id = %ctx.instance_id, function = %ctx.name, order_id = %order.order_id, "reservation released");
    Ok(())
}

async fn schedule_shipping(ctx: ActivityContext, order: Order) -> Result<String, ActivityError> {
    let tracking_number = format!("TRACK-{}", order.order_id.to_uppercase());
    tracing::info!(instance_id = %ctx.instance_id, function = %ctx.name, %tracking_number, "shipping scheduled");
    Ok(tracking_number)
}

async fn email_customer(ctx: ActivityContext, notice: ShippingNotice) -> Result<(), ActivityError> {
    tracing::info!(
        instance_id = %ctx.instance_id,
        function = %ctx.name,
        customer = %notice.customer,
        tracking_number = %notice.tracking_number,
        "customer emailed"
    );
    Ok(())
}
