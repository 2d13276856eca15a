//! Keel's embedded task hub: one SQLite file in WAL mode, implementing
//! [`keel_store::Store`].
//!
//! ```no_run
//! # fn main() -> Result<(), keel_store::Error> {
//! use std::sync::Arc;
//! use keel_sqlite::{SqliteOptions, SqliteStore};
//! use keel_store::Store;
//!
//! let store: Arc<dyn Store> = Arc::new(SqliteStore::open("taskhub.db", SqliteOptions::default())?);
//! # Ok(())
//! # }
//! ```
//!
//! Every write operation is one transaction; batches use a savepoint per item so that
//! one stale lease fails alone. Times come in as arguments: the store never reads the
//! clock. The schema is versioned (`PRAGMA user_version`) and migrated on open.
//!
//! Code map: `database` owns the connections and runs blocking work off the async
//! threads, `schema` the tables and migrations, `codec` how values map to columns,
//! `client` and `worker` the two halves of the [`Store`] contract, `stats` the hub
//! statistics, `failure` the internal error type.

mod client;
mod codec;
mod database;
mod failure;
mod owners;
mod schema;
mod stats;
mod worker;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keel_core::history::{HistoryEvent, RuntimeStatus, Timestamp};
use keel_store::{
    ActivityCompletion, ActivityItem, ActivityLock, Committed, EntityQuery, EpisodeCommit, HubStats, InstancePage,
    InstanceQuery, InstanceRecord, Message, NewInstance, Notifications, OrchestrationItem, OrchestrationLock,
    PurgeFilter, Result, Store,
};

use crate::database::Database;

pub use database::statements_compiled;
pub use schema::SCHEMA_VERSION;

/// How much a committed write survives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// WAL with `synchronous = NORMAL`: a commit survives the process being killed
    /// (`kill -9`, a panic, an OOM kill), but the last commits may be lost if the
    /// machine loses power.
    #[default]
    Process,
    /// WAL with `synchronous = FULL`: every commit is synced to disk before it returns,
    /// and survives power loss. Slower.
    Full,
}

/// How to open a [`SqliteStore`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SqliteOptions {
    pub durability: Durability,
}

/// A task hub in one SQLite file. Cheap to share: use it as `Arc<dyn Store>`.
pub struct SqliteStore {
    database: Arc<Database>,
    notifications: Notifications,
}

impl SqliteStore {
    /// Opens the task hub at `path`, creating the file if needed and migrating its
    /// schema to [`SCHEMA_VERSION`]. A file with a newer schema is refused.
    pub fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<SqliteStore> {
        let database = Database::open(path.as_ref(), options.durability)?;
        Ok(SqliteStore { database: Arc::new(database), notifications: Notifications::default() })
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn notifications(&self) -> &Notifications {
        &self.notifications
    }

    async fn create_instance(&self, instance: NewInstance) -> Result<()> {
        instance.check()?;
        self.database.write(move |transaction| client::create_instance(transaction, &instance)).await?;
        self.notifications.orchestration_work_added();
        self.notifications.instance_changed();
        Ok(())
    }

    async fn replace_instance(
        &self,
        instance: NewInstance,
        replaced: &InstanceRecord,
        messages: Vec<Message>,
    ) -> Result<()> {
        instance.check()?;
        for message in &messages {
            message.check()?;
        }
        let replaced = replaced.clone();
        self.database
            .write(move |transaction| client::replace_instance(transaction, &instance, &replaced, &messages))
            .await?;
        self.notifications.orchestration_work_added();
        self.notifications.instance_changed();
        Ok(())
    }

    async fn enqueue_message(&self, message: Message, accept_terminal: bool) -> Result<RuntimeStatus> {
        message.check()?;
        let status = self
            .database
            .write(move |transaction| client::enqueue_message(transaction, &message, accept_terminal))
            .await?;
        self.notifications.orchestration_work_added();
        self.notifications.instance_changed();
        Ok(status)
    }

    async fn get_instance(&self, instance_id: &str) -> Result<Option<InstanceRecord>> {
        let instance_id = instance_id.to_owned();
        self.database.read(move |connection| client::get_instance(connection, &instance_id)).await
    }

    async fn read_history(&self, instance_id: &str) -> Result<Vec<HistoryEvent>> {
        let instance_id = instance_id.to_owned();
        self.database.read(move |connection| client::read_history(connection, &instance_id)).await
    }

    async fn query_instances(&self, query: &InstanceQuery) -> Result<InstancePage> {
        let query = query.clone();
        self.database.read(move |connection| client::query_instances(connection, &query)).await
    }

    async fn query_entities(&self, query: &EntityQuery) -> Result<InstancePage> {
        let query = query.clone();
        self.database.read(move |connection| client::query_entities(connection, &query)).await
    }

    async fn remove_empty_entity(&self, instance_id: &str, now: Timestamp) -> Result<bool> {
        let instance_id = instance_id.to_owned();
        let removed =
            self.database.write(move |transaction| client::remove_empty_entity(transaction, &instance_id, now)).await?;
        if removed {
            self.notifications.instance_changed();
        }
        Ok(removed)
    }

    async fn purge_instance(&self, instance_id: &str) -> Result<bool> {
        let instance_id = instance_id.to_owned();
        let purged = self.database.write(move |transaction| client::purge_instance(transaction, &instance_id)).await?;
        if purged {
            self.notifications.instance_changed();
        }
        Ok(purged)
    }

    async fn purge_instances(&self, filter: &PurgeFilter) -> Result<u64> {
        let filter = filter.clone();
        let purged = self.database.write(move |transaction| client::purge_instances(transaction, &filter)).await?;
        if purged > 0 {
            self.notifications.instance_changed();
        }
        Ok(purged)
    }

    async fn purge_all(&self) -> Result<u64> {
        let purged = self.database.write(client::purge_all).await?;
        self.notifications.instance_changed();
        Ok(purged)
    }

    async fn fetch_orchestration_items(
        &self,
        max: usize,
        lease: Duration,
        now: Timestamp,
    ) -> Result<Vec<OrchestrationItem>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let owner = self.database.owner_id();
        self.database
            .write(move |transaction| worker::fetch_orchestration_items(transaction, max, lease, now, owner.as_deref()))
            .await
    }

    async fn commit_episodes(&self, commits: Vec<EpisodeCommit>, now: Timestamp) -> Result<Vec<Result<Committed>>> {
        if commits.is_empty() {
            return Ok(Vec::new());
        }
        let owner = self.database.owner_id();
        let (results, wakeups) = self
            .database
            .write(move |transaction| worker::commit_episodes(transaction, &commits, now, owner.as_deref()))
            .await?;
        wakeups.signal(&self.notifications);
        Ok(results)
    }

    fn direct_episodes(&self) -> bool {
        true
    }

    async fn abandon_orchestration_item(&self, lock: &OrchestrationLock, retry_at: Timestamp) -> Result<()> {
        let lock = lock.clone();
        self.database
            .write(move |transaction| worker::abandon_orchestration_item(transaction, &lock, retry_at))
            .await?;
        // Dispatchers look again and take the new visibility time into their next wake-up.
        self.notifications.orchestration_work_added();
        Ok(())
    }

    async fn fetch_activity_items(&self, max: usize, lease: Duration, now: Timestamp) -> Result<Vec<ActivityItem>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let owner = self.database.owner_id();
        self.database
            .write(move |transaction| worker::fetch_activity_items(transaction, max, lease, now, owner.as_deref()))
            .await
    }

    async fn complete_activities(&self, completions: Vec<ActivityCompletion>) -> Result<Vec<Result<()>>> {
        if completions.is_empty() {
            return Ok(Vec::new());
        }
        let (results, wakeups) =
            self.database.write(move |transaction| worker::complete_activities(transaction, &completions)).await?;
        wakeups.signal(&self.notifications);
        Ok(results)
    }

    async fn renew_orchestration_lease(&self, lock: &OrchestrationLock, lease: Duration, now: Timestamp) -> Result<()> {
        let lock = lock.clone();
        self.database.write(move |connection| worker::renew_orchestration_lease(connection, &lock, lease, now)).await
    }

    async fn renew_activity_lease(&self, lock: &ActivityLock, lease: Duration, now: Timestamp) -> Result<()> {
        let lock = lock.clone();
        self.database.write(move |transaction| worker::renew_activity_lease(transaction, &lock, lease, now)).await
    }

    async fn abandon_activity_item(&self, lock: &ActivityLock, retry_at: Timestamp) -> Result<()> {
        let lock = lock.clone();
        self.database.write(move |transaction| worker::abandon_activity_item(transaction, &lock, retry_at)).await?;
        // Activity dispatchers look again and take the retry time into their next wake-up.
        self.notifications.activity_work_added();
        Ok(())
    }

    async fn next_wakeup(&self, now: Timestamp) -> Result<Option<Timestamp>> {
        self.database.read(move |connection| worker::next_wakeup(connection, now)).await
    }

    async fn hub_stats(&self, now: Timestamp) -> Result<HubStats> {
        self.database.read(move |connection| stats::hub_stats(connection, now)).await
    }
}
