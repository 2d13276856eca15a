//! The error type of the store's internals.
//!
//! Code that runs inside a transaction returns [`Failure`], so that `?` works on
//! both rusqlite calls and contract errors. The distinction matters in batches: a
//! [`Failure::Contract`] error (a lost lease, corrupt data of one instance) rolls back
//! only its own commit, while a [`Failure::Sqlite`] error aborts the whole transaction.

use keel_store::Error;
use rusqlite::ErrorCode;

/// Why an operation inside a transaction did not succeed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// An outcome the [`keel_store::Store`] contract defines (lease lost, not found, …).
    Contract(Error),
    /// The database itself failed; the transaction cannot go on.
    Sqlite(rusqlite::Error),
}

impl Failure {
    /// Data in the file that this code cannot decode.
    pub(crate) fn corrupt(what: impl std::fmt::Display) -> Failure {
        Failure::Contract(keel_store::stored::corrupt(what))
    }
}

impl From<rusqlite::Error> for Failure {
    fn from(error: rusqlite::Error) -> Failure {
        Failure::Sqlite(error)
    }
}

impl From<Error> for Failure {
    fn from(error: Error) -> Failure {
        Failure::Contract(error)
    }
}

impl From<Failure> for Error {
    fn from(failure: Failure) -> Error {
        match failure {
            Failure::Contract(error) => error,
            Failure::Sqlite(error) => backend_error(error),
        }
    }
}

/// Maps a SQLite error to [`Error::Backend`]; a busy or locked database is retryable.
pub(crate) fn backend_error(error: rusqlite::Error) -> Error {
    let retryable = matches!(error.sqlite_error_code(), Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked));
    Error::Backend { message: format!("sqlite: {error}"), retryable }
}
