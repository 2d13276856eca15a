//! `PlaceOrder`: reserve stock, take the payment, schedule shipping, email the
//! customer; the output is the tracking number. A declined payment (a typed
//! [`PaymentError`]) is compensated: the reservation is released and the order fails
//! with error type `PaymentDeclined`.
//!
//! Input: `{"orderId":"o-1","customer":"ada@example.com","items":[{"sku":"A1","quantity":2}]}`
//! (`customer` is optional: without it nobody is emailed). The payment service double
//! declines customers whose address starts with `declined`.

use keel::{
    Activity, ActivityContext, Never, Orchestration, OrchestrationContext, OrchestrationError, TaskFailure,
    WorkerBuilder,
};
use serde::{Deserialize, Serialize};

pub const PLACE_ORDER: Orchestration<Order, String> = Orchestration::new("PlaceOrder");
pub const CHECK_AND_RESERVE_INVENTORY: Activity<Order, bool, Never> = Activity::new("CheckAndReserveInventory");
pub const PROCESS_PAYMENT: Activity<Order, String, PaymentError> = Activity::new("ProcessPayment");
pub const RELEASE_INVENTORY: Activity<Order, (), Never> = Activity::new("ReleaseInventory");
pub const SCHEDULE_SHIPPING: Activity<Order, String, Never> = Activity::new("ScheduleShipping");
pub const EMAIL_CUSTOMER: Activity<ShippingNotice, (), Never> = Activity::new("EmailCustomer");

/// Why a payment was not taken.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum PaymentError {
    #[error("the card of {customer} was declined")]
    Declined { customer: String },
}

keel::impl_failure!(PaymentError);

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
        .orchestration(PLACE_ORDER, place_order)
        .activity(CHECK_AND_RESERVE_INVENTORY, check_and_reserve_inventory)
        .activity(PROCESS_PAYMENT, process_payment)
        .activity(RELEASE_INVENTORY, release_inventory)
        .activity(SCHEDULE_SHIPPING, schedule_shipping)
        .activity(EMAIL_CUSTOMER, email_customer)
}

/// The orchestrator.
pub async fn place_order(ctx: OrchestrationContext, order: Order) -> Result<String, OrchestrationError> {
    if order.items.is_empty() {
        return Err(OrchestrationError::new("InvalidOrder", format!("order '{}' has no items", order.order_id)));
    }
    ctx.set_custom_status(&"reserving inventory");
    if !ctx.call(CHECK_AND_RESERVE_INVENTORY, &order).await? {
        return Err(OrchestrationError::new(
            "OutOfStock",
            format!("order '{}' cannot be served from stock", order.order_id),
        ));
    }
    ctx.set_custom_status(&"processing payment");
    match ctx.call(PROCESS_PAYMENT, &order).await {
        Ok(_payment_id) => {}
        Err(TaskFailure::Activity(declined @ PaymentError::Declined { .. })) => {
            ctx.log(tracing::Level::WARN, format!("{declined}; releasing the reservation"));
            ctx.set_custom_status(&"payment failed; reservation released");
            ctx.call(RELEASE_INVENTORY, &order).await?;
            return Err(OrchestrationError::new("PaymentDeclined", declined.to_string()));
        }
        Err(other) => return Err(other.into()),
    }
    ctx.set_custom_status(&"shipping");
    let tracking_number = ctx.call(SCHEDULE_SHIPPING, &order).await?;
    if let Some(customer) = order.customer.clone() {
        let notice = ShippingNotice { customer, tracking_number: tracking_number.clone() };
        ctx.call(EMAIL_CUSTOMER, &notice).await?;
    }
    ctx.set_custom_status(&"shipped");
    Ok(tracking_number)
}

async fn check_and_reserve_inventory(ctx: ActivityContext, order: Order) -> Result<bool, Never> {
    let available = order.items.iter().all(|item| item.quantity > 0 && item.quantity <= 100);
    tracing::info!(instance_id = %ctx.instance_id, function = %ctx.name, order_id = %order.order_id, available, "inventory checked");
    Ok(available)
}

async fn process_payment(ctx: ActivityContext, order: Order) -> Result<String, PaymentError> {
    if let Some(customer) = order.customer.as_deref().filter(|customer| customer.starts_with("declined")) {
        tracing::info!(instance_id = %ctx.instance_id, function = %ctx.name, order_id = %order.order_id, "payment declined");
        return Err(PaymentError::Declined { customer: customer.to_string() });
    }
    tracing::info!(instance_id = %ctx.instance_id, function = %ctx.name, order_id = %order.order_id, "payment taken");
    Ok(format!("PAY-{}", order.order_id.to_uppercase()))
}

async fn release_inventory(ctx: ActivityContext, order: Order) -> Result<(), Never> {
    tracing::info!(instance_id = %ctx.instance_id, function = %ctx.name, order_id = %order.order_id, "reservation released");
    Ok(())
}

async fn schedule_shipping(ctx: ActivityContext, order: Order) -> Result<String, Never> {
    let tracking_number = format!("TRACK-{}", order.order_id.to_uppercase());
    tracing::info!(instance_id = %ctx.instance_id, function = %ctx.name, %tracking_number, "shipping scheduled");
    Ok(tracking_number)
}

async fn email_customer(ctx: ActivityContext, notice: ShippingNotice) -> Result<(), Never> {
    tracing::info!(
        instance_id = %ctx.instance_id,
        function = %ctx.name,
        customer = %notice.customer,
        tracking_number = %notice.tracking_number,
        "customer emailed"
    );
    Ok(())
}
