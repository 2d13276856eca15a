//! The dashboard: one page (HTML, JS and CSS embedded in the binary) with two views.
//! Instances: lists them with filters and paging, shows an instance with its history
//! timeline, version, input, output and custom status, and starts, raises events to,
//! terminates, suspends, resumes, rewinds, restarts and purges instances. Entities
//! (`#entities`): lists them with their states and last operation times (name prefix
//! filter, paging), signals operations, deletes entities and cleans up entity storage.
//! Everything goes through the management API. Served at `/` and `/dashboard/`; no
//! build step.
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
