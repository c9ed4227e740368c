#!/bin/sh
# test-configs.sh - kli against an independent float64 NumPy reference (contrib/reference/
# kimi_ref.py) on random checkpoints of configurations the golden fixture does not cover:
# real per-head sizes, a sharded checkpoint with F32-stored gate parameters, grouped routing
# with several shared experts and dense lead layers and odd head counts, a softmax router
# with tied F16 embeddings. Each is fed in one call, one token at a time and in chunks of 13.
# The reference itself is first checked against the official golden logits.
set -u
: "${KLI_BIN:?}" "${KLI_SRCDIR:?}" "${KLI_TESTDATA:?}"
REF="$KLI_SRCDIR/contrib/reference/kimi_ref.py"
. "$KLI_SRCDIR/tests/lib.sh"
need_python numpy "no python3 with numpy (apt-get install python3-numpy)"

fixture="$KLI_TESTDATA/tiny-kimi-linear"
ids=$("$PY" -c "import json,sys; print(','.join(map(str, json.load(open(sys.argv[1]))['prompt'])))" \
      "$fixture/golden.json")
if tcase reference; then
    "$PY" "$REF" logits "$fixture" "$ids" "$tmp/fix.ref" &&
        out=$("$PY" "$REF" compare "$tmp/fix.ref" "$fixture/ref64_prefill.f32" 512 1e-5) &&
        ok "numpy reference matches the official golden logits ($out)" ||
        notok "numpy reference vs official golden: $out"
fi

ids=$("$PY" -c "import random; r=random.Random(3); print(','.join(str(r.randrange(300)) for _ in range(90)))")
for v in realheads sharded_f32 grouped softmax_tied; do
    tcase "$v" || continue
    if ! "$PY" "$REF" make "$tmp/$v" "$v" 7 || ! "$PY" "$REF" logits "$tmp/$v" "$ids" "$tmp/$v.ref"
    then
        notok "$v: reference failed"
        continue
    fi
    for chunk in 0 1 13; do
        args=""
        [ "$chunk" -gt 0 ] && args="--chunk $chunk"
        # shellcheck disable=SC2086
        if "$KLI_BIN" logits -m "$tmp/$v" --ids "$ids" $args -o "$tmp/$v.out" &&
           out=$("$PY" "$REF" compare "$tmp/$v.out" "$tmp/$v.ref" 300 1e-4); then
            ok "$v chunk=$chunk: $out"
        else
            notok "$v chunk=$chunk: ${out:-kli failed}"
        fi
    done
done
tdone
