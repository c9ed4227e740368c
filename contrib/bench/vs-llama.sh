#!/bin/sh
# contrib/bench/vs-llama.sh - kli against a llama.cpp-family build on the same machine and
# the same weights, CPU only (issue #21's side-by-side table). Not part of `make check`.
#
#   sh contrib/bench/vs-llama.sh KLI LLAMA_BENCH
#
# KLI is a kli binary, LLAMA_BENCH a llama-bench of a llama.cpp with Kimi Linear support.
# The shape-true synthetic model (`kli synth --type q8_0 --seed 7`: the released widths, 4
# layers, 64 experts) is made once in VSL_DIR (./vsl-models), and from it, with the same
# `kli convert --type T`, a .kli for kli and from it (as stored) a GGUF for llama.cpp, for
# each T in VSL_TYPES ("bf16 q8_0 q4_k_m"): the same quantized weights in the two layouts.
# Each of VSL_ROUNDS rounds (3) runs, per thread count in VSL_THREADS ("16") and type,
# `kli bench -p P -n N -r 1 --gpu off --json` and `llama-bench -p P -n N -r 1 -ngl 0 -o
# jsonl`, the two in alternating order from round to round (P = VSL_PROMPT, 512; N =
# VSL_GEN, 128). The table gives the median prefill and decode tok/s of each with their
# range and the ratio kli/llama of the medians; the JSON lines go to VSL_DIR/vsl-*.jsonl.
set -eu

if [ $# -ne 2 ] || [ ! -x "$1" ] || [ ! -x "$2" ]; then
    echo "usage: $0 KLI LLAMA_BENCH (settings: VSL_* in the environment, see the file)" >&2
    exit 2
fi
kli=$1
llama=$2
dir=${VSL_DIR:-./vsl-models}
rounds=${VSL_ROUNDS:-3}
threads=${VSL_THREADS:-16}
types=${VSL_TYPES:-bf16 q8_0 q4_k_m}
prompt=${VSL_PROMPT:-512}
gen=${VSL_GEN:-128}
synth=${VSL_SYNTH:-}
case $rounds in
'' | *[!0-9]*) echo "$0: VSL_ROUNDS=$rounds: not a number of rounds" >&2; exit 2 ;;
esac
command -v python3 >/dev/null || { echo "$0: python3 is needed for the table" >&2; exit 1; }

mkdir -p "$dir"
if [ ! -f "$dir/q8_0/config.json" ]; then
    # shellcheck disable=SC2086
    "$kli" synth -o "$dir/q8_0.tmp" --type q8_0 --seed 7 --force $synth >/dev/null
    mv "$dir/q8_0.tmp" "$dir/q8_0"
fi
for w in $types; do
    [ -f "$dir/$w.kli" ] ||
        "$kli" convert -m "$dir/q8_0" -o "$dir/$w.kli" --type "$w" --force >/dev/null
    # from the .kli, as stored: the same quantized weights, not a second quantization
    [ -f "$dir/$w.gguf" ] ||
        "$kli" convert -m "$dir/$w.kli" -o "$dir/$w.gguf" --to gguf --force >/dev/null
done

log=$dir/vsl-$(date -u +%Y%m%d-%H%M%S).jsonl
echo "vs-llama: $rounds rounds, threads $threads, types $types, -p $prompt -n $gen; log $log"
# one run: $1 = kli|llama, $2 = threads, $3 = type
one() {
    if [ "$1" = kli ]; then
        line=$("$kli" bench -m "$dir/$3.kli" -p "$prompt" -n "$gen" -r 1 -t "$2" --gpu off \
            --json 2>"$dir/vsl.err" | grep '^{' || true)
    else
        line=$("$llama" -m "$dir/$3.gguf" -p "$prompt" -n "$gen" -r 1 -t "$2" -ngl 0 \
            -o jsonl 2>"$dir/vsl.err" | grep '^{' | tr '\n' ',' | sed 's/,$//' || true)
        [ -z "$line" ] || line="[$line]"
    fi
    if [ -z "$line" ]; then
        echo "vs-llama: $1 -t $2 $3 failed: $(tail -n 2 "$dir/vsl.err")" >&2
        return 0
    fi
    printf '{"prog": "%s", "round": %d, "t": %d, "type": "%s", "out": %s}\n' \
        "$1" "$r" "$2" "$3" "$line" >>"$log"
}
r=1
while [ "$r" -le "$rounds" ]; do
    for t in $threads; do
        for w in $types; do
            if [ $((r % 2)) -eq 1 ]; then
                one kli "$t" "$w"
                one llama "$t" "$w"
            else
                one llama "$t" "$w"
                one kli "$t" "$w"
            fi
        done
    done
    echo "vs-llama: round $r of $rounds done"
    r=$((r + 1))
done

python3 - "$log" <<'EOF'
import json, statistics, sys

def speeds(r):
    """(prefill, decode) tok/s of one run of either program"""
    if r["prog"] == "kli":
        return r["out"]["prefill_tok_s"], r["out"]["decode_tok_s"]
    pp = [o["avg_ts"] for o in r["out"] if o.get("n_prompt", 0) > 0]
    tg = [o["avg_ts"] for o in r["out"] if o.get("n_gen", 0) > 0]
    return (pp[0] if pp else None), (tg[0] if tg else None)

runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("%-3s %-7s %-8s %26s %26s %6s" % ("t", "type", "metric", "kli median (min-max)",
                                        "llama median (min-max)", "ratio"))
for t in sorted({r["t"] for r in runs}, reverse=True):
    for w in dict.fromkeys(r["type"] for r in runs if r["t"] == t):
        for i, name in enumerate(("prefill", "decode")):
            v = {p: [speeds(r)[i] for r in runs if r["t"] == t and r["type"] == w and
                     r["prog"] == p and speeds(r)[i]] for p in ("kli", "llama")}
            if not v["kli"] or not v["llama"]:
                print("%-3d %-7s %-8s: a program did not run" % (t, w, name))
                continue
            m = {p: statistics.median(v[p]) for p in v}
            c = {p: "%.1f (%.1f-%.1f) n=%d" % (m[p], min(v[p]), max(v[p]), len(v[p]))
                 for p in v}
            print("%-3d %-7s %-8s %26s %26s %6.2f" % (t, w, name, c["kli"], c["llama"],
                                                     m["kli"] / m["llama"]))
EOF
