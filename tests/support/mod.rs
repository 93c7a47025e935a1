//! Helpers shared by the integration tests: an in-process emulator on port 0 and a raw AMQP client
//! (fe2o3) that speaks to it the way the Event Hubs SDKs do: CBS tokens, hub links, batches, consumers.

#![allow(dead_code)] // each test binary uses a different subset

pub mod balancer;
mod fixture;
pub mod relay;
#[allow(unused_imports)] // each test binary uses a different subset
pub use fixture::*;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use eventhub_emulator::{
    Emulator, EmulatorConfig, HubConfig, PemSource, TlsConfig, decode_stored_event,
};
use eventhub_producer::{Endpoint, TlsOptions};
use eventhub_wire::message::{AmqpMessage, encode};
use eventhub_wire::sas::sign_token;
use eventhub_wire::{BATCH_MESSAGE_FORMAT, SAS_TOKEN_TYPE, annotations};
// The producer types the tests name, in one place for them all (each test binary uses a different subset).
#[allow(unused_imports)]
pub use eventhub_producer::{
    AmqpCondition, ConnectStage, Credential, Event, Producer, ProducerConfig, SendError,
    TraceContext, Transport,
};
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::delivery::Sendable;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::{Receiver, Sender};
use fe2o3_amqp_types::definitions::{self, ErrorCondition};
use fe2o3_amqp_types::messaging::annotations::{Annotations, OwnedKey};
use fe2o3_amqp_types::messaging::{
    AmqpValue, ApplicationProperties, Body, Data, Message, MessageAnnotations, MessageId, Outcome,
    Properties, Source,
};
use fe2o3_amqp_types::primitives::{Binary, SimpleValue, Symbol};
use serde_amqp::Value;
use serde_amqp::described::Described;
use serde_amqp::descriptor::Descriptor;

/// Every wait in these tests is bounded by this.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// An emulator config listening on a free loopback port with the given hubs (`NAME:PARTITIONS`).
pub fn config(hubs: &[&str]) -> EmulatorConfig {
    EmulatorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        event_hubs: hubs
            .iter()
            .map(|spec| spec.parse::<HubConfig>().expect("valid hub spec"))
            .collect(),
        ..EmulatorConfig::default()
    }
}

/// Starts an in-process emulator with these hubs.
pub async fn start(hubs: &[&str]) -> Emulator {
    start_with(config(hubs)).await
}

/// Starts an in-process emulator with this configuration; logs go to the test's output under `RUST_LOG`.
pub async fn start_with(config: EmulatorConfig) -> Emulator {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    Emulator::start(config).await.expect("emulator starts")
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// A SAS token for `sb://localhost/<path>` signed with the emulator's default key, valid for `valid_for`.
pub fn sas_token(path: &str, valid_for: Duration) -> String {
    sign_token(
        &format!("sb://localhost/{path}"),
        "RootManageSharedAccessKey",
        "SAS_KEY_VALUE",
        unix_now() + valid_for.as_secs(),
    )
}

/// One event with a text body and, optionally, a partition key annotation.
pub fn event(body: &str, partition_key: Option<&str>) -> AmqpMessage {
    let mut annotations = Annotations::new();
    if let Some(key) = partition_key {
        annotations.insert(
            OwnedKey::Symbol(Symbol::from(annotations::PARTITION_KEY)),
            Value::String(key.into()),
        );
    }
    Message::builder()
        .message_annotations(MessageAnnotations(annotations))
        .body(Body::Data(
            vec![Data(Binary::from(body.as_bytes().to_vec()))].into(),
        ))
        .build()
}

/// A batch transfer (message-format 0x80013700) of these events, as the SDKs send it.
pub fn batch(events: &[AmqpMessage], partition_key: Option<&str>) -> Sendable<Body<Value>> {
    let sections: Vec<Data> = events
        .iter()
        .map(|e| Data(Binary::from(encode(e).expect("encodes"))))
        .collect();
    let outer = Message {
        body: Body::Data(sections.into()),
        ..event("", partition_key)
    };
    Sendable::builder()
        .message(outer)
        .message_format(BATCH_MESSAGE_FORMAT)
        .build()
}

/// The text body of a stored or received event.
pub fn body_text(message: &AmqpMessage) -> String {
    match &message.body {
        Body::Data(sections) => sections
            .iter()
            .map(|d| String::from_utf8_lossy(d.0.as_ref()).into_owned())
            .collect::<String>(),
        other => panic!("expected a data body, got {other:?}"),
    }
}

/// The error condition of a rejected outcome, as a string (`com.microsoft:server-busy`, ...).
pub fn rejected_condition(outcome: &Outcome) -> Option<String> {
    match outcome {
        Outcome::Rejected(rejected) => rejected
            .error
            .as_ref()
            .map(|e| condition_name(&e.condition)),
        _ => None,
    }
}

/// An error condition as the string on the wire.
pub fn condition_name(condition: &ErrorCondition) -> String {
    match serde_amqp::to_value(condition) {
        Ok(Value::Symbol(symbol)) => symbol.0,
        other => format!("{other:?}"),
    }
}

/// A raw AMQP client: one connection, one session, and the CBS link pair.
pub struct Client {
    pub connection: ConnectionHandle<()>,
    pub session: SessionHandle<()>,
    cbs_requests: Sender,
    cbs_responses: Receiver,
    next_request: u64,
}

impl Client {
    /// Opens a plain AMQP connection to the emulator.
    pub async fn connect(emulator: &Emulator) -> Result<Self, String> {
        let address = format!("amqp://{}", emulator.local_addr());
        let connection = tokio::time::timeout(
            TIMEOUT,
            fe2o3_amqp::Connection::open("test-client", address.as_str()),
        )
        .await
        .map_err(|_| "open timed out".to_owned())?
        .map_err(|e| format!("open failed: {e}"))?;
        Self::over(connection).await
    }

    /// Begins a session and attaches the CBS link pair on a connection opened elsewhere (any transport).
    pub async fn over(mut connection: ConnectionHandle<()>) -> Result<Self, String> {
        let mut session = fe2o3_amqp::Session::begin(&mut connection)
            .await
            .map_err(|e| e.to_string())?;
        let cbs_requests = Sender::attach(&mut session, "cbs-requests", "$cbs")
            .await
            .map_err(|e| e.to_string())?;
        let cbs_responses = Receiver::builder()
            .name("cbs-responses")
            .source("$cbs")
            .target("cbs-client")
            .attach(&mut session)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self {
            connection,
            session,
            cbs_requests,
            cbs_responses,
            next_request: 0,
        })
    }

    /// Puts a token on `$cbs`; returns the status code and description.
    pub async fn put_token(
        &mut self,
        audience: &str,
        token_type: &str,
        token: &str,
    ) -> (i32, String) {
        self.next_request += 1;
        let request: AmqpMessage = Message::builder()
            .properties(Properties {
                message_id: Some(MessageId::String(format!("put-{}", self.next_request))),
                reply_to: Some("cbs-client".into()),
                ..Default::default()
            })
            .application_properties(
                ApplicationProperties::builder()
                    .insert("operation", "put-token")
                    .insert("type", token_type)
                    .insert("name", audience)
                    .build(),
            )
            .body(Body::Value(AmqpValue(Value::String(token.into()))))
            .build();
        let outcome = self
            .cbs_requests
            .send(request)
            .await
            .expect("put-token sent");
        assert!(
            matches!(outcome, Outcome::Accepted(_)),
            "the request is accepted: {outcome:?}"
        );
        let response = tokio::time::timeout(TIMEOUT, self.cbs_responses.recv::<Body<Value>>())
            .await
            .expect("put-token answered in time")
            .expect("put-token response");
        self.cbs_responses
            .accept(&response)
            .await
            .expect("response settled");
        let response = response.into_message();
        assert_eq!(
            response
                .properties
                .as_ref()
                .and_then(|p| p.correlation_id.clone()),
            Some(MessageId::String(format!("put-{}", self.next_request)))
        );
        let properties = response
            .application_properties
            .expect("status properties")
            .0;
        let code = match properties.get("status-code") {
            Some(SimpleValue::Int(code)) => *code,
            other => panic!("status-code is an int: {other:?}"),
        };
        let description = match properties.get("status-description") {
            Some(SimpleValue::String(d)) => d.clone(),
            _ => String::new(),
        };
        (code, description)
    }

    /// Puts a valid SAS token for `path` (a hub, or `hub/consumergroups/cg`), valid for `valid_for`.
    pub async fn authorize(&mut self, path: &str, valid_for: Duration) {
        let (code, description) = self
            .put_token(
                &format!("sb://localhost/{path}"),
                SAS_TOKEN_TYPE,
                &sas_token(path, valid_for),
            )
            .await;
        assert_eq!(code, 202, "{description}");
    }

    /// Attaches a sender to an address (`eh1`, `eh1/Partitions/0`).
    pub async fn sender(
        &mut self,
        address: &str,
    ) -> Result<Sender, fe2o3_amqp::link::SenderAttachError> {
        Sender::attach(
            &mut self.session,
            format!("sender-{address}-{}", uuid()),
            address,
        )
        .await
    }

    /// Attaches a receiver to a consumer group partition, starting where `selector` says.
    pub async fn receiver(
        &mut self,
        address: &str,
        selector: &str,
    ) -> Result<Receiver, fe2o3_amqp::link::ReceiverAttachError> {
        self.receiver_with_epoch(address, selector, None).await
    }

    /// Like [`Client::receiver`], as an exclusive reader with this epoch (owner level) when given.
    pub async fn receiver_with_epoch(
        &mut self,
        address: &str,
        selector: &str,
        epoch: Option<i64>,
    ) -> Result<Receiver, fe2o3_amqp::link::ReceiverAttachError> {
        let filter = Some(Described {
            descriptor: Descriptor::Name(Symbol::from("apache.org:selector-filter:string")),
            value: Value::String(selector.into()),
        });
        let source = Source::builder()
            .address(address)
            .add_to_filter("apache.org:selector-filter:string", filter)
            .build();
        let mut builder = Receiver::builder()
            .name(format!("receiver-{}", uuid()))
            .source(source)
            .target("test-client");
        if let Some(epoch) = epoch {
            // Properties last: fe2o3's builder resets them when name or target are set after.
            let mut properties = fe2o3_amqp_types::definitions::Fields::new();
            properties.insert(Symbol::from("com.microsoft:epoch"), Value::Long(epoch));
            builder = builder.properties(properties);
        }
        builder.attach(&mut self.session).await
    }

    /// Closes the connection.
    pub async fn close(mut self) {
        let _ = self.connection.close().await;
    }
}

/// The error a detached sender reports on its next send.
pub fn detach_error(error: &fe2o3_amqp::link::SendError) -> Option<definitions::Error> {
    use fe2o3_amqp::link::{DetachError, LinkStateError, SendError};
    match error {
        SendError::Detached(
            DetachError::RemoteDetachedWithError(e) | DetachError::RemoteClosedWithError(e),
        )
        | SendError::LinkStateError(
            LinkStateError::RemoteDetachedWithError(e) | LinkStateError::RemoteClosedWithError(e),
        ) => Some(e.clone()),
        _ => None,
    }
}

/// The condition a refused sender link reports: on attach, or (the emulator attaches, then detaches with
/// the error) on its first send.
pub async fn refused_sender_condition(client: &mut Client, address: &str) -> String {
    match client.sender(address).await {
        Err(fe2o3_amqp::link::SenderAttachError::RemoteClosedWithError(error)) => {
            condition_name(&error.condition)
        }
        Err(other) => panic!("{address}: attach failed without an AMQP error: {other:?}"),
        Ok(mut sender) => {
            let err = sender
                .send(event("refused?", None))
                .await
                .expect_err("a refused link cannot send");
            let error = detach_error(&err)
                .unwrap_or_else(|| panic!("{address}: no detach error in {err:?}"));
            condition_name(&error.condition)
        }
    }
}

/// A throwaway certificate authority and a server certificate it signed for `localhost` (only: a
/// client reaching it as 127.0.0.1 must fail the name check), generated in memory for one test (never written to the repository).
pub struct TestPki {
    /// The CA certificate, PEM: what a client must trust.
    pub ca_pem: String,
    /// The server certificate, PEM.
    pub server_cert_pem: String,
    /// The server's private key, PEM.
    pub server_key_pem: String,
    /// A client certificate the CA signed (for mTLS), PEM.
    pub client_cert_pem: String,
    /// Its private key, PEM.
    pub client_key_pem: String,
}

impl TestPki {
    /// Generates a CA and a `localhost` server certificate.
    pub fn generate() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            // A name of its own: two CAs with one name would make a wrong CA look like the issuer.
            .push(
                rcgen::DnType::CommonName,
                format!("eventhub-gateway test CA {}", uuid()),
            );
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");
        let server_params =
            CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
        let server_key = KeyPair::generate().expect("server key");
        let server_cert = server_params
            .signed_by(&server_key, &ca)
            .expect("server certificate");
        let mut client_params =
            CertificateParams::new(Vec::<String>::new()).expect("client params");
        client_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "eventhub-gateway test client");
        let client_key = KeyPair::generate().expect("client key");
        let client_cert = client_params
            .signed_by(&client_key, &ca)
            .expect("client certificate");
        Self {
            ca_pem: ca.pem(),
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
            client_cert_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
        }
    }

    /// The gateway's listener TLS settings for this server certificate, its PEM files written into `dir`;
    /// with `mutual`, clients must present a certificate of this CA.
    pub fn server_tls(
        &self,
        dir: &std::path::Path,
        mutual: bool,
    ) -> eventhub_gateway::config::ServerTls {
        let write = |name: &str, pem: &str| {
            let path = dir.join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        eventhub_gateway::config::ServerTls {
            cert: write("server.pem", &self.server_cert_pem),
            key: write("server.key", &self.server_key_pem),
            client_ca: mutual.then(|| write("ca.pem", &self.ca_pem)),
        }
    }

    /// The emulator's TLS settings for this server certificate.
    pub fn tls_config(&self) -> TlsConfig {
        TlsConfig {
            cert: PemSource::Pem(self.server_cert_pem.clone()),
            key: PemSource::Pem(self.server_key_pem.clone()),
        }
    }
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A producer for this emulator (its connection string, plain AMQP) with this configuration.
pub fn producer(emulator: &Emulator, config: ProducerConfig) -> Producer {
    Producer::from_connection_string(
        &emulator.connection_string(),
        false,
        Default::default(),
        config,
    )
    .expect("valid producer config")
}

/// Every event stored in a hub, partition by partition (partition ids `0..partitions`).
pub fn stored_events(
    emulator: &Emulator,
    hub: &str,
    partitions: usize,
) -> Vec<(String, AmqpMessage)> {
    let mut all = Vec::new();
    for partition in 0..partitions {
        let id = partition.to_string();
        for stored in emulator.partition_events(hub, &id).expect("hub exists") {
            let message = decode_stored_event(&stored).expect("decodes");
            all.push((id.clone(), message));
        }
    }
    all
}

/// A free loopback address for an extra listener.
pub fn loopback() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// An emulator with these hubs and all three listeners, its certificate signed by `pki`'s CA.
pub async fn start_with_tls(pki: &TestPki, hubs: &[&str]) -> Emulator {
    start_with(EmulatorConfig {
        tls: Some(pki.tls_config()),
        tls_listen: loopback(),
        websocket_listen: loopback(),
        ..config(hubs)
    })
    .await
}

/// Where the emulator listens for this transport, as `localhost`.
pub fn endpoint(emulator: &Emulator, transport: Transport) -> Endpoint {
    let addr = match transport {
        Transport::Amqp => emulator.local_addr(),
        Transport::Amqps => emulator.tls_addr().expect("a TLS listener"),
        Transport::WebSockets => emulator.websocket_addr().expect("a WebSocket listener"),
    };
    Endpoint::direct("localhost", addr.port(), transport)
}

/// TLS options that trust `pki`'s CA.
pub fn trusting(pki: &TestPki) -> TlsOptions {
    TlsOptions {
        extra_root_certificates_pem: vec![pki.ca_pem.clone()],
        ..Default::default()
    }
}

/// A gateway served in-process against its own in-process emulator (hubs `eh1` and `eh2`, 4 partitions each),
/// listening on a free loopback port, after `edit` adjusts its configuration.
pub async fn start_gateway(
    edit: impl FnOnce(&mut eventhub_gateway::config::GatewayConfig),
) -> eventhub_gateway::server::RunningGateway {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut config = eventhub_gateway::config::GatewayConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        emulator: true,
        event_hubs: vec!["eh1".into(), "eh2".into()],
        ..Default::default()
    };
    config.producer.send_timeout = Duration::from_secs(10);
    config.drain_timeout = Duration::from_secs(10);
    edit(&mut config);
    eventhub_gateway::server::start(config)
        .await
        .expect("gateway starts")
}

/// A gRPC client of a plain-text gateway.
pub async fn gateway_client(
    gateway: &eventhub_gateway::server::RunningGateway,
) -> eventhub_gateway::proto::v1::event_hub_gateway_client::EventHubGatewayClient<
    tonic::transport::Channel,
> {
    eventhub_gateway::proto::v1::event_hub_gateway_client::EventHubGatewayClient::connect(format!(
        "http://{}",
        gateway.local_addr()
    ))
    .await
    .expect("connects to the gateway")
}

/// Waits until the gateway at `address` answers SERVING to the `health` command's check (its producer's
/// first connection is ready).
pub async fn wait_until_serving(address: &str) {
    let args = eventhub_gateway::client::HealthArgs {
        address: address.to_owned(),
        service: String::new(),
        timeout: 5.0,
        tls: Default::default(),
    };
    assert!(
        eventually(|| async {
            eventhub_gateway::client::health(&args)
                .await
                .ok()
                .as_deref()
                == Some("SERVING")
        })
        .await,
        "{address} never answered SERVING"
    );
}

/// Sends one text event to the gateway's default hub.
pub async fn send_text(
    client: &mut eventhub_gateway::proto::v1::event_hub_gateway_client::EventHubGatewayClient<
        tonic::transport::Channel,
    >,
    text: &str,
) -> Result<eventhub_gateway::proto::v1::SendEventResponse, tonic::Status> {
    client
        .send_event(eventhub_gateway::proto::v1::SendEventRequest {
            event_hub: String::new(),
            event: Some(text_event(text)),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// A protobuf event with a text body.
pub fn text_event(text: &str) -> eventhub_gateway::proto::v1::Event {
    eventhub_gateway::proto::v1::Event {
        body: Some(eventhub_gateway::proto::v1::event::Body::Text(
            text.to_owned(),
        )),
        ..Default::default()
    }
}

/// The `google.rpc.Status` a call failed with (its `grpc-status-details-bin`).
pub fn rich_status(status: &tonic::Status) -> eventhub_gateway::proto::google::rpc::Status {
    use prost::Message;
    eventhub_gateway::proto::google::rpc::Status::decode(status.details())
        .expect("the status carries google.rpc.Status details")
}

/// The `ErrorInfo` detail of a status, if it has one.
pub fn error_info(
    status: &eventhub_gateway::proto::google::rpc::Status,
) -> Option<eventhub_gateway::proto::google::rpc::ErrorInfo> {
    use prost::Message;
    status
        .details
        .iter()
        .find(|any| any.type_url.ends_with("/google.rpc.ErrorInfo"))
        .map(|any| {
            eventhub_gateway::proto::google::rpc::ErrorInfo::decode(any.value.as_slice())
                .expect("ErrorInfo decodes")
        })
}

/// The `ErrorInfo.metadata` of a status (empty without an `ErrorInfo`).
pub fn error_metadata(
    status: &eventhub_gateway::proto::google::rpc::Status,
) -> std::collections::HashMap<String, String> {
    error_info(status)
        .map(|info| info.metadata)
        .unwrap_or_default()
}

/// The `ErrorInfo.reason` of a status.
pub fn error_reason(status: &eventhub_gateway::proto::google::rpc::Status) -> String {
    error_info(status)
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// The fields of a status's `BadRequest` violations.
pub fn violated_fields(status: &eventhub_gateway::proto::google::rpc::Status) -> Vec<String> {
    use prost::Message;
    status
        .details
        .iter()
        .filter(|any| any.type_url.ends_with("/google.rpc.BadRequest"))
        .flat_map(|any| {
            eventhub_gateway::proto::google::rpc::BadRequest::decode(any.value.as_slice())
                .expect("BadRequest decodes")
                .field_violations
        })
        .map(|violation| violation.field)
        .collect()
}

/// Streams `requests` through `SendStream` (half-closing after the last) and returns every ack by sequence,
/// and how the call ended.
pub async fn stream_events(
    client: &mut eventhub_gateway::proto::v1::event_hub_gateway_client::EventHubGatewayClient<
        tonic::transport::Channel,
    >,
    requests: Vec<eventhub_gateway::proto::v1::SendStreamRequest>,
) -> (
    std::collections::HashMap<u64, eventhub_gateway::proto::v1::StreamAck>,
    Result<(), tonic::Status>,
) {
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    let feeder = tokio::spawn(async move {
        for request in requests {
            if sender.send(request).await.is_err() {
                break;
            }
        }
    });
    let mut acks = std::collections::HashMap::new();
    let mut responses = client
        .send_stream(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    let ended = loop {
        match responses.message().await {
            Ok(Some(response)) => {
                for ack in response.acks {
                    assert!(
                        acks.insert(ack.sequence, ack).is_none(),
                        "a sequence acked twice"
                    );
                }
            }
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        }
    };
    feeder.await.unwrap();
    (acks, ended)
}

/// An HTTP response read by [`http_get`].
#[derive(Debug)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Header names (lower case) and values.
    pub headers: Vec<(String, String)>,
    /// The body, as text.
    pub body: String,
}

impl HttpResponse {
    /// The value of a header, by its lower-case name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// `GET path` over HTTP/1.1 on a loopback address (a plain socket: one request, `Connection: close`).
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<HttpResponse> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    assert!(
        addr.ip().is_loopback(),
        "tests reach loopback only, not {addr}"
    );
    let exchange = async {
        let mut socket = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        socket.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        socket.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no HTTP answer"))??;
    let text = String::from_utf8(raw)
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidData, error))?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(name, value)| name == "transfer-encoding" && value.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// The payload of a chunked HTTP/1.1 body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// One sample of a Prometheus text page: `name{label="value",...} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The sample's name (`_bucket`, `_sum`, `_count` included for histograms).
    pub name: String,
    /// Its labels, sorted by name.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// The samples of a Prometheus text-format page (comments skipped; label values without escapes, as the
/// gateway's are).
pub fn prometheus_samples(page: &str) -> Vec<Sample> {
    page.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a sample line has a value");
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').expect("label=\"value\"");
                    (key.to_owned(), value.trim_matches('"').to_owned())
                })
                .collect();
            Sample {
                name: name.to_owned(),
                labels,
                value: value.parse().expect("a numeric sample value"),
            }
        })
        .collect()
}

/// The value of the sample with exactly this name and these labels, if the page has it.
pub fn sample_value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: std::collections::BTreeMap<String, String> = labels
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect();
    samples
        .iter()
        .find(|sample| sample.name == name && sample.labels == wanted)
        .map(|sample| sample.value)
}

/// The sum of the samples named `name` whose labels include `labels` (every other label summed over).
pub fn sample_sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|sample| sample.name == name)
        .filter(|sample| {
            labels
                .iter()
                .all(|(key, value)| sample.labels.get(*key).map(String::as_str) == Some(*value))
        })
        .map(|sample| sample.value)
        .sum()
}

/// The gateway's `/metrics` page, parsed.
pub async fn scrape(gateway: &eventhub_gateway::server::RunningGateway) -> Vec<Sample> {
    let response = http_get(gateway.metrics_addr(), "/metrics")
        .await
        .expect("the metrics page answers");
    assert_eq!(response.status, 200, "{}", response.body);
    prometheus_samples(&response.body)
}

/// Polls `condition` every 50 ms until it holds or [`TIMEOUT`] passes; returns whether it held.
pub async fn eventually<F, Fut>(mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The binary under test: `EVENTHUB_GATEWAY_BIN`, else the one Cargo built.
fn gateway_binary() -> String {
    std::env::var("EVENTHUB_GATEWAY_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_eventhub-gateway").to_owned())
}

/// The resident set size of process `pid` (VmRSS in /proc), in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("the process is running")
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// A `serve` process of the real binary on free loopback ports, its stderr collected; killed when dropped.
pub struct GatewayProcess {
    child: std::process::Child,
    /// Its gRPC address.
    pub address: SocketAddr,
    /// Where it serves `/metrics`, `/healthz` and `/readyz`.
    pub metrics: SocketAddr,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl GatewayProcess {
    /// Starts `eventhub-gateway serve --emulator` with these extra flags and environment variables, and waits
    /// for the JSON line that names its listeners.
    pub fn start_emulated(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut all = vec!["--emulator"];
        all.extend_from_slice(args);
        Self::start(&all, env)
    }

    /// Starts `eventhub-gateway serve` on free loopback ports with these flags (which say where Event Hubs is)
    /// and environment variables, and waits for the JSON line that names its listeners.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(gateway_binary())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the gateway binary starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the gateway prints its listeners");
        let listeners: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        let listener = |name: &str| -> SocketAddr {
            listeners[name]
                .as_str()
                .and_then(|addr| addr.parse().ok())
                .unwrap_or_else(|| panic!("no {name} address in {line}"))
        };
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let collected = std::sync::Arc::clone(&stderr);
        let mut lines = std::io::BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        std::thread::spawn(move || {
            while let Some(Ok(line)) = lines.next() {
                let mut all = collected.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        });
        Self {
            address: listener("grpc"),
            metrics: listener("metrics"),
            child,
            stderr,
        }
    }

    /// What the process has written to stderr (its log) so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Its resident set size, bytes (`VmRSS` of /proc/<pid>/status).
    pub fn rss_bytes(&self) -> u64 {
        rss_kib(self.child.id()) * 1024
    }

    /// Its RSS from now on: the baseline now, then the peak sampled every 50 ms on a thread until stopped.
    pub fn watch_rss(&self) -> RssWatch {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let baseline = self.rss_bytes();
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(baseline));
        let (stopped, highest, pid) = (Arc::clone(&stop), Arc::clone(&peak), self.child.id());
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                // The process may be gone (killed by the allocator): the peak stays what it was.
                let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                    return;
                };
                if let Some(kib) = status
                    .lines()
                    .find_map(|line| line.strip_prefix("VmRSS:"))
                    .and_then(|value| {
                        value
                            .trim()
                            .trim_end_matches("kB")
                            .trim()
                            .parse::<u64>()
                            .ok()
                    })
                {
                    highest.fetch_max(kib * 1024, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        RssWatch {
            baseline,
            stop,
            peak,
        }
    }

    /// A gRPC client of it.
    pub async fn client(
        &self,
    ) -> eventhub_gateway::proto::v1::event_hub_gateway_client::EventHubGatewayClient<
        tonic::transport::Channel,
    > {
        eventhub_gateway::proto::v1::event_hub_gateway_client::EventHubGatewayClient::connect(
            format!("http://{}", self.address),
        )
        .await
        .expect("connects to the gateway process")
    }

    /// Its `/metrics` page, parsed.
    pub async fn samples(&self) -> Vec<Sample> {
        let response = http_get(self.metrics, "/metrics")
            .await
            .expect("the metrics page answers");
        assert_eq!(response.status, 200, "{}", response.body);
        prometheus_samples(&response.body)
    }

    /// Events it answered OK (`events_sent_total{outcome="ok"}`, every hub and RPC).
    pub async fn events_ok(&self) -> f64 {
        sample_sum(
            &self.samples().await,
            "eventhub_gateway_events_sent_total",
            &[("outcome", "ok")],
        )
    }

    /// Sends SIGTERM and waits up to `within` for the process to exit; its exit status, or `None` if it is
    /// still running.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        let give_up = std::time::Instant::now() + within;
        while std::time::Instant::now() < give_up {
            if let Some(status) = self.child.try_wait().expect("the child can be waited for") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

/// A gRPC client of the gateway at `server` whose connection comes from the loopback address `source` (so a
/// test can play several clients, each with its own peer address), with an HTTP/2 stream window of
/// `stream_window` bytes when given (0: a client that never takes a response's data).
pub async fn client_from(
    server: SocketAddr,
    source: std::net::Ipv4Addr,
    stream_window: Option<u32>,
) -> eventhub_gateway::proto::v1::event_hub_gateway_client::EventHubGatewayClient<
    tonic::transport::Channel,
> {
    try_client_from(server, source, stream_window)
        .await
        .expect("connects to the gateway")
}

/// [`client_from`], or the error of its connection.
pub async fn try_client_from(
    server: SocketAddr,
    source: std::net::Ipv4Addr,
    stream_window: Option<u32>,
) -> Result<
    eventhub_gateway::proto::v1::event_hub_gateway_client::EventHubGatewayClient<
        tonic::transport::Channel,
    >,
    tonic::transport::Error,
> {
    let connector = tower::service_fn(move |_: http::Uri| async move {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from((source, 0)))?;
        let stream = socket.connect(server).await?;
        stream.set_nodelay(true)?;
        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{server}"))
        .expect("a valid URI")
        .initial_stream_window_size(stream_window)
        .connect_with_connector(connector)
        .await?;
    Ok(eventhub_gateway::proto::v1::event_hub_gateway_client::EventHubGatewayClient::new(channel))
}

/// A gRPC channel to `server` that counts the TCP connections it opens (a channel reconnects, for instance,
/// after its connection gets a GOAWAY).
pub async fn counting_channel(
    server: SocketAddr,
) -> (
    tonic::transport::Channel,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let opened = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&opened);
    let connector = tower::service_fn(move |_: http::Uri| {
        let counted = Arc::clone(&counted);
        async move {
            let stream = tokio::net::TcpStream::connect(server).await?;
            stream.set_nodelay(true)?;
            counted.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{server}"))
        .expect("a valid URI")
        .connect_with_connector(connector)
        .await
        .expect("connects");
    (channel, opened)
}

/// A process's RSS watched by [`GatewayProcess::watch_rss`]; sampling stops when it is dropped.
pub struct RssWatch {
    baseline: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl RssWatch {
    /// The RSS when the watch began, bytes.
    pub fn baseline(&self) -> u64 {
        self.baseline
    }

    /// Stops sampling; how far the peak rose above the baseline, bytes.
    pub fn growth(&self) -> u64 {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        self.peak
            .load(Ordering::Relaxed)
            .saturating_sub(self.baseline)
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `eventhub-gateway emulator` binary run as a child process, its stderr collected; killed on drop.
pub struct EmulatorProcess {
    child: std::process::Child,
    /// The plain AMQP address.
    pub addr: SocketAddr,
    /// The WebSocket address, when `--websocket-listen` was given.
    pub websocket_addr: Option<SocketAddr>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl EmulatorProcess {
    /// Starts the binary (`EVENTHUB_GATEWAY_BIN`, else the one Cargo built) with `args` after `emulator
    /// --listen 127.0.0.1:0`, and waits for its connection string.
    pub fn start(args: &[&str]) -> Self {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let mut child = Command::new(gateway_binary())
            .args(["emulator", "--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the emulator binary starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line
            .split("Endpoint=sb://localhost:")
            .nth(1)
            .and_then(|rest| rest.split(';').next())
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("no connection string on stdout: {line:?}"));
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (websocket_tx, websocket_rx) = std::sync::mpsc::channel();
        let collected = std::sync::Arc::clone(&stderr);
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        std::thread::spawn(move || {
            while let Some(Ok(line)) = lines.next() {
                if let Some(rest) = line.split("AMQP over WebSockets on ws://").nth(1) {
                    let _ = websocket_tx.send(rest.split('/').next().map(str::to_owned));
                }
                let mut all = collected.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        });
        let websocket_addr = args.contains(&"--websocket-listen").then(|| {
            websocket_rx
                .recv_timeout(TIMEOUT)
                .ok()
                .flatten()
                .and_then(|addr| addr.parse().ok())
                .expect("the WebSocket address on stderr")
        });
        Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            websocket_addr,
            stderr,
        }
    }

    /// The process's resident set size (VmRSS in /proc), in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }

    /// What the process has written to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Opens a plain AMQP connection to it (SASL ANONYMOUS, as the SDKs do).
    pub async fn connect(&self) -> ConnectionHandle<()> {
        let stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        tokio::time::timeout(
            TIMEOUT,
            fe2o3_amqp::Connection::builder()
                .container_id("test-client")
                .sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Anonymous)
                .open_with_stream(stream),
        )
        .await
        .expect("open in time")
        .expect("open")
    }
}

impl Drop for EmulatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One gRPC frame of `payload` (uncompressed, or with the compressed flag set).
pub fn grpc_frame(payload: &[u8], compressed: bool) -> bytes::Bytes {
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.push(u8::from(compressed));
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    frame.into()
}

/// `bytes` gzip-compressed, as a gRPC client with `grpc-encoding: gzip` sends a message.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// A call of the gateway's `method` whose request body is exactly `body` (raw gRPC frames, as a stream of
/// chunks), with `grpc-encoding: gzip` when `gzip`; returns the response's headers and its body (unread).
pub async fn raw_call<S>(
    address: SocketAddr,
    method: &str,
    gzip: bool,
    body: S,
) -> http::Response<tonic::body::Body>
where
    S: futures_util::Stream<Item = bytes::Bytes> + Send + 'static,
{
    use futures_util::StreamExt;
    use tower::ServiceExt;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        // Room to receive a status that echoes megabytes, to measure it.
        .http2_max_header_list_size(64 << 20)
        .connect()
        .await
        .expect("connects to the gateway");
    let frames = body.map(|chunk| Ok::<_, std::convert::Infallible>(http_body::Frame::data(chunk)));
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{address}/eventhub.gateway.v1.EventHubGateway/{method}"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if gzip {
        request = request.header("grpc-encoding", "gzip");
    }
    let request = request
        .body(tonic::body::Body::new(http_body_util::StreamBody::new(
            frames,
        )))
        .unwrap();
    channel.oneshot(request).await.expect("the gateway answers")
}

/// One unary call of the gateway's `method` with `payload` as its one frame (uncompressed); the status it
/// ended with and the bytes of its `grpc-message` and `grpc-status-details-bin`, as [`raw_status`].
pub async fn raw_unary(
    address: SocketAddr,
    method: &str,
    payload: &[u8],
) -> (tonic::Status, usize) {
    let frame = grpc_frame(payload, false);
    raw_status(raw_call(address, method, false, futures_util::stream::iter([frame])).await).await
}

/// The gRPC status a raw call ended with (trailers-only or after its body), with the bytes of its
/// `grpc-message` and `grpc-status-details-bin` as sent.
pub async fn raw_status(response: http::Response<tonic::body::Body>) -> (tonic::Status, usize) {
    use http_body_util::BodyExt;
    let echoed = |headers: &http::HeaderMap| {
        ["grpc-message", "grpc-status-details-bin"]
            .iter()
            .filter_map(|name| headers.get(*name))
            .map(|value| value.len())
            .sum::<usize>()
    };
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        let size = echoed(response.headers());
        return (status, size);
    }
    let collected = response
        .into_body()
        .collect()
        .await
        .expect("the response body ends");
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let status = tonic::Status::from_header_map(&trailers).expect("a grpc-status trailer");
    (status, echoed(&trailers))
}

/// Every log line written while the guard of [`capture_logs`] is held, as text.
#[derive(Clone, Default)]
pub struct CapturedLogs(std::sync::Arc<parking_lot::Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// What was captured so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock()).into_owned()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures every log line at `level` and above written on this thread, without colours, until the guard
/// is dropped. A `#[tokio::test]` runtime has one thread, so every task the test starts logs into it.
pub fn capture_logs(level: tracing::Level) -> (CapturedLogs, tracing::subscriber::DefaultGuard) {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (logs, tracing::subscriber::set_default(subscriber))
}
