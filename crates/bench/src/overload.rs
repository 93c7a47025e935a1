//! `overload`: a gateway process offered twice the unary load it can take. Its memory must stay bounded, the
//! excess must be refused with RESOURCE_EXHAUSTED, and every event must be either answered OK and stored, or
//! refused and not stored: the stored events are read back from the emulator by their unique bodies.

use std::collections::HashSet;
use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use eventhub_emulator::{Emulator, decode_stored_event};
use eventhub_gateway::proto::v1;
use fe2o3_amqp_types::messaging::Body;
use tonic::Code;

use crate::pin::{self, Side};
use crate::scenarios::{self, Budget, Outcome};
use crate::{HUB, PARTITIONS};

/// The most resident memory the gateway may use under overload.
pub const RSS_LIMIT_MIB: f64 = 256.0;

/// What happened to the events of an overload run.
pub struct Report {
    pub outcome: Outcome,
    /// Events answered OK that are not stored.
    pub lost: u64,
    /// Events refused with RESOURCE_EXHAUSTED that were stored anyway.
    pub refused_but_stored: u64,
    pub refused: u64,
    /// Calls offered beyond the saturation rate over the run.
    pub backlog: u64,
    pub peak_rss_mib: f64,
}

/// A gateway in its own process, forwarding to `emulator`; killed when dropped.
pub struct GatewayProcess {
    child: Child,
    /// Its gRPC address.
    pub addr: SocketAddr,
}

impl GatewayProcess {
    /// Starts `eventhub-gateway` (beside this binary) with these extra settings (`EVENTHUB_GATEWAY_*`
    /// variables), on the server's CPUs with `pin`.
    pub fn start(
        emulator: &Emulator,
        settings: &[(&str, String)],
        pin: Option<Side>,
    ) -> anyhow::Result<Self> {
        let binary = std::env::current_exe()?.with_file_name("eventhub-gateway");
        let mut child = pin::command(&binary, pin)?
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .args(["--event-hub", HUB])
            .args(["--connection-string", &emulator.connection_string()])
            .env("RUST_LOG", "error")
            .envs(settings.iter().map(|(name, value)| (*name, value)))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().context("gateway stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        #[derive(serde::Deserialize)]
        struct Started {
            grpc: SocketAddr,
        }
        let started: Started = serde_json::from_str(&line)
            .with_context(|| format!("the gateway printed {line:?} instead of its addresses"))?;
        Ok(Self {
            child,
            addr: started.grpc,
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Resident memory of process `pid` now, MiB (Linux /proc).
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The body of event `id`: its number, padded to `size` bytes, so the read-back can tell events apart.
fn body(id: u64, size: usize) -> bytes::Bytes {
    let mut text = format!("{id:020}");
    text.extend(std::iter::repeat_n('x', size.saturating_sub(text.len())));
    bytes::Bytes::from(text)
}

/// Measures the gateway process's unary saturation, offers twice that for `budget`, then reads back.
pub async fn run(emulator: &Emulator, size: usize, budget: Budget) -> anyhow::Result<Report> {
    let gateway = GatewayProcess::start(emulator, &[], budget.pin.then_some(Side::Server))?;
    let callers = if budget.is_smoke() { 8 } else { 512 };
    let warmup = Budget {
        duration: budget.duration.min(Duration::from_secs(3)),
        max_events: budget.max_events.map(|m| m / 2),
        ..budget
    };
    let peak_rss_kib = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (peak, pid) = (Arc::clone(&peak_rss_kib), gateway.child.id());
        tokio::spawn(async move {
            while let Some(mib) = rss_mib(pid) {
                peak.fetch_max((mib * 1024.0) as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let saturated = scenarios::unary(gateway.addr, size, 1, callers, None, warmup).await?;
    let (saturated_ok, _, saturated_seconds) = saturated.counts;
    let saturation = saturated_ok as f64 / saturated_seconds;
    let offered = 2.0 * saturation;
    let saturated_rss_mib = peak_rss_kib.load(Ordering::Relaxed) as f64 / 1024.0;

    let mut clients = Vec::new();
    for _ in 0..16 {
        clients.push(scenarios::connect(gateway.addr).await?);
    }
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / offered.max(1.0)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let most = budget.max_events.map(|m| m / 2).unwrap_or(u64::MAX);
    let mut calls = Vec::new();
    let mut id = 0u64;
    while started.elapsed() < budget.duration && id < most {
        ticker.tick().await;
        let mut client = clients[id as usize % clients.len()].clone();
        let event_body = body(id, size);
        calls.push(tokio::spawn(async move {
            let mut request = tonic::Request::new(v1::SendEventRequest {
                event_hub: String::new(),
                event: Some(v1::Event {
                    body: Some(v1::event::Body::Binary(event_body)),
                    ..Default::default()
                }),
            });
            request.set_timeout(Duration::from_secs(30));
            match client.send_event(request).await {
                Ok(_) => Code::Ok,
                Err(status) => status.code(),
            }
        }));
        id += 1;
    }
    let offered_seconds = started.elapsed().as_secs_f64();
    let mut codes = Vec::with_capacity(calls.len());
    for call in calls {
        codes.push(call.await.unwrap_or(Code::Unknown));
    }
    let seconds = started.elapsed().as_secs_f64();
    sampler.abort();
    drop(gateway);

    let stored: HashSet<u64> = (0..PARTITIONS)
        .flat_map(|p| {
            emulator
                .partition_events(HUB, &p.to_string())
                .unwrap_or_default()
        })
        .filter_map(|event| {
            let message = decode_stored_event(&event).ok()?;
            let Body::Data(sections) = &message.body else {
                return None;
            };
            let first = sections.first()?.0.as_ref();
            std::str::from_utf8(first.get(..20)?).ok()?.parse().ok()
        })
        .collect();
    // One pass over the answers: event `id` is the call's index.
    let (mut ok, mut refused, mut lost, mut refused_but_stored) = (0u64, 0u64, 0u64, 0u64);
    let mut other_codes = std::collections::BTreeMap::<String, u64>::new();
    for (id, code) in codes.iter().enumerate() {
        let is_stored = stored.contains(&(id as u64));
        match code {
            Code::Ok => {
                ok += 1;
                lost += u64::from(!is_stored);
            }
            Code::ResourceExhausted => {
                refused += 1;
                refused_but_stored += u64::from(is_stored);
            }
            other => *other_codes.entry(format!("{other:?}")).or_default() += 1,
        }
    }
    let other = codes.len() as u64 - ok - refused;
    let peak_rss_mib = peak_rss_kib.load(Ordering::Relaxed) as f64 / 1024.0;
    let mut outcome = Outcome::new("overload", size, (ok, refused + other, seconds));
    outcome.note = Some(format!(
        "saturation {saturation:.0}/s; offered {:.0} calls/s for {offered_seconds:.1} s ({} calls); \
         {ok} OK, {refused} RESOURCE_EXHAUSTED, {other} other errors {other_codes:?}; {} stored; {lost} lost; \
         {refused_but_stored} refused but stored; peak RSS {peak_rss_mib:.0} MiB \
         ({saturated_rss_mib:.0} MiB at saturation)",
        codes.len() as f64 / offered_seconds,
        codes.len(),
        stored.len(),
    ));
    // Calls beyond what the gateway could answer in the time: once they are more than the gateway lets wait
    // at once (`max_concurrent_calls`), some must have been refused.
    let backlog = (codes.len() as f64 - saturation * offered_seconds).max(0.0) as u64;
    Ok(Report {
        outcome,
        backlog,
        lost,
        refused_but_stored,
        refused,
        peak_rss_mib,
    })
}
