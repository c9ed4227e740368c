#!/usr/bin/env python3
"""train.py - train kimi-linear-nano, a miniature of Kimi-Linear-48B-A3B, with PyTorch.

Every part of the real architecture, written from doc/model.md (not from kli): KDA layers
(q/k/v short convolutions with SiLU, the low-rank forget gate with A_log and dt_bias, beta,
L2-normalised q and k, the delta-rule state, the gated output RMSNorm) and NoPE MLA layers
(latent KV with its RMSNorm, no rotary) in the 3:1 pattern; a dense first layer; MoE layers
with the sigmoid router, the selection-only e_score_correction_bias (kept balanced the
auxiliary-loss-free way: nudged after each step towards equal expert load), top-k,
renormalised unbiased weights times routed_scaling_factor, and a shared expert.

The same module code runs training (float32 on the GPU) and the golden forward (float64 on
the CPU, from the stored bf16-rounded weights). KDA runs the exact per-token recurrence.

  train.py check                 forward vs contrib/reference/kimi_ref.py on random configs
  train.py train OUT [options]   train, write OUT/{model.safetensors,config.json,curve.tsv}
  train.py golden MODEL_DIR OUT  float64 logits of MODEL_DIR on a fixed prompt (golden.json,
                                 ref64_prefill.f32, ref64_decode.f32)
"""
import argparse
import json
import math
import os
import struct
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
ROOT = os.path.dirname(os.path.dirname(HERE))
# The NumPy reference's safetensors reader (the reference itself stays standalone).
sys.path.insert(0, os.path.join(ROOT, "contrib", "reference"))
import kimi_ref  # noqa: E402
NANO_DIR = os.path.join(ROOT, "contrib", "models", "kimi-linear-nano")

# The nano configuration: real key names and layout, rows of 256 where the layout allows.
NANO = {
    "architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear",
    "dtype": "bfloat16", "vocab_size": 2304, "hidden_size": 256, "num_hidden_layers": 4,
    "intermediate_size": 256, "hidden_act": "silu", "rms_norm_eps": 1e-05,
    "initializer_range": 0.02, "num_attention_heads": 2, "num_key_value_heads": 2,
    "head_dim": 128, "q_lora_rank": None, "kv_lora_rank": 128, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "mla_use_nope": True, "rope_theta": 10000.0,
    "model_max_length": 1048576, "bos_token_id": 2048, "eos_token_id": 2050,
    "pad_token_id": 2303, "tie_word_embeddings": False, "use_cache": True,
    "num_experts": 6, "num_experts_per_token": 2, "num_shared_experts": 1,
    "moe_intermediate_size": 64, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "moe_router_activation_func": "sigmoid", "moe_renormalize": True,
    "routed_scaling_factor": 2.446, "use_grouped_topk": True, "num_expert_group": 1,
    "topk_group": 1, "num_nextn_predict_layers": 0,
    "linear_attn_config": {"kda_layers": [1, 2, 3], "full_attn_layers": [4], "head_dim": 128,
                           "num_heads": 2, "short_conv_kernel_size": 4},
}


# ---- the model --------------------------------------------------------------------------

def rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def l2norm(x):
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)


def kda_recurrent(q, k, v, g, beta):
    """The exact per-token delta rule (doc/model.md 4.6). q,k,v,g [B,T,H,K], beta [B,T,H]."""
    B, T, H, K = q.shape
    decay = torch.exp(g)
    S = q.new_zeros(B, H, K, v.shape[-1])                            # [key][value]
    outs = []
    for t in range(T):
        S = S * decay[:, t, :, :, None]
        kt = k[:, t]
        kS = torch.einsum("bhk,bhkv->bhv", kt, S)
        u = beta[:, t, :, None] * (v[:, t] - kS)
        S = S + kt[:, :, :, None] * u[:, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, 1)                                      # [B,T,H,V]


def kda_chunked(q, k, v, g, beta, C):
    """The same recurrence, C tokens at a time (for training speed). Inside a chunk, with
    G the running sum of g from the chunk start and S0 the state before it:
      u = (I + diag(beta) A)^-1 diag(beta) (v - (k*e^G) S0),
        A[t][s] = sum_c k_t[c] k_s[c] e^(G_t[c]-G_s[c]) for s < t
      o_t = (q_t*e^G_t) S0 + sum_{s<=t} (sum_c q_t[c] k_s[c] e^(G_t[c]-G_s[c])) u_s
      S_C = e^G_C * S0 + sum_s (k_s*e^(G_C-G_s)) u_s^T
    Every exponent is <= 0 (g <= 0), so nothing overflows."""
    B, T, H, K = q.shape
    Vd = v.shape[-1]
    pad = (-T) % C
    if pad:
        q, k, v, g = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g))
        beta = F.pad(beta, (0, 0, 0, pad))
    n = (T + pad) // C
    # [B,H,n,C,*]
    q, k, v, g = (x.view(B, n, C, H, -1).permute(0, 3, 1, 2, 4) for x in (q, k, v, g))
    beta = beta.view(B, n, C, H).permute(0, 3, 1, 2)
    G = g.cumsum(-2)
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    incl = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    diff = G[..., :, None, :] - G[..., None, :, :]                  # [B,H,n,C(t),C(s),K]
    E = torch.exp(diff.masked_fill(~incl[:, :, None], -math.inf))
    A = torch.einsum("bhntc,bhnsc,bhntsc->bhnts", k, k, E).masked_fill(~strict, 0)
    Bm = torch.einsum("bhntc,bhnsc,bhntsc->bhnts", q, k, E)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    Tm = eye + beta[..., :, None] * A
    kG = k * torch.exp(G)
    qG = q * torch.exp(G)
    kL = k * torch.exp(G[..., -1:, :] - G)
    S = q.new_zeros(B, H, K, Vd)
    outs = []
    for i in range(n):
        rhs = beta[:, :, i, :, None] * (v[:, :, i] - kG[:, :, i] @ S)
        u = torch.linalg.solve_triangular(Tm[:, :, i], rhs, upper=False)
        outs.append(qG[:, :, i] @ S + Bm[:, :, i] @ u)
        S = torch.exp(G[:, :, i, -1])[..., None] * S + kL[:, :, i].transpose(-1, -2) @ u
    o = torch.stack(outs, 2)                                         # [B,H,n,C,V]
    return o.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, Vd)[:, :T]


class KDA(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        lac = c["linear_attn_config"]
        D, H, K, W = c["hidden_size"], lac["num_heads"], lac["head_dim"], \
            lac["short_conv_kernel_size"]
        self.H, self.K, self.W, self.eps = H, K, W, c["rms_norm_eps"]
        self.chunk = 0          # 0: the exact recurrence; C: kda_chunked (training)
        P = torch.nn.Parameter
        for n in "qkv":
            setattr(self, n + "_proj", P(torch.empty(H * K, D)))
            setattr(self, n + "_conv1d", P(torch.empty(H * K, 1, W)))
        self.A_log = P(torch.empty(1, 1, H, 1))
        self.f_a_proj = P(torch.empty(K, D))
        self.f_b_proj = P(torch.empty(H * K, K))
        self.dt_bias = P(torch.empty(H * K))
        self.b_proj = P(torch.empty(H, D))
        self.g_a_proj = P(torch.empty(K, D))
        self.g_b_proj = P(torch.empty(H * K, K))
        self.o_norm = P(torch.empty(K))
        self.o_proj = P(torch.empty(D, H * K))

    def conv(self, x, w):
        # causal depthwise: y[t] = sum_j w[j] x[t-W+1+j], zeros before the sequence
        xt = F.pad(x.transpose(1, 2), (self.W - 1, 0))
        return F.silu(F.conv1d(xt, w, groups=w.shape[0]).transpose(1, 2))

    def forward(self, x):
        B, T, _ = x.shape
        H, K = self.H, self.K
        q = self.conv(x @ self.q_proj.t(), self.q_conv1d).view(B, T, H, K)
        k = self.conv(x @ self.k_proj.t(), self.k_conv1d).view(B, T, H, K)
        v = self.conv(x @ self.v_proj.t(), self.v_conv1d).view(B, T, H, K)
        f = (x @ self.f_a_proj.t()) @ self.f_b_proj.t()
        g = -torch.exp(self.A_log.view(H, 1)) * F.softplus((f + self.dt_bias).view(B, T, H, K))
        beta = torch.sigmoid(x @ self.b_proj.t())                     # [B,T,H]
        q = l2norm(q) / math.sqrt(K)
        k = l2norm(k)
        if self.chunk:
            o = kda_chunked(q, k, v, g, beta, self.chunk)
        else:
            o = kda_recurrent(q, k, v, g, beta)
        gg = ((x @ self.g_a_proj.t()) @ self.g_b_proj.t()).view(B, T, H, K)
        y = rmsnorm(o, self.o_norm, self.eps) * torch.sigmoid(gg)
        return y.reshape(B, T, H * K) @ self.o_proj.t()


class MLA(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        D, H = c["hidden_size"], c["num_attention_heads"]
        self.H, self.L = H, c["kv_lora_rank"]
        self.nope, self.rope, self.dv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], \
            c["v_head_dim"]
        P = torch.nn.Parameter
        self.q_proj = P(torch.empty(H * (self.nope + self.rope), D))
        self.kv_a_proj_with_mqa = P(torch.empty(self.L + self.rope, D))
        self.kv_a_layernorm = P(torch.empty(self.L))
        self.kv_b_proj = P(torch.empty(H * (self.nope + self.dv), self.L))
        self.o_proj = P(torch.empty(D, H * self.dv))

    def forward(self, x):
        B, T, _ = x.shape
        H, nope, rope, dv = self.H, self.nope, self.rope, self.dv
        q = (x @ self.q_proj.t()).view(B, T, H, nope + rope).transpose(1, 2)
        ckv = x @ self.kv_a_proj_with_mqa.t()
        c = rmsnorm(ckv[..., :self.L], self.kv_a_layernorm, 1e-6)
        kpe = ckv[..., self.L:]
        kv = (c @ self.kv_b_proj.t()).view(B, T, H, nope + dv).transpose(1, 2)
        k = torch.cat([kv[..., :nope], kpe[:, None].expand(B, H, T, rope)], -1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(nope + rope)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        o = torch.softmax(s.masked_fill(mask, -math.inf), -1) @ kv[..., nope:]
        return o.transpose(1, 2).reshape(B, T, H * dv) @ self.o_proj.t()


class MLP(torch.nn.Module):
    def __init__(self, D, F_):
        super().__init__()
        P = torch.nn.Parameter
        self.gate_proj = P(torch.empty(F_, D))
        self.up_proj = P(torch.empty(F_, D))
        self.down_proj = P(torch.empty(D, F_))

    def forward(self, x):
        return (F.silu(x @ self.gate_proj.t()) * (x @ self.up_proj.t())) @ self.down_proj.t()


class MoE(torch.nn.Module):
    """Experts are held stacked ([E][F][D]); save() writes them as experts.E.w1/w3/w2."""

    def __init__(self, c):
        super().__init__()
        D, E, F_ = c["hidden_size"], c["num_experts"], c["moe_intermediate_size"]
        self.c, self.E, self.k = c, E, c["num_experts_per_token"]
        P = torch.nn.Parameter
        self.gate = P(torch.empty(E, D))
        self.register_buffer("bias", torch.zeros(E))
        self.w1 = P(torch.empty(E, F_, D))
        self.w3 = P(torch.empty(E, F_, D))
        self.w2 = P(torch.empty(E, D, F_))
        ns = c.get("num_shared_experts", 0)
        self.shared = MLP(D, F_ * ns) if ns else None
        self.load = None

    def forward(self, x):
        c, E = self.c, self.E
        logits = x @ self.gate.t()
        if c.get("moe_router_activation_func", "sigmoid") == "softmax":
            s = torch.softmax(logits, -1)
        else:
            s = torch.sigmoid(logits)
        sb = (s + self.bias).detach()
        G, TG = c.get("num_expert_group", 1), c.get("topk_group", 1)
        if G > 1 and TG < G:
            gs = sb.view(*sb.shape[:-1], G, E // G).topk(2, -1).values.sum(-1)
            # ties: the lower group index wins (topk on a stable descending sort)
            order = torch.sort(-gs, dim=-1, stable=True).indices[..., :TG]
            gmask = torch.zeros_like(gs).scatter(-1, order, 1.0)
            sb = sb.masked_fill(gmask.repeat_interleave(E // G, -1) == 0, -math.inf)
        sel = torch.sort(-sb, dim=-1, stable=True).indices[..., :self.k]
        w = s.gather(-1, sel)
        if c.get("moe_renormalize", True) and self.k > 1:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * c.get("routed_scaling_factor", 1.0)
        comb = torch.zeros_like(s).scatter(-1, sel, w)               # [...,E]
        with torch.no_grad():
            self.load = torch.zeros_like(s).scatter(-1, sel, 1.0).reshape(-1, E).mean(0)
        h = F.silu(torch.einsum("...d,efd->...ef", x, self.w1)) * \
            torch.einsum("...d,efd->...ef", x, self.w3)
        out = torch.einsum("...ef,edf,...e->...d", h, self.w2, comb)
        if self.shared is not None:
            out = out + self.shared(x)
        return out


class Layer(torch.nn.Module):
    def __init__(self, c, i):
        super().__init__()
        D = c["hidden_size"]
        self.eps = c["rms_norm_eps"]
        self.input_layernorm = torch.nn.Parameter(torch.empty(D))
        self.post_attention_layernorm = torch.nn.Parameter(torch.empty(D))
        kda = (i + 1) in c["linear_attn_config"]["kda_layers"]
        self.self_attn = KDA(c) if kda else MLA(c)
        moe = c.get("num_experts") and i >= c.get("first_k_dense_replace", 0) and \
            i % c.get("moe_layer_freq", 1) == 0
        self.ffn = MoE(c) if moe else MLP(D, c["intermediate_size"])

    def forward(self, h):
        h = h + self.self_attn(rmsnorm(h, self.input_layernorm, self.eps))
        return h + self.ffn(rmsnorm(h, self.post_attention_layernorm, self.eps))


class Model(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed = torch.nn.Parameter(torch.empty(c["vocab_size"], c["hidden_size"]))
        self.layers = torch.nn.ModuleList(Layer(c, i) for i in range(c["num_hidden_layers"]))
        self.norm = torch.nn.Parameter(torch.empty(c["hidden_size"]))
        self.tied = c.get("tie_word_embeddings", False)
        if not self.tied:
            self.lm_head = torch.nn.Parameter(torch.empty(c["vocab_size"], c["hidden_size"]))

    def forward(self, ids):
        h = self.embed[ids]
        for layer in self.layers:
            h = layer(h)
        h = rmsnorm(h, self.norm, self.c["rms_norm_eps"])
        return h @ (self.embed if self.tied else self.lm_head).t()

    # -- names of the Hugging Face checkpoint --
    def hf_tensors(self):
        """name -> tensor (views of the parameters), in checkpoint naming."""
        t = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        if not self.tied:
            t["lm_head.weight"] = self.lm_head
        for i, L in enumerate(self.layers):
            p = "model.layers.%d." % i
            t[p + "input_layernorm.weight"] = L.input_layernorm
            t[p + "post_attention_layernorm.weight"] = L.post_attention_layernorm
            a = L.self_attn
            names = ["q_proj", "k_proj", "v_proj", "q_conv1d", "k_conv1d", "v_conv1d",
                     "f_a_proj", "f_b_proj", "b_proj", "g_a_proj", "g_b_proj", "o_norm",
                     "o_proj"] if isinstance(a, KDA) else \
                ["q_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"]
            for n in names:
                t[p + "self_attn.%s.weight" % n] = getattr(a, n)
            if isinstance(a, KDA):
                t[p + "self_attn.A_log"] = a.A_log
                t[p + "self_attn.dt_bias"] = a.dt_bias
            f = L.ffn
            if isinstance(f, MoE):
                m = p + "block_sparse_moe."
                t[m + "gate.weight"] = f.gate
                t[m + "gate.e_score_correction_bias"] = f.bias
                for e in range(f.E):
                    t[m + "experts.%d.w1.weight" % e] = f.w1[e]
                    t[m + "experts.%d.w3.weight" % e] = f.w3[e]
                    t[m + "experts.%d.w2.weight" % e] = f.w2[e]
                if f.shared is not None:
                    for n in ("gate_proj", "up_proj", "down_proj"):
                        t[m + "shared_experts.%s.weight" % n] = getattr(f.shared, n)
            else:
                for n in ("gate_proj", "up_proj", "down_proj"):
                    t[p + "mlp.%s.weight" % n] = getattr(f, n)
        return t

    def load_hf(self, w):
        with torch.no_grad():
            for name, dst in self.hf_tensors().items():
                dst.copy_(torch.as_tensor(np.asarray(w[name])).reshape(dst.shape))


def init_weights(model, seed):
    g = torch.Generator().manual_seed(seed)
    c = model.c
    std = c["initializer_range"]
    out_std = std / math.sqrt(2 * c["num_hidden_layers"])
    with torch.no_grad():
        for name, t in model.hf_tensors().items():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                t.fill_(1.0)
            elif name.endswith("A_log"):
                t.copy_(torch.log(torch.empty(t.shape).uniform_(1, 16, generator=g)))
            elif name.endswith("dt_bias"):
                dt = torch.exp(torch.empty(t.shape).uniform_(math.log(1e-3), math.log(0.1),
                                                             generator=g))
                t.copy_(dt + torch.log(-torch.expm1(-dt)))            # softplus^-1(dt)
            elif name.endswith("conv1d.weight"):
                b = 1.0 / math.sqrt(t.shape[-1])
                t.copy_(torch.empty(t.shape).uniform_(-b, b, generator=g))
            elif name.endswith("e_score_correction_bias"):
                t.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight", "w2.weight")):
                t.copy_(torch.randn(t.shape, generator=g) * out_std)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * std)


# ---- safetensors (bf16 out, any in) -------------------------------------------------------

def bf16_round(t):
    return t.detach().to(torch.bfloat16).to(torch.float64)


def save_model(model, out):
    """Every tensor as BF16 (round to nearest even), in checkpoint order, one file."""
    hdr, blobs, off = {}, [], 0
    for name, v in model.hf_tensors().items():
        b = v.detach().cpu().float().contiguous().to(torch.bfloat16).view(torch.int16)
        b = b.numpy().tobytes()
        hdr[name] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    hdr["__metadata__"] = {"format": "pt"}
    h = json.dumps(hdr).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(os.path.join(out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(model.c, f, indent=1)
        f.write("\n")


def load_dir(d):
    cfg, w = kimi_ref.load_model(d)
    m = Model(cfg).double()
    m.load_hf(w)
    return m


# ---- check against the NumPy reference ----------------------------------------------------

def cmd_check(_):
    import tempfile
    worst = 0.0
    for variant in ("realheads", "grouped", "softmax_tied", "sharded_f32"):
        with tempfile.TemporaryDirectory() as d:
            kimi_ref.make_model(d, variant, 7)
            cfg, w = kimi_ref.load_model(d)
            rng = np.random.default_rng(3)
            ids = rng.integers(0, cfg["vocab_size"], 23)
            ref = kimi_ref.Ref(cfg, w).forward(ids)
            m = load_dir(d)
            with torch.no_grad():
                got = m(torch.as_tensor(ids)[None])[0].numpy()
            rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
            worst = max(worst, rel)
            print("check %-12s rel_l2 %.3e argmax_equal %s" % (
                variant, rel, bool((got.argmax(1) == ref.argmax(1)).all())))
    # the chunked form used for training against the recurrence, float64, with a chunk
    # length that does not divide T and strong decays
    g = torch.Generator().manual_seed(5)
    B, T, H, K = 2, 45, 3, 16
    q, k, v = (l2norm(torch.randn(B, T, H, K, generator=g, dtype=torch.float64))
               for _ in range(3))
    gg = -torch.rand(B, T, H, K, generator=g, dtype=torch.float64) * 3
    beta = torch.rand(B, T, H, generator=g, dtype=torch.float64)
    a = kda_recurrent(q, k, v, gg, beta)
    for C in (1, 8, 16, 64):
        rel = float((kda_chunked(q, k, v, gg, beta, C) - a).norm() / a.norm())
        print("check chunked C=%-2d  rel_l2 %.3e" % (C, rel))
        worst = max(worst, rel)
    print("check worst rel_l2 %.3e %s" % (worst, "PASS" if worst < 1e-10 else "FAIL"))
    return 0 if worst < 1e-10 else 1


# ---- data ---------------------------------------------------------------------------------

def tokenizer(d):
    import base64
    import tiktoken
    sys.path.insert(0, HERE)
    import bpe
    ranks = {}
    for line in open(os.path.join(d, "tiktoken.model")):
        if line.strip():
            tok, r = line.split()
            ranks[base64.b64decode(tok)] = int(r)
    n = len(ranks)
    specials = {}
    for k in range(256):
        name = bpe.special_names(n).get(n + k, "<|reserved_token_%d|>" % (n + k))
        specials[name] = n + k
    return tiktoken.Encoding("kimi-linear-nano", pat_str=bpe.PATTERN, mergeable_ranks=ranks,
                             special_tokens=specials), n


def load_corpus(path, enc, n_base):
    docs = [json.loads(line) for line in open(path)]
    chat = [d for d in docs if d.startswith("<|im_system|>")]
    plain = [d for d in docs if not d.startswith("<|im_system|>")]
    ids_c = enc.encode_batch(chat, allowed_special="all", num_threads=16)
    ids_p = enc.encode_ordinary_batch(plain, num_threads=16)
    eos = n_base + 1
    # back in file order
    it_c, it_p, out = iter(ids_c), iter(ids_p), []
    for d in docs:
        if d.startswith("<|im_system|>"):
            out.extend(next(it_c))
        else:
            out.extend(next(it_p))
            out.append(eos)
    return np.array(out, dtype=np.int32)


# ---- training -----------------------------------------------------------------------------

def cmd_train(a):
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    if a.ids:       # the corpus already tokenized (int32 ids, e.g. by kli tokenize --special)
        enc, data = None, np.fromfile(a.ids, dtype="<i4")
    else:
        enc, n_base = tokenizer(NANO_DIR)
        data = load_corpus(a.corpus, enc, n_base)
    print("corpus: %d tokens (%.1f s)" % (len(data), time.time() - t0), flush=True)
    c = dict(NANO)
    model = Model(c)
    init_weights(model, a.seed)
    for L in model.layers:
        if isinstance(L.self_attn, KDA):
            L.self_attn.chunk = a.chunk
    model.to(dev)
    n_par = sum(v.numel() for v in model.hf_tensors().values())
    print("parameters: %d (%.2f MB as bf16)" % (n_par, n_par * 2 / 1e6), flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "conv" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "conv" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd},
                             {"params": other, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    data_t = torch.as_tensor(data, dtype=torch.long)
    gen = torch.Generator().manual_seed(a.seed)
    moes = [L.ffn for L in model.layers if isinstance(L.ffn, MoE)]
    curve = open(os.path.join(a.out, "curve.tsv"), "w")
    curve.write("step\ttokens\tseconds\tloss\tlr\n")
    T, B = a.seq, a.batch
    t0 = time.time()
    ema = None
    for step in range(1, a.steps + 1):
        if step <= a.warmup:
            lr = a.lr * step / a.warmup
        else:
            pr = (step - a.warmup) / max(1, a.steps - a.warmup)
            lr = a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * pr)))
        for grp in opt.param_groups:
            grp["lr"] = lr
        start = torch.randint(0, len(data) - T - 1, (B,), generator=gen)
        batch = torch.stack([data_t[s:s + T + 1] for s in start.tolist()]).to(dev)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for m in moes:      # auxiliary-loss-free balancing of the selection bias
                m.bias += a.bias_rate * torch.sign(m.load.mean() - m.load)
        if a.minutes and time.time() - t0 > 60 * a.minutes:
            print("stopping at step %d: --minutes %g reached" % (step, a.minutes), flush=True)
            break
        lv = loss.item()
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        if step % a.log_every == 0 or step == 1 or step == a.steps:
            el = time.time() - t0
            curve.write("%d\t%d\t%.1f\t%.4f\t%.2e\n" % (step, step * B * T, el, lv, lr))
            curve.flush()
            print("step %5d loss %.4f (ema %.4f) lr %.2e %.1f s  %.0f tok/s" % (
                step, lv, ema, lr, el, step * B * T / el), flush=True)
    model.cpu()
    save_model(model, a.out)
    print("trained %d steps in %.1f s" % (a.steps, time.time() - t0), flush=True)
    # held-out loss of the stored (bf16) weights, on the GPU in float32
    if a.heldout_ids or (a.heldout and enc is not None):
        if a.heldout_ids:
            ids = np.fromfile(a.heldout_ids, dtype="<i4")[:a.eval_tokens]
        else:
            ids = enc.encode_ordinary(open(a.heldout).read())[:a.eval_tokens]
        ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        m = load_dir(a.out).float().to(dev)
        n = (len(ids) - 1) // T
        with torch.no_grad():
            x = ids[:n * T + 1]
            inp = torch.stack([x[i * T:(i + 1) * T] for i in range(n)]).to(dev)
            tgt = torch.stack([x[i * T + 1:(i + 1) * T + 1] for i in range(n)]).to(dev)
            lg = torch.cat([m(inp[i:i + 64]) for i in range(0, n, 64)])
            nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1)).item()
        print("heldout: %d tokens in windows of %d, nll %.4f, perplexity %.3f" % (
            n * T, T, nll, math.exp(nll)), flush=True)


# ---- golden logits ------------------------------------------------------------------------

from golden_prompt import GOLDEN_PLAIN, GOLDEN_TEXT  # noqa: E402


def cmd_golden(a):
    m = load_dir(a.model)
    if a.prompt_ids:        # GOLDEN_PLAIN + GOLDEN_TEXT as kli tokenize --special gives them
        enc, prompt = None, [int(x) for x in open(a.prompt_ids).read().split()]
    else:
        enc, _ = tokenizer(a.model)
        prompt = enc.encode_ordinary(GOLDEN_PLAIN) + \
            enc.encode(GOLDEN_TEXT, allowed_special="all")
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(a.decode):
            ids.append(int(m(torch.as_tensor(ids)[None])[0, -1].argmax()))
        lg = m(torch.as_tensor(ids)[None])[0].numpy()
    P = len(prompt)
    dec = ids[P:]
    os.makedirs(a.out, exist_ok=True)
    lg[:P].astype("<f4").tofile(os.path.join(a.out, "ref64_prefill.f32"))
    lg[P:P + a.decode].astype("<f4").tofile(os.path.join(a.out, "ref64_decode.f32"))
    srt = np.sort(lg[P - 1:P + a.decode - 1], 1)
    json.dump({"prompt": prompt, "decode_tokens": dec, "vocab": m.c["vocab_size"],
               "prefill_shape": [P, m.c["vocab_size"]],
               "decode_shape": [a.decode, m.c["vocab_size"]],
               "min_top2_gap_greedy": float((srt[:, -1] - srt[:, -2]).min()),
               "decoded_text": enc.decode(dec) if enc else None},
              open(os.path.join(a.out, "golden.json"), "w"), indent=1)
    print("golden: prompt %d tokens, continuation %r" % (P, enc.decode(dec) if enc else dec))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check")
    t = sub.add_parser("train")
    t.add_argument("out")
    t.add_argument("--corpus", default=os.path.join(HERE, "data", "train.jsonl"))
    t.add_argument("--ids", default="", help="pre-tokenized corpus (int32), instead")
    t.add_argument("--minutes", type=float, default=0,
                   help="stop early after this long (the schedule still assumes --steps)")
    t.add_argument("--heldout", default=os.path.join(HERE, "data", "heldout.txt"))
    t.add_argument("--heldout-ids", default="", help="held-out text already tokenized")
    t.add_argument("--eval-tokens", type=int, default=40000)
    t.add_argument("--seed", type=int, default=1611)
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--seq", type=int, default=256)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--wd", type=float, default=0.1)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--chunk", type=int, default=32, help="KDA chunk length (0: recurrence)")
    t.add_argument("--bias-rate", type=float, default=1e-3)
    t.add_argument("--log-every", type=int, default=25)
    g = sub.add_parser("golden")
    g.add_argument("model")
    g.add_argument("out")
    g.add_argument("--decode", type=int, default=16)
    g.add_argument("--prompt-ids", default="")
    a = ap.parse_args()
    torch.set_default_dtype(torch.float32)
    return {"check": cmd_check, "train": cmd_train, "golden": cmd_golden}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
