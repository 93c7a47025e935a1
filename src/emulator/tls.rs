//! The emulator's TLS: the server identity (rustls on aws-lc) and the AMQPS listener, which starts TLS
//! directly on the TCP stream ("alternative TLS establishment", as Event Hubs on 5671 does).

use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use super::config::{ConfigError, TlsConfig};
use super::connection::{self, HANDSHAKE_TIMEOUT, Shared};

/// The rustls server configuration for a certificate chain and key; errors name `tls.cert` or `tls.key`.
pub(crate) fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, ConfigError> {
    let invalid = |field: &str, reason: String| ConfigError::Invalid {
        field: field.into(),
        reason,
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

/// Accepts AMQPS connections until shutdown: TLS handshake, then the same serving as plain AMQP.
pub(crate) async fn accept_connections(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    debug!(%peer, "TLS connection accepted");
                    shared.tasks.spawn(serve(stream, acceptor.clone(), Arc::clone(&shared)));
                }
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    debug!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = shared.shutdown.cancelled() => return,
        }
    }
}

async fn serve(stream: tokio::net::TcpStream, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    if let Err(err) = stream.set_nodelay(true) {
        debug!(%err, "cannot set TCP_NODELAY");
    }
    // A client that never finishes its handshake is dropped, and shutdown does not wait for it.
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
    let tls_stream = tokio::select! {
        done = handshake => match done {
            Ok(Ok(tls_stream)) => tls_stream,
            Ok(Err(err)) => {
                debug!(%err, "TLS handshake failed");
                return;
            }
            Err(_) => {
                debug!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}; connection dropped");
                return;
            }
        },
        () = shared.shutdown.cancelled() => return,
    };
    connection::serve_stream(tls_stream, shared).await;
}
