#!/usr/bin/env python3
"""bf16_emul.py - what bf16 operands in the GPU's prefill products do to a model's logits.

kimi_ref.py's float64 forward pass, once as it is and once with the operands of every
projection (attention, KDA and MLA; experts, shared and dense FFNs; the lm_head; not the
router, nor kv_b, whose absorbed products stay float32) rounded as cuda/gemm.cu rounds
them, on the golden prompt and decode tokens of a fixture; prints the relative L2 of the
logits, per-token quantiles and the share of equal argmaxes.

  bf16_emul.py MODEL_DIR [one|split]      (default split)

one    the activations and the weights each rounded to bf16 once
split  each as hi + lo, two bf16 values (hi = bf16(v), lo = bf16(v - hi)); the product
       Wh xh + Wh xl + Wl xh, as gemm.cu forms it

Needs NumPy; MODEL_DIR must hold golden.json (tests/data/tiny-kimi-linear does). About two
minutes for the tiny fixture.
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kimi_ref  # noqa: E402


def bf16(a):
    """a rounded to bf16 (to nearest, ties to even), as float64."""
    u = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7fff + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


def split(a):
    a = np.asarray(a, dtype=np.float32)
    hi = bf16(a)
    return hi, bf16((a - hi).astype(np.float32))


MODE = "split"


def product(w, x):
    """w @ x with both operands as gemm.cu has them (w: [R][K]; x: [K] or [K][n])."""
    if MODE == "one":
        return bf16(w) @ bf16(x)
    wh, wl = split(w)
    xh, xl = split(x)
    return wh @ xh + wh @ xl + wl @ xh


class Proj(np.ndarray):
    """A projection's weight: `W @ x` and `x @ W.T` go through product()."""

    def __matmul__(self, x):
        return product(np.asarray(self), x)

    def __rmatmul__(self, x):
        return product(np.asarray(self).T, np.asarray(x).T).T


def on_gpu(name, v):
    return (v.ndim == 2 and "embed_tokens" not in name and "kv_b_proj" not in name and
            not name.endswith("block_sparse_moe.gate.weight"))


def main(argv):
    global MODE
    if len(argv) < 2 or (len(argv) > 2 and argv[2] not in ("one", "split")):
        print(__doc__)
        return 2
    MODE = argv[2] if len(argv) > 2 else "split"
    cfg, w = kimi_ref.load_model(argv[1])
    g = json.load(open(os.path.join(argv[1], "golden.json")))
    ids = np.array(g["prompt"] + g["decode_tokens"])
    ref = kimi_ref.Ref(cfg, w).forward(ids)
    wg = {k: (np.asarray(v).view(Proj) if on_gpu(k, v) else v) for k, v in w.items()}
    got = kimi_ref.Ref(cfg, wg).forward(ids)
    e = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
    print("%s, %d tokens: relative L2 %.3g; per token median %.3g, p90 %.3g, max %.3g; "
          "argmax equal %.3f" % (MODE, len(ids), np.linalg.norm(got - ref) / np.linalg.norm(ref),
                                 np.median(e), np.percentile(e, 90), e.max(),
                                 np.mean(got.argmax(1) == ref.argmax(1))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
