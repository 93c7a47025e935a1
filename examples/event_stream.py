#!/usr/bin/env python3
"""The pooled producer's `EventStream` pattern through eventhub-gateway: producers put events on an asyncio queue,
a few workers take them off and each awaits its own `send_event`. Only the import and the constructor differ
from the pooled producer's version.

    python examples/event_stream.py [--target HOST:PORT] [--hub NAME] [--count N] [--workers N]

Prints one JSON line: {"sent": N, "failed": M, "message_ids": [...]}.
"""

import argparse
import asyncio
import json

from eventhub_gateway import GatewayProducer  # was: from ... import ManagedAzureEventhubProducer


class EventStream:
    """A bounded queue of events drained by `workers` tasks into one producer."""

    def __init__(self, producer, workers=8, max_queued=1000):
        self.producer = producer
        self.queue = asyncio.Queue(maxsize=max_queued)
        self.sent = []
        self.failed = 0
        self.workers = [asyncio.create_task(self._work()) for _ in range(workers)]

    async def publish(self, event, partition_key=None):
        await self.queue.put((event, partition_key))

    async def _work(self):
        while True:
            event, partition_key = await self.queue.get()
            try:
                receipt = await self.producer.send_event(json.dumps(event), partition_key=partition_key)
                self.sent.append(receipt.message_id)
            except Exception:  # noqa: BLE001 - counted, as the pooled producer's example does
                self.failed += 1
            finally:
                self.queue.task_done()

    async def close(self):
        await self.queue.join()
        for worker in self.workers:
            worker.cancel()


async def main(args):
    # was: ManagedAzureEventhubProducer(eventhub_namespace=..., eventhub_name=args.hub, credential_factory=...)
    async with GatewayProducer(args.target, args.hub) as producer:
        stream = EventStream(producer, workers=args.workers)
        for number in range(args.count):
            await stream.publish({"kind": "click", "number": number}, partition_key=f"user-{number % 10}")
        await stream.close()
    print(json.dumps({"sent": len(stream.sent), "failed": stream.failed, "message_ids": stream.sent}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--hub", default=None)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=8)
    asyncio.run(main(parser.parse_args()))
