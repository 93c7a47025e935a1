//! The listeners' connections and their bounds: accepting without spinning when file descriptors run out
//! (backing off on `EMFILE`/`ENFILE`), at most `max_connections` open at once and `max_connections_per_client`
//! per peer address, and on the gRPC listener a [`Guarded`] connection that is closed when it has not finished
//! its TLS handshake and HTTP/2 preface in time, when a header block arrives too slowly, or when it has had no
//! call open for `connection_idle_timeout` (with gRPC-Web, an HTTP/1.1 connection too, told apart by its first
//! bytes: its request heads take the place of header blocks, and are bounded in size); and the life of each
//! served gRPC connection ([`serve_grpc`]): at its age (`max_connection_age`, jittered) a GOAWAY (on HTTP/1.1,
//! `connection: close`), at the end of its grace (or of the drain's) a close.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use futures_util::{Stream, StreamExt};
use http::{Request, Response};
use parking_lot::Mutex;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tower::{Layer, Service};

use eventhub_telemetry::metrics::{AgedEnd, connection_aged};

use crate::middleware::{HeldBody, peer_addr};

/// A TCP listener bound early, before anything serves on it, so a taken port fails the start at once.
pub struct BoundEarly {
    /// The bound socket.
    pub listener: TcpListener,
    /// Where it listens (port 0 resolved).
    pub local_addr: SocketAddr,
}

impl BoundEarly {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        Ok(Self {
            listener,
            local_addr,
        })
    }
}

/// The first pause after accept fails for want of file descriptors; it doubles up to [`MAX_ACCEPT_BACKOFF`].
const FIRST_ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// The longest pause between accepts while file descriptors are exhausted.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// While file descriptors stay exhausted, a warning at most this often.
const FD_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// The client connection preface of HTTP/2 (RFC 9113 section 3.4), before its first SETTINGS.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const PREFACE_LEN: usize = PREFACE.len();

/// Raises the soft limit on open files to the hard limit, so the connection caps, not the kernel's default of
/// 1024, bound the listeners; logs both.
pub fn raise_open_files_limit() {
    #[cfg(unix)]
    {
        use rustix::process::{Resource, getrlimit, setrlimit};
        let limit = getrlimit(Resource::Nofile);
        let (Some(soft), hard) = (limit.current, limit.maximum) else {
            return tracing::info!("open files: no soft limit");
        };
        let Some(hard) = hard else {
            return tracing::info!(soft, hard = "unlimited", "open files limit kept");
        };
        if soft >= hard {
            return tracing::info!(soft, hard, "open files limit");
        }
        let raised = rustix::process::Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => tracing::info!(from = soft, to = hard, "open files soft limit raised"),
            Err(error) => tracing::warn!(soft, hard, %error, "open files soft limit not raised"),
        }
    }
}

/// Whether `accept` failed because this process or the system is out of file descriptors.
fn out_of_descriptors(error: &io::Error) -> bool {
    #[cfg(unix)]
    {
        use rustix::io::Errno;
        let code = error.raw_os_error();
        code == Some(Errno::MFILE.raw_os_error()) || code == Some(Errno::NFILE.raw_os_error())
    }
    #[cfg(not(unix))]
    {
        let _ = error;
        false
    }
}

/// Serves `router` over HTTP/1 on `listener` (at most `connections` open at once, accepting with backoff) until
/// `stop`; then each open connection finishes its request and closes, and the returned task ends. `what` names
/// the listener in the debug line of a connection that ends in error.
pub fn serve_http1(
    listener: TcpListener,
    router: axum::Router,
    connections: Arc<Connections>,
    http: hyper::server::conn::http1::Builder,
    stop: tokio_util::sync::CancellationToken,
    what: &'static str,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let incoming = connections.limit(accept_with_backoff(listener));
        tokio::pin!(incoming);
        let open = tokio_util::task::TaskTracker::new();
        loop {
            let stream = tokio::select! {
                stream = incoming.next() => stream,
                () = stop.cancelled() => break,
            };
            let Some(stream) = stream else { break };
            let served = http.serve_connection(
                hyper_util::rt::TokioIo::new(stream),
                hyper_util::service::TowerToHyperService::new(router.clone()),
            );
            let stop = stop.clone();
            open.spawn(async move {
                tokio::pin!(served);
                let result = tokio::select! {
                    result = served.as_mut() => result,
                    () = stop.cancelled() => {
                        served.as_mut().graceful_shutdown();
                        served.await
                    }
                };
                if let Err(error) = result {
                    tracing::debug!(%error, listener = what, "HTTP connection closed");
                }
            });
        }
        open.close();
        open.wait().await;
    })
}

/// Accepted TCP connections (TCP_NODELAY set), forever. Out of file descriptors, it pauses (10 ms, doubling to
/// 1 s) instead of retrying at once: the pending connections stay in the kernel's backlog until a descriptor is
/// free, and an idle process stays idle. Other accept errors concern one connection and are skipped.
pub fn accept_with_backoff(
    listener: TcpListener,
) -> impl Stream<Item = TcpStream> + Send + 'static {
    futures_util::stream::unfold(
        (listener, FIRST_ACCEPT_BACKOFF, None::<Instant>),
        |(listener, mut backoff, mut warned)| async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        if let Err(error) = stream.set_nodelay(true) {
                            tracing::debug!(%error, "cannot set TCP_NODELAY");
                        }
                        return Some((stream, (listener, FIRST_ACCEPT_BACKOFF, warned)));
                    }
                    Err(error) if out_of_descriptors(&error) => {
                        if warned.is_none_or(|at| at.elapsed() >= FD_WARNING_INTERVAL) {
                            tracing::warn!(%error, "out of file descriptors: accepting again after a pause");
                            warned = Some(Instant::now());
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                    }
                    Err(error) => {
                        tracing::debug!(%error, "accept failed");
                        // Not a spin either: whatever failed gets a moment to pass.
                        tokio::time::sleep(FIRST_ACCEPT_BACKOFF).await;
                    }
                }
            }
        },
    )
}

/// The open connections of one listener: in all, per peer address, and each one's calls.
#[derive(Debug)]
pub struct Connections {
    max_total: usize,
    per_client: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
    calls: HashMap<SocketAddr, Arc<Calls>>,
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    Total,
    PerClient,
}

impl Connections {
    /// At most `max_total` connections at once, `per_client` of them from one peer address.
    pub fn new(max_total: usize, per_client: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            per_client,
            open: Mutex::new(Open::default()),
        })
    }

    fn admit(self: &Arc<Self>, remote: SocketAddr) -> Result<Place, Refusal> {
        // An IPv4 peer on a dual-stack listener arrives as ::ffff:a.b.c.d: one client either way.
        let peer = remote.ip().to_canonical();
        let mut open = self.open.lock();
        if open.total >= self.max_total {
            return Err(Refusal::Total);
        }
        let count = open.per_peer.entry(peer).or_insert(0);
        if *count >= self.per_client {
            return Err(Refusal::PerClient);
        }
        *count += 1;
        open.total += 1;
        let calls = Arc::new(Calls::new());
        open.calls.insert(remote, Arc::clone(&calls));
        Ok(Place {
            connections: Arc::clone(self),
            peer,
            remote,
            calls,
        })
    }

    /// The calls of the connection from `remote`, if it is open.
    fn calls_of(&self, remote: SocketAddr) -> Option<Arc<Calls>> {
        self.open.lock().calls.get(&remote).cloned()
    }

    /// How many connections are open.
    pub fn open(&self) -> usize {
        self.open.lock().total
    }

    /// Closes every open connection now, whatever calls it holds (the end of a drain's grace): their reads and
    /// writes fail, so the HTTP/2 server drops them.
    pub fn close_all(&self) {
        let open: Vec<Arc<Calls>> = self.open.lock().calls.values().cloned().collect();
        for calls in open {
            calls.force_close(Expired::Drain);
        }
    }

    /// Admitted connections of `incoming`; one beyond a cap is closed at once (its client sees the connection
    /// closed before the HTTP/2 handshake), one debug line each.
    pub fn limit<S>(
        self: &Arc<Self>,
        incoming: S,
    ) -> impl Stream<Item = CountedStream> + Send + 'static
    where
        S: Stream<Item = TcpStream> + Send + 'static,
    {
        let connections = Arc::clone(self);
        incoming.filter_map(move |stream| {
            let admitted = stream
                .peer_addr()
                .ok()
                .map(|remote| (remote, connections.admit(remote)));
            let (max_connections, per_client) = (connections.max_total, connections.per_client);
            async move {
                match admitted? {
                    (_, Ok(place)) => Some(CountedStream {
                        inner: stream,
                        place,
                    }),
                    (remote, Err(Refusal::Total)) => {
                        tracing::debug!(%remote, max_connections, "connection closed: the listener holds its maximum");
                        None
                    }
                    (remote, Err(Refusal::PerClient)) => {
                        tracing::debug!(%remote, max_connections_per_client = per_client, "connection closed: its client holds its whole share");
                        None
                    }
                }
            }
        })
    }
}

/// A connection's place among the open ones; leaving, it frees it.
#[derive(Debug)]
struct Place {
    connections: Arc<Connections>,
    peer: IpAddr,
    remote: SocketAddr,
    calls: Arc<Calls>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.calls.closed.cancel();
        let mut open = self.connections.open.lock();
        open.total -= 1;
        open.calls.remove(&self.remote);
        if let Some(count) = open.per_peer.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                open.per_peer.remove(&self.peer);
            }
        }
    }
}

/// The calls open on one connection, since when it has had none, and where it is in its life.
#[derive(Debug)]
struct Calls {
    open: AtomicUsize,
    /// Calls ever opened: on HTTP/1.1, a request head is done once its call has opened.
    started: AtomicUsize,
    idle_since: Mutex<Instant>,
    /// The connection's task, woken when its last call ends (so it arms its idle timer) or when it must close.
    reader: AtomicWaker,
    /// Cancelled when the connection reaches its age: its streams stop reading and end CONNECTION_AGED.
    going_away: CancellationToken,
    /// Cancelled when the connection is gone (its place freed).
    closed: CancellationToken,
    /// Set when the connection must close now, whatever it carries: its reads and writes fail.
    forced: OnceLock<Expired>,
}

impl Calls {
    fn new() -> Self {
        Self {
            open: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            reader: AtomicWaker::new(),
            going_away: CancellationToken::new(),
            closed: CancellationToken::new(),
            forced: OnceLock::new(),
        }
    }

    fn touch(&self) {
        *self.idle_since.lock() = Instant::now();
    }

    /// Closes the connection now, by `why`; returns whether it was still open.
    fn force_close(&self, why: Expired) -> bool {
        if self.closed.is_cancelled() {
            return false;
        }
        let _ = self.forced.set(why);
        // Whether its task waits to read or to write, its next poll fails.
        self.reader.wake();
        true
    }

    fn forced(&self) -> Option<io::Error> {
        self.forced.get().map(|why| closed(*why))
    }
}

/// One call open on a connection; leaving, it makes the connection idle if it was its last.
#[derive(Debug)]
pub struct OpenCall(Arc<Calls>);

impl Drop for OpenCall {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.touch();
            self.0.reader.wake();
        }
    }
}

/// In each counted call's request extensions: its connection's calls, so work that outlives the call's answer
/// (reading the rest of an HTTP/1.1 request body) keeps the connection busy, not idle, while it runs.
#[derive(Clone, Debug)]
pub struct ConnectionHandle(Arc<Calls>);

impl ConnectionHandle {
    /// Counts one more call open on the connection until the returned guard is dropped.
    pub fn hold(&self) -> OpenCall {
        self.0.open.fetch_add(1, Ordering::AcqRel);
        OpenCall(Arc::clone(&self.0))
    }
}

/// An accepted TCP connection holding its place among the open ones.
#[derive(Debug)]
pub struct CountedStream {
    inner: TcpStream,
    place: Place,
}

impl Connected for CountedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for CountedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How long a gRPC connection may take over each phase of its life.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// From accept to the end of the client's first SETTINGS (TLS handshake included).
    pub handshake: Duration,
    /// From the first byte of a frame header to the end of its header block.
    pub header_read: Duration,
    /// With no call open.
    pub idle: Duration,
}

/// HTTP/1.1 on the gRPC listener (gRPC-Web): how a request head is bounded besides its time.
#[derive(Clone, Copy, Debug)]
pub struct Http1 {
    /// Most bytes of one request head (request line, headers, the empty line).
    pub max_head_bytes: usize,
}

/// A stream of connections of type `T`, as tonic serves them.
pub type Connecting<T> = Pin<Box<dyn Stream<Item = io::Result<T>> + Send>>;

/// The gRPC listener's connections, plain or TLS, each [`Guarded`].
pub enum GrpcIncoming {
    /// Plain HTTP/2.
    Plain(Connecting<Guarded<CountedStream>>),
    /// HTTP/2 over TLS: the handshake done here, under the handshake timeout.
    Tls(Connecting<Guarded<TlsStream<CountedStream>>>),
}

/// The gRPC listener's incoming connections: accepted with backoff, capped by `connections`, the TLS handshake
/// (with `tls`) done at most `handshake` after accept, many at once, each then [`Guarded`] (as HTTP/2, or as
/// HTTP/1.1 too when `http1` is given).
pub fn grpc_incoming(
    listener: TcpListener,
    connections: &Arc<Connections>,
    tls: Option<TlsAcceptor>,
    timeouts: Timeouts,
    http1: Option<Http1>,
) -> GrpcIncoming {
    let admitted = connections.limit(accept_with_backoff(listener));
    match tls {
        None => GrpcIncoming::Plain(Box::pin(admitted.map(move |stream| {
            let calls = Arc::clone(&stream.place.calls);
            Ok(Guarded::new(stream, calls, timeouts, Instant::now(), http1))
        }))),
        Some(acceptor) => {
            // Each handshake in flight holds a connection's place, so `max_connections` bounds them too.
            let concurrent = connections.max_total;
            let handshakes = admitted
                .map(move |stream| {
                    let accepted = Instant::now();
                    let calls = Arc::clone(&stream.place.calls);
                    let handshake = acceptor.accept(stream);
                    async move {
                        match tokio::time::timeout(timeouts.handshake, handshake).await {
                            Ok(Ok(stream)) => {
                                Some(Guarded::new(stream, calls, timeouts, accepted, http1))
                            }
                            Ok(Err(error)) => {
                                tracing::debug!(%error, "TLS handshake failed");
                                None
                            }
                            Err(_) => {
                                tracing::debug!(
                                    handshake_timeout = ?timeouts.handshake,
                                    "connection closed: no TLS handshake in time"
                                );
                                None
                            }
                        }
                    }
                })
                .buffer_unordered(concurrent)
                .filter_map(|guarded| async move { guarded.map(Ok) });
            GrpcIncoming::Tls(Box::pin(handshakes))
        }
    }
}

/// Where the client's side of an HTTP/2 connection is, frame by frame (headers only; payloads skipped): enough
/// to tell when its preface and first SETTINGS are done, and since when a header block has been open.
#[derive(Debug)]
struct FrameWalker {
    preface_left: usize,
    header: [u8; 9],
    header_len: usize,
    payload_left: usize,
    /// The type and flags of the frame whose payload is being skipped.
    current: (u8, u8),
    handshake_done: bool,
    /// Since when a frame header, or a header block (HEADERS, then CONTINUATIONs to END_HEADERS), has been
    /// arriving.
    headers_since: Option<Instant>,
    frame_started: Option<Instant>,
}

const FRAME_HEADERS: u8 = 0x1;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_PUSH_PROMISE: u8 = 0x5;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_HEADERS: u8 = 0x4;

impl FrameWalker {
    fn new() -> Self {
        Self {
            preface_left: PREFACE_LEN,
            header: [0; 9],
            header_len: 0,
            payload_left: 0,
            current: (0, 0),
            handshake_done: false,
            headers_since: None,
            frame_started: None,
        }
    }

    /// Reads `bytes` as the next part of the client's side; returns whether a header block ended in them.
    fn feed(&mut self, mut bytes: &[u8], now: Instant) -> bool {
        let mut block_ended = false;
        while !bytes.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(bytes.len());
                self.preface_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
                if self.payload_left == 0 {
                    block_ended |= self.frame_ended();
                }
                continue;
            }
            if self.header_len == 0 {
                self.frame_started = Some(now);
            }
            let n = (9 - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len == 9 {
                self.header_len = 0;
                let length = usize::from(self.header[0]) << 16
                    | usize::from(self.header[1]) << 8
                    | usize::from(self.header[2]);
                self.current = (self.header[3], self.header[4]);
                if matches!(
                    self.current.0,
                    FRAME_HEADERS | FRAME_PUSH_PROMISE | FRAME_CONTINUATION
                ) && self.headers_since.is_none()
                {
                    self.headers_since = self.frame_started;
                }
                self.payload_left = length;
                if length == 0 {
                    block_ended |= self.frame_ended();
                }
            }
        }
        block_ended
    }

    /// The frame being read is complete.
    fn frame_ended(&mut self) -> bool {
        let (kind, flags) = self.current;
        if kind == FRAME_SETTINGS {
            self.handshake_done = true;
        }
        let ends_block = matches!(
            kind,
            FRAME_HEADERS | FRAME_PUSH_PROMISE | FRAME_CONTINUATION
        ) && flags & FLAG_END_HEADERS != 0;
        if ends_block {
            self.headers_since = None;
        }
        ends_block
    }

    /// Since when something header-like has been arriving: a header block, or a frame header cut short.
    fn slow_since(&self) -> Option<Instant> {
        self.headers_since.or(if self.header_len > 0 {
            self.frame_started
        } else {
            None
        })
    }
}

/// Where the client's side of a connection is: before its first bytes tell HTTP/2 (the preface) from HTTP/1.1
/// (anything else), then by the protocol's own walker.
#[derive(Debug)]
enum Walker {
    /// HTTP/1.1 is accepted and the bytes so far are a prefix of the HTTP/2 preface (this many).
    Sniffing {
        matched: usize,
        http1: Http1,
    },
    Http2(FrameWalker),
    Http1(RequestHeads),
}

impl Walker {
    fn new(http1: Option<Http1>) -> Self {
        match http1 {
            Some(http1) => Self::Sniffing { matched: 0, http1 },
            None => Self::Http2(FrameWalker::new()),
        }
    }

    /// Reads `bytes` as the next part of the client's side; returns whether a header block (HTTP/2) or request
    /// head (HTTP/1.1) ended in them.
    fn feed(&mut self, bytes: &[u8], now: Instant, calls: &Calls) -> bool {
        match self {
            Self::Http2(frames) => frames.feed(bytes, now),
            Self::Http1(heads) => heads.feed(bytes, now, calls),
            Self::Sniffing { matched, http1 } => {
                let same = bytes
                    .iter()
                    .zip(&PREFACE[*matched..])
                    .take_while(|(byte, expected)| byte == expected)
                    .count();
                if *matched + same == PREFACE_LEN {
                    let mut frames = FrameWalker::new();
                    frames.feed(PREFACE, now);
                    let ended = frames.feed(&bytes[same..], now);
                    *self = Self::Http2(frames);
                    ended
                } else if same == bytes.len() {
                    *matched += same;
                    false
                } else {
                    let mut heads = RequestHeads::new(http1.max_head_bytes);
                    let mut ended = heads.feed(&PREFACE[..*matched], now, calls);
                    ended |= heads.feed(bytes, now, calls);
                    *self = Self::Http1(heads);
                    ended
                }
            }
        }
    }

    /// Whether the handshake is done: HTTP/2's preface and first SETTINGS, HTTP/1.1's first request head.
    fn handshake_done(&mut self, calls: &Calls) -> bool {
        match self {
            Self::Sniffing { .. } => false,
            Self::Http2(frames) => frames.handshake_done,
            Self::Http1(heads) => {
                heads.settle(calls);
                heads.handshake_done
            }
        }
    }

    /// Since when a header block or request head has been arriving.
    fn slow_since(&mut self, calls: &Calls) -> Option<Instant> {
        match self {
            Self::Sniffing { .. } => None,
            Self::Http2(frames) => frames.slow_since(),
            Self::Http1(heads) => {
                heads.settle(calls);
                heads.head.as_ref().map(|head| head.since)
            }
        }
    }

    /// Whether an HTTP/1.1 request head has outgrown its bound.
    fn head_too_large(&self) -> bool {
        matches!(self, Self::Http1(heads) if heads.too_large)
    }
}

/// Where the client's side of an HTTP/1.1 connection is: since when a request head has been arriving, and how
/// large it is so far. Bodies are not parsed: a head starts with the first byte read while no call is open on
/// the connection, and is done once its call opens (hyper has parsed it), so body bytes (read while the call
/// is open) never count.
#[derive(Debug)]
struct RequestHeads {
    max_head_bytes: usize,
    head: Option<RequestHead>,
    handshake_done: bool,
    too_large: bool,
}

#[derive(Debug)]
struct RequestHead {
    since: Instant,
    bytes: usize,
    /// How much of the head's end (`\r\n\r\n`) the last bytes matched; 4 once it ended.
    end_matched: u8,
    /// Calls opened on the connection before this head started.
    calls_before: usize,
}

impl RequestHeads {
    fn new(max_head_bytes: usize) -> Self {
        Self {
            max_head_bytes,
            head: None,
            handshake_done: false,
            too_large: false,
        }
    }

    /// The head is done once a call opened after it started.
    fn settle(&mut self, calls: &Calls) {
        if self
            .head
            .as_ref()
            .is_some_and(|head| calls.started.load(Ordering::Acquire) > head.calls_before)
        {
            self.head = None;
            self.handshake_done = true;
        }
    }

    fn feed(&mut self, bytes: &[u8], now: Instant, calls: &Calls) -> bool {
        self.settle(calls);
        if bytes.is_empty() {
            return false;
        }
        let head = match &mut self.head {
            Some(head) => head,
            // A call's body, read while it is open.
            None if calls.open.load(Ordering::Acquire) > 0 => return false,
            None => self.head.insert(RequestHead {
                since: now,
                bytes: 0,
                end_matched: 0,
                calls_before: calls.started.load(Ordering::Acquire),
            }),
        };
        if head.end_matched == 4 {
            return false;
        }
        for &byte in bytes {
            head.bytes += 1;
            if head.bytes > self.max_head_bytes {
                self.too_large = true;
                return false;
            }
            head.end_matched = match (head.end_matched, byte) {
                (2, b'\r') => 3,
                (_, b'\r') => 1,
                (1, b'\n') => 2,
                (3, b'\n') => 4,
                _ => 0,
            };
            if head.end_matched == 4 {
                return true;
            }
        }
        false
    }
}

/// Which bound closed a connection.
#[derive(Clone, Copy, Debug)]
enum Expired {
    Handshake,
    HeaderRead,
    /// An HTTP/1.1 request head larger than its bound.
    HeadSize,
    Idle,
    /// Still open at the end of its grace after its age.
    AgeGrace,
    /// Still open at the end of the drain's grace for clients to read their answers.
    Drain,
}

impl Expired {
    fn setting(self) -> &'static str {
        match self {
            Self::Handshake => "limits.handshake_timeout_seconds",
            Self::HeaderRead => "limits.header_read_timeout_seconds",
            Self::HeadSize => "limits.http2_max_header_list_bytes (an HTTP/1.1 request head)",
            Self::Idle => "limits.connection_idle_timeout_seconds",
            Self::AgeGrace => "limits.max_connection_age_grace_seconds",
            Self::Drain => "the end of the drain",
        }
    }
}

pin_project! {
    /// A gRPC connection closed (its reads fail, so the HTTP/2 server drops it) when it has not sent its preface
    /// and first SETTINGS (HTTP/1.1: its first request head) by the handshake deadline, when a header block
    /// (HTTP/1.1: a request head) takes longer than the header read timeout, when an HTTP/1.1 request head
    /// outgrows its bound, or when it has had no call open for the idle timeout.
    pub struct Guarded<T> {
        #[pin]
        inner: T,
        calls: Arc<Calls>,
        timeouts: Timeouts,
        handshake_deadline: Instant,
        walker: Walker,
        timer: Pin<Box<Sleep>>,
        armed: Option<Instant>,
        expired: Option<Expired>,
    }
}

impl<T> Guarded<T> {
    fn new(
        inner: T,
        calls: Arc<Calls>,
        timeouts: Timeouts,
        accepted: Instant,
        http1: Option<Http1>,
    ) -> Self {
        let handshake_deadline = accepted + timeouts.handshake;
        Self {
            inner,
            calls,
            timeouts,
            handshake_deadline,
            walker: Walker::new(http1),
            timer: Box::pin(tokio::time::sleep_until(handshake_deadline)),
            armed: Some(handshake_deadline),
            expired: None,
        }
    }
}

impl<T: Connected> Connected for Guarded<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> T::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<T: AsyncRead> AsyncRead for Guarded<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if let Some(expired) = *this.expired {
            return Poll::Ready(Err(closed(expired)));
        }
        this.calls.reader.register(cx.waker());
        if let Some(error) = this.calls.forced() {
            return Poll::Ready(Err(error));
        }
        let before = buf.filled().len();
        if let Poll::Ready(read) = this.inner.poll_read(cx, buf) {
            let now = Instant::now();
            if this.walker.feed(&buf.filled()[before..], now, this.calls) {
                this.calls.touch();
            }
            if this.walker.head_too_large() {
                return Poll::Ready(Err(expire(this.expired, Expired::HeadSize)));
            }
            // A peer trickling bytes is never Pending for long: its deadlines are checked on reads too.
            let due = deadline(
                this.walker,
                this.calls,
                this.timeouts,
                *this.handshake_deadline,
            )
            .filter(|(deadline, _)| read.is_ok() && now >= *deadline);
            if let Some((_, expired)) = due {
                return Poll::Ready(Err(expire(this.expired, expired)));
            }
            return Poll::Ready(read);
        }
        loop {
            let Some((deadline, expired)) = deadline(
                this.walker,
                this.calls,
                this.timeouts,
                *this.handshake_deadline,
            ) else {
                return Poll::Pending;
            };
            if Instant::now() >= deadline {
                return Poll::Ready(Err(expire(this.expired, expired)));
            }
            if *this.armed != Some(deadline) {
                this.timer.as_mut().reset(deadline);
                *this.armed = Some(deadline);
            }
            ready!(this.timer.as_mut().poll(cx));
        }
    }
}

/// The next deadline of a connection, and the bound it belongs to.
fn deadline(
    walker: &mut Walker,
    calls: &Calls,
    timeouts: &Timeouts,
    handshake_deadline: Instant,
) -> Option<(Instant, Expired)> {
    if !walker.handshake_done(calls) {
        return Some((handshake_deadline, Expired::Handshake));
    }
    if let Some(since) = walker.slow_since(calls) {
        return Some((since + timeouts.header_read, Expired::HeaderRead));
    }
    if calls.open.load(Ordering::Acquire) == 0 {
        return Some((*calls.idle_since.lock() + timeouts.idle, Expired::Idle));
    }
    None
}

fn expire(slot: &mut Option<Expired>, expired: Expired) -> io::Error {
    *slot = Some(expired);
    tracing::debug!(bound = expired.setting(), "connection closed");
    closed(expired)
}

fn closed(expired: Expired) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("connection closed by {}", expired.setting()),
    )
}

// Writes fail too once the connection is closed by force: a client that reads nothing leaves the server
// waiting to write, never to read.
impl<T: AsyncWrite> AsyncWrite for Guarded<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(error) = self.calls.forced() {
            return Poll::Ready(Err(error));
        }
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(error) = self.calls.forced() {
            return Poll::Ready(Err(error));
        }
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(error) = self.calls.forced() {
            return Poll::Ready(Err(error));
        }
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// In each call's request extensions: resolves when the call's connection reaches its age (the connection is
/// about to get its GOAWAY), so a long call can end itself cleanly instead of being cut at the grace's end.
#[derive(Clone, Debug)]
pub struct GoingAway(CancellationToken);

impl GoingAway {
    /// Resolves when the connection reaches its age.
    pub async fn reached(&self) {
        self.0.cancelled().await;
    }

    /// A connection that never ages (tests, calls not counted against a connection).
    pub fn never() -> Self {
        Self(CancellationToken::new())
    }
}

/// How long a gRPC connection may live (`limits.max_connection_age_seconds` and its grace).
#[derive(Clone, Copy, Debug)]
pub struct Age {
    /// The age, before jitter.
    pub max: Duration,
    /// After the GOAWAY, how long its calls may go on before the connection is closed under them.
    pub grace: Duration,
}

impl Age {
    /// One connection's age: `max` ±10%, drawn uniformly (as grpc-go does), so connections opened together do
    /// not all come back together.
    fn draw(&self) -> Duration {
        self.max.mul_f64(rand::random_range(0.9..=1.1))
    }
}

/// Serves the gRPC connections of `incoming` until `stop`, each in its own task through `serve` (given the
/// connection and the signal that starts its graceful shutdown: a GOAWAY, calls in flight finish). A connection
/// gets that signal at its `age` (jittered) or at `stop`; one still open `age.grace` after its age is closed.
/// Returns once every connection it served has ended.
pub async fn serve_grpc<T, F, Fut, E>(
    incoming: Connecting<Guarded<T>>,
    serve: F,
    age: Option<Age>,
    stop: CancellationToken,
) where
    F: Fn(Guarded<T>, WaitForCancellationFutureOwned) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let open = TaskTracker::new();
    tokio::pin!(incoming);
    loop {
        let next = tokio::select! {
            next = incoming.next() => next,
            () = stop.cancelled() => break,
        };
        let connection = match next {
            Some(Ok(connection)) => connection,
            Some(Err(error)) => {
                tracing::debug!(%error, "connection not served");
                continue;
            }
            None => break,
        };
        let calls = Arc::clone(&connection.calls);
        let goaway = CancellationToken::new();
        let served = serve(connection, goaway.clone().cancelled_owned());
        open.spawn(connection_life(served, calls, goaway, age, stop.clone()));
    }
    open.close();
    open.wait().await;
}

/// One connection from its start to its end: served until it closes, the drain starts, or it reaches its age;
/// then a GOAWAY (`goaway`); after an age, `grace` for its calls, then the close.
async fn connection_life<Fut, E>(
    served: Fut,
    calls: Arc<Calls>,
    goaway: CancellationToken,
    age: Option<Age>,
    stop: CancellationToken,
) where
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(served);
    let aged_at = age.map(|age| Instant::now() + age.draw());
    let reached_age = async {
        match aged_at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    let aged = tokio::select! {
        // Polled here too: the connection is served from the start, not from its signal.
        result = &mut served => return report_served(result),
        () = calls.closed.cancelled() => false,
        () = stop.cancelled() => false,
        () = reached_age => true,
    };
    if aged {
        tracing::debug!(
            calls = calls.open.load(Ordering::Acquire),
            "connection reached its age: GOAWAY"
        );
        connection_aged(AgedEnd::GoAway);
        // Streams first, so each stops reading and answers what it read while the connection still carries it.
        calls.going_away.cancel();
    }
    goaway.cancel();
    if let (true, Some(age)) = (aged, age) {
        tokio::select! {
            result = &mut served => return report_served(result),
            () = tokio::time::sleep(age.grace) => {
                if calls.force_close(Expired::AgeGrace) {
                    tracing::debug!(calls = calls.open.load(Ordering::Acquire), "aged connection closed at the end of its grace");
                    connection_aged(AgedEnd::Forced);
                }
            }
        }
    }
    report_served(served.await);
}

fn report_served<E: std::fmt::Display>(result: Result<(), E>) {
    if let Err(error) = result {
        tracing::debug!(%error, "gRPC connection ended in error");
    }
}

/// Counts each call against its connection until its response body ends, so an idle connection is one with
/// no call open.
#[derive(Clone, Debug)]
pub struct ConnectionCallsLayer {
    connections: Arc<Connections>,
}

impl ConnectionCallsLayer {
    /// Counts calls on the connections of `connections`.
    pub fn new(connections: Arc<Connections>) -> Self {
        Self { connections }
    }
}

impl<S> Layer<S> for ConnectionCallsLayer {
    type Service = ConnectionCalls<S>;

    fn layer(&self, inner: S) -> ConnectionCalls<S> {
        ConnectionCalls {
            inner,
            connections: Arc::clone(&self.connections),
        }
    }
}

/// The service of [`ConnectionCallsLayer`].
#[derive(Clone, Debug)]
pub struct ConnectionCalls<S> {
    inner: S,
    connections: Arc<Connections>,
}

impl<S, B, ResBody> Service<Request<B>> for ConnectionCalls<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    type Response = Response<CallBody<ResBody>>;
    type Error = S::Error;
    type Future = CallFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let call = peer_addr(request.extensions())
            .and_then(|remote| self.connections.calls_of(remote))
            .map(|calls| {
                calls.open.fetch_add(1, Ordering::AcqRel);
                calls.started.fetch_add(1, Ordering::AcqRel);
                OpenCall(calls)
            });
        if let Some(OpenCall(calls)) = &call {
            let extensions = request.extensions_mut();
            extensions.insert(GoingAway(calls.going_away.clone()));
            extensions.insert(ConnectionHandle(Arc::clone(calls)));
        }
        CallFuture {
            inner: self.inner.call(request),
            call,
        }
    }
}

pin_project! {
    /// The response future of [`ConnectionCalls`].
    pub struct CallFuture<F> {
        #[pin]
        inner: F,
        call: Option<OpenCall>,
    }
}

impl<F, ResBody, E> Future for CallFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<CallBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let call = this.call.take();
        Poll::Ready(result.map(|response| response.map(|inner| HeldBody::new(inner, call))))
    }
}

/// A response body holding its call open on its connection until it ends or is dropped.
pub type CallBody<B> = HeldBody<B, OpenCall>;

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(ip: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((ip, port))
    }

    #[test]
    fn a_peer_gets_its_share_and_leaving_gives_it_back() {
        let connections = Connections::new(10, 2);
        let first = connections.admit(remote([10, 0, 0, 1], 1)).unwrap();
        let _second = connections.admit(remote([10, 0, 0, 1], 2)).unwrap();
        assert_eq!(
            connections.admit(remote([10, 0, 0, 1], 3)).err(),
            Some(Refusal::PerClient)
        );
        assert!(connections.admit(remote([10, 0, 0, 2], 1)).is_ok());
        drop(first);
        assert!(connections.admit(remote([10, 0, 0, 1], 3)).is_ok());
    }

    #[test]
    fn the_listener_holds_at_most_its_total() {
        let connections = Connections::new(2, 2);
        let first = connections.admit(remote([10, 0, 0, 1], 1)).unwrap();
        let _second = connections.admit(remote([10, 0, 0, 2], 1)).unwrap();
        assert_eq!(
            connections.admit(remote([10, 0, 0, 3], 1)).err(),
            Some(Refusal::Total)
        );
        drop(first);
        assert_eq!(connections.open(), 1);
        assert!(connections.admit(remote([10, 0, 0, 3], 1)).is_ok());
    }

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut bytes = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            1,
        ];
        bytes.extend_from_slice(payload);
        bytes
    }

    #[test]
    fn the_walker_sees_the_handshake_and_header_blocks_byte_by_byte() {
        let now = Instant::now();
        let mut walker = FrameWalker::new();
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(FRAME_SETTINGS, 0, &[0; 6]));
        let headers = frame(FRAME_HEADERS, 0, &[1, 2, 3]);
        let continuation = frame(FRAME_CONTINUATION, FLAG_END_HEADERS, &[4]);
        for byte in &bytes {
            assert!(!walker.handshake_done);
            walker.feed(std::slice::from_ref(byte), now);
        }
        assert!(walker.handshake_done);
        assert_eq!(walker.slow_since(), None);
        walker.feed(&headers[..4], now);
        assert_eq!(walker.slow_since(), Some(now), "a frame header cut short");
        assert!(!walker.feed(&headers[4..], now));
        assert_eq!(walker.slow_since(), Some(now), "a header block open");
        assert!(walker.feed(&continuation, now));
        assert_eq!(walker.slow_since(), None);
        // A DATA frame's payload is skipped whole.
        walker.feed(&frame(0x0, 0, &[FRAME_HEADERS; 100]), now);
        assert_eq!(walker.slow_since(), None);
    }

    const HTTP1: Http1 = Http1 { max_head_bytes: 64 };

    /// A call opened and closed on `calls`, as the connection's call layer counts it.
    fn one_call(calls: &Arc<Calls>) -> OpenCall {
        calls.started.fetch_add(1, Ordering::AcqRel);
        ConnectionHandle(Arc::clone(calls)).hold()
    }

    #[test]
    fn with_http1_accepted_the_first_bytes_tell_http2_from_http1() {
        let now = Instant::now();
        let calls = Arc::new(Calls::new());
        let mut walker = Walker::new(Some(HTTP1));
        for byte in PREFACE {
            walker.feed(std::slice::from_ref(byte), now, &calls);
            assert!(!walker.handshake_done(&calls));
        }
        walker.feed(&frame(FRAME_SETTINGS, 0, &[0; 6]), now, &calls);
        assert!(matches!(walker, Walker::Http2(_)));
        assert!(walker.handshake_done(&calls));

        // Diverging after a few bytes of the preface ("P", "R"): HTTP/1.1, those bytes part of its head.
        let mut walker = Walker::new(Some(HTTP1));
        walker.feed(b"PR", now, &calls);
        assert!(matches!(walker, Walker::Sniffing { matched: 2, .. }));
        assert!(!walker.feed(b"OPFIND / HTTP/1.1\r\n", now, &calls));
        assert!(matches!(walker, Walker::Http1(_)));
        assert_eq!(walker.slow_since(&calls), Some(now));
        assert!(walker.feed(b"\r\n", now, &calls), "the head ended");
        assert!(!walker.handshake_done(&calls), "done once its call opens");
        let _call = one_call(&calls);
        assert!(walker.handshake_done(&calls));
        assert_eq!(walker.slow_since(&calls), None);

        // Without HTTP/1.1, the same bytes are a broken HTTP/2 preface: never a handshake.
        let mut walker = Walker::new(None);
        walker.feed(b"POST / HTTP/1.1\r\n\r\n", now, &calls);
        assert!(!walker.handshake_done(&calls));
    }

    #[test]
    fn an_http1_head_starts_with_bytes_read_while_no_call_is_open_and_is_bounded() {
        let start = Instant::now();
        let calls = Arc::new(Calls::new());
        let mut walker = Walker::new(Some(HTTP1));
        assert!(walker.feed(b"POST /a HTTP/1.1\r\nhost: a\r\n\r\n", start, &calls));
        let call = one_call(&calls);
        // The body, read while its call is open, is no head however long.
        walker.feed(&[b'x'; 1000], start, &calls);
        assert!(!walker.head_too_large());
        assert_eq!(walker.slow_since(&calls), None);
        drop(call);
        let later = start + Duration::from_secs(5);
        walker.feed(b"POST /b HTTP/1.1\r\n", later, &calls);
        assert_eq!(walker.slow_since(&calls), Some(later));
        walker.feed(&[b'h'; 40], later, &calls);
        assert!(!walker.head_too_large());
        walker.feed(&[b'h'; 10], later, &calls);
        assert!(walker.head_too_large(), "over 64 bytes");
    }

    #[tokio::test(start_paused = true)]
    async fn an_http1_connection_fails_at_the_header_read_deadline_of_its_second_head() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let timeouts = Timeouts {
            handshake: Duration::from_secs(2),
            header_read: Duration::from_secs(3),
            idle: Duration::from_secs(50),
        };
        let (mut client, server) = tokio::io::duplex(1024);
        let calls = Arc::new(Calls::new());
        let start = Instant::now();
        let mut guarded = Guarded::new(server, Arc::clone(&calls), timeouts, start, Some(HTTP1));
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(guarded.read(&mut [0; 64]).await.unwrap(), 18);
        drop(one_call(&calls));
        tokio::time::sleep(Duration::from_secs(10)).await;
        client.write_all(b"GET / HT").await.unwrap();
        assert_eq!(guarded.read(&mut [0; 64]).await.unwrap(), 8);
        let error = guarded.read(&mut [0; 64]).await.unwrap_err();
        assert!(error.to_string().contains("header_read_timeout"), "{error}");
        assert_eq!(start.elapsed(), Duration::from_secs(10 + 3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_fails_at_the_handshake_deadline_and_an_idle_one_at_the_idle_one() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let timeouts = Timeouts {
            handshake: Duration::from_secs(2),
            header_read: Duration::from_secs(3),
            idle: Duration::from_secs(5),
        };
        let (client, server) = tokio::io::duplex(1024);
        let calls = Arc::new(Calls::new());
        let mut guarded = Guarded::new(server, Arc::clone(&calls), timeouts, Instant::now(), None);
        let start = Instant::now();
        let error = guarded.read(&mut [0; 64]).await.unwrap_err();
        assert_eq!(start.elapsed(), timeouts.handshake);
        assert!(error.to_string().contains("handshake_timeout"), "{error}");
        drop(client);

        let (mut client, server) = tokio::io::duplex(1024);
        let mut guarded = Guarded::new(server, Arc::clone(&calls), timeouts, Instant::now(), None);
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        client
            .write_all(&frame(FRAME_SETTINGS, 0, &[]))
            .await
            .unwrap();
        let mut buf = [0; 64];
        let read = guarded.read(&mut buf).await.unwrap();
        assert_eq!(read, PREFACE_LEN + 9);
        // A call open holds the connection past the idle timeout; its end starts the idle clock.
        calls.open.fetch_add(1, Ordering::AcqRel);
        let call = OpenCall(Arc::clone(&calls));
        let reading = tokio::spawn(async move {
            let error = guarded.read(&mut [0; 64]).await.unwrap_err();
            (Instant::now(), error)
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!reading.is_finished());
        drop(call);
        let (at, error) = reading.await.unwrap();
        assert!(
            error.to_string().contains("connection_idle_timeout"),
            "{error}"
        );
        assert_eq!(at - start, Duration::from_secs(2 + 60 + 5));
    }
}
