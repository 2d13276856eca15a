//! The connections to one database file and how async code uses them.
//!
//! rusqlite is synchronous. Writes go to one writer thread that owns the writer
//! connection and commits in groups: it takes every write waiting in its queue, runs each
//! in a savepoint of one `BEGIN IMMEDIATE` transaction (an operation that fails rolls back
//! its savepoint alone), commits once, and only then answers each caller. Many
//! concurrent writes (instance starts, episodes, activity results) thus share one commit
//! instead of queueing for the write lock one transaction at a time. Reads run on
//! tokio's blocking pool on reader connections of their own: in WAL mode they see the
//! last committed state without waiting for the writer.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use keel_store::Error;
use rusqlite::{Connection, OpenFlags, Savepoint, TransactionBehavior};

use crate::failure::{backend_error, Failure};
use crate::{schema, Durability};

/// How long a connection waits for another process's lock before giving up with a
/// (retryable) busy error.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Statements each connection keeps prepared (query variants included).
const STATEMENT_CACHE_CAPACITY: usize = 64;

/// Reader connections: enough for reads to run beside each other and beside the writer.
const READER_CONNECTIONS: usize = 2;

/// Most writes committed together in one transaction.
const MAX_WRITES_PER_COMMIT: usize = 512;

/// A write waiting for the writer thread: runs in the savepoint it is given (or learns
/// that no transaction could be started) and returns what answers its caller once the
/// group's commit is known.
type WriteJob = Box<dyn FnOnce(Result<&mut Savepoint<'_>, &Error>) -> Answer + Send>;

/// Answers a write's caller with its result, or with the error that failed the commit.
type Answer = Box<dyn FnOnce(Option<&Error>) + Send>;

/// The open database: a writer thread and a few reader connections.
pub(crate) struct Database {
    writes: std::sync::mpsc::Sender<WriteJob>,
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
        let (writes, queue) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("keel-sqlite-writer".into())
            .spawn(move || run_writer(writer, queue))
            .map_err(|error| Error::Backend {
                message: format!("cannot start the writer thread: {error}"),
                retryable: false,
            })?;
        Ok(Database { writes, readers, next_reader: AtomicUsize::new(0) })
    }

    /// Runs `operation` in a write transaction (a savepoint of a group commit), committed
    /// when it returns `Ok` and rolled back otherwise. Returns once the commit is durable.
    pub(crate) async fn write<T, F>(&self, operation: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut Savepoint<'_>) -> Result<T, Failure> + Send + 'static,
    {
        let (answer, answered) = tokio::sync::oneshot::channel::<Result<T, Error>>();
        let job: WriteJob = Box::new(move |savepoint| {
            let result = match savepoint {
                Ok(outer) => run_in_savepoint(outer, operation),
                Err(error) => Err(error.clone()),
            };
            Box::new(move |commit_error| {
                let result = match commit_error {
                    Some(error) if result.is_ok() => Err(error.clone()),
                    _ => result,
                };
                let _ = answer.send(result);
            })
        });
        self.writes.send(job).map_err(|_| writer_gone())?;
        answered.await.map_err(|_| writer_gone())?
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

fn writer_gone() -> Error {
    Error::Backend { message: "the database writer thread has stopped".into(), retryable: false }
}

/// Runs one write in its own savepoint: kept if it succeeds, rolled back if it fails.
fn run_in_savepoint<T>(
    outer: &mut Savepoint<'_>,
    operation: impl FnOnce(&mut Savepoint<'_>) -> Result<T, Failure>,
) -> Result<T, Error> {
    let mut savepoint = outer.savepoint().map_err(backend_error)?;
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| operation(&mut savepoint))) {
        Ok(Ok(value)) => {
            savepoint.commit().map_err(backend_error)?;
            Ok(value)
        }
        Ok(Err(failure)) => Err(Error::from(failure)), // dropping the savepoint rolls it back
        Err(panic) => {
            drop(savepoint);
            let message = panic
                .downcast_ref::<&str>()
                .map(|message| message.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(Error::Backend { message: format!("a database operation panicked: {message}"), retryable: false })
        }
    }
}

/// The writer thread: commits the writes waiting in `queue` in groups until every
/// sender is gone.
fn run_writer(mut connection: Connection, queue: std::sync::mpsc::Receiver<WriteJob>) {
    while let Ok(first) = queue.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_WRITES_PER_COMMIT {
            match queue.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let answers: Vec<Answer>;
        let commit_error = match connection.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(mut transaction) => {
                let outcome = transaction.savepoint().map_err(backend_error).map(|mut group| {
                    let answers: Vec<Answer> = jobs.drain(..).map(|job| job(Ok(&mut group))).collect();
                    (group.commit().map_err(backend_error), answers)
                });
                match outcome {
                    Ok((group_committed, group_answers)) => {
                        answers = group_answers;
                        group_committed.and_then(|()| transaction.commit().map_err(backend_error)).err()
                    }
                    Err(error) => {
                        answers = jobs.drain(..).map(|job| job(Err(&error))).collect();
                        Some(error)
                    }
                }
            }
            Err(error) => {
                let error = backend_error(error);
                answers = jobs.drain(..).map(|job| job(Err(&error))).collect();
                Some(error)
            }
        };
        for answer in answers {
            answer(commit_error.as_ref());
        }
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
    // Savepoints (one per episode in a batch) journal into temporary storage: keep it
    // in memory rather than in temporary files.
    connection.pragma_update(None, "temp_store", "MEMORY")?;
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    Ok(())
}
