//! The `eventhub-gateway` command line: a thin clap front over the library's subcommands.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use eventhub_gateway::config::{CredentialKind, GatewayConfig};
use eventhub_gateway::server;
use eventhub_gateway::telemetry::export::OtlpSettings;
use eventhub_gateway::telemetry::logging::{self, LogFormat};
use figment::Figment;
use figment::providers::Serialized;

#[cfg(feature = "emulator")]
mod emulator_command;

/// mimalloc: the gateway makes about ten small allocations per event, and glibc's malloc and free took a
/// quarter of its instructions under load (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "eventhub-gateway",
    version,
    about = "Publish events to Azure Event Hubs through gRPC"
)]
struct Cli {
    /// How logs are written to stderr (RUST_LOG filters them).
    #[arg(long, global = true, value_enum, default_value_t = LogFormatArg::Text, env = "EVENTHUB_GATEWAY_LOG_FORMAT")]
    log_format: LogFormatArg,
    /// On failure, print the whole error with its causes and, when RUST_BACKTRACE is set, the backtrace.
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

/// `LogFormat` as a flag: the library's types know nothing of clap.
#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    /// Human-readable lines (coloured on a terminal).
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(format: LogFormatArg) -> Self {
        match format {
            LogFormatArg::Text => Self::Text,
            LogFormatArg::Json => Self::Json,
        }
    }
}

/// `CredentialKind` as a flag: the configuration's types know nothing of clap.
#[derive(Clone, Copy, clap::ValueEnum)]
enum CredentialArg {
    /// Workload identity when `AZURE_FEDERATED_TOKEN_FILE` is set (Kubernetes), else managed identity.
    Auto,
    /// Azure Workload Identity: `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_FEDERATED_TOKEN_FILE`.
    WorkloadIdentity,
    /// The host's managed identity (user-assigned when `AZURE_CLIENT_ID` is set).
    ManagedIdentity,
    /// The signed-in Azure CLI (`az login`).
    AzureCli,
    /// A service principal secret: `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_CLIENT_SECRET`.
    ClientSecret,
}

impl From<CredentialArg> for CredentialKind {
    fn from(credential: CredentialArg) -> Self {
        match credential {
            CredentialArg::Auto => Self::Auto,
            CredentialArg::WorkloadIdentity => Self::WorkloadIdentity,
            CredentialArg::ManagedIdentity => Self::ManagedIdentity,
            CredentialArg::AzureCli => Self::AzureCli,
            CredentialArg::ClientSecret => Self::ClientSecret,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC gateway (against Event Hubs, or with --emulator against an in-process emulator).
    Serve(Box<ServeArgs>),
    /// Send events through a running gateway: one with --text/--json, or one per line of a file or stdin.
    Send(eventhub_gateway::client::SendArgs),
    /// Run a local Event Hubs (plain AMQP; AMQPS and WebSockets optional) that the official SDKs can use unchanged.
    #[cfg(feature = "emulator")]
    Emulator(emulator_command::EmulatorArgs),
    /// Check a running gateway's gRPC health (grpc.health.v1): exit 0 when SERVING, 1 otherwise.
    Health(eventhub_gateway::client::HealthArgs),
    /// Wait, then exit 0: a preStop pause in an image that has no shell or `sleep`.
    Pause {
        /// How long, seconds.
        #[arg(long, value_name = "SECONDS")]
        seconds: f64,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// The gRPC listener [default: 127.0.0.1:50051].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// The HTTP listener of /metrics, /healthz and /readyz [default: 127.0.0.1:9464].
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// The Event Hubs REST send API's listener [default: off].
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<std::net::SocketAddr>,
    /// An Event Hubs connection string (prefer --connection-string-file or EVENTHUB_GATEWAY_CONNECTION_STRING).
    #[arg(long, conflicts_with_all = ["connection_string_file", "namespace", "emulator"])]
    connection_string: Option<String>,
    /// A file holding the connection string (for example a mounted Kubernetes Secret).
    #[arg(long, value_name = "FILE")]
    connection_string_file: Option<PathBuf>,
    /// The fully qualified namespace, authenticating with Entra ID (see --credential).
    #[arg(long, value_name = "FQDN")]
    namespace: Option<String>,
    /// Where Entra ID tokens come from, with --namespace [default: auto].
    #[arg(long, value_enum)]
    credential: Option<CredentialArg>,
    /// Reach Event Hubs over AMQP on WebSockets (port 443) instead of AMQPS (port 5671).
    #[arg(long)]
    websockets: bool,
    /// An Event Hub to forward to; repeat for more. The first is the default.
    #[arg(long = "event-hub", value_name = "NAME")]
    event_hubs: Vec<String>,
    /// A TOML or YAML file with any setting; the environment (EVENTHUB_GATEWAY_*) and flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Serve against an Event Hubs emulator started in this process.
    #[arg(long)]
    emulator: bool,
    /// Partitions of each hub of the in-process emulator [default: 4].
    #[arg(long)]
    emulator_partitions: Option<u32>,
    /// PEM certificate chain of the gRPC listener (TLS).
    #[arg(long, value_name = "PEM_FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "PEM_FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA bundle: clients must present a certificate it signed (mTLS).
    #[arg(long, value_name = "PEM_FILE", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Longest graceful shutdown, seconds [default: 30].
    #[arg(long, value_name = "SECONDS")]
    drain_timeout: Option<f64>,
    /// Check everything serve checks before it opens a socket (settings, connection string, TLS files, CA
    /// bundles, proxy, credential kind), then exit; no connection is made and no token fetched.
    #[arg(long)]
    check_config: bool,
}

impl ServeArgs {
    /// The flags that were given, as configuration overrides.
    fn overrides(&self) -> Figment {
        let mut figment = Figment::new();
        let mut set = |key: &str, value: serde_json::Value| {
            figment = std::mem::take(&mut figment).merge(Serialized::default(key, value));
        };
        if let Some(listen) = self.listen {
            set("listen", listen.to_string().into());
        }
        if let Some(addr) = self.metrics_listen {
            set("metrics_listen", addr.to_string().into());
        }
        if let Some(addr) = self.http_listen {
            set("http_listen", addr.to_string().into());
        }
        if let Some(text) = &self.connection_string {
            set("connection_string", text.clone().into());
        }
        if let Some(path) = &self.connection_string_file {
            set("connection_string_file", path.display().to_string().into());
        }
        if let Some(namespace) = &self.namespace {
            set("namespace", namespace.clone().into());
        }
        if let Some(credential) = self.credential {
            set(
                "credential",
                serde_json::to_value(CredentialKind::from(credential)).unwrap_or_default(),
            );
        }
        if self.websockets {
            set("websockets", true.into());
        }
        if !self.event_hubs.is_empty() {
            set("event_hubs", self.event_hubs.clone().into());
        }
        if self.emulator {
            set("emulator", true.into());
        }
        if let Some(partitions) = self.emulator_partitions {
            set("emulator_partitions", partitions.into());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            set("tls.cert", cert.display().to_string().into());
            set("tls.key", key.display().to_string().into());
        }
        if let Some(ca) = &self.client_ca {
            set("tls.client_ca", ca.display().to_string().into());
        }
        if let Some(seconds) = self.drain_timeout {
            set("drain_timeout_seconds", seconds.into());
        }
        figment
    }
}

/// Prints a failure for a person: one line, each cause once; everything (causes on their own lines and, with
/// RUST_BACKTRACE, the backtrace) only with `-v` or `RUST_LOG=debug`.
fn report(error: &anyhow::Error, verbose: bool) {
    let debugging = std::env::var("RUST_LOG").is_ok_and(|filter| {
        filter
            .split(',')
            .any(|directive| directive.ends_with("debug") || directive.ends_with("trace"))
    });
    if verbose || debugging {
        eprintln!("error: {error:?}");
    } else {
        eprintln!(
            "error: {}",
            eventhub_gateway::client::one_line(error.as_ref())
        );
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let verbose = cli.verbose;
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            report(&error, verbose);
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let otlp = OtlpSettings::from_env()?;
    let telemetry = logging::init(cli.log_format.into(), otlp.as_ref())?;
    let outcome = match cli.command {
        #[cfg(feature = "emulator")]
        Command::Emulator(args) => emulator_command::run(args).await,
        Command::Serve(args) => run_gateway(*args).await,
        Command::Health(args) => match eventhub_gateway::client::health(&args).await {
            Ok(status) if status == "SERVING" => {
                println!("{status}");
                Ok(())
            }
            Ok(status) => Err(anyhow::anyhow!("{}: {status}", args.address)),
            Err(error) => Err(error.into()),
        },
        Command::Pause { seconds } => {
            if !(0.0..=3600.0).contains(&seconds) {
                Err(anyhow::anyhow!("--seconds: must be between 0 and 3600"))
            } else {
                tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
                Ok(())
            }
        }
        Command::Send(args) => eventhub_gateway::client::run(args)
            .await
            .map_err(anyhow::Error::from)
            .and_then(|all_sent| {
                if all_sent {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!("not every event was accepted"))
                }
            }),
    };
    // Spans are flushed whatever the outcome; the exporter needs the runtime while this thread blocks.
    tokio::task::block_in_place(|| telemetry.shutdown());
    outcome
}

async fn run_gateway(args: ServeArgs) -> anyhow::Result<()> {
    let config = GatewayConfig::load(args.config.as_deref(), args.overrides())?;
    for name in GatewayConfig::ignored_environment() {
        tracing::warn!(variable = %name, "ignored: not a setting of the gateway");
    }
    // One preparation for both: --check-config passes exactly when serve would get as far as its sockets.
    let prepared = server::prepare(config)?;
    if args.check_config {
        let config = prepared.config();
        eprintln!(
            "configuration is valid: hubs {}, listening on {}",
            config.hubs().join(", "),
            config.listen
        );
        eprintln!("{}", prepared.describe_upstream());
        for schema in prepared.schemas().describe() {
            eprintln!("json schema of {schema}");
        }
        return Ok(());
    }
    let gateway = server::start_prepared(prepared).await?;
    // stdout carries exactly one JSON line, so scripts and tests can find the listeners.
    let emulator = gateway.emulator_endpoint();
    println!(
        "{}",
        serde_json::json!({
            "grpc": gateway.local_addr().to_string(),
            "metrics": gateway.metrics_addr().to_string(),
            "http": gateway.http_addr().map(|addr| addr.to_string()),
            "emulator": emulator.as_ref().map(|(connection_string, _)| connection_string),
        })
    );
    match emulator {
        Some((_, emulator)) => tracing::info!(
            grpc = %gateway.local_addr(),
            %emulator,
            "serving against the in-process Event Hubs emulator"
        ),
        None => tracing::info!(grpc = %gateway.local_addr(), "serving"),
    }
    eprintln!(
        "metrics on http://{0}/metrics, probes on http://{0}/healthz and /readyz",
        gateway.metrics_addr()
    );
    shutdown_signal().await;
    tracing::info!("draining: finishing open calls and streams, flushing the producer");
    if !gateway.shutdown().await? {
        anyhow::bail!("the drain timeout passed before every call was answered");
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
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
