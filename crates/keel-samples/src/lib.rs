//! The sample function app that `keel serve` hosts: one module per Durable Functions
//! pattern, each with a `register` function that adds its orchestrator and activities
//! to a worker.
//!
//! | Orchestrator | Pattern | Module |
//! |---|---|---|
//! | `PlaceOrder` | function chaining with compensation | [`place_order`] |
//! | `HelloCities` | function chaining | [`hello_cities`] |
//! | `BackupSiteContent` | fan-out/fan-in | [`fan_out_fan_in`] |
//! | `BackupSites` | fan-out/fan-in over sub-orchestrations | [`fan_out_fan_in`] |
//! | `WeatherMonitor` | monitor (durable timers) | [`monitor`] |
//! | `ApprovalWorkflow` | human interaction (event vs timeout) | [`human_interaction`] |
//! | `BankTransfer` | critical section over two entities | [`bank_transfer`] |
//!
//! Entities: `Counter` ([`counter`]) and `Account` ([`bank_transfer`]).
//!
//! [`http_trigger`] adds an app route, `POST /api/orders/{orderId}`, that starts an
//! order and answers with its outcome or a check-status response.

pub mod bank_transfer;
pub mod counter;
pub mod fan_out_fan_in;
pub mod hello_cities;
pub mod http_trigger;
pub mod human_interaction;
pub mod monitor;
pub mod place_order;

use keel::WorkerBuilder;

/// Registers every sample orchestrator, activity and entity.
pub fn register(worker: WorkerBuilder) -> WorkerBuilder {
    let worker = place_order::register(worker);
    let worker = hello_cities::register(worker);
    let worker = fan_out_fan_in::register(worker);
    let worker = monitor::register(worker);
    let worker = counter::register(worker);
    let worker = bank_transfer::register(worker);
    human_interaction::register(worker)
}

/// The whole sample app: its functions and its HTTP routes.
pub fn app() -> keel_http::App {
    keel_http::App::new().functions(register).routes(http_trigger::routes())
}
