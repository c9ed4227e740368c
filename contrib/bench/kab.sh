#!/bin/sh
# contrib/bench/kab.sh - prefill and decode speed of two kli builds, interleaved, on the
# shape-true synthetic model in several weight types (doc/measuring.md, sections 2 and 4).
#
#   sh contrib/bench/kab.sh BASE_KLI NEW_KLI
#
# Settings come from the environment: KAB_DIR (./kab-models), KAB_ROUNDS (5), KAB_THREADS
# ("16 2"), KAB_TYPES ("q4 q4_k q6_k q8_0"), KAB_PROMPT (512), KAB_GEN (64), KAB_SOURCE.
#
# The models are made once in KAB_DIR (about 2.9 GB for q8_0 plus each type's size): `kli
# synth --type q8_0 --seed 7` by NEW_KLI, then `kli quantize --type TYPE` of it (q4, q4_k,
# q5_k, q3_k: every matrix in that type; q6_k, q2_k and the *_m names are kli-quantize's
# recipes; q8_0 is the synth model itself). KAB_SOURCE=MODEL quantizes MODEL instead of
# the synth model, e.g. tests/data/tiny-kimi-linear for a quick check of the script. Each
# round runs, for each thread count and type, `kli bench -r 1 --json --gpu off` once with
# BASE_KLI and once with NEW_KLI (in alternating order from one round to the next), so that
# both see the same drift of the machine. The runs' JSON lines go to
# KAB_DIR/kab-YYYYmmdd-HHMMSS.jsonl; the table printed at the end gives, per thread count
# and type, the median prefill and decode tok/s and roofline fraction of each build over
# the rounds, with their ranges and the ratios new/base of the medians. Run it on an
# otherwise quiet machine.
set -eu

dir=${KAB_DIR:-./kab-models}
rounds=${KAB_ROUNDS:-5}
threads=${KAB_THREADS:-16 2}
types=${KAB_TYPES:-q4 q4_k q6_k q8_0}
prompt=${KAB_PROMPT:-512}
gen=${KAB_GEN:-64}
src=${KAB_SOURCE:-}
if [ $# -ne 2 ]; then
    echo "usage: $0 BASE_KLI NEW_KLI (settings: KAB_* in the environment, see the file)" >&2
    exit 2
fi
base=$1
new=$2
for b in "$base" "$new"; do
    if [ ! -x "$b" ]; then
        echo "$0: $b: not an executable kli binary" >&2
        exit 1
    fi
done
case $rounds in
'' | *[!0-9]*) echo "$0: KAB_ROUNDS=$rounds: not a number of rounds" >&2; exit 2 ;;
esac
command -v python3 >/dev/null || { echo "$0: python3 is needed for the table" >&2; exit 1; }

mkdir -p "$dir"
if [ -n "$src" ]; then
    [ -d "$dir/q8_0" ] || "$new" quantize -m "$src" -o "$dir/q8_0" --type q8_0
elif [ ! -f "$dir/q8_0/model.safetensors" ]; then
    "$new" synth -o "$dir/q8_0" --type q8_0 --seed 7 --force
fi
for w in $types; do
    if [ "$w" != q8_0 ] && [ ! -d "$dir/$w" ]; then
        "$new" quantize -m "$dir/q8_0" -o "$dir/$w.tmp" --type "$w" --force
        mv "$dir/$w.tmp" "$dir/$w"
    fi
done

log=$dir/kab-$(date -u +%Y%m%d-%H%M%S).jsonl
echo "kab: $rounds rounds, threads $threads, types $types, -p $prompt -n $gen; log $log"
# one run: $1 = label, $2 = binary, $3 = threads, $4 = type
one() {
    line=$("$2" bench -m "$dir/$4" -p "$prompt" -n "$gen" -r 1 -t "$3" --gpu off --json \
        2>"$dir/kab.err" | grep '^{' || true)
    if [ -z "$line" ]; then
        echo "kab: $1 -t $3 $4: kli bench failed: $(tail -n 1 "$dir/kab.err")" >&2
        return 0
    fi
    printf '{"build": "%s", "round": %d, "t": %d, "type": "%s", "bench": %s}\n' \
        "$1" "$r" "$3" "$4" "$line" >>"$log"
}
r=1
while [ "$r" -le "$rounds" ]; do
    for t in $threads; do
        for w in $types; do
            if [ $((r % 2)) -eq 1 ]; then
                one base "$base" "$t" "$w"
                one new "$new" "$t" "$w"
            else
                one new "$new" "$t" "$w"
                one base "$base" "$t" "$w"
            fi
        done
    done
    echo "kab: round $r of $rounds done"
    r=$((r + 1))
done

python3 - "$log" <<'EOF'
import json, statistics, sys

runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
keys = [("prefill_tok_s", "prefill"), ("decode_tok_s", "decode"), ("roofline_fraction", "roof")]
print("%-3s %-6s %-8s %26s %26s %7s" % ("t", "type", "metric", "base median (min-max)",
                                         "new median (min-max)", "new/base"))
for t in sorted({r["t"] for r in runs}, reverse=True):
    for w in sorted({r["type"] for r in runs if r["t"] == t}):
        for key, name in keys:
            v = {b: [r["bench"][key] for r in runs if r["t"] == t and r["type"] == w and
                     r["build"] == b] for b in ("base", "new")}
            if not v["base"] or not v["new"]:
                continue
            m = {b: statistics.median(v[b]) for b in v}
            cell = {b: "%.3f (%.3f-%.3f) n=%d" % (m[b], min(v[b]), max(v[b]), len(v[b]))
                    for b in v}
            print("%-3d %-6s %-8s %26s %26s %7.3f" % (t, w, name, cell["base"], cell["new"],
                                                     m["new"] / m["base"] if m["base"] else 0))
EOF
