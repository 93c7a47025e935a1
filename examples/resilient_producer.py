#!/usr/bin/env python3
"""The pooled producer's `ResilientEventProducer` pattern through eventhub-gateway: a wrapper that retries a
failed `send_event` with exponential backoff. Only the import and the constructor differ from the pooled
producer's version. The client already retries what the gateway calls retryable until `send_timeout`; the
wrapper now sees only what is left (and stops at once on errors that cannot succeed, via `retryable`).

    python examples/resilient_producer.py [--target HOST:PORT] [--hub NAME] [--count N]

Prints one JSON line: {"sent": N, "failed": M, "message_ids": [...], "errors": [...]}.
"""

import argparse
import asyncio
import json
import random

from eventhub_gateway import GatewayError, GatewayProducer  # was: ManagedAzureEventhubProducer


class ResilientEventProducer:
    """`send_event` with up to `attempts` tries and exponential backoff between them."""

    def __init__(self, producer, attempts=3, backoff=0.2):
        self.producer = producer
        self.attempts = attempts
        self.backoff = backoff

    async def send_event(self, data, partition_key=None):
        for attempt in range(1, self.attempts + 1):
            try:
                return await self.producer.send_event(data, partition_key=partition_key)
            except GatewayError as error:
                if not error.retryable or attempt == self.attempts:
                    raise
                await asyncio.sleep(max(error.retry_after or 0, self.backoff * 2 ** (attempt - 1) * random.random()))


async def main(args):
    # was: ManagedAzureEventhubProducer(eventhub_namespace=..., eventhub_name=args.hub, credential_factory=...)
    async with GatewayProducer(args.target, args.hub) as producer:
        resilient = ResilientEventProducer(producer)
        sent, errors = [], []
        for number in range(args.count):
            # Every tenth event names a partition the hub does not have: refused at once, never retried.
            partition_key = f"order-{number}"
            try:
                if number % 10 == 9:
                    await producer.send_event(json.dumps({"order": number}), partition_id="no-such-partition")
                else:
                    sent.append((await resilient.send_event(json.dumps({"order": number}), partition_key)).message_id)
            except GatewayError as error:
                errors.append(f"{type(error).__name__}: {error.field}")
    print(json.dumps({"sent": len(sent), "failed": len(errors), "message_ids": sent, "errors": sorted(set(errors))}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--hub", default=None)
    parser.add_argument("--count", type=int, default=100)
    asyncio.run(main(parser.parse_args()))
