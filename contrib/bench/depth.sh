#!/bin/sh
# contrib/bench/depth.sh - decode speed at depth for each MLA cache type, one command:
# `kli bench --depth D --cache-type T` for every depth and type, one JSON line each in OUT,
# and a table of the medians: decode on the empty context, at depth, their ratio (target
# at 128K with bf16 on the CPU: >= 0.6) and what the context takes in memory.
#
#   sh contrib/bench/depth.sh [-k KLI] [-m MODEL] [-t THREADS] [-d DEPTHS] [-c TYPES]
#                             [-n N] [-r REPS] [-o OUT] [-- BENCH_ARGS...]
#
# Defaults: ./kli, the demo model, the default thread count, depths 32768,131072, types
# f32,bf16,q8_0, 32 decoded tokens, 3 repetitions, OUT depth.jsonl. BENCH_ARGS go to every
# kli bench (--gpu on|off, --type q8_0, ...). The shape-true model and 1M tokens on a server:
#
#   kli synth -o /tmp/shape --experts 64
#   sh contrib/bench/depth.sh -k build/kli -m /tmp/shape -t 16 \
#       -d 32768,131072,1048576 -- --gpu off
#
# (f32 at 1M needs 15.8 GiB of cache, bf16 7.9, q8_0 4.2 on Kimi Linear's 7 MLA layers; kli
# refuses a depth that does not fit the memory up front.) The depth is filled by a 128-token
# prefill repeated up to D (kli_session_pad, kli(1) bench), so each run costs seconds plus
# the decode, not a prefill of D tokens.
set -eu

kli=./kli
model=""
threads=""
depths=32768,131072
types=f32,bf16,q8_0
gen=32
reps=3
out=depth.jsonl
while getopts k:m:t:d:c:n:r:o: o; do
    case $o in
    k) kli=$OPTARG ;;
    m) model=$OPTARG ;;
    t) threads=$OPTARG ;;
    d) depths=$OPTARG ;;
    c) types=$OPTARG ;;
    n) gen=$OPTARG ;;
    r) reps=$OPTARG ;;
    o) out=$OPTARG ;;
    *) echo "usage: $0 [-k KLI] [-m MODEL] [-t THREADS] [-d DEPTHS] [-c TYPES] [-n N]" \
            "[-r REPS] [-o OUT] [-- BENCH_ARGS...]" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
set -- ${model:+-m "$model"} ${threads:+-t "$threads"} "$@"

# field KEY LINE: the number after "KEY": in a JSON line
field() {
    printf '%s\n' "$2" | sed -n "s/.*\"$1\": \([0-9.e+-]*\).*/\1/p"
}

: >"$out"
printf '%-5s %9s %12s %12s %6s %10s\n' type depth "empty tok/s" "depth tok/s" ratio "ctx GiB"
for t in $(echo "$types" | tr , ' '); do
    for d in $(echo "$depths" | tr , ' '); do
        line=$("$kli" bench -p 0 -n "$gen" -r "$reps" --depth "$d" --cache-type "$t" --json \
            "$@")
        printf '%s\n' "$line" >>"$out"
        e=$(field decode_tok_s "$line")
        at=$(field decode_depth_tok_s "$line")
        b=$(field context_bytes "$line")
        printf '%-5s %9s %12s %12s %6s %10s\n' "$t" "$d" "$e" "$at" \
            "$(echo "$at $e" | awk '{ printf "%.2f", ($2 > 0 ? $1 / $2 : 0) }')" \
            "$(echo "$b" | awk '{ printf "%.2f", $1 / 1073741824 }')"
    done
done
