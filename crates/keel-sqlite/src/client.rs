//! The client side of the store: creating instances, delivering events, reading state,
//! querying and purging. Also the row-level helpers the worker side shares (inserting
//! an instance, inserting a message).

use keel_core::history::{EventKind, HistoryEvent, RuntimeStatus, Timestamp};
use keel_store::{
    EntityQuery, Error, InstancePage, InstanceQuery, InstanceRecord, Message, NewInstance, PurgeFilter,
    DEFAULT_PAGE_SIZE,
};
use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension};

use crate::codec::{from_json, instance_from_row, millis, status_from_text, to_json, INSTANCE_COLUMNS};
use crate::failure::Failure;

/// What [`insert_instance`] did.
pub(crate) enum Creation {
    Created,
    /// A non-terminal instance holds the id; nothing was written.
    Occupied(RuntimeStatus),
}

/// The status of an instance, `None` if there is none.
pub(crate) fn instance_status(connection: &Connection, instance_id: &str) -> Result<Option<RuntimeStatus>, Failure> {
    let status: Option<String> = connection
        .prepare_cached("SELECT status FROM instances WHERE instance_id = ?1")?
        .query_row([instance_id], |row| row.get(0))
        .optional()?;
    Ok(status.map(|text| status_from_text(&text)).transpose()?)
}

/// Inserts a new instance (status `Pending`) and its `ExecutionStarted` message,
/// replacing a terminal instance of the same id with all it holds.
pub(crate) fn insert_instance(connection: &Connection, instance: &NewInstance) -> Result<Creation, Failure> {
    if let Some(status) = instance_status(connection, &instance.instance_id)? {
        if !status.is_terminal() {
            return Ok(Creation::Occupied(status));
        }
        // History, inbox and activities go with the row (ON DELETE CASCADE).
        connection.prepare_cached("DELETE FROM instances WHERE instance_id = ?1")?.execute([&instance.instance_id])?;
    }
    let parent = instance.parent.as_ref().map(to_json).transpose()?;
    connection
        .prepare_cached(
            "INSERT INTO instances (instance_id, name, version, execution_id, status, input, \
             parent, scheduled_start, created_at, last_updated_at, tags) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?10)",
        )?
        .execute(params![
            instance.instance_id,
            instance.name,
            instance.version,
            instance.execution_id,
            RuntimeStatus::Pending.as_str(),
            instance.input,
            parent,
            instance.scheduled_start.map(millis),
            millis(instance.created_at),
            keel_store::stored::tags_to_json(&instance.tags),
        ])?;
    let started = Message {
        instance_id: instance.instance_id.clone(),
        execution_id: Some(instance.execution_id.clone()),
        event: instance.execution_started_event(),
        visible_at: instance.scheduled_start.unwrap_or(instance.created_at),
    };
    let inserted = insert_message(connection, &started)?;
    assert!(inserted, "the instance row was inserted just before its first message");
    Ok(Creation::Created)
}

/// Creates the row of the entity `instance_id` names, if it is an entity id and has
/// none yet.
fn ensure_entity_row(connection: &Connection, instance_id: &str, now: Timestamp) -> Result<(), Failure> {
    let Some(name) = keel_store::entity_name(instance_id) else {
        return Ok(());
    };
    connection
        .prepare_cached(
            "INSERT INTO instances (instance_id, name, execution_id, status, created_at, last_updated_at)              VALUES (?1, ?2, '', ?3, ?4, ?4) ON CONFLICT (instance_id) DO NOTHING",
        )?
        .execute(params![instance_id, name, RuntimeStatus::Running.as_str(), millis(now)])?;
    Ok(())
}

/// Puts a message into its instance's inbox, creating the entity it is for if needed;
/// `false` (and nothing written) when there is no such instance.
pub(crate) fn insert_message(connection: &Connection, message: &Message) -> Result<bool, Failure> {
    ensure_entity_row(connection, &message.instance_id, message.event.timestamp)?;
    let inserted = connection
        .prepare_cached(
            "INSERT INTO messages (instance_id, execution_id, event, visible_at) \
             SELECT ?1, ?2, ?3, ?4 \
             WHERE EXISTS (SELECT 1 FROM instances WHERE instance_id = ?1)",
        )?
        .execute(params![
            message.instance_id,
            message.execution_id,
            to_json(&message.event)?,
            millis(message.visible_at),
        ])?;
    Ok(inserted == 1)
}

pub(crate) fn create_instance(connection: &Connection, instance: &NewInstance) -> Result<(), Failure> {
    match insert_instance(connection, instance)? {
        Creation::Created => Ok(()),
        Creation::Occupied(status) => {
            Err(Failure::Contract(Error::AlreadyExists { instance_id: instance.instance_id.clone(), status }))
        }
    }
}

/// Creates `instance` in place of `replaced` (see [`keel_store::Store::replace_instance`]).
pub(crate) fn replace_instance(
    connection: &Connection,
    instance: &NewInstance,
    replaced: &InstanceRecord,
    messages: &[Message],
) -> Result<(), Failure> {
    let current: Option<(String, i64, String)> = connection
        .prepare_cached("SELECT execution_id, history_len, status FROM instances WHERE instance_id = ?1")?
        .query_row([&replaced.instance_id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .optional()?;
    let unchanged = current.as_ref().is_some_and(|(execution_id, history_len, _)| {
        *execution_id == replaced.execution_id && u64::try_from(*history_len).ok() == Some(replaced.history_len)
    });
    if !unchanged || instance.instance_id != replaced.instance_id {
        let status = match current {
            Some((_, _, status)) => status_from_text(&status)?,
            None => replaced.status,
        };
        return Err(Failure::Contract(Error::InvalidState {
            instance_id: replaced.instance_id.clone(),
            status,
            action: "replacing it as it was read (it changed meanwhile)",
        }));
    }
    // History, inbox and activities go with the row (ON DELETE CASCADE).
    connection.prepare_cached("DELETE FROM instances WHERE instance_id = ?1")?.execute([&replaced.instance_id])?;
    create_instance(connection, instance)?;
    for message in messages {
        insert_message(connection, message)?;
    }
    Ok(())
}

/// Deletes every instance and entity with all it holds; returns how many rows went.
pub(crate) fn purge_all(connection: &Connection) -> Result<u64, Failure> {
    Ok(connection.prepare_cached("DELETE FROM instances")?.execute([])? as u64)
}

pub(crate) fn enqueue_message(
    connection: &Connection,
    message: &Message,
    accept_terminal: bool,
) -> Result<RuntimeStatus, Failure> {
    ensure_entity_row(connection, &message.instance_id, message.event.timestamp)?;
    let status = instance_status(connection, &message.instance_id)?
        .ok_or_else(|| Error::NotFound(message.instance_id.clone()))?;
    if status.is_terminal() && !accept_terminal {
        return Err(Failure::Contract(Error::InvalidState {
            instance_id: message.instance_id.clone(),
            status,
            action: "delivering an event",
        }));
    }
    let inserted = insert_message(connection, message)?;
    assert!(inserted, "the instance was found in this transaction");
    if status == RuntimeStatus::Failed && matches!(message.event.kind, EventKind::ExecutionRewound { .. }) {
        // A rewound instance is pending until its worker replays it.
        connection
            .prepare_cached("UPDATE instances SET status = ?2, last_updated_at = ?3 WHERE instance_id = ?1")?
            .execute(params![
                message.instance_id,
                RuntimeStatus::Pending.as_str(),
                message.visible_at.timestamp_millis()
            ])?;
    }
    Ok(status)
}

pub(crate) fn get_instance(connection: &Connection, instance_id: &str) -> Result<Option<InstanceRecord>, Failure> {
    let sql = format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE instance_id = ?1");
    let mut statement = connection.prepare_cached(&sql)?;
    let mut rows = statement.query([instance_id])?;
    rows.next()?.map(instance_from_row).transpose()
}

pub(crate) fn read_history(connection: &Connection, instance_id: &str) -> Result<Vec<HistoryEvent>, Failure> {
    let mut statement = connection.prepare_cached("SELECT event FROM history WHERE instance_id = ?1 ORDER BY seq")?;
    let mut rows = statement.query([instance_id])?;
    let mut events = Vec::new();
    while let Some(row) = rows.next()? {
        let event: String = row.get(0)?;
        events.push(from_json("history.event", &event)?);
    }
    Ok(events)
}

pub(crate) fn query_instances(connection: &Connection, query: &InstanceQuery) -> Result<InstancePage, Failure> {
    let page_size = if query.page_size == 0 { DEFAULT_PAGE_SIZE } else { query.page_size };
    let mut filter = Filter::default();
    filter.orchestrations_only();
    filter.statuses(&query.statuses);
    if let Some(prefix) = &query.instance_id_prefix {
        filter.prefix("instance_id", prefix);
    }
    if let Some(prefix) = &query.name_prefix {
        filter.prefix("name", prefix);
    }
    filter.created_range(query.created_from, query.created_to);
    if let Some(after) = &query.continuation {
        filter.condition("instance_id > ?", [Value::Text(after.clone())]);
    }
    page(connection, filter, page_size)
}

pub(crate) fn query_entities(connection: &Connection, query: &EntityQuery) -> Result<InstancePage, Failure> {
    let page_size = if query.page_size == 0 { DEFAULT_PAGE_SIZE } else { query.page_size };
    let mut filter = Filter::default();
    filter.prefix("instance_id", "@");
    if let Some(prefix) = &query.instance_id_prefix {
        filter.prefix("instance_id", prefix);
    }
    if let Some(from) = query.last_modified_from {
        filter.condition("last_updated_at >= ?", [Value::Integer(millis(from))]);
    }
    if let Some(to) = query.last_modified_to {
        filter.condition("last_updated_at < ?", [Value::Integer(millis(to))]);
    }
    if !query.include_transient {
        filter.condition("output IS NOT NULL", []);
    }
    if let Some(after) = &query.continuation {
        filter.condition("instance_id > ?", [Value::Text(after.clone())]);
    }
    page(connection, filter, page_size)
}

/// One page of instances that match `filter`, ordered by instance id.
fn page(connection: &Connection, filter: Filter, page_size: usize) -> Result<InstancePage, Failure> {
    let sql = format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE {} ORDER BY instance_id LIMIT ?", filter.sql());
    let mut values = filter.values;
    values.push(Value::Integer(i64::try_from(page_size).unwrap_or(i64::MAX)));

    let mut statement = connection.prepare_cached(&sql)?;
    let mut rows = statement.query(params_from_iter(values))?;
    let mut instances = Vec::new();
    while let Some(row) = rows.next()? {
        instances.push(instance_from_row(row)?);
    }
    let continuation = match instances.last() {
        Some(last) if instances.len() == page_size => Some(last.instance_id.clone()),
        _ => None,
    };
    Ok(InstancePage { instances, continuation })
}

pub(crate) fn remove_empty_entity(connection: &Connection, instance_id: &str, now: Timestamp) -> Result<bool, Failure> {
    if keel_store::entity_name(instance_id).is_none() {
        return Ok(false);
    }
    let deleted = connection
        .prepare_cached(
            "DELETE FROM instances WHERE instance_id = ?1 AND output IS NULL AND input IS NULL \
             AND (locked_until IS NULL OR locked_until <= ?2) \
             AND NOT EXISTS (SELECT 1 FROM messages WHERE instance_id = ?1)",
        )?
        .execute(params![instance_id, millis(now)])?;
    Ok(deleted == 1)
}

pub(crate) fn purge_instance(connection: &Connection, instance_id: &str) -> Result<bool, Failure> {
    let Some(status) = instance_status(connection, instance_id)? else {
        return Ok(false);
    };
    if !status.is_terminal() {
        return Err(Failure::Contract(Error::InvalidState {
            instance_id: instance_id.to_owned(),
            status,
            action: "purging",
        }));
    }
    connection.prepare_cached("DELETE FROM instances WHERE instance_id = ?1")?.execute([instance_id])?;
    Ok(true)
}

pub(crate) fn purge_instances(connection: &Connection, purge: &PurgeFilter) -> Result<u64, Failure> {
    let terminal: Vec<RuntimeStatus> = RuntimeStatus::ALL
        .into_iter()
        .filter(|status| status.is_terminal())
        .filter(|status| purge.statuses.is_empty() || purge.statuses.contains(status))
        .collect();
    if terminal.is_empty() {
        return Ok(0);
    }
    let mut filter = Filter::default();
    filter.statuses(&terminal);
    filter.created_range(purge.created_from, purge.created_to);
    // History, inbox and activities go with the rows (ON DELETE CASCADE); `execute`
    // counts only the instance rows.
    let sql = format!("DELETE FROM instances WHERE {}", filter.sql());
    let deleted = connection.prepare_cached(&sql)?.execute(params_from_iter(filter.values))?;
    Ok(deleted as u64)
}

/// A `WHERE` clause over `instances` built from optional conditions, with its values.
#[derive(Default)]
struct Filter {
    conditions: Vec<String>,
    values: Vec<Value>,
}

impl Filter {
    fn condition(&mut self, sql: &str, values: impl IntoIterator<Item = Value>) {
        self.conditions.push(sql.to_owned());
        self.values.extend(values);
    }

    /// Orchestration instances, not entities (whose ids start with `@`).
    fn orchestrations_only(&mut self) {
        self.condition("substr(instance_id, 1, 1) <> '@'", []);
    }

    /// Any of `statuses`; no condition when empty.
    fn statuses(&mut self, statuses: &[RuntimeStatus]) {
        if statuses.is_empty() {
            return;
        }
        let placeholders = vec!["?"; statuses.len()].join(", ");
        self.condition(
            &format!("status IN ({placeholders})"),
            statuses.iter().map(|status| Value::Text(status.as_str().to_owned())),
        );
    }

    /// `column` starts with `prefix`, as a range so that an index on it can be used.
    fn prefix(&mut self, column: &str, prefix: &str) {
        self.condition(&format!("{column} >= ?"), [Value::Text(prefix.to_owned())]);
        if let Some(end) = prefix_upper_bound(prefix) {
            self.condition(&format!("{column} < ?"), [Value::Text(end)]);
        }
    }

    fn created_range(&mut self, from: Option<Timestamp>, to: Option<Timestamp>) {
        if let Some(from) = from {
            self.condition("created_at >= ?", [Value::Integer(millis(from))]);
        }
        if let Some(to) = to {
            self.condition("created_at < ?", [Value::Integer(millis(to))]);
        }
    }

    fn sql(&self) -> String {
        if self.conditions.is_empty() {
            "1".to_owned()
        } else {
            self.conditions.join(" AND ")
        }
    }
}

/// The least string greater than every string that starts with `prefix` (SQLite
/// compares text bytewise, which for UTF-8 is code point order); `None` when there is
/// none (`prefix` is empty or all `char::MAX`).
fn prefix_upper_bound(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = (u32::from(last) + 1..=u32::from(char::MAX)).find_map(char::from_u32);
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::prefix_upper_bound;

    #[test]
    fn prefix_upper_bounds_cover_exactly_the_prefixed_strings() {
        assert_eq!(prefix_upper_bound("order-"), Some("order.".to_owned()));
        assert_eq!(prefix_upper_bound(""), None);
        assert_eq!(prefix_upper_bound("a\u{10FFFF}"), Some("b".to_owned()));
        assert_eq!(prefix_upper_bound("\u{D7FF}"), Some("\u{E000}".to_owned()), "surrogates are skipped");
        let end = prefix_upper_bound("ab").unwrap();
        for inside in ["ab", "ab\u{10FFFF}", "abzzz"] {
            assert!(inside >= "ab" && inside < end.as_str(), "{inside:?} is in the range");
        }
        assert!("ac" >= end.as_str(), "the next prefix is outside");
    }
}
