//! What can go wrong in a gRPC call, and the one place where that becomes a gRPC
//! status code ([`From<Error> for tonic::Status`]).

use keel::ClientError;

/// Why a request failed (or why the server could not run).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Store(#[from] keel_store::Error),
    /// A request field is missing, malformed or out of range.
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The instance is not in a state that allows the operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A completion or abandon names a work item this server did not hand out, or one
    /// that was already settled (completed, abandoned, or given back after its stream
    /// dropped).
    #[error("unknown or stale completion token '{0}'")]
    UnknownToken(String),
    #[error("this server requires an API key: send the header 'authorization: Bearer <key>'")]
    Unauthenticated,
    #[error("the server is shutting down")]
    ShuttingDown,
}

impl From<Error> for tonic::Status {
    /// The only mapping from Keel's errors to gRPC status codes.
    fn from(error: Error) -> tonic::Status {
        use tonic::Code;
        let code = match &error {
            Error::Client(client) => match client {
                ClientError::NotFound(_) => Code::NotFound,
                ClientError::AlreadyExists { .. } => Code::AlreadyExists,
                ClientError::InvalidState { .. } => Code::FailedPrecondition,
                ClientError::UnknownOrchestrator(_) | ClientError::UnknownEntity(_) | ClientError::Invalid(_) => {
                    Code::InvalidArgument
                }
                ClientError::Timeout { .. } => Code::DeadlineExceeded,
                ClientError::Store(store) => store_code(store),
            },
            Error::Store(store) => store_code(store),
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) | Error::UnknownToken(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Unauthenticated => Code::Unauthenticated,
            Error::ShuttingDown => Code::Unavailable,
        };
        if code == Code::Internal {
            tracing::error!(%error, "gRPC request failed");
        }
        tonic::Status::new(code, error.to_string())
    }
}

fn store_code(error: &keel_store::Error) -> tonic::Code {
    use keel_store::Error as Store;
    match error {
        Store::NotFound(_) => tonic::Code::NotFound,
        Store::AlreadyExists { .. } => tonic::Code::AlreadyExists,
        Store::InvalidState { .. } => tonic::Code::FailedPrecondition,
        Store::LeaseLost => tonic::Code::Aborted,
        Store::Invalid(_) => tonic::Code::InvalidArgument,
        Store::Backend { retryable: true, .. } => tonic::Code::Unavailable,
        Store::Backend { retryable: false, .. } => tonic::Code::Internal,
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use keel::RuntimeStatus;

    #[test]
    fn errors_map_to_the_codes_the_sdks_expect() {
        let code = |error: Error| tonic::Status::from(error).code();
        assert_eq!(code(Error::Client(ClientError::NotFound("x".into()))), tonic::Code::NotFound);
        assert_eq!(
            code(Error::Client(ClientError::InvalidState {
                instance_id: "x".into(),
                status: RuntimeStatus::Running,
                action: "rewinding",
            })),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(
            code(Error::Client(ClientError::Timeout {
                instance_id: "x".into(),
                what: "complete",
                timeout: std::time::Duration::from_secs(1)
            })),
            tonic::Code::DeadlineExceeded
        );
        assert_eq!(code(Error::Store(keel_store::Error::LeaseLost)), tonic::Code::Aborted);
        assert_eq!(code(Error::UnknownToken("t".into())), tonic::Code::NotFound);
        assert_eq!(code(Error::Unauthenticated), tonic::Code::Unauthenticated);
        assert_eq!(code(Error::ShuttingDown), tonic::Code::Unavailable);
        assert_eq!(code(Error::InvalidArgument("bad".into())), tonic::Code::InvalidArgument);
    }
}
