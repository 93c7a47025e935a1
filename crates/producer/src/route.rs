//! One route's batcher (hub + partition key, hub + partition id, or hub round-robin): events accumulate for at
//! most `linger` or until the next would not fit, batches go out through the retrying send stack, and each
//! event that went on the wire with its batch gets the batch's outcome (one whose deadline passed first was
//! left out and answered by its ticket).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tower::retry::{Policy, Retry};
use tower::{ServiceBuilder, ServiceExt};

use super::batch::{BatchBuilder, SealedBatch};
use super::claim::Claim;
use super::error::SendError;
use super::event::TraceContext;
use super::pool::Pool;
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
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RouteKey {
    /// The event hub.
    pub hub: String,
    /// Where in it.
    pub target: Target,
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
    pub reply: oneshot::Sender<Result<Receipt, SendError>>,
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

/// Retries retryable failures with exponential backoff and full jitter, within the attempts and the deadline.
#[derive(Clone)]
pub struct RetryPolicy {
    attempts: u32,
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
}

impl RetryPolicy {
    fn backoff(&self) -> Duration {
        let exponent = self.attempts.saturating_sub(1).min(20);
        let ceiling = self
            .initial_backoff
            .saturating_mul(1 << exponent)
            .min(self.max_backoff);
        ceiling.mul_f64(rand::rng().random::<f64>())
    }
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
        if Instant::now() + pause >= request.deadline() {
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
pub type SendStack = RateLimit<Retry<RetryPolicy, LinkService>>;

/// Builds the send stack over a pool.
pub fn send_stack(
    pool: Arc<Pool>,
    throttle: Option<Arc<Throttle>>,
    settings: &RouteSettings,
) -> SendStack {
    let retry = RetryPolicy {
        attempts: 0,
        max_attempts: settings.max_attempts,
        initial_backoff: settings.initial_backoff,
        max_backoff: settings.max_backoff,
    };
    ServiceBuilder::new()
        .layer(RateLimitLayer::new(throttle))
        .retry(retry)
        .service(LinkService { pool })
}

struct OpenBatch {
    builder: BatchBuilder,
    waiters: Waiters,
    claims: Vec<Arc<Claim>>,
    traces: Vec<TraceContext>,
    latest_deadline: Instant,
    seal_at: Instant,
}

type Waiters = Vec<(
    oneshot::Sender<Result<Receipt, SendError>>,
    OwnedSemaphorePermit,
)>;

/// What a route needs from the producer: the send stack, the link size limit, and leave to end.
pub trait RouteHost: Send + Sync + 'static {
    /// The send stack.
    fn stack(&self) -> SendStack;
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

/// Runs a route until its channel closes (producer closing) or it idles out, answering every event it took.
pub async fn run_route<H: RouteHost>(
    host: Arc<H>,
    key: RouteKey,
    mut events: mpsc::Receiver<Pending>,
    own_sender: mpsc::WeakSender<Pending>,
    settings: RouteSettings,
) {
    let partition: Option<Arc<str>> = key.target.partition_id().map(Arc::from);
    let partition_key = key.target.partition_key().map(str::to_owned);
    let mut receipt = Receipt {
        partition_id: partition.as_deref().map(str::to_owned),
    };
    let hub: Arc<str> = Arc::from(key.hub.as_str());
    let key_hub = key.hub.clone();
    let mut ask_key_partition_at = Instant::now();
    let mut limit: Option<u64> = None;
    let mut open: Option<OpenBatch> = None;
    let mut ready: VecDeque<Sealed> = VecDeque::new();
    let mut in_flight = FuturesUnordered::new();
    let mut closed = false;
    let mut last_activity = Instant::now();
    loop {
        let accepting = !closed && ready.len() < 2;
        let seal_at = open.as_ref().map(|batch| batch.seal_at);
        tokio::select! {
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {
                last_activity = Instant::now();
            }
            event = events.recv(), if accepting => match event {
                None => closed = true,
                Some(event) if event.claim.is_expired() => {
                    // Its ticket answered it already: it takes no room in a batch.
                    drop(event);
                }
                Some(event) => {
                    last_activity = Instant::now();
                    let event_limit = match limit {
                        Some(limit) => limit,
                        None => match host.max_message_size(&key, event.deadline).await {
                            Ok(found) => *limit.insert(found),
                            Err(error) => {
                                let _ = event.reply.send(Err(error));
                                continue;
                            }
                        },
                    };
                    if let Err(error) = BatchBuilder::check_fits_alone(partition_key.as_deref(), event.encoded.len(), event_limit) {
                        let _ = event.reply.send(Err(error));
                        continue;
                    }
                    if receipt.partition_id.is_none()
                        && Instant::now() >= ask_key_partition_at
                        && let Some(key) = partition_key.as_deref()
                    {
                        // Not knowing it does not stop the send; the route asks again a while later.
                        match host.key_partition(&key_hub, key, event.deadline).await {
                            Ok(id) => receipt.partition_id = Some(id),
                            Err(error) => {
                                ask_key_partition_at = Instant::now() + KEY_PARTITION_RETRY;
                                tracing::debug!(hub = %key_hub, %error, "the partition of a key is not known");
                            }
                        }
                    }
                    let mut encoded = event.encoded;
                    loop {
                        let batch = open.get_or_insert_with(|| OpenBatch {
                            builder: BatchBuilder::new(partition_key.clone(), event_limit),
                            waiters: Vec::new(),
                            claims: Vec::new(),
                            traces: Vec::new(),
                            latest_deadline: event.deadline,
                            seal_at: Instant::now() + settings.linger,
                        });
                        match batch.builder.try_push(encoded) {
                            Ok(()) => break,
                            Err(back) => {
                                encoded = back;
                                if let Some(full) = open.take() {
                                    ready.push_back(seal(full, &hub, &partition, &settings));
                                }
                            }
                        }
                    }
                    if let Some(batch) = open.as_mut() {
                        batch.latest_deadline = batch.latest_deadline.max(event.deadline);
                        batch.waiters.push((event.reply, event.permit));
                        batch.claims.push(event.claim);
                        batch.traces.extend(event.trace_context);
                        if batch.builder.len() >= settings.max_batch_events
                            && let Some(full) = open.take()
                        {
                            ready.push_back(seal(full, &hub, &partition, &settings));
                        }
                    }
                }
            },
            () = sleep_until_opt(seal_at), if seal_at.is_some() => {
                if let Some(batch) = open.take() {
                    ready.push_back(seal(batch, &hub, &partition, &settings));
                }
            }
            () = idle_until(last_activity + settings.idle_exit, host.route_wanted()),
                if !closed && open.is_none() && ready.is_empty() && in_flight.is_empty() =>
            {
                if let Some(sender) = own_sender.upgrade()
                    && host.retire_route(&key, &sender, &|| events.is_empty())
                {
                    events.close();
                } else {
                    last_activity = Instant::now();
                }
            }
        }
        if closed && let Some(batch) = open.take() {
            ready.push_back(seal(batch, &hub, &partition, &settings)); // closing: no lingering
        }
        while in_flight.len() < settings.max_in_flight
            && let Some(Sealed {
                request,
                waiters,
                traces,
            }) = ready.pop_front()
        {
            let span = send_span(&request, host.server_address(), &traces);
            let stack = host.stack();
            // Known before any event joined the batch (a key's partition is asked first).
            let receipt = receipt.clone();
            in_flight.push(
                async move {
                    let send = |request: BatchRequest| {
                        let (hub, events, bytes) =
                            (Arc::clone(&request.hub), request.events, request.bytes);
                        let sent = stack.clone().oneshot(request);
                        async move {
                            eventhub_telemetry::metrics::time_batch(&hub, events, bytes, sent).await
                        }
                    };
                    let answer = |result: Result<(), SendError>, waiters: Waiters| {
                        if let Err(error) = &result {
                            let span = tracing::Span::current();
                            span.record("error.type", error.error_type());
                            span.record("otel.status_code", "ERROR");
                            // Logged once, here, where the outcome is decided (in the span: hub and partition).
                            tracing::warn!(%error, events = waiters.len(), "batch failed");
                        }
                        for (reply, _permit) in waiters {
                            let _ = reply.send(result.clone().map(|()| receipt.clone()));
                        }
                    };
                    send_apart(request, waiters, send, answer).await;
                }
                .instrument(span),
            );
        }
        if closed && open.is_none() && ready.is_empty() && in_flight.is_empty() {
            return;
        }
    }
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

fn seal(
    batch: OpenBatch,
    hub: &Arc<str>,
    partition: &Option<Arc<str>>,
    settings: &RouteSettings,
) -> Sealed {
    let events = batch.builder.len() as u64;
    let bytes = batch.builder.size();
    Sealed {
        request: BatchRequest {
            hub: Arc::clone(hub),
            partition: partition.clone(),
            batch: Arc::new(SealedBatch::new(batch.builder, batch.claims)),
            events,
            bytes,
            latest_deadline: batch.latest_deadline,
            send_timeout: settings.send_timeout,
        },
        waiters: batch.waiters,
        traces: batch.traces,
    }
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
    use tokio::sync::Semaphore;

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
            waiters.push((reply, Arc::clone(&permits).try_acquire_owned().unwrap()));
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
                let _ = reply.send(result.clone().map(|()| Receipt { partition_id: None }));
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
}
