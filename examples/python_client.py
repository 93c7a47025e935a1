"""Publishes events through eventhub-gateway from Python with stubs generated from proto/ by stock grpcio-tools.

    python -m grpc_tools.protoc -I proto --python_out=gen --grpc_python_out=gen \
        proto/eventhub/gateway/v1/gateway.proto proto/io_cloudevents/v1/cloudevents.proto \
        proto/google/rpc/status.proto proto/google/rpc/code.proto proto/google/rpc/error_details.proto
    PYTHONPATH=gen python examples/python_client.py [GATEWAY_ADDRESS]

Sends one event, a batch of three (one of them invalid, to show per-event results), and a stream of 1000
events with one acknowledgement each; prints what happened and exits 1 if an event that should have been
accepted was not.
"""

import sys

import grpc
from eventhub.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2, status_pb2


def reason(status):
    """The stable ErrorInfo reason of a google.rpc.Status (what to branch on)."""
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


def call_error(error):
    """The google.rpc.Status of a failed call, from its grpc-status-details-bin trailer."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    return status_pb2.Status(code=error.code().value[0], message=error.details() or "")


def main(address):
    channel = grpc.insecure_channel(address)
    gateway = gateway_pb2_grpc.EventHubGatewayStub(channel)
    metadata = [("x-client-id", "python-example")]

    # One event, with a partition key: all events of one key land on one partition, in order.
    sent = gateway.SendEvent(
        gateway_pb2.SendEventRequest(event=gateway_pb2.Event(text="hello from Python", partition_key="user-42")),
        metadata=metadata,
        timeout=10,
    )
    print(f"SendEvent: accepted by {sent.event_hub}")

    # A batch: each event gets its own status; the event without a body fails alone.
    order = struct_pb2.Struct()
    order.update({"order": 1001, "items": ["tea", "milk"]})
    batch = gateway.SendEvents(
        gateway_pb2.SendEventsRequest(
            events=[
                gateway_pb2.Event(json=order, properties={"kind": "order"}),
                gateway_pb2.Event(binary=b"\x00\x01\x02", partition_id="0"),
                gateway_pb2.Event(),
            ]
        ),
        metadata=metadata,
        timeout=10,
    )
    for index, result in enumerate(batch.results):
        outcome = "accepted" if result.status.code == 0 else f"refused: {reason(result.status)}: {result.status.message}"
        print(f"SendEvents[{index}]: {outcome}")
    batch_ok = [result.status.code == 0 for result in batch.results] == [True, True, False]

    # A stream: one ack per sequence number, in any order, grouped.
    requests = (
        gateway_pb2.SendStreamRequest(sequence=n, event=gateway_pb2.Event(text=f"event {n}", partition_key=f"k{n % 4}"))
        for n in range(1, 1001)
    )
    acked = {}
    for response in gateway.SendStream(requests, metadata=metadata, timeout=60):
        for ack in response.acks:
            acked[ack.sequence] = ack.status.code
    accepted = sum(1 for code in acked.values() if code == 0)
    print(f"SendStream: {accepted} of 1000 accepted")

    # Errors carry a google.rpc.Status with a stable reason.
    try:
        gateway.SendEvent(
            gateway_pb2.SendEventRequest(event_hub="no-such-hub", event=gateway_pb2.Event(text="x")), timeout=10
        )
    except grpc.RpcError as error:
        print(f"unknown hub: {error.code().name} {reason(call_error(error))}")

    return 0 if batch_ok and accepted == 1000 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"))
