//! The Durable Functions management API under `/runtime/webhooks/durabletask`:
//! start, instance status, list, raise event, terminate, suspend, resume, rewind,
//! restart, purge one and purge by filter — with Durable Functions' field names,
//! status codes and `Location` / `Retry-After` / `x-ms-continuation-token` headers.
//!
//! The same routes answer under `/durabletask` ([`RPC_BASE_PATH`]), the path of the
//! local RPC endpoint a Functions host hands its out-of-process clients as
//! `rpcBaseUrl`; the collection routes answer with a trailing slash too
//! (`/instances/`), as the Functions host's do. Lists show each instance's `input`
//! unless `showInput=false`, and their `x-ms-continuation-token` is opaque (the
//! private module `continuation` makes and reads it).
//!
//! Keel adds two routes: `GET …/orchestrators` lists the orchestrator names the host
//! runs (the dashboard's start form uses it), and `GET …/instances/{id}/history`
//! exports the history of an instance's current execution as a
//! [`keel::testing::HistoryExport`] (what `keel history ID --json` prints and `keel
//! verify --history` replays). Status objects carry the instance's `version`, and the
//! start routes take a `version` query parameter. The entity routes live in
//! [`crate::entities`], the hub overview (`GET …/overview`) in [`crate::overview`].

use axum::extract::OriginalUri;
use axum::http::header::{HeaderValue, LOCATION, RETRY_AFTER};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use keel::testing::HistoryExport;
use keel::{ClientError, InstanceQuery, PurgeFilter, RuntimeStatus};
use serde_json::json;

use crate::continuation;
pub use crate::continuation::CONTINUATION_HEADER;
use crate::error::{ApiError, ApiResult};
use crate::payload::{status_object, StatusView};
use crate::request::{has_json_content_type, record_instance, Body, Params, PathParams};
use crate::trigger::{start_new, start_with_id, wait_parameters, DurableClient};

/// The alias of [`crate::MANAGEMENT_BASE_PATH`]: the path of a Functions host's local
/// RPC endpoint (`http://127.0.0.1:17071/durabletask/`), which it hands to
/// out-of-process clients as `rpcBaseUrl`. A client binding made for a Functions host
/// works on Keel with only its host and port changed.
pub const RPC_BASE_PATH: &str = "/durabletask";

/// `Retry-After` of the status of an instance that is still running, in seconds.
const STATUS_RETRY_AFTER_SECONDS: u32 = 5;

/// The largest page of an instance or entity list (`top`).
pub(crate) const MAX_PAGE_SIZE: usize = 1000;

/// The routes of the management API (entities included), relative to its base path:
/// [`crate::router`] serves them under [`crate::MANAGEMENT_BASE_PATH`] and
/// [`RPC_BASE_PATH`].
pub(crate) fn routes() -> Router {
    Router::new()
        .route("/orchestrators", get(list_orchestrators))
        .route("/orchestrators/{name}", post(start_new).fallback(no_such_route))
        .route("/orchestrators/{name}/{instance_id}", post(start_with_id).fallback(no_such_route))
        .route("/instances", get(list_instances).delete(purge_instances))
        .route("/instances/", get(list_instances).delete(purge_instances))
        .route("/instances/{instance_id}", get(get_status).delete(purge_instance))
        .route("/instances/{instance_id}/history", get(export_history))
        .route("/instances/{instance_id}/raiseEvent/{event_name}", post(raise_event))
        .route("/instances/{instance_id}/terminate", post(terminate))
        .route("/instances/{instance_id}/suspend", post(suspend))
        .route("/instances/{instance_id}/resume", post(resume))
        .route("/instances/{instance_id}/rewind", post(rewind))
        .route("/instances/{instance_id}/restart", post(restart))
        .merge(crate::entities::routes())
}

/// `GET /metrics`: the worker's metrics ([`keel::metrics`]) in the OpenMetrics text
/// format, which Prometheus scrapes, with the task hub's gauges (backlog, instances by
/// status) read from the store for the scrape (left out when it cannot be read);
/// behind the API key like the management API.
pub(crate) async fn metrics(axum::Extension(context): axum::Extension<crate::HostContext>) -> Response {
    let Some(metrics) = context.client.metrics() else {
        return ApiError::NotFound("this host has no worker, so no metrics".to_string()).into_response();
    };
    let hub = match context.client.store().hub_stats(chrono::Utc::now()).await {
        Ok(hub) => Some(hub),
        Err(error) => {
            tracing::warn!(%error, "reading the task hub's numbers for /metrics failed; its gauges are left out");
            None
        }
    };
    ([(axum::http::header::CONTENT_TYPE, keel::metrics::CONTENT_TYPE)], metrics.encode(hub.as_ref())).into_response()
}

async fn no_such_route() -> ApiError {
    ApiError::NotFound("no such route (start routes take POST only)".into())
}

async fn list_orchestrators(durable: DurableClient) -> Json<Vec<String>> {
    Json(durable.client().orchestrator_names())
}

/// `GET /instances/{id}`: 200 for finished instances (500 for failed ones with
/// `returnInternalServerErrorOnFailure=true`), 202 with `Location` and `Retry-After`
/// while it runs, 404 for unknown ids.
async fn get_status(
    durable: DurableClient,
    PathParams(instance_id): PathParams<String>,
    params: Params,
    OriginalUri(uri): OriginalUri,
) -> ApiResult<Response> {
    record_instance(&instance_id, None);
    let view = StatusView {
        show_input: params.bool("showInput", true)?,
        show_history: params.bool("showHistory", false)?,
        show_history_output: params.bool("showHistoryOutput", false)?,
    };
    let internal_error_on_failure = params.bool("returnInternalServerErrorOnFailure", false)?;
    let client = durable.client();
    let status = client.get_status(&instance_id).await?.ok_or_else(|| ClientError::NotFound(instance_id.clone()))?;
    record_instance(&instance_id, Some(&status.name));
    let history = match view.show_history && status.status != RuntimeStatus::Pending {
        true => client.get_history(&instance_id).await?,
        false => Vec::new(),
    };
    let body = status_object(&status, Some(&history), view);
    let code = match status.status {
        RuntimeStatus::Failed if internal_error_on_failure => StatusCode::INTERNAL_SERVER_ERROR,
        RuntimeStatus::Running | RuntimeStatus::Pending | RuntimeStatus::ContinuedAsNew | RuntimeStatus::Suspended => {
            StatusCode::ACCEPTED
        }
        RuntimeStatus::Completed | RuntimeStatus::Failed | RuntimeStatus::Terminated | RuntimeStatus::Canceled => {
            StatusCode::OK
        }
    };
    let mut response = (code, Json(body)).into_response();
    if code == StatusCode::ACCEPTED {
        let headers = response.headers_mut();
        if let Ok(location) = HeaderValue::from_str(&format!("{}{uri}", durable.base_url())) {
            headers.insert(LOCATION, location);
        }
        headers.insert(RETRY_AFTER, HeaderValue::from(STATUS_RETRY_AFTER_SECONDS));
    }
    Ok(response)
}

/// How often [`export_history`] reads an instance that changes under it again.
const EXPORT_ATTEMPTS: usize = 5;

/// `GET /instances/{id}/history` (a Keel addition): 200 with the
/// [`HistoryExport`] of the instance's current execution, 404 for unknown ids. The
/// instance's row is read before and after its history; when an episode committed in
/// between, it reads again, so that the status and the events belong together.
async fn export_history(durable: DurableClient, PathParams(instance_id): PathParams<String>) -> ApiResult<Response> {
    record_instance(&instance_id, None);
    let client = durable.client();
    let not_found = || ClientError::NotFound(instance_id.clone());
    let mut before = client.get_status(&instance_id).await?.ok_or_else(not_found)?;
    record_instance(&instance_id, Some(&before.name));
    for attempt in 1..=EXPORT_ATTEMPTS {
        let events = client.get_history(&instance_id).await?;
        let after = client.get_status(&instance_id).await?.ok_or_else(not_found)?;
        // Nothing committed while the history was read: the row and the events match.
        // Else, on the last attempt, the same execution at both reads is enough: the
        // events are still that execution's (a prefix of what it has now).
        let settled = after == before || (attempt == EXPORT_ATTEMPTS && after.execution_id == before.execution_id);
        if settled {
            let export = HistoryExport {
                instance_id: before.instance_id,
                name: before.name,
                version: before.version,
                execution_id: before.execution_id,
                runtime_status: before.status,
                events,
            };
            return Ok(Json(export).into_response());
        }
        before = after;
    }
    let message = format!("instance '{instance_id}' kept changing while its history was read; try again");
    Err(ClientError::Store(keel::store::Error::Backend { message, retryable: true }).into())
}

/// `GET /instances`: one page of status objects (with inputs unless
/// `showInput=false`); the next page's token, when there may be one, in the
/// `x-ms-continuation-token` response header.
async fn list_instances(durable: DurableClient, params: Params, headers: HeaderMap) -> ApiResult<Response> {
    let query = InstanceQuery {
        statuses: params.statuses("runtimeStatus")?,
        instance_id_prefix: params.get("instanceIdPrefix").map(str::to_string),
        name_prefix: params.get("namePrefix").map(str::to_string),
        created_from: params.time("createdTimeFrom")?,
        created_to: params.time("createdTimeTo")?,
        page_size: params.count("top")?.unwrap_or(0).min(MAX_PAGE_SIZE),
        continuation: continuation::from_request(&headers, "an instance list")?,
    };
    let view = StatusView { show_input: params.bool("showInput", true)?, ..StatusView::default() };
    let page = durable.client().query(&query).await?;
    let instances: Vec<_> = page.instances.iter().map(|status| status_object(status, None, view)).collect();
    let mut response = Json(instances).into_response();
    continuation::add_to_response(&mut response, page.continuation.as_deref());
    Ok(response)
}

/// `DELETE /instances/{id}`: 200 `{"instancesDeleted":1}`; 404 when there is no
/// finished instance with that id (a running one is not purged, as in Durable
/// Functions where purging it deletes nothing).
async fn purge_instance(durable: DurableClient, PathParams(instance_id): PathParams<String>) -> ApiResult<Response> {
    record_instance(&instance_id, None);
    match durable.client().purge(&instance_id).await {
        Ok(true) => {
            tracing::info!(instance_id = %instance_id, "purged");
            Ok(Json(json!({ "instancesDeleted": 1 })).into_response())
        }
        Ok(false) => Err(ClientError::NotFound(instance_id).into()),
        Err(ClientError::InvalidState { instance_id, status, .. }) => Err(ApiError::NotFound(format!(
            "instance '{instance_id}' is {status}; only finished instances can be purged"
        ))),
        Err(error) => Err(error.into()),
    }
}

/// `DELETE /instances?createdTimeFrom=…[&createdTimeTo=…][&runtimeStatus=…]`:
/// 200 `{"instancesDeleted":N}`, 404 when nothing matched.
async fn purge_instances(durable: DurableClient, params: Params) -> ApiResult<Response> {
    let Some(created_from) = params.time("createdTimeFrom")? else {
        return Err(ApiError::BadRequest("Please provide value for 'createdTimeFrom' parameter.".into()));
    };
    let filter = PurgeFilter {
        created_from: Some(created_from),
        created_to: Some(params.time("createdTimeTo")?.unwrap_or_else(chrono::Utc::now)),
        statuses: params.statuses("runtimeStatus")?,
    };
    let deleted = durable.client().purge_where(&filter).await?;
    tracing::info!(deleted, "purged by filter");
    if deleted == 0 {
        return Err(ApiError::NotFound("no finished instances matched the filter".into()));
    }
    Ok(Json(json!({ "instancesDeleted": deleted })).into_response())
}

/// `POST /instances/{id}/raiseEvent/{name}`: JSON body with `Content-Type:
/// application/json`; 202, 400, 404, or 410 when the instance has finished.
async fn raise_event(
    durable: DurableClient,
    PathParams((instance_id, event_name)): PathParams<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<StatusCode> {
    record_instance(&instance_id, None);
    if !has_json_content_type(&headers) {
        return Err(ApiError::BadRequest(
            "raising an event needs a JSON body with Content-Type: application/json".into(),
        ));
    }
    let data = body.json_text("event data")?;
    durable.client().raise_event_raw(&instance_id, &event_name, data).await?;
    tracing::info!(instance_id = %instance_id, event = %event_name, "event raised");
    Ok(StatusCode::ACCEPTED)
}

async fn terminate(
    durable: DurableClient,
    PathParams(instance_id): PathParams<String>,
    params: Params,
) -> ApiResult<StatusCode> {
    record_instance(&instance_id, None);
    durable.client().terminate(&instance_id, params.get("reason")).await?;
    tracing::info!(instance_id = %instance_id, reason = params.get("reason"), "termination requested");
    Ok(StatusCode::ACCEPTED)
}

async fn suspend(
    durable: DurableClient,
    PathParams(instance_id): PathParams<String>,
    params: Params,
) -> ApiResult<StatusCode> {
    record_instance(&instance_id, None);
    durable.client().suspend(&instance_id, params.get("reason")).await?;
    tracing::info!(instance_id = %instance_id, reason = params.get("reason"), "suspension requested");
    Ok(StatusCode::ACCEPTED)
}

async fn resume(
    durable: DurableClient,
    PathParams(instance_id): PathParams<String>,
    params: Params,
) -> ApiResult<StatusCode> {
    record_instance(&instance_id, None);
    durable.client().resume(&instance_id, params.get("reason")).await?;
    tracing::info!(instance_id = %instance_id, reason = params.get("reason"), "resumption requested");
    Ok(StatusCode::ACCEPTED)
}

async fn rewind(
    durable: DurableClient,
    PathParams(instance_id): PathParams<String>,
    params: Params,
) -> ApiResult<StatusCode> {
    record_instance(&instance_id, None);
    durable.client().rewind(&instance_id, params.get("reason")).await?;
    tracing::info!(instance_id = %instance_id, reason = params.get("reason"), "rewind requested");
    Ok(StatusCode::ACCEPTED)
}

/// `POST /instances/{id}/restart[?restartWithNewInstanceId=false]`: the check-status
/// response of the new instance (or its outcome, with `timeout` and
/// `pollingInterval`); 400 when there is no instance with that id.
async fn restart(
    durable: DurableClient,
    PathParams(instance_id): PathParams<String>,
    params: Params,
) -> ApiResult<Response> {
    record_instance(&instance_id, None);
    let new_instance_id = params.bool("restartWithNewInstanceId", true)?;
    let wait = wait_parameters(&params)?;
    let restarted = durable.client().restart(&instance_id, new_instance_id).await.map_err(|error| match error {
        ClientError::NotFound(id) => ApiError::BadRequest(format!("there is no instance with id '{id}' to restart")),
        other => other.into(),
    })?;
    tracing::info!(instance_id = %instance_id, new_instance_id = %restarted, "restarted");
    match wait {
        Some((timeout, retry_interval)) => {
            durable.wait_for_completion_or_create_check_status_response(&restarted, timeout, retry_interval).await
        }
        None => Ok(durable.create_check_status_response(&restarted)),
    }
}
