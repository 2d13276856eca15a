//! The errors of the HTTP front end and the one place where they become status codes.
//!
//! Every handler returns [`ApiError`]; a bad query string (axum's rejection) converts
//! into it, and [`ApiError::into_response`] maps each variant to its status code and a
//! JSON body: Keel's `{"error": KIND, "message": TEXT}` and, beside them, the fields of
//! the error bodies the Durable Functions host sends (ASP.NET's `HttpError`):
//! `Message`, `ExceptionMessage` (the text, which `azure-functions-durable` reads when
//! a start is refused) and `ExceptionType` (Keel's kind again; Keel has no exception
//! types).

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use keel::ClientError;

/// Why a request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A call on the runtime's client failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The request itself is wrong: malformed JSON, a bad parameter, a missing one.
    #[error("{0}")]
    BadRequest(String),
    /// What the request names does not exist (outside the client's own `NotFound`).
    #[error("{0}")]
    NotFound(String),
    /// The request body is larger than the host accepts.
    #[error("the request body is larger than the limit of {limit_bytes} bytes")]
    PayloadTooLarge {
        /// The host's body limit ([`crate::ApiSettings::max_body_bytes`]).
        limit_bytes: usize,
    },
    /// The request body did not arrive within the host's body timeout.
    #[error("the request body did not arrive within {timeout_ms} ms")]
    RequestTimeout {
        /// The host's body timeout ([`crate::HostConfig::body_timeout`]).
        timeout_ms: u64,
    },
    /// An API key is required and the request did not carry the right one.
    #[error("this host requires an API key: send it in the x-functions-key header or the code query parameter")]
    Unauthorized,
    /// Anything else; a bug or a store failure.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The short machine-readable name of the error, as the JSON body gives it.
    fn kind(&self) -> &'static str {
        match self {
            ApiError::Client(ClientError::NotFound(_)) | ApiError::NotFound(_) => "NotFound",
            ApiError::Client(ClientError::AlreadyExists { .. }) => "AlreadyExists",
            ApiError::Client(ClientError::InvalidState { .. }) => "InvalidState",
            ApiError::Client(ClientError::UnknownOrchestrator(_)) => "UnknownOrchestrator",
            ApiError::Client(ClientError::UnknownEntity(_)) => "UnknownEntity",
            ApiError::Client(ClientError::Invalid(_)) | ApiError::BadRequest(_) => "BadRequest",
            ApiError::Client(ClientError::Timeout { .. }) => "Timeout",
            ApiError::Client(ClientError::Store(_)) | ApiError::Internal(_) => "Internal",
            ApiError::PayloadTooLarge { .. } => "PayloadTooLarge",
            ApiError::RequestTimeout { .. } => "RequestTimeout",
            ApiError::Unauthorized => "Unauthorized",
        }
    }

    /// The status code of each error: the one mapping of the HTTP front end.
    fn status(&self) -> StatusCode {
        match self {
            // An unknown entity name is 404, as the Durable Functions docs have it.
            ApiError::Client(ClientError::NotFound(_) | ClientError::UnknownEntity(_)) | ApiError::NotFound(_) => {
                StatusCode::NOT_FOUND
            }
            ApiError::Client(ClientError::AlreadyExists { .. }) => StatusCode::CONFLICT,
            ApiError::Client(ClientError::InvalidState { .. }) => StatusCode::GONE,
            ApiError::Client(ClientError::UnknownOrchestrator(_) | ClientError::Invalid(_))
            | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Client(ClientError::Timeout { .. }) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Client(ClientError::Store(error)) if error.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Client(ClientError::Store(_)) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
        }
    }
}

impl ApiError {
    /// The JSON body of the error: Keel's fields and the Durable Functions host's.
    fn body(&self) -> serde_json::Value {
        let message = self.to_string();
        serde_json::json!({
            "error": self.kind(),
            "message": message,
            "Message": message,
            "ExceptionMessage": message,
            "ExceptionType": self.kind(),
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else {
            tracing::info!(status = status.as_u16(), error = %self, "request refused");
        }
        let mut response = (status, Json(self.body())).into_response();
        if status == StatusCode::REQUEST_TIMEOUT {
            // What is left of the body is not worth waiting for: the connection goes.
            response
                .headers_mut()
                .insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
        }
        response
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> ApiError {
        ApiError::BadRequest(format!("the query string could not be read: {}", rejection.body_text()))
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> ApiError {
        ApiError::BadRequest(format!("the path could not be read: {}", rejection.body_text()))
    }
}

/// The result type of handlers.
pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_has_keels_fields_and_the_functions_hosts() {
        let body = ApiError::Client(ClientError::UnknownOrchestrator("Nope".into())).body();
        let message = body["message"].as_str().unwrap();
        assert!(message.contains("Nope"), "{body}");
        assert_eq!(body["error"], "UnknownOrchestrator");
        assert_eq!(body["Message"], message);
        assert_eq!(body["ExceptionMessage"], message, "what azure-functions-durable reads on a refused start");
        assert_eq!(body["ExceptionType"], "UnknownOrchestrator");
    }
}
