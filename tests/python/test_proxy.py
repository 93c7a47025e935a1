"""`serve` over AMQP on WebSockets through a real HTTP CONNECT proxy process (connect_proxy.py) to the emulator
binary's wss listener, trusting the test CA through `event_hubs_ca_file`: HTTPS_PROXY is used (the proxy sees
the CONNECT; with it down sends fail), NO_PROXY bypasses it, basic auth is sent when configured, a 407 is named,
and the proxy's password never shows in logs or errors."""

import queue
import re
import subprocess
import sys
import threading
import time
import uuid

import grpc
import pytest

from conftest import BINARY, read_partition, stop_process
from gateway_client import CALL_TIMEOUT, GatewayProcess, call_status
from test_transports import KEY, pki  # noqa: F401  (pki is a fixture)

PROXY_SCRIPT = __import__("pathlib").Path(__file__).with_name("connect_proxy.py")
PASSWORD = "s3cret-proxy-pass"
# Fail fast when Event Hubs cannot be reached: one attempt, short bounds.
FAST_FAILURE = {
    "EVENTHUB_GATEWAY_PRODUCER__SEND_TIMEOUT": "4",
    "EVENTHUB_GATEWAY_PRODUCER__POOL_CONNECTION_CREATE_TIMEOUT": "2",
    "EVENTHUB_GATEWAY_PRODUCER__RETRY_MAX_ATTEMPTS": "1",
}


class Proxy:
    """connect_proxy.py in its own process; `lines` collects what it saw."""

    def __init__(self, *args):
        self.process = subprocess.Popen(
            [sys.executable, str(PROXY_SCRIPT), *args], stdout=subprocess.PIPE, text=True
        )
        self.lines = queue.SimpleQueue()
        self.seen = []
        first = self.process.stdout.readline()
        match = re.match(r"listening (\d+)", first)
        if not match:
            self.stop()
            raise RuntimeError(f"the proxy did not start: {first!r}")
        self.port = int(match.group(1))
        threading.Thread(target=lambda: [self.lines.put(line.strip()) for line in self.process.stdout], daemon=True).start()

    def log(self):
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return self.seen

    def stop(self):
        stop_process(self.process)


class WssEmulator:
    """The emulator binary with a wss listener signed by the test CA; its plain connection string (for read-back)
    from stdout, the wss port from stderr."""

    def __init__(self, pki):
        self.process = subprocess.Popen(
            [
                BINARY, "emulator", "--listen", "127.0.0.1:0", "--event-hub", "px:1",
                "--websocket-listen", "127.0.0.1:0",
                "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
            ],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.connection_string = self.process.stdout.readline().strip()
        self.wss_port = None
        deadline = time.monotonic() + 15
        while self.wss_port is None and time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if m := re.match(r"AMQP over WebSockets on wss://127\.0\.0\.1:(\d+)/", line):
                self.wss_port = int(m.group(1))
        threading.Thread(target=lambda: [None for _ in self.process.stderr], daemon=True).start()
        if not self.connection_string.startswith("Endpoint=") or self.wss_port is None:
            self.stop()
            raise RuntimeError("the emulator did not report its listeners")

    def stop(self):
        stop_process(self.process)


@pytest.fixture
def wss(pki):  # noqa: F811
    running = WssEmulator(pki)
    yield running
    running.stop()


@pytest.fixture
def proxies():
    started = []

    def start(*args):
        started.append(Proxy(*args))
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def gateways(api):
    started = []

    def start(wss, pki, env):  # noqa: F811
        base = {
            "EVENTHUB_GATEWAY_EVENT_HUBS_CA_FILE": str(pki / "ca.pem"),
            "HTTPS_PROXY": "", "https_proxy": "", "NO_PROXY": "", "no_proxy": "",
        }
        started.append(
            GatewayProcess(
                api, "--connection-string", f"Endpoint=sb://localhost:{wss.wss_port}/;{KEY}",
                "--event-hub", "px", "--websockets", env={**base, **env},
            )
        )
        return started[-1]

    yield start
    for gateway in started:
        gateway.stop()


def send(gateway, api, text):
    """SendEvent; returns None on success, else the grpc.RpcError."""
    try:
        gateway.stub.SendEvent(api.pb.SendEventRequest(event=api.pb.Event(text=text)), timeout=CALL_TIMEOUT)
        return None
    except grpc.RpcError as error:
        return error


def stored_bodies(wss, expected):
    return [event.body_as_str() for event in read_partition(wss.connection_string, "px", "0", expected)]


def test_https_proxy_carries_the_websocket_and_its_loss_fails_sends(api, pki, wss, proxies, gateways):  # noqa: F811
    proxy = proxies()
    gateway = gateways(wss, pki, {"HTTPS_PROXY": f"http://127.0.0.1:{proxy.port}", **FAST_FAILURE})
    body = f"through the proxy {uuid.uuid4()}"
    assert send(gateway, api, body) is None, gateway.logs()
    assert f"CONNECT localhost:{wss.wss_port} auth=none" in proxy.log(), proxy.log()
    assert f"tunnel localhost:{wss.wss_port}" in proxy.log()
    assert body in stored_bodies(wss, 1)

    # The same gateway setup with the proxy gone: nothing reaches Event Hubs.
    port = proxy.port
    proxy.stop()
    down = gateways(wss, pki, {"HTTPS_PROXY": f"http://127.0.0.1:{port}", **FAST_FAILURE})
    error = send(down, api, "never stored")
    assert error is not None and error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), error
    assert f"cannot connect to the proxy http://127.0.0.1:{port}" in down.logs(), down.logs()
    assert "never stored" not in stored_bodies(wss, 1)


def test_no_proxy_bypasses_the_proxy(api, pki, wss, proxies, gateways):  # noqa: F811
    proxy = proxies()
    gateway = gateways(wss, pki, {"HTTPS_PROXY": f"http://127.0.0.1:{proxy.port}", "NO_PROXY": "example.com,localhost"})
    assert send(gateway, api, "direct") is None, gateway.logs()
    assert not any(line.startswith("CONNECT") for line in proxy.log()), proxy.log()


def test_basic_auth_is_sent_and_a_407_is_named_without_the_password(api, pki, wss, proxies, gateways, tmp_path):  # noqa: F811
    proxy = proxies("--auth", f"gateway:{PASSWORD}")
    password_file = tmp_path / "proxy-password"
    password_file.write_text(PASSWORD + "\n")
    configured = {
        "EVENTHUB_GATEWAY_EVENT_HUBS_PROXY__URL": f"http://127.0.0.1:{proxy.port}",
        "EVENTHUB_GATEWAY_EVENT_HUBS_PROXY__USERNAME": "gateway",
        **FAST_FAILURE,
    }
    gateway = gateways(wss, pki, {**configured, "EVENTHUB_GATEWAY_EVENT_HUBS_PROXY__PASSWORD_FILE": str(password_file)})
    assert send(gateway, api, "authenticated") is None, gateway.logs()
    assert f"CONNECT localhost:{wss.wss_port} auth=ok" in proxy.log(), proxy.log()

    # Credentials in HTTPS_PROXY's URL are sent too.
    from_env = gateways(wss, pki, {"HTTPS_PROXY": f"http://gateway:{PASSWORD}@127.0.0.1:{proxy.port}"})
    assert send(from_env, api, "authenticated from the environment") is None, from_env.logs()
    assert proxy.log().count(f"CONNECT localhost:{wss.wss_port} auth=ok") >= 2, proxy.log()

    wrong_password = "wrong-" + PASSWORD
    wrong = gateways(wss, pki, {**configured, "EVENTHUB_GATEWAY_EVENT_HUBS_PROXY__PASSWORD": wrong_password})
    error = send(wrong, api, "refused by the proxy")
    assert error is not None, "a wrong proxy password must fail the send"
    assert f"CONNECT localhost:{wss.wss_port} auth=wrong" in proxy.log(), proxy.log()
    logs = wrong.logs()
    assert (
        f"the proxy http://127.0.0.1:{proxy.port} refused CONNECT localhost:{wss.wss_port} with HTTP 407 "
        "Proxy Authentication Required: its user name or password is wrong"
    ) in logs, logs
    rich = call_status(api, error)
    for text in (logs, error.details() or "", repr(rich), gateway.logs(), from_env.logs()):
        assert PASSWORD not in text
