//! How the producer reaches Event Hubs: plain AMQP, AMQPS (TLS on aws-lc rustls) or AMQP over WebSockets, always with TCP_NODELAY.

use std::time::Duration;

use fe2o3_amqp::Connection;
use fe2o3_amqp::connection::{ConnectionHandle, OpenError};
use fe2o3_amqp::sasl_profile::SaslProfile;
use tokio::net::TcpStream;

/// The wire under AMQP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Plain AMQP (emulators only).
    Amqp,
    /// AMQP over TLS.
    Amqps,
    /// AMQP over secure WebSockets.
    WebSockets,
}

/// Where Event Hubs listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Transport.
    pub transport: Transport,
}

/// Which certificate authorities the client trusts: the platform's/webpki roots by default; tests add their own CA.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// Extra CA certificates in PEM.
    pub extra_root_certificates_pem: Vec<String>,
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// TCP connect failed.
    #[error("cannot reach {host}:{port}: {source}")]
    Connect {
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The AMQP open (or SASL) failed.
    #[error("AMQP open failed: {0}")]
    Open(#[from] OpenError),
    /// The transport is not built in.
    #[error("transport {0:?} is not supported yet")]
    Unsupported(Transport),
}

/// The AMQP-level settings of a connection.
#[derive(Clone, Debug)]
pub struct ConnectionOptions {
    /// Our container id.
    pub container_id: String,
    /// Idle timeout announced to the peer (heartbeats at half of it).
    pub idle_timeout: Duration,
}

/// Opens an AMQP connection (SASL ANONYMOUS; tokens go over CBS) over this endpoint's transport, on a stream it
/// connected itself with TCP_NODELAY.
pub async fn open_connection(
    options: &ConnectionOptions,
    endpoint: &Endpoint,
    _tls: &TlsOptions,
) -> Result<ConnectionHandle<()>, TransportError> {
    let builder = Connection::builder()
        .container_id(options.container_id.clone())
        .hostname(endpoint.host.as_str())
        .sasl_profile(SaslProfile::Anonymous)
        .idle_time_out(u32::try_from(options.idle_timeout.as_millis()).unwrap_or(u32::MAX));
    match endpoint.transport {
        Transport::Amqp => {
            let stream = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
                .await
                .map_err(|source| TransportError::Connect {
                    host: endpoint.host.clone(),
                    port: endpoint.port,
                    source,
                })?;
            // Small transfers must not wait on Nagle's algorithm.
            let _ = stream.set_nodelay(true);
            Ok(builder.scheme("amqp").open_with_stream(stream).await?)
        }
        other => Err(TransportError::Unsupported(other)),
    }
}
