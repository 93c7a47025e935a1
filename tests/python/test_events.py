"""What an event carries survives the trip, and size limits hold."""

import pytest
from azure.eventhub import EventData
from azure.eventhub.exceptions import EventDataSendError, EventHubError

from conftest import producer, read_partition


def test_properties_and_bodies_round_trip(start_emulator):
    running = start_emulator("--event-hub", "rt:1")
    binary = bytes(range(256))
    event = EventData(binary)
    event.properties = {"text": "héllo", "count": 42, "ratio": 0.5, "flag": True, "raw": b"\x00\x01"}
    event.content_type = "application/octet-stream"
    event.message_id = "msg-1"
    event.correlation_id = "corr-1"
    json_event = EventData('{"a": [1, 2]}')
    json_event.content_type = "application/json"
    with producer(running.connection_string, "rt") as client:
        client.send_batch([event, json_event])
    received = read_partition(running.connection_string, "rt", "0", 2)
    first, second = received
    assert b"".join(first.body) == binary
    properties = {k.decode() if isinstance(k, bytes) else k: v for k, v in first.properties.items()}
    assert properties["text"] in ("héllo", "héllo".encode())
    assert properties["count"] == 42
    assert properties["ratio"] == 0.5
    assert properties["flag"] is True
    assert properties["raw"] == b"\x00\x01"
    assert first.content_type == "application/octet-stream"
    assert first.message_id == "msg-1"
    assert first.correlation_id == "corr-1"
    assert second.body_as_json() == {"a": [1, 2]}
    assert second.content_type == "application/json"


def test_a_batch_filled_to_the_sdk_limit_is_accepted(start_emulator):
    running = start_emulator("--event-hub", "full:1")
    with producer(running.connection_string, "full") as client:
        batch = client.create_batch()
        assert batch.max_size_in_bytes == 1048576, "the SDK reads the limit the emulator announces"
        count = 0
        with pytest.raises(ValueError):
            while True:
                batch.add(EventData(b"x" * 1000))
                count += 1
        assert count > 900
        client.send_batch(batch)
        assert client.get_partition_properties("0")["last_enqueued_sequence_number"] == count - 1


def test_the_sdk_follows_a_smaller_announced_limit(start_emulator):
    running = start_emulator("--event-hub", "tiny:1", "--max-message-size", "65536")
    with producer(running.connection_string, "tiny") as client:
        assert client.create_batch().max_size_in_bytes == 65536


def test_an_oversize_event_is_refused(start_emulator):
    running = start_emulator("--event-hub", "big:1")
    with producer(running.connection_string, "big", retry_total=0) as client:
        with pytest.raises((EventDataSendError, EventHubError, ValueError)):
            client.send_event(EventData(b"x" * (2 * 1024 * 1024)))
        assert client.get_partition_properties("0")["is_empty"] is True
