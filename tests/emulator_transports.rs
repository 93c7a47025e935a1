//! The emulator over its three transports (plain AMQP, AMQPS, AMQP over WebSockets), reached through the
//! producer's `open_connection`: CBS, a sender on `eh1`, a batch stored; TLS trust and WebSocket refusals.

mod support;

use std::time::Duration;

use std::sync::Arc;

use eventhub_emulator::{Emulator, EmulatorConfig, PemSource, TlsConfig};
use eventhub_producer::{
    ConnectionOptions, Endpoint, TlsOptions, Transport, TransportError, open_connection,
};
use fe2o3_amqp_types::messaging::Outcome;
use support::{Client, Fixture, TIMEOUT, TestPki, batch, config, event, loopback, trusting};

/// An emulator of hub `eh1` (two partitions) on all three transports, its certificate signed by a CA of
/// its own; no producer.
async fn tls_emulator() -> Fixture {
    Fixture::builder(&["eh1:2"])
        .tls(&Arc::new(TestPki::generate()))
        .without_producer()
        .start()
        .await
}

async fn open(endpoint: &Endpoint, tls: &TlsOptions) -> Result<Client, TransportError> {
    let connection = tokio::time::timeout(
        TIMEOUT,
        open_connection(&ConnectionOptions::new("transport-test"), endpoint, tls),
    )
    .await
    .expect("open finishes in time")?;
    Ok(Client::over(connection)
        .await
        .expect("session and CBS links"))
}

#[tokio::test]
async fn every_transport_carries_cbs_and_a_batch_to_storage() {
    let emulator = tls_emulator().await;
    let tls = emulator.tls();
    for transport in [Transport::Amqp, Transport::Amqps, Transport::WebSockets] {
        let mut client = open(&emulator.endpoint(transport), &tls)
            .await
            .unwrap_or_else(|err| panic!("{transport:?}: {err}"));
        client.authorize("eh1", Duration::from_secs(60)).await;
        let mut sender = client.sender("eh1/Partitions/1").await.expect("attached");
        let label = format!("{transport:?}");
        let events = [
            event(&format!("{label}-a"), None),
            event(&format!("{label}-b"), None),
        ];
        let outcome = tokio::time::timeout(TIMEOUT, sender.send(batch(&events, None)))
            .await
            .expect("settled in time")
            .expect("sent");
        assert!(
            matches!(outcome, Outcome::Accepted(_)),
            "{label}: {outcome:?}"
        );
        let _ = sender.close().await;
        client.close().await;

        let stored: Vec<String> = emulator
            .partition_bodies("eh1", "1")
            .into_iter()
            .filter(|body| body.starts_with(&label))
            .collect();
        assert_eq!(stored, [format!("{label}-a"), format!("{label}-b")]);
    }
    emulator.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_ca_fails_the_tls_handshake() {
    let emulator = tls_emulator().await;
    let stranger = TestPki::generate();
    for transport in [Transport::Amqps, Transport::WebSockets] {
        for tls in [TlsOptions::default(), trusting(&stranger)] {
            let Err(err) = open(&emulator.endpoint(transport), &tls).await else {
                panic!("{transport:?}: connected without trusting the CA");
            };
            assert!(
                matches!(
                    &err,
                    TransportError::Tls {
                        source: rustls::Error::InvalidCertificate(
                            rustls::CertificateError::UnknownIssuer
                        ),
                        ..
                    }
                ),
                "{transport:?}: {err:?}"
            );
        }
    }
    // The name is checked too: the certificate is for localhost, not 127.0.0.1.
    let wrong_name = Endpoint {
        host: "127.0.0.1".into(),
        ..emulator.endpoint(Transport::Amqps)
    };
    let err = open(&wrong_name, &emulator.tls())
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(
            &err,
            TransportError::Tls {
                source: rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName
                        | rustls::CertificateError::NotValidForNameContext { .. }
                ),
                ..
            }
        ),
        "{err:?}"
    );
    emulator.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn websocket_upgrades_elsewhere_than_the_service_path_are_refused() {
    use fe2o3_amqp_ws::tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};
    // Plain ws (no certificate configured) so the raw handshake below needs no TLS.
    let emulator = Fixture::builder(&["eh1:1"])
        .emulator(|config| config.websocket_listen = loopback())
        .without_producer()
        .start()
        .await;
    let addr = emulator.websocket_addr().expect("a WebSocket listener");
    let attempt = |path: &'static str, protocol: &'static str| async move {
        let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        fe2o3_amqp_ws::tokio_tungstenite::client_async(request, stream).await
    };
    match attempt("/", "AMQPWSB10").await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 404),
        other => panic!("expected HTTP 404, got {other:?}"),
    }
    match attempt("/$servicebus/websocket", "mqtt").await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 400),
        other => panic!("expected HTTP 400, got {other:?}"),
    }
    let (_, response) = attempt("/$servicebus/websocket/", "AMQPWSB10")
        .await
        .expect("the service path with the Azure SDKs' subprotocol is upgraded");
    assert_eq!(response.headers()["Sec-WebSocket-Protocol"], "AMQPWSB10");
    emulator.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_tls_server_that_does_not_speak_websocket_is_a_websocket_error() {
    let emulator = tls_emulator().await;
    // The AMQPS port completes TLS, then answers the HTTP upgrade request with an AMQP header.
    let amqps_as_websocket = Endpoint {
        transport: Transport::WebSockets,
        ..emulator.endpoint(Transport::Amqps)
    };
    let err = open(&amqps_as_websocket, &emulator.tls())
        .await
        .err()
        .expect("not a WebSocket server");
    assert!(matches!(err, TransportError::WebSocket { .. }), "{err:?}");
    emulator.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn tls_configuration_errors_name_the_field() {
    let pki = TestPki::generate();
    let broken_key = EmulatorConfig {
        tls: Some(TlsConfig {
            key: PemSource::Pem("not a key".into()),
            ..pki.tls_config()
        }),
        tls_listen: loopback(),
        ..config(&["eh1:1"])
    };
    let err = Emulator::start(broken_key).await.unwrap_err().to_string();
    assert!(err.starts_with("tls.key: "), "{err}");
    assert!(!err.contains("not a key"), "{err}");

    let missing_cert = EmulatorConfig {
        tls: Some(TlsConfig {
            cert: PemSource::Path("/nonexistent/cert.pem".into()),
            ..pki.tls_config()
        }),
        websocket_listen: loopback(),
        ..config(&["eh1:1"])
    };
    let err = Emulator::start(missing_cert).await.unwrap_err().to_string();
    assert!(err.starts_with("tls.cert: cannot read"), "{err}");
}

#[tokio::test]
async fn shutdown_closes_the_tls_and_websocket_listeners() {
    let emulator = tls_emulator().await;
    let tls_addr = emulator.tls_addr().unwrap();
    let websocket_addr = emulator.websocket_addr().unwrap();
    // Connections open on both transports end with the emulator, well inside the grace period.
    let mut open_clients = Vec::new();
    for transport in [Transport::Amqps, Transport::WebSockets] {
        open_clients.push(
            open(&emulator.endpoint(transport), &emulator.tls())
                .await
                .unwrap(),
        );
    }
    let started = std::time::Instant::now();
    emulator.shutdown(Duration::from_secs(5)).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    for client in open_clients {
        client.close().await;
    }
    for addr in [tls_addr, websocket_addr] {
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "{addr} still accepts after shutdown"
        );
    }
}
