import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from . import cloudevents_pb2 as _cloudevents_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    INVALID_EVENT: _ClassVar[ErrorReason]
    EVENT_TOO_LARGE: _ClassVar[ErrorReason]
    UNKNOWN_EVENT_HUB: _ClassVar[ErrorReason]
    RATE_LIMITED: _ClassVar[ErrorReason]
    OVERLOADED: _ClassVar[ErrorReason]
    EVENT_HUBS_BUSY: _ClassVar[ErrorReason]
    EVENT_HUBS_UNAVAILABLE: _ClassVar[ErrorReason]
    DRAINING: _ClassVar[ErrorReason]
    DEADLINE_EXCEEDED: _ClassVar[ErrorReason]
    EVENT_HUBS_UNAUTHORIZED: _ClassVar[ErrorReason]
    EVENT_HUBS_REJECTED: _ClassVar[ErrorReason]
    REQUEST_TOO_LARGE: _ClassVar[ErrorReason]
    MALFORMED_REQUEST: _ClassVar[ErrorReason]
    OUTCOME_UNKNOWN: _ClassVar[ErrorReason]
    STREAM_IDLE: _ClassVar[ErrorReason]
    UNAUTHENTICATED: _ClassVar[ErrorReason]
    HUB_NOT_ALLOWED: _ClassVar[ErrorReason]
    CONNECTION_AGED: _ClassVar[ErrorReason]
    SCHEMA_VIOLATION: _ClassVar[ErrorReason]
ERROR_REASON_UNSPECIFIED: ErrorReason
INVALID_EVENT: ErrorReason
EVENT_TOO_LARGE: ErrorReason
UNKNOWN_EVENT_HUB: ErrorReason
RATE_LIMITED: ErrorReason
OVERLOADED: ErrorReason
EVENT_HUBS_BUSY: ErrorReason
EVENT_HUBS_UNAVAILABLE: ErrorReason
DRAINING: ErrorReason
DEADLINE_EXCEEDED: ErrorReason
EVENT_HUBS_UNAUTHORIZED: ErrorReason
EVENT_HUBS_REJECTED: ErrorReason
REQUEST_TOO_LARGE: ErrorReason
MALFORMED_REQUEST: ErrorReason
OUTCOME_UNKNOWN: ErrorReason
STREAM_IDLE: ErrorReason
UNAUTHENTICATED: ErrorReason
HUB_NOT_ALLOWED: ErrorReason
CONNECTION_AGED: ErrorReason
SCHEMA_VIOLATION: ErrorReason

class Event(_message.Message):
    __slots__ = ("text", "binary", "json", "cloud_event", "partition_key", "partition_id", "properties", "content_type", "message_id", "correlation_id")
    class PropertiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TEXT_FIELD_NUMBER: _ClassVar[int]
    BINARY_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    CLOUD_EVENT_FIELD_NUMBER: _ClassVar[int]
    PARTITION_KEY_FIELD_NUMBER: _ClassVar[int]
    PARTITION_ID_FIELD_NUMBER: _ClassVar[int]
    PROPERTIES_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    binary: bytes
    json: _struct_pb2.Struct
    cloud_event: _cloudevents_pb2.CloudEvent
    partition_key: str
    partition_id: str
    properties: _containers.ScalarMap[str, str]
    content_type: str
    message_id: str
    correlation_id: str
    def __init__(self, text: _Optional[str] = ..., binary: _Optional[bytes] = ..., json: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., cloud_event: _Optional[_Union[_cloudevents_pb2.CloudEvent, _Mapping]] = ..., partition_key: _Optional[str] = ..., partition_id: _Optional[str] = ..., properties: _Optional[_Mapping[str, str]] = ..., content_type: _Optional[str] = ..., message_id: _Optional[str] = ..., correlation_id: _Optional[str] = ...) -> None: ...

class SendEventRequest(_message.Message):
    __slots__ = ("event_hub", "event")
    EVENT_HUB_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event_hub: str
    event: Event
    def __init__(self, event_hub: _Optional[str] = ..., event: _Optional[_Union[Event, _Mapping]] = ...) -> None: ...

class SendEventResponse(_message.Message):
    __slots__ = ("event_hub", "partition_id")
    EVENT_HUB_FIELD_NUMBER: _ClassVar[int]
    PARTITION_ID_FIELD_NUMBER: _ClassVar[int]
    event_hub: str
    partition_id: str
    def __init__(self, event_hub: _Optional[str] = ..., partition_id: _Optional[str] = ...) -> None: ...

class SendEventsRequest(_message.Message):
    __slots__ = ("event_hub", "events")
    EVENT_HUB_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    event_hub: str
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, event_hub: _Optional[str] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class SendEventsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EventResult]
    def __init__(self, results: _Optional[_Iterable[_Union[EventResult, _Mapping]]] = ...) -> None: ...

class EventResult(_message.Message):
    __slots__ = ("status", "partition_id")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PARTITION_ID_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    partition_id: str
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., partition_id: _Optional[str] = ...) -> None: ...

class SendStreamRequest(_message.Message):
    __slots__ = ("event_hub", "sequence", "event", "events")
    EVENT_HUB_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    event_hub: str
    sequence: int
    event: Event
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, event_hub: _Optional[str] = ..., sequence: _Optional[int] = ..., event: _Optional[_Union[Event, _Mapping]] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class SendStreamResponse(_message.Message):
    __slots__ = ("acks",)
    ACKS_FIELD_NUMBER: _ClassVar[int]
    acks: _containers.RepeatedCompositeFieldContainer[StreamAck]
    def __init__(self, acks: _Optional[_Iterable[_Union[StreamAck, _Mapping]]] = ...) -> None: ...

class StreamAck(_message.Message):
    __slots__ = ("sequence", "status", "partition_id")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PARTITION_ID_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    status: _status_pb2.Status
    partition_id: str
    def __init__(self, sequence: _Optional[int] = ..., status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., partition_id: _Optional[str] = ...) -> None: ...

class GetEventHubPropertiesRequest(_message.Message):
    __slots__ = ("event_hub",)
    EVENT_HUB_FIELD_NUMBER: _ClassVar[int]
    event_hub: str
    def __init__(self, event_hub: _Optional[str] = ...) -> None: ...

class EventHubProperties(_message.Message):
    __slots__ = ("name", "partition_ids", "created_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARTITION_IDS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    partition_ids: _containers.RepeatedScalarFieldContainer[str]
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., partition_ids: _Optional[_Iterable[str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
