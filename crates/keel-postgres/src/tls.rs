//! TLS to the database: what the URL's `sslmode` and `sslrootcert` ask for, and the
//! connector that every connection of a store uses, its pool's and its notification
//! listener's alike.
//!
//! The modes are libpq's. `disable` is plaintext; `prefer` (the default) encrypts when
//! the server offers TLS and goes on in plaintext when it does not; `require` encrypts
//! or fails. Neither checks the server's certificate, unless `sslrootcert` names a CA
//! file: then, as libpq does when it has a root certificate, the chain is checked as
//! for `verify-ca`. `verify-ca` checks that the certificate chains to a trusted root:
//! the certificates of the `sslrootcert` file (PEM), or the system's trusted roots
//! without one; `verify-full` also checks that it names the host the URL connects to
//! (`host`: a DNS name or an IP address; `hostaddr`, when given, only says where the TCP
//! connection goes). `sslrootcert=system` takes the system's roots and, as in libpq,
//! needs `verify-full` (the default with it).
//!
//! The roots are read when the store opens, so an unreadable or empty CA file fails the
//! open; a certificate the server presents and the check refuses fails the connection
//! with an error that is not retryable and names the settings.
//!
//! With the `tls` feature (default): rustls with the ring provider, through
//! `tokio-postgres-rustls` (which also gives SCRAM its channel binding). Without it every
//! connection is plaintext, `prefer` falls back to it without asking the server, and the
//! other modes are refused.

use std::fmt;
use std::path::PathBuf;

/// How a store protects its connections: the URL's `sslmode`, with libpq's meanings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    /// Plaintext (`sslmode=disable`).
    Disable,
    /// TLS when the server offers it, plaintext otherwise (`sslmode=prefer`, the
    /// default); the certificate is checked only against an `sslrootcert` file.
    #[default]
    Prefer,
    /// TLS or no connection (`sslmode=require`); the certificate is checked only against
    /// an `sslrootcert` file.
    Require,
    /// TLS with a certificate that chains to a trusted root (`sslmode=verify-ca`).
    VerifyCa,
    /// TLS with a certificate that chains to a trusted root and names the host
    /// (`sslmode=verify-full`).
    VerifyFull,
}

impl SslMode {
    /// The mode as the URL spells it (`verify-full`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(value: &str) -> Option<SslMode> {
        [SslMode::Disable, SslMode::Prefer, SslMode::Require, SslMode::VerifyCa, SslMode::VerifyFull]
            .into_iter()
            .find(|mode| mode.as_str() == value)
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the trusted roots come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Roots {
    /// The certificates of a PEM file (`sslrootcert=FILE`).
    File(PathBuf),
    /// The system's trusted roots (`sslrootcert=system`, or a `verify-*` mode without
    /// `sslrootcert`).
    System,
}

/// The TLS settings of a URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TlsOptions {
    pub(crate) mode: SslMode,
    /// `sslrootcert`, if the URL names one.
    pub(crate) root_cert: Option<Roots>,
}

/// What is checked of the server's certificate.
#[cfg_attr(not(feature = "tls"), allow(dead_code))]
#[derive(Debug, PartialEq, Eq)]
enum Check<'a> {
    Nothing,
    /// That it chains to one of these roots.
    Chain(&'a Roots),
    /// That it chains to one of these roots and names the host.
    ChainAndName(&'a Roots),
}

impl TlsOptions {
    /// Reads the URL's `sslmode` and `sslrootcert` (already percent-decoded).
    pub(crate) fn from_parameters(mode: Option<&str>, root_cert: Option<&str>) -> Result<TlsOptions, String> {
        let root_cert = match root_cert {
            None => None,
            Some("") => return Err("sslrootcert is empty: name a PEM file of CA certificates, or system".into()),
            Some("system") => Some(Roots::System),
            Some(path) => Some(Roots::File(PathBuf::from(path))),
        };
        let mode = match mode {
            Some(value) => SslMode::parse(value).ok_or_else(|| {
                format!("sslmode must be disable, prefer, require, verify-ca or verify-full, not '{value}'")
            })?,
            // libpq: the system's roots mean verify-full.
            None if root_cert == Some(Roots::System) => SslMode::VerifyFull,
            None => SslMode::default(),
        };
        if root_cert == Some(Roots::System) && mode != SslMode::VerifyFull {
            return Err(format!(
                "sslrootcert=system needs sslmode=verify-full (or no sslmode), not sslmode={mode}: \
                 the system's roots vouch for host names"
            ));
        }
        let options = TlsOptions { mode, root_cert };
        #[cfg(not(feature = "tls"))]
        if options.mode != SslMode::Disable && (options.mode != SslMode::Prefer || options.root_cert.is_some()) {
            return Err(format!(
                "{} needs TLS, and this build of keel-postgres has none (its `tls` feature is off)",
                options.describe()
            ));
        }
        Ok(options)
    }

    /// The mode the driver negotiates with: it only knows whether TLS is off, wanted or
    /// needed; the certificate checks are the connector's.
    pub(crate) fn driver_mode(&self) -> tokio_postgres::config::SslMode {
        match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
        }
    }

    /// The settings in the URL's words, for messages: `sslmode=verify-full
    /// sslrootcert=/etc/keel/ca.pem`.
    pub(crate) fn describe(&self) -> String {
        match &self.root_cert {
            None => format!("sslmode={}", self.mode),
            Some(Roots::System) => format!("sslmode={} sslrootcert=system", self.mode),
            Some(Roots::File(path)) => format!("sslmode={} sslrootcert={}", self.mode, path.display()),
        }
    }

    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    fn check(&self) -> Check<'_> {
        const SYSTEM: &Roots = &Roots::System;
        match (self.mode, &self.root_cert) {
            (SslMode::Disable, _) | (SslMode::Prefer | SslMode::Require, None) => Check::Nothing,
            (SslMode::Prefer | SslMode::Require | SslMode::VerifyCa, Some(roots)) => Check::Chain(roots),
            (SslMode::VerifyCa, None) => Check::Chain(SYSTEM),
            (SslMode::VerifyFull, roots) => Check::ChainAndName(roots.as_ref().unwrap_or(SYSTEM)),
        }
    }
}

/// What connects the driver: rustls with the checks the settings ask for.
#[cfg(feature = "tls")]
pub(crate) type Connector = tokio_postgres_rustls::MakeRustlsConnect;

/// What connects the driver: plaintext only (the `tls` feature is off).
#[cfg(not(feature = "tls"))]
pub(crate) type Connector = tokio_postgres::NoTls;

impl TlsOptions {
    /// The connector for these settings, with the trusted roots read now: an unreadable
    /// CA file, one without certificates, or a system without trusted roots is an error.
    #[cfg(feature = "tls")]
    pub(crate) fn connector(&self) -> Result<Connector, String> {
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(rustls_tls::client_config(self.check())?))
    }

    /// The connector for these settings: plaintext (the `tls` feature is off).
    #[cfg(not(feature = "tls"))]
    pub(crate) fn connector(&self) -> Result<Connector, String> {
        Ok(tokio_postgres::NoTls)
    }
}

/// Why the TLS handshake of a failed connection refused the server's certificate, if
/// that is why it failed.
#[cfg(feature = "tls")]
pub(crate) fn refused_certificate(error: &tokio_postgres::Error) -> Option<String> {
    use std::error::Error as _;
    let mut source = error.source();
    while let Some(current) = source {
        // The TLS stream reports rustls's error inside an io::Error, whose `source` skips it.
        let inner = current.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).map(|inner| inner as _);
        for candidate in [Some(current), inner].into_iter().flatten() {
            if let Some(rustls::Error::InvalidCertificate(why)) = candidate.downcast_ref::<rustls::Error>() {
                let hint = match why {
                    rustls::CertificateError::UnknownIssuer => " (no CA that these settings trust signed it)",
                    _ => "",
                };
                return Some(format!("{}{hint}", rustls::Error::InvalidCertificate(why.clone())));
            }
        }
        source = current.source();
    }
    None
}

/// Why the TLS handshake of a failed connection refused the server's certificate:
/// never, without TLS.
#[cfg(not(feature = "tls"))]
pub(crate) fn refused_certificate(_error: &tokio_postgres::Error) -> Option<String> {
    None
}

#[cfg(feature = "tls")]
mod rustls_tls {
    //! The rustls client configuration and the two certificate checks rustls does not
    //! offer as they are: none at all (`prefer`, `require`), and the chain without the
    //! name (`verify-ca`).

    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::client::WebPkiServerVerifier;
    use rustls::crypto::WebPkiSupportedAlgorithms;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

    use super::{Check, Roots};

    /// The protocol name PostgreSQL 17 expects in ALPN (libpq 17 always sends it; older
    /// servers ignore it).
    const ALPN: &[u8] = b"postgresql";

    pub(super) fn client_config(check: Check<'_>) -> Result<ClientConfig, String> {
        // The provider is named rather than taken from the process default, so that no
        // other crate's choice (or none) changes how the task hub connects.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|error| format!("TLS: {error}"))?;
        let mut config = match check {
            Check::Nothing => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate {
                    algorithms: provider.signature_verification_algorithms,
                }))
                .with_no_client_auth(),
            Check::Chain(roots) => {
                let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(root_store(roots)?), provider)
                    .build()
                    .map_err(|error| format!("TLS: {error}"))?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(verifier)))
                    .with_no_client_auth()
            }
            Check::ChainAndName(roots) => builder.with_root_certificates(root_store(roots)?).with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// The trusted roots, read now.
    fn root_store(roots: &Roots) -> Result<RootCertStore, String> {
        let mut store = RootCertStore::empty();
        match roots {
            Roots::File(path) => {
                let shown = path.display();
                let pem = std::fs::read(path)
                    .map_err(|error| format!("sslrootcert file '{shown}' cannot be read: {error}"))?;
                for (index, certificate) in CertificateDer::pem_slice_iter(&pem).enumerate() {
                    let certificate = certificate
                        .map_err(|error| format!("sslrootcert file '{shown}' is not readable as PEM: {error}"))?;
                    store.add(certificate).map_err(|error| {
                        format!("sslrootcert file '{shown}': certificate {} is not usable: {error}", index + 1)
                    })?;
                }
                if store.is_empty() {
                    return Err(format!(
                        "sslrootcert file '{shown}' holds no certificate (PEM: -----BEGIN CERTIFICATE-----)"
                    ));
                }
            }
            Roots::System => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _unusable) = store.add_parsable_certificates(found.certs);
                if added == 0 {
                    let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
                    let errors = if errors.is_empty() { String::new() } else { format!(" ({})", errors.join("; ")) };
                    return Err(format!(
                        "no trusted root certificates found on this system{errors}: install them (Debian: \
                         ca-certificates) or name a CA file with sslrootcert=FILE"
                    ));
                }
            }
        }
        Ok(store)
    }

    /// Accepts any certificate (libpq's `prefer` and `require` without a root
    /// certificate); the handshake's signatures are still checked, so the connection is
    /// encrypted to whoever holds the certificate's key.
    #[derive(Debug)]
    struct AnyCertificate {
        algorithms: WebPkiSupportedAlgorithms,
    }

    impl ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algorithms.supported_schemes()
        }
    }

    /// The chain to a trusted root, validity dates included, without the host name
    /// (`verify-ca`): webpki's check, whose name check comes last, with a wrong name
    /// forgiven.
    #[derive(Debug)]
    struct ChainOnly(Arc<WebPkiServerVerifier>);

    impl ServerCertVerifier for ChainOnly {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp_response: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                outcome => outcome,
            }
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(mode: Option<&str>, root_cert: Option<&str>) -> Result<TlsOptions, String> {
        TlsOptions::from_parameters(mode, root_cert)
    }

    #[test]
    fn modes_are_libpq_s() {
        assert_eq!(options(None, None).unwrap().mode, SslMode::Prefer, "the default");
        for mode in ["disable", "prefer", "require", "verify-ca", "verify-full"] {
            assert_eq!(options(Some(mode), None).unwrap().mode.as_str(), mode);
        }
        for bad in ["allow", "VERIFY-FULL", "verify_full", "", "on"] {
            let error = options(Some(bad), None).unwrap_err();
            assert!(error.contains("sslmode must be disable, prefer, require, verify-ca or verify-full"), "{error}");
        }
    }

    #[test]
    fn system_roots_mean_verify_full() {
        let system = options(None, Some("system")).unwrap();
        assert_eq!((system.mode, system.root_cert), (SslMode::VerifyFull, Some(Roots::System)));
        for weaker in ["disable", "prefer", "require", "verify-ca"] {
            let error = options(Some(weaker), Some("system")).unwrap_err();
            assert!(error.contains("sslrootcert=system needs sslmode=verify-full"), "{error}");
        }
        assert!(options(Some("verify-full"), Some("")).unwrap_err().contains("sslrootcert is empty"));
    }

    #[test]
    fn what_is_checked() {
        let file = Roots::File("ca.pem".into());
        let check = |mode, root_cert| {
            let options = options(Some(mode), root_cert).unwrap();
            format!("{:?}", options.check())
        };
        assert_eq!(check("disable", Some("ca.pem")), "Nothing");
        assert_eq!(check("prefer", None), "Nothing");
        assert_eq!(check("require", None), "Nothing");
        assert_eq!(check("prefer", Some("ca.pem")), format!("{:?}", Check::Chain(&file)));
        assert_eq!(check("require", Some("ca.pem")), format!("{:?}", Check::Chain(&file)));
        assert_eq!(check("verify-ca", Some("ca.pem")), format!("{:?}", Check::Chain(&file)));
        assert_eq!(check("verify-ca", None), format!("{:?}", Check::Chain(&Roots::System)));
        assert_eq!(check("verify-full", None), format!("{:?}", Check::ChainAndName(&Roots::System)));
        assert_eq!(check("verify-full", Some("ca.pem")), format!("{:?}", Check::ChainAndName(&file)));
        assert_eq!(
            options(Some("verify-full"), Some("/etc/keel/ca.pem")).unwrap().describe(),
            "sslmode=verify-full sslrootcert=/etc/keel/ca.pem"
        );
    }

    #[cfg(feature = "tls")]
    #[test]
    fn an_unusable_ca_file_is_refused_when_the_connector_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificates here\n").unwrap();
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        for (path, expected) in
            [(&missing, "cannot be read"), (&empty, "holds no certificate"), (&garbage, "certificate 1 is not usable")]
        {
            let options = options(Some("verify-full"), Some(path.to_str().unwrap())).unwrap();
            let error = options.connector().map(drop).unwrap_err();
            assert!(error.contains(expected) && error.contains(path.to_str().unwrap()), "{error}");
        }
        // Without certificate checks nothing is read.
        assert!(options(Some("require"), None).unwrap().connector().is_ok());
        assert!(options(Some("disable"), Some(missing.to_str().unwrap())).unwrap().connector().is_ok());
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn without_the_feature_only_plaintext_is_accepted() {
        assert!(options(None, None).is_ok());
        assert!(options(Some("disable"), None).is_ok());
        for mode in ["require", "verify-ca", "verify-full"] {
            assert!(options(Some(mode), None).unwrap_err().contains("`tls` feature is off"));
        }
        assert!(options(Some("prefer"), Some("ca.pem")).unwrap_err().contains("`tls` feature is off"));
    }
}
