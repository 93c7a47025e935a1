//! `bench`: the contenders of the benchmark report in one run, on a fresh in-process emulator and gateway per
//! scenario and simulated round trip: raw fe2o3 batches (the ceiling), the producer alone, gRPC streams, unary
//! calls (saturation, and latency at half of it), `SendEvents` batches, many keys, overload of a gateway
//! process, a crowd of idle connections and slow streams on a gateway process, the Python contenders and the
//! official Rust SDK. Prints a table, writes JSON and SVG charts.
//! `--smoke` runs a few hundred events per scenario and checks that every event answered OK was stored,
//! never speed.

mod chart;
mod connections;
mod contenders;
mod overload;
mod pin;
mod scenarios;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Parser;
use eventhub_emulator::{Emulator, EmulatorConfig, HubConfig};
use eventhub_gateway::config::GatewayConfig;
use eventhub_gateway::server::{self, RunningGateway};
use eventhub_gateway::telemetry::export::{OtlpProtocol, OtlpSettings};
use eventhub_gateway::telemetry::logging::{self, LogFormat, Telemetry};
use eventhub_producer::{Producer, ProducerConfig};
use indicatif::{ProgressBar, ProgressStyle};

use contenders::Target;
use scenarios::{Budget, Outcome};

/// mimalloc: the gateway makes about ten small allocations per event, and glibc's malloc and free took a
/// quarter of its instructions under load (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Simulated round trips to Event Hubs (a delay before every disposition), milliseconds. From 10 ms up,
    /// only the scenarios of `LONG_RTT_SCENARIOS` run, unless named with `--only`.
    #[arg(long, value_delimiter = ',', default_value = "0,2,20")]
    latency_ms: Vec<u64>,
    /// Only these scenarios (default: all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Leave these scenarios out.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// Where the results go as JSON; the SVG charts go beside it.
    #[arg(long, default_value = "target/bench/results.json")]
    json: PathBuf,
    /// Export every span over OTLP (to a sink in this process that drops them), for the cost of tracing.
    #[arg(long)]
    otlp: bool,
    /// With `--otlp`: sample this fraction of calls (parentbased_traceidratio) instead of every one.
    #[arg(long, value_name = "RATIO", requires = "otlp")]
    otlp_sampler_ratio: Option<f64>,
    /// A few hundred events per scenario, checking correctness and loss only (what CI runs).
    #[arg(long)]
    smoke: bool,
    /// Only draw the charts of an earlier run's JSON (beside it), then stop.
    #[arg(long, value_name = "JSON")]
    replot: Option<PathBuf>,
    /// At most this many events per scenario (a fixed amount of work, for profiles).
    #[arg(long)]
    events: Option<u64>,
    /// Send the gateway scenarios to this gateway instead of one in this process (for example a gateway
    /// under a profiler); the events cannot be read back then, so the loss check is left out.
    #[arg(long, value_name = "HOST:PORT")]
    gateway: Option<SocketAddr>,
    /// Client and server on separate halves of the CPUs (taskset) where they are separate processes: `unary`
    /// (its client then runs as `bench --gateway`), `overload`, `connections` and the contender processes.
    #[arg(long)]
    pin: bool,
    /// Idle connections of the `connections` scenario [default: 10000; 200 with --smoke].
    #[arg(long, value_name = "N")]
    connections: Option<usize>,
    /// Open streams (10 events/s each) of the `connections` scenario [default: 1000; 20 with --smoke].
    #[arg(long, value_name = "M")]
    streams: Option<usize>,
}

/// The scenarios that only need a gateway's gRPC address.
const GATEWAY_SCENARIOS: &[&str] = &[
    "stream",
    "stream-batched",
    "stream-json",
    "stream-schema",
    "unary",
    "batch-rpc",
    "python-gateway",
    "python-gateway-single",
    "python-client",
];

/// Every scenario, in the order the table shows them.
const SCENARIOS: &[&str] = &[
    "emulator-ceiling",
    "direct",
    "stream",
    "stream-batched",
    "stream-json",
    "stream-schema",
    "unary",
    "batch-rpc",
    "keys-service",
    "keys-local",
    "overload",
    "connections",
    "python-gateway",
    "python-gateway-single",
    "python-client",
    "python-seed",
    "python-sdk-batched",
    "rust-sdk",
];

/// The scenarios run at round trips of 10 ms and more (the full run's 20 ms): those that show what is in
/// flight per sender. The others would only add minutes to the run.
const LONG_RTT_SCENARIOS: &[&str] = &[
    "emulator-ceiling",
    "direct",
    "stream",
    "stream-batched",
    "python-sdk-batched",
    "rust-sdk",
];

/// The scenarios that run only when named with `--only`: the cost of schema validation is a comparison of
/// its own (`stream-json` against `stream-schema`), not a row of every run.
const NAMED_ONLY_SCENARIOS: &[&str] = &["stream-json", "stream-schema"];

/// Whether `scenario` runs at this size and round trip, unless it was named with `--only`: the long round
/// trip for `LONG_RTT_SCENARIOS` only, `connections` at the first size and short round trips only (its
/// figures are about memory and latency under a crowd, not about event size), `NAMED_ONLY_SCENARIOS` never.
fn planned(scenario: &str, first_size: bool, latency: u64) -> bool {
    let long = latency >= 10;
    match scenario {
        scenario if NAMED_ONLY_SCENARIOS.contains(&scenario) => false,
        "connections" => first_size && !long,
        _ => !long || LONG_RTT_SCENARIOS.contains(&scenario),
    }
}

/// Events stored in the bench hub so far.
fn stored(emulator: &Emulator) -> u64 {
    (0..PARTITIONS)
        .filter_map(|p| emulator.partition_properties(HUB, &p.to_string()).ok())
        .map(|p| (p.last_enqueued_sequence_number + 1).max(0) as u64)
        .sum()
}

/// A gateway in this process on its own emulator; for `stream-schema`, with `ORDER_SCHEMA` on the hub (its
/// file in a temporary directory kept until the gateway is started: the schema is compiled at start).
async fn start_gateway(scenario: &str) -> anyhow::Result<RunningGateway> {
    let mut config = GatewayConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        emulator: true,
        event_hubs: vec![HUB.into()],
        emulator_partitions: PARTITIONS,
        ..GatewayConfig::default()
    };
    let directory = tempfile::tempdir()?;
    if scenario == "stream-schema" {
        let file = directory.path().join("order.schema.json");
        std::fs::write(&file, scenarios::ORDER_SCHEMA)?;
        config.schemas.insert(HUB.into(), file);
    }
    Ok(server::start(config).await?)
}

/// A fresh emulator alone (for the contenders that talk to a gateway process, or to Event Hubs directly).
async fn start_emulator() -> anyhow::Result<Emulator> {
    Ok(Emulator::start(EmulatorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        event_hubs: vec![format!("{HUB}:{PARTITIONS}").parse::<HubConfig>()?],
        ..EmulatorConfig::default()
    })
    .await?)
}

/// An OTLP/HTTP endpoint on loopback that counts the export requests it is sent and drops them; every span
/// of this process is exported to it from now on.
async fn export_spans(sampler_ratio: Option<f64>) -> anyhow::Result<(Arc<AtomicU64>, Telemetry)> {
    let exports = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&exports);
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move || {
            counted.fetch_add(1, Ordering::Relaxed);
            async { "" }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    let telemetry = logging::init(
        LogFormat::Text,
        Some(&OtlpSettings {
            // Over HTTP the URL is taken as is: the signal's path is part of it.
            endpoint: Some(format!("http://{addr}/v1/traces")),
            protocol: OtlpProtocol::HttpProtobuf,
            sampler_ratio,
        }),
    )?;
    Ok((exports, telemetry))
}

/// Runs one scenario on a fresh gateway (or emulator), checks that every event answered OK was stored.
async fn run_one(
    scenario: &str,
    size: usize,
    latency: u64,
    budget: Budget,
    crowd: connections::Crowd,
    problems: &mut Vec<String>,
) -> anyhow::Result<Outcome> {
    let smoke = budget.is_smoke();
    let budget = Budget {
        round_trip: Duration::from_millis(latency),
        pin: budget.pin && pin::applies(scenario) && budget.external_gateway.is_none(),
        ..budget
    };
    let _pinned = if budget.pin {
        Some(pin::this_process(pin::own_side(scenario))?)
    } else {
        None
    };
    // The contenders that bring their own client to Event Hubs, and the scenarios with a gateway process,
    // need no gateway in this process.
    let standalone = matches!(
        scenario,
        "emulator-ceiling"
            | "overload"
            | "connections"
            | "python-seed"
            | "python-sdk-batched"
            | "rust-sdk"
    );
    if let Some(external) = budget.external_gateway {
        anyhow::ensure!(
            GATEWAY_SCENARIOS.contains(&scenario),
            "needs a gateway and emulator in this process (--gateway serves {GATEWAY_SCENARIOS:?})"
        );
        let mut result = gateway_scenario(scenario, size, external, budget).await?;
        result.latency_ms = latency;
        return Ok(result);
    }
    let (gateway, own_emulator) = if standalone {
        (None, Some(start_emulator().await?))
    } else {
        (Some(start_gateway(scenario).await?), None)
    };
    let emulator = own_emulator
        .as_ref()
        .or_else(|| gateway.as_ref().and_then(|g| g.emulator()))
        .ok_or_else(|| anyhow::anyhow!("no emulator"))?;
    emulator
        .faults()
        .delay_dispositions(Duration::from_millis(latency));
    let connection_string = emulator.connection_string();
    let before = stored(emulator);
    let mut result = match scenario {
        "emulator-ceiling" => Outcome::new(
            scenario,
            size,
            scenarios::ceiling(&connection_string, size, budget).await?,
        ),
        "direct" => {
            let producer = gateway
                .as_ref()
                .map(|g| g.state().producer())
                .ok_or_else(|| anyhow::anyhow!("no gateway"))?;
            let mut outcome = Outcome::new(
                scenario,
                size,
                scenarios::direct(producer, size, None, budget).await,
            );
            let callers = scenarios::direct_callers(budget);
            outcome.note = Some(format!("{callers} closed-loop callers"));
            outcome
        }
        "unary" if budget.pin => {
            let addr = gateway.as_ref().map(|g| g.local_addr());
            let addr = addr.ok_or_else(|| anyhow::anyhow!("no gateway"))?;
            tokio::task::block_in_place(|| pin::unary_client(addr, size, latency, budget))?
        }
        scenario if GATEWAY_SCENARIOS.contains(&scenario) => {
            let addr = gateway.as_ref().map(|g| g.local_addr());
            let addr = addr.ok_or_else(|| anyhow::anyhow!("no gateway"))?;
            gateway_scenario(scenario, size, addr, budget).await?
        }
        "keys-service" | "keys-local" => {
            let producer = Producer::from_connection_string(
                &connection_string,
                false,
                Default::default(),
                ProducerConfig {
                    local_partitioning: scenario == "keys-local",
                    ..ProducerConfig::default()
                },
            )?;
            let counts = scenarios::direct(&producer, size, Some(10_000), budget).await;
            producer.close().await;
            Outcome::new(scenario, size, counts)
        }
        "overload" => {
            let report = overload::run(emulator, size, budget).await?;
            let at = format!("overload {size} B {latency} ms");
            if report.lost > 0 || report.refused_but_stored > 0 {
                problems.push(format!(
                    "{at}: {} answered OK but not stored, {} refused but stored",
                    report.lost, report.refused_but_stored
                ));
            }
            if report.peak_rss_mib > overload::RSS_LIMIT_MIB {
                problems.push(format!(
                    "{at}: the gateway's RSS reached {:.0} MiB (limit {})",
                    report.peak_rss_mib,
                    overload::RSS_LIMIT_MIB
                ));
            }
            let most_waiting = GatewayConfig::default().limits.max_concurrent_calls as u64;
            if report.refused == 0 && report.backlog > 2 * most_waiting {
                problems.push(format!(
                    "{at}: {} calls more than the gateway could answer, yet none was refused",
                    report.backlog
                ));
            }
            report.outcome
        }
        "connections" => {
            let report = connections::run(emulator, size, crowd, budget).await?;
            let at = format!("connections {size} B {latency} ms");
            problems.extend(report.problems.iter().map(|p| format!("{at}: {p}")));
            report.outcome
        }
        contender => contenders::run(
            contender,
            size,
            budget,
            Target::EventHubs {
                connection_string: &connection_string,
            },
        )
        .map_err(anyhow::Error::msg)?,
    };
    let stored_now = stored(emulator) - before;
    if let Some(gateway) = gateway {
        gateway.shutdown().await?;
    }
    if let Some(emulator) = own_emulator {
        emulator.shutdown(Duration::from_secs(5)).await;
    }
    result.latency_ms = latency;
    result.pinned = budget.pin;
    let at = format!("{scenario} {size} B {latency} ms");
    // At least once: every event answered OK is stored (duplicates may add more).
    if stored_now < result.events_ok {
        problems.push(format!(
            "{at}: {} answered OK but {stored_now} stored",
            result.events_ok
        ));
    }
    // Overload refuses events by design; everywhere else a failure is a problem in a smoke run. (`connections`
    // reports its own failures, in any run.)
    if smoke && (result.events_ok == 0 || (scenario != "overload" && result.events_failed > 0)) {
        problems.push(format!(
            "{at}: {} ok, {} failed",
            result.events_ok, result.events_failed
        ));
    }
    Ok(result)
}

/// A scenario that only talks gRPC to a gateway at `addr`.
async fn gateway_scenario(
    scenario: &str,
    size: usize,
    addr: SocketAddr,
    budget: Budget,
) -> anyhow::Result<Outcome> {
    let smoke = budget.is_smoke();
    Ok(match scenario {
        "stream" | "stream-batched" => {
            let per_message = if scenario == "stream" { 1 } else { 100 };
            let counts =
                scenarios::stream(addr, size, per_message, scenarios::binary_event, budget).await;
            Outcome::new(scenario, size, counts)
        }
        // `stream` with JSON bodies (application/json), without and with a schema on the hub.
        "stream-json" | "stream-schema" => {
            let counts = scenarios::stream(addr, size, 1, scenarios::json_event, budget).await;
            Outcome::new(scenario, size, counts)
        }
        "unary" => {
            let callers = if smoke { 8 } else { 512 };
            let saturated = scenarios::unary(addr, size, 1, callers, None, budget).await?;
            let (ok, _, seconds) = saturated.counts;
            let half = ok as f64 / seconds / 2.0;
            let mut result = Outcome::new(scenario, size, saturated.counts);
            let at_half = scenarios::unary(addr, size, 1, callers, Some(half), budget).await?;
            result.events_ok += at_half.counts.0;
            result.events_failed += at_half.counts.1;
            result.percentiles_ms = scenarios::percentiles(at_half.latencies);
            result.note = Some(format!("latency at {half:.0} calls/s (half of saturation)"));
            result
        }
        "batch-rpc" => {
            let callers = if smoke { 2 } else { 64 };
            let calls = scenarios::unary(addr, size, 100, callers, None, budget).await?;
            Outcome::new(scenario, size, calls.counts)
        }
        python => contenders::run(python, size, budget, Target::Gateway(addr))
            .map_err(anyhow::Error::msg)?,
    })
}

fn print_table(outcomes: &[Outcome]) {
    println!(
        "{:<22} {:>6} {:>6} {:>12} {:>10} {:>22}",
        "scenario", "size", "rtt", "events/s", "failed", "p50/p99/p999 ms"
    );
    for o in outcomes {
        let percentiles = o
            .percentiles_ms
            .map(|[a, b, c]| format!("{a:.1}/{b:.1}/{c:.1}"))
            .unwrap_or_default();
        println!(
            "{:<22} {:>6} {:>6} {:>12.0} {:>10} {:>22}",
            if o.pinned {
                format!("{} (pinned)", o.scenario)
            } else {
                o.scenario.clone()
            },
            o.size,
            format!("{} ms", o.latency_ms),
            o.events_per_second,
            o.events_failed,
            percentiles
        );
    }
    for o in outcomes {
        if let Some(note) = &o.note {
            println!("{} {} B {} ms: {note}", o.scenario, o.size, o.latency_ms);
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(results) = &args.replot {
        let outcomes: Vec<Outcome> = serde_json::from_slice(&std::fs::read(results)?)?;
        let directory = results.parent().unwrap_or(std::path::Path::new("."));
        for path in chart::write(directory, &outcomes)? {
            println!("chart: {}", path.display());
        }
        return Ok(());
    }
    let budget = Budget {
        duration: Duration::from_secs_f64(if args.smoke { 30.0 } else { args.duration }),
        max_events: args.events.or(args.smoke.then_some(300)),
        smoke: args.smoke,
        external_gateway: args.gateway,
        round_trip: Duration::ZERO,
        pin: args.pin,
    };
    if args.pin {
        pin::check()?;
    }
    // Against a gateway elsewhere, only this client can be pinned here.
    let _pinned_client = match (args.pin, args.gateway) {
        (true, Some(addr)) => {
            eprintln!(
                "--pin: this client on CPUs {}; run the gateway at {addr} on the others, e.g. `taskset -c {}`",
                pin::list(pin::Side::Client)?,
                pin::list(pin::Side::Server)?
            );
            Some(pin::this_process(pin::Side::Client)?)
        }
        _ => None,
    };
    let crowd = connections::Crowd::new(args.connections, args.streams, args.smoke);
    let unknown: Vec<&String> = args
        .only
        .iter()
        .chain(&args.skip)
        .filter(|s| !SCENARIOS.contains(&s.as_str()))
        .collect();
    if !unknown.is_empty() {
        anyhow::bail!("unknown scenario(s) {unknown:?}; the scenarios are {SCENARIOS:?}");
    }
    let chosen: Vec<&str> = SCENARIOS
        .iter()
        .copied()
        .filter(|s| args.only.is_empty() || args.only.iter().any(|o| o == s))
        .filter(|s| !args.skip.iter().any(|o| o == s))
        .collect();
    let tracing = if args.otlp {
        Some(export_spans(args.otlp_sampler_ratio).await?)
    } else {
        None
    };
    let mut runs = Vec::new();
    for &latency in &args.latency_ms {
        for (index, &size) in args.sizes.iter().enumerate() {
            for &scenario in &chosen {
                if !args.only.is_empty() || planned(scenario, index == 0, latency) {
                    runs.push((latency, size, scenario));
                }
            }
        }
    }
    let progress = ProgressBar::new(runs.len() as u64).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut outcomes = Vec::new();
    let mut problems = Vec::new();
    for (latency, size, scenario) in runs {
        progress.set_message(format!("{scenario}, {size} B, {latency} ms"));
        match run_one(scenario, size, latency, budget, crowd, &mut problems).await {
            Ok(outcome) => outcomes.push(outcome),
            Err(error) => problems.push(format!("{scenario} {size} B {latency} ms: {error:#}")),
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    if let Some((exports, telemetry)) = tracing {
        let dropped = telemetry.dropped_spans();
        tokio::task::block_in_place(|| telemetry.shutdown());
        println!(
            "spans exported over OTLP/HTTP: {} export requests, {dropped} spans dropped",
            exports.load(Ordering::Relaxed)
        );
    }
    print_table(&outcomes);
    if let Some(parent) = args.json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&outcomes)?)?;
    println!("results: {}", args.json.display());
    let charts = chart::write(
        args.json.parent().unwrap_or(std::path::Path::new(".")),
        &outcomes,
    )?;
    for path in charts {
        println!("chart: {}", path.display());
    }
    if !problems.is_empty() {
        for problem in &problems {
            eprintln!("problem: {problem}");
        }
        anyhow::bail!("{} problem(s)", problems.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_long_round_trip_runs_only_its_scenarios_and_connections_runs_once_per_short_one() {
        for scenario in SCENARIOS {
            if NAMED_ONLY_SCENARIOS.contains(scenario) {
                assert!(!planned(scenario, true, 0), "{scenario}");
                continue;
            }
            assert!(planned(scenario, true, 0), "{scenario}");
            assert!(planned(scenario, true, 2), "{scenario}");
            assert_eq!(
                planned(scenario, true, 20),
                LONG_RTT_SCENARIOS.contains(scenario),
                "{scenario}"
            );
        }
        assert!(!planned("connections", false, 0));
        assert!(planned("direct", false, 20));
        assert!(LONG_RTT_SCENARIOS.iter().all(|s| SCENARIOS.contains(s)));
        assert!(NAMED_ONLY_SCENARIOS.iter().all(|s| SCENARIOS.contains(s)));
    }

    #[test]
    fn the_schema_scenario_sends_events_its_schema_takes_at_every_size() {
        use eventhub_gateway::gateway::schemas::Compiled;
        use eventhub_gateway::proto::v1::event::Body;
        let schema = Compiled::compile(
            HUB,
            std::path::Path::new("order.schema.json"),
            scenarios::ORDER_SCHEMA.as_bytes(),
        )
        .unwrap();
        for size in [100, 1024, 65_536] {
            let event = scenarios::json_event(size);
            let Some(Body::Binary(body)) = event.body else {
                panic!("a binary body")
            };
            assert!(
                body.len() >= size && body.len() <= size.max(200),
                "{size}: {}",
                body.len()
            );
            assert_eq!(schema.check(&body), Ok(()), "{size}");
        }
    }
}
