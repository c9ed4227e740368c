#!/usr/bin/env python3
"""kimi_ref.py - an independent float64 NumPy reference of the Kimi Linear forward pass.

Written from the model's description (now doc/model.md), not from kli's C code: the exact
KDA recurrence, the expanded MLA form, sigmoid/softmax routing with group limits and
unbiased weights. It also writes
random checkpoints in the Hugging Face layout (single file or sharded, any dtype mix), so
kli can be checked on configurations nobody has tuned it for.

  kimi_ref.py logits MODEL_DIR IDS_CSV OUT.f32     reference logits [n][vocab], float32 LE
  kimi_ref.py make OUT_DIR VARIANT [SEED]          write a random model (see VARIANTS)
  kimi_ref.py compare A.f32 B.f32 VOCAB [TOL]      relative L2 and argmax agreement
"""
import json
import os
import struct
import sys

import numpy as np

# ---- safetensors -------------------------------------------------------------------------

DT = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (None, 2), "F64": (np.float64, 8)}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    hdr = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, e in hdr.items():
        if name == "__metadata__":
            continue
        b, en = e["data_offsets"]
        raw = data[base + b: base + en]
        if e["dtype"] == "BF16":
            u = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            arr = u.view(np.float32).astype(np.float64)
        else:
            arr = np.frombuffer(raw, dtype=DT[e["dtype"]][0]).astype(np.float64)
        out[name] = arr.reshape(e["shape"])
    return out


def to_bf16_bytes(a):
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16).tobytes()


def write_safetensors(path, tensors):
    """tensors: name -> (dtype string, float64 array)."""
    hdr, blobs, off = {}, [], 0
    for name, (dt, a) in tensors.items():
        if dt == "BF16":
            b = to_bf16_bytes(a)
        elif dt == "F16":
            b = np.ascontiguousarray(a, dtype=np.float16).tobytes()
        else:
            b = np.ascontiguousarray(a, dtype=np.float32).tobytes()
        hdr[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    hdr["__metadata__"] = {"format": "pt"}
    h = json.dumps(hdr).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def load_model(d):
    cfg = json.load(open(os.path.join(d, "config.json")))
    idx = os.path.join(d, "model.safetensors.index.json")
    w = {}
    if os.path.exists(idx):
        for shard in sorted(set(json.load(open(idx))["weight_map"].values())):
            w.update(read_safetensors(os.path.join(d, shard)))
    else:
        w = read_safetensors(os.path.join(d, "model.safetensors"))
    return cfg, w


# ---- the model (doc/model.md) -----------------------------------------------------------

def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softplus(z):
    return np.where(z > 20.0, z, np.log1p(np.exp(np.minimum(z, 20.0))))


class Ref:
    def __init__(self, cfg, w):
        self.c, self.w = cfg, w
        lac = cfg["linear_attn_config"]
        self.kda_layers = set(i - 1 for i in lac["kda_layers"])
        self.H, self.K = lac["num_heads"], lac["head_dim"]
        self.W = lac.get("short_conv_kernel_size", 4)
        self.eps = cfg.get("rms_norm_eps", 1e-5)
        n = cfg["num_hidden_layers"]
        self.state = {}
        for i in range(n):
            if i in self.kda_layers:
                hk = self.H * self.K
                self.state[i] = {"S": np.zeros((self.H, self.K, self.K)),
                                 "conv": [np.zeros((self.W - 1, hk)) for _ in range(3)]}
            else:
                self.state[i] = {"c": [], "kpe": []}

    def p(self, i, name):
        return self.w["model.layers.%d.%s" % (i, name)]

    def kda(self, i, x):
        H, K = self.H, self.K
        out = []
        st = self.state[i]
        convw = [self.p(i, "self_attn.%s_conv1d.weight" % n).reshape(H * K, self.W)
                 for n in "qkv"]
        A = np.exp(self.p(i, "self_attn.A_log").reshape(H))
        dtb = self.p(i, "self_attn.dt_bias").reshape(H * K)
        for t in range(x.shape[0]):
            xt = x[t]
            ys = []
            for j, n in enumerate("qkv"):
                raw = self.p(i, "self_attn.%s_proj.weight" % n) @ xt
                win = np.vstack([st["conv"][j], raw[None, :]])        # [W][HK], oldest first
                a = np.sum(win * convw[j].T, axis=0)
                ys.append(silu(a))
                st["conv"][j] = win[1:]
            q, k, v = (y.reshape(H, K) for y in ys)
            f = self.p(i, "self_attn.f_b_proj.weight") @ (self.p(i, "self_attn.f_a_proj.weight") @ xt)
            g = (-A[:, None]) * softplus((f + dtb).reshape(H, K))
            beta = sigmoid(self.p(i, "self_attn.b_proj.weight") @ xt)
            q = q / np.sqrt(np.sum(q * q, axis=1, keepdims=True) + 1e-6) / np.sqrt(K)
            k = k / np.sqrt(np.sum(k * k, axis=1, keepdims=True) + 1e-6)
            o = np.zeros((H, K))
            for h in range(H):
                S = st["S"][h] * np.exp(g[h])[:, None]
                u = beta[h] * (v[h] - S.T @ k[h])
                S = S + np.outer(k[h], u)
                st["S"][h] = S
                o[h] = S.T @ q[h]
            gg = self.p(i, "self_attn.g_b_proj.weight") @ (self.p(i, "self_attn.g_a_proj.weight") @ xt)
            y = rmsnorm(o, self.p(i, "self_attn.o_norm.weight"), self.eps) * sigmoid(gg.reshape(H, K))
            out.append(self.p(i, "self_attn.o_proj.weight") @ y.reshape(-1))
        return np.array(out)

    def mla(self, i, x):
        c = self.c
        H, Lr = c["num_attention_heads"], c["kv_lora_rank"]
        nope, rope, dv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
        st = self.state[i]
        kvb = self.p(i, "self_attn.kv_b_proj.weight").reshape(H, nope + dv, Lr)
        out = []
        for t in range(x.shape[0]):
            q = (self.p(i, "self_attn.q_proj.weight") @ x[t]).reshape(H, nope + rope)
            ckv = self.p(i, "self_attn.kv_a_proj_with_mqa.weight") @ x[t]
            st["c"].append(rmsnorm(ckv[:Lr], self.p(i, "self_attn.kv_a_layernorm.weight"), 1e-6))
            st["kpe"].append(ckv[Lr:])
            C = np.array(st["c"])           # [n][L]
            KP = np.array(st["kpe"])        # [n][rope]
            o = np.zeros((H, dv))
            for h in range(H):
                kn = C @ kvb[h, :nope].T     # [n][nope]
                vv = C @ kvb[h, nope:].T     # [n][dv]
                s = (kn @ q[h, :nope] + KP @ q[h, nope:]) / np.sqrt(nope + rope)
                s = np.exp(s - s.max())
                s /= s.sum()
                o[h] = s @ vv
            out.append(self.p(i, "self_attn.o_proj.weight") @ o.reshape(-1))
        return np.array(out)

    def mlp(self, pre, x, gate="gate_proj", up="up_proj", down="down_proj"):
        w = self.w
        return (silu(x @ w[pre + gate + ".weight"].T) * (x @ w[pre + up + ".weight"].T)) @ \
            w[pre + down + ".weight"].T

    def moe(self, i, x):
        c = self.c
        E, k = c["num_experts"], c["num_experts_per_token"]
        G, TG = c.get("num_expert_group", 1), c.get("topk_group", 1)
        pre = "model.layers.%d.block_sparse_moe." % i
        logits = x @ self.w[pre + "gate.weight"].T
        bias = self.w[pre + "gate.e_score_correction_bias"]
        out = np.zeros_like(x)
        for t in range(x.shape[0]):
            if c.get("moe_router_activation_func", "sigmoid") == "softmax":
                s = np.exp(logits[t] - logits[t].max())
                s /= s.sum()
            else:
                s = sigmoid(logits[t])
            sb = s + bias
            keep = np.ones(E, bool)
            if G > 1 and TG < G:
                per = E // G
                gs = [np.sum(np.sort(sb[g * per:(g + 1) * per])[::-1][:2]) for g in range(G)]
                order = sorted(range(G), key=lambda g: (-gs[g], g))[:TG]
                keep = np.array([(e // per) in order for e in range(E)])
            cand = [e for e in range(E) if keep[e]]
            sel = sorted(cand, key=lambda e: (-sb[e], e))[:k]
            wt = s[sel]
            if c.get("moe_renormalize", True) and k > 1:
                wt = wt / (wt.sum() + 1e-20)
            wt = wt * c.get("routed_scaling_factor", 1.0)
            for e, we in zip(sel, wt):
                out[t] += we * self.mlp(pre + "experts.%d." % e, x[t:t + 1], "w1", "w3", "w2")[0]
            if c.get("num_shared_experts", 0) > 0:
                out[t] += self.mlp(pre + "shared_experts.", x[t:t + 1])[0]
        return out

    def forward(self, ids):
        c, w = self.c, self.w
        h = w["model.embed_tokens.weight"][ids]
        first = c.get("first_k_dense_replace", 0)
        freq = c.get("moe_layer_freq", 1)
        for i in range(c["num_hidden_layers"]):
            x = rmsnorm(h, self.p(i, "input_layernorm.weight"), self.eps)
            h = h + (self.kda(i, x) if i in self.kda_layers else self.mla(i, x))
            x = rmsnorm(h, self.p(i, "post_attention_layernorm.weight"), self.eps)
            if c.get("num_experts") and i >= first and i % freq == 0:
                h = h + self.moe(i, x)
            else:
                h = h + self.mlp("model.layers.%d.mlp." % i, x)
        x = rmsnorm(h, w["model.norm.weight"], self.eps)
        head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
        return x @ head.T


# ---- random models -------------------------------------------------------------------------

BASE = {
    "architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear",
    "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 96,
    "rms_norm_eps": 1e-5, "num_attention_heads": 2, "q_lora_rank": None, "kv_lora_rank": 32,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "mla_use_nope": True,
    "tie_word_embeddings": False, "num_experts": 8, "num_experts_per_token": 2,
    "num_shared_experts": 1, "moe_intermediate_size": 24, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "moe_router_activation_func": "sigmoid", "moe_renormalize": True,
    "routed_scaling_factor": 2.446, "num_expert_group": 1, "topk_group": 1,
    "bos_token_id": 1, "eos_token_id": 2,
    "linear_attn_config": {"kda_layers": [1, 2, 4], "full_attn_layers": [3], "head_dim": 16,
                           "num_heads": 2, "short_conv_kernel_size": 4},
}

# name -> (config overrides, options)
VARIANTS = {
    # per-head sizes like the released model (128 KDA / 128+64 MLA), 3:1 hybrid
    "realheads": ({"hidden_size": 96, "num_attention_heads": 1, "kv_lora_rank": 64,
                   "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
                   "linear_attn_config": {"kda_layers": [1, 2, 3], "full_attn_layers": [4],
                                          "head_dim": 128, "num_heads": 1,
                                          "short_conv_kernel_size": 4}}, {}),
    # sharded checkpoint, F32-stored gate parameters and router bias
    "sharded_f32": ({}, {"shards": 3, "f32": ["A_log", "dt_bias", "e_score_correction_bias"]}),
    # grouped routing, several shared experts, several dense lead layers, odd head counts
    "grouped": ({"num_hidden_layers": 5, "num_experts": 12, "num_experts_per_token": 3,
                 "num_expert_group": 4, "topk_group": 2, "num_shared_experts": 2,
                 "first_k_dense_replace": 2, "num_attention_heads": 3,
                 "linear_attn_config": {"kda_layers": [1, 3, 4], "full_attn_layers": [2, 5],
                                        "head_dim": 8, "num_heads": 3,
                                        "short_conv_kernel_size": 3}}, {}),
    # edge mode (tests/test-edge.sh): 128 routed experts of 1.5 MiB (192 MiB) around a small
    # trunk, so a memory budget well under the model size is testable
    "edge": ({"hidden_size": 512, "moe_intermediate_size": 512, "num_experts": 64,
              "num_experts_per_token": 4, "first_k_dense_replace": 2}, {}),
    # softmax router without renormalisation, conv kernel 2, tied embeddings, F16 weights
    "softmax_tied": ({"moe_router_activation_func": "softmax", "moe_renormalize": False,
                      "tie_word_embeddings": True, "num_experts_per_token": 1,
                      "linear_attn_config": {"kda_layers": [1, 2, 3, 4], "full_attn_layers": [],
                                             "head_dim": 16, "num_heads": 2,
                                             "short_conv_kernel_size": 2}},
                     {"dtype": "F16", "tied": True}),
}


def make_model(out, variant, seed=0):
    over, opt = VARIANTS[variant]
    cfg = json.loads(json.dumps(BASE))
    cfg.update(over)
    rng = np.random.default_rng(seed)
    c = cfg
    D, V = c["hidden_size"], c["vocab_size"]
    lac = c["linear_attn_config"]
    H, K, W = lac["num_heads"], lac["head_dim"], lac["short_conv_kernel_size"]
    Hm, Lr = c["num_attention_heads"], c["kv_lora_rank"]
    nope, rope, dv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    dt = opt.get("dtype", "BF16")
    t = {}

    def mat(name, r, cols, scale=None):
        s = scale if scale is not None else 1.0 / np.sqrt(cols)
        t[name] = (dt, rng.normal(0, s, (r, cols)))

    def vec(name, shape, val, dtype=None):
        t[name] = (dtype or dt, val(shape))

    def f32(key):
        return "F32" if any(k in key for k in opt.get("f32", [])) else None

    mat("model.embed_tokens.weight", V, D, 1.0)
    if not opt.get("tied"):
        mat("lm_head.weight", V, D)
    vec("model.norm.weight", (D,), lambda s: 1 + 0.1 * rng.normal(size=s))
    for i in range(c["num_hidden_layers"]):
        p = "model.layers.%d." % i
        vec(p + "input_layernorm.weight", (D,), lambda s: 1 + 0.1 * rng.normal(size=s))
        vec(p + "post_attention_layernorm.weight", (D,), lambda s: 1 + 0.1 * rng.normal(size=s))
        a = p + "self_attn."
        if i + 1 in lac["kda_layers"]:
            for n in "qkv":
                mat(a + n + "_proj.weight", H * K, D)
                vec(a + n + "_conv1d.weight", (H * K, 1, W), lambda s: rng.normal(0, 0.5, s))
            vec(a + "A_log", (1, 1, H, 1), lambda s: rng.normal(0, 1, s), f32("A_log"))
            mat(a + "f_a_proj.weight", K, D)
            mat(a + "f_b_proj.weight", H * K, K)
            vec(a + "dt_bias", (H * K,), lambda s: rng.normal(0, 1, s), f32("dt_bias"))
            mat(a + "b_proj.weight", H, D)
            mat(a + "g_a_proj.weight", K, D)
            mat(a + "g_b_proj.weight", H * K, K)
            vec(a + "o_norm.weight", (K,), lambda s: 1 + 0.1 * rng.normal(size=s))
            mat(a + "o_proj.weight", D, H * K)
        else:
            mat(a + "q_proj.weight", Hm * (nope + rope), D)
            mat(a + "kv_a_proj_with_mqa.weight", Lr + rope, D)
            vec(a + "kv_a_layernorm.weight", (Lr,), lambda s: 1 + 0.1 * rng.normal(size=s))
            mat(a + "kv_b_proj.weight", Hm * (nope + dv), Lr)
            mat(a + "o_proj.weight", D, Hm * dv)
        moe = c["num_experts"] and i >= c["first_k_dense_replace"] and i % c["moe_layer_freq"] == 0
        if moe:
            m = p + "block_sparse_moe."
            E, F = c["num_experts"], c["moe_intermediate_size"]
            mat(m + "gate.weight", E, D)
            vec(m + "gate.e_score_correction_bias", (E,), lambda s: rng.normal(0, 0.1, s),
                f32("e_score_correction_bias"))
            for e in range(E):
                mat(m + "experts.%d.w1.weight" % e, F, D)
                mat(m + "experts.%d.w3.weight" % e, F, D)
                mat(m + "experts.%d.w2.weight" % e, D, F)
            Fs = F * c["num_shared_experts"]
            if Fs:
                mat(m + "shared_experts.gate_proj.weight", Fs, D)
                mat(m + "shared_experts.up_proj.weight", Fs, D)
                mat(m + "shared_experts.down_proj.weight", D, Fs)
        else:
            mat(p + "mlp.gate_proj.weight", c["intermediate_size"], D)
            mat(p + "mlp.up_proj.weight", c["intermediate_size"], D)
            mat(p + "mlp.down_proj.weight", D, c["intermediate_size"])
    os.makedirs(out, exist_ok=True)
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=1)
    n = opt.get("shards", 1)
    if n == 1:
        write_safetensors(os.path.join(out, "model.safetensors"), t)
    else:
        names = list(t)
        wm = {}
        for s in range(n):
            fn = "model-%05d-of-%05d.safetensors" % (s + 1, n)
            part = {k: t[k] for k in names[s::n]}
            write_safetensors(os.path.join(out, fn), part)
            wm.update({k: fn for k in part})
        json.dump({"metadata": {}, "weight_map": wm},
                  open(os.path.join(out, "model.safetensors.index.json"), "w"))


def compare(a, b, vocab, tol):
    x = np.fromfile(a, dtype="<f4").astype(np.float64)
    y = np.fromfile(b, dtype="<f4").astype(np.float64)
    if x.size != y.size or x.size % vocab:
        print("size mismatch: %d vs %d floats" % (x.size, y.size))
        return 1
    rel = np.linalg.norm(x - y) / np.linalg.norm(y)
    am = np.sum(x.reshape(-1, vocab).argmax(1) != y.reshape(-1, vocab).argmax(1))
    print("rel_l2 %.3e argmax_mismatch %d rows %d" % (rel, am, x.size // vocab))
    return 0 if rel < tol and am == 0 else 1


def main(argv):
    if len(argv) >= 4 and argv[1] == "logits":
        cfg, w = load_model(argv[2])
        ids = [int(v) for v in argv[3].replace(",", " ").split()]
        Ref(cfg, w).forward(np.array(ids)).astype("<f4").tofile(argv[4])
        return 0
    if len(argv) >= 4 and argv[1] == "make":
        make_model(argv[2], argv[3], int(argv[4]) if len(argv) > 4 else 0)
        return 0
    if len(argv) >= 5 and argv[1] == "compare":
        return compare(argv[2], argv[3], int(argv[4]), float(argv[5]) if len(argv) > 5 else 1e-4)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
