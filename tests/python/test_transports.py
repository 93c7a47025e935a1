"""The official SDK over the emulator's AMQPS and AMQP-over-WebSockets listeners, trusting a test CA."""

import re
import subprocess
import threading
import time

import pytest
from azure.eventhub import EventData, TransportType
from azure.eventhub.exceptions import ConnectError, EventHubError

from conftest import BINARY, producer, read_partition, stop_process
from pki import issue, make_ca

KEY = "SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE"
# No UseDevelopmentEmulator: the SDK then uses TLS, as against the service.
CONNECTION_STRING = f"Endpoint=sb://localhost/;{KEY}"


@pytest.fixture
def pki(tmp_path):
    """A throwaway CA and a server certificate for localhost it signed."""
    make_ca(tmp_path)
    issue(tmp_path, "server", "/CN=localhost", ["DNS:localhost"], "serverAuth")
    return tmp_path


class TlsEmulator:
    """The emulator binary with AMQPS and wss listeners; their ports are read from its stderr."""

    def __init__(self, pki):
        self.process = subprocess.Popen(
            [
                BINARY, "emulator", "--listen", "127.0.0.1:0", "--event-hub", "tls:1",
                "--tls-listen", "127.0.0.1:0", "--websocket-listen", "127.0.0.1:0",
                "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines = []
        # Drained for the process's whole life, so its logging never blocks on a full pipe.
        threading.Thread(target=lambda: self.lines.extend(self.process.stderr), daemon=True).start()
        deadline = time.monotonic() + 15
        self.amqps_port = self.wss_port = None
        while time.monotonic() < deadline and not (self.amqps_port and self.wss_port):
            for line in list(self.lines):
                if m := re.match(r"AMQPS on 127\.0\.0\.1:(\d+)", line):
                    self.amqps_port = int(m.group(1))
                if m := re.match(r"AMQP over WebSockets on wss://127\.0\.0\.1:(\d+)/", line):
                    self.wss_port = int(m.group(1))
            time.sleep(0.05)
        if not (self.amqps_port and self.wss_port):
            self.stop()
            raise RuntimeError(f"the emulator did not report its TLS listeners: {self.lines}")

    def stop(self):
        stop_process(self.process)


@pytest.fixture
def tls_emulator(pki):
    running = TlsEmulator(pki)
    yield running
    running.stop()


def send_and_read_back(options, body):
    with producer(CONNECTION_STRING, "tls", **options) as client:
        client.send_batch([EventData(body)])
    received = read_partition(CONNECTION_STRING, "tls", "0", 1, client_options=options)
    return [event.body_as_str() for event in received]


def test_amqps_with_a_custom_ca(tls_emulator, pki):
    options = {
        "transport_type": TransportType.Amqp,
        "custom_endpoint_address": f"sb://localhost:{tls_emulator.amqps_port}",
        "connection_verify": str(pki / "ca.pem"),
    }
    assert send_and_read_back(options, "over amqps") == ["over amqps"]


def test_amqp_over_websockets_with_a_custom_ca(tls_emulator, pki):
    options = {
        "transport_type": TransportType.AmqpOverWebsocket,
        "custom_endpoint_address": f"https://localhost:{tls_emulator.wss_port}",
        "connection_verify": str(pki / "ca.pem"),
    }
    assert send_and_read_back(options, "over websockets") == ["over websockets"]


def test_an_sdk_that_does_not_trust_the_ca_cannot_connect(tls_emulator):
    options = {
        "transport_type": TransportType.Amqp,
        "custom_endpoint_address": f"sb://localhost:{tls_emulator.amqps_port}",
        "retry_total": 0,
    }
    with pytest.raises((ConnectError, EventHubError)) as failure:
        with producer(CONNECTION_STRING, "tls", **options) as client:
            client.send_batch([EventData("never")])
    assert "CERTIFICATE_VERIFY_FAILED" in repr(failure.value) or "certificate" in repr(failure.value).lower()
