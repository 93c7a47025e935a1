#!/usr/bin/env bash
# Runs every test of the project on a machine that has only the Rust toolchain, Python 3, Node and openssl:
# installs the pinned Python venv (official Azure SDK) and node modules first, then runs the Rust
# unit and integration tests, the Python SDK suite and the Node SDK suite against the real binary, the chaos
# suite's short run (scripts/chaos.sh: needs root for its network namespaces, and fails without), and the
# fuzz targets briefly (scripts/fuzz.sh; installs the pinned cargo-fuzz).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

step() { printf '\n==> %s (at %ss)\n' "$*" "$SECONDS"; }

# CI builds once from a clean clone: incremental caches would only take disk (gigabytes) it does not reuse.
if [ -n "${CI:-}" ]; then
    export CARGO_INCREMENTAL=0
fi

step "Python venv (tests/python/requirements.txt)"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
# The client package from its directory, as its users install it; its dependency ranges must take the pins.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-build-isolation ./clients/python

step "Node modules (tests/node/package-lock.json)"
(cd tests/node && npm ci --no-audit --no-fund --loglevel=error)

step "Dependency policy: rustls on aws-lc only (ring makes fe2o3's amqps:// panic at run time)"
if cargo tree --locked --target all -i ring 2>/dev/null | grep -q '^ring'; then
    cargo tree --locked --target all -i ring
    echo "ring is in the dependency tree: use the aws-lc backend only" >&2
    exit 1
fi

step "nftables for the blackhole test in a network namespace (tests/health.rs; root only)"
if [ "$(id -u)" = 0 ]; then
    if ! command -v nft >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nftables >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 \
                 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nftables >/dev/null; } \
            || true
    fi
    if command -v nft >/dev/null 2>&1 && command -v ip >/dev/null 2>&1; then
        # Root with the tools: a namespace that cannot be made fails the test instead of skipping it.
        export EVENTHUB_GATEWAY_REQUIRE_NFT=1
    else
        echo "WARNING: nft or ip missing: the nftables blackhole test will SKIP (the relay variant still runs)" >&2
    fi
else
    echo "WARNING: not root: the nftables blackhole test will SKIP (the relay variant still runs)" >&2
fi

step "Chromium for the browser gRPC-Web and CORS test (tests/node/browser.test.mjs; root installs it)"
if [ -z "${EVENTHUB_GATEWAY_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    # Bounded: a mirror that hangs must not hold the run (the test then skips with its WARNING, as below).
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
        || { timeout 300 apt-get update -qq >/dev/null 2>&1 \
             && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
        || true
fi
if [ -z "${EVENTHUB_GATEWAY_CHROMIUM:-}" ] && command -v chromium >/dev/null 2>&1; then
    EVENTHUB_GATEWAY_CHROMIUM="$(command -v chromium)"
fi
if [ -n "${EVENTHUB_GATEWAY_CHROMIUM:-}" ]; then
    # A browser at hand: one that cannot start fails the test instead of skipping it.
    export EVENTHUB_GATEWAY_CHROMIUM EVENTHUB_GATEWAY_REQUIRE_BROWSER=1
else
    echo "WARNING: no Chromium (not root, or apt-get could not install it): the browser gRPC-Web test will SKIP" >&2
fi

step "The gateway builds without its emulator (the default feature \`emulator\` off)"
cargo check --locked -p eventhub-gateway --no-default-features

step "API docs of every crate build without a warning"
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps --workspace --quiet

step "Build"
cargo build --all-targets --locked
export EVENTHUB_GATEWAY_BIN="$root/target/debug/eventhub-gateway"

step "Rust unit and integration tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --locked --no-fail-fast
else
    cargo test --locked --no-fail-fast
fi

step "Official Python SDK against the emulator"
(cd tests/python && "$root/.venv/bin/python" -m pytest -q)

step "Official JavaScript SDK against the emulator"
(cd tests/node && npm test --silent)

step "The official Rust SDK contender of the benchmarks (crates/bench/contenders/rust-sdk, its own lockfile)"
scripts/build-rust-sdk.sh debug >/dev/null

step "Benchmark harness smoke: every scenario, a few hundred events each; correctness and zero loss, not speed"
"$root/target/debug/bench" --smoke --latency-ms 0 --sizes 100 --json "$root/target/bench/smoke.json"

step "Chaos and soak, short: every fault scenario briefly and a 60 s soak (scripts/chaos.sh; root), two lanes side by side"
# First the suite's own facilities (delay, stall, resets, loss, blackhole, bandwidth) on an echo server, then
# the scenarios; each lane makes its own pair of network namespaces, and both must pass.
# CHAOS_PREBUILT: the binaries of the build above; building only these two bins would resolve other features
# and compile the gateway a second time.
export CHAOS_PREBUILT=1
scripts/chaos.sh selftest
chaos_status=0
lanes=()
mkdir -p "$root/target/chaos"
for lane in 1 2; do
    scripts/chaos.sh run --lane "$lane/2" --out "$root/target/chaos/lane-$lane" >"$root/target/chaos/lane-$lane.log" 2>&1 &
    lanes+=("$!")
done
for pid in "${lanes[@]}"; do wait "$pid" || chaos_status=1; done
cat "$root/target/chaos/lane-1.log" "$root/target/chaos/lane-2.log"
[ "$chaos_status" = 0 ] || { echo "the chaos suite failed (logs: target/chaos/lane-*/)" >&2; exit 1; }

step "Fuzz targets (fuzz/): built once, each run ${FUZZ_SECONDS:-15} s on its committed seeds; a crash fails"
scripts/fuzz.sh

step "Disk taken by the builds"
du -sh "$root/target" "$root/fuzz/target" 2>/dev/null || true
