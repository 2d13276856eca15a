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
    ActivityContext, ActivityError, ClientError, EventKind, InstanceQuery, OrchestrationContext, OrchestrationError,
    PurgeFilter, RetryPolicy, RuntimeStatus, StartOptions,
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

async fn place_order(ctx: OrchestrationContext) -> Result<String, OrchestrationError> {
    let order: Order = ctx.input()?;
    ctx.call_activity::<bool>("CheckAndReserveInventory", &order).await?;
    if let Err(payment_failure) = ctx.call_activity::<String>("ProcessPayment", &order).await {
        // Compensate: give the reserved stock back, then fail with the payment's reason.
        ctx.call_activity::<()>("ReleaseInventory", &order).await?;
        return Err(payment_failure.into());
    }
    let tracking: String = ctx.call_activity("ScheduleShipping", &order).await?;
    ctx.call_activity::<()>("EmailCustomer", &tracking).await?;
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
        .orchestrator("PlaceOrder", place_order)
        .activity("CheckAndReserveInventory", |_ctx: ActivityContext, order: Order| async move {
            Ok::<_, ActivityError>(!order.items.is_empty())
        })
        .activity("ProcessPayment", |_ctx: ActivityContext, order: Order| async move {
            if order.customer.starts_with("broke") {
                return Err(ActivityError::new("PaymentDeclined", format!("card declined for {}", order.order_id)));
            }
            Ok(format!("pay-{}", order.order_id))
        })
        .activity("ReleaseInventory", move |_ctx: ActivityContext, _order: Order| {
            let released = released.clone();
            async move {
                released.fetch_add(1, Ordering::SeqCst);
                Ok::<_, ActivityError>(())
            }
        })
        .activity("ScheduleShipping", |_ctx: ActivityContext, order: Order| async move {
            Ok::<_, ActivityError>(format!("TRACK-{}", order.order_id))
        })
        .activity("EmailCustomer", |_ctx: ActivityContext, _tracking: String| async move { Ok::<_, ActivityError>(()) })
}

#[tokio::test]
async fn the_order_workflow_runs_its_activities_in_sequence() {
    let (store, _dir) = temp_store().await;
    let worker = order_worker(&store, Arc::default()).build().start();
    let client = worker.client();
    let id = client.start_new("PlaceOrder", &order("o-1")).await.unwrap();
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
    let id = client.start_new("PlaceOrder", &broke).await.unwrap();
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
    let (store, _dir) = temp_store().await;
    let worker = worker(&store)
        .orchestrator("FanOut", |ctx: OrchestrationContext| async move {
            let n: u64 = ctx.input()?;
            let results = ctx.when_all((0..n).map(|i| ctx.call_activity::<u64>("Square", &i))).await;
            let mut total = 0;
            for result in results {
                total += result?;
            }
            Ok(total)
        })
        .activity("Square", |_ctx: ActivityContext, i: u64| async move { Ok::<_, ActivityError>(i * i) })
        .build()
        .start();
    let client = worker.client();
    let id = client.start_new("FanOut", &1000u64).await.unwrap();
    let done = client.wait_for_completion(&id, WAIT).await.unwrap();
    assert_eq!(done.status, RuntimeStatus::Completed, "{done:?}");
    let expected: u64 = (0..1000u64).map(|i| i * i).sum();
    assert_eq!(done.output_as::<u64>().unwrap(), expected);
    let history = client.get_history(&id).await.unwrap();
    let completed = history.iter().filter(|event| matches!(event.kind, EventKind::TaskCompleted { .. })).count();
    assert_eq!(completed, 1000);
    worker.shutdown(WAIT).await;
}

async fn approval(ctx: OrchestrationContext) -> Result<String, OrchestrationError> {
    let timeout_ms: u64 = ctx.input()?;
    let outcome = ctx.wait_for_external_event_with_timeout::<bool>("Approval", Duration::from_millis(timeout_ms)).await;
    match outcome {
        Ok(true) => Ok("approved".into()),
        Ok(false) => Ok("rejected".into()),
        Err(error) if error.is_timeout() => Ok(ctx.call_activity("Escalate", &()).await?),
        Err(error) => Err(error.into()),
    }
}

fn approval_worker(store: &Arc<dyn keel_store::Store>) -> keel::WorkerHandle {
    worker(store)
        .orchestrator("Approval", approval)
        .activity("Escalate", |_ctx: ActivityContext, ()| async { Ok::<_, ActivityError>("escalated".to_string()) })
        .build()
        .start()
}

#[tokio::test]
async fn human_interaction_approval_arrives_before_the_deadline() {
    let (store, _dir) = temp_store().await;
    let worker = approval_worker(&store);
    let client = worker.client();
    let id = client.start_new("Approval", &60_000u64).await.unwrap();
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
    let id = client.start_new("Approval", &300u64).await.unwrap();
    let done = client.wait_for_completion(&id, WAIT).await.unwrap();
    assert_eq!(done.output.as_deref(), Some("\"escalated\""));
    let history = client.get_history(&id).await.unwrap();
    assert!(history.iter().any(|event| matches!(event.kind, EventKind::TimerFired { .. })));
    // An event for the finished instance is refused and changes nothing.
    let late = client.raise_event(&id, "Approval", &true).await.unwrap_err();
    assert!(matches!(late, ClientError::InvalidState { status: RuntimeStatus::Completed, .. }), "{late:?}");
    assert_eq!(client.get_history(&id).await.unwrap().len(), history.len());
    worker.shutdown(WAIT).await;
}

#[tokio::test]
async fn events_raised_before_the_wait_are_buffered() {
    let (store, _dir) = temp_store().await;
    let worker = worker(&store)
        .orchestrator("Collect", |ctx: OrchestrationContext| async move {
            ctx.wait_for_external_event::<()>("Go").await?;
            let a: String = ctx.wait_for_external_event("Item").await?;
            let b: String = ctx.wait_for_external_event("Item").await?;
            Ok(vec![a, b])
        })
        .build()
        .start();
    let client = worker.client();
    let id = client.start_new("Collect", &()).await.unwrap();
    client.raise_event(&id, "Item", &"first").await.unwrap();
    client.raise_event(&id, "Item", &"second").await.unwrap();
    client.raise_event(&id, "Go", &()).await.unwrap();
    let done = client.wait_for_completion(&id, WAIT).await.unwrap();
    assert_eq!(done.output.as_deref(), Some("[\"first\",\"second\"]"));
    worker.shutdown(WAIT).await;
}

#[tokio::test]
async fn a_monitor_loops_on_timers_and_continues_as_new() {
    let (store, _dir) = temp_store().await;
    let checks = Arc::new(AtomicU32::new(0));
    let counted = checks.clone();
    let worker = worker(&store)
        .orchestrator("Monitor", |ctx: OrchestrationContext| async move {
            let round: u32 = ctx.input()?;
            let clear: bool = ctx.call_activity("IsClear", &round).await?;
            if clear {
                return Ok(format!("clear after {round} rounds"));
            }
            ctx.sleep(Duration::from_millis(50)).await;
            ctx.continue_as_new(&(round + 1));
            Ok(String::new())
        })
        .activity("IsClear", move |_ctx: ActivityContext, round: u32| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, ActivityError>(round >= 4) }
        })
        .build()
        .start();
    let client = worker.client();
    let id = client.start_new("Monitor", &0u32).await.unwrap();
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
    let (store, _dir) = temp_store().await;
    let worker = worker(&store)
        .orchestrator("Parent", |ctx: OrchestrationContext| async move {
            let children = (1..=3).map(|n| ctx.call_sub_orchestrator::<u32>("Child", &n));
            let mut sum = 0;
            for result in ctx.when_all(children).await {
                sum += result?;
            }
            let named: u32 = ctx.call_sub_orchestrator_with_id("Child", Some("named-child"), &10u32).await?;
            let failure = ctx.call_sub_orchestrator::<u32>("Child", &0u32).await.unwrap_err();
            Ok((sum + named, failure.details.error_type))
        })
        .orchestrator("Child", |ctx: OrchestrationContext| async move {
            let n: u32 = ctx.input()?;
            if n == 0 {
                return Err(OrchestrationError::new("ZeroInput", "children need a positive input"));
            }
            Ok(ctx.call_activity::<u32>("Double", &n).await?)
        })
        .activity("Double", |_ctx: ActivityContext, n: u32| async move { Ok::<_, ActivityError>(n * 2) })
        .build()
        .start();
    let client = worker.client();
    let id = client.start_new("Parent", &()).await.unwrap();
    let done = client.wait_for_completion(&id, WAIT).await.unwrap();
    assert_eq!(done.output.as_deref(), Some("[32,\"ZeroInput\"]"), "{done:?}");
    let child = client.get_status("named-child").await.unwrap().expect("the named child exists");
    assert_eq!(child.status, RuntimeStatus::Completed);
    assert_eq!(child.parent.expect("a parent").instance_id, id);
    assert!(client.get_status(&format!("{id}:0")).await.unwrap().is_some(), "default child ids are parent:sequence");
    worker.shutdown(WAIT).await;
}

fn flaky_worker(store: &Arc<dyn keel_store::Store>, attempts: Arc<AtomicU32>, succeed_on: u32) -> keel::WorkerBuilder {
    worker(store)
        .orchestrator("Retry", |ctx: OrchestrationContext| async move {
            let policy = RetryPolicy::new(3, Duration::from_millis(50)).with_backoff_coefficient(2.0);
            Ok(ctx.call_activity_with_retry::<u32>("Flaky", &(), &policy).await?)
        })
        .activity("Flaky", move |_ctx: ActivityContext, ()| {
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
    let id = client.start_new("Retry", &()).await.unwrap();
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
    let id = client.start_new("Retry", &()).await.unwrap();
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
    let (store, _dir) = temp_store().await;
    let attempts = Arc::new(AtomicU32::new(0));
    let counted = attempts.clone();
    let worker = worker(&store)
        .orchestrator("Once", |ctx: OrchestrationContext| async move {
            let a: u32 = ctx.call_activity("Step", &1u32).await?;
            let b: u32 = ctx.call_activity("Step", &2u32).await?;
            Ok(a + b)
        })
        .activity("Step", move |_ctx: ActivityContext, n: u32| {
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
    let id = client.start_new("Once", &()).await.unwrap();
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

#[tokio::test]
async fn suspend_resume_and_terminate() {
    let (store, _dir) = temp_store().await;
    let worker = worker(&store)
        .orchestrator("Wait", |ctx: OrchestrationContext| async move {
            let value: u32 = ctx.wait_for_external_event("Value").await?;
            Ok(value + 1)
        })
        .build()
        .start();
    let client = worker.client();
    let id = client.start_new("Wait", &()).await.unwrap();
    client.wait_for_start(&id, WAIT).await.unwrap();
    client.suspend(&id, Some("maintenance")).await.unwrap();
    wait_for_state(&client, &id, "Suspended", |state| state.status == RuntimeStatus::Suspended).await;
    client.raise_event(&id, "Value", &41u32).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        client.get_status(&id).await.unwrap().unwrap().status,
        RuntimeStatus::Suspended,
        "no step while suspended"
    );
    client.resume(&id, None).await.unwrap();
    let done = client.wait_for_completion(&id, WAIT).await.unwrap();
    assert_eq!(done.output.as_deref(), Some("42"));

    let other = client.start_new("Wait", &()).await.unwrap();
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
    let (store, _dir) = temp_store().await;
    let worker = worker(&store).orchestrator("Now", |ctx: OrchestrationContext| async move {
        Ok(ctx.current_utc_datetime().timestamp_millis())
    });
    let worker = worker.build().start();
    let client = worker.client();
    let start_at = chrono::Utc::now() + chrono::Duration::milliseconds(700);
    let options = StartOptions { scheduled_start: Some(start_at), ..StartOptions::default() };
    let id = client.start_with("Now", &(), options).await.unwrap();
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
        .orchestrator("Wait", |ctx: OrchestrationContext| async move {
            Ok(ctx.wait_for_external_event::<u32>("Value").await?)
        })
        .build()
        .start();
    let client = worker.client();
    assert!(matches!(client.start_new("NoSuchThing", &()).await, Err(ClientError::UnknownOrchestrator(_))));
    let too_big = "x".repeat(keel_core::limits::MAX_PAYLOAD_BYTES + 1);
    assert!(matches!(client.start_new("Wait", &too_big).await, Err(ClientError::Invalid(_))));
    let bad_id = StartOptions { instance_id: Some("a/b".into()), ..StartOptions::default() };
    assert!(matches!(client.start_with("Wait", &(), bad_id).await, Err(ClientError::Invalid(_))));
    assert!(matches!(
        client.start_raw("Wait", Some("{not json".into()), StartOptions::default()).await,
        Err(ClientError::Invalid(_))
    ));
    assert!(matches!(client.raise_event("nobody", "Value", &1).await, Err(ClientError::NotFound(_))));
    assert!(matches!(client.terminate("nobody", None).await, Err(ClientError::NotFound(_))));
    let page = client.query(&InstanceQuery::default()).await.unwrap();
    assert!(page.instances.is_empty(), "nothing was written: {page:?}");

    let fixed = StartOptions { instance_id: Some("singleton".into()), ..StartOptions::default() };
    client.start_with("Wait", &(), fixed.clone()).await.unwrap();
    let again = client.start_with("Wait", &(), fixed.clone()).await.unwrap_err();
    assert!(matches!(again, ClientError::AlreadyExists { .. }), "{again:?}");
    client.raise_event("singleton", "Value", &7u32).await.unwrap();
    assert_eq!(client.wait_for_completion("singleton", WAIT).await.unwrap().output.as_deref(), Some("7"));
    // A finished instance is replaced by a new start with the same id.
    client.start_with("Wait", &(), fixed).await.unwrap();
    let replaced = client.wait_for_start("singleton", WAIT).await.unwrap();
    assert_eq!(replaced.status, RuntimeStatus::Running);
    assert_eq!(replaced.output, None);
    worker.shutdown(WAIT).await;
}

#[tokio::test]
async fn panics_fail_the_instance_not_the_worker() {
    let (store, _dir) = temp_store().await;
    let worker = worker(&store)
        .orchestrator("PanickyOrchestrator", |_ctx: OrchestrationContext| async move {
            if true {
                panic!("orchestrator bug");
            }
            Ok(())
        })
        .orchestrator("CallsPanickyActivity", |ctx: OrchestrationContext| async move {
            Ok(ctx.call_activity::<()>("PanickyActivity", &()).await?)
        })
        .orchestrator("Fine", |_ctx: OrchestrationContext| async move { Ok("fine") })
        .activity("PanickyActivity", |_ctx: ActivityContext, ()| async move {
            if true {
                panic!("activity bug");
            }
            Ok::<_, ActivityError>(())
        })
        .build()
        .start();
    let client = worker.client();
    let a = client.start_new("PanickyOrchestrator", &()).await.unwrap();
    let b = client.start_new("CallsPanickyActivity", &()).await.unwrap();
    let a = client.wait_for_completion(&a, WAIT).await.unwrap();
    let b = client.wait_for_completion(&b, WAIT).await.unwrap();
    assert_eq!(a.status, RuntimeStatus::Failed);
    assert!(a.failure.unwrap().error_message.contains("orchestrator bug"));
    assert_eq!(b.status, RuntimeStatus::Failed);
    let failure = b.failure.unwrap();
    assert_eq!(failure.error_type, "Panic");
    assert!(failure.error_message.contains("activity bug"), "{failure:?}");
    let c = client.start_new("Fine", &()).await.unwrap();
    assert_eq!(client.wait_for_completion(&c, WAIT).await.unwrap().status, RuntimeStatus::Completed);
    worker.shutdown(WAIT).await;
}

#[tokio::test]
async fn changed_orchestrator_code_is_detected_as_non_determinism() {
    let (store, _dir) = temp_store().await;
    let first = worker(&store)
        .orchestrator("Versioned", |ctx: OrchestrationContext| async move {
            let _: () = ctx.call_activity("Old", &()).await?;
            Ok(ctx.wait_for_external_event::<u32>("Go").await?)
        })
        .activity("Old", |_ctx: ActivityContext, ()| async { Ok::<_, ActivityError>(()) })
        .build()
        .start();
    let client = first.client();
    let id = client.start_new("Versioned", &()).await.unwrap();
    wait_for_history(&client, &id, "TaskCompleted", |kind| matches!(kind, EventKind::TaskCompleted { .. })).await;
    first.shutdown(WAIT).await;

    let second = worker(&store)
        .orchestrator("Versioned", |ctx: OrchestrationContext| async move {
            let _: () = ctx.call_activity("New", &()).await?;
            Ok(ctx.wait_for_external_event::<u32>("Go").await?)
        })
        .activity("New", |_ctx: ActivityContext, ()| async { Ok::<_, ActivityError>(()) })
        .build()
        .start();
    let client = second.client();
    client.raise_event(&id, "Go", &1u32).await.unwrap();
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
    let (store, _dir) = temp_store().await;
    let worker = worker(&store)
        .orchestrator("Echo", |ctx: OrchestrationContext| async move { ctx.input::<u32>() })
        .build()
        .start();
    let client = worker.client();
    let mut ids = Vec::new();
    for n in 0..25u32 {
        let options = StartOptions { instance_id: Some(format!("echo-{n:02}")), ..StartOptions::default() };
        ids.push(client.start_with("Echo", &n, options).await.unwrap());
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
    let (store, _dir) = temp_store().await;
    let runs = Arc::new(AtomicU32::new(0));
    let build = |runs: Arc<AtomicU32>| {
        worker(&store)
            .orchestrator(
                "Slow",
                |ctx: OrchestrationContext| async move { Ok(ctx.call_activity::<u32>("Nap", &()).await?) },
            )
            .activity("Nap", move |_ctx: ActivityContext, ()| {
                let runs = runs.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok::<_, ActivityError>(runs.fetch_add(1, Ordering::SeqCst) + 1)
                }
            })
    };
    let first = build(runs.clone()).build().start();
    let client = first.client();
    let id = client.start_new("Slow", &()).await.unwrap();
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
    let (store, _dir) = temp_store().await;
    let worker = worker(&store)
        .orchestrator("Status", |ctx: OrchestrationContext| async move {
            ctx.set_custom_status(&serde_json::json!({"stage": "waiting"}));
            let id = ctx.new_guid();
            ctx.wait_for_external_event::<()>("Go").await?;
            ctx.set_custom_status(&"done");
            Ok(id.to_string())
        })
        .build()
        .start();
    let client = worker.client();
    let id = client.start_new("Status", &()).await.unwrap();
    let status = wait_for_state(&client, &id, "a custom status", |state| state.custom_status.is_some()).await;
    assert_eq!(status.custom_status.as_deref(), Some("{\"stage\":\"waiting\"}"));
    client.raise_event(&id, "Go", &()).await.unwrap();
    let done = client.wait_for_completion(&id, WAIT).await.unwrap();
    assert_eq!(done.custom_status.as_deref(), Some("\"done\""));
    let guid: String = done.output_as().unwrap();
    assert_eq!(guid.len(), 36);
    worker.shutdown(WAIT).await;
}

#[tokio::test]
async fn work_that_keeps_crashing_its_workers_is_failed_as_poison() {
    let (store, _dir) = temp_store().await;
    let build = |activity_hangs: bool| {
        worker(&store)
            .orchestrator("Calls", |ctx: OrchestrationContext| async move {
                Ok(ctx.call_activity::<u32>("Work", &()).await?)
            })
            .orchestrator("Plain", |_ctx: OrchestrationContext| async move { Ok(1) })
            .activity("Work", move |_ctx: ActivityContext, ()| async move {
                if activity_hangs {
                    std::future::pending::<()>().await;
                }
                Ok::<_, ActivityError>(7u32)
            })
    };
    let client = build(false).build().client();
    // Workers that take an item and die before finishing it are simulated by taking the
    // item with a zero lease, over and over, without committing.
    let plain = client.start_new("Plain", &()).await.unwrap();
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
    let calls = client.start_new("Calls", &()).await.unwrap();
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
