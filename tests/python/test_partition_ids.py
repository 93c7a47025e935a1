"""The partition id the gateway answers for a keyed event (SendEvent, SendEvents results, SendStream acks) is the
partition the event is stored in, as the official Python consumer reads it back, and the one the official
resolver's vectors name."""

import json
import pathlib
import uuid

from gateway_client import CALL_TIMEOUT, body, collect_acks, partition_positions, read_since, stream_requests

VECTORS = json.loads((pathlib.Path(__file__).parents[1] / "data" / "partition-key-vectors.json").read_text())
PARTITIONS = 8


def pick_keys():
    """Keys of every kind: ASCII, non-ASCII (accented, CJK, emoji, Cyrillic), long."""
    cases = [case for case in VECTORS["cases"] if case["key"]]
    ascii_keys = [c for c in cases if c["key"].isascii()][:5]
    non_ascii = [c for c in cases if not c["key"].isascii()][:6]
    long_keys = [c for c in cases if c["utf8_len"] > 200][:1]
    return ascii_keys + non_ascii + long_keys


def test_keyed_events_are_answered_with_the_partition_they_are_stored_in(api, start_gateway):
    gateway = start_gateway("--emulator", "--event-hub", "keyed", "--emulator-partitions", str(PARTITIONS))
    pb = api.pb
    run = uuid.uuid4().hex[:12]
    keys = pick_keys()
    assert len({str(case["partition"][str(PARTITIONS)]) for case in keys}) > 1, "the keys spread over partitions"
    before = partition_positions(gateway.connection_string, "keyed")
    answered = {}
    for index, case in enumerate(keys):
        event = pb.Event(text=f"{run}:unary:{index}", partition_key=case["key"])
        response = gateway.stub.SendEvent(pb.SendEventRequest(event=event), timeout=CALL_TIMEOUT)
        answered[event.text] = response.partition_id
    batch = [pb.Event(text=f"{run}:batch:{index}", partition_key=case["key"]) for index, case in enumerate(keys)]
    results = gateway.stub.SendEvents(pb.SendEventsRequest(events=batch), timeout=CALL_TIMEOUT).results
    for event, result in zip(batch, results, strict=True):
        assert result.status.code == 0, result.status
        answered[event.text] = result.partition_id
    streamed = [(index + 1, pb.Event(text=f"{run}:stream:{index}", partition_key=case["key"]))
                for index, case in enumerate(keys)]
    acks, ended = collect_acks(gateway.stub.SendStream(stream_requests(api, streamed), timeout=CALL_TIMEOUT))
    assert ended is None, ended
    by_sequence = {ack.sequence: ack for ack in acks}
    for sequence, event in streamed:
        assert by_sequence[sequence].status.code == 0, by_sequence[sequence].status
        answered[event.text] = by_sequence[sequence].partition_id

    stored = {}
    for partition, events in read_since(gateway.connection_string, "keyed", before).items():
        for event in events:
            stored[body(event).decode()] = partition
    assert len(stored) == 3 * len(keys)
    assert answered == stored, "every answered partition id is where the consumer found the event"
    for index, case in enumerate(keys):
        resolved = str(case["partition"][str(PARTITIONS)])
        for rpc in ("unary", "batch", "stream"):
            assert answered[f"{run}:{rpc}:{index}"] == resolved, (rpc, case["key"])
