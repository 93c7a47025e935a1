#!/usr/bin/env bash
# Builds every fuzz target of fuzz/ once and runs each for a bounded time on a scratch copy of its committed
# seeds (fuzz/seeds/<target>/), failing on the first crash, panic, timeout or out-of-memory. The failing
# input is kept in fuzz/artifacts/<target>/ and printed (base64) by libFuzzer.
#
# Works on the stable toolchain: RUSTC_BOOTSTRAP=1 lets it take the -Z flags cargo-fuzz passes (coverage
# instrumentation). No sanitizer by default (FUZZ_SANITIZER=address to add ASan; its runtime ships with rustc).
#
#   scripts/fuzz.sh                       every target, FUZZ_SECONDS (15) each
#   FUZZ_SECONDS=600 scripts/fuzz.sh config trace_context
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
SECONDS_PER_TARGET=${FUZZ_SECONDS:-15}
SANITIZER=${FUZZ_SANITIZER:-none}
# Keep in step with the [[bin]] entries of fuzz/Cargo.toml.
ALL_TARGETS=(gateway_request emulator_transfer emulator_cbs sas_connection_string trace_context config jwt)
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    targets=("${ALL_TARGETS[@]}")
fi

if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
    cargo install --locked "cargo-fuzz@$CARGO_FUZZ_VERSION"
fi

export RUSTC_BOOTSTRAP=1
# Unoptimized (fuzz/Cargo.toml's dev profile): a build of a few minutes, overflow checks and debug assertions on.
flags=(--dev --sanitizer "$SANITIZER")
cd fuzz
# cargo-fuzz has no --locked: check the committed lockfile is complete before it builds.
cargo metadata --locked --format-version 1 >/dev/null
cargo fuzz build "${flags[@]}"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in "${targets[@]}"; do
    printf -- '--- fuzz target %s: %ss on %s seeds\n' "$target" "$SECONDS_PER_TARGET" \
        "$(find "seeds/$target" -type f | wc -l)"
    mkdir -p "$scratch/$target"
    cp "seeds/$target"/* "$scratch/$target/"
    # -timeout: one input taking 10 s is a hang; -rss_limit_mb: 2 GiB is an out-of-memory finding.
    # serde_amqp allocates any length a message declares (up to 4 GiB, zeroed, untouched) before reading it:
    # a known upstream finding (fuzz/README.md), so single allocations up to 4 GiB pass in the AMQP targets.
    malloc_limit=2048
    case "$target" in emulator_*) malloc_limit=4200 ;; esac
    status=0
    cargo fuzz run "${flags[@]}" "$target" "$scratch/$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -malloc_limit_mb="$malloc_limit" \
        -timeout=10 -print_final_stats=1 \
        >"$scratch/$target.log" 2>&1 || status=$?
    if [ "$status" -ne 0 ]; then
        tail -n 80 "$scratch/$target.log" >&2
        echo "fuzz target $target failed: the input is in fuzz/artifacts/$target/ (rerun: cd fuzz && cargo fuzz run $target <file>)" >&2
        exit 1
    fi
    grep -E '^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::peak_rss_mb)' "$scratch/$target.log" || true
done
