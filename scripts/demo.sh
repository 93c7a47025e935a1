#!/usr/bin/env bash
# Starts the Event Hubs emulator on localhost:5672 and sends events to it with the official Python SDK,
# then reads them back; the emulator keeps running until Ctrl-C, for your own clients to use.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
cargo build --release --locked --bin eventhub-gateway

connection_file=$(mktemp)
target/release/eventhub-gateway emulator --listen 127.0.0.1:5672 --event-hub eh1:4 >"$connection_file" &
emulator=$!
trap 'kill "$emulator" 2>/dev/null; rm -f "$connection_file"' EXIT
for _ in $(seq 100); do
    [ -s "$connection_file" ] && break
    kill -0 "$emulator" 2>/dev/null || { echo "the emulator did not start (is port 5672 in use?)" >&2; exit 1; }
    sleep 0.1
done
connection_string=$(head -n1 "$connection_file")
echo "Connection string: $connection_string"
.venv/bin/python examples/send_and_receive.py "$connection_string" eh1
echo "The emulator is still running on localhost:5672 for your own clients. Ctrl-C stops it."
wait "$emulator"
