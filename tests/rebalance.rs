//! Load spreads over replicas: `limits.max_connection_age_seconds` sends each gRPC connection a GOAWAY at its
//! age (±10%), calls in flight finish, new calls go on a new connection, a stream open across the age ends
//! UNAVAILABLE CONNECTION_AGED with every event it read answered, and a connection still holding a call
//! `max_connection_age_grace_seconds` later is closed. Behind a round-robin TCP balancer (an L4 Service), a
//! second gateway added while 16 clients send gets none of their events without an age, and a fair share
//! within one age with it.
//!
//! Every gateway is the real binary (`EVENTHUB_GATEWAY_BIN` may name another build) against an in-process
//! emulator, on loopback; shares are read from each gateway's own `/metrics`.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use eventhub_emulator::Emulator;
use eventhub_gateway::proto::v1;
use eventhub_gateway::proto::v1::event_hub_gateway_client::EventHubGatewayClient;
use futures_util::StreamExt;
use prost::Message;
use support::balancer::Balancer;
use support::*;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tower::ServiceExt;

const PARTITIONS: usize = 2;
const AGED: &str = "eventhub_gateway_client_connections_aged_total";

/// A gateway process serving `hub` of `emulator`, with these settings in its environment, once SERVING.
async fn gateway(emulator: &Emulator, hub: &str, env: &[(&str, &str)]) -> GatewayProcess {
    let gateway = GatewayProcess::start(
        &[
            "--connection-string",
            &emulator.connection_string(),
            "--event-hub",
            hub,
        ],
        env,
    );
    wait_until_serving(&gateway.address.to_string()).await;
    gateway
}

/// The environment of a gateway whose connections live `age` seconds, with `grace` (and as long a send
/// timeout, the shortest the grace allows).
fn aging(age: &'static str, grace: &'static str) -> [(&'static str, &'static str); 4] {
    [
        ("EVENTHUB_GATEWAY_LIMITS__MAX_CONNECTION_AGE_SECONDS", age),
        (
            "EVENTHUB_GATEWAY_LIMITS__MAX_CONNECTION_AGE_GRACE_SECONDS",
            grace,
        ),
        ("EVENTHUB_GATEWAY_PRODUCER__SEND_TIMEOUT", grace),
        ("RUST_LOG", "eventhub_gateway::listener=debug,info"),
    ]
}

/// Connections of `gateway` that reached their age and ended as `end` (`goaway`, `forced`).
async fn aged(gateway: &GatewayProcess, end: &str) -> f64 {
    sample_sum(&gateway.samples().await, AGED, &[("end", end)])
}

/// A `SendEvent` of `text` on `channel` whose request body stays open (the call in flight, its handler waiting
/// for the end of the request) until `release` is sent or dropped; resolves to the call's status.
fn held_send_event(
    channel: &tonic::transport::Channel,
    address: SocketAddr,
    text: &str,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<tonic::Status>) {
    let payload = v1::SendEventRequest {
        event_hub: String::new(),
        event: Some(text_event(text)),
    }
    .encode_to_vec();
    let (release, released) = oneshot::channel::<()>();
    let frames = futures_util::stream::once(std::future::ready(Some(grpc_frame(&payload, false))))
        .chain(futures_util::stream::once(async move {
            let _ = released.await;
            None
        }))
        .filter_map(std::future::ready)
        .map(|chunk| Ok::<_, std::convert::Infallible>(http_body::Frame::data(chunk)));
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{address}/eventhub.gateway.v1.EventHubGateway/SendEvent"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(http_body_util::StreamBody::new(
            frames,
        )))
        .unwrap();
    let channel = channel.clone();
    let call = tokio::spawn(async move {
        match channel.oneshot(request).await {
            Ok(response) => raw_status(response).await.0,
            Err(error) => tonic::Status::unavailable(error.to_string()),
        }
    });
    (release, call)
}

/// Whether tonic's client failed a call because it raced a GOAWAY, before the gateway took it: CANCELLED
/// "connection closed" (the call was still queued on the closing connection), UNAVAILABLE (a refused stream),
/// or INTERNAL carrying h2's GOAWAY error (the stream was above the GOAWAY's last stream id, so the gateway
/// never processed it). gRPC clients retry these transparently (grpc-js does: tests/node/rebalance.test.mjs
/// sees none); tonic's channel does not, so these tests do.
fn raced_a_goaway(status: &tonic::Status) -> bool {
    match status.code() {
        Code::Cancelled | Code::Unavailable => true,
        Code::Internal => format!("{status:?}").contains("GoAway("),
        _ => false,
    }
}

/// Polls `gateway`'s aged-connection counter for `end` until it reaches `at_least`; whether it did in time.
async fn wait_aged(gateway: &GatewayProcess, end: &str, at_least: f64) -> bool {
    eventually(|| async { aged(gateway, end).await >= at_least }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aged_connection_gets_goaway_its_call_in_flight_finishes_and_new_calls_use_a_new_connection()
 {
    let emulator = start(&[&format!("aging:{PARTITIONS}")]).await;
    let gateway = gateway(&emulator, "aging", &aging("1", "10")).await;
    let (channel, opened) = counting_channel(gateway.address).await;
    let mut client = EventHubGatewayClient::new(channel.clone());
    send_text(&mut client, "before").await.expect("sent");
    assert_eq!(opened.load(Ordering::SeqCst), 1);

    // A call in flight across the age: its request body is still open when the GOAWAY comes.
    let (release, held) = held_send_event(&channel, gateway.address, "in flight");
    assert!(
        wait_aged(&gateway, "goaway", 1.0).await,
        "no GOAWAY within {TIMEOUT:?}"
    );
    // New calls go on a new connection; one racing the GOAWAY is sent again (see `raced_a_goaway`).
    let mut after = Err(tonic::Status::unknown("not sent"));
    let mut attempts = 0;
    while attempts < 3 {
        attempts += 1;
        after = send_text(&mut client, "after").await;
        if !matches!(&after, Err(status) if raced_a_goaway(status)) {
            break;
        }
    }
    after.expect("a call after the GOAWAY succeeds");
    assert_eq!(opened.load(Ordering::SeqCst), 2, "a new connection");
    assert!(!held.is_finished(), "the held call is still in flight");
    release.send(()).unwrap();
    let status = held.await.unwrap();
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    assert_eq!(aged(&gateway, "forced").await, 0.0, "nothing was cut");
    let stored = sorted(
        stored_events(&emulator, "aging", PARTITIONS)
            .iter()
            .map(|(_, message)| body_text(message))
            .collect(),
    );
    assert_eq!(stored, ["after", "before", "in flight"]);
    drop(gateway);
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_still_holding_a_call_after_its_grace_is_closed() {
    let emulator = start(&[&format!("stuck:{PARTITIONS}")]).await;
    let gateway = gateway(&emulator, "stuck", &aging("1", "2")).await;
    let (channel, _) = counting_channel(gateway.address).await;
    let mut client = EventHubGatewayClient::new(channel.clone());
    send_text(&mut client, "warm").await.expect("sent");
    let started = Instant::now();
    // Never released while the test waits: a client that keeps its call open for ever.
    let (_release, held) = held_send_event(&channel, gateway.address, "stuck");
    let status = tokio::time::timeout(TIMEOUT, held)
        .await
        .expect("the stuck connection is closed within the age and its grace")
        .unwrap();
    let elapsed = started.elapsed();
    assert_ne!(status.code(), Code::Ok, "{status:?}");
    // Not before the age (at least 0.9 s) and the grace (2 s).
    assert!(elapsed >= Duration::from_millis(2800), "{elapsed:?}");
    assert_eq!(aged(&gateway, "goaway").await, 1.0);
    assert_eq!(aged(&gateway, "forced").await, 1.0);
    assert!(
        gateway
            .stderr()
            .contains("aged connection closed at the end of its grace"),
        "{}",
        gateway.stderr()
    );
    // The client goes on, on a new connection.
    send_text(&mut client, "again").await.expect("sent again");
    drop(gateway);
    emulator.shutdown(TIMEOUT).await;
}

/// `SendStream` request `sequence`, its event's body the sequence.
fn stream_request(sequence: u64) -> v1::SendStreamRequest {
    v1::SendStreamRequest {
        event_hub: String::new(),
        events: Vec::new(),
        sequence,
        event: Some(text_event(&sequence.to_string())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_open_across_its_connections_age_ends_connection_aged_with_every_event_it_read_answered()
 {
    let emulator = start(&[&format!("streaming:{PARTITIONS}")]).await;
    let gateway = gateway(&emulator, "streaming", &aging("1", "10")).await;
    let (channel, opened) = counting_channel(gateway.address).await;
    let mut client = EventHubGatewayClient::new(channel);

    // A client that keeps sending, one event each 5 ms, until its stream ends.
    let (sender, receiver) = mpsc::channel(8);
    let mut responses = client
        .send_stream(ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    let feeder = tokio::spawn(async move {
        for sequence in 1.. {
            if sender.send(stream_request(sequence)).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let mut acks: Vec<(u64, i32)> = Vec::new();
    let ended = tokio::time::timeout(TIMEOUT, async {
        loop {
            match responses.message().await {
                Ok(Some(response)) => acks.extend(
                    response
                        .acks
                        .iter()
                        .map(|ack| (ack.sequence, ack.status.as_ref().map_or(0, |s| s.code))),
                ),
                Ok(None) => break None,
                Err(status) => break Some(status),
            }
        }
    })
    .await
    .expect("the stream ends at its connection's age");
    feeder.abort();
    let status = ended.expect("the stream ends with a status, not OK");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(error_reason(&rich_status(&status)), "CONNECTION_AGED");
    let metadata = error_metadata(&rich_status(&status));
    let last: u64 = metadata["last_sequence"].parse().unwrap();
    assert_eq!(metadata["messages_read"], last.to_string());
    assert!(
        last > 10,
        "the stream carried events before its age: {last}"
    );
    // Every event read is answered, once, OK; none after the last read.
    acks.sort_unstable();
    assert_eq!(
        acks,
        (1..=last).map(|sequence| (sequence, 0)).collect::<Vec<_>>()
    );
    assert_eq!(aged(&gateway, "goaway").await, 1.0);

    // The client sends the rest on a new stream, which its channel opens on a new connection.
    let rest: Vec<_> = (last + 1..=last + 50).map(stream_request).collect();
    let mut responses = client
        .send_stream(futures_util::stream::iter(rest))
        .await
        .expect("a new stream")
        .into_inner();
    let mut more = Vec::new();
    while let Some(response) = responses.message().await.expect("the new stream ends OK") {
        more.extend(response.acks.iter().map(|ack| ack.sequence));
    }
    assert_eq!(more.len(), 50);
    assert_eq!(opened.load(Ordering::SeqCst), 2);
    assert_eq!(aged(&gateway, "forced").await, 0.0);
    // Stored: each event exactly once, none lost between the two streams.
    let mut stored: Vec<u64> = stored_events(&emulator, "streaming", PARTITIONS)
        .iter()
        .map(|(_, message)| body_text(message).parse().unwrap())
        .collect();
    stored.sort_unstable();
    assert_eq!(stored, (1..=last + 50).collect::<Vec<_>>());
    drop(gateway);
    emulator.shutdown(TIMEOUT).await;
}

/// What each backend carried after a scale-out.
#[derive(Debug)]
struct Spread {
    /// Events the second backend answered OK between the scale-out and the window.
    second_before_window: f64,
    /// Events each backend answered OK in the window.
    window: (f64, f64),
    /// Calls that raced a GOAWAY, never taken by a gateway, over the whole run (the client sends on).
    failed: usize,
}

impl Spread {
    fn second_share(&self) -> f64 {
        self.window.1 / (self.window.0 + self.window.1)
    }
}

/// 16 clients, each one channel through a round-robin balancer, keep sending to a first gateway; a second is
/// added to the balancer; after `settle` the events each answers in a 3 s window are counted from its
/// `/metrics`.
async fn scale_out(hub: &str, env: &[(&str, &str)], settle: Duration) -> Spread {
    const CLIENTS: usize = 16;
    let emulator = start(&[&format!("{hub}:{PARTITIONS}")]).await;
    let first = gateway(&emulator, hub, env).await;
    let second = gateway(&emulator, hub, env).await;
    let balancer = Balancer::start(&[first.address]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<usize>();
    let mut clients = Vec::new();
    for index in 0..CLIENTS {
        let mut client = EventHubGatewayClient::connect(format!("http://{}", balancer.addr))
            .await
            .expect("connects through the balancer");
        let (stop, sent) = (Arc::clone(&stop), sent_tx.clone());
        clients.push(tokio::spawn(async move {
            let mut failed = 0;
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                match send_text(&mut client, &format!("{index}-{n}")).await {
                    Ok(_) if n == 1 => {
                        let _ = sent.send(index);
                    }
                    Ok(_) => {}
                    Err(status) => {
                        assert!(raced_a_goaway(&status), "{status:?}");
                        failed += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            failed
        }));
    }
    // Every client is connected (to the first gateway) and sending.
    for _ in 0..CLIENTS {
        tokio::time::timeout(TIMEOUT, sent_rx.recv())
            .await
            .expect("every client sends");
    }
    balancer.add(second.address);
    let second_at_scale_out = second.events_ok().await;
    tokio::time::sleep(settle).await;
    let (a, b) = (first.events_ok().await, second.events_ok().await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (a2, b2) = (first.events_ok().await, second.events_ok().await);
    stop.store(true, Ordering::Relaxed);
    let mut failed = 0;
    for client in clients {
        failed += client.await.expect("a client ran");
    }
    drop(balancer);
    drop((first, second));
    emulator.shutdown(TIMEOUT).await;
    Spread {
        second_before_window: b - second_at_scale_out,
        window: (a2 - a, b2 - b),
        failed,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_an_l4_balancer_a_replica_added_gets_no_share_without_an_age_and_a_fair_one_with_it()
{
    // Without an age, connections stay where the balancer put them: the new replica carries nothing.
    let pinned = scale_out("pinned", &[], Duration::from_millis(1500)).await;
    println!("without max_connection_age: {pinned:?}");
    assert!(pinned.window.0 > 0.0, "{pinned:?}");
    assert_eq!(pinned.failed, 0, "{pinned:?}");
    assert_eq!(
        (pinned.second_before_window, pinned.window.1),
        (0.0, 0.0),
        "{pinned:?}"
    );

    // With a 1 s age, every connection reconnects by 1.1 s after the scale-out, and the balancer alternates:
    // the window starts after one age with its jitter, plus a margin for the reconnects.
    let aged = scale_out("spread", &aging("1", "2")[..3], Duration::from_millis(1500)).await;
    let share = aged.second_share();
    println!("with max_connection_age 1 s: {aged:?}, second's share {share:.3}");
    assert!((0.25..=0.75).contains(&share), "{aged:?}");
}
