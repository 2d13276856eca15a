//! How Keel's values are kept in SQLite columns: timestamps as integer milliseconds
//! since the Unix epoch, statuses by name, structured values (failure details, parent,
//! history events) as JSON text.

use std::time::Duration;

use chrono::DateTime;
use keel_core::history::{RuntimeStatus, Timestamp};
use keel_store::InstanceRecord;
use rusqlite::Row;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::failure::Failure;

/// The columns [`instance_from_row`] reads, in its order.
pub(crate) const INSTANCE_COLUMNS: &str = "instance_id, name, version, execution_id, status, \
     input, output, custom_status, failure, parent, scheduled_start, created_at, \
     last_updated_at, completed_at, history_len";

/// A timestamp as stored: milliseconds since the epoch.
pub(crate) fn millis(at: Timestamp) -> i64 {
    at.timestamp_millis()
}

pub(crate) fn timestamp(epoch_millis: i64) -> Result<Timestamp, Failure> {
    DateTime::from_timestamp_millis(epoch_millis)
        .ok_or_else(|| Failure::corrupt(format!("timestamp {epoch_millis} ms is out of range")))
}

/// When a lease taken at `now` for `lease` runs out, in stored milliseconds.
pub(crate) fn lease_end_millis(now: Timestamp, lease: Duration) -> i64 {
    let lease_millis = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    millis(now).saturating_add(lease_millis)
}

pub(crate) fn status_from_text(text: &str) -> Result<RuntimeStatus, Failure> {
    text.parse().map_err(Failure::corrupt)
}

pub(crate) fn to_json(value: &impl Serialize) -> Result<String, Failure> {
    serde_json::to_string(value).map_err(|error| Failure::corrupt(format!("cannot encode: {error}")))
}

/// Decodes JSON read from the column `what` (named in the error).
pub(crate) fn from_json<T: DeserializeOwned>(what: &str, text: &str) -> Result<T, Failure> {
    serde_json::from_str(text).map_err(|error| Failure::corrupt(format!("{what}: {error}")))
}

/// Reads an [`InstanceRecord`] from a row that starts with [`INSTANCE_COLUMNS`].
pub(crate) fn instance_from_row(row: &Row<'_>) -> Result<InstanceRecord, Failure> {
    let status: String = row.get(4)?;
    let failure: Option<String> = row.get(8)?;
    let parent: Option<String> = row.get(9)?;
    let scheduled_start: Option<i64> = row.get(10)?;
    let completed_at: Option<i64> = row.get(13)?;
    let history_len: i64 = row.get(14)?;
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_at_millisecond_precision() {
        let at = DateTime::from_timestamp_millis(1_700_000_000_123).unwrap();
        assert_eq!(timestamp(millis(at)).ok(), Some(at));
        assert!(timestamp(i64::MAX).is_err(), "an out-of-range value is reported as corrupt");
    }

    #[test]
    fn lease_ends_saturate_instead_of_overflowing() {
        let now = DateTime::from_timestamp_millis(1_000).unwrap();
        assert_eq!(lease_end_millis(now, Duration::from_secs(2)), 3_000);
        assert_eq!(lease_end_millis(now, Duration::MAX), i64::MAX);
    }
}
