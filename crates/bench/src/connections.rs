//! `connections`: one gateway process holding a crowd (many idle gRPC connections, HTTP/2 handshake done and
//! no call, and many open `SendStream`s each sending a few events a second) while a normal client makes unary
//! calls at a modest open-loop rate. Reports the gateway's resident memory per idle connection and per stream,
//! checks that every streamed event was answered and none failed, and compares the normal client's p99 with
//! and without the crowd.
//!
//! The clients are spread over 127.0.0.0/8 source addresses, as many real clients would come from many
//! addresses: the gateway bounds connections and calls per peer address, and those bounds stay as they are.
//! Only `max_connections`, `max_concurrent_calls` (raised to fit the crowd) and `connection_idle_timeout`
//! (an hour, or the idle connections would be closed after its default 300 s) are changed.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use eventhub_emulator::Emulator;
use eventhub_gateway::proto::v1;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::overload::{GatewayProcess, rss_mib};
use crate::pin::Side;
use crate::scenarios::{self, Budget, Outcome};

/// The most resident memory the gateway may use holding the crowd.
pub const RSS_LIMIT_MIB: f64 = 512.0;
/// Idle connections per source address: under the gateway's `max_connections_per_client` (256).
const IDLE_PER_ADDRESS: usize = 200;
/// Streams sharing one connection.
const STREAMS_PER_CONNECTION: usize = 10;
/// Stream connections per source address: 100 streams per address, under `max_calls_per_client` (1000).
const STREAM_CONNECTIONS_PER_ADDRESS: usize = 10;
/// Events per second each stream sends.
const STREAM_RATE: f64 = 10.0;
/// Idle connections being opened at once.
const OPENING_AT_ONCE: usize = 128;
/// Connections of the normal client.
const NORMAL_CONNECTIONS: usize = 16;

/// How big the crowd is.
#[derive(Clone, Copy, Debug)]
pub struct Crowd {
    /// Idle connections.
    pub connections: usize,
    /// Open `SendStream`s.
    pub streams: usize,
}

impl Crowd {
    /// The given sizes, else 10,000 connections and 1,000 streams (200 and 20 in a smoke run).
    pub fn new(connections: Option<usize>, streams: Option<usize>, smoke: bool) -> Self {
        Self {
            connections: connections.unwrap_or(if smoke { 200 } else { 10_000 }),
            streams: streams.unwrap_or(if smoke { 20 } else { 1000 }),
        }
    }
}

/// The outcome, and what went wrong (each a problem of the run).
pub struct Report {
    pub outcome: Outcome,
    pub problems: Vec<String>,
}

/// Source address number `index` of clients of one `kind`, `per_address` clients each: 127.kind.x.y.
fn source(kind: u8, index: usize, per_address: usize) -> Ipv4Addr {
    let block = index / per_address;
    Ipv4Addr::new(127, kind, (block / 250) as u8, (block % 250 + 1) as u8)
}

/// Raises this process's soft open-files limit to its hard limit; returns the soft limit now.
fn raise_open_files_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if let (Some(soft), Some(hard)) = (limit.current, limit.maximum) {
        if soft < hard {
            // Failing leaves the soft limit, which the check after this reports.
            let _ = setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(hard),
                    maximum: Some(hard),
                },
            );
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Idle HTTP/2 connections: their request handles (dropping them would close the connections) and the tasks
/// driving them (which answer the gateway's keepalive pings).
struct Idle {
    _handles: Vec<h2::client::SendRequest<Bytes>>,
    tasks: Vec<JoinHandle<()>>,
    /// Connections that could not be opened, and the first reason.
    failed: usize,
    first_error: Option<String>,
}

impl Drop for Idle {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One bare HTTP/2 connection from `source`, confirmed by a PING answered: the gateway accepted it and read
/// its preface and SETTINGS. `closed` counts it when it ends.
async fn open_idle(
    addr: SocketAddr,
    source: Ipv4Addr,
    closed: Arc<AtomicU64>,
) -> anyhow::Result<(h2::client::SendRequest<Bytes>, JoinHandle<()>)> {
    let stream = scenarios::connect_tcp(addr, source).await?;
    let (handle, mut connection) = h2::client::handshake(stream).await?;
    let mut ping_pong = connection.ping_pong().context("no PING handle")?;
    let task = tokio::spawn(async move {
        let _ = connection.await;
        closed.fetch_add(1, Ordering::Relaxed);
    });
    match tokio::time::timeout(Duration::from_secs(10), ping_pong.ping(h2::Ping::opaque())).await {
        Ok(Ok(_pong)) => Ok((handle, task)),
        answer => {
            task.abort();
            match answer {
                Ok(Err(error)) => Err(error.into()),
                _ => anyhow::bail!("no PING answer in 10 s"),
            }
        }
    }
}

async fn open_idle_connections(addr: SocketAddr, count: usize, closed: Arc<AtomicU64>) -> Idle {
    let opened: Vec<_> = futures_util::stream::iter(0..count)
        .map(|index| {
            open_idle(
                addr,
                source(1, index, IDLE_PER_ADDRESS),
                Arc::clone(&closed),
            )
        })
        .buffer_unordered(OPENING_AT_ONCE)
        .collect()
        .await;
    let mut idle = Idle {
        _handles: Vec::with_capacity(count),
        tasks: Vec::with_capacity(count),
        failed: 0,
        first_error: None,
    };
    for result in opened {
        match result {
            Ok((handle, task)) => {
                idle._handles.push(handle);
                idle.tasks.push(task);
            }
            Err(error) => {
                idle.failed += 1;
                idle.first_error.get_or_insert_with(|| format!("{error:#}"));
            }
        }
    }
    idle
}

/// What one stream sent and had answered.
#[derive(Default)]
struct StreamCounts {
    sent: u64,
    ok: u64,
    failed: u64,
    error: Option<String>,
}

/// `count` streams, `STREAMS_PER_CONNECTION` to a connection, each sending one event every 1/`STREAM_RATE`
/// s until `stop` says so; then each ends its requests and reads its last acks.
async fn open_streams(
    addr: SocketAddr,
    count: usize,
    size: usize,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Vec<JoinHandle<StreamCounts>>> {
    let mut clients = Vec::new();
    for index in 0..count.div_ceil(STREAMS_PER_CONNECTION) {
        let from = source(2, index, STREAM_CONNECTIONS_PER_ADDRESS);
        clients.push(
            scenarios::connect_from(addr, from)
                .await
                .with_context(|| format!("a stream connection from {from}"))?,
        );
    }
    let period = Duration::from_secs_f64(1.0 / STREAM_RATE);
    let now = tokio::time::Instant::now();
    Ok((0..count)
        .map(|index| {
            let mut client = clients[index / STREAMS_PER_CONNECTION].clone();
            let mut stop = stop.clone();
            // Spread over the period: an even 10 × count events/s, not a burst every 100 ms.
            let first = now + period.mul_f64(index as f64 / count as f64);
            tokio::spawn(async move {
                let (requests, outbound) = mpsc::channel(16);
                let sender = tokio::spawn(async move {
                    let mut ticker = tokio::time::interval_at(first, period);
                    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let mut sent = 0u64;
                    loop {
                        tokio::select! {
                            _ = ticker.tick() => {}
                            _ = stop.changed() => break,
                        }
                        let request = v1::SendStreamRequest {
                            event_hub: String::new(),
                            sequence: sent + 1,
                            event: Some(scenarios::binary_event(size)),
                            events: Vec::new(),
                        };
                        if requests.send(request).await.is_err() {
                            break;
                        }
                        sent += 1;
                    }
                    sent
                });
                let mut counts = StreamCounts::default();
                match client.send_stream(ReceiverStream::new(outbound)).await {
                    Ok(response) => {
                        let mut acks = response.into_inner();
                        loop {
                            match acks.message().await {
                                Ok(Some(response)) => {
                                    for ack in response.acks {
                                        if ack.status.is_some_and(|s| s.code == 0) {
                                            counts.ok += 1;
                                        } else {
                                            counts.failed += 1;
                                        }
                                    }
                                }
                                Ok(None) => break,
                                Err(status) => {
                                    counts.error = Some(status.to_string());
                                    break;
                                }
                            }
                        }
                    }
                    Err(status) => counts.error = Some(status.to_string()),
                }
                // The sender ends at `stop`, or at once if the call is over.
                counts.sent = sender.await.unwrap_or(0);
                counts
            })
        })
        .collect())
}

/// The normal client: unary calls at `rate` from 127.0.0.1, open loop, for the budget's time.
async fn normal_calls(
    addr: SocketAddr,
    size: usize,
    rate: f64,
    budget: Budget,
) -> anyhow::Result<scenarios::Calls> {
    scenarios::unary(addr, size, 1, NORMAL_CONNECTIONS, Some(rate), budget).await
}

/// Runs the scenario against a gateway process forwarding to `emulator`.
pub async fn run(
    emulator: &Emulator,
    size: usize,
    crowd: Crowd,
    budget: Budget,
) -> anyhow::Result<Report> {
    let smoke = budget.is_smoke();
    let stream_connections = crowd.streams.div_ceil(STREAMS_PER_CONNECTION);
    let descriptors = raise_open_files_limit();
    let needed = (crowd.connections + stream_connections + NORMAL_CONNECTIONS + 256) as u64;
    anyhow::ensure!(
        descriptors >= needed,
        "{} connections need about {needed} open files; this process may have {descriptors} \
         (raise its hard limit, `ulimit -Hn`)",
        crowd.connections
    );
    let settings = [
        (
            "EVENTHUB_GATEWAY_LIMITS__MAX_CONNECTIONS",
            (crowd.connections + stream_connections + NORMAL_CONNECTIONS + 64)
                .max(4096)
                .to_string(),
        ),
        (
            "EVENTHUB_GATEWAY_LIMITS__MAX_CONCURRENT_CALLS",
            (crowd.streams + 1000).max(10_000).to_string(),
        ),
        (
            "EVENTHUB_GATEWAY_LIMITS__CONNECTION_IDLE_TIMEOUT_SECONDS",
            "3600".to_owned(),
        ),
    ];
    let started = Instant::now();
    let gateway = GatewayProcess::start(emulator, &settings, budget.pin.then_some(Side::Server))?;
    let pid = gateway.pid();
    let peak_rss_kib = Arc::new(AtomicU64::new(0));
    let sampler = {
        let peak = Arc::clone(&peak_rss_kib);
        tokio::spawn(async move {
            while let Some(mib) = rss_mib(pid) {
                peak.fetch_max((mib * 1024.0) as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let (rate, calls_budget, settle) = if smoke {
        let calls = Budget {
            duration: Duration::from_secs(1),
            max_events: None,
            ..budget
        };
        (100.0, calls, Duration::from_millis(300))
    } else {
        (1000.0, budget, Duration::from_secs(1))
    };

    let alone = normal_calls(gateway.addr, size, rate, calls_budget).await?;
    tokio::time::sleep(settle).await;
    let rss = || rss_mib(pid).unwrap_or(f64::NAN);
    let own_rss = || rss_mib(std::process::id()).unwrap_or(f64::NAN);
    let (rss_before, own_before) = (rss(), own_rss());

    let closed = Arc::new(AtomicU64::new(0));
    let opening = Instant::now();
    let idle = open_idle_connections(gateway.addr, crowd.connections, Arc::clone(&closed)).await;
    let opening_seconds = opening.elapsed().as_secs_f64();
    tokio::time::sleep(settle).await;
    let (rss_idle, own_idle) = (rss(), own_rss());
    let closed_at_open = closed.load(Ordering::Relaxed);

    let (stop, stopped) = watch::channel(false);
    let streams = open_streams(gateway.addr, crowd.streams, size, stopped).await?;
    // Every stream has sent a few events by then.
    tokio::time::sleep(settle + Duration::from_secs_f64(3.0 / STREAM_RATE)).await;
    let rss_streams = rss();

    let crowded = normal_calls(gateway.addr, size, rate, calls_budget).await?;
    let _ = stop.send(true);
    let mut totals = StreamCounts::default();
    let mut broken = 0u64;
    for stream in streams {
        let counts = tokio::time::timeout(Duration::from_secs(60), stream)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_else(|| StreamCounts {
                error: Some("no end in 60 s".into()),
                ..StreamCounts::default()
            });
        totals.sent += counts.sent;
        totals.ok += counts.ok;
        totals.failed += counts.failed;
        if counts.error.is_some() {
            broken += 1;
            totals.error = totals.error.or(counts.error);
        }
    }
    let closed_while_idle = closed.load(Ordering::Relaxed) - closed_at_open;
    let (idle_failed, idle_error) = (idle.failed, idle.first_error.clone());
    drop(idle);
    let seconds = started.elapsed().as_secs_f64();
    sampler.abort();
    let peak_rss_mib = (peak_rss_kib.load(Ordering::Relaxed) as f64 / 1024.0).max(rss_streams);
    drop(gateway);

    let per = |mib: f64, count: usize| mib * 1024.0 * 1024.0 / count.max(1) as f64;
    let per_connection = per(rss_idle - rss_before, crowd.connections);
    let per_stream = per(rss_streams - rss_idle, crowd.streams);
    // A stream's share of its connection, left out: what the call itself holds.
    let per_call = per_stream - per_connection / STREAMS_PER_CONNECTION as f64;
    let [alone_p50, alone_p99, _] = scenarios::percentiles(alone.latencies).unwrap_or_default();
    let crowded_percentiles = scenarios::percentiles(crowded.latencies);
    let [crowded_p50, crowded_p99, _] = crowded_percentiles.unwrap_or_default();
    let unanswered = totals.sent.saturating_sub(totals.ok + totals.failed);
    let unary_failed = alone.counts.1 + crowded.counts.1;

    let mut outcome = Outcome::new(
        "connections",
        size,
        (
            totals.ok + alone.counts.0 + crowded.counts.0,
            totals.failed + unanswered + unary_failed,
            seconds,
        ),
    );
    outcome.percentiles_ms = crowded_percentiles;
    outcome.note = Some(format!(
        "{} idle connections (opened in {opening_seconds:.1} s) and {} streams ({stream_connections} \
         connections, {STREAM_RATE} events/s each); gateway RSS {rss_before:.0} MiB before, {rss_idle:.0} \
         with the idle connections, {rss_streams:.0} with the streams, peak {peak_rss_mib:.0}: \
         {:.1} KiB per idle connection, {:.1} KiB per stream ({:.1} KiB without its share of a connection); \
         streamed events: {} sent, {} OK, {} failed, {unanswered} unanswered; unary at {rate:.0} calls/s: \
         p50/p99 {alone_p50:.1}/{alone_p99:.1} ms alone, {crowded_p50:.1}/{crowded_p99:.1} ms in the \
         crowd (p99 ×{:.2}); this harness's own RSS {own_before:.0} → {own_idle:.0} MiB for the idle \
         connections",
        crowd.connections,
        crowd.streams,
        per_connection / 1024.0,
        per_stream / 1024.0,
        per_call / 1024.0,
        totals.sent,
        totals.ok,
        totals.failed,
        crowded_p99 / alone_p99,
    ));

    let mut problems = Vec::new();
    if idle_failed > 0 {
        problems.push(format!(
            "{idle_failed} of {} idle connections not opened: {}",
            crowd.connections,
            idle_error.unwrap_or_default()
        ));
    }
    if closed_while_idle > 0 {
        problems.push(format!(
            "{closed_while_idle} idle connections closed while idle"
        ));
    }
    if broken > 0 {
        problems.push(format!(
            "{broken} of {} streams ended with an error: {}",
            crowd.streams,
            totals.error.unwrap_or_default()
        ));
    }
    if unanswered > 0 || totals.failed > 0 || unary_failed > 0 {
        problems.push(format!(
            "{} streamed events sent, {} answered OK, {} failed, {unanswered} unanswered; \
             {unary_failed} unary calls failed",
            totals.sent, totals.ok, totals.failed
        ));
    }
    if totals.sent == 0 {
        problems.push("the streams sent nothing".into());
    }
    if peak_rss_mib > RSS_LIMIT_MIB {
        problems.push(format!(
            "the gateway's RSS reached {peak_rss_mib:.0} MiB (limit {RSS_LIMIT_MIB})"
        ));
    }
    Ok(Report { outcome, problems })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_address_gets_at_most_its_share() {
        let mut counts = std::collections::HashMap::<Ipv4Addr, usize>::new();
        for index in 0..10_000 {
            let address = source(1, index, IDLE_PER_ADDRESS);
            assert_eq!(address.octets()[..2], [127, 1]);
            assert_ne!(address.octets()[3], 0);
            *counts.entry(address).or_default() += 1;
        }
        assert_eq!(counts.len(), 50);
        assert!(counts.values().all(|&count| count == IDLE_PER_ADDRESS));
        // Past 250 blocks the third octet moves on, and no address repeats.
        assert_eq!(
            source(2, 250 * 10, 10),
            Ipv4Addr::new(127, 2, 1, 1),
            "block 250"
        );
        assert_eq!(source(2, 249 * 10, 10), Ipv4Addr::new(127, 2, 0, 250));
    }
}
