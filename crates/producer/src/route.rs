//! One route's batcher (hub + partition key, hub + partition id, or hub round-robin): events accumulate for at
//! most `linger` or until the next would not fit (with an adaptive linger, only while a batch is in flight),
//! batches go out through the retrying send stack, and each
//! event that went on the wire with its batch gets the batch's outcome (one whose deadline passed first was
//! left out and answered by its ticket).

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tower::retry::{Policy, Retry};
use tower::{ServiceBuilder, ServiceExt};

use super::batch::{BatchBuilder, SealedBatch};
use super::claim::Claim;
use super::error::SendError;
use super::event::TraceContext;
use super::pool::Pool;
use super::reply::{Reply, answer_all};
use super::throttle::{RateLimit, RateLimitLayer, Throttle};
use eventhub_telemetry::otel;
use tracing::Instrument;

/// How long a keyed route answers without a partition id after it failed to learn its key's partition.
const KEY_PARTITION_RETRY: Duration = Duration::from_secs(10);

/// Where a route's batches go within a hub.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// The hub address; the service picks partitions.
    Any,
    /// The hub address, every event with this partition key.
    Key(String),
    /// One partition's address.
    Partition(String),
}

impl Target {
    /// The partition key every event of the route carries.
    pub fn partition_key(&self) -> Option<&str> {
        match self {
            Self::Key(key) => Some(key),
            _ => None,
        }
    }

    /// The partition the route sends to.
    pub fn partition_id(&self) -> Option<&str> {
        match self {
            Self::Partition(id) => Some(id),
            _ => None,
        }
    }
}

/// A route: a hub and a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteKey {
    /// The event hub.
    pub hub: String,
    /// Where in it.
    pub target: Target,
}

/// A route named by borrowed parts: how each event finds its route without building a key.
#[derive(Clone, Copy, Debug)]
pub struct RouteRef<'a> {
    /// The event hub.
    pub hub: &'a str,
    /// Where in it.
    pub target: &'a Target,
}

impl RouteRef<'_> {
    /// The owned key, for a route being opened or waited for.
    pub fn to_key(self) -> RouteKey {
        RouteKey {
            hub: self.hub.to_owned(),
            target: self.target.clone(),
        }
    }
}

// A key and its borrowed form hash alike, so either finds the route (hashbrown's `Equivalent`).
impl Hash for RouteKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        RouteRef::from(self).hash(state);
    }
}

impl Hash for RouteRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.hub.hash(state);
        self.target.hash(state);
    }
}

impl<'a> From<&'a RouteKey> for RouteRef<'a> {
    fn from(key: &'a RouteKey) -> Self {
        Self {
            hub: &key.hub,
            target: &key.target,
        }
    }
}

impl hashbrown::Equivalent<RouteKey> for RouteRef<'_> {
    fn equivalent(&self, key: &RouteKey) -> bool {
        self.hub == key.hub && *self.target == key.target
    }
}

/// Where an accepted event went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The partition: the one asked for, the one local partitioning chose, or, for a partition key, the one
    /// the service's hash picks (computed with that hash over the hub's partitions, read once per hub).
    /// `None` only when the hub's partitions could not be read.
    pub partition_id: Option<String>,
}

/// An encoded event waiting for its batch's outcome.
pub struct Pending {
    /// The event encoded as a batch section.
    pub encoded: Vec<u8>,
    /// Where its outcome goes.
    pub reply: Reply,
    /// When its caller stops waiting, unless it is on the wire by then.
    pub deadline: Instant,
    /// Decides between its deadline and its batch going on the wire.
    pub claim: Arc<Claim>,
    /// Its share of the global buffer bound, released with its outcome.
    pub permit: OwnedSemaphorePermit,
    /// The event's trace context, linked from the span of the batch that carries it.
    pub trace_context: Option<TraceContext>,
}

/// How routes batch and retry.
#[derive(Clone, Copy, Debug)]
pub struct RouteSettings {
    /// Longest wait for a batch to fill.
    pub linger: Duration,
    /// Linger only while a batch is in flight (see `ProducerConfig::adaptive_linger`).
    pub adaptive_linger: bool,
    /// Batches in flight at once for this route.
    pub max_in_flight: usize,
    /// A route with nothing to do for this long ends.
    pub idle_exit: Duration,
    /// Attempts per batch (the first included).
    pub max_attempts: u32,
    /// First retry pause.
    pub initial_backoff: Duration,
    /// Longest retry pause.
    pub max_backoff: Duration,
    /// Most events in one batch (the events-per-second rate limit, so one batch never outruns its bucket).
    pub max_batch_events: usize,
    /// How long a batch on the wire is given (attempts and retries together) before its outcome is unknown.
    pub send_timeout: Duration,
}

/// A batch request of the send stack; cloning it for a retry clones pointers, not events.
#[derive(Clone)]
pub struct BatchRequest {
    hub: Arc<str>,
    partition: Option<Arc<str>>,
    batch: Arc<SealedBatch>,
    events: u64,
    bytes: u64,
    latest_deadline: Instant,
    send_timeout: Duration,
}

impl BatchRequest {
    /// Events in the batch.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Encoded size of the batch, bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The same request for a part of its batch.
    fn part(&self, batch: SealedBatch) -> Self {
        Self {
            events: batch.len() as u64,
            bytes: batch.size(),
            batch: Arc::new(batch),
            ..self.clone()
        }
    }

    /// How long the batch is worth trying: until its last caller's deadline while it waits (no one is left to
    /// answer after that), then, once on the wire, the producer's own send timeout: an event on the wire gets
    /// its real outcome, never its caller's deadline (so one caller's short deadline fails no one else).
    pub fn deadline(&self) -> Instant {
        match self.batch.on_wire_since() {
            Some(since) => since + self.send_timeout,
            None => self.latest_deadline,
        }
    }
}

/// The innermost service: a pooled link, bounded by the batch's deadline.
#[derive(Clone)]
pub struct LinkService {
    pool: Arc<Pool>,
}

impl tower::Service<BatchRequest> for LinkService {
    type Response = ();
    type Error = SendError;
    type Future = BoxFuture<'static, Result<(), SendError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: BatchRequest) -> Self::Future {
        let pool = Arc::clone(&self.pool);
        Box::pin(async move {
            let deadline = request.deadline();
            let link = tokio::time::timeout_at(
                deadline.into(),
                pool.link(&request.hub, request.partition.as_deref(), deadline),
            )
            .await
            .unwrap_or_else(|_| {
                // Still waiting for a connection: while Event Hubs is unreachable, that is why.
                Err(SendError::DeadlineExceeded {
                    last_error: pool.unreachable(),
                })
            })?;
            let send = link.send(Arc::clone(&request.batch));
            tokio::pin!(send);
            loop {
                let deadline = request.deadline();
                if let Ok(result) = tokio::time::timeout_at(deadline.into(), &mut send).await {
                    return result;
                }
                if request.batch.abandon() {
                    // Still queued on the link when its last caller's deadline passed: it never goes out.
                    return Err(SendError::DeadlineExceeded { last_error: None });
                }
                if request.deadline() <= deadline {
                    // On the wire past the producer's send timeout, with no outcome: it may be stored.
                    request.batch.mark_in_doubt();
                    return Err(SendError::DeadlineExceeded { last_error: None });
                }
                // It went on the wire meanwhile: the producer's own timeout applies from now on.
            }
        })
    }
}

/// The producer's clock: tokio's, so that paused-time tests move lingers, backoffs and deadlines together; the
/// same instant as `Instant::now()` wherever time is not paused.
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Retries retryable failures with exponential backoff and full jitter, within the attempts and the deadline.
#[derive(Clone)]
pub struct RetryPolicy {
    attempts: u32,
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    /// A fraction in [0, 1) of the ceiling to pause for: random in production, fixed in tests.
    jitter: fn() -> f64,
}

impl RetryPolicy {
    /// A policy for the route settings' attempts and backoff, with full jitter.
    pub fn new(settings: &RouteSettings) -> Self {
        Self {
            attempts: 0,
            max_attempts: settings.max_attempts,
            initial_backoff: settings.initial_backoff,
            max_backoff: settings.max_backoff,
            jitter: full_jitter,
        }
    }

    /// The longest pause before the next attempt: the initial backoff doubled per failed attempt, capped.
    fn ceiling(&self) -> Duration {
        let exponent = self.attempts.saturating_sub(1).min(20);
        self.initial_backoff
            .saturating_mul(1 << exponent)
            .min(self.max_backoff)
    }

    fn backoff(&self) -> Duration {
        self.ceiling().mul_f64((self.jitter)())
    }
}

fn full_jitter() -> f64 {
    rand::rng().random::<f64>()
}

impl Policy<BatchRequest, (), SendError> for RetryPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        request: &mut BatchRequest,
        result: &mut Result<(), SendError>,
    ) -> Option<Self::Future> {
        let Err(error) = result else { return None };
        if !error.is_retryable() {
            return None;
        }
        self.attempts += 1;
        if self.attempts >= self.max_attempts {
            return None;
        }
        let pause = self.backoff();
        if now() + pause >= request.deadline() {
            *result = Err(SendError::DeadlineExceeded {
                last_error: Some(error.to_string()),
            });
            return None;
        }
        // Inside the batch's send span, so each retry is a span event there too.
        tracing::info!(hub = %request.hub, attempt = self.attempts, %error, ?pause, "retrying a batch");
        eventhub_telemetry::metrics::retry_scheduled(&request.hub);
        Some(tokio::time::sleep(pause))
    }

    fn clone_request(&mut self, request: &BatchRequest) -> Option<BatchRequest> {
        Some(request.clone())
    }
}

/// The send stack: rate limit (optional) -> retry -> deadline-bounded link.
pub type SendStack = Stack<LinkService>;

/// The send stack over any innermost service (a pooled link in production, a mock in tests).
pub type Stack<S> = RateLimit<Retry<RetryPolicy, S>>;

/// Builds the send stack over a pool.
pub fn send_stack(
    pool: Arc<Pool>,
    throttle: Option<Arc<Throttle>>,
    settings: &RouteSettings,
) -> SendStack {
    stack_over(LinkService { pool }, throttle, settings)
}

/// Builds the send stack's rate limit and retry layers over `inner`.
pub fn stack_over<S>(
    inner: S,
    throttle: Option<Arc<Throttle>>,
    settings: &RouteSettings,
) -> Stack<S> {
    ServiceBuilder::new()
        .layer(RateLimitLayer::new(throttle))
        .retry(RetryPolicy::new(settings))
        .service(inner)
}

struct OpenBatch {
    builder: BatchBuilder,
    waiters: Waiters,
    claims: Vec<Arc<Claim>>,
    traces: Vec<TraceContext>,
    latest_deadline: Instant,
    seal_at: Instant,
}

type Waiters = Vec<(Reply, OwnedSemaphorePermit)>;

/// What a route needs from the producer: the send stack, the link size limit, and leave to end.
pub trait RouteHost: Send + Sync + 'static {
    /// The send stack's type ([`SendStack`] in production).
    type Stack: tower::Service<BatchRequest, Response = (), Error = SendError, Future: Send>
        + Clone
        + Send
        + Sync
        + 'static;
    /// The send stack.
    fn stack(&self) -> Self::Stack;
    /// The Event Hubs host, for spans.
    fn server_address(&self) -> &str;
    /// The `max-message-size` of the route's link (attaching one to learn it).
    fn max_message_size(
        &self,
        key: &RouteKey,
        deadline: Instant,
    ) -> Pin<Box<dyn Future<Output = Result<u64, SendError>> + Send + '_>>;
    /// The partition Event Hubs stores an event with this partition key in.
    fn key_partition<'a>(
        &'a self,
        hub: &'a str,
        key: &'a str,
        deadline: Instant,
    ) -> Pin<Box<dyn Future<Output = Result<String, SendError>> + Send + 'a>>;
    /// Signalled when a new route waits for a slot: one idle route closes early.
    fn route_wanted(&self) -> &tokio::sync::Notify;
    /// Removes the route if `sender` is still its channel, no one else holds a sender of it and `is_empty`
    /// (its queue) holds; returns whether it did.
    fn retire_route(
        &self,
        key: &RouteKey,
        sender: &mpsc::Sender<Pending>,
        is_empty: &dyn Fn() -> bool,
    ) -> bool;
}

/// A route's batching, without I/O or clocks of its own: the open batch (its linger deadline) and the batches
/// sealed and waiting for a send slot. The route task feeds it events and takes sealed batches out.
struct Batcher {
    hub: Arc<str>,
    partition: Option<Arc<str>>,
    partition_key: Option<String>,
    settings: RouteSettings,
    open: Option<OpenBatch>,
    ready: VecDeque<Sealed>,
}

impl Batcher {
    fn new(key: &RouteKey, settings: RouteSettings) -> Self {
        Self {
            hub: Arc::from(key.hub.as_str()),
            partition: key.target.partition_id().map(Arc::from),
            partition_key: key.target.partition_key().map(str::to_owned),
            settings,
            open: None,
            ready: VecDeque::new(),
        }
    }

    /// Whether it takes another event: at most two sealed batches wait, so a slow link holds the queue back.
    fn has_room(&self) -> bool {
        self.ready.len() < 2
    }

    /// Whether it holds no event.
    fn is_empty(&self) -> bool {
        self.open.is_none() && self.ready.is_empty()
    }

    /// When the open batch stops waiting to fill.
    fn seal_at(&self) -> Option<Instant> {
        self.open.as_ref().map(|batch| batch.seal_at)
    }

    /// Adds an event that fits alone under `limit` (checked by the caller). The open batch is sealed first if
    /// the event does not fit in it, and after it when it reaches `max_batch_events`; a new batch lingers from
    /// `now`.
    fn push(&mut self, event: Pending, limit: u64, now: Instant) {
        let mut encoded = event.encoded;
        loop {
            let batch = self.open.get_or_insert_with(|| OpenBatch {
                builder: BatchBuilder::new(self.partition_key.clone(), limit),
                waiters: Vec::new(),
                claims: Vec::new(),
                traces: Vec::new(),
                latest_deadline: event.deadline,
                seal_at: now + self.settings.linger,
            });
            match batch.builder.try_push(encoded) {
                Ok(()) => break,
                Err(back) if batch.builder.is_empty() => {
                    // Cannot happen for an event checked to fit alone; answered rather than looped on.
                    let size = BatchBuilder::size_alone(self.partition_key.as_deref(), back.len());
                    event.reply.send(Err(SendError::TooLarge { size, limit }));
                    return;
                }
                Err(back) => {
                    encoded = back;
                    self.seal_open();
                }
            }
        }
        if let Some(batch) = self.open.as_mut() {
            batch.latest_deadline = batch.latest_deadline.max(event.deadline);
            batch.waiters.push((event.reply, event.permit));
            batch.claims.push(event.claim);
            batch.traces.extend(event.trace_context);
            if batch.builder.len() >= self.settings.max_batch_events {
                self.seal_open();
            }
        }
    }

    /// Brings the open batch's sealing forward to `at`, if it was due later.
    fn hurry(&mut self, at: Instant) {
        if let Some(batch) = self.open.as_mut() {
            batch.seal_at = batch.seal_at.min(at);
        }
    }

    /// Seals the open batch, if there is one, behind those already sealed.
    fn seal_open(&mut self) {
        if let Some(batch) = self.open.take() {
            self.ready.push_back(Sealed {
                request: BatchRequest {
                    hub: Arc::clone(&self.hub),
                    partition: self.partition.clone(),
                    events: batch.builder.len() as u64,
                    bytes: batch.builder.size(),
                    batch: Arc::new(SealedBatch::new(batch.builder, batch.claims)),
                    latest_deadline: batch.latest_deadline,
                    send_timeout: self.settings.send_timeout,
                },
                waiters: batch.waiters,
                traces: batch.traces,
            });
        }
    }

    /// The oldest sealed batch.
    fn next_sealed(&mut self) -> Option<Sealed> {
        self.ready.pop_front()
    }
}

/// A route's dealings with its host before an event joins a batch: the link's size limit (learned once), the
/// partition of its key (for receipts), and the checks that answer an event at once.
struct Admission<H> {
    host: Arc<H>,
    key: RouteKey,
    limit: Option<u64>,
    receipt: Receipt,
    ask_key_partition_at: Instant,
}

impl<H: RouteHost> Admission<H> {
    fn new(host: Arc<H>, key: RouteKey) -> Self {
        Self {
            receipt: Receipt {
                partition_id: key.target.partition_id().map(str::to_owned),
            },
            host,
            key,
            limit: None,
            ask_key_partition_at: now(),
        }
    }

    /// The event and the size limit of its batch, or `None` when it was answered (the limit could not be
    /// learned, or it is too large even alone).
    async fn admit(&mut self, event: Pending) -> Option<(Pending, u64)> {
        let limit = match self.limit {
            Some(limit) => limit,
            None => match self.host.max_message_size(&self.key, event.deadline).await {
                Ok(found) => *self.limit.insert(found),
                Err(error) => {
                    event.reply.send(Err(error));
                    return None;
                }
            },
        };
        let partition_key = self.key.target.partition_key();
        if let Err(error) =
            BatchBuilder::check_fits_alone(partition_key, event.encoded.len(), limit)
        {
            event.reply.send(Err(error));
            return None;
        }
        if self.receipt.partition_id.is_none()
            && now() >= self.ask_key_partition_at
            && let Some(key) = partition_key
        {
            // Not knowing it does not stop the send; the route asks again a while later.
            let hub = self.key.hub.as_str();
            match self.host.key_partition(hub, key, event.deadline).await {
                Ok(id) => self.receipt.partition_id = Some(id),
                Err(error) => {
                    self.ask_key_partition_at = now() + KEY_PARTITION_RETRY;
                    tracing::debug!(%hub, %error, "the partition of a key is not known");
                }
            }
        }
        Some((event, limit))
    }
}

/// With an adaptive linger and nothing in flight, how long a batch waits for more events once the route's queue
/// is empty: the events of one request reach their route well within it (tokio's timers round it up to 1 ms).
const BURST_GAP: Duration = Duration::from_micros(200);

/// Runs a route until its channel closes (producer closing) or it idles out, answering every event it took.
pub async fn run_route<H: RouteHost>(
    host: Arc<H>,
    key: RouteKey,
    mut events: mpsc::Receiver<Pending>,
    own_sender: mpsc::WeakSender<Pending>,
    settings: RouteSettings,
) {
    let mut batcher = Batcher::new(&key, settings);
    let mut admission = Admission::new(Arc::clone(&host), key);
    let mut in_flight = FuturesUnordered::new();
    let mut closed = false;
    let mut last_activity = now();
    loop {
        let seal_at = batcher.seal_at();
        let mut answered = false;
        tokio::select! {
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {
                last_activity = now();
                answered = true;
            }
            event = events.recv(), if !closed && batcher.has_room() => match event {
                None => closed = true,
                // Its ticket answered it already: it takes no room in a batch.
                Some(event) if event.claim.is_expired() => drop(event),
                // Its deadline passed in the queue, before its ticket's timer noticed (a batch that goes out at
                // once would otherwise carry it): it never goes on the wire, and is answered so here.
                Some(event) if event.deadline <= now() && event.claim.expire() => {
                    event.reply.send(Err(SendError::DeadlineExceeded { last_error: None }));
                }
                Some(event) => {
                    last_activity = now();
                    if let Some((event, limit)) = admission.admit(event).await {
                        batcher.push(event, limit, now());
                    }
                }
            },
            () = sleep_until_opt(seal_at), if seal_at.is_some() => batcher.seal_open(),
            () = idle_until(last_activity + settings.idle_exit, host.route_wanted()),
                if !closed && batcher.is_empty() && in_flight.is_empty() =>
            {
                if let Some(sender) = own_sender.upgrade()
                    && host.retire_route(&admission.key, &sender, &|| events.is_empty())
                {
                    events.close();
                } else {
                    last_activity = now();
                }
            }
        }
        if closed {
            batcher.seal_open(); // closing: no lingering
        } else if settings.adaptive_linger && in_flight.is_empty() && events.is_empty() {
            if answered {
                // Its company gathered while the last batch was in flight: nothing left to wait for.
                batcher.seal_open();
            } else {
                // Nothing to wait behind: wait only for the rest of a burst (one request's events) to arrive.
                batcher.hurry(now() + BURST_GAP);
            }
        }
        while in_flight.len() < settings.max_in_flight
            && let Some(sealed) = batcher.next_sealed()
        {
            // Known before any event joined the batch (a key's partition is asked first).
            in_flight.push(send_sealed(&*host, sealed, admission.receipt.clone()));
        }
        if closed && batcher.is_empty() && in_flight.is_empty() {
            return;
        }
    }
}

/// Sends one sealed batch through the host's stack (apart, if refused for its contents) in its own span, and
/// answers each of its callers with its outcome.
fn send_sealed<H: RouteHost>(
    host: &H,
    sealed: Sealed,
    receipt: Receipt,
) -> impl Future<Output = ()> + Send + 'static {
    let Sealed {
        request,
        waiters,
        traces,
    } = sealed;
    let span = send_span(&request, host.server_address(), &traces);
    let stack = host.stack();
    async move {
        let send = |request: BatchRequest| {
            let (hub, events, bytes) = (Arc::clone(&request.hub), request.events, request.bytes);
            let sent = stack.clone().oneshot(request);
            async move { eventhub_telemetry::metrics::time_batch(&hub, events, bytes, sent).await }
        };
        let answer = |result: Result<(), SendError>, waiters: Waiters| {
            if let Err(error) = &result {
                let span = tracing::Span::current();
                span.record("error.type", error.error_type());
                span.record("otel.status_code", "ERROR");
                // Logged once, here, where the outcome is decided (in the span: hub and partition).
                tracing::warn!(%error, events = waiters.len(), "batch failed");
            }
            // Each event's share of the buffer bound is released as it is answered.
            let outcome = result.map(|()| receipt.clone());
            answer_all(waiters.into_iter().map(|(reply, _permit)| reply), &outcome);
        };
        send_apart(request, waiters, send, answer).await;
    }
    .instrument(span)
}

/// Sends a batch with `send`; when Event Hubs refuses it whole for what an event in it holds (an invalid
/// argument, a size: [`SendError::refuses_contents`]), sends the events that were in it again in two halves,
/// first half first, and so on down to single events, so every event but the culprit gets its own outcome.
/// A refused transfer was not stored, so nothing is sent twice; a batch in doubt is never split. Bounded: at
/// most ⌈log2 n⌉ levels of halves for n events, two sends per level for one bad event, 2n - 1 sends in all
/// when every event is bad; halves go one after the other, so a key's order holds. `answer` gets each outcome
/// with the callers it is for as soon as it is known.
async fn send_apart<F, Fut>(
    request: BatchRequest,
    waiters: Waiters,
    mut send: F,
    mut answer: impl FnMut(Result<(), SendError>, Waiters),
) where
    F: FnMut(BatchRequest) -> Fut,
    Fut: Future<Output = Result<(), SendError>>,
{
    let mut queue = VecDeque::from([(request, waiters)]);
    while let Some((request, waiters)) = queue.pop_front() {
        let batch = Arc::clone(&request.batch);
        let result = send(request.clone()).await;
        if let Err(error) = &result
            && error.refuses_contents()
            && !batch.is_in_doubt()
            && let Some([(first, first_indices), (second, second_indices)]) = batch.split()
        {
            eventhub_telemetry::metrics::batch_split(&request.hub);
            tracing::info!(%error, events = first_indices.len() + second_indices.len(),
                "Event Hubs refused a batch whole: sending its events again in two halves");
            let mut slots: Vec<_> = waiters.into_iter().map(Some).collect();
            let mut take = |indices: &[usize]| -> Waiters {
                indices
                    .iter()
                    .filter_map(|&index| slots[index].take())
                    .collect()
            };
            let (first_waiters, second_waiters) = (take(&first_indices), take(&second_indices));
            // Left out of the transfer: their tickets answered them at their deadline already.
            let left_out: Waiters = slots.into_iter().flatten().collect();
            if !left_out.is_empty() {
                answer(result.clone(), left_out);
            }
            queue.push_front((request.part(second), second_waiters));
            queue.push_front((request.part(first), first_waiters));
            continue;
        }
        let result = result.map_err(|error| {
            if batch.is_in_doubt() {
                SendError::OutcomeUnknown {
                    last_error: error.to_string(),
                }
            } else {
                error
            }
        });
        answer(result, waiters);
    }
}

/// A batch ready to go: its request, its callers and their events' trace contexts.
struct Sealed {
    request: BatchRequest,
    waiters: Waiters,
    traces: Vec<TraceContext>,
}

/// The span of one batch's send, with OpenTelemetry's messaging conventions and a link to each event's span
/// (a batch serves many calls, so it is no one call's child).
fn send_span(
    request: &BatchRequest,
    server_address: &str,
    traces: &[TraceContext],
) -> tracing::Span {
    let span = tracing::info_span!(
        "send",
        otel.name = %format!("send {}", request.hub),
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        messaging.system = "eventhubs",
        messaging.operation.type = "send",
        messaging.destination.name = %request.hub,
        messaging.destination.partition.id = tracing::field::Empty,
        messaging.batch.message_count = request.events,
        server.address = %server_address,
        error.type = tracing::field::Empty,
    );
    if let Some(partition) = &request.partition {
        span.record("messaging.destination.partition.id", partition.as_ref());
    }
    otel::link_to(&span, traces);
    span
}

/// Completes at `at`, or earlier when a new route wants this one's slot.
async fn idle_until(at: Instant, route_wanted: &tokio::sync::Notify) {
    tokio::select! {
        () = tokio::time::sleep_until(at.into()) => {}
        () = route_wanted.notified() => {}
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::AmqpCondition;
    use fe2o3_amqp_types::messaging::Body;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::{Semaphore, oneshot};

    const POISON: &[u8] = b"poison";

    type Outcomes = Vec<oneshot::Receiver<Result<Receipt, SendError>>>;

    /// A sealed request of `bodies` (each a batch section) and the receivers of its callers' outcomes.
    fn request(bodies: &[Vec<u8>]) -> (BatchRequest, Waiters, Outcomes, Vec<Arc<Claim>>) {
        let permits = Arc::new(Semaphore::new(bodies.len()));
        let mut builder = BatchBuilder::new(None, u64::MAX);
        let mut waiters = Waiters::new();
        let mut outcomes = Vec::new();
        let mut claims = Vec::new();
        for body in bodies {
            builder.try_push(body.clone()).unwrap();
            let (reply, outcome) = oneshot::channel();
            waiters.push((
                Reply::Ticket(reply),
                Arc::clone(&permits).try_acquire_owned().unwrap(),
            ));
            outcomes.push(outcome);
            claims.push(Arc::new(Claim::new()));
        }
        let bytes = builder.size();
        let request = BatchRequest {
            hub: Arc::from("eh1"),
            partition: None,
            batch: Arc::new(SealedBatch::new(builder, claims.clone())),
            events: bodies.len() as u64,
            bytes,
            latest_deadline: Instant::now() + Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
        };
        (request, waiters, outcomes, claims)
    }

    /// A stand-in for Event Hubs: 5 ms per send, refusing whole any batch that holds a poison event with
    /// `refusal`; records every section it stored, in order.
    fn service(
        refusal: SendError,
        sends: Arc<AtomicUsize>,
        stored: Arc<parking_lot::Mutex<Vec<Vec<u8>>>>,
    ) -> impl FnMut(BatchRequest) -> BoxFuture<'static, Result<(), SendError>> {
        move |request: BatchRequest| {
            let refusal = refusal.clone();
            let sends = Arc::clone(&sends);
            let stored = Arc::clone(&stored);
            Box::pin(async move {
                sends.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                let transfer = request.batch.transfer_for_wire().unwrap();
                let Body::Data(sections) = &transfer.message.body else {
                    panic!("a batch is Data sections")
                };
                if sections
                    .iter()
                    .any(|section| section.0.as_slice() == POISON)
                {
                    return Err(refusal);
                }
                stored
                    .lock()
                    .extend(sections.iter().map(|section| section.0.to_vec()));
                Ok(())
            })
        }
    }

    /// Sends like a route: each answer goes to its callers as it comes.
    async fn send(
        request: BatchRequest,
        waiters: Waiters,
        service: impl FnMut(BatchRequest) -> BoxFuture<'static, Result<(), SendError>>,
    ) {
        send_apart(request, waiters, service, |result, waiters| {
            for (reply, _permit) in waiters {
                reply.send(result.clone().map(|()| Receipt { partition_id: None }));
            }
        })
        .await;
    }

    fn answered(outcomes: Outcomes) -> Vec<Result<Receipt, SendError>> {
        outcomes
            .into_iter()
            .map(|mut outcome| outcome.try_recv().expect("every event is answered once"))
            .collect()
    }

    fn argument_error() -> SendError {
        SendError::service(
            AmqpCondition::InvalidArgument,
            "event 3: too many properties",
        )
    }

    #[tokio::test(start_paused = true)]
    async fn one_poison_event_fails_alone_in_log2_rounds_and_order_holds() {
        let mut bodies: Vec<Vec<u8>> = (0..1000u32).map(|n| n.to_be_bytes().to_vec()).collect();
        bodies[617] = POISON.to_vec();
        let (request, waiters, outcomes, _) = request(&bodies);
        let sends = Arc::new(AtomicUsize::new(0));
        let stored = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let started = tokio::time::Instant::now();
        send(
            request,
            waiters,
            service(argument_error(), Arc::clone(&sends), Arc::clone(&stored)),
        )
        .await;
        let results = answered(outcomes);
        for (index, result) in results.iter().enumerate() {
            if index == 617 {
                assert_eq!(result, &Err(argument_error()));
            } else {
                assert!(result.is_ok(), "event {index}: {result:?}");
            }
        }
        // One send, then two per level of halves: ⌈log2 1000⌉ = 10 levels.
        assert_eq!(sends.load(Ordering::SeqCst), 1 + 2 * 10);
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(5 * 21),
            "one send after the other"
        );
        let mut expected = bodies.clone();
        expected.remove(617);
        assert_eq!(*stored.lock(), expected, "stored once each, in order");
    }

    #[tokio::test(start_paused = true)]
    async fn each_half_is_answered_as_soon_as_its_outcome_is_known() {
        let mut bodies: Vec<Vec<u8>> = (0..8u8).map(|n| vec![n]).collect();
        bodies[7] = POISON.to_vec();
        let (request, waiters, mut outcomes, _) = request(&bodies);
        let sends = Arc::new(AtomicUsize::new(0));
        let stored = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let sending = tokio::spawn(send(
            request,
            waiters,
            service(argument_error(), Arc::clone(&sends), stored),
        ));
        // The whole batch (5 ms), then its first half (5 ms): accepted, and answered before the rest is sent.
        tokio::time::sleep(Duration::from_millis(12)).await;
        assert_eq!(sends.load(Ordering::SeqCst), 3);
        for outcome in &mut outcomes[..4] {
            assert!(matches!(outcome.try_recv(), Ok(Ok(_))));
        }
        assert!(
            outcomes[4].try_recv().is_err(),
            "the second half is still on its way"
        );
        sending.await.unwrap();
        assert_eq!(sends.load(Ordering::SeqCst), 1 + 2 * 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_of_poison_is_split_down_to_single_events_and_no_further() {
        let bodies = vec![POISON.to_vec(); 8];
        let (request, waiters, outcomes, _) = request(&bodies);
        let sends = Arc::new(AtomicUsize::new(0));
        let stored = Arc::new(parking_lot::Mutex::new(Vec::new()));
        send(
            request,
            waiters,
            service(argument_error(), Arc::clone(&sends), stored),
        )
        .await;
        assert!(
            answered(outcomes)
                .iter()
                .all(|result| result == &Err(argument_error()))
        );
        assert_eq!(sends.load(Ordering::SeqCst), 2 * 8 - 1);
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_of_the_link_or_namespace_are_not_split() {
        for refusal in [
            SendError::service(AmqpCondition::Unauthorized, "expired"),
            SendError::service(AmqpCondition::NotFound, "no hub"),
            SendError::service(AmqpCondition::ServerBusy, "busy"),
        ] {
            let bodies = vec![b"a".to_vec(), POISON.to_vec(), b"b".to_vec()];
            let (request, waiters, outcomes, _) = request(&bodies);
            let sends = Arc::new(AtomicUsize::new(0));
            let stored = Arc::new(parking_lot::Mutex::new(Vec::new()));
            send(
                request,
                waiters,
                service(refusal.clone(), Arc::clone(&sends), stored),
            )
            .await;
            assert!(
                answered(outcomes)
                    .iter()
                    .all(|result| result == &Err(refusal.clone()))
            );
            assert_eq!(sends.load(Ordering::SeqCst), 1, "{refusal}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_in_doubt_is_not_split_and_its_outcome_is_unknown() {
        let bodies = vec![b"a".to_vec(), POISON.to_vec()];
        let (request, waiters, outcomes, _) = request(&bodies);
        request.batch.mark_in_doubt();
        let sends = Arc::new(AtomicUsize::new(0));
        let stored = Arc::new(parking_lot::Mutex::new(Vec::new()));
        send(
            request,
            waiters,
            service(argument_error(), Arc::clone(&sends), stored),
        )
        .await;
        for result in answered(outcomes) {
            assert!(
                matches!(result, Err(SendError::OutcomeUnknown { .. })),
                "{result:?}"
            );
        }
        assert_eq!(sends.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_event_left_out_at_its_deadline_is_not_sent_in_a_half() {
        let bodies = vec![
            b"a".to_vec(),
            b"late".to_vec(),
            POISON.to_vec(),
            b"b".to_vec(),
        ];
        let (request, waiters, outcomes, claims) = request(&bodies);
        assert!(claims[1].expire());
        let sends = Arc::new(AtomicUsize::new(0));
        let stored = Arc::new(parking_lot::Mutex::new(Vec::new()));
        send(
            request,
            waiters,
            service(argument_error(), Arc::clone(&sends), Arc::clone(&stored)),
        )
        .await;
        let results = answered(outcomes);
        assert!(results[0].is_ok() && results[3].is_ok(), "{results:?}");
        assert_eq!(results[2], Err(argument_error()));
        // Its ticket answered it DEADLINE_EXCEEDED at its deadline; what its reply carries is never read.
        assert!(results[1].is_err());
        assert_eq!(*stored.lock(), vec![b"a".to_vec(), b"b".to_vec()]);
    }

    // The route task and the retry policy against a mock link (tower-test), in paused time.

    use crate::batch::section_size;
    use tower_test::mock::{self, Handle, SendResponse};

    type BoxError = Box<dyn std::error::Error + Send + Sync>;

    /// The innermost service of the tests: a tower-test mock answering with a `SendError` (or `()`).
    type MockLink = tower::util::MapErr<mock::Mock<BatchRequest, ()>, fn(BoxError) -> SendError>;

    fn as_send_error(error: BoxError) -> SendError {
        match error.downcast::<SendError>() {
            Ok(error) => *error,
            Err(other) => SendError::Connection(other.to_string()),
        }
    }

    fn mock_link() -> (MockLink, Handle<BatchRequest, ()>) {
        let (link, handle) = mock::pair();
        (link.map_err(as_send_error as fn(_) -> _), handle)
    }

    /// A producer stand-in: the send stack over a mock link, a fixed size limit, key partition "1".
    struct MockHost {
        stack: Stack<MockLink>,
        limit: u64,
        route_wanted: tokio::sync::Notify,
    }

    impl RouteHost for MockHost {
        type Stack = Stack<MockLink>;

        fn stack(&self) -> Self::Stack {
            self.stack.clone()
        }

        fn server_address(&self) -> &str {
            "mock.servicebus.test"
        }

        fn max_message_size(
            &self,
            _: &RouteKey,
            _: Instant,
        ) -> Pin<Box<dyn Future<Output = Result<u64, SendError>> + Send + '_>> {
            let limit = self.limit;
            Box::pin(async move { Ok(limit) })
        }

        fn key_partition<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            _: Instant,
        ) -> Pin<Box<dyn Future<Output = Result<String, SendError>> + Send + 'a>> {
            Box::pin(async { Ok("1".to_owned()) })
        }

        fn route_wanted(&self) -> &tokio::sync::Notify {
            &self.route_wanted
        }

        fn retire_route(
            &self,
            _: &RouteKey,
            _: &mpsc::Sender<Pending>,
            _: &dyn Fn() -> bool,
        ) -> bool {
            false
        }
    }

    const LINGER: Duration = Duration::from_millis(100);
    const LONG: Duration = Duration::from_secs(3600);

    fn settings() -> RouteSettings {
        RouteSettings {
            linger: LINGER,
            adaptive_linger: false,
            max_in_flight: 1,
            idle_exit: LONG,
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            max_batch_events: usize::MAX,
            send_timeout: Duration::from_secs(60),
        }
    }

    type Outcome = oneshot::Receiver<Result<Receipt, SendError>>;

    /// A route task over a mock link: its queue, the link's handle, the task.
    struct MockRoute {
        events: Option<mpsc::Sender<Pending>>,
        link: Handle<BatchRequest, ()>,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(target: Target, limit: u64, settings: RouteSettings) -> MockRoute {
        let (link, handle) = mock_link();
        let host = Arc::new(MockHost {
            stack: stack_over(link, None, &settings),
            limit,
            route_wanted: tokio::sync::Notify::new(),
        });
        let key = RouteKey {
            hub: "eh1".into(),
            target,
        };
        let (sender, receiver) = mpsc::channel(64);
        let task = tokio::spawn(run_route(host, key, receiver, sender.downgrade(), settings));
        MockRoute {
            events: Some(sender),
            link: handle,
            task,
        }
    }

    impl MockRoute {
        /// Queues an event of `body` due within `within`; its outcome and its claim.
        async fn enqueue(&self, body: &[u8], within: Duration) -> (Outcome, Arc<Claim>) {
            let (reply, outcome) = oneshot::channel();
            let claim = Arc::new(Claim::new());
            let pending = Pending {
                encoded: body.to_vec(),
                reply: Reply::Ticket(reply),
                deadline: now() + within,
                claim: Arc::clone(&claim),
                permit: Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap(),
                trace_context: None,
            };
            let events = self.events.as_ref().expect("the route is open");
            events.send(pending).await.expect("the route runs");
            (outcome, claim)
        }

        /// Queues one event per body; their outcomes.
        async fn enqueue_all(&self, bodies: &[Vec<u8>]) -> Vec<Outcome> {
            let mut outcomes = Vec::new();
            for body in bodies {
                outcomes.push(self.enqueue(body, LONG * 2).await.0);
            }
            outcomes
        }

        /// The next batch the link is asked to send (within a paused day: a hang fails rather than blocks).
        async fn next_batch(&mut self) -> (BatchRequest, SendResponse<()>) {
            tokio::time::timeout(Duration::from_secs(86_400), self.link.next_request())
                .await
                .expect("a batch is sent")
                .expect("the link is open")
        }

        /// The producer closing: the route's channel ends.
        fn close(&mut self) {
            self.events = None;
        }
    }

    /// The events a batch puts on the wire, as the link would write them.
    fn bodies(request: &BatchRequest) -> Vec<Vec<u8>> {
        let Some(transfer) = request.batch.transfer_for_wire() else {
            return Vec::new();
        };
        let Body::Data(sections) = &transfer.message.body else {
            panic!("a batch is Data sections")
        };
        sections.iter().map(|section| section.0.to_vec()).collect()
    }

    fn numbered(count: u8, len: usize) -> Vec<Vec<u8>> {
        (0..count).map(|n| vec![n; len]).collect()
    }

    fn busy() -> SendError {
        SendError::service(AmqpCondition::ServerBusy, "busy")
    }

    #[tokio::test(start_paused = true)]
    async fn linger_seals_a_batch_that_did_not_fill() {
        let mut route = start(Target::Any, 1 << 20, settings());
        let started = tokio::time::Instant::now();
        let outcomes = route.enqueue_all(&numbered(3, 1)).await;
        let (request, reply) = route.next_batch().await;
        assert_eq!(
            started.elapsed(),
            LINGER,
            "sealed at its linger, not before"
        );
        assert_eq!(bodies(&request), numbered(3, 1));
        reply.send_response(());
        for outcome in outcomes {
            assert_eq!(outcome.await.unwrap(), Ok(Receipt { partition_id: None }));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_adaptive_linger_waits_only_behind_a_batch_in_flight() {
        let settings = RouteSettings {
            adaptive_linger: true,
            linger: LONG,
            ..settings()
        };
        let mut route = start(Target::Key("k".into()), 1 << 20, settings);
        let started = tokio::time::Instant::now();
        let first = numbered(3, 1);
        let mut outcomes = route.enqueue_all(&first).await;
        let (request, reply) = route.next_batch().await;
        assert!(
            started.elapsed() <= Duration::from_millis(1),
            "nothing in flight: it goes within a burst gap, not at the linger ({:?})",
            started.elapsed()
        );
        assert_eq!(bodies(&request), first);
        // Behind the batch in flight, the next events wait for its answer, not for the hour-long linger.
        let second: Vec<Vec<u8>> = (10..12).map(|n| vec![n; 1]).collect();
        outcomes.extend(route.enqueue_all(&second).await);
        tokio::time::sleep(LINGER).await;
        let answered_at = started.elapsed();
        reply.send_response(());
        let (request, reply) = route.next_batch().await;
        assert_eq!(
            started.elapsed(),
            answered_at,
            "sent as soon as the batch ahead was answered"
        );
        assert_eq!(bodies(&request), second);
        reply.send_response(());
        for outcome in outcomes {
            assert!(outcome.await.unwrap().is_ok());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_seals_at_the_link_size_limit_to_the_byte() {
        // Room for three 100-byte events, then for two (one byte short of three).
        for (limit, fit) in [(3 * section_size(100), 3), (3 * section_size(100) - 1, 2)] {
            let mut route = start(
                Target::Any,
                limit,
                RouteSettings {
                    linger: LONG,
                    ..settings()
                },
            );
            let started = tokio::time::Instant::now();
            let all = numbered(4, 100);
            let outcomes = route.enqueue_all(&all).await;
            let (request, reply) = route.next_batch().await;
            assert_eq!(
                started.elapsed(),
                Duration::ZERO,
                "sealed full, without lingering"
            );
            assert_eq!(bodies(&request), all[..fit], "limit {limit}");
            assert!(request.bytes() <= limit);
            reply.send_response(());
            // The rest waits for its own batch to linger.
            let (request, reply) = route.next_batch().await;
            assert_eq!(started.elapsed(), LONG);
            assert_eq!(bodies(&request), all[fit..]);
            reply.send_response(());
            for outcome in outcomes {
                assert!(outcome.await.unwrap().is_ok());
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_seals_at_max_batch_events() {
        let settings = RouteSettings {
            max_batch_events: 2,
            ..settings()
        };
        let mut route = start(Target::Any, 1 << 20, settings);
        let started = tokio::time::Instant::now();
        let all = numbered(5, 10);
        route.enqueue_all(&all).await;
        for (expected, at) in [
            (&all[0..2], Duration::ZERO),
            (&all[2..4], Duration::ZERO),
            (&all[4..], LINGER),
        ] {
            let (request, reply) = route.next_batch().await;
            assert_eq!(bodies(&request), expected);
            assert_eq!(started.elapsed(), at);
            reply.send_response(());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn events_of_one_key_keep_their_order_across_batches_and_retries() {
        let settings = RouteSettings {
            max_batch_events: 3,
            ..settings()
        };
        let mut route = start(Target::Key("k".into()), 1 << 20, settings);
        let all = numbered(9, 10);
        let outcomes = route.enqueue_all(&all).await;
        let mut stored = Vec::new();
        for failure in [
            busy(),
            SendError::Connection("reset".into()),
            SendError::NotProcessed("released"),
        ] {
            let (request, reply) = route.next_batch().await;
            let sent = bodies(&request);
            reply.send_error(failure);
            // Only the retry of the failed batch may go next: the key's next batch waits for its outcome.
            let (retry, reply) = route.next_batch().await;
            assert_eq!(
                bodies(&retry),
                sent,
                "the same batch again, before any later one"
            );
            reply.send_response(());
            stored.extend(sent);
        }
        assert_eq!(stored, all, "stored once each, in order");
        for outcome in outcomes {
            assert_eq!(
                outcome.await.unwrap(),
                Ok(Receipt {
                    partition_id: Some("1".into())
                })
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_event_whose_deadline_passes_while_its_batch_lingers_is_left_out() {
        let mut route = start(Target::Any, 1 << 20, settings());
        let (_, late) = route.enqueue(b"late", LINGER / 2).await;
        let (on_time, _) = route.enqueue(b"on time", LONG).await;
        // What the late event's ticket does at its deadline.
        tokio::time::sleep(LINGER / 2).await;
        assert!(
            late.expire(),
            "its deadline wins: it had not gone on the wire"
        );
        let (request, reply) = route.next_batch().await;
        assert_eq!(bodies(&request), vec![b"on time".to_vec()]);
        reply.send_response(());
        assert!(on_time.await.unwrap().is_ok());
        // An event whose ticket expired before the route took it takes no room in a batch.
        let (_, gone) = route.enqueue(b"gone", LONG).await;
        assert!(gone.expire());
        let (kept, _) = route.enqueue(b"kept", LONG).await;
        let (request, reply) = route.next_batch().await;
        assert_eq!(request.events(), 1, "the expired event is not in the batch");
        assert_eq!(bodies(&request), vec![b"kept".to_vec()]);
        reply.send_response(());
        assert!(kept.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn closing_sends_what_is_buffered_at_once_and_answers_every_event() {
        let settings = RouteSettings {
            linger: LONG,
            max_batch_events: 2,
            max_in_flight: 2,
            ..settings()
        };
        let mut route = start(Target::Any, 1 << 20, settings);
        let started = tokio::time::Instant::now();
        let all = numbered(5, 10);
        let mut outcomes = route.enqueue_all(&all).await;
        // Two full batches in flight, the fifth event lingering in an open one.
        let (first, first_reply) = route.next_batch().await;
        let (second, second_reply) = route.next_batch().await;
        route.close();
        first_reply.send_response(());
        let (last, last_reply) = route.next_batch().await;
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "flushed without lingering"
        );
        assert_eq!(
            [bodies(&first), bodies(&second), bodies(&last)].concat(),
            all,
            "every buffered event sent once"
        );
        tokio::task::yield_now().await;
        assert!(
            !route.task.is_finished(),
            "the route waits for the outcomes it owes"
        );
        second_reply.send_error(SendError::service(AmqpCondition::Unauthorized, "expired"));
        last_reply.send_response(());
        tokio::time::timeout(Duration::from_secs(1), &mut route.task)
            .await
            .expect("the route ends once everything is answered")
            .unwrap();
        let results: Vec<_> = outcomes
            .iter_mut()
            .map(|o| o.try_recv().expect("answered"))
            .collect();
        assert!(
            results[0].is_ok() && results[1].is_ok() && results[4].is_ok(),
            "{results:?}"
        );
        assert!(
            matches!(results[2], Err(SendError::Service(_))),
            "{results:?}"
        );
        assert!(
            matches!(results[3], Err(SendError::Service(_))),
            "{results:?}"
        );
    }

    // The retry policy, on its own over a mock link.

    fn retrying(policy: RetryPolicy) -> (Retry<RetryPolicy, MockLink>, Handle<BatchRequest, ()>) {
        let (link, handle) = mock_link();
        (Retry::new(policy, link), handle)
    }

    fn policy(initial: Duration, max: Duration, max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_backoff: initial,
            max_backoff: max,
            // The top of the jitter's range: each pause is its ceiling.
            jitter: || 1.0,
            ..RetryPolicy::new(&settings())
        }
    }

    /// A request of one event, its batch waiting (not on the wire) with this deadline.
    fn lone_request(within: Duration) -> BatchRequest {
        let (mut request, ..) = request(&[b"a".to_vec()]);
        request.latest_deadline = now() + within;
        request
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_per_attempt_up_to_its_cap_and_attempts_are_bounded() {
        let ms = Duration::from_millis;
        let (service, mut link) = retrying(policy(ms(100), ms(350), 6));
        let call = tokio::spawn(service.oneshot(lone_request(LONG)));
        let mut attempts = Vec::new();
        while let Some((_, reply)) = link.next_request().await {
            attempts.push(tokio::time::Instant::now());
            reply.send_error(busy());
        }
        assert_eq!(
            call.await.unwrap(),
            Err(busy()),
            "the last error, after the last attempt"
        );
        let pauses: Vec<_> = attempts.windows(2).map(|pair| pair[1] - pair[0]).collect();
        assert_eq!(pauses, [ms(100), ms(200), ms(350), ms(350), ms(350)]);
    }

    #[test]
    fn jitter_spreads_pauses_over_the_whole_range_below_the_ceiling() {
        let mut policy = RetryPolicy::new(&settings());
        policy.attempts = 3;
        let ceiling = policy.ceiling();
        assert_eq!(ceiling, settings().initial_backoff * 4);
        let pauses: Vec<_> = (0..2000).map(|_| policy.backoff()).collect();
        assert!(pauses.iter().all(|&pause| pause < ceiling));
        assert!(pauses.iter().any(|&pause| pause < ceiling / 10));
        assert!(pauses.iter().any(|&pause| pause > ceiling * 9 / 10));
    }

    #[tokio::test(start_paused = true)]
    async fn only_retryable_errors_are_retried() {
        let retryable = [
            busy(),
            SendError::service(AmqpCondition::Timeout, "slow"),
            SendError::service(AmqpCondition::InternalError, "oops"),
            SendError::Connection("reset".into()),
            SendError::NotProcessed("released"),
        ];
        let final_ = [
            SendError::service(AmqpCondition::Unauthorized, "expired"),
            SendError::service(AmqpCondition::NotFound, "no hub"),
            argument_error(),
            SendError::TooLarge { size: 2, limit: 1 },
            SendError::DeadlineExceeded { last_error: None },
        ];
        for (error, retried) in retryable
            .into_iter()
            .map(|e| (e, true))
            .chain(final_.into_iter().map(|e| (e, false)))
        {
            let (service, mut link) = retrying(policy(Duration::from_millis(10), LINGER, 3));
            let call = tokio::spawn(service.oneshot(lone_request(LONG)));
            let (_, reply) = link.next_request().await.unwrap();
            reply.send_error(error.clone());
            // Bounded, so that a retry nobody answers fails the test instead of hanging it.
            let call = tokio::time::timeout(LONG, call);
            if retried {
                let (_, reply) = link.next_request().await.expect("retried");
                reply.send_response(());
                assert_eq!(call.await.unwrap().unwrap(), Ok(()), "{error}");
            } else {
                let result = call.await.expect("answered without a retry").unwrap();
                assert_eq!(result, Err(error.clone()));
                assert!(
                    link.next_request().await.is_none(),
                    "{error} is not retried"
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_the_batchs_deadline_without_sleeping_towards_it() {
        let ms = Duration::from_millis;
        let (service, mut link) = retrying(policy(ms(400), LONG, 10));
        let started = tokio::time::Instant::now();
        let call = tokio::spawn(service.oneshot(lone_request(ms(1000))));
        let mut attempts = 0;
        while let Some((_, reply)) = link.next_request().await {
            attempts += 1;
            reply.send_error(busy());
        }
        let result = call.await.unwrap();
        // At 0 and 400 ms; the next pause (800 ms) would end past the deadline.
        assert_eq!(attempts, 2);
        assert_eq!(started.elapsed(), ms(400));
        assert_eq!(
            result,
            Err(SendError::DeadlineExceeded {
                last_error: Some(busy().to_string())
            })
        );
    }
}
