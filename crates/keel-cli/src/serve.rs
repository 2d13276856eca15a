//! `keel serve`: the function host on a task hub (the sample app with `--samples`),
//! with logs in text or JSON.
//!
//! Which worker runs a function: the host's Rust worker runs what it registers (the
//! sample app's functions with `--samples`, nothing without), matching names without
//! regard to case; everything else goes to the SDK workers connected over gRPC. So
//! without `--samples` no function of the host ever answers for an SDK worker's.

use std::io::{IsTerminal, Write};
use std::net::{IpAddr, SocketAddr};

use clap::{Args, ValueEnum};
use keel_http::{ApiSettings, Host, HostConfig};
use tracing_subscriber::EnvFilter;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The HTTP port; 0 picks a free one (the address is printed).
    #[arg(long, default_value_t = 7071)]
    port: u16,
    /// The gRPC port for the Durable Task SDKs (Python, JavaScript, …); 0 picks a free one (the address is printed).
    #[arg(long, default_value_t = keel_grpc::DEFAULT_PORT)]
    grpc_port: u16,
    /// The address to listen on. The default accepts local connections only.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// The task hub: sqlite://PATH or postgres://USER@HOST:PORT/DATABASE[?schema=HUB].
    #[arg(long, env = "KEEL_STORE", default_value = keel::store::DEFAULT_STORE_URL)]
    store: String,
    /// Require this key on every API and trigger request (x-functions-key header or code= parameter).
    #[arg(long, env = "KEEL_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The largest request body accepted, in bytes.
    #[arg(long, default_value_t = ApiSettings::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Host the sample app (PlaceOrder, HelloCities, …, the Counter and Account entities
    /// and the /api/orders route). Without it the host runs no functions of its own:
    /// every orchestrator, activity and entity goes to the SDK workers connected over gRPC.
    #[arg(long)]
    samples: bool,
    /// The log line format (on stderr); RUST_LOG sets the levels.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Serve HTTP and gRPC over TLS with this certificate (PEM, the chain if any);
    /// needs --tls-key.
    #[arg(long, requires = "tls_key", value_name = "FILE")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert", value_name = "FILE")]
    tls_key: Option<std::path::PathBuf>,
    /// Accept this name in a request's Host header (repeatable), besides the bound
    /// address, localhost and the loopback addresses; NAME:PORT matches exactly.
    /// Other Host values get 421 (no DNS rebinding).
    #[arg(long = "allowed-host", value_name = "NAME")]
    allowed_hosts: Vec<String>,
    /// How long an HTTP client gets to send a request's head, in milliseconds; an idle
    /// kept-alive connection is closed after as long.
    #[arg(long, default_value_t = keel_http::HostConfig::DEFAULT_HEADER_TIMEOUT.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    header_timeout_ms: u64,
    /// The most HTTP connections served at once; more wait to be accepted. With
    /// --grpc-max-connections, lowered in proportion when the open-file limit cannot
    /// hold both (a warning says so).
    #[arg(long, default_value_t = keel_http::HostConfig::DEFAULT_MAX_CONNECTIONS,
          value_parser = parse_positive)]
    max_connections: usize,
    /// How long a client gets to send an HTTP request's body (from the end of its head)
    /// or a gRPC call's request message (from the call's start), in milliseconds; a
    /// slower one is cut off (408, DEADLINE_EXCEEDED).
    #[arg(long, default_value_t = keel_http::HostConfig::DEFAULT_BODY_TIMEOUT.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    body_timeout_ms: u64,
    /// How long a gRPC connection may stay open with no call in progress, in
    /// milliseconds (from its start or its last call's end); then it is closed with a
    /// GOAWAY and clients reconnect for their next call.
    #[arg(long, default_value_t = keel_grpc::Options::DEFAULT_IDLE_TIMEOUT.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    grpc_idle_timeout_ms: u64,
    /// The most gRPC connections served at once; more wait to be accepted.
    #[arg(long, default_value_t = keel_grpc::Options::DEFAULT_MAX_CONNECTIONS, value_parser = parse_positive)]
    grpc_max_connections: usize,
    /// The interval of the hub overview's throughput points (GET …/overview), in
    /// milliseconds: the counters and the backlog are sampled this often.
    #[arg(long, default_value_t = keel_http::HostConfig::DEFAULT_OVERVIEW_INTERVAL.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    overview_interval_ms: u64,
}

fn parse_positive(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(value) => Ok(value),
        Err(error) => Err(error.to_string()),
    }
}

/// Open files the host keeps besides its connections: the task hub's (SQLite's database,
/// WAL and shared-memory files for each of its connections, or PostgreSQL's sockets),
/// the listeners, the log, the runtime's own.
const RESERVED_FILES: u64 = 128;

/// The HTTP and gRPC connection limits the process's open files can hold: its soft
/// open-file limit is first raised to the hard limit (as Go programs do); if the two
/// limits together would leave fewer than [`RESERVED_FILES`] files for the rest, both
/// are lowered in proportion, so that connections never take the files the task hub
/// needs (a flood then waits in the listen backlogs while idle connections time out).
fn fit_connections_to_open_files(http: usize, grpc: usize) -> (usize, usize) {
    let Some(open_files) = raise_open_file_limit() else { return (http, grpc) };
    let budget = open_files.saturating_sub(RESERVED_FILES).max(2);
    let wanted = http.saturating_add(grpc) as u64;
    if wanted <= budget {
        return (http, grpc);
    }
    let fitted_http = ((http as u64 * budget / wanted) as usize).max(1);
    let fitted_grpc = ((budget as usize).saturating_sub(fitted_http)).max(1);
    tracing::warn!(
        open_files,
        http,
        grpc,
        fitted_http,
        fitted_grpc,
        "the open-file limit cannot hold the connection limits: serving fewer connections at once"
    );
    (fitted_http, fitted_grpc)
}

/// Raises the soft open-file limit to the hard limit; the limit now in force, if known.
#[cfg(unix)]
fn raise_open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    Some(limit.rlim_cur)
}

#[cfg(not(unix))]
fn raise_open_file_limit() -> Option<u64> {
    None
}

/// The certificate and key files, read.
fn tls_files(args: &ServeArgs) -> anyhow::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else { return Ok(None) };
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|error| anyhow::anyhow!("could not read {}: {error}", path.display()))
    };
    Ok(Some((read(cert)?, read(key)?)))
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    // Spans go out over OTLP when the standard OTEL_* variables ask for it; dropping
    // this at the end exports what is still buffered.
    let telemetry = keel::telemetry::init_from_env()?;
    let tls = tls_files(&args)?.map(|(certificate_pem, key_pem)| keel_http::TlsIdentity { certificate_pem, key_pem });
    // An empty key would let every request in while looking like protection.
    if args.api_key.as_deref().is_some_and(|key| key.trim().is_empty()) {
        anyhow::bail!("the API key is empty: give a key, or leave --api-key (and KEEL_API_KEY) out");
    }
    let api_key = args.api_key;
    let (http_connections, grpc_connections) =
        fit_connections_to_open_files(args.max_connections, args.grpc_max_connections);
    let config = HostConfig {
        address: SocketAddr::new(args.host, args.port),
        store_url: args.store.clone(),
        api: ApiSettings {
            api_key: api_key.clone(),
            max_body_bytes: args.max_body_bytes,
            allowed_hosts: args.allowed_hosts.clone(),
            ..ApiSettings::default()
        },
        tls: tls.clone(),
        header_timeout: std::time::Duration::from_millis(args.header_timeout_ms),
        max_connections: http_connections,
        body_timeout: std::time::Duration::from_millis(args.body_timeout_ms),
        overview_interval: std::time::Duration::from_millis(args.overview_interval_ms),
        ..HostConfig::default()
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    // Orchestrators, activities and entities the host's own worker does not register go
    // to the workers connected over gRPC.
    let remote = keel_grpc::GrpcRemoteWorkers::new();
    let app = if args.samples { keel_samples::app() } else { keel_http::App::new() };
    let app = app.functions({
        let remote = remote.clone();
        move |worker| worker.remote_workers(remote)
    });
    let grpc_address = SocketAddr::new(args.host, args.grpc_port);
    let grpc_listener = tokio::net::TcpListener::bind(grpc_address)
        .await
        .map_err(|error| anyhow::anyhow!("could not listen for gRPC on {grpc_address}: {error}"))?;
    let grpc_address = grpc_listener.local_addr()?;
    let host = Host::start(app, config).await?;
    let address = host.local_addr();
    let names = host.client().orchestrator_names();
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "keel: listening on {scheme}://{address} (task hub {})", args.store)?;
    writeln!(stdout, "  dashboard:       {scheme}://{address}/")?;
    writeln!(stdout, "  management API:  {scheme}://{address}{}", keel_http::MANAGEMENT_BASE_PATH)?;
    writeln!(stdout, "  start:           POST {scheme}://{address}/api/orchestrators/{{name}}")?;
    if names.is_empty() {
        writeln!(
            stdout,
            "  orchestrators:   none of its own (--samples hosts the sample app); SDK workers run every function"
        )?;
    } else {
        writeln!(stdout, "  orchestrators:   {}", names.join(", "))?;
    }
    let entities = host.client().entity_names();
    if !entities.is_empty() {
        writeln!(stdout, "  entities:        {}", entities.join(", "))?;
    }
    writeln!(stdout, "  gRPC (Durable Task SDKs): {grpc_address}")?;
    if let Some(cert) = &args.tls_cert {
        writeln!(stdout, "  TLS:             HTTP and gRPC, certificate {}", cert.display())?;
    }
    if api_key.is_some() {
        writeln!(stdout, "  API key:         required (x-functions-key header or code= parameter)")?;
    }
    if telemetry.is_some() {
        writeln!(stdout, "  traces:          OpenTelemetry, OTLP (OTEL_EXPORTER_OTLP_* settings)")?;
    }
    stdout.flush()?;
    drop(stdout);
    tracing::info!(%address, %grpc_address, store = %args.store, "host started");
    // One certificate for both servers, read by keel-http; gRPC needs HTTP/2 (`h2`).
    // (Without the `tls` feature the host has refused `--tls-cert` already.)
    #[cfg(feature = "tls")]
    let grpc_tls = tls
        .as_ref()
        .map(|identity| keel_http::tls_acceptor(identity, &[b"h2"]))
        .transpose()
        .map_err(|error| anyhow::anyhow!("the TLS certificate or key is not usable: {error}"))?;
    #[cfg(not(feature = "tls"))]
    let grpc_tls = None;
    let (stop, mut stopping) = tokio::sync::watch::channel(false);
    let grpc = tokio::spawn(keel_grpc::serve(
        grpc_listener,
        host.client().store().clone(),
        remote,
        keel_grpc::Options {
            api_key: api_key.clone(),
            tls: grpc_tls,
            idle_timeout: std::time::Duration::from_millis(args.grpc_idle_timeout_ms),
            max_connections: grpc_connections,
            message_timeout: std::time::Duration::from_millis(args.body_timeout_ms),
            // What the host runs itself stays with its worker; every other activity an
            // SDK orchestration schedules goes to the SDK workers at once.
            hosted_activities: Some(host.client().activity_names()),
            ..keel_grpc::Options::default()
        },
        async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        },
    ));
    host.run_until(async move {
        keel_http::host::shutdown_signal().await;
        let _ = stop.send(true);
    })
    .await?;
    grpc.await??;
    // The exporter's last batch runs on this runtime: shut it down off its threads.
    tokio::task::spawn_blocking(move || drop(telemetry)).await?;
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).flatten_event(true).init(),
    }
}
