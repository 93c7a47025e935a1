//! The one fixture of the emulator tests: an in-process emulator on a free loopback port and, unless a test
//! needs none, a producer connected to it, so that a test is its assertions.
//!
//! Dropping the fixture stops both: the producer closed, then the emulator shut down, by a task on the test's
//! runtime (at the end of a test the runtime ends too, taking their tasks and sockets with it). `shutdown`
//! does the same and waits for it, for a test whose check comes after the stop.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use eventhub_emulator::{Emulator, EmulatorConfig, Faults, decode_stored_event};
use eventhub_producer::{Endpoint, Receipt, TlsOptions};
use eventhub_wire::message::AmqpMessage;
use fe2o3_amqp::Sender;
use fe2o3_amqp::connection::ConnectionHandle;
use futures_util::future::join_all;

use super::{
    Client, Credential, Event, Producer, ProducerConfig, SendError, TIMEOUT, TestPki, Transport,
    body_text, config, endpoint, sas_token, start_with,
};

/// The producer configuration of the tests: short backoffs, a send timeout no test reaches.
pub fn test_producer_config() -> ProducerConfig {
    ProducerConfig {
        send_timeout: Duration::from_secs(20),
        retry_initial_backoff: Duration::from_millis(20),
        retry_max_backoff: Duration::from_millis(200),
        ..ProducerConfig::default()
    }
}

/// How a producer reaches the fixture's emulator.
#[derive(Clone, Debug)]
pub enum Connect {
    /// The emulator's own connection string (its SAS key), plain AMQP.
    Key,
    /// The emulator's connection string with another key, which the emulator refuses.
    WrongKey(&'static str),
    /// A `SharedAccessSignature=` connection string: a token for this entity path, valid this long.
    Signature(&'static str, Duration),
    /// This credential over this transport to `localhost`, trusting the fixture's CA when it has one.
    Credential(Transport, Credential),
}

/// The emulator's SAS key as a credential, tokens valid ten minutes.
pub fn shared_key() -> Credential {
    Credential::SharedKey {
        name: "RootManageSharedAccessKey".into(),
        key: "SAS_KEY_VALUE".into(),
        token_lifetime: Duration::from_secs(600),
    }
}

/// A fault to arm once the emulator runs.
type ArmFault = Box<dyn FnOnce(&Faults)>;

/// Sets up a [`Fixture`]: the emulator's configuration, faults armed before anything connects, and the
/// producer's configuration and way in.
#[must_use]
pub struct FixtureBuilder {
    emulator: EmulatorConfig,
    faults: Vec<ArmFault>,
    producer: Option<(ProducerConfig, Connect)>,
    pki: Option<Arc<TestPki>>,
}

impl FixtureBuilder {
    /// Edits the emulator's configuration (limits, max message size, latency, JWTs, ...).
    pub fn emulator(mut self, edit: impl FnOnce(&mut EmulatorConfig)) -> Self {
        edit(&mut self.emulator);
        self
    }

    /// Arms faults once the emulator runs, before the producer (if any) connects.
    pub fn faults(mut self, arm: impl FnOnce(&Faults) + 'static) -> Self {
        self.faults.push(Box::new(arm));
        self
    }

    /// Edits the producer's configuration (starting from [`test_producer_config`]); nothing without a producer.
    pub fn producer(mut self, edit: impl FnOnce(&mut ProducerConfig)) -> Self {
        if let Some((config, _)) = &mut self.producer {
            edit(config);
        }
        self
    }

    /// How the producer reaches the emulator (its connection string by default); nothing without a producer.
    pub fn connect(mut self, how: Connect) -> Self {
        if let Some((_, connect)) = &mut self.producer {
            *connect = how;
        }
        self
    }

    /// No producer: the test drives the emulator with raw AMQP clients.
    pub fn without_producer(mut self) -> Self {
        self.producer = None;
        self
    }

    /// AMQPS and WebSocket listeners too, with a `localhost` certificate `pki`'s CA signed; producers of the
    /// fixture trust that CA.
    pub fn tls(mut self, pki: &Arc<TestPki>) -> Self {
        self.emulator.tls = Some(pki.tls_config());
        self.emulator.tls_listen = super::loopback();
        self.emulator.websocket_listen = super::loopback();
        self.pki = Some(Arc::clone(pki));
        self
    }

    /// Starts the emulator, arms the faults, then connects the producer.
    pub async fn start(self) -> Fixture {
        let partitions = self
            .emulator
            .event_hubs
            .iter()
            .map(|hub| (hub.name.clone(), hub.partitions as usize))
            .collect();
        let emulator = start_with(self.emulator).await;
        for arm in self.faults {
            arm(emulator.faults());
        }
        let mut fixture = Fixture {
            emulator: Some(emulator),
            producer: None,
            producer_config: test_producer_config(),
            partitions,
            pki: self.pki,
        };
        if let Some((config, connect)) = self.producer {
            fixture.producer_config = config;
            fixture.producer = Some(fixture.connect(connect));
        }
        fixture
    }
}

/// An in-process emulator on a free loopback port and, unless built without, a producer connected to it.
/// It derefs to the [`Emulator`] (faults, stored events, addresses).
pub struct Fixture {
    /// `None` once stopped.
    emulator: Option<Emulator>,
    producer: Option<Producer>,
    producer_config: ProducerConfig,
    partitions: BTreeMap<String, usize>,
    pki: Option<Arc<TestPki>>,
}

impl Fixture {
    /// A fixture of these hubs (`NAME:PARTITIONS`) to set up further.
    pub fn builder(hubs: &[&str]) -> FixtureBuilder {
        FixtureBuilder {
            emulator: config(hubs),
            faults: Vec::new(),
            producer: Some((test_producer_config(), Connect::Key)),
            pki: None,
        }
    }

    /// An emulator with these hubs and a producer of [`test_producer_config`] on its connection string.
    pub async fn start(hubs: &[&str]) -> Self {
        Self::builder(hubs).start().await
    }

    /// An emulator with these hubs, no producer.
    pub async fn emulator(hubs: &[&str]) -> Self {
        Self::builder(hubs).without_producer().start().await
    }

    /// The fixture's producer.
    pub fn producer(&self) -> &Producer {
        self.producer
            .as_ref()
            .expect("the fixture was built with a producer")
    }

    /// Another producer of the fixture's configuration, connected as `how` says.
    pub fn connect(&self, how: Connect) -> Producer {
        let config = self.producer_config.clone();
        let producer = match how {
            Connect::Key => Producer::from_connection_string(
                &self.connection_string(),
                false,
                Default::default(),
                config,
            ),
            Connect::WrongKey(key) => Producer::from_connection_string(
                &self.connection_string().replace("SAS_KEY_VALUE", key),
                false,
                Default::default(),
                config,
            ),
            Connect::Signature(path, valid_for) => Producer::from_connection_string(
                &format!(
                    "Endpoint=sb://localhost:{};SharedAccessSignature={};UseDevelopmentEmulator=true",
                    self.local_addr().port(),
                    sas_token(path, valid_for)
                ),
                false,
                Default::default(),
                config,
            ),
            Connect::Credential(transport, credential) => {
                Producer::new(self.endpoint(transport), credential, self.tls(), config)
            }
        };
        producer.expect("valid producer settings")
    }

    /// Where the emulator listens for this transport, as `localhost`.
    pub fn endpoint(&self, transport: Transport) -> Endpoint {
        endpoint(self, transport)
    }

    /// TLS options trusting the fixture's CA, if it has one.
    pub fn tls(&self) -> TlsOptions {
        self.pki.as_deref().map(super::trusting).unwrap_or_default()
    }

    /// Sends `count` events (the `i`th made by `event(i)`) concurrently through the fixture's producer; their
    /// outcomes in order.
    pub async fn send_many(
        &self,
        hub: &str,
        count: usize,
        event: impl Fn(usize) -> Event,
    ) -> Vec<Result<Receipt, SendError>> {
        send_many(self.producer(), hub, count, event).await
    }

    /// Every event stored in a hub, partition by partition, with its partition id.
    pub fn stored(&self, hub: &str) -> Vec<(String, AmqpMessage)> {
        super::stored_events(self, hub, self.partitions[hub])
    }

    /// The bodies of every event stored in a hub, partition by partition.
    pub fn stored_bodies(&self, hub: &str) -> Vec<String> {
        self.stored(hub)
            .iter()
            .map(|(_, message)| body_text(message))
            .collect()
    }

    /// The bodies of the events stored in one partition, oldest first.
    pub fn partition_bodies(&self, hub: &str, partition: &str) -> Vec<String> {
        self.partition_events(hub, partition)
            .expect("the partition exists")
            .iter()
            .map(|stored| body_text(&decode_stored_event(stored).expect("decodes")))
            .collect()
    }

    /// How many events one partition holds.
    pub fn stored_count(&self, hub: &str, partition: &str) -> usize {
        self.partition_events(hub, partition)
            .expect("the partition exists")
            .len()
    }

    /// A raw AMQP client on a new connection, holding a one-minute token for `path` (`eh1`, or `` for all).
    pub async fn client(&self, path: &str) -> Client {
        let mut client = Client::connect(self).await.expect("the client connects");
        client.authorize(path, Duration::from_secs(60)).await;
        client
    }

    /// A raw AMQP client authorized for hub `eh1` and a sender it attached to `address`.
    pub async fn sender(&self, address: &str) -> (Client, Sender) {
        let mut client = self.client("eh1").await;
        let sender = client.sender(address).await.expect("the sender attaches");
        (client, sender)
    }

    /// A plain AMQP connection with nothing on it (no session, no token), as `container_id`.
    pub async fn bare_connection(&self, container_id: &str) -> ConnectionHandle<()> {
        let address = format!("amqp://{}", self.local_addr());
        tokio::time::timeout(
            TIMEOUT,
            fe2o3_amqp::Connection::open(container_id, address.as_str()),
        )
        .await
        .expect("opened in time")
        .expect("the connection opens")
    }

    /// Closes the producer (flushing what it holds), then shuts the emulator down within `grace`.
    pub async fn shutdown(mut self, grace: Duration) {
        stop(self.producer.take(), self.emulator.take(), grace).await;
    }
}

/// Closes the producer, then shuts the emulator down within `grace`.
async fn stop(producer: Option<Producer>, emulator: Option<Emulator>, grace: Duration) {
    if let Some(producer) = producer {
        producer.close().await;
    }
    if let Some(emulator) = emulator {
        emulator.shutdown(grace).await;
    }
}

impl Deref for Fixture {
    type Target = Emulator;

    fn deref(&self) -> &Emulator {
        self.emulator
            .as_ref()
            .expect("the emulator runs until the fixture stops")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Stopping awaits; outside a runtime there is nothing left running to stop.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(stop(self.producer.take(), self.emulator.take(), TIMEOUT));
        }
    }
}

/// Sends `count` events (the `i`th made by `event(i)`) concurrently; their outcomes in order.
pub async fn send_many(
    producer: &Producer,
    hub: &str,
    count: usize,
    event: impl Fn(usize) -> Event,
) -> Vec<Result<Receipt, SendError>> {
    join_all((0..count).map(|i| producer.send(hub, event(i)))).await
}

/// Asserts every outcome is a success, showing the first failure otherwise.
#[track_caller]
pub fn assert_all_ok<T: std::fmt::Debug, E: std::fmt::Debug>(outcomes: &[Result<T, E>]) {
    assert!(
        outcomes.iter().all(Result::is_ok),
        "{:?}",
        outcomes.iter().find(|outcome| outcome.is_err())
    );
}

/// Sorted copies of `items`, to compare stored events with sent ones whatever their order.
pub fn sorted<T: Ord>(mut items: Vec<T>) -> Vec<T> {
    items.sort();
    items
}

/// The deadline `TIMEOUT * 2` from now, for enqueued events.
pub fn enqueue_deadline() -> std::time::Instant {
    std::time::Instant::now() + TIMEOUT * 2
}
