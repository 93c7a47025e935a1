"""The gateway's metrics and probes from outside: a `serve` process against a separate emulator process, its
/metrics page read with the Prometheus text parser of `prometheus_client`, its counters compared with the events
sent through gRPC, and /readyz following the emulator as it stops and comes back on the same port."""

import socket

import pytest

from conftest import Emulator, wait_for
from gateway_client import (
    CALL_TIMEOUT,
    GatewayProcess,
    collect_acks,
    http_get,
    sample,
    scrape,
    stream_requests,
)

# Every wait on the gateway's state is bounded by this, seconds.
WAIT = 30


def free_port():
    """A loopback port free now (bound, then released), so a restarted emulator can take the same one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Setup:
    """An emulator process on a fixed loopback port and a gateway process sending to it by connection string."""

    def __init__(self, api):
        self.port = free_port()
        self.emulator = self.start_emulator()
        self.gateway = GatewayProcess(
            api, "--connection-string", self.emulator.connection_string, "--event-hub", "eh1"
        )

    def start_emulator(self):
        return Emulator("--event-hub", "eh1:4", listen=f"127.0.0.1:{self.port}")

    def readyz(self):
        status, text, _ = http_get(self.gateway.metrics, "/readyz")
        return status, text.strip()

    def stop(self):
        self.gateway.stop()
        if self.emulator is not None:
            self.emulator.stop()


@pytest.fixture
def setup(api):
    running = Setup(api)
    yield running
    running.stop()


def event(api, text):
    return api.pb.Event(text=text)


def test_counters_match_the_events_sent_through_grpc(api, setup):
    gateway = setup.gateway
    assert wait_for(lambda: setup.readyz() == (200, "ready"), timeout=WAIT), setup.readyz()
    assert http_get(gateway.metrics, "/healthz")[:2] == (200, "ok\n")

    for n in range(3):
        gateway.stub.SendEvent(api.pb.SendEventRequest(event=event(api, f"unary {n}")), timeout=CALL_TIMEOUT)
    response = gateway.stub.SendEvents(
        api.pb.SendEventsRequest(events=[event(api, f"batch {n}") for n in range(4)]), timeout=CALL_TIMEOUT
    )
    assert [result.status.code for result in response.results] == [0] * 4
    acks, ended = collect_acks(
        gateway.stub.SendStream(
            stream_requests(api, [(n, event(api, f"stream {n}")) for n in range(1, 6)]), timeout=CALL_TIMEOUT
        )
    )
    assert ended is None and sorted(ack.sequence for ack in acks) == [1, 2, 3, 4, 5]
    assert all(ack.status.code == 0 for ack in acks)

    samples, families = scrape(gateway)
    received = "eventhub_gateway_events_received_total"
    assert sample(samples, received, event_hub="eh1", rpc="send_event") == 3
    assert sample(samples, received, event_hub="eh1", rpc="send_events") == 4
    assert sample(samples, received, event_hub="eh1", rpc="send_stream") == 5
    assert sample(samples, "eventhub_gateway_events_sent_total", event_hub="eh1", outcome="ok") == 12
    assert [name for (name, _) in samples if name == "eventhub_gateway_events_sent_total"] == [
        "eventhub_gateway_events_sent_total"
    ], "no event failed"
    assert sample(samples, "eventhub_gateway_events_in_flight", event_hub="eh1") == 0

    assert families["eventhub_gateway_events_received"].type == "counter"
    assert families["eventhub_gateway_batch_events"].type == "histogram"
    assert families["eventhub_gateway_send_duration_seconds"].type == "histogram"
    assert families["eventhub_gateway_pool_connections"].type == "gauge"
    batches = sample(samples, "eventhub_gateway_batch_events_count", event_hub="eh1")
    assert batches > 0
    assert sample(samples, "eventhub_gateway_batch_events_sum", event_hub="eh1") == 12, "each event in one batch"
    assert sample(samples, "eventhub_gateway_send_duration_seconds_count", event_hub="eh1", outcome="ok") == batches

    assert sample(samples, "eventhub_gateway_pool_connections", state="ready") >= 1
    assert sample(samples, "eventhub_gateway_pool_links") >= 1
    assert sample(samples, "eventhub_gateway_connections_opened_total") >= 1
    assert sample(samples, "eventhub_gateway_token_refreshes_total") >= 1
    assert sample(samples, "eventhub_gateway_token_refresh_failures_total") == 0
    assert sample(samples, "eventhub_gateway_shed_calls_total", bound="total") == 0
    assert sample(samples, "eventhub_gateway_shed_calls_total", bound="per_client") == 0
    assert sample(samples, "eventhub_gateway_ready") == 1


def test_readyz_follows_the_emulator_as_it_stops_and_comes_back(api, setup):
    gateway = setup.gateway
    assert wait_for(lambda: setup.readyz() == (200, "ready"), timeout=WAIT), setup.readyz()
    gateway.stub.SendEvent(api.pb.SendEventRequest(event=event(api, "before")), timeout=CALL_TIMEOUT)
    samples, _ = scrape(gateway)
    assert sample(samples, "eventhub_gateway_pool_connections", state="ready") >= 1
    opened_before = sample(samples, "eventhub_gateway_connections_opened_total")

    setup.emulator.stop()
    setup.emulator = None
    # 503 with the reason after the colon (the connection's loss, then each attempt's error).
    def not_ready():
        status, text = setup.readyz()
        return status == 503 and text.startswith("no ready connection to Event Hubs: ")

    assert wait_for(not_ready, timeout=WAIT), setup.readyz()
    samples, _ = scrape(gateway)
    assert sample(samples, "eventhub_gateway_pool_connections", state="ready") == 0
    assert sample(samples, "eventhub_gateway_ready") == 0
    assert http_get(gateway.metrics, "/healthz")[0] == 200, "alive without Event Hubs"

    setup.emulator = setup.start_emulator()
    assert wait_for(lambda: setup.readyz() == (200, "ready"), timeout=WAIT), setup.readyz()
    samples, _ = scrape(gateway)
    assert sample(samples, "eventhub_gateway_pool_connections", state="ready") >= 1
    assert sample(samples, "eventhub_gateway_connections_opened_total") > opened_before
    assert sample(samples, "eventhub_gateway_ready") == 1
    gateway.stub.SendEvent(api.pb.SendEventRequest(event=event(api, "after")), timeout=CALL_TIMEOUT)
    samples, _ = scrape(gateway)
    assert sample(samples, "eventhub_gateway_events_sent_total", event_hub="eh1", outcome="ok") == 2
