//! The disk's own figure for the rows issue 15 compares against: the p50 of one small
//! SQLite WAL commit with the same durability pragmas the task hub uses, measured in the
//! same directory kind (a temp dir) and in the same run as the scenario.

use std::time::Instant;

/// Commits timed for the p50.
const COMMITS: usize = 200;

/// The median latency, in milliseconds, of a one-row insert committed on its own in a
/// fresh WAL database with `synchronous` = NORMAL (`Durability::Process`) or FULL.
pub(crate) fn single_commit_p50_ms(durability: keel_sqlite::Durability) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let connection = rusqlite::Connection::open(dir.path().join("disk.db"))?;
    let journal_mode: String = connection.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    anyhow::ensure!(journal_mode.eq_ignore_ascii_case("wal"), "the disk test database refused WAL");
    match durability {
        keel_sqlite::Durability::Process => connection.pragma_update(None, "synchronous", "NORMAL")?,
        keel_sqlite::Durability::Full => connection.pragma_update(None, "synchronous", "FULL")?,
    }
    connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)", [])?;
    let mut latencies = Vec::with_capacity(COMMITS);
    for i in 0..COMMITS {
        let started = Instant::now();
        connection.execute("INSERT INTO t (id, payload) VALUES (?1, 'a small event of about forty bytes')", [i])?;
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    Ok(latencies[COMMITS / 2])
}
