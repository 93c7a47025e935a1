"""The documented examples, as written: docs/clients.md's grpcio walkthrough (stubs generated from proto/ with
grpcio-tools, then examples/python_client.py against a running gateway, whose events are read back with the
official consumer), and the README's front-page examples for the CLI, Python (the client package) and grpcurl."""

import json
import os
import re
import shlex
import subprocess
import sys

from conftest import BINARY, REPO
from gateway_client import partition_positions, read_since


def test_the_python_walkthrough_runs_as_written(gateway, tmp_path):
    protoc = [
        sys.executable, "-m", "grpc_tools.protoc", "-I", "proto",
        f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
        "proto/eventhub/gateway/v1/gateway.proto", "proto/io_cloudevents/v1/cloudevents.proto",
        "proto/google/rpc/status.proto",
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


# --------------------------------------------------------------------------------------------------------------
# The front page's examples (README.md "Use it"), taken from the README itself and run as written against the
# suite's gateway: only its address and the tools' paths are put in.
# --------------------------------------------------------------------------------------------------------------

README_ADDRESS = "127.0.0.1:50051"


def readme_blocks(language):
    """The README's fenced code blocks in `language`, in order."""
    text = (REPO / "README.md").read_text()
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.S | re.M)


def events_stored(connection_string, before):
    """How many events eh1 gained since the positions `before`."""
    after = partition_positions(connection_string, "eh1")
    return sum(after[p] - before.get(p, -1) for p in after)


def test_the_readme_python_example_runs_as_written(gateway):
    """With the client package installed (scripts/test.sh installs it as the README says)."""
    (example,) = readme_blocks("python")
    before = partition_positions(gateway.connection_string, "eh1")
    ran = subprocess.run(
        [sys.executable, "-c", example.replace(README_ADDRESS, gateway.address)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.startswith("accepted by Event Hubs: partition "), ran.stdout
    assert events_stored(gateway.connection_string, before) == 1


def test_the_readme_cli_and_grpcurl_examples_run_as_written(gateway, tmp_path):
    from test_grpcurl import find_grpcurl

    (cli,) = [block for block in readme_blocks("sh") if "eventhub-gateway send" in block]
    (grpcurl,) = [block for block in readme_blocks("sh") if block.startswith("grpcurl ")]
    # `send` goes to 127.0.0.1:50051 unless told otherwise: the function gives it the suite's gateway.
    prelude = (
        "set -euo pipefail\n"
        f"eventhub-gateway() {{ if [ \"$1\" = send ]; then shift; {shlex.quote(BINARY)} send"
        f" --gateway {gateway.address} \"$@\"; else {shlex.quote(BINARY)} \"$@\"; fi; }}\n"
        f"grpcurl() {{ {shlex.quote(find_grpcurl())} \"$@\"; }}\n"
    )
    before = partition_positions(gateway.connection_string, "eh1")
    for block, stored in ((cli, 2 + 1000), (grpcurl, 1)):
        for line in block.splitlines():
            ran = subprocess.run(
                ["bash", "-c", prelude + line.replace(README_ADDRESS, gateway.address)],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert ran.returncode == 0, f"{line}\n{ran.stdout}{ran.stderr}"
            if "SendEvent" in line:
                assert json.loads(ran.stdout)["eventHub"] == "eh1", ran.stdout
            if "Health/Check" in line:
                assert json.loads(ran.stdout) == {"status": "SERVING"}, ran.stdout
        assert events_stored(gateway.connection_string, before) == stored, block
        before = partition_positions(gateway.connection_string, "eh1")


def test_the_readme_rest_example_runs_as_written(start_gateway):
    """The curl line against a gateway serving the REST API; the event is stored as sent, with its key and header."""
    running = start_gateway("--emulator", "--event-hub", "eh1", "--http-listen", "127.0.0.1:0")
    (curl,) = [block for block in readme_blocks("sh") if block.startswith("curl ")]
    before = partition_positions(running.connection_string, "eh1")
    ran = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + curl.replace("127.0.0.1:8080", running.http)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.startswith("HTTP/1.1 201"), ran.stdout
    (event,) = [event for events in read_since(running.connection_string, "eh1", before).values() for event in events]
    assert event.body_as_str() == '{"order": 1}'
    assert event.partition_key == b"user-42"
    assert event.properties[b"source"] == b"shell"
