#!/usr/bin/python3
"""Writes the GGUF fixtures of this directory from tests/data (README.md says how and why).

A GGUF v3 writer of its own (numpy, the standard library and the safetensors reader of
contrib/reference/kimi_ref.py) that lays the tiny Kimi Linear model out as llama.cpp's
converter does for the "kimi-linear" architecture:
its tensor names, the stacked experts, kv_b split per head into k_b (transposed) and v_b,
A_log stored as -exp(A_log), dt_bias as ssm_dt.bias, conv1d weights as [1, d_inner, 1, d_conv],
1-D tensors, the conv weights, ssm_a and the router in F32, the vocabulary as GPT-2 byte strings
with token types, merges and special ids. Usage: make_gguf.py TESTDATA_DIR OUT_DIR
"""
import json
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                                "contrib", "reference"))
import kimi_ref  # noqa: E402

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, BF16 = 0, 1, 2, 3, 6, 7, 8, 20, 30
IQ4NL_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89,
                         113], dtype=np.float32)
T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR = 4, 5, 6, 7, 8, 9


def read_safetensors(path):
    """The model's tensors in float32 (BF16 ones exactly: kimi_ref widens them to float64)."""
    return {k: v.astype(np.float32) for k, v in kimi_ref.read_safetensors(path).items()}


def bf16_bytes(a):
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    # the fixture's values are bf16 already: truncation is exact
    assert np.all((u & 0xffff) == 0)
    return (u >> 16).astype("<u2").tobytes()


def round_away(x):
    return np.trunc(x + np.copysign(0.5, x))


def q8_0_bytes(a):
    x = np.ascontiguousarray(a, dtype=np.float32).reshape(-1, 32)
    amax = np.abs(x).max(axis=1)
    d = amax / 127.0
    inv = np.where(d != 0, 1.0 / np.where(d != 0, d, 1), 0).astype(np.float32)
    q = round_away(x * inv[:, None]).astype(np.int8)
    out = bytearray()
    for i in range(x.shape[0]):
        out += np.float16(d[i]).tobytes() + q[i].tobytes()
    return bytes(out)


def q4_0_bytes(a):
    x = np.ascontiguousarray(a, dtype=np.float32).reshape(-1, 32)
    idx = np.abs(x).argmax(axis=1)
    mx = x[np.arange(x.shape[0]), idx]
    d = (mx / -8.0).astype(np.float32)
    inv = np.where(d != 0, 1.0 / np.where(d != 0, d, 1), 0).astype(np.float32)
    q = np.minimum(15, np.trunc(x * inv[:, None] + 8.5)).astype(np.uint8)
    out = bytearray()
    for i in range(x.shape[0]):
        out += np.float16(d[i]).tobytes() + (q[i, :16] | (q[i, 16:] << 4)).tobytes()
    return bytes(out)


def _pack5(q):
    """32 5-bit values of one block: low nibbles (j, j + 16 in one byte) and the high bits."""
    qs = (q[:16] & 15) | ((q[16:] & 15) << 4)
    qh = 0
    for j in range(16):
        qh |= int((q[j] >> 4) & 1) << j
        qh |= int((q[j + 16] >> 4) & 1) << (j + 16)
    return struct.pack("<I", qh) + qs.astype(np.uint8).tobytes()


def q5_0_bytes(a):
    """ggml's quantize_row_q5_0_ref: d = max / -16, q = min(31, trunc(x/d + 16.5))."""
    out = bytearray()
    for x in np.ascontiguousarray(a, dtype=np.float32).reshape(-1, 32):
        mx = x[np.abs(x).argmax()]
        d = np.float32(mx / -16.0)
        inv = np.float32(1.0 / d) if d != 0 else np.float32(0)
        q = np.minimum(31, np.trunc(x * inv + np.float32(16.5))).astype(np.int64)
        out += np.float16(d).tobytes() + _pack5(q)
    return bytes(out)


def q_1_bytes(a, bits):
    """ggml's quantize_row_q4_1_ref / q5_1_ref: d = (max - min) / levels, m = min."""
    out = bytearray()
    top = (1 << bits) - 1
    for x in np.ascontiguousarray(a, dtype=np.float32).reshape(-1, 32):
        lo, hi = x.min(), x.max()
        d = np.float32((hi - lo) / top)
        inv = np.float32(1.0 / d) if d != 0 else np.float32(0)
        q = np.minimum(top, np.trunc((x - lo) * inv + np.float32(0.5))).astype(np.int64)
        head = np.float16(d).tobytes() + np.float16(lo).tobytes()
        if bits == 4:
            out += head + ((q[:16] & 15) | ((q[16:] & 15) << 4)).astype(np.uint8).tobytes()
        else:
            out += head + _pack5(q)
    return bytes(out)


def iq4_nl_bytes(a):
    """A valid IQ4_NL block (not ggml's search for the best scale): d = amax / 127, each value
    the nearest of the 16 levels times d."""
    out = bytearray()
    for x in np.ascontiguousarray(a, dtype=np.float32).reshape(-1, 32):
        d = np.float32(np.abs(x).max() / 127.0)
        lv = IQ4NL_LEVELS * np.float32(np.float16(d))
        q = np.abs(x[:, None] - lv[None, :]).argmin(axis=1)
        out += np.float16(d).tobytes() + (q[:16] | (q[16:] << 4)).astype(np.uint8).tobytes()
    return bytes(out)


class Writer:
    def __init__(self, alignment=32):
        self.kv = []
        self.tensors = []
        self.alignment = alignment

    def add(self, key, vtype, value, elem=None):
        self.kv.append((key, vtype, value, elem))

    def tensor(self, name, arr, ttype):
        arr = np.asarray(arr, dtype=np.float32)
        ne = list(reversed(arr.shape))
        data = {F32: lambda a: np.ascontiguousarray(a, dtype="<f4").tobytes(),
                BF16: bf16_bytes, Q8_0: q8_0_bytes, Q4_0: q4_0_bytes, Q5_0: q5_0_bytes,
                Q4_1: lambda a: q_1_bytes(a, 4), Q5_1: lambda a: q_1_bytes(a, 5),
                IQ4_NL: iq4_nl_bytes}[ttype](arr)
        self.tensors.append((name, ne, ttype, data))

    @staticmethod
    def _str(s):
        b = s.encode("utf-8") if isinstance(s, str) else s
        return struct.pack("<Q", len(b)) + b

    def _val(self, vtype, v, elem):
        if vtype == T_U32:
            return struct.pack("<I", v)
        if vtype == T_I32:
            return struct.pack("<i", v)
        if vtype == T_F32:
            return struct.pack("<f", v)
        if vtype == T_BOOL:
            return struct.pack("<B", 1 if v else 0)
        if vtype == T_STR:
            return self._str(v)
        assert vtype == T_ARR
        return struct.pack("<IQ", elem, len(v)) + b"".join(self._val(elem, x, None) for x in v)

    def write(self, path):
        if self.alignment != 32:
            self.add("general.alignment", T_U32, self.alignment)
        out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(self.tensors), len(self.kv)))
        for key, vtype, v, elem in self.kv:
            out += self._str(key) + struct.pack("<I", vtype) + self._val(vtype, v, elem)
        off = 0
        offsets = []
        for name, ne, ttype, data in self.tensors:
            offsets.append(off)
            out += self._str(name) + struct.pack("<I", len(ne))
            out += b"".join(struct.pack("<Q", n) for n in ne)
            out += struct.pack("<IQ", ttype, off)
            off += (len(data) + self.alignment - 1) // self.alignment * self.alignment
        out += b"\0" * ((-len(out)) % self.alignment)
        for (name, ne, ttype, data), o in zip(self.tensors, offsets):
            out += data + b"\0" * ((-len(data)) % self.alignment)
        open(path, "wb").write(bytes(out))


def byte_chars():
    """GPT-2's bytes_to_unicode: printable bytes stand for themselves, the rest for 256+."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    m, k = {}, 0
    for b in range(256):
        if b in keep:
            m[b] = chr(b)
        else:
            m[b] = chr(256 + k)
            k += 1
    return m


def read_ranks(path):
    import base64
    ranks = {}
    for line in open(path, "rb").read().split(b"\n"):
        if line:
            t, r = line.split()
            ranks[base64.b64decode(t)] = int(r)
    return ranks


def bpe_last_split(ranks, token, max_rank):
    parts = [bytes([b]) for b in token]
    while True:
        best, at = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best):
                best, at = r, i
        if best is None:
            return parts
        parts = parts[:at] + [parts[at] + parts[at + 1]] + parts[at + 2:]


def add_vocab(w, tokdir, vocab_size):
    ranks = read_ranks(tokdir + "/tiktoken.model")
    cfg = json.load(open(tokdir + "/tokenizer_config.json"))
    names = {int(k): v["content"] for k, v in cfg.get("added_tokens_decoder", {}).items()}
    bc = byte_chars()
    n_base = len(ranks)
    tokens, types, merges = [None] * vocab_size, [1] * vocab_size, []
    for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        tokens[r] = "".join(bc[b] for b in tok)
        if len(tok) > 1:
            p = bpe_last_split(ranks, tok, r)
            if len(p) == 2:
                merges.append(" ".join("".join(bc[b] for b in x) for x in p))
    for i in range(n_base, vocab_size):
        tokens[i] = names.get(i, "<|reserved_token_%d|>" % i)
        types[i] = 3
    w.add("tokenizer.ggml.model", T_STR, "gpt2")
    w.add("tokenizer.ggml.pre", T_STR, "kimi-k2")
    w.add("tokenizer.ggml.tokens", T_ARR, tokens, T_STR)
    w.add("tokenizer.ggml.token_type", T_ARR, types, T_I32)
    w.add("tokenizer.ggml.merges", T_ARR, merges, T_STR)
    return n_base


def add_hparams(w, c):
    a = "kimi-linear."
    lac = c["linear_attn_config"]
    w.add("general.architecture", T_STR, "kimi-linear")
    w.add("general.name", T_STR, "tiny-kimi-linear")
    w.add(a + "block_count", T_U32, c["num_hidden_layers"])
    w.add(a + "context_length", T_U32, c["model_max_length"])
    w.add(a + "embedding_length", T_U32, c["hidden_size"])
    w.add(a + "feed_forward_length", T_U32, c["intermediate_size"])
    w.add(a + "attention.head_count", T_U32, c["num_attention_heads"])
    w.add(a + "attention.head_count_kv", T_ARR,
          [1 if i + 1 in lac["full_attn_layers"] else 0
           for i in range(c["num_hidden_layers"])], T_U32)
    if "rope_theta" in c:
        w.add(a + "rope.freq_base", T_F32, c["rope_theta"])
    w.add(a + "attention.layer_norm_rms_epsilon", T_F32, c["rms_norm_eps"])
    w.add(a + "expert_count", T_U32, c["num_experts"])
    w.add(a + "expert_used_count", T_U32, c["num_experts_per_token"])
    w.add(a + "expert_gating_func", T_U32, 2)
    w.add(a + "vocab_size", T_U32, c["vocab_size"])
    w.add(a + "ssm.conv_kernel", T_U32, lac["short_conv_kernel_size"])
    w.add(a + "kda.head_dim", T_U32, lac["head_dim"])
    w.add(a + "attention.kv_lora_rank", T_U32, c["kv_lora_rank"])
    w.add(a + "rope.dimension_count", T_U32, c["qk_rope_head_dim"])
    w.add(a + "attention.key_length", T_U32, c["kv_lora_rank"] + c["qk_rope_head_dim"])
    w.add(a + "attention.key_length_mla", T_U32, c["qk_nope_head_dim"] + c["qk_rope_head_dim"])
    w.add(a + "attention.value_length_mla", T_U32, c["v_head_dim"])
    w.add(a + "expert_feed_forward_length", T_U32, c["moe_intermediate_size"])
    w.add(a + "expert_shared_count", T_U32, c["num_shared_experts"])
    w.add(a + "leading_dense_block_count", T_U32, c["first_k_dense_replace"])
    w.add(a + "expert_weights_scale", T_F32, c["routed_scaling_factor"])
    w.add("tokenizer.ggml.bos_token_id", T_U32, c["bos_token_id"])
    w.add("tokenizer.ggml.eos_token_id", T_U32, c["eos_token_id"])
    w.add("tokenizer.ggml.padding_token_id", T_U32, c["pad_token_id"])


def add_tensors(w, st, c, qtype):
    """qtype(name, arr) -> the ggml type of a matrix; 1-D and the special ones stay F32."""
    E, nope, dv = c["num_experts"], c["qk_nope_head_dim"], c["v_head_dim"]
    H = c["num_attention_heads"]
    glob = {"model.embed_tokens.weight": "token_embd.weight",
            "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    per = {"input_layernorm.weight": "attn_norm.weight",
           "post_attention_layernorm.weight": "ffn_norm.weight",
           "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
           "self_attn.v_proj.weight": "attn_v.weight",
           "self_attn.o_proj.weight": "attn_output.weight",
           "self_attn.f_a_proj.weight": "ssm_f_a.weight",
           "self_attn.f_b_proj.weight": "ssm_f_b.weight",
           "self_attn.b_proj.weight": "ssm_beta.weight",
           "self_attn.g_a_proj.weight": "ssm_g_a.weight",
           "self_attn.g_b_proj.weight": "ssm_g_b.weight",
           "self_attn.o_norm.weight": "ssm_norm.weight",
           "self_attn.dt_bias": "ssm_dt.bias",
           "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
           "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
           "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
           "mlp.down_proj.weight": "ffn_down.weight",
           "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
           "block_sparse_moe.gate.e_score_correction_bias": "exp_probs_b.bias",
           "block_sparse_moe.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
           "block_sparse_moe.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
           "block_sparse_moe.shared_experts.down_proj.weight": "ffn_down_shexp.weight"}
    for k, name in glob.items():
        w.tensor(name, st[k], F32 if st[k].ndim == 1 else qtype(name, st[k]))
    for l in range(c["num_hidden_layers"]):
        p = "model.layers.%d." % l
        b = "blk.%d." % l
        for hf, gg in per.items():
            if p + hf not in st:
                continue
            a = st[p + hf]
            if a.ndim == 1 or gg == "ffn_gate_inp.weight":
                w.tensor(b + gg, a, F32)
            else:
                w.tensor(b + gg, a, qtype(b + gg, a))
        for x in "qkv":
            k = p + "self_attn.%s_conv1d.weight" % x
            if k in st:
                d_inner, _, d_conv = st[k].shape
                w.tensor(b + "ssm_conv1d_%s.weight" % x, st[k].reshape(1, d_inner, 1, d_conv), F32)
        if p + "self_attn.A_log" in st:
            w.tensor(b + "ssm_a", -np.exp(st[p + "self_attn.A_log"]), F32)
        if p + "self_attn.kv_b_proj.weight" in st:
            kv = st[p + "self_attn.kv_b_proj.weight"]
            kv = kv.reshape(H, nope + dv, kv.shape[-1])
            k_b = np.ascontiguousarray(kv[:, :nope, :].transpose(0, 2, 1))
            v_b = np.ascontiguousarray(kv[:, nope:, :])
            w.tensor(b + "attn_k_b.weight", k_b, qtype(b + "attn_k_b.weight", k_b))
            w.tensor(b + "attn_v_b.weight", v_b, qtype(b + "attn_v_b.weight", v_b))
        if p + "block_sparse_moe.experts.0.w1.weight" in st:
            for hf, gg in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"),
                           ("w2", "ffn_down_exps")):
                a = np.stack([st[p + "block_sparse_moe.experts.%d.%s.weight" % (e, hf)]
                              for e in range(E)])
                w.tensor(b + gg + ".weight", a, qtype(b + gg, a))


def main():
    data, out = sys.argv[1], sys.argv[2]
    tiny = data + "/tiny-kimi-linear"
    c = json.load(open(tiny + "/config.json"))
    st = read_safetensors(tiny + "/model.safetensors")

    w = Writer()
    add_hparams(w, c)
    add_vocab(w, tiny, c["vocab_size"])
    add_tensors(w, st, c, lambda n, a: BF16)
    w.write(out + "/tiny-bf16.gguf")

    # Q8_0 for attention and dense matrices, Q4_0 for the experts, a 64-byte alignment
    w = Writer(alignment=64)
    add_hparams(w, c)
    add_vocab(w, tiny, c["vocab_size"])
    add_tensors(w, st, c, lambda n, a: Q4_0 if "exps" in n or "shexp" in n else Q8_0)
    w.write(out + "/tiny-q.gguf")

    # the types llama-quantize falls back to on rows that are not whole super-blocks, which
    # kli repacks at load: Q5_0 (the gate up-projections), IQ4_NL (MLA k_b and v_b), Q5_1
    # and Q4_1 (the routed experts' gate and up); the rest Q8_0
    def fallback(n, a):
        if "ssm_f_b" in n or "ssm_g_b" in n:
            return Q5_0
        if "attn_k_b" in n or "attn_v_b" in n:
            return IQ4_NL
        if "ffn_gate_exps" in n:
            return Q5_1
        if "ffn_up_exps" in n:
            return Q4_1
        return Q8_0
    w = Writer()
    add_hparams(w, c)
    add_vocab(w, tiny, c["vocab_size"])
    add_tensors(w, st, c, fallback)
    w.write(out + "/tiny-fallback.gguf")

    # the tokenizer fixture's vocabulary (2756 ranks and its specials), no tensors
    tok = data + "/tokenizer"
    ranks = read_ranks(tok + "/tiktoken.model")
    w = Writer()
    add_hparams(w, c)
    add_vocab(w, tok, len(ranks) + 256)
    w.write(out + "/vocab.gguf")

    # the nano model's vocabulary (2048 ranks with their merges), with its hyper-parameters
    nano = data + "/../../contrib/models/kimi-linear-nano"
    cn = json.load(open(nano + "/config.json"))
    w = Writer()
    add_hparams(w, cn)
    add_vocab(w, nano, cn["vocab_size"])
    w.write(out + "/nano-vocab.gguf")


if __name__ == "__main__":
    main()
