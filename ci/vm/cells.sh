#!/bin/sh
# The matrix cells for one kernel, run inside a test VM (sourced by ci/vm/init) or on the
# host (by ci/matrix.sh). Needs: BIN, TRACE_TESTS (the kernel-facing test binaries, run
# once per mode), ONCE_TESTS (run once), MODES (modes, or variants such as legacy+btf and
# legacy+tracefs; a +btf cell runs BIN_NOHEADERS where given) and REFUSED
# (space-separated modes) and AUTO (the mode auto must pick). Prints @@CELL and @@FEATURES
# lines (see ci/vm/init).
t=$(mktemp -d)
cell() { echo "@@CELL $1 $2 $3"; }
[ -z "$MODES$REFUSED" ] || echo "@@FEATURES $("$BIN" --features --json 2>&1 | tr '\n' ' ')"

for cell in $MODES; do
    mode=${cell%%+*}
    bin=$BIN
    case $cell in
    # A BTF file, with a binary built without any kernel headers.
    *+btf) args="--btf /vmlinux.btf" bin=${BIN_NOHEADERS:-$BIN} ;;
    # Offsets found at start-up, by a binary with no other source.
    *+discover) args="--offsets discover" bin=${BIN_NOHEADERS:-$BIN} ;;
    *+tracefs) args="--kprobe-attach tracefs" ;;
    *) args= ;;
    esac
    result=pass
    : >"$t/results"
    for test in $TRACE_TESTS; do
        if ! TCPCONNLAT_TEST_BIN=$bin TCPCONNLAT_TEST_MODE=$mode TCPCONNLAT_TEST_ARGS=$args timeout 900 "$test" --test-threads=1 --include-ignored >"$t/out" 2>&1; then
            result=fail
            tail -60 "$t/out"
        fi
        echo "${test##*/}: $(grep 'test result' "$t/out" | cut -d. -f2)" >>"$t/results"
    done
    cell "$cell" $result "$(tr '\n' ';' <"$t/results")"
done

for mode in $REFUSED; do
    "$BIN" --mode "$mode" -d 1 >/dev/null 2>"$t/err"
    rc=$?
    if [ "$rc" = 1 ] && [ "$(wc -l <"$t/err")" = 1 ] && grep -q "cannot trace in $mode mode" "$t/err"; then
        cell "$mode" refused "$(cat "$t/err")"
    else
        cell "$mode" unrefused "exit $rc: $(cat "$t/err")"
    fi
done

# Errors, --features against the kernel's files, every forced mode as --features says,
# hardening (SYN flood, lost events, signals, capabilities) in the mode auto picks,
# and legacy mode's object, tracefs kprobe cleanup and agreement with fentry.
result=pass
: >"$t/results"
[ -n "$ONCE_TESTS" ] || result=
for test in $ONCE_TESTS; do
    if ! TCPCONNLAT_EXPECT_AUTO=$AUTO TCPCONNLAT_EXPECT_REFUSED=$(echo $REFUSED | tr ' ' ,) \
        timeout 900 "$test" --test-threads=1 --include-ignored --nocapture >"$t/out" 2>&1; then
        result=fail
        tail -60 "$t/out"
    fi
    # What the SYN floods saw, for the record (docs/testing.md).
    grep -E 'connects made in|found ended by the sweeper\), [0-9]+ missed' "$t/out" | sed 's/^/@@NOTE /' || true
    echo "${test##*/}: $(grep 'test result' "$t/out" | cut -d. -f2)" >>"$t/results"
done
[ -z "$result" ] || cell cli $result "$(tr '\n' ';' <"$t/results")"

rm -rf "$t"
