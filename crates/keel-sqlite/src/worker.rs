//! The worker side of the store: leasing orchestration and activity work, committing
//! episodes and activity results, giving work back, and the next wake-up time.
//!
//! Batches (commits, completions) run in one transaction. An item that fails its
//! contract check (a lost lease) fails before it writes anything, so it fails alone and
//! the others commit.

use std::collections::HashSet;
use std::time::Duration;

use keel_core::history::{EventKind, FailureDetails, HistoryEvent, Timestamp};
use keel_core::trace::TraceContext;
use keel_store::{
    ActivityCompletion, ActivityItem, ActivityLock, Committed, DirectClaim, EpisodeCommit, Error, Message,
    OrchestrationItem, OrchestrationLock, StoredMessage, MAX_MESSAGES_PER_ITEM,
};
use rusqlite::{params, Connection, OptionalExtension};

use crate::client::{insert_instance, insert_message, Creation};
use crate::codec::{from_json, instance_from_row, lease_end_millis, millis, timestamp, to_json, INSTANCE_COLUMNS};
use crate::failure::Failure;

/// Which in-process wake-ups a write calls for (see [`keel_store::Notifications`]).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Wakeups {
    /// An inbox got a message, or an instance with messages was unlocked.
    pub(crate) orchestration_work: bool,
    /// An activity item was added or given back.
    pub(crate) activity_work: bool,
    /// An instance row was created or its state changed.
    pub(crate) instance_changed: bool,
}

impl Wakeups {
    fn merge(&mut self, other: Wakeups) {
        self.orchestration_work |= other.orchestration_work;
        self.activity_work |= other.activity_work;
        self.instance_changed |= other.instance_changed;
    }

    pub(crate) fn signal(self, notifications: &keel_store::Notifications) {
        if self.orchestration_work {
            notifications.orchestration_work_added();
        }
        if self.activity_work {
            notifications.activity_work_added();
        }
        if self.instance_changed {
            notifications.instance_changed();
        }
    }
}

pub(crate) fn fetch_orchestration_items(
    connection: &Connection,
    max: usize,
    lease: Duration,
    now: Timestamp,
    owner: Option<&str>,
) -> Result<Vec<OrchestrationItem>, Failure> {
    let now_millis = millis(now);
    let locked_until = lease_end_millis(now, lease);

    // Unlocked instances by their longest-waiting visible message.
    let mut chosen: Vec<String> = Vec::new();
    {
        let mut candidates = connection.prepare_cached(
            "SELECT m.instance_id FROM messages m \
             JOIN instances i ON i.instance_id = m.instance_id \
             WHERE m.visible_at <= ?1 AND (i.locked_until IS NULL OR i.locked_until <= ?1) \
             ORDER BY m.visible_at, m.id",
        )?;
        let mut rows = candidates.query([now_millis])?;
        let mut seen = HashSet::new();
        while chosen.len() < max {
            let Some(row) = rows.next()? else { break };
            let instance_id: String = row.get(0)?;
            if seen.insert(instance_id.clone()) {
                chosen.push(instance_id);
            }
        }
    }

    let lock_sql = format!(
        "UPDATE instances SET lock_token = ?2, locked_until = ?3, lock_count = lock_count + 1, lease_owner = ?4 \
         WHERE instance_id = ?1 RETURNING {INSTANCE_COLUMNS}, lock_count"
    );
    let mut items = Vec::with_capacity(chosen.len());
    for instance_id in chosen {
        let token = uuid::Uuid::new_v4().to_string();
        let (instance, lock_count) = connection
            .prepare_cached(&lock_sql)?
            .query_row(params![instance_id, token, locked_until, owner], |row| {
                Ok((instance_from_row(row), row.get::<_, i64>(16)?))
            })?;
        let messages = visible_messages(connection, &instance_id, now_millis)?;
        assert!(!messages.is_empty(), "instance '{instance_id}' was chosen for a visible message");
        items.push(OrchestrationItem {
            lock: OrchestrationLock { instance_id, token },
            instance: instance?,
            messages,
            delivery_attempts: u32::try_from(lock_count)
                .map_err(|_| Failure::corrupt(format!("lock count {lock_count}")))?,
        });
    }
    Ok(items)
}

/// The visible messages of an instance in arrival order, at most
/// [`MAX_MESSAGES_PER_ITEM`].
fn visible_messages(
    connection: &Connection,
    instance_id: &str,
    now_millis: i64,
) -> Result<Vec<StoredMessage>, Failure> {
    let mut statement = connection.prepare_cached(
        "SELECT id, execution_id, event, visible_at FROM messages \
         WHERE instance_id = ?1 AND visible_at <= ?2 ORDER BY id LIMIT ?3",
    )?;
    let mut rows = statement.query(params![instance_id, now_millis, MAX_MESSAGES_PER_ITEM as i64])?;
    let mut messages = Vec::new();
    while let Some(row) = rows.next()? {
        let event: String = row.get(2)?;
        messages.push(StoredMessage {
            id: row.get(0)?,
            message: Message {
                instance_id: instance_id.to_owned(),
                execution_id: row.get(1)?,
                event: from_json("messages.event", &event)?,
                visible_at: timestamp(row.get(3)?)?,
            },
        });
    }
    Ok(messages)
}

pub(crate) fn commit_episodes(
    connection: &Connection,
    commits: &[EpisodeCommit],
    now: Timestamp,
    owner: Option<&str>,
) -> Result<(Vec<keel_store::Result<Committed>>, Wakeups), Failure> {
    let mut results = Vec::with_capacity(commits.len());
    let mut wakeups = Wakeups::default();
    for commit in commits {
        // A commit with a stale lock fails before it writes anything, so no savepoint is
        // needed to undo it (savepoints per item were a fifth of a busy batch's CPU).
        match commit_episode(connection, commit, now, owner) {
            Ok((committed, episode_wakeups)) => {
                wakeups.merge(episode_wakeups);
                results.push(Ok(committed));
            }
            Err(Failure::Contract(error)) => results.push(Err(error)),
            Err(failure @ Failure::Sqlite(_)) => return Err(failure),
        }
    }
    Ok((results, wakeups))
}

/// What a commit checks its claim against: the instance's lock and where it stands.
struct HeldRow {
    token: Option<String>,
    locked_until: Option<i64>,
    execution_id: String,
    history_len: i64,
    status: String,
}

/// Applies one episode's commit; see [`EpisodeCommit`]. The only contract error, a
/// stale lock (or a direct claim that does not hold), is found before anything is
/// written.
fn commit_episode(
    connection: &Connection,
    commit: &EpisodeCommit,
    now: Timestamp,
    owner: Option<&str>,
) -> Result<(Committed, Wakeups), Failure> {
    let instance_id = commit.lock.instance_id.as_str();
    let now_millis = millis(now);
    let mut wakeups = Wakeups::default();

    let held = connection
        .prepare_cached(
            "SELECT lock_token, locked_until, execution_id, history_len, status FROM instances WHERE instance_id = ?1",
        )?
        .query_row([instance_id], |row| {
            Ok(HeldRow {
                token: row.get(0)?,
                locked_until: row.get(1)?,
                execution_id: row.get(2)?,
                history_len: row.get(3)?,
                status: row.get(4)?,
            })
        })
        .optional()?;
    let Some(HeldRow { token, locked_until, mut execution_id, mut history_len, status }) = held else {
        return Err(Failure::Contract(Error::LeaseLost));
    };
    match &commit.direct {
        None if token.as_deref() == Some(commit.lock.token.as_str()) => {}
        None => return Err(Failure::Contract(Error::LeaseLost)),
        Some(claim) => {
            let unlocked = locked_until.is_none_or(|until| until <= now_millis);
            let as_left = execution_id == claim.execution_id
                && u64::try_from(history_len).ok() == Some(claim.history_len)
                && status == claim.status.as_str();
            if !(unlocked && as_left && inbox_is_empty(connection, instance_id, now_millis)?) {
                return Err(Failure::Contract(Error::LeaseLost));
            }
            take_completed_activities(connection, claim)?;
        }
    }

    if !commit.consumed.is_empty() {
        connection
            .prepare_cached(
                "DELETE FROM messages WHERE instance_id = ?1 \
                 AND id IN (SELECT value FROM json_each(?2))",
            )?
            .execute(params![instance_id, to_json(&commit.consumed)?])?;
    }

    if let Some(new_execution_id) = &commit.replace_history {
        connection.prepare_cached("DELETE FROM history WHERE instance_id = ?1")?.execute([instance_id])?;
        execution_id.clone_from(new_execution_id);
        history_len = 0;
    }
    append_history(connection, instance_id, history_len, &commit.history)?;
    history_len += i64::try_from(commit.history.len()).expect("history batch fits in i64");

    match &commit.state {
        Some(state) => {
            let failure = state.failure.as_ref().map(to_json).transpose()?;
            let completed_at = state.status.is_terminal().then_some(now_millis);
            connection
                .prepare_cached(
                    "UPDATE instances SET execution_id = ?2, history_len = ?3, status = ?4, \
                     input = ?5, output = ?6, failure = ?7, custom_status = ?8, \
                     last_updated_at = ?9, completed_at = ?10, version = ?11, \
                     lock_token = NULL, locked_until = NULL, lock_count = 0 \
                     WHERE instance_id = ?1",
                )?
                .execute(params![
                    instance_id,
                    execution_id,
                    history_len,
                    state.status.as_str(),
                    state.input,
                    state.output,
                    failure,
                    state.custom_status,
                    now_millis,
                    completed_at,
                    state.version,
                ])?;
            wakeups.instance_changed = true;
        }
        None => {
            connection
                .prepare_cached(
                    "UPDATE instances SET execution_id = ?2, history_len = ?3, \
                     lock_token = NULL, locked_until = NULL, lock_count = 0 \
                     WHERE instance_id = ?1",
                )?
                .execute(params![instance_id, execution_id, history_len])?;
        }
    }

    let mut committed = Committed::default();
    for activity in &commit.activities {
        let trace_parent = activity.trace.as_ref().map(|trace| &trace.trace_parent);
        let trace_state = activity.trace.as_ref().and_then(|trace| trace.trace_state.as_ref());
        match &activity.lease {
            None => {
                connection
                    .prepare_cached(
                        "INSERT INTO activities (instance_id, execution_id, task_id, name, input, visible_at, \
                         trace_parent, trace_state) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    )?
                    .execute(params![
                        activity.instance_id,
                        activity.execution_id,
                        activity.task_id,
                        activity.name,
                        activity.input,
                        now_millis,
                        trace_parent,
                        trace_state,
                    ])?;
                wakeups.activity_work = true;
            }
            // Leased to the committing worker, which runs it at once: nobody to wake.
            Some(lease) => {
                let id = connection
                    .prepare_cached(
                        "INSERT INTO activities (instance_id, execution_id, task_id, name, input, visible_at, \
                         trace_parent, trace_state, lock_token, attempts, lease_owner) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 1, ?10) RETURNING id",
                    )?
                    .query_row(
                        params![
                            activity.instance_id,
                            activity.execution_id,
                            activity.task_id,
                            activity.name,
                            activity.input,
                            millis(lease.until),
                            trace_parent,
                            trace_state,
                            lease.token,
                            owner,
                        ],
                        |row| row.get(0),
                    )?;
                committed.leased_activity_ids.push(id);
            }
        }
    }

    // Children first, so that messages of this commit can reach them.
    for child in &commit.new_instances {
        match insert_instance(connection, child)? {
            Creation::Created => {
                wakeups.orchestration_work = true;
                wakeups.instance_changed = true;
            }
            Creation::Occupied(status) => {
                let Some(parent) = &child.parent else { continue };
                let refusal = Message {
                    instance_id: parent.instance_id.clone(),
                    execution_id: Some(parent.execution_id.clone()),
                    event: HistoryEvent::new(
                        now,
                        EventKind::SubOrchestrationInstanceFailed {
                            task_scheduled_id: parent.task_scheduled_id,
                            failure: FailureDetails::new(
                                "InstanceAlreadyExists",
                                format!("an instance with id '{}' already exists and is {status}", child.instance_id),
                            ),
                        },
                    ),
                    visible_at: now,
                };
                wakeups.orchestration_work |= insert_message(connection, &refusal)?;
            }
        }
    }

    for message in &commit.messages {
        wakeups.orchestration_work |= insert_message(connection, message)?;
    }

    // Messages that arrived during the episode are work again now that the lock is gone
    // (a direct episode found the inbox empty in this transaction).
    if commit.direct.is_none() {
        wakeups.orchestration_work |= !inbox_is_empty(connection, instance_id, now_millis)?;
    }
    Ok((committed, wakeups))
}

/// Whether the instance's inbox has no visible message.
fn inbox_is_empty(connection: &Connection, instance_id: &str, now_millis: i64) -> Result<bool, Failure> {
    let pending: bool = connection
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM messages WHERE instance_id = ?1 AND visible_at <= ?2)")?
        .query_row(params![instance_id, now_millis], |row| row.get(0))?;
    Ok(!pending)
}

/// Deletes the activity items a direct episode records the results of; fails with
/// [`Error::LeaseLost`], before deleting any, if one of them is no longer leased so.
fn take_completed_activities(connection: &Connection, claim: &DirectClaim) -> Result<(), Failure> {
    if let [lock] = claim.completed.as_slice() {
        // One item (a step of a chain): its delete is the check, and the first write.
        let deleted = connection
            .prepare_cached("DELETE FROM activities WHERE id = ?1 AND lock_token = ?2")?
            .execute(params![lock.id, lock.token])?;
        return if deleted == 1 { Ok(()) } else { Err(Failure::Contract(Error::LeaseLost)) };
    }
    for lock in &claim.completed {
        let held: bool = connection
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM activities WHERE id = ?1 AND lock_token = ?2)")?
            .query_row(params![lock.id, lock.token], |row| row.get(0))?;
        if !held {
            return Err(Failure::Contract(Error::LeaseLost));
        }
    }
    for lock in &claim.completed {
        connection.prepare_cached("DELETE FROM activities WHERE id = ?1")?.execute([lock.id])?;
    }
    Ok(())
}

fn append_history(
    connection: &Connection,
    instance_id: &str,
    first_seq: i64,
    events: &[HistoryEvent],
) -> Result<(), Failure> {
    let mut insert = connection.prepare_cached("INSERT INTO history (instance_id, seq, event) VALUES (?1, ?2, ?3)")?;
    for (seq, event) in (first_seq..).zip(events) {
        insert.execute(params![instance_id, seq, to_json(event)?])?;
    }
    Ok(())
}

pub(crate) fn abandon_orchestration_item(
    connection: &Connection,
    lock: &OrchestrationLock,
    retry_at: Timestamp,
) -> Result<(), Failure> {
    // The instance, not its messages, waits until `retry_at`: a message that arrives
    // meanwhile must not be delivered ahead of the ones given back.
    let released = connection
        .prepare_cached(
            "UPDATE instances SET lock_token = NULL, locked_until = ?3, lock_count = max(lock_count - 1, 0) \
             WHERE instance_id = ?1 AND lock_token = ?2",
        )?
        .execute(params![lock.instance_id, lock.token, millis(retry_at)])?;
    if released == 0 {
        return Err(Failure::Contract(Error::LeaseLost));
    }
    Ok(())
}

pub(crate) fn renew_orchestration_lease(
    connection: &Connection,
    lock: &OrchestrationLock,
    lease: Duration,
    now: Timestamp,
) -> Result<(), Failure> {
    let renewed = connection
        .prepare_cached("UPDATE instances SET locked_until = ?3 WHERE instance_id = ?1 AND lock_token = ?2")?
        .execute(params![lock.instance_id, lock.token, lease_end_millis(now, lease)])?;
    if renewed == 0 {
        return Err(Failure::Contract(Error::LeaseLost));
    }
    Ok(())
}

pub(crate) fn fetch_activity_items(
    connection: &Connection,
    max: usize,
    lease: Duration,
    now: Timestamp,
    owner: Option<&str>,
) -> Result<Vec<ActivityItem>, Failure> {
    let ids: Vec<i64> = connection
        .prepare_cached("SELECT id FROM activities WHERE visible_at <= ?1 ORDER BY visible_at, id LIMIT ?2")?
        .query_map(params![millis(now), i64::try_from(max).unwrap_or(i64::MAX)], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    let lease_end = lease_end_millis(now, lease);
    let mut items = Vec::with_capacity(ids.len());
    for id in ids {
        let token = uuid::Uuid::new_v4().to_string();
        let item = connection
            .prepare_cached(
                "UPDATE activities SET lock_token = ?2, visible_at = ?3, attempts = attempts + 1, lease_owner = ?4 \
                 WHERE id = ?1 RETURNING instance_id, execution_id, task_id, name, input, attempts, trace_parent, trace_state",
            )?
            .query_row(params![id, token, lease_end, owner], |row| {
                let trace_parent: Option<String> = row.get(6)?;
                let trace_state: Option<String> = row.get(7)?;
                Ok(ActivityItem {
                    lock: ActivityLock { id, token: token.clone() },
                    instance_id: row.get(0)?,
                    execution_id: row.get(1)?,
                    task_id: row.get(2)?,
                    name: row.get(3)?,
                    input: row.get(4)?,
                    delivery_attempts: row.get(5)?,
                    trace: trace_parent.map(|trace_parent| TraceContext { trace_parent, trace_state }),
                })
            })?;
        items.push(item);
    }
    Ok(items)
}

pub(crate) fn complete_activities(
    connection: &Connection,
    completions: &[ActivityCompletion],
) -> Result<(Vec<keel_store::Result<()>>, Wakeups), Failure> {
    let mut results = Vec::with_capacity(completions.len());
    let mut wakeups = Wakeups::default();
    for completion in completions {
        // A completion with a stale lock deletes nothing and fails before it writes.
        match complete_activity(connection, completion) {
            Ok(delivered) => {
                wakeups.orchestration_work |= delivered;
                results.push(Ok(()));
            }
            Err(Failure::Contract(error)) => results.push(Err(error)),
            Err(failure @ Failure::Sqlite(_)) => return Err(failure),
        }
    }
    Ok((results, wakeups))
}

/// Deletes the item and delivers its result; `true` if the result reached an inbox.
fn complete_activity(connection: &Connection, completion: &ActivityCompletion) -> Result<bool, Failure> {
    let deleted = connection
        .prepare_cached("DELETE FROM activities WHERE id = ?1 AND lock_token = ?2")?
        .execute(params![completion.lock.id, completion.lock.token])?;
    if deleted == 0 {
        return Err(Failure::Contract(Error::LeaseLost));
    }
    insert_message(connection, &completion.result)
}

pub(crate) fn renew_activity_lease(
    connection: &Connection,
    lock: &ActivityLock,
    lease: Duration,
    now: Timestamp,
) -> Result<(), Failure> {
    let renewed = connection
        .prepare_cached("UPDATE activities SET visible_at = ?3 WHERE id = ?1 AND lock_token = ?2")?
        .execute(params![lock.id, lock.token, lease_end_millis(now, lease)])?;
    if renewed == 0 {
        return Err(Failure::Contract(Error::LeaseLost));
    }
    Ok(())
}

pub(crate) fn abandon_activity_item(
    connection: &Connection,
    lock: &ActivityLock,
    retry_at: Timestamp,
) -> Result<(), Failure> {
    let released = connection
        .prepare_cached("UPDATE activities SET lock_token = NULL, visible_at = ?3 WHERE id = ?1 AND lock_token = ?2")?
        .execute(params![lock.id, lock.token, millis(retry_at)])?;
    if released == 0 {
        return Err(Failure::Contract(Error::LeaseLost));
    }
    Ok(())
}

pub(crate) fn next_wakeup(connection: &Connection, now: Timestamp) -> Result<Option<Timestamp>, Failure> {
    let earliest: Option<i64> = connection
        .prepare_cached(
            "SELECT MIN(at) FROM ( \
                 SELECT MIN(visible_at) AS at FROM messages WHERE visible_at > ?1 \
                 UNION ALL \
                 SELECT MIN(visible_at) FROM activities WHERE visible_at > ?1 \
                 UNION ALL \
                 SELECT MIN(locked_until) FROM instances i WHERE locked_until > ?1 \
                     AND EXISTS (SELECT 1 FROM messages m WHERE m.instance_id = i.instance_id) \
             )",
        )?
        .query_row([millis(now)], |row| row.get(0))?;
    Ok(earliest.map(timestamp).transpose()?)
}
