//! The soak: a long run at a fixed rate over a lossy path with periodic resets, sampling the gateway's memory,
//! descriptors, threads and its own gauges, then checking that none of them grows after the warm-up.

use std::time::Duration;

use anyhow::Result;
use eventhub_telemetry::metrics::{
    CALLS_IN_FLIGHT, EVENTS_IN_FLIGHT, POOL_CONNECTIONS, POOL_LINKS, STREAMS_OPEN,
};
use tokio::time::{Instant, sleep};

use crate::cluster::{GatewayProcess, gauge, resources};
use crate::load::Ledger;
use crate::network::Network;
use crate::proxy::DelayProxy;
use crate::scenarios::reset_once;

/// The soak's loss, percent.
pub const LOSS_PERCENT: u8 = 1;

/// One reading during the soak.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Sample {
    /// Seconds since the load started.
    pub at_s: f64,
    /// Resident set, MiB.
    pub rss_mib: f64,
    /// Open file descriptors.
    pub fds: f64,
    /// Threads.
    pub threads: f64,
    /// AMQP connections in the pool.
    pub pool_connections: f64,
    /// Sender links in the pool.
    pub pool_links: f64,
    /// gRPC calls in flight.
    pub calls_in_flight: f64,
    /// SendStream calls open.
    pub streams_open: f64,
    /// Events accepted and not yet answered.
    pub events_in_flight: f64,
    /// OK answers per second since the previous sample.
    pub ok_per_second: f64,
}

/// Runs the soak's faults for `window`: loss throughout, a reset every `reset_every` (nftables and the proxy in
/// turn), a sample every `period`. Returns the samples.
pub async fn soak(
    network: &tokio::sync::Mutex<Network>,
    proxy: &DelayProxy,
    gateway: &GatewayProcess,
    ledger: &Ledger,
    window: Duration,
    period: Duration,
    reset_every: Duration,
) -> Result<Vec<Sample>> {
    network.lock().await.set_loss(LOSS_PERCENT).await?;
    let started = Instant::now();
    let mut next_reset = started + reset_every;
    let mut resets = 0u64;
    let mut samples = Vec::new();
    let mut ok_before = ok_so_far(ledger);
    while started.elapsed() < window {
        sleep(period).await;
        if Instant::now() >= next_reset {
            reset_once(network, proxy, resets).await?;
            resets += 1;
            next_reset += reset_every;
        }
        let metrics = gateway.metrics().await;
        let process = resources(gateway.pid());
        let ok_now = ok_so_far(ledger);
        samples.push(Sample {
            at_s: ledger.elapsed().as_secs_f64(),
            rss_mib: process.rss_kib as f64 / 1024.0,
            fds: process.fds as f64,
            threads: process.threads as f64,
            pool_connections: gauge(&metrics, POOL_CONNECTIONS),
            pool_links: gauge(&metrics, POOL_LINKS),
            calls_in_flight: gauge(&metrics, CALLS_IN_FLIGHT),
            streams_open: gauge(&metrics, STREAMS_OPEN),
            events_in_flight: gauge(&metrics, EVENTS_IN_FLIGHT),
            ok_per_second: (ok_now - ok_before) as f64 / period.as_secs_f64(),
        });
        ok_before = ok_now;
    }
    network.lock().await.set_loss(0).await?;
    Ok(samples)
}

fn ok_so_far(ledger: &Ledger) -> u64 {
    ledger.ok_per_second().iter().sum()
}

/// A quantity the soak checks, and how much it may grow.
struct Bound {
    name: &'static str,
    value: fn(&Sample) -> f64,
    /// Allowed growth of the last third's mean over the first third's, as a fraction of the latter.
    fraction: f64,
    /// Allowed growth besides, in the quantity's unit.
    slack: f64,
}

const BOUNDS: &[Bound] = &[
    Bound {
        name: "RSS (MiB)",
        value: |s| s.rss_mib,
        fraction: 0.10,
        slack: 2.0,
    },
    Bound {
        name: "open descriptors",
        value: |s| s.fds,
        fraction: 0.0,
        slack: 4.0,
    },
    Bound {
        name: "threads",
        value: |s| s.threads,
        fraction: 0.0,
        slack: 1.0,
    },
    Bound {
        name: "pool connections",
        value: |s| s.pool_connections,
        fraction: 0.0,
        slack: 1.0,
    },
    Bound {
        name: "pool links",
        value: |s| s.pool_links,
        fraction: 0.0,
        slack: 2.0,
    },
];

/// The growth after the warm-up (the first quarter of the samples): per quantity its least-squares slope per
/// minute (notes) and whether the mean of the last third exceeds the mean of the first third by more than its
/// bound (violations).
pub fn growth(samples: &[Sample]) -> (Vec<String>, Vec<String>) {
    let settled = &samples[samples.len() / 4..];
    let mut notes = Vec::new();
    let mut violations = Vec::new();
    if settled.len() < 6 {
        violations.push(format!(
            "only {} samples after the warm-up: too few to judge",
            settled.len()
        ));
        return (notes, violations);
    }
    let third = settled.len() / 3;
    for bound in BOUNDS {
        let points: Vec<(f64, f64)> = settled.iter().map(|s| (s.at_s, (bound.value)(s))).collect();
        let per_minute = slope(&points) * 60.0;
        let early = mean(&points[..third]);
        let late = mean(&points[points.len() - third..]);
        let allowed = early * bound.fraction + bound.slack;
        notes.push(format!(
            "{}: slope {per_minute:+.3}/min, first third {early:.1}, last third {late:.1} (bound +{allowed:.1})",
            bound.name
        ));
        if late - early > allowed {
            violations.push(format!(
                "{} grew from {early:.1} to {late:.1} after the warm-up (bound +{allowed:.1})",
                bound.name
            ));
        }
    }
    (notes, violations)
}

fn mean(points: &[(f64, f64)]) -> f64 {
    points.iter().map(|(_, y)| y).sum::<f64>() / points.len().max(1) as f64
}

/// The least-squares slope of `points`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let mean_x = points.iter().map(|(x, _)| x).sum::<f64>() / n;
    let mean_y = mean(points);
    let covariance: f64 = points
        .iter()
        .map(|(x, y)| (x - mean_x) * (y - mean_y))
        .sum();
    let variance: f64 = points.iter().map(|(x, _)| (x - mean_x).powi(2)).sum();
    if variance == 0.0 {
        0.0
    } else {
        covariance / variance
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(rss: impl Fn(f64) -> f64) -> Vec<Sample> {
        (0..40)
            .map(|i| {
                let at_s = f64::from(i) * 5.0;
                Sample {
                    at_s,
                    rss_mib: rss(at_s),
                    fds: 30.0,
                    threads: 4.0,
                    pool_connections: 1.0,
                    pool_links: 2.0,
                    ..Sample::default()
                }
            })
            .collect()
    }

    #[test]
    fn a_flat_soak_passes_and_states_its_slopes() {
        let (notes, violations) = growth(&samples(|t| 40.0 + (t / 7.0).sin()));
        assert!(violations.is_empty(), "{violations:?}");
        assert_eq!(notes.len(), BOUNDS.len());
        assert!(notes[0].starts_with("RSS (MiB): slope"));
    }

    #[test]
    fn a_leak_is_found_and_a_warm_up_is_forgiven() {
        let (_, violations) = growth(&samples(|t| 40.0 + t * 0.1));
        assert!(
            violations[0].starts_with("RSS (MiB) grew"),
            "{violations:?}"
        );
        let (_, violations) = growth(&samples(|t| if t < 40.0 { 10.0 + t } else { 50.0 }));
        assert!(violations.is_empty(), "{violations:?}");
    }

    #[test]
    fn the_slope_of_a_line_is_its_gradient() {
        assert!((slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]) - 2.0).abs() < 1e-9);
    }
}
