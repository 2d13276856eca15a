//! The API key check: when the host has a key, a request must carry it in the
//! `x-functions-key` header or the `code` query parameter, as Azure Functions does.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::HostContext;

/// The header that carries the key.
pub(crate) const KEY_HEADER: &str = "x-functions-key";

/// Middleware: lets a request through when no key is configured or it carries the key.
pub(crate) async fn require_api_key(request: Request, next: Next) -> Response {
    let expected = request.extensions().get::<HostContext>().and_then(|context| context.settings.api_key.clone());
    let Some(expected) = expected else {
        return next.run(request).await;
    };
    if presented_key(&request).is_some_and(|key| constant_time_eq(key.as_bytes(), expected.as_bytes())) {
        next.run(request).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

/// The key a request carries: the header first, else the `code` query parameter.
fn presented_key(request: &Request) -> Option<String> {
    if let Some(header) = request.headers().get(KEY_HEADER).and_then(|value| value.to_str().ok()) {
        return Some(header.to_string());
    }
    let axum::extract::Query(pairs) =
        axum::extract::Query::<Vec<(String, String)>>::try_from_uri(request.uri()).ok()?;
    pairs.into_iter().find(|(name, _)| name == "code").map(|(_, value)| value)
}

/// Compares without stopping at the first difference, so that timing tells nothing
/// about how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |difference, (x, y)| difference | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }

    #[test]
    fn the_code_parameter_is_decoded() {
        let request = Request::builder().uri("/x?a=1&code=k%261").body(axum::body::Body::empty()).unwrap();
        assert_eq!(presented_key(&request).as_deref(), Some("k&1"));
    }
}
