"""What a caller hands in (`Event`: str, bytes or dict data with routing and AMQP fields) and gets back
(`Receipt`, `Result`), and how an event becomes the gateway's protobuf `Event`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

from ._proto import gateway_pb2
from .errors import GatewayError

Data = Union[str, bytes, bytearray, memoryview, dict[str, Any]]
JSON_CONTENT_TYPE = "application/json"


@dataclass(frozen=True)
class Event:
    """One event for `send_events`: the same arguments as `send_event` takes."""

    data: Data
    partition_key: Optional[str] = None
    partition_id: Optional[str] = None
    properties: Optional[Mapping[str, str]] = None
    content_type: Optional[str] = None
    message_id: Optional[str] = None
    correlation_id: Optional[str] = None


@dataclass(frozen=True)
class Receipt:
    """Event Hubs accepted the event: the hub and partition it went to (partition empty when Event Hubs chose
    it), the message id it carried and how many times it was sent."""

    event_hub: str
    partition_id: str
    message_id: str
    attempts: int


@dataclass(frozen=True)
class Result:
    """One outcome of `send_events`: a receipt, or the error that event failed with."""

    receipt: Optional[Receipt] = None
    error: Optional[GatewayError] = field(default=None)

    @property
    def ok(self) -> bool:
        """Whether Event Hubs accepted the event."""
        return self.error is None


def encode(
    data: Data,
    partition_key: Optional[str],
    partition_id: Optional[str],
    properties: Optional[Mapping[str, str]],
    content_type: Optional[str],
    message_id: str,
    correlation_id: Optional[str],
) -> gateway_pb2.Event:
    """The protobuf event, or ValueError/TypeError naming the argument that cannot be sent.

    A dict becomes its exact `json.dumps` bytes with content type `application/json` (never a protobuf
    Struct, whose numbers are doubles)."""
    if partition_key and partition_id:
        raise ValueError("partition_key and partition_id are mutually exclusive: give one or neither")
    event = gateway_pb2.Event()
    if isinstance(data, str):
        event.text = data
    elif isinstance(data, bytes):
        event.binary = data
    elif isinstance(data, (bytearray, memoryview)):
        event.binary = bytes(data)
    elif isinstance(data, dict):
        event.binary = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
        if content_type is None:
            content_type = JSON_CONTENT_TYPE
    else:
        raise TypeError(f"data must be str, bytes or dict, not {type(data).__name__}")
    if partition_key:
        if not isinstance(partition_key, str):
            raise TypeError(f"partition_key must be a str, not {type(partition_key).__name__}")
        event.partition_key = partition_key
    if partition_id:
        if not isinstance(partition_id, str):
            raise TypeError(f"partition_id must be a str, not {type(partition_id).__name__}")
        event.partition_id = partition_id
    if properties:
        for name, value in properties.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError(f"properties must map str to str; {name!r}: {type(value).__name__}")
        event.properties.update(properties)
    if content_type:
        event.content_type = content_type
    event.message_id = message_id
    if correlation_id:
        event.correlation_id = correlation_id
    return event
