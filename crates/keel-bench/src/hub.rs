//! The task hub a scenario runs on, fresh for every scenario: a SQLite file in a
//! temporary directory, or a new schema in a PostgreSQL database (deleted afterwards);
//! and, with `--workers N`, the worker processes that serve it (this program started
//! again with `--worker-process`; each stops when its standard input closes).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use keel_postgres::{PostgresOptions, PostgresStore};
use keel_store::Store;

/// Where scenarios make their task hubs (`--store`).
#[derive(Clone, Debug)]
pub(crate) enum HubSpec {
    Sqlite(keel_sqlite::Durability),
    /// A PostgreSQL URL; each hub is a new schema in its database.
    Postgres(String),
}

/// A task hub made for one scenario.
pub(crate) struct FreshHub {
    pub(crate) store: Arc<dyn Store>,
    /// The URL worker processes open it with.
    pub(crate) url: String,
    cleanup: Cleanup,
}

enum Cleanup {
    /// The SQLite file's directory, deleted on drop.
    Directory(tempfile::TempDir),
    /// The schema to drop.
    Schema(Box<PostgresOptions>),
}

impl HubSpec {
    /// A new, empty task hub.
    pub(crate) async fn create(&self) -> anyhow::Result<FreshHub> {
        match self {
            HubSpec::Sqlite(durability) => {
                let dir = tempfile::tempdir()?;
                let path = dir.path().join("bench.db");
                let options = keel_sqlite::SqliteOptions { durability: *durability };
                let store: Arc<dyn Store> = Arc::new(keel_sqlite::SqliteStore::open(&path, options)?);
                Ok(FreshHub { store, url: format!("sqlite://{}", path.display()), cleanup: Cleanup::Directory(dir) })
            }
            HubSpec::Postgres(url) => {
                let schema = format!("keel_bench_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
                let options = PostgresOptions::from_url(url)?.with_schema(&schema)?;
                let store: Arc<dyn Store> = Arc::new(PostgresStore::open(options.clone()).await?);
                let separator = if url.contains('?') { '&' } else { '?' };
                let url = format!("{url}{separator}schema={schema}");
                Ok(FreshHub { store, url, cleanup: Cleanup::Schema(Box::new(options)) })
            }
        }
    }

    /// How the results name the store.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            HubSpec::Sqlite(_) => "sqlite",
            HubSpec::Postgres(_) => "postgres",
        }
    }
}

impl FreshHub {
    /// Deletes the hub (once the scenario's stores are closed).
    pub(crate) async fn delete(self) -> anyhow::Result<()> {
        drop(self.store);
        match self.cleanup {
            Cleanup::Directory(dir) => drop(dir),
            Cleanup::Schema(options) => PostgresStore::open(*options).await?.delete_task_hub().await?,
        }
        Ok(())
    }
}

/// Worker processes serving one hub.
pub(crate) struct WorkerProcesses {
    children: Vec<Child>,
}

/// How long stopping worker processes may take before they are killed.
const STOP_DEADLINE: Duration = Duration::from_secs(10);

impl WorkerProcesses {
    pub(crate) fn start(count: usize, hub_url: &str) -> anyhow::Result<WorkerProcesses> {
        let program = std::env::current_exe().context("the path of this program")?;
        let children = (0..count)
            .map(|_| {
                Command::new(&program)
                    .args(["--worker-process", "--store", hub_url])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .spawn()
                    .context("starting a worker process")
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(WorkerProcesses { children })
    }

    /// The largest peak resident memory of the worker processes, in MiB.
    pub(crate) fn peak_rss_mib(&self) -> f64 {
        self.children
            .iter()
            .map(|child| crate::peak_rss_mib_of(&format!("/proc/{}/status", child.id())))
            .fold(0.0, f64::max)
    }

    /// Closes the workers' standard input (they shut down) and waits for them; kills
    /// those still running after [`STOP_DEADLINE`].
    pub(crate) async fn stop(mut self) {
        for child in &mut self.children {
            drop(child.stdin.take());
        }
        let deadline = tokio::time::Instant::now() + STOP_DEADLINE;
        for child in &mut self.children {
            while matches!(child.try_wait(), Ok(None)) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// `--worker-process`: serves the hub at `url` with the standard scenarios' functions
/// until standard input closes, then shuts the worker down.
pub(crate) async fn serve(url: &str) -> anyhow::Result<()> {
    let store = keel::store::open(url).await?;
    let worker = crate::standard_worker(store).start();
    tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink())).await??;
    worker.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
