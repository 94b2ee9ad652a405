#!/usr/bin/env bash
# The kernel matrix: proves every mode on real kernels. The host runs its own cells; the
# others boot in QEMU (TCG) with a busybox initramfs holding the release tcpconnlat, the
# integration test binaries and what they call (ip, iptables-legacy, bash, setpriv).
#
#   ci/matrix.sh                     every kernel
#   ci/matrix.sh deb61 nobtf         only these (ids: host deb61 deb612 nobtf noftrace
#                                    old414 old54 old49 old44 rhel7)
#   ci/matrix.sh --update-fixtures   also copy each kernel's captured compat fixture into
#                                    compat/tests/fixtures/<id>
#   ci/matrix.sh --kernels-only      no cells: fetch and build the kernels into the cache
#                                    (ci/test.sh runs it niced beside the host's suite)
#   ci/matrix.sh --bench deb61       no cells: the overhead benchmark's instruction-counted
#                                    profile in that VM (one vCPU, -icount; see ci/bench.sh)
#   ci/matrix.sh --run old49 'CMD'   no cells: boot that VM, run CMD (sh; the release binary
#                                    is tcpconnlat on PATH, the test binaries are in
#                                    $TRACE_TESTS and $ONCE_TESTS) and print what it prints
#                                    (for developing against a kernel; add --icount for the
#                                    instruction-counted clock)
#
# Kernel images are cached under ~/.cache/tcpconnlat-ci (TCPCONNLAT_CACHE), built ones keyed by the hash
# of their config, so a warm machine skips the builds. Kernels no registry has (3.10, 4.4, 4.9,
# 4.14, 5.4)
# come prebuilt from TCPCONNLAT_KERNELS_DIR (default ../shared/kernels/old): a folder per
# version with bzImage, headers.tar.xz and vmlinux.btf.xz. Prints a table (rows kernels,
# columns modes) and exits non-zero on any unexpected cell.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# Outside the work tree, so that CI's fresh clone on a warm machine finds it.
CACHE=${TCPCONNLAT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tcpconnlat-ci}
OUT=$ROOT/ci/out
# VMs run in this order, the longest first (two at a time).
ALL=(host deb61 deb612 old54 rhel7 nobtf noftrace old414 old49 old44)
KERNELS_DIR=${TCPCONNLAT_KERNELS_DIR:-$ROOT/../shared/kernels/old}
ALL_MODES=(fentry kprobe tracepoint legacy)
# Legacy mode proven further: offsets from a BTF file made with pahole instead of kernel
# headers, kprobes through tracefs kprobe_events instead of the PMU, and offsets found at
# start-up by a binary that has no other source (no headers built in, no --btf, and
# --offsets discover where the kernel has BTF).
VARIANTS=(legacy+btf legacy+tracefs legacy+discover)
VM_TIMEOUT=${TCPCONNLAT_VM_TIMEOUT:-1500}
# Set by ci/test.sh, which has just run every suite on the host in the mode auto picks.
HOST_SUITE_RAN=${TCPCONNLAT_HOST_SUITE_RAN:-0}

# What each kernel must do: modes whose whole trace suite must pass, modes that must be
# refused with a clear error, and what auto must pick.
# 4.9 and 4.14 have no kprobe PMU (4.17+): their plain legacy cells already go through
# tracefs; their legacy cells prove the three sources of offsets (headers built in, --btf,
# discovery).
declare -A MODES=([deb61]="fentry kprobe tracepoint legacy legacy+discover"
    [deb612]="fentry kprobe tracepoint legacy legacy+discover"
    [nobtf]="tracepoint legacy legacy+tracefs legacy+discover"
    [noftrace]="kprobe tracepoint legacy legacy+discover"
    [old414]="legacy legacy+btf legacy+discover"
    [old54]="tracepoint legacy legacy+btf legacy+tracefs legacy+discover"
    [old49]="legacy legacy+btf legacy+discover"
    [old44]="legacy legacy+btf legacy+discover"
    [rhel7]="legacy legacy+btf legacy+tracefs legacy+discover")
declare -A REFUSED=([deb61]="" [deb612]="" [nobtf]="fentry kprobe" [noftrace]="fentry"
    [old414]="fentry kprobe tracepoint" [old54]="fentry kprobe" [old49]="fentry kprobe tracepoint"
    [old44]="fentry kprobe tracepoint" [rhel7]="fentry kprobe tracepoint")
declare -A AUTO=([deb61]=fentry [deb612]=fentry [nobtf]=tracepoint [noftrace]=kprobe
    [old414]=legacy [old54]=tracepoint [old49]=legacy [old44]=legacy [rhel7]=legacy)
declare -A WHAT=([host]="running kernel" [deb61]="Debian 12 cloud 6.1" [deb612]="Debian 12 6.12"
    [nobtf]="6.1, no BTF" [noftrace]="6.1, BTF, no ftrace" [old414]="4.14.325, no BTF"
    [old54]="5.4.286, no BTF" [old49]="4.9.337, no BTF" [old44]="4.4.178, no BTF"
    [rhel7]="CentOS/RHEL 7.9 3.10")
# Kernel arguments a VM needs beyond the console: RHEL 7's 3.10 cannot exec with SMAP and
# SMEP on under QEMU's -cpu max.
declare -A APPEND=([rhel7]="nosmap nosmep")
# The package each distribution installs (ci/package.sh), whose binary must run there as
# shipped: the VM gets its payload and runs it (the package cell).
declare -A PACKAGE=([rhel7]=rpm)
# Modules the tests need where the kernel has them as modules (the built kernels have
# them built in).
DEB_MODULES="veth x_tables ip_tables iptable_filter xt_recent xt_tcpudp ipt_REJECT"

update_fixtures=0
kernels_only=0
bench_only=
run_only=
RUN_CMD=
icount=0
kernels=()
for arg in "$@"; do
    if [ "$run_only" = cmd ] && [ "${arg#--}" = "$arg" ]; then
        RUN_CMD=$arg run_only=${kernels[-1]}
        continue
    fi
    case $arg in
    --update-fixtures) update_fixtures=1 ;;
    --kernels-only) kernels_only=1 ;;
    --bench) bench_only=next icount=1 ;;
    --run) run_only=next ;;
    --icount) icount=1 ;;
    host | deb61 | deb612 | nobtf | noftrace | old414 | old54 | old49 | old44 | rhel7)
        kernels+=("$arg")
        [ "$bench_only" != next ] || bench_only=$arg
        [ "$run_only" != next ] || run_only=cmd ;;
    *) echo "ci/matrix.sh: unknown kernel or option '$arg' (kernels: ${ALL[*]})" >&2; exit 2 ;;
    esac
done
[ ${#kernels[@]} -gt 0 ] || kernels=("${ALL[@]}")
case $bench_only in
next | host) echo "ci/matrix.sh: --bench needs a VM kernel (not host)" >&2; exit 2 ;;
?*) kernels=("$bench_only") ;;
esac
case $run_only in
next | cmd | host) echo "ci/matrix.sh: --run needs a VM kernel (not host) and a command" >&2; exit 2 ;;
?*) kernels=("$run_only") ;;
esac
# One VM for something else than the cells: no test binaries, no table.
single=$bench_only$run_only

log() { echo "[matrix $(date +%H:%M:%S)] $*" >&2; }

./ci/deps.sh qemu-system-x86 busybox-static cpio kmod xz-utils linux-source-6.1 dwarves \
    flex bison bc libssl-dev libelf-dev gcc make patchelf rpm2cpio
# The benchmark's reference: bcc's libbpf-tools tcpconnlat, as Debian ships it.
REFERENCE=/usr/sbin/tcpconnlat
[ -z "$bench_only" ] || ./ci/deps.sh libbpf-tools

# --- kernels -----------------------------------------------------------------------------
# Each sets KIMAGE (bzImage), KVER (uname -r), KMODDIR (its modules, or empty), KHEADERS
# (a build tree for KERNEL_HEADERS, or empty) and KBTF (a BTF file made for it, or empty).

deb_kernel() { # id package
    local id=$1 pkg=$2 dir=$CACHE/kernels/$1
    if [ ! -f "$dir/$pkg.done" ]; then
        log "$id: fetching $pkg"
        rm -rf "$dir" && mkdir -p "$dir/tree"
        (cd "$dir" && apt-get download -q "$pkg" 2>/dev/null)
        dpkg-deb -x "$dir"/*.deb "$dir/tree"
        rm -f "$dir"/*.deb
        touch "$dir/$pkg.done"
    fi
    KIMAGE=$(ls "$dir"/tree/boot/vmlinuz-*)
    KVER=${KIMAGE##*/vmlinuz-}
    KMODDIR=$dir/tree/lib/modules/$KVER
    KHEADERS=
    KBTF=
}

newest() { # regex: the newest package name matching it
    apt-cache search --names-only "$1" | cut -d' ' -f1 | grep -E "$1" | sort -V | tail -1
}

built_kernel() { # id: built from linux-source-6.1 with ci/kernels/base.config + <id>.config
    local id=$1 src=$CACHE/src/linux-source-6.1
    local tarball=/usr/src/linux-source-6.1.tar.xz
    local hash
    hash=$(cat ci/kernels/base.config "ci/kernels/$id.config" <(dpkg-query -W -f='${Version}' linux-source-6.1) |
        sha256sum | cut -c1-16)
    local dir=$CACHE/kernels/$id-$hash
    if [ ! -f "$dir/bzImage" ]; then
        if [ ! -f "$src/.extracted" ]; then
            log "extracting $tarball"
            rm -rf "$src" && mkdir -p "$CACHE/src"
            tar -C "$CACHE/src" -xf "$tarball"
            touch "$src/.extracted"
        fi
        log "$id: building the kernel (a few minutes)"
        rm -rf "$dir.build" && mkdir -p "$dir.build"
        make -s -C "$src" O="$dir.build" tinyconfig >/dev/null
        "$src/scripts/kconfig/merge_config.sh" -m -O "$dir.build" "$dir.build/.config" \
            ci/kernels/base.config "ci/kernels/$id.config" >/dev/null
        make -s -C "$src" O="$dir.build" olddefconfig >/dev/null
        # Every option we asked for must have survived olddefconfig.
        local missing=0
        while read -r line; do
            case $line in CONFIG_*=y)
                grep -qx "$line" "$dir.build/.config" || { echo "  $id: $line did not stick" >&2; missing=1; } ;;
            esac
        done < <(cat ci/kernels/base.config "ci/kernels/$id.config")
        [ $missing = 0 ] || { echo "ci/matrix.sh: $id config is not what ci/kernels asks for" >&2; return 1; }
        make -s -C "$src" O="$dir.build" -j"$(nproc)" bzImage >"$dir.build/make.log" 2>&1 ||
            { tail -30 "$dir.build/make.log" >&2; return 1; }
        mkdir -p "$dir"
        cp "$dir.build/arch/x86/boot/bzImage" "$dir/bzImage"
        cp "$dir.build/.config" "$dir/config"
        make -s -C "$src" O="$dir.build" kernelrelease >"$dir/release"
        # What legacy mode's offsets come from: the generated headers (with a link to the
        # source tree) for KERNEL_HEADERS, and, where the kernel has DWARF but no BTF of
        # its own, a BTF file made from it for --btf (as BTFHub makes them).
        mkdir -p "$dir/headers/include" "$dir/headers/arch/x86/include"
        cp -r "$dir.build/include/generated" "$dir/headers/include/"
        cp -r "$dir.build/arch/x86/include/generated" "$dir/headers/arch/x86/include/"
        ln -s "$src" "$dir/headers/source"
        if ! grep -q '^CONFIG_DEBUG_INFO_BTF=y' "$dir/config" && grep -q '^CONFIG_DEBUG_INFO=y' "$dir/config"; then
            pahole --btf_encode_detached="$dir/vmlinux.btf" "$dir.build/vmlinux"
        fi
        rm -rf "$dir.build"
    fi
    KIMAGE=$dir/bzImage
    KVER=$(cat "$dir/release")
    KMODDIR=
    KHEADERS=$dir/headers
    KBTF=
    [ ! -f "$dir/vmlinux.btf" ] || KBTF=$dir/vmlinux.btf
}

prebuilt_kernel() { # id version: a kernel from KERNELS_DIR/<version>, unpacked into the cache
    local id=$1 from=$KERNELS_DIR/$2 dir=$CACHE/kernels/$1
    local f
    for f in bzImage headers.tar.xz vmlinux.btf.xz; do
        [ -f "$from/$f" ] || { echo "ci/matrix.sh: $id needs $from/$f (set TCPCONNLAT_KERNELS_DIR)" >&2; return 1; }
    done
    local stamp
    stamp=$(cat "$from/headers.tar.xz" "$from/vmlinux.btf.xz" | sha256sum | cut -c1-16)
    if [ ! -f "$dir/$stamp.done" ]; then
        log "$id: unpacking its headers and BTF from $from"
        rm -rf "$dir" && mkdir -p "$dir/headers"
        tar -C "$dir/headers" -xJf "$from/headers.tar.xz"
        xz -dc "$from/vmlinux.btf.xz" >"$dir/vmlinux.btf"
        touch "$dir/$stamp.done"
    fi
    KIMAGE=$from/bzImage
    KVER=$(cut -d'"' -f2 "$dir/headers/include/generated/utsrelease.h")
    KMODDIR=
    KHEADERS=$dir/headers
    KBTF=$dir/vmlinux.btf
}

kernel() { # id
    case $1 in
    old49) prebuilt_kernel old49 4.9 ;;
    old44) prebuilt_kernel old44 4.4 ;;
    rhel7) prebuilt_kernel rhel7 3.10 ;;
    old414) prebuilt_kernel old414 4.14 ;;
    old54) prebuilt_kernel old54 5.4 ;;
    deb61) deb_kernel deb61 "$(apt-cache depends linux-image-cloud-amd64 | grep -oE 'linux-image-6[^ ]*' | head -1)-unsigned" ;;
    deb612) deb_kernel deb612 "$(newest '^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$')" ;;
    nobtf | noftrace) built_kernel "$1" ;;
    esac
}

# Get every kernel first: the binaries embed the built kernels' header offsets.
declare -A KIMAGES KVERS KMODDIRS KBTFS
headers=()
got_all=0
for id in "${kernels[@]}"; do
    [ "$id" != host ] || continue
    if kernel "$id"; then
        KIMAGES[$id]=$KIMAGE KVERS[$id]=$KVER KMODDIRS[$id]=$KMODDIR KBTFS[$id]=$KBTF
        [ -z "$KHEADERS" ] || headers+=("$KHEADERS")
    else
        log "$id: could not get the kernel"
        got_all=1
    fi
done
[ $kernels_only = 0 ] || exit $got_all

# --- the binaries under test -------------------------------------------------------------
log "building the release binaries and test binaries"
# First without any kernel headers: legacy's --btf cells prove that binary, as a user
# who has only a BTF file for their kernel would run it. Then the one under test
# everywhere else, with the header offsets of every kernel that has headers.
mkdir -p "$OUT"
BIN=$ROOT/target/x86_64-unknown-linux-gnu/release/tcpconnlat
BIN_NOHEADERS=$OUT/tcpconnlat-noheaders
if [ -z "$single" ]; then
    for id in "${kernels[@]}"; do
        # The packages hold the binary built without headers, as released.
        if [ -n "${PACKAGE[$id]:-}" ]; then KERNEL_HEADERS= ./ci/package.sh >/dev/null; break; fi
    done
    KERNEL_HEADERS= cargo build --release --locked
    cp "$BIN" "$BIN_NOHEADERS"
fi
export KERNEL_HEADERS
KERNEL_HEADERS=$(IFS=:; echo "${headers[*]}")
cargo build --release --locked
test_bin() { # name: the release integration test executable for tests/<name>.rs
    cargo test --release --locked --no-run --message-format=json 2>/dev/null |
        grep '"kind":\["test"\]' | grep "\"name\":\"$1\"" |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1
}
# The kernel-facing suites, run once per mode; and the suites run once per kernel.
TRACE_TESTS= ONCE_TESTS=
if [ -z "$bench_only" ]; then
    TRACE_TESTS="$(test_bin trace) $(test_bin outcomes) $(test_bin serve)"
    ONCE_TESTS="$(test_bin cli) $(test_bin legacy) $(test_bin hardening) $(test_bin faults)"
fi
# The overhead benchmark: small, next to the cells, in the VM TCPCONNLAT_MATRIX_BENCH names
# (off in CI; under TCG only ratios within one run mean anything); or alone and
# instruction-counted with --bench. It judges nothing.
BENCH_IN=${bench_only:-${TCPCONNLAT_MATRIX_BENCH:-}}
BENCH=
if [ -n "$BENCH_IN" ]; then
    BENCH=$(cargo bench --locked --no-run --bench overhead --message-format=json 2>/dev/null |
        grep '"kind":\["bench"\]' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
fi
for t in $TRACE_TESTS $ONCE_TESTS $BENCH; do
    [ -x "$t" ] || { echo "ci/matrix.sh: test binaries not found" >&2; exit 1; }
done

# The host row: what CI knows of its kernel (TCPCONNLAT_EXPECT_AUTO and _REFUSED, set by
# .ci/run), or elsewhere what --features says this kernel can do (every usable mode then
# runs the whole suite, every other one must be refused clearly).
if [ -n "${TCPCONNLAT_EXPECT_AUTO:-}" ]; then
    AUTO[host]=$TCPCONNLAT_EXPECT_AUTO
    REFUSED[host]=${TCPCONNLAT_EXPECT_REFUSED//,/ }
else
    plan=$("$BIN" --features --json | grep -oE '"mode":"[a-z]+"[^}]*"usable":(true|false)')
    AUTO[host]=$("$BIN" --features --json | grep -o '"auto":"[a-z]*"' | cut -d'"' -f4)
    REFUSED[host]=$(echo "$plan" | grep '"usable":false' | cut -d'"' -f4 | xargs)
fi
MODES[host]=
for m in "${ALL_MODES[@]}"; do
    case " ${REFUSED[host]} " in *" $m "*) ;; *) MODES[host]="${MODES[host]} $m" ;; esac
done

# --- initramfs ---------------------------------------------------------------------------

# The VMs hold no shared library where a program could find one: the tracer and the test
# binaries are static (a dynamic one could not even start: there is no ELF interpreter at
# its usual path). The tests' helper tools from Debian (iproute2, iptables, bash, setpriv)
# are dynamic: they live in /toolbox with their libraries, their interpreter and library
# path rewritten to point there, and are linked from their usual paths.
TOOLBOX=/toolbox

add_static() { # root path: a static executable, at the same path
    local root=$1 path=$2
    if readelf -l "$path" | grep -q 'program interpreter' || readelf -d "$path" | grep -q '(NEEDED)'; then
        echo "ci/matrix.sh: $path is not static" >&2
        return 1
    fi
    mkdir -p "$root$(dirname "$path")"
    cp -L "$path" "$root$path"
}

add_tool() { # root path: a dynamic helper tool into the toolbox
    local root=$1 path=$2 lib
    local name=${path##*/}
    mkdir -p "$root$TOOLBOX/bin" "$root$TOOLBOX/lib" "$root$(dirname "$path")"
    cp -L "$path" "$root$TOOLBOX/bin/$name"
    ldd "$path" | grep -oE '/[^ ]+' | while read -r lib; do
        cp -Ln "$lib" "$root$TOOLBOX/lib/" 2>/dev/null || true
    done
    patchelf --set-interpreter "$TOOLBOX/lib/ld-linux-x86-64.so.2" --force-rpath \
        --set-rpath "$TOOLBOX/lib" "$root$TOOLBOX/bin/$name"
    ln -sf "$TOOLBOX/bin/$name" "$root$path"
}

module_closure() { # moddir module...: the module files needed, dependencies first
    local moddir=$1; shift
    local m file deps
    for m in "$@"; do
        file=$(find "$moddir/kernel" -name "$m.ko" -o -name "$m.ko.xz" | head -1)
        [ -n "$file" ] || { echo "ci/matrix.sh: no module $m in $moddir" >&2; return 1; }
        deps=$(modinfo -F depends "$file" | tr ',' ' ')
        [ -z "$deps" ] || module_closure "$moddir" $deps
        echo "$file"
    done
}

make_initramfs() { # id out
    local id=$1 out=$2
    local root
    root=$(mktemp -d)
    chmod 755 "$root"   # it becomes /: the unprivileged test must be able to enter it
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,root,etc,ci/vm}
    cp /bin/busybox "$root/bin/busybox"
    for applet in $(/bin/busybox --list); do
        [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
    done
    local bins=("$BIN" $TRACE_TESTS $ONCE_TESTS)
    [ -n "$single" ] || bins+=("$BIN_NOHEADERS")
    for f in "${bins[@]}"; do
        add_static "$root" "$f"
    done
    rm -f "$root/bin/ip" "$root/bin/setpriv" "$root/bin/bash"   # the real ones, not busybox's
    for f in /usr/bin/ip /usr/sbin/xtables-legacy-multi /usr/bin/bash /usr/bin/setpriv; do
        add_tool "$root" "$f"
    done
    ln -sf xtables-legacy-multi "$root$TOOLBOX/bin/iptables-legacy"
    ln -sf "$TOOLBOX/bin/iptables-legacy" "$root/usr/sbin/iptables-legacy"
    # iptables finds its extensions through XTABLES_LIBDIR (ci/vm/init sets it).
    local xt=/usr/lib/x86_64-linux-gnu/xtables
    mkdir -p "$root$TOOLBOX/xtables" && cp "$xt"/libxt_*.so "$xt"/libipt_*.so "$root$TOOLBOX/xtables/"
    echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
    echo "nobody:x:65534:65534:nobody:/:/bin/false" >>"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
    [ -z "${KBTFS[$id]}" ] || cp "${KBTFS[$id]}" "$root/vmlinux.btf"
    local package=${PACKAGE[$id]:-}
    if [ -n "$package" ] && [ -z "$single" ]; then
        mkdir -p "$root/package"
        case $package in
        # rpm2cpio checks the payload's length against a size tag cargo-generate-rpm does
        # not write, and exits 1 having written it all: rpm -K checks its digest instead.
        rpm) rpm -K --quiet target/packages/*.rpm
            { rpm2cpio target/packages/*.rpm || true; } | (cd "$root/package" && cpio -idm --quiet) ;;
        esac
    fi
    local bench=""
    if [ "$id" = "$BENCH_IN" ]; then bench=$BENCH && add_static "$root" "$BENCH"; fi
    [ -z "$bench_only" ] || add_tool "$root" "$REFERENCE"
    # A build of an earlier commit, measured beside this one (TCPCONNLAT_BENCH_BEFORE).
    [ -z "$bench_only" ] || [ -z "${TCPCONNLAT_BENCH_BEFORE:-}" ] || add_static "$root" "$TCPCONNLAT_BENCH_BEFORE"
    local modules="" KMODDIR=${KMODDIRS[$id]} KVER=${KVERS[$id]}
    if [ -n "$KMODDIR" ]; then
        local dest=$root/lib/modules/$KVER f rel
        for f in $(module_closure "$KMODDIR" $DEB_MODULES | awk '!seen[$0]++'); do
            rel=${f#"$KMODDIR"/}
            mkdir -p "$dest/$(dirname "$rel")"
            case $f in
            *.xz) xz -dc "$f" >"$dest/${rel%.xz}" ;;
            *) cp "$f" "$dest/$rel" ;;
            esac
        done
        depmod -b "$root" "$KVER" 2>/dev/null
        modules=$DEB_MODULES
    fi
    [ -z "$RUN_CMD" ] || printf '%s\n' "$RUN_CMD" >"$root/run.sh"
    cp ci/vm/init "$root/init"
    cp ci/vm/cells.sh "$root/ci/vm/cells.sh"
    cp ci/capture-fixture.sh "$root/ci/capture-fixture.sh"
    cat >"$root/matrix.conf" <<EOF
KERNEL_ID='$id'
BIN='$BIN'
BIN_NOHEADERS='$BIN_NOHEADERS'
TRACE_TESTS='$TRACE_TESTS'
ONCE_TESTS='$ONCE_TESTS'
MODES='${MODES[$id]}'
REFUSED='${REFUSED[$id]}'
AUTO='${AUTO[$id]}'
MODULES='$modules'
PACKAGE='$package'
BENCH='$bench'
BENCH_ONLY='$bench_only'
BENCH_CONNECTS='${TCPCONNLAT_BENCH_CONNECTS:-}'
BENCH_ROUNDS='${TCPCONNLAT_BENCH_ROUNDS:-}'
BENCH_STARTUP_ONLY='${TCPCONNLAT_BENCH_STARTUP_ONLY:-}'
REFERENCE='$REFERENCE'
BENCH_BEFORE='${TCPCONNLAT_BENCH_BEFORE:-}'
EOF
    (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$out"
    rm -rf "$root"
}

# --- running -----------------------------------------------------------------------------

run_kernel() { # id: leaves the console log in $OUT/<id>/console.log
    local id=$1 dir=$OUT/$1
    rm -rf "$dir" && mkdir -p "$dir"
    if [ "$id" = host ]; then
        log "host: running the cells on $(uname -r)"
        local modes=${MODES[host]} once=$ONCE_TESTS
        if [ "$HOST_SUITE_RAN" = 1 ]; then
            # ci/test.sh has just run every suite here, in the mode auto picks: not again.
            modes=$(echo " $modes " | sed "s/ ${AUTO[host]} / /")
            once=
            printf '@@CELL %s suite\n' "${AUTO[host]}" cli >"$dir/console.log"
        fi
        BIN=$BIN TRACE_TESTS=$TRACE_TESTS ONCE_TESTS=$once MODES=$modes \
            REFUSED=${REFUSED[host]} AUTO=${AUTO[host]} sh ci/vm/cells.sh >>"$dir/console.log" 2>&1 || true
        echo "@@END" >>"$dir/console.log"
        return
    fi
    [ -n "${KIMAGES[$id]:-}" ] || { echo "@@CELL kernel fail could not get the kernel" >"$dir/console.log"; return; }
    log "$id: kernel ${KVERS[$id]}; building the initramfs"
    make_initramfs "$id" "$dir/initramfs.gz"
    if [ -n "$single" ]; then
        boot "$id" "$([ "$icount" = 1 ] && echo counted || echo cpus)" >"$dir/console.log"
    else
        # The console log holds both boots, each ending with @@END (see VM_BOOTS).
        { boot "$id" counted; boot "$id" cpus; } >"$dir/console.log"
    fi
    rm -f "$dir/initramfs.gz"
}

# How many boots a VM's cells take: the suites run in every mode compare the tracer's
# latencies with the time the application itself saw, so they run where the guest's clock
# counts its instructions (`counted`): on the host's clock the emulator's stalls (host
# load, translating code the guest runs for the first time) land inside the
# application's time and outside the connect's (83 ms of a dropped SYN's 1,096 in a CI
# run). That needs one vCPU (QEMU 7.2 hangs bringing up a second one under -icount). The
# suites run once per kernel (floods across CPUs, a CPU going offline under the perf
# buffer) boot again with two vCPUs on the host's clock (`cpus`).
VM_BOOTS=2

boot() { # id kind: boot the VM once, its console on stdout. kind: counted | cpus
    local id=$1 kind=$2 start=$SECONDS cpus
    log "$id: booting, $kind (timeout ${VM_TIMEOUT}s)"
    # thread=single: both vCPUs on one host thread. With one thread per vCPU a guest once
    # died executing the int3 the kernel plants while it patches a static key (a BPF
    # program attaching to inet_sock_set_state while the other vCPU ran through it):
    # cross-vCPU code patching under multi-threaded TCG is not something to test through.
    case $kind in
    counted) cpus=(-smp 1 -icount shift=0,sleep=off) ;;
    cpus) cpus=(-smp 2) ;;
    esac
    # ci/vm/init reads tcpconnlat_boot from its environment (the kernel passes it the
    # arguments it does not know).
    timeout "$VM_TIMEOUT" qemu-system-x86_64 -accel tcg,thread=single -cpu max "${cpus[@]}" -m 2048 -nographic -no-reboot \
        -kernel "${KIMAGES[$id]}" -initrd "$OUT/$id/initramfs.gz" \
        -append "console=ttyS0 quiet panic=-1 ${APPEND[$id]:-} tcpconnlat_boot=$kind" </dev/null 2>&1 || true
    log "$id: $kind boot done in $((SECONDS - start))s"
}

markers() { # id prefix: the console lines with that marker, from the marker on (the
    # console may put escape codes before it)
    grep -a "$2" "$OUT/$1/console.log" | sed "s/.*$2/$2/" | tr -d '\r'
}

cell_of() { # id column: the result word for that cell, or "missing"
    local line
    line=$(markers "$1" "@@CELL $2 " | tail -1)
    [ -n "$line" ] && echo "$line" | cut -d' ' -f3 || echo missing
}

# The host row first, alone: its tests time real hardware. Then the VMs, two at a time
# (TCPCONNLAT_MATRIX_JOBS), one emulator thread each (thread=single). A counted boot keeps
# its thread busy (its guest's waits take no time), so a third VM would starve the others:
# a two-vCPU boot's guest keeps the host's time, and starved, it meets its timers late and
# in bigger batches (a SYN flood's ends, on 3.10, outran its perf buffer).
JOBS=${TCPCONNLAT_MATRIX_JOBS:-2}
for id in "${kernels[@]}"; do
    [ "$id" != host ] || run_kernel host
done
for id in "${kernels[@]}"; do
    [ "$id" != host ] || continue
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    run_kernel "$id" &
done
wait

if [ -n "$run_only" ]; then
    markers "$run_only" '@@RUN ' | sed 's/^@@RUN //'
    grep -qa '@@END' "$OUT/$run_only/console.log" || { tail -40 "$OUT/$run_only/console.log" >&2; exit 1; }
    exit 0
fi
if [ -n "$bench_only" ]; then
    markers "$bench_only" '@@BENCH ' | sed 's/^@@BENCH //'
    grep -qa '@@END' "$OUT/$bench_only/console.log" || { tail -40 "$OUT/$bench_only/console.log" >&2; exit 1; }
    exit 0
fi

# --- the table ---------------------------------------------------------------------------
bad=0
printf '\n%-10s %-22s' kernel "" >&2
printf '%-16s' "${ALL_MODES[@]}" "${VARIANTS[@]}" cli static package >&2
printf '%s\n' "auto picks" >&2
for id in "${kernels[@]}"; do
    log=$OUT/$id/console.log
    printf '%-10s %-22s' "$id" "${WHAT[$id]}" >&2
    for col in "${ALL_MODES[@]}" "${VARIANTS[@]}" cli static package; do
        got=$(cell_of "$id" "$col")
        want=missing
        case " ${MODES[$id]} cli " in *" $col "*) want=pass ;; esac
        # Every VM proves the binaries run with no shared library (ci/vm/init).
        if [ "$col" = static ] && [ "$id" != host ]; then want=pass; fi
        if [ "$col" = package ] && [ -n "${PACKAGE[$id]:-}" ]; then want=pass; fi
        case " ${REFUSED[$id]} " in *" $col "*) want=refused ;; esac
        # The suite ci/test.sh ran on the host stands for its auto mode's cells.
        if [ "$id" = host ] && [ "$HOST_SUITE_RAN" = 1 ] && [ "$want" = pass ] &&
            { [ "$col" = "${AUTO[host]}" ] || [ "$col" = cli ]; }; then want=suite; fi
        if [ "$got" = "$want" ]; then shown=$got; else shown="$got!"; bad=1; fi
        [ "$shown" != missing ] || shown=-
        printf '%-16s' "$shown" >&2
    done
    markers "$id" '@@FEATURES ' | sed 's/^@@FEATURES //' >"$OUT/$id/features.json" || true
    auto=$(grep -o '"auto":"[a-z]*"' "$OUT/$id/features.json" | cut -d'"' -f4 || true)
    if [ "$auto" = "${AUTO[$id]}" ]; then echo "${auto}" >&2; else echo "${auto:-none}! (want ${AUTO[$id]})" >&2; bad=1; fi
    boots=$VM_BOOTS
    [ "$id" != host ] || boots=1
    if [ "$(grep -ac '@@END' "$log")" -lt "$boots" ]; then
        echo "  $id: the run did not finish; console tail:" >&2
        tail -40 "$log" | sed 's/^/    /' >&2
        bad=1
    fi
    if [ $update_fixtures = 1 ] && [ "$id" != host ]; then
        fx=compat/tests/fixtures/$id
        rm -rf "$fx" && mkdir -p "$fx"
        markers "$id" '@@FIXTURE ' | tail -1 | cut -d' ' -f2 | base64 -d | tar -C "$fx" -xzf -
        log "$id: fixture saved in $fx"
    fi
done
for id in "${kernels[@]}"; do
    # A cell's name is whatever comes before its result word (legacy+discover too).
    failing=$(markers "$id" '@@CELL ' | grep -E '^@@CELL [^ ]+ (fail|unrefused) ' || true)
    if [ -n "$failing" ]; then
        echo "  $id: failing cells (full console in ci/out/$id/console.log):" >&2
        echo "$failing" | sed 's/^/    /' >&2
        # Which tests, and what they said: the console itself is not kept by CI.
        tr -d '\r' <"$OUT/$id/console.log" | grep -aE -A2 ' \.\.\. FAILED$|panicked at' |
            grep -av '^note: ' | head -40 | sed 's/^/      /' >&2
    fi
done
for id in "${kernels[@]}"; do
    if grep -qa '@@BENCH ' "$OUT/$id/console.log"; then
        echo "  $id: overhead benchmark (emulated: compare ratios only)" >&2
        markers "$id" '@@BENCH ' | sed 's/^@@BENCH /    /' >&2
    fi
done
echo "(cells: pass = the whole trace suite passed in that mode; suite = passed in ci/test.sh's run on this host, in the mode auto picks; refused = one clear error, as expected; - = not run there; ! = not what this kernel should do)" >&2
if [ $bad = 0 ]; then echo "matrix: ${#kernels[@]} passed, 0 failed"; else echo "matrix: unexpected cells" >&2; fi
exit $bad
