//! The producer core against the in-process emulator: outcomes, batching, routing, retries, faults, pool knobs.

mod support;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventhub_gateway::emulator::EmulatorConfig;
use eventhub_gateway::eventhubs::message::partition_key;
use eventhub_gateway::eventhubs::partition::partition_for_key;
use eventhub_gateway::producer::ConnectStage;
use eventhub_gateway::producer::{
    AmqpCondition, Event, Producer, ProducerConfig, SendError, TraceContext,
};
use fe2o3_amqp_types::messaging::MessageId;
use fe2o3_amqp_types::primitives::SimpleValue;
use futures_util::future::join_all;
use support::*;

fn base() -> ProducerConfig {
    ProducerConfig {
        send_timeout: Duration::from_secs(20),
        retry_initial_backoff: Duration::from_millis(20),
        retry_max_backoff: Duration::from_millis(200),
        ..ProducerConfig::default()
    }
}

/// Sends `count` events concurrently, body `prefix-i`, and returns their outcomes in order.
async fn send_many(
    producer: &Producer,
    hub: &str,
    count: usize,
    event: impl Fn(usize) -> Event,
) -> Vec<Result<eventhub_gateway::producer::Receipt, SendError>> {
    join_all((0..count).map(|i| producer.send(hub, event(i)))).await
}

fn application_property(
    message: &eventhub_gateway::eventhubs::message::AmqpMessage,
    name: &str,
) -> Option<String> {
    match message.application_properties.as_ref()?.0.get(name)? {
        SimpleValue::String(value) => Some(value.clone()),
        _ => None,
    }
}

#[tokio::test]
async fn an_event_arrives_with_every_field() {
    let emulator = start(&["eh1:2"]).await;
    let producer = producer(&emulator, base());
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let receipt = producer
        .send(
            "eh1",
            Event::json(&serde_json::json!({"order": 7}))
                .with_partition_id("1")
                .with_property("colour", "blue")
                .with_message_id("m-1")
                .with_correlation_id("c-1")
                .with_trace_context(TraceContext::parse(traceparent, Some("k=v")).unwrap()),
        )
        .await
        .expect("accepted");
    assert_eq!(receipt.partition_id.as_deref(), Some("1"));
    let stored = emulator.partition_events("eh1", "1").unwrap();
    assert_eq!(stored.len(), 1);
    let message = eventhub_gateway::emulator::decode_stored_event(&stored[0]).unwrap();
    assert_eq!(body_text(&message), r#"{"order":7}"#);
    let properties = message.properties.clone().unwrap();
    assert_eq!(
        properties.content_type.unwrap().as_str(),
        "application/json"
    );
    assert_eq!(properties.message_id, Some(MessageId::String("m-1".into())));
    assert_eq!(
        properties.correlation_id,
        Some(MessageId::String("c-1".into()))
    );
    assert_eq!(
        application_property(&message, "colour").as_deref(),
        Some("blue")
    );
    assert_eq!(
        application_property(&message, "Diagnostic-Id").as_deref(),
        Some(traceparent)
    );
    assert_eq!(
        application_property(&message, "traceparent").as_deref(),
        Some(traceparent)
    );
    assert_eq!(
        application_property(&message, "tracestate").as_deref(),
        Some("k=v")
    );
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn concurrent_events_share_batches_and_all_arrive() {
    let emulator = start(&["eh1:4"]).await;
    let producer = producer(
        &emulator,
        ProducerConfig {
            linger: Duration::from_millis(50),
            ..base()
        },
    );
    let outcomes = send_many(&producer, "eh1", 2000, |i| Event::text(format!("e-{i}"))).await;
    assert!(
        outcomes.iter().all(Result::is_ok),
        "{:?}",
        outcomes.iter().find(|o| o.is_err())
    );
    let stored = stored_events(&emulator, "eh1", 4);
    let mut bodies: Vec<String> = stored.iter().map(|(_, m)| body_text(m)).collect();
    bodies.sort();
    let mut expected: Vec<String> = (0..2000).map(|i| format!("e-{i}")).collect();
    expected.sort();
    assert_eq!(bodies, expected, "every event stored exactly once");
    let transfers = emulator.faults().transfers_seen();
    assert!(
        transfers < 100,
        "2000 events in {transfers} transfers: batches were shared"
    );
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn a_batch_never_exceeds_the_link_limit() {
    let mut config_64k = support::config(&["eh1:1"]);
    config_64k.max_message_size = 64 * 1024;
    let emulator = start_with(config_64k).await;
    let producer = producer(
        &emulator,
        ProducerConfig {
            linger: Duration::from_millis(100),
            ..base()
        },
    );
    // 200 events of 1 KiB: at least four batches of at most 64 KiB, none refused for size.
    let outcomes = send_many(&producer, "eh1", 200, |i| {
        Event::binary(vec![i as u8; 1024])
    })
    .await;
    assert!(
        outcomes.iter().all(Result::is_ok),
        "{:?}",
        outcomes.iter().find(|o| o.is_err())
    );
    assert_eq!(emulator.partition_events("eh1", "0").unwrap().len(), 200);
    assert!(emulator.faults().transfers_seen() >= 4);
    // Alone too large: refused up front, with the limit.
    let error = producer
        .send("eh1", Event::binary(vec![0; 70 * 1024]))
        .await
        .unwrap_err();
    assert!(
        matches!(error, SendError::TooLarge { limit: 65536, .. }),
        "{error}"
    );
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn keys_land_where_the_service_hashes_them_in_order() {
    let emulator = start(&["eh1:8"]).await;
    let producer = producer(&emulator, base());
    let keys: Vec<String> = (0..20).map(|k| format!("key-{k}")).collect();
    // Enqueued one after another (the order is defined), settled concurrently.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut tickets = Vec::new();
    for i in 0..400 {
        let key = keys[i % keys.len()].clone();
        let event = Event::text(format!("{key}:{i}")).with_partition_key(key);
        tickets.push(
            producer
                .enqueue("eh1", event, deadline)
                .await
                .expect("enqueued"),
        );
    }
    let outcomes = join_all(tickets).await;
    assert!(outcomes.iter().all(Result::is_ok));
    let stored = stored_events(&emulator, "eh1", 8);
    assert_eq!(stored.len(), 400);
    // Each keyed event's receipt names the partition it was stored in.
    let stored_in: HashMap<String, String> = stored
        .iter()
        .map(|(partition, message)| (body_text(message), partition.clone()))
        .collect();
    for (i, outcome) in outcomes.iter().enumerate() {
        let body = format!("{}:{i}", keys[i % keys.len()]);
        assert_eq!(
            outcome.as_ref().unwrap().partition_id.as_ref(),
            Some(&stored_in[&body]),
            "{body}"
        );
    }
    let mut last_index: HashMap<String, usize> = HashMap::new();
    for (partition, message) in &stored {
        let key = partition_key(message).unwrap().expect("keyed");
        assert_eq!(partition, &partition_for_key(&key, 8).to_string(), "{key}");
        let body = body_text(message);
        let index: usize = body.rsplit(':').next().unwrap().parse().unwrap();
        if let Some(previous) = last_index.insert(key.clone(), index) {
            assert!(previous < index, "{key}: {previous} stored before {index}");
        }
    }
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn local_partitioning_batches_many_keys_per_partition() {
    let emulator = start(&["eh1:4"]).await;
    let producer = producer(
        &emulator,
        ProducerConfig {
            local_partitioning: true,
            linger: Duration::from_millis(50),
            ..base()
        },
    );
    let outcomes = send_many(&producer, "eh1", 400, |i| {
        Event::text(format!("k{i}")).with_partition_key(format!("k{i}"))
    })
    .await;
    for (i, outcome) in outcomes.iter().enumerate() {
        let expected = partition_for_key(&format!("k{i}"), 4).to_string();
        assert_eq!(
            outcome.as_ref().unwrap().partition_id.as_deref(),
            Some(expected.as_str())
        );
    }
    for (partition, message) in stored_events(&emulator, "eh1", 4) {
        let key = body_text(&message);
        assert_eq!(partition, partition_for_key(&key, 4).to_string());
    }
    assert!(
        emulator.faults().transfers_seen() < 50,
        "keys shared partition batches"
    );
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn bad_events_fail_alone_with_the_field_at_fault() {
    let emulator = start(&["eh1:2"]).await;
    let producer = producer(&emulator, base());
    let both = producer
        .send(
            "eh1",
            Event::text("x")
                .with_partition_key("k")
                .with_partition_id("0"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            both,
            SendError::InvalidEvent {
                field: "partition_key",
                ..
            }
        ),
        "{both}"
    );
    let unknown = producer
        .send("eh1", Event::text("x").with_partition_id("7"))
        .await
        .unwrap_err();
    assert!(
        matches!(unknown, SendError::UnknownPartition { count: 2, .. }),
        "{unknown}"
    );
    let missing_hub = producer.send("nope", Event::text("x")).await.unwrap_err();
    assert!(
        matches!(&missing_hub, SendError::Service(e) if e.condition == AmqpCondition::NotFound),
        "{missing_hub}"
    );
    producer
        .send("eh1", Event::text("fine"))
        .await
        .expect("the producer goes on");
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn server_busy_is_retried_then_accepted() {
    let emulator = start(&["eh1:1"]).await;
    emulator.faults().throttle_next_sends(3);
    let producer = producer(&emulator, base());
    producer
        .send("eh1", Event::text("after throttling"))
        .await
        .expect("retried until accepted");
    assert_eq!(emulator.partition_events("eh1", "0").unwrap().len(), 1);
    assert_eq!(emulator.faults().transfers_seen(), 4);
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn released_deliveries_are_failures_that_are_retried() {
    let emulator = start(&["eh1:1"]).await;
    emulator.faults().release_next_sends(2);
    let producer = producer(&emulator, base());
    producer
        .send("eh1", Event::text("after release"))
        .await
        .expect("retried");
    assert_eq!(emulator.faults().transfers_seen(), 3);
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn retries_stop_at_the_attempt_limit() {
    let emulator = start(&["eh1:1"]).await;
    emulator.faults().throttle_next_sends(100);
    let producer = producer(
        &emulator,
        ProducerConfig {
            retry_max_attempts: 3,
            ..base()
        },
    );
    let error = producer.send("eh1", Event::text("x")).await.unwrap_err();
    assert!(
        matches!(&error, SendError::Service(e) if e.condition == AmqpCondition::ServerBusy),
        "{error}"
    );
    assert_eq!(emulator.faults().transfers_seen(), 3);
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn a_wrong_key_is_not_retried() {
    let emulator = start(&["eh1:1"]).await;
    let text = emulator
        .connection_string()
        .replace("SAS_KEY_VALUE", "wrong");
    let producer =
        Producer::from_connection_string(&text, false, Default::default(), base()).unwrap();
    let started = Instant::now();
    let error = producer.send("eh1", Event::text("x")).await.unwrap_err();
    assert!(matches!(error, SendError::Auth(_)), "{error}");
    assert!(
        !format!("{error}").contains("wrong"),
        "the key is never echoed: {error}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(emulator.faults().transfers_seen(), 0);
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn a_forced_close_mid_flight_loses_nothing() {
    let emulator = start(&["eh1:2"]).await;
    let producer = producer(
        &emulator,
        ProducerConfig {
            linger: Duration::from_millis(1),
            ..base()
        },
    );
    emulator.faults().force_close_after_transfers(5);
    let outcomes = send_many(&producer, "eh1", 3000, |i| {
        Event::text(format!("e-{i}")).with_message_id(format!("{i}"))
    })
    .await;
    assert!(
        outcomes.iter().all(Result::is_ok),
        "{:?}",
        outcomes.iter().find(|o| o.is_err())
    );
    let stored = stored_events(&emulator, "eh1", 2);
    let mut seen = std::collections::HashSet::new();
    for (_, message) in &stored {
        seen.insert(body_text(message));
    }
    assert_eq!(
        seen.len(),
        3000,
        "every accepted event is stored (duplicates allowed: at least once)"
    );
    assert!(
        producer.stats().pool.opened_total >= 2,
        "a new connection replaced the closed one"
    );
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn detached_links_are_replaced() {
    let emulator = start(&["eh1:1"]).await;
    let producer = producer(&emulator, base());
    producer.send("eh1", Event::text("before")).await.unwrap();
    emulator.faults().detach_all_links();
    tokio::time::sleep(Duration::from_millis(100)).await;
    producer
        .send("eh1", Event::text("after"))
        .await
        .expect("a new link");
    assert_eq!(emulator.partition_events("eh1", "0").unwrap().len(), 2);
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn short_lived_tokens_are_refreshed_without_failed_sends() {
    let emulator = start(&["eh1:1"]).await;
    // Two-second tokens, refreshed at 90%: a 5 s run needs at least two refreshes per connection.
    let producer = producer(
        &emulator,
        ProducerConfig {
            sas_token_lifetime: Duration::from_secs(2),
            ..base()
        },
    );
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(5) {
        producer
            .send("eh1", Event::text(format!("{sent}")))
            .await
            .expect("no send fails");
        sent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        producer.stats().token_refreshes >= 3,
        "{:?}",
        producer.stats()
    );
    assert_eq!(emulator.partition_events("eh1", "0").unwrap().len(), sent);
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn close_flushes_lingering_events() {
    let emulator = start(&["eh1:1"]).await;
    let producer = producer(
        &emulator,
        ProducerConfig {
            linger: Duration::from_millis(30000),
            ..base()
        },
    );
    let sends: Vec<_> = (0..100)
        .map(|i| {
            let producer = producer.clone();
            tokio::spawn(async move { producer.send("eh1", Event::text(format!("{i}"))).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    producer.close().await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "close did not wait for the linger"
    );
    for send in sends {
        send.await.unwrap().expect("flushed by close");
    }
    assert_eq!(emulator.partition_events("eh1", "0").unwrap().len(), 100);
    assert_eq!(
        producer.send("eh1", Event::text("late")).await,
        Err(SendError::Closed)
    );
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn management_reads_hub_and_partition_properties() {
    let emulator = start(&["eh1:3"]).await;
    let producer = producer(&emulator, base());
    let hub = producer.hub_properties("eh1").await.unwrap();
    assert_eq!(hub.name, "eh1");
    assert_eq!(hub.partition_ids, ["0", "1", "2"]);
    producer
        .send("eh1", Event::text("x").with_partition_id("2"))
        .await
        .unwrap();
    let partition = producer.partition_properties("eh1", "2").await.unwrap();
    assert_eq!(partition.last_enqueued_sequence_number, 0);
    assert!(!partition.is_empty);
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn full_buffers_answer_overloaded_within_the_deadline() {
    let emulator = start(&["eh1:1"]).await;
    emulator.faults().delay_dispositions(Duration::from_secs(3));
    let producer = producer(
        &emulator,
        ProducerConfig {
            max_buffered_bytes: 1024 * 1024,
            ..base()
        },
    );
    let deadline = Instant::now() + Duration::from_millis(500);
    let outcomes =
        join_all((0..40).map(|_| {
            producer.send_with_deadline("eh1", Event::binary(vec![0; 64 * 1024]), deadline)
        }))
        .await;
    let overloaded = outcomes
        .iter()
        .filter(|o| {
            matches!(
                o,
                Err(SendError::Overloaded {
                    what: "max_buffered_bytes",
                    ..
                })
            )
        })
        .count();
    assert!(
        overloaded >= 20,
        "2.5 MiB offered to a 1 MiB buffer: {overloaded} refused"
    );
    assert!(producer.stats().buffered_bytes <= 1024 * 1024);
    emulator.faults().clear();
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn ready_message_is_sent_once_per_connection() {
    let emulator = start(&["eh1:1"]).await;
    let producer = producer(
        &emulator,
        ProducerConfig {
            ready_message: Some("ready".into()),
            ..base()
        },
    );
    send_many(&producer, "eh1", 50, |i| Event::text(format!("{i}"))).await;
    producer.send("eh1", Event::text("more")).await.unwrap();
    let readies = emulator
        .partition_events("eh1", "0")
        .unwrap()
        .iter()
        .filter(|e| {
            body_text(&eventhub_gateway::emulator::decode_stored_event(e).unwrap()) == "ready"
        })
        .count();
    assert_eq!(readies as u64, producer.stats().pool.opened_total);
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn pool_get_timeout_is_honoured() {
    let emulator = start(&["eh1:1", "eh2:1"]).await;
    let producer = producer(
        &emulator,
        ProducerConfig {
            max_size: 1,
            min_size: 1,
            client_limit: 1,
            pool_get_timeout: Duration::from_millis(300),
            ..base()
        },
    );
    producer
        .send("eh1", Event::text("holds the only link"))
        .await
        .unwrap();
    let started = Instant::now();
    let error = producer
        .send("eh2", Event::text("no room"))
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(error, SendError::PoolTimeout { .. }), "{error}");
    assert!(waited >= Duration::from_millis(300), "waited {waited:?}");
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn idle_links_free_their_slot_and_idle_connections_close() {
    let emulator = start(&["eh1:1", "eh2:1"]).await;
    let producer = producer(
        &emulator,
        ProducerConfig {
            max_size: 1,
            min_size: 0,
            client_limit: 1,
            max_idle: Duration::from_millis(300),
            ..base()
        },
    );
    producer.send("eh1", Event::text("a")).await.unwrap();
    // eh2 waits for eh1's link to idle out, well within pool_get_timeout.
    producer
        .send("eh2", Event::text("b"))
        .await
        .expect("the idle link's slot was freed");
    let started = Instant::now();
    while producer.stats().pool.ready > 0 && started.elapsed() < TIMEOUT {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(producer.stats().pool.ready, 0, "the idle connection closed");
    producer
        .send("eh1", Event::text("c"))
        .await
        .expect("reopens on demand");
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn connections_past_their_lifespan_are_replaced_without_failures() {
    let emulator = start(&["eh1:2"]).await;
    let producer = producer(
        &emulator,
        ProducerConfig {
            max_lifespan: Duration::from_millis(500),
            linger: Duration::from_millis(2),
            ..base()
        },
    );
    let producer = Arc::new(producer);
    let started = Instant::now();
    let mut sent = 0usize;
    while started.elapsed() < Duration::from_secs(3) {
        let outcomes =
            send_many(&producer, "eh1", 50, |i| Event::text(format!("{sent}-{i}"))).await;
        assert!(
            outcomes.iter().all(Result::is_ok),
            "{:?}",
            outcomes.iter().find(|o| o.is_err())
        );
        sent += 50;
    }
    assert!(
        producer.stats().pool.opened_total >= 3,
        "{:?}",
        producer.stats()
    );
    assert!(stored_events(&emulator, "eh1", 2).len() >= sent);
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn connection_create_timeout_bounds_a_silent_peer() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream); // accepted, never answered
        }
    });
    let text = format!(
        "Endpoint=sb://localhost:{port};SharedAccessKeyName=a;SharedAccessKey=b;UseDevelopmentEmulator=true"
    );
    let producer = Producer::from_connection_string(
        &text,
        false,
        Default::default(),
        ProducerConfig {
            pool_connection_create_timeout: Duration::from_millis(300),
            retry_max_attempts: 1,
            min_size: 0,
            ..base()
        },
    )
    .unwrap();
    let started = Instant::now();
    let error = producer.send("eh1", Event::text("x")).await.unwrap_err();
    assert!(
        error.to_string().contains("pool_connection_create_timeout"),
        "{error}"
    );
    assert!(
        error.to_string().contains("could not connect to"),
        "a connection that never opened was not lost: {error}"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    let pool = producer.stats().pool;
    assert_eq!(pool.opened_total, 0, "{pool:?}");
    assert!(pool.connect_attempts >= 1, "{pool:?}");
    assert!(
        pool.connect_failures_at(ConnectStage::Timeout) >= 1,
        "{pool:?}"
    );
    producer.close().await;
}

/// A loopback port with nothing listening on it (bound, then released).
fn closed_loopback_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
    listener.local_addr().expect("its address").port()
}

#[tokio::test]
async fn an_unreachable_event_hubs_is_retried_with_backoff_then_recovers() {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // This test's runtime has one thread, so every task of the producer logs into the capture.
    let _capture = tracing::subscriber::set_default(subscriber);
    let port = closed_loopback_port();
    let producer = Producer::from_connection_string(
        &format!(
            "Endpoint=sb://127.0.0.1:{port};SharedAccessKeyName=RootManageSharedAccessKey;\
             SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true"
        ),
        false,
        Default::default(),
        ProducerConfig {
            min_size: 1, // the pool keeps trying on its own
            reconnect_backoff_initial: Duration::from_millis(200),
            reconnect_backoff_max: Duration::from_secs(2),
            ..base()
        },
    )
    .unwrap();
    let outage = Instant::now();
    // A send gives up at its own deadline with the real reason, however long the pool's next pause is.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let asked = Instant::now();
    let error = producer
        .send_with_deadline("eh1", Event::text("x"), asked + Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(
        asked.elapsed() < Duration::from_millis(1500),
        "waited {:?} past a 500 ms deadline",
        asked.elapsed()
    );
    let message = error.to_string();
    assert!(
        message.contains(&format!("could not connect to 127.0.0.1:{port}")),
        "{message}"
    );
    assert!(!message.contains("lost"), "{message}");
    while outage.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pool = producer.stats().pool;
    // A fixed 200 ms cadence makes 25 attempts in 5 s; this backoff's pauses average 1 s once capped at 2 s.
    assert!(
        (2..=15).contains(&pool.connect_attempts),
        "attempts in 5 s: {pool:?}"
    );
    assert_eq!(pool.opened_total, 0, "nothing opened: {pool:?}");
    assert!(
        pool.connect_failures_at(ConnectStage::Tcp) + 1 >= pool.connect_attempts,
        "every attempt but one under way failed at TCP: {pool:?}"
    );
    let text = || String::from_utf8_lossy(&logs.0.lock()).into_owned();
    let warnings = text()
        .lines()
        .filter(|line| line.contains(" WARN "))
        .count();
    assert!(
        (1..=2).contains(&warnings),
        "{warnings} warnings in 5 s:\n{}",
        text()
    );
    assert!(
        text().contains("could not connect to Event Hubs"),
        "{}",
        text()
    );

    // Event Hubs comes up on that port: the pool finds it at its next attempt, and sends go through.
    let emulator = start_with(EmulatorConfig {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        ..config(&["eh1:4"])
    })
    .await;
    assert!(
        eventually(|| async { producer.is_ready() }).await,
        "{:?}",
        producer.stats()
    );
    producer
        .send("eh1", Event::text("after the outage"))
        .await
        .expect("sent once Event Hubs is back");
    let pool = producer.stats().pool;
    assert!(pool.opened_total >= 1, "{pool:?}");
    assert!(
        text().contains("connected to Event Hubs again"),
        "{}",
        text()
    );
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

/// A fake Entra ID credential: JWT-shaped tokens for Event Hubs, valid `lifetime`, counted. Never reaches a network.
#[derive(Debug)]
struct FakeEntraCredential {
    lifetime: i64,
    issued: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl azure_core::credentials::TokenCredential for FakeEntraCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<azure_core::credentials::TokenRequestOptions<'_>>,
    ) -> azure_core::Result<azure_core::credentials::AccessToken> {
        use base64::Engine;
        assert_eq!(scopes, ["https://eventhubs.azure.net/.default"]);
        self.issued
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let expires = azure_core::time::OffsetDateTime::now_utc().unix_timestamp() + self.lifetime;
        let encode = |value: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
        };
        let token = format!(
            "{}.{}.c2lnbmF0dXJl",
            encode(serde_json::json!({"alg": "RS256", "typ": "JWT"})),
            encode(serde_json::json!({"aud": "https://eventhubs.azure.net", "exp": expires}))
        );
        Ok(azure_core::credentials::AccessToken::new(
            token,
            azure_core::time::OffsetDateTime::from_unix_timestamp(expires).unwrap(),
        ))
    }
}

/// An emulator accepting JWTs and a producer authenticated by a fake Entra credential whose tokens live
/// `lifetime` seconds.
async fn entra_producer(
    lifetime: i64,
) -> (
    eventhub_gateway::emulator::Emulator,
    Producer,
    Arc<FakeEntraCredential>,
) {
    let emulator = start_with(eventhub_gateway::emulator::EmulatorConfig {
        accept_jwt: true,
        ..support::config(&["eh1:1"])
    })
    .await;
    let credential = Arc::new(FakeEntraCredential {
        lifetime,
        issued: Default::default(),
    });
    let endpoint = eventhub_gateway::producer::Endpoint::direct(
        "localhost",
        emulator.local_addr().port(),
        eventhub_gateway::producer::Transport::Amqp,
    );
    let producer = Producer::new(
        endpoint,
        eventhub_gateway::producer::Credential::Entra(credential.clone()),
        Default::default(),
        base(),
    )
    .unwrap();
    (emulator, producer, credential)
}

#[tokio::test]
async fn entra_id_tokens_authorize_and_are_refreshed() {
    let (emulator, producer, credential) = entra_producer(3).await;
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(5) {
        producer
            .send("eh1", Event::text("jwt"))
            .await
            .expect("no send fails across refreshes");
        sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(credential.issued.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    assert_eq!(emulator.partition_events("eh1", "0").unwrap().len(), sent);
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn a_shared_access_signature_connection_string_works_until_it_expires() {
    let emulator = start(&["eh1:1"]).await;
    let port = emulator.local_addr().port();
    let signed = |valid_for| {
        format!(
            "Endpoint=sb://localhost:{port};SharedAccessSignature={};UseDevelopmentEmulator=true",
            sas_token("eh1", valid_for)
        )
    };
    let producer = Producer::from_connection_string(
        &signed(Duration::from_secs(600)),
        false,
        Default::default(),
        base(),
    )
    .unwrap();
    producer
        .send("eh1", Event::text("signed"))
        .await
        .expect("accepted");
    producer.close().await;
    let expired = Producer::from_connection_string(
        &signed(Duration::ZERO),
        false,
        Default::default(),
        base(),
    )
    .unwrap();
    let error = expired.send("eh1", Event::text("late")).await.unwrap_err();
    assert!(error.to_string().contains("expired"), "{error}");
    expired.close().await;
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn the_producer_sends_over_every_transport() {
    use eventhub_gateway::producer::{Credential, Transport};
    let pki = TestPki::generate();
    let emulator = start_with_tls(&pki, &["eh1:1"]).await;
    for transport in [Transport::Amqp, Transport::Amqps, Transport::WebSockets] {
        let credential = Credential::SharedKey {
            name: "RootManageSharedAccessKey".into(),
            key: "SAS_KEY_VALUE".into(),
            token_lifetime: Duration::from_secs(600),
        };
        let producer = Producer::new(
            endpoint(&emulator, transport),
            credential,
            trusting(&pki),
            base(),
        )
        .unwrap();
        let outcomes = send_many(&producer, "eh1", 100, |i| {
            Event::text(format!("{transport:?}-{i}"))
        })
        .await;
        assert!(
            outcomes.iter().all(Result::is_ok),
            "{transport:?}: {:?}",
            outcomes.iter().find(|o| o.is_err())
        );
        producer.close().await;
    }
    assert_eq!(emulator.partition_events("eh1", "0").unwrap().len(), 300);
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn events_linger_for_company_then_go_together() {
    let emulator = start(&["eh1:1"]).await;
    let producer = producer(
        &emulator,
        ProducerConfig {
            linger: Duration::from_millis(300),
            ..base()
        },
    );
    let started = Instant::now();
    let outcomes = send_many(&producer, "eh1", 10, |i| Event::text(format!("{i}"))).await;
    assert!(outcomes.iter().all(Result::is_ok));
    // A lower bound only: the batch cannot have left before its linger ended.
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        emulator.faults().transfers_seen(),
        1,
        "ten events, one batch"
    );
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn many_batches_are_in_flight_on_one_link() {
    let mut small = support::config(&["eh1:1"]);
    small.max_message_size = 4096; // three 1 KiB events per batch
    let emulator = start_with(small).await;
    emulator
        .faults()
        .delay_dispositions(Duration::from_millis(500));
    let producer = producer(
        &emulator,
        ProducerConfig {
            max_size: 1,
            linger: Duration::from_millis(0),
            max_in_flight_unordered: 8,
            ..base()
        },
    );
    let sends = {
        let producer = producer.clone();
        tokio::spawn(async move {
            send_many(&producer, "eh1", 30, |_| Event::binary(vec![1; 1024])).await
        })
    };
    let mut most_in_flight = 0;
    while !sends.is_finished() {
        most_in_flight = most_in_flight.max(producer.stats().pool.in_flight);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(sends.await.unwrap().iter().all(Result::is_ok));
    assert_eq!(producer.stats().pool.ready, 1, "one connection");
    assert!(
        most_in_flight >= 4,
        "batches overlapped on one link: at most {most_in_flight} at once"
    );
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn the_rate_limit_paces_batches_and_every_event_still_arrives() {
    let emulator = start(&["eh1:2"]).await;
    let producer = producer(
        &emulator,
        ProducerConfig {
            rate_limit_events_per_second: NonZeroU32::new(400),
            rate_limit_bytes_per_second: NonZeroU32::new(1_000_000),
            ..base()
        },
    );
    let started = Instant::now();
    let outcomes = send_many(&producer, "eh1", 1000, |i| Event::text(format!("e-{i}"))).await;
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    assert_eq!(
        emulator.partition_events("eh1", "0").unwrap().len()
            + emulator.partition_events("eh1", "1").unwrap().len(),
        1000
    );
    assert!(producer.stats().rate_limited_batches > 0);
    // A bucket holds one second of the rate: 1000 events at 400/s cannot all go in under 1.5 s (a lower bound,
    // safe on a slow machine).
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        started.elapsed()
    );
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

/// Every log line written on this thread, at every level.
#[derive(Clone, Default)]
struct CapturedLogs(Arc<parking_lot::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn entra_tokens_and_payloads_never_reach_the_logs_even_at_trace_level() {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    // This test's runtime has one thread, so every task of the producer logs into the capture.
    let _capture = tracing::subscriber::set_default(subscriber);
    let (emulator, producer, _credential) = entra_producer(3600).await;
    producer
        .send("eh1", Event::text("PAYLOAD-MARKER-entra"))
        .await
        .unwrap();
    emulator.faults().throttle_next_sends(1);
    producer
        .send("eh1", Event::binary(b"PAYLOAD-MARKER-retried".to_vec()))
        .await
        .unwrap();
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
    let text = String::from_utf8_lossy(&logs.0.lock()).into_owned();
    assert!(
        text.contains("retrying a batch"),
        "the capture works: {text}"
    );
    for secret in [
        "c2lnbmF0dXJl",
        "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9",
        "PAYLOAD-MARKER",
    ] {
        assert!(!text.contains(secret), "{secret} in the logs:\n{text}");
    }
}

#[tokio::test]
async fn a_send_is_a_small_future() {
    // tonic boxes every call's future, moving it whole: a send that held the pool's slow paths inline (opening
    // a connection, attaching a link, reading the hub) weighed 19 KB and its copies cost the gateway a tenth
    // of its instructions per event. Those paths are boxed; this keeps it so.
    let emulator = start(&["eh1:2"]).await;
    let producer = producer(&emulator, Default::default());
    let send = producer.send("eh1", Event::text("x"));
    let size = std::mem::size_of_val(&send);
    assert!(size <= 4096, "a send's future is {size} bytes");
    drop(send);
    producer.close().await;
}

#[tokio::test]
async fn a_batch_refused_for_one_event_is_sent_apart_and_only_that_event_fails() {
    // A rule only the emulator knows: the producer cannot check it first, so the batch is refused whole.
    let emulator = start(&["eh1:2"]).await;
    emulator.faults().refuse_events_containing(Some(b"POISON"));
    let producer = producer(
        &emulator,
        ProducerConfig {
            linger: Duration::from_millis(50),
            ..base()
        },
    );
    let keyless = send_many(&producer, "eh1", 600, |i| {
        Event::text(if i == 300 {
            "POISON".to_owned()
        } else {
            format!("e-{i}")
        })
    });
    // A key's events keep their order through the halves.
    let keyed = async {
        let mut tickets = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        for i in 0..200 {
            let body = if i == 77 {
                "POISON".to_owned()
            } else {
                format!("k-{i}")
            };
            let event = Event::text(body).with_partition_key("one-key");
            tickets.push(producer.enqueue("eh1", event, deadline).await.unwrap());
        }
        join_all(tickets).await
    };
    let (keyless, keyed) = tokio::join!(keyless, keyed);
    for (outcomes, poison) in [(&keyless, 300), (&keyed, 77)] {
        for (index, outcome) in outcomes.iter().enumerate() {
            if index == poison {
                assert!(
                    matches!(outcome, Err(SendError::Service(e)) if e.condition == AmqpCondition::InvalidArgument),
                    "{outcome:?}"
                );
            } else {
                assert!(outcome.is_ok(), "event {index}: {outcome:?}");
            }
        }
    }
    let stored = stored_events(&emulator, "eh1", 2);
    let mut bodies: Vec<String> = stored.iter().map(|(_, m)| body_text(m)).collect();
    let keyed_bodies: Vec<String> = bodies
        .iter()
        .filter(|b| b.starts_with("k-"))
        .cloned()
        .collect();
    let expected_keyed: Vec<String> = (0..200)
        .filter(|&i| i != 77)
        .map(|i| format!("k-{i}"))
        .collect();
    assert_eq!(
        keyed_bodies, expected_keyed,
        "the key's events, once each, in order"
    );
    bodies.sort();
    let mut expected: Vec<String> = (0..600)
        .filter(|&i| i != 300)
        .map(|i| format!("e-{i}"))
        .chain(expected_keyed)
        .collect();
    expected.sort();
    assert_eq!(bodies, expected, "every other event stored exactly once");
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test]
async fn an_event_over_a_limit_fails_alone_before_it_joins_a_batch() {
    let emulator = start(&["eh1:2"]).await;
    let producer = producer(
        &emulator,
        ProducerConfig {
            linger: Duration::from_millis(50),
            ..base()
        },
    );
    let transfers_before = emulator.faults().transfers_seen();
    let outcomes = send_many(&producer, "eh1", 400, |i| {
        let event = Event::text(format!("e-{i}"));
        match i {
            100 => (0..32_769).fold(event, |event, n| event.with_property(format!("p{n}"), "")),
            200 => event.with_message_id("m".repeat(200)),
            300 => event.with_property("huge", "v".repeat(40_000)),
            _ => event,
        }
    })
    .await;
    for (index, outcome) in outcomes.iter().enumerate() {
        let rule = match outcome {
            Err(SendError::OverLimit(violation)) => Some(violation.rule),
            Ok(_) => None,
            other => panic!("event {index}: {other:?}"),
        };
        let expected = match index {
            100 => Some("max_properties"),
            200 => Some("max_message_id_chars"),
            300 => Some("max_property_bytes"),
            _ => None,
        };
        assert_eq!(rule, expected, "event {index}");
    }
    assert_eq!(stored_events(&emulator, "eh1", 2).len(), 397);
    // Refused before a batch: no batch was refused, so none was sent apart.
    assert!(emulator.faults().transfers_seen() - transfers_before < 50);
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}
