//! Durable entities end to end on a real SQLite task hub: operations in order and
//! batched, rollback of a failed operation, calls and signals from orchestrations,
//! scheduled signals, critical sections (including one whose orchestration is
//! terminated), entities that start orchestrations, the locking rules, storage
//! cleaning, and a property test that transfers under locks never create or destroy
//! money.

mod common;

use std::time::Duration;

use common::{temp_store, worker, WAIT};
use keel::{
    Client, ClientError, EntityContext, EntityError, EntityId, EntityQuery, Event, Orchestration, OrchestrationContext,
    OrchestrationError, RuntimeStatus, StartOptions,
};
use keel_samples::bank_transfer::{self, TransferResult};
use keel_samples::counter;
use proptest::prelude::*;

/// Started by the `Log` entity's `start` operation, by name.
const ECHO: Orchestration<String, String> = Orchestration::new("Echo");
const CALL_COUNTER: Orchestration<i64, i64> = Orchestration::new("CallCounter");
const CALL_FAIL: Orchestration<(), String> = Orchestration::new("CallFail");
const HOLD: Orchestration<(), i64> = Orchestration::new("Hold");
const BREAK_RULES: Orchestration<(), Vec<String>> = Orchestration::new("BreakRules");
const RELEASE: Event<()> = Event::new("Release");

fn counter_id(key: &str) -> EntityId {
    EntityId::new("Counter", key).unwrap()
}

fn account_id(key: &str) -> EntityId {
    EntityId::new("Account", key).unwrap()
}

/// Waits (polling, at most [`WAIT`]) until the entity's state satisfies `holds`.
async fn wait_for_entity<T: serde::de::DeserializeOwned + std::fmt::Debug>(
    client: &Client,
    entity: &EntityId,
    what: &str,
    holds: impl Fn(&T) -> bool,
) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let state = client.get_entity(entity).await.unwrap().filter(|entity| entity.exists());
        if let Some(value) = state.as_ref().and_then(|state| state.state_as::<T>().ok()) {
            if holds(&value) {
                return value;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "{entity} never got to {what}: {state:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An entity that keeps the inputs of its `append` operations, in the order they ran.
fn log(ctx: &mut EntityContext<Vec<u32>>) -> Result<usize, EntityError> {
    match ctx.operation() {
        "append" => {
            let value: u32 = ctx.input()?;
            ctx.state_mut().push(value);
        }
        "fail" => {
            ctx.state_mut().push(u32::MAX);
            return Err(EntityError::new("Refused", "fail always fails"));
        }
        "start" => {
            let name: String = ctx.input()?;
            ctx.start_orchestration_with_id("Echo", &format!("started-by-{}", ctx.id().key), &name)?;
        }
        "forward" => {
            let value: u32 = ctx.input()?;
            let target = EntityId::new("log", "forwarded").unwrap();
            ctx.signal_entity(&target, "append", &value)?;
        }
        _ => return Err(ctx.unknown_operation()),
    }
    Ok(ctx.state().map_or(0, Vec::len))
}

async fn echo(_ctx: OrchestrationContext, name: String) -> Result<String, OrchestrationError> {
    Ok(name)
}

fn entity_worker(store: &std::sync::Arc<dyn keel_store::Store>) -> keel::WorkerBuilder {
    let worker = worker(store).entity("Log", log).orchestration(ECHO, echo).orchestration(CALL_COUNTER, call_counter);
    bank_transfer::register(counter::register(worker))
}

/// Adds its input to `Counter@calls` and returns the counter's value.
async fn call_counter(ctx: OrchestrationContext, amount: i64) -> Result<i64, OrchestrationError> {
    let counter = counter_id("calls");
    ctx.signal_entity(&counter, "add", &amount)?;
    Ok(ctx.call_entity(&counter, "get", &()).await?)
}

#[tokio::test]
async fn operations_run_once_each_in_arrival_order() {
    let (store, _dir) = temp_store().await;
    let client = Client::new(store.clone());
    let entity = EntityId::new("Log", "ordered").unwrap();
    for value in 0..100u32 {
        client.signal_entity(&entity, "append", &value).await.unwrap();
    }
    // The worker starts after the signals: they come in batches.
    let worker = entity_worker(&store).build().start();
    let state: Vec<u32> = wait_for_entity(&client, &entity, "100 entries", |log: &Vec<u32>| log.len() >= 100).await;
    assert_eq!(state, (0..100).collect::<Vec<_>>());
    let metadata = client.get_entity(&entity).await.unwrap().unwrap();
    assert_eq!((metadata.locked_by, metadata.backlog), (None, 0));
    worker.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_failed_operation_rolls_back_only_itself_and_its_caller_sees_the_failure() {
    let (store, _dir) = temp_store().await;
    let worker = entity_worker(&store).build().start();
    let client = worker.client();
    let entity = EntityId::new("Log", "rollback").unwrap();
    client.signal_entity(&entity, "append", &1).await.unwrap();
    client.signal_entity(&entity, "fail", &()).await.unwrap();
    client.signal_entity(&entity, "append", &2).await.unwrap();
    let state: Vec<u32> = wait_for_entity(&client, &entity, "two entries", |log: &Vec<u32>| log.len() >= 2).await;
    assert_eq!(state, [1, 2], "the failed operation left nothing behind");

    async fn call_fail(ctx: OrchestrationContext, (): ()) -> Result<String, OrchestrationError> {
        let entity = EntityId::new("Log", "rollback").unwrap();
        match ctx.call_entity::<usize>(&entity, "fail", &()).await {
            Ok(_) => Err(OrchestrationError::msg("the failing operation succeeded")),
            Err(error) => Ok(format!("{}: {}", error.error_type(), error.message())),
        }
    }
    let worker2 = entity_worker(&store).orchestration(CALL_FAIL, call_fail).build().start();
    worker.shutdown(Duration::from_secs(5)).await;
    let client = worker2.client();
    let id = client.start(CALL_FAIL, &()).await.unwrap();
    let done = client.wait_for_completion(id.id(), WAIT).await.unwrap();
    assert_eq!(done.output_as::<String>().unwrap(), "Refused: fail always fails");
    // By name: the typed start would not let a string through.
    let uncaught = client.start_new(CALL_COUNTER.name(), &"not a number").await.unwrap();
    let done = client.wait_for_completion(&uncaught, WAIT).await.unwrap();
    assert_eq!(done.status, RuntimeStatus::Failed);
    assert_eq!(done.failure.unwrap().error_type, "InvalidInput", "the orchestration's own input does not fit");
    worker2.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn orchestrations_signal_and_call_entities() {
    let (store, _dir) = temp_store().await;
    let worker = entity_worker(&store).build().start();
    let client = worker.client();
    let first = client.start(CALL_COUNTER, &5).await.unwrap();
    let done = client.wait_for_completion(first.id(), WAIT).await.unwrap();
    assert_eq!(done.output_as::<i64>().unwrap(), 5, "the signal ran before the call: same sender, in order");
    let second = client.start(CALL_COUNTER, &7).await.unwrap();
    let done = client.wait_for_completion(second.id(), WAIT).await.unwrap();
    assert_eq!(done.output_as::<i64>().unwrap(), 12);
    let history = client.get_history(second.id()).await.unwrap();
    let kinds: Vec<&str> = history.iter().map(|event| event.kind.type_name()).collect();
    for kind in ["EntityOperationSignaled", "EntityOperationCalled", "EntityOperationCompleted"] {
        assert!(kinds.contains(&kind), "{kind} in {kinds:?}");
    }
    worker.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn entities_signal_entities_and_start_orchestrations() {
    let (store, _dir) = temp_store().await;
    let worker = entity_worker(&store).build().start();
    let client = worker.client();
    let entity = EntityId::new("Log", "starter").unwrap();
    client.signal_entity(&entity, "forward", &41).await.unwrap();
    client.signal_entity(&entity, "start", &"hello").await.unwrap();
    let forwarded = EntityId::new("Log", "forwarded").unwrap();
    let state: Vec<u32> =
        wait_for_entity(&client, &forwarded, "the forwarded value", |log: &Vec<u32>| !log.is_empty()).await;
    assert_eq!(state, [41]);
    let started = loop {
        if let Some(status) = client.get_status("started-by-starter").await.unwrap() {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let done = client.wait_for_completion(&started.instance_id, WAIT).await.unwrap();
    assert_eq!(done.output_as::<String>().unwrap(), "hello");
    worker.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn scheduled_signals_wait_for_their_time() {
    let (store, _dir) = temp_store().await;
    let worker = entity_worker(&store).build().start();
    let client = worker.client();
    let entity = counter_id("later");
    let at = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    client.signal_entity_at(&entity, "add", &3, at).await.unwrap();
    client.signal_entity(&entity, "add", &1).await.unwrap();
    let value: i64 = wait_for_entity(&client, &entity, "the immediate signal", |value: &i64| *value >= 1).await;
    assert_eq!(value, 1, "the scheduled signal waits");
    let value: i64 = wait_for_entity(&client, &entity, "the scheduled signal", |value: &i64| *value >= 4).await;
    assert_eq!(value, 4);
    assert!(chrono::Utc::now() >= at, "it ran at its time, not before");
    worker.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_critical_section_holds_other_callers_back_until_it_ends() {
    let (store, _dir) = temp_store().await;

    // Holds the lock on the account until the event "Release" comes.
    async fn hold(ctx: OrchestrationContext, (): ()) -> Result<i64, OrchestrationError> {
        let account = EntityId::new("Account", "held").unwrap();
        let _section = ctx.lock_entities([&account]).await?;
        ctx.call_entity::<i64>(&account, "deposit", &10).await?;
        ctx.wait(RELEASE).await?;
        Ok(ctx.call_entity(&account, "balance", &()).await?)
    }
    let worker = entity_worker(&store).orchestration(HOLD, hold).build().start();
    let client = worker.client();
    let account = account_id("held");
    let holder = client.start(HOLD, &()).await.unwrap().id().to_string();
    wait_for_entity(&client, &account, "the holder's deposit", |balance: &i64| *balance == 10).await;
    client.signal_entity(&account, "deposit", &5).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let metadata = client.get_entity(&account).await.unwrap().unwrap();
        if metadata.backlog == 1 {
            assert_eq!(metadata.locked_by.as_deref(), Some(holder.as_str()));
            assert_eq!(metadata.state.as_deref(), Some("10"), "the other deposit waits for the lock");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the signal never queued behind the lock: {metadata:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client.raise(&holder, RELEASE, &()).await.unwrap();
    let done = client.wait_for_completion(&holder, WAIT).await.unwrap();
    assert_eq!(done.output_as::<i64>().unwrap(), 10, "inside the section nobody else touched the account");
    wait_for_entity(&client, &account, "the waiting deposit", |balance: &i64| *balance == 15).await;
    let metadata = client.get_entity(&account).await.unwrap().unwrap();
    assert_eq!((metadata.locked_by, metadata.backlog), (None, 0), "the lock was released");

    // A holder that is terminated gives its locks back too.
    let terminated = client.start(HOLD, &()).await.unwrap().id().to_string();
    wait_for_entity(&client, &account, "the second holder's deposit", |balance: &i64| *balance == 25).await;
    client.terminate(&terminated, Some("stop")).await.unwrap();
    client.wait_for_completion(&terminated, WAIT).await.unwrap();
    client.signal_entity(&account, "deposit", &1).await.unwrap();
    wait_for_entity(&client, &account, "a deposit after the termination", |balance: &i64| *balance == 26).await;
    let metadata = client.get_entity(&account).await.unwrap().unwrap();
    assert_eq!(metadata.locked_by, None, "termination released the lock");
    worker.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn the_locking_rules_are_enforced_with_clear_errors() {
    let (store, _dir) = temp_store().await;
    async fn break_rules(ctx: OrchestrationContext, (): ()) -> Result<Vec<String>, OrchestrationError> {
        let a = EntityId::new("Account", "rule-a").unwrap();
        let b = EntityId::new("Account", "rule-b").unwrap();
        let section = ctx.lock_entities([&a]).await?;
        let mut errors = Vec::new();
        if let Err(error) = ctx.lock_entities([&b]).await {
            errors.push(error.details.error_message);
        }
        if let Err(error) = ctx.call_entity::<i64>(&b, "balance", &()).await {
            errors.push(error.details.error_message);
        }
        if let Err(failure) = ctx.call(ECHO, &"x".to_string()).await {
            errors.push(failure.details().error_message);
        }
        assert_eq!(section.lock_set(), ["@account@rule-a"]);
        drop(section);
        let after: i64 = ctx.call_entity(&b, "balance", &()).await?;
        errors.push(format!("after the section: {after}"));
        Ok(errors)
    }
    let worker = entity_worker(&store).orchestration(BREAK_RULES, break_rules).build().start();
    let client = worker.client();
    let id = client.start(BREAK_RULES, &()).await.unwrap();
    let done = client.wait_for_completion(id.id(), WAIT).await.unwrap();
    let errors: Vec<String> = done.output_as().unwrap();
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert!(errors[0].contains("do not nest"), "{errors:?}");
    assert!(errors[1].contains("only call the entities it locked"), "{errors:?}");
    assert!(errors[2].contains("sub-orchestrations"), "{errors:?}");
    assert_eq!(errors[3], "after the section: 0");
    worker.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn unknown_entities_bad_ids_and_storage_cleaning() {
    let (store, _dir) = temp_store().await;
    let worker = entity_worker(&store).build().start();
    let client = worker.client();
    let nope = EntityId::new("Nope", "x").unwrap();
    assert!(matches!(client.signal_entity(&nope, "add", &1).await, Err(ClientError::UnknownEntity(_))));
    assert_eq!(client.get_entity(&nope).await.unwrap(), None, "nothing was written");
    assert!(EntityId::new("Counter", "").is_err() && EntityId::new("", "k").is_err());
    assert!(matches!(
        client
            .start_with_options(
                ECHO,
                &"x".to_string(),
                StartOptions { instance_id: Some("@counter@x".into()), ..Default::default() }
            )
            .await,
        Err(ClientError::Invalid(_))
    ));
    let big = "x".repeat(keel_core::limits::MAX_PAYLOAD_BYTES + 1);
    assert!(matches!(client.signal_entity(&counter_id("big"), "add", &big).await, Err(ClientError::Invalid(_))));
    assert_eq!(client.get_entity(&counter_id("big")).await.unwrap(), None);
    let everything = EntityQuery { include_transient: true, ..EntityQuery::default() };
    assert!(client.query_entities(&everything).await.unwrap().entities.is_empty(), "no refused signal wrote a row");
    assert!(client.query(&keel::InstanceQuery::default()).await.unwrap().instances.is_empty(), "nor an instance");

    let kept = counter_id("kept");
    let deleted = counter_id("deleted");
    client.signal_entity(&kept, "add", &1).await.unwrap();
    client.signal_entity(&deleted, "add", &1).await.unwrap();
    client.signal_entity(&deleted, "delete", &()).await.unwrap();
    wait_for_entity(&client, &kept, "its state", |value: &i64| *value == 1).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while client.get_entity(&deleted).await.unwrap().is_none_or(|entity| entity.exists() || entity.backlog > 0) {
        assert!(tokio::time::Instant::now() < deadline, "the delete never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let listed = client.query_entities(&EntityQuery::default()).await.unwrap();
    let ids: Vec<String> = listed.entities.iter().map(|entity| entity.id.to_string()).collect();
    assert_eq!(ids, ["@counter@kept"], "entities with state");

    // An orphaned lock: a lock request from an orchestration that does not exist.
    let orphan = counter_id("orphan");
    let now = chrono::Utc::now();
    let request = keel::HistoryEvent::new(
        now,
        keel::EventKind::EntityLockRequested {
            critical_section_id: "cs".into(),
            lock_set: vec![orphan.instance_id()],
            position: 0,
            parent_instance_id: "ghost".into(),
        },
    );
    let message =
        keel_store::Message { instance_id: orphan.instance_id(), execution_id: None, event: request, visible_at: now };
    store.enqueue_message(message, false).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while client.get_entity(&orphan).await.unwrap().and_then(|entity| entity.locked_by).is_none() {
        assert!(tokio::time::Instant::now() < deadline, "the orphan lock was never taken");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cleaned = client.clean_entity_storage(true, true).await.unwrap();
    assert_eq!((cleaned.empty_entities_removed, cleaned.orphaned_locks_released), (1, 1), "{cleaned:?}");
    assert_eq!(client.get_entity(&deleted).await.unwrap(), None, "the deleted entity's row is gone");
    let deadline = tokio::time::Instant::now() + WAIT;
    while client.get_entity(&orphan).await.unwrap().and_then(|entity| entity.locked_by).is_some() {
        assert!(tokio::time::Instant::now() < deadline, "the orphaned lock was never released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    worker.shutdown(Duration::from_secs(5)).await;
}

/// Runs random transfers (concurrently, each under the lock of its two accounts) and
/// returns the final balances.
async fn run_transfers(transfers: &[(usize, usize, i64)], accounts: usize) -> Vec<i64> {
    let (store, _dir) = temp_store().await;
    let worker = entity_worker(&store).build().start();
    let client = worker.client();
    let key = |n: usize| format!("acct-{n}");
    for n in 0..accounts {
        client.signal_entity(&account_id(&key(n)), "deposit", &100).await.unwrap();
    }
    let mut ids = Vec::new();
    for (from, to, amount) in transfers {
        let transfer = bank_transfer::Transfer { from: key(*from), to: key(*to), amount: *amount };
        ids.push(client.start(bank_transfer::BANK_TRANSFER, &transfer).await.unwrap().id().to_string());
    }
    for id in &ids {
        let done = client.wait_for_completion(id, WAIT).await.unwrap();
        assert_eq!(done.status, RuntimeStatus::Completed, "{done:?}");
        let result: TransferResult = done.output_as().unwrap();
        assert!(result.from_balance >= 0 && result.to_balance >= 0, "{result:?}");
    }
    let mut balances = Vec::new();
    for n in 0..accounts {
        // The last unlocks were sent with the transfers' completion, and an account no
        // transfer touched may not have had its deposit yet: both arrive soon after.
        let deadline = tokio::time::Instant::now() + WAIT;
        let entity = loop {
            let entity = client.get_entity(&account_id(&key(n))).await.unwrap().unwrap();
            if entity.exists() && entity.locked_by.is_none() && entity.backlog == 0 {
                break entity;
            }
            assert!(tokio::time::Instant::now() < deadline, "a lock was never released: {entity:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        balances.push(entity.state_as::<i64>().unwrap());
    }
    worker.shutdown(Duration::from_secs(5)).await;
    balances
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn transfers_under_locks_never_create_or_destroy_money(
        transfers in proptest::collection::vec((0usize..4, 0usize..4, 1i64..80), 1..12)
            .prop_map(|transfers| transfers.into_iter().filter(|(from, to, _)| from != to).collect::<Vec<_>>())
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let balances = runtime.block_on(run_transfers(&transfers, 4));
        prop_assert_eq!(balances.iter().sum::<i64>(), 400, "balances {:?} after {:?}", balances, transfers);
        prop_assert!(balances.iter().all(|balance| *balance >= 0), "no overdraft: {:?}", balances);
    }
}
