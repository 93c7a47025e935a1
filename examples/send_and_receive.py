"""Sends a few events to an Event Hub with the official Python SDK and reads them back.

Usage: python send_and_receive.py CONNECTION_STRING HUB
Works unchanged against Azure Event Hubs and against `eventhub-gateway emulator`.
"""

import sys
import threading

from azure.eventhub import EventData, EventHubConsumerClient, EventHubProducerClient


def main(connection_string: str, hub: str) -> None:
    with EventHubProducerClient.from_connection_string(connection_string, eventhub_name=hub) as producer:
        properties = producer.get_eventhub_properties()
        print(f"hub {properties['eventhub_name']} with partitions {properties['partition_ids']}")
        for customer in ("alice", "bob", "carol"):
            batch = producer.create_batch(partition_key=customer)
            for n in range(3):
                batch.add(EventData(f"order {n} of {customer}"))
            producer.send_batch(batch)
        print("sent 9 events under 3 partition keys")

    received = []
    done = threading.Event()
    consumer = EventHubConsumerClient.from_connection_string(
        connection_string, consumer_group="$Default", eventhub_name=hub
    )

    def on_event(partition_context, event):
        if event is None:
            return
        received.append((partition_context.partition_id, event.sequence_number, event.partition_key, event.body_as_str()))
        if len(received) >= 9:
            done.set()

    worker = threading.Thread(
        target=consumer.receive, kwargs={"on_event": on_event, "starting_position": "-1"}, daemon=True
    )
    worker.start()
    done.wait(timeout=30)
    consumer.close()
    for partition, sequence_number, key, body in sorted(received):
        print(f"partition {partition} #{sequence_number} key={key.decode() if key else None}: {body}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
