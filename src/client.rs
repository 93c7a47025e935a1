//! `eventhub-gateway send`: a gRPC client for people and shell scripts: one event with `SendEvent`, or one per
//! line of a file or stdin through `SendStream` with a progress bar; prints every outcome. `eventhub-gateway
//! health`: one `grpc.health.v1` check, for probes and `helm test` in an image without a shell or grpcurl.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::proto::google::rpc;
use crate::proto::v1;
use crate::proto::v1::event_hub_gateway_client::EventHubGatewayClient;

/// What `send` takes.
#[derive(Args, Debug)]
pub struct SendArgs {
    /// The gateway's URL (https:// for TLS).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub gateway: String,
    /// The Event Hub; the gateway's default when omitted.
    #[arg(long)]
    pub event_hub: Option<String>,
    /// Every event gets this partition key.
    #[arg(long, conflicts_with = "partition_id")]
    pub partition_key: Option<String>,
    /// Every event goes to this partition.
    #[arg(long)]
    pub partition_id: Option<String>,
    /// An application property NAME=VALUE; repeat for more.
    #[arg(long = "property", value_name = "NAME=VALUE", value_parser = parse_property)]
    pub properties: Vec<(String, String)>,
    /// The content type of every event.
    #[arg(long)]
    pub content_type: Option<String>,
    /// Send this text as one event.
    #[arg(long, group = "body")]
    pub text: Option<String>,
    /// Send this JSON object as one event.
    #[arg(long, group = "body")]
    pub json: Option<String>,
    /// Send one event per line of this file; `-` reads stdin.
    #[arg(long, group = "body", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Send one event per line of stdin.
    #[arg(value_name = "-", group = "body", value_parser = clap::builder::PossibleValuesParser::new(["-"]))]
    pub stdin: Option<String>,
    /// How each line of a file or stdin is sent.
    #[arg(long, value_enum, default_value_t = LineFormat::Text)]
    pub lines: LineFormat,
    /// Names this client for the gateway's per-client rate limit (`x-client-id`).
    #[arg(long)]
    pub client_id: Option<String>,
    /// TLS toward an https:// gateway.
    #[command(flatten)]
    pub tls: ClientTls,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// How lines become events.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LineFormat {
    /// Each line is a text event.
    Text,
    /// Each line is a JSON object.
    Json,
}

fn parse_property(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err("expected NAME=VALUE".to_owned()),
    }
}

/// Why `send` could not run (outcomes of single events are printed, not errors).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The gateway could not be reached.
    #[error("connecting to {url}: {source}")]
    Connect {
        /// The URL.
        url: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// An input is unusable.
    #[error("{0}")]
    Input(String),
    /// The call failed as a whole.
    #[error("{}", describe(.0))]
    Call(tonic::Status),
}

/// `code REASON: message` of a status, with the field violations when there are any.
pub fn describe(status: &tonic::Status) -> String {
    let details = rpc::Status::decode(status.details()).ok();
    describe_rpc(&rpc::Status {
        code: status.code() as i32,
        message: status.message().to_owned(),
        details: details.map(|d| d.details).unwrap_or_default(),
    })
}

fn describe_rpc(status: &rpc::Status) -> String {
    let code = tonic::Code::from_i32(status.code);
    let mut reason = String::new();
    let mut fields = Vec::new();
    for any in &status.details {
        match any.type_url.rsplit('/').next() {
            Some("google.rpc.ErrorInfo") => {
                if let Ok(info) = rpc::ErrorInfo::decode(any.value.as_slice()) {
                    reason = info.reason;
                }
            }
            Some("google.rpc.BadRequest") => {
                if let Ok(bad) = rpc::BadRequest::decode(any.value.as_slice()) {
                    fields.extend(bad.field_violations.into_iter().map(|v| v.field));
                }
            }
            _ => {}
        }
    }
    let mut text = format!("{code:?}");
    if !reason.is_empty() {
        text.push(' ');
        text.push_str(&reason);
    }
    if !fields.is_empty() {
        text.push_str(&format!(" [{}]", fields.join(", ")));
    }
    format!("{text}: {}", status.message)
}

/// How `send` and `health` trust and authenticate to an https:// gateway.
#[derive(Args, Debug, Default)]
pub struct ClientTls {
    /// PEM CA bundle trusted for an https:// gateway.
    #[arg(long, value_name = "PEM_FILE")]
    pub ca_cert: Option<PathBuf>,
    /// PEM certificate and key presented to a gateway that requires mTLS.
    #[arg(long, value_name = "PEM_FILE", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// PEM key of --client-cert.
    #[arg(long, value_name = "PEM_FILE", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

/// An endpoint for `url`; https:// trusts the web roots plus `ca_cert`, and presents the client
/// certificate for mTLS.
fn endpoint(url: &str, tls_settings: &ClientTls) -> Result<Endpoint, ClientError> {
    let connect_error = |source| ClientError::Connect {
        url: url.to_owned(),
        source,
    };
    let mut endpoint = Endpoint::from_shared(url.to_owned()).map_err(connect_error)?;
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_enabled_roots();
        if let Some(path) = &tls_settings.ca_cert {
            tls = tls.ca_certificate(Certificate::from_pem(read(path)?));
        }
        if let (Some(cert), Some(key)) = (&tls_settings.client_cert, &tls_settings.client_key) {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key)?,
            ));
        }
        endpoint = endpoint.tls_config(tls).map_err(connect_error)?;
    }
    Ok(endpoint)
}

async fn connect(args: &SendArgs) -> Result<EventHubGatewayClient<Channel>, ClientError> {
    let channel = endpoint(&args.gateway, &args.tls)?
        .connect()
        .await
        .map_err(|source| ClientError::Connect {
            url: args.gateway.clone(),
            source,
        })?;
    Ok(EventHubGatewayClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
}

fn read(path: &PathBuf) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|error| ClientError::Input(format!("{}: {error}", path.display())))
}

impl SendArgs {
    fn event(&self, body: v1::event::Body) -> v1::Event {
        v1::Event {
            body: Some(body),
            partition_key: self.partition_key.clone().unwrap_or_default(),
            partition_id: self.partition_id.clone().unwrap_or_default(),
            properties: self.properties.iter().cloned().collect::<HashMap<_, _>>(),
            content_type: self.content_type.clone().unwrap_or_default(),
            ..Default::default()
        }
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(id) = &self.client_id
            && let Ok(value) = id.parse()
        {
            request.metadata_mut().insert("x-client-id", value);
        }
        request
    }
}

fn json_body(text: &str) -> Result<v1::event::Body, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|error| format!("not JSON: {error}"))?;
    match json_to_proto(value).kind {
        Some(prost_types::value::Kind::StructValue(object)) => Ok(v1::event::Body::Json(object)),
        _ => Err("a JSON event must be an object".to_owned()),
    }
}

fn json_to_proto(value: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(flag) => Kind::BoolValue(flag),
        serde_json::Value::Number(number) => Kind::NumberValue(number.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(text) => Kind::StringValue(text),
        serde_json::Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(json_to_proto).collect(),
        }),
        serde_json::Value::Object(fields) => Kind::StructValue(prost_types::Struct {
            fields: fields
                .into_iter()
                .map(|(name, value)| (name, json_to_proto(value)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Runs `send`; returns whether every event was accepted.
pub async fn run(args: SendArgs) -> Result<bool, ClientError> {
    let single = match (&args.text, &args.json) {
        (Some(text), _) => Some(v1::event::Body::Text(text.clone())),
        (None, Some(json)) => Some(json_body(json).map_err(ClientError::Input)?),
        (None, None) => None,
    };
    let mut client = connect(&args).await?;
    if let Some(body) = single {
        let request = args.request(v1::SendEventRequest {
            event_hub: args.event_hub.clone().unwrap_or_default(),
            event: Some(args.event(body)),
        });
        return match client.send_event(request).await {
            Ok(response) => {
                let response = response.into_inner();
                let partition = if response.partition_id.is_empty() {
                    "chosen by Event Hubs".to_owned()
                } else {
                    response.partition_id
                };
                println!("ok: sent to {} (partition {partition})", response.event_hub);
                Ok(true)
            }
            Err(status) => {
                println!("failed: {}", describe(&status));
                Ok(false)
            }
        };
    }
    let lines: Box<dyn BufRead + Send> = match &args.file {
        Some(path) if path.as_os_str() != "-" => Box::new(std::io::BufReader::new(
            std::fs::File::open(path)
                .map_err(|error| ClientError::Input(format!("{}: {error}", path.display())))?,
        )),
        Some(_) => Box::new(std::io::BufReader::new(std::io::stdin())),
        None if args.stdin.is_some() => Box::new(std::io::BufReader::new(std::io::stdin())),
        None => {
            return Err(ClientError::Input(
                "give --text, --json, --file FILE or - (stdin)".into(),
            ));
        }
    };
    stream_lines(&args, &mut client, lines).await
}

async fn stream_lines(
    args: &SendArgs,
    client: &mut EventHubGatewayClient<Channel>,
    lines: Box<dyn BufRead + Send>,
) -> Result<bool, ClientError> {
    let (requests, outbound) = mpsc::channel(1024);
    let progress = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    progress.set_style(
        ProgressStyle::with_template("{spinner} {pos} acknowledged, {per_sec} [{elapsed}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    let hub = args.event_hub.clone().unwrap_or_default();
    let format = args.lines;
    let template = args.event(v1::event::Body::Text(String::new()));
    // Lines are read on a blocking thread (stdin may be a terminal); local refusals are reported by line.
    let reader = tokio::task::spawn_blocking(move || -> Result<(u64, Vec<String>), String> {
        let mut sent = 0;
        let mut refused = Vec::new();
        for (index, line) in lines.lines().enumerate() {
            let line = line.map_err(|error| format!("reading line {}: {error}", index + 1))?;
            let body = match format {
                LineFormat::Text => Ok(v1::event::Body::Text(line)),
                LineFormat::Json => json_body(&line),
            };
            let body = match body {
                Ok(body) => body,
                Err(error) => {
                    refused.push(format!("line {}: {error}", index + 1));
                    continue;
                }
            };
            let request = v1::SendStreamRequest {
                event_hub: hub.clone(),
                events: Vec::new(),
                sequence: index as u64 + 1,
                event: Some(v1::Event {
                    body: Some(body),
                    ..template.clone()
                }),
            };
            if requests.blocking_send(request).is_err() {
                break;
            }
            sent += 1;
        }
        Ok((sent, refused))
    });
    let mut acks = client
        .send_stream(args.request(ReceiverStream::new(outbound)))
        .await
        .map_err(ClientError::Call)?
        .into_inner();
    let mut failures = Vec::new();
    let mut acknowledged = 0u64;
    let ended = loop {
        match acks.message().await {
            Ok(Some(response)) => {
                for ack in response.acks {
                    acknowledged += 1;
                    progress.inc(1);
                    let status = ack.status.unwrap_or_default();
                    if status.code != 0 {
                        failures.push(format!("line {}: {}", ack.sequence, describe_rpc(&status)));
                    }
                }
            }
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    progress.finish_and_clear();
    let (sent, refused) = reader
        .await
        .map_err(|error| ClientError::Input(error.to_string()))?
        .map_err(ClientError::Input)?;
    for line in refused.iter().chain(&failures) {
        println!("failed: {line}");
    }
    let accepted = acknowledged - failures.len() as u64;
    println!(
        "{accepted} accepted, {} failed, {} not acknowledged",
        failures.len() + refused.len(),
        sent.saturating_sub(acknowledged)
    );
    if let Some(status) = ended {
        println!("the stream ended early: {}", describe(&status));
        return Ok(false);
    }
    Ok(failures.is_empty() && refused.is_empty() && acknowledged == sent)
}

/// What `health` takes.
#[derive(Args, Debug)]
pub struct HealthArgs {
    /// The gateway's gRPC address: HOST:PORT (plain text), or an http:// or https:// URL.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub address: String,
    /// The service to ask about: "" (the default) is the whole gateway, as kubelet's gRPC probe asks.
    #[arg(long, default_value = "")]
    pub service: String,
    /// Bound on connecting and the check together, seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0)]
    pub timeout: f64,
    /// TLS toward an https:// gateway.
    #[command(flatten)]
    pub tls: ClientTls,
}

/// Asks the gateway's `grpc.health.v1.Health/Check` once; returns the status name (`SERVING`,
/// `NOT_SERVING`, ...). An unreachable gateway, an unknown service or the timeout are errors.
pub async fn health(args: &HealthArgs) -> Result<String, ClientError> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    if !(args.timeout > 0.0 && args.timeout <= 3600.0) {
        return Err(ClientError::Input(
            "--timeout: must be above 0 and at most 3600 seconds".into(),
        ));
    }
    let url = if args.address.contains("://") {
        args.address.clone()
    } else {
        format!("http://{}", args.address)
    };
    let timeout = Duration::from_secs_f64(args.timeout);
    let endpoint = endpoint(&url, &args.tls)?
        .connect_timeout(timeout)
        .timeout(timeout);
    let check = async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                url: url.clone(),
                source,
            })?;
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: args.service.clone(),
            })
            .await
            .map_err(ClientError::Call)
    };
    let response = tokio::time::timeout(timeout, check)
        .await
        .map_err(|_| ClientError::Input(format!("{url}: no answer within {timeout:?}")))??;
    let status = response.into_inner().status;
    Ok(ServingStatus::try_from(status)
        .map(|status| status.as_str_name().to_owned())
        .unwrap_or_else(|_| format!("status {status}")))
}
