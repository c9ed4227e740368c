#!/bin/sh
# gguf-speed.sh - decode speed of a Q4_K_M GGUF of the shape-true model against kli's own
# q4_k_m .kli of the same weights (issue 18's speed target: a GGUF is used in place, at
# kli's q4_k speed). Not part of `make check`.
#
#   contrib/bench/gguf-speed.sh [KLI] [WORKDIR] [LAYERS] [EXPERTS]
#
# KLI (default build/kli), WORKDIR (default /tmp/kli-gguf-speed), LAYERS and EXPERTS of the
# synthetic model (kli synth: the real per-layer shapes of Kimi-Linear-48B-A3B; default 8 and
# 64). It writes the model, converts it twice with the same --type q4_k_m (so the weight
# bytes are the same: the two files differ only in layout: the .kli groups each expert's
# matrices, the GGUF stacks each matrix over the experts, llama.cpp's way), then runs
# `kli bench` on each, alternating, three times, and prints the decode tok/s of every run.
# Extra arguments for kli bench (a GPU, threads) go in KLI_BENCH_ARGS.
set -eu
kli=${1:-build/kli}
dir=${2:-/tmp/kli-gguf-speed}
layers=${3:-8}
experts=${4:-64}
mkdir -p "$dir"
if [ ! -d "$dir/synth" ]; then
    "$kli" synth -o "$dir/synth" --layers "$layers" --experts "$experts"
fi
[ -f "$dir/q4km.kli" ] || "$kli" convert -m "$dir/synth" -o "$dir/q4km.kli" --type q4_k_m
[ -f "$dir/q4km.gguf" ] || "$kli" convert -m "$dir/synth" -o "$dir/q4km.gguf" \
    --type q4_k_m --to gguf
ls -l "$dir/q4km.kli" "$dir/q4km.gguf"
for rep in 1 2 3; do
    for f in q4km.kli q4km.gguf; do
        # shellcheck disable=SC2086
        "$kli" bench -m "$dir/$f" -p 64 -n 64 -r 3 --json ${KLI_BENCH_ARGS:-} \
            >"$dir/$f.$rep.json"
        printf '%s run %s: ' "$f" "$rep"
        tr ',' '\n' <"$dir/$f.$rep.json" | grep -m1 '"decode_tok_s"' || cat "$dir/$f.$rep.json"
    done
done
