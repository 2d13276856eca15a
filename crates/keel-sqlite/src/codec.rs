//! How Keel's values are kept in SQLite columns: timestamps as integer milliseconds
//! since the Unix epoch, statuses by name, structured values (failure details, parent,
//! history events) as JSON text.

use keel_store::InstanceRecord;
use rusqlite::Row;

use crate::failure::Failure;
pub(crate) use keel_store::stored::{from_json, lease_end_millis, millis, status_from_text, timestamp, to_json};

/// The columns [`instance_from_row`] reads, in its order.
pub(crate) const INSTANCE_COLUMNS: &str = "instance_id, name, version, execution_id, status, \
     input, output, custom_status, failure, parent, scheduled_start, created_at, \
     last_updated_at, completed_at, history_len, tags";

/// Reads an [`InstanceRecord`] from a row that starts with [`INSTANCE_COLUMNS`].
pub(crate) fn instance_from_row(row: &Row<'_>) -> Result<InstanceRecord, Failure> {
    let status: String = row.get(4)?;
    let failure: Option<String> = row.get(8)?;
    let parent: Option<String> = row.get(9)?;
    let scheduled_start: Option<i64> = row.get(10)?;
    let completed_at: Option<i64> = row.get(13)?;
    let history_len: i64 = row.get(14)?;
    let tags: Option<String> = row.get(15)?;
    Ok(InstanceRecord {
        instance_id: row.get(0)?,
        name: row.get(1)?,
        version: row.get(2)?,
        execution_id: row.get(3)?,
        status: status_from_text(&status)?,
        input: row.get(5)?,
        output: row.get(6)?,
        custom_status: row.get(7)?,
        failure: failure.map(|text| from_json("instances.failure", &text)).transpose()?,
        parent: parent.map(|text| from_json("instances.parent", &text)).transpose()?,
        scheduled_start: scheduled_start.map(timestamp).transpose()?,
        created_at: timestamp(row.get(11)?)?,
        last_updated_at: timestamp(row.get(12)?)?,
        completed_at: completed_at.map(timestamp).transpose()?,
        history_len: u64::try_from(history_len)
            .map_err(|_| Failure::corrupt(format!("negative history length {history_len}")))?,
        tags: keel_store::stored::tags_from_json(tags.as_deref())?,
    })
}
