#!/usr/bin/env bash
# The benchmarks (need root; print figures, assert nothing; docs/benchmarks.md keeps the
# last ones).
#
#   ci/bench.sh            on this machine (real hardware): loopback connect storms with no
#                          tracer, with empty programs on the same hooks (the floor) and with
#                          tcpconnlat in every mode this kernel allows, side by side; events
#                          against connects, tracer CPU, start-up, peak RSS (benches/overhead.rs);
#                          then fleet mode's memory against many destinations
#                          (benches/cardinality.rs).
#   ci/bench.sh --vm ID    instruction-counted, in a matrix VM (e.g. deb61): QEMU with one
#                          vCPU and -icount, so the figures are guest instructions that host
#                          load cannot change; against the reference tool, bcc's
#                          libbpf-tools tcpconnlat (benches/overhead/vm.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
case ${1:-} in
--vm)
    [ -n "${2:-}" ] || { echo "ci/bench.sh: --vm needs a matrix kernel id, e.g. deb61" >&2; exit 2; }
    exec ./ci/matrix.sh --bench "$2"
    ;;
"") ;;
*) echo "ci/bench.sh: unknown option '$1' (use --vm ID, or nothing)" >&2; exit 2 ;;
esac
./ci/deps.sh
cargo bench --locked --bench overhead
cargo bench --locked --bench cardinality
