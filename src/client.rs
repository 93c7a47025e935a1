//! `eventhub-gateway send`: a gRPC client for people and shell scripts: one event with `SendEvent`, or one per
//! line of a file or stdin through `SendStream` with a progress bar; prints every outcome. `eventhub-gateway
//! health`: one `grpc.health.v1` check, for probes and `helm test` in an image without a shell or grpcurl.

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::proto::google::rpc;
use crate::proto::v1;
use crate::proto::v1::event_hub_gateway_client::EventHubGatewayClient;

/// What `send` takes.
#[derive(Args, Debug)]
pub struct SendArgs {
    /// The gateway: HOST:PORT (plain text), or an http:// or https:// (TLS) URL.
    #[arg(long, visible_alias = "address", default_value = "127.0.0.1:50051")]
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
    /// A file holding the bearer token (a JWT or an API key) sent as `authorization: Bearer <token>` to a
    /// gateway that authenticates callers; read once, at start.
    #[arg(long, value_name = "FILE", env = "EVENTHUB_GATEWAY_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The `authorization` value read from `token_file`.
    #[arg(skip)]
    authorization: Option<tonic::metadata::AsciiMetadataValue>,
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

/// How many failures `send` prints one by one before it only counts them per reason.
const FAILURES_SHOWN: usize = 10;

/// Why `send` could not run (outcomes of single events are printed, not errors).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The gateway could not be reached.
    #[error("cannot connect to {url}: {}", innermost(.source))]
    Connect {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// The URL's scheme does not match what the server speaks.
    #[error("{url}: {problem}")]
    WrongScheme {
        /// The URL.
        url: String,
        /// What the server speaks and which URL to use instead.
        problem: String,
    },
    /// An input is unusable.
    #[error("{0}")]
    Input(String),
    /// The call failed as a whole.
    #[error("{}", describe(.0))]
    Call(tonic::Status),
}

/// The deepest cause of an error: the one a person can act on ("Connection refused"), without the layers of
/// "transport error" / "client error (Connect)" above it.
fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    let mut deepest = error;
    while let Some(cause) = deepest.source() {
        deepest = cause;
    }
    deepest.to_string()
}

/// An error and its causes on one line, each cause once: a cause whose words its parent already printed
/// (thiserror's `{source}`, anyhow's context) is not repeated.
pub fn one_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    // A message that already names the deepest cause (ours do) needs none of the layers between.
    if line.contains(&innermost(error)) {
        return line;
    }
    let mut cause = error.source();
    while let Some(next) = cause {
        let text = next.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = next.source();
    }
    line
}

/// `address` as a URL: HOST:PORT means `http://HOST:PORT`; http:// and https:// URLs are kept.
pub fn gateway_url(address: &str) -> Result<String, ClientError> {
    match address.split_once("://") {
        None => Ok(format!("http://{address}")),
        Some(("http" | "https", rest)) if !rest.is_empty() => Ok(address.to_owned()),
        Some((scheme, _)) => Err(ClientError::Input(format!(
            "{address}: expected HOST:PORT, http://HOST:PORT or https://HOST:PORT, not {scheme}://"
        ))),
    }
}

/// The same address with the other scheme.
fn other_scheme(url: &str) -> String {
    match url.strip_prefix("https://") {
        Some(rest) => format!("http://{rest}"),
        None => format!("https://{}", url.trim_start_matches("http://")),
    }
}

/// Whether a TLS client's error says the server answered with something that is not TLS.
fn not_tls_answer(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        let rustls_error = error.downcast_ref::<rustls::Error>().or_else(|| {
            error
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::InvalidMessage(_)) = rustls_error {
            return true;
        }
        cause = error.source();
    }
    false
}

/// Whether the server at a plain-text URL speaks TLS: it is sent the HTTP/2 preface and answers with a TLS
/// record (an alert, 0x15, or a handshake, 0x16, of TLS 1.x) rather than an HTTP/2 frame.
async fn speaks_tls(url: &str) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return false;
    };
    let (Some(host), port) = (uri.host(), uri.port_u16().unwrap_or(80)) else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let probe = async {
        let mut socket = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        socket
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .ok()?;
        let mut answer = [0u8; 2];
        socket.read_exact(&mut answer).await.ok()?;
        Some(matches!(answer, [0x15 | 0x16, 0x03]))
    };
    tokio::time::timeout(Duration::from_secs(2), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// When a call or connection to `url` failed below gRPC, whether the scheme was the wrong one: https:// to a
/// plain-text server, or http:// to a TLS one. Says which URL to use instead.
async fn scheme_mismatch(
    url: &str,
    error: &(dyn std::error::Error + 'static),
) -> Option<ClientError> {
    let problem = if url.starts_with("https://") {
        not_tls_answer(error).then(|| {
            format!(
                "the server does not speak TLS (a plain-text gateway?); try {}",
                other_scheme(url)
            )
        })
    } else if speaks_tls(url).await {
        Some(format!(
            "the server speaks TLS; try {} (with --ca-cert if its certificate is not from a public CA)",
            other_scheme(url)
        ))
    } else {
        None
    };
    problem.map(|problem| ClientError::WrongScheme {
        url: url.to_owned(),
        problem,
    })
}

/// Whether a failed call's status came from below gRPC (no answer from a gateway: no `google.rpc.Status`).
fn from_transport(status: &tonic::Status) -> bool {
    status.details().is_empty()
        && matches!(
            status.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Internal
                | tonic::Code::Cancelled
        )
}

/// A call's failure, turned into a scheme hint when the scheme was the wrong one.
async fn call_error(url: &str, status: tonic::Status) -> ClientError {
    if from_transport(&status)
        && let Some(mismatch) = scheme_mismatch(url, &status).await
    {
        return mismatch;
    }
    ClientError::Call(status)
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

/// `code REASON` of a status (`InvalidArgument INVALID_EVENT`), what failures are counted by.
fn code_and_reason(status: &rpc::Status) -> String {
    let code = tonic::Code::from_i32(status.code);
    match error_info(status) {
        Some(info) => format!("{code:?} {}", info.reason),
        None => format!("{code:?}"),
    }
}

/// The gateway's `ErrorInfo` of a status, if it has one.
fn error_info(status: &rpc::Status) -> Option<rpc::ErrorInfo> {
    status
        .details
        .iter()
        .filter(|any| any.type_url.ends_with("/google.rpc.ErrorInfo"))
        .find_map(|any| rpc::ErrorInfo::decode(any.value.as_slice()).ok())
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

/// Connects to the gateway at `url`; a failure that is the wrong scheme says so.
async fn connect_channel(endpoint: Endpoint, url: &str) -> Result<Channel, ClientError> {
    match endpoint.connect().await {
        Ok(channel) => Ok(channel),
        Err(source) => Err(match scheme_mismatch(url, &source).await {
            Some(mismatch) => mismatch,
            None => ClientError::Connect {
                url: url.to_owned(),
                source,
            },
        }),
    }
}

async fn connect(
    url: &str,
    args: &SendArgs,
) -> Result<EventHubGatewayClient<Channel>, ClientError> {
    let channel = connect_channel(endpoint(url, &args.tls)?, url).await?;
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
        if let Some(authorization) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", authorization.clone());
        }
        request
    }

    /// Reads `token_file` into the `authorization` value every request carries.
    fn read_token(&mut self) -> Result<(), ClientError> {
        let Some(path) = &self.token_file else {
            return Ok(());
        };
        let text = String::from_utf8(read(path)?).map_err(|_| {
            ClientError::Input(format!("{}: the token is not UTF-8", path.display()))
        })?;
        let mut value: tonic::metadata::AsciiMetadataValue =
            format!("Bearer {}", text.trim()).parse().map_err(|_| {
                ClientError::Input(format!(
                    "{}: the token holds characters a header cannot carry",
                    path.display()
                ))
            })?;
        // Never written out by the HTTP/2 layer's logging, and compressed apart from other headers.
        value.set_sensitive(true);
        self.authorization = Some(value);
        Ok(())
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
pub async fn run(mut args: SendArgs) -> Result<bool, ClientError> {
    args.read_token()?;
    let single = match (&args.text, &args.json) {
        (Some(text), _) => Some(v1::event::Body::Text(text.clone())),
        (None, Some(json)) => Some(json_body(json).map_err(ClientError::Input)?),
        (None, None) => None,
    };
    let url = gateway_url(&args.gateway)?;
    let mut client = connect(&url, &args).await?;
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
            Err(status) => match call_error(&url, status).await {
                ClientError::Call(status) => {
                    println!("failed: {}", describe(&status));
                    Ok(false)
                }
                other => Err(other),
            },
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
    stream_lines(&args, &url, &mut client, lines).await
}

/// What the line reader handed to the stream.
struct LinesRead {
    /// Events handed over.
    sent: u64,
    /// Lines refused before sending (not JSON), with why.
    refused: Vec<(u64, String)>,
    /// Whether the whole input was read (false: the stream ended first).
    finished: bool,
}

/// Failures of a `send`: the first few in full, then a count per `code REASON`.
#[derive(Default)]
struct Failures {
    shown: Vec<String>,
    by_reason: BTreeMap<String, u64>,
    total: u64,
}

impl Failures {
    fn add(&mut self, reason: String, line: String) {
        self.total += 1;
        *self.by_reason.entry(reason).or_default() += 1;
        if self.shown.len() < FAILURES_SHOWN {
            self.shown.push(line);
        }
    }

    fn print(&self) {
        for line in &self.shown {
            println!("failed: {line}");
        }
        if self.total > self.shown.len() as u64 {
            println!(
                "... {} more failed; all {} by reason:",
                self.total - self.shown.len() as u64,
                self.total
            );
            for (reason, count) in &self.by_reason {
                println!("  {count} {reason}");
            }
        }
    }
}

/// Why the events that got no ack got none, from how the stream ended.
fn unacknowledged_because(ended: Option<&tonic::Status>, first: Option<u64>) -> String {
    let first = first.map_or_else(String::new, |line| format!(" (from line {line})"));
    let Some(status) = ended else {
        return format!(
            "the gateway ended the stream OK without acknowledging them{first}: their outcome is unknown"
        );
    };
    let rich = rpc::Status::decode(status.details()).ok();
    let from_gateway = rich
        .as_ref()
        .and_then(error_info)
        .is_some_and(|info| info.domain == crate::gateway::status::DOMAIN);
    if from_gateway {
        format!(
            "not sent{first}: the gateway answered every event it read, then stopped reading and ended the \
             stream with {}",
            describe(status)
        )
    } else {
        format!(
            "outcome unknown{first}: the stream broke, so they may or may not have been published: {}",
            describe(status)
        )
    }
}

async fn stream_lines(
    args: &SendArgs,
    url: &str,
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
    // `stop` ends it when the stream ends first, even while it waits for room in the stream.
    let stop = CancellationToken::new();
    let stop_reading = stop.clone();
    let runtime = tokio::runtime::Handle::current();
    let reader = tokio::task::spawn_blocking(move || -> Result<LinesRead, String> {
        let mut sent = 0;
        let mut refused = Vec::new();
        for (index, line) in lines.lines().enumerate() {
            if stop_reading.is_cancelled() {
                return Ok(LinesRead {
                    sent,
                    refused,
                    finished: false,
                });
            }
            let line = line.map_err(|error| format!("reading line {}: {error}", index + 1))?;
            let body = match format {
                LineFormat::Text => Ok(v1::event::Body::Text(line)),
                LineFormat::Json => json_body(&line),
            };
            let body = match body {
                Ok(body) => body,
                Err(error) => {
                    refused.push((index as u64 + 1, error));
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
            let handed_over = runtime.block_on(async {
                tokio::select! {
                    sent = requests.send(request) => sent.is_ok(),
                    () = stop_reading.cancelled() => false,
                }
            });
            if !handed_over {
                return Ok(LinesRead {
                    sent,
                    refused,
                    finished: false,
                });
            }
            sent += 1;
        }
        Ok(LinesRead {
            sent,
            refused,
            finished: true,
        })
    });
    let mut acks = match client
        .send_stream(args.request(ReceiverStream::new(outbound)))
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => {
            stop.cancel();
            return Err(call_error(url, status).await);
        }
    };
    let mut failures = Failures::default();
    let mut acked_lines = std::collections::HashSet::new();
    let ended = loop {
        match acks.message().await {
            Ok(Some(response)) => {
                for ack in response.acks {
                    acked_lines.insert(ack.sequence);
                    progress.inc(1);
                    let status = ack.status.unwrap_or_default();
                    if status.code != 0 {
                        failures.add(
                            code_and_reason(&status),
                            format!("line {}: {}", ack.sequence, describe_rpc(&status)),
                        );
                    }
                }
            }
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    stop.cancel();
    progress.finish_and_clear();
    let read = reader
        .await
        .map_err(|error| ClientError::Input(error.to_string()))?
        .map_err(ClientError::Input)?;
    let mut all_failures = Failures::default();
    for (line, error) in &read.refused {
        all_failures.add(
            format!("not sent: {error}"),
            format!("line {line}: {error}"),
        );
    }
    let failed_acks = failures.total;
    for line in failures.shown {
        if all_failures.shown.len() < FAILURES_SHOWN {
            all_failures.shown.push(line);
        }
    }
    for (reason, count) in failures.by_reason {
        *all_failures.by_reason.entry(reason).or_default() += count;
    }
    all_failures.total += failed_acks;
    all_failures.print();
    let acknowledged = acked_lines.len() as u64;
    let unacknowledged = read.sent.saturating_sub(acknowledged);
    println!(
        "{} accepted, {} failed, {unacknowledged} not acknowledged",
        acknowledged - failed_acks,
        all_failures.total
    );
    if unacknowledged > 0 || ended.is_some() {
        if let Some(status) = &ended
            && unacknowledged == 0
        {
            println!("the stream ended early: {}", describe(status));
        } else {
            // Sequences are line numbers: the first line sent without an ack is where the stream stopped.
            let refused: std::collections::HashSet<u64> =
                read.refused.iter().map(|(line, _)| *line).collect();
            let first = (1..)
                .filter(|line| !refused.contains(line))
                .take(read.sent as usize)
                .find(|line| !acked_lines.contains(line));
            println!(
                "not acknowledged: {}",
                unacknowledged_because(ended.as_ref(), first)
            );
        }
        if !read.finished {
            println!("the rest of the input was not sent");
        }
        return Ok(false);
    }
    Ok(all_failures.total == 0)
}

/// What `health` takes.
#[derive(Args, Debug)]
pub struct HealthArgs {
    /// The gateway's gRPC address: HOST:PORT (plain text), or an http:// or https:// (TLS) URL.
    #[arg(long, visible_alias = "gateway", default_value = "127.0.0.1:50051")]
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
    let url = gateway_url(&args.address)?;
    let timeout = Duration::from_secs_f64(args.timeout);
    let endpoint = endpoint(&url, &args.tls)?
        .connect_timeout(timeout)
        .timeout(timeout);
    let check = async {
        let channel = connect_channel(endpoint, &url).await?;
        match HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: args.service.clone(),
            })
            .await
        {
            Ok(response) => Ok(response),
            Err(status) => Err(call_error(&url, status).await),
        }
    };
    let response = tokio::time::timeout(timeout, check)
        .await
        .map_err(|_| ClientError::Input(format!("{url}: no answer within {timeout:?}")))??;
    let status = response.into_inner().status;
    Ok(ServingStatus::try_from(status)
        .map(|status| status.as_str_name().to_owned())
        .unwrap_or_else(|_| format!("status {status}")))
}
