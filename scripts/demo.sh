#!/usr/bin/env bash
# The README's run command: builds, serves the gateway on 127.0.0.1:50051 against its in-process Event Hubs
# emulator, sends events through it (the `send` subcommand, then the Python example client generated from
# proto/), reads them back with the official Python SDK, and keeps serving until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
cargo build --release --locked --bin eventhub-gateway
gateway=target/release/eventhub-gateway

startup=$(mktemp)
generated=$(mktemp -d)
"$gateway" serve --emulator --listen 127.0.0.1:50051 --event-hub eh1 >"$startup" &
server=$!
trap 'kill "$server" 2>/dev/null; rm -rf "$startup" "$generated"' EXIT
for _ in $(seq 100); do
    [ -s "$startup" ] && break
    kill -0 "$server" 2>/dev/null || { echo "the gateway did not start (is port 50051 in use?)" >&2; exit 1; }
    sleep 0.1
done
emulator=$(.venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["emulator"])' <"$startup")

echo "==> one event with the send subcommand"
"$gateway" send --text "hello from eventhub-gateway send" --partition-key demo
echo "==> 1000 events, one per line, streamed"
seq 1 1000 | "$gateway" send --quiet -
echo "==> the Python example client (stubs generated from proto/ with grpcio-tools)"
.venv/bin/python -m grpc_tools.protoc -I proto --python_out="$generated" --grpc_python_out="$generated" \
    proto/eventhub/gateway/v1/gateway.proto proto/google/rpc/status.proto proto/google/rpc/code.proto \
    proto/google/rpc/error_details.proto
PYTHONPATH="$generated" .venv/bin/python examples/python_client.py 127.0.0.1:50051
echo "==> reading back with the official Python SDK, straight from the emulator"
.venv/bin/python examples/read_back.py "$emulator" eh1
echo
echo "The gateway keeps serving on 127.0.0.1:50051 (emulator: $emulator). Ctrl-C stops it."
wait "$server"
