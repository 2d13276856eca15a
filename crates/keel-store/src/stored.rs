//! How backends keep Keel's values in database columns, where SQL databases agree:
//! timestamps as integer milliseconds since the Unix epoch, statuses by name,
//! structured values (failure details, parents, history events) as JSON text. Data that
//! does not decode is reported as a non-retryable [`Error::Backend`] naming what it was.

use std::time::Duration;

use chrono::DateTime;
use keel_core::history::{RuntimeStatus, Timestamp};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Error, HubStats};

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

/// The statement that reads [`HubStats`] (see [`crate::Store::hub_stats`]), in SQL that
/// SQLite and PostgreSQL both run, with `now` (stored milliseconds) as the placeholder
/// `now_parameter` (`?1`, `$1`). One statement, so one snapshot. Each row is `(what,
/// status, count)` for [`hub_stats_from_rows`]: instance rows by status, entity rows
/// by status (ids from `@` up to, not including, `A`: those that start with `@`), then
/// the three backlog numbers, each as the fetches choose work (messages visible at
/// `now` of instances not locked past `now`; activity items visible at `now`, a lease
/// keeping an item invisible until it ends) or as the next wake-up does (messages
/// visible after `now`).
pub fn hub_stats_statement(now_parameter: &str) -> String {
    let now = now_parameter;
    format!(
        "SELECT 'instances' AS what, status, count(*) AS n FROM instances GROUP BY status \
         UNION ALL \
         SELECT 'entities', status, count(*) FROM instances \
             WHERE instance_id >= '@' AND instance_id < 'A' GROUP BY status \
         UNION ALL \
         SELECT 'ready_orchestrations', NULL, count(DISTINCT m.instance_id) FROM messages m \
             JOIN instances i ON i.instance_id = m.instance_id \
             WHERE m.visible_at <= {now} AND (i.locked_until IS NULL OR i.locked_until <= {now}) \
         UNION ALL \
         SELECT 'ready_activities', NULL, count(*) FROM activities WHERE visible_at <= {now} \
         UNION ALL \
         SELECT 'pending_timers', NULL, count(*) FROM messages WHERE visible_at > {now}"
    )
}

/// Folds the rows of [`hub_stats_statement`] into [`HubStats`]: orchestration
/// instances are the instance rows less the entity rows, status by status.
pub fn hub_stats_from_rows<S: AsRef<str>>(
    rows: impl IntoIterator<Item = (S, Option<S>, i64)>,
) -> Result<HubStats, Error> {
    let mut stats = HubStats::default();
    let mut entities = crate::InstanceCounts::default();
    for (what, status, count) in rows {
        let count = u64::try_from(count).map_err(|_| corrupt(format!("a negative count {count}")))?;
        let status = || match &status {
            Some(status) => status_from_text(status.as_ref()),
            None => Err(corrupt("a count by status without a status")),
        };
        match what.as_ref() {
            "instances" => stats.instances.add(status()?, count),
            "entities" => entities.add(status()?, count),
            "ready_orchestrations" => stats.backlog.ready_orchestrations = count,
            "ready_activities" => stats.backlog.ready_activities = count,
            "pending_timers" => stats.backlog.pending_timers = count,
            other => return Err(corrupt(format!("an unknown hub statistic '{other}'"))),
        }
    }
    for (status, count) in entities.iter() {
        stats.instances.subtract(status, count);
        stats.entities += count;
    }
    Ok(stats)
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

    #[test]
    fn hub_stats_leave_entities_out_of_the_instance_counts() {
        let rows = [
            ("instances", Some("Running"), 5),
            ("instances", Some("Completed"), 2),
            ("entities", Some("Running"), 3),
            ("ready_orchestrations", None, 4),
            ("ready_activities", None, 1),
            ("pending_timers", None, 7),
        ];
        let stats = hub_stats_from_rows(rows).unwrap();
        assert_eq!(stats.instances.get(RuntimeStatus::Running), 2);
        assert_eq!(stats.instances.get(RuntimeStatus::Completed), 2);
        assert_eq!((stats.instances.total(), stats.entities), (4, 3));
        let backlog = crate::Backlog { ready_orchestrations: 4, ready_activities: 1, pending_timers: 7 };
        assert_eq!(stats.backlog, backlog);
        assert!(hub_stats_from_rows([("instances", None, 1)]).is_err(), "a count by status names it");
        assert!(hub_stats_from_rows([("sideways", None, 1)]).is_err());
    }
}
