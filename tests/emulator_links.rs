//! The emulator over real AMQP connections: CBS, link authorization and refusals, batches, routing,
//! consumers and the library API, driven by a raw fe2o3 client as the SDKs drive the service.

mod support;

use std::time::Duration;

use eventhub_emulator::decode_stored_event;
use eventhub_wire::message::{annotation, decode};
use eventhub_wire::partition::partition_for_key;
use eventhub_wire::sas::sign_token;
use eventhub_wire::{JWT_TOKEN_TYPE, SAS_TOKEN_TYPE, annotations};
use fe2o3_amqp_types::messaging::Outcome;
use serde_amqp::Value;
use support::{
    Client, Fixture, TIMEOUT, batch, body_text, event, refused_sender_condition,
    rejected_condition, sas_token, unix_now,
};

#[tokio::test]
async fn a_link_without_a_token_is_refused_as_unauthorized() {
    let emulator = Fixture::emulator(&["eh1:2"]).await;
    let mut client = Client::connect(&emulator).await.unwrap();
    assert_eq!(
        refused_sender_condition(&mut client, "eh1").await,
        "amqp:unauthorized-access"
    );

    client.authorize("eh1", Duration::from_secs(60)).await;
    client
        .sender("eh1")
        .await
        .expect("a token for the hub lets the link attach");
    client.close().await;
}

#[tokio::test]
async fn cbs_answers_like_the_service() {
    let emulator = Fixture::emulator(&["eh1:2", "eh2:1"]).await;
    let mut client = Client::connect(&emulator).await.unwrap();
    let wrong_key = sign_token(
        "sb://localhost/eh1",
        "RootManageSharedAccessKey",
        "not the key",
        unix_now() + 60,
    );
    let cases = [
        (
            "sb://localhost/eh1",
            SAS_TOKEN_TYPE,
            sas_token("eh1", Duration::from_secs(60)),
            202,
        ),
        ("sb://localhost/eh1", SAS_TOKEN_TYPE, wrong_key, 401),
        (
            "sb://localhost/eh1",
            SAS_TOKEN_TYPE,
            sas_token("eh1", Duration::ZERO),
            401,
        ),
        (
            "sb://localhost/eh1",
            SAS_TOKEN_TYPE,
            sas_token("eh2", Duration::from_secs(60)),
            401,
        ),
        (
            "sb://localhost/nope",
            SAS_TOKEN_TYPE,
            sas_token("", Duration::from_secs(60)),
            404,
        ),
        (
            "sb://localhost/eh1",
            JWT_TOKEN_TYPE,
            "a.b.c".to_owned(),
            401,
        ),
        ("sb://localhost/eh1", "some-other-type", "x".to_owned(), 400),
    ];
    for (audience, token_type, token, expected) in cases {
        let (code, description) = client.put_token(audience, token_type, &token).await;
        assert_eq!(code, expected, "{audience} {token_type}: {description}");
        assert!(
            !description.contains("sig="),
            "the token is never echoed: {description}"
        );
    }
    client.close().await;
}

#[tokio::test]
async fn unknown_hubs_partitions_and_consumer_groups_are_not_found() {
    let emulator = Fixture::emulator(&["eh1:2"]).await;
    let mut client = emulator.client("").await;
    for address in [
        "nope",
        "eh1/Partitions/2",
        "amqps://localhost/eh1/Partitions/x",
        "eh1/ConsumerGroups/$Default/Partitions/0",
    ] {
        let condition = refused_sender_condition(&mut client, address).await;
        assert!(
            condition == "amqp:not-found" || condition == "amqp:not-allowed",
            "{address}: {condition}"
        );
    }
    let mut receiver = client
        .receiver(
            "eh1/ConsumerGroups/nope/Partitions/0",
            "amqp.annotation.x-opt-offset > '-1'",
        )
        .await
        .expect("attached, then detached with the error");
    let err = tokio::time::timeout(
        TIMEOUT,
        receiver.recv::<fe2o3_amqp_types::messaging::Body<Value>>(),
    )
    .await
    .expect("the refusal arrives in time")
    .expect_err("an unknown consumer group delivers nothing");
    assert!(format!("{err:?}").contains("NotFound"), "{err:?}");
    // The session survives refusals: a good link still attaches on it.
    client
        .sender("eh1")
        .await
        .unwrap()
        .send(event("ok", None))
        .await
        .unwrap();
    client.close().await;
}

#[tokio::test]
async fn keyed_batches_land_atomically_on_the_hashed_partition() {
    let emulator = Fixture::emulator(&["eh1:32"]).await;
    let mut client = emulator.client("eh1").await;
    let mut sender = client.sender("amqps://localhost/eh1").await.unwrap();
    let keys = ["user-42", "order-1001", "café", "東京", "🚀 launch", ""];
    for key in keys {
        let events: Vec<_> = (0..3)
            .map(|i| event(&format!("{key}#{i}"), Some(key)))
            .collect();
        let outcome = sender.send(batch(&events, Some(key))).await.unwrap();
        assert!(
            matches!(outcome, Outcome::Accepted(_)),
            "{key}: {outcome:?}"
        );
    }
    for key in keys {
        let partition = partition_for_key(key, 32).to_string();
        let stored = emulator.partition_events("eh1", &partition).unwrap();
        let bodies: Vec<String> = stored
            .iter()
            .filter(|e| e.partition_key.as_deref() == Some(key))
            .map(|e| body_text(&decode(&e.message).unwrap()))
            .collect();
        assert_eq!(
            bodies,
            [format!("{key}#0"), format!("{key}#1"), format!("{key}#2")],
            "key {key:?}"
        );
        let first = stored
            .iter()
            .position(|e| e.partition_key.as_deref() == Some(key))
            .unwrap();
        let run = &stored[first..first + 3];
        assert!(
            run.windows(2)
                .all(|w| w[1].sequence_number == w[0].sequence_number + 1),
            "one batch, consecutive"
        );
        assert!(
            run.iter()
                .all(|e| e.enqueued_time_ms == run[0].enqueued_time_ms),
            "one batch, one enqueued time"
        );
    }
    client.close().await;
}

#[tokio::test]
async fn keyless_sends_spread_round_robin_and_partition_links_pin() {
    let emulator = Fixture::emulator(&["eh1:4"]).await;
    let mut client = emulator.client("eh1").await;
    let mut hub = client.sender("eh1").await.unwrap();
    for i in 0..8 {
        hub.send(event(&format!("spread {i}"), None)).await.unwrap();
    }
    for partition in ["0", "1", "2", "3"] {
        assert_eq!(
            emulator.partition_events("eh1", partition).unwrap().len(),
            2,
            "partition {partition}"
        );
    }
    let mut pinned = client.sender("eh1/Partitions/3").await.unwrap();
    pinned
        .send(batch(&[event("a", None), event("b", None)], None))
        .await
        .unwrap();
    assert_eq!(
        emulator
            .partition_properties("eh1", "3")
            .unwrap()
            .last_enqueued_sequence_number,
        3
    );
    client.close().await;
}

#[tokio::test]
async fn malformed_batches_are_rejected_and_stored_nowhere() {
    let emulator = Fixture::emulator(&["eh1:1"]).await;
    let mut client = emulator.client("eh1").await;
    let mut sender = client.sender("eh1").await.unwrap();
    let mixed = batch(
        &[event("a", Some("k1")), event("b", Some("k2"))],
        Some("k1"),
    );
    let outcome = sender.send(mixed).await.unwrap();
    assert_eq!(
        rejected_condition(&outcome).as_deref(),
        Some("com.microsoft:argument-error"),
        "{outcome:?}"
    );
    assert!(emulator.partition_events("eh1", "0").unwrap().is_empty());
    // The link survives a rejected transfer.
    let outcome = sender
        .send(batch(&[event("ok", None)], None))
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Accepted(_)));
    client.close().await;
}

#[tokio::test]
async fn pipelined_batches_are_all_accepted_in_order() {
    let emulator = Fixture::emulator(&["eh1:1"]).await;
    let mut client = emulator.client("eh1").await;
    let mut sender = client.sender("eh1/Partitions/0").await.unwrap();
    let mut pending = Vec::new();
    for b in 0..200 {
        let events: Vec<_> = (0..10).map(|i| event(&format!("{b}-{i}"), None)).collect();
        pending.push(sender.send_batchable(batch(&events, None)).await.unwrap());
    }
    for outcome in pending {
        assert!(matches!(outcome.await.unwrap(), Outcome::Accepted(_)));
    }
    let stored = emulator.partition_events("eh1", "0").unwrap();
    assert_eq!(stored.len(), 2000);
    assert!(
        stored
            .iter()
            .enumerate()
            .all(|(i, e)| e.sequence_number == i as i64)
    );
    assert_eq!(body_text(&decode(&stored[1999].message).unwrap()), "199-9");
    client.close().await;
}

#[tokio::test]
async fn consumers_read_stored_then_live_events_from_their_filter() {
    let emulator = Fixture::emulator(&["eh1:1"]).await;
    let mut client = emulator.client("eh1").await;
    let mut sender = client.sender("eh1").await.unwrap();
    for i in 0..5 {
        sender
            .send(event(&format!("stored {i}"), Some("k")))
            .await
            .unwrap();
    }
    let address = "eh1/ConsumerGroups/$Default/Partitions/0";
    let mut from_seq = client
        .receiver(address, "amqp.annotation.x-opt-sequence-number > '2'")
        .await
        .unwrap();
    let mut latest = client
        .receiver(address, "amqp.annotation.x-opt-offset > '@latest'")
        .await
        .unwrap();
    sender.send(event("live", None)).await.unwrap();

    let mut received = Vec::new();
    for _ in 0..3 {
        let delivery = tokio::time::timeout(
            TIMEOUT,
            from_seq.recv::<fe2o3_amqp_types::messaging::Body<Value>>(),
        )
        .await
        .expect("delivered in time")
        .unwrap();
        from_seq.accept(&delivery).await.unwrap();
        received.push(delivery.into_message());
    }
    let sequence: Vec<_> = received
        .iter()
        .map(|m| annotation(m, annotations::SEQUENCE_NUMBER).cloned())
        .collect();
    assert_eq!(
        sequence,
        [
            Some(Value::Long(3)),
            Some(Value::Long(4)),
            Some(Value::Long(5))
        ]
    );
    assert_eq!(body_text(&received[2]), "live");
    assert_eq!(
        annotation(&received[0], annotations::PARTITION_KEY),
        Some(&Value::String("k".into()))
    );
    assert!(matches!(
        annotation(&received[0], annotations::OFFSET),
        Some(Value::String(_))
    ));
    assert!(matches!(
        annotation(&received[0], annotations::ENQUEUED_TIME),
        Some(Value::Timestamp(_))
    ));

    let live = tokio::time::timeout(
        TIMEOUT,
        latest.recv::<fe2o3_amqp_types::messaging::Body<Value>>(),
    )
    .await
    .expect("the live event reaches the @latest reader")
    .unwrap();
    assert_eq!(body_text(live.message()), "live");
    client.close().await;
}

#[tokio::test]
async fn stored_events_decode_with_the_service_annotations() {
    let emulator = Fixture::emulator(&["eh1:1"]).await;
    let mut client = emulator.client("eh1").await;
    client
        .sender("eh1")
        .await
        .unwrap()
        .send(event("x", Some("key")))
        .await
        .unwrap();
    let stored = emulator.partition_events("eh1", "0").unwrap();
    let message = decode_stored_event(&stored[0]).unwrap();
    assert_eq!(
        annotation(&message, annotations::SEQUENCE_NUMBER),
        Some(&Value::Long(0))
    );
    assert!(emulator.partition_events("nope", "0").is_err());
    assert!(emulator.partition_events("eh1", "9").is_err());
    client.close().await;
}

#[tokio::test]
async fn garbage_on_one_connection_leaves_the_others_alone() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let emulator = Fixture::emulator(&["eh1:1"]).await;
    let mut client = emulator.client("eh1").await;
    let mut sender = client.sender("eh1").await.unwrap();

    for garbage in [
        &b"AMQP\x00\x01\x00\x00\x00\x00\x00\x10\x02\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff"[..],
        b"GET / HTTP/1.1\r\n\r\n",
        b"AMQP\x03\x01\x00\x00\xde\xad\xbe\xef",
    ] {
        let mut raw = tokio::net::TcpStream::connect(emulator.local_addr())
            .await
            .unwrap();
        raw.write_all(garbage).await.unwrap();
        let mut sink = Vec::new();
        // The emulator answers, closes, or (garbage instead of an open) drops it after its handshake timeout.
        let _ = tokio::time::timeout(Duration::from_millis(200), raw.read_to_end(&mut sink)).await;
    }
    let outcome = sender.send(event("still here", None)).await.unwrap();
    assert!(matches!(outcome, Outcome::Accepted(_)));
    client.close().await;
}

#[tokio::test]
async fn sender_links_announce_the_configured_max_message_size() {
    let emulator = Fixture::builder(&["eh1:1"])
        .emulator(|config| config.max_message_size = 4096)
        .without_producer()
        .start()
        .await;
    let mut client = emulator.client("eh1").await;
    let mut sender = client.sender("eh1").await.unwrap();
    // Clients read the limit from the attach and refuse bigger messages themselves (fe2o3 as the SDKs do);
    // a transfer that still exceeds it is refused by fe2o3's receiver with amqp:link:message-size-exceeded.
    assert_eq!(sender.max_message_size(), Some(4096));
    assert!(matches!(
        sender.send(event(&"x".repeat(3000), None)).await.unwrap(),
        Outcome::Accepted(_)
    ));
    let err = sender
        .send(event(&"x".repeat(8000), None))
        .await
        .expect_err("over the announced size");
    assert!(
        matches!(err, fe2o3_amqp::link::SendError::MessageSizeExceeded(_)),
        "{err:?}"
    );
    assert_eq!(emulator.partition_events("eh1", "0").unwrap().len(), 1);
    client.close().await;
}

#[tokio::test]
async fn a_higher_epoch_receiver_takes_the_partition_over() {
    use fe2o3_amqp_types::messaging::Body;
    let emulator = Fixture::emulator(&["eh1:1"]).await;
    let mut client = emulator.client("eh1").await;
    let address = "eh1/ConsumerGroups/$Default/Partitions/0";
    let from_start = "amqp.annotation.x-opt-offset > '-1'";
    let mut owner = client
        .receiver_with_epoch(address, from_start, Some(1))
        .await
        .unwrap();
    let mut usurper = client
        .receiver_with_epoch(address, from_start, Some(2))
        .await
        .unwrap();

    let err = tokio::time::timeout(TIMEOUT, owner.recv::<Body<Value>>())
        .await
        .expect("the old owner is disconnected in time")
        .expect_err("the old owner is disconnected");
    assert!(
        format!("{err:?}").contains("receiver-disconnected"),
        "{err:?}"
    );

    let mut lower = client
        .receiver_with_epoch(address, from_start, Some(1))
        .await
        .unwrap();
    let err = tokio::time::timeout(TIMEOUT, lower.recv::<Body<Value>>())
        .await
        .expect("refused in time");
    assert!(
        format!("{err:?}").contains("receiver-disconnected"),
        "a lower epoch is refused: {err:?}"
    );

    client
        .sender("eh1")
        .await
        .unwrap()
        .send(event("to the owner", None))
        .await
        .unwrap();
    let delivery = tokio::time::timeout(TIMEOUT, usurper.recv::<Body<Value>>())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(body_text(delivery.message()), "to the owner");
    client.close().await;
}
