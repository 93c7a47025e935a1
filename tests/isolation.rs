//! One client never hurts another: deadlines stay with their own events, and an event is never answered as
//! failed when Event Hubs may have stored it.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use eventhub_gateway::proto::v1;
use eventhub_producer::{Event, ProducerConfig, SendError};
use futures_util::StreamExt;
use support::*;
use tonic::Code;

/// The gateway's own ErrorInfo reason of a failed call; `None` when the status was made by the gRPC layer
/// (a client-side deadline, a cancellation), which carries no details.
fn gateway_reason(status: &tonic::Status) -> Option<String> {
    (!status.details().is_empty()).then(|| error_reason(&rich_status(status)))
}

fn request(text: &str, timeout: Duration) -> tonic::Request<v1::SendEventRequest> {
    let mut request = tonic::Request::new(v1::SendEventRequest {
        event_hub: String::new(),
        event: Some(text_event(text)),
    });
    request.set_timeout(timeout);
    request
}

/// Bodies stored in `eh1` of the gateway's emulator.
fn stored_bodies(gateway: &eventhub_gateway::server::RunningGateway) -> HashSet<String> {
    let emulator = gateway.emulator().expect("an in-process emulator");
    stored_events(emulator, "eh1", 4)
        .iter()
        .map(|(_, message)| body_text(message))
        .collect()
}

#[tokio::test]
async fn one_callers_short_deadline_fails_none_of_another_callers_events() {
    let gateway = start_gateway(|_| {}).await;
    // Batches stay on the wire a little while, so the two callers' keyless events share batches in flight.
    gateway
        .emulator()
        .unwrap()
        .faults()
        .delay_dispositions(Duration::from_millis(20));
    let hurried = gateway_client(&gateway).await;
    let patient = gateway_client(&gateway).await;
    let (rounds, width) = (6, 50);
    let run = |client: v1::event_hub_gateway_client::EventHubGatewayClient<_>,
               name: &'static str,
               timeout: Duration| {
        tokio::spawn(async move {
            let mut results = Vec::new();
            for round in 0..rounds {
                let calls = (0..width).map(|index| {
                    let mut client = client.clone();
                    let body = format!("{name}-{round}-{index}");
                    async move {
                        let result = client.send_event(request(&body, timeout)).await;
                        (body, result)
                    }
                });
                results.extend(futures_util::future::join_all(calls).await);
            }
            results
        })
    };
    let hurried = run(hurried, "hurried", Duration::from_millis(1));
    let patient = run(patient, "patient", Duration::from_secs(20));
    let (hurried, patient) = (hurried.await.unwrap(), patient.await.unwrap());

    let failed: Vec<_> = patient
        .iter()
        .filter_map(|(body, result)| result.as_ref().err().map(|status| (body, status)))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} patient events failed beside a 1 ms caller, e.g. {:?}",
        failed.len(),
        patient.len(),
        failed.first()
    );
    // Every event the gateway answered is settled now; wait out the batches of events whose calls timed out.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stored = stored_bodies(&gateway);
    for (body, _) in &patient {
        assert!(stored.contains(body), "{body} answered OK but not stored");
    }
    let mut refused_by_gateway = 0;
    for (body, result) in &hurried {
        match result {
            Ok(_) => assert!(stored.contains(body), "{body} answered OK but not stored"),
            Err(status) => match gateway_reason(status).as_deref() {
                Some("DEADLINE_EXCEEDED") => {
                    refused_by_gateway += 1;
                    assert!(
                        !stored.contains(body),
                        "{body} answered DEADLINE_EXCEEDED by the gateway but stored"
                    );
                }
                // Sent, but the deadline came before the outcome: it may or may not be stored.
                Some("OUTCOME_UNKNOWN") => {}
                // The gRPC layer's own answer at the deadline: the event may or may not be stored.
                None => assert!(
                    matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded),
                    "{status:?}"
                ),
                Some(other) => panic!("{body}: unexpected {other}: {status:?}"),
            },
        }
    }
    assert!(
        hurried.iter().any(|(_, result)| result.is_err()),
        "no 1 ms call failed: the test did not exercise a short deadline"
    );
    println!("1 ms caller: {refused_by_gateway} events refused by the gateway, none stored");
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_event_whose_deadline_passes_while_it_waits_is_refused_and_never_sent() {
    let gateway = start_gateway(|_| {}).await;
    let mut client = gateway_client(&gateway).await;
    send_text(&mut client, "warm").await.unwrap();
    gateway
        .emulator()
        .unwrap()
        .faults()
        .delay_dispositions(Duration::from_millis(1500));
    let keyed = |text: &str, timeout| {
        let mut request = request(text, timeout);
        request.get_mut().event.as_mut().unwrap().partition_key = "one-key".into();
        request
    };
    // A key has one batch in flight at a time, so the second event waits behind the first.
    let mut first_client = client.clone();
    let first = tokio::spawn(async move {
        first_client
            .send_event(keyed("first", Duration::from_secs(20)))
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = client
        .send_event(keyed("second", Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(
        gateway_reason(&status).as_deref(),
        Some("DEADLINE_EXCEEDED")
    );
    first.await.unwrap().expect("the first event is accepted");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stored = stored_bodies(&gateway);
    assert!(stored.contains("first"));
    assert!(
        !stored.contains("second"),
        "an event answered DEADLINE_EXCEEDED was sent after all"
    );
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_batch_on_the_wire_past_the_send_timeout_is_answered_outcome_unknown() {
    let gateway =
        start_gateway(|config| config.producer.send_timeout = Duration::from_millis(800)).await;
    let mut client = gateway_client(&gateway).await;
    send_text(&mut client, "warm").await.unwrap();
    gateway
        .emulator()
        .unwrap()
        .faults()
        .delay_dispositions(Duration::from_millis(1500));
    let status = client
        .send_event(request("in doubt", Duration::from_secs(30)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unknown, "{status:?}");
    assert_eq!(gateway_reason(&status).as_deref(), Some("OUTCOME_UNKNOWN"));
    assert!(
        status.message().contains("may have been stored"),
        "{status:?}"
    );
    // ... and so it was: the disposition was only late.
    assert!(eventually(|| async { stored_bodies(&gateway).contains("in doubt") }).await);
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_event_on_the_wire_gets_its_real_outcome_after_its_deadline() {
    let fx = Fixture::builder(&["eh1:2"])
        .producer(|config| *config = ProducerConfig::default())
        .start()
        .await;
    let producer = fx.producer();
    producer.send("eh1", Event::text("warm")).await.unwrap();
    fx.faults().delay_dispositions(Duration::from_millis(800));
    let started = Instant::now();
    let deadline = started + Duration::from_millis(200);
    let outcome = producer
        .send_with_deadline("eh1", Event::text("late but true"), deadline)
        .await;
    assert!(
        outcome.is_ok(),
        "an event on the wire was answered {outcome:?} at its deadline"
    );
    assert!(started.elapsed() >= Duration::from_millis(800));
    assert!(
        fx.stored_bodies("eh1")
            .contains(&"late but true".to_owned())
    );
    // Before its batch goes out, the deadline still answers (and the event is never sent).
    fx.faults().delay_dispositions(Duration::ZERO);
    let past = Instant::now() - Duration::from_millis(1);
    let outcome = producer
        .send_with_deadline("eh1", Event::text("too late"), past)
        .await;
    assert!(
        matches!(outcome, Err(SendError::DeadlineExceeded { .. })),
        "{outcome:?}"
    );
    producer.close().await;
    assert!(!fx.stored_bodies("eh1").contains(&"too late".to_owned()));
}

/// `SendEvents` requests of `per_request` events, each with a partition key never used before.
async fn send_distinct_keys(
    client: &v1::event_hub_gateway_client::EventHubGatewayClient<tonic::transport::Channel>,
    prefix: &str,
    requests: usize,
    per_request: usize,
) {
    let calls = (0..requests).map(|request| {
        let mut client = client.clone();
        let events: Vec<_> = (0..per_request)
            .map(|index| v1::Event {
                partition_key: format!("{prefix}-{request}-{index}"),
                ..text_event("k")
            })
            .collect();
        async move {
            let results = client
                .send_events(v1::SendEventsRequest {
                    event_hub: String::new(),
                    events,
                })
                .await
                .expect("the call succeeds")
                .into_inner()
                .results;
            for result in results {
                let status = result.status.expect("a status per event");
                assert_eq!(status.code, 0, "{status:?}");
            }
        }
    });
    // Eight calls at a time.
    let mut calls = futures_util::stream::iter(calls).buffer_unordered(8);
    while calls.next().await.is_some() {}
}

#[tokio::test]
async fn a_flood_of_distinct_keys_costs_batching_speed_not_memory() {
    // The bound of the routes: 64 here, so that their cost cannot hide under the RSS bound below.
    let gateway =
        GatewayProcess::start_emulated(&[], &[("EVENTHUB_GATEWAY_PRODUCER__MAX_ROUTES", "64")]);
    let client = gateway.client().await;
    send_distinct_keys(&client, "warm", 4, 500).await;
    let before = gateway.rss_bytes();
    let keys = 40_000;
    send_distinct_keys(&client, "flood", keys / 500, 500).await;
    let grown = gateway.rss_bytes().saturating_sub(before);
    println!(
        "{keys} distinct keys: RSS {} MiB -> +{} MiB",
        before >> 20,
        grown >> 20
    );
    // Without the bound each key kept a route (about 8 KiB) until max_idle_seconds: +300 MiB here. What
    // remains is the emulator's store of 40,000 small events and allocator slack.
    assert!(
        grown < 64 << 20,
        "RSS grew {} MiB for {keys} keys",
        grown >> 20
    );
}

/// A `SendStream` call held open by its request sender; dropping the sender half-closes the call.
type HeldStream = (
    tokio::sync::mpsc::Sender<v1::SendStreamRequest>,
    tonic::Streaming<v1::SendStreamResponse>,
);

/// Opens `count` `SendStream` calls that send nothing from `client`, and returns those the gateway took and
/// the statuses of those it refused.
async fn idle_streams(
    client: &mut v1::event_hub_gateway_client::EventHubGatewayClient<tonic::transport::Channel>,
    count: usize,
) -> (Vec<HeldStream>, Vec<tonic::Status>) {
    let mut open = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..count {
        let (sender, receiver) = tokio::sync::mpsc::channel(1);
        let requests = tokio_stream::wrappers::ReceiverStream::new(receiver);
        match client.send_stream(requests).await {
            Ok(response) => open.push((sender, response.into_inner())),
            Err(status) => refused.push(status),
        }
    }
    (open, refused)
}

#[tokio::test]
async fn one_client_holding_idle_streams_takes_only_its_share_of_the_call_slots() {
    let gateway = start_gateway(|config| {
        config.limits.max_concurrent_calls = 60;
        config.limits.max_calls_per_client = 20;
    })
    .await;
    let server = gateway.local_addr();
    // The attacker spreads its streams over several connections, all from one address.
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..3 {
        let mut attacker = client_from(server, [127, 0, 0, 2].into(), None).await;
        let (open, shed) = idle_streams(&mut attacker, 20).await;
        held.extend(open);
        refused.extend(shed);
    }
    assert_eq!(held.len(), 20, "the attacker holds its share, no more");
    assert_eq!(refused.len(), 40);
    for status in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert_eq!(gateway_reason(status).as_deref(), Some("OVERLOADED"));
        assert!(
            status.message().contains("limits.max_calls_per_client"),
            "{status:?}"
        );
    }
    let samples = scrape(&gateway).await;
    assert_eq!(
        sample_value(
            &samples,
            "eventhub_gateway_shed_calls_total",
            &[("bound", "per_client")]
        ),
        Some(40.0)
    );
    let mut other = client_from(server, [127, 0, 0, 3].into(), None).await;
    other
        .send_event(request("another client", Duration::from_secs(10)))
        .await
        .expect("another client is still served");
    let (others_streams, others_refused) = idle_streams(&mut other, 20).await;
    assert_eq!(
        (others_streams.len(), others_refused.len()),
        (20, 0),
        "another client gets its own share"
    );
    drop(held);
    let attacker = client_from(server, [127, 0, 0, 2].into(), None).await;
    assert!(
        eventually(|| {
            let mut attacker = attacker.clone();
            async move {
                attacker
                    .send_event(request("after", Duration::from_secs(10)))
                    .await
                    .is_ok()
            }
        })
        .await,
        "closed calls give the client its share back"
    );
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn one_client_holds_at_most_its_share_of_connections() {
    let gateway = start_gateway(|config| config.limits.max_connections_per_client = 3).await;
    let server = gateway.local_addr();
    let greedy = [127, 0, 0, 6].into();
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut client = client_from(server, greedy, None).await;
        client
            .send_event(request("within the share", Duration::from_secs(10)))
            .await
            .expect("a connection within the share is served");
        held.push(client);
    }
    // The fourth is closed as it is accepted: whether the handshake or the first call notices, it fails.
    let refused = match try_client_from(server, greedy, None).await {
        Ok(mut client) => client
            .send_event(request("beyond the share", Duration::from_secs(10)))
            .await
            .is_err(),
        Err(_) => true,
    };
    assert!(refused, "a connection beyond the share is not served");
    let mut other = client_from(server, [127, 0, 0, 7].into(), None).await;
    other
        .send_event(request("another client", Duration::from_secs(10)))
        .await
        .expect("another address has its own share");
    drop(held);
    assert!(
        eventually(|| async {
            match try_client_from(server, greedy, None).await {
                Ok(mut client) => client
                    .send_event(request("after", Duration::from_secs(10)))
                    .await
                    .is_ok(),
                Err(_) => false,
            }
        })
        .await,
        "closed connections give the client its share back"
    );
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_idle_stream_is_ended_with_stream_idle_after_its_acks() {
    let gateway =
        start_gateway(|config| config.limits.stream_idle_timeout = Duration::from_millis(500))
            .await;
    let mut client = gateway_client(&gateway).await;
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let mut responses = client
        .send_stream(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    sender
        .send(v1::SendStreamRequest {
            sequence: 7,
            event: Some(text_event("then silence")),
            ..Default::default()
        })
        .await
        .unwrap();
    let first = responses.message().await.unwrap().expect("the ack");
    assert_eq!(first.acks[0].sequence, 7);
    assert_eq!(first.acks[0].status.as_ref().map(|s| s.code), Some(0));
    // The client keeps its end open and sends nothing more.
    let ended = responses.message().await.expect_err("the stream ends");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    let rich = rich_status(&ended);
    assert_eq!(error_reason(&rich), "STREAM_IDLE");
    assert!(
        ended
            .message()
            .contains("limits.stream_idle_timeout_seconds"),
        "{ended:?}"
    );
    drop(sender);
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn clients_that_never_read_their_answers_cannot_hold_up_the_drain() {
    let mut gateway =
        GatewayProcess::start_emulated(&[], &[("EVENTHUB_GATEWAY_DRAIN_TIMEOUT_SECONDS", "20")]);
    // A window of 0: the gateway can send this client headers but never a message.
    let mut stuck = client_from(gateway.address, [127, 0, 0, 4].into(), Some(0)).await;
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    let _responses = stuck
        .send_stream(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await
        .expect("the stream opens");
    for sequence in 1..=5 {
        sender
            .send(v1::SendStreamRequest {
                sequence,
                event: Some(text_event("never read")),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let mut unary = stuck.clone();
    let waiting = tokio::spawn(async move {
        unary
            .send_event(request("answer never read", Duration::from_secs(30)))
            .await
    });
    // The gateway has the events (stored, answers pending) before it is told to stop.
    let mut normal = gateway.client().await;
    normal
        .send_event(request("normal", Duration::from_secs(10)))
        .await
        .expect("a normal call");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = tokio::task::spawn_blocking(move || {
        let status = gateway.terminate(Duration::from_secs(60));
        (status, gateway)
    })
    .await
    .unwrap()
    .0
    .expect("the gateway exits within the test's bound");
    assert!(
        status.success(),
        "every accepted event was answered, so the drain succeeds: {status}"
    );
    waiting.abort();
    drop(sender);
}
