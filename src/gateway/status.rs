//! The gateway's errors and their one mapping to `google.rpc.Status` (code, message, `ErrorInfo` with a stable
//! reason, and `BadRequest` / `RetryInfo` / `QuotaFailure` where they help), for a call or for one event.

use std::collections::HashMap;
use std::time::Duration;

use prost::Message;
use tonic::Code;

use crate::auth::AuthError;
use crate::gateway::schemas::Violations;
use crate::proto::google::rpc;
use eventhub_producer::{ErrorClass, SendError};

/// The `ErrorInfo.domain` of every error the gateway returns.
pub const DOMAIN: &str = "eventhub-gateway";

/// The most bytes of client-supplied text (a hub name, a partition id, a field path) an error repeats.
pub const CLIENT_TEXT_MAX: usize = 256;

/// The most bytes of a status message; the details' texts are clipped at [`CLIENT_TEXT_MAX`] (field paths)
/// or this (descriptions).
pub const MESSAGE_MAX: usize = 1024;

/// Client-supplied text as an error may repeat it: at most [`CLIENT_TEXT_MAX`] bytes, cut at a character
/// boundary with a marker that gives the original length.
pub fn clip(text: &str) -> std::borrow::Cow<'_, str> {
    clip_to(text, CLIENT_TEXT_MAX)
}

/// `text` cut to at most `max` bytes (plus the marker) at a character boundary, saying it was cut.
pub fn clip_to(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!(
        "{}... [cut: {} bytes in all]",
        &text[..end],
        text.len()
    ))
}

/// How long clients are told to wait before retrying when nothing better is known.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Why a call, or one event of it, failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    /// A request field is invalid (not an event's: those go through [`GatewayError::Event`]).
    #[error("invalid request: {field}: {reason}")]
    InvalidRequest {
        /// The field path.
        field: String,
        /// What is wrong, with the limit where there is one.
        reason: String,
    },
    /// The hub is not one the gateway forwards to.
    #[error("event hub {hub:?} is not served by this gateway (it serves {served})")]
    UnknownHub {
        /// The hub asked for.
        hub: String,
        /// The hubs served, comma-separated.
        served: String,
    },
    /// The call's credentials are missing or refused; `detail` says why and never holds the credential.
    #[error("unauthenticated: {detail}")]
    Unauthenticated {
        /// A bounded label (`missing`, `expired`, ...), from [`AuthError::reason`].
        cause: &'static str,
        /// Why, for the caller.
        detail: String,
    },
    /// The caller's identity has no grant for the hub.
    #[error(
        "{identity} may not publish to event hub {hub:?}: no grant of the gateway's auth.grants gives it that hub"
    )]
    HubNotAllowed {
        /// The hub asked for (a served one).
        hub: String,
        /// The caller's identity, clipped.
        identity: String,
    },
    /// The call's SharedAccessSignature was signed for a resource (`sr`) that does not cover the request's.
    #[error(
        "the SharedAccessSignature's resource (sr) {resource:?} does not cover {requested:?}: sign the hub's URL (or its publisher's, for the publisher route)"
    )]
    SasResourceNotCovered {
        /// The hub asked for (a served one).
        hub: String,
        /// The token's `sr`, clipped.
        resource: String,
        /// The request's resource path (`hub`, `hub/publishers/p`), clipped.
        requested: String,
    },
    /// A client or the whole gateway is over its events-per-second limit.
    #[error(
        "{subject} is over its limit of {limit_per_second} events/s; retry after {retry_after:?}"
    )]
    RateLimited {
        /// `global` or `client:<id>`.
        subject: String,
        /// The limit.
        limit_per_second: u32,
        /// When the events would be admitted.
        retry_after: Duration,
    },
    /// The gateway is over one of its own bounds (load shedding).
    #[error("the gateway is overloaded: {bound} is reached; retry after {retry_after:?}")]
    Overloaded {
        /// The bound, by its setting's name.
        bound: &'static str,
        /// When trying again is likely to succeed.
        retry_after: Duration,
    },
    /// The gateway is shutting down.
    #[error("the gateway is draining for shutdown; retry on another instance")]
    Draining,
    /// One event failed in the producer; `path` is where it sits in the request (`event`, `events[3]`).
    #[error("{path}: {error}")]
    Event {
        /// The event's path in the request.
        path: String,
        /// The producer's outcome.
        error: SendError,
    },
    /// A unary request is larger than its method allows (as sent, once decompressed, or against its
    /// compression ratio); refused before it is decoded.
    #[error("the request is too large: {detail}")]
    RequestTooLarge {
        /// The bound, bytes.
        limit: usize,
        /// Which bound and by how much.
        detail: String,
    },
    /// A unary request's bytes are not its protobuf message (bad wire format, invalid UTF-8, broken
    /// compression, cut short).
    #[error("the request cannot be read: {detail}")]
    MalformedRequest {
        /// Where it broke, when known.
        field: Option<String>,
        /// What is wrong.
        detail: String,
    },
    /// `SendStream` could not read its next message: the stream ends there, once every event read before it
    /// is acknowledged.
    #[error(
        "the stream message after {progress} {fault}: {detail}; the stream ends here: every event read before it \
         is acknowledged, and neither it nor any later message was read"
    )]
    StreamMessageUnreadable {
        /// What is wrong with the message.
        fault: StreamFault,
        /// The gRPC library's words about it.
        detail: String,
        /// What the stream had read before it.
        progress: StreamProgress,
    },
    /// The stream's deadline (`grpc-timeout`) passed: it ends there, once every event read is acknowledged
    /// (those Event Hubs had not answered by then with DEADLINE_EXCEEDED).
    #[error(
        "the stream's deadline (grpc-timeout) passed after {progress}; every event read is acknowledged, and no \
         later message was read"
    )]
    StreamDeadlineExceeded {
        /// What the stream had read.
        progress: StreamProgress,
    },
    /// The stream read nothing and had nothing unacknowledged for `limits.stream_idle_timeout_seconds`: it is
    /// ended to give its call slot back.
    #[error(
        "the stream was idle (nothing read, nothing unacknowledged) for {idle:?} \
         (limits.stream_idle_timeout_seconds) after {progress}, and is ended to free its call slot; open a new \
         stream when there are events to send"
    )]
    StreamIdle {
        /// The idle timeout.
        idle: Duration,
        /// What the stream had read.
        progress: StreamProgress,
    },
    /// The stream's connection reached `limits.max_connection_age_seconds` (it is about to get its GOAWAY): the
    /// stream stopped reading and ends once every event read is acknowledged, so its client reopens it on a
    /// new connection, which may reach another replica.
    #[error(
        "the stream's connection reached its maximum age (limits.max_connection_age_seconds) after {progress}; \
         every event read is acknowledged and no later message was read: open a new stream (on a new \
         connection) to send the rest"
    )]
    ConnectionAged {
        /// What the stream had read.
        progress: StreamProgress,
    },
    /// The event's JSON body does not match its hub's JSON Schema (or is not JSON although its content type
    /// says so); `path` is where the event sits in the request.
    #[error(
        "{path}: the body does not match the JSON Schema of event hub {hub:?}: {} violation(s){}",
        violations.count_label(),
        first_violation(violations)
    )]
    SchemaViolation {
        /// The event's path in the request.
        path: String,
        /// The hub whose schema refused it.
        hub: String,
        /// The first violations (JSON Pointers into the body) and how many were found.
        violations: Violations,
    },
}

fn first_violation(violations: &Violations) -> String {
    match violations.listed.first() {
        Some(first) if first.pointer.is_empty() => format!("; at the root: {}", first.description),
        Some(first) => format!("; at {}: {}", first.pointer, first.description),
        None => String::new(),
    }
}

/// Why a `SendStream` message could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamFault {
    /// It is larger than `max_request_bytes` (as sent, or once decompressed).
    TooLarge {
        /// `max_request_bytes`.
        limit: usize,
    },
    /// Its bytes are not a `SendStreamRequest`: undecodable protobuf, bad compression, cut short.
    Malformed,
    /// It is refused whole before it is decoded (too many events, JSON nested too deep, too costly to
    /// decode): this field breaks a limit the detail names.
    Invalid {
        /// The field path.
        field: String,
    },
}

impl StreamFault {
    /// The stream's ending for this fault, after `progress`.
    pub fn with_progress(self, detail: String, progress: StreamProgress) -> GatewayError {
        GatewayError::StreamMessageUnreadable {
            fault: self,
            detail: clip(&detail).into_owned(),
            progress,
        }
    }
}

impl std::fmt::Display for StreamFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooLarge { limit } => {
                write!(f, "is larger than max_request_bytes ({limit} bytes)")
            }
            Self::Malformed => f.write_str("cannot be read"),
            Self::Invalid { field } => write!(f, "is refused whole at `{field}`"),
        }
    }
}

/// How far a stream got: the messages read and the sequence of the last one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamProgress {
    /// Messages read.
    pub messages: u64,
    /// The `sequence` of the last message read.
    pub last_sequence: Option<u64>,
}

impl StreamProgress {
    /// Counts one more message read.
    pub fn read(&mut self, sequence: u64) {
        self.messages += 1;
        self.last_sequence = Some(sequence);
    }
}

impl std::fmt::Display for StreamProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.messages, self.last_sequence) {
            (0, _) | (_, None) => f.write_str("no message read"),
            (1, Some(last)) => write!(f, "1 message read (sequence {last})"),
            (messages, Some(last)) => {
                write!(
                    f,
                    "{messages} messages read (the last with sequence {last})"
                )
            }
        }
    }
}

/// The stable reasons of `ErrorInfo` (the `ErrorReason` enum of the proto, by name).
mod reason {
    pub const INVALID_EVENT: &str = "INVALID_EVENT";
    pub const EVENT_TOO_LARGE: &str = "EVENT_TOO_LARGE";
    pub const UNKNOWN_EVENT_HUB: &str = "UNKNOWN_EVENT_HUB";
    pub const RATE_LIMITED: &str = "RATE_LIMITED";
    pub const OVERLOADED: &str = "OVERLOADED";
    pub const EVENT_HUBS_BUSY: &str = "EVENT_HUBS_BUSY";
    pub const EVENT_HUBS_UNAVAILABLE: &str = "EVENT_HUBS_UNAVAILABLE";
    pub const DRAINING: &str = "DRAINING";
    pub const DEADLINE_EXCEEDED: &str = "DEADLINE_EXCEEDED";
    pub const EVENT_HUBS_UNAUTHORIZED: &str = "EVENT_HUBS_UNAUTHORIZED";
    pub const EVENT_HUBS_REJECTED: &str = "EVENT_HUBS_REJECTED";
    pub const REQUEST_TOO_LARGE: &str = "REQUEST_TOO_LARGE";
    pub const MALFORMED_REQUEST: &str = "MALFORMED_REQUEST";
    pub const OUTCOME_UNKNOWN: &str = "OUTCOME_UNKNOWN";
    pub const STREAM_IDLE: &str = "STREAM_IDLE";
    pub const UNAUTHENTICATED: &str = "UNAUTHENTICATED";
    pub const HUB_NOT_ALLOWED: &str = "HUB_NOT_ALLOWED";
    pub const CONNECTION_AGED: &str = "CONNECTION_AGED";
    pub const SCHEMA_VIOLATION: &str = "SCHEMA_VIOLATION";
}

/// A status under construction.
struct Built {
    code: Code,
    reason: &'static str,
    metadata: HashMap<String, String>,
    field_violations: Vec<(String, String)>,
    retry_after: Option<Duration>,
    quota_subject: Option<(String, String)>,
}

impl Built {
    fn new(code: Code, reason: &'static str) -> Self {
        Self {
            code,
            reason,
            metadata: HashMap::new(),
            field_violations: Vec::new(),
            retry_after: None,
            quota_subject: None,
        }
    }

    fn field(mut self, field: String, description: String) -> Self {
        // Field paths and descriptions may hold client text (a map key, a partition id).
        let field = clip(&field).into_owned();
        let description = clip_to(&description, MESSAGE_MAX).into_owned();
        self.field_violations.push((field, description));
        self
    }

    fn retry(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    fn meta(mut self, key: &str, value: impl Into<String>) -> Self {
        let value = value.into();
        let value = match clip(&value) {
            std::borrow::Cow::Borrowed(_) => value,
            std::borrow::Cow::Owned(clipped) => clipped,
        };
        self.metadata.insert(key.to_owned(), value);
        self
    }

    /// A stream's ending says how far it got: `messages_read`, and `last_sequence` when any was read.
    fn progress(self, progress: &StreamProgress) -> Self {
        let built = self.meta("messages_read", progress.messages.to_string());
        match progress.last_sequence {
            Some(last) => built.meta("last_sequence", last.to_string()),
            None => built,
        }
    }
}

fn pack(message: &impl Message, type_name: &str) -> prost_types::Any {
    prost_types::Any {
        type_url: format!("type.googleapis.com/{type_name}"),
        value: message.encode_to_vec(),
    }
}

impl From<AuthError> for GatewayError {
    fn from(error: AuthError) -> Self {
        Self::Unauthenticated {
            cause: error.reason(),
            detail: clip_to(&error.to_string(), MESSAGE_MAX).into_owned(),
        }
    }
}

impl GatewayError {
    /// The refusal of `identity` (clipped) for `hub`.
    pub fn hub_not_allowed(hub: &str, identity: &str) -> Self {
        Self::HubNotAllowed {
            hub: hub.to_owned(),
            identity: clip(identity).into_owned(),
        }
    }

    /// The error of one event at `path` of a request.
    pub fn event(path: impl Into<String>, error: SendError) -> Self {
        // The producer's errors may quote the event (a partition id, a reason naming a property): clipped
        // here, so the message and the details repeat a few hundred bytes of it at most.
        let error = match error {
            SendError::UnknownPartition {
                hub,
                partition,
                count,
            } => SendError::UnknownPartition {
                hub,
                partition: clip(&partition).into_owned(),
                count,
            },
            SendError::InvalidEvent { field, reason } => SendError::InvalidEvent {
                field,
                reason: clip_to(&reason, 2 * CLIENT_TEXT_MAX).into_owned(),
            },
            error => error,
        };
        Self::Event {
            path: path.into(),
            error,
        }
    }

    fn build(&self) -> Built {
        match self {
            Self::InvalidRequest { field, reason } => {
                Built::new(Code::InvalidArgument, reason::INVALID_EVENT)
                    .field(field.clone(), reason.clone())
            }
            Self::UnknownHub { hub, .. } => {
                Built::new(Code::NotFound, reason::UNKNOWN_EVENT_HUB).meta("event_hub", hub.clone())
            }
            Self::Unauthenticated { cause, .. } => {
                Built::new(Code::Unauthenticated, reason::UNAUTHENTICATED).meta("cause", *cause)
            }
            Self::HubNotAllowed { hub, identity } => {
                Built::new(Code::PermissionDenied, reason::HUB_NOT_ALLOWED)
                    .meta("event_hub", hub.clone())
                    .meta("identity", identity.clone())
            }
            Self::SasResourceNotCovered { hub, resource, .. } => {
                Built::new(Code::PermissionDenied, reason::HUB_NOT_ALLOWED)
                    .meta("event_hub", hub.clone())
                    .meta("sas_resource", resource.clone())
            }
            Self::RateLimited {
                subject,
                limit_per_second,
                retry_after,
            } => {
                let mut built =
                    Built::new(Code::ResourceExhausted, reason::RATE_LIMITED).retry(*retry_after);
                built.quota_subject = Some((
                    subject.clone(),
                    format!("at most {limit_per_second} events per second"),
                ));
                built
            }
            Self::Overloaded { bound, retry_after } => {
                Built::new(Code::ResourceExhausted, reason::OVERLOADED)
                    .retry(*retry_after)
                    .meta("bound", *bound)
            }
            Self::Draining => {
                Built::new(Code::Unavailable, reason::DRAINING).retry(DEFAULT_RETRY_AFTER)
            }
            Self::Event { path, error } => build_send_error(path, error),
            Self::RequestTooLarge { limit, .. } => {
                Built::new(Code::OutOfRange, reason::REQUEST_TOO_LARGE)
                    .meta("limit", limit.to_string())
            }
            Self::MalformedRequest { field, detail } => {
                let built = Built::new(Code::InvalidArgument, reason::MALFORMED_REQUEST);
                match field {
                    Some(field) => built.field(field.clone(), detail.clone()),
                    None => built,
                }
            }
            Self::StreamMessageUnreadable {
                fault,
                detail,
                progress,
            } => {
                let built = match fault {
                    StreamFault::TooLarge { limit } => {
                        Built::new(Code::OutOfRange, reason::REQUEST_TOO_LARGE)
                            .meta("limit", limit.to_string())
                    }
                    StreamFault::Malformed => {
                        Built::new(Code::InvalidArgument, reason::MALFORMED_REQUEST)
                    }
                    StreamFault::Invalid { field } => {
                        Built::new(Code::InvalidArgument, reason::INVALID_EVENT)
                            .field(field.clone(), detail.clone())
                    }
                };
                built.progress(progress)
            }
            Self::StreamDeadlineExceeded { progress } => {
                Built::new(Code::DeadlineExceeded, reason::DEADLINE_EXCEEDED).progress(progress)
            }
            Self::StreamIdle { progress, .. } => Built::new(Code::Unavailable, reason::STREAM_IDLE)
                .retry(Duration::ZERO)
                .progress(progress),
            Self::ConnectionAged { progress } => {
                Built::new(Code::Unavailable, reason::CONNECTION_AGED)
                    .retry(Duration::ZERO)
                    .progress(progress)
            }
            // One field violation per listed violation: `<path>.body` then the JSON Pointer of the instance
            // location (`events[2].body/items/0/price`; the root is `events[2].body`).
            Self::SchemaViolation {
                path,
                hub,
                violations,
            } => violations.listed.iter().fold(
                Built::new(Code::InvalidArgument, reason::SCHEMA_VIOLATION)
                    .meta("event_hub", hub.clone())
                    .meta("violations", violations.count_label()),
                |built, violation| {
                    built.field(
                        format!("{path}.body{}", violation.pointer),
                        violation.description.clone(),
                    )
                },
            ),
        }
    }

    /// The `ErrorInfo` reason in lower case (`invalid_event`, `event_hubs_busy`, ...): the `outcome` label of
    /// an event that failed with this error.
    pub fn reason(&self) -> &'static str {
        match self.build().reason {
            reason::INVALID_EVENT => "invalid_event",
            reason::EVENT_TOO_LARGE => "event_too_large",
            reason::UNKNOWN_EVENT_HUB => "unknown_event_hub",
            reason::RATE_LIMITED => "rate_limited",
            reason::OVERLOADED => "overloaded",
            reason::EVENT_HUBS_BUSY => "event_hubs_busy",
            reason::EVENT_HUBS_UNAVAILABLE => "event_hubs_unavailable",
            reason::DRAINING => "draining",
            reason::DEADLINE_EXCEEDED => "deadline_exceeded",
            reason::EVENT_HUBS_UNAUTHORIZED => "event_hubs_unauthorized",
            reason::EVENT_HUBS_REJECTED => "event_hubs_rejected",
            reason::REQUEST_TOO_LARGE => "request_too_large",
            reason::MALFORMED_REQUEST => "malformed_request",
            reason::OUTCOME_UNKNOWN => "outcome_unknown",
            reason::STREAM_IDLE => "stream_idle",
            reason::UNAUTHENTICATED => "unauthenticated",
            reason::HUB_NOT_ALLOWED => "hub_not_allowed",
            reason::CONNECTION_AGED => "connection_aged",
            reason::SCHEMA_VIOLATION => "schema_violation",
            // Every reason is listed above (a test checks each); a new one shows as this until it is added.
            _ => "other",
        }
    }

    /// The `google.rpc.Status` of this error (for `EventResult.status` and `StreamAck.status`).
    pub fn to_rpc_status(&self) -> rpc::Status {
        let built = self.build();
        let mut details = vec![pack(
            &rpc::ErrorInfo {
                reason: built.reason.to_owned(),
                domain: DOMAIN.to_owned(),
                metadata: built.metadata,
            },
            "google.rpc.ErrorInfo",
        )];
        if !built.field_violations.is_empty() {
            let field_violations = built
                .field_violations
                .into_iter()
                .map(|(field, description)| rpc::bad_request::FieldViolation {
                    field,
                    description,
                    ..Default::default()
                })
                .collect();
            details.push(pack(
                &rpc::BadRequest { field_violations },
                "google.rpc.BadRequest",
            ));
        }
        if let Some(after) = built.retry_after {
            let retry_delay = prost_types::Duration {
                seconds: after.as_secs() as i64,
                nanos: after.subsec_nanos() as i32,
            };
            details.push(pack(
                &rpc::RetryInfo {
                    retry_delay: Some(retry_delay),
                },
                "google.rpc.RetryInfo",
            ));
        }
        if let Some((subject, description)) = built.quota_subject {
            let violation = rpc::quota_failure::Violation {
                subject,
                description,
                ..Default::default()
            };
            details.push(pack(
                &rpc::QuotaFailure {
                    violations: vec![violation],
                },
                "google.rpc.QuotaFailure",
            ));
        }
        rpc::Status {
            code: built.code as i32,
            // The texts inside are clipped where they are made; this bounds the whole in any case.
            message: clip_to(&self.to_string(), MESSAGE_MAX).into_owned(),
            details,
        }
    }

    /// The call status of this error, with its details in `grpc-status-details-bin`.
    pub fn to_status(&self) -> tonic::Status {
        let status = self.to_rpc_status();
        tonic::Status::with_details(
            Code::from_i32(status.code),
            status.message.clone(),
            status.encode_to_vec().into(),
        )
    }
}

impl From<GatewayError> for tonic::Status {
    fn from(error: GatewayError) -> Self {
        error.to_status()
    }
}

/// The OK status of an event Event Hubs accepted.
pub fn ok() -> rpc::Status {
    rpc::Status {
        code: Code::Ok as i32,
        message: String::new(),
        details: Vec::new(),
    }
}

fn build_send_error(path: &str, error: &SendError) -> Built {
    match error {
        SendError::InvalidEvent { field, reason } => {
            Built::new(Code::InvalidArgument, reason::INVALID_EVENT)
                .field(format!("{path}.{field}"), reason.clone())
        }
        SendError::OverLimit(violation) => Built::new(Code::InvalidArgument, reason::INVALID_EVENT)
            .field(format!("{path}.{}", violation.field), violation.to_string())
            .meta("rule", violation.rule)
            .meta("limit", violation.limit.to_string()),
        SendError::UnknownPartition { .. } => {
            Built::new(Code::InvalidArgument, reason::INVALID_EVENT)
                .field(format!("{path}.partition_id"), error.to_string())
        }
        SendError::TooLarge { size, limit } => {
            Built::new(Code::InvalidArgument, reason::EVENT_TOO_LARGE)
                .field(
                    path.to_owned(),
                    format!(
                        "{size} bytes encoded; Event Hubs accepts at most {limit} bytes per message"
                    ),
                )
                .meta("size", size.to_string())
                .meta("limit", limit.to_string())
        }
        SendError::Overloaded { what, retry_after } => {
            Built::new(Code::ResourceExhausted, reason::OVERLOADED)
                .retry(*retry_after)
                .meta("bound", *what)
        }
        SendError::PoolTimeout { .. }
        | SendError::NotProcessed(_)
        | SendError::Connection(_)
        | SendError::Unreachable { .. } => {
            Built::new(Code::Unavailable, reason::EVENT_HUBS_UNAVAILABLE).retry(DEFAULT_RETRY_AFTER)
        }
        SendError::DeadlineExceeded { .. } => {
            Built::new(Code::DeadlineExceeded, reason::DEADLINE_EXCEEDED)
        }
        SendError::OutcomeUnknown { .. } => Built::new(Code::Unknown, reason::OUTCOME_UNKNOWN),
        SendError::Auth(_) | SendError::TokenLost(_) => {
            Built::new(Code::PermissionDenied, reason::EVENT_HUBS_UNAUTHORIZED)
        }
        SendError::Closed => {
            Built::new(Code::Unavailable, reason::DRAINING).retry(DEFAULT_RETRY_AFTER)
        }
        // Event Hubs' own refusals, by what they mean to the caller.
        SendError::Service(service) => {
            let built = match error.class() {
                ErrorClass::Busy => Built::new(Code::Unavailable, reason::EVENT_HUBS_BUSY)
                    .retry(DEFAULT_RETRY_AFTER),
                ErrorClass::Unavailable => {
                    Built::new(Code::Unavailable, reason::EVENT_HUBS_UNAVAILABLE)
                        .retry(DEFAULT_RETRY_AFTER)
                }
                ErrorClass::Unauthorized => {
                    Built::new(Code::PermissionDenied, reason::EVENT_HUBS_UNAUTHORIZED)
                }
                ErrorClass::UnknownHub => Built::new(Code::NotFound, reason::UNKNOWN_EVENT_HUB),
                ErrorClass::TooLarge => Built::new(Code::InvalidArgument, reason::EVENT_TOO_LARGE)
                    .field(path.to_owned(), service.to_string()),
                // The producer sends a refused batch's events apart, so this refusal is this event's own.
                ErrorClass::InvalidEvent => {
                    Built::new(Code::InvalidArgument, reason::INVALID_EVENT)
                        .field(path.to_owned(), service.to_string())
                }
                _ => Built::new(Code::Internal, reason::EVENT_HUBS_REJECTED),
            };
            built.meta("condition", service.condition.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventhub_producer::{AmqpCondition, ServiceError};

    fn decode_detail<M: Message + Default>(status: &rpc::Status, type_name: &str) -> Option<M> {
        status
            .details
            .iter()
            .find(|any| any.type_url == format!("type.googleapis.com/{type_name}"))
            .map(|any| M::decode(any.value.as_slice()).unwrap())
    }

    fn reason_of(status: &rpc::Status) -> String {
        decode_detail::<rpc::ErrorInfo>(status, "google.rpc.ErrorInfo")
            .unwrap()
            .reason
    }

    #[test]
    fn every_error_has_its_code_and_stable_reason() {
        let service = |condition| {
            SendError::Service(ServiceError {
                condition,
                description: None,
            })
        };
        let cases: Vec<(GatewayError, Code, &str)> = vec![
            (
                GatewayError::event(
                    "events[3]",
                    SendError::InvalidEvent {
                        field: "body",
                        reason: "required".into(),
                    },
                ),
                Code::InvalidArgument,
                "INVALID_EVENT",
            ),
            (
                GatewayError::event("event", SendError::TooLarge { size: 2, limit: 1 }),
                Code::InvalidArgument,
                "EVENT_TOO_LARGE",
            ),
            (
                GatewayError::UnknownHub {
                    hub: "x".into(),
                    served: "eh1".into(),
                },
                Code::NotFound,
                "UNKNOWN_EVENT_HUB",
            ),
            (
                GatewayError::RateLimited {
                    subject: "client:a".into(),
                    limit_per_second: 5,
                    retry_after: Duration::from_millis(20),
                },
                Code::ResourceExhausted,
                "RATE_LIMITED",
            ),
            (
                GatewayError::event(
                    "event",
                    SendError::Overloaded {
                        what: "max_buffered_bytes",
                        retry_after: Duration::from_millis(50),
                    },
                ),
                Code::ResourceExhausted,
                "OVERLOADED",
            ),
            (
                GatewayError::event("event", service(AmqpCondition::ServerBusy)),
                Code::Unavailable,
                "EVENT_HUBS_BUSY",
            ),
            (
                GatewayError::event("event", SendError::Connection("gone".into())),
                Code::Unavailable,
                "EVENT_HUBS_UNAVAILABLE",
            ),
            (GatewayError::Draining, Code::Unavailable, "DRAINING"),
            (
                GatewayError::event("event", SendError::DeadlineExceeded { last_error: None }),
                Code::DeadlineExceeded,
                "DEADLINE_EXCEEDED",
            ),
            (
                GatewayError::event("event", service(AmqpCondition::Unauthorized)),
                Code::PermissionDenied,
                "EVENT_HUBS_UNAUTHORIZED",
            ),
            (
                GatewayError::event(
                    "events[2]",
                    SendError::OverLimit(eventhub_wire::limits::Violation {
                        field: "properties",
                        rule: "max_properties",
                        limit: 1024,
                        actual: 32_769,
                    }),
                ),
                Code::InvalidArgument,
                "INVALID_EVENT",
            ),
            (
                GatewayError::event("event", service(AmqpCondition::InvalidArgument)),
                Code::InvalidArgument,
                "INVALID_EVENT",
            ),
            (
                GatewayError::event("event", service(AmqpCondition::Other("x:y".into()))),
                Code::Internal,
                "EVENT_HUBS_REJECTED",
            ),
            (
                GatewayError::StreamMessageUnreadable {
                    fault: StreamFault::TooLarge { limit: 10 },
                    detail: "found 11 bytes".into(),
                    progress: StreamProgress::default(),
                },
                Code::OutOfRange,
                "REQUEST_TOO_LARGE",
            ),
            (
                GatewayError::StreamMessageUnreadable {
                    fault: StreamFault::Malformed,
                    detail: "buffer underflow".into(),
                    progress: StreamProgress::default(),
                },
                Code::InvalidArgument,
                "MALFORMED_REQUEST",
            ),
            (
                GatewayError::StreamDeadlineExceeded {
                    progress: StreamProgress::default(),
                },
                Code::DeadlineExceeded,
                "DEADLINE_EXCEEDED",
            ),
            (
                GatewayError::RequestTooLarge {
                    limit: 10,
                    detail: "the message is 11 bytes".into(),
                },
                Code::OutOfRange,
                "REQUEST_TOO_LARGE",
            ),
            (
                GatewayError::MalformedRequest {
                    field: Some("event_hub".into()),
                    detail: "invalid string value".into(),
                },
                Code::InvalidArgument,
                "MALFORMED_REQUEST",
            ),
            (
                StreamFault::Invalid {
                    field: "events".into(),
                }
                .with_progress("at most 10 events".into(), StreamProgress::default()),
                Code::InvalidArgument,
                "INVALID_EVENT",
            ),
            (
                GatewayError::event(
                    "event",
                    SendError::OutcomeUnknown {
                        last_error: "no disposition".into(),
                    },
                ),
                Code::Unknown,
                "OUTCOME_UNKNOWN",
            ),
            (
                GatewayError::StreamIdle {
                    idle: Duration::from_secs(300),
                    progress: StreamProgress::default(),
                },
                Code::Unavailable,
                "STREAM_IDLE",
            ),
            (
                GatewayError::from(AuthError::Missing),
                Code::Unauthenticated,
                "UNAUTHENTICATED",
            ),
            (
                GatewayError::HubNotAllowed {
                    hub: "orders".into(),
                    identity: "billing".into(),
                },
                Code::PermissionDenied,
                "HUB_NOT_ALLOWED",
            ),
            (
                GatewayError::SasResourceNotCovered {
                    hub: "orders".into(),
                    resource: "https://gw/audit".into(),
                    requested: "orders".into(),
                },
                Code::PermissionDenied,
                "HUB_NOT_ALLOWED",
            ),
            (
                GatewayError::ConnectionAged {
                    progress: StreamProgress::default(),
                },
                Code::Unavailable,
                "CONNECTION_AGED",
            ),
            (
                GatewayError::SchemaViolation {
                    path: "event".into(),
                    hub: "eh1".into(),
                    violations: Violations {
                        listed: Vec::new(),
                        found: 0,
                        more: false,
                    },
                },
                Code::InvalidArgument,
                "SCHEMA_VIOLATION",
            ),
        ];
        for (error, code, reason) in cases {
            let status = error.to_rpc_status();
            assert_eq!(status.code, code as i32, "{error}");
            assert_eq!(reason_of(&status), reason, "{error}");
            assert_eq!(error.reason(), reason.to_ascii_lowercase(), "{error}");
            let retryable = matches!(code, Code::ResourceExhausted | Code::Unavailable);
            let retry = decode_detail::<rpc::RetryInfo>(&status, "google.rpc.RetryInfo");
            assert_eq!(retry.is_some(), retryable, "RetryInfo on {error}");
        }
    }

    #[test]
    fn a_stream_ending_says_how_far_the_stream_got_and_the_limit() {
        let mut progress = StreamProgress::default();
        progress.read(7);
        progress.read(9);
        let error = GatewayError::StreamMessageUnreadable {
            fault: StreamFault::TooLarge { limit: 1024 },
            detail: "found 2048 bytes".into(),
            progress,
        };
        let status = error.to_rpc_status();
        let info = decode_detail::<rpc::ErrorInfo>(&status, "google.rpc.ErrorInfo").unwrap();
        assert_eq!(info.metadata["messages_read"], "2");
        assert_eq!(info.metadata["last_sequence"], "9");
        assert_eq!(info.metadata["limit"], "1024");
        assert!(
            status
                .message
                .starts_with("the stream message after 2 messages read (the last with sequence 9) is larger than max_request_bytes (1024 bytes): found 2048 bytes;"),
            "{}",
            status.message
        );
    }

    #[test]
    fn field_violations_carry_the_path_in_the_request() {
        let status = GatewayError::event(
            "events[3]",
            SendError::UnknownPartition {
                hub: "eh1".into(),
                partition: "9".into(),
                count: 4,
            },
        )
        .to_rpc_status();
        let bad = decode_detail::<rpc::BadRequest>(&status, "google.rpc.BadRequest").unwrap();
        assert_eq!(bad.field_violations[0].field, "events[3].partition_id");
        assert!(bad.field_violations[0].description.contains("has 4"));
    }

    #[test]
    fn a_schema_violation_names_each_pointer_under_the_event_body() {
        use crate::gateway::schemas::{MAX_LISTED, Violation};
        let violation = |pointer: &str| Violation {
            pointer: pointer.into(),
            description: format!("{} is wrong", "y".repeat(200)),
        };
        let status = GatewayError::SchemaViolation {
            path: "events[2]".into(),
            hub: "orders".into(),
            violations: Violations {
                listed: ["", "/id", "/items/0/price", "/a", "/b"]
                    .into_iter()
                    .map(violation)
                    .collect(),
                found: 100,
                more: true,
            },
        }
        .to_rpc_status();
        assert_eq!(status.code, Code::InvalidArgument as i32);
        let info = decode_detail::<rpc::ErrorInfo>(&status, "google.rpc.ErrorInfo").unwrap();
        assert_eq!(info.reason, "SCHEMA_VIOLATION");
        assert_eq!(info.metadata["violations"], "100+");
        assert_eq!(info.metadata["event_hub"], "orders");
        let bad = decode_detail::<rpc::BadRequest>(&status, "google.rpc.BadRequest").unwrap();
        let fields: Vec<&str> = bad
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(
            fields,
            [
                "events[2].body",
                "events[2].body/id",
                "events[2].body/items/0/price",
                "events[2].body/a",
                "events[2].body/b"
            ]
        );
        assert_eq!(bad.field_violations.len(), MAX_LISTED);
        assert!(
            status
                .message
                .starts_with("events[2]: the body does not match the JSON Schema of event hub \"orders\": 100+ violation(s); at the root: yyy"),
            "{}",
            status.message
        );
        // Five clipped descriptions, a clipped message: bounded whatever the body.
        assert!(status.encoded_len() < 4096, "{}", status.encoded_len());
    }

    #[test]
    fn the_call_status_carries_the_details_in_its_trailer() {
        let status = GatewayError::Draining.to_status();
        assert_eq!(status.code(), Code::Unavailable);
        let decoded = rpc::Status::decode(status.details()).unwrap();
        assert_eq!(reason_of(&decoded), "DRAINING");
        let quota = GatewayError::RateLimited {
            subject: "global".into(),
            limit_per_second: 5,
            retry_after: Duration::from_millis(1500),
        }
        .to_rpc_status();
        let failure =
            decode_detail::<rpc::QuotaFailure>(&quota, "google.rpc.QuotaFailure").unwrap();
        assert_eq!(failure.violations[0].subject, "global");
        let retry = decode_detail::<rpc::RetryInfo>(&quota, "google.rpc.RetryInfo").unwrap();
        assert_eq!(
            retry.retry_delay,
            Some(prost_types::Duration {
                seconds: 1,
                nanos: 500_000_000
            })
        );
    }

    #[test]
    fn client_text_is_clipped_with_its_length_in_messages_and_details() {
        assert_eq!(clip("short"), "short");
        let long = "\u{e9}".repeat(1000); // 2000 bytes; the cut lands inside a character
        let clipped = clip(&long);
        assert!(
            clipped.ends_with("... [cut: 2000 bytes in all]"),
            "{clipped}"
        );
        assert!(clipped.len() < CLIENT_TEXT_MAX + 40);
        let status = GatewayError::UnknownHub {
            hub: clip(&"h".repeat(1 << 20)).into_owned(),
            served: "eh1".into(),
        }
        .to_rpc_status();
        assert!(status.message.len() < 512, "{}", status.message.len());
        assert!(status.encoded_len() < 1024, "{}", status.encoded_len());
        let status = GatewayError::event(
            "event",
            SendError::InvalidEvent {
                field: "properties",
                reason: "x".repeat(1 << 20),
            },
        )
        .to_rpc_status();
        assert!(status.encoded_len() < 2048, "{}", status.encoded_len());
        let status = GatewayError::event(
            "event",
            SendError::UnknownPartition {
                hub: "eh1".into(),
                partition: "9".repeat(1 << 20),
                count: 4,
            },
        )
        .to_rpc_status();
        assert!(status.encoded_len() < 1024, "{}", status.encoded_len());
        let status = GatewayError::StreamMessageUnreadable {
            fault: StreamFault::Malformed,
            detail: "y".repeat(1 << 20),
            progress: StreamProgress::default(),
        }
        .to_rpc_status();
        assert!(status.encoded_len() < 4096, "{}", status.encoded_len());
    }
}
