//! Runs the store conformance suite against [`SqliteStore`] on real temporary files,
//! one test per check (and once through `run_all`), plus SQLite-specific tests: the
//! schema version, reopening a file, refusing a newer schema, concurrent use through
//! `Arc<dyn Store>`.

use std::path::PathBuf;
use std::sync::Arc;

use chrono::DateTime;
use keel_core::history::{EventKind, HistoryEvent, RuntimeStatus, Timestamp};
use keel_sqlite::{Durability, SqliteOptions, SqliteStore, SCHEMA_VERSION};
use keel_store::{conformance, EpisodeCommit, InstanceUpdate, NewInstance, Store};
use tempfile::TempDir;

/// A store on a file in its own temporary directory (deleted on drop, after the store).
struct TempHub {
    store: SqliteStore,
    path: PathBuf,
    _dir: TempDir,
}

impl TempHub {
    fn new() -> TempHub {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("taskhub.db");
        let store = SqliteStore::open(&path, SqliteOptions::default()).expect("open the store");
        TempHub { store, path, _dir: dir }
    }
}

macro_rules! conformance_tests {
    ($($check:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $check() {
                let hub = TempHub::new();
                conformance::$check(&hub.store).await;
            }
        )*
    };
}

keel_store::for_each_check!(conformance_tests);

#[tokio::test]
async fn run_all_passes() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let opened = std::sync::atomic::AtomicUsize::new(0);
    conformance::run_all(|| {
        let n = opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.path().join(format!("taskhub-{n}.db"));
        async move { SqliteStore::open(path, SqliteOptions::default()).expect("open the store") }
    })
    .await;
    assert_eq!(opened.into_inner(), conformance::CHECK_NAMES.len(), "a fresh store per check");
}

fn at(millis: i64) -> Timestamp {
    DateTime::from_timestamp_millis(conformance::T0 + millis).expect("in range")
}

fn new_instance(instance_id: &str) -> NewInstance {
    NewInstance {
        trace: None,
        instance_id: instance_id.to_owned(),
        execution_id: format!("{instance_id}-execution"),
        name: "Flow".into(),
        version: None,
        input: Some("42".into()),
        parent: None,
        scheduled_start: None,
        created_at: at(0),
        tags: Default::default(),
    }
}

#[test]
fn the_schema_version_is_recorded() {
    let hub = TempHub::new();
    let connection = rusqlite::Connection::open(&hub.path).expect("open the file directly");
    let version: u32 = connection.pragma_query_value(None, "user_version", |row| row.get(0)).expect("user_version");
    assert_eq!(version, SCHEMA_VERSION);
    let journal_mode: String =
        connection.pragma_query_value(None, "journal_mode", |row| row.get(0)).expect("journal_mode");
    assert_eq!(journal_mode, "wal", "the file is in WAL mode");
}

#[tokio::test]
async fn data_survives_reopening() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("taskhub.db");
    let options = SqliteOptions { durability: Durability::Full };
    {
        let store = SqliteStore::open(&path, options.clone()).expect("open");
        store.create_instance(new_instance("a")).await.expect("create_instance");
        let mut items =
            store.fetch_orchestration_items(10, std::time::Duration::from_secs(30), at(0)).await.expect("fetch");
        let item = items.pop().expect("a has work");
        let history =
            vec![HistoryEvent::new(at(1), EventKind::OrchestratorStarted), item.messages[0].message.event.clone()];
        let commit = EpisodeCommit {
            direct: None,
            lock: item.lock.clone(),
            consumed: vec![item.messages[0].id],
            replace_history: None,
            history,
            state: Some(InstanceUpdate {
                status: RuntimeStatus::Running,
                version: None,
                input: Some("42".into()),
                output: None,
                failure: None,
                custom_status: Some("\"halfway\"".into()),
            }),
            activities: Vec::new(),
            messages: Vec::new(),
            new_instances: Vec::new(),
        };
        let results = store.commit_episodes(vec![commit], at(1)).await.expect("commit");
        assert!(results[0].is_ok(), "{results:?}");
    }

    let store = SqliteStore::open(&path, options).expect("reopen");
    let record = store.get_instance("a").await.expect("get_instance").expect("a survived");
    assert_eq!(record.status, RuntimeStatus::Running);
    assert_eq!(record.custom_status.as_deref(), Some("\"halfway\""));
    assert_eq!(record.history_len, 2);
    assert_eq!(store.read_history("a").await.expect("read_history").len(), 2);
    store.create_instance(new_instance("b")).await.expect("the reopened store takes writes");
}

#[test]
fn a_newer_schema_is_refused() {
    let hub = TempHub::new();
    let connection = rusqlite::Connection::open(&hub.path).expect("open the file directly");
    connection.pragma_update(None, "user_version", SCHEMA_VERSION + 1).expect("set user_version");
    drop(connection);
    let error = SqliteStore::open(&hub.path, SqliteOptions::default()).expect_err("refused");
    let message = error.to_string();
    assert!(message.contains("newer"), "the error says why: {message}");
    assert!(!error.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_use_through_a_shared_handle() {
    let hub = TempHub::new();
    let store: Arc<dyn Store> = Arc::new(hub.store);
    let changes = store.notifications().subscribe_instance_changes();

    let tasks: Vec<_> = (0..50)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                store.create_instance(new_instance(&format!("i-{n:02}"))).await.expect("create");
                store.get_instance(&format!("i-{n:02}")).await.expect("get").expect("exists")
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.expect("task").status, RuntimeStatus::Pending);
    }
    assert!(changes.has_changed().expect("sender alive"), "creating signals instance changes");

    let items = store.fetch_orchestration_items(100, std::time::Duration::from_secs(30), at(0)).await.expect("fetch");
    assert_eq!(items.len(), 50, "every instance has its start message");
}

/// Concurrent writes share group commits; a write that fails in a group is rolled back
/// alone and the others in the group are committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_in_a_group_commit_fails_alone() {
    let hub = TempHub::new();
    let store: Arc<dyn Store> = Arc::new(hub.store);
    let tasks: Vec<_> = (0..200)
        .map(|n| {
            let store = store.clone();
            // Every even write creates a new instance; every odd one repeats "dup".
            let id = if n % 2 == 0 { format!("i-{n:03}") } else { "dup".to_string() };
            tokio::spawn(async move { store.create_instance(new_instance(&id)).await })
        })
        .collect();
    let mut created = 0;
    let mut refused = 0;
    for task in tasks {
        match task.await.expect("the task ran") {
            Ok(()) => created += 1,
            Err(keel_store::Error::AlreadyExists { .. }) => refused += 1,
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    assert_eq!(created, 101, "100 distinct ids and the first 'dup'");
    assert_eq!(refused, 99, "every later 'dup' was refused");
    let page =
        store.query_instances(&keel_store::InstanceQuery { page_size: 500, ..Default::default() }).await.unwrap();
    assert_eq!(page.instances.len(), 101);
}
