//! HTTPS for the host (feature `tls`): rustls (ring) accepts each connection, then the
//! host's accept loop (`host`) serves the router on it over HTTP/1.1. [`acceptor`] also
//! serves `keel serve`'s gRPC server, so certificates are read in one place.

use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::host::TlsIdentity;

/// The rustls acceptor (ring) for `identity`, offering the application protocols `alpn`
/// (`http/1.1` for this host, `h2` for the gRPC server, which takes its acceptor from
/// here); an error says what is wrong with the certificate or key.
pub fn acceptor(identity: &TlsIdentity, alpn: &[&[u8]]) -> Result<tokio_rustls::TlsAcceptor, String> {
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&identity.certificate_pem)
        .collect::<Result<_, _>>()
        .map_err(|error| format!("the TLS certificate is not PEM: {error}"))?;
    if certificates.is_empty() {
        return Err("the TLS certificate file holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(&identity.key_pem)
        .map_err(|error| format!("the TLS key is not a PEM private key: {error}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| error.to_string())?
        .with_no_client_auth()
        .with_single_cert(certificates, key)
        .map_err(|error| format!("the TLS certificate and key do not go together: {error}"))?;
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
