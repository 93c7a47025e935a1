//! The in-process contenders: raw fe2o3 batches into the emulator (the ceiling), the producer alone, and
//! tonic clients through the gateway (streams, unary calls, `SendEvents`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use eventhub_gateway::proto::v1;
use eventhub_gateway::proto::v1::event_hub_gateway_client::EventHubGatewayClient;
use eventhub_producer::BatchBuilder;
use eventhub_producer::Credential;
use eventhub_producer::NodeClient;
use eventhub_producer::link_address;
use eventhub_producer::{ConnectionString, Event, Producer, ProducerConfig, SharedAccess};
use eventhub_wire::CBS_NODE;
use fe2o3_amqp::{Connection, Sender, Session};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::{HUB, PARTITIONS};

/// One scenario's result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Outcome {
    pub scenario: String,
    pub size: usize,
    pub latency_ms: u64,
    pub events_ok: u64,
    pub events_failed: u64,
    pub seconds: f64,
    pub events_per_second: f64,
    /// p50, p99, p999 of per-event latency, milliseconds, where measured.
    pub percentiles_ms: Option<[f64; 3]>,
    pub note: Option<String>,
    /// Client and server ran on separate CPUs (`--pin`).
    #[serde(default)]
    pub pinned: bool,
}

impl Outcome {
    /// A throughput result: `ok` events answered OK in `seconds`.
    pub fn new(scenario: &str, size: usize, (ok, failed, seconds): Counts) -> Self {
        Self {
            scenario: scenario.to_owned(),
            size,
            latency_ms: 0,
            events_ok: ok,
            events_failed: failed,
            seconds,
            events_per_second: ok as f64 / seconds.max(1e-9),
            percentiles_ms: None,
            note: None,
            pinned: false,
        }
    }
}

/// Events answered OK, events failed, seconds taken.
pub type Counts = (u64, u64, f64);

/// How long and how much a scenario sends.
#[derive(Clone, Copy)]
pub struct Budget {
    pub duration: Duration,
    /// Most events per scenario (smoke runs, profiles).
    pub max_events: Option<u64>,
    /// A smoke run: few workers, every failure a problem.
    pub smoke: bool,
    /// The gateway scenarios go to this gateway (in another process) instead of one of their own.
    pub external_gateway: Option<SocketAddr>,
    /// The simulated round trip of this run (the emulator's disposition delay).
    pub round_trip: Duration,
    /// Client and server on separate CPUs where they are separate processes (`--pin`).
    pub pin: bool,
}

impl Budget {
    /// Whether sending is over; otherwise takes one event (`count` events) of the budget.
    fn done(&self, started: Instant, sent: &AtomicU64) -> bool {
        self.done_for(started, sent, 1)
    }

    fn done_for(&self, started: Instant, sent: &AtomicU64, count: u64) -> bool {
        started.elapsed() >= self.duration
            || self
                .max_events
                .is_some_and(|max| sent.fetch_add(count, Ordering::Relaxed) + count > max)
    }

    /// Whether this is a smoke run (a few hundred events, few workers).
    pub fn is_smoke(&self) -> bool {
        self.smoke
    }
}

pub fn body(size: usize) -> bytes::Bytes {
    bytes::Bytes::from(vec![b'x'; size])
}

/// An event of `size` bytes of binary body.
pub fn binary_event(size: usize) -> v1::Event {
    v1::Event {
        body: Some(v1::event::Body::Binary(body(size))),
        ..Default::default()
    }
}

/// The JSON Schema of `stream-schema`: an order as a platform team would pin it down (types, required
/// properties, a pattern, bounds, items by `$ref`), so validation does real work on every event.
pub const ORDER_SCHEMA: &str = r##"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["id", "kind", "items", "note"],
  "additionalProperties": false,
  "properties": {
    "id": {"type": "integer", "minimum": 0},
    "kind": {"enum": ["order", "refund"]},
    "items": {"type": "array", "minItems": 1, "maxItems": 50, "items": {"$ref": "#/$defs/item"}},
    "note": {"type": "string", "maxLength": 1048576}
  },
  "$defs": {
    "item": {
      "type": "object",
      "required": ["sku", "price", "qty"],
      "properties": {
        "sku": {"type": "string", "pattern": "^[a-z]{3}-[0-9]{4}$"},
        "price": {"type": "number", "minimum": 0},
        "qty": {"type": "integer", "minimum": 1}
      }
    }
  }
}"##;

/// An event of about `size` bytes (at least ~150) of JSON body, `content_type` `application/json`, that
/// [`ORDER_SCHEMA`] takes: three items, padded to the size with its `note`.
pub fn json_event(size: usize) -> v1::Event {
    let head = r#"{"id":42,"kind":"order","items":[{"sku":"abc-0001","price":9.5,"qty":1},{"sku":"def-0002","price":0.25,"qty":12},{"sku":"ghi-0003","price":100,"qty":2}],"note":""#;
    let pad = size.saturating_sub(head.len() + 2);
    let mut text = String::with_capacity(head.len() + pad + 2);
    text.push_str(head);
    text.extend(std::iter::repeat_n('x', pad));
    text.push_str("\"}");
    v1::Event {
        body: Some(v1::event::Body::Binary(bytes::Bytes::from(text))),
        content_type: "application/json".into(),
        ..Default::default()
    }
}

/// Nearest-rank p50, p99 and p999, milliseconds.
pub fn percentiles(mut latencies: Vec<Duration>) -> Option<[f64; 3]> {
    if latencies.is_empty() {
        return None;
    }
    latencies.sort_unstable();
    let at = |q: f64| {
        let index = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[index].as_secs_f64() * 1000.0
    };
    Some([at(0.5), at(0.99), at(0.999)])
}

/// The (ok, failed) counts of worker tasks, added up; a worker that panicked counts nothing.
async fn sum_counts(tasks: Vec<tokio::task::JoinHandle<(u64, u64)>>) -> (u64, u64) {
    let mut total = (0, 0);
    for task in tasks {
        let (ok, failed) = task.await.unwrap_or_default();
        total = (total.0 + ok, total.1 + failed);
    }
    total
}

/// Raw pipelined batches straight into the emulator with fe2o3: one connection per two partitions' links,
/// each link keeping `WINDOW` full batches in flight, the same batch sent again and again (no encoding in
/// the loop). What this machine can ingest at all.
pub async fn ceiling(
    connection_string: &str,
    size: usize,
    budget: Budget,
) -> anyhow::Result<Counts> {
    const WINDOW: usize = 8;
    let parsed: ConnectionString = connection_string.parse()?;
    let SharedAccess::Key { name, key } = parsed.shared_access else {
        anyhow::bail!("the emulator's connection string has no key");
    };
    let address = format!("amqp://{}:{}", parsed.host, parsed.port.unwrap_or(5672));
    let audience = format!("sb://{}/{HUB}", parsed.host);
    let credential = Credential::SharedKey {
        name,
        key,
        token_lifetime: Duration::from_secs(3600),
    };
    let token = credential.fetch(&audience).await?;
    let mut senders = Vec::new();
    let mut connections = Vec::new();
    for pair in 0..PARTITIONS.div_ceil(2) {
        let mut connection = Connection::open(format!("bench-ceiling-{pair}"), address.as_str())
            .await
            .context("connecting to the emulator")?;
        let mut session = Session::begin(&mut connection).await?;
        let mut cbs = NodeClient::attach(&mut session, CBS_NODE).await?;
        cbs.put_token(&audience, &token, Duration::from_secs(10))
            .await?;
        for partition in [pair * 2, pair * 2 + 1] {
            let target = link_address(HUB, Some(&partition.to_string()));
            senders
                .push(Sender::attach(&mut session, format!("ceiling-{partition}"), target).await?);
        }
        connections.push((connection, session, cbs));
    }
    let limit = senders[0].max_message_size().unwrap_or(1024 * 1024);
    // A smoke run sends small batches, so a few hundred events make several of them.
    let most = if budget.is_smoke() { 20 } else { usize::MAX };
    let mut batch = BatchBuilder::new(None, limit);
    let encoded = Event::binary(body(size)).encode()?;
    while batch.len() < most && batch.try_push(encoded.clone()).is_ok() {}
    let per_batch = batch.len() as u64;
    let transfer = Arc::new(batch.into_transfer());
    let started = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut sender| {
            let transfer = Arc::clone(&transfer);
            let sent = Arc::clone(&sent);
            tokio::spawn(async move {
                let (mut ok, mut refused) = (0u64, 0u64);
                let mut in_flight = FuturesOrdered::new();
                let mut settle = |outcome: Result<_, _>| match outcome {
                    Ok(fe2o3_amqp::types::messaging::Outcome::Accepted(_)) => ok += per_batch,
                    _ => refused += per_batch,
                };
                let mut unsent = 0;
                while !budget.done_for(started, &sent, per_batch) {
                    match sender.send_batchable_ref(&transfer).await {
                        Ok(delivery) => in_flight.push_back(delivery),
                        Err(_) => {
                            unsent = per_batch;
                            break;
                        }
                    }
                    if in_flight.len() >= WINDOW {
                        if let Some(outcome) = in_flight.next().await {
                            settle(outcome);
                        }
                    }
                }
                while let Some(outcome) = in_flight.next().await {
                    settle(outcome);
                }
                let _ = sender.close().await;
                (ok, refused + unsent)
            })
        })
        .collect();
    let (ok, failed) = sum_counts(tasks).await;
    let seconds = started.elapsed().as_secs_f64();
    for (mut connection, mut session, cbs) in connections {
        drop(cbs);
        let _ = session.end().await;
        let _ = connection.close().await;
    }
    Ok((ok, failed, seconds))
}

/// The rate `direct` is offered at most: above the best it reached with no round trip (390k events/s).
const DIRECT_TARGET_RATE: f64 = 500_000.0;

/// Closed-loop callers for `direct`: each waits a round trip plus the linger per event, so a fixed 4096 would
/// cap it at 4096 / (rtt + linger), 164k events/s at 20 ms, whatever the producer pipelines. Enough callers
/// for `DIRECT_TARGET_RATE` with half again as many to spare, at least 4096, at most 65,536.
pub fn direct_callers(budget: Budget) -> usize {
    if budget.is_smoke() {
        return 64;
    }
    let wait = budget.round_trip + ProducerConfig::default().linger;
    ((DIRECT_TARGET_RATE * wait.as_secs_f64() * 1.5).ceil() as usize).clamp(4096, 65_536)
}

/// The producer alone: closed-loop senders each awaiting its event's outcome ([`direct_callers`] of them).
pub async fn direct(
    producer: &Producer,
    size: usize,
    keys: Option<usize>,
    budget: Budget,
) -> Counts {
    let senders = direct_callers(budget);
    let started = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..senders)
        .map(|sender| {
            let producer = producer.clone();
            let sent = Arc::clone(&sent);
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u64, 0u64);
                let mut i = sender;
                while !budget.done(started, &sent) {
                    let mut event = Event::binary(body(size));
                    if let Some(keys) = keys {
                        event = event.with_partition_key(format!("key-{}", i % keys));
                    }
                    match producer.send(HUB, event).await {
                        Ok(_) => ok += 1,
                        Err(_) => failed += 1,
                    }
                    i += senders;
                }
                (ok, failed)
            })
        })
        .collect();
    let (ok, failed) = sum_counts(tasks).await;
    (ok, failed, started.elapsed().as_secs_f64())
}

pub async fn connect(addr: SocketAddr) -> anyhow::Result<EventHubGatewayClient<Channel>> {
    Ok(EventHubGatewayClient::connect(format!("http://{addr}")).await?)
}

/// A client whose connection comes from `source` (any of 127.0.0.0/8 on Linux): the gateway counts
/// connections and calls per peer address, and one address cannot hold thousands.
pub async fn connect_from(
    addr: SocketAddr,
    source: std::net::Ipv4Addr,
) -> anyhow::Result<EventHubGatewayClient<Channel>> {
    let connector = tower::service_fn(move |_: tonic::transport::Uri| async move {
        let stream = connect_tcp(addr, source).await?;
        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_with_connector(connector)
        .await?;
    Ok(EventHubGatewayClient::new(channel))
}

/// A TCP connection to `addr` from `source` (port chosen by the kernel), without Nagle's delay.
pub async fn connect_tcp(
    addr: SocketAddr,
    source: std::net::Ipv4Addr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// `SendStream` calls, each on its own connection, fed as fast as flow control allows, `per_message` events
/// per message (1: in `event`; more: in `events`).
pub async fn stream(
    addr: SocketAddr,
    size: usize,
    per_message: u64,
    event: fn(usize) -> v1::Event,
    budget: Budget,
) -> Counts {
    let streams = if budget.is_smoke() { 2 } else { 8 };
    let started = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let sent = Arc::clone(&sent);
            tokio::spawn(async move {
                let Ok(mut client) = connect(addr).await else {
                    return (0, 0);
                };
                let (requests, outbound) = mpsc::channel(1024);
                tokio::spawn(async move {
                    let mut sequence = 1;
                    while !budget.done_for(started, &sent, per_message) {
                        let mut request = v1::SendStreamRequest {
                            event_hub: String::new(),
                            sequence,
                            event: None,
                            events: Vec::new(),
                        };
                        if per_message == 1 {
                            request.event = Some(event(size));
                        } else {
                            request.events = (0..per_message).map(|_| event(size)).collect();
                        }
                        sequence += per_message;
                        if requests.send(request).await.is_err() {
                            break;
                        }
                    }
                });
                let (mut ok, mut failed) = (0u64, 0u64);
                let Ok(response) = client.send_stream(ReceiverStream::new(outbound)).await else {
                    return (0, 0);
                };
                let mut acks = response.into_inner();
                while let Ok(Some(response)) = acks.message().await {
                    for ack in response.acks {
                        if ack.status.is_some_and(|s| s.code == 0) {
                            ok += 1;
                        } else {
                            failed += 1;
                        }
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let (ok, failed) = sum_counts(tasks).await;
    (ok, failed, started.elapsed().as_secs_f64())
}

/// Logs the first few failed calls of a run (a failure in a benchmark is a finding, not noise).
fn report_failure(status: &tonic::Status) {
    static REPORTED: AtomicU64 = AtomicU64::new(0);
    if REPORTED.fetch_add(1, Ordering::Relaxed) < 5 {
        eprintln!(
            "bench: a call failed: {:?} {}",
            status.code(),
            status.message()
        );
    }
}

/// Unary calls' counts and each call's latency.
pub struct Calls {
    pub counts: Counts,
    pub latencies: Vec<Duration>,
}

/// Closed-loop unary callers (`per_call` events per call: 1 = `SendEvent`, more = `SendEvents`), or, with
/// `rate`, calls started at that rate whatever the answers (open loop), for latency percentiles.
pub async fn unary(
    addr: SocketAddr,
    size: usize,
    per_call: usize,
    callers: usize,
    rate: Option<f64>,
    budget: Budget,
) -> anyhow::Result<Calls> {
    let started = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let mut channels = Vec::new();
    for _ in 0..callers.min(16) {
        channels.push(connect(addr).await?);
    }
    let call = move |mut client: EventHubGatewayClient<Channel>| async move {
        let began = Instant::now();
        let ok = if per_call == 1 {
            let request = v1::SendEventRequest {
                event_hub: String::new(),
                event: Some(binary_event(size)),
            };
            match client.send_event(request).await {
                Ok(_) => 1,
                Err(status) => {
                    report_failure(&status);
                    0
                }
            }
        } else {
            let request = v1::SendEventsRequest {
                event_hub: String::new(),
                events: (0..per_call).map(|_| binary_event(size)).collect(),
            };
            match client.send_events(request).await {
                Ok(response) => response
                    .into_inner()
                    .results
                    .iter()
                    .filter(|r| r.status.as_ref().is_some_and(|s| s.code == 0))
                    .count() as u64,
                Err(status) => {
                    report_failure(&status);
                    0
                }
            }
        };
        (ok, per_call as u64 - ok, began.elapsed())
    };
    let per_call_budget = per_call as u64;
    let results: Vec<(u64, u64, Duration)> = match rate {
        None => {
            let tasks: Vec<_> = (0..callers)
                .map(|caller| {
                    let client = channels[caller % channels.len()].clone();
                    let sent = Arc::clone(&sent);
                    tokio::spawn(async move {
                        let mut results = Vec::new();
                        while !budget.done_for(started, &sent, per_call_budget) {
                            results.push(call(client.clone()).await);
                        }
                        results
                    })
                })
                .collect();
            let mut all = Vec::new();
            for task in tasks {
                all.extend(task.await.unwrap_or_default());
            }
            all
        }
        Some(rate) => {
            let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1.0)));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut calls = Vec::new();
            let mut index = 0;
            while !budget.done_for(started, &sent, per_call_budget) {
                ticker.tick().await;
                calls.push(tokio::spawn(call(channels[index % channels.len()].clone())));
                index += 1;
            }
            let mut all = Vec::new();
            for task in calls {
                if let Ok(result) = task.await {
                    all.push(result);
                }
            }
            all
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let ok = results.iter().map(|r| r.0).sum();
    let failed = results.iter().map(|r| r.1).sum();
    Ok(Calls {
        counts: (ok, failed, seconds),
        latencies: results.into_iter().map(|r| r.2).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(round_trip_ms: u64, smoke: bool) -> Budget {
        Budget {
            duration: Duration::from_secs(1),
            max_events: None,
            smoke,
            external_gateway: None,
            round_trip: Duration::from_millis(round_trip_ms),
            pin: false,
        }
    }

    #[test]
    fn direct_callers_grow_with_the_round_trip_between_bounds() {
        assert_eq!(direct_callers(budget(0, false)), 4096);
        assert_eq!(direct_callers(budget(2, false)), 5250);
        assert_eq!(direct_callers(budget(20, false)), 18_750);
        assert_eq!(direct_callers(budget(1000, false)), 65_536);
        assert_eq!(direct_callers(budget(20, true)), 64);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let latencies = (1..=1000).map(Duration::from_millis).collect();
        assert_eq!(percentiles(latencies), Some([500.0, 990.0, 999.0]));
        assert_eq!(percentiles(Vec::new()), None);
    }
}
