#!/usr/bin/env bash
# Profiles a gateway process under callgrind while the bench harness drives one scenario through it:
# instructions per event (counts, not seconds: repeatable on a noisy machine) and the functions that cost them.
#   scripts/profile-gateway.sh [--otlp[=RATIO]] SCENARIO [EVENTS] [SIZE]   e.g. scripts/profile-gateway.sh stream 20000 100
# --otlp exports the gateway's spans over OTLP/HTTP to a loopback sink that drops them (as `bench --otlp`),
# sampling every call, or RATIO of them (parentbased_traceidratio).
# Needs `cargo build --release --bins` first. Writes target/profile/<scenario>-<size>.callgrind and a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
otlp=
case ${1:-} in
--otlp) otlp=1.0; shift ;;
--otlp=*) otlp=${1#--otlp=}; shift ;;
esac
scenario=${1:?scenario: stream, stream-batched, unary or batch-rpc}
events=${2:-20000}
size=${3:-100}
bin=target/release
out=target/profile
mkdir -p "$out"
profile="$out/$scenario-$size${otlp:+-otlp$otlp}.callgrind"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

export_env=()
if [[ -n $otlp ]]; then
    coproc SINK {
        exec python3 -c '
import http.server
class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
print(server.server_address[1], flush=True)
server.serve_forever()'
    }
    pids+=("$SINK_PID")
    read -r sink_port <&"${SINK[0]}"
    export_env=(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$sink_port" OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf
        OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG="$otlp")
fi

coproc EMULATOR { exec "$bin/eventhub-gateway" emulator --listen 127.0.0.1:0 --event-hub bench:8 2>/dev/null; }
pids+=("$EMULATOR_PID")
read -r connection_string <&"${EMULATOR[0]}"

coproc GATEWAY {
    RUST_LOG=error exec env "${export_env[@]}" valgrind --tool=callgrind --callgrind-out-file="$profile" --instr-atstart=no \
        "$bin/eventhub-gateway" serve --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --event-hub bench \
        --connection-string "$connection_string" 2>"$out/valgrind.log"
}
gateway_pid=$GATEWAY_PID
pids+=("$gateway_pid")
read -r started <&"${GATEWAY[0]}"
address=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["grpc"])' "$started")

# Counting starts once the gateway is up (start-up is not what is measured) and after one warm-up event.
"$bin/bench" --gateway "$address" --only "$scenario" --sizes "$size" --latency-ms 0 --events 100 \
    --duration 600 --json "$out/warmup.json" >/dev/null
callgrind_control -i on "$gateway_pid" >/dev/null
"$bin/bench" --gateway "$address" --only "$scenario" --sizes "$size" --latency-ms 0 --events "$events" \
    --duration 600 --json "$out/$scenario-$size.json"
callgrind_control -i off "$gateway_pid" >/dev/null
kill -TERM "$gateway_pid"
wait "$gateway_pid" || true

sent=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(sum(o["events_ok"]+o["events_failed"] for o in r))' \
    "$out/$scenario-$size.json")
total=$(callgrind_annotate "$profile" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",", "", $1); print $1; done = 1}')
echo "$scenario, $size B${otlp:+, spans exported (ratio $otlp)}: $sent events, $total instructions in the gateway, $((total / sent)) per event"
callgrind_annotate --inclusive=yes "$profile" 2>/dev/null | sed -n '1,80p' > "${profile%.callgrind}.summary"
echo "profile: $profile (callgrind_annotate --inclusive=yes $profile); summary: ${profile%.callgrind}.summary"
