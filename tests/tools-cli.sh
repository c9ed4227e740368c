#!/bin/sh
# tools-cli.sh - tool calls in Kimi's format through the CLI (TAP): the native rendering of
# conversations with tools (kli tokenize --messages --tools, kli_chat_render_json) against
# the template rendered by jinja2 (tests/chat_template.py, tests/data/kimi-tools.jinja),
# byte for byte and token for token; kli run --tools on the tiny model, whose random
# weights try every kind of token, under tool_choice required and a named function (each
# answer a call to a declared function whose arguments validate against its parameters);
# --special. The golden cases need python3 with jinja2 (python3-jinja2); without it they are
# skipped with a message.
set -u
: "${KLI_BIN:?}" "${KLI_TESTDATA:?}" "${KLI_SRCDIR:?}"
. "$KLI_SRCDIR/tests/lib.sh"
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

# check_call FILE NAME: the answer is a call to NAME (any declared one if empty) with
# arguments of its parameters (the two schemas above, checked by hand)
check_call() {
    python3 - "$1" "$2" <<'EOF2'
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
fi

if tcase auto; then
    "$kli" run -m "$model" -p "Weather?" --tools "$tmp/tools.json" -n 20 --seed 3 -t 1 \
        --quiet >"$tmp/out" 2>"$tmp/err"
    check $? "auto: the random model's answer comes back"
    python3 -c 'import json,sys; o=json.load(open(sys.argv[1])); assert "content" in o' \
        "$tmp/out"
    check $? "auto: a JSON message with its content"
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
fi
tdone
