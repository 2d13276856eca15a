//! The function host: an [`App`] (functions + routes) run by a worker on a task hub
//! and served over HTTP, until a shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use keel::{Client, WorkerBuilder, WorkerHandle, WorkerOptions};

use crate::overview::Throughput;
use crate::security::Connection;
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
    /// How long a client gets to send a request's head (request line and headers),
    /// counted from when the connection is opened or, on a kept-alive connection, from
    /// the end of the previous response: a slow client is cut off, and a kept-alive
    /// connection idle this long is closed. Default [`HostConfig::DEFAULT_HEADER_TIMEOUT`].
    pub header_timeout: Duration,
    /// The most connections served at once; beyond it the host accepts no more until
    /// one closes (new ones wait in the listen backlog). Default
    /// [`HostConfig::DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// How long a client gets to send a request's body, counted from the end of its
    /// head: a slower body is cut off with 408 and the connection closed. Default
    /// [`HostConfig::DEFAULT_BODY_TIMEOUT`].
    pub body_timeout: Duration,
    /// How often the overview's throughput is sampled (`GET …/overview`, see
    /// [`crate::overview`]): the interval of its points. Default
    /// [`HostConfig::DEFAULT_OVERVIEW_INTERVAL`].
    pub overview_interval: Duration,
}

impl HostConfig {
    /// The default of [`HostConfig::header_timeout`]: 10 s.
    pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    /// The default of [`HostConfig::max_connections`]: 1,000 (under a 1,024 open-file
    /// limit, leaves room for the task hub's files and the gRPC server).
    pub const DEFAULT_MAX_CONNECTIONS: usize = 1000;
    /// The default of [`HostConfig::body_timeout`]: 30 s (a body of the default 1 MiB
    /// limit at 35 KB/s).
    pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
    /// The default of [`HostConfig::overview_interval`]: 10 s.
    pub const DEFAULT_OVERVIEW_INTERVAL: Duration = Duration::from_secs(10);
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
            header_timeout: HostConfig::DEFAULT_HEADER_TIMEOUT,
            max_connections: HostConfig::DEFAULT_MAX_CONNECTIONS,
            body_timeout: HostConfig::DEFAULT_BODY_TIMEOUT,
            overview_interval: HostConfig::DEFAULT_OVERVIEW_INTERVAL,
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
    sampler: Sampler,
    limits: Limits,
    #[cfg(feature = "tls")]
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Host {
    /// Opens the task hub, starts the worker with the app's functions and binds the
    /// HTTP address.
    pub async fn start(app: App, config: HostConfig) -> Result<Host, HostError> {
        #[cfg(feature = "tls")]
        let tls = config
            .tls
            .as_ref()
            .map(|identity| crate::tls::acceptor(identity, &[b"http/1.1"]))
            .transpose()
            .map_err(HostError::Tls)?;
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
        let throughput = Throughput::new(config.overview_interval);
        let sampler = Sampler(tokio::spawn(throughput.clone().sample(worker.client())));
        let router = crate::router(worker.client(), config.api, app.routes, throughput);
        Ok(Host {
            listener,
            router,
            worker,
            sampler,
            limits: Limits {
                header_timeout: config.header_timeout,
                max_connections: config.max_connections.max(1),
                body_timeout: config.body_timeout,
            },
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
    /// open connections and running activities a few seconds to finish.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), HostError> {
        let limits = self.limits;
        #[cfg(feature = "tls")]
        let served = serve_connections(self.listener, self.router, limits, self.tls, shutdown).await;
        #[cfg(not(feature = "tls"))]
        let served = serve_connections(self.listener, self.router, limits, shutdown).await;
        drop(self.sampler);
        tracing::info!("stopping the worker");
        self.worker.shutdown(SHUTDOWN_GRACE).await;
        served.map_err(HostError::Serve)
    }
}

/// The task of [`Throughput::sample`]; it stops when the host is dropped.
struct Sampler(tokio::task::JoinHandle<()>);

impl Drop for Sampler {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The connection settings of the accept loop.
#[derive(Clone, Copy)]
struct Limits {
    header_timeout: Duration,
    max_connections: usize,
    body_timeout: Duration,
}

/// The accept loop: hyper serves `router` over HTTP/1.1 on each connection (after the
/// TLS handshake with `tls`), with the header and body timeouts and at most `max_connections`
/// connections at once; each request carries its [`Connection`]. At shutdown the
/// listener closes and open connections get [`SHUTDOWN_GRACE`] to finish their requests.
async fn serve_connections(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    limits: Limits,
    #[cfg(feature = "tls")] tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

    #[cfg(not(feature = "tls"))]
    let tls: Option<std::convert::Infallible> = None;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // HTTP/1.1 only, served at once: hyper's header timer then runs from the connection's
    // start, so a client that never sends a byte is cut too. (`serve_connection_with_upgrades`
    // would first wait for a byte to tell the HTTP version, with no timeout.)
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).http1_only();
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        let Some((stream, peer, permit)) =
            keel::serve::next_connection(&listener, &permits, &mut shutdown, "HTTP").await
        else {
            break;
        };
        let Ok(local) = stream.local_addr() else { continue };
        let connection = Connection { local, tls: tls.is_some() };
        let router = router.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let mut request = request.map(|body| axum::body::Body::new(TimedBody::new(body, limits.body_timeout)));
            request.extensions_mut().insert(connection);
            let mut router = router.clone();
            tower_service::Service::call(&mut router, request)
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        #[cfg(feature = "tls")]
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            #[cfg(feature = "tls")]
            if let Some(acceptor) = tls {
                let handshake = tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await;
                let stream = match handshake {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => return tracing::debug!(%peer, %error, "a TLS handshake failed"),
                    Err(_) => return tracing::debug!(%peer, "a TLS handshake timed out"),
                };
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                if let Err(error) = watcher.watch(connection.into_owned()).await {
                    tracing::debug!(%peer, %error, "an HTTPS connection ended with an error");
                }
                return;
            }
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            if let Err(error) = watcher.watch(connection.into_owned()).await {
                tracing::debug!(%peer, %error, "an HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!("some HTTP connections were still open when the host stopped");
    }
    Ok(())
}

/// The error of a request body that did not arrive within the body timeout; the body
/// extractor answers it with 408.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {} ms", .0.as_millis())]
pub(crate) struct BodyTimeout(pub(crate) Duration);

/// A request body that must arrive whole within a deadline, counted from the request's
/// head; after it, reading fails with [`BodyTimeout`].
struct TimedBody {
    body: hyper::body::Incoming,
    timeout: Duration,
    expiry: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl TimedBody {
    fn new(body: hyper::body::Incoming, timeout: Duration) -> TimedBody {
        TimedBody { body, timeout, expiry: Box::pin(tokio::time::sleep(timeout)) }
    }
}

impl hyper::body::Body for TimedBody {
    type Data = hyper::body::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<hyper::body::Bytes>, Self::Error>>> {
        use std::future::Future as _;
        use std::task::Poll;
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        match self.expiry.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(self.timeout))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
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
