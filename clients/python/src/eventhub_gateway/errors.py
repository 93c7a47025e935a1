"""The gateway's error model as exceptions: one class per `ErrorReason`, under `GatewayError`."""

from __future__ import annotations

import re
from typing import Any, Optional

import grpc
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "eventhub-gateway"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
# What a gateway status may quote back; longer texts (a client's own hub name, say) are cut to keep the
# exception small.
_MAX_MESSAGE_CHARS = 1024


class GatewayError(Exception):
    """A failure of one event or call, as the gateway (or the gRPC library) reported it.

    `code` is the gRPC status code, `reason` the gateway's `ErrorInfo.reason` (None when the status came from
    the gRPC library), `retryable` whether sending the same event again may succeed, `retry_after` the
    gateway's `RetryInfo` delay in seconds (or None), `metadata` the `ErrorInfo` metadata and `fields` the
    `BadRequest` field paths with their descriptions."""

    retryable = False

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        reason: Optional[str] = None,
        retry_after: Optional[float] = None,
        metadata: Optional[dict[str, str]] = None,
        fields: Optional[list[tuple[str, str]]] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.retry_after = retry_after
        self.metadata = dict(metadata or {})
        self.fields = list(fields or [])

    @property
    def field(self) -> Optional[str]:
        """The first field `BadRequest` names (e.g. `event.partition_id`), if any."""
        return self.fields[0][0] if self.fields else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code.name}, reason={self.reason!r})"


class RateLimited(GatewayError):
    """RESOURCE_EXHAUSTED / RATE_LIMITED: the client or the whole gateway is over its events-per-second limit."""

    retryable = True


class Overloaded(GatewayError):
    """RESOURCE_EXHAUSTED / OVERLOADED: the gateway's buffers or concurrency limits are full; or this client's
    own in-flight window stayed full for `pool_get_timeout` (reason None)."""

    retryable = True


class EventHubsBusy(GatewayError):
    """UNAVAILABLE / EVENT_HUBS_BUSY: Event Hubs is throttling and the gateway's retries ran out."""

    retryable = True


class EventHubsUnavailable(GatewayError):
    """UNAVAILABLE / EVENT_HUBS_UNAVAILABLE: Event Hubs is unreachable from the gateway, after its retries."""

    retryable = True


class Draining(GatewayError):
    """UNAVAILABLE / DRAINING: the gateway is shutting down; the client moves to a new connection."""

    retryable = True


class GatewayUnavailable(GatewayError):
    """UNAVAILABLE without the gateway's ErrorInfo: no connection to the gateway, or it broke."""

    retryable = True


class OutcomeUnknown(GatewayError):
    """UNKNOWN / OUTCOME_UNKNOWN: the event reached Event Hubs but no outcome came back; it may be published.
    Retried (at least once): consumers spot a duplicate by its `message_id`."""

    retryable = True


class InvalidEvent(GatewayError):
    """INVALID_ARGUMENT / INVALID_EVENT: the event breaks a rule or limit; `field` names it."""


class SchemaViolation(InvalidEvent):
    """INVALID_ARGUMENT / SCHEMA_VIOLATION: the event's JSON body does not match its hub's JSON Schema (or is not
    JSON although its content type says so). `fields` holds up to five violations, each `<event>.body` followed
    by the JSON Pointer of the instance location (`event.body/items/0/price`) and what is wrong;
    `metadata['violations']` counts them (`100+` beyond a hundred)."""


class EventTooLarge(GatewayError):
    """INVALID_ARGUMENT / EVENT_TOO_LARGE: the encoded event cannot fit in one Event Hubs message (or in one
    message to the gateway, `max_batch_bytes`)."""


class UnknownEventHub(GatewayError):
    """NOT_FOUND / UNKNOWN_EVENT_HUB: the gateway does not publish to this Event Hub."""


class PermissionDenied(GatewayError):
    """PERMISSION_DENIED: this client may not publish to the hub (HUB_NOT_ALLOWED), or Event Hubs refused the
    gateway's own credentials (EVENT_HUBS_UNAUTHORIZED)."""


class Unauthenticated(GatewayError):
    """UNAUTHENTICATED: the gateway requires credentials and this call had none, or they were refused."""


class DeadlineExceeded(GatewayError):
    """DEADLINE_EXCEEDED: the event's deadline passed. `published` is False when the event never left this
    client or the gateway said it was not sent (and no earlier attempt's outcome is unknown), None when it was
    on its way, or an earlier attempt was, and it may have been published."""

    def __init__(self, message: str, *, published: Optional[bool] = None, **kwargs: Any) -> None:
        kwargs.setdefault("code", grpc.StatusCode.DEADLINE_EXCEEDED)
        super().__init__(message, **kwargs)
        self.published = published


class EventHubsRejected(GatewayError):
    """INTERNAL / EVENT_HUBS_REJECTED: Event Hubs rejected the event for another reason (`metadata['condition']`)."""


class RequestTooLarge(GatewayError):
    """OUT_OF_RANGE / REQUEST_TOO_LARGE: a message to the gateway was over its size limit."""


class MalformedRequest(GatewayError):
    """INVALID_ARGUMENT / MALFORMED_REQUEST: the gateway could not read a message (a bug of this client)."""


class ProducerClosed(GatewayError):
    """The producer was closed before this event could be sent; it was not published."""


_BY_REASON: dict[str, type[GatewayError]] = {
    "RATE_LIMITED": RateLimited,
    "OVERLOADED": Overloaded,
    "EVENT_HUBS_BUSY": EventHubsBusy,
    "EVENT_HUBS_UNAVAILABLE": EventHubsUnavailable,
    "DRAINING": Draining,
    "OUTCOME_UNKNOWN": OutcomeUnknown,
    "INVALID_EVENT": InvalidEvent,
    "SCHEMA_VIOLATION": SchemaViolation,
    "EVENT_TOO_LARGE": EventTooLarge,
    "UNKNOWN_EVENT_HUB": UnknownEventHub,
    "HUB_NOT_ALLOWED": PermissionDenied,
    "EVENT_HUBS_UNAUTHORIZED": PermissionDenied,
    "UNAUTHENTICATED": Unauthenticated,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "EVENT_HUBS_REJECTED": EventHubsRejected,
    "REQUEST_TOO_LARGE": RequestTooLarge,
    "MALFORMED_REQUEST": MalformedRequest,
    # A stream's own endings, which the producer answers by opening a new stream.
    "STREAM_IDLE": GatewayUnavailable,
    "CONNECTION_AGED": GatewayUnavailable,
}

_BY_CODE: dict[grpc.StatusCode, type[GatewayError]] = {
    grpc.StatusCode.UNAVAILABLE: GatewayUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
}

_CODES = {code.value[0]: code for code in grpc.StatusCode}


def from_status(status: status_pb2.Status) -> GatewayError:
    """The exception for a `google.rpc.Status` of the gateway (a stream ack's, or a call's decoded details)."""
    code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    reason = None
    metadata: dict[str, str] = {}
    fields: list[tuple[str, str]] = []
    retry_after = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == DOMAIN:
                reason = info.reason
                metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [(violation.field, violation.description) for violation in bad.field_violations]
    kind = _BY_REASON.get(reason) if reason else None
    if kind is None:
        kind = _BY_CODE.get(code, GatewayError)
    message = status.message[:_MAX_MESSAGE_CHARS]
    if kind is DeadlineExceeded:
        # The gateway's DEADLINE_EXCEEDED says the event was never sent to Event Hubs (an event on the wire at
        # its deadline is OUTCOME_UNKNOWN instead). The one exception, a stream's own deadline, never applies:
        # this client sets none. Without the gateway's reason (gRPC's own timer) nobody knows.
        published = False if reason == "DEADLINE_EXCEEDED" else None
        return DeadlineExceeded(message, published=published, code=code, reason=reason, retry_after=retry_after,
                                metadata=metadata, fields=fields)
    return kind(message, code=code, reason=reason, retry_after=retry_after, metadata=metadata, fields=fields)


_MESSAGE_INDEX = re.compile(r"^events\[\d+\]")


def for_one_event(error: GatewayError) -> GatewayError:
    """`error` as about one event: the gateway names a stream event `events[i]` within its message, which this
    client made up; the caller sent one `event`."""
    error.fields = [(_MESSAGE_INDEX.sub("event", path), text) for path, text in error.fields]
    if _MESSAGE_INDEX.match(error.message):
        error.message = _MESSAGE_INDEX.sub("event", error.message, count=1)
        error.args = (error.message,)
    return error


def from_rpc_error(error: grpc.RpcError) -> GatewayError:
    """The exception for a failed call (see `from_call`)."""
    return from_call(error.code(), error.details(), error.trailing_metadata())


def from_call(code: grpc.StatusCode, details: Optional[str], trailers: Any) -> GatewayError:
    """The exception for a call that ended with `code`: the gateway's rich status from `grpc-status-details-bin`
    when present, else one made of the code and details."""
    for key, value in trailers or ():
        if key == STATUS_DETAILS_KEY:
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except Exception:  # noqa: BLE001 - an unreadable detail falls back to the plain status
                break
            return from_status(status)
    return from_status(status_pb2.Status(code=code.value[0], message=details or ""))
