#!/bin/sh
# test-perplexity.sh - kli perplexity on the tiny fixture against a NumPy computation made
# here from `kli tokenize` ids and `kli logits` rows: the scored tokens (each after the
# first, once, in the documented windows when the file is longer than --ctx, BOS only with
# --bos), the mean NLL and its standard error, and with --kld-base the KL divergence
# statistics, top-1 agreement and the change in the correct token's probability of a q8_0
# copy against the stored weights. A base file written for another ctx is refused, and so
# are bases that are no files (a FIFO) or would be written through a dangling link.
set -u
: "${KLI_BIN:?}" "${KLI_TESTDATA:?}" "${KLI_SRCDIR:?}"
. "$KLI_SRCDIR/tests/lib.sh"
need_python numpy "no python3 with numpy"
M="$KLI_TESTDATA/tiny-kimi-linear"
K="$KLI_BIN"

printf 'The town by the sea had a harbour, and the ships came in at dusk.\nNew line.' \
    >"$tmp/t.txt"
"$K" tokenize -m "$M" -f "$tmp/t.txt" >"$tmp/ids" 2>"$tmp/err"
check $? "kli tokenize"
"$K" quantize -m "$M" -o "$tmp/q8" --type q8_0 >/dev/null 2>&1
check $? "kli quantize q8_0"

# the reference: kli logits of every window (the ids are given, not tokenized again)
"$PY" - "$tmp" "$K" "$M" <<'EOF' >"$tmp/ref.out" 2>&1
import json, subprocess, sys
import numpy as np

tmp, K, M = sys.argv[1:4]
ids = [int(x) for x in open(tmp + "/ids").read().split()]
bos = json.load(open(M + "/config.json"))["bos_token_id"]
V = json.load(open(M + "/config.json"))["vocab_size"]


def logits(model, toks):
    subprocess.run([K, "logits", "--gpu", "off", "-m", model, "--ids",
                    ",".join(map(str, toks)), "-o", tmp + "/l.f32"], check=True)
    return np.fromfile(tmp + "/l.f32", dtype="<f4").astype(np.float64).reshape(len(toks), V)


def logprobs(model, toks, ctx):
    """[(position, log-probabilities predicting it)] in the documented windows."""
    keep, stride, out, start = ctx // 2, ctx - ctx // 2, [], 0
    while True:
        end = min(start + ctx, len(toks))
        lg = logits(model, toks[start:end])
        lp = lg - lg.max(1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(1, keepdims=True))
        first = 1 if start == 0 else start + keep
        out += [(p, lp[p - 1 - start]) for p in range(first, end)]
        if end == len(toks):
            return out
        start += stride


res = {}
for name, toks, ctx in (("full", ids, 4096), ("win", ids, 6), ("bos", [bos] + ids, 4096)):
    lp = logprobs(M, toks, ctx)
    assert [p for p, _ in lp] == list(range(1, len(toks))), name
    nll = np.array([-row[toks[p]] for p, row in lp])
    res[name] = {"tokens": len(nll), "nll_mean": nll.mean(),
                 "nll_err": nll.std(ddof=1) / np.sqrt(len(nll)), "file_tokens": len(toks)}
    if name == "win":
        q = logprobs(tmp + "/q8", toks, ctx)
        kl = np.array([np.sum(np.exp(a[1]) * (a[1] - b[1])) for a, b in zip(lp, q)])
        res["kld"] = {
            "kld_mean": kl.mean(), "kld_median": np.median(kl),
            "top1_agreement": np.mean([a[1].argmax() == b[1].argmax() for a, b in zip(lp, q)]),
            "delta_p_mean": np.mean([np.exp(b[1][toks[b[0]]]) - np.exp(a[1][toks[a[0]]])
                                     for a, b in zip(lp, q)]),
            "base_perplexity": np.exp(nll.mean()),
            "perplexity": np.exp(np.mean([-b[1][toks[b[0]]] for b in q]))}
json.dump(res, open(tmp + "/ref.json", "w"), default=float)
print("reference done")
EOF
check $? "reference computed with kli logits and NumPy"

"$K" perplexity --gpu off -m "$M" -f "$tmp/t.txt" --json >"$tmp/full.json" 2>"$tmp/err"
check $? "kli perplexity --json"
"$K" perplexity --gpu off -m "$M" -f "$tmp/t.txt" --ctx 6 --json >"$tmp/win.json" 2>"$tmp/err"
check $? "kli perplexity --ctx 6 (windows)"
"$K" perplexity --gpu off -m "$M" -f "$tmp/t.txt" --bos --json >"$tmp/bos.json" 2>"$tmp/err"
check $? "kli perplexity --bos"
"$K" perplexity --gpu off -m "$M" -f "$tmp/t.txt" --ctx 6 --kld-base "$tmp/base.kld" \
    >"$tmp/w.txt" 2>"$tmp/err"
check $? "kli perplexity --kld-base writes the base"
"$K" perplexity --gpu off -m "$tmp/q8" -f "$tmp/t.txt" --ctx 6 --kld-base "$tmp/base.kld" \
    --json >"$tmp/kld.json" 2>"$tmp/err"
check $? "kli perplexity --kld-base compares with it"
"$K" perplexity --gpu off -m "$tmp/q8" -f "$tmp/t.txt" --ctx 8 --kld-base "$tmp/base.kld" \
    >/dev/null 2>"$tmp/err"
test $? -ne 0 && grep -q "ctx 6" "$tmp/err"
check $? "a base written for another --ctx is refused"
"$K" perplexity -m "$M" >/dev/null 2>&1
test $? -eq 2
check $? "perplexity without -f is a usage error"

"$PY" - "$tmp" <<'EOF' >"$tmp/cmp.out" 2>&1
import json, sys
tmp = sys.argv[1]
ref = json.load(open(tmp + "/ref.json"))


def close(a, b, tol, what):
    assert abs(a - b) <= tol * max(1.0, abs(b)), (what, a, b)


for name in ("full", "win", "bos"):
    got = json.load(open("%s/%s.json" % (tmp, name)))
    r = ref[name]
    assert got["tokens"] == r["tokens"] and got["file_tokens"] == r["file_tokens"], (name, got)
    close(got["nll_mean"], r["nll_mean"], 1e-5, name + " nll_mean")
    close(got["nll_err"], r["nll_err"], 1e-4, name + " nll_err")
    close(got["perplexity"], 2.718281828459045 ** r["nll_mean"], 1e-5, name + " perplexity")
    assert got["bos"] == (name == "bos")
assert json.load(open(tmp + "/win.json"))["windows"] > 1
got = json.load(open(tmp + "/kld.json"))
r = ref["kld"]
assert got["kld_mean"] > 0, got
for k in ("kld_mean", "kld_median"):
    close(got[k], r[k], 1e-3 * r["kld_mean"] + 1e-7, k)
close(got["top1_agreement"], r["top1_agreement"], 1e-6, "top1")
close(got["delta_p_mean"], r["delta_p_mean"], 1e-6, "delta_p")
close(got["base_perplexity"], r["base_perplexity"], 1e-5, "base_perplexity")
close(got["perplexity"], r["perplexity"], 1e-5, "perplexity")
print("all equal")
EOF
check $? "perplexity, windows, BOS and KLD statistics match the NumPy reference"
if [ "$fail" != 0 ]; then cat "$tmp/ref.out" "$tmp/cmp.out" "$tmp/err" >&2; fi

# --kld-base where a file is expected: a FIFO is refused at once, not waited on; a dangling
# link is not written through; a base that is the text itself is not a base. None of them
# is changed.
mkfifo "$tmp/fifo" && ln -s "$tmp/nowhere" "$tmp/dangling" || exit 99
cp "$tmp/t.txt" "$tmp/t.keep"
timeout 60 "$K" perplexity -m "$M" -f "$tmp/t.txt" --kld-base "$tmp/fifo" >/dev/null \
    2>"$tmp/e1"
r1=$?
timeout 60 "$K" perplexity -m "$M" -f "$tmp/t.txt" --kld-base "$tmp/dangling" >/dev/null \
    2>"$tmp/e2"
r2=$?
timeout 60 "$K" perplexity -m "$M" -f "$tmp/t.txt" --kld-base "$tmp/t.txt" >/dev/null \
    2>"$tmp/e3"
r3=$?
[ $r1 -eq 1 ] && grep -q "FIFO" "$tmp/e1" && [ -p "$tmp/fifo" ] &&
    [ $r2 -eq 1 ] && ! [ -e "$tmp/nowhere" ] && [ $r3 -eq 1 ] && cmp -s "$tmp/t.txt" "$tmp/t.keep"
check $? "--kld-base: a FIFO, a dangling link and the text file itself are refused, unchanged ($r1 $r2 $r3)"

echo "1..$n"
exit $fail
