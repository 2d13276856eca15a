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
///
/// [`serve`] runs an app until Ctrl-C; [`Host`] gives more control. Here a host on a
/// free port of the loopback interface runs one orchestration and stops:
///
/// ```
/// use std::time::Duration;
/// use keel::{Activity, ActivityContext, Never, Orchestration, OrchestrationContext, OrchestrationError, Outcome};
/// use keel_http::{App, Host, HostConfig};
///
/// const GREET: Orchestration<String, String> = Orchestration::new("Greet");
/// const SAY_HELLO: Activity<String, String, Never> = Activity::new("SayHello");
///
/// async fn greet(ctx: OrchestrationContext, name: String) -> Result<String, OrchestrationError> {
///     Ok(ctx.call(SAY_HELLO, &name).await?)
/// }
///
/// async fn say_hello(_ctx: ActivityContext, name: String) -> Result<String, Never> {
///     Ok(format!("Hello {name}!"))
/// }
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let app = App::new().functions(|worker| worker.orchestration(GREET, greet).activity(SAY_HELLO, say_hello));
/// let config = HostConfig {
///     address: "127.0.0.1:0".parse()?, // port 0: any free port
///     store_url: format!("sqlite://{}", dir.path().join("keel.db").display()),
///     ..HostConfig::default()
/// };
/// let host = Host::start(app, config).await?;
/// println!("management API on http://{}{}", host.local_addr(), keel_http::MANAGEMENT_BASE_PATH);
///
/// let instance = host.client().start(GREET, &"Tokyo".to_string()).await?;
/// let outcome = instance.wait(Duration::from_secs(30)).await?;
/// assert_eq!(outcome, Outcome::Completed("Hello Tokyo!".to_string()));
///
/// host.run_until(async {}).await?; // serves until the future resolves: here, at once
/// # Ok(())
/// # }
/// ```
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
    /// Serve HTTPS with this certificate (needs the `tls` feature).
    pub tls: Option<TlsIdentity>,
}

/// A server certificate (chain) and its private key, PEM-encoded.
#[derive(Clone)]
pub struct TlsIdentity {
    /// The certificate chain, PEM-encoded, the server's own certificate first.
    pub certificate_pem: Vec<u8>,
    /// The certificate's private key, PEM-encoded.
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity").finish_non_exhaustive() // never the key
    }
}

impl Default for HostConfig {
    fn default() -> HostConfig {
        HostConfig {
            address: SocketAddr::from(([127, 0, 0, 1], 7071)),
            store_url: keel::store::DEFAULT_STORE_URL.to_string(),
            api: ApiSettings::default(),
            worker: WorkerOptions::default(),
            tls: None,
        }
    }
}

/// Why a host could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The task hub could not be opened.
    #[error("could not open the task hub '{url}': {source}")]
    Store {
        /// The store URL as configured.
        url: String,
        /// Why it could not be opened.
        source: keel::store::Error,
    },
    /// The HTTP address could not be bound (in use, or not allowed).
    #[error("could not listen on {address}: {source}")]
    Bind {
        /// The address as configured.
        address: SocketAddr,
        /// Why it could not be bound.
        source: std::io::Error,
    },
    /// The HTTP server failed while serving.
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
    /// HTTPS was asked for and could not be set up: a bad certificate or key, or a
    /// build without the `tls` feature.
    #[error("TLS: {0}")]
    Tls(String),
}

/// A host that is bound and whose worker runs; [`Host::run_until`] serves requests.
pub struct Host {
    listener: tokio::net::TcpListener,
    router: axum::Router,
    worker: WorkerHandle,
    #[cfg(feature = "tls")]
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Host {
    /// Opens the task hub, starts the worker with the app's functions and binds the
    /// HTTP address.
    pub async fn start(app: App, config: HostConfig) -> Result<Host, HostError> {
        #[cfg(feature = "tls")]
        let tls = config.tls.as_ref().map(crate::tls::acceptor).transpose().map_err(HostError::Tls)?;
        #[cfg(not(feature = "tls"))]
        if config.tls.is_some() {
            return Err(HostError::Tls("this build of keel-http has no TLS support (feature `tls`)".into()));
        }
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
        Ok(Host {
            listener,
            router,
            worker,
            #[cfg(feature = "tls")]
            tls,
        })
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
        #[cfg(feature = "tls")]
        let served = match self.tls {
            Some(acceptor) => crate::tls::serve(self.listener, self.router, acceptor, shutdown).await,
            None => axum::serve(self.listener, self.router).with_graceful_shutdown(shutdown).await,
        };
        #[cfg(not(feature = "tls"))]
        let served = axum::serve(self.listener, self.router).with_graceful_shutdown(shutdown).await;
        tracing::info!("stopping the worker");
        self.worker.shutdown(SHUTDOWN_GRACE).await;
        served.map_err(HostError::Serve)
    }
}

/// Runs `app` as configured until Ctrl-C or SIGTERM: opens the task hub, starts the
/// worker, serves HTTP, then stops taking requests and work, giving running
/// activities a few seconds to finish. Errors as [`Host::start`] and
/// [`Host::run_until`] do. [`App`] has an example that runs a host.
///
/// ```no_run
/// # async fn run(app: keel_http::App) -> Result<(), keel_http::HostError> {
/// let config = keel_http::HostConfig { store_url: "sqlite://keel.db".into(), ..Default::default() };
/// keel_http::serve(app, config).await // until Ctrl-C
/// # }
/// ```
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
