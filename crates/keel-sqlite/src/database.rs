//! The connections to one database file and how async code uses them.
//!
//! rusqlite is synchronous, and its operations here take microseconds, so they run
//! inline on the calling task's thread: a hop to another thread would cost more than
//! the work (context switches dominated the profile when every operation went through
//! tokio's blocking pool).
//!
//! Writes commit in groups, leader/follower style: a write queues itself, then waits for
//! the writer connection. Whoever gets the connection takes every write waiting in the
//! queue, runs each in a savepoint of one `BEGIN IMMEDIATE` transaction (a write that
//! fails rolls back its savepoint alone), commits once, and answers each writer. A
//! writer that finds its write already answered by an earlier leader just returns.
//! Uncontended, a write is one transaction on the caller's thread; under load, many
//! writes (instance starts, episodes, activity results) share one commit.
//!
//! Reads use a few reader connections of their own: in WAL mode they see the last
//! committed state without waiting for the writer.
//!
//! Every connection counts the SQL it compiles ([`statements_compiled`]): the hot
//! paths prepare each statement once per connection and keep it.
//!
//! Checkpoints (copying the WAL into the database file, with an fsync) run on a
//! background thread of their own, so that no commit pays for one: they were the
//! latency tail when the writer checkpointed every 1000 pages itself.

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use keel_store::Error;
use rusqlite::{Connection, OpenFlags};

use crate::failure::{backend_error, Failure};
use crate::owners::{self, Owner};
use crate::{schema, Durability};

/// How long a connection waits for another process's lock before giving up with a
/// (retryable) busy error.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Calls of SQLite's authorizer in this process. SQLite calls it only while it compiles
/// a statement (one or more calls per statement, none when a prepared one runs again).
static COMPILE_CALLBACKS: AtomicU64 = AtomicU64::new(0);

/// How much SQL this process's task-hub connections have compiled so far, counted in
/// SQLite authorizer calls (one or more per statement compiled, none when a prepared
/// statement runs again): a figure that does not grow means no statement was compiled.
pub fn statements_compiled() -> u64 {
    COMPILE_CALLBACKS.load(Ordering::Relaxed)
}

/// Statements each connection keeps prepared (query variants included).
const STATEMENT_CACHE_CAPACITY: usize = 64;

/// Reader connections: enough for reads to run beside each other and beside the writer.
const READER_CONNECTIONS: usize = 2;

/// A queued write: runs on the connection it is given, inside the group's transaction
/// (or learns that no transaction could be started), and returns what answers its caller
/// once the group's commit is known, and whether it succeeded.
type WriteJob = Box<dyn FnOnce(Result<&Connection, &Error>, Isolation) -> (Answer, bool) + Send>;

/// Whether a write shares its transaction with others (and so runs in a savepoint of
/// its own) or has it alone.
#[derive(Clone, Copy)]
enum Isolation {
    Alone,
    Savepoint,
}

/// Answers a write's caller with its result, or with the error that failed the commit.
type Answer = Box<dyn FnOnce(Option<&Error>) + Send>;

/// How often the background thread checkpoints the WAL.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(500);

/// WAL size, in pages, at which the writer checkpoints by itself: only when the
/// background checkpoints fall far behind.
const WRITER_CHECKPOINT_PAGES: u32 = 20_000;

/// The open database: the writer connection with its queue of writes, a few reader
/// connections, and the checkpointer.
pub(crate) struct Database {
    writer: tokio::sync::Mutex<Connection>,
    queued_writes: Mutex<Vec<WriteJob>>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    /// This store as an owner of leases ([`owners`]); declared after the
    /// checkpointer, which sweeps the dead owners, so that it stops first.
    _checkpointer: Checkpointer,
    owner: Option<Owner>,
}

/// The background checkpoint thread; stopped (and joined) when dropped.
struct Checkpointer {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    fn start(path: &Path) -> Result<Checkpointer, Error> {
        let connection = open_reader(path).and_then(|connection| {
            connection.pragma_update(None, "query_only", false)?;
            Ok(connection)
        });
        let connection = connection.map_err(backend_error)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let database = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("keel-sqlite-checkpoint".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_INTERVAL) {
                    // A passive checkpoint never blocks writers; a busy one is retried next time.
                    let _ = connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
                    // A process that died meanwhile: its leases are free now.
                    owners::release_dead(&database, &connection);
                }
            })
            .map_err(|error| Error::Backend {
                message: format!("cannot start the checkpointer: {error}"),
                retryable: false,
            })?;
        Ok(Checkpointer { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Database {
    /// Opens (creating if needed) and migrates the database at `path`.
    pub(crate) fn open(path: &Path, durability: Durability) -> Result<Database, Error> {
        let mut writer = open_writer(path, durability)?;
        schema::migrate(&mut writer)?;
        // Before this store takes any work: what dead processes held is free at once.
        owners::release_dead(path, &writer);
        let owner = Owner::register(path);
        let readers = (0..READER_CONNECTIONS)
            .map(|_| open_reader(path).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend_error)?;
        Ok(Database {
            writer: tokio::sync::Mutex::new(writer),
            queued_writes: Mutex::new(Vec::new()),
            readers,
            next_reader: AtomicUsize::new(0),
            _checkpointer: Checkpointer::start(path)?,
            owner,
        })
    }

    /// The id this store stamps its leases with ([`owners`]); `None` when it has none.
    pub(crate) fn owner_id(&self) -> Option<Arc<str>> {
        self.owner.as_ref().map(Owner::id)
    }

    /// Runs `operation` in a write transaction (a savepoint of a group commit), committed
    /// when it returns `Ok` and rolled back otherwise. Returns once the commit is durable.
    pub(crate) async fn write<T, F>(&self, operation: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, Failure> + Send + 'static,
    {
        let (answer, mut answered) = tokio::sync::oneshot::channel::<Result<T, Error>>();
        let job: WriteJob = Box::new(move |connection, isolation| {
            let result = match connection {
                Ok(connection) => run_write(connection, isolation, operation),
                Err(error) => Err(error.clone()),
            };
            let succeeded = result.is_ok();
            let answer: Answer = Box::new(move |commit_error| {
                let result = match commit_error {
                    Some(error) if result.is_ok() => Err(error.clone()),
                    _ => result,
                };
                let _ = answer.send(result);
            });
            (answer, succeeded)
        });
        lock(&self.queued_writes).push(job);
        let connection = self.writer.lock().await;
        if let Ok(result) = answered.try_recv() {
            return result; // an earlier leader committed it
        }
        let jobs = std::mem::take(&mut *lock(&self.queued_writes));
        assert!(!jobs.is_empty(), "an unanswered write is still queued");
        commit_group(&connection, jobs);
        drop(connection);
        answered.try_recv().expect("the group that held this write answered it")
    }

    /// Runs `operation` on a reader connection.
    pub(crate) async fn read<T, F>(&self, operation: F) -> Result<T, Error>
    where
        F: FnOnce(&Connection) -> Result<T, Failure>,
    {
        operation(&self.reader()).map_err(Error::from)
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

/// Runs one write. Sharing the transaction, it runs in a savepoint of its own, kept if
/// it succeeds and rolled back if it fails; alone, a failure rolls back the transaction.
fn run_write<T>(
    connection: &Connection,
    isolation: Isolation,
    operation: impl FnOnce(&Connection) -> Result<T, Failure>,
) -> Result<T, Error> {
    let shared = matches!(isolation, Isolation::Savepoint);
    if shared {
        execute_kept(connection, "SAVEPOINT keel_write").map_err(backend_error)?;
    }
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| operation(connection)));
    let result = match outcome {
        Ok(result) => result.map_err(Error::from),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|message| message.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(Error::Backend { message: format!("a database operation panicked: {message}"), retryable: false })
        }
    };
    if shared {
        if result.is_err() {
            execute_kept(connection, "ROLLBACK TO keel_write").map_err(backend_error)?;
        }
        execute_kept(connection, "RELEASE keel_write").map_err(backend_error)?;
    }
    result
}

/// Commits `jobs` in one transaction, then answers them all. A job that fails is
/// undone alone (its savepoint), or, when it is the only job, with the transaction.
fn commit_group(connection: &Connection, jobs: Vec<WriteJob>) {
    let isolation = if jobs.len() == 1 { Isolation::Alone } else { Isolation::Savepoint };
    let (answers, commit_error) = match WriteTransaction::begin(connection) {
        Ok(transaction) => {
            let mut failed = false;
            let answers: Vec<Answer> = jobs
                .into_iter()
                .map(|job| {
                    let (answer, succeeded) = job(Ok(transaction.connection), isolation);
                    failed |= !succeeded;
                    answer
                })
                .collect();
            let commit_error = if failed && matches!(isolation, Isolation::Alone) {
                // The only write failed: nothing to keep.
                transaction.rollback().map_err(backend_error).err()
            } else {
                transaction.commit().map_err(backend_error).err()
            };
            (answers, commit_error)
        }
        Err(error) => {
            let error = backend_error(error);
            let answers = jobs.into_iter().map(|job| job(Err(&error), isolation).0).collect();
            (answers, Some(error))
        }
    };
    for answer in answers {
        answer(commit_error.as_ref());
    }
}

/// A `BEGIN IMMEDIATE` transaction on the writer, rolled back unless committed (also
/// when a panic unwinds through it). Its three statements are prepared once and kept,
/// like every other statement of a write.
struct WriteTransaction<'c> {
    connection: &'c Connection,
}

impl<'c> WriteTransaction<'c> {
    fn begin(connection: &'c Connection) -> rusqlite::Result<WriteTransaction<'c>> {
        execute_kept(connection, "BEGIN IMMEDIATE")?;
        Ok(WriteTransaction { connection })
    }

    /// Commits; on failure the transaction is rolled back when this drops.
    fn commit(self) -> rusqlite::Result<()> {
        execute_kept(self.connection, "COMMIT")
    }

    fn rollback(self) -> rusqlite::Result<()> {
        execute_kept(self.connection, "ROLLBACK")
    }
}

impl Drop for WriteTransaction<'_> {
    fn drop(&mut self) {
        if !self.connection.is_autocommit() {
            let _ = execute_kept(self.connection, "ROLLBACK");
        }
    }
}

/// Runs a statement that takes no parameters, prepared once per connection.
fn execute_kept(connection: &Connection, sql: &str) -> rusqlite::Result<()> {
    connection.prepare_cached(sql)?.execute([]).map(drop)
}

/// Locks a mutex. A panic while it was held left no transaction open (a
/// [`WriteTransaction`] rolls back on drop) and no queue half-changed, so a poisoned lock
/// is still good.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
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
    connection.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES)?;
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
    connection.authorizer(Some(|_: rusqlite::hooks::AuthContext<'_>| {
        COMPILE_CALLBACKS.fetch_add(1, Ordering::Relaxed);
        rusqlite::hooks::Authorization::Allow
    }));
    Ok(())
}
