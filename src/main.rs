//! The `eventhub-gateway` command line: a thin clap front over the library's subcommands.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use eventhub_gateway::emulator::{Emulator, EmulatorConfig, HubConfig, PemSource, TlsConfig};

#[derive(Parser)]
#[command(
    name = "eventhub-gateway",
    version,
    about = "Publish events to Azure Event Hubs through gRPC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a local Event Hubs (plain AMQP; AMQPS and WebSockets optional) that the official SDKs can use unchanged.
    Emulator(EmulatorArgs),
}

#[derive(Args)]
struct EmulatorArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// A hub as NAME:PARTITIONS[:GROUP,GROUP...]; repeat for more. Without any: eh1 with 2 partitions.
    #[arg(long = "event-hub", value_name = "NAME:PARTITIONS")]
    event_hubs: Vec<HubConfig>,
    /// Shared access key name.
    #[arg(long)]
    key_name: Option<String>,
    /// Shared access key value.
    #[arg(long)]
    key: Option<String>,
    /// A TOML file with any of the emulator's settings; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Delay every disposition by this many milliseconds, to model a network round trip.
    #[arg(long)]
    latency_ms: Option<u64>,
    /// Accept Entra ID (jwt) CBS tokens, checking their form, audience and expiry only.
    #[arg(long)]
    accept_jwt: bool,
    /// The largest message or batch accepted, in bytes.
    #[arg(long)]
    max_message_size: Option<u64>,
    /// Also listen for AMQPS (TLS directly on TCP, as Event Hubs on 5671); needs --tls-cert and --tls-key.
    #[arg(long)]
    tls_listen: Option<std::net::SocketAddr>,
    /// PEM certificate chain (leaf first) for AMQPS and wss.
    #[arg(long, value_name = "PEM_FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of that certificate.
    #[arg(long, value_name = "PEM_FILE")]
    tls_key: Option<PathBuf>,
    /// Also listen for AMQP over WebSockets at /$servicebus/websocket (wss with a certificate, ws without).
    #[arg(long)]
    websocket_listen: Option<std::net::SocketAddr>,
}

impl EmulatorArgs {
    fn into_config(self) -> anyhow::Result<EmulatorConfig> {
        let mut config = match &self.config {
            Some(path) => EmulatorConfig::from_file(path)?,
            None => EmulatorConfig::default(),
        };
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if !self.event_hubs.is_empty() {
            config.event_hubs = self.event_hubs;
        }
        if let Some(key_name) = self.key_name {
            config.key_name = key_name;
        }
        if let Some(key) = self.key {
            config.key = key;
        }
        if let Some(latency_ms) = self.latency_ms {
            config.latency_ms = latency_ms;
        }
        if let Some(max_message_size) = self.max_message_size {
            config.max_message_size = max_message_size;
        }
        config.accept_jwt |= self.accept_jwt;
        match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => {
                config.tls = Some(TlsConfig {
                    cert: PemSource::Path(cert),
                    key: PemSource::Path(key),
                });
            }
            (None, None) => {}
            (Some(_), None) => anyhow::bail!("--tls-key: needed with --tls-cert"),
            (None, Some(_)) => anyhow::bail!("--tls-cert: needed with --tls-key"),
        }
        if let Some(addr) = self.tls_listen {
            config.tls_listen = Some(addr);
        }
        if let Some(addr) = self.websocket_listen {
            config.websocket_listen = Some(addr);
        }
        Ok(config)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,fe2o3_amqp=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Emulator(args) => run_emulator(args.into_config()?).await,
    }
}

async fn run_emulator(config: EmulatorConfig) -> anyhow::Result<()> {
    let hubs: Vec<String> = config
        .hubs()
        .map(|h| format!("{} ({} partitions)", h.name, h.partitions))
        .collect();
    let emulator = Emulator::start(config).await?;
    // stdout carries exactly one line, the connection string, so scripts can read it.
    println!("{}", emulator.connection_string());
    eprintln!(
        "Event Hubs emulator on {} with {}",
        emulator.local_addr(),
        hubs.join(", ")
    );
    if let Some(addr) = emulator.tls_addr() {
        eprintln!("AMQPS on {addr}");
    }
    if let Some(addr) = emulator.websocket_addr() {
        let scheme = if emulator.websocket_uses_tls() {
            "wss"
        } else {
            "ws"
        };
        eprintln!("AMQP over WebSockets on {scheme}://{addr}/$servicebus/websocket");
    }
    shutdown_signal().await;
    emulator.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler cannot fail at start-up");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
