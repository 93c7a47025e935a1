//! The named fault scenarios and the run of one: fresh emulator and gateway, load, the fault, the heal, the
//! read-back, and the row of the fault matrix with every broken promise listed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use eventhub_gateway::proto::v1::ErrorReason;
use parking_lot::Mutex;
use rand::Rng;
use tokio::time::sleep;

use crate::cluster::{
    EmulatorProcess, GATEWAY_GRPC, GatewayProcess, GatewaySettings, Resources, gauge, resources,
    scenario_dir,
};
use crate::load::{Answer, Ledger, Load, LoadShape, StreamQuirk};
use crate::network::Network;
use crate::proxy::{DelayProxy, PathShape};
use crate::readback::{self, Stored};
use crate::soak::{self, Sample};

/// The fault a scenario injects on top of its path's round trip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Nothing but the round trip.
    None,
    /// This percentage of packets dropped, both ways.
    Loss(u8),
    /// The path capped a little above the offered load.
    Bandwidth,
    /// Every packet dropped, no RST: for the short partition, or the one longer than `send_timeout`.
    Blackhole { long: bool },
    /// TCP resets of established connections at random intervals (nftables and the proxy, in turn).
    Resets,
    /// The emulator answers bursts of sends with server-busy.
    ServerBusy,
    /// The emulator invalidates every granted token, again and again.
    TokenExpiry,
    /// The emulator detaches every hub link, again and again.
    ForcedDetach,
    /// SIGTERM to the gateway mid-load; a new gateway starts once it has exited.
    Sigterm,
    /// SIGKILL to the gateway mid-load; a new gateway starts at once.
    Sigkill,
    /// One extra stream reads its acks slowly.
    SlowClient,
    /// One extra stream vanishes (its packets dropped, nothing closed) until the gateway should have reaped it.
    DeadClient,
    /// The soak's path: loss and periodic resets for the whole run (see `soak.rs`).
    Soak,
}

impl Fault {
    /// Whether events may end without an answer from the gateway (its connections broke) in this scenario.
    fn breaks_connections(self) -> bool {
        matches!(self, Fault::Sigterm | Fault::Sigkill)
    }

    /// Whether throughput must recover after the heal (the fault is meant to hurt while it lasts).
    fn expects_recovery(self) -> bool {
        !matches!(
            self,
            Fault::None | Fault::SlowClient | Fault::DeadClient | Fault::Soak
        )
    }
}

/// One named scenario of the matrix.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    /// Its name in the matrix and on the command line.
    pub name: &'static str,
    /// The round trip of the path, milliseconds.
    pub round_trip_ms: u64,
    /// Jitter added to each direction, milliseconds.
    pub jitter_ms: u64,
    /// What goes wrong.
    pub fault: Fault,
}

/// Every scenario, in the order they run.
pub fn all() -> Vec<Scenario> {
    let on_20ms = |name, fault| Scenario {
        name,
        round_trip_ms: 20,
        jitter_ms: 2,
        fault,
    };
    vec![
        Scenario {
            name: "rtt-2ms",
            round_trip_ms: 2,
            jitter_ms: 0,
            fault: Fault::None,
        },
        on_20ms("rtt-20ms", Fault::None),
        Scenario {
            name: "rtt-50ms",
            round_trip_ms: 50,
            jitter_ms: 5,
            fault: Fault::None,
        },
        on_20ms("loss-1pct", Fault::Loss(1)),
        on_20ms("loss-5pct", Fault::Loss(5)),
        on_20ms("bandwidth-cap", Fault::Bandwidth),
        on_20ms("blackhole-short", Fault::Blackhole { long: false }),
        on_20ms("blackhole-long", Fault::Blackhole { long: true }),
        on_20ms("resets", Fault::Resets),
        on_20ms("server-busy", Fault::ServerBusy),
        on_20ms("token-expiry", Fault::TokenExpiry),
        on_20ms("forced-detach", Fault::ForcedDetach),
        on_20ms("sigterm", Fault::Sigterm),
        on_20ms("sigkill", Fault::Sigkill),
        on_20ms("slow-client", Fault::SlowClient),
        on_20ms("dead-client", Fault::DeadClient),
    ]
}

/// The soak, run after the scenarios.
pub const SOAK: Scenario = Scenario {
    name: "soak",
    round_trip_ms: 20,
    jitter_ms: 2,
    fault: Fault::Soak,
};

/// Lane `lane` (1-based) of `lanes`: each scenario, longest first, goes to the lane with the least run time so
/// far (its fault window plus the warm-up and the time after the heal), so lanes take about as long.
pub fn lane(scenarios: Vec<Scenario>, lane: usize, lanes: usize, timing: &Timing) -> Vec<Scenario> {
    let length = |scenario: &Scenario| timing.warm + timing.window(scenario.fault) + timing.after;
    let mut by_length: Vec<(usize, Scenario)> = scenarios.into_iter().enumerate().collect();
    by_length.sort_by_key(|(index, scenario)| (std::cmp::Reverse(length(scenario)), *index));
    let mut loads = vec![Duration::ZERO; lanes];
    let mut mine = Vec::new();
    for (index, scenario) in by_length {
        let least = (0..lanes).min_by_key(|&n| (loads[n], n)).unwrap_or(0);
        loads[least] += length(&scenario);
        if least + 1 == lane {
            mine.push((index, scenario));
        }
    }
    mine.sort_by_key(|(index, _)| *index);
    mine.into_iter().map(|(_, scenario)| scenario).collect()
}

/// The durations and load of one run mode (short for CI, full for the report).
#[derive(Clone, Debug)]
pub struct Timing {
    /// The clients.
    pub load: LoadShape,
    /// The gateway's settings.
    pub gateway: GatewaySettings,
    /// Load before the fault.
    pub warm: Duration,
    /// How long a fault lasts (partitions excepted).
    pub fault_for: Duration,
    /// The short partition.
    pub partition_short: Duration,
    /// The long partition (longer than `send_timeout`).
    pub partition_long: Duration,
    /// Load after the heal.
    pub after: Duration,
    /// After the heal, ready again and throughput back to 80% within this.
    pub recovery_bound: Duration,
    /// The soak's length.
    pub soak: Duration,
    /// Seconds between soak samples.
    pub soak_sample: Duration,
    /// Seconds between the soak's resets.
    pub soak_reset_every: Duration,
}

impl Timing {
    /// The CI run: every scenario briefly, a one-minute soak.
    pub fn short() -> Self {
        let gateway = GatewaySettings {
            send_timeout: Duration::from_secs(6),
            stall_timeout: Duration::from_secs(3),
            drain_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(2),
            reconnect_backoff_max: Duration::from_secs(3),
        };
        Self {
            load: LoadShape {
                unary_clients: 8,
                unary_rate: 10.0,
                streams: 2,
                stream_rate: 60.0,
                body_bytes: 200,
                call_deadline: gateway.send_timeout + Duration::from_secs(10),
            },
            gateway,
            warm: Duration::from_secs(2),
            fault_for: Duration::from_secs(3),
            partition_short: Duration::from_secs(5),
            partition_long: Duration::from_secs(8),
            after: Duration::from_secs(5),
            recovery_bound: Duration::from_secs(5),
            soak: Duration::from_secs(60),
            soak_sample: Duration::from_secs(2),
            soak_reset_every: Duration::from_secs(10),
        }
    }

    /// The report's run: the durations (20 s and 90 s partitions, a ten-minute soak) at a higher rate.
    pub fn full() -> Self {
        let gateway = GatewaySettings {
            send_timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            keepalive: Duration::from_secs(10),
            reconnect_backoff_max: Duration::from_secs(30),
        };
        Self {
            load: LoadShape {
                unary_clients: 32,
                unary_rate: 10.0,
                streams: 4,
                stream_rate: 170.0,
                body_bytes: 200,
                call_deadline: gateway.send_timeout + Duration::from_secs(10),
            },
            gateway,
            warm: Duration::from_secs(10),
            fault_for: Duration::from_secs(20),
            partition_short: Duration::from_secs(20),
            partition_long: Duration::from_secs(90),
            after: Duration::from_secs(40),
            recovery_bound: Duration::from_secs(35),
            soak: Duration::from_secs(600),
            soak_sample: Duration::from_secs(5),
            soak_reset_every: Duration::from_secs(30),
        }
    }

    /// The bandwidth cap: half again the offered payload, so events flow but queue.
    fn bandwidth_kbit(&self) -> u32 {
        let bits_per_second = self.load.rate() * self.load.body_bytes as f64 * 8.0 * 1.5;
        ((bits_per_second / 1000.0) as u32).max(256)
    }

    /// How long the fault window of `fault` is.
    fn window(&self, fault: Fault) -> Duration {
        match fault {
            Fault::Blackhole { long: false } => self.partition_short,
            Fault::Blackhole { long: true } => self.partition_long,
            // Long enough for the gateway's keepalive to find the client dead (interval + timeout), and more.
            Fault::DeadClient => self.gateway.keepalive * 3 + Duration::from_secs(2),
            Fault::Soak => self.soak,
            _ => self.fault_for,
        }
    }
}

/// What the run of one scenario found: a row of the fault matrix.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Row {
    /// The scenario.
    pub scenario: String,
    /// Its path and fault, in words.
    pub path: String,
    /// Events offered by the clients.
    pub offered: u64,
    /// Answered OK.
    pub ok: u64,
    /// Answered with a failure, by `ErrorInfo.reason`.
    pub failed: BTreeMap<String, u64>,
    /// Ended without an answer from the gateway (a broken connection), by how.
    pub broken: BTreeMap<String, u64>,
    /// Never answered although nothing broke.
    pub unanswered: u64,
    /// Answered OK and not stored.
    pub lost: u64,
    /// Extra stored copies (resends after a reset).
    pub duplicates: u64,
    /// Answered with a failure (or broken) and stored all the same.
    pub failed_but_stored: u64,
    /// Of those, answered with a reason that says the event was not published (any but OUTCOME_UNKNOWN).
    #[serde(default)]
    pub stored_though_refused: BTreeMap<String, u64>,
    /// Answers to an event that already had one.
    pub double_answers: u64,
    /// Stored events whose message-id is not their id.
    pub message_id_mismatches: u64,
    /// OK events per second before the fault.
    pub rate_before: f64,
    /// Seconds from the fault to `/readyz` 503, when it went.
    pub not_ready_after_s: Option<f64>,
    /// Seconds from the heal to `/readyz` 200 again.
    pub ready_after_heal_s: Option<f64>,
    /// Seconds from the heal to a second with at least 80% of the rate before.
    pub recovery_s: Option<f64>,
    /// The gateway's peak RSS, MiB (of the last gateway process, when it was restarted).
    pub peak_rss_mib: f64,
    /// What else was seen (e.g. how long a reap took), in words.
    pub notes: Vec<String>,
    /// Broken promises: empty when the scenario passed.
    pub violations: Vec<String>,
    /// The soak's readings over time (other scenarios take none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<Sample>,
}

/// What every scenario of a run needs.
pub struct Harness {
    /// The namespaces and their faults (one scenario at a time changes them).
    pub network: tokio::sync::Mutex<Network>,
    /// `eventhub-gateway`.
    pub gateway_bin: PathBuf,
    /// Where logs and results go.
    pub out: PathBuf,
    /// Durations and load.
    pub timing: Timing,
}

/// What a scenario's fault saw besides the tally.
#[derive(Default)]
struct Findings {
    notes: Vec<String>,
    violations: Vec<String>,
    samples: Vec<Sample>,
}

/// `/readyz` over time: (seconds since the ledger started, status or 0 when unreachable).
type ReadinessLog = Arc<Mutex<Vec<(f64, u16)>>>;

/// The moments of a scenario, in seconds since its ledger started.
#[derive(Clone, Copy, Debug, Default)]
struct Moments {
    fault: f64,
    heal: f64,
    stop: f64,
}

/// The processes of one scenario, the proxy in front of the emulator and, for the dead client, the proxy in
/// front of the gateway.
struct Stage {
    emulator: EmulatorProcess,
    gateway: Option<GatewayProcess>,
    upstream: DelayProxy,
    client_proxy: Option<DelayProxy>,
    dir: PathBuf,
    last_resources: Resources,
}

impl Stage {
    async fn start(harness: &Harness, scenario: &Scenario) -> Result<Self> {
        harness
            .network
            .lock()
            .await
            .clear()
            .await
            .context("the network starts clean")?;
        let dir = scenario_dir(&harness.out, scenario.name)?;
        let emulator = EmulatorProcess::start(
            &*harness.network.lock().await,
            &harness.gateway_bin,
            &dir.join("emulator.log"),
        )
        .await?;
        let shape = PathShape {
            one_way_delay: Duration::from_millis(scenario.round_trip_ms) / 2,
            jitter: Duration::from_millis(scenario.jitter_ms),
        };
        let upstream = DelayProxy::start(loopback_any(), emulator.amqp_addr(), shape)
            .await
            .context("the delaying proxy starts")?;
        let mut stage = Self {
            emulator,
            gateway: None,
            upstream,
            client_proxy: None,
            dir,
            last_resources: Resources::default(),
        };
        stage.start_gateway(harness).await?;
        if scenario.fault == Fault::DeadClient {
            let direct = PathShape {
                one_way_delay: Duration::ZERO,
                jitter: Duration::ZERO,
            };
            stage.client_proxy = Some(
                DelayProxy::start(loopback_any(), GATEWAY_GRPC, direct)
                    .await
                    .context("the dead client's proxy starts")?,
            );
        }
        Ok(stage)
    }

    async fn start_gateway(&mut self, harness: &Harness) -> Result<()> {
        let gateway = GatewayProcess::start(
            &harness.gateway_bin,
            self.upstream.local_addr(),
            &harness.timing.gateway,
            &self.dir,
            &self.dir.join("gateway.log"),
        )
        .await?;
        self.gateway = Some(gateway);
        Ok(())
    }

    fn sample(&mut self) -> Resources {
        if let Some(gateway) = &self.gateway {
            self.last_resources = resources(gateway.pid());
        }
        self.last_resources
    }
}

fn loopback_any() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Runs one scenario and returns its row; an `Err` is a harness failure (a process would not start), not a
/// broken promise.
pub async fn run(harness: &Harness, scenario: &Scenario) -> Result<Row> {
    let timing = &harness.timing;
    let mut stage = Stage::start(harness, scenario).await?;
    let ledger = Ledger::new();
    let readiness = probe_readiness(&ledger);
    let extra = extra_clients(scenario, &stage);
    let load = Load::start(GATEWAY_GRPC, &timing.load, &ledger, extra);
    sleep(timing.warm).await;

    let mut moments = Moments {
        fault: ledger.elapsed().as_secs_f64(),
        ..Moments::default()
    };
    let mut findings = Findings::default();
    inject(harness, scenario, &mut stage, &ledger, &mut findings).await?;
    moments.heal = ledger.elapsed().as_secs_f64();

    sleep(timing.after).await;
    moments.stop = ledger.elapsed().as_secs_f64();
    let bound = timing.gateway.send_timeout + Duration::from_secs(10);
    if !load.stop(bound).await {
        findings.violations.push(format!(
            "clients still waiting for answers {bound:?} after the load stopped"
        ));
    }
    readiness.abort();
    let resources = stage.sample();
    if let Some(gateway) = stage.gateway.take() {
        let exit = gateway
            .terminate(timing.gateway.drain_timeout + Duration::from_secs(5))
            .await;
        if !exit.is_some_and(|status| status.success()) {
            findings.violations.push(format!(
                "the gateway's exit after the run: {exit:?} (0 expected)"
            ));
        }
    }
    let stored = readback::read_all(stage.emulator.amqp_addr())
        .await
        .context("the read-back")?;
    stage.emulator.stop().await;

    let readiness_log = readiness_log(&readiness);
    let mut row = tally(scenario, timing, &ledger, &stored);
    row.peak_rss_mib = resources.peak_rss_kib as f64 / 1024.0;
    judge(scenario, timing, &ledger, &readiness_log, moments, &mut row);
    row.notes.extend(findings.notes);
    row.violations.extend(findings.violations);
    row.samples = findings.samples;
    Ok(row)
}

fn extra_clients(scenario: &Scenario, stage: &Stage) -> Vec<(String, SocketAddr, StreamQuirk)> {
    match scenario.fault {
        Fault::SlowClient => vec![(
            "slow".into(),
            GATEWAY_GRPC,
            StreamQuirk {
                slow_reader: Some(Duration::from_millis(250)),
            },
        )],
        Fault::DeadClient => stage
            .client_proxy
            .as_ref()
            .map(|proxy| {
                vec![(
                    "dead".to_owned(),
                    proxy.local_addr(),
                    StreamQuirk::default(),
                )]
            })
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// The readiness probe: samples `/readyz` every 200 ms until aborted.
struct Readiness {
    log: ReadinessLog,
    task: tokio::task::JoinHandle<()>,
}

impl Readiness {
    fn abort(&self) {
        self.task.abort();
    }
}

fn probe_readiness(ledger: &Arc<Ledger>) -> Readiness {
    let log: ReadinessLog = Arc::default();
    let task = {
        let (log, ledger) = (Arc::clone(&log), Arc::clone(ledger));
        tokio::spawn(async move {
            let http = crate::cluster::probe_client();
            loop {
                let status = crate::cluster::readyz(&http).await.unwrap_or(0);
                log.lock().push((ledger.elapsed().as_secs_f64(), status));
                sleep(Duration::from_millis(200)).await;
            }
        })
    };
    Readiness { log, task }
}

fn readiness_log(readiness: &Readiness) -> Vec<(f64, u16)> {
    readiness.log.lock().clone()
}

/// Applies the scenario's fault for its window and heals it.
async fn inject(
    harness: &Harness,
    scenario: &Scenario,
    stage: &mut Stage,
    ledger: &Arc<Ledger>,
    findings: &mut Findings,
) -> Result<()> {
    let Findings {
        notes,
        violations,
        samples,
    } = findings;
    let timing = &harness.timing;
    let network = &harness.network;
    let window = timing.window(scenario.fault);
    match scenario.fault {
        Fault::None | Fault::SlowClient => sleep(window).await,
        Fault::Soak => {
            let Some(gateway) = &stage.gateway else {
                return Ok(());
            };
            *samples = soak::soak(
                network,
                &stage.upstream,
                gateway,
                ledger,
                window,
                timing.soak_sample,
                timing.soak_reset_every,
            )
            .await?;
            let (growth_notes, growth_violations) = soak::growth(samples);
            notes.extend(growth_notes);
            violations.extend(growth_violations);
        }
        Fault::Loss(percent) => {
            network.lock().await.set_loss(percent).await?;
            sleep(window).await;
            notes.push(dropped(network).await);
            network.lock().await.set_loss(0).await?;
        }
        Fault::Bandwidth => {
            let kbit = timing.bandwidth_kbit();
            notes.push(format!("capped at {kbit} kbit/s"));
            network.lock().await.cap_bandwidth(Some(kbit)).await?;
            sleep(window).await;
            network.lock().await.cap_bandwidth(None).await?;
        }
        Fault::Blackhole { .. } => {
            network.lock().await.set_blackhole(true).await?;
            sleep(window).await;
            notes.push(dropped(network).await);
            network.lock().await.set_blackhole(false).await?;
        }
        Fault::Resets => {
            let resets = reset_at_random(network, &stage.upstream, window).await?;
            notes.push(format!("{resets} resets"));
        }
        Fault::ServerBusy => {
            let burst = (timing.load.rate() / 2.0).max(10.0) as u64;
            let throttle = format!("throttle?count={burst}");
            every(window, window / 4, || stage.emulator.fault(&throttle)).await?;
            notes.push(format!("4 bursts of {burst} server-busy answers"));
        }
        Fault::TokenExpiry => {
            every(window, window / 3, || stage.emulator.fault("expire-tokens")).await?;
            notes.push("every token invalidated 3 times".into());
        }
        Fault::ForcedDetach => {
            every(window, window / 3, || stage.emulator.fault("detach")).await?;
            notes.push("every hub link detached 3 times".into());
        }
        Fault::Sigterm | Fault::Sigkill => {
            restart_gateway(harness, scenario.fault, stage, notes, violations).await?;
            sleep(window).await;
        }
        Fault::DeadClient => {
            let reaped = vanish_client(harness, stage, window, ledger).await?;
            match reaped {
                Some(after) => notes.push(format!(
                    "the vanished client's stream was reaped after {after:.1} s"
                )),
                None => violations.push(format!(
                    "the vanished client's stream was still open {window:?} after it vanished"
                )),
            }
        }
    }
    Ok(())
}

/// Runs `fault` at the start of each `period` within `window`.
async fn every<F, Fut>(window: Duration, period: Duration, mut fault: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let end = tokio::time::Instant::now() + window;
    while tokio::time::Instant::now() < end {
        fault().await?;
        sleep(period.min(end.saturating_duration_since(tokio::time::Instant::now()))).await;
    }
    Ok(())
}

/// Resets established connections at random moments (0.5-2.5 s apart) for `window`: by an nftables
/// `reject with tcp reset` pulse and by the proxy aborting every connection, in turn. Returns how many.
async fn reset_at_random(
    network: &tokio::sync::Mutex<Network>,
    proxy: &DelayProxy,
    window: Duration,
) -> Result<u64> {
    let end = tokio::time::Instant::now() + window;
    let mut resets = 0u64;
    while tokio::time::Instant::now() < end {
        let pause = rand::rng().random_range(500..2500);
        sleep(Duration::from_millis(pause)).await;
        reset_once(network, proxy, resets).await?;
        resets += 1;
    }
    Ok(resets)
}

/// Resets every connection between the proxy and the emulator once: the even `nth` by an nftables
/// `reject with tcp reset` pulse of 100 ms (the kernel's RSTs), the odd by the proxy aborting its connections.
pub async fn reset_once(
    network: &tokio::sync::Mutex<Network>,
    proxy: &DelayProxy,
    nth: u64,
) -> Result<()> {
    if nth % 2 == 0 {
        network.lock().await.set_reset(true).await?;
        sleep(Duration::from_millis(100)).await;
        network.lock().await.set_reset(false).await?;
    } else {
        proxy.reset_all();
    }
    Ok(())
}

/// What the nftables rules dropped so far, in words.
async fn dropped(network: &tokio::sync::Mutex<Network>) -> String {
    match network.lock().await.counters().await {
        Ok(counters) => format!(
            "nftables dropped {} segments at random, {} in the blackhole",
            counters.lost, counters.blackholed
        ),
        Err(error) => format!("nftables counters unreadable: {error}"),
    }
}

/// Signals the gateway, waits for it to go, and starts a new one.
async fn restart_gateway(
    harness: &Harness,
    fault: Fault,
    stage: &mut Stage,
    notes: &mut Vec<String>,
    violations: &mut Vec<String>,
) -> Result<()> {
    stage.sample();
    let Some(gateway) = stage.gateway.take() else {
        return Ok(());
    };
    let began = tokio::time::Instant::now();
    if fault == Fault::Sigterm {
        let bound = harness.timing.gateway.drain_timeout + Duration::from_secs(5);
        match gateway.terminate(bound).await {
            Some(status) if status.success() => notes.push(format!(
                "drained and exited 0 in {:.1} s",
                began.elapsed().as_secs_f64()
            )),
            other => violations.push(format!(
                "after SIGTERM the gateway's exit was {other:?} within {bound:?}"
            )),
        }
    } else {
        gateway.kill().await;
    }
    stage.start_gateway(harness).await?;
    notes.push(format!("down for {:.1} s", began.elapsed().as_secs_f64()));
    Ok(())
}

/// Makes the dead client's packets vanish for `window`; returns how long the gateway took to close its stream
/// (the open-stream gauge back to the live streams alone), if it did.
async fn vanish_client(
    harness: &Harness,
    stage: &Stage,
    window: Duration,
    ledger: &Arc<Ledger>,
) -> Result<Option<f64>> {
    let Some(proxy) = &stage.client_proxy else {
        return Ok(None);
    };
    let Some(gateway) = &stage.gateway else {
        return Ok(None);
    };
    let live_streams = harness.timing.load.streams as f64;
    proxy.set_stalled(true);
    let vanished = ledger.elapsed().as_secs_f64();
    let end = tokio::time::Instant::now() + window;
    let mut reaped = None;
    while tokio::time::Instant::now() < end {
        sleep(Duration::from_millis(250)).await;
        let open = gauge(
            &gateway.metrics().await,
            eventhub_telemetry::metrics::STREAMS_OPEN,
        );
        if reaped.is_none() && open <= live_streams {
            reaped = Some(ledger.elapsed().as_secs_f64() - vanished);
        }
    }
    // The client comes back and finds its connection closed: its unanswered events end visibly.
    proxy.set_stalled(false);
    Ok(reaped)
}

/// Counts what the clients were answered against what was stored.
fn tally(scenario: &Scenario, timing: &Timing, ledger: &Ledger, stored: &Stored) -> Row {
    let answers = ledger.answers();
    let mut row = Row {
        scenario: scenario.name.to_owned(),
        path: describe(scenario, timing),
        offered: ledger.offered(),
        duplicates: stored.duplicates(),
        double_answers: ledger.double_answers(),
        message_id_mismatches: stored.message_id_mismatches,
        ..Row::default()
    };
    for (id, answer) in &answers {
        let is_stored = stored.copies.contains_key(id);
        match answer {
            Answer::Ok => {
                row.ok += 1;
                if !is_stored {
                    row.lost += 1;
                }
            }
            Answer::Failed(reason) => *row.failed.entry(reason.clone()).or_default() += 1,
            Answer::Broken(how) => *row.broken.entry(how.clone()).or_default() += 1,
            Answer::Unanswered => row.unanswered += 1,
        }
        if is_stored && *answer != Answer::Ok {
            row.failed_but_stored += 1;
            if let Answer::Failed(reason) = answer
                && reason != OUTCOME_UNKNOWN
            {
                *row.stored_though_refused.entry(reason.clone()).or_default() += 1;
            }
        }
    }
    // Offered events whose client was abandoned before it recorded anything.
    row.unanswered += row.offered.saturating_sub(answers.len() as u64);
    row
}

fn describe(scenario: &Scenario, timing: &Timing) -> String {
    let path = format!("{} ms ±{} ms", scenario.round_trip_ms, scenario.jitter_ms);
    let window = timing.window(scenario.fault).as_secs();
    let fault = match scenario.fault {
        Fault::None => "no fault".to_owned(),
        Fault::Loss(percent) => format!("{percent}% loss for {window} s"),
        Fault::Bandwidth => format!("{} kbit/s for {window} s", timing.bandwidth_kbit()),
        Fault::Blackhole { .. } => format!(
            "blackhole {window} s (send_timeout {} s)",
            timing.gateway.send_timeout.as_secs()
        ),
        Fault::Resets => format!("TCP resets at random for {window} s"),
        Fault::ServerBusy => format!("server-busy bursts for {window} s"),
        Fault::TokenExpiry => format!("tokens expired 3x in {window} s"),
        Fault::ForcedDetach => format!("links detached 3x in {window} s"),
        Fault::Sigterm => "SIGTERM mid-load, restart".to_owned(),
        Fault::Sigkill => "SIGKILL mid-load, restart".to_owned(),
        Fault::SlowClient => "one stream reads acks every 250 ms".to_owned(),
        Fault::DeadClient => format!("one client vanishes for {window} s"),
        Fault::Soak => format!(
            "{}% loss and a reset every {} s for {window} s",
            soak::LOSS_PERCENT,
            timing.soak_reset_every.as_secs()
        ),
    };
    format!("{path}, {fault}")
}

/// Checks the promises against the tally, the readiness log and the throughput, and lists what broke.
fn judge(
    scenario: &Scenario,
    timing: &Timing,
    ledger: &Ledger,
    readiness: &[(f64, u16)],
    moments: Moments,
    row: &mut Row,
) {
    let violations = &mut row.violations;
    if row.ok == 0 {
        violations.push("no event was answered OK".into());
    }
    if row.lost > 0 {
        violations.push(format!("{} events answered OK are not stored", row.lost));
    }
    if row.double_answers > 0 {
        violations.push(format!(
            "{} answers to events already answered",
            row.double_answers
        ));
    }
    if row.unanswered > 0 {
        violations.push(format!("{} events never answered", row.unanswered));
    }
    if !row.stored_though_refused.is_empty() {
        violations.push(format!(
            "events answered as not published are stored: {:?}",
            row.stored_though_refused
        ));
    }
    if row.message_id_mismatches > 0 {
        violations.push(format!(
            "{} stored events lost their message-id",
            row.message_id_mismatches
        ));
    }
    let undocumented: Vec<&String> = row
        .failed
        .keys()
        .filter(|reason| ErrorReason::from_str_name(reason).is_none())
        .collect();
    if !undocumented.is_empty() {
        violations.push(format!(
            "failures without a documented reason: {undocumented:?}"
        ));
    }
    let broken: u64 = row.broken.values().sum();
    let vanished_client = scenario.fault == Fault::DeadClient;
    if broken > 0 && !scenario.fault.breaks_connections() && !vanished_client {
        violations.push(format!(
            "{broken} events ended by a broken connection: {:?}",
            row.broken
        ));
    }

    let ok_per_second = ledger.ok_per_second();
    row.rate_before = rate_before(&ok_per_second, moments.fault);
    if scenario.fault.expects_recovery() {
        row.recovery_s = recovery(&ok_per_second, row.rate_before, moments.heal, moments.stop);
        match row.recovery_s {
            Some(seconds) if seconds <= timing.recovery_bound.as_secs_f64() => {}
            other => violations.push(format!(
                "throughput not back to 80% of {:.0}/s within {:?} of the heal ({other:?})",
                row.rate_before, timing.recovery_bound
            )),
        }
    }
    if matches!(scenario.fault, Fault::Blackhole { .. }) {
        row.not_ready_after_s = first(readiness, moments.fault, |status| status != 200);
        row.ready_after_heal_s = first(readiness, moments.heal, |status| status == 200);
        if row
            .not_ready_after_s
            .is_none_or(|s| s > moments.heal - moments.fault)
        {
            violations.push("/readyz never went 503 during the partition".into());
        }
        if row
            .ready_after_heal_s
            .is_none_or(|s| s > timing.recovery_bound.as_secs_f64())
        {
            violations.push(format!(
                "/readyz not 200 within {:?} of the heal ({:?})",
                timing.recovery_bound, row.ready_after_heal_s
            ));
        }
    }
}

/// The one failure reason that leaves open whether the event was stored (docs/api.md).
const OUTCOME_UNKNOWN: &str = "OUTCOME_UNKNOWN";

/// The mean OK rate over the whole seconds before the fault (the first second, a warm-up, left out).
fn rate_before(ok_per_second: &[u64], fault: f64) -> f64 {
    let end = (fault.floor() as usize).min(ok_per_second.len());
    let seconds = ok_per_second.get(1..end).unwrap_or_default();
    if seconds.is_empty() {
        return 0.0;
    }
    seconds.iter().sum::<u64>() as f64 / seconds.len() as f64
}

/// Seconds from `heal` to the end of the first whole second after it with at least 80% of `before`, if one
/// comes before `stop`.
fn recovery(ok_per_second: &[u64], before: f64, heal: f64, stop: f64) -> Option<f64> {
    let first = heal.ceil() as usize;
    let last = (stop.floor() as usize).min(ok_per_second.len());
    (first..last)
        .find(|&second| ok_per_second[second] as f64 >= 0.8 * before)
        .map(|second| (second + 1) as f64 - heal)
}

/// Seconds from `since` to the first readiness sample after it that satisfies `wanted`.
fn first(readiness: &[(f64, u16)], since: f64, wanted: impl Fn(u16) -> bool) -> Option<f64> {
    readiness
        .iter()
        .find(|(at, status)| *at >= since && wanted(*status))
        .map(|(at, _)| at - since)
}

/// Writes the rows as JSON beside the logs.
pub fn save(rows: &[Row], path: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(rows).context("rows as JSON")?;
    std::fs::write(path, text).with_context(|| format!("writes {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_before_leaves_out_the_first_second_and_the_fault_second() {
        assert_eq!(rate_before(&[5, 100, 200, 7], 3.5), 150.0);
        assert_eq!(rate_before(&[5], 3.0), 0.0);
    }

    #[test]
    fn recovery_is_the_end_of_the_first_good_second_after_the_heal() {
        let seconds = [100, 100, 0, 0, 50, 90, 100];
        assert_eq!(recovery(&seconds, 100.0, 3.5, 7.0), Some(2.5));
        assert_eq!(recovery(&seconds, 100.0, 3.5, 5.0), None);
    }

    #[test]
    fn readiness_moments_count_from_their_start() {
        let log = [(1.0, 200), (2.0, 503), (3.0, 503), (4.0, 200)];
        assert_eq!(first(&log, 1.5, |s| s != 200), Some(0.5));
        assert_eq!(first(&log, 3.0, |s| s == 200), Some(1.0));
        assert_eq!(first(&log, 4.5, |s| s == 200), None);
    }

    #[test]
    fn a_tally_finds_the_lost_the_stored_failures_and_the_abandoned() {
        let ledger = Ledger::new();
        for id in ["a", "b", "c", "d"] {
            ledger.offer();
            let answer = match id {
                "a" | "b" => Answer::Ok,
                "c" => Answer::Failed("EVENT_HUBS_UNAVAILABLE".into()),
                _ => Answer::Broken("Unavailable".into()),
            };
            ledger.answer(id.into(), answer);
        }
        ledger.offer();
        let mut stored = Stored::default();
        stored.copies.insert("a".into(), 2);
        stored.copies.insert("c".into(), 1);
        stored.copies.insert("d".into(), 1);
        let scenario = all()[0];
        let row = tally(&scenario, &Timing::short(), &ledger, &stored);
        assert_eq!((row.offered, row.ok, row.lost), (5, 2, 1));
        assert_eq!(row.duplicates, 1);
        assert_eq!(row.failed_but_stored, 2);
        assert_eq!(
            row.stored_though_refused,
            BTreeMap::from([("EVENT_HUBS_UNAVAILABLE".to_owned(), 1)]),
            "a broken call's stored event is no contradiction; a refused one is"
        );
        assert_eq!(row.unanswered, 1);
        assert_eq!(row.broken.get("Unavailable"), Some(&1));
    }

    #[test]
    fn a_judge_names_every_broken_promise() {
        let ledger = Ledger::new();
        ledger.offer();
        ledger.answer("a".into(), Answer::Ok);
        let blackhole = all()
            .into_iter()
            .find(|s| s.name == "blackhole-short")
            .unwrap();
        let mut row = Row {
            ok: 1,
            lost: 1,
            unanswered: 2,
            ..Row::default()
        };
        row.failed.insert("NOT_A_REASON".into(), 1);
        row.broken.insert("Unavailable".into(), 3);
        row.stored_though_refused
            .insert("DEADLINE_EXCEEDED".into(), 4);
        let moments = Moments {
            fault: 2.0,
            heal: 7.0,
            stop: 12.0,
        };
        // Always ready: the partition went unnoticed.
        let readiness: Vec<(f64, u16)> = (0..60).map(|i| (f64::from(i) * 0.2, 200)).collect();
        judge(
            &blackhole,
            &Timing::short(),
            &ledger,
            &readiness,
            moments,
            &mut row,
        );
        let text = row.violations.join("\n");
        for expected in [
            "1 events answered OK are not stored",
            "2 events never answered",
            "NOT_A_REASON",
            "3 events ended by a broken connection",
            "events answered as not published are stored",
            "/readyz never went 503 during the partition",
            "throughput not back",
        ] {
            assert!(text.contains(expected), "{expected}: {text}");
        }
    }

    #[test]
    fn lanes_split_every_scenario_once_into_about_equal_run_times() {
        let timing = Timing::short();
        let every: Vec<Scenario> = all().into_iter().chain([SOAK]).collect();
        let lanes: Vec<Vec<Scenario>> = (1..=2)
            .map(|n| lane(every.clone(), n, 2, &timing))
            .collect();
        let mut names: Vec<&str> = lanes.iter().flatten().map(|s| s.name).collect();
        names.sort_unstable();
        let mut expected: Vec<&str> = every.iter().map(|s| s.name).collect();
        expected.sort_unstable();
        assert_eq!(names, expected);
        let length = |lane: &[Scenario]| -> Duration {
            lane.iter()
                .map(|s| timing.warm + timing.window(s.fault) + timing.after)
                .sum()
        };
        let (first, second) = (length(&lanes[0]), length(&lanes[1]));
        assert!(
            first.abs_diff(second) <= timing.soak / 2,
            "{first:?} vs {second:?}"
        );
    }

    #[test]
    fn every_scenario_name_is_unique_and_the_bandwidth_cap_exceeds_the_load() {
        let names: std::collections::HashSet<_> = all().iter().map(|s| s.name).collect();
        assert_eq!(names.len(), all().len());
        for timing in [Timing::short(), Timing::full()] {
            let payload_kbit = timing.load.rate() * timing.load.body_bytes as f64 * 8.0 / 1000.0;
            assert!(f64::from(timing.bandwidth_kbit()) > payload_kbit);
            assert!(timing.partition_long > timing.gateway.send_timeout);
        }
    }
}
