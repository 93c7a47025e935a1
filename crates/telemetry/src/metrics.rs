//! Prometheus metrics: the process-wide recorder (installed once), every metric's name and description, the
//! recording helpers the handlers and the producer call, and the scrape, which asks every [`Report`] (the
//! owners of gauges and totals: producer, gateway state, load shedding) to copy theirs into the registry just
//! before rendering it.
//!
//! The recorder is global to the process (the `metrics` facade has one). Counters and histograms recorded by
//! handlers and routes are therefore process-wide sums: in a process running several gateways (in-process
//! tests) they add up across them. The values copied at scrape time (pool, buffers, calls, streams' sources)
//! describe the gateway whose listener was scraped; the copied totals (`*_total` from the owners' own
//! counts) only move up, so with several gateways they show the largest one's.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ::metrics::{
    Counter, Gauge, SharedString, Unit, counter, describe_counter, describe_gauge,
    describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use parking_lot::Mutex;

/// Events taken from requests, by hub and RPC (`send_event`, `send_events`, `send_stream`).
pub const EVENTS_RECEIVED: &str = "eventhub_gateway_events_received_total";
/// Events answered, by hub and outcome (`ok`, an `ErrorInfo` reason in lower case, or `cancelled`).
pub const EVENTS_SENT: &str = "eventhub_gateway_events_sent_total";
/// Events received and not answered yet, by hub.
pub const EVENTS_IN_FLIGHT: &str = "eventhub_gateway_events_in_flight";
/// Events per AMQP batch sent (histogram), by hub.
pub const BATCH_EVENTS: &str = "eventhub_gateway_batch_events";
/// Encoded bytes per AMQP batch sent (histogram), by hub.
pub const BATCH_BYTES: &str = "eventhub_gateway_batch_bytes";
/// One batch through the send stack, rate limit and retries included (histogram), by hub and outcome.
pub const SEND_DURATION: &str = "eventhub_gateway_send_duration_seconds";
/// Batch retries scheduled, by hub.
pub const RETRIES: &str = "eventhub_gateway_retries_total";
/// Batches Event Hubs refused whole for an event's contents, sent again in halves.
pub const BATCH_SPLITS: &str = "eventhub_gateway_batch_splits_total";
/// Pooled connections, by state (`ready`, `retiring`, `opening`).
pub const POOL_CONNECTIONS: &str = "eventhub_gateway_pool_connections";
/// Sender links across the pool's connections.
pub const POOL_LINKS: &str = "eventhub_gateway_pool_links";
/// Batches queued on or in flight over the pool's links.
pub const BATCHES_IN_FLIGHT: &str = "eventhub_gateway_batches_in_flight";
/// Callers waiting for a link with room.
pub const POOL_WAITERS: &str = "eventhub_gateway_pool_waiters";
/// Encoded event bytes buffered or in flight (bounded by `producer.max_buffered_bytes`).
pub const BUFFERED_BYTES: &str = "eventhub_gateway_buffered_bytes";
/// Routes (hub + key, hub + partition, hub) with a batcher running.
pub const PRODUCER_ROUTES: &str = "eventhub_gateway_producer_routes";
/// Connections to Event Hubs that opened since start (failed attempts are not counted).
pub const CONNECTIONS_OPENED: &str = "eventhub_gateway_connections_opened_total";
/// Connection attempts to Event Hubs since start, whatever their outcome.
pub const CONNECTION_ATTEMPTS: &str = "eventhub_gateway_connection_attempts_total";
/// Connection attempts that failed, by `reason`: the stage that failed (`proxy`, `tcp`, `tls`, `websocket`, `amqp`,
/// `timeout`).
pub const CONNECTION_FAILURES: &str = "eventhub_gateway_connection_failures_total";
/// Open connections declared dead because work awaited an answer while nothing arrived for `stall_timeout`.
pub const CONNECTIONS_STALLED: &str = "eventhub_gateway_connections_stalled_total";
/// gRPC client connections that reached `limits.max_connection_age_seconds`, by `end`: `goaway` (each, when it
/// was sent its GOAWAY) and `forced` (those still open after the grace, closed under their calls).
pub const CLIENT_CONNECTIONS_AGED: &str = "eventhub_gateway_client_connections_aged_total";
/// Tokens obtained from the credential since start.
pub const TOKEN_REFRESHES: &str = "eventhub_gateway_token_refreshes_total";
/// Token fetches that failed since start.
pub const TOKEN_REFRESH_FAILURES: &str = "eventhub_gateway_token_refresh_failures_total";
/// Batches that waited for the producer's own rate limit toward Event Hubs.
pub const PRODUCER_RATE_LIMITED_BATCHES: &str =
    "eventhub_gateway_producer_rate_limited_batches_total";
/// Events refused by the gateway's per-client or global rate limit.
pub const RATE_LIMITED_EVENTS: &str = "eventhub_gateway_rate_limited_events_total";
/// Calls refused UNAUTHENTICATED, by `reason` (`missing`, `expired`, `wrong_audience`, ...).
pub const AUTH_FAILURES: &str = "eventhub_gateway_auth_failures_total";
/// Authenticated calls, by the `grant` of their identity (its first; `none` for an identity without one).
pub const GRANT_CALLS: &str = "eventhub_gateway_grant_calls_total";
/// Events admitted under each `grant`, and events refused HUB_NOT_ALLOWED (`grant="none"`).
pub const GRANT_EVENTS: &str = "eventhub_gateway_grant_events_total";
/// REST send API requests answered, by `route` (`hub`, `partition`, `publisher`, `none`) and HTTP `status`.
pub const REST_REQUESTS: &str = "eventhub_gateway_rest_requests_total";
/// Calls shed (answered OVERLOADED at once) at `limits.max_concurrent_calls` or `limits.max_calls_per_client`.
pub const SHED_CALLS: &str = "eventhub_gateway_shed_calls_total";
/// Calls in flight (gRPC, gRPC-Web and REST requests take the same slots).
pub const CALLS_IN_FLIGHT: &str = "eventhub_gateway_calls_in_flight";
/// `SendStream` calls open.
pub const STREAMS_OPEN: &str = "eventhub_gateway_streams_open";
/// 1 when `/readyz` answers ready, else 0.
pub const READY: &str = "eventhub_gateway_ready";
/// JSON bodies checked against their hub's schema, by `event_hub` and `outcome` (`valid`, `invalid`).
pub const SCHEMA_VALIDATIONS: &str = "eventhub_gateway_schema_validations_total";
/// Schema reloads (SIGHUP), by `outcome`: `ok` (every schema swapped) or `failed` (all kept).
pub const SCHEMA_RELOADS: &str = "eventhub_gateway_schema_reloads_total";

/// The `outcome` of an event Event Hubs accepted, and of a batch sent.
pub const OUTCOME_OK: &str = "ok";
/// The `outcome` of an event whose caller went away before its answer (it may still have been stored).
pub const OUTCOME_CANCELLED: &str = "cancelled";
/// The `outcome` of a batch that failed (its events' reasons are in [`EVENTS_SENT`]).
pub const OUTCOME_ERROR: &str = "error";

/// Upper bounds of the events-per-batch buckets.
const BATCH_EVENTS_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];
/// Upper bounds of the bytes-per-batch buckets, up to Event Hubs' 1 MiB message limit (Standard).
const BATCH_BYTES_BUCKETS: &[f64] = &[
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    524_288.0,
    1_048_576.0,
];
/// Upper bounds of the send-duration buckets, seconds (a millisecond to the longest `send_timeout`s).
const SEND_DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// How often histograms are drained into their buckets between scrapes (the exporter keeps raw samples until
/// then, so without upkeep an unscraped gateway would grow them without bound).
const UPKEEP_PERIOD: Duration = Duration::from_secs(5);

/// Why the metrics could not be set up.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MetricsError {
    /// The Prometheus recorder could not be built or installed (another recorder owns the process).
    #[error("the Prometheus recorder: {0}")]
    Install(String),
}

/// The process's one Prometheus recorder; cloning shares it.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
}

static INSTALLED: OnceLock<Result<Metrics, MetricsError>> = OnceLock::new();

/// Scrapes of different gateways in one process copy their values into the same registry: one at a time, so
/// each renders its own.
static SCRAPE: Mutex<()> = Mutex::new(());

impl Metrics {
    /// Installs the recorder on first use and returns it; later calls (more gateways in one process) share it.
    pub fn install() -> Result<Self, MetricsError> {
        INSTALLED.get_or_init(install_once).clone()
    }

    /// Asks `report` to copy its gauges and totals into the registry, then renders everything in the
    /// Prometheus text format (0.0.4).
    pub fn scrape(&self, report: &dyn Report) -> String {
        let _one_at_a_time = SCRAPE.lock();
        // Registered here so the page lists it before the first stream opens.
        gauge!(STREAMS_OPEN).increment(0.0);
        report.report();
        self.handle.render()
    }
}

fn install_once() -> Result<Metrics, MetricsError> {
    let failed =
        |error: metrics_exporter_prometheus::BuildError| MetricsError::Install(error.to_string());
    // Buckets make these true Prometheus histograms (the exporter renders summaries without them).
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(BATCH_EVENTS.into()), BATCH_EVENTS_BUCKETS)
        .map_err(failed)?
        .set_buckets_for_metric(Matcher::Full(BATCH_BYTES.into()), BATCH_BYTES_BUCKETS)
        .map_err(failed)?
        .set_buckets_for_metric(Matcher::Full(SEND_DURATION.into()), SEND_DURATION_BUCKETS)
        .map_err(failed)?
        .install_recorder()
        .map_err(failed)?;
    describe();
    let upkeep = handle.clone();
    // A thread, not a task: the recorder outlives any one runtime (tests start a runtime per test).
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_PERIOD);
                upkeep.run_upkeep();
            }
        });
    if let Err(error) = spawned {
        // Rendering drains histograms too; only an unscraped gateway would hold samples longer.
        tracing::warn!(%error, "no metrics upkeep thread; histograms are drained at scrape time only");
    }
    Ok(Metrics { handle })
}

fn describe() {
    describe_counter!(
        EVENTS_RECEIVED,
        Unit::Count,
        "Events taken from requests for a served hub, by hub and RPC."
    );
    describe_counter!(
        EVENTS_SENT,
        Unit::Count,
        "Events answered, by hub and outcome: ok (accepted by Event Hubs), the ErrorInfo reason in lower case, \
         or cancelled (the caller went away first)."
    );
    describe_gauge!(
        EVENTS_IN_FLIGHT,
        Unit::Count,
        "Events received and not answered yet, by hub."
    );
    describe_histogram!(
        BATCH_EVENTS,
        Unit::Count,
        "Events per AMQP batch sent to Event Hubs, by hub."
    );
    describe_histogram!(
        BATCH_BYTES,
        Unit::Bytes,
        "Encoded bytes per AMQP batch sent to Event Hubs, by hub."
    );
    describe_histogram!(
        SEND_DURATION,
        Unit::Seconds,
        "Time of one AMQP batch through the send stack (rate limit, link, disposition, retries), by hub and \
         outcome (ok or error)."
    );
    describe_counter!(RETRIES, Unit::Count, "Batch retries scheduled, by hub.");
    describe_counter!(
        BATCH_SPLITS,
        Unit::Count,
        "Batches Event Hubs refused whole for what one event holds, sent again in two halves, by hub."
    );
    describe_gauge!(
        POOL_CONNECTIONS,
        Unit::Count,
        "Connections to Event Hubs by state: ready (taking work), retiring (being replaced), opening."
    );
    describe_gauge!(
        POOL_LINKS,
        Unit::Count,
        "Sender links across the pool's connections."
    );
    describe_gauge!(
        BATCHES_IN_FLIGHT,
        Unit::Count,
        "Batches queued on or in flight over the pool's links."
    );
    describe_gauge!(
        POOL_WAITERS,
        Unit::Count,
        "Sends waiting for a link with room in its window."
    );
    describe_gauge!(
        BUFFERED_BYTES,
        Unit::Bytes,
        "Encoded event bytes buffered or in flight (at most producer.max_buffered_bytes)."
    );
    describe_gauge!(
        PRODUCER_ROUTES,
        Unit::Count,
        "Routes (hub and key, hub and partition, or hub) with a batcher running."
    );
    describe_counter!(
        CONNECTIONS_OPENED,
        Unit::Count,
        "Connections to Event Hubs that opened since start (failed attempts are not counted)."
    );
    describe_counter!(
        CONNECTIONS_STALLED,
        Unit::Count,
        "Open connections declared dead and replaced because work awaited an answer while nothing (no frame, no \
         heartbeat) arrived for stall_timeout."
    );
    describe_counter!(
        CONNECTION_ATTEMPTS,
        Unit::Count,
        "Connection attempts to Event Hubs since start, whatever their outcome."
    );
    describe_counter!(
        CONNECTION_FAILURES,
        Unit::Count,
        "Connection attempts that failed, by reason: the stage that failed (proxy: the HTTP CONNECT proxy; tcp: refused, unreachable or \
         unresolved; tls; websocket; amqp: AMQP/SASL open, session or $cbs links; timeout: \
         pool_connection_create_timeout passed)."
    );
    describe_counter!(
        CLIENT_CONNECTIONS_AGED,
        Unit::Count,
        "gRPC client connections that reached limits.max_connection_age_seconds, by end: goaway (sent their GOAWAY: \
         calls in flight finish, new calls go to a new connection) or forced (still open after \
         limits.max_connection_age_grace_seconds, closed under their calls)."
    );
    describe_counter!(
        TOKEN_REFRESHES,
        Unit::Count,
        "Tokens obtained from the credential since start."
    );
    describe_counter!(
        TOKEN_REFRESH_FAILURES,
        Unit::Count,
        "Token fetches that failed since start (retried with backoff)."
    );
    describe_counter!(
        PRODUCER_RATE_LIMITED_BATCHES,
        Unit::Count,
        "Batches that waited for the producer's rate limit toward Event Hubs."
    );
    describe_counter!(
        AUTH_FAILURES,
        Unit::Count,
        "Calls refused UNAUTHENTICATED, by reason (missing, expired, wrong_audience, ...)."
    );
    describe_counter!(
        GRANT_CALLS,
        Unit::Count,
        "Authenticated calls by the grant of their identity (none: an identity without a grant)."
    );
    describe_counter!(
        GRANT_EVENTS,
        Unit::Count,
        "Events by the grant that admitted them (none: refused HUB_NOT_ALLOWED)."
    );
    describe_counter!(
        RATE_LIMITED_EVENTS,
        Unit::Count,
        "Events refused with RATE_LIMITED by the per-client or global limit."
    );
    describe_counter!(
        REST_REQUESTS,
        Unit::Count,
        "REST send API requests answered, by route (hub, partition, publisher, none) and HTTP status."
    );
    describe_counter!(
        SHED_CALLS,
        Unit::Count,
        "Calls answered OVERLOADED at once: limits.max_concurrent_calls (bound=total) or the caller's limits.max_calls_per_client (bound=per_client) were in flight."
    );
    describe_gauge!(
        CALLS_IN_FLIGHT,
        Unit::Count,
        "Calls in flight: gRPC and gRPC-Web calls and REST send API requests."
    );
    describe_gauge!(STREAMS_OPEN, Unit::Count, "SendStream calls open.");
    describe_gauge!(
        READY,
        Unit::Count,
        "1 when the gateway is ready (a ready connection to Event Hubs, not draining), else 0."
    );
    describe_counter!(
        SCHEMA_VALIDATIONS,
        Unit::Count,
        "JSON bodies checked against their hub's JSON Schema, by hub and outcome (valid, invalid: refused \
         SCHEMA_VIOLATION)."
    );
    describe_counter!(
        SCHEMA_RELOADS,
        Unit::Count,
        "Schema reloads on SIGHUP, by outcome: ok (every schema swapped) or failed (every schema kept)."
    );
}

/// One hub's schema-validation counters, resolved once (each JSON event of a hub with a schema counts one).
pub struct SchemaValidations {
    valid: Counter,
    invalid: Counter,
}

impl SchemaValidations {
    /// The counters of `hub` (a served hub with a schema).
    pub fn new(hub: &str) -> Self {
        let hub: SharedString = SharedString::from(Arc::<str>::from(hub));
        Self {
            valid: counter!(SCHEMA_VALIDATIONS, "event_hub" => hub.clone(), "outcome" => "valid"),
            invalid: counter!(SCHEMA_VALIDATIONS, "event_hub" => hub, "outcome" => "invalid"),
        }
    }

    /// Counts a body that matched its schema.
    pub fn valid(&self) {
        self.valid.increment(1);
    }

    /// Counts a body refused by its schema.
    pub fn invalid(&self) {
        self.invalid.increment(1);
    }
}

/// Counts one schema reload by its outcome.
pub fn schema_reloaded(ok: bool) {
    let outcome = if ok { OUTCOME_OK } else { "failed" };
    counter!(SCHEMA_RELOADS, "outcome" => outcome).increment(1);
}

/// Which RPC took an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rpc {
    /// `SendEvent`.
    SendEvent,
    /// `SendEvents`.
    SendEvents,
    /// `SendStream`.
    SendStream,
}

impl Rpc {
    /// The `rpc` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SendEvent => "send_event",
            Self::SendEvents => "send_events",
            Self::SendStream => "send_stream",
        }
    }
}

/// One served hub's event counters for one RPC: resolved in the registry once, then shared by every event
/// (a stream counts each event, so a lookup per event would cost more than the count).
#[derive(Clone)]
pub struct HubEvents {
    inner: Arc<HubEventsInner>,
}

struct HubEventsInner {
    hub: SharedString,
    received: Counter,
    ok: Counter,
    in_flight: Gauge,
}

impl HubEvents {
    /// The counters of `hub` (a served hub: its name is a label) for `rpc`.
    pub fn new(hub: &str, rpc: Rpc) -> Self {
        let hub: SharedString = SharedString::from(Arc::<str>::from(hub));
        Self {
            inner: Arc::new(HubEventsInner {
                received: counter!(EVENTS_RECEIVED, "event_hub" => hub.clone(), "rpc" => rpc.as_str()),
                ok: counter!(EVENTS_SENT, "event_hub" => hub.clone(), "outcome" => OUTCOME_OK),
                in_flight: gauge!(EVENTS_IN_FLIGHT, "event_hub" => hub.clone()),
                hub,
            }),
        }
    }

    /// Counts `count` events as received; the guard records each one's outcome.
    pub fn receive(&self, count: u64) -> Outcomes {
        let inner = &self.inner;
        inner.received.increment(count);
        inner.in_flight.increment(count as f64);
        Outcomes {
            events: self.clone(),
            pending: count,
        }
    }

    fn sent(&self, outcome: &'static str, count: u64) {
        if count == 0 {
            return;
        }
        let inner = &self.inner;
        if outcome == OUTCOME_OK {
            inner.ok.increment(count);
        } else {
            counter!(EVENTS_SENT, "event_hub" => inner.hub.clone(), "outcome" => outcome)
                .increment(count);
        }
        inner.in_flight.decrement(count as f64);
    }
}

/// The outcomes still to record of events received; what is left when it is dropped (the caller went away
/// and its call was dropped) is counted [`OUTCOME_CANCELLED`], so every received event is counted sent once.
#[must_use = "dropping it counts its events as cancelled"]
pub struct Outcomes {
    events: HubEvents,
    pending: u64,
}

impl Outcomes {
    /// `count` events were accepted by Event Hubs.
    pub fn ok(&mut self, count: u64) {
        self.record(OUTCOME_OK, count);
    }

    /// `count` events failed with this reason (`GatewayError::reason`).
    pub fn failed(&mut self, reason: &'static str, count: u64) {
        self.record(reason, count);
    }

    /// Every event not answered yet failed with this reason (a refusal of the whole request).
    pub fn fail_remaining(&mut self, reason: &'static str) {
        self.record(reason, self.pending);
    }

    fn record(&mut self, outcome: &'static str, count: u64) {
        // Never more than were received: a caller's slip must not make the counters disagree.
        let count = count.min(self.pending);
        self.pending -= count;
        self.events.sent(outcome, count);
    }
}

impl Drop for Outcomes {
    fn drop(&mut self) {
        let pending = self.pending;
        self.record(OUTCOME_CANCELLED, pending);
    }
}

/// A stream's [`HubEvents`] per hub, so each event of a stream costs no registry lookup.
pub struct HubEventsCache {
    rpc: Rpc,
    hubs: Vec<(String, HubEvents)>,
}

impl HubEventsCache {
    /// An empty cache for `rpc`.
    pub fn new(rpc: Rpc) -> Self {
        Self {
            rpc,
            hubs: Vec::new(),
        }
    }

    /// The counters of `hub` (a served hub), resolved on first use.
    pub fn get(&mut self, hub: &str) -> &HubEvents {
        // Served hubs are few (the configured list): a scan beats hashing.
        let index = match self.hubs.iter().position(|(name, _)| name == hub) {
            Some(index) => index,
            None => {
                self.hubs
                    .push((hub.to_owned(), HubEvents::new(hub, self.rpc)));
                self.hubs.len() - 1
            }
        };
        &self.hubs[index].1
    }
}

/// An open `SendStream`, counted in [`STREAMS_OPEN`] until dropped.
pub struct OpenStream {
    gauge: Gauge,
}

impl OpenStream {
    /// Counts one more open stream.
    pub fn open() -> Self {
        let gauge = gauge!(STREAMS_OPEN);
        gauge.increment(1.0);
        Self { gauge }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

/// Awaits one batch's `send` through the send stack and records its size, duration and outcome.
pub async fn time_batch<T, E>(
    hub: &Arc<str>,
    events: u64,
    bytes: u64,
    send: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let started = Instant::now();
    let result = send.await;
    let elapsed = started.elapsed();
    let label = || SharedString::from(Arc::clone(hub));
    let outcome = if result.is_ok() {
        OUTCOME_OK
    } else {
        OUTCOME_ERROR
    };
    histogram!(BATCH_EVENTS, "event_hub" => label()).record(events as f64);
    histogram!(BATCH_BYTES, "event_hub" => label()).record(bytes as f64);
    histogram!(SEND_DURATION, "event_hub" => label(), "outcome" => outcome)
        .record(elapsed.as_secs_f64());
    result
}

/// How a connection that reached its age ended (the `end` label of [`CLIENT_CONNECTIONS_AGED`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgedEnd {
    /// It was sent its GOAWAY.
    GoAway,
    /// It was still open after the grace, and closed.
    Forced,
}

/// Counts a client connection that reached its age and ended as `end` says.
pub fn connection_aged(end: AgedEnd) {
    let end = match end {
        AgedEnd::GoAway => "goaway",
        AgedEnd::Forced => "forced",
    };
    counter!(CLIENT_CONNECTIONS_AGED, "end" => end).increment(1);
}

/// Counts a batch retry scheduled for `hub`.
pub fn retry_scheduled(hub: &Arc<str>) {
    counter!(RETRIES, "event_hub" => SharedString::from(Arc::clone(hub))).increment(1);
}

/// Counts a refused batch of `hub` split in two to be sent again.
pub fn batch_split(hub: &Arc<str>) {
    counter!(BATCH_SPLITS, "event_hub" => SharedString::from(Arc::clone(hub))).increment(1);
}

/// An owner of gauges and totals that copies them into the registry when a scrape asks (owners report, the
/// server assembles the reports, as linkerd's `FmtMetrics` does), so this module imports nothing above it.
pub trait Report: Send + Sync {
    /// Sets this owner's gauges and absolute totals from its current state.
    fn report(&self);
}

/// Several reports as one, asked in order.
#[derive(Clone, Default)]
pub struct Reports(Vec<Arc<dyn Report>>);

impl Reports {
    /// These reports and `report` after them.
    pub fn and(mut self, report: Arc<dyn Report>) -> Self {
        self.0.push(report);
        self
    }
}

impl Report for Reports {
    fn report(&self) {
        for report in &self.0 {
            report.report();
        }
    }
}

/// Sets the [`READY`] gauge.
pub fn set_ready(ready: bool) {
    gauge!(READY).set(if ready { 1.0 } else { 0.0 });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_labels_are_the_method_names_in_snake_case() {
        assert_eq!(Rpc::SendEvent.as_str(), "send_event");
        assert_eq!(Rpc::SendEvents.as_str(), "send_events");
        assert_eq!(Rpc::SendStream.as_str(), "send_stream");
    }

    #[test]
    fn every_received_event_is_counted_sent_once_even_when_its_caller_goes_away() {
        let metrics = Metrics::install().unwrap();
        let events = HubEvents::new("unit-outcomes", Rpc::SendEvents);
        {
            let mut outcomes = events.receive(5);
            outcomes.ok(2);
            outcomes.failed("deadline_exceeded", 1);
            outcomes.ok(9); // more than pending: clipped to the 2 left
        }
        drop(events.receive(3)); // a call dropped before any answer
        let page = metrics.handle.render();
        let sample = |line: &str| {
            page.lines()
                .find_map(|l| l.strip_prefix(line))
                .map(str::trim)
                .map(str::to_owned)
        };
        assert_eq!(
            sample(
                "eventhub_gateway_events_received_total{event_hub=\"unit-outcomes\",rpc=\"send_events\"}"
            )
            .as_deref(),
            Some("8")
        );
        assert_eq!(
            sample(
                "eventhub_gateway_events_sent_total{event_hub=\"unit-outcomes\",outcome=\"ok\"}"
            )
            .as_deref(),
            Some("4")
        );
        assert_eq!(
            sample(
                "eventhub_gateway_events_sent_total{event_hub=\"unit-outcomes\",outcome=\"deadline_exceeded\"}"
            )
            .as_deref(),
            Some("1")
        );
        assert_eq!(
            sample(
                "eventhub_gateway_events_sent_total{event_hub=\"unit-outcomes\",outcome=\"cancelled\"}"
            )
            .as_deref(),
            Some("3")
        );
        assert_eq!(
            sample("eventhub_gateway_events_in_flight{event_hub=\"unit-outcomes\"}").as_deref(),
            Some("0")
        );
    }
}
