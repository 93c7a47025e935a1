"""CloudEvents through the gateway (`Event.cloud_event`): published over gRPC in binary and structured content
mode, read back with the official azure-eventhub consumer, and decoded with the CloudEvents Python SDK's own
AMQP binding reader (`cloudevents.core.bindings.amqp`, cloudevents 2.x), so a CloudEvents consumer reads them
unchanged. Every refusal names its field."""

import datetime
import json
import uuid

import grpc
import pytest
from cloudevents.core.bindings import amqp
from google.protobuf import any_pb2, timestamp_pb2

from gateway_client import (
    CALL_TIMEOUT,
    body,
    check_error,
    expect_error,
    partition_positions,
    properties,
    read_since,
    result_status,
)

Code = grpc.StatusCode
HUB = "eh2"


@pytest.fixture(scope="module")
def ce(api):
    """The generated `io.cloudevents.v1` module (beside the gateway's stubs, which import it)."""
    from io_cloudevents.v1 import cloudevents_pb2

    return cloudevents_pb2


def cloud_event(ce, **fields):
    """A valid CloudEvent with a unique id, `fields` on top (`attributes` as {name: value message kwargs})."""
    attributes = fields.pop("attributes", {})
    event = ce.CloudEvent(
        id=fields.pop("id", uuid.uuid4().hex),
        source=fields.pop("source", "/tests/cloudevents"),
        spec_version=fields.pop("spec_version", "1.0"),
        type=fields.pop("type", "dev.eventhubgateway.test"),
        **fields,
    )
    for name, value in attributes.items():
        event.attributes[name].CopyFrom(ce.CloudEvent.CloudEventAttributeValue(**value))
    return event


def decode(stored):
    """The CloudEvent a CloudEvents consumer reads from a stored EventData, with the SDK's AMQP binding."""
    message = amqp.AMQPMessage(
        properties={"content-type": stored.content_type} if stored.content_type else {},
        application_properties=properties(stored),
        application_data=body(stored),
    )
    return amqp.from_amqp_event(message)


def send_and_read(api, gateway, events):
    """Sends `events` (pb.Event) with SendEvents, all accepted; returns them as stored, in order."""
    before = partition_positions(gateway.connection_string, HUB)
    # One partition, so the stored order is the sent order.
    for event in events:
        event.partition_id = event.partition_id or "1"
    response = gateway.stub.SendEvents(
        api.pb.SendEventsRequest(event_hub=HUB, events=events), timeout=CALL_TIMEOUT
    )
    for index, result in enumerate(response.results):
        assert result.status.code == 0, (index, result_status(api, result.status))
    stored = read_since(gateway.connection_string, HUB, before)
    return [event for partition in sorted(stored) for event in stored[partition]]


def test_binary_mode_round_trips_text_json_and_binary_data_with_extensions(api, ce, gateway):
    when = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=250_000_000)
    text = cloud_event(
        ce,
        text_data="plain words",
        attributes={
            "datacontenttype": {"ce_string": "text/plain"},
            "subject": {"ce_string": "greeting"},
            "time": {"ce_timestamp": when},
            "flag": {"ce_boolean": True},
            "count": {"ce_integer": -42},
            "blob": {"ce_bytes": b"\x00\xff"},
            "home": {"ce_uri": "https://example.com/x"},
            "ref": {"ce_uri_ref": "/relative/ref"},
        },
    )
    as_json = cloud_event(
        ce,
        text_data=json.dumps({"temperature": 21.5, "unit": "C"}),
        attributes={
            "datacontenttype": {"ce_string": "application/json"},
            "dataschema": {"ce_uri": "https://example.com/reading.json"},
        },
    )
    raw = cloud_event(
        ce,
        binary_data=b"\xff\x00\x01binary",
        attributes={"datacontenttype": {"ce_string": "application/octet-stream"}},
    )
    packed = any_pb2.Any(type_url="type.googleapis.com/google.protobuf.Timestamp", value=when.SerializeToString())
    proto = cloud_event(ce, proto_data=packed)
    pb = api.pb
    events = [
        pb.Event(cloud_event=text, properties={"colour": "blue"}, message_id="m-1", correlation_id="c-1"),
        pb.Event(cloud_event=as_json),
        pb.Event(cloud_event=raw),
        pb.Event(cloud_event=proto),
    ]
    stored = send_and_read(api, gateway, events)
    assert len(stored) == 4

    first = stored[0]
    names = set(properties(first))
    # Binary mode: every attribute but datacontenttype is a cloudEvents_ application property.
    assert names == {
        "colour", "cloudEvents_id", "cloudEvents_source", "cloudEvents_specversion", "cloudEvents_type",
        "cloudEvents_subject", "cloudEvents_time", "cloudEvents_flag", "cloudEvents_count", "cloudEvents_blob",
        "cloudEvents_home", "cloudEvents_ref",
    }, names
    assert first.content_type == "text/plain"
    assert first.message_id == "m-1" and first.correlation_id == "c-1"
    decoded = decode(first)
    assert decoded.get_id() == text.id
    assert decoded.get_source() == "/tests/cloudevents"
    assert decoded.get_type() == "dev.eventhubgateway.test"
    assert decoded.get_specversion() == "1.0"
    assert decoded.get_subject() == "greeting"
    assert decoded.get_datacontenttype() == "text/plain"
    assert decoded.get_time() == datetime.datetime(2023, 11, 14, 22, 13, 20, 250_000, tzinfo=datetime.timezone.utc)
    assert decoded.get_data() == "plain words"
    # Extensions travel in their canonical string form (the binding allows it; see docs/cloudevents.md).
    extensions = decoded.get_extension
    assert (extensions("flag"), extensions("count"), extensions("blob")) == ("true", "-42", "AP8=")
    assert extensions("home") == "https://example.com/x" and extensions("ref") == "/relative/ref"
    assert extensions("colour") is None, "the Event's own properties are not CloudEvent attributes"

    decoded = decode(stored[1])
    assert decoded.get_data() == {"temperature": 21.5, "unit": "C"}
    assert decoded.get_dataschema() == "https://example.com/reading.json"
    assert stored[1].content_type == "application/json"

    decoded = decode(stored[2])
    assert decoded.get_data() == b"\xff\x00\x01binary"
    assert decoded.get_datacontenttype() == "application/octet-stream"

    decoded = decode(stored[3])
    assert decoded.get_datacontenttype() == "application/protobuf"
    assert decoded.get_dataschema() == "type.googleapis.com/google.protobuf.Timestamp"
    assert body(stored[3]) == when.SerializeToString()


def test_structured_mode_writes_the_json_event_format(api, ce, gateway):
    when = timestamp_pb2.Timestamp(seconds=1_700_000_000)
    as_json = cloud_event(
        ce,
        text_data='{"big": 12345678901234567890, "list": [1, 2]}',
        attributes={
            "datacontenttype": {"ce_string": "application/json"},
            "time": {"ce_timestamp": when},
            "count": {"ce_integer": 7},
            "flag": {"ce_boolean": False},
        },
    )
    raw = cloud_event(ce, binary_data=b"\x00\x01\x02")
    words = cloud_event(ce, text_data="just text", attributes={"datacontenttype": {"ce_string": "text/plain"}})
    structured = "application/cloudevents+json; charset=utf-8"
    pb = api.pb
    stored = send_and_read(api, gateway, [
        pb.Event(cloud_event=as_json, content_type=structured, properties={"colour": "red"}),
        pb.Event(cloud_event=raw, content_type="application/cloudevents+json"),
        pb.Event(cloud_event=words, content_type=structured),
    ])
    first = stored[0]
    assert first.content_type == structured
    assert properties(first) == {"colour": "red"}, "no cloudEvents_ properties in structured mode"
    document = json.loads(body(first))
    # JSON data is embedded as written: the big integer keeps every digit.
    assert '"data":{"big": 12345678901234567890, "list": [1, 2]}' in body(first).decode()
    assert document["count"] == 7 and document["flag"] is False
    assert document["time"] == "2023-11-14T22:13:20Z"
    decoded = decode(first)
    assert decoded.get_id() == as_json.id
    assert decoded.get_data() == {"big": 12345678901234567890, "list": [1, 2]}
    assert decoded.get_extension("count") == 7, "typed in the JSON format"
    assert decoded.get_time() == datetime.datetime(2023, 11, 14, 22, 13, 20, tzinfo=datetime.timezone.utc)

    assert json.loads(body(stored[1]))["data_base64"] == "AAEC"
    assert decode(stored[1]).get_data() == b"\x00\x01\x02"
    assert decode(stored[2]).get_data() == "just text"


def test_the_partitionkey_extension_routes_when_the_event_does_not(api, ce, gateway):
    pb = api.pb
    keyed = cloud_event(ce, text_data="k", attributes={"partitionkey": {"ce_string": "device-7"}})
    before = partition_positions(gateway.connection_string, HUB)
    gateway.stub.SendEvent(pb.SendEventRequest(event_hub=HUB, event=pb.Event(cloud_event=keyed)),
                           timeout=CALL_TIMEOUT)
    own = cloud_event(ce, text_data="o", attributes={"partitionkey": {"ce_string": "device-7"}})
    gateway.stub.SendEvent(
        pb.SendEventRequest(event_hub=HUB, event=pb.Event(cloud_event=own, partition_key="own-key")),
        timeout=CALL_TIMEOUT,
    )
    stored = [event for events in read_since(gateway.connection_string, HUB, before).values() for event in events]
    keys = {decode(event).get_id(): event.partition_key for event in stored}
    key_of = {k.decode() if isinstance(k, bytes) else k for k in keys.values()}
    assert key_of == {"device-7", "own-key"}, keys
    by_id = {i: (k.decode() if isinstance(k, bytes) else k) for i, k in keys.items()}
    assert by_id == {keyed.id: "device-7", own.id: "own-key"}


# name: (the Event's fields, the field named, words of the description)
REFUSALS = {
    "no id": (lambda ce: {"cloud_event": cloud_event(ce, id="")}, "event.cloud_event.id", "must not be empty"),
    "no source": (
        lambda ce: {"cloud_event": cloud_event(ce, source="")}, "event.cloud_event.source", "must not be empty"
    ),
    "a source that is no URI-reference": (
        lambda ce: {"cloud_event": cloud_event(ce, source="not a uri")}, "event.cloud_event.source",
        "URI-reference",
    ),
    "no spec_version": (
        lambda ce: {"cloud_event": cloud_event(ce, spec_version="")}, "event.cloud_event.spec_version", '"1.0"'
    ),
    "spec_version 0.3": (
        lambda ce: {"cloud_event": cloud_event(ce, spec_version="0.3")}, "event.cloud_event.spec_version",
        '"0.3"',
    ),
    "no type": (lambda ce: {"cloud_event": cloud_event(ce, type="")}, "event.cloud_event.type", "must not be empty"),
    "an upper-case extension name": (
        lambda ce: {"cloud_event": cloud_event(ce, attributes={"Flag": {"ce_boolean": True}})},
        "event.cloud_event.attributes", "lowercase",
    ),
    "time as a string": (
        lambda ce: {"cloud_event": cloud_event(ce, attributes={"time": {"ce_string": "2024-01-01T00:00:00Z"}})},
        "event.cloud_event.attributes", "ce_timestamp",
    ),
    "a relative dataschema": (
        lambda ce: {"cloud_event": cloud_event(ce, attributes={"dataschema": {"ce_uri": "schemas/x"}})},
        "event.cloud_event.attributes", "absolute URI",
    ),
    "JSON data that is not JSON, structured": (
        lambda ce: {
            "cloud_event": cloud_event(
                ce, text_data="{oops", attributes={"datacontenttype": {"ce_string": "application/json"}}
            ),
            "content_type": "application/cloudevents+json",
        },
        "event.cloud_event.text_data", "not JSON",
    ),
    "another content type": (
        lambda ce: {"cloud_event": cloud_event(ce), "content_type": "application/json"}, "event.content_type",
        "datacontenttype",
    ),
    "a property posing as an attribute": (
        lambda ce: {"cloud_event": cloud_event(ce), "properties": {"cloudEvents_subject": "x"}},
        "event.properties", "cloudEvents_subject",
    ),
    "too many attributes": (
        lambda ce: {"cloud_event": cloud_event(ce, attributes={f"x{n}": {"ce_boolean": True} for n in range(1025)})},
        "event.cloud_event.attributes", "max_properties",
    ),
    "an attribute too large": (
        lambda ce: {"cloud_event": cloud_event(ce, attributes={"big": {"ce_string": "v" * 40_000}})},
        "event.cloud_event.attributes", "max_property_bytes",
    ),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_each_refusal_names_its_field(api, ce, gateway, name):
    fields, field, words = REFUSALS[name]
    request = api.pb.SendEventRequest(event_hub=HUB, event=api.pb.Event(**fields(ce)))
    rich = expect_error(api, lambda: gateway.stub.SendEvent(request, timeout=CALL_TIMEOUT),
                        Code.INVALID_ARGUMENT, "INVALID_EVENT")
    assert rich.fields == [field], rich
    description = rich.bad_request.field_violations[0].description
    assert words in description, description


def test_attributes_and_properties_count_together_against_the_limits(api, ce, gateway):
    # 600 attributes and 600 properties: each within 1024 alone, over it together.
    event = api.pb.Event(
        cloud_event=cloud_event(ce, attributes={f"a{n}": {"ce_boolean": True} for n in range(600)}),
        properties={f"p{n}": "" for n in range(600)},
    )
    rich = expect_error(
        api,
        lambda: gateway.stub.SendEvent(api.pb.SendEventRequest(event_hub=HUB, event=event), timeout=CALL_TIMEOUT),
        Code.INVALID_ARGUMENT, "INVALID_EVENT",
    )
    assert rich.fields == ["event.properties"], rich
    assert rich.error_info.metadata["rule"] == "max_properties"


def test_a_bad_cloud_event_fails_alone_in_a_batch(api, ce, gateway):
    pb = api.pb
    good = cloud_event(ce, text_data="fine")
    response = gateway.stub.SendEvents(
        pb.SendEventsRequest(
            event_hub=HUB,
            events=[pb.Event(cloud_event=good), pb.Event(cloud_event=cloud_event(ce, source=""))],
        ),
        timeout=CALL_TIMEOUT,
    )
    assert response.results[0].status.code == 0
    rich = check_error(result_status(api, response.results[1].status), Code.INVALID_ARGUMENT, "INVALID_EVENT")
    assert rich.fields == ["events[1].cloud_event.source"], rich


def test_the_python_client_sends_a_cloudevents_sdk_event(gateway):
    """`eventhub_gateway` takes the SDK's CloudEvent as data: binary mode, or structured on request."""
    from cloudevents.core.v1.event import CloudEvent
    from eventhub_gateway import GatewayProducerSync

    when = datetime.datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=datetime.timezone.utc)
    attributes = {"type": "dev.example.client", "source": "/client", "time": when, "count": 3, "flag": True}
    as_json = CloudEvent(attributes={**attributes, "id": uuid.uuid4().hex}, data={"n": 1, "big": 2**60})
    raw = CloudEvent(attributes={**attributes, "id": uuid.uuid4().hex, "datacontenttype": "application/octet-stream"},
                     data=b"\x00\xff")
    structured = CloudEvent(attributes={**attributes, "id": uuid.uuid4().hex}, data="words")
    before = partition_positions(gateway.connection_string, HUB)
    with GatewayProducerSync(gateway.address, HUB) as producer:
        producer.send_event(as_json, partition_id="0")
        producer.send_event(raw, partition_id="0")
        producer.send_event(structured, partition_id="0", content_type="application/cloudevents+json")
    stored = read_since(gateway.connection_string, HUB, before)["0"]
    decoded = {event.get_id(): event for event in map(decode, stored)}
    assert set(decoded) == {as_json.get_id(), raw.get_id(), structured.get_id()}
    first = decoded[as_json.get_id()]
    assert first.get_data() == {"n": 1, "big": 2**60}
    assert first.get_datacontenttype() == "application/json"
    assert first.get_time() == when
    assert first.get_extension("count") == "3", "binary mode: the canonical string form"
    assert decoded[raw.get_id()].get_data() == b"\x00\xff"
    last = decoded[structured.get_id()]
    assert last.get_data() == "words"
    assert last.get_extension("count") == 3 and last.get_extension("flag") is True
    assert last.get_time() == when
