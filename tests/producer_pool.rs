//! The producer's connections: the ready message, the pool's knobs (get timeout, idle links and connections,
//! lifespan, create timeout), a peer that hangs at any step of the handshake (bounded, named, retried), an
//! unreachable Event Hubs retried with backoff until it comes up, and every transport.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::relay::{Frame, Relay, Verdict, performative};
use support::*;

/// A producer of the tests' configuration, after `edit`, for this connection string (no emulator behind it).
fn producer_for(connection_string: &str, edit: impl FnOnce(&mut ProducerConfig)) -> Producer {
    let mut config = test_producer_config();
    edit(&mut config);
    Producer::from_connection_string(connection_string, false, Default::default(), config)
        .expect("valid producer settings")
}

/// Hubs `eh1` and `eh2` and a producer with room for one link in all (one connection, one link), after `edit`.
async fn one_link(edit: impl FnOnce(&mut ProducerConfig)) -> Fixture {
    Fixture::builder(&["eh1:1", "eh2:1"])
        .producer(|config| {
            config.max_size = 1;
            config.client_limit = 1;
            edit(config);
        })
        .start()
        .await
}

#[tokio::test]
async fn ready_message_is_sent_once_per_connection() {
    let fx = Fixture::builder(&["eh1:1"])
        .producer(|config| config.ready_message = Some("ready".into()))
        .start()
        .await;
    fx.send_many("eh1", 50, |i| Event::text(format!("{i}")))
        .await;
    fx.producer()
        .send("eh1", Event::text("more"))
        .await
        .unwrap();
    let readies = fx
        .partition_bodies("eh1", "0")
        .iter()
        .filter(|body| *body == "ready")
        .count();
    assert_eq!(readies as u64, fx.producer().stats().pool.opened_total);
}

#[tokio::test]
async fn pool_get_timeout_is_honoured() {
    let fx = one_link(|config| {
        config.min_size = 1;
        config.pool_get_timeout = Duration::from_millis(300);
    })
    .await;
    let producer = fx.producer();
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
}

#[tokio::test]
async fn idle_links_free_their_slot_and_idle_connections_close() {
    let fx = one_link(|config| {
        config.min_size = 0;
        config.max_idle = Duration::from_millis(300);
    })
    .await;
    let producer = fx.producer();
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
}

#[tokio::test]
async fn connections_past_their_lifespan_are_replaced_without_failures() {
    let fx = Fixture::builder(&["eh1:2"])
        .producer(|config| {
            config.max_lifespan = Duration::from_millis(500);
            config.linger = Duration::from_millis(2);
        })
        .start()
        .await;
    let started = Instant::now();
    let mut sent = 0usize;
    while started.elapsed() < Duration::from_secs(3) {
        let outcomes = fx
            .send_many("eh1", 50, |i| Event::text(format!("{sent}-{i}")))
            .await;
        assert_all_ok(&outcomes);
        sent += 50;
    }
    assert!(
        fx.producer().stats().pool.opened_total >= 3,
        "{:?}",
        fx.producer().stats()
    );
    assert!(fx.stored("eh1").len() >= sent);
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
    let producer = producer_for(
        &format!(
            "Endpoint=sb://localhost:{port};SharedAccessKeyName=a;SharedAccessKey=b;UseDevelopmentEmulator=true"
        ),
        |config| {
            config.pool_connection_create_timeout = Duration::from_millis(300);
            config.retry_max_attempts = 1;
            config.min_size = 0;
        },
    );
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
}

/// A loopback port with nothing listening on it (bound, then released).
fn closed_loopback_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
    listener.local_addr().expect("its address").port()
}

#[tokio::test]
async fn an_unreachable_event_hubs_is_retried_with_backoff_then_recovers() {
    let (logs, _capture) = capture_logs(tracing::Level::INFO);
    let port = closed_loopback_port();
    let producer = producer_for(
        &format!(
            "Endpoint=sb://127.0.0.1:{port};SharedAccessKeyName=RootManageSharedAccessKey;\
             SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true"
        ),
        |config| {
            config.min_size = 1; // the pool keeps trying on its own
            config.reconnect_backoff_initial = Duration::from_millis(200);
            config.reconnect_backoff_max = Duration::from_secs(2);
        },
    );
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
    let warnings = logs
        .text()
        .lines()
        .filter(|line| line.contains(" WARN "))
        .count();
    assert!(
        (1..=2).contains(&warnings),
        "{warnings} warnings in 5 s:\n{}",
        logs.text()
    );
    assert!(
        logs.text().contains("could not connect to Event Hubs"),
        "{}",
        logs.text()
    );

    // Event Hubs comes up on that port: the pool finds it at its next attempt, and sends go through.
    let _fx = Fixture::builder(&["eh1:4"])
        .emulator(|config| config.listen = SocketAddr::from(([127, 0, 0, 1], port)))
        .without_producer()
        .start()
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
        logs.text().contains("connected to Event Hubs again"),
        "{}",
        logs.text()
    );
}

#[tokio::test]
async fn the_producer_sends_over_every_transport() {
    let pki = Arc::new(TestPki::generate());
    let fx = Fixture::builder(&["eh1:1"])
        .tls(&pki)
        .without_producer()
        .start()
        .await;
    for transport in [Transport::Amqp, Transport::Amqps, Transport::WebSockets] {
        let producer = fx.connect(Connect::Credential(transport, shared_key()));
        let outcomes = send_many(&producer, "eh1", 100, |i| {
            Event::text(format!("{transport:?}-{i}"))
        })
        .await;
        assert!(
            outcomes.iter().all(Result::is_ok),
            "{transport:?}: {:?}",
            outcomes.iter().find(|o| o.is_err())
        );
    }
    assert_eq!(fx.stored_count("eh1", "0"), 300);
}

/// The fixture itself: what a test drops is stopped, the producer closed and the emulator's port shut.
#[tokio::test]
async fn a_dropped_fixture_closes_its_producer_and_its_emulator() {
    let fx = Fixture::start(&["eh1:1"]).await;
    let producer = fx.producer().clone();
    producer.send("eh1", Event::text("x")).await.unwrap();
    let addr = fx.local_addr();
    drop(fx);
    assert!(
        eventually(|| async { tokio::net::TcpStream::connect(addr).await.is_err() }).await,
        "the emulator still accepts on {addr}"
    );
    assert_eq!(
        producer.send("eh1", Event::text("late")).await,
        Err(SendError::Closed)
    );
}

/// Where a peer stops answering during a connection's handshake, and the step the producer names for it.
struct Hang {
    what: &'static str,
    /// Whether the relay stalls at this frame, given how many attaches Event Hubs sent before it on its connection.
    at: fn(&Frame, usize) -> bool,
    step: &'static str,
}

const HANGS: [Hang; 6] = [
    Hang {
        what: "accepts TCP and sends nothing",
        at: |frame, _| frame.header.is_some(),
        step: "at the AMQP open (protocol header, SASL, open), nothing received from the peer",
    },
    Hang {
        what: "stops after SASL",
        at: |frame, _| frame.performative == Some(performative::OPEN),
        step: "at the AMQP open (protocol header, SASL, open)",
    },
    Hang {
        what: "stops after the open",
        at: |frame, _| frame.performative == Some(performative::BEGIN),
        step: "at the session's begin",
    },
    Hang {
        what: "never attaches $cbs",
        at: |frame, _| frame.performative == Some(performative::ATTACH),
        step: "at the attach of the $cbs links",
    },
    Hang {
        what: "never answers the CBS put-token",
        at: |frame, _| frame.performative == Some(performative::TRANSFER),
        step: "at the CBS put-token for eh1",
    },
    Hang {
        what: "never attaches the hub's sender",
        // The $cbs pair comes first.
        at: |frame, attaches| frame.performative == Some(performative::ATTACH) && attaches == 2,
        step: "at the attach of a sender to eh1",
    },
];

/// Stalls every connection through `relay` where `hang` says.
fn hang_every_connection(relay: &Relay, hang: &Hang) {
    let at = hang.at;
    let mut attaches = std::collections::HashMap::<usize, usize>::new();
    relay.set_rule(move |frame| {
        let seen = attaches.entry(frame.connection).or_default();
        let stall = at(frame, *seen);
        if frame.performative == Some(performative::ATTACH) {
            *seen += 1;
        }
        if stall {
            Verdict::Stall
        } else {
            Verdict::Forward
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_hangs_at_any_handshake_step_fails_each_attempt_in_its_bound_naming_the_step() {
    let create_timeout = Duration::from_millis(400);
    for hang in &HANGS {
        let fx = Fixture::emulator(&["eh1:1"]).await;
        let relay = Relay::start(fx.local_addr()).await;
        hang_every_connection(&relay, hang);
        let producer = producer_for(&relay.connection_string(&fx), |config| {
            config.pool_connection_create_timeout = create_timeout;
            config.reconnect_backoff_initial = Duration::from_millis(50);
            config.reconnect_backoff_max = Duration::from_millis(100);
        });
        producer.expect_hubs(&["eh1".to_owned()]);
        let what = hang.what;

        // While an attempt hangs, readiness says where; a send waiting on it fails at its own deadline, saying
        // the same.
        assert!(
            eventually(|| async {
                producer
                    .readiness()
                    .is_err_and(|why| why.ends_with(hang.step))
            })
            .await,
            "{what}: {:?}",
            producer.readiness()
        );
        let asked = Instant::now();
        let error = producer
            .send_with_deadline("eh1", Event::text("x"), asked + Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(
            asked.elapsed() < Duration::from_millis(800),
            "{what}: answered after {:?}",
            asked.elapsed()
        );
        assert!(
            matches!(&error, SendError::DeadlineExceeded { last_error: Some(why) } if why.contains(hang.step)),
            "{what}: {error:?}"
        );

        // Each attempt ends at the bound as a failure (the connection is not kept), and the next one follows
        // after a backoff pause.
        let pool = || producer.stats().pool;
        assert!(
            eventually(|| async { pool().connect_failures_at(ConnectStage::Timeout) >= 3 }).await,
            "{what}: {:?}",
            pool()
        );
        assert_eq!(pool().opened_total, 0, "{what}: {:?}", pool());
        let failed = producer.readiness().unwrap_err();
        assert!(
            failed.ends_with(&format!(
                "no answer within pool_connection_create_timeout ({create_timeout:?}) {}",
                hang.step
            )),
            "{what}: {failed}"
        );
        producer.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_answers_again_after_hanging_mid_handshake_is_connected_by_the_next_attempt() {
    let fx = Fixture::emulator(&["eh1:1"]).await;
    let relay = Relay::start(fx.local_addr()).await;
    hang_every_connection(&relay, &HANGS[4]);
    let producer = producer_for(&relay.connection_string(&fx), |config| {
        config.pool_connection_create_timeout = Duration::from_millis(400);
        config.reconnect_backoff_initial = Duration::from_millis(50);
        config.reconnect_backoff_max = Duration::from_millis(100);
    });
    producer.expect_hubs(&["eh1".to_owned()]);
    assert!(
        eventually(|| async { producer.stats().pool.connect_failures_total() >= 2 }).await,
        "{:?}",
        producer.stats()
    );
    assert!(!producer.is_ready());
    relay.clear_rule();
    assert!(
        eventually(|| async { producer.is_ready() }).await,
        "{:?}",
        producer.readiness()
    );
    producer
        .send("eh1", Event::text("after the hang"))
        .await
        .expect("sent once the peer answers");
    assert_eq!(fx.stored_count("eh1", "0"), 1);
    producer.close().await;
}

/// The producer's TCP connections to `port` that are still established (from this process's table).
fn established_to(port: u16) -> usize {
    let mut established = 0;
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(table) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in table.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote_port = fields
                .get(2)
                .and_then(|address| address.rsplit(':').next())
                .and_then(|port| u16::from_str_radix(port, 16).ok());
            // State 01 is ESTABLISHED.
            if remote_port == Some(port) && fields.get(3) == Some(&"01") {
                established += 1;
            }
        }
    }
    established
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_leaves_no_socket_or_task_behind_with_a_silent_peer() {
    let fx = Fixture::emulator(&["eh1:1"]).await;
    let relay = Relay::start(fx.local_addr()).await;
    // Sessions and links are up when the put-token hangs: fe2o3 would wait for the peer's close for ever.
    hang_every_connection(&relay, &HANGS[4]);
    let producer = producer_for(&relay.connection_string(&fx), |config| {
        config.pool_connection_create_timeout = Duration::from_millis(300);
        config.reconnect_backoff_initial = Duration::from_millis(50);
        config.reconnect_backoff_max = Duration::from_millis(100);
    });
    producer.expect_hubs(&["eh1".to_owned()]);
    assert!(
        eventually(|| async { producer.stats().pool.connect_failures_total() >= 5 }).await,
        "{:?}",
        producer.stats()
    );
    // The relay holds its side of every one open; the producer has cut its own but the attempt's under way.
    assert!(
        eventually(|| async { established_to(relay.addr.port()) <= 1 }).await,
        "{} sockets still open after {} failed attempts",
        established_to(relay.addr.port()),
        producer.stats().pool.connect_failures_total()
    );
    producer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_first_event_outlives_a_failed_connection_attempt() {
    let fx = Fixture::emulator(&["eh1:1"]).await;
    let relay = Relay::start(fx.local_addr()).await;
    // The first connection hangs before the AMQP header; the next ones are fine.
    relay.set_rule(|frame| {
        if frame.connection == 0 {
            Verdict::Stall
        } else {
            Verdict::Forward
        }
    });
    let producer = producer_for(&relay.connection_string(&fx), |config| {
        config.min_size = 0; // the send's own attempt is the first
        config.pool_connection_create_timeout = Duration::from_millis(300);
        config.reconnect_backoff_initial = Duration::from_millis(50);
    });
    producer
        .send("eh1", Event::text("first of its route"))
        .await
        .expect("retried on a second connection within its deadline");
    assert_eq!(relay.accepted(), 2);
    let pool = producer.stats().pool;
    assert_eq!(
        (
            pool.connect_failures_at(ConnectStage::Timeout),
            pool.opened_total
        ),
        (1, 1),
        "{pool:?}"
    );
    producer.close().await;
}
