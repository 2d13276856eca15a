//! The error type of the store's internals, and how PostgreSQL errors map to
//! [`keel_store::Error`].
//!
//! Code that runs against the database returns [`Failure`], so that `?` works on both
//! driver calls and contract errors. A [`Failure::Contract`] error (a lost lease, an
//! instance that already exists) is an answer; a [`Failure::Postgres`] error means the
//! statement or the connection failed, and the transaction cannot go on.

use std::error::Error as _;

use keel_store::Error;
use tokio_postgres::error::SqlState;

/// Why an operation against the database did not succeed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// An outcome the [`keel_store::Store`] contract defines (lease lost, not found, …).
    Contract(Error),
    /// The database or the connection to it failed.
    Postgres(tokio_postgres::Error),
}

impl Failure {
    /// Data in the task hub that this code cannot decode.
    pub(crate) fn corrupt(what: impl std::fmt::Display) -> Failure {
        Failure::Contract(keel_store::stored::corrupt(what))
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(error: tokio_postgres::Error) -> Failure {
        Failure::Postgres(error)
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
            Failure::Postgres(error) => backend_error(&error),
        }
    }
}

/// Maps a driver error to [`Error::Backend`]. Lost or refused connections, a server
/// shutting down or starting, deadlocks and serialization failures are retryable: the
/// same operation can succeed on a new connection or in a new transaction. So are
/// foreign key violations: the store only writes rows that reference an instance it
/// found or created, so a violation means that a concurrent transaction deleted that
/// instance meanwhile (an empty entity removed under a message to it, which a new
/// attempt creates again).
pub(crate) fn backend_error(error: &tokio_postgres::Error) -> Error {
    let message = match error.as_db_error() {
        Some(db) => format!("postgres: {} ({}): {}", db.severity(), db.code().code(), db.message()),
        None => match error.source() {
            Some(source) => format!("postgres: {error}: {source}"),
            None => format!("postgres: {error}"),
        },
    };
    Error::Backend { message, retryable: is_retryable(error) }
}

fn is_retryable(error: &tokio_postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    if let Some(code) = error.code() {
        return is_retryable_state(code);
    }
    // No answer from the server: the connection broke, or could not be made.
    error.source().is_some_and(|source| source.is::<std::io::Error>())
}

fn is_retryable_state(code: &SqlState) -> bool {
    // Class 08: connection exceptions.
    code.code().starts_with("08")
        || [
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::LOCK_NOT_AVAILABLE,
            SqlState::QUERY_CANCELED,
            SqlState::FOREIGN_KEY_VIOLATION,
        ]
        .contains(code)
}

/// A retryable error that did not come from the driver (a pool that is exhausted, a
/// connection that took too long).
pub(crate) fn unavailable(message: impl Into<String>) -> Error {
    Error::Backend { message: message.into(), retryable: true }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_and_concurrency_states_are_retryable() {
        for state in [
            SqlState::CONNECTION_FAILURE,
            SqlState::CONNECTION_EXCEPTION,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::FOREIGN_KEY_VIOLATION,
        ] {
            assert!(is_retryable_state(&state), "{state:?}");
        }
        for state in [SqlState::UNIQUE_VIOLATION, SqlState::SYNTAX_ERROR, SqlState::UNDEFINED_TABLE] {
            assert!(!is_retryable_state(&state), "{state:?}");
        }
    }
}
