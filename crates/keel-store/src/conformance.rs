//! The conformance suite every [`Store`] backend must pass (feature `conformance`).
//!
//! Each check is a `pub async fn` that takes a fresh, empty store and asserts one area of
//! the contract; [`run_all`] runs every check, each on a new store. A backend can also
//! run them one by one (one test per check reads better when one fails):
//! [`for_each_check!`](crate::for_each_check) hands every check's name to a macro of the
//! backend's, so its tests cover each check without listing them.
//!
//! Time is simulated: every check passes `now` values counted from [`T0`] and never
//! sleeps. Timestamps have millisecond precision, which is what stores keep.

use std::future::Future;
use std::time::Duration;

use chrono::DateTime;
use keel_core::history::{EventKind, FailureDetails, HistoryEvent, ParentInstance, RuntimeStatus, Timestamp};
use keel_core::limits::MAX_PAYLOAD_BYTES;

use crate::{
    ActivityCompletion, ActivityItem, ActivityLease, ActivityLock, Backlog, DirectClaim, EntityQuery, EpisodeCommit,
    Error, HubStats, InstanceQuery, InstanceRecord, InstanceUpdate, Message, NewActivity, NewInstance,
    OrchestrationItem, PurgeFilter, Store,
};

/// The start of simulated time in every check: 2024-01-01T00:00:00Z, in milliseconds
/// since the epoch.
pub const T0: i64 = 1_704_067_200_000;

/// The lease the checks take on work items.
const LEASE: Duration = Duration::from_secs(30);

/// Enough to fetch everything there is in one call.
const FETCH_ALL: usize = 100;

/// `T0` plus `millis` milliseconds.
fn at(millis: i64) -> Timestamp {
    DateTime::from_timestamp_millis(T0 + millis).expect("simulated time is in range")
}

/// `T0` plus `seconds` seconds.
fn secs(seconds: i64) -> Timestamp {
    at(seconds * 1000)
}

/// Calls the macro `$callback` with the name of every check, in order:
/// `keel_store::for_each_check!(my_tests);` where `my_tests!` turns each name into a
/// test of the backend. A new check thus reaches every backend's tests by itself.
#[macro_export]
macro_rules! for_each_check {
    ($callback:ident) => {
        $callback!(
            create_and_get,
            create_refuses_a_live_duplicate,
            create_replaces_a_terminal_instance,
            enqueue_checks_the_target,
            fetch_leases_an_instance,
            fetch_respects_max_and_arrival_order,
            commit_applies_everything_at_once,
            future_messages_wait_until_visible,
            activities_are_leased_and_completed,
            activity_leases_expire_renew_and_abandon,
            direct_episodes_commit_a_step_once_or_change_nothing,
            abandoned_orchestrations_come_back,
            replace_history_starts_a_new_execution,
            new_instances_create_children_once,
            messages_to_unknown_instances_are_dropped,
            queries_filter_instances,
            queries_page_through_every_instance_once,
            purge_instance_removes_everything,
            purge_instances_by_filter,
            a_stale_commit_fails_alone_in_a_batch,
            oversized_payloads_are_refused,
            a_rewind_makes_a_failed_instance_pending,
            orchestration_leases_can_be_renewed,
            messages_to_entities_create_them,
            entity_queries_filter_and_page,
            only_empty_entities_are_removed,
            replace_instance_swaps_a_live_instance_atomically,
            replace_instance_refuses_an_instance_that_changed,
            purge_all_empties_the_task_hub,
            hub_stats_count_instances_entities_and_the_backlog,
        );
    };
}

macro_rules! checks {
    ($($check:ident),* $(,)?) => {
        /// The names of every check, in the order [`run_all`] runs them.
        pub const CHECK_NAMES: &[&str] = &[$(stringify!($check)),*];

        /// Runs every check, each on a new store from `make_store`. Panics on the first
        /// broken promise.
        pub async fn run_all<F, Fut, S>(make_store: F)
        where
            F: Fn() -> Fut,
            Fut: Future<Output = S>,
            S: Store,
        {
            $( $check(&make_store().await).await; )*
        }
    };
}

for_each_check!(checks);

// ---- helpers ----

/// A new instance with an input, no parent, starting at once.
fn new_instance(instance_id: &str, name: &str, created_at: Timestamp) -> NewInstance {
    NewInstance {
        instance_id: instance_id.to_owned(),
        execution_id: format!("{instance_id}-execution-1"),
        name: name.to_owned(),
        version: None,
        input: Some(format!("\"input of {instance_id}\"")),
        parent: None,
        scheduled_start: None,
        created_at,
        tags: Default::default(),
        trace: None,
    }
}

fn event_raised(name: &str, input: &str, timestamp: Timestamp) -> HistoryEvent {
    HistoryEvent::new(timestamp, EventKind::EventRaised { name: name.to_owned(), input: Some(input.to_owned()) })
}

fn message_to(instance_id: &str, event: HistoryEvent, visible_at: Timestamp) -> Message {
    Message { instance_id: instance_id.to_owned(), execution_id: None, event, visible_at }
}

fn activity(instance: &InstanceRecord, task_id: i32, name: &str) -> NewActivity {
    NewActivity {
        lease: None,
        instance_id: instance.instance_id.clone(),
        execution_id: instance.execution_id.clone(),
        task_id,
        name: name.to_owned(),
        input: Some(format!("\"input of task {task_id}\"")),
        trace: None,
    }
}

fn task_completed(item: &ActivityItem, timestamp: Timestamp) -> Message {
    Message {
        instance_id: item.instance_id.clone(),
        execution_id: Some(item.execution_id.clone()),
        event: HistoryEvent::new(
            timestamp,
            EventKind::TaskCompleted {
                task_scheduled_id: item.task_id,
                result: Some(format!("\"result of task {}\"", item.task_id)),
            },
        ),
        visible_at: timestamp,
    }
}

/// A commit that consumes every message of `item` and changes nothing else.
fn consume_all(item: &OrchestrationItem) -> EpisodeCommit {
    EpisodeCommit {
        direct: None,
        lock: item.lock.clone(),
        consumed: item.messages.iter().map(|stored| stored.id).collect(),
        replace_history: None,
        history: Vec::new(),
        state: None,
        activities: Vec::new(),
        messages: Vec::new(),
        new_instances: Vec::new(),
    }
}

/// The state an episode ending in `status` writes: the instance's input, an output for
/// `Completed`, failure details for `Failed`.
fn state(instance: &InstanceRecord, status: RuntimeStatus) -> InstanceUpdate {
    InstanceUpdate {
        status,
        version: instance.version.clone(),
        input: instance.input.clone(),
        output: (status == RuntimeStatus::Completed).then(|| "\"done\"".to_owned()),
        failure: (status == RuntimeStatus::Failed).then(|| FailureDetails::new("Boom", "the orchestrator failed")),
        custom_status: None,
    }
}

/// The first episode of the instance `item` holds: records `OrchestratorStarted` and
/// the `ExecutionStarted` it received, and leaves the instance in `status`.
fn first_episode(item: &OrchestrationItem, now: Timestamp, status: RuntimeStatus) -> EpisodeCommit {
    let started = item
        .messages
        .iter()
        .find(|stored| matches!(stored.message.event.kind, EventKind::ExecutionStarted { .. }))
        .expect("a new instance's first item carries its ExecutionStarted message");
    EpisodeCommit {
        history: vec![HistoryEvent::new(now, EventKind::OrchestratorStarted), started.message.event.clone()],
        state: Some(state(&item.instance, status)),
        ..consume_all(item)
    }
}

/// Fetches at `now` and expects exactly one item, for `instance_id`.
async fn fetch_only(store: &dyn Store, instance_id: &str, now: Timestamp) -> OrchestrationItem {
    let mut items = store.fetch_orchestration_items(FETCH_ALL, LEASE, now).await.expect("fetch_orchestration_items");
    let ids: Vec<&str> = items.iter().map(|item| item.lock.instance_id.as_str()).collect();
    assert_eq!(ids, [instance_id], "exactly '{instance_id}' has visible work at {now}");
    items.pop().expect("one item")
}

async fn assert_no_orchestration_work(store: &dyn Store, now: Timestamp, why: &str) {
    let items = store.fetch_orchestration_items(FETCH_ALL, LEASE, now).await.expect("fetch_orchestration_items");
    let ids: Vec<&str> = items.iter().map(|item| item.lock.instance_id.as_str()).collect();
    assert!(ids.is_empty(), "no orchestration work at {now} ({why}), but fetched {ids:?}");
}

async fn assert_no_activity_work(store: &dyn Store, now: Timestamp, why: &str) {
    let items = store.fetch_activity_items(FETCH_ALL, LEASE, now).await.expect("fetch_activity_items");
    assert!(items.is_empty(), "no activity work at {now} ({why}), but fetched {items:?}");
}

/// Commits one episode and expects it to succeed.
async fn commit_ok(store: &dyn Store, commit: EpisodeCommit, now: Timestamp) {
    let instance_id = commit.lock.instance_id.clone();
    let results = store.commit_episodes(vec![commit], now).await.expect("commit_episodes");
    assert_eq!(results.len(), 1, "one result per commit");
    if let Err(error) = &results[0] {
        panic!("the commit for '{instance_id}' failed: {error}");
    }
}

/// Creates `instance_id` at `now` and runs its first episode, leaving it in `status`.
/// No other instance may have visible work at `now`.
async fn start(store: &dyn Store, instance_id: &str, now: Timestamp, status: RuntimeStatus) -> InstanceRecord {
    store.create_instance(new_instance(instance_id, "Flow", now)).await.expect("create_instance");
    let item = fetch_only(store, instance_id, now).await;
    commit_ok(store, first_episode(&item, now, status), now).await;
    get(store, instance_id).await
}

async fn get(store: &dyn Store, instance_id: &str) -> InstanceRecord {
    store
        .get_instance(instance_id)
        .await
        .expect("get_instance")
        .unwrap_or_else(|| panic!("instance '{instance_id}' exists"))
}

async fn history(store: &dyn Store, instance_id: &str) -> Vec<HistoryEvent> {
    store.read_history(instance_id).await.expect("read_history")
}

async fn query_ids(store: &dyn Store, query: InstanceQuery) -> Vec<String> {
    let page = store.query_instances(&query).await.expect("query_instances");
    assert_eq!(page.continuation, None, "the whole result fits in one page: {query:?}");
    page.instances.into_iter().map(|instance| instance.instance_id).collect()
}

// ---- checks ----

/// A created instance reads back with every field as given, status `Pending`, no
/// history; its `ExecutionStarted` message is in its inbox.
pub async fn create_and_get(store: &dyn Store) {
    assert_eq!(store.get_instance("missing").await.expect("get_instance"), None, "unknown id");
    assert!(history(store, "missing").await.is_empty(), "an unknown instance has no history");

    let parent = ParentInstance {
        instance_id: "parent".into(),
        execution_id: "parent-execution".into(),
        name: "Parent".into(),
        task_scheduled_id: 4,
    };
    let tags: std::collections::BTreeMap<String, String> =
        [("team".to_string(), "payments".to_string()), ("ticket".to_string(), "T-17".to_string())].into();
    let created = NewInstance {
        version: Some("2.1".into()),
        parent: Some(parent.clone()),
        tags: tags.clone(),
        ..new_instance("order-17", "ProcessOrder", secs(0))
    };
    store.create_instance(created.clone()).await.expect("create_instance");

    let record = get(store, "order-17").await;
    let expected = InstanceRecord {
        instance_id: "order-17".into(),
        name: "ProcessOrder".into(),
        version: Some("2.1".into()),
        execution_id: created.execution_id.clone(),
        status: RuntimeStatus::Pending,
        input: created.input.clone(),
        output: None,
        custom_status: None,
        failure: None,
        parent: Some(parent),
        scheduled_start: None,
        created_at: secs(0),
        last_updated_at: secs(0),
        completed_at: None,
        history_len: 0,
        tags,
    };
    assert_eq!(record, expected, "the record of a new instance, its tags included");
    assert!(history(store, "order-17").await.is_empty(), "history starts with the first episode");

    let item = fetch_only(store, "order-17", secs(0)).await;
    assert_eq!(item.instance, expected, "the fetched item carries the instance record");
    assert_eq!(item.delivery_attempts, 1, "first delivery");
    assert_eq!(item.messages.len(), 1, "only the ExecutionStarted message");
    let started = &item.messages[0].message;
    assert_eq!(started.event, created.execution_started_event(), "the ExecutionStarted event");
    assert_eq!(started.execution_id.as_deref(), Some(created.execution_id.as_str()));
    assert_eq!(started.visible_at, secs(0), "visible at creation");
    assert_eq!(started.instance_id, "order-17");
}

/// Creating an id that a non-terminal instance holds fails and changes nothing.
pub async fn create_refuses_a_live_duplicate(store: &dyn Store) {
    store.create_instance(new_instance("a", "Flow", secs(0))).await.expect("create_instance");
    let again = NewInstance { execution_id: "other".into(), ..new_instance("a", "Flow", secs(1)) };
    let result = store.create_instance(again.clone()).await;
    assert!(
        matches!(&result, Err(Error::AlreadyExists { instance_id, status: RuntimeStatus::Pending }) if instance_id == "a"),
        "a pending instance is not replaced: {result:?}"
    );

    let item = fetch_only(store, "a", secs(1)).await;
    commit_ok(store, first_episode(&item, secs(1), RuntimeStatus::Running), secs(1)).await;
    let result = store.create_instance(again).await;
    assert!(
        matches!(result, Err(Error::AlreadyExists { status: RuntimeStatus::Running, .. })),
        "a running instance is not replaced: {result:?}"
    );
    let record = get(store, "a").await;
    assert_eq!(record.execution_id, "a-execution-1", "the original execution is untouched");
    assert_eq!(record.created_at, secs(0));
}

/// Creating an id that a terminal instance holds replaces it: its history, inbox and
/// activity items are gone.
pub async fn create_replaces_a_terminal_instance(store: &dyn Store) {
    store.create_instance(new_instance("a", "Flow", secs(0))).await.expect("create_instance");
    let item = fetch_only(store, "a", secs(0)).await;
    let mut commit = first_episode(&item, secs(0), RuntimeStatus::Completed);
    commit.activities = vec![activity(&item.instance, 0, "Leftover")];
    commit_ok(store, commit, secs(0)).await;
    store
        .enqueue_message(message_to("a", event_raised("late", "1", secs(1)), secs(1)), true)
        .await
        .expect("enqueue_message to a terminal instance with accept_terminal");
    assert_eq!(history(store, "a").await.len(), 2, "the first execution has a history");

    let replacement = NewInstance { execution_id: "a-execution-2".into(), ..new_instance("a", "Flow", secs(2)) };
    store.create_instance(replacement.clone()).await.expect("a terminal instance is replaced");

    let record = get(store, "a").await;
    assert_eq!(record.status, RuntimeStatus::Pending);
    assert_eq!(record.execution_id, "a-execution-2");
    assert_eq!(record.history_len, 0, "the old history is not counted");
    assert_eq!(record.output, None, "the old output is gone");
    assert_eq!(record.completed_at, None);
    assert_eq!(record.created_at, secs(2));
    assert!(history(store, "a").await.is_empty(), "the old history is deleted");

    let item = fetch_only(store, "a", secs(2)).await;
    let events: Vec<&HistoryEvent> = item.messages.iter().map(|stored| &stored.message.event).collect();
    assert_eq!(
        events,
        [&replacement.execution_started_event()],
        "the old inbox is deleted; only the new ExecutionStarted is there"
    );
    assert_no_activity_work(store, secs(100), "the old activity item is deleted").await;
}

/// `enqueue_message`: unknown instance, terminal instance with and without
/// `accept_terminal`.
pub async fn enqueue_checks_the_target(store: &dyn Store) {
    let result = store.enqueue_message(message_to("ghost", event_raised("e", "1", secs(0)), secs(0)), false).await;
    assert!(matches!(&result, Err(Error::NotFound(id)) if id == "ghost"), "unknown instance: {result:?}");

    store.create_instance(new_instance("a", "Flow", secs(0))).await.expect("create_instance");
    let status = store
        .enqueue_message(message_to("a", event_raised("e", "1", secs(0)), secs(0)), false)
        .await
        .expect("enqueue to a pending instance");
    assert_eq!(status, RuntimeStatus::Pending, "enqueue returns the instance's status");

    let item = fetch_only(store, "a", secs(0)).await;
    assert_eq!(item.messages.len(), 2, "ExecutionStarted and the event");
    commit_ok(store, first_episode(&item, secs(1), RuntimeStatus::Completed), secs(1)).await;

    let refused = message_to("a", event_raised("e", "2", secs(2)), secs(2));
    let result = store.enqueue_message(refused.clone(), false).await;
    assert!(
        matches!(&result, Err(Error::InvalidState { instance_id, status: RuntimeStatus::Completed, .. }) if instance_id == "a"),
        "a completed instance refuses events: {result:?}"
    );
    assert_no_orchestration_work(store, secs(2), "a refused event is not written").await;

    let status = store.enqueue_message(refused.clone(), true).await.expect("accept_terminal");
    assert_eq!(status, RuntimeStatus::Completed);
    let item = fetch_only(store, "a", secs(2)).await;
    assert_eq!(item.messages.len(), 1);
    assert_eq!(item.messages[0].message, refused, "the accepted message, as sent");
}

/// An `ExecutionRewound` message accepted for a failed instance sets it to Pending;
/// other messages leave a terminal instance's status alone.
pub async fn a_rewind_makes_a_failed_instance_pending(store: &dyn Store) {
    store.create_instance(new_instance("a", "Flow", secs(0))).await.expect("create_instance");
    let item = fetch_only(store, "a", secs(0)).await;
    commit_ok(store, first_episode(&item, secs(1), RuntimeStatus::Failed), secs(1)).await;
    let status = store
        .enqueue_message(message_to("a", event_raised("e", "1", secs(2)), secs(2)), true)
        .await
        .expect("accept_terminal");
    assert_eq!(status, RuntimeStatus::Failed);
    assert_eq!(get(store, "a").await.status, RuntimeStatus::Failed, "an event does not change the status");
    let rewind = HistoryEvent::new(secs(3), EventKind::ExecutionRewound { reason: Some("retry".into()) });
    let status = store.enqueue_message(message_to("a", rewind, secs(3)), true).await.expect("rewind accepted");
    assert_eq!(status, RuntimeStatus::Failed, "enqueue reports the status it found");
    let record = get(store, "a").await;
    assert_eq!(record.status, RuntimeStatus::Pending, "a rewound instance waits for its worker");
    assert_eq!(record.history_len, 2, "the history is kept for the replay");
}

/// A fetch locks an instance until its lease runs out; then another fetch takes it over
/// with a new token, and the first holder can neither commit nor abandon.
pub async fn fetch_leases_an_instance(store: &dyn Store) {
    store.create_instance(new_instance("a", "Flow", secs(0))).await.expect("create_instance");
    let first = fetch_only(store, "a", secs(0)).await;
    assert_eq!(first.delivery_attempts, 1);

    assert_no_orchestration_work(store, secs(10), "the instance is locked").await;
    assert_eq!(
        store.next_wakeup(secs(10)).await.expect("next_wakeup"),
        Some(secs(30)),
        "the lease of a locked instance with messages ends at 30 s"
    );

    let second = fetch_only(store, "a", secs(30)).await;
    assert_ne!(second.lock.token, first.lock.token, "a new lease has a new token");
    assert_eq!(second.delivery_attempts, 2, "the second delivery since the last commit");
    let ids = |item: &OrchestrationItem| item.messages.iter().map(|m| m.id).collect::<Vec<_>>();
    assert_eq!(ids(&second), ids(&first), "the same messages are delivered again");

    let stale = first_episode(&first, secs(31), RuntimeStatus::Running);
    let results = store.commit_episodes(vec![stale], secs(31)).await.expect("commit_episodes");
    assert!(matches!(results.as_slice(), [Err(Error::LeaseLost)]), "stale commit: {results:?}");
    assert!(history(store, "a").await.is_empty(), "a stale commit writes no history");
    let record = get(store, "a").await;
    assert_eq!(record.status, RuntimeStatus::Pending, "a stale commit does not change the state");
    assert_eq!(record.history_len, 0);
    let result = store.abandon_orchestration_item(&first.lock, secs(31)).await;
    assert!(matches!(result, Err(Error::LeaseLost)), "stale abandon: {result:?}");

    // The messages are still there: give the item back and fetch them a third time.
    store.abandon_orchestration_item(&second.lock, secs(31)).await.expect("abandon");
    let third = fetch_only(store, "a", secs(31)).await;
    assert_eq!(ids(&third), ids(&first), "a stale commit consumes nothing");
    assert_eq!(third.delivery_attempts, 2, "an abandoned delivery is given back: it does not count");

    commit_ok(store, first_episode(&third, secs(32), RuntimeStatus::Running), secs(32)).await;
    assert_eq!(history(store, "a").await.len(), 2);
    assert_no_orchestration_work(store, secs(100), "the messages were consumed").await;
    assert_eq!(store.next_wakeup(secs(32)).await.expect("next_wakeup"), None, "nothing pending");

    store
        .enqueue_message(message_to("a", event_raised("e", "1", secs(33)), secs(33)), false)
        .await
        .expect("enqueue_message");
    let next = fetch_only(store, "a", secs(33)).await;
    assert_eq!(next.delivery_attempts, 1, "a commit resets the delivery count");
}

/// A fetch takes at most `max` instances, the longest-waiting first, each with its
/// visible messages in arrival order.
pub async fn fetch_respects_max_and_arrival_order(store: &dyn Store) {
    for (offset, id) in ["a", "b", "c"].into_iter().enumerate() {
        store.create_instance(new_instance(id, "Flow", at(offset as i64))).await.expect("create_instance");
    }
    for n in 1..=3 {
        store
            .enqueue_message(message_to("a", event_raised("e", &n.to_string(), secs(1)), secs(1)), false)
            .await
            .expect("enqueue_message");
    }

    let first = store.fetch_orchestration_items(2, LEASE, secs(1)).await.expect("fetch");
    let mut ids: Vec<&str> = first.iter().map(|item| item.lock.instance_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["a", "b"], "max 2, the instances with the oldest messages");
    let second = store.fetch_orchestration_items(2, LEASE, secs(1)).await.expect("fetch");
    let ids: Vec<&str> = second.iter().map(|item| item.lock.instance_id.as_str()).collect();
    assert_eq!(ids, ["c"], "the rest");
    assert_no_orchestration_work(store, secs(1), "all three are locked").await;

    let a = first.iter().find(|item| item.lock.instance_id == "a").expect("a was fetched");
    let kinds: Vec<&str> = a.messages.iter().map(|m| m.message.event.kind.type_name()).collect();
    assert_eq!(kinds, ["ExecutionStarted", "EventRaised", "EventRaised", "EventRaised"]);
    let inputs: Vec<Option<&str>> = a.messages[1..]
        .iter()
        .map(|m| match &m.message.event.kind {
            EventKind::EventRaised { input, .. } => input.as_deref(),
            _ => None,
        })
        .collect();
    assert_eq!(inputs, [Some("1"), Some("2"), Some("3")], "events in the order they were sent");
    assert!(a.messages.windows(2).all(|pair| pair[0].id < pair[1].id), "message ids increase");
}

/// A commit appends history, updates the state, consumes exactly the listed messages,
/// adds activity items and messages, and counts the history, all at once.
pub async fn commit_applies_everything_at_once(store: &dyn Store) {
    store.create_instance(new_instance("a", "Flow", secs(0))).await.expect("create a");
    store.create_instance(new_instance("b", "Flow", secs(0))).await.expect("create b");
    let items = store.fetch_orchestration_items(FETCH_ALL, LEASE, secs(0)).await.expect("fetch");
    assert_eq!(items.len(), 2, "both instances have work");
    let a = items.iter().find(|item| item.lock.instance_id == "a").expect("a");
    let b = items.iter().find(|item| item.lock.instance_id == "b").expect("b");
    commit_ok(store, first_episode(b, secs(0), RuntimeStatus::Running), secs(0)).await;

    // Arrives while `a` is locked: not consumed by the episode that is running.
    let late = message_to("a", event_raised("late", "1", secs(1)), secs(1));
    store.enqueue_message(late.clone(), false).await.expect("enqueue while locked");

    let timer_at = secs(3600);
    let timer = Message {
        instance_id: "a".into(),
        execution_id: Some(a.instance.execution_id.clone()),
        event: HistoryEvent::new(timer_at, EventKind::TimerFired { timer_id: 1, fire_at: timer_at }),
        visible_at: timer_at,
    };
    let to_b = message_to("b", event_raised("from-a", "2", secs(2)), secs(2));
    let trace = keel_core::trace::TraceContext::parse(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        Some("vendor=value"),
    )
    .expect("a valid trace context");
    let mut commit = first_episode(a, secs(2), RuntimeStatus::Running);
    commit.history.extend([
        HistoryEvent::with_id(
            0,
            secs(2),
            EventKind::TaskScheduled {
                name: "Greet".into(),
                input: Some("\"x\"".into()),
                tags: [("team".to_string(), "payments".to_string())].into(),
                trace: Some(trace.clone()),
            },
        ),
        HistoryEvent::with_id(1, secs(2), EventKind::TimerCreated { fire_at: timer_at }),
    ]);
    commit.state =
        Some(InstanceUpdate { custom_status: Some("\"step 1\"".into()), ..state(&a.instance, RuntimeStatus::Running) });
    commit.activities = vec![NewActivity { trace: Some(trace.clone()), ..activity(&a.instance, 0, "Greet") }];
    commit.messages = vec![timer.clone(), to_b.clone()];
    let written_history = commit.history.clone();
    commit_ok(store, commit, secs(2)).await;

    assert_eq!(history(store, "a").await, written_history, "the history as committed");
    let record = get(store, "a").await;
    assert_eq!(record.status, RuntimeStatus::Running);
    assert_eq!(record.custom_status.as_deref(), Some("\"step 1\""));
    assert_eq!(record.history_len, 4, "history_len counts the events");
    assert_eq!(record.last_updated_at, secs(2), "last_updated_at is the commit's now");
    assert_eq!(record.completed_at, None, "a running instance is not completed");

    let activities = store.fetch_activity_items(FETCH_ALL, LEASE, secs(2)).await.expect("fetch activities");
    assert_eq!(activities.len(), 1, "the scheduled activity");
    let greet = &activities[0];
    assert_eq!(
        (greet.instance_id.as_str(), greet.execution_id.as_str(), greet.task_id, greet.name.as_str()),
        ("a", a.instance.execution_id.as_str(), 0, "Greet")
    );
    assert_eq!(greet.input.as_deref(), Some("\"input of task 0\""));
    assert_eq!(greet.delivery_attempts, 1);
    assert_eq!(greet.trace.as_ref(), Some(&trace), "the activity keeps its trace context");

    let items = store.fetch_orchestration_items(FETCH_ALL, LEASE, secs(2)).await.expect("fetch");
    assert_eq!(items.len(), 2, "a (late message) and b (message from a)");
    let a = items.iter().find(|item| item.lock.instance_id == "a").expect("a");
    let b = items.iter().find(|item| item.lock.instance_id == "b").expect("b");
    let a_messages: Vec<&Message> = a.messages.iter().map(|stored| &stored.message).collect();
    assert_eq!(a_messages, [&late], "the late message survived; the timer is not visible yet");
    let b_messages: Vec<&Message> = b.messages.iter().map(|stored| &stored.message).collect();
    assert_eq!(b_messages, [&to_b], "the message sent to b");
    assert_eq!(a.delivery_attempts, 1, "a commit resets the delivery count");

    // An episode with no new state leaves the row as it is, but counts its history.
    let mut commit = consume_all(b);
    commit.history = vec![event_raised("from-a", "2", secs(3))];
    commit_ok(store, commit, secs(3)).await;
    let record = get(store, "b").await;
    assert_eq!(record.status, RuntimeStatus::Running);
    assert_eq!(record.history_len, 3);
    assert_eq!(history(store, "b").await.len(), 3);

    // The final episode of a.
    let mut commit = consume_all(a);
    commit.history = vec![HistoryEvent::new(secs(4), EventKind::OrchestratorStarted), late.event.clone()];
    commit.state = Some(state(&a.instance, RuntimeStatus::Completed));
    commit_ok(store, commit, secs(4)).await;
    let record = get(store, "a").await;
    assert_eq!(record.status, RuntimeStatus::Completed);
    assert_eq!(record.output.as_deref(), Some("\"done\""));
    assert_eq!(record.custom_status, None, "the state is replaced as a whole");
    assert_eq!(record.completed_at, Some(secs(4)), "completed_at is the commit's now");
    assert_eq!(record.history_len, 6);
    let events = history(store, "a").await;
    assert_eq!(events.len(), 6);
    assert_eq!(&events[..4], written_history.as_slice(), "appending keeps the earlier events");
}

/// Messages that become visible later (scheduled starts, timers) are not fetched before
/// their time, and `next_wakeup` names that time.
pub async fn future_messages_wait_until_visible(store: &dyn Store) {
    assert_eq!(store.next_wakeup(secs(0)).await.expect("next_wakeup"), None, "an empty store");

    let scheduled = NewInstance { scheduled_start: Some(secs(60)), ..new_instance("a", "Flow", secs(0)) };
    store.create_instance(scheduled).await.expect("create_instance");
    assert_eq!(get(store, "a").await.scheduled_start, Some(secs(60)), "scheduled_start round-trips");
    assert_no_orchestration_work(store, secs(0), "the start is scheduled at 60 s").await;
    assert_eq!(store.next_wakeup(secs(0)).await.expect("next_wakeup"), Some(secs(60)));
    assert_no_orchestration_work(store, at(59_999), "one millisecond early").await;

    let item = fetch_only(store, "a", secs(60)).await;
    assert_eq!(item.messages[0].message.visible_at, secs(60));
    let timer = Message {
        instance_id: "a".into(),
        execution_id: Some(item.instance.execution_id.clone()),
        event: HistoryEvent::new(secs(120), EventKind::TimerFired { timer_id: 0, fire_at: secs(120) }),
        visible_at: secs(120),
    };
    let mut commit = first_episode(&item, secs(60), RuntimeStatus::Running);
    commit.messages = vec![timer.clone()];
    commit_ok(store, commit, secs(60)).await;

    assert_eq!(store.next_wakeup(secs(60)).await.expect("next_wakeup"), Some(secs(120)), "the timer");
    assert_no_orchestration_work(store, at(119_999), "the timer has not fired").await;
    let item = fetch_only(store, "a", secs(120)).await;
    let messages: Vec<&Message> = item.messages.iter().map(|stored| &stored.message).collect();
    assert_eq!(messages, [&timer], "the timer message, as committed");
}

/// An activity item is leased by one worker; completing it deletes it and puts the
/// result in the orchestration's inbox.
pub async fn activities_are_leased_and_completed(store: &dyn Store) {
    store.create_instance(new_instance("a", "Flow", secs(0))).await.expect("create_instance");
    let item = fetch_only(store, "a", secs(0)).await;
    let mut commit = first_episode(&item, secs(0), RuntimeStatus::Running);
    commit.activities = vec![activity(&item.instance, 0, "Greet")];
    commit_ok(store, commit, secs(0)).await;

    let leased = store.fetch_activity_items(FETCH_ALL, LEASE, secs(1)).await.expect("fetch activities");
    assert_eq!(leased.len(), 1);
    let greet = &leased[0];
    assert_eq!(greet.delivery_attempts, 1);
    assert_no_activity_work(store, secs(1), "the item is leased").await;

    let result = task_completed(greet, secs(2));
    let results = store
        .complete_activities(vec![ActivityCompletion { lock: greet.lock.clone(), result: result.clone() }])
        .await
        .expect("complete_activities");
    assert!(matches!(results.as_slice(), [Ok(())]), "completion: {results:?}");

    assert_no_activity_work(store, secs(1000), "a completed item is deleted").await;
    let item = fetch_only(store, "a", secs(2)).await;
    let messages: Vec<&Message> = item.messages.iter().map(|stored| &stored.message).collect();
    assert_eq!(messages, [&result], "the result is in the orchestration's inbox");
}

/// A direct episode ([`DirectClaim`]): an item created leased is not fetched, and the
/// episode that records its result commits only while the instance is as its worker
/// left it (unlocked, same history and status, empty inbox, the item still leased so),
/// deleting the item; any other claim fails with `LeaseLost` and writes nothing. A
/// store without direct episodes refuses both as invalid.
pub async fn direct_episodes_commit_a_step_once_or_change_nothing(store: &dyn Store) {
    store.create_instance(new_instance("a", "Flow", secs(0))).await.expect("create_instance");
    let item = fetch_only(store, "a", secs(0)).await;
    let mut commit = first_episode(&item, secs(0), RuntimeStatus::Running);
    let lease = ActivityLease { token: "token-of-the-worker".to_owned(), until: secs(10) };
    commit.activities = vec![NewActivity { lease: Some(lease.clone()), ..activity(&item.instance, 0, "Greet") }];
    if !store.direct_episodes() {
        let refused = store.commit_episodes(vec![commit], secs(0)).await;
        assert!(matches!(refused, Err(Error::Invalid(_))), "a leased item without direct episodes: {refused:?}");
        assert_eq!(store.read_history("a").await.expect("read_history"), [], "nothing was written");
        return;
    }
    let results = store.commit_episodes(vec![commit], secs(0)).await.expect("commit_episodes");
    let [Ok(committed)] = results.as_slice() else { panic!("the first episode: {results:?}") };
    let [id] = committed.leased_activity_ids.as_slice() else { panic!("one leased id: {committed:?}") };
    assert_no_activity_work(store, secs(9), "the item was created leased").await;
    let left = store.get_instance("a").await.expect("get_instance").expect("the instance");

    let greet = ActivityLock { id: *id, token: lease.token.clone() };
    let completed = HistoryEvent::new(
        secs(1),
        EventKind::TaskCompleted { task_scheduled_id: 0, result: Some("\"hello\"".to_owned()) },
    );
    let direct = |claim: DirectClaim| EpisodeCommit {
        direct: Some(claim),
        history: vec![HistoryEvent::new(secs(1), EventKind::OrchestratorStarted), completed.clone()],
        state: Some(state(&left, RuntimeStatus::Completed)),
        ..consume_all(&OrchestrationItem {
            lock: crate::OrchestrationLock { instance_id: "a".to_owned(), token: String::new() },
            instance: left.clone(),
            messages: Vec::new(),
            delivery_attempts: 1,
        })
    };
    let claim = DirectClaim {
        execution_id: left.execution_id.clone(),
        history_len: left.history_len,
        status: left.status,
        completed: vec![greet.clone()],
    };
    let refused = |claim: DirectClaim, why: &'static str| {
        let commit = direct(claim);
        async move {
            let results = store.commit_episodes(vec![commit], secs(1)).await.expect("commit_episodes");
            assert!(matches!(results.as_slice(), [Err(Error::LeaseLost)]), "{why}: {results:?}");
            let now = store.get_instance("a").await.expect("get_instance").expect("the instance");
            assert_eq!((now.status, now.history_len), (left.status, left.history_len), "{why}: nothing was written");
        }
    };
    refused(DirectClaim { history_len: left.history_len - 1, ..claim.clone() }, "another history length").await;
    refused(DirectClaim { status: RuntimeStatus::Pending, ..claim.clone() }, "another status").await;
    refused(DirectClaim { execution_id: "another".to_owned(), ..claim.clone() }, "another execution").await;
    let stolen = ActivityLock { token: "someone else's".to_owned(), ..greet.clone() };
    refused(DirectClaim { completed: vec![stolen], ..claim.clone() }, "an item leased to another").await;

    // A message in the inbox (an event raised meanwhile) must go first.
    let raised = message_to("a", event_raised("Approval", "true", secs(1)), secs(1));
    store.enqueue_message(raised, false).await.expect("enqueue_message");
    refused(claim.clone(), "a visible message").await;
    // Nor while a worker holds the instance to process that message.
    let locked = fetch_only(store, "a", secs(1)).await;
    refused(claim.clone(), "a locked instance").await;
    commit_ok(store, consume_all(&locked), secs(1)).await;
    let after_event = store.get_instance("a").await.expect("get_instance").expect("the instance");
    assert_eq!(after_event.history_len, left.history_len, "consuming the message appended nothing");

    commit_ok(store, direct(claim.clone()), secs(1)).await;
    let done = store.get_instance("a").await.expect("get_instance").expect("the instance");
    assert_eq!((done.status, done.history_len), (RuntimeStatus::Completed, left.history_len + 2));
    assert_eq!(store.read_history("a").await.expect("read_history").last(), Some(&completed));
    assert_no_activity_work(store, secs(1000), "the direct episode deleted the item").await;
    let results = store.commit_episodes(vec![direct(claim)], secs(2)).await.expect("commit_episodes");
    assert!(matches!(results.as_slice(), [Err(Error::LeaseLost)]), "the same claim again: {results:?}");
}

/// Activity leases run out and are taken over; a stale holder can neither complete,
/// renew nor abandon; renewing extends a lease; abandoning makes the item visible again
/// at the retry time.
pub async fn activity_leases_expire_renew_and_abandon(store: &dyn Store) {
    store.create_instance(new_instance("a", "Flow", secs(0))).await.expect("create_instance");
    let item = fetch_only(store, "a", secs(0)).await;
    let mut commit = first_episode(&item, secs(0), RuntimeStatus::Running);
    commit.activities = vec![activity(&item.instance, 0, "One"), activity(&item.instance, 1, "Two")];
    commit_ok(store, commit, secs(0)).await;

    let mut renewed = store.fetch_activity_items(1, LEASE, secs(0)).await.expect("fetch activities");
    assert_eq!(renewed.len(), 1, "max 1");
    let renewed = renewed.pop().expect("one item");
    let mut expiring = store.fetch_activity_items(1, LEASE, secs(0)).await.expect("fetch activities");
    assert_eq!(expiring.len(), 1, "the other item");
    let expiring = expiring.pop().expect("one item");
    assert_ne!(renewed.lock.id, expiring.lock.id);
    assert_no_activity_work(store, secs(0), "both items are leased").await;
    assert_eq!(store.next_wakeup(secs(0)).await.expect("next_wakeup"), Some(secs(30)), "leases end at 30 s");

    store.renew_activity_lease(&renewed.lock, LEASE, secs(20)).await.expect("renew");
    let mut taken_over = store.fetch_activity_items(FETCH_ALL, LEASE, secs(30)).await.expect("fetch");
    assert_eq!(taken_over.len(), 1, "only the item that was not renewed is visible again");
    let taken_over = taken_over.pop().expect("one item");
    assert_eq!(taken_over.lock.id, expiring.lock.id);
    assert_ne!(taken_over.lock.token, expiring.lock.token, "a new lease has a new token");
    assert_eq!(taken_over.delivery_attempts, 2);

    let stale = ActivityCompletion { lock: expiring.lock.clone(), result: task_completed(&expiring, secs(31)) };
    let results = store.complete_activities(vec![stale.clone()]).await.expect("complete_activities");
    assert!(matches!(results.as_slice(), [Err(Error::LeaseLost)]), "stale completion: {results:?}");
    let result = store.renew_activity_lease(&expiring.lock, LEASE, secs(31)).await;
    assert!(matches!(result, Err(Error::LeaseLost)), "stale renewal: {result:?}");
    let result = store.abandon_activity_item(&expiring.lock, secs(31)).await;
    assert!(matches!(result, Err(Error::LeaseLost)), "stale abandon: {result:?}");
    assert_no_orchestration_work(store, secs(31), "a stale completion delivers no result").await;

    store.abandon_activity_item(&renewed.lock, secs(40)).await.expect("abandon");
    assert_no_activity_work(store, secs(35), "the abandoned item waits until 40 s").await;
    assert_eq!(store.next_wakeup(secs(35)).await.expect("next_wakeup"), Some(secs(40)), "the retry time");
    let mut retried = store.fetch_activity_items(FETCH_ALL, LEASE, secs(40)).await.expect("fetch");
    assert_eq!(retried.len(), 1, "the abandoned item is back");
    let retried = retried.pop().expect("one item");
    assert_eq!(retried.lock.id, renewed.lock.id);
    assert_eq!(retried.delivery_attempts, 2);

    let results = store
        .complete_activities(vec![
            stale,
            ActivityCompletion { lock: taken_over.lock.clone(), result: task_completed(&taken_over, secs(41)) },
            ActivityCompletion { lock: retried.lock.clone(), result: task_completed(&retried, secs(41)) },
        ])
        .await
        .expect("complete_activities");
    assert!(
        matches!(results.as_slice(), [Err(Error::LeaseLost), Ok(()), Ok(())]),
        "a stale completion fails alone: {results:?}"
    );
    let item = fetch_only(store, "a", secs(41)).await;
    assert_eq!(item.messages.len(), 2, "both results arrived, the stale one not");
    assert_no_activity_work(store, secs(1000), "both items are done").await;
}

/// An abandoned orchestration item is unlocked and comes back at the retry time with its
/// messages and any that arrived meanwhile, in arrival order, without counting the
/// abandoned delivery; a commit resets the delivery count.
pub async fn abandoned_orchestrations_come_back(store: &dyn Store) {
    store.create_instance(new_instance("a", "Flow", secs(0))).await.expect("create_instance");
    let first = fetch_only(store, "a", secs(0)).await;
    store.abandon_orchestration_item(&first.lock, secs(10)).await.expect("abandon");
    assert_no_orchestration_work(store, secs(0), "the messages wait until the retry time").await;
    assert_eq!(store.next_wakeup(secs(0)).await.expect("next_wakeup"), Some(secs(10)));
    // A message that arrives meanwhile waits with them: it is never delivered ahead of
    // the messages given back (a resume overtaking its suspend, an event its start).
    let late = message_to("a", event_raised("late", "1", secs(1)), secs(1));
    store.enqueue_message(late.clone(), false).await.expect("enqueue_message");
    assert_no_orchestration_work(store, secs(5), "the instance, not only its old messages, waits").await;

    let second = fetch_only(store, "a", secs(10)).await;
    assert_eq!(second.delivery_attempts, 1, "the abandoned delivery was given back");
    assert_eq!(second.messages.len(), 2, "the given-back message and the late one");
    assert_eq!(second.messages[0].id, first.messages[0].id, "the same message, first");
    assert_eq!(second.messages[1].message, late, "then the one that arrived meanwhile");
    let result = store.abandon_orchestration_item(&first.lock, secs(10)).await;
    assert!(matches!(result, Err(Error::LeaseLost)), "abandon with a stale lock: {result:?}");

    // A commit without new state releases the lock and resets the count all the same.
    let mut commit = consume_all(&second);
    commit.history = vec![HistoryEvent::new(secs(11), EventKind::OrchestratorStarted)];
    commit_ok(store, commit, secs(11)).await;
    store
        .enqueue_message(message_to("a", event_raised("e", "1", secs(12)), secs(12)), false)
        .await
        .expect("enqueue_message");
    let third = fetch_only(store, "a", secs(12)).await;
    assert_eq!(third.delivery_attempts, 1, "a commit (with no new state) resets the delivery count");
}

/// Renewing an instance's lock keeps it from other workers past the original lease;
/// a stale lock cannot be renewed.
pub async fn orchestration_leases_can_be_renewed(store: &dyn Store) {
    store.create_instance(new_instance("a", "Flow", secs(0))).await.expect("create_instance");
    let first = fetch_only(store, "a", secs(0)).await; // leased until 30 s
    store.renew_orchestration_lease(&first.lock, LEASE, secs(20)).await.expect("renew"); // until 50 s
    assert_no_orchestration_work(store, secs(40), "the renewed lease still holds").await;
    let second = fetch_only(store, "a", secs(51)).await;
    assert_ne!(second.lock.token, first.lock.token, "a new holder, a new token");
    let result = store.renew_orchestration_lease(&first.lock, LEASE, secs(52)).await;
    assert!(matches!(result, Err(Error::LeaseLost)), "renewing a stale lock: {result:?}");
    store.renew_orchestration_lease(&second.lock, LEASE, secs(52)).await.expect("the holder renews");
    assert_no_orchestration_work(store, secs(70), "renewed by the new holder").await;
}

/// A commit with `replace_history` (continue-as-new) drops the old history and starts
/// the new execution id.
pub async fn replace_history_starts_a_new_execution(store: &dyn Store) {
    start(store, "a", secs(0), RuntimeStatus::Running).await;
    store
        .enqueue_message(message_to("a", event_raised("next", "1", secs(1)), secs(1)), false)
        .await
        .expect("enqueue_message");
    let item = fetch_only(store, "a", secs(1)).await;

    let new_execution = NewInstance {
        execution_id: "a-execution-2".into(),
        input: Some("\"second\"".into()),
        ..new_instance("a", "Flow", secs(1))
    };
    let new_history =
        vec![HistoryEvent::new(secs(1), EventKind::OrchestratorStarted), new_execution.execution_started_event()];
    let mut commit = consume_all(&item);
    commit.replace_history = Some("a-execution-2".into());
    commit.history = new_history.clone();
    commit.state =
        Some(InstanceUpdate { input: Some("\"second\"".into()), ..state(&item.instance, RuntimeStatus::Running) });
    commit_ok(store, commit, secs(1)).await;

    assert_eq!(history(store, "a").await, new_history, "only the new execution's history");
    let record = get(store, "a").await;
    assert_eq!(record.execution_id, "a-execution-2");
    assert_eq!(record.history_len, 2);
    assert_eq!(record.input.as_deref(), Some("\"second\""));

    store
        .enqueue_message(message_to("a", event_raised("more", "2", secs(2)), secs(2)), false)
        .await
        .expect("enqueue_message");
    let item = fetch_only(store, "a", secs(2)).await;
    assert_eq!(item.instance.execution_id, "a-execution-2");
    let mut commit = consume_all(&item);
    commit.history = vec![HistoryEvent::new(secs(2), EventKind::OrchestratorStarted)];
    commit_ok(store, commit, secs(2)).await;
    assert_eq!(get(store, "a").await.history_len, 3, "appending continues after the new history");
    assert_eq!(history(store, "a").await.len(), 3);
}

/// `new_instances` creates sub-orchestrations; an id held by a live instance is left
/// alone and the parent gets `SubOrchestrationInstanceFailed`; a terminal one is
/// replaced.
pub async fn new_instances_create_children_once(store: &dyn Store) {
    start(store, "done", secs(0), RuntimeStatus::Completed).await;
    let parent_record = start(store, "parent", secs(0), RuntimeStatus::Running).await;
    let busy = NewInstance { scheduled_start: Some(secs(86_400)), ..new_instance("busy", "Child", secs(0)) };
    store.create_instance(busy.clone()).await.expect("create busy");

    store
        .enqueue_message(message_to("parent", event_raised("go", "1", secs(1)), secs(1)), false)
        .await
        .expect("enqueue_message");
    let item = fetch_only(store, "parent", secs(1)).await;
    let child = |instance_id: &str, task_scheduled_id: i32| NewInstance {
        execution_id: format!("{instance_id}-from-parent"),
        parent: Some(ParentInstance {
            instance_id: "parent".into(),
            execution_id: parent_record.execution_id.clone(),
            name: "Flow".into(),
            task_scheduled_id,
        }),
        ..new_instance(instance_id, "Child", secs(1))
    };
    let (fresh, refused, replaced) = (child("fresh", 0), child("busy", 1), child("done", 2));
    let mut commit = consume_all(&item);
    commit.new_instances = vec![fresh.clone(), refused, replaced.clone()];
    commit_ok(store, commit, secs(1)).await;

    let record = get(store, "fresh").await;
    assert_eq!(record.status, RuntimeStatus::Pending, "a new child is pending");
    assert_eq!(record.execution_id, fresh.execution_id);
    assert_eq!(record.parent, fresh.parent, "the parent round-trips");

    let record = get(store, "busy").await;
    assert_eq!(record.execution_id, busy.execution_id, "a live instance is left alone");
    assert_eq!(record.scheduled_start, Some(secs(86_400)));

    let record = get(store, "done").await;
    assert_eq!(record.status, RuntimeStatus::Pending, "a terminal instance is replaced");
    assert_eq!(record.execution_id, replaced.execution_id);
    assert!(history(store, "done").await.is_empty(), "the replaced instance's history is gone");

    let items = store.fetch_orchestration_items(FETCH_ALL, LEASE, secs(1)).await.expect("fetch");
    let mut ids: Vec<&str> = items.iter().map(|item| item.lock.instance_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["done", "fresh", "parent"], "both children start; the parent hears of the refusal");
    let fresh_item = items.iter().find(|item| item.lock.instance_id == "fresh").expect("fresh");
    assert_eq!(fresh_item.messages.len(), 1);
    assert_eq!(fresh_item.messages[0].message.event, fresh.execution_started_event());

    let parent_item = items.iter().find(|item| item.lock.instance_id == "parent").expect("parent");
    assert_eq!(parent_item.messages.len(), 1, "one refusal");
    let refusal = &parent_item.messages[0].message;
    assert_eq!(refusal.execution_id.as_deref(), Some(parent_record.execution_id.as_str()));
    match &refusal.event.kind {
        EventKind::SubOrchestrationInstanceFailed { task_scheduled_id, failure } => {
            assert_eq!(*task_scheduled_id, 1, "names the parent's task for 'busy'");
            assert_eq!(failure.error_type, "InstanceAlreadyExists");
        }
        other => panic!("expected SubOrchestrationInstanceFailed, got {other:?}"),
    }
}

/// Messages to instances that do not exist (from commits and activity results) are
/// dropped, not kept for an instance that may be created later.
pub async fn messages_to_unknown_instances_are_dropped(store: &dyn Store) {
    store.create_instance(new_instance("a", "Flow", secs(0))).await.expect("create_instance");
    let item = fetch_only(store, "a", secs(0)).await;
    let mut commit = first_episode(&item, secs(0), RuntimeStatus::Running);
    commit.activities = vec![activity(&item.instance, 0, "Greet")];
    commit.messages = vec![message_to("ghost", event_raised("e", "1", secs(0)), secs(0))];
    commit_ok(store, commit, secs(0)).await;

    let mut leased = store.fetch_activity_items(FETCH_ALL, LEASE, secs(1)).await.expect("fetch activities");
    let greet = leased.pop().expect("the activity");
    let result = Message { instance_id: "ghost".into(), ..task_completed(&greet, secs(1)) };
    let results = store
        .complete_activities(vec![ActivityCompletion { lock: greet.lock.clone(), result }])
        .await
        .expect("complete_activities");
    assert!(matches!(results.as_slice(), [Ok(())]), "the completion succeeds: {results:?}");
    assert_no_activity_work(store, secs(1000), "the item is deleted").await;
    assert_no_orchestration_work(store, secs(1), "no inbox got the dropped messages").await;

    store.create_instance(new_instance("ghost", "Flow", secs(2))).await.expect("create ghost");
    let item = fetch_only(store, "ghost", secs(2)).await;
    let kinds: Vec<&str> = item.messages.iter().map(|m| m.message.event.kind.type_name()).collect();
    assert_eq!(kinds, ["ExecutionStarted"], "nothing was kept for the instance before it existed");
}

/// Query filters: status, instance id prefix, name prefix, creation time range.
pub async fn queries_filter_instances(store: &dyn Store) {
    start(store, "order-1", secs(0), RuntimeStatus::Completed).await;
    start(store, "order-2", secs(1), RuntimeStatus::Running).await;
    start(store, "user-1", secs(3), RuntimeStatus::Failed).await;
    store.create_instance(new_instance("order-3", "OrderAudit", secs(2))).await.expect("create_instance");

    let all = store.query_instances(&InstanceQuery::default()).await.expect("query_instances");
    let ids: Vec<&str> = all.instances.iter().map(|i| i.instance_id.as_str()).collect();
    assert_eq!(ids, ["order-1", "order-2", "order-3", "user-1"], "all, ordered by instance id");
    assert_eq!(all.continuation, None);
    let failed = all.instances.iter().find(|i| i.instance_id == "user-1").expect("user-1");
    assert_eq!(failed.failure, Some(FailureDetails::new("Boom", "the orchestrator failed")), "failure round-trips");
    let completed = &all.instances[0];
    assert_eq!(completed.output.as_deref(), Some("\"done\""));
    assert_eq!(completed.completed_at, Some(secs(0)));

    let statuses =
        InstanceQuery { statuses: vec![RuntimeStatus::Running, RuntimeStatus::Pending], ..InstanceQuery::default() };
    assert_eq!(query_ids(store, statuses).await, ["order-2", "order-3"], "by status");
    let id_prefix = InstanceQuery { instance_id_prefix: Some("order-".into()), ..InstanceQuery::default() };
    assert_eq!(query_ids(store, id_prefix).await, ["order-1", "order-2", "order-3"], "by id prefix");
    let name_prefix = InstanceQuery { name_prefix: Some("Order".into()), ..InstanceQuery::default() };
    assert_eq!(query_ids(store, name_prefix).await, ["order-3"], "by name prefix (case-sensitive)");
    let name_prefix = InstanceQuery { name_prefix: Some("Fl".into()), ..InstanceQuery::default() };
    assert_eq!(query_ids(store, name_prefix).await, ["order-1", "order-2", "user-1"], "by name prefix");
    let created = InstanceQuery { created_from: Some(secs(1)), created_to: Some(secs(3)), ..InstanceQuery::default() };
    assert_eq!(query_ids(store, created).await, ["order-2", "order-3"], "created_to is exclusive");
    let combined = InstanceQuery {
        statuses: vec![RuntimeStatus::Completed, RuntimeStatus::Failed],
        instance_id_prefix: Some("order-".into()),
        ..InstanceQuery::default()
    };
    assert_eq!(query_ids(store, combined).await, ["order-1"], "filters combine");
    let nothing = InstanceQuery { instance_id_prefix: Some("zzz".into()), ..InstanceQuery::default() };
    assert!(query_ids(store, nothing).await.is_empty(), "no match");
}

/// Paging with continuations returns every instance exactly once, in id order.
pub async fn queries_page_through_every_instance_once(store: &dyn Store) {
    let mut expected: Vec<String> = (0..25).map(|n| format!("i-{n:02}")).collect();
    for (n, id) in expected.iter().rev().enumerate() {
        store.create_instance(new_instance(id, "Flow", at(n as i64))).await.expect("create_instance");
    }
    expected.sort();

    let mut seen = Vec::new();
    let mut page_sizes = Vec::new();
    let mut query = InstanceQuery { page_size: 10, ..InstanceQuery::default() };
    loop {
        let page = store.query_instances(&query).await.expect("query_instances");
        page_sizes.push(page.instances.len());
        seen.extend(page.instances.into_iter().map(|instance| instance.instance_id));
        match page.continuation {
            Some(continuation) => query.continuation = Some(continuation),
            None => break,
        }
        assert!(page_sizes.len() <= 10, "paging ends");
    }
    assert_eq!(seen, expected, "every instance exactly once, in id order");
    assert_eq!(page_sizes.last(), Some(&5), "the last page holds the rest");
    assert!(page_sizes.iter().all(|&size| size <= 10), "pages respect page_size: {page_sizes:?}");

    let default_page = store.query_instances(&InstanceQuery::default()).await.expect("query_instances");
    assert_eq!(default_page.instances.len(), 25, "page_size 0 means the default (100)");
    assert_eq!(default_page.continuation, None);

    let mut seen = Vec::new();
    let mut query = InstanceQuery { page_size: 4, instance_id_prefix: Some("i-1".into()), ..InstanceQuery::default() };
    loop {
        let page = store.query_instances(&query).await.expect("query_instances");
        seen.extend(page.instances.into_iter().map(|instance| instance.instance_id));
        match page.continuation {
            Some(continuation) => query.continuation = Some(continuation),
            None => break,
        }
        assert!(seen.len() <= 25, "paging ends");
    }
    let expected: Vec<String> = (10..20).map(|n| format!("i-{n}")).collect();
    assert_eq!(seen, expected, "paging keeps the filter");
}

/// `purge_instance` deletes a terminal instance with its history, inbox and activity
/// items; refuses a live one; reports an unknown one.
pub async fn purge_instance_removes_everything(store: &dyn Store) {
    assert!(!store.purge_instance("missing").await.expect("purge_instance"), "unknown id");

    start(store, "running", secs(0), RuntimeStatus::Running).await;
    let result = store.purge_instance("running").await;
    assert!(
        matches!(result, Err(Error::InvalidState { status: RuntimeStatus::Running, .. })),
        "a running instance is not purged: {result:?}"
    );
    assert!(store.get_instance("running").await.expect("get_instance").is_some());

    store.create_instance(new_instance("done", "Flow", secs(1))).await.expect("create_instance");
    let item = fetch_only(store, "done", secs(1)).await;
    let mut commit = first_episode(&item, secs(1), RuntimeStatus::Completed);
    commit.activities = vec![activity(&item.instance, 0, "Leftover")];
    commit_ok(store, commit, secs(1)).await;
    store
        .enqueue_message(message_to("done", event_raised("late", "1", secs(2)), secs(2)), true)
        .await
        .expect("enqueue_message");

    assert!(store.purge_instance("done").await.expect("purge_instance"), "a completed instance is purged");
    assert_eq!(store.get_instance("done").await.expect("get_instance"), None);
    assert!(history(store, "done").await.is_empty(), "its history is gone");
    assert_no_orchestration_work(store, secs(2), "its inbox is gone").await;
    assert_no_activity_work(store, secs(2), "its activity items are gone").await;
    let result = store.enqueue_message(message_to("done", event_raised("e", "1", secs(3)), secs(3)), true).await;
    assert!(matches!(result, Err(Error::NotFound(_))), "a purged instance is unknown: {result:?}");
    assert!(!store.purge_instance("done").await.expect("purge_instance"), "purging twice");
}

/// `purge_instances` deletes only terminal instances, filtered by status and creation
/// time.
pub async fn purge_instances_by_filter(store: &dyn Store) {
    start(store, "c1", secs(0), RuntimeStatus::Completed).await;
    start(store, "f1", secs(1), RuntimeStatus::Failed).await;
    start(store, "t1", secs(2), RuntimeStatus::Terminated).await;
    start(store, "r1", secs(3), RuntimeStatus::Running).await;
    start(store, "c2", secs(4), RuntimeStatus::Completed).await;

    let running = PurgeFilter { statuses: vec![RuntimeStatus::Running], ..PurgeFilter::default() };
    assert_eq!(store.purge_instances(&running).await.expect("purge_instances"), 0, "never a live instance");

    let by_time = PurgeFilter { created_from: Some(secs(1)), created_to: Some(secs(4)), ..PurgeFilter::default() };
    assert_eq!(store.purge_instances(&by_time).await.expect("purge_instances"), 2, "f1 and t1");
    let completed = PurgeFilter { statuses: vec![RuntimeStatus::Completed], ..PurgeFilter::default() };
    assert_eq!(store.purge_instances(&completed).await.expect("purge_instances"), 2, "c1 and c2");

    assert_eq!(query_ids(store, InstanceQuery::default()).await, ["r1"], "only the running one is left");
    assert!(history(store, "c1").await.is_empty(), "a purged instance's history is gone");
    assert_eq!(history(store, "r1").await.len(), 2, "the running instance keeps its history");
    assert_eq!(store.purge_instances(&PurgeFilter::default()).await.expect("purge_instances"), 0);
}

/// In a batch, a commit with a stale lock fails alone; the others, before and after it,
/// are committed.
pub async fn a_stale_commit_fails_alone_in_a_batch(store: &dyn Store) {
    store.create_instance(new_instance("a", "Flow", secs(0))).await.expect("create a");
    let stale = fetch_only(store, "a", secs(0)).await;
    let current = fetch_only(store, "a", secs(30)).await;
    store.create_instance(new_instance("b", "Flow", secs(30))).await.expect("create b");
    let b = fetch_only(store, "b", secs(30)).await;

    let mut stale_commit = first_episode(&stale, secs(31), RuntimeStatus::Failed);
    stale_commit.activities = vec![activity(&stale.instance, 0, "Stale")];
    let results = store
        .commit_episodes(
            vec![
                first_episode(&b, secs(31), RuntimeStatus::Running),
                stale_commit,
                first_episode(&current, secs(31), RuntimeStatus::Running),
            ],
            secs(31),
        )
        .await
        .expect("commit_episodes");
    assert!(
        matches!(results.as_slice(), [Ok(_), Err(Error::LeaseLost), Ok(_)]),
        "one result per commit, in order: {results:?}"
    );
    assert_eq!(history(store, "a").await.len(), 2, "only the current holder's history");
    assert_eq!(get(store, "a").await.status, RuntimeStatus::Running, "the stale state is not written");
    assert_eq!(history(store, "b").await.len(), 2);
    assert_eq!(get(store, "b").await.status, RuntimeStatus::Running);
    assert_no_activity_work(store, secs(31), "the stale commit's activity is not written").await;
}

/// Payloads over [`MAX_PAYLOAD_BYTES`] are refused with [`Error::Invalid`] and nothing is
/// written; a payload at the limit is fine.
pub async fn oversized_payloads_are_refused(store: &dyn Store) {
    let too_big = "x".repeat(MAX_PAYLOAD_BYTES + 1);
    let instance = NewInstance { input: Some(too_big.clone()), ..new_instance("big", "Flow", secs(0)) };
    let result = store.create_instance(instance).await;
    assert!(matches!(result, Err(Error::Invalid(_))), "an oversized input: {result:?}");
    assert_eq!(store.get_instance("big").await.expect("get_instance"), None, "nothing created");

    store.create_instance(new_instance("a", "Flow", secs(0))).await.expect("create_instance");
    let result = store.enqueue_message(message_to("a", event_raised("e", &too_big, secs(0)), secs(0)), false).await;
    assert!(matches!(result, Err(Error::Invalid(_))), "oversized event data: {result:?}");
    let at_limit = "x".repeat(MAX_PAYLOAD_BYTES);
    store
        .enqueue_message(message_to("a", event_raised("e", &at_limit, secs(0)), secs(0)), false)
        .await
        .expect("a payload at the limit is accepted");
    let item = fetch_only(store, "a", secs(0)).await;
    assert_eq!(item.messages.len(), 2, "ExecutionStarted and the event at the limit, not the oversized one");
}

fn entity_signal(entity: &str, operation: &str, timestamp: Timestamp) -> HistoryEvent {
    HistoryEvent::new(
        timestamp,
        EventKind::EntityOperationSignaled {
            request_id: format!("{entity}-{operation}"),
            operation: operation.to_owned(),
            input: Some("1".to_owned()),
            scheduled_time: None,
            target_instance_id: entity.to_owned(),
            trace: None,
        },
    )
}

/// The commit of an entity batch: consumes the item, leaves `state` as the entity's state.
fn entity_batch(item: &OrchestrationItem, state: Option<&str>) -> EpisodeCommit {
    EpisodeCommit {
        direct: None,
        state: Some(InstanceUpdate {
            status: RuntimeStatus::Running,
            version: None,
            input: None,
            output: state.map(str::to_owned),
            failure: None,
            custom_status: None,
        }),
        ..consume_all(item)
    }
}

async fn entity_ids(store: &dyn Store, query: EntityQuery) -> Vec<String> {
    let page = store.query_entities(&query).await.expect("query_entities");
    assert_eq!(page.continuation, None, "the whole result fits in one page: {query:?}");
    page.instances.into_iter().map(|instance| instance.instance_id).collect()
}

/// A message to an entity creates its row (from a client and from a commit); entity
/// rows are work like instances, and instance queries leave them out.
pub async fn messages_to_entities_create_them(store: &dyn Store) {
    let status = store
        .enqueue_message(message_to("@counter@a", entity_signal("@counter@a", "add", secs(0)), secs(0)), false)
        .await
        .expect("a signal to a new entity is accepted");
    assert_eq!(status, RuntimeStatus::Running);
    let entity = get(store, "@counter@a").await;
    assert_eq!((entity.name.as_str(), entity.status, entity.history_len), ("counter", RuntimeStatus::Running, 0));
    assert_eq!((entity.created_at, entity.output.as_deref()), (secs(0), None), "created, with no state yet");

    let item = fetch_only(store, "@counter@a", secs(0)).await;
    assert_eq!(item.messages.len(), 1);
    let mut commit = entity_batch(&item, Some("1"));
    commit.messages = vec![message_to("@counter@b", entity_signal("@counter@b", "add", secs(1)), secs(5))];
    commit_ok(store, commit, secs(1)).await;
    let entity = get(store, "@counter@a").await;
    assert_eq!((entity.output.as_deref(), entity.last_updated_at), (Some("1"), secs(1)), "the batch's state");
    assert!(get(store, "@counter@b").await.output.is_none(), "a commit's message created the other entity");
    assert_no_orchestration_work(store, secs(4), "the signal to b is scheduled").await;
    fetch_only(store, "@counter@b", secs(5)).await;

    let bad = message_to("@no-key", entity_signal("@no-key", "add", secs(6)), secs(6));
    assert!(matches!(store.enqueue_message(bad, false).await, Err(Error::NotFound(_))), "not an entity id");
    start(store, "order", secs(7), RuntimeStatus::Running).await;
    assert_eq!(query_ids(store, InstanceQuery::default()).await, ["order"], "instance queries list no entity");
}

/// Entity queries: id prefix, last-modified range, with or without stateless ones, paging.
pub async fn entity_queries_filter_and_page(store: &dyn Store) {
    start(store, "not-an-entity", secs(0), RuntimeStatus::Running).await;
    let ids = ["@account@x", "@counter@a", "@counter@b", "@counter@c"];
    for (n, id) in ids.iter().enumerate() {
        let sent = secs(n as i64 + 1);
        store.enqueue_message(message_to(id, entity_signal(id, "add", sent), sent), false).await.expect("signal");
        let item = fetch_only(store, id, sent).await;
        let state = (*id != "@counter@c").then_some("7");
        commit_ok(store, entity_batch(&item, state), sent).await;
    }
    assert_eq!(entity_ids(store, EntityQuery::default()).await, ids[..3], "entities with state, by id");
    let all = EntityQuery { include_transient: true, ..EntityQuery::default() };
    assert_eq!(entity_ids(store, all).await, ids, "stateless ones too");
    let counters = EntityQuery { instance_id_prefix: Some("@counter@".into()), ..EntityQuery::default() };
    assert_eq!(entity_ids(store, counters).await, ["@counter@a", "@counter@b"], "by prefix");
    let outside = EntityQuery { instance_id_prefix: Some("not-".into()), ..EntityQuery::default() };
    assert!(entity_ids(store, outside).await.is_empty(), "a prefix never reaches instances");
    let modified =
        EntityQuery { last_modified_from: Some(secs(2)), last_modified_to: Some(secs(3)), ..EntityQuery::default() };
    assert_eq!(entity_ids(store, modified).await, ["@counter@a"], "last_modified_to is exclusive");

    let mut seen = Vec::new();
    let mut query = EntityQuery { include_transient: true, page_size: 3, ..EntityQuery::default() };
    loop {
        let page = store.query_entities(&query).await.expect("query_entities");
        assert!(page.instances.len() <= 3, "pages hold at most page_size");
        seen.extend(page.instances.into_iter().map(|instance| instance.instance_id));
        match page.continuation {
            Some(token) => query.continuation = Some(token),
            None => break,
        }
    }
    assert_eq!(seen, ids, "every entity once, in order");
}

/// Only an entity that holds nothing (no state, no scheduler, no inbox, no lease) is
/// removed; orchestration instances never are.
pub async fn only_empty_entities_are_removed(store: &dyn Store) {
    start(store, "order", secs(0), RuntimeStatus::Completed).await;
    assert!(!store.remove_empty_entity("order", secs(1)).await.expect("remove"), "not an entity");
    assert!(!store.remove_empty_entity("@counter@none", secs(1)).await.expect("remove"), "no such entity");

    let signal = |id: &str, at| message_to(id, entity_signal(id, "add", at), at);
    store.enqueue_message(signal("@counter@a", secs(1)), false).await.expect("signal");
    assert!(!store.remove_empty_entity("@counter@a", secs(1)).await.expect("remove"), "a message waits");
    let item = fetch_only(store, "@counter@a", secs(1)).await;
    commit_ok(store, entity_batch(&item, Some("3")), secs(1)).await;
    assert!(!store.remove_empty_entity("@counter@a", secs(2)).await.expect("remove"), "it has state");

    store.enqueue_message(signal("@counter@a", secs(3)), false).await.expect("signal");
    let item = fetch_only(store, "@counter@a", secs(3)).await;
    assert!(!store.remove_empty_entity("@counter@a", secs(3)).await.expect("remove"), "a worker holds it");
    let mut commit = entity_batch(&item, None);
    commit.state.as_mut().expect("a state").input = Some("{\"queue\":[]}".into());
    commit_ok(store, commit, secs(3)).await;
    assert!(!store.remove_empty_entity("@counter@a", secs(4)).await.expect("remove"), "its scheduler holds something");

    store.enqueue_message(signal("@counter@a", secs(5)), false).await.expect("signal");
    let item = fetch_only(store, "@counter@a", secs(5)).await;
    commit_ok(store, entity_batch(&item, None), secs(5)).await;
    assert!(store.remove_empty_entity("@counter@a", secs(6)).await.expect("remove"), "deleted and idle");
    assert_eq!(store.get_instance("@counter@a").await.expect("get_instance"), None);
    assert_eq!(get(store, "order").await.status, RuntimeStatus::Completed);
}

/// `replace_instance` deletes a running instance with its history, inbox and activity
/// items and creates the new one with the given messages, in one step; tags and all.
pub async fn replace_instance_swaps_a_live_instance_atomically(store: &dyn Store) {
    start(store, "parent", secs(0), RuntimeStatus::Running).await;
    store.create_instance(new_instance("a", "Flow", secs(0))).await.expect("create_instance");
    let item = fetch_only(store, "a", secs(0)).await;
    let mut commit = first_episode(&item, secs(0), RuntimeStatus::Running);
    commit.activities = vec![activity(&item.instance, 1, "Leftover")];
    commit_ok(store, commit, secs(0)).await;
    store.enqueue_message(message_to("a", event_raised("late", "1", secs(1)), secs(1)), false).await.expect("enqueue");
    let running = get(store, "a").await;
    assert_eq!(running.status, RuntimeStatus::Running);

    let tags: std::collections::BTreeMap<String, String> = [("k".to_string(), "v".to_string())].into();
    let replacement =
        NewInstance { execution_id: "a-execution-2".into(), tags: tags.clone(), ..new_instance("a", "Flow", secs(2)) };
    let notice = message_to("parent", event_raised("replaced", "\"a\"", secs(2)), secs(2));
    store.replace_instance(replacement.clone(), &running, vec![notice.clone()]).await.expect("replace_instance");

    let record = get(store, "a").await;
    assert_eq!((record.status, record.execution_id.as_str()), (RuntimeStatus::Pending, "a-execution-2"));
    assert_eq!((record.history_len, record.tags), (0, tags), "a new row, with its tags");
    assert!(history(store, "a").await.is_empty(), "the old history is deleted");
    let items = store.fetch_orchestration_items(FETCH_ALL, LEASE, secs(2)).await.expect("fetch_orchestration_items");
    let inbox = |instance_id: &str| -> Vec<HistoryEvent> {
        let item = items.iter().find(|item| item.lock.instance_id == instance_id).expect("work for it");
        item.messages.iter().map(|stored| stored.message.event.clone()).collect()
    };
    assert_eq!(inbox("a"), [replacement.execution_started_event()], "the old inbox is deleted");
    assert_eq!(inbox("parent"), [notice.event], "the messages are written with the replacement");
    assert_no_activity_work(store, secs(100), "the old activity item is deleted").await;
}

/// `replace_instance` of an instance that changed since it was read (more history,
/// another execution) or is gone fails and writes nothing.
pub async fn replace_instance_refuses_an_instance_that_changed(store: &dyn Store) {
    store.create_instance(new_instance("a", "Flow", secs(0))).await.expect("create_instance");
    let read = get(store, "a").await;
    let item = fetch_only(store, "a", secs(0)).await;
    commit_ok(store, first_episode(&item, secs(0), RuntimeStatus::Running), secs(0)).await;
    let replacement = NewInstance { execution_id: "a-execution-2".into(), ..new_instance("a", "Flow", secs(1)) };
    let notice = message_to("a", event_raised("never", "1", secs(1)), secs(1));
    let result = store.replace_instance(replacement.clone(), &read, vec![notice]).await;
    assert!(matches!(result, Err(Error::InvalidState { .. })), "the instance changed since it was read: {result:?}");
    let record = get(store, "a").await;
    assert_eq!((record.execution_id.as_str(), record.status), ("a-execution-1", RuntimeStatus::Running));
    assert_no_orchestration_work(store, secs(10), "nothing was written").await;

    let mut gone = read.clone();
    gone.instance_id = "ghost".into();
    let ghost = NewInstance { instance_id: "ghost".into(), ..replacement };
    let result = store.replace_instance(ghost, &gone, Vec::new()).await;
    assert!(matches!(result, Err(Error::InvalidState { .. })), "no such instance: {result:?}");
    assert!(store.get_instance("ghost").await.expect("get_instance").is_none());
}

/// `purge_all` deletes every instance and entity, running or not, with all they hold.
pub async fn purge_all_empties_the_task_hub(store: &dyn Store) {
    start(store, "done", secs(0), RuntimeStatus::Completed).await;
    let running = start(store, "running", secs(0), RuntimeStatus::Running).await;
    store.create_instance(new_instance("pending", "Flow", secs(0))).await.expect("create_instance");
    let item = fetch_only(store, "pending", secs(0)).await; // leased: the lease goes too
    store
        .enqueue_message(message_to("@counter@k", entity_signal("@counter@k", "add", secs(0)), secs(0)), false)
        .await
        .expect("signal");
    assert_eq!(running.status, RuntimeStatus::Running);
    assert_eq!(store.purge_all().await.expect("purge_all"), 4);
    for id in ["done", "running", "pending", "@counter@k"] {
        assert!(store.get_instance(id).await.expect("get_instance").is_none(), "{id} is gone");
    }
    assert!(history(store, "running").await.is_empty());
    assert_no_orchestration_work(store, secs(100), "no inbox is left").await;
    assert_no_activity_work(store, secs(100), "no activity is left").await;
    let commit = first_episode(&item, secs(1), RuntimeStatus::Running);
    let results = store.commit_episodes(vec![commit], secs(1)).await.expect("commit_episodes");
    assert!(results[0].is_err(), "a lease on a purged instance commits nothing");
    assert_eq!(store.purge_all().await.expect("purge_all"), 0);
}

async fn stats(store: &dyn Store, now: Timestamp) -> HubStats {
    store.hub_stats(now).await.expect("hub_stats")
}

fn backlog(ready_orchestrations: u64, ready_activities: u64, pending_timers: u64) -> Backlog {
    Backlog { ready_orchestrations, ready_activities, pending_timers }
}

/// `hub_stats`: instances by status (entities apart), and the backlog exactly as the
/// fetches see it at `now`: ready instances (once each, entities included, not while
/// locked), ready activity items (not while leased), messages due later.
pub async fn hub_stats_count_instances_entities_and_the_backlog(store: &dyn Store) {
    assert_eq!(stats(store, secs(0)).await, HubStats::default(), "an empty task hub");

    start(store, "done", secs(0), RuntimeStatus::Completed).await;
    start(store, "failed", secs(0), RuntimeStatus::Failed).await;
    start(store, "suspended", secs(0), RuntimeStatus::Suspended).await;
    store.create_instance(new_instance("running", "Flow", secs(0))).await.expect("create_instance");
    let item = fetch_only(store, "running", secs(0)).await;
    let mut commit = first_episode(&item, secs(0), RuntimeStatus::Running);
    commit.activities = vec![activity(&item.instance, 1, "First"), activity(&item.instance, 2, "Second")];
    commit.messages = vec![Message {
        instance_id: "running".into(),
        execution_id: Some(item.instance.execution_id.clone()),
        event: HistoryEvent::new(secs(60), EventKind::TimerFired { timer_id: 3, fire_at: secs(60) }),
        visible_at: secs(60),
    }];
    commit_ok(store, commit, secs(0)).await;
    store.create_instance(new_instance("pending", "Flow", secs(1))).await.expect("create_instance");
    let scheduled = NewInstance { scheduled_start: Some(secs(100)), ..new_instance("scheduled", "Flow", secs(1)) };
    store.create_instance(scheduled).await.expect("create_instance");
    for n in 0..2 {
        let signal = message_to("@counter@a", entity_signal("@counter@a", &format!("add{n}"), secs(1)), secs(1));
        store.enqueue_message(signal, false).await.expect("signal");
    }

    let now = stats(store, secs(1)).await;
    let counted: Vec<(RuntimeStatus, u64)> = now.instances.iter().filter(|(_, count)| *count > 0).collect();
    assert_eq!(
        counted,
        [
            (RuntimeStatus::Running, 1),
            (RuntimeStatus::Completed, 1),
            (RuntimeStatus::Failed, 1),
            (RuntimeStatus::Pending, 2),
            (RuntimeStatus::Suspended, 1),
        ],
        "orchestration instances by status; the entity is not one"
    );
    let listed = store.query_instances(&InstanceQuery::default()).await.expect("query_instances").instances.len();
    assert_eq!(now.instances.total(), listed as u64, "as many as the instance query lists");
    assert_eq!(now.entities, 1, "one entity, with two messages");
    assert_eq!(
        now.backlog,
        backlog(2, 2, 2),
        "ready: 'pending' and the entity (once); both activities; due later: the timer and the scheduled start"
    );

    let locked = store.fetch_orchestration_items(FETCH_ALL, LEASE, secs(1)).await.expect("fetch_orchestration_items");
    assert_eq!(locked.len(), 2, "the two ready instances");
    let leased = store.fetch_activity_items(1, LEASE, secs(1)).await.expect("fetch_activity_items");
    assert_eq!(leased.len(), 1);
    assert_eq!(stats(store, secs(1)).await.backlog, backlog(0, 1, 2), "locked and leased work is not waiting");
    assert_eq!(stats(store, secs(40)).await.backlog, backlog(2, 2, 2), "the lock and the lease ran out");
    assert_eq!(stats(store, secs(60)).await.backlog, backlog(3, 2, 1), "the timer is due: 'running' is ready");
    assert_eq!(stats(store, secs(100)).await.backlog, backlog(4, 2, 0), "the scheduled start is due");

    for item in &locked {
        commit_ok(store, consume_all(item), secs(2)).await;
    }
    let completions = leased
        .iter()
        .chain(&store.fetch_activity_items(FETCH_ALL, LEASE, secs(2)).await.expect("fetch_activity_items"))
        .map(|item| ActivityCompletion { lock: item.lock.clone(), result: task_completed(item, secs(70)) })
        .collect();
    for result in store.complete_activities(completions).await.expect("complete_activities") {
        result.expect("a current lease completes");
    }
    assert_eq!(
        stats(store, secs(2)).await.backlog,
        backlog(0, 0, 4),
        "the results wait in the inbox until 70 s, with the timer and the start"
    );
    let items = store.fetch_orchestration_items(FETCH_ALL, LEASE, secs(100)).await.expect("fetch_orchestration_items");
    for item in &items {
        commit_ok(store, consume_all(item), secs(100)).await;
    }
    let drained = stats(store, secs(100)).await;
    assert_eq!(drained.backlog, Backlog::default(), "nothing waits once every message is consumed");
    assert_eq!((drained.instances.total(), drained.entities), (6, 1), "consuming messages keeps the rows");
}
