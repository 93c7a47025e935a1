// Shared helpers of the gateway's Node suite: the gateway process, its gRPC client loaded from proto/ at run
// time, google.rpc error details decoded with protobufjs, and reading events back with @azure/event-hubs.
import { spawn } from "node:child_process";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";
import { EventHubConsumerClient, EventHubProducerClient, earliestEventPosition } from "@azure/event-hubs";

const here = path.dirname(fileURLToPath(import.meta.url));
export const repo = path.join(here, "..", "..");
export const protoDir = path.join(repo, "proto");
export const binary = process.env.EVENTHUB_GATEWAY_BIN ?? path.join(repo, "target", "debug", "eventhub-gateway");

const require = createRequire(import.meta.url);
/** The SDK's own partition key resolver (internal, so loaded from the installed package's files). */
export const { mapPartitionKeyToId } = require(
  path.join(here, "node_modules", "@azure", "event-hubs", "dist", "commonjs", "impl", "partitionKeyToIdMapper.js"),
);

/** Resolves after `ms`. */
export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** `promise`, or a rejection naming `what` after `ms`. */
export function within(ms, what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not done within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

const started = new Set();
// Whatever happens to the test process, no gateway outlives it.
process.on("exit", () => {
  for (const child of started) child.kill("SIGKILL");
});

/**
 * Starts `eventhub-gateway serve` with `args` (and `env` added to the environment) and reads the one JSON line it prints on stdout:
 * `{grpc, metrics, emulator}`. Returns `{child, grpc, metrics, emulator, stderr(), stop()}`; `stop()` sends SIGTERM and resolves
 * with the exit code (SIGKILL after `ms`, then resolving with null).
 */
export async function startGateway(args, ms = 20000, env = {}) {
  // A free metrics port too, so parallel gateways never race for the default 9464.
  const child = spawn(binary, ["serve", "--metrics-listen", "127.0.0.1:0", ...args], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, ...env },
  });
  started.add(child);
  let stderr = "";
  child.stderr.on("data", (chunk) => {
    stderr = (stderr + chunk).slice(-20000);
  });
  const exited = new Promise((resolve) => child.on("exit", (code, signal) => resolve({ code, signal })));
  exited.then(() => started.delete(child));
  let line;
  try {
    line = await within(
      ms,
      "the gateway's JSON line",
      new Promise((resolve, reject) => {
        let buffered = "";
        child.stdout.on("data", (chunk) => {
          buffered += chunk;
          const newline = buffered.indexOf("\n");
          if (newline >= 0) resolve(buffered.slice(0, newline).trim());
        });
        child.on("error", reject);
        exited.then(({ code, signal }) => reject(new Error(`the gateway exited (${code ?? signal}): ${stderr}`)));
      }),
    );
  } catch (error) {
    child.kill("SIGKILL");
    throw error;
  }
  const announced = JSON.parse(line);
  return {
    child,
    grpc: announced.grpc,
    metrics: announced.metrics,
    emulator: announced.emulator,
    stderr: () => stderr,
    async stop(ms = 15000) {
      if (child.exitCode !== null || child.signalCode !== null) return (await exited).code;
      child.kill("SIGTERM");
      try {
        return (await within(ms, "the gateway's exit after SIGTERM", exited)).code;
      } catch {
        child.kill("SIGKILL");
        await exited;
        return null;
      }
    },
  };
}

/** The sum of the samples of `name` in the Prometheus page at `metrics` whose labels include `labels`. */
export async function metricSum(metrics, name, labels = {}) {
  const page = await (await fetch(`http://${metrics}/metrics`)).text();
  let sum = 0;
  for (const line of page.split("\n")) {
    if (!line.startsWith(`${name}{`) && !line.startsWith(`${name} `)) continue;
    const wanted = Object.entries(labels).every(([key, value]) => line.includes(`${key}="${value}"`));
    if (wanted) sum += Number(line.slice(line.lastIndexOf(" ") + 1));
  }
  return sum;
}

/** proto-loader options of the suite. */
export const loaderOptions = {
  includeDirs: [protoDir],
  keepCase: true,
  longs: String,
  defaults: true,
  oneofs: true,
};

/** The `eventhub.gateway.v1` package, loaded from proto/ at run time. */
export function loadGatewayPackage() {
  const definition = protoLoader.loadSync("eventhub/gateway/v1/gateway.proto", loaderOptions);
  return grpc.loadPackageDefinition(definition).eventhub.gateway.v1;
}

/** A plaintext `EventHubGateway` client of `address`. */
export function gatewayClient(address) {
  const { EventHubGateway } = loadGatewayPackage();
  return new EventHubGateway(address, grpc.credentials.createInsecure());
}

/** Call options with a deadline `ms` from now. */
export const deadline = (ms = 15000) => ({ deadline: new Date(Date.now() + ms) });

/** Metadata from a plain object. */
export function metadata(entries = {}) {
  const result = new grpc.Metadata();
  for (const [key, value] of Object.entries(entries)) result.set(key, value);
  return result;
}

/** Calls a unary method; resolves with the response or rejects with the grpc-js error (code, details, metadata). */
export function unary(client, method, request, meta = metadata(), options = deadline()) {
  return new Promise((resolve, reject) => {
    client[method](request, meta, options, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

// google.rpc types decoded with protobufjs, from the vendored protos (google/protobuf/* come bundled).
const rpcRoot = new protobuf.Root();
rpcRoot.resolvePath = (_origin, target) => (path.isAbsolute(target) ? target : path.join(protoDir, target));
rpcRoot.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], { keepCase: true });
const RpcStatus = rpcRoot.lookupType("google.rpc.Status");
const conversion = { longs: String, enums: String, defaults: true };

/** An `Any`'s message, decoded by its type URL; `{"@type": name, ...fields}`. */
export function unpackAny(any) {
  const typeName = any.type_url.slice(any.type_url.lastIndexOf("/") + 1);
  const type = rpcRoot.lookupType(typeName);
  return { "@type": typeName, ...type.toObject(type.decode(any.value), conversion) };
}

/** A `google.rpc.Status` (as proto-loader or protobufjs gives it) with its details unpacked. */
export function unpackStatus(status) {
  return { code: status.code, message: status.message, details: (status.details ?? []).map(unpackAny) };
}

// The gateway's own messages with protobufjs, to send bytes proto-loader's stubs would not.
const gatewayRoot = new protobuf.Root();
gatewayRoot.resolvePath = rpcRoot.resolvePath;
gatewayRoot.loadSync("eventhub/gateway/v1/gateway.proto", { keepCase: true });
export const SendStreamRequest = gatewayRoot.lookupType("eventhub.gateway.v1.SendStreamRequest");
const SendStreamResponse = gatewayRoot.lookupType("eventhub.gateway.v1.SendStreamResponse");

/**
 * Calls SendStream on `address` writing each of `messages` (Buffers) as one message, as is, then half-closing.
 * Resolves with `{acks, error}`: the acks (plain objects, sequences as strings) and the call's error (null
 * when it ended OK).
 */
export function rawSendStream(address, messages, ms = 15000) {
  const raw = new grpc.Client(address, grpc.credentials.createInsecure());
  const call = raw.makeBidiStreamRequest(
    "/eventhub.gateway.v1.EventHubGateway/SendStream",
    (bytes) => bytes,
    (bytes) => SendStreamResponse.toObject(SendStreamResponse.decode(bytes), conversion),
    new grpc.Metadata(),
    deadline(ms),
  );
  const acks = [];
  const ended = new Promise((resolve) => {
    call.on("data", (response) => acks.push(...response.acks));
    call.on("error", (error) => resolve({ acks, error }));
    call.on("status", (status) => {
      if (status.code === grpc.status.OK) resolve({ acks, error: null });
    });
  });
  for (const message of messages) call.write(message);
  call.end();
  return within(ms + 5000, "raw SendStream", ended).finally(() => raw.close());
}

/** The `google.rpc.Status` of a failed call, from its `grpc-status-details-bin` trailer, details unpacked. */
export function callStatus(error) {
  const [bytes] = error.metadata?.get("grpc-status-details-bin") ?? [];
  if (!bytes) throw new Error(`no grpc-status-details-bin on ${error.code} ${error.details}`);
  const status = RpcStatus.toObject(RpcStatus.decode(bytes), conversion);
  return unpackStatus(status);
}

/** The detail of `typeName` (e.g. "google.rpc.ErrorInfo") of an unpacked status, or undefined. */
export const detail = (status, typeName) => status.details.find((d) => d["@type"] === typeName);

// grpc.health.v1, which the repository does not vendor: its two messages, built with protobufjs.
const healthRoot = protobuf.Root.fromJSON({
  nested: {
    grpc: {
      nested: {
        health: {
          nested: {
            v1: {
              nested: {
                HealthCheckRequest: { fields: { service: { type: "string", id: 1 } } },
                HealthCheckResponse: {
                  fields: { status: { type: "ServingStatus", id: 1 } },
                  nested: {
                    ServingStatus: { values: { UNKNOWN: 0, SERVING: 1, NOT_SERVING: 2, SERVICE_UNKNOWN: 3 } },
                  },
                },
              },
            },
          },
        },
      },
    },
  },
});
const HealthCheckRequest = healthRoot.lookupType("grpc.health.v1.HealthCheckRequest");
const HealthCheckResponse = healthRoot.lookupType("grpc.health.v1.HealthCheckResponse");
const HealthClient = grpc.makeGenericClientConstructor(
  {
    Check: {
      path: "/grpc.health.v1.Health/Check",
      requestStream: false,
      responseStream: false,
      requestSerialize: (message) => Buffer.from(HealthCheckRequest.encode(HealthCheckRequest.create(message)).finish()),
      requestDeserialize: (bytes) => HealthCheckRequest.decode(bytes),
      responseSerialize: (message) => Buffer.from(HealthCheckResponse.encode(message).finish()),
      responseDeserialize: (bytes) => HealthCheckResponse.toObject(HealthCheckResponse.decode(bytes), { enums: String, defaults: true }),
    },
  },
  "Health",
);

/** A `grpc.health.v1.Health` client of `address`. */
export const healthClient = (address) => new HealthClient(address, grpc.credentials.createInsecure());

/** Polls Health/Check for `service` until SERVING, for at most `ms`; returns the last status seen. */
export async function waitServing(address, service, ms = 10000) {
  const client = healthClient(address);
  const until = Date.now() + ms;
  let last;
  try {
    while (Date.now() < until) {
      try {
        last = (await unary(client, "Check", { service }, metadata(), deadline(2000))).status;
        if (last === "SERVING") return last;
      } catch (error) {
        last = `error ${error.code}: ${error.details}`;
      }
      await sleep(100);
    }
    return last;
  } finally {
    client.close();
  }
}

// A few retries: the suite shares two cores with builds, and a slow management answer is not what it tests.
const retryOptions = { maxRetries: 3, retryDelayInMs: 300, timeoutInMs: 10000 };

/** The partition ids of `hub` and each one's last enqueued sequence number (-1 when empty), by the SDK. */
export async function partitionEnds(connectionString, hub) {
  const producer = new EventHubProducerClient(connectionString, hub, { retryOptions });
  try {
    const ids = await producer.getPartitionIds();
    const ends = {};
    for (const id of ids) ends[id] = (await producer.getPartitionProperties(id)).lastEnqueuedSequenceNumber;
    return ends;
  } finally {
    await producer.close();
  }
}

/**
 * Reads `expected` events of one partition from `position` with the official consumer, or fails after `ms`.
 * Bodies come as raw bytes (`skipParsingBodyAsJson`) unless `parseJsonBodies`, as the SDK does by default.
 */
export async function readPartition(
  connectionString,
  hub,
  partitionId,
  expected,
  position = earliestEventPosition,
  ms = 30000,
  { parseJsonBodies = false } = {},
) {
  const consumer = new EventHubConsumerClient("$Default", connectionString, hub, { retryOptions });
  const events = [];
  if (expected === 0) return events;
  let subscription;
  try {
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${hub}/${partitionId}: only ${events.length} of ${expected} events in time`)), ms);
      subscription = consumer.subscribe(
        partitionId,
        {
          processEvents: async (batch) => {
            events.push(...batch);
            if (events.length >= expected) {
              clearTimeout(timer);
              resolve();
            }
          },
          processError: async () => {},
        },
        { startPosition: position, maxWaitTimeInSeconds: 1, maxBatchSize: 500, skipParsingBodyAsJson: !parseJsonBodies },
      );
    });
  } finally {
    await subscription?.close();
    await consumer.close();
  }
  return events;
}

/** Every event stored in every partition of `hub` now: `{partitionId: [events]}`. */
export async function readHub(connectionString, hub) {
  const ends = await partitionEnds(connectionString, hub);
  const reads = Object.entries(ends).map(async ([id, last]) => [id, await readPartition(connectionString, hub, id, last + 1)]);
  return Object.fromEntries(await Promise.all(reads));
}

/** Sends `events` (EventData) with `partitionKey` through the SDK's own producer. */
export async function sdkSendWithKey(connectionString, hub, partitionKey, events) {
  const producer = new EventHubProducerClient(connectionString, hub, { retryOptions });
  try {
    const batch = await producer.createBatch({ partitionKey });
    for (const event of events) if (!batch.tryAdd(event)) throw new Error("the batch is full");
    await producer.sendBatch(batch);
  } finally {
    await producer.close();
  }
}
