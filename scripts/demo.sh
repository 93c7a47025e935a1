#!/usr/bin/env bash
# The README's run command: builds, serves the gateway against its in-process Event Hubs emulator, sends
# events through it (the `send` subcommand, then the Python example client generated from proto/), reads
# them back with the official Python SDK, and keeps serving until Ctrl-C.
#
# Environment (all optional):
#   DEMO_LISTEN=127.0.0.1:50051          the gRPC listener
#   DEMO_METRICS_LISTEN=127.0.0.1:9464   /metrics, /healthz, /readyz
#   DEMO_HTTP_LISTEN=127.0.0.1:8080      the Event Hubs REST send API
#   EVENTHUB_GATEWAY_BIN=path            use this binary instead of building one
#   DEMO_EXIT=1                          stop after the tour instead of serving until Ctrl-C (the tests use it)
set -euo pipefail
cd "$(dirname "$0")/.."

listen=${DEMO_LISTEN:-127.0.0.1:50051}
metrics_listen=${DEMO_METRICS_LISTEN:-127.0.0.1:9464}
http_listen=${DEMO_HTTP_LISTEN:-127.0.0.1:8080}
step() { printf '\n==> %s\n' "$*"; }

step "Python venv with the demo's few packages (examples/requirements.txt: the official SDK, grpcio) and the client package (clients/python)"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r examples/requirements.txt
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-build-isolation ./clients/python

if [ -n "${EVENTHUB_GATEWAY_BIN:-}" ]; then
    gateway=$EVENTHUB_GATEWAY_BIN
else
    gateway=target/release/eventhub-gateway
    if [ -x "$gateway" ]; then
        step "Building the gateway (release; up to date in seconds when nothing changed)"
    else
        step "Building the gateway (release): about 5 minutes on 2 cores the first time, seconds afterwards"
    fi
    cargo build --release --locked --bin eventhub-gateway
    echo "The binary is $PWD/$gateway (or: cargo install --locked --path . puts eventhub-gateway on your PATH)"
fi

startup=$(mktemp)
logs=$(mktemp)
generated=$(mktemp -d)
step "Serving the gateway on $listen against its in-process Event Hubs emulator"
"$gateway" serve --emulator --listen "$listen" --metrics-listen "$metrics_listen" --http-listen "$http_listen" \
    --event-hub eh1 >"$startup" 2>"$logs" &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -rf "$startup" "$logs" "$generated"' EXIT
for _ in $(seq 150); do
    [ -s "$startup" ] && break
    if ! kill -0 "$server" 2>/dev/null; then
        # The gateway says which listener failed (gRPC or metrics) and why: show its words, not a guess.
        echo "the gateway did not start:" >&2
        grep -m 3 -i -E '^(error|caused by)|error:' "$logs" >&2 || tail -n 3 "$logs" >&2
        echo "(choose other ports with DEMO_LISTEN, DEMO_METRICS_LISTEN and DEMO_HTTP_LISTEN=127.0.0.1:PORT)" >&2
        exit 1
    fi
    sleep 0.1
done
[ -s "$startup" ] || { echo "the gateway did not report its listeners within 15 s:" >&2; tail -n 5 "$logs" >&2; exit 1; }
emulator=$(.venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["emulator"])' <"$startup")
metrics=$(.venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["metrics"])' <"$startup")
http=$(.venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["http"])' <"$startup")

step "One event with the send subcommand"
"$gateway" send --gateway "http://$listen" --text "hello from eventhub-gateway send" --partition-key demo
step "1000 events, one per line, streamed"
seq 1 1000 | "$gateway" send --gateway "http://$listen" --quiet -
step "The Python example client (stubs generated from proto/ with grpcio-tools)"
.venv/bin/python -m grpc_tools.protoc -I proto --python_out="$generated" --grpc_python_out="$generated" \
    proto/eventhub/gateway/v1/gateway.proto proto/io_cloudevents/v1/cloudevents.proto \
    proto/google/rpc/status.proto proto/google/rpc/code.proto \
    proto/google/rpc/error_details.proto
PYTHONPATH="$generated" .venv/bin/python examples/python_client.py "$listen"
step "One event over the Event Hubs REST send API (POST http://$http/eh1/messages, as a REST sender posts)"
.venv/bin/python - "$http" <<'PY'
import sys
import urllib.request

request = urllib.request.Request(
    f"http://{sys.argv[1]}/eh1/messages",
    data=b'{"order": 1, "via": "REST"}',
    headers={"BrokerProperties": '{"PartitionKey": "demo"}', "Source": "demo"},
    method="POST",
)
# Loopback, never through a proxy from the environment.
with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30) as answer:
    print("REST:", answer.status, answer.reason)
PY
step "Reading back with the official Python SDK, straight from the emulator"
.venv/bin/python examples/read_back.py "$emulator" eh1

cat <<EOF

The gateway is serving on $listen (gateway logs: $logs).
Try next:
  $gateway send --gateway http://$listen --json '{"order": 1}' --partition-key customer-7
  seq 1 100000 | $gateway send --gateway http://$listen -
  .venv/bin/python examples/read_back.py '$emulator' eh1      # read back what was stored
  curl -i -X POST http://$http/eh1/messages -H 'BrokerProperties: {"PartitionKey": "k"}' --data-binary 'hi'
  curl -s http://$metrics/metrics | grep eventhub_gateway_events   # counters, latencies, pool gauges
  Python, grpcurl and other languages: README.md; the API and its errors: proto/eventhub/gateway/v1/gateway.proto
EOF
if [ -n "${DEMO_EXIT:-}" ]; then
    exit 0
fi
echo "Ctrl-C stops it."
wait "$server"
