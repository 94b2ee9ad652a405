#!/usr/bin/env bash
# The whole test suite: style, lints, unit tests, the integration tests that load real
# BPF programs on this kernel (they need root: BPF, network namespaces, iptables), and the
# kernel matrix (ci/matrix.sh), which runs those same tests in VMs on other kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
./ci/deps.sh
if [ "$(id -u)" -ne 0 ]; then
    echo "ci/test.sh: the integration tests load BPF programs: run it as root (sudo -E $0)" >&2
    exit 1
fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The .deb and .rpm, which tests/packaging.rs installs and checks.
./ci/package.sh
# The matrix's kernels (fetched, or built where no registry has them) are got meanwhile,
# niced: the host's suite mostly waits on its sockets and timers, and keeps the CPU first.
matrix=${TCPCONNLAT_MATRIX:-1}
kernels_log=$(mktemp)
if [ "$matrix" != 0 ]; then
    nice -n 19 ./ci/matrix.sh --kernels-only >"$kernels_log" 2>&1 &
    kernels=$!
fi
# The suites that load BPF are marked #[ignore] with the reason, so that `cargo test` as a
# normal user runs everything else and lists them as skipped; here (root, as CI is) they
# all run, and a run that still skipped anything fails.
log=$(mktemp)
trap 'rm -f "$log" "$kernels_log"; [ -z "${kernels:-}" ] || kill "$kernels" 2>/dev/null || true' EXIT
cargo test --workspace --locked -- --include-ignored 2>&1 | tee "$log"
if grep -E '^test result:' "$log" | grep -vqE ' 0 ignored;'; then
    echo "ci/test.sh: some tests were skipped under root: every suite must run here" >&2
    exit 1
fi
# Then every mode on every kernel of the matrix (QEMU; set TCPCONNLAT_MATRIX=0 to skip
# it locally, CI never does).
if [ "$matrix" != 0 ]; then
    wait "$kernels" || { cat "$kernels_log" >&2; echo "ci/test.sh: getting the matrix's kernels failed" >&2; exit 1; }
    TCPCONNLAT_HOST_SUITE_RAN=1 ./ci/matrix.sh
fi
