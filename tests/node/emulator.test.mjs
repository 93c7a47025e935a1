// The official JavaScript SDK (@azure/event-hubs, over rhea with SASL) against the emulator binary,
// and the emulator's key routing checked live against the SDK's own resolver.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { EventHubProducerClient, earliestEventPosition, latestEventPosition } from "@azure/event-hubs";
import { readPartition as readPartitionOf } from "./support.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const binary = process.env.EVENTHUB_GATEWAY_BIN ?? path.join(here, "..", "..", "target", "debug", "eventhub-gateway");
const require = createRequire(import.meta.url);
// The resolver is internal (not exported), so it is loaded from the installed package's files.
const { mapPartitionKeyToId } = require(
  path.join(here, "node_modules", "@azure", "event-hubs", "dist", "commonjs", "impl", "partitionKeyToIdMapper.js"),
);

let emulator;
let connectionString;

before(async () => {
  emulator = spawn(binary, ["emulator", "--listen", "127.0.0.1:0", "--event-hub", "eh1:4", "--event-hub", "wide:32"], {
    stdio: ["ignore", "pipe", "ignore"],
  });
  connectionString = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("no connection string within 15 s")), 15000);
    let buffered = "";
    emulator.stdout.on("data", (chunk) => {
      buffered += chunk;
      const newline = buffered.indexOf("\n");
      if (newline >= 0) {
        clearTimeout(timer);
        resolve(buffered.slice(0, newline).trim());
      }
    });
    emulator.on("exit", (code) => reject(new Error(`the emulator exited with ${code}`)));
  });
});

after(() => emulator?.kill("SIGTERM"));

const retryOptions = { maxRetries: 0, timeoutInMs: 10000 };

/** Reads `expected` events of one partition from `position`, bodies parsed as the SDK does by default. */
const readPartition = (hub, partitionId, expected, position = earliestEventPosition) =>
  readPartitionOf(connectionString, hub, partitionId, expected, position, 20000, { parseJsonBodies: true });

test("hub and partition properties", async () => {
  const producer = new EventHubProducerClient(connectionString, "eh1", { retryOptions });
  try {
    const hub = await producer.getEventHubProperties();
    assert.equal(hub.name, "eh1");
    assert.deepEqual(hub.partitionIds, ["0", "1", "2", "3"]);
    const partition = await producer.getPartitionProperties("3");
    assert.equal(partition.lastEnqueuedSequenceNumber, -1);
    assert.equal(partition.isEmpty, true);
  } finally {
    await producer.close();
  }
});

test("batches round-trip with their properties", async () => {
  const producer = new EventHubProducerClient(connectionString, "eh1", { retryOptions });
  try {
    await producer.sendBatch(
      [
        { body: "first", properties: { n: 1, tag: "a" }, contentType: "text/plain", messageId: "m-1", correlationId: "c-1" },
        { body: { json: true } },
      ],
      { partitionId: "2" },
    );
  } finally {
    await producer.close();
  }
  const events = await readPartition("eh1", "2", 2);
  assert.deepEqual(events.map((e) => e.sequenceNumber), [0, 1]);
  assert.equal(events[0].body, "first");
  assert.deepEqual(events[0].properties, { n: 1, tag: "a" });
  assert.equal(events[0].contentType, "text/plain");
  assert.equal(events[0].messageId, "m-1");
  assert.equal(events[0].correlationId, "c-1");
  assert.deepEqual(events[1].body, { json: true });
  assert.ok(events[1].offset > events[0].offset);
});

test("keys land on the partition the SDK's own resolver names", async () => {
  let seed = 42;
  const random = () => (seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648;
  const alphabets = ["abcdefghijklmnopqrstuvwxyz0123456789-_:", "éèçàüöñ", "東京大阪日本語", "🚀🎉🔥", "привет"];
  const keys = Array.from({ length: 120 }, (_, i) => {
    const alphabet = [...alphabets[i % alphabets.length]];
    const length = 1 + Math.floor(random() * (i % 10 === 0 ? 200 : 20));
    return Array.from({ length }, () => alphabet[Math.floor(random() * alphabet.length)]).join("") + i;
  });
  const producer = new EventHubProducerClient(connectionString, "wide", { retryOptions });
  const expected = new Map();
  try {
    for (const key of keys) {
      const batch = await producer.createBatch({ partitionKey: key });
      assert.ok(batch.tryAdd({ body: key }));
      await producer.sendBatch(batch);
      const partition = String(mapPartitionKeyToId(key, 32));
      expected.set(partition, [...(expected.get(partition) ?? []), key]);
    }
  } finally {
    await producer.close();
  }
  const reads = [...expected].map(async ([partition, partitionKeys]) => {
    const events = await readPartition("wide", partition, partitionKeys.length);
    assert.deepEqual(events.map((e) => e.partitionKey).sort(), [...partitionKeys].sort(), `partition ${partition}`);
    for (const event of events) assert.equal(event.body, event.partitionKey);
  });
  await Promise.all(reads);
});

test("a consumer at the latest position sees only later events", async () => {
  const producer = new EventHubProducerClient(connectionString, "eh1", { retryOptions });
  try {
    await producer.sendBatch([{ body: "before" }], { partitionId: "1" });
    const reading = readPartition("eh1", "1", 1, latestEventPosition);
    await new Promise((resolve) => setTimeout(resolve, 1500));
    await producer.sendBatch([{ body: "after" }], { partitionId: "1" });
    const events = await reading;
    assert.deepEqual(events.map((e) => e.body), ["after"]);
  } finally {
    await producer.close();
  }
});

test("a wrong key is refused as unauthorized", async () => {
  const wrong = connectionString.replace("SharedAccessKey=SAS_KEY_VALUE", "SharedAccessKey=bm90IHRoZSBrZXk=");
  const producer = new EventHubProducerClient(wrong, "eh1", { retryOptions });
  try {
    await assert.rejects(producer.sendBatch([{ body: "nope" }]), (err) => err.code === "UnauthorizedError");
  } finally {
    await producer.close();
  }
});

test("an unknown hub is not found", async () => {
  const producer = new EventHubProducerClient(connectionString, "nope", { retryOptions });
  try {
    await assert.rejects(producer.getEventHubProperties(), (err) => err.code === "MessagingEntityNotFoundError");
  } finally {
    await producer.close();
  }
});
