//! PostgreSQL over TLS, against the second throwaway server that `.ci/run` starts:
//! `ssl=on`, TLS only on TCP (`hostssl`), a certificate for 127.0.0.1 and localhost
//! signed by a CA of its own. `KEEL_TEST_POSTGRES_TLS_URL` names it (without `sslmode`),
//! `KEEL_TEST_POSTGRES_TLS_CA` is that CA (PEM) and `KEEL_TEST_POSTGRES_TLS_OTHER_CA` a CA
//! that signed nothing. Without them each test prints that it was skipped; with
//! `CI=true` it fails instead, so CI cannot pass without running them.
//!
//! What is checked: a workload through two stores with `sslmode=verify-full` (the work
//! one store writes reaches the other's worker through its LISTEN connection), every
//! connection of both stores encrypted (`pg_stat_ssl`, the listeners included); the
//! wrong CA refused, clearly and not retryably; `verify-full` checks the host name and
//! `verify-ca` does not; `require` and the default `prefer` encrypt without a CA, and
//! `disable` is plaintext (which this server refuses); an unusable CA file fails the
//! open.

#![cfg(feature = "tls")]

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use keel::{
    Activity, ActivityContext, Client, Never, Orchestration, OrchestrationContext, OrchestrationError, Outcome,
};
use keel_postgres::{PostgresStore, SslMode};
use keel_store::{Error, Store};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

const URL_ENV: &str = "KEEL_TEST_POSTGRES_TLS_URL";
const CA_ENV: &str = "KEEL_TEST_POSTGRES_TLS_CA";
const OTHER_CA_ENV: &str = "KEEL_TEST_POSTGRES_TLS_OTHER_CA";

/// The TLS server of `.ci/run`.
struct Server {
    /// Its URL, without `sslmode`.
    url: String,
    /// The CA that signed its certificate.
    ca: String,
    /// A CA that did not.
    other_ca: String,
}

/// The server, or `None` after printing why the test is skipped; under `CI=true` a
/// missing server fails the test.
fn server(test: &str) -> Option<Server> {
    let var = |name| std::env::var(name).ok().filter(|value: &String| !value.trim().is_empty());
    match (var(URL_ENV), var(CA_ENV), var(OTHER_CA_ENV)) {
        (Some(url), Some(ca), Some(other_ca)) => Some(Server { url, ca, other_ca }),
        _ => {
            let why = format!(
                "set {URL_ENV}=postgres://USER@HOST:PORT/DATABASE (a server with ssl=on), {CA_ENV}=CA.pem (its CA) \
                 and {OTHER_CA_ENV}=OTHER.pem (another CA); .ci/run starts such a server and sets them"
            );
            if std::env::var("CI").is_ok_and(|ci| ci == "true") {
                panic!("{test} must run in CI: {why}");
            }
            let _ = writeln!(std::io::stderr(), "skipped {test}: {why}");
            None
        }
    }
}

/// `url` with more parameters.
fn with(url: &str, parameters: &[(&str, &str)]) -> String {
    let mut url = url.to_owned();
    for (key, value) in parameters {
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("{key}={}", encode(value)));
    }
    url
}

/// A parameter's value, percent-encoded where a URL needs it.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => (byte as char).to_string(),
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// The server's URL with its host replaced by `host` (the TCP connection still goes to
/// the server's address, through `hostaddr`).
fn with_host_name(server_url: &str, host: &str) -> String {
    let config: tokio_postgres::Config = server_url.parse().expect("the server's URL");
    let tokio_postgres::config::Host::Tcp(address) = &config.get_hosts()[0] else { panic!("a TCP server") };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres");
    let dbname = config.get_dbname().unwrap_or("postgres");
    with(&format!("postgres://{user}@{host}:{port}/{dbname}"), &[("hostaddr", address)])
}

fn fresh_name(prefix: &str) -> String {
    format!("{prefix}_{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// A connection of the test's own that looks at the server's view of the connections
/// (TLS too: the server takes nothing else on TCP).
async fn observer(server: &Server) -> tokio_postgres::Client {
    let pem = std::fs::read(&server.ca).expect("the CA file");
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(&pem) {
        roots.add(certificate.expect("a PEM certificate")).expect("a usable CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let url = with(&server.url, &[("sslmode", "require"), ("application_name", "keel-tls-observer")]);
    let (client, connection) =
        tokio_postgres::connect(&url, tokio_postgres_rustls::MakeRustlsConnect::new(config)).await.expect("observer");
    tokio::spawn(connection);
    client
}

/// The server's connections named `application_name`: whether each uses TLS, and its
/// last statement.
async fn connections(observer: &tokio_postgres::Client, application_name: &str) -> Vec<(bool, String)> {
    observer
        .query(
            "SELECT s.ssl, a.query FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = $1",
            &[&application_name],
        )
        .await
        .expect("pg_stat_ssl")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Waits until the server shows `count` LISTEN connections named `application_name`
/// (a store's listener connects in the background), then returns all its connections.
async fn connections_with_listeners(
    observer: &tokio_postgres::Client,
    application_name: &str,
    count: usize,
) -> Vec<(bool, String)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let found = connections(observer, application_name).await;
        let listeners = found.iter().filter(|(_, query)| query.starts_with("LISTEN")).count();
        if listeners >= count || tokio::time::Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const CHAIN: Orchestration<u32, u32> = Orchestration::new("TlsChain");
const ADD_ONE: Activity<u32, u32, Never> = Activity::new("TlsAddOne");

async fn chain(ctx: OrchestrationContext, start: u32) -> Result<u32, OrchestrationError> {
    let mut value = start;
    for _ in 0..3 {
        value = ctx.call(ADD_ONE, &value).await?;
    }
    Ok(value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_runs_a_workload_with_every_connection_encrypted() {
    let Some(server) = server("verify_full_runs_a_workload_with_every_connection_encrypted") else { return };
    let schema = fresh_name("keel_tls");
    let application_name = fresh_name("keel-tls");
    let url = with(
        &server.url,
        &[
            ("sslmode", "verify-full"),
            ("sslrootcert", &server.ca),
            ("schema", &schema),
            ("application_name", &application_name),
        ],
    );
    let worker_store: Arc<dyn Store> = Arc::new(PostgresStore::connect(&url).await.expect("the worker's store opens"));
    let client_store = PostgresStore::connect(&url).await.expect("the client's store opens");
    let client_store: Arc<dyn Store> = Arc::new(client_store);

    // The worker polls so rarely that only the notifications of the client's store, on
    // the worker store's LISTEN connection, can bring it the work in time.
    let options = keel::WorkerOptions { idle_poll: Duration::from_secs(600), ..keel::WorkerOptions::default() };
    let worker = keel::Worker::builder(worker_store.clone())
        .options(options)
        .orchestration(CHAIN, chain)
        .activity(ADD_ONE, |_context: ActivityContext, value: u32| async move { Ok::<u32, Never>(value + 1) })
        .build()
        .start();
    let client = Client::new(client_store.clone());
    let mut instances = Vec::new();
    for start in 0..8u32 {
        instances.push((start, client.start(CHAIN, &start).await.expect("started")));
    }
    for (start, instance) in instances {
        let outcome = instance.wait(Duration::from_secs(30)).await.expect("the instance ends in time");
        assert_eq!(outcome, Outcome::Completed(start + 3), "instance {}", instance.id());
    }

    let observer = observer(&server).await;
    let seen = connections_with_listeners(&observer, &application_name, 2).await;
    let listeners = seen.iter().filter(|(_, query)| query.starts_with("LISTEN")).count();
    assert_eq!(listeners, 2, "each store listens on a connection of its own: {seen:?}");
    assert!(seen.len() >= 4, "pool connections besides the listeners: {seen:?}");
    assert!(seen.iter().all(|(ssl, _)| *ssl), "every connection is encrypted: {seen:?}");

    worker.shutdown(Duration::from_secs(10)).await;
    drop((client, client_store, worker_store));
    let store = PostgresStore::connect(&url).await.expect("the hub reopens");
    store.delete_task_hub().await.expect("the hub is deleted");
}

/// The refusal of `url`: it must not open, with a non-retryable error that says why.
async fn refusal(url: &str) -> String {
    let error = PostgresStore::connect(url).await.expect_err("the store must not open");
    assert!(!error.is_retryable(), "a refused certificate is configuration, not a passing failure: {error}");
    assert!(matches!(error, Error::Backend { .. }), "{error:?}");
    error.to_string()
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let Some(server) = server("a_certificate_from_another_ca_is_refused") else { return };
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = with(&server.url, &[("sslmode", mode), ("sslrootcert", &server.other_ca)]);
        let error = refusal(&url).await;
        assert!(error.contains("the server's TLS certificate was refused"), "{mode}: {error}");
        assert!(error.contains(&format!("sslmode={mode} sslrootcert={}", server.other_ca)), "{mode}: {error}");
        assert!(error.contains("UnknownIssuer (no CA that these settings trust signed it)"), "{mode}: {error}");
    }
}

#[tokio::test]
async fn verify_full_checks_the_host_name_and_verify_ca_does_not() {
    let Some(server) = server("verify_full_checks_the_host_name_and_verify_ca_does_not") else { return };
    let elsewhere = with_host_name(&server.url, "not-the-server.invalid");
    let error = refusal(&with(&elsewhere, &[("sslmode", "verify-full"), ("sslrootcert", &server.ca)])).await;
    assert!(error.contains("certificate not valid for name \"not-the-server.invalid\""), "{error}");

    for (url, mode) in [(&elsewhere, "verify-ca"), (&with_host_name(&server.url, "localhost"), "verify-full")] {
        let schema = fresh_name("keel_tls");
        let url = with(url, &[("sslmode", mode), ("sslrootcert", &server.ca), ("schema", &schema)]);
        let store = PostgresStore::connect(&url).await.unwrap_or_else(|error| panic!("{url}: {error}"));
        store.delete_task_hub().await.expect("the hub is deleted");
    }
}

#[tokio::test]
async fn require_and_prefer_encrypt_without_a_ca_and_disable_does_not() {
    let Some(server) = server("require_and_prefer_encrypt_without_a_ca_and_disable_does_not") else { return };
    let observer = observer(&server).await;
    for mode in [Some("require"), None] {
        let schema = fresh_name("keel_tls");
        let application_name = fresh_name("keel-tls");
        let mut parameters = vec![("schema", schema.as_str()), ("application_name", application_name.as_str())];
        parameters.extend(mode.map(|mode| ("sslmode", mode)));
        let store = PostgresStore::connect(&with(&server.url, &parameters)).await.expect("the store opens");
        let client = Client::new(Arc::new(store));
        assert!(client.get_status("nobody").await.expect("a query").is_none());
        let seen = connections_with_listeners(&observer, &application_name, 1).await;
        assert!(seen.len() >= 2 && seen.iter().all(|(ssl, _)| *ssl), "{mode:?}: {seen:?}");
        let store = PostgresStore::connect(&with(&server.url, &parameters)).await.expect("reopen");
        store.delete_task_hub().await.expect("the hub is deleted");
    }
    let plaintext = with(&server.url, &[("sslmode", "disable")]);
    let error = PostgresStore::connect(&plaintext).await.expect_err("this server takes TLS only").to_string();
    assert!(error.contains("no encryption"), "the server refused a plaintext connection: {error}");
}

#[tokio::test]
async fn an_unusable_ca_file_fails_the_open() {
    // No server needed: the file is read before anything connects.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let missing = dir.path().join("missing.pem");
    let not_pem = dir.path().join("ca.txt");
    std::fs::write(&not_pem, "not a certificate\n").expect("written");
    for (path, expected) in [(&missing, "cannot be read"), (&not_pem, "holds no certificate")] {
        let path = path.to_str().expect("a UTF-8 path");
        let url = with("postgres://keel@127.0.0.1:1/db", &[("sslmode", "verify-full"), ("sslrootcert", path)]);
        let error = PostgresStore::connect(&url).await.expect_err("refused");
        assert!(matches!(error, Error::Invalid(_)), "{error:?}");
        let error = error.to_string();
        assert!(error.contains(expected) && error.contains(path), "{error}");
    }
    let unknown = PostgresStore::connect("postgres://keel@127.0.0.1:1/db?sslmode=verify").await.expect_err("refused");
    assert!(matches!(unknown, Error::Invalid(_)), "{unknown:?}");
    assert_eq!(
        keel_postgres::PostgresOptions::from_url("postgres://keel@127.0.0.1:1/db").expect("a URL").ssl_mode(),
        SslMode::Prefer,
        "the default"
    );
}
