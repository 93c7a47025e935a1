//! The producer against the emulator's injected faults: throttling and released deliveries retried up to the
//! attempt limit, a forced close and detached links recovered without loss, a batch refused for one event's
//! contents sent apart.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use futures_util::future::join_all;
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
