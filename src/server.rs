//! `serve`: prepares everything that can be checked without a socket or a token ([`prepare`], which
//! `serve --check-config` stops after), then assembles the producer (or the in-process emulator and a producer
//! for it), the gateway service, health, reflection, TLS and the middleware, runs them, and drains on request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::auth::{AuthSetupError, Authenticator};
use crate::config::{ConfigError, CredentialKind, EventHubsSource, GatewayConfig};
use crate::gateway::guard::{GuardLimits, RequestGuard};
use crate::gateway::limits::Limits;
use crate::gateway::schemas::{SchemaError, Schemas};
use crate::gateway::{Gateway, GatewayError, GatewayState};
use crate::listener::{Age, ConnectionCallsLayer, Connections, GrpcIncoming, Http1, Timeouts};
use crate::middleware::{ClientIdLayer, LoadShedLayer, ShedBound, TraceContextLayer};
use crate::proto::v1::event_hub_gateway_server::{EventHubGatewayServer, SERVICE_NAME};
use crate::rest::{RestError, RestListener, RestServer, RestSettings};
use crate::telemetry::http::Exposed;
use crate::telemetry::http::{HttpError, MetricsListener, MetricsServer};
use crate::tls_material::{self, TlsFileError};
#[cfg(feature = "emulator")]
use eventhub_emulator::{Emulator, EmulatorConfig, HubConfig};
use eventhub_producer::{
    ConnectionString, Credential, Endpoint, Producer, ProducerError, TlsOptions, Transport,
    credential_for, endpoint_for,
};
use eventhub_producer::{client_config, native_roots};
use eventhub_telemetry::metrics::{Metrics, MetricsError, Reports};

/// How often health follows the producer's readiness.
const HEALTH_INTERVAL: Duration = Duration::from_millis(500);

/// While not ready, a changed reason is warned about at most this often.
const READINESS_REMINDER: Duration = Duration::from_secs(60);

/// Why the gateway could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The authenticator could not start (a JWKS file unreadable, say).
    #[error(transparent)]
    Auth(#[from] AuthSetupError),
    /// The producer could not be built.
    #[error(transparent)]
    Producer(#[from] ProducerError),
    /// The in-process emulator did not start.
    #[error("the in-process emulator: {0}")]
    Emulator(String),
    /// The configuration asks for the in-process emulator, and this build has none.
    #[error(
        "emulator: this build has no Event Hubs emulator (built without the `emulator` feature); give a connection string or namespace"
    )]
    NoEmulatorInThisBuild,
    /// An Entra ID credential could not be built.
    #[error("credential {kind:?}: {message}")]
    Credential {
        /// The credential kind asked for.
        kind: CredentialKind,
        /// What azure_identity said.
        message: String,
    },
    /// A TLS file cannot be read or used.
    #[error("{field}: {source}")]
    TlsFile {
        /// The setting naming the file (`tls.cert`, `event_hubs_ca_file`).
        field: &'static str,
        /// What is wrong with it.
        source: TlsFileError,
    },
    /// The TLS material passed the checks but the server's TLS stack refused it.
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
    /// The REST send API's listener could not start.
    #[error(transparent)]
    RestListener(#[from] RestError),
    /// A hub's JSON Schema cannot be read or compiled; names the file.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// Reflection could not be built from the descriptors.
    #[error("reflection: {0}")]
    Reflection(String),
    /// The server failed while serving.
    #[error("serving: {0}")]
    Serve(String),
}

/// How long connections stay open after the last stream's status, so clients read it before the close.
const STREAM_LINGER: Duration = Duration::from_millis(500);

/// How long a drain waits, once every event is answered, for clients to read their answers before closing
/// their connections.
const CLIENT_READ_GRACE: Duration = Duration::from_secs(5);

/// The emulator `serve --emulator` runs in the process.
#[cfg(feature = "emulator")]
type InProcessEmulator = Emulator;
/// A build without the `emulator` feature never has one.
#[cfg(not(feature = "emulator"))]
type InProcessEmulator = std::convert::Infallible;

/// A running gateway.
pub struct RunningGateway {
    local_addr: SocketAddr,
    state: Arc<GatewayState>,
    stop: CancellationToken,
    server: JoinHandle<Result<(), ServeError>>,
    emulator: Option<InProcessEmulator>,
    metrics: MetricsServer,
    drain_timeout: Duration,
    connections: Arc<Connections>,
    rest: Option<RestServer>,
}

impl RunningGateway {
    /// Where the REST send API listens, when `http_listen` is set.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.rest.as_ref().map(RestServer::local_addr)
    }

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
    #[cfg(feature = "emulator")]
    pub fn emulator(&self) -> Option<&Emulator> {
        self.emulator.as_ref()
    }

    /// The in-process emulator's connection string and address, when serving against one.
    pub fn emulator_endpoint(&self) -> Option<(String, SocketAddr)> {
        #[cfg(feature = "emulator")]
        return self
            .emulator
            .as_ref()
            .map(|emulator| (emulator.connection_string(), emulator.local_addr()));
        #[cfg(not(feature = "emulator"))]
        self.emulator.map(|never| match never {})
    }

    /// Drains: new calls are refused with DRAINING and streams stop reading; the producer flushes and every
    /// accepted event gets its outcome (bounded by the drain timeout); then clients have a short grace to read
    /// their answers (streams send their acks and DRAINING), after which connections still open (clients that
    /// do not read) are closed. Returns whether every accepted event was answered in time, whatever the
    /// clients did with the answers.
    pub async fn shutdown(mut self) -> Result<bool, ServeError> {
        self.state.start_draining();
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        // The ack phase: what the gateway owes is an outcome for every event it accepted.
        let answered = tokio::time::timeout_at(deadline, self.state.producer().close())
            .await
            .unwrap_or(false);
        let grace = deadline.min(tokio::time::Instant::now() + CLIENT_READ_GRACE);
        // A lingering close: streams first send their remaining acks and DRAINING, and their connections stay
        // open a moment longer, so each client reads that status and stops writing before the socket closes.
        // Closed under a client's writes, the kernel answers them with a reset that drops the unread status.
        let streams_were_open = tokio::time::timeout_at(grace, self.state.streams_ended())
            .await
            .unwrap_or(true);
        if streams_were_open {
            tokio::time::sleep_until(grace.min(tokio::time::Instant::now() + STREAM_LINGER)).await;
        }
        self.stop.cancel();
        let served = match tokio::time::timeout_at(grace, &mut self.server).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(ServeError::Serve(join.to_string())),
            Err(_) => {
                tracing::warn!(
                    grace = ?CLIENT_READ_GRACE,
                    "closing connections whose clients did not read their answers"
                );
                // The connections' own tasks outlive the server's: they are closed through their sockets.
                self.connections.close_all();
                self.server.abort();
                Ok(())
            }
        };
        if let Some(rest) = self.rest {
            rest.shutdown().await;
        }
        // Kept to the end of the drain, so probes and scrapes see it happen.
        self.metrics.shutdown().await;
        #[cfg(feature = "emulator")]
        if let Some(emulator) = self.emulator {
            emulator.shutdown(Duration::from_secs(1)).await;
        }
        served.map(|()| answered)
    }
}

/// Where the producer goes, once everything about it is checked.
#[derive(Debug)]
pub enum Upstream {
    /// The in-process emulator (started by `start`: its port is known only then).
    Emulator,
    /// Event Hubs (or an emulator's AMQPS or wss listener).
    EventHubs(Box<EventHubsTarget>),
}

/// Event Hubs as the producer will reach it.
#[derive(Debug)]
pub struct EventHubsTarget {
    /// Host, port, transport and proxy.
    pub endpoint: Endpoint,
    /// How the producer authenticates (no token fetched yet).
    pub credential: Credential,
    /// The roots the producer trusts.
    pub tls: TlsOptions,
}

/// A configuration with everything `serve` checks before opening a socket done: the connection string
/// parsed, the connection string and proxy password files read, the Entra ID credential built (no token
/// fetched), the listener's certificate, key and client CA and the Event Hubs CA bundle read and checked,
/// the proxy chosen.
#[derive(Debug)]
pub struct PreparedGateway {
    config: GatewayConfig,
    upstream: Upstream,
    listener_tls: Option<Arc<rustls::ServerConfig>>,
    schemas: Arc<Schemas>,
}

/// Checks `config` as far as it can be without a socket or a token; `serve --check-config` stops here.
pub fn prepare(config: GatewayConfig) -> Result<PreparedGateway, ServeError> {
    config.validate()?;
    let listener_tls = config.tls.as_ref().map(listener_tls).transpose()?;
    let upstream = match config.source()? {
        EventHubsSource::Emulator if cfg!(feature = "emulator") => Upstream::Emulator,
        EventHubsSource::Emulator => return Err(ServeError::NoEmulatorInThisBuild),
        EventHubsSource::ConnectionString(text) => {
            let parsed: ConnectionString = text.parse().map_err(ProducerError::from)?;
            event_hubs_upstream(
                &config,
                endpoint_for(&parsed, config.websockets),
                credential_for(&parsed, &config.producer),
            )?
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
            event_hubs_upstream(
                &config,
                Endpoint::direct(namespace, transport.default_port(), transport),
                Credential::Entra(entra_credential(credential)?),
            )?
        }
    };
    config.producer.validate().map_err(ProducerError::from)?;
    // Compiled here, so --check-config and start both stop on a bad schema, naming its file.
    let schemas = Arc::new(Schemas::load(&config.schemas)?);
    Ok(PreparedGateway {
        config,
        upstream,
        listener_tls,
        schemas,
    })
}

/// Event Hubs at `endpoint`: its proxy chosen, the roots it trusts read and checked.
fn event_hubs_upstream(
    config: &GatewayConfig,
    endpoint: Endpoint,
    credential: Credential,
) -> Result<Upstream, ServeError> {
    let endpoint = with_proxy(config, endpoint)?;
    let mut tls = TlsOptions {
        native_roots: endpoint.transport != Transport::Amqp,
        ..TlsOptions::default()
    };
    if let Some(path) = &config.event_hubs_ca_file {
        let bundle = tls_material::load_bundle(path).map_err(|source| ServeError::TlsFile {
            field: "event_hubs_ca_file",
            source,
        })?;
        tls.extra_root_certificates_pem
            .push(String::from_utf8_lossy(&bundle.pem).into_owned());
    }
    if tls.native_roots {
        for error in &native_roots().errors {
            tracing::warn!(%error, "part of the operating system's certificate store is unreadable");
        }
    }
    // Built once here, so a root the producer would refuse fails now rather than at the first connection.
    client_config(&tls).map_err(|error| ServeError::Tls(error.to_string()))?;
    Ok(Upstream::EventHubs(Box::new(EventHubsTarget {
        endpoint,
        credential,
        tls,
    })))
}

/// The endpoint with the proxy it goes through: only AMQP over WebSockets goes through one.
fn with_proxy(config: &GatewayConfig, endpoint: Endpoint) -> Result<Endpoint, ServeError> {
    let proxy = config.proxy_for(&endpoint.host, endpoint.port, |name| {
        std::env::var(name).ok()
    })?;
    match (endpoint.transport, proxy) {
        (Transport::WebSockets, proxy) => Ok(Endpoint { proxy, ..endpoint }),
        (_, Some(_)) if config.event_hubs_proxy.is_some() => {
            Err(ServeError::Config(ConfigError::invalid(
                "event_hubs_proxy",
                "the connection string says UseDevelopmentEmulator (plain AMQP): no proxy applies",
            )))
        }
        (transport, Some(proxy)) => {
            tracing::warn!(
                proxy = %proxy.address(),
                ?transport,
                "HTTPS_PROXY is ignored: only AMQP over WebSockets goes through a proxy (set websockets = true)"
            );
            Ok(endpoint)
        }
        (_, None) => Ok(endpoint),
    }
}

impl PreparedGateway {
    /// The configuration it was prepared from.
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    /// Where the producer goes.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// The hubs' JSON Schemas, compiled.
    pub fn schemas(&self) -> &Schemas {
        &self.schemas
    }

    /// One line on where Event Hubs is and how it is reached (no secret), for `--check-config`.
    pub fn describe_upstream(&self) -> String {
        match &self.upstream {
            Upstream::Emulator => "event hubs: the in-process emulator".to_owned(),
            Upstream::EventHubs(target) => {
                let EventHubsTarget {
                    endpoint,
                    credential,
                    tls,
                } = target.as_ref();
                let credential = match credential {
                    Credential::SharedKey { .. } => "a shared access key",
                    Credential::SharedAccessSignature(_) => "a shared access signature",
                    Credential::Entra(_) => "Entra ID",
                };
                let mut line = format!(
                    "event hubs: {}:{} over {:?} with {credential}",
                    endpoint.host, endpoint.port, endpoint.transport
                );
                if endpoint.transport != Transport::Amqp {
                    line.push_str(&format!(
                        ", trusting the webpki roots, {} from the operating system",
                        native_roots().certificates.len()
                    ));
                    if !tls.extra_root_certificates_pem.is_empty() {
                        line.push_str(" and event_hubs_ca_file");
                    }
                }
                if let Some(proxy) = &endpoint.proxy {
                    line.push_str(&format!(", through the proxy {}", proxy.address()));
                    if proxy.credentials.is_some() {
                        line.push_str(" (basic auth)");
                    }
                }
                line
            }
        }
    }
}

/// Starts the gateway described by `config` and returns once it listens.
pub async fn start(config: GatewayConfig) -> Result<RunningGateway, ServeError> {
    start_prepared(prepare(config)?).await
}

/// Starts a prepared gateway and returns once it listens.
pub async fn start_prepared(prepared: PreparedGateway) -> Result<RunningGateway, ServeError> {
    let PreparedGateway {
        config,
        upstream,
        listener_tls,
        schemas,
    } = prepared;
    // Before any event can be counted: handles resolved earlier would be no-ops.
    let metrics = Metrics::install()?;
    crate::listener::raise_open_files_limit();
    let hubs = config.hubs();
    let (producer, emulator) = connect_upstream(&config, upstream, &hubs).await?;
    producer.expect_hubs(&hubs);
    let stop = CancellationToken::new();
    let authenticator = Authenticator::start(&config.auth, &hubs, stop.child_token()).await?;
    if !config.auth.required && !config.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %config.listen,
            "auth.required is false on a listener beyond loopback: any caller that reaches it may publish to \
             every hub (set [auth] required = true with grants)"
        );
    }
    if let Some(http) = config.http_listen
        && !config.auth.required
        && !http.ip().is_loopback()
    {
        tracing::warn!(
            http_listen = %http,
            "auth.required is false on the REST listener beyond loopback: any caller that reaches it may publish \
             to every hub (set [auth] required = true with grants)"
        );
    }
    let state = Arc::new(
        GatewayState::new(
            producer,
            hubs,
            config.limits.clone(),
            authenticator,
            config.producer.send_timeout,
        )
        .with_schemas(Arc::clone(&schemas)),
    );
    tokio::spawn(reload_schemas_on_sighup(schemas, stop.clone()));

    let (health, health_service) = tonic_health::server::health_reporter();
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

    let service = Gateway::new(Arc::clone(&state));
    let gateway = EventHubGatewayServer::new(service.clone())
        .max_decoding_message_size(config.limits.max_request_bytes)
        .max_encoding_message_size(config.limits.max_request_bytes)
        .accept_compressed(CompressionEncoding::Gzip);
    // Every request message is bounded (size, decompression, counts, decoded size) before tonic decodes it.
    let gateway = RequestGuard::new(
        gateway,
        GuardLimits {
            max_request_bytes: config.limits.max_request_bytes,
            max_events: config.limits.max_events_per_request,
        },
    );

    let (local_addr, listener) = bind_grpc(&config).await?;
    let metrics_listener = MetricsListener::bind(config.metrics_listen).await?;
    let rest_listener = match config.http_listen {
        Some(addr) => Some(RestListener::bind(addr).await?),
        None => None,
    };
    let limits = &config.limits;
    let connections = Connections::new(limits.max_connections, limits.max_connections_per_client);
    // The REST listener speaks HTTP/1.1: the same certificate, key and client CA, its own ALPN.
    let rest_tls = listener_tls.as_ref().map(|tls| {
        let mut tls = rustls::ServerConfig::clone(tls);
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(tls)
    });
    // With gRPC-Web, HTTP/1.1 by ALPN too (after h2, which browsers then still get): a client that offers only
    // http/1.1 would otherwise fail its handshake.
    let listener_tls = listener_tls.map(|tls| {
        if !config.grpc_web.enabled {
            return tls;
        }
        let mut tls = (*tls).clone();
        tls.alpn_protocols.push(b"http/1.1".to_vec());
        Arc::new(tls)
    });
    let incoming = crate::listener::grpc_incoming(
        listener,
        &connections,
        listener_tls.map(TlsAcceptor::from),
        Timeouts {
            handshake: limits.handshake_timeout,
            header_read: limits.header_read_timeout,
            idle: limits.connection_idle_timeout,
        },
        config.grpc_web.enabled.then_some(Http1 {
            max_head_bytes: limits.http2_max_header_list_bytes as usize,
        }),
    );

    let builder = grpc_server(&config.limits);
    let shed = load_shedding(&config.limits);
    // The first layer is outermost: shed calls are still traced and attributed.
    let calls = tower::ServiceBuilder::new()
        .layer(TraceContextLayer::new())
        .layer(ClientIdLayer::new())
        .layer(shed.clone())
        .into_inner();
    let services = (gateway, health_service, reflection_v1, reflection_v1alpha);
    let connection_calls = ConnectionCallsLayer::new(Arc::clone(&connections));
    let rest = rest_listener.map(|listener| {
        listener.serve(RestSettings {
            gateway: service,
            shed: shed.clone(),
            limits: config.limits.clone(),
            send_timeout: config.producer.send_timeout,
            tls: rest_tls,
        })
    });
    let exposed = Exposed {
        reports: Reports::default()
            .and(Arc::clone(&state) as _)
            .and(Arc::new(shed)),
        readiness: Arc::clone(&state) as _,
    };
    let metrics = metrics_listener.serve(metrics, exposed, &config.limits);
    let age = limits.max_connection_age.map(|max| Age {
        max,
        grace: limits.max_connection_age_grace,
    });
    // tonic's server has no hook on one connection (and its own max_connection_age sends no GOAWAY when a
    // grace is set, and draws no jitter), so each connection gets a server of its own, whose shutdown signal is
    // that connection's: tonic's graceful path sends the GOAWAY, with its HTTP/2 settings, layers and
    // connection info unchanged. Building one is cheap (no socket); a connection lives much longer.
    let server = if config.grpc_web.enabled {
        tracing::info!(
            cors_allowed_origins = ?config.grpc_web.cors_allowed_origins,
            "gRPC-Web on: the gRPC listener accepts HTTP/1.1 too"
        );
        let router = builder
            .accept_http1(true)
            // Counted as calls (a preflight too), so an HTTP/1.1 connection's idle and head bounds hold.
            .layer(connection_calls)
            // Base64 (text mode) sends a third more than it decodes to: twice the bound covers either.
            .layer(crate::grpc_web::Http1DrainLayer {
                max_bytes: 2 * config.limits.max_request_bytes,
            })
            // Outside gRPC-Web and shedding: a refusal's answer carries the CORS headers the page needs to
            // read it, and a preflight costs no call slot.
            .layer(config.grpc_web.cors_layers())
            .layer(tonic_web::GrpcWebLayer::new())
            .layer(crate::grpc_web::WebDecodeErrorsLayer)
            .layer(calls);
        tokio::spawn(serve_connections(
            incoming,
            add_services(router, services),
            age,
            stop.clone(),
        ))
    } else {
        let router = builder.layer(connection_calls).layer(calls);
        tokio::spawn(serve_connections(
            incoming,
            add_services(router, services),
            age,
            stop.clone(),
        ))
    };
    tracing::info!(%local_addr, hubs = %config.hubs().join(", "), "gateway listening");
    Ok(RunningGateway {
        local_addr,
        state,
        stop,
        server,
        emulator,
        metrics,
        drain_timeout: config.drain_timeout,
        connections,
        rest,
    })
}

/// Reads every hub's JSON Schema again at each SIGHUP until `stop`: all swapped in at once, or, when one fails,
/// all kept and the failure logged naming the file. Traffic goes on meanwhile (an event checks against the
/// schema it took).
async fn reload_schemas_on_sighup(schemas: Arc<Schemas>, stop: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => hangups,
            Err(error) => {
                tracing::warn!(%error, "no SIGHUP handler: schemas cannot be reloaded");
                return;
            }
        };
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                received = hangups.recv() => if received.is_none() { return },
            }
            if schemas.is_empty() {
                tracing::info!("SIGHUP: no schemas configured, nothing to reload");
                continue;
            }
            // Reading and compiling is blocking work: off the runtime's worker threads.
            let reloading = Arc::clone(&schemas);
            let reloaded = tokio::task::spawn_blocking(move || reloading.reload()).await;
            match reloaded {
                Ok(Ok(count)) => {
                    eventhub_telemetry::metrics::schema_reloaded(true);
                    tracing::info!(schemas = count, "SIGHUP: schemas reloaded");
                }
                Ok(Err(error)) => {
                    eventhub_telemetry::metrics::schema_reloaded(false);
                    tracing::error!(%error, "SIGHUP: schema reload failed; every schema in use is kept");
                }
                Err(error) => {
                    eventhub_telemetry::metrics::schema_reloaded(false);
                    tracing::error!(%error, "SIGHUP: schema reload failed; every schema in use is kept");
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (schemas, stop);
    }
}

/// The gateway's services on `server`: the gateway (behind its request guard), health, reflection.
fn add_services<L>(
    mut server: Server<L>,
    (gateway, health, reflection_v1, reflection_v1alpha): (
        RequestGuard<EventHubGatewayServer<Gateway>>,
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
) -> tonic::transport::server::Router<L>
where
    L: Clone,
{
    server
        .add_service(gateway)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
}

/// Serves every connection of `incoming` through `router` (see [`crate::listener::serve_grpc`]) until `stop`.
async fn serve_connections<L, ResBody>(
    incoming: GrpcIncoming,
    router: tonic::transport::server::Router<L>,
    age: Option<Age>,
    stop: CancellationToken,
) -> Result<(), ServeError>
where
    tonic::transport::server::Router<L>: Clone + Send + 'static,
    L: tower::Layer<tonic::service::Routes> + Clone + Send + 'static,
    L::Service: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    <L::Service as tower::Service<http::Request<tonic::body::Body>>>::Future: Send,
    <L::Service as tower::Service<http::Request<tonic::body::Body>>>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>> + Send,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use futures_util::StreamExt as _;
    let Some(age) = age else {
        // No age to keep: one server for every connection, so a connection costs no server and task of its own
        // (a third of an idle connection's memory, and the goodput of the `overload` benchmark).
        let signal = stop.cancelled_owned();
        return match incoming {
            GrpcIncoming::Plain(incoming) => {
                router.serve_with_incoming_shutdown(incoming, signal).await
            }
            GrpcIncoming::Tls(incoming) => {
                router.serve_with_incoming_shutdown(incoming, signal).await
            }
        }
        .map_err(|error| ServeError::Serve(error.to_string()));
    };
    fn one<T: Send + 'static>(
        connection: T,
    ) -> impl futures_util::Stream<Item = std::io::Result<T>> + Send {
        // Never ends: an incoming stream that ends starts tonic's shutdown.
        futures_util::stream::once(std::future::ready(Ok(connection)))
            .chain(futures_util::stream::pending())
    }
    match incoming {
        GrpcIncoming::Plain(incoming) => {
            let serve = move |connection, signal| {
                router
                    .clone()
                    .serve_with_incoming_shutdown(one(connection), signal)
            };
            crate::listener::serve_grpc(incoming, serve, Some(age), stop).await;
        }
        GrpcIncoming::Tls(incoming) => {
            let serve = move |connection, signal| {
                router
                    .clone()
                    .serve_with_incoming_shutdown(one(connection), signal)
            };
            crate::listener::serve_grpc(incoming, serve, Some(age), stop).await;
        }
    }
    Ok(())
}

/// The producer the upstream asks for (and the in-process emulator it sends to, if that is the upstream).
async fn connect_upstream(
    config: &GatewayConfig,
    upstream: Upstream,
    hubs: &[String],
) -> Result<(Producer, Option<InProcessEmulator>), ServeError> {
    match upstream {
        #[cfg(feature = "emulator")]
        Upstream::Emulator => {
            let (producer, emulator) = start_in_process_emulator(config, hubs).await?;
            Ok((producer, Some(emulator)))
        }
        #[cfg(not(feature = "emulator"))]
        Upstream::Emulator => {
            let _ = hubs;
            Err(ServeError::NoEmulatorInThisBuild)
        }
        Upstream::EventHubs(target) => {
            let EventHubsTarget {
                endpoint,
                credential,
                tls,
            } = *target;
            let producer = Producer::new(endpoint, credential, tls, config.producer.clone())?;
            Ok((producer, None))
        }
    }
}

/// Binds the gRPC listener.
async fn bind_grpc(
    config: &GatewayConfig,
) -> Result<(SocketAddr, tokio::net::TcpListener), ServeError> {
    let listen_error = |source| ServeError::Listen {
        addr: config.listen,
        source,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(listen_error)?;
    let local_addr = listener.local_addr().map_err(listen_error)?;
    Ok((local_addr, listener))
}

/// The HTTP/2 server with the gateway's windows, stream and header caps, rapid-reset bound and keepalive (TLS
/// is the listener's: see `listener::grpc_incoming`).
fn grpc_server(limits: &Limits) -> Server {
    Server::builder()
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .initial_stream_window_size(limits.http2_stream_window_bytes)
        .initial_connection_window_size(limits.http2_connection_window_bytes)
        .http2_max_pending_accept_reset_streams(Some(limits.http2_max_pending_accept_reset_streams))
        .http2_max_header_list_size(limits.http2_max_header_list_bytes)
        // A peer that stops answering pings is gone: its connection and every call slot it held are freed.
        .http2_keepalive_interval(Some(limits.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(limits.http2_keepalive_timeout))
}

/// The call slots, in all and per client; a call beyond them is refused at once with OVERLOADED.
fn load_shedding(limits: &Limits) -> LoadShedLayer {
    LoadShedLayer::new(
        limits.max_concurrent_calls,
        limits.max_calls_per_client,
        |bound| {
            GatewayError::Overloaded {
                bound: match bound {
                    ShedBound::Total => "limits.max_concurrent_calls",
                    ShedBound::PerClient => "limits.max_calls_per_client",
                },
                retry_after: Duration::from_millis(100),
            }
            .to_status()
        },
    )
}

/// SERVING while the gateway is ready ([`GatewayState::readiness`], as `/readyz`); NOT_SERVING otherwise
/// and from the start of a drain. Each change is logged with its reason.
async fn follow_readiness(
    health: HealthReporter,
    state: Arc<GatewayState>,
    stop: CancellationToken,
) {
    let mut last = None;
    let mut last_reason = None;
    let mut last_warning: Option<tokio::time::Instant> = None;
    let mut first = true;
    loop {
        let readiness = state.readiness();
        let status = if readiness.is_ok() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        let reason = readiness.err();
        if reason != last_reason {
            // A warning when readiness is lost, or its reason changes after a quiet minute; a reason that
            // alternates while not ready (each retry's wording) is a debug line.
            let flipped = last_reason.is_none();
            let quiet = last_warning.is_none_or(|at| at.elapsed() >= READINESS_REMINDER);
            match &reason {
                None => tracing::info!("ready"),
                // Not ready at start is the usual course (connecting), not worth a warning.
                Some(reason) if first => tracing::info!(%reason, "not ready yet"),
                Some(reason) if flipped || quiet => {
                    tracing::warn!(%reason, "not ready");
                    last_warning = Some(tokio::time::Instant::now());
                }
                Some(reason) => tracing::debug!(%reason, "still not ready"),
            }
            last_reason = reason;
        }
        first = false;
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

/// The listener's TLS from checked files: the server's chain and key, ALPN h2, and with `tls.client_ca` a
/// required client certificate from that CA (tonic then finds it with `Request::peer_certs`).
fn listener_tls(tls: &crate::config::ServerTls) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let identity = tls_material::load_identity(&tls.cert, &tls.key).map_err(|source| {
        let field = match &source {
            TlsFileError::Unreadable { path, .. }
            | TlsFileError::NotPem { path, .. }
            | TlsFileError::BadPem { path, .. }
            | TlsFileError::NoPrivateKey { path, .. }
            | TlsFileError::UnusableKey { path, .. }
                if *path == tls.key =>
            {
                "tls.key"
            }
            TlsFileError::KeyMismatch { .. } => "tls.key",
            _ => "tls.cert",
        };
        ServeError::TlsFile { field, source }
    })?;
    let refused = |error: &dyn std::fmt::Display| ServeError::Tls(error.to_string());
    let chain = CertificateDer::pem_slice_iter(&identity.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| refused(&error))?;
    let key = PrivateKeyDer::from_pem_slice(&identity.key_pem).map_err(|error| refused(&error))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|error| refused(&error))?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let bundle = tls_material::load_bundle(ca).map_err(|source| ServeError::TlsFile {
                field: "tls.client_ca",
                source,
            })?;
            let mut roots = rustls::RootCertStore::empty();
            roots.add_parsable_certificates(bundle.certificates);
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|error| refused(&error))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|error| refused(&error))?;
    config.alpn_protocols.push(b"h2".to_vec());
    Ok(Arc::new(config))
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

/// Starts the in-process emulator with the configured hubs on a free loopback port, and a producer to it.
#[cfg(feature = "emulator")]
async fn start_in_process_emulator(
    config: &GatewayConfig,
    hubs: &[String],
) -> Result<(Producer, Emulator), ServeError> {
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
    Ok((producer, emulator))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use tokio::io::AsyncReadExt;
    use tonic::transport::server::Connected;

    use crate::listener::grpc_incoming;

    /// A CA, a `localhost` server certificate and a client certificate, all PEM.
    fn pki() -> (String, (String, String), (String, String)) {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "listener test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let signed = |names: Vec<String>| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let server = signed(vec!["localhost".to_owned()]);
        let client = signed(vec!["client.test".to_owned()]);
        (ca.pem(), server, client)
    }

    #[tokio::test]
    async fn the_listener_does_the_mutual_tls_handshake_keeps_the_peer_certificate_and_drops_a_silent_peer()
     {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
        let (ca, (server_cert, server_key), (client_cert, client_key)) = pki();
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, pem: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        let config = listener_tls(&crate::config::ServerTls {
            cert: write("server.pem", &server_cert),
            key: write("server.key", &server_key),
            client_ca: Some(write("ca.pem", &ca)),
        })
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Connections::new(16, 16);
        let timeouts = Timeouts {
            handshake: Duration::from_millis(300),
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(10),
        };
        let GrpcIncoming::Tls(mut incoming) = grpc_incoming(
            listener,
            &connections,
            Some(TlsAcceptor::from(config)),
            timeouts,
            None,
        ) else {
            panic!("no TLS");
        };
        // A peer that never says hello holds its place only until the handshake timeout.
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();

        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(
            CertificateDer::pem_slice_iter(ca.as_bytes()).map(Result::unwrap),
        );
        let client_config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            CertificateDer::pem_slice_iter(client_cert.as_bytes())
                .map(Result::unwrap)
                .collect(),
            PrivateKeyDer::from_pem_slice(client_key.as_bytes()).unwrap(),
        )
        .unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
        let client = tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            connector
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap()
        });
        let server_side = tokio::time::timeout(Duration::from_secs(10), incoming.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let _client = client.await.unwrap();
        // What tonic puts in each request, and `Request::peer_certs` reads.
        let info: tonic::transport::server::TlsConnectInfo<
            tonic::transport::server::TcpConnectInfo,
        > = server_side.connect_info();
        let certs = info.peer_certs().expect("the client's certificate");
        assert_eq!(certs.len(), 1);
        assert_eq!(
            certs[0].as_ref(),
            CertificateDer::from_pem_slice(client_cert.as_bytes())
                .unwrap()
                .as_ref()
        );
        assert_eq!(connections.open(), 2);

        let mut buf = [0; 16];
        let dropped = tokio::time::timeout(Duration::from_secs(10), async {
            // The incoming stream must be polled for the handshake to run out.
            tokio::select! {
                read = silent.read(&mut buf) => read,
                _ = incoming.next() => panic!("a silent peer was yielded"),
            }
        })
        .await
        .expect("the silent peer is still connected");
        assert!(matches!(dropped, Ok(0) | Err(_)), "{dropped:?}");
        assert_eq!(connections.open(), 1);
    }
}
