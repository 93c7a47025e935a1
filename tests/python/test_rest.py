"""The Event Hubs REST send API (`http_listen`) end to end: a `serve --emulator` process with SAS keys, API keys
and grants; senders written as Azure's REST documentation shows (curl, and Python `requests` with the SAS signed
by hand as the documentation's Python sample does), every event read back with the official `azure-eventhub`
consumer (bodies, partition keys, partitions, properties exact), and every refusal checked for its HTTP status,
JSON body and `Retry-After`."""

import base64
import hashlib
import hmac
import json
import secrets
import socket
import subprocess
import time
import urllib.parse
import uuid

import grpc
import pytest
import requests

from gateway_client import (
    CALL_TIMEOUT,
    GatewayProcess,
    body,
    partition_positions,
    properties,
    read_since,
    sample,
    scrape,
)
from pki import issue, make_ca

HUBS = ["--emulator", "--event-hub", "eh1", "--event-hub", "eh2", "--emulator-partitions", "4"]
DEVICES_KEY = base64.b64encode(secrets.token_bytes(32)).decode()
STRANGER_KEY = base64.b64encode(secrets.token_bytes(32)).decode()
API_KEY = secrets.token_urlsafe(32)
SLOW_KEY = secrets.token_urlsafe(32)
TIMEOUT = 30


def generate_sas_token(uri, key_name, key, expiry_seconds=3600, expiry=None):
    """The SAS token exactly as Azure's documentation signs one in Python (`Generate SAS token`)."""
    if expiry is None:
        expiry = int(time.time() + expiry_seconds)
    string_to_sign = urllib.parse.quote_plus(uri) + "\n" + str(expiry)
    signed_hmac_sha256 = hmac.HMAC(key.encode("utf-8"), string_to_sign.encode("utf-8"), hashlib.sha256)
    signature = urllib.parse.quote(base64.b64encode(signed_hmac_sha256.digest()))
    return "SharedAccessSignature sr={}&sig={}&se={}&skn={}".format(
        urllib.parse.quote_plus(uri), signature, expiry, key_name
    )


def config_text(directory, extra=""):
    (directory / "devices.key").write_text(DEVICES_KEY + "\n")
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    slow = hashlib.sha256(SLOW_KEY.encode()).hexdigest()
    return f"""
http_listen = "127.0.0.1:0"
{extra}
[auth]
required = true

[[auth.sas_keys]]
name = "devices"
identity = "device-fleet"
key_file = "{directory / 'devices.key'}"

[[auth.sas_keys]]
name = "strangers"
identity = "stranger"
key_env = "TEST_STRANGER_SAS_KEY"

[[auth.api_keys]]
identity = "scripts"
sha256 = "{digest}"

[[auth.api_keys]]
identity = "slow"
sha256 = "{slow}"

[[auth.grants]]
name = "devices"
identities = ["device-fleet"]
event_hubs = ["eh1"]

[[auth.grants]]
name = "scripts"
identities = ["scripts"]
event_hubs = ["*"]

[[auth.grants]]
name = "slow"
identities = ["slow"]
event_hubs = ["eh1"]
events_per_second = 1
"""


@pytest.fixture(scope="module")
def rest(api, tmp_path_factory):
    directory = tmp_path_factory.mktemp("rest")
    config = directory / "gateway.toml"
    config.write_text(config_text(directory))
    running = GatewayProcess(
        api, *HUBS, "--config", str(config), env={"TEST_STRANGER_SAS_KEY": STRANGER_KEY, "RUST_LOG": "debug"},
        log_lines=100_000,
    )
    assert running.http, "serve printed no `http` address"
    yield running
    running.stop()


def url(gateway, path, scheme="http"):
    return f"{scheme}://{gateway.http}{path}?timeout=60&api-version=2014-01"


def devices_sas(gateway, resource_path="/eh1", **options):
    """A token for the gateway's own URL, as a REST sender pointed at it signs one."""
    return generate_sas_token(f"http://{gateway.http}{resource_path}", "devices", DEVICES_KEY, **options)


def post(gateway, path, data, headers=None, scheme="http", **options):
    return requests.post(url(gateway, path, scheme), data=data, headers=headers or {}, timeout=TIMEOUT, **options)


def run_id():
    return uuid.uuid4().hex[:12]


def error_of(response, status, reason):
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error.get("reason") == reason, error
    return error


def stored_events(gateway, hub, before):
    return {p: events for p, events in read_since(gateway.connection_string, hub, before).items() if events}


# ------------------------------------------------------------------------------------------------------------
# Publishing
# ------------------------------------------------------------------------------------------------------------


def test_curl_sends_one_event_as_the_docs_show_and_the_sdk_reads_it_back_exact(rest):
    run = run_id()
    before = partition_positions(rest.connection_string, "eh1")
    payload = json.dumps({"DeviceId": "dev-01", "Temperature": "37.0", "run": run})
    key = f"device-{run}"
    result = subprocess.run(
        [
            "curl", "-sS", "-o", "/dev/stderr", "-w", "%{http_code}", "-X", "POST", url(rest, "/eh1/messages"),
            "-H", f"Authorization: {devices_sas(rest)}",
            "-H", "Content-Type: application/atom+xml;type=entry;charset=utf-8",
            "-H", f'BrokerProperties: {{"PartitionKey": "{key}", "MessageId": "m-{run}", "CorrelationId": "c-1"}}',
            "-H", "Alert: Strong Wind",
            "-H", "x-ms-retrypolicy: NoRetry",
            "--data-binary", payload,
        ],
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert result.stdout == "201", (result.stdout, result.stderr)
    assert result.stderr == "", "201 has an empty body"
    stored = stored_events(rest, "eh1", before)
    [(partition, [event])] = stored.items()
    assert body(event) == payload.encode()
    assert event.partition_key in (key, key.encode())
    assert event.message_id == f"m-{run}"
    assert event.correlation_id == "c-1"
    assert event.content_type is None, "the request's Content-Type is HTTP's, not the event's"
    assert properties(event) == {"alert": "Strong Wind"}, "custom headers, and only they, are properties"

    # The same key lands on the same partition again (Event Hubs hashes it).
    before = partition_positions(rest.connection_string, "eh1")
    again = post(rest, "/eh1/messages", b"again", {
        "Authorization": devices_sas(rest), "BrokerProperties": json.dumps({"PartitionKey": key}),
    })
    assert again.status_code == 201, again.text
    assert list(stored_events(rest, "eh1", before)) == [partition]


def test_requests_sends_a_batch_with_user_and_broker_properties(rest):
    run = run_id()
    before = partition_positions(rest.connection_string, "eh1")
    batch = [
        {"Body": f"one-{run}", "UserProperties": {"Alert": "Strong Wind", "Count": 3, "Ok": True}},
        {"Body": base64.b64encode(b"\x00\x01\xff" + run.encode()).decode(), "IsBodyBase64": True,
         "BrokerProperties": {"PartitionKey": f"k-{run}", "ContentType": "application/octet-stream"}},
        {"Body": json.dumps({"t": 1}), "BrokerProperties": {"PartitionKey": f"k-{run}", "MessageId": f"three-{run}"}},
    ]
    response = requests.post(
        url(rest, "/eh1/messages"),
        headers={
            "Authorization": devices_sas(rest),
            "Content-Type": "application/vnd.microsoft.servicebus.json",
            "Ignored": "custom headers are not a batch's properties",
        },
        data=json.dumps(batch),
        timeout=TIMEOUT,
    )
    assert response.status_code == 201, response.text
    assert response.content == b""
    everything = [event for events in stored_events(rest, "eh1", before).values() for event in events]
    assert len(everything) == 3
    by_body = {body(event): event for event in everything}
    first = by_body[f"one-{run}".encode()]
    assert properties(first) == {"Alert": "Strong Wind", "Count": "3", "Ok": "true"}
    assert first.partition_key is None
    second = by_body[b"\x00\x01\xff" + run.encode()]
    assert second.content_type == "application/octet-stream"
    third = by_body[json.dumps({"t": 1}).encode()]
    assert third.message_id == f"three-{run}"
    assert properties(second) == properties(third) == {}
    for keyed in (second, third):
        assert keyed.partition_key in (f"k-{run}", f"k-{run}".encode())


def test_partition_and_publisher_routes(rest):
    before = partition_positions(rest.connection_string, "eh2")
    auth = {"Authorization": f"Bearer {API_KEY}"}
    for partition in "0123":
        response = post(rest, f"/eh2/partitions/{partition}/messages", f"to-{partition}".encode(), auth)
        assert response.status_code == 201, response.text
    stored = stored_events(rest, "eh2", before)
    assert {p: [body(e) for e in events] for p, events in stored.items()} == {
        p: [f"to-{p}".encode()] for p in "0123"
    }

    before = partition_positions(rest.connection_string, "eh1")
    publisher = f"dev-{run_id()}"
    sas = devices_sas(rest, f"/eh1/publishers/{publisher}")
    for n in range(3):
        response = post(rest, f"/eh1/publishers/{publisher}/messages", f"p{n}".encode(), {"Authorization": sas})
        assert response.status_code == 201, response.text
    stored = stored_events(rest, "eh1", before)
    [(_, events)] = stored.items()
    assert [body(e) for e in events] == [b"p0", b"p1", b"p2"], "one publisher: one partition, in order"
    assert all(e.partition_key in (publisher, publisher.encode()) for e in events)


def test_sas_signed_for_the_gateway_works_over_grpc_too(api, rest):
    token = generate_sas_token("sb://any-host.example/eh1", "devices", DEVICES_KEY)
    event = api.pb.Event(text="over grpc", partition_id="2")
    response = rest.stub.SendEvent(
        api.pb.SendEventRequest(event_hub="eh1", event=event),
        metadata=(("authorization", token),), timeout=CALL_TIMEOUT,
    )
    assert response.partition_id == "2"


# ------------------------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------------------------


def test_missing_expired_forged_and_unknown_credentials_are_401(rest):
    def refused(authorization, cause):
        headers = {} if authorization is None else {"Authorization": authorization}
        error = error_of(post(rest, "/eh1/messages", b"x", headers), 401, "UNAUTHENTICATED")
        assert error["code"] == "UNAUTHENTICATED"
        assert error["metadata"]["cause"] == cause, error
        if authorization:
            assert authorization.split("sig=")[-1].split("&")[0] not in json.dumps(error), "never echoed"
        return error

    refused(None, "missing")
    expired = refused(devices_sas(rest, expiry=int(time.time()) - 30), "expired")
    assert "expired" in expired["message"]
    refused(generate_sas_token(f"http://{rest.http}/eh1", "devices", "not-the-key"), "sas_bad_signature")
    refused(generate_sas_token(f"http://{rest.http}/eh1", "nobody", DEVICES_KEY), "sas_unknown_key_name")
    refused("SharedAccessSignature sr=x&sig=y", "malformed")
    refused("Bearer not-a-configured-key", "unknown_api_key")
    samples, _ = scrape(rest)
    assert (sample(samples, "eventhub_gateway_auth_failures_total", reason="sas_bad_signature") or 0) >= 1
    assert (sample(samples, "eventhub_gateway_rest_requests_total", route="hub", status="401") or 0) >= 6


def test_a_hub_not_granted_or_not_covered_by_sr_is_403(rest):
    # The stranger's key is valid, but no grant gives its identity any hub.
    stranger = generate_sas_token(f"http://{rest.http}/eh1", "strangers", STRANGER_KEY)
    error_of(post(rest, "/eh1/messages", b"x", {"Authorization": stranger}), 403, "HUB_NOT_ALLOWED")
    # The devices' grant covers eh1, but not eh2.
    error_of(post(rest, "/eh2/messages", b"x", {"Authorization": devices_sas(rest, "/eh2")}), 403, "HUB_NOT_ALLOWED")
    # A token signed for eh2 does not cover eh1, whatever the grants.
    covered = error_of(
        post(rest, "/eh1/messages", b"x", {"Authorization": devices_sas(rest, "/eh2")}), 403, "HUB_NOT_ALLOWED"
    )
    assert "sr" in covered["message"] and covered["metadata"]["event_hub"] == "eh1"
    # A publisher's token covers its own route only.
    publisher = devices_sas(rest, "/eh1/publishers/dev-1")
    error_of(post(rest, "/eh1/publishers/dev-2/messages", b"x", {"Authorization": publisher}), 403, "HUB_NOT_ALLOWED")
    error_of(post(rest, "/eh1/messages", b"x", {"Authorization": publisher}), 403, "HUB_NOT_ALLOWED")


def test_unknown_hubs_and_routes_are_404(rest):
    namespace = generate_sas_token(f"http://{rest.http}", "devices", DEVICES_KEY)
    error = error_of(post(rest, "/nope/messages", b"x", {"Authorization": namespace}), 404, "UNKNOWN_EVENT_HUB")
    assert error["metadata"]["event_hub"] == "nope"
    response = post(rest, "/eh1/consumergroups/$Default/messages", b"x", {"Authorization": namespace})
    assert response.status_code == 404 and response.json()["error"]["code"] == "NOT_FOUND"
    response = requests.get(url(rest, "/eh1/messages"), timeout=TIMEOUT)
    assert response.status_code == 405 and response.headers["allow"] == "POST"


def test_bad_requests_are_400_naming_the_field(rest):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    error = error_of(post(rest, "/eh1/messages", b"x", {**auth, "BrokerProperties": "{not json"}), 400, "INVALID_EVENT")
    assert error["field"] == "BrokerProperties"
    error = error_of(
        post(rest, "/eh1/messages", b"x", {**auth, "BrokerProperties": '{"PartitionKey": 7}'}), 400, "INVALID_EVENT"
    )
    assert error["field"] == "BrokerProperties.PartitionKey"
    error = error_of(post(rest, "/eh1/partitions/99/messages", b"x", auth), 400, "INVALID_EVENT")
    assert error["field"] == "event.partition_id", error
    batch_headers = {**auth, "Content-Type": "application/vnd.microsoft.servicebus.json"}
    error = error_of(post(rest, "/eh1/messages", b'[{"Body": "a"}, {"Body": 5}]', batch_headers), 400, "INVALID_EVENT")
    assert error["field"] == "[1].Body"
    error_of(post(rest, "/eh1/messages", b"[{", batch_headers), 400, "MALFORMED_REQUEST")
    response = requests.post(
        f"http://{rest.http}/eh1/messages?timeout=soon", data=b"x", headers=auth, timeout=TIMEOUT
    )
    assert error_of(response, 400, "INVALID_EVENT")["field"] == "timeout"


def test_a_batch_answers_as_its_first_failure_with_each_events_outcome(rest):
    run = run_id()
    before = partition_positions(rest.connection_string, "eh1")
    batch = [
        {"Body": f"fine-{run}"},
        {"Body": "too long an id", "BrokerProperties": {"MessageId": "m" * 200}},
        {"Body": f"also-fine-{run}"},
    ]
    response = post(rest, "/eh1/messages", json.dumps(batch), {
        "Authorization": f"Bearer {API_KEY}", "Content-Type": "application/vnd.microsoft.servicebus.json",
    })
    error = error_of(response, 400, "INVALID_EVENT")
    assert error["field"].startswith("events[1]"), error
    outcomes = response.json()["events"]
    assert [outcome["status"] for outcome in outcomes] == [201, 400, 201]
    assert outcomes[1]["error"]["reason"] == "INVALID_EVENT"
    stored = [body(e) for events in stored_events(rest, "eh1", before).values() for e in events]
    assert sorted(stored) == sorted([f"fine-{run}".encode(), f"also-fine-{run}".encode()])


def test_too_large_is_413(rest):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    # Over Event Hubs' 1 MiB per event, under the request limit: the event is refused, as Event Hubs would.
    error = error_of(post(rest, "/eh1/messages", b"x" * (1024 * 1024 + 1), auth), 413, "EVENT_TOO_LARGE")
    assert error["code"] == "INVALID_ARGUMENT"


def test_the_request_size_limit_is_413_before_the_body_is_read(start_gateway, tmp_path):
    config = tmp_path / "gateway.toml"
    limit = 1088 * 1024
    config.write_text(f'http_listen = "127.0.0.1:0"\n[limits]\nmax_request_bytes = {limit}\n')
    running = start_gateway(*HUBS, "--config", str(config))
    response = requests.post(url(running, "/eh1/messages"), data=b"y" * (limit + 1), timeout=TIMEOUT)
    error = error_of(response, 413, "REQUEST_TOO_LARGE")
    assert error["metadata"]["limit"] == str(limit)
    # Without Content-Length (chunked), the bytes read are counted.
    chunks = (b"z" * 65536 for _ in range(limit // 65536 + 2))
    response = requests.post(url(running, "/eh1/messages"), data=chunks, timeout=TIMEOUT)
    error_of(response, 413, "REQUEST_TOO_LARGE")
    # Without auth required, the listener publishes anonymously, as gRPC does.
    assert requests.post(url(running, "/eh1/messages"), data=b"small", timeout=TIMEOUT).status_code == 201


def test_a_rate_limited_identity_gets_429_with_retry_after(rest):
    auth = {"Authorization": f"Bearer {SLOW_KEY}"}
    statuses = []
    for _ in range(5):
        response = post(rest, "/eh1/messages", b"slow", auth)
        statuses.append(response.status_code)
        if response.status_code == 429:
            error = error_of(response, 429, "RATE_LIMITED")
            assert int(response.headers["retry-after"]) >= 1
            assert error["retry_after_seconds"] > 0
            break
    assert statuses[0] == 201 and statuses[-1] == 429, statuses


# ------------------------------------------------------------------------------------------------------------
# TLS
# ------------------------------------------------------------------------------------------------------------


def test_the_listener_serves_mtls_with_the_grpc_listeners_material(api, tmp_path):
    """HTTPS with the gRPC listener's certificate, key and client CA: a SAS token or the client certificate's
    identity (its DNS SAN) authenticates a request, as on gRPC; a plain-text request gets no answer."""
    make_ca(tmp_path)
    issue(tmp_path, "server", "/CN=localhost", ["DNS:localhost", "IP:127.0.0.1"], "serverAuth")
    issue(tmp_path, "client", "/CN=scripts-client", ["DNS:scripts"], "clientAuth")
    config = tmp_path / "gateway.toml"
    config.write_text(config_text(tmp_path, extra=f"""
[tls]
cert = "{tmp_path / 'server.pem'}"
key = "{tmp_path / 'server.key'}"
client_ca = "{tmp_path / 'ca.pem'}"
"""))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(tmp_path / "ca.pem").read_bytes(),
        private_key=(tmp_path / "client.key").read_bytes(),
        certificate_chain=(tmp_path / "client.pem").read_bytes(),
    )
    running = GatewayProcess(
        api, *HUBS, "--config", str(config), env={"TEST_STRANGER_SAS_KEY": STRANGER_KEY}, credentials=credentials
    )
    tls = {"verify": str(tmp_path / "ca.pem"), "cert": (str(tmp_path / "client.pem"), str(tmp_path / "client.key"))}
    try:
        before = partition_positions(running.connection_string, "eh1")
        sas = generate_sas_token(f"https://{running.http}/eh1", "devices", DEVICES_KEY)
        response = post(running, "/eh1/partitions/3/messages", b"over tls", {"Authorization": sas}, "https", **tls)
        assert response.status_code == 201, response.text
        stored = stored_events(running, "eh1", before)
        assert {p: [body(e) for e in events] for p, events in stored.items()} == {"3": [b"over tls"]}
        # No authorization header: the certificate's identity, `scripts`, whose grant alone covers eh2.
        response = post(running, "/eh2/messages", b"by certificate", None, "https", **tls)
        assert response.status_code == 201, response.text
        # The devices' SAS identity has no grant for eh2: the token, not the certificate, decides.
        sas_eh2 = generate_sas_token(f"https://{running.http}/eh2", "devices", DEVICES_KEY)
        error_of(post(running, "/eh2/messages", b"x", {"Authorization": sas_eh2}, "https", **tls), 403, "HUB_NOT_ALLOWED")
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.post(url(running, "/eh1/messages"), data=b"plain", timeout=TIMEOUT)
        with pytest.raises(requests.exceptions.SSLError):
            requests.post(url(running, "/eh1/messages", "https"), data=b"no cert", verify=tls["verify"], timeout=TIMEOUT)
    finally:
        running.stop()


def test_no_sas_key_reaches_a_log_line(rest):
    logs = rest.logs()
    assert DEVICES_KEY not in logs and STRANGER_KEY not in logs


def raw_connection(gateway):
    host, port = gateway.http.rsplit(":", 1)
    connection = socket.create_connection((host, int(port)), timeout=10)
    return connection


def closed_by_peer(connection, within):
    """Whether the peer closes `connection` within `within` seconds (reading whatever it sends first)."""
    connection.settimeout(within)
    try:
        while connection.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_the_listener_is_bounded_like_the_grpc_one(start_gateway, tmp_path):
    slow_heads = tmp_path / "slow.toml"
    slow_heads.write_text('http_listen = "127.0.0.1:0"\n[limits]\nheader_read_timeout_seconds = 1\n')
    running = start_gateway(*HUBS, "--config", str(slow_heads))
    # Too many header fields: 431, as hyper answers.
    headers = {f"x-h{n}": "v" for n in range(120)}
    assert requests.post(url(running, "/eh1/messages"), data=b"x", headers=headers, timeout=TIMEOUT).status_code == 431
    # A request head that never ends is closed after header_read_timeout.
    slow = raw_connection(running)
    slow.sendall(b"POST /eh1/messages HTTP/1.1\r\nHost: x\r\n")
    assert closed_by_peer(slow, within=10), "a slow request head must be closed"
    slow.close()

    capped = tmp_path / "capped.toml"
    capped.write_text('http_listen = "127.0.0.1:0"\n[limits]\nmax_connections_per_client = 2\n')
    running = start_gateway(*HUBS, "--config", str(capped))
    # Two connections per client address; a third is closed as it is accepted.
    held = [raw_connection(running) for _ in range(2)]
    time.sleep(0.3)
    third = raw_connection(running)
    assert closed_by_peer(third, within=5), "the third connection of one client must be closed"
    third.close()
    for connection in held:
        connection.sendall(b"POST /eh1/partitions/0/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok")
        connection.settimeout(TIMEOUT)
        assert connection.recv(65536).startswith(b"HTTP/1.1 201"), "connections within the cap are served"
        connection.close()
