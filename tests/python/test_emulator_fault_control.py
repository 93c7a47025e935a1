"""`eventhub-gateway emulator --fault-control ADDR` seen from the official Python SDK: faults injected over HTTP
into the running emulator process reach the SDK as the service's would."""

import queue
import threading
import time

import pytest
from azure.eventhub import EventData
from azure.eventhub.exceptions import ConnectError, EventHubError

from conftest import ControlledEmulator, producer, read_partition


@pytest.fixture
def controlled():
    running = ControlledEmulator()
    yield running
    running.stop()


@pytest.mark.parametrize(
    "path, counter, condition",
    [
        ("/faults/expire-tokens", "token_expiries", "amqp:unauthorized-access"),
        ("/faults/detach", "detaches", "amqp:link:detach-forced"),
    ],
)
def test_a_link_fault_fails_the_next_send_with_its_condition_and_the_sdk_recovers(controlled, path, counter, condition):
    with producer(controlled.connection_string, "eh1", retry_total=0) as client:
        client.send_event(EventData("before"))
        assert controlled.post(path)[counter] == 1
        with pytest.raises(EventHubError) as raised:
            # The detach reaches the SDK's link asynchronously; the first send after it sees it.
            client.send_event(EventData("during"), timeout=10)
        assert condition in str(raised.value)
        client.send_event(EventData("after"), timeout=10)
    stored = read_partition(controlled.connection_string, "eh1", "0", expected=2)
    assert [event.body_as_str() for event in stored] == ["before", "after"]


def test_refused_connections_fail_a_new_client_until_cleared(controlled):
    left = controlled.post("/faults/refuse-connections?ms=600000")["refuse_connections_ms_left"]
    assert 0 < left <= 600000
    with producer(controlled.connection_string, "eh1", retry_total=0) as client:
        with pytest.raises(ConnectError):
            client.get_eventhub_properties()
    assert controlled.post("/faults/clear")["refuse_connections_ms_left"] == 0
    with producer(controlled.connection_string, "eh1", retry_total=0) as client:
        assert client.get_eventhub_properties()["partition_ids"] == ["0"]


def test_a_disposition_delay_holds_every_send_until_turned_off(controlled):
    with producer(controlled.connection_string, "eh1", retry_total=0) as client:
        client.send_event(EventData("warm-up"))
        assert controlled.post("/faults/disposition-delay?ms=700")["disposition_delay_ms"] == 700
        started = time.monotonic()
        client.send_event(EventData("held"))
        # A lower bound only: the delay is injected, so the send cannot complete before it.
        assert time.monotonic() - started >= 0.7
        assert controlled.post("/faults/disposition-delay?ms=0")["disposition_delay_ms"] == 0


def test_a_forced_close_makes_the_sdk_reconnect_and_resend_what_was_cut(controlled):
    with producer(controlled.connection_string, "eh1", retry_total=3, retry_backoff_factor=0.05) as client:
        client.send_event(EventData("first"))
        seen = controlled.faults()["transfers_seen"]
        assert controlled.post("/faults/force-close?after=1")["force_close_after"] == 1
        client.send_event(EventData("cut, then resent"), timeout=20)
        shown = controlled.faults()
    assert shown["force_close_after"] == 0
    assert shown["transfers_seen"] == seen + 2, "the cut transfer, then its resend on a new connection"
    stored = read_partition(controlled.connection_string, "eh1", "0", expected=2)
    assert [event.body_as_str() for event in stored] == ["first", "cut, then resent"], "the cut one was not stored"


def test_a_server_busy_storm_reaches_the_sdk(controlled):
    # The SDK's send callback reads the rejection's error info (the third field): the emulator sends it empty,
    # never absent, or this send would hang.
    outcome = queue.Queue()
    client = producer(controlled.connection_string, "eh1", retry_total=0)
    client.send_event(EventData("before"))
    assert controlled.post("/faults/throttle?count=1000")["throttle_left"] == 1000

    def send():
        try:
            client.send_event(EventData("throttled"), timeout=5)
            outcome.put("sent")
        except EventHubError as error:
            outcome.put(str(error))

    threading.Thread(target=send, daemon=True).start()
    try:
        answer = outcome.get(timeout=15)
    except queue.Empty:
        # The client is left as it is: closing it waits on the hung send. Stopping the emulator ends both.
        pytest.fail("the SDK's send got no answer within 15 s")
    client.close()
    assert "com.microsoft:server-busy" in answer
