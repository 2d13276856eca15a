//! Shared helpers of the PostgreSQL tests: the database URL from the environment (or a
//! clear skip), and fresh task hubs in schemas of their own, so tests run side by side.

#![allow(dead_code)] // each test binary uses its own subset

use std::io::Write;

use keel_postgres::{PostgresOptions, PostgresStore};

/// The variable that names the database the tests may use.
pub const URL_ENV: &str = "KEEL_TEST_POSTGRES_URL";

/// The database URL, or `None` after printing why the test is skipped. The line goes
/// straight to the process's stderr, past the test harness's capture, so that a plain
/// `cargo test` shows it.
pub fn postgres_url(test: &str) -> Option<String> {
    match std::env::var(URL_ENV) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            // CI must run them: there a missing server is a failure, not a skip.
            assert!(
                std::env::var("CI").map_or(true, |ci| ci != "true"),
                "{test} must run in CI, but {URL_ENV} is not set"
            );
            let _ = writeln!(
                std::io::stderr(),
                "skipped {test}: set {URL_ENV}=postgres://USER@HOST:PORT/DATABASE to run the PostgreSQL tests \
                 (.ci/run starts a throwaway server and sets it)"
            );
            None
        }
    }
}

/// A schema name no other test uses.
pub fn fresh_schema(prefix: &str) -> String {
    format!("{prefix}_{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// `url` with the task hub in `schema`.
pub fn hub_url(url: &str, schema: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}schema={schema}")
}

/// Options for the task hub in `schema` of the database at `url`.
pub fn hub_options(url: &str, schema: &str) -> PostgresOptions {
    PostgresOptions::from_url(url).expect("a valid URL").with_schema(schema).expect("a valid schema")
}

/// A store on a new, empty task hub.
pub async fn fresh_store(url: &str) -> PostgresStore {
    PostgresStore::open(hub_options(url, &fresh_schema("keel_test"))).await.expect("the store opens")
}

pub mod fleet;
pub mod versioned;
