//! The task hub's tables and their migrations.
//!
//! A task hub is one PostgreSQL schema. Its `schema_migrations` table lists the
//! migrations applied; [`MIGRATIONS`] is append-only: script `n` takes a hub from
//! version `n` to `n + 1`. Opening a store runs the missing scripts in one transaction
//! under a transaction-scoped advisory lock named after the schema, so that processes
//! starting together migrate once and the others wait, then find nothing to do. A hub
//! written by a newer Keel (a version this code does not know) is refused rather than
//! misread.
//!
//! Conventions, as in the SQLite hub: timestamps are BIGINT milliseconds since the Unix
//! epoch, statuses their names, structured values (failure details, parent, history
//! events) JSON text. History, inbox and activity rows reference their instance with
//! `ON DELETE CASCADE`. Ids and names use the "C" collation, so that they sort and
//! compare bytewise, whatever the database's locale.

use crate::failure::Failure;
use crate::pool::PooledConnection;

/// The schema version this code writes and understands.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Migration scripts; index `n` migrates from version `n` to `n + 1`. Never edit a
/// released script: add a new one. Tables are named without a schema: the connection's
/// `search_path` is the hub's schema.
const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    r#"
    CREATE TABLE instances (
        instance_id     TEXT COLLATE "C" PRIMARY KEY,
        name            TEXT COLLATE "C" NOT NULL,
        version         TEXT,
        execution_id    TEXT NOT NULL,
        status          TEXT NOT NULL,
        input           TEXT,
        output          TEXT,
        custom_status   TEXT,
        failure         TEXT,
        parent          TEXT,
        scheduled_start BIGINT,
        created_at      BIGINT NOT NULL,
        last_updated_at BIGINT NOT NULL,
        completed_at    BIGINT,
        history_len     BIGINT NOT NULL DEFAULT 0,
        -- The orchestration lease: set by a fetch, cleared by a commit or an abandon.
        lock_token      TEXT,
        locked_until    BIGINT,
        -- Fetches since the last commit: the delivery attempt count.
        lock_count      INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX instances_by_created_at ON instances (created_at);
    CREATE INDEX instances_by_status ON instances (status);
    CREATE INDEX instances_by_locked_until ON instances (locked_until) WHERE locked_until IS NOT NULL;

    CREATE TABLE history (
        instance_id TEXT COLLATE "C" NOT NULL REFERENCES instances (instance_id) ON DELETE CASCADE,
        seq         BIGINT NOT NULL,
        event       TEXT NOT NULL,
        PRIMARY KEY (instance_id, seq)
    );

    -- Ids come from a sequence: never reused, so a consumed id can never name a newer
    -- message. They follow arrival order within a transaction; across concurrent
    -- writers, a message with a smaller id may commit (arrive) later.
    CREATE TABLE messages (
        id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        instance_id  TEXT COLLATE "C" NOT NULL REFERENCES instances (instance_id) ON DELETE CASCADE,
        execution_id TEXT,
        event        TEXT NOT NULL,
        visible_at   BIGINT NOT NULL
    );
    CREATE INDEX messages_by_visible_at ON messages (visible_at, id);
    CREATE INDEX messages_by_instance ON messages (instance_id, id);

    -- While an item is leased, visible_at is the end of the lease: an item whose worker
    -- died becomes visible again by itself. lock_token names the current lease.
    CREATE TABLE activities (
        id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        instance_id  TEXT COLLATE "C" NOT NULL REFERENCES instances (instance_id) ON DELETE CASCADE,
        execution_id TEXT NOT NULL,
        task_id      INTEGER NOT NULL,
        name         TEXT NOT NULL,
        input        TEXT,
        visible_at   BIGINT NOT NULL,
        lock_token   TEXT,
        attempts     INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX activities_by_visible_at ON activities (visible_at, id);
    CREATE INDEX activities_by_instance ON activities (instance_id);
    "#,
    // 2: orchestration tags, a JSON object (NULL: none).
    r#"
    ALTER TABLE instances ADD COLUMN tags TEXT;
    "#,
    // 3: the W3C trace context an activity's span hangs under (NULL: none).
    r#"
    ALTER TABLE activities ADD COLUMN trace_parent TEXT;
    ALTER TABLE activities ADD COLUMN trace_state TEXT;
    "#,
];

/// Brings the hub in `schema` to [`SCHEMA_VERSION`], creating it if needed.
pub(crate) async fn migrate(connection: &mut PooledConnection, schema: &str) -> Result<(), keel_store::Error> {
    connection.begin().await?;
    let outcome = apply_missing(connection, schema).await;
    connection.finish(outcome, None).await
}

async fn apply_missing(connection: &PooledConnection, schema: &str) -> Result<(), Failure> {
    let client = connection.client();
    // Held until the transaction ends; other processes migrating this hub wait here.
    client
        .execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &[&format!("keel migrations {schema}")])
        .await?;
    // `schema` was checked to be a plain lowercase identifier (see `config`).
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
                 version    INTEGER PRIMARY KEY,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             );"
        ))
        .await?;
    let found: i32 = client
        .query_one(&format!("SELECT coalesce(max(version), 0) FROM {schema}.schema_migrations"), &[])
        .await?
        .get(0);
    let found = match usize::try_from(found) {
        Ok(version) if version <= MIGRATIONS.len() => version,
        _ => {
            return Err(Failure::Contract(keel_store::Error::Backend {
                message: format!(
                    "the task hub in schema '{schema}' has schema version {found}, but this build of Keel only \
                     knows versions up to {SCHEMA_VERSION}; open it with a newer Keel"
                ),
                retryable: false,
            }))
        }
    };
    for (version, script) in MIGRATIONS.iter().enumerate().skip(found) {
        client.batch_execute(script).await?;
        let version = i32::try_from(version + 1).expect("migration count fits in i32");
        client.execute(&format!("INSERT INTO {schema}.schema_migrations (version) VALUES ($1)"), &[&version]).await?;
    }
    Ok(())
}
