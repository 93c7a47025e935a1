"""Shared fixtures: the emulator binary as a real process on a free loopback port, and SDK helpers."""

import http.client
import json
import os
import pathlib
import queue
import subprocess
import threading
import time

import pytest
from azure.eventhub import EventHubConsumerClient, EventHubProducerClient

REPO = pathlib.Path(__file__).resolve().parents[2]
BINARY = os.environ.get("EVENTHUB_GATEWAY_BIN", str(REPO / "target" / "debug" / "eventhub-gateway"))


def stop_process(process):
    """Terminates a child process, killing it if it does not exit within 5 s."""
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Emulator:
    """A running `eventhub-gateway emulator` process, on a free loopback port unless `listen` names one."""

    def __init__(self, *args, listen="127.0.0.1:0"):
        self.process = subprocess.Popen(
            [BINARY, "emulator", "--listen", listen, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = []
        reader = threading.Thread(target=lambda: line.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=15)
        if not line or not line[0].startswith("Endpoint="):
            self.stop()
            raise RuntimeError(f"the emulator did not print its connection string: {line}")
        self.connection_string = line[0].strip()

    def with_key(self, key):
        return self.connection_string.replace("SharedAccessKey=SAS_KEY_VALUE", f"SharedAccessKey={key}")

    def stop(self):
        stop_process(self.process)


@pytest.fixture(scope="session")
def emulator():
    """One emulator for the suite: eh1 (4 partitions), wide (32), small (1)."""
    running = Emulator("--event-hub", "eh1:4:cg1", "--event-hub", "wide:32", "--event-hub", "small:1")
    yield running
    running.stop()


class ControlledEmulator:
    """The emulator binary on free loopback ports with `--fault-control`, its fault control address read from
    stderr: `post("/faults/throttle?count=N")` and the other endpoints inject faults into the running process."""

    def __init__(self, *args):
        self.process = subprocess.Popen(
            [BINARY, "emulator", "--listen", "127.0.0.1:0", *(args or ("--event-hub", "eh1:1")),
             "--fault-control", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines = queue.Queue()

        def pump(stream):
            for line in stream:
                lines.put(line)

        # Both pipes are drained for the process's life, so its logs never fill one and stall it.
        for stream in (self.process.stdout, self.process.stderr):
            threading.Thread(target=pump, args=(stream,), daemon=True).start()
        self.connection_string = None
        self.control = None
        deadline = time.monotonic() + 15
        while (self.connection_string is None or self.control is None) and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line.startswith("Endpoint="):
                self.connection_string = line.strip()
            elif "fault control on http://" in line:
                host, port = line.split("http://")[1].split("/")[0].rsplit(":", 1)
                self.control = (host, int(port))
        if self.connection_string is None or self.control is None:
            self.stop()
            raise RuntimeError("the emulator did not print its connection string and fault control address")

    def with_key(self, key):
        return self.connection_string.replace("SharedAccessKey=SAS_KEY_VALUE", f"SharedAccessKey={key}")

    def call(self, method, path):
        """One request to the fault control: the status and the JSON body."""
        connection = http.client.HTTPConnection(*self.control, timeout=10)
        try:
            connection.request(method, path)
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            connection.close()

    def post(self, path):
        status, body = self.call("POST", path)
        assert status == 200, f"POST {path}: {status} {body}"
        return body

    def faults(self):
        status, body = self.call("GET", "/faults")
        assert status == 200, body
        return body

    def stop(self):
        stop_process(self.process)


@pytest.fixture
def start_emulator():
    """Starts emulators with special flags (`fault_control=True`: a `ControlledEmulator`, on a free port); all
    are stopped after the test."""
    started = []

    def start(*args, listen="127.0.0.1:0", fault_control=False):
        started.append(ControlledEmulator(*args) if fault_control else Emulator(*args, listen=listen))
        return started[-1]

    yield start
    for running in started:
        running.stop()


def producer(connection_string, hub, **kwargs):
    return EventHubProducerClient.from_connection_string(connection_string, eventhub_name=hub, **kwargs)


def read_partition(
    connection_string, hub, partition_id, expected, starting_position="-1", timeout=20, client_options=None, **kwargs
):
    """Reads until `expected` events arrived from one partition (or the timeout); returns them.
    `client_options` go to the consumer client (transport, endpoint, CA), the rest to `receive`."""
    consumer_group = kwargs.pop("consumer_group", "$Default")
    consumer = EventHubConsumerClient.from_connection_string(
        connection_string, consumer_group=consumer_group, eventhub_name=hub, **(client_options or {})
    )
    events = []
    done = threading.Event()

    def on_event(_context, event):
        if event is not None:
            events.append(event)
            if len(events) >= expected:
                done.set()

    worker = threading.Thread(
        target=consumer.receive,
        kwargs={
            "on_event": on_event,
            "partition_id": partition_id,
            "starting_position": starting_position,
            "max_wait_time": 0.5,
            **kwargs,
        },
        daemon=True,
    )
    worker.start()
    done.wait(timeout)
    consumer.close()
    worker.join(timeout=10)
    return events


def wait_for(condition, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


# ----------------------------------------------------------------------------------------------------------------
# The gRPC gateway (`serve`); its helpers live in gateway_client.py, imported here lazily so that the SDK-only
# tests need no gRPC packages at import time.
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def api(tmp_path_factory):
    """The Python stubs of proto/, generated once per session with grpcio-tools into a temp dir."""
    from gateway_client import generate_stubs

    return generate_stubs(tmp_path_factory.mktemp("stubs"))


@pytest.fixture(scope="session")
def gateway(api):
    """One gateway for the suite, against its in-process emulator: eh1 (the default) and eh2, 4 partitions."""
    from gateway_client import GatewayProcess

    running = GatewayProcess(
        api, "--emulator", "--event-hub", "eh1", "--event-hub", "eh2", "--emulator-partitions", "4"
    )
    yield running
    running.stop()


@pytest.fixture
def start_gateway(api):
    """Starts gateways with special flags or environment (`env=`); all are stopped after the test."""
    from gateway_client import GatewayProcess

    started = []

    def start(*args, env=None, **options):
        started.append(GatewayProcess(api, *args, env=env, **options))
        return started[-1]

    yield start
    for running in started:
        running.stop()
