"""Writes the starting seeds of the fuzz targets (fuzz/seeds/<target>/): protobuf requests encoded by stock
protobuf from proto/ (stubs generated with grpcio-tools), AMQP messages encoded by the official azure-eventhub
SDK's own encoder (pyamqp), and hand-written text. Each seed is the target's selector byte, then its input.

Run from the repository: .venv/bin/python fuzz/seeds/make_seeds.py (then minimize: see fuzz/README.md).
"""

import base64
import json
import pathlib
import re
import subprocess
import sys
import tempfile

from azure.eventhub._pyamqp._encode import encode_payload
from azure.eventhub._pyamqp.message import BatchMessage, Message, Properties
from azure.eventhub._pyamqp.utils import generate_sas_token

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
KEY_NAME, KEY = "RootManageSharedAccessKey", "SAS_KEY_VALUE"
# The fuzz targets' clock is 1_800_000_000 s; these expire after it.
EXPIRY = 1_900_000_000


def write(target, name, selector, payload):
    directory = HERE / target
    directory.mkdir(exist_ok=True)
    if isinstance(payload, str):
        payload = payload.encode()
    (directory / name).write_bytes(bytes([selector]) + payload)


def sas_token(audience):
    token = generate_sas_token(audience, KEY_NAME, KEY, EXPIRY)
    return token.decode() if isinstance(token, bytes) else token


def amqp(message):
    return bytes(encode_payload(bytearray(), message))


def gateway_request(pb):
    from google.protobuf import struct_pb2

    nested = struct_pb2.Struct()
    nested.update({"user": {"id": 42, "tags": ["a", "b", None, True, 0.5]}, "n": 3})
    rich = pb.Event(
        text="hello",
        partition_key="user-42",
        properties={"kind": "order", "source": "fuzz"},
        content_type="text/plain",
        message_id="m-1",
        correlation_id="c-1",
    )
    events = [
        rich,
        pb.Event(binary=b"\x00\x01\x02", partition_id="1"),
        pb.Event(json=nested),
    ]
    write("gateway_request", "send_event", 0, pb.SendEventRequest(event_hub="eh1", event=rich).SerializeToString())
    write("gateway_request", "send_events_traced", 5, pb.SendEventsRequest(event_hub="eh1", events=events).SerializeToString())
    write(
        "gateway_request",
        "send_stream",
        2,
        pb.SendStreamRequest(event_hub="eh1", sequence=7, events=events).SerializeToString(),
    )
    write("gateway_request", "properties", 3, pb.GetEventHubPropertiesRequest(event_hub="eh1").SerializeToString())
    cloud = pb.Event(
        cloud_event={
            "id": "ce-1",
            "source": "/fuzz",
            "spec_version": "1.0",
            "type": "dev.example.fuzz",
            "attributes": {
                "datacontenttype": {"ce_string": "application/json"},
                "time": {"ce_timestamp": {"seconds": 1_700_000_000, "nanos": 5}},
                "flag": {"ce_boolean": True},
                "count": {"ce_integer": -7},
                "blob": {"ce_bytes": b"\x00\xff"},
                "dataschema": {"ce_uri": "https://example.com/s"},
                "ref": {"ce_uri_ref": "/r"},
                "partitionkey": {"ce_string": "k"},
            },
            "text_data": '{"a": [1, 2]}',
        },
    )
    proto = pb.Event(
        cloud_event={
            "id": "ce-2",
            "source": "urn:fuzz",
            "spec_version": "1.0",
            "type": "t",
            "proto_data": {"type_url": "type.googleapis.com/x.Y", "value": b"\x08\x01"},
        },
        content_type="application/cloudevents+json",
    )
    write(
        "gateway_request",
        "cloud_events",
        1,
        pb.SendEventsRequest(event_hub="eh1", events=[cloud, proto]).SerializeToString(),
    )


def emulator_transfer():
    plain = Message(
        data=[b"hello"],
        message_annotations={b"x-opt-partition-key": "user-42"},
        properties=Properties(message_id="m-1", content_type=b"text/plain", correlation_id="c-1"),
        application_properties={b"kind": "order", b"n": 3},
    )
    write("emulator_transfer", "plain", 0, amqp(plain))
    inner = [
        amqp(Message(data=[b"one"], message_annotations={b"x-opt-partition-key": "k"})),
        amqp(Message(data=[b"two"], application_properties={b"p": "v"})),
        amqp(Message(value={"a": [1, 2]})),
    ]
    batch = BatchMessage(data=inner, message_annotations={b"x-opt-partition-key": "k"})
    write("emulator_transfer", "batch", 1, amqp(batch))
    write("emulator_transfer", "value_body", 3, (0).to_bytes(4, "big") + amqp(Message(value="text")))


def emulator_cbs():
    audience = "sb://localhost/eh1"
    sas = sas_token(audience)

    def put_token(token, token_type, name=audience):
        return amqp(
            Message(
                value=token,
                properties=Properties(message_id="cbs-1", reply_to=b"cbs"),
                application_properties={
                    b"operation": b"put-token",
                    b"type": token_type,
                    b"name": name,
                    b"expiration": EXPIRY,
                },
            )
        )

    write("emulator_cbs", "sas", 0, put_token(sas, b"servicebus.windows.net:sastoken"))
    write("emulator_cbs", "sas_resigned", 2, put_token(sas, b"servicebus.windows.net:sastoken", audience + "/partitions/0"))
    claims = json.dumps({"aud": "https://eventhubs.azure.net/", "exp": EXPIRY})
    header = base64.urlsafe_b64encode(b'{"alg":"RS256"}').rstrip(b"=").decode()
    payload = base64.urlsafe_b64encode(claims.encode()).rstrip(b"=").decode()
    write("emulator_cbs", "jwt", 0, put_token(f"{header}.{payload}.c2ln", b"jwt"))
    write("emulator_cbs", "jwt_claims", 4, put_token(claims, b"jwt"))
    management = amqp(
        Message(
            value=None,
            properties=Properties(message_id="mgmt-1", reply_to=b"mgmt"),
            application_properties={
                b"operation": b"READ",
                b"type": b"com.microsoft:partition",
                b"name": b"eh1",
                b"partition": b"1",
                b"security_token": sas,
            },
        )
    )
    write("emulator_cbs", "management", 1, management)
    write("emulator_cbs", "management_resigned", 3, management)


def sas_connection_string():
    token = sas_token("sb://localhost/eh1")
    write("sas_connection_string", "sas", 0, token)
    write("sas_connection_string", "sas_reordered", 0, "SharedAccessSignature skn=a%20b&se=5&sr=sb%3a%2f%2fx%2Fy&sig=c2ln+")
    strings = {
        "key": "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey=abc=;EntityPath=eh1",
        "emulator": "Endpoint=sb://localhost:5673;SharedAccessKeyName=RootManageSharedAccessKey;"
        "SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;",
        "signature": f"Endpoint=sb://ns.servicebus.windows.net;SharedAccessSignature={token};EntityPath=eh1",
    }
    for index, (name, text) in enumerate(strings.items()):
        write("sas_connection_string", f"connection_{name}", 1 + 2 * index, text)


def trace_context():
    write("trace_context", "parent", 0, TRACEPARENT)
    write("trace_context", "parent_state", 0, TRACEPARENT + "\0congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
    long_state = ",".join(f"v{i}={'x' * 60}" for i in range(12))
    write("trace_context", "long_state", 0, "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00\0" + long_state)


def config():
    toml = """listen = "127.0.0.1:50051"
metrics_listen = "127.0.0.1:9464"
emulator = true
event_hubs = ["eh1", "orders"]
drain_timeout_seconds = "30s"

[limits]
max_events_per_request = 500
client_events_per_second = 1000

[producer]
send_timeout_seconds = "10s"
"""
    write("config", "toml", 0, toml)
    yaml = """listen: 127.0.0.1:50051
emulator: true
event_hubs: [eh1, orders]
limits:
  max_events_per_request: 500
producer:
  send_timeout_seconds: 10
"""
    write("config", "yaml", 1, yaml)
    # The configuration reference's own example file.
    text = (REPO / "docs" / "configuration.md").read_text()
    for index, block in enumerate(re.findall(r"```toml\n(.*?)```", text, re.S)):
        write("config", f"docs_{index}", 0, block)


def main():
    with tempfile.TemporaryDirectory() as out:
        protos = ["eventhub/gateway/v1/gateway.proto", "io_cloudevents/v1/cloudevents.proto", "google/rpc/status.proto"]
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", "-I", str(REPO / "proto"), f"--python_out={out}", *protos],
            check=True,
        )
        sys.path.insert(0, out)
        from eventhub.gateway.v1 import gateway_pb2

        gateway_request(gateway_pb2)
    emulator_transfer()
    emulator_cbs()
    sas_connection_string()
    trace_context()
    config()


if __name__ == "__main__":
    main()
