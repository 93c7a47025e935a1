"""An asyncio (and threaded) Python client for eventhub-gateway: `send_event` as the pooled
`ManagedAzureEventhubProducer` had it, every concurrent call batched over one gRPC stream."""

from .errors import (
    DeadlineExceeded,
    Draining,
    EventHubsBusy,
    EventHubsRejected,
    EventHubsUnavailable,
    EventTooLarge,
    GatewayError,
    GatewayUnavailable,
    InvalidEvent,
    MalformedRequest,
    OutcomeUnknown,
    Overloaded,
    PermissionDenied,
    ProducerClosed,
    RateLimited,
    RequestTooLarge,
    SchemaViolation,
    Unauthenticated,
    UnknownEventHub,
)
from .events import Event, Receipt, Result
from .producer import GatewayProducer, GatewayProducerSync

__all__ = [
    "DeadlineExceeded",
    "Draining",
    "Event",
    "EventHubsBusy",
    "EventHubsRejected",
    "EventHubsUnavailable",
    "EventTooLarge",
    "GatewayError",
    "GatewayProducer",
    "GatewayProducerSync",
    "GatewayUnavailable",
    "InvalidEvent",
    "MalformedRequest",
    "OutcomeUnknown",
    "Overloaded",
    "PermissionDenied",
    "ProducerClosed",
    "RateLimited",
    "Receipt",
    "RequestTooLarge",
    "Result",
    "SchemaViolation",
    "Unauthenticated",
    "UnknownEventHub",
]
