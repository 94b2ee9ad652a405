#!/usr/bin/env bash
# The soak (tests/soak.rs), for as long as asked: the exporter and a JSON tracer under a
# steady mix of connects and a scrape a second, sampled each minute; it fails if memory,
# descriptors, BPF maps or programs, kprobe events or the pending table grow. CI runs 3
# minutes of it with the suite. Needs root.
#
#   ci/soak.sh 60        an hour; prints one line of samples a minute
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-60}
[[ $minutes =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "ci/soak.sh: give minutes, like 60" >&2; exit 2; }
./ci/deps.sh
TCPCONNLAT_SOAK_MINUTES=$minutes cargo test --release --locked --test soak -- \
    --include-ignored --nocapture
