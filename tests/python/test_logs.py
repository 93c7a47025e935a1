"""No secret and no payload in the gateway's logs, even at RUST_LOG=trace and in JSON: a gateway authenticated
with a shared access key and one with a SAS token send events through every RPC, good and bad, and their
whole stderr is searched for the key, the signature and the bodies. (Entra ID tokens: tests/producer.rs.)"""

import base64
import hashlib
import hmac
import time
import urllib.parse

import grpc

from conftest import Emulator
from gateway_client import GatewayProcess, json_struct

KEY_NAME = "gateway-writer"
KEY = base64.b64encode(b"a secret shared access key, 32b!").decode()
MARKER = "PAYLOAD-MARKER-7f3a"


def sas_token(resource, key_name, key, valid_for=3600):
    """A SAS token as the Azure SDKs sign it."""
    expiry = str(int(time.time() + valid_for))
    encoded = urllib.parse.quote_plus(resource.lower())
    signature = base64.b64encode(
        hmac.new(key.encode(), f"{encoded}\n{expiry}".encode(), hashlib.sha256).digest()
    ).decode()
    return (
        f"SharedAccessSignature sr={encoded}&sig={urllib.parse.quote_plus(signature)}&se={expiry}&skn={key_name}",
        signature,
    )


def send_everything(api, gateway):
    """Good and bad events through SendEvent, SendEvents and SendStream."""
    stub, pb = gateway.stub, api.pb
    stub.SendEvent(pb.SendEventRequest(event=pb.Event(text=f"{MARKER} text")), timeout=30)
    stub.SendEvent(pb.SendEventRequest(event=pb.Event(json=json_struct({"marker": MARKER}))), timeout=30)
    results = stub.SendEvents(
        pb.SendEventsRequest(
            events=[
                pb.Event(binary=f"{MARKER} binary".encode(), properties={"p": MARKER}),
                pb.Event(text=f"{MARKER} bad", partition_id="99"),
                pb.Event(binary=MARKER.encode() * 80_000),  # too large
            ]
        ),
        timeout=30,
    ).results
    assert [r.status.code for r in results] == [0, 3, 3]
    requests = (pb.SendStreamRequest(sequence=n, event=pb.Event(text=f"{MARKER} {n}")) for n in range(50))
    acks = [ack for response in stub.SendStream(requests, timeout=30) for ack in response.acks]
    assert len(acks) == 50
    try:
        stub.SendEvent(pb.SendEventRequest(event_hub="nope", event=pb.Event(text=MARKER)), timeout=30)
    except grpc.RpcError:
        pass


def test_no_key_signature_or_payload_is_ever_logged(api):
    emulator = Emulator("--event-hub", "eh1:2", "--key-name", KEY_NAME, "--key", KEY)
    host = emulator.connection_string.split("sb://")[1].split(";")[0].rstrip("/")
    token, signature = sas_token(f"sb://{host}/eh1", KEY_NAME, KEY)
    with_key = emulator.connection_string
    with_token = f"Endpoint=sb://{host}/;SharedAccessSignature={token};UseDevelopmentEmulator=true"
    gateways = []
    try:
        for connection_string, log_format in [(with_key, "text"), (with_token, "json")]:
            gateway = GatewayProcess(
                api, "--connection-string", connection_string, "--event-hub", "eh1",
                "--log-format", log_format,
                env={"RUST_LOG": "trace"},
                log_lines=1_000_000,
            )
            gateways.append(gateway)
            send_everything(api, gateway)
            assert gateway.terminate() == 0
            logs = gateway.logs()
            assert "gateway listening" in logs, "the logs were captured"
            for secret in [KEY, signature, urllib.parse.quote_plus(signature), token, MARKER]:
                assert secret not in logs, f"{secret[:12]}... in the {log_format} logs"
    finally:
        for gateway in gateways:
            gateway.stop()
        emulator.stop()
