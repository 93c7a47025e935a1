#!/usr/bin/env bash
# The chaos and soak suite (issue 18): makes two network namespaces joined by a veth pair (the gateway's side
# 10.213.0.1/30, the emulator's 10.213.0.2/30), builds the gateway and the chaos binary, and runs
# `chaos "$@"` in the gateway's namespace (`scripts/chaos.sh selftest`, `scripts/chaos.sh run --short`).
# Needs root, iproute2, nftables (installed with apt-get when missing) and tbf. Everything it makes is removed
# on exit, on failure and on Ctrl-C: every process in both namespaces is killed, then the namespaces go (and
# with them the veth pair, the nftables table and the qdiscs). No address outside the namespaces is a target.
# CHAOS_PROFILE=release builds and runs release binaries (default: debug). CHAOS_PREBUILT=1 builds nothing and
# runs the binaries already in the target directory (scripts/test.sh, after its own build).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

fail() {
    echo "chaos.sh: $*" >&2
    exit 1
}

profile=${CHAOS_PROFILE:-debug}
case "$profile" in
    debug) profile_flag=() ;;
    release) profile_flag=(--release) ;;
    *) fail "CHAOS_PROFILE must be debug or release, not '$profile'" ;;
esac

# Prerequisites, each failing with one line that names what is missing.
[ "$(id -u)" = 0 ] || fail "needs root (network namespaces, nftables and tc): run it as root"
command -v ip >/dev/null 2>&1 || fail "iproute2's 'ip' is missing (apt-get install iproute2)"
command -v tc >/dev/null 2>&1 || fail "iproute2's 'tc' is missing (apt-get install iproute2)"
if ! command -v nft >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nftables >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nftables >/dev/null 2>&1; } \
        || true
fi
command -v nft >/dev/null 2>&1 || fail "nftables' 'nft' is missing and apt-get could not install it"

# Namespaces of earlier runs whose script died without cleaning up (SIGKILL): their pid suffix is gone.
for stale in $(ip netns list | awk '{print $1}' | grep -E '^chaos-(gw|eh)-[0-9]+$' || true); do
    pid=${stale##*-}
    if ! kill -0 "$pid" 2>/dev/null; then
        pids=$(ip netns pids "$stale" 2>/dev/null || true)
        [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
        ip netns delete "$stale" 2>/dev/null || true
    fi
done

gw_ns=chaos-gw-$$
eh_ns=chaos-eh-$$
gw_veth=chaos-gw
eh_veth=chaos-eh
child=
build=

# Kills every process in both namespaces (TERM, then KILL after 3 s), then deletes the namespaces.
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [ -n "$child" ]; then
        kill -TERM "$child" 2>/dev/null || true
    fi
    if [ -n "$build" ]; then
        # The build runs in a process group of its own (outside the namespaces): cargo and every rustc.
        kill -TERM -- "-$build" 2>/dev/null || true
    fi
    local ns pids deadline=$((SECONDS + 3))
    for ns in "$gw_ns" "$eh_ns"; do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [ -z "$pids" ] || kill -TERM $pids 2>/dev/null || true
    done
    while [ "$SECONDS" -lt "$deadline" ]; do
        pids=$( { ip netns pids "$gw_ns"; ip netns pids "$eh_ns"; } 2>/dev/null || true)
        [ -n "$pids" ] || break
        sleep 0.1
    done
    # A process may fork while it is being killed: repeat until both namespaces are empty (bounded).
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        pids=$( { ip netns pids "$gw_ns"; ip netns pids "$eh_ns"; } 2>/dev/null || true)
        [ -n "$pids" ] || break
        kill -KILL $pids 2>/dev/null || true
        sleep 0.1
    done
    if [ -n "$build" ]; then
        kill -KILL -- "-$build" 2>/dev/null || true
    fi
    if [ -n "$child" ]; then
        wait "$child" 2>/dev/null || true
    fi
    for ns in "$gw_ns" "$eh_ns"; do
        if ip netns list | awk '{print $1}' | grep -qx "$ns"; then
            ip netns delete "$ns" 2>/dev/null || echo "chaos.sh: could not delete namespace $ns" >&2
        fi
    done
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM


# The namespaces, each a probe of one kernel facility.
out=$(ip netns add "$gw_ns" 2>&1) || fail "cannot make a network namespace (ip netns add): $out"
out=$(ip netns add "$eh_ns" 2>&1) || fail "cannot make a network namespace (ip netns add): $out"
# The veth is made inside the gateway's namespace with its peer in the emulator's: no name meets the host's.
out=$(ip -n "$gw_ns" link add "$gw_veth" type veth peer name "$eh_veth" netns "$eh_ns" 2>&1) \
    || fail "cannot make a veth pair between namespaces (ip link add type veth): $out"
ip -n "$gw_ns" link set lo up
ip -n "$eh_ns" link set lo up
ip -n "$gw_ns" addr add 10.213.0.1/30 dev "$gw_veth"
ip -n "$eh_ns" addr add 10.213.0.2/30 dev "$eh_veth"
ip -n "$gw_ns" link set "$gw_veth" up
ip -n "$eh_ns" link set "$eh_veth" up
out=$(ip netns exec "$gw_ns" tc qdisc add dev "$gw_veth" root tbf rate 1mbit burst 32kbit latency 50ms 2>&1) \
    || fail "the kernel has no tbf qdisc (bandwidth caps): $out"
ip netns exec "$gw_ns" tc qdisc del dev "$gw_veth" root
out=$(ip netns exec "$eh_ns" nft -f - 2>&1 <<'EOF'
table inet chaos_probe {
    chain input {
        type filter hook input priority 0; policy accept;
        tcp dport 9 numgen random mod 100 < 1 counter drop
        tcp dport 9 counter reject with tcp reset
    }
}
delete table inet chaos_probe
EOF
) || fail "nftables lacks what the faults use (numgen random, reject with tcp reset): $out"

target=${CARGO_TARGET_DIR:-$root/target}
bin=$target/$profile
if [ -n "${CHAOS_PREBUILT:-}" ]; then
    echo "chaos.sh: namespaces $gw_ns (10.213.0.1) and $eh_ns (10.213.0.2); binaries of $bin" >&2
    for name in eventhub-gateway chaos; do
        [ -x "$bin/$name" ] || fail "CHAOS_PREBUILT is set but $bin/$name is not built"
    done
else
    echo "chaos.sh: namespaces $gw_ns (10.213.0.1) and $eh_ns (10.213.0.2); building ($profile)" >&2
    # setsid: the build's own process group, so an interrupt ends every rustc with it, not only cargo.
    setsid cargo build --locked "${profile_flag[@]}" --bin eventhub-gateway --bin chaos &
    build=$!
    wait "$build"
    build=
fi

export CHAOS_GATEWAY_BIN=$bin/eventhub-gateway
export CHAOS_GATEWAY_NS=$gw_ns CHAOS_EMULATOR_NS=$eh_ns
export CHAOS_GATEWAY_IP=10.213.0.1 CHAOS_EMULATOR_IP=10.213.0.2
export CHAOS_GATEWAY_VETH=$gw_veth CHAOS_EMULATOR_VETH=$eh_veth
# In the background with a wait, so a signal to this script is handled at once (bash runs traps only between
# foreground commands); `ip netns exec` execs chaos, so $! is chaos itself.
ip netns exec "$gw_ns" "$bin/chaos" "$@" &
child=$!
wait "$child"
