#!/usr/bin/env python3
"""Regenerates the package's gRPC stubs from the repository's `proto/` (stock grpcio-tools), or with `--check`
fails when the committed ones differ from what `proto/` generates now.

    python clients/python/generate_stubs.py [--check]

The stubs are committed so that installing the package needs no code generator. `gateway.proto` and the
vendored CloudEvents format it imports (`io_cloudevents/v1/cloudevents.proto`) are generated; `google.rpc` comes
from `googleapis-common-protos`. The stubs' absolute imports of each other become relative ones, so the stubs
live inside `eventhub_gateway._proto`.
"""

import argparse
import pathlib
import re
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE.parents[1] / "proto"
SOURCE = "eventhub/gateway/v1/gateway.proto"
CLOUDEVENTS = "io_cloudevents/v1/cloudevents.proto"
TARGET = HERE / "src" / "eventhub_gateway" / "_proto"
GENERATED = ("gateway_pb2.py", "gateway_pb2.pyi", "gateway_pb2_grpc.py")
GENERATED_CLOUDEVENTS = ("cloudevents_pb2.py", "cloudevents_pb2.pyi")


def generate(out_dir: pathlib.Path) -> dict[str, str]:
    """Runs protoc on gateway.proto into `out_dir` and returns the package's files by name."""
    result = subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", "-I", str(PROTO_ROOT),
            f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", SOURCE, CLOUDEVENTS,
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        sys.exit(f"generate_stubs.py: protoc failed ({result.returncode}): {result.stderr}")
    produced = out_dir / pathlib.Path(SOURCE).parent
    files = {name: (produced / name).read_text() for name in GENERATED}
    cloudevents = out_dir / pathlib.Path(CLOUDEVENTS).parent
    files.update({name: (cloudevents / name).read_text() for name in GENERATED_CLOUDEVENTS})
    files["gateway_pb2_grpc.py"] = re.sub(
        r"^from eventhub\.gateway\.v1 import gateway_pb2 as",
        "from . import gateway_pb2 as",
        files["gateway_pb2_grpc.py"],
        flags=re.MULTILINE,
    )
    for name in ("gateway_pb2.py", "gateway_pb2.pyi"):
        files[name] = re.sub(
            r"^from io_cloudevents\.v1 import cloudevents_pb2 as",
            "from . import cloudevents_pb2 as",
            files[name],
            flags=re.MULTILINE,
        )
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        files = generate(pathlib.Path(scratch))
    if args.check:
        stale = [name for name, text in files.items() if not (TARGET / name).is_file()
                 or (TARGET / name).read_text() != text]
        if stale:
            print(f"stale stubs in {TARGET}: {', '.join(stale)}; run python {pathlib.Path(__file__).name}",
                  file=sys.stderr)
            return 1
        return 0
    for name, text in files.items():
        (TARGET / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
