//! The gRPC gateway in-process against its in-process emulator, through a real tonic client on loopback:
//! the four RPCs, per-event results, stream acks and flow control, limits, deadlines, TLS, draining.

mod support;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use eventhub_gateway::proto::v1;
use eventhub_wire::message::partition_key;
use eventhub_wire::partition::partition_for_key;
use support::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn with_client_id<T>(message: T, id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-client-id", id.parse().unwrap());
    request
}

#[tokio::test]
async fn send_event_stores_every_field_and_says_where_it_went() {
    let gateway = start_gateway(|_| {}).await;
    let mut client = gateway_client(&gateway).await;
    let mut request = tonic::Request::new(v1::SendEventRequest {
        event_hub: String::new(),
        event: Some(v1::Event {
            body: Some(v1::event::Body::Text("hello".into())),
            partition_id: "2".into(),
            properties: [("colour".to_owned(), "blue".to_owned())].into(),
            content_type: "text/plain".into(),
            message_id: "m-1".into(),
            correlation_id: "c-1".into(),
            ..Default::default()
        }),
    });
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    let response = client.send_event(request).await.unwrap().into_inner();
    assert_eq!(response.event_hub, "eh1", "the default hub is the first");
    assert_eq!(response.partition_id, "2");
    let emulator = gateway.emulator().unwrap();
    let stored = stored_events(emulator, "eh1", 4);
    assert_eq!(stored.len(), 1);
    let (partition, message) = &stored[0];
    assert_eq!(partition, "2");
    assert_eq!(body_text(message), "hello");
    let properties = message.properties.as_ref().unwrap();
    assert_eq!(
        properties.content_type.as_ref().map(|t| t.as_str()),
        Some("text/plain")
    );
    let application = &message.application_properties.as_ref().unwrap().0;
    for (name, value) in [
        ("colour", "blue"),
        ("Diagnostic-Id", traceparent),
        ("traceparent", traceparent),
    ] {
        assert_eq!(
            application.get(name),
            Some(&fe2o3_amqp_types::primitives::SimpleValue::String(
                value.into()
            )),
            "{name}"
        );
    }
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn keys_land_where_the_service_hashes_them() {
    let gateway = start_gateway(|_| {}).await;
    let mut client = gateway_client(&gateway).await;
    for key in ["alpha", "beta", "gamma", "delta"] {
        let event = v1::Event {
            partition_key: key.into(),
            ..text_event(key)
        };
        client
            .send_event(v1::SendEventRequest {
                event_hub: "eh2".into(),
                event: Some(event),
            })
            .await
            .unwrap();
    }
    for (partition, message) in stored_events(gateway.emulator().unwrap(), "eh2", 4) {
        let key = partition_key(&message).unwrap().unwrap();
        assert_eq!(partition, partition_for_key(&key, 4).to_string(), "{key}");
    }
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn errors_carry_code_reason_and_field() {
    let gateway = start_gateway(|_| {}).await;
    let mut client = gateway_client(&gateway).await;
    let send = |event: v1::Event, hub: &str| v1::SendEventRequest {
        event_hub: hub.into(),
        event: Some(event),
    };
    let cases: Vec<(v1::SendEventRequest, Code, &str, Option<&str>)> = vec![
        (
            send(text_event("x"), "nope"),
            Code::NotFound,
            "UNKNOWN_EVENT_HUB",
            None,
        ),
        (
            send(v1::Event::default(), ""),
            Code::InvalidArgument,
            "INVALID_EVENT",
            Some("event.body"),
        ),
        (
            send(
                v1::Event {
                    partition_key: "k".into(),
                    partition_id: "1".into(),
                    ..text_event("x")
                },
                "",
            ),
            Code::InvalidArgument,
            "INVALID_EVENT",
            Some("event.partition_key"),
        ),
        (
            send(
                v1::Event {
                    partition_id: "7".into(),
                    ..text_event("x")
                },
                "",
            ),
            Code::InvalidArgument,
            "INVALID_EVENT",
            Some("event.partition_id"),
        ),
        (
            send(
                v1::Event {
                    body: Some(v1::event::Body::Binary(vec![0; 1_100_000].into())),
                    ..Default::default()
                },
                "",
            ),
            Code::InvalidArgument,
            "EVENT_TOO_LARGE",
            Some("event"),
        ),
    ];
    for (request, code, reason, field) in cases {
        let status = client.send_event(request).await.unwrap_err();
        let rich = rich_status(&status);
        assert_eq!(status.code(), code, "{status:?}");
        assert_eq!(error_reason(&rich), reason, "{status:?}");
        if let Some(field) = field {
            assert_eq!(violated_fields(&rich), [field], "{status:?}");
        }
    }
    assert!(stored_events(gateway.emulator().unwrap(), "eh1", 4).is_empty());
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn send_events_answers_each_event_in_order_and_bad_ones_fail_alone() {
    let gateway = start_gateway(|config| config.limits.max_events_per_request = 50).await;
    let mut client = gateway_client(&gateway).await;
    let mut events: Vec<v1::Event> = (0..20).map(|i| text_event(&format!("e-{i}"))).collect();
    events[3] = v1::Event::default();
    events[7].partition_id = "99".into();
    let results = client
        .send_events(v1::SendEventsRequest {
            event_hub: "eh1".into(),
            events,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 20);
    for (index, result) in results.iter().enumerate() {
        let status = result.status.as_ref().unwrap();
        match index {
            3 => assert_eq!(violated_fields(status), ["events[3].body"]),
            7 => assert_eq!(violated_fields(status), ["events[7].partition_id"]),
            _ => assert_eq!(status.code, 0, "event {index}: {status:?}"),
        }
    }
    assert_eq!(
        stored_events(gateway.emulator().unwrap(), "eh1", 4).len(),
        18
    );
    let too_many = client
        .send_events(v1::SendEventsRequest {
            event_hub: String::new(),
            events: (0..51).map(|i| text_event(&i.to_string())).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&rich_status(&too_many)), ["events"]);
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_stream_acks_every_sequence_once_keeps_key_order_and_ends_ok_after_half_close() {
    let gateway = start_gateway(|config| config.limits.max_unacked_per_stream = 500).await;
    let mut client = gateway_client(&gateway).await;
    let count = 5000u64;
    let requests = (1..=count)
        .map(|sequence| v1::SendStreamRequest {
            event_hub: String::new(),
            events: Vec::new(),
            sequence,
            event: Some(if sequence % 1000 == 0 {
                v1::Event::default() // no body: nacked, the stream goes on
            } else {
                v1::Event {
                    partition_key: format!("k{}", sequence % 10),
                    ..text_event(&sequence.to_string())
                }
            }),
        })
        .collect();
    let (acks, ended) = stream_events(&mut client, requests).await;
    ended.unwrap();
    assert_eq!(acks.len() as u64, count);
    for (sequence, ack) in &acks {
        let code = ack.status.as_ref().unwrap().code;
        if sequence % 1000 == 0 {
            assert_eq!(code, Code::InvalidArgument as i32);
        } else {
            assert_eq!(code, 0, "sequence {sequence}");
        }
    }
    let stored = stored_events(gateway.emulator().unwrap(), "eh1", 4);
    assert_eq!(stored.len() as u64, count - 5);
    let mut last_by_key: HashMap<String, u64> = HashMap::new();
    for (_, message) in &stored {
        let key = partition_key(message).unwrap().unwrap();
        let sequence: u64 = body_text(message).parse().unwrap();
        if let Some(previous) = last_by_key.insert(key.clone(), sequence) {
            assert!(
                previous < sequence,
                "{key}: {previous} stored before {sequence}"
            );
        }
    }
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn stream_messages_carrying_several_events_ack_each_event_on_its_own_sequence() {
    let gateway = start_gateway(|config| {
        config.limits.max_unacked_per_stream = 64;
        config.limits.max_events_per_request = 100;
    })
    .await;
    let mut client = gateway_client(&gateway).await;
    let message = |sequence: u64, events: Vec<v1::Event>| v1::SendStreamRequest {
        event_hub: String::new(),
        sequence,
        event: None,
        events,
    };
    let keyed = |key: &str, text: String| v1::Event {
        partition_key: key.into(),
        ..text_event(&text)
    };
    // 30 messages of 100 events over 7 keys, each body its own sequence number; 100 events is above the
    // unacked budget of 64, so a message may use all of it.
    let mut requests: Vec<_> = (0..30u64)
        .map(|m| {
            let first = 1 + m * 100;
            let events = (first..first + 100)
                .map(|s| keyed(&format!("k{}", s % 7), s.to_string()))
                .collect();
            message(first, events)
        })
        .collect();
    // Event 3 of this message has no body: only it is nacked, naming `events[3].body`.
    let mut with_bad = (10_001..10_006)
        .map(|s| text_event(&s.to_string()))
        .collect::<Vec<_>>();
    with_bad[3] = v1::Event::default();
    requests.push(message(10_001, with_bad));
    // Both fields at once: every sequence of the message is nacked on `events`.
    requests.push(v1::SendStreamRequest {
        event: Some(text_event("single")),
        ..message(30_001, vec![text_event("a"), text_event("b")])
    });
    // A single event still works beside them.
    requests.push(v1::SendStreamRequest {
        event: Some(text_event("40001")),
        ..message(40_001, Vec::new())
    });
    // Too many events: refused as one unit before it is decoded (nacking each would cost what the client
    // chose), so the stream ends there, after the ack of every event before it.
    requests.push(message(
        20_001,
        (0..101).map(|i| text_event(&i.to_string())).collect(),
    ));
    requests.push(message(50_001, vec![text_event("never read")]));
    let (acks, ended) = stream_events(&mut client, requests).await;
    let ended = ended.unwrap_err();
    assert_eq!(ended.code(), Code::InvalidArgument, "{ended:?}");
    let rich = rich_status(&ended);
    assert_eq!(error_reason(&rich), "INVALID_EVENT");
    assert_eq!(violated_fields(&rich), ["events"]);
    assert!(ended.message().contains("at most 100 events"), "{ended:?}");
    assert_eq!(acks.len(), 3000 + 5 + 2 + 1);
    let code = |sequence: u64| acks[&sequence].status.as_ref().unwrap().code;
    for sequence in (1..=3000).chain([10_001, 10_002, 10_003, 10_005, 40_001]) {
        assert_eq!(code(sequence), 0, "sequence {sequence}");
    }
    let bad = acks[&10_004].status.as_ref().unwrap();
    assert_eq!(bad.code, Code::InvalidArgument as i32);
    assert_eq!(violated_fields(bad), ["events[3].body"]);
    for sequence in [30_001, 30_002] {
        let status = acks[&sequence].status.as_ref().unwrap();
        assert_eq!(status.code, Code::InvalidArgument as i32, "{sequence}");
        assert_eq!(violated_fields(status), ["events"]);
    }
    let stored = stored_events(gateway.emulator().unwrap(), "eh1", 4);
    assert_eq!(stored.len(), 3000 + 4 + 1);
    let mut last_by_key: HashMap<String, u64> = HashMap::new();
    for (_, message) in &stored {
        let Ok(Some(key)) = partition_key(message) else {
            continue;
        };
        let sequence: u64 = body_text(message).parse().unwrap();
        if let Some(previous) = last_by_key.insert(key.clone(), sequence) {
            assert!(previous < sequence, "{key}: {previous} before {sequence}");
        }
    }
    assert_eq!(last_by_key.len(), 7);
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_stream_stops_reading_at_its_unacked_limit() {
    let gateway = start_gateway(|config| config.limits.max_unacked_per_stream = 8).await;
    let emulator = gateway.emulator().unwrap();
    let mut client = gateway_client(&gateway).await;
    // Warm the route so the hub's size limit is known, then make every send take a while.
    send_text(&mut client, "warm").await.unwrap();
    emulator
        .faults()
        .delay_dispositions(Duration::from_millis(300));
    let (sender, receiver) = mpsc::channel(1);
    let mut responses = client
        .send_stream(ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    let body = "x".repeat(1000);
    let feeder = tokio::spawn(async move {
        for sequence in 1..=200u64 {
            let request = v1::SendStreamRequest {
                event_hub: String::new(),
                events: Vec::new(),
                sequence,
                event: Some(text_event(&body)),
            };
            if sender.send(request).await.is_err() {
                break;
            }
        }
    });
    let mut most_buffered = 0;
    let mut acked = 0;
    while acked < 200 {
        let buffered = gateway.state().producer().stats().buffered_bytes;
        most_buffered = most_buffered.max(buffered);
        match tokio::time::timeout(Duration::from_millis(20), responses.message()).await {
            Ok(Ok(Some(response))) => acked += response.acks.len(),
            Ok(other) => panic!("the stream ended early: {other:?}"),
            Err(_) => {}
        }
    }
    feeder.await.unwrap();
    // At most 8 events of ~1 KiB are in the producer at once; 200 would be ~200 KiB.
    assert!(most_buffered > 0);
    assert!(most_buffered <= 8 * 1100, "{most_buffered} bytes buffered");
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn per_client_and_global_rate_limits_answer_resource_exhausted_with_retry_info() {
    let gateway =
        start_gateway(|config| config.limits.client_events_per_second = NonZeroU32::new(50)).await;
    let mut client = gateway_client(&gateway).await;
    let batch = |n: usize| v1::SendEventsRequest {
        event_hub: String::new(),
        events: (0..n).map(|i| text_event(&i.to_string())).collect(),
    };
    client
        .send_events(with_client_id(batch(40), "a"))
        .await
        .unwrap();
    let refused = client
        .send_events(with_client_id(batch(40), "a"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let rich = rich_status(&refused);
    assert_eq!(error_reason(&rich), "RATE_LIMITED");
    assert!(
        rich.details
            .iter()
            .any(|any| any.type_url.ends_with("/google.rpc.RetryInfo"))
    );
    assert!(
        refused.message().contains("client:a"),
        "{}",
        refused.message()
    );
    // Another client has its own budget.
    client
        .send_events(with_client_id(batch(40), "b"))
        .await
        .unwrap();
    gateway.shutdown().await.unwrap();

    let gateway =
        start_gateway(|config| config.limits.global_events_per_second = NonZeroU32::new(50)).await;
    let mut client = gateway_client(&gateway).await;
    client
        .send_events(with_client_id(batch(40), "a"))
        .await
        .unwrap();
    let refused = client
        .send_events(with_client_id(batch(40), "b"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("global"),
        "{}",
        refused.message()
    );
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn calls_beyond_the_concurrency_limit_are_shed() {
    let gateway = start_gateway(|config| config.limits.max_concurrent_calls = 1).await;
    let mut client = gateway_client(&gateway).await;
    let (sender, receiver) = mpsc::channel(1);
    let open_stream = client
        .send_stream(ReceiverStream::new(receiver))
        .await
        .unwrap();
    let shed = send_text(&mut client, "x").await.unwrap_err();
    assert_eq!(shed.code(), Code::ResourceExhausted);
    assert_eq!(error_reason(&rich_status(&shed)), "OVERLOADED");
    drop(sender);
    drop(open_stream);
    // Once the stream is over, calls pass again.
    let mut passed = false;
    for _ in 0..50 {
        let outcome = send_text(&mut client, "y").await;
        if outcome.is_ok() {
            passed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(passed);
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn hub_properties_come_from_management() {
    let gateway = start_gateway(|_| {}).await;
    let mut client = gateway_client(&gateway).await;
    let properties = client
        .get_event_hub_properties(v1::GetEventHubPropertiesRequest {
            event_hub: "eh2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(properties.name, "eh2");
    assert_eq!(properties.partition_ids, ["0", "1", "2", "3"]);
    assert!(properties.created_at.unwrap().seconds > 1_600_000_000);
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn draining_ends_open_streams_after_their_acks_and_refuses_new_calls() {
    let gateway = start_gateway(|_| {}).await;
    let mut client = gateway_client(&gateway).await;
    let (sender, receiver) = mpsc::channel(16);
    let mut responses = client
        .send_stream(ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    for sequence in 1..=100u64 {
        sender
            .send(v1::SendStreamRequest {
                event_hub: String::new(),
                events: Vec::new(),
                sequence,
                event: Some(text_event(&sequence.to_string())),
            })
            .await
            .unwrap();
    }
    // Wait for the first ack so the events are surely read, then drain with the stream still open.
    let mut acked: Vec<u64> = responses
        .message()
        .await
        .unwrap()
        .unwrap()
        .acks
        .iter()
        .map(|ack| ack.sequence)
        .collect();
    gateway.state().start_draining();
    let refused = send_text(&mut client, "too late").await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert_eq!(error_reason(&rich_status(&refused)), "DRAINING");
    let shutdown = tokio::spawn(gateway.shutdown());
    let ended = loop {
        match responses.message().await {
            Ok(Some(response)) => acked.extend(response.acks.iter().map(|ack| ack.sequence)),
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    let status = ended.expect("a draining stream ends with a status");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(error_reason(&rich_status(&status)), "DRAINING");
    assert!(shutdown.await.unwrap().unwrap(), "drained in time");
    acked.sort_unstable();
    acked.dedup();
    assert_eq!(
        acked,
        (1..=100).collect::<Vec<_>>(),
        "every event read was acked"
    );
}

#[tokio::test]
async fn tls_and_mutual_tls_listeners_serve_only_trusted_peers() {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    let pki = TestPki::generate();
    let dir = tempfile::tempdir().unwrap();
    let tls = pki.server_tls(dir.path(), true);
    let gateway = start_gateway(|config| config.tls = Some(tls)).await;
    let url = format!("https://localhost:{}", gateway.local_addr().port());
    let connect = |identity: Option<Identity>| {
        let url = url.clone();
        let ca = pki.ca_pem.clone();
        async move {
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("localhost");
            if let Some(identity) = identity {
                tls = tls.identity(identity);
            }
            let channel = Channel::from_shared(url)
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await?;
            let mut client = v1::event_hub_gateway_client::EventHubGatewayClient::new(channel);
            send_text(&mut client, "secure")
                .await
                .map_err(|status| format!("{status:?}"))?;
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        }
    };
    connect(Some(Identity::from_pem(
        &pki.client_cert_pem,
        &pki.client_key_pem,
    )))
    .await
    .unwrap();
    assert!(
        connect(None).await.is_err(),
        "a client without a certificate is refused"
    );
    assert_eq!(
        stored_events(gateway.emulator().unwrap(), "eh1", 4).len(),
        1
    );
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn requests_beyond_the_size_limit_are_refused_and_gzip_is_accepted() {
    let gateway = start_gateway(|config| config.limits.max_request_bytes = 1088 * 1024).await;
    let mut client = gateway_client(&gateway).await;
    let big = v1::SendEventRequest {
        event_hub: String::new(),
        event: Some(v1::Event {
            body: Some(v1::event::Body::Binary(vec![7; 1200 * 1024].into())),
            ..Default::default()
        }),
    };
    let refused = client.send_event(big).await.unwrap_err();
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert!(
        refused.message().contains("1114112"),
        "names the limit: {refused:?}"
    );
    // A compressible event that is small once compressed is sent gzip-compressed.
    let mut compressing = gateway_client(&gateway)
        .await
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    send_text(&mut compressing, &"z".repeat(100_000))
        .await
        .unwrap();
    assert_eq!(
        stored_events(gateway.emulator().unwrap(), "eh1", 4).len(),
        1
    );
    gateway.shutdown().await.unwrap();
}

/// Runs `eventhub-gateway health ARGS...`; returns its exit code and what it printed.
async fn health_command(args: &[&str]) -> (Option<i32>, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_eventhub-gateway"))
        .arg("health")
        .args(args)
        .output()
        .await
        .expect("the binary runs");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), printed)
}

#[tokio::test]
async fn the_health_command_exits_0_when_serving_and_1_otherwise() {
    let gateway = start_gateway(|_| {}).await;
    let address = gateway.local_addr().to_string();
    wait_until_serving(&address).await;
    let (code, printed) = health_command(&["--address", &address, "--timeout", "5"]).await;
    assert_eq!((code, printed.trim()), (Some(0), "SERVING"));
    let (code, printed) = health_command(&[
        "--address",
        &format!("http://{address}"),
        "--service",
        "eventhub.gateway.v1.EventHubGateway",
    ])
    .await;
    assert_eq!(code, Some(0), "{printed}");
    // A service the gateway does not report on is an error, not a pass.
    let (code, printed) =
        health_command(&["--address", &address, "--service", "no.such.Service"]).await;
    assert_eq!(code, Some(1), "{printed}");
    assert!(printed.contains("NotFound"), "{printed}");
    gateway.shutdown().await.unwrap();

    // Nothing listens on a port just released: the command fails fast, naming the address.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let started = std::time::Instant::now();
    let (code, printed) = health_command(&["--address", &closed, "--timeout", "5"]).await;
    assert_eq!(code, Some(1), "{printed}");
    assert!(printed.contains(&closed), "{printed}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_connection_gets_at_most_http2_max_concurrent_streams_calls_at_once() {
    let gateway = start_gateway(|config| config.limits.http2_max_concurrent_streams = 1).await;
    let mut client = gateway_client(&gateway).await;
    // Learn the server's SETTINGS first, so the client holds further calls back rather than racing them.
    send_text(&mut client, "first").await.unwrap();
    let (sender, receiver) = mpsc::channel(1);
    let mut open = client
        .send_stream(ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    // The stream holds the connection's one call: a second call on it waits...
    let mut second = client.clone();
    let waiting = tokio::spawn(async move { send_text(&mut second, "second").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "a second call ran beside the open stream"
    );
    // ...and goes once the stream ends.
    drop(sender);
    while open.message().await.unwrap().is_some() {}
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting call went once the stream ended")
        .unwrap()
        .unwrap();
    gateway.shutdown().await.unwrap();
}

// ------------------------------------------------------------------------------------------------------------
// How a stream ends: every event read is acknowledged exactly once before any ending the client can hear.
// ------------------------------------------------------------------------------------------------------------

/// One gRPC frame: the compressed flag, the length and the bytes (`length` may lie, to cut a message short).
fn grpc_frame(compressed: bool, length: usize, bytes: &[u8]) -> Vec<u8> {
    let mut frame = vec![u8::from(compressed)];
    frame.extend_from_slice(&(length as u32).to_be_bytes());
    frame.extend_from_slice(bytes);
    frame
}

/// A stream message of one text event, encoded.
fn encoded_message(sequence: u64, text: &str) -> Vec<u8> {
    use prost::Message;
    v1::SendStreamRequest {
        sequence,
        event: Some(text_event(text)),
        ..Default::default()
    }
    .encode_to_vec()
}

/// A request body sent in one piece, then closed: a client that half-closes after its last bytes.
struct RawBody(Option<bytes::Bytes>);

impl http_body::Body for RawBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.take().map(|bytes| Ok(http_body::Frame::data(bytes))))
    }
}

/// Calls SendStream with a hand-made body (bytes no gRPC library would send) and `grpc-encoding` if given;
/// returns every ack and the call's final status.
async fn raw_send_stream(
    gateway: &eventhub_gateway::server::RunningGateway,
    encoding: Option<&str>,
    body: Vec<u8>,
) -> (Vec<v1::StreamAck>, tonic::Status) {
    use prost::Message;
    use tower::ServiceExt;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", gateway.local_addr()))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut request = http::Request::builder()
        .method("POST")
        .uri("/eventhub.gateway.v1.EventHubGateway/SendStream")
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(encoding) = encoding {
        request = request.header("grpc-encoding", encoding);
    }
    let request = request
        .body(tonic::body::Body::new(RawBody(Some(body.into()))))
        .unwrap();
    let response = tokio::time::timeout(TIMEOUT, channel.oneshot(request))
        .await
        .expect("answered in time")
        .unwrap();
    let (parts, mut body) = response.into_parts();
    let mut data = Vec::new();
    let mut trailers = parts.headers.clone();
    loop {
        let frame = tokio::time::timeout(
            TIMEOUT,
            std::future::poll_fn(|cx| {
                http_body::Body::poll_frame(std::pin::Pin::new(&mut body), cx)
            }),
        )
        .await
        .expect("the stream ends in time");
        match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(bytes) => data.extend_from_slice(&bytes),
                Err(frame) => trailers.extend(frame.into_trailers().unwrap()),
            },
            Some(Err(error)) => panic!("the response broke: {error}"),
            None => break,
        }
    }
    let mut acks = Vec::new();
    let mut rest = data.as_slice();
    while !rest.is_empty() {
        let length = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        acks.extend(
            v1::SendStreamResponse::decode(&rest[5..5 + length])
                .unwrap()
                .acks,
        );
        rest = &rest[5 + length..];
    }
    let status = tonic::Status::from_header_map(&trailers).expect("a grpc-status trailer");
    (acks, status)
}

/// Asserts the stream's events before the fault were acked once each, OK, and the call ended with `code` and
/// the gateway's `reason`, saying how far it got; returns the status.
fn assert_ended_after_acks(
    acks: &[v1::StreamAck],
    acked_before: &[u64],
    status: &tonic::Status,
    code: Code,
    reason: &str,
) -> eventhub_gateway::proto::google::rpc::Status {
    let mut sequences: Vec<u64> = acks.iter().map(|ack| ack.sequence).collect();
    sequences.sort_unstable();
    assert_eq!(
        sequences, acked_before,
        "each event read is acked exactly once"
    );
    for ack in acks {
        assert_eq!(ack.status.as_ref().unwrap().code, 0, "{ack:?}");
    }
    assert_eq!(status.code(), code, "{status:?}");
    let rich = rich_status(status);
    assert_eq!(error_reason(&rich), reason, "{status:?}");
    let metadata = error_metadata(&rich);
    assert_eq!(
        metadata.get("messages_read").map(String::as_str),
        Some(acked_before.len().to_string().as_str()),
        "{status:?}"
    );
    if let Some(last) = acked_before.last() {
        assert_eq!(metadata["last_sequence"], last.to_string(), "{status:?}");
    }
    rich
}

#[tokio::test]
async fn a_stream_message_over_max_request_bytes_ends_the_stream_with_out_of_range_after_the_acks_before_it()
 {
    let gateway = start_gateway(|config| config.limits.max_request_bytes = 1088 * 1024).await;
    let mut client = gateway_client(&gateway).await;
    let message = |sequence: u64, event: v1::Event| v1::SendStreamRequest {
        sequence,
        event: Some(event),
        ..Default::default()
    };
    let big = v1::Event {
        body: Some(v1::event::Body::Binary(vec![7; 1200 * 1024].into())),
        ..Default::default()
    };
    let requests = vec![
        message(1, text_event("small")),
        message(2, text_event("small too")),
        message(3, big),
        message(4, text_event("after the big one")),
    ];
    let (acks, ended) = stream_events(&mut client, requests).await;
    let status = ended.expect_err("the stream ends with an error, not OK");
    let acks: Vec<_> = acks.into_values().collect();
    let rich = assert_ended_after_acks(
        &acks,
        &[1, 2],
        &status,
        Code::OutOfRange,
        "REQUEST_TOO_LARGE",
    );
    assert_eq!(error_metadata(&rich)["limit"], (1088 * 1024).to_string());
    assert!(
        status
            .message()
            .contains("max_request_bytes (1114112 bytes)"),
        "{status:?}"
    );
    assert_eq!(
        stored_events(gateway.emulator().unwrap(), "eh1", 4).len(),
        2
    );
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn unreadable_stream_messages_end_the_stream_with_invalid_argument_after_the_acks_before_them()
 {
    let gateway = start_gateway(|_| {}).await;
    let first = encoded_message(1, "readable");
    let second = encoded_message(2, "readable too");
    let good = [
        grpc_frame(false, first.len(), &first),
        grpc_frame(false, second.len(), &second),
    ]
    .concat();
    // Field 1 (event_hub) says 127 bytes follow; none do.
    let undecodable = grpc_frame(false, 2, &[0x0a, 0x7f]);
    // Flagged compressed in a gzip stream, but not gzip.
    let not_gzip = grpc_frame(true, 4, b"nope");
    // Announces 100 bytes, then the client half-closes after 3.
    let cut_short = grpc_frame(false, 100, &second[..3]);
    let cases = [
        ("undecodable protobuf", None, undecodable),
        ("bad compression", Some("gzip"), not_gzip),
        ("a message cut short", None, cut_short),
    ];
    for (case, encoding, bad) in cases {
        let (acks, status) =
            raw_send_stream(&gateway, encoding, [good.clone(), bad].concat()).await;
        let rich = assert_ended_after_acks(
            &acks,
            &[1, 2],
            &status,
            Code::InvalidArgument,
            "MALFORMED_REQUEST",
        );
        assert!(
            rich.message
                .contains("after 2 messages read (the last with sequence 2) cannot be read"),
            "{case}: {}",
            rich.message
        );
    }
    // Three streams of two readable events each.
    assert_eq!(
        stored_events(gateway.emulator().unwrap(), "eh1", 4).len(),
        6
    );
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_streams_deadline_ends_it_with_deadline_exceeded_after_acking_every_event_read() {
    let gateway =
        start_gateway(|config| config.producer.send_timeout = Duration::from_secs(30)).await;
    let mut client = gateway_client(&gateway).await;
    send_text(&mut client, "warm").await.unwrap();
    let (sender, receiver) = mpsc::channel(16);
    let mut request = tonic::Request::new(ReceiverStream::new(receiver));
    request.set_timeout(Duration::from_millis(1500));
    let mut responses = client.send_stream(request).await.unwrap().into_inner();
    let send = |sequence: u64| v1::SendStreamRequest {
        sequence,
        event: Some(text_event(&sequence.to_string())),
        ..Default::default()
    };
    sender.send(send(1)).await.unwrap();
    let first = responses.message().await.unwrap().unwrap().acks;
    assert_eq!(
        first.iter().map(|ack| ack.sequence).collect::<Vec<_>>(),
        [1]
    );
    // Event Hubs now answers after the deadline: event 2 is in flight when it passes.
    gateway
        .emulator()
        .unwrap()
        .faults()
        .delay_dispositions(Duration::from_secs(5));
    sender.send(send(2)).await.unwrap();
    let mut acks = first;
    let ended = tokio::time::timeout(TIMEOUT, async {
        loop {
            match responses.message().await {
                Ok(Some(response)) => acks.extend(response.acks),
                Ok(None) => break None,
                Err(status) => break Some(status),
            }
        }
    })
    .await
    .expect("the gateway ends the stream at its deadline");
    // The stream is still open on the client's side: only the deadline ended it.
    drop(sender);
    let status = ended.expect("the stream ends with an error, not OK");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let rich = rich_status(&status);
    assert_eq!(error_reason(&rich), "DEADLINE_EXCEEDED");
    assert_eq!(error_metadata(&rich)["messages_read"], "2");
    let mut sequences: Vec<u64> = acks.iter().map(|ack| ack.sequence).collect();
    sequences.sort_unstable();
    assert_eq!(sequences, [1, 2], "every event read is acked exactly once");
    // Event 2 was on the wire when the deadline passed: Event Hubs may store it, and its ack says so.
    let late = acks.iter().find(|ack| ack.sequence == 2).unwrap();
    let late = late.status.as_ref().unwrap();
    assert_eq!(late.code, Code::Unknown as i32, "{late:?}");
    assert_eq!(error_reason(late), "OUTCOME_UNKNOWN");
    gateway.emulator().unwrap().faults().clear();
}

#[tokio::test]
async fn a_cancelled_stream_stops_waiting_for_its_events_at_once() {
    let gateway =
        start_gateway(|config| config.producer.send_timeout = Duration::from_secs(60)).await;
    let mut client = gateway_client(&gateway).await;
    send_text(&mut client, "warm").await.unwrap();
    let (sender, receiver) = mpsc::channel(16);
    let mut responses = client
        .send_stream(ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    let send = |sequence: u64| v1::SendStreamRequest {
        sequence,
        event: Some(text_event(&sequence.to_string())),
        ..Default::default()
    };
    let mut acked = Vec::new();
    for sequence in 1..=3 {
        sender.send(send(sequence)).await.unwrap();
        let response = responses.message().await.unwrap().unwrap();
        acked.extend(response.acks.iter().map(|ack| ack.sequence));
    }
    assert_eq!(
        acked,
        [1, 2, 3],
        "each acked exactly once, before the cancel"
    );
    // Event 4 waits on Event Hubs for 30 s when the client cancels (drops the call).
    gateway
        .emulator()
        .unwrap()
        .faults()
        .delay_dispositions(Duration::from_secs(30));
    sender.send(send(4)).await.unwrap();
    assert!(
        eventually(|| async { gateway.state().producer().stats().buffered_bytes > 0 }).await,
        "event 4 reached the producer"
    );
    drop(responses);
    drop(sender);
    // The stream's task ends now, not when Event Hubs answers event 4.
    tokio::time::timeout(Duration::from_secs(5), gateway.state().streams_ended())
        .await
        .expect("the cancelled stream stopped waiting for its events");
    gateway.emulator().unwrap().faults().clear();
}

#[tokio::test]
async fn a_poison_event_fails_alone_and_its_batch_mates_are_stored() {
    let gateway = start_gateway(|config| config.producer.linger = Duration::from_millis(50)).await;
    let emulator = gateway.emulator().unwrap();
    // A rule only Event Hubs knows (here an injected one): the gateway cannot refuse the event first.
    emulator.faults().refuse_events_containing(Some(b"POISON"));
    let clients = 40;
    let per_client = 25;
    let normal = (0..clients).map(|c| {
        let gateway = &gateway;
        async move {
            let mut client = gateway_client(gateway).await;
            let mut failed = Vec::new();
            for n in 0..per_client {
                if let Err(status) = send_text(&mut client, &format!("c{c}-{n}")).await {
                    failed.push(status);
                }
            }
            failed
        }
    });
    let poison = async {
        tokio::time::sleep(Duration::from_millis(120)).await;
        let mut client = gateway_client(&gateway).await;
        let crowded = v1::Event {
            properties: (0..32_769)
                .map(|n| (format!("p{n}"), String::new()))
                .collect(),
            ..text_event("crowded")
        };
        let request = v1::SendEventsRequest {
            event_hub: String::new(),
            events: vec![text_event("POISON"), crowded, text_event("fine")],
        };
        client
            .send_events(request)
            .await
            .unwrap()
            .into_inner()
            .results
    };
    let (failed, results) = tokio::join!(futures_util::future::join_all(normal), poison);
    let failed: Vec<_> = failed.into_iter().flatten().collect();
    assert!(
        failed.is_empty(),
        "{} batch-mates failed: {:?}",
        failed.len(),
        failed.first()
    );
    let status = |index: usize| results[index].status.clone().unwrap_or_default();
    // Refused by Event Hubs once alone: its own refusal, as an invalid event.
    assert_eq!(
        status(0).code,
        Code::InvalidArgument as i32,
        "{:?}",
        status(0)
    );
    assert_eq!(error_reason(&status(0)), "INVALID_EVENT");
    assert_eq!(violated_fields(&status(0)), ["events[0]"]);
    // Refused by the gateway, naming the field and the rule.
    assert_eq!(status(1).code, Code::InvalidArgument as i32);
    assert_eq!(violated_fields(&status(1)), ["events[1].properties"]);
    assert!(
        status(1).message.contains("at most 1024"),
        "{}",
        status(1).message
    );
    assert_eq!(status(2).code, Code::Ok as i32);
    let stored: usize = (0..4)
        .map(|p| {
            emulator
                .partition_events("eh1", &p.to_string())
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(stored, clients * per_client + 1, "every normal event, once");
    let splits = sample_value(
        &scrape(&gateway).await,
        "eventhub_gateway_batch_splits_total",
        &[("event_hub", "eh1")],
    );
    assert!(splits.is_some_and(|n| n >= 1.0), "{splits:?}");
    gateway.shutdown().await.unwrap();
}
