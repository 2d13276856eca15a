//! How Keel's values are kept in PostgreSQL columns: timestamps as BIGINT milliseconds
//! since the Unix epoch, statuses by name, structured values (failure details, parent,
//! history events) as JSON text.

use keel_store::InstanceRecord;
use tokio_postgres::Row;

use crate::failure::Failure;
pub(crate) use keel_store::stored::{from_json, lease_end_millis, millis, status_from_text, timestamp, to_json};

/// The columns [`instance_from_row`] reads, in its order. A macro, so that the
/// statements can be built with `concat!` and stay `&'static str`.
macro_rules! instance_columns {
    () => {
        "instance_id, name, version, execution_id, status, input, output, custom_status, failure, parent, \
         scheduled_start, created_at, last_updated_at, completed_at, history_len, tags"
    };
}
pub(crate) use instance_columns;

/// How many columns [`instance_columns`] names; a query may return more after them.
pub(crate) const INSTANCE_COLUMN_COUNT: usize = 16;

/// A count or attempt number as stored (INTEGER) as the contract's `u32`.
pub(crate) fn count(what: &str, stored: i32) -> Result<u32, Failure> {
    u32::try_from(stored).map_err(|_| Failure::corrupt(format!("{what} is {stored}")))
}

/// Reads an [`InstanceRecord`] from a row that starts with [`instance_columns`].
pub(crate) fn instance_from_row(row: &Row) -> Result<InstanceRecord, Failure> {
    let status: &str = row.try_get(4)?;
    let failure: Option<&str> = row.try_get(8)?;
    let parent: Option<&str> = row.try_get(9)?;
    let scheduled_start: Option<i64> = row.try_get(10)?;
    let completed_at: Option<i64> = row.try_get(13)?;
    let history_len: i64 = row.try_get(14)?;
    let tags: Option<&str> = row.try_get(15)?;
    Ok(InstanceRecord {
        instance_id: row.try_get(0)?,
        name: row.try_get(1)?,
        version: row.try_get(2)?,
        execution_id: row.try_get(3)?,
        status: status_from_text(status)?,
        input: row.try_get(5)?,
        output: row.try_get(6)?,
        custom_status: row.try_get(7)?,
        failure: failure.map(|text| from_json("instances.failure", text)).transpose()?,
        parent: parent.map(|text| from_json("instances.parent", text)).transpose()?,
        scheduled_start: scheduled_start.map(timestamp).transpose()?,
        created_at: timestamp(row.try_get(11)?)?,
        last_updated_at: timestamp(row.try_get(12)?)?,
        completed_at: completed_at.map(timestamp).transpose()?,
        history_len: u64::try_from(history_len)
            .map_err(|_| Failure::corrupt(format!("negative history length {history_len}")))?,
        tags: keel_store::stored::tags_from_json(tags)?,
    })
}
