#!/bin/sh
# test-edge.sh - edge mode on a model larger than the memory it may use: a 200 MB random
# checkpoint (contrib/reference/kimi_ref.py, variant "edge": 128 routed experts of 1.5 MiB)
# run with --mem-budget 96M. The peak resident size of the kli process, read by the parent
# (getrusage of the child), less that of a trivial run of the same build (kli, its libraries,
# a sanitizer's runtime), stays under the budget while the resident run's exceeds it; the
# logits equal the resident run's bit for bit and the float64 NumPy reference's within
# 1e-4; the CLI refuses a budget below the least and a list outside kli bench; kli bench
# reports the cache's hit rate and bytes read per token, and sizes its read probe, run before
# the model opens, within the triad's arrays. Every run is CPU-only (--gpu off): a
# resident run with a GPU computes hot experts there, and the CUDA runtime's own memory is not
# part of what the budget bounds.
set -u
: "${KLI_BIN:?}" "${KLI_SRCDIR:?}" "${KLI_TESTDATA:?}"
REF="$KLI_SRCDIR/contrib/reference/kimi_ref.py"
. "$KLI_SRCDIR/tests/lib.sh"
need_python "numpy, resource" "no python3 with numpy (apt-get install python3-numpy)"

# Peak RSS in bytes of one command, measured from outside it.
cat >"$tmp/rss.py" <<'EOF'
import resource, subprocess, sys
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
sys.stderr.write(r.stderr.decode(errors="replace"))
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
sys.exit(r.returncode)
EOF

M="$tmp/edge"
if ! "$PY" "$REF" make "$M" edge 5; then
    notok "the edge model could not be written"
    echo "1..$n"
    exit 1
fi
size=$(wc -c <"$M/model.safetensors")
budget=$((96 * 1024 * 1024))
ids=$("$PY" -c "import random; r=random.Random(3); print(','.join(str(r.randrange(300)) for _ in range(40)))")

res_rss=$("$PY" "$tmp/rss.py" "$KLI_BIN" logits --gpu off -m "$M" --chunk 1 --ids "$ids" -o "$tmp/res.f32")
check $? "resident run (model $((size / 1048576)) MiB): peak RSS $((res_rss / 1048576)) MiB"
edge_rss=$("$PY" "$tmp/rss.py" "$KLI_BIN" logits --gpu off -m "$M" --chunk 1 --mem-budget 96M \
           --ids "$ids" -o "$tmp/edge.f32" 2>"$tmp/edge.err")
check $? "edge run with --mem-budget 96M: $(cat "$tmp/edge.err")"
[ "$size" -gt "$budget" ] && [ "$res_rss" -gt "$budget" ]
check $? "the model ($size bytes) and the resident run ($res_rss) exceed the budget ($budget)"
# What the budget bounds is measured against the same build's floor: the peak of a trivial
# run (the tiny fixture, two ids) holds kli, its libraries and a sanitizer's runtime and
# shadow, which no budget counts. Without a sanitizer the whole process fits the budget too.
base_rss=$("$PY" "$tmp/rss.py" "$KLI_BIN" logits --gpu off -m "$KLI_TESTDATA/tiny-kimi-linear" \
           --ids 1,2 -o "$tmp/base.f32")
rc=$?
sanitized=0
grep -q -a -e __asan_init -e __ubsan_handle "$KLI_BIN" && sanitized=1
[ $rc = 0 ] && [ "$edge_rss" -gt 0 ] && [ $((edge_rss - base_rss)) -le "$budget" ] &&
    { [ $sanitized = 1 ] || [ "$edge_rss" -le "$budget" ]; }
check $? "the edge run's peak RSS ($edge_rss bytes) less a trivial run's ($base_rss) stays under the budget ($budget)$([ $sanitized = 1 ] || echo ', and so does the whole')"
cmp -s "$tmp/res.f32" "$tmp/edge.f32"
check $? "edge logits equal the resident logits bit for bit"
grep -q "expert cache: [0-9]* of 128 experts" "$tmp/edge.err"
check $? "the run ends with the cache line on stderr"

if "$PY" "$REF" logits "$M" "$ids" "$tmp/ref.f32" &&
   out=$("$PY" "$REF" compare "$tmp/edge.f32" "$tmp/ref.f32" 300 1e-4); then
    ok "edge logits vs the NumPy reference: $out"
else
    notok "edge logits vs the NumPy reference: ${out:-reference failed}"
fi

# One call (prefill) and chunks of 5 too.
for chunk in 0 5; do
    args=""
    [ "$chunk" -gt 0 ] && args="--chunk $chunk"
    # shellcheck disable=SC2086
    "$KLI_BIN" logits --gpu off -m "$M" $args --ids "$ids" -o "$tmp/r$chunk.f32" &&
        "$KLI_BIN" logits --gpu off -m "$M" $args --mem-budget 64M --ids "$ids" -o "$tmp/e$chunk.f32" \
            2>/dev/null && cmp -s "$tmp/r$chunk.f32" "$tmp/e$chunk.f32"
    check $? "chunk $chunk, --mem-budget 64M: logits bit-identical"
done

# The narrow latent caches: edge mode changes where the experts come from, not the cache.
for ct in bf16 q8_0; do
    if ! "$KLI_BIN" logits --gpu off -m "$M" --cache-type $ct --ids "$ids" -o "$tmp/rc.f32" \
        2>"$tmp/ct.err"; then
        if grep -q "cannot hold" "$tmp/ct.err"; then
            ok "--cache-type $ct # SKIP the model's rows are no whole q8_0 blocks"
        else
            notok "--cache-type $ct: $(head -1 "$tmp/ct.err")"
        fi
        continue
    fi
    "$KLI_BIN" logits --gpu off -m "$M" --cache-type $ct --mem-budget 64M --ids "$ids" \
        -o "$tmp/ec.f32" 2>/dev/null && cmp -s "$tmp/rc.f32" "$tmp/ec.f32"
    check $? "--cache-type $ct, --mem-budget 64M: logits bit-identical"
done

# Refusals.
out=$("$KLI_BIN" logits --gpu off -m "$M" --mem-budget 20M --ids 1,2 -o "$tmp/x.f32" 2>&1)
rc=$?
[ $rc -ne 0 ] && echo "$out" | grep -q "the least budget is"
check $? "a budget below the least is refused (exit $rc): $out"
out=$("$KLI_BIN" logits --gpu off -m "$M" --mem-budget 64M,96M --ids 1,2 -o "$tmp/x.f32" 2>&1)
rc=$?
[ $rc -ne 0 ] && echo "$out" | grep -q "a list is for kli bench"
check $? "a list of budgets outside kli bench is refused (exit $rc)"
out=$("$KLI_BIN" logits --gpu off -m "$M" --mem-budget 12Q --ids 1,2 -o "$tmp/x.f32" 2>&1)
rc=$?
[ $rc -ne 0 ] && echo "$out" | grep -q "not a size"
check $? "a malformed size is refused (exit $rc): $out"
least=$("$KLI_BIN" info -m "$M" | sed -n 's/^edge mode: *least --mem-budget \([0-9]*\) bytes.*/\1/p')
[ -n "$least" ] && "$KLI_BIN" logits --gpu off -m "$M" --mem-budget "$least" --chunk 1 --ids "$ids" \
    -o "$tmp/least.f32" 2>/dev/null && cmp -s "$tmp/res.f32" "$tmp/least.f32"
check $? "kli info's least budget ($least bytes) runs, bit-identical"

# A sharded checkpoint (3 files, F32 gate parameters): experts read from every shard.
S="$tmp/sharded"
if "$PY" "$REF" make "$S" sharded_f32 3; then
    sl=$("$KLI_BIN" info -m "$S" | sed -n 's/^edge mode: *least --mem-budget \([0-9]*\) bytes.*/\1/p')
    "$KLI_BIN" logits --gpu off -m "$S" --chunk 1 --ids "$ids" -o "$tmp/sr.f32" &&
        "$KLI_BIN" logits --gpu off -m "$S" --chunk 1 --mem-budget "$sl" --ids "$ids" \
            -o "$tmp/se.f32" 2>/dev/null && cmp -s "$tmp/sr.f32" "$tmp/se.f32"
    check $? "sharded checkpoint at its least budget ($sl bytes): logits bit-identical"
else
    notok "the sharded model could not be written"
fi

# kli bench: one JSON object per budget with the cache's numbers. The probes run before the
# model opens, the read probe's buffer max(4 x LLC, 256 MiB) but no larger than the triad's
# three arrays: 192 MiB for a pretended 1 MiB cache.
KLI_BENCH_LLC=1M "$KLI_BIN" bench --gpu off -m "$M" -p 8 -n 8 -r 1 --mem-budget 64M,128M \
    --json >"$tmp/bench.json" 2>/dev/null
check $? "kli bench --mem-budget 64M,128M"
"$PY" - "$tmp/bench.json" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
assert len(rows) == 2, rows
for r, b in zip(rows, (64 << 20, 128 << 20)):
    assert r["mem_budget"] == b, r
    assert 0 <= r["cache_hit_rate"] <= 1 and r["cache_bytes_read_per_token"] >= 0, r
    assert 0 < r["cache_slots"] <= r["cache_experts"] == 128, r
    assert r["decode_tok_s"] > 0 and r["peak_rss_bytes"] > 0, r
    assert r["triad_bytes"] == 64 << 20 and r["read_probe_bytes"] == 192 << 20, r
    assert r["read_gb_s"] > 0 and 0 < r["roofline_fraction"] <= 1, r
assert rows[1]["cache_slots"] > rows[0]["cache_slots"], rows
EOF
check $? "bench prints one object per budget with hit rate, bytes read per token, slots and probes"

echo "1..$n"
exit $fail
