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
else:
    sys.exit('unknown check ' + cmd)
EOF

is() { if [ "$1" = "$2" ]; then ok "$3"; else notok "$3 (got '$1', want '$2')"; fi; }
c() {   # c DESCRIPTION CHECK ARGS...
    _d=$1
    shift
    "$py" "$tmp/check.py" "$@" >"$tmp/check.out" 2>&1
    _r=$?
    check $_r "$_d"
    [ $_r = 0 ] || sed 's/^/# /' "$tmp/check.out" | head -5
}

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
    t "lines go to standard error without --logprobs-file" 0 "$kli" run -m "$model" -p x -n 3 \
        --temperature 0 --logprobs 1 --quiet
    k=$(grep -c '^{"id":' "$tmp/stderr")
    is "$k" 3 "... one line per token"
fi

tdone
