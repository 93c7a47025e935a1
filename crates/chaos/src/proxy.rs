//! The delaying TCP proxy between the gateway and the emulator: one-way delay and jitter per chunk (bytes never
//! reorder), stalls (a blackhole that keeps every socket open), resets (RST on both sides) and faithful
//! propagation of FIN and RST from one side to the other.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::Rng;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Bytes one direction of one connection holds in flight before it stops reading (backpressure).
const MAX_IN_FLIGHT: usize = 1 << 20;
/// The most one read takes at once.
const CHUNK: usize = 64 << 10;

/// The delay each chunk of bytes sees on its way through, in either direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathShape {
    /// Added to every chunk from the moment it is read.
    pub one_way_delay: Duration,
    /// Up to this much more, uniformly at random per chunk (clamped so bytes never reorder).
    pub jitter: Duration,
}

impl PathShape {
    /// No delay, no jitter.
    pub const NONE: PathShape = PathShape {
        one_way_delay: Duration::ZERO,
        jitter: Duration::ZERO,
    };

    /// When a chunk read at `read_at` may leave, before the per-direction ordering clamp.
    fn release_at(self, read_at: Instant) -> Instant {
        let jitter = match u64::try_from(self.jitter.as_nanos()) {
            Ok(0) | Err(_) => Duration::ZERO,
            Ok(nanos) => Duration::from_nanos(rand::rng().random_range(0..=nanos)),
        };
        read_at + self.one_way_delay + jitter
    }
}

/// A running proxy: a listener and its connections. Dropping it stops the listener and every connection.
pub struct DelayProxy {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    accept: JoinHandle<()>,
}

/// What the handle and every connection task share.
struct Shared {
    shape: Mutex<PathShape>,
    stalled: watch::Sender<bool>,
    connections: Mutex<HashMap<u64, Arc<Connection>>>,
    accepted_total: AtomicU64,
}

impl Shared {
    fn connections(&self) -> MutexGuard<'_, HashMap<u64, Arc<Connection>>> {
        // A panic while holding this lock leaves the map whole (every change is one insert or remove).
        self.connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn shape(&self) -> PathShape {
        *self
            .shape
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One proxied connection as `reset_all` sees it.
struct Connection {
    client: Arc<TcpStream>,
    upstream: Mutex<Option<Arc<TcpStream>>>,
    reset: Notify,
}

impl Connection {
    /// Zero linger on both sockets, so closing them sends RST instead of FIN.
    fn arm_reset(&self) {
        let _ = self.client.set_zero_linger();
        if let Some(upstream) = self
            .upstream
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = upstream.set_zero_linger();
        }
    }
}

impl DelayProxy {
    /// Listens on `listen` and forwards every accepted connection to `upstream` through `shape`.
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        shape: PathShape,
    ) -> io::Result<DelayProxy> {
        let listener = TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            shape: Mutex::new(shape),
            stalled: watch::Sender::new(false),
            connections: Mutex::new(HashMap::new()),
            accepted_total: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, upstream, shared.clone()));
        Ok(DelayProxy {
            shared,
            local_addr,
            accept,
        })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The delay of every chunk read from now on (chunks already read keep theirs).
    pub fn set_shape(&self, shape: PathShape) {
        *self
            .shared
            .shape
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = shape;
    }

    /// While stalled no byte moves either way and every socket stays open: a blackhole without RST.
    pub fn set_stalled(&self, stalled: bool) {
        self.shared.stalled.send_replace(stalled);
    }

    /// Aborts every open connection with a TCP RST to both sides; answers how many there were.
    pub fn reset_all(&self) -> usize {
        let connections = self.shared.connections();
        for connection in connections.values() {
            connection.arm_reset();
            connection.reset.notify_one();
        }
        connections.len()
    }

    /// Connections open now (accepted and not yet closed on both sides).
    pub fn open_connections(&self) -> usize {
        self.shared.connections().len()
    }

    /// Connections accepted since the start.
    pub fn accepted_total(&self) -> u64 {
        self.shared.accepted_total.load(Ordering::Relaxed)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        // The accept task owns every connection task: aborting it drops them all, and their sockets with them.
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    let mut tasks = JoinSet::new();
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    shared.accepted_total.fetch_add(1, Ordering::Relaxed);
                    next_id += 1;
                    let connection = Arc::new(Connection {
                        client: Arc::new(client),
                        upstream: Mutex::new(None),
                        reset: Notify::new(),
                    });
                    shared.connections().insert(next_id, connection.clone());
                    let registered = Registered { shared: shared.clone(), id: next_id };
                    tasks.spawn(run_connection(connection, upstream, shared.clone(), registered));
                }
                // Out of descriptors or an aborted handshake: not a reason to stop listening, nor to spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

/// Removes its connection from the map when the connection task ends or is aborted, so the sockets close.
struct Registered {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.shared.connections().remove(&self.id);
    }
}

/// How one direction of a connection ended, or what it asks of the whole connection.
enum Event {
    /// FIN delivered: this direction is done.
    Finished,
    /// An RST came in or a write failed: reset both sides now.
    Reset,
}

/// What travels through one direction's queue, each at its release time.
enum Item {
    Data(Vec<u8>),
    Fin,
    Rst,
}

async fn run_connection(
    connection: Arc<Connection>,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    registered: Registered,
) {
    let client = connection.client.clone();
    let upstream = tokio::select! {
        connected = TcpStream::connect(upstream) => match connected {
            Ok(stream) => Arc::new(stream),
            Err(_) => {
                // The upstream refused or is unreachable: the client sees what it would have seen, a reset.
                connection.arm_reset();
                return;
            }
        },
        () = connection.reset.notified() => return,
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    *connection
        .upstream
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(upstream.clone());

    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut tasks = JoinSet::new();
    for (from, to) in [
        (client.clone(), upstream.clone()),
        (upstream.clone(), client.clone()),
    ] {
        let (queue_tx, queue_rx) = mpsc::unbounded_channel();
        let budget = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        tasks.spawn(read_side(
            from,
            queue_tx,
            budget.clone(),
            shared.clone(),
            events_tx.clone(),
        ));
        tasks.spawn(write_side(
            to,
            queue_rx,
            budget,
            shared.stalled.subscribe(),
            events_tx.clone(),
        ));
    }
    drop(events_tx);

    let mut finished = 0;
    let reset = loop {
        tokio::select! {
            () = connection.reset.notified() => break true,
            event = events.recv() => match event {
                Some(Event::Finished) => {
                    finished += 1;
                    if finished == 2 {
                        break false;
                    }
                }
                Some(Event::Reset) => break true,
                None => break false,
            },
        }
    };
    if reset {
        connection.arm_reset();
    }
    // Every task holds a clone of both sockets: they close (with RST when armed) once all are dropped.
    tasks.shutdown().await;
    drop((client, upstream));
    drop(registered);
}

/// Reads `from` into the queue, stamping each chunk with its release time; stops reading while stalled or
/// while `MAX_IN_FLIGHT` bytes wait.
async fn read_side(
    from: Arc<TcpStream>,
    queue: mpsc::UnboundedSender<(Instant, Item)>,
    budget: Arc<Semaphore>,
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut stalled = shared.stalled.subscribe();
    let mut last_release = Instant::now();
    let mut buf = vec![0u8; CHUNK];
    loop {
        if stalled.wait_for(|stalled| !stalled).await.is_err() {
            return;
        }
        let Ok(permit) = budget.acquire_many(CHUNK as u32).await else {
            return;
        };
        permit.forget();
        let read = read_some(&from, &mut buf).await;
        // The release time is monotonic per direction, so jitter never reorders bytes.
        let release = shared.shape().release_at(Instant::now()).max(last_release);
        last_release = release;
        let item = match read {
            Ok(0) => Item::Fin,
            Ok(n) => {
                budget.add_permits(CHUNK - n);
                Item::Data(buf[..n].to_vec())
            }
            Err(_) => Item::Rst,
        };
        let end = !matches!(item, Item::Data(_));
        if queue.send((release, item)).is_err() {
            let _ = events.send(Event::Reset);
            return;
        }
        if end {
            return;
        }
    }
}

/// Writes each queued chunk to `to` at its release time (not while stalled), then passes on FIN or RST.
async fn write_side(
    to: Arc<TcpStream>,
    mut queue: mpsc::UnboundedReceiver<(Instant, Item)>,
    budget: Arc<Semaphore>,
    mut stalled: watch::Receiver<bool>,
    events: mpsc::UnboundedSender<Event>,
) {
    while let Some((release, item)) = queue.recv().await {
        tokio::time::sleep_until(release).await;
        if stalled.wait_for(|stalled| !stalled).await.is_err() {
            return;
        }
        match item {
            Item::Data(bytes) => {
                if write_all(&to, &bytes).await.is_err() {
                    let _ = events.send(Event::Reset);
                    return;
                }
                budget.add_permits(bytes.len());
            }
            Item::Fin => {
                let event = match socket2::SockRef::from(&*to).shutdown(Shutdown::Write) {
                    Ok(()) => Event::Finished,
                    Err(_) => Event::Reset,
                };
                let _ = events.send(event);
                return;
            }
            Item::Rst => {
                let _ = events.send(Event::Reset);
                return;
            }
        }
    }
}

/// One read from a socket shared between tasks (tokio's `AsyncRead` wants it exclusively).
async fn read_some(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        stream.readable().await?;
        match stream.try_read(buf) {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            result => return result,
        }
    }
}

async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bounds every wait of these tests, so a broken proxy fails them instead of hanging them.
    const BOUND: Duration = Duration::from_secs(20);

    async fn echo_server() -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                    let _ = write.shutdown().await;
                });
            }
        });
        (addr, task)
    }

    async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
        tokio::time::timeout(BOUND, future)
            .await
            .unwrap_or_else(|_| panic!("{what} within {BOUND:?}"))
    }

    fn delay(ms: u64, jitter_ms: u64) -> PathShape {
        PathShape {
            one_way_delay: Duration::from_millis(ms),
            jitter: Duration::from_millis(jitter_ms),
        }
    }

    async fn proxy_to(upstream: SocketAddr, shape: PathShape) -> DelayProxy {
        DelayProxy::start("127.0.0.1:0".parse().unwrap(), upstream, shape)
            .await
            .unwrap()
    }

    async fn expect_reset(stream: &mut TcpStream) {
        let mut buf = [0u8; 64];
        let error = bounded("the reset", async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) => panic!("a FIN where a reset was expected"),
                    Ok(_) => continue,
                    Err(error) => return error,
                }
            }
        })
        .await;
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{error}");
    }

    #[tokio::test]
    async fn a_round_trip_takes_at_least_twice_the_one_way_delay() {
        let (echo, _server) = echo_server().await;
        let proxy = proxy_to(echo, delay(40, 0)).await;
        let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
        let mut buf = [0u8; 4];
        for _ in 0..3 {
            let started = Instant::now();
            client.write_all(b"ping").await.unwrap();
            bounded("the echo", client.read_exact(&mut buf))
                .await
                .unwrap();
            assert_eq!(&buf, b"ping");
            let took = started.elapsed();
            assert!(
                took >= Duration::from_millis(80),
                "a round trip through 2 x 40 ms took {took:?}"
            );
        }
        assert_eq!(proxy.accepted_total(), 1);
        assert_eq!(proxy.open_connections(), 1);

        // A new shape applies to what is read from then on.
        proxy.set_shape(delay(100, 0));
        let started = Instant::now();
        client.write_all(b"pong").await.unwrap();
        bounded("the echo", client.read_exact(&mut buf))
            .await
            .unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "took {:?}",
            started.elapsed()
        );

        // FIN travels too: the echo server closes after the client's FIN, and the proxy forgets the connection.
        client.shutdown().await.unwrap();
        assert_eq!(
            bounded("the FIN back", client.read(&mut buf))
                .await
                .unwrap(),
            0
        );
        bounded("the connection closes", async {
            while proxy.open_connections() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }

    #[tokio::test]
    async fn bytes_keep_their_order_under_jitter() {
        let (echo, _server) = echo_server().await;
        let proxy = proxy_to(echo, delay(1, 5)).await;
        let client = TcpStream::connect(proxy.local_addr()).await.unwrap();
        let (mut read, mut write) = client.into_split();
        const LEN: usize = 1 << 20;
        let sent: Vec<u8> = (0..LEN / 4)
            .flat_map(|i| (i as u32).to_le_bytes())
            .collect();
        let writer = tokio::spawn({
            let sent = sent.clone();
            async move {
                // Small writes, so many chunks get their own jitter.
                for piece in sent.chunks(1000) {
                    write.write_all(piece).await.unwrap();
                }
                write.shutdown().await.unwrap();
            }
        });
        let mut received = Vec::with_capacity(LEN);
        bounded("1 MiB back", read.read_to_end(&mut received))
            .await
            .unwrap();
        writer.await.unwrap();
        assert_eq!(received.len(), LEN);
        let first_wrong = received
            .chunks(4)
            .zip(sent.chunks(4))
            .position(|(got, want)| got != want);
        assert_eq!(
            first_wrong, None,
            "the numbered words came back out of order"
        );
    }

    #[tokio::test]
    async fn a_stall_holds_bytes_and_lifting_it_delivers_them() {
        let (echo, _server) = echo_server().await;
        let proxy = proxy_to(echo, PathShape::NONE).await;
        let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
        let mut buf = [0u8; 5];
        client.write_all(b"first").await.unwrap();
        bounded("the echo", client.read_exact(&mut buf))
            .await
            .unwrap();

        proxy.set_stalled(true);
        client.write_all(b"held!").await.unwrap();
        let early = tokio::time::timeout(Duration::from_millis(500), client.read(&mut buf)).await;
        assert!(
            early.is_err(),
            "bytes moved through a stalled proxy: {early:?}"
        );
        assert_eq!(
            proxy.open_connections(),
            1,
            "a stall keeps the connection open"
        );

        proxy.set_stalled(false);
        bounded("the held bytes", client.read_exact(&mut buf))
            .await
            .unwrap();
        assert_eq!(&buf, b"held!");
    }

    #[tokio::test]
    async fn reset_all_resets_the_client_and_the_upstream() {
        // An upstream that records how its side of the connection ends.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = listener.local_addr().unwrap();
        let (arrived_tx, arrived) = tokio::sync::oneshot::channel();
        let upstream = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 5];
            stream.read_exact(&mut buf).await.unwrap();
            arrived_tx.send(()).unwrap();
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(_) => continue,
                    Err(error) => return Err(error.kind()),
                }
            }
        });
        let proxy = proxy_to(upstream_addr, delay(5, 0)).await;
        let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
        client.write_all(b"hello").await.unwrap();
        bounded("the bytes reach the upstream", arrived)
            .await
            .unwrap();
        assert_eq!(proxy.reset_all(), 1);
        expect_reset(&mut client).await;
        let upstream_end = bounded("the upstream's end", upstream).await.unwrap();
        assert_eq!(upstream_end, Err(io::ErrorKind::ConnectionReset));
    }

    #[tokio::test]
    async fn an_upstream_reset_reaches_the_client_as_a_reset() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = listener.local_addr().unwrap();
        let _upstream = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 5];
            stream.read_exact(&mut buf).await.unwrap();
            stream.write_all(b"bye").await.unwrap();
            stream.set_zero_linger().unwrap();
            drop(stream);
        });
        let proxy = proxy_to(upstream_addr, delay(20, 0)).await;
        let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
        client.write_all(b"hello").await.unwrap();
        // The bytes sent before the reset arrive first, as they would over a real path.
        let mut buf = [0u8; 3];
        bounded("the bytes before the reset", client.read_exact(&mut buf))
            .await
            .unwrap();
        assert_eq!(&buf, b"bye");
        expect_reset(&mut client).await;
    }

    #[tokio::test]
    async fn a_peer_that_does_not_read_stops_the_proxy_reading_too() {
        // An upstream that accepts and never reads: only the socket buffers and the proxy's in-flight budget
        // can take the client's bytes, so its writes must block long before an unbounded proxy's would.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = listener.local_addr().unwrap();
        let _upstream = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            std::future::pending::<()>().await;
            drop(stream);
        });
        let proxy = proxy_to(upstream_addr, PathShape::NONE).await;
        let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
        const LIMIT: usize = 64 << 20;
        let piece = vec![7u8; 64 << 10];
        let mut written = 0;
        while written < LIMIT {
            match tokio::time::timeout(Duration::from_millis(500), client.write_all(&piece)).await {
                Ok(result) => result.unwrap(),
                Err(_) => break,
            }
            written += piece.len();
        }
        assert!(
            written < LIMIT,
            "the proxy took {written} bytes for a peer that reads none"
        );
    }

    #[tokio::test]
    async fn a_refused_upstream_reaches_the_client_as_a_reset() {
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let proxy = proxy_to(closed, PathShape::NONE).await;
        let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
        expect_reset(&mut client).await;
        assert_eq!(proxy.accepted_total(), 1);
    }

    #[tokio::test]
    async fn dropping_the_proxy_closes_its_listener_and_connections() {
        let (echo, _server) = echo_server().await;
        let proxy = proxy_to(echo, PathShape::NONE).await;
        let addr = proxy.local_addr();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 2];
        client.write_all(b"hi").await.unwrap();
        bounded("the echo", client.read_exact(&mut buf))
            .await
            .unwrap();
        drop(proxy);
        let end = bounded("the connection ends", client.read(&mut buf)).await;
        assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
        bounded("the listener closes", async {
            while TcpStream::connect(addr).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }
}
