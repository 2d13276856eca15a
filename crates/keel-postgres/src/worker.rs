//! The worker side of the store: leasing orchestration and activity work, committing
//! episodes and activity results, giving work back, and the next wake-up time.
//!
//! Competing workers never wait for each other to take work: a fetch locks the rows it
//! chooses with `SKIP LOCKED`, so concurrent fetches pass over each other's rows, and
//! writes the lease (token and end time) in the same statement. Leases compare with the
//! `now` that callers pass in: with workers on several machines, their clocks should
//! agree to well within a lease.
//!
//! A batch of episode commits takes a fixed number of round trips whatever its size:
//! the statement that releases the leases (`UPDATE … WHERE lock_token = token`) checks
//! them all first, so a stale commit is left out before anything of it is written and
//! needs no savepoint; the rest of the batch is written with one statement per table,
//! sent as one pipelined group.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use keel_core::history::{EventKind, FailureDetails, HistoryEvent, Timestamp};
use keel_core::trace::TraceContext;
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

    let mut items = Vec::with_capacity(locked.len());
    let mut without_messages = Vec::new();
    for (_, instance, delivery_attempts) in locked {
        match inboxes.remove(&instance.instance_id) {
            Some(messages) => items.push(OrchestrationItem {
                lock: OrchestrationLock { instance_id: instance.instance_id.clone(), token: token.clone() },
                instance,
                messages,
                delivery_attempts,
            }),
            None => without_messages.push(instance.instance_id),
        }
    }
    if !without_messages.is_empty() {
        // The lock statement chose these from a snapshot taken before another worker's
        // commit consumed their messages (or a purge deleted them), and locked them once
        // that commit had released them. Nothing to deliver: give them back at once
        // rather than at the end of the lease.
        connection.query(RELEASE_WITHOUT_MESSAGES, &[&without_messages, &token, &connection.channel()]).await?;
    }
    Ok(items)
}

/// Undoes the locks of `$1` taken with token `$2` (their count included) and announces
/// them on channel `$3`, in case a message arrived meanwhile.
const RELEASE_WITHOUT_MESSAGES: &str = "WITH released AS ( \
         UPDATE instances SET lock_token = NULL, locked_until = NULL, lock_count = lock_count - 1 \
         WHERE instance_id = ANY($1) AND lock_token = $2 RETURNING instance_id \
     ) \
     SELECT instance_id, pg_notify($3, 'o') FROM released";

/// Releases the leases of a batch and writes each instance's new state, in one
/// statement; returns the instances whose lease held, with their new history length.
/// A commit with `has_state` false leaves the state columns as they are; a new
/// execution id (continue-as-new, rewind) restarts the history count.
const RELEASE_LEASES: &str = "UPDATE instances AS i SET \
         execution_id = coalesce(c.new_execution_id, i.execution_id), \
         history_len = CASE WHEN c.new_execution_id IS NULL THEN i.history_len ELSE 0 END + c.appended, \
         status = CASE WHEN c.has_state THEN c.status ELSE i.status END, \
         input = CASE WHEN c.has_state THEN c.input ELSE i.input END, \
         output = CASE WHEN c.has_state THEN c.output ELSE i.output END, \
         failure = CASE WHEN c.has_state THEN c.failure ELSE i.failure END, \
         custom_status = CASE WHEN c.has_state THEN c.custom_status ELSE i.custom_status END, \
         last_updated_at = CASE WHEN c.has_state THEN $12 ELSE i.last_updated_at END, \
         completed_at = CASE WHEN c.has_state THEN c.completed_at ELSE i.completed_at END, \
         version = CASE WHEN c.has_state THEN c.version ELSE i.version END, \
         lock_token = NULL, locked_until = NULL, lock_count = 0 \
     FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bool[], $6::text[], $7::text[], \
                 $8::text[], $9::text[], $10::text[], $11::bigint[], $13::text[]) \
         AS c (instance_id, token, new_execution_id, appended, has_state, status, input, output, failure, \
               custom_status, completed_at, version) \
     WHERE i.instance_id = c.instance_id AND i.lock_token = c.token \
     RETURNING i.instance_id, c.token, i.history_len";

const DELETE_CONSUMED: &str =
    "DELETE FROM messages USING unnest($1::text[], $2::bigint[]) AS consumed (instance_id, id) \
     WHERE messages.id = consumed.id AND messages.instance_id = consumed.instance_id";

const DELETE_HISTORIES: &str = "DELETE FROM history WHERE instance_id = ANY($1)";

const APPEND_HISTORY: &str =
    "INSERT INTO history (instance_id, seq, event) SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[])";

const INSERT_ACTIVITIES: &str = "INSERT INTO activities \
         (instance_id, execution_id, task_id, name, input, trace_parent, trace_state, visible_at) \
     SELECT instance_id, execution_id, task_id, name, input, trace_parent, trace_state, $8 \
     FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::text[], $6::text[], $7::text[]) \
         AS scheduled (instance_id, execution_id, task_id, name, input, trace_parent, trace_state)";

/// One row if one of the instances has a visible message.
const ANY_VISIBLE_MESSAGE: &str = "SELECT 1 FROM messages WHERE instance_id = ANY($1) AND visible_at <= $2 LIMIT 1";

/// Commits a batch of episodes in the connection's open transaction, in three steps
/// whatever the batch's size: one statement releases every lease that is still held
/// and writes the new states (a stale commit is left out before anything of it is
/// written: it fails alone, with no savepoint); then the sub-orchestrations are
/// created, in commit order; then one pipelined group of statements writes everything
/// else (consumed messages, histories, activity items, messages and the entity rows
/// they create).
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
    let now_millis = millis(now);
    let released = release_leases(connection, commits, now_millis).await?;
    // The commits whose lease held, each with the sequence number of its first new event.
    let held: Vec<(&EpisodeCommit, i64)> = commits
        .iter()
        .filter_map(|commit| {
            let history_len = released.get(&(commit.lock.instance_id.clone(), commit.lock.token.clone()))?;
            let appended = i64::try_from(commit.history.len()).expect("a history batch fits in i64");
            let first_seq = history_len - appended;
            assert!(first_seq >= 0, "{}: history of {history_len} after appending {appended}", commit.lock.instance_id);
            Some((commit, first_seq))
        })
        .collect();
    let mut wakeups = Wakeups {
        instance_changed: held.iter().any(|(commit, _)| commit.state.is_some()),
        activity_work: held.iter().any(|(commit, _)| !commit.activities.is_empty()),
        ..Wakeups::default()
    };

    // Children first, so that messages of this batch can reach them.
    let batch_instances: HashSet<&str> = held.iter().map(|(commit, _)| commit.lock.instance_id.as_str()).collect();
    let mut replaced = HashSet::new();
    let mut messages = MessageColumns::default();
    for (commit, _) in &held {
        for child in &commit.new_instances {
            match insert_instance(connection, child).await? {
                Creation::Created => {
                    wakeups.merge(Wakeups::NEW_MESSAGE);
                    if batch_instances.contains(child.instance_id.as_str()) {
                        // A terminal instance of this batch was replaced as a whole: its
                        // own episode's writes are gone with it, as if it had committed
                        // first.
                        replaced.insert(child.instance_id.as_str());
                    }
                }
                Creation::Occupied(status) => {
                    if let Some(parent) = &child.parent {
                        messages.push(&refusal(child.instance_id.as_str(), status, parent, now))?;
                    }
                }
            }
        }
    }

    let mut writes = EpisodeWrites::default();
    for (commit, first_seq) in &held {
        let instance_id = commit.lock.instance_id.as_str();
        if replaced.contains(instance_id) {
            for message in commit.messages.iter().filter(|message| message.instance_id != instance_id) {
                messages.push(message)?;
            }
            continue;
        }
        writes.add(commit, *first_seq)?;
        for message in &commit.messages {
            messages.push(message)?;
        }
    }
    let [delete_consumed, delete_histories, append_history, insert_activities, insert_messages, any_visible_message] =
        connection
            .statements([
                DELETE_CONSUMED,
                DELETE_HISTORIES,
                APPEND_HISTORY,
                INSERT_ACTIVITIES,
                INSERT_MESSAGES,
                ANY_VISIBLE_MESSAGE,
            ])
            .await?;
    let mut pipeline = Pipeline::new(connection.client());
    if !writes.consumed_ids.is_empty() {
        pipeline.push(&delete_consumed, vec![&writes.consumed_instances, &writes.consumed_ids]);
    }
    if !writes.replaced_histories.is_empty() {
        pipeline.push(&delete_histories, vec![&writes.replaced_histories]);
    }
    if !writes.history_events.is_empty() {
        pipeline.push(&append_history, vec![&writes.history_instances, &writes.history_seqs, &writes.history_events]);
    }
    if !writes.activities.is_empty() {
        let mut params = writes.activities.params();
        params.push(&now_millis);
        pipeline.push(&insert_activities, params);
    }
    let delivered = (!messages.is_empty()).then(|| pipeline.push(&insert_messages, messages.params()));
    // Messages that arrived during the episodes are work again now that the locks are gone.
    let pending =
        (!writes.unlocked.is_empty()).then(|| pipeline.push(&any_visible_message, vec![&writes.unlocked, &now_millis]));
    let counts = pipeline.run().await?;
    let found = |index: Option<usize>| index.is_some_and(|index| counts[index] > 0);
    wakeups.orchestration_work |= found(delivered) || found(pending);

    let results = commits
        .iter()
        .map(|commit| {
            if released.contains_key(&(commit.lock.instance_id.clone(), commit.lock.token.clone())) {
                Ok(())
            } else {
                Err(Error::LeaseLost)
            }
        })
        .collect();
    Ok((results, wakeups))
}

/// Runs [`RELEASE_LEASES`] for a batch: the (instance, token) pairs whose lease held,
/// with the instance's new history length.
async fn release_leases(
    connection: &PooledConnection,
    commits: &[EpisodeCommit],
    now_millis: i64,
) -> Result<HashMap<(String, String), i64>, Failure> {
    let mut instance_ids = Vec::with_capacity(commits.len());
    let mut tokens = Vec::with_capacity(commits.len());
    let mut new_execution_ids = Vec::with_capacity(commits.len());
    let mut appended = Vec::with_capacity(commits.len());
    let mut has_state = Vec::with_capacity(commits.len());
    let mut statuses = Vec::with_capacity(commits.len());
    let mut inputs = Vec::with_capacity(commits.len());
    let mut outputs = Vec::with_capacity(commits.len());
    let mut failures = Vec::with_capacity(commits.len());
    let mut custom_statuses = Vec::with_capacity(commits.len());
    let mut completed_at = Vec::with_capacity(commits.len());
    let mut versions = Vec::with_capacity(commits.len());
    for commit in commits {
        instance_ids.push(commit.lock.instance_id.as_str());
        tokens.push(commit.lock.token.as_str());
        new_execution_ids.push(commit.replace_history.as_deref());
        appended.push(i64::try_from(commit.history.len()).expect("a history batch fits in i64"));
        has_state.push(commit.state.is_some());
        let state = commit.state.as_ref();
        statuses.push(state.map(|state| state.status.as_str()));
        inputs.push(state.and_then(|state| state.input.as_deref()));
        outputs.push(state.and_then(|state| state.output.as_deref()));
        failures.push(state.and_then(|state| state.failure.as_ref()).map(to_json).transpose()?);
        custom_statuses.push(state.and_then(|state| state.custom_status.as_deref()));
        completed_at.push(state.filter(|state| state.status.is_terminal()).map(|_| now_millis));
        versions.push(state.and_then(|state| state.version.as_deref()));
    }
    let rows = connection
        .query(
            RELEASE_LEASES,
            &[
                &instance_ids,
                &tokens,
                &new_execution_ids,
                &appended,
                &has_state,
                &statuses,
                &inputs,
                &outputs,
                &failures,
                &custom_statuses,
                &completed_at,
                &now_millis,
                &versions,
            ],
        )
        .await?;
    rows.iter().map(|row| Ok(((row.try_get(0)?, row.try_get(1)?), row.try_get(2)?))).collect()
}

/// What the episodes of a batch write besides their state and messages, one array per
/// column of each statement.
#[derive(Default)]
struct EpisodeWrites {
    consumed_instances: Vec<String>,
    consumed_ids: Vec<i64>,
    /// Instances whose history is replaced (a new execution).
    replaced_histories: Vec<String>,
    history_instances: Vec<String>,
    history_seqs: Vec<i64>,
    history_events: Vec<String>,
    activities: ActivityColumns,
    /// Instances unlocked by this batch.
    unlocked: Vec<String>,
}

impl EpisodeWrites {
    fn add(&mut self, commit: &EpisodeCommit, first_seq: i64) -> Result<(), Failure> {
        let instance_id = &commit.lock.instance_id;
        for &id in &commit.consumed {
            self.consumed_instances.push(instance_id.clone());
            self.consumed_ids.push(id);
        }
        if commit.replace_history.is_some() {
            self.replaced_histories.push(instance_id.clone());
        }
        for (seq, event) in (first_seq..).zip(&commit.history) {
            self.history_instances.push(instance_id.clone());
            self.history_seqs.push(seq);
            self.history_events.push(to_json(event)?);
        }
        self.activities.extend(&commit.activities);
        self.unlocked.push(instance_id.clone());
        Ok(())
    }
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
#[derive(Default)]
struct ActivityColumns {
    instance_ids: Vec<String>,
    execution_ids: Vec<String>,
    task_ids: Vec<i32>,
    names: Vec<String>,
    inputs: Vec<Option<String>>,
    trace_parents: Vec<Option<String>>,
    trace_states: Vec<Option<String>>,
}

impl ActivityColumns {
    fn extend(&mut self, activities: &[keel_store::NewActivity]) {
        for activity in activities {
            self.instance_ids.push(activity.instance_id.clone());
            self.execution_ids.push(activity.execution_id.clone());
            self.task_ids.push(activity.task_id);
            self.names.push(activity.name.clone());
            self.inputs.push(activity.input.clone());
            self.trace_parents.push(activity.trace.as_ref().map(|trace| trace.trace_parent.clone()));
            self.trace_states.push(activity.trace.as_ref().and_then(|trace| trace.trace_state.clone()));
        }
    }

    fn is_empty(&self) -> bool {
        self.instance_ids.is_empty()
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.instance_ids,
            &self.execution_ids,
            &self.task_ids,
            &self.names,
            &self.inputs,
            &self.trace_parents,
            &self.trace_states,
        ]
    }
}

/// Releases the lease and keeps the instance from being fetched before `$3` (the
/// instance waits, not its messages: one that arrives meanwhile must not be delivered
/// ahead of those given back); announces the work (at its new time) to the hub's
/// listeners. No row when the lease was lost.
const ABANDON_ORCHESTRATION: &str = "WITH released AS ( \
         UPDATE instances SET lock_token = NULL, locked_until = $3, lock_count = greatest(lock_count - 1, 0) \
         WHERE instance_id = $1 AND lock_token = $2 RETURNING instance_id \
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
     RETURNING activities.id, instance_id, execution_id, task_id, name, input, attempts, trace_parent, trace_state";

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
                trace: row
                    .try_get::<_, Option<String>>(7)?
                    .map(|trace_parent| Ok::<_, Failure>(TraceContext { trace_parent, trace_state: row.try_get(8)? }))
                    .transpose()?,
            })
        })
        .collect::<Result<Vec<_>, Failure>>()?;
    items.sort_by_key(|item| item.lock.id);
    Ok(items)
}

/// Completes a batch of activities in one statement: deletes each item whose lease
/// (`$1` id, `$2` token) is current and delivers its result (`$3`–`$9`, the columns of
/// [`INSERT_MESSAGES`]) to its instance, if that still exists, or to its entity,
/// created if needed, as [`INSERT_MESSAGES`] does; announces delivered results on
/// channel `$10`. Returns the leases that completed.
const COMPLETE_ACTIVITIES: &str = "WITH completion AS ( \
         SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], \
                              $7::text[], $8::bigint[]) \
             WITH ORDINALITY AS c (id, token, instance_id, execution_id, event, visible_at, entity_name, sent_at, \
                                   position) \
     ), completed AS ( \
         DELETE FROM activities USING completion \
         WHERE activities.id = completion.id AND activities.lock_token = completion.token \
         RETURNING activities.id, activities.lock_token \
     ), result AS ( \
         SELECT completion.* FROM completion \
         JOIN completed ON completed.id = completion.id AND completed.lock_token = completion.token \
     ), created AS ( \
         INSERT INTO instances (instance_id, name, execution_id, status, created_at, last_updated_at) \
         SELECT DISTINCT ON (instance_id COLLATE \"C\") instance_id, entity_name, '', $9, sent_at, sent_at \
         FROM result WHERE entity_name IS NOT NULL \
         ORDER BY instance_id COLLATE \"C\", position \
         ON CONFLICT (instance_id) DO NOTHING \
     ), delivered AS ( \
         INSERT INTO messages (instance_id, execution_id, event, visible_at) \
         SELECT instance_id, execution_id, event, visible_at FROM result \
         WHERE entity_name IS NOT NULL OR instance_id IN ( \
             SELECT target.instance_id FROM instances target WHERE target.instance_id = ANY($3::text[]) \
             FOR KEY SHARE OF target \
         ) \
         ORDER BY position \
         RETURNING 1 \
     ), announced AS ( \
         SELECT pg_notify($10, 'o') FROM (SELECT FROM delivered LIMIT 1) AS any_delivered \
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

const RENEW_ORCHESTRATION_LEASE: &str =
    "UPDATE instances SET locked_until = $3 WHERE instance_id = $1 AND lock_token = $2";

pub(crate) async fn renew_orchestration_lease(
    connection: &PooledConnection,
    lock: &OrchestrationLock,
    lease: Duration,
    now: Timestamp,
) -> Result<(), Failure> {
    let renewed = connection
        .execute(RENEW_ORCHESTRATION_LEASE, &[&lock.instance_id, &lock.token, &lease_end_millis(now, lease)])
        .await?;
    if renewed == 0 {
        return Err(Failure::Contract(Error::LeaseLost));
    }
    Ok(())
}

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
    Ok(earliest.map(timestamp).transpose()?)
}
