//! An app route next to the management API: `POST /api/orders/{orderId}` takes
//! `{"customer":…,"items":[…]}`, starts `PlaceOrder` under instance id
//! `order-{orderId}` and answers with the tracking number (200) when the order is done
//! within `timeout` seconds (default 10), else with a check-status response (202).
//! A second order with an id that is still running gets 409.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use keel::StartOptions;
use keel_http::{ApiError, DurableClient};
use serde::Deserialize;

use crate::place_order::{Order, OrderItem, PLACE_ORDER};

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The app route `POST /api/orders/{orderId}`.
pub fn routes() -> Router {
    Router::new().route("/api/orders/{order_id}", post(place_order))
}

#[derive(Deserialize)]
struct OrderBody {
    customer: Option<String>,
    items: Vec<OrderItem>,
}

#[derive(Deserialize)]
struct WaitQuery {
    timeout: Option<f64>,
}

async fn place_order(
    durable: DurableClient,
    Path(order_id): Path<String>,
    Query(query): Query<WaitQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: OrderBody = serde_json::from_slice(&body)
        .map_err(|error| ApiError::BadRequest(format!("the order is not valid: {error}")))?;
    let order = Order { order_id: order_id.clone(), customer: body.customer, items: body.items };
    let timeout = match query.timeout {
        Some(seconds) => Duration::try_from_secs_f64(seconds)
            .map_err(|_| ApiError::BadRequest("timeout must be a number of seconds".into()))?,
        None => DEFAULT_TIMEOUT,
    };
    // Everything is checked before the order is written.
    keel_http::check_wait(timeout, timeout.min(Duration::from_secs(1)))?;
    let options = StartOptions { instance_id: Some(format!("order-{order_id}")), ..StartOptions::default() };
    let instance = durable.client().start_with_options(PLACE_ORDER, &order, options).await?;
    tracing::info!(instance_id = %instance.id(), function = PLACE_ORDER.name(), "order placed over the app route");
    durable
        .wait_for_completion_or_create_check_status_response(
            instance.id(),
            timeout,
            timeout.min(Duration::from_secs(1)),
        )
        .await
}
