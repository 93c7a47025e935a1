// Client-side balancing finds replicas added after it connected: a grpc-js channel with the round_robin policy
// over a resolver whose address list the test controls (as DNS over a Kubernetes headless Service would
// answer). The address list grows while clients send (a scale-out); grpc-js asks its resolver again only when
// a connection ends or gets a GOAWAY, so without max_connection_age the new gateway gets nothing, and with a
// 1 s age it gets a fair share within one age. Shares come from each gateway's /metrics.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import grpc from "@grpc/grpc-js";
import { deadline, loadGatewayPackage, metricSum, metadata, sleep, startGateway, unary, waitServing } from "./support.mjs";

const SCHEME = "rebalance-test";
/** The address lists the resolver answers, by target path. */
const pools = new Map();

/** A resolver that answers the current list of its target's pool; asked again on each GOAWAY or lost connection. */
class PoolResolver {
  constructor(target, listener) {
    this.pool = target.path;
    this.listener = listener;
    this.resolutions = 0;
  }
  updateResolution() {
    // Never synchronously with the call (the Resolver contract).
    setImmediate(() => {
      const endpoints = pools.get(this.pool).map((address) => {
        const [host, port] = address.split(":");
        return { addresses: [{ host, port: Number(port) }] };
      });
      pools.get(`${this.pool}#resolutions`).push(endpoints.length);
      this.listener(grpc.experimental.statusOrFromValue(endpoints), {}, null, "");
    });
  }
  destroy() {}
  static getDefaultAuthority(target) {
    return target.path;
  }
}
grpc.experimental.registerResolver(SCHEME, PoolResolver);

const gateways = [];
after(async () => {
  for (const gateway of gateways) await gateway.stop();
});

const OK = { outcome: "ok" };
const SENT = "eventhub_gateway_events_sent_total";

/** Two gateways on one emulator, one channel with round_robin over a pool that starts with the first; 8 calls at
 * a time keep sending; the second joins the pool; after `settleMs`, each gateway's events in a 3 s window. */
async function scaleOut(pool, env, settleMs) {
  const first = await startGateway(["--emulator", "--listen", "127.0.0.1:0", "--event-hub", pool], 20000, env);
  const second = await startGateway(
    ["--connection-string", first.emulator, "--listen", "127.0.0.1:0", "--event-hub", pool],
    20000,
    env,
  );
  gateways.push(first, second);
  await waitServing(first.grpc);
  await waitServing(second.grpc);
  pools.set(pool, [first.grpc]);
  pools.set(`${pool}#resolutions`, []);
  const { EventHubGateway } = loadGatewayPackage();
  const client = new EventHubGateway(`${SCHEME}:///${pool}`, grpc.credentials.createInsecure(), {
    "grpc.service_config": JSON.stringify({ loadBalancingConfig: [{ round_robin: {} }] }),
  });
  let running = true;
  const failures = [];
  const sender = async (id) => {
    for (let n = 0; running; n++) {
      try {
        await unary(client, "SendEvent", { event: { text: `${id}-${n}` } }, metadata(), deadline(5000));
      } catch (error) {
        failures.push(error.code);
      }
      await sleep(10);
    }
  };
  const senders = Array.from({ length: 8 }, (_, id) => sender(id));
  await sleep(1000);
  const firstBefore = await metricSum(first.metrics, SENT, OK);
  assert.ok(firstBefore > 0, "the first gateway carries the load");
  pools.get(pool).push(second.grpc);
  const secondAtScaleOut = await metricSum(second.metrics, SENT, OK);
  await sleep(settleMs);
  const [a, b] = [await metricSum(first.metrics, SENT, OK), await metricSum(second.metrics, SENT, OK)];
  await sleep(3000);
  const [a2, b2] = [await metricSum(first.metrics, SENT, OK), await metricSum(second.metrics, SENT, OK)];
  running = false;
  await Promise.all(senders);
  client.close();
  return {
    secondAtScaleOut,
    window: [a2 - a, b2 - b],
    failures,
    resolutions: pools.get(`${pool}#resolutions`),
  };
}

test("round_robin finds a replica added after it connected only when connections age", async () => {
  const pinned = await scaleOut("pinned", {}, 1500);
  console.log("without max_connection_age:", JSON.stringify(pinned));
  assert.equal(pinned.secondAtScaleOut, 0);
  assert.ok(pinned.window[0] > 0, JSON.stringify(pinned));
  assert.equal(pinned.window[1], 0, "no re-resolution without a GOAWAY: " + JSON.stringify(pinned));
  assert.deepEqual(pinned.failures, []);

  const aging = {
    EVENTHUB_GATEWAY_LIMITS__MAX_CONNECTION_AGE_SECONDS: "1",
    EVENTHUB_GATEWAY_LIMITS__MAX_CONNECTION_AGE_GRACE_SECONDS: "2",
    EVENTHUB_GATEWAY_PRODUCER__SEND_TIMEOUT: "2",
  };
  // One age with its jitter (1.1 s), and a margin for the re-resolution and the new connection.
  const spread = await scaleOut("spread", aging, 1500);
  const share = spread.window[1] / (spread.window[0] + spread.window[1]);
  console.log("with max_connection_age 1 s:", JSON.stringify(spread), "second's share", share.toFixed(3));
  assert.ok(share >= 0.25 && share <= 0.75, JSON.stringify(spread));
  assert.ok(spread.resolutions.some((count) => count === 2), "the resolver was asked again after the scale-out");
  // A call racing a GOAWAY is retried by grpc-js itself (transparent retry): none fails.
  assert.deepEqual(spread.failures, []);
});
