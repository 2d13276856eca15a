//! Durable entities: their ids, the scheduler every entity keeps (its lock and the
//! requests waiting for it) and how a batch of inbox messages becomes the operations to
//! run, in order.
//!
//! An entity is an instance whose id is `@{name}@{key}`. Its inbox receives signals,
//! calls, lock requests and unlocks (the `Entity*` history events). Operations run one
//! at a time, in arrival order; while a critical section holds the lock, only that
//! orchestration's messages are processed and the others wait in the scheduler's queue,
//! which is persisted with the entity. Lock requests travel along the sorted lock set:
//! each entity locks itself and passes the request on, the last one grants the lock,
//! so two critical sections never wait for each other (no deadlock).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::history::{EventKind, HistoryEvent};
use crate::limits;

/// The name and key of an entity. Names are case-insensitive and kept in lower case,
/// as the Durable Task SDKs do.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EntityId {
    /// Which kind of entity: the entity function that runs its operations. Lower case.
    pub name: String,
    /// Which entity of that kind; never empty, compared as is.
    pub key: String,
}

impl EntityId {
    /// An entity id, checked: a name of 1 to [`limits::MAX_NAME_BYTES`] bytes and a
    /// non-empty key, neither with `@` (the SDKs refuse it), control characters or any
    /// of `/ \ # ?`, and the whole instance id within [`limits::MAX_INSTANCE_ID_BYTES`].
    pub fn new(name: &str, key: &str) -> Result<EntityId, String> {
        limits::check_name("entity", name)?;
        if name.contains('@') {
            return Err(format!("entity name '{name}' contains '@', which is not allowed"));
        }
        if key.is_empty() {
            return Err("entity key must not be empty".into());
        }
        if key.contains('@') {
            return Err(format!("entity key '{key}' contains '@', which is not allowed"));
        }
        let id = EntityId { name: name.to_lowercase(), key: key.to_string() };
        limits::check_instance_id(&id.instance_id()).map_err(|message| format!("entity id: {message}"))?;
        Ok(id)
    }

    /// Parses the instance id form `@{name}@{key}`.
    pub fn parse(instance_id: &str) -> Result<EntityId, String> {
        let rest = instance_id
            .strip_prefix('@')
            .ok_or_else(|| format!("'{instance_id}' is not an entity id of the form @name@key"))?;
        let (name, key) =
            rest.split_once('@').ok_or_else(|| format!("'{instance_id}' is not an entity id of the form @name@key"))?;
        EntityId::new(name, key)
    }

    /// The id of the instance that holds this entity: `@{name}@{key}`.
    pub fn instance_id(&self) -> String {
        format!("@{}@{}", self.name, self.key)
    }
}

impl std::fmt::Display for EntityId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "@{}@{}", self.name, self.key)
    }
}

/// True for the ids of entity instances (`@…`); orchestration ids never start with `@`.
pub fn is_entity_instance_id(instance_id: &str) -> bool {
    instance_id.starts_with('@')
}

/// The critical section that holds an entity's lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    /// The GUID of the critical section.
    pub critical_section_id: String,
    /// The orchestration instance that owns the critical section.
    pub owner_instance_id: String,
}

/// What an entity remembers besides its state: who holds its lock and the messages
/// that wait for the lock to be released, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EntityScheduler {
    /// The critical section that holds the entity; `None` when it is free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<LockHolder>,
    /// Messages that wait for the lock to be released, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queue: Vec<HistoryEvent>,
}

impl EntityScheduler {
    /// Neither locked nor holding waiting messages: nothing to persist.
    pub fn is_idle(&self) -> bool {
        self.lock.is_none() && self.queue.is_empty()
    }

    /// Reads a persisted scheduler (`None`: idle).
    pub fn from_json(text: Option<&str>) -> Result<EntityScheduler, String> {
        match text {
            None => Ok(EntityScheduler::default()),
            Some(text) => serde_json::from_str(text).map_err(|error| format!("entity scheduler: {error}")),
        }
    }

    /// The persisted form (`None` when idle).
    pub fn to_json(&self) -> Option<String> {
        (!self.is_idle()).then(|| serde_json::to_string(self).expect("an entity scheduler always serializes"))
    }
}

/// The caller an operation answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplyTo {
    /// The calling orchestration's instance id.
    pub instance_id: String,
    /// The calling execution; the answer is dropped if the caller has moved on to
    /// another one. Empty when the caller did not say: the answer goes to whichever
    /// execution is current.
    pub execution_id: String,
}

/// One operation to run on the entity.
#[derive(Clone, Debug, PartialEq)]
pub struct OperationRequest {
    /// The request's GUID; the answer to a call carries it back.
    pub request_id: String,
    /// The operation the entity's code dispatches on.
    pub operation: String,
    /// The operation's input, JSON text.
    pub input: Option<String>,
    /// Set for calls; signals answer nobody.
    pub reply_to: Option<ReplyTo>,
    /// The event the operation came in (`EntityOperationSignaled` or `…Called`).
    pub event: HistoryEvent,
}

/// A message the scheduler sends by itself: a lock request passed on, or a grant.
#[derive(Clone, Debug, PartialEq)]
pub struct LockMessage {
    /// Who receives it: the next entity of the lock set, or the owning orchestration.
    pub target_instance_id: String,
    /// `EntityLockRequested` (passed on) or `EntityLockGranted`.
    pub kind: EventKind,
}

/// What a batch of messages comes to, before any operation runs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchPlan {
    /// The operations to run now, in order.
    pub operations: Vec<OperationRequest>,
    /// The scheduler after the batch: lock holder and waiting messages.
    pub scheduler: EntityScheduler,
    /// Lock requests passed on and grants, in the order they were decided.
    pub lock_messages: Vec<LockMessage>,
}

/// Plans an entity's batch: the scheduler's waiting messages first, then `messages`
/// (inbox order). Messages that are not entity messages are ignored.
pub fn plan_batch(scheduler: EntityScheduler, messages: impl IntoIterator<Item = HistoryEvent>) -> BatchPlan {
    let mut waiting: Vec<HistoryEvent> = scheduler.queue;
    waiting.extend(messages.into_iter().filter(|event| is_entity_message(&event.kind)));
    let mut lock = scheduler.lock;
    let mut plan = BatchPlan::default();
    // Take the first message that may run under the current lock, until none may.
    while let Some(index) = waiting.iter().position(|event| may_run(&lock, &event.kind)) {
        let event = waiting.remove(index);
        match event.kind.clone() {
            EventKind::EntityOperationSignaled { request_id, operation, input, .. } => {
                plan.operations.push(OperationRequest { request_id, operation, input, reply_to: None, event });
            }
            EventKind::EntityOperationCalled {
                request_id,
                operation,
                input,
                parent_instance_id,
                parent_execution_id,
                ..
            } => plan.operations.push(OperationRequest {
                request_id,
                operation,
                input,
                reply_to: Some(ReplyTo { instance_id: parent_instance_id, execution_id: parent_execution_id }),
                event,
            }),
            EventKind::EntityLockRequested { critical_section_id, lock_set, position, parent_instance_id } => {
                lock = Some(LockHolder {
                    critical_section_id: critical_section_id.clone(),
                    owner_instance_id: parent_instance_id.clone(),
                });
                let next = usize::try_from(position).ok().map(|position| position + 1);
                match next.and_then(|next| lock_set.get(next).map(|target| (next, target))) {
                    Some((next, target)) => plan.lock_messages.push(LockMessage {
                        target_instance_id: target.clone(),
                        kind: EventKind::EntityLockRequested {
                            critical_section_id,
                            lock_set: lock_set.clone(),
                            position: i32::try_from(next).unwrap_or(i32::MAX),
                            parent_instance_id,
                        },
                    }),
                    None => plan.lock_messages.push(LockMessage {
                        target_instance_id: parent_instance_id,
                        kind: EventKind::EntityLockGranted { critical_section_id, lock_set },
                    }),
                }
            }
            EventKind::EntityUnlockSent { critical_section_id, .. } => {
                if lock.as_ref().is_some_and(|holder| holder.critical_section_id == critical_section_id) {
                    lock = None;
                }
            }
            _ => unreachable!("only entity messages wait"),
        }
    }
    plan.scheduler = EntityScheduler { lock, queue: waiting };
    plan
}

fn is_entity_message(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::EntityOperationSignaled { .. }
            | EventKind::EntityOperationCalled { .. }
            | EventKind::EntityLockRequested { .. }
            | EventKind::EntityUnlockSent { .. }
    )
}

/// Whether a message may be processed while `lock` holds the entity: anything when it
/// is free; under a lock only the owner's calls and the unlocks (an unlock for another
/// critical section is stale and dropped).
fn may_run(lock: &Option<LockHolder>, kind: &EventKind) -> bool {
    let Some(holder) = lock else { return true };
    match kind {
        EventKind::EntityOperationCalled { parent_instance_id, .. } => *parent_instance_id == holder.owner_instance_id,
        EventKind::EntityUnlockSent { .. } => true,
        _ => false,
    }
}

/// The entity locks an orchestration history holds or has asked for and not released:
/// for each critical section requested and not unlocked, the entities still to unlock.
/// Used to release them when the orchestration ends without running its code
/// (termination).
pub fn unreleased_locks<'a>(history: impl IntoIterator<Item = &'a HistoryEvent>) -> BTreeMap<String, BTreeSet<String>> {
    let mut held: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for event in history {
        match &event.kind {
            EventKind::EntityLockRequested { critical_section_id, lock_set, .. } => {
                held.entry(critical_section_id.clone()).or_default().extend(lock_set.iter().cloned());
            }
            EventKind::EntityUnlockSent { critical_section_id, target_instance_id, .. } => {
                if let Some(targets) = held.get_mut(critical_section_id) {
                    targets.remove(target_instance_id);
                    if targets.is_empty() {
                        held.remove(critical_section_id);
                    }
                }
            }
            _ => {}
        }
    }
    held
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> crate::history::Timestamp {
        chrono::DateTime::from_timestamp_millis(0).unwrap()
    }

    fn signal(operation: &str) -> HistoryEvent {
        HistoryEvent::new(
            at(),
            EventKind::EntityOperationSignaled {
                trace: None,
                request_id: operation.into(),
                operation: operation.into(),
                input: None,
                scheduled_time: None,
                target_instance_id: "@counter@a".into(),
            },
        )
    }

    fn call(operation: &str, from: &str) -> HistoryEvent {
        HistoryEvent::new(
            at(),
            EventKind::EntityOperationCalled {
                trace: None,
                request_id: operation.into(),
                operation: operation.into(),
                input: None,
                parent_instance_id: from.into(),
                parent_execution_id: "e".into(),
                target_instance_id: "@counter@a".into(),
            },
        )
    }

    fn lock(section: &str, lock_set: &[&str], position: i32, owner: &str) -> HistoryEvent {
        HistoryEvent::new(
            at(),
            EventKind::EntityLockRequested {
                critical_section_id: section.into(),
                lock_set: lock_set.iter().map(|id| id.to_string()).collect(),
                position,
                parent_instance_id: owner.into(),
            },
        )
    }

    fn unlock(section: &str, owner: &str) -> HistoryEvent {
        HistoryEvent::new(
            at(),
            EventKind::EntityUnlockSent {
                critical_section_id: section.into(),
                parent_instance_id: owner.into(),
                target_instance_id: "@counter@a".into(),
            },
        )
    }

    fn operations(plan: &BatchPlan) -> Vec<&str> {
        plan.operations.iter().map(|operation| operation.operation.as_str()).collect()
    }

    #[test]
    fn entity_ids_round_trip_and_are_checked() {
        let id = EntityId::new("Counter", "Key-1:2.3+4").unwrap();
        assert_eq!(id.instance_id(), "@counter@Key-1:2.3+4");
        assert_eq!(EntityId::parse("@counter@Key-1:2.3+4").unwrap(), id);
        for bad in ["counter@c1", "@counter", "@@key", "@counter@", "@a/b@k", "@n@k/1", "@n@k@2"] {
            assert!(EntityId::parse(bad).is_err(), "{bad} is refused");
        }
        assert!(EntityId::new("n", &"k".repeat(limits::MAX_INSTANCE_ID_BYTES)).is_err());
    }

    #[test]
    fn operations_run_in_arrival_order() {
        let plan = plan_batch(EntityScheduler::default(), [signal("one"), call("two", "o"), signal("three")]);
        assert_eq!(operations(&plan), ["one", "two", "three"]);
        assert!(plan.scheduler.is_idle());
    }

    #[test]
    fn a_lock_holds_back_other_callers_until_the_unlock() {
        let plan = plan_batch(
            EntityScheduler::default(),
            [signal("before"), lock("cs", &["@counter@a"], 0, "o"), signal("other"), call("mine", "o")],
        );
        assert_eq!(operations(&plan), ["before", "mine"]);
        assert_eq!(
            plan.lock_messages,
            [LockMessage {
                target_instance_id: "o".into(),
                kind: EventKind::EntityLockGranted {
                    critical_section_id: "cs".into(),
                    lock_set: vec!["@counter@a".into()]
                },
            }]
        );
        assert_eq!(plan.scheduler.queue, [signal("other")]);
        let later = plan_batch(plan.scheduler, [unlock("cs", "o"), signal("after")]);
        assert_eq!(operations(&later), ["other", "after"]);
        assert!(later.scheduler.is_idle());
    }

    #[test]
    fn lock_requests_pass_along_the_lock_set() {
        let set = ["@account@a", "@account@b"];
        let plan = plan_batch(EntityScheduler::default(), [lock("cs", &set, 0, "o")]);
        assert_eq!(plan.lock_messages[0].target_instance_id, "@account@b");
        assert_eq!(plan.lock_messages[0].kind, lock("cs", &set, 1, "o").kind);
        // A second critical section waits, and gets the lock when the first lets go.
        let plan = plan_batch(plan.scheduler, [lock("cs2", &set, 0, "p"), unlock("cs", "o")]);
        assert_eq!(plan.scheduler.lock.as_ref().unwrap().critical_section_id, "cs2");
        assert!(plan.scheduler.queue.is_empty());
    }

    #[test]
    fn stale_unlocks_are_dropped() {
        let plan = plan_batch(EntityScheduler::default(), [unlock("old", "o"), signal("x")]);
        assert_eq!(operations(&plan), ["x"]);
        assert!(plan.scheduler.is_idle());
    }

    #[test]
    fn unreleased_locks_are_requests_minus_unlocks() {
        let history = [lock("cs", &["@counter@a", "@counter@b"], 0, "o"), unlock("cs", "o")];
        let held = unreleased_locks(&history);
        assert_eq!(held["cs"], BTreeSet::from(["@counter@b".to_string()]));
    }

    #[test]
    fn the_scheduler_persists_only_when_not_idle() {
        assert_eq!(EntityScheduler::default().to_json(), None);
        let scheduler = EntityScheduler {
            lock: Some(LockHolder { critical_section_id: "cs".into(), owner_instance_id: "o".into() }),
            queue: vec![signal("x")],
        };
        let json = scheduler.to_json().unwrap();
        assert_eq!(EntityScheduler::from_json(Some(&json)).unwrap(), scheduler);
    }
}
