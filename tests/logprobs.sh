#!/bin/sh
# logprobs.sh - log-probabilities of generated tokens (TAP) on the tiny model, against an
# independent reference: `kli logits` writes every position's logits of the prompt and the
# generated tokens, and NumPy computes their log_softmax (divided by the temperature, cut to
# the top-p nucleus and renormalised where the run sampled so). kli run --logprobs (greedy,
# temperature, top-p, logit_bias), kli serve's chat and completions logprobs (whole, and
# streamed equal to whole), serve's n choices (equal at temperature 0, each reproducible
# with a seed, usage counting them all) and kli batch's, in OpenAI's shapes.
#
# Tolerance 1e-4 on a log-probability: the run decodes token by token after a prefill where
# `kli logits` evaluates the whole sequence at once (chunked KDA against the recurrence,
# equal to rounding: observed differences are under 1e-5 on this model), the sampler's
# exponential is within 2e-7 relative, and the numbers are printed to 8 digits.
#
# Needs python3 with NumPy (skipped without); the serve cases also curl and libmicrohttpd.
set -u
: "${KLI_BIN:?}" "${KLI_TESTDATA:?}" "${KLI_SRCDIR:?}"
. "$KLI_SRCDIR/tests/lib.sh"
need_python numpy "python3 with NumPy is needed for the reference"
py=$PY
pids=""
trap 'for p in $pids; do kill -9 "$p" 2>/dev/null; done; rm -rf "$tmp"' EXIT

cat >"$tmp/check.py" <<'EOF'
import json, sys
import numpy as np

TOL = 1e-4

def log_softmax(row):
    z = row - row.max()
    return z - np.log(np.exp(z).sum())

def ref_rows(ids_path, lines, logits_path, temp, top_p, bias):
    """The reference log-probabilities of each generated position."""
    prompt = [int(x) for x in open(ids_path).read().split()]
    n = len(prompt) + len(lines) - 1
    L = np.fromfile(logits_path, dtype=np.float32).astype(np.float64)
    L = L.reshape(n, -1)
    out = []
    for k in range(len(lines)):
        row = L[len(prompt) - 1 + k].copy()
        for i, b in bias.items():
            row[i] += b
        lp = log_softmax(row / (temp if temp > 0 else 1.0))
        if temp > 0 and top_p < 1:
            order = sorted(range(len(lp)), key=lambda i: (-lp[i], i))
            acc, keep = 0.0, []
            for i in order:
                keep.append(i)
                acc += np.exp(lp[i])
                if acc >= top_p:
                    break
            cut = np.full(len(lp), -np.inf)
            cut[keep] = lp[keep] - np.log(np.exp(lp[keep]).sum())
            lp = cut
        out.append(lp)
    return out

def check_entry(e, ref, ntop, where, greedy):
    """One token's entry (with ids) against its reference row."""
    if abs(e['logprob'] - ref[e['id']]) > TOL:
        sys.exit('%s: token %d logprob %r, reference %r' % (where, e['id'], e['logprob'],
                                                          ref[e['id']]))
    if greedy and ref[e['id']] < ref.max() - TOL:
        sys.exit('%s: token %d is not the most likely' % (where, e['id']))
    top = e['top_logprobs']
    finite = int(np.isfinite(ref).sum())
    if len(top) != min(ntop, finite):
        sys.exit('%s: %d alternatives, want %d' % (where, len(top), min(ntop, finite)))
    for a in top:
        if abs(a['logprob'] - ref[a['id']]) > TOL:
            sys.exit('%s: alternative %d logprob %r, reference %r' % (where, a['id'],
                                                                   a['logprob'], ref[a['id']]))
    for a, b in zip(top, top[1:]):
        if a['logprob'] < b['logprob']:
            sys.exit('%s: alternatives out of order' % where)
    if top:
        rest = np.delete(ref, [a['id'] for a in top])
        if rest.size and rest.max() > top[-1]['logprob'] + TOL:
            sys.exit('%s: a likelier token than the last alternative is missing' % where)
        if ref[e['id']] >= top[-1]['logprob'] + TOL and e['id'] not in [a['id'] for a in top]:
            sys.exit('%s: the token itself is missing among the alternatives' % where)

cmd, a = sys.argv[1], sys.argv[2:]
if cmd == 'allids':        # PROMPT-IDS LINES: the ids to give kli logits
    prompt = open(a[0]).read().split()
    gen = [str(json.loads(l)['id']) for l in open(a[1])]
    print(','.join(prompt + gen[:-1]))
elif cmd == 'run':         # PROMPT-IDS LINES LOGITS NTOP TEMP TOP_P [ID:BIAS]
    lines = [json.loads(l) for l in open(a[1])]
    bias = {}
    if len(a) > 6:
        i, b = a[6].split(':')
        bias[int(i)] = float(b)
    temp, top_p = float(a[4]), float(a[5])
    refs = ref_rows(a[0], lines, a[2], temp, top_p, bias)
    if not lines:
        sys.exit('no lines')
    for k, (e, ref) in enumerate(zip(lines, refs)):
        check_entry(e, ref, int(a[3]), 'token %d' % k, temp == 0)
elif cmd == 'second':      # LINES: "ID" of the first token's second alternative
    print(json.loads(open(a[0]).readline())['top_logprobs'][1]['id'])
elif cmd in ('vs-run-chat', 'vs-run-compl'):   # ANSWER LINES: serve's logprobs equal run's
    o = json.load(open(a[0]))
    lines = [json.loads(l) for l in open(a[1])]
    lp = o['choices'][0]['logprobs']
    if cmd == 'vs-run-chat':
        got = [(e['token'], e['logprob'], e['bytes'],
                [(t['token'], t['logprob'], t['bytes']) for t in e['top_logprobs']])
               for e in lp['content']]
        want = [(e['token'], e['logprob'], e['bytes'],
                 [(t['token'], t['logprob'], t['bytes']) for t in e['top_logprobs']])
                for e in lines]
    else:
        got = list(zip(lp['tokens'], lp['token_logprobs'], lp['top_logprobs']))
        want = []
        for e in lines:
            top = {}
            for t in e['top_logprobs']:
                top.setdefault(t['token'], t['logprob'])
            want.append((e['token'], e['logprob'], top))
        off, offs = 0, []
        for e in lines:
            offs.append(off)
            off += len(e['bytes'] or [])
        if lp['text_offset'] != offs:
            sys.exit('text_offset %r, want %r' % (lp['text_offset'], offs))
    if len(got) != len(want) or not got:
        sys.exit('%d tokens, run gave %d' % (len(got), len(want)))
    for k, (g, w) in enumerate(zip(got, want)):
        if g[0] != w[0] or abs(g[1] - w[1]) > TOL:
            sys.exit('token %d: %r, run %r' % (k, g[:2], w[:2]))
        if cmd == 'vs-run-chat':
            if g[2] != w[2] or [t[0] for t in g[3]] != [t[0] for t in w[3]] or \
               any(abs(x[1] - y[1]) > TOL for x, y in zip(g[3], w[3])):
                sys.exit('token %d: alternatives %r, run %r' % (k, g[3], w[3]))
        elif set(g[2]) != set(w[2]) or any(abs(g[2][t] - w[2][t]) > TOL for t in g[2]):
            sys.exit('token %d: alternatives %r, run %r' % (k, g[2], w[2]))
elif cmd in ('choices', 'schoices'):   # FILE: per index text, finish, logprobs (JSON)
    def entries(lp):
        if lp is None:
            return []
        if 'content' in lp:
            return [[e['token'], e['logprob'], [t['logprob'] for t in e['top_logprobs']]]
                    for e in lp['content']]
        return [[t, l, sorted(d.values())] for t, l, d in
                zip(lp['tokens'], lp['token_logprobs'], lp['top_logprobs'])]
    out, usage = {}, None
    if cmd == 'choices':
        o = json.load(open(a[0]))
        usage = o['usage']
        for c in o['choices']:
            text = c['message']['content'] if 'message' in c else c['text']
            out[c['index']] = [text, c['finish_reason'], entries(c['logprobs'])]
    else:
        events = [e for e in open(a[0]).read().split('\n\n') if e.strip()]
        if events[-1] != 'data: [DONE]':
            sys.exit('no [DONE]')
        for e in events[:-1]:
            o = json.loads(e[6:])
            if o.get('usage'):
                usage = o['usage']
            for c in o['choices']:
                d = c.get('delta', c)
                r = out.setdefault(c['index'], ['', None, []])
                if r[1] is not None:
                    sys.exit('choice %d: a chunk after its finish_reason' % c['index'])
                r[0] += d.get('content', d.get('text', '')) or ''
                r[1] = c['finish_reason']
                r[2] += entries(c['logprobs'])
    for r in out.values():
        r[2] = [[t, round(l, 5), [round(x, 5) for x in tl]] for t, l, tl in r[2]]
    json.dump({'choices': [out[i] for i in sorted(out)], 'indices': sorted(out),
               'completion_tokens': usage['completion_tokens'] if usage else None},
              sys.stdout, sort_keys=True)
elif cmd == 'same':        # A B: equal JSON files
    x, y = json.load(open(a[0])), json.load(open(a[1]))
    if x != y:
        sys.exit('%r\n%r' % (x, y))
elif cmd == 'equal-choices':   # FILE N: N choices, all the same, tokens counted
    o = json.load(open(a[0]))
    ch = o['choices']
    if o['indices'] != list(range(int(a[1]))):
        sys.exit('indices %r' % o['indices'])
    if any(c != ch[0] for c in ch) or not ch[0][2]:
        sys.exit('choices differ: %r' % ch)
    if o['completion_tokens'] != sum(len(c[2]) for c in ch):
        sys.exit('usage %r, tokens %d' % (o['completion_tokens'], sum(len(c[2]) for c in ch)))
elif cmd == 'first-choice':    # N1 NK: choice 0 of NK equals the only choice of N1
    x, y = json.load(open(a[0])), json.load(open(a[1]))
    if x['choices'][0] != y['choices'][0] or len(y['choices']) < 2:
        sys.exit('%r\n%r' % (x['choices'][0], y['choices'][0]))
    if all(c == y['choices'][0] for c in y['choices']):
        sys.exit('every sampled choice the same: %r' % y['choices'])
elif cmd == 'pick':        # OUT ID: a batch line, as the answer whose logprobs it holds
    for l in open(a[0]):
        o = json.loads(l)
        if o.get('id') == a[1] and 'text' in o:
            json.dump({'choices': [{'logprobs': o.get('logprobs')}]}, sys.stdout)
        elif o.get('custom_id') == a[1]:
            json.dump(o['response']['body'], sys.stdout)
else:
    sys.exit('unknown check ' + cmd)
EOF


prompt="The quick brown fox jumps over"
printf '%s' "$prompt" | "$kli" tokenize -m "$model" >"$tmp/prompt.ids" 2>/dev/null

# runcase NAME NTOP TEMP TOP_P [BIAS]: kli run, kli logits over its tokens, the reference
runcase() {
    _n=$1 _k=$2 _t=$3 _p=$4 _b=${5:-}
    set -- run -m "$model" --raw -p "$prompt" -n 10 --temperature "$_t" --top-p "$_p" \
        --seed 11 --logprobs "$_k" --logprobs-file "$tmp/$_n.jsonl" --quiet
    [ -n "$_b" ] && set -- "$@" --logit-bias "$_b"
    t "$_n: kli run --logprobs $_k" 0 "$kli" "$@"
    "$py" "$tmp/check.py" allids "$tmp/prompt.ids" "$tmp/$_n.jsonl" >"$tmp/$_n.ids"
    t "$_n: kli logits over its tokens" 0 "$kli" logits -m "$model" --ids-file "$tmp/$_n.ids" \
        -o "$tmp/$_n.f32"
    c "$_n: log-probabilities and alternatives match log_softmax within $_t/$_p" run \
        "$tmp/prompt.ids" "$tmp/$_n.jsonl" "$tmp/$_n.f32" "$_k" "$_t" "$_p" $_b
}

if tcase run-greedy; then
    runcase greedy 5 0 1
fi
if tcase run-temperature; then
    runcase temp 4 0.8 1
fi
if tcase run-top-p; then
    runcase topp 20 1.3 0.6
fi
if tcase run-bias; then
    runcase greedy0 3 0 1
    b=$("$py" "$tmp/check.py" second "$tmp/greedy0.jsonl")
    runcase bias 3 0 1 "$b:2.5"
fi
if tcase run-errors; then
    t "--logprobs 21 is refused" 2 "$kli" run -m "$model" -p x --logprobs 21
    if grep -q -- '--logprobs' "$tmp/stderr"; then ok "... naming it"; else notok "... naming it"; fi
    t "--logprobs-file without --logprobs is refused" 2 "$kli" run -m "$model" -p x \
        --logprobs-file "$tmp/x.jsonl"
    t "--logprobs-file cannot be the model" 1 "$kli" run -m "$model" -p x --logprobs 1 \
        --logprobs-file "$model/model.safetensors"
    t "--logprobs-file cannot be --save-state's file" 1 "$kli" run -m "$model" -p x \
        --logprobs 1 --logprobs-file "$tmp/one" --save-state "$tmp/one"
    # nor any other input: the file of --tools, --json-schema or --load-state is kept
    printf '[{"type":"function","function":{"name":"f"}}]' >"$tmp/tools.json"
    cp "$tmp/tools.json" "$tmp/tools.keep"
    t "--logprobs-file cannot be --tools' file" 1 "$kli" run -m "$model" -p x -n 2 \
        --logprobs 1 --tools "$tmp/tools.json" --logprobs-file "$tmp/tools.json"
    cmp -s "$tmp/tools.json" "$tmp/tools.keep"
    check $? "... which is left as it was"
    printf '{"type":"object"}' >"$tmp/schema.json"
    t "--save-state cannot be --json-schema's file" 1 "$kli" run -m "$model" -p x -n 8 \
        --json-schema "$tmp/schema.json" --save-state "$tmp/schema.json"
    is "$(cat "$tmp/schema.json")" '{"type":"object"}' "... which is left as it was"
    "$kli" run -m "$model" -p x -n 2 --quiet --save-state "$tmp/state" >/dev/null 2>&1
    cp "$tmp/state" "$tmp/state.keep"
    t "--logprobs-file cannot be --load-state's file" 1 "$kli" run -m "$model" -p x -n 2 \
        --logprobs 1 --load-state "$tmp/state" --logprobs-file "$tmp/state"
    cmp -s "$tmp/state" "$tmp/state.keep"
    check $? "... which is left as it was"
    t "lines go to standard error without --logprobs-file" 0 "$kli" run -m "$model" -p x -n 3 \
        --temperature 0 --logprobs 1 --quiet
    k=$(grep -c '^{"id":' "$tmp/stderr")
    is "$k" 3 "... one line per token"
fi

if tcase batch; then
    t "the run to compare with" 0 "$kli" run -m "$model" --raw -p "$prompt" -n 10 \
        --temperature 0 --logprobs 5 --logprobs-file "$tmp/b.jsonl" --quiet
    cat >"$tmp/in.jsonl" <<EOF
{"id": "kli", "prompt": "$prompt", "max_tokens": 10, "temperature": 0, "logprobs": true, "top_logprobs": 5}
{"custom_id": "compl", "method": "POST", "url": "/v1/completions", "body": {"prompt": "$prompt", "max_tokens": 10, "temperature": 0, "logprobs": 5}}
{"id": "none", "prompt": "$prompt", "max_tokens": 2, "logprobs": false}
{"id": "top-alone", "prompt": "x", "top_logprobs": 2}
{"custom_id": "six", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "logprobs": 6}}
{"custom_id": "top-compl", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "top_logprobs": 1}}
EOF
    t "kli batch with logprobs (three records refused)" 3 "$kli" batch -m "$model" --raw \
        -i "$tmp/in.jsonl" -o "$tmp/out.jsonl" --quiet --max-errors 2
    "$py" "$tmp/check.py" pick "$tmp/out.jsonl" kli >"$tmp/b-kli.json"
    c "a kli record's logprobs (OpenAI's chat shape) are run's" vs-run-chat "$tmp/b-kli.json" \
        "$tmp/b.jsonl"
    "$py" "$tmp/check.py" pick "$tmp/out.jsonl" compl >"$tmp/b-compl.json"
    c "an OpenAI completions body's logprobs are run's" vs-run-compl "$tmp/b-compl.json" \
        "$tmp/b.jsonl"
    k=$(grep -c '"logprobs"' "$tmp/out.jsonl")
    is "$k" 2 "... and only theirs carry logprobs"
    for e in '"top_logprobs\\" needs' 'must be an integer in \[0, 5\]' \
             '"top_logprobs\\" does not belong'; do
        if grep -q "$e" "$tmp/out.jsonl"; then ok "refused: $e"; else notok "refused: $e"; fi
    done
fi

# ---- kli serve -------------------------------------------------------------------------
serve_ok=1 why=""
if ! command -v curl >/dev/null 2>&1; then
    serve_ok=0 why="no curl"
elif "$kli" serve --help 2>&1 | grep -q "built without"; then
    serve_ok=0 why="kli was built without the HTTP server"
fi
port=1
start() {   # start: a server on a free port; $port
    "$kli" serve -m "$model" --port 0 2>"$tmp/serve.err" &
    pids="$pids $!"
    poll 1200 grep -qs 'http://' "$tmp/serve.err"
    port=$(sed -n 's|.*http://[^ ]*:\([0-9]*\)/ .*|\1|p' "$tmp/serve.err")
    [ -n "$port" ] || port=1
}
post() {    # post PATH BODY OUT: the HTTP status
    printf '%s' "$2" >"$tmp/body.json"
    curl -s -N -o "$3" -w '%{http_code}' -H 'Content-Type: application/json' \
        --data-binary @"$tmp/body.json" "http://127.0.0.1:$port$1"
}
started=0
serve_case() {   # serve_case NAME: whether it runs (starting the server once)
    tcase "$1" || return 1
    if [ $serve_ok = 0 ]; then
        ok "$1 # SKIP $why"
        return 1
    fi
    [ $started = 1 ] || start
    started=1
}
# whole_stream NAME PATH BODY-FIELDS: the answer whole and streamed, both as choices
whole_stream() {
    is "$(post "$2" "{$3}" "$tmp/$1.w")" 200 "$1: whole"
    is "$(post "$2" "{$3,\"stream\":true,\"stream_options\":{\"include_usage\":true}}" \
        "$tmp/$1.s")" 200 "$1: streamed"
    "$py" "$tmp/check.py" choices "$tmp/$1.w" >"$tmp/$1.wc" 2>"$tmp/check.out"
    "$py" "$tmp/check.py" schoices "$tmp/$1.s" >"$tmp/$1.sc" 2>>"$tmp/check.out"
    c "$1: streamed equals whole, logprobs and all" same "$tmp/$1.wc" "$tmp/$1.sc"
}

if serve_case serve-completions; then
    t "the run to compare with" 0 "$kli" run -m "$model" --raw -p "$prompt" -n 10 \
        --temperature 0 --logprobs 5 --logprobs-file "$tmp/sc.jsonl" --quiet
    is "$(post /v1/completions "{\"prompt\":\"$prompt\",\"temperature\":0,\"max_tokens\":10,
\"logprobs\":5}" "$tmp/sc.json")" 200 "completions with logprobs 5"
    c "completions: tokens, token_logprobs, top_logprobs and text_offset are run's" \
        vs-run-compl "$tmp/sc.json" "$tmp/sc.jsonl"
    whole_stream compl /v1/completions "\"prompt\":\"$prompt\",\"temperature\":0,
\"max_tokens\":10,\"logprobs\":3"
    is "$(post /v1/completions "{\"prompt\":\"x\",\"logprobs\":6}" "$tmp/e")" 400 \
        "completions: logprobs 6 is refused"
fi
if serve_case serve-chat; then
    t "the chat run to compare with" 0 "$kli" run -m "$model" -p "$prompt" -n 8 \
        --temperature 0 --logprobs 4 --logprobs-file "$tmp/ch.jsonl" --quiet
    is "$(post /v1/chat/completions "{\"messages\":[{\"role\":\"user\",
\"content\":\"$prompt\"}],\"temperature\":0,\"max_tokens\":8,\"logprobs\":true,
\"top_logprobs\":4}" "$tmp/ch.json")" 200 "chat with top_logprobs 4"
    c "chat: logprobs.content is run's" vs-run-chat "$tmp/ch.json" "$tmp/ch.jsonl"
    whole_stream chat /v1/chat/completions "\"messages\":[{\"role\":\"user\",
\"content\":\"$prompt\"}],\"temperature\":0.9,\"seed\":4,\"max_tokens\":9,
\"logprobs\":true,\"top_logprobs\":2,\"stop\":[\"e\"]"
    is "$(post /v1/chat/completions "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],
\"top_logprobs\":2}" "$tmp/e")" 400 "chat: top_logprobs without logprobs is refused"
fi
if serve_case serve-n; then
    m="\"messages\":[{\"role\":\"user\",\"content\":\"$prompt\"}],\"max_tokens\":7,\"logprobs\":true"
    whole_stream n-greedy /v1/chat/completions "$m,\"temperature\":0,\"n\":3"
    c "n 3 at temperature 0: three equal choices, usage counting them all" \
        equal-choices "$tmp/n-greedy.wc" 3
    whole_stream n-seed /v1/chat/completions "$m,\"temperature\":1,\"seed\":9,\"n\":4"
    is "$(post /v1/chat/completions "{$m,\"temperature\":1,\"seed\":9,\"n\":4}" \
        "$tmp/n-seed2.w")" 200 "n 4 with a seed, again"
    "$py" "$tmp/check.py" choices "$tmp/n-seed2.w" >"$tmp/n-seed2.wc"
    c "n 4 with a seed: every choice repeats" same "$tmp/n-seed.wc" "$tmp/n-seed2.wc"
    is "$(post /v1/chat/completions "{$m,\"temperature\":1,\"seed\":9,\"n\":1}" \
        "$tmp/n-one.w")" 200 "n 1 with the same seed"
    "$py" "$tmp/check.py" choices "$tmp/n-one.w" >"$tmp/n-one.wc"
    c "... is choice 0 of n 4 (choice i samples with seed + i); the others differ" \
        first-choice "$tmp/n-one.wc" "$tmp/n-seed.wc"
    is "$(post /v1/completions "{\"prompt\":\"x\",\"n\":17}" "$tmp/e")" 400 "n 17 is refused"
    # a prompt of at least --min-prefix tokens is evaluated once for all the choices
    cached() { curl -s "http://127.0.0.1:$port/metrics" | sed -n 's/^kli_cached_tokens_total //p'; }
    c0=$(cached)
    long=$(printf 'word %.0s' $(seq 80))
    is "$(post /v1/completions "{\"prompt\":\"$long\",\"max_tokens\":2,\"n\":4}" "$tmp/n-long")" \
        200 "n 4 with a prompt of 80 words"
    np=$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["usage"]["prompt_tokens"])' \
        "$tmp/n-long")
    is "$(( $(cached) - c0 ))" "$((3 * np))" "... its prompt evaluated once: the 3 other choices start from its state"
fi

tdone
