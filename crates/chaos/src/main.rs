//! `chaos`: the gateway and the emulator as separate processes in network namespaces made by
//! `scripts/chaos.sh`, with latency, loss, partitions, resets and process kills on the path between them;
//! after each scenario every event is read back from the emulator and checked against what its client was
//! answered. Writes the fault matrix and the soak's charts.

mod cluster;
mod load;
mod network;
mod proxy;
mod readback;
mod report;
mod scenarios;
mod selftest;
mod soak;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use network::Network;
use scenarios::{Row, Timing};

#[derive(Parser)]
#[command(about = "Chaos and soak runs of the gateway against the emulator on a real network path")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every scenario, then the soak; exits 1 when any promise broke. Run it through scripts/chaos.sh.
    Run(RunArgs),
    /// Writes one matrix and the soak chart from the results of several runs (lanes).
    Report {
        /// `results.json` files of earlier runs.
        #[arg(required = true)]
        results: Vec<PathBuf>,
        /// Where matrix.md and soak.svg go.
        #[arg(long)]
        out: PathBuf,
    },
    /// Checks that every fault facility (delay, stall, resets, loss, blackhole, bandwidth) has its effect.
    Selftest,
    /// A TCP echo server: the selftest's stand-in for the emulator, in the emulator's namespace.
    #[command(hide = true)]
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The report's durations (20 s and 90 s partitions, a 10-minute soak) instead of CI's short ones.
    #[arg(long)]
    full: bool,
    /// Only these scenarios (names as in the matrix; `soak` for the soak).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Leave these scenarios out.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// Run only lane K of N (as `K/N`): the chosen scenarios split into N lanes of about equal length, so N
    /// runs in their own namespaces can go side by side (CI does, with two).
    #[arg(long, value_name = "K/N", value_parser = parse_lane)]
    lane: Option<(usize, usize)>,
    /// Where logs, results.json, matrix.md and the soak chart go.
    #[arg(long, default_value = "target/chaos")]
    out: PathBuf,
    /// The gateway binary (scripts/chaos.sh sets it).
    #[arg(long, env = "CHAOS_GATEWAY_BIN")]
    gateway_bin: PathBuf,
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run(args) => match run(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("chaos: {error:#}");
                ExitCode::FAILURE
            }
        },
        Command::Report { results, out } => match merge_reports(&results, &out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("chaos: {error:#}");
                ExitCode::FAILURE
            }
        },
        Command::Selftest => selftest::run().await,
        Command::Echo { listen } => selftest::echo(listen).await,
    }
}

/// Writes `matrix.md` (the matrix and every row's notes) and, when a row is the soak, `soak.svg` into `out`;
/// returns the matrix.
fn write_report(rows: &[Row], out: &std::path::Path) -> Result<String> {
    let mut matrix = report::matrix(rows);
    matrix.push('\n');
    matrix.push_str(&report::notes(rows));
    std::fs::write(out.join("matrix.md"), &matrix).context("writes matrix.md")?;
    if let Some(soak) = rows.iter().find(|row| !row.samples.is_empty()) {
        report::soak_chart(&soak.samples, &out.join("soak.svg"))?;
    }
    Ok(matrix)
}

fn merge_reports(results: &[PathBuf], out: &std::path::Path) -> Result<()> {
    let mut rows: Vec<Row> = Vec::new();
    for path in results {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reads {}", path.display()))?;
        let lane: Vec<Row> =
            serde_json::from_str(&text).with_context(|| format!("parses {}", path.display()))?;
        rows.extend(lane);
    }
    // In the order the scenarios run without lanes.
    let order: Vec<&str> = scenarios::all()
        .iter()
        .chain([&scenarios::SOAK])
        .map(|s| s.name)
        .collect();
    rows.sort_by_key(|row| order.iter().position(|name| *name == row.scenario));
    std::fs::create_dir_all(out).with_context(|| format!("creates {}", out.display()))?;
    println!("{}", write_report(&rows, out)?);
    Ok(())
}

fn parse_lane(text: &str) -> Result<(usize, usize), String> {
    let (lane, lanes) = text.split_once('/').ok_or("expected K/N, e.g. 1/2")?;
    let number = |part: &str| part.parse::<usize>().map_err(|e| format!("{part}: {e}"));
    let (lane, lanes) = (number(lane)?, number(lanes)?);
    if lane == 0 || lane > lanes {
        return Err(format!("lane {lane} of {lanes}: K must be 1 to N"));
    }
    Ok((lane, lanes))
}

async fn run(args: RunArgs) -> Result<()> {
    let timing = if args.full {
        Timing::full()
    } else {
        Timing::short()
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creates {}", args.out.display()))?;
    let harness = scenarios::Harness {
        network: tokio::sync::Mutex::new(Network::from_env(cluster::EMULATOR_PORT)?),
        gateway_bin: args.gateway_bin,
        out: args.out.clone(),
        timing,
    };
    let chosen: Vec<_> = scenarios::all()
        .into_iter()
        .chain([scenarios::SOAK])
        .filter(|s| args.only.is_empty() || args.only.iter().any(|name| name == s.name))
        .filter(|s| !args.skip.iter().any(|name| name == s.name))
        .collect();
    let chosen = match args.lane {
        Some((lane, lanes)) => scenarios::lane(chosen, lane, lanes, &harness.timing),
        None => chosen,
    };
    if chosen.is_empty() {
        bail!(
            "no scenario chosen: names are {:?}",
            scenarios::all().iter().map(|s| s.name).collect::<Vec<_>>()
        );
    }
    let mut rows: Vec<Row> = Vec::new();
    for scenario in &chosen {
        let started = std::time::Instant::now();
        let row = scenarios::run(&harness, scenario)
            .await
            .with_context(|| format!("scenario {}", scenario.name))?;
        println!(
            "{:<16} {:>5.1} s  offered {:>6}  ok {:>6}  lost {}  duplicates {}  {}",
            row.scenario,
            started.elapsed().as_secs_f64(),
            row.offered,
            row.ok,
            row.lost,
            row.duplicates,
            if row.violations.is_empty() {
                "pass".to_owned()
            } else {
                format!("FAIL: {}", row.violations.join("; "))
            }
        );
        rows.push(row);
        scenarios::save(&rows, &args.out.join("results.json"))?;
    }
    let _ = harness.network.lock().await.clear().await;
    let matrix = write_report(&rows, &args.out)?;
    println!("\n{matrix}");
    let failed: Vec<&str> = rows
        .iter()
        .filter(|row| !row.violations.is_empty())
        .map(|row| row.scenario.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("promises broken in: {}", failed.join(", "));
    }
    Ok(())
}
