#!/usr/bin/env bash
# Build the Debian and RPM packages into target/packages/: the static release binary, the
# systemd unit, the man page and shell completions (written by `tcpconnlat --generate`, so
# they follow the flags), the example web config and the Grafana dashboard. What goes
# where is in Cargo.toml ([package.metadata.deb], [package.metadata.generate-rpm]);
# tests/packaging.rs checks the result. Run by ci/test.sh before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
./ci/deps.sh lintian rpm

# The packagers, pinned so that a new release cannot change the packages under us, and
# kept with the matrix's kernels so that CI builds them once.
tools=${TCPCONNLAT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tcpconnlat-ci}/tools
export PATH="$tools/bin:$PATH"
install_tool() {
    local name=$1 version=$2
    if ! "$name" --version 2>/dev/null | grep -qF "$version"; then
        cargo install --locked --quiet --root "$tools" "$name" --version "$version"
    fi
}
install_tool cargo-deb 3.8.0
install_tool cargo-generate-rpm 0.21.1

target=x86_64-unknown-linux-gnu
cargo build --release --locked
bin="target/$target/release/tcpconnlat"

generated=target/packaging
mkdir -p "$generated"
# One stripped binary in both packages (the symbols are 1.4 MB of the 8).
strip -o "$generated/tcpconnlat" "$bin"
"$bin" --generate man | gzip -9n >"$generated/tcpconnlat.8.gz"
"$bin" --generate complete-bash >"$generated/tcpconnlat.bash"
"$bin" --generate complete-zsh >"$generated/_tcpconnlat"
"$bin" --generate complete-fish >"$generated/tcpconnlat.fish"

# Reproducible: file times and build dates are those of the last commit.
SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || echo 0)
export SOURCE_DATE_EPOCH
out=target/packages
rm -rf "$out"
mkdir -p "$out"
cargo deb --no-build --no-strip --target "$target" --output "$out/" >/dev/null
# gzip: the payload CentOS 7's rpm (4.11) reads, it knows no zstd. No automatic
# requirements: the binary is static.
cargo generate-rpm --target "$target" --output "$out/" --payload-compress gzip --auto-req disabled
ls -l "$out"
