#!/bin/sh
# test-bench.sh - kli bench on the tiny fixture: the JSON object has every key the targets
# name, with numbers that hang together; decode_bytes_per_token equals a count made here from
# the checkpoint's own header by the rule kli(3) states for kli_model_decode_bytes; the
# roofline fraction, against the read probe, lies in (0, 1] and between the extremes its
# repetitions allow, and the triad's too; the bandwidth probes' buffers (3 x 64 MiB and 64
# MiB, run between repetitions) stay out of the reported peak resident size; the triad's
# arrays are four times the last-level cache between 64 and 256 MiB and the read probe's
# buffer min(decode bytes, max(4 x LLC, 256 MiB)), at least 64 MiB, whatever cache the host
# has or pretends to have (KLI_BENCH_LLC); KLI_SIMD is honoured and named; bad arguments are
# refused.
# Speed itself is not tested.
set -u
: "${KLI_BIN:?}" "${KLI_TESTDATA:?}" "${KLI_SRCDIR:?}"
. "$KLI_SRCDIR/tests/lib.sh"
need_python json "no python3"
M="$KLI_TESTDATA/tiny-kimi-linear"

# A small pretended cache: 64 MiB arrays on every host, as the peak bound below assumes.
KLI_BENCH_LLC=1M "$KLI_BIN" bench --gpu off -m "$M" -p 16 -n 8 -r 3 --json >"$tmp/b.json" \
    2>"$tmp/b.err"
check $? "kli bench --json"

"$PY" - "$tmp/b.json" "$M" <<'EOF' >"$tmp/py.out" 2>&1
import json, struct, sys

r = json.loads(open(sys.argv[1]).read())
for k in ("prefill_tok_s", "decode_tok_s", "triad_gb_s", "decode_bytes_per_token",
          "roofline_fraction", "threads", "prefill_tok_s_min", "decode_tok_s_max",
          "triad_gb_s_min", "triad_gb_s_max", "decode_tok_s_min", "peak_rss_bytes",
          "read_gb_s", "read_gb_s_min", "read_gb_s_max", "read_probe_bytes", "roofline_triad"):
    assert isinstance(r[k], (int, float)) and r[k] > 0, (k, r.get(k))
assert r["simd"] in ("generic", "avx2", "avx512", "avx512vnni", "amx", "neon", "neondot"), r["simd"]
assert r["weight_type"] == "stored" and r["reps"] == 3 and r["gen_tokens"] == 8, r
assert r["prefill_tok_s_min"] <= r["prefill_tok_s"] <= r["prefill_tok_s_max"], r
assert r["decode_tok_s_min"] <= r["decode_tok_s"] <= r["decode_tok_s_max"], r
assert r["triad_gb_s_min"] <= r["triad_gb_s"] <= r["triad_gb_s_max"], r
assert r["read_gb_s_min"] <= r["read_gb_s"] <= r["read_gb_s_max"], r
# Per-phase times lie inside the timed prefill and decode: their sums, in ms per token, are
# at most the slowest repetition's time per token (the MoE and KDA layers always run).
for ph, rate in (("phase_ms", "decode_tok_s_min"), ("prefill_phase_ms", "prefill_tok_s_min")):
    p = r[ph]
    assert set(p) == {"kda", "mla", "moe", "dense", "lm_head", "other"}, p
    assert p["kda"] > 0 and p["moe"] > 0 and min(p.values()) >= 0, (ph, p)
    assert sum(p.values()) <= 1e3 / r[rate] * 1.001, (ph, sum(p.values()), r[rate])

# The bytes one decode step reads, from the header: attention and shared matrices, the
# router, top_k routed experts per MoE layer at their average size, one embedding row, lm_head;
# MLA's kv_b as float32 (it is read through float copies). Norms, convolutions and gate
# vectors are not counted.
d = sys.argv[2]
cfg = json.load(open(d + "/config.json"))
f = open(d + "/model.safetensors", "rb")
h = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
h.pop("__metadata__", None)
size = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in h.items()}
numel = {k: eval("*".join(map(str, v["shape"])) or "1") for k, v in h.items()}
E, K = cfg["num_experts"], cfg["num_experts_per_token"]
mats = ("q_proj", "k_proj", "v_proj", "f_a_proj", "f_b_proj", "b_proj", "g_a_proj",
        "g_b_proj", "o_proj", "kv_a_proj_with_mqa")
want = size["lm_head.weight"] + size["model.embed_tokens.weight"] // cfg["vocab_size"]
experts = {}
for k, b in size.items():
    p = k.split(".")
    if p[0] != "model" or p[1] != "layers":
        continue
    L, rest = int(p[2]), ".".join(p[3:])
    if rest.startswith("self_attn.") and p[4] in mats:
        want += b
    elif rest == "self_attn.kv_b_proj.weight":
        want += 4 * numel[k]
    elif rest.startswith("mlp.") or rest.startswith("block_sparse_moe.shared_experts."):
        want += b
    elif rest == "block_sparse_moe.gate.weight":
        want += b
    elif rest.startswith("block_sparse_moe.experts."):
        experts[L] = experts.get(L, 0) + b
for L, b in experts.items():
    want += b // E * K
assert r["decode_bytes_per_token"] == want, (r["decode_bytes_per_token"], want)

# Each repetition's fraction is bytes x its decode rate / its own probe, so their median lies
# between the extremes of those; against the read probe it is capped at 1, and flagged if so.
B = want / 1e9
lo = B * r["decode_tok_s_min"] / r["triad_gb_s_max"]
hi = B * r["decode_tok_s_max"] / r["triad_gb_s_min"]
assert lo * 0.999 <= r["roofline_triad"] <= hi * 1.001, (lo, r["roofline_triad"], hi)
lo = min(1, B * r["decode_tok_s_min"] / r["read_gb_s_max"])
hi = min(1, B * r["decode_tok_s_max"] / r["read_gb_s_min"])
assert lo * 0.999 <= r["roofline_fraction"] <= hi * 1.001, (lo, r["roofline_fraction"], hi)
assert 0 < r["roofline_fraction"] <= 1, r["roofline_fraction"]
assert isinstance(r["roofline_capped"], bool), r["roofline_capped"]

# The probes' buffers (three 64 MiB arrays, one of 64 MiB: a decode of the tiny model reads
# about 1 MB) are freed before the peak is read on; the tiny model and kli itself take a
# few MiB.
assert r["peak_rss_bytes"] < 150 << 20, r["peak_rss_bytes"]
assert r["triad_bytes"] == 64 << 20, r["triad_bytes"]
assert r["read_probe_bytes"] == 64 << 20, r["read_probe_bytes"]

# Linux reports the weight file's resident pages: the run read every tensor but the
# embedding table, of which it touched a few rows, and at most the whole file.
if sys.platform.startswith("linux"):
    import os
    fs = os.path.getsize(d + "/model.safetensors")
    least = sum(size.values()) - size["model.embed_tokens.weight"]
    res, huge = r["weights_resident_bytes"], r["weights_huge_bytes"]
    assert least <= res <= fs + 4096 and 0 <= huge <= res, (least, res, huge, fs)
print("decode bytes", want)
EOF
rc=$?
sed 's/^/# /' "$tmp/py.out"
check $rc "the JSON has the targets' keys; decode bytes equal the header's count; the roofline, the peak resident size and the weights' resident pages hang together"

"$KLI_BIN" bench --gpu off -m "$M" -p 8 -n 4 -r 1 >"$tmp/t.out" 2>"$tmp/t.err"
rc=$?
grep -q "^roofline .* of the read probe" "$tmp/t.out" && grep -q "^decode phases" "$tmp/t.out" &&
    grep -q "^prefill phases" "$tmp/t.out" &&
    { [ "$(uname -s)" != Linux ] || grep -q "^weights .* in 2 MiB pages" "$tmp/t.out"; } &&
    grep -q "kernels " "$tmp/t.err"
check $((rc + $?)) "the text report has the roofline, phase and weight-page lines and names the kernels"

# The probes' sizes by the rules kli(1) states, for pretended caches: a 508 MiB L3 (a Zen 5
# EPYC's) gets the capped 256 MiB, not 1 GiB per array. The read probe reads no more than a
# decode (about 1 MB here), but at least 64 MiB. (The process's peak cannot show the
# buffers from outside: kli resets it after each probe.)
rc=0
for llc in 1M:64 40M:160 508M:256 8G:256; do
    KLI_BENCH_LLC=${llc%:*} "$KLI_BIN" bench --gpu off -m "$M" -p 4 -n 2 -r 1 --json \
        >"$tmp/p.json" 2>"$tmp/p.err" || rc=1
    got=$("$PY" -c 'import json, sys; r = json.load(open(sys.argv[1]))
print(r["triad_bytes"], r["read_probe_bytes"])' "$tmp/p.json" 2>/dev/null)
    echo "# KLI_BENCH_LLC=${llc%:*}: triad arrays and read buffer of ${got:-?} bytes"
    [ "${got:-0}" = "$((${llc#*:} << 20)) $((64 << 20))" ] || rc=1
done
check $rc "the triad's arrays are 4 x the pretended LLC, within [64, 256] MiB; the read buffer 64 MiB"

KLI_SIMD=generic "$KLI_BIN" bench --gpu off -m "$M" -p 4 -n 2 -r 1 --json 2>/dev/null |
    grep -q '"simd": "generic"'
check $? "KLI_SIMD=generic runs and is named"

"$KLI_BIN" bench -m "$M" -r 0 >/dev/null 2>"$tmp/e"
[ $? -eq 2 ] && grep -q -- "-r" "$tmp/e"
check $? "-r 0 is a usage error that names the option"
"$KLI_BIN" bench -m "$tmp/none" -p 4 -n 2 -r 1 >/dev/null 2>"$tmp/e"
[ $? -eq 1 ] && grep -q "$tmp/none" "$tmp/e"
check $? "a missing model fails with its path in the message"

# --quality against the same numbers worked out here from raw logits: the stored model's and
# those of checkpoints quantized to q8_0 and q4 (kli quantize gives the logits of load-time
# conversion bit for bit: test-packed, test-quantize).
ids=$(seq 3 7 400 | head -48 | paste -sd, -)
rc=0
"$KLI_BIN" logits --gpu off -m "$M" --ids "$ids" -o "$tmp/ref.f32" >/dev/null 2>&1 || rc=1
for t in q8_0 q4; do
    "$KLI_BIN" quantize -m "$M" -o "$tmp/$t" --type "$t" >/dev/null 2>&1 &&
        "$KLI_BIN" logits --gpu off -m "$tmp/$t" --ids "$ids" -o "$tmp/$t.f32" >/dev/null 2>&1 ||
        rc=1
done
"$KLI_BIN" bench --quality -m "$M" --ids "$ids" --json >"$tmp/q.json" 2>"$tmp/q.err" || rc=1
[ $rc = 0 ] && "$PY" - "$tmp" <<'EOF' >"$tmp/py.out" 2>&1
import json, math, struct, sys

d = sys.argv[1]
rep = {q["type"]: q for q in json.load(open(d + "/q.json"))["quality"]}


def rows(path):
    b = open(path, "rb").read()
    f = struct.unpack("<%df" % (len(b) // 4), b)
    v = len(f) // 48
    return [f[i * v:(i + 1) * v] for i in range(48)]


ref = rows(d + "/ref.f32")
for t in ("q8_0", "q4"):
    q = rows(d + "/" + t + ".f32")
    kls, agree, clear, clear_agree = [], 0, 0, 0
    for p, r in zip(ref, q):
        mp, mq = max(p), max(r)
        lzp = mp + math.log(sum(math.exp(x - mp) for x in p))
        lzq = mq + math.log(sum(math.exp(x - mq) for x in r))
        kls.append(sum(math.exp(a - lzp) * ((a - lzp) - (b - lzq)) for a, b in zip(p, r)))
        same = p.index(mp) == r.index(mq)
        agree += same
        s = sorted(p)
        if s[-1] - s[-2] >= 1.0:
            clear += 1
            clear_agree += same
    g = rep[t]
    mean = sum(kls) / len(kls)
    assert g["positions"] == 48, g
    assert abs(g["kl_mean"] - mean) <= 1e-4 * mean + 1e-7, (t, g["kl_mean"], mean)
    assert abs(g["kl_max"] - max(kls)) <= 1e-4 * max(kls) + 1e-7, (t, g["kl_max"], max(kls))
    assert abs(g["top1_agreement"] - agree / 48) < 1e-3, (t, g, agree)
    assert g["kl_above_0.1"] == sum(k > 0.1 for k in kls), (t, g)
    assert g["clear_positions"] == clear, (t, g, clear)
    if clear:
        assert abs(g["clear_top1_agreement"] - clear_agree / clear) < 1e-3, (t, g, clear_agree)
    print(t, "KL mean %.4g, top-1 %d/48, clear %d/%d" % (mean, agree, clear_agree, clear))
EOF
rc=$((rc + $?))
sed 's/^/# /' "$tmp/py.out"
check $rc "--quality: KL mean and max, top-1 agreement, KL > 0.1 and clear positions equal a count from raw logits of quantized checkpoints"

echo "1..$n"
exit $fail
