//! The client side of the store: creating instances, delivering events, reading state,
//! querying and purging. Also the row-level helpers the worker side shares (inserting
//! an instance, inserting messages).
//!
//! Rows that other processes may change at the same time are locked before they are
//! read for a decision: an instance about to be replaced `FOR UPDATE`, the target of an
//! event `FOR SHARE` (so that a commit that finishes the instance is seen), the target
//! of a message `FOR KEY SHARE` (it must not be deleted under the message; this lock
//! does not wait for a worker's commit of that instance), an empty entity about to be
//! removed `FOR UPDATE` (so that the removal sees every message whose writer held it).
//!
//! A message to an entity id with no row creates the row ([`INSERT_MESSAGES`]); which
//! ids are entities, and their names, is decided in Rust by [`keel_store::entity_name`].

use keel_core::history::{EventKind, HistoryEvent, RuntimeStatus, Timestamp};
use keel_store::{
    EntityQuery, Error, InstancePage, InstanceQuery, InstanceRecord, Message, NewInstance, PurgeFilter,
    DEFAULT_PAGE_SIZE,
};
use tokio_postgres::types::ToSql;

use crate::codec::{from_json, instance_columns, instance_from_row, millis, status_from_text, to_json};
use crate::failure::{unavailable, Failure};
use crate::pool::PooledConnection;

/// What [`insert_instance`] did.
pub(crate) enum Creation {
    Created,
    /// A non-terminal instance holds the id; nothing was written.
    Occupied(RuntimeStatus),
}

/// How often [`insert_instance`] tries when other transactions keep creating and
/// deleting the same id under it.
const INSERT_ATTEMPTS: usize = 5;

const INSERT_INSTANCE: &str = "INSERT INTO instances (instance_id, name, version, execution_id, status, input, \
     parent, scheduled_start, created_at, last_updated_at, tags) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10) \
     ON CONFLICT (instance_id) DO NOTHING";

const LOCK_FOR_REPLACEMENT: &str = "SELECT status FROM instances WHERE instance_id = $1 FOR UPDATE";

const DELETE_INSTANCE: &str = "DELETE FROM instances WHERE instance_id = $1";

/// Inserts messages (see [`MessageColumns`]: `$1`–`$6`, the entity status `$7`) in the
/// order given, in one statement. A message to an orchestration instance is inserted if
/// the instance exists, which is then kept from being deleted until the transaction
/// ends. A message to an entity (its name in `$5`) first creates the entity's row if
/// there is none (created at the event time of its first message here), and is then
/// inserted whatever this statement's snapshot shows: the row may have been created by
/// a transaction that committed after the snapshot was taken. Its foreign key check,
/// which runs at the end of the statement with a fresh snapshot, then locks the row
/// (`FOR KEY SHARE`), or fails (a retryable error) if a concurrent removal deleted it
/// meanwhile: a message to an entity is never dropped silently.
///
/// New entity rows are inserted in id order, so that two transactions creating the
/// same entities wait for each other in the same order, never in a cycle.
pub(crate) const INSERT_MESSAGES: &str = "WITH sent AS ( \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::bigint[]) \
             WITH ORDINALITY AS sent (instance_id, execution_id, event, visible_at, entity_name, sent_at, position) \
     ), created AS ( \
         INSERT INTO instances (instance_id, name, execution_id, status, created_at, last_updated_at) \
         SELECT DISTINCT ON (instance_id COLLATE \"C\") instance_id, entity_name, '', $7, sent_at, sent_at \
         FROM sent WHERE entity_name IS NOT NULL \
         ORDER BY instance_id COLLATE \"C\", position \
         ON CONFLICT (instance_id) DO NOTHING \
     ) \
     INSERT INTO messages (instance_id, execution_id, event, visible_at) \
     SELECT instance_id, execution_id, event, visible_at FROM sent \
     WHERE entity_name IS NOT NULL OR instance_id IN ( \
         SELECT target.instance_id FROM instances target WHERE target.instance_id = ANY($1::text[]) \
         FOR KEY SHARE OF target \
     ) \
     ORDER BY position";

/// Creates the row of entity `$1` (name `$2`, status `$3`, created at `$4`) if it has none.
const INSERT_ENTITY: &str = "INSERT INTO instances (instance_id, name, execution_id, status, created_at, \
     last_updated_at) VALUES ($1, $2, '', $3, $4, $4) ON CONFLICT (instance_id) DO NOTHING";

/// Inserts a new instance (status `Pending`) and its `ExecutionStarted` message,
/// replacing a terminal instance of the same id with all it holds.
pub(crate) async fn insert_instance(
    connection: &PooledConnection,
    instance: &NewInstance,
) -> Result<Creation, Failure> {
    let parent = instance.parent.as_ref().map(to_json).transpose()?;
    let scheduled_start = instance.scheduled_start.map(millis);
    let created_at = millis(instance.created_at);
    let tags = keel_store::stored::tags_to_json(&instance.tags);
    for _ in 0..INSERT_ATTEMPTS {
        let inserted = connection
            .execute(
                INSERT_INSTANCE,
                &[
                    &instance.instance_id,
                    &instance.name,
                    &instance.version,
                    &instance.execution_id,
                    &RuntimeStatus::Pending.as_str(),
                    &instance.input,
                    &parent,
                    &scheduled_start,
                    &created_at,
                    &tags,
                ],
            )
            .await?;
        if inserted == 1 {
            let started = Message {
                instance_id: instance.instance_id.clone(),
                execution_id: Some(instance.execution_id.clone()),
                event: instance.execution_started_event(),
                visible_at: instance.scheduled_start.unwrap_or(instance.created_at),
            };
            let inserted = insert_message(connection, &started).await?;
            assert!(inserted, "the instance row was inserted just before its first message");
            return Ok(Creation::Created);
        }
        // The id is taken. Lock the holder; if it is gone by now, try again.
        let Some(row) = connection.query_opt(LOCK_FOR_REPLACEMENT, &[&instance.instance_id]).await? else {
            continue;
        };
        let status = status_from_text(row.try_get(0)?)?;
        if !status.is_terminal() {
            return Ok(Creation::Occupied(status));
        }
        // History, inbox and activities go with the row (ON DELETE CASCADE).
        connection.execute(DELETE_INSTANCE, &[&instance.instance_id]).await?;
    }
    Err(Failure::Contract(unavailable(format!(
        "instance '{}' was created and deleted by others {INSERT_ATTEMPTS} times while this creation ran",
        instance.instance_id
    ))))
}

/// Puts a message into its instance's inbox, creating the entity it is for if needed;
/// `false` (and nothing written) when there is no such instance.
pub(crate) async fn insert_message(connection: &PooledConnection, message: &Message) -> Result<bool, Failure> {
    let mut columns = MessageColumns::default();
    columns.push(message)?;
    Ok(connection.execute(INSERT_MESSAGES, &columns.params()).await? == 1)
}

/// Messages in the column layout of [`INSERT_MESSAGES`] (one array per column), with
/// the name of the entity each is for (`None` when the target is not an entity id).
pub(crate) struct MessageColumns {
    instance_ids: Vec<String>,
    execution_ids: Vec<Option<String>>,
    events: Vec<String>,
    visible_at: Vec<i64>,
    entity_names: Vec<Option<String>>,
    /// The event's time: the creation time of an entity row the message creates.
    sent_at: Vec<i64>,
    entity_status: &'static str,
}

impl Default for MessageColumns {
    fn default() -> MessageColumns {
        MessageColumns {
            instance_ids: Vec::new(),
            execution_ids: Vec::new(),
            events: Vec::new(),
            visible_at: Vec::new(),
            entity_names: Vec::new(),
            sent_at: Vec::new(),
            entity_status: RuntimeStatus::Running.as_str(),
        }
    }
}

impl MessageColumns {
    pub(crate) fn push(&mut self, message: &Message) -> Result<(), Failure> {
        self.instance_ids.push(message.instance_id.clone());
        self.execution_ids.push(message.execution_id.clone());
        self.events.push(to_json(&message.event)?);
        self.visible_at.push(millis(message.visible_at));
        self.entity_names.push(keel_store::entity_name(&message.instance_id));
        self.sent_at.push(millis(message.event.timestamp));
        Ok(())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.instance_ids.is_empty()
    }

    /// The seven parameters of [`INSERT_MESSAGES`], in order.
    pub(crate) fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.instance_ids,
            &self.execution_ids,
            &self.events,
            &self.visible_at,
            &self.entity_names,
            &self.sent_at,
            &self.entity_status,
        ]
    }
}

/// Creates an instance whose id is free, with its `ExecutionStarted` message (`$10`,
/// visible at `$11`), and announces it on channel `$12`, in one statement. No row when
/// the id is taken.
const CREATE_FRESH_INSTANCE: &str = "WITH created AS ( \
         INSERT INTO instances (instance_id, name, version, execution_id, status, input, parent, \
             scheduled_start, created_at, last_updated_at, tags) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $13) \
         ON CONFLICT (instance_id) DO NOTHING \
         RETURNING instance_id \
     ), started AS ( \
         INSERT INTO messages (instance_id, execution_id, event, visible_at) \
         SELECT instance_id, $4, $10, $11 FROM created \
     ) \
     SELECT instance_id, pg_notify($12, 'oi') FROM created";

/// Creates an instance if its id is free, in one statement (no transaction to open
/// and close); `false` when the id is taken and nothing was written.
pub(crate) async fn create_fresh_instance(
    connection: &PooledConnection,
    instance: &NewInstance,
) -> Result<bool, Failure> {
    let parent = instance.parent.as_ref().map(to_json).transpose()?;
    let started = to_json(&instance.execution_started_event())?;
    let visible_at = millis(instance.scheduled_start.unwrap_or(instance.created_at));
    let created = connection
        .query_opt(
            CREATE_FRESH_INSTANCE,
            &[
                &instance.instance_id,
                &instance.name,
                &instance.version,
                &instance.execution_id,
                &RuntimeStatus::Pending.as_str(),
                &instance.input,
                &parent,
                &instance.scheduled_start.map(millis),
                &millis(instance.created_at),
                &started,
                &visible_at,
                &connection.channel(),
                &keel_store::stored::tags_to_json(&instance.tags),
            ],
        )
        .await?;
    Ok(created.is_some())
}

/// Creates an instance in the connection's open transaction, replacing a terminal
/// one of the same id; [`Error::AlreadyExists`] if a live one holds the id.
pub(crate) async fn create_instance(connection: &PooledConnection, instance: &NewInstance) -> Result<(), Failure> {
    match insert_instance(connection, instance).await? {
        Creation::Created => Ok(()),
        Creation::Occupied(status) => {
            Err(Failure::Contract(Error::AlreadyExists { instance_id: instance.instance_id.clone(), status }))
        }
    }
}

/// Locks the instance to replace and reads what [`replace_instance`] compares.
const LOCK_REPLACED: &str = "SELECT execution_id, history_len, status FROM instances WHERE instance_id = $1 FOR UPDATE";

/// Creates `instance` in place of `replaced` in the connection's open transaction (see
/// [`keel_store::Store::replace_instance`]).
pub(crate) async fn replace_instance(
    connection: &PooledConnection,
    instance: &NewInstance,
    replaced: &InstanceRecord,
    messages: &[Message],
) -> Result<(), Failure> {
    let row = connection.query_opt(LOCK_REPLACED, &[&replaced.instance_id]).await?;
    let (unchanged, status) = match &row {
        Some(row) => {
            let execution_id: &str = row.try_get(0)?;
            let history_len: i64 = row.try_get(1)?;
            let unchanged =
                execution_id == replaced.execution_id && u64::try_from(history_len).ok() == Some(replaced.history_len);
            (unchanged, status_from_text(row.try_get(2)?)?)
        }
        None => (false, replaced.status),
    };
    if !unchanged || instance.instance_id != replaced.instance_id {
        return Err(Failure::Contract(Error::InvalidState {
            instance_id: replaced.instance_id.clone(),
            status,
            action: "replacing it as it was read (it changed meanwhile)",
        }));
    }
    // History, inbox and activities go with the row (ON DELETE CASCADE).
    connection.execute(DELETE_INSTANCE, &[&replaced.instance_id]).await?;
    create_instance(connection, instance).await?;
    if !messages.is_empty() {
        let mut columns = MessageColumns::default();
        for message in messages {
            columns.push(message)?;
        }
        connection.execute(INSERT_MESSAGES, &columns.params()).await?;
    }
    Ok(())
}

/// Deletes every instance and entity with all it holds, announcing it on `channel`;
/// returns how many rows went.
pub(crate) async fn purge_all(connection: &PooledConnection, channel: &str) -> Result<u64, Failure> {
    crate::pool::count_parsed();
    let row = connection
        .client()
        .query_one(
            "WITH purged AS (DELETE FROM instances RETURNING 1), \
             announced AS (SELECT pg_notify($1, 'i') FROM (SELECT FROM purged LIMIT 1) AS any_purged) \
             SELECT (SELECT count(*) FROM purged), (SELECT count(*) FROM announced)",
            &[&channel],
        )
        .await?;
    let purged: i64 = row.try_get(0)?;
    Ok(u64::try_from(purged).unwrap_or(0))
}

/// Locks the target against a concurrent state change; a rewind also changes it.
const LOCK_EVENT_TARGET: &str = "SELECT status FROM instances WHERE instance_id = $1 FOR SHARE";
const LOCK_REWIND_TARGET: &str = "SELECT status FROM instances WHERE instance_id = $1 FOR NO KEY UPDATE";
const SET_PENDING: &str = "UPDATE instances SET status = $2, last_updated_at = $3 WHERE instance_id = $1";

pub(crate) async fn enqueue_message(
    connection: &PooledConnection,
    message: &Message,
    accept_terminal: bool,
) -> Result<RuntimeStatus, Failure> {
    let rewind = matches!(message.event.kind, EventKind::ExecutionRewound { .. });
    let lock = if rewind { LOCK_REWIND_TARGET } else { LOCK_EVENT_TARGET };
    let entity_name = keel_store::entity_name(&message.instance_id);
    let mut creations = 0;
    let row = loop {
        if let Some(row) = connection.query_opt(lock, &[&message.instance_id]).await? {
            break row;
        }
        let Some(name) = &entity_name else {
            return Err(Failure::Contract(Error::NotFound(message.instance_id.clone())));
        };
        // A message to an entity creates it. The lock (a new statement, with a new
        // snapshot) then finds the row, whoever created it, unless an empty-entity
        // removal deleted it in between: then create it again.
        if creations == INSERT_ATTEMPTS {
            return Err(Failure::Contract(unavailable(format!(
                "entity '{}' was created and removed by others {INSERT_ATTEMPTS} times while this message waited",
                message.instance_id
            ))));
        }
        creations += 1;
        connection
            .execute(
                INSERT_ENTITY,
                &[&message.instance_id, name, &RuntimeStatus::Running.as_str(), &millis(message.event.timestamp)],
            )
            .await?;
    };
    let status = status_from_text(row.try_get(0)?)?;
    if status.is_terminal() && !accept_terminal {
        return Err(Failure::Contract(Error::InvalidState {
            instance_id: message.instance_id.clone(),
            status,
            action: "delivering an event",
        }));
    }
    let inserted = insert_message(connection, message).await?;
    assert!(inserted, "the instance is locked by this transaction");
    if status == RuntimeStatus::Failed && rewind {
        // A rewound instance is pending until its worker replays it.
        connection
            .execute(
                SET_PENDING,
                &[&message.instance_id, &RuntimeStatus::Pending.as_str(), &millis(message.visible_at)],
            )
            .await?;
    }
    Ok(status)
}

const GET_INSTANCE: &str = concat!("SELECT ", instance_columns!(), " FROM instances WHERE instance_id = $1");

pub(crate) async fn get_instance(
    connection: &PooledConnection,
    instance_id: &str,
) -> Result<Option<InstanceRecord>, Failure> {
    let row = connection.query_opt(GET_INSTANCE, &[&instance_id]).await?;
    row.as_ref().map(instance_from_row).transpose()
}

const READ_HISTORY: &str = "SELECT event FROM history WHERE instance_id = $1 ORDER BY seq";

pub(crate) async fn read_history(
    connection: &PooledConnection,
    instance_id: &str,
) -> Result<Vec<HistoryEvent>, Failure> {
    let rows = connection.query(READ_HISTORY, &[&instance_id]).await?;
    rows.iter().map(|row| Ok(from_json("history.event", row.try_get(0)?)?)).collect()
}

pub(crate) async fn query_instances(
    connection: &PooledConnection,
    query: &InstanceQuery,
) -> Result<InstancePage, Failure> {
    let page_size = if query.page_size == 0 { DEFAULT_PAGE_SIZE } else { query.page_size };
    let mut filter = Filter::default();
    // Entities (ids starting with '@') are not orchestration instances.
    filter.conditions.push("NOT starts_with(instance_id, '@')".to_owned());
    if !query.statuses.is_empty() {
        let statuses: Vec<String> = query.statuses.iter().map(|status| status.as_str().to_owned()).collect();
        filter.condition("status = ANY($)", Box::new(statuses));
    }
    if let Some(prefix) = &query.instance_id_prefix {
        // The range start lets the primary key index find the first match.
        filter.condition("instance_id >= $", Box::new(prefix.clone()));
        filter.condition("starts_with(instance_id, $)", Box::new(prefix.clone()));
    }
    if let Some(prefix) = &query.name_prefix {
        filter.condition("starts_with(name, $)", Box::new(prefix.clone()));
    }
    filter.created_range(query.created_from.map(millis), query.created_to.map(millis));
    if let Some(after) = &query.continuation {
        filter.condition("instance_id > $", Box::new(after.clone()));
    }
    page(connection, filter, page_size).await
}

pub(crate) async fn query_entities(
    connection: &PooledConnection,
    query: &EntityQuery,
) -> Result<InstancePage, Failure> {
    let page_size = if query.page_size == 0 { DEFAULT_PAGE_SIZE } else { query.page_size };
    let mut filter = Filter::default();
    // Entity ids start with '@'; the range start lets the primary key index find the
    // first match (ids compare bytewise: "C" collation).
    let mut first = "@".to_owned();
    if let Some(prefix) = &query.instance_id_prefix {
        first = first.max(prefix.clone());
        filter.condition("starts_with(instance_id, $)", Box::new(prefix.clone()));
    }
    filter.condition("instance_id >= $", Box::new(first));
    filter.condition("starts_with(instance_id, $)", Box::new("@".to_owned()));
    if let Some(from) = query.last_modified_from {
        filter.condition("last_updated_at >= $", Box::new(millis(from)));
    }
    if let Some(to) = query.last_modified_to {
        filter.condition("last_updated_at < $", Box::new(millis(to)));
    }
    if !query.include_transient {
        filter.conditions.push("output IS NOT NULL".to_owned());
    }
    if let Some(after) = &query.continuation {
        filter.condition("instance_id > $", Box::new(after.clone()));
    }
    page(connection, filter, page_size).await
}

/// One page of the instances that match `filter`, ordered by instance id.
async fn page(connection: &PooledConnection, filter: Filter, page_size: usize) -> Result<InstancePage, Failure> {
    let limit = i64::try_from(page_size).unwrap_or(i64::MAX);
    let sql = format!(
        "SELECT {} FROM instances WHERE {} ORDER BY instance_id LIMIT {limit}",
        instance_columns!(),
        filter.sql()
    );
    crate::pool::count_parsed();
    let rows = connection.client().query(&sql, &filter.params()).await?;
    let instances = rows.iter().map(instance_from_row).collect::<Result<Vec<_>, _>>()?;
    let continuation = match instances.last() {
        Some(last) if instances.len() == page_size => Some(last.instance_id.clone()),
        _ => None,
    };
    Ok(InstancePage { instances, continuation })
}

/// Locks an entity row against message writers (they hold it `FOR KEY SHARE`) and the
/// worker committing it (`FOR NO KEY UPDATE`): waits for those that hold it, and keeps
/// new ones waiting until the removal's transaction ends.
const LOCK_FOR_REMOVAL: &str = "SELECT 1 FROM instances WHERE instance_id = $1 FOR UPDATE";

/// Deletes an entity row that holds nothing and that no worker holds. Run after
/// [`LOCK_FOR_REMOVAL`], its snapshot sees the messages of every writer that held the
/// row. A lone `DELETE` would decide on a snapshot taken before the commit of a writer
/// it then waits for, and delete that writer's message with the row (`ON DELETE
/// CASCADE`).
const REMOVE_EMPTY_ENTITY: &str = "DELETE FROM instances WHERE instance_id = $1 \
     AND output IS NULL AND input IS NULL AND (locked_until IS NULL OR locked_until <= $2) \
     AND NOT EXISTS (SELECT 1 FROM messages WHERE instance_id = $1)";

/// Removes an empty entity, in the connection's open transaction; `false` (nothing
/// deleted) when `instance_id` is not an entity id, has no row or the row holds something.
pub(crate) async fn remove_empty_entity(
    connection: &PooledConnection,
    instance_id: &str,
    now: Timestamp,
) -> Result<bool, Failure> {
    if keel_store::entity_name(instance_id).is_none() {
        return Ok(false);
    }
    if connection.query_opt(LOCK_FOR_REMOVAL, &[&instance_id]).await?.is_none() {
        return Ok(false);
    }
    Ok(connection.execute(REMOVE_EMPTY_ENTITY, &[&instance_id, &millis(now)]).await? == 1)
}

pub(crate) async fn purge_instance(connection: &PooledConnection, instance_id: &str) -> Result<bool, Failure> {
    let Some(row) = connection.query_opt(LOCK_FOR_REPLACEMENT, &[&instance_id]).await? else {
        return Ok(false);
    };
    let status = status_from_text(row.try_get(0)?)?;
    if !status.is_terminal() {
        return Err(Failure::Contract(Error::InvalidState {
            instance_id: instance_id.to_owned(),
            status,
            action: "purging",
        }));
    }
    connection.execute(DELETE_INSTANCE, &[&instance_id]).await?;
    Ok(true)
}

/// Deletes the matching terminal instances in one statement (history, inbox and
/// activities go with them) and announces the change if any was deleted.
pub(crate) async fn purge_instances(
    connection: &PooledConnection,
    purge: &PurgeFilter,
    channel: &str,
) -> Result<u64, Failure> {
    let terminal: Vec<String> = RuntimeStatus::ALL
        .into_iter()
        .filter(|status| status.is_terminal())
        .filter(|status| purge.statuses.is_empty() || purge.statuses.contains(status))
        .map(|status| status.as_str().to_owned())
        .collect();
    if terminal.is_empty() {
        return Ok(0);
    }
    let mut filter = Filter::default();
    filter.condition("status = ANY($)", Box::new(terminal));
    filter.created_range(purge.created_from.map(millis), purge.created_to.map(millis));
    let channel_param = filter.param(Box::new(channel.to_owned()));
    let sql = format!(
        "WITH purged AS (DELETE FROM instances WHERE {} RETURNING 1), \
         announced AS (SELECT pg_notify(${channel_param}, 'i') FROM (SELECT FROM purged LIMIT 1) AS any_purged) \
         SELECT (SELECT count(*) FROM purged), (SELECT count(*) FROM announced)",
        filter.sql()
    );
    crate::pool::count_parsed();
    let row = connection.client().query_one(&sql, &filter.params()).await?;
    let purged: i64 = row.try_get(0)?;
    Ok(u64::try_from(purged).expect("a count is not negative"))
}

/// A `WHERE` clause over `instances` built from optional conditions, with its
/// parameters. Each condition names its parameter `$` (numbered when added).
#[derive(Default)]
struct Filter {
    conditions: Vec<String>,
    params: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl Filter {
    fn condition(&mut self, sql: &str, value: Box<dyn ToSql + Sync + Send>) {
        let number = self.param(value);
        self.conditions.push(sql.replace('$', &format!("${number}")));
    }

    /// Adds a parameter; returns its number.
    fn param(&mut self, value: Box<dyn ToSql + Sync + Send>) -> usize {
        self.params.push(value);
        self.params.len()
    }

    fn created_range(&mut self, from: Option<i64>, to: Option<i64>) {
        if let Some(from) = from {
            self.condition("created_at >= $", Box::new(from));
        }
        if let Some(to) = to {
            self.condition("created_at < $", Box::new(to));
        }
    }

    fn sql(&self) -> String {
        if self.conditions.is_empty() {
            "true".to_owned()
        } else {
            self.conditions.join(" AND ")
        }
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params.iter().map(|value| value.as_ref() as &(dyn ToSql + Sync)).collect()
    }
}
