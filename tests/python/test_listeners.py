"""The listeners under attack, driven with the `h2` package and raw sockets: an HTTP/2 rapid-reset flood, slowloris
connections (a preface, a frame header or a header block sent slowly or never finished), thousands of idle
connections against `limits.max_connections`, idle connections reaped, slow headers on the metrics listener. Each
time a normal grpcio client on another connection is still served. Bounds are counts, memory and generous
liveness timeouts, never speed."""

import resource
import select
import selectors
import socket
import time

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from gateway_client import CALL_TIMEOUT

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# An empty SETTINGS frame: the client's first frame after its preface.
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
# A HEADERS frame on stream 1 without END_HEADERS (its CONTINUATION never comes), three bytes of header block.
OPEN_HEADER_BLOCK = b"\x00\x00\x03\x01\x00\x00\x00\x00\x01\x82\x87\x84"
# How long a closed connection may take to be seen closed: liveness, not speed.
LIVENESS = 15


def limits_env(**limits):
    return {f"EVENTHUB_GATEWAY_LIMITS__{name.upper()}": str(value) for name, value in limits.items()}


def host_port(address):
    host, port = address.rsplit(":", 1)
    return host, int(port)


def served(api, address):
    """A normal client on a new channel (so a new connection) gets its call answered."""
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT)
        stub = api.grpc.EventHubGatewayStub(channel)
        properties = stub.GetEventHubProperties(api.pb.GetEventHubPropertiesRequest(), timeout=CALL_TIMEOUT)
        return properties.partition_ids is not None


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def closed(sock, timeout):
    """Reads (and drops) until the peer closes the connection; False when it is still open after `timeout`."""
    sock.setblocking(False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            continue
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except BlockingIOError:
            continue
    return False


def all_closed(sockets, timeout):
    """How many of the sockets the peer has closed within `timeout` (each read until its close); epoll, since
    thousands of descriptors are beyond select's reach."""
    deadline = time.monotonic() + timeout
    poller = selectors.DefaultSelector()
    for sock in sockets:
        sock.setblocking(False)
        poller.register(sock, selectors.EVENT_READ)
    remaining = len(sockets)
    while remaining and time.monotonic() < deadline:
        for key, _ in poller.select(timeout=0.2):
            try:
                data = key.fileobj.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            except BlockingIOError:
                continue
            if not data:
                poller.unregister(key.fileobj)
                remaining -= 1
    poller.close()
    return len(sockets) - remaining


def connect(address):
    sock = socket.create_connection(host_port(address), timeout=LIVENESS)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


@pytest.fixture(autouse=True)
def enough_file_descriptors():
    """The tests open thousands of sockets: the soft limit goes up to the hard one while they run."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_rapid_reset_flood_gets_goaway_and_other_clients_are_served(api, start_gateway):
    gateway = start_gateway("--emulator", "--event-hub", "eh1", env=limits_env(http2_max_pending_accept_reset_streams=20))
    sock = connect(gateway.address)
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/eventhub.gateway.v1.EventHubGateway/GetEventHubProperties"),
        (":authority", gateway.address),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    terminated = None
    sent = 0
    sock.settimeout(LIVENESS)
    try:
        # HEADERS then RST_STREAM, in batches of 100, up to 10,000 streams; the server's answers read between.
        while sent < 10_000 and terminated is None:
            for _ in range(100):
                stream_id = conn.get_next_available_stream_id()
                conn.send_headers(stream_id, headers)
                conn.reset_stream(stream_id)
                sent += 1
            sock.sendall(conn.data_to_send())
            while select.select([sock], [], [], 0)[0]:
                data = sock.recv(65536)
                if not data:
                    terminated = "closed"
                    break
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ConnectionTerminated):
                        terminated = event
                sock.sendall(conn.data_to_send())
    except (BrokenPipeError, ConnectionResetError):
        terminated = terminated or "reset"
    if terminated is None:
        # Everything was written: the GOAWAY (or the close) may still be on its way.
        try:
            while terminated is None:
                data = sock.recv(65536)
                if not data:
                    terminated = "closed"
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ConnectionTerminated):
                        terminated = event
        except (socket.timeout, ConnectionResetError):
            terminated = terminated or "reset"
    sock.close()
    assert terminated is not None, f"{sent} streams opened and reset, and the connection is still open"
    assert sent < 10_000, f"the whole flood ({sent} streams) was taken before the connection was closed"
    if isinstance(terminated, h2.events.ConnectionTerminated):
        # ENHANCE_YOUR_CALM.
        assert terminated.error_code == 0xB, terminated
    assert served(api, gateway.address)


def test_slowloris_connections_are_closed_after_their_timeouts_and_others_served(api, start_gateway):
    gateway = start_gateway(
        "--emulator", "--event-hub", "eh1", env=limits_env(handshake_timeout_seconds=1, header_read_timeout_seconds=1)
    )
    silent = [connect(gateway.address) for _ in range(20)]
    half_preface = [connect(gateway.address) for _ in range(20)]
    for sock in half_preface:
        sock.sendall(PREFACE[:10])
    cut_frame_header = [connect(gateway.address) for _ in range(20)]
    for sock in cut_frame_header:
        sock.sendall(PREFACE + EMPTY_SETTINGS + OPEN_HEADER_BLOCK[:4])
    open_header_block = [connect(gateway.address) for _ in range(20)]
    for sock in open_header_block:
        sock.sendall(PREFACE + EMPTY_SETTINGS + OPEN_HEADER_BLOCK)
    # One more trickles its preface a byte every 0.2 s: each byte is on time, the whole is not.
    trickle = connect(gateway.address)
    trickled_closed = False
    for byte in PREFACE:
        try:
            trickle.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            trickled_closed = True
            break
        time.sleep(0.2)
    assert served(api, gateway.address), "a normal client was not served during the slowloris"
    trickled_closed = trickled_closed or closed(trickle, LIVENESS)
    for name, group in [
        ("silent", silent),
        ("half preface", half_preface),
        ("cut frame header", cut_frame_header),
        ("open header block", open_header_block),
    ]:
        count = all_closed(group, LIVENESS)
        assert count == len(group), f"{name}: {count} of {len(group)} connections closed"
        for sock in group:
            sock.close()
    trickle.close()
    assert trickled_closed, "a connection trickling its preface was not closed"
    assert served(api, gateway.address)


def test_connections_beyond_max_connections_are_closed_at_once_and_idle_ones_cost_little(api, start_gateway):
    cap = 1500
    gateway = start_gateway(
        "--emulator", "--event-hub", "eh1", env=limits_env(max_connections=cap, max_connections_per_client=cap)
    )
    # The gateway's own channel holds one place.
    before = rss_kib(gateway.process.pid)
    sockets = []
    for _ in range(2000):
        sock = connect(gateway.address)
        sock.sendall(PREFACE + EMPTY_SETTINGS)
        sockets.append(sock)
    # The gateway raised its soft open-files limit to the hard one at start.
    with open(f"/proc/{gateway.process.pid}/limits") as limits:
        soft, hard = next(line for line in limits if line.startswith("Max open files")).split()[3:5]
    assert soft == hard, (soft, hard)
    refused = all_closed(sockets, 5)
    assert 2000 - cap <= refused <= 2000 - cap + 10, f"{refused} of 2000 connections closed with a cap of {cap}"
    time.sleep(1)
    after = rss_kib(gateway.process.pid)
    held = 2000 - refused
    per_connection = (after - before) * 1024 / held
    print(f"RSS {before} KiB -> {after} KiB with {held} idle connections: {per_connection:.0f} B each")
    # Generous: ~10 KiB measured; HTTP/2 buffers and the task of each connection, well under 64 KiB.
    assert per_connection < 64 * 1024
    # Places freed (the first connections were admitted) take new clients in.
    for sock in sockets[:50]:
        sock.close()
    assert served(api, gateway.address)
    for sock in sockets[50:]:
        sock.close()


def test_idle_connections_are_closed_after_the_idle_timeout(api, start_gateway):
    gateway = start_gateway("--emulator", "--event-hub", "eh1", env=limits_env(connection_idle_timeout_seconds=1))
    idle = []
    for _ in range(50):
        sock = connect(gateway.address)
        sock.sendall(PREFACE + EMPTY_SETTINGS)
        idle.append(sock)
    count = all_closed(idle, LIVENESS)
    assert count == len(idle), f"{count} of {len(idle)} idle connections closed"
    for sock in idle:
        sock.close()
    # A client whose connection was reaped between calls reconnects and is served.
    with grpc.insecure_channel(gateway.address) as channel:
        stub = api.grpc.EventHubGatewayStub(channel)
        stub.GetEventHubProperties(api.pb.GetEventHubPropertiesRequest(), timeout=CALL_TIMEOUT)
        time.sleep(2.5)
        stub.GetEventHubProperties(
            api.pb.GetEventHubPropertiesRequest(), timeout=CALL_TIMEOUT, wait_for_ready=True
        )


def test_a_call_open_keeps_its_connection_past_the_idle_timeout(api, start_gateway):
    gateway = start_gateway("--emulator", "--event-hub", "eh1", env=limits_env(connection_idle_timeout_seconds=1))

    def requests():
        yield api.pb.SendStreamRequest(sequence=1, event=api.pb.Event(text="first"))
        time.sleep(3)
        yield api.pb.SendStreamRequest(sequence=2, event=api.pb.Event(text="second"))

    with grpc.insecure_channel(gateway.address) as channel:
        stub = api.grpc.EventHubGatewayStub(channel)
        acked = []
        for response in stub.SendStream(requests(), timeout=CALL_TIMEOUT):
            acked.extend(ack.sequence for ack in response.acks)
        assert sorted(acked) == [1, 2]


def test_the_metrics_listener_closes_slow_headers(start_gateway):
    gateway = start_gateway("--emulator", "--event-hub", "eh1", env=limits_env(header_read_timeout_seconds=1))
    slow = connect(gateway.metrics)
    slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    # Nothing more: the request's headers never end.
    assert closed(slow, LIVENESS), "a request whose headers never end was not closed"
    slow.close()
    silent = [connect(gateway.metrics) for _ in range(5)]
    assert all_closed(silent, LIVENESS) == 5, "connections that send nothing were not closed"
    for sock in silent:
        sock.close()
    assert probe(gateway.metrics).startswith(b"HTTP/1.1 200")


def test_the_metrics_listener_holds_at_most_its_connections(start_gateway):
    gateway = start_gateway("--emulator", "--event-hub", "eh1", env=limits_env(metrics_max_connections=5))
    held = [connect(gateway.metrics) for _ in range(12)]
    # Well within the header read timeout (10 s): only those over the cap are closed.
    refused = all_closed(held, 3)
    assert refused == 12 - 5, f"{refused} of 12 connections closed with metrics_max_connections = 5"
    for sock in held:
        sock.close()
    assert probe(gateway.metrics).startswith(b"HTTP/1.1 200")


def probe(address):
    """GET /healthz on a new connection; the start of the answer."""
    deadline = time.monotonic() + LIVENESS
    while True:
        sock = connect(address)
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = sock.recv(1024)
        except (ConnectionResetError, BrokenPipeError):
            answer = b""
        finally:
            sock.close()
        # Places freed by closed connections are given back as the listener sees the closes.
        if answer or time.monotonic() > deadline:
            return answer
        time.sleep(0.1)


def test_a_peer_that_does_not_answer_pings_is_dropped(api, start_gateway):
    gateway = start_gateway(
        "--emulator",
        "--event-hub",
        "eh1",
        env=limits_env(http2_keepalive_interval_seconds=1, http2_keepalive_timeout_seconds=1),
    )
    # Speaks HTTP/2's opening, then never answers a PING (nor anything else).
    dead = connect(gateway.address)
    dead.sendall(PREFACE + EMPTY_SETTINGS)
    assert closed(dead, LIVENESS), "a peer that answers no ping was not dropped"
    dead.close()
    assert served(api, gateway.address)


def test_a_header_list_over_its_bound_is_refused_and_the_connection_still_serves(api, start_gateway):
    gateway = start_gateway("--emulator", "--event-hub", "eh1", env=limits_env(http2_max_header_list_bytes=8192))
    with grpc.insecure_channel(gateway.address) as channel:
        stub = api.grpc.EventHubGatewayStub(channel)
        request = api.pb.GetEventHubPropertiesRequest()
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetEventHubProperties(request, timeout=CALL_TIMEOUT, metadata=[("x-padding", "a" * 12_000)])
        assert refused.value.code() != grpc.StatusCode.OK
        # Under the bound, on the same channel: served.
        stub.GetEventHubProperties(request, timeout=CALL_TIMEOUT, metadata=[("x-padding", "a" * 4_000)])
