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
