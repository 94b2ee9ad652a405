#!/bin/sh
# Capture what tcpconnlat-compat reads from a kernel into a fixture tree, so that its
# detection and mode plan can be tested against real kernels without them.
# Usage: ci/capture-fixture.sh DEST    (POSIX sh: it also runs inside the test VMs' busybox)
# kallsyms is cut down to the functions we hook; the BTF blob is replaced by a marker,
# since only its presence is read.
set -eu
dest=$1
mkdir -p "$dest/proc/sys/kernel"
cat /proc/sys/kernel/osrelease > "$dest/proc/sys/kernel/osrelease"
grep -E ' (tcp_v4_connect|tcp_v6_connect|tcp_rcv_state_process|tcp_set_state|tcp_retransmit_skb|tcp_reset)([.][a-z0-9.]*)?( |	|$)' /proc/kallsyms \
    > "$dest/proc/kallsyms" || true
if [ -e /sys/kernel/btf/vmlinux ]; then
    mkdir -p "$dest/sys/kernel/btf"
    echo "marker: this kernel has /sys/kernel/btf/vmlinux" > "$dest/sys/kernel/btf/vmlinux"
fi
if [ -e /sys/bus/event_source/devices/kprobe/type ]; then
    mkdir -p "$dest/sys/bus/event_source/devices/kprobe"
    cat /sys/bus/event_source/devices/kprobe/type > "$dest/sys/bus/event_source/devices/kprobe/type"
fi
# The vDSO image: its ELF note carries the kernel's LINUX_VERSION_CODE (compat::kversion).
range=$(grep '\[vdso\]' /proc/$$/maps | cut -d' ' -f1)
if [ -n "$range" ]; then
    start=$((0x${range%-*})) end=$((0x${range#*-}))
    dd if=/proc/$$/mem of="$dest/vdso" bs=4096 skip=$((start / 4096)) count=$(((end - start) / 4096)) 2>/dev/null ||
        rm -f "$dest/vdso"
fi
for t in /sys/kernel/tracing /sys/kernel/debug/tracing; do
    if [ -d "$t/events" ]; then
        rel=${t#/}
        # A file of its own keeps events/ (which marks tracefs) in git where the kernel has
        # none of the tracepoints we read (4.14).
        mkdir -p "$dest/$rel/events" && : >"$dest/$rel/events/.tracefs"
        for tp in sock/inet_sock_set_state tcp/tcp_retransmit_skb tcp/tcp_receive_reset; do
            [ -d "$t/events/$tp" ] || continue
            mkdir -p "$dest/$rel/events/$tp"
            for f in format id; do
                cat "$t/events/$tp/$f" > "$dest/$rel/events/$tp/$f" 2>/dev/null || true
            done
        done
        if [ -e "$t/kprobe_events" ]; then : > "$dest/$rel/kprobe_events"; fi
        break
    fi
done
