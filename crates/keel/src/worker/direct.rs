//! The direct path: one commit per step for an instance whose activities run in this
//! worker (when the store supports it, [`Store::direct_episodes`]).
//!
//! Without it a step costs four commits: the episode creates the activity item, the
//! activity dispatcher leases it, its result goes to the instance's inbox, and the
//! orchestration dispatcher locks the instance before the next episode. On the direct
//! path the episode creates the item already leased to this worker ([`lease_local`]),
//! which runs it at once ([`LocalActivity`]); its result comes back to the
//! orchestration dispatcher in memory, which plays the next episode on the execution
//! it holds and commits it with a [`DirectClaim`] ([`direct_item`]): the result is
//! recorded in the history, the item deleted and the next items created in that one
//! commit. The claim holds only if the instance is exactly as this worker left it
//! (unlocked, same history, empty inbox); otherwise nothing is written and the result
//! goes to the inbox as usual ([`Finished`] to the activity committer), so the outcome
//! is the same as without the direct path, in the same order.

use keel_core::history::Timestamp;
use keel_store::{
    ActivityCompletion, ActivityItem, Committed, DirectClaim, EpisodeCommit, InstanceRecord, OrchestrationItem,
    OrchestrationLock, StoredMessage,
};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::Shared;

/// A finished activity's result, with the activity slot it keeps until the result is
/// recorded.
pub(super) type Finished = (ActivityCompletion, OwnedSemaphorePermit);

/// An activity item this worker's own commit created leased to it, with its slot.
pub(super) struct LocalActivity {
    pub(super) item: ActivityItem,
    pub(super) slot: OwnedSemaphorePermit,
}

/// The orchestration dispatcher's ends of the direct path.
pub(super) struct DirectRoutes {
    /// Results of the items this worker leased when it created them.
    pub(super) results: mpsc::UnboundedReceiver<Finished>,
    /// Where the items this worker leased when it created them go to run.
    pub(super) local: mpsc::UnboundedSender<LocalActivity>,
    /// Where results go that the direct path does not take: the activity committer.
    pub(super) committer: mpsc::UnboundedSender<Finished>,
    /// The worker's activity slots: an item is leased at creation only with a free one.
    pub(super) slots: std::sync::Arc<Semaphore>,
}

impl DirectRoutes {
    /// Sends results to the activity committer, which delivers them to the inboxes.
    pub(super) fn fall_back(&self, results: impl IntoIterator<Item = Finished>) {
        for finished in results {
            // Closed only once the activity dispatcher stopped: the item's lease then
            // runs out and it runs again.
            let _ = self.committer.send(finished);
        }
    }
}

/// Creates the activities of `commit` that this worker runs leased to it, as far as
/// free slots go; returns them, to run once the commit is durable (their ids are the
/// store's answer, see [`leased_items`]).
pub(super) fn lease_local(
    shared: &Shared,
    slots: &std::sync::Arc<Semaphore>,
    commit: &mut EpisodeCommit,
    now: Timestamp,
) -> Vec<LocalActivity> {
    let mut leased = Vec::new();
    let until = now + chrono::Duration::from_std(shared.options.activity_lease).unwrap_or(chrono::Duration::MAX);
    for activity in &mut commit.activities {
        if shared.registry.activity(&activity.name).is_none() {
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else { break };
        let item = activity.lease_to_committer(uuid::Uuid::new_v4().simple().to_string(), until);
        leased.push(LocalActivity { item, slot });
    }
    leased
}

/// The items [`lease_local`] made, with the ids the store gave them.
pub(super) fn leased_items(mut leased: Vec<LocalActivity>, committed: Committed) -> Vec<LocalActivity> {
    assert_eq!(committed.leased_activity_ids.len(), leased.len(), "the store returns an id per leased activity");
    for (local, id) in leased.iter_mut().zip(committed.leased_activity_ids) {
        local.item.lock.id = id;
    }
    leased
}

/// The item of a direct episode: the instance as this worker left it, with the results
/// as its messages (they are recorded, not consumed from the inbox).
pub(super) fn direct_item(instance: InstanceRecord, results: &[Finished]) -> OrchestrationItem {
    OrchestrationItem {
        lock: OrchestrationLock { instance_id: instance.instance_id.clone(), token: String::new() },
        messages: results
            .iter()
            .map(|(completion, _)| StoredMessage { id: 0, message: completion.result.clone() })
            .collect(),
        instance,
        delivery_attempts: 1,
    }
}

/// Turns the planned commit of a [`direct_item`] into a direct one.
pub(super) fn claim(commit: &mut EpisodeCommit, instance: &InstanceRecord, results: &[Finished]) {
    commit.consumed.clear();
    commit.direct = Some(DirectClaim {
        execution_id: instance.execution_id.clone(),
        history_len: instance.history_len,
        status: instance.status,
        completed: results.iter().map(|(completion, _)| completion.lock.clone()).collect(),
    });
}

/// The instance's row as `commit` leaves it (with `history_len` events): what the next
/// direct episode claims.
pub(super) fn record_after(mut record: InstanceRecord, commit: &EpisodeCommit, history_len: u64) -> InstanceRecord {
    if let Some(execution_id) = &commit.replace_history {
        record.execution_id.clone_from(execution_id);
    }
    record.history_len = history_len;
    if let Some(state) = &commit.state {
        record.status = state.status;
        record.version.clone_from(&state.version);
        record.input.clone_from(&state.input);
        record.output.clone_from(&state.output);
        record.failure.clone_from(&state.failure);
        record.custom_status.clone_from(&state.custom_status);
    }
    record
}
