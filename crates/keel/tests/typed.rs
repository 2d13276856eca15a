//! The typed API end to end: handles, typed failures, the typed client, and
//! `keel::testing` (scripted runs and replays of exported histories).

mod common;

use std::time::Duration;

use common::{temp_store, worker, WAIT};
use keel::testing::{replay_export, HistoryExport, OrchestrationTest};
use keel::{
    Activity, ActivityContext, Never, Orchestration, OrchestrationContext, OrchestrationError, Outcome, RuntimeStatus,
    TaskFailure,
};
use keel_samples::human_interaction::{self, ApprovalRequest, APPROVAL, APPROVAL_WORKFLOW, ESCALATE, REQUEST_APPROVAL};
use keel_samples::place_order::{
    self, Order, OrderItem, PaymentError, CHECK_AND_RESERVE_INVENTORY, PLACE_ORDER, PROCESS_PAYMENT, RELEASE_INVENTORY,
};

fn order(customer: &str) -> Order {
    Order {
        order_id: "o-1".into(),
        customer: Some(customer.into()),
        items: vec![OrderItem { sku: "A1".into(), quantity: 1 }],
    }
}

#[test]
fn a_declined_payment_is_compensated_without_a_store() {
    let mut test = OrchestrationTest::start(PLACE_ORDER, place_order::place_order, &order("declined@example.com"));
    assert_eq!(test.scheduled(), ["CheckAndReserveInventory"]);
    test.complete(CHECK_AND_RESERVE_INVENTORY, &true);
    assert_eq!(test.scheduled(), ["ProcessPayment"]);
    test.fail(PROCESS_PAYMENT, &PaymentError::Declined { customer: "declined@example.com".into() });
    assert_eq!(test.scheduled(), ["ReleaseInventory"], "the reservation is released");
    test.complete(RELEASE_INVENTORY, &());
    let Some(Outcome::Failed(failure)) = test.outcome() else { panic!("{:?}", test.outcome()) };
    assert_eq!(failure.error_type, "PaymentDeclined");
    assert_eq!(failure.error_message, "the card of declined@example.com was declined");
}

#[test]
fn nothing_ships_when_nothing_was_reserved() {
    let mut test = OrchestrationTest::start(PLACE_ORDER, place_order::place_order, &order("ada@example.com"));
    test.complete(CHECK_AND_RESERVE_INVENTORY, &false);
    let Some(Outcome::Failed(failure)) = test.outcome() else { panic!("{:?}", test.outcome()) };
    assert_eq!(failure.error_type, "OutOfStock");
    assert!(test.scheduled().is_empty(), "no payment, no shipping");
}

#[test]
fn an_approval_that_never_comes_is_escalated() {
    let request = ApprovalRequest { request: "laptop".into(), approver: None, timeout_seconds: Some(60.0) };
    let mut test = OrchestrationTest::start(APPROVAL_WORKFLOW, human_interaction::approval_workflow, &request);
    test.complete(REQUEST_APPROVAL, &());
    test.advance(Duration::from_secs(59));
    assert!(test.scheduled().is_empty(), "still waiting");
    test.advance(Duration::from_secs(1));
    test.complete(ESCALATE, &());
    assert_eq!(test.outcome(), Some(Outcome::Completed("Escalated".to_string())));

    let mut answered = OrchestrationTest::start(APPROVAL_WORKFLOW, human_interaction::approval_workflow, &request);
    answered.complete(REQUEST_APPROVAL, &());
    answered.raise(APPROVAL, &false);
    assert_eq!(answered.outcome(), Some(Outcome::Completed("Rejected".to_string())));
}

const SUM: Orchestration<Vec<u32>, u32> = Orchestration::new("Sum");
const SQUARE: Activity<u32, u32, Never> = Activity::new("Square");
const CUBE: Activity<u32, u32, Never> = Activity::new("Cube");

async fn sum_of_squares(ctx: OrchestrationContext, numbers: Vec<u32>) -> Result<u32, OrchestrationError> {
    let squares = ctx.try_when_all(numbers.iter().map(|n| ctx.call(SQUARE, n))).await?;
    Ok(squares.into_iter().sum())
}

async fn sum_of_cubes(ctx: OrchestrationContext, numbers: Vec<u32>) -> Result<u32, OrchestrationError> {
    let cubes = ctx.try_when_all(numbers.iter().map(|n| ctx.call(CUBE, n))).await?;
    Ok(cubes.into_iter().sum())
}

#[tokio::test]
async fn the_typed_client_starts_waits_and_raises_and_exported_histories_replay() {
    let (store, _dir) = temp_store().await;
    let worker = human_interaction::register(place_order::register(worker(&store)))
        .orchestration(SUM, sum_of_squares)
        .activity(SQUARE, |_: ActivityContext, n: u32| async move { Ok(n * n) })
        .build()
        .start();
    let client = worker.client();

    let sum = client.start(SUM, &vec![1, 2, 3]).await.unwrap();
    assert_eq!(sum.wait(WAIT).await.unwrap(), Outcome::Completed(14));
    let status = sum.status().await.unwrap();
    assert_eq!((status.runtime_status, status.name.as_str()), (RuntimeStatus::Completed, "Sum"));

    let declined = client.start(PLACE_ORDER, &order("declined@example.com")).await.unwrap();
    let Outcome::Failed(failure) = declined.wait(WAIT).await.unwrap() else { panic!("the order fails") };
    assert_eq!(failure.error_type, "PaymentDeclined");

    let request = ApprovalRequest { request: "laptop".into(), approver: None, timeout_seconds: None };
    let approval = client.start(APPROVAL_WORKFLOW, &request).await.unwrap();
    client.raise(approval.id(), APPROVAL, &true).await.unwrap();
    assert_eq!(approval.wait(WAIT).await.unwrap(), Outcome::Completed("Approved".to_string()));

    // A timeout too long for the clock waits without a deadline instead of panicking.
    let again = client.start(SUM, &vec![2]).await.unwrap();
    assert_eq!(again.wait(Duration::MAX).await.unwrap(), Outcome::Completed(4));

    // The history as `keel history --json` exports it replays against the same code,
    // and names the first divergence against changed code.
    let record = client.get_status(sum.id()).await.unwrap().unwrap();
    let export = HistoryExport {
        instance_id: record.instance_id.clone(),
        name: record.name.clone(),
        version: record.version.clone(),
        execution_id: record.execution_id.clone(),
        runtime_status: record.status,
        events: client.get_history(sum.id()).await.unwrap(),
    };
    let json = serde_json::to_string(&export).unwrap();
    let export: HistoryExport = serde_json::from_str(&json).unwrap();
    let replayed = replay_export(SUM, sum_of_squares, &export).expect("the same code replays cleanly");
    assert!(replayed.new_actions.is_empty());
    let divergence = replay_export(SUM, sum_of_cubes, &export).unwrap_err();
    assert!(divergence.message.contains("at sequence number 0, history has TaskScheduled \"Square\""), "{divergence}");
    assert!(divergence.message.contains("TaskScheduled \"Cube\""), "{divergence}");
    worker.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn typed_failures_travel_through_a_real_task_hub() {
    const CHARGE: Orchestration<bool, String> = Orchestration::new("Charge");
    async fn charge(ctx: OrchestrationContext, decline: bool) -> Result<String, OrchestrationError> {
        let order = Order { order_id: "x".into(), customer: decline.then(|| "declined@x".to_string()), items: vec![] };
        Ok(match ctx.call(PROCESS_PAYMENT, &order).await {
            Ok(payment) => payment,
            Err(TaskFailure::Activity(PaymentError::Declined { customer })) => format!("declined for {customer}"),
            Err(TaskFailure::Other(other)) => format!("other: {other}"),
        })
    }
    let (store, _dir) = temp_store().await;
    let worker = place_order::register(worker(&store)).orchestration(CHARGE, charge).build().start();
    let client = worker.client();
    let declined = client.start(CHARGE, &true).await.unwrap();
    assert_eq!(declined.wait(WAIT).await.unwrap(), Outcome::Completed("declined for declined@x".to_string()));
    let history = client.get_history(declined.id()).await.unwrap();
    let failure = history
        .iter()
        .find_map(|event| match &event.kind {
            keel::EventKind::TaskFailed { failure, .. } => Some(failure.clone()),
            _ => None,
        })
        .expect("the payment failed");
    assert_eq!(failure.error_type, std::any::type_name::<PaymentError>(), "the full type path is recorded");
    let paid = client.start(CHARGE, &false).await.unwrap();
    assert_eq!(paid.wait(WAIT).await.unwrap(), Outcome::Completed("PAY-X".to_string()));
    worker.shutdown(Duration::from_secs(5)).await;
}

#[test]
fn a_timer_past_the_end_of_time_is_bad_input_not_a_panic() {
    use keel_samples::monitor::{self, Location, MonitorRequest, GET_IS_CLEAR, WEATHER_MONITOR};
    let request = MonitorRequest {
        location: Some(Location { state: "WA".into(), city: "Seattle".into() }),
        phone: Some("+1-555-0100".into()),
        polling_interval_seconds: Some(u64::MAX),
        expiry_seconds: Some(u64::MAX),
    };
    let mut test = OrchestrationTest::start(WEATHER_MONITOR, monitor::weather_monitor, &Some(request));
    test.complete(GET_IS_CLEAR, &false);
    let Some(Outcome::Failed(failure)) = test.outcome() else { panic!("{:?}", test.outcome()) };
    assert_eq!(failure.error_type, keel_core::context::INVALID_TIMER_ERROR_TYPE, "{failure:?}");
}
