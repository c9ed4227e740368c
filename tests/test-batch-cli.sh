#!/bin/sh
# test-batch-cli.sh - kli batch on the tiny model (TAP): greedy results do not depend on
# --parallel and equal kli run's, every id comes out exactly once, a resumed run appends
# only what is missing, bad records give error lines and the batch goes on, shards cover
# the input exactly once, SIGINT leaves whole lines and a rerun completes the set, and
# prefix reuse (in memory and in a directory) changes nothing but cached_tokens.
#
# The JSON checks need python3; without it the test is skipped.
set -u
: "${KLI_BIN:?}" "${KLI_TESTDATA:?}" "${KLI_SRCDIR:?}"
. "$KLI_SRCDIR/tests/lib.sh"
need_python json "python3 is needed to check the JSON output"
py=$PY
# c DESCRIPTION CHECK ARGS...: a check of check.py
c() {
    desc=$1
    shift
    if "$py" "$tmp/check.py" "$@" >"$tmp/check.out" 2>&1; then ok "$desc"; else
        notok "$desc"
        sed 's/^/# /' "$tmp/check.out" | head -5
    fi
}

cat >"$tmp/check.py" <<'EOF'
import json, sys

def lines(path):
    data = open(path, 'rb').read()
    if data and not data.endswith(b'\n'):
        sys.exit('%s does not end with a newline' % path)
    return [json.loads(l) for l in data.decode('utf-8').splitlines()]

def by_id(path):
    return {r['id']: r for r in lines(path)}

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == 'ids':        # OUT IDS...: every id exactly once, no other
    got = [r['id'] for r in lines(args[0])]
    want = args[1:]
    if sorted(got) != sorted(want):
        sys.exit('ids %s, want %s' % (sorted(got), sorted(want)))
elif cmd == 'same':     # OUT1 OUT2: the same text and finish_reason for every id
    a, b = by_id(args[0]), by_id(args[1])
    if a.keys() != b.keys():
        sys.exit('different ids')
    for k in a:
        if (a[k]['text'], a[k]['finish_reason']) != (b[k]['text'], b[k]['finish_reason']):
            sys.exit('%s: %r vs %r' % (k, a[k]['text'], b[k]['text']))
elif cmd == 'text':     # OUT ID FILE: the text of ID is FILE (kli run's output) less its newline
    want = open(args[2], 'rb').read()
    if not want.endswith(b'\n'):
        sys.exit('kli run output without its newline')
    want = want[:-1].decode('utf-8', 'replace')
    got = by_id(args[0])[args[1]]['text']
    if got != want:
        sys.exit('%r vs %r' % (got, want))
elif cmd == 'ok':       # OUT: no error lines, and the counts add up
    for r in lines(args[0]):
        if r['finish_reason'] not in ('stop', 'length'):
            sys.exit('%s: %s' % (r['id'], r.get('error')))
        if r['completion_tokens'] < 0 or r['prompt_tokens'] < 1:
            sys.exit('%s: bad counts' % r['id'])
elif cmd == 'errors':   # OUT ID...: these ids failed, with a message; the others did not
    rs = by_id(args[0])
    for k, r in rs.items():
        if (k in args[1:]) != (r['finish_reason'] == 'error'):
            sys.exit('%s: finish_reason %s' % (k, r['finish_reason']))
        if k in args[1:] and not r.get('error'):
            sys.exit('%s: no error message' % k)
elif cmd == 'prefix':   # OUT N: lines [0, N) are those of FILE args[2]
    a = open(args[0], 'rb').read().split(b'\n')
    b = open(args[2], 'rb').read().split(b'\n')
    if a[:int(args[1])] != b[:int(args[1])]:
        sys.exit('the first lines changed')
elif cmd == 'cached':   # OUT MIN ID...: these ids have cached_tokens >= MIN
    rs = by_id(args[0])
    for k in args[2:]:
        if rs[k]['cached_tokens'] < int(args[1]):
            sys.exit('%s: cached_tokens %d' % (k, rs[k]['cached_tokens']))
elif cmd == 'gen':      # KIND N: write an input of N records
    kind, count = args[0], int(args[1])
    doc = ('The quick brown fox jumps over the lazy dog near the river bank. ' * 5)
    for i in range(count):
        if kind == 'mixed':
            if i % 3 == 2:
                r = {'id': 'r%02d' % i, 'messages': [{'role': 'system', 'content': 'Be brief.'},
                     {'role': 'user', 'content': 'Question %d?' % i}]}
            else:
                r = {'id': 'r%02d' % i, 'prompt': 'Tell me about %d things' % i}
            if i % 4 == 1:
                r['max_tokens'] = 5
        elif kind == 'uneven':   # prompts of 1 to 150 words (about 600 tokens), long and
            n = [1, 150, 2, 90, 3, 120, 1, 60][i % 8]   # short in turn
            r = {'id': 'u%02d' % i, 'prompt': ' '.join('w%d' % (k % 97) for k in range(n)),
                 'raw': True}
        elif kind == 'doc':
            r = {'id': 'q%02d' % i, 'prompt': doc + 'Question %d: what happened?' % i,
                 'raw': True}
        else:
            r = {'id': 'k%03d' % i, 'prompt': 'Story number %d' % i}
        print(json.dumps(r))
else:
    sys.exit('unknown check ' + cmd)
EOF

ids() {   # ids FILE: the ids of an input file, in order
    "$py" -c 'import json,sys
for l in open(sys.argv[1]): print(json.loads(l)["id"])' "$1"
}

# ---- greedy results: --parallel 1 and 4 agree with each other and with kli run -------------
"$py" "$tmp/check.py" gen mixed 12 >"$tmp/in.jsonl"
all=$(ids "$tmp/in.jsonl")
t "batch --parallel 1" 0 "$kli" batch -m "$model" -i "$tmp/in.jsonl" -o "$tmp/p1.jsonl" \
    -P 1 -n 16 --temp 0 -t 1
t "batch --parallel 4" 0 "$kli" batch -m "$model" -i "$tmp/in.jsonl" -o "$tmp/p4.jsonl" \
    -P 4 -n 16 --temp 0 -t 1 --quiet
c "--parallel 4: every id exactly once" ids "$tmp/p4.jsonl" $all
c "--parallel 1: every id exactly once" ids "$tmp/p1.jsonl" $all
c "no record failed" ok "$tmp/p4.jsonl"
c "greedy text is the same with --parallel 1 and 4" same "$tmp/p1.jsonl" "$tmp/p4.jsonl"
for i in 0 3 4; do
    "$kli" run -m "$model" -p "Tell me about $i things" -n 16 --temp 0 -t 1 --quiet \
        >"$tmp/run$i.txt" 2>/dev/null
    c "r0$i: the text of kli run --temp 0 -n 16" text "$tmp/p4.jsonl" "r0$i" "$tmp/run$i.txt"
done
"$kli" run -m "$model" -p 'Tell me about 1 things' -n 5 --temp 0 -t 1 --quiet \
    >"$tmp/run1.txt" 2>/dev/null
c "r01: the record's max_tokens wins over -n" text "$tmp/p4.jsonl" r01 "$tmp/run1.txt"

# ---- very unequal lengths: a short sequence leads a step whose others are long (its scratch
# serves the step; its attention workspace once served only its own context) ----------------
"$py" "$tmp/check.py" gen uneven 8 >"$tmp/uneven.jsonl"
uneven=$(ids "$tmp/uneven.jsonl")
t "uneven lengths, --parallel 4" 0 "$kli" batch -m "$model" -i "$tmp/uneven.jsonl" \
    -o "$tmp/u4.jsonl" -P 4 -n 6 --temp 0 -t 1 --quiet
t "uneven lengths, --parallel 1" 0 "$kli" batch -m "$model" -i "$tmp/uneven.jsonl" \
    -o "$tmp/u1.jsonl" -P 1 -n 6 --temp 0 -t 1 --quiet
c "uneven lengths: every id exactly once" ids "$tmp/u4.jsonl" $uneven
c "uneven lengths: no record failed" ok "$tmp/u4.jsonl"
c "uneven lengths: the same text with --parallel 1 and 4" same "$tmp/u1.jsonl" "$tmp/u4.jsonl"

# ---- resume --------------------------------------------------------------------------------
head -n 8 "$tmp/p4.jsonl" >"$tmp/res.jsonl"
cp "$tmp/res.jsonl" "$tmp/res8.jsonl"
t "a rerun after losing the last lines" 0 "$kli" batch -m "$model" -i "$tmp/in.jsonl" \
    -o "$tmp/res.jsonl" -P 3 -n 16 --temp 0 -t 1
c "resume: every id exactly once" ids "$tmp/res.jsonl" $all
c "resume: the lines already there are kept as they were" prefix "$tmp/res.jsonl" 8 \
    "$tmp/res8.jsonl"
c "resume: the same texts" same "$tmp/res.jsonl" "$tmp/p4.jsonl"
if grep -q "4 records to run, 8 already in" "$tmp/stderr"; then ok "resume: only 4 to run"
else notok "resume: only 4 to run"; sed 's/^/# /' "$tmp/stderr" | head -3; fi
printf '{"id":"r00","te' >>"$tmp/res.jsonl"
t "a torn last line is dropped" 0 "$kli" batch -m "$model" -i "$tmp/in.jsonl" \
    -o "$tmp/res.jsonl" -n 16 --temp 0 -t 1
c "... and the output is whole again" ids "$tmp/res.jsonl" $all
t "--overwrite starts over" 0 "$kli" batch -m "$model" -i "$tmp/in.jsonl" \
    -o "$tmp/res.jsonl" -n 16 --temp 0 -t 1 --overwrite --quiet
c "--overwrite: every id exactly once" ids "$tmp/res.jsonl" $all

# ---- bad records ---------------------------------------------------------------------------
{
    echo '{"id":"good1","prompt":"Hi","max_tokens":4}'
    echo '{"id":"broken","prompt":'
    echo '{"id":"noprompt"}'
    echo ''
    echo '{"id":"both","prompt":"x","messages":[]}'
    echo '{"id":"badtemp","prompt":"x","temperature":-1}'
    echo '{"id":"huge","prompt":"0123456789012345678901234567890123456789"}'
    echo '[1,2]'
    echo '{"id":"good1","prompt":"again"}'
    echo '{"prompt":"no id","max_tokens":4}'
    echo '{"id":"good2","messages":[{"role":"user","content":"Hey"}],"max_tokens":4,"stop":["e"]}'
} >"$tmp/bad.jsonl"
t "bad records do not stop the batch" 0 "$kli" batch -m "$model" -i "$tmp/bad.jsonl" \
    -o "$tmp/bad.out" --max-prompt-bytes 32 -t 1 --temp 0 --max-errors 7
c "one line per record, ids or line numbers" ids "$tmp/bad.out" good1 line:2 noprompt both \
    badtemp huge line:8 line:9 line:10 good2
c "error lines for the bad ones only" errors "$tmp/bad.out" line:2 noprompt both badtemp huge \
    line:8 line:9

# ---- shards --------------------------------------------------------------------------------
for k in 1 2 3; do
    t "--shard $k/3" 0 "$kli" batch -m "$model" -i "$tmp/in.jsonl" -o "$tmp/s$k.jsonl" \
        --shard $k/3 -n 4 --temp 0 -t 1 --quiet
done
cat "$tmp/s1.jsonl" "$tmp/s2.jsonl" "$tmp/s3.jsonl" >"$tmp/s.jsonl"
c "three shards cover every id exactly once" ids "$tmp/s.jsonl" $all
if [ -s "$tmp/s1.jsonl" ] && [ -s "$tmp/s2.jsonl" ] && [ -s "$tmp/s3.jsonl" ]; then
    ok "every shard has records"
else
    notok "every shard has records"
fi

# ---- SIGINT --------------------------------------------------------------------------------
"$py" "$tmp/check.py" gen many 60 >"$tmp/many.jsonl"
many=$(ids "$tmp/many.jsonl")
"$kli" batch -m "$model" -i "$tmp/many.jsonl" -o "$tmp/int.jsonl" -P 2 -n 300 --temp 0 \
    -t 1 --quiet 2>"$tmp/int.err" &
pid=$!
poll 400 test -s "$tmp/int.jsonl"
kill -INT $pid 2>/dev/null
wait $pid
rc=$?
if [ $rc -eq 130 ]; then ok "SIGINT: exit 130"; else notok "SIGINT: exit $rc, want 130"; fi
lines=$(wc -l <"$tmp/int.jsonl")
if [ "$lines" -lt 60 ]; then ok "SIGINT: stopped early ($lines of 60 lines)"; else
    notok "SIGINT: did not stop early"; fi
if "$py" "$tmp/check.py" ok "$tmp/int.jsonl" >"$tmp/check.out" 2>&1; then
    ok "SIGINT: only whole lines"
else
    notok "SIGINT: only whole lines"; sed 's/^/# /' "$tmp/check.out" | head -3
fi
t "a rerun after SIGINT" 0 "$kli" batch -m "$model" -i "$tmp/many.jsonl" -o "$tmp/int.jsonl" \
    -P 4 -n 300 --temp 0 -t 1 --quiet
c "... completes the set, every id once" ids "$tmp/int.jsonl" $many

# ---- prefix reuse --------------------------------------------------------------------------
"$py" "$tmp/check.py" gen doc 6 >"$tmp/doc.jsonl"
docs=$(ids "$tmp/doc.jsonl")
t "without prefix reuse" 0 "$kli" batch -m "$model" -i "$tmp/doc.jsonl" -o "$tmp/d0.jsonl" \
    --prefix-cache 0 -P 2 -n 12 --temp 0 -t 1 --quiet
t "with prefix reuse" 0 "$kli" batch -m "$model" -i "$tmp/doc.jsonl" -o "$tmp/d1.jsonl" \
    -P 2 -n 12 --temp 0 -t 1
c "prefix reuse: the same greedy texts" same "$tmp/d0.jsonl" "$tmp/d1.jsonl"
c "prefix reuse: cached_tokens > 300 after the first record" cached "$tmp/d1.jsonl" 300 \
    q01 q02 q03 q04 q05
c "without it: cached_tokens 0" cached "$tmp/d0.jsonl" 0 $docs
t "--prefix-dir writes snapshots" 0 "$kli" batch -m "$model" -i "$tmp/doc.jsonl" \
    -o "$tmp/d2.jsonl" --prefix-dir "$tmp/pfx" -P 2 -n 12 --temp 0 -t 1 --quiet
if ls "$tmp/pfx" | grep -q '\.klisnap$'; then ok "a snapshot is in the directory"; else
    notok "a snapshot is in the directory"; fi
t "a second run loads it" 0 "$kli" batch -m "$model" -i "$tmp/doc.jsonl" -o "$tmp/d2.jsonl" \
    --prefix-dir "$tmp/pfx" --prefix-cache 0 --overwrite -P 2 -n 12 --temp 0 -t 1
c "... so even the first record starts from the prefix" cached "$tmp/d2.jsonl" 300 $docs
c "... with the same texts" same "$tmp/d0.jsonl" "$tmp/d2.jsonl"

# ---- usage and I/O errors ------------------------------------------------------------------
t "no -o is a usage error" 2 "$kli" batch -m "$model" -i "$tmp/in.jsonl"
t "--shard 4/3 is a usage error" 2 "$kli" batch -m "$model" -i "$tmp/in.jsonl" -o "$tmp/x" \
    --shard 4/3
t "--parallel 0 is a usage error" 2 "$kli" batch -m "$model" -i "$tmp/in.jsonl" -o "$tmp/x" \
    -P 0
t "--prefix-cache 1X is a usage error" 2 "$kli" batch -i "$tmp/in.jsonl" -o "$tmp/x" \
    --prefix-cache 1X
t "--gpu sometimes is a usage error" 2 "$kli" batch -m "$model" -i "$tmp/in.jsonl" -o "$tmp/x" \
    --gpu sometimes
t "--gpu off is accepted" 0 "$kli" batch -m "$model" -i "$tmp/in.jsonl" -o "$tmp/g.jsonl" \
    --gpu off -P 2 -n 4 --temp 0 -t 1
t "a missing input is an I/O error" 1 "$kli" batch -m "$model" -i "$tmp/none" -o "$tmp/x"
t "an output that cannot be created is an I/O error" 1 "$kli" batch -m "$model" \
    -i "$tmp/in.jsonl" -o "$tmp/no/such/dir.jsonl"
t "--help" 0 "$kli" batch --help

echo "1..$n"
exit $fail
