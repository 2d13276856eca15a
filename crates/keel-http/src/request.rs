//! Reading requests: query parameters (names matched case-insensitively, values
//! repeated or comma-separated), the body under the host's size limit, JSON payloads,
//! times, booleans and durations; and the per-request log span.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use keel::{RuntimeStatus, Timestamp};
use tracing::Instrument;

use crate::error::{ApiError, ApiResult};
use crate::host::BodyTimeout;
use crate::trigger::MAX_WAIT;
use crate::HostContext;

/// Path parameters. A path that does not decode (bad percent-encoding) is answered like
/// every other bad request: 400 with a JSON error body.
pub(crate) struct PathParams<T>(pub(crate) T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for PathParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<PathParams<T>> {
        let axum::extract::Path(value) = axum::extract::Path::<T>::from_request_parts(parts, state).await?;
        Ok(PathParams(value))
    }
}

/// The query string as name/value pairs.
pub(crate) struct Params(Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<Params> {
        let Query(pairs) = Query::<Vec<(String, String)>>::from_request_parts(parts, state).await?;
        Ok(Params(pairs))
    }
}

impl Params {
    /// All values of a parameter, in order.
    fn values<'a, 'n>(&'a self, name: &'n str) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
        self.0.iter().filter(move |(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
    }

    /// The first non-empty value of a parameter.
    pub fn get<'a>(&'a self, name: &str) -> Option<&'a str> {
        self.values(name).map(str::trim).find(|value| !value.is_empty())
    }

    pub fn bool(&self, name: &str, default: bool) -> ApiResult<bool> {
        match self.get(name) {
            None => Ok(default),
            Some(value) if value.eq_ignore_ascii_case("true") => Ok(true),
            Some(value) if value.eq_ignore_ascii_case("false") => Ok(false),
            Some(value) => Err(ApiError::BadRequest(format!("'{name}' must be true or false, not '{value}'"))),
        }
    }

    /// The length of a wait: a number of seconds (fractions allowed) from 0 to
    /// [`MAX_WAIT`]; negative numbers, NaN, infinities and longer waits are refused.
    pub fn wait_seconds(&self, name: &str) -> ApiResult<Option<Duration>> {
        self.get(name)
            .map(|value| {
                value
                    .parse::<f64>()
                    .ok()
                    .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
                    .filter(|duration| *duration <= MAX_WAIT)
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "'{name}' must be a number of seconds from 0 to {}, not '{value}'",
                            MAX_WAIT.as_secs()
                        ))
                    })
            })
            .transpose()
    }

    pub fn count(&self, name: &str) -> ApiResult<Option<usize>> {
        self.get(name)
            .map(|value| {
                value
                    .parse::<usize>()
                    .map_err(|_| ApiError::BadRequest(format!("'{name}' must be a whole number, not '{value}'")))
            })
            .transpose()
    }

    /// An ISO 8601 time: with an offset, or UTC when it has none, or a date (midnight UTC).
    pub fn time(&self, name: &str) -> ApiResult<Option<Timestamp>> {
        self.get(name)
            .map(|value| {
                parse_time(value).ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "'{name}' must be an ISO 8601 time such as 2024-05-01T12:00:00Z, not '{value}'"
                    ))
                })
            })
            .transpose()
    }

    /// Runtime statuses, from repeated and/or comma-separated values.
    pub fn statuses(&self, name: &str) -> ApiResult<Vec<RuntimeStatus>> {
        let mut statuses = Vec::new();
        for value in self.values(name).flat_map(|value| value.split(',')).map(str::trim) {
            if value.is_empty() {
                continue;
            }
            let status = value.parse::<RuntimeStatus>().map_err(ApiError::BadRequest)?;
            if !statuses.contains(&status) {
                statuses.push(status);
            }
        }
        Ok(statuses)
    }
}

fn parse_time(value: &str) -> Option<Timestamp> {
    if let Ok(time) = DateTime::parse_from_rfc3339(value) {
        return Some(time.with_timezone(&Utc));
    }
    if let Ok(time) = NaiveDateTime::parse_from_str(value, "%Y-%m-%dT%H:%M:%S%.f") {
        return Some(time.and_utc());
    }
    NaiveDate::parse_from_str(value, "%Y-%m-%d").ok().map(|date| date.and_hms_opt(0, 0, 0).expect("midnight").and_utc())
}

/// The request body, refused with 413 when it is over the host's limit.
pub(crate) struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> ApiResult<Body> {
        let limit_bytes = request
            .extensions()
            .get::<HostContext>()
            .map(|context| context.settings.max_body_bytes)
            .unwrap_or(keel_core::limits::MAX_PAYLOAD_BYTES);
        let declared = request
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<usize>().ok());
        if declared.is_some_and(|length| length > limit_bytes) {
            return Err(ApiError::PayloadTooLarge { limit_bytes });
        }
        match axum::body::to_bytes(request.into_body(), limit_bytes).await {
            Ok(bytes) => Ok(Body(bytes)),
            Err(error) => {
                if cause::<http_body_util::LengthLimitError>(&error).is_some() {
                    Err(ApiError::PayloadTooLarge { limit_bytes })
                } else if let Some(timeout) = cause::<BodyTimeout>(&error) {
                    Err(ApiError::RequestTimeout { timeout_ms: timeout.0.as_millis() as u64 })
                } else {
                    Err(ApiError::BadRequest(format!("the request body could not be read: {error}")))
                }
            }
        }
    }
}

/// The first error of type `E` in `error`'s chain of sources, itself included.
fn cause<'a, E: std::error::Error + 'static>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a E> {
    std::iter::successors(Some(error), |error| error.source()).find_map(|error| error.downcast_ref::<E>())
}

impl Body {
    /// The body as JSON text: `None` when empty, 400 when it is not JSON or nests
    /// deeper than [`keel_core::limits::MAX_JSON_DEPTH`].
    pub fn json_text(&self, what: &str) -> ApiResult<Option<String>> {
        let text = std::str::from_utf8(&self.0)
            .map_err(|_| ApiError::BadRequest(format!("the {what} is not UTF-8 text")))?
            .trim();
        if text.is_empty() {
            return Ok(None);
        }
        keel_core::limits::check_json_depth(&format!("the {what}"), text).map_err(ApiError::BadRequest)?;
        serde_json::from_str::<serde::de::IgnoredAny>(text)
            .map_err(|error| ApiError::BadRequest(format!("the {what} is not valid JSON: {error}")))?;
        Ok(Some(text.to_string()))
    }
}

/// True when the request says its body is JSON (`Content-Type: application/json`,
/// parameters such as `charset` allowed).
pub(crate) fn has_json_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media_type| media_type.trim().eq_ignore_ascii_case("application/json"))
}

/// Wraps every request in a span (method, path, and the instance id and function name
/// once a handler knows them) and logs its outcome.
pub(crate) async fn log_request(request: Request, next: Next) -> Response {
    let span = tracing::info_span!(
        "http",
        method = %request.method(),
        path = %request.uri().path(),
        instance_id = tracing::field::Empty,
        function = tracing::field::Empty,
    );
    let started = Instant::now();
    // Reads that succeed are routine (the dashboard polls); they log at debug level.
    let routine = request.method() == axum::http::Method::GET;
    async move {
        let response = next.run(request).await;
        let status = response.status().as_u16();
        let elapsed_ms = started.elapsed().as_millis() as u64;
        if routine && response.status().is_success() {
            tracing::debug!(status, elapsed_ms, "handled");
        } else {
            tracing::info!(status, elapsed_ms, "handled");
        }
        response
    }
    .instrument(span)
    .await
}

/// Records the instance and function a request is about on its span.
pub(crate) fn record_instance(instance_id: &str, function: Option<&str>) {
    let span = tracing::Span::current();
    span.record("instance_id", instance_id);
    if let Some(function) = function {
        span.record("function", function);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Params {
        Params(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn statuses_may_be_repeated_and_comma_separated() {
        let params = params(&[("runtimeStatus", "Running,completed"), ("RUNTIMESTATUS", "Failed"), ("x", "y")]);
        assert_eq!(
            params.statuses("runtimeStatus").unwrap(),
            [RuntimeStatus::Running, RuntimeStatus::Completed, RuntimeStatus::Failed]
        );
        assert!(self::params(&[("runtimeStatus", "Sleeping")]).statuses("runtimeStatus").is_err());
    }

    #[test]
    fn times_booleans_and_seconds_parse_or_are_refused() {
        let params = params(&[
            ("a", "2024-05-01T12:00:00Z"),
            ("b", "2024-05-01T12:00:00"),
            ("c", "2024-05-01"),
            ("d", "yesterday"),
            ("flag", "TRUE"),
            ("t", "1.5"),
        ]);
        let noon = parse_time("2024-05-01T12:00:00+00:00").unwrap();
        assert_eq!(params.time("a").unwrap(), Some(noon));
        assert_eq!(params.time("b").unwrap(), Some(noon));
        assert_eq!(params.time("c").unwrap().unwrap().to_rfc3339(), "2024-05-01T00:00:00+00:00");
        assert!(params.time("d").is_err());
        assert!(params.bool("flag", false).unwrap());
        assert!(!params.bool("missing", false).unwrap());
        assert_eq!(params.wait_seconds("t").unwrap(), Some(Duration::from_millis(1500)));
        assert!(params.wait_seconds("flag").is_err());
    }

    #[test]
    fn waits_out_of_range_are_refused() {
        for value in ["1e19", "1e300", "-1", "-0.5", "NaN", "nan", "inf", "-inf", "infinity", "86400.001"] {
            let error = params(&[("timeout", value)]).wait_seconds("timeout").unwrap_err();
            assert!(error.to_string().contains("from 0 to 86400"), "{value}: {error}");
        }
        assert_eq!(params(&[("timeout", "86400")]).wait_seconds("timeout").unwrap(), Some(MAX_WAIT));
        assert_eq!(params(&[("timeout", "0")]).wait_seconds("timeout").unwrap(), Some(Duration::ZERO));
    }
}
