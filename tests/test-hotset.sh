#!/bin/sh
# test-hotset.sh - contrib/tools/hotset-sim.py on hand-made router traces whose hit rates are
# worked out below, and its refusal of a bad trace.
set -u
src=${KLI_SRCDIR:-.}
sim="$src/contrib/tools/hotset-sim.py"
if ! command -v python3 >/dev/null 2>&1; then
    echo "1..0 # SKIP python3 is not installed"
    exit 0
fi
tmp=$(mktemp -d) || exit 1
trap 'rm -rf "$tmp"' EXIT
n=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
not_ok() { n=$((n + 1)); echo "not ok $n - $1"; }

# One MoE layer of 8 experts, top-1. Tokens 0-9 choose expert 7, tokens 10-19 expert 6 on
# even tokens and 7 on odd ones. Scored: tokens 10-19.
#   1 resident, fixed {0}:           0 of 10
#   profile (first half: all 7):     {7} -> the 5 odd tokens = 50%
#   oracle (scored half: 5 x 6, 5 x 7, ties to the lower id): {6} -> 50%
#   live: counts checked every 8 slots (tokens 7 and 15): at token 7 expert 7 has 8 > 2*0+4
#         and replaces 0 (before the scored half); at token 15 it still leads (4 halved + 5
#         = 9 against 6's 3): nothing moves. Scored hits: the odd tokens = 50%, no swaps.
i=0
: > "$tmp/t.jsonl"
while [ $i -lt 20 ]; do
    e=7
    if [ $i -ge 10 ] && [ $((i % 2)) -eq 0 ]; then e=6; fi
    echo "{\"tok\": $i, \"layers\": [[$e]]}" >> "$tmp/t.jsonl"
    i=$((i + 1))
done
python3 "$sim" --trace "$tmp/t.jsonl" --experts 8 --sizes 1 --json > "$tmp/out.json" 2>&1
if python3 - "$tmp/out.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["rows"][0]
want = {"fixed": 0.0, "profile": 0.5, "oracle": 0.5, "live": 0.5, "swaps_per_token": 0.0}
bad = [k for k, v in want.items() if abs(r[k] - v) > 1e-9]
sys.exit(1 if bad else 0)
PY
then ok "hit rates of one resident expert on a hand-made trace"; else
    not_ok "hit rates of one resident expert on a hand-made trace"
    sed 's/^/# /' "$tmp/out.json"
fi
python3 "$sim" --trace "$tmp/t.jsonl" --experts 8 --sizes 8 --json > "$tmp/all.json" 2>&1
if python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['rows'][0]; \
sys.exit(0 if all(r[k] == 1.0 for k in ('fixed','live','profile','oracle')) else 1)" \
    "$tmp/all.json"; then ok "every expert resident: every policy hits always"; else
    not_ok "every expert resident: every policy hits always"; fi

printf '{"layers": [[1, 2]]}\nnot json\n' > "$tmp/bad.jsonl"
if python3 "$sim" --trace "$tmp/bad.jsonl" > "$tmp/err" 2>&1; then
    not_ok "a malformed line is refused"
elif grep -q "bad.jsonl:2" "$tmp/err"; then ok "a malformed line is refused, naming its line"
else not_ok "a malformed line is refused, naming its line"; fi
if python3 "$sim" --trace "$tmp/t.jsonl" --experts 4 > "$tmp/err" 2>&1; then
    not_ok "experts beyond --experts are refused"
else ok "experts beyond --experts are refused"; fi
echo "1..$n"
