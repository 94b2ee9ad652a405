#!/usr/bin/env bash
# The long fuzzing run (CI runs the short one with the tests): every parser of outside
# input (BTF, tracefs format files, kallsyms, the vDSO note, discovery's snapshots,
# /etc/passwd, the mount table, every CLI value) against N times the cases the suite
# runs. Prints how many cases each property ran; a failure prints the smallest input.
#
#   ci/fuzz.sh 100        100 times the suite's cases
set -euo pipefail
cd "$(dirname "$0")/.."
scale=${1:-100}
[[ $scale =~ ^[1-9][0-9]*$ ]] || { echo "ci/fuzz.sh: give a whole number of times, like 100" >&2; exit 2; }
./ci/deps.sh
start=$SECONDS
# compat's properties scale their own case counts; the binary's take proptest's default
# (256) times the same factor.
TCPCONNLAT_FUZZ_SCALE=$scale cargo test --release --locked -p tcpconnlat-compat --test fuzz
PROPTEST_CASES=$((256 * scale)) cargo test --release --locked --bin tcpconnlat -- \
    never_panics any_value_of_any_flag passwd_text cgroup2_mount_points
echo "ci/fuzz.sh: every property ran ${scale}x the suite's cases in $((SECONDS - start)) s"
