//! Opening a task hub by URL: `sqlite://PATH` (the default, embedded, one machine) or
//! `postgres://…` / `postgresql://…` (shared by worker processes on many machines;
//! feature `postgres`, on by default).

use std::sync::Arc;

use keel_sqlite::{SqliteOptions, SqliteStore};
use keel_store::Store;

pub use keel_store::{Error, Notifications};

/// The store URL used when none is given: a SQLite file in the working directory.
pub const DEFAULT_STORE_URL: &str = "sqlite://keel.db";

/// Opens the task hub a URL names: `sqlite://PATH` or `sqlite:PATH`, or
/// `postgres://USER@HOST:PORT/DATABASE?schema=HUB` (also `postgresql://`; see
/// `keel_postgres::PostgresOptions` for the parameters).
///
/// A SQLite file is created if it does not exist; a task hub's schema is created or
/// migrated on open. [`Error::Invalid`] for a URL of another kind or one that names no
/// file; the backend's error when the file or the database cannot be opened.
///
/// ```
/// # #[tokio::main]
/// # async fn main() -> Result<(), keel::store::Error> {
/// # let dir = tempfile::tempdir().unwrap();
/// # let path = dir.path().join("keel.db").display().to_string();
/// let store = keel::store::open(&format!("sqlite://{path}")).await?;
/// let _worker = keel::Worker::builder(store).build();
///
/// let refused = keel::store::open("mysql://localhost/keel").await;
/// assert!(matches!(refused, Err(keel::store::Error::Invalid(_))));
/// # Ok(())
/// # }
/// ```
pub async fn open(url: &str) -> Result<Arc<dyn Store>, Error> {
    if let Some(path) = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")) {
        if path.is_empty() {
            return Err(Error::Invalid(format!("store URL '{url}' names no file")));
        }
        let path = path.to_string();
        let store = tokio::task::spawn_blocking(move || SqliteStore::open(path, SqliteOptions::default()))
            .await
            .map_err(|error| Error::Backend { message: error.to_string(), retryable: false })??;
        return Ok(Arc::new(store));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return open_postgres(url).await;
    }
    Err(Error::Invalid(format!("unsupported store URL '{url}': use sqlite://PATH or postgres://…")))
}

#[cfg(feature = "postgres")]
async fn open_postgres(url: &str) -> Result<Arc<dyn Store>, Error> {
    Ok(Arc::new(keel_postgres::PostgresStore::connect(url).await?))
}

#[cfg(not(feature = "postgres"))]
async fn open_postgres(_url: &str) -> Result<Arc<dyn Store>, Error> {
    Err(Error::Invalid("this build of Keel has no PostgreSQL support: enable the feature 'postgres'".into()))
}
