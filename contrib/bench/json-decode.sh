#!/bin/sh
# contrib/bench/json-decode.sh - decode speed under --json-schema and --json against free
# decoding, interleaved (issue 20's target: at least 0.9x).
#
#   sh contrib/bench/json-decode.sh [-k KLI] [-m MODEL] [-r ROUNDS] [-n N] [-- KLI OPTIONS]
#
# Each round runs `kli run` three times with the same prompt and seed: free, with a schema
# of a record with strings, numbers, an enum array and a union (written to a temporary
# file), and with --json (any object); a run's decode tok/s (its report on stderr) is one
# sample. Prints the medians and the two ratios. The answers under a schema end when the
# value is whole, so they are shorter: compare tok/s, not times. A shape-true model is
# `kli synth -o DIR` (add --gpu on and the like after --). Run it on a quiet machine.
set -eu
. "$(dirname "$0")/lib.sh"

kli=./kli model=""
rounds=5 n=64
while [ $# -gt 0 ]; do
    case $1 in
    -k) kli=$2; shift 2 ;;
    -m) model=$2; shift 2 ;;
    -r) rounds=$2; shift 2 ;;
    -n) n=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "usage: $0 [-k KLI] [-m MODEL] [-r ROUNDS] [-n N] [-- KLI OPTIONS]" >&2; exit 2 ;;
    esac
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/schema.json" <<'EOS'
{"type": "object",
 "properties": {"name": {"type": "string", "maxLength": 40},
                "summary": {"type": "string"},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "score": {"type": "number", "minimum": -1, "maximum": 1},
                "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
                "kind": {"anyOf": [{"const": "person"}, {"type": "null"}]}},
 "required": ["name", "summary", "age", "kind"]}
EOS
m=""
[ -n "$model" ] && m="-m $model"
run() {   # run MODE-OPTIONS...: prints the decode tok/s of one run
    # shellcheck disable=SC2086
    "$kli" run $m -p "Describe a person as a JSON record." -n "$n" --seed 7 "$@" \
        2>&1 >/dev/null | sed -n 's/.*decode \([0-9.]*\) tok\/s.*/\1/p'
}
: >"$tmp/free"
: >"$tmp/schema"
: >"$tmp/json"
r=0
while [ $r -lt "$rounds" ]; do
    run "$@" >>"$tmp/free"
    run --json-schema "$tmp/schema.json" "$@" >>"$tmp/schema"
    run --json "$@" >>"$tmp/json"
    r=$((r + 1))
done
f=$(median "$tmp/free") s=$(median "$tmp/schema") j=$(median "$tmp/json")
echo "decode tok/s, median of $rounds: free $f, --json-schema $s, --json $j"
awk -v f="$f" -v s="$s" -v j="$j" 'BEGIN { printf "ratio: schema/free %.3f, json/free %.3f\n",
                                              s / f, j / f }'
