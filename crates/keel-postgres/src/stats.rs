//! The hub statistics ([`keel_store::Store::hub_stats`]): one statement, so one
//! snapshot, that counts over the indexes (`instances_by_status`, the primary key's
//! range of entity ids, `messages_by_visible_at`, `activities_by_visible_at`).

use std::sync::LazyLock;

use keel_core::history::Timestamp;
use keel_store::HubStats;

use crate::codec::millis;
use crate::failure::Failure;
use crate::pool::PooledConnection;

/// [`keel_store::stored::hub_stats_statement`] with PostgreSQL's placeholder.
static HUB_STATS: LazyLock<String> = LazyLock::new(|| keel_store::stored::hub_stats_statement("$1"));

pub(crate) async fn hub_stats(connection: &PooledConnection, now: Timestamp) -> Result<HubStats, Failure> {
    let rows = connection.query(HUB_STATS.as_str(), &[&millis(now)]).await?;
    let rows = rows
        .iter()
        .map(|row| Ok((row.try_get::<_, &str>(0)?, row.try_get::<_, Option<&str>>(1)?, row.try_get::<_, i64>(2)?)))
        .collect::<Result<Vec<_>, Failure>>()?;
    Ok(keel_store::stored::hub_stats_from_rows(rows)?)
}
