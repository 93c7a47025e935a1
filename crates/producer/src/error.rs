//! What can go wrong sending an event: Event Hubs' AMQP conditions and the producer's own errors, each knowing
//! whether a retry can help.

use std::fmt;
use std::time::Duration;

use fe2o3_amqp_types::definitions::{self, AmqpError, ConnectionError, ErrorCondition, LinkError};

use eventhub_wire::conditions;
use eventhub_wire::limits::Violation;

/// An AMQP error condition as Event Hubs uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AmqpCondition {
    /// `amqp:unauthorized-access`: the token is missing, wrong or expired.
    Unauthorized,
    /// `amqp:not-found`: no such hub or partition.
    NotFound,
    /// `amqp:link:message-size-exceeded`.
    MessageSizeExceeded,
    /// `com.microsoft:server-busy`: the namespace is throttling.
    ServerBusy,
    /// `amqp:resource-limit-exceeded`: a quota was hit.
    ResourceLimitExceeded,
    /// `com.microsoft:timeout`: the service timed the operation out.
    Timeout,
    /// `amqp:internal-error`.
    InternalError,
    /// `amqp:connection:forced`: the service closed the connection.
    ConnectionForced,
    /// `amqp:link:detach-forced`: the service detached the link.
    DetachForced,
    /// `com.microsoft:argument-error` or `amqp:invalid-field`: the request itself is wrong.
    InvalidArgument,
    /// Any other condition, by its name on the wire.
    Other(String),
}

impl AmqpCondition {
    /// The condition named `name` on the wire.
    pub fn from_name(name: &str) -> Self {
        match name {
            "amqp:unauthorized-access" => Self::Unauthorized,
            "amqp:not-found" => Self::NotFound,
            "amqp:link:message-size-exceeded" => Self::MessageSizeExceeded,
            conditions::SERVER_BUSY => Self::ServerBusy,
            "amqp:resource-limit-exceeded" => Self::ResourceLimitExceeded,
            conditions::TIMEOUT => Self::Timeout,
            "amqp:internal-error" => Self::InternalError,
            "amqp:connection:forced" => Self::ConnectionForced,
            "amqp:link:detach-forced" => Self::DetachForced,
            conditions::ARGUMENT_ERROR | "amqp:invalid-field" => Self::InvalidArgument,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The condition of an error fe2o3 decoded.
    pub fn from_error_condition(condition: &ErrorCondition) -> Self {
        let name = match condition {
            ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess) => "amqp:unauthorized-access",
            ErrorCondition::AmqpError(AmqpError::NotFound) => "amqp:not-found",
            ErrorCondition::AmqpError(AmqpError::ResourceLimitExceeded) => {
                "amqp:resource-limit-exceeded"
            }
            ErrorCondition::AmqpError(AmqpError::InternalError) => "amqp:internal-error",
            ErrorCondition::AmqpError(AmqpError::InvalidField) => "amqp:invalid-field",
            ErrorCondition::ConnectionError(ConnectionError::ConnectionForced) => {
                "amqp:connection:forced"
            }
            ErrorCondition::LinkError(LinkError::MessageSizeExceeded) => {
                "amqp:link:message-size-exceeded"
            }
            ErrorCondition::LinkError(LinkError::DetachForced) => "amqp:link:detach-forced",
            ErrorCondition::Custom(symbol) => symbol.as_str(),
            other => return Self::Other(format!("{other:?}")),
        };
        Self::from_name(name)
    }

    /// Whether sending again, after a pause, can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::ServerBusy
                | Self::ResourceLimitExceeded
                | Self::Timeout
                | Self::InternalError
                | Self::ConnectionForced
                | Self::DetachForced
        )
    }
}

/// What a failed send means for the caller, whatever caused it: the classification callers map to their own
/// status codes (the gateway to gRPC), so no caller sorts AMQP conditions itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The event itself is wrong (a field, a limit, a partition that does not exist): sent again, it fails again.
    InvalidEvent,
    /// The event is larger than Event Hubs accepts in one message.
    TooLarge,
    /// The producer's own bounds are full: retry after a pause.
    Overloaded,
    /// Event Hubs is throttling (server busy, a quota hit): retry after a pause.
    Busy,
    /// Event Hubs could not be reached, or dropped the send before storing it: retry after a pause.
    Unavailable,
    /// Event Hubs refused the credential.
    Unauthorized,
    /// Event Hubs has no such hub.
    UnknownHub,
    /// The event's deadline passed before it was sent.
    DeadlineExceeded,
    /// The deadline passed while the event was in flight: Event Hubs may or may not have stored it.
    OutcomeUnknown,
    /// The producer is closing.
    Closed,
    /// Event Hubs refused the event with a condition the producer does not know.
    Rejected,
}

impl AmqpCondition {
    /// What this condition means for the caller.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::ServerBusy | Self::ResourceLimitExceeded => ErrorClass::Busy,
            Self::Timeout | Self::InternalError | Self::ConnectionForced | Self::DetachForced => {
                ErrorClass::Unavailable
            }
            Self::Unauthorized => ErrorClass::Unauthorized,
            Self::NotFound => ErrorClass::UnknownHub,
            Self::MessageSizeExceeded => ErrorClass::TooLarge,
            Self::InvalidArgument => ErrorClass::InvalidEvent,
            Self::Other(_) => ErrorClass::Rejected,
        }
    }
}

impl fmt::Display for AmqpCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::Unauthorized => "amqp:unauthorized-access",
            Self::NotFound => "amqp:not-found",
            Self::MessageSizeExceeded => "amqp:link:message-size-exceeded",
            Self::ServerBusy => conditions::SERVER_BUSY,
            Self::ResourceLimitExceeded => "amqp:resource-limit-exceeded",
            Self::Timeout => conditions::TIMEOUT,
            Self::InternalError => "amqp:internal-error",
            Self::ConnectionForced => "amqp:connection:forced",
            Self::DetachForced => "amqp:link:detach-forced",
            Self::InvalidArgument => conditions::ARGUMENT_ERROR,
            Self::Other(name) => name,
        };
        f.write_str(name)
    }
}

/// An AMQP error from Event Hubs: its condition and description.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{condition}{}", description.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
pub struct ServiceError {
    /// The condition.
    pub condition: AmqpCondition,
    /// What the service said about it.
    pub description: Option<String>,
}

impl From<&definitions::Error> for ServiceError {
    fn from(error: &definitions::Error) -> Self {
        Self {
            condition: AmqpCondition::from_error_condition(&error.condition),
            description: error.description.clone(),
        }
    }
}

/// Why an event was not sent. Every variant says what to do about it: fix the event, wait, or look at Event Hubs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The event itself is invalid; sending it again cannot succeed.
    #[error("invalid event: {field}: {reason}")]
    InvalidEvent {
        /// The field at fault (`partition_id`, `body`, ...).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The event breaks one of the rules of [`eventhub_wire::limits`] (a field over its limit).
    #[error("invalid event: {field}: {violation}", field = .0.field, violation = .0)]
    OverLimit(Violation),
    /// The event, encoded, is larger than the link's `max-message-size` even alone in a batch.
    #[error("event is {size} bytes encoded; the event hub accepts at most {limit} bytes per batch")]
    TooLarge {
        /// The event's encoded size in a batch.
        size: u64,
        /// The link's `max-message-size`.
        limit: u64,
    },
    /// The partition id is not one of the hub's.
    #[error("invalid event: partition_id: {hub} has no partition {partition} (it has {count})")]
    UnknownPartition {
        /// The hub.
        hub: String,
        /// The partition id asked for.
        partition: String,
        /// How many partitions the hub has.
        count: usize,
    },
    /// The producer's buffers are full: retry after the hint.
    #[error("producer overloaded: {what} is full; retry after {retry_after:?}")]
    Overloaded {
        /// Which bound was hit.
        what: &'static str,
        /// When trying again is likely to succeed.
        retry_after: Duration,
    },
    /// No pooled connection could take the batch within `pool_get_timeout`.
    #[error("no pooled connection available within pool_get_timeout ({timeout:?})")]
    PoolTimeout {
        /// The configured `pool_get_timeout`.
        timeout: Duration,
    },
    /// The event's deadline passed before Event Hubs accepted it.
    #[error("deadline exceeded before Event Hubs accepted the event{}", last_error.as_deref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    DeadlineExceeded {
        /// The last retryable error seen, if any.
        last_error: Option<String>,
    },
    /// The event went to Event Hubs with its batch, but no outcome came back before the producer's send timeout
    /// or its last retry (the link or connection was lost with the batch on the wire): it may or may not be
    /// stored, and sending it again may store it twice.
    #[error(
        "outcome unknown: the event was sent to Event Hubs but its outcome never came back, so it may have been stored (last error: {last_error})"
    )]
    OutcomeUnknown {
        /// What ended the last attempt.
        last_error: String,
    },
    /// Event Hubs refused the batch (a rejected disposition or a link/connection error).
    #[error("Event Hubs refused the event: {0}")]
    Service(ServiceError),
    /// Event Hubs released or modified the delivery without processing it.
    #[error("Event Hubs did not process the event (delivery {0})")]
    NotProcessed(&'static str),
    /// No connection to Event Hubs could be opened (it never opened, so nothing was sent over it).
    #[error("could not connect to {host}: {reason}")]
    Unreachable {
        /// `host:port`.
        host: String,
        /// Why the last attempt failed.
        reason: String,
    },
    /// The connection or link was lost before the outcome was known.
    #[error("connection to Event Hubs lost: {0}")]
    Connection(String),
    /// Event Hubs detached a link for want of authorization although its token was accepted: it no longer
    /// honours that token (expired by its clock, or revoked). A token is put again and the batch resent.
    #[error("Event Hubs dropped the link's authorization: {0}")]
    TokenLost(ServiceError),
    /// Authentication with Event Hubs failed.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The producer is closed.
    #[error("the producer is closed")]
    Closed,
}

impl SendError {
    /// A short, stable name of the failure (the AMQP condition for service errors), for `error.type`.
    pub fn error_type(&self) -> String {
        match self {
            Self::Service(error) => error.condition.to_string(),
            Self::InvalidEvent { .. } | Self::OverLimit(_) => "invalid_event".into(),
            Self::TooLarge { .. } => "too_large".into(),
            Self::UnknownPartition { .. } => "unknown_partition".into(),
            Self::Overloaded { .. } => "overloaded".into(),
            Self::PoolTimeout { .. } => "pool_timeout".into(),
            Self::DeadlineExceeded { .. } => "deadline_exceeded".into(),
            Self::OutcomeUnknown { .. } => "outcome_unknown".into(),
            Self::NotProcessed(_) => "not_processed".into(),
            Self::Unreachable { .. } => "connect_failed".into(),
            Self::Connection(_) => "connection_lost".into(),
            Self::TokenLost(_) => "token_lost".into(),
            Self::Auth(_) => "unauthorized".into(),
            Self::Closed => "closed".into(),
        }
    }

    /// What this error means for the caller, whatever caused it (see [`ErrorClass`]).
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::InvalidEvent { .. } | Self::OverLimit(_) | Self::UnknownPartition { .. } => {
                ErrorClass::InvalidEvent
            }
            Self::TooLarge { .. } => ErrorClass::TooLarge,
            Self::Overloaded { .. } => ErrorClass::Overloaded,
            Self::PoolTimeout { .. }
            | Self::NotProcessed(_)
            | Self::Connection(_)
            | Self::Unreachable { .. } => ErrorClass::Unavailable,
            Self::DeadlineExceeded { .. } => ErrorClass::DeadlineExceeded,
            Self::OutcomeUnknown { .. } => ErrorClass::OutcomeUnknown,
            Self::Auth(_) | Self::TokenLost(_) => ErrorClass::Unauthorized,
            Self::Closed => ErrorClass::Closed,
            Self::Service(error) => error.condition.class(),
        }
    }

    /// Whether sending the same batch again, after a pause, can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Service(error) => error.condition.is_retryable(),
            Self::NotProcessed(_)
            | Self::Connection(_)
            | Self::TokenLost(_)
            | Self::Unreachable { .. } => true,
            Self::InvalidEvent { .. }
            | Self::OverLimit(_)
            | Self::TooLarge { .. }
            | Self::UnknownPartition { .. }
            | Self::Overloaded { .. }
            | Self::PoolTimeout { .. }
            | Self::DeadlineExceeded { .. }
            | Self::OutcomeUnknown { .. }
            | Self::Auth(_)
            | Self::Closed => false,
        }
    }

    /// Whether Event Hubs refused a batch for what an event in it holds (an invalid argument or field, or its size),
    /// not for the link or the namespace: sent apart, the batch's other events can succeed.
    pub fn refuses_contents(&self) -> bool {
        match self {
            Self::Service(error) => matches!(
                error.condition,
                AmqpCondition::InvalidArgument | AmqpCondition::MessageSizeExceeded
            ),
            Self::TooLarge { .. } => true,
            _ => false,
        }
    }

    /// The event hub refused with this condition.
    pub fn service(condition: AmqpCondition, description: impl Into<String>) -> Self {
        Self::Service(ServiceError {
            condition,
            description: Some(description.into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::primitives::Symbol;

    #[test]
    fn conditions_round_trip_through_their_names() {
        for name in [
            "amqp:unauthorized-access",
            "amqp:not-found",
            "amqp:link:message-size-exceeded",
            "com.microsoft:server-busy",
            "amqp:resource-limit-exceeded",
            "com.microsoft:timeout",
            "amqp:internal-error",
            "amqp:connection:forced",
            "amqp:link:detach-forced",
            "com.microsoft:argument-error",
            "com.example:whatever",
        ] {
            assert_eq!(AmqpCondition::from_name(name).to_string(), name);
        }
    }

    #[test]
    fn only_transient_conditions_are_retryable() {
        let retryable = |name| AmqpCondition::from_name(name).is_retryable();
        assert!(retryable("com.microsoft:server-busy"));
        assert!(retryable("com.microsoft:timeout"));
        assert!(retryable("amqp:internal-error"));
        assert!(retryable("amqp:connection:forced"));
        assert!(retryable("amqp:link:detach-forced"));
        assert!(!retryable("amqp:unauthorized-access"));
        assert!(!retryable("amqp:not-found"));
        assert!(!retryable("amqp:link:message-size-exceeded"));
        assert!(!retryable("com.microsoft:argument-error"));
    }

    #[test]
    fn fe2o3_conditions_map_to_ours() {
        let custom = ErrorCondition::Custom(Symbol::from("com.microsoft:server-busy"));
        assert_eq!(
            AmqpCondition::from_error_condition(&custom),
            AmqpCondition::ServerBusy
        );
        let size = ErrorCondition::LinkError(LinkError::MessageSizeExceeded);
        assert_eq!(
            AmqpCondition::from_error_condition(&size),
            AmqpCondition::MessageSizeExceeded
        );
    }

    #[test]
    fn lost_connections_are_retried_and_bad_events_are_not() {
        assert!(SendError::Connection("reset".into()).is_retryable());
        assert!(SendError::NotProcessed("released").is_retryable());
        assert!(!SendError::TooLarge { size: 2, limit: 1 }.is_retryable());
        assert!(!SendError::service(AmqpCondition::Unauthorized, "expired").is_retryable());
    }

    #[test]
    fn only_refusals_of_an_events_contents_are_worth_splitting_a_batch_for() {
        assert!(
            SendError::service(AmqpCondition::InvalidArgument, "map too big").refuses_contents()
        );
        assert!(SendError::service(AmqpCondition::MessageSizeExceeded, "big").refuses_contents());
        assert!(!SendError::service(AmqpCondition::Unauthorized, "expired").refuses_contents());
        assert!(!SendError::service(AmqpCondition::NotFound, "no hub").refuses_contents());
        assert!(!SendError::Connection("reset".into()).refuses_contents());
    }
}
