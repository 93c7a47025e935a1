//! `eventhub-gateway emulator`: its flags, laid over the emulator's config file, and the run until a signal
//! (only in builds with the default `emulator` feature), with the HTTP fault control when asked for.

mod fault_control;

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use eventhub_emulator::{Emulator, EmulatorConfig, HubConfig, PemSource, TlsConfig};

#[derive(Args)]
/// The flags of `eventhub-gateway emulator`.
pub struct EmulatorArgs {
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
    /// Most connections open at once [default: 1024].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Most connections open at once from one IP address [default: 256].
    #[arg(long)]
    max_connections_per_peer: Option<usize>,
    /// Most sessions on one connection [default: 256].
    #[arg(long)]
    max_sessions_per_connection: Option<usize>,
    /// Most links on one connection, $cbs and $management included [default: 1024].
    #[arg(long)]
    max_links_per_connection: Option<usize>,
    /// Most $cbs/$management links on a connection before it puts a valid token [default: 16].
    #[arg(long)]
    max_unauthorized_links_per_connection: Option<usize>,
    /// Detach a $cbs/$management link whose connection put no valid token within this long [default: 5000].
    #[arg(long, value_name = "MS")]
    authorization_timeout_ms: Option<u64>,
    /// Close a connection that has had no links for this long [default: 300000].
    #[arg(long, value_name = "MS")]
    idle_connection_timeout_ms: Option<u64>,
    /// The AMQP idle-time-out announced; a peer silent for twice as long is dropped (0: none) [default: 60000].
    #[arg(long, value_name = "MS")]
    idle_time_out_ms: Option<u32>,
    /// Serve HTTP fault injection (POST /faults/throttle?count=N, ...; GET /faults) on this address; off
    /// without it. Anyone who reaches it can break the emulator: keep it on loopback or a test network.
    #[arg(long, value_name = "ADDR")]
    fault_control: Option<std::net::SocketAddr>,
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
            config.latency = Duration::from_millis(latency_ms);
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
        let limits = &mut config.limits;
        let overrides = [
            (&mut limits.max_connections, self.max_connections),
            (
                &mut limits.max_connections_per_peer,
                self.max_connections_per_peer,
            ),
            (
                &mut limits.max_sessions_per_connection,
                self.max_sessions_per_connection,
            ),
            (
                &mut limits.max_links_per_connection,
                self.max_links_per_connection,
            ),
            (
                &mut limits.max_unauthorized_links_per_connection,
                self.max_unauthorized_links_per_connection,
            ),
        ];
        for (field, value) in overrides {
            if let Some(value) = value {
                *field = value;
            }
        }
        if let Some(ms) = self.authorization_timeout_ms {
            limits.authorization_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = self.idle_connection_timeout_ms {
            limits.idle_connection_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = self.idle_time_out_ms {
            limits.idle_time_out = Duration::from_millis(ms.into());
        }
        Ok(config)
    }
}

/// Runs the emulator the flags describe until Ctrl-C or SIGTERM.
pub async fn run(args: EmulatorArgs) -> anyhow::Result<()> {
    // Bound before the emulator starts, so a taken port fails the start before anything serves.
    let fault_listener = match args.fault_control {
        Some(addr) => Some(fault_control::FaultControlListener::bind(addr).await?),
        None => None,
    };
    let config = args.into_config()?;
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
    let fault_control = fault_listener.map(|listener| {
        let addr = listener.local_addr();
        if let Some(warning) = fault_control::exposure_warning(addr) {
            tracing::warn!("{warning}");
        }
        eprintln!("fault control on http://{addr}/faults");
        listener.serve(emulator.shared_faults())
    });
    crate::shutdown_signal().await;
    if let Some(fault_control) = fault_control {
        fault_control.shutdown().await;
    }
    emulator.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
