//! Keel's shared task hub: one PostgreSQL database, implementing
//! [`keel_store::Store`] for any number of worker processes on any number of machines.
//!
//! ```no_run
//! # async fn run() -> Result<(), keel_store::Error> {
//! use std::sync::Arc;
//! use keel_postgres::PostgresStore;
//! use keel_store::Store;
//!
//! let store: Arc<dyn Store> =
//!     Arc::new(PostgresStore::connect("postgres://keel@127.0.0.1:5432/app?schema=orders").await?);
//! # Ok(())
//! # }
//! ```
//!
//! A task hub is one schema (`?schema=`, default `keel`): its tables are created and
//! migrated when a store opens it. Workers compete for work without blocking each other
//! (`FOR … SKIP LOCKED`): an instance is locked by one worker at a time with a lease,
//! activity items are leased one by one, and a commit with a stale lease fails and
//! changes nothing. Leases compare with the `now` the callers pass in, so the workers'
//! clocks must agree to well within a lease (NTP does).
//!
//! Entities are rows of the same tables. A message to an entity id that has no row
//! creates the row in the message's transaction, whether a client, a commit or an
//! activity result writes it; the removal of an empty entity locks the row first, so
//! that it never deletes a message written meanwhile.
//!
//! Writes announce new work with `NOTIFY` on the hub's channel in their own
//! transaction; every store listens on a connection of its own and wakes its process's
//! dispatchers, so an idle worker reacts to work from another machine at once.
//! Connection failures are retryable errors; the pool replaces broken connections and
//! the listener reconnects, so workers ride out a restart of the database.
//!
//! Connections use TLS as the URL's `sslmode` says (libpq's modes; `prefer` by default),
//! the notification listener's too; see [`SslMode`].
//!
//! Code map: `config` reads the URL, `tls` its TLS settings and the connector they
//! call for, `pool` makes and holds the connections, `pipeline` sends
//! groups of statements in one round trip, `schema` the tables and migrations, `codec`
//! how values map to columns, `client` and `worker` the two halves of the [`Store`]
//! contract, `stats` the hub statistics, `wakeups` the cross-process notifications,
//! `failure` the internal error type.

mod client;
mod codec;
mod config;
mod failure;
mod pipeline;
mod pool;
mod schema;
mod stats;
mod tls;
mod wakeups;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keel_core::history::{HistoryEvent, RuntimeStatus, Timestamp};
use keel_store::{
    ActivityCompletion, ActivityItem, ActivityLock, Committed, EntityQuery, EpisodeCommit, HubStats, InstancePage,
    InstanceQuery, InstanceRecord, Message, NewInstance, Notifications, OrchestrationItem, OrchestrationLock,
    PurgeFilter, Result, Store,
};

use crate::pool::{Pool, PooledConnection};
use crate::wakeups::Wakeups;

pub use config::{PostgresOptions, DEFAULT_POOL_SIZE, DEFAULT_SCHEMA};
pub use pool::statements_parsed;
pub use schema::SCHEMA_VERSION;
pub use tls::SslMode;

/// A task hub in a PostgreSQL schema. Cheap to share: use it as `Arc<dyn Store>`.
pub struct PostgresStore {
    pool: Arc<Pool>,
    notifications: Arc<Notifications>,
    listener: tokio::task::JoinHandle<()>,
    schema: String,
}

impl PostgresStore {
    /// Opens the task hub a `postgres://` URL names (see [`PostgresOptions::from_url`]).
    pub async fn connect(url: &str) -> Result<PostgresStore> {
        PostgresStore::open(PostgresOptions::from_url(url)?).await
    }

    /// Opens a task hub, creating its schema if needed and migrating it to
    /// [`SCHEMA_VERSION`]. A hub with a newer schema is refused. The TLS settings' CA
    /// file is read here: one that cannot be used is [`keel_store::Error::Invalid`], and
    /// a server certificate they refuse is a non-retryable error. Must run inside a
    /// tokio runtime: the store's notification listener is a task on it.
    pub async fn open(options: PostgresOptions) -> Result<PostgresStore> {
        let pool = Pool::new(options.endpoint()?, options.schema.clone(), options.pool_size);
        let mut connection = pool.get().await?;
        schema::migrate(&mut connection, &options.schema).await?;
        drop(connection);
        let notifications = Arc::new(Notifications::default());
        let listener =
            tokio::spawn(wakeups::listen(pool.endpoint().clone(), pool.channel().to_owned(), notifications.clone()));
        Ok(PostgresStore { pool, notifications, listener, schema: options.schema })
    }

    /// The schema that holds this task hub.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Deletes the whole task hub: its schema with every instance, history, inbox and
    /// activity item in it. For tests and benchmarks; there is no undo.
    pub async fn delete_task_hub(self) -> Result<()> {
        let connection = self.pool.get().await?;
        // The schema name was checked to be a plain lowercase identifier.
        connection
            .client()
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema))
            .await
            .map_err(|error| failure::backend_error(&error))
    }

    async fn connection(&self) -> Result<PooledConnection> {
        self.pool.get().await
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").field("schema", &self.schema).finish_non_exhaustive()
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn notifications(&self) -> &Notifications {
        &self.notifications
    }

    async fn create_instance(&self, instance: NewInstance) -> Result<()> {
        instance.check()?;
        let mut connection = self.connection().await?;
        if !client::create_fresh_instance(&connection, &instance).await? {
            // The id is taken: replace the holder if it is terminal, in a transaction.
            connection.begin().await?;
            let outcome = client::create_instance(&connection, &instance).await;
            connection.finish(outcome, Wakeups::NEW_MESSAGE.payload()).await?;
        }
        Wakeups::NEW_MESSAGE.signal(&self.notifications);
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
        let mut connection = self.connection().await?;
        connection.begin().await?;
        let outcome = client::replace_instance(&connection, &instance, replaced, &messages).await;
        connection.finish(outcome, Wakeups::NEW_MESSAGE.payload()).await?;
        Wakeups::NEW_MESSAGE.signal(&self.notifications);
        Ok(())
    }

    async fn enqueue_message(&self, message: Message, accept_terminal: bool) -> Result<RuntimeStatus> {
        message.check()?;
        let mut connection = self.connection().await?;
        connection.begin().await?;
        let outcome = client::enqueue_message(&connection, &message, accept_terminal).await;
        let status = connection.finish(outcome, Wakeups::NEW_MESSAGE.payload()).await?;
        Wakeups::NEW_MESSAGE.signal(&self.notifications);
        Ok(status)
    }

    async fn get_instance(&self, instance_id: &str) -> Result<Option<InstanceRecord>> {
        Ok(client::get_instance(&self.connection().await?, instance_id).await?)
    }

    async fn read_history(&self, instance_id: &str) -> Result<Vec<HistoryEvent>> {
        Ok(client::read_history(&self.connection().await?, instance_id).await?)
    }

    async fn query_instances(&self, query: &InstanceQuery) -> Result<InstancePage> {
        Ok(client::query_instances(&self.connection().await?, query).await?)
    }

    async fn query_entities(&self, query: &EntityQuery) -> Result<InstancePage> {
        Ok(client::query_entities(&self.connection().await?, query).await?)
    }

    async fn remove_empty_entity(&self, instance_id: &str, now: Timestamp) -> Result<bool> {
        let mut connection = self.connection().await?;
        connection.begin().await?;
        let outcome = client::remove_empty_entity(&connection, instance_id, now).await;
        let announce = matches!(outcome, Ok(true)).then_some(Wakeups::INSTANCE_CHANGED);
        let removed = connection.finish(outcome, announce.and_then(Wakeups::payload)).await?;
        if let Some(wakeups) = announce {
            wakeups.signal(&self.notifications);
        }
        Ok(removed)
    }

    async fn purge_instance(&self, instance_id: &str) -> Result<bool> {
        let mut connection = self.connection().await?;
        connection.begin().await?;
        let outcome = client::purge_instance(&connection, instance_id).await;
        let announce = matches!(outcome, Ok(true)).then_some(Wakeups::INSTANCE_CHANGED);
        let purged = connection.finish(outcome, announce.and_then(Wakeups::payload)).await?;
        if let Some(wakeups) = announce {
            wakeups.signal(&self.notifications);
        }
        Ok(purged)
    }

    async fn purge_instances(&self, filter: &PurgeFilter) -> Result<u64> {
        let connection = self.connection().await?;
        let purged = client::purge_instances(&connection, filter, connection.channel()).await?;
        if purged > 0 {
            Wakeups::INSTANCE_CHANGED.signal(&self.notifications);
        }
        Ok(purged)
    }

    async fn purge_all(&self) -> Result<u64> {
        let connection = self.connection().await?;
        let purged = client::purge_all(&connection, connection.channel()).await?;
        Wakeups::INSTANCE_CHANGED.signal(&self.notifications);
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
        Ok(worker::fetch_orchestration_items(&self.connection().await?, max, lease, now).await?)
    }

    async fn commit_episodes(&self, commits: Vec<EpisodeCommit>, now: Timestamp) -> Result<Vec<Result<Committed>>> {
        if commits.is_empty() {
            return Ok(Vec::new());
        }
        let mut connection = self.connection().await?;
        // commit_episodes sends the BEGIN with its first statements.
        connection.begin_in_pipeline();
        let outcome = worker::commit_episodes(&connection, &commits, now).await;
        let announce = outcome.as_ref().map(|(_, wakeups)| *wakeups).unwrap_or_default();
        let (results, wakeups) = connection.finish(outcome, announce.payload()).await?;
        wakeups.signal(&self.notifications);
        Ok(results)
    }

    fn direct_episodes(&self) -> bool {
        true
    }

    async fn abandon_orchestration_item(&self, lock: &OrchestrationLock, retry_at: Timestamp) -> Result<()> {
        worker::abandon_orchestration_item(&self.connection().await?, lock, retry_at).await?;
        // Dispatchers look again and take the new visibility time into their next wake-up.
        Wakeups::ORCHESTRATION_WORK.signal(&self.notifications);
        Ok(())
    }

    async fn fetch_activity_items(&self, max: usize, lease: Duration, now: Timestamp) -> Result<Vec<ActivityItem>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        Ok(worker::fetch_activity_items(&self.connection().await?, max, lease, now).await?)
    }

    async fn complete_activities(&self, completions: Vec<ActivityCompletion>) -> Result<Vec<Result<()>>> {
        if completions.is_empty() {
            return Ok(Vec::new());
        }
        let (results, wakeups) = worker::complete_activities(&self.connection().await?, &completions).await?;
        wakeups.signal(&self.notifications);
        Ok(results)
    }

    async fn renew_orchestration_lease(&self, lock: &OrchestrationLock, lease: Duration, now: Timestamp) -> Result<()> {
        Ok(worker::renew_orchestration_lease(&self.connection().await?, lock, lease, now).await?)
    }

    async fn renew_activity_lease(&self, lock: &ActivityLock, lease: Duration, now: Timestamp) -> Result<()> {
        Ok(worker::renew_activity_lease(&self.connection().await?, lock, lease, now).await?)
    }

    async fn abandon_activity_item(&self, lock: &ActivityLock, retry_at: Timestamp) -> Result<()> {
        worker::abandon_activity_item(&self.connection().await?, lock, retry_at).await?;
        // Activity dispatchers look again and take the retry time into their next wake-up.
        Wakeups::ACTIVITY_WORK.signal(&self.notifications);
        Ok(())
    }

    async fn next_wakeup(&self, now: Timestamp) -> Result<Option<Timestamp>> {
        Ok(worker::next_wakeup(&self.connection().await?, now).await?)
    }

    async fn hub_stats(&self, now: Timestamp) -> Result<HubStats> {
        Ok(stats::hub_stats(&self.connection().await?, now).await?)
    }
}
