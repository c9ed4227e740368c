#!/bin/sh
# json-cli.sh - --json, --json-schema and batch's response_format through the CLI (TAP), on
# the tiny model, whose random weights try every kind of token: each answer must parse and
# validate under the schema (checked by a small validator of the subset written below in
# Python, from the schema alone), and every refusal must name the keyword or the field.
#
# The JSON checks need python3; without it the test is skipped.
set -u
: "${KLI_BIN:?}" "${KLI_TESTDATA:?}" "${KLI_SRCDIR:?}"
. "$KLI_SRCDIR/tests/lib.sh"
need_python json "python3 is needed to check the JSON output"
py=$PY

cat >"$tmp/validate.py" <<'EOF2'
import json, re, sys

def chars(s):
    return len(s)

def ok(root, s, v):
    if s is True or s == {}:
        return True
    if '$ref' in s:
        t = root
        for p in s['$ref'][2:].split('/') if s['$ref'] != '#' else []:
            t = t[p]
        return ok(root, t, v)
    if 'anyOf' in s:
        return any(ok(root, b, v) for b in s['anyOf'])
    if 'oneOf' in s:
        return sum(ok(root, b, v) for b in s['oneOf']) == 1
    types = s.get('type')
    if types is not None:
        types = [types] if isinstance(types, str) else types
        def is_t(t):
            if t == 'object': return isinstance(v, dict)
            if t == 'array': return isinstance(v, list)
            if t == 'string': return isinstance(v, str)
            if t == 'boolean': return isinstance(v, bool)
            if t == 'null': return v is None
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            if t == 'integer': return num and float(v).is_integer()
            return num
        if not any(is_t(t) for t in types):
            return False
    if 'const' in s and v != s['const']:
        return False
    if 'enum' in s and v not in s['enum']:
        return False
    if isinstance(v, str) and 'pattern' in s and not re.search(s['pattern'], v):
        return False
    if isinstance(v, str):
        if chars(v) < s.get('minLength', 0) or chars(v) > s.get('maxLength', 1 << 30):
            return False
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if 'minimum' in s and v < s['minimum']: return False
        if 'maximum' in s and v > s['maximum']: return False
        if 'exclusiveMinimum' in s and v <= s['exclusiveMinimum']: return False
        if 'exclusiveMaximum' in s and v >= s['exclusiveMaximum']: return False
    if isinstance(v, list):
        if len(v) < s.get('minItems', 0) or len(v) > s.get('maxItems', 1 << 30):
            return False
        if 'items' in s and not all(ok(root, s['items'], x) for x in v):
            return False
    if isinstance(v, dict):
        props = s.get('properties', {})
        add = s.get('additionalProperties', True)
        if any(r not in v for r in s.get('required', [])):
            return False
        for k, x in v.items():
            sub = props.get(k, add)
            if sub is False or (isinstance(sub, dict) and not ok(root, sub, x)):
                return False
    return True

def check(schema, text, what):
    try:
        v = json.loads(text)
    except ValueError as e:
        sys.exit('%s: %r does not parse: %s' % (what, text, e))
    if not ok(schema, schema, v):
        sys.exit('%s: %r is not valid' % (what, text))
EOF2

cat >"$tmp/person.json" <<'EOF2'
{"$defs": {"tag": {"enum": ["red", "green", 7, null]}},
 "type": "object",
 "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 10},
                "age": {"type": "integer", "minimum": 18, "maximum": 99},
                "score": {"type": "number", "exclusiveMinimum": -1, "maximum": 1},
                "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 3},
                "kind": {"anyOf": [{"const": "a"}, {"type": "boolean"}]},
                "code": {"type": "string", "pattern": "^[a-z]{2}(-[0-9]{1,3})?$"}},
 "required": ["name", "age", "kind"], "additionalProperties": false}
EOF2

# ---- run --json-schema, run --json: whatever the seed, the answer validates ---------------
if tcase run; then
    for seed in 1 2 3 4; do
        "$kli" run -m "$model" -p "Describe a person" --json-schema "$tmp/person.json" -n 80 \
            --temp 1.5 --top-p 1 --seed $seed -t 1 --quiet >"$tmp/out.$seed" 2>"$tmp/err"
        rc=$?
        "$py" -c "
import sys; sys.path.insert(0, '$tmp'); import validate, json
validate.check(json.load(open('$tmp/person.json')), open('$tmp/out.$seed').read(), 'run')" \
            >"$tmp/check" 2>&1
        if [ $rc -eq 0 ] && [ ! -s "$tmp/check" ]; then
            ok "run --json-schema, seed $seed: the answer validates"
        else
            notok "run --json-schema, seed $seed: exit $rc"
            sed 's/^/# /' "$tmp/err" "$tmp/check" | head -5
        fi
    done
    "$kli" run -m "$model" -p "Anything" --json -n 40 --temp 1 --seed 9 -t 1 --quiet \
        >"$tmp/any" 2>"$tmp/err"
    rc=$?
    "$py" -c "import json,sys; v=json.load(open('$tmp/any')); sys.exit(not isinstance(v, dict))"
    check $((rc + $?)) "run --json: a JSON object, also when -n 40 runs out"
    # tight: the shortest value, {"name":"x","age":18,"kind":"a"}, is 32 bytes; -n 32 does
    "$kli" run -m "$model" -p "x" --json-schema "$tmp/person.json" -n 32 --seed 2 -t 1 \
        --quiet >"$tmp/tight" 2>"$tmp/err"
    rc=$?
    "$py" -c "
import sys; sys.path.insert(0, '$tmp'); import validate, json
validate.check(json.load(open('$tmp/person.json')), open('$tmp/tight').read(), 'tight')"
    check $((rc + $?)) "run --json-schema -n 32 (the shortest value's length): validates"
fi

# ---- refusals ---------------------------------------------------------------------------
if tcase refuse; then
    t "--json and --json-schema together: usage error" 2 \
        "$kli" run -m "$model" -p x --json --json-schema "$tmp/person.json"
    echo '{"type": "object", "properties": {"d": {"type": "string", "format": "date"}}}' \
        >"$tmp/fmt.json"
    t "an unsupported keyword: exit 1" 1 "$kli" run -m "$model" -p x --json-schema "$tmp/fmt.json"
    grep -q 'keyword "format" at /properties/d is not supported' "$tmp/stderr"
    check $? "the message names the keyword and its place"
    echo '{"type": "object",' >"$tmp/broken.json"
    t "a schema that is not JSON: exit 1" 1 \
        "$kli" run -m "$model" -p x --json-schema "$tmp/broken.json"
    grep -q "broken.json: schema: not valid JSON" "$tmp/stderr"
    check $? "the message names the file"
    t "-n below the shortest value: exit 1" 1 \
        "$kli" run -m "$model" -p x --json-schema "$tmp/person.json" -n 31
    grep -q "max_tokens 31 is below the 32 tokens" "$tmp/stderr"
    check $? "the message gives both counts"
    t "--json with -n 0: usage error" 2 "$kli" run -m "$model" -p x --json -n 0
fi

# ---- chat --json: every answer is an object ----------------------------------------------
if tcase chat; then
    printf 'first\nsecond\n' | "$kli" chat -m "$model" --json -n 30 --seed 4 -t 1 --quiet \
        >"$tmp/chat" 2>"$tmp/err"
    rc=$?
    "$py" -c "
import json, sys
lines = [l for l in open('$tmp/chat').read().split('\n') if l]
sys.exit(len(lines) != 2 or not all(isinstance(json.loads(l), dict) for l in lines))"
    check $((rc + $?)) "chat --json: two turns, two JSON objects"
fi

# ---- batch: response_format per record, --json-schema as the default ----------------------
if tcase batch; then
    sch=$(tr -d '\n' <"$tmp/person.json")
    cat >"$tmp/in.jsonl" <<EOF2
{"id": "s1", "prompt": "one", "max_tokens": 80, "seed": 1, "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": $sch}}}
{"id": "s2", "prompt": "two", "max_tokens": 80, "seed": 2, "response_format": {"type": "json_schema", "json_schema": {"name": "p", "strict": true, "schema": $sch}}}
{"id": "o1", "prompt": "three", "max_tokens": 30, "response_format": {"type": "json_object"}}
{"id": "d1", "prompt": "four", "max_tokens": 40}
{"id": "t1", "prompt": "five", "max_tokens": 8, "response_format": {"type": "text"}}
{"id": "e1", "prompt": "six", "response_format": {"type": "regex"}}
{"id": "e2", "prompt": "seven", "response_format": {"type": "json_schema", "json_schema": {"schema": {"allOf": []}}}}
{"id": "e3", "prompt": "eight", "max_tokens": 3, "response_format": {"type": "json_schema", "json_schema": {"schema": $sch}}}
EOF2
    "$kli" batch -m "$model" -i "$tmp/in.jsonl" -o "$tmp/out.jsonl" -P 3 -t 1 --quiet \
        --json-schema "$tmp/person.json" --temp 1.2 --top-p 1 >/dev/null 2>"$tmp/err"
    check $(($? != 3)) "batch with failing records: exit 3"
    "$py" - "$tmp" >"$tmp/check" 2>&1 <<'EOF2'
import json, sys
sys.path.insert(0, sys.argv[1])
import validate
d = sys.argv[1]
person = json.load(open(d + '/person.json'))
rs = {}
for line in open(d + '/out.jsonl', encoding='utf-8'):
    r = json.loads(line)
    rs[r['id']] = r
for k in ('s1', 's2', 'd1'):
    if rs[k]['finish_reason'] == 'error':
        sys.exit('%s: %s' % (k, rs[k]['error']))
    validate.check(person, rs[k]['text'], k)
if not isinstance(json.loads(rs['o1']['text']), dict):
    sys.exit('o1 is no object')
if rs['t1']['finish_reason'] != 'length':
    sys.exit('t1: %r' % rs['t1'])
want = {'e1': '"response_format": type "regex" is not supported',
        'e2': '"response_format": schema: keyword "allOf" at the top level is not supported',
        'e3': 'max_tokens 3 is below'}
for k, w in want.items():
    if rs[k]['finish_reason'] != 'error' or w not in rs[k]['error']:
        sys.exit('%s: %r' % (k, rs[k]))
EOF2
    if [ ! -s "$tmp/check" ]; then
        ok "batch: the schema records validate, the others fail naming the field"
    else
        notok "batch: $(head -c 300 "$tmp/check")"
    fi
    # the output may not be --json-schema's file (--overwrite would empty it)
    cp "$tmp/person.json" "$tmp/p2.json"
    t "batch: -o cannot be --json-schema's file" 1 "$kli" batch -m "$model" \
        -i "$tmp/in.jsonl" -o "$tmp/p2.json" --json-schema "$tmp/p2.json" --overwrite -t 1
    cmp -s "$tmp/person.json" "$tmp/p2.json"
    check $? "... which is left as it was"
fi
tdone
