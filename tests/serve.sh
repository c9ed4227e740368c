#!/bin/sh
# serve.sh - kli serve on the demo model, through curl (TAP): /health, /v1/models, chat and
# completions whole and streamed (the two agreeing, stream_options.include_usage), stop
# strings cut the same in both, seeds repeat, N concurrent streaming clients each get
# exactly the greedy answer the same request gets alone, a client that disconnects
# mid-stream is cancelled and the server goes on, the state of a conversation is reused by
# its next turn (cached_tokens), response_format (json_schema answers validate, whole and
# streamed, on both endpoints; json_object) and logit_bias (-100 on the greedy token changes
# the answer, +100 forces one), malformed and unknown or unsupported fields give a 400
# naming the field, oversized bodies a 413, a full queue a 429 with Retry-After, the API
# key, /tokenize and /detokenize, /metrics, the log (one line per request, reopened on
# SIGHUP) and SIGTERM's exit status 0.
#
# KLI_SERVE_CLIENTS sets the number of concurrent clients (16; tests/serve-slow.sh runs
# 64). Skipped without curl or python3, or when kli was built without libmicrohttpd.
set -u
: "${KLI_BIN:?}" "${KLI_TESTDATA:?}" "${KLI_SRCDIR:?}"
. "$KLI_SRCDIR/tests/lib.sh"
need_python json "python3 is needed to check the JSON answers"
py=$PY
if ! command -v curl >/dev/null 2>&1; then
    echo "1..0 # SKIP curl is needed"
    exit 0
fi
if "$kli" serve --help 2>&1 | grep -q "built without"; then
    echo "1..0 # SKIP kli was built without the HTTP server (libmicrohttpd)"
    exit 0
fi
clients=${KLI_SERVE_CLIENTS:-16}
pids=""
trap 'for p in $pids; do kill -9 "$p" 2>/dev/null; done; rm -rf "$tmp"' EXIT

cat >"$tmp/check.py" <<'EOF'
import json, socket, sys

def sse(path):
    """The text, finish reason and usage of a stream; checks its form."""
    raw = open(path, 'rb').read().decode('utf-8')
    events = [e for e in raw.split('\n\n') if e.strip()]
    if not events or events[-1] != 'data: [DONE]':
        sys.exit('%s: the stream does not end with data: [DONE]' % path)
    text, finish, usage, ids = '', None, None, set()
    for e in events[:-1]:
        if not e.startswith('data: '):
            sys.exit('%s: not an SSE data event: %r' % (path, e[:80]))
        o = json.loads(e[6:])
        if 'error' in o:
            sys.exit('%s: error event %r' % (path, o))
        ids.add(o['id'])
        if o.get('usage'):
            usage = o['usage']
        for c in o['choices']:
            if finish is not None:
                sys.exit('%s: a chunk after the finish_reason' % path)
            d = c.get('delta', c)
            text += d.get('content', d.get('text', '')) or ''
            finish = c['finish_reason']
    if len(ids) != 1:
        sys.exit('%s: chunks of %d ids' % (path, len(ids)))
    return {'text': text, 'finish': finish, 'usage': usage}

def whole(path):
    o = json.load(open(path, 'rb'))
    c = o['choices'][0]
    text = c['message']['content'] if 'message' in c else c['text']
    return {'text': text, 'finish': c['finish_reason'], 'usage': o['usage']}

cmd, a = sys.argv[1], sys.argv[2:]
if cmd == 'agree':        # WHOLE STREAM: the same text, finish and usage
    w, s = whole(a[0]), sse(a[1])
    if s['usage'] is None:
        s['usage'] = w['usage']
    # what was reused depends on the requests before (the second may start from the
    # state the first left at the end of the same prompt): at most the prompt
    for u in (w['usage'], s['usage']):
        d = u.pop('prompt_tokens_details', None) or {}
        if not 0 <= d.get('cached_tokens', 0) <= u['prompt_tokens']:
            sys.exit('cached_tokens out of range: %r' % d)
    if w != s:
        sys.exit('whole %r\nstream %r' % (w, s))
    if not w['text']:
        sys.exit('an empty answer')
elif cmd == 'text':       # FILE: prints the text of a whole answer
    sys.stdout.write(whole(a[0])['text'])
elif cmd == 'stext':      # FILE: prints the text of a stream
    sys.stdout.write(sse(a[0])['text'])
elif cmd == 'field':      # FILE KEY...: prints a field of a JSON answer
    o = json.load(open(a[0], 'rb'))
    for k in a[1:]:
        o = o[int(k)] if isinstance(o, list) else o[k]
    print(o)
elif cmd == 'error':      # FILE PARAM: an OpenAI error object naming PARAM (- for none)
    o = json.load(open(a[0], 'rb'))['error']
    if not o['message'] or o['type'] is None:
        sys.exit('incomplete error %r' % o)
    if o['param'] != (None if a[1] == '-' else a[1]):
        sys.exit('param %r, want %r' % (o['param'], a[1]))
elif cmd == 'stop':       # WHOLE: prints a stop string taken from the middle of the answer
    t = whole(a[0])['text']
    words = t.split(' ')
    if len(words) < 4:
        sys.exit('too short an answer: %r' % t)
    print(' ' + words[len(words) // 2])
elif cmd == 'cut':        # WHOLE-NOSTOP WHOLE-STOP STOP: the answer cut before STOP
    full, cut = whole(a[0])['text'], whole(a[1])
    want = full[:full.index(a[2])]
    if cut['text'] != want or cut['finish'] != 'stop':
        sys.exit('%r (%s), want %r' % (cut['text'], cut['finish'], want))
elif cmd == 'hangup':     # PORT BODY: reads the first events of a stream, then hangs up
    s = socket.create_connection(('127.0.0.1', int(a[0])))
    body = a[1].encode()
    s.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: '
              b'application/json\r\nContent-Length: %d\r\n\r\n' % len(body) + body)
    got = b''
    while got.count(b'data: ') < 3:
        d = s.recv(4096)
        if not d:
            sys.exit('the stream ended early: %r' % got[-200:])
        got += d
    s.close()
elif cmd == 'person':     # FILE|-s FILE: the text is a JSON object of the schema $person
    t = sse(a[1])['text'] if a[0] == '-s' else whole(a[0])['text']
    o = json.loads(t)
    if (not isinstance(o, dict) or sorted(o) != ['age', 'name'] or
            not isinstance(o['name'], str) or len(o['name']) > 8 or
            type(o['age']) is not int or not 0 <= o['age'] <= 120):
        sys.exit('not a person: %r' % t)
elif cmd == 'object':     # FILE: the text is a JSON object
    t = whole(a[0])['text']
    if not isinstance(json.loads(t), dict):
        sys.exit('not an object: %r' % t)
elif cmd == 'metric':     # FILE NAME: prints a metric's value
    for l in open(a[0]):
        if l.startswith(a[1] + ' '):
            print(l.split()[1])
EOF

# start NAME ARGS...: starts a server on a free port, waits until it listens; $port, $pid
start() {
    _name=$1
    shift
    "$kli" serve --port 0 "$@" 2>"$tmp/$_name.err" &
    pid=$!
    pids="$pids $pid"
    poll 1200 grep -qs 'http://' "$tmp/$_name.err"
    port=$(sed -n 's|.*http://[^ ]*:\([0-9]*\)/ .*|\1|p' "$tmp/$_name.err")
    if [ -z "$port" ]; then
        notok "$_name: the server did not start"
        sed 's/^/# /' "$tmp/$_name.err" | head -5
        port=1
    fi
}
# post PATH BODY OUT [CURL-ARGS]: the HTTP status to stdout, the body to OUT
post() {
    _path=$1 _body=$2 _out=$3
    shift 3
    printf '%s' "$_body" >"$tmp/body.json"
    curl -s -N -o "$_out" -w '%{http_code}' -H 'Content-Type: application/json' \
        --data-binary @"$tmp/body.json" "$@" "http://127.0.0.1:$port$_path"
}

chat() {   # chat CONTENT [MORE-FIELDS]: a greedy chat body
    printf '{"model":"m","messages":[{"role":"user","content":"%s"}],"temperature":0%s}' \
        "$1" "${2:-}"
}

# a request that runs for seconds: greedy, the demo model repeats this to max_tokens
# Requests that run for seconds on any machine: 8000 tokens, with the demo model's end tokens
# ([EOS] 2049, <|im_end|> 2050) banned (without that the answer ends after 328 tokens, in
# 0.2 s on an idle machine, before the tests that need it running are done).
long='{"prompt":"the the the the the the the the","temperature":0,"max_tokens":8000,
"logit_bias":{"2049":-100,"2050":-100}}'
long_stream='{"prompt":"the the the the the the the the","temperature":0,"max_tokens":8000,
"logit_bias":{"2049":-100,"2050":-100},"stream":true}'

start main --log "$tmp/serve.log" -P 8 --max-body 64K --min-prefix 8
main=$pid

if tcase health; then
    is "$(curl -s -o "$tmp/h" -w '%{http_code}' "http://127.0.0.1:$port/health")" 200 \
        "/health answers 200"
    is "$(cat "$tmp/h")" '{"status":"ok"}' "/health says ok"
    curl -s "http://127.0.0.1:$port/v1/models" >"$tmp/models"
    c "/v1/models lists the model" field "$tmp/models" data 0 id
    is "$(cat "$tmp/check.out")" kli-demo "the model's id is kli-demo"
fi

if tcase chat; then
    is "$(post /v1/chat/completions "$(chat 'Hello there' ',"max_tokens":12')" "$tmp/w1")" 200 \
        "chat: 200"
    is "$(post /v1/chat/completions "$(chat 'Hello there' \
        ',"max_tokens":12,"stream":true,"stream_options":{"include_usage":true}')" "$tmp/s1")" \
        200 "chat streamed: 200"
    c "chat: the streamed answer is the whole one (text, finish, usage)" agree "$tmp/w1" "$tmp/s1"
    # text parts and a system turn
    is "$(post /v1/chat/completions '{"messages":[{"role":"system","content":"Be brief."},
        {"role":"user","content":[{"type":"text","text":"Hello "},{"type":"text",
        "text":"there"}]}],"temperature":0,"max_completion_tokens":8}' "$tmp/w2")" 200 \
        "chat: text parts and a system turn"
fi

if tcase completions; then
    body='{"model":"m","prompt":"Once upon a time","temperature":0,"max_tokens":16'
    is "$(post /v1/completions "$body}" "$tmp/cw")" 200 "completions: 200"
    is "$(post /v1/completions "$body,\"stream\":true}" "$tmp/cs")" 200 \
        "completions streamed: 200"
    c "completions: streamed and whole agree" agree "$tmp/cw" "$tmp/cs"
    c "completions: max_tokens 16 ends with length" field "$tmp/cw" choices 0 finish_reason
    is "$(cat "$tmp/check.out")" length "completions: finish_reason length"
fi

if tcase stop; then
    post /v1/chat/completions "$(chat 'Tell me a story' ',"max_tokens":40')" "$tmp/nostop" \
        >/dev/null
    if "$py" "$tmp/check.py" stop "$tmp/nostop" >"$tmp/stopstr" 2>&1; then
        stop=$(cat "$tmp/stopstr")
        b=$(chat 'Tell me a story' ",\"max_tokens\":40,\"stop\":[\"$stop\"]")
        post /v1/chat/completions "$b" "$tmp/stopw" >/dev/null
        c "stop: the answer ends before the stop string" cut "$tmp/nostop" "$tmp/stopw" "$stop"
        b=$(chat 'Tell me a story' ",\"max_tokens\":40,\"stop\":\"$stop\",\"stream\":true")
        post /v1/chat/completions "$b" "$tmp/stops" >/dev/null
        c "stop: streamed, no byte of the stop string goes out" agree "$tmp/stopw" \
            "$tmp/stops"
    else
        notok "stop: $(cat "$tmp/stopstr")"
    fi
fi

if tcase seed; then
    b=$(chat 'Hello' ',"temperature":1.0,"seed":1234,"max_tokens":16' | sed 's/"temperature":0,//')
    post /v1/chat/completions "$b" "$tmp/seed1" >/dev/null
    post /v1/chat/completions "$b" "$tmp/seed2" >/dev/null
    "$py" "$tmp/check.py" text "$tmp/seed1" >"$tmp/t1"
    "$py" "$tmp/check.py" text "$tmp/seed2" >"$tmp/t2"
    if [ -s "$tmp/t1" ] && cmp -s "$tmp/t1" "$tmp/t2"; then ok "seed: the same seed, the same answer"
    else notok "seed: the same seed, different answers"; fi
fi

if tcase concurrent; then
    # the answers alone, one after another; then all at once, streamed
    i=0
    while [ $i -lt "$clients" ]; do
        post /v1/chat/completions "$(chat "Question number $i: what is $i plus $i?" \
            ',"max_tokens":12')" "$tmp/alone$i" >/dev/null
        "$py" "$tmp/check.py" text "$tmp/alone$i" >"$tmp/alone$i.txt"
        i=$((i + 1))
    done
    i=0
    cpids=""
    while [ $i -lt "$clients" ]; do
        printf '%s' "$(chat "Question number $i: what is $i plus $i?" \
            ',"max_tokens":12,"stream":true')" >"$tmp/cbody$i"
        curl -s -N -o "$tmp/many$i" -H 'Content-Type: application/json' \
            --data-binary @"$tmp/cbody$i" "http://127.0.0.1:$port/v1/chat/completions" &
        cpids="$cpids $!"
        i=$((i + 1))
    done
    for p in $cpids; do wait "$p"; done
    i=0
    bad=0
    while [ $i -lt "$clients" ]; do
        if ! "$py" "$tmp/check.py" stext "$tmp/many$i" >"$tmp/many$i.txt" 2>"$tmp/many.err" ||
            ! cmp -s "$tmp/alone$i.txt" "$tmp/many$i.txt"; then
            bad=$((bad + 1))
            echo "# client $i: $(cat "$tmp/many.err") '$(cat "$tmp/many$i.txt")' vs" \
                "'$(cat "$tmp/alone$i.txt")'"
        fi
        i=$((i + 1))
    done
    is $bad 0 "$clients concurrent streams: each is its answer alone"
fi

if tcase disconnect; then
    post /v1/chat/completions "$(chat 'Hello there' ',"max_tokens":12')" "$tmp/before" >/dev/null
    c "disconnect: a client hangs up after its first events" hangup "$port" "$long_stream"
    poll 400 grep -q 'finish=cancelled' "$tmp/serve.log"
    if grep -q 'finish=cancelled' "$tmp/serve.log"; then ok "disconnect: the request is cancelled"
    else notok "disconnect: the request is not cancelled"; tail -3 "$tmp/serve.log" | sed 's/^/# /'
    fi
    # a client of a whole answer that gives up waiting
    printf '%s' "$long" >"$tmp/long.json"
    curl -s -m 1 -o /dev/null --data-binary @"$tmp/long.json" \
        "http://127.0.0.1:$port/v1/completions"
    poll 400 test "$(grep -c ' 499 .*finish=cancelled' "$tmp/serve.log")" -ge 2
    is "$(grep -c ' 499 .*finish=cancelled' "$tmp/serve.log")" 2 \
        "disconnect: a client of a whole answer that gives up, cancelled too (499)"
    is "$(post /v1/chat/completions "$(chat 'Hello there' ',"max_tokens":12')" "$tmp/after")" \
        200 "disconnect: the server goes on"
    "$py" "$tmp/check.py" text "$tmp/before" >"$tmp/t1"
    "$py" "$tmp/check.py" text "$tmp/after" >"$tmp/t3"
    if [ -s "$tmp/t1" ] && cmp -s "$tmp/t1" "$tmp/t3"; then
        ok "disconnect: later answers are unchanged"
    else notok "disconnect: later answers changed"; fi
fi

if tcase errors; then
    is "$(post /v1/chat/completions '{"messages":[' "$tmp/e")" 400 "malformed JSON: 400"
    c "malformed JSON: an error object" error "$tmp/e" -
    is "$(post /v1/chat/completions "$(chat hi ',"frobnicate":1')" "$tmp/e")" 400 \
        "an unknown field: 400"
    c "an unknown field: named" error "$tmp/e" frobnicate
    for f in '"tools":{}' '"n":17' '"n":0' '"logprobs":"yes"' '"top_logprobs":21' '"top_logprobs":2' \
             '"logit_bias":{"x":1}' '"logit_bias":{" 5":1}' '"logit_bias":{"+5":1}' \
             '"logit_bias":{"05":1}' '"logit_bias":{"5":60,"5":60}' '"parallel_tool_calls":"no"' \
             '"logit_bias":{"99999999":1}' '"logit_bias":{"5":101}' '"logit_bias":[]' \
             '"response_format":{"type":"regex"}' '"response_format":{"type":"json_schema"}' \
             '"response_format":{"type":"json_schema","json_schema":{"schema":{"allOf":[]}}}'; do
        name=$(printf '%s' "$f" | sed 's/^"\([a-z_]*\)".*/\1/')
        is "$(post /v1/chat/completions "$(chat hi ",$f")" "$tmp/e")" 400 "$name: 400"
        c "$name: named" error "$tmp/e" "$name"
    done
    is "$(post /v1/chat/completions \
        "$(chat hi ',"n":1,"logprobs":false,"logit_bias":{},"parallel_tool_calls":false')" \
        "$tmp/e")" 200 "n 1, logprobs false, an empty logit_bias and parallel_tool_calls pass"
    is "$(post /v1/chat/completions "$(chat hi ',"temperature":7')" "$tmp/e")" 400 \
        "temperature 7: 400"
    c "temperature 7: named" error "$tmp/e" temperature
    is "$(post /v1/chat/completions '{"messages":[{"role":"wizard","content":"x"}]}' \
        "$tmp/e")" 400 "an unknown role: 400"
    c "an unknown role: named" error "$tmp/e" "messages[0].role"
    is "$(post /v1/chat/completions "$(chat 'a\u0000b')" "$tmp/e")" 400 "a NUL: 400"
    is "$(post /v1/chat/completions '[1,2]' "$tmp/e")" 400 "not an object: 400"
    "$py" -c "import json; print(json.dumps({'messages':[{'role':'user','content':'x'*70000}]}))" \
        >"$tmp/big.json"
    is "$(curl -s -o "$tmp/e" -w '%{http_code}' --data-binary @"$tmp/big.json" \
        "http://127.0.0.1:$port/v1/chat/completions")" 413 "a body over --max-body: 413"
    is "$(curl -s -o "$tmp/e" -w '%{http_code}' -H 'Transfer-Encoding: chunked' \
        --data-binary @"$tmp/big.json" "http://127.0.0.1:$port/v1/chat/completions")" 413 \
        "a chunked body over --max-body: 413"
    is "$(curl -s -o "$tmp/e" -w '%{http_code}' "http://127.0.0.1:$port/v1/nothing")" 404 \
        "an unknown path: 404"
    is "$(curl -s -o "$tmp/e" -w '%{http_code}' "http://127.0.0.1:$port/v1/chat/completions")" \
        405 "GET on a POST endpoint: 405"
fi

person='{"type":"object","properties":{"name":{"type":"string","maxLength":8},
"age":{"type":"integer","minimum":0,"maximum":120}},"required":["name","age"],
"additionalProperties":false}'
if tcase format; then
    fmt=",\"max_tokens\":120,\"response_format\":{\"type\":\"json_schema\",\"json_schema\":
{\"name\":\"person\",\"strict\":true,\"schema\":$person}}"
    is "$(post /v1/chat/completions "$(chat 'Who are you?' "$fmt")" "$tmp/fw")" 200 \
        "json_schema: 200"
    c "json_schema: the answer parses and validates" person "$tmp/fw"
    is "$(post /v1/chat/completions "$(chat 'Who are you?' "$fmt,\"stream\":true")" \
        "$tmp/fs")" 200 "json_schema streamed: 200"
    c "json_schema: streamed and whole agree" agree "$tmp/fw" "$tmp/fs"
    c "json_schema: the streamed answer validates" person -s "$tmp/fs"
    c "json_schema: finish_reason stop" field "$tmp/fw" choices 0 finish_reason
    is "$(cat "$tmp/check.out")" stop "json_schema: the value is complete"
    # sampled, seeded: the same request twice, the same text
    sampled="{\"messages\":[{\"role\":\"user\",\"content\":\"Who?\"}],\"seed\":7${fmt}}"
    post /v1/chat/completions "$sampled" "$tmp/fr1" >/dev/null
    post /v1/chat/completions "$sampled" "$tmp/fr2" >/dev/null
    c "json_schema sampled: validates" person "$tmp/fr1"
    "$py" "$tmp/check.py" text "$tmp/fr1" >"$tmp/ft1"
    "$py" "$tmp/check.py" text "$tmp/fr2" >"$tmp/ft2"
    if [ -s "$tmp/ft1" ] && cmp -s "$tmp/ft1" "$tmp/ft2"; then
        ok "json_schema: the same request twice gives the same text"
    else notok "json_schema: two answers differ"; fi
    body="{\"prompt\":\"Once upon a time\",\"temperature\":0${fmt}}"
    is "$(post /v1/completions "$body" "$tmp/fc")" 200 "json_schema on /v1/completions: 200"
    c "json_schema on /v1/completions: validates" person "$tmp/fc"
    is "$(post /v1/chat/completions "$(chat 'Hi' \
        ',"max_tokens":60,"response_format":{"type":"json_object"}')" "$tmp/fo")" 200 \
        "json_object: 200"
    c "json_object: the answer is a JSON object" object "$tmp/fo"
    is "$(post /v1/chat/completions "$(chat 'Hi' ',"max_tokens":4,"response_format":
        {"type":"text"}')" "$tmp/ft")" 200 "text: 200"
    post /v1/chat/completions "$(chat 'x' ',"response_format":{"type":"json_schema",
        "json_schema":{"schema":{"allOf":[]}}}')" "$tmp/e" >/dev/null
    if grep -q allOf "$tmp/e"; then ok "a bad schema: the message names the keyword"
    else notok "a bad schema: $(cat "$tmp/e")"; fi
    is "$(post /v1/completions '{"prompt":"x","max_tokens":10,"response_format":{"type":
        "json_schema","json_schema":{"schema":{"type":"array","minItems":400}}}}' "$tmp/e")" \
        400 "a schema whose shortest value is over max_tokens: 400"
    c "a schema over max_tokens: named" error "$tmp/e" max_tokens
fi

if tcase bias; then
    # the greedy first token, its id through /tokenize; -100 on it changes the answer
    body='{"prompt":"Once upon a time","temperature":0,"max_tokens":1'
    post /v1/completions "$body}" "$tmp/b0" >/dev/null
    "$py" "$tmp/check.py" text "$tmp/b0" >"$tmp/bt0"
    "$py" -c "import json,sys; print(json.dumps({'content': open(sys.argv[1]).read()}))" \
        "$tmp/bt0" >"$tmp/btok.json"
    post /tokenize "$(cat "$tmp/btok.json")" "$tmp/btok" >/dev/null
    id=$("$py" -c "import json,sys; t=json.load(open(sys.argv[1]))['tokens']; \
print(t[0] if len(t) == 1 else 'x')" "$tmp/btok")
    is "$(post /v1/completions "$body,\"logit_bias\":{\"$id\":-100}}" "$tmp/b1")" 200 \
        "logit_bias -100 on the greedy token: 200"
    "$py" "$tmp/check.py" text "$tmp/b1" >"$tmp/bt1"
    if [ -s "$tmp/bt0" ] && ! cmp -s "$tmp/bt0" "$tmp/bt1"; then
        ok "logit_bias -100 on the greedy token changes the answer"
    else notok "logit_bias -100: '$(cat "$tmp/bt0")' and '$(cat "$tmp/bt1")'"; fi
    # +100 on the token of "a": the greedy answer is all a's, on both endpoints, streamed too
    post /tokenize '{"content":"a"}' "$tmp/btok" >/dev/null
    a=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['tokens'][0])" \
        "$tmp/btok")
    is "$(post /v1/chat/completions "$(chat Hi ",\"max_tokens\":4,\"logit_bias\":{\"$a\":100}")" \
        "$tmp/b2")" 200 "logit_bias +100: 200"
    c "logit_bias +100 on a token forces it" text "$tmp/b2"
    is "$(cat "$tmp/check.out")" aaaa "logit_bias +100: four a's"
    post /v1/chat/completions "$(chat Hi ",\"max_tokens\":4,\"logit_bias\":{\"$a\":100},
        \"stream\":true")" "$tmp/b3" >/dev/null
    c "logit_bias: streamed and whole agree" agree "$tmp/b2" "$tmp/b3"
fi

if tcase tools_utf8; then
    # An answer read for tool calls is made valid UTF-8 at its end; the bytes streamed
    # before must count as the U+FFFD they went out as, or their tail goes out twice. Token
    # 255 of the demo model is the lone byte 0xad: forced, every token is one bad byte.
    b=$(chat Hi ',"max_tokens":3,"logit_bias":{"255":100},"tools":[{"type":"function",
"function":{"name":"f"}}]')
    post /v1/chat/completions "$b" "$tmp/u8w" >/dev/null
    post /v1/chat/completions "${b%\}},\"stream\":true}" "$tmp/u8s" >/dev/null
    c "tools: a whole answer of bad bytes" text "$tmp/u8w"
    is "$(cat "$tmp/check.out")" "$(printf '\357\277\275\357\277\275\357\277\275')" \
        "tools: three bad bytes are three U+FFFD"
    c "tools: streamed, the bad bytes' U+FFFD go out once (whole and stream agree)" agree \
        "$tmp/u8w" "$tmp/u8s"
fi

if tcase tokenize; then
    is "$(post /tokenize '{"content":"Hello world, again"}' "$tmp/tok")" 200 "/tokenize: 200"
    ids=$("$py" -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))['tokens']))" \
        "$tmp/tok")
    is "$(post /detokenize "{\"tokens\":$ids}" "$tmp/detok")" 200 "/detokenize: 200"
    c "/detokenize gives the text back" field "$tmp/detok" content
    is "$(cat "$tmp/check.out")" "Hello world, again" "tokenize and detokenize round-trip"
    is "$(post /detokenize '{"tokens":[99999999]}' "$tmp/e")" 400 "/detokenize: a bad id, 400"
fi

# turns WHAT: a first turn, then the second (the first, its answer, a new question);
# cached_tokens of the second must cover at least the first turn's prompt
turns() {
    _sys='You are a careful assistant who answers questions about numbers and words.'
    _t1="{\"model\":\"m\",\"temperature\":0,\"max_tokens\":12,\"messages\":[{\"role\":
        \"system\",\"content\":\"$_sys\"},{\"role\":\"user\",\"content\":\"What is seven?\"}]"
    post /v1/chat/completions "$_t1}" "$tmp/turn1" >/dev/null
    _a1=$("$py" -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))['choices'][0]\
['message']['content']))" "$tmp/turn1")
    [ "${2:-}" = restart ] && restart
    _t2="${_t1%]},{\"role\":\"assistant\",\"content\":$_a1},{\"role\":\"user\",
        \"content\":\"And eight?\"}]}"
    post /v1/chat/completions "$_t2" "$tmp/turn2" >/dev/null
    c "$1: the second turn" field "$tmp/turn2" usage prompt_tokens_details cached_tokens
    _cached=$(cat "$tmp/check.out")
    "$py" "$tmp/check.py" field "$tmp/turn1" usage prompt_tokens >"$tmp/p1"
    if [ "$_cached" -ge "$(cat "$tmp/p1")" ] 2>/dev/null; then
        ok "$1: the second turn starts from the first turn's state ($_cached cached)"
    else
        notok "$1: $_cached tokens cached, want at least the first prompt's $(cat "$tmp/p1")"
    fi
}

if tcase reuse; then
    turns reuse
fi

if tcase metrics; then
    curl -s "http://127.0.0.1:$port/metrics" >"$tmp/metrics"
    c "/metrics: completion tokens counted" metric "$tmp/metrics" kli_completion_tokens_total
    if [ "$(cat "$tmp/check.out")" -gt 0 ] 2>/dev/null; then ok "/metrics: more than 0 tokens"
    else notok "/metrics: $(cat "$tmp/check.out") tokens"; fi
    if grep -q '^kli_http_requests_total{code="400"} [1-9]' "$tmp/metrics" ||
        ! tcase errors; then ok "/metrics: 400s counted"; else notok "/metrics: 400s"; fi
fi

if tcase log; then
    lines=$(wc -l <"$tmp/serve.log")
    mv "$tmp/serve.log" "$tmp/serve.log.1"
    kill -HUP "$main"
    poll 200 test -e "$tmp/serve.log"
    curl -s "http://127.0.0.1:$port/health" >/dev/null
    poll 200 grep -q /health "$tmp/serve.log"
    if grep -q 'GET /health 200' "$tmp/serve.log"; then ok "log: SIGHUP reopens it"
    else notok "log: no line in the reopened log"; fi
    if [ "$lines" -gt 5 ] && ! grep -v '^20[0-9-]*T[0-9:]*Z 127.0.0.1 [A-Z]* /' "$tmp/serve.log.1" \
        | grep -q .; then ok "log: one line per request ($lines)"
    else notok "log: odd lines"; head -3 "$tmp/serve.log.1" | sed 's/^/# /'; fi
fi

kill -TERM "$main"
wait "$main"
is $? 0 "SIGTERM: exit status 0"

if tcase key; then
    echo 'sesame' >"$tmp/key"
    start key --api-key-file "$tmp/key" --queue 1 --grace 1
    is "$(curl -s -o "$tmp/e" -w '%{http_code}' "http://127.0.0.1:$port/v1/models")" 401 \
        "API key: none, 401"
    is "$(curl -s -o "$tmp/e" -w '%{http_code}' -H 'Authorization: Bearer wrong' \
        "http://127.0.0.1:$port/v1/models")" 401 "API key: a wrong one, 401"
    is "$(curl -s -o "$tmp/e" -w '%{http_code}' -H 'Authorization: Bearer sesame' \
        "http://127.0.0.1:$port/v1/models")" 200 "API key: the right one, 200"
    is "$(curl -s -o "$tmp/e" -w '%{http_code}' "http://127.0.0.1:$port/health")" 200 \
        "API key: /health needs none"
    # --queue 1: while one request streams, another gets 429 and Retry-After
    printf '%s' "$long_stream" >"$tmp/long.json"
    curl -s -N -H 'Authorization: Bearer sesame' --data-binary @"$tmp/long.json" \
        "http://127.0.0.1:$port/v1/completions" >"$tmp/long.out" &
    lpid=$!
    poll 400 grep -q '"text":"[^"]' "$tmp/long.out"
    is "$(post /v1/chat/completions "$(chat hi)" "$tmp/e" -H 'Authorization: Bearer sesame' \
        -D "$tmp/hdr")" 429 "--queue 1: a second request, 429"
    if grep -qi '^Retry-After: [0-9]' "$tmp/hdr"; then ok "429: Retry-After"
    else notok "429: no Retry-After"; fi
    # SIGTERM while it streams: --grace 1, then it is cancelled, and its stream ends
    kill -TERM "$pid"
    wait "$pid"
    is $? 0 "SIGTERM with a request running: exit status 0"
    wait "$lpid"
    if tail -c 200 "$tmp/long.out" | grep -q 'cancelled' &&
        [ "$(tail -n 2 "$tmp/long.out" | head -n 1)" = 'data: [DONE]' ]; then
        ok "SIGTERM: the running stream ends with an error event and [DONE]"
    else
        notok "SIGTERM: the stream ends with $(tail -c 100 "$tmp/long.out")"
    fi
    t "a non-loopback address without a key is refused" 2 "$kli" serve --host 0.0.0.0 --port 0
    if grep -q 'api-key' "$tmp/stderr"; then ok "the message says to give --api-key"
    else notok "the message: $(cat "$tmp/stderr")"; fi
fi
if tcase state_dir; then
    # the states in a directory outlive the server: a new one, with no memory for states,
    # starts the second turn from the first turn's file
    restart() {
        kill -TERM "$pid"
        wait "$pid"
        start dir2 --state-dir "$tmp/states" --state-cache 0 --min-prefix 8
    }
    start dir1 --state-dir "$tmp/states" --min-prefix 8
    turns "--state-dir" restart
    kill -TERM "$pid"
    wait "$pid"
    is $? 0 "--state-dir: exit status 0"
fi
tdone
