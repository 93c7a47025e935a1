//! How the producer reaches Event Hubs: plain AMQP, AMQPS (TLS on aws-lc rustls) or AMQP over WebSockets, always with TCP_NODELAY
//! and TCP keepalive (with TCP_USER_TIMEOUT, so the kernel ends a connection to a silently dead peer in seconds),
//! directly or through an HTTP CONNECT proxy; which roots TLS trusts (webpki, the OS store, extra CAs); when the
//! peer last sent a byte (`Activity`, read below TLS and WebSockets: any byte means the peer is alive); which
//! step an open is at (`Progress`, for the error of one that never finishes).
//!
//! fe2o3 0.18 keeps its builder's type-state module private, so `Builder<'_, ConnectorWithId, ()>` cannot
//! be written in a signature outside fe2o3: [`open_connection`] takes [`ConnectionOptions`] (what the
//! builder would carry) and builds the builder itself.

use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use fe2o3_amqp::connection::{ConnectionHandle, OpenError};
use fe2o3_amqp::sasl_profile::SaslProfile;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// The path Event Hubs serves AMQP over WebSockets on.
pub const WEBSOCKET_PATH: &str = "/$servicebus/websocket";

/// The three ways Event Hubs accepts AMQP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Plain AMQP on TCP (the emulator only; port 5672).
    Amqp,
    /// AMQP over TLS started directly on TCP (port 5671).
    Amqps,
    /// AMQP over WebSockets over TLS (`wss://host/$servicebus/websocket`, port 443).
    WebSockets,
}

impl Transport {
    /// The port Event Hubs uses for this transport.
    pub fn default_port(self) -> u16 {
        match self {
            Self::Amqp => 5672,
            Self::Amqps => 5671,
            Self::WebSockets => 443,
        }
    }
}

/// Where to connect and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The host name (checked against the server certificate for TLS transports) or IP address.
    pub host: String,
    /// The TCP port.
    pub port: u16,
    /// The transport.
    pub transport: Transport,
    /// The HTTP CONNECT proxy the TCP connection goes through; direct when `None`.
    pub proxy: Option<HttpProxy>,
}

/// An HTTP proxy that tunnels TCP with `CONNECT host:port` (the Azure SDKs' `http_proxy`).
#[derive(Clone, PartialEq, Eq)]
pub struct HttpProxy {
    /// The proxy's host name or IP address.
    pub host: String,
    /// The proxy's port.
    pub port: u16,
    /// Basic authentication sent with the CONNECT request, if any.
    pub credentials: Option<ProxyCredentials>,
}

/// A proxy's basic-auth user name and password; never formatted.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyCredentials {
    /// The user name.
    pub username: String,
    /// The password.
    pub password: String,
}

impl HttpProxy {
    /// `http://host:port`, never with credentials: safe for logs and errors.
    pub fn address(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("http://[{}]:{}", self.host, self.port)
        } else {
            format!("http://{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Debug for HttpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpProxy")
            .field("address", &self.address())
            .field("basic_auth", &self.credentials.is_some())
            .finish()
    }
}

impl std::fmt::Debug for ProxyCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyCredentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// A direct endpoint (no proxy).
    pub fn direct(host: impl Into<String>, port: u16, transport: Transport) -> Self {
        Self {
            host: host.into(),
            port,
            transport,
            proxy: None,
        }
    }

    /// The WebSocket URL of this endpoint (meaningful for [`Transport::WebSockets`]).
    pub fn websocket_url(&self) -> String {
        let host = if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]", self.host) // an IPv6 literal
        } else {
            self.host.clone()
        };
        format!("wss://{host}:{}{WEBSOCKET_PATH}", self.port)
    }
}

/// Which certificate authorities the client trusts: the webpki roots always, the operating system's store
/// when asked (the gateway does), and extra CAs (an `event_hubs_ca_file`, a test's own CA).
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// PEM text, each entry holding one or more CA certificates trusted besides the webpki roots.
    pub extra_root_certificates_pem: Vec<String>,
    /// Also trust the operating system's store (read once per process; `SSL_CERT_FILE`/`SSL_CERT_DIR` apply).
    pub native_roots: bool,
}

/// The operating system's trusted certificates, read once, and what could not be read.
#[derive(Debug)]
pub struct NativeRoots {
    /// The certificates found.
    pub certificates: Vec<CertificateDer<'static>>,
    /// Why some (or all) could not be loaded, for a warning at start.
    pub errors: Vec<String>,
}

static NATIVE_ROOTS: LazyLock<NativeRoots> = LazyLock::new(|| {
    let found = rustls_native_certs::load_native_certs();
    NativeRoots {
        certificates: found.certs,
        errors: found.errors.iter().map(ToString::to_string).collect(),
    }
});

/// The operating system's store, read on first use.
pub fn native_roots() -> &'static NativeRoots {
    &NATIVE_ROOTS
}

/// What the AMQP open carries, whatever the transport.
#[derive(Clone, Debug)]
pub struct ConnectionOptions {
    /// The container id of this client.
    pub container_id: String,
    /// The open's and SASL's hostname (the namespace FQDN); the endpoint's host when `None`.
    pub hostname: Option<String>,
    /// The SASL profile; Event Hubs clients use ANONYMOUS and then CBS tokens.
    pub sasl_profile: Option<SaslProfile>,
    /// The idle time-out announced to the peer, which sets its heartbeat interval.
    pub idle_time_out: Option<Duration>,
    /// Where to record when the peer last sent a byte; `None`: not recorded.
    pub activity: Option<Arc<Activity>>,
    /// TCP keepalive: probes after this long without traffic, and the connection ends when the peer has
    /// acknowledged nothing for twice as long (TCP_USER_TIMEOUT, Linux); `None`: the operating system's defaults
    /// (no probes; unacknowledged data retried for about 15 minutes).
    pub tcp_keepalive: Option<Duration>,
    /// Where to record the step the open is at; `None`: not recorded.
    pub progress: Option<Arc<Progress>>,
    /// Cancelled to cut the TCP stream under fe2o3: every read and write fails from then on, so its connection
    /// task ends even when the peer never answers the close (fe2o3 would wait for it, and busy-loop once the
    /// connection's sessions are gone); `None`: never cut.
    pub cut: Option<CancellationToken>,
}

impl ConnectionOptions {
    /// Options with this container id, SASL ANONYMOUS and no idle time-out.
    pub fn new(container_id: impl Into<String>) -> Self {
        Self {
            container_id: container_id.into(),
            hostname: None,
            sasl_profile: Some(SaslProfile::Anonymous),
            idle_time_out: None,
            activity: None,
            tcp_keepalive: None,
            progress: None,
            cut: None,
        }
    }
}

/// The step a connection attempt is at, since when it runs and whether the peer has sent anything: what an
/// attempt that never finishes was waiting for (a peer that accepts TCP and then says nothing, or stops
/// answering mid-handshake).
#[derive(Debug)]
pub struct Progress {
    started: tokio::time::Instant,
    step: parking_lot::Mutex<Cow<'static, str>>,
    activity: Arc<Activity>,
}

impl Progress {
    /// An attempt starting now, at its first step.
    pub fn new() -> Self {
        Self {
            started: tokio::time::Instant::now(),
            step: parking_lot::Mutex::new(Cow::Borrowed("the start")),
            activity: Arc::new(Activity::new()),
        }
    }

    /// What the attempt's connection hears from its peer (the connection's [`Activity`] once it opens).
    pub fn activity(&self) -> Arc<Activity> {
        Arc::clone(&self.activity)
    }

    /// The step under way, and whether the peer has said anything at all: "the AMQP open (...), nothing
    /// received from the peer".
    pub fn describe(&self) -> String {
        let step = self.step.lock();
        if self.activity.heard() {
            step.to_string()
        } else {
            format!("{step}, nothing received from the peer")
        }
    }

    /// The attempt moves on to `step` ("the TCP connect", "the CBS put-token for eh1").
    pub fn enter(&self, step: impl Into<Cow<'static, str>>) {
        *self.step.lock() = step.into();
    }

    /// The step under way.
    pub fn step(&self) -> String {
        self.step.lock().to_string()
    }

    /// How long the attempt has been running.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// When a connection's peer last sent anything (a frame, a heartbeat, a TLS record): the liveness the producer
/// checks against work awaiting an answer.
#[derive(Debug)]
pub struct Activity {
    origin: Instant,
    last_read_ms: AtomicU64,
    heard: AtomicBool,
}

impl Activity {
    /// Activity starting now (a connection being opened counts as heard from).
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            last_read_ms: AtomicU64::new(0),
            heard: AtomicBool::new(false),
        }
    }

    /// Records that bytes arrived now.
    pub fn touch(&self) {
        let now = self.origin.elapsed().as_millis() as u64;
        // Relaxed and max-only: a late store from another thread never moves the time back.
        self.last_read_ms.fetch_max(now, Ordering::Relaxed);
        if !self.heard.load(Ordering::Relaxed) {
            self.heard.store(true, Ordering::Relaxed);
        }
    }

    /// Whether the peer has sent anything at all.
    pub fn heard(&self) -> bool {
        self.heard.load(Ordering::Relaxed)
    }

    /// How long since bytes last arrived.
    pub fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_read_ms.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(last)
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// A byte stream that records in its [`Activity`] each read that brought bytes, and fails every read and write
/// once cut.
#[derive(Debug)]
struct Watched<S> {
    inner: S,
    activity: Option<Arc<Activity>>,
    cut: Option<Cut>,
}

/// The cut of a [`Watched`] stream: its token, and one wait for it per direction (each registers its waker).
#[derive(Debug)]
struct Cut {
    token: CancellationToken,
    read: Pin<Box<WaitForCancellationFutureOwned>>,
    write: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Cut {
    fn new(token: CancellationToken) -> Self {
        Self {
            read: Box::pin(token.clone().cancelled_owned()),
            write: Box::pin(token.clone().cancelled_owned()),
            token,
        }
    }
}

/// Whether `cut` (if any) has been cut, registering the task to be woken when it is.
fn is_cut(cut: &mut Option<Cut>, read: bool, cx: &mut Context<'_>) -> bool {
    let Some(cut) = cut else { return false };
    if cut.token.is_cancelled() {
        return true;
    }
    let wait = if read { &mut cut.read } else { &mut cut.write };
    wait.as_mut().poll(cx).is_ready()
}

fn cut_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the connection was cut by the producer",
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if is_cut(&mut self.cut, true, cx) {
            return Poll::Ready(Err(cut_error()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before
            && let Some(activity) = &self.activity
        {
            activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if is_cut(&mut self.cut, false, cx) {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if is_cut(&mut self.cut, false, cx) {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if is_cut(&mut self.cut, false, cx) {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if is_cut(&mut self.cut, false, cx) {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The proxy could not be reached.
    #[error("cannot connect to the proxy {proxy}: {source}")]
    ProxyConnect {
        /// The proxy (`http://host:port`, never its credentials).
        proxy: String,
        /// Why.
        source: io::Error,
    },
    /// The proxy asked for credentials or refused the ones sent (HTTP 407).
    #[error(
        "the proxy {proxy} refused CONNECT {target} with HTTP 407 Proxy Authentication Required: {}",
        if *sent_credentials { "its user name or password is wrong" } else { "it wants a user name and password" }
    )]
    ProxyAuthentication {
        /// The proxy.
        proxy: String,
        /// `host:port` asked for.
        target: String,
        /// Whether basic auth was sent.
        sent_credentials: bool,
    },
    /// The proxy answered CONNECT with another status than 200.
    #[error("the proxy {proxy} refused CONNECT {target} with HTTP {status} {reason}")]
    ProxyRefused {
        /// The proxy.
        proxy: String,
        /// `host:port` asked for.
        target: String,
        /// The HTTP status.
        status: u16,
        /// The status line's reason phrase.
        reason: String,
    },
    /// The proxy's answer is not HTTP, too long, or the connection ended inside it.
    #[error("the proxy {proxy} answered CONNECT {target} with no valid HTTP response: {reason}")]
    ProxyProtocol {
        /// The proxy.
        proxy: String,
        /// `host:port` asked for.
        target: String,
        /// What is wrong.
        reason: String,
    },
    /// The TCP connection could not be made.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// TCP_NODELAY could not be set (without it small transfers wait on Nagle's algorithm).
    #[error("cannot set TCP_NODELAY on the connection to {addr}: {source}")]
    NoDelay {
        /// `host:port`.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// TCP keepalive or TCP_USER_TIMEOUT could not be set (without them a dead peer is found in minutes).
    #[error("cannot set TCP keepalive on the connection to {addr}: {source}")]
    KeepAlive {
        /// `host:port`.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// An extra root certificate is not usable.
    #[error("extra root certificate {index}: {reason}")]
    RootCertificate {
        /// Its position in [`TlsOptions::extra_root_certificates_pem`].
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the client configuration (the provider offers no safe protocol version).
    #[error("cannot build the TLS client configuration: {0}")]
    TlsConfig(#[source] rustls::Error),
    /// The host cannot be used as a TLS server name.
    #[error("{0:?} is not a valid TLS server name")]
    InvalidServerName(String),
    /// The TLS handshake failed: an untrusted or mismatched certificate, no common protocol, an alert.
    #[error("TLS handshake with {host} failed: {source}")]
    Tls {
        /// The server name checked.
        host: String,
        /// What rustls reported.
        source: rustls::Error,
    },
    /// The connection broke during the TLS handshake.
    #[error("connection to {host} lost during the TLS handshake: {source}")]
    TlsIo {
        /// The server name.
        host: String,
        /// Why.
        source: io::Error,
    },
    /// The server answered the WebSocket upgrade with an HTTP status instead of switching protocols.
    #[error("WebSocket upgrade at {url} refused with HTTP {status}")]
    WebSocketRefused {
        /// The URL asked for.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// The WebSocket handshake failed otherwise (e.g. the server chose no `amqp` subprotocol).
    #[error("WebSocket handshake at {url} failed: {source}")]
    WebSocket {
        /// The URL asked for.
        url: String,
        /// What fe2o3-amqp-ws reported.
        source: Box<fe2o3_amqp_ws::Error>,
    },
    /// The AMQP (or SASL) open failed after the transport was up.
    #[error("AMQP open failed: {0}")]
    Open(#[source] OpenError),
}

/// The rustls client configuration on the aws-lc provider: webpki roots, the OS store if asked, the extra CAs.
pub fn client_config(tls: &TlsOptions) -> Result<Arc<ClientConfig>, TransportError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if tls.native_roots {
        // An OS store may hold certificates webpki cannot use as anchors (old, odd encodings): skip those
        // rather than refuse every connection.
        roots.add_parsable_certificates(native_roots().certificates.iter().cloned());
    }
    for (index, pem) in tls.extra_root_certificates_pem.iter().enumerate() {
        let invalid = |reason: String| TransportError::RootCertificate { index, reason };
        let certificates = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| invalid(format!("not PEM: {err}")))?;
        if certificates.is_empty() {
            return Err(invalid("holds no certificate".into()));
        }
        for certificate in certificates {
            roots
                .add(certificate)
                .map_err(|err| invalid(err.to_string()))?;
        }
    }
    // The provider is named rather than taken from the process default, so a second provider linked
    // elsewhere can never be picked (and no process-wide default has to be installed).
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TransportError::TlsConfig)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Opens an AMQP connection over this endpoint's transport, on a TCP stream it connected itself with
/// TCP_NODELAY: plain AMQP, AMQPS (fe2o3's `amqps` with alternative TLS establishment: no AMQP TLS
/// header, as Event Hubs expects) or WebSockets (fe2o3-amqp-ws over TLS from the same rustls config).
pub async fn open_connection(
    options: &ConnectionOptions,
    endpoint: &Endpoint,
    tls: &TlsOptions,
) -> Result<ConnectionHandle<()>, TransportError> {
    let hostname = options.hostname.as_deref().unwrap_or(&endpoint.host);
    let mut builder = fe2o3_amqp::Connection::builder()
        .container_id(options.container_id.clone())
        .hostname(hostname)
        .sasl_hostname(hostname);
    if let Some(profile) = &options.sasl_profile {
        builder = builder.sasl_profile(profile.clone());
    }
    if let Some(idle) = options.idle_time_out {
        builder = builder.idle_time_out(u32::try_from(idle.as_millis()).unwrap_or(u32::MAX));
    }
    let watched = |inner| Watched {
        inner,
        activity: options.activity.clone(),
        cut: options.cut.clone().map(Cut::new),
    };
    let progress = |step: &'static str| {
        if let Some(progress) = &options.progress {
            progress.enter(step);
        }
    };
    let keepalive = options.tcp_keepalive;
    match endpoint.transport {
        Transport::Amqp => {
            let stream = watched(connect_tcp(endpoint, keepalive, &progress).await?);
            progress(AMQP_OPEN);
            builder
                .scheme("amqp")
                .open_with_stream(stream)
                .await
                .map_err(TransportError::Open)
        }
        Transport::Amqps => {
            let connector = TlsConnector::from(client_config(tls)?);
            server_name(&endpoint.host)?;
            let stream = watched(connect_tcp(endpoint, keepalive, &progress).await?);
            progress("the TLS handshake and the AMQP open");
            builder
                .scheme("amqps")
                .domain(endpoint.host.as_str())
                .alt_tls_establishment(true)
                .rustls_connector(connector)
                .open_with_stream(stream)
                .await
                .map_err(|err| classify_open_error(err, &endpoint.host))
        }
        Transport::WebSockets => {
            let connector = TlsConnector::from(client_config(tls)?);
            let name = server_name(&endpoint.host)?;
            let stream = watched(connect_tcp(endpoint, keepalive, &progress).await?);
            progress("the TLS handshake");
            let tls_stream = connector
                .connect(name, stream)
                .await
                .map_err(|err| classify_tls_io_error(err, &endpoint.host))?;
            let url = endpoint.websocket_url();
            progress("the WebSocket upgrade");
            let websocket = fe2o3_amqp_ws::WebSocketStream::connect_with_stream(&url, tls_stream)
                .await
                .map_err(|err| classify_websocket_error(err, &url))?;
            progress(AMQP_OPEN);
            // TLS is below the WebSocket: AMQP itself starts in the clear inside it.
            builder
                .scheme("amqp")
                .open_with_stream(websocket)
                .await
                .map_err(TransportError::Open)
        }
    }
}

/// The step of an open from the protocol header to the peer's `open` (SASL included), in fe2o3's hands.
const AMQP_OPEN: &str = "the AMQP open (protocol header, SASL, open)";

/// A TCP stream to the endpoint, direct or a tunnel through its proxy, with TCP_NODELAY and keepalive.
async fn connect_tcp(
    endpoint: &Endpoint,
    keepalive: Option<Duration>,
    progress: &impl Fn(&'static str),
) -> Result<TcpStream, TransportError> {
    let target = authority(&endpoint.host, endpoint.port);
    let Some(proxy) = &endpoint.proxy else {
        progress("the TCP connect");
        let stream = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|source| TransportError::Connect {
                addr: target.clone(),
                source,
            })?;
        return tune(stream, target, keepalive);
    };
    progress("the TCP connect to the proxy");
    let stream = TcpStream::connect((proxy.host.as_str(), proxy.port))
        .await
        .map_err(|source| TransportError::ProxyConnect {
            proxy: proxy.address(),
            source,
        })?;
    let mut stream = tune(stream, proxy.address(), keepalive)?;
    progress("the proxy's answer to CONNECT");
    tunnel(&mut stream, proxy, &target).await?;
    Ok(stream)
}

/// TCP_NODELAY (small transfers must not wait on Nagle's algorithm) and keepalive.
fn tune(
    stream: TcpStream,
    addr: String,
    keepalive: Option<Duration>,
) -> Result<TcpStream, TransportError> {
    if let Err(source) = stream.set_nodelay(true) {
        return Err(TransportError::NoDelay { addr, source });
    }
    if let Some(idle) = keepalive
        && let Err(source) = keep_alive(&stream, idle)
    {
        return Err(TransportError::KeepAlive { addr, source });
    }
    Ok(stream)
}

/// Probes an idle connection after `idle` without traffic, every third of that, three times; and (Linux) ends a
/// connection whose peer has acknowledged nothing for `2 * idle`, probes or data alike. Without this a peer
/// behind a blackhole (no RST) is found only by the AMQP idle timeout when idle (`idle_timeout_seconds`), and a
/// socket with unacknowledged data lingers about 15 minutes (`tcp_retries2`).
fn keep_alive(stream: &TcpStream, idle: Duration) -> io::Result<()> {
    let socket = socket2::SockRef::from(stream);
    let probes = socket2::TcpKeepalive::new().with_time(idle);
    #[cfg(target_os = "linux")]
    let probes = probes
        .with_interval((idle / 3).max(Duration::from_secs(1)))
        .with_retries(3);
    socket.set_tcp_keepalive(&probes)?;
    #[cfg(target_os = "linux")]
    socket.set_tcp_user_timeout(Some(idle * 2))?;
    Ok(())
}

/// `host:port`, brackets around an IPv6 literal.
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The longest CONNECT response head read; real proxies send a few hundred bytes.
const MAX_PROXY_RESPONSE: usize = 16 * 1024;

/// Asks the proxy for a tunnel to `target` and reads its answer up to the end of the head, no further: the
/// bytes after it belong to the tunnel (TLS, which the client starts, so there are none yet).
async fn tunnel(
    stream: &mut TcpStream,
    proxy: &HttpProxy,
    target: &str,
) -> Result<(), TransportError> {
    use base64::Engine;
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(credentials) = &proxy.credentials {
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", credentials.username, credentials.password));
        request.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    request.push_str("\r\n");
    let protocol = |reason: String| TransportError::ProxyProtocol {
        proxy: proxy.address(),
        target: target.to_owned(),
        reason,
    };
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|error| protocol(format!("sending CONNECT: {error}")))?;
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_PROXY_RESPONSE {
            return Err(protocol(format!(
                "the response head is longer than {MAX_PROXY_RESPONSE} bytes"
            )));
        }
        match stream.read(&mut byte).await {
            Ok(0) => {
                return Err(protocol(
                    "the proxy closed the connection before the end of its response".into(),
                ));
            }
            Ok(_) => head.push(byte[0]),
            Err(error) => return Err(protocol(format!("reading its response: {error}"))),
        }
    }
    let status_line = String::from_utf8_lossy(&head);
    let status_line = status_line.lines().next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, status, reason) = (parts.next(), parts.next(), parts.next());
    let status = match (version, status.and_then(|code| code.parse::<u16>().ok())) {
        (Some(version), Some(status)) if version.starts_with("HTTP/1.") => status,
        _ => return Err(protocol(format!("status line {status_line:?}"))),
    };
    match status {
        200..=299 => Ok(()),
        407 => Err(TransportError::ProxyAuthentication {
            proxy: proxy.address(),
            target: target.to_owned(),
            sent_credentials: proxy.credentials.is_some(),
        }),
        _ => Err(TransportError::ProxyRefused {
            proxy: proxy.address(),
            target: target.to_owned(),
            status,
            reason: reason.unwrap_or_default().trim().to_owned(),
        }),
    }
}

fn server_name(host: &str) -> Result<ServerName<'static>, TransportError> {
    ServerName::try_from(host.to_owned())
        .map_err(|_| TransportError::InvalidServerName(host.into()))
}

/// The rustls error inside an I/O error, which is how tokio-rustls reports a failed handshake.
fn rustls_error(err: &io::Error) -> Option<rustls::Error> {
    err.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .cloned()
}

fn classify_tls_io_error(err: io::Error, host: &str) -> TransportError {
    match rustls_error(&err) {
        Some(source) => TransportError::Tls {
            host: host.into(),
            source,
        },
        None => TransportError::TlsIo {
            host: host.into(),
            source: err,
        },
    }
}

/// fe2o3 reports a TLS failure as an I/O open error; it is told apart from other open failures here.
fn classify_open_error(err: OpenError, host: &str) -> TransportError {
    match err {
        OpenError::Io(io_err) => match rustls_error(&io_err) {
            Some(source) => TransportError::Tls {
                host: host.into(),
                source,
            },
            None => TransportError::Open(OpenError::Io(io_err)),
        },
        OpenError::InvalidDomain => TransportError::InvalidServerName(host.into()),
        other => TransportError::Open(other),
    }
}

fn classify_websocket_error(err: fe2o3_amqp_ws::Error, url: &str) -> TransportError {
    match err {
        fe2o3_amqp_ws::Error::Tungstenite(fe2o3_amqp_ws::tungstenite::Error::Http(response)) => {
            TransportError::WebSocketRefused {
                url: url.into(),
                status: response.status().as_u16(),
            }
        }
        other => TransportError::WebSocket {
            url: url.into(),
            source: Box::new(other),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn activity_is_the_last_read_that_brought_bytes_and_writes_do_not_count() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let activity = Arc::new(Activity::new());
        let mut watched = Watched {
            inner: ours,
            activity: Some(Arc::clone(&activity)),
            cut: None,
        };
        tokio::time::sleep(Duration::from_millis(60)).await;
        watched.write_all(b"ours").await.unwrap();
        assert!(
            activity.silent_for() >= Duration::from_millis(60),
            "a write is not the peer's activity"
        );
        theirs.write_all(b"theirs").await.unwrap();
        let mut buffer = [0u8; 6];
        watched.read_exact(&mut buffer).await.unwrap();
        assert!(activity.silent_for() < Duration::from_millis(60));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(activity.silent_for() >= Duration::from_millis(60));
        drop(theirs);
        // The end of the stream brings no bytes: not activity.
        assert_eq!(watched.read(&mut buffer).await.unwrap(), 0);
        assert!(activity.silent_for() >= Duration::from_millis(60));
    }

    #[tokio::test]
    async fn a_cut_stream_fails_reads_waiting_on_it_and_every_write() {
        let (ours, _theirs) = tokio::io::duplex(64);
        let token = CancellationToken::new();
        let mut watched = Watched {
            inner: ours,
            activity: None,
            cut: Some(Cut::new(token.clone())),
        };
        watched.write_all(b"before").await.unwrap();
        let reading = tokio::spawn(async move {
            let mut buffer = [0u8; 8];
            let read = watched.read(&mut buffer).await;
            (read.map_err(|error| error.kind()), watched)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!reading.is_finished(), "nothing to read yet");
        token.cancel();
        let (read, mut watched) = reading.await.unwrap();
        assert_eq!(read, Err(io::ErrorKind::ConnectionAborted));
        let write = watched
            .write_all(b"after")
            .await
            .map_err(|error| error.kind());
        assert_eq!(write, Err(io::ErrorKind::ConnectionAborted));
        let shutdown = watched.shutdown().await.map_err(|error| error.kind());
        assert_eq!(shutdown, Err(io::ErrorKind::ConnectionAborted));
    }

    #[test]
    fn default_ports_are_the_services() {
        assert_eq!(Transport::Amqp.default_port(), 5672);
        assert_eq!(Transport::Amqps.default_port(), 5671);
        assert_eq!(Transport::WebSockets.default_port(), 443);
    }

    #[test]
    fn websocket_url_has_the_service_path() {
        let endpoint = Endpoint::direct("ns.servicebus.windows.net", 443, Transport::WebSockets);
        assert_eq!(
            endpoint.websocket_url(),
            "wss://ns.servicebus.windows.net:443/$servicebus/websocket"
        );
        let v6 = Endpoint {
            host: "::1".into(),
            ..endpoint
        };
        assert_eq!(v6.websocket_url(), "wss://[::1]:443/$servicebus/websocket");
    }

    #[test]
    fn bad_extra_roots_are_named_by_position() {
        let options = TlsOptions {
            extra_root_certificates_pem: vec!["no pem here".into()],
            ..TlsOptions::default()
        };
        match client_config(&options) {
            Err(TransportError::RootCertificate { index: 0, reason }) => {
                assert_eq!(reason, "holds no certificate");
            }
            other => panic!("expected a root certificate error, got {other:?}"),
        }
        client_config(&TlsOptions::default()).expect("webpki roots alone are fine");
    }

    #[test]
    fn tls_failures_inside_io_errors_are_told_apart() {
        let tls = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert!(matches!(
            classify_open_error(OpenError::Io(tls), "localhost"),
            TransportError::Tls {
                source: rustls::Error::InvalidCertificate(_),
                ..
            }
        ));
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert!(matches!(
            classify_open_error(OpenError::Io(reset), "localhost"),
            TransportError::Open(OpenError::Io(_))
        ));
        assert!(matches!(
            classify_tls_io_error(io::ErrorKind::UnexpectedEof.into(), "localhost"),
            TransportError::TlsIo { .. }
        ));
    }

    #[test]
    fn invalid_server_names_are_refused() {
        assert!(matches!(
            server_name("not a host"),
            Err(TransportError::InvalidServerName(_))
        ));
        assert!(server_name("localhost").is_ok());
        assert!(server_name("127.0.0.1").is_ok());
    }

    /// A one-shot proxy on loopback that answers `answer` and hands back the request head it read.
    async fn answering_proxy(answer: &'static str) -> (HttpProxy, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buffer = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                let read = socket.read(&mut buffer).await.unwrap();
                head.extend_from_slice(&buffer[..read]);
            }
            socket.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8(head).unwrap()
        });
        let proxy = HttpProxy {
            host: "127.0.0.1".into(),
            port,
            credentials: Some(ProxyCredentials {
                username: "user".into(),
                password: "SECRET".into(),
            }),
        };
        (proxy, task)
    }

    #[tokio::test]
    async fn proxy_answers_other_than_200_are_named_without_the_credentials() {
        for (answer, expected) in [
            (
                "HTTP/1.1 502 Bad Gateway\r\n\r\n",
                "with HTTP 502 Bad Gateway",
            ),
            (
                "HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
                "HTTP 407 Proxy Authentication Required: its user name or password is wrong",
            ),
            ("SSH-2.0-OpenSSH\r\n\r\n", "no valid HTTP response"),
        ] {
            let (proxy, request) = answering_proxy(answer).await;
            let endpoint = Endpoint {
                proxy: Some(proxy.clone()),
                ..Endpoint::direct("ns.servicebus.windows.net", 443, Transport::WebSockets)
            };
            let error = connect_tcp(&endpoint, None, &|_| {})
                .await
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{error}");
            assert!(error.contains(&proxy.address()), "{error}");
            assert!(!error.contains("SECRET"), "{error}");
            let request = request.await.unwrap();
            assert!(
                request.starts_with(
                    "CONNECT ns.servicebus.windows.net:443 HTTP/1.1\r\nHost: ns.servicebus.windows.net:443\r\n"
                ),
                "{request}"
            );
            // base64("user:SECRET")
            assert!(
                request.contains("Proxy-Authorization: Basic dXNlcjpTRUNSRVQ=\r\n"),
                "{request}"
            );
        }
        let proxy = HttpProxy {
            host: "p".into(),
            port: 1,
            credentials: Some(ProxyCredentials {
                username: "user".into(),
                password: "SECRET".into(),
            }),
        };
        assert!(!format!("{proxy:?}").contains("SECRET"));
    }

    #[tokio::test]
    async fn connections_probe_an_idle_peer_and_give_up_on_a_silent_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = Endpoint::direct(
            "127.0.0.1",
            listener.local_addr().unwrap().port(),
            Transport::Amqp,
        );
        let steps = parking_lot::Mutex::new(Vec::new());
        let stream = connect_tcp(&endpoint, Some(Duration::from_secs(9)), &|step| {
            steps.lock().push(step)
        })
        .await
        .unwrap();
        assert_eq!(*steps.lock(), ["the TCP connect"]);
        let socket = socket2::SockRef::from(&stream);
        assert!(socket.tcp_nodelay().unwrap());
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_secs(9));
        #[cfg(target_os = "linux")]
        {
            assert_eq!(
                socket.tcp_keepalive_interval().unwrap(),
                Duration::from_secs(3)
            );
            assert_eq!(socket.tcp_keepalive_retries().unwrap(), 3);
            assert_eq!(
                socket.tcp_user_timeout().unwrap(),
                Some(Duration::from_secs(18))
            );
        }
        let plain = connect_tcp(&endpoint, None, &|_| {}).await.unwrap();
        assert!(!socket2::SockRef::from(&plain).keepalive().unwrap());
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error() {
        // Bind then drop a listener so the port is very likely closed.
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let endpoint = Endpoint::direct("127.0.0.1", port, Transport::Amqp);
        let err = open_connection(
            &ConnectionOptions::new("t"),
            &endpoint,
            &TlsOptions::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, TransportError::Connect { .. }), "{err}");
    }
}
