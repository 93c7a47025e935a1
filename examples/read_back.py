"""Reads every event stored in an Event Hub with the official Python SDK and prints a summary.

Usage: python read_back.py CONNECTION_STRING HUB
Stops when no event has arrived for two seconds.
"""

import collections
import sys
import threading
import time

from azure.eventhub import EventHubConsumerClient


def main(connection_string: str, hub: str) -> None:
    per_partition = collections.Counter()
    samples = []
    last_event = [time.monotonic()]
    consumer = EventHubConsumerClient.from_connection_string(
        connection_string, consumer_group="$Default", eventhub_name=hub
    )

    def on_event(partition_context, event):
        if event is None:
            return
        last_event[0] = time.monotonic()
        per_partition[partition_context.partition_id] += 1
        if len(samples) < 3:
            samples.append(event.body_as_str())

    worker = threading.Thread(
        target=consumer.receive,
        kwargs={"on_event": on_event, "starting_position": "-1", "max_wait_time": 0.5},
        daemon=True,
    )
    worker.start()
    while time.monotonic() - last_event[0] < 2:
        time.sleep(0.2)
    consumer.close()
    print(f"{sum(per_partition.values())} events in {hub}: " + ", ".join(
        f"partition {partition}: {count}" for partition, count in sorted(per_partition.items())
    ))
    for body in samples:
        print(f"  e.g. {body!r}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
