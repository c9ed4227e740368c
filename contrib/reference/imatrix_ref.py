#!/usr/bin/env python3
"""The mean squared activations `kli imatrix` should find, from kimi_ref.py's forward pass.

    imatrix_ref.py MODEL_DIR IMATRIX_FILE TOL ID...

Runs kimi_ref.Ref.forward over the ids (one chunk, every position's logits) with every weight
matrix wrapped so that each product records its input rows, then compares, matrix by matrix,
the row counts and the per-column means of x^2 with the F32 tensors and I64 ".count" tensors
of the kli-imatrix(5) file. MLA's kv_b is used through slices of its reshaped form here (as
kli absorbs it), so its input, the normalised latent of every token, is taken from the
attention state instead. Prints one line per mismatch and a summary; exits 1 on any.
"""
import json
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kimi_ref  # noqa: E402

SEEN = {}


def record(name, x):
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    s = SEEN.setdefault(name, [np.zeros(x.shape[1]), 0])
    s[0] += (x * x).sum(axis=0)
    s[1] += x.shape[0]


class Mat(np.ndarray):
    """A weight matrix that records what it multiplies: W @ x (x a vector) and x @ W.T."""

    def __array_finalize__(self, obj):
        self.name = None            # slices, reshapes and products are plain

    @property
    def T(self):
        t = np.asarray(self).T.view(Mat)
        t.name, t.transposed = self.name, True
        return t

    def __matmul__(self, other):
        if self.name is not None and not getattr(self, "transposed", False):
            record(self.name, other)
        return np.asarray(self) @ np.asarray(other)

    def __rmatmul__(self, other):
        if self.name is not None and getattr(self, "transposed", False):
            record(self.name, other)
        return np.asarray(other) @ np.asarray(self)


def read_imatrix(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    hdr = json.loads(data[8:8 + n])
    out = {}
    for name, e in hdr.items():
        if name == "__metadata__":
            continue
        b, en = e["data_offsets"]
        dt = "<f4" if e["dtype"] == "F32" else "<i8"
        out[name] = np.frombuffer(data[8 + n + b: 8 + n + en], dtype=dt)
    return out


def main(argv):
    model, path, tol, ids = argv[1], argv[2], float(argv[3]), [int(t) for t in argv[4:]]
    cfg, w = kimi_ref.load_model(model)
    for name, a in w.items():
        if a.ndim == 2 and name != "model.embed_tokens.weight":
            m = a.view(Mat)
            m.name = name
            w[name] = m
    ref = kimi_ref.Ref(cfg, w)
    ref.forward(ids)
    for i, st in ref.state.items():
        if "c" in st:
            for c in st["c"]:
                record("model.layers.%d.self_attn.kv_b_proj.weight" % i, c)
    got = read_imatrix(path)
    bad, worst, n = 0, 0.0, 0
    for name in sorted(set(k for k in got if not k.endswith(".count")) | set(SEEN)):
        cnt = int(got[name + ".count"][0]) if name + ".count" in got else -1
        s, c = SEEN.get(name, [None, 0])
        if cnt != c:
            print("%s: %d rows in the file, %d in the reference" % (name, cnt, c))
            bad += 1
            continue
        if c == 0:
            continue
        want = s / c
        e = np.linalg.norm(got[name] - want) / max(np.linalg.norm(want), 1e-30)
        worst, n = max(worst, e), n + 1
        if not e <= tol:
            print("%s: means off by %.3g (relative L2)" % (name, e))
            bad += 1
    print("%d matrices compared, largest relative error %.3g, %d mismatches" % (n, worst, bad))
    return 1 if bad or n == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
