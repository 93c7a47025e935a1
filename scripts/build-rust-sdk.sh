#!/usr/bin/env bash
# Builds the `rust-sdk` contender of the benchmark harness (crates/bench/contenders/rust-sdk: the official Rust SDK for Event Hubs,
# a crate of its own with its own Cargo.lock) and prints the path of its binary on stdout, alone on the last line.
#
#   scripts/build-rust-sdk.sh [debug|release]     (default debug)
#
# Its artifacts go to target/rust-sdk (CARGO_TARGET_DIR), apart from the gateway's. --locked: the lockfile
# pins every crate; Cargo's own output goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${1:-debug}
case "$profile" in
    debug) flags=() ;;
    release) flags=(--release) ;;
    *) echo "usage: $0 [debug|release]" >&2; exit 2 ;;
esac

export CARGO_TARGET_DIR="$PWD/target/rust-sdk"
cargo build --locked "${flags[@]}" --manifest-path crates/bench/contenders/rust-sdk/Cargo.toml >&2
echo "$CARGO_TARGET_DIR/$profile/rust-sdk-contender"
