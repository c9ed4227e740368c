#!/bin/bash
# contrib/bench/gpu-server.sh - every check and measurement that needs the GPU server (an
# H100/H200 with a 16-core Sapphire Rapids CPU: issues #21, #22, #23) in one script, for a
# machine that has CUDA but none of kli's libraries and cannot install them.
#
#   sh contrib/bench/gpu-server.sh bundle DIR      (here, on a machine with the build deps)
#   bash contrib/bench/gpu-server.sh run DIR STAGE...   (there, in a copy of the tree)
#
# bundle: configures and builds in DIR/build (--with-cuda --with-cublas --enable-amx
#   --disable-shared, so the programs need no libkli.so), and packs kli, config.h, the test
#   programs the stages run and every shared library they need but glibc's and CUDA's into
#   DIR/bundle.tar.xz (about 15 MB). Carry DIR to the server.
# run: unpacks the bundle into /tmp/k once, points LD_LIBRARY_PATH at its libraries and
#   CUDA's, and runs the stages in order, each within what is left of RUN_BUDGET seconds
#   (575) so that the whole fits one call; logs go to $OUT (or /tmp/out).
#   env    the CPU's AMX/AVX-512 flags, the GPU and driver, unresolved libraries
#   cuda   tests/test-cuda (every CUDA block against its CPU twin; the cuBLAS products and
#          the narrow cache are forced on in their cases)
#   amx    contrib/bench/amx.sh: the amx table's tests, the golden fixtures under it, and
#          prefill against avx512vnni at 16 threads
#   gp     contrib/bench/gpu-prefill.sh: prefill with the cuBLAS products against without
#   vsl    contrib/bench/vs-llama.sh at 16 threads against the llama-bench that DIR/llama.tar.xz
#          holds (a CPU build of llama.cpp with Kimi Linear support and its libraries), if any
#   depth  contrib/bench/depth.sh: GPU decode at 128K and 1M tokens with each cache type,
#          with and without the narrow cache, then CPU decode at 128K on 16 threads
set -u

case ${1:-} in
bundle)
    [ $# -eq 2 ] || { echo "usage: $0 bundle DIR" >&2; exit 2; }
    src=$(cd "$(dirname "$0")/../.." && pwd)
    mkdir -p "$2/build" && dir=$(cd "$2" && pwd) || exit 1
    stage=$(mktemp -d) || exit 1
    trap 'rm -rf "$stage"' EXIT
    (cd "$dir/build" && { [ -f Makefile ] || "$src/configure" -q --with-cuda --with-cublas \
        --enable-amx --disable-shared; } &&
        make -j"$(nproc)" kli tests/test-cuda tests/test-amx tests/test-simd tests/test-model \
            tests/test-ktypes tests/test-cache >/dev/null) || exit 1
    mkdir -p "$stage/b/tests" "$stage/lib"
    cp "$dir/build/kli" "$dir/build/config.h" "$stage/b/" &&
    for t in test-cuda test-amx test-simd test-model test-ktypes test-cache; do
        cp "$dir/build/tests/$t" "$stage/b/tests/" || exit 1
    done
    strip "$stage/b/kli" "$stage/b/tests/"*   # symbols only: the GPU code stays
    # every library but the C library's own and CUDA's (the server has those)
    ldd "$stage/b/kli" | awk '/=> \// { print $1, $3 }' |
        grep -vE '^(libc|libm|libdl|libpthread|librt|ld-linux[^ ]*|libstdc\+\+|libgcc_s)\.so|cuda|cublas' |
        while read -r _ path; do cp -L "$path" "$stage/lib/" || exit 1; done || exit 1
    tar -C "$stage" -cJf "$dir/bundle.tar.xz" . &&
        echo "gpu-server: $dir/bundle.tar.xz ($(du -h "$dir/bundle.tar.xz" | cut -f1))"
    exit ;;
run) [ $# -ge 3 ] || { echo "usage: $0 run DIR STAGE..." >&2; exit 2; } ;;
*) echo "usage: $0 bundle DIR | run DIR STAGE..." >&2; exit 2 ;;
esac

dir=$2
shift 2
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
T0=$(date +%s)
END=$((T0 + ${RUN_BUDGET:-575}))
st() { echo "[$(($(date +%s) - T0)) s] $*"; }
left() { echo $((END - $(date +%s))); }
if [ ! -x /tmp/k/b/kli ]; then
    mkdir -p /tmp/k && tar -C /tmp/k -xJf "$dir/bundle.tar.xz" || exit 1
fi
export LD_LIBRARY_PATH=/tmp/k/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export KLI_TESTDATA=$PWD/tests/data
B=/tmp/k/b
for s in "$@"; do
    case $s in
    env)
        st env
        nproc
        grep -o 'amx[a-z0-9_]*\|avx512_bf16\|avx512_fp16\|avx512_vnni' /proc/cpuinfo | sort -u |
            tr '\n' ' '
        echo
        grep -m1 'model name' /proc/cpuinfo
        nvidia-smi -L
        nvidia-smi --query-gpu=driver_version,clocks.max.sm --format=csv,noheader
        ldd $B/kli | grep -i 'not found'
        $B/kli --version
        KLI_SIMD=amx $B/kli --version ;;
    cuda)
        st test-cuda
        l=$(left)
        timeout $((l < 240 ? l : 240)) $B/tests/test-cuda >"$OUT/test-cuda.log" 2>&1
        echo "test-cuda: exit $?, ok $(grep -c '^ok' "$OUT/test-cuda.log")," \
             "not ok $(grep -c '^not ok' "$OUT/test-cuda.log")"
        grep -E '^not ok|^# (GPU|device|kernels)' "$OUT/test-cuda.log" | head -30 ;;
    amx)
        st amx.sh
        AMX_DIR=/tmp/amx timeout "$(left)" sh contrib/bench/amx.sh $B >"$OUT/amx.log" 2>&1
        echo "amx.sh: exit $?"
        grep -v '^ok' "$OUT/amx.log" | tail -30
        cat $B/amx-test-*.log >"$OUT/amx-tests.log" 2>/dev/null ;;
    gp)
        st gpu-prefill
        GP_TEST=0 GP_DIR=/tmp/gp GP_LAYERS=4 GP_EXPERTS=256 GP_TYPES="${GP_TYPES:-bf16 q8_0 q4_k}" \
            GP_MINS="${GP_MINS:-0 8}" timeout "$(left)" sh contrib/bench/gpu-prefill.sh $B \
            >"$OUT/gp.log" 2>&1
        echo "gpu-prefill.sh: exit $?"
        tail -12 "$OUT/gp.log" ;;
    vsl)
        st vs-llama
        if [ ! -f "$dir/llama.tar.xz" ]; then
            echo "vsl: no $dir/llama.tar.xz"
            continue
        fi
        { mkdir -p /tmp/ll && tar -C /tmp/ll -xJf "$dir/llama.tar.xz"; } || continue
        LD_LIBRARY_PATH=/tmp/ll:$LD_LIBRARY_PATH VSL_DIR=/tmp/vsl timeout "$(left)" \
            sh contrib/bench/vs-llama.sh $B/kli /tmp/ll/llama-bench >"$OUT/vsl.log" 2>&1
        echo "vs-llama.sh: exit $?"
        tail -8 "$OUT/vsl.log"
        cp /tmp/vsl/vsl-*.jsonl "$OUT/" 2>/dev/null ;;
    depth)
        st depth
        [ -f /tmp/sh64/config.json ] ||
            $B/kli synth -o /tmp/sh64 --experts 64 --type q8_0 --seed 7 --force >/dev/null 2>&1
        KLI_CUDA_NARROW_CACHE=1 timeout $(($(left) / 3)) sh contrib/bench/depth.sh -k $B/kli \
            -m /tmp/sh64 -d 131072,1048576 -c f32,bf16,q8_0 -n 32 -r 3 \
            -o "$OUT/depth-gpu-narrow.jsonl" -- --gpu on 2>&1 | tail -7
        timeout $(($(left) / 2)) sh contrib/bench/depth.sh -k $B/kli -m /tmp/sh64 \
            -d 131072,1048576 -c f32,bf16 -n 32 -r 3 -o "$OUT/depth-gpu.jsonl" -- --gpu on 2>&1 |
            tail -5
        timeout "$(left)" sh contrib/bench/depth.sh -k $B/kli -m /tmp/sh64 -t 16 -d 131072 \
            -c bf16,q8_0 -n 16 -r 3 -o "$OUT/depth-cpu16.jsonl" -- --gpu off 2>&1 | tail -4 ;;
    *) echo "gpu-server: no stage '$s'" >&2 ;;
    esac
done
st "done"
