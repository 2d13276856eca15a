//! The dashboard: one page (HTML, JS and CSS embedded in the binary, vanilla JS, no
//! build step, no CDN) served at `/` and `/dashboard/`. It talks only to the management
//! API. Three views, each with an address of its own:
//!
//! - **Overview** (`#overview`, the landing view), from `GET …/overview`: instances by
//!   status (a click lists them), the entity count, the backlog (orchestration messages,
//!   activities, timers), throughput and backlog over the last minutes as inline SVG
//!   charts, and the connected SDK workers with their functions.
//! - **Instances** (`#instances`; `#instance=ID` opens one): start, list with filters
//!   and paging, and an instance's page: status, version, parent, input, output and
//!   custom status; raise event, terminate, suspend, resume, rewind, restart, purge,
//!   export the history; and four tabs. *Timeline*: every activity, sub-orchestration,
//!   timer and entity call as a bar on a time axis from its scheduling event to its
//!   outcome (matched by id in the exported history, `GET …/instances/{id}/history`),
//!   external events as points, the episodes as ticks; failures red, retries (the same
//!   call again after a failed attempt) marked, what a finished instance never got an
//!   answer for shown as abandoned; a click shows a bar's input and result. *Structure*:
//!   the parent chain (from `ExecutionStarted`'s parent) and the sub-orchestrations
//!   (from `SubOrchestrationInstanceCreated`), each a link, children expandable level by
//!   level. *History*: Durable Functions' history view (`showHistory`), 100 events a
//!   page. *Status JSON*: the whole status object.
//! - **Entities** (`#entities`): lists them with their states and last operation times
//!   (name prefix filter, paging), signals operations, deletes entities and cleans up
//!   entity storage.
//!
//! JSON is shown everywhere as a collapsible tree (nodes built when first opened) with
//! Copy, Expand all and Collapse all.
//!
//! The assets hold no data, so they are served without the API key; the page asks for
//! the key (or takes `?code=` from its own URL) and sends it with every API call.

use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");

/// The dashboard's routes.
pub(crate) fn routes() -> Router {
    Router::new()
        .route("/", get(index))
        .route("/dashboard", get(|| async { Redirect::permanent("/dashboard/") }))
        .route("/dashboard/", get(index))
        .route("/dashboard/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/dashboard/app.css", get(|| async { asset("text/css; charset=utf-8", APP_CSS) }))
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(CONTENT_TYPE, content_type), (CACHE_CONTROL, "no-cache")], body).into_response()
}
