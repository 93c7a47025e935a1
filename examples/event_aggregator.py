#!/usr/bin/env python3
"""The pooled producer's `EventAggregator` pattern through eventhub-gateway: events collect in memory and go out
every `batch_size` with `asyncio.gather` over one `send_event` per event. Only the import and the constructor
differ from the pooled producer's version; here the gateway client packs the gathered calls into a few
messages of one stream instead of one transfer each.

    python examples/event_aggregator.py [--target HOST:PORT] [--hub NAME] [--count N] [--batch-size N]

Prints one JSON line: {"sent": N, "failed": M, "message_ids": [...]}.
"""

import argparse
import asyncio
import json

from eventhub_gateway import GatewayProducer  # was: from ... import ManagedAzureEventhubProducer


class EventAggregator:
    """Collects events and sends each full batch concurrently."""

    def __init__(self, producer, batch_size=100):
        self.producer = producer
        self.batch_size = batch_size
        self.events = []
        self.sent = []
        self.failed = 0

    async def add(self, event):
        self.events.append(event)
        if len(self.events) >= self.batch_size:
            await self.flush()

    async def flush(self):
        events, self.events = self.events, []
        outcomes = await asyncio.gather(
            *[self.producer.send_event(json.dumps(event)) for event in events], return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                self.failed += 1
            else:
                self.sent.append(outcome.message_id)


async def main(args):
    # was: ManagedAzureEventhubProducer(eventhub_namespace=..., eventhub_name=args.hub, credential_factory=...)
    async with GatewayProducer(args.target, args.hub) as producer:
        aggregator = EventAggregator(producer, batch_size=args.batch_size)
        for number in range(args.count):
            await aggregator.add({"kind": "metric", "number": number, "value": number * 0.5})
        await aggregator.flush()
    print(json.dumps({"sent": len(aggregator.sent), "failed": aggregator.failed, "message_ids": aggregator.sent}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--hub", default=None)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    asyncio.run(main(parser.parse_args()))
