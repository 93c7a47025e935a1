// Authenticated callers from Node: @grpc/grpc-js sending ES256 JWTs (signed with node:crypto, keys made at test
// time, verified by the gateway against a JWKS file) to `serve --emulator` with `[auth] required = true`.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createSign, generateKeyPairSync } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import grpc from "@grpc/grpc-js";
import { callStatus, deadline, detail, gatewayClient, metadata, startGateway, unary, unpackStatus, waitServing } from "./support.mjs";

const ISSUER = "https://issuer.test";
const AUDIENCE = "eventhub-gateway";
const IDENTITY = "system:serviceaccount:billing:api";

const { privateKey, publicKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
const base64url = (value) => Buffer.from(value).toString("base64url");

/** A compact JWS of `claims` signed ES256 (the signature as r||s, as JOSE wants, not DER). */
function token(claims = {}) {
  const now = Math.floor(Date.now() / 1000);
  const header = base64url(JSON.stringify({ alg: "ES256", typ: "JWT", kid: "node-es256" }));
  const payload = base64url(
    JSON.stringify({ iss: ISSUER, aud: AUDIENCE, sub: IDENTITY, iat: now, exp: now + 600, ...claims }),
  );
  const signer = createSign("SHA256");
  signer.update(`${header}.${payload}`);
  const signature = signer.sign({ key: privateKey, dsaEncoding: "ieee-p1363" });
  return `${header}.${payload}.${base64url(signature)}`;
}

const bearer = (jwt) => metadata({ authorization: `Bearer ${jwt}` });

let directory;
let gateway;
let client;

before(async () => {
  directory = mkdtempSync(path.join(tmpdir(), "gateway-auth-"));
  const jwks = { keys: [{ ...publicKey.export({ format: "jwk" }), kid: "node-es256", alg: "ES256", use: "sig" }] };
  writeFileSync(path.join(directory, "jwks.json"), JSON.stringify(jwks));
  const config = path.join(directory, "gateway.toml");
  writeFileSync(
    config,
    `[auth]
required = true

[[auth.jwt]]
issuer = "${ISSUER}"
audiences = ["${AUDIENCE}"]
jwks_file = "${path.join(directory, "jwks.json")}"

[[auth.grants]]
name = "billing"
identities = ["system:serviceaccount:billing:*"]
event_hubs = ["eh1"]
`,
  );
  gateway = await startGateway([
    "--emulator", "--listen", "127.0.0.1:0", "--event-hub", "eh1", "--event-hub", "eh2", "--config", config,
  ]);
  client = gatewayClient(gateway.grpc);
  await waitServing(gateway.grpc, "eventhub.gateway.v1.EventHubGateway", 30000);
});

after(async () => {
  client?.close();
  await gateway?.stop(5000);
  if (directory) rmSync(directory, { recursive: true, force: true });
});

function errorInfo(status, code, reason) {
  assert.equal(status.code, code, JSON.stringify(status));
  const info = detail(status, "google.rpc.ErrorInfo");
  assert.equal(info?.reason, reason, JSON.stringify(status));
  return info;
}

test("a valid ES256 token reaches its granted hub; another hub is PERMISSION_DENIED", async () => {
  const sent = await unary(client, "SendEvent", { event_hub: "eh1", event: { text: "node auth" } }, bearer(token()));
  assert.equal(sent.event_hub, "eh1");
  const refused = await unary(client, "SendEvent", { event_hub: "eh2", event: { text: "no" } }, bearer(token())).then(
    () => assert.fail("eh2 is not granted"),
    (error) => error,
  );
  assert.equal(refused.code, grpc.status.PERMISSION_DENIED);
  const info = errorInfo(callStatus(refused), grpc.status.PERMISSION_DENIED, "HUB_NOT_ALLOWED");
  assert.equal(info.metadata.event_hub, "eh2");
});

test("no token, an expired one and a wrong audience are UNAUTHENTICATED with their cause", async () => {
  const now = Math.floor(Date.now() / 1000);
  const cases = [
    [metadata(), "missing"],
    [bearer(token({ exp: now - 3600, iat: now - 7200 })), "expired"],
    [bearer(token({ aud: "someone-else" })), "wrong_audience"],
  ];
  for (const [meta, cause] of cases) {
    const error = await unary(client, "SendEvent", { event_hub: "eh1", event: { text: "no" } }, meta).then(
      () => assert.fail(`${cause}: the call succeeded`),
      (error) => error,
    );
    const info = errorInfo(callStatus(error), grpc.status.UNAUTHENTICATED, "UNAUTHENTICATED");
    assert.equal(info.metadata.cause, cause);
  }
});

test("in one stream only the events for the refused hub fail", async () => {
  const call = client.SendStream(bearer(token()), deadline(20000));
  const acks = [];
  const ended = new Promise((resolve, reject) => {
    call.on("data", (response) => acks.push(...response.acks));
    call.on("error", reject);
    call.on("end", resolve);
  });
  for (let sequence = 0; sequence < 6; sequence++) {
    call.write({ event_hub: sequence % 2 ? "eh2" : "eh1", sequence, event: { text: `stream ${sequence}` } });
  }
  call.end();
  await ended;
  assert.equal(acks.length, 6);
  for (const ack of acks) {
    const status = unpackStatus(ack.status);
    if (Number(ack.sequence) % 2) errorInfo(status, grpc.status.PERMISSION_DENIED, "HUB_NOT_ALLOWED");
    else assert.equal(status.code, 0, JSON.stringify(status));
  }
});
