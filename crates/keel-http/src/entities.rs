//! The entity routes of the management API, under `/runtime/webhooks/durabletask` (and
//! its alias `/durabletask`):
//!
//! | Route | Answer |
//! |---|---|
//! | `POST /entities/{name}/{key}?op=NAME[&scheduledTime=T]` | 202: the operation is signalled |
//! | `DELETE /entities/{name}/{key}` | 202: `delete` is signalled |
//! | `GET /entities/{name}/{key}` | 200 with the state as the body; 404 when the entity has none |
//! | `GET /entities[/{name}]` | 200 `[{"entityId":{"name","key"},"lastOperationTime","state"}]` |
//! | `POST /entities/clean` (Keel) | 200 `{"emptyEntitiesRemoved":n,"orphanedLocksReleased":n}` |
//!
//! Where Durable Functions leaves a choice:
//!
//! - A signal needs `op`: without it the request is refused (400), rather than
//!   signalling an operation with an empty name.
//! - The body of a signal is the operation's input: JSON with `Content-Type:
//!   application/json` (400 when it is not JSON), any other body is taken as text and
//!   becomes a JSON string, an empty body is no input. `scheduledTime` (ISO 8601)
//!   delivers the signal at that time.
//! - The key `$`, Durable Functions' empty key, is refused (400): Keel entity keys are
//!   never empty, and taking `$` as a key of its own would mean something else than it
//!   does there.
//! - An entity name the host does not register is 404 on the routes that write
//!   (signal, delete), as the starter refuses orchestrators it does not run; reads of
//!   such a name find nothing (404, or an empty list). A host with no functions of its
//!   own (every one runs on SDK workers) lets every name through, as its starter does.
//! - Lists leave the state out unless `fetchState=true`, and entities without state
//!   (deleted, or only locked or waiting) out unless `includeTransient=true` (Keel);
//!   `lastOperationTimeTo` is exclusive; `namePrefix` (Keel) filters `GET /entities`
//!   by the start of the name. The `x-ms-continuation-token` is the base64url form of
//!   the last entity id of the page: opaque, and ASCII whatever the keys hold.
//! - `POST /entities/clean[?removeEmptyEntities=false][&releaseOrphanedLocks=false]`
//!   is Keel's route for `CleanEntityStorage` (both default to true). It cannot be
//!   taken for a signal: signals always name a key (`/entities/{name}/{key}`), and
//!   `GET /entities/clean` still lists the entities named `clean`.

use axum::http::header::{HeaderValue, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use keel::{Client, ClientError, EntityId, EntityQuery};
use keel_core::limits;
use serde_json::json;

use crate::continuation;
use crate::error::{ApiError, ApiResult};
use crate::management::MAX_PAGE_SIZE;
use crate::payload::entity_status;
use crate::request::{has_json_content_type, record_instance, Body, Params, PathParams};
use crate::trigger::DurableClient;

/// The operation `DELETE /entities/{name}/{key}` signals.
pub const DELETE_OPERATION: &str = "delete";

/// The path segment of Keel's storage clean-up route, `POST /entities/clean`.
pub const CLEAN_SEGMENT: &str = "clean";

/// The routes of the entity API, relative to the API's base path. The lists also answer
/// with a trailing slash (`/entities/`, `/entities/{name}/`), as in Durable Functions.
pub(crate) fn routes() -> Router {
    Router::new()
        .route("/entities", get(list_all).fallback(no_such_method))
        .route("/entities/", get(list_all).fallback(no_such_method))
        .route("/entities/{name}", get(list_named).post(clean).fallback(no_such_method))
        .route("/entities/{name}/", get(list_named).fallback(no_such_method))
        .route("/entities/{name}/{key}", get(get_entity).post(signal).delete(delete).fallback(no_such_method))
}

async fn no_such_method() -> ApiError {
    ApiError::NotFound(
        "no such route: entities take POST or DELETE /entities/{name}/{key}, GET /entities[/{name}[/{key}]] \
         and POST /entities/clean"
            .into(),
    )
}

/// The entity a path names, checked: 400 for a name or key Keel does not accept.
fn entity_id(name: &str, key: &str) -> ApiResult<EntityId> {
    if key == "$" {
        return Err(ApiError::BadRequest(
            "the entity key '$' (an empty key in Durable Functions) is not supported: Keel entity keys must not be \
             empty"
                .into(),
        ));
    }
    let entity =
        EntityId::new(name, key).map_err(|message| ApiError::BadRequest(format!("invalid entity id: {message}")))?;
    record_instance(&entity.instance_id(), Some(&entity.name));
    Ok(entity)
}

/// Refuses (404) an entity name the host does not register. A client that knows no
/// functions at all (not a host's) cannot tell, and lets every name through.
fn check_hosted(client: &Client, entity: &EntityId, name: &str) -> ApiResult<()> {
    let hosted = client.entity_names();
    let knows_the_app = !hosted.is_empty() || !client.orchestrator_names().is_empty();
    if knows_the_app && !hosted.iter().any(|hosted| hosted.to_lowercase() == entity.name) {
        return Err(ClientError::UnknownEntity(name.to_string()).into());
    }
    Ok(())
}

/// The input of a signal: JSON with a JSON content type, else the text as a JSON
/// string; `None` for an empty body.
fn operation_input(headers: &HeaderMap, body: &Body) -> ApiResult<Option<String>> {
    if body.0.is_empty() {
        return Ok(None);
    }
    let input = if has_json_content_type(headers) {
        body.json_text("operation input")?
    } else {
        let text = std::str::from_utf8(&body.0)
            .map_err(|_| ApiError::BadRequest("the operation input is not UTF-8 text".into()))?;
        Some(serde_json::Value::String(text.to_string()).to_string())
    };
    if input.as_ref().is_some_and(|input| input.len() > limits::MAX_PAYLOAD_BYTES) {
        return Err(ApiError::PayloadTooLarge { limit_bytes: limits::MAX_PAYLOAD_BYTES });
    }
    Ok(input)
}

/// `POST /entities/{name}/{key}?op=NAME[&scheduledTime=T]`: 202; 400 for a bad id,
/// a missing or bad operation, bad JSON or a bad time; 404 for an entity name the host
/// does not run; 413 for an oversized body.
async fn signal(
    durable: DurableClient,
    PathParams((name, key)): PathParams<(String, String)>,
    params: Params,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<StatusCode> {
    let entity = entity_id(&name, &key)?;
    let Some(operation) = params.get("op") else {
        return Err(ApiError::BadRequest(
            "signalling an entity needs the operation: add ?op=NAME (DELETE on the entity signals 'delete')".into(),
        ));
    };
    limits::check_name("operation", operation).map_err(ApiError::BadRequest)?;
    let input = operation_input(&headers, &body)?;
    let scheduled_time = params.time("scheduledTime")?;
    check_hosted(durable.client(), &entity, &name)?;
    let trace = durable.trace_context().cloned();
    durable.client().signal_entity_traced(&entity, operation, input, scheduled_time, trace).await?;
    tracing::info!(entity = %entity, operation, scheduled_time = ?scheduled_time, "entity signalled");
    Ok(StatusCode::ACCEPTED)
}

/// `DELETE /entities/{name}/{key}`: signals `delete`; 202, or 400/404 like a signal.
async fn delete(
    durable: DurableClient,
    PathParams((name, key)): PathParams<(String, String)>,
) -> ApiResult<StatusCode> {
    let entity = entity_id(&name, &key)?;
    check_hosted(durable.client(), &entity, &name)?;
    durable.client().signal_entity_raw(&entity, DELETE_OPERATION, None, None).await?;
    tracing::info!(entity = %entity, "entity deletion signalled");
    Ok(StatusCode::ACCEPTED)
}

/// `GET /entities/{name}/{key}`: 200 with the last committed state as the body; 404
/// when there is none (never signalled, deleted, or no state yet).
async fn get_entity(
    durable: DurableClient,
    PathParams((name, key)): PathParams<(String, String)>,
) -> ApiResult<Response> {
    let entity = entity_id(&name, &key)?;
    match durable.client().get_entity(&entity).await?.and_then(|metadata| metadata.state) {
        Some(state) => Ok(([(CONTENT_TYPE, HeaderValue::from_static("application/json"))], state).into_response()),
        None => Err(ApiError::NotFound(format!("entity {entity} does not exist (it has no state)"))),
    }
}

/// `GET /entities`: every entity, or those whose name starts with `namePrefix`.
async fn list_all(durable: DurableClient, params: Params, headers: HeaderMap) -> ApiResult<Response> {
    let prefix = match params.get("namePrefix") {
        Some(prefix) if prefix.contains('@') => {
            return Err(ApiError::BadRequest(format!("'namePrefix' must not contain '@', not '{prefix}'")))
        }
        Some(prefix) => Some(format!("@{}", prefix.to_lowercase())),
        None => None,
    };
    list(durable, prefix, params, headers).await
}

/// `GET /entities/{name}`: the entities of one name (case-insensitive).
async fn list_named(
    durable: DurableClient,
    PathParams(name): PathParams<String>,
    params: Params,
    headers: HeaderMap,
) -> ApiResult<Response> {
    // Any key will do to check the name.
    let entity =
        EntityId::new(&name, "_").map_err(|message| ApiError::BadRequest(format!("invalid entity name: {message}")))?;
    list(durable, Some(format!("@{}@", entity.name)), params, headers).await
}

/// One page of entities, the next page's token in `x-ms-continuation-token`.
async fn list(
    durable: DurableClient,
    prefix: Option<String>,
    params: Params,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let continuation = continuation::from_request(&headers, "an entity list")?;
    let query = EntityQuery {
        instance_id_prefix: prefix,
        last_modified_from: params.time("lastOperationTimeFrom")?,
        last_modified_to: params.time("lastOperationTimeTo")?,
        include_transient: params.bool("includeTransient", false)?,
        page_size: params.count("top")?.unwrap_or(0).min(MAX_PAGE_SIZE),
        continuation,
    };
    let fetch_state = params.bool("fetchState", false)?;
    let page = durable.client().query_entities(&query).await?;
    let entities: Vec<_> = page.entities.iter().map(|entity| entity_status(entity, fetch_state)).collect();
    let mut response = Json(entities).into_response();
    continuation::add_to_response(&mut response, page.continuation.as_deref());
    Ok(response)
}

/// `POST /entities/clean`: removes empty entities and releases orphaned locks; 200 with
/// the counts. Any other `POST /entities/{name}` lacks the key of a signal (400).
async fn clean(durable: DurableClient, PathParams(name): PathParams<String>, params: Params) -> ApiResult<Response> {
    if name != CLEAN_SEGMENT {
        return Err(ApiError::BadRequest(format!(
            "signalling an entity needs its key: POST /entities/{name}/{{key}}?op=NAME"
        )));
    }
    let remove_empty = params.bool("removeEmptyEntities", true)?;
    let release_orphaned_locks = params.bool("releaseOrphanedLocks", true)?;
    let cleaned = durable.client().clean_entity_storage(remove_empty, release_orphaned_locks).await?;
    tracing::info!(
        empty_entities_removed = cleaned.empty_entities_removed,
        orphaned_locks_released = cleaned.orphaned_locks_released,
        "entity storage cleaned"
    );
    Ok(Json(json!({
        "emptyEntitiesRemoved": cleaned.empty_entities_removed,
        "orphanedLocksReleased": cleaned.orphaned_locks_released,
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use axum::body::Bytes;

    use super::*;

    #[test]
    fn a_signal_body_is_json_with_a_json_type_and_text_otherwise() {
        let json_headers = {
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
            headers
        };
        let body = |text: &str| Body(Bytes::from(text.to_string()));
        assert_eq!(operation_input(&json_headers, &body(" 2 ")).unwrap().as_deref(), Some("2"));
        assert!(operation_input(&json_headers, &body("{oops")).is_err());
        assert_eq!(
            operation_input(&HeaderMap::new(), &body("hello \"you\"")).unwrap().as_deref(),
            Some(r#""hello \"you\"""#)
        );
        assert_eq!(operation_input(&HeaderMap::new(), &body("2")).unwrap().as_deref(), Some(r#""2""#));
        assert_eq!(operation_input(&json_headers, &body("")).unwrap(), None);
        assert_eq!(operation_input(&HeaderMap::new(), &body("")).unwrap(), None);
        assert!(operation_input(&HeaderMap::new(), &Body(Bytes::from_static(b"\xff"))).is_err());
    }

    #[test]
    fn the_empty_key_and_bad_keys_are_refused() {
        assert!(entity_id("Counter", "$").is_err());
        assert!(entity_id("Counter", "a@b").is_err());
        assert!(entity_id("Counter", "a#b").is_err());
        assert!(entity_id("Counter", &"k".repeat(300)).is_err());
        assert_eq!(entity_id("Counter", "c1").unwrap().instance_id(), "@counter@c1");
    }
}
