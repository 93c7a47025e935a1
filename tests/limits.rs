//! What one client can make the gateway spend, measured on the real process (RSS from /proc): a stream of
//! refused messages whose acks are never read, compressed decode bombs, errors that would echo megabytes,
//! and requests that are not what they claim to be. Bounds are generous multiples of the stated ceilings.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use eventhub_gateway::proto::v1;
use eventhub_gateway::proto::v1::event_hub_gateway_client::EventHubGatewayClient;
use futures_util::StreamExt;
use prost::Message;
use support::*;
use tonic::Code;
use tonic::transport::Channel;

const MIB: u64 = 1024 * 1024;

/// The gateway process over its own emulator, hub `eh1`.
fn gateway() -> GatewayProcess {
    GatewayProcess::start_emulated(&["--event-hub", "eh1"], &[])
}

/// The gateway after one call, so that an RSS baseline includes a connected producer; the caller's client.
async fn warm_gateway() -> (GatewayProcess, EventHubGatewayClient<Channel>) {
    let gateway = gateway();
    let mut client = gateway.client().await;
    send_text(&mut client, "warm").await.unwrap();
    (gateway, client)
}

/// `copies` gzip-compressed `SendEvents` calls of `frame` at once (`label` in the printed figures); how each
/// ended, and how far the gateway's RSS rose meanwhile.
async fn compressed_calls(
    label: &str,
    gateway: &GatewayProcess,
    frame: bytes::Bytes,
    copies: usize,
) -> (Vec<tonic::Status>, u64) {
    let rss = gateway.watch_rss();
    let calls = (0..copies).map(|_| {
        let body = futures_util::stream::iter([frame.clone()]);
        async move { raw_status(raw_call(gateway.address, "SendEvents", true, body).await).await }
    });
    let answers = futures_util::future::join_all(calls).await;
    let growth = rss.growth();
    eprintln!(
        "{label}: {} compressed bytes x {copies}, RSS {} MiB -> peak +{} MiB",
        frame.len(),
        rss.baseline() / MIB,
        growth / MIB
    );
    (
        answers.into_iter().map(|(status, _)| status).collect(),
        growth,
    )
}

/// A client writes 25 MiB of empty stream messages (5 bytes each, every one nacked: no event) and reads no
/// ack. Each message read takes the stream's budget until its nack is taken by the acker, so the gateway
/// stops reading at `max_unacked_per_stream` plus the acks queued toward the client, and HTTP/2 flow control
/// holds the client. Before: every nack went to an unbounded queue and the gateway read on (3 GiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_stream_messages_whose_acks_are_not_read_stays_within_the_streams_ceiling()
 {
    let (gateway, mut client) = warm_gateway().await;
    let rss = gateway.watch_rss();

    let total: usize = 25 * MIB as usize;
    let chunk = bytes::Bytes::from(vec![0u8; 65_535]); // 13,107 empty messages
    let written = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&written);
    let body = futures_util::stream::iter(0..total / chunk.len()).map(move |_| {
        counted.fetch_add(chunk.len(), Ordering::Relaxed);
        chunk.clone()
    });
    let response = raw_call(gateway.address, "SendStream", false, body).await;
    // Give the gateway time to read whatever it will (before the fix, all of it, nacking each).
    let started = Instant::now();
    let mut last = 0;
    while started.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = written.load(Ordering::Relaxed);
        if now == last && started.elapsed() > Duration::from_secs(5) {
            break;
        }
        last = now;
    }
    let growth = rss.growth();
    let written = written.load(Ordering::Relaxed);
    eprintln!(
        "nack flood: {} KiB written of {} KiB, RSS {} MiB -> peak +{} MiB",
        written / 1024,
        total / 1024,
        rss.baseline() / MIB,
        growth / MIB
    );
    // Here: 10,000 pending nacks and 17,408 queued, about half a KiB each (~14 MiB); the stream's ceiling
    // whatever it is sent is under 200 MiB (docs/api.md, Limits). The bound sits well below what main reached.
    assert!(
        growth < 96 * MIB,
        "RSS grew by {} MiB while the client read no acks",
        growth / MIB
    );
    assert!(
        written < total,
        "the gateway stopped reading: the client could not write all of it"
    );
    // Another client is still served, and this stream's acks are all there once it reads them.
    send_text(&mut client, "still served").await.unwrap();
    drop(response);
}

/// A `SendEvents` request of `count` empty events.
fn empty_events(count: usize) -> Vec<u8> {
    // Field 2 (events), length 0, per event.
    [0x12u8, 0x00].repeat(count)
}

/// Gzip-compressed `SendEvents` requests of hundreds of thousands of empty events, eight at once. Each
/// decompresses within the ratio-free 1 MiB and is refused by its count before prost decodes it. Before:
/// each was decoded whole (500,000 events, a few hundred bytes each) before the count was checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_floods_of_empty_events_are_refused_by_their_count_before_they_are_decoded() {
    let (gateway, mut client) = warm_gateway().await;
    let plain = empty_events(500_000); // 1,000,000 bytes
    let (answers, growth) =
        compressed_calls("decode bomb", &gateway, grpc_frame(&gzip(&plain), true), 8).await;
    for status in &answers {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let rich = rich_status(status);
        assert_eq!(error_reason(&rich), "INVALID_EVENT");
        assert_eq!(violated_fields(&rich), ["events"]);
        assert!(
            status.message().contains("at most 1000 events")
                && status.message().contains("got 500000"),
            "{status:?}"
        );
    }
    assert!(growth < 64 * MIB, "RSS grew by {} MiB", growth / MIB);
    send_text(&mut client, "still served").await.unwrap();
}

/// The 16 KB bomb of the issue: 8 million empty events, 16 MiB once decompressed, four at once. It is over
/// the compression ratio cap (128:1 above 1 MiB): refused as too large after decompressing no more than the
/// cap. Before: 2.5 GiB each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_request_beyond_the_compression_ratio_is_refused_as_too_large() {
    let (gateway, mut client) = warm_gateway().await;
    let plain = empty_events((16 << 20) / 2 - 8);
    let (answers, growth) =
        compressed_calls("16 MiB bomb", &gateway, grpc_frame(&gzip(&plain), true), 4).await;
    for status in &answers {
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
        assert_eq!(error_reason(&rich_status(status)), "REQUEST_TOO_LARGE");
        assert!(status.message().contains("128 times"), "{status:?}");
    }
    assert!(growth < 64 * MIB, "RSS grew by {} MiB", growth / MIB);
    send_text(&mut client, "still served").await.unwrap();
}

/// A 1 MiB hub name is not repeated back: the status message and its details stay under a few KB, for
/// `SendEvent`, `SendStream` nacks and `GetEventHubProperties`. Before: 1 MiB of grpc-message and 2.8 MB of
/// grpc-status-details-bin.
#[tokio::test]
async fn errors_repeat_at_most_a_clipped_part_of_what_the_client_sent() {
    let gateway = gateway();
    let long_name = "h".repeat(1 << 20);

    let request = v1::SendEventRequest {
        event_hub: long_name.clone(),
        event: Some(text_event("x")),
    };
    let (status, echoed) = raw_unary(gateway.address, "SendEvent", &request.encode_to_vec()).await;
    eprintln!(
        "error echo: SendEvent with a 1 MiB hub name: {echoed} bytes of grpc-message and details"
    );
    assert_eq!(
        status.code(),
        Code::NotFound,
        "{}",
        &status.message()[..200.min(status.message().len())]
    );
    assert_eq!(error_reason(&rich_status(&status)), "UNKNOWN_EVENT_HUB");
    assert!(echoed < 4096, "{echoed} bytes echoed");
    assert!(
        status
            .message()
            .contains(&format!("[cut: {} bytes in all]", 1 << 20)),
        "{}",
        status.message()
    );

    let mut client = gateway.client().await;
    let (acks, ended) = stream_events(
        &mut client,
        vec![v1::SendStreamRequest {
            event_hub: long_name.clone(),
            sequence: 7,
            event: Some(text_event("x")),
            events: Vec::new(),
        }],
    )
    .await;
    ended.unwrap();
    let nack = acks[&7].status.as_ref().unwrap();
    assert_eq!(nack.code, Code::NotFound as i32);
    assert!(
        nack.encoded_len() < 4096,
        "a nack of {} bytes",
        nack.encoded_len()
    );

    let properties = v1::GetEventHubPropertiesRequest {
        event_hub: long_name,
    };
    let (status, echoed) = raw_unary(
        gateway.address,
        "GetEventHubProperties",
        &properties.encode_to_vec(),
    )
    .await;
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(echoed < 4096, "{echoed} bytes echoed");
}

/// Bytes that are not the request, invalid UTF-8 and JSON nested too deep are the client's errors
/// (INVALID_ARGUMENT, with the field where known), not INTERNAL.
#[tokio::test]
async fn malformed_requests_are_invalid_argument_naming_the_field() {
    let gateway = gateway();
    let call = |payload: &'static [u8]| async move {
        raw_unary(gateway.address, "SendEvent", payload).await.0
    };

    // A length past the end of the message.
    let status = call(&[0x0a, 0x05, b'a']).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(error_reason(&rich_status(&status)), "MALFORMED_REQUEST");

    // Invalid UTF-8 in a string field.
    let status = call(&[0x0a, 0x02, 0xc3, 0x28]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let rich = rich_status(&status);
    assert_eq!(error_reason(&rich), "MALFORMED_REQUEST");
    assert_eq!(violated_fields(&rich), ["event_hub"]);

    // A frame cut short by the end of the request.
    let frame = grpc_frame(&[0x0a, 0x01, b'a'], false);
    let cut = frame.slice(..frame.len() - 1);
    let (status, _) = raw_status(
        raw_call(
            gateway.address,
            "SendEvent",
            false,
            futures_util::stream::iter([cut]),
        )
        .await,
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(error_reason(&rich_status(&status)), "MALFORMED_REQUEST");

    // JSON 40 levels deep (prost's own limit is about 32).
    let mut object = prost_types::Struct::default();
    for _ in 0..40 {
        object = prost_types::Struct {
            fields: [(
                "a".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StructValue(object)),
                },
            )]
            .into(),
        };
    }
    let mut client = gateway.client().await;
    let status = client
        .send_events(v1::SendEventsRequest {
            event_hub: String::new(),
            events: vec![
                text_event("fine"),
                v1::Event {
                    body: Some(v1::event::Body::Json(object)),
                    ..Default::default()
                },
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let rich = rich_status(&status);
    assert_eq!(error_reason(&rich), "INVALID_EVENT");
    assert_eq!(violated_fields(&rich), ["events[1].json"]);
    assert!(status.message().contains("32 levels"), "{status:?}");
}
