#!/usr/bin/env python3
"""serve-bench.py - the two targets of kli serve (issue #19), measured on one machine.

    python3 contrib/bench/serve-bench.py --kli build/kli [-m MODEL] [-P 16] [--rounds 3]
                                         [--tokens 64] [--context 2000] [-- SERVE-OPTIONS]

1. Throughput: P records through `kli batch -P P`, then the same records as P concurrent
   streaming clients of `kli serve -P P`; each run's aggregate rate is the completion
   tokens over the wall time from the first request to the last answer (batch: its
   "tok/s overall" line). Target: serve >= 0.9x batch.
2. A follow-up turn: a conversation of about --context prompt tokens (a system turn and a
   long user turn), answered; then its next turn (the turn, its answer, a short question)
   on the same server, against the same next turn sent cold to a server that keeps no
   state (--state-cache 0). The time to the first streamed token of each. Target: warm
   <= 1/5 cold.

Each number is the median of --rounds runs (the ranges beside them). Only the standard
library of Python is used; the model is the demo model without -m.
"""
import argparse, http.client, json, os, re, statistics, subprocess, sys, tempfile, threading
import time


def start(kli, model, extra):
    cmd = [kli, 'serve', '--port', '0'] + (['-m', model] if model else []) + extra
    err = tempfile.TemporaryFile(mode='w+')
    p = subprocess.Popen(cmd, stderr=err)
    for _ in range(6000):
        err.seek(0)
        m = re.search(r'http://[^ ]*:(\d+)/ ', err.read())
        if m:
            return p, int(m.group(1))
        if p.poll() is not None:
            break
        time.sleep(0.05)
    err.seek(0)
    sys.exit('kli serve did not start: ' + err.read())


def stop(p):
    p.terminate()
    p.wait()


def stream(port, path, body):
    """Sends a streamed request: (seconds to the first token, seconds, completion tokens)."""
    t0 = time.monotonic()
    c = http.client.HTTPConnection('127.0.0.1', port, timeout=3600)
    c.request('POST', path, json.dumps(dict(body, stream=True,
                                            stream_options={'include_usage': True})),
              {'Content-Type': 'application/json'})
    r = c.getresponse()
    first, usage, buf = None, None, b''
    while True:
        line = r.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b'data: ') or line == b'data: [DONE]':
            continue
        o = json.loads(line[6:])
        if o.get('usage'):
            usage = o['usage']
        for ch in o.get('choices', []):
            d = ch.get('delta', ch)
            if first is None and (d.get('content') or d.get('text')):
                first = time.monotonic() - t0
    c.close()
    return first, time.monotonic() - t0, usage['completion_tokens'] if usage else 0


def records(n, tokens):
    return [{'id': 'r%d' % i, 'temperature': 0, 'max_tokens': tokens,
             'messages': [{'role': 'user', 'content':
                           'Question %d: tell me about the number %d and its neighbours.'
                           % (i, i * 7 + 3)}]} for i in range(n)]


def batch_rate(a, recs):
    with tempfile.TemporaryDirectory() as d:
        inp, out = os.path.join(d, 'in.jsonl'), os.path.join(d, 'out.jsonl')
        with open(inp, 'w') as f:
            for r in recs:
                f.write(json.dumps(r) + '\n')
        cmd = [a.kli, 'batch', '-i', inp, '-o', out, '-P', str(a.P), '--overwrite']
        if a.model:
            cmd += ['-m', a.model]
        t0 = time.monotonic()
        subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
        wall = time.monotonic() - t0
        toks = sum(json.loads(l)['completion_tokens'] for l in open(out))
    return toks / wall, wall


def serve_rate(a, recs):
    p, port = start(a.kli, a.model, ['-P', str(a.P)] + a.serve)
    try:
        res = [None] * len(recs)

        def one(i):
            body = {k: v for k, v in recs[i].items() if k != 'id'}
            res[i] = stream(port, '/v1/chat/completions', body)
        th = [threading.Thread(target=one, args=(i,)) for i in range(len(recs))]
        t0 = time.monotonic()
        for t in th:
            t.start()
        for t in th:
            t.join()
        wall = time.monotonic() - t0
    finally:
        stop(p)
    return sum(r[2] for r in res) / wall, wall


def followup(a):
    words = ('the quick brown fox jumps over the lazy dog while the river runs to the sea '
             'and the town by the sea keeps its lights on through the long winter night ')
    body = {'temperature': 0, 'max_tokens': 16}
    cold_p, cold_port = start(a.kli, a.model, ['--state-cache', '0'] + a.serve)
    try:
        warm_p, warm_port = start(a.kli, a.model, a.serve)
    except SystemExit:
        stop(cold_p)
        raise
    try:
        # the words repeated to about --context tokens, counted by the model's tokenizer
        c = http.client.HTTPConnection('127.0.0.1', warm_port, timeout=3600)
        c.request('POST', '/tokenize', json.dumps({'content': words}),
                  {'Content-Type': 'application/json'})
        per = max(1, len(json.loads(c.getresponse().read())['tokens']))
        c.close()
        long_text = words * max(1, round(a.context / per))
        turn1 = [{'role': 'system', 'content': 'You are a careful reader.'},
                 {'role': 'user', 'content': 'Read this and summarise it: ' + long_text}]
        c = http.client.HTTPConnection('127.0.0.1', warm_port, timeout=3600)
        c.request('POST', '/v1/chat/completions', json.dumps(dict(body, messages=turn1)),
                  {'Content-Type': 'application/json'})
        o = json.loads(c.getresponse().read())
        c.close()
        answer = o['choices'][0]['message']['content']
        n_prompt = o['usage']['prompt_tokens']
        turn2 = turn1 + [{'role': 'assistant', 'content': answer},
                         {'role': 'user', 'content': 'And in one word?'}]
        warm = stream(warm_port, '/v1/chat/completions', dict(body, messages=turn2))[0]
        cold = stream(cold_port, '/v1/chat/completions', dict(body, messages=turn2))[0]
    finally:
        stop(warm_p)
        stop(cold_p)
    return warm, cold, n_prompt


def med(xs):
    return '%.3f (%.3f..%.3f)' % (statistics.median(xs), min(xs), max(xs))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--kli', default='./kli')
    ap.add_argument('-m', '--model')
    ap.add_argument('-P', type=int, default=16)
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--tokens', type=int, default=64)
    ap.add_argument('--context', type=int, default=2000)
    ap.add_argument('serve', nargs='*', help='more options of kli serve')
    a = ap.parse_args()
    recs = records(a.P, a.tokens)
    rb, rs, ratio, tw, tc, tr = [], [], [], [], [], []
    for k in range(a.rounds):
        b, _ = batch_rate(a, recs)
        s, _ = serve_rate(a, recs)
        rb.append(b)
        rs.append(s)
        ratio.append(s / b)
        w, c, n = followup(a)
        tw.append(w)
        tc.append(c)
        tr.append(w / c)
        print('round %d: batch %.1f tok/s, serve %.1f tok/s (%.2fx); follow-up of %d prompt '
              'tokens: first token %.3f s warm, %.3f s cold (%.2f)' % (k + 1, b, s, s / b,
                                                                      n, w, c, w / c),
              flush=True)
    print('median of %d: batch -P %d %s tok/s; serve, %d clients %s tok/s; ratio %s '
          '(target >= 0.9)' % (a.rounds, a.P, med(rb), a.P, med(rs), med(ratio)))
    print('median of %d: follow-up first token warm %s s, cold %s s, warm/cold %s '
          '(target <= 0.2)' % (a.rounds, med(tw), med(tc), med(tr)))


if __name__ == '__main__':
    main()
