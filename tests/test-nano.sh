#!/bin/sh
# test-nano.sh - the trained demo model (contrib/models/kimi-linear-nano) against the float64
# logits its trainer wrote from the stored bf16 weights (tests/data/nano, see
# contrib/models/kimi-linear-nano/README.md): the prompt plus the greedy continuation in one
# call (prefill path) and one token per call (decode path), each within 1e-5 relative L2,
# and the greedy tokens equal. The demo built into kli is this model: `kli run` without -m
# answers the demo prompt in valid UTF-8 made of dictionary words of the training text.
set -u
: "${KLI_BIN:?}" "${KLI_TESTDATA:?}" "${KLI_SRCDIR:?}"
. "$KLI_SRCDIR/tests/lib.sh"
need_python numpy "no python3 with numpy"
M="$KLI_SRCDIR/contrib/models/kimi-linear-nano"
G="$KLI_TESTDATA/nano"

ids=$("$PY" -c "import json,sys; g=json.load(open(sys.argv[1])); \
print(','.join(map(str, g['prompt'] + g['decode_tokens'])))" "$G/golden.json")
"$KLI_BIN" logits --gpu off -m "$M" --ids "$ids" -o "$tmp/one.f32" 2>"$tmp/err"
check $? "kli logits, one call"
"$KLI_BIN" logits --gpu off -m "$M" --ids "$ids" --chunk 1 -o "$tmp/dec.f32" 2>"$tmp/err"
check $? "kli logits, one token per call"

for run in one dec; do
    "$PY" - "$G" "$tmp/$run.f32" <<'EOF' >"$tmp/$run.out" 2>&1
import json, sys
import numpy as np
g = json.load(open(sys.argv[1] + "/golden.json"))
P, D, V = len(g["prompt"]), len(g["decode_tokens"]), g["vocab"]
got = np.fromfile(sys.argv[2], dtype="<f4").astype(np.float64).reshape(P + D, V)
pre = np.fromfile(sys.argv[1] + "/ref64_prefill.f32", dtype="<f4").reshape(P, V)
dec = np.fromfile(sys.argv[1] + "/ref64_decode.f32", dtype="<f4").reshape(D, V)
ep = np.linalg.norm(got[:P] - pre) / np.linalg.norm(pre)
ed = np.linalg.norm(got[P:] - dec) / np.linalg.norm(dec)
greedy = list(got[P - 1:P + D - 1].argmax(1))
print("prompt rows %.3g, decode rows %.3g" % (ep, ed))
assert ep < 1e-5 and ed < 1e-5, (ep, ed)
assert greedy == g["decode_tokens"], (greedy, g["decode_tokens"])
EOF
    check $? "$run: logits within 1e-5 of the float64 reference, same greedy tokens: \
$(head -c 80 "$tmp/$run.out")"
done

# The demo: no -m. Greedy (temperature 0) so the text is fixed for given weights.
"$KLI_BIN" run --gpu off -p "Tell me about the town by the sea." -n 40 --temp 0 \
    >"$tmp/demo.txt" 2>"$tmp/err"
check $? "kli run with the demo model"
"$PY" - "$tmp/demo.txt" "$G/words.txt" <<'EOF' >"$tmp/demo.out" 2>&1
import re, sys
text = open(sys.argv[1], "rb").read().decode("utf-8")      # valid UTF-8 or it raises
words = [w.lower() for w in re.findall(r"[A-Za-z]+", text)]
# words.txt: every word written at least 5 times in the training text (KJV, WordNet)
known = set(open(sys.argv[2]).read().split())
assert len(words) >= 10, text
assert sum(w in known for w in words) >= 0.95 * len(words), text
assert re.search(r"[A-Z][a-z]+( [a-z]+)+[,.;:]", text), text       # a sentence's shape
print(text[:60])
EOF
check $? "the demo answers in UTF-8 English words: $(head -c 60 "$tmp/demo.out" | tr '\n' ' ')"
if [ "$fail" != 0 ]; then cat "$tmp/one.out" "$tmp/dec.out" "$tmp/demo.out" "$tmp/err" >&2; fi

echo "1..$n"
exit $fail
