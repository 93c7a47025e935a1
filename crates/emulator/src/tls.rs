//! The emulator's TLS: the server identity (rustls on aws-lc) and the AMQPS listener, which starts TLS
//! directly on the TCP stream ("alternative TLS establishment", as Event Hubs on 5671 does).

use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::debug;

use super::config::{ConfigError, TlsConfig};
use super::connection::{self, ConnectionSlot, Shared};

/// The rustls server configuration for a certificate chain and key; errors name `tls.cert` or `tls.key`.
pub(crate) fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, ConfigError> {
    let invalid = |field: &str, problem: String| ConfigError::Invalid {
        field: field.into(),
        problem,
    };
    let cert_pem = tls
        .cert
        .read()
        .map_err(|err| invalid("tls.cert", format!("cannot read: {err}")))?;
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| invalid("tls.cert", format!("not PEM certificates: {err}")))?;
    if chain.is_empty() {
        return Err(invalid("tls.cert", "holds no certificate".into()));
    }
    let key_pem = tls
        .key
        .read()
        .map_err(|err| invalid("tls.key", format!("cannot read: {err}")))?;
    // The parse error is not shown: it could quote part of the key.
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| {
        invalid(
            "tls.key",
            "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)".into(),
        )
    })?;
    // The provider is named rather than taken from the process default, so a second provider linked
    // elsewhere can never be picked.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| invalid("tls", err.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|err| invalid("tls.key", format!("does not fit the certificate: {err}")))?;
    Ok(Arc::new(config))
}

/// The TLS handshake of an accepted connection, bounded by the handshake timeout and cut short by shutdown;
/// `None` (logged) when it fails.
pub(crate) async fn handshake(
    stream: TcpStream,
    acceptor: &TlsAcceptor,
    shared: &Shared,
) -> Option<TlsStream<TcpStream>> {
    // A client that never finishes its handshake is dropped, and shutdown does not wait for it.
    let handshake_timeout = shared.limits.handshake_timeout;
    let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(stream));
    tokio::select! {
        done = handshake => match done {
            Ok(Ok(tls_stream)) => Some(tls_stream),
            Ok(Err(err)) => {
                debug!(%err, "TLS handshake failed");
                None
            }
            Err(_) => {
                debug!("no TLS handshake within {handshake_timeout:?}; connection dropped");
                None
            }
        },
        () = shared.shutdown.cancelled() => None,
    }
}

/// Serves one AMQPS connection: TLS handshake, then the same serving as plain AMQP.
pub(crate) async fn serve(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    slot: ConnectionSlot,
) {
    if let Some(tls_stream) = handshake(stream, &acceptor, &shared).await {
        connection::serve_stream(tls_stream, shared, slot).await;
    }
}
