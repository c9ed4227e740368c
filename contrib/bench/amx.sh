#!/bin/sh
# contrib/bench/amx.sh - the amx kernel table on a CPU with AMX, in one run: its tests, the
# golden fixtures under it, and prefill speed against avx512vnni (doc/measuring.md).
#
#   sh contrib/bench/amx.sh BUILD_DIR
#
# BUILD_DIR is a tree configured with --enable-amx (the amx table is experimental and off by
# default) and built (`make` and `make check` programs built: `make
# check TESTS=` builds them without running any); nothing is built here. Steps:
#   1. `kli --version` under KLI_SIMD=amx must name amx (else the CPU, the OS or the build
#      lacks it: the script says which it can tell and stops);
#   2. tests/test-amx (the emulated and the real tiles) and tests/test-simd's amx cases;
#   3. the golden fixtures under KLI_SIMD=amx, as tests/test-variants.sh runs them
#      (test-model, test-ktypes nano, test-cache twin logits);
#   4. `kli bench -p 512 -n 16 -r 1 --json --gpu off --type T` (T = bf16, q8_0) of the
#      shape-true synthetic model (`kli synth --type q8_0 --seed 7`, made once in AMX_DIR,
#      default ./amx-models, about 2.9 GB; bf16 by conversion at open) under avx512vnni and
#      amx, interleaved, AMX_ROUNDS rounds (3) at AMX_THREADS threads ("16"); a table of
#      the median prefill and decode tok/s (min-max) of each and their ratio. Decode (m = 1)
#      runs the same kernels under both tables.
# Every step runs; the status is non-zero when a test failed or a table did not run.
# For a dry run of the script on another CPU: AMX_SIMD and AMX_BASE name the two tables
# (amx, avx512vnni), AMX_SYNTH adds arguments to kli synth (e.g. "--layers 1 --experts 8").
set -eu

if [ $# -ne 1 ] || [ ! -x "$1/kli" ]; then
    echo "usage: $0 BUILD_DIR (a built tree with kli and the test programs)" >&2
    exit 2
fi
b=$(cd "$1" && pwd)
dir=${AMX_DIR:-./amx-models}
rounds=${AMX_ROUNDS:-3}
threads=${AMX_THREADS:-16}
simd=${AMX_SIMD:-amx}
base=${AMX_BASE:-avx512vnni}
synth=${AMX_SYNTH:-}
src=$(cd "$(dirname "$0")/../.." && pwd)
export KLI_TESTDATA="$src/tests/data"

fail=0
say() { echo "amx.sh: $*"; }
# tap NAME LOG CMD...: runs a TAP program, shows its lines other than "ok", counts a failure
tap() {
    name=$1 log=$2
    shift 2
    rc=0
    "$@" >"$log" 2>&1 || rc=$?
    grep -v '^ok' "$log" || true
    if [ "$rc" -ne 0 ] || grep -q '^not ok' "$log"; then
        say "$name: FAILED (status $rc)"
        fail=1
    else
        say "$name: passed, $(grep -c '^ok' "$log") ok"
    fi
}

v=$(KLI_SIMD=$simd "$b/kli" --version 2>&1 | tr '\n' ' ')
case $v in
*"kernels: $simd"*) say "kli --version under KLI_SIMD=$simd: $v" ;;
*)
    say "the $simd table is not in use: $v"
    grep -q 'amx_tile' /proc/cpuinfo 2>/dev/null || say "this CPU does not report amx_tile"
    grep -q 'KLI_BUILD_AMX 1' "$b/config.h" 2>/dev/null || say "the build has no amx table"
    exit 1 ;;
esac

say "step 2: tests/test-amx, tests/test-simd '$simd/*'"
tap test-amx "$b/amx-test-amx.log" "$b/tests/test-amx"
tap "test-simd $simd/*" "$b/amx-test-simd.log" "$b/tests/test-simd" "$simd/*"

say "step 3: the golden fixtures under KLI_SIMD=$simd"
export KLI_SIMD="$simd"
for t in "test-model" "test-ktypes nano" "test-cache twin logits"; do
    log="$b/amx-$(echo "$t" | tr ' ' '-').log"
    # shellcheck disable=SC2086
    tap "KLI_SIMD=$simd $t" "$log" "$b/tests/"$t
    used=$(sed -n 's/^# kernels: //p' "$log" | head -1)
    if [ "$used" != "$simd" ]; then
        say "$t ran with the kernels ${used:-(none named)}, not $simd"
        fail=1
    fi
done
unset KLI_SIMD

say "step 4: prefill, $base vs $simd, $rounds rounds at -t $threads"
mkdir -p "$dir"
if [ ! -f "$dir/q8_0/config.json" ]; then
    # shellcheck disable=SC2086
    "$b/kli" synth -o "$dir/q8_0.tmp" --type q8_0 --seed 7 --force $synth
    mv "$dir/q8_0.tmp" "$dir/q8_0"
fi
log=$dir/amx-$(date -u +%Y%m%d-%H%M%S).jsonl
r=1
while [ "$r" -le "$rounds" ]; do
    for t in $threads; do
        for w in bf16 q8_0; do
            order="$base $simd"
            [ $((r % 2)) -eq 0 ] && order="$simd $base"
            for s in $order; do
                line=$(KLI_SIMD=$s "$b/kli" bench -m "$dir/q8_0" --type "$w" -p 512 -n 16 \
                    -r 1 -t "$t" --gpu off --json 2>"$dir/bench.err" | grep '^{' || true)
                [ -n "$line" ] || { say "kli bench failed: $(tail -n 1 "$dir/bench.err")"; exit 1; }
                printf '{"simd": "%s", "t": %d, "type": "%s", "bench": %s}\n' "$s" "$t" "$w" \
                    "$line" >>"$log"
            done
        done
    done
    say "round $r of $rounds done"
    r=$((r + 1))
done
python3 - "$log" "$base" "$simd" <<'EOF'
import json, statistics, sys

runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
A, B = sys.argv[2], sys.argv[3]
print("%-3s %-5s %-8s %28s %28s %6s" % ("t", "type", "metric", A + " median (min-max)",
                                        B + " median (min-max)", "ratio"))
for t in sorted({r["t"] for r in runs}, reverse=True):
    for w in ("bf16", "q8_0"):
        for key in ("prefill_tok_s", "decode_tok_s"):
            v = {s: [r["bench"][key] for r in runs if r["t"] == t and r["type"] == w and
                     r["simd"] == s and r["bench"]["simd"] == s] for s in (A, B)}
            if not v[A] or not v[B]:
                print("%-3d %-5s %-8s: a table did not run (simd in the JSON)" % (t, w, key))
                continue
            m = {s: statistics.median(v[s]) for s in v}
            c = {s: "%.1f (%.1f-%.1f) n=%d" % (m[s], min(v[s]), max(v[s]), len(v[s])) for s in v}
            print("%-3d %-5s %-8s %28s %28s %6.2f" % (t, w, key.split("_")[0], c[A], c[B],
                                                     m[B] / m[A]))
EOF
say "log: $log"
[ "$fail" -eq 0 ] || say "FAILED: see the lines above"
exit "$fail"
