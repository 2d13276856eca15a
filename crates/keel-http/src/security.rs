//! The API key check: when the host has a key, a request must carry it in the
//! `x-functions-key` header or the `code` query parameter, as Azure Functions does.
//! And the browser checks: a request's `Host` must name the host (its bound address,
//! `localhost` or a configured name: no DNS rebinding), and a state-changing request
//! that carries an `Origin` must come from the host's own origin (no cross-site writes).

use std::net::SocketAddr;

use axum::extract::Request;
use axum::http::{header, Method, StatusCode};
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

/// What the host knows about the connection a request came on (a request extension
/// set by the host's accept loop).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Connection {
    /// The local address of the connection: the address the client reached.
    pub local: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
}

/// A refusal with the JSON body of [`ApiError`]'s shape.
fn refuse(status: StatusCode, kind: &str, message: String) -> Response {
    tracing::info!(status = status.as_u16(), error = %message, "request refused");
    let body = serde_json::json!({
        "error": kind,
        "message": message,
        "Message": message,
        "ExceptionMessage": message,
        "ExceptionType": kind,
    });
    (status, axum::Json(body)).into_response()
}

/// Middleware: refuses a `Host` that does not name this host (421) and a
/// state-changing request whose `Origin` is not this host's own origin (403).
/// Requests without `Origin` (curl, SDKs, the Durable Functions clients) are not
/// browsers' cross-site requests and pass the origin check.
pub(crate) async fn check_host_and_origin(request: Request, next: Next) -> Response {
    let allowed: &[String] = request
        .extensions()
        .get::<HostContext>()
        .map(|context| context.settings.allowed_hosts.as_slice())
        .unwrap_or(&[]);
    let connection = request.extensions().get::<Connection>().copied();
    let host = request.headers().get(header::HOST).map(|value| value.to_str().unwrap_or(""));
    if let (Some(connection), Some(host)) = (connection, host) {
        if !host_is_accepted(host, connection, allowed) {
            return refuse(
                StatusCode::MISDIRECTED_REQUEST,
                "MisdirectedRequest",
                format!(
                    "the Host header {host:?} does not name this host: use its address, localhost, or a name given with --allowed-host"
                ),
            );
        }
    }
    let state_changing = matches!(*request.method(), Method::POST | Method::PUT | Method::PATCH | Method::DELETE);
    if state_changing {
        if let Some(origin) = request.headers().get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            let scheme = if connection.is_some_and(|connection| connection.tls) { "https" } else { "http" };
            let same = host.is_some_and(|host| origin.eq_ignore_ascii_case(&format!("{scheme}://{host}")));
            if !same {
                return refuse(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    format!("cross-origin request refused: Origin {origin:?} is not this host's own origin"),
                );
            }
        }
    }
    next.run(request).await
}

/// Whether `host` (a `Host` header: name or address, and port) names this host: its
/// port is the connection's and its name is `localhost`, a loopback address, the
/// address the connection reached, or one of `allowed` (a configured name matches
/// with the host's port, or exactly as configured, port included).
fn host_is_accepted(host: &str, connection: Connection, allowed: &[String]) -> bool {
    let host = host.trim().to_ascii_lowercase();
    if allowed.iter().any(|name| name.contains(':') && !name.starts_with('[') && name.eq_ignore_ascii_case(&host)) {
        return true; // a configured name:port, e.g. behind a proxy
    }
    let Ok(authority) = host.parse::<axum::http::uri::Authority>() else { return false };
    let default_port = if connection.tls { 443 } else { 80 };
    if authority.port_u16().unwrap_or(default_port) != connection.local.port() || authority.as_str().contains('@') {
        return false;
    }
    let name = authority.host();
    let local = match connection.local.ip() {
        std::net::IpAddr::V4(ip) => ip.to_string(),
        std::net::IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(ip) => ip.to_string(),
            None => format!("[{ip}]"),
        },
    };
    name == "localhost"
        || name == "127.0.0.1"
        || name == "[::1]"
        || name == local
        || allowed.iter().any(|allowed| allowed.eq_ignore_ascii_case(name))
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
    fn only_hosts_that_name_this_host_are_accepted() {
        let loopback = Connection { local: "127.0.0.1:7071".parse().unwrap(), tls: false };
        let allowed = ["keel.internal".to_string(), "proxy.example:443".to_string()];
        for host in ["127.0.0.1:7071", "localhost:7071", "LOCALHOST:7071", "[::1]:7071", "keel.internal:7071"] {
            assert!(host_is_accepted(host, loopback, &allowed), "{host}");
        }
        assert!(host_is_accepted("proxy.example:443", loopback, &allowed));
        for host in ["evil.example", "evil.example:7071", "localhost:7072", "127.0.0.1", "", "a@localhost:7071"] {
            assert!(!host_is_accepted(host, loopback, &allowed), "{host}");
        }
        let lan = Connection { local: "192.168.1.5:7071".parse().unwrap(), tls: false };
        assert!(host_is_accepted("192.168.1.5:7071", lan, &[]));
        assert!(!host_is_accepted("192.168.1.6:7071", lan, &[]));
    }

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
