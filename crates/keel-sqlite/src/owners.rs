//! Which processes hold leases on a task hub file, so that the leases of a process that
//! died (`kill -9`, a crash, an OOM kill) are released as soon as another one notices,
//! instead of when they run out.
//!
//! Every open store is an *owner*: a random id, and a file of that name in the
//! directory `<database>-owners` beside the database, which the store keeps locked
//! (`flock`, exclusive) for as long as it is open. The kernel drops the lock when the
//! process dies, however it dies. Every lease the store takes (an instance, an activity
//! item) is stamped with its owner id (`lease_owner`). A store looks for owners whose
//! file it can lock, when it opens and then with every checkpoint (twice a second):
//! each of them is dead, so the leases it holds are released as if they had run out
//! (the instance unlocked, the item visible again; the delivery still counts toward
//! poison), and its file is deleted.
//!
//! The file system must be local (as SQLite itself needs for WAL mode). Where the
//! directory cannot be made, nothing is stamped and leases run out as usual.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{params, Connection};

/// This store's registration as an owner: its id and its locked file.
pub(crate) struct Owner {
    id: Arc<str>,
    path: PathBuf,
    _file: File,
}

impl Owner {
    /// Registers a new owner for the database at `database`; `None` if its directory
    /// cannot be used.
    pub(crate) fn register(database: &Path) -> Option<Owner> {
        let directory = directory_of(database);
        std::fs::create_dir_all(&directory).ok()?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        // Locked under a name no sweep looks at, then put in place: a sweep never sees
        // the file unlocked.
        let fresh = directory.join(format!("{id}.new"));
        let file = OpenOptions::new().create_new(true).write(true).open(&fresh).ok()?;
        let path = directory.join(&id);
        if !try_lock(&file) || std::fs::rename(&fresh, &path).is_err() {
            let _ = std::fs::remove_file(&fresh);
            return None;
        }
        Some(Owner { id: Arc::from(id), path, _file: file })
    }

    pub(crate) fn id(&self) -> Arc<str> {
        self.id.clone()
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        // Closed cleanly: whatever leases are left run out as usual.
        let _ = std::fs::remove_file(&self.path);
    }
}

fn directory_of(database: &Path) -> PathBuf {
    let mut name = database.file_name().map(|name| name.to_os_string()).unwrap_or_default();
    name.push("-owners");
    database.with_file_name(name)
}

/// Takes an exclusive lock on `file` without waiting; false if another open file
/// holds one.
fn try_lock(file: &File) -> bool {
    // SAFETY: flock only reads the descriptor, which `file` keeps open.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Releases the leases of every owner of `database` that died, on `connection`, and
/// forgets them; returns how many instances and activity items were released.
pub(crate) fn release_dead(database: &Path, connection: &Connection) -> (usize, usize) {
    let Ok(entries) = std::fs::read_dir(directory_of(database)) else { return (0, 0) };
    let mut released = (0, 0);
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(id) = path.file_name().and_then(|name| name.to_str()).map(str::to_owned) else { continue };
        if id.contains('.') {
            continue; // being registered
        }
        let Ok(file) = OpenOptions::new().write(true).open(&path) else { continue };
        // Locked: its process lives (this process's own owners included).
        if !try_lock(&file) {
            continue;
        }
        match release_leases(connection, &id) {
            Ok((instances, activities)) => {
                released.0 += instances;
                released.1 += activities;
                let _ = std::fs::remove_file(&path);
            }
            // Busy: tried again next time, with the file still there.
            Err(_) => continue,
        }
    }
    released
}

/// Releases the leases `owner` holds, in one transaction. A released activity item is
/// visible at once whatever the clock (`visible_at` 0), ahead of the items waiting.
fn release_leases(connection: &Connection, owner: &str) -> rusqlite::Result<(usize, usize)> {
    let transaction = connection.unchecked_transaction()?;
    let instances = transaction.execute(
        "UPDATE instances SET lock_token = NULL, locked_until = NULL \
         WHERE lease_owner = ?1 AND lock_token IS NOT NULL",
        params![owner],
    )?;
    let activities = transaction.execute(
        "UPDATE activities SET lock_token = NULL, visible_at = 0 WHERE lease_owner = ?1 AND lock_token IS NOT NULL",
        params![owner],
    )?;
    transaction.commit()?;
    Ok((instances, activities))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_owner_is_locked_and_a_closed_one_is_gone() {
        let directory = tempfile::tempdir().expect("tempdir");
        let database = directory.path().join("hub.db");
        let owner = Owner::register(&database).expect("an owner");
        let file = OpenOptions::new().write(true).open(directory_of(&database).join(&*owner.id())).expect("its file");
        assert!(!try_lock(&file), "the owner's file is locked while it is open");
        drop(owner);
        assert_eq!(std::fs::read_dir(directory_of(&database)).expect("the directory").count(), 0);
    }
}
