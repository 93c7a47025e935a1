//! The contenders that run as their own processes and print one JSON result line: the Python ones
//! (`crates/bench/contenders/python/contenders.py`) and the official Rust SDK (`crates/bench/contenders/rust-sdk`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

use crate::HUB;
use crate::pin::{self, Side};
use crate::scenarios::{Budget, Outcome};

/// Where a contender sends: the gateway's gRPC address, or Event Hubs (the emulator) directly.
pub enum Target<'a> {
    Gateway(SocketAddr),
    EventHubs { connection_string: &'a str },
}

/// The Rust SDK contender's binary, built by `scripts/build-rust-sdk.sh` (debug or release).
pub fn rust_sdk_binary() -> Option<std::path::PathBuf> {
    ["release", "debug"]
        .iter()
        .map(|profile| {
            Path::new("target/rust-sdk")
                .join(profile)
                .join("rust-sdk-contender")
        })
        .find(|path| path.exists())
}

/// Runs one contender to completion and reads its result line; on the client's CPUs with `--pin`.
pub fn run(scenario: &str, size: usize, budget: Budget, target: Target) -> Result<Outcome, String> {
    let side = budget.pin.then_some(Side::Client);
    let program = |path: &Path| pin::command(path, side).map_err(|error| format!("{error:#}"));
    let mut command = match scenario {
        "rust-sdk" => {
            program(&rust_sdk_binary().ok_or("not built: run scripts/build-rust-sdk.sh first")?)?
        }
        _ => {
            let interpreter = if Path::new(".venv/bin/python").exists() {
                ".venv/bin/python"
            } else {
                "python3"
            };
            let mut command = program(Path::new(interpreter))?;
            command.arg("crates/bench/contenders/python/contenders.py");
            // `python-gateway-single` is `python-gateway` with one event per stream message.
            match scenario {
                "python-gateway-single" => {
                    command.args(["python-gateway", "--events-per-message", "1"]);
                }
                _ => {
                    command.arg(scenario);
                }
            }
            command
        }
    };
    command
        .args(["--size", &size.to_string()])
        .args(["--duration", &budget.duration.as_secs_f64().to_string()])
        .args(["--hub", HUB]);
    match target {
        Target::Gateway(addr) => command.args(["--gateway", &addr.to_string()]),
        Target::EventHubs { connection_string } => command.args(["--emulator", connection_string]),
    };
    if let Some(max) = budget.max_events {
        command.args(["--max-events", &max.to_string()]);
    }
    let output = command
        .output()
        .map_err(|error| format!("{:?}: {error}", command.get_program()))?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    #[derive(serde::Deserialize)]
    struct Line {
        events_ok: u64,
        events_failed: u64,
        seconds: f64,
        latency_ms: Option<HashMap<String, Option<f64>>>,
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let line: Line = serde_json::from_str(text.lines().last().unwrap_or_default())
        .map_err(|error| format!("{scenario} printed no result line: {error}: {text}"))?;
    let mut result = Outcome::new(
        scenario,
        size,
        (line.events_ok, line.events_failed, line.seconds),
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
