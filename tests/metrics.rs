//! The metrics listener of an in-process gateway, over loopback HTTP: `/metrics` counts what went through each
//! RPC and shows the pool, `/healthz` answers, `/readyz` follows the connection and the drain. Each test serves
//! its own hub, so the process-wide counters of one test never mix with another's.

mod support;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use eventhub_gateway::proto::v1;
use support::*;
use tonic::Code;

fn stream_request(sequence: u64, event: v1::Event) -> v1::SendStreamRequest {
    v1::SendStreamRequest {
        event_hub: String::new(),
        events: Vec::new(),
        sequence,
        event: Some(event),
    }
}

#[tokio::test]
async fn counters_match_the_events_sent_through_every_rpc() {
    let hub = "metrics-counters";
    let gateway = start_gateway(|config| config.event_hubs = vec![hub.into()]).await;
    let mut client = gateway_client(&gateway).await;

    for n in 0..3 {
        send_text(&mut client, &format!("unary {n}")).await.unwrap();
    }
    let mut batch: Vec<v1::Event> = (0..5).map(|n| text_event(&format!("batch {n}"))).collect();
    batch.push(v1::Event::default()); // no body: INVALID_EVENT, alone
    let results = client
        .send_events(v1::SendEventsRequest {
            event_hub: String::new(),
            events: batch,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let failed = results
        .iter()
        .filter(|result| result.status.as_ref().unwrap().code != Code::Ok as i32)
        .count();
    assert_eq!(failed, 1);
    let requests = (1..=7)
        .map(|sequence| stream_request(sequence, text_event(&format!("stream {sequence}"))))
        .collect();
    let (acks, ended) = stream_events(&mut client, requests).await;
    ended.unwrap();
    assert_eq!(acks.len(), 7);
    // A hub the gateway does not serve is the caller's text: refused, never a label.
    let unknown = client
        .send_event(v1::SendEventRequest {
            event_hub: "not-served".into(),
            event: Some(text_event("x")),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let response = http_get(gateway.metrics_addr(), "/metrics").await.unwrap();
    assert_eq!(response.status, 200);
    assert!(
        response
            .header("content-type")
            .is_some_and(|value| value.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        response.headers
    );
    let page = &response.body;
    for declared in [
        "# TYPE eventhub_gateway_events_received_total counter",
        "# TYPE eventhub_gateway_events_sent_total counter",
        "# TYPE eventhub_gateway_batch_events histogram",
        "# TYPE eventhub_gateway_send_duration_seconds histogram",
        "# TYPE eventhub_gateway_pool_connections gauge",
        "# HELP eventhub_gateway_events_sent_total Events answered, by hub and outcome",
    ] {
        assert!(
            page.lines().any(|line| line.starts_with(declared)),
            "{declared}"
        );
    }
    let samples = prometheus_samples(page);
    let value = |name: &str, labels: &[(&str, &str)]| sample_value(&samples, name, labels);
    let received = "eventhub_gateway_events_received_total";
    assert_eq!(
        value(received, &[("event_hub", hub), ("rpc", "send_event")]),
        Some(3.0)
    );
    assert_eq!(
        value(received, &[("event_hub", hub), ("rpc", "send_events")]),
        Some(6.0)
    );
    assert_eq!(
        value(received, &[("event_hub", hub), ("rpc", "send_stream")]),
        Some(7.0)
    );
    let sent = "eventhub_gateway_events_sent_total";
    assert_eq!(
        value(sent, &[("event_hub", hub), ("outcome", "ok")]),
        Some(15.0)
    );
    assert_eq!(
        value(sent, &[("event_hub", hub), ("outcome", "invalid_event")]),
        Some(1.0)
    );
    assert!(
        !samples
            .iter()
            .any(|sample| sample.labels.values().any(|label| label == "not-served")),
        "an unknown hub became a label"
    );
    assert_eq!(
        value("eventhub_gateway_events_in_flight", &[("event_hub", hub)]),
        Some(0.0)
    );
    let batches = value("eventhub_gateway_batch_events_count", &[("event_hub", hub)]).unwrap();
    assert!(batches > 0.0);
    // Every accepted event went out in exactly one batch (no retries here).
    assert_eq!(
        value("eventhub_gateway_batch_events_sum", &[("event_hub", hub)]),
        Some(15.0)
    );
    assert!(value("eventhub_gateway_batch_bytes_sum", &[("event_hub", hub)]).unwrap() > 15.0 * 6.0);
    assert_eq!(
        value(
            "eventhub_gateway_send_duration_seconds_count",
            &[("event_hub", hub), ("outcome", "ok")]
        ),
        Some(batches)
    );
    assert_eq!(
        value(
            "eventhub_gateway_batch_events_bucket",
            &[("event_hub", hub), ("le", "+Inf")]
        ),
        Some(batches)
    );
    assert!(value("eventhub_gateway_pool_connections", &[("state", "ready")]).unwrap() >= 1.0);
    assert!(value("eventhub_gateway_pool_links", &[]).unwrap() >= 1.0);
    assert!(value("eventhub_gateway_connections_opened_total", &[]).unwrap() >= 1.0);
    assert!(value("eventhub_gateway_token_refreshes_total", &[]).unwrap() >= 1.0);
    assert_eq!(value("eventhub_gateway_ready", &[]), Some(1.0));
    for bound in ["total", "per_client"] {
        assert_eq!(
            value("eventhub_gateway_shed_calls_total", &[("bound", bound)]),
            Some(0.0)
        );
    }
    for present in [
        "eventhub_gateway_pool_waiters",
        "eventhub_gateway_batches_in_flight",
        "eventhub_gateway_buffered_bytes",
        "eventhub_gateway_calls_in_flight",
        "eventhub_gateway_rate_limited_events_total",
        "eventhub_gateway_token_refresh_failures_total",
        "eventhub_gateway_producer_rate_limited_batches_total",
    ] {
        assert!(value(present, &[]).is_some(), "{present}");
    }
    // The stream's task ends just after its last response: the gauge follows within a moment.
    assert!(
        eventually(|| async {
            sample_value(
                &scrape(&gateway).await,
                "eventhub_gateway_streams_open",
                &[],
            ) == Some(0.0)
        })
        .await
    );
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn refused_events_are_counted_by_reason_and_the_rate_limit_total() {
    let hub = "metrics-refusals";
    let gateway = start_gateway(|config| {
        config.event_hubs = vec![hub.into()];
        config.limits.client_events_per_second = NonZeroU32::new(2);
    })
    .await;
    let mut client = gateway_client(&gateway).await;
    let mut limited = 0.0;
    for n in 0..10 {
        if let Err(status) = send_text(&mut client, &format!("event {n}")).await {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            limited += 1.0;
        }
    }
    assert!(limited >= 1.0, "ten events at once over a limit of 2/s");
    let samples = scrape(&gateway).await;
    let value = |name: &str, labels: &[(&str, &str)]| sample_value(&samples, name, labels);
    assert_eq!(
        value(
            "eventhub_gateway_events_sent_total",
            &[("event_hub", hub), ("outcome", "rate_limited")]
        ),
        Some(limited)
    );
    assert_eq!(
        value(
            "eventhub_gateway_events_sent_total",
            &[("event_hub", hub), ("outcome", "ok")]
        ),
        Some(10.0 - limited)
    );
    assert_eq!(
        value("eventhub_gateway_rate_limited_events_total", &[]),
        Some(limited)
    );
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn probes_answer_and_readyz_says_draining_during_the_drain() {
    let gateway = start_gateway(|config| config.event_hubs = vec!["metrics-probes".into()]).await;
    let addr = gateway.metrics_addr();
    assert!(addr.ip().is_loopback());
    assert_ne!(addr.port(), 0);

    let health = http_get(addr, "/healthz").await.unwrap();
    assert_eq!((health.status, health.body.trim()), (200, "ok"));
    // The pool warms its first connection in the background.
    assert!(
        eventually(|| async { http_get(addr, "/readyz").await.unwrap().status == 200 }).await,
        "ready once a connection is open"
    );
    let ready = http_get(addr, "/readyz").await.unwrap();
    assert_eq!(ready.body.trim(), "ready");
    assert_eq!(http_get(addr, "/nothing").await.unwrap().status, 404);

    gateway.state().start_draining();
    let draining = http_get(addr, "/readyz").await.unwrap();
    assert_eq!((draining.status, draining.body.trim()), (503, "draining"));
    assert_eq!(http_get(addr, "/healthz").await.unwrap().status, 200);
    assert_eq!(
        sample_value(&scrape(&gateway).await, "eventhub_gateway_ready", &[]),
        Some(0.0)
    );

    assert!(gateway.shutdown().await.unwrap());
    // The listener is gone with the gateway.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn readyz_is_503_while_event_hubs_cannot_be_reached() {
    // A loopback port that nothing listens on: every connection attempt is refused.
    let closed: SocketAddr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let gateway = start_gateway(|config| {
        config.emulator = false;
        config.event_hubs = vec!["metrics-unreachable".into()];
        config.connection_string = Some(format!(
            "Endpoint=sb://127.0.0.1:{};SharedAccessKeyName=RootManageSharedAccessKey;\
             SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;",
            closed.port()
        ));
    })
    .await;
    let not_ready = http_get(gateway.metrics_addr(), "/readyz").await.unwrap();
    assert_eq!(not_ready.status, 503, "{}", not_ready.body);
    // The reason follows: "connecting" during the first attempt, then the last attempt's error.
    let says_why = || async {
        let body = http_get(gateway.metrics_addr(), "/readyz")
            .await
            .unwrap()
            .body;
        body.starts_with("no ready connection to Event Hubs: could not connect to 127.0.0.1:")
    };
    assert!(
        eventually(says_why).await,
        "{}",
        http_get(gateway.metrics_addr(), "/readyz")
            .await
            .unwrap()
            .body
    );
    let samples = scrape(&gateway).await;
    assert_eq!(
        sample_value(
            &samples,
            "eventhub_gateway_pool_connections",
            &[("state", "ready")]
        ),
        Some(0.0)
    );
    assert_eq!(
        sample_value(&samples, "eventhub_gateway_ready", &[]),
        Some(0.0)
    );
    assert_eq!(
        http_get(gateway.metrics_addr(), "/healthz")
            .await
            .unwrap()
            .status,
        200
    );
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn connection_attempts_and_failures_are_counted_apart_from_connections_opened() {
    let closed: SocketAddr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let gateway = start_gateway(|config| {
        config.emulator = false;
        config.event_hubs = vec!["metrics-attempts".into()];
        config.connection_string = Some(format!(
            "Endpoint=sb://127.0.0.1:{};SharedAccessKeyName=RootManageSharedAccessKey;\
             SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;",
            closed.port()
        ));
    })
    .await;
    let producer = gateway.state().producer().clone();
    assert!(
        eventually(|| async { producer.stats().pool.connect_attempts >= 2 }).await,
        "{:?}",
        producer.stats()
    );
    // A call fails with what happened: nothing ever connected, so nothing was "lost".
    let mut client = gateway_client(&gateway).await;
    let mut request = tonic::Request::new(v1::SendEventRequest {
        event_hub: String::new(),
        event: Some(text_event("x")),
    });
    request.set_timeout(std::time::Duration::from_millis(800));
    let status = client.send_event(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{status:?}"
    );
    assert!(
        status
            .message()
            .contains(&format!("could not connect to 127.0.0.1:{}", closed.port())),
        "{status:?}"
    );
    assert!(!status.message().contains("lost"), "{status:?}");

    let pool = producer.stats().pool;
    assert_eq!(
        pool.opened_total, 0,
        "attempts are not connections: {pool:?}"
    );
    let samples = scrape(&gateway).await;
    let value = |name: &str, labels: &[(&str, &str)]| sample_value(&samples, name, labels);
    // Process-wide totals (other tests' gateways may share this process): at least this gateway's counts.
    assert!(
        value("eventhub_gateway_connection_attempts_total", &[]).unwrap() >= 2.0,
        "{samples:?}"
    );
    assert!(
        value(
            "eventhub_gateway_connection_failures_total",
            &[("reason", "tcp")]
        )
        .unwrap()
            >= 1.0
    );
    for reason in ["proxy", "tls", "websocket", "amqp", "timeout"] {
        assert!(
            value(
                "eventhub_gateway_connection_failures_total",
                &[("reason", reason)]
            )
            .is_some(),
            "{reason}"
        );
    }
    assert!(value("eventhub_gateway_connections_opened_total", &[]).is_some());
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_taken_metrics_port_stops_the_start_with_its_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let config = eventhub_gateway::config::GatewayConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics_listen: addr,
        emulator: true,
        ..Default::default()
    };
    let error = match eventhub_gateway::server::start(config).await {
        Ok(_) => panic!("started on a taken metrics port"),
        Err(error) => error,
    };
    assert!(error.to_string().contains(&addr.to_string()), "{error}");
}

#[tokio::test]
async fn throttled_batches_are_retried_and_counted() {
    let hub = "metrics-retries";
    let gateway = start_gateway(|config| {
        config.event_hubs = vec![hub.into()];
        config.producer.retry_initial_backoff = Duration::from_millis(1);
        config.producer.retry_max_backoff = Duration::from_millis(10);
    })
    .await;
    let mut client = gateway_client(&gateway).await;
    send_text(&mut client, "warm-up").await.unwrap();
    let emulator = gateway.emulator().expect("an in-process emulator");
    emulator.faults().throttle_next_sends(2);
    send_text(&mut client, "throttled twice, then stored")
        .await
        .unwrap();
    let samples = scrape(&gateway).await;
    let value = |name: &str, labels: &[(&str, &str)]| sample_value(&samples, name, labels);
    assert_eq!(
        value("eventhub_gateway_retries_total", &[("event_hub", hub)]),
        Some(2.0)
    );
    // One batch call per event (the retries are inside it), both in the end accepted.
    assert_eq!(
        value(
            "eventhub_gateway_send_duration_seconds_count",
            &[("event_hub", hub), ("outcome", "ok")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            "eventhub_gateway_events_sent_total",
            &[("event_hub", hub), ("outcome", "ok")]
        ),
        Some(2.0)
    );
    gateway.shutdown().await.unwrap();
}
