"""The gateway's Python side for the end-to-end tests: stubs generated from the proto at test time (stock
grpcio-tools), the `serve` process on a free loopback port, rich error decoding (`google.rpc.Status` from
`grpc-status-details-bin`), and read-back of what a test stored, with the official `azure-eventhub` consumer."""

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor

import grpc

from conftest import BINARY, REPO, producer, read_partition, stop_process

PROTO_ROOT = REPO / "proto"
PROTO_FILES = [
    "eventhub/gateway/v1/gateway.proto",
    "io_cloudevents/v1/cloudevents.proto",
    "google/rpc/status.proto",
    "google/rpc/code.proto",
    "google/rpc/error_details.proto",
]
DOMAIN = "eventhub-gateway"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
# Every RPC of the tests is bounded; a hung gateway fails the call rather than the whole suite.
CALL_TIMEOUT = 30


def generate_stubs(out_dir):
    """Runs `python -m grpc_tools.protoc` on the proto into `out_dir`, puts it on sys.path and returns the
    generated modules: `pb` (messages), `grpc` (the stub), `status`, `code` and `details` (google.rpc)."""
    result = subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", "-I", str(PROTO_ROOT),
            f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
            *(str(PROTO_ROOT / name) for name in PROTO_FILES),
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed ({result.returncode}): {result.stderr}")
    if str(out_dir) not in sys.path:
        sys.path.insert(0, str(out_dir))
    from eventhub.gateway.v1 import gateway_pb2, gateway_pb2_grpc
    from google.rpc import code_pb2, error_details_pb2, status_pb2

    return types.SimpleNamespace(
        pb=gateway_pb2, grpc=gateway_pb2_grpc, status=status_pb2, code=code_pb2, details=error_details_pb2
    )


# --------------------------------------------------------------------------------------------------------------
# Rich errors
# --------------------------------------------------------------------------------------------------------------


class RichStatus:
    """A `google.rpc.Status` with its details unpacked by type: `error_info`, `bad_request`, `retry_info`,
    `quota_failure` (None when absent)."""

    def __init__(self, api, status):
        self.status = status
        self.code = status.code
        self.message = status.message
        self.types = []
        found = {}
        for detail in status.details:
            name = detail.type_url.rsplit("/", 1)[-1]
            self.types.append(name)
            message_type = getattr(api.details, name.rsplit(".", 1)[-1], None)
            if name.startswith("google.rpc.") and message_type is not None:
                message = message_type()
                assert detail.Unpack(message), f"cannot unpack {name}"
                found[name] = message
        self.error_info = found.get("google.rpc.ErrorInfo")
        self.bad_request = found.get("google.rpc.BadRequest")
        self.retry_info = found.get("google.rpc.RetryInfo")
        self.quota_failure = found.get("google.rpc.QuotaFailure")

    @property
    def reason(self):
        return self.error_info.reason if self.error_info else None

    @property
    def fields(self):
        """The BadRequest field paths."""
        return [v.field for v in self.bad_request.field_violations] if self.bad_request else []

    @property
    def retry_delay(self):
        """RetryInfo's delay in seconds, or None."""
        if self.retry_info is None or not self.retry_info.HasField("retry_delay"):
            return None
        return self.retry_info.retry_delay.seconds + self.retry_info.retry_delay.nanos / 1e9

    @property
    def quota_subjects(self):
        return [v.subject for v in self.quota_failure.violations] if self.quota_failure else []

    def __repr__(self):
        return (
            f"RichStatus(code={self.code}, reason={self.reason}, message={self.message!r}, "
            f"details={self.types}, fields={self.fields})"
        )


def call_status(api, error):
    """The rich status of a failed call (a `grpc.RpcError`, or a finished streaming call), or None when the
    call carries no `grpc-status-details-bin` (statuses made by the gRPC library itself)."""
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY:
            rich = RichStatus(api, api.status.Status.FromString(value))
            assert rich.code == error.code().value[0], f"trailer {rich} disagrees with the call's {error.code()}"
            return rich
    return None


def describe(api, error):
    """A failed call for an assertion message: code, details and the rich status if any."""
    if error is None:
        return "OK"
    return f"{error.code()} {error.details()!r} {call_status(api, error)}"


def check_error(rich, code, reason):
    """Asserts a status is `code` with an ErrorInfo of the gateway's domain and `reason`; returns it."""
    assert rich is not None, f"expected {code.name}/{reason} with details, got no grpc-status-details-bin"
    assert rich.code == code.value[0], f"expected {code.name}/{reason}, got {rich}"
    assert rich.error_info is not None, f"no ErrorInfo in {rich}"
    assert rich.error_info.domain == DOMAIN, rich.error_info
    assert rich.reason == reason, f"expected reason {reason}, got {rich}"
    return rich


def expect_error(api, call, code, reason):
    """Runs `call()`, which must fail with `code` and the gateway's ErrorInfo `reason`; returns the RichStatus."""
    try:
        response = call()
    except grpc.RpcError as error:
        return check_error(call_status(api, error), code, reason)
    raise AssertionError(f"expected {code.name}/{reason}, the call succeeded: {response}")


def result_status(api, status):
    """The RichStatus of an `EventResult.status` or `StreamAck.status`."""
    return RichStatus(api, status)


# --------------------------------------------------------------------------------------------------------------
# The gateway process
# --------------------------------------------------------------------------------------------------------------


class GatewayProcess:
    """A running `eventhub-gateway serve` on free loopback ports (gRPC, and `metrics`: the HTTP listener of
    /metrics and the probes). `args` are extra flags (`--emulator ...` or `--connection-string ...`), `env` extra
    environment (`EVENTHUB_GATEWAY_LIMITS__...`), `credentials` the channel's TLS credentials for a TLS listener,
    `listen` the gRPC address (a stopped gateway's `address`, to start its successor on the same port)."""

    def __init__(self, api, *args, env=None, startup_timeout=20, log_lines=300, credentials=None,
                 listen="127.0.0.1:0"):
        self.api = api
        self.args = [BINARY, "serve", "--listen", listen, "--metrics-listen", "127.0.0.1:0", *args]
        self.process = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # Plain logs (no ANSI colours), so they read well in assertion messages.
            env={**os.environ, "NO_COLOR": "1", **(env or {})},
        )
        self.stderr = collections.deque(maxlen=log_lines)
        # Drained for the process's whole life, so its logging never blocks on a full pipe.
        threading.Thread(target=lambda: self.stderr.extend(self.process.stderr), daemon=True).start()
        line = []
        reader = threading.Thread(target=lambda: line.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=startup_timeout)
        try:
            announced = json.loads(line[0])
            self.address = announced["grpc"]
            self.metrics = announced["metrics"]
            # The REST send API's listener, when `http_listen` is set.
            self.http = announced.get("http")
            self.connection_string = announced.get("emulator")
        except (IndexError, ValueError, KeyError, TypeError):
            self.stop()
            raise RuntimeError(f"`{' '.join(self.args)}` did not print its JSON line: {line}; stderr: {self.logs()}")
        self.credentials = credentials
        self.channel = self.open_channel()
        grpc.channel_ready_future(self.channel).result(timeout=10)
        # Without stubs (`api` None) the process is driven by other clients (grpcurl).
        self.stub = api.grpc.EventHubGatewayStub(self.channel) if api is not None else None

    def open_channel(self, credentials=None, options=None):
        """A new channel to the gRPC listener (TLS with `credentials`, else the process's own)."""
        credentials = credentials or self.credentials
        if credentials is None:
            return grpc.insecure_channel(self.address, options=options)
        return grpc.secure_channel(self.address, credentials, options=options)

    def logs(self):
        return "".join(self.stderr)

    def terminate(self, timeout=40):
        """Sends SIGTERM (a graceful drain) and returns the exit code (None if it did not exit in time)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self):
        if getattr(self, "channel", None) is not None:
            self.channel.close()
            self.channel = None
        if self.process.poll() is None:
            stop_process(self.process)


# --------------------------------------------------------------------------------------------------------------
# The metrics listener
# --------------------------------------------------------------------------------------------------------------


def http_get(address, path, timeout=10):
    """`GET http://address/path` on loopback, never through a proxy from the environment: (status, body)."""
    import urllib.error
    import urllib.request

    host = address.rsplit(":", 1)[0]
    assert host in ("127.0.0.1", "localhost", "[::1]"), f"tests reach loopback only, not {address}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{address}{path}", timeout=timeout) as response:
            return response.status, response.read().decode(), response.headers.get("Content-Type")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), error.headers.get("Content-Type")


def scrape(gateway):
    """The gateway's /metrics page through the Prometheus text parser: {(sample name, sorted label pairs): value},
    and the families by name (with their type)."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text, content_type = http_get(gateway.metrics, "/metrics")
    assert status == 200, text
    assert content_type.startswith("text/plain; version=0.0.4"), content_type
    samples = {}
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, families


def sample(samples, name, **labels):
    """The value of the sample with exactly this name and these labels (None if absent)."""
    return samples.get((name, tuple(sorted(labels.items()))))


# --------------------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------------------


def json_struct(value):
    """A `google.protobuf.Struct` of a Python dict."""
    from google.protobuf import struct_pb2

    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def stream_requests(api, events, sent=None, hub=""):
    """SendStream requests for `(sequence, Event)` pairs; appends each sequence to `sent` as it is handed over."""
    for sequence, event in events:
        if sent is not None:
            sent.append(sequence)
        yield api.pb.SendStreamRequest(event_hub=hub, sequence=sequence, event=event)


def collect_acks(responses):
    """Every ack of a SendStream call, in arrival order, and the call's end: (acks, None) when it ended OK, or
    (acks, the RpcError)."""
    acks = []
    try:
        for response in responses:
            acks.extend(response.acks)
    except grpc.RpcError as error:
        return acks, error
    return acks, None


# --------------------------------------------------------------------------------------------------------------
# Reading back
# --------------------------------------------------------------------------------------------------------------


def partition_positions(connection_string, hub):
    """The last enqueued sequence number of every partition of `hub` (-1 for an empty one). The SDK spends about
    0.4 s on each management call, so the partitions are asked in parallel."""

    def last(partition):
        with producer(connection_string, hub) as client:
            return client.get_partition_properties(partition)["last_enqueued_sequence_number"]

    with producer(connection_string, hub) as client:
        partitions = client.get_partition_ids()
    with ThreadPoolExecutor(max_workers=len(partitions)) as pool:
        return dict(zip(partitions, pool.map(last, partitions)))


def read_since(connection_string, hub, before, timeout=30):
    """Every event stored in `hub` after the positions `before` (from `partition_positions`), read with the
    official consumer: {partition id: [EventData in partition order]}."""
    after = partition_positions(connection_string, hub)
    counts = {p: after[p] - before.get(p, -1) for p in after}
    wanted = {p: n for p, n in counts.items() if n > 0}
    if not wanted:
        return {p: [] for p in after}
    with ThreadPoolExecutor(max_workers=len(wanted)) as pool:
        reads = {
            p: pool.submit(read_partition, connection_string, hub, p, n, before.get(p, -1), timeout)
            for p, n in wanted.items()
        }
    stored = {p: [] for p in after}
    for p, read in reads.items():
        events = read.result()
        assert len(events) == wanted[p], f"{hub}/{p}: read {len(events)} of the {wanted[p]} events stored"
        stored[p] = events
    return stored


def body(event):
    """The stored body's bytes."""
    return b"".join(event.body)


def text(value):
    return value.decode() if isinstance(value, bytes) else value


def properties(event):
    """Application properties with str names and, for str/bytes values, str values."""
    return {text(k): text(v) for k, v in (event.properties or {}).items()}


# --------------------------------------------------------------------------------------------------------------
# Streams that end early
# --------------------------------------------------------------------------------------------------------------

SEND_STREAM = "/eventhub.gateway.v1.EventHubGateway/SendStream"


def raw_send_stream(api, channel, messages, timeout=CALL_TIMEOUT):
    """SendStream with `messages` sent as given (bytes no stub would send); returns (acks, RpcError or None)."""
    call = channel.stream_stream(
        SEND_STREAM, request_serializer=lambda raw: raw, response_deserializer=api.pb.SendStreamResponse.FromString
    )
    return collect_acks(call(iter(messages), timeout=timeout))


class HeldStream:
    """A SendStream whose requests the test hands over one by one (`send`) and which stays open, not
    half-closed, until `close()`: for endings that come while the client is still there."""

    def __init__(self, stub, **call_options):
        import queue

        self.requests = queue.Queue()
        self.call = stub.SendStream(iter(self.requests.get, None), **call_options)
        self.responses = iter(self.call)

    def send(self, request):
        self.requests.put(request)

    def next_acks(self):
        """The acks of the next response (raises the RpcError if the stream ended with one)."""
        return list(next(self.responses).acks)

    def rest(self):
        """Every later ack and how the stream ended: (acks, RpcError or None)."""
        return collect_acks(self.responses)

    def close(self):
        self.requests.put(None)


def check_stream_ending(api, error, code, reason, messages_read, last_sequence=None):
    """Asserts a stream ended with the gateway's status `code`/`reason`, saying how far it got; returns it."""
    assert error is not None, "the stream ended OK"
    rich = call_status(api, error)
    assert rich is not None, f"the stream ended without the gateway's status: {describe(api, error)}"
    check_error(rich, code, reason)
    metadata = rich.error_info.metadata
    assert metadata["messages_read"] == str(messages_read), rich
    if last_sequence is not None:
        assert metadata["last_sequence"] == str(last_sequence), rich
    return rich
