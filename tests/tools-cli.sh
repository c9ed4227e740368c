#!/bin/sh
# tools-cli.sh - tool calls in Kimi's format through the CLI (TAP): the native rendering of
# conversations with tools (kli tokenize --messages --tools, kli_chat_render_json) against
# the template rendered by jinja2 (tests/chat_template.py, tests/data/kimi-tools.jinja),
# byte for byte and token for token; kli run --tools, kli batch and kli serve (whole and
# streamed) on the tiny model, whose random weights try every kind of token, under
# tool_choice required and a named function (each answer a call to a declared function
# whose arguments validate against its parameters); --special in run and chat. The golden cases need python3 with jinja2 (python3-jinja2); without it they are
# skipped with a message.
set -u
: "${KLI_BIN:?}" "${KLI_TESTDATA:?}" "${KLI_SRCDIR:?}"
. "$KLI_SRCDIR/tests/lib.sh"
need_python json "python3 is needed to check the JSON answers"
tok="$KLI_TESTDATA/tokenizer"

if tcase golden; then
    py=""
    for p in ${KLI_PYTHON:-} python3 /usr/bin/python3; do
        if "$p" -c "import jinja2" 2>/dev/null; then py=$p; break; fi
    done
    if [ -z "$py" ]; then
        ok "golden # SKIP python3-jinja2 is not installed (apt-get install python3-jinja2)"
    else
        mkdir "$tmp/g"
        "$py" "$KLI_SRCDIR/tests/chat_template.py" "$KLI_SRCDIR/tests/data/kimi-tools.jinja" \
            "$KLI_TESTDATA/chat-tools-cases.json" "$tmp/g"
        for f in "$tmp"/g/*.txt; do
            c=$(basename "$f" .txt)
            "$kli" tokenize -m "$tok" --messages "$tmp/g/$c.messages.json" \
                --tools "$tmp/g/$c.tools.json" >"$tmp/ids" 2>"$tmp/stderr"
            check $? "golden $c: kli renders it"
            "$kli" tokenize -m "$tok" --special --file "$f" >"$tmp/want"
            cmp -s "$tmp/ids" "$tmp/want"
            check $? "golden $c: the same token ids as the template's text"
            "$kli" detokenize -m "$tok" --file "$tmp/ids" >"$tmp/text"
            cmp -s "$tmp/text" "$f"
            check $? "golden $c: the same bytes as the template"
        done
    fi
fi

cat >"$tmp/tools.json" <<'EOF2'
[{"type": "function", "function": {"name": "get_weather", "description": "the weather",
  "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
   "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "days"],
   "additionalProperties": false}}},
 {"type": "function", "function": {"name": "ping", "parameters": {"type": "object",
  "properties": {"n": {"type": "boolean"}}, "required": ["n"], "additionalProperties": false}}}]
EOF2

# first_call_end(tokens): for the parallel_tool_calls cases, the length of an answer cut
# after its first call's end, or None: the first section's begin must be followed by
# exactly <|tool_call_begin|>, ordinary tokens, <|tool_call_argument_begin|>, ordinary
# tokens and <|tool_call_end|> (a malformed section is not cut: the parser reads it whole)
cat >"$tmp/first_call.py" <<'EOF2'
names = ['<|tool_calls_section_begin|>', '<|tool_call_begin|>',
         '<|tool_call_argument_begin|>', '<|tool_call_end|>', '<|tool_calls_section_end|>']


def first_call_end(toks):
    if names[0] not in toks:
        return None
    want = [names[1], names[2], names[3]]
    for i in range(toks.index(names[0]) + 1, len(toks)):
        if toks[i] in names:
            if toks[i] != want[0]:
                return None
            want.pop(0)
            if not want:
                return i + 1
    return None
EOF2
export ONECALL_DIR="$tmp"

# check_call FILE NAME: the answer is a call to NAME (any declared one if empty) with
# arguments of its parameters (the two schemas above, checked by hand)
check_call() {
    "$PY" - "$1" "$2" <<'EOF2'
import json, sys
o = json.load(open(sys.argv[1]))
assert o["finish_reason"] == "tool_calls", o
(c,) = o["tool_calls"]
name = c["function"]["name"]
assert c["type"] == "function" and c["id"] == "functions.%s:0" % name, c
assert sys.argv[2] in ("", name), name
a = json.loads(c["function"]["arguments"])
if name == "get_weather":
    assert set(a) == {"city", "days"} and isinstance(a["city"], str), a
    assert len(a["city"]) <= 12 and type(a["days"]) is int and 1 <= a["days"] <= 7, a
else:
    assert name == "ping" and set(a) == {"n"} and isinstance(a["n"], bool), a
EOF2
}

if tcase required; then
    bad=0
    for seed in 1 2 3 4 5 6 7 8; do
        "$kli" run -m "$model" -p "Weather?" --tools "$tmp/tools.json" --tool-choice required \
            -n 60 --temp 1 --seed $seed -t 1 --quiet >"$tmp/out" 2>"$tmp/err" &&
            check_call "$tmp/out" "" 2>>"$tmp/err" || { bad=1; sed 's/^/# /' "$tmp/err" | head -5; }
    done
    check $bad "required: 8 random answers are each a valid call"
    bad=0
    for seed in 1 2 3 4; do   # the demo model (no -m), a trained one that never saw tools
        "$kli" run --gpu off -p "Weather?" --tools "$tmp/tools.json" --tool-choice required \
            -n 60 --temp 1 --seed $seed -t 1 --quiet >"$tmp/out" 2>"$tmp/err" &&
            check_call "$tmp/out" "" 2>>"$tmp/err" || { bad=1; sed 's/^/# /' "$tmp/err" | head -5; }
    done
    check $bad "required, the demo model: 4 sampled answers are each a valid call"
fi

if tcase named; then
    bad=0
    for seed in 1 2 3 4 5 6; do
        "$kli" run -m "$model" -p "Weather?" --tools "$tmp/tools.json" \
            --tool-choice get_weather -n 60 --temp 1 --seed $seed -t 1 --quiet \
            >"$tmp/out" 2>"$tmp/err" &&
            check_call "$tmp/out" get_weather 2>>"$tmp/err" || { bad=1; head -3 "$tmp/err"; }
    done
    check $bad "named: 6 random answers each call get_weather with valid arguments"
    t "an undeclared function: exit 1" 1 "$kli" run -m "$model" -p x --tools "$tmp/tools.json" \
        --tool-choice nope
    grep -q '"nope"' "$tmp/stderr"
    check $? "the message names the function"
    # parameters {} (or without "type"): still a call whose arguments are an object
    printf '[{"type":"function","function":{"name":"f","parameters":{}}},
{"type":"function","function":{"name":"g","parameters":{"description":"x"}}}]' \
        >"$tmp/untyped.json"
    bad=0
    for ch in f g required; do
        for seed in 1 2 3; do
            "$kli" run -m "$model" -p x --tools "$tmp/untyped.json" --tool-choice $ch -n 30 \
                --temp 1 --seed $seed -t 1 --quiet >"$tmp/out" 2>"$tmp/err" &&
                "$PY" -c 'import json,sys; o=json.load(open(sys.argv[1]))
assert o["finish_reason"] == "tool_calls", o
assert isinstance(json.loads(o["tool_calls"][0]["function"]["arguments"]), dict), o' \
                "$tmp/out" 2>>"$tmp/err" || { bad=1; sed 's/^/# /' "$tmp/err" | head -3; }
        done
    done
    check $bad "untyped parameters: 9 forced answers are each a call with object arguments"
    for ch in required ping; do   # a forced call's grammar needs a token limit, as --json's
        t "--tool-choice $ch with -n 0: usage error" 2 "$kli" run -m "$model" -p x \
            --tools "$tmp/tools.json" --tool-choice $ch -n 0
        grep -q -- '--max-tokens above 0' "$tmp/stderr"
        check $? "--tool-choice $ch with -n 0: the message says what is needed"
    done
fi

if tcase auto; then
    "$kli" run -m "$model" -p "Weather?" --tools "$tmp/tools.json" -n 20 --seed 3 -t 1 \
        --quiet >"$tmp/out" 2>"$tmp/err"
    check $? "auto: the random model's answer comes back"
    "$PY" -c 'import json,sys; o=json.load(open(sys.argv[1])); assert "content" in o' \
        "$tmp/out"
    check $? "auto: a JSON message with its content"
    cat >"$tmp/conv.json" <<'EOF2'
[{"role": "user", "content": "Weather in Paris?"},
 {"role": "assistant", "content": null, "tool_calls": [{"id": "functions.get_weather:0",
  "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
 {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "18 degrees"}]
EOF2
    t "auto: --messages with a call and its result" 0 "$kli" run -m "$model" \
        --messages "$tmp/conv.json" --tools "$tmp/tools.json" -n 5 --seed 1 -t 1 --quiet
    printf '[{"role": "tool", "content": "x"}]' >"$tmp/notid.json"
    t "a tool message without tool_call_id: exit 1" 1 "$kli" run -m "$model" \
        --messages "$tmp/notid.json" --tools "$tmp/tools.json" -n 5
    grep -q tool_call_id "$tmp/stderr"
    check $? "the message names tool_call_id"
    # after --load-state the prompt continues the conversation as without --tools: an
    # <|im_end|> closes the last answer, no second default system message (an empty tools
    # list declares nothing, so the two prompts are the same tokens, the answers the same)
    "$kli" run -m "$model" -p "Weather?" -n 4 --temp 0 -t 1 --quiet --save-state "$tmp/st" \
        >/dev/null 2>&1
    printf '[]' >"$tmp/none.json"
    "$kli" run -m "$model" -p "And now?" -n 6 --temp 0 -t 1 --load-state "$tmp/st" \
        >"$tmp/plain" 2>"$tmp/plain.err"
    "$kli" run -m "$model" -p "And now?" -n 6 --temp 0 -t 1 --load-state "$tmp/st" \
        --tools "$tmp/none.json" >"$tmp/withtools" 2>"$tmp/withtools.err"
    is "$(grep -o 'prompt [0-9]* tokens' "$tmp/withtools.err")" \
        "$(grep -o 'prompt [0-9]* tokens' "$tmp/plain.err")" \
        "--load-state with --tools: the prompt continues the conversation"
    "$PY" -c 'import json,sys; o=json.load(open(sys.argv[1]))
assert o["content"] == open(sys.argv[2]).read().rstrip("\n"), o' "$tmp/withtools" "$tmp/plain"
    check $? "--load-state with --tools: the answer is the one without"
    t "--tool-choice without --tools: usage error" 2 "$kli" run -m "$model" -p x \
        --tool-choice none
    printf '{"not": "a list"}' >"$tmp/obj.json"
    t "tools that are no list: exit 1" 1 "$kli" run -m "$model" -p x --tools "$tmp/obj.json"
fi

if tcase special; then
    # a special token pushed by --logit-bias comes out by name with --special, not without
    id=$(printf '<|tool_calls_section_begin|>' | "$kli" tokenize -m "$model" --special)
    "$kli" run -m "$model" --special -p "x" -n 4 --seed 1 -t 1 --quiet --logit-bias "$id:100" \
        >"$tmp/out" 2>"$tmp/err"
    grep -q '<|tool_calls_section_begin|>' "$tmp/out"
    check $? "--special prints a special token by name"
    "$kli" run -m "$model" -p "x" -n 4 --seed 1 -t 1 --quiet --logit-bias "$id:100" \
        >"$tmp/out" 2>"$tmp/err"
    ! grep -q '<|' "$tmp/out"
    check $? "without --special special tokens are dropped"
    printf 'x\n' | "$kli" chat -m "$model" --special -n 4 --seed 1 -t 1 --quiet \
        --logit-bias "$id:100" >"$tmp/out" 2>"$tmp/err"
    grep -q '<|tool_calls_section_begin|>' "$tmp/out"
    check $? "chat --special prints it too"
fi
if tcase batch; then
    tl=$(tr -d '\n' <"$tmp/tools.json")
    : >"$tmp/in.jsonl"
    for i in 1 2 3 4; do
        printf '{"id":"r%d","messages":[{"role":"user","content":"Weather %d?"}],"tools":%s,"tool_choice":"required","max_tokens":60,"temperature":1,"seed":%d}\n' \
            $i $i "$tl" $i >>"$tmp/in.jsonl"
        printf '{"custom_id":"o%d","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"Weather %d?"}],"tools":%s,"tool_choice":{"type":"function","function":{"name":"ping"}},"max_tokens":60,"temperature":1,"seed":%d}}\n' \
            $i $i "$tl" $i >>"$tmp/in.jsonl"
    done
    printf '{"id":"bad","prompt":"x","tools":%s,"tool_choice":"nope"}\n' "$tl" >>"$tmp/in.jsonl"
    printf '{"id":"bad2","prompt":"x","tools":%s,"parallel_tool_calls":"no"}\n' "$tl" \
        >>"$tmp/in.jsonl"
    printf '{"custom_id":"o5","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"Weather?"}],"tools":%s,"tool_choice":"required","parallel_tool_calls":false,"max_tokens":60,"temperature":1,"seed":5}}\n' \
        "$tl" >>"$tmp/in.jsonl"
    # a forced call to a function whose parameters are no schema kli takes: named as tools
    printf '{"id":"badschema","prompt":"x","max_tokens":20,"tools":[{"type":"function","function":{"name":"w","parameters":{"type":"object","properties":{"a":{"type":"weird"}}}}}],"tool_choice":"required"}\n' \
        >>"$tmp/in.jsonl"
    "$kli" batch -m "$model" -i "$tmp/in.jsonl" -o "$tmp/out.jsonl" -P 3 -t 1 --quiet \
        2>"$tmp/err"
    "$PY" - "$tmp/out.jsonl" >"$tmp/calls" 2>"$tmp/err" <<'EOF2'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1], encoding='utf-8')]
assert len(lines) == 12, len(lines)
for o in lines:
    if o.get('id') == 'bad':
        assert 'tool_choice' in o['error'], o
        continue
    if o.get('id') == 'bad2':
        assert 'parallel_tool_calls' in o['error'], o
        continue
    if o.get('id') == 'badschema':
        assert o['error'].startswith('"tools": ') and 'response_format' not in o['error'], o
        continue
    if 'custom_id' in o:
        c = o['response']['body']['choices'][0]
        msg = {"content": c['message']['content'], "tool_calls": c['message']['tool_calls'],
               "finish_reason": c['finish_reason']}
        name = 'any' if o['custom_id'] == 'o5' else 'ping'
        assert o['custom_id'] != 'o5' or len(msg['tool_calls']) == 1, o
    else:
        msg = {"content": o['text'], "tool_calls": o['tool_calls'],
               "finish_reason": o['finish_reason']}
        name = 'any'
    print(name + ' ' + json.dumps(msg))
EOF2
    rc=$?
    [ $rc = 0 ] || sed 's/^/# /' "$tmp/err" | tail -3
    check $rc "batch: 12 lines, tool_calls in kli's records and OpenAI bodies, the bad ones named"
    bad=0
    while read -r name msg; do
        printf '%s\n' "$msg" >"$tmp/one"
        [ "$name" = any ] && name=""
        check_call "$tmp/one" "$name" 2>>"$tmp/err" || bad=1
    done <"$tmp/calls"
    [ $bad = 0 ] || sed 's/^/# /' "$tmp/err" | head -3
    check $bad "batch: every call validates (required, and ping named)"
    # parallel_tool_calls false in batch records: as serve's case says
    ids=$(printf '<|tool_calls_section_begin|><|tool_call_begin|><|tool_call_argument_begin|><|tool_call_end|><|tool_calls_section_end|>' |
        "$kli" tokenize -m "$model" --special)
    "$PY" - "$tl" $ids >"$tmp/one.jsonl" <<'EOF2'
import json, sys
tools, ids = json.loads(sys.argv[1]), sys.argv[2:7]
for seed in range(1, 9):
    for par in (True, False):
        r = {'id': '%d-%s' % (seed, par), 'tools': tools, 'max_tokens': 60,
             'messages': [{'role': 'user', 'content': 'Weather?'}], 'temperature': 1,
             'seed': seed, 'logprobs': True, 'parallel_tool_calls': par}
        if seed % 2:
            r['tool_choice'] = 'required'
        else:
            r['logit_bias'] = {i: 30 for i in ids}
        print(json.dumps(r))
EOF2
    "$kli" batch -m "$model" -i "$tmp/one.jsonl" -o "$tmp/one.out.jsonl" -P 4 -t 1 --quiet \
        2>"$tmp/err"
    "$PY" - "$tmp/one.out.jsonl" >"$tmp/one.out" 2>&1 <<'EOF2'
import json, os, sys
sys.path.insert(0, os.environ['ONECALL_DIR'])
from first_call import first_call_end, names
recs = {}
for l in open(sys.argv[1], encoding='utf-8'):
    o = json.loads(l)
    recs[o['id']] = o


cut = 0
for seed in range(1, 9):
    a, o = recs['%d-True' % seed], recs['%d-False' % seed]
    all_ = [t['token'] for t in a['logprobs']['content']]
    one = [t['token'] for t in o['logprobs']['content']]
    want = first_call_end(all_)
    assert one == all_[:len(one)] and o['completion_tokens'] == len(one), (seed, one, all_)
    if want is None:
        assert one == all_, (seed, one, all_)
    else:
        cut += want < len(all_)
        assert len(one) == want and o['finish_reason'] != 'length', (seed, o, want)
        assert len(o.get('tool_calls') or []) <= 1, o
    if seed % 2:   # forced: the grammar's one call, unchanged
        assert one == all_ and o['tool_calls'] == a['tool_calls'], (o, a)
print('%d of 8 answers ended early' % cut)
EOF2
    check $? "batch: parallel_tool_calls false cuts only after a well-formed first call"
    sed 's/^/# /' "$tmp/one.out" | tail -3
fi

if tcase serve; then
    if ! command -v curl >/dev/null 2>&1 || "$kli" serve --help 2>&1 | grep -q "built without"
    then
        ok "serve # SKIP curl and a kli with the HTTP server are needed"
    else
        "$kli" serve -m "$model" --port 0 -t 1 2>"$tmp/serve.err" &
        spid=$!
        trap 'kill -9 $spid 2>/dev/null; rm -rf "$tmp"' EXIT
        poll 1200 grep -qs 'http://' "$tmp/serve.err"
        port=$(sed -n 's|.*http://[^ ]*:\([0-9]*\)/ .*|\1|p' "$tmp/serve.err")
        tl=$(tr -d '\n' <"$tmp/tools.json")
        sec=$(printf '<|tool_calls_section_begin|>' | "$kli" tokenize -m "$model" --special)
        for mode in whole stream; do
            st=false
            [ $mode = stream ] && st=true
            bad=0
            for seed in 1 2 3; do
                printf '{"messages":[{"role":"user","content":"Weather?"}],"tools":%s,
"tool_choice":"required","max_tokens":60,"temperature":1,"seed":%d,"stream":%s}' \
                    "$tl" $seed $st >"$tmp/body.json"
                curl -s -N -o "$tmp/ans" -H 'Content-Type: application/json' \
                    --data-binary @"$tmp/body.json" "http://127.0.0.1:$port/v1/chat/completions"
                "$PY" - "$tmp/ans" $mode >"$tmp/out" 2>"$tmp/err" <<'EOF2' || bad=1
import json, sys
raw = open(sys.argv[1], encoding='utf-8').read()
if sys.argv[2] == 'whole':
    c = json.loads(raw)['choices'][0]
    msg = {"content": c['message']['content'], "tool_calls": c['message'].get('tool_calls'),
           "finish_reason": c['finish_reason']}
else:
    calls, content, fin = [], '', None
    for e in raw.split('\n\n'):
        if not e.startswith('data: ') or e == 'data: [DONE]':
            continue
        for ch in json.loads(e[6:])['choices']:
            d = ch['delta']
            content += d.get('content') or ''
            for tc in d.get('tool_calls', []):
                assert tc['index'] == len(calls), tc
                calls.append({k: v for k, v in tc.items() if k != 'index'})
            fin = ch['finish_reason'] or fin
    msg = {"content": content or None, "tool_calls": calls, "finish_reason": fin}
print(json.dumps(msg))
EOF2
                check_call "$tmp/out" "" 2>>"$tmp/err" || bad=1
                [ $bad = 0 ] || sed 's/^/# /' "$tmp/err" | head -3
            done
            check $bad "serve, $mode: tool_choice required gives valid calls"
        done
        # auto, greedy: the stream's content is the whole answer's, a marker held back
        for st in false true; do
            printf '{"messages":[{"role":"user","content":"Weather?"}],"tools":%s,
"max_tokens":30,"temperature":0,"stream":%s,"logit_bias":{"%s":4}}' "$tl" $st "$sec" \
                >"$tmp/body.json"
            curl -s -N -o "$tmp/auto.$st" -H 'Content-Type: application/json' \
                --data-binary @"$tmp/body.json" "http://127.0.0.1:$port/v1/chat/completions"
        done
        "$PY" - "$tmp/auto.false" "$tmp/auto.true" >"$tmp/err" 2>&1 <<'EOF2'
import json, sys
w = json.load(open(sys.argv[1], encoding='utf-8'))['choices'][0]
content, fin = '', None
for e in open(sys.argv[2], encoding='utf-8').read().split('\n\n'):
    if e.startswith('data: {'):
        for ch in json.loads(e[6:])['choices']:
            content += ch['delta'].get('content') or ''
            assert 'tool_calls' not in ch['delta'] or w['finish_reason'] == 'tool_calls'
            fin = ch['finish_reason'] or fin
assert (w['message']['content'] or '') == content, (w, content)
assert w['finish_reason'] == fin, (w, fin)
EOF2
        check $? "serve, auto: the stream's content and finish agree with the whole answer"
        [ -s "$tmp/err" ] && sed 's/^/# /' "$tmp/err" | head -3
        # a conversation with a call and its result is accepted; an unknown name is a 400
        printf '{"messages":[{"role":"user","content":"Weather?"},{"role":"assistant",
"content":null,"tool_calls":[{"id":"functions.ping:0","type":"function","function":
{"name":"ping","arguments":"{\\"n\\":true}"}}]},{"role":"tool","tool_call_id":
"functions.ping:0","content":"pong"}],"tools":%s,"max_tokens":5}' "$tl" >"$tmp/body.json"
        code=$(curl -s -o "$tmp/ans" -w '%{http_code}' -H 'Content-Type: application/json' \
            --data-binary @"$tmp/body.json" "http://127.0.0.1:$port/v1/chat/completions")
        [ "$code" = 200 ]
        check $? "serve: a conversation with a tool call and its result (got $code)"
        printf '{"messages":[{"role":"user","content":"x"}],"tools":%s,"tool_choice":
{"type":"function","function":{"name":"nope"}}}' "$tl" >"$tmp/body.json"
        code=$(curl -s -o "$tmp/ans" -w '%{http_code}' -H 'Content-Type: application/json' \
            --data-binary @"$tmp/body.json" "http://127.0.0.1:$port/v1/chat/completions")
        [ "$code" = 400 ] && grep -q '"param":"tool_choice"' "$tmp/ans" && grep -q nope "$tmp/ans"
        check $? "serve: an undeclared function in tool_choice is a 400 naming it"
        # a forced call's errors name the fields the request has, not response_format
        printf '{"messages":[{"role":"user","content":"x"}],"max_tokens":20,"tools":[{"type":
"function","function":{"name":"w","parameters":{"type":"object","properties":{"a":{"type":
"weird"}}}}}],"tool_choice":"required"}' >"$tmp/body.json"
        code=$(curl -s -o "$tmp/ans" -w '%{http_code}' -H 'Content-Type: application/json' \
            --data-binary @"$tmp/body.json" "http://127.0.0.1:$port/v1/chat/completions")
        [ "$code" = 400 ] && grep -q '"param":"tools"' "$tmp/ans" &&
            ! grep -q response_format "$tmp/ans"
        check $? "serve: a forced call's bad parameters schema is a 400 naming tools"
        printf '{"messages":[{"role":"user","content":"x"}],"max_tokens":3,"tools":%s,
"tool_choice":"required"}' "$tl" >"$tmp/body.json"
        code=$(curl -s -o "$tmp/ans" -w '%{http_code}' -H 'Content-Type: application/json' \
            --data-binary @"$tmp/body.json" "http://127.0.0.1:$port/v1/chat/completions")
        [ "$code" = 400 ] && grep -q '"param":"max_tokens"' "$tmp/ans" &&
            grep -q tool_choice "$tmp/ans" && ! grep -q response_format "$tmp/ans"
        check $? "serve: too small a max_tokens for a forced call: a 400 naming tool_choice"
        # parallel_tool_calls false ends the answer at the end of its first call where that
        # call is well formed (test-toolcall checks which are): each seed's answer is the
        # answer of the same request with parallel calls allowed, token for token, cut
        # there if at all. Odd seeds: tool_choice required (the grammar's single call,
        # unchanged); even seeds: the markers' logits raised, so they come in any order
        # (a malformed section is not cut: the parser reads it whole)
        ids=$(printf '<|tool_calls_section_begin|><|tool_call_begin|><|tool_call_argument_begin|><|tool_call_end|><|tool_calls_section_end|>' |
            "$kli" tokenize -m "$model" --special)
        "$PY" - "$port" "$tl" $ids >"$tmp/one.out" 2>&1 <<'EOF2'
import http.client, json, os, sys
sys.path.insert(0, os.environ['ONECALL_DIR'])
from first_call import first_call_end, names
port, tools, ids = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3:8]

def ask(seed, par):
    body = {'messages': [{'role': 'user', 'content': 'Weather?'}], 'tools': tools,
            'max_tokens': 60, 'temperature': 1, 'seed': seed, 'logprobs': True,
            'parallel_tool_calls': par}
    if seed % 2:
        body['tool_choice'] = 'required'
    else:
        body['logit_bias'] = {i: 30 for i in ids}
    c = http.client.HTTPConnection('127.0.0.1', port, timeout=300)
    c.request('POST', '/v1/chat/completions', json.dumps(body),
              {'Content-Type': 'application/json'})
    r = c.getresponse()
    o = json.loads(r.read())
    assert r.status == 200, o
    ch = o['choices'][0]
    return [t['token'] for t in ch['logprobs']['content']], ch, o['usage']['completion_tokens']


cut = 0
for seed in range(1, 9):
    all_, cha, n_all = ask(seed, True)
    one, ch, n_one = ask(seed, False)
    want = first_call_end(all_)
    assert one == all_[:len(one)], (seed, one, all_)
    assert n_one == len(one), (seed, n_one, len(one))
    if want is None:
        assert one == all_, (seed, one, all_)
    else:
        cut += want < len(all_)
        assert len(one) == want, (seed, len(one), want, all_)
        assert ch['finish_reason'] != 'length', ch
        assert len(ch['message'].get('tool_calls') or []) <= 1, ch
    if seed % 2:   # forced: the grammar's one call, unchanged
        assert one == all_ and ch['message']['tool_calls'] == cha['message']['tool_calls'], ch
print('%d of 8 answers ended early' % cut)
EOF2
        check $? "serve: parallel_tool_calls false cuts only after a well-formed first call"
        sed 's/^/# /' "$tmp/one.out" | tail -3
        kill $spid 2>/dev/null
        wait $spid 2>/dev/null
    fi
fi
tdone
