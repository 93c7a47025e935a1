//! The emulator's defences: malformed frames on every transport, the caps on connections, sessions and links,
//! unauthorized links detached, idle and silent connections closed.

mod support;

use std::time::Duration;

use eventhub_emulator::LimitsConfig;
use eventhub_wire::SAS_TOKEN_TYPE;
use fe2o3_amqp::link::DetachError;
use fe2o3_amqp::{Sender, Session};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::{
    Client, EmulatorProcess, Fixture, TIMEOUT, condition_name, event, eventually,
    refused_sender_condition, sas_token,
};

/// The plain AMQP and the SASL protocol headers.
const AMQP_HEADER: &[u8] = b"AMQP\x00\x01\x00\x00";
const SASL_HEADER: &[u8] = b"AMQP\x03\x01\x00\x00";

/// An `open` frame with container id "x" and nothing else.
fn open_frame() -> Vec<u8> {
    let body = [0x00, 0x53, 0x10, 0xc0, 0x04, 0x01, 0xa1, 0x01, b'x'];
    let mut frame = ((8 + body.len()) as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&[2, 0, 0, 0]);
    frame.extend_from_slice(&body);
    frame
}

/// Frames fe2o3 must never see: size fields 0 to 7 (fe2o3 0.18 panics on 4 to 7), data offsets before the
/// header's end or past the frame, and a size far beyond any max-frame-size.
fn malformed_frames() -> Vec<Vec<u8>> {
    let mut frames: Vec<Vec<u8>> = (0u32..8)
        .map(|size| {
            let mut frame = size.to_be_bytes().to_vec();
            frame.extend_from_slice(&[2, 0, 0, 0]);
            frame
        })
        .collect();
    frames.push(vec![0, 0, 0, 8, 0, 0, 0, 0]);
    frames.push(vec![0, 0, 0, 8, 1, 0, 0, 0]);
    frames.push(vec![0, 0, 0, 12, 200, 0, 0, 0, 0, 0, 0, 0]);
    frames.push(vec![0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0]);
    frames
}

/// Writes `bytes` to a fresh connection and reads until the emulator closes it; false when it does not
/// within the timeout.
async fn closed_after(addr: std::net::SocketAddr, bytes: &[u8]) -> bool {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The emulator may close before reading everything: a failed write is a close too.
    let _ = stream.write_all(bytes).await;
    closed_within_timeout(&mut stream).await
}

/// Reads (and drops) what the emulator sends until it closes `stream`; false when it does not within the
/// timeout.
async fn closed_within_timeout(stream: &mut TcpStream) -> bool {
    let mut sink = [0u8; 1024];
    let drained = async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(TIMEOUT, drained).await.is_ok()
}

#[tokio::test]
async fn malformed_frames_close_the_connection_without_a_panic_on_every_transport() {
    let emulator = EmulatorProcess::start(&["--websocket-listen", "127.0.0.1:0"]);
    for frame in malformed_frames() {
        for prefix in [
            AMQP_HEADER.to_vec(),
            SASL_HEADER.to_vec(),
            [AMQP_HEADER, &open_frame()].concat(),
        ] {
            let bytes = [prefix.as_slice(), &frame].concat();
            assert!(
                closed_after(emulator.addr, &bytes).await,
                "{bytes:?}: the connection was left open"
            );
        }
    }

    // The same over WebSockets: one binary message, header and malformed frame.
    use fe2o3_amqp_ws::tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
    let websocket_addr = emulator.websocket_addr.unwrap();
    for frame in malformed_frames() {
        let mut request = format!("ws://{websocket_addr}/$servicebus/websocket")
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", "AMQPWSB10".parse().unwrap());
        let stream = TcpStream::connect(websocket_addr).await.unwrap();
        let (mut websocket, _) = fe2o3_amqp_ws::tokio_tungstenite::client_async(request, stream)
            .await
            .unwrap();
        let bytes = [AMQP_HEADER, &open_frame(), &frame].concat();
        futures_util::SinkExt::send(&mut websocket, Message::binary(bytes))
            .await
            .unwrap();
        let ended = tokio::time::timeout(TIMEOUT, async {
            while let Some(Ok(message)) = websocket.next().await {
                if message.is_close() {
                    break;
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "{frame:?} over WebSockets: left open");
    }

    // Still serving: a client opens a session and the CBS link.
    let mut connection = emulator.connect().await;
    let mut session = Session::begin(&mut connection).await.unwrap();
    let cbs = Sender::attach(&mut session, "cbs", "$cbs").await;
    assert!(cbs.is_ok(), "{cbs:?}");
    let stderr = emulator.stderr();
    assert!(
        !stderr.contains("panicked"),
        "a panic was printed:\n{stderr}"
    );
    assert!(
        stderr.contains("malformed AMQP frame received"),
        "no log line for the malformed frames:\n{stderr}"
    );
}

/// The condition a sender link was detached with, waiting at most `wait`; `None` while it stays attached.
async fn detach_condition(sender: &mut Sender, wait: Duration) -> Option<String> {
    match tokio::time::timeout(wait, sender.on_detach()).await {
        Ok(
            DetachError::RemoteDetachedWithError(error) | DetachError::RemoteClosedWithError(error),
        ) => Some(condition_name(&error.condition)),
        Ok(other) => Some(format!("detached without an error: {other:?}")),
        Err(_) => None,
    }
}

#[tokio::test]
async fn a_flood_of_cbs_links_without_a_token_is_capped_and_the_links_detached() {
    const LINKS: usize = 20_000;
    const SESSIONS: usize = 8;
    /// What the emulator may grow by under the flood. Unbounded, 20,000 links took about 340 MiB.
    const MAX_GROWTH_KIB: u64 = 64 * 1024;
    let emulator = EmulatorProcess::start(&[]);
    let mut warm_up = emulator.connect().await;
    let _ = Session::begin(&mut warm_up).await.unwrap();
    let before_kib = emulator.rss_kib();

    let mut connection = emulator.connect().await;
    let peak = std::sync::atomic::AtomicU64::new(before_kib);
    let mut floods = Vec::new();
    for s in 0..SESSIONS {
        let mut session = Session::builder()
            .handle_max(u32::MAX - 1)
            .begin(&mut connection)
            .await
            .unwrap();
        let (emulator, peak) = (&emulator, &peak);
        floods.push(async move {
            let mut attached = Vec::new();
            let mut refused_on_attach = 0;
            for i in 0..LINKS / SESSIONS {
                match Sender::attach(&mut session, format!("flood-{s}-{i}"), "$cbs").await {
                    Ok(sender) => attached.push(sender),
                    Err(_) => refused_on_attach += 1,
                }
                if i % 500 == 0 {
                    peak.fetch_max(emulator.rss_kib(), std::sync::atomic::Ordering::Relaxed);
                }
            }
            (session, attached, refused_on_attach)
        });
    }
    let floods = futures_util::future::join_all(floods).await;
    peak.fetch_max(emulator.rss_kib(), std::sync::atomic::Ordering::Relaxed);
    let refused_on_attach: usize = floods.iter().map(|(_, _, refused)| refused).sum();
    let mut attached: Vec<Sender> = Vec::new();
    let mut _sessions = Vec::new();
    for (session, senders, _) in floods {
        attached.extend(senders);
        _sessions.push(session);
    }
    let peak_kib = peak.into_inner();
    let growth_kib = peak_kib.saturating_sub(before_kib);
    eprintln!(
        "{LINKS} $cbs links without a token: RSS {before_kib} KiB before, peak {peak_kib} KiB (+{growth_kib} KiB)"
    );
    assert!(
        growth_kib < MAX_GROWTH_KIB,
        "the emulator grew by {growth_kib} KiB for {LINKS} unauthorized links"
    );

    // Every link is detached: those over the cap at once, the others once the authorization timeout passes.
    let mut conditions = std::collections::BTreeMap::<String, usize>::new();
    let wait = LimitsConfig::default().authorization_timeout + TIMEOUT;
    for sender in &mut attached {
        let condition = detach_condition(sender, wait)
            .await
            .unwrap_or_else(|| "still attached".into());
        *conditions.entry(condition).or_default() += 1;
    }
    eprintln!("refused on attach: {refused_on_attach}; detached: {conditions:?}");
    let cap = LimitsConfig::default().max_unauthorized_links_per_connection;
    assert_eq!(conditions.get("still attached"), None, "{conditions:?}");
    // Each unauthorized link frees its place when detached, so a flood longer than the timeout gets a few
    // more than the cap; most are refused at once.
    let unauthorized = conditions
        .get("amqp:unauthorized-access")
        .copied()
        .unwrap_or(0);
    let refused = conditions
        .get("amqp:resource-limit-exceeded")
        .copied()
        .unwrap_or(0)
        + refused_on_attach;
    assert!(unauthorized >= cap, "{conditions:?}");
    assert_eq!(unauthorized + refused, LINKS, "{conditions:?}");
    assert!(refused > LINKS / 2, "{conditions:?}");
}

/// An emulator of hub `eh1` (two partitions) with these limits, no producer.
async fn limited(limits: LimitsConfig) -> Fixture {
    Fixture::builder(&["eh1:2"])
        .emulator(|config| config.limits = limits)
        .without_producer()
        .start()
        .await
}

#[tokio::test]
async fn connections_over_the_per_peer_cap_are_closed_with_resource_limit_exceeded() {
    let emulator = limited(LimitsConfig {
        max_connections_per_peer: 2,
        ..LimitsConfig::default()
    })
    .await;
    the_third_connection_is_refused_naming(&emulator, "limits.max_connections_per_peer").await;
}

#[tokio::test]
async fn links_over_the_cap_are_refused_and_a_detached_one_frees_its_place() {
    let emulator = limited(LimitsConfig {
        max_links_per_connection: 4,
        max_unauthorized_links_per_connection: 2,
        ..LimitsConfig::default()
    })
    .await;
    let mut client = emulator.client("eh1").await;
    // The CBS pair and two senders fill the connection.
    let first = client.sender("eh1").await.unwrap();
    let _second = client.sender("eh1").await.unwrap();
    assert_eq!(
        refused_sender_condition(&mut client, "eh1").await,
        "amqp:resource-limit-exceeded"
    );
    first.close().await.unwrap();
    let mut sender = client.sender("eh1").await.unwrap();
    let sent = sender.send(event("fits", None)).await;
    assert!(
        sent.is_ok(),
        "the detached link's place was not freed: {sent:?}"
    );
}

#[tokio::test]
async fn cbs_links_of_a_connection_that_puts_no_token_are_detached_and_capped() {
    let emulator = limited(LimitsConfig {
        authorization_timeout: Duration::from_millis(300),
        max_unauthorized_links_per_connection: 2,
        ..LimitsConfig::default()
    })
    .await;
    // An authorized connection keeps its CBS pair past the timeout and can put tokens again.
    let mut authorized = emulator.client("eh1").await;

    let mut connection = emulator.bare_connection("no-token").await;
    let mut session = Session::begin(&mut connection).await.unwrap();
    let mut first = Sender::attach(&mut session, "cbs-1", "$cbs").await.unwrap();
    let mut second = Sender::attach(&mut session, "mgmt-1", "$management")
        .await
        .unwrap();
    let mut third = Sender::attach(&mut session, "cbs-2", "$cbs").await.unwrap();
    assert_eq!(
        detach_condition(&mut third, TIMEOUT).await.as_deref(),
        Some("amqp:resource-limit-exceeded")
    );
    for sender in [&mut first, &mut second] {
        assert_eq!(
            detach_condition(sender, TIMEOUT).await.as_deref(),
            Some("amqp:unauthorized-access")
        );
    }
    let (status, _) = authorized
        .put_token(
            "sb://localhost/eh1",
            SAS_TOKEN_TYPE,
            &sas_token("eh1", Duration::from_secs(600)),
        )
        .await;
    assert_eq!(status, 202, "the authorized connection lost its CBS link");
}

#[tokio::test]
async fn a_connection_without_links_is_closed_after_the_idle_timeout() {
    let emulator = limited(LimitsConfig {
        idle_connection_timeout: Duration::from_millis(300),
        ..LimitsConfig::default()
    })
    .await;
    let mut busy = emulator.client("eh1").await;
    let mut idle = emulator.bare_connection("idle").await;
    match tokio::time::timeout(TIMEOUT, idle.on_close()).await {
        Ok(Err(fe2o3_amqp::connection::Error::RemoteClosedWithError(error))) => {
            assert_eq!(condition_name(&error.condition), "amqp:connection:forced");
        }
        other => panic!("the idle connection was not closed: {other:?}"),
    }
    // The connection with links is still there.
    let mut sender = busy.sender("eh1").await.unwrap();
    sender.send(event("alive", None)).await.unwrap();
}

#[tokio::test]
async fn the_idle_time_out_is_announced_and_a_silent_peer_dropped() {
    let emulator = limited(LimitsConfig {
        idle_time_out: Duration::from_millis(1000),
        ..LimitsConfig::default()
    })
    .await;
    let mut stream = TcpStream::connect(emulator.local_addr()).await.unwrap();
    stream
        .write_all(&[AMQP_HEADER, &open_frame()].concat())
        .await
        .unwrap();
    let mut received = Vec::new();
    let read_all = tokio::time::timeout(TIMEOUT, async {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read_all.is_ok(),
        "a silent peer was not dropped: {received:?}"
    );
    // The emulator's open: uint 1000 (0x70 0x000003e8) as idle-time-out; then its close.
    let announced = [0x70, 0x00, 0x00, 0x03, 0xe8];
    assert!(
        received.windows(5).any(|w| w == announced),
        "no idle-time-out of 1000 ms in {received:?}"
    );
    assert!(
        received
            .windows(b"amqp:resource-limit-exceeded".len())
            .any(|w| w == b"amqp:resource-limit-exceeded"),
        "not closed with amqp:resource-limit-exceeded: {received:?}"
    );
}

#[tokio::test]
async fn connections_over_the_total_cap_are_closed_with_resource_limit_exceeded() {
    let emulator = limited(LimitsConfig {
        max_connections: 2,
        max_connections_per_peer: 2,
        ..LimitsConfig::default()
    })
    .await;
    the_third_connection_is_refused_naming(&emulator, "(limits.max_connections)").await;
}

/// With two connections open, a third is closed with resource-limit-exceeded naming `setting`, and closing
/// one frees its place.
async fn the_third_connection_is_refused_naming(emulator: &Fixture, setting: &str) {
    let first = Client::connect(emulator).await.unwrap();
    let second = Client::connect(emulator).await.unwrap();
    let mut third = emulator.bare_connection("third").await;
    match tokio::time::timeout(TIMEOUT, third.on_close()).await {
        Ok(Err(fe2o3_amqp::connection::Error::RemoteClosedWithError(error))) => {
            assert_eq!(
                condition_name(&error.condition),
                "amqp:resource-limit-exceeded"
            );
            let description = error.description.unwrap_or_default();
            assert!(description.contains(setting), "{description}");
        }
        other => panic!("the third connection was not refused: {other:?}"),
    }
    first.close().await;
    assert!(
        eventually(|| async { Client::connect(emulator).await.is_ok() }).await,
        "no place freed"
    );
    second.close().await;
}

#[tokio::test]
async fn silent_and_slow_peers_are_dropped_after_the_handshake_timeout_and_others_served() {
    let emulator = limited(LimitsConfig {
        handshake_timeout: Duration::from_millis(500),
        ..LimitsConfig::default()
    })
    .await;
    let addr = emulator.local_addr();
    // Silent: connects and sends nothing.
    let silent = closed_after(addr, b"");
    // Slow: the SASL header one byte every 200 ms (1.6 s for the 8 bytes, the handshake's bound is 0.5 s).
    let slow = async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        for byte in SASL_HEADER {
            if stream.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        closed_within_timeout(&mut stream).await
    };
    let (silent, slow) = tokio::join!(silent, slow);
    assert!(silent, "a silent peer was not dropped");
    assert!(slow, "a slow peer was not dropped");
    // Meanwhile, a normal client opens, authorizes and sends.
    let mut client = emulator.client("eh1").await;
    let mut sender = client.sender("eh1").await.unwrap();
    sender.send(event("alive", None)).await.unwrap();
}
