#!/bin/sh
# contrib/bench/gpu-prefill.sh - the tensor-core prefill products (cuda/gemm.cu, issue #22) on
# a GPU machine: test-cuda, then prefill speed with and without them. Builds nothing.
#
#   sh contrib/bench/gpu-prefill.sh [BUILD_DIR]      (default ./build)
#
# BUILD_DIR holds kli and tests/test-cuda of a CUDA build with cuBLAS, e.g.
#   ./autogen.sh && mkdir -p build && cd build && ../configure -q --with-cuda --with-cublas &&
#   make -j16 kli tests/test-cuda
#
# 1. test-cuda: every CUDA block against its CPU twin; the gemm* cases force the cuBLAS path
#    at any row count (KLI_CUDA_GEMM_MIN=1); the log goes to GP_DIR/test-cuda.log.
# 2. The shape-true synthetic model (kli synth: the released widths, GP_LAYERS layers, 3 KDA
#    to 1 MLA, GP_EXPERTS routed experts, top 8, seed 7) at bf16, q8_0 and q4_k (kli quantize
#    of the bf16 one), made once in GP_DIR, whole on the GPU (--gpu on). For each type,
#    `kli bench -p 512 -n 8 -r 3 --json` with KLI_CUDA_GEMM_MIN = 0 (the warp-per-row kernels
#    only: the old path, and the default until this has run on a GPU), 32, 8, and 8 with
#    KLI_CUDA_GEMM_SPLIT=0 ("8:one":
#    one bf16 product in place of the split pair, what the split costs), one after the
#    other; the table gives the median of the 3 prefill repetitions with their range, and
#    the ratio to the old path. With 256 experts a 512-token prefill routes 16 rows to an
#    expert on average, so 32 leaves most routed experts on the kernels and 8 moves them
#    too. (A build needs --with-cublas for any of it.)
#
# Settings: GP_DIR (/tmp/kli-gpu-prefill), GP_LAYERS (4), GP_EXPERTS (256), GP_TYPES
# ("bf16 q8_0 q4_k"), GP_MINS ("0 32 8 8:one"), GP_TEST (1; 0 skips test-cuda). About 23 GB of
# models with the defaults.
set -eu

build=${1:-./build}
dir=${GP_DIR:-/tmp/kli-gpu-prefill}
layers=${GP_LAYERS:-4}
experts=${GP_EXPERTS:-256}
types=${GP_TYPES:-bf16 q8_0 q4_k}
mins=${GP_MINS:-0 32 8 8:one}
kli=$build/kli

if [ ! -x "$kli" ] || [ ! -x "$build/tests/test-cuda" ]; then
    echo "gpu-prefill: $build/kli or $build/tests/test-cuda is missing (see the top of $0)" >&2
    exit 2
fi
if ! grep -q 'define HAVE_CUBLAS 1' "$build/config.h" 2>/dev/null; then
    echo "gpu-prefill: $build was configured without cuBLAS: nothing to compare" >&2
    exit 2
fi
mkdir -p "$dir"
start=$(date +%s)
stamp() { echo "[$(($(date +%s) - start)) s] $*"; }

rc=0
if [ "${GP_TEST:-1}" != 0 ]; then
    stamp "test-cuda (log: $dir/test-cuda.log)"
    "$build/tests/test-cuda" >"$dir/test-cuda.log" 2>&1 || rc=$?
    grep -E '^(not ok|# )' "$dir/test-cuda.log" | grep -v '^# [a-z_]*$' | head -40 || true
    echo "test-cuda: exit $rc, $(grep -c '^ok' "$dir/test-cuda.log") ok, " \
         "$(grep -c '^not ok' "$dir/test-cuda.log") not ok"
fi

base=$dir/synth-$layers-$experts-bf16
for t in $types; do
    m=$dir/synth-$layers-$experts-$t
    [ -f "$m/config.json" ] && continue
    stamp "making $m"
    case $t in
    bf16 | q8_0 | q4)
        "$kli" synth -o "$m" --layers "$layers" --experts "$experts" --type "$t" --seed 7 \
            --force >"$dir/make-$t.log" 2>&1 ;;
    *)
        [ -f "$base/config.json" ] ||
            "$kli" synth -o "$base" --layers "$layers" --experts "$experts" --type bf16 \
                --seed 7 --force >"$dir/make-bf16.log" 2>&1
        "$kli" quantize -m "$base" -o "$m" --type "$t" --force >"$dir/make-$t.log" 2>&1 ;;
    esac || { echo "gpu-prefill: making $m failed: see $dir/make-$t.log" >&2; exit 1; }
done

out=$dir/bench-$(date +%Y%m%d-%H%M%S).txt
: >"$out"
for t in $types; do
    for n in $mins; do
        split=1
        case $n in *:one) split=0 ;; esac
        stamp "bench $t, KLI_CUDA_GEMM_MIN=${n%:one} KLI_CUDA_GEMM_SPLIT=$split"
        line=$(KLI_CUDA_GEMM_MIN=${n%:one} KLI_CUDA_GEMM_SPLIT=$split "$kli" bench \
                   -m "$dir/synth-$layers-$experts-$t" --gpu on -p 512 -n 8 -r 3 --json \
                   2>>"$dir/bench.err" | tail -n 1) || line=""
        get() { printf '%s\n' "$line" | sed -n "s/.*\"$1\": *\([0-9.eE+-]*\).*/\1/p"; }
        echo "$t $n $(get prefill_tok_s) $(get prefill_tok_s_min) $(get prefill_tok_s_max)" \
             "$(get decode_tok_s)" >>"$out"
    done
done
grep -m 1 GPU "$dir/bench.err" || true
echo
echo "prefill 512 tokens, medians of 3 ($layers layers, $experts experts, --gpu on; $out)"
awk 'BEGIN { printf "%-6s %9s %14s %22s %8s %12s\n", "type", "GEMM_MIN", "prefill tok/s",
             "range", "x old", "decode tok/s" }
     { if ($2 == 0) old[$1] = $3
       r = (old[$1] > 0 && $3 != "") ? sprintf("%.2f", $3 / old[$1]) : "-"
       printf "%-6s %9s %14s %22s %8s %12s\n", $1, $2 == 0 ? "0 (old)" : $2, $3,
              $4 " .. " $5, r, $6 }' "$out"
stamp "done"
exit $rc
