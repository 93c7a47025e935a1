"""Authenticated callers end to end: grpcio against `serve --emulator` with `[auth] required = true`, real JWTs
(RS256, ES256, EdDSA signed by PyJWT with keys made at test time, verified against a JWKS file), API keys,
and mTLS client certificates made with openssl. Each refusal is checked for its code, reason and cause, and
no credential may appear in a log line or an error."""

import hashlib
import hmac
import json
import secrets
import subprocess
import time

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from conftest import BINARY, wait_for
from gateway_client import (
    CALL_TIMEOUT,
    GatewayProcess,
    call_status,
    check_error,
    collect_acks,
    result_status,
    sample,
    scrape,
    stream_requests,
)
from pki import issue, make_ca

ISSUER = "https://issuer.test"
AUDIENCE = "eventhub-gateway"
BILLING_SA = "system:serviceaccount:billing:api"
SPIFFE_ID = "spiffe://cluster.local/ns/billing/sa/api"
OK = grpc.StatusCode.OK


class Keys:
    """Signing keys by algorithm, their JWKS, an API key, and tokens made with them."""

    def __init__(self):
        self.private = {
            "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ES256": ec.generate_private_key(ec.SECP256R1()),
            "EdDSA": ed25519.Ed25519PrivateKey.generate(),
        }
        to_jwk = {"RS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}
        self.jwks = {"keys": []}
        for alg, key in self.private.items():
            jwk = to_jwk[alg].to_jwk(key.public_key(), as_dict=True)
            jwk.update(kid=f"kid-{alg}", use="sig", alg=alg)
            self.jwks["keys"].append(jwk)
        self.api_key = secrets.token_urlsafe(32)

    def token(self, alg="RS256", kid=None, key=None, **claims):
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": BILLING_SA, "iat": now, "exp": now + 600, **claims}
        payload = {name: value for name, value in payload.items() if value is not None}
        signing_key = key if key is not None else self.private[alg]
        return jwt.encode(payload, signing_key, algorithm=alg, headers={"kid": kid or f"kid-{alg}"})

    def hs256_with_the_public_key(self):
        """The key-confusion attack: HS256 keyed with the RSA key's public PEM (PyJWT refuses to make it)."""
        public_pem = self.private["RS256"].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        now = int(time.time())
        header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "kid-RS256"}))
        payload = b64(json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": BILLING_SA, "exp": now + 600}))
        signature = hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{b64(signature)}"


def b64(data):
    return jwt.utils.base64url_encode(data.encode() if isinstance(data, str) else data).decode()


def auth_config(directory, keys, extra=""):
    """The gateway's config file: JWTs of ISSUER, one API key, and two grants (billing -> eh1, batch -> eh2)."""
    jwks_file = directory / "jwks.json"
    jwks_file.write_text(json.dumps(keys.jwks))
    digest = hashlib.sha256(keys.api_key.encode()).hexdigest()
    config = directory / "gateway.toml"
    config.write_text(
        f"""
{extra}
[auth]
required = true

[[auth.jwt]]
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
jwks_file = "{jwks_file}"

[[auth.api_keys]]
identity = "billing-batch"
sha256 = "{digest}"

[[auth.grants]]
name = "billing"
identities = ["system:serviceaccount:billing:*", "spiffe://cluster.local/ns/billing/*"]
event_hubs = ["eh1"]

[[auth.grants]]
name = "batch"
identities = ["billing-batch"]
event_hubs = ["eh2"]
events_per_second = 5
"""
    )
    return config


HUBS = ["--emulator", "--event-hub", "eh1", "--event-hub", "eh2", "--emulator-partitions", "2"]


@pytest.fixture(scope="module")
def keys():
    return Keys()


@pytest.fixture(scope="module")
def secured(api, keys, tmp_path_factory):
    """One gateway requiring auth, logging at trace level (every line kept, to look for credentials in)."""
    config = auth_config(tmp_path_factory.mktemp("auth"), keys)
    running = GatewayProcess(
        api, *HUBS, "--config", str(config), env={"RUST_LOG": "trace"}, log_lines=1_000_000
    )
    assert wait_for(lambda: ready(running), timeout=30), running.logs()[-3000:]
    yield running
    running.stop()


def ready(gateway):
    """gRPC health answers SERVING (no credentials sent: probes have none). HealthCheckRequest{} is empty and
    HealthCheckResponse{status: SERVING} is the two bytes 08 01, so no generated stubs are needed."""
    check = gateway.channel.unary_unary(
        "/grpc.health.v1.Health/Check", request_serializer=None, response_deserializer=None
    )
    try:
        return check(b"", timeout=5) == b"\x08\x01"
    except grpc.RpcError:
        return False


def event(api, text):
    return api.pb.Event(text=text)


def bearer(token):
    return (("authorization", f"Bearer {token}"),)


def send(api, gateway, hub, token=None, metadata=()):
    """SendEvent to `hub` with the bearer `token`; the error (None when OK)."""
    metadata = tuple(metadata) + (bearer(token) if token else ())
    try:
        gateway.stub.SendEvent(
            api.pb.SendEventRequest(event_hub=hub, event=event(api, "auth")), metadata=metadata, timeout=CALL_TIMEOUT
        )
    except grpc.RpcError as error:
        return error
    return None


def expect_unauthenticated(api, error, cause, *secrets_not_echoed):
    assert error is not None, "the call succeeded"
    rich = check_error(call_status(api, error), grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
    assert rich.error_info.metadata["cause"] == cause, rich
    for secret in secrets_not_echoed:
        for part in secret.split("."):
            if len(part) >= 8:
                assert part not in rich.message, f"the error repeats the credential: {rich.message}"
    return rich


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_a_valid_token_reaches_its_granted_hub_and_no_other(api, secured, keys, alg):
    token = keys.token(alg)
    assert send(api, secured, "eh1", token) is None
    error = send(api, secured, "eh2", token)
    assert error is not None
    rich = check_error(call_status(api, error), grpc.StatusCode.PERMISSION_DENIED, "HUB_NOT_ALLOWED")
    assert rich.error_info.metadata["event_hub"] == "eh2"
    assert rich.error_info.metadata["identity"] == BILLING_SA


def test_no_credentials_is_unauthenticated_but_health_stays_open(api, secured):
    expect_unauthenticated(api, send(api, secured, "eh1"), "missing")
    assert ready(secured), "health needs no credentials (probes)"
    try:
        secured.stub.GetEventHubProperties(api.pb.GetEventHubPropertiesRequest(event_hub="eh1"), timeout=CALL_TIMEOUT)
        raise AssertionError("GetEventHubProperties without credentials succeeded")
    except grpc.RpcError as error:
        expect_unauthenticated(api, error, "missing")


def refused_tokens(keys):
    """(name, token, cause) for each kind of bad token."""
    now = int(time.time())
    good = keys.token()
    header, payload, signature = good.split(".")
    claims = json.loads(jwt.utils.base64url_decode(payload))
    claims["sub"] = "system:serviceaccount:admin:root"
    tampered_payload = b64(json.dumps(claims))
    unsigned = b64(json.dumps({"alg": "none", "typ": "JWT"}))
    return [
        ("expired", keys.token(exp=now - 3600, iat=now - 7200), "expired"),
        ("not yet valid", keys.token(nbf=now + 3600), "not_yet_valid"),
        ("wrong issuer", keys.token(iss="https://elsewhere.test"), "wrong_issuer"),
        ("wrong audience", keys.token(aud="someone-else"), "wrong_audience"),
        ("unknown kid", keys.token(kid="kid-unknown"), "unknown_key"),
        ("alg none", f"{unsigned}.{payload}.", "algorithm_refused"),
        ("HS256 with the public key", keys.hs256_with_the_public_key(), "algorithm_refused"),
        ("tampered payload", f"{header}.{tampered_payload}.{signature}", "bad_signature"),
        ("garbage", "not-a-token-at-all-" + "x" * 40, "unknown_api_key"),
    ]


def test_every_bad_token_is_refused_with_its_cause_and_never_echoed(api, secured, keys):
    for name, token, cause in refused_tokens(keys):
        error = send(api, secured, "eh1", token)
        rich = expect_unauthenticated(api, error, cause, token)
        assert rich.message, name


def test_an_authorization_that_is_not_bearer_is_refused(api, secured, keys):
    error = send(api, secured, "eh1", metadata=(("authorization", "Basic dXNlcjpwYXNz"),))
    expect_unauthenticated(api, error, "unsupported_scheme", "dXNlcjpwYXNz")


def test_api_keys_prove_their_identity_and_a_wrong_key_is_refused(api, secured, keys):
    assert send(api, secured, "eh2", keys.api_key) is None
    error = send(api, secured, "eh1", keys.api_key)
    check_error(call_status(api, error), grpc.StatusCode.PERMISSION_DENIED, "HUB_NOT_ALLOWED")
    wrong = secrets.token_urlsafe(32)
    expect_unauthenticated(api, send(api, secured, "eh2", wrong), "unknown_api_key", wrong)


def test_in_one_stream_only_the_events_for_a_refused_hub_fail(api, secured, keys):
    requests = [
        api.pb.SendStreamRequest(event_hub="eh1" if sequence % 2 == 0 else "eh2", sequence=sequence,
                                 event=event(api, f"stream {sequence}"))
        for sequence in range(10)
    ]
    responses = secured.stub.SendStream(iter(requests), metadata=bearer(keys.token("ES256")), timeout=CALL_TIMEOUT)
    acks, error = collect_acks(responses)
    assert error is None, error
    assert sorted(ack.sequence for ack in acks) == list(range(10))
    for ack in acks:
        status = result_status(api, ack.status)
        if ack.sequence % 2 == 0:
            assert status.code == 0, status
        else:
            check_error(status, grpc.StatusCode.PERMISSION_DENIED, "HUB_NOT_ALLOWED")
            assert status.error_info.metadata["event_hub"] == "eh2"


def test_send_events_to_a_refused_hub_fails_each_event(api, secured, keys):
    request = api.pb.SendEventsRequest(event_hub="eh2", events=[event(api, "a"), event(api, "b")])
    response = secured.stub.SendEvents(request, metadata=bearer(keys.token()), timeout=CALL_TIMEOUT)
    assert len(response.results) == 2
    for result in response.results:
        check_error(result_status(api, result.status), grpc.StatusCode.PERMISSION_DENIED, "HUB_NOT_ALLOWED")


def test_an_identitys_limit_cannot_be_dodged_by_rotating_x_client_id(api, secured, keys):
    """`batch` grants 5 events/s to billing-batch: 30 events at once, each under a new x-client-id, are
    still charged to the identity."""
    outcomes = []
    for attempt in range(30):
        error = send(api, secured, "eh2", keys.api_key, metadata=(("x-client-id", f"rotating-{attempt}"),))
        outcomes.append(error)
    refused = [error for error in outcomes if error is not None]
    # The bucket holds one second of the rate (5), refilled at 5/s while the loop runs.
    assert len(refused) >= 10, [str(error) for error in outcomes]
    for error in refused:
        rich = check_error(call_status(api, error), grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
        assert rich.quota_subjects == ["identity:billing-batch"], rich


def test_metrics_count_failures_by_reason_and_calls_by_grant(api, secured, keys):
    send(api, secured, "eh1")
    send(api, secured, "eh1", keys.token(aud="someone-else"))
    assert send(api, secured, "eh1", keys.token()) is None
    samples, _ = scrape(secured)
    assert sample(samples, "eventhub_gateway_auth_failures_total", reason="missing") >= 1
    assert sample(samples, "eventhub_gateway_auth_failures_total", reason="wrong_audience") >= 1
    assert sample(samples, "eventhub_gateway_grant_calls_total", grant="billing") >= 1
    assert sample(samples, "eventhub_gateway_grant_events_total", grant="billing") >= 1


def test_the_cli_sends_with_a_token_file(secured, keys, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(keys.token("ES256") + "\n")
    sent = subprocess.run(
        [BINARY, "send", "--gateway", secured.address, "--event-hub", "eh1", "--text", "from the CLI",
         "--token-file", str(token_file), "--quiet"],
        capture_output=True, text=True, timeout=CALL_TIMEOUT,
    )
    assert sent.returncode == 0, sent.stderr
    refused = subprocess.run(
        [BINARY, "send", "--gateway", secured.address, "--event-hub", "eh1", "--text", "no token", "--quiet"],
        capture_output=True, text=True, timeout=CALL_TIMEOUT,
    )
    assert refused.returncode != 0
    assert "UNAUTHENTICATED" in refused.stdout + refused.stderr, (refused.stdout, refused.stderr)


def test_no_credential_reaches_a_log_line_at_trace_level(api, secured, keys):
    """Runs last in this module (pytest keeps file order): every call above logged at trace level."""
    token = keys.token()
    assert send(api, secured, "eh1", token) is None
    send(api, secured, "eh1", keys.token(aud="someone-else"))
    send(api, secured, "eh2", keys.api_key)
    logs = secured.logs()
    assert "unauthenticated" in logs or "UNAUTHENTICATED" in logs or "auth" in logs, "trace logs were captured"
    header, payload, signature = token.split(".")
    for secret in [payload, signature, keys.api_key]:
        assert secret not in logs, "a credential reached the logs"


@pytest.fixture(scope="module")
def mtls(api, keys, tmp_path_factory):
    """A gateway on TLS requiring client certificates, and the client certificates of two identities."""
    directory = tmp_path_factory.mktemp("mtls")
    make_ca(directory)
    issue(directory, "server", "/CN=localhost", ["DNS:localhost", "IP:127.0.0.1"], "serverAuth")
    issue(directory, "billing", "/CN=billing-client", [f"URI:{SPIFFE_ID}", "DNS:billing.test"], "clientAuth")
    issue(directory, "stranger", "/CN=stranger", ["DNS:stranger.test"], "clientAuth")
    extra = f"""
[tls]
cert = "{directory / 'server.pem'}"
key = "{directory / 'server.key'}"
client_ca = "{directory / 'ca.pem'}"
"""
    config = auth_config(directory, keys, extra=extra)
    root = (directory / "ca.pem").read_bytes()

    def credentials(name):
        return grpc.ssl_channel_credentials(
            root_certificates=root,
            private_key=(directory / f"{name}.key").read_bytes(),
            certificate_chain=(directory / f"{name}.pem").read_bytes(),
        )

    running = GatewayProcess(api, *HUBS, "--config", str(config), credentials=credentials("billing"))
    yield running, credentials
    running.stop()


def test_a_client_certificate_proves_its_spiffe_id(api, mtls):
    gateway, credentials = mtls
    channel = gateway.open_channel(credentials("billing"))
    stub = api.grpc.EventHubGatewayStub(channel)
    stub.SendEvent(api.pb.SendEventRequest(event_hub="eh1", event=event(api, "mtls")), timeout=CALL_TIMEOUT)
    with pytest.raises(grpc.RpcError) as refused:
        stub.SendEvent(api.pb.SendEventRequest(event_hub="eh2", event=event(api, "mtls")), timeout=CALL_TIMEOUT)
    rich = check_error(call_status(api, refused.value), grpc.StatusCode.PERMISSION_DENIED, "HUB_NOT_ALLOWED")
    assert rich.error_info.metadata["identity"] == SPIFFE_ID
    channel.close()

    # A certificate whose identity (its DNS SAN) has no grant: authenticated, but allowed nowhere.
    channel = gateway.open_channel(credentials("stranger"))
    stub = api.grpc.EventHubGatewayStub(channel)
    with pytest.raises(grpc.RpcError) as refused:
        stub.SendEvent(api.pb.SendEventRequest(event_hub="eh1", event=event(api, "mtls")), timeout=CALL_TIMEOUT)
    rich = check_error(call_status(api, refused.value), grpc.StatusCode.PERMISSION_DENIED, "HUB_NOT_ALLOWED")
    assert rich.error_info.metadata["identity"] == "stranger.test"
    channel.close()

