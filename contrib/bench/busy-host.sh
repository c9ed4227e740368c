#!/bin/sh
# contrib/bench/busy-host.sh - decode speed with one CPU kept busy by another process, against
# one thread, and (optionally) against a baseline build, interleaved.
#
#   sh contrib/bench/busy-host.sh [-k KLI] [-b BASELINE_KLI] [-m MODEL] [-r ROUNDS]
#                                 [-c CPU] [-p N] [-n N]
#
# Each round runs, in this order and once each: the default thread count and -t 1 with a
# busy loop pinned to CPU (default: the highest CPU this shell may use), then the same two
# with the machine left idle; with -b, each of those runs once with the baseline binary
# too. A run is `kli bench -r 1`; its decode tok/s is one sample. The medians over the rounds
# are printed, with the ratios that matter: busy default/-t 1 (target >= 0.8) and, with -b,
# idle default new/baseline (target: no loss). Run it on an otherwise quiet machine; the
# numbers of one round are compared with each other only, so slow drift cancels.
set -eu
. "$(dirname "$0")/lib.sh"

kli=./kli
base=""
model=""
rounds=7
cpu=""
prompt=16
gen=64
while getopts k:b:m:r:c:p:n: o; do
    case $o in
    k) kli=$OPTARG ;;
    b) base=$OPTARG ;;
    m) model=$OPTARG ;;
    r) rounds=$OPTARG ;;
    c) cpu=$OPTARG ;;
    p) prompt=$OPTARG ;;
    n) gen=$OPTARG ;;
    *) echo "usage: $0 [-k KLI] [-b BASELINE_KLI] [-m MODEL] [-r ROUNDS] [-c CPU]" \
            "[-p N] [-n N]" >&2; exit 2 ;;
    esac
done
if [ -z "$model" ]; then
    model=$(dirname "$0")/../../tests/data/tiny-kimi-linear
fi
if [ -z "$cpu" ]; then
    cpu=$(taskset -pc $$ | sed 's/.*: //' | tr ',' '\n' | sed 's/.*-//' | sort -n | tail -1)
fi

tmp=$(mktemp -d)
busy=""
cleanup() {
    [ -n "$busy" ] && kill "$busy" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

# one sample: decode tok/s of one bench run; $1 = binary, $2 = file to append to, rest = args
sample() {
    bin=$1
    out=$2
    shift 2
    "$bin" bench -m "$model" -p "$prompt" -n "$gen" -r 1 --json "$@" 2>/dev/null |
        sed -n 's/.*"decode_tok_s": \([0-9.]*\).*/\1/p' >>"$out"
}

for r in $(seq "$rounds"); do
    taskset -c "$cpu" sh -c 'while :; do :; done' &
    busy=$!
    sample "$kli" "$tmp/busy-def"
    sample "$kli" "$tmp/busy-t1" -t 1
    if [ -n "$base" ]; then
        sample "$base" "$tmp/busy-base-def"
        sample "$base" "$tmp/busy-base-t1" -t 1
    fi
    kill "$busy"
    wait "$busy" 2>/dev/null || true
    busy=""
    sample "$kli" "$tmp/idle-def"
    sample "$kli" "$tmp/idle-t1" -t 1
    if [ -n "$base" ]; then
        sample "$base" "$tmp/idle-base-def"
        sample "$base" "$tmp/idle-base-t1" -t 1
    fi
    echo "round $r of $rounds done" >&2
done

echo "model $model, decode tok/s, medians of $rounds rounds (busy loop on CPU $cpu)"
for f in busy-def busy-t1 idle-def idle-t1 busy-base-def busy-base-t1 idle-base-def \
         idle-base-t1; do
    [ -s "$tmp/$f" ] && printf '  %-14s %10s\n' "$f" "$(median "$tmp/$f")"
done
ratio() {
    awk -v a="$(median "$tmp/$1")" -v b="$(median "$tmp/$2")" \
        'BEGIN { if (b > 0) printf "%.3f", a / b; else print "nan" }'
}
echo "  busy: default threads / -t 1 = $(ratio busy-def busy-t1) (target >= 0.8)"
if [ -n "$base" ]; then
    echo "  busy, baseline: default threads / -t 1 = $(ratio busy-base-def busy-base-t1)"
    echo "  idle: default threads, new / baseline = $(ratio idle-def idle-base-def)" \
         "(target >= 1, within noise)"
fi
