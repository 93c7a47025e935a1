"""The Python client package (`clients/python`, import `eventhub_gateway`) against real gateway processes when
things go wrong: every exception class, raised by the gateway condition that causes it; transparent retries
through server-busy and through a gateway restart (no event answered OK is missing, duplicates carry their
`message_id`); the in-flight window under a stalled Event Hubs; bearer tokens (string, callable, rotated
file), TLS and mTLS; and a cancelled caller's window room. Each test drives its own event loop (`run`), bounded
in time; what was stored is read back with the official `azure-eventhub` consumer."""

import asyncio
import collections
import signal
import time

import grpc
import pytest

import eventhub_gateway as eg
from conftest import wait_for
from gateway_client import GatewayProcess, http_get, partition_positions, read_since, scrape
from pki import issue, make_ca
from test_auth import BILLING_SA, HUBS, Keys, auth_config, ready

Code = grpc.StatusCode
# Every test's event loop runs at most this long (pytest-timeout is the backstop).
RUN_TIMEOUT = 30


def run(coroutine, timeout=RUN_TIMEOUT):
    """Runs `coroutine` on a new event loop, at most `timeout` seconds."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


async def outcome(awaitable):
    """The receipt, or the GatewayError the send failed with."""
    try:
        return await awaitable
    except eg.GatewayError as error:
        return error


def producer(gateway, hub="eh1", **options):
    return eg.GatewayProducer(gateway.address, hub, **options)


def metric_total(gateway, name):
    """The sum of every sample of the metric `name` (all its label sets)."""
    samples, _ = scrape(gateway)
    return sum(value for (sample_name, _), value in samples.items() if sample_name == name)


def events_received(gateway):
    return metric_total(gateway, "eventhub_gateway_events_received_total")


def events_in_flight(gateway):
    return metric_total(gateway, "eventhub_gateway_events_in_flight")


def stored_message_ids(connection_string, hub, before):
    """How many times each message id was stored in `hub` since the positions `before`."""
    stored = read_since(connection_string, hub, before)
    return collections.Counter(str(event.message_id) for events in stored.values() for event in events)


def controlled_gateway(start_emulator, start_gateway, env=None):
    """An emulator with fault control (eh1, 2 partitions), and a gateway publishing to it."""
    emulator = start_emulator("--event-hub", "eh1:2", fault_control=True)
    gateway = start_gateway("--connection-string", emulator.connection_string, "--event-hub", "eh1", env=env)
    return emulator, gateway


# --------------------------------------------------------------------------------------------------------------
# Refused before anything is sent
# --------------------------------------------------------------------------------------------------------------


def test_both_routing_fields_is_a_value_error_and_bad_data_a_type_error_before_anything_is_sent(gateway):
    """Arguments that cannot be sent raise at once in the caller and never reach the gateway."""

    async def main():
        async with producer(gateway) as client:
            received = events_received(gateway)
            with pytest.raises(ValueError, match="mutually exclusive"):
                await client.send_event("both", partition_key="k", partition_id="0")
            for data in (12345, ["a", "list"], None, 1.5):
                with pytest.raises(TypeError, match="data must be"):
                    await client.send_event(data)
            with pytest.raises(TypeError, match="properties"):
                await client.send_event("bad property value", properties={"n": 1})
            with pytest.raises(TypeError, match="partition_key"):
                await client.send_event("bad key", partition_key=7)
            with pytest.raises(ValueError, match="events\\[1\\]"):
                await client.send_events(["fine", eg.Event("both", partition_key="k", partition_id="0")])
            assert events_received(gateway) == received, "a refused argument reached the gateway"
            # The producer is unharmed.
            assert isinstance(await client.send_event("after the refusals"), eg.Receipt)

    run(main())


# --------------------------------------------------------------------------------------------------------------
# Refused by the gateway, event by event
# --------------------------------------------------------------------------------------------------------------


def test_an_unknown_partition_id_or_a_bad_property_is_invalid_event_naming_its_field(gateway):
    """InvalidEvent is not retried and names the field as the caller knows it (`event.partition_id`)."""

    async def main():
        async with producer(gateway) as client:
            unknown = await outcome(client.send_event("nowhere", partition_id="99"))
            unnamed = await outcome(client.send_event("unnamed property", properties={"": "v"}))
            huge = await outcome(client.send_event("huge property", properties={"huge": "v" * 40_000}))
            fine = await client.send_event("valid", partition_id="3")
        return unknown, unnamed, huge, fine

    before = partition_positions(gateway.connection_string, "eh1")
    unknown, unnamed, huge, fine = run(main())
    for error in (unknown, unnamed, huge):
        assert isinstance(error, eg.InvalidEvent), error
        assert error.code == Code.INVALID_ARGUMENT and error.reason == "INVALID_EVENT", error
        assert not error.retryable and error.retry_after is None
    assert unknown.field == "event.partition_id", unknown.fields
    assert "99" in unknown.fields[0][1], unknown.fields
    assert unnamed.field == "event.properties", unnamed.fields
    assert huge.field == "event.properties" and huge.metadata["rule"] == "max_property_bytes", (huge, huge.metadata)
    assert fine.partition_id == "3" and fine.attempts == 1
    stored = stored_message_ids(gateway.connection_string, "eh1", before)
    assert stored == {fine.message_id: 1}, "only the valid event is stored"


def test_an_event_over_one_mib_is_event_too_large_and_one_over_max_batch_bytes_is_refused_by_the_client(gateway):
    """Over Event Hubs' 1 MiB the gateway refuses the event (EVENT_TOO_LARGE); over the client's own message
    limit (`max_batch_bytes`) it never leaves the client."""

    async def main():
        async with producer(gateway) as client:
            too_large = await outcome(client.send_event(b"x" * (1024 * 1024 + 1)))
        async with producer(gateway, max_batch_bytes=1000) as client:
            received = events_received(gateway)
            too_large_here = await outcome(client.send_event(b"y" * 2000))
            assert events_received(gateway) == received
        return too_large, too_large_here

    too_large, too_large_here = run(main())
    assert isinstance(too_large, eg.EventTooLarge), too_large
    assert too_large.reason == "EVENT_TOO_LARGE" and too_large.code == Code.INVALID_ARGUMENT
    assert too_large.field == "event" and not too_large.retryable
    assert int(too_large.metadata["size"]) > int(too_large.metadata["limit"]) == 1024 * 1024, too_large.metadata
    assert isinstance(too_large_here, eg.EventTooLarge) and too_large_here.reason is None, too_large_here
    assert "max_batch_bytes" in str(too_large_here)


def test_an_event_hub_the_gateway_does_not_serve_is_unknown_event_hub(gateway):
    """UnknownEventHub (NOT_FOUND) names the hub asked for and is not retried."""

    async def main():
        async with producer(gateway, "no-such-hub") as client:
            return await outcome(client.send_event("lost"))

    error = run(main())
    assert isinstance(error, eg.UnknownEventHub), error
    assert error.code == Code.NOT_FOUND and error.metadata["event_hub"] == "no-such-hub", error.metadata
    assert not error.retryable


def test_rate_limited_is_waited_out_within_the_deadline_and_raised_with_retry_after_beyond_it(start_gateway):
    """At 1 event/s per client: an event whose deadline is shorter than RetryInfo's delay raises RateLimited
    with `retry_after`; one with time to wait is sent again after the delay and stored."""
    gateway = start_gateway(
        "--emulator", "--event-hub", "eh1", env={"EVENTHUB_GATEWAY_LIMITS__CLIENT_EVENTS_PER_SECOND": "1"}
    )

    async def main():
        async with producer(gateway, client_id="limited", send_timeout=10) as client:
            first = await client.send_event("within the rate")
            refused = await outcome(client.send_event("over the rate", timeout=0.3))
            waited = await client.send_event("waits for the rate", timeout=10)
        return first, refused, waited

    first, refused, waited = run(main())
    assert isinstance(refused, eg.RateLimited), refused
    assert refused.reason == "RATE_LIMITED" and refused.code == Code.RESOURCE_EXHAUSTED
    # Raised rather than waited out because RetryInfo's delay (about 1 s) is longer than the 0.3 s deadline.
    assert refused.retryable and refused.retry_after is not None and refused.retry_after > 0.3, refused.retry_after
    assert first.attempts == 1
    assert waited.attempts >= 2, "refused once, sent again after RetryInfo's delay"
    stored = stored_message_ids(gateway.connection_string, "eh1", {})
    assert stored == {first.message_id: 1, waited.message_id: 1}, "a rate-limited attempt stores nothing"


@pytest.mark.parametrize(
    "fault, error_class, reason",
    [
        ("throttle", eg.EventHubsBusy, "EVENT_HUBS_BUSY"),
        ("release", eg.EventHubsUnavailable, "EVENT_HUBS_UNAVAILABLE"),
    ],
)
def test_event_hubs_faults_past_every_retry_are_raised_as_their_class(
    start_emulator, start_gateway, fault, error_class, reason
):
    """Event Hubs answers server-busy (or Released) to every send: the gateway's two attempts, then the client's
    one retry after RetryInfo's 1 s, and a 1.8 s deadline leaves no room for another: the caller gets
    EventHubsBusy (EventHubsUnavailable) with `retry_after`; nothing is stored. Cleared, the same producer sends
    again."""
    emulator, gateway = controlled_gateway(
        start_emulator, start_gateway, env={"EVENTHUB_GATEWAY_PRODUCER__RETRY_MAX_ATTEMPTS": "2"}
    )

    async def main():
        async with producer(gateway, send_timeout=1.8) as client:
            await client.send_event("warm-up")
            emulator.post(f"/faults/{fault}?count=100000")
            failed = await outcome(client.send_event("refused by Event Hubs"))
            emulator.post("/faults/clear")
            after = await client.send_event("after the fault")
        return failed, after

    failed, after = run(main())
    assert isinstance(failed, error_class), failed
    assert failed.reason == reason and failed.code == Code.UNAVAILABLE, failed
    assert failed.retryable and failed.retry_after is not None and failed.retry_after > 0
    if fault == "throttle":
        assert failed.metadata["condition"] == "com.microsoft:server-busy", failed.metadata
    stored = stored_message_ids(emulator.connection_string, "eh1", {})
    assert after.message_id in stored and len(stored) == 2, stored


def test_event_hubs_refusing_the_gateways_credentials_is_permission_denied(start_emulator, start_gateway):
    """A gateway holding a wrong SAS key: every event is PermissionDenied (EVENT_HUBS_UNAUTHORIZED), not retried."""
    emulator = start_emulator("--event-hub", "eh1:2")
    gateway = start_gateway("--connection-string", emulator.with_key("d3Jvbmcga2V5"), "--event-hub", "eh1")

    async def main():
        async with producer(gateway, send_timeout=10) as client:
            return await outcome(client.send_event("refused credentials"))

    error = run(main())
    assert isinstance(error, eg.PermissionDenied), error
    assert error.reason == "EVENT_HUBS_UNAUTHORIZED" and error.code == Code.PERMISSION_DENIED
    assert not error.retryable


def test_deadline_exceeded_at_the_gateway_before_sending_is_published_false(start_emulator, start_gateway):
    """Event Hubs refuses the gateway's connections and the gateway gives each event 1 s: the event waits at
    the gateway and is answered DEADLINE_EXCEEDED, `published` False; once Event Hubs is back it is still not
    stored (only the event sent after is)."""
    emulator = start_emulator("--event-hub", "eh1:2", fault_control=True)
    emulator.post("/faults/refuse-connections?ms=600000")
    gateway = start_gateway(
        "--connection-string", emulator.connection_string, "--event-hub", "eh1",
        env={"EVENTHUB_GATEWAY_PRODUCER__SEND_TIMEOUT": "1"},
    )

    async def main():
        async with producer(gateway, send_timeout=5) as client:
            never_sent = await outcome(client.send_event("never sent"))
            emulator.post("/faults/clear")
            after = None
            while not isinstance(after, eg.Receipt):  # until the gateway has reconnected
                after = await outcome(client.send_event("after the outage"))
        return never_sent, after

    never_sent, after = run(main())
    assert isinstance(never_sent, eg.DeadlineExceeded), never_sent
    assert never_sent.reason == "DEADLINE_EXCEEDED" and never_sent.code == Code.DEADLINE_EXCEEDED, never_sent
    assert never_sent.published is False and not never_sent.retryable
    stored = read_since(emulator.connection_string, "eh1", {})
    bodies = [b"".join(event.body) for events in stored.values() for event in events]
    assert bodies == [b"after the outage"], bodies


def test_deadline_exceeded_on_the_wire_is_published_none_and_never_falsely_false(start_emulator, start_gateway):
    """Event Hubs answers after 1.5 s and the gateway gives each event 0.5 s. An event on the wire at its
    caller's deadline is DeadlineExceeded with `published` None, and is stored after all. Two events on one
    key, each retried after OUTCOME_UNKNOWN: whatever their last attempt was answered, an event whose
    DeadlineExceeded says `published` False is never stored."""
    emulator = start_emulator("--event-hub", "eh1:2", fault_control=True)
    gateway = start_gateway(
        "--connection-string", emulator.connection_string, "--event-hub", "eh1",
        env={"EVENTHUB_GATEWAY_PRODUCER__SEND_TIMEOUT": "0.5"},
    )

    async def main():
        async with producer(gateway, send_timeout=2) as client:
            await client.send_event("warm-up")
            emulator.post("/faults/disposition-delay?ms=1500")
            on_the_wire = await outcome(client.send_event("on the wire", timeout=0.3))
            first = asyncio.ensure_future(outcome(client.send_event("first on the key", "one-key")))
            await asyncio.sleep(0.1)
            behind = await outcome(client.send_event("behind it", "one-key"))
            return on_the_wire, await first, behind

    on_the_wire, first, behind = run(main())
    assert isinstance(on_the_wire, eg.DeadlineExceeded), on_the_wire
    assert on_the_wire.published is None and on_the_wire.reason is None, on_the_wire
    assert on_the_wire.code == Code.DEADLINE_EXCEEDED and not on_the_wire.retryable
    time.sleep(1.6)  # the dispositions of the last attempts
    stored = read_since(emulator.connection_string, "eh1", {})
    bodies = collections.Counter(b"".join(event.body) for events in stored.values() for event in events)
    assert bodies[b"on the wire"] == 1, "an event answered 'may have been published' was published"
    for body, error in ((b"first on the key", first), (b"behind it", behind)):
        # The last attempt decides the class: DEADLINE_EXCEEDED from the gateway, or OUTCOME_UNKNOWN with no time
        # left to send it again, or the client's own deadline.
        assert isinstance(error, (eg.DeadlineExceeded, eg.OutcomeUnknown)), error
        if getattr(error, "published", None) is False:
            assert bodies[body] == 0, f"{body} was answered 'not published' and is stored {bodies[body]} times"


def test_draining_is_raised_when_the_deadline_is_shorter_than_its_retry_delay(start_emulator, start_gateway):
    """SIGTERM while an event is in flight: the draining gateway refuses a new stream with DRAINING. A caller
    whose deadline is shorter than RetryInfo's delay gets Draining at once; the in-flight event is still
    answered OK; the gateway exits 0 and both producers close."""
    emulator, gateway = controlled_gateway(start_emulator, start_gateway)

    async def main():
        busy = producer(gateway, send_timeout=20)
        late = producer(gateway, send_timeout=20)
        await busy.send_event("warm-up")
        await late.start()
        emulator.post("/faults/disposition-delay?ms=2500")
        in_flight = asyncio.ensure_future(busy.send_event("in flight at SIGTERM"))
        await asyncio.sleep(0.3)
        gateway.process.send_signal(signal.SIGTERM)
        draining = await asyncio.to_thread(wait_for, lambda: http_get(gateway.metrics, "/readyz")[0] == 503, 5)
        assert draining, "the gateway did not start draining"
        refused = await outcome(late.send_event("after SIGTERM", timeout=0.8))
        receipt = await in_flight
        await asyncio.wait_for(asyncio.gather(busy.close(timeout=2), late.close(timeout=2)), 10)
        return refused, receipt

    refused, receipt = run(main())
    assert isinstance(refused, eg.Draining), refused
    assert refused.reason == "DRAINING" and refused.code == Code.UNAVAILABLE
    assert refused.retryable and refused.retry_after is not None and refused.retry_after > 0.8, refused.retry_after
    assert isinstance(receipt, eg.Receipt)
    assert gateway.process.wait(timeout=30) == 0, gateway.logs()[-3000:]


def test_close_returns_within_its_timeout_when_the_gateway_is_gone(start_gateway):
    """The gateway is killed under an open stream: a send fails at its deadline, and close(timeout) returns
    (failing what is left with ProducerClosed) instead of waiting for a connection that never comes."""
    gateway = start_gateway("--emulator", "--event-hub", "eh1")

    async def main():
        client = producer(gateway, send_timeout=1)
        await client.send_event("before the kill")
        gateway.process.kill()
        gateway.process.wait()
        lost = await outcome(client.send_event("into the void"))
        pending = asyncio.ensure_future(outcome(client.send_event("queued at close", timeout=20)))
        await asyncio.sleep(0.1)
        await asyncio.wait_for(client.close(timeout=1), 10)
        closed = await asyncio.wait_for(pending, 5)
        after = await outcome(client.send_event("after close"))
        return lost, closed, after

    lost, closed, after = run(main())
    # published None when it was written to the stream that broke, False when the break was seen before.
    assert isinstance(lost, eg.DeadlineExceeded) and lost.published in (None, False), lost
    assert isinstance(closed, eg.ProducerClosed), closed
    assert isinstance(after, eg.ProducerClosed), after


# --------------------------------------------------------------------------------------------------------------
# Auth and TLS
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_keys():
    return Keys()


@pytest.fixture(scope="module")
def secured(api, auth_keys, tmp_path_factory):
    """A gateway requiring credentials: JWTs of the test issuer (billing -> eh1) and an API key (-> eh2)."""
    config = auth_config(tmp_path_factory.mktemp("client-auth"), auth_keys)
    running = GatewayProcess(api, *HUBS, "--config", str(config))
    assert wait_for(lambda: ready(running), timeout=30), running.logs()[-3000:]
    yield running
    running.stop()


def test_no_token_or_a_refused_token_is_unauthenticated_with_its_cause(secured, auth_keys):
    """The gateway requires credentials: no token, an unknown one and an expired one each raise
    Unauthenticated (not retried) with the gateway's cause."""
    now = int(time.time())
    cases = [
        (None, "missing"),
        ("not-a-token-at-all-" + "x" * 40, "unknown_api_key"),
        (auth_keys.token(exp=now - 3600, iat=now - 7200), "expired"),
    ]

    async def main():
        errors = []
        for token, _ in cases:
            async with producer(secured, token=token, send_timeout=5) as client:
                errors.append(await outcome(client.send_event("who am I")))
        return errors

    for (_, cause), error in zip(cases, run(main())):
        assert isinstance(error, eg.Unauthenticated), (cause, error)
        assert error.code == Code.UNAUTHENTICATED and error.reason == "UNAUTHENTICATED", error
        assert error.metadata["cause"] == cause, error.metadata
        assert not error.retryable


def test_a_hub_outside_the_identitys_grants_is_permission_denied(secured, auth_keys):
    """A valid token whose grants cover eh1 only: eh2 raises PermissionDenied (HUB_NOT_ALLOWED) naming the
    identity; eh1 works with the same token."""

    async def main():
        token = auth_keys.token("ES256")
        async with producer(secured, "eh2", token=token) as client:
            refused = await outcome(client.send_event("not granted"))
        async with producer(secured, "eh1", token=token) as client:
            allowed = await client.send_event("granted")
        return refused, allowed

    refused, allowed = run(main())
    assert isinstance(refused, eg.PermissionDenied), refused
    assert refused.reason == "HUB_NOT_ALLOWED" and refused.code == Code.PERMISSION_DENIED
    assert refused.metadata["identity"] == BILLING_SA and refused.metadata["event_hub"] == "eh2", refused.metadata
    assert not refused.retryable
    assert allowed.event_hub == "eh1"


def test_a_bearer_token_as_a_string_a_callable_or_an_async_callable_authenticates(secured, auth_keys):
    """Each token source is sent as `authorization: Bearer`; a callable is asked when a stream opens; a token
    source that raises fails the send with Unauthenticated, before the gateway is asked."""
    asked = collections.Counter()

    def sync_source():
        asked["sync"] += 1
        return auth_keys.token("RS256")

    async def async_source():
        asked["async"] += 1
        await asyncio.sleep(0)
        return auth_keys.token("EdDSA")

    def broken_source():
        raise RuntimeError("the token service is down")

    async def main():
        receipts = []
        for token in (auth_keys.token("ES256"), sync_source, async_source, auth_keys.api_key):
            hub = "eh2" if token == auth_keys.api_key else "eh1"
            async with producer(secured, hub, token=token) as client:
                receipts.append(await client.send_event("authenticated"))
        async with producer(secured, token=broken_source, send_timeout=5) as client:
            broken = await outcome(client.send_event("no token"))
        return receipts, broken

    receipts, broken = run(main())
    assert [receipt.event_hub for receipt in receipts] == ["eh1", "eh1", "eh1", "eh2"]
    assert asked["sync"] >= 1 and asked["async"] >= 1, asked
    assert isinstance(broken, eg.Unauthenticated) and "token service is down" in str(broken), broken


def test_a_token_file_is_read_again_after_it_is_rotated(secured, auth_keys, tmp_path):
    """`token_file` holding an expired token: Unauthenticated. The file is replaced with a fresh token (as the
    kubelet rotates a projected token): the same producer's next send is accepted."""
    token_file = tmp_path / "token"
    now = int(time.time())
    token_file.write_text(auth_keys.token(exp=now - 60, iat=now - 3600) + "\n")

    async def main():
        async with producer(secured, token_file=str(token_file), send_timeout=5) as client:
            expired = await outcome(client.send_event("with the expired token"))
            token_file.write_text(auth_keys.token("ES256", jti="rotated") + "\n")
            rotated = await client.send_event("with the rotated token")
        return expired, rotated

    expired, rotated = run(main())
    assert isinstance(expired, eg.Unauthenticated) and expired.metadata["cause"] == "expired", expired
    assert isinstance(rotated, eg.Receipt)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    directory = tmp_path_factory.mktemp("client-pki")
    make_ca(directory)
    issue(directory, "server", "/CN=localhost", ["DNS:localhost", "IP:127.0.0.1"], "serverAuth")
    issue(directory, "client", "/CN=client", ["DNS:client.test"], "clientAuth")
    return directory


def test_tls_with_ca_file_and_mtls_with_a_client_certificate(start_gateway, certificates):
    """A TLS gateway is reached with `ca_file` (plaintext never connects: GatewayUnavailable within
    pool_connection_create_timeout); a gateway requiring client certificates with `cert_file` and `key_file`,
    or a credentials object, and not without a certificate."""
    pem = lambda name: str(certificates / name)  # noqa: E731
    root = (certificates / "ca.pem").read_bytes()
    tls = start_gateway(
        "--emulator", "--event-hub", "eh1", "--tls-cert", pem("server.pem"), "--tls-key", pem("server.key"),
        credentials=grpc.ssl_channel_credentials(root_certificates=root),
    )
    client_credentials = grpc.ssl_channel_credentials(
        root_certificates=root, private_key=(certificates / "client.key").read_bytes(),
        certificate_chain=(certificates / "client.pem").read_bytes(),
    )
    mtls = start_gateway(
        "--emulator", "--event-hub", "eh1", "--tls-cert", pem("server.pem"), "--tls-key", pem("server.key"),
        "--client-ca", pem("ca.pem"), credentials=client_credentials,
    )

    async def main():
        async with producer(tls, ca_file=pem("ca.pem")) as client:
            over_tls = await client.send_event("over TLS")
        plaintext = await outcome(producer(tls, pool_connection_create_timeout=1).send_event("in the clear"))
        certificate = {"cert_file": pem("client.pem"), "key_file": pem("client.key")}
        async with producer(mtls, ca_file=pem("ca.pem"), **certificate) as client:
            over_mtls = await client.send_event("over mTLS")
        async with producer(mtls, credentials=client_credentials) as client:
            with_credentials = await client.send_event("with a credentials object")
        without_certificate = producer(mtls, ca_file=pem("ca.pem"), pool_connection_create_timeout=1, send_timeout=2)
        no_certificate = await outcome(without_certificate.send_event("no client certificate"))
        await without_certificate.close(timeout=1)
        return over_tls, plaintext, over_mtls, with_credentials, no_certificate

    over_tls, plaintext, over_mtls, with_credentials, no_certificate = run(main())
    assert isinstance(over_tls, eg.Receipt) and isinstance(over_mtls, eg.Receipt)
    assert isinstance(with_credentials, eg.Receipt)
    assert isinstance(plaintext, eg.GatewayUnavailable), plaintext
    # The gateway's alert comes after a TLS 1.3 client thinks the handshake done: the connection never serves a
    # call either way, whether the client gives up connecting or waits for a stream until the deadline.
    assert isinstance(no_certificate, (eg.GatewayUnavailable, eg.DeadlineExceeded)), no_certificate
    assert getattr(no_certificate, "published", False) is False, "nothing was sent without a certificate"
    stored = stored_message_ids(mtls.connection_string, "eh1", {})
    assert stored == {over_mtls.message_id: 1, with_credentials.message_id: 1}


# --------------------------------------------------------------------------------------------------------------
# Transparent retries
# --------------------------------------------------------------------------------------------------------------


def test_server_busy_is_retried_transparently_and_every_event_is_stored_once(start_emulator, start_gateway):
    """Event Hubs answers server-busy to the next 4 transfers and the gateway does not retry (one attempt), so
    EVENT_HUBS_BUSY reaches the client: every send_event still returns a Receipt (some after more than one
    attempt) and every event is stored exactly once (a busy answer stores nothing)."""
    emulator, gateway = controlled_gateway(
        start_emulator, start_gateway, env={"EVENTHUB_GATEWAY_PRODUCER__RETRY_MAX_ATTEMPTS": "1"}
    )

    async def main():
        async with producer(gateway, send_timeout=20) as client:
            await client.send_event("warm-up")
            emulator.post("/faults/throttle?count=4")
            return await asyncio.gather(
                *(client.send_event(f"busy {n}", f"key-{n % 5}" if n % 2 else None) for n in range(60))
            )

    receipts = run(main())
    assert emulator.faults()["throttle_left"] == 0, "every injected server-busy was used"
    assert all(isinstance(receipt, eg.Receipt) for receipt in receipts)
    assert max(receipt.attempts for receipt in receipts) >= 2, "no send was refused and retried"
    stored = stored_message_ids(emulator.connection_string, "eh1", {})
    assert {receipt.message_id for receipt in receipts} <= set(stored)
    assert all(count == 1 for count in stored.values()), {m: n for m, n in stored.items() if n > 1}
    assert len(stored) == 61


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])
def test_a_gateway_restart_under_100_callers_loses_no_event_answered_ok(start_emulator, start_gateway, stop):
    """100 callers send while the gateway is stopped (drained by SIGTERM, or killed) and a new one starts on
    the same port against the same Event Hubs: every call returns a Receipt, every receipt's event is stored,
    and each event stored more than once (sent again after the break) carries a message id the client made."""
    emulator = start_emulator("--event-hub", "eh1:4")
    flags = ("--connection-string", emulator.connection_string, "--event-hub", "eh1")
    gateway = start_gateway(*flags)
    callers, per_caller = 100, 25

    def restart():
        if stop == "SIGKILL":
            gateway.process.kill()
            gateway.process.wait()
        else:
            assert gateway.terminate(timeout=30) == 0, gateway.logs()[-3000:]
        return start_gateway(*flags, listen=gateway.address)

    async def main():
        async with producer(gateway, send_timeout=25, retry_backoff_max=0.5) as client:
            done = collections.Counter()

            async def caller(n):
                receipts = []
                for s in range(per_caller):
                    receipts.append(await client.send_event(f"{n}:{s}", partition_key=f"caller-{n}"))
                    done["events"] += 1
                return receipts

            tasks = [asyncio.ensure_future(caller(n)) for n in range(callers)]
            while done["events"] < callers * per_caller // 4:
                await asyncio.sleep(0.01)
            successor = await asyncio.to_thread(restart)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            return successor, results

    successor, results = run(main(), timeout=60)
    assert successor.address == gateway.address
    failures = [result for result in results if isinstance(result, BaseException)]
    assert not failures, failures[:3]
    receipts = [receipt for caller_receipts in results for receipt in caller_receipts]
    assert len(receipts) == callers * per_caller
    sent = {receipt.message_id for receipt in receipts}
    stored = stored_message_ids(emulator.connection_string, "eh1", {})
    missing = sent - set(stored)
    assert not missing, f"{len(missing)} events answered OK are not stored, e.g. {sorted(missing)[:5]}"
    assert set(stored) <= sent, "stored events the client never sent"
    duplicates = {message_id: count for message_id, count in stored.items() if count > 1}
    retried = [receipt for receipt in receipts if receipt.attempts > 1]
    print(f"{stop}: {len(receipts)} receipts, {len(retried)} sent more than once, {len(duplicates)} stored twice")
    assert retried, "no event was sent again across the restart"
    assert set(duplicates) <= {receipt.message_id for receipt in retried}, "a duplicate of an event sent once"


# --------------------------------------------------------------------------------------------------------------
# The in-flight window
# --------------------------------------------------------------------------------------------------------------


def test_the_in_flight_window_bounds_what_is_handed_in_while_event_hubs_stalls(start_emulator, start_gateway):
    """Event Hubs holds every answer for 4 s with max_in_flight_events=5: the gateway gets 5 events and no more,
    a 6th caller waits and gets Overloaded after pool_get_timeout, later callers wait (not queued), and once
    the stall ends every one of them completes and is stored."""
    emulator, gateway = controlled_gateway(start_emulator, start_gateway)
    window = 5

    async def main():
        async with producer(gateway, max_in_flight_events=window, pool_get_timeout=2.5, send_timeout=20) as client:
            await client.send_event("warm-up")
            received = events_received(gateway)
            emulator.post("/faults/disposition-delay?ms=4000")
            stalled = [asyncio.ensure_future(client.send_event(f"stalled {n}")) for n in range(window)]
            assert await asyncio.to_thread(wait_for, lambda: events_in_flight(gateway) == window, 5)
            over = await outcome(client.send_event("one too many"))
            assert not any(task.done() for task in stalled), "the stall ended before pool_get_timeout"
            emulator.post("/faults/disposition-delay?ms=0")
            waiting = [asyncio.ensure_future(client.send_event(f"waits {n}")) for n in range(3 * window)]
            await asyncio.sleep(0.3)
            assert not any(task.done() for task in stalled + waiting), "the stall ended too early"
            handed_in = events_received(gateway) - received
            engine = client._engine  # white box: what the client itself holds for the waiting callers
            queued = (engine._in_flight_events, len(engine._pending))
            receipts = await asyncio.gather(*stalled, *waiting)
        return over, handed_in, queued, receipts

    over, handed_in, queued, receipts = run(main())
    assert isinstance(over, eg.Overloaded), over
    assert over.reason is None and over.code == Code.RESOURCE_EXHAUSTED and over.retryable, over
    assert "pool_get_timeout" in str(over)
    assert handed_in == window, f"the gateway received {handed_in} events while the window was {window}"
    assert queued == (window, 0), f"(in flight, queued in the client) = {queued} while 15 callers waited"
    assert len(receipts) == 4 * window and all(isinstance(r, eg.Receipt) for r in receipts)
    stored = stored_message_ids(emulator.connection_string, "eh1", {})
    assert {receipt.message_id for receipt in receipts} <= set(stored) and len(stored) == 1 + 4 * window


def test_a_cancelled_caller_gives_its_window_room_back(start_emulator, start_gateway):
    """Callers cancelled while awaiting their acks (and one while waiting for room) leave no window room
    behind: once their events are answered, max_in_flight_events new events are all handed to the gateway at
    once while Event Hubs stalls again."""
    emulator, gateway = controlled_gateway(start_emulator, start_gateway)
    window = 4

    async def main():
        async with producer(gateway, max_in_flight_events=window, pool_get_timeout=2, send_timeout=20) as client:
            await client.send_event("warm-up")
            emulator.post("/faults/disposition-delay?ms=1000")
            callers = [asyncio.ensure_future(client.send_event(f"cancelled {n}")) for n in range(window)]
            assert await asyncio.to_thread(wait_for, lambda: events_in_flight(gateway) == window, 5)
            for_room = asyncio.ensure_future(client.send_event("cancelled while waiting for room"))
            await asyncio.sleep(0.1)
            for task in [*callers, for_room]:
                task.cancel()
            cancelled = await asyncio.gather(*callers, for_room, return_exceptions=True)
            emulator.post("/faults/disposition-delay?ms=3000")
            assert await asyncio.to_thread(wait_for, lambda: events_in_flight(gateway) == 0, 5)
            again = [asyncio.ensure_future(client.send_event(f"after the cancel {n}")) for n in range(window)]
            all_handed_in = await asyncio.to_thread(wait_for, lambda: events_in_flight(gateway) == window, 2.5)
            receipts = await asyncio.gather(*again)
        return cancelled, all_handed_in, receipts

    cancelled, all_handed_in, receipts = run(main())
    assert all(isinstance(result, asyncio.CancelledError) for result in cancelled), cancelled
    assert all_handed_in, "room of a cancelled caller was never given back"
    assert all(isinstance(receipt, eg.Receipt) for receipt in receipts)
