//! The worker side of the store: leasing orchestration and activity work, committing
//! episodes and activity results, giving work back, and the next wake-up time.
//!
//! Competing workers never wait for each other to take work: a fetch locks the rows it
//! chooses with `SKIP LOCKED`, so concurrent fetches pass over each other's rows, and
//! writes the lease (token and end time) in the same statement. Leases compare with the
//! `now` that callers pass in: with workers on several machines, their clocks should
//! agree to well within a lease.
//!
//! An episode's commit checks its lease first, with the statement that releases it
//! (`UPDATE … WHERE lock_token = $token`): a stale commit fails before it wrote
//! anything, so commits in a batch need no savepoints; the rest of the episode is then
//! sent as one pipelined group.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use keel_core::history::{EventKind, FailureDetails, HistoryEvent, Timestamp};
use keel_store::{
    ActivityCompletion, ActivityItem, ActivityLock, EpisodeCommit, Error, Message, OrchestrationItem,
    OrchestrationLock, StoredMessage, MAX_MESSAGES_PER_ITEM,
};
use tokio_postgres::types::ToSql;

use crate::client::{insert_instance, Creation, MessageColumns, INSERT_MESSAGES};
use crate::codec::{
    count, from_json, instance_columns, instance_from_row, lease_end_millis, millis, timestamp, to_json,
    INSTANCE_COLUMN_COUNT,
};
use crate::failure::Failure;
use crate::pipeline::Pipeline;
use crate::pool::PooledConnection;
use crate::wakeups::Wakeups;

/// Locks up to `$3` unlocked instances with visible messages, the longest-waiting
/// first, for the lease `$2` until `$4`; returns them with their lock count and
/// longest-waiting message.
const LOCK_READY_INSTANCES: &str = concat!(
    "WITH ready AS ( \
         SELECT instance_id, min(visible_at) AS first_visible_at, min(id) AS first_id \
         FROM messages WHERE visible_at <= $1 GROUP BY instance_id \
     ), chosen AS ( \
         SELECT i.instance_id AS chosen_id, ready.first_visible_at, ready.first_id \
         FROM instances i JOIN ready ON ready.instance_id = i.instance_id \
         WHERE i.locked_until IS NULL OR i.locked_until <= $1 \
         ORDER BY ready.first_visible_at, ready.first_id \
         LIMIT $3 \
         FOR NO KEY UPDATE OF i SKIP LOCKED \
     ) \
     UPDATE instances SET lock_token = $2, locked_until = $4, lock_count = lock_count + 1 \
     FROM chosen WHERE instance_id = chosen.chosen_id \
     RETURNING ",
    instance_columns!(),
    ", lock_count, first_visible_at, first_id"
);

/// The visible messages of some instances, in arrival order, at most `$3` each.
const VISIBLE_MESSAGES: &str = "SELECT instance_id, id, execution_id, event, visible_at FROM ( \
         SELECT instance_id, id, execution_id, event, visible_at, \
             row_number() OVER (PARTITION BY instance_id ORDER BY id) AS position \
         FROM messages WHERE instance_id = ANY($1) AND visible_at <= $2 \
     ) AS numbered WHERE position <= $3 ORDER BY instance_id, id";

pub(crate) async fn fetch_orchestration_items(
    connection: &PooledConnection,
    max: usize,
    lease: Duration,
    now: Timestamp,
) -> Result<Vec<OrchestrationItem>, Failure> {
    let now_millis = millis(now);
    let token = uuid::Uuid::new_v4().to_string();
    let limit = i64::try_from(max).unwrap_or(i64::MAX);
    let rows =
        connection.query(LOCK_READY_INSTANCES, &[&now_millis, &token, &limit, &lease_end_millis(now, lease)]).await?;
    let mut locked = Vec::with_capacity(rows.len());
    for row in &rows {
        let instance = instance_from_row(row)?;
        let lock_count: i32 = row.try_get(INSTANCE_COLUMN_COUNT)?;
        let first_visible_at: i64 = row.try_get(INSTANCE_COLUMN_COUNT + 1)?;
        let first_id: i64 = row.try_get(INSTANCE_COLUMN_COUNT + 2)?;
        locked.push(((first_visible_at, first_id), instance, count("lock count", lock_count)?));
    }
    if locked.is_empty() {
        return Ok(Vec::new());
    }
    locked.sort_by_key(|(longest_waiting, _, _)| *longest_waiting);

    let ids: Vec<&str> = locked.iter().map(|(_, instance, _)| instance.instance_id.as_str()).collect();
    let per_item = i64::try_from(MAX_MESSAGES_PER_ITEM).expect("the limit fits in i64");
    let mut inboxes: HashMap<String, Vec<StoredMessage>> = HashMap::new();
    for row in connection.query(VISIBLE_MESSAGES, &[&ids, &now_millis, &per_item]).await? {
        let instance_id: String = row.try_get(0)?;
        let stored = StoredMessage {
            id: row.try_get(1)?,
            message: Message {
                instance_id: instance_id.clone(),
                execution_id: row.try_get(2)?,
                event: from_json("messages.event", row.try_get(3)?)?,
                visible_at: timestamp(row.try_get(4)?)?,
            },
        };
        inboxes.entry(instance_id).or_default().push(stored);
    }

    // An instance whose messages are gone was deleted (purged or replaced) since it was
    // locked: there is nothing to deliver.
    Ok(locked
        .into_iter()
        .filter_map(|(_, instance, delivery_attempts)| {
            let messages = inboxes.remove(&instance.instance_id)?;
            Some(OrchestrationItem {
                lock: OrchestrationLock { instance_id: instance.instance_id.clone(), token: token.clone() },
                instance,
                messages,
                delivery_attempts,
            })
        })
        .collect())
}

/// Releases the lease `$2` and writes the new state; returns the new history length.
/// Matches no row when the lease was lost. `$3` is the new execution id when the
/// history is replaced, `$4` the number of events appended.
const RELEASE_WITH_STATE: &str = "UPDATE instances SET \
         execution_id = coalesce($3, execution_id), \
         history_len = CASE WHEN $3::text IS NULL THEN history_len ELSE 0 END + $4, \
         status = $5, input = $6, output = $7, failure = $8, custom_status = $9, \
         last_updated_at = $10, completed_at = $11, \
         lock_token = NULL, locked_until = NULL, lock_count = 0 \
     WHERE instance_id = $1 AND lock_token = $2 \
     RETURNING history_len";

/// [`RELEASE_WITH_STATE`] for an episode that leaves the state as it is.
const RELEASE: &str = "UPDATE instances SET \
         execution_id = coalesce($3, execution_id), \
         history_len = CASE WHEN $3::text IS NULL THEN history_len ELSE 0 END + $4, \
         lock_token = NULL, locked_until = NULL, lock_count = 0 \
     WHERE instance_id = $1 AND lock_token = $2 \
     RETURNING history_len";

const DELETE_CONSUMED: &str = "DELETE FROM messages WHERE instance_id = $1 AND id = ANY($2)";

const DELETE_HISTORY: &str = "DELETE FROM history WHERE instance_id = $1";

const APPEND_HISTORY: &str = "INSERT INTO history (instance_id, seq, event) \
     SELECT $1, $2 + position - 1, event FROM unnest($3::text[]) WITH ORDINALITY AS appended (event, position)";

const INSERT_ACTIVITIES: &str = "INSERT INTO activities (instance_id, execution_id, task_id, name, input, visible_at) \
     SELECT instance_id, execution_id, task_id, name, input, $6 \
     FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::text[]) \
         AS scheduled (instance_id, execution_id, task_id, name, input)";

/// One row if the instance has a visible message.
const HAS_VISIBLE_MESSAGE: &str = "SELECT 1 FROM messages WHERE instance_id = $1 AND visible_at <= $2 LIMIT 1";

/// Commits episodes in the connection's open transaction; a stale one fails alone.
pub(crate) async fn commit_episodes(
    connection: &PooledConnection,
    commits: &[EpisodeCommit],
    now: Timestamp,
) -> Result<(Vec<keel_store::Result<()>>, Wakeups), Failure> {
    let locks: HashSet<(&str, &str)> =
        commits.iter().map(|commit| (commit.lock.instance_id.as_str(), commit.lock.token.as_str())).collect();
    if locks.len() != commits.len() {
        return Err(Failure::Contract(Error::Invalid("a batch commits each lock at most once".into())));
    }
    let mut results = Vec::with_capacity(commits.len());
    let mut wakeups = Wakeups::default();
    for commit in commits {
        match commit_episode(connection, commit, now).await {
            Ok(episode_wakeups) => {
                wakeups.merge(episode_wakeups);
                results.push(Ok(()));
            }
            Err(Failure::Contract(error)) => results.push(Err(error)),
            Err(failure @ Failure::Postgres(_)) => return Err(failure),
        }
    }
    Ok((results, wakeups))
}

/// Applies one episode's commit; see [`EpisodeCommit`]. Fails with
/// [`Error::LeaseLost`] before writing anything when the lease is stale.
async fn commit_episode(
    connection: &PooledConnection,
    commit: &EpisodeCommit,
    now: Timestamp,
) -> Result<Wakeups, Failure> {
    let instance_id = commit.lock.instance_id.as_str();
    let now_millis = millis(now);
    let appended = i64::try_from(commit.history.len()).expect("a history batch fits in i64");
    let released = match &commit.state {
        Some(state) => {
            let failure = state.failure.as_ref().map(to_json).transpose()?;
            let completed_at = state.status.is_terminal().then_some(now_millis);
            connection
                .query_opt(
                    RELEASE_WITH_STATE,
                    &[
                        &instance_id,
                        &commit.lock.token,
                        &commit.replace_history,
                        &appended,
                        &state.status.as_str(),
                        &state.input,
                        &state.output,
                        &failure,
                        &state.custom_status,
                        &now_millis,
                        &completed_at,
                    ],
                )
                .await?
        }
        None => {
            connection
                .query_opt(RELEASE, &[&instance_id, &commit.lock.token, &commit.replace_history, &appended])
                .await?
        }
    };
    let Some(released) = released else { return Err(Failure::Contract(Error::LeaseLost)) };
    let history_len: i64 = released.try_get(0)?;
    let first_seq = history_len - appended;
    assert!(first_seq >= 0, "the history of '{instance_id}' has {history_len} events after appending {appended}");

    let mut wakeups = Wakeups {
        instance_changed: commit.state.is_some(),
        activity_work: !commit.activities.is_empty(),
        ..Wakeups::default()
    };

    // Children first, so that messages of this commit can reach them.
    let mut messages = MessageColumns::default();
    for child in &commit.new_instances {
        match insert_instance(connection, child).await? {
            Creation::Created => wakeups.merge(Wakeups::NEW_MESSAGE),
            Creation::Occupied(status) => {
                if let Some(parent) = &child.parent {
                    messages.push(&refusal(child.instance_id.as_str(), status, parent, now))?;
                }
            }
        }
    }
    for message in &commit.messages {
        messages.push(message)?;
    }

    let events = commit.history.iter().map(to_json).collect::<Result<Vec<String>, _>>()?;
    let activities = ActivityColumns::new(&commit.activities);
    let [delete_consumed, delete_history, append_history, insert_activities, insert_messages, has_visible_message] =
        connection
            .statements([
                DELETE_CONSUMED,
                DELETE_HISTORY,
                APPEND_HISTORY,
                INSERT_ACTIVITIES,
                INSERT_MESSAGES,
                HAS_VISIBLE_MESSAGE,
            ])
            .await?;
    let mut pipeline = Pipeline::new(connection.client());
    if !commit.consumed.is_empty() {
        pipeline.push(&delete_consumed, vec![&instance_id, &commit.consumed]);
    }
    if commit.replace_history.is_some() {
        pipeline.push(&delete_history, vec![&instance_id]);
    }
    if !events.is_empty() {
        pipeline.push(&append_history, vec![&instance_id, &first_seq, &events]);
    }
    if !activities.is_empty() {
        let mut params = activities.params();
        params.push(&now_millis);
        pipeline.push(&insert_activities, params);
    }
    let delivered = (!messages.is_empty()).then(|| pipeline.push(&insert_messages, messages.params()));
    // Messages that arrived during the episode are work again now that the lock is gone.
    let pending = pipeline.push(&has_visible_message, vec![&instance_id, &now_millis]);
    let counts = pipeline.run().await?;
    if delivered.is_some_and(|index| counts[index] > 0) || counts[pending] > 0 {
        wakeups.orchestration_work = true;
    }
    Ok(wakeups)
}

/// The message that tells a parent its sub-orchestration could not be created.
fn refusal(
    child_id: &str,
    status: keel_core::history::RuntimeStatus,
    parent: &keel_core::history::ParentInstance,
    now: Timestamp,
) -> Message {
    Message {
        instance_id: parent.instance_id.clone(),
        execution_id: Some(parent.execution_id.clone()),
        event: HistoryEvent::new(
            now,
            EventKind::SubOrchestrationInstanceFailed {
                task_scheduled_id: parent.task_scheduled_id,
                failure: FailureDetails::new(
                    "InstanceAlreadyExists",
                    format!("an instance with id '{child_id}' already exists and is {status}"),
                ),
            },
        ),
        visible_at: now,
    }
}

/// New activity items in the column layout of [`INSERT_ACTIVITIES`].
struct ActivityColumns {
    instance_ids: Vec<String>,
    execution_ids: Vec<String>,
    task_ids: Vec<i32>,
    names: Vec<String>,
    inputs: Vec<Option<String>>,
}

impl ActivityColumns {
    fn new(activities: &[keel_store::NewActivity]) -> ActivityColumns {
        ActivityColumns {
            instance_ids: activities.iter().map(|activity| activity.instance_id.clone()).collect(),
            execution_ids: activities.iter().map(|activity| activity.execution_id.clone()).collect(),
            task_ids: activities.iter().map(|activity| activity.task_id).collect(),
            names: activities.iter().map(|activity| activity.name.clone()).collect(),
            inputs: activities.iter().map(|activity| activity.input.clone()).collect(),
        }
    }

    fn is_empty(&self) -> bool {
        self.instance_ids.is_empty()
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![&self.instance_ids, &self.execution_ids, &self.task_ids, &self.names, &self.inputs]
    }
}

/// Releases the lease and delays the instance's messages to `$3`; announces the work
/// (at its new time) to the hub's listeners. No row when the lease was lost.
const ABANDON_ORCHESTRATION: &str = "WITH released AS ( \
         UPDATE instances SET lock_token = NULL, locked_until = NULL \
         WHERE instance_id = $1 AND lock_token = $2 RETURNING instance_id \
     ), delayed AS ( \
         UPDATE messages SET visible_at = $3 \
         WHERE instance_id IN (SELECT instance_id FROM released) AND visible_at < $3 \
     ) \
     SELECT instance_id, pg_notify($4, 'o') FROM released";

pub(crate) async fn abandon_orchestration_item(
    connection: &PooledConnection,
    lock: &OrchestrationLock,
    retry_at: Timestamp,
) -> Result<(), Failure> {
    let released = connection
        .query_opt(ABANDON_ORCHESTRATION, &[&lock.instance_id, &lock.token, &millis(retry_at), &connection.channel()])
        .await?;
    match released {
        Some(_) => Ok(()),
        None => Err(Failure::Contract(Error::LeaseLost)),
    }
}

/// Leases up to `$2` visible activity items for the lease `$3` until `$4`.
const LEASE_ACTIVITIES: &str = "WITH chosen AS MATERIALIZED ( \
         SELECT id FROM activities WHERE visible_at <= $1 ORDER BY visible_at, id LIMIT $2 \
         FOR NO KEY UPDATE SKIP LOCKED \
     ) \
     UPDATE activities SET lock_token = $3, visible_at = $4, attempts = attempts + 1 \
     FROM chosen WHERE activities.id = chosen.id \
     RETURNING activities.id, instance_id, execution_id, task_id, name, input, attempts";

pub(crate) async fn fetch_activity_items(
    connection: &PooledConnection,
    max: usize,
    lease: Duration,
    now: Timestamp,
) -> Result<Vec<ActivityItem>, Failure> {
    let token = uuid::Uuid::new_v4().to_string();
    let limit = i64::try_from(max).unwrap_or(i64::MAX);
    let rows =
        connection.query(LEASE_ACTIVITIES, &[&millis(now), &limit, &token, &lease_end_millis(now, lease)]).await?;
    let mut items = rows
        .iter()
        .map(|row| {
            Ok(ActivityItem {
                lock: ActivityLock { id: row.try_get(0)?, token: token.clone() },
                instance_id: row.try_get(1)?,
                execution_id: row.try_get(2)?,
                task_id: row.try_get(3)?,
                name: row.try_get(4)?,
                input: row.try_get(5)?,
                delivery_attempts: count("activities.attempts", row.try_get(6)?)?,
            })
        })
        .collect::<Result<Vec<_>, Failure>>()?;
    items.sort_by_key(|item| item.lock.id);
    Ok(items)
}

/// Completes a batch of activities in one statement: deletes each item whose lease
/// (`$1` id, `$2` token) is current and delivers its result to its instance, if that
/// still exists; announces delivered results on channel `$7`. Returns the leases that
/// completed.
const COMPLETE_ACTIVITIES: &str = "WITH completion AS ( \
         SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[]) \
             WITH ORDINALITY AS c (id, token, instance_id, execution_id, event, visible_at, position) \
     ), completed AS ( \
         DELETE FROM activities USING completion \
         WHERE activities.id = completion.id AND activities.lock_token = completion.token \
         RETURNING activities.id, activities.lock_token \
     ), delivered AS ( \
         INSERT INTO messages (instance_id, execution_id, event, visible_at) \
         SELECT completion.instance_id, completion.execution_id, completion.event, completion.visible_at \
         FROM completion \
         JOIN completed ON completed.id = completion.id AND completed.lock_token = completion.token \
         JOIN instances target ON target.instance_id = completion.instance_id \
         ORDER BY completion.position \
         FOR KEY SHARE OF target \
         RETURNING 1 \
     ), announced AS ( \
         SELECT pg_notify($7, 'o') FROM (SELECT FROM delivered LIMIT 1) AS any_delivered \
     ) \
     SELECT id, lock_token, (SELECT count(*) FROM announced) FROM completed";

pub(crate) async fn complete_activities(
    connection: &PooledConnection,
    completions: &[ActivityCompletion],
) -> Result<(Vec<keel_store::Result<()>>, Wakeups), Failure> {
    let leases: HashSet<(i64, &str)> =
        completions.iter().map(|completion| (completion.lock.id, completion.lock.token.as_str())).collect();
    if leases.len() != completions.len() {
        return Err(Failure::Contract(Error::Invalid("a batch completes each activity lease at most once".into())));
    }
    let ids: Vec<i64> = completions.iter().map(|completion| completion.lock.id).collect();
    let tokens: Vec<&str> = completions.iter().map(|completion| completion.lock.token.as_str()).collect();
    let mut results = MessageColumns::default();
    for completion in completions {
        results.push(&completion.result)?;
    }
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&ids, &tokens];
    params.extend(results.params());
    let channel = connection.channel();
    params.push(&channel);
    let statement = connection.statement(COMPLETE_ACTIVITIES).await?;
    let rows = connection.client().query(&statement, &params).await?;

    let mut wakeups = Wakeups::default();
    let mut completed = HashSet::with_capacity(rows.len());
    for row in &rows {
        completed.insert((row.try_get::<_, i64>(0)?, row.try_get::<_, String>(1)?));
        let announced: i64 = row.try_get(2)?;
        wakeups.orchestration_work |= announced > 0;
    }
    let outcomes = completions
        .iter()
        .map(|completion| {
            let lease = (completion.lock.id, completion.lock.token.clone());
            if completed.contains(&lease) {
                Ok(())
            } else {
                Err(Error::LeaseLost)
            }
        })
        .collect();
    Ok((outcomes, wakeups))
}

const RENEW_ACTIVITY_LEASE: &str = "UPDATE activities SET visible_at = $3 WHERE id = $1 AND lock_token = $2";

pub(crate) async fn renew_activity_lease(
    connection: &PooledConnection,
    lock: &ActivityLock,
    lease: Duration,
    now: Timestamp,
) -> Result<(), Failure> {
    let renewed =
        connection.execute(RENEW_ACTIVITY_LEASE, &[&lock.id, &lock.token, &lease_end_millis(now, lease)]).await?;
    if renewed == 0 {
        return Err(Failure::Contract(Error::LeaseLost));
    }
    Ok(())
}

/// Gives an item back, visible again at `$3`; announces it on channel `$4`.
const ABANDON_ACTIVITY: &str = "WITH released AS ( \
         UPDATE activities SET lock_token = NULL, visible_at = $3 WHERE id = $1 AND lock_token = $2 RETURNING id \
     ) \
     SELECT id, pg_notify($4, 'a') FROM released";

pub(crate) async fn abandon_activity_item(
    connection: &PooledConnection,
    lock: &ActivityLock,
    retry_at: Timestamp,
) -> Result<(), Failure> {
    let released = connection
        .query_opt(ABANDON_ACTIVITY, &[&lock.id, &lock.token, &millis(retry_at), &connection.channel()])
        .await?;
    match released {
        Some(_) => Ok(()),
        None => Err(Failure::Contract(Error::LeaseLost)),
    }
}

const NEXT_WAKEUP: &str = "SELECT least( \
         (SELECT min(visible_at) FROM messages WHERE visible_at > $1), \
         (SELECT min(visible_at) FROM activities WHERE visible_at > $1), \
         (SELECT min(locked_until) FROM instances i WHERE locked_until > $1 \
             AND EXISTS (SELECT 1 FROM messages m WHERE m.instance_id = i.instance_id)) \
     )";

pub(crate) async fn next_wakeup(connection: &PooledConnection, now: Timestamp) -> Result<Option<Timestamp>, Failure> {
    let earliest: Option<i64> = connection.query_one(NEXT_WAKEUP, &[&millis(now)]).await?.try_get(0)?;
    earliest.map(timestamp).transpose()
}
