//! The connections to one database file and how async code uses them.
//!
//! rusqlite is synchronous, so every operation runs on tokio's blocking pool. Writes go
//! through one writer connection, one `BEGIN IMMEDIATE` transaction per operation (a
//! second writer would only wait for SQLite's write lock). Reads use a few reader
//! connections of their own: in WAL mode they see the last committed state without
//! waiting for the writer.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use keel_store::Error;
use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};

use crate::failure::{backend_error, Failure};
use crate::{schema, Durability};

/// How long a connection waits for another process's lock before giving up with a
/// (retryable) busy error.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Statements each connection keeps prepared (query variants included).
const STATEMENT_CACHE_CAPACITY: usize = 64;

/// Reader connections: enough for reads to run beside each other and beside the writer.
const READER_CONNECTIONS: usize = 2;

/// The open database: one writer and a few readers.
pub(crate) struct Database {
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
}

impl Database {
    /// Opens (creating if needed) and migrates the database at `path`.
    pub(crate) fn open(path: &Path, durability: Durability) -> Result<Database, Error> {
        let mut writer = open_writer(path, durability)?;
        schema::migrate(&mut writer)?;
        let readers = (0..READER_CONNECTIONS)
            .map(|_| open_reader(path).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend_error)?;
        Ok(Database { writer: Mutex::new(writer), readers, next_reader: AtomicUsize::new(0) })
    }

    /// Runs `operation` in one immediate write transaction, committed when it returns
    /// `Ok` and rolled back otherwise.
    pub(crate) async fn write<T, F>(self: &std::sync::Arc<Self>, operation: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut Transaction<'_>) -> Result<T, Failure> + Send + 'static,
    {
        let database = self.clone();
        run_blocking(move || {
            let mut connection = lock(&database.writer);
            let mut transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let value = operation(&mut transaction)?;
            transaction.commit()?;
            Ok(value)
        })
        .await
    }

    /// Runs `operation` on a reader connection.
    pub(crate) async fn read<T, F>(self: &std::sync::Arc<Self>, operation: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, Failure> + Send + 'static,
    {
        let database = self.clone();
        run_blocking(move || operation(&database.reader())).await
    }

    /// An idle reader if there is one, else the next in turn (waiting for it).
    fn reader(&self) -> MutexGuard<'_, Connection> {
        for reader in &self.readers {
            if let Ok(connection) = reader.try_lock() {
                return connection;
            }
        }
        let turn = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len();
        lock(&self.readers[turn])
    }
}

/// Locks a connection. A panic while it was held left no transaction open (rusqlite
/// rolls back on drop), so a poisoned connection is still good.
fn lock(connection: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    connection.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs blocking database work off the async threads; a panic in it is resumed here.
async fn run_blocking<T, F>(job: F) -> Result<T, Error>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, Failure> + Send + 'static,
{
    match tokio::task::spawn_blocking(job).await {
        Ok(result) => result.map_err(Error::from),
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(error) => {
            Err(Error::Backend { message: format!("the database task did not finish: {error}"), retryable: true })
        }
    }
}

fn open_writer(path: &Path, durability: Durability) -> Result<Connection, Failure> {
    let connection = Connection::open(path)?;
    configure(&connection)?;
    let journal_mode: String = connection.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !journal_mode.eq_ignore_ascii_case("wal") {
        return Err(Failure::Contract(Error::Backend {
            message: format!("the database refused WAL mode (journal_mode is {journal_mode})"),
            retryable: false,
        }));
    }
    match durability {
        Durability::Process => connection.pragma_update(None, "synchronous", "NORMAL")?,
        Durability::Full => {
            connection.pragma_update(None, "synchronous", "FULL")?;
            connection.pragma_update(None, "fullfsync", true)?;
        }
    }
    connection.pragma_update(None, "foreign_keys", true)?;
    Ok(connection)
}

fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
    let connection = Connection::open_with_flags(path, flags)?;
    configure(&connection)?;
    connection.pragma_update(None, "query_only", true)?;
    Ok(connection)
}

fn configure(connection: &Connection) -> rusqlite::Result<()> {
    connection.busy_timeout(BUSY_TIMEOUT)?;
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    Ok(())
}
