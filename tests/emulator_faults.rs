//! The emulator's injected faults, each seen from a real AMQP client: throttling, released deliveries,
//! slow dispositions, forced connection closes, forced detaches, token expiry and refused connections.

mod support;

use std::time::{Duration, Instant};

use fe2o3_amqp_types::messaging::Outcome;
use support::{
    Client, Fixture, TIMEOUT, batch, condition_name, detach_error, event, refused_sender_condition,
    rejected_condition,
};

#[tokio::test]
async fn throttled_sends_are_rejected_server_busy_and_not_stored() {
    let emulator = Fixture::emulator(&["eh1:1"]).await;
    let (client, mut sender) = emulator.sender("eh1").await;
    emulator.faults().throttle_next_sends(2);
    for _ in 0..2 {
        let outcome = sender.send(event("throttled", None)).await.unwrap();
        assert_eq!(
            rejected_condition(&outcome).as_deref(),
            Some("com.microsoft:server-busy")
        );
    }
    let outcome = sender.send(event("through", None)).await.unwrap();
    assert!(matches!(outcome, Outcome::Accepted(_)));
    assert_eq!(emulator.partition_events("eh1", "0").unwrap().len(), 1);
    client.close().await;
}

#[tokio::test]
async fn released_sends_are_answered_released_and_not_stored() {
    let emulator = Fixture::emulator(&["eh1:1"]).await;
    let (client, mut sender) = emulator.sender("eh1").await;
    emulator.faults().release_next_sends(1);
    assert!(matches!(
        sender.send(event("released", None)).await.unwrap(),
        Outcome::Released(_)
    ));
    assert!(matches!(
        sender.send(event("kept", None)).await.unwrap(),
        Outcome::Accepted(_)
    ));
    assert_eq!(emulator.partition_events("eh1", "0").unwrap().len(), 1);
    client.close().await;
}

#[tokio::test]
async fn delayed_dispositions_arrive_no_sooner_than_the_delay_and_keep_the_link_pipelined() {
    let emulator = Fixture::emulator(&["eh1:1"]).await;
    let (client, mut sender) = emulator.sender("eh1").await;
    let delay = Duration::from_millis(300);
    emulator.faults().delay_dispositions(delay);
    let started = Instant::now();
    let mut pending = Vec::new();
    for i in 0..20 {
        pending.push(
            sender
                .send_batchable(batch(&[event(&format!("{i}"), None)], None))
                .await
                .unwrap(),
        );
    }
    for outcome in pending {
        assert!(matches!(outcome.await.unwrap(), Outcome::Accepted(_)));
    }
    // A lower bound only: the delay is injected, so the outcome cannot come before it.
    assert!(started.elapsed() >= delay, "{:?}", started.elapsed());
    assert_eq!(
        emulator.partition_events("eh1", "0").unwrap().len(),
        20,
        "stored before being settled"
    );
    emulator.faults().delay_dispositions(Duration::ZERO);
    client.close().await;
}

#[tokio::test]
async fn latency_option_delays_every_disposition() {
    let emulator = Fixture::builder(&["eh1:1"])
        .emulator(|config| config.latency = Duration::from_millis(200))
        .without_producer()
        .start()
        .await;
    let (client, mut sender) = emulator.sender("eh1").await;
    let started = Instant::now();
    assert!(matches!(
        sender.send(event("slow", None)).await.unwrap(),
        Outcome::Accepted(_)
    ));
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    client.close().await;
}

#[tokio::test]
async fn forced_close_drops_the_connection_before_storing_the_nth_transfer() {
    let emulator = Fixture::emulator(&["eh1:1"]).await;
    let (client, mut sender) = emulator.sender("eh1").await;
    emulator.faults().force_close_after_transfers(3);
    for i in 0..2 {
        assert!(matches!(
            sender.send(event(&format!("{i}"), None)).await.unwrap(),
            Outcome::Accepted(_)
        ));
    }
    // fe2o3 0.18 does not fail a send awaiting its disposition when the peer closes the connection,
    // so the outcome is bounded here and the close error read from the connection itself.
    let cut = tokio::time::timeout(Duration::from_secs(2), sender.send(event("cut", None))).await;
    assert!(
        !matches!(cut, Ok(Ok(_))),
        "the third transfer gets no outcome: {cut:?}"
    );
    let mut client = client;
    let closed = tokio::time::timeout(TIMEOUT, client.connection.on_close())
        .await
        .expect("closed in time");
    assert!(
        format!("{closed:?}").contains("ConnectionForced"),
        "{closed:?}"
    );
    assert_eq!(
        emulator.partition_events("eh1", "0").unwrap().len(),
        2,
        "the third transfer was not stored"
    );

    // Other and new connections are unaffected.
    let (client2, mut sender2) = emulator.sender("eh1").await;
    assert!(matches!(
        sender2.send(event("after", None)).await.unwrap(),
        Outcome::Accepted(_)
    ));
    client2.close().await;
}

#[tokio::test]
async fn detach_all_links_detaches_with_detach_forced() {
    let emulator = Fixture::emulator(&["eh1:1"]).await;
    let (mut client, mut sender) = emulator.sender("eh1").await;
    emulator.faults().detach_all_links();
    let err = tokio::time::timeout(TIMEOUT, sender.on_detach())
        .await
        .expect("detached in time");
    assert!(format!("{err:?}").contains("DetachForced"), "{err:?}");
    // The connection and session survive: a new link works.
    let mut again = client.sender("eh1").await.unwrap();
    assert!(matches!(
        again.send(event("again", None)).await.unwrap(),
        Outcome::Accepted(_)
    ));
    client.close().await;
}

#[tokio::test]
async fn a_lapsed_token_detaches_its_link_unless_refreshed() {
    let emulator = Fixture::emulator(&["eh1:1"]).await;
    let mut client = Client::connect(&emulator).await.unwrap();
    client.authorize("eh1", Duration::from_secs(2)).await;
    let mut lapsing = client.sender("eh1").await.unwrap();
    let err = tokio::time::timeout(TIMEOUT, lapsing.on_detach())
        .await
        .expect("detached when the token lapsed");
    assert!(format!("{err:?}").contains("UnauthorizedAccess"), "{err:?}");

    // A token refreshed before expiry keeps the link.
    client.authorize("eh1", Duration::from_secs(2)).await;
    let mut refreshed = client.sender("eh1").await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    client.authorize("eh1", Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(matches!(
        refreshed.send(event("still valid", None)).await.unwrap(),
        Outcome::Accepted(_)
    ));
    client.close().await;
}

#[tokio::test]
async fn expire_tokens_detaches_links_and_needs_a_fresh_token() {
    let emulator = Fixture::emulator(&["eh1:1"]).await;
    let (mut client, mut sender) = emulator.sender("eh1").await;
    emulator.faults().expire_tokens();
    let err = tokio::time::timeout(TIMEOUT, sender.send(event("x", None)))
        .await
        .expect("answered in time")
        .expect_err("the link was detached");
    let error = detach_error(&err).unwrap_or_else(|| panic!("{err:?}"));
    assert_eq!(condition_name(&error.condition), "amqp:unauthorized-access");
    assert_eq!(
        refused_sender_condition(&mut client, "eh1").await,
        "amqp:unauthorized-access"
    );
    client.authorize("eh1", Duration::from_secs(60)).await;
    let mut fresh = client.sender("eh1").await.unwrap();
    assert!(matches!(
        fresh.send(event("fresh", None)).await.unwrap(),
        Outcome::Accepted(_)
    ));
    client.close().await;
}

#[tokio::test]
async fn refused_connections_recover_when_the_window_ends() {
    let emulator = Fixture::emulator(&["eh1:1"]).await;
    emulator
        .faults()
        .refuse_connections_for(Duration::from_millis(500));
    assert!(
        Client::connect(&emulator).await.is_err(),
        "refused during the window"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let client = Client::connect(&emulator)
        .await
        .expect("accepted after the window");
    client.close().await;
}

#[tokio::test]
async fn clear_turns_pending_faults_off() {
    let emulator = Fixture::emulator(&["eh1:1"]).await;
    let (client, mut sender) = emulator.sender("eh1").await;
    emulator.faults().throttle_next_sends(100);
    emulator.faults().clear();
    assert!(matches!(
        sender.send(event("clean", None)).await.unwrap(),
        Outcome::Accepted(_)
    ));
    client.close().await;
}

#[tokio::test]
async fn shutdown_closes_clients_and_ends_in_time() {
    let emulator = Fixture::emulator(&["eh1:1"]).await;
    let (_client, mut sender) = emulator.sender("eh1").await;
    let started = Instant::now();
    emulator.shutdown(Duration::from_secs(5)).await;
    assert!(started.elapsed() < Duration::from_secs(6));
    let sent = tokio::time::timeout(TIMEOUT, sender.send(event("too late", None)))
        .await
        .expect("fails in time");
    assert!(
        sent.is_err(),
        "nothing is accepted after shutdown: {sent:?}"
    );
}
