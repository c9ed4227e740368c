#!/bin/sh
# test-sampler-cli.sh - sampling settings at their extremes through the CLI (TAP), on the
# tiny model: a temperature so small that logits / T overflows (1e-39, or 1e-45 in a batch
# record) once crashed the sampler and with it the whole batch and every resume. Such a
# temperature is greedy in the limit: the text equals --temp 0's, and the records around a
# poisoned one complete too.
#
# The JSON checks need python3; without it the test is skipped.
set -u
: "${KLI_BIN:?}" "${KLI_TESTDATA:?}" "${KLI_SRCDIR:?}"
. "$KLI_SRCDIR/tests/lib.sh"
need_python json "python3 is needed to check the JSON output"
py=$PY

# ---- kli run: --temp 1e-39 and --temp 100 ------------------------------------------------
"$kli" run -m "$model" -p "Tell me a story" -n 12 --temp 0 -t 1 --quiet >"$tmp/greedy.txt" \
    2>"$tmp/err"
check $? "run --temp 0"
"$kli" run -m "$model" -p "Tell me a story" -n 12 --temp 1e-39 -t 1 --quiet >"$tmp/tiny.txt" \
    2>"$tmp/err"
rc=$?
if [ $rc -eq 0 ] && cmp -s "$tmp/greedy.txt" "$tmp/tiny.txt"; then
    ok "run --temp 1e-39: exit 0, the text of --temp 0"
else
    notok "run --temp 1e-39: exit $rc, or another text than --temp 0"
    sed 's/^/# /' "$tmp/err" | head -5
fi
"$kli" run -m "$model" -p "Tell me a story" -n 12 --temp 100 --top-p 1 --seed 7 -t 1 \
    --quiet >"$tmp/hot.txt" 2>"$tmp/err"
check $? "run --temp 100 --top-p 1: exit 0"

# ---- kli batch: records with temperature 1e-45 and 1e-39 among ordinary ones --------------
cat >"$tmp/in.jsonl" <<'EOF'
{"id": "a", "prompt": "Tell me a story", "temperature": 0}
{"id": "b", "prompt": "Tell me a story", "temperature": 1e-45}
{"id": "c", "prompt": "Question 3?", "temperature": 0.8, "seed": 3}
{"id": "d", "prompt": "Tell me a story", "temperature": 1e-39, "top_p": 1e-30}
{"id": "e", "prompt": "Another one", "temperature": 100, "top_p": 1, "top_k": 0}
EOF
"$kli" batch -m "$model" -i "$tmp/in.jsonl" -o "$tmp/out.jsonl" -P 2 -n 12 -t 1 --quiet \
    >/dev/null 2>"$tmp/err"
rc=$?
if [ $rc -eq 0 ]; then ok "batch with temperatures 1e-45, 1e-39 and 100: exit 0"; else
    notok "batch with temperatures 1e-45, 1e-39 and 100: exit $rc"
    sed 's/^/# /' "$tmp/err" | head -5
fi
"$py" - "$tmp/out.jsonl" >"$tmp/check.out" 2>&1 <<'EOF'
import json, sys
rs = {}
for line in open(sys.argv[1], encoding='utf-8'):
    r = json.loads(line)
    rs[r['id']] = r
if sorted(rs) != ['a', 'b', 'c', 'd', 'e']:
    sys.exit('ids %s' % sorted(rs))
for k, r in rs.items():
    if r['finish_reason'] not in ('stop', 'length'):
        sys.exit('%s: %s' % (k, r.get('error')))
for k in 'bd':
    if rs[k]['text'] != rs['a']['text']:
        sys.exit('%s: %r, greedy gives %r' % (k, rs[k]['text'], rs['a']['text']))
EOF
if [ $? -eq 0 ]; then ok "every record completed; 1e-45 and 1e-39 give the greedy text"; else
    notok "every record completed; 1e-45 and 1e-39 give the greedy text"
    sed 's/^/# /' "$tmp/check.out" | head -5
fi
# ---- --logit-bias and "logit_bias": +100 on the token of "a" makes greedy text all a's ------
a_id=$(printf a | "$kli" tokenize -m "$model" | tr -d ' \n')
"$kli" run -m "$model" -p "Tell me a story" -n 6 --temp 0 --logit-bias "$a_id:100" -t 1 \
    --quiet >"$tmp/bias.txt" 2>"$tmp/err"
rc=$?
if [ $rc -eq 0 ] && [ "$(cat "$tmp/bias.txt")" = "aaaaaa" ]; then
    ok "run --logit-bias $a_id:100: six a's"
else
    notok "run --logit-bias $a_id:100: exit $rc, '$(head -c 40 "$tmp/bias.txt")'"
fi
t "--logit-bias with a bias of 200: usage error" 2 \
    "$kli" run -m "$model" -p x --logit-bias 5:200
t "--logit-bias naming a token twice: usage error" 2 \
    "$kli" run -m "$model" -p x --logit-bias 5:60,5:60
t "--logit-bias with a blank before the id: usage error" 2 \
    "$kli" run -m "$model" -p x --logit-bias " 5:1"
t "--logit-bias with a token outside the vocabulary: exit 1" 1 \
    "$kli" run -m "$model" -p x --logit-bias 99999:1
printf '{"id": "a", "prompt": "Hi", "max_tokens": 4, "temperature": 0, "logit_bias": {"%s": 100}}\n{"id": "b", "prompt": "Hi", "logit_bias": {"x": 1}}\n' \
    "$a_id" >"$tmp/bias.jsonl"
"$kli" batch -m "$model" -i "$tmp/bias.jsonl" -o "$tmp/bias.out" -t 1 --quiet \
    --max-errors 1 >/dev/null 2>"$tmp/err"
rc=$?
"$py" - "$tmp/bias.out" <<'EOF'
import json, sys
rs = {json.loads(l)['id']: json.loads(l) for l in open(sys.argv[1], encoding='utf-8')}
sys.exit(rs['a']['text'] != 'aaaa' or 'is not a token id' not in rs['b'].get('error', ''))
EOF
check $((rc + $?)) "batch logit_bias: four a's; a bad key fails its record naming it"
echo "1..$n"
exit $fail
