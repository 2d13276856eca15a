//! The Durable Functions patterns, end to end on a real SQLite task hub: chaining,
//! fan-out/fan-in, human interaction, monitor, sub-orchestrations, retries,
//! compensation, suspend/resume/terminate, scheduled start, and the error paths.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{temp_store, wait_for_history, wait_for_state, worker, WAIT};
use keel::{
    Activity, ActivityContext, ActivityError, ClientError, Event, EventKind, InstanceQuery, Never, Orchestration,
    OrchestrationContext, OrchestrationError, PurgeFilter, RetryPolicy, RuntimeStatus, StartOptions,
};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Item {
    sku: String,
    quantity: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Order {
    order_id: String,
    customer: String,
    items: Vec<Item>,
}

const PLACE_ORDER: Orchestration<Order, String> = Orchestration::new("PlaceOrder");
const CHECK_AND_RESERVE_INVENTORY: Activity<Order, bool, Never> = Activity::new("CheckAndReserveInventory");
/// Fails untyped, with error type `PaymentDeclined`.
const PROCESS_PAYMENT: Activity<Order, String> = Activity::new("ProcessPayment");
const RELEASE_INVENTORY: Activity<Order, (), Never> = Activity::new("ReleaseInventory");
const SCHEDULE_SHIPPING: Activity<Order, String, Never> = Activity::new("ScheduleShipping");
const EMAIL_CUSTOMER: Activity<String, (), Never> = Activity::new("EmailCustomer");

async fn place_order(ctx: OrchestrationContext, order: Order) -> Result<String, OrchestrationError> {
    ctx.call(CHECK_AND_RESERVE_INVENTORY, &order).await?;
    if let Err(payment_failure) = ctx.call(PROCESS_PAYMENT, &order).await {
        // Compensate: give the reserved stock back, then fail with the payment's reason.
        ctx.call(RELEASE_INVENTORY, &order).await?;
        return Err(payment_failure.into());
    }
    let tracking = ctx.call(SCHEDULE_SHIPPING, &order).await?;
    ctx.call(EMAIL_CUSTOMER, &tracking).await?;
    Ok(tracking)
}

fn order(order_id: &str) -> Order {
    Order {
        order_id: order_id.into(),
        customer: "ada@example.com".into(),
        items: vec![Item { sku: "A1".into(), quantity: 2 }],
    }
}

fn order_worker(store: &Arc<dyn keel_store::Store>, released: Arc<AtomicU32>) -> keel::WorkerBuilder {
    worker(store)
        .orchestration(PLACE_ORDER, place_order)
        .activity(CHECK_AND_RESERVE_INVENTORY, |_ctx: ActivityContext, order: Order| async move {
            Ok::<_, Never>(!order.items.is_empty())
        })
        .activity(PROCESS_PAYMENT, |_ctx: ActivityContext, order: Order| async move {
            if order.customer.starts_with("broke") {
                return Err(ActivityError::new("PaymentDeclined", format!("card declined for {}", order.order_id)));
            }
            Ok(format!("pay-{}", order.order_id))
        })
        .activity(RELEASE_INVENTORY, move |_ctx: ActivityContext, _order: Order| {
            let released = released.clone();
            async move {
                released.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Never>(())
            }
        })
        .activity(SCHEDULE_SHIPPING, |_ctx: ActivityContext, order: Order| async move {
            Ok::<_, Never>(format!("TRACK-{}", order.order_id))
        })
        .activity(EMAIL_CUSTOMER, |_ctx: ActivityContext, _tracking: String| async move { Ok::<_, Never>(()) })
}

#[tokio::test]
async fn the_order_workflow_runs_its_activities_in_sequence() {
    let (store, _dir) = temp_store().await;
    let worker = order_worker(&store, Arc::default()).build().start();
    let client = worker.client();
    let id = client.start(PLACE_ORDER, &order("o-1")).await.unwrap().id().to_string();
    let done = client.wait_for_completion(&id, WAIT).await.unwrap();
    assert_eq!(done.status, RuntimeStatus::Completed, "{done:?}");
    assert_eq!(done.output.as_deref(), Some("\"TRACK-o-1\""));

    let history = client.get_history(&id).await.unwrap();
    let scheduled: Vec<&str> = history
        .iter()
        .filter_map(|event| match &event.kind {
            EventKind::TaskScheduled { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(scheduled, ["CheckAndReserveInventory", "ProcessPayment", "ScheduleShipping", "EmailCustomer"]);
    assert!(matches!(
        history.last().unwrap().kind,
        EventKind::ExecutionCompleted { status: RuntimeStatus::Completed, .. }
    ));
    worker.shutdown(WAIT).await;
}

#[tokio::test]
async fn a_failed_payment_is_compensated_and_fails_the_order_with_its_details() {
    let (store, _dir) = temp_store().await;
    let released = Arc::new(AtomicU32::new(0));
    let worker = order_worker(&store, released.clone()).build().start();
    let client = worker.client();
    let mut broke = order("o-2");
    broke.customer = "broke@example.com".into();
    let id = client.start(PLACE_ORDER, &broke).await.unwrap().id().to_string();
    let done = client.wait_for_completion(&id, WAIT).await.unwrap();
    assert_eq!(done.status, RuntimeStatus::Failed);
    let failure = done.failure.expect("failure details");
    assert_eq!(failure.error_type, "PaymentDeclined");
    assert_eq!(failure.error_message, "card declined for o-2");
    assert_eq!(released.load(Ordering::SeqCst), 1, "the reservation was released once");
    worker.shutdown(WAIT).await;
}

#[tokio::test]
async fn fan_out_to_a_thousand_activities_and_fan_in() {
    const FAN_OUT: Orchestration<u64, u64> = Orchestration::new("FanOut");
    const SQUARE: Activity<u64, u64, Never> = Activity::new("Square");
    let (store, _dir) = temp_store().await;
    let worker = worker(&store)
        .orchestration(FAN_OUT, |ctx: OrchestrationContext, n: u64| async move {
            let results = ctx.when_all((0..n).map(|i| ctx.call(SQUARE, &i))).await;
            let mut total = 0;
            for result in results {
                total += result?;
            }
            Ok(total)
        })
        .activity(SQUARE, |_ctx: ActivityContext, i: u64| async move { Ok::<_, Never>(i * i) })
        .build()
        .start();
    let client = worker.client();
    let id = client.start(FAN_OUT, &1000).await.unwrap().id().to_string();
    let done = client.wait_for_completion(&id, WAIT).await.unwrap();
    assert_eq!(done.status, RuntimeStatus::Completed, "{done:?}");
    let expected: u64 = (0..1000u64).map(|i| i * i).sum();
    assert_eq!(done.output_as::<u64>().unwrap(), expected);
    let history = client.get_history(&id).await.unwrap();
    let completed = history.iter().filter(|event| matches!(event.kind, EventKind::TaskCompleted { .. })).count();
    assert_eq!(completed, 1000);
    worker.shutdown(WAIT).await;
}

/// Takes the timeout in milliseconds.
const APPROVAL_WORKFLOW: Orchestration<u64, String> = Orchestration::new("Approval");
const APPROVAL: Event<bool> = Event::new("Approval");
const ESCALATE: Activity<(), String, Never> = Activity::new("Escalate");
/// A go-ahead without data.
const GO: Event<()> = Event::new("Go");

async fn approval(ctx: OrchestrationContext, timeout_ms: u64) -> Result<String, OrchestrationError> {
    match ctx.wait(APPROVAL).timeout(Duration::from_millis(timeout_ms)).await? {
        Some(true) => Ok("approved".into()),
        Some(false) => Ok("rejected".into()),
        None => Ok(ctx.call(ESCALATE, &()).await?),
    }
}

fn approval_worker(store: &Arc<dyn keel_store::Store>) -> keel::WorkerHandle {
    worker(store)
        .orchestration(APPROVAL_WORKFLOW, approval)
        .activity(ESCALATE, |_ctx: ActivityContext, ()| async { Ok::<_, Never>("escalated".to_string()) })
        .build()
        .start()
}

#[tokio::test]
async fn human_interaction_approval_arrives_before_the_deadline() {
    let (store, _dir) = temp_store().await;
    let worker = approval_worker(&store);
    let client = worker.client();
    let id = client.start(APPROVAL_WORKFLOW, &60_000).await.unwrap().id().to_string();
    client.wait_for_start(&id, WAIT).await.unwrap();
    // Case-insensitive event names.
    client.raise_event(&id, "approval", &true).await.unwrap();
    let done = client.wait_for_completion(&id, WAIT).await.unwrap();
    assert_eq!(done.output.as_deref(), Some("\"approved\""));
    worker.shutdown(WAIT).await;
}

#[tokio::test]
async fn human_interaction_times_out_and_escalates() {
    let (store, _dir) = temp_store().await;
    let worker = approval_worker(&store);
    let client = worker.client();
    let id = client.start(APPROVAL_WORKFLOW, &300).await.unwrap().id().to_string();
    let done = client.wait_for_completion(&id, WAIT).await.unwrap();
    assert_eq!(done.output.as_deref(), Some("\"escalated\""));
    let history = client.get_history(&id).await.unwrap();
    assert!(history.iter().any(|event| matches!(event.kind, EventKind::TimerFired { .. })));
    // An event for the finished instance is refused and changes nothing.
    let late = client.raise(&id, APPROVAL, &true).await.unwrap_err();
    assert!(matches!(late, ClientError::InvalidState { status: RuntimeStatus::Completed, .. }), "{late:?}");
    assert_eq!(client.get_history(&id).await.unwrap().len(), history.len());
    worker.shutdown(WAIT).await;
}

#[tokio::test]
async fn events_raised_before_the_wait_are_buffered() {
    const COLLECT: Orchestration<(), Vec<String>> = Orchestration::new("Collect");
    const ITEM: Event<String> = Event::new("Item");
    let (store, _dir) = temp_store().await;
    let worker = worker(&store)
        .orchestration(COLLECT, |ctx: OrchestrationContext, (): ()| async move {
            ctx.wait(GO).await?;
            let a = ctx.wait(ITEM).await?;
            let b = ctx.wait(ITEM).await?;
            Ok(vec![a, b])
        })
        .build()
        .start();
    let client = worker.client();
    let id = client.start(COLLECT, &()).await.unwrap().id().to_string();
    client.raise(&id, ITEM, &"first".to_string()).await.unwrap();
    client.raise(&id, ITEM, &"second".to_string()).await.unwrap();
    client.raise(&id, GO, &()).await.unwrap();
    let done = client.wait_for_completion(&id, WAIT).await.unwrap();
    assert_eq!(done.output.as_deref(), Some("[\"first\",\"second\"]"));
    worker.shutdown(WAIT).await;
}

#[tokio::test]
async fn a_monitor_loops_on_timers_and_continues_as_new() {
    const MONITOR: Orchestration<u32, String> = Orchestration::new("Monitor");
    const IS_CLEAR: Activity<u32, bool, Never> = Activity::new("IsClear");
    let (store, _dir) = temp_store().await;
    let checks = Arc::new(AtomicU32::new(0));
    let counted = checks.clone();
    let worker = worker(&store)
        .orchestration(MONITOR, |ctx: OrchestrationContext, round: u32| async move {
            let clear = ctx.call(IS_CLEAR, &round).await?;
            if clear {
                return Ok(format!("clear after {round} rounds"));
            }
            ctx.sleep(Duration::from_millis(50)).await;
            ctx.continue_as_new(&(round + 1))
        })
        .activity(IS_CLEAR, move |_ctx: ActivityContext, round: u32| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, Never>(round >= 4) }
        })
        .build()
        .start();
    let client = worker.client();
    let id = client.start(MONITOR, &0).await.unwrap().id().to_string();
    let first_execution = client.get_status(&id).await.unwrap().unwrap().execution_id;
    let done = client.wait_for_completion(&id, WAIT).await.unwrap();
    assert_eq!(done.output.as_deref(), Some("\"clear after 4 rounds\""));
    assert_eq!(checks.load(Ordering::SeqCst), 5);
    assert_ne!(done.execution_id, first_execution, "each round is a new execution");
    assert_eq!(done.input.as_deref(), Some("4"));
    // The history holds the last execution only.
    let history = client.get_history(&id).await.unwrap();
    let scheduled = history.iter().filter(|event| matches!(event.kind, EventKind::TaskScheduled { .. })).count();
    assert_eq!(scheduled, 1);
    worker.shutdown(WAIT).await;
}

#[tokio::test]
async fn sub_orchestrations_report_results_and_failures_to_their_parent() {
    const PARENT: Orchestration<(), (u32, String)> = Orchestration::new("Parent");
    const CHILD: Orchestration<u32, u32> = Orchestration::new("Child");
    const DOUBLE: Activity<u32, u32, Never> = Activity::new("Double");
    let (store, _dir) = temp_store().await;
    let worker = worker(&store)
        .orchestration(PARENT, |ctx: OrchestrationContext, (): ()| async move {
            let children = (1..=3).map(|n| ctx.call(CHILD, &n));
            let mut sum = 0;
            for result in ctx.when_all(children).await {
                sum += result?;
            }
            let named = ctx.call_with_instance_id(CHILD, "named-child", &10).await?;
            let failure = ctx.call(CHILD, &0).await.unwrap_err();
            Ok((sum + named, failure.details().error_type))
        })
        .orchestration(CHILD, |ctx: OrchestrationContext, n: u32| async move {
            if n == 0 {
                return Err(OrchestrationError::new("ZeroInput", "children need a positive input"));
            }
            Ok(ctx.call(DOUBLE, &n).await?)
        })
        .activity(DOUBLE, |_ctx: ActivityContext, n: u32| async move { Ok::<_, Never>(n * 2) })
        .build()
        .start();
    let client = worker.client();
    let id = client.start(PARENT, &()).await.unwrap().id().to_string();
    let done = client.wait_for_completion(&id, WAIT).await.unwrap();
    assert_eq!(done.output.as_deref(), Some("[32,\"ZeroInput\"]"), "{done:?}");
    let child = client.get_status("named-child").await.unwrap().expect("the named child exists");
    assert_eq!(child.status, RuntimeStatus::Completed);
    assert_eq!(child.parent.expect("a parent").instance_id, id);
    assert!(client.get_status(&format!("{id}:0")).await.unwrap().is_some(), "default child ids are parent:sequence");
    worker.shutdown(WAIT).await;
}

const RETRY: Orchestration<(), u32> = Orchestration::new("Retry");
/// Fails untyped, with error type `Transient`.
const FLAKY: Activity<(), u32> = Activity::new("Flaky");

fn flaky_worker(store: &Arc<dyn keel_store::Store>, attempts: Arc<AtomicU32>, succeed_on: u32) -> keel::WorkerBuilder {
    worker(store)
        .orchestration(RETRY, |ctx: OrchestrationContext, (): ()| async move {
            let policy = RetryPolicy::new(3, Duration::from_millis(50))?.with_backoff_coefficient(2.0)?;
            Ok(ctx.call(FLAKY, &()).with_retry(policy).await?)
        })
        .activity(FLAKY, move |_ctx: ActivityContext, ()| {
            let attempt = attempts.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if attempt < succeed_on {
                    Err(ActivityError::new("Transient", format!("attempt {attempt} failed")))
                } else {
                    Ok(attempt)
                }
            }
        })
}

#[tokio::test]
async fn retries_until_success() {
    let (store, _dir) = temp_store().await;
    let attempts = Arc::new(AtomicU32::new(0));
    let worker = flaky_worker(&store, attempts.clone(), 3).build().start();
    let client = worker.client();
    let id = client.start(RETRY, &()).await.unwrap().id().to_string();
    let done = client.wait_for_completion(&id, WAIT).await.unwrap();
    assert_eq!(done.output.as_deref(), Some("3"));
    let history = client.get_history(&id).await.unwrap();
    let timers = history.iter().filter(|event| matches!(event.kind, EventKind::TimerCreated { .. })).count();
    assert_eq!(timers, 2, "a durable timer between attempts");
    worker.shutdown(WAIT).await;
}

#[tokio::test]
async fn retries_exhausted_fail_the_instance_with_the_last_failure() {
    let (store, _dir) = temp_store().await;
    let attempts = Arc::new(AtomicU32::new(0));
    let worker = flaky_worker(&store, attempts.clone(), 100).build().start();
    let client = worker.client();
    let id = client.start(RETRY, &()).await.unwrap().id().to_string();
    let done = client.wait_for_completion(&id, WAIT).await.unwrap();
    assert_eq!(done.status, RuntimeStatus::Failed);
    let failure = done.failure.unwrap();
    assert_eq!(failure.error_type, "Transient");
    assert_eq!(failure.error_message, "attempt 3 failed");
    assert_eq!(attempts.load(Ordering::SeqCst), 3);

    // Rewind runs the failed activity again; it fails again, and the instance fails again.
    client.rewind(&id, Some("try again")).await.unwrap();
    let rewound = client.wait_for_completion(&id, WAIT).await.unwrap();
    assert_eq!(rewound.status, RuntimeStatus::Failed);
    assert!(attempts.load(Ordering::SeqCst) > 3, "the rewind ran the activity again");
    worker.shutdown(WAIT).await;
}

#[tokio::test]
async fn rewind_of_a_transient_failure_completes_the_instance() {
    const ONCE: Orchestration<(), u32> = Orchestration::new("Once");
    const STEP: Activity<u32, u32> = Activity::new("Step");
    let (store, _dir) = temp_store().await;
    let attempts = Arc::new(AtomicU32::new(0));
    let counted = attempts.clone();
    let worker = worker(&store)
        .orchestration(ONCE, |ctx: OrchestrationContext, (): ()| async move {
            let a = ctx.call(STEP, &1).await?;
            let b = ctx.call(STEP, &2).await?;
            Ok(a + b)
        })
        .activity(STEP, move |_ctx: ActivityContext, n: u32| {
            let attempt = counted.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if attempt == 2 {
                    return Err(ActivityError::msg("the second call fails once"));
                }
                Ok(n * 10)
            }
        })
        .build()
        .start();
    let client = worker.client();
    let id = client.start(ONCE, &()).await.unwrap().id().to_string();
    assert_eq!(client.wait_for_completion(&id, WAIT).await.unwrap().status, RuntimeStatus::Failed);
    client.rewind(&id, None).await.unwrap();
    let done = client.wait_for_completion(&id, WAIT).await.unwrap();
    assert_eq!(done.status, RuntimeStatus::Completed, "{done:?}");
    assert_eq!(done.output.as_deref(), Some("30"));
    assert_eq!(attempts.load(Ordering::SeqCst), 3, "the first step was not run again");
    // Rewinding a completed instance is refused.
    assert!(matches!(client.rewind(&id, None).await, Err(ClientError::InvalidState { .. })));
    worker.shutdown(WAIT).await;
}

/// Waits for the event `Value`.
const WAIT_FOR_VALUE: Orchestration<(), u32> = Orchestration::new("Wait");
const VALUE: Event<u32> = Event::new("Value");

#[tokio::test]
async fn suspend_resume_and_terminate() {
    let (store, _dir) = temp_store().await;
    let worker = worker(&store)
        .orchestration(WAIT_FOR_VALUE, |ctx: OrchestrationContext, (): ()| async move {
            let value = ctx.wait(VALUE).await?;
            Ok(value + 1)
        })
        .build()
        .start();
    let client = worker.client();
    let id = client.start(WAIT_FOR_VALUE, &()).await.unwrap().id().to_string();
    client.wait_for_start(&id, WAIT).await.unwrap();
    client.suspend(&id, Some("maintenance")).await.unwrap();
    wait_for_state(&client, &id, "Suspended", |state| state.status == RuntimeStatus::Suspended).await;
    client.raise(&id, VALUE, &41).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        client.get_status(&id).await.unwrap().unwrap().status,
        RuntimeStatus::Suspended,
        "no step while suspended"
    );
    client.resume(&id, None).await.unwrap();
    let done = client.wait_for_completion(&id, WAIT).await.unwrap();
    assert_eq!(done.output.as_deref(), Some("42"));

    let other = client.start(WAIT_FOR_VALUE, &()).await.unwrap().id().to_string();
    client.wait_for_start(&other, WAIT).await.unwrap();
    client.terminate(&other, Some("no longer needed")).await.unwrap();
    let terminated = client.wait_for_completion(&other, WAIT).await.unwrap();
    assert_eq!(terminated.status, RuntimeStatus::Terminated);
    assert_eq!(terminated.output.as_deref(), Some("\"no longer needed\""));
    assert!(matches!(client.terminate(&other, None).await, Err(ClientError::InvalidState { .. })));
    worker.shutdown(WAIT).await;
}

#[tokio::test]
async fn a_scheduled_start_waits_for_its_time() {
    const NOW: Orchestration<(), i64> = Orchestration::new("Now");
    let (store, _dir) = temp_store().await;
    let worker = worker(&store).orchestration(NOW, |ctx: OrchestrationContext, (): ()| async move {
        Ok(ctx.current_utc_datetime().timestamp_millis())
    });
    let worker = worker.build().start();
    let client = worker.client();
    let start_at = chrono::Utc::now() + chrono::Duration::milliseconds(700);
    let options = StartOptions { scheduled_start: Some(start_at), ..StartOptions::default() };
    let id = client.start_with_options(NOW, &(), options).await.unwrap().id().to_string();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(client.get_status(&id).await.unwrap().unwrap().status, RuntimeStatus::Pending);
    let done = client.wait_for_completion(&id, WAIT).await.unwrap();
    let ran_at: i64 = done.output_as().unwrap();
    assert!(ran_at >= start_at.timestamp_millis(), "ran at {ran_at}, scheduled for {}", start_at.timestamp_millis());
    worker.shutdown(WAIT).await;
}

#[tokio::test]
async fn bad_requests_are_refused_and_change_nothing() {
    let (store, _dir) = temp_store().await;
    let worker = worker(&store)
        .orchestration(WAIT_FOR_VALUE, |ctx: OrchestrationContext, (): ()| async move { Ok(ctx.wait(VALUE).await?) })
        .build()
        .start();
    let client = worker.client();
    assert!(matches!(client.start_new("NoSuchThing", &()).await, Err(ClientError::UnknownOrchestrator(_))));
    let too_big = "x".repeat(keel_core::limits::MAX_PAYLOAD_BYTES + 1);
    // By name: the typed start takes no string.
    assert!(matches!(client.start_new(WAIT_FOR_VALUE.name(), &too_big).await, Err(ClientError::Invalid(_))));
    let bad_id = StartOptions { instance_id: Some("a/b".into()), ..StartOptions::default() };
    assert!(matches!(client.start_with_options(WAIT_FOR_VALUE, &(), bad_id).await, Err(ClientError::Invalid(_))));
    assert!(matches!(
        client.start_raw("Wait", Some("{not json".into()), StartOptions::default()).await,
        Err(ClientError::Invalid(_))
    ));
    assert!(matches!(client.raise("nobody", VALUE, &1).await, Err(ClientError::NotFound(_))));
    assert!(matches!(client.terminate("nobody", None).await, Err(ClientError::NotFound(_))));
    let page = client.query(&InstanceQuery::default()).await.unwrap();
    assert!(page.instances.is_empty(), "nothing was written: {page:?}");

    let fixed = StartOptions { instance_id: Some("singleton".into()), ..StartOptions::default() };
    client.start_with_options(WAIT_FOR_VALUE, &(), fixed.clone()).await.unwrap();
    let again = client.start_with_options(WAIT_FOR_VALUE, &(), fixed.clone()).await.unwrap_err();
    assert!(matches!(again, ClientError::AlreadyExists { .. }), "{again:?}");
    client.raise("singleton", VALUE, &7).await.unwrap();
    assert_eq!(client.wait_for_completion("singleton", WAIT).await.unwrap().output.as_deref(), Some("7"));
    // A finished instance is replaced by a new start with the same id.
    client.start_with_options(WAIT_FOR_VALUE, &(), fixed).await.unwrap();
    let replaced = client.wait_for_start("singleton", WAIT).await.unwrap();
    assert_eq!(replaced.status, RuntimeStatus::Running);
    assert_eq!(replaced.output, None);
    worker.shutdown(WAIT).await;
}

#[tokio::test]
async fn panics_fail_the_instance_not_the_worker() {
    const PANICKY_ORCHESTRATOR: Orchestration<(), ()> = Orchestration::new("PanickyOrchestrator");
    const CALLS_PANICKY_ACTIVITY: Orchestration<(), ()> = Orchestration::new("CallsPanickyActivity");
    const FINE: Orchestration<(), String> = Orchestration::new("Fine");
    const PANICKY_ACTIVITY: Activity<(), (), Never> = Activity::new("PanickyActivity");
    let (store, _dir) = temp_store().await;
    let worker = worker(&store)
        .orchestration(PANICKY_ORCHESTRATOR, |_ctx: OrchestrationContext, (): ()| async move {
            if true {
                panic!("orchestrator bug");
            }
            Ok(())
        })
        .orchestration(CALLS_PANICKY_ACTIVITY, |ctx: OrchestrationContext, (): ()| async move {
            Ok(ctx.call(PANICKY_ACTIVITY, &()).await?)
        })
        .orchestration(FINE, |_ctx: OrchestrationContext, (): ()| async move { Ok("fine".to_string()) })
        .activity(PANICKY_ACTIVITY, |_ctx: ActivityContext, ()| async move {
            if true {
                panic!("activity bug");
            }
            Ok::<_, Never>(())
        })
        .build()
        .start();
    let client = worker.client();
    let a = client.start(PANICKY_ORCHESTRATOR, &()).await.unwrap().id().to_string();
    let b = client.start(CALLS_PANICKY_ACTIVITY, &()).await.unwrap().id().to_string();
    let a = client.wait_for_completion(&a, WAIT).await.unwrap();
    let b = client.wait_for_completion(&b, WAIT).await.unwrap();
    assert_eq!(a.status, RuntimeStatus::Failed);
    assert!(a.failure.unwrap().error_message.contains("orchestrator bug"));
    assert_eq!(b.status, RuntimeStatus::Failed);
    let failure = b.failure.unwrap();
    assert_eq!(failure.error_type, "Panic");
    assert!(failure.error_message.contains("activity bug"), "{failure:?}");
    let c = client.start(FINE, &()).await.unwrap().id().to_string();
    assert_eq!(client.wait_for_completion(&c, WAIT).await.unwrap().status, RuntimeStatus::Completed);
    worker.shutdown(WAIT).await;
}

#[tokio::test]
async fn changed_orchestrator_code_is_detected_as_non_determinism() {
    const VERSIONED: Orchestration<(), u32> = Orchestration::new("Versioned");
    const OLD: Activity<(), (), Never> = Activity::new("Old");
    const NEW: Activity<(), (), Never> = Activity::new("New");
    const GO_WITH_A_NUMBER: Event<u32> = Event::new("Go");
    let (store, _dir) = temp_store().await;
    let first = worker(&store)
        .orchestration(VERSIONED, |ctx: OrchestrationContext, (): ()| async move {
            ctx.call(OLD, &()).await?;
            Ok(ctx.wait(GO_WITH_A_NUMBER).await?)
        })
        .activity(OLD, |_ctx: ActivityContext, ()| async { Ok::<_, Never>(()) })
        .build()
        .start();
    let client = first.client();
    let id = client.start(VERSIONED, &()).await.unwrap().id().to_string();
    wait_for_history(&client, &id, "TaskCompleted", |kind| matches!(kind, EventKind::TaskCompleted { .. })).await;
    first.shutdown(WAIT).await;

    let second = worker(&store)
        .orchestration(VERSIONED, |ctx: OrchestrationContext, (): ()| async move {
            ctx.call(NEW, &()).await?;
            Ok(ctx.wait(GO_WITH_A_NUMBER).await?)
        })
        .activity(NEW, |_ctx: ActivityContext, ()| async { Ok::<_, Never>(()) })
        .build()
        .start();
    let client = second.client();
    client.raise(&id, GO_WITH_A_NUMBER, &1).await.unwrap();
    let done = client.wait_for_completion(&id, WAIT).await.unwrap();
    assert_eq!(done.status, RuntimeStatus::Failed);
    let failure = done.failure.unwrap();
    assert_eq!(failure.error_type, "NonDeterministicOrchestration");
    assert!(failure.error_message.contains("sequence number 0"), "{}", failure.error_message);
    assert!(
        failure.error_message.contains("\"Old\"") && failure.error_message.contains("\"New\""),
        "{}",
        failure.error_message
    );
    second.shutdown(WAIT).await;
}

#[tokio::test]
async fn query_pages_purge_and_restart() {
    const ECHO: Orchestration<u32, u32> = Orchestration::new("Echo");
    let (store, _dir) = temp_store().await;
    let worker =
        worker(&store).orchestration(ECHO, |_ctx: OrchestrationContext, n: u32| async move { Ok(n) }).build().start();
    let client = worker.client();
    let mut ids = Vec::new();
    for n in 0..25u32 {
        let options = StartOptions { instance_id: Some(format!("echo-{n:02}")), ..StartOptions::default() };
        ids.push(client.start_with_options(ECHO, &n, options).await.unwrap().id().to_string());
    }
    for id in &ids {
        client.wait_for_completion(id, WAIT).await.unwrap();
    }
    let mut seen = HashSet::new();
    let mut query =
        InstanceQuery { page_size: 10, instance_id_prefix: Some("echo-".into()), ..InstanceQuery::default() };
    loop {
        let page = client.query(&query).await.unwrap();
        assert!(page.instances.len() <= 10);
        for instance in &page.instances {
            assert!(seen.insert(instance.instance_id.clone()), "{} seen twice", instance.instance_id);
        }
        match page.continuation {
            Some(token) => query.continuation = Some(token),
            None => break,
        }
    }
    assert_eq!(seen.len(), 25);

    let restarted = client.restart("echo-03", true).await.unwrap();
    assert_ne!(restarted, "echo-03");
    assert_eq!(client.wait_for_completion(&restarted, WAIT).await.unwrap().output.as_deref(), Some("3"));

    assert!(client.purge("echo-00").await.unwrap());
    assert!(!client.purge("echo-00").await.unwrap());
    assert!(client.get_status("echo-00").await.unwrap().is_none());
    let purged = client
        .purge_where(&PurgeFilter { statuses: vec![RuntimeStatus::Completed], ..PurgeFilter::default() })
        .await
        .unwrap();
    assert_eq!(purged, 25, "24 echoes and the restarted one");
    worker.shutdown(WAIT).await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_running_activities() {
    const SLOW: Orchestration<(), u32> = Orchestration::new("Slow");
    const NAP: Activity<(), u32, Never> = Activity::new("Nap");
    let (store, _dir) = temp_store().await;
    let runs = Arc::new(AtomicU32::new(0));
    let build = |runs: Arc<AtomicU32>| {
        worker(&store)
            .orchestration(SLOW, |ctx: OrchestrationContext, (): ()| async move { Ok(ctx.call(NAP, &()).await?) })
            .activity(NAP, move |_ctx: ActivityContext, ()| {
                let runs = runs.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok::<_, Never>(runs.fetch_add(1, Ordering::SeqCst) + 1)
                }
            })
    };
    let first = build(runs.clone()).build().start();
    let client = first.client();
    let id = client.start(SLOW, &()).await.unwrap().id().to_string();
    wait_for_history(&client, &id, "TaskScheduled", |kind| matches!(kind, EventKind::TaskScheduled { .. })).await;
    tokio::time::sleep(Duration::from_millis(100)).await; // the activity is running now
    first.shutdown(WAIT).await;
    let second = build(runs.clone()).build().start();
    let done = second.client().wait_for_completion(&id, WAIT).await.unwrap();
    assert_eq!(done.output.as_deref(), Some("1"), "the activity ran once, before shutdown");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    second.shutdown(WAIT).await;
}

#[tokio::test]
async fn custom_status_and_guids_are_recorded() {
    const STATUS: Orchestration<(), String> = Orchestration::new("Status");
    let (store, _dir) = temp_store().await;
    let worker = worker(&store)
        .orchestration(STATUS, |ctx: OrchestrationContext, (): ()| async move {
            ctx.set_custom_status(&serde_json::json!({"stage": "waiting"}));
            let id = ctx.new_guid();
            ctx.wait(GO).await?;
            ctx.set_custom_status(&"done");
            Ok(id.to_string())
        })
        .build()
        .start();
    let client = worker.client();
    let id = client.start(STATUS, &()).await.unwrap().id().to_string();
    let status = wait_for_state(&client, &id, "a custom status", |state| state.custom_status.is_some()).await;
    assert_eq!(status.custom_status.as_deref(), Some("{\"stage\":\"waiting\"}"));
    client.raise(&id, GO, &()).await.unwrap();
    let done = client.wait_for_completion(&id, WAIT).await.unwrap();
    assert_eq!(done.custom_status.as_deref(), Some("\"done\""));
    let guid: String = done.output_as().unwrap();
    assert_eq!(guid.len(), 36);
    worker.shutdown(WAIT).await;
}

#[tokio::test]
async fn work_that_keeps_crashing_its_workers_is_failed_as_poison() {
    const CALLS: Orchestration<(), u32> = Orchestration::new("Calls");
    const PLAIN: Orchestration<(), u32> = Orchestration::new("Plain");
    const WORK: Activity<(), u32, Never> = Activity::new("Work");
    let (store, _dir) = temp_store().await;
    let build = |activity_hangs: bool| {
        worker(&store)
            .orchestration(CALLS, |ctx: OrchestrationContext, (): ()| async move { Ok(ctx.call(WORK, &()).await?) })
            .orchestration(PLAIN, |_ctx: OrchestrationContext, (): ()| async move { Ok(1) })
            .activity(WORK, move |_ctx: ActivityContext, ()| async move {
                if activity_hangs {
                    std::future::pending::<()>().await;
                }
                Ok::<_, Never>(7u32)
            })
    };
    let client = build(false).build().client();
    // Workers that take an item and die before finishing it are simulated by taking the
    // item with a zero lease, over and over, without committing.
    let plain = client.start(PLAIN, &()).await.unwrap().id().to_string();
    for _ in 0..keel_core::limits::MAX_DELIVERY_ATTEMPTS {
        let items = store.fetch_orchestration_items(10, Duration::ZERO, chrono::Utc::now()).await.unwrap();
        assert_eq!(items.len(), 1);
    }
    let worker = build(false).build().start();
    let done = client.wait_for_completion(&plain, WAIT).await.unwrap();
    assert_eq!(done.status, RuntimeStatus::Failed);
    assert_eq!(done.failure.unwrap().error_type, keel::POISON_ERROR_TYPE);
    worker.shutdown(WAIT).await;

    // An activity item: a worker whose activity hangs gives it back at shutdown.
    let calls = client.start(CALLS, &()).await.unwrap().id().to_string();
    let hanging = build(true).build().start();
    wait_for_history(&client, &calls, "TaskScheduled", |kind| matches!(kind, EventKind::TaskScheduled { .. })).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    hanging.shutdown(Duration::ZERO).await;
    let mut taken = 0;
    for _ in 0..keel_core::limits::MAX_DELIVERY_ATTEMPTS {
        taken += store.fetch_activity_items(10, Duration::ZERO, chrono::Utc::now()).await.unwrap().len();
    }
    assert_eq!(taken, keel_core::limits::MAX_DELIVERY_ATTEMPTS as usize, "the item was given back at shutdown");
    let worker = build(false).build().start();
    let done = client.wait_for_completion(&calls, WAIT).await.unwrap();
    assert_eq!(done.status, RuntimeStatus::Failed);
    assert_eq!(done.failure.unwrap().error_type, keel::POISON_ERROR_TYPE);
    worker.shutdown(WAIT).await;
}
