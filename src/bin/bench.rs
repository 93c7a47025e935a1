//! `bench`: the contenders of the benchmark report in one run, on one in-process emulator and gateway per
//! simulated round trip: the producer alone, gRPC streams, unary calls (saturation and latency at half of it),
//! `SendEvents` batches, many keys, and the Python contenders (`benches/python/contenders.py`). Prints a table
//! and writes JSON. `--smoke` runs a few hundred events per scenario and checks that every event answered OK
//! was stored, never speed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use eventhub_gateway::config::GatewayConfig;
use eventhub_gateway::producer::{Event, Producer, ProducerConfig};
use eventhub_gateway::proto::v1;
use eventhub_gateway::proto::v1::event_hub_gateway_client::EventHubGatewayClient;
use eventhub_gateway::server::{self, RunningGateway};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const HUB: &str = "bench";
const PARTITIONS: u32 = 8;

#[derive(Parser)]
#[command(about = "Benchmarks the gateway against what users would use instead, on one emulator")]
struct Args {
    /// Seconds each scenario sends for.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Event body sizes, bytes.
    #[arg(long, value_delimiter = ',', default_value = "100,1024")]
    sizes: Vec<usize>,
    /// Simulated round trips to Event Hubs (a delay before every disposition), milliseconds.
    #[arg(long, value_delimiter = ',', default_value = "0,2")]
    latency_ms: Vec<u64>,
    /// Only these scenarios (default: all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where the results go as JSON.
    #[arg(long, default_value = "target/bench/results.json")]
    json: PathBuf,
    /// A few hundred events per scenario, checking correctness and loss only (what CI runs).
    #[arg(long)]
    smoke: bool,
}

/// One scenario's result.
#[derive(Clone, Debug, Serialize)]
struct Outcome {
    scenario: String,
    size: usize,
    latency_ms: u64,
    events_ok: u64,
    events_failed: u64,
    seconds: f64,
    events_per_second: f64,
    /// p50, p99, p999 of per-event latency, milliseconds, where measured.
    percentiles_ms: Option<[f64; 3]>,
    note: Option<String>,
}

/// How long and how much a scenario sends.
#[derive(Clone, Copy)]
struct Budget {
    duration: Duration,
    /// Most events per scenario (smoke runs).
    max_events: Option<u64>,
}

impl Budget {
    fn done(&self, started: Instant, sent: &AtomicU64) -> bool {
        started.elapsed() >= self.duration
            || self
                .max_events
                .is_some_and(|max| sent.fetch_add(1, Ordering::Relaxed) >= max)
    }
}

fn body(size: usize) -> bytes::Bytes {
    bytes::Bytes::from(vec![b'x'; size])
}

fn outcome(scenario: &str, size: usize, ok: u64, failed: u64, seconds: f64) -> Outcome {
    Outcome {
        scenario: scenario.to_owned(),
        size,
        latency_ms: 0,
        events_ok: ok,
        events_failed: failed,
        seconds,
        events_per_second: ok as f64 / seconds.max(1e-9),
        percentiles_ms: None,
        note: None,
    }
}

fn percentiles(mut latencies: Vec<Duration>) -> Option<[f64; 3]> {
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

/// The producer alone: closed-loop senders each awaiting its event's outcome.
async fn direct(
    producer: &Producer,
    size: usize,
    keys: Option<usize>,
    budget: Budget,
) -> (u64, u64, f64) {
    let senders = if budget.max_events.is_some() {
        64
    } else {
        4096
    };
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

/// The (ok, failed) counts of worker tasks, added up; a worker that panicked counts nothing.
async fn sum_counts(tasks: Vec<tokio::task::JoinHandle<(u64, u64)>>) -> (u64, u64) {
    let mut total = (0, 0);
    for task in tasks {
        let (ok, failed) = task.await.unwrap_or_default();
        total = (total.0 + ok, total.1 + failed);
    }
    total
}

async fn connect(addr: SocketAddr) -> EventHubGatewayClient<Channel> {
    EventHubGatewayClient::connect(format!("http://{addr}"))
        .await
        .expect("connects to the gateway")
}

/// `SendStream` calls, each on its own connection, fed as fast as flow control allows.
async fn stream(addr: SocketAddr, size: usize, budget: Budget) -> (u64, u64, f64) {
    let streams = if budget.max_events.is_some() { 2 } else { 8 };
    let started = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let sent = Arc::clone(&sent);
            tokio::spawn(async move {
                let mut client = connect(addr).await;
                let (requests, outbound) = mpsc::channel(1024);
                tokio::spawn(async move {
                    let mut sequence = 0;
                    while !budget.done(started, &sent) {
                        sequence += 1;
                        let request = v1::SendStreamRequest {
                            event_hub: String::new(),
                            sequence,
                            event: Some(v1::Event {
                                body: Some(v1::event::Body::Binary(body(size))),
                                ..Default::default()
                            }),
                        };
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

/// Closed-loop unary callers (`per_call` events per call: 1 = `SendEvent`, more = `SendEvents`), or, with
/// `rate`, calls started at that rate whatever the answers (open loop), for latency percentiles.
async fn unary(
    addr: SocketAddr,
    size: usize,
    per_call: usize,
    callers: usize,
    rate: Option<f64>,
    budget: Budget,
) -> (u64, u64, f64, Vec<Duration>) {
    let started = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let channels: Vec<_> = {
        let mut channels = Vec::new();
        for _ in 0..callers.min(16) {
            channels.push(connect(addr).await);
        }
        channels
    };
    let call = move |mut client: EventHubGatewayClient<Channel>| async move {
        let began = Instant::now();
        let ok = if per_call == 1 {
            let request = v1::SendEventRequest {
                event_hub: String::new(),
                event: Some(v1::Event {
                    body: Some(v1::event::Body::Binary(body(size))),
                    ..Default::default()
                }),
            };
            u64::from(client.send_event(request).await.is_ok())
        } else {
            let events = (0..per_call)
                .map(|_| v1::Event {
                    body: Some(v1::event::Body::Binary(body(size))),
                    ..Default::default()
                })
                .collect();
            let request = v1::SendEventsRequest {
                event_hub: String::new(),
                events,
            };
            match client.send_events(request).await {
                Ok(response) => response
                    .into_inner()
                    .results
                    .iter()
                    .filter(|r| r.status.as_ref().is_some_and(|s| s.code == 0))
                    .count() as u64,
                Err(_) => 0,
            }
        };
        (ok, per_call as u64 - ok, began.elapsed())
    };
    let results: Vec<(u64, u64, Duration)> = match rate {
        None => {
            let tasks: Vec<_> = (0..callers)
                .map(|caller| {
                    let client = channels[caller % channels.len()].clone();
                    let sent = Arc::clone(&sent);
                    tokio::spawn(async move {
                        let mut results = Vec::new();
                        while !budget.done(started, &sent) {
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
            while !budget.done(started, &sent) {
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
    (
        ok,
        failed,
        seconds,
        results.into_iter().map(|r| r.2).collect(),
    )
}

/// A Python contender (`benches/python/contenders.py`), run as a subprocess; `None` when it cannot run.
fn python(
    scenario: &str,
    size: usize,
    budget: Budget,
    gateway: &RunningGateway,
) -> Result<Outcome, String> {
    let interpreter = if std::path::Path::new(".venv/bin/python").exists() {
        ".venv/bin/python"
    } else {
        "python3"
    };
    let emulator = gateway
        .emulator()
        .map(|e| e.connection_string())
        .ok_or("no in-process emulator")?;
    let mut command = std::process::Command::new(interpreter);
    command
        .arg("benches/python/contenders.py")
        .arg(scenario)
        .args(["--size", &size.to_string()])
        .args(["--duration", &budget.duration.as_secs_f64().to_string()])
        .args(["--hub", HUB]);
    // The gateway's client talks to the gateway; the SDK contenders straight to Event Hubs.
    if scenario == "python-gateway" {
        command.args(["--gateway", &gateway.local_addr().to_string()]);
    } else {
        command.args(["--emulator", &emulator]);
    }
    if let Some(max) = budget.max_events {
        command.args(["--max-events", &max.to_string()]);
    }
    let output = command
        .output()
        .map_err(|error| format!("{interpreter}: {error}"))?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    #[derive(serde::Deserialize)]
    struct Line {
        events_ok: u64,
        events_failed: u64,
        seconds: f64,
        latency_ms: Option<std::collections::HashMap<String, Option<f64>>>,
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let line: Line = serde_json::from_str(text.lines().last().unwrap_or_default())
        .map_err(|error| format!("{scenario} printed no result line: {error}: {text}"))?;
    let mut result = outcome(
        scenario,
        size,
        line.events_ok,
        line.events_failed,
        line.seconds,
    );
    result.percentiles_ms = line.latency_ms.and_then(|l| {
        Some([
            l.get("p50")?.as_ref().copied()?,
            l.get("p99")?.as_ref().copied()?,
            l.get("p999")?.as_ref().copied()?,
        ])
    });
    Ok(result)
}

/// Events stored in the bench hub so far.
fn stored(gateway: &RunningGateway) -> u64 {
    let Some(emulator) = gateway.emulator() else {
        return 0;
    };
    (0..PARTITIONS)
        .filter_map(|p| emulator.partition_properties(HUB, &p.to_string()).ok())
        .map(|p| (p.last_enqueued_sequence_number + 1).max(0) as u64)
        .sum()
}

async fn start_gateway() -> RunningGateway {
    let config = GatewayConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        emulator: true,
        event_hubs: vec![HUB.into()],
        emulator_partitions: PARTITIONS,
        ..GatewayConfig::default()
    };
    server::start(config).await.expect("gateway starts")
}

const SCENARIOS: &[&str] = &[
    "direct",
    "stream",
    "unary",
    "batch-rpc",
    "keys-service",
    "keys-local",
    "python-gateway",
    "python-seed",
    "python-sdk-batched",
];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let budget = Budget {
        duration: Duration::from_secs_f64(if args.smoke { 30.0 } else { args.duration }),
        max_events: args.smoke.then_some(300),
    };
    let chosen: Vec<&str> = SCENARIOS
        .iter()
        .copied()
        .filter(|s| args.only.is_empty() || args.only.iter().any(|o| o == s))
        .collect();
    let runs = (chosen.len() * args.sizes.len() * args.latency_ms.len()) as u64;
    let progress = ProgressBar::new(runs).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut outcomes = Vec::new();
    let mut problems = Vec::new();
    for &latency in &args.latency_ms {
        for &size in &args.sizes {
            for &scenario in &chosen {
                progress.set_message(format!("{scenario}, {size} B, {latency} ms"));
                // A fresh gateway and emulator per run: no run pays for another's backlog.
                let gateway = start_gateway().await;
                if let Some(emulator) = gateway.emulator() {
                    emulator
                        .faults()
                        .delay_dispositions(Duration::from_millis(latency));
                }
                let before = stored(&gateway);
                let addr = gateway.local_addr();
                let result = match scenario {
                    "direct" => {
                        let (ok, failed, seconds) =
                            direct(gateway.state().producer(), size, None, budget).await;
                        Ok(outcome(scenario, size, ok, failed, seconds))
                    }
                    "stream" => {
                        let (ok, failed, seconds) = stream(addr, size, budget).await;
                        Ok(outcome(scenario, size, ok, failed, seconds))
                    }
                    "unary" => {
                        let callers = if args.smoke { 8 } else { 512 };
                        let (ok, failed, seconds, _) =
                            unary(addr, size, 1, callers, None, budget).await;
                        let saturation = ok as f64 / seconds;
                        let mut result = outcome(scenario, size, ok, failed, seconds);
                        let (half_ok, half_failed, _, latencies) =
                            unary(addr, size, 1, callers, Some(saturation / 2.0), budget).await;
                        result.events_ok += half_ok;
                        result.events_failed += half_failed;
                        result.percentiles_ms = percentiles(latencies);
                        result.note = Some(format!(
                            "latency at {:.0} calls/s (half of saturation)",
                            saturation / 2.0
                        ));
                        Ok(result)
                    }
                    "batch-rpc" => {
                        let callers = if args.smoke { 2 } else { 64 };
                        let (ok, failed, seconds, _) =
                            unary(addr, size, 100, callers, None, budget).await;
                        Ok(outcome(scenario, size, ok, failed, seconds))
                    }
                    "keys-service" | "keys-local" => {
                        let producer = Producer::from_connection_string(
                            &gateway
                                .emulator()
                                .map(|e| e.connection_string())
                                .unwrap_or_default(),
                            false,
                            Default::default(),
                            ProducerConfig {
                                local_partitioning: scenario == "keys-local",
                                ..ProducerConfig::default()
                            },
                        )?;
                        let (ok, failed, seconds) =
                            direct(&producer, size, Some(10_000), budget).await;
                        producer.close().await;
                        Ok(outcome(scenario, size, ok, failed, seconds))
                    }
                    python_scenario => python(python_scenario, size, budget, &gateway),
                };
                let stored_now = stored(&gateway) - before;
                gateway.shutdown().await?;
                match result {
                    Ok(mut result) => {
                        result.latency_ms = latency;
                        // At least once: every event answered OK is stored (duplicates may add more).
                        if stored_now < result.events_ok {
                            problems.push(format!(
                                "{scenario} {size} B {latency} ms: {} answered OK but {stored_now} stored",
                                result.events_ok
                            ));
                        }
                        if args.smoke && (result.events_failed > 0 || result.events_ok == 0) {
                            problems.push(format!(
                                "{scenario} {size} B {latency} ms: {} ok, {} failed",
                                result.events_ok, result.events_failed
                            ));
                        }
                        outcomes.push(result);
                    }
                    Err(error) => {
                        problems.push(format!("{scenario} {size} B {latency} ms: {error}"))
                    }
                }
                progress.inc(1);
            }
        }
    }
    progress.finish_and_clear();
    println!(
        "{:<20} {:>6} {:>6} {:>12} {:>10} {:>26}",
        "scenario", "size", "rtt", "events/s", "failed", "p50/p99/p999 ms"
    );
    for o in &outcomes {
        let percentiles = o
            .percentiles_ms
            .map(|[a, b, c]| format!("{a:.1}/{b:.1}/{c:.1}"))
            .unwrap_or_default();
        println!(
            "{:<20} {:>6} {:>6} {:>12.0} {:>10} {:>26}",
            o.scenario,
            o.size,
            format!("{} ms", o.latency_ms),
            o.events_per_second,
            o.events_failed,
            percentiles
        );
    }
    if let Some(parent) = args.json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&outcomes)?)?;
    println!("results: {}", args.json.display());
    if !problems.is_empty() {
        for problem in &problems {
            eprintln!("problem: {problem}");
        }
        anyhow::bail!("{} problem(s)", problems.len());
    }
    Ok(())
}
