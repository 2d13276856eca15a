//! The hub statistics ([`keel_store::Store::hub_stats`]): one read statement, so one
//! snapshot of the WAL, that counts over the indexes (`instances_by_status`, the
//! primary key's range of entity ids, `messages_by_visible_at`,
//! `activities_by_visible_at`).

use std::sync::LazyLock;

use keel_core::history::Timestamp;
use keel_store::HubStats;
use rusqlite::Connection;

use crate::codec::millis;
use crate::failure::Failure;

/// [`keel_store::stored::hub_stats_statement`] with SQLite's placeholder.
static HUB_STATS: LazyLock<String> = LazyLock::new(|| keel_store::stored::hub_stats_statement("?1"));

pub(crate) fn hub_stats(connection: &Connection, now: Timestamp) -> Result<HubStats, Failure> {
    let mut statement = connection.prepare_cached(&HUB_STATS)?;
    let rows = statement
        .query_map([millis(now)], |row| Ok((row.get::<_, String>(0)?, row.get::<_, Option<String>>(1)?, row.get(2)?)))?
        .collect::<Result<Vec<(String, Option<String>, i64)>, _>>()?;
    Ok(keel_store::stored::hub_stats_from_rows(rows)?)
}
