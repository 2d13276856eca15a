//! The optional API key: when the server has one, every call must carry the header
//! `authorization: Bearer <key>` (the same key the HTTP API takes).

use crate::error::Error;

/// A tonic interceptor that checks the API key, if one is configured.
#[derive(Clone, Debug)]
pub(crate) struct ApiKey {
    expected: Option<String>,
}

impl ApiKey {
    pub(crate) fn new(key: Option<String>) -> ApiKey {
        ApiKey { expected: key.filter(|key| !key.is_empty()) }
    }

    fn check(&self, header: Option<&str>) -> Result<(), Error> {
        let Some(expected) = &self.expected else { return Ok(()) };
        let presented = header.and_then(|value| {
            let (scheme, token) = value.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
        match presented {
            Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => Ok(()),
            _ => Err(Error::Unauthenticated),
        }
    }
}

impl tonic::service::Interceptor for ApiKey {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let header = request.metadata().get("authorization").and_then(|value| value.to_str().ok());
        self.check(header)?;
        Ok(request)
    }
}

/// Compares without stopping at the first difference, so that timing tells nothing
/// about how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |difference, (x, y)| difference | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_required_only_when_configured() {
        assert!(ApiKey::new(None).check(None).is_ok());
        assert!(ApiKey::new(Some(String::new())).check(None).is_ok(), "an empty key means no key");
        let key = ApiKey::new(Some("s3cret".into()));
        assert!(key.check(Some("Bearer s3cret")).is_ok());
        assert!(key.check(Some("bearer  s3cret ")).is_ok());
        assert!(key.check(Some("Bearer s3cre")).is_err());
        assert!(key.check(Some("s3cret")).is_err());
        assert!(key.check(Some("Basic s3cret")).is_err());
        assert!(key.check(None).is_err());
    }
}
