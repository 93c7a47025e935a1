"""The README's Python example, as written: stubs generated from proto/ with grpcio-tools, then
examples/python_client.py against a running gateway, whose events are read back with the official consumer."""

import os
import subprocess
import sys

from conftest import REPO
from gateway_client import partition_positions, read_since


def test_the_readme_python_example_runs_as_written(gateway, tmp_path):
    protoc = [
        sys.executable, "-m", "grpc_tools.protoc", "-I", "proto",
        f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
        "proto/eventhub/gateway/v1/gateway.proto", "proto/google/rpc/status.proto",
        "proto/google/rpc/code.proto", "proto/google/rpc/error_details.proto",
    ]
    subprocess.run(protoc, cwd=REPO, check=True, timeout=60)
    before = partition_positions(gateway.connection_string, "eh1")
    example = subprocess.run(
        [sys.executable, "examples/python_client.py", gateway.address],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert example.returncode == 0, example.stdout + example.stderr
    assert "SendStream: 1000 of 1000 accepted" in example.stdout
    assert "unknown hub: NOT_FOUND UNKNOWN_EVENT_HUB" in example.stdout
    stored = read_since(gateway.connection_string, "eh1", before)
    # One event, two of the batch of three, and the stream of 1000.
    assert sum(len(events) for events in stored.values()) == 1003
