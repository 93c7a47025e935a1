"""Validation like Event Hubs: an event the service would refuse is refused alone at the gateway, with the rule
named, and the events of other clients that would have shared its batch are stored, read back with the official
`azure-eventhub` consumer."""

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc

from gateway_client import (
    CALL_TIMEOUT,
    body,
    call_status,
    check_error,
    collect_acks,
    partition_positions,
    read_since,
    result_status,
    stream_requests,
)

Code = grpc.StatusCode

# name: (fields of the poison event, the field named, the rule named)
POISONS = {
    "too many properties": (
        lambda: {"properties": {f"p{n}": "" for n in range(32_769)}}, "event.properties", "max_properties"
    ),
    "a property too large": (
        lambda: {"properties": {"huge": "v" * 40_000}}, "event.properties", "max_property_bytes"
    ),
    "properties too large together": (
        lambda: {"properties": {f"p{n}": "v" * 20_000 for n in range(4)}}, "event.properties",
        "max_properties_bytes",
    ),
    "a long message id": (lambda: {"message_id": "m" * 129}, "event.message_id", "max_message_id_chars"),
    "a long correlation id": (
        lambda: {"correlation_id": "c" * 129}, "event.correlation_id", "max_correlation_id_chars"
    ),
    "a non-ASCII content type": (
        lambda: {"content_type": "tëxt/plain"}, "event.content_type", "content_type_ascii"
    ),
}


def test_poison_events_fail_alone_naming_the_rule_and_every_batch_mate_is_stored(api, start_gateway):
    # Batches gather for 50 ms, so each poison event would share one with many other clients' events.
    gateway = start_gateway(
        "--emulator", "--event-hub", "eh1", "--emulator-partitions", "4",
        env={"EVENTHUB_GATEWAY_PRODUCER__LINGER_MS": "50"},
    )
    pb = api.pb
    run = uuid.uuid4().hex[:12]
    before = partition_positions(gateway.connection_string, "eh1")
    clients, per_client = 20, 40
    running = threading.Event()

    def normal_client(index):
        # Its own channel: another client of the gateway.
        channel = grpc.insecure_channel(gateway.address)
        stub = api.grpc.EventHubGatewayStub(channel)
        failed = []
        running.set()
        for n in range(per_client):
            request = pb.SendEventRequest(event=pb.Event(text=f"{run}:{index}:{n}"))
            try:
                stub.SendEvent(request, timeout=CALL_TIMEOUT)
            except grpc.RpcError as error:
                failed.append(f"{error.code()} {error.details()}")
        channel.close()
        return failed

    def poison_client():
        running.wait(10)
        answers = {}
        for name, (fields, _, _) in POISONS.items():
            time.sleep(0.05)
            request = pb.SendEventRequest(event=pb.Event(text=f"poison:{run}:{name}", **fields()))
            try:
                gateway.stub.SendEvent(request, timeout=CALL_TIMEOUT)
                answers[name] = None
            except grpc.RpcError as error:
                answers[name] = error
        return answers

    with ThreadPoolExecutor(max_workers=clients + 1) as pool:
        normal = [pool.submit(normal_client, index) for index in range(clients)]
        poison = pool.submit(poison_client)
        failed = [failure for future in normal for failure in future.result()]
        answers = poison.result()
    total = clients * per_client
    assert not failed, f"{len(failed)} of {total} batch-mates failed, e.g. {failed[0]}"


    for name, (_, field, rule) in POISONS.items():
        error = answers[name]
        assert error is not None, f"{name}: accepted"
        rich = check_error(call_status(api, error), Code.INVALID_ARGUMENT, "INVALID_EVENT")
        assert rich.fields == [field], (name, rich)
        assert rich.error_info.metadata["rule"] == rule, (name, rich.error_info)
        description = rich.bad_request.field_violations[0].description
        assert rule in description and rich.error_info.metadata["limit"] in description, (name, description)

    stored = read_since(gateway.connection_string, "eh1", before)
    bodies = sorted(body(event).decode() for events in stored.values() for event in events)
    expected = sorted(f"{run}:{index}:{n}" for index in range(clients) for n in range(per_client))
    assert bodies == expected, "every normal event stored once, no poison event stored"


def test_a_send_events_request_answers_each_rule_breaker_alone(api, gateway):
    pb = api.pb
    run = uuid.uuid4().hex[:12]
    before = partition_positions(gateway.connection_string, "eh1")
    events = []
    for name, (fields, _, _) in POISONS.items():
        events.append(pb.Event(text=f"{run}:ok:{name}"))
        events.append(pb.Event(text=f"{run}:poison:{name}", **fields()))
    results = gateway.stub.SendEvents(pb.SendEventsRequest(events=events), timeout=CALL_TIMEOUT).results
    for index, (name, (_, field, rule)) in enumerate(POISONS.items()):
        assert results[2 * index].status.code == 0, (name, result_status(api, results[2 * index].status))
        rich = check_error(result_status(api, results[2 * index + 1].status), Code.INVALID_ARGUMENT, "INVALID_EVENT")
        assert rich.fields == [field.replace("event.", f"events[{2 * index + 1}].")], (name, rich)
        assert rich.error_info.metadata["rule"] == rule, (name, rich.error_info)
    stored = read_since(gateway.connection_string, "eh1", before)
    bodies = sorted(body(event).decode() for events in stored.values() for event in events)
    assert bodies == sorted(f"{run}:ok:{name}" for name in POISONS)


def test_a_stream_nacks_each_rule_breaker_alone_and_acks_the_rest(api, gateway):
    pb = api.pb
    run = uuid.uuid4().hex[:12]
    before = partition_positions(gateway.connection_string, "eh1")
    events, poisons = [], {}
    for name, (fields, field, rule) in POISONS.items():
        events.append((len(events), pb.Event(text=f"{run}:ok:{name}")))
        poisons[len(events)] = (field, rule)
        events.append((len(events), pb.Event(text=f"{run}:poison:{name}", **fields())))
    acks, error = collect_acks(gateway.stub.SendStream(stream_requests(api, events), timeout=CALL_TIMEOUT))
    assert error is None, error
    by_sequence = {ack.sequence: ack for ack in acks}
    assert sorted(by_sequence) == list(range(len(events)))
    for sequence, ack in by_sequence.items():
        if sequence not in poisons:
            assert ack.status.code == 0, (sequence, result_status(api, ack.status))
            continue
        field, rule = poisons[sequence]
        rich = check_error(result_status(api, ack.status), Code.INVALID_ARGUMENT, "INVALID_EVENT")
        assert rich.fields == [field] and rich.error_info.metadata["rule"] == rule, rich
    stored = read_since(gateway.connection_string, "eh1", before)
    bodies = sorted(body(event).decode() for events in stored.values() for event in events)
    assert bodies == sorted(f"{run}:ok:{name}" for name in POISONS)
