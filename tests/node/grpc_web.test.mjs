// gRPC-Web on the gateway's gRPC port ([grpc_web]): Connect's gRPC-Web transport for Node (HTTP/1.1) with the
// contract built from proto/ at run time (buf, from npm, into a FileDescriptorSet; no generated code), every
// event read back with the official @azure/event-hubs consumer; gRPC-Web text mode, CORS and the HTTP/1.1
// connection bounds by hand over node:http and node:net.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import http from "node:http";
import net from "node:net";
import path from "node:path";
import { createFileRegistry, create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { compressionGzip, createGrpcWebTransport } from "@connectrpc/connect-node";
import { earliestEventPosition } from "@azure/event-hubs";
import { partitionEnds, protoDir, readPartition, sleep, startGateway, waitServing, within } from "./support.mjs";

const ORIGIN = "https://app.example";
const SERVICE = "eventhub.gateway.v1.EventHubGateway";

// The contract as buf compiles it (imports included), loaded into a registry Connect's client reads.
const buf = path.join(import.meta.dirname, "node_modules", ".bin", "buf");
const registry = createFileRegistry(
  fromBinary(FileDescriptorSetSchema, execFileSync(buf, ["build", protoDir, "--exclude-source-info", "-o", "-#format=binpb"])),
);
const service = registry.getService(SERVICE);
const ErrorInfo = registry.getMessage("google.rpc.ErrorInfo");
const BadRequest = registry.getMessage("google.rpc.BadRequest");
const SendEventRequest = registry.getMessage("eventhub.gateway.v1.SendEventRequest");
const SendEventResponse = registry.getMessage("eventhub.gateway.v1.SendEventResponse");
const Status = registry.getMessage("google.rpc.Status");

let gateway;
let client;

before(async () => {
  gateway = await startGateway(["--emulator", "--listen", "127.0.0.1:0", "--event-hub", "eh1"], 20000, {
    EVENTHUB_GATEWAY_GRPC_WEB__ENABLED: "true",
    EVENTHUB_GATEWAY_GRPC_WEB__CORS_ALLOWED_ORIGINS: JSON.stringify([ORIGIN, "http://localhost:5173"]),
  });
  // HTTP/2 gRPC (grpc-js) on the same port: the listener tells the two apart by the first bytes.
  await waitServing(gateway.grpc, SERVICE, 30000);
  client = createClient(service, createGrpcWebTransport({ baseUrl: `http://${gateway.grpc}`, httpVersion: "1.1" }));
});

after(async () => {
  await gateway?.stop(5000);
});

/** The events `partitionId` of eh1 got after its last sequence number was `last`. */
function readAfter(partitionId, last, expected, connectionString = gateway.emulator) {
  const position = last < 0 ? earliestEventPosition : { sequenceNumber: last, isInclusive: false };
  return readPartition(connectionString, "eh1", partitionId, expected, position);
}

const lastSequence = async (partitionId, connectionString = gateway.emulator) =>
  (await partitionEnds(connectionString, "eh1"))[partitionId];

/** The ConnectError a promise rejects with. */
const failure = (promise) =>
  promise.then(
    (response) => assert.fail(`expected a refusal, got ${JSON.stringify(response)}`),
    (error) => ConnectError.from(error),
  );

/** One HTTP/1.1 request on a fresh connection: `{status, headers, body}`. */
function h1(address, { method = "POST", path: target = `/${SERVICE}/SendEvent`, headers = {}, body } = {}) {
  const [host, port] = address.split(":");
  return within(
    15000,
    `${method} ${target}`,
    new Promise((resolve, reject) => {
      const request = http.request({ host, port, method, path: target, headers, agent: false }, (response) => {
        const chunks = [];
        response.on("data", (chunk) => chunks.push(chunk));
        response.on("end", () => resolve({ status: response.statusCode, headers: response.headers, body: Buffer.concat(chunks) }));
      });
      request.on("error", reject);
      request.end(body);
    }),
  );
}

/** A gRPC(-Web) message frame: flag 0, big-endian length, `payload`. */
function frame(payload, flag = 0) {
  const header = Buffer.alloc(5);
  header[0] = flag;
  header.writeUInt32BE(payload.length, 1);
  return Buffer.concat([header, Buffer.from(payload)]);
}

/** The messages and trailers of a gRPC-Web response body (binary, already base64-decoded). */
function unframe(body) {
  const messages = [];
  const trailers = {};
  for (let at = 0; at < body.length; ) {
    const flag = body[at];
    const length = body.readUInt32BE(at + 1);
    const payload = body.subarray(at + 5, at + 5 + length);
    at += 5 + length;
    if (flag & 0x80) {
      for (const line of payload.toString("latin1").split("\r\n").filter(Boolean)) {
        const colon = line.indexOf(":");
        trailers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
      }
    } else messages.push(payload);
  }
  return { messages, trailers };
}

/** A SendEvent in gRPC-Web text mode (base64 both ways): `{status, headers, messages, trailers}`. */
async function sendEventAsText(address, request) {
  const body = frame(toBinary(SendEventRequest, create(SendEventRequest, request))).toString("base64");
  const response = await h1(address, {
    headers: { "content-type": "application/grpc-web-text", accept: "application/grpc-web-text", "x-grpc-web": "1" },
    body,
  });
  // Each chunk of the answer is base64 of its own, padded: decoded one by one.
  const chunks = response.body.toString("latin1").split(/(?<==)(?=[^=])/);
  const { messages, trailers } = unframe(Buffer.concat(chunks.map((chunk) => Buffer.from(chunk, "base64"))));
  // A trailers-only answer (any refusal) carries its status in the headers.
  for (const name of ["grpc-status", "grpc-message", "grpc-status-details-bin"]) {
    if (response.headers[name] !== undefined) trailers[name] = response.headers[name];
  }
  return { ...response, messages, trailers };
}

/** The ErrorInfo reason and BadRequest fields of a `grpc-status-details-bin` value. */
function richDetails(detailsBin) {
  const status = fromBinary(Status, Buffer.from(detailsBin, "base64"));
  const find = (desc) => status.details.find((any) => any.typeUrl.endsWith(`/${desc.typeName}`));
  const info = find(ErrorInfo);
  const badRequest = find(BadRequest);
  return {
    code: status.code,
    reason: info && fromBinary(ErrorInfo, info.value).reason,
    metadata: info && fromBinary(ErrorInfo, info.value).metadata,
    fields: badRequest ? fromBinary(BadRequest, badRequest.value).fieldViolations.map((v) => v.field) : [],
  };
}

test("SendEvent over gRPC-Web (HTTP/1.1): text, binary and json bodies with properties read back exact", { timeout: 45000 }, async () => {
  const binary = new Uint8Array(Array.from({ length: 256 }, (_, i) => i));
  const json = { a: 1, b: "x", c: [true, null, 2.5], d: { e: -3 } };
  const cases = [
    { body: { case: "text", value: "héllo, gRPC-Web ✓" }, properties: { a: "1", "x-y": "héllo" }, messageId: "m-1" },
    { body: { case: "binary", value: binary }, contentType: "application/octet-stream", correlationId: "c-2" },
    { body: { case: "json", value: json } },
  ];
  const last = await lastSequence("2");
  for (const event of cases) {
    const response = await client.sendEvent({ eventHub: "eh1", event: { ...event, partitionId: "2" } }, { timeoutMs: 15000 });
    assert.equal(response.eventHub, "eh1");
    assert.equal(response.partitionId, "2");
  }
  const [text, bytes, structured] = await readAfter("2", last, cases.length);
  assert.equal(text.body.toString("utf8"), "héllo, gRPC-Web ✓");
  assert.deepEqual(text.properties, { a: "1", "x-y": "héllo" });
  assert.equal(text.messageId, "m-1");
  assert.ok(Buffer.from(binary).equals(bytes.body), `binary body ${bytes.body.toString("hex")}`);
  assert.equal(bytes.contentType, "application/octet-stream");
  assert.equal(bytes.correlationId, "c-2");
  assert.deepEqual(JSON.parse(structured.body.toString("utf8")), json);
  assert.equal(structured.contentType, "application/json");
});

test("SendEvents over gRPC-Web: one result per event, a bad one refused alone with its field", { timeout: 45000 }, async () => {
  const last = await lastSequence("1");
  const response = await client.sendEvents(
    {
      eventHub: "eh1",
      events: [
        { body: { case: "text", value: "first" }, partitionId: "1" },
        { body: { case: "text", value: "bad" }, partitionId: "9" },
        { body: { case: "text", value: "third" }, partitionId: "1" },
      ],
    },
    { timeoutMs: 15000 },
  );
  assert.deepEqual(
    response.results.map((r) => r.status?.code ?? 0),
    [0, 3, 0],
  );
  const events = await readAfter("1", last, 2);
  assert.deepEqual(
    events.map((e) => e.body.toString()),
    ["first", "third"],
  );
  assert.equal(await lastSequence("1"), last + 2, "the refused event was not stored");
});

test("a refusal over gRPC-Web carries the rich error: INVALID_EVENT with its field, decoded by the client", { timeout: 20000 }, async () => {
  const error = await failure(client.sendEvent({ event: { body: { case: "text", value: "x" }, partitionId: "9" } }));
  assert.equal(error.code, Code.InvalidArgument);
  const [info] = error.findDetails(ErrorInfo);
  assert.equal(info?.reason, "INVALID_EVENT", JSON.stringify(error.details));
  assert.equal(info.domain, "eventhub-gateway");
  const [badRequest] = error.findDetails(BadRequest);
  assert.deepEqual(
    badRequest.fieldViolations.map((v) => v.field),
    ["event.partition_id"],
  );

  const unknown = await failure(client.getEventHubProperties({ eventHub: "nope" }));
  assert.equal(unknown.code, Code.NotFound);
  assert.equal(unknown.findDetails(ErrorInfo)[0]?.reason, "UNKNOWN_EVENT_HUB");
});

test("gRPC-Web text mode (base64): a SendEvent read back exact, and a refusal with its details", { timeout: 45000 }, async () => {
  const last = await lastSequence("3");
  const sent = await sendEventAsText(gateway.grpc, { eventHub: "eh1", event: { body: { case: "text", value: "as text" }, partitionId: "3" } });
  assert.equal(sent.status, 200);
  assert.equal(sent.headers["content-type"], "application/grpc-web-text+proto");
  assert.equal(sent.trailers["grpc-status"], "0", JSON.stringify(sent.trailers));
  const response = fromBinary(SendEventResponse, sent.messages[0]);
  assert.equal(response.partitionId, "3");
  const [event] = await readAfter("3", last, 1);
  assert.equal(event.body.toString(), "as text");

  const refused = await sendEventAsText(gateway.grpc, { event: { body: { case: "text", value: "x" }, partitionId: "9" } });
  assert.equal(refused.trailers["grpc-status"], "3");
  const details = richDetails(refused.trailers["grpc-status-details-bin"]);
  assert.equal(details.reason, "INVALID_EVENT");
  assert.deepEqual(details.fields, ["event.partition_id"]);

  // A body that is not base64 at all: the client's error, like any unreadable message.
  const garbled = await h1(gateway.grpc, {
    headers: { "content-type": "application/grpc-web-text", "x-grpc-web": "1" },
    body: "!!!! not base64",
  });
  assert.equal(garbled.headers["grpc-status"], "3", JSON.stringify(garbled.headers));
  assert.equal(richDetails(garbled.headers["grpc-status-details-bin"]).reason, "MALFORMED_REQUEST");
});

test("the request guard bounds what gRPC-Web text decodes to, not its base64", { timeout: 60000 }, async () => {
  // 900 KiB of event, 1.2 MB as base64: over SendEvent's 1088 KiB bound as sent, within it decoded.
  const last = await lastSequence("0");
  const fits = new Uint8Array(900 * 1024).fill(7);
  const sent = await sendEventAsText(gateway.grpc, { event: { body: { case: "binary", value: fits }, partitionId: "0" } });
  assert.equal(sent.trailers["grpc-status"], "0", `${sent.status} ${JSON.stringify(sent.headers)} ${sent.body.subarray(0, 200)}`);
  const [event] = await readAfter("0", last, 1);
  assert.equal(event.body.length, fits.length);

  const big = new Uint8Array(1200 * 1024).fill(7);
  const refused = await sendEventAsText(gateway.grpc, { event: { body: { case: "binary", value: big }, partitionId: "0" } });
  assert.equal(refused.trailers["grpc-status"], "11", JSON.stringify(refused.trailers));
  assert.equal(richDetails(refused.trailers["grpc-status-details-bin"]).reason, "REQUEST_TOO_LARGE");

  // Binary gRPC-Web through the client: the same refusal.
  const error = await failure(client.sendEvent({ event: { body: { case: "binary", value: big }, partitionId: "0" } }));
  assert.equal(error.code, Code.OutOfRange, `${error.message} ${error.cause}`);
  assert.equal(error.findDetails(ErrorInfo)[0]?.reason, "REQUEST_TOO_LARGE");
  assert.equal(await lastSequence("0"), last + 1, "nothing oversized was stored");
});

test("a malformed gRPC-Web message is refused MALFORMED_REQUEST", { timeout: 20000 }, async () => {
  const response = await h1(gateway.grpc, {
    headers: { "content-type": "application/grpc-web+proto", "x-grpc-web": "1" },
    body: frame(Buffer.from([0x12, 0xff, 0xff, 0xff, 0x0f, 1, 2])),
  });
  const status = response.headers["grpc-status"] ?? unframe(response.body).trailers["grpc-status"];
  assert.equal(status, "3");
  const detailsBin = response.headers["grpc-status-details-bin"] ?? unframe(response.body).trailers["grpc-status-details-bin"];
  assert.equal(richDetails(detailsBin).reason, "MALFORMED_REQUEST");
});

test("gRPC-Web over HTTP/2 with a gzip request: the event read back exact", { timeout: 45000 }, async () => {
  const h2 = createClient(
    service,
    createGrpcWebTransport({
      baseUrl: `http://${gateway.grpc}`,
      httpVersion: "2",
      sendCompression: compressionGzip,
      acceptCompression: [compressionGzip],
      compressMinBytes: 0,
    }),
  );
  const text = "gzip over h2 ".repeat(200);
  const last = await lastSequence("2");
  const response = await h2.sendEvent({ event: { body: { case: "text", value: text }, partitionId: "2" } }, { timeoutMs: 15000 });
  assert.equal(response.partitionId, "2");
  const [event] = await readAfter("2", last, 1);
  assert.equal(event.body.toString(), text);
});

test("gRPC-Web callers authenticate as gRPC ones: no credential is UNAUTHENTICATED (readable by the page), a granted API key sends", { timeout: 60000 }, async () => {
  const directory = mkdtempSync(path.join(tmpdir(), "gateway-grpc-web-"));
  const key = "web-api-key-0123456789";
  const config = path.join(directory, "gateway.toml");
  writeFileSync(
    config,
    `[grpc_web]
enabled = true
cors_allowed_origins = ["${ORIGIN}"]

[auth]
required = true

[[auth.api_keys]]
identity = "web-app"
sha256 = "${createHash("sha256").update(key).digest("hex")}"

[[auth.grants]]
name = "web"
identities = ["web-app"]
event_hubs = ["eh1"]
`,
  );
  const secured = await startGateway(["--emulator", "--listen", "127.0.0.1:0", "--event-hub", "eh1", "--config", config]);
  try {
    const securedClient = createClient(service, createGrpcWebTransport({ baseUrl: `http://${secured.grpc}`, httpVersion: "1.1" }));
    const anonymous = await failure(securedClient.sendEvent({ event: { body: { case: "text", value: "x" } } }));
    assert.equal(anonymous.code, Code.Unauthenticated);
    const raw = await h1(secured.grpc, {
      headers: { origin: ORIGIN, "content-type": "application/grpc-web+proto", "x-grpc-web": "1" },
      body: frame(toBinary(SendEventRequest, create(SendEventRequest, { event: { body: { case: "text", value: "x" } } }))),
    });
    assert.equal(raw.headers["grpc-status"], "16");
    assert.equal(raw.headers["access-control-allow-origin"], ORIGIN, "the page can read why");

    const last = await lastSequence("0", secured.emulator);
    const sent = await securedClient.sendEvent(
      { event: { body: { case: "text", value: "with a key" }, partitionId: "0" } },
      { headers: { authorization: `Bearer ${key}` }, timeoutMs: 15000 },
    );
    assert.equal(sent.partitionId, "0");
    const [event] = await readAfter("0", last, 1, secured.emulator);
    assert.equal(event.body.toString(), "with a key");
  } finally {
    await secured.stop(5000);
    rmSync(directory, { recursive: true, force: true });
  }
});

const PREFLIGHT = {
  "access-control-request-method": "POST",
  "access-control-request-headers": "content-type,x-grpc-web,x-user-agent,authorization,grpc-timeout,traceparent",
};

test("CORS: an allowed origin's preflight is answered for it; a call's answer lets it read the status", { timeout: 20000 }, async () => {
  const preflight = await h1(gateway.grpc, { method: "OPTIONS", headers: { origin: ORIGIN, ...PREFLIGHT } });
  assert.equal(preflight.status, 200);
  assert.equal(preflight.headers["access-control-allow-origin"], ORIGIN);
  assert.equal(preflight.headers["access-control-allow-methods"], "POST");
  const allowed = preflight.headers["access-control-allow-headers"].split(",");
  for (const name of ["content-type", "x-grpc-web", "x-user-agent", "grpc-timeout", "authorization", "x-client-id", "traceparent", "tracestate"]) {
    assert.ok(allowed.includes(name), `${name} in ${allowed}`);
  }
  assert.equal(preflight.headers["access-control-max-age"], "600");
  assert.equal(preflight.headers["access-control-allow-credentials"], undefined, "never credentials mode");
  assert.equal(preflight.headers["grpc-status"], undefined, "the preflight never reached the service");

  const call = await h1(gateway.grpc, {
    headers: { origin: ORIGIN, "content-type": "application/grpc-web+proto", "x-grpc-web": "1" },
    body: frame(toBinary(SendEventRequest, create(SendEventRequest, { event: { body: { case: "text", value: "x" }, partitionId: "9" } }))),
  });
  assert.equal(call.headers["access-control-allow-origin"], ORIGIN);
  assert.deepEqual(call.headers["access-control-expose-headers"].split(","), ["grpc-status", "grpc-message", "grpc-status-details-bin"]);
  assert.equal(call.headers["grpc-status"], "3");
});

test("CORS: another origin's preflight is refused and no answer carries CORS headers for it", { timeout: 20000 }, async () => {
  for (const origin of ["https://evil.example", "https://app.example:8443", "http://app.example"]) {
    const preflight = await h1(gateway.grpc, { method: "OPTIONS", headers: { origin, ...PREFLIGHT } });
    assert.equal(preflight.status, 403, origin);
    const cors = Object.keys(preflight.headers).filter((name) => name.startsWith("access-control-"));
    assert.deepEqual(cors, [], `${origin}: ${JSON.stringify(preflight.headers)}`);
  }
  const call = await h1(gateway.grpc, {
    headers: { origin: "https://evil.example", "content-type": "application/grpc-web+proto", "x-grpc-web": "1" },
    body: frame(toBinary(SendEventRequest, create(SendEventRequest, { event: { body: { case: "text", value: "x" }, partitionId: "9" } }))),
  });
  assert.deepEqual(
    Object.keys(call.headers).filter((name) => name.startsWith("access-control-")),
    [],
  );
  // CORS is the browser's to enforce: the call itself is answered as any other.
  assert.equal(call.headers["grpc-status"], "3");
});

/** A raw TCP connection to `address`: `{socket, closed}` (closed resolves with the bytes received). */
function connect(address) {
  const [host, port] = address.split(":");
  const socket = net.connect(Number(port), host);
  const received = [];
  socket.on("data", (chunk) => received.push(chunk));
  socket.on("error", () => {});
  const closed = new Promise((resolve) => socket.on("close", () => resolve(Buffer.concat(received).toString("latin1"))));
  return { socket, closed, received };
}

/** A complete HTTP/1.1 gRPC-Web GetEventHubProperties request (keep-alive). */
function propertiesRequest(address) {
  const body = frame(Buffer.alloc(0));
  return Buffer.concat([
    Buffer.from(
      `POST /${SERVICE}/GetEventHubProperties HTTP/1.1\r\nhost: ${address}\r\ncontent-type: application/grpc-web+proto\r\n` +
        `x-grpc-web: 1\r\ncontent-length: ${body.length}\r\n\r\n`,
    ),
    body,
  ]);
}

test("HTTP/1.1 connections keep the listener's bounds: handshake, header read, head size, idle, age", { timeout: 60000 }, async () => {
  const bounded = await startGateway(["--emulator", "--listen", "127.0.0.1:0", "--event-hub", "eh1"], 20000, {
    EVENTHUB_GATEWAY_GRPC_WEB__ENABLED: "true",
    EVENTHUB_GATEWAY_LIMITS__HANDSHAKE_TIMEOUT_SECONDS: "1",
    EVENTHUB_GATEWAY_LIMITS__HEADER_READ_TIMEOUT_SECONDS: "1",
    EVENTHUB_GATEWAY_LIMITS__CONNECTION_IDLE_TIMEOUT_SECONDS: "4",
  });
  try {
    // Nothing sent, or a request head never finished: closed at the handshake bound, unanswered.
    const silent = connect(bounded.grpc);
    const partial = connect(bounded.grpc);
    partial.socket.write("POST /x HTTP/1.1\r\nhost: a\r\n");
    assert.equal(await within(10000, "the silent connection's close", silent.closed), "");
    assert.equal(await within(10000, "the half-sent head's close", partial.closed), "");

    // A request answered, then half of the next head: closed at the header read bound.
    const slow = connect(bounded.grpc);
    slow.socket.write(propertiesRequest(bounded.grpc));
    await within(10000, "the first answer", new Promise((resolve) => slow.socket.once("data", resolve)));
    slow.socket.write("POST /x HTTP/1.1\r\n");
    const slowStart = Date.now();
    const slowText = await within(10000, "the slow head's close", slow.closed);
    assert.match(slowText, /^HTTP\/1\.1 200 OK/);
    assert.equal(slowText.match(/HTTP\/1\.1/g).length, 1, "the second head was never answered");
    assert.ok(Date.now() - slowStart < 3500, "closed by the header read bound (1 s), before the idle one (4 s)");

    // A request answered, then nothing: closed at the idle bound.
    const idle = connect(bounded.grpc);
    idle.socket.write(propertiesRequest(bounded.grpc));
    const idleText = await within(10000, "the idle connection's close", idle.closed);
    assert.match(idleText, /^HTTP\/1\.1 200 OK/);
    assert.match(idleText, /grpc-status:0/);

    // A head over limits.http2_max_header_list_bytes (16 KiB): closed unanswered.
    const huge = connect(bounded.grpc);
    huge.socket.write(`POST /x HTTP/1.1\r\nhost: a\r\nx-big: ${"a".repeat(20 * 1024)}\r\n\r\n`);
    assert.doesNotMatch(await within(10000, "the huge head's close", huge.closed), /200 OK/);
  } finally {
    assert.equal(await bounded.stop(10000), 0);
  }

  const aging = await startGateway(["--emulator", "--listen", "127.0.0.1:0", "--event-hub", "eh1"], 20000, {
    EVENTHUB_GATEWAY_GRPC_WEB__ENABLED: "true",
    EVENTHUB_GATEWAY_LIMITS__MAX_CONNECTION_AGE_SECONDS: "1",
    EVENTHUB_GATEWAY_LIMITS__MAX_CONNECTION_AGE_GRACE_SECONDS: "60",
  });
  try {
    // A call in flight at the connection's age (its head read, its body not yet): its answer comes with
    // `connection: close`, and then the connection closes.
    const busy = connect(aging.grpc);
    const request = propertiesRequest(aging.grpc);
    busy.socket.write(request.subarray(0, request.length - 3));
    await sleep(1600);
    assert.equal(busy.received.length, 0, "nothing answered before the body ends");
    busy.socket.write(request.subarray(request.length - 3));
    const text = await within(10000, "the aged connection's close", busy.closed);
    assert.match(text, /^HTTP\/1\.1 200 OK/);
    assert.match(text, /\r\nconnection: close\r\n/i);
    assert.match(text, /grpc-status:0/);
  } finally {
    assert.equal(await aging.stop(10000), 0);
  }
});

test("SIGTERM drains a gateway with an open HTTP/1.1 connection, which exits 0", { timeout: 30000 }, async () => {
  const draining = await startGateway(["--emulator", "--listen", "127.0.0.1:0", "--event-hub", "eh1"], 20000, {
    EVENTHUB_GATEWAY_GRPC_WEB__ENABLED: "true",
  });
  const open = connect(draining.grpc);
  open.socket.write(propertiesRequest(draining.grpc));
  await within(10000, "the answer", new Promise((resolve) => open.socket.once("data", resolve)));
  assert.equal(await draining.stop(15000), 0);
  await within(10000, "the connection's close", open.closed);
});
