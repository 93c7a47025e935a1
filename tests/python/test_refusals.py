"""What the service refuses, the emulator refuses, and the SDK reports it the same way."""

import time

import pytest
from azure.eventhub import EventData, EventHubConsumerClient
from azure.eventhub._pyamqp.utils import generate_sas_token
from azure.eventhub.exceptions import AuthenticationError, ConnectError, EventHubError

from conftest import producer


def test_a_wrong_key_is_refused(emulator):
    with producer(emulator.with_key("bm90IHRoZSBrZXk="), "eh1", retry_total=0) as client:
        with pytest.raises(AuthenticationError):
            client.send_event(EventData("nope"))


def test_an_unknown_key_name_is_refused(emulator):
    connection_string = emulator.connection_string.replace("RootManageSharedAccessKey", "SomeoneElse")
    with producer(connection_string, "eh1", retry_total=0) as client:
        with pytest.raises(AuthenticationError):
            client.get_eventhub_properties()


def sas_connection_string(emulator, resource, expires_at):
    endpoint = emulator.connection_string.split(";")[0]
    token = generate_sas_token(resource, "RootManageSharedAccessKey", "SAS_KEY_VALUE", expires_at)
    return f"{endpoint};SharedAccessSignature={token};UseDevelopmentEmulator=true"


def test_a_valid_shared_access_signature_works(emulator):
    connection_string = sas_connection_string(emulator, "sb://localhost/eh1", int(time.time()) + 300)
    with producer(connection_string, "eh1", retry_total=0) as client:
        client.send_event(EventData("signed"))


def test_an_expired_shared_access_signature_is_refused(emulator):
    connection_string = sas_connection_string(emulator, "sb://localhost/eh1", int(time.time()) - 10)
    with pytest.raises((AuthenticationError, ValueError)):
        with producer(connection_string, "eh1", retry_total=0) as client:
            client.send_event(EventData("expired"))


def test_a_token_for_another_hub_is_refused(emulator):
    connection_string = sas_connection_string(emulator, "sb://localhost/wide", int(time.time()) + 300)
    with producer(connection_string, "eh1", retry_total=0) as client:
        with pytest.raises(AuthenticationError):
            client.send_event(EventData("wrong hub"))


def test_an_unknown_hub_is_not_found(emulator):
    with producer(emulator.connection_string, "nope", retry_total=0) as client:
        with pytest.raises((ConnectError, EventHubError)) as raised:
            client.get_eventhub_properties()
    assert "not found" in str(raised.value).lower() or "could not be found" in str(raised.value).lower()


def test_an_unknown_consumer_group_is_refused(emulator):
    consumer = EventHubConsumerClient.from_connection_string(
        emulator.connection_string, consumer_group="nope", eventhub_name="eh1", retry_total=0
    )
    errors = []
    with consumer:
        import threading

        worker = threading.Thread(
            target=consumer.receive,
            kwargs={
                "on_event": lambda *_: None,
                "on_error": lambda _context, error: errors.append(error),
                "partition_id": "0",
                "max_wait_time": 0.2,
            },
            daemon=True,
        )
        worker.start()
        deadline = time.monotonic() + 15
        while not errors and time.monotonic() < deadline:
            time.sleep(0.05)
    worker.join(timeout=10)
    assert errors, "the consumer reports the refusal"
    assert any("not found" in str(e).lower() or "could not be found" in str(e).lower() for e in errors), errors


# ----------------------------------------------------------------------------------------------------------------
# The gateway's own refusals cost what they were sent as (issue 15): a compressed flood of empty events is
# refused by its count before it is decoded, and an error never repeats megabytes of what the client sent.
# ----------------------------------------------------------------------------------------------------------------


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_gzip_compressed_floods_of_empty_events_are_refused_by_count_without_being_decoded(api, start_gateway):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from gateway_client import CALL_TIMEOUT, call_status, check_error

    gateway = start_gateway("--emulator", "--event-hub", "eh1")
    pb = api.pb
    gateway.stub.SendEvent(pb.SendEventRequest(event=pb.Event(text="warm")), timeout=CALL_TIMEOUT)
    baseline = rss_bytes(gateway.process.pid)
    peak = [baseline]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes(gateway.process.pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # 500,000 empty events: 1 MB on the wire before gzip, about 1 KB after; decoded whole they took hundreds
    # of MB each before the count was checked.
    flood = pb.SendEventsRequest(events=[pb.Event()] * 500_000)

    def send(_):
        try:
            gateway.stub.SendEvents(flood, timeout=CALL_TIMEOUT, compression=grpc.Compression.Gzip)
        except grpc.RpcError as error:
            return error
        return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        errors = list(pool.map(send, range(8)))
    done.set()
    watcher.join()
    growth = peak[0] - baseline
    print(f"8 gzip floods of 500,000 empty events: RSS +{growth / 2**20:.1f} MiB")
    for error in errors:
        assert error is not None, "a flood was accepted"
        rich = check_error(call_status(api, error), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_EVENT")
        assert rich.fields == ["events"], rich
        assert "at most 1000 events" in rich.bad_request.field_violations[0].description, rich
    assert growth < 64 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"
    gateway.stub.SendEvent(pb.SendEventRequest(event=pb.Event(text="still served")), timeout=CALL_TIMEOUT)


def test_an_error_about_a_megabyte_hub_name_repeats_a_few_hundred_bytes_of_it(api, gateway):
    import grpc

    from gateway_client import CALL_TIMEOUT, call_status, check_error

    pb = api.pb
    name = "h" * 2**20
    try:
        gateway.stub.SendEvent(pb.SendEventRequest(event_hub=name, event=pb.Event(text="x")), timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        echoed = len(error.details() or "") + sum(len(value) for _, value in error.trailing_metadata() or ())
        print(f"a 1 MiB hub name: {echoed} bytes of status message and trailers")
        rich = check_error(call_status(api, error), grpc.StatusCode.NOT_FOUND, "UNKNOWN_EVENT_HUB")
        assert echoed < 4096, f"{echoed} bytes echoed"
        assert f"[cut: {2**20} bytes in all]" in rich.message, rich.message[:400]
        assert len(rich.error_info.metadata["event_hub"]) < 512
    else:
        raise AssertionError("an unknown hub was accepted")
