//! The REST listener's answers: the one mapping from a gateway status (gRPC code and `ErrorInfo` reason) to an
//! HTTP status, `Retry-After` from `RetryInfo`, and the bounded JSON bodies of refusals and of batches.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Body;
use http::{HeaderValue, Response, StatusCode, header};
use prost::Message;
use serde::Serialize;
use tonic::Code;

use crate::gateway::GatewayError;
use crate::gateway::status::{CLIENT_TEXT_MAX, clip_to};
use crate::proto::google::rpc;

/// The media type of every JSON body the listener writes.
const JSON: &str = "application/json";

/// One refusal, as the gateway gave it: what goes into the JSON body and the HTTP status.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Refusal {
    /// The HTTP status (not serialized: it is the response's).
    #[serde(skip)]
    pub http: u16,
    /// The gRPC code's name (`INVALID_ARGUMENT`, ...).
    pub code: &'static str,
    /// The gateway's `ErrorInfo` reason (`INVALID_EVENT`, ...); none for the listener's own routing answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What is wrong (bounded).
    pub message: String,
    /// The field at fault, from `BadRequest` (`event.partition_id`, `BrokerProperties`, `[2].Body`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// When to retry, from `RetryInfo` (also the `Retry-After` header, rounded up to whole seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<f64>,
    /// `ErrorInfo` metadata (`limit`, `event_hub`, `cause`, ...).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// The HTTP status of a gateway status: by its reason where it has one (the service's own answers: 400, 401,
/// 403, 404, 413, 429/503 when throttled), else by its gRPC code.
pub fn http_status(code: Code, reason: Option<&str>) -> StatusCode {
    match reason {
        Some("INVALID_EVENT" | "MALFORMED_REQUEST") => StatusCode::BAD_REQUEST,
        Some("EVENT_TOO_LARGE" | "REQUEST_TOO_LARGE") => StatusCode::PAYLOAD_TOO_LARGE,
        Some("UNKNOWN_EVENT_HUB") => StatusCode::NOT_FOUND,
        Some("UNAUTHENTICATED") => StatusCode::UNAUTHORIZED,
        Some("HUB_NOT_ALLOWED") => StatusCode::FORBIDDEN,
        Some("RATE_LIMITED") => StatusCode::TOO_MANY_REQUESTS,
        Some(
            "OVERLOADED"
            | "EVENT_HUBS_BUSY"
            | "EVENT_HUBS_UNAVAILABLE"
            | "DRAINING"
            | "STREAM_IDLE"
            | "CONNECTION_AGED",
        ) => StatusCode::SERVICE_UNAVAILABLE,
        Some("DEADLINE_EXCEEDED") => StatusCode::GATEWAY_TIMEOUT,
        // The gateway's own credentials were refused upstream: the caller's are not at fault.
        Some("EVENT_HUBS_UNAUTHORIZED") => StatusCode::BAD_GATEWAY,
        // Event Hubs answered 500 itself; an unknown outcome must not read as a refusal to retry blindly.
        Some("EVENT_HUBS_REJECTED" | "OUTCOME_UNKNOWN") => StatusCode::INTERNAL_SERVER_ERROR,
        _ => match code {
            Code::InvalidArgument | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            Code::OutOfRange => StatusCode::PAYLOAD_TOO_LARGE,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable | Code::Aborted => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        },
    }
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn detail<M: Message + Default>(status: &rpc::Status, name: &str) -> Option<M> {
    status
        .details
        .iter()
        .find(|any| any.type_url.strip_prefix("type.googleapis.com/") == Some(name))
        .and_then(|any| M::decode(any.value.as_slice()).ok())
}

impl Refusal {
    /// The refusal a `google.rpc.Status` (a call's, or one event's in `SendEvents`) says.
    pub fn from_rpc(status: &rpc::Status) -> Self {
        let code = Code::from_i32(status.code);
        let info = detail::<rpc::ErrorInfo>(status, "google.rpc.ErrorInfo");
        let reason = info.as_ref().map(|info| info.reason.clone());
        let field = detail::<rpc::BadRequest>(status, "google.rpc.BadRequest")
            .and_then(|bad| bad.field_violations.into_iter().next())
            .map(|violation| violation.field);
        let retry_after_seconds = detail::<rpc::RetryInfo>(status, "google.rpc.RetryInfo")
            .and_then(|retry| retry.retry_delay)
            .map(|delay| delay.seconds.max(0) as f64 + f64::from(delay.nanos.max(0)) / 1e9);
        let metadata = info
            .map(|info| {
                info.metadata
                    .into_iter()
                    .map(|(key, value)| (key, clip_to(&value, CLIENT_TEXT_MAX).into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            http: http_status(code, reason.as_deref()).as_u16(),
            code: code_name(code),
            reason,
            message: status.message.clone(),
            field,
            retry_after_seconds,
            metadata,
        }
    }

    /// The refusal of a call's status (its details from `grpc-status-details-bin`).
    pub fn from_status(status: &tonic::Status) -> Self {
        let decoded = rpc::Status::decode(status.details())
            .ok()
            .filter(|decoded| decoded.code == status.code() as i32 && !decoded.details.is_empty());
        match decoded {
            Some(decoded) => Self::from_rpc(&decoded),
            None => Self::from_rpc(&rpc::Status {
                code: status.code() as i32,
                message: status.message().to_owned(),
                details: Vec::new(),
            }),
        }
    }

    /// The refusal of an error the listener finds itself, worded as the gRPC side would.
    pub fn from_error(error: &GatewayError) -> Self {
        Self::from_rpc(&error.to_rpc_status())
    }

    /// A routing answer of the listener's own (no gateway reason applies): unknown route, wrong method.
    pub fn routing(http: StatusCode, code: Code, message: impl Into<String>) -> Self {
        Self {
            http: http.as_u16(),
            code: code_name(code),
            reason: None,
            message: message.into(),
            field: None,
            retry_after_seconds: None,
            metadata: BTreeMap::new(),
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        self.retry_after_seconds.map(Duration::from_secs_f64)
    }

    /// The whole response: status, `Retry-After` when the gateway said when, and `{"error": {...}}`.
    pub fn into_response(self) -> Response<Body> {
        let status = StatusCode::from_u16(self.http).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after = self.retry_after();
        let body = serde_json::json!({ "error": self });
        json_response(status, retry_after, &body)
    }
}

/// One event's outcome in a batch's answer.
#[derive(Debug, Serialize)]
pub struct EventOutcome {
    /// The event's HTTP status: 201 when published.
    pub status: u16,
    /// The partition it went to, when published and known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition_id: Option<String>,
    /// Why it was not, when it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Refusal>,
}

/// A batch's answer: `201` with no body when every event was published; otherwise the first failure's status
/// and `Retry-After`, with `{"error": <first failure>, "events": [<each event's outcome>]}` (events that were
/// published stay published: a resend of the whole batch publishes them again).
pub fn batch_response(outcomes: Vec<EventOutcome>) -> Response<Body> {
    let Some(first) = outcomes.iter().find_map(|outcome| outcome.error.clone()) else {
        return created();
    };
    let status = StatusCode::from_u16(first.http).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let retry_after = first.retry_after();
    let body = serde_json::json!({ "error": first, "events": outcomes });
    json_response(status, retry_after, &body)
}

/// `201 Created` with an empty body: the service's answer to a published event or batch.
pub fn created() -> Response<Body> {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::CREATED;
    response
}

fn json_response(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &serde_json::Value,
) -> Response<Body> {
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    if let Some(after) = retry_after {
        // Retry-After is whole seconds; rounded up so a client waiting that long is not early.
        let seconds = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_http_status() {
        let cases = [
            ("INVALID_EVENT", Code::InvalidArgument, 400),
            ("MALFORMED_REQUEST", Code::InvalidArgument, 400),
            ("EVENT_TOO_LARGE", Code::InvalidArgument, 413),
            ("REQUEST_TOO_LARGE", Code::OutOfRange, 413),
            ("UNKNOWN_EVENT_HUB", Code::NotFound, 404),
            ("UNAUTHENTICATED", Code::Unauthenticated, 401),
            ("HUB_NOT_ALLOWED", Code::PermissionDenied, 403),
            ("RATE_LIMITED", Code::ResourceExhausted, 429),
            ("OVERLOADED", Code::ResourceExhausted, 503),
            ("EVENT_HUBS_BUSY", Code::Unavailable, 503),
            ("EVENT_HUBS_UNAVAILABLE", Code::Unavailable, 503),
            ("DRAINING", Code::Unavailable, 503),
            ("DEADLINE_EXCEEDED", Code::DeadlineExceeded, 504),
            ("EVENT_HUBS_UNAUTHORIZED", Code::PermissionDenied, 502),
            ("EVENT_HUBS_REJECTED", Code::Internal, 500),
            ("OUTCOME_UNKNOWN", Code::Unknown, 500),
        ];
        for (reason, code, http) in cases {
            assert_eq!(http_status(code, Some(reason)).as_u16(), http, "{reason}");
        }
        assert_eq!(http_status(Code::NotFound, None).as_u16(), 404);
        assert_eq!(
            http_status(Code::Internal, Some("SOMETHING_NEW")).as_u16(),
            500
        );
    }

    #[test]
    fn a_gateway_error_keeps_its_reason_field_and_retry() {
        let limited = GatewayError::RateLimited {
            subject: "client:a".into(),
            limit_per_second: 5,
            retry_after: Duration::from_millis(1200),
        };
        let refusal = Refusal::from_status(&limited.to_status());
        assert_eq!(refusal.http, 429);
        assert_eq!(refusal.code, "RESOURCE_EXHAUSTED");
        assert_eq!(refusal.reason.as_deref(), Some("RATE_LIMITED"));
        assert_eq!(refusal.retry_after_seconds, Some(1.2));
        let response = refusal.into_response();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");

        let invalid = Refusal::from_error(&GatewayError::InvalidRequest {
            field: "BrokerProperties".into(),
            reason: "is not a JSON object".into(),
        });
        assert_eq!(invalid.http, 400);
        assert_eq!(invalid.field.as_deref(), Some("BrokerProperties"));
        let json = serde_json::to_value(&invalid).unwrap();
        assert_eq!(json["reason"], "INVALID_EVENT");
        assert!(json.get("retry_after_seconds").is_none());
    }

    #[test]
    fn a_batch_answers_as_its_first_failure_listing_every_event() {
        assert_eq!(
            batch_response(vec![EventOutcome {
                status: 201,
                partition_id: Some("0".into()),
                error: None,
            }])
            .status(),
            201
        );
        let refusal = Refusal::from_error(&GatewayError::UnknownHub {
            hub: "nope".into(),
            served: "a".into(),
        });
        let response = batch_response(vec![
            EventOutcome {
                status: 201,
                partition_id: Some("1".into()),
                error: None,
            },
            EventOutcome {
                status: refusal.http,
                partition_id: None,
                error: Some(refusal),
            },
        ]);
        assert_eq!(response.status(), 404);
        assert_eq!(response.headers()[header::CONTENT_TYPE], JSON);
    }
}
