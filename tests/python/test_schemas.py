"""Per-hub JSON Schema validation against the real binary and its in-process emulator: valid JSON events publish
and read back with the official `azure-eventhub` consumer, an invalid one fails alone with SCHEMA_VIOLATION and
the JSON Pointer of each violation (in SendEvents and SendStream), draft-07 works, a bad schema stops the start
naming its file, and SIGHUP swaps the schemas under a flowing stream without losing an event."""

import json
import os
import signal
import subprocess
import threading
import time
import uuid

import grpc

from conftest import BINARY, wait_for
from gateway_client import (
    CALL_TIMEOUT,
    body,
    check_error,
    collect_acks,
    json_struct,
    partition_positions,
    read_since,
    result_status,
    sample,
    scrape,
    stream_requests,
)

Code = grpc.StatusCode

ORDER_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["id", "items"],
    "properties": {
        "id": {"type": "integer"},
        "items": {"type": "array", "items": {"$ref": "#/$defs/item"}},
    },
    "$defs": {"item": {"type": "object", "properties": {"price": {"type": "number", "minimum": 0}}}},
}

DRAFT7_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {"user": {"$ref": "#/definitions/user"}},
    "dependencies": {"email": ["verified"]},
    "definitions": {"user": {"type": "string", "maxLength": 8}},
}


def write_config(tmp_path, schemas, hubs=("eh1", "eh2")):
    """A config file serving `hubs` with `schemas` ({hub: schema dict or raw text}); returns its path and the
    schema files by hub."""
    files = {}
    for hub, schema in schemas.items():
        path = tmp_path / f"{hub}.schema.json"
        path.write_text(schema if isinstance(schema, str) else json.dumps(schema))
        files[hub] = path
    lines = ["event_hubs = [" + ", ".join(f'"{hub}"' for hub in hubs) + "]", "[schemas]"]
    lines += [f'{hub} = "{path}"' for hub, path in files.items()]
    config = tmp_path / "gateway.toml"
    config.write_text("\n".join(lines) + "\n")
    return config, files


def start_with_schemas(start_gateway, tmp_path, schemas, **options):
    config, files = write_config(tmp_path, schemas)
    gateway = start_gateway("--config", str(config), "--emulator", "--emulator-partitions", "2", **options)
    return gateway, files


def json_event(pb, value, **fields):
    return pb.Event(json=json_struct(value), **fields)


def raw_json(pb, text_body, content_type="application/json", **fields):
    return pb.Event(binary=text_body.encode(), content_type=content_type, **fields)


def violation_fields(rich):
    return {v.field: v.description for v in rich.bad_request.field_violations}


def test_an_invalid_event_fails_alone_in_send_events_naming_its_pointers(api, start_gateway, tmp_path):
    gateway, _ = start_with_schemas(start_gateway, tmp_path, {"eh1": ORDER_SCHEMA})
    pb = api.pb
    run = uuid.uuid4().hex[:8]
    before = partition_positions(gateway.connection_string, "eh1")
    events = [
        json_event(pb, {"id": 1, "items": [{"price": 2}], "run": run}, partition_id="0"),
        # Two violations: /id is not an integer, /items/1/price is below its minimum.
        json_event(pb, {"id": "x", "items": [{"price": 1}, {"price": -1}], "run": run}, partition_id="0"),
        raw_json(pb, json.dumps({"id": 3, "items": [], "run": run}), partition_id="0"),
        # A JSON content type with parameters is still JSON; this body is not.
        raw_json(pb, "not json {", content_type="Application/JSON; charset=utf-8", partition_id="0"),
        # Not JSON by its content type: never checked.
        pb.Event(text=f"plain {run}", content_type="text/plain", partition_id="0"),
        # The required properties missing: a violation at the root.
        json_event(pb, {"run": run}, partition_id="0"),
    ]
    response = gateway.stub.SendEvents(pb.SendEventsRequest(event_hub="eh1", events=events), timeout=CALL_TIMEOUT)
    codes = [result.status.code for result in response.results]
    assert codes == [0, Code.INVALID_ARGUMENT.value[0], 0, Code.INVALID_ARGUMENT.value[0], 0,
                     Code.INVALID_ARGUMENT.value[0]], response

    refused = check_error(result_status(api, response.results[1].status), Code.INVALID_ARGUMENT, "SCHEMA_VIOLATION")
    fields = violation_fields(refused)
    assert set(fields) == {"events[1].body/id", "events[1].body/items/1/price"}, refused
    assert "integer" in fields["events[1].body/id"], fields
    assert refused.error_info.metadata["violations"] == "2", refused
    assert refused.error_info.metadata["event_hub"] == "eh1", refused
    assert refused.message.startswith('events[1]: the body does not match the JSON Schema of event hub "eh1"'), refused

    not_json = check_error(result_status(api, response.results[3].status), Code.INVALID_ARGUMENT, "SCHEMA_VIOLATION")
    assert list(violation_fields(not_json)) == ["events[3].body"], not_json
    assert "is not JSON" in not_json.message, not_json

    root = check_error(result_status(api, response.results[5].status), Code.INVALID_ARGUMENT, "SCHEMA_VIOLATION")
    assert list(violation_fields(root)) == ["events[5].body"], root
    assert "required" in root.message, root

    # The three accepted events, and nothing else, are stored.
    stored = read_since(gateway.connection_string, "eh1", before)
    bodies = [body(event) for event in stored["0"]]
    assert len(bodies) == 3, bodies
    assert json.loads(bodies[0]) == {"id": 1, "items": [{"price": 2}], "run": run}
    assert json.loads(bodies[1]) == {"id": 3, "items": [], "run": run}
    assert bodies[2] == f"plain {run}".encode()

    # A hub without a schema takes anything.
    free = gateway.stub.SendEvent(
        pb.SendEventRequest(event_hub="eh2", event=json_event(pb, {"id": "x"})), timeout=CALL_TIMEOUT
    )
    assert free.event_hub == "eh2"

    # SendEvent fails as a call, with the same details.
    try:
        gateway.stub.SendEvent(pb.SendEventRequest(event_hub="eh1", event=json_event(pb, {"id": 1})),
                               timeout=CALL_TIMEOUT)
        raise AssertionError("an invalid event was accepted")
    except grpc.RpcError as error:
        from gateway_client import call_status

        rich = check_error(call_status(api, error), Code.INVALID_ARGUMENT, "SCHEMA_VIOLATION")
        assert list(violation_fields(rich)) == ["event.body"], rich

    samples, _ = scrape(gateway)
    name = "eventhub_gateway_schema_validations_total"
    assert sample(samples, name, event_hub="eh1", outcome="valid") == 2
    assert sample(samples, name, event_hub="eh1", outcome="invalid") == 4
    assert sample(samples, name, event_hub="eh2", outcome="valid") is None
    assert sample(samples, "eventhub_gateway_events_sent_total", event_hub="eh1", outcome="schema_violation") == 4


def test_an_invalid_event_fails_alone_in_send_stream(api, start_gateway, tmp_path):
    gateway, _ = start_with_schemas(start_gateway, tmp_path, {"eh1": ORDER_SCHEMA})
    pb = api.pb
    run = uuid.uuid4().hex[:8]
    before = partition_positions(gateway.connection_string, "eh1")
    events = []
    for n in range(30):
        items = [{"price": -5}] if n % 10 == 3 else [{"price": n}]
        events.append((n, json_event(pb, {"id": n, "items": items, "run": run}, partition_id="1")))
    acks, ending = collect_acks(
        gateway.stub.SendStream(stream_requests(api, events, hub="eh1"), timeout=CALL_TIMEOUT)
    )
    assert ending is None, ending
    by_sequence = {ack.sequence: ack for ack in acks}
    assert sorted(by_sequence) == list(range(30)), [ack.sequence for ack in acks]
    refused = sorted(n for n, ack in by_sequence.items() if ack.status.code != 0)
    assert refused == [3, 13, 23], acks
    for n in refused:
        rich = check_error(result_status(api, by_sequence[n].status), Code.INVALID_ARGUMENT, "SCHEMA_VIOLATION")
        assert list(violation_fields(rich)) == ["event.body/items/0/price"], rich
    stored = read_since(gateway.connection_string, "eh1", before)
    ids = [json.loads(body(event))["id"] for event in stored["1"]]
    assert ids == [n for n in range(30) if n not in refused], ids


def test_a_draft_07_schema_is_applied(api, start_gateway, tmp_path):
    gateway, _ = start_with_schemas(start_gateway, tmp_path, {"eh2": DRAFT7_SCHEMA})
    pb = api.pb
    events = [
        json_event(pb, {"user": "ann", "email": "a@example.com", "verified": True}),
        json_event(pb, {"user": "a-much-too-long-name"}),
        json_event(pb, {"email": "b@example.com"}),
    ]
    response = gateway.stub.SendEvents(pb.SendEventsRequest(event_hub="eh2", events=events), timeout=CALL_TIMEOUT)
    assert [r.status.code for r in response.results] == [0, 3, 3], response
    too_long = check_error(result_status(api, response.results[1].status), Code.INVALID_ARGUMENT, "SCHEMA_VIOLATION")
    assert list(violation_fields(too_long)) == ["events[1].body/user"], too_long
    dependency = check_error(result_status(api, response.results[2].status), Code.INVALID_ARGUMENT, "SCHEMA_VIOLATION")
    assert "verified" in dependency.message, dependency
    # eh1 has no schema here: the default hub takes the same event.
    assert gateway.stub.SendEvents(pb.SendEventsRequest(events=events[1:2]), timeout=CALL_TIMEOUT).results[0].status.code == 0

    # The Python client raises SchemaViolation (an InvalidEvent) with the pointers, and sends the valid one.
    from eventhub_gateway import GatewayProducerSync, InvalidEvent, SchemaViolation

    with GatewayProducerSync(gateway.address, "eh2") as producer:
        assert producer.send_event({"user": "bo"}).event_hub == "eh2"
        try:
            producer.send_event({"user": 5, "email": "c@example.com"})
            raise AssertionError("an invalid event was accepted")
        except SchemaViolation as error:
            assert isinstance(error, InvalidEvent) and not error.retryable
            assert error.reason == "SCHEMA_VIOLATION" and error.code == Code.INVALID_ARGUMENT
            assert {field for field, _ in error.fields} == {"event.body/user", "event.body"}, error.fields
            assert error.metadata["violations"] == "2", error.metadata


def run_serve(config, *extra):
    return subprocess.run(
        [BINARY, "serve", "--config", str(config), "--emulator", "--listen", "127.0.0.1:0",
         "--metrics-listen", "127.0.0.1:0", *extra],
        capture_output=True, text=True, timeout=60, env={**os.environ, "NO_COLOR": "1"},
    )


def test_a_bad_schema_stops_the_start_naming_its_file(tmp_path):
    cases = {
        "not-json": ("{ nope", "is not JSON"),
        "bad-keyword": (json.dumps({"type": "integerish"}), "is not a usable schema"),
        "remote-ref": (json.dumps({"$ref": "https://schemas.example.com/order.json"}),
                       "remote and file references are not fetched"),
        "old-draft": (json.dumps({"$schema": "http://json-schema.org/draft-04/schema#"}), "is not supported"),
    }
    for name, (text, expected) in cases.items():
        directory = tmp_path / name
        directory.mkdir()
        config, files = write_config(directory, {"eh1": text}, hubs=("eh1",))
        for extra in ((), ("--check-config",)):
            done = run_serve(config, *extra)
            assert done.returncode != 0, f"{name} {extra}: started: {done.stderr}"
            assert str(files["eh1"]) in done.stderr, f"{name}: {done.stderr}"
            assert expected in done.stderr, f"{name}: {done.stderr}"
            assert "schemas.eh1" in done.stderr, f"{name}: {done.stderr}"
            assert done.stdout == "", f"{name}: announced listeners: {done.stdout}"
    # --check-config says which schema each hub has.
    config, files = write_config(tmp_path, {"eh2": DRAFT7_SCHEMA})
    done = run_serve(config, "--check-config")
    assert done.returncode == 0, done.stderr
    assert f"json schema of eh2: {files['eh2']} (draft 07)" in done.stderr, done.stderr
    # A file that is not there, and a hub that is not served, are named too.
    config = tmp_path / "missing.toml"
    config.write_text('event_hubs = ["eh1"]\n[schemas]\neh1 = "/nonexistent/eh1.json"\n')
    done = run_serve(config)
    assert done.returncode != 0 and "cannot read /nonexistent/eh1.json" in done.stderr, done.stderr
    config.write_text('event_hubs = ["eh1"]\n[schemas]\norders = "/s/orders.json"\n')
    done = run_serve(config)
    assert done.returncode != 0 and "schemas.orders: is not a served hub" in done.stderr, done.stderr


def only(value):
    """A schema that takes objects whose `v` is `value`."""
    return {"type": "object", "required": ["v"], "properties": {"v": {"const": value}}}


def test_sighup_swaps_the_schemas_under_a_flowing_stream_without_losing_an_event(api, start_gateway, tmp_path):
    gateway, files = start_with_schemas(start_gateway, tmp_path, {"eh1": only(1)})
    pb = api.pb
    run = uuid.uuid4().hex[:8]
    before = partition_positions(gateway.connection_string, "eh1")
    sent = []
    stop = threading.Event()

    def events():
        # v alternates, so every stretch of the stream shows which schema judged it.
        n = 0
        while not stop.is_set() and n < 5000:
            yield n, json_event(pb, {"v": 1 + n % 2, "n": n, "run": run}, partition_id="0")
            n += 1
            time.sleep(0.004)

    acks = []
    ending = []

    def read():
        responses = gateway.stub.SendStream(stream_requests(api, events(), sent=sent, hub="eh1"), timeout=120)
        got, error = collect_acks(responses)
        acks.extend(got)
        ending.append(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert wait_for(lambda: len(sent) >= 100, timeout=30), len(sent)

    # A reload that fails keeps the schema in use, names the file and is counted.
    files["eh1"].write_text('{"type": 7}')
    gateway.process.send_signal(signal.SIGHUP)
    name = "eventhub_gateway_schema_reloads_total"
    assert wait_for(lambda: sample(scrape(gateway)[0], name, outcome="failed") == 1, timeout=10), gateway.logs()
    assert wait_for(lambda: str(files["eh1"]) in gateway.logs(), timeout=5), gateway.logs()
    assert "schema reload failed" in gateway.logs()
    marker = len(sent)

    files["eh1"].write_text(json.dumps(only(2)))
    gateway.process.send_signal(signal.SIGHUP)
    assert wait_for(lambda: sample(scrape(gateway)[0], name, outcome="ok") == 1, timeout=10), gateway.logs()
    reloaded_at = len(sent)
    assert wait_for(lambda: len(sent) >= reloaded_at + 100, timeout=30), len(sent)
    stop.set()
    reader.join(timeout=60)
    assert not reader.is_alive(), "the stream did not end"
    assert ending == [None], ending

    # Every event sent is answered once, in a stream that never stopped.
    verdicts = {ack.sequence: ack.status.code == 0 for ack in acks}
    assert sorted(verdicts) == sorted(sent) == list(range(len(sent))), (len(verdicts), len(sent))
    # Judged by the old schema up to one point, by the new one from there on: each event by one schema whole.
    old = [verdicts[n] == (n % 2 == 0) for n in range(len(sent))]
    new = [verdicts[n] == (n % 2 == 1) for n in range(len(sent))]
    switch = next(n for n in range(len(sent)) if not old[n])
    assert all(old[:switch]) and all(new[switch:]), f"switch at {switch}: {[int(v) for v in verdicts.values()]}"
    assert marker <= switch <= reloaded_at + 1, (marker, switch, reloaded_at)
    for ack in acks:
        if ack.status.code != 0:
            check_error(result_status(api, ack.status), Code.INVALID_ARGUMENT, "SCHEMA_VIOLATION")

    # Every accepted event is stored, exactly once and in order.
    stored = read_since(gateway.connection_string, "eh1", before, timeout=60)
    numbers = [json.loads(body(event))["n"] for event in stored["0"]]
    assert numbers == sorted(n for n, ok in verdicts.items() if ok), numbers[:20]
