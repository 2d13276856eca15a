//! A small pool of connections to the task hub's database.
//!
//! Connections are made on demand, up to the pool's size, and kept while they work. A
//! connection the server closed (a restart, a network failure) is dropped when it is
//! next taken or given back, and a new one is made in its place: after PostgreSQL
//! restarts, each operation fails at most once with a retryable error and the next
//! one runs on a fresh connection.
//!
//! Each connection keeps the statements it prepared (the SQL of this crate is static),
//! so a statement is parsed once per connection. Transactions are explicit
//! (`BEGIN` … `COMMIT`); a connection dropped inside one is closed rather than reused,
//! which rolls the transaction back on the server.
//!
//! Every connection is made through the store's [`Endpoint`] (the driver's configuration
//! and the TLS connector), which the notification listener uses too, so that both
//! connect alike.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use keel_store::Error;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Socket, Statement};

use crate::failure::{backend_error, unavailable, Failure};
use crate::pipeline::Pipeline;
use crate::tls::{refused_certificate, Connector};

/// How long an operation waits for a free connection before failing (retryably).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

/// How a store connects to its database: the driver's configuration (with the hub's
/// search path) and the TLS connector its settings call for.
#[derive(Clone)]
pub(crate) struct Endpoint {
    config: tokio_postgres::Config,
    tls: Connector,
    /// The TLS settings in the URL's words, for errors.
    tls_settings: String,
}

/// What a connection's bytes travel on: the TLS stream (or plaintext, when the server
/// or the settings say so).
pub(crate) type DriverConnection = tokio_postgres::Connection<Socket, <Connector as MakeTlsConnect<Socket>>::Stream>;

impl Endpoint {
    pub(crate) fn new(config: tokio_postgres::Config, tls: Connector, tls_settings: String) -> Endpoint {
        Endpoint { config, tls, tls_settings }
    }

    /// A new connection, TLS negotiated as the settings say; the caller drives (spawns)
    /// the connection.
    pub(crate) async fn connect(&self) -> Result<(Client, DriverConnection), tokio_postgres::Error> {
        self.config.connect(self.tls.clone()).await
    }

    /// A failed connection as the store reports it. A server certificate that the TLS
    /// settings refuse is a configuration error: not retryable, and naming the settings.
    pub(crate) fn connect_error(&self, error: &tokio_postgres::Error) -> Error {
        match refused_certificate(error) {
            Some(why) => Error::Backend {
                message: format!("postgres: the server's TLS certificate was refused ({}): {why}", self.tls_settings),
                retryable: false,
            },
            None => backend_error(error),
        }
    }
}

/// The connections of one store.
pub(crate) struct Pool {
    endpoint: Endpoint,
    /// The task hub's notification channel (its schema name).
    channel: String,
    idle: Mutex<Vec<Connection>>,
    /// One permit per connection that may exist.
    slots: Arc<Semaphore>,
    size: usize,
}

/// One open connection and the statements prepared on it.
struct Connection {
    client: Client,
    statements: Mutex<HashMap<&'static str, Statement>>,
}

impl Pool {
    pub(crate) fn new(endpoint: Endpoint, channel: String, size: usize) -> Arc<Pool> {
        assert!(size > 0, "a pool needs room for one connection");
        Arc::new(Pool { endpoint, channel, idle: Mutex::new(Vec::new()), slots: Arc::new(Semaphore::new(size)), size })
    }

    /// A connection: an idle one that is still open, or a new one.
    pub(crate) async fn get(self: &Arc<Self>) -> Result<PooledConnection, Error> {
        let permit = tokio::time::timeout(ACQUIRE_TIMEOUT, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| {
                unavailable(format!("all {} database connections stayed busy for {ACQUIRE_TIMEOUT:?}", self.size))
            })?
            .expect("the pool's semaphore is never closed");
        let reused = {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            idle.retain(|connection| !connection.client.is_closed());
            idle.pop()
        };
        let connection = match reused {
            Some(connection) => connection,
            None => self.connect().await?,
        };
        Ok(PooledConnection {
            connection: Some(connection),
            pool: self.clone(),
            in_transaction: false,
            _permit: permit,
        })
    }

    async fn connect(&self) -> Result<Connection, Error> {
        let (client, connection) =
            self.endpoint.connect().await.map_err(|error| self.endpoint.connect_error(&error))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "a task hub connection ended");
            }
        });
        Ok(Connection { client, statements: Mutex::new(HashMap::new()) })
    }

    /// How the pool connects; the notification listener connects the same way, outside
    /// the pool.
    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub(crate) fn channel(&self) -> &str {
        &self.channel
    }
}

/// A connection taken from the pool; given back when dropped.
pub(crate) struct PooledConnection {
    connection: Option<Connection>,
    pool: Arc<Pool>,
    /// Set between `BEGIN` and `COMMIT`/`ROLLBACK`: a connection dropped in this state
    /// (its operation was cancelled or failed halfway) is closed, not reused.
    in_transaction: bool,
    _permit: OwnedSemaphorePermit,
}

impl PooledConnection {
    fn connection(&self) -> &Connection {
        self.connection.as_ref().expect("the connection is present until drop")
    }

    /// The driver's client, for statements sent side by side (pipelined) or built at
    /// run time.
    pub(crate) fn client(&self) -> &Client {
        &self.connection().client
    }

    /// The prepared statement for `sql`, prepared on first use on this connection.
    pub(crate) async fn statement(&self, sql: &'static str) -> Result<Statement, tokio_postgres::Error> {
        let connection = self.connection();
        let cached = connection.statements.lock().unwrap_or_else(PoisonError::into_inner).get(sql).cloned();
        if let Some(statement) = cached {
            return Ok(statement);
        }
        count_parsed();
        let statement = connection.client.prepare(sql).await?;
        connection.statements.lock().unwrap_or_else(PoisonError::into_inner).insert(sql, statement.clone());
        Ok(statement)
    }

    /// Prepares several statements, so that they can then be sent side by side in the
    /// order given.
    pub(crate) async fn statements<const N: usize>(
        &self,
        sql: [&'static str; N],
    ) -> Result<[Statement; N], tokio_postgres::Error> {
        let mut prepared = Vec::with_capacity(N);
        for sql in sql {
            prepared.push(self.statement(sql).await?);
        }
        Ok(prepared.try_into().unwrap_or_else(|_| unreachable!("N statements were prepared")))
    }

    pub(crate) async fn query(&self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, Failure> {
        let statement = self.statement(sql).await?;
        Ok(self.client().query(&statement, params).await?)
    }

    pub(crate) async fn query_one(&self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, Failure> {
        let statement = self.statement(sql).await?;
        Ok(self.client().query_one(&statement, params).await?)
    }

    pub(crate) async fn query_opt(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Failure> {
        let statement = self.statement(sql).await?;
        Ok(self.client().query_opt(&statement, params).await?)
    }

    pub(crate) async fn execute(&self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, Failure> {
        let statement = self.statement(sql).await?;
        Ok(self.client().execute(&statement, params).await?)
    }

    /// Opens a transaction whose `BEGIN` ([`BEGIN`]) the caller sends itself, first in
    /// the pipeline of its first statements (one round trip less); ended by
    /// [`PooledConnection::finish`] like one [`PooledConnection::begin`] opened.
    pub(crate) fn begin_in_pipeline(&mut self) {
        assert!(!self.in_transaction, "transactions do not nest");
        self.in_transaction = true;
    }

    pub(crate) async fn begin(&mut self) -> Result<(), Error> {
        assert!(!self.in_transaction, "transactions do not nest");
        self.in_transaction = true;
        let begin = self.statement(BEGIN).await.map_err(|error| backend_error(&error))?;
        self.client().execute(&begin, &[]).await.map(drop).map_err(|error| backend_error(&error))
    }

    /// Ends the transaction `begin` opened with the outcome of the work done in it:
    /// commits on success (sending `wakeups` to the task hub's listeners with it), rolls
    /// back on failure.
    pub(crate) async fn finish<T>(&mut self, outcome: Result<T, Failure>, wakeups: Option<&str>) -> Result<T, Error> {
        assert!(self.in_transaction, "finish ends a transaction that begin opened");
        match outcome {
            Ok(value) => {
                let committed = self.commit(wakeups).await;
                committed.map_err(|error| backend_error(&error))?;
                self.in_transaction = false;
                Ok(value)
            }
            Err(failure) => {
                let rolled_back = match self.statement(ROLLBACK).await {
                    Ok(rollback) => self.client().execute(&rollback, &[]).await.is_ok(),
                    Err(_) => false,
                };
                if rolled_back {
                    self.in_transaction = false;
                }
                Err(failure.into())
            }
        }
    }

    /// `COMMIT`, preceded by a `NOTIFY` of `wakeups` in the same round trip.
    async fn commit(&self, wakeups: Option<&str>) -> Result<(), tokio_postgres::Error> {
        let commit = self.statement(COMMIT).await?;
        let Some(payload) = wakeups else {
            return self.client().execute(&commit, &[]).await.map(drop);
        };
        let notify = self.statement(NOTIFY).await?;
        let channel = self.channel();
        let mut pipeline = Pipeline::new(self.client());
        pipeline.push(&notify, vec![&channel, &payload]);
        pipeline.push(&commit, Vec::new());
        pipeline.run().await.map(drop)
    }

    /// The task hub's notification channel.
    pub(crate) fn channel(&self) -> &str {
        &self.pool.channel
    }
}

/// Sends a wake-up to every process listening on the task hub (delivered at commit).
const NOTIFY: &str = "SELECT pg_notify($1, $2)";

const COMMIT: &str = "COMMIT";

/// Opens a transaction; see [`PooledConnection::begin_in_pipeline`].
pub(crate) const BEGIN: &str = "BEGIN";

const ROLLBACK: &str = "ROLLBACK";

/// SQL this process's store connections had the server parse: each statement a
/// connection prepared (once, then kept), and each statement sent without a kept one
/// (filtered instance queries, purges). Schema migrations at open are not counted.
static STATEMENTS_PARSED: AtomicU64 = AtomicU64::new(0);

/// How many statements this process's store connections had PostgreSQL parse so far
/// (migrations aside): a figure that does not grow means no statement was parsed.
pub fn statements_parsed() -> u64 {
    STATEMENTS_PARSED.load(Ordering::Relaxed)
}

/// Counts one statement sent to be parsed (see [`statements_parsed`]).
pub(crate) fn count_parsed() {
    STATEMENTS_PARSED.fetch_add(1, Ordering::Relaxed);
}

impl Drop for PooledConnection {
    fn drop(&mut self) {
        let Some(connection) = self.connection.take() else { return };
        if !self.in_transaction && !connection.client.is_closed() {
            self.pool.idle.lock().unwrap_or_else(PoisonError::into_inner).push(connection);
        }
    }
}
