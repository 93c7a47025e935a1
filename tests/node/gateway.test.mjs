// The gRPC gateway end to end: @grpc/grpc-js with the contract loaded from proto/ at run time, against
// `eventhub-gateway serve --emulator`, every event read back with the official @azure/event-hubs consumer.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import grpc from "@grpc/grpc-js";
import { earliestEventPosition } from "@azure/event-hubs";
import {
  callStatus,
  deadline,
  detail,
  gatewayClient,
  mapPartitionKeyToId,
  metadata,
  partitionEnds,
  rawSendStream,
  readHub,
  readPartition,
  sdkSendWithKey,
  SendStreamRequest,
  startGateway,
  unary,
  sleep,
  unpackStatus,
  waitServing,
  within,
} from "./support.mjs";

const DOMAIN = "eventhub-gateway";
const PARTITIONS = ["0", "1", "2", "3"];

let gateway;
let client;

before(async () => {
  gateway = await startGateway(["--emulator", "--listen", "127.0.0.1:0", "--event-hub", "eh1", "--event-hub", "eh2"]);
  client = gatewayClient(gateway.grpc);
  // Readiness, not an assertion (the health test asserts): the producer connects after start.
  await waitServing(gateway.grpc, "eventhub.gateway.v1.EventHubGateway", 30000);
});

after(async () => {
  client?.close();
  await gateway?.stop(5000);
});

/** Reads the `expected` events that `hub`/`partitionId` got after its last sequence number was `last`. */
function readAfter(hub, partitionId, last, expected) {
  const position = last < 0 ? earliestEventPosition : { sequenceNumber: last, isInclusive: false };
  return readPartition(gateway.emulator, hub, partitionId, expected, position);
}

/** The partition's last enqueued sequence number now. */
async function lastSequence(hub, partitionId) {
  return (await partitionEnds(gateway.emulator, hub))[partitionId];
}

/** Asserts the ErrorInfo of an unpacked status and returns it. */
function assertErrorInfo(status, code, reason) {
  assert.equal(status.code, code, `status ${JSON.stringify(status)}`);
  const info = detail(status, "google.rpc.ErrorInfo");
  assert.ok(info, `no ErrorInfo in ${JSON.stringify(status)}`);
  assert.equal(info.domain, DOMAIN);
  assert.equal(info.reason, reason);
  return info;
}

/** Asserts an INVALID_ARGUMENT / INVALID_EVENT status whose BadRequest names `field`. */
function assertInvalidEvent(status, field) {
  assertErrorInfo(status, grpc.status.INVALID_ARGUMENT, "INVALID_EVENT");
  const badRequest = detail(status, "google.rpc.BadRequest");
  assert.ok(badRequest, `no BadRequest in ${JSON.stringify(status)}`);
  assert.equal(badRequest.field_violations.length, 1, JSON.stringify(badRequest));
  const [violation] = badRequest.field_violations;
  if (Array.isArray(field)) assert.ok(field.includes(violation.field), `field ${violation.field}, expected one of ${field}`);
  else assert.equal(violation.field, field);
  assert.ok(violation.description.length > 0, "the violation describes the rule");
}

/** A google.protobuf.Struct of a plain JSON object, as proto-loader takes it. */
function struct(object) {
  const value = (v) => {
    if (v === null) return { nullValue: "NULL_VALUE" };
    if (typeof v === "number") return { numberValue: v };
    if (typeof v === "string") return { stringValue: v };
    if (typeof v === "boolean") return { boolValue: v };
    if (Array.isArray(v)) return { listValue: { values: v.map(value) } };
    return { structValue: struct(v) };
  };
  return { fields: Object.fromEntries(Object.entries(object).map(([k, v]) => [k, value(v)])) };
}

test("health reports SERVING for the server and for EventHubGateway", { timeout: 65000 }, async () => {
  assert.equal(await waitServing(gateway.grpc, "", 30000), "SERVING");
  assert.equal(await waitServing(gateway.grpc, "eventhub.gateway.v1.EventHubGateway", 30000), "SERVING");
});

test("GetEventHubProperties describes the default hub and a named one", { timeout: 20000 }, async () => {
  const byDefault = await unary(client, "GetEventHubProperties", {});
  assert.equal(byDefault.name, "eh1");
  assert.deepEqual(byDefault.partition_ids, PARTITIONS);
  const created = Number(byDefault.created_at.seconds);
  const now = Date.now() / 1000;
  assert.ok(created > now - 3600 && created <= now + 60, `created_at ${created} is around now (${now})`);
  const named = await unary(client, "GetEventHubProperties", { event_hub: "eh2" });
  assert.equal(named.name, "eh2");
  assert.deepEqual(named.partition_ids, PARTITIONS);
});

test("GetEventHubProperties of an unknown hub is NOT_FOUND / UNKNOWN_EVENT_HUB", { timeout: 20000 }, async () => {
  const error = await unary(client, "GetEventHubProperties", { event_hub: "nope" }).then(
    () => assert.fail("an unknown hub was described"),
    (e) => e,
  );
  assert.equal(error.code, grpc.status.NOT_FOUND);
  const info = assertErrorInfo(callStatus(error), grpc.status.NOT_FOUND, "UNKNOWN_EVENT_HUB");
  assert.equal(info.metadata.event_hub, "nope");
});

test("SendEvent: text, binary and json bodies read back by @azure/event-hubs with their content types", { timeout: 45000 }, async () => {
  const binary = Buffer.from(Array.from({ length: 256 }, (_, i) => i));
  const json = { a: 1, b: "x", c: [true, null, 2.5], d: { e: -3 } };
  const cases = [
    { event: { text: "héllo, gateway ✓" }, bytes: Buffer.from("héllo, gateway ✓", "utf8"), contentType: undefined },
    { event: { text: "plain", content_type: "text/plain" }, bytes: Buffer.from("plain"), contentType: "text/plain" },
    { event: { binary }, bytes: binary, contentType: undefined },
    { event: { binary, content_type: "application/octet-stream" }, bytes: binary, contentType: "application/octet-stream" },
    { event: { json: struct(json) }, json, contentType: "application/json" },
    { event: { json: struct({ v: 1 }), content_type: "application/vnd.example+json" }, json: { v: 1 }, contentType: "application/vnd.example+json" },
  ];
  const last = await lastSequence("eh1", "0");
  for (const { event } of cases) {
    const response = await unary(client, "SendEvent", { event_hub: "eh1", event: { ...event, partition_id: "0" } });
    assert.deepEqual(response, { event_hub: "eh1", partition_id: "0" });
  }
  const events = await readAfter("eh1", "0", last, cases.length);
  assert.equal(events.length, cases.length);
  cases.forEach((expected, i) => {
    const got = events[i];
    assert.ok(Buffer.isBuffer(got.body), `event ${i}: the body is raw bytes`);
    if (expected.json) {
      const text = got.body.toString("utf8");
      assert.deepEqual(JSON.parse(text), expected.json, `event ${i}`);
      assert.ok(!/\s/.test(text.replace(/"[^"]*"/g, "")), `event ${i}: compact JSON, got ${text}`);
    } else {
      assert.ok(got.body.equals(expected.bytes), `event ${i}: body ${got.body.toString("hex")}`);
    }
    assert.equal(got.contentType, expected.contentType, `event ${i}: content type`);
    assert.deepEqual(got.properties ?? {}, {}, `event ${i}: no application properties`);
  });
});

test("SendEvent: properties, message id and correlation id; an empty event_hub is the default hub", { timeout: 45000 }, async () => {
  const last = await lastSequence("eh1", "1");
  const response = await unary(client, "SendEvent", {
    event: {
      text: "with properties",
      partition_id: "1",
      properties: { a: "1", "x-y": "héllo", empty: "" },
      message_id: "msg-1",
      correlation_id: "corr-1",
    },
  });
  assert.deepEqual(response, { event_hub: "eh1", partition_id: "1" });
  const [event] = await readAfter("eh1", "1", last, 1);
  assert.equal(event.body.toString(), "with properties");
  assert.deepEqual(event.properties, { a: "1", "x-y": "héllo", empty: "" });
  assert.equal(event.messageId, "msg-1");
  assert.equal(event.correlationId, "corr-1");
  assert.equal(event.partitionKey ?? null, null);
});

test("traceparent metadata is stored on every event as Diagnostic-Id and traceparent", { timeout: 45000 }, async () => {
  const traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
  const meta = metadata({ traceparent, tracestate: "congo=t61rcWkgMzE" });
  const last = await lastSequence("eh1", "2");
  await unary(client, "SendEvent", { event: { text: "traced one", partition_id: "2", properties: { p: "v" } } }, meta);
  const batch = await unary(
    client,
    "SendEvents",
    { events: [{ text: "traced two", partition_id: "2" }, { text: "traced three", partition_id: "2" }] },
    meta,
  );
  assert.deepEqual(batch.results.map((r) => r.status.code), [0, 0]);
  const events = await readAfter("eh1", "2", last, 3);
  assert.deepEqual(events.map((e) => e.body.toString()).sort(), ["traced one", "traced three", "traced two"]);
  for (const event of events) {
    assert.equal(event.properties["Diagnostic-Id"], traceparent, `${event.body}`);
    assert.equal(event.properties.traceparent, traceparent, `${event.body}`);
  }
  assert.equal(events.find((e) => e.body.toString() === "traced one").properties.p, "v");
});

test("a partition key lands on the partition @azure/event-hubs' own producer uses for it", { timeout: 55000 }, async () => {
  const keys = ["user-1", "user-2", "user-3", "order:42", "éèçàü", "東京大阪", "🚀🎉", "x".repeat(200), "k", "K"];
  const run = randomUUID();
  for (const key of keys) {
    const response = await unary(client, "SendEvent", {
      event_hub: "eh2",
      event: { text: `gateway ${key}`, partition_key: key, properties: { run, origin: "gateway" } },
    });
    assert.equal(response.event_hub, "eh2");
    const resolved = String(mapPartitionKeyToId(key, PARTITIONS.length));
    assert.ok(["", resolved].includes(response.partition_id), `key ${key}: reported partition ${response.partition_id}`);
    await sdkSendWithKey(gateway.emulator, "eh2", key, [{ body: `sdk ${key}`, properties: { run, origin: "sdk" } }]);
  }
  const stored = await readHub(gateway.emulator, "eh2");
  for (const key of keys) {
    const where = (predicate) =>
      Object.entries(stored)
        .filter(([, events]) => events.some(predicate))
        .map(([id]) => id);
    const mine = (origin) => (e) => e.partitionKey === key && e.properties?.run === run && e.properties.origin === origin;
    const viaGateway = where(mine("gateway"));
    const viaSdk = where(mine("sdk"));
    assert.equal(viaGateway.length, 1, `key ${key}: the gateway's event is stored in one partition`);
    assert.deepEqual(viaGateway, viaSdk, `key ${key}: same partition as the SDK's own producer`);
    assert.equal(viaGateway[0], String(mapPartitionKeyToId(key, PARTITIONS.length)), `key ${key}: the SDK resolver's partition`);
  }
});

test("SendEvent: partition id routing and its refusals", { timeout: 45000 }, async () => {
  const last = await lastSequence("eh1", "3");
  const response = await unary(client, "SendEvent", { event_hub: "eh1", event: { text: "to three", partition_id: "3" } });
  assert.deepEqual(response, { event_hub: "eh1", partition_id: "3" });
  const [event] = await readAfter("eh1", "3", last, 1);
  assert.equal(event.body.toString(), "to three");

  const unknown = await unary(client, "SendEvent", { event: { text: "x", partition_id: "9" } }).then(
    () => assert.fail("partition 9 of a 4-partition hub was accepted"),
    (e) => e,
  );
  assert.equal(unknown.code, grpc.status.INVALID_ARGUMENT);
  assertInvalidEvent(callStatus(unknown), "event.partition_id");

  const both = await unary(client, "SendEvent", { event: { text: "x", partition_id: "1", partition_key: "k" } }).then(
    () => assert.fail("partition_key and partition_id together were accepted"),
    (e) => e,
  );
  assert.equal(both.code, grpc.status.INVALID_ARGUMENT);
  assertInvalidEvent(callStatus(both), ["event.partition_key", "event.partition_id"]);
  assert.equal(await lastSequence("eh1", "3"), last + 1, "nothing refused was stored");
});

test("SendEvent without a body is INVALID_ARGUMENT / INVALID_EVENT, field event.body", { timeout: 20000 }, async () => {
  const error = await unary(client, "SendEvent", { event_hub: "eh1", event: { partition_id: "0" } }).then(
    () => assert.fail("an event without a body was accepted"),
    (e) => e,
  );
  assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
  assertInvalidEvent(callStatus(error), "event.body");
});

test("SendEvent to an unknown hub is NOT_FOUND / UNKNOWN_EVENT_HUB", { timeout: 20000 }, async () => {
  const error = await unary(client, "SendEvent", { event_hub: "nope", event: { text: "lost" } }).then(
    () => assert.fail("an unknown hub was accepted"),
    (e) => e,
  );
  assert.equal(error.code, grpc.status.NOT_FOUND);
  const status = callStatus(error);
  const info = assertErrorInfo(status, grpc.status.NOT_FOUND, "UNKNOWN_EVENT_HUB");
  assert.equal(info.metadata.event_hub, "nope");
  assert.equal(status.message, error.details, "the trailer's status is the call's");
});

test("SendEvents: one result per event in order; a bad event fails alone with its field path", { timeout: 50000 }, async () => {
  const run = randomUUID();
  const tag = (n) => ({ run, n: String(n) });
  const key = `batch-${run}`;
  const ends = await partitionEnds(gateway.emulator, "eh1");
  const response = await unary(client, "SendEvents", {
    event_hub: "eh1",
    events: [
      { text: "zero", partition_key: key, properties: tag(0) },
      { partition_id: "1", properties: tag(1) },
      { binary: Buffer.from([1, 2, 3]), partition_id: "2", properties: tag(2) },
      { text: "three", partition_id: "7", properties: tag(3) },
      { json: struct({ four: 4 }), properties: tag(4) },
      { text: "five", partition_key: key, properties: tag(5) },
    ],
  });
  assert.equal(response.results.length, 6);
  assert.deepEqual(response.results.map((r) => r.status.code), [0, 3, 0, 3, 0, 0]);
  assert.equal(response.results[2].partition_id, "2");
  assert.equal(response.results[1].partition_id, "");
  const second = unpackStatus(response.results[1].status);
  assertInvalidEvent(second, "events[1].body");
  const fourth = unpackStatus(response.results[3].status);
  assertInvalidEvent(fourth, "events[3].partition_id");
  for (const i of [0, 2, 4, 5]) assert.deepEqual(response.results[i].status.details, [], `events[${i}] has no details`);

  const stored = [];
  const grown = Object.entries(await partitionEnds(gateway.emulator, "eh1")).filter(([id, last]) => last > ends[id]);
  for (const [id, last] of grown) stored.push(...(await readAfter("eh1", id, ends[id], last - ends[id])));
  const ours = stored.filter((e) => e.properties?.run === run);
  assert.deepEqual(ours.map((e) => e.properties.n).sort(), ["0", "2", "4", "5"], "only the good events are stored");
  const keyed = ours.filter((e) => e.partitionKey === key);
  assert.deepEqual(keyed.map((e) => e.body.toString()), ["zero", "five"], "one key keeps the request order");
  const json = ours.find((e) => e.properties.n === "4");
  assert.deepEqual(JSON.parse(json.body.toString()), { four: 4 });
  assert.equal(json.contentType, "application/json");
});

test("SendEvents: an empty request, an unknown hub and too many events", { timeout: 30000 }, async () => {
  assert.deepEqual(await unary(client, "SendEvents", { event_hub: "eh1", events: [] }), { results: [] });

  const unknown = await unary(client, "SendEvents", { event_hub: "nope", events: [{ text: "x" }] }).then(
    () => assert.fail("an unknown hub was accepted"),
    (e) => e,
  );
  assert.equal(unknown.code, grpc.status.NOT_FOUND);
  assertErrorInfo(callStatus(unknown), grpc.status.NOT_FOUND, "UNKNOWN_EVENT_HUB");

  const ends = await partitionEnds(gateway.emulator, "eh1");
  const events = Array.from({ length: 1001 }, (_, i) => ({ text: `too many ${i}` }));
  const tooMany = await unary(client, "SendEvents", { event_hub: "eh1", events }).then(
    () => assert.fail("1001 events were accepted in one request"),
    (e) => e,
  );
  assert.equal(tooMany.code, grpc.status.INVALID_ARGUMENT);
  assertInvalidEvent(callStatus(tooMany), "events");
  assert.deepEqual(await partitionEnds(gateway.emulator, "eh1"), ends, "nothing was sent");
});

/**
 * Runs one SendStream call: writes `requests` (waiting for 'drain' when grpc-js asks), half-closes, and
 * collects acks until the call ends. Resolves with `{acks, status}`.
 */
function stream(requests, meta = metadata(), ms = 40000) {
  const call = client.SendStream(meta, deadline(ms));
  const acks = [];
  const ended = new Promise((resolve, reject) => {
    let status;
    let done = false;
    call.on("data", (response) => acks.push(...response.acks));
    call.on("status", (s) => {
      status = s;
      if (done) resolve({ acks, status });
    });
    call.on("end", () => {
      done = true;
      if (status) resolve({ acks, status });
    });
    call.on("error", (error) => reject(Object.assign(error, { acks })));
  });
  const written = (async () => {
    for (const request of requests) {
      if (!call.write(request)) await new Promise((resolve) => call.once("drain", resolve));
    }
    call.end();
  })();
  return within(ms + 5000, "SendStream", Promise.all([written, ended]).then(([, result]) => result)).catch((error) => {
    call.cancel();
    throw error;
  });
}

test("SendStream: 3000 keyed events are each acked once, keep per-key order, and half-close ends OK", { timeout: 60000 }, async () => {
  const run = randomUUID();
  const keys = Array.from({ length: 12 }, (_, i) => `stream-${i}-${run.slice(0, 8)}`);
  const count = 3000;
  const next = new Map(keys.map((k) => [k, 0]));
  const requests = Array.from({ length: count }, (_, i) => {
    const key = keys[(i * 7 + (i >> 3)) % keys.length];
    const n = next.get(key);
    next.set(key, n + 1);
    return { event_hub: "eh2", sequence: i + 1, event: { text: `${key}#${n}`, partition_key: key, properties: { run } } };
  });
  const ends = await partitionEnds(gateway.emulator, "eh2");
  const { acks, status } = await stream(requests);
  assert.equal(status.code, grpc.status.OK, `the stream ended with ${status.code} ${status.details}`);
  const seen = new Map();
  for (const ack of acks) seen.set(Number(ack.sequence), (seen.get(Number(ack.sequence)) ?? 0) + 1);
  const missing = requests.filter((r) => !seen.has(r.sequence)).map((r) => r.sequence);
  const twice = [...seen].filter(([, n]) => n > 1).map(([s]) => s);
  assert.deepEqual(missing, [], "every sequence is acked");
  assert.deepEqual(twice, [], "no sequence is acked twice");
  assert.equal(acks.length, count);
  const nacks = acks.filter((a) => a.status.code !== 0);
  assert.deepEqual(nacks.slice(0, 3), [], "every event is accepted");
  for (const ack of acks) {
    const key = requests[Number(ack.sequence) - 1].event.partition_key;
    const resolved = String(mapPartitionKeyToId(key, PARTITIONS.length));
    assert.ok(["", resolved].includes(ack.partition_id), `sequence ${ack.sequence}: partition ${ack.partition_id}`);
  }

  const grown = Object.entries(await partitionEnds(gateway.emulator, "eh2")).filter(([id, last]) => last > ends[id]);
  const stored = (await Promise.all(grown.map(([id, last]) => readAfter("eh2", id, ends[id], last - ends[id])))).flat();
  const ours = stored.filter((e) => e.properties?.run === run);
  assert.equal(ours.length, count, "every event is stored once");
  for (const key of keys) {
    const numbers = ours.filter((e) => e.partitionKey === key).map((e) => Number(e.body.toString().split("#")[1]));
    assert.deepEqual(numbers, Array.from({ length: next.get(key) }, (_, i) => i), `key ${key}: stored in stream order`);
  }
});

test("SendStream: bad events are nacked alone, also inside a message of several events, and the stream goes on", { timeout: 45000 }, async () => {
  const run = randomUUID();
  const ends = await partitionEnds(gateway.emulator, "eh1");
  const { acks, status } = await stream([
    { event_hub: "eh2", sequence: 1, event: { text: "good one", partition_id: "0", properties: { run } } },
    { event_hub: "nope", sequence: 2, event: { text: "unknown hub" } },
    { sequence: 3, event: { partition_id: "0" } },
    { sequence: 4 },
    { sequence: 5, event: { text: "good five", partition_id: "1", properties: { run } } },
    // Several events in one message take sequences 6, 7, 8; only the one without a body is nacked.
    { sequence: 6, events: [{ text: "six", partition_id: "1", properties: { run } }, { partition_id: "1" }, { text: "eight", partition_id: "1", properties: { run } }] },
  ]);
  assert.equal(status.code, grpc.status.OK);
  const bySequence = new Map(acks.map((a) => [Number(a.sequence), a]));
  assert.equal(acks.length, 8);
  assert.deepEqual([...bySequence.keys()].sort(), [1, 2, 3, 4, 5, 6, 7, 8]);
  assert.equal(bySequence.get(6).status.code, 0);
  assert.equal(bySequence.get(8).status.code, 0);
  assertInvalidEvent(unpackStatus(bySequence.get(7).status), "events[1].body");
  assert.equal(bySequence.get(1).status.code, 0);
  assert.equal(bySequence.get(1).partition_id, "0");
  assert.equal(bySequence.get(5).status.code, 0);
  assert.equal(bySequence.get(5).partition_id, "1");
  const hub = assertErrorInfo(unpackStatus(bySequence.get(2).status), grpc.status.NOT_FOUND, "UNKNOWN_EVENT_HUB");
  assert.equal(hub.metadata.event_hub, "nope");
  assertInvalidEvent(unpackStatus(bySequence.get(3).status), "event.body");
  assertInvalidEvent(unpackStatus(bySequence.get(4).status), "event");
  // The default hub (eh1) got "good five" on partition 1, eh2 got "good one" on partition 0.
  const partitionOne = await readAfter("eh1", "1", ends["1"], 3);
  assert.deepEqual(partitionOne.map((e) => e.body.toString()), ["good five", "six", "eight"]);
  const eh2 = await readPartition(gateway.emulator, "eh2", "0", (await lastSequence("eh2", "0")) + 1);
  assert.ok(eh2.some((e) => e.properties?.run === run && e.body.toString() === "good one"));
});

/** Sequences of `acks`, as numbers, sorted. */
const sequencesOf = (acks) => acks.map((a) => Number(a.sequence)).sort((a, b) => a - b);

/** Asserts a stream's error is the gateway's `code`/`reason`, saying it read `messagesRead` messages; returns the status. */
function assertStreamEnding(error, code, reason, messagesRead) {
  assert.ok(error, "the stream ended OK");
  const status = callStatus(error);
  const info = assertErrorInfo(status, code, reason);
  assert.equal(info.metadata.messages_read, String(messagesRead), JSON.stringify(info));
  return status;
}

/**
 * Opens a SendStream on `on` that stays open (not half-closed) until the test ends it; returns `{call, acks,
 * ended}`, `ended` resolving with the call's error (null if it ended OK).
 */
function heldStream(on, options) {
  const call = on.SendStream(metadata(), options);
  const acks = [];
  const ended = new Promise((resolve) => {
    call.on("data", (response) => acks.push(...response.acks));
    call.on("error", resolve);
    call.on("status", (status) => {
      if (status.code === grpc.status.OK) resolve(null);
    });
  });
  return { call, acks, ended };
}

/** Resolves once `acks` holds `count` acks (or rejects after `ms`). */
async function acksArrive(acks, count, ms = 10000) {
  await within(ms, `${count} acks`, (async () => {
    while (acks.length < count) await sleep(20);
  })());
}

test("SendStream: a message over max_request_bytes ends the stream OUT_OF_RANGE / REQUEST_TOO_LARGE after the acks before it", { timeout: 45000 }, async () => {
  const small = await startGateway(
    ["--emulator", "--listen", "127.0.0.1:0", "--event-hub", "eh1"],
    20000,
    { EVENTHUB_GATEWAY_LIMITS__MAX_REQUEST_BYTES: String(1088 * 1024) },
  );
  const smallClient = gatewayClient(small.grpc);
  try {
    const { call, acks, ended } = heldStream(smallClient, deadline(30000));
    call.write({ sequence: 1, event: { text: "small" } });
    call.write({ sequence: 2, event: { text: "small too" } });
    call.write({ sequence: 3, event: { binary: Buffer.alloc(1200 * 1024, 7) } });
    call.write({ sequence: 4, event: { text: "never read" } });
    call.end();
    const error = await within(30000, "the stream's end", ended);
    assert.deepEqual(sequencesOf(acks), [1, 2], "each event before the big one acked once");
    assert.ok(acks.every((a) => a.status.code === 0), JSON.stringify(acks));
    const status = assertStreamEnding(error, grpc.status.OUT_OF_RANGE, "REQUEST_TOO_LARGE", 2);
    assert.equal(detail(status, "google.rpc.ErrorInfo").metadata.limit, String(1088 * 1024));
    assert.match(status.message, /max_request_bytes \(1114112 bytes\)/);
  } finally {
    smallClient.close();
    await small.stop(5000);
  }
});

test("SendStream: an undecodable message ends the stream INVALID_ARGUMENT / MALFORMED_REQUEST after the acks before it", { timeout: 30000 }, async () => {
  const good = [5, 6].map((sequence) =>
    Buffer.from(SendStreamRequest.encode(SendStreamRequest.create({ sequence, event: { text: `readable ${sequence}` } })).finish()),
  );
  // Field 1 (event_hub) announces 127 bytes and none follow. (grpc-js cannot send broken compression; the
  // Rust suite covers it.)
  const { acks, error } = await rawSendStream(gateway.grpc, [...good, Buffer.from([0x0a, 0x7f]), good[0]]);
  assert.deepEqual(sequencesOf(acks), [5, 6]);
  assert.ok(acks.every((a) => a.status.code === 0), JSON.stringify(acks));
  const status = assertStreamEnding(error, grpc.status.INVALID_ARGUMENT, "MALFORMED_REQUEST", 2);
  assert.equal(detail(status, "google.rpc.ErrorInfo").metadata.last_sequence, "6");
});

test("SendStream: the call's deadline ends an open stream with the gateway's DEADLINE_EXCEEDED after its acks", { timeout: 30000 }, async () => {
  const { call, acks, ended } = heldStream(client, deadline(1500));
  call.write({ sequence: 1, event: { text: "before the deadline" } });
  await acksArrive(acks, 1);
  const error = await within(10000, "the stream's end", ended);
  call.end();
  assert.deepEqual(sequencesOf(acks), [1]);
  assert.equal(acks[0].status.code, 0);
  assertStreamEnding(error, grpc.status.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", 1);
});

test("SendStream: a cancelled stream gets each ack before the cancel once, then CANCELLED", { timeout: 30000 }, async () => {
  const { call, acks, ended } = heldStream(client, deadline(20000));
  call.write({ sequence: 1, event: { text: "one" } });
  call.write({ sequence: 2, event_hub: "nope", event: { text: "two" } });
  await acksArrive(acks, 2);
  call.cancel();
  const error = await within(10000, "the stream's end", ended);
  assert.equal(error?.code, grpc.status.CANCELLED);
  assert.deepEqual(sequencesOf(acks), [1, 2]);
  // The gateway goes on serving streams.
  const { acks: later, status } = await stream([{ sequence: 3, event: { text: "three" } }]);
  assert.equal(status.code, grpc.status.OK);
  assert.deepEqual(sequencesOf(later), [3]);
});

test("SIGTERM drains the gateway, which exits 0", { timeout: 30000 }, async () => {
  client.close();
  client = undefined;
  assert.equal(await gateway.stop(20000), 0, `stderr: ${gateway.stderr().slice(-2000)}`);
});
