#!/bin/sh
# .devab-cuda/run.sh - the K types on the GPU server (issue #17), from the repository root:
#
#   sh .devab-cuda/run.sh [test|bench|all] [rounds]      (default: all 3)
#
#   test   builds kli and tests/test-cuda with CUDA (-O2, in build-devab/) and runs
#          test-cuda: every CUDA block against its CPU twin, the K types included
#   bench  runs `test-cuda --bench-mm` (one decode product per block type at the released
#          lm_head's shape: the kernels' GB/s), then times `kli bench --gpu on` (prefill
#          512, decode 64, 3 reps each) on a synthetic model of the released shapes (kli
#          synth: 4 layers, 64 experts, seed 7, q8_0) quantized to q4 and to q4_k (4.5 bits
#          per weight both), the two alternating for `rounds` rounds, and prints the
#          medians over the rounds
#
# Scratch (models, logs) in $KLI_DEVAB_DIR, default /tmp/kli-devab-cuda; the models are
# kept between runs. Needs nvcc, and python3 for the medians.
set -eu

what=${1:-all}
rounds=${2:-3}
scratch=${KLI_DEVAB_DIR:-/tmp/kli-devab-cuda}
top=$(pwd)
build=$top/build-devab
mkdir -p "$scratch"

if [ ! -x "$build/kli" ] || [ ! -x "$build/tests/test-cuda" ] || [ "$what" != bench ]; then
    ./autogen.sh >/dev/null 2>&1
    mkdir -p "$build"
    (cd "$build" && ../configure -q --with-cuda >"$scratch/configure.log" 2>&1 &&
        make -j16 kli tests/test-cuda >"$scratch/make.log" 2>&1) || {
        echo "build failed: see $scratch/configure.log and $scratch/make.log"
        tail -40 "$scratch/make.log" 2>/dev/null || tail -40 "$scratch/configure.log"
        exit 1
    }
fi
kli=$build/kli

if [ "$what" = test ] || [ "$what" = all ]; then
    echo "== test-cuda"
    rc=0
    "$build/tests/test-cuda" || rc=$?
    echo "test-cuda: exit $rc"
    [ "$what" = test ] && exit $rc
fi

echo "== test-cuda --bench-mm"
"$build/tests/test-cuda" --bench-mm || true
echo "== bench: kli bench --gpu on -p 512 -n 64 -r 3, q4 against q4_k, $rounds rounds"
base=$scratch/synth-q8_0
[ -f "$base/model.safetensors" ] ||
    "$kli" synth -o "$base" --type q8_0 --seed 7 --force >"$scratch/synth.log" 2>&1
for t in q4 q4_k; do
    [ -f "$scratch/m-$t/model.safetensors" ] ||
        "$kli" quantize -m "$base" -o "$scratch/m-$t" --type $t --force \
            >"$scratch/quantize-$t.log" 2>&1
done
: >"$scratch/bench.jsonl"
r=1
while [ $r -le "$rounds" ]; do
    for t in q4 q4_k; do
        printf '%s ' "$t" >>"$scratch/bench.jsonl"
        "$kli" bench -m "$scratch/m-$t" --gpu on -p 512 -n 64 -r 3 --json \
            2>>"$scratch/bench.err" | tail -1 >>"$scratch/bench.jsonl"
    done
    r=$((r + 1))
done
grep -m 2 GPU "$scratch/bench.err" || true
python3 - "$scratch/bench.jsonl" <<'EOF'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    t, js = line.split(' ', 1)
    rows.setdefault(t, []).append(json.loads(js))
print('%-6s %6s %14s %14s %10s %s' % ('type', 'rounds', 'prefill tok/s', 'decode tok/s',
                                      'GPU MiB', 'whole model'))
med = {}
for t, rs in rows.items():
    p = statistics.median(r['prefill_tok_s'] for r in rs)
    d = statistics.median(r['decode_tok_s'] for r in rs)
    med[t] = (p, d)
    print('%-6s %6d %14.1f %14.1f %10.0f %s' % (t, len(rs), p, d,
          rs[0].get('gpu_bytes_used', 0) / 1048576.0, rs[0].get('gpu_whole_model')))
    print('       prefill runs %s, decode runs %s' % (
        ' '.join('%.1f' % r['prefill_tok_s'] for r in rs),
        ' '.join('%.1f' % r['decode_tok_s'] for r in rs)))
if 'q4' in med and 'q4_k' in med:
    print('q4_k / q4: prefill %.3f, decode %.3f' % (med['q4_k'][0] / med['q4'][0],
                                                   med['q4_k'][1] / med['q4'][1]))
EOF
