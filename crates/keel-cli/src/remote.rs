//! A small HTTP/1.1 client for talking to a running host: one connection per request,
//! plain HTTP (hosts listen on loopback or behind a proxy that terminates TLS).

use anyhow::{bail, Context};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Where the host is and the key to show it.
#[derive(Clone, Debug)]
pub struct Remote {
    /// `host:port`.
    authority: String,
    /// A path prefix from the URL (usually empty).
    prefix: String,
    api_key: Option<String>,
}

/// A response: status, headers and body.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON (`null` when empty).
    pub fn json(&self) -> anyhow::Result<Value> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "the host answered {} with a body that is not JSON: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Fails with the host's error message unless the status is one of `expected`.
    pub fn expect(self, expected: &[StatusCode]) -> anyhow::Result<Reply> {
        if expected.contains(&self.status) {
            return Ok(self);
        }
        let message = serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|body| body.get("message").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).trim().to_string());
        bail!("the host answered {}: {message}", self.status)
    }
}

impl Remote {
    /// A remote for `http://host:port[/prefix]`.
    pub fn new(url: &str, api_key: Option<String>) -> anyhow::Result<Remote> {
        let Some(rest) = url.strip_prefix("http://") else {
            bail!("the host URL must start with http:// (got '{url}')");
        };
        let (authority, prefix) = match rest.find('/') {
            Some(slash) => (&rest[..slash], rest[slash..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() {
            bail!("the host URL '{url}' names no host");
        }
        let authority = if authority.contains(':') { authority.to_string() } else { format!("{authority}:80") };
        Ok(Remote { authority, prefix: prefix.to_string(), api_key })
    }

    /// Sends a request; `path` starts with `/` and may carry a query string.
    pub async fn send(&self, method: Method, path: &str, json_body: Option<String>) -> anyhow::Result<Reply> {
        self.send_with_headers(method, path, json_body, &[]).await
    }

    /// Sends a request with extra headers.
    pub async fn send_with_headers(
        &self,
        method: Method,
        path: &str,
        json_body: Option<String>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Reply> {
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .with_context(|| format!("could not reach a keel host at {} (is `keel serve` running?)", self.authority))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection closed with an error");
            }
        });
        let mut request = Request::builder().method(method).uri(format!("{}{path}", self.prefix));
        request = request.header(HOST, HeaderValue::from_str(&self.authority)?);
        if let Some(key) = &self.api_key {
            request = request.header("x-functions-key", HeaderValue::from_str(key)?);
        }
        for (name, value) in headers {
            request = request.header(*name, HeaderValue::from_str(value)?);
        }
        let body = match json_body {
            Some(json) => {
                request = request.header(CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(json))
            }
            None => Full::new(Bytes::new()),
        };
        let response = sender.send_request(request.body(body)?).await.context("the request to the host failed")?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.context("reading the host's answer failed")?.to_bytes();
        Ok(Reply { status: parts.status, headers: parts.headers, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_split_into_authority_and_prefix() {
        let remote = Remote::new("http://127.0.0.1:7071", None).unwrap();
        assert_eq!((remote.authority.as_str(), remote.prefix.as_str()), ("127.0.0.1:7071", ""));
        let remote = Remote::new("http://example.test/keel/", None).unwrap();
        assert_eq!((remote.authority.as_str(), remote.prefix.as_str()), ("example.test:80", "/keel"));
        assert!(Remote::new("https://example.test", None).is_err());
    }
}
