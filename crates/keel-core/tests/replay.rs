//! Replay-core tests from literal histories: history in, actions and outcome out.

use std::time::Duration;

use chrono::DateTime;
use keel_core::action::{Action, Completion};
use keel_core::failure::{Failure, TaskFailure};
use keel_core::handle::{Activity, Event, Orchestration};
use keel_core::history::{EventKind, FailureDetails, HistoryEvent, RuntimeStatus, Timestamp};
use keel_core::replay::{orchestrator, Execution, Orchestrator, NON_DETERMINISM_ERROR_TYPE, PANIC_ERROR_TYPE};
use keel_core::{OrchestrationContext, OrchestrationError, RetryPolicy};

fn at(secs: i64) -> Timestamp {
    DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
}

fn episode_start(secs: i64) -> HistoryEvent {
    HistoryEvent::new(at(secs), EventKind::OrchestratorStarted)
}

fn started(name: &str, input: &str) -> HistoryEvent {
    HistoryEvent::new(
        at(0),
        EventKind::ExecutionStarted {
            trace: None,
            name: name.into(),
            version: None,
            input: Some(input.into()),
            execution_id: "exec-1".into(),
            parent: None,
            scheduled_start: None,
        },
    )
}

fn scheduled(id: i32, name: &str) -> HistoryEvent {
    HistoryEvent::with_id(
        id,
        at(0),
        EventKind::TaskScheduled { trace: None, name: name.into(), input: None, tags: Default::default() },
    )
}

fn task_completed(id: i32, result: &str) -> HistoryEvent {
    HistoryEvent::new(at(0), EventKind::TaskCompleted { task_scheduled_id: id, result: Some(result.into()) })
}

fn task_failed(id: i32, error_type: &str) -> HistoryEvent {
    HistoryEvent::new(
        at(0),
        EventKind::TaskFailed { task_scheduled_id: id, failure: FailureDetails::new(error_type, "it broke") },
    )
}

fn timer_created(id: i32, fire_at: Timestamp) -> HistoryEvent {
    HistoryEvent::with_id(id, at(0), EventKind::TimerCreated { fire_at })
}

fn timer_fired(id: i32, fire_at: Timestamp) -> HistoryEvent {
    HistoryEvent::new(fire_at, EventKind::TimerFired { timer_id: id, fire_at })
}

fn raised(name: &str, input: &str) -> HistoryEvent {
    HistoryEvent::new(at(0), EventKind::EventRaised { name: name.into(), input: Some(input.into()) })
}

fn activity_names(actions: &[Action]) -> Vec<(i32, String)> {
    actions
        .iter()
        .map(|action| match action {
            Action::ScheduleTask { id, name, .. } => (*id, name.clone()),
            other => panic!("expected only activities, got {other:?}"),
        })
        .collect()
}

/// Three sequential activities, each fed the previous result.
fn chain() -> Orchestrator {
    orchestrator(|ctx: OrchestrationContext| async move {
        let name: String = ctx.input()?;
        let a: String = ctx.call_activity("A", &name).await?;
        let b: String = ctx.call_activity("B", &a).await?;
        let c: String = ctx.call_activity("C", &b).await?;
        Ok(c)
    })
}

#[test]
fn a_new_instance_schedules_its_first_activity() {
    let mut execution = Execution::new("i1", chain());
    let result = execution.run_episode(&[], &[episode_start(0), started("Chain", "\"x\"")]);
    assert_eq!(result.completion, None);
    assert_eq!(result.actions, vec![Action::ScheduleTask { id: 0, name: "A".into(), input: Some("\"x\"".into()) }]);
}

#[test]
fn replaying_a_chain_continues_where_history_ends() {
    let past = [
        episode_start(0),
        started("Chain", "\"x\""),
        scheduled(0, "A"),
        episode_start(1),
        task_completed(0, "\"a\""),
        scheduled(1, "B"),
    ];
    let mut execution = Execution::new("i1", chain());
    let result = execution.run_episode(&past, &[episode_start(2), task_completed(1, "\"b\"")]);
    assert_eq!(result.actions, vec![Action::ScheduleTask { id: 2, name: "C".into(), input: Some("\"b\"".into()) }]);

    // The returned action counts as recorded: the next episode feeds only what came after.
    let result = execution.run_episode(&[], &[episode_start(3), task_completed(2, "\"done\"")]);
    assert_eq!(result.completion, Some(Completion::Completed { output: Some("\"done\"".into()) }));
    assert!(result.actions.is_empty());
}

#[test]
fn a_history_that_differs_from_the_code_fails_with_the_mismatch_named() {
    let past = [episode_start(0), started("Chain", "\"x\""), scheduled(0, "Different")];
    let mut execution = Execution::new("i1", chain());
    let result = execution.run_episode(&past, &[episode_start(1), task_completed(0, "\"a\"")]);
    let Some(Completion::Failed { failure }) = result.completion else { panic!("expected failure: {result:?}") };
    assert_eq!(failure.error_type, NON_DETERMINISM_ERROR_TYPE);
    assert!(failure.error_message.contains("sequence number 0"), "{}", failure.error_message);
    assert!(failure.error_message.contains("TaskScheduled \"Different\""), "{}", failure.error_message);
    assert!(failure.error_message.contains("TaskScheduled \"A\""), "{}", failure.error_message);
    assert!(result.actions.is_empty(), "a non-deterministic execution takes no action");
}

#[test]
fn a_history_event_the_code_never_produced_is_non_determinism() {
    let no_work = orchestrator(|_ctx: OrchestrationContext| async move { Ok(1) });
    let past = [episode_start(0), started("X", "null"), scheduled(0, "A")];
    let result = Execution::new("i1", no_work).run_episode(&past, &[]);
    let Some(Completion::Failed { failure }) = result.completion else { panic!("{result:?}") };
    assert!(failure.error_message.contains("no action with that sequence number"), "{}", failure.error_message);
}

#[test]
fn activity_names_match_case_insensitively_on_replay() {
    let past = [episode_start(0), started("Chain", "\"x\""), scheduled(0, "a")];
    let result = Execution::new("i1", chain()).run_episode(&past, &[episode_start(1), task_completed(0, "\"a\"")]);
    assert_eq!(result.completion, None);
    assert_eq!(activity_names(&result.actions), vec![(1, "B".to_string())]);
}

#[test]
fn fan_out_schedules_everything_in_one_episode_and_fans_in_results_in_order() {
    let fan_out = orchestrator(|ctx: OrchestrationContext| async move {
        let tasks = (0..3).map(|i| ctx.call_activity::<i32>("Work", &i));
        let results = ctx.when_all(tasks).await;
        let total: i32 = results.into_iter().collect::<Result<Vec<_>, _>>()?.into_iter().sum();
        Ok(total)
    });
    let mut execution = Execution::new("i1", fan_out.clone());
    let first = execution.run_episode(&[], &[episode_start(0), started("Fan", "null")]);
    assert_eq!(activity_names(&first.actions), vec![(0, "Work".into()), (1, "Work".into()), (2, "Work".into())]);

    // Results arrive out of order over two episodes.
    let second = execution.run_episode(&[], &[episode_start(1), task_completed(2, "20")]);
    assert_eq!(second, keel_core::EpisodeResult::default());
    let third = execution.run_episode(&[], &[episode_start(2), task_completed(0, "1"), task_completed(1, "5")]);
    assert_eq!(third.completion, Some(Completion::Completed { output: Some("26".into()) }));

    // The same history replayed into a fresh execution gives the same outcome.
    let history: Vec<HistoryEvent> = vec![
        episode_start(0),
        started("Fan", "null"),
        scheduled(0, "Work"),
        scheduled(1, "Work"),
        scheduled(2, "Work"),
        episode_start(1),
        task_completed(2, "20"),
        episode_start(2),
        task_completed(0, "1"),
        task_completed(1, "5"),
    ];
    let replayed = Execution::new("i1", fan_out).run_episode(&history, &[]);
    assert_eq!(replayed.completion, Some(Completion::Completed { output: Some("26".into()) }));
}

#[test]
fn a_thousand_way_fan_out_replays() {
    let fan_out = orchestrator(|ctx: OrchestrationContext| async move {
        let results = ctx.when_all((0..1000).map(|i| ctx.call_activity::<i64>("Work", &i))).await;
        Ok(results.into_iter().map(|r| r.unwrap()).sum::<i64>())
    });
    let mut history = vec![episode_start(0), started("Fan", "null")];
    history.extend((0..1000).map(|i| scheduled(i, "Work")));
    history.push(episode_start(1));
    history.extend((0..1000).rev().map(|i| task_completed(i, &i.to_string())));
    let result = Execution::new("i1", fan_out).run_episode(&history, &[]);
    assert_eq!(result.completion, Some(Completion::Completed { output: Some("499500".into()) }));
}

#[test]
fn timers_fire_and_time_comes_from_history() {
    let sleeper = orchestrator(|ctx: OrchestrationContext| async move {
        let before = ctx.current_utc_datetime();
        ctx.sleep(Duration::from_secs(60)).await;
        Ok((before.timestamp(), ctx.current_utc_datetime().timestamp()))
    });
    let mut execution = Execution::new("i1", sleeper);
    let first = execution.run_episode(&[], &[episode_start(5), started("Sleep", "null")]);
    assert_eq!(first.actions, vec![Action::CreateTimer { id: 0, fire_at: at(65) }]);
    let second = execution.run_episode(&[], &[episode_start(66), timer_fired(0, at(65))]);
    let expected = serde_json::to_string(&(at(5).timestamp(), at(66).timestamp())).unwrap();
    assert_eq!(second.completion, Some(Completion::Completed { output: Some(expected) }));
}

#[test]
fn events_raised_before_the_wait_are_buffered_in_order() {
    let collector = orchestrator(|ctx: OrchestrationContext| async move {
        ctx.sleep(Duration::from_secs(1)).await;
        let first: String = ctx.wait_for_external_event("Approval").await?;
        let second: String = ctx.wait_for_external_event("APPROVAL").await?;
        Ok(vec![first, second])
    });
    let history = [
        episode_start(0),
        started("Collect", "null"),
        timer_created(0, at(1)),
        episode_start(1),
        raised("approval", "\"one\""),
        raised("Approval", "\"two\""),
        timer_fired(0, at(1)),
    ];
    let result = Execution::new("i1", collector).run_episode(&history, &[]);
    assert_eq!(result.completion, Some(Completion::Completed { output: Some("[\"one\",\"two\"]".into()) }));
}

const APPROVAL: Event<bool> = Event::new("Approval");

fn approval_with_timeout() -> Orchestrator {
    orchestrator(|ctx: OrchestrationContext| async move {
        Ok(match ctx.wait(APPROVAL).timeout(Duration::from_secs(30)).await? {
            Some(true) => "approved",
            Some(false) => "rejected",
            None => "timed out",
        })
    })
}

#[test]
fn an_event_that_beats_its_timeout_wins() {
    let mut execution = Execution::new("i1", approval_with_timeout());
    let first = execution.run_episode(&[], &[episode_start(0), started("Approve", "null")]);
    assert_eq!(first.actions, vec![Action::CreateTimer { id: 0, fire_at: at(30) }]);
    let second = execution.run_episode(&[], &[episode_start(10), raised("Approval", "true")]);
    assert_eq!(second.completion, Some(Completion::Completed { output: Some("\"approved\"".into()) }));
}

#[test]
fn a_timeout_that_beats_the_event_wins_and_later_events_are_buffered() {
    let history = [episode_start(0), started("Approve", "null"), timer_created(0, at(30))];
    let result = Execution::new("i1", approval_with_timeout())
        .run_episode(&history, &[episode_start(31), timer_fired(0, at(30)), raised("Approval", "true")]);
    assert_eq!(result.completion, Some(Completion::Completed { output: Some("\"timed out\"".into()) }));
}

/// The failure of the `Flaky` activity.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
enum FlakyError {
    Busy { attempt: u32 },
    Broken,
}

impl std::fmt::Display for FlakyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

keel_core::impl_failure!(FlakyError);

const FLAKY: Activity<(), String, FlakyError> = Activity::new("Flaky");

fn flaky_failed(id: i32, failure: FlakyError) -> HistoryEvent {
    HistoryEvent::new(at(0), EventKind::TaskFailed { task_scheduled_id: id, failure: failure.to_details() })
}

#[test]
fn retries_wait_on_durable_timers_and_give_up_after_the_last_attempt() {
    let retrying = orchestrator(|ctx: OrchestrationContext| async move {
        let policy = RetryPolicy::new(3, Duration::from_secs(10))?.with_backoff_coefficient(2.0)?;
        match ctx.call(FLAKY, &()).with_retry(policy).await {
            Ok(value) => Ok(value),
            Err(TaskFailure::Activity(failure)) => Ok(format!("gave up: {failure}")),
            Err(TaskFailure::Other(error)) => Err(error.into()),
        }
    });
    let mut execution = Execution::new("i1", retrying);
    let r = execution.run_episode(&[], &[episode_start(0), started("Retry", "null")]);
    assert_eq!(activity_names(&r.actions), vec![(0, "Flaky".into())]);
    let r = execution.run_episode(&[], &[episode_start(1), flaky_failed(0, FlakyError::Busy { attempt: 1 })]);
    assert_eq!(r.actions, vec![Action::CreateTimer { id: 1, fire_at: at(11) }]);
    let r = execution.run_episode(&[], &[episode_start(11), timer_fired(1, at(11))]);
    assert_eq!(activity_names(&r.actions), vec![(2, "Flaky".into())]);
    let r = execution.run_episode(&[], &[episode_start(12), flaky_failed(2, FlakyError::Busy { attempt: 2 })]);
    assert_eq!(r.actions, vec![Action::CreateTimer { id: 3, fire_at: at(32) }], "backoff doubles the delay");
    let r = execution.run_episode(&[], &[episode_start(32), timer_fired(3, at(32))]);
    assert_eq!(activity_names(&r.actions), vec![(4, "Flaky".into())]);
    let r = execution.run_episode(&[], &[episode_start(33), flaky_failed(4, FlakyError::Busy { attempt: 3 })]);
    assert_eq!(
        r.completion,
        Some(Completion::Completed { output: Some("\"gave up: Busy { attempt: 3 }\"".into()) }),
        "the orchestrator got the typed failure back"
    );
}

#[test]
fn a_typed_retry_predicate_sees_the_typed_failure() {
    let retrying = orchestrator(|ctx: OrchestrationContext| async move {
        let policy = RetryPolicy::new(5, Duration::from_secs(1))?;
        let result = ctx
            .call(FLAKY, &())
            .with_retry(policy)
            .only_if(|failure| matches!(failure, TaskFailure::Activity(FlakyError::Busy { .. })))
            .await;
        Ok(match result {
            Err(TaskFailure::Activity(FlakyError::Broken)) => "broken, not retried".to_string(),
            other => format!("{other:?}"),
        })
    });
    let mut execution = Execution::new("i1", retrying);
    execution.run_episode(&[], &[episode_start(0), started("Retry", "null")]);
    let r = execution.run_episode(&[], &[episode_start(1), flaky_failed(0, FlakyError::Busy { attempt: 1 })]);
    assert_eq!(r.actions, vec![Action::CreateTimer { id: 1, fire_at: at(2) }], "busy is retried");
    execution.run_episode(&[], &[episode_start(2), timer_fired(1, at(2))]);
    let r = execution.run_episode(&[], &[episode_start(3), flaky_failed(2, FlakyError::Broken)]);
    assert_eq!(r.completion, Some(Completion::Completed { output: Some("\"broken, not retried\"".into()) }));
}

#[test]
fn failures_that_are_not_the_declared_type_stay_distinguishable() {
    let calling = orchestrator(|ctx: OrchestrationContext| async move {
        Ok(match ctx.call(FLAKY, &()).await {
            Err(TaskFailure::Other(error)) => format!("other: {}", error.error_type()),
            other => format!("{other:?}"),
        })
    });
    let history = [episode_start(0), started("Call", "null"), scheduled(0, "Flaky")];
    let result = Execution::new("i1", calling).run_episode(&history, &[episode_start(1), task_failed(0, "Panic")]);
    assert_eq!(result.completion, Some(Completion::Completed { output: Some("\"other: Panic\"".into()) }));
}

/// Fans out three sub-orchestrations with retry: each gets its own instance id.
#[test]
fn fanned_out_sub_orchestrations_with_retry_get_distinct_ids() {
    const CHILD: Orchestration<u32, u32> = Orchestration::new("Child");
    let fan_out = orchestrator(|ctx: OrchestrationContext| async move {
        let policy = RetryPolicy::new(2, Duration::from_secs(1))?;
        let calls = (0..3).map(|n| ctx.call(CHILD, &n).with_retry(policy.clone()));
        let results = ctx.try_when_all(calls).await?;
        Ok(results.into_iter().sum::<u32>())
    });
    let first = Execution::new("parent", fan_out).run_episode(&[], &[episode_start(0), started("FanOut", "null")]);
    let ids: Vec<&str> = first
        .actions
        .iter()
        .map(|action| match action {
            Action::CreateSubOrchestration { instance_id, .. } => instance_id.as_str(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids, ["parent:0", "parent:1", "parent:2"]);
}

#[test]
fn when_any_and_race_take_the_first_of_futures_of_any_kind() {
    let racing = orchestrator(|ctx: OrchestrationContext| async move {
        let calls = vec![ctx.call_activity::<String>("A", &()), ctx.call_activity::<String>("B", &())];
        let (first, index) = ctx.when_any(calls).await;
        let winner = format!("{index}:{}", first?);
        let raced = match ctx.race(ctx.wait(APPROVAL), ctx.sleep(Duration::from_secs(5))).await {
            keel_core::context::Either::Left(approved) => format!("event {}", approved?),
            keel_core::context::Either::Right(()) => "timer".to_string(),
        };
        Ok(format!("{winner}, {raced}"))
    });
    let mut execution = Execution::new("i1", racing);
    let r = execution.run_episode(&[], &[episode_start(0), started("Race", "null")]);
    assert_eq!(activity_names(&r.actions), vec![(0, "A".into()), (1, "B".into())]);
    let r = execution.run_episode(&[], &[episode_start(1), task_completed(1, "\"b\"")]);
    assert_eq!(r.actions, vec![Action::CreateTimer { id: 2, fire_at: at(6) }]);
    let r = execution.run_episode(&[], &[episode_start(2), raised("Approval", "true")]);
    assert_eq!(r.completion, Some(Completion::Completed { output: Some("\"1:b, event true\"".into()) }));
}

#[test]
fn misused_context_methods_fail_the_orchestration_with_clear_errors() {
    let cases: Vec<(&str, Orchestrator)> = vec![
        (
            "PayloadTooLarge",
            orchestrator(|ctx: OrchestrationContext| async move {
                ctx.set_custom_status(&"x".repeat(keel_core::limits::MAX_PAYLOAD_BYTES + 1));
                ctx.sleep(Duration::from_secs(1)).await;
                Ok(())
            }),
        ),
        (
            "PayloadTooLarge",
            orchestrator(|ctx: OrchestrationContext| async move {
                ctx.send_event("other", "E", &"x".repeat(keel_core::limits::MAX_PAYLOAD_BYTES + 1));
                ctx.sleep(Duration::from_secs(1)).await;
                Ok(())
            }),
        ),
        (
            "PayloadTooLarge",
            orchestrator(|ctx: OrchestrationContext| async move {
                ctx.continue_as_new::<()>(&"x".repeat(keel_core::limits::MAX_PAYLOAD_BYTES + 1))
            }),
        ),
        (
            keel_core::context::INVALID_TIMER_ERROR_TYPE,
            orchestrator(|ctx: OrchestrationContext| async move {
                ctx.sleep(Duration::from_secs(u64::MAX)).await;
                Ok(())
            }),
        ),
        (
            // An instance id the HTTP API could not address is never created.
            "InvalidInput",
            orchestrator(|ctx: OrchestrationContext| async move {
                ctx.call_sub_orchestrator::<()>("Child", Some("a/b"), &()).await?;
                Ok(())
            }),
        ),
        (
            "InvalidInput",
            orchestrator(|ctx: OrchestrationContext| async move {
                ctx.call_sub_orchestrator::<()>("Child", Some("a\nb"), &()).await?;
                Ok(())
            }),
        ),
    ];
    for (expected, orchestrator) in cases {
        let result = Execution::new("i1", orchestrator).run_episode(&[], &[episode_start(0), started("M", "null")]);
        let Some(Completion::Failed { failure }) = &result.completion else { panic!("{expected}: {result:?}") };
        assert_eq!(failure.error_type, expected, "{failure:?}");
        assert!(result.actions.is_empty(), "{expected}: nothing was sent: {:?}", result.actions);
    }
}

#[test]
fn an_uncaught_activity_failure_fails_the_instance_with_its_details() {
    let history = [episode_start(0), started("Chain", "\"x\""), scheduled(0, "A")];
    let result =
        Execution::new("i1", chain()).run_episode(&history, &[episode_start(1), task_failed(0, "PaymentDeclined")]);
    let Some(Completion::Failed { failure }) = result.completion else { panic!("{result:?}") };
    assert_eq!(failure.error_type, "PaymentDeclined");
    assert_eq!(failure.error_message, "it broke");
}

#[test]
fn a_panic_fails_the_instance_not_the_caller() {
    let panicking = orchestrator(|ctx: OrchestrationContext| async move {
        let _: String = ctx.call_activity("A", &()).await?;
        if ctx.current_utc_datetime() > at(0) {
            panic!("boom at {}", ctx.current_utc_datetime().timestamp());
        }
        Ok(())
    });
    let history = [episode_start(0), started("P", "null"), scheduled(0, "A")];
    let result = Execution::new("i1", panicking).run_episode(&history, &[episode_start(1), task_completed(0, "\"a\"")]);
    let Some(Completion::Failed { failure }) = result.completion else { panic!("{result:?}") };
    assert_eq!(failure.error_type, PANIC_ERROR_TYPE);
    assert!(failure.error_message.contains("boom at"), "{}", failure.error_message);
}

#[test]
fn continue_as_new_carries_unconsumed_events_when_asked() {
    let eternal = orchestrator(|ctx: OrchestrationContext| async move {
        let n: u32 = ctx.input()?;
        ctx.sleep(Duration::from_secs(1)).await;
        ctx.continue_as_new_preserving_events::<()>(&(n + 1))
    });
    let history = [episode_start(0), started("Eternal", "4"), timer_created(0, at(1))];
    let result = Execution::new("i1", eternal)
        .run_episode(&history, &[episode_start(2), raised("Ping", "1"), timer_fired(0, at(1))]);
    let Some(Completion::ContinuedAsNew { input, carryover_events, version: None }) = result.completion else {
        panic!("{result:?}")
    };
    assert_eq!(input.as_deref(), Some("5"));
    assert_eq!(carryover_events.len(), 1);
    assert!(matches!(&carryover_events[0].kind, EventKind::EventRaised { name, .. } if name == "Ping"));
}

#[test]
fn results_that_arrive_while_suspended_wait_for_resume() {
    let mut execution = Execution::new("i1", chain());
    execution.run_episode(&[], &[episode_start(0), started("Chain", "\"x\"")]);
    let suspended = execution.run_episode(
        &[],
        &[
            episode_start(1),
            HistoryEvent::new(at(1), EventKind::ExecutionSuspended { reason: None }),
            task_completed(0, "\"a\""),
        ],
    );
    assert!(suspended.suspended);
    assert!(suspended.actions.is_empty(), "nothing runs while suspended");
    let resumed = execution
        .run_episode(&[], &[episode_start(2), HistoryEvent::new(at(2), EventKind::ExecutionResumed { reason: None })]);
    assert!(!resumed.suspended);
    assert_eq!(activity_names(&resumed.actions), vec![(1, "B".into())]);
}

#[test]
fn termination_ends_the_execution_even_while_suspended() {
    let history = [
        episode_start(0),
        started("Chain", "\"x\""),
        scheduled(0, "A"),
        episode_start(1),
        HistoryEvent::new(at(1), EventKind::ExecutionSuspended { reason: None }),
    ];
    let result = Execution::new("i1", chain()).run_episode(
        &history,
        &[episode_start(2), HistoryEvent::new(at(2), EventKind::ExecutionTerminated { reason: Some("stop".into()) })],
    );
    assert_eq!(result.completion, Some(Completion::Terminated { reason: Some("stop".into()) }));
    assert_eq!(result.completion.unwrap().status(), RuntimeStatus::Terminated);
}

#[test]
fn guids_and_custom_status_are_deterministic() {
    let guid_maker = orchestrator(|ctx: OrchestrationContext| async move {
        let first = ctx.new_guid();
        ctx.set_custom_status(&"working");
        let _: () = ctx.call_activity("A", &()).await?;
        Ok(vec![first.to_string(), ctx.new_guid().to_string()])
    });
    let history =
        [episode_start(0), started("G", "null"), scheduled(0, "A"), episode_start(1), task_completed(0, "null")];
    let one = Execution::new("i1", guid_maker.clone()).run_episode(&history, &[]);
    let two = Execution::new("i1", guid_maker.clone()).run_episode(&history, &[]);
    let other_instance = Execution::new("i2", guid_maker).run_episode(&history, &[]);
    assert_eq!(one, two);
    assert_eq!(one.custom_status.as_deref(), Some("\"working\""));
    let Some(Completion::Completed { output: Some(output) }) = &one.completion else { panic!() };
    let guids: Vec<String> = serde_json::from_str(output).unwrap();
    assert_ne!(guids[0], guids[1]);
    assert_ne!(one.completion, other_instance.completion);
}

#[test]
fn an_orchestrator_error_fails_the_instance() {
    let failing = orchestrator(|_ctx: OrchestrationContext| async move {
        Err::<(), _>(OrchestrationError::new("OutOfStock", "sku A1 is out of stock"))
    });
    let result = Execution::new("i1", failing).run_episode(&[], &[episode_start(0), started("F", "null")]);
    assert_eq!(
        result.completion,
        Some(Completion::Failed { failure: FailureDetails::new("OutOfStock", "sku A1 is out of stock") })
    );
}

#[test]
fn a_bad_input_fails_the_instance_with_a_clear_message() {
    let result = Execution::new("i1", chain()).run_episode(&[], &[episode_start(0), started("Chain", "{\"not\":1}")]);
    let Some(Completion::Failed { failure }) = result.completion else { panic!("{result:?}") };
    assert_eq!(failure.error_type, "InvalidInput");
}

#[test]
fn rewinding_schedules_the_failed_activity_again() {
    let history = [
        episode_start(0),
        started("Chain", "\"x\""),
        scheduled(0, "A"),
        episode_start(1),
        task_completed(0, "\"a\""),
        scheduled(1, "B"),
        episode_start(2),
        task_failed(1, "Boom"),
        HistoryEvent::new(
            at(2),
            EventKind::ExecutionCompleted {
                status: RuntimeStatus::Failed,
                result: None,
                failure: Some(FailureDetails::new("Boom", "it broke")),
            },
        ),
    ];
    let rewound = keel_core::replay::rewind_history(&history);
    assert_eq!(rewound.len(), 6, "TaskScheduled B, TaskFailed B and ExecutionCompleted are gone: {rewound:?}");
    let result = Execution::new("i1", chain()).run_episode(&rewound, &[episode_start(3)]);
    assert_eq!(result.completion, None);
    assert_eq!(activity_names(&result.actions), vec![(1, "B".into())]);
}

proptest::proptest! {
    /// Feeding a history to one cached execution in two parts gives the same outcome as
    /// replaying it whole into a fresh one.
    #[test]
    fn replaying_a_prefix_then_the_rest_equals_replaying_the_whole(split in 0usize..12, fail_at in 0i32..4) {
        let mut history = vec![episode_start(0), started("Chain", "\"x\""), scheduled(0, "A")];
        for id in 0..3 {
            history.push(episode_start(i64::from(id) + 1));
            if id == fail_at {
                history.push(task_failed(id, "Boom"));
                break;
            }
            history.push(task_completed(id, "\"r\""));
            if id < 2 {
                history.push(scheduled(id + 1, ["A", "B", "C"][id as usize + 1]));
            }
        }
        // Episodes end after their actions are recorded: split where the next one starts.
        let boundaries: Vec<usize> = (1..=history.len())
            .filter(|&i| i == history.len() || history[i].kind == EventKind::OrchestratorStarted)
            .collect();
        let split = boundaries[split % boundaries.len()];
        let whole = Execution::new("i1", chain()).run_episode(&history, &[]);
        let mut parts = Execution::new("i1", chain());
        let first = parts.run_episode(&history[..split], &[]);
        let second = parts.run_episode(&history[split..], &[]);
        let completion = first.completion.or(second.completion);
        proptest::prop_assert_eq!(completion, whole.completion);
    }
}

// ---- entities ----

fn counter(key: &str) -> keel_core::entity::EntityId {
    keel_core::entity::EntityId::new("Counter", key).unwrap()
}

/// Calls `Counter@a` inside a critical section over `a` and `b`, then returns the sum
/// of the result and a later call made outside the section.
fn locked_calls() -> Orchestrator {
    orchestrator(|ctx: OrchestrationContext| async move {
        let section = ctx.lock_entities([&counter("b"), &counter("a")]).await?;
        let inside: i64 = ctx.call_entity(&counter("a"), "get", &()).await?;
        drop(section);
        let outside: i64 = ctx.call_entity(&counter("c"), "get", &()).await?;
        Ok(inside + outside)
    })
}

fn call_answer(request_id: &str, output: &str) -> HistoryEvent {
    HistoryEvent::new(
        at(1),
        EventKind::EntityOperationCompleted { request_id: request_id.into(), output: Some(output.into()) },
    )
}

#[test]
fn entity_calls_and_locks_resolve_by_request_and_section_ids_and_replay() {
    let mut execution = Execution::new("o", locked_calls());
    let first = execution.run_episode(&[], &[episode_start(0), started("Locked", "null")]);
    let [Action::LockEntities { id: 0, critical_section_id, lock_set, .. }] = first.actions.as_slice() else {
        panic!("one lock request: {:?}", first.actions)
    };
    assert_eq!(lock_set, &["@counter@a", "@counter@b"], "sorted");
    let section = critical_section_id.clone();
    let granted = HistoryEvent::new(
        at(1),
        EventKind::EntityLockGranted { critical_section_id: section.clone(), lock_set: lock_set.clone() },
    );
    let second = execution.run_episode(&[], &[episode_start(1), granted.clone()]);
    let [Action::CallEntity { id: 1, request_id, target, .. }] = second.actions.as_slice() else {
        panic!("one call: {:?}", second.actions)
    };
    assert_eq!(target, "@counter@a");
    let request = request_id.clone();
    let third = execution.run_episode(&[], &[episode_start(2), call_answer(&request, "40")]);
    let kinds: Vec<String> = third.actions.iter().map(Action::describe).collect();
    assert_eq!(
        kinds,
        [
            "EntityUnlockSent to @counter@a",
            "EntityUnlockSent to @counter@b",
            "EntityOperationCalled \"get\" on @counter@c"
        ]
    );
    let Action::CallEntity { request_id: outside, .. } = &third.actions[2] else { unreachable!() };
    let fourth = execution.run_episode(&[], &[episode_start(3), call_answer(outside, "2")]);
    assert_eq!(fourth.completion, Some(Completion::Completed { output: Some("42".into()) }));

    // The same history replayed into a fresh execution gives the same outcome.
    let mut history = vec![episode_start(0), started("Locked", "null")];
    history.extend(first.actions.iter().map(|action| action.to_history_event(at(0), None)));
    history.extend([episode_start(1), granted]);
    history.extend(second.actions.iter().map(|action| action.to_history_event(at(1), None)));
    history.extend([episode_start(2), call_answer(&request, "40")]);
    history.extend(third.actions.iter().map(|action| action.to_history_event(at(2), None)));
    let mut replayed = Execution::new("o", locked_calls());
    let result = replayed.run_episode(&history, &[episode_start(3), call_answer(outside, "2")]);
    assert_eq!(result.completion, Some(Completion::Completed { output: Some("42".into()) }));
    assert!(result.actions.is_empty(), "everything was in history: {:?}", result.actions);
}

#[test]
fn an_entity_failure_reaches_the_caller_and_a_late_grant_is_given_back() {
    let orchestrator = orchestrator(|ctx: OrchestrationContext| async move {
        match ctx.call_entity::<i64>(&counter("a"), "add", &"x").await {
            Err(error) => Ok(error.details.error_type),
            Ok(_) => Ok("no failure".to_string()),
        }
    });
    let mut execution = Execution::new("o", orchestrator);
    let first = execution.run_episode(&[], &[episode_start(0), started("Call", "null")]);
    let [Action::CallEntity { request_id, .. }] = first.actions.as_slice() else { panic!("{:?}", first.actions) };
    let failed = HistoryEvent::new(
        at(1),
        EventKind::EntityOperationFailed {
            request_id: request_id.clone(),
            failure: FailureDetails::new("InvalidInput", "not a number"),
        },
    );
    // A grant for a critical section this execution never asked for comes first.
    let stray = HistoryEvent::new(
        at(1),
        EventKind::EntityLockGranted { critical_section_id: "old".into(), lock_set: vec!["@counter@z".into()] },
    );
    let second = execution.run_episode(&[], &[episode_start(1), stray, failed]);
    assert_eq!(second.completion, Some(Completion::Completed { output: Some("\"InvalidInput\"".into()) }));
    let kinds: Vec<String> = second.actions.iter().map(Action::describe).collect();
    assert_eq!(kinds, ["EntityUnlockSent to @counter@z"], "the stray lock is released at once");
}

#[test]
fn a_changed_entity_call_is_non_determinism() {
    let history = [
        episode_start(0),
        started("Call", "null"),
        HistoryEvent::with_id(
            0,
            at(0),
            EventKind::EntityOperationCalled {
                trace: None,
                request_id: "r".into(),
                operation: "reset".into(),
                input: None,
                parent_instance_id: "o".into(),
                parent_execution_id: "exec-1".into(),
                target_instance_id: "@counter@a".into(),
            },
        ),
    ];
    let orchestrator = orchestrator(|ctx: OrchestrationContext| async move {
        Ok(ctx.call_entity::<i64>(&counter("a"), "get", &()).await?)
    });
    let mut execution = Execution::new("o", orchestrator);
    let result = execution.run_episode(&history, &[episode_start(1)]);
    let Some(Completion::Failed { failure }) = result.completion else { panic!("{:?}", result.completion) };
    assert_eq!(failure.error_type, NON_DETERMINISM_ERROR_TYPE);
    assert!(
        failure.error_message.contains("EntityOperationCalled \"reset\" on @counter@a"),
        "{}",
        failure.error_message
    );
}
