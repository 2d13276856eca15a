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
//!
//! A direct episode ([`keel_store::DirectClaim`]) claims its instance in the same
//! statement: instead of the lock's token, the row must be unlocked and as the worker
//! left it, with no visible message in its inbox. The activity items whose results it
//! records are locked first (`FOR UPDATE`), so that none changes hands before they are
//! deleted with the batch; items created leased return their ids.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use keel_core::history::{EventKind, FailureDetails, HistoryEvent, Timestamp};
use keel_core::trace::TraceContext;
use keel_store::{
    ActivityCompletion, ActivityItem, ActivityLock, Committed, EpisodeCommit, Error, Message, OrchestrationItem,
    OrchestrationLock, StoredMessage, MAX_MESSAGES_PER_ITEM,
};
use tokio_postgres::types::ToSql;

use crate::client::{insert_instance, Creation, MessageColumns, INSERT_MESSAGES};
use crate::codec::{
    count, from_json, instance_columns, instance_from_row, lease_end_millis, millis, timestamp, to_json,
    INSTANCE_COLUMN_COUNT,
};
use crate::failure::Failure;
use crate::pipeline::{self, Pipeline};
use crate::pool::{PooledConnection, BEGIN};
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
                 $8::text[], $9::text[], $10::text[], $11::bigint[], $13::text[], $14::bool[], $15::text[], \
                 $16::bigint[], $17::text[], $18::bigint[]) WITH ORDINALITY \
         AS c (instance_id, token, new_execution_id, appended, has_state, status, input, output, failure, \
               custom_status, completed_at, version, direct, claimed_execution_id, claimed_history_len, \
               claimed_status, completed, ordinal) \
     WHERE i.instance_id = c.instance_id AND CASE WHEN c.direct THEN \
             (i.locked_until IS NULL OR i.locked_until <= $12) AND i.execution_id = c.claimed_execution_id \
             AND i.history_len = c.claimed_history_len AND i.status = c.claimed_status \
             AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.instance_id = i.instance_id AND m.visible_at <= $12) \
             AND c.completed = (SELECT count(*) FROM unnest($19::bigint[], $20::bigint[], $21::text[]) \
                     AS k (ordinal, id, token) \
                 JOIN activities a ON a.id = k.id AND a.lock_token = k.token WHERE k.ordinal = c.ordinal) \
         ELSE i.lock_token = c.token END \
     RETURNING i.instance_id, c.token, i.history_len";

/// Locks the activity items direct episodes record the results of, as far as they are
/// still leased so (sent before [`RELEASE_LEASES`], which counts them): none changes
/// hands before the batch deletes them.
const LOCK_COMPLETED: &str = "SELECT a.id FROM activities a \
     JOIN unnest($1::bigint[], $2::text[]) AS c (id, token) ON a.id = c.id AND a.lock_token = c.token \
     FOR UPDATE OF a";

/// Deletes the activity items whose results committed direct episodes recorded.
const DELETE_COMPLETED: &str = "DELETE FROM activities WHERE id = ANY($1)";

const DELETE_CONSUMED: &str =
    "DELETE FROM messages USING unnest($1::text[], $2::bigint[]) AS consumed (instance_id, id) \
     WHERE messages.id = consumed.id AND messages.instance_id = consumed.instance_id";

const DELETE_HISTORIES: &str = "DELETE FROM history WHERE instance_id = ANY($1)";

const APPEND_HISTORY: &str =
    "INSERT INTO history (instance_id, seq, event) SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[])";

/// Creates activity items; one created leased (a token) starts at attempt 1, its lease
/// ending at its `until`, and returns its id.
const INSERT_ACTIVITIES: &str = "INSERT INTO activities \
         (instance_id, execution_id, task_id, name, input, trace_parent, trace_state, visible_at, lock_token, \
          attempts) \
     SELECT instance_id, execution_id, task_id, name, input, trace_parent, trace_state, coalesce(until, $8), token, \
         CASE WHEN token IS NULL THEN 0 ELSE 1 END \
     FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::text[], $6::text[], $7::text[], $9::text[], \
                 $10::bigint[]) \
         AS scheduled (instance_id, execution_id, task_id, name, input, trace_parent, trace_state, token, until) \
     RETURNING id, instance_id, execution_id, task_id, lock_token";

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
) -> Result<(Vec<keel_store::Result<Committed>>, Wakeups), Failure> {
    let locks: HashSet<(&str, &str)> =
        commits.iter().map(|commit| (commit.lock.instance_id.as_str(), commit.lock.token.as_str())).collect();
    if locks.len() != commits.len() {
        return Err(Failure::Contract(Error::Invalid("a batch commits each lock at most once".into())));
    }
    let now_millis = millis(now);
    let released = open_and_release(connection, commits, now_millis).await?;
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
        activity_work: held.iter().any(|(commit, _)| commit.activities.iter().any(|activity| activity.lease.is_none())),
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
    let [delete_consumed, delete_histories, append_history, insert_activities, insert_messages, any_visible_message, delete_completed] =
        connection
            .statements([
                DELETE_CONSUMED,
                DELETE_HISTORIES,
                APPEND_HISTORY,
                INSERT_ACTIVITIES,
                INSERT_MESSAGES,
                ANY_VISIBLE_MESSAGE,
                DELETE_COMPLETED,
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
    if !writes.completed_ids.is_empty() {
        pipeline.push(&delete_completed, vec![&writes.completed_ids]);
    }
    let inserted = (!writes.activities.is_empty()).then(|| {
        let mut params = writes.activities.params();
        params.insert(7, &now_millis);
        pipeline.push_query(&insert_activities, params)
    });
    let delivered = (!messages.is_empty()).then(|| pipeline.push(&insert_messages, messages.params()));
    // Messages that arrived during the episodes are work again now that the locks are gone.
    let pending =
        (!writes.unlocked.is_empty()).then(|| pipeline.push(&any_visible_message, vec![&writes.unlocked, &now_millis]));
    let answers = pipeline.run().await?;
    let found = |index: Option<usize>| index.is_some_and(|index| answers[index].count() > 0);
    wakeups.orchestration_work |= found(delivered) || found(pending);
    // The ids of the items created leased, by (instance, execution, task).
    let mut leased: HashMap<(String, String, i32), i64> = HashMap::new();
    if let Some(pipeline::Answer::Rows(rows)) = inserted.map(|index| &answers[index]) {
        for row in rows {
            if row.try_get::<_, Option<String>>(4)?.is_some() {
                leased.insert((row.try_get(1)?, row.try_get(2)?, row.try_get(3)?), row.try_get(0)?);
            }
        }
    }

    let results = commits
        .iter()
        .map(|commit| {
            if !released.contains_key(&(commit.lock.instance_id.clone(), commit.lock.token.clone())) {
                return Err(Error::LeaseLost);
            }
            let leased_activity_ids = commit
                .activities
                .iter()
                .filter(|activity| activity.lease.is_some())
                .map(|activity| {
                    let key = (activity.instance_id.clone(), activity.execution_id.clone(), activity.task_id);
                    leased.get(&key).copied().ok_or_else(|| Error::Backend {
                        message: "a leased activity item returned no id".into(),
                        retryable: false,
                    })
                })
                .collect::<Result<_, _>>()?;
            Ok(Committed { leased_activity_ids })
        })
        .collect();
    Ok((results, wakeups))
}

/// The transaction's first round trip, for a batch: `BEGIN` (the caller opened the
/// transaction without sending it), [`LOCK_COMPLETED`] when the batch has direct
/// episodes, and [`RELEASE_LEASES`], sent together. Returns the (instance, token) pairs
/// whose lease (or direct claim) held, with the instance's new history length.
async fn open_and_release(
    connection: &PooledConnection,
    commits: &[EpisodeCommit],
    now_millis: i64,
) -> Result<HashMap<(String, String), i64>, Failure> {
    let columns = ReleaseColumns::of(commits, now_millis)?;
    let [begin, lock_completed, release] = connection.statements([BEGIN, LOCK_COMPLETED, RELEASE_LEASES]).await?;
    let mut pipeline = Pipeline::new(connection.client());
    pipeline.push(&begin, Vec::new());
    if !columns.completed_ids.is_empty() {
        pipeline.push(&lock_completed, vec![&columns.completed_ids, &columns.completed_tokens]);
    }
    let released = pipeline.push_query(&release, columns.params());
    let mut answers = pipeline.run().await?;
    let pipeline::Answer::Rows(rows) = answers.swap_remove(released) else {
        unreachable!("push_query answers with rows")
    };
    rows.iter().map(|row| Ok(((row.try_get(0)?, row.try_get(1)?), row.try_get(2)?))).collect()
}

/// The parameters of [`RELEASE_LEASES`] (and [`LOCK_COMPLETED`]) for a batch.
struct ReleaseColumns<'c> {
    instance_ids: Vec<&'c str>,
    tokens: Vec<&'c str>,
    new_execution_ids: Vec<Option<&'c str>>,
    appended: Vec<i64>,
    has_state: Vec<bool>,
    statuses: Vec<Option<&'c str>>,
    inputs: Vec<Option<&'c str>>,
    outputs: Vec<Option<&'c str>>,
    failures: Vec<Option<String>>,
    custom_statuses: Vec<Option<&'c str>>,
    completed_at: Vec<Option<i64>>,
    now_millis: i64,
    versions: Vec<Option<&'c str>>,
    direct: Vec<bool>,
    claimed_execution_ids: Vec<Option<&'c str>>,
    claimed_history_lens: Vec<Option<i64>>,
    claimed_statuses: Vec<Option<&'c str>>,
    /// Per commit, how many activity items its direct claim records.
    completed_counts: Vec<i64>,
    /// Those items, flat: the commit's ordinal (from 1), the id and the token.
    completed_ordinals: Vec<i64>,
    completed_ids: Vec<i64>,
    completed_tokens: Vec<&'c str>,
}

impl<'c> ReleaseColumns<'c> {
    fn of(commits: &'c [EpisodeCommit], now_millis: i64) -> Result<ReleaseColumns<'c>, Failure> {
        let n = commits.len();
        let mut columns = ReleaseColumns {
            instance_ids: Vec::with_capacity(n),
            tokens: Vec::with_capacity(n),
            new_execution_ids: Vec::with_capacity(n),
            appended: Vec::with_capacity(n),
            has_state: Vec::with_capacity(n),
            statuses: Vec::with_capacity(n),
            inputs: Vec::with_capacity(n),
            outputs: Vec::with_capacity(n),
            failures: Vec::with_capacity(n),
            custom_statuses: Vec::with_capacity(n),
            completed_at: Vec::with_capacity(n),
            now_millis,
            versions: Vec::with_capacity(n),
            direct: Vec::with_capacity(n),
            claimed_execution_ids: Vec::with_capacity(n),
            claimed_history_lens: Vec::with_capacity(n),
            claimed_statuses: Vec::with_capacity(n),
            completed_counts: Vec::with_capacity(n),
            completed_ordinals: Vec::new(),
            completed_ids: Vec::new(),
            completed_tokens: Vec::new(),
        };
        for (ordinal, commit) in (1..).zip(commits) {
            columns.instance_ids.push(commit.lock.instance_id.as_str());
            columns.tokens.push(commit.lock.token.as_str());
            columns.new_execution_ids.push(commit.replace_history.as_deref());
            columns.appended.push(i64::try_from(commit.history.len()).expect("a history batch fits in i64"));
            columns.has_state.push(commit.state.is_some());
            let state = commit.state.as_ref();
            columns.statuses.push(state.map(|state| state.status.as_str()));
            columns.inputs.push(state.and_then(|state| state.input.as_deref()));
            columns.outputs.push(state.and_then(|state| state.output.as_deref()));
            columns.failures.push(state.and_then(|state| state.failure.as_ref()).map(to_json).transpose()?);
            columns.custom_statuses.push(state.and_then(|state| state.custom_status.as_deref()));
            columns.completed_at.push(state.filter(|state| state.status.is_terminal()).map(|_| now_millis));
            columns.versions.push(state.and_then(|state| state.version.as_deref()));
            let claim = commit.direct.as_ref();
            columns.direct.push(claim.is_some());
            columns.claimed_execution_ids.push(claim.map(|claim| claim.execution_id.as_str()));
            columns.claimed_history_lens.push(claim.map(|claim| i64::try_from(claim.history_len).unwrap_or(i64::MAX)));
            columns.claimed_statuses.push(claim.map(|claim| claim.status.as_str()));
            let completed = claim.map_or(&[][..], |claim| claim.completed.as_slice());
            columns.completed_counts.push(completed.len() as i64);
            for lock in completed {
                columns.completed_ordinals.push(ordinal);
                columns.completed_ids.push(lock.id);
                columns.completed_tokens.push(lock.token.as_str());
            }
        }
        Ok(columns)
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.instance_ids,
            &self.tokens,
            &self.new_execution_ids,
            &self.appended,
            &self.has_state,
            &self.statuses,
            &self.inputs,
            &self.outputs,
            &self.failures,
            &self.custom_statuses,
            &self.completed_at,
            &self.now_millis,
            &self.versions,
            &self.direct,
            &self.claimed_execution_ids,
            &self.claimed_history_lens,
            &self.claimed_statuses,
            &self.completed_counts,
            &self.completed_ordinals,
            &self.completed_ids,
            &self.completed_tokens,
        ]
    }
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
    /// Activity items whose results direct episodes recorded.
    completed_ids: Vec<i64>,
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
        if let Some(claim) = &commit.direct {
            self.completed_ids.extend(claim.completed.iter().map(|lock| lock.id));
        }
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
    lease_tokens: Vec<Option<String>>,
    lease_ends: Vec<Option<i64>>,
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
            self.lease_tokens.push(activity.lease.as_ref().map(|lease| lease.token.clone()));
            self.lease_ends.push(activity.lease.as_ref().map(|lease| millis(lease.until)));
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
            &self.lease_tokens,
            &self.lease_ends,
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
