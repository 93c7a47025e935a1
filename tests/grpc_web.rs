//! gRPC-Web on the gRPC listener of an in-process gateway, over raw loopback HTTP/1.1: off (the default), an
//! HTTP/1.1 request gets no answer; on, HTTP/2 gRPC and gRPC-Web share the port, and a refusal reaches the
//! gRPC-Web caller with its rich status.

mod support;

use std::time::Duration;

use base64::Engine;
use eventhub_gateway::proto::google::rpc;
use eventhub_gateway::proto::v1;
use prost::Message;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Everything the gateway answers to `request` on a fresh connection, until it closes it.
async fn exchange(address: std::net::SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
    socket.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), socket.read_to_end(&mut answer))
        .await
        .expect("the gateway closes the connection")
        .ok();
    answer
}

/// A gRPC-Web (binary) POST of `message` to `method`, the connection closed after it.
fn grpc_web_request(method: &str, message: &impl Message, origin: Option<&str>) -> Vec<u8> {
    let payload = message.encode_to_vec();
    let mut body = vec![0];
    body.extend((payload.len() as u32).to_be_bytes());
    body.extend(payload);
    let origin = origin.map_or(String::new(), |origin| format!("origin: {origin}\r\n"));
    let mut request = format!(
        "POST /eventhub.gateway.v1.EventHubGateway/{method} HTTP/1.1\r\nhost: gateway\r\n{origin}\
         content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend(body);
    request
}

/// The value of header `name` in an HTTP/1.1 answer's head.
fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    let head = answer.split("\r\n\r\n").next()?;
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then_some(value.trim())
    })
}

#[tokio::test]
async fn without_grpc_web_an_http1_request_is_never_answered() {
    let gateway = start_gateway(|_| {}).await;
    let request = v1::GetEventHubPropertiesRequest::default();
    let answer = exchange(
        gateway.local_addr(),
        &grpc_web_request("GetEventHubProperties", &request, None),
    )
    .await;
    assert!(
        !answer.starts_with(b"HTTP/1.1"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn with_grpc_web_http2_grpc_and_grpc_web_share_the_port_and_refusals_keep_their_details() {
    let gateway = start_gateway(|config| {
        config.grpc_web.enabled = true;
        config.grpc_web.cors_allowed_origins = vec!["https://app.example".into()];
    })
    .await;
    wait_until_serving(&gateway.local_addr().to_string()).await;
    let mut client = gateway_client(&gateway).await;
    send_text(&mut client, "over HTTP/2")
        .await
        .expect("HTTP/2 gRPC still served");

    let refused = v1::SendEventRequest {
        event_hub: String::new(),
        event: Some(v1::Event {
            partition_id: "9".into(),
            ..text_event("to no partition")
        }),
    };
    let answer = exchange(
        gateway.local_addr(),
        &grpc_web_request("SendEvent", &refused, Some("https://app.example")),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert_eq!(
        header(&answer, "content-type"),
        Some("application/grpc-web+proto")
    );
    assert_eq!(
        header(&answer, "access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(header(&answer, "grpc-status"), Some("3"), "{answer}");
    let details = header(&answer, "grpc-status-details-bin").expect("rich details");
    let padded = format!("{details}{}", "=".repeat((4 - details.len() % 4) % 4));
    let status = rpc::Status::decode(
        base64::engine::general_purpose::STANDARD
            .decode(padded)
            .unwrap()
            .as_slice(),
    )
    .unwrap();
    assert_eq!(error_reason(&status), "INVALID_EVENT");
    assert_eq!(violated_fields(&status), ["event.partition_id"]);
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn over_tls_a_client_offering_only_http1_is_served_and_one_offering_h2_gets_h2() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use std::sync::Arc;

    let pki = TestPki::generate();
    let dir = tempfile::tempdir().unwrap();
    let tls = pki.server_tls(dir.path(), false);
    let gateway = start_gateway(|config| {
        config.tls = Some(tls);
        config.grpc_web.enabled = true;
    })
    .await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let connect = |alpn: &[&[u8]]| {
        let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
        client.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let address = gateway.local_addr();
        async move {
            let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
            connector
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .expect("TLS handshake")
        }
    };

    let browser = connect(&[b"h2", b"http/1.1"]).await;
    assert_eq!(browser.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

    let mut http1 = connect(&[b"http/1.1"]).await;
    assert_eq!(http1.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let request = v1::GetEventHubPropertiesRequest::default();
    http1
        .write_all(&grpc_web_request("GetEventHubProperties", &request, None))
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), http1.read_to_end(&mut answer))
        .await
        .expect("the gateway closes the connection")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.contains("grpc-status:0"), "{answer}");
    gateway.shutdown().await.unwrap();
}
