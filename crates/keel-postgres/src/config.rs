//! Where the task hub is: the connection URL, the schema that holds the hub, the size
//! of the connection pool, TLS.
//!
//! `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?schema=NAME&pool_size=N&...]`
//! (`postgresql://` works too). `schema` (default [`DEFAULT_SCHEMA`]) names the task
//! hub: one database holds as many hubs as it has schemas. `pool_size` (default
//! [`DEFAULT_POOL_SIZE`]) caps the connections of one store; the notification listener
//! takes one more. `sslmode` (default `prefer`) and `sslrootcert` say how connections
//! are encrypted and the server's certificate checked, as in libpq (see [`SslMode`]
//! and the `tls` module). Every other parameter is PostgreSQL's own
//! (`connect_timeout`, `application_name`, `options`, `sslnegotiation`, …).

use std::str::FromStr;
use std::time::Duration;

use keel_store::Error;

use crate::pool::Endpoint;
use crate::tls::{SslMode, TlsOptions};

/// The schema (task hub) used when the URL names none.
pub const DEFAULT_SCHEMA: &str = "keel";

/// Connections per store when the URL does not say.
pub const DEFAULT_POOL_SIZE: usize = 8;

/// The most connections one store may open.
const MAX_POOL_SIZE: usize = 256;

/// PostgreSQL's limit on identifiers, in bytes.
const MAX_IDENTIFIER_BYTES: usize = 63;

/// How long connecting may take when the URL does not say.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach a PostgreSQL task hub.
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    pub(crate) connection: tokio_postgres::Config,
    pub(crate) schema: String,
    pub(crate) pool_size: usize,
    pub(crate) tls: TlsOptions,
}

impl PostgresOptions {
    /// Reads `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?schema=NAME&pool_size=N&…]`
    /// (or `postgresql://`). `schema` names the task hub (default [`DEFAULT_SCHEMA`]);
    /// `pool_size` caps the store's connections (default [`DEFAULT_POOL_SIZE`]; the
    /// notification listener takes one more); `sslmode` is one of [`SslMode`]'s
    /// (`disable`, `prefer` — the default —, `require`, `verify-ca`, `verify-full`) and
    /// `sslrootcert` a PEM file of the CA certificates that `verify-ca`/`verify-full`
    /// trust (without it, or with `system`, the system's trusted roots); any other
    /// parameter is PostgreSQL's own (`connect_timeout`, `application_name`, `options`,
    /// …). An unknown `sslmode` is an error here; the CA file is read when the store
    /// opens. The password never appears in errors.
    pub fn from_url(url: &str) -> Result<PostgresOptions, Error> {
        let invalid = |why: String| Error::Invalid(format!("store URL '{}': {why}", redact(url)));
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(invalid("a PostgreSQL URL starts with postgres:// or postgresql://".into()));
        }
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut schema = DEFAULT_SCHEMA.to_owned();
        let mut pool_size = DEFAULT_POOL_SIZE;
        let mut ssl_mode = None;
        let mut ssl_root_cert = None;
        let mut passed_on = Vec::new();
        for parameter in query.split('&').filter(|parameter| !parameter.is_empty()) {
            match parameter.split_once('=') {
                Some(("schema", value)) => schema = value.to_owned(),
                Some(("pool_size", value)) => {
                    pool_size = value
                        .parse()
                        .ok()
                        .filter(|size| (1..=MAX_POOL_SIZE).contains(size))
                        .ok_or_else(|| invalid(format!("pool_size must be 1 to {MAX_POOL_SIZE}, not '{value}'")))?;
                }
                Some(("sslmode", value)) => ssl_mode = Some(decode(value).map_err(invalid)?),
                Some(("sslrootcert", value)) => ssl_root_cert = Some(decode(value).map_err(invalid)?),
                Some((key @ ("sslcert" | "sslkey" | "sslpassword"), _)) => {
                    return Err(invalid(format!("{key}: client certificates are not supported")));
                }
                _ => passed_on.push(parameter),
            }
        }
        check_schema(&schema).map_err(invalid)?;
        let tls = TlsOptions::from_parameters(ssl_mode.as_deref(), ssl_root_cert.as_deref()).map_err(invalid)?;
        let url = if passed_on.is_empty() { base.to_owned() } else { format!("{base}?{}", passed_on.join("&")) };
        let mut connection = tokio_postgres::Config::from_str(&url).map_err(|error| invalid(error.to_string()))?;
        connection.ssl_mode(tls.driver_mode());
        Ok(PostgresOptions { connection, schema, pool_size, tls }.with_defaults())
    }

    /// The same database with another task hub (schema).
    pub fn with_schema(mut self, schema: &str) -> Result<PostgresOptions, Error> {
        check_schema(schema).map_err(Error::Invalid)?;
        self.schema = schema.to_owned();
        Ok(self)
    }

    /// The schema that holds the task hub.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The most connections the store opens (besides its notification listener).
    pub fn pool_size(&self) -> usize {
        self.pool_size
    }

    /// How the store's connections are encrypted (`sslmode`).
    pub fn ssl_mode(&self) -> SslMode {
        self.tls.mode
    }

    fn with_defaults(mut self) -> PostgresOptions {
        if self.connection.get_connect_timeout().is_none() {
            self.connection.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        if self.connection.get_application_name().is_none() {
            self.connection.application_name("keel");
        }
        self
    }

    /// The driver's configuration, with the hub's schema as the only schema searched:
    /// every statement names its tables without a schema.
    pub(crate) fn connection_config(&self) -> tokio_postgres::Config {
        let mut config = self.connection.clone();
        let search_path = format!("-c search_path={}", self.schema);
        let options = match config.get_options() {
            Some(options) if !options.trim().is_empty() => format!("{options} {search_path}"),
            _ => search_path,
        };
        config.options(options);
        config
    }

    /// How the store connects, its pool and its listener alike: the driver's
    /// configuration and the TLS connector, whose trusted roots are read now (when the
    /// store opens): a CA file that cannot be used is an error here.
    pub(crate) fn endpoint(&self) -> Result<Endpoint, Error> {
        let connector = self.tls.connector().map_err(|why| Error::Invalid(format!("store URL: {why}")))?;
        Ok(Endpoint::new(self.connection_config(), connector, self.tls.describe()))
    }
}

/// A URL parameter's value with its `%XX` escapes decoded (a CA file's path may hold
/// any character).
fn decode(value: &str) -> Result<String, String> {
    let bytes = value.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' {
            let byte = value
                .get(at + 1..at + 3)
                .filter(|hex| hex.bytes().all(|digit| digit.is_ascii_hexdigit()))
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| format!("'{value}' has a % that starts no escape (%XX)"))?;
            decoded.push(byte);
            at += 3;
        } else {
            decoded.push(bytes[at]);
            at += 1;
        }
    }
    String::from_utf8(decoded).map_err(|_| format!("'{value}' decodes to something that is not UTF-8"))
}

/// A schema name Keel accepts: lowercase ASCII letters, digits and `_`, not starting
/// with a digit, at most 63 bytes. Such a name needs no quoting anywhere.
fn check_schema(schema: &str) -> Result<(), String> {
    let mut chars = schema.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if first_ok && rest_ok && schema.len() <= MAX_IDENTIFIER_BYTES && !schema.starts_with("pg_") {
        Ok(())
    } else {
        Err(format!(
            "schema '{schema}' is not usable: use lowercase letters, digits and _ (not first), \
             at most {MAX_IDENTIFIER_BYTES} bytes, not starting with pg_"
        ))
    }
}

/// The URL without its password, for error messages.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let Some((credentials, host)) = rest.split_once('@') else { return url.to_owned() };
    match credentials.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keel_parameters_are_taken_out_and_the_rest_passed_on() {
        let options = PostgresOptions::from_url(
            "postgres://keel:secret@127.0.0.1:55432/app?schema=orders&pool_size=3&application_name=billing",
        )
        .unwrap();
        assert_eq!(options.schema(), "orders");
        assert_eq!(options.pool_size(), 3);
        assert_eq!(options.connection.get_application_name(), Some("billing"));
        assert_eq!(options.connection.get_dbname(), Some("app"));
        assert_eq!(options.connection_config().get_options(), Some("-c search_path=orders"));

        let defaults = PostgresOptions::from_url("postgresql://postgres@localhost/postgres").unwrap();
        assert_eq!(defaults.schema(), DEFAULT_SCHEMA);
        assert_eq!(defaults.pool_size(), DEFAULT_POOL_SIZE);
        assert_eq!(defaults.connection.get_application_name(), Some("keel"));
        assert_eq!(defaults.connection.get_connect_timeout(), Some(&DEFAULT_CONNECT_TIMEOUT));
    }

    #[test]
    fn tls_parameters_are_keel_s_and_the_driver_is_told_whether_tls_is_needed() {
        use tokio_postgres::config::SslMode as Driver;

        let default = PostgresOptions::from_url("postgres://u@h/d").unwrap();
        assert_eq!(default.ssl_mode(), SslMode::Prefer);
        assert_eq!(default.connection.get_ssl_mode(), Driver::Prefer);

        let plain = PostgresOptions::from_url("postgres://u@h/d?sslmode=disable").unwrap();
        assert_eq!((plain.ssl_mode(), plain.connection.get_ssl_mode()), (SslMode::Disable, Driver::Disable));

        if cfg!(feature = "tls") {
            let verified = PostgresOptions::from_url(
                "postgres://u@h/d?sslmode=verify-full&sslrootcert=/etc/keel%20certs/ca.pem&application_name=x",
            )
            .unwrap();
            assert_eq!(
                (verified.ssl_mode(), verified.connection.get_ssl_mode()),
                (SslMode::VerifyFull, Driver::Require)
            );
            assert_eq!(verified.tls.describe(), "sslmode=verify-full sslrootcert=/etc/keel certs/ca.pem");
            assert_eq!(verified.connection.get_application_name(), Some("x"));
            // The CA file is read when the store opens, not when the URL is read.
            let error = verified.endpoint().map(drop).unwrap_err().to_string();
            assert!(error.contains("sslrootcert file '/etc/keel certs/ca.pem' cannot be read"), "{error}");
        }
        assert_eq!(decode("a%2Fb%c3%a9").unwrap(), "a/bé");
        assert!(decode("%+1").is_err());
        assert!(decode("%ff").is_err());
    }

    #[test]
    fn user_options_are_kept_beside_the_search_path() {
        let options = PostgresOptions::from_url("postgres://u@h/d?options=-c%20work_mem%3D8MB").unwrap();
        let config = options.connection_config();
        let combined = config.get_options().unwrap();
        assert!(combined.ends_with("-c search_path=keel"), "{combined}");
        assert!(combined.contains("work_mem"), "{combined}");
    }

    #[test]
    fn bad_urls_and_schemas_are_refused_without_showing_the_password() {
        for url in [
            "sqlite://x.db",
            "postgres://u:hunter2@h/d?schema=Orders",
            "postgres://u:hunter2@h/d?schema=1st",
            "postgres://u:hunter2@h/d?schema=pg_catalog",
            "postgres://u:hunter2@h/d?schema=a;drop",
            "postgres://u:hunter2@h/d?pool_size=0",
            "postgres://u:hunter2@h/d?nonsense=1",
        ] {
            let error = PostgresOptions::from_url(url).expect_err(url).to_string();
            assert!(!error.contains("hunter2"), "{error}");
        }
        assert!(PostgresOptions::from_url("postgres://u@h/d").unwrap().with_schema("Bad").is_err());
        for (url, expected) in [
            ("postgres://u:hunter2@h/d?sslmode=verify", "sslmode must be disable, prefer, require"),
            ("postgres://u:hunter2@h/d?sslmode=allow", "sslmode must be disable, prefer, require"),
            ("postgres://u:hunter2@h/d?sslrootcert=system&sslmode=require", "sslrootcert=system needs"),
            ("postgres://u:hunter2@h/d?sslcert=client.pem", "client certificates are not supported"),
            ("postgres://u:hunter2@h/d?sslrootcert=%zz", "starts no escape"),
        ] {
            let error = PostgresOptions::from_url(url).expect_err(url).to_string();
            assert!(error.contains(expected) && !error.contains("hunter2"), "{error}");
        }
        assert_eq!(redact("postgres://u:pw@h/d"), "postgres://u:***@h/d");
    }
}
