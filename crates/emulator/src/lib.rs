//! A local Azure Event Hubs over plain AMQP, AMQPS and AMQP over WebSockets: CBS, sending, batches, partition logs, consumers, management
//! and injected faults; the official SDKs cannot tell it from the service. Start one with [`Emulator::start`].

#![doc = ""]
#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod cbs;
mod codec;
mod config;
mod connection;
mod consume;
mod faults;
mod filter;
mod framing;
/// Entry points into the decoders of client bytes, for the fuzz targets in `fuzz/` (not an API).
#[doc(hidden)]
pub mod fuzzing;
mod ingest;
mod management;
mod namespace;
mod node;
mod partition_log;
mod readers;
mod sasl;
mod tls;
mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::acceptor::{ConnectionAcceptor, LinkAcceptor, SupportedReceiverSettleModes};
use fe2o3_amqp_types::definitions::ReceiverSettleMode;
use futures_util::FutureExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info};

pub use self::config::{
    ConfigError, EmulatorConfig, HubConfig, LimitsConfig, PemSource, TlsConfig,
};
use self::connection::{Admissions, ConnectionSlot, Shared};
pub use self::faults::{Faults, FaultsSnapshot};
use self::namespace::{Namespace, now_ms};
pub use self::partition_log::{PartitionProperties, StoredEvent};
use self::sasl::EventHubsSasl;

/// Why the emulator could not start, or a query about it failed.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why binding failed.
        source: std::io::Error,
    },
    /// The namespace has no such hub.
    #[error("no event hub named {0:?}")]
    UnknownHub(String),
    /// The hub has no such partition.
    #[error("event hub {hub:?} has no partition {partition:?}")]
    UnknownPartition {
        /// The hub.
        hub: String,
        /// The partition id asked for.
        partition: String,
    },
}

/// A running emulator. Dropping it leaves it running until the runtime ends; call [`Emulator::shutdown`].
#[derive(Debug)]
pub struct Emulator {
    local_addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    websocket_addr: Option<SocketAddr>,
    websocket_tls: bool,
    shared: Arc<Shared>,
    host: String,
    key_name: String,
    key: String,
}

impl Emulator {
    /// Validates the configuration, binds the listener (port 0 picks a free one) and starts accepting.
    pub async fn start(config: EmulatorConfig) -> Result<Self, EmulatorError> {
        config.validate()?;
        let websocket_tls = config.tls.is_some();
        let tls_acceptor = match &config.tls {
            Some(tls) => Some(tokio_rustls::TlsAcceptor::from(tls::server_config(tls)?)),
            None => None,
        };
        let (listener, local_addr) = bind(config.listen).await?;
        let tls_listener = match config.tls_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let websocket_listener = match config.websocket_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let container_id = format!("eventhub-gateway-emulator-{}", uuid::Uuid::new_v4());
        let shared = Arc::new(Shared {
            namespace: Namespace::new(&config, now_ms()),
            faults: Arc::new(Faults::default()),
            latency: config.latency,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            sasl_acceptor: ConnectionAcceptor::builder()
                .container_id(container_id.clone())
                .sasl_acceptor(EventHubsSasl::new(&config.key_name, &config.key))
                .build(),
            plain_acceptor: ConnectionAcceptor::builder()
                .container_id(container_id)
                .build(),
            // As the receiver the emulator settles first: every disposition it sends is final, whatever
            // mode the client proposed, so no delivery waits on a second settlement round trip.
            link_acceptor: LinkAcceptor::builder()
                .max_message_size(config.max_message_size)
                .supported_receiver_settle_modes(SupportedReceiverSettleModes::First)
                .fallback_receiver_settle_mode(ReceiverSettleMode::First)
                .build(),
            limits: config.limits.clone(),
            admissions: Arc::new(Admissions::default()),
        });
        shared.tasks.spawn(accept_connections(
            listener,
            Arc::clone(&shared),
            "amqp",
            connection::serve_stream::<TcpStream>,
        ));
        let tls_addr = match (tls_listener, &tls_acceptor) {
            (Some((listener, addr)), Some(acceptor)) => {
                let acceptor = acceptor.clone();
                shared.tasks.spawn(accept_connections(
                    listener,
                    Arc::clone(&shared),
                    "amqps",
                    move |stream, shared, slot| tls::serve(stream, acceptor.clone(), shared, slot),
                ));
                info!(%addr, "emulator listening for AMQPS");
                Some(addr)
            }
            // validate() refuses tls_listen without tls.
            _ => None,
        };
        let websocket_addr = websocket_listener.map(|(listener, addr)| {
            shared.tasks.spawn(accept_connections(
                listener,
                Arc::clone(&shared),
                "websockets",
                move |stream, shared, slot| {
                    websocket::serve(stream, tls_acceptor.clone(), shared, slot)
                },
            ));
            info!(%addr, path = websocket::WEBSOCKET_PATH, "emulator listening for AMQP over WebSockets");
            addr
        });
        info!(%local_addr, hubs = config.event_hubs.len(), "emulator listening");
        Ok(Self {
            local_addr,
            tls_addr,
            websocket_addr,
            websocket_tls,
            shared,
            host: config.host,
            key_name: config.key_name,
            key: config.key,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The AMQPS address, when a TLS listener was configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// The AMQP-over-WebSockets address (wss with a certificate, ws without), when one was configured.
    pub fn websocket_addr(&self) -> Option<SocketAddr> {
        self.websocket_addr
    }

    /// Whether the WebSocket listener speaks TLS (wss).
    pub fn websocket_uses_tls(&self) -> bool {
        self.websocket_tls
    }

    /// The connection string clients use (`UseDevelopmentEmulator=true`, plain AMQP on the real port).
    pub fn connection_string(&self) -> String {
        format!(
            "Endpoint=sb://{}:{};SharedAccessKeyName={};SharedAccessKey={};UseDevelopmentEmulator=true;",
            self.host,
            self.local_addr.port(),
            self.key_name,
            self.key
        )
    }

    /// The faults to inject; they apply to every connection at once.
    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// The same faults as [`Emulator::faults`], as a handle that outlives borrows of the emulator (for a task
    /// that injects them while the emulator runs, such as a control listener).
    pub fn shared_faults(&self) -> Arc<Faults> {
        Arc::clone(&self.shared.faults)
    }

    /// Every event a partition retains, oldest first: what a consumer reading from the start would get.
    pub fn partition_events(
        &self,
        hub: &str,
        partition: &str,
    ) -> Result<Vec<StoredEvent>, EmulatorError> {
        let log = self.partition_log(hub, partition)?;
        let mut next = i64::MIN;
        let mut events = Vec::new();
        loop {
            let chunk = log.read(&mut next, 4096);
            if chunk.is_empty() {
                return Ok(events);
            }
            events.extend(chunk);
        }
    }

    /// What `$management` reports of a partition.
    pub fn partition_properties(
        &self,
        hub: &str,
        partition: &str,
    ) -> Result<PartitionProperties, EmulatorError> {
        Ok(self.partition_log(hub, partition)?.properties())
    }

    /// Closes the listeners and every connection, and waits (at most `grace`) for their tasks to end.
    pub async fn shutdown(self, grace: Duration) {
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
        if tokio::time::timeout(grace, self.shared.tasks.wait())
            .await
            .is_err()
        {
            debug!("emulator tasks still running after the shutdown grace period");
        }
    }

    fn partition_log(
        &self,
        hub: &str,
        partition: &str,
    ) -> Result<&partition_log::PartitionLog, EmulatorError> {
        let found = self
            .shared
            .namespace
            .hub(hub)
            .ok_or_else(|| EmulatorError::UnknownHub(hub.into()))?;
        let index =
            found
                .partition_index(partition)
                .ok_or_else(|| EmulatorError::UnknownPartition {
                    hub: hub.into(),
                    partition: partition.into(),
                })?;
        Ok(found.partition(index))
    }
}

/// Decodes a stored event into the AMQP message a consumer would receive (annotations stamped).
pub fn decode_stored_event(
    event: &StoredEvent,
) -> Result<
    fe2o3_amqp_types::messaging::Message<fe2o3_amqp_types::messaging::Body<serde_amqp::Value>>,
    serde_amqp::Error,
> {
    codec::stamp_for_delivery(event)
}

/// Binds a listener; the address returned is the real one (port 0 resolved).
async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), EmulatorError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| EmulatorError::Bind { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| EmulatorError::Bind { addr, source })?;
    Ok((listener, local_addr))
}

/// The first pause after a failed accept; it doubles while accepts keep failing, up to [`MAX_ACCEPT_BACKOFF`].
const FIRST_ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// The longest pause between failed accepts.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts connections until shutdown and serves each (TCP_NODELAY set) as a tracked task; `serve` is what the
/// listener's transport does with the stream: AMQP at once, or a TLS handshake or WebSocket upgrade first.
/// A connection over the caps is served only to be refused; a panic while serving one ends that connection
/// alone, logged in one line.
async fn accept_connections<F, Fut>(
    listener: TcpListener,
    shared: Arc<Shared>,
    transport: &'static str,
    serve: F,
) where
    F: Fn(TcpStream, Arc<Shared>, ConnectionSlot) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = FIRST_ACCEPT_BACKOFF;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    backoff = FIRST_ACCEPT_BACKOFF;
                    debug!(%peer, transport, "connection accepted");
                    let Some(slot) = shared.admissions.admit(peer.ip(), &shared.limits) else {
                        continue;
                    };
                    if let Err(err) = stream.set_nodelay(true) {
                        debug!(%err, "cannot set TCP_NODELAY");
                    }
                    let serving = std::panic::AssertUnwindSafe(serve(stream, Arc::clone(&shared), slot));
                    shared.tasks.spawn(async move {
                        if let Err(panic) = serving.catch_unwind().await {
                            let reason = panic
                                .downcast_ref::<&str>()
                                .map(|s| (*s).to_owned())
                                .or_else(|| panic.downcast_ref::<String>().cloned())
                                .unwrap_or_default();
                            error!(%peer, transport, %reason, "serving a connection panicked; it is closed");
                        }
                    });
                }
                Err(err) => {
                    // Out of file descriptors and the like: back off (doubling while it lasts) instead of
                    // spinning; waiting connections stay in the kernel's backlog meanwhile.
                    debug!(%err, ?backoff, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                }
            },
            () = shared.shutdown.cancelled() => return,
        }
    }
}
