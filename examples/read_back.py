"""Reads every event stored in an Event Hub with the official Python SDK and prints a summary.

Usage: python read_back.py CONNECTION_STRING HUB
Reads each partition from its start until no event has arrived for a second.
"""

import sys
import threading
import time

from azure.eventhub import EventHubConsumerClient


def read_partition(connection_string: str, hub: str, partition_id: str) -> list:
    events = []
    last_event = [time.monotonic()]
    consumer = EventHubConsumerClient.from_connection_string(
        connection_string, consumer_group="$Default", eventhub_name=hub
    )

    def on_event(_context, event):
        if event is not None:
            last_event[0] = time.monotonic()
            events.append(event.body_as_str())

    worker = threading.Thread(
        target=consumer.receive,
        kwargs={"on_event": on_event, "partition_id": partition_id, "starting_position": "-1"},
        daemon=True,
    )
    worker.start()
    while time.monotonic() - last_event[0] < 1:
        time.sleep(0.1)
    consumer.close()
    return events


def main(connection_string: str, hub: str) -> None:
    with EventHubConsumerClient.from_connection_string(
        connection_string, consumer_group="$Default", eventhub_name=hub
    ) as client:
        partition_ids = client.get_partition_ids()
    per_partition = {partition: read_partition(connection_string, hub, partition) for partition in partition_ids}
    total = sum(len(events) for events in per_partition.values())
    print(f"{total} events in {hub}: " + ", ".join(
        f"partition {partition}: {len(events)}" for partition, events in per_partition.items()
    ))
    for partition, events in per_partition.items():
        if events:
            print(f"  partition {partition} starts with {events[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
