#!/usr/bin/env bash
# The whole test suite: style, lints, unit tests, and the integration tests that load real
# BPF programs on this kernel (they need root: BPF, network namespaces, iptables).
set -euo pipefail
cd "$(dirname "$0")/.."
./ci/deps.sh
if [ "$(id -u)" -ne 0 ]; then
    echo "ci/test.sh: the integration tests load BPF programs: run it as root (sudo -E $0)" >&2
    exit 1
fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
