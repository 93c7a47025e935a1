"""The gRPC gateway end to end: real `serve` processes on loopback, called with stubs generated from the proto by
stock grpcio-tools, and every stored event read back with the official `azure-eventhub` consumer."""

import collections
import json
import pathlib
import queue
import re
import signal
import subprocess
import time
import uuid

import grpc
import pytest
from azure.eventhub import EventData

from conftest import producer, wait_for
from gateway_client import (
    CALL_TIMEOUT,
    HeldStream,
    body,
    call_status,
    check_error,
    check_stream_ending,
    collect_acks,
    describe,
    expect_error,
    json_struct,
    partition_positions,
    properties,
    raw_send_stream,
    read_since,
    result_status,
    sample,
    scrape,
    stream_requests,
)

Code = grpc.StatusCode
VECTORS = json.loads((pathlib.Path(__file__).parents[1] / "data" / "partition-key-vectors.json").read_text())
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
TRACE_PROPERTIES = ("Diagnostic-Id", "traceparent", "tracestate")


def run_id():
    """A token unique to one test run, put in bodies so a test recognises its own events."""
    return uuid.uuid4().hex[:12]


def stored_count(connection_string, hub):
    return sum(last + 1 for last in partition_positions(connection_string, hub).values())


# ------------------------------------------------------------------------------------------------------------
# GetEventHubProperties
# ------------------------------------------------------------------------------------------------------------


def test_get_event_hub_properties_matches_what_the_official_sdk_reads(api, gateway):
    default = gateway.stub.GetEventHubProperties(api.pb.GetEventHubPropertiesRequest(), timeout=CALL_TIMEOUT)
    assert default.name == "eh1", "an empty event_hub is the first configured hub"
    assert list(default.partition_ids) == ["0", "1", "2", "3"]
    for hub in ("eh1", "eh2"):
        ours = gateway.stub.GetEventHubProperties(
            api.pb.GetEventHubPropertiesRequest(event_hub=hub), timeout=CALL_TIMEOUT
        )
        with producer(gateway.connection_string, hub) as client:
            official = client.get_eventhub_properties()
        assert ours.name == official["eventhub_name"] == hub
        assert list(ours.partition_ids) == list(official["partition_ids"])
        assert ours.HasField("created_at")
        created = ours.created_at.seconds + ours.created_at.nanos / 1e9
        assert abs(created - official["created_at"].timestamp()) < 1.0, (ours.created_at, official["created_at"])
    rich = expect_error(
        api,
        lambda: gateway.stub.GetEventHubProperties(
            api.pb.GetEventHubPropertiesRequest(event_hub="nope"), timeout=CALL_TIMEOUT
        ),
        Code.NOT_FOUND,
        "UNKNOWN_EVENT_HUB",
    )
    assert rich.error_info.metadata["event_hub"] == "nope"


# ------------------------------------------------------------------------------------------------------------
# SendEvent: bodies, properties, routing, trace context
# ------------------------------------------------------------------------------------------------------------

JSON_VALUE = {
    "n": 3,
    "neg": -7,
    "big": 2**53,
    "x": 0.5,
    "s": 'é "quoted" ✓',
    "list": [True, False, None, 1.25, "a"],
    "nested": {"a": {"b": [], "c": {}}},
}


def body_cases(pb):
    """(name, Event, expected stored bytes or None for JSON, expected content type)."""
    text = "héllo, wörld ✓ 世界 🎉\n"
    binary = bytes(range(256)) * 4
    return [
        ("text", pb.Event(text=text), text.encode(), None),
        ("text-typed", pb.Event(text=text, content_type="text/plain; charset=utf-8"), text.encode(),
         "text/plain; charset=utf-8"),
        ("binary", pb.Event(binary=binary), binary, None),
        ("binary-typed", pb.Event(binary=binary, content_type="application/avro"), binary, "application/avro"),
        ("json", pb.Event(json=json_struct(JSON_VALUE)), None, "application/json"),
        ("json-typed", pb.Event(json=json_struct(JSON_VALUE), content_type="application/vnd.example+json"), None,
         "application/vnd.example+json"),
    ]


def check_compact_json(raw):
    """The gateway's JSON: parses to JSON_VALUE, compact (no insignificant whitespace), integral numbers
    without a fraction."""
    parsed = json.loads(raw)
    assert parsed == JSON_VALUE, raw
    assert raw.decode() == json.dumps(parsed, separators=(",", ":"), ensure_ascii=False), f"not compact: {raw}"
    for name in ("n", "neg", "big"):
        assert type(parsed[name]) is int, f"{name} was written as {parsed[name]!r}: {raw}"
    assert type(parsed["x"]) is float


def test_send_event_stores_every_body_kind_byte_exact_with_its_content_type(api, gateway):
    run = run_id()
    before = partition_positions(gateway.connection_string, "eh1")
    cases = body_cases(api.pb)
    for name, event, _, _ in cases:
        event.partition_id = "1"
        event.message_id = f"{run}-{name}"
        event.correlation_id = f"corr-{name}"
        event.properties.update({"case": name, "ünïcode": "välue ✓", "empty": ""})
        response = gateway.stub.SendEvent(api.pb.SendEventRequest(event=event), timeout=CALL_TIMEOUT)
        assert response.event_hub == "eh1", "the default hub's name when the request names none"
        assert response.partition_id == "1", "the gateway knows the partition it was asked for"
    stored = read_since(gateway.connection_string, "eh1", before)
    assert [len(stored[p]) for p in "0123"] == [0, len(cases), 0, 0], "everything on partition 1, nothing else"
    by_id = {e.message_id: e for e in stored["1"]}
    for name, _, expected_body, content_type in cases:
        event = by_id[f"{run}-{name}"]
        raw = body(event)
        if expected_body is None:
            check_compact_json(raw)
        else:
            assert raw == expected_body, name
        assert event.content_type == content_type, name
        assert event.correlation_id == f"corr-{name}", name
        assert event.partition_key is None, name
        assert properties(event) == {"case": name, "ünïcode": "välue ✓", "empty": ""}, name
    assert [e.message_id for e in stored["1"]] == [f"{run}-{name}" for name, *_ in cases], "sent one by one, in order"


def test_send_event_to_a_named_hub_lands_on_each_partition_id(api, gateway):
    run = run_id()
    before = partition_positions(gateway.connection_string, "eh2")
    for partition in ("3", "0", "2", "1"):
        request = api.pb.SendEventRequest(
            event_hub="eh2", event=api.pb.Event(text=f"{run}:{partition}", partition_id=partition)
        )
        response = gateway.stub.SendEvent(request, timeout=CALL_TIMEOUT)
        assert (response.event_hub, response.partition_id) == ("eh2", partition)
    stored = read_since(gateway.connection_string, "eh2", before)
    assert {p: [body(e).decode() for e in events] for p, events in stored.items()} == {
        p: [f"{run}:{p}"] for p in "0123"
    }


def pick_keys():
    """Keys of every kind from the official resolver's vectors: ASCII, non-ASCII, long."""
    cases = [case for case in VECTORS["cases"] if case["key"]]
    ascii_keys = [c for c in cases if c["key"].isascii()][:4]
    non_ascii = [c for c in cases if not c["key"].isascii()][:4]
    long_keys = [c for c in cases if c["utf8_len"] > 200][:1]
    return ascii_keys + non_ascii + long_keys


def test_partition_keys_land_where_the_official_python_producer_puts_them(api, gateway):
    run = run_id()
    keys = pick_keys()
    before = partition_positions(gateway.connection_string, "eh1")
    with producer(gateway.connection_string, "eh1") as official:
        for index, case in enumerate(keys):
            request = api.pb.SendEventRequest(event=api.pb.Event(text=f"gw:{run}:{index}", partition_key=case["key"]))
            response = gateway.stub.SendEvent(request, timeout=CALL_TIMEOUT)
            assert response.partition_id == str(case["partition"]["4"]), "the partition the service picks"
            official.send_event(EventData(f"sdk:{run}:{index}"), partition_key=case["key"])
    stored = read_since(gateway.connection_string, "eh1", before)
    where = {}
    for partition, events in stored.items():
        for event in events:
            where[body(event).decode()] = (partition, event.partition_key.decode())
    assert len(where) == 2 * len(keys)
    for index, case in enumerate(keys):
        ours, theirs = where[f"gw:{run}:{index}"], where[f"sdk:{run}:{index}"]
        assert ours == theirs, f"key {case['key']!r}: gateway {ours}, official producer {theirs}"
        assert ours == (str(case["partition"]["4"]), case["key"]), f"key {case['key']!r}"


def test_trace_context_metadata_is_written_onto_every_stored_event(api, gateway):
    run = run_id()
    pb, stub = api.pb, gateway.stub
    traced = (("traceparent", TRACEPARENT), ("tracestate", TRACESTATE))
    before = partition_positions(gateway.connection_string, "eh2")

    def event(name):
        return pb.Event(text=f"{run}:{name}", partition_id="2", properties={"own": name})

    stub.SendEvent(pb.SendEventRequest(event_hub="eh2", event=event("unary")), metadata=traced, timeout=CALL_TIMEOUT)
    results = stub.SendEvents(
        pb.SendEventsRequest(event_hub="eh2", events=[event("batch0"), event("batch1")]),
        metadata=traced,
        timeout=CALL_TIMEOUT,
    ).results
    assert [r.status.code for r in results] == [0, 0]
    acks, error = collect_acks(
        stub.SendStream(
            stream_requests(api, [(1, event("stream1")), (2, event("stream2"))], hub="eh2"),
            metadata=traced,
            timeout=CALL_TIMEOUT,
        )
    )
    assert error is None, describe(api, error)
    assert sorted((a.sequence, a.status.code) for a in acks) == [(1, 0), (2, 0)]
    stub.SendEvent(
        pb.SendEventRequest(event_hub="eh2", event=event("parent-only")),
        metadata=(("traceparent", TRACEPARENT),),
        timeout=CALL_TIMEOUT,
    )
    stub.SendEvent(pb.SendEventRequest(event_hub="eh2", event=event("untraced")), timeout=CALL_TIMEOUT)

    stored = {body(e).decode().split(":", 1)[1]: properties(e) for e in read_since(gateway.connection_string, "eh2", before)["2"]}
    assert sorted(stored) == sorted(["unary", "batch0", "batch1", "stream1", "stream2", "parent-only", "untraced"])
    for name in ("unary", "batch0", "batch1", "stream1", "stream2"):
        assert stored[name] == {
            "own": name, "Diagnostic-Id": TRACEPARENT, "traceparent": TRACEPARENT, "tracestate": TRACESTATE
        }, name
    parent_only = stored["parent-only"]
    assert (parent_only["Diagnostic-Id"], parent_only["traceparent"]) == (TRACEPARENT, TRACEPARENT)
    assert parent_only.get("tracestate") in (None, ""), parent_only
    assert stored["untraced"] == {"own": "untraced"}, "no trace properties without trace metadata"


# ------------------------------------------------------------------------------------------------------------
# SendEvents
# ------------------------------------------------------------------------------------------------------------


def test_send_events_answers_each_event_in_order_and_bad_events_fail_alone(api, gateway):
    run = run_id()
    pb = api.pb
    events = [
        pb.Event(text=f"{run}:0", partition_id="0"),
        pb.Event(json=json_struct({"run": run, "i": 1})),
        pb.Event(binary=f"{run}:2".encode(), partition_key="some-key"),
        pb.Event(properties={"no": "body"}),
        pb.Event(text=f"{run}:4", partition_key="k", partition_id="1"),
        pb.Event(text=f"{run}:5", partition_id="99"),
        pb.Event(binary=b"x" * 1_100_000),
        pb.Event(text=f"{run}:7", properties={"": "unnamed"}),
        pb.Event(text=f"{run}:8", partition_id="2"),
    ]
    before = partition_positions(gateway.connection_string, "eh1")
    results = gateway.stub.SendEvents(pb.SendEventsRequest(events=events), timeout=CALL_TIMEOUT).results
    assert len(results) == len(events)
    ok = {0: "0", 1: "", 2: None, 8: "2"}  # events[2]'s partition is checked where it was stored, below
    for index, partition in ok.items():
        assert results[index].status.code == 0, (index, result_status(api, results[index].status))
        if partition is not None:
            assert results[index].partition_id == partition, index
    failures = {
        3: ("INVALID_EVENT", ["events[3].body"]),
        4: ("INVALID_EVENT", None),  # key and id: either field may be named
        5: ("INVALID_EVENT", ["events[5].partition_id"]),
        6: ("EVENT_TOO_LARGE", ["events[6]"]),
        7: ("INVALID_EVENT", ["events[7].properties"]),
    }
    for index, (reason, fields) in failures.items():
        rich = check_error(result_status(api, results[index].status), Code.INVALID_ARGUMENT, reason)
        if fields is None:
            assert rich.fields in (["events[4].partition_key"], ["events[4].partition_id"]), rich
        else:
            assert rich.fields == fields, rich
        assert results[index].partition_id == "", "no partition on error"
    stored = read_since(gateway.connection_string, "eh1", before)
    everything = [e for events in stored.values() for e in events]
    assert len(everything) == 4, "exactly the good events were stored"
    assert sorted(body(e) for e in everything if e.content_type is None) == [
        f"{run}:{i}".encode() for i in (0, 2, 8)
    ]
    assert [json.loads(body(e)) for e in everything if e.content_type == "application/json"] == [
        {"run": run, "i": 1}
    ]
    assert f"{run}:0".encode() in [body(e) for e in stored["0"]], "events[0] on its partition id"
    assert f"{run}:8".encode() in [body(e) for e in stored["2"]], "events[8] on its partition id"
    assert [e.partition_key for e in everything if body(e) == f"{run}:2".encode()] == [b"some-key"]
    assert f"{run}:2".encode() in [body(e) for e in stored[results[2].partition_id]], "a key's partition is answered"
    empty = gateway.stub.SendEvents(pb.SendEventsRequest(), timeout=CALL_TIMEOUT)
    assert list(empty.results) == [], "an empty list gets an empty response"


def test_send_events_to_an_unknown_hub_fails_as_a_whole_with_nothing_sent(api, gateway):
    before = stored_count(gateway.connection_string, "eh1"), stored_count(gateway.connection_string, "eh2")
    request = api.pb.SendEventsRequest(event_hub="nope", events=[api.pb.Event(text="a"), api.pb.Event(text="b")])
    rich = expect_error(
        api, lambda: gateway.stub.SendEvents(request, timeout=CALL_TIMEOUT), Code.NOT_FOUND, "UNKNOWN_EVENT_HUB"
    )
    assert rich.error_info.metadata["event_hub"] == "nope"
    after = stored_count(gateway.connection_string, "eh1"), stored_count(gateway.connection_string, "eh2")
    assert after == before


# ------------------------------------------------------------------------------------------------------------
# SendEvent refusals: each one a call status with its reason and field, and nothing stored
# ------------------------------------------------------------------------------------------------------------

REFUSALS = {
    # name: (request kwargs, code, reason, BadRequest fields (None: either of a pair))
    "no body": (lambda pb: {"event": pb.Event(properties={"a": "b"})}, Code.INVALID_ARGUMENT, "INVALID_EVENT",
                ["event.body"]),
    "no event": (lambda pb: {}, Code.INVALID_ARGUMENT, "INVALID_EVENT", ["event"]),
    "key and id": (lambda pb: {"event": pb.Event(text="x", partition_key="k", partition_id="1")},
                   Code.INVALID_ARGUMENT, "INVALID_EVENT", None),
    "unknown partition id": (lambda pb: {"event": pb.Event(text="x", partition_id="99")}, Code.INVALID_ARGUMENT,
                             "INVALID_EVENT", ["event.partition_id"]),
    "empty property name": (lambda pb: {"event": pb.Event(text="x", properties={"": "v"})},
                            Code.INVALID_ARGUMENT, "INVALID_EVENT", ["event.properties"]),
    "json NaN": (lambda pb: {"event": pb.Event(json=json_struct({"n": float("nan")}))}, Code.INVALID_ARGUMENT,
                 "INVALID_EVENT", ["event.json"]),
    "too large": (lambda pb: {"event": pb.Event(binary=b"x" * 1_100_000)}, Code.INVALID_ARGUMENT,
                  "EVENT_TOO_LARGE", ["event"]),
    "unknown hub": (lambda pb: {"event_hub": "nope", "event": pb.Event(text="x")}, Code.NOT_FOUND,
                    "UNKNOWN_EVENT_HUB", []),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_send_event_refusals_carry_code_reason_and_field(api, gateway, name):
    kwargs, code, reason, fields = REFUSALS[name]
    before = partition_positions(gateway.connection_string, "eh1")
    request = api.pb.SendEventRequest(**kwargs(api.pb))
    rich = expect_error(api, lambda: gateway.stub.SendEvent(request, timeout=CALL_TIMEOUT), code, reason)
    if fields is None:
        assert rich.fields in (["event.partition_key"], ["event.partition_id"]), rich
    else:
        assert rich.fields == fields, rich
    if rich.bad_request is not None:
        assert all(v.description for v in rich.bad_request.field_violations), "the description names the rule"
    if name == "too large":
        numbers = [int(n) for n in re.findall(r"\d+", rich.bad_request.field_violations[0].description)]
        assert any(n >= 1_100_000 for n in numbers) and 1_048_576 in numbers, rich.bad_request
    if name == "unknown hub":
        assert rich.error_info.metadata["event_hub"] == "nope"
    assert partition_positions(gateway.connection_string, "eh1") == before, "nothing was stored"


# ------------------------------------------------------------------------------------------------------------
# SendStream
# ------------------------------------------------------------------------------------------------------------


def test_a_stream_of_thousands_acks_each_sequence_once_keeps_key_order_and_ends_ok(api, gateway):
    run = run_id()
    total, bad = 5001, 2500
    counters = collections.Counter()
    events = []
    for sequence in range(total):
        if sequence == bad:
            events.append((sequence, api.pb.Event(partition_key="k0")))  # no body: nacked, the stream goes on
            continue
        key = f"k{sequence % 10}"
        events.append((sequence, api.pb.Event(text=f"{run}:{key}:{counters[key]}", partition_key=key)))
        counters[key] += 1
    before = partition_positions(gateway.connection_string, "eh1")
    acks = []
    acks_at_half_close = []

    def requests():
        yield from stream_requests(api, events)
        acks_at_half_close.append(len(acks))  # the generator ends: gRPC half-closes the stream

    call = gateway.stub.SendStream(requests(), timeout=80)
    more, error = collect_acks(call)
    acks.extend(more)
    assert error is None, describe(api, error)
    assert call.code() == Code.OK
    sequences = [a.sequence for a in acks]
    duplicates = [s for s, n in collections.Counter(sequences).items() if n > 1]
    assert not duplicates, f"acked more than once: {duplicates[:20]}"
    assert sorted(sequences) == list(range(total)), f"missing acks: {sorted(set(range(total)) - set(sequences))[:20]}"
    assert acks_at_half_close and acks_at_half_close[0] < total, "acks went on after the client half-closed"
    for ack in acks:
        if ack.sequence == bad:
            rich = check_error(result_status(api, ack.status), Code.INVALID_ARGUMENT, "INVALID_EVENT")
            assert rich.fields == ["event.body"], rich
        else:
            assert ack.status.code == 0, (ack.sequence, result_status(api, ack.status))
            assert ack.partition_id != "", "keyed: the partition the service picks for the key"

    sent_text = {sequence: event.text for sequence, event in events}
    acked_partition = {
        sent_text[ack.sequence].split(":", 1)[1]: ack.partition_id for ack in acks if ack.sequence != bad
    }
    stored = read_since(gateway.connection_string, "eh1", before, timeout=60)
    per_key = collections.defaultdict(list)
    for partition, partition_events in stored.items():
        for event in partition_events:
            event_run, key, n = body(event).decode().split(":")
            assert event_run == run and event.partition_key.decode() == key
            per_key[key].append((partition, int(n)))
            answered = acked_partition[f"{key}:{n}"]
            assert answered == partition, f"{key}:{n} acked with partition {answered}, stored in {partition}"
    assert sum(len(v) for v in per_key.values()) == total - 1
    for key, landed in sorted(per_key.items()):
        assert len({partition for partition, _ in landed}) == 1, f"{key} spread over partitions"
        assert [n for _, n in landed] == list(range(counters[key])), f"{key} stored out of order or incomplete"


def test_each_stream_message_names_its_hub_and_bad_messages_are_nacked_alone(api, gateway):
    run = run_id()
    pb = api.pb
    before = partition_positions(gateway.connection_string, "eh2")
    requests = [
        pb.SendStreamRequest(sequence=10, event_hub="eh1", event=pb.Event(text=f"{run}:10", partition_id="0")),
        pb.SendStreamRequest(sequence=11, event_hub="eh2", event=pb.Event(text=f"{run}:11", partition_id="3")),
        pb.SendStreamRequest(sequence=12, event_hub="nope", event=pb.Event(text=f"{run}:12")),
        pb.SendStreamRequest(sequence=13, event_hub="eh2"),
        pb.SendStreamRequest(sequence=14, event_hub="eh2", event=pb.Event(text=f"{run}:14", partition_id="7")),
        pb.SendStreamRequest(sequence=15, event=pb.Event(text=f"{run}:15", partition_id="1")),
        pb.SendStreamRequest(sequence=16, event_hub="eh2", event=pb.Event(text=f"{run}:16", partition_id="3")),
    ]
    call = gateway.stub.SendStream(iter(requests), timeout=CALL_TIMEOUT)
    acks, error = collect_acks(call)
    assert error is None, describe(api, error)
    by_sequence = {a.sequence: a for a in acks}
    assert sorted(a.sequence for a in acks) == list(range(10, 17))
    assert {s: (by_sequence[s].status.code, by_sequence[s].partition_id) for s in (10, 11, 15, 16)} == {
        10: (0, "0"), 11: (0, "3"), 15: (0, "1"), 16: (0, "3")
    }
    unknown = check_error(result_status(api, by_sequence[12].status), Code.NOT_FOUND, "UNKNOWN_EVENT_HUB")
    assert unknown.error_info.metadata["event_hub"] == "nope"
    missing = check_error(result_status(api, by_sequence[13].status), Code.INVALID_ARGUMENT, "INVALID_EVENT")
    assert missing.fields == ["event"]
    partition = check_error(result_status(api, by_sequence[14].status), Code.INVALID_ARGUMENT, "INVALID_EVENT")
    assert partition.fields == ["event.partition_id"]
    stored = read_since(gateway.connection_string, "eh2", before)
    assert [body(e).decode() for e in stored["3"]] == [f"{run}:11", f"{run}:16"], "same partition: stream order"
    assert sum(len(v) for v in stored.values()) == 2


def test_stream_messages_may_carry_many_events_each_acked_on_its_own_sequence(api, gateway):
    """`events` (several per message, what fast Python clients send): consecutive sequences, one ack each,
    per-key order across messages; a bad event names `events[i]` and is nacked alone."""
    run = run_id()
    pb = api.pb
    per_message, messages = 250, 12
    before = partition_positions(gateway.connection_string, "eh1")
    requests = []
    for m in range(messages):
        first = 1000 + m * per_message
        events = [
            pb.Event(text=f"{run}:k{s % 3}:{s}", partition_key=f"k{s % 3}") for s in range(first, first + per_message)
        ]
        if m == 5:
            events[7] = pb.Event(partition_key="k0")  # no body
        requests.append(pb.SendStreamRequest(sequence=first, events=events))
    call = gateway.stub.SendStream(iter(requests), timeout=CALL_TIMEOUT)
    acks, error = collect_acks(call)
    assert error is None, describe(api, error)
    sequences = sorted(a.sequence for a in acks)
    assert sequences == list(range(1000, 1000 + messages * per_message)), "one ack per event, no more"
    bad_sequence = 1000 + 5 * per_message + 7
    for ack in acks:
        if ack.sequence == bad_sequence:
            rich = check_error(result_status(api, ack.status), Code.INVALID_ARGUMENT, "INVALID_EVENT")
            assert rich.fields == ["events[7].body"], rich
        else:
            assert ack.status.code == 0, (ack.sequence, result_status(api, ack.status))
    stored = read_since(gateway.connection_string, "eh1", before, timeout=60)
    per_key = collections.defaultdict(list)
    for partition_events in stored.values():
        for event in partition_events:
            event_run, key, s = body(event).decode().split(":")
            assert event_run == run
            per_key[key].append(int(s))
    assert sum(len(v) for v in per_key.values()) == messages * per_message - 1
    for key, landed in per_key.items():
        assert landed == sorted(landed), f"{key} stored out of order"


def test_a_stream_longer_than_its_unacked_window_completes(api, start_gateway):
    gateway = start_gateway(
        "--emulator", "--event-hub", "eh1", env={"EVENTHUB_GATEWAY_LIMITS__MAX_UNACKED_PER_STREAM": "8"}
    )
    total = 600
    events = [(s, api.pb.Event(text=f"{s}", partition_key=f"k{s % 3}")) for s in range(total)]
    acks, error = collect_acks(gateway.stub.SendStream(stream_requests(api, events), timeout=60))
    assert error is None, describe(api, error)
    assert sorted(a.sequence for a in acks) == list(range(total))
    assert all(a.status.code == 0 for a in acks)
    stored = read_since(gateway.connection_string, "eh1", {})
    per_key = collections.defaultdict(list)
    for partition_events in stored.values():
        for event in partition_events:
            per_key[event.partition_key.decode()].append(int(body(event)))
    assert {k: v for k, v in per_key.items()} == {
        f"k{k}": list(range(k, total, 3)) for k in range(3)
    }, "every event stored once, per-key order kept"


def test_a_client_faster_than_event_hubs_is_pushed_back_not_disconnected(api, start_emulator, start_gateway):
    """Event Hubs answers in 0.5 s and the gateway holds at most 1000 unacked events: the client's small
    events must wait in HTTP/2 flow control (its writes block) and all be answered, on the same connection."""
    slow = start_emulator("--event-hub", "eh1:4", "--latency-ms", "500")
    gateway = start_gateway(
        "--connection-string", slow.connection_string, "--event-hub", "eh1",
        env={"EVENTHUB_GATEWAY_LIMITS__MAX_UNACKED_PER_STREAM": "1000"},
    )
    total = 5000
    events = ((s, api.pb.Event(text=str(s), partition_key=f"k{s % 10}")) for s in range(total))
    acks, error = collect_acks(gateway.stub.SendStream(stream_requests(api, events), timeout=60))
    assert error is None, (
        f"the stream broke after {len(acks)} acks instead of being flow-controlled: {error.code()} "
        f"{error.details()!r} (gateway exit code {gateway.process.poll()}: None is still running)"
    )
    assert sorted(a.sequence for a in acks) == list(range(total))
    assert all(a.status.code == 0 for a in acks)
    assert stored_count(slow.connection_string, "eh1") == total


# ------------------------------------------------------------------------------------------------------------
# Limits: dedicated gateways
# ------------------------------------------------------------------------------------------------------------


def batch(api, tag, count=40):
    return api.pb.SendEventsRequest(events=[api.pb.Event(text=f"{tag}:{i}") for i in range(count)])


def client(name):
    return (("x-client-id", name),)


def all_ok(response):
    return [r.status.code for r in response.results] == [0] * len(response.results)


def test_a_client_over_its_rate_is_refused_with_retry_info_and_quota_failure(api, start_gateway):
    gateway = start_gateway(
        "--emulator", "--event-hub", "eh1", env={"EVENTHUB_GATEWAY_LIMITS__CLIENT_EVENTS_PER_SECOND": "50"}
    )
    stub = gateway.stub
    assert all_ok(stub.SendEvents(batch(api, "a1"), metadata=client("a"), timeout=CALL_TIMEOUT))
    rich = expect_error(
        api,
        lambda: stub.SendEvents(batch(api, "a2"), metadata=client("a"), timeout=CALL_TIMEOUT),
        Code.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
    )
    assert rich.quota_subjects == ["client:a"], rich.quota_failure
    assert rich.retry_delay is not None and 0 < rich.retry_delay <= 2, rich.retry_info
    assert all_ok(stub.SendEvents(batch(api, "b1"), metadata=client("b"), timeout=CALL_TIMEOUT)), "b has its own rate"
    time.sleep(rich.retry_delay + 0.1)
    assert all_ok(stub.SendEvents(batch(api, "a3"), metadata=client("a"), timeout=CALL_TIMEOUT)), (
        "after RetryInfo's delay the same request passes"
    )
    # In a stream, events over the rate are nacked one by one and the stream goes on.
    events = [(s, api.pb.Event(text=f"s:{s}")) for s in range(60)]
    acks, error = collect_acks(stub.SendStream(stream_requests(api, events), metadata=client("a"), timeout=CALL_TIMEOUT))
    assert error is None, describe(api, error)
    assert sorted(a.sequence for a in acks) == list(range(60))
    nacks = [a for a in acks if a.status.code != 0]
    assert nacks, "60 events right after a full burst cannot all pass 50/s"
    for nack in nacks:
        nacked = check_error(result_status(api, nack.status), Code.RESOURCE_EXHAUSTED, "RATE_LIMITED")
        assert nacked.quota_subjects == ["client:a"]
    assert stored_count(gateway.connection_string, "eh1") == 3 * 40 + (60 - len(nacks)), "a refused request sends nothing"


def test_the_global_rate_limit_refuses_every_client(api, start_gateway):
    gateway = start_gateway(
        "--emulator", "--event-hub", "eh1", env={"EVENTHUB_GATEWAY_LIMITS__GLOBAL_EVENTS_PER_SECOND": "50"}
    )
    assert all_ok(gateway.stub.SendEvents(batch(api, "a"), metadata=client("a"), timeout=CALL_TIMEOUT))
    rich = expect_error(
        api,
        lambda: gateway.stub.SendEvents(batch(api, "b"), metadata=client("b"), timeout=CALL_TIMEOUT),
        Code.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
    )
    assert rich.quota_subjects == ["global"], rich.quota_failure
    assert rich.retry_delay is not None and rich.retry_delay > 0
    assert stored_count(gateway.connection_string, "eh1") == 40


def test_calls_beyond_max_concurrent_calls_are_shed_as_overloaded(api, start_gateway):
    gateway = start_gateway(
        "--emulator", "--event-hub", "eh1", env={"EVENTHUB_GATEWAY_LIMITS__MAX_CONCURRENT_CALLS": "1"}
    )
    pb = api.pb
    outbox = queue.Queue()

    def held_stream():
        while (request := outbox.get()) is not None:
            yield request

    stream = gateway.stub.SendStream(held_stream(), timeout=CALL_TIMEOUT)
    try:
        outbox.put(pb.SendStreamRequest(sequence=1, event=pb.Event(text="held")))
        first = next(stream)
        assert [(a.sequence, a.status.code) for a in first.acks] == [(1, 0)], "the stream is being served"
        unary = pb.SendEventRequest(event=pb.Event(text="shed"))
        rich = expect_error(
            api, lambda: gateway.stub.SendEvent(unary, timeout=10), Code.RESOURCE_EXHAUSTED, "OVERLOADED"
        )
        assert rich.retry_delay is not None and rich.retry_delay > 0, rich
        outbox.put(None)
        rest, error = collect_acks(stream)
        assert error is None, describe(api, error)
        assert rest == [], rest
    finally:
        outbox.put(None)
        stream.cancel()

    def unary_passes():
        try:
            gateway.stub.SendEvent(pb.SendEventRequest(event=pb.Event(text="after")), timeout=10)
            return True
        except grpc.RpcError as error:
            assert error.code() == Code.RESOURCE_EXHAUSTED, error
            return False

    assert wait_for(unary_passes, timeout=5), "the slot is free again once the stream ended"
    assert stored_count(gateway.connection_string, "eh1") == 2, "the shed call sent nothing"


def test_more_events_than_max_events_per_request_are_refused_whole(api, start_gateway):
    gateway = start_gateway(
        "--emulator", "--event-hub", "eh1", env={"EVENTHUB_GATEWAY_LIMITS__MAX_EVENTS_PER_REQUEST": "10"}
    )
    rich = expect_error(
        api,
        lambda: gateway.stub.SendEvents(batch(api, "eleven", 11), timeout=CALL_TIMEOUT),
        Code.INVALID_ARGUMENT,
        "INVALID_EVENT",
    )
    assert rich.fields == ["events"], rich
    assert "10" in rich.bad_request.field_violations[0].description, "the description names the limit"
    assert stored_count(gateway.connection_string, "eh1") == 0, "nothing of the request was sent"
    assert all_ok(gateway.stub.SendEvents(batch(api, "ten", 10), timeout=CALL_TIMEOUT))
    assert stored_count(gateway.connection_string, "eh1") == 10


def test_deadlines_belong_to_events_and_an_event_on_the_wire_is_never_answered_as_failed(api, start_emulator, start_gateway):
    slow = start_emulator("--event-hub", "eh1:4", "--latency-ms", "1000")
    gateway = start_gateway(
        "--connection-string", slow.connection_string, "--event-hub", "eh1",
        env={"EVENTHUB_GATEWAY_PRODUCER__SEND_TIMEOUT": "3"},
    )
    pb = api.pb
    before = partition_positions(slow.connection_string, "eh1")
    keyed = lambda text: pb.SendEventRequest(event=pb.Event(text=text, partition_key="one-key"))  # noqa: E731
    # A key has one batch in flight: the second event waits behind the first, and its deadline passes first.
    first = gateway.stub.SendEvent.future(keyed("first"), timeout=CALL_TIMEOUT)
    time.sleep(0.3)
    started = time.monotonic()
    rich = expect_error(
        api, lambda: gateway.stub.SendEvent(keyed("never sent"), timeout=0.3), Code.DEADLINE_EXCEEDED,
        "DEADLINE_EXCEEDED",
    )
    assert time.monotonic() - started < 0.9, "answered at the caller's deadline, not after Event Hubs"
    assert rich.bad_request is None and rich.retry_info is None, rich
    first.result()
    # An event already on the wire at its caller's deadline is not answered as failed: OUTCOME_UNKNOWN, before
    # grpcio's own timer, and the event is stored.
    expect_error(
        api, lambda: gateway.stub.SendEvent(pb.SendEventRequest(event=pb.Event(text="on the wire")), timeout=0.5),
        Code.UNKNOWN, "OUTCOME_UNKNOWN",
    )
    time.sleep(1.5)
    stored = [body(event) for events in read_since(slow.connection_string, "eh1", before).values() for event in events]
    assert sorted(stored) == [b"first", b"on the wire"], stored


def test_an_event_on_the_wire_past_the_send_timeout_is_outcome_unknown(api, start_emulator, start_gateway):
    slow = start_emulator("--event-hub", "eh1:4", "--latency-ms", "1000")
    gateway = start_gateway(
        "--connection-string", slow.connection_string, "--event-hub", "eh1",
        env={"EVENTHUB_GATEWAY_PRODUCER__SEND_TIMEOUT": "0.5"},
    )
    pb = api.pb
    before = partition_positions(slow.connection_string, "eh1")
    # In a stream, each event on the wire past the gateway's send timeout is acked OUTCOME_UNKNOWN, and the
    # stream goes on and ends OK.
    acks, error = collect_acks(
        gateway.stub.SendStream(stream_requests(api, [(1, pb.Event(text="in doubt"))]), timeout=CALL_TIMEOUT)
    )
    assert error is None, describe(api, error)
    assert [a.sequence for a in acks] == [1]
    rich = result_status(api, acks[0].status)
    check_error(rich, Code.UNKNOWN, "OUTCOME_UNKNOWN")
    assert "may have been stored" in rich.message
    time.sleep(1)
    stored = [body(event) for events in read_since(slow.connection_string, "eh1", before).values() for event in events]
    assert stored == [b"in doubt"], "the disposition was only late"


# ------------------------------------------------------------------------------------------------------------
# Graceful shutdown
# ------------------------------------------------------------------------------------------------------------


def test_sigterm_during_a_busy_stream_loses_nothing_and_leaves_nothing_unanswered(api, start_emulator, start_gateway):
    emulator = start_emulator("--event-hub", "eh1:4")
    gateway = start_gateway("--connection-string", emulator.connection_string, "--event-hub", "eh1")
    total, signal_after = 20_000, 2_000
    sent = []
    events = ((s, api.pb.Event(text=str(s), partition_key=f"k{s % 10}")) for s in range(total))
    call = gateway.stub.SendStream(stream_requests(api, events, sent), timeout=80)
    acks, ok_count, signalled_at, error = [], 0, None, None
    try:
        for response in call:
            acks.extend(response.acks)
            ok_count += sum(1 for a in response.acks if a.status.code == 0)
            if signalled_at is None and ok_count >= signal_after:
                gateway.process.send_signal(signal.SIGTERM)
                signalled_at = len(acks)
    except grpc.RpcError as failure:
        error = failure
    assert signalled_at is not None, (
        f"the stream ended before {signal_after} OK acks ({len(acks)} acks, gateway exit code "
        f"{gateway.process.poll()}): {error}; stderr: {gateway.logs()[-3000:]}"
    )
    try:
        exit_code = gateway.process.wait(timeout=40)
    except subprocess.TimeoutExpired:
        exit_code = "none: still running 40 s after SIGTERM"
    ended = error.code() if error else "OK"
    assert exit_code == 0, (
        f"the gateway exited with {exit_code}; the stream ended {ended} after {len(acks)} acks "
        f"({len(sent)} handed over); stderr: {gateway.logs()[-3000:]}"
    )
    if error is not None:
        rich = call_status(api, error)
        assert rich is not None, f"the stream ended without the gateway's status: {describe(api, error)}"
        check_error(rich, Code.UNAVAILABLE, "DRAINING")
        assert rich.retry_delay is not None, rich
    else:
        assert len(acks) == total, "a stream that ended OK answered every event"

    ack_counts = collections.Counter(a.sequence for a in acks)
    assert not [s for s, n in ack_counts.items() if n > 1], "a sequence was acked twice"
    ok = {a.sequence for a in acks if a.status.code == 0}
    nacked = {a.sequence: result_status(api, a.status) for a in acks if a.status.code != 0}
    for sequence, rich in nacked.items():
        check_error(rich, Code.UNAVAILABLE, "DRAINING")
    assert set(ack_counts) <= set(sent)

    stored = read_since(emulator.connection_string, "eh1", {}, timeout=60)
    stored_sequences = collections.Counter(int(body(e)) for events in stored.values() for e in events)
    print(  # shown on failure
        f"handed over {len(sent)}, SIGTERM after {signalled_at} acks, acks {len(acks)} (OK {len(ok)}, nacked "
        f"{len(nacked)}), stored {sum(stored_sequences.values())}, end {error.code() if error else 'OK'}"
    )
    assert not [s for s, n in stored_sequences.items() if n > 1], "stored twice"
    stored_set = set(stored_sequences)
    assert not ok - stored_set, f"lost: acked OK but not stored: {sorted(ok - stored_set)[:20]}"
    assert not stored_set - set(sent), "stored but never sent"
    assert not stored_set - ok, f"unanswered: stored but not acked OK: {sorted(stored_set - ok)[:20]}"
    assert not stored_set & set(nacked), "nacked but stored"
    assert len(ok) >= signal_after


# ------------------------------------------------------------------------------------------------------------
# How a stream ends: each event read is acked exactly once before any status the client can hear
# ------------------------------------------------------------------------------------------------------------


def acked_once_ok(acks, expected):
    sequences = [a.sequence for a in acks]
    assert sorted(sequences) == expected, f"acks {sequences}, expected each of {expected} once"
    assert all(a.status.code == 0 for a in acks), acks


def test_a_stream_message_over_max_request_bytes_ends_the_stream_out_of_range_after_the_acks_before_it(
    api, start_gateway
):
    gateway = start_gateway(
        "--emulator", "--event-hub", "eh1", env={"EVENTHUB_GATEWAY_LIMITS__MAX_REQUEST_BYTES": str(1088 * 1024)}
    )
    pb = api.pb
    events = [
        (1, pb.Event(text="small")),
        (2, pb.Event(text="small too")),
        (3, pb.Event(binary=b"x" * (1200 * 1024))),
        (4, pb.Event(text="never read")),
    ]
    acks, error = collect_acks(gateway.stub.SendStream(stream_requests(api, events), timeout=CALL_TIMEOUT))
    acked_once_ok(acks, [1, 2])
    rich = check_stream_ending(api, error, Code.OUT_OF_RANGE, "REQUEST_TOO_LARGE", 2, 2)
    assert rich.error_info.metadata["limit"] == str(1088 * 1024), rich
    assert "max_request_bytes (1114112 bytes)" in rich.message, rich
    assert stored_count(gateway.connection_string, "eh1") == 2


def test_an_undecodable_stream_message_ends_the_stream_invalid_argument_after_the_acks_before_it(api, gateway):
    pb = api.pb
    good = [pb.SendStreamRequest(sequence=s, event=pb.Event(text=f"readable {s}")).SerializeToString() for s in (7, 8)]
    # Field 1 (event_hub) announces 127 bytes and none follow. (grpcio cannot send broken compression; the
    # Rust suite covers it.)
    acks, error = raw_send_stream(api, gateway.channel, [*good, b"\x0a\x7f", good[0]])
    acked_once_ok(acks, [7, 8])
    rich = check_stream_ending(api, error, Code.INVALID_ARGUMENT, "MALFORMED_REQUEST", 2, 8)
    assert "cannot be read" in rich.message, rich


def test_a_streams_deadline_and_a_cancel_end_it_after_every_ack_the_client_can_still_hear(
    api, start_emulator, start_gateway
):
    """Event Hubs answers in 10 s. Unknown-hub events are nacked at once, so each stream has acks before its
    end; one real event is on the wire when the deadline passes (acked OUTCOME_UNKNOWN: Event Hubs may store
    it), or when the client cancels (the gateway stops waiting for it at once)."""
    slow = start_emulator("--event-hub", "eh1:4", "--latency-ms", "10000")
    gateway = start_gateway("--connection-string", slow.connection_string, "--event-hub", "eh1")
    pb = api.pb
    nacked_at_once = [pb.SendStreamRequest(sequence=s, event_hub="nope", event=pb.Event(text="x")) for s in (1, 2)]
    in_flight = pb.SendStreamRequest(sequence=3, event=pb.Event(text="slow"))

    # The deadline: the gateway's DEADLINE_EXCEEDED, with its details, before grpcio's own timer.
    stream = HeldStream(gateway.stub, timeout=2)
    try:
        for request in nacked_at_once:
            stream.send(request)
        acks = stream.next_acks()
        while len(acks) < 2:
            acks += stream.next_acks()
        stream.send(in_flight)
        more, error = stream.rest()
    finally:
        stream.close()
    acks += more
    assert sorted(a.sequence for a in acks) == [1, 2, 3], acks
    for ack in acks:
        reason = ("UNKNOWN_EVENT_HUB", Code.NOT_FOUND) if ack.sequence < 3 else ("OUTCOME_UNKNOWN", Code.UNKNOWN)
        check_error(result_status(api, ack.status), reason[1], reason[0])
    check_stream_ending(api, error, Code.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", 3, 3)

    # The cancel: acks before it arrived once; the gateway's stream ends at once, not when Event Hubs answers.
    wait_for(lambda: open_streams(gateway) == 0, timeout=15)
    stream = HeldStream(gateway.stub, timeout=CALL_TIMEOUT)
    try:
        for request in nacked_at_once:
            stream.send(request)
        acks = stream.next_acks()
        while len(acks) < 2:
            acks += stream.next_acks()
        stream.send(in_flight)
        assert wait_for(lambda: open_streams(gateway) == 1, timeout=5)
        time.sleep(0.2)  # event 3 read and handed to the producer
        stream.call.cancel()
        more, error = stream.rest()
    finally:
        stream.close()
    assert sorted(a.sequence for a in acks + more) == [1, 2], "acked once each, before the cancel"
    assert error is not None and error.code() == Code.CANCELLED, describe(api, error)
    assert wait_for(lambda: open_streams(gateway) == 0, timeout=5), "the cancelled stream still waits on Event Hubs"


def open_streams(gateway):
    samples, _ = scrape(gateway)
    return sample(samples, "eventhub_gateway_streams_open")
