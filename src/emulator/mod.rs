//! A local Azure Event Hubs over plain AMQP: CBS, sending, batches, partition logs, consumers, management
//! and injected faults; the official SDKs cannot tell it from the service. Start one with [`Emulator::start`].

mod cbs;
mod codec;
pub mod config;
mod connection;
mod consume;
pub mod faults;
mod filter;
mod framing;
mod ingest;
mod management;
mod namespace;
mod node;
pub mod partition_log;
mod readers;
mod sasl;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::acceptor::{ConnectionAcceptor, LinkAcceptor, SupportedReceiverSettleModes};
use fe2o3_amqp_types::definitions::ReceiverSettleMode;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

pub use self::config::{ConfigError, EmulatorConfig, HubConfig};
use self::connection::Shared;
pub use self::faults::Faults;
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
    shared: Arc<Shared>,
    host: String,
    key_name: String,
    key: String,
}

impl Emulator {
    /// Validates the configuration, binds the listener (port 0 picks a free one) and starts accepting.
    pub async fn start(config: EmulatorConfig) -> Result<Self, EmulatorError> {
        config.validate()?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| EmulatorError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| EmulatorError::Bind {
                addr: config.listen,
                source,
            })?;
        let container_id = format!("eventhub-gateway-emulator-{}", uuid::Uuid::new_v4());
        let shared = Arc::new(Shared {
            namespace: Namespace::new(&config, now_ms()),
            faults: Arc::new(Faults::default()),
            latency: Duration::from_millis(config.latency_ms),
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
        });
        shared
            .tasks
            .spawn(accept_connections(listener, Arc::clone(&shared)));
        info!(%local_addr, hubs = config.event_hubs.len(), "emulator listening");
        Ok(Self {
            local_addr,
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

    /// Closes the listener and every connection, and waits (at most `grace`) for their tasks to end.
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

async fn accept_connections(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    debug!(%peer, "connection accepted");
                    shared.tasks.spawn(connection::serve(stream, Arc::clone(&shared)));
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
