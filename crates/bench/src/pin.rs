//! `--pin`: the client and the server of a scenario on separate CPUs (with `taskset`), where they are separate
//! processes, so that a tail latency is not one process waiting for the other's time slice. The CPUs this
//! process may use at start are split in two halves: the client's (first) and the server's (second).

use std::net::SocketAddr;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::Context;

use crate::scenarios::{Budget, Outcome};

/// Which half of the CPUs.
#[derive(Clone, Copy, Debug)]
pub enum Side {
    /// The load: the harness's own clients or a contender process.
    Client,
    /// The gateway (or, for the SDK contenders, the emulator they send to).
    Server,
}

/// The scenarios `--pin` applies to: those whose client and server are separate processes (`unary` by
/// running its client as `bench --gateway ADDR`).
pub fn applies(scenario: &str) -> bool {
    matches!(
        scenario,
        "unary"
            | "overload"
            | "connections"
            | "python-gateway"
            | "python-gateway-single"
            | "python-client"
            | "python-seed"
            | "python-sdk-batched"
            | "rust-sdk"
    )
}

/// The side this process takes in `scenario`: the client where the gateway is a process of its own
/// (`overload`, `connections`; the emulator stays here with the client), else the server (the gateway and
/// emulator here, the client a process).
pub fn own_side(scenario: &str) -> Side {
    match scenario {
        "overload" | "connections" => Side::Client,
        _ => Side::Server,
    }
}

/// The CPUs this process could use at start, as a `taskset` list ("0-3"), and split in halves.
struct Cpus {
    all: String,
    client: String,
    server: String,
}

fn cpus() -> anyhow::Result<&'static Cpus> {
    static CPUS: OnceLock<Result<Cpus, String>> = OnceLock::new();
    CPUS.get_or_init(|| read_cpus().map_err(|error| format!("{error:#}")))
        .as_ref()
        .map_err(|error| anyhow::anyhow!("--pin: {error}"))
}

fn read_cpus() -> anyhow::Result<Cpus> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let list = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .context("no Cpus_allowed_list in /proc/self/status")?
        .trim()
        .to_owned();
    let mut ids = Vec::new();
    for part in list.split(',') {
        let (first, last) = part.split_once('-').unwrap_or((part, part));
        ids.extend(first.parse::<usize>()?..=last.parse::<usize>()?);
    }
    anyhow::ensure!(
        ids.len() >= 2,
        "needs at least 2 CPUs, this process may use {list}"
    );
    let join = |ids: &[usize]| {
        ids.iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let (client, server) = ids.split_at(ids.len() / 2);
    Command::new("taskset")
        .arg("-V")
        .output()
        .context("taskset (util-linux) is not installed")?;
    Ok(Cpus {
        all: list,
        client: join(client),
        server: join(server),
    })
}

/// Checks that pinning is possible here, and remembers the CPUs before any pinning.
pub fn check() -> anyhow::Result<()> {
    cpus().map(|_| ())
}

/// The CPUs of `side`, as `taskset -c` takes them.
pub fn list(side: Side) -> anyhow::Result<&'static str> {
    let cpus = cpus()?;
    Ok(match side {
        Side::Client => &cpus.client,
        Side::Server => &cpus.server,
    })
}

/// `program` to be run on `side`'s CPUs (through `taskset`, which then becomes it: the same process id),
/// or as it is without a side.
pub fn command(
    program: impl AsRef<std::ffi::OsStr>,
    side: Option<Side>,
) -> anyhow::Result<Command> {
    Ok(match side {
        None => Command::new(program),
        Some(side) => {
            let mut command = Command::new("taskset");
            command.args(["-c", list(side)?]).arg(program);
            command
        }
    })
}

/// Every thread of process `pid` on these CPUs.
fn set(pid: u32, cpus: &str) -> anyhow::Result<()> {
    let output = Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .output()
        .context("running taskset")?;
    anyhow::ensure!(
        output.status.success(),
        "taskset -a -p -c {cpus} {pid}: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// This process on `side`'s CPUs until the guard is dropped (threads started meanwhile inherit it).
pub fn this_process(side: Side) -> anyhow::Result<Pinned> {
    set(std::process::id(), list(side)?)?;
    Ok(Pinned)
}

/// This process pinned; dropping it lets it use every CPU it could at start again.
pub struct Pinned;

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Ok(cpus) = cpus() {
            if let Err(error) = set(std::process::id(), &cpus.all) {
                eprintln!("--pin: could not unpin: {error:#}");
            }
        }
    }
}

/// `unary`'s client as a process of its own on the client's CPUs (`bench --gateway ADDR --only unary`),
/// against the gateway at `addr` in this process; its one result.
pub fn unary_client(
    addr: SocketAddr,
    size: usize,
    latency: u64,
    budget: Budget,
) -> anyhow::Result<Outcome> {
    // Its charts go beside its JSON: a directory of its own, removed after.
    let directory = std::env::temp_dir().join(format!("bench-unary-{}", std::process::id()));
    let json = directory.join("results.json");
    let mut command = command(std::env::current_exe()?, Some(Side::Client))?;
    command
        .args(["--gateway", &addr.to_string(), "--only", "unary"])
        .args(["--sizes", &size.to_string()])
        .args(["--latency-ms", &latency.to_string()])
        .args(["--duration", &budget.duration.as_secs_f64().to_string()])
        .arg("--json")
        .arg(&json);
    if budget.is_smoke() {
        command.arg("--smoke");
    }
    if let Some(events) = budget.max_events {
        command.args(["--events", &events.to_string()]);
    }
    let output = command.output().context("running the unary client");
    let written = std::fs::read(&json);
    let _ = std::fs::remove_dir_all(&directory);
    let output = output?;
    anyhow::ensure!(
        output.status.success(),
        "the unary client failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let outcomes: Vec<Outcome> = serde_json::from_slice(&written?)?;
    outcomes
        .into_iter()
        .next()
        .context("the unary client reported nothing")
}
