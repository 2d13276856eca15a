//! The database schema and its migrations.
//!
//! The schema version is SQLite's `PRAGMA user_version`. [`MIGRATIONS`] is append-only:
//! script `n` takes a file from version `n` to `n + 1`. Opening runs the missing scripts
//! in one transaction; a file written by a newer Keel (a version this code does not know)
//! is refused rather than misread.
//!
//! Conventions: timestamps are integer milliseconds since the Unix epoch, statuses their
//! names, structured values JSON text. History, inbox and activity rows reference their
//! instance with `ON DELETE CASCADE`: deleting an instance row deletes all it holds.

use keel_store::Error;
use rusqlite::{Connection, TransactionBehavior};

use crate::failure::Failure;

/// The schema version this code writes and understands.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Migration scripts; index `n` migrates from version `n` to `n + 1`. Never edit a
/// released script: add a new one.
const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    "
    CREATE TABLE instances (
        instance_id     TEXT PRIMARY KEY NOT NULL,
        name            TEXT NOT NULL,
        version         TEXT,
        execution_id    TEXT NOT NULL,
        status          TEXT NOT NULL,
        input           TEXT,
        output          TEXT,
        custom_status   TEXT,
        failure         TEXT,
        parent          TEXT,
        scheduled_start INTEGER,
        created_at      INTEGER NOT NULL,
        last_updated_at INTEGER NOT NULL,
        completed_at    INTEGER,
        history_len     INTEGER NOT NULL DEFAULT 0,
        -- The orchestration lease: set by a fetch, cleared by a commit or an abandon.
        lock_token      TEXT,
        locked_until    INTEGER,
        -- Fetches since the last commit: the delivery attempt count.
        lock_count      INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX instances_by_created_at ON instances (created_at);
    CREATE INDEX instances_by_locked_until ON instances (locked_until)
        WHERE locked_until IS NOT NULL;

    CREATE TABLE history (
        instance_id TEXT NOT NULL REFERENCES instances (instance_id) ON DELETE CASCADE,
        seq         INTEGER NOT NULL,
        event       TEXT NOT NULL,
        PRIMARY KEY (instance_id, seq)
    );

    -- AUTOINCREMENT: ids are never reused, so they give arrival order and a consumed id
    -- can never name a newer message.
    CREATE TABLE messages (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        instance_id  TEXT NOT NULL REFERENCES instances (instance_id) ON DELETE CASCADE,
        execution_id TEXT,
        event        TEXT NOT NULL,
        visible_at   INTEGER NOT NULL
    );
    CREATE INDEX messages_by_visible_at ON messages (visible_at);
    CREATE INDEX messages_by_instance ON messages (instance_id, id);

    -- While an item is leased, visible_at is the end of the lease: an item whose worker
    -- died becomes visible again by itself. lock_token names the current lease.
    CREATE TABLE activities (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        instance_id  TEXT NOT NULL REFERENCES instances (instance_id) ON DELETE CASCADE,
        execution_id TEXT NOT NULL,
        task_id      INTEGER NOT NULL,
        name         TEXT NOT NULL,
        input        TEXT,
        visible_at   INTEGER NOT NULL,
        lock_token   TEXT,
        attempts     INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX activities_by_visible_at ON activities (visible_at);
    CREATE INDEX activities_by_instance ON activities (instance_id);
    ",
    // 2: orchestration tags, a JSON object (NULL: none).
    "
    ALTER TABLE instances ADD COLUMN tags TEXT;
    ",
    // 3: the W3C trace context an activity's span hangs under (NULL: none).
    "
    ALTER TABLE activities ADD COLUMN trace_parent TEXT;
    ALTER TABLE activities ADD COLUMN trace_state TEXT;
    ",
    // 4: instances by status, as the PostgreSQL hub has them: the hub statistics count
    // them over this index instead of reading every row.
    "
    CREATE INDEX instances_by_status ON instances (status);
    ",
    // 5: which open store took a lease (see `owners`): a dead process's leases are
    // released when another one notices, not when they run out.
    "
    ALTER TABLE instances ADD COLUMN lease_owner TEXT;
    ALTER TABLE activities ADD COLUMN lease_owner TEXT;
    ",
];

/// Brings the database to [`SCHEMA_VERSION`], in one transaction.
pub(crate) fn migrate(connection: &mut Connection) -> Result<(), Failure> {
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found: i64 = transaction.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let found = match usize::try_from(found) {
        Ok(version) if version <= MIGRATIONS.len() => version,
        _ => {
            return Err(Failure::Contract(Error::Backend {
                message: format!(
                    "the database has schema version {found}, but this build of Keel only knows \
                     versions up to {SCHEMA_VERSION}; open it with a newer Keel"
                ),
                retryable: false,
            }))
        }
    };
    for script in &MIGRATIONS[found..] {
        transaction.execute_batch(script)?;
    }
    transaction.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    transaction.commit()?;
    Ok(())
}
