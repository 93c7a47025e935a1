"""Consumers start where their position says and see sequence numbers as the service stamps them."""

import datetime
import threading
import time

from azure.eventhub import EventData, EventHubConsumerClient

from conftest import producer, read_partition


def send(connection_string, hub, bodies, partition_id="0"):
    with producer(connection_string, hub) as client:
        batch = client.create_batch(partition_id=partition_id)
        for body in bodies:
            batch.add(EventData(body))
        client.send_batch(batch)


def test_from_the_start_sequence_numbers_are_consecutive_and_offsets_grow(start_emulator):
    running = start_emulator("--event-hub", "c:1")
    send(running.connection_string, "c", [f"a{n}" for n in range(5)])
    send(running.connection_string, "c", [f"b{n}" for n in range(5)])
    events = read_partition(running.connection_string, "c", "0", 10)
    assert [e.sequence_number for e in events] == list(range(10))
    offsets = [int(e.offset) for e in events]
    assert offsets == sorted(set(offsets)) and offsets[0] == 0


def test_from_an_offset_exclusive_and_inclusive(start_emulator):
    running = start_emulator("--event-hub", "c:1")
    send(running.connection_string, "c", [f"e{n}" for n in range(6)])
    everything = read_partition(running.connection_string, "c", "0", 6)
    third = everything[2]
    after = read_partition(running.connection_string, "c", "0", 3, starting_position=third.offset)
    assert [e.sequence_number for e in after] == [3, 4, 5]
    including = read_partition(
        running.connection_string, "c", "0", 4, starting_position=third.offset, starting_position_inclusive=True
    )
    assert [e.sequence_number for e in including] == [2, 3, 4, 5]


def test_from_a_sequence_number_and_from_an_enqueued_time(start_emulator):
    running = start_emulator("--event-hub", "c:1")
    send(running.connection_string, "c", ["old"])
    time.sleep(0.05)
    cut = datetime.datetime.now(datetime.timezone.utc)
    time.sleep(0.05)
    send(running.connection_string, "c", ["new 1", "new 2"])
    by_sequence = read_partition(running.connection_string, "c", "0", 2, starting_position=0)
    assert [e.body_as_str() for e in by_sequence] == ["new 1", "new 2"]
    by_time = read_partition(running.connection_string, "c", "0", 2, starting_position=cut)
    assert [e.body_as_str() for e in by_time] == ["new 1", "new 2"]


def test_from_latest_sees_only_later_events(start_emulator):
    running = start_emulator("--event-hub", "c:1")
    send(running.connection_string, "c", ["before"])
    consumer = EventHubConsumerClient.from_connection_string(
        running.connection_string, consumer_group="$Default", eventhub_name="c"
    )
    received, started = [], threading.Event()

    def on_event(_context, event):
        started.set()
        if event is not None:
            received.append(event.body_as_str())

    worker = threading.Thread(
        target=consumer.receive,
        kwargs={"on_event": on_event, "partition_id": "0", "starting_position": "@latest", "max_wait_time": 0.2},
        daemon=True,
    )
    worker.start()
    assert started.wait(15), "the consumer is attached (its first empty callback arrived)"
    send(running.connection_string, "c", ["after"])
    deadline = time.monotonic() + 15
    while not received and time.monotonic() < deadline:
        time.sleep(0.05)
    consumer.close()
    worker.join(timeout=10)
    assert received == ["after"]


def test_another_consumer_group_reads_too(start_emulator):
    running = start_emulator("--event-hub", "g:1:analytics")
    send(running.connection_string, "g", ["x"])
    events = read_partition(running.connection_string, "g", "0", 1, consumer_group="analytics")
    assert [e.body_as_str() for e in events] == ["x"]
