//! HTTP triggers: the built-in starter `POST /api/orchestrators/{name}[/{instanceId}]`
//! (and `…/{name}/wait`), and what an app's own routes use to start orchestrations and
//! answer like Durable Functions does — [`DurableClient`],
//! [`create_check_status_response`] and
//! [`wait_for_completion_or_create_check_status_response`].
//!
//! Waits are checked before anything is written: a `timeout` or `pollingInterval` that
//! is not a number of seconds from 0 to [`MAX_WAIT`], or an interval longer than the
//! timeout, is refused with 400 and no instance is created (an app's route does the
//! same with [`check_wait`] before it starts anything). The starter also takes Keel's
//! `version` query parameter: the orchestration version the new instance runs.
//!
//! ```no_run
//! use axum::{extract::Request, response::Response, routing::post, Router};
//! use keel_http::DurableClient;
//!
//! async fn start_order(durable: DurableClient, request: Request) -> Result<Response, keel_http::ApiError> {
//!     let body = axum::body::to_bytes(request.into_body(), 1 << 20).await.unwrap_or_default();
//!     let input = String::from_utf8_lossy(&body).into_owned();
//!     let id = durable.client().start_raw("PlaceOrder", Some(input), Default::default()).await?;
//!     Ok(durable.create_check_status_response(&id))
//! }
//!
//! let routes: Router = Router::new().route("/api/orders", post(start_order));
//! ```

use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::header::{HeaderValue, HOST, LOCATION, RETRY_AFTER};
use axum::http::request::Parts;
use axum::http::{Extensions, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use keel::{Client, ClientError, InstanceStatus, RuntimeStatus, StartOptions};
use keel_core::limits::MAX_NAME_BYTES;

use crate::error::{ApiError, ApiResult};
use crate::payload::{payload_value, status_object, HttpManagementPayload, StatusView};
use crate::request::{record_instance, Body, Params, PathParams};
use crate::HostContext;

/// `Retry-After` of a check-status response, in seconds (as Durable Functions sends).
const CHECK_STATUS_RETRY_AFTER_SECONDS: u32 = 10;

/// How long the starter's `/wait` route waits by default, and how often it looks.
const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_WAIT_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// The longest wait a request may ask for (`timeout`, `pollingInterval`,
/// `retryInterval`): one day. Longer ones are refused with 400 before anything is
/// written.
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

/// Checks the wait of [`wait_for_completion_or_create_check_status_response`]: the
/// timeout at most [`MAX_WAIT`] and the retry interval not longer than the timeout.
/// An app's route calls it before it starts the instance it waits for, so that a bad
/// wait is refused (400) with nothing written.
///
/// ```
/// use std::time::Duration;
///
/// assert!(keel_http::check_wait(Duration::from_secs(10), Duration::from_secs(1)).is_ok());
/// assert!(keel_http::check_wait(Duration::from_secs(1), Duration::from_secs(5)).is_err());
/// assert!(keel_http::check_wait(Duration::from_secs(u64::MAX), Duration::ZERO).is_err());
/// ```
pub fn check_wait(timeout: Duration, retry_interval: Duration) -> ApiResult<()> {
    for (what, duration) in [("timeout", timeout), ("retry interval", retry_interval)] {
        if duration > MAX_WAIT {
            return Err(ApiError::BadRequest(format!(
                "the {what} ({}s) is longer than the limit of {}s",
                duration.as_secs_f64(),
                MAX_WAIT.as_secs()
            )));
        }
    }
    if retry_interval > timeout {
        return Err(ApiError::BadRequest(format!(
            "the retry interval ({}s) must not be longer than the timeout ({}s)",
            retry_interval.as_secs_f64(),
            timeout.as_secs_f64()
        )));
    }
    Ok(())
}

/// The parts of a request the helpers need: its headers (for the host name) and its
/// extensions (where the host keeps its client and settings).
pub trait RequestHead {
    /// The request's headers.
    fn headers(&self) -> &HeaderMap;
    /// The request's extensions.
    fn extensions(&self) -> &Extensions;
}

impl<B> RequestHead for axum::http::Request<B> {
    fn headers(&self) -> &HeaderMap {
        self.headers()
    }
    fn extensions(&self) -> &Extensions {
        self.extensions()
    }
}

impl RequestHead for Parts {
    fn headers(&self) -> &HeaderMap {
        &self.headers
    }
    fn extensions(&self) -> &Extensions {
        &self.extensions
    }
}

/// What a route of the app gets from the host: a client that knows the app's
/// orchestrators, and the URLs of the management API as the caller reached it.
/// Extract it in any handler served by the host.
#[derive(Clone)]
pub struct DurableClient {
    context: HostContext,
    base_url: String,
    trace: Option<keel_core::trace::TraceContext>,
}

impl std::fmt::Debug for DurableClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableClient").field("base_url", &self.base_url).finish_non_exhaustive()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for DurableClient {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> ApiResult<DurableClient> {
        DurableClient::from_head(parts)
    }
}

impl DurableClient {
    /// The durable client of a request served by the host.
    pub fn from_head(request: &impl RequestHead) -> ApiResult<DurableClient> {
        let context = request.extensions().get::<HostContext>().cloned().ok_or_else(|| {
            ApiError::Internal("this route is not served by a keel host (no durable client attached)".into())
        })?;
        let headers = request.headers();
        let host = headers.get(HOST).and_then(|value| value.to_str().ok()).unwrap_or("localhost");
        // W3C trace context: an invalid `traceparent` is ignored, as the spec says.
        let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
        let trace = header("traceparent")
            .and_then(|parent| keel_core::trace::TraceContext::parse(parent, header("tracestate")).ok());
        Ok(DurableClient { context, base_url: format!("http://{host}"), trace })
    }

    /// The W3C trace context the request carried (`traceparent`, `tracestate`), if
    /// valid: give it to [`StartOptions::trace`] so the instance's spans join the
    /// caller's trace (the built-in start routes do).
    pub fn trace_context(&self) -> Option<&keel_core::trace::TraceContext> {
        self.trace.as_ref()
    }

    /// `http://` and the host the request was sent to.
    pub(crate) fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The client: start, query and manage instances.
    pub fn client(&self) -> &Client {
        &self.context.client
    }

    /// The management URLs of an instance (with `rewindPostUri`).
    pub fn create_http_management_payload(&self, instance_id: &str) -> HttpManagementPayload {
        let settings = &self.context.settings;
        HttpManagementPayload::new(&self.base_url, instance_id, &settings.task_hub, settings.api_key.as_deref())
    }

    /// 202 with the management URLs of the instance, `Location` = its status URL and
    /// `Retry-After: 10`.
    pub fn create_check_status_response(&self, instance_id: &str) -> Response {
        let payload =
            HttpManagementPayload { rewind_post_uri: None, ..self.create_http_management_payload(instance_id) };
        let mut response = (StatusCode::ACCEPTED, Json(&payload)).into_response();
        let headers = response.headers_mut();
        if let Ok(location) = HeaderValue::from_str(&payload.status_query_get_uri) {
            headers.insert(LOCATION, location);
        }
        headers.insert(RETRY_AFTER, HeaderValue::from(CHECK_STATUS_RETRY_AFTER_SECONDS));
        response
    }

    /// Waits up to `timeout` for the instance to finish: 200 with its output when it
    /// completed, the status response when it failed or was terminated, else the
    /// check-status response (202). The wait must pass [`check_wait`] (else 400; check
    /// it before starting the instance to write nothing); the wait itself is woken by
    /// the task hub, not by polling.
    pub async fn wait_for_completion_or_create_check_status_response(
        &self,
        instance_id: &str,
        timeout: Duration,
        retry_interval: Duration,
    ) -> ApiResult<Response> {
        check_wait(timeout, retry_interval)?;
        match self.client().wait_for_completion(instance_id, timeout).await {
            Ok(status) => Ok(finished_response(&status)),
            Err(ClientError::Timeout { .. }) => Ok(self.create_check_status_response(instance_id)),
            Err(error) => Err(error.into()),
        }
    }
}

/// The answer for a finished instance: its output with 200 when it completed, else
/// its status object (200).
fn finished_response(status: &InstanceStatus) -> Response {
    if status.status == RuntimeStatus::Completed {
        (StatusCode::OK, Json(payload_value(status.output.as_deref()))).into_response()
    } else {
        (StatusCode::OK, Json(status_object(status, None, StatusView::default()))).into_response()
    }
}

/// [`DurableClient::create_check_status_response`] for the request an app's route serves.
pub fn create_check_status_response(request: &impl RequestHead, instance_id: &str) -> Response {
    match DurableClient::from_head(request) {
        Ok(durable) => durable.create_check_status_response(instance_id),
        Err(error) => error.into_response(),
    }
}

/// [`DurableClient::wait_for_completion_or_create_check_status_response`] for the
/// request an app's route serves.
pub async fn wait_for_completion_or_create_check_status_response(
    request: &impl RequestHead,
    instance_id: &str,
    timeout: Duration,
    retry_interval: Duration,
) -> Response {
    let waited = match DurableClient::from_head(request) {
        Ok(durable) => {
            durable.wait_for_completion_or_create_check_status_response(instance_id, timeout, retry_interval).await
        }
        Err(error) => Err(error),
    };
    waited.unwrap_or_else(IntoResponse::into_response)
}

/// Starts an orchestration for a start route: body = JSON input (optional), query
/// parameter `version` = the orchestration version (optional); with `wait` =
/// (timeout, retry interval), already checked, it waits for the outcome. Everything is
/// checked before the instance is written.
pub(crate) async fn start_orchestration(
    durable: &DurableClient,
    name: &str,
    instance_id: Option<String>,
    params: &Params,
    body: &Body,
    wait: Option<(Duration, Duration)>,
) -> ApiResult<Response> {
    let version = version_parameter(params)?;
    let input = body.json_text("orchestration input")?;
    if let Some(id) = &instance_id {
        record_instance(id, Some(name));
    }
    let options = StartOptions { instance_id, version, trace: durable.trace.clone(), ..StartOptions::default() };
    let client = durable.client();
    // A host with functions of its own refuses names it does not run. One with none
    // (`keel serve` without `--samples`) hands every orchestrator to the SDK workers and
    // cannot tell a name none of them hosts: it lets every name through, as it does for
    // entities, and the instance waits (Pending) for a worker that hosts it.
    let knows_the_app = !client.orchestrator_names().is_empty() || !client.entity_names().is_empty();
    let instance_id = match knows_the_app {
        true => client.start_raw(name, input, options).await?,
        false => Client::new(client.store().clone()).start_raw(name, input, options).await?,
    };
    record_instance(&instance_id, Some(name));
    tracing::info!(instance_id = %instance_id, function = name, "orchestration started");
    match wait {
        Some((timeout, retry_interval)) => {
            durable.wait_for_completion_or_create_check_status_response(&instance_id, timeout, retry_interval).await
        }
        None => Ok(durable.create_check_status_response(&instance_id)),
    }
}

/// The `version` query parameter (a Keel addition): the orchestration version a start
/// stamps on the new instance.
fn version_parameter(params: &Params) -> ApiResult<Option<String>> {
    let Some(version) = params.get("version") else { return Ok(None) };
    if version.len() > MAX_NAME_BYTES {
        return Err(ApiError::BadRequest(format!(
            "'version' is {} bytes long; the limit is {MAX_NAME_BYTES}",
            version.len()
        )));
    }
    if let Some(bad) = version.chars().find(|c| c.is_control()) {
        return Err(ApiError::BadRequest(format!("'version' contains the control character {bad:?}")));
    }
    Ok(Some(version.to_string()))
}

/// The built-in starter: `POST /api/orchestrators/{name}[/{instanceId}]` (optionally
/// waiting when `timeout` and `pollingInterval` are given) and
/// `POST /api/orchestrators/{name}/wait?timeout=&retryInterval=` (waits; 30 s and 1 s by
/// default); each takes `version`.
pub(crate) fn starter_routes() -> Router {
    Router::new()
        .route("/api/orchestrators/{name}", post(start_new))
        .route("/api/orchestrators/{name}/{instance_id}", post(start_with_id))
        .route("/api/orchestrators/{name}/wait", post(start_and_wait))
}

/// `timeout` and `pollingInterval`, when both are given, checked ([`check_wait`]);
/// either one is refused when it is not a number of seconds from 0 to [`MAX_WAIT`],
/// even without the other.
pub(crate) fn wait_parameters(params: &Params) -> ApiResult<Option<(Duration, Duration)>> {
    match (params.wait_seconds("timeout")?, params.wait_seconds("pollingInterval")?) {
        (Some(timeout), Some(interval)) => {
            check_wait(timeout, interval)?;
            Ok(Some((timeout, interval)))
        }
        _ => Ok(None),
    }
}

pub(crate) async fn start_new(
    durable: DurableClient,
    PathParams(name): PathParams<String>,
    params: Params,
    body: Body,
) -> ApiResult<Response> {
    let wait = wait_parameters(&params)?;
    start_orchestration(&durable, &name, None, &params, &body, wait).await
}

pub(crate) async fn start_with_id(
    durable: DurableClient,
    PathParams((name, instance_id)): PathParams<(String, String)>,
    params: Params,
    body: Body,
) -> ApiResult<Response> {
    let wait = wait_parameters(&params)?;
    start_orchestration(&durable, &name, Some(instance_id), &params, &body, wait).await
}

async fn start_and_wait(
    durable: DurableClient,
    PathParams(name): PathParams<String>,
    params: Params,
    body: Body,
) -> ApiResult<Response> {
    let timeout = params.wait_seconds("timeout")?.unwrap_or(DEFAULT_WAIT_TIMEOUT);
    let (retry_interval, polling_interval) =
        (params.wait_seconds("retryInterval")?, params.wait_seconds("pollingInterval")?);
    let retry_interval = retry_interval.or(polling_interval).unwrap_or(DEFAULT_WAIT_RETRY_INTERVAL.min(timeout));
    check_wait(timeout, retry_interval)?;
    start_orchestration(&durable, &name, None, &params, &body, Some((timeout, retry_interval))).await
}
