//! How backends keep Keel's values in database columns, where SQL databases agree:
//! timestamps as integer milliseconds since the Unix epoch, statuses by name,
//! structured values (failure details, parents, history events) as JSON text. Data that
//! does not decode is reported as a non-retryable [`Error::Backend`] naming what it was.

use std::time::Duration;

use chrono::DateTime;
use keel_core::history::{RuntimeStatus, Timestamp};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::Error;

/// The error for data in the task hub that this code cannot decode.
pub fn corrupt(what: impl std::fmt::Display) -> Error {
    Error::Backend { message: format!("corrupt data in the task hub: {what}"), retryable: false }
}

/// A timestamp as stored: milliseconds since the epoch.
pub fn millis(at: Timestamp) -> i64 {
    at.timestamp_millis()
}

/// A stored timestamp read back.
pub fn timestamp(epoch_millis: i64) -> Result<Timestamp, Error> {
    DateTime::from_timestamp_millis(epoch_millis)
        .ok_or_else(|| corrupt(format!("timestamp {epoch_millis} ms is out of range")))
}

/// When a lease taken at `now` for `lease` runs out, in stored milliseconds.
pub fn lease_end_millis(now: Timestamp, lease: Duration) -> i64 {
    let lease_millis = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    millis(now).saturating_add(lease_millis)
}

/// A status stored by name, read back.
pub fn status_from_text(text: &str) -> Result<RuntimeStatus, Error> {
    text.parse().map_err(corrupt)
}

/// Encodes a structured value as JSON text for its column.
pub fn to_json(value: &impl Serialize) -> Result<String, Error> {
    serde_json::to_string(value).map_err(|error| corrupt(format!("cannot encode: {error}")))
}

/// Decodes JSON read from the column `what` (named in the error).
pub fn from_json<T: DeserializeOwned>(what: &str, text: &str) -> Result<T, Error> {
    serde_json::from_str(text).map_err(|error| corrupt(format!("{what}: {error}")))
}

/// Tags as their column holds them: a JSON object, or NULL when there are none.
pub fn tags_to_json(tags: &std::collections::BTreeMap<String, String>) -> Option<String> {
    (!tags.is_empty()).then(|| serde_json::to_string(tags).expect("a map of strings always serializes"))
}

/// Tags from their column (NULL: none).
pub fn tags_from_json(text: Option<&str>) -> Result<std::collections::BTreeMap<String, String>, Error> {
    text.map(|text| from_json("instances.tags", text)).transpose().map(Option::unwrap_or_default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_at_millisecond_precision() {
        let at = DateTime::from_timestamp_millis(1_700_000_000_123).unwrap();
        assert_eq!(timestamp(millis(at)).ok(), Some(at));
        assert!(timestamp(i64::MAX).is_err());
    }

    #[test]
    fn leases_saturate() {
        let now = DateTime::from_timestamp_millis(1_000).unwrap();
        assert_eq!(lease_end_millis(now, Duration::from_secs(2)), 3_000);
        assert_eq!(lease_end_millis(now, Duration::MAX), i64::MAX);
    }

    #[test]
    fn bad_data_is_named() {
        let error = from_json::<u32>("activities.input", "{").unwrap_err();
        assert!(error.to_string().contains("activities.input"), "{error}");
        assert!(!error.is_retryable());
        assert!(status_from_text("Sleeping").is_err());
    }
}
