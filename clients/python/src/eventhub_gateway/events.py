"""What a caller hands in (`Event`: str, bytes, dict or CloudEvent data with routing and AMQP fields) and gets
back (`Receipt`, `Result`), and how an event becomes the gateway's protobuf `Event`."""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

from ._proto import cloudevents_pb2, gateway_pb2
from .errors import GatewayError

# A CloudEvent of the `cloudevents` package (any object with `get_attributes()` and `get_data()`) is data too.
Data = Union[str, bytes, bytearray, memoryview, dict[str, Any], Any]
JSON_CONTENT_TYPE = "application/json"
_REQUIRED = {"id": "id", "source": "source", "specversion": "spec_version", "type": "type"}
_INT32 = range(-(2**31), 2**31)


def _is_cloud_event(data: Any) -> bool:
    return callable(getattr(data, "get_attributes", None)) and callable(getattr(data, "get_data", None))


def _cloud_event(data: Any) -> cloudevents_pb2.CloudEvent:
    """The protobuf CloudEvent of a `cloudevents` SDK event: the required attributes as fields, the others
    typed by their Python type, a dict as its JSON text (`application/json` unless the event names a type)."""
    attributes = dict(data.get_attributes())
    event = cloudevents_pb2.CloudEvent()
    for name, field_name in _REQUIRED.items():
        value = attributes.pop(name, "")
        setattr(event, field_name, value if isinstance(value, str) else str(value))
    for name, value in attributes.items():
        if value is None:
            continue
        slot = event.attributes[name]
        if isinstance(value, bool):
            slot.ce_boolean = value
        elif isinstance(value, int):
            if value not in _INT32:
                raise ValueError(f"CloudEvent attribute {name!r}: {value} is outside CloudEvents' 32-bit Integer")
            slot.ce_integer = value
        elif isinstance(value, (bytes, bytearray)):
            slot.ce_bytes = bytes(value)
        elif isinstance(value, datetime.datetime):
            if value.tzinfo is None:
                raise ValueError(f"CloudEvent attribute {name!r}: a datetime needs a time zone")
            slot.ce_timestamp.FromDatetime(value.astimezone(datetime.timezone.utc))
        elif name == "dataschema":
            slot.ce_uri = str(value)
        else:
            slot.ce_string = str(value)
    payload = data.get_data()
    if payload is None:
        pass
    elif isinstance(payload, (bytes, bytearray, memoryview)):
        event.binary_data = bytes(payload)
    elif isinstance(payload, str):
        event.text_data = payload
    else:
        event.text_data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        if "datacontenttype" not in attributes:
            event.attributes["datacontenttype"].ce_string = JSON_CONTENT_TYPE
    return event


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
    Struct, whose numbers are doubles). A CloudEvent (the `cloudevents` package's) becomes `Event.cloud_event`:
    binary content mode, or structured with `content_type="application/cloudevents+json"`."""
    if partition_key and partition_id:
        raise ValueError("partition_key and partition_id are mutually exclusive: give one or neither")
    event = gateway_pb2.Event()
    if _is_cloud_event(data):
        event.cloud_event.CopyFrom(_cloud_event(data))
    elif isinstance(data, str):
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
        raise TypeError(f"data must be str, bytes, dict or a CloudEvent, not {type(data).__name__}")
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
