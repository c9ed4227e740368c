#!/bin/sh
# openai-batch.sh - kli batch on OpenAI Batch API files (TAP), on the tiny model: chat and
# completion records answer as kli's own records with the same settings do (the text, token
# for token), in OpenAI's output format with usage; a field or url kli cannot honour fails
# that record alone, naming it, with the documented exit status; resume and shards treat
# custom_id as the id.
#
# The JSON checks need python3; without it the test is skipped.
set -u
: "${KLI_BIN:?}" "${KLI_TESTDATA:?}" "${KLI_SRCDIR:?}"
. "$KLI_SRCDIR/tests/lib.sh"
need_python json "python3 is needed to check the JSON output"
py=$PY

cat >"$tmp/in.jsonl" <<'EOF2'
{"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "kimi-linear", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}], "max_tokens": 12, "temperature": 0.8, "seed": 5}}
{"custom_id": "comp-1", "method": "POST", "url": "/v1/completions", "body": {"model": "kimi-linear", "prompt": "Once upon a time", "max_completion_tokens": 9, "temperature": 0}}
{"id": "own-chat", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}], "max_tokens": 12, "temperature": 0.8, "seed": 5}
{"id": "own-comp", "prompt": "Once upon a time", "raw": true, "max_tokens": 9, "temperature": 0}
{"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}
{"custom_id": "bad-field", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}], "audio": {"voice": "alloy"}}}
{"custom_id": "bad-n", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}], "n": 2}}
{"custom_id": "bad-kind", "method": "POST", "url": "/v1/completions", "body": {"messages": [{"role": "user", "content": "x"}]}}
{"custom_id": "bad-method", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}}
{"custom_id": "bad-tools", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "max_tokens": 4, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}}
EOF2

"$kli" batch -m "$model" -i "$tmp/in.jsonl" -o "$tmp/out.jsonl" -P 2 -t 1 --quiet \
    >/dev/null 2>"$tmp/err"
check $(($? != 3)) "6 failed records, --max-errors 0: exit 3"
"$kli" batch -m "$model" -i "$tmp/in.jsonl" -o "$tmp/out2.jsonl" -P 2 -t 1 --quiet \
    --max-errors 6 >/dev/null 2>"$tmp/err"
check $? "the same with --max-errors 6: exit 0"

"$py" - "$tmp/out.jsonl" >"$tmp/check" 2>&1 <<'EOF2'
import json, sys
rs = {}
for line in open(sys.argv[1], encoding='utf-8'):
    r = json.loads(line)
    rs[r.get('custom_id', r.get('id'))] = r
if len(rs) != 10:
    sys.exit('%d lines' % len(rs))
for k, obj, own in (('chat-1', 'chat.completion', 'own-chat'),
                    ('comp-1', 'text_completion', 'own-comp')):
    r = rs[k]
    if r['error'] is not None or r['response']['status_code'] != 200:
        sys.exit('%s: %r' % (k, r))
    b = r['response']['body']
    c = b['choices'][0]
    text = c['message']['content'] if obj == 'chat.completion' else c['text']
    if obj == 'chat.completion' and c['message']['role'] != 'assistant':
        sys.exit('%s: role' % k)
    u = b['usage']
    o = rs[own]
    if (b['object'] != obj or text != o['text'] or c['finish_reason'] != o['finish_reason']
            or u['prompt_tokens'] != o['prompt_tokens']
            or u['completion_tokens'] != o['completion_tokens']
            or u['total_tokens'] != u['prompt_tokens'] + u['completion_tokens']):
        sys.exit('%s: %r against %r' % (k, r, o))
want = {'bad-url': '"url" must be', 'bad-field': '"body.audio" is not supported',
        'bad-n': '"body.n"', 'bad-kind': '"body.messages" does not belong',
        'bad-method': '"method" must be "POST"',
        # a completion has no tools: not rendered as a chat with them
        'bad-tools': '"body.tools" does not belong to /v1/completions'}
for k, w in want.items():
    r = rs[k]
    if (r['response']['status_code'] != 400 or r['error'] is None
            or w not in r['error']['message']):
        sys.exit('%s: %r' % (k, r))
EOF2
if [ ! -s "$tmp/check" ]; then
    ok "OpenAI lines: the text and counts of kli's own records; errors name the field"
else
    notok "OpenAI lines: $(head -c 300 "$tmp/check")"
fi

# resume: a lost line is redone, and only it
grep -v '"custom_id":"comp-1"' "$tmp/out2.jsonl" >"$tmp/cut.jsonl"
mv "$tmp/cut.jsonl" "$tmp/out2.jsonl"
"$kli" batch -m "$model" -i "$tmp/in.jsonl" -o "$tmp/out2.jsonl" -P 2 -t 1 --max-errors 6 \
    >/dev/null 2>"$tmp/err"
rc=$?
if [ $rc -eq 0 ] && [ "$(wc -l <"$tmp/out2.jsonl")" -eq 10 ] &&
    grep -q "1 records to run, 9 already" "$tmp/err"; then
    ok "resume by custom_id: only the lost record runs again"
else
    notok "resume by custom_id: exit $rc"
    sed 's/^/# /' "$tmp/err" | head -5
fi
# shards split by custom_id and together hold every record once
for k in 1 2; do
    "$kli" batch -m "$model" -i "$tmp/in.jsonl" -o "$tmp/shard.jsonl" --shard $k/2 -t 1 \
        --quiet --max-errors 9 >/dev/null 2>"$tmp/err"
done
"$py" -c "
import json, sys
ids = [json.loads(l).get('custom_id') or json.loads(l)['id'] for l in open('$tmp/shard.jsonl')]
sys.exit(sorted(ids) != sorted(set(ids)) or len(ids) != 10)"
check $? "two shards into one file: every record once"
echo "1..$n"
