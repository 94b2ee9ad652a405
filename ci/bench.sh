#!/usr/bin/env bash
# The overhead benchmark: loopback connect storms with no tracer, with empty programs on
# the same hooks (the floor) and with tcpconnlat in every mode this kernel allows, side by
# side in one run; then events against connects, tracer CPU, start-up time and peak RSS.
# Then fleet mode's memory against many destinations (ci/cardinality.rs).
# Needs root. Prints figures (docs/benchmarks.md keeps the last ones); asserts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
./ci/deps.sh
cargo bench --locked --bench overhead
cargo bench --locked --bench cardinality
