//! `serve`: assembles the producer (or the in-process emulator and a producer for it), the gateway service,
//! health, reflection, TLS and the middleware, runs them, and drains gracefully on request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::config::{ConfigError, CredentialKind, EventHubsSource, GatewayConfig};
use crate::emulator::{Emulator, EmulatorConfig, HubConfig};
use crate::gateway::{Gateway, GatewayError, GatewayState};
use crate::middleware::{ClientIdLayer, LoadShedLayer, TraceContextLayer};
use crate::producer::{Credential, Endpoint, Producer, ProducerError, TlsOptions, Transport};
use crate::proto::v1::event_hub_gateway_server::{EventHubGatewayServer, SERVICE_NAME};
use crate::telemetry::http::{HttpError, MetricsListener, MetricsServer};
use crate::telemetry::metrics::{Metrics, MetricsError, ScrapeSource};

/// How often health follows the producer's readiness.
const HEALTH_INTERVAL: Duration = Duration::from_millis(500);

/// Why the gateway could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The producer could not be built.
    #[error(transparent)]
    Producer(#[from] ProducerError),
    /// The in-process emulator did not start.
    #[error("the in-process emulator: {0}")]
    Emulator(String),
    /// An Entra ID credential could not be built.
    #[error("credential {kind:?}: {message}")]
    Credential {
        /// The credential kind asked for.
        kind: CredentialKind,
        /// What azure_identity said.
        message: String,
    },
    /// A TLS file cannot be read or used.
    #[error("tls: {0}")]
    Tls(String),
    /// The listener could not bind.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The metrics recorder could not be installed.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The metrics and probes listener could not start.
    #[error(transparent)]
    MetricsListener(#[from] HttpError),
    /// Reflection could not be built from the descriptors.
    #[error("reflection: {0}")]
    Reflection(String),
    /// The server failed while serving.
    #[error("serving: {0}")]
    Serve(String),
}

/// How long connections stay open after the last stream's status, so clients read it before the close.
const STREAM_LINGER: Duration = Duration::from_millis(500);

/// A running gateway.
pub struct RunningGateway {
    local_addr: SocketAddr,
    state: Arc<GatewayState>,
    stop: CancellationToken,
    server: JoinHandle<Result<(), ServeError>>,
    emulator: Option<Emulator>,
    metrics: MetricsServer,
    drain_timeout: Duration,
}

impl RunningGateway {
    /// Where the gRPC listener is.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics.local_addr()
    }

    /// The service's shared state (producer, limits).
    pub fn state(&self) -> &Arc<GatewayState> {
        &self.state
    }

    /// The in-process emulator, when serving against one.
    pub fn emulator(&self) -> Option<&Emulator> {
        self.emulator.as_ref()
    }

    /// Drains: health goes NOT_SERVING (and `/readyz` 503), new calls are refused, streams get their remaining
    /// acks, the producer flushes and every accepted event is answered; bounded by the drain timeout. Then the
    /// metrics listener stops. Returns whether the drain finished in time.
    pub async fn shutdown(self) -> Result<bool, ServeError> {
        self.state.start_draining();
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        // A lingering close: streams first send their remaining acks and DRAINING, and their connections stay
        // open a moment longer, so each client reads that status and stops writing before the socket closes.
        // Closed under a client's writes, the kernel answers them with a reset that drops the unread status.
        let streams_were_open = tokio::time::timeout_at(deadline, self.state.streams_ended())
            .await
            .unwrap_or(true);
        if streams_were_open {
            tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + STREAM_LINGER))
                .await;
        }
        self.stop.cancel();
        let drained = tokio::time::timeout_at(deadline, async {
            let served = self.server.await;
            self.state.producer().close().await;
            served
        })
        .await;
        // Kept to the end of the drain, so probes and scrapes see it happen.
        self.metrics.shutdown().await;
        if let Some(emulator) = self.emulator {
            emulator.shutdown(Duration::from_secs(1)).await;
        }
        match drained {
            Ok(Ok(result)) => result.map(|()| true),
            Ok(Err(join)) => Err(ServeError::Serve(join.to_string())),
            Err(_) => Ok(false),
        }
    }
}

/// Starts the gateway described by `config` and returns once it listens.
pub async fn start(config: GatewayConfig) -> Result<RunningGateway, ServeError> {
    config.validate()?;
    // Before any event can be counted: handles resolved earlier would be no-ops.
    let metrics = Metrics::install()?;
    let hubs = config.hubs();
    let (producer, emulator) = match config.source()? {
        EventHubsSource::Emulator => {
            let emulator = Emulator::start(EmulatorConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                event_hubs: hubs
                    .iter()
                    .map(|name| HubConfig {
                        name: name.clone(),
                        partitions: config.emulator_partitions,
                        consumer_groups: Vec::new(),
                    })
                    .collect(),
                ..EmulatorConfig::default()
            })
            .await
            .map_err(|error| ServeError::Emulator(error.to_string()))?;
            let producer = Producer::from_connection_string(
                &emulator.connection_string(),
                false,
                TlsOptions::default(),
                config.producer.clone(),
            )?;
            (producer, Some(emulator))
        }
        EventHubsSource::ConnectionString(text) => {
            let producer = Producer::from_connection_string(
                &text,
                config.websockets,
                TlsOptions::default(),
                config.producer.clone(),
            )?;
            (producer, None)
        }
        EventHubsSource::Namespace {
            namespace,
            credential,
        } => {
            let transport = if config.websockets {
                Transport::WebSockets
            } else {
                Transport::Amqps
            };
            let endpoint = Endpoint {
                host: namespace,
                port: transport.default_port(),
                transport,
            };
            let credential = Credential::Entra(entra_credential(credential)?);
            let producer = Producer::new(
                endpoint,
                credential,
                TlsOptions::default(),
                config.producer.clone(),
            )?;
            (producer, None)
        }
    };
    let state = Arc::new(GatewayState::new(
        producer,
        hubs,
        config.limits.clone(),
        config.producer.default_deadline(),
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    let stop = CancellationToken::new();
    tokio::spawn(follow_readiness(health, Arc::clone(&state), stop.clone()));
    // The same descriptors for both reflection versions (grpcurl speaks v1alpha, newer clients v1).
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_error =
        |error: tonic_reflection::server::Error| ServeError::Reflection(error.to_string());
    let reflection_v1 = reflection().build_v1().map_err(reflection_error)?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(reflection_error)?;

    let gateway = EventHubGatewayServer::new(Gateway::new(Arc::clone(&state)))
        .max_decoding_message_size(config.limits.max_request_bytes)
        .max_encoding_message_size(config.limits.max_request_bytes)
        .accept_compressed(CompressionEncoding::Gzip);

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| ServeError::Listen {
        addr: config.listen,
        source,
    })?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let metrics_listener = MetricsListener::bind(config.metrics_listen).await?;

    let mut builder = Server::builder()
        .max_concurrent_streams(config.limits.http2_max_concurrent_streams)
        .initial_stream_window_size(config.limits.http2_stream_window_bytes)
        .initial_connection_window_size(config.limits.http2_connection_window_bytes);
    if let Some(tls) = &config.tls {
        builder = builder
            .tls_config(server_tls(tls)?)
            .map_err(|error| ServeError::Tls(error.to_string()))?;
    }
    let shed = LoadShedLayer::new(
        config.limits.max_concurrent_calls,
        GatewayError::Overloaded {
            bound: "limits.max_concurrent_calls",
            retry_after: Duration::from_millis(100),
        }
        .to_status(),
    );
    let router = builder
        // The first layer is outermost: shed calls are still traced and attributed.
        .layer(TraceContextLayer::new())
        .layer(ClientIdLayer::new())
        .layer(shed.clone())
        .add_service(gateway)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let metrics = metrics_listener.serve(metrics, ScrapeSource::new(Arc::clone(&state), shed));
    let shutdown = stop.clone();
    let server = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await
            .map_err(|error| ServeError::Serve(error.to_string()))
    });
    tracing::info!(%local_addr, hubs = %config.hubs().join(", "), "gateway listening");
    Ok(RunningGateway {
        local_addr,
        state,
        stop,
        server,
        emulator,
        metrics,
        drain_timeout: config.drain_timeout(),
    })
}

/// SERVING while the producer has a ready connection; NOT_SERVING otherwise and from the start of a drain.
async fn follow_readiness(
    health: HealthReporter,
    state: Arc<GatewayState>,
    stop: CancellationToken,
) {
    let mut last = None;
    loop {
        let status = if !state.is_draining() && state.producer().is_ready() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            health.set_service_status("", status).await;
            health.set_service_status(SERVICE_NAME, status).await;
            last = Some(status);
        }
        if stop.is_cancelled() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(HEALTH_INTERVAL) => {}
            () = stop.cancelled() => {}
        }
    }
}

fn server_tls(tls: &crate::config::ServerTls) -> Result<ServerTlsConfig, ServeError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|error| ServeError::Tls(format!("{}: {error}", path.display())))
    };
    let mut config =
        ServerTlsConfig::new().identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?));
    if let Some(ca) = &tls.client_ca {
        config = config.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(config)
}

fn entra_credential(
    kind: CredentialKind,
) -> Result<Arc<dyn azure_core::credentials::TokenCredential>, ServeError> {
    use azure_identity::{
        AzureCliCredential, ClientSecretCredential, ManagedIdentityCredential,
        ManagedIdentityCredentialOptions, UserAssignedId, WorkloadIdentityCredential,
    };
    let failed = |error: azure_core::Error| ServeError::Credential {
        kind,
        message: error.to_string(),
    };
    let env = |name: &str| {
        std::env::var(name).map_err(|_| ServeError::Credential {
            kind,
            message: format!("{name} is not set"),
        })
    };
    let federated = std::env::var_os("AZURE_FEDERATED_TOKEN_FILE").is_some();
    Ok(match kind {
        CredentialKind::WorkloadIdentity => {
            WorkloadIdentityCredential::new(None).map_err(failed)?
        }
        CredentialKind::Auto if federated => {
            WorkloadIdentityCredential::new(None).map_err(failed)?
        }
        CredentialKind::ManagedIdentity | CredentialKind::Auto => {
            let options = std::env::var("AZURE_CLIENT_ID").ok().map(|client_id| {
                ManagedIdentityCredentialOptions {
                    user_assigned_id: Some(UserAssignedId::ClientId(client_id)),
                    ..Default::default()
                }
            });
            ManagedIdentityCredential::new(options).map_err(failed)?
        }
        CredentialKind::AzureCli => AzureCliCredential::new(None).map_err(failed)?,
        CredentialKind::ClientSecret => ClientSecretCredential::new(
            &env("AZURE_TENANT_ID")?,
            env("AZURE_CLIENT_ID")?,
            env("AZURE_CLIENT_SECRET")?.into(),
            None,
        )
        .map_err(failed)?,
    })
}
