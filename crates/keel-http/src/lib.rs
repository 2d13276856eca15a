//! Keel's function host over HTTP.
//!
//! - [`management`]: the Durable Functions management API under
//!   `/runtime/webhooks/durabletask` and its alias `/durabletask` (a Functions host's
//!   `rpcBaseUrl`) — start, status, list, raise event, terminate, suspend, resume,
//!   rewind, restart, purge — field for field and status code for status code as
//!   Durable Functions has it, plus Keel's additions (an instance's `version`, the
//!   `version` start parameter, an instance's history export); [`entities`]: its
//!   entity routes (signal, delete, read, list, and Keel's storage clean-up).
//! - [`trigger`]: the built-in starter `POST /api/orchestrators/{name}` and the helpers
//!   an app's own routes use: [`DurableClient`], [`create_check_status_response`],
//!   [`wait_for_completion_or_create_check_status_response`] (and [`check_wait`], to
//!   refuse a bad wait before starting anything).
//! - [`overview`]: `GET …/overview`, the task hub at a glance (instances by status,
//!   entities, backlog, throughput over the last minutes, connected SDK workers) for
//!   the dashboard.
//! - [`dashboard`]: a web page (embedded HTML, JS and CSS) to watch and manage instances.
//! - [`host`]: [`serve`] an [`App`] — its functions on a worker, its routes next to the
//!   API — on a task hub, with an optional API key.
//!
//! ```no_run
//! use keel::{Activity, ActivityContext, Never, Orchestration, OrchestrationContext, OrchestrationError};
//! use keel_http::{App, HostConfig};
//!
//! const GREET: Orchestration<String, String> = Orchestration::new("Greet");
//! const SAY_HELLO: Activity<String, String, Never> = Activity::new("SayHello");
//!
//! async fn greet(ctx: OrchestrationContext, name: String) -> Result<String, OrchestrationError> {
//!     Ok(ctx.call(SAY_HELLO, &name).await?)
//! }
//!
//! async fn say_hello(_ctx: ActivityContext, name: String) -> Result<String, Never> {
//!     Ok(format!("Hello {name}!"))
//! }
//!
//! # async fn run() -> Result<(), keel_http::HostError> {
//! let app = App::new().functions(|worker| worker.orchestration(GREET, greet).activity(SAY_HELLO, say_hello));
//! keel_http::serve(app, HostConfig::default()).await
//! # }
//! ```

#![deny(missing_docs)]

mod continuation;
pub mod dashboard;
pub mod entities;
mod error;
pub mod host;
pub mod management;
pub mod overview;
mod payload;
mod request;
mod security;
#[cfg(feature = "tls")]
mod tls;
#[cfg(feature = "tls")]
pub use tls::acceptor as tls_acceptor;
pub mod trigger;

use std::sync::Arc;

pub use error::{ApiError, ApiResult};
pub use host::{serve, App, Host, HostConfig, HostError, TlsIdentity};
pub use payload::{percent_encode, HttpManagementPayload};
pub use trigger::{
    check_wait, create_check_status_response, wait_for_completion_or_create_check_status_response, DurableClient,
    RequestHead, MAX_WAIT,
};

/// The path under which the management API lives, as in Azure Functions.
pub const MANAGEMENT_BASE_PATH: &str = "/runtime/webhooks/durabletask";

/// What the HTTP front end needs to know besides the client.
#[derive(Clone, Debug)]
pub struct ApiSettings {
    /// When set, every management and trigger request must carry this key (header
    /// `x-functions-key` or query parameter `code`), else 401.
    pub api_key: Option<String>,
    /// The largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// The task hub name written into management URLs (`taskHub=`).
    pub task_hub: String,
    /// Names a request's `Host` header may give besides the host's own address,
    /// `localhost` and the loopback addresses (with the host's port; an entry with a
    /// port matches exactly, e.g. behind a proxy). Any other `Host` is refused with 421,
    /// so that a rebound DNS name cannot reach the host from a browser.
    pub allowed_hosts: Vec<String>,
}

impl ApiSettings {
    /// The default body limit: the runtime's payload limit.
    pub const DEFAULT_MAX_BODY_BYTES: usize = keel_core::limits::MAX_PAYLOAD_BYTES;
}

impl Default for ApiSettings {
    fn default() -> ApiSettings {
        ApiSettings {
            api_key: None,
            max_body_bytes: ApiSettings::DEFAULT_MAX_BODY_BYTES,
            task_hub: "keel".to_string(),
            allowed_hosts: Vec::new(),
        }
    }
}

/// What every request handled by the host can reach (a request extension): the client,
/// the settings and the throughput history of the overview.
#[derive(Clone)]
pub(crate) struct HostContext {
    pub client: keel::Client,
    pub settings: Arc<ApiSettings>,
    pub throughput: overview::Throughput,
}

/// The whole HTTP surface of a host: management API (under [`MANAGEMENT_BASE_PATH`]
/// and [`management::RPC_BASE_PATH`], with the [`overview`]), starter, `GET /metrics`
/// ([`keel::metrics`]), the app's own routes (all behind the API key when one is set)
/// and the dashboard. The overview's throughput comes from `throughput`, which the
/// caller keeps sampling ([`overview::Throughput::sample`]).
pub fn router(
    client: keel::Client,
    settings: ApiSettings,
    app_routes: axum::Router,
    throughput: overview::Throughput,
) -> axum::Router {
    let context = HostContext { client, settings: Arc::new(settings), throughput };
    let api = management::routes().merge(overview::routes());
    let protected = axum::Router::new()
        .nest(MANAGEMENT_BASE_PATH, api.clone())
        .nest(management::RPC_BASE_PATH, api)
        .merge(trigger::starter_routes())
        .route("/metrics", axum::routing::get(management::metrics))
        .merge(app_routes)
        .fallback(|| async { ApiError::NotFound("no such route".to_string()) })
        .layer(axum::middleware::from_fn(security::require_api_key));
    protected
        .merge(dashboard::routes())
        .layer(axum::extract::DefaultBodyLimit::max(context.settings.max_body_bytes))
        .layer(axum::middleware::from_fn(security::check_host_and_origin))
        .layer(axum::middleware::from_fn(request::log_request))
        .layer(axum::Extension(context))
}
