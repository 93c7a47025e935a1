//! The pooled AMQP producer: `Producer::send(hub, event)` answers each event with its real outcome after batching,
//! pipelining and retrying it over a pool of connections. Knows nothing of gRPC.

#![warn(missing_docs)]

mod auth;
mod batch;
mod claim;
mod config;
mod connection;
mod connection_string;
mod error;
mod event;
mod link;
mod node;
mod pool;
mod properties;
mod reply;
mod report;
mod route;
mod throttle;
mod transport;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{
    Notify, OnceCell, OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc, oneshot,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use auth::Credential;
pub use config::{ConfigError, ProducerConfig};
pub use connection::ConnectStage;
pub use connection_string::{ConnectionString, ConnectionStringError, SharedAccess};
pub use error::{AmqpCondition, ErrorClass, SendError, ServiceError};
pub use event::{Event, Routing, TraceContext};
pub use pool::PoolStats;
pub use properties::{HubProperties, PartitionProperties};
pub use reply::{Outcome, OutcomeSink};
pub use route::Receipt;
pub use transport::{
    ConnectionOptions, Endpoint, HttpProxy, NativeRoots, ProxyCredentials, TlsOptions, Transport,
    TransportError, client_config, native_roots, open_connection,
};

// The building blocks of a send, for callers that drive AMQP themselves (the benchmark's raw-ingest ceiling).
pub use batch::BatchBuilder;
pub use connection::link_address;
pub use node::NodeClient;

use auth::{RefreshPolicy, TokenCache};

use claim::Claim;
use connection::ConnectionContext;
use link::LinkSettings;
use pool::Pool;
use reply::Reply;
use route::{Pending, RouteHost, RouteKey, RouteRef, RouteSettings, SendStack, Target};
use throttle::Throttle;

use eventhub_wire::partition::partition_for_key;

/// The retry-after hint of an overload error.
const OVERLOAD_RETRY_AFTER: Duration = Duration::from_secs(1);

/// How often a new route waiting for a slot asks an idle route to close again.
const ROUTE_SLOT_ASK_AGAIN: Duration = Duration::from_millis(50);

/// Why a producer could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    /// A configuration value is out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The connection string is malformed.
    #[error(transparent)]
    ConnectionString(#[from] ConnectionStringError),
}

/// What a producer is doing now, for metrics and readiness.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProducerStats {
    /// The pool's gauges.
    pub pool: PoolStats,
    /// Encoded bytes buffered or in flight.
    pub buffered_bytes: u64,
    /// Routes with a batcher running.
    pub routes: usize,
    /// Tokens obtained, and fetches that failed.
    pub token_refreshes: u64,
    /// Token fetches that failed.
    pub token_failures: u64,
    /// Batches that waited for the rate limit toward Event Hubs.
    pub rate_limited_batches: u64,
}

/// A cheap-to-clone handle to a pooled producer.
#[derive(Clone)]
pub struct Producer {
    inner: Arc<Inner>,
}

struct Inner {
    config: ProducerConfig,
    pool: Arc<Pool>,
    stack: SendStack,
    throttle: Option<Arc<Throttle>>,
    tokens: Arc<TokenCache>,
    routes: Mutex<hashbrown::HashMap<RouteKey, mpsc::Sender<Pending>>>,
    /// One permit per open route (`max_routes`), held by the route's task.
    route_slots: Arc<Semaphore>,
    /// Asks one idle route to close early, for a new route waiting for a slot.
    route_wanted: Notify,
    route_settings: RouteSettings,
    server_address: Arc<str>,
    tasks: TaskTracker,
    buffer: Arc<Semaphore>,
    hubs: Mutex<HashMap<String, Arc<OnceCell<Arc<HubProperties>>>>>,
    limits: Mutex<hashbrown::HashMap<String, u64>>,
    closing: CancellationToken,
    stop: CancellationToken,
}

/// The endpoint a connection string points at: plain AMQP for emulators, AMQPS (or WebSockets) otherwise.
pub fn endpoint_for(connection: &ConnectionString, websockets: bool) -> Endpoint {
    let transport = if connection.use_development_emulator {
        Transport::Amqp
    } else if websockets {
        Transport::WebSockets
    } else {
        Transport::Amqps
    };
    Endpoint::direct(
        connection.host.clone(),
        connection.port.unwrap_or(transport.default_port()),
        transport,
    )
}

/// The credential a connection string carries: a key (tokens signed locally) or a fixed signature.
pub fn credential_for(connection: &ConnectionString, config: &ProducerConfig) -> Credential {
    match connection.shared_access.clone() {
        SharedAccess::Key { name, key } => Credential::SharedKey {
            name,
            key,
            token_lifetime: config.sas_token_lifetime,
        },
        SharedAccess::Signature(token) => Credential::SharedAccessSignature(token),
    }
}

impl Producer {
    /// A producer for the namespace a connection string names (SAS key or signature). Connects lazily; the pool
    /// warms `min_size` connections in the background.
    pub fn from_connection_string(
        text: &str,
        websockets: bool,
        tls: TlsOptions,
        config: ProducerConfig,
    ) -> Result<Self, ProducerError> {
        let parsed: ConnectionString = text.parse()?;
        let credential = credential_for(&parsed, &config);
        Self::new(endpoint_for(&parsed, websockets), credential, tls, config)
    }

    /// A producer for this endpoint and credential.
    pub fn new(
        endpoint: Endpoint,
        credential: Credential,
        tls: TlsOptions,
        config: ProducerConfig,
    ) -> Result<Self, ProducerError> {
        config.validate()?;
        let stop = CancellationToken::new();
        let tokens = TokenCache::new(
            credential,
            RefreshPolicy {
                refresh_fraction: config.token_refresh_fraction,
                ..RefreshPolicy::default()
            },
            stop.clone(),
        );
        let server_address: Arc<str> = Arc::from(endpoint.host.as_str());
        let context = ConnectionContext {
            endpoint,
            tls,
            tokens: Arc::clone(&tokens),
            link_settings: LinkSettings {
                window: config.max_in_flight_per_link,
                disposition_wait: config.disposition_timeout,
            },
            idle_timeout: config.idle_timeout,
            tcp_keepalive: Some(config.tcp_keepalive),
            request_timeout: config.pool_connection_create_timeout,
            ready_message: config.ready_message.clone(),
        };
        let pool = Pool::new(config.clone(), context, stop.clone());
        let route_settings = RouteSettings {
            linger: config.linger,
            adaptive_linger: config.adaptive_linger,
            max_in_flight: 1,
            idle_exit: config.max_idle,
            max_attempts: config.retry_max_attempts,
            initial_backoff: config.retry_initial_backoff,
            max_backoff: config.retry_max_backoff,
            max_batch_events: config
                .rate_limit_events_per_second
                .map_or(usize::MAX, |rate| rate.get() as usize),
            send_timeout: config.send_timeout,
        };
        let throttle = config.throttle();
        let stack = route::send_stack(Arc::clone(&pool), throttle.clone(), &route_settings);
        Ok(Self {
            inner: Arc::new(Inner {
                buffer: Arc::new(Semaphore::new(config.max_buffered_bytes as usize)),
                route_slots: Arc::new(Semaphore::new(config.max_routes)),
                config,
                pool,
                stack,
                throttle,
                tokens,
                routes: Mutex::new(hashbrown::HashMap::new()),
                route_wanted: Notify::new(),
                route_settings,
                server_address,
                tasks: TaskTracker::new(),
                hubs: Mutex::new(HashMap::new()),
                limits: Mutex::new(hashbrown::HashMap::new()),
                closing: CancellationToken::new(),
                stop,
            }),
        })
    }

    /// Sends one event to `hub` within the configured `send_timeout`; resolves with its real outcome.
    pub async fn send(&self, hub: &str, event: Event) -> Result<Receipt, SendError> {
        let deadline = Instant::now() + self.inner.config.send_timeout;
        self.send_with_deadline(hub, event, deadline).await
    }

    /// Sends one event to `hub`; past `deadline` the caller stops waiting (what was sent stays sent).
    pub async fn send_with_deadline(
        &self,
        hub: &str,
        event: Event,
        deadline: Instant,
    ) -> Result<Receipt, SendError> {
        self.enqueue(hub, event, deadline).await?.await
    }

    /// Validates, encodes and queues one event on its route, and returns the ticket that resolves with its
    /// outcome. Events of one key enqueued one after another are stored in that order.
    pub async fn enqueue(
        &self,
        hub: &str,
        event: Event,
        deadline: Instant,
    ) -> Result<Ticket, SendError> {
        let (reply, outcome) = oneshot::channel();
        let claim = self
            .enqueue_reply(hub, event, deadline, Reply::Ticket(reply))
            .await?;
        Ok(Ticket {
            outcome,
            deadline,
            sleep: None,
            claim,
            pool: Arc::clone(&self.inner.pool),
        })
    }

    /// Like [`Producer::enqueue`] for a caller with many events in flight (a stream): the outcome goes to
    /// `sink` under `tag`, batched with its neighbours' (one call per run of consecutive tags of a batch), and
    /// the caller answers the event at its deadline itself with [`Producer::deadline_passed`] unless the sink
    /// heard first. Costs no channel and no timer per event.
    pub async fn enqueue_tagged(
        &self,
        hub: &str,
        event: Event,
        deadline: Instant,
        sink: &Arc<dyn OutcomeSink>,
        tag: u64,
    ) -> Result<Pledge, SendError> {
        let reply = Reply::Tagged {
            sink: Arc::clone(sink),
            tag,
        };
        let claim = self.enqueue_reply(hub, event, deadline, reply).await?;
        Ok(Pledge { claim })
    }

    /// The answer for a tagged event whose deadline passed before its sink heard: `DeadlineExceeded` if it had
    /// not gone on the wire (now it never will), `OutcomeUnknown` if it had (Event Hubs may store it).
    pub fn deadline_passed(&self, pledge: &Pledge) -> SendError {
        at_deadline(&pledge.claim, &self.inner.pool)
    }

    /// Validates, encodes and queues one event whose outcome goes to `reply`; returns its claim.
    async fn enqueue_reply(
        &self,
        hub: &str,
        mut event: Event,
        deadline: Instant,
        reply: Reply,
    ) -> Result<Arc<Claim>, SendError> {
        let inner = &self.inner;
        if inner.closing.is_cancelled() {
            return Err(SendError::Closed);
        }
        if hub.is_empty() {
            return Err(SendError::InvalidEvent {
                field: "event_hub",
                reason: "must not be empty".into(),
            });
        }
        event.validate()?;
        let target = match event.routing()? {
            Routing::Any => Target::Any,
            Routing::PartitionKey(key) if inner.config.local_partitioning => {
                let hub_properties = self.cached_hub_properties(hub, deadline).await?;
                let ids = &hub_properties.partition_ids;
                let index = partition_for_key(&key, ids.len() as u32) as usize;
                // Many keys share a partition batch; the key itself is not sent (documented).
                event.partition_key = None;
                Target::Partition(ids[index].clone())
            }
            Routing::PartitionKey(key) => Target::Key(key),
            Routing::PartitionId(id) => {
                let hub_properties = self.cached_hub_properties(hub, deadline).await?;
                if !hub_properties.partition_ids.contains(&id) {
                    return Err(SendError::UnknownPartition {
                        hub: hub.to_owned(),
                        partition: id,
                        count: hub_properties.partition_ids.len(),
                    });
                }
                Target::Partition(id)
            }
        };
        if inner.config.assign_message_ids && event.message_id.is_none() {
            event.message_id = Some(new_message_id());
        }
        let encoded = event.encode()?;
        let key = RouteRef {
            hub,
            target: &target,
        };
        if let Some(limit) = inner.limits.lock().get(hub).copied() {
            BatchBuilder::check_fits_alone(target.partition_key(), encoded.len(), limit)?;
        }
        let weight = u32::try_from(encoded.len()).unwrap_or(u32::MAX).max(1);
        // Waiting is the exception: try without it first, and keep the waiting futures boxed, out of the
        // common path's (every event's) future.
        let permit = match Arc::clone(&inner.buffer).try_acquire_many_owned(weight) {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return Err(SendError::Closed),
            Err(TryAcquireError::NoPermits) => {
                Box::pin(self.wait_for_buffer(weight, deadline)).await?
            }
        };
        let claim = Arc::new(Claim::new());
        let pending = Pending {
            encoded,
            reply,
            deadline,
            claim: Arc::clone(&claim),
            permit,
            trace_context: event.trace_context,
        };
        match self.route(key, None)? {
            Some(route) => match route.try_send(pending) {
                Ok(()) => {}
                Err(
                    mpsc::error::TrySendError::Full(pending)
                    | mpsc::error::TrySendError::Closed(pending),
                ) => Box::pin(self.wait_for_route(key.to_key(), pending)).await?,
            },
            None => Box::pin(self.wait_for_route(key.to_key(), pending)).await?,
        }
        Ok(claim)
    }

    /// Waits (until `deadline`) for room in `max_buffered_bytes`.
    async fn wait_for_buffer(
        &self,
        weight: u32,
        deadline: Instant,
    ) -> Result<OwnedSemaphorePermit, SendError> {
        let acquire = Arc::clone(&self.inner.buffer).acquire_many_owned(weight);
        match tokio::time::timeout_at(deadline.into(), acquire).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(SendError::Closed),
            Err(_) => Err(SendError::Overloaded {
                what: "max_buffered_bytes",
                retry_after: OVERLOAD_RETRY_AFTER,
            }),
        }
    }

    /// Waits (until the event's deadline) for its route (a slot under `max_routes`) and room in its queue,
    /// looking the route up again if it idled out meanwhile.
    async fn wait_for_route(&self, key: RouteKey, mut pending: Pending) -> Result<(), SendError> {
        let deadline = pending.deadline;
        loop {
            let route = self.route_or_wait(&key, deadline).await?;
            match tokio::time::timeout_at(deadline.into(), route.send(pending)).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(mpsc::error::SendError(back))) => pending = back,
                Err(_) => {
                    return Err(SendError::Overloaded {
                        what: "route_queue_capacity",
                        retry_after: OVERLOAD_RETRY_AFTER,
                    });
                }
            }
        }
    }

    /// The route of `key`, opening it with a slot of `max_routes`; waits (until `deadline`) for a slot, asking
    /// an idle route to make room, when every slot is taken.
    async fn route_or_wait(
        &self,
        key: &RouteKey,
        deadline: Instant,
    ) -> Result<mpsc::Sender<Pending>, SendError> {
        loop {
            if let Some(route) = self.route(key.into(), None)? {
                return Ok(route);
            }
            if Instant::now() >= deadline {
                return Err(SendError::Overloaded {
                    what: "max_routes",
                    retry_after: OVERLOAD_RETRY_AFTER,
                });
            }
            // Ask again now and then: the route asked may have taken work meanwhile and stayed.
            self.inner.route_wanted.notify_one();
            let ask_again = deadline.min(Instant::now() + ROUTE_SLOT_ASK_AGAIN);
            let slot = Arc::clone(&self.inner.route_slots).acquire_owned();
            let slot = match tokio::time::timeout_at(ask_again.into(), slot).await {
                Ok(Ok(slot)) => slot,
                Ok(Err(_)) => return Err(SendError::Closed),
                Err(_) => continue,
            };
            if let Some(route) = self.route(key.into(), Some(slot))? {
                return Ok(route);
            }
        }
    }

    /// The route of `key`: the open one, or a new one if a slot of `max_routes` is free (or given); `None`
    /// when every slot is taken.
    fn route(
        &self,
        key: RouteRef<'_>,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Result<Option<mpsc::Sender<Pending>>, SendError> {
        let inner = &self.inner;
        let mut routes = inner.routes.lock();
        if inner.closing.is_cancelled() {
            return Err(SendError::Closed);
        }
        if let Some(route) = routes.get(&key).filter(|route| !route.is_closed()) {
            return Ok(Some(route.clone()));
        }
        let slot = match slot {
            Some(slot) => slot,
            None => match Arc::clone(&inner.route_slots).try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => return Ok(None),
            },
        };
        let key = key.to_key();
        let (sender, receiver) = mpsc::channel(inner.config.route_queue_capacity);
        let mut settings = inner.route_settings;
        if key.target == Target::Any {
            // Keyless events have no order to keep: let their batches overlap.
            settings.max_in_flight = inner.config.max_in_flight_unordered;
        }
        let route = route::run_route(
            Arc::clone(inner),
            key.clone(),
            receiver,
            sender.downgrade(),
            settings,
        );
        inner.tasks.spawn(async move {
            route.await;
            drop(slot); // the slot is free once the route has answered everything it took
        });
        routes.insert(key.clone(), sender.clone());
        Ok(Some(sender))
    }

    async fn cached_hub_properties(
        &self,
        hub: &str,
        deadline: Instant,
    ) -> Result<Arc<HubProperties>, SendError> {
        self.inner.cached_hub_properties(hub, deadline).await
    }

    /// The hub's properties, through `$management`.
    pub async fn hub_properties(&self, hub: &str) -> Result<HubProperties, SendError> {
        let deadline = Instant::now() + self.inner.config.send_timeout;
        self.inner.hub_properties(hub, deadline).await
    }

    /// A partition's properties, through `$management`.
    pub async fn partition_properties(
        &self,
        hub: &str,
        partition: &str,
    ) -> Result<PartitionProperties, SendError> {
        let deadline = Instant::now() + self.inner.config.send_timeout;
        let connection = self.inner.pool.any_connection(deadline).await?;
        let body = connection.management_read(hub, Some(partition)).await?;
        PartitionProperties::from_response(&body)
    }

    /// Gauges and counters now.
    pub fn stats(&self) -> ProducerStats {
        let inner = &self.inner;
        let (token_refreshes, token_failures) = inner.tokens.counts();
        ProducerStats {
            pool: inner.pool.stats(),
            buffered_bytes: (inner.config.max_buffered_bytes as usize)
                .saturating_sub(inner.buffer.available_permits())
                as u64,
            routes: inner.routes.lock().len(),
            token_refreshes,
            token_failures,
            rate_limited_batches: inner
                .throttle
                .as_ref()
                .map_or(0, |throttle| throttle.waits()),
        }
    }

    /// Declares the hubs this producer serves: each connection warms up (a CBS token granted and a sender link
    /// attached for every one) before it takes work, and readiness requires them all.
    pub fn expect_hubs(&self, hubs: &[String]) {
        self.inner.pool.set_hubs(hubs);
    }

    /// Whether the producer can send now: see [`Producer::readiness`].
    pub fn is_ready(&self) -> bool {
        self.readiness().is_ok()
    }

    /// Ready when not closing and a pooled connection is open, not stalled, has had every declared hub's token
    /// granted (none refused since) and a sender link attached; otherwise why not, in one line.
    pub fn readiness(&self) -> Result<(), String> {
        if self.inner.closing.is_cancelled() {
            return Err("the producer is closing".into());
        }
        self.inner.pool.readiness()
    }

    /// Flushes every buffered event, waits (at most `send_timeout`) for every outcome, then closes links and
    /// connections; returns whether every event enqueued got its outcome. Sends after this fail with
    /// [`SendError::Closed`].
    pub async fn close(&self) -> bool {
        let inner = &self.inner;
        inner.closing.cancel();
        // Dropping the route senders lets each route flush what it holds and end.
        inner.routes.lock().clear();
        inner.tasks.close();
        let answered = tokio::time::timeout(inner.config.send_timeout, inner.tasks.wait())
            .await
            .is_ok();
        inner.stop.cancel();
        inner.pool.close(Duration::from_secs(5)).await;
        answered
    }
}

/// The outcome of an enqueued event: resolves when Event Hubs settles its batch, or with `DeadlineExceeded` when
/// its deadline passes before its batch goes on the wire. Once on the wire it waits for the batch's real
/// outcome, past its deadline if need be: an event is answered late rather than falsely.
pub struct Ticket {
    outcome: oneshot::Receiver<Outcome>,
    deadline: Instant,
    /// The deadline's timer, made on the first poll: [`Ticket::outcome_by`] needs none of its own.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    claim: Arc<Claim>,
    /// Asked, at the deadline, whether Event Hubs is unreachable: the reason the event is late.
    pool: Arc<Pool>,
}

impl Ticket {
    /// The outcome by `at` at the latest, for a caller who must answer then: the real outcome if it came; else
    /// `DeadlineExceeded` if the event had not gone on the wire (it never will), or `OutcomeUnknown` if it
    /// had (Event Hubs may store it).
    pub async fn outcome_by(mut self, at: Instant) -> Result<Receipt, SendError> {
        if at > self.deadline {
            // The event stops waiting at its own deadline, and its caller at `at`.
            return match tokio::time::timeout_at(at.into(), &mut self).await {
                Ok(outcome) => outcome,
                Err(_) => self.outcome_now(),
            };
        }
        // One timer: the caller's moment is also the event's deadline (or earlier).
        match tokio::time::timeout_at(at.into(), &mut self.outcome).await {
            Ok(outcome) => outcome.unwrap_or(Err(SendError::Closed)),
            Err(_) => self.outcome_now(),
        }
    }

    fn outcome_now(&mut self) -> Result<Receipt, SendError> {
        if let Ok(outcome) = self.outcome.try_recv() {
            return outcome;
        }
        Err(at_deadline(&self.claim, &self.pool))
    }
}

/// A tagged event's claim (see [`Producer::enqueue_tagged`]), which its caller hands back at its deadline.
pub struct Pledge {
    claim: Arc<Claim>,
}

/// The answer for an event whose caller stops waiting: `DeadlineExceeded` (with why Event Hubs is unreachable,
/// if it is) when it had not gone on the wire, which it now never will; `OutcomeUnknown` when it had.
fn at_deadline(claim: &Claim, pool: &Pool) -> SendError {
    if claim.expire() {
        SendError::DeadlineExceeded {
            last_error: pool.unreachable(),
        }
    } else {
        SendError::OutcomeUnknown {
            last_error: "the caller's deadline passed while Event Hubs had it".into(),
        }
    }
}

impl Future for Ticket {
    type Output = Result<Receipt, SendError>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        if let Poll::Ready(result) = Pin::new(&mut self.outcome).poll(cx) {
            return Poll::Ready(result.unwrap_or(Err(SendError::Closed)));
        }
        if self.claim.is_on_wire() {
            return Poll::Pending; // the outcome wakes it
        }
        let deadline = self.deadline;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if self.claim.expire() {
            Poll::Ready(Err(SendError::DeadlineExceeded {
                last_error: self.pool.unreachable(),
            }))
        } else {
            Poll::Pending // it went on the wire meanwhile
        }
    }
}

impl Inner {
    /// The hub's properties, read once per hub (a failed read is tried again by the next caller).
    async fn cached_hub_properties(
        &self,
        hub: &str,
        deadline: Instant,
    ) -> Result<Arc<HubProperties>, SendError> {
        let cell = Arc::clone(self.hubs.lock().entry(hub.to_owned()).or_default());
        if let Some(known) = cell.get() {
            return Ok(Arc::clone(known));
        }
        // Boxed: the first read is a large future, and this one is part of every send's.
        let fetch = cell.get_or_try_init(|| async {
            Box::pin(self.hub_properties(hub, deadline))
                .await
                .map(Arc::new)
        });
        tokio::time::timeout_at(deadline.into(), fetch)
            .await
            .unwrap_or(Err(SendError::DeadlineExceeded {
                last_error: Some("reading the hub's partitions".into()),
            }))
            .cloned()
    }

    /// The hub's properties, through `$management`, waiting for a connection until `deadline` at most.
    async fn hub_properties(
        &self,
        hub: &str,
        deadline: Instant,
    ) -> Result<HubProperties, SendError> {
        let connection = self.pool.any_connection(deadline).await?;
        let body = connection.management_read(hub, None).await?;
        HubProperties::from_response(&body)
    }

    /// A route's first link, which tells its size limit: retried like a batch (retryable failures, backoff
    /// with full jitter, `retry_max_attempts`) until `deadline`, the event's, which also bounds every wait.
    async fn first_link(
        &self,
        key: &RouteKey,
        deadline: Instant,
    ) -> Result<Arc<link::Link>, SendError> {
        let mut attempts = 0;
        let mut ceiling = self.config.retry_initial_backoff;
        loop {
            let link = tokio::time::timeout_at(
                deadline.into(),
                self.pool
                    .link(&key.hub, key.target.partition_id(), deadline),
            )
            .await
            .unwrap_or_else(|_| {
                Err(SendError::DeadlineExceeded {
                    last_error: self.pool.unreachable(),
                })
            });
            let error = match link {
                Ok(link) => return Ok(link),
                Err(error) if error.is_retryable() => error,
                Err(error) => return Err(error),
            };
            attempts += 1;
            let pause = ceiling.mul_f64(rand::random::<f64>());
            if attempts >= self.config.retry_max_attempts || route::now() + pause >= deadline {
                return Err(error);
            }
            tracing::debug!(hub = %key.hub, attempt = attempts, %error, ?pause, "retrying a route's first link");
            tokio::time::sleep(pause).await;
            ceiling = (ceiling * 2).min(self.config.retry_max_backoff);
        }
    }
}

/// A random (version 4) UUID as text, from the thread's fast generator rather than the operating system's.
fn new_message_id() -> String {
    uuid::Builder::from_random_bytes(rand::random())
        .into_uuid()
        .hyphenated()
        .to_string()
}

impl RouteHost for Inner {
    type Stack = SendStack;

    fn stack(&self) -> SendStack {
        self.stack.clone()
    }

    fn server_address(&self) -> &str {
        &self.server_address
    }

    fn max_message_size(
        &self,
        key: &RouteKey,
        deadline: Instant,
    ) -> Pin<Box<dyn Future<Output = Result<u64, SendError>> + Send + '_>> {
        let key = key.clone();
        Box::pin(async move {
            if let Some(limit) = self.limits.lock().get(&key.hub).copied() {
                return Ok(limit);
            }
            let link = self.first_link(&key, deadline).await?;
            let limit = link.max_message_size();
            self.limits.lock().insert(key.hub.clone(), limit);
            Ok(limit)
        })
    }

    fn key_partition<'a>(
        &'a self,
        hub: &'a str,
        key: &'a str,
        deadline: Instant,
    ) -> Pin<Box<dyn Future<Output = Result<String, SendError>> + Send + 'a>> {
        Box::pin(async move {
            let properties = self.cached_hub_properties(hub, deadline).await?;
            let ids = &properties.partition_ids;
            if ids.is_empty() {
                return Err(SendError::Connection(format!(
                    "{hub} reported no partitions"
                )));
            }
            // The service's own hash over the hub's partitions, in the order it lists them.
            let index = partition_for_key(key, ids.len() as u32) as usize;
            Ok(ids[index].clone())
        })
    }

    fn route_wanted(&self) -> &Notify {
        &self.route_wanted
    }

    fn retire_route(
        &self,
        key: &RouteKey,
        sender: &mpsc::Sender<Pending>,
        is_empty: &dyn Fn() -> bool,
    ) -> bool {
        let mut routes = self.routes.lock();
        match routes.get(key) {
            // Every send starts from a clone of the table's sender taken under this lock: with no clone but the
            // table's and the caller's, and nothing queued, nothing can arrive after the route ends (an event
            // arriving in a route that is ending could overtake an earlier one of its key in the next route).
            Some(current)
                if current.same_channel(sender) && sender.strong_count() == 2 && is_empty() =>
            {
                routes.remove(key);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A producer whose Event Hubs accepts TCP connections and never says a word: nothing goes on the wire.
    async fn silent_producer() -> Producer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let port = listener.local_addr().expect("its address").port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let credential = Credential::SharedKey {
            name: "key".into(),
            key: "secret".into(),
            token_lifetime: Duration::from_secs(3600),
        };
        let config = ProducerConfig {
            min_size: 0,
            ..ProducerConfig::default()
        };
        let endpoint = Endpoint::direct("127.0.0.1", port, Transport::Amqp);
        Producer::new(endpoint, credential, TlsOptions::default(), config).expect("a valid config")
    }

    #[tokio::test(start_paused = true)]
    async fn a_ticket_answers_deadline_exceeded_at_its_deadline_while_its_event_waits() {
        let producer = silent_producer().await;
        let started = tokio::time::Instant::now();
        // The first event holds its route up (learning its link's size limit, from a peer that never answers).
        let first = producer
            .enqueue(
                "eh1",
                Event::text("first"),
                route::now() + Duration::from_secs(10),
            )
            .await
            .expect("queued");
        let within = Duration::from_secs(2);
        let ticket = producer
            .enqueue("eh1", Event::text("late"), route::now() + within)
            .await
            .expect("queued");
        let claim = Arc::clone(&ticket.claim);
        let result = ticket.await;
        assert!(
            matches!(result, Err(SendError::DeadlineExceeded { .. })),
            "{result:?}"
        );
        assert_eq!(
            started.elapsed(),
            within,
            "answered at its deadline, not later"
        );
        assert!(claim.is_expired(), "and it never goes on the wire now");
        assert!(first.await.is_err());
        assert!(producer.close().await, "closing answers everything it took");
    }
}
