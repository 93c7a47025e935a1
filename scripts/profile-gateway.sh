#!/usr/bin/env bash
# Profiles a gateway process under callgrind while the bench harness drives one scenario through it:
# instructions per event (counts, not seconds: repeatable on a noisy machine) and the functions that cost them.
#   scripts/profile-gateway.sh SCENARIO [EVENTS] [SIZE]     e.g. scripts/profile-gateway.sh stream 20000 100
# Needs `cargo build --release --bins` first. Writes target/profile/<scenario>-<size>.callgrind and a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
scenario=${1:?scenario: stream, stream-batched, unary or batch-rpc}
events=${2:-20000}
size=${3:-100}
bin=target/release
out=target/profile
mkdir -p "$out"
profile="$out/$scenario-$size.callgrind"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

coproc EMULATOR { exec "$bin/eventhub-gateway" emulator --listen 127.0.0.1:0 --event-hub bench:8 2>/dev/null; }
pids+=("$EMULATOR_PID")
read -r connection_string <&"${EMULATOR[0]}"

coproc GATEWAY {
    RUST_LOG=error exec valgrind --tool=callgrind --callgrind-out-file="$profile" --instr-atstart=no \
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
echo "$scenario, $size B: $sent events, $total instructions in the gateway, $((total / sent)) per event"
callgrind_annotate --inclusive=yes "$profile" 2>/dev/null | sed -n '1,80p' > "$out/$scenario-$size.summary"
echo "profile: $profile (callgrind_annotate --inclusive=yes $profile); summary: $out/$scenario-$size.summary"
