//! The producer against the emulator's injected faults: throttling and released deliveries retried up to the
//! attempt limit, a forced close and detached links recovered without loss, a batch refused for one event's
//! contents sent apart; and against a relay that loses what Event Hubs sends: a reset before the disposition
//! (the resend's duplicates carry the event's message id), dispositions that never come (never answered OK),
//! a peer that goes silent under a management read (answered as soon as the connection is declared dead).

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fe2o3_amqp_types::messaging::MessageId;
use futures_util::future::join_all;
use support::relay::{Relay, Verdict, performative};
use support::*;

#[tokio::test]
async fn server_busy_is_retried_then_accepted() {
    let fx = Fixture::builder(&["eh1:1"])
        .faults(|faults| faults.throttle_next_sends(3))
        .start()
        .await;
    fx.producer()
        .send("eh1", Event::text("after throttling"))
        .await
        .expect("retried until accepted");
    assert_eq!(fx.stored_count("eh1", "0"), 1);
    assert_eq!(fx.faults().transfers_seen(), 4);
}

#[tokio::test]
async fn released_deliveries_are_failures_that_are_retried() {
    let fx = Fixture::builder(&["eh1:1"])
        .faults(|faults| faults.release_next_sends(2))
        .start()
        .await;
    fx.producer()
        .send("eh1", Event::text("after release"))
        .await
        .expect("retried");
    assert_eq!(fx.faults().transfers_seen(), 3);
}

#[tokio::test]
async fn retries_stop_at_the_attempt_limit() {
    let fx = Fixture::builder(&["eh1:1"])
        .faults(|faults| faults.throttle_next_sends(100))
        .producer(|config| config.retry_max_attempts = 3)
        .start()
        .await;
    let error = fx
        .producer()
        .send("eh1", Event::text("x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, SendError::Service(e) if e.condition == AmqpCondition::ServerBusy),
        "{error}"
    );
    assert_eq!(fx.faults().transfers_seen(), 3);
}

#[tokio::test]
async fn a_forced_close_mid_flight_loses_nothing() {
    let fx = Fixture::builder(&["eh1:2"])
        .producer(|config| config.linger = Duration::from_millis(1))
        .start()
        .await;
    fx.faults().force_close_after_transfers(5);
    let outcomes = fx
        .send_many("eh1", 3000, |i| {
            Event::text(format!("e-{i}")).with_message_id(format!("{i}"))
        })
        .await;
    assert_all_ok(&outcomes);
    let seen: HashSet<String> = fx.stored_bodies("eh1").into_iter().collect();
    assert_eq!(
        seen.len(),
        3000,
        "every accepted event is stored (duplicates allowed: at least once)"
    );
    assert!(
        fx.producer().stats().pool.opened_total >= 2,
        "a new connection replaced the closed one"
    );
}

#[tokio::test]
async fn detached_links_are_replaced() {
    let fx = Fixture::start(&["eh1:1"]).await;
    let producer = fx.producer();
    producer.send("eh1", Event::text("before")).await.unwrap();
    fx.faults().detach_all_links();
    tokio::time::sleep(Duration::from_millis(100)).await;
    producer
        .send("eh1", Event::text("after"))
        .await
        .expect("a new link");
    assert_eq!(fx.stored_count("eh1", "0"), 2);
}

#[tokio::test]
async fn a_batch_refused_for_one_event_is_sent_apart_and_only_that_event_fails() {
    // A rule only the emulator knows: the producer cannot check it first, so the batch is refused whole.
    let fx = Fixture::builder(&["eh1:2"])
        .faults(|faults| faults.refuse_events_containing(Some(b"POISON")))
        .producer(|config| config.linger = Duration::from_millis(50))
        .start()
        .await;
    let keyless = fx.send_many("eh1", 600, |i| {
        Event::text(if i == 300 {
            "POISON".to_owned()
        } else {
            format!("e-{i}")
        })
    });
    // A key's events keep their order through the halves.
    let keyed = async {
        let mut tickets = Vec::new();
        let deadline = enqueue_deadline();
        for i in 0..200 {
            let body = if i == 77 {
                "POISON".to_owned()
            } else {
                format!("k-{i}")
            };
            let event = Event::text(body).with_partition_key("one-key");
            tickets.push(fx.producer().enqueue("eh1", event, deadline).await.unwrap());
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
    let bodies = fx.stored_bodies("eh1");
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
    let expected: Vec<String> = (0..600)
        .filter(|&i| i != 300)
        .map(|i| format!("e-{i}"))
        .chain(expected_keyed)
        .collect();
    assert_eq!(
        sorted(bodies),
        sorted(expected),
        "every other event stored exactly once"
    );
}

/// A producer of `fx`'s emulator through `relay`, serving `eh1`, ready; `edit` applied to the tests' config.
async fn relayed(fx: &Fixture, relay: &Relay, edit: impl FnOnce(&mut ProducerConfig)) -> Producer {
    let mut config = test_producer_config();
    edit(&mut config);
    let producer = Producer::from_connection_string(
        &relay.connection_string(fx),
        false,
        Default::default(),
        config,
    )
    .expect("valid producer config");
    producer.expect_hubs(&["eh1".to_owned()]);
    assert!(
        eventually(|| async { producer.is_ready() }).await,
        "{:?}",
        producer.readiness()
    );
    producer
}

/// Resets the connection when Event Hubs sends its next disposition (from now: the producer is warmed up, so
/// that is a batch's), so the batch was stored and its outcome never arrives; once.
fn reset_at_the_next_disposition(relay: &Relay) {
    let armed = AtomicBool::new(true);
    relay.set_rule(move |frame| {
        if frame.performative == Some(performative::DISPOSITION)
            && armed.swap(false, Ordering::SeqCst)
        {
            Verdict::Reset
        } else {
            Verdict::Forward
        }
    });
}

/// Each stored body with the message ids of its stored copies.
fn stored_ids(fx: &Fixture) -> HashMap<String, Vec<Option<MessageId>>> {
    let mut ids: HashMap<String, Vec<Option<MessageId>>> = HashMap::new();
    for (_, message) in stored_events(fx, "eh1", 1) {
        let id = message
            .properties
            .as_ref()
            .and_then(|p| p.message_id.clone());
        ids.entry(body_text(&message)).or_default().push(id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_before_the_disposition_resends_and_every_stored_copy_carries_the_events_message_id()
 {
    let fx = Fixture::emulator(&["eh1:1"]).await;
    let relay = Relay::start(fx.local_addr()).await;
    let producer = relayed(&fx, &relay, |config| {
        config.linger = Duration::from_millis(20)
    })
    .await;
    reset_at_the_next_disposition(&relay);
    let outcomes = send_many(&producer, "eh1", 20, |i| {
        Event::text(format!("e-{i}")).with_message_id(format!("id-{i}"))
    })
    .await;
    assert_all_ok(&outcomes);
    let stored = stored_ids(&fx);
    assert_eq!(stored.len(), 20, "{stored:?}");
    let mut duplicated = 0;
    for (body, ids) in &stored {
        let expected = Some(MessageId::String(body.replace("e-", "id-")));
        assert!(ids.iter().all(|id| *id == expected), "{body}: {ids:?}");
        duplicated += usize::from(ids.len() > 1);
    }
    assert!(
        duplicated > 0,
        "the reset batch was stored, then resent and stored again: {stored:?}"
    );
    assert!(producer.stats().pool.opened_total >= 2);
    producer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assigned_message_ids_tell_a_resends_duplicates_apart_and_leave_callers_ids_alone() {
    let fx = Fixture::emulator(&["eh1:1"]).await;
    let relay = Relay::start(fx.local_addr()).await;
    let producer = relayed(&fx, &relay, |config| {
        config.linger = Duration::from_millis(20);
        config.assign_message_ids = true;
    })
    .await;
    reset_at_the_next_disposition(&relay);
    let outcomes = send_many(&producer, "eh1", 20, |i| {
        let event = Event::text(format!("e-{i}"));
        if i == 7 {
            event.with_message_id("the caller's")
        } else {
            event
        }
    })
    .await;
    assert_all_ok(&outcomes);
    let stored = stored_ids(&fx);
    assert_eq!(stored.len(), 20, "{stored:?}");
    let mut duplicated = 0;
    let mut assigned = HashSet::new();
    for (body, ids) in &stored {
        // Every copy of an event has the same id; a resend does not draw a new one.
        assert!(
            ids.windows(2).all(|pair| pair[0] == pair[1]),
            "{body}: {ids:?}"
        );
        duplicated += usize::from(ids.len() > 1);
        match &ids[0] {
            Some(MessageId::String(id)) if body == "e-7" => assert_eq!(id, "the caller's"),
            Some(MessageId::String(id)) => {
                let uuid = uuid::Uuid::parse_str(id).expect("a UUID");
                assert_eq!(uuid.get_version_num(), 4, "{id}");
                assert!(assigned.insert(id.clone()), "{id} given twice");
            }
            other => panic!("{body}: {other:?}"),
        }
    }
    assert!(duplicated > 0, "{stored:?}");
    producer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_whose_disposition_never_arrives_are_never_answered_ok() {
    let fx = Fixture::emulator(&["eh1:1"]).await;
    let relay = Relay::start(fx.local_addr()).await;
    let producer = relayed(&fx, &relay, |config| {
        config.linger = Duration::from_millis(20);
        config.disposition_timeout = Duration::from_millis(300);
        config.send_timeout = Duration::from_secs(2);
    })
    .await;
    // Event Hubs stores every batch; its Accepted never reaches the producer.
    relay.set_rule(|frame| {
        if frame.performative == Some(performative::DISPOSITION) {
            Verdict::Drop
        } else {
            Verdict::Forward
        }
    });
    let started = Instant::now();
    let outcomes = send_many(&producer, "eh1", 20, |i| Event::text(format!("e-{i}"))).await;
    for outcome in &outcomes {
        assert!(
            matches!(outcome, Err(SendError::OutcomeUnknown { .. })),
            "{outcome:?}"
        );
    }
    assert!(started.elapsed() < TIMEOUT, "{:?}", started.elapsed());
    assert!(
        fx.stored_count("eh1", "0") >= 20,
        "stored (perhaps more than once), never confirmed"
    );
    producer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_management_read_ends_as_soon_as_its_silent_connection_is_declared_dead() {
    let fx = Fixture::emulator(&["eh1:2"]).await;
    let relay = Relay::start(fx.local_addr()).await;
    // No hub declared: no warm-up, so the first message Event Hubs sends is the READ's answer. It hangs there.
    relay.set_rule(|frame| {
        if frame.connection == 0 && frame.performative == Some(performative::TRANSFER) {
            Verdict::Stall
        } else {
            Verdict::Forward
        }
    });
    let mut config = test_producer_config();
    config.stall_timeout = Duration::from_secs(1);
    let producer = Producer::from_connection_string(
        &relay.connection_string(&fx),
        false,
        Default::default(),
        config,
    )
    .expect("valid producer config");
    let asked = Instant::now();
    let error = producer.hub_properties("eh1").await.unwrap_err();
    // The stall check's period and tick; the READ's own bound is pool_connection_create_timeout (30 s).
    assert!(
        asked.elapsed() < Duration::from_secs(4),
        "answered after {:?}: {error}",
        asked.elapsed()
    );
    assert!(matches!(error, SendError::Connection(_)), "{error:?}");
    assert_eq!(producer.stats().pool.stalled_total, 1);
    let properties = producer
        .hub_properties("eh1")
        .await
        .expect("read on a new connection");
    assert_eq!(properties.partition_ids, ["0", "1"]);
    producer.close().await;
}
