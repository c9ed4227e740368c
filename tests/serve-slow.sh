#!/bin/sh
# serve-slow.sh - kli serve with more and real clients (TAP): serve.sh's concurrent and
# disconnect cases with 64 streaming clients at once; then the official OpenAI client for
# Node (the `openai` package from npm, installed into a cache directory outside the tree,
# $KLI_NPM_DIR or else ~/.cache/kli/npm): models.list, a chat answer whole and streamed (the
# two agreeing), a completion, a json_schema answer that validates, a bad logit_bias
# refused and a tool call under tool_choice "required". The npm part is skipped, with a message, where node or npm is missing or the
# registry cannot be reached. Last, memory: under an address-space limit (ulimit -v, set
# from what an idle server maps here) 12 clients send 120 long chats whose states would
# fill the default state cache many times over: every request is answered (200, or 503 with
# Retry-After), none is reset, and the state cache keeps to the share it announced.
set -u
: "${KLI_BIN:?}" "${KLI_TESTDATA:?}" "${KLI_SRCDIR:?}"
. "$KLI_SRCDIR/tests/lib.sh"
if "$kli" serve --help 2>&1 | grep -q "built without"; then
    echo "1..0 # SKIP kli was built without the HTTP server (libmicrohttpd)"
    exit 0
fi
pids=""
trap 'for p in $pids; do kill -9 "$p" 2>/dev/null; done; rm -rf "$tmp"' EXIT

if tcase many; then
    if KLI_SERVE_CLIENTS=64 sh "$KLI_SRCDIR/tests/serve.sh" concurrent disconnect \
        >"$tmp/many" 2>&1; then
        ok "64 concurrent streaming clients, and a disconnect (serve.sh)"
    else
        notok "64 concurrent streaming clients, and a disconnect (serve.sh)"
    fi
    sed 's/^/# /' "$tmp/many"
fi

if tcase openai; then
    dir=${KLI_NPM_DIR:-${HOME:-/tmp}/.cache/kli/npm}
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        echo "# SKIP openai: node and npm are needed"
    elif ! { [ -d "$dir/node_modules/openai" ] || { mkdir -p "$dir" &&
        (cd "$dir" && npm install --no-audit --no-fund --silent openai@4) \
            >"$tmp/npm.log" 2>&1; }; }; then
        echo "# SKIP openai: npm could not install the openai package (no registry?)"
        sed 's/^/#   /' "$tmp/npm.log" | tail -3
    else
        "$kli" serve --port 0 --api-key sesame 2>"$tmp/serve.err" &
        pid=$!
        pids="$pids $pid"
        poll 1200 grep -qs 'http://' "$tmp/serve.err"
        port=$(sed -n 's|.*http://[^ ]*:\([0-9]*\)/ .*|\1|p' "$tmp/serve.err")
        cat >"$tmp/client.mjs" <<'JS'
import OpenAI from 'openai';
const [port] = process.argv.slice(2);
const c = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: 'sesame' });
const out = (ok, what) => console.log(`${ok ? 'ok' : 'not ok'} ${what}`);
try {
    const models = await c.models.list();
    out(models.data.length === 1 && models.data[0].id === 'kli-demo', 'openai: models.list');
    const req = { model: 'kli-demo', temperature: 0, max_tokens: 16,
                  messages: [{ role: 'user', content: 'Hello there' }] };
    const whole = await c.chat.completions.create(req);
    const text = whole.choices[0].message.content;
    out(text.length > 0 && whole.usage.completion_tokens > 0, 'openai: a chat answer');
    const stream = await c.chat.completions.create({ ...req, stream: true,
                                                     stream_options: { include_usage: true } });
    let s = '', usage = null, finish = null;
    for await (const ch of stream) {
        if (ch.usage) usage = ch.usage;
        for (const x of ch.choices) {
            s += x.delta.content ?? '';
            finish = x.finish_reason ?? finish;
        }
    }
    out(s === text && finish === whole.choices[0].finish_reason &&
        usage.total_tokens === whole.usage.total_tokens, 'openai: streamed as whole');
    const cmpl = await c.completions.create({ model: 'kli-demo', prompt: 'Once upon a time',
                                              max_tokens: 8, temperature: 0 });
    out(cmpl.choices[0].text.length > 0 && cmpl.choices[0].finish_reason === 'length',
        'openai: a completion');
    const person = { type: 'object', additionalProperties: false, required: ['name', 'age'],
                     properties: { name: { type: 'string', maxLength: 8 },
                                   age: { type: 'integer', minimum: 0, maximum: 120 } } };
    const js = await c.chat.completions.create({ ...req, max_tokens: 120,
        response_format: { type: 'json_schema',
                           json_schema: { name: 'person', strict: true, schema: person } } });
    const p = JSON.parse(js.choices[0].message.content);
    out(Object.keys(p).sort().join() === 'age,name' && typeof p.name === 'string' &&
        p.name.length <= 8 && Number.isInteger(p.age) && p.age >= 0 && p.age <= 120,
        'openai: response_format json_schema validates');
    const ban = await c.chat.completions.create({ ...req, max_tokens: 2,
                                                  logit_bias: { '-1': 5 } }).catch((e) => e);
    out(ban.status === 400 && ban.param === 'logit_bias', 'openai: a bad logit_bias is a 400');
    const tc = await c.chat.completions.create({ ...req, max_tokens: 40, tool_choice: 'required',
        tools: [{ type: 'function', function: { name: 'f', parameters: { type: 'object',
            properties: { x: { type: 'integer' } }, required: ['x'] } } }] });
    const call = tc.choices[0].message.tool_calls[0];
    out(tc.choices[0].finish_reason === 'tool_calls' && call.function.name === 'f' &&
        Number.isInteger(JSON.parse(call.function.arguments).x),
        'openai: tool_choice required gives a call to f with valid arguments');
} catch (e) {
    out(false, `openai: ${e}`);
}
JS
        if NODE_PATH="$dir/node_modules" node "$tmp/client.mjs" "$port" >"$tmp/node.out" \
            2>&1; then :; fi
        # ES modules do not read NODE_PATH: run from a link in the package directory
        if grep -q "Cannot find package" "$tmp/node.out"; then
            cp "$tmp/client.mjs" "$dir/kli-client-$$.mjs"
            node "$dir/kli-client-$$.mjs" "$port" >"$tmp/node.out" 2>&1
            rm -f "$dir/kli-client-$$.mjs"
        fi
        while IFS= read -r l; do
            case $l in
            "ok "*) ok "${l#ok }" ;;
            "not ok "*) notok "${l#not ok }" ;;
            *) echo "# $l" ;;
            esac
        done <"$tmp/node.out"
        grep -q '^ok openai: a completion' "$tmp/node.out" || notok "openai: the client ran"
        kill -TERM "$pid"
        wait "$pid"
        is_rc=$?
        if [ "$is_rc" = 0 ]; then ok "openai: the server exits 0"; else
            notok "openai: the server exits $is_rc"; fi
    fi
fi
if tcase memory; then
    if grep -q __asan_init "$kli" 2>/dev/null; then
        echo "# SKIP memory: AddressSanitizer cannot run under ulimit -v"
    elif ! need_python json; then
        echo "# SKIP memory: python3 is needed"
    else
        cat >"$tmp/mem.py" <<'EOF'
import http.client, json, re, resource, subprocess, sys, time, threading
kli, tmp = sys.argv[1], sys.argv[2]

def start(limit_kb):
    err = open('%s/mem-%d.err' % (tmp, limit_kb), 'w+')
    def lim():
        if limit_kb:
            resource.setrlimit(resource.RLIMIT_AS, (limit_kb * 1024, limit_kb * 1024))
    p = subprocess.Popen([kli, 'serve', '--port', '0', '--min-prefix', '8', '-P', '4',
                          '--queue', '64'], stderr=err, preexec_fn=lim)
    for _ in range(1200):
        err.seek(0)
        m = re.search(r'http://[^ ]*:(\d+)/ ', err.read())
        if m:
            return p, int(m.group(1)), err
        if p.poll() is not None:
            break
        time.sleep(0.05)
    err.seek(0)
    sys.exit('kli serve did not start: %s' % err.read()[-400:])

def vm_kb(pid):
    return int(re.search(r'VmSize:\s+(\d+)', open('/proc/%d/status' % pid).read()).group(1))

def req(port, method, path, body=None):
    c = http.client.HTTPConnection('127.0.0.1', port, timeout=600)
    c.request(method, path, json.dumps(body) if body else None,
              {'Content-Type': 'application/json'})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, r.getheader('Retry-After'), data

# What the server maps on this machine (its threads' stacks, the model, the buffers a long
# prompt takes, OpenBLAS's among them) after one request as long as the test's, under a
# limit too high to matter (a limit changes how kli allocates); the limit of the test
# leaves it 160 MiB more: room for the requests running at once (12 clients take about
# 70 MiB here), not for the states of 120 conversations (about 2 MiB each).
p, port, err = start(1 << 30)
req(port, 'POST', '/v1/chat/completions', {'max_tokens': 4, 'messages': [
    {'role': 'user', 'content': 'request x ' + 'words and more words ' * 400}]})
base = vm_kb(p.pid)
p.terminate()
p.wait()
limit = base + 160 * 1024
p, port, err = start(limit)
codes, lock, todo = {}, threading.Lock(), list(range(120))

def one(i):
    body = {'temperature': 0, 'max_tokens': 4, 'messages': [{'role': 'user',
            'content': 'request %d ' % i + 'words and more words ' * 400}]}
    try:
        st, retry, data = req(port, 'POST', '/v1/chat/completions', body)
        k = 200 if st == 200 else '503' if st == 503 and retry else '%d: %r' % (st, data[:120])
    except Exception as ex:
        k = 'no answer (%s)' % type(ex).__name__
    with lock:
        codes[k] = codes.get(k, 0) + 1

def worker():
    while True:
        with lock:
            if not todo:
                return
            i = todo.pop()
        one(i)

ts = [threading.Thread(target=worker) for _ in range(12)]
for t in ts:
    t.start()
for t in ts:
    t.join()
st, _, m = req(port, 'GET', '/metrics')
alive = p.poll() is None
p.terminate()
p.wait()
err.seek(0)
log = err.read()
m = m.decode()
print('# limit %d KiB (idle server %d KiB): %r' % (limit, base, codes))
print('# ' + ' '.join(l for l in m.splitlines() if l.startswith('kli_state_cache')))
ann = re.search(r'the state cache keeps at most (\d+) MiB', log)
kept = int(re.search(r'kli_state_cache_bytes (\d+)', m).group(1))
bad = [k for k in codes if k not in (200, '503')]
print('%s every request answered, 200 or 503 with Retry-After%s' %
      ('ok' if not bad else 'not ok', '' if not bad else ': %r' % bad))
print('%s most requests (>= 90%%) were served' % ('ok' if codes.get(200, 0) >= 108 else 'not ok'))
print('%s the state cache took the share it announced (%s MiB), no more (%d bytes kept)' %
      ('ok' if ann and kept <= (int(ann.group(1)) + 1) * 1048576 else 'not ok',
       ann.group(1) if ann else 'none announced', kept))
print('%s the server is still up' % ('ok' if alive and st == 200 else 'not ok'))
EOF
        "$PY" "$tmp/mem.py" "$kli" "$tmp" >"$tmp/mem.out" 2>&1
        grep -q '^ok the server is still up' "$tmp/mem.out" || notok "memory: the check ran"
        while IFS= read -r l; do
            case $l in
            "ok "*) ok "memory: ${l#ok }" ;;
            "not ok "*) notok "memory: ${l#not ok }" ;;
            *) echo "# $l" ;;
            esac
        done <"$tmp/mem.out"
    fi
fi
tdone
