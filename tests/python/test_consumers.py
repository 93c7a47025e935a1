"""Consumers start where their position says and see sequence numbers as the service stamps them."""

import asyncio
import collections
import datetime
import threading
import time

import pytest
from azure.eventhub import EventData, EventHubConsumerClient
from azure.eventhub.aio import EventHubConsumerClient as AsyncEventHubConsumerClient

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


# Load-balancing mode (no partition_id): the client claims every partition and runs one consumer per partition.
# The synchronous client polls its consumers in turn, hands out one event per consumer per turn, and waits its
# socket timeout (pyamqp: 0.2 s) on every consumer whose partition has nothing new, whatever the peer does (an
# idle receiver link gets no frames). So with one busy partition of four it reads ~1 event per 0.6 s against any
# service, while with every partition busy it reads at full speed. These tests assert completeness within a
# generous bound, not speed.


def sequence_numbers_by_partition(events):
    by_partition = collections.defaultdict(list)
    for partition_id, event in events:
        by_partition[partition_id].append(event.sequence_number)
    return dict(by_partition)


@pytest.mark.parametrize("owner_level", [None, 0])
def test_a_load_balancing_consumer_reads_every_partition(start_emulator, owner_level):
    running = start_emulator("--event-hub", "lb:4")
    per_partition = 25
    with producer(running.connection_string, "lb") as client:
        for partition_id in "0123":
            batch = client.create_batch(partition_id=partition_id)
            for n in range(per_partition):
                batch.add(EventData(f"{partition_id}-{n}"))
            client.send_batch(batch)
    consumer = EventHubConsumerClient.from_connection_string(
        running.connection_string, consumer_group="$Default", eventhub_name="lb"
    )
    received, done = [], threading.Event()

    def on_event(context, event):
        if event is not None:
            received.append((context.partition_id, event))
            if len(received) >= 4 * per_partition:
                done.set()

    options = {} if owner_level is None else {"owner_level": owner_level}
    worker = threading.Thread(
        target=consumer.receive, kwargs={"on_event": on_event, "starting_position": "-1", **options}, daemon=True
    )
    worker.start()
    done.wait(15)
    consumer.close()
    worker.join(timeout=10)
    assert sequence_numbers_by_partition(received) == {p: list(range(per_partition)) for p in "0123"}
    assert all(event.body_as_str().startswith(f"{p}-") for p, event in received)


def test_an_async_load_balancing_consumer_reads_a_busy_partition_next_to_idle_ones(start_emulator):
    """The reported case (every event in one partition of four) with the async client, which serves its partition
    consumers concurrently: the emulator answers the busy partition's credit with every stored event at once."""
    running = start_emulator("--event-hub", "lb:4")
    count = 100
    send(running.connection_string, "lb", [f"e{n}" for n in range(count)], "0")

    async def read_all():
        consumer = AsyncEventHubConsumerClient.from_connection_string(
            running.connection_string, consumer_group="$Default", eventhub_name="lb"
        )
        received, done = [], asyncio.Event()

        async def on_event(context, event):
            if event is not None:
                received.append((context.partition_id, event))
                if len(received) >= count:
                    done.set()

        task = asyncio.create_task(consumer.receive(on_event=on_event, starting_position="-1"))
        try:
            await asyncio.wait_for(done.wait(), 15)
        except asyncio.TimeoutError:
            pass
        await consumer.close()
        # receive() itself returns only after the load-balancing interval (30 s) it sleeps between rounds.
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return received

    received = asyncio.run(read_all())
    assert sequence_numbers_by_partition(received) == {"0": list(range(count))}
