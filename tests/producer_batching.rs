//! The producer against the in-process emulator, how events travel: shared batches within the link's size,
//! the linger, batches in flight on one link, the rate limit, the buffer's bound, close flushing what lingers.

mod support;

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use support::*;

#[tokio::test]
async fn concurrent_events_share_batches_and_all_arrive() {
    let fx = Fixture::builder(&["eh1:4"])
        .producer(|config| config.linger = Duration::from_millis(50))
        .start()
        .await;
    let outcomes = fx
        .send_many("eh1", 2000, |i| Event::text(format!("e-{i}")))
        .await;
    assert_all_ok(&outcomes);
    assert_eq!(
        sorted(fx.stored_bodies("eh1")),
        sorted((0..2000).map(|i| format!("e-{i}")).collect()),
        "every event stored exactly once"
    );
    let transfers = fx.faults().transfers_seen();
    assert!(
        transfers < 100,
        "2000 events in {transfers} transfers: batches were shared"
    );
}

#[tokio::test]
async fn a_batch_never_exceeds_the_link_limit() {
    let fx = Fixture::builder(&["eh1:1"])
        .emulator(|config| config.max_message_size = 64 * 1024)
        .producer(|config| config.linger = Duration::from_millis(100))
        .start()
        .await;
    // 200 events of 1 KiB: at least four batches of at most 64 KiB, none refused for size.
    let outcomes = fx
        .send_many("eh1", 200, |i| Event::binary(vec![i as u8; 1024]))
        .await;
    assert_all_ok(&outcomes);
    assert_eq!(fx.stored_count("eh1", "0"), 200);
    assert!(fx.faults().transfers_seen() >= 4);
    // Alone too large: refused up front, with the limit.
    let error = fx
        .producer()
        .send("eh1", Event::binary(vec![0; 70 * 1024]))
        .await
        .unwrap_err();
    assert!(
        matches!(error, SendError::TooLarge { limit: 65536, .. }),
        "{error}"
    );
}

#[tokio::test]
async fn events_linger_for_company_then_go_together() {
    let fx = Fixture::builder(&["eh1:1"])
        .producer(|config| {
            config.linger = Duration::from_millis(300);
            config.adaptive_linger = false;
        })
        .start()
        .await;
    let started = Instant::now();
    let outcomes = fx
        .send_many("eh1", 10, |i| Event::text(format!("{i}")))
        .await;
    assert!(outcomes.iter().all(Result::is_ok));
    // A lower bound only: the batch cannot have left before its linger ended.
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(fx.faults().transfers_seen(), 1, "ten events, one batch");
}

#[tokio::test]
async fn an_adaptive_linger_sends_at_once_then_gathers_behind_the_batch_in_flight() {
    let fx = Fixture::builder(&["eh1:1"])
        .producer(|config| config.linger = Duration::from_secs(30))
        .faults(|faults| faults.delay_dispositions(Duration::from_millis(300)))
        .start()
        .await;
    let first = fx
        .send_many("eh1", 1, |i| Event::text(format!("{i}")))
        .await;
    assert!(
        first.iter().all(Result::is_ok),
        "sent without waiting the 30 s linger"
    );
    // Ten at once: some may go before the others queue, the rest go together once that batch is answered.
    let outcomes = fx
        .send_many("eh1", 10, |i| Event::text(format!("{i}")))
        .await;
    assert!(outcomes.iter().all(Result::is_ok));
    let transfers = fx.faults().transfers_seen();
    assert!(
        (2..=3).contains(&transfers),
        "one batch, then ten events in at most two: {transfers} transfers"
    );
}

#[tokio::test]
async fn many_batches_are_in_flight_on_one_link() {
    let fx = Fixture::builder(&["eh1:1"])
        .emulator(|config| config.max_message_size = 4096) // three 1 KiB events per batch
        .faults(|faults| faults.delay_dispositions(Duration::from_millis(500)))
        .producer(|config| {
            config.max_size = 1;
            config.linger = Duration::from_millis(0);
            config.max_in_flight_unordered = 8;
        })
        .start()
        .await;
    let producer = fx.producer();
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
}

#[tokio::test]
async fn the_rate_limit_paces_batches_and_every_event_still_arrives() {
    let fx = Fixture::builder(&["eh1:2"])
        .producer(|config| {
            config.rate_limit_events_per_second = NonZeroU32::new(400);
            config.rate_limit_bytes_per_second = NonZeroU32::new(1_000_000);
        })
        .start()
        .await;
    let started = Instant::now();
    let outcomes = fx
        .send_many("eh1", 1000, |i| Event::text(format!("e-{i}")))
        .await;
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    assert_eq!(
        fx.stored_count("eh1", "0") + fx.stored_count("eh1", "1"),
        1000
    );
    assert!(fx.producer().stats().rate_limited_batches > 0);
    // A bucket holds one second of the rate: 1000 events at 400/s cannot all go in under 1.5 s (a lower bound,
    // safe on a slow machine).
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn close_flushes_lingering_events() {
    let fx = Fixture::builder(&["eh1:1"])
        .producer(|config| config.linger = Duration::from_secs(30))
        .start()
        .await;
    let producer = fx.producer();
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
    assert_eq!(fx.stored_count("eh1", "0"), 100);
    assert_eq!(
        producer.send("eh1", Event::text("late")).await,
        Err(SendError::Closed)
    );
}

#[tokio::test]
async fn full_buffers_answer_overloaded_within_the_deadline() {
    let fx = Fixture::builder(&["eh1:1"])
        .faults(|faults| faults.delay_dispositions(Duration::from_secs(3)))
        .producer(|config| config.max_buffered_bytes = 1024 * 1024)
        .start()
        .await;
    let producer = fx.producer();
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
}

#[tokio::test]
async fn a_send_is_a_small_future() {
    // tonic boxes every call's future, moving it whole: a send that held the pool's slow paths inline (opening
    // a connection, attaching a link, reading the hub) weighed 19 KB and its copies cost the gateway a tenth
    // of its instructions per event. Those paths are boxed; this keeps it so.
    let fx = Fixture::builder(&["eh1:2"])
        .producer(|config| *config = ProducerConfig::default())
        .start()
        .await;
    let send = fx.producer().send("eh1", Event::text("x"));
    let size = std::mem::size_of_val(&send);
    assert!(size <= 4096, "a send's future is {size} bytes");
}
