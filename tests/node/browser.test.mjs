// gRPC-Web and CORS from a real browser: headless Chromium (Debian's /usr/bin/chromium, driven by puppeteer-core,
// which downloads no browser) opens a page served here on origin A, a bundle of Connect's gRPC-Web client
// (@connectrpc/connect-web, bundled by esbuild at test time) with the contract buf compiles from proto/. From
// origin A (allowed) SendEvent and SendEvents publish, each event read back exact with @azure/event-hubs, and a
// refusal's rich error is readable by the page. The same page from origin B (not allowed) fails in the browser:
// the preflight is refused, so the fetch rejects and the call never reaches the gateway (nothing received,
// nothing stored). Without a browser (no Chromium, EVENTHUB_GATEWAY_CHROMIUM unset) the tests SKIP with a
// WARNING; scripts/test.sh installs Chromium as root and sets EVENTHUB_GATEWAY_REQUIRE_BROWSER=1, so a browser
// that cannot start fails instead.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import http from "node:http";
import path from "node:path";
import { earliestEventPosition } from "@azure/event-hubs";
import { build } from "esbuild";
import puppeteer from "puppeteer-core";
import { metricSum, partitionEnds, protoDir, readPartition, sleep, startGateway, waitServing, within } from "./support.mjs";

const SERVICE = "eventhub.gateway.v1.EventHubGateway";
const RECEIVED = "eventhub_gateway_events_received_total";
const here = import.meta.dirname;

/** The Chromium to drive: EVENTHUB_GATEWAY_CHROMIUM, else Debian's, else none (the tests skip). */
const chromium = [process.env.EVENTHUB_GATEWAY_CHROMIUM, "/usr/bin/chromium", "/usr/bin/chromium-browser"].find(
  (candidate) => candidate && existsSync(candidate),
);
const required = process.env.EVENTHUB_GATEWAY_REQUIRE_BROWSER === "1";
if (!chromium) {
  if (required) throw new Error("EVENTHUB_GATEWAY_REQUIRE_BROWSER=1 but no Chromium (set EVENTHUB_GATEWAY_CHROMIUM)");
  console.error("WARNING: no Chromium (/usr/bin/chromium or EVENTHUB_GATEWAY_CHROMIUM): the browser gRPC-Web tests SKIP");
}
const skip = chromium ? false : "no Chromium";

// The page's script: Connect's gRPC-Web transport over the browser's fetch(), the contract loaded from the page's
// own origin at run time. `gatewayCall` answers plain JSON, the outcome of one unary call, for the test to judge.
const pageScript = `
import { createFileRegistry, fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";

const registry = fetch("/contract.binpb")
  .then((response) => response.arrayBuffer())
  .then((bytes) => createFileRegistry(fromBinary(FileDescriptorSetSchema, new Uint8Array(bytes))));

const plain = (value) => JSON.parse(JSON.stringify(value, (_, v) => (typeof v === "bigint" ? String(v) : v)));

window.gatewayCall = async (baseUrl, method, request) => {
  const contract = await registry;
  const client = createClient(contract.getService(${JSON.stringify(SERVICE)}), createGrpcWebTransport({ baseUrl }));
  try {
    return { ok: true, response: plain(await client[method](request, { timeoutMs: 10000 })) };
  } catch (e) {
    const error = ConnectError.from(e);
    const [info] = error.findDetails(contract.getMessage("google.rpc.ErrorInfo"));
    const [bad] = error.findDetails(contract.getMessage("google.rpc.BadRequest"));
    return {
      ok: false,
      code: Code[error.code],
      message: error.rawMessage,
      reason: info?.reason ?? null,
      fields: bad?.fieldViolations.map((violation) => violation.field) ?? [],
      cause: error.cause ? { name: error.cause.name, message: String(error.cause.message) } : null,
    };
  }
};
window.pageReady = registry.then(() => true);
`;

let gateway;
let browser;
let servers = [];
let originA;
let originB;

/** Serves the page, its bundle and the contract on 127.0.0.1 (a free port); resolves with its origin. */
function servePage(bundle, contract) {
  const html = '<!doctype html><meta charset="utf-8"><title>gRPC-Web</title><script src="/app.js"></script>';
  const server = http.createServer((request, response) => {
    const [type, body] =
      request.url === "/" ? ["text/html", html]
      : request.url === "/app.js" ? ["text/javascript", bundle]
      : request.url === "/contract.binpb" ? ["application/octet-stream", contract]
      : [null, null];
    if (!type) {
      response.writeHead(404).end();
      return;
    }
    response.writeHead(200, { "content-type": type, "cache-control": "no-store" }).end(body);
  });
  servers.push(server);
  return within(
    5000,
    "the page server's listen",
    new Promise((resolve, reject) => {
      server.once("error", reject);
      server.listen(0, "127.0.0.1", () => resolve(`http://127.0.0.1:${server.address().port}`));
    }),
  );
}

before(async () => {
  if (skip) return;
  const contract = execFileSync(path.join(here, "node_modules", ".bin", "buf"), [
    "build",
    protoDir,
    "--exclude-source-info",
    "-o",
    "-#format=binpb",
  ]);
  const bundled = await within(
    30000,
    "the esbuild bundle",
    build({
      stdin: { contents: pageScript, resolveDir: here, loader: "js" },
      bundle: true,
      format: "esm",
      platform: "browser",
      target: "es2022",
      write: false,
      logLevel: "silent",
    }),
  );
  const bundle = bundled.outputFiles[0].text;
  // Two origins: same host, other ports (a port is part of an origin). A is allowed, B is not.
  originA = await servePage(bundle, contract);
  originB = await servePage(bundle, contract);
  gateway = await startGateway(["--emulator", "--listen", "127.0.0.1:0", "--event-hub", "eh1"], 20000, {
    EVENTHUB_GATEWAY_GRPC_WEB__ENABLED: "true",
    EVENTHUB_GATEWAY_GRPC_WEB__CORS_ALLOWED_ORIGINS: JSON.stringify([originA]),
  });
  await waitServing(gateway.grpc, SERVICE, 30000);
  // No sandbox: Chromium refuses it as root (CI), and a container may lack the user namespaces it needs; the
  // page is this test's own, on loopback. No proxy: loopback only, whatever the environment says.
  const args = ["--no-sandbox", "--disable-gpu", "--no-proxy-server", "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check"];
  browser = await puppeteer.launch({ executablePath: chromium, headless: true, args, timeout: 30000, protocolTimeout: 30000 });
});

after(async () => {
  await within(15000, "the browser's close", browser?.close() ?? Promise.resolve()).catch(() => browser?.process()?.kill("SIGKILL"));
  await gateway?.stop(5000);
  for (const server of servers) server.close();
});

/** A fresh tab on `origin`'s page, its console kept: `{page, logs}`. */
async function openPage(origin) {
  const page = await browser.newPage();
  page.setDefaultTimeout(15000);
  const logs = [];
  page.on("console", (message) => logs.push(message.text()));
  // The browser's own view of the network (DevTools protocol): preflights and why a request failed.
  const network = [];
  const cdp = await page.createCDPSession();
  for (const name of ["requestWillBeSent", "responseReceived", "loadingFailed"]) {
    cdp.on(`Network.${name}`, (params) => network.push({ event: name, ...params }));
  }
  await cdp.send("Network.enable");
  await page.goto(`${origin}/`, { waitUntil: "load", timeout: 15000 });
  await within(15000, "the page's contract", page.evaluate(() => window.pageReady));
  return { page, logs, network };
}

/** One call made by the page's Connect client against the gateway: the plain outcome `gatewayCall` answers. */
const call = (page, method, request) =>
  within(
    20000,
    `the page's ${method}`,
    page.evaluate((baseUrl, m, r) => window.gatewayCall(baseUrl, m, r), `http://${gateway.grpc}`, method, request),
  );

/** Waits (5 s at most) for the browser's preflight of `method` to have been answered `status`. */
async function preflight(network, method, status, logs) {
  const url = `http://${gateway.grpc}/${SERVICE}/${method}`;
  const seen = () =>
    network.some((e) => e.event === "responseReceived" && e.type === "Preflight" && e.response.url === url && e.response.status === status);
  for (const end = Date.now() + 5000; !seen() && Date.now() < end; ) await sleep(50);
  const preflights = network.filter((e) => e.type === "Preflight").map((e) => `${e.response?.url} ${e.response?.status}`);
  assert.ok(seen(), `no preflight of ${method} answered ${status}: ${JSON.stringify(preflights)}; console: ${logs.join(" | ")}`);
}

const received = () => metricSum(gateway.metrics, RECEIVED, { event_hub: "eh1" });

/** The events partition `partitionId` of eh1 got after sequence number `last`, by the official consumer. */
const readAfter = (partitionId, last, expected) =>
  readPartition(
    gateway.emulator,
    "eh1",
    partitionId,
    expected,
    last < 0 ? earliestEventPosition : { sequenceNumber: last, isInclusive: false },
  );

test("from an allowed origin, the browser's gRPC-Web client publishes (SendEvent, SendEvents), read back exact", { skip, timeout: 90000 }, async () => {
  const { page, logs, network } = await openPage(originA);
  try {
    const last = (await partitionEnds(gateway.emulator, "eh1"))["1"];
    const one = await call(page, "sendEvent", {
      eventHub: "eh1",
      event: { body: { case: "text", value: "from the browser" }, partitionId: "1", properties: { origin: "A" } },
    });
    assert.equal(one.ok, true, JSON.stringify(one));
    assert.equal(one.response.partitionId, "1");
    // Connect's gRPC-Web request (content-type application/grpc-web+proto) is not a simple one: the browser asked.
    await preflight(network, "SendEvent", 200, logs);
    const many = await call(page, "sendEvents", {
      eventHub: "eh1",
      events: [
        { body: { case: "text", value: "batch one" }, partitionId: "1" },
        { body: { case: "text", value: "batch two" }, partitionId: "1" },
      ],
    });
    assert.equal(many.ok, true, JSON.stringify(many));
    assert.equal(many.response.results.length, 2, JSON.stringify(many));
    const events = await readAfter("1", last, 3);
    assert.deepEqual(
      events.map((event) => Buffer.from(event.body).toString()),
      ["from the browser", "batch one", "batch two"],
    );
    assert.equal(events[0].properties?.origin, "A");
    assert.equal(events[0].sequenceNumber, last + 1);
  } finally {
    await page.close();
  }
});

test("a refusal's rich error is readable by the page of an allowed origin (grpc-status-details-bin exposed)", { skip, timeout: 60000 }, async () => {
  const { page } = await openPage(originA);
  try {
    const refused = await call(page, "sendEvent", { eventHub: "eh1", event: { body: { case: "text", value: "x" }, partitionId: "9" } });
    assert.equal(refused.ok, false, JSON.stringify(refused));
    assert.equal(refused.code, "InvalidArgument", JSON.stringify(refused));
    assert.equal(refused.reason, "INVALID_EVENT", JSON.stringify(refused));
    assert.deepEqual(refused.fields, ["event.partition_id"]);
    const unknown = await call(page, "getEventHubProperties", { eventHub: "nope" });
    assert.equal(unknown.code, "NotFound", JSON.stringify(unknown));
    assert.equal(unknown.reason, "UNKNOWN_EVENT_HUB", JSON.stringify(unknown));
  } finally {
    await page.close();
  }
});

test("from an origin not allowed, the browser blocks the call at its preflight: the fetch rejects, nothing is published", { skip, timeout: 90000 }, async () => {
  const { page, logs, network } = await openPage(originB);
  try {
    const last = (await partitionEnds(gateway.emulator, "eh1"))["2"];
    const receivedBefore = await received();
    const blocked = await call(page, "sendEvent", {
      eventHub: "eh1",
      event: { body: { case: "text", value: "from origin B" }, partitionId: "2" },
    });
    // The transport's fetch() rejected (a TypeError, what a browser gives a page for a CORS failure): no status,
    // no details, no answer the page may read.
    assert.equal(blocked.ok, false, JSON.stringify(blocked));
    assert.equal(blocked.cause?.name, "TypeError", JSON.stringify(blocked));
    assert.equal(blocked.reason, null);
    // The browser asked first (OPTIONS) and the gateway refused: the preflight, not the answer, stopped the call.
    await preflight(network, "SendEvent", 403, logs);
    const batch = await call(page, "sendEvents", {
      eventHub: "eh1",
      events: [{ body: { case: "text", value: "batch from origin B" }, partitionId: "2" }],
    });
    assert.equal(batch.ok, false, JSON.stringify(batch));
    assert.equal(batch.cause?.name, "TypeError", JSON.stringify(batch));
    // The gateway serves a POST whatever its Origin (CORS protects the page's users): that none of these events
    // was even received shows the browser never sent the POST, the refused preflight stopped it.
    assert.equal(await received(), receivedBefore, `the gateway received an event from origin B; console: ${logs.join(" | ")}`);
    // Nothing stored: the next event of partition 2, sent from origin A, comes right after the last one.
    const { page: allowed } = await openPage(originA);
    try {
      const after = await call(allowed, "sendEvent", {
        eventHub: "eh1",
        event: { body: { case: "text", value: "after origin B" }, partitionId: "2" },
      });
      assert.equal(after.ok, true, JSON.stringify(after));
    } finally {
      await allowed.close();
    }
    const [next] = await readAfter("2", last, 1);
    assert.equal(Buffer.from(next.body).toString(), "after origin B");
    assert.equal(next.sequenceNumber, last + 1);
    assert.equal((await partitionEnds(gateway.emulator, "eh1"))["2"], last + 1);
  } finally {
    await page.close();
  }
});
