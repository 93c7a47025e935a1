//! A TCP relay between a producer (or gateway) and the emulator that can fail the way networks and peers do:
//! paused it is a blackhole (bytes stop in both directions, sockets stay open, no RST); a frame rule can drop
//! frames Event Hubs sends, stall a connection at a chosen frame (a peer that hangs mid-handshake or never
//! answers), or reset it (an RST to the producer); `reset_all` resets every open connection at once.
//!
//! The rule sees the stream from Event Hubs to the producer frame by frame (protocol headers and AMQP or SASL
//! frames), so a test can say "hang after SASL" or "lose this disposition" without parsing AMQP itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};

/// AMQP performative codes (the descriptor's last byte) of the frames a rule may look for.
pub mod performative {
    /// `open`.
    pub const OPEN: u8 = 0x10;
    /// `begin`.
    pub const BEGIN: u8 = 0x11;
    /// `attach`.
    pub const ATTACH: u8 = 0x12;
    /// `flow`.
    pub const FLOW: u8 = 0x13;
    /// `transfer`.
    pub const TRANSFER: u8 = 0x14;
    /// `disposition`.
    pub const DISPOSITION: u8 = 0x15;
    /// `close`.
    pub const CLOSE: u8 = 0x18;
    /// SASL `sasl-mechanisms`.
    pub const SASL_MECHANISMS: u8 = 0x40;
    /// SASL `sasl-outcome`.
    pub const SASL_OUTCOME: u8 = 0x44;
}

/// One unit of what Event Hubs sends, as a rule sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Which accepted connection (0 for the first).
    pub connection: usize,
    /// A protocol header (`AMQP` + id 0, 2 or 3): `Some(id)`.
    pub header: Option<u8>,
    /// The frame's performative code; `None` for headers and empty (heartbeat) frames.
    pub performative: Option<u8>,
    /// The frame's channel (0 for headers).
    pub channel: u16,
}

/// What the relay does with one frame from Event Hubs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Passes it on.
    Forward,
    /// Drops it silently; the connection carries on.
    Drop,
    /// Holds it and everything after it, both ways, for good: the connection hangs with its sockets open.
    Stall,
    /// Resets the producer's side (RST) and closes Event Hubs' side, without passing it on.
    Reset,
}

type Rule = Box<dyn FnMut(&Frame) -> Verdict + Send>;

/// A relay to `upstream` on a loopback port of its own.
pub struct Relay {
    /// Where the producer connects.
    pub addr: SocketAddr,
    paused: watch::Sender<bool>,
    rule: Arc<Mutex<Option<Rule>>>,
    accepted: Arc<AtomicUsize>,
    reset: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// A flowing relay to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let addr = listener.local_addr().expect("its address");
        let (paused, _) = watch::channel(false);
        let rule: Arc<Mutex<Option<Rule>>> = Arc::default();
        let accepted = Arc::new(AtomicUsize::new(0));
        let reset = Arc::new(Notify::new());
        let task = tokio::spawn({
            let paused = paused.clone();
            let rule = Arc::clone(&rule);
            let accepted = Arc::clone(&accepted);
            let reset = Arc::clone(&reset);
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let connection = accepted.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(relay_one(
                        client,
                        upstream,
                        connection,
                        paused.subscribe(),
                        Arc::clone(&rule),
                        Arc::clone(&reset),
                    ));
                }
            }
        });
        Self {
            addr,
            paused,
            rule,
            accepted,
            reset,
            task,
        }
    }

    /// Pauses (a blackhole: nothing moves either way, every socket stays open, new connections too) or resumes.
    pub fn set_paused(&self, paused: bool) {
        self.paused.send_replace(paused);
    }

    /// A handle that pauses or resumes this relay from another task.
    pub fn paused_handle(&self) -> watch::Sender<bool> {
        self.paused.clone()
    }

    /// Judges every frame Event Hubs sends from now on (on connections open and to come).
    pub fn set_rule(&self, rule: impl FnMut(&Frame) -> Verdict + Send + 'static) {
        *self.rule.lock() = Some(Box::new(rule));
    }

    /// Forwards every frame again.
    pub fn clear_rule(&self) {
        *self.rule.lock() = None;
    }

    /// Resets every open connection now (RST to the producer).
    pub fn reset_all(&self) {
        self.reset.notify_waiters();
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// A connection string of `emulator`'s pointing at this relay.
    pub fn connection_string(&self, emulator: &eventhub_emulator::Emulator) -> String {
        emulator
            .connection_string()
            .split(';')
            .map(|part| match part.strip_prefix("Endpoint=sb://") {
                Some(rest) => {
                    let host = rest.split(':').next().unwrap_or("localhost");
                    format!("Endpoint=sb://{host}:{}", self.addr.port())
                }
                None => part.to_owned(),
            })
            .collect::<Vec<_>>()
            .join(";")
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        // Connections end too: their tasks see the pause channel close.
        self.reset.notify_waiters();
    }
}

/// How one relayed connection ended, for its two pipes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Running,
    Stalled,
    Reset,
}

async fn relay_one(
    client: TcpStream,
    upstream: SocketAddr,
    connection: usize,
    paused: watch::Receiver<bool>,
    rule: Arc<Mutex<Option<Rule>>>,
    reset: Arc<Notify>,
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let (end, _) = watch::channel(End::Running);
    let end = Arc::new(end);
    let up = pipe_up(client_read, server_write, paused.clone(), end.subscribe());
    let down = pipe_down(
        server_read,
        client_write,
        connection,
        paused,
        rule,
        Arc::clone(&end),
    );
    // A reset reaches both pipes through `end`; they drop their halves, the producer's with a zero linger.
    let watcher = tokio::spawn({
        let end = Arc::clone(&end);
        async move {
            reset.notified().await;
            end.send_replace(End::Reset);
        }
    });
    let (_, client_write) = tokio::join!(up, down);
    watcher.abort();
    if let Some(mut client_write) = client_write {
        let _ = client_write.shutdown().await;
    }
}

/// Producer to Event Hubs: bytes as they come, unless paused or the connection stalled or was reset.
async fn pipe_up(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut paused: watch::Receiver<bool>,
    mut end: watch::Receiver<End>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            _ = end.wait_for(|end| *end != End::Running) => break,
        };
        let read = match read {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        tokio::select! {
            held = paused.wait_for(|paused| !*paused) => if held.is_err() { return },
            _ = end.wait_for(|end| *end != End::Running) => break,
        }
        if *end.borrow() != End::Running {
            break;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            break;
        }
    }
    if *end.borrow() == End::Stalled {
        // Hold Event Hubs' side open and silent, like the producer's.
        let _ = end.wait_for(|end| *end == End::Reset).await;
        return;
    }
    let _ = to.shutdown().await;
}

/// Event Hubs to producer, frame by frame through the rule. Returns the producer's write half for a clean
/// shutdown, or `None` when the connection was reset or ended otherwise.
async fn pipe_down(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    connection: usize,
    mut paused: watch::Receiver<bool>,
    rule: Arc<Mutex<Option<Rule>>>,
    end: Arc<watch::Sender<End>>,
) -> Option<OwnedWriteHalf> {
    let mut ended = end.subscribe();
    let mut pending: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        // Every whole unit (header or frame) in `pending`, through the rule.
        while let Some((len, frame)) = next_unit(&pending, connection) {
            let verdict = match rule.lock().as_mut() {
                Some(rule) => rule(&frame),
                None => Verdict::Forward,
            };
            match verdict {
                Verdict::Forward => {
                    tokio::select! {
                        held = paused.wait_for(|paused| !*paused) => if held.is_err() { return None },
                        _ = ended.wait_for(|end| *end == End::Reset) => return reset(to),
                    }
                    if to.write_all(&pending[..len]).await.is_err() {
                        return None;
                    }
                }
                Verdict::Drop => {}
                Verdict::Stall => {
                    end.send_replace(End::Stalled);
                    let _ = ended.wait_for(|end| *end == End::Reset).await;
                    return reset(to);
                }
                Verdict::Reset => {
                    end.send_replace(End::Reset);
                    return reset(to);
                }
            }
            pending.drain(..len);
        }
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            _ = ended.wait_for(|end| *end == End::Reset) => return reset(to),
        };
        match read {
            Ok(0) | Err(_) => return Some(to),
            Ok(read) => pending.extend_from_slice(&buffer[..read]),
        }
    }
}

/// Sends RST to the producer: a zero linger, then the socket is dropped.
fn reset(to: OwnedWriteHalf) -> Option<OwnedWriteHalf> {
    let _ = to.as_ref().set_zero_linger();
    drop(to);
    None
}

/// The first whole unit of `bytes`: its length and what it is; `None` until it has all arrived.
fn next_unit(bytes: &[u8], connection: usize) -> Option<(usize, Frame)> {
    if bytes.len() >= 8 && bytes.starts_with(b"AMQP") {
        return Some((
            8,
            Frame {
                connection,
                header: Some(bytes[4]),
                performative: None,
                channel: 0,
            },
        ));
    }
    if bytes.len() < 8 {
        return None;
    }
    let size = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    let size = size.max(8);
    if bytes.len() < size {
        return None;
    }
    let data_offset = usize::from(bytes[4]) * 4;
    let channel = u16::from_be_bytes([bytes[6], bytes[7]]);
    // A performative is a described list: 0x00, then the descriptor as smallulong 0x53 <code> (or ulong 0x80).
    let body = bytes.get(data_offset..size).unwrap_or_default();
    let performative = match body {
        [0x00, 0x53, code, ..] => Some(*code),
        [0x00, 0x80, rest @ ..] if rest.len() >= 8 => Some(rest[7]),
        _ => None,
    };
    Some((
        size,
        Frame {
            connection,
            header: None,
            performative,
            channel,
        },
    ))
}
