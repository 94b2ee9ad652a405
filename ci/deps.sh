#!/usr/bin/env bash
# Install what building and testing tcpconnlat needs on Debian 12 (beyond the Rust
# toolchain). Idempotent; skips apt when everything is there already.
set -euo pipefail
packages=(
    clang            # compiles probes/ to BPF (build.rs, through libbpf-cargo)
    libelf-dev       # libbpf's ELF parsing, linked statically
    zlib1g-dev       # libbpf's BTF decompression, linked statically
    linux-libc-dev   # UAPI headers for the legacy probe (linux/bpf.h)
    pkg-config make
    iproute2         # tests: network namespaces and veth pairs
    iptables         # tests: dropping SYNs inside a test namespace (iptables-legacy)
    util-linux       # tests: setpriv, to run unprivileged
    xz-utils         # tests: the compressed BTF fixture
    prometheus       # tests: a real Prometheus server scrapes --serve, promtool checks it
    "$@"             # extra packages from the caller (the kernel matrix adds its own)
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
