//! The function host: an [`App`] (functions + routes) run by a worker on a task hub
//! and served over HTTP, until a shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use keel::{Client, WorkerBuilder, WorkerHandle, WorkerOptions};

use crate::ApiSettings;

/// How long running activities get to finish when the host stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

type Registration = Box<dyn FnOnce(WorkerBuilder) -> WorkerBuilder + Send>;

/// A function app: the orchestrators and activities to register on the host's worker
/// and the app's own HTTP routes (triggers), served next to the management API.
#[derive(Default)]
pub struct App {
    registrations: Vec<Registration>,
    routes: axum::Router,
}

impl App {
    /// An app with no functions and no routes.
    pub fn new() -> App {
        App::default()
    }

    /// Adds functions: `register` gets the worker builder and returns it with them.
    pub fn functions(mut self, register: impl FnOnce(WorkerBuilder) -> WorkerBuilder + Send + 'static) -> App {
        self.registrations.push(Box::new(register));
        self
    }

    /// Adds HTTP routes; handlers can extract a [`crate::DurableClient`].
    pub fn routes(mut self, routes: axum::Router) -> App {
        self.routes = self.routes.merge(routes);
        self
    }
}

/// Where and how a host runs.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// The HTTP address; port 0 picks a free port ([`Host::local_addr`] tells which).
    pub address: SocketAddr,
    /// The task hub, as [`keel::store::open`] takes it.
    pub store_url: String,
    /// API key, body limit, task hub name.
    pub api: ApiSettings,
    /// The worker's concurrency, leases and polling.
    pub worker: WorkerOptions,
}

impl Default for HostConfig {
    fn default() -> HostConfig {
        HostConfig {
            address: SocketAddr::from(([127, 0, 0, 1], 7071)),
            store_url: keel::store::DEFAULT_STORE_URL.to_string(),
            api: ApiSettings::default(),
            worker: WorkerOptions::default(),
        }
    }
}

/// Why a host could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("could not open the task hub '{url}': {source}")]
    Store { url: String, source: keel::store::Error },
    #[error("could not listen on {address}: {source}")]
    Bind { address: SocketAddr, source: std::io::Error },
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// A host that is bound and whose worker runs; [`Host::run_until`] serves requests.
pub struct Host {
    listener: tokio::net::TcpListener,
    router: axum::Router,
    worker: WorkerHandle,
}

impl Host {
    /// Opens the task hub, starts the worker with the app's functions and binds the
    /// HTTP address.
    pub async fn start(app: App, config: HostConfig) -> Result<Host, HostError> {
        let store = keel::store::open(&config.store_url)
            .await
            .map_err(|source| HostError::Store { url: config.store_url.clone(), source })?;
        let listener = tokio::net::TcpListener::bind(config.address)
            .await
            .map_err(|source| HostError::Bind { address: config.address, source })?;
        let mut builder = keel::Worker::builder(store).options(config.worker);
        for register in app.registrations {
            builder = register(builder);
        }
        let worker = builder.build().start();
        let router = crate::router(worker.client(), config.api, app.routes);
        Ok(Host { listener, router, worker })
    }

    /// The address the host listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// A client on the host's task hub that knows the app's orchestrators.
    pub fn client(&self) -> Client {
        self.worker.client()
    }

    /// Serves until `shutdown` resolves, then stops taking requests and work, giving
    /// running activities a few seconds to finish.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), HostError> {
        let served = axum::serve(self.listener, self.router).with_graceful_shutdown(shutdown).await;
        tracing::info!("stopping the worker");
        self.worker.shutdown(SHUTDOWN_GRACE).await;
        served.map_err(HostError::Serve)
    }
}

/// Runs `app` as configured until Ctrl-C or SIGTERM.
pub async fn serve(app: App, config: HostConfig) -> Result<(), HostError> {
    let host = Host::start(app, config).await?;
    tracing::info!(address = %host.local_addr(), "listening");
    host.run_until(shutdown_signal()).await
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        _ = terminate => {}
    }
    tracing::info!("shutdown signal received");
}
