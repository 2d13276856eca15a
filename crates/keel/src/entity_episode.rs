//! One entity batch: from a locked entity and its new messages to the commit that
//! records the new state, the answers to callers, the signals and orchestration starts
//! the operations made, and the lock messages.
//!
//! [`prepare_entity`] plans the batch with the entity's scheduler (which operations may
//! run now, lock hand-overs); the operations then run in this process
//! ([`crate::entity::run_batch`]) or in an SDK worker, and
//! [`EntityEpisode::complete`] turns their outcome into the commit. Both paths share
//! this code, so the rules (answers before signals, rollback, poison, limits) hold the
//! same for Rust and SDK entities.

use keel_core::entity::{plan_batch, EntityId, EntityScheduler, OperationRequest};
use keel_core::history::{EventKind, FailureDetails, HistoryEvent, RuntimeStatus, Timestamp};
use keel_core::limits;
use keel_store::{
    EpisodeCommit, InstanceRecord, InstanceUpdate, Message, NewInstance, OrchestrationItem, OrchestrationLock,
};

use crate::entity::{BatchOutcome, EntityAction};
use crate::episode::{empty_commit, POISON_ERROR_TYPE};

/// A batch of operations to run on one entity.
#[derive(Clone, Debug)]
pub struct EntityEpisode {
    /// The entity.
    pub id: EntityId,
    /// The entity's row as it was when locked.
    pub instance: InstanceRecord,
    /// The lock on the entity's instance; the commit needs it.
    pub lock: OrchestrationLock,
    /// The state before the batch (JSON).
    pub state: Option<String>,
    /// The operations to run, in order.
    pub operations: Vec<OperationRequest>,
    scheduler: EntityScheduler,
    /// Consumed messages and lock messages so far.
    commit: EpisodeCommit,
}

/// What to do with a fetched entity item.
#[derive(Debug)]
pub enum EntityIntake {
    /// Run these operations.
    Run(Box<EntityEpisode>),
    /// Nothing to run (only lock messages, or poison): commit this.
    Commit(Box<EpisodeCommit>),
}

/// Plans the batch of an entity item.
pub fn prepare_entity(item: &OrchestrationItem, now: Timestamp) -> EntityIntake {
    let instance = &item.instance;
    let mut commit = empty_commit(item);
    let id = match EntityId::parse(&instance.instance_id) {
        Ok(id) => id,
        Err(error) => {
            // The store creates rows only for valid ids; drop what such a row holds.
            tracing::warn!(instance_id = %instance.instance_id, %error, "messages for a malformed entity id dropped");
            return EntityIntake::Commit(Box::new(commit));
        }
    };
    let scheduler = match EntityScheduler::from_json(instance.input.as_deref()) {
        Ok(scheduler) => scheduler,
        Err(error) => {
            tracing::error!(instance_id = %instance.instance_id, %error, "unreadable entity scheduler; starting afresh");
            EntityScheduler::default()
        }
    };
    let plan = plan_batch(scheduler, item.messages.iter().map(|message| message.message.event.clone()));
    for lock_message in plan.lock_messages {
        commit.messages.push(Message {
            instance_id: lock_message.target_instance_id,
            execution_id: None,
            event: HistoryEvent::new(now, lock_message.kind),
            visible_at: now,
        });
    }
    let episode = EntityEpisode {
        id,
        instance: instance.clone(),
        lock: item.lock.clone(),
        state: instance.output.clone(),
        operations: plan.operations,
        scheduler: plan.scheduler,
        commit,
    };
    if item.delivery_attempts > limits::MAX_DELIVERY_ATTEMPTS {
        let failure = FailureDetails::new(
            POISON_ERROR_TYPE,
            format!(
                "the batch of entity {} was picked up {} times without finishing (its worker crashed or hung each \
                 time); its operations were failed to protect the task hub",
                episode.id,
                item.delivery_attempts - 1
            ),
        );
        return EntityIntake::Commit(Box::new(episode.fail_all(failure, now)));
    }
    if episode.operations.is_empty() {
        let state = episode.state.clone();
        return EntityIntake::Commit(Box::new(
            episode.complete(BatchOutcome { state, ..BatchOutcome::default() }, now),
        ));
    }
    EntityIntake::Run(Box::new(episode))
}

impl EntityEpisode {
    /// The commit that fails every operation of the batch with `failure` and leaves
    /// the state as it was.
    pub fn fail_all(self, failure: FailureDetails, now: Timestamp) -> EpisodeCommit {
        let outcome = BatchOutcome {
            state: self.state.clone(),
            results: self.operations.iter().map(|_| Err(failure.clone())).collect(),
            actions: Vec::new(),
        };
        self.complete(outcome, now)
    }

    /// The commit that records what the batch did: the new state and scheduler, then
    /// the answers to callers, then the operations' signals and starts, in order.
    pub fn complete(self, outcome: BatchOutcome, now: Timestamp) -> EpisodeCommit {
        let EntityEpisode { id, state, operations, scheduler, mut commit, .. } = self;
        let (state, results, actions) = match limits::check_payload("the entity state", outcome.state.as_deref()) {
            Ok(()) => (outcome.state, outcome.results, outcome.actions),
            Err(message) => {
                let failure = FailureDetails::new("PayloadTooLarge", message);
                (state, operations.iter().map(|_| Err(failure.clone())).collect(), Vec::new())
            }
        };
        let mut answers = Vec::new();
        for (index, request) in operations.iter().enumerate() {
            let result = results.get(index).cloned().unwrap_or_else(|| {
                Err(FailureDetails::new(
                    "MissingResult",
                    format!("the batch returned no result for operation #{index}"),
                ))
            });
            if let Err(failure) = &result {
                tracing::debug!(entity = %id, operation = %request.operation, %failure, "entity operation failed");
            }
            let Some(reply_to) = &request.reply_to else { continue };
            let kind = match result {
                Ok(output) => EventKind::EntityOperationCompleted { request_id: request.request_id.clone(), output },
                Err(failure) => EventKind::EntityOperationFailed { request_id: request.request_id.clone(), failure },
            };
            answers.push(Message {
                instance_id: reply_to.instance_id.clone(),
                execution_id: (!reply_to.execution_id.is_empty()).then(|| reply_to.execution_id.clone()),
                event: HistoryEvent::new(now, kind),
                visible_at: now,
            });
        }
        let lock_messages = std::mem::take(&mut commit.messages);
        commit.messages = answers;
        for action in actions {
            match action {
                EntityAction::Signal { target, operation, input, scheduled_time } => {
                    commit.messages.push(Message {
                        instance_id: target.clone(),
                        execution_id: None,
                        event: HistoryEvent::new(
                            now,
                            EventKind::EntityOperationSignaled {
                                request_id: uuid::Uuid::new_v4().to_string(),
                                operation,
                                input,
                                scheduled_time,
                                target_instance_id: target,
                                trace: None,
                            },
                        ),
                        visible_at: scheduled_time.unwrap_or(now).max(now),
                    });
                }
                EntityAction::StartOrchestration { instance_id, name, input, scheduled_start } => {
                    let start = NewInstance {
                        instance_id,
                        execution_id: uuid::Uuid::new_v4().simple().to_string(),
                        name,
                        version: None,
                        input,
                        parent: None,
                        scheduled_start,
                        created_at: now,
                        tags: Default::default(),
                        trace: None,
                    };
                    match start.check() {
                        Ok(()) if !keel_core::entity::is_entity_instance_id(&start.instance_id) => {
                            commit.new_instances.push(start);
                        }
                        Ok(()) => {
                            tracing::warn!(entity = %id, instance_id = %start.instance_id, "an entity's orchestration start with an entity id was dropped")
                        }
                        Err(error) => {
                            tracing::warn!(entity = %id, %error, "an entity's orchestration start was dropped")
                        }
                    }
                }
            }
        }
        commit.messages.extend(lock_messages);
        commit.state = Some(InstanceUpdate {
            status: RuntimeStatus::Running,
            version: None,
            input: scheduler.to_json(),
            output: state,
            failure: None,
            custom_status: None,
        });
        commit
    }
}
