//! `chaos`: the gateway and the emulator as separate processes in network namespaces made by
//! `scripts/chaos.sh`, with latency, loss, partitions, resets and process kills on the path between them;
//! after each scenario every event is read back from the emulator and checked against what its client was
//! answered. Writes the fault matrix and the soak's charts.

mod network;
mod proxy;
mod selftest;

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    about = "Chaos and soak runs of the gateway and the emulator in network namespaces (scripts/chaos.sh)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Checks that every fault facility (delay, stall, resets, loss, blackhole, bandwidth) has its effect.
    Selftest,
    /// A TCP echo server: the selftest's stand-in for the emulator, in the emulator's namespace.
    #[command(hide = true)]
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Selftest => selftest::run().await,
        Command::Echo { listen } => selftest::echo(listen).await,
    }
}
