//! The producer against the in-process emulator, what arrives and where: every field of an event, partition
//! keys hashed as the service does (and in order), local partitioning, events refused alone for their own
//! faults, management reads.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use eventhub_emulator::decode_stored_event;
use eventhub_wire::message::{AmqpMessage, partition_key};
use eventhub_wire::partition::partition_for_key;
use fe2o3_amqp_types::messaging::MessageId;
use fe2o3_amqp_types::primitives::SimpleValue;
use futures_util::future::join_all;
use support::*;

fn application_property(message: &AmqpMessage, name: &str) -> Option<String> {
    match message.application_properties.as_ref()?.0.get(name)? {
        SimpleValue::String(value) => Some(value.clone()),
        _ => None,
    }
}

#[tokio::test]
async fn an_event_arrives_with_every_field() {
    let fx = Fixture::start(&["eh1:2"]).await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let receipt = fx
        .producer()
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
    let stored = fx.partition_events("eh1", "1").unwrap();
    assert_eq!(stored.len(), 1);
    let message = decode_stored_event(&stored[0]).unwrap();
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
}

#[tokio::test]
async fn keys_land_where_the_service_hashes_them_in_order() {
    let fx = Fixture::start(&["eh1:8"]).await;
    let keys: Vec<String> = (0..20).map(|k| format!("key-{k}")).collect();
    // Enqueued one after another (the order is defined), settled concurrently.
    let deadline = enqueue_deadline();
    let mut tickets = Vec::new();
    for i in 0..400 {
        let key = keys[i % keys.len()].clone();
        let event = Event::text(format!("{key}:{i}")).with_partition_key(key);
        tickets.push(
            fx.producer()
                .enqueue("eh1", event, deadline)
                .await
                .expect("enqueued"),
        );
    }
    let outcomes = join_all(tickets).await;
    assert!(outcomes.iter().all(Result::is_ok));
    let stored = fx.stored("eh1");
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
}

#[tokio::test]
async fn local_partitioning_batches_many_keys_per_partition() {
    let fx = Fixture::builder(&["eh1:4"])
        .producer(|config| {
            config.local_partitioning = true;
            config.linger = Duration::from_millis(50);
        })
        .start()
        .await;
    let outcomes = fx
        .send_many("eh1", 400, |i| {
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
    for (partition, message) in fx.stored("eh1") {
        let key = body_text(&message);
        assert_eq!(partition, partition_for_key(&key, 4).to_string());
    }
    assert!(
        fx.faults().transfers_seen() < 50,
        "keys shared partition batches"
    );
}

#[tokio::test]
async fn bad_events_fail_alone_with_the_field_at_fault() {
    let fx = Fixture::start(&["eh1:2"]).await;
    let producer = fx.producer();
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
}

#[tokio::test]
async fn an_event_over_a_limit_fails_alone_before_it_joins_a_batch() {
    let fx = Fixture::builder(&["eh1:2"])
        .producer(|config| config.linger = Duration::from_millis(50))
        .start()
        .await;
    let transfers_before = fx.faults().transfers_seen();
    let outcomes = fx
        .send_many("eh1", 400, |i| {
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
    assert_eq!(fx.stored("eh1").len(), 397);
    // Refused before a batch: no batch was refused, so none was sent apart.
    assert!(fx.faults().transfers_seen() - transfers_before < 50);
}

#[tokio::test]
async fn management_reads_hub_and_partition_properties() {
    let fx = Fixture::start(&["eh1:3"]).await;
    let producer = fx.producer();
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
}
